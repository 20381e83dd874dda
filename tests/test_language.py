"""The language: definitions, functions, splicing, run-time choices and expansions.

Compile-time tables give source -> lowered tree (ids in pre-order) or error; run-time
tables drive compiled jobs with a deterministic driver and check what was dispatched.
The two language examples run through `ablauf_lang.eval` with their demo actions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyrsistent import pvector

import ablauf_lang
from ablauf_lang.code import Call, Expr, MapCode, Var, Vec
from ablauf_lang.engine.job import Job, make_job, restart_job
from ablauf_lang.engine.kinds import Augment, Doseq, If, Leaf, Node, Par, Pmap, Seq
from ablauf_lang.engine.nodes import Dispatch, LeafState, Result, Status, failure, success
from ablauf_lang.errors import AblaufCompileError
from ablauf_lang.lang.compiler import TOP_LEVEL_RULES, Compiler, compile_source, head_name
from ablauf_lang.lang.evaluator import Env
from ablauf_lang.lang.reader import read
from ablauf_lang.lang.session import Evaluated, Session
from ablauf_lang.stdlib.registry import load_actions
from ablauf_lang.values import Keyword

EXAMPLES = Path(__file__).parent.parent / "examples"


def log(node_id: int, payload: Any, **kw: Any) -> Leaf:
    return Leaf(node_id, "action/log", payload, **kw)


def seq(node_id: int, *children: Node) -> Seq:
    return Seq(node_id, pvector(children))


def par(node_id: int, *children: Node) -> Par:
    return Par(node_id, pvector(children))


def if_(node_id: int, test: Any, then: Seq, other: Seq) -> If:
    return If(node_id, test, pvector([then, other]))


def ctx(*args: Any) -> Call:
    return Call("ctx", tuple(Keyword(a) if isinstance(a, str) else a for a in args))


def walk(node: Node) -> Iterator[Node]:
    todo = [node]
    while todo:
        n = todo.pop()
        yield n
        todo.extend(reversed(n.children))


# ---------------------------------------------------------------------------------------
# Compile time: source -> lowered tree

COMPILES = [
    # def binds any value; a workflow value used twice becomes two sets of nodes
    ("(def x 2) (log!! x)", log(0, 2)),
    ("(def step (log!! 1)) (do!! step step)", seq(0, log(1, 1), log(2, 1))),
    (
        "(def pair (do!! (log!! 1) (log!! 2))) (dopar!! pair pair)",
        par(0, seq(1, log(2, 1), log(3, 2)), seq(4, log(5, 1), log(6, 2))),
    ),
    # defn: fixed arguments, a docstring, rest arguments, recursion on known values
    (
        '(defn hi [n] (log!! (str "hi " n))) (do!! (hi 1) (hi "b"))',
        seq(0, log(1, "hi 1"), log(2, "hi b")),
    ),
    ('(defn one "Log one." [] (log!! 1)) (one)', log(0, 1)),
    (
        "(defn all [& steps] (dopar!! steps)) (all (log!! 1) nil (log!! 2))",
        par(0, log(1, 1), log(2, 2)),
    ),
    ("(defn f [a & more] (log!! [a more])) (f 1)", log(0, [1, []])),
    (
        "(defn twice [n s] (if (= n 0) [] (concat [s] (twice (dec n) s))))"
        " (do!! (twice 3 (log!! 0)))",
        seq(0, log(1, 0), log(2, 0), log(3, 0)),
    ),
    # let, if, when, do, and, or, fn pick workflows at compile time
    ("(let [a 1 b [a a]] (log!! b))", log(0, [1, 1])),
    ("(if (> 2 1) (log!! :yes) (log!! :no))", log(0, "yes")),
    ("(do!! (when false (log!! 1)) (log!! 2))", seq(0, log(1, 2))),
    ("(do!! (if nil (log!! 1)))", seq(0)),
    ("(do (log!! 1) (log!! 2))", log(0, 2)),
    ("(or nil (log!! 1))", log(0, 1)),
    ("((fn [s] (do!! s s)) (log!! 1))", seq(0, log(1, 1), log(2, 1))),
    # for splices its nodes into do!!, dopar!!, try!! sections; nested lists flatten
    (
        "(do!! (for [h [:a :b]] (log!! h)) (log!! :c))",
        seq(0, log(1, "a"), log(2, "b"), log(3, "c")),
    ),
    (
        "(dopar!! (for [i [1 2] j [:x]] (log!! [i j])))",
        par(0, log(1, [1, "x"]), log(2, [2, "x"])),
    ),
    ("(do!! [(log!! 1) [(log!! 2) nil]])", seq(0, log(1, 1), log(2, 2))),
    ("(do!! (for [x []] (log!! x)))", seq(0)),
    # keywords are data; quote turns forms into data
    ("(log!! (quote (a :b)))", log(0, ["a", "b"])),
    # if!! / when!!: a test kept for run time, two sequences, pre-order ids
    (
        "(if!! (ctx :ok) (log!! 1) (log!! 2))",
        if_(0, Expr(ctx("ok")), seq(1, log(2, 1)), seq(3, log(4, 2))),
    ),
    ("(if!! true (log!! 1))", if_(0, True, seq(1, log(2, 1)), seq(3))),
    (
        "(when!! (= (ctx :n) 1) (log!! 1) (log!! 2))",
        if_(0, Expr(Call("=", (ctx("n"), 1))), seq(1, log(2, 1), log(3, 2)), seq(4)),
    ),
    (
        "(if!! (ctx :a) (for [i [1 2]] (log!! i)) nil)",
        if_(0, Expr(ctx("a")), seq(1, log(2, 1), log(3, 2)), seq(4)),
    ),
    # doseq!! / pmap!!: a template numbered from 0, the variable kept for run time
    (
        "(doseq!! [x (ctx :xs)] (log!! x))",
        Doseq(0, "x", Expr(ctx("xs")), log(0, Expr(Var("x")))),
    ),
    (
        "(pmap!! [x [1 2]] (log!! x) (log!! 2))",
        Pmap(0, "x", [1, 2], seq(0, log(1, Expr(Var("x"))), log(2, 2))),
    ),
    (
        "(do!! (log!! 0) (doseq!! [x [1]] (with-augment [:a :b] (log!! x))))",
        seq(
            0,
            log(1, 0),
            Doseq(2, "x", [1], log(0, Expr(Var("x")), augment=Augment(("a",), ("b",)))),
        ),
    ),
    (
        "(doseq!! [x (ctx :xs)] (pmap!! [y x] (log!! [x y (ctx :z)])))",
        Doseq(
            0,
            "x",
            Expr(ctx("xs")),
            Pmap(0, "y", Expr(Var("x")), log(0, Expr(Vec((Var("x"), Var("y"), ctx("z")))))),
        ),
    ),
    # user functions take run-time values: their bodies are inlined
    (
        "(defn d [h] (log!! {:host h :v (ctx :v)})) (pmap!! [h (ctx :hs)] (d h))",
        Pmap(
            0,
            "h",
            Expr(ctx("hs")),
            log(0, Expr(MapCode(((Keyword("host"), Var("h")), (Keyword("v"), ctx("v")))))),
        ),
    ),
]


@pytest.mark.parametrize(("source", "expected"), COMPILES)
def test_compile(source: str, expected: Node) -> None:
    root = compile_source(source, "lang.abl")
    assert root == expected
    ids = [n.id for n in walk(root)]
    assert ids == list(range(len(ids)))


ERRORS = [
    # source, message fragment, line, column
    ("(do!! (log!! x))", "unbound symbol x", 1, 14),
    ("(def hosts [1]) (log!! host)", "unbound symbol host; did you mean hosts?", 1, 24),
    ("(defn f [a] (log!! a))\n(f 1 2)", "f takes 1 argument, got 2", 2, 1),
    ("(defn f [a & b] (log!! a))\n(f)", "f takes at least 1 argument, got 0", 2, 1),
    (
        "(def s (log!! 1)) (do!! (s))",
        "cannot call s: it is a workflow (the action action/log)",
        1,
        25,
    ),
    ("(do!! (1 2))", "expected a workflow (do!!, dopar!!, try!!, an action...), got (1 2)", 1, 7),
    ("(do!! (str :a))", 'got (str :a), which is string "a"', 1, 7),
    ("(do!! [1 (log!! 1)])", "got integer 1 in the list [1 (log!! 1)]", 1, 7),
    ("(do!! (ctx :a))", "which is only known at run time", 1, 7),
    ("(do!! (if (ctx :a) (log!! 1) (log!! 2)))", "use if!! to choose at run time", 1, 7),
    ("(log!! 1) (def x 1)", "the program's last form must be a workflow", 1, 11),
    ('(str "x") (log!! 1)', "a top-level form must be a workflow", 1, 1),
    ("(for [i [1 2]] (log!! i))", "got a list of 2 workflows: wrap them in (do!! ...)", 1, 1),
    ("(defn f [] (def y 1)) (log!! (f))", "def is only allowed at the top level", 1, 12),
    ("(def log!! 1) (log!! 1)", "cannot bind log!!: it names a built-in form", 1, 6),
    ("(def 1 2) (log!! 1)", "the name in def must be a symbol, got 1", 1, 6),
    ("(def x) (log!! 1)", "def takes 2 arguments, got 1: usage (def name value)", 1, 1),
    ("(defn f) (log!! 1)", "defn takes at least 2 arguments, got 1", 1, 1),
    ('(defn f "doc") (log!! 1)', "defn f needs a parameter vector after its docstring", 1, 1),
    ("(defn f x 1) (log!! 1)", "expected a parameter vector like [a b & more], got x", 1, 9),
    (
        "(defn deploy [h] (log!! h)) (do!! (deplyo 1))",
        "unknown form deplyo; did you mean deploy?",
        1,
        36,
    ),
    ("(if!! (ctx :a))", "if!! takes 2 to 3 arguments, got 1: usage (if!! test then else?)", 1, 1),
    ("(when!!)", "when!! takes at least 1 argument, got 0", 1, 1),
    ("(when!! (fn [] 1) (log!! 1))", "the test of when!! must be data, got a function", 1, 9),
    ("(doseq!! [x (ctx :xs)])", "doseq!! takes at least 2 arguments, got 1", 1, 1),
    ("(doseq!! x (log!! x))", "doseq!! needs a binding vector [x coll], got x", 1, 10),
    ("(pmap!! [x] (log!! x))", "pmap!! needs a binding vector [x coll], got [x]", 1, 9),
    ("(pmap!! [1 [2]] (log!! 1))", "the pmap!! variable must be a symbol, got 1", 1, 10),
    (
        "(doseq!! [x {:a 1}] (log!! x))",
        "doseq!! needs a sequence (a vector) to go over, got map",
        1,
        13,
    ),
    (
        "(doseq!! [x nil] (log!! x))",
        "doseq!! needs a sequence (a vector) to go over, got nil",
        1,
        13,
    ),
    (
        "(doseq!! [x (ctx :xs)] (if x (log!! 1) (log!! 2)))",
        "use if!! to choose at run time",
        1,
        24,
    ),
    (
        "(doseq!! [x (ctx :xs)]\n  (for [i (range x)] (log!! i)))",
        "for needs a collection known at compile time",
        2,
        11,
    ),
    ("(with-augment [:a :b] (ctx :x))", "which is only known at run time", 1, 23),
    ("(log!! (fn [] 1))", "a payload must be data, got a function", 1, 8),
    ("(fail!! (fn [] 1))", "a fail!! reason must be data", 1, 9),
]


@pytest.mark.parametrize(("source", "fragment", "line", "column"), ERRORS)
def test_compile_errors(source: str, fragment: str, line: int, column: int) -> None:
    with pytest.raises(AblaufCompileError) as info:
        compile_source(source, "lang.abl")
    err = info.value
    assert fragment in err.message
    assert (err.filename, err.line, err.column) == ("lang.abl", line, column)
    assert err.source == source


def test_workflow_forms_nest_deeply_inside_a_function() -> None:
    depth = 1500
    source = "(defn deep [] " + "(do!! " * depth + "(log!! 1)" + ")" * depth + ") (deep)"
    nodes = list(walk(compile_source(source)))
    assert [n.id for n in nodes] == list(range(depth + 1))


# ---------------------------------------------------------------------------------------
# Run time: a deterministic driver


def drive(
    job: Job, act: Callable[[Dispatch], Any] | None = None
) -> tuple[Job, list[list[Dispatch]]]:
    """Restart until done; every dispatch's outcome is `act(dispatch)` (an exception fails it)."""
    batches: list[list[Dispatch]] = []
    results: list[Result] = []
    for _ in range(1000):
        job, dispatches = restart_job(job, results)
        if not dispatches:
            break
        batches.append(dispatches)
        results = []
        for d in dispatches:
            if d.action == "action/fail":
                results.append(failure(d, d.payload))
                continue
            try:
                results.append(success(d, d.payload if act is None else act(d)))
            except Exception as exc:  # the action's failure
                results.append(failure(d, f"{type(exc).__name__}: {exc}"))
    assert job.done
    return job, batches


