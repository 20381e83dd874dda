"""Compiler: forms -> lowered nodes, pre-order ids, and compile errors at the right spot."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from pyrsistent import pvector

from ablauf_lang.engine.kinds import Augment, Leaf, Node, Par, Seq, Try
from ablauf_lang.errors import AblaufCompileError, AblaufSyntaxError
from ablauf_lang.lang.compiler import (
    RULES,
    TOP_LEVEL_RULES,
    Compiler,
    Env,
    Plan,
    compile_forms,
    compile_source,
    rule,
)
from ablauf_lang.lang.forms import List
from ablauf_lang.lang.reader import read
from ablauf_lang.values import Keyword
from tests.strategies import workflow_sources


def walk(node: Node) -> Iterator[Node]:
    """Yield the nodes of a tree in pre-order, without recursion."""
    todo = [node]
    while todo:
        n = todo.pop()
        yield n
        todo.extend(reversed(n.children))


def leaf(node_id: int, action: str, payload: Any = None, **kw: Any) -> Leaf:
    return Leaf(node_id, action, payload, **kw)


def seq(node_id: int, *children: Node) -> Seq:
    return Seq(node_id, pvector(children))


def par(node_id: int, *children: Node) -> Par:
    return Par(node_id, pvector(children))


def try_(node_id: int, body: Seq, rescue: Seq, final: Seq) -> Try:
    return Try(node_id, pvector([body, rescue, final]))


# ---------------------------------------------------------------------------------------
# The SPEC example

SPEC_EXAMPLE = (
    "(try!! (dopar!! (action!! :record :a1) (log!! :a2)) (action!! :record :b1)"
    " (rescue!! (action!! :record :r1)) (finally!! (action!! :record :f1)))"
)


def test_spec_example_ids() -> None:
    root = compile_source(SPEC_EXAMPLE)
    named = {n.id: (n.kind, n.payload if isinstance(n, Leaf) else None) for n in walk(root)}
    assert named == {
        0: ("try", None),
        1: ("seq", None),
        2: ("par", None),
        3: ("leaf", "a1"),
        4: ("leaf", "a2"),
        5: ("leaf", "b1"),
        6: ("seq", None),
        7: ("leaf", "r1"),
        8: ("seq", None),
        9: ("leaf", "f1"),
    }
    assert root == try_(
        0,
        seq(
            1, par(2, leaf(3, "record", "a1"), leaf(4, "action/log", "a2")), leaf(5, "record", "b1")
        ),
        seq(6, leaf(7, "record", "r1")),
        seq(8, leaf(9, "record", "f1")),
    )


# ---------------------------------------------------------------------------------------
# Core forms

COMPILES = [
    ("(log!! :a)", leaf(0, "action/log", "a")),
    ('(log!! "hello")', leaf(0, "action/log", "hello")),
    ("(log!! {:a [1 nil]})", leaf(0, "action/log", {"a": [1, None]})),
    ("(fail!!)", leaf(0, "action/fail", None)),
    ('(fail!! "boom")', leaf(0, "action/fail", "boom")),
    ("(action!! :ns/name 1)", leaf(0, "ns/name", 1)),
    ("(action!! :record [1 (list 2 3)])", leaf(0, "record", [1, [2, 3]])),
    ("(action!! :ns/name nil {:idempotent? true})", leaf(0, "ns/name", None, idempotent=True)),
    ("(action!! :ns/name nil {:idempotent? false})", leaf(0, "ns/name", None)),
    ("(action!! :ns/name nil {:idempotent? nil})", leaf(0, "ns/name", None)),
    ("(action!! :ns/name nil {})", leaf(0, "ns/name", None)),
    ("(idempotent-action!! :ns/name {:x 1})", leaf(0, "ns/name", {"x": 1}, idempotent=True)),
    ("(do!!)", seq(0)),
    ("(do!! (log!! 1) (log!! 2))", seq(0, leaf(1, "action/log", 1), leaf(2, "action/log", 2))),
    ("(do!! nil (log!! 1) nil)", seq(0, leaf(1, "action/log", 1))),
    ("(dopar!!)", par(0)),
    ("(dopar!! (log!! 1) nil (fail!!))", par(0, leaf(1, "action/log", 1), leaf(2, "action/fail"))),
    (
        "(do!! (dopar!! (log!! 1)) (log!! 2))",
        seq(0, par(1, leaf(2, "action/log", 1)), leaf(3, "action/log", 2)),
    ),
    ("(try!!)", try_(0, seq(1), seq(2), seq(3))),
    ("(try!! (log!! 1))", try_(0, seq(1, leaf(2, "action/log", 1)), seq(3), seq(4))),
    ("(try!! (rescue!! (log!! 1)))", try_(0, seq(1), seq(2, leaf(3, "action/log", 1)), seq(4))),
    ("(try!! (finally!! (log!! 1)))", try_(0, seq(1), seq(2), seq(3, leaf(4, "action/log", 1)))),
    (
        "(try!! nil (log!! 1) (rescue!! nil) (finally!!))",
        try_(0, seq(1, leaf(2, "action/log", 1)), seq(3), seq(4)),
    ),
    (
        "(try!! (log!! 1) (log!! 2) (rescue!! (log!! 3) (log!! 4)) (finally!! (log!! 5)))",
        try_(
            0,
            seq(1, leaf(2, "action/log", 1), leaf(3, "action/log", 2)),
            seq(4, leaf(5, "action/log", 3), leaf(6, "action/log", 4)),
            seq(7, leaf(8, "action/log", 5)),
        ),
    ),
    ("(try!! (try!!))", try_(0, seq(1, try_(2, seq(3), seq(4), seq(5))), seq(6), seq(7))),
    # with-augment
    (
        "(with-augment [:a :b] (log!! {:a 1}))",
        leaf(0, "action/log", {"a": 1}, augment=Augment(("a",), ("b",))),
    ),
    (
        "(with-augment [identity :sentry/dsn] (action!! :x/y 1))",
        leaf(0, "x/y", 1, augment=Augment((), ("sentry/dsn",))),
    ),
    (
        '(with-augment [[:a 0 "b"] [:x :y]] (fail!!))',
        leaf(0, "action/fail", augment=Augment(("a", 0, "b"), ("x", "y"))),
    ),
    ("(with-augment [[] :all] (log!! 1))", leaf(0, "action/log", 1, augment=Augment((), ("all",)))),
    (
        "(with-augment [:out :saved] (idempotent-action!! :a/b nil))",
        leaf(0, "a/b", None, idempotent=True, augment=Augment(("out",), ("saved",))),
    ),
    (
        "(do!! (with-augment [:a :b] (log!! 1)) (log!! 2))",
        seq(0, leaf(1, "action/log", 1, augment=Augment(("a",), ("b",))), leaf(2, "action/log", 2)),
    ),
    # a program's workflow is its last form; each top-level workflow is numbered from 0
    ("(log!! 1) (do!! (log!! 2))", seq(0, leaf(1, "action/log", 2))),
    ("#_ (bad!!) (log!! 1)", leaf(0, "action/log", 1)),
]


@pytest.mark.parametrize(("source", "expected"), COMPILES)
def test_compile(source: str, expected: Node) -> None:
    assert compile_source(source) == expected


def test_payloads_are_plain_python_data() -> None:
    node = compile_source('(action!! :a/b {:k [1 2.5 "s" nil true] "str-key" {:in :kw}})')
    assert isinstance(node, Leaf)
    assert node.payload == {"k": [1, 2.5, "s", None, True], "str-key": {"in": "kw"}}
    assert type(node.payload) is dict
    assert type(node.payload["k"]) is list
    # Keywords stay Keyword, which is a str.
    inner = node.payload["str-key"]
    assert isinstance(inner["in"], Keyword)
    assert isinstance(inner["in"], str)
    assert type(node.action) is str


def test_every_node_has_a_span() -> None:
    source = "(do!!\n  (try!! (log!! 1)\n    (rescue!! (fail!!)))\n  (dopar!!))"
    root = compile_source(source, "w.abl")
    spans = {n.id: n.span for n in walk(root)}
    assert all(span is not None for span in spans.values())
    assert (spans[0].line, spans[0].column) == (1, 1)
    assert (spans[1].line, spans[1].column) == (2, 3)  # try!!
    assert (spans[2].line, spans[2].column) == (2, 3)  # its body
    assert (spans[3].line, spans[3].column) == (2, 10)  # (log!! 1)
    assert (spans[4].line, spans[4].column) == (3, 5)  # rescue!!
    assert (spans[5].line, spans[5].column) == (3, 15)  # (fail!!)
    assert (spans[6].line, spans[6].column) == (2, 3)  # the missing finally: the try!!
    assert (spans[7].line, spans[7].column) == (4, 3)
    assert spans[7].filename == "w.abl"


def test_compile_forms_takes_reader_output() -> None:
    source = "(do!! (log!! 1))"
    assert compile_forms(read(source), source=source) == compile_source(source)


@given(workflow_sources)
def test_ids_are_the_pre_order_index(source: str) -> None:
    root = compile_source(source)
    nodes = list(walk(root))
    assert [n.id for n in nodes] == list(range(len(nodes)))
    assert all(n.span is not None for n in nodes)
    for n in nodes:
        if isinstance(n, Try):
            assert len(n.children) == 3
            assert all(isinstance(c, Seq) for c in n.children)


# ---------------------------------------------------------------------------------------
# Errors

ERRORS = [
    # source, message fragment, line, column
    ("", "the program is empty", 1, 1),
    (" ; nothing here\n", "the program is empty", 1, 1),
    ("42", "the program's last form must be a workflow (do!!, dopar!!, try!!, an action...)", 1, 1),
    ("[1 2]", "the program's last form must be a workflow", 1, 1),
    ("(log!! 1)\n  :k", "must be a workflow (do!!, dopar!!, try!!, an action...), got :k", 2, 3),
    ("nil", "must be a workflow (do!!, dopar!!, try!!, an action...), got nil", 1, 1),
    ("()", "got ()", 1, 1),
    ('("log!!" 1)', "must be a workflow", 1, 1),
    ("42 (log!! 1)", "a top-level form must be a workflow", 1, 1),
    ("(lgo!! 1)", "unknown form lgo!!; did you mean log!!", 1, 2),
    ("(do!!\n  (log!! 1)\n  (fial!! 2))", "unknown form fial!!; did you mean fail!!", 3, 4),
    ("(frobnicate 1)", "unknown form frobnicate", 1, 2),
    ("(do!! 42)", "expected a workflow (do!!, dopar!!, try!!, an action...), got 42", 1, 7),
    ("(dopar!! (log!! 1)\n :oops)", "got :oops", 2, 2),
    ('(try!! "x")', 'got "x"', 1, 8),
    ("(log!!)", "log!! takes 1 argument, got 0: usage (log!! x)", 1, 1),
    ("(log!! 1 2)", "log!! takes 1 argument, got 2", 1, 1),
    ("(fail!! 1 2)", "fail!! takes 0 to 1 arguments, got 2", 1, 1),
    ("(action!! :a)", "action!! takes 2 to 3 arguments, got 1", 1, 1),
    ("(action!! :a 1 {} 2)", "action!! takes 2 to 3 arguments, got 4", 1, 1),
    ("(idempotent-action!! :a 1 {} 2)", "idempotent-action!! takes 2 to 3 arguments, got 4", 1, 1),
    (
        "(action!! foo 1)",
        "action!! needs a keyword naming the action, like :ns/name, got foo",
        1,
        11,
    ),
    (
        '(idempotent-action!! "a/b" 1)',
        'needs a keyword naming the action, like :ns/name, got "a/b"',
        1,
        22,
    ),
    ("(action!! :a 1 [:idempotent? true])", "action!! options must be a map", 1, 16),
    (
        "(action!! :a 1 {:idempotent true})",
        "unknown option :idempotent (known: :idempotent?, :retry, :timeout, :heartbeat); "
        "did you mean :idempotent?",
        1,
        17,
    ),
    ("(action!! :a 1 {:idempotent? 1})", ":idempotent? must be true or false, got 1", 1, 30),
    ("(rescue!! (log!! 1))", "rescue!! is only allowed at the end of a try!!", 1, 1),
    ("(do!! (finally!! (log!! 1)))", "finally!! is only allowed at the end of a try!!", 1, 7),
    (
        "(try!! (rescue!! (log!! 1)) (log!! 2))",
        "rescue!! must be at the end of try!!, but (log!! 2) follows it",
        1,
        8,
    ),
    ("(try!! (finally!!) (log!! 2))", "finally!! must be at the end of try!!", 1, 8),
    ("(try!! (rescue!!) (finally!!) (log!! 2))", "rescue!! must be at the end of try!!", 1, 8),
    ("(try!! (finally!!)\n (rescue!!))", "rescue!! must come before finally!!", 2, 2),
    ("(try!! (rescue!!) (rescue!!))", "try!! has more than one rescue!!", 1, 19),
    ("(try!! (finally!!) (finally!!))", "try!! has more than one finally!!", 1, 20),
    ("(try!! (do!! (rescue!! 1)))", "rescue!! is only allowed at the end of a try!!", 1, 14),
    ("(with-augment [:a :b])", "with-augment takes 2 arguments, got 1", 1, 1),
    ("(with-augment [:a] (log!! 1))", "with-augment needs a vector [source dest]", 1, 15),
    ("(with-augment {:a :b} (log!! 1))", "with-augment needs a vector [source dest]", 1, 15),
    (
        "(with-augment [foo :a] (log!! 1))",
        "with-augment source must be a keyword, a vector of keys or identity, got foo",
        1,
        16,
    ),
    ('(with-augment ["a" :b] (log!! 1))', "with-augment source must be", 1, 16),
    (
        "(with-augment [[:a {}] :b] (log!! 1))",
        "with-augment source path keys must be keywords, strings or integers, got {}",
        1,
        20,
    ),
    (
        "(with-augment [:a []] (log!! 1))",
        "with-augment dest must be a keyword or a non-empty vector of keys, got []",
        1,
        19,
    ),
    ("(with-augment [:a identity] (log!! 1))", "with-augment dest must be", 1, 19),
    (
        "(with-augment [:a [:b 1]] (log!! 1))",
        "with-augment dest path keys must be keywords or strings, got 1",
        1,
        23,
    ),
    ("(with-augment [:a :b] (do!! (log!! 1)))", "with-augment wraps an action leaf", 1, 23),
    (
        "(with-augment [:a :b] nil)",
        "with-augment wraps an action leaf (action!!, log!!, fail!!...), got nil",
        1,
        23,
    ),
    (
        "(with-augment [:a :b] (with-augment [:c :d] (log!! 1)))",
        "with-augment cannot wrap another with-augment",
        1,
        23,
    ),
]


@pytest.mark.parametrize(("source", "fragment", "line", "column"), ERRORS)
def test_compile_errors(source: str, fragment: str, line: int, column: int) -> None:
    with pytest.raises(AblaufCompileError) as info:
        compile_source(source, "bad.abl")
    err = info.value
    assert fragment in err.message
    assert (err.line, err.column) == (line, column)
    assert err.filename == "bad.abl"
    assert err.source == source


def test_compile_error_renders_location_line_and_caret() -> None:
    with pytest.raises(AblaufCompileError) as info:
        compile_source("(do!!\n  (lgo!! 1))", "flow.abl")
    assert str(info.value) == (
        "flow.abl:2:4: error: unknown form lgo!!; did you mean log!! or do!!?\n  (lgo!! 1))\n   ^"
    )


def test_syntax_errors_come_from_the_reader() -> None:
    with pytest.raises(AblaufSyntaxError, match="unclosed list"):
        compile_source("(do!! (log!! 1)")


def test_earlier_top_level_workflows_are_checked() -> None:
    with pytest.raises(AblaufCompileError, match="unknown form nope!!"):
        compile_source("(nope!!) (log!! 1)")


# ---------------------------------------------------------------------------------------
# Size


def test_deep_nesting_compiles_without_recursion() -> None:
    depth = 2000
    root = compile_source("(do!! " * depth + "(log!! 1)" + ")" * depth)
    nodes = list(walk(root))
    assert len(nodes) == depth + 1
    assert [n.id for n in nodes] == list(range(depth + 1))
    assert isinstance(nodes[-1], Leaf)


def test_deep_try_nesting_compiles() -> None:
    depth = 1000
    root = compile_source("(try!! " * depth + "(log!! 1)" + " (finally!! (log!! 2)))" * depth)
    # Per level: the try, its three sequences and the finally's leaf; then the body's leaf.
    assert len(list(walk(root))) == 5 * depth + 1


def test_wide_workflow() -> None:
    width = 5000
    root = compile_source("(dopar!! " + " ".join(f"(log!! {i})" for i in range(width)) + ")")
    assert len(root.children) == width
    assert root.children[-1] == leaf(width, "action/log", width - 1)


# ---------------------------------------------------------------------------------------
# Extension points


def test_core_rules_are_registered() -> None:
    core = {
        "log!!",
        "fail!!",
        "action!!",
        "idempotent-action!!",
        "do!!",
        "dopar!!",
        "try!!",
        "rescue!!",
        "finally!!",
        "with-augment",
    }
    assert core <= set(RULES)


def test_other_modules_can_register_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ablauf_lang.lang.compiler.RULES", dict(RULES))

    # (twice!! node): a sequence running node's form two times.
    @rule("twice!!")
    def _twice(c: Compiler, form: List, env: Env) -> Plan:
        c.arity(form, 1, 1, "(twice!! node)")
        child = c.children(form, 1, env)
        return Plan(
            "seq", lambda i, kids: Seq(i, pvector(kids), span=form.span), form.span, child * 2
        )

    root = compile_source("(do!! (twice!! (log!! :x)))")
    assert root == seq(0, seq(1, leaf(2, "action/log", "x"), leaf(3, "action/log", "x")))


def test_top_level_declarations_can_be_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ablauf_lang.lang.compiler.TOP_LEVEL_RULES", dict(TOP_LEVEL_RULES))
    from ablauf_lang.lang import compiler

    seen: list[str] = []

    @compiler.top_level_rule("note")
    def _note(c: Compiler, form: List, env: Env) -> None:
        env[str(form.items[1])] = form.items[2]
        seen.append(str(form.items[1]))

    compiled = Compiler()
    root = compiled.program(read("(note :a 1) (log!! 2)"))
    assert root == leaf(0, "action/log", 2)
    assert seen == ["a"]
    assert compiled.env["a"] == 1
    with pytest.raises(AblaufCompileError, match="last form must be a workflow"):
        compile_source("(log!! 2) (note :a 1)")
    with pytest.raises(AblaufCompileError, match="note is only allowed at the top level"):
        compile_source("(do!! (note :a 1))")


def test_env_chains_scopes() -> None:
    outer = Env({"a": 1})
    inner = Env({"b": 2}, outer)
    assert inner.find("a") is outer
    assert inner.find("b") is inner
    assert inner.find("c") is None


def test_a_byte_order_mark_is_skipped_and_carets_stay_in_place() -> None:
    assert compile_source("\ufeff(log!! 1)") == Leaf(0, "action/log", 1)
    with pytest.raises(AblaufCompileError) as info:
        compile_source("\ufeff(log!! x)", "bom.abl")
    assert (info.value.line, info.value.column) == (1, 8)
    assert str(info.value).splitlines()[1:] == ["(log!! x)", "       ^"]
