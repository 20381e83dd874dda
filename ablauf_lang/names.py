"""Names of forms, actions and builtins: one source for the compiler, lexer and completer."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

# Structural workflow forms (branches of the tree).
STRUCTURAL_FORMS: tuple[str, ...] = (
    "do!!",
    "dopar!!",
    "try!!",
    "rescue!!",
    "finally!!",
    "with-augment",
    "if!!",
    "when!!",
    "doseq!!",
    "pmap!!",
    "timeout!!",
    "with-defaults",
)

# Leaf forms: each becomes one action.
LEAF_FORMS: tuple[str, ...] = (
    "action!!",
    "idempotent-action!!",
    "log!!",
    "fail!!",
    "sleep!!",
    "sleep-until!!",
    "await!!",
)

# Options of `action!!` and `idempotent-action!!` (`{:retry {...} :timeout 30}`).
LEAF_OPTIONS: tuple[str, ...] = ("idempotent?", "retry", "timeout", "heartbeat")

# The keys of a `:retry` policy map.
RETRY_OPTIONS: tuple[str, ...] = ("max", "delay", "backoff", "max-delay", "jitter", "on")

# Options `with-defaults` sets for the actions inside it.
DEFAULT_OPTIONS: tuple[str, ...] = ("retry", "timeout", "heartbeat")

# Compile-time declarations.
DECLARATIONS: tuple[str, ...] = ("def", "defn", "let", "import")

# Compile-time special forms that are not declarations.
SPECIAL_FORMS: tuple[str, ...] = ("if", "when", "for", "do", "and", "or", "fn", "quote")

# Pure builtin functions available at compile time (and at run time inside `ctx` expressions).
BUILTINS: tuple[str, ...] = (
    "ctx",
    "str",
    "+",
    "-",
    "*",
    "/",
    "mod",
    "=",
    "not=",
    "<",
    ">",
    "<=",
    ">=",
    "not",
    "get",
    "get-in",
    "assoc",
    "assoc-in",
    "dissoc",
    "merge",
    "count",
    "range",
    "concat",
    "keyword",
    "name",
    "list",
    "vector",
    "hash-map",
    "first",
    "rest",
    "last",
    "nth",
    "conj",
    "contains?",
    "empty?",
    "nil?",
    "identity",
    "inc",
    "dec",
    "max",
    "min",
    "keys",
    "vals",
    "upper-case",
    "lower-case",
    "join",
)

# Actions shipped by the standard library.
LOG_ACTION = "action/log"  # what `log!!` performs
STDLIB_ACTIONS: tuple[str, ...] = (LOG_ACTION, "action/fail", "action/sleep")

CONSTANTS: tuple[str, ...] = ("nil", "true", "false")

# Commands of the stepping REPL.
REPL_COMMANDS: tuple[str, ...] = (
    ":step",
    ":run",
    ":tree",
    ":ctx",
    ":ok",
    ":fail",
    ":retry",
    ":manual",
    ":auto",
    ":back",
    ":load",
    ":save",
    ":graph",
    ":clock",
    ":advance",
    ":signal",
    ":history",
    ":goto",
    ":attach",
    ":fork",
    ":record",
    ":break",
    ":breaks",
    ":unbreak",
    ":continue",
    ":plan",
    ":actions",
    ":help",
    ":quit",
)

ALL_FORMS: tuple[str, ...] = STRUCTURAL_FORMS + LEAF_FORMS + DECLARATIONS + SPECIAL_FORMS


def did_you_mean(name: str, candidates: Iterable[str], prefix: str = "") -> str:
    """Return "; did you mean x or y?" for the candidates close to `name`, or ""."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    if not close:
        return ""
    text = " or ".join(prefix + c for c in close)
    return f"; did you mean {text}" + ("" if text.endswith("?") else "?")


# Waits: leaves whose action a runner performs itself (never looked up among the actions).
SLEEP = "ablauf/sleep"  # `(sleep!! d)`, `(sleep-until!! t)`, the timer of `timeout!!`
AWAIT = "ablauf/await"  # `(await!! :name)`: a signal's value, or a timeout at the deadline
WAIT_ACTIONS = frozenset({SLEEP, AWAIT})
