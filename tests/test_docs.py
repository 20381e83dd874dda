"""The docs say what the program does: every command shown in README.md and docs/*.md runs.

A code block whose first line starts with `$ ` is a shell session: each `$ command` runs
(in a fresh directory holding the examples, with its own SQLite store; one session per
page, in page order, so that `runs show ID` finds the run made above it), and what it
prints (stdout and stderr together, as on a terminal) must be what the page shows under
it, once the parts that change from run to run are normalised: run ids (matched by order
of appearance, so a command naming a run id from the page gets the real one), dates,
durations and restart counts (they depend on which results arrive together). A command
shown with no output must exit 0; `echo $?` shows the previous command's exit status;
`ablauf repl` is fed the inputs of the transcript that follows it (`ablauf> ` and
`...> ` lines) and must print that transcript. A command ending in `&` runs in the
background until the page is done. PostgreSQL URLs on a page are pointed at the tests'
own throwaway server.

The README's Python snippets run too, one after the other in one namespace.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

pytestmark = pytest.mark.timeout(300)

RUN_ID = re.compile(r"\b[0-9a-f]{16}\b")
CHANGING = [
    (re.compile(r"\b\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\b"), "<TIME>"),
    (re.compile(r"\b\d+m\d\ds\b"), "<DURATION>"),
    (re.compile(r"\b\d+(?:\.\d+)?(?:us|ms|s)\b"), "<DURATION>"),
    # How many restarts a run takes depends on which results arrive together.
    (re.compile(r"\brestarts \d+\b"), "restarts <N>"),
]
PG_URL = re.compile(r"postgres(?:ql)?://[^\s'\"`]+")
KAFKA = re.compile(r"--kafka 127\.0\.0\.1:9092")  # the pages' broker: a test broker instead
PROMPT = "ablauf> "
CONTINUATION = "...> "


@dataclass
class Command:
    """One `$ command` of a page and the output the page shows under it."""

    page: str
    line: int
    text: str
    shown: list[str] = field(default_factory=list)


def _code_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of each code block: fenced, or indented by 4 spaces."""
    blocks: list[tuple[int, list[str]]] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            indent = len(line) - len(line.lstrip())
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not lines[i].lstrip().startswith("```"):
                body.append(lines[i][indent:])
                i += 1
            blocks.append((start + 1, body))
        elif line.startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            start, body = i, []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                body.append(lines[i][4:])
                i += 1
            while body and not body[-1].strip():
                body.pop()
            blocks.append((start + 1, body))
            continue
        i += 1
    return blocks


def commands(page: Path) -> list[Command]:
    """The shell commands a page shows, with the output under each."""
    found: list[Command] = []
    name = page.relative_to(ROOT).as_posix()
    for start, body in _code_blocks(page.read_text(encoding="utf-8")):
        if not body or not body[0].startswith("$ "):
            continue
        for offset, line in enumerate(body):
            if line.startswith("$ "):
                found.append(Command(name, start + offset, line[2:]))
            else:
                found[-1].shown.append(line)
    return found


def normalise(lines: list[str], ids: list[str]) -> list[str]:
    """Lines with what changes between runs replaced; `ids` collects run ids in order."""
    out = []
    for line in lines:
        for found in RUN_ID.findall(line):
            if found not in ids:
                ids.append(found)
        line = RUN_ID.sub(lambda m: f"<RUN{ids.index(m.group())}>", line)
        for pattern, placeholder in CHANGING:
            line = pattern.sub(placeholder, line)
        out.append(line.rstrip())
    while out and not out[-1]:
        out.pop()
    return out


def repl_inputs(shown: list[str]) -> str:
    """The inputs typed in a REPL transcript."""
    typed = []
    for line in shown:
        if line.startswith(PROMPT):
            typed.append(line[len(PROMPT) :])
        elif line.lstrip().startswith(CONTINUATION):
            typed.append(line.lstrip()[len(CONTINUATION) :])
    return "\n".join(typed) + "\n"


