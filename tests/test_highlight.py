"""The Pygments lexer: token kinds, examples and random forms lex without Error tokens,
and the real `pygmentize` finds it through the entry point."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from pygments.lexers import get_lexer_by_name, get_lexer_for_filename
from pygments.token import (
    Comment,
    Error,
    Keyword,
    Name,
    Number,
    Punctuation,
    String,
    Whitespace,
)

from ablauf_lang.lang.printer import print_form
from ablauf_lang.ui.highlight import AblaufLexer
from tests.strategies import forms, workflow_sources

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.abl"))


def lex(text: str) -> list[tuple[object, str]]:
    """Tokens exactly as in the text (no newline added or stripped)."""
    lexer = AblaufLexer(stripnl=False, ensurenl=False)
    return [(tok, val) for tok, val in lexer.get_tokens(text) if val]


def kind_of(text: str, word: str) -> object:
    """The token type of `word` inside `text` (first occurrence)."""
    for tok, val in lex(text):
        if val == word:
            return tok
    raise AssertionError(f"{word!r} is not a token of {text!r}: {lex(text)}")


@pytest.mark.parametrize(
    ("text", "word", "kind"),
    [
        ("(do!! (log!! 1))", "do!!", Keyword),
        ("(dopar!! x)", "dopar!!", Keyword),
        ("(try!! (rescue!! x) (finally!! y))", "rescue!!", Keyword),
        ("(try!! (rescue!! x) (finally!! y))", "finally!!", Keyword),
        ("(with-augment [identity :a] x)", "with-augment", Keyword),
        ("(do!!)", "do!!", Keyword),  # a form right before its closer
        ("(log!! 1)", "log!!", Name.Builtin),
        ("(action!! :git/create-repo {})", "action!!", Name.Builtin),
        ("(idempotent-action!! :a/b 1)", "idempotent-action!!", Name.Builtin),
        ("(with-augment [identity :a] x)", "identity", Name.Builtin),
        ("(action!! :git/create-repo {})", ":git/create-repo", String.Symbol),
        ("(def x 1)", "def", Keyword.Declaration),
        ("(do!! nil)", "nil", Keyword.Constant),
        ("[true false]", "false", Keyword.Constant),
        ("(log!! 42)", "42", Number.Integer),
        ("(log!! -1.5e3)", "-1.5e3", Number.Float),
        ("(my-step 1)", "my-step", Name.Function),
        ("(f my-var)", "my-var", Name.Variable),
        ("(f -x)", "-x", Name.Variable),
        ("(f nil-safe)", "nil-safe", Name.Variable),
        ("(f do!!x)", "do!!x", Name.Variable),
        ("; a comment\n(f)", "; a comment", Comment.Single),
        ("(do!! #_(log!! 1))", "#_", Comment),
        ("(f)", "(", Punctuation),
        ("{:a 1}", "}", Punctuation),
        ("[1, 2]", ", ", Whitespace),
    ],
)
def test_token_kinds(text: str, word: str, kind: object) -> None:
    assert kind_of(text, word) is kind


def test_strings_and_escapes() -> None:
    tokens = lex(r'(log!! "a\n\"b\" \u00e9")')
    escapes = [val for tok, val in tokens if tok is String.Escape]
    assert escapes == [r"\n", r"\"", r"\"", r"\u00e9"]
    assert all(tok in (String.Double, String.Escape) for tok, val in tokens[3:-1])


def test_invalid_input_gets_error_tokens() -> None:
    assert any(tok is Error for tok, _ in lex("(log!! @x)"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_lex_cleanly(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    tokens = lex(text)
    assert "".join(val for _, val in tokens) == text
    assert [val for tok, val in tokens if tok is Error] == []
    assert any(tok is Keyword for tok, _ in tokens)


@given(forms)
def test_any_printed_form_lexes_without_errors(form: object) -> None:
    text = print_form(form)
    tokens = lex(text)
    assert "".join(val for _, val in tokens) == text
    assert [val for tok, val in tokens if tok is Error] == []


@given(workflow_sources)
def test_any_workflow_lexes_without_errors(source: str) -> None:
    tokens = lex(source)
    assert [val for tok, val in tokens if tok is Error] == []


def test_lexer_found_by_name_and_filename() -> None:
    assert isinstance(get_lexer_by_name("ablauf"), AblaufLexer)
    assert isinstance(get_lexer_for_filename("deploy.abl"), AblaufLexer)


def _pygmentize() -> list[str]:
    exe = shutil.which("pygmentize")
    return [exe] if exe else [sys.executable, "-m", "pygments"]


def test_real_pygmentize_highlights_an_example() -> None:
    hello = Path(__file__).parent.parent / "examples" / "hello.abl"
    out = subprocess.run(
        [*_pygmentize(), "-l", "ablauf", "-f", "raw", str(hello)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "Token.Keyword\t'dopar!!'" in out
    assert "Token.Name.Builtin\t'log!!'" in out
    assert "Token.Error" not in out
    # And the terminal formatter colours it.
    coloured = subprocess.run(
        [*_pygmentize(), "-l", "ablauf", str(hello)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "\x1b[" in coloured
    assert "dopar!!" in coloured


def test_real_pygmentize_guesses_from_filename() -> None:
    out = subprocess.run(
        [*_pygmentize(), "-N", "x.abl"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "ablauf"
