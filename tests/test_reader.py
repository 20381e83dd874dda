"""Reader: source text -> forms, positions, and named syntax errors."""

from __future__ import annotations

import gc
import importlib.resources
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lark import Lark
from lark.exceptions import UnexpectedCharacters, UnexpectedInput
from lark.lexer import LexerThread

from ablauf_lang.errors import AblaufSyntaxError, Span
from ablauf_lang.lang import reader
from ablauf_lang.lang.forms import List, Map, Symbol, Vector
from ablauf_lang.lang.reader import MAX_INT_DIGITS, Forms, decode_source, parser, read, read_one
from ablauf_lang.values import Keyword
from tests.strategies import same_form

K = Keyword
S = Symbol


def L(*items: Any) -> List:
    return List(items)


def V(*items: Any) -> Vector:
    return Vector(items)


def M(*flat: Any) -> Map:
    return Map(tuple(zip(flat[::2], flat[1::2], strict=True)))


# ---------------------------------------------------------------------------------------
# The grammar


def test_grammar_ships_as_package_data() -> None:
    text = importlib.resources.files("ablauf_lang.grammar").joinpath("ablauf.lark").read_text()
    assert text.startswith("//")
    assert "start:" in text
    assert "%ignore COMMENT" in text


def test_grammar_has_no_conflicts_or_terminal_collisions() -> None:
    pytest.importorskip("interegular")
    # strict: LALR conflicts and regex collisions between terminals are errors.
    strict = Lark.open_from_package(
        "ablauf_lang.grammar", "ablauf.lark", parser="lalr", lexer="contextual", strict=True
    )
    assert strict.parse("(do!! -1 - -x)") is not None


def test_parser_is_built_once() -> None:
    assert parser() is parser()
    assert parser().options.parser == "lalr"
    assert parser().options.lexer is reader._Lexer


def _tokens(tokens: Any) -> list[tuple[Any, ...]]:
    """The tokens with every position, up to the first character no token takes."""
    out: list[tuple[Any, ...]] = []
    try:
        for t in tokens:
            out.append(
                (t.type, str(t), t.start_pos, t.line, t.column, t.end_line, t.end_column, t.end_pos)
            )
    except UnexpectedCharacters as exc:
        out.append(("error", exc.pos_in_stream, exc.line, exc.column))
    return out


LARKS_OWN = Lark.open_from_package(
    "ablauf_lang.grammar", "ablauf.lark", parser="lalr", lexer="basic"
)


def readers_lexing(text: str) -> Any:
    """The reader's own lexer (the parser's), lexing alone: every token."""
    lexer = parser().parser.lexer
    assert isinstance(lexer, reader._Lexer)
    return LexerThread.from_text(lexer, text).lex(None)


class _Ungrouped(reader._Lexer):
    """The reader's lexer giving the parser every scalar as its own token."""

    def lex(self, state: Any, parser_state: Any) -> Any:
        return self._tokens(self.scanner, state, parser_state, False)


UNGROUPED = Lark.open_from_package(
    "ablauf_lang.grammar",
    "ablauf.lark",
    parser="lalr",
    lexer=_Ungrouped,
    transformer=reader._Forms(),
)


def read_ungrouped(text: str, filename: str) -> Any:
    reader._reading.filename, reader._reading.source = filename, text
    try:
        return UNGROUPED.parse(text)
    finally:
        reader._reading.filename = reader._reading.source = None


def spanned(form: Any) -> Any:
    """A form with every span in it (forms compare without their spans)."""
    if isinstance(form, (List, Vector)):
        return (type(form).__name__, form.span, form.item_spans, [spanned(x) for x in form.items])
    if isinstance(form, Map):
        flat = [spanned(x) for pair in form.pairs for x in pair]
        return ("Map", form.span, form.item_spans, flat)
    return (type(form).__name__, form, getattr(form, "span", None))


