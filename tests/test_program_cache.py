"""Programs are read once (issue 17): compiled trees kept by content hash
(`lang.cache`), read again after an edit of the program or of a file it imports."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ablauf_lang import api
from ablauf_lang.errors import AblaufError
from ablauf_lang.lang import cache
from tests.commands import ablauf
from tests.strategies import workflow_sources

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module", autouse=True)
def disk_only() -> Iterator[None]:
    """The tests of the cache directory see it alone: no tree kept in memory (the tests
    of the memory layer turn it on)."""
    before = cache.MEMORY_ENTRIES
    cache.MEMORY_ENTRIES = 0
    cache.clear_memory()
    yield
    cache.MEMORY_ENTRIES = before
    cache.clear_memory()


@pytest.fixture
def memory(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(cache, "MEMORY_ENTRIES", 4)
    cache.clear_memory()
    yield
    cache.clear_memory()


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    where = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_ENV, str(where))
    return where


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The programs actually read and compiled (not taken from the cache)."""
    seen: list[str] = []
    real = cache.compile_source

    def counting(source: str, filename: str | None = None, **kw: Any) -> Any:
        seen.append(str(filename))
        return real(source, filename, **kw)

    monkeypatch.setattr(cache, "compile_source", counting)
    return seen


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.pickle")) if folder.exists() else []


def test_a_file_is_read_once_and_again_after_an_edit(
    tmp_path: Path, folder: Path, reads: list[str]
) -> None:
    program = tmp_path / "p.abl"
    program.write_text('(do!! (log!! "a") (log!! "b"))\n')
    first = api.compile(program.read_text(), str(program))
    second = api.compile(program.read_text(), str(program))
    assert second == first
    assert reads == [str(program)]  # the second came from the cache
    assert len(entries(folder)) == 1
    program.write_text('(do!! (log!! "a") (log!! "B"))\n')
    edited = api.compile(program.read_text(), str(program))
    assert edited != first
    assert reads == [str(program), str(program)]
    assert len(entries(folder)) == 2


def test_an_edit_of_an_imported_file_is_read_again(
    tmp_path: Path, folder: Path, reads: list[str]
) -> None:
    (tmp_path / "lib.abl").write_text('(defn hello [] (log!! "one"))\n')
    program = tmp_path / "main.abl"
    program.write_text('(import "lib.abl")\n(hello)\n')
    first = api.compile(program.read_text(), str(program))
    assert api.compile(program.read_text(), str(program)) == first
    assert len(reads) == 1
    (tmp_path / "lib.abl").write_text('(defn hello [] (log!! "two"))\n')
    again = api.compile(program.read_text(), str(program))
    assert len(reads) == 2
    assert again != first
    (tmp_path / "lib.abl").unlink()
    with pytest.raises(AblaufError, match="no such file"):
        api.compile(program.read_text(), str(program))  # gone: read, and refused


def test_what_is_never_cached(tmp_path: Path, folder: Path, reads: list[str]) -> None:
    source = '(log!! "x")'
    for name in (None, "<repl>", "<stdin>", str(tmp_path / "not-there.abl")):
        api.compile(source, name)
        api.compile(source, name)
    assert len(reads) == 8
    assert entries(folder) == []
    program = tmp_path / "bad.abl"
    program.write_text("(do!! (log!! 1)\n")
    for _ in range(2):
        with pytest.raises(Exception, match="unclosed list"):
            api.compile(program.read_text(), str(program))
    assert entries(folder) == []  # errors are not kept


def test_a_process_compiles_a_text_once_and_again_after_an_edit_of_an_import(
    tmp_path: Path, folder: Path, reads: list[str], memory: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = '(log!! "x")'
    first = api.compile(source)
    assert api.compile(source) is first  # kept in memory: the same tree
    assert reads == ["None"]
    assert entries(folder) == []  # a text is never kept on disk
    # A text's file imports are found from the working directory: checked on every hit.
    monkeypatch.chdir(tmp_path)
    Path("lib.abl").write_text('(defn hello [] (log!! "one"))\n')
    text = '(import "lib.abl")\n(hello)\n'
    one = api.compile(text)
    assert api.compile(text) is one
    Path("lib.abl").write_text('(defn hello [] (log!! "two"))\n')
    two = api.compile(text)
    assert two != one
    assert reads == ["None", "None", "None"]
    # Another directory, another entry; a file's tree is kept too (and on disk).
    other = tmp_path / "other"
    other.mkdir()
    (other / "lib.abl").write_text('(defn hello [] (log!! "three"))\n')
    monkeypatch.chdir(other)
    assert "three" in repr(api.compile(text))
    program = tmp_path / "p.abl"
    program.write_text(source)
    tree = api.compile(source, str(program))
    assert api.compile(source, str(program)) is tree
    assert len(reads) == 5
    assert len(entries(folder)) == 1
    # At most MEMORY_ENTRIES trees: the least recently used go first.
    for i in range(cache.MEMORY_ENTRIES):
        api.compile(f"(log!! {i})")
    api.compile(source)
    assert len(reads) == 5 + cache.MEMORY_ENTRIES + 1


def test_the_cache_can_be_turned_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reads: list[str]
) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, "off")
    assert cache.cache_dir() is None
    program = tmp_path / "p.abl"
    program.write_text('(log!! "x")\n')
    api.compile(program.read_text(), str(program))
    api.compile(program.read_text(), str(program))
    assert len(reads) == 2


