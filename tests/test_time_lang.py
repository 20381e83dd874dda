"""The language of time: `sleep!!`, `sleep-until!!`, `await!!`, `timeout!!`, leaf options
(`:retry`, `:timeout`, `:heartbeat`), `with-defaults`, and their compile errors."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from pygments.token import Name, Token

from ablauf_lang.cli import cli
from ablauf_lang.code import Expr
from ablauf_lang.engine.kinds import Deadline, Leaf, Node, Seq
from ablauf_lang.errors import AblaufCompileError, AblaufError
from ablauf_lang.lang.compiler import RETRY_DEFAULTS, RULES, compile_source, with_deadline
from ablauf_lang.names import ALL_FORMS
from ablauf_lang.stdlib.actions import AWAIT, SLEEP
from ablauf_lang.stdlib.durations import parse_duration
from ablauf_lang.ui.highlight import AblaufLexer

DEFAULT_POLICY = dict(RETRY_DEFAULTS)


def leaf(source: str) -> Leaf:
    node = compile_source(source, "t.abl")
    assert isinstance(node, Leaf), node
    return node


def ids(root: Node) -> list[int]:
    """Node ids in pre-order."""
    out: list[int] = []
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        out.append(node.id)
        if not isinstance(node, Leaf):
            stack.extend(reversed(list(node.children)))
    return out


# ---------------------------------------------------------------------------------------
# Names: the compiler, the lexer and the completer know the new forms


@pytest.mark.parametrize(
    ("form", "token"),
    [
        ("sleep!!", Name.Builtin),
        ("sleep-until!!", Name.Builtin),
        ("await!!", Name.Builtin),
        ("timeout!!", Token.Keyword),
        ("with-defaults", Token.Keyword),
    ],
)
def test_time_forms_are_named(form: str, token: Any) -> None:
    assert form in RULES
    assert form in ALL_FORMS
    tokens = list(AblaufLexer().get_tokens(f"({form} 1)"))
    assert (token, form) in tokens


def test_an_unknown_form_suggests_a_time_form() -> None:
    with pytest.raises(AblaufCompileError) as info:
        compile_source("(sleep 10)")
    assert "did you mean sleep!!" in info.value.message


# ---------------------------------------------------------------------------------------
# Waits


@pytest.mark.parametrize(
    ("source", "payload"),
    [
        ("(sleep!! 10)", {"seconds": 10.0}),
        ("(sleep!! 0)", {"seconds": 0.0}),
        ("(sleep!! 2.5)", {"seconds": 2.5}),
        ("(sleep!! {:minutes 10})", {"seconds": 600.0}),
        ("(sleep!! {:hours 1 :minutes 30})", {"seconds": 5400.0}),
        ('(sleep!! "1h30m")', {"seconds": 5400.0}),
        ("(def pause {:days 3}) (sleep!! pause)", {"seconds": 259200.0}),
        ("(sleep!! (* 2 30))", {"seconds": 60.0}),
        ('(sleep-until!! "2026-12-24T09:00:00Z")', {"until": 1798102800.0}),
        ('(sleep-until!! "2026-12-24T10:00:00+01:00")', {"until": 1798102800.0}),
        ("(sleep-until!! 1798102800)", {"until": 1798102800.0}),
        ("(await!! :approval)", {"signal": "approval", "timeout": None}),
        ("(await!! :ops/approval)", {"signal": "ops/approval", "timeout": None}),
        ("(await!! :approval {:timeout {:hours 24}})", {"signal": "approval", "timeout": 86400.0}),
        ("(await!! :approval {:timeout 0})", {"signal": "approval", "timeout": 0.0}),
        ("(await!! :approval {:timeout nil})", {"signal": "approval", "timeout": None}),
    ],
)
def test_waits_are_idempotent_leaves_with_a_checked_payload(source: str, payload: Any) -> None:
    node = leaf(source)
    assert node.action == (AWAIT if "await!!" in source else SLEEP)
    assert node.payload == payload
    assert node.idempotent is True
    assert (node.retry, node.timeout, node.heartbeat) == (None, None, None)


@pytest.mark.parametrize(
    ("source", "context", "sent"),
    [
        ("(sleep!! (ctx :pause))", {"pause": 5}, {"seconds": 5}),
        ("(sleep!! {:minutes (ctx :m)})", {"m": 2}, {"seconds": {"minutes": 2}}),
        (
            "(sleep-until!! (ctx :at))",
            {"at": "2026-12-24T09:00:00Z"},
            {"until": "2026-12-24T09:00:00Z"},
        ),
        (
            "(await!! :go {:timeout (ctx :t)})",
            {"t": 30},
            {"signal": "go", "timeout": 30},
        ),
    ],
)
def test_a_wait_that_uses_ctx_is_evaluated_at_run_time(
    source: str, context: dict[str, Any], sent: Any
) -> None:
    node = leaf(source)
    assert isinstance(node.payload, Expr)
    assert node.payload.evaluate(context) == sent


def test_waits_inside_doseq_use_the_variable() -> None:
    root = compile_source("(doseq!! [s [1 2]] (sleep!! s))")
    template = root.template  # type: ignore[union-attr]
    assert isinstance(template, Leaf)
    assert isinstance(template.payload, Expr)
    assert template.payload.bind({"s": 2}).evaluate({}) == {"seconds": 2}


# ---------------------------------------------------------------------------------------
# timeout!!


def test_timeout_wraps_one_node_with_a_timer_last() -> None:
    root = compile_source("(timeout!! {:minutes 1} (action!! :x/y 1))")
    assert isinstance(root, Deadline)
    body, timer = root.children
    assert isinstance(body, Leaf)
    assert body.action == "x/y"
    assert isinstance(timer, Leaf)
    assert (timer.action, timer.payload, timer.idempotent) == (SLEEP, {"seconds": 60.0}, True)
    assert ids(root) == [0, 1, 2]


def test_timeout_with_several_nodes_is_a_do_body() -> None:
    root = compile_source("(do!! (log!! 0) (timeout!! 30 (log!! 1) (log!! 2)) (log!! 3))")
    assert ids(root) == list(range(8))
    deadline = root.children[1]
    assert isinstance(deadline, Deadline)
    body, timer = deadline.children
    assert isinstance(body, Seq)
    assert [c.payload for c in body.children] == [1, 2]
    assert timer.id == 6
    assert timer.payload == {"seconds": 30.0}


def test_timeout_of_a_run_time_duration() -> None:
    root = compile_source("(timeout!! (ctx :limit) (log!! 1))")
    timer = root.children[1]
    assert isinstance(timer.payload, Expr)
    assert timer.payload.evaluate({"limit": 9}) == {"seconds": 9}


def test_timeout_nested_and_in_try() -> None:
    source = "(try!! (timeout!! 10 (timeout!! 5 (log!! 1))) (rescue!! (log!! :late)))"
    root = compile_source(source)
    assert ids(root) == list(range(len(ids(root))))
    inner = root.children[0].children[0].children[0]
    assert isinstance(inner, Deadline)
    assert inner.children[1].payload == {"seconds": 5.0}


def test_with_deadline_wraps_a_compiled_program() -> None:
    program = compile_source("(do!! (log!! 1) (log!! 2))")
    root = with_deadline(program, 90)
    assert isinstance(root, Deadline)
    assert ids(root) == [0, 1, 2, 3, 4]
    assert root.children[1].payload == {"seconds": 90.0}
    assert root.children[1].action == SLEEP
    assert with_deadline(program, "10m").children[1].payload == {"seconds": 600.0}
    assert ids(program) == [0, 1, 2]  # the program itself is left as it was


@pytest.mark.parametrize("bad", [0, -1, "soon", True, None, {"minuts": 1}])
def test_with_deadline_refuses_a_bad_duration(bad: Any) -> None:
    with pytest.raises(AblaufError) as info:
        with_deadline(compile_source("(log!! 1)"), bad)
    assert "the run's timeout" in info.value.message


# ---------------------------------------------------------------------------------------
# Leaf options


def policy(**changes: Any) -> dict[str, Any]:
    return {**DEFAULT_POLICY, **{k.replace("_", "-"): v for k, v in changes.items()}}


@pytest.mark.parametrize(
    ("options", "retry", "timeout", "heartbeat"),
    [
        (
            '{:retry {:max 5 :delay 1 :backoff 2 :max-delay 60 :jitter true :on ["TimeoutError"]}}',
            policy(max=5, max_delay=60.0, jitter=True, on=["TimeoutError"]),
            None,
            None,
        ),
        ("{:retry true}", policy(), None, None),
        ("{:retry false}", None, None, None),
        ("{:retry nil}", None, None, None),
        ("{:retry {}}", policy(), None, None),
        ("{:retry {:max 1}}", policy(max=1), None, None),
        (
            '{:retry {:delay {:minutes 1} :max-delay "1h"}}',
            policy(delay=60.0, max_delay=3600.0),
            None,
            None,
        ),
        ("{:retry {:backoff 1.5 :max-delay nil}}", policy(backoff=1.5), None, None),
        ('{:retry {:on [:timeout "http/503"]}}', policy(on=["timeout", "http/503"]), None, None),
        ("{:retry {:on nil}}", policy(), None, None),
        ("{:timeout 30}", None, 30.0, None),
        ("{:timeout {:minutes 2} :heartbeat 10}", None, 120.0, 10.0),
        ('{:heartbeat "500ms"}', None, None, 0.5),
        ("{:timeout nil :heartbeat nil}", None, None, None),
        ("{:retry {:max 2} :timeout 30 :heartbeat 5 :idempotent? true}", policy(max=2), 30.0, 5.0),
    ],
)
def test_action_options_go_on_the_leaf(
    options: str, retry: Any, timeout: Any, heartbeat: Any
) -> None:
    for form in ("action!!", "idempotent-action!!"):
        node = leaf(f'({form} :http/get {{:url "x"}} {options})')
        assert node.retry == retry
        assert node.timeout == timeout
        assert node.heartbeat == heartbeat
        assert node.action == "http/get"
        assert node.idempotent is (form == "idempotent-action!!" or ":idempotent? true" in options)


def test_options_may_name_definitions() -> None:
    node = leaf(
        "(def policy {:max 4 :delay {:seconds 2}}) (def limit (* 2 60))"
        " (action!! :a/b 1 {:retry policy :timeout limit})"
    )
    assert node.retry == policy(max=4, delay=2.0)
    assert node.timeout == 120.0


def test_a_workflow_value_used_twice_keeps_its_options() -> None:
    root = compile_source('(def s (action!! :a/b 1 {:retry {:on ["x"]} :timeout 3})) (do!! s s)')
    first, second = root.children
    assert first.retry == second.retry == policy(on=["x"])
    assert first.timeout == second.timeout == 3.0
    assert (first.id, second.id) == (1, 2)


def test_options_survive_with_augment() -> None:
    node = leaf("(with-augment [:body :page] (action!! :http/get 1 {:timeout 5 :retry true}))")
    assert node.augment is not None
    assert (node.timeout, node.retry) == (5.0, policy())


# ---------------------------------------------------------------------------------------
# with-defaults


def leaves(root: Node) -> list[Leaf]:
    out: list[Leaf] = []
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, Leaf):
            out.append(node)
        else:
            stack.extend(reversed(list(node.children)))
    return out


def test_with_defaults_sets_options_the_actions_leave_out() -> None:
    root = compile_source(
        textwrap.dedent(
            """
            (with-defaults {:retry {:max 4} :timeout 30 :heartbeat 5}
              (action!! :a/one 1)
              (action!! :a/two 2 {:timeout 9 :retry false})
              (dopar!! (idempotent-action!! :a/three 3 {:heartbeat nil}))
              (log!! "plain"))
            """
        )
    )
    assert isinstance(root, Seq)  # several nodes: a do!! body
    one, two, three, log = leaves(root)
    assert (one.retry, one.timeout, one.heartbeat) == (policy(max=4), 30.0, 5.0)
    assert (two.retry, two.timeout, two.heartbeat) == (None, 9.0, 5.0)
    assert (three.retry, three.timeout, three.heartbeat) == (policy(max=4), 30.0, None)
    assert (log.retry, log.timeout, log.heartbeat) == (None, None, None)


def test_nested_defaults_merge_inner_wins() -> None:
    root = compile_source(
        "(with-defaults {:retry {:max 4} :timeout 30}"
        "  (do!! (action!! :a/outer 1)"
        "        (with-defaults {:timeout 5 :retry {:max 2}} (action!! :a/inner 1))"
        "        (action!! :a/after 1)))"
    )
    outer, inner, after = leaves(root)
    assert (outer.retry["max"], outer.timeout) == (4, 30.0)
    assert (inner.retry["max"], inner.timeout) == (2, 5.0)
    assert (after.retry["max"], after.timeout) == (4, 30.0)


def test_one_node_under_with_defaults_is_that_node() -> None:
    node = leaf("(with-defaults {:timeout 3} (action!! :a/b 1))")
    assert node.timeout == 3.0
    assert node.id == 0


def test_defaults_are_lexical() -> None:
    # A function defined outside does not see them; one defined inside does.
    root = compile_source(
        "(defn outside [x] (action!! :a/out x))"
        " (with-defaults {:timeout 7}"
        "   (let [inside (fn [x] (action!! :a/in x))]"
        "     (do!! (outside 1) (inside 2)"
        "       (doseq!! [h [1 2]] (action!! :a/each h))"
        "       (when!! (ctx :go) (action!! :a/when 1)))))"
    )
    timeouts = {leaf.action: leaf.timeout for leaf in leaves(root) if leaf.action.startswith("a/")}
    assert timeouts == {"a/out": None, "a/in": 7.0, "a/when": 7.0}
    each = root.children[2].template
    assert each.timeout == 7.0


# ---------------------------------------------------------------------------------------
# Compile errors: located, with a caret

ERRORS: list[tuple[str, str, int, int]] = [
    ("(sleep!! -3)", "sleep!!: a duration must be a number of seconds >= 0", 1, 10),
    ('(sleep!! "soon")', "a duration text is a number and a unit", 1, 10),
    ("(sleep!! nil)", "got nil", 1, 10),
    ("(sleep!! true)", "got true", 1, 10),
    ("(sleep!! [1])", "got [1]", 1, 10),
    ("(sleep!! (log!! 1))", "sleep!! must be a duration", 1, 10),
    (
        "(sleep!! {:minuts 10})",
        "unknown duration key :minuts (known: :seconds, :minutes, :hours, :days); "
        "did you mean :minutes?",
        1,
        11,
    ),
    ("(sleep!! {:minutes -1})", "a duration map's :minutes must be a number >= 0, got -1", 1, 20),
    ('(sleep!! {:minutes "x"})', "a duration map's :minutes must be a number >= 0", 1, 20),
    ("(sleep!! {})", "got an empty map", 1, 10),
    ("(sleep!! 1e12)", "at most 100 years", 1, 10),
    ("(def d -5)\n(sleep!! d)", "got -5", 2, 10),
    ("(sleep!!)", "sleep!! takes 1 argument", 1, 1),
    ("(sleep!! 1 2)", "sleep!! takes 1 argument", 1, 1),
    ('(sleep-until!! "2026-12-24T09:00:00")', "an instant needs a zone", 1, 16),
    ('(sleep-until!! "next tuesday")', "an instant must be an ISO-8601 time with a zone", 1, 16),
    ("(sleep-until!! -1)", "epoch seconds >= 0", 1, 16),
    ("(await!! approval)", "await!! needs a keyword naming the signal, like :approval", 1, 10),
    ('(await!! "approval")', "await!! needs a keyword", 1, 10),
    (
        "(await!! :a {:timout 3})",
        "unknown await!! option :timout (known: :timeout); did you mean :timeout?",
        1,
        14,
    ),
    ("(await!! :a {:timeout -3})", "the :timeout of await!!: a duration must be", 1, 23),
    ("(await!! :a {:timeout {:hour 1}})", "did you mean :hours?", 1, 24),
    ("(await!! :a 3)", "await!! options must be a map", 1, 13),
    ("(await!! :a {} 1)", "await!! takes 1 to 2 arguments", 1, 1),
    ("(timeout!! 0 (log!! 1))", "the deadline of timeout!! must be more than 0 seconds", 1, 12),
    ("(timeout!! -1 (log!! 1))", "the deadline of timeout!!: a duration must be", 1, 12),
    ("(timeout!! 10)", "timeout!! takes at least 2 arguments", 1, 1),
    ("(timeout!! 10 nil)", "timeout!! needs a workflow to limit", 1, 1),
    ("(timeout!! 10 42)", "expected a workflow", 1, 15),
    (
        "(action!! :a 1 {:retyr true})",
        "unknown option :retyr (known: :idempotent?, :retry, :timeout, :heartbeat); "
        "did you mean :retry?",
        1,
        17,
    ),
    (
        "(action!! :a 1 {:retry {:maxx 3}})",
        "unknown :retry key :maxx (known: :max, :delay, :backoff, :max-delay, :jitter, :on); "
        "did you mean :max",
        1,
        25,
    ),
    (
        "(action!! :a 1 {:retry {:max 0}})",
        ":retry :max is the number of attempts in all (a whole number >= 1), got 0",
        1,
        30,
    ),
    ("(action!! :a 1 {:retry {:max 2.5}})", ":retry :max", 1, 30),
    ("(action!! :a 1 {:retry {:max true}})", ":retry :max", 1, 30),
    (
        "(action!! :a 1 {:retry {:backoff 0.5}})",
        ":retry :backoff multiplies each wait, a number >= 1, got 0.5",
        1,
        34,
    ),
    ("(action!! :a 1 {:retry {:delay -1}})", ":retry :delay: a duration must be", 1, 32),
    ("(action!! :a 1 {:retry {:delay {:mins 1}}})", "unknown duration key :mins", 1, 33),
    ('(action!! :a 1 {:retry {:max-delay "x"}})', ":retry :max-delay: a duration text", 1, 36),
    ("(action!! :a 1 {:retry {:jitter 1}})", ":retry :jitter must be true or false, got 1", 1, 33),
    (
        '(action!! :a 1 {:retry {:on "TimeoutError"}})',
        ":retry :on must be a vector of error names",
        1,
        29,
    ),
    ("(action!! :a 1 {:retry {:on []}})", ":retry :on must be a vector", 1, 29),
    ("(action!! :a 1 {:retry {:on [1]}})", ":retry :on must be a vector", 1, 29),
    ("(action!! :a 1 {:retry {:max 2 :max 3}})", "the :retry key :max is given twice", 1, 32),
    ("(action!! :a 1 {:retry 5})", ":retry must be true, false or a map like {:max 5", 1, 24),
    (
        "(action!! :a 1 {:retry {:max (ctx :n)}})",
        ":retry must be known when the program is compiled",
        1,
        30,
    ),
    (
        "(action!! :a 1 {:timeout (ctx :t)})",
        ":timeout must be known when the program is compiled",
        1,
        26,
    ),
    ("(action!! :a 1 {:timeout 0})", ":timeout must be more than 0 seconds, got 0", 1, 26),
    ('(action!! :a 1 {:timeout "ten"})', ":timeout: a duration text", 1, 26),
    ("(action!! :a 1 {:heartbeat -2})", ":heartbeat: a duration must be", 1, 28),
    (
        "(action!! :a 1 {:heartbeat {:minutes -1}})",
        "a duration map's :minutes must be a number >= 0",
        1,
        38,
    ),
    ("(action!! :a 1 {:timeout 1 :timeout 2})", "the option :timeout is given twice", 1, 28),
    ("(action!! :a 1 {:idempotent? 1})", ":idempotent? must be true or false", 1, 30),
    ("(action!! :a 1 [:timeout 1])", "action!! options must be a map", 1, 16),
    ("(idempotent-action!! :a 1 {:idempotent? false})", "idempotent-action!! is idempotent", 1, 27),
    ("(idempotent-action!! :a 1 {:timeot 1})", "did you mean :timeout?", 1, 28),
    ("(with-defaults {:timeout 0} (action!! :a 1))", ":timeout must be more than 0 seconds", 1, 26),
    (
        "(with-defaults {:idempotent? true} (action!! :a 1))",
        "unknown with-defaults option :idempotent? (known: :retry, :timeout, :heartbeat)",
        1,
        17,
    ),
    ("(with-defaults {:retri {}} (action!! :a 1))", "did you mean :retry?", 1, 17),
    ("(with-defaults [:timeout 1] (action!! :a 1))", "with-defaults needs a map of options", 1, 16),
    ("(with-defaults {:timeout 1})", "with-defaults takes at least 2 arguments", 1, 1),
    ("(with-defaults {:timeout 1} nil)", "with-defaults needs a workflow to apply to", 1, 1),
    (
        "(with-defaults {:timeout 1}\n  (do!! (action!! :a 1 {:retry {:max -1}})))",
        ":retry :max",
        2,
        38,
    ),
]


@pytest.mark.parametrize(("source", "fragment", "line", "column"), ERRORS)
def test_bad_time_forms_are_located_compile_errors(
    source: str, fragment: str, line: int, column: int
) -> None:
    with pytest.raises(AblaufCompileError) as info:
        compile_source(source, "bad.abl")
    err = info.value
    assert fragment in err.message
    assert (err.filename, err.line, err.column) == ("bad.abl", line, column)
    text = str(err)
    assert text.startswith(f"bad.abl:{line}:{column}: error: ")
    shown, caret = text.splitlines()[-2:]
    assert shown == source.splitlines()[line - 1]
    assert caret.index("^") == column - 1


# ---------------------------------------------------------------------------------------
# The command line: a bad duration is exit 2 with file:line:col and a caret


@pytest.fixture
def bad_program(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ABLAUF_STORE", f"sqlite:///{tmp_path / 'runs.db'}")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.abl"
    path.write_text("(do!!\n  (log!! 1)\n  (sleep!! {:minutes -5}))\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("command", ["check", "run"])
def test_cli_bad_duration_exits_2_with_a_caret(bad_program: Path, command: str) -> None:
    result = CliRunner().invoke(
        cli, [command, str(bad_program)], prog_name="ablauf", catch_exceptions=False
    )
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.output
    head, line, caret = result.stderr.strip("\n").splitlines()
    assert head.startswith(f"{bad_program}:3:22: error: sleep!!: a duration map's :minutes")
    assert line == "  (sleep!! {:minutes -5}))"
    assert caret.index("^") == 21
    assert result.stdout == ""


def test_cli_check_accepts_every_time_form(tmp_path: Path, bad_program: Path) -> None:
    good = tmp_path / "good.abl"
    good.write_text(
        textwrap.dedent(
            """
            (with-defaults {:retry {:max 3 :delay 1} :timeout 30}
              (timeout!! {:hours 1}
                (action!! :action/log "deploy" {:heartbeat 10})
                (sleep!! {:minutes 10})
                (with-augment [identity :approved] (await!! :approval {:timeout {:hours 24}}))
                (sleep-until!! "2026-12-24T09:00:00Z")))
            """
        ),
        encoding="utf-8",
    )
    result = CliRunner().invoke(cli, ["check", str(good)], prog_name="ablauf")
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------
# Random option maps: valid ones compile, invalid ones are compile errors, nothing else


class Raw:
    """Source text in a random option map: an expression, known now (`value`) or not."""

    def __init__(self, text: str, value: Any = None, known: bool = True) -> None:
        self.text, self.value, self.known = text, value, known

    def __repr__(self) -> str:
        return self.text


class NotKnown(Exception):
    """The value is not known at compile time (or is no data): the compiler refuses it."""


def lit(value: Any) -> str:
    """`value` in the language's notation (keys of maps as keywords)."""
    if isinstance(value, Raw):
        return value.text
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + " ".join(lit(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + " ".join(f":{k} {lit(v)}" for k, v in value.items()) + "}"


def resolve(value: Any) -> Any:
    """The compile-time value the compiler sees for `value`; NotKnown when there is none."""
    if isinstance(value, Raw):
        if not value.known:
            raise NotKnown(value.text)
        return value.value
    if isinstance(value, list):
        return [resolve(v) for v in value]
    if isinstance(value, dict):
        return {k: resolve(v) for k, v in value.items()}
    return value


UNITS = ["seconds", "minutes", "hours", "days", "minuts", "weeks"]
literals = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=10**10),
    st.floats(min_value=-5, max_value=1e6, allow_nan=False).map(lambda x: round(x, 3)),
    st.sampled_from(["10m", "1h30m", "500ms", "x", "", "TimeoutError", "-1s"]),
)
scalars = st.one_of(
    literals,
    st.sampled_from(
        [
            Raw("(+ 1 2)", 3),
            Raw("(* 0.5 3)", 1.5),
            Raw('(str "1" "m")', "1m"),
            Raw("(ctx :t)", known=False),
            Raw("(log!! 1)", known=False),
            Raw("(fn [x] x)", known=False),
            Raw("no-such-name", known=False),
        ]
    ),
)
durations = st.one_of(scalars, st.dictionaries(st.sampled_from(UNITS), scalars, max_size=3))
values = st.one_of(
    durations,
    # Literal items only: a vector mixing nil and a computed number trips the value meter
    # (values._flat_size), which is not this test's subject.
    st.lists(st.one_of(st.sampled_from(["TimeoutError", "http/503"]), literals), max_size=3),
)
RETRY_KEYS = ["max", "delay", "backoff", "max-delay", "jitter", "on", "tries"]
retries = st.one_of(
    st.booleans(),
    st.none(),
    scalars,
    st.dictionaries(st.sampled_from(RETRY_KEYS), values, max_size=4),
)
OPTION_KEYS = ["idempotent?", "retry", "timeout", "heartbeat", "timeut"]
options = st.dictionaries(
    st.sampled_from(OPTION_KEYS),
    st.one_of(values, retries),
    max_size=4,
)


