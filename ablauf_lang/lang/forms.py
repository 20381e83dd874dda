"""Reader output: the data forms of an ablauf program, each with its source position.

Scalars are plain Python values (`None`, `bool`, `int`, `float`, `str`); a keyword is a
`values.Keyword`, a `str` subclass without the colon, so it reaches actions as a plain
string.
Containers keep the span of each item so the compiler can point at any element.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeAlias

from ablauf_lang.errors import Span
from ablauf_lang.values import freeze

__all__ = [
    "Form",
    "List",
    "Map",
    "NotData",
    "Symbol",
    "Vector",
    "span_of",
    "to_data",
]


@dataclass(frozen=True, slots=True)
class Symbol:
    """A symbol such as `do!!`, `identity` or `my-fn`."""

    name: str
    span: Span | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return self.name


class _Container:
    """What the three containers share: the span of each item."""

    __slots__ = ()
    span: Span | None
    item_spans: tuple[Span | None, ...]

    def span_of(self, index: int) -> Span | None:
        """Return the span of item `index` (of a map: flat, keys even, values odd), or of
        the whole container when unknown."""
        if 0 <= index < len(self.item_spans) and self.item_spans[index] is not None:
            return self.item_spans[index]
        return self.span


@dataclass(frozen=True, slots=True)
class List(_Container):
    """A list `( ... )`: a call or a special form."""

    items: tuple[Any, ...]
    span: Span | None = field(default=None, compare=False, repr=False)
    item_spans: tuple[Span | None, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Vector(_Container):
    """A vector `[ ... ]`."""

    items: tuple[Any, ...]
    span: Span | None = field(default=None, compare=False, repr=False)
    item_spans: tuple[Span | None, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Map(_Container):
    """A map `{ k v ... }` as ordered key/value pairs (keys may be any form)."""

    pairs: tuple[tuple[Any, Any], ...]
    span: Span | None = field(default=None, compare=False, repr=False)
    item_spans: tuple[Span | None, ...] = field(default=(), compare=False, repr=False)


Form: TypeAlias = Any  # Symbol | Keyword | str | int | float | bool | None | List | Vector | Map


def span_of(form: Form) -> Span | None:
    """Return the span a form carries, if any (scalars carry none)."""
    return getattr(form, "span", None)


class NotData(Exception):
    """`to_data(form, strict=True)` met a symbol or a list: the form is code, not data."""


def to_data(form: Form, *, strict: bool = False) -> Any:
    """Convert a quoted data form to plain Python: dicts, lists, strings (symbols as names).

    Iterative, so deeply nested data never hits the recursion limit. A map key that is a
    vector becomes a tuple (keys must be hashable); a map key that is a map is a TypeError.
    `strict`: raise NotData at a symbol or a list instead (literal data only).
    """
    if not isinstance(form, Vector | List | Map):
        if isinstance(form, Symbol):
            if strict:
                raise NotData(form.name)
            return form.name
        return form
    if strict and isinstance(form, List):
        raise NotData("a list")
    out: list[Any] = [None]
    # Work stack: (form, container to fill, slot). Maps are filled as [key, value] pairs
    # and built once their parts are done: `fixups`, applied innermost first.
    stack: list[tuple[Any, Any, Any]] = [(form, out, 0)]
    fixups: list[tuple[Any, Any, list[list[Any]]]] = []
    while stack:
        item, target, slot = stack.pop()
        if strict and isinstance(item, Symbol | List):
            raise NotData(str(item))
        if isinstance(item, Vector | List):
            items: list[Any] = [None] * len(item.items)
            target[slot] = items
            stack.extend((x, items, i) for i, x in enumerate(item.items))
        elif isinstance(item, Map):
            pairs = [[None, None] for _ in item.pairs]
            fixups.append((target, slot, pairs))
            for pair, (k, v) in zip(pairs, item.pairs, strict=True):
                stack.append((k, pair, 0))
                stack.append((v, pair, 1))
        elif isinstance(item, Symbol):
            target[slot] = item.name
        else:
            target[slot] = item
    for target, slot, pairs in reversed(fixups):
        target[slot] = {freeze(k): v for k, v in pairs}
    return out[0]