SOUP = st.lists(
    st.sampled_from(
        [
            "(",
            ")",
            "[",
            "]",
            "{",
            "}",
            "#_",
            " ",
            "\n",
            ",",
            "; c\n",
            "\r\n",
            "\t",
            "a",
            "-1",
            "2.5e3",
            ":k/w",
            '"s"',
            '"two\nlines"',
            '"\\n"',
            '"\\q"',
            "nil",
            "x!!",
            "é",
            "9" * 30,
            "1e999",
            "-",
        ]
    ),
    max_size=40,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(SOUP)
def test_the_readers_lexer_makes_larks_tokens(text: str) -> None:
    assert _tokens(readers_lexing(text)) == _tokens(LARKS_OWN.lex(text))


def _outcome(read_it: Any, text: str) -> Any:
    try:
        forms = read_it(text, "s.abl")
    except AblaufSyntaxError as exc:
        return ("error", str(exc))
    except UnexpectedInput as exc:  # the ungrouped parser's own (read names them)
        return ("error", type(exc).__name__)
    return ([spanned(f) for f in forms], forms.spans)


@settings(max_examples=400, deadline=None)
@given(SOUP)
def test_runs_of_scalars_read_as_every_scalar_alone_does(text: str) -> None:
    # The parser gets a run of scalars as one token (and a discarded one alone); what is
    # read, every span included, is what reading each scalar as its own token gives.
    got = _outcome(read, text)
    want = _outcome(read_ungrouped, text)
    if want[0] == "error":
        assert got[0] == "error"
    else:
        assert got == want


def parsers_tokens(text: str) -> list[str]:
    """The token types the reader's lexer gives the parser (runs of scalars and containers
    of scalars only each one token)."""
    lexer = parser().parser.lexer
    reader._reading.filename, reader._reading.source = "s.abl", text
    try:
        return [t.type for t in LexerThread.from_text(lexer, text).lex(object())]
    finally:
        reader._reading.filename = reader._reading.source = None


def test_a_container_of_scalars_only_is_one_token_for_the_parser() -> None:
    text = '(do!! (action!! :a/b {:n 1 :s "x"}) [p q] (f (g 1) #_ (h) 2) (k #_ 3 4) (z)'
    assert parsers_tokens(text) == [
        "LPAR", "ATOMS",
        "LPAR", "ATOMS", "FORM", "RPAR",  # the map is made whole by the lexer
        "FORM",  # [p q]
        "LPAR", "ATOMS", "FORM", "_DISCARD", "FORM", "ATOMS", "RPAR",
        "LPAR", "ATOMS", "_DISCARD", "INT", "ATOMS", "RPAR",  # a `#_` in it: the parser's
        "FORM",  # (z); the first bracket is never closed: the parser reports it
    ]  # fmt: skip
    assert parsers_tokens("(a b") == ["LPAR", "ATOMS"]
    (form,) = read(text + ")")
    assert isinstance(form, List)
    call = form.items[1]
    assert isinstance(call, List)
    payload = call.items[2]
    assert isinstance(payload, Map)
    assert payload.span == Span(1, 22, 1, 35, None)
    assert [s.column for s in payload.item_spans if s is not None] == [23, 26, 28, 31]
    with pytest.raises(AblaufSyntaxError, match="odd number of forms in map") as bad:
        read("(x {:a 1 :b})")
    assert (bad.value.line, bad.value.column) == (1, 10)


EDGE_TOKENS = [
    ("-", "SYMBOL", S("-")),
    ("-1", "INT", -1),
    ("+1", "INT", 1),
    ("-x", "SYMBOL", S("-x")),
    ("+", "SYMBOL", S("+")),
    ("1.5", "FLOAT", 1.5),
    ("-1.5", "FLOAT", -1.5),
    ("1e3", "FLOAT", 1000.0),
    ("a1", "SYMBOL", S("a1")),
    ("do!!", "SYMBOL", S("do!!")),
    (":ns/name", "KEYWORD", K("ns/name")),
    ("ns/name", "SYMBOL", S("ns/name")),
    ("nil-safe", "SYMBOL", S("nil-safe")),
    ("nil", "SYMBOL", None),
    ("#_", "_DISCARD", None),
]


@pytest.mark.parametrize(("source", "token_type", "form"), EDGE_TOKENS)
def test_edge_tokens(source: str, token_type: str, form: Any) -> None:
    tokens = list(parser().lex(source))
    assert [t.type for t in tokens] == [token_type]
    assert str(tokens[0]) == source
    if token_type != "_DISCARD":
        assert same_form(read_one(source), form)


# ---------------------------------------------------------------------------------------
# Forms

READS = [
    # constants and symbols
    ("nil", None),
    ("true", True),
    ("false", False),
    ("nil-safe", S("nil-safe")),
    ("true?", S("true?")),
    ("identity", S("identity")),
    ("my-fn", S("my-fn")),
    ("contains?", S("contains?")),
    ("<=", S("<=")),
    ("/", S("/")),
    ("&", S("&")),
    ("a.b", S("a.b")),
    ("x'", S("x'")),
    ("ñandú", S("ñandú")),
    ("٣", S("٣")),  # numbers are ASCII digits
    # numbers
    ("0", 0),
    ("42", 42),
    ("-7", -7),
    ("007", 7),
    ("123456789012345678901234567890", 123456789012345678901234567890),
    ("0.5", 0.5),
    ("-0.0", -0.0),
    ("1.5e10", 1.5e10),
    ("2E-3", 0.002),
    ("1e+16", 1e16),
    # keywords
    (":name", K("name")),
    (":ns/name", K("ns/name")),
    (":idempotent?", K("idempotent?")),
    (":1", K("1")),
    # strings
    ('""', ""),
    ('"hello"', "hello"),
    ('"a,b;c"', "a,b;c"),
    ('"say \\"hi\\""', 'say "hi"'),
    ('"back\\\\slash"', "back\\slash"),
    ('"a\\nb\\tc\\rd"', "a\nb\tc\rd"),
    ('"\\u00e9\\u00E9"', "éé"),
    ('"\\ud83d"', "\ud83d"),
    ('"two\nlines"', "two\nlines"),
    ('"#_ (not a form)"', "#_ (not a form)"),
    # containers
    ("()", L()),
    ("[]", V()),
    ("{}", M()),
    ("(do!! (log!! :a))", L(S("do!!"), L(S("log!!"), K("a")))),
    ("[1 [2 [3]]]", V(1, V(2, V(3)))),
    ("{:a 1 :b [nil]}", M(K("a"), 1, K("b"), V(None))),
    ('{[1 2] "v" nil true}', M(V(1, 2), "v", None, True)),
    # commas and whitespace separate
    ("[1,2,,3]", V(1, 2, 3)),
    ("[1 , 2]", V(1, 2)),
    ("{:a 1, :b 2}", M(K("a"), 1, K("b"), 2)),
    ("(\n\t a\r\n b )", L(S("a"), S("b"))),
    # forms end at delimiters
    ('[a"b"]', V(S("a"), "b")),
    ("[a(b)]", V(S("a"), L(S("b")))),
    # comments
    ("; comment\n42 ; trailing", 42),
    ("[1 ; two\n 3]", V(1, 3)),
    ('[";" 1]', V(";", 1)),
    # discard
    ("[1 #_ 2 3]", V(1, 3)),
    ("[1 #_2 3]", V(1, 3)),
    ("[#_ (a b [c]) 1]", V(1)),
    ("[#_ #_ 1 2 3]", V(3)),
    ("[#_ [#_ 1 2] 3]", V(3)),
    ("{:a #_ :b 1}", M(K("a"), 1)),
    ("#_ 1 2", 2),
    ("[1 #_ 2]", V(1)),
    ("(#_ ;comment\n x y)", L(S("y"))),
]


@pytest.mark.parametrize(("source", "expected"), READS)
def test_read_one(source: str, expected: Any) -> None:
    assert same_form(read_one(source), expected)


def test_read_returns_every_top_level_form() -> None:
    forms = read("1 :a\n(b) ; done\n")
    assert isinstance(forms, tuple)
    assert isinstance(forms, Forms)
    assert [same_form(f, e) for f, e in zip(forms, [1, K("a"), L(S("b"))], strict=True)]
    assert read("") == ()
    assert read("  ; only a comment\n , ") == ()
    assert read("#_ 1") == ()


def test_keywords_are_strings_without_the_colon() -> None:
    kw = read_one(":sentry/dsn")
    assert isinstance(kw, Keyword)
    assert isinstance(kw, str)
    assert kw == "sentry/dsn"


# ---------------------------------------------------------------------------------------
# Positions


def test_spans_of_containers_and_items() -> None:
    source = '(do!!\n  (log!! "x")\n  [1 :k sym])'
    form = read_one(source, "w.abl")
    assert form.span == Span(1, 1, 3, 14, "w.abl")
    log = form.items[1]
    assert (log.span.line, log.span.column) == (2, 3)
    assert (log.span.end_line, log.span.end_column) == (2, 14)
    assert log.span.filename == "w.abl"
    vec = form.items[2]
    # Scalars carry no span themselves; their container knows where each item is.
    assert [(s.line, s.column) for s in vec.item_spans] == [(3, 4), (3, 6), (3, 9)]
    assert (vec.items[1].span.line, vec.items[1].span.column) == (3, 6)
    assert (vec.items[2].span.line, vec.items[2].span.column) == (3, 9)
    assert [(s.line, s.column) for s in log.item_spans] == [(2, 4), (2, 10)]


def test_spans_skip_discarded_forms_and_cover_maps() -> None:
    form = read_one("{:a #_ x 1\n :b 2}")
    assert [(s.line, s.column) for s in form.item_spans] == [(1, 2), (1, 10), (2, 2), (2, 5)]
    assert form.span_of(2).column == 2


def test_spans_of_top_level_forms() -> None:
    forms = read("42\n  [1]\n:k", "p.abl")
    assert [(s.line, s.column) for s in forms.spans] == [(1, 1), (2, 3), (3, 1)]
    assert forms.span_of(0) == Span(1, 1, 1, 3, "p.abl")


def test_span_after_multiline_string() -> None:
    form = read_one('["a\nbc" x]')
    assert form.span_of(0) == Span(1, 2, 2, 4, None)
    assert (form.items[1].span.line, form.items[1].span.column) == (2, 5)


# ---------------------------------------------------------------------------------------
# Errors

ERRORS = [
    # source, message fragment, line, column, incomplete
    ("(a", "unclosed list: '(' opened at line 1, column 1", 1, 1, True),
    ("(do!!\n  [1 2", "unclosed vector: '[' opened at line 2, column 3", 2, 3, True),
    ("{:a 1", "unclosed map", 1, 1, True),
    ("(a (b)", "expected ')'", 1, 1, True),
    ("a)", "stray closing ')'", 1, 2, False),
    ("(a))", "stray closing ')'", 1, 4, False),
    ("]", "stray closing ']'", 1, 1, False),
    (
        "(a]",
        "mismatched bracket: ']' cannot close the list '(' opened at line 1, column 1",
        1,
        3,
        False,
    ),
    ("[a\n (b})", "expected ')'", 2, 4, False),
    ('"abc', "unterminated string", 1, 1, True),
    ('(log!! "abc)', "unterminated string", 1, 8, True),
    ('"abc\\"', "unterminated string", 1, 1, True),
    ('(a "b\\q")', "bad escape '\\\\q'", 1, 6, False),
    ('"ok\nstill \\x"', "bad escape '\\\\x'", 2, 7, False),
    ('"\\u12"', "bad escape '\\\\u12'", 1, 2, False),
    ('"\\uzzzz"', "bad escape", 1, 2, False),
    ("{:a}", "odd number of forms in map", 1, 2, False),
    ("{:a 1\n :b}", "odd number of forms in map", 2, 2, False),
    ("{:a #_ 1}", "odd number of forms in map", 1, 2, False),
    ("(a #_)", "'#_' must be followed by a form to discard, found ')'", 1, 4, False),
    ("[#_ #_ 1]", "'#_' must be followed by a form", 1, 2, False),
    ("#_", "'#_' must be followed by a form to discard, found the end of input", 1, 1, True),
    ("1 #_ ;c\n", "'#_' must be followed by a form", 1, 3, True),
    ("1abc", "invalid number '1abc'", 1, 1, False),
    ("[1.]", "invalid number '1.'", 1, 2, False),
    (".5", "invalid number '.5'", 1, 1, False),
    ("::a", "invalid keyword '::a'", 1, 1, False),
    (":", "invalid keyword ':'", 1, 1, False),
    ("#{1}", "unsupported dispatch '#{'", 1, 1, False),
    ("(a @b)", "unexpected character '@'", 1, 4, False),
    ("'x", 'unexpected character "\'"', 1, 1, False),
]


@pytest.mark.parametrize(("source", "fragment", "line", "column", "incomplete"), ERRORS)
def test_syntax_errors(
    source: str, fragment: str, line: int, column: int, incomplete: bool
) -> None:
    with pytest.raises(AblaufSyntaxError) as info:
        read(source, "bad.abl")
    err = info.value
    assert fragment in err.message
    assert (err.line, err.column) == (line, column)
    assert err.incomplete is incomplete
    assert err.filename == "bad.abl"
    assert err.source == source


def test_syntax_error_renders_location_line_and_caret() -> None:
    with pytest.raises(AblaufSyntaxError) as info:
        read("(do!!\n  (log!! 1]))", "flow.abl")
    text = str(info.value)
    assert text.startswith("flow.abl:2:11: error: mismatched bracket")
    assert text.endswith("  (log!! 1]))\n          ^")


def test_read_one_wants_exactly_one_form() -> None:
    with pytest.raises(AblaufSyntaxError, match="expected a form, found none"):
        read_one(" ; nothing")
    with pytest.raises(AblaufSyntaxError, match="expected one form, found 2") as info:
        read_one("1\n  2")
    assert (info.value.line, info.value.column) == (2, 3)


def test_errors_inside_discarded_forms_still_count() -> None:
    with pytest.raises(AblaufSyntaxError, match="odd number"):
        read("#_ {:a} 1")
    with pytest.raises(AblaufSyntaxError, match="bad escape"):
        read('#_ "\\q" 1')


def test_reading_leaves_the_garbage_collector_as_it_was() -> None:
    assert gc.isenabled()
    read("(a [b])")
    assert gc.isenabled()
    with pytest.raises(AblaufSyntaxError):
        read("(a")
    assert gc.isenabled()
    gc.disable()
    try:
        read("(a)")
        assert not gc.isenabled()
    finally:
        gc.enable()


# ---------------------------------------------------------------------------------------
# Size


def _depth(form: Any) -> int:
    depth = 0
    while isinstance(form, List | Vector) and form.items:
        depth += 1
        form = form.items[-1]
    return depth


@pytest.mark.parametrize(("open_", "close"), [("(do!! ", ")"), ("[", "]"), ("{:k ", "}")])
def test_deep_nesting_reads_without_recursion(open_: str, close: str) -> None:
    depth = 2000
    form = read_one(open_ * depth + "1" + close * depth)
    if open_.startswith("{"):
        count = 0
        while isinstance(form, Map):
            count += 1
            form = form.pairs[0][1]
        assert count == depth
    else:
        assert _depth(form) == depth


def test_unclosed_deep_nesting_is_reported() -> None:
    with pytest.raises(
        AblaufSyntaxError, match=r"unclosed list: '\(' opened at line 1, column 3000"
    ):
        read("(" * 3000)


def test_many_forms() -> None:
    forms = read("\n".join(f"(log!! {i})" for i in range(5000)))
    assert len(forms) == 5000
    assert forms.spans[-1].line == 5000


# ---------------------------------------------------------------------------------------
# Inputs at the edges: huge numbers, byte order marks, line separators, NUL, bad UTF-8


def test_an_integer_literal_up_to_the_limit_reads() -> None:
    assert read_one("9" * MAX_INT_DIGITS) == int("9" * MAX_INT_DIGITS)
    assert read_one("-" + "9" * MAX_INT_DIGITS) == -int("9" * MAX_INT_DIGITS)


@pytest.mark.parametrize("digits", [MAX_INT_DIGITS + 1, 5000, 100_000])
def test_an_integer_literal_too_large_is_a_located_error(digits: int) -> None:
    with pytest.raises(AblaufSyntaxError) as info:
        read(f'(log!! "x")\n  (log!! {"7" * digits})', "big.abl")
    err = info.value
    assert (err.filename, err.line, err.column) == ("big.abl", 2, 10)
    assert f"integer literal too large: {digits:,} digits (the limit is 4,300)" in err.message
    assert len(str(err).splitlines()[1]) < 200  # the line is shown as a window


@pytest.mark.parametrize("text", ["1e999", "-1e400", "1.5e309"])
def test_a_float_literal_out_of_range_is_a_located_error(text: str) -> None:
    with pytest.raises(AblaufSyntaxError, match="out of range") as info:
        read(f"(sleep {text})")
    assert (info.value.line, info.value.column) == (1, 8)


def test_a_float_literal_that_underflows_is_zero() -> None:
    assert read_one("1e-999") == 0.0


def test_a_byte_order_mark_is_skipped() -> None:
    assert read("\ufeff(a 1)") == read("(a 1)")
    with pytest.raises(AblaufSyntaxError) as info:
        read("\ufeff(a ]")
    assert (info.value.line, info.value.column) == (1, 4)
    # The caret sits under the bracket: the mark is not shown.
    assert str(info.value).splitlines()[1:] == ["(a ]", "   ^"]


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x0c", "\x0b", "\x85", "\x1c", "\r"])
def test_line_numbers_and_carets_agree_whatever_the_separators(separator: str) -> None:
    # Only "\n" ends a line, for the reader and for the caret alike.
    source = f'(a "x{separator}y")\n(b {separator} ]'
    with pytest.raises(AblaufSyntaxError) as info:
        read(source)
    err = info.value
    assert err.line == 2
    shown, caret = str(err).splitlines()[1:]
    assert shown.startswith("(b ")
    assert caret.index("^") == shown.index("]") == err.column - 1


def test_crlf_line_ends_keep_carets_in_place() -> None:
    with pytest.raises(AblaufSyntaxError) as info:
        read("(a)\r\n(b ]\r\n")
    assert str(info.value).splitlines()[1:] == ["(b ]", "   ^"]


def test_invisible_characters_are_shown_as_one_column() -> None:
    with pytest.raises(AblaufSyntaxError, match=r"unexpected character '\\x00'") as info:
        read('(a "\x00\u2028" \x00)')
    shown, caret = str(info.value).splitlines()[1:]
    assert shown == '(a "\ufffd\ufffd" \ufffd)'
    assert caret == " " * 8 + "^"


def test_invalid_utf8_names_the_file_line_column_and_byte() -> None:
    data = '(log!! "é")\n(log!! "'.encode() + b"\xff\xfe" + b'")\n'
    with pytest.raises(AblaufSyntaxError) as info:
        decode_source(data, "bad.abl")
    err = info.value
    assert (err.filename, err.line, err.column) == ("bad.abl", 2, 9)
    assert err.message == "not UTF-8 text: invalid byte 0xff at byte offset 21"
    assert decode_source(b"\xef\xbb\xbf(a)") == "(a)"


def test_lone_surrogates_read_and_print_back() -> None:
    form = read_one('"\\ud800 and \udfff"')
    assert form == "\ud800 and \udfff"
    from ablauf_lang.lang.printer import print_form

    assert read_one(print_form(form)) == form
    assert print_form(form).isascii()