class Invalid(Exception):
    """The option map is refused."""


def seconds_of(value: Any, positive: bool = False) -> float:
    try:
        seconds = parse_duration(value)
    except AblaufError:
        raise Invalid from None
    if positive and seconds <= 0:
        raise Invalid
    return seconds


def expected_retry(value: Any) -> dict[str, Any] | None:
    if value is None or value is False:
        return None
    if value is True:
        return dict(RETRY_DEFAULTS)
    if not isinstance(value, dict):
        raise Invalid
    out = dict(RETRY_DEFAULTS)
    for key, v in value.items():
        number = isinstance(v, int | float) and not isinstance(v, bool)
        if key == "max" and isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            out[key] = v
        elif key == "delay":
            out[key] = seconds_of(v)
        elif key == "max-delay":
            out[key] = None if v is None else seconds_of(v)
        elif key == "backoff" and number and v >= 1:
            out[key] = float(v)
        elif key == "jitter" and isinstance(v, bool):
            out[key] = v
        elif key == "on" and v is None:
            out[key] = None
        elif key == "on" and isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            out[key] = v
        else:
            raise Invalid
    return out


def expected(opts: dict[str, Any]) -> dict[str, Any]:
    """The leaf fields the options give; Invalid when the compiler must refuse them."""
    out: dict[str, Any] = {"idempotent": False, "retry": None, "timeout": None, "heartbeat": None}
    for key, raw in opts.items():
        if key == "idempotent?":
            if not (raw is None or isinstance(raw, bool)):  # written literally
                raise Invalid
            out["idempotent"] = bool(raw)
            continue
        try:
            value = resolve(raw)
        except NotKnown:
            raise Invalid from None
        if key == "retry":
            out["retry"] = expected_retry(value)
        elif key in ("timeout", "heartbeat"):
            out[key] = None if value is None else seconds_of(value, positive=True)
        else:
            raise Invalid
    return out


@settings(max_examples=400, deadline=None)
@given(options)
def test_random_option_maps_compile_or_are_compile_errors(opts: dict[str, Any]) -> None:
    source = f"(action!! :a/b 1 {lit(opts)})"
    try:
        fields = expected(opts)
    except Invalid:
        with pytest.raises(AblaufCompileError) as info:
            compile_source(source, "r.abl")
        assert info.value.line == 1
        assert info.value.column is not None
        return
    node = compile_source(source, "r.abl")
    assert isinstance(node, Leaf)
    got = {
        "idempotent": node.idempotent,
        "retry": node.retry,
        "timeout": node.timeout,
        "heartbeat": node.heartbeat,
    }
    assert got == fields, source
