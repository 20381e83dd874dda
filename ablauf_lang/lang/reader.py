"""Reader: source text -> data forms, each with its source position.

Pipeline: the LALR parser (built once from `grammar/ablauf.lark`) reads the tokens of
`_Lexer` and builds the forms as it reduces, with the transformer `_Forms` (no parse tree:
Lark's `transformer=` option); its stack is its own, so deep nesting never hits
RecursionError. Lark's errors become `AblaufSyntaxError`s here
and nowhere else, each with a message naming the case (unclosed bracket, stray closer...).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import re
import threading
from collections.abc import Iterator
from typing import Any, cast

from lark import Lark, Token, Transformer
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken
from lark.lexer import BasicLexer, LexerState

from ablauf_lang.errors import AblaufSyntaxError, Span
from ablauf_lang.lang.forms import Form, List, Map, Symbol, Vector
from ablauf_lang.values import Keyword

__all__ = ["MAX_INT_DIGITS", "Forms", "decode_source", "gc_paused", "parser", "read", "read_one"]

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


# What `#_ form` leaves behind; containers drop it.
_DISCARDED: Any = object()

_CONSTANTS: dict[str, Any] = {"nil": None, "true": True, "false": False}

_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r"}

_OPENERS = {"LPAR": ("(", ")", "list"), "LSQB": ("[", "]", "vector"), "LBRACE": ("{", "}", "map")}
_CLOSERS = {"RPAR": ")", "RSQB": "]", "RBRACE": "}"}
_BRACKETS = frozenset(_OPENERS) | frozenset(_CLOSERS)

_HEX4 = re.compile(r"[0-9a-fA-F]{4}")


def _span(start: Token, end: Token, filename: str | None) -> Span:
    """Return the span from the start of token `start` to the end of token `end`."""
    return Span(start.line or 0, start.column or 0, end.end_line, end.end_column, filename)


# ---------------------------------------------------------------------------------------
# Parser


class _Atoms(Token):
    """A run of scalars between brackets, given to the parser as one token (`ATOMS`): the
    parser's work is per token, and most of a program's tokens are scalars. `forms`
    holds each scalar's form and span, made as it was lexed."""

    __slots__ = ("forms",)
    forms: list[tuple[Form, Span]]


class _Made(Token):
    """A container of scalars only, made whole by the lexer and given to the parser as one
    token (`FORM`): most containers of a program hold no other (a call's arguments, a
    payload's map, a vector of names), and each bracket is a token less for the parser."""

    __slots__ = ("form",)
    form: List | Vector | Map


_SCALARS = frozenset({"INT", "FLOAT", "STRING", "KEYWORD", "SYMBOL"})
_OPEN = frozenset({"LPAR", "LSQB", "LBRACE"})
_CLOSE = frozenset({"RPAR", "RSQB", "RBRACE"})
_CLOSING = {"LPAR": "RPAR", "LSQB": "RSQB", "LBRACE": "RBRACE"}


