"""Fuzzing the front end: whatever the input, the answer is an AblaufError or a run.

Programs are the shipped examples, mutated (tokens inserted, slices cut or doubled,
characters replaced), truncated at every kind of place, nested thousands deep, holding
huge numbers, NUL bytes, invalid UTF-8, lone surrogates, line separators and byte order
marks. Each goes through `parse`, `compile` and (when it compiles to a small tree) `eval`
in process: the only exception allowed is an `AblaufError`, whose message renders and
whose position, when it has one, is a real line. A sample goes through the `ablauf`
command (`check`, and `run --store memory:`) as a subprocess: exit 0, 1 or 2 and never
a traceback. Damaged job snapshots go through `serde.loads`: a `JobError` or a job.

Run with the derandomised `ci` profile (tests/conftest.py), it takes well under a minute.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ablauf_lang
from ablauf_lang import VirtualClock, values
from ablauf_lang.codec import job as serde
from ablauf_lang.engine.job import Job
from ablauf_lang.engine.kinds import Node
from ablauf_lang.engine.nodes import Status
from ablauf_lang.errors import AblaufError, JobError
from ablauf_lang.lang.reader import decode_source

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"
SEEDS: list[tuple[str, str]] = [
    (str(path), path.read_text(encoding="utf-8")) for path in sorted(EXAMPLES.glob("*.abl"))
]
SEEDS += [
    ("std.abl", '(import "std/retry") (import "std/deploy" :as d) (with-retries 2 (log!! 1))'),
    ("lang.abl", "(defn f [x & more] (str x more)) (let [a [1 2]] (log!! {:a (f a) [1 2] 3}))"),
    ("runtime.abl", "(doseq!! [h (ctx :hosts)] (if!! (= h (ctx :service)) (log!! h) (fail!!)))"),
]

# Pieces a mutation inserts: brackets and quotes that unbalance, forms that compile, and
# the inputs the issue names (huge numbers, deep nesting, NUL, surrogates, U+2028, BOM).
TOKENS = [
    *"()[]{}\"\\:;,#_ \n\t\r&'.",
    "#_",
    "nil",
    "true",
    "0",
    "-1",
    "1.5",
    "1e999",
    "-1e400",
    "1e-999",
    "9" * 4301,
    "1" * 5000,
    "\x00",
    "\ud800",
    "\udfff",
    "\u2028",
    "\ufeff",
    "\x85",
    "\x0c",
    "é",
    "😀",
    "\\u00",
    "\\uD800",
    "\\q",
    "(log!! 1)",
    "(lgo!! 1)",
    "(ctx :a)",
    "(ctx [:a :b] 1)",
    "(ctx)",
    "(fail!!)",
    "(do!! ",
    "(dopar!! ",
    "(try!! ",
    "(rescue!! ",
    "(finally!! ",
    "(if!! true ",
    "(when!! (ctx :a) ",
    "(doseq!! [x (ctx :hosts)] ",
    "(pmap!! [x [1 2]] ",
    "(with-augment [identity :x] ",
    "(with-augment [[:a 0] [:b :c]] ",
    "(def x ",
    "(defn f [a] ",
    "(f ",
    "(let [a 1] ",
    "(for [i (range 3)] ",
    "(str ",
    "(* 1e308 ",
    "(+ 1 ",
    "(/ 1 0)",
    "(range 100000)",
    '(import "std/retry")',
    '(import "/etc/passwd")',
    '(import "../../../../etc/passwd")',
    '(import "/proc/self/environ")',
    '(import "missing")',
    "(action!! :action/sleep 1e300)",
    "(action!! :action/sleep -1)",
    "(action!! :x/y {:k [1 2]} {:idempotent? true})",
    "{[1 2] 3}",
    "{{:a 1} 2}",
    "{:a}",
    "(quote (a b))",
    "(fn [x] x)",
    "[" * 150,
    "]" * 150,
    "{:k " * 120,
]

ACTION_NAMES = sorted(
    {m for _, text in SEEDS for m in re.findall(r"action!! :([\w/.-]+)", text)} | {"x/y"}
)


def _echo(payload: Any, context: Any) -> Any:
    return payload


# Every action the seeds name answers with its payload; `action/sleep` never waits.
ACTIONS = {name: _echo for name in ACTION_NAMES} | {"action/sleep": _echo}
CONTEXT = {"repo": "acme/x", "version": "1", "hosts": ["a", "b"], "service": "s", "a": {"b": 2}}


def _check_error(exc: AblaufError) -> None:
    text = str(exc)
    assert "Traceback" not in text
    assert text.strip()
    if exc.line is not None:
        assert exc.line >= 1
        assert exc.column is None or exc.column >= 1


def _size(root: Node) -> int:
    count, stack = 0, [root]
    while stack:
        node = stack.pop()
        count += 1
        stack.extend(getattr(node, "children", ()))
    return count


def exercise(source: str, filename: str | None, *, run: bool = True, store: Any = None) -> None:
    """Read, compile and run `source`; any exception but an AblaufError fails the test."""
    try:
        ablauf_lang.parse(source, filename)
    except AblaufError as exc:
        _check_error(exc)
    try:
        root = ablauf_lang.compile(source, filename)
    except AblaufError as exc:
        _check_error(exc)
        return
    if not run or _size(root) > 400:
        return
    try:
        # A mutated program may wait (a long sleep, an await no one signals): on a virtual
        # clock within a week-long deadline, every wait ends at once.
        result = ablauf_lang.eval(
            root,
            actions=ACTIONS,
            context=dict(CONTEXT),
            store=store,
            clock=VirtualClock(frozen=True),
            timeout=7 * 86400,
        )
    except AblaufError as exc:
        _check_error(exc)
        return
    assert result.status in (Status.SUCCESS, Status.FAILURE)
    try:
        values.dumps_json(result.to_dict())
        again = Job.from_json(result.job.to_json())
    except AblaufError as exc:
        _check_error(exc)
    else:
        assert again.status == result.job.status


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, str]:
    """A seed program with a few mutations."""
    filename, text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["insert", "insert", "delete", "double", "char", "cut"]))
        if kind == "insert":
            text = text[:at] + draw(st.sampled_from(TOKENS)) + text[at:]
        elif kind == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 40)) :]
        elif kind == "double":
            end = at + draw(st.integers(1, 60))
            text = text[:end] + text[at:end] + text[end:]
        elif kind == "char":
            text = text[:at] + draw(st.characters(codec=None)) + text[at + 1 :]
        else:
            text = text[:at]
    return filename, text


# ---------------------------------------------------------------------------------------
# In process


@settings(max_examples=700)
@given(mutated())
def test_mutated_examples_get_an_answer(program: tuple[str, str]) -> None:
    filename, source = program
    exercise(source, filename)


@settings(max_examples=300)
@given(st.sampled_from(SEEDS), st.floats(0, 1))
def test_truncated_examples_get_an_answer(seed: tuple[str, str], where: float) -> None:
    filename, source = seed
    exercise(source[: int(len(source) * where)], filename, run=False)


@settings(max_examples=60)
@given(
    st.lists(st.sampled_from(["(do!! ", "[", "{:k ", "(try!! ", "(str ", "(ctx "]), min_size=1),
    st.integers(1, 1500),
    st.booleans(),
)
def test_deep_nesting_gets_an_answer(openers: list[str], depth: int, closed: bool) -> None:
    closers = {"(do!! ": ")", "[": "]", "{:k ": "}", "(try!! ": ")", "(str ": ")", "(ctx ": ")"}
    chain = [openers[i % len(openers)] for i in range(depth)]
    body = "".join(chain) + "1" + ("".join(closers[o] for o in reversed(chain)) if closed else "")
    exercise(f"(log!! {body})", "deep.abl", run=depth < 150)
    exercise(body, "deep.abl", run=depth < 150)


@settings(max_examples=300)
@given(st.lists(st.sampled_from(TOKENS), max_size=12).map("".join), st.text(max_size=30))
def test_token_soup_gets_an_answer(soup: str, noise: str) -> None:
    exercise(soup + noise, None)
    exercise(f"(log!! {soup}{noise})", "<input>")


@settings(max_examples=300)
@given(st.sampled_from(SEEDS), st.binary(max_size=8), st.floats(0, 1))
def test_invalid_utf8_is_a_located_error(seed: tuple[str, str], junk: bytes, where: float) -> None:
    filename, source = seed
    data = source.encode("utf-8")
    at = int(len(data) * where)
    data = data[:at] + junk + data[at:]
    error: AblaufError | None = None
    try:
        text = decode_source(data, filename)
    except AblaufError as exc:
        error = exc
    if error is not None:
        _check_error(error)
        assert error.filename == filename
        assert "byte offset" in error.message
        return
    exercise(text, filename, run=False)


@settings(max_examples=60)
@given(mutated())
def test_mutated_examples_on_a_durable_store(tmp_path_factory: Any, program: Any) -> None:
    filename, source = program
    store = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'runs.db'}"
    exercise(source, filename, store=store)


# ---------------------------------------------------------------------------------------
# Damaged snapshots


def _snapshots() -> list[dict[str, Any]]:
    out = []
    for source in [
        "(try!! (dopar!! (log!! 1) (fail!! 2)) (rescue!! (log!! (ctx :exec/last-error))))",
        "(doseq!! [x [1 2]] (with-augment [identity :seen] (log!! {[x] x})))",
        '(if!! (ctx :a) (log!! "yes") (log!! "no"))',
    ]:
        run = ablauf_lang.eval(source, context={"a": True})
        out.append(json.loads(run.job.to_json()))
        out.append(json.loads(ablauf_lang.make_job(source).to_json()))
    return out


SNAPSHOTS = _snapshots()
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 40) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)


@st.composite
def damaged(draw: st.DrawFn) -> str:
    """A job snapshot with a field dropped or replaced, or its text cut or altered."""
    data = json.loads(json.dumps(draw(st.sampled_from(SNAPSHOTS))))
    for _ in range(draw(st.integers(1, 3))):
        # Pick an object somewhere in the snapshot and drop or replace one of its fields.
        target: Any = data
        for _ in range(draw(st.integers(0, 3))):
            inner = [v for v in (target.values() if isinstance(target, dict) else target)]
            inner = [v for v in inner if isinstance(v, dict | list) and v]
            if not inner:
                break
            target = draw(st.sampled_from(inner))
        if isinstance(target, dict) and target:
            key = draw(st.sampled_from(sorted(target)))
            if draw(st.booleans()):
                del target[key]
            else:
                target[key] = draw(JSON_VALUES)
        elif isinstance(target, list) and target:
            target[draw(st.integers(0, len(target) - 1))] = draw(JSON_VALUES)
    text = json.dumps(data)
    if draw(st.integers(0, 4)) == 0:
        text = text[: draw(st.integers(0, len(text)))]
    return text


@settings(max_examples=400)
@given(damaged())
def test_damaged_snapshots_are_a_job_error(text: str) -> None:
    error: JobError | None = None
    try:
        job = serde.loads(text)
    except JobError as exc:
        error = exc
    if error is not None:
        _check_error(error)
        assert "\n" not in str(error)
        return
    job.to_json()
    str(job.status)


# ---------------------------------------------------------------------------------------
# Through the command line


def _ablauf() -> list[str]:
    exe = shutil.which("ablauf")
    return [exe] if exe else [sys.executable, "-m", "ablauf_lang"]


CLI_CASES = [
    "(log!! " + "1" * 5000 + ")",
    "(log!! " + "[" * 500 + "]" * 500 + ")",
    "(log!! (ctx " + "[" * 500 + "]" * 500 + "))",
    "(with-augment [identity :x] (log!! {[1 2] 3}))",
    '(import "/etc/passwd") (log!! 1)',
    '(import "/proc/self/environ") (log!! 1)',
    '(def s "ab") ' + " ".join("(def s (str s s))" for _ in range(30)) + " (log!! (count s))",
    "(action!! :action/sleep 1e999)",
    "(action!! :action/sleep 1e300)",
    "\ufeff(log!! 1)",
    '(log!! "a\u2028b")\n(log!! x)',
    '(log!! "\x00")',
    '(log!! "\ud800")',
    "(defn f [] (lgo!! 1)) (f)",
    "(try!! " * 300 + "(fail!! 1)" + ")" * 300,
    "(log!! (* 1e308 10))",
]


@pytest.fixture(scope="module")
def cli_programs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("cli")
    paths = []
    for i, source in enumerate(CLI_CASES):
        path = folder / f"case{i}.abl"
        # A lone surrogate cannot be UTF-8: the file gets the bytes Python would write
        # with surrogatepass, which is invalid UTF-8 for the reader of the file.
        path.write_bytes(source.encode("utf-8", "surrogatepass"))
        paths.append(path)
    # and a few mutated examples, chosen the same way on every run
    for i, (_, text) in enumerate(SEEDS[:3]):
        path = folder / f"mutated{i}.abl"
        cut = len(text) * (i + 1) // 5
        path.write_bytes(
            (text[:cut] + TOKENS[(7 * i) % len(TOKENS)] + text[cut:]).encode(
                "utf-8", "surrogatepass"
            )
        )
        paths.append(path)
    return paths


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ABLAUF_STORE": "memory:",
        "XDG_DATA_HOME": str(cwd / "data"),
        "XDG_STATE_HOME": str(cwd / "state"),
    }
    done = subprocess.run(
        [*_ablauf(), *args],
        capture_output=True,
        text=True,
        errors="replace",
        env=env,
        cwd=cwd,
        timeout=120,
    )
    assert done.returncode in (0, 1, 2), (args, done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, (args, done.stderr[-2000:])
    assert "Traceback" not in done.stdout, (args, done.stdout[-2000:])
    return done


def test_the_command_line_answers_every_sample(cli_programs: list[Path]) -> None:
    cwd = cli_programs[0].parent
    # One `check` of them all: every bad file is reported on its own line, exit 2.
    checked = _cli(["check", *map(str, cli_programs)], cwd)
    assert checked.returncode == 2
    assert "root:x:0" not in checked.stdout + checked.stderr  # /etc/passwd never shown
    assert "PATH=" not in checked.stdout + checked.stderr  # nor the environment
    # Runs, three at a time (each call is mostly the interpreter starting).
    with ThreadPoolExecutor(3) as pool:
        runs = list(
            pool.map(
                lambda p: _cli(["run", str(p), "--store", "memory:", "--json"], cwd), cli_programs
            )
        )
    for path, done in zip(cli_programs, runs, strict=True):
        if done.returncode in (0, 1):
            json.loads(done.stdout)  # one JSON document, whatever the values
        else:
            assert done.stderr.strip(), path
