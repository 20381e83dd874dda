"""Pure builtin functions of the language: `str`, arithmetic, `get`, `assoc`, `ctx`...

Every builtin is a plain Python function over plain data (None, bool, int, float, str,
list, dict) registered with `@builtin(name, min_args, max_args)`. The same functions run at
compile time (folding constant expressions) and at run time (inside expressions that
depend on the context), so they never perform I/O and never mutate their arguments.
A builtin rejects bad input by raising `BuiltinError` with a message for the user; the
caller adds the expression's source position.

Truth is Clojure's: only nil and false are false. Keywords are strings (`(str :a)` is
"a"), so a value reads the same before and after a trip through JSON.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ablauf_lang.errors import Refusal
from ablauf_lang.values import Keyword, freeze, int_too_large, is_truthy

__all__ = [
    "BUILTINS",
    "MAX_RANGE",
    "Builtin",
    "BuiltinError",
    "builtin",
    "equal",
    "show_value",
    "type_name",
]

# The largest collection `range` builds: a runaway range fails instead of eating memory.
MAX_RANGE = 100_000


class BuiltinError(Refusal):
    """A builtin refused its arguments; the message is for the user."""


@dataclass(frozen=True, slots=True)
class Builtin:
    """A builtin function: its name, implementation and how many arguments it takes.

    `needs_context`: the function reads the run's context (`ctx`), so a call is always
    kept for run time and `fn` receives the context as its first argument.
    """

    name: str
    fn: Callable[..., Any]
    min_args: int = 0
    max_args: int | None = None
    needs_context: bool = False

    def __repr__(self) -> str:
        return f"<builtin {self.name}>"


BUILTINS: dict[str, Builtin] = {}


F = TypeVar("F", bound=Callable[..., Any])


def builtin(
    name: str, min_args: int = 0, max_args: int | None = None, *, needs_context: bool = False
) -> Callable[[F], F]:
    """Register the decorated function as the builtin `name`."""

    def register(fn: F) -> F:
        BUILTINS[name] = Builtin(name, fn, min_args, max_args, needs_context)
        return fn

    return register


# ---------------------------------------------------------------------------------------
# Helpers


def is_number(value: Any) -> bool:
    """An int or a float, but not a boolean."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def type_name(value: Any) -> str:
    """The language's name for the type of `value`, for messages."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "vector"
    if isinstance(value, dict):
        return "map"
    if isinstance(value, Builtin):
        return "function"
    # Other values name their type themselves: workflows (nodes), closures, expressions.
    return getattr(value, "type_name", type(value).__name__)


def _need(value: Any, ok: bool, what: str, fn: str) -> None:
    if not ok:
        raise BuiltinError(f"{fn} expects {what}, got {type_name(value)} {show_value(value, 60)}")


def _numbers(fn: str, values: tuple[Any, ...]) -> None:
    for v in values:
        _need(v, is_number(v), "numbers", fn)


def _result(fn: str, value: Any) -> Any:
    """An arithmetic result, refused when it overflows: an infinite float or a huge integer."""
    if isinstance(value, float) and not math.isfinite(value):
        raise BuiltinError(f"{fn}: the result is too large for a float (it overflows)")
    if isinstance(value, int) and int_too_large(value):
        raise BuiltinError(f"{fn}: the result is an integer of more than 4,300 digits")
    return value


def _hashable(key: Any) -> Any:
    """A value usable as a map key: a vector key becomes a tuple (iteratively)."""
    try:
        return freeze(key)
    except TypeError:
        raise BuiltinError(f"a map cannot be a map key: {show_value(key, 60)}") from None


def _is_keyword_name(text: str) -> bool:
    """True when `:text` reads back as a keyword."""
    return bool(text) and not any(c.isspace() or c in '"(){}[],;`~^@\\' for c in text)


_STRING_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _show_atom(value: Any, quoted: bool) -> str:
    if value is None:
        return "nil" if quoted else ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        if not quoted:
            return str(value)
        if isinstance(value, Keyword) and _is_keyword_name(value):
            return ":" + value
        return '"' + "".join(_STRING_ESCAPES.get(c, c) for c in value) + '"'
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    return getattr(value, "show", None) or repr(value)


def show_value(value: Any, limit: int | None = None, *, entries: str = " ") -> str:
    """Print a value in the language's notation (`[1 "a" {:k nil}]`), without recursion.

    `limit`: stop after about that many characters and end with "..." (for messages), so
    a huge value costs no more than its start. `entries`: what separates a map's entries
    (the display of runs and the REPL use ", ", as Clojure prints maps).
    """
    if not isinstance(value, list | tuple | dict):
        text = _show_atom(value, quoted=True)
        return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
    out: list[str] = []
    size = 0
    # Work stack of values to print and literal text (closers, spaces) as `_Lit`.
    todo: list[Any] = [value]
    while todo:
        if limit is not None and size > limit:
            return "".join(out)[: limit - 3] + "..."
        item = todo.pop()
        if isinstance(item, _Lit):
            piece = item.text
        elif isinstance(item, dict):
            piece = "{"
            todo.append(_Lit("}"))
            parts: list[Any] = []
            for k, v in item.items():
                if parts:
                    parts.append(_Lit(entries))
                key = _Lit(":" + k) if isinstance(k, str) and _is_keyword_name(k) else k
                parts.extend([key, _Lit(" "), v])
            todo.extend(reversed(parts))
        elif isinstance(item, list | tuple):
            piece = "["
            todo.append(_Lit("]"))
            parts = []
            for v in item:
                if parts:
                    parts.append(_Lit(" "))
                parts.append(v)
            todo.extend(reversed(parts))
        else:
            piece = _show_atom(item, quoted=True)
        out.append(piece)
        size += len(piece)
    text = "".join(out)
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


class _Lit:
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def equal(a: Any, b: Any) -> bool:
    """Deep equality where a boolean is never a number (`(= 1 true)` is false)."""
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if isinstance(x, bool) or isinstance(y, bool):
            if not (isinstance(x, bool) and isinstance(y, bool) and x == y):
                return False
        elif is_number(x) or is_number(y):
            if not (is_number(x) and is_number(y) and x == y):
                return False
        elif isinstance(x, list | tuple) or isinstance(y, list | tuple):
            if not (isinstance(x, list | tuple) and isinstance(y, list | tuple)):
                return False
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        elif isinstance(x, dict) or isinstance(y, dict):
            if not (isinstance(x, dict) and isinstance(y, dict)) or x.keys() != y.keys():
                return False
            stack.extend((x[k], y[k]) for k in x)
        elif x != y:
            return False
    return True


def _text(value: Any) -> str:
    """What `str` makes of one value: nil is empty, strings and keywords their text."""
    if value is None:
        return ""
    if isinstance(value, str):
        return str(value)
    return show_value(value)


def _lookup(coll: Any, key: Any, default: Any) -> tuple[bool, Any]:
    """(found, value) of `key` in a map, or of an index in a vector or string."""
    if isinstance(coll, dict):
        try:
            key = _hashable(key)
        except BuiltinError:
            return False, default
        if key in coll:
            return True, coll[key]
        return False, default
    is_index = isinstance(key, int) and not isinstance(key, bool)
    if isinstance(coll, list | tuple | str) and is_index and 0 <= key < len(coll):
        return True, coll[key]
    return False, default


def _path(fn: str, path: Any) -> list[Any]:
    _need(path, isinstance(path, list | tuple), "a vector of keys as the path", fn)
    return list(path)


# ---------------------------------------------------------------------------------------
# Run-time context


class MissingKey(BuiltinError):
    """`(ctx key)` found no such key and was given no default."""


@builtin("ctx", 0, 2, needs_context=True)
def ctx(context: dict[str, Any], key: Any = None, *default: Any) -> Any:
    """(ctx), (ctx :k), (ctx [:a :b]), (ctx :k default): read the run's context."""
    if key is None and not default:
        return copy_data(context)
    path = list(key) if isinstance(key, list | tuple) else [key]
    value: Any = context
    for i, step in enumerate(path):
        found, value = _lookup(value, step, None)
        if not found:
            if default:
                return default[0]
            where = f" under {show_value(path[:i], 60)}" if i else ""
            name = show_value(Keyword(step) if isinstance(step, str) else step, 60)
            raise MissingKey(f"the context has no {name}{where} (and no default was given)")
    # A copy: an action that changes its payload must not change the run's context.
    return copy_data(value)