class _Lexer(BasicLexer):
    """Lark's basic lexer with its scanner (the grammar's terminals in one regex, as Lark
    compiles them) run in a tighter loop: a token's line and column are counted from the
    newlines of the text passed over. For the parser, a run of scalars becomes one `ATOMS`
    token (`_atoms`); lexing alone (`parser_state` None) gives every token, the same as
    Lark's own lexer (tests compare them, every position included)."""

    __future_interface__ = 2
    _skip: re.Pattern[str] | None = None

    def _skipping(self, scanner: Any) -> re.Pattern[str]:
        """Lark's scanner regex with what is ignored allowed before a token, skipped."""
        if self._skip is None:
            ignored = [t for t in self.terminals if t.name in self.ignore_types]
            skip = "|".join(t.pattern.to_regexp() for t in ignored)
            mre = scanner._mres[0]
            self._skip = re.compile(f"(?:{skip})*(?:{mre.pattern})?", mre.flags)
        return self._skip

    def lex(self, state: LexerState, parser_state: Any) -> Iterator[Token]:
        scanner = self.scanner
        if len(scanner._mres) != 1 or self.callback:  # not this grammar's shape: Lark's own
            yield from super().lex(state, parser_state)
            return
        yield from self._tokens(scanner, state, parser_state, parser_state is not None)

    def _tokens(
        self, scanner: Any, state: LexerState, parser_state: Any, group: bool
    ) -> Iterator[Token]:
        """The tokens; with `group`, each run of scalars as one `ATOMS` token whose forms
        are made here (no Token for them). A scalar that a `#_` waits for is given alone
        (a discard takes exactly one form): the `#_`s waiting are counted per nesting
        level, as the parser will pair them."""
        text, end = state.text.text, state.text.end
        pos = state.line_ctr.char_pos
        line, line_start = state.line_ctr.line, pos - state.line_ctr.column + 1
        ignore, newline = self.ignore_types, self.newline_types
        # Grouping: what is ignored (whitespace, comments) is skipped by the same match
        # as the token after it, one match a token instead of two.
        match = (self._skipping(scanner) if group else scanner._mres[0]).match
        filename = _reading.filename if group else None
        run: list[tuple[Form, Span]] = []
        run_at = (0, 0, 0)
        opened: Token | None = None  # the innermost open bracket, while only scalars follow
        waiting = [0]  # per open bracket: the `#_`s still waiting for their form
        while pos < end:
            m = match(text, pos, end)
            if m is None or m.lastgroup is None:
                if m is not None and m.end() > pos:  # grouping skipped what is ignored
                    if (count := text.count("\n", pos, m.end())) > 0:
                        line += count
                        line_start = text.rfind("\n", pos, m.end()) + 1
                    pos = m.end()
                    if pos >= end:
                        break  # only what is ignored was left
                raise UnexpectedCharacters(  # type: ignore[no-untyped-call]
                    text,
                    pos,
                    line,
                    pos - line_start + 1,
                    allowed=scanner.allowed_types - ignore,
                    state=parser_state,
                    terminals_by_name=self.terminals_by_name,
                )
            kind, stop = m.lastgroup, m.end()
            if group and (start := m.start(kind)) > pos:
                if (count := text.count("\n", pos, start)) > 0:
                    line += count
                    line_start = text.rfind("\n", pos, start) + 1
                pos = start
            column = pos - line_start + 1
            end_line, end_column = line, column + stop - pos
            line_after: tuple[int, int] | None = None
            if kind in newline and (count := text.count("\n", pos, stop)):
                end_start = text.rfind("\n", pos, stop) + 1
                end_line, end_column = line + count, stop - end_start + 1
                line_after = (end_line, end_start)
            if kind in ignore:
                pass
            elif not group:
                yield Token(kind, m.group(kind), pos, line, column, end_line, end_column, stop)
            elif kind in _SCALARS and not waiting[-1]:
                if not run:
                    run_at = (pos, line, column)
                span = Span(line, column, end_line, end_column, filename)
                form = _scalar_form(kind, m.group(kind), span, pos, stop)
                run.append((form, span))
            else:
                tok = Token(kind, m.group(kind), pos, line, column, end_line, end_column, stop)
                if opened is not None and kind == _CLOSING[opened.type]:
                    # The innermost bracket held scalars only: the container made here.
                    yield _made(opened, run, tok, filename)
                    opened, run = None, []
                    waiting.pop()
                    if waiting[-1]:
                        waiting[-1] -= 1  # the container closed is what a `#_` waited for
                else:
                    if opened is not None:
                        yield opened  # it holds a container or a `#_`: the parser's
                        opened = None
                    if run:
                        yield _run(run_at, run)
                        run = []
                    if kind in _SCALARS:
                        waiting[-1] -= 1  # the form a `#_` waited for: given alone
                    elif kind == "_DISCARD":
                        waiting[-1] += 1
                    elif kind in _OPEN:
                        waiting.append(0)
                    elif kind in _CLOSE and len(waiting) > 1:
                        waiting.pop()
                        if waiting[-1]:
                            waiting[-1] -= 1  # the container closed is what a `#_` waited for
                    if kind in _OPEN:
                        opened = tok  # held back until its content says whose it is
                    else:
                        yield tok
            if line_after is not None:
                line, line_start = line_after
            pos = stop
        if opened is not None:
            yield opened  # never closed: the parser says so
        if run:
            yield _run(run_at, run)


