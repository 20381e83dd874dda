"""Input checks for the REPL: when Enter submits, and what it refuses.

A form is submitted only when its brackets and strings are closed (the reader says
whether more input could complete it: `AblaufSyntaxError.incomplete`); until then Enter
inserts a newline. A stray closer or another reader error is shown under the input, at
its position, and the input stays editable. Commands (`:step` ...) are one line.
"""

from __future__ import annotations

from prompt_toolkit.document import Document
from prompt_toolkit.validation import ValidationError, Validator

from ablauf_lang.errors import AblaufError, AblaufSyntaxError

__all__ = ["AblaufValidator", "is_command", "is_incomplete"]


def is_command(text: str) -> bool:
    """True for a REPL command line such as `:step`."""
    return text.lstrip().startswith(":")


def is_incomplete(text: str) -> bool:
    """True when more input could complete the form (an open bracket or string)."""
    if not text.strip() or is_command(text):
        return False
    from ablauf_lang.lang.reader import read

    try:
        read(text, "<repl>")
    except AblaufSyntaxError as exc:
        return exc.incomplete
    return False


class AblaufValidator(Validator):
    """Refuse unknown commands and input the reader cannot read, pointing at the spot."""

    def __init__(self, known_commands: frozenset[str] | None = None) -> None:
        self.known_commands = known_commands

    def validate(self, document: Document) -> None:
        text = document.text
        if not text.strip():
            return
        if is_command(text):
            self._validate_command(text)
            return
        from ablauf_lang.lang.reader import read

        try:
            read(text, "<repl>")
        except AblaufError as exc:
            line = max(1, exc.line or 1)
            column = max(1, exc.column or 1)
            index = document.translate_row_col_to_index(line - 1, column - 1)
            raise ValidationError(
                cursor_position=index, message=f"line {line}, column {column}: {exc.message}"
            ) from None

    def _validate_command(self, text: str) -> None:
        if self.known_commands is None:
            return
        name = text.split()[0]
        if name not in self.known_commands:
            from ablauf_lang.repl.commands import find_command

            try:
                find_command(name)
            except AblaufError as exc:
                start = len(text) - len(text.lstrip())
                raise ValidationError(
                    cursor_position=start + len(name), message=exc.message
                ) from None
