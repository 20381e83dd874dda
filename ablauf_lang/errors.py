"""Errors: user-facing language errors (with position and caret) apart from bugs.

Only the standard library is imported here: every other module may raise these.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Span:
    """A 1-based source position: where a form starts (and ends)."""

    line: int
    column: int
    end_line: int | None = None
    end_column: int | None = None
    filename: str | None = None


# Lines are counted at "\n" only, as the reader (Lark) counts them: U+2028, form feeds
# and lone "\r"s are characters of a line, not line breaks (str.splitlines disagrees).
# Characters that would not show as one column (controls, line separators, surrogates)
# are shown as U+FFFD so the caret stays under the column it names.
_INVISIBLE = frozenset(
    [*map(chr, range(0x00, 0x20)), "\x7f", *map(chr, range(0x80, 0xA0)), "\u2028", "\u2029"]
)
# A line longer than this is shown as a window around the column.
_MAX_SHOWN = 120


def _shown(ch: str) -> str:
    if ch == "\t":
        return ch
    if ch in _INVISIBLE or "\ud800" <= ch <= "\udfff" or ch == "\ufeff":
        return "\ufffd"
    return ch


def source_lines(source: str) -> list[str]:
    """The lines of `source` as the reader numbers them (a trailing "\r" dropped)."""
    if source.startswith("\ufeff"):
        source = source[1:]  # the reader skips a byte order mark
    return [line[:-1] if line.endswith("\r") else line for line in source.split("\n")]


def caret_text(source: str | None, line: int | None, column: int | None) -> str:
    """Return the source line at `line` followed by a caret under `column`."""
    if source is None or line is None or line < 1:
        return ""
    lines = source_lines(source)
    if lines and lines[-1] == "" and len(lines) > 1:
        lines.pop()  # the text after a final newline is no line of its own
    if line > len(lines):
        # An error at the end of input (an unclosed bracket) points after the last line.
        text = lines[-1] if lines else ""
        column = len(text) + 1
    else:
        text = lines[line - 1]
    col = max(1, column or 1)
    col = min(col, len(text) + 1)
    if len(text) > _MAX_SHOWN:
        # Show a window around the column, marked with "..." where text is left out.
        start = max(0, col - 1 - _MAX_SHOWN // 2)
        end = min(len(text), start + _MAX_SHOWN)
        start = max(0, end - _MAX_SHOWN)
        head = "..." if start > 0 else ""
        tail = "..." if end < len(text) else ""
        text = head + text[start:end] + tail
        col = col - start + len(head)
    shown = "".join(map(_shown, text))
    # Keep tabs so the caret lines up under tab-indented source.
    pad = "".join("\t" if ch == "\t" else " " for ch in shown[: col - 1])
    return f"{shown}\n{pad}^"


class AblaufError(Exception):
    """An error in the user's program or input; shown without a traceback."""

    def __init__(
        self,
        message: str,
        *,
        filename: str | None = None,
        line: int | None = None,
        column: int | None = None,
        source: str | None = None,
    ) -> None:
        self.message = message
        self.filename = filename
        self.line = line
        self.column = column
        self.source = source
        super().__init__(self.render())

    @property
    def location(self) -> str:
        """`FILE:LINE:COL` (parts that are unknown are left out)."""
        parts = [self.filename or "<input>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)

    def render(self) -> str:
        """Return `FILE:LINE:COL: error: message`, the source line and a caret."""
        if self.filename is None and self.line is None:
            return self.message  # not about a place in a program (a store, a run id)
        head = f"{self.location}: error: {self.message}"
        snippet = caret_text(self.source, self.line, self.column)
        return f"{head}\n{snippet}" if snippet else head

    def __str__(self) -> str:
        return self.render()


class AblaufSyntaxError(AblaufError):
    """The reader could not read the source text."""

    def __init__(
        self,
        message: str,
        *,
        incomplete: bool = False,
        filename: str | None = None,
        line: int | None = None,
        column: int | None = None,
        source: str | None = None,
    ) -> None:
        # incomplete: more input could fix it (an unclosed bracket or string); the REPL reads on.
        self.incomplete = incomplete
        super().__init__(message, filename=filename, line=line, column=column, source=source)


class AblaufCompileError(AblaufError):
    """A well-formed program that does not compile to a workflow."""


class JobError(AblaufError):
    """A job was driven wrongly: a result for an unknown node, a bad snapshot."""


class InvariantError(JobError):
    """A restart would leave a job that is not done with nothing in flight (an engine bug).

    Raised instead of returning such a job, so nothing is persisted and the run stays as it
    was; it reaches a user as one line (exit 2), never a traceback.
    """


class StoreError(AblaufError):
    """A store could not be opened or used: bad URL, newer schema, damaged file."""


class RunError(AblaufError):
    """A run operation was refused: unknown id, nothing to retry, already finished."""


class Refusal(Exception):
    """Base of the internal refusals (a builtin's bad argument, an import that cannot be
    read, a value over budget): `message` is for the user; the caller adds where."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class InternalError(Exception):
    """A bug in ablauf_lang itself, never the user's fault."""


def with_span(
    exc_type: type[AblaufError],
    message: str,
    span: Span | None,
    source: str | None,
    filename: str | None = None,
) -> AblaufError:
    """Build a language error located at `span` in `source`."""
    if span is None:
        return exc_type(message, filename=filename, source=source)
    return exc_type(
        message,
        filename=filename or span.filename,
        line=span.line,
        column=span.column,
        source=source,
    )
