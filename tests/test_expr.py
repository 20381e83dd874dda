"""The expression evaluator: builtins, folding, run-time expressions and their JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ablauf_lang
from ablauf_lang import code, values
from ablauf_lang.code import AndCode, Call, Expr, IfCode, MapCode, OrCode, Var, Vec
from ablauf_lang.engine.kinds import Leaf
from ablauf_lang.engine.nodes import Status
from ablauf_lang.errors import AblaufCompileError, AblaufError, JobError
from ablauf_lang.lang import evaluator
from ablauf_lang.lang.compiler import compile_source
from ablauf_lang.lang.evaluator import Env
from ablauf_lang.lang.forms import to_data
from ablauf_lang.lang.reader import read_one
from ablauf_lang.names import BUILTINS as BUILTIN_NAMES
from ablauf_lang.names import SPECIAL_FORMS
from ablauf_lang.stdlib.builtins import BUILTINS, equal, show_value
from ablauf_lang.values import Keyword, Meter, TooLarge


def value(source: str) -> Any:
    """The payload `(log!! source)` compiles to: a folded value or an Expr."""
    node = compile_source(f"(log!! {source})", "e.abl")
    assert isinstance(node, Leaf)
    return node.payload


def value_of(source: str, filename: str) -> Expr:
    """The run-time expression the leaf `source` keeps as its payload."""
    node = compile_source(source, filename)
    assert isinstance(node, Leaf)
    assert isinstance(node.payload, Expr)
    return node.payload


def at_run_time(source: str, context: dict[str, Any] | None = None, **bound: Any) -> Any:
    """Compile an expression that depends on the run, then evaluate it."""
    found = value(source)
    assert isinstance(found, Expr), f"{source} was folded to {found!r}"
    return found.bind(bound).evaluate(context or {})


def test_every_builtin_name_is_implemented() -> None:
    assert set(BUILTIN_NAMES) == set(BUILTINS)
    assert set(SPECIAL_FORMS) | {"let"} == set(evaluator.SPECIAL_FORMS)


# ---------------------------------------------------------------------------------------
# Builtins and special forms, folded at compile time

FOLDS = [
    # strings and keywords
    ('(str "a" 1 nil :k 1.5 true [1 "x"] {:a nil})', 'a1k1.5true[1 "x"]{:a nil}'),
    ("(str)", ""),
    ('(keyword "a")', "a"),
    ('(keyword "ns" "a")', "ns/a"),
    ("(name :ns/a)", "a"),
    ('(name "x/y")', "x/y"),
    ('(upper-case "ab")', "AB"),
    ('(lower-case "AB")', "ab"),
    ('(join ", " ["a" 1 nil])', "a, 1, "),
    ('(join ["a" "b"])', "ab"),
    # arithmetic
    ("(+)", 0),
    ("(+ 1 2 3.5)", 6.5),
    ("(- 5)", -5),
    ("(- 10 1 2)", 7),
    ("(* 2 3 4)", 24),
    ("(/ 6 3)", 2),
    ("(/ 7 2)", 3.5),
    ("(/ 4)", 0.25),
    ("(mod -7 3)", 2),
    ("(inc 1)", 2),
    ("(dec 1)", 0),
    ("(max 1 5 2)", 5),
    ("(min 1 5 2)", 1),
    # comparisons and logic
    ("(= 1 1 1.0)", True),
    ("(= 1 true)", False),
    ("(= [1 {:a [2]}] [1 {:a [2]}])", True),
    ("(= [1 2] [1 3])", False),
    ("(not= 1 2)", True),
    ("(< 1 2 3)", True),
    ("(< 1 3 2)", False),
    ("(>= 3 3 1)", True),
    ("(> 2 1)", True),
    ("(<= 1 1)", True),
    ("(not nil)", True),
    ("(not 0)", False),
    ("(and)", True),
    ("(and 1 2)", 2),
    ("(and 1 nil 2)", None),
    ("(or)", None),
    ("(or nil false 3)", 3),
    ("(or false)", False),
    ("(nil? nil)", True),
    ("(empty? [])", True),
    ("(empty? nil)", True),
    ('(empty? "a")', False),
    # maps and vectors
    ("(get {:a 1} :a)", 1),
    ("(get {:a 1} :b 2)", 2),
    ("(get [10 20] 1)", 20),
    ("(get nil :a)", None),
    ("(get-in {:a {:b [1 2]}} [:a :b 1])", 2),
    ("(get-in {:a 1} [:x :y] :none)", "none"),
    ("(assoc {:a 1} :b 2 :c 3)", {"a": 1, "b": 2, "c": 3}),
    ("(assoc nil :a 1)", {"a": 1}),
    ("(assoc [1 2] 2 3)", [1, 2, 3]),
    ("(assoc-in {:a {:b 1}} [:a :c] 2)", {"a": {"b": 1, "c": 2}}),
    ("(assoc-in nil [:a :b] 1)", {"a": {"b": 1}}),
    ("(dissoc {:a 1 :b 2} :a)", {"b": 2}),
    ("(merge {:a 1} nil {:a 2 :b 3})", {"a": 2, "b": 3}),
    ("(merge)", None),
    ("(count [1 2])", 2),
    ("(count {:a 1})", 1),
    ('(count "abc")', 3),
    ("(count nil)", 0),
    ("(range 3)", [0, 1, 2]),
    ("(range 1 7 2)", [1, 3, 5]),
    ("(range 3 0 -1)", [3, 2, 1]),
    ("(concat [1] nil [2 3])", [1, 2, 3]),
    ("(list 1 2)", [1, 2]),
    ("(vector)", []),
    ("(hash-map :a 1)", {"a": 1}),
    ("(first [1 2])", 1),
    ("(first [])", None),
    ("(rest [1 2 3])", [2, 3]),
    ("(last [1 2 3])", 3),
    ("(nth [1 2] 1)", 2),
    ("(nth [1 2] 5 :no)", "no"),
    ("(conj [1] 2 3)", [1, 2, 3]),
    ("(conj {:a 1} [:b 2])", {"a": 1, "b": 2}),
    ("(contains? {:a nil} :a)", True),
    ("(contains? [1] 3)", False),
    ("(keys {:a 1 :b 2})", ["a", "b"]),
    ("(vals {:a 1 :b 2})", [1, 2]),
    ("(identity [1])", [1]),
    # keywords look themselves up
    ("(:a {:a 1})", 1),
    ("(:b {:a 1} 0)", 0),
    # special forms
    ("(quote (a [b] {:c d}))", ["a", ["b"], {"c": "d"}]),
    ("(if true 1 2)", 1),
    ("(if 0 1 2)", 1),  # only nil and false are false
    ('(if "" 1 2)', 1),
    ("(if nil 1 2)", 2),
    ("(if false 1)", None),
    ("(when true 1 2)", 2),
    ("(when nil 1)", None),
    ("(do 1 2 3)", 3),
    ("(do)", None),
    ("(let [a 1 b (+ a 1)] (* a b))", 2),
    ("(let [a 1] (let [a 2] a))", 2),
    ("((fn [a b] (+ a b)) 1 2)", 3),
    ("((fn [& xs] xs) 1 2)", [1, 2]),
    ("(let [f (fn [x] (fn [y] (+ x y)))] ((f 1) 2))", 3),  # closures capture their scope
    ("(for [x [1 2 3]] (* x x))", [1, 4, 9]),
    ("(for [x [1 2] y [:a :b]] [x y])", [[1, "a"], [1, "b"], [2, "a"], [2, "b"]]),
    ("(for [x (range 6) :when (= 0 (mod x 2)) :let [y (* x 10)]] y)", [0, 20, 40]),
    ("(for [e {:a 1}] e)", [["a", 1]]),
    ("(for [x nil] x)", []),
    ("[1 (+ 1 1) {:k (str :v)}]", [1, 2, {"k": "v"}]),
    ("{(str :a) 1}", {"a": 1}),
    ('"plain"', "plain"),
    (":kw", "kw"),
]


@pytest.mark.parametrize(("source", "expected"), FOLDS)
def test_folds_at_compile_time(source: str, expected: Any) -> None:
    got = value(source)
    assert not isinstance(got, Expr)
    assert equal(got, expected), got


def test_keywords_stay_keywords_and_strings_stay_strings() -> None:
    assert isinstance(value("(keyword :a)"), Keyword)
    assert not isinstance(value("(str :a)"), Keyword)
    assert isinstance(value("[:a]")[0], Keyword)


FOLD_ERRORS = [
    # source, message fragment, column
    ('(+ 1 "a")', '+ expects numbers, got string "a"', 8),
    ("(< 1 nil)", "< expects numbers, got nil", 8),
    ("(/ 1 0)", "division by zero", 8),
    ("(mod 1 0)", "mod by zero", 8),
    ("(range 1 2 0)", "range step cannot be 0", 8),
    ("(range 200000)", "range of 200000 numbers is too large", 8),
    ("(count 1)", "count expects a vector, map or string, got integer 1", 8),
    ("(nth [1] 3)", "nth: index 3 is out of range for 1 items", 8),
    ("(assoc [1] 5 1)", "assoc: index 5 is out of range for a vector of 1", 8),
    ("(assoc {} :a)", "assoc takes at least 3 arguments, got 2", 8),
    ("(hash-map :a)", "hash-map expects keys and values in pairs", 8),
    ("(keyword 1)", "keyword expects strings, got integer 1", 8),
    ("(merge {} 1)", "merge expects maps, got integer 1", 8),
    ("(get-in {} :a)", "get-in expects a vector of keys as the path", 8),
    ("(not)", "not takes 1 argument, got 0", 8),
    ("(:a)", "a keyword called as a function takes 1 to 2 arguments, got 0", 8),
    ("(1 2)", "cannot call 1: it is integer 1, not a function", 8),
    ('("f" 2)', 'cannot call "f": it is string "f", not a function', 8),
    ("(nil)", "cannot call nil: it is nil, not a function", 8),
    ("((ctx :f) 1)", "cannot call (ctx :f): it is only known at run time", 9),
    ("(nope 1)", "unknown function nope", 9),
    ("(cout [1])", "unknown function cout; did you mean count", 9),
    ("undefined-name", "unbound symbol undefined-name", 8),
    ("do!!", "do!! is a form, not a value: use it as (do!! ...)", 8),
    ("(let [a] a)", "let bindings come in pairs", 14),
    ("(let a 1)", "let needs a binding vector like [name value ...], got a", 13),
    ("(let [1 2] 1)", "a let name must be a symbol, got 1", 14),
    ("(let [if 2] 1)", "cannot bind if: it names a built-in form", 14),
    ("(fn x 1)", "expected a parameter vector like [a b & more], got x", 12),
    ("(fn [a a] 1)", "parameter a appears twice", 15),
    ("(fn [a &] 1)", "& must be followed by exactly one parameter name", 15),
    ("((fn [a] a))", "this function takes 1 argument, got 0", 8),
    ("((fn [a & b] a))", "this function takes at least 1 argument, got 0", 8),
    ("(for [x 1] x)", "for needs a vector or a map to go over, got integer 1", 16),
    ("(for [] 1)", "for needs at least one binding", 13),
    ("(for [:when true] 1)", "for must start with a binding like [x coll]", 14),
    ("(for [x [1] :while true] 1)", "unknown for option :while", 20),
    ("(for [x (ctx :xs)] x)", "for needs a collection known at compile time", 16),
    ("(for [x [1] :when (ctx :a)] x)", "for :when must be known at compile time", 26),
    ("(if)", "if takes 2 to 3 arguments, got 0", 8),
    ("(quote)", "quote takes 1 argument, got 0", 8),
    ("{{:a 1} 2}", "a map cannot be a map key", 8),
    ("(def x 1)", "def is only allowed at the top level of a program", 8),
    ("(if (ctx :a) (log!! 1) 2)", "use if!! to choose at run time", 8),
    ("(when (ctx :a) (log!! 1))", "use when!! to choose at run time", 8),
    ("(str (ctx :a) (fn [] 1))", "a function cannot be part of a run-time expression", 8),
    ("(fn [] 1)", "a payload must be data, got a function", 8),
    ("count", "a payload must be data, got the builtin function count", 8),
    ("(do!! (log!! 1))", "a payload must be data, got a workflow (do!!)", 8),
]


@pytest.mark.parametrize(("source", "fragment", "column"), FOLD_ERRORS)
def test_compile_time_errors(source: str, fragment: str, column: int) -> None:
    with pytest.raises(AblaufCompileError) as info:
        value(source)
    assert fragment in info.value.message
    assert (info.value.filename, info.value.line, info.value.column) == ("e.abl", 1, column)
    assert "^" in str(info.value)  # the caret under the position


# ---------------------------------------------------------------------------------------
# Run-time expressions: what depends on the context is kept, the rest folded


def test_known_parts_are_folded_into_the_kept_expression() -> None:
    got = value('(let [n 2] (str "x" (+ n 1) (ctx :k)))')
    assert got == Expr(Call("str", ("x3", Call("ctx", ("k",))))) or got == Expr(
        Call("str", ("x", 3, Call("ctx", ("k",))))
    )
    assert got.evaluate({"k": "!"}) == "x3!"


RUNS: list[tuple[str, dict[str, Any], dict[str, Any], Any]] = [
    # source, context, bindings, expected
    ("(ctx :k)", {"k": [1]}, {}, [1]),
    ("(ctx [:a :b])", {"a": {"b": 2}}, {}, 2),
    ("(ctx [:a 1])", {"a": [5, 6]}, {}, 6),
    ("(ctx :k 7)", {}, {}, 7),
    ("(ctx :k 7)", {"k": None}, {}, None),  # a default is for a missing key only
    ("(ctx [:a :b] :no)", {"a": {}}, {}, "no"),
    ("(ctx)", {"a": 1}, {}, {"a": 1}),
    ("(ctx :exec/last-error)", {"exec/last-error": "boom"}, {}, "boom"),
    ('(str (ctx :a) "-" (ctx :b))', {"a": 1, "b": "x"}, {}, "1-x"),
    ("{:host (ctx :h) :tags [(ctx :t) 2]}", {"h": "a", "t": 1}, {}, {"host": "a", "tags": [1, 2]}),
    ("{(ctx :k) 1}", {"k": "dyn"}, {}, {"dyn": 1}),
    ("(if (ctx :a) :yes :no)", {"a": 0}, {}, "yes"),
    ("(if (ctx :a) :yes :no)", {"a": False}, {}, "no"),
    ("(when (ctx :a) 1 2)", {"a": True}, {}, 2),
    ("(and (ctx :a) (ctx :b))", {"a": 1, "b": 2}, {}, 2),
    ("(and (ctx :a) (ctx :b))", {"a": None, "b": 2}, {}, None),
    ("(and 1 (ctx :a) false (ctx :never))", {"a": 1}, {}, False),
    ("(or (ctx :a) (ctx :b))", {"a": None, "b": 2}, {}, 2),
    ("(or nil (ctx :a))", {"a": False}, {}, False),
    ("(not (ctx :a))", {"a": None}, {}, True),
    ("(count (ctx :xs))", {"xs": [1, 2, 3]}, {}, 3),
    ("(for [i [1 2]] (+ i (ctx :n)))", {"n": 10}, {}, [11, 12]),
    ("((fn [x] [x x]) (ctx :a))", {"a": 1}, {}, [1, 1]),  # functions inline run-time values
    ("((fn [& xs] (count xs)) 1 (ctx :a))", {"a": 1}, {}, 2),
    ("(:k (ctx :m))", {"m": {"k": 4}}, {}, 4),
]


@pytest.mark.parametrize(("source", "context", "bound", "expected"), RUNS)
def test_evaluated_at_run_time(
    source: str, context: dict[str, Any], bound: dict[str, Any], expected: Any
) -> None:
    assert equal(at_run_time(source, context, **bound), expected)


def test_ctx_returns_a_copy_so_actions_cannot_change_the_context() -> None:
    context = {"m": {"list": [1]}}
    got = at_run_time("(ctx :m)", context)
    got["list"].append(2)
    assert context == {"m": {"list": [1]}}


RUN_ERRORS = [
    # source, context, message
    ("(ctx :region)", {}, "the context has no :region (and no default was given)"),
    (
        "(ctx [:deploy :region])",
        {"deploy": {}},
        "the context has no :region under [:deploy] (and no default was given)",
    ),
    ('(ctx "a b")', {}, 'the context has no "a b" (and no default was given)'),
    ("(+ 1 (ctx :s))", {"s": "x"}, '+ expects numbers, got string "x"'),
    ("(/ 1 (ctx :z))", {"z": 0}, "division by zero"),
]


@pytest.mark.parametrize(("source", "context", "message"), RUN_ERRORS)
def test_run_time_errors_name_the_position(
    source: str, context: dict[str, Any], message: str
) -> None:
    with pytest.raises(AblaufError) as info:
        at_run_time(source, context)
    err = info.value
    assert err.message == message
    assert (err.filename, err.line) == ("e.abl", 1)
    assert err.column is not None
    assert err.column >= 8


def test_error_names_the_expression_s_own_position() -> None:
    found = value_of("(log!!\n  {:a 1\n   :b (ctx :b)})", "p.abl")
    with pytest.raises(AblaufError) as info:
        found.evaluate({})
    assert (info.value.filename, info.value.line, info.value.column) == ("p.abl", 3, 7)


# ---------------------------------------------------------------------------------------
# Expr: bind, JSON, equality


def test_bind_keeps_only_the_variables_read_and_inner_bindings_win() -> None:
    e = Expr(Call("str", (Var("x"), Call("ctx", ("k",)))))
    assert e.bind({"y": 1}) is e  # nothing it reads: no copy, nothing stored
    bound = e.bind({"x": "a", "y": 1})
    assert bound.bindings == {"x": "a"}
    assert bound.bind({"x": "b"}).evaluate({"k": "!"}) == "b!"
    assert e.free == {"x"}


def test_unbound_variable_is_an_error_not_a_crash() -> None:
    with pytest.raises(AblaufError, match="x is not bound here"):
        Expr(Var("x")).evaluate({})


CODES = [
    Call("ctx", (Keyword("k"),)),
    Call("str", ("a", 1, 2.5, None, True, Var("x"))),
    Vec((1, [1, {"a": (1, 2)}], Call("ctx", ()))),
    MapCode(((Keyword("a"), Var("x")), ({"$odd": 1}, {(1, 2): "t"}))),
    IfCode(Call("ctx", ("t",)), AndCode((Var("x"), 1)), OrCode((None, Var("x")))),
]


@pytest.mark.parametrize("code", CODES)
def test_to_data_is_json_and_round_trips(code: Any) -> None:
    e = Expr(code, "f.abl").bind({"x": {"deep": [1, (2,)], 3: "int key"}})
    text = json.dumps(e.to_data())
    again = Expr.from_data(json.loads(text))
    assert again == e
    assert again.filename == "f.abl"
    assert again.bindings == e.bindings
    assert repr(again) == repr(e)


def test_spans_survive_json_so_errors_keep_their_position() -> None:
    found = value_of("(log!! (ctx :gone))", "s.abl")
    again = Expr.from_data(json.loads(json.dumps(found.to_data())))
    with pytest.raises(AblaufError) as info:
        again.evaluate({})
    assert (info.value.filename, info.value.line, info.value.column) == ("s.abl", 1, 8)


def test_damaged_data_is_a_job_error() -> None:
    from ablauf_lang.errors import JobError

    with pytest.raises(JobError):
        Expr.from_data({"code": ["nonsense", 1]})
    with pytest.raises(JobError):
        Expr.from_data([1])


def test_show_prints_the_expression_as_source() -> None:
    e = value('(str "v" (ctx :version) (if (ctx :a) 1 2))')
    assert repr(e) == '(str "v" (ctx :version) (if (ctx :a) 1 2))'
    assert repr(Expr(Var("h")).bind({"h": "a"})) == '(let [h "a"] h)'


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=3) | st.integers() | st.just("$map"), inner, max_size=3)
    ),
    max_leaves=12,
)


@given(json_values)
def test_encode_decode_round_trip(data: Any) -> None:
    assert values.decode(json.loads(json.dumps(values.encode(data)))) == data


def test_encode_refuses_deep_data_clearly_and_decode_needs_no_recursion() -> None:
    deep: Any = {"k": 1}
    for _ in range(5000):
        deep = [{3: deep}]
    with pytest.raises(JobError, match="nested too deeply"):
        values.encode(deep)
    # Stored data that is deep anyway (an older job) still decodes, without recursion.
    data: Any = {"k": 1}
    for _ in range(5000):
        data = [{"$map": [[3, data]]}]
    got = values.decode(data)
    for _ in range(5000):
        got = got[0][3]
    assert got == {"k": 1}
    shallow: Any = {"k": 1}
    for _ in range(49):
        shallow = [{3: shallow}]  # 98 levels: stored as it is
    assert values.decode(json.loads(json.dumps(values.encode(shallow)))) == shallow


# ---------------------------------------------------------------------------------------
# Limits: deep nesting and runaway recursion end in a clear error


def test_deeply_nested_expression_is_a_clear_error() -> None:
    n = evaluator.MAX_DEPTH + 5
    with pytest.raises(AblaufCompileError, match="nested too deeply"):
        value("(+ 1 " * n + "1" + ")" * n)


def test_deep_literal_data_is_read_without_recursion_and_refused_clearly() -> None:
    got = value("[" * 99 + "]" * 99)
    depth = 0
    while got:
        got, depth = got[0], depth + 1
    assert depth == 98
    for source in ("[" * 3000 + "]" * 3000, "{:a " * 3000 + "1" + "}" * 3000):
        with pytest.raises(AblaufCompileError, match=r"e.abl:1:8: .*nested too deeply"):
            compile_source(f"(log!! {source})", "e.abl")


def test_runaway_recursion_is_a_clear_error() -> None:
    with pytest.raises(AblaufCompileError, match="a recursive function must stop"):
        compile_source("(defn f [n] (f (inc n))) (log!! (f 0))")


def test_recursion_on_a_run_time_value_is_a_clear_error() -> None:
    with pytest.raises(AblaufCompileError, match="nested too deeply"):
        compile_source("(defn f [n] (if (= n 0) 0 (f (dec n)))) (log!! (f (ctx :n)))")


def test_exponential_recursion_stops_at_the_step_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluator, "MAX_STEPS", 5000)
    source = "(defn fib [n] (if (< n 2) n (+ (fib (- n 1)) (fib (- n 2))))) (log!! (fib 25))"
    with pytest.raises(AblaufCompileError, match="takes too long"):
        compile_source(source)


def test_deep_run_time_expression_is_a_clear_error() -> None:
    n = code.MAX_CODE_DEPTH + 5
    with pytest.raises(AblaufCompileError, match="run-time expression nested too deeply"):
        compile_source(
            "".join(f"(def a{i} [a{i - 1}]) " for i in range(1, n)).replace("[a0]", "[(ctx :x)]")
            + f"(log!! a{n - 1})"
        )


# ---------------------------------------------------------------------------------------
# Env and forms


def test_env_names_lists_definitions_of_every_scope() -> None:
    outer = Env({"a": 1, "b": 2})
    inner = Env({"c": 3, "a": 4}, outer)
    assert inner.names() == ["a", "b", "c"]
    assert inner.find("b") is outer


def test_forms_to_data_is_iterative_and_freezes_vector_keys() -> None:
    form = read_one("{[1 [2]] (a b) :k {:n nil}}")
    assert to_data(form) == {(1, (2,)): ["a", "b"], "k": {"n": None}}
    deep = read_one("{:a " * 2000 + "1" + "}" * 2000)
    got = to_data(deep)
    for _ in range(2000):
        got = got["a"]
    assert got == 1


def test_show_value_prints_language_notation() -> None:
    assert show_value([1, "a", Keyword("k"), None, {"x y": 1.5}]) == '[1 "a" :k nil {"x y" 1.5}]'


# ---------------------------------------------------------------------------------------
# Budgets: what evaluation builds is bounded in memory as it is in steps


def doublings(n: int, start: str, step: str) -> str:
    return f"(def s0 {start}) " + " ".join(
        f"(def s{i + 1} {step.format(f's{i}')})" for i in range(n)
    )


@pytest.mark.parametrize(
    ("start", "step", "fragment"),
    [
        ('"ab"', "(str {0} {0})", "builds a string of 16,777,216 characters"),
        ("[1 2]", "(concat {0} {0})", "builds a value of"),
        ("[1]", "[{0} {0}]", "builds a value of"),
        ("{:a 1}", "{{:l {0} :r {0}}}", "builds a value of"),
        ('"ab"', "(join [{0} {0}])", "builds a value of"),
    ],
)
def test_doubling_at_compile_time_is_a_located_error(start: str, step: str, fragment: str) -> None:
    source = doublings(40, start, step) + " (log!! (count s40))"
    with pytest.raises(AblaufCompileError) as info:
        compile_source(source, "grow.abl")
    err = info.value
    assert fragment in err.message
    assert "the limit is 10,000,000" in err.message
    assert (err.filename, err.line) == ("grow.abl", 1)


def test_many_values_together_are_bounded_too() -> None:
    # Each string is within the limit; building two thousand of them is not.
    source = "(def s (str (range 1000))) (def big (str s s s s s s s s s s)) " + (
        "(log!! (count (for [i (range 2000)] (count (str big i)))))"
    )
    with pytest.raises(AblaufCompileError, match="builds too much"):
        compile_source(source)


def test_a_value_shared_many_times_costs_once() -> None:
    meter = Meter(budget=100_000)
    big = list(range(20_000))
    assert meter.built(big) == 20_000
    for i in range(400):
        assert meter.built([big, i]) == 20_002  # its size counts big, the work does not
    fresh = Meter(budget=100_000)
    copies = [[*big, i] for i in range(400)]
    with pytest.raises(TooLarge, match="builds too much"):
        list(map(fresh.built, copies))
    assert (
        value_of_program("(def big (range 20000)) (log!! (count (for [i (range 400)] [big i])))")
        == 400
    )


def value_of_program(source: str) -> Any:
    node = compile_source(source)
    assert isinstance(node, Leaf)
    return node.payload


def test_a_run_time_expression_that_doubles_is_refused() -> None:
    binds = " ".join(f"a{i + 1} (str a{i} a{i})" for i in range(40))
    with pytest.raises(AblaufCompileError, match="run-time expression too large"):
        compile_source(f"(let [a0 (ctx :s) {binds}] (log!! a40))")
    small = " ".join(f"a{i + 1} (str a{i} a{i})" for i in range(5))
    payload = value_of_program(f"(let [a0 (ctx :s) {small}] (log!! a5))")
    assert isinstance(payload, Expr)
    assert payload.evaluate({"s": "x"}) == "x" * 32


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("(* " + " ".join(["100000000000000000000"] * 300) + ")", "more than 4,300 digits"),
        ("(* 1e308 10)", "too large for a float"),
        ("(+ 1e308 1e308)", "too large for a float"),
        ("(- -1e308 1e308)", "too large for a float"),
        ("(/ 1e308 1e-10)", "too large for a float"),
        ("(/ (* " + " ".join(["10000000000"] * 40) + ") 3)", "too large for a float"),
        ("(inc 1.7976931348623157e308)", None),
    ],
)
def test_arithmetic_overflow_is_an_error(source: str, fragment: str | None) -> None:
    if fragment is None:
        assert value(source) == 1.7976931348623157e308  # inc of the largest float rounds back
        return
    with pytest.raises(AblaufCompileError, match=fragment):
        value(source)


def test_run_time_values_are_measured_too() -> None:
    steps = " ".join(
        "(with-augment [identity :s] (log!! (str (ctx :s) (ctx :s))))" for _ in range(30)
    )
    run = ablauf_lang.eval(f'(do!! (with-augment [identity :s] (log!! "ab")) {steps})')
    assert run.status is Status.FAILURE
    error = run.context["exec/last-error"]
    assert "builds a string of 16,777,216 characters (the limit is 10,000,000)" in error
    assert len(run.context["s"]) == 2**23


def test_deep_keys_for_ctx_are_refused_at_compile_time() -> None:
    deep = "[" * 500 + "]" * 500
    with pytest.raises(AblaufCompileError, match="nested too deeply") as info:
        compile_source(f"(log!! (ctx {deep}))", "ctx.abl")
    assert (info.value.line, info.value.column) == (1, 8)
    assert value(f"(get {{}} {deep})") is None  # a deep key is looked up without recursion


def test_a_misspelled_form_inside_a_function_gets_a_hint() -> None:
    with pytest.raises(AblaufCompileError) as info:
        compile_source("(defn f [] (lgo!! 1))\n(f)", "typo.abl")
    err = info.value
    assert err.message == "unknown form lgo!!; did you mean log!! or do!!?"
    assert (err.line, err.column) == (1, 13)
    with pytest.raises(AblaufCompileError, match="unknown function cout; did you mean count"):
        compile_source("(defn f [] (cout [1])) (log!! (f))")
    with pytest.raises(AblaufCompileError, match="did you mean deploy!"):
        compile_source("(defn deploy! [] (log!! 1)) (defn f [] (deploy!! 1)) (f)")
