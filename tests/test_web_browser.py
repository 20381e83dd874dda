"""The dashboard end to end, in a real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium: tests/browser.py) against a real `ablauf ui` server
process on a real SQLite store, with runs driven by real `ablauf run` processes.

The runs list and its filter; a run opened while it runs, whose node turns from pending to
success without a reload; a node's output on click; a failed run retried from the page;
a `<script>` payload shown as text; screenshots that are not blank."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ablauf_lang import api

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
ACTIONS = str(ROOT / "tests" / "web_actions.py")
XSS = "<script>alert(1)</script>"
ABLAUF = [sys.executable, "-m", "ablauf_lang"]
UI = [*ABLAUF, "ui"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Site:
    """A store, its flags directory and an `ablauf ui` server process."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.url = f"sqlite:///{tmp / 'runs.db'}"
        self.flags = tmp / "flags"
        self.flags.mkdir()
        self.env = {**os.environ, "ABLAUF_WEB_FLAGS": str(self.flags), "ABLAUF_STORE": self.url}
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = (tmp / "ui.log").open("wb")
        self.server = subprocess.Popen(
            [*UI, "--store", self.url, "--port", str(self.port), "--actions", ACTIONS],
            cwd=tmp,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.drivers: list[subprocess.Popen[bytes]] = []
        ends = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.base + "/", timeout=2).read()
                break
            except OSError:
                assert self.server.poll() is None, (tmp / "ui.log").read_text()
                assert time.monotonic() < ends, "the dashboard did not start"
                time.sleep(0.1)

    def run(self, source: str, name: str) -> str:
        """A run of `source` to its end (in this process); its id."""
        path = self.tmp / name
        path.write_text(source)
        return api.eval(
            source, store=self.url, filename=str(path), actions=api.load_actions(ACTIONS)
        ).run_id

    def start(self, source: str, name: str) -> None:
        """A run driven by an `ablauf run` process (it goes on while the test looks)."""
        path = self.tmp / name
        path.write_text(source)
        self.drivers.append(
            subprocess.Popen(
                [*ABLAUF, "run", str(path), "--store", self.url, "--actions", ACTIONS, "-q"],
                cwd=self.tmp,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def open(self, name: str) -> None:
        (self.flags / name).write_text("open")

    def close(self) -> None:
        for proc in self.drivers:
            proc.kill()
            proc.wait()
        os.killpg(self.server.pid, 15)
        try:
            self.server.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.server.pid, 9)
        self.log.close()


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    s = Site(tmp_path)
    monkeypatch.setenv("ABLAUF_WEB_FLAGS", str(s.flags))  # for the runs made in this process
    try:
        yield s
    finally:
        s.close()


def _wait(browser: Any, what: str, check: Any, seconds: float = 30) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The page redraws live: an element found may be replaced before it is read (stale);
    # that is a look too early, looked at again, as an element not there yet is.
    return WebDriverWait(
        browser,
        seconds,
        poll_frequency=0.1,
        ignored_exceptions=(StaleElementReferenceException,),
    ).until(lambda _: check(), message=f"{what} (in {seconds:g}s)")


def _png_check(path: Path, least: tuple[int, int]) -> None:
    """A PNG of at least `least` pixels whose pixels are not all one colour."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= least[0]
    assert height >= least[1]
    chunks, pos = [], 8
    while pos < len(data):
        size = struct.unpack(">I", data[pos : pos + 4])[0]
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            chunks.append(data[pos + 8 : pos + 8 + size])
        pos += 12 + size
    raw = zlib.decompress(b"".join(chunks))
    assert len(set(raw)) > 16, "the screenshot is blank"


def _node_class(browser: Any, node: int) -> str:
    from selenium.webdriver.common.by import By

    found = browser.find_elements(By.CSS_SELECTOR, f'#graph g.node[data-node="{node}"]')
    return str(found[0].get_attribute("class")) if found else ""


def test_runs_list_filter_and_screenshot(browser: Any, site: Site, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    site.run("(action!! :web/echo {:n 1})", "good.abl")
    site.run('(action!! :web/flaky "never")', "bad.abl")
    site.run("(action!! :web/echo 2)", "good2.abl")
    browser.get(site.base + "/")
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.run")
    assert len(rows) == 3
    Select(browser.find_element(By.NAME, "status")).select_by_value("failure")
    browser.find_element(By.CSS_SELECTOR, "form.filters button").click()
    _wait(browser, "the filtered list", lambda: "status=failure" in browser.current_url)
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.run")
    assert len(rows) == 1
    assert "bad.abl" in rows[0].text
    text = browser.find_element(By.NAME, "text")
    text.clear()
    text.send_keys("good2.abl")
    Select(browser.find_element(By.NAME, "status")).select_by_value("")
    browser.find_element(By.CSS_SELECTOR, "form.filters button").click()
    _wait(browser, "the text filter", lambda: "good2" in browser.current_url)
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.run")
    files = [r.find_element(By.CSS_SELECTOR, "td.file").text for r in rows]
    assert len(files) == 1
    assert files[0].endswith("good2.abl")
    browser.get(site.base + "/")
    shot = tmp_path / "runs.png"
    browser.save_screenshot(str(shot))
    _png_check(shot, (800, 600))


def test_a_running_run_turns_green_without_a_reload(
    browser: Any, site: Site, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    site.start(
        '(do!! (action!! :web/echo "first") (action!! :web/gate "g1") (action!! :web/echo "last"))',
        "gated.abl",
    )
    run_id = _wait(browser, "the run recorded", lambda: _run_of(site, "gated.abl"))
    _wait(browser, "the gate dispatched", lambda: _leaf_state(site, run_id, 2) == "pending")
    browser.get(f"{site.base}/runs/{run_id}")
    assert "state-pending" in _node_class(browser, 2)
    browser.execute_script("window.__same_page = 'yes';")
    site.open("g1")
    _wait(browser, "node 2 success", lambda: "state-success" in _node_class(browser, 2))
    _wait(browser, "node 3 success", lambda: "state-success" in _node_class(browser, 3))
    assert browser.execute_script("return window.__same_page;") == "yes"  # no reload
    _wait(
        browser,
        "the run's state",
        lambda: "success" in browser.find_element(By.ID, "run-state").text,
    )
    # A node's details on click: its output.
    browser.find_element(By.CSS_SELECTOR, '#graph g.node[data-node="2"]').click()
    _wait(browser, "the node's output", lambda: "opened" in _detail(browser))
    assert "g1" in _detail(browser)
    shot = tmp_path / "run.png"
    browser.save_screenshot(str(shot))
    _png_check(shot, (800, 600))


def test_a_failed_run_retried_from_the_page_succeeds(browser: Any, site: Site) -> None:
    from selenium.webdriver.common.by import By

    run_id = site.run('(do!! (action!! :web/flaky "fix") (action!! :web/echo "after"))', "r.abl")
    failed = api.load_run(run_id, site.url).job
    assert failed.status == "failure"
    assert "not yet: fix" in str(failed.node(1).error)
    site.open("fix")
    browser.get(f"{site.base}/runs/{run_id}")
    browser.find_element(By.CSS_SELECTOR, 'form[action$="/retry"] button').click()
    _wait(browser, "the confirmation", lambda: _alert(browser))
    alert = browser.switch_to.alert
    assert "Retry run" in alert.text
    alert.accept()
    _wait(
        browser,
        "the retried run's success",
        lambda: "success" in browser.find_element(By.ID, "run-state").text,
        60,
    )
    assert api.load_run(run_id, site.url).job.status == "success"


def test_a_script_payload_is_shown_as_text(browser: Any, site: Site) -> None:
    from selenium.webdriver.common.by import By

    run_id = site.run(f'(with-augment [[] [:said]] (action!! :web/echo "{XSS}"))', "xss.abl")
    browser.get(f"{site.base}/runs/{run_id}")
    assert not _alert(browser)
    browser.find_element(By.CSS_SELECTOR, '#graph g.node[data-node="0"]').click()
    _wait(browser, "the node's payload", lambda: XSS in _detail(browser))
    assert not _alert(browser)
    assert XSS in browser.find_element(By.CSS_SELECTOR, ".context pre").text
    assert browser.execute_script("return document.querySelectorAll('script').length") == 1


def _detail(browser: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(browser.find_element(By.ID, "detail").text)


def _alert(browser: Any) -> bool:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        browser.switch_to.alert.text  # noqa: B018 - looking is the test
        return True
    except NoAlertPresentException:
        return False


def _run_of(site: Site, name: str) -> str | None:
    for info in api.list_runs(store=site.url):
        if info.filename and info.filename.endswith(name):
            return str(info.run_id)
    return None


def _leaf_state(site: Site, run_id: str, node: int) -> str:
    return str(api.load_run(run_id, site.url).job.node(node).result)