def run_source(
    source: str, context: dict[str, Any] | None = None, act: Callable[[Dispatch], Any] | None = None
) -> tuple[Job, list[list[Dispatch]]]:
    return drive(make_job(compile_source(source, "run.abl"), context), act)


def payloads(batches: list[list[Dispatch]]) -> list[Any]:
    return [d.payload for batch in batches for d in batch]


def check_ids(job: Job) -> None:
    ids = [n.id for n in job.nodes()]
    assert sorted(ids) == list(range(len(ids)))
    for n in job.nodes():
        assert job.node(n.id) is n
    assert Job.from_json(job.to_json()) == job


RUNS = [
    # source, context, dispatched payloads (in order), status
    ('(log!! (str "v" (ctx :version)))', {"version": 2}, ["v2"], "success"),
    ("(log!! (ctx :region :eu))", {}, ["eu"], "success"),
    (
        "(log!! {:a (ctx [:m :a]) :b [1 (ctx [:m :b])]})",
        {"m": {"a": 1, "b": 2}},
        [{"a": 1, "b": [1, 2]}],
        "success",
    ),
    ("(if!! (ctx :ok) (log!! :yes) (log!! :no))", {"ok": True}, ["yes"], "success"),
    ("(if!! (ctx :ok) (log!! :yes) (log!! :no))", {"ok": 0}, ["yes"], "success"),
    ("(if!! (ctx :ok) (log!! :yes) (log!! :no))", {"ok": None}, ["no"], "success"),
    ("(do!! (when!! (ctx :go) (log!! 1)) (log!! 2))", {"go": False}, [2], "success"),
    # branch on an earlier step's output
    (
        "(do!! (with-augment [:ok :ok] (log!! {:ok false}))"
        " (if!! (ctx :ok) (log!! :yes) (log!! :no)))",
        {},
        [{"ok": False}, "no"],
        "success",
    ),
    # fan out over the context or over an earlier step's output
    ("(doseq!! [h (ctx :hosts)] (log!! h))", {"hosts": ["a", "b"]}, ["a", "b"], "success"),
    (
        "(do!! (with-augment [identity :hs] (log!! [1 2]))"
        " (doseq!! [h (ctx :hs)] (log!! (* h (ctx :k)))))",
        {"k": 10},
        [[1, 2], 10, 20],
        "success",
    ),
    ("(doseq!! [h (ctx :hosts)] (log!! h))", {"hosts": []}, [], "success"),
    ("(pmap!! [h (range 3)] (log!! h))", {}, [0, 1, 2], "success"),
    # shadowing: the inner x wins inside the inner body
    (
        "(doseq!! [x [1 2]] (log!! x) (doseq!! [x [(* x 10)]] (log!! x)))",
        {},
        [1, 10, 2, 20],
        "success",
    ),
    (
        "(doseq!! [x [1 2 3]] (if!! (> x 1) (log!! x) (log!! :small)))",
        {},
        ["small", 2, 3],
        "success",
    ),
    # user functions with run-time arguments, and the standard library
    (
        "(defn d [h] (log!! {:host h :v (ctx :v)})) (doseq!! [h (ctx :hs)] (d h))",
        {"hs": ["a"], "v": 3},
        [{"host": "a", "v": 3}],
        "success",
    ),
    (
        '(import "std/deploy") (canary (ctx :hs) (fn [h] (log!! h)))',
        {"hs": ["a", "b", "c"]},
        ["a", "b", "c"],
        "success",
    ),
    ('(import "std/deploy") (canary (ctx :hs) (fn [h] (log!! h)))', {"hs": []}, [], "success"),
    (
        '(import "std/deploy") (in-batches 2 [1 2 3] (fn [h] (log!! h)))',
        {},
        [1, 2, 3],
        "success",
    ),
    # errors at run time fail the node; a rescue sees why
    ("(log!! (ctx :gone))", {}, [], "failure"),
    ("(doseq!! [x (ctx :m)] (log!! x))", {"m": {"a": 1}}, [], "failure"),
]