def copy_data(value: Any) -> Any:
    """A deep copy of lists and dicts (other values are shared), without recursion."""
    if not isinstance(value, list | dict):
        return value
    out: list[Any] = [None]
    stack: list[tuple[Any, Any, Any]] = [(value, out, 0)]
    while stack:
        v, target, slot = stack.pop()
        if isinstance(v, list):
            items: list[Any] = [None] * len(v)
            target[slot] = items
            stack.extend((x, items, i) for i, x in enumerate(v))
        elif isinstance(v, dict):
            copied: dict[Any, Any] = dict.fromkeys(v)
            target[slot] = copied
            stack.extend((x, copied, k) for k, x in v.items())
        else:
            target[slot] = v
    return out[0]


# ---------------------------------------------------------------------------------------
# Strings, keywords


@builtin("str")
def str_(*values: Any) -> str:
    """(str x ...): the text of each value, joined; nil is empty."""
    return "".join(_text(v) for v in values)


@builtin("keyword", 1, 2)
def keyword(a: Any, b: Any = None) -> Keyword:
    """(keyword "name"), (keyword "ns" "name")."""
    for v in (a, b) if b is not None else (a,):
        _need(v, isinstance(v, str), "strings", "keyword")
    return Keyword(f"{a}/{b}" if b is not None else str(a))