def _run(at: tuple[int, int, int], forms: list[tuple[Form, Span]]) -> Token:
    pos, line, column = at
    tok = _Atoms("ATOMS", "", pos, line, column)
    tok.forms = forms
    return tok


def _made(opened: Token, run: list[tuple[Form, Span]], close: Token, filename: str | None) -> Token:
    """The `FORM` token of a container of scalars only, its form made as the parser's
    transformer would make it."""
    items = tuple(form for form, _ in run)
    spans = tuple(item_span for _, item_span in run)
    tok = _Made("FORM", "", opened.start_pos, opened.line, opened.column)
    tok.form = _container(opened.type, items, _span(opened, close, filename), spans)
    return tok


def _container(
    opener: str, items: tuple[Form, ...], span: Span, spans: tuple[Span | None, ...]
) -> List | Vector | Map:
    """The container an opening bracket (its terminal's name) starts, of these forms."""
    if opener == "LPAR":
        return List(items, span, spans)
    if opener == "LSQB":
        return Vector(items, span, spans)
    return _map(items, span, spans, _reading.source)


def _scalar_form(
    kind: str, value: str, span: Span, pos: int, stop: int, tok: Token | None = None
) -> Form:
    """The form of a scalar: the common cases from its text; the others (escapes, long or
    odd numbers: errors that point inside the token) from its token, checked."""
    if kind == "SYMBOL":
        return _CONSTANTS[value] if value in _CONSTANTS else Symbol(value, span)
    if kind == "KEYWORD":
        return Keyword(value[1:], span)
    if kind == "STRING" and "\\" not in value:
        return value[1:-1]
    if kind == "INT" and len(value) < 19:
        return int(value)
    if tok is None:
        tok = Token(kind, value, pos, span.line, span.column, span.end_line, span.end_column, stop)
    filename, source = _reading.filename, _reading.source
    if kind == "INT":
        return _int(tok, source, filename)
    if kind == "FLOAT":
        return _float(tok, source, filename)
    return _unescape(tok, source, filename)


# The file and text being read, for the forms' positions and the errors' carets (the
# parser, and so the transformer, is built once and shared by threads).
_reading = threading.local()

_Children = list[Any]  # a rule's children: tokens, and the forms already made


class _Forms(Transformer[Token, Any]):
    """Builds the forms while the parser reduces (no parse tree is built): a container
    gets its elements already made, its brackets giving its span. The LALR parser keeps
    its own stack, so deep nesting never recurses."""

    def start(self, children: _Children) -> Forms:
        items, spans = _elements(children, 0, len(children))
        return Forms(items, spans)

    def _made(self, children: _Children) -> Any:
        span = _span(children[0], children[-1], _reading.filename)
        items, spans = _elements(children, 1, len(children) - 1)
        return _container(children[0].type, items, span, spans)

    list = vector = map = _made  # each from its brackets and the forms between them

    def discard(self, children: _Children) -> Any:
        # Its form was read (and checked) like any other; the container drops it.
        last = children[-1]
        if type(last) is Token:
            _scalar(last)
        return _DISCARDED