@pytest.mark.parametrize(("source", "context", "expected", "status"), RUNS)
def test_runs(source: str, context: dict[str, Any], expected: list[Any], status: str) -> None:
    job, batches = run_source(source, context)
    assert payloads(batches) == expected
    assert job.status == status
    check_ids(job)
    for payload in payloads(batches):
        json.dumps(payload)  # dispatched payloads are plain data


def test_branch_not_taken_is_skipped() -> None:
    job, _ = run_source(
        "(if!! (ctx :ok) (log!! :yes) (do!! (log!! :no) (log!! :never)))", {"ok": 1}
    )
    assert {leaf.payload: leaf.result for leaf in job.leaves()} == {
        "yes": LeafState.SUCCESS,
        "no": LeafState.SKIPPED,
        "never": LeafState.SKIPPED,
    }


def test_pmap_dispatches_every_copy_at_once_and_doseq_one_by_one() -> None:
    _, batches = run_source("(pmap!! [h (ctx :hs)] (log!! h))", {"hs": ["a", "b", "c"]})
    assert [[d.payload for d in b] for b in batches] == [["a", "b", "c"]]
    _, batches = run_source("(doseq!! [h (ctx :hs)] (log!! h))", {"hs": ["a", "b", "c"]})
    assert [[d.payload for d in b] for b in batches] == [["a"], ["b"], ["c"]]


