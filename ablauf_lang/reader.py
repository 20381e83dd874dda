"""Reader: source text -> data forms, each with its source position.

Pipeline: the LALR parser (built once from `grammar/ablauf.lark`) turns the text into a
Lark tree; `_ToForms`, a non-recursive transformer, turns the tree into forms, so deep
nesting never hits RecursionError. Lark's errors become `AblaufSyntaxError`s here and
nowhere else, each with a message naming the case (unclosed bracket, stray closer...).
"""

from __future__ import annotations

import functools
import re
from typing import Any

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.exceptions import VisitError
from lark.tree import Meta
from lark.visitors import Transformer_NonRecursive, v_args

from ablauf_lang.errors import AblaufSyntaxError, Span
from ablauf_lang.forms import Form, Keyword, List, Map, Symbol, Vector

__all__ = ["Forms", "parser", "read", "read_one"]

# ---------------------------------------------------------------------------------------
# Types


class Forms(tuple[Form, ...]):
    """The top-level forms of a program; `spans` holds where each one starts.

    Scalars carry no span of their own, so a compile error at a top-level `42` finds
    its position here.
    """

    spans: tuple[Span | None, ...]

    def __new__(cls, forms: tuple[Form, ...] = (), spans: tuple[Span | None, ...] = ()) -> Forms:
        self = super().__new__(cls, forms)
        self.spans = spans
        return self

    def span_of(self, index: int) -> Span | None:
        """Return the span of form `index`, if known."""
        if 0 <= index < len(self.spans):
            return self.spans[index]
        return getattr(self[index], "span", None) if 0 <= index < len(self) else None


# A transformed element: the form and its span (scalars have no span of their own).
_Item = tuple[Form, Span | None]

# What `#_ form` leaves behind; containers drop it.
_DISCARDED: Any = object()

_CONSTANTS: dict[str, Any] = {"nil": None, "true": True, "false": False}

_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r"}

_OPENERS = {"LPAR": ("(", ")", "list"), "LSQB": ("[", "]", "vector"), "LBRACE": ("{", "}", "map")}
_CLOSERS = {"RPAR": ")", "RSQB": "]", "RBRACE": "}"}

# ---------------------------------------------------------------------------------------
# Parser


@functools.cache
def parser() -> Lark:
    """Return the LALR parser for ablauf's data syntax (built once)."""
    return Lark.open_from_package(
        "ablauf_lang.grammar", "ablauf.lark", parser="lalr", propagate_positions=True
    )


# ---------------------------------------------------------------------------------------
# Tree -> forms


