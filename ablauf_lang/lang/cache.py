"""Compiled programs kept by content hash: a program file is read once.

`compile_file_source(source, filename)` compiles a program that comes from a file, and
keeps the tree in the cache directory under a key made of the text, the file's name (the
tree's positions name it, and imports are found from it), whether file imports are
allowed, and the compiler itself (the size and modification time of every file of the
installed package, so an upgrade or an edit of ablauf reads programs again). Running the
same file again unpickles its tree instead of reading and compiling it; an edited file
(or an edited file it imports: their hashes are kept beside the tree and checked) is
read again.

A process also keeps the trees it compiled last in memory (`MEMORY_ENTRIES`, by text,
name and imports allowed; imported files checked as for the disk): a service submitting
the same program again and again, from a file or as a text, compiles it once.

Where: `$ABLAUF_CACHE` (a directory), else the user's cache directory
(`~/.cache/ablauf/programs` on Linux); `ABLAUF_CACHE=off` turns both off. A text typed
in a REPL or given without a file is never kept on disk. The entries are pickles, like
Python's own `__pycache__`: the directory is the user's (made private), and an entry
that cannot be read is ignored and written again, never an error. At most `MAX_ENTRIES`
entries are kept (the least recently used go first).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import tempfile
import threading
from collections import OrderedDict
from contextlib import suppress
from pathlib import Path
from typing import Any

from ablauf_lang.engine.kinds import Node
from ablauf_lang.errors import AblaufError
from ablauf_lang.lang.compiler import compile_source
from ablauf_lang.lang.loader import Loader, is_real_file, text_digest
from ablauf_lang.lang.reader import decode_source

__all__ = [
    "CACHE_ENV",
    "MAX_ENTRIES",
    "MEMORY_ENTRIES",
    "cache_dir",
    "clear_memory",
    "compile_file_source",
]

CACHE_ENV = "ABLAUF_CACHE"
MAX_ENTRIES = 1000
MEMORY_ENTRIES = 128  # trees a process keeps in memory
MAX_NESTING = 100  # nodes deep: a deeper tree is not cached (see `_within`)
FORMAT = 1  # the entries' own format
_SUFFIX = ".pickle"


def cache_dir() -> Path | None:
    """Where compiled programs are kept; None when the cache is off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "no") else Path(value)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("ablauf", appauthor=False)) / "programs"