def test_with_augment_inside_a_template_writes_each_copy_s_output() -> None:
    job, _ = run_source(
        "(doseq!! [x [1 2 3]] (with-augment [identity [:seen :last]] (log!! (* x x))))"
    )
    assert job.context["seen"] == {"last": 9}


def test_payload_is_evaluated_against_the_context_when_dispatched() -> None:
    source = (
        "(do!! (with-augment [identity :n] (log!! 1)) (log!! (ctx :n))"
        " (with-augment [identity :n] (log!! 2)) (log!! (ctx :n)))"
    )
    _, batches = run_source(source, {"n": 0})
    assert payloads(batches) == [1, 1, 2, 2]


def test_missing_context_key_fails_the_leaf_and_a_rescue_handles_it() -> None:
    source = "(try!!\n  (log!! (ctx :missing))\n  (rescue!! (log!! (ctx :exec/last-error))))"
    job, batches = run_source(source)
    error = "run.abl:2:10: the context has no :missing (and no default was given)"
    assert payloads(batches) == [error]
    failed = [leaf for leaf in job.leaves() if leaf.result is LeafState.FAILURE]
    assert [leaf.error for leaf in failed] == [error]
    assert job.status is Status.SUCCESS
    assert job.context["exec/last-error"] == error


def test_failing_test_and_collection_are_rescued_too() -> None:
    source = (
        "(do!! (try!! (if!! (+ 1 (ctx :s)) (log!! 1)) (rescue!! (log!! :r1)))"
        " (try!! (pmap!! [x (ctx :s)] (log!! x)) (rescue!! (log!! :r2))))"
    )
    job, batches = run_source(source, {"s": "text"})
    assert payloads(batches) == ["r1", "r2"]
    assert job.status is Status.SUCCESS
    errors = [str(n.error) for n in job.nodes() if n.kind in ("if", "pmap")]
    assert errors[0] == 'run.abl:1:20: + expects numbers, got string "text"'
    assert "needs a sequence" in errors[1]


