"""The stepping REPL: a prompt-toolkit session around a `Stepper`.

    ablauf> (dopar!! (log!! "a") (log!! "b"))
    ablauf> :step

Input is highlighted by the project's Pygments lexer; Tab completes forms, commands and
action names; Enter submits once the brackets balance; history persists across sessions.
The loop never dies: an error while reading or running is printed and the loop goes on.
Ctrl-C clears the line (and stops a `:step` or `:run` under way), Ctrl-D (or `:quit`)
leaves, F5 is `:step`. A form that is not a workflow, such as `(+ 1 2)` or `(ctx :k)`,
is evaluated (against the current job's context) and its value printed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prompt_toolkit import PromptSession
from prompt_toolkit.application import run_in_terminal
from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
from prompt_toolkit.filters import Condition
from prompt_toolkit.formatted_text import StyleAndTextTuples
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.input import Input
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.lexers import PygmentsLexer
from prompt_toolkit.output import Output
from prompt_toolkit.styles import Style
from rich.console import Console
from rich.text import Text

from ablauf_lang.api import Job
from ablauf_lang.errors import AblaufError
from ablauf_lang.repl.commands import COMMANDS, QuitRepl, find_command
from ablauf_lang.repl.completer import AblaufCompleter
from ablauf_lang.repl.stepper import ReplInterrupted, Stepper
from ablauf_lang.repl.travel import save_recording
from ablauf_lang.repl.validator import AblaufValidator, is_command, is_incomplete
from ablauf_lang.runners.clock import Clock
from ablauf_lang.stdlib.durations import format_duration, format_instant
from ablauf_lang.ui.highlight import AblaufLexer
from ablauf_lang.ui.render import FULL_WIDTH, LeafCounts, format_value, job_tree, leaf_counts

if TYPE_CHECKING:
    from ablauf_lang.lang.session import Session

__all__ = ["PROMPT", "Repl", "history_path"]

PROMPT = "ablauf> "
CONTINUATION = "   ...> "
REPL_NAME = "<repl>"

_STYLE = Style.from_dict(
    {
        "bottom-toolbar": "noreverse bg:#303030 #d0d0d0",
        "bottom-toolbar.status-pending": "#ffd75f bold",
        "bottom-toolbar.status-success": "#87ff87 bold",
        "bottom-toolbar.status-failure": "#ff5f5f bold",
        "bottom-toolbar.dim": "#8a8a8a",
        "bottom-toolbar.mode": "#87d7ff",
        "prompt": "#87d7ff bold",
        "continuation": "#6c6c6c",
    }
)


def history_path() -> str:
    """Where the REPL keeps its history: the user's state directory (XDG)."""
    from platformdirs import user_state_dir

    return os.path.join(user_state_dir("ablauf", appauthor=False), "repl_history")


def _default_history() -> History:
    path = history_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError:
        return InMemoryHistory()  # a read-only home: history for this session only
    return FileHistory(path)


