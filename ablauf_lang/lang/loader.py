"""Reading the modules `(import ...)` names: the only file I/O of a compile.

`Loader` is what one compile shares across the files it reads: their sources (for error
carets), the modules already loaded, and the import chain (to report cycles). It finds a
module (`find`: `std/name` in the standard library, or a `.abl` file inside the program's
directory tree) and reads its forms (`read`, cached per text); it refuses with
`ImportRefused`, whose message the compiler places at the import's path. The compiler
itself runs a module's declarations and never touches the file system.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from ablauf_lang.errors import Refusal
from ablauf_lang.lang.reader import Forms, decode_source, read

__all__ = [
    "FILE_IMPORTS",
    "MAX_MODULE_BYTES",
    "STD_PREFIX",
    "ImportRefused",
    "Loader",
    "Module",
    "is_real_file",
    "stdlib_modules",
    "text_digest",
]

STD_PREFIX = "std/"

# Whether `(import "file.abl")` may read files, when a compile does not say
# (`compile_source(..., file_imports=False)`): embedders may turn it off here for all.
# `std/` modules are always available.
FILE_IMPORTS = True

# The largest module file an import reads.
MAX_MODULE_BYTES = 16 * 1024 * 1024


class ImportRefused(Refusal):
    """An import that cannot be read; `message` says why (the compiler adds where)."""


@dataclass(frozen=True, slots=True)
class Module:
    """A module an import names: its key (one per file), the name shown in messages, and
    how to read its text (which may refuse: no such file, too large...)."""

    key: str
    shown: str
    read_text: Callable[[], str]


@lru_cache(maxsize=64)
def _read_module(text: str, filename: str) -> Forms:
    """An imported module's forms, read once per text (forms are immutable values)."""
    return read(text, filename)


def stdlib_modules() -> list[str]:
    """The standard library's modules, as imported: `std/retry`, ..."""
    root = resources.files("ablauf_lang.stdlib")
    return sorted(
        STD_PREFIX + entry.name[: -len(".abl")]
        for entry in root.iterdir()
        if entry.name.endswith(".abl")
    )


def text_digest(text: str) -> str:
    """The sha256 of a text (as UTF-8; lone surrogates escaped), in hex."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def is_real_file(filename: str | None) -> bool:
    """True for a file name (not `<input>`, `<repl>`, None, or a name no file can have)."""
    if not filename or str(filename).startswith("<"):
        return False
    return "\x00" not in filename and _encodable(filename)


def _encodable(path: str) -> bool:
    """True when the file system can take `path` as a name (no lone surrogates...)."""
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        return False
    return True


def _is_file(entry: Any) -> bool:
    """Whether a standard library entry is a file; False for a name no file can have (too
    long: pathlib raises for that, where `os.path.isfile` says False)."""
    try:
        return bool(entry.is_file())
    except (OSError, ValueError):
        return False


def _display_dir(path: str) -> str:
    """`path` as a person would write it: relative to the current directory when inside."""
    here = os.path.realpath(os.curdir)
    if path == here:
        return "the current directory"
    return path


@dataclass
class Loader:
    """What one compile shares across the files it reads: sources, modules, the import chain.

    `root`: the directory tree file imports may read (the program's own directory, or the
    current directory for a program without a file), set by the first compiler.
    `file_imports`: False allows `std/` imports only (None: `FILE_IMPORTS`).
    """

    sources: dict[str, str] = field(default_factory=dict)  # filename -> text (for carets)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> its definitions
    loading: list[tuple[str, str]] = field(default_factory=list)  # (key, shown name) chain
    root: str | None = None
    file_imports: bool | None = None
    # The files imported (not the standard library): real path -> sha256 of the text read.
    files: dict[str, str] = field(default_factory=dict)

    def start(self, source: str | None, filename: str | None) -> None:
        """Record a file being compiled: its source, and (the first) the import root."""
        if filename is not None and source is not None:
            self.sources[filename] = source
        if not self.loading and is_real_file(filename):
            # The program's own file heads the import chain, so importing it back is a cycle.
            assert filename is not None
            self.loading.append((os.path.realpath(filename), filename))
        if self.root is None:
            here = filename if is_real_file(filename) else None
            self.root = os.path.realpath(os.path.dirname(here) if here else os.curdir)

    def cycle(self, module: Module) -> str | None:
        """The import chain back to `module` when importing it now is a cycle, else None."""
        keys = [k for k, _ in self.loading]
        if module.key not in keys:
            return None
        chain = [name for _, name in self.loading[keys.index(module.key) :]]
        return " -> ".join([*chain, module.shown])

    def read(self, module: Module) -> tuple[str, Forms]:
        """The text and forms of a module (ImportRefused when it cannot be read)."""
        text = module.read_text()
        self.sources[module.shown] = text
        if not module.key.startswith("std:"):
            self.files[module.key] = text_digest(text)
        return text, _read_module(text, module.shown)

    def find(self, path: str, importer: str | None) -> Module:
        """The module an import path names, `std/name` or a file relative to `importer`."""
        if "\x00" in path or not _encodable(path):
            # The file system cannot even be asked about such a name.
            raise ImportRefused(f"cannot import {path!r}: not a file name")
        if path.startswith(STD_PREFIX):
            name = path[len(STD_PREFIX) :].removesuffix(".abl")
            entry = resources.files("ablauf_lang.stdlib").joinpath(name + ".abl")
            if not name or "/" in name or not _is_file(entry):
                known = ", ".join(stdlib_modules())
                raise ImportRefused(
                    f'cannot import "{path}": the standard library has no module {name!r} '
                    f"(it has {known})"
                )
            return Module(
                "std:" + name, f"{STD_PREFIX}{name}.abl", lambda: entry.read_text("utf-8")
            )
        allowed = self.file_imports
        if not (FILE_IMPORTS if allowed is None else allowed):
            raise ImportRefused(
                f'cannot import "{path}": importing files is turned off here '
                f"(only the standard library can be imported: {', '.join(stdlib_modules())})"
            )
        here = importer if is_real_file(importer) else None
        base = os.path.dirname(here) if here else ""
        shown = os.path.normpath(os.path.join(base, path))
        if not os.path.splitext(shown)[1] and not os.path.isfile(shown):
            shown += ".abl"
        full = os.path.realpath(shown)
        root = self.root or os.path.realpath(os.curdir)
        where = f"relative to {base}" if base else "in the current directory"

        def refuse(why: str) -> ImportRefused:
            return ImportRefused(f'cannot import "{path}": {why}')

        # Only .abl files inside the program's directory tree (links followed) are read:
        # a program cannot make the compiler read, or show, any other file.
        if not shown.endswith(".abl") or not full.endswith(".abl"):
            raise refuse("only .abl files can be imported")
        if os.path.commonpath([root, full]) != root:
            raise refuse(
                f"it is outside {_display_dir(root)}, the directory tree a program may "
                "import from (its own directory, or the current one)"
            )

        def read_text() -> str:
            try:
                if not os.path.exists(full):
                    raise refuse(f"no such file {where}")
                if not os.path.isfile(full):
                    raise refuse("not a regular file")
                if os.path.getsize(full) > MAX_MODULE_BYTES:
                    raise refuse(f"the file is larger than {MAX_MODULE_BYTES // 2**20} MB")
                with open(full, "rb") as f:
                    data = f.read(MAX_MODULE_BYTES + 1)
            except OSError as exc:
                raise refuse(exc.strerror or type(exc).__name__) from None
            return decode_source(data, shown)

        return Module(full, shown, read_text)
