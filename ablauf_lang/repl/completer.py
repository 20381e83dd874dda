"""Completion for the REPL: commands, forms and builtins, action names, node ids, paths."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document

from ablauf_lang.names import (
    BUILTINS,
    CONSTANTS,
    DECLARATIONS,
    LEAF_FORMS,
    LEAF_OPTIONS,
    SPECIAL_FORMS,
    STRUCTURAL_FORMS,
)

__all__ = ["AblaufCompleter"]

# The word being typed: everything back to a delimiter (a WordCompleter stops at `!`, `:`).
_WORD = re.compile(r"[^\s()\[\]{}\",;]*$")

_SYMBOLS: tuple[tuple[str, str], ...] = (
    *((name, "workflow") for name in STRUCTURAL_FORMS),
    *((name, "action") for name in LEAF_FORMS),
    *((name, "declaration") for name in DECLARATIONS),
    *((name, "special form") for name in SPECIAL_FORMS),
    *((name, "builtin") for name in BUILTINS),
    *((name, "constant") for name in CONSTANTS),
)

_LEAF_OPTIONS: tuple[str, ...] = tuple(":" + name for name in LEAF_OPTIONS)


class AblaufCompleter(Completer):
    """Complete what the cursor is on, by where it is.

    - a `:word` at the start of the line: REPL commands;
    - after `:load `, `:save `, `:record `, `:graph `: file paths;
    - after `:ok ` / `:fail ` / `:retry `: waiting ids;
    - after `:signal `: the signals awaited;  after `:advance `: the time to each wake-up;
    - after `:goto `, `:break `, `:unbreak `: restarts, actions, breakpoints (`arguments`);
    - a `:word` inside a form: registered action names (and leaf options);
    - any other word: names the session defined, forms, builtins and constants.
    """

    def __init__(
        self,
        commands: Callable[[], Iterable[tuple[str, str]]],
        actions: Callable[[], Iterable[str]],
        waiting: Callable[[], Iterable[tuple[int, str]]],
        defined: Callable[[], Iterable[str]] = lambda: (),
        *,
        signals: Callable[[], Iterable[str]] = lambda: (),
        wakes: Callable[[], Iterable[tuple[str, str]]] = lambda: (),
        arguments: Callable[[str], Iterable[tuple[str, str]]] = lambda name: (),
    ) -> None:
        self.commands = commands  # (name, help) pairs
        self.actions = actions  # registered action names, without the colon
        self.waiting = waiting  # (node id, action) of leaves waiting for a result
        self.defined = defined  # names the session defined (def, defn, import)
        self.signals = signals  # names of the signals the job's awaits wait for
        self.wakes = wakes  # (duration text, what ends then) for `:advance`
        # (text, meta) for the first argument of another command (`:goto`, `:break` ...)
        self.arguments = arguments
        self.paths = PathCompleter(expanduser=True)

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterator[Completion]:
        before = document.text_before_cursor
        stripped = before.lstrip()
        if stripped.startswith(":"):
            yield from self._command_line(stripped, complete_event)
            return
        match = _WORD.search(before)
        word = match.group() if match else ""
        if word.startswith(":"):
            for name in sorted(self.actions()):
                text = ":" + name
                if text.startswith(word):
                    yield Completion(text, -len(word), display_meta="action")
            for option in _LEAF_OPTIONS:
                if option.startswith(word):
                    yield Completion(option, -len(word), display_meta="option")
            return
        if not word:
            return
        for name in self.defined():
            if name.startswith(word):
                yield Completion(name, -len(word), display_meta="defined")
        for name, meta in _SYMBOLS:
            if name.startswith(word):
                yield Completion(name, -len(word), display_meta=meta)

    def _command_line(self, line: str, event: CompleteEvent) -> Iterator[Completion]:
        name, space, rest = line.partition(" ")
        if not space:
            for cmd, help_text in self.commands():
                if cmd.startswith(name):
                    yield Completion(cmd, -len(name), display_meta=help_text)
            return
        if name in (":load", ":save", ":record", ":graph"):
            yield from self.paths.get_completions(
                Document(rest.lstrip(), len(rest.lstrip())), event
            )
        elif name in (":ok", ":fail", ":retry") and " " not in rest.lstrip():
            typed = rest.lstrip()
            for node_id, action in self.waiting():
                text = str(node_id)
                if text.startswith(typed.lstrip("#")):
                    yield Completion(text, -len(typed), display_meta=action)
        elif name == ":signal" and " " not in rest.lstrip():
            typed = rest.lstrip()
            for signal in dict.fromkeys(self.signals()):
                if signal.startswith(typed.lstrip(":")):
                    yield Completion(signal, -len(typed), display_meta="awaited")
        elif name == ":advance" and " " not in rest.lstrip():
            typed = rest.lstrip()
            for text, meta in self.wakes():
                if text.startswith(typed):
                    yield Completion(text, -len(typed), display_meta=meta)
        elif " " not in rest.lstrip():
            typed = rest.lstrip()
            for text, meta in self.arguments(name):
                if text.startswith(typed):
                    yield Completion(text, -len(typed), display_meta=meta)