class Repl:
    """The REPL: reads input, runs commands and forms, prints through `console`."""

    def __init__(
        self,
        actions: Mapping[str, Callable[..., Any]] | None = None,
        *,
        context: dict[str, Any] | None = None,
        console: Console | None = None,
        input: Input | None = None,
        output: Output | None = None,
        history: History | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.stepper = Stepper(actions, clock=clock)
        self.context = dict(context or {})
        self.console = console or Console(highlight=False)
        # Not a terminal (a transcript): values and lines in full, never cut.
        self.full = self.console.width >= FULL_WIDTH
        self._scope: Session | None = None  # compile-time definitions kept across inputs
        self._counts: tuple[Job | None, LeafCounts] = (None, LeafCounts())
        self._io = (input, output, history)
        self._definitions: list[str] = []  # the inputs that only defined names, in order
        self.recording: Path | None = None  # `:record FILE`: saved after every input
        self._session: PromptSession[str] | None = None

    @property
    def session(self) -> PromptSession[str]:
        """The prompt-toolkit session (made on first use: piped input never needs one)."""
        if self._session is None:
            input_, output, history = self._io
            self._session = PromptSession(
                message=[("class:prompt", PROMPT)],
                lexer=PygmentsLexer(AblaufLexer),
                completer=AblaufCompleter(
                    self._command_names,
                    self._action_names,
                    self._waiting,
                    self._defined_names,
                    signals=self.stepper.awaited,
                    wakes=self._wakes,
                    arguments=self._arguments,
                ),
                complete_while_typing=False,
                validator=AblaufValidator(frozenset(COMMANDS)),
                validate_while_typing=False,
                history=history if history is not None else _default_history(),
                auto_suggest=AutoSuggestFromHistory(),
                multiline=Condition(lambda: is_incomplete(self.session.default_buffer.text)),
                prompt_continuation=lambda width, line, wrap: [
                    ("class:continuation", CONTINUATION.rjust(width))
                ],
                bottom_toolbar=self.toolbar,
                key_bindings=self._key_bindings(),
                style=_STYLE,
                input=input_,
                output=output,
            )
        return self._session

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        """Read and handle input until Ctrl-D or `:quit`."""
        self.console.print(
            Text(
                "ablauf REPL: enter a workflow form, :help for commands, Ctrl-D to leave",
                style="dim",
            )
        )
        while True:
            try:
                text = self.session.prompt()
            except KeyboardInterrupt:
                continue  # Ctrl-C clears the line
            except EOFError:
                break
            try:
                self.handle(text)
            except QuitRepl:
                break

    def run_lines(self, lines: Iterable[str]) -> None:
        """Handle input that is not a terminal (`ablauf repl < script`): echo, then run.

        Lines gather until the form they hold is complete, as at the prompt.
        """
        pending = ""
        for line in lines:
            pending += line if line.endswith("\n") else line + "\n"
            if is_incomplete(pending):
                continue
            text, pending = pending.rstrip("\n"), ""
            if not text.strip():
                continue
            self._echo(text)
            try:
                self.handle(text)
            except QuitRepl:
                return
        if pending.strip():
            self._echo(pending.rstrip("\n"))
            self.handle(pending)  # incomplete at the end: the reader says what is missing

    def _echo(self, text: str) -> None:
        lines = text.split("\n")
        echoed = Text(PROMPT, style="bold cyan") + Text(lines[0])
        for line in lines[1:]:
            echoed.append("\n" + CONTINUATION + line)
        self.console.print(echoed)

    def handle(self, text: str) -> None:
        """Run one input: a command or a form. Errors are printed; QuitRepl leaves."""
        if not text.strip():
            return
        seen = (self.stepper.position, self.stepper.current)
        try:
            self._handle(text)
        finally:
            if self.recording is not None and seen != (
                self.stepper.position,
                self.stepper.current,
            ):
                self._save_recording()

    def _save_recording(self) -> None:
        """`:record`: the file follows the session (after an input that changed it)."""
        try:
            save_recording(self)
        except OSError as exc:
            self.console.print(Text(f"error: {exc.strerror or exc}", style="red"))

    def _handle(self, text: str) -> None:
        try:
            if is_command(text):
                name, _, arg = text.strip().partition(" ")
                find_command(name).fn(self, arg)
            else:
                job = self.compile(text, REPL_NAME)
                if job is not None:
                    self.stepper.start(job, REPL_NAME, source=self.program_text(text))
                    self.console.print(self.tree(job))
                    self.warn_unknown_actions(job)
        except QuitRepl:
            raise
        except ReplInterrupted as exc:
            self.console.print(Text(exc.message, style="yellow"))
        except AblaufError as exc:
            located = exc.filename is not None or exc.line is not None
            self.console.print(Text(str(exc) if located else f"error: {exc.message}", style="red"))
        except KeyboardInterrupt:
            self.console.print(Text("interrupted", style="yellow"))
        except Exception as exc:  # a bug must not end the session
            self.console.print(
                Text(
                    f"internal error: {type(exc).__name__}: {exc} (please report it)",
                    style="bold red",
                )
            )

    def compile(self, text: str, name: str) -> Job | None:
        """Compile input into a new job; None when it only held definitions, or was an
        expression (its value is printed)."""
        from ablauf_lang.api import make_job

        job = self.stepper.job
        context = job.context if job is not None else self.context
        done = self._compile_scope().feed(text, name, context)
        if done.kind == "workflow":
            assert done.root is not None
            return make_job(done.root, self.context)
        if done.kind == "defined":
            self._definitions.append(text)
            self.console.print(Text("ok", style="dim"))
        elif done.kind == "other":
            self.console.print(Text(done.text, style="dim"))
        else:
            self.console.print(Text(format_value(done.value, 0 if self.full else 2000)))
        return None

    def program_text(self, text: str) -> str:
        """A program's whole text: the definitions entered before it, then `text` (what
        a recorded test or a forked run compiles again)."""
        return "\n".join([*self._definitions, text])

    def expression(self, text: str) -> Callable[[Mapping[str, Any]], Any]:
        """An expression compiled against the session's definitions, to evaluate later
        against a context (a breakpoint's condition)."""
        return self._compile_scope().expression(text, "<break>")

    def _compile_scope(self) -> Session:
        """The compile-time scope kept across inputs (made on first use)."""
        from ablauf_lang.lang.session import Session

        if self._scope is None:
            self._scope = Session()
        return self._scope

    def tree(self, job: Job, changed: Iterable[int] = ()) -> Any:
        """The job's tree as the REPL shows it: durations from when each action began."""
        return job_tree(
            job, changed=changed, width=0 if self.full else 40, timing=self.stepper.timing
        )

    def warn_unknown_actions(self, job: Job) -> None:
        """A note for each action the job names that no one registered (it would fail)."""
        from ablauf_lang.api import used_actions

        missing = [a for a in used_actions(job.root) if a not in self.stepper.actions]
        if missing:
            names = ", ".join(missing)
            self.console.print(
                Text(
                    f"note: no action registered for {names}: :step fails it; "
                    ":manual, then :ok / :fail, gives its result by hand",
                    style="dim",
                )
            )

    # ------------------------------------------------------------ toolbar

    def toolbar(self) -> StyleAndTextTuples:
        """The bottom toolbar: job status, restarts, leaf counts, mode."""
        job = self.stepper.job
        mode = "manual" if self.stepper.manual else "auto"
        if job is None:
            return [
                ("class:bottom-toolbar.dim", " no job: enter a workflow form or :load FILE"),
                ("class:bottom-toolbar.dim", "  · "),
                ("class:bottom-toolbar.mode", mode),
                ("class:bottom-toolbar.dim", "  · :help "),
            ]
        if self._counts[0] is not job:
            self._counts = (job, leaf_counts(job))
        counts = self._counts[1]
        status = str(job.status)
        parts: StyleAndTextTuples = [
            ("class:bottom-toolbar", " job "),
            (f"class:bottom-toolbar.status-{status}", status),
            ("class:bottom-toolbar.dim", f"  restarts {job.restarts}  · "),
            ("class:bottom-toolbar", f"pending {counts.pending}  done {counts.done}  "),
            (
                "class:bottom-toolbar.status-failure" if counts.failed else "class:bottom-toolbar",
                f"failed {counts.failed}",
            ),
            ("class:bottom-toolbar.dim", f"  of {counts.total} leaves  · "),
            ("class:bottom-toolbar.mode", mode),
        ]
        queued = len(self.stepper.current.queued)
        if queued:
            parts.append(("class:bottom-toolbar.dim", f"  · {queued} result(s) queued"))
        wait = self.next_wait()
        if wait:
            parts.append(("class:bottom-toolbar.dim", "  · "))
            parts.append(("class:bottom-toolbar.status-pending", wait))
        parts.append(("class:bottom-toolbar.dim", "  · F5 :step "))
        return parts

    def next_wait(self) -> str | None:
        """The toolbar's next wake-up: `sleeping until ... (in 30d)`, `next: approval
        (until ...)`, `retrying t/x (attempt 2 at ...)`; None when the job waits for
        nothing."""
        found = self.stepper.waits()
        if not found:
            return None
        wait, now = found[0], self.stepper.now()
        when = "" if wait.until is None else format_instant(wait.until)
        gap = "" if wait.until is None else f", in {format_duration(max(0.0, wait.until - now))}"
        if wait.kind == "sleep":
            text = f"sleeping until {when}{gap.replace(', ', ' (')}{')' if gap else ''}"
        elif wait.kind == "signal":
            text = f"next: {wait.name}" + (f" (until {when}{gap})" if when else "")
        else:
            text = f"retrying {wait.name} (attempt {wait.attempt} at {when}{gap})"
        more = len(found) - 1
        return text + (f" (+{more} more)" if more else "")

    # ------------------------------------------------------------ helpers

    def _key_bindings(self) -> KeyBindings:
        kb = KeyBindings()

        @kb.add("f5")
        def _step(event: KeyPressEvent) -> None:
            """F5: `:step`, printed above the prompt; the typed text stays."""
            run_in_terminal(lambda: self.handle(":step"), in_executor=True)

        return kb

    @staticmethod
    def _command_names() -> list[tuple[str, str]]:
        return [(c.name, c.help) for c in COMMANDS.values()]

    def _defined_names(self) -> list[str]:
        """Names defined in this session (`def`, `defn`, `import`), for completion."""
        return self._scope.names() if self._scope is not None else []

    def _action_names(self) -> list[str]:
        return list(self.stepper.actions)

    def _wakes(self) -> list[tuple[str, str]]:
        """Durations for `:advance`: the gap to each wait's time, with what it ends."""
        now, out = self.stepper.now(), []
        for wait in self.stepper.waits():
            if wait.until is not None and wait.until > now:
                gap = format_duration(wait.until - now).replace(" ", "")
                out.append((gap, f"#{wait.node} {wait.kind} until {format_instant(wait.until)}"))
        return out

    def _arguments(self, name: str) -> list[tuple[str, str]]:
        """Completions of a command's first argument: `:goto` restarts, `:break` actions,
        `:unbreak` breakpoints."""
        stepper = self.stepper
        if name == ":goto":
            return [
                (str(s.job.restarts), "restart") for _, s in stepper.segment() if s.job is not None
            ]
        if name == ":break":
            return [(a, "action") for a in sorted(stepper.actions)]
        if name == ":unbreak":
            return [(str(b.number), b.text) for b in stepper.breaks] + [("all", "every one")]
        return []

    def _waiting(self) -> list[tuple[int, str]]:
        return [(leaf.id, leaf.action) for leaf in self.stepper.waiting()]