@builtin("name", 1, 1)
def name(value: Any) -> str:
    """(name :ns/k) is "k": the name of a keyword without its namespace, or a string."""
    _need(value, isinstance(value, str), "a keyword or a string", "name")
    text = str(value)
    return text.rsplit("/", 1)[-1] if isinstance(value, Keyword) and len(text) > 1 else text


@builtin("upper-case", 1, 1)
def upper_case(value: Any) -> str:
    """(upper-case s)."""
    _need(value, isinstance(value, str), "a string", "upper-case")
    return str(value).upper()


@builtin("lower-case", 1, 1)
def lower_case(value: Any) -> str:
    """(lower-case s)."""
    _need(value, isinstance(value, str), "a string", "lower-case")
    return str(value).lower()


@builtin("join", 1, 2)
def join(a: Any, b: Any = None) -> str:
    """(join coll) or (join separator coll): the texts of the items, joined."""
    sep, coll = ("", a) if b is None else (a, b)
    _need(sep, isinstance(sep, str), "a string separator", "join")
    _need(coll, coll is None or isinstance(coll, list | tuple), "a vector", "join")
    return str(sep).join(_text(v) for v in coll or ())


# ---------------------------------------------------------------------------------------
# Arithmetic and comparison


@builtin("+")
def add(*values: Any) -> Any:
    """(+ x ...): the sum (0 for none)."""
    _numbers("+", values)
    return _result("+", sum(values, 0))


@builtin("-", 1)
def sub(first: Any, *rest: Any) -> Any:
    """(- x) negates; (- x y ...) subtracts."""
    _numbers("-", (first, *rest))
    if not rest:
        return -first
    for v in rest:
        first -= v
    return _result("-", first)


@builtin("*")
def mul(*values: Any) -> Any:
    """(* x ...): the product (1 for none)."""
    _numbers("*", values)
    out: Any = 1
    for v in values:
        out = _result("*", out * v)  # each step: a long product stops at the first overflow
    return out


@builtin("/", 1)
def div(first: Any, *rest: Any) -> Any:
    """(/ x) is 1/x; (/ x y ...) divides; exact integer quotients stay integers."""
    _numbers("/", (first, *rest))
    if not rest:
        first, rest = 1, (first,)
    for v in rest:
        if v == 0:
            raise BuiltinError("division by zero")
        if isinstance(first, int) and isinstance(v, int) and first % v == 0:
            first //= v
        else:
            try:
                first /= v
            except OverflowError:  # a huge integer over a small one
                raise BuiltinError("/: the result is too large for a float") from None
    return _result("/", first)


@builtin("mod", 2, 2)
def mod(a: Any, b: Any) -> Any:
    """(mod a b): the remainder, with the sign of b."""
    _numbers("mod", (a, b))
    if b == 0:
        raise BuiltinError("mod by zero")
    return a % b


@builtin("inc", 1, 1)
def inc(x: Any) -> Any:
    """(inc x) is x + 1."""
    _numbers("inc", (x,))
    return _result("inc", x + 1)


@builtin("dec", 1, 1)
def dec(x: Any) -> Any:
    """(dec x) is x - 1."""
    _numbers("dec", (x,))
    return _result("dec", x - 1)


@builtin("max", 1)
def max_(*values: Any) -> Any:
    """(max x ...)."""
    _numbers("max", values)
    return max(values)


@builtin("min", 1)
def min_(*values: Any) -> Any:
    """(min x ...)."""
    _numbers("min", values)
    return min(values)


