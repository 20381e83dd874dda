"""Actions supplied by the user: the `@action("ns/name")` decorator and `--actions MODULE`.

A module exposes its actions as a mapping named `ACTIONS` (name -> callable), or by
decorating functions:

    from ablauf_lang import action

    @action("git/create-repo")
    def create_repo(payload, context):
        ...

`load_actions("pkg.module")` or `load_actions("path/to/actions.py")` imports the module
and returns both kinds, merged (the mapping wins on a clash).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, TypeVar

from ablauf_lang.errors import AblaufError
from ablauf_lang.names import WAIT_ACTIONS, did_you_mean

__all__ = [
    "ACTION_ATTR",
    "action",
    "actions_of",
    "load_actions",
    "unknown_action_errors",
    "used_actions",
]

ACTION_ATTR = "__ablauf_action__"

F = TypeVar("F", bound=Callable[..., Any])


def action(name: str) -> Callable[[F], F]:
    """Register the decorated function as the action `name` (e.g. `"git/create-repo"`)."""
    name = str(name).lstrip(":")
    if not name:
        raise ValueError("an action needs a name, such as 'ns/name'")

    def register(fn: F) -> F:
        setattr(fn, ACTION_ATTR, name)
        return fn

    return register


def actions_of(module: ModuleType) -> dict[str, Callable[..., Any]]:
    """The actions a module exposes: decorated functions, then its `ACTIONS` mapping."""
    found: dict[str, Callable[..., Any]] = {}
    for value in list(vars(module).values()):
        name = getattr(value, ACTION_ATTR, None) if callable(value) else None
        if isinstance(name, str):
            found[name] = value
    mapping = getattr(module, "ACTIONS", None)
    if mapping is not None:
        if not isinstance(mapping, Mapping):
            raise AblaufError(
                f"{module.__name__}.ACTIONS must be a mapping of action names to functions, "
                f"not {type(mapping).__name__}"
            )
        for key, fn in mapping.items():
            if not callable(fn):
                raise AblaufError(f"{module.__name__}.ACTIONS[{key!r}] is not callable")
            found[str(key).lstrip(":")] = fn
    return found


def load_actions(spec: str) -> dict[str, Callable[..., Any]]:
    """Import a module by dotted name or `.py` path and return its actions.

    Raises AblaufError (a one-line message) when it does not import or exposes none.
    """
    module = _import(spec)
    found = actions_of(module)
    if not found:
        raise AblaufError(
            f"--actions {spec}: the module exposes no actions (define ACTIONS = {{name: fn}} "
            "or decorate functions with @ablauf_lang.action('ns/name'))"
        )
    return found


def _import(spec: str) -> ModuleType:
    is_package = os.path.isfile(os.path.join(spec, "__init__.py")) and os.sep not in spec
    if os.path.isdir(spec) and not is_package:
        raise AblaufError(
            f"--actions {spec}: is a directory; name a .py file or a module (dotted name)"
        )
    is_path = spec.endswith(".py") or os.sep in spec or (os.altsep or os.sep) in spec
    try:
        if is_path:
            return _import_path(spec)
        # Console scripts do not put the working directory on sys.path; `python -m` does.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        return importlib.import_module(spec)
    except AblaufError:
        raise
    except BaseException as exc:  # the user's module may raise anything,
        # SystemExit and KeyboardInterrupt included: it did not import, which is one line.
        detail = _first_line(exc)
        what = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        raise AblaufError(f"--actions {spec}: cannot import the module ({what})") from None


def _first_line(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not hide the import error
        return ""
    return text.splitlines()[0][:200] if text.strip() else ""


def _import_path(path: str) -> ModuleType:
    if not os.path.isfile(path):
        raise AblaufError(f"--actions {path}: no such file")
    path = os.path.abspath(path)
    name = "_ablauf_actions_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise AblaufError(f"--actions {path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    # Like running a script: its own directory is importable (helpers next to it).
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


# ---------------------------------------------------------------- actions a program needs


def used_actions(root: Any) -> dict[str, Any]:
    """The actions a compiled tree names, each with the node that names it first (in
    pre-order): leaves, and the bodies `doseq!!`/`pmap!!` copy at run time."""
    found: dict[str, Any] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        if getattr(node, "kind", None) == "leaf":
            if node.action not in WAIT_ACTIONS:  # performed by the runners themselves
                found.setdefault(str(node.action), node)
            continue
        kids = list(getattr(node, "children", ()))
        template = getattr(node, "template", None)
        if template is not None:
            kids.append(template)
        stack.extend(reversed(kids))
    return found


def unknown_action_errors(
    root: Any,
    known: Mapping[str, Any],
    spec: str | None,
    *,
    filename: str | None = None,
    source: str | None = None,
) -> list[AblaufError]:
    """One located error per action the tree names that `known` lacks (first use each),
    with the close names as a hint; `spec` is the `--actions` module (None: not given)."""
    errors: list[AblaufError] = []
    for name, node in used_actions(root).items():
        if name in known:
            continue
        if spec is None:
            why = "the standard library has no such action and no --actions module was given"
        else:
            why = f"neither {spec} nor the standard library defines it"
        message = f"unknown action {name}: {why}{did_you_mean(name, known)}"
        span = getattr(node, "span", None)
        if span is None:
            errors.append(AblaufError(message, filename=filename))
            continue
        where = span.filename or filename
        errors.append(
            AblaufError(
                message,
                filename=where,
                line=span.line,
                column=span.column,
                source=source if where == filename else None,
            )
        )
    return errors
