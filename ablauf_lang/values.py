"""Plain values: the one iterative codec between Python values and JSON, and value budgets.

A value (a payload, an output, an error, the context) is plain data: None, bool, int,
float, str (a `Keyword` is a str), list, tuple (a vector used as a map key) and dict. This
module is the only code that walks values to turn them into JSON data and back:

- `encode` / `decode`: the stored form (jobs, stores). JSON cannot say a few things
  exactly, so they are tagged: a map with a key that is not a string (or a key starting
  with `$`) is `{"$map": [[key, value], ...]}`, a tuple `{"$tuple": [...]}`, a type taught
  with `register` `{"$tag": data}` (the run-time expressions of `ablauf_lang.code` teach
  themselves as `{"$deferred": ["expr", data]}`).
- `to_plain_json` / `dumps_json`: the form printed for people and scripts (`--json`).
  Maps are tagged the same way; tuples are plain lists, a taught type what its `plain`
  function gives (run-time expressions `{"$expr": "(source text)"}`), NaN and infinities
  the strings "NaN", "Infinity", "-Infinity", anything else its `str`. `from_plain_json`
  reads that form back, so what `--json` prints can be given back as a context.

Every walk is iterative. A value may nest at most `MAX_DEPTH` levels of vectors and maps
(the JSON libraries recurse; stores and `--json` must never hit the recursion limit), an
integer has at most `MAX_INT_DIGITS` digits (what Python prints), and a value that
contains itself is refused by name instead of looping.

`Meter` bounds what compile-time (and run-time) evaluation builds: every string and
collection a builtin or a literal makes is measured, and a compile may build at most
`MAX_BUILT` units (elements and characters) in all, each value at most `MAX_SIZE`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from ablauf_lang.errors import JobError, Refusal, Span

__all__ = [
    "ALL_DATA",
    "MAX_BUILT",
    "MAX_DEPTH",
    "MAX_INT_DIGITS",
    "MAX_SIZE",
    "Keyword",
    "Meter",
    "TooLarge",
    "assoc_in",
    "decode",
    "dumps_json",
    "encode",
    "freeze",
    "from_plain_json",
    "int_too_large",
    "is_truthy",
    "register",
    "scan",
    "to_plain_json",
]

# Levels of vectors and maps one value may nest (a map tagged `$map` stores as 3 JSON
# levels, so a stored value stays well inside the JSON libraries' recursion budget).
MAX_DEPTH = 100
# Digits of an integer: the most Python converts to text (`sys.get_int_max_str_digits`).
MAX_INT_DIGITS = 4300
# Elements and characters of one value built by an evaluation.
MAX_SIZE = 10_000_000
# Elements and characters one compile (or one run-time expression) may build in all.
MAX_BUILT = 50_000_000

# ---------------------------------------------------------------------------------------
# Keywords


class Keyword(str):
    """A keyword `:ns/name`: the string `ns/name`, remembering it was a keyword.

    The reader makes them (with the span they were read at); a value keeps them, so a
    keyword prints as one, and reaches actions and JSON as the plain string.
    """

    span: Span | None

    def __new__(cls, name: str, span: Span | None = None) -> Keyword:
        self = super().__new__(cls, name)
        self.span = span
        return self

    def __repr__(self) -> str:
        return f"Keyword({str.__repr__(self)})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Keyword, (str(self),))


# ---------------------------------------------------------------------------------------
# Truth and paths


def is_truthy(value: Any) -> bool:
    """Clojure's truth: only nil and false are false (0, "" and [] are true)."""
    return value is not None and value is not False