@builtin("=", 1)
def eq(first: Any, *rest: Any) -> bool:
    """(= x y ...): all equal (deeply; 1 and 1.0 are equal, true and 1 are not)."""
    return all(equal(first, v) for v in rest)


@builtin("not=", 1)
def not_eq(first: Any, *rest: Any) -> bool:
    """(not= x y ...): not all equal."""
    return not eq(first, *rest)


def _compare(fn: str, ok: Callable[[Any, Any], bool]) -> Callable[..., bool]:
    def compare(*values: Any) -> bool:
        _numbers(fn, values)
        return all(ok(a, b) for a, b in itertools.pairwise(values))

    compare.__doc__ = f"({fn} x y ...): numbers in order."
    return compare


builtin("<", 1)(_compare("<", lambda a, b: a < b))
builtin(">", 1)(_compare(">", lambda a, b: a > b))
builtin("<=", 1)(_compare("<=", lambda a, b: a <= b))
builtin(">=", 1)(_compare(">=", lambda a, b: a >= b))


@builtin("not", 1, 1)
def not_(x: Any) -> bool:
    """(not x): true for nil and false."""
    return not is_truthy(x)


@builtin("nil?", 1, 1)
def is_nil(x: Any) -> bool:
    """(nil? x)."""
    return x is None


@builtin("identity", 1, 1)
def identity(x: Any) -> Any:
    """(identity x) is x."""
    return x


# ---------------------------------------------------------------------------------------
# Collections


@builtin("get", 2, 3)
def get(coll: Any, key: Any, default: Any = None) -> Any:
    """(get m k), (get m k default): a map's value, or a vector's element by index."""
    return _lookup(coll, key, default)[1]


@builtin("get-in", 2, 3)
def get_in(coll: Any, path: Any, default: Any = None) -> Any:
    """(get-in m [k ...]), (get-in m [k ...] default)."""
    value = coll
    for key in _path("get-in", path):
        found, value = _lookup(value, key, None)
        if not found:
            return default
    return value


def _assoc1(fn: str, coll: Any, key: Any, value: Any) -> Any:
    if coll is None or isinstance(coll, dict):
        out = dict(coll or {})
        out[_hashable(key)] = value
        return out
    if isinstance(coll, list | tuple):
        _need(key, isinstance(key, int) and not isinstance(key, bool), "an integer index", fn)
        if not 0 <= key <= len(coll):
            raise BuiltinError(f"{fn}: index {key} is out of range for a vector of {len(coll)}")
        items = list(coll)
        if key == len(items):
            items.append(value)
        else:
            items[key] = value
        return items
    raise BuiltinError(f"{fn} expects a map or a vector, got {type_name(coll)}")


@builtin("assoc", 3)
def assoc(coll: Any, key: Any, value: Any, *more: Any) -> Any:
    """(assoc m k v ...): a copy with keys set (a vector: an index, or its length to append)."""
    if len(more) % 2:
        raise BuiltinError("assoc expects keys and values in pairs")
    out = _assoc1("assoc", coll, key, value)
    for k, v in zip(more[::2], more[1::2], strict=True):
        out = _assoc1("assoc", out, k, v)
    return out


@builtin("assoc-in", 3, 3)
def assoc_in(coll: Any, path: Any, value: Any) -> Any:
    """(assoc-in m [k ...] v): a copy with `v` at the path, creating maps on the way."""
    keys = _path("assoc-in", path)
    if not keys:
        return value
    # Walk down remembering each level, then rebuild bottom-up (no recursion).
    levels = [coll]
    for key in keys[:-1]:
        found, inner = _lookup(levels[-1], key, None)
        levels.append(inner if found else None)
    out = value
    for key, level in zip(reversed(keys), reversed(levels), strict=True):
        out = _assoc1("assoc-in", level, key, out)
    return out


@builtin("dissoc", 1)
def dissoc(coll: Any, *keys: Any) -> Any:
    """(dissoc m k ...): a copy without those keys."""
    if coll is None:
        return None
    _need(coll, isinstance(coll, dict), "a map", "dissoc")
    drop = {_hashable(k) for k in keys}
    return {k: v for k, v in coll.items() if k not in drop}


@builtin("merge")
def merge(*maps: Any) -> Any:
    """(merge m ...): one map with the keys of all (later ones win); nils are skipped."""
    if all(m is None for m in maps):
        return None
    out: dict[Any, Any] = {}
    for m in maps:
        _need(m, m is None or isinstance(m, dict), "maps", "merge")
        out.update(m or {})
    return out