def test_a_damaged_entry_is_read_again_and_rewritten(
    tmp_path: Path, folder: Path, reads: list[str]
) -> None:
    program = tmp_path / "p.abl"
    program.write_text('(log!! "x")\n')
    first = api.compile(program.read_text(), str(program))
    (entry,) = entries(folder)
    for garbage in (b"", b"not a pickle", b"\x80\x05K\x01.", entry.read_bytes()[:20]):
        entry.write_bytes(garbage)
        assert api.compile(program.read_text(), str(program)) == first
    assert len(reads) == 5
    assert api.compile(program.read_text(), str(program)) == first
    assert len(reads) == 5  # rewritten whole: a hit again


def test_a_cache_that_cannot_be_written_is_no_error(
    tmp_path: Path, folder: Path, reads: list[str]
) -> None:
    if os.geteuid() == 0:
        blocker = folder  # root writes anywhere: a file where the folder should be
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("a file, not a folder")
    else:
        folder.mkdir()
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    program = tmp_path / "p.abl"
    program.write_text('(log!! "x")\n')
    assert api.compile(program.read_text(), str(program)) is not None
    assert api.compile(program.read_text(), str(program)) is not None
    assert len(reads) == 2


def test_at_most_max_entries_are_kept(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache, "MAX_ENTRIES", 3)
    program = tmp_path / "p.abl"
    for i in range(6):
        program.write_text(f"(log!! {i})\n")
        api.compile(program.read_text(), str(program))
    assert len(entries(folder)) == 3


@settings(max_examples=60, deadline=None)
@given(source=workflow_sources, name=st.sampled_from(["a.abl", "b.abl"]))
def test_a_tree_from_the_cache_is_the_tree_compiled(source: str, name: str) -> None:
    import tempfile

    before = os.environ.get(cache.CACHE_ENV)
    with tempfile.TemporaryDirectory() as where:
        os.environ[cache.CACHE_ENV] = os.path.join(where, "cache")
        try:
            _same_tree(source, Path(where) / name)
        finally:
            if before is None:
                del os.environ[cache.CACHE_ENV]
            else:
                os.environ[cache.CACHE_ENV] = before


def _same_tree(source: str, program: Path) -> None:
    program.write_text(source)
    try:
        fresh = api.compile(source, str(program))
    except AblaufError:
        return
    assert entries(program.parent / "cache")
    cached = api.compile(source, str(program))
    assert cached == fresh
    assert api.make_job(cached).to_json() == api.make_job(fresh).to_json()


def test_running_a_file_twice_uses_its_entry(tmp_path: Path) -> None:
    where = tmp_path / "cache"
    env = {cache.CACHE_ENV: str(where), "ABLAUF_STORE": "memory:"}
    hello = str(EXAMPLES / "hello.abl")
    first = ablauf("run", hello, "--json", env=env)
    assert first.returncode == 0, first.stderr
    (entry,) = entries(where)
    os.utime(entry, (1_000_000_000, 1_000_000_000))
    second = ablauf("run", hello, "--json", env=env)
    assert second.returncode == 0
    assert entries(where) == [entry]
    assert entry.stat().st_mtime > 1_000_000_000  # taken from the cache: used just now


@pytest.mark.parametrize("levels", [40, 60, 300, 1000])
def test_a_deep_tree_compiles_every_time_and_never_crashes(tmp_path: Path, levels: int) -> None:
    # Pickling recurses in C: a deep tree could overflow the C stack, so it is not kept.
    program = tmp_path / "deep.abl"
    program.write_text("(try!! " * levels + "(fail!! 1)" + ")" * levels + "\n")
    where = tmp_path / "cache"
    for _ in range(2):
        done = ablauf("check", str(program), env={cache.CACHE_ENV: str(where)})
        assert done.returncode in (0, 2), done.stderr
    assert bool(entries(where)) == (2 * levels + 1 <= cache.MAX_NESTING)


def test_two_names_of_one_file_keep_their_own_positions(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tree's positions name the file as it was given: one entry per name.
    monkeypatch.chdir(tmp_path)
    Path("p.abl").write_text('(log!! "x")\n')
    for name in ("p.abl", "./p.abl", "p.abl"):
        root = api.compile(Path(name).read_text(), name)
        assert root.span is not None
        assert root.span.filename == name
    assert len(entries(folder)) == 2