def _elements(
    children: list[Any], start: int, stop: int
) -> tuple[tuple[Form, ...], tuple[Span | None, ...]]:
    """The forms among `children[start:stop]` and their spans, discarded ones left out."""
    items: list[Form] = []
    spans: list[Span | None] = []
    for i in range(start, stop):
        child = children[i]
        kind = type(child)
        if kind is _Atoms:
            for form, span in child.forms:
                items.append(form)
                spans.append(span)
            continue
        if kind is _Made:
            form = child.form
            items.append(form)
            spans.append(form.span)
            continue
        if kind is Token:
            form, span = _scalar(child)
        elif child is _DISCARDED:
            continue
        else:
            form, span = child, child.span
        items.append(form)
        spans.append(span)
    return tuple(items), tuple(spans)


def _scalar(tok: Token) -> tuple[Form, Span]:
    """The form a scalar token denotes, and its span."""
    span = _span(tok, tok, _reading.filename)
    return _scalar_form(tok.type, str(tok), span, tok.start_pos or 0, tok.end_pos or 0, tok), span


@functools.cache
def parser() -> Lark:
    """Return the LALR parser for ablauf's data syntax, built once; it returns the forms
    (`Forms`) itself."""
    # No propagate_positions: containers take their span from their bracket tokens.
    return Lark.open_from_package(
        "ablauf_lang.grammar",
        "ablauf.lark",
        parser="lalr",
        lexer=_Lexer,
        transformer=_Forms(),
    )


def _map(
    items: tuple[Form, ...], span: Span, item_spans: tuple[Span | None, ...], source: str
) -> Map:
    """Pair up a map's forms; an odd number of them is an error at the lone key."""
    if len(items) % 2:
        at = item_spans[-1] or span
        raise AblaufSyntaxError(
            "odd number of forms in map: this key has no value",
            filename=span.filename,
            line=at.line,
            column=at.column,
            source=source,
        )
    return Map(tuple(zip(items[::2], items[1::2], strict=True)), span, item_spans)


# The most digits an integer literal may have: what Python converts to and from text.
MAX_INT_DIGITS = 4300


def _int(tok: Token, source: str, filename: str | None) -> int:
    """The integer an INT token denotes; a located error past MAX_INT_DIGITS digits."""
    digits = len(tok) - (tok[0] in "+-")
    if digits <= MAX_INT_DIGITS:
        try:
            return int(tok)
        except ValueError:  # the interpreter's own limit may be lower
            pass
    raise AblaufSyntaxError(
        f"integer literal too large: {digits:,} digits (the limit is {MAX_INT_DIGITS:,})",
        filename=filename,
        line=tok.line,
        column=tok.column,
        source=source,
    )


def _float(tok: Token, source: str, filename: str | None) -> float:
    """The float a FLOAT token denotes; a located error when it is out of range."""
    value = float(tok)
    if math.isinf(value):
        shown = tok if len(tok) <= 40 else tok[:37] + "..."
        raise AblaufSyntaxError(
            f"float literal {shown} is out of range (the largest is about 1.8e308)",
            filename=filename,
            line=tok.line,
            column=tok.column,
            source=source,
        )
    return value


def _unescape(tok: Token, source: str, filename: str | None) -> str:
    """Return the string a STRING token denotes; raise at the first bad escape."""
    text = tok[1:-1]
    if "\\" not in text:
        return text
    out: list[str] = []
    i = 0
    while (j := text.find("\\", i)) >= 0:
        out.append(text[i:j])
        code = text[j + 1]  # the grammar guarantees a character after a backslash
        if code in _ESCAPES:
            out.append(_ESCAPES[code])
            i = j + 2
        elif code == "u" and _HEX4.fullmatch(text, j + 2, j + 6):
            out.append(chr(int(text[j + 2 : j + 6], 16)))
            i = j + 6
        else:
            line, column = _position_in(tok, 1 + j)
            shown = text[j : j + 6] if code == "u" else text[j : j + 2]
            raise AblaufSyntaxError(
                f'bad escape {shown!r} in string: use \\" \\\\ \\n \\t \\r or \\uXXXX',
                filename=filename,
                line=line,
                column=column,
                source=source,
            )
    out.append(text[i:])
    return "".join(out)