class _ToForms(Transformer_NonRecursive[Token, Any]):
    """Turn the parse tree into forms bottom-up, without recursion."""

    def __init__(self, source: str, filename: str | None) -> None:
        super().__init__(visit_tokens=True)
        self.source = source
        self.filename = filename

    def _span(self, meta: Meta | Token) -> Span:
        return Span(meta.line, meta.column, meta.end_line, meta.end_column, self.filename)

    def _error(self, message: str, line: int | None, column: int | None) -> AblaufSyntaxError:
        return AblaufSyntaxError(
            message, filename=self.filename, line=line, column=column, source=self.source
        )

    # -- atoms: each returns (form, span) --

    def INT(self, tok: Token) -> _Item:
        return int(tok), self._span(tok)

    def FLOAT(self, tok: Token) -> _Item:
        return float(tok), self._span(tok)

    def STRING(self, tok: Token) -> _Item:
        return self._unescape(tok), self._span(tok)

    def KEYWORD(self, tok: Token) -> _Item:
        span = self._span(tok)
        return Keyword(tok[1:], span), span

    def SYMBOL(self, tok: Token) -> _Item:
        span = self._span(tok)
        name = str(tok)
        if name in _CONSTANTS:
            return _CONSTANTS[name], span
        return Symbol(name, span), span

    def _unescape(self, tok: Token) -> str:
        """Return the string a STRING token denotes; raise at the first bad escape."""
        text = tok[1:-1]
        if "\\" not in text:
            return text
        out: list[str] = []
        i = 0
        while True:
            j = text.find("\\", i)
            if j < 0:
                out.append(text[i:])
                return "".join(out)
            out.append(text[i:j])
            code = text[j + 1]  # the grammar guarantees a character after a backslash
            if code in _ESCAPES:
                out.append(_ESCAPES[code])
                i = j + 2
            elif code == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", text[j + 2 : j + 6]):
                out.append(chr(int(text[j + 2 : j + 6], 16)))
                i = j + 6
            else:
                line, column = _position_in(tok, 1 + j)
                shown = text[j : j + 6] if code == "u" else text[j : j + 2]
                raise self._error(
                    f"bad escape {shown!r} in string: use \\\" \\\\ \\n \\t \\r or \\uXXXX",
                    line,
                    column,
                )

    # -- containers --

    @v_args(meta=True)
    def list(self, meta: Meta, children: list[Any]) -> _Item:
        forms, spans = _kept(children)
        span = self._span(meta)
        return List(forms, span, spans), span

    @v_args(meta=True)
    def vector(self, meta: Meta, children: list[Any]) -> _Item:
        forms, spans = _kept(children)
        span = self._span(meta)
        return Vector(forms, span, spans), span

    @v_args(meta=True)
    def map(self, meta: Meta, children: list[Any]) -> _Item:
        forms, spans = _kept(children)
        if len(forms) % 2:
            last = spans[-1]
            raise self._error(
                "odd number of forms in map: this key has no value",
                last.line if last else meta.line,
                last.column if last else meta.column,
            )
        span = self._span(meta)
        pairs = tuple(zip(forms[::2], forms[1::2], strict=True))
        return Map(pairs, span, spans), span

    def discard(self, children: list[Any]) -> Any:
        return _DISCARDED

    def start(self, children: list[Any]) -> Forms:
        forms, spans = _kept(children)
        return Forms(forms, spans)


def _kept(children: list[Any]) -> tuple[tuple[Form, ...], tuple[Span | None, ...]]:
    """Split transformed children into forms and spans, leaving out discarded ones."""
    kept = [c for c in children if c is not _DISCARDED]
    return tuple(f for f, _ in kept), tuple(s for _, s in kept)


def _position_in(tok: Token, offset: int) -> tuple[int, int]:
    """Return the 1-based line and column of character `offset` inside token `tok`."""
    before = tok[:offset]
    newlines = before.count("\n")
    if newlines == 0:
        return tok.line, tok.column + offset
    return tok.line + newlines, offset - before.rfind("\n")


# ---------------------------------------------------------------------------------------
# Public API


def read(source: str, filename: str | None = None) -> Forms:
    """Read every top-level form of `source`; raise `AblaufSyntaxError` on bad input."""
    try:
        tree = parser().parse(source)
    except UnexpectedInput as exc:
        raise _syntax_error(exc, source, filename) from None
    try:
        forms: Forms = _ToForms(source, filename).transform(tree)
    except VisitError as exc:
        if isinstance(exc.orig_exc, AblaufSyntaxError):
            raise exc.orig_exc from None
        raise
    return forms


def read_one(source: str, filename: str | None = None) -> Form:
    """Read the one form `source` holds; raise `AblaufSyntaxError` for none or several."""
    forms = read(source, filename)
    if len(forms) == 1:
        return forms[0]
    if not forms:
        raise AblaufSyntaxError(
            "expected a form, found none",
            filename=filename,
            line=1,
            column=1,
            source=source,
        )
    second = forms.span_of(1)
    raise AblaufSyntaxError(
        f"expected one form, found {len(forms)}",
        filename=filename,
        line=second.line if second else None,
        column=second.column if second else None,
        source=source,
    )


# ---------------------------------------------------------------------------------------
# Errors: name the case Lark ran into