def assoc_in(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """Return a copy of `data` with `value` at `path`, creating nested dicts (copy-on-write:
    the maps off the path are shared)."""
    # Walk down remembering each level, then rebuild bottom-up (no recursion).
    levels: list[dict[Any, Any]] = [data]
    for key in path[:-1]:
        inner = levels[-1].get(key)
        levels.append(inner if isinstance(inner, dict) else {})
    out = dict(levels[-1])
    out[path[-1]] = value
    for key, level in zip(reversed(path[:-1]), reversed(levels[:-1]), strict=True):
        copy = dict(level)
        copy[key] = out
        out = copy
    return out


# ---------------------------------------------------------------------------------------
# Map keys


def freeze(value: Any) -> Any:
    """Return `value` usable as a map key: vectors (at any depth) become tuples.

    Raises TypeError for a map, which cannot be a key.
    """
    if not isinstance(value, list | tuple):
        if isinstance(value, dict):
            raise TypeError("a map cannot be a map key")
        return value
    out: list[Any] = [None]
    # Post-order without recursion: fill lists, then turn them into tuples innermost first.
    stack: list[tuple[Any, Any, int]] = [(value, out, 0)]
    built: list[tuple[Any, int, list[Any]]] = []
    while stack:
        item, target, slot = stack.pop()
        if isinstance(item, list | tuple):
            if len(built) > 1_000_000:
                raise TypeError("a map key is too large")
            items: list[Any] = [None] * len(item)
            built.append((target, slot, items))
            stack.extend((x, items, i) for i, x in enumerate(item))
        elif isinstance(item, dict):
            raise TypeError("a map cannot be a map key")
        else:
            target[slot] = item
    for target, slot, items in reversed(built):
        target[slot] = tuple(items)
    return out[0]


# ---------------------------------------------------------------------------------------
# Integers


def int_too_large(value: int) -> bool:
    """True when `value` has more than `MAX_INT_DIGITS` digits."""
    bits = value.bit_length()
    if bits <= 14_000:  # at most 4,215 digits
        return False
    return bits > 14_300 or abs(value) >= 10**MAX_INT_DIGITS


_INT_TOO_LARGE = f"holds an integer of more than {MAX_INT_DIGITS:,} digits"
_TOO_DEEP = f"is nested too deeply (more than {MAX_DEPTH} levels of vectors and maps)"
_CYCLE = "contains itself (a vector or map inside itself)"

# ---------------------------------------------------------------------------------------
# Types taught to the codec

# tag -> (python type, encode to JSON-able, decode from it, plain form or None)
_CODECS: dict[
    str, tuple[type, Callable[[Any], Any], Callable[[Any], Any], Callable[[Any], Any] | None]
] = {}


def register(
    tag: str,
    cls: type,
    encode: Callable[[Any], Any],
    decode: Callable[[Any], Any],
    *,
    plain: Callable[[Any], Any] | None = None,
) -> None:
    """Teach the codec a Python type: stored as `{"$<tag>": encode(value)}`, read back with
    `decode`; `plain(value)` is its form for people (`to_plain_json`; default: as stored)."""
    _CODECS[tag] = (cls, encode, decode, plain)


# ---------------------------------------------------------------------------------------
# Python -> JSON data


def _is_plain_keys(d: dict[Any, Any]) -> bool:
    """True when a map's keys can be JSON object keys as they are."""
    return all(isinstance(k, str) and not k.startswith("$") for k in d)


# The containers above a value in a walk, innermost first: (container, outer chain).
# Only read past MAX_DEPTH, to tell a value that contains itself from a deep one.
_Chain = tuple[Any, Any]


def _too_deep(value: Any, chain: _Chain | None) -> str:
    """The problem with a value found past MAX_DEPTH: a cycle, or just too deep."""
    seen = {id(value)}
    while chain is not None:
        above, chain = chain
        if id(above) in seen:
            return _CYCLE
        seen.add(id(above))
    return _TOO_DEEP


def _walk(value: Any, plain: bool, what: str) -> Any:
    """Encode `value` (stored form, or `plain` for people), iteratively."""
    out: list[Any] = [None]
    # (value, container to fill, slot, depth of the value, containers above it)
    stack: list[tuple[Any, Any, Any, int, _Chain | None]] = [(value, out, 0, 0, None)]
    push = stack.append
    while stack:
        v, target, slot, depth, chain = stack.pop()
        t = type(v)
        if t is str or v is None or t is bool or t is float:
            if t is float and plain and not math.isfinite(v):
                v = "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
            target[slot] = v
            continue
        if t is int:
            if int_too_large(v):
                raise JobError(f"{what} {_INT_TOO_LARGE}")
            target[slot] = v
            continue
        if isinstance(v, list | tuple | dict):
            if depth >= MAX_DEPTH:
                raise JobError(f"{what} {_too_deep(v, chain)}")
            inner = (v, chain)
            d = depth + 1
            if isinstance(v, list) or (plain and isinstance(v, tuple)):
                items: list[Any] = [None] * len(v)
                target[slot] = items
                for i, x in enumerate(v):
                    push((x, items, i, d, inner))
            elif isinstance(v, tuple):
                items = [None] * len(v)
                target[slot] = {"$tuple": items}
                for i, x in enumerate(v):
                    push((x, items, i, d, inner))
            elif _is_plain_keys(v):
                obj: dict[str, Any] = {}
                target[slot] = obj
                for k, x in v.items():
                    key = str(k)
                    obj[key] = None
                    push((x, obj, key, d, inner))
            else:
                pairs = [[None, None] for _ in v]
                target[slot] = {"$map": pairs}
                for pair, (k, x) in zip(pairs, v.items(), strict=True):
                    push((k, pair, 0, d, inner))
                    push((x, pair, 1, d, inner))
            continue
        if isinstance(v, str | int | float):  # subclasses: Keyword, IntEnum, bool-likes
            if isinstance(v, str):
                target[slot] = str(v)
            elif isinstance(v, bool):
                target[slot] = bool(v)
            elif isinstance(v, int):
                push((int(v), target, slot, depth, chain))
            else:
                push((float(v), target, slot, depth, chain))
            continue
        for tag, (cls, enc, _, shown) in _CODECS.items():
            if isinstance(v, cls):
                target[slot] = shown(v) if plain and shown is not None else {"$" + tag: enc(v)}
                break
        else:
            if plain:
                if isinstance(v, set | frozenset):
                    push((sorted(v, key=repr), target, slot, depth, chain))
                else:
                    target[slot] = str(v)
                continue
            raise JobError(f"cannot store a value of type {type(v).__name__}: {_repr(v)}")
    return out[0]


def _repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a user object whose repr fails
        text = f"<{type(value).__name__}: repr failed with {type(exc).__name__}>"
    return text[:80]


def encode(value: Any, what: str = "the value") -> Any:
    """Return the stored JSON-able form of a value; JobError when it cannot be stored."""
    t = type(value)
    if t is str or value is None or t is bool or t is float:
        return value
    if t is int and not int_too_large(value):  # the common payload: no walk
        return value
    return _walk(value, False, what)


# What `scan` finds when every part of a value is plain data.
ALL_DATA: Any = object()


def scan(value: Any) -> tuple[Any, str | None]:
    """Walk a value once: `(part, None)` for its first part that is not plain data (a
    function, a workflow...), else `(ALL_DATA, problem)` where `problem` says what keeps it
    from being stored (`is nested too deeply (...)`, to follow its name) or is None."""
    if value is None or isinstance(value, bool | float | str):
        return ALL_DATA, None
    stack: list[tuple[Any, int, _Chain | None]] = [(value, 0, None)]
    while stack:
        v, depth, chain = stack.pop()
        if v is None or isinstance(v, bool | float | str):
            continue
        if isinstance(v, int):
            if int_too_large(v):
                return ALL_DATA, _INT_TOO_LARGE
        elif isinstance(v, list | tuple | dict):
            if depth >= MAX_DEPTH:
                return ALL_DATA, _too_deep(v, chain)
            inner = (v, chain)
            if isinstance(v, dict):
                stack.extend((k, depth + 1, inner) for k in v)
                stack.extend((x, depth + 1, inner) for x in v.values())
            else:
                stack.extend((x, depth + 1, inner) for x in v)
        else:
            return v, None
    return ALL_DATA, None


def to_plain_json(value: Any) -> Any:
    """Return `value` as plain JSON data for people and scripts (`--json`).

    Maps whose keys are not all strings (or that have a key starting with `$`) become
    `{"$map": [[key, value], ...]}`; tuples are lists; run-time expressions are
    `{"$expr": "source"}`; NaN and infinities are the strings "NaN", "Infinity" and
    "-Infinity"; any other object is its `str`. Raises JobError (an AblaufError) for a
    value nested more than MAX_DEPTH levels, one that contains itself, or an integer of
    more than MAX_INT_DIGITS digits.
    """
    return _walk(value, True, "the value")


_SURROGATE = re.compile("[\ud800-\udfff]")


def dumps_json(value: Any, *, indent: int | None = None) -> str:
    """Return `to_plain_json(value)` as one JSON document, safe to write as UTF-8.

    Non-ASCII text is kept as it is, except lone surrogates, which are written as
    `\\uXXXX` escapes (the JSON says exactly the same string).
    """
    text = json.dumps(to_plain_json(value), ensure_ascii=False, indent=indent, allow_nan=False)
    if _SURROGATE.search(text):
        # A raw surrogate can only sit inside a JSON string: its escape means the same.
        text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text


# ---------------------------------------------------------------------------------------
# JSON data -> Python


def _decode_walk(data: Any, plain: bool) -> Any:
    out: list[Any] = [None]
    stack: list[tuple[Any, Any, Any]] = [(data, out, 0)]
    # Tagged maps and tuples are built once their parts are: innermost first.
    fixups: list[tuple[Any, Any, str, list[Any]]] = []
    while stack:
        d, target, slot = stack.pop()
        if isinstance(d, list):
            items: list[Any] = [None] * len(d)
            target[slot] = items
            stack.extend((x, items, i) for i, x in enumerate(d))
        elif isinstance(d, dict):
            if len(d) == 1:
                ((key, inner),) = d.items()
                if key == "$map" and _is_pairs(inner):
                    parts: list[Any] = [None] * len(inner)
                    fixups.append((target, slot, key, parts))
                    stack.extend((x, parts, i) for i, x in enumerate(inner))
                    continue
                if key == "$tuple" and isinstance(inner, list) and not plain:
                    parts = [None] * len(inner)
                    fixups.append((target, slot, key, parts))
                    stack.extend((x, parts, i) for i, x in enumerate(inner))
                    continue
                if not plain and key.startswith("$") and key[1:] in _CODECS:
                    target[slot] = _CODECS[key[1:]][2](inner)
                    continue
            obj: dict[str, Any] = {}
            target[slot] = obj
            for k, x in d.items():
                obj[k] = None
                stack.append((x, obj, k))
        else:
            target[slot] = d
    for target, slot, tag, parts in reversed(fixups):
        if tag == "$tuple":
            target[slot] = tuple(parts)
        else:
            out_map: dict[Any, Any] = {}
            for k, x in parts:
                try:
                    out_map[freeze(k)] = x
                except TypeError:
                    raise JobError(f"a stored map has a map as a key: {str(k)[:60]}") from None
            target[slot] = out_map
    return out[0]


def _is_pairs(inner: Any) -> bool:
    return isinstance(inner, list) and all(isinstance(p, list) and len(p) == 2 for p in inner)


def decode(data: Any) -> Any:
    """Invert `encode`, iteratively; JobError for damaged data."""
    if data is None or isinstance(data, str | int | float):
        return data
    return _decode_walk(data, False)


def from_plain_json(data: Any) -> Any:
    """Invert `to_plain_json` where it can: `{"$map": [[k, v], ...]}` becomes a map again
    (vector keys as tuples); everything else stays as JSON gave it."""
    if data is None or isinstance(data, str | int | float):
        return data
    return _decode_walk(data, True)


# ---------------------------------------------------------------------------------------
# Budgets for what an evaluation builds


class TooLarge(Refusal):
    """A value an evaluation built is over budget; `message` says which and why."""


def _scalar_size(v: Any) -> int:
    if isinstance(v, str):
        return len(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return 1 + v.bit_length() // 32  # a unit per ten digits or so
    return 1


_CONTAINERS = (list, tuple, dict)
_SIMPLE = frozenset({type(None), bool, float})


def _items(v: Any) -> Any:
    """The parts of a container: a map's keys and values."""
    return [*v.keys(), *v.values()] if isinstance(v, dict) else v


def _flat_size(items: Any) -> int | None:
    """The size of parts that hold no container (mostly at C speed); None when some do."""
    types = set(map(type, items))
    if any(issubclass(t, _CONTAINERS) for t in types):
        return None
    size = len(items) or 1
    types -= _SIMPLE
    if not types:
        return size
    # Only the items of the one remaining type are measured (the others, nil or a float
    # beside strings or integers, count as one element each).
    if types == {str}:
        return size + sum(len(x) for x in items if type(x) is str)
    if types == {int}:
        bits = [x.bit_length() for x in items if type(x) is int]
        if max(bits) < 32:
            return size
        return size + sum(b // 32 for b in bits)
    return size + sum(_scalar_size(x) - 1 for x in items)


class Meter:
    """Measure the values an evaluation builds, against `MAX_SIZE` each and `budget` in all.

    A value's size counts its elements (a map's keys and values) and the characters of
    its strings, as if nothing were shared: `[a a]` is twice as large as `a`. The work
    charged to the budget is what is new: the elements of containers not measured
    before (and the characters of new strings), so a value shared many times costs once.
    """

    def __init__(self, budget: int = MAX_BUILT, limit: int = MAX_SIZE) -> None:
        self.left = budget
        self.budget = budget
        self.limit = limit
        # id -> (container, its size): the container is kept so its id stays its own.
        self.sizes: dict[int, tuple[Any, int]] = {}

    def _charge(self, units: int) -> None:
        self.left -= units
        if self.left < 0:
            raise TooLarge(
                f"builds too much (more than {self.budget:,} elements and characters in all)"
            )

    def built(self, value: Any) -> int:
        """Account for a value just built (a new string, number or collection); its size."""
        if isinstance(value, str):
            n = len(value)
            if n > 64:
                self._charge(n)
            if n > self.limit:
                raise TooLarge(f"builds a string of {n:,} characters (the limit is {self.limit:,})")
            return n
        if isinstance(value, int) and not isinstance(value, bool):
            if int_too_large(value):
                raise TooLarge(f"builds an integer of more than {MAX_INT_DIGITS:,} digits")
            return 1
        if isinstance(value, list | tuple | dict):
            return self.measure(value)
        return 1

    def measure(self, value: Any) -> int:
        """The size of a value (see the class), charging what was not measured before."""
        if not isinstance(value, list | tuple | dict):
            return _scalar_size(value)
        sizes = self.sizes
        known = sizes.get(id(value))
        if known is not None:
            return known[1]
        open_: set[int] = set()
        stack: list[tuple[Any, bool]] = [(value, False)]
        while stack:
            v, done = stack.pop()
            key = id(v)
            if not done:
                if key in sizes:
                    continue
                if key in open_:
                    raise TooLarge("builds a value that contains itself")
                items = _items(v)
                flat = _flat_size(items)
                if flat is None:
                    open_.add(key)
                    stack.append((v, True))
                    for x in items:
                        if isinstance(x, _CONTAINERS) and id(x) not in sizes:
                            stack.append((x, False))
                    continue
                size = flat
            else:
                items = _items(v)
                size = len(items) or 1
                for x in items:
                    if isinstance(x, _CONTAINERS):
                        size += sizes[id(x)][1]
                    else:
                        size += _scalar_size(x) - 1
                open_.discard(key)
            if size > self.limit:
                raise TooLarge(
                    f"builds a value of {size:,} elements and characters "
                    f"(the limit is {self.limit:,})"
                )
            self._charge(len(items))
            sizes[key] = (v, size)
        return sizes[id(value)][1]