def _position_in(tok: Token, offset: int) -> tuple[int, int]:
    """Return the 1-based line and column of character `offset` inside token `tok`."""
    before = tok[:offset]
    newlines = before.count("\n")
    line, column = tok.line or 0, tok.column or 0
    if newlines == 0:
        return line, column + offset
    return line + newlines, offset - before.rfind("\n")


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for a while (and resume it if it was on)."""
    # Reading (or compiling) allocates many objects and no cycles; collections triggered
    # meanwhile walk the growing heap again and again and cost a third of the time or more.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# ---------------------------------------------------------------------------------------
# Public API


def read(source: str, filename: str | None = None) -> Forms:
    """Read every top-level form of `source`; raise `AblaufSyntaxError` on bad input.

    A leading byte order mark (U+FEFF) is skipped; positions count from after it.
    """
    source = strip_bom(source)
    _reading.filename, _reading.source = filename, source
    with gc_paused():
        try:
            forms = cast(Forms, parser().parse(source))
        except UnexpectedInput as exc:
            raise _syntax_error(exc, source, filename) from None
        finally:
            _reading.filename = _reading.source = None
        return forms


def strip_bom(source: str) -> str:
    """`source` without a leading byte order mark (U+FEFF), which editors may write."""
    return source[1:] if source.startswith("\ufeff") else source


def decode_source(data: bytes, filename: str | None = None) -> str:
    """Decode a program file's bytes (UTF-8, a byte order mark allowed).

    Invalid UTF-8 is an `AblaufSyntaxError` naming the file, the line and column, and the
    byte offset of the first bad byte.
    """
    try:
        return strip_bom(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        start = exc.start
        line = data.count(b"\n", 0, start) + 1
        line_start = data.rfind(b"\n", 0, start) + 1
        column = len(data[line_start:start].decode("utf-8", errors="replace")) + 1
        text = strip_bom(data.decode("utf-8", errors="replace"))
        if line == 1 and data.startswith(b"\xef\xbb\xbf"):
            column -= 1
        raise AblaufSyntaxError(
            f"not UTF-8 text: invalid byte 0x{data[start]:02x} at byte offset {start}",
            filename=filename,
            line=line,
            column=column,
            source=text,
        ) from None


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

    def error(
        message: str, line: int | None, column: int | None, incomplete: bool = False
    ) -> AblaufSyntaxError:
        return AblaufSyntaxError(
            message,
            incomplete=incomplete,
            filename=filename,
            line=line,
            column=column,
            source=source,
        )

    if isinstance(exc, UnexpectedCharacters):
        message, incomplete = _bad_character(source, exc.pos_in_stream or 0)
        return error(message, exc.line, exc.column, incomplete)

    # Under LALR a missing closer shows up as an unexpected `$END` token.
    token = exc.token if isinstance(exc, UnexpectedToken) else None
    at_end = token is None or token.type == "$END"
    stop = len(source) if at_end or token is None else (token.start_pos or 0)
    openers, discards = _scan(source, stop)
    # The innermost bracket still open where the parser stopped, if any.
    opener = openers[-1] if openers else None
    _, closer, kind = _OPENERS[opener.type] if opener is not None else ("", "", "")

    if discards:
        found = "the end of input" if at_end else repr(str(token))
        hash_ = discards[-1]
        return error(
            f"'#_' must be followed by a form to discard, found {found}",
            hash_.line,
            hash_.column,
            incomplete=at_end,
        )
    if at_end or token is None:
        if opener is not None:
            return error(
                f"unclosed {kind}: '{opener}' opened at line {opener.line}, column "
                f"{opener.column} is never closed (expected '{closer}')",
                opener.line,
                opener.column,
                incomplete=True,
            )
        line, column = _end_position(source)
        return error("unexpected end of input", line, column, incomplete=True)

    if token.type in _CLOSERS and opener is None:
        return error(
            f"stray closing '{token}' with no open bracket to close", token.line, token.column
        )
    if token.type in _CLOSERS:
        assert opener is not None
        return error(
            f"mismatched bracket: '{token}' cannot close the {kind} '{opener}' opened at "
            f"line {opener.line}, column {opener.column} (expected '{closer}')",
            token.line,
            token.column,
        )
    return error(f"unexpected {str(token)!r}", token.line, token.column)


class _Tok(str):
    """A bracket or `#_` found by `_scan`: its text, terminal name and 1-based position."""

    type: str
    line: int
    column: int

    def __new__(cls, text: str, kind: str, line: int, column: int) -> _Tok:
        self = super().__new__(cls, text)
        self.type, self.line, self.column = kind, line, column
        return self


# What `_scan` tells apart (the grammar's terminals, lumped): strings and comments are
# skipped whole so their brackets do not count; any other run of non-delimiters is a form.
_SCAN = re.compile(
    r'(?P<skip>[\s,]+|;[^\n]*|"[^"\\]*(?:\\[\s\S][^"\\]*)*")'
    r"|(?P<discard>#_)|(?P<open>[(\[{])|(?P<close>[)\]}])"
    r'|(?P<form>[^\s,()\[\]{}";]+|.)',
    re.S,
)
_KINDS = {"(": "LPAR", "[": "LSQB", "{": "LBRACE", ")": "RPAR", "]": "RSQB", "}": "RBRACE"}


def _scan(source: str, stop: int) -> tuple[list[_Tok], list[_Tok]]:
    """Scan `source` up to offset `stop`: the brackets open there, and the `#_`s still
    waiting for a form at the innermost level."""
    openers: list[_Tok] = []
    # One list of waiting `#_` tokens per nesting level; a finished form satisfies the
    # latest one, so `#_ #_ a b` drops a and b.
    waiting: list[list[_Tok]] = [[]]
    line, line_start = 1, 0
    for match in _SCAN.finditer(source, 0, stop):
        kind = match.lastgroup
        start = match.start()
        if kind == "skip":
            continue
        newlines = source.count("\n", line_start, start)
        if newlines:
            line += newlines
            line_start = source.rfind("\n", 0, start) + 1
        column = start - line_start + 1
        text = match.group()
        if kind == "discard":
            waiting[-1].append(_Tok(text, "_DISCARD", line, column))
        elif kind == "open":
            openers.append(_Tok(text, _KINDS[text], line, column))
            waiting.append([])
        else:
            if kind == "close" and openers:
                openers.pop()
                waiting.pop()
            if waiting[-1]:
                waiting[-1].pop()
    return openers, waiting[-1]


_DELIMITERS = re.compile(r'[\s,()\[\]{}";]')


def _bad_character(source: str, pos: int) -> tuple[str, bool]:
    """Name the problem at a character no token can start with (and if it is incomplete)."""
    char = source[pos]
    end = _DELIMITERS.search(source, pos + 1)
    word = source[pos : end.start() if end else len(source)]
    if char == '"':
        return "unterminated string: no closing '\"'", True
    if re.match(r"[+-]?\.?[0-9]", word):
        return f"invalid number {word!r}", False
    if char == ":":
        return f"invalid keyword {word!r}", False
    if char == "#":
        dispatch = source[pos : pos + 2]
        return f"unsupported dispatch {dispatch!r}: only '#_' (discard the next form) exists", False
    return f"unexpected character {char!r}", False


def _end_position(source: str) -> tuple[int, int]:
    """Return the line and column just after the last character of `source`."""
    line = source.count("\n") + 1
    return line, len(source) - (source.rfind("\n") + 1) + 1
