"""Reader output: the data forms of an ablauf program, each with its source position.

Scalars are plain Python values (`None`, `bool`, `int`, `float`, `str`); a keyword is a
`Keyword`, a `str` subclass without the colon, so it reaches actions as a plain string.
Containers keep the span of each item so the compiler can point at any element.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeAlias

from ablauf_lang.errors import Span


@dataclass(frozen=True, slots=True)
class Symbol:
    """A symbol such as `do!!`, `identity` or `my-fn`."""

    name: str
    span: Span | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return self.name


class Keyword(str):
    """A keyword `:ns/name`: the string `ns/name`, remembering it was a keyword."""

    span: Span | None

    def __new__(cls, name: str, span: Span | None = None) -> Keyword:
        self = super().__new__(cls, name)
        self.span = span
        return self

    def __repr__(self) -> str:
        return f"Keyword({str.__repr__(self)})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Keyword, (str(self),))


@dataclass(frozen=True, slots=True)
class List:
    """A list `( ... )`: a call or a special form."""

    items: tuple[Any, ...]
    span: Span | None = field(default=None, compare=False, repr=False)
    item_spans: tuple[Span | None, ...] = field(default=(), compare=False, repr=False)

    def span_of(self, index: int) -> Span | None:
        """Return the span of item `index`, or of the whole list when unknown."""
        if 0 <= index < len(self.item_spans) and self.item_spans[index] is not None:
            return self.item_spans[index]
        return self.span


@dataclass(frozen=True, slots=True)
class Vector:
    """A vector `[ ... ]`."""

    items: tuple[Any, ...]
    span: Span | None = field(default=None, compare=False, repr=False)
    item_spans: tuple[Span | None, ...] = field(default=(), compare=False, repr=False)

    def span_of(self, index: int) -> Span | None:
        """Return the span of item `index`, or of the whole vector when unknown."""
        if 0 <= index < len(self.item_spans) and self.item_spans[index] is not None:
            return self.item_spans[index]
        return self.span


@dataclass(frozen=True, slots=True)
class Map:
    """A map `{ k v ... }` as ordered key/value pairs (keys may be any form)."""

    pairs: tuple[tuple[Any, Any], ...]
    span: Span | None = field(default=None, compare=False, repr=False)
    item_spans: tuple[Span | None, ...] = field(default=(), compare=False, repr=False)

    def span_of(self, index: int) -> Span | None:
        """Return the span of flat item `index` (keys even, values odd)."""
        if 0 <= index < len(self.item_spans) and self.item_spans[index] is not None:
            return self.item_spans[index]
        return self.span


Form: TypeAlias = Any  # Symbol | Keyword | str | int | float | bool | None | List | Vector | Map


def span_of(form: Form) -> Span | None:
    """Return the span a form carries, if any (scalars carry none)."""
    return getattr(form, "span", None)


def to_data(form: Form) -> Any:
    """Convert a quoted data form to plain Python: dicts, lists, strings (symbols as names)."""
    if isinstance(form, Vector | List):
        return [to_data(x) for x in form.items]
    if isinstance(form, Map):
        return {_key(to_data(k)): to_data(v) for k, v in form.pairs}
    if isinstance(form, Symbol):
        return form.name
    return form


def _key(k: Any) -> Any:
    # Map keys handed to Python must be hashable: a vector key becomes a tuple.
    return tuple(k) if isinstance(k, list) else k
