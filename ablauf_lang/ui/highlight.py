"""The Pygments lexer for ablauf (`.abl` files), the target of the `pygments.lexers` entry point.

Pygments imports this module while scanning plugins, so it stays cheap and free of side
effects: it imports Pygments and the name lists only.

Token kinds:

| text                                   | token                  |
|----------------------------------------|------------------------|
| `; comment`                            | `Comment.Single`       |
| `#_` (discard the next form)           | `Comment`              |
| `"text"`, `\\n` inside it              | `String`, `String.Escape` |
| `42`, `-1.5e3`                         | `Number.Integer`, `Number.Float` |
| `nil true false`                       | `Keyword.Constant`     |
| `:ns/name`                             | `String.Symbol`        |
| `do!! dopar!! try!! ...`, `if fn ...`  | `Keyword`              |
| `def defn let import`                  | `Keyword.Declaration`  |
| `log!! action!! ...`, `str get ...`    | `Name.Builtin`         |
| any other symbol at the head of a list | `Name.Function`        |
| any other symbol                       | `Name.Variable`        |
| `( ) [ ] { }`                          | `Punctuation`          |
| spaces, newlines, commas               | `Whitespace`           |
"""

from __future__ import annotations

from typing import Any, ClassVar

from pygments.lexer import RegexLexer, words
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

from ablauf_lang.names import (
    BUILTINS,
    CONSTANTS,
    DECLARATIONS,
    LEAF_FORMS,
    SPECIAL_FORMS,
    STRUCTURAL_FORMS,
)

__all__ = ["AblaufLexer"]

# A word ends where the reader's symbols end: `\b` fails after `!`, so look ahead instead.
_END = r"(?=[\s,()\[\]{}\";]|$)"
# The reader's SYMBOL and KEYWORD terminals (grammar/ablauf.lark).
_SYMBOL = r"(?![+-]?\.?\d)[\w*+!\-?<>=/.$&%][\w*+!\-?<>=/.$&%':#]*"
_KEYWORD = r":[\w*+!\-?<>=/.$&%'#][\w*+!\-?<>=/.$&%':#]*"


class AblaufLexer(RegexLexer):
    """Lexer for ablauf workflow programs."""

    name = "Ablauf"
    aliases: ClassVar[list[str]] = ["ablauf"]  # "abl" already names OpenEdge ABL
    filenames: ClassVar[list[str]] = ["*.abl"]
    mimetypes: ClassVar[list[str]] = ["text/x-ablauf"]
    url = "https://github.com/ablauf-lang/ablauf_lang"

    tokens: ClassVar[dict[str, list[tuple[Any, ...]]]] = {
        "root": [
            (r";[^\n]*", Comment.Single),
            (r"#_", Comment),
            (r"[\s,]+", Whitespace),
            (r"[+-]?\d+(?:\.\d+(?:[eE][+-]?\d+)?|[eE][+-]?\d+)" + _END, Number.Float),
            (r"[+-]?\d+" + _END, Number.Integer),
            (r'"', String.Double, "string"),
            (_KEYWORD, String.Symbol),
            (words(CONSTANTS, suffix=_END), Keyword.Constant),
            (words(DECLARATIONS, suffix=_END), Keyword.Declaration),
            (words(STRUCTURAL_FORMS + SPECIAL_FORMS, suffix=_END), Keyword),
            (words(LEAF_FORMS + BUILTINS, suffix=_END), Name.Builtin),
            (r"(?<=\()" + _SYMBOL, Name.Function),
            (_SYMBOL, Name.Variable),
            (r"[()\[\]{}]", Punctuation),
            (r".", Error),
        ],
        "string": [
            (r'[^"\\]+', String.Double),
            (r"\\u[0-9a-fA-F]{4}", String.Escape),
            (r"\\[\s\S]", String.Escape),
            (r'"', String.Double, "#pop"),
        ],
    }