@functools.cache
def _compiler_key() -> str:
    """What the compiled trees depend on besides the program: the package's own files."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256(f"format {FORMAT}".encode())
    for path in sorted(package.rglob("*")):
        if path.suffix in (".py", ".abl", ".lark") and "__pycache__" not in path.parts:
            stat = path.stat()
            digest.update(f"{path.relative_to(package)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _key(source: str, filename: str, file_imports: bool | None) -> str:
    # The name as given (the tree's positions show it) and the file it names (where its
    # imports are found from).
    digest = hashlib.sha256(_compiler_key().encode())
    where = f"\0{filename}\0{os.path.abspath(filename)}\0{file_imports}\0"
    digest.update(where.encode("utf-8", "replace"))
    digest.update(text_digest(source).encode())
    return digest.hexdigest()


def compile_file_source(
    source: str, filename: str | None = None, *, file_imports: bool | None = None
) -> Node:
    """`compile_source`, with the tree kept in memory, and in the cache directory when
    `filename` is a real file (errors are never cached: a program that does not compile
    is read every time)."""
    folder = cache_dir()
    if folder is None:
        return compile_source(source, filename, file_imports=file_imports)
    # The name as given, and where it (or a text's imports) is found from.
    where = _cwd() if filename is None else _absolute(filename)
    memo = (source, filename, where, file_imports)
    kept = _remembered(memo)
    if kept is not None:
        return kept
    entry = None
    if _cacheable(filename):
        assert filename is not None
        entry = folder / (_key(source, filename, file_imports) + _SUFFIX)
        cached = _load(entry)
        if cached is not None:
            root, files = cached
            _remember(memo, root, files)
            return root
    loader = Loader(file_imports=file_imports)
    root = compile_source(source, filename, file_imports=file_imports, loader=loader)
    _remember(memo, root, dict(loader.files))
    if entry is not None and _within(root, MAX_NESTING):
        _store(folder, entry, {"format": FORMAT, "files": dict(loader.files), "root": root})
    return root


_memory: OrderedDict[tuple[Any, ...], tuple[Node, dict[str, str]]] = OrderedDict()
_memory_lock = threading.Lock()


def _cwd() -> str:
    try:
        return os.getcwd()
    except OSError:  # removed meanwhile
        return ""


def _absolute(filename: str) -> str:
    try:
        return os.path.abspath(filename)
    except (OSError, ValueError):  # a name no file can have: keyed as given
        return filename


def _remembered(memo: tuple[Any, ...]) -> Node | None:
    """The tree this process compiled for `memo`, if its imported files are unchanged."""
    with _memory_lock:
        kept = _memory.get(memo)
        if kept is not None:
            _memory.move_to_end(memo)
    if kept is None:
        return None
    root, files = kept
    if all(_same(p, d) for p, d in files.items()):
        return root
    with _memory_lock:
        _memory.pop(memo, None)
    return None


def clear_memory() -> None:
    """Forget the trees this process kept in memory."""
    with _memory_lock:
        _memory.clear()


def _remember(memo: tuple[Any, ...], root: Node, files: dict[str, str]) -> None:
    with _memory_lock:
        _memory[memo] = (root, files)
        _memory.move_to_end(memo)
        while len(_memory) > MEMORY_ENTRIES:
            _memory.popitem(last=False)


def _within(root: Node, limit: int) -> bool:
    """Whether the tree nests at most `limit` nodes deep. Pickling recurses in C, a few
    frames per level, and a deep enough tree overflows the C stack instead of raising
    RecursionError: a deeper tree is compiled every time rather than cached. (The values
    inside a tree are bounded by the compiler: a payload nests at most 100 levels.)"""
    todo: list[tuple[Any, int]] = [(root, 1)]
    while todo:
        node, depth = todo.pop()
        if depth > limit:
            return False
        children = getattr(node, "children", None)
        if children:
            todo.extend((child, depth + 1) for child in children)
    return True


def _cacheable(filename: str | None) -> bool:
    if not is_real_file(filename):
        return False
    assert filename is not None
    try:
        return os.path.isfile(filename)
    except (OSError, ValueError):
        return False


def _load(entry: Path) -> tuple[Node, dict[str, str]] | None:
    try:
        data: Any = pickle.loads(entry.read_bytes())
    except Exception:  # none yet, or a damaged or foreign entry: read the program again
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    files = data.get("files")
    if not isinstance(files, dict) or not all(_same(p, d) for p, d in files.items()):
        return None  # an imported file changed (or is gone)
    root = data.get("root")
    if root is None:
        return None
    with suppress(OSError):
        os.utime(entry)  # recently used: pruned last
    return root, files


def _same(path: Any, digest: Any) -> bool:
    """Whether an imported file still reads (as the loader reads it) to this digest."""
    try:
        text = decode_source(Path(path).read_bytes(), str(path))
    except (OSError, AblaufError, TypeError, ValueError):
        return False
    return bool(text_digest(text) == digest)


def _store(folder: Path, entry: Path, data: dict[str, Any]) -> None:
    """Write an entry whole (a temporary file, then a rename). A cache that cannot be
    written (read-only, full, a tree pickle cannot take) is no cache, never an error."""
    temporary = None
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(temporary, entry)
        temporary = None
        _prune(folder)
    except Exception:
        return
    finally:
        if temporary is not None:
            with suppress(OSError):
                os.unlink(temporary)


def _prune(folder: Path) -> None:
    """Keep at most MAX_ENTRIES entries: the least recently used go."""
    entries = [p for p in folder.iterdir() if p.suffix == _SUFFIX]
    if len(entries) <= MAX_ENTRIES:
        return
    entries.sort(key=lambda p: p.stat().st_mtime)
    for old in entries[: len(entries) - MAX_ENTRIES]:
        with suppress(OSError):
            old.unlink()
