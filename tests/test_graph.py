"""Pictures of programs and runs (`ui.graph`): valid SVG with one element per node, the
states' colours, the layout's shape, escaping, wide fan-outs folded, and the commands
that write pictures (`ablauf check --graph`, `ablauf runs graph`, the REPL's `:graph`)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import DummyInput
from prompt_toolkit.output import DummyOutput
from rich.console import Console

import ablauf_lang
from ablauf_lang import VirtualClock, api
from ablauf_lang.engine.job import Job, make_job, preorder, restart_job
from ablauf_lang.engine.kinds import Leaf
from ablauf_lang.engine.nodes import failure, success
from ablauf_lang.names import REPL_COMMANDS
from ablauf_lang.repl.app import Repl
from ablauf_lang.ui.graph import (
    STATE_COLOURS,
    graph_layout,
    layout_svg,
    picture_format,
    program_svg,
    run_states,
    run_svg,
    write_picture,
)

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"
SVG = "{http://www.w3.org/2000/svg}"
XSS = "<script>alert(1)</script>"
HAS_CAIROSVG = True
try:
    picture_format("x.png")
except ablauf_lang.AblaufError:
    HAS_CAIROSVG = False


@pytest.fixture(autouse=True)
def _instant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ABLAUF_DEMO_DELAY", "0")


def parsed(svg: str) -> ET.Element:
    """The SVG as XML (a parse error fails the test)."""
    return ET.fromstring(svg)


def groups(svg: str, cls: str) -> list[ET.Element]:
    """The `<g>` elements whose class list holds `cls`."""
    return [g for g in parsed(svg).iter(SVG + "g") if cls in (g.get("class") or "").split()]


def node_states(svg: str) -> dict[int, str]:
    """Node id -> the state its class names, for every `g.node`."""
    out: dict[int, str] = {}
    for g in groups(svg, "node"):
        classes = (g.get("class") or "").split()
        (state,) = [c.removeprefix("state-") for c in classes if c.startswith("state-")]
        node = int(g.get("data-node") or -1)
        assert g.get("id") == f"n{node}"
        assert node not in out, f"node {node} drawn twice"
        out[node] = state
    return out


def fills(svg: str) -> dict[int, str]:
    """Node id -> the fill of its box."""
    out = {}
    for g in groups(svg, "node"):
        rect = g.find(SVG + "rect")
        assert rect is not None
        out[int(g.get("data-node") or -1)] = rect.get("fill") or ""
    return out


def programs() -> list[Path]:
    return sorted(p for p in EXAMPLES.glob("*.abl") if p.name != "broken.abl")


ACTIONS = api.load_actions(str(EXAMPLES / "actions.py"))
LANGUAGE_ACTIONS = api.load_actions(str(EXAMPLES / "language_actions.py"))

# example -> (actions, context, eval options)
RUNS: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "hello": (ACTIONS, None, {}),
    "rescue": (ACTIONS, None, {}),
    "migrate": (ACTIONS, None, {}),
    "deploy": (ACTIONS, None, {}),
    "order": (ACTIONS, {"customer": "c-17"}, {}),
    "branch": (LANGUAGE_ACTIONS, {"repo": "acme/broken", "version": "2.0.0"}, {}),
    "fanout": (
        LANGUAGE_ACTIONS,
        {"service": "billing", "version": "1.4.2", "hosts": ["web-1", "down-2", "web-3"]},
        {},
    ),
    "approval": (ACTIONS, None, {"detach": True, "clock": VirtualClock()}),
    "release": (ACTIONS, None, {}),
    "release-canary": (ACTIONS, None, {}),
}


def run_example(name: str) -> ablauf_lang.Run:
    actions, context, options = RUNS[name]
    path = EXAMPLES / f"{name}.abl"
    return ablauf_lang.eval(
        path.read_text(), actions, context=context, filename=str(path), **options
    )


# ---------------------------------------------------------------- programs


def test_the_examples_cover_every_example_but_the_broken_one() -> None:
    assert {p.stem for p in programs()} == set(RUNS)


@pytest.mark.parametrize("path", programs(), ids=lambda p: p.stem)
def test_every_example_draws_one_element_per_node(path: Path) -> None:
    root = api.compile(path.read_text(), str(path))
    svg = program_svg(root, title=str(path))
    assert parsed(svg).tag == SVG + "svg"
    ids = [n.id for n in preorder(root)]
    shown = node_states(svg)
    assert sorted(shown) == sorted(ids)
    assert set(shown.values()) == {"unset"}  # nothing ran
    # a program's edges are all plain: no path taken yet
    assert 'class="edge taken"' not in svg
    assert 'class="edge faded"' not in svg


def test_a_program_shows_kinds_roles_actions_and_payloads() -> None:
    root = api.compile(
        '(try!! (action!! :db/migrate {:to 42}) (rescue!! (log!! "r")) (finally!! (log!! "f")))'
    )
    layout = graph_layout(root)
    by_id = {b.id: b for b in layout.boxes}
    assert by_id[0].head.startswith("try!! #0")
    heads = [by_id[c.id].head.split()[0] for c in root.children]
    assert heads == ["body", "rescue!!", "finally!!"]
    leaf = next(b for b in layout.boxes if b.kind == "leaf")
    assert leaf.text == "db/migrate {:to 42}"
    svg = layout_svg(layout)
    assert "kind-try" in svg
    assert "kind-leaf" in svg


def test_do_children_go_down_in_order_and_dopar_children_side_by_side() -> None:
    root = api.compile("(do!! (log!! 1) (dopar!! (log!! 2) (log!! 3) (log!! 4)) (log!! 5))")
    layout = graph_layout(root)
    boxes = {b.id: b for b in layout.boxes}
    # do!! #0: children #1, #2 (the dopar!!), #6 one under the other, in order
    assert boxes[0].y < boxes[1].y < boxes[2].y < boxes[6].y
    assert boxes[1].x == boxes[6].x
    # dopar!! #2: children #3, #4, #5 on one row, left to right, none overlapping
    assert boxes[3].y == boxes[4].y == boxes[5].y > boxes[2].y
    assert boxes[3].x + boxes[3].w <= boxes[4].x
    assert boxes[4].x + boxes[4].w <= boxes[5].x
    # every box lies inside the picture
    for box in layout.boxes:
        assert box.x >= 0
        assert box.y >= 0
        assert box.x + box.w <= layout.width
        assert box.y + box.h <= layout.height


def test_a_template_is_drawn_without_ids() -> None:
    root = api.compile("(pmap!! [x (ctx :hosts)] (do!! (log!! x) (log!! :done)))")
    svg = program_svg(root)
    assert sorted(node_states(svg)) == [0]  # the body gets ids when it is expanded
    templates = groups(svg, "template")
    assert len(templates) == 3  # do!!, log!!, log!!
    assert all(g.get("data-node") is None for g in templates)
    assert "(each)" in svg
    # once expanded (here to no copy at all) the template is no longer drawn
    run = ablauf_lang.eval("(pmap!! [x []] (log!! x))", {})
    assert not groups(run_svg(run.job), "template")


def test_a_deep_tree_draws_without_recursion() -> None:
    depth = 3000
    root = api.compile("(do!! " * depth + "(log!! 1)" + ")" * depth)
    svg = program_svg(root)
    assert len(node_states(svg)) == depth + 1


# ---------------------------------------------------------------- runs


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_run_draws_every_node_in_its_state_and_colour(name: str) -> None:
    run = run_example(name)
    svg = run_svg(run.job, title=name)
    expected = run_states(run.job)
    assert node_states(svg) == expected
    assert sorted(expected) == sorted(n.id for n in run.job.nodes())
    colours = fills(svg)
    for node, state in expected.items():
        assert colours[node] == STATE_COLOURS[state]
    for state in set(expected.values()):
        assert STATE_COLOURS[state] in svg
    # edges into nodes that ran are strong, the others faded
    root = parsed(svg)
    edges = [p for p in root.iter(SVG + "path") if "edge" in (p.get("class") or "")]
    assert len(edges) == len(expected) - 1
    ran = sum(1 for i, s in expected.items() if i != 0 and s not in ("unset", "skipped"))
    assert sum(1 for p in edges if "taken" in (p.get("class") or "")) == ran


def test_the_examples_together_show_every_state() -> None:
    seen: set[str] = set()
    for name in sorted(RUNS):
        seen |= set(run_states(run_example(name).job).values())
    run = ablauf_lang.eval(
        '(do!! (timeout!! {:seconds 1} (sleep!! {:seconds 10})) (log!! "x"))',
        {},
        clock=VirtualClock(),
    )
    svg = run_svg(run.job)
    assert "timeout" in node_states(svg).values()
    seen |= set(node_states(svg).values())
    assert seen == set(STATE_COLOURS)


def test_rescue_marks_the_path_taken_and_the_branch_never_entered() -> None:
    run = run_example("rescue")
    states = node_states(run_svg(run.job))
    # dopar 0: log 1; try 2: body 3 (fail 4, log 5 never reached), rescue 6, finally 8
    assert states[4] == "failure"
    assert states[5] == "unset"
    assert states[6] == "success"
    layout = graph_layout(run.job.root, run_states(run.job))
    styles = {e.child: e.style for e in layout.edges}
    assert styles[4] == "taken"
    assert styles[5] == "faded"
    assert styles[7] == "taken"


def test_a_skipped_branch_is_faded() -> None:
    run = run_example("hello")
    states = run_states(run.job)
    assert "skipped" in states.values()
    layout = graph_layout(run.job.root, states)
    for edge in layout.edges:
        if edge.child is not None and states[edge.child] == "skipped":
            assert edge.style == "faded"
    assert ".run .state-unset,.run .state-skipped" in layout_svg(layout)


def test_a_parked_run_shows_what_waits() -> None:
    run = run_example("approval")
    assert run.status == "pending"
    shown = node_states(run_svg(run.job))
    waiting = [i for i, s in shown.items() if s == "waiting"]
    assert waiting
    for node in waiting:
        leaf = run.job.node(node)
        assert isinstance(leaf, Leaf)
        assert leaf.result == "pending"


def test_the_default_title_tells_status_restarts_and_abort() -> None:
    run = run_example("rescue")
    title = parsed(run_svg(run.job)).find(SVG + "title")
    assert title is not None
    assert title.text == f"job success · restarts {run.job.restarts}"


# ---------------------------------------------------------------- escaping


def _xss_job() -> Job:
    root = api.compile(f'(do!! (action!! :x/y "{XSS}") (fail!! "{XSS}"))')
    job = make_job(root)
    job, dispatches = restart_job(job, [])
    (first,) = dispatches
    job, _ = restart_job(job, [success(first, {"html": XSS, "bad": "a\x00b\x1bc\ud800"})])
    return job


def test_everything_a_program_or_an_action_produced_is_escaped() -> None:
    job = _xss_job()
    for svg in (
        run_svg(job, title=XSS),
        program_svg(job.root, title=XSS),
        run_svg(job, title='a"b'),
    ):
        root = parsed(svg)  # control characters and a lone surrogate: still valid XML
        assert "<script" not in svg
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in svg
        assert not list(root.iter(SVG + "script"))
        assert not list(root.iter("script"))
        texts = "".join(root.itertext())
        assert XSS in texts  # shown as text
    detail = "".join(parsed(run_svg(job)).itertext())
    assert "output: " in detail  # the tooltip holds the output, escaped
    assert "\ufffd" in detail


# ---------------------------------------------------------------- fan-outs


def _wide_job(width: int = 10_000) -> Job:
    """A pmap!! of `width` leaves: 9,000 succeeded, 50 failed, the rest pending."""
    root = api.compile(f"(pmap!! [x (range {width})] (action!! :x/y x))")
    job, dispatches = restart_job(make_job(root), [])
    assert len(dispatches) == width
    results = [success(d, d.id) for d in dispatches[:9000]]
    results += [failure(d, "no") for d in dispatches[9000:9050]]
    job, _ = restart_job(job, results)
    return job


def test_a_wide_fan_out_folds_into_counts_by_state() -> None:
    job = _wide_job()
    started = time.perf_counter()
    svg = run_svg(job)
    took = time.perf_counter() - started
    assert took < 1.0, took
    shown = node_states(svg)
    assert len(shown) == 1 + 5  # the pmap!! and its first children
    (fold,) = groups(svg, "fold")
    assert fold.get("data-parent") == "0"
    text = "".join(fold.itertext())
    assert "9,995 more: 950 pending, 8,995 success, 50 failure" in text
    assert len(svg) < 20_000


def test_a_folded_branch_can_be_shown_whole() -> None:
    job = _wide_job(200)
    states = run_states(job)
    assert len(groups(layout_svg(graph_layout(job.root, states)), "fold")) == 1
    whole = layout_svg(graph_layout(job.root, states, unfold={0}))
    assert len(node_states(whole)) == 201
    assert not groups(whole, "fold")
    assert len(node_states(run_svg(job, fold=0))) == 201
    assert len(node_states(run_svg(job, fold=199))) == 1 + 5
    assert len(node_states(run_svg(job, fold=200))) == 201


def test_the_layout_is_json_for_the_web_page() -> None:
    import json

    job = _wide_job(60)
    data = graph_layout(job.root, run_states(job)).to_dict()
    text = json.dumps(data)
    assert json.loads(text)["folds"][0]["counts"] == {"success": 55}
    assert data["with_states"] is True
    assert {b["id"] for b in data["boxes"]} == {0, 1, 2, 3, 4, 5}


# ---------------------------------------------------------------- files


def test_write_picture_svg_and_its_refusals(tmp_path: Path) -> None:
    svg = program_svg(api.compile("(log!! 1)"))
    out = tmp_path / "p.svg"
    write_picture(svg, str(out))
    assert out.read_text(encoding="utf-8") == svg
    with pytest.raises(ablauf_lang.AblaufError, match=r"FILE\.svg or FILE\.png"):
        write_picture(svg, str(tmp_path / "p.jpg"))
    with pytest.raises(ablauf_lang.AblaufError, match="cannot write"):
        write_picture(svg, str(tmp_path / "missing" / "p.svg"))


@pytest.mark.skipif(HAS_CAIROSVG, reason="cairosvg is installed")
def test_png_without_cairosvg_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(ablauf_lang.AblaufError, match="pip install cairosvg"):
        write_picture("<svg/>", str(tmp_path / "p.png"))
    assert not (tmp_path / "p.png").exists()


@pytest.mark.skipif(not HAS_CAIROSVG, reason="cairosvg is not installed")
def test_png_with_cairosvg(tmp_path: Path) -> None:
    out = tmp_path / "p.png"
    write_picture(run_svg(run_example("rescue").job), str(out))
    assert out.read_bytes().startswith(b"\x89PNG")


# ---------------------------------------------------------------- commands


def ablauf(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("ablauf")
    argv = [exe] if exe else [sys.executable, "-m", "ablauf_lang"]
    env = {**os.environ, "ABLAUF_STORE": f"sqlite:///{cwd / 'runs.db'}"}
    done = subprocess.run(
        [*argv, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=60
    )
    assert "Traceback" not in done.stderr
    return done


def one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0]
    assert done.stdout == ""


def test_check_graph_writes_the_program(tmp_path: Path) -> None:
    hello = str(EXAMPLES / "hello.abl")
    done = ablauf("check", hello, "--graph", "out.svg", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "wrote out.svg"
    svg = (tmp_path / "out.svg").read_text(encoding="utf-8")
    root = api.compile((EXAMPLES / "hello.abl").read_text(), hello)
    assert len(node_states(svg)) == sum(1 for _ in preorder(root))

    done = ablauf("check", hello, "--graph", "j.svg", "--json", cwd=tmp_path)
    assert done.returncode == 0
    assert '"graph": "j.svg"' in done.stdout
    assert (tmp_path / "j.svg").exists()


def test_check_graph_refusals(tmp_path: Path) -> None:
    hello = str(EXAMPLES / "hello.abl")
    one_line_error(ablauf("check", hello, "--graph", "out.gif", cwd=tmp_path), "out.gif", ".svg")
    one_line_error(
        ablauf("check", hello, "--graph", "no/such/dir/out.svg", cwd=tmp_path), "cannot write"
    )
    one_line_error(ablauf("check", hello, hello, "--graph", "out.svg", cwd=tmp_path), "one program")
    # a program with an error: its message, and no picture
    done = ablauf("check", str(EXAMPLES / "broken.abl"), "--graph", "b.svg", cwd=tmp_path)
    assert done.returncode == 2
    assert "lgo!!" in done.stderr
    assert not (tmp_path / "b.svg").exists()
    if not HAS_CAIROSVG:
        one_line_error(
            ablauf("check", hello, "--graph", "out.png", cwd=tmp_path), "pip install cairosvg"
        )
    assert not list(tmp_path.glob("out.*"))


def test_runs_graph_draws_a_stored_run(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    path = EXAMPLES / "rescue.abl"
    run = ablauf_lang.eval(path.read_text(), ACTIONS, store=url, filename=str(path))
    done = ablauf("runs", "graph", run.run_id[:6], "-o", "run.svg", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "wrote run.svg\n"
    svg = (tmp_path / "run.svg").read_text(encoding="utf-8")
    assert node_states(svg) == run_states(run.job)
    title = parsed(svg).find(SVG + "title")
    assert title is not None
    assert title.text is not None
    assert title.text.startswith(f"run {run.run_id} · {path} · success")
    # `-o -`: the SVG on standard output
    done = ablauf("runs", "graph", run.run_id, "-o", "-", "--store", url, cwd=tmp_path)
    assert done.returncode == 0
    assert node_states(done.stdout) == run_states(run.job)


def test_runs_graph_refusals(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    run = ablauf_lang.eval("(log!! 1)", {}, store=url)
    one_line_error(ablauf("runs", "graph", "feedbeef", "-o", "r.svg", cwd=tmp_path), "feedbeef")
    one_line_error(
        ablauf("runs", "graph", run.run_id, "-o", "nope/r.svg", cwd=tmp_path), "cannot write"
    )
    one_line_error(ablauf("runs", "graph", run.run_id, "-o", "r.txt", cwd=tmp_path), "r.txt")
    if not HAS_CAIROSVG:
        one_line_error(
            ablauf("runs", "graph", run.run_id, "-o", "r.png", cwd=tmp_path),
            "pip install cairosvg",
        )
    done = ablauf("runs", "graph", run.run_id, cwd=tmp_path)
    assert done.returncode == 2  # -o is required
    assert not list(tmp_path.glob("r.*"))


def test_runs_graph_folds_wide_runs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    run = ablauf_lang.eval("(pmap!! [x (range 80)] (log!! x))", {}, store=url)
    ablauf("runs", "graph", run.run_id, "-o", "f.svg", cwd=tmp_path)
    svg = (tmp_path / "f.svg").read_text(encoding="utf-8")
    assert len(node_states(svg)) == 6
    assert "75 more: 75 success" in svg
    ablauf("runs", "graph", run.run_id, "-o", "w.svg", "--fold", "0", cwd=tmp_path)
    assert len(node_states((tmp_path / "w.svg").read_text(encoding="utf-8"))) == 81


# ---------------------------------------------------------------- the REPL


def make_repl() -> tuple[Repl, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, width=120, color_system=None)
    repl = Repl(
        {}, console=console, history=InMemoryHistory(), input=DummyInput(), output=DummyOutput()
    )
    return repl, out


def test_repl_graph_draws_the_current_job(tmp_path: Path) -> None:
    repl, out = make_repl()
    repl.handle(":graph x.svg")
    assert "error:" in out.getvalue()  # no job yet
    repl.handle('(try!! (fail!! "no") (rescue!! (log!! "r")) (finally!! (log!! "f")))')
    repl.handle(":run")
    path = tmp_path / "job.svg"
    repl.handle(f":graph {path}")
    assert f"wrote {path}" in out.getvalue()
    svg = path.read_text(encoding="utf-8")
    job = repl.stepper.require_job()
    assert node_states(svg) == run_states(job)
    assert "failure" in node_states(svg).values()
    title = parsed(svg).find(SVG + "title")
    assert title is not None
    assert title.text is not None
    assert "success" in title.text


def test_repl_graph_errors_are_one_line(tmp_path: Path) -> None:
    repl, out = make_repl()
    repl.handle("(log!! 1)")
    for arg, needle in (
        ("", "usage: :graph FILE"),
        (str(tmp_path / "x.bmp"), "FILE.svg or FILE.png"),
        (str(tmp_path / "no" / "x.svg"), "cannot write"),
    ):
        out.truncate(0)
        out.seek(0)
        repl.handle(f":graph {arg}".rstrip())
        lines = out.getvalue().strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("error: ")
        assert needle in lines[0]
    assert ":graph" in REPL_COMMANDS