def test_std_retry_runs_a_failing_step_again() -> None:
    attempts: list[Any] = []

    def act(d: Dispatch) -> Any:
        attempts.append(d.payload)
        if len(attempts) < 3:
            raise RuntimeError("flaky")
        return "ok"

    source = '(import "std/retry") (with-retries 4 (action!! :x/y (ctx :n)))'
    job, _ = run_source(source, {"n": 7}, act)
    assert attempts == [7, 7, 7]
    assert job.status is Status.SUCCESS
    job, _ = run_source(source, {"n": 7}, lambda d: 1 / 0)
    assert job.status is Status.FAILURE
    assert len([leaf for leaf in job.leaves() if leaf.result is LeafState.FAILURE]) == 4


def test_std_retry_on_failure_fails_after_its_handler() -> None:
    source = '(import "std/retry") (on-failure (fail!! "boom") (log!! (ctx :exec/last-error)))'
    job, batches = run_source(source)
    assert payloads(batches) == ["boom", "boom", "boom"]  # fail!!, the handler, fail!! again
    assert job.status is Status.FAILURE


# ---------------------------------------------------------------------------------------
# Property: expansion keeps ids unique and dense, and the job round-trips through JSON


def _total(*counts: int) -> int:
    return -1 if -1 in counts else sum(counts)


