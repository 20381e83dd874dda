"""An interactive session: source fed piece by piece into one scope (the REPL's door).

`Session.feed(source, name, context)` reads and compiles one input against the session's
definitions and says what it was (`Evaluated`):

- `defined`: only declarations (`def`, `defn`, `import`): their names join the scope;
- `workflow`: a workflow (its lowered tree in `root`, for the caller to make a job of);
- `value`: an expression's value, plain data (a run-time expression, one that reads the
  context, is evaluated against `context`);
- `other`: a value that is not data, such as a function (`text` describes it).

The session never starts a job: the engine is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ablauf_lang.code import Code, Expr
from ablauf_lang.engine.kinds import Node
from ablauf_lang.errors import AblaufError
from ablauf_lang.lang.compiler import RULES, TOP_LEVEL_RULES, Compiler, head_name
from ablauf_lang.lang.evaluator import Env, describe, is_data, is_workflow
from ablauf_lang.lang.reader import read

__all__ = ["Evaluated", "Session"]


@dataclass(frozen=True, slots=True)
class Evaluated:
    """What one input was: see the module's docstring for `kind`."""

    kind: Literal["defined", "workflow", "value", "other"]
    root: Node | None = None  # the workflow's tree (kind "workflow")
    value: Any = None  # the value (kind "value")
    text: str = ""  # a description of the value (kind "other")


class Session:
    """One scope of definitions kept across inputs."""

    def __init__(self, env: Env | None = None) -> None:
        self.env = Env() if env is None else env

    def names(self) -> list[str]:
        """The names defined so far (`def`, `defn`, `import`), sorted."""
        return self.env.names()

    def feed(self, source: str, name: str, context: Mapping[str, Any] | None = None) -> Evaluated:
        """Read and compile one input; AblaufError (syntax, compile, run time) on failure."""
        forms = read(source, name)
        compiler = Compiler(source, name, env=self.env)
        if forms and all(head_name(f) in TOP_LEVEL_RULES for f in forms):
            for form in forms:
                TOP_LEVEL_RULES[str(head_name(form))](compiler, form, self.env)
            return Evaluated("defined")
        last = forms[-1] if forms else None
        early_ok = all(head_name(f) in TOP_LEVEL_RULES for f in forms[:-1])
        if last is None or head_name(last) in RULES or head_name(last) in TOP_LEVEL_RULES:
            return Evaluated("workflow", root=compiler.program(forms))
        if not early_ok:
            return Evaluated("workflow", root=compiler.program(forms))
        for form in forms[:-1]:
            TOP_LEVEL_RULES[str(head_name(form))](compiler, form, self.env)
        spans = getattr(forms, "spans", ())
        span = spans[-1] if spans else None
        value = compiler.evaluate(last, span, self.env)
        if is_workflow(value) or (isinstance(value, list) and _holds_workflow(value)):
            return Evaluated("workflow", root=compiler.program(forms[-1:]))
        if isinstance(value, Code):
            return Evaluated("value", value=Expr(value, name).evaluate(dict(context or {})))
        if not is_data(value):
            return Evaluated("other", text=describe(value))
        return Evaluated("value", value=value)

    def expression(self, source: str, name: str) -> Callable[[Mapping[str, Any]], Any]:
        """One expression compiled against the session's definitions, to evaluate later
        against a context (a REPL breakpoint's condition); AblaufError when the source
        is not one expression (a workflow, a function, several forms)."""
        forms = read(source, name)
        if len(forms) != 1:
            raise AblaufError(f"expected one expression, found {len(forms)} forms")
        spans = getattr(forms, "spans", ())
        value = Compiler(source, name, env=self.env).evaluate(
            forms[0], spans[0] if spans else None, self.env
        )
        if isinstance(value, Code):
            expr = Expr(value, name)
            return lambda context: expr.evaluate(dict(context))
        if is_workflow(value) or not is_data(value):
            raise AblaufError(f"expected an expression, found {describe(value)}")
        return lambda context: value


def _holds_workflow(items: list[Any]) -> bool:
    """True when a (nested) list holds a workflow value."""
    stack = list(items)
    while stack:
        item = stack.pop()
        if is_workflow(item):
            return True
        if isinstance(item, list):
            stack.extend(item)
    return False