class Session:
    """Runs a page's commands one after the other in one directory."""

    def __init__(self, folder: Path, pg_url: str | None, kafka: str | None = None) -> None:
        self.folder = folder
        self.pg_url = pg_url
        self.kafka = kafka
        (folder / "examples").symlink_to(ROOT / "examples")
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "COLUMNS"},
            "ABLAUF_STORE": f"sqlite:///{folder / 'runs.db'}",
            "XDG_DATA_HOME": str(folder / "data"),
            "XDG_STATE_HOME": str(folder / "state"),
            "ABLAUF_DEMO_DELAY": "0.01",
            "PYTHONUNBUFFERED": "1",  # stdout and stderr in the order they were written
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.doc_ids: list[str] = []
        self.real_ids: list[str] = []
        self.status = 0
        self.background: list[subprocess.Popen[bytes]] = []

    def command_line(self, command: Command) -> str:
        text = command.text
        for doc_id in RUN_ID.findall(text):
            if doc_id in self.doc_ids and self.doc_ids.index(doc_id) < len(self.real_ids):
                text = text.replace(doc_id, self.real_ids[self.doc_ids.index(doc_id)])
        if self.pg_url is not None:
            text = PG_URL.sub(self.pg_url, text)
        if self.kafka is not None:
            text = KAFKA.sub(f"--kafka {self.kafka}", text)
        return text

    def run(self, command: Command) -> None:
        where = f"{command.page}:{command.line}: $ {command.text}"
        text = self.command_line(command)
        if text.strip() == "echo $?":
            real = [str(self.status)]
            assert normalise(real, []) == normalise(command.shown, []), where
            return
        if text.rstrip().endswith("&"):
            self.background.append(
                subprocess.Popen(
                    text.rstrip().rstrip("&"),
                    shell=True,
                    cwd=self.folder,
                    env=self.env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
            time.sleep(1.0)  # let it start (a worker listening) before the next command
            if self.kafka is not None and "--kafka" in text:
                _wait_for_action_topics(self.kafka)
            return
        is_repl = shlex.split(text)[:2] == ["ablauf", "repl"]
        done = subprocess.run(
            text,
            shell=True,
            executable="/bin/bash",
            cwd=self.folder,
            env=self.env,
            input=repl_inputs(command.shown) if is_repl else "",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
        )
        self.status = done.returncode
        printed = done.stdout.split("\n")
        assert "Traceback" not in done.stdout, f"{where}\n{done.stdout}"
        if not command.shown:
            assert done.returncode == 0, f"{where}: exit {done.returncode}\n{done.stdout}"
            normalise(printed, self.real_ids)
            return
        expected = normalise(command.shown, self.doc_ids)
        real = normalise(printed, self.real_ids)
        if expected != real:
            diff = "\n".join(
                f"{'  ' if a == b else '! '}page: {a!r}\n{'  ' if a == b else '! '}real: {b!r}"
                for a, b in zip_longest(expected, real, fillvalue="")
                if a or b
            )
            pytest.fail(f"{where}: the page shows something else than it prints\n{diff}")

    def close(self) -> None:
        for proc in self.background:
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
        for proc in self.background:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


def _wait_for_action_topics(bootstrap: str, seconds: float = 30.0) -> None:
    """A Kafka worker started in the background has made its action topics (those of
    examples/actions.py, which the pages use)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        if "ablauf.action.git.create-repo" in admin.list_topics(timeout=5).topics:
            return
        time.sleep(0.2)
    raise AssertionError(f"no action topics on {bootstrap} after {seconds:g}s")


def _page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


SHELL_PAGES = [p for p in PAGES if commands(p)]


def test_the_pages_show_commands() -> None:
    names = {_page_id(p) for p in SHELL_PAGES}
    assert {"README.md", "docs/cli.md", "docs/repl.md"} <= names


@pytest.mark.parametrize("page", SHELL_PAGES, ids=_page_id)
def test_every_command_a_page_shows_prints_what_the_page_says(
    page: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    shown = commands(page)
    pg_url = None
    if any(PG_URL.search(c.text) for c in shown):
        pg_url = request.getfixturevalue("pg_url")
    kafka = None
    if any(KAFKA.search(c.text) for c in shown):
        kafka = request.getfixturevalue("kafka_broker").bootstrap
    session = Session(tmp_path, pg_url, kafka)
    try:
        for command in shown:
            session.run(command)
    finally:
        session.close()


def python_snippets(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_python_snippets_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snippets = python_snippets(ROOT / "README.md")
    assert len(snippets) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "readme"}
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), namespace)
    run = namespace["run"]
    assert run.status == "success"
    assert (tmp_path / "runs.db").exists()  # where the snippet said it records the run
    job = namespace["job"]
    assert job.done