@st.composite
def programs(
    draw: st.DrawFn, context: dict[str, Any], depth: int = 0, scope: tuple[str, ...] = ()
) -> tuple[str, int]:
    """A workflow source and how many leaves it runs (-1: depends on run-time values).

    `context` collects the lists that `(ctx :cN)` collections read.
    """
    kinds = ["log", "log", "do", "par", "for", "doseq", "pmap", "if"] if depth < 3 else ["log"]
    kind = draw(st.sampled_from(kinds))
    if kind == "log":
        return f"(log!! [{' '.join(scope)} (ctx :tag)])", 1
    if kind in ("do", "par"):
        kids = draw(st.lists(programs(context, depth + 1, scope), max_size=3))
        head = "do!!" if kind == "do" else "dopar!!"
        return f"({head} {' '.join(k for k, _ in kids)})", _total(*(n for _, n in kids))
    if kind == "if":
        then, n_then = draw(programs(context, depth + 1, scope))
        other, n_other = draw(programs(context, depth + 1, scope))
        flag = draw(st.booleans())
        test = "(ctx :tag)" if flag else "(nil? (ctx :tag))"
        return f"(if!! {test} {then} {other})", n_then if flag else n_other
    var = f"v{depth}"
    items = draw(st.lists(st.integers(0, 3), max_size=3))
    literal = "[" + " ".join(map(str, items)) + "]"
    body, n = draw(programs(context, depth + 1, (*scope, var)))
    if kind == "for":
        return f"(do!! (for [{var} {literal}] {body}))", _total(n) * len(items) if n >= 0 else -1
    head = "doseq!!" if kind == "doseq" else "pmap!!"
    source = draw(
        st.sampled_from(["literal", "context", "outer"] if scope else ["literal", "context"])
    )
    if source == "outer":
        # A collection computed from an outer variable, known only once that one is bound.
        return f"({head} [{var} (range {scope[-1]})] {body})", -1
    if source == "context":
        key = f"c{len(context)}"
        context[key] = items
        literal = f"(ctx :{key})"
    return f"({head} [{var} {literal}] {body})", n * len(items) if n >= 0 else -1


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_expansion_keeps_ids_unique_and_dense(data: st.DataObject) -> None:
    context: dict[str, Any] = {"tag": "t"}
    source, expected = data.draw(programs(context))
    run = ablauf_lang.eval(source, context=context, filename="prop.abl")
    assert run.status is Status.SUCCESS
    job = run.job
    ids = [n.id for n in job.nodes()]
    assert len(ids) == len(set(ids))
    assert sorted(ids) == list(range(len(ids)))
    for node in job.nodes():
        assert job.node(node.id) is node
    assert Job.from_json(job.to_json()) == job
    ran = [leaf for leaf in job.leaves() if leaf.result is LeafState.SUCCESS]
    if expected >= 0:
        assert len(ran) == expected
    for leaf in ran:
        assert leaf.output[-1] == "t"
        assert all(isinstance(x, int) for x in leaf.output[:-1])