@builtin("count", 1, 1)
def count(coll: Any) -> int:
    """(count x): the number of items of a vector, map or string (0 for nil)."""
    if coll is None:
        return 0
    _need(coll, isinstance(coll, list | tuple | dict | str), "a vector, map or string", "count")
    return len(coll)


@builtin("empty?", 1, 1)
def is_empty(coll: Any) -> bool:
    """(empty? x): nil or no items."""
    return count(coll) == 0


@builtin("range", 1, 3)
def range_(a: Any, b: Any = None, step: Any = None) -> list[int]:
    """(range end), (range start end), (range start end step): integers, end excluded."""
    args = (a,) if b is None else (a, b) if step is None else (a, b, step)
    for v in args:
        _need(v, isinstance(v, int) and not isinstance(v, bool), "integers", "range")
    if step == 0:
        raise BuiltinError("range step cannot be 0")
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise BuiltinError(f"range of {len(r)} numbers is too large (the limit is {MAX_RANGE})")
    return list(r)


def _items(fn: str, coll: Any) -> list[Any]:
    """The items of a sequence argument: a vector, a map's [k v] entries; nil is empty."""
    if coll is None:
        return []
    if isinstance(coll, dict):
        return [[k, v] for k, v in coll.items()]
    _need(coll, isinstance(coll, list | tuple), "vectors", fn)
    return list(coll)


@builtin("concat")
def concat(*colls: Any) -> list[Any]:
    """(concat xs ...): one vector with the items of all."""
    out: list[Any] = []
    for c in colls:
        out.extend(_items("concat", c))
    return out


@builtin("list")
def list_(*items: Any) -> list[Any]:
    """(list x ...): a vector of the arguments (lists and vectors are the same data)."""
    return list(items)


@builtin("vector")
def vector(*items: Any) -> list[Any]:
    """(vector x ...)."""
    return list(items)


@builtin("hash-map")
def hash_map(*kvs: Any) -> dict[Any, Any]:
    """(hash-map k v ...)."""
    if len(kvs) % 2:
        raise BuiltinError("hash-map expects keys and values in pairs")
    return {_hashable(k): v for k, v in zip(kvs[::2], kvs[1::2], strict=True)}


@builtin("first", 1, 1)
def first(coll: Any) -> Any:
    """(first xs): the first item, or nil."""
    items = _items("first", coll)
    return items[0] if items else None


@builtin("rest", 1, 1)
def rest(coll: Any) -> list[Any]:
    """(rest xs): all items but the first."""
    return _items("rest", coll)[1:]


@builtin("last", 1, 1)
def last(coll: Any) -> Any:
    """(last xs): the last item, or nil."""
    items = _items("last", coll)
    return items[-1] if items else None


@builtin("nth", 2, 3)
def nth(coll: Any, index: Any, *default: Any) -> Any:
    """(nth xs i), (nth xs i default): the item at index i."""
    items = _items("nth", coll)
    _need(index, isinstance(index, int) and not isinstance(index, bool), "an integer index", "nth")
    if 0 <= index < len(items):
        return items[index]
    if default:
        return default[0]
    raise BuiltinError(f"nth: index {index} is out of range for {len(items)} items")


@builtin("conj", 1)
def conj(coll: Any, *items: Any) -> Any:
    """(conj xs x ...): a vector with items added at the end; a map with [k v] entries added."""
    if isinstance(coll, dict):
        out = dict(coll)
        for item in items:
            _need(item, isinstance(item, list | tuple) and len(item) == 2, "[k v] entries", "conj")
            out[_hashable(item[0])] = item[1]
        return out
    return [*_items("conj", coll), *items]


@builtin("contains?", 2, 2)
def contains(coll: Any, key: Any) -> bool:
    """(contains? m k): the map has the key (or the vector has the index)."""
    return _lookup(coll, key, None)[0] if not isinstance(coll, str) else False


@builtin("keys", 1, 1)
def keys(m: Any) -> list[Any]:
    """(keys m): the keys of a map, in order."""
    _need(m, m is None or isinstance(m, dict), "a map", "keys")
    return [list(k) if isinstance(k, tuple) else k for k in (m or {})]


@builtin("vals", 1, 1)
def vals(m: Any) -> list[Any]:
    """(vals m): the values of a map, in order."""
    _need(m, m is None or isinstance(m, dict), "a map", "vals")
    return list((m or {}).values())