def _syntax_error(exc: UnexpectedInput, source: str, filename: str | None) -> AblaufSyntaxError:
    """Turn a Lark parse error into an `AblaufSyntaxError` that names the problem."""

    def error(message: str, line: int, column: int, incomplete: bool = False) -> AblaufSyntaxError:
        return AblaufSyntaxError(
            message,
            incomplete=incomplete,
            filename=filename,
            line=line,
            column=column,
            source=source,
        )

    if isinstance(exc, UnexpectedCharacters):
        return error(*_bad_character(source, exc.pos_in_stream, exc.line, exc.column))

    at_end = isinstance(exc, UnexpectedEOF) or (
        isinstance(exc, UnexpectedToken) and exc.token.type == "$END"
    )
    stop = len(source) if at_end else exc.token.start_pos  # type: ignore[union-attr]
    openers, discards = _scan(source, stop)

    if discards:
        found = "the end of input" if at_end else repr(str(exc.token))  # type: ignore[union-attr]
        hash_ = discards[-1]
        return error(
            f"'#_' must be followed by a form to discard, found {found}",
            hash_.line,
            hash_.column,
            incomplete=at_end,
        )
    if at_end:
        if openers:
            opener = openers[-1]
            _, closer, kind = _OPENERS[opener.type]
            return error(
                f"unclosed {kind}: '{opener}' opened at line {opener.line}, column "
                f"{opener.column} is never closed (expected '{closer}')",
                opener.line,
                opener.column,
                incomplete=True,
            )
        line, column = _end_position(source)
        return error("unexpected end of input", line, column, incomplete=True)

    token: Token = exc.token  # type: ignore[union-attr]
    if token.type in _CLOSERS and not openers:
        return error(
            f"stray closing '{token}' with no open bracket to close", token.line, token.column
        )
    if token.type in _CLOSERS:
        opener = openers[-1]
        _, closer, kind = _OPENERS[opener.type]
        return error(
            f"mismatched bracket: '{token}' cannot close the {kind} '{opener}' opened at "
            f"line {opener.line}, column {opener.column} (expected '{closer}')",
            token.line,
            token.column,
        )
    return error(f"unexpected {str(token)!r}", token.line, token.column)


def _scan(source: str, stop: int) -> tuple[list[Token], list[Token]]:
    """Lex `source` up to offset `stop`: the brackets open there, and the `#_`s still
    waiting for a form at the innermost level."""
    openers: list[Token] = []
    # One list of waiting `#_` tokens per nesting level; a finished form satisfies the
    # latest one, so `#_ #_ a b` drops a and b.
    waiting: list[list[Token]] = [[]]
    for tok in parser().lex(source[:stop], dont_ignore=True):
        kind = tok.type
        if kind in ("WHITESPACE", "COMMENT"):
            continue
        if kind == "_DISCARD":
            waiting[-1].append(tok)
        elif kind in _OPENERS:
            openers.append(tok)
            waiting.append([])
        else:
            if kind in _CLOSERS and openers:
                openers.pop()
                waiting.pop()
            if waiting[-1]:
                waiting[-1].pop()
    return openers, waiting[-1]


_DELIMITERS = re.compile(r'[\s,()\[\]{}";]')


def _bad_character(source: str, pos: int, line: int, column: int) -> tuple[str, int, int, bool]:
    """Name the problem at a character no token can start with."""
    char = source[pos]
    end = _DELIMITERS.search(source, pos + 1)
    word = source[pos : end.start() if end else len(source)]
    if char == '"':
        return "unterminated string: no closing '\"'", line, column, True
    if re.match(r"[+-]?\.?\d", word):
        return f"invalid number {word!r}", line, column, False
    if char == ":":
        return f"invalid keyword {word!r}", line, column, False
    if char == "#":
        return (
            f"unsupported dispatch {word[:2]!r}: only '#_' (discard the next form) exists",
            line,
            column,
            False,
        )
    return f"unexpected character {char!r}", line, column, False


def _end_position(source: str) -> tuple[int, int]:
    """Return the line and column just after the last character of `source`."""
    line = source.count("\n") + 1
    return line, len(source) - (source.rfind("\n") + 1) + 1