# ---------------------------------------------------------------------------------------
# The examples, with their demo actions


@pytest.fixture
def demo_actions(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("ABLAUF_DEMO_DELAY", "0")
    return load_actions(str(EXAMPLES / "language_actions.py"))


def example(name: str) -> tuple[str, str]:
    path = EXAMPLES / name
    return path.read_text(), str(path)


HOSTS = {"service": "billing", "version": "1.4.2", "hosts": ["web-1", "web-2", "web-3"]}


def test_fanout_example_deploys_a_canary_then_the_rest(demo_actions: dict[str, Any]) -> None:
    source, filename = example("fanout.abl")
    run = ablauf_lang.eval(source, actions=demo_actions, context=HOSTS, filename=filename)
    assert run.status is Status.SUCCESS
    assert run.context["artifact"] == "registry.example.com/billing:1.4.2"
    deploys = [leaf for leaf in run.job.leaves() if leaf.action == "deploy/host"]
    done = [leaf.output["host"] for leaf in deploys if leaf.result is LeafState.SUCCESS]
    assert sorted(done) == ["web-1", "web-2", "web-3"]
    (chat,) = [leaf for leaf in run.job.leaves() if leaf.action == "chat/post"]
    assert chat.output["text"] == "billing 1.4.2 is live on 3 hosts"
    check_ids(run.job)

    # The order, driven restart by restart: the canary alone, then the others together.
    job = make_job(compile_source(source, filename), HOSTS)
    job, batches = drive(job, lambda d: demo_actions[d.action](d.payload, d.context))
    hosts = [[d.payload["host"] for d in b if d.action == "deploy/host"] for b in batches]
    assert [h for h in hosts if h] == [["web-1"], ["web-2", "web-3"]]


def test_fanout_example_fails_when_a_host_stays_down(demo_actions: dict[str, Any]) -> None:
    source, filename = example("fanout.abl")
    context = {**HOSTS, "hosts": ["web-1", "down-2"]}
    run = ablauf_lang.eval(source, actions=demo_actions, context=context, filename=filename)
    assert run.status is Status.FAILURE
    attempts = [leaf for leaf in run.job.leaves() if leaf.action == "deploy/host"]
    down = [leaf for leaf in attempts if leaf.result is LeafState.FAILURE]
    assert len(down) == 2  # tried twice (with-retries 2)
    assert all("down-2 does not answer" in leaf.error for leaf in down)
    assert not any(leaf.action == "chat/post" and leaf.result for leaf in run.job.leaves())


@pytest.mark.parametrize(
    ("repo", "taken", "skipped"),
    [("acme/billing", "release/tag", "issues/open"), ("acme/broken", "issues/open", "release/tag")],
)
def test_branch_example_branches_on_the_test_report(
    demo_actions: dict[str, Any], repo: str, taken: str, skipped: str
) -> None:
    source, filename = example("branch.abl")
    context = {"repo": repo, "version": "2.0.0"}
    run = ablauf_lang.eval(source, actions=demo_actions, context=context, filename=filename)
    assert run.status is Status.SUCCESS
    states = {leaf.action: leaf.result for leaf in run.job.leaves() if leaf.action != "chat/post"}
    assert states[taken] is LeafState.SUCCESS
    assert states[skipped] is LeafState.SKIPPED
    chats = [
        leaf.output["text"]
        for leaf in run.job.leaves()
        if leaf.output and leaf.action == "chat/post"
    ]
    if taken == "release/tag":
        assert chats == ["acme/billing v2.0.0 is out: 412 tests passed"]
    else:
        assert chats == [
            "release of acme/broken held back: test_refund_rounding, test_invoice_totals"
        ]
    assert states["action/log"] is LeafState.SUCCESS  # 3 tests were skipped


def test_run_with_deferred_payloads_in_the_sqlite_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    source = "(do!! (pmap!! [x (ctx :xs)] (log!! (str x (ctx :s)))) (if!! (ctx :s) (log!! 1)))"
    run = ablauf_lang.eval(source, context={"xs": [1, 2], "s": "!"}, store=url)
    assert run.status is Status.SUCCESS
    store = ablauf_lang.open_store(url)
    try:
        stored = store.load(run.run_id).job
    finally:
        store.close()
    assert stored == run.job
    outputs = sorted(leaf.output for leaf in stored.leaves() if isinstance(leaf.output, str))
    assert outputs == ["1!", "2!"]
    assert any(isinstance(leaf.payload, Expr) for leaf in stored.leaves())


# ---------------------------------------------------------------------------------------
# The REPL's way in: one env for many inputs, and the names it defines


def test_definitions_persist_in_an_env_and_names_lists_them() -> None:
    env = Env()
    for text in [
        '(def greeting "hi") (defn greet [n] (log!! (str greeting " " n)))',
        '(import "std/retry" :as r)',
    ]:
        forms = read(text, "<repl>")
        compiler = Compiler(text, "<repl>", env=env)
        for form in forms:
            TOP_LEVEL_RULES[str(head_name(form))](compiler, form, env)
    assert {"greeting", "greet", "r/with-retries", "r/ensure"} <= set(env.names())
    text = '(greet "you")'
    root = Compiler(text, "<repl>", env=env).program(read(text, "<repl>"))
    assert root == log(0, "hi you")


def test_a_session_keeps_definitions_and_says_what_each_input_was() -> None:
    session = Session()
    assert session.feed('(def who "you") (defn greet [x] (str "hi " x))', "<repl>").kind == (
        "defined"
    )
    assert session.names() == ["greet", "who"]
    done = session.feed("(log!! (greet who))", "<repl>")
    assert (done.kind, done.root) == ("workflow", log(0, "hi you"))
    # a value, a value read from the context at once, and something that is not data
    assert session.feed("(greet 1)", "<repl>") == Evaluated("value", value="hi 1")
    assert session.feed("(ctx :k)", "<repl>", {"k": [1]}) == Evaluated("value", value=[1])
    assert session.feed("greet", "<repl>") == Evaluated("other", text="the function greet")
    # a list of workflows is one workflow input (the program's last form)
    assert session.feed("(for [i [1]] (log!! i))", "<repl>").kind == "workflow"
    with pytest.raises(AblaufCompileError, match="unbound symbol nope"):
        session.feed("(log!! nope)", "<repl>")


# ---------------------------------------------------------------------------------------
# action/sleep: durations are numbers from 0 to a day


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ("1e300", "must be from 0 to 86400 seconds (24 hours), got 1e+300"),
        ("-1", "must be from 0 to 86400 seconds (24 hours), got -1"),
        ("86401", "got 86401"),
        ("{:seconds 1e200}", "got 1e+200"),
        ('"5"', "must be a number of seconds, got '5'"),
        ("true", "must be a number of seconds, got True"),
        ("[1]", "must be a number of seconds, got [1]"),
    ],
)
def test_sleep_refuses_a_bad_duration_at_once(payload: str, error: str) -> None:
    run = ablauf_lang.eval(f"(action!! :action/sleep {payload})")
    assert run.status is Status.FAILURE
    leaf = run.job.node(0)
    assert leaf.error.startswith("action/sleep: the duration ")
    assert leaf.error.endswith(error)


@pytest.mark.parametrize("payload", ["0", "0.01", "nil", "{:seconds 0.01}", "{}"])
def test_sleep_waits_for_a_good_duration(payload: str) -> None:
    run = ablauf_lang.eval(f"(action!! :action/sleep {payload})")
    assert run.status is Status.SUCCESS
