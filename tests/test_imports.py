"""`import`: files relative to the importing file, the standard library, cycles, errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pyrsistent import pvector

import ablauf_lang
from ablauf_lang.engine.kinds import Leaf, Node, Seq, Try
from ablauf_lang.engine.nodes import LeafState, Status
from ablauf_lang.errors import AblaufCompileError, AblaufSyntaxError
from ablauf_lang.lang import loader as loader_module
from ablauf_lang.lang.compiler import Compiler, compile_forms, compile_source
from ablauf_lang.lang.evaluator import Closure
from ablauf_lang.lang.loader import stdlib_modules
from ablauf_lang.lang.reader import read

DATA = Path(__file__).parent / "data"


def compile_file(path: Path, filename: str | None = None) -> Node:
    return compile_source(path.read_text(), str(path) if filename is None else filename)


def log(node_id: int, payload: Any) -> Leaf:
    return Leaf(node_id, "action/log", payload)


def seq(node_id: int, *children: Node) -> Seq:
    return Seq(node_id, pvector(children))


MAIN = seq(
    0,
    log(1, "hello ada"),
    Try(2, pvector([seq(3, log(4, "HELLO GRACE")), seq(5, log(6, "HELLO GRACE")), seq(7)])),
)


def test_imports_resolve_against_the_importing_file() -> None:
    assert compile_file(DATA / "main.abl") == MAIN


def test_a_relative_filename_works_from_the_current_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(DATA.parent)
    assert compile_file(DATA / "main.abl", "data/main.abl") == MAIN


def test_without_a_filename_imports_resolve_against_the_current_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(DATA)
    source = '(import "lib/helpers") (greet "x")'  # the .abl extension may be left out
    assert compile_source(source) == log(0, "hello x")
    assert compile_source(source, "<repl>") == log(0, "hello x")


def test_eval_imports_relative_to_its_filename() -> None:
    path = DATA / "main.abl"
    run = ablauf_lang.eval(path.read_text(), filename=str(path))
    assert run.status is Status.SUCCESS
    assert [leaf.output for leaf in run.job.leaves() if leaf.result is LeafState.SUCCESS] == [
        "hello ada",
        "HELLO GRACE",
    ]


def test_a_module_exports_its_own_definitions_only() -> None:
    source = '(import "lib/helpers.abl") (log!! prefix)'
    with pytest.raises(AblaufCompileError, match="unbound symbol prefix"):
        compile_source(source, str(DATA / "x.abl"))


def test_a_module_imported_twice_is_loaded_once() -> None:
    assert compile_file(DATA / "diamond.abl") == seq(0, log(1, "hello "), log(2, "hello x"))
    text = '(import "lib/shared.abl") (import "lib/helpers.abl" :as h) (import "lib/helpers.abl")'
    compiler = Compiler(text, str(DATA / "x.abl"))
    compiler.module(read(text, str(DATA / "x.abl")))
    assert isinstance(compiler.env["greet"], Closure)
    assert compiler.env["greet"] is compiler.env["h/greet"]


def test_as_and_only() -> None:
    source = (
        '(import "std/retry" :as r) (import "std/deploy" :only [rolling])'
        " (r/with-fallback (rolling [1] (fn [h] (log!! h))) (log!! :fallback))"
    )
    root = compile_source(source)
    assert isinstance(root, Try)
    with pytest.raises(
        AblaufCompileError, match="unknown form with-fallback; did you mean r/with-fallback"
    ):
        compile_source('(import "std/retry" :as r) (with-fallback (log!! 1) (log!! 2))')
    with pytest.raises(AblaufCompileError, match="unknown form canary"):
        compile_source('(import "std/deploy" :only [rolling]) (canary [1] (fn [h] (log!! h)))')


def test_every_standard_module_loads_and_defines_functions() -> None:
    modules = stdlib_modules()
    assert {"std/retry", "std/deploy"} <= set(modules)
    for name in modules:
        compiler = Compiler()
        exports = compiler.load(name, None)
        assert exports
        assert all(isinstance(v, Closure) for v in exports.values())


IMPORT_ERRORS = [
    # file, source, message fragment, line, column
    (
        "x.abl",
        '(import "nope.abl") (log!! 1)',
        'cannot import "nope.abl": no such file relative to',
        1,
        9,
    ),
    ("x.abl", '(import "lib") (log!! 1)', 'cannot import "lib"', 1, 9),
    (
        "x.abl",
        '(import "std/nope") (log!! 1)',
        "the standard library has no module 'nope' (it has std/deploy, std/retry",
        1,
        9,
    ),
    (  # a name no file can have (too long): pathlib raises for it, the loader must not
        "x.abl",
        '(import "std/' + "9" * 5000 + '") (log!! 1)',
        "the standard library has no module '999",
        1,
        9,
    ),
    ("x.abl", "(import :std/retry) (log!! 1)", "import needs a path in a string", 1, 9),
    ("x.abl", '(import "std/retry" :as) (log!! 1)', "import option :as needs a value", 1, 21),
    (
        "x.abl",
        '(import "std/retry" :as "r") (log!! 1)',
        "the name after :as must be a symbol",
        1,
        25,
    ),
    (
        "x.abl",
        '(import "std/retry" :only x) (log!! 1)',
        "import :only needs a vector of names",
        1,
        27,
    ),
    (
        "x.abl",
        '(import "std/retry" :also 1) (log!! 1)',
        "unknown import option :also (known: :as, :only)",
        1,
        21,
    ),
    (
        "x.abl",
        '(import "std/retry" :only [with-retry]) (log!! 1)',
        '"std/retry" defines no with-retry; did you mean with-retries?',
        1,
        28,
    ),
    (
        "x.abl",
        '(log!! 1) (import "std/retry")',
        "the program's last form must be a workflow",
        1,
        11,
    ),
    ("x.abl", '(do!! (import "std/retry"))', "import is only allowed at the top level", 1, 8),
]


@pytest.mark.parametrize(("name", "source", "fragment", "line", "column"), IMPORT_ERRORS)
def test_import_errors(name: str, source: str, fragment: str, line: int, column: int) -> None:
    filename = str(DATA / name)
    with pytest.raises(AblaufCompileError) as info:
        compile_source(source, filename)
    err = info.value
    assert fragment in err.message
    assert (err.filename, err.line, err.column) == (filename, line, column)
    assert err.source == source


def test_a_cycle_is_reported_with_its_chain() -> None:
    with pytest.raises(AblaufCompileError) as info:
        compile_file(DATA / "cycle_main.abl")
    err = info.value
    a, b = str(DATA / "cycle_a.abl"), str(DATA / "cycle_b.abl")
    assert err.message == f"import cycle: {a} -> {b} -> {a}"
    # Reported at the import that closes the cycle, in the file that holds it.
    assert (err.filename, err.line, err.column) == (b, 2, 9)
    assert err.source == (DATA / "cycle_b.abl").read_text()
    assert '(import "cycle_a.abl")' in str(err)


def test_a_file_importing_itself_is_a_cycle() -> None:
    path = str(DATA / "self.abl")
    with pytest.raises(AblaufCompileError, match=f"import cycle: {path} -> {path}"):
        compile_file(DATA / "self.abl")


def test_errors_inside_a_module_point_into_the_module() -> None:
    path = str(DATA / "broken.abl")
    with pytest.raises(AblaufCompileError) as info:
        compile_source('(import "broken.abl") (log!! total)', str(DATA / "x.abl"))
    err = info.value
    assert '+ expects numbers, got string "two"' in err.message
    assert (err.filename, err.line, err.column) == (path, 2, 3)
    assert '  (+ 1 "two"))\n  ^' in str(err)


def test_a_module_holds_definitions_only() -> None:
    with pytest.raises(AblaufCompileError) as info:
        compile_source('(import "not_a_module.abl") (log!! x)', str(DATA / "x.abl"))
    assert "an imported module holds definitions only (def, defn, import)" in info.value.message
    assert (info.value.filename, info.value.line) == (str(DATA / "not_a_module.abl"), 2)


def test_syntax_errors_in_a_module_name_the_module(tmp_path: Path) -> None:
    (tmp_path / "bad.abl").write_text("(def x (+ 1 2)")
    with pytest.raises(AblaufSyntaxError) as info:
        compile_source('(import "bad.abl") (log!! x)', str(tmp_path / "main.abl"))
    assert info.value.filename == str(tmp_path / "bad.abl")


def test_functions_from_a_module_report_run_time_errors_at_their_own_position(
    tmp_path: Path,
) -> None:
    (tmp_path / "lib.abl").write_text("(defn region []\n  (ctx :region))\n")
    main = tmp_path / "main.abl"
    run = ablauf_lang.eval(
        '(import "lib.abl") (try!! (log!! (region)) (rescue!! (log!! :rescued)))',
        filename=str(main),
    )
    assert run.status is Status.SUCCESS
    assert run.context["exec/last-error"] == (
        f"{tmp_path / 'lib.abl'}:2:3: the context has no :region (and no default was given)"
    )


# ---------------------------------------------------------------------------------------
# What an import may read: .abl files in the program's directory tree, and std/


SECRET = "TOP-SECRET-CONTENT"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """tmp/outside.abl and tmp/notes.txt hold a secret; the program lives in tmp/proj."""
    (tmp_path / "outside.abl").write_text(f"(def x 1) {SECRET}\n")
    (tmp_path / "notes.txt").write_text(f"{SECRET}\n")
    proj = tmp_path / "proj"
    (proj / "lib").mkdir(parents=True)
    (proj / "notes.txt").write_text(f"{SECRET}\n")
    (proj / "lib" / "a.abl").write_text('(import "../b.abl") (def a (str "a" b))\n')
    (proj / "b.abl").write_text('(def b "b")\n')
    return proj


def refused(source: str, filename: str | None, fragment: str) -> AblaufCompileError:
    with pytest.raises(AblaufCompileError) as info:
        compile_source(source, filename)
    err = info.value
    assert fragment in err.message
    assert SECRET not in str(err)
    assert (err.line, err.column) == (1, 9)
    return err


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/etc/passwd", "only .abl files can be imported"),
        ("/proc/self/environ", "only .abl files can be imported"),
        ("notes.txt", "only .abl files can be imported"),
        ("../notes.txt", "only .abl files can be imported"),
        ("../outside.abl", "it is outside"),
        ("../outside", "it is outside"),
        ("lib/../../outside.abl", "it is outside"),
    ],
)
def test_an_import_reads_only_abl_files_in_the_programs_tree(
    project: Path, path: str, fragment: str
) -> None:
    refused(f'(import "{path}") (log!! 1)', str(project / "main.abl"), fragment)


def test_modules_may_import_anywhere_in_the_programs_tree(project: Path) -> None:
    root = compile_source('(import "lib/a.abl") (log!! a)', str(project / "main.abl"))
    assert root == log(0, "ab")


def test_without_a_file_the_tree_is_the_current_directory(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    assert compile_source('(import "lib/a") (log!! a)') == log(0, "ab")
    refused('(import "../outside.abl") (log!! 1)', None, "outside the current directory")
    monkeypatch.chdir(project / "lib")
    refused('(import "../b.abl") (log!! 1)', "<repl>", "outside")


def test_links_are_followed_before_the_check(project: Path) -> None:
    (project / "link.abl").symlink_to(project.parent / "outside.abl")
    (project / "passwd.abl").symlink_to("/etc/passwd")
    (project / "inside.abl").symlink_to(project / "b.abl")
    main = str(project / "main.abl")
    refused('(import "link.abl") (log!! 1)', main, "it is outside")
    refused('(import "passwd.abl") (log!! 1)', main, "only .abl files")
    assert compile_source('(import "inside.abl") (log!! b)', main) == log(0, "b")


def test_a_file_that_is_not_regular_is_refused_without_reading_it(project: Path) -> None:
    os.mkfifo(project / "pipe.abl")  # reading it would block
    (project / "dir.abl").mkdir()
    main = str(project / "main.abl")
    refused('(import "pipe.abl") (log!! 1)', main, "not a regular file")
    refused('(import "dir.abl") (log!! 1)', main, "not a regular file")


def test_a_module_that_is_not_utf8_is_a_located_error(project: Path) -> None:
    (project / "latin.abl").write_bytes(b'(def x "caf\xe9")\n')
    with pytest.raises(AblaufSyntaxError) as info:
        compile_source('(import "latin.abl") (log!! x)', str(project / "main.abl"))
    err = info.value
    assert (err.filename, err.line, err.column) == (str(project / "latin.abl"), 1, 12)
    assert "not UTF-8 text: invalid byte 0xe9 at byte offset 11" in err.message


def test_embedders_can_turn_file_imports_off(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    main = str(project / "main.abl")
    with pytest.raises(AblaufCompileError, match="importing files is turned off") as info:
        compile_source('(import "b.abl") (log!! b)', main, file_imports=False)
    assert (info.value.line, info.value.column) == (1, 9)
    # the standard library stays available
    assert compile_source('(import "std/retry") (log!! 1)', main, file_imports=False)
    monkeypatch.setattr(loader_module, "FILE_IMPORTS", False)
    with pytest.raises(AblaufCompileError, match="turned off"):
        compile_source('(import "b.abl") (log!! b)', main)
    with pytest.raises(AblaufCompileError, match="turned off"):
        compile_forms(read('(import "b.abl") (log!! b)'), filename=main)
    # an explicit True wins over the module default
    assert compile_source('(import "b.abl") (log!! b)', main, file_imports=True) == log(0, "b")


def test_eval_and_compile_take_the_file_imports_switch(tmp_path: Path) -> None:
    import ablauf_lang

    (tmp_path / "lib.abl").write_text("(def x 1)\n")
    main = tmp_path / "main.abl"
    source = '(import "lib.abl")\n(log!! x)'
    main.write_text(source)
    assert ablauf_lang.eval(source, filename=str(main)).status == "success"
    with pytest.raises(ablauf_lang.AblaufCompileError, match="importing files is turned off"):
        ablauf_lang.eval(source, filename=str(main), file_imports=False)
    std = '(import "std/retry")\n(with-retries 2 (log!! 1))'
    assert ablauf_lang.eval(std, file_imports=False).status == "success"


@pytest.mark.parametrize("path", ["a\x00b.abl", "\ud800.abl", "std/\x00"])
def test_a_path_no_file_system_can_name_is_refused_at_the_import(project: Path, path: str) -> None:
    with pytest.raises(AblaufCompileError, match="not a file name") as info:
        compile_source(f'(import "{path}") (log!! 1)', str(project / "main.abl"))
    assert (info.value.line, info.value.column) == (1, 9)
