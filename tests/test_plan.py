"""`ablauf plan` and `ui.plan`: counts worked out by hand, properties over generated trees,
the byte estimate against what a real SQLite store keeps, the command's output and errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ablauf_lang import api
from ablauf_lang.engine.kinds import Leaf
from ablauf_lang.ui.plan import format_plan, plan
from tests.commands import ablauf

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.abl"))


def planned(source: str, context: dict[str, Any] | None = None, **kw: Any) -> Any:
    return plan(api.compile(source, "t.abl"), context, **kw)


def test_sequence_parallel_and_try_counted_by_hand() -> None:
    p = planned(
        """
        (do!!
          (action!! :a/one {})
          (dopar!! (action!! :b/two {}) (action!! :b/three {})
                   (do!! (action!! :c/four {}) (action!! :c/five {})))
          (try!! (action!! :d/six {})
            (rescue!! (action!! :d/seven {}) (action!! :d/eight {}))
            (finally!! (idempotent-action!! :d/nine {}))))
        """
    )
    assert p.leaves == 9
    assert p.run_leaves == 9
    assert p.width == 3  # two leaves and a do!! side by side
    assert p.chain == 1 + 2 + (1 + 2 + 1)  # the try!! worst case: body fails, rescue, finally
    assert p.fanouts == ()
    actions = {a.action: a for a in p.actions}
    assert actions["d/nine"].idempotent == "yes"
    assert actions["a/one"].idempotent == "no"
    assert p.warnings == ()


def test_if_takes_one_branch_and_timeout_adds_its_timer() -> None:
    p = planned(
        """
        (do!!
          (if!! (ctx :go)
            (do!! (action!! :x/a {}) (action!! :x/b {}) (action!! :x/c {}))
            (action!! :x/d {}))
          (timeout!! 30 (dopar!! (action!! :y/e {}) (action!! :y/f {}))))
        """
    )
    assert p.leaves == 4 + 2 + 1  # the timer is a leaf of the tree
    assert p.run_leaves == 3 + 2 + 1  # the longer branch, the body, the timer
    assert p.width == 3  # two in the body and the timer
    assert p.chain == 3 + 1
    assert p.waits == 1


def test_fan_outs_unknown_until_run_time_then_sized_from_the_context() -> None:
    source = """
        (do!!
          (pmap!! [h (ctx :hosts)]
            (do!! (action!! :deploy/host {:host h})
                  (doseq!! [d (ctx :disks)] (action!! :disk/check {:host h :disk d}))))
          (doseq!! [x [1 2 3]] (idempotent-action!! :note/post {:x x})))
    """
    p = planned(source)
    assert p.leaves == 3
    assert p.run_leaves is None
    assert p.width is None  # a pmap!! of unknown size
    assert p.chain is None  # a doseq!! of unknown size inside it
    by_form = {(f.form, f.within is None): f for f in p.fanouts}
    outer = by_form[("pmap!!", True)]
    assert outer.size is None
    assert outer.bound == "unknown until run time: (ctx :hosts)"
    assert by_form[("doseq!!", True)].size == 3
    assert by_form[("doseq!!", True)].bound == "in the program"
    inner = by_form[("doseq!!", False)]
    assert inner.within == outer.node
    assert any("known only at run time" in w for w in p.warnings)

    sized = planned(source, {"hosts": ["a", "b", "c", "d"], "disks": [1, 2]}, fanout_limit=3)
    assert sized.run_leaves == 4 * (1 + 2) + 3
    assert sized.width == 4
    assert sized.chain == (1 + 2) + 3
    assert [w for w in sized.warnings if "more than the limit of 3" in w]
    assert {f.bound for f in sized.fanouts} == {"from the given context", "in the program"}
    assert sized.bytes > p.bytes  # four items stored, not one


def test_a_fan_out_over_a_missing_key_fails_there() -> None:
    p = planned("(pmap!! [h (ctx :hosts)] (action!! :a/b {}))", {"other": 1})
    (fan,) = p.fanouts
    assert fan.size is None
    assert "the run fails there" in fan.bound


def test_non_idempotent_action_inside_with_retries_is_warned_about() -> None:
    p = planned(
        """
        (import "std/retry")
        (do!!
          (with-retries 3 (action!! :pay/charge {:amount 10}))
          (with-retries 3 (idempotent-action!! :pay/check {}))
          (action!! :pay/refund {} {:retry {:max 3}}))
        """
    )
    (warning,) = p.warnings  # the durable :retry never repeats an unknown outcome
    assert ":pay/charge (line 4)" in warning
    assert "rescue!!" in warning
    assert {a.action: a.leaves for a in p.actions} == {
        "pay/charge": 3,
        "pay/check": 3,
        "pay/refund": 1,
    }


def test_a_deep_tree_is_planned_without_recursion() -> None:
    depth = 3000
    source = "(do!! " * depth + "(action!! :a/b {})" + ")" * depth
    p = planned(source)
    assert p.depth == depth + 1
    assert p.leaves == 1
    assert p.chain == 1


def _leaves_in(node: Any) -> int:
    n, stack = 0, [node]
    while stack:
        x = stack.pop()
        if isinstance(x, Leaf):
            n += 1
            continue
        stack.extend(getattr(x, "children", ()))
        if getattr(x, "template", None) is not None:
            stack.append(x.template)
    return n


def _program() -> st.SearchStrategy[str]:
    leaf = st.sampled_from(["(action!! :a/x {})", "(idempotent-action!! :a/y {})", "(sleep!! 1)"])

    def grow(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        many = st.lists(children, min_size=1, max_size=4).map(" ".join)
        return st.one_of(
            many.map(lambda s: f"(do!! {s})"),
            many.map(lambda s: f"(dopar!! {s})"),
            st.tuples(children, children).map(lambda t: f"(try!! {t[0]} (rescue!! {t[1]}))"),
            st.tuples(children, children).map(lambda t: f"(if!! (ctx :c) {t[0]} {t[1]})"),
            children.map(lambda s: f"(doseq!! [v [1 2]] {s})"),
            children.map(lambda s: f"(pmap!! [v (ctx :items)] {s})"),
        )

    return st.recursive(leaf, grow, max_leaves=12)


@settings(max_examples=60, deadline=None)
@given(_program(), st.integers(min_value=0, max_value=4))
def test_counts_agree_with_the_tree_and_with_each_other(source: str, items: int) -> None:
    root = api.compile(source, "gen.abl")
    p = plan(root)
    assert p.leaves == _leaves_in(root)
    if p.width is not None and p.run_leaves is not None:
        assert p.width <= p.run_leaves
    sized = plan(root, {"items": list(range(items)), "c": True})
    assert sized.run_leaves is not None  # every fan-out sized
    assert sized.width is not None
    assert sized.chain is not None
    assert sized.width <= max(sized.run_leaves, 1) or sized.run_leaves == 0
    assert sized.chain <= sized.run_leaves
    assert sized.depth == p.depth


@pytest.mark.parametrize("name", ["hello.abl", "release.abl", "rescue.abl"])
def test_the_byte_estimate_is_near_what_sqlite_keeps(tmp_path: Path, name: str) -> None:
    source = (ROOT / "examples" / name).read_text()
    store = f"sqlite:///{tmp_path / 'runs.db'}"
    run = api.eval(source, filename=name, store=store)
    history = api.run_history(run.run_id, store)
    kept = sum(len(data.encode()) for _, _, data in history.rows)
    estimate = plan(api.compile(source, name)).bytes
    assert kept / 2 <= estimate <= kept * 2, (kept, estimate)


def test_the_byte_estimate_follows_a_fan_out(tmp_path: Path) -> None:
    source = "(pmap!! [h (ctx :hosts)] (do!! (action!! :action/log h) (action!! :action/log h)))"
    store = f"sqlite:///{tmp_path / 'runs.db'}"
    for n in (10, 60):
        context = {"hosts": list(range(n))}
        run = api.eval(source, context=context, store=store)
        kept = sum(len(d.encode()) for _, _, d in api.run_history(run.run_id, store).rows)
        estimate = plan(api.compile(source), context).bytes
        assert kept / 2 <= estimate <= kept * 2, (n, kept, estimate)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_plans_or_reports_its_error(path: Path) -> None:
    source = path.read_text()
    try:
        root = api.compile(source, str(path))
    except Exception:
        return  # broken.abl: the command test below checks its message
    text = format_plan(plan(root))
    assert text.startswith("leaves:")
    assert all(line.strip() for line in text.splitlines())


def test_the_command_prints_the_plan_and_json(tmp_path: Path) -> None:
    program = tmp_path / "fan.abl"
    program.write_text("(pmap!! [h (ctx :hosts)] (action!! :deploy/host {:host h}))\n")
    out = ablauf("plan", str(program), "--context", '{"hosts": ["a", "b"]}')
    assert out.returncode == 0, out.stderr
    assert "widest:        2 in flight at once" in out.stdout
    assert ":deploy/host  1 leaf, idempotent: no" in out.stdout

    data = json.loads(ablauf("plan", str(program), "--json", "--limit", "1").stdout)
    assert data["file"] == str(program)
    assert data["width"] is None
    assert data["fanouts"][0]["bound"] == "unknown until run time: (ctx :hosts)"
    assert data["fanout_limit"] == 1
    assert data["warnings"]

    piped = ablauf("plan", "-", stdin="(do!! (action!! :a/b {}) (action!! :a/c {}))")
    assert piped.returncode == 0
    assert "longest chain: 2" in piped.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["examples/broken.abl"], "examples/broken.abl:7:4: error: unknown form lgo!!"),
        (["examples/hello.abl", "--context", "{bad"], "--context: not valid JSON"),
        (["examples/hello.abl", "--context", "[1]"], "must be a JSON object"),
        (["no/such/file.abl"], "no such file"),
        (["examples/hello.abl", "--limit", "0"], "--limit"),
    ],
)
def test_bad_input_exits_2_with_a_message(args: list[str], message: str) -> None:
    out = ablauf("plan", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
