"""The web dashboard (`ablauf ui`, `ablauf_lang.web`): pages, JSON, live events, actions
and their refusals, CSRF, escaping, the loopback rule, on real SQLite store files with
real runs (`ablauf_lang.eval`), through Starlette's TestClient and a real uvicorn server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from click.testing import CliRunner

with warnings.catch_warnings():  # Starlette would rather have httpx2: httpx works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

import ablauf_lang
from ablauf_lang import api
from ablauf_lang.stores.backend import open_store
from ablauf_lang.web.app import CONTEXT_NOTE, create_app
from ablauf_lang.web.serve import check_host, is_loopback

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

XSS = "<script>alert(1)</script>"
BASE = "http://127.0.0.1"
OK = '(log!! "ok")'
BAD = '(action!! :action/fail "no")'


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/runs.db"


def client(url: str, **kwargs: Any) -> TestClient:
    return TestClient(create_app(url, **kwargs), base_url=BASE)


def csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found is not None, "the page has no CSRF field"
    return found.group(1)


def refusal(page: str) -> str:
    found = re.search(r'class="message refusal" role="alert">([^<]*)<', page)
    assert found is not None, "the page shows no refusal"
    return found.group(1)


def ids_in(page: str) -> list[str]:
    return re.findall(r'<tr class="run [^"]*" data-run="([0-9a-f]+)"', page)


def wait_for(check: Any, timeout: float = 20.0) -> Any:
    ends = time.monotonic() + timeout
    while time.monotonic() < ends:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def events(text: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


# ---------------------------------------------------------------- the runs list


def test_runs_list_filters_pages_newest_first(url: str) -> None:
    made = []
    for i in range(7):
        source, name = (OK, f"ops/deploy{i % 2}.abl") if i % 3 else (BAD, "broken.abl")
        made.append(ablauf_lang.eval(source, store=url, filename=name).run_id)
        time.sleep(0.002)
    newest = made[::-1]
    c = client(url)
    page = c.get("/")
    assert page.status_code == 200
    assert ids_in(page.text) == newest
    assert ">7</span> runs" in page.text
    # status, file name, run id prefix
    failed = ids_in(c.get("/?status=failure").text)
    assert failed == [r for r in newest if api.load_run(r, url).info.state == "failure"]
    assert len(failed) == 3
    assert ids_in(c.get("/?text=deploy1.abl").text) == [
        r for r in newest if api.load_run(r, url).info.filename == "ops/deploy1.abl"
    ]
    assert ids_in(c.get(f"/?text={made[2][:10]}").text) == [made[2]]
    assert ids_in(c.get(f"/?text={made[2][:10]}&status=failure").text) == []
    assert ids_in(c.get("/?text=nothing.abl").text) == []
    # pages: limit and offset, links to the next and previous ones
    first = c.get("/?limit=3")
    assert ids_in(first.text) == newest[:3]
    assert 'href="/?limit=3&amp;offset=3"' in first.text
    second = c.get("/?limit=3&offset=3")
    assert ids_in(second.text) == newest[3:6]
    assert 'rel="prev"' in second.text
    assert ids_in(c.get("/?limit=3&offset=6").text) == newest[6:]
    # the same as JSON
    data = c.get("/api/runs?limit=2&offset=1&status=success").json()
    assert data["total"] == 4
    assert [r["run_id"] for r in data["runs"]] == [r for r in newest if r not in failed][1:3]
    assert data["runs"][0]["state"] == "success"
    # the table alone, for the live list
    partial = c.get("/partials/runs?status=failure")
    assert "<html" not in partial.text
    assert ids_in(partial.text) == failed


def test_runs_list_bad_queries_are_400(url: str) -> None:
    ablauf_lang.eval(OK, store=url)
    c = client(url)
    assert c.get("/?status=nope").status_code == 400
    assert "no run state" in c.get("/?status=nope").text
    assert c.get("/?limit=x").status_code == 400
    assert c.get("/?limit=0").status_code == 400
    assert c.get("/?offset=-1").status_code == 400
    assert c.get("/api/runs?limit=100000").json() == {
        "error": "100000 is out of range (between 1 and 500)"
    }
    assert c.get("/no/such/page").status_code == 404
    assert c.get("/runs/ffffffffffffffff").status_code == 404
    assert c.get("/api/runs/ffffffffffffffff").json()["error"].startswith("no run")


def test_runs_list_live_events(url: str) -> None:
    ablauf_lang.eval(OK, store=url)
    c = client(url)
    got: dict[str, str] = {}

    def listen() -> None:
        got["text"] = c.get("/api/events?lifetime=3").text

    listener = threading.Thread(target=listen)
    listener.start()
    time.sleep(1.0)
    ablauf_lang.eval(BAD, store=url)  # the list changes: one more run
    listener.join(timeout=30)
    changes = [data for name, data in events(got["text"]) if name == "change"]
    assert [d["total"] for d in changes] == [1, 2]
    assert changes[0]["digest"] != changes[1]["digest"]


# ---------------------------------------------------------------- a run


def test_run_page_graph_details_context_timeline(url: str) -> None:
    source = '(do!! (log!! "one") (dopar!! (log!! "a") (log!! "b")) (action!! :action/fail "no"))'
    run = ablauf_lang.eval(source, store=url, filename="flow.abl", context={"who": "ana"})
    c = client(url)
    page = c.get(f"/runs/{run.run_id[:8]}")  # a prefix is enough
    assert page.status_code == 200
    text = page.text
    svg = text[text.index("<svg") : text.index("</svg>") + 6]
    root = ET.fromstring(svg)
    nodes = root.findall(".//{http://www.w3.org/2000/svg}g[@data-node]")
    stored = api.load_run(run.run_id, url)
    assert len(nodes) == len(list(stored.job.nodes()))
    assert "state-failure" in svg
    assert "state-success" in svg
    assert "error: no" in text
    assert "flow.abl" in text
    assert "&#34;who&#34;: &#34;ana&#34;" in text
    assert 'class="tl"' in text
    assert text.count('<tr data-node="') == 4
    # one node, on click
    leaf = next(n for n in stored.job.leaves() if n.action == "action/fail")
    node = c.get(f"/api/runs/{run.run_id}/nodes/{leaf.id}").json()
    assert node["state"] == "failure"
    assert node["error"] == "no"
    assert node["payload"] == "no"
    assert node["attempt"] == 1
    assert node["attempts"] == []
    assert node["dispatched_at"] <= node["started_at"] <= node["finished_at"]
    assert node["context"]["who"] == "ana"
    assert node["context_note"] == CONTEXT_NOTE
    branch = c.get(f"/api/runs/{run.run_id}/nodes/{stored.job.root.id}").json()
    assert branch["kind"] == stored.job.root.kind
    assert branch["children"]
    assert c.get(f"/api/runs/{run.run_id}/nodes/999").status_code == 404
    assert c.get(f"/api/runs/{run.run_id}/nodes/x").status_code == 400
    # JSON of the run, the picture alone, the live part alone
    data = c.get(f"/api/runs/{run.run_id}").json()
    assert data["status"] == "failure"
    assert len(data["nodes"]) == len(nodes)
    picture = c.get(f"/runs/{run.run_id}/svg")
    assert picture.headers["content-type"].startswith("image/svg+xml")
    ET.fromstring(picture.text)
    partial = c.get(f"/partials/runs/{run.run_id}").text
    assert "<html" not in partial
    assert "<svg" in partial


def test_wide_fan_out_folds_and_unfolds(url: str) -> None:
    source = "(dopar!! " + " ".join(f'(log!! "x{i}")' for i in range(120)) + ")"
    run = ablauf_lang.eval(source, store=url)
    c = client(url)
    started = time.perf_counter()
    page = c.get(f"/runs/{run.run_id}")
    assert time.perf_counter() - started < 2.0
    fold = re.search(r'<g class="fold" data-parent="(\d+)">', page.text)
    assert fold is not None
    assert page.text.count('<g class="node') < 60
    unfolded = c.get(f"/partials/runs/{run.run_id}?unfold={fold.group(1)}").text
    assert '<g class="fold"' not in unfolded
    assert unfolded.count('<g class="node') == 121
    assert c.get(f"/runs/{run.run_id}?unfold=a,b").status_code == 400


def test_run_updates_live_while_it_runs(url: str) -> None:
    gate = threading.Event()

    def slow(payload: Any, context: Any) -> str:
        assert gate.wait(30)
        return "done"

    runs: list[Any] = []
    driver = threading.Thread(
        target=lambda: runs.append(
            ablauf_lang.eval(
                '(do!! (action!! :test/slow {}) (log!! "after"))',
                actions={"test/slow": slow},
                store=url,
                run_id="aaaa000011112222",
            )
        )
    )
    driver.start()
    c = client(url)

    def slow_leaf_pending() -> bool:
        if not api.run_exists("aaaa000011112222", url):
            return False
        shown = api.show_run(api.load_run("aaaa000011112222", url))
        return any(
            n.get("action") == "test/slow" and n["state"] == "pending" for n in shown["nodes"]
        )

    wait_for(slow_leaf_pending)
    page = c.get("/runs/aaaa000011112222").text
    assert re.search(r'class="node state-pending kind-leaf" id="n\d+"', page)
    got: dict[str, str] = {}

    def listen() -> None:
        got["text"] = c.get("/api/runs/aaaa000011112222/events?lifetime=20").text

    listener = threading.Thread(target=listen)
    listener.start()
    time.sleep(1.0)
    gate.set()
    driver.join(timeout=30)
    listener.join(timeout=30)
    seen = events(got["text"])
    names = [name for name, _ in seen]
    assert names[0] == "change"
    assert names[-1] == "end"
    states = [data["status"] for name, data in seen if name == "change"]
    assert states[0] == "pending"
    assert states[-1] == "success"
    after = c.get("/partials/runs/aaaa000011112222").text
    assert "state-pending" not in after
    assert "state-success" in after


# ---------------------------------------------------------------- escaping


def test_everything_is_escaped(url: str) -> None:
    run = ablauf_lang.eval(
        f'(do!! (log!! "{XSS}") (action!! :action/fail "{XSS}"))',
        store=url,
        filename=f"{XSS}.abl",
        context={XSS: XSS},
    )
    c = client(url)
    pages = [
        c.get("/").text,
        c.get(f"/?text={XSS}").text,
        c.get(f"/runs/{run.run_id}").text,
        c.get(f"/partials/runs/{run.run_id}").text,
        c.get(f"/runs/{run.run_id}/svg").text,
        c.get(f"/runs/{XSS}").text,
        c.get(f"/?status={XSS}").text,
    ]
    for text in pages:
        assert XSS not in text
        assert "<script>" not in text.replace('<script src="/static/app.js" defer></script>', "")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages[2]
    # JSON is JSON: the page's script puts it in as text (textContent)
    node = c.get(f"/api/runs/{run.run_id}/nodes/2").json()
    assert node["output"] == XSS or node["payload"] == XSS
    page = c.get(f"/runs/{run.run_id}")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    # an abort reason and a refusal are escaped too
    token = csrf(page.text)
    refused = c.post(f"/runs/{run.run_id}/abort", data={"csrf": token, "reason": XSS})
    assert refused.status_code == 409
    assert XSS not in refused.text


# ---------------------------------------------------------------- actions


def test_actions_need_the_csrf_token(url: str) -> None:
    run = ablauf_lang.eval(BAD, store=url)
    c = client(url)
    token = csrf(c.get(f"/runs/{run.run_id}").text)
    for action in ("retry", "resume", "abort", "signal"):
        assert c.post(f"/runs/{run.run_id}/{action}").status_code == 403
        assert c.post(f"/runs/{run.run_id}/{action}", data={"csrf": "x" + token}).status_code == 403
        other = c.post(
            f"/runs/{run.run_id}/{action}",
            data={"csrf": token},
            headers={"Origin": "http://evil.example"},
        )
        assert other.status_code == 403
    assert c.post(f"/runs/{run.run_id}/abort", json={"csrf": token}).status_code == 403
    assert c.get(f"/runs/{run.run_id}/retry").status_code in (404, 405)
    assert c.post(f"/runs/{run.run_id}/delete", data={"csrf": token}).status_code == 404
    # another app (another process) has another secret
    assert client(url).post(f"/runs/{run.run_id}/retry", data={"csrf": token}).status_code == 403
    assert api.load_run(run.run_id, url).job.restarts == run.job.restarts  # nothing ran


def test_retry_a_failed_run_from_the_page(url: str) -> None:
    calls: list[str] = []

    def flaky(payload: Any, context: Any) -> str:
        calls.append(payload)
        if len(calls) == 1:
            raise RuntimeError("not yet")
        return "fine"

    actions = {"test/flaky": flaky}
    run = ablauf_lang.eval(
        '(do!! (action!! :test/flaky "go") (log!! "after"))', actions=actions, store=url
    )
    assert run.status.value == "failure"
    c = client(url, actions=actions)
    token = csrf(c.get(f"/runs/{run.run_id}").text)
    # the CLI's refusals: resume of a failed run, retry of a finished one
    resumed = c.post(f"/runs/{run.run_id}/resume", data={"csrf": token})
    assert resumed.status_code == 409
    assert "use retry" in refusal(resumed.text)
    done = c.post(f"/runs/{run.run_id}/retry", data={"csrf": token})
    assert done.status_code == 200  # redirected to the run's page
    assert str(done.url).startswith(f"{BASE}/runs/{run.run_id}?done=retry")
    wait_for(lambda: api.load_run(run.run_id, url).job.status.value == "success")
    assert calls == ["go", "go"]
    leaf = next(n for n in api.load_run(run.run_id, url).job.leaves() if n.action == "test/flaky")
    node = c.get(f"/api/runs/{run.run_id}/nodes/{leaf.id}").json()
    assert node["output"] == "fine"
    assert node["state"] == "success"
    assert node["attempt"] == 2  # a retry of the run: the step's second attempt
    again = c.post(f"/runs/{run.run_id}/retry", data={"csrf": token})
    assert again.status_code == 409
    assert "nothing to retry" in refusal(again.text)


def test_every_attempt_with_its_times(url: str) -> None:
    calls: list[int] = []

    def flaky(payload: Any, context: Any) -> str:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(XSS)
        return "fine"

    source = '(action!! :test/flaky "x" {:retry {:max 2 :delay 0}})'
    run = ablauf_lang.eval(source, actions={"test/flaky": flaky}, store=url)
    assert run.status.value == "success"
    leaf = next(iter(api.load_run(run.run_id, url).job.leaves()))
    c = client(url)
    node = c.get(f"/api/runs/{run.run_id}/nodes/{leaf.id}").json()
    assert node["attempt"] == 2
    assert node["output"] == "fine"
    (earlier,) = node["attempts"]
    assert earlier["state"] == "failure"
    assert XSS in json.dumps(earlier["error"])
    assert earlier["started_at"] <= earlier["finished_at"] <= node["started_at"]
    assert earlier["started_at_text"]
    assert earlier["finished_at_text"]
    page = c.get(f"/runs/{run.run_id}").text
    assert page.count('class="bar state-') == 2  # both attempts on the timeline
    assert XSS not in page


def test_abort_and_signal_a_waiting_run(url: str) -> None:
    source = '(do!! (await!! :approval) (log!! "approved"))'
    run = ablauf_lang.eval(source, store=url, detach=True)
    assert run.status.value == "pending"
    c = client(url)
    page = c.get(f"/runs/{run.run_id}")
    assert "waiting:" in page.text
    assert "approval" in page.text
    assert re.search(r'class="node state-waiting', page.text)
    token = csrf(page.text)
    bad = c.post(
        f"/runs/{run.run_id}/signal", data={"csrf": token, "name": "approval", "value": "{x"}
    )
    assert bad.status_code == 400
    assert "not JSON" in refusal(bad.text)
    assert c.post(f"/runs/{run.run_id}/signal", data={"csrf": token, "name": ""}).status_code == 400
    sent = c.post(
        f"/runs/{run.run_id}/signal",
        data={"csrf": token, "name": "approval", "value": '{"by": "ana"}'},
    )
    assert sent.status_code == 200
    assert "sent signal approval (#1)" in sent.text
    with open_store(url) as store:  # type: ignore[attr-defined]
        assert [s["name"] for s in store.signals(run.run_id)] == ["approval"]
    aborted = c.post(
        f"/runs/{run.run_id}/abort", data={"csrf": token, "reason": "no longer needed"}
    )
    assert aborted.status_code == 200
    assert "aborted" in aborted.text
    info = api.load_run(run.run_id, url).info
    assert info.state == "aborted"
    assert info.aborted == "no longer needed"
    again = c.post(f"/runs/{run.run_id}/abort", data={"csrf": token, "reason": "x"})
    assert again.status_code == 409
    assert "already finished" in refusal(again.text)
    late = c.post(f"/runs/{run.run_id}/signal", data={"csrf": token, "name": "approval"})
    assert late.status_code == 409


# ---------------------------------------------------------------- the server and its address


def test_only_loopback_names_unless_public(url: str) -> None:
    ablauf_lang.eval(OK, store=url)
    assert client(url).get("/").status_code == 200
    assert TestClient(create_app(url), base_url="http://localhost").get("/").status_code == 200
    evil = TestClient(create_app(url), base_url="http://evil.example")
    assert evil.get("/").status_code == 400  # DNS rebinding: another name is refused
    public = TestClient(create_app(url, public=True), base_url="http://dash.example")
    assert public.get("/").status_code == 200
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert is_loopback(host)
        check_host(host, public=False)
    for host in ("0.0.0.0", "192.168.1.10", "example.com", "::"):
        assert not is_loopback(host)
        with pytest.raises(ablauf_lang.AblaufError, match="--public"):
            check_host(host, public=False)
        check_host(host, public=True)


def test_no_route_reads_files(url: str, tmp_path: Path) -> None:
    ablauf_lang.eval(OK, store=url)
    (tmp_path / "secret.txt").write_text("secret")
    c = client(url)
    assert c.get("/static/app.js").status_code == 200
    assert c.get("/static/style.css").status_code == 200
    for path in (
        "/static/../app.py",
        "/static/%2e%2e/app.py",
        "/static/..%2fapp.py",
        f"/static/{tmp_path}/secret.txt",
        "/static/%2fetc%2fpasswd",
    ):
        response = c.get(path)
        assert response.status_code == 404, path
        assert "secret" not in response.text
        assert "root:" not in response.text
    # a signal's value is JSON text, never @FILE
    run = ablauf_lang.eval("(await!! :go)", store=url, detach=True)
    token = csrf(c.get(f"/runs/{run.run_id}").text)
    sent = c.post(
        f"/runs/{run.run_id}/signal",
        data={"csrf": token, "name": "go", "value": f"@{tmp_path}/secret.txt"},
    )
    assert sent.status_code == 400


def test_ui_command_refuses_other_hosts_and_bad_stores(url: str, tmp_path: Path) -> None:
    from ablauf_lang.cli.ui import ui

    runner = CliRunner()
    result = runner.invoke(ui, ["--store", url, "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "--public" in result.output
    result = runner.invoke(ui, ["--store", "bogus://x"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    result = runner.invoke(ui, ["--store", url, "--actions", str(tmp_path / "none.py")])
    assert result.exit_code == 2
    result = runner.invoke(ui, ["--store", url, "--port", "70000"])
    assert result.exit_code == 2


def test_served_by_uvicorn(url: str) -> None:
    run = ablauf_lang.eval(f'(log!! "{XSS}")', store=url)
    code = (
        "import sys; from ablauf_lang.web.serve import serve; "
        "serve(sys.argv[1], '127.0.0.1', 0, False, False)"
    )
    server = subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        line = server.stderr.readline()
        found = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        assert found, line
        import httpx

        base = found.group(1)
        page = wait_for(lambda: _get(httpx, base + f"runs/{run.run_id}"))
        assert page.status_code == 200
        assert XSS not in page.text
        stream = httpx.get(base + f"api/runs/{run.run_id}/events", timeout=10)
        assert [name for name, _ in events(stream.text)] == ["change", "end"]
    finally:
        server.terminate()
        server.wait(timeout=10)


def _get(httpx: Any, where: str) -> Any:
    try:
        return httpx.get(where, timeout=5)
    except httpx.TransportError:
        return None


def test_public_prints_a_warning(url: str) -> None:
    code = (
        "import sys; from ablauf_lang.web.serve import serve; "
        "serve(sys.argv[1], '0.0.0.0', 0, True, False)"
    )
    server = subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        assert "warning" in server.stderr.readline()
    finally:
        server.terminate()
        server.wait(timeout=10)


# ---------------------------------------------------------------- many runs


@pytest.mark.slow
def test_100000_runs_stay_fast(url: str) -> None:
    job = api.make_job(OK)
    store = open_store(url)
    try:
        for i in range(100_000):
            store.create_run(job, source=OK, filename=f"f{i % 10}.abl")
    finally:
        store.close()
    c = client(url)
    c.get("/")  # the store's first open
    for query in (
        "/",
        "/?offset=99950",
        "/?status=pending",
        "/?text=f3.abl",
        "/?text=f3.abl&offset=9950",
        "/?waiting=1",
        "/api/runs?limit=500&offset=50000",
    ):
        started = time.perf_counter()
        response = c.get(query)
        took = time.perf_counter() - started
        assert response.status_code == 200
        assert took < 0.5, f"{query}: {took:.3f}s"
    assert ">100,000</span> runs" in c.get("/").text


@pytest.fixture(autouse=True)
def _instant(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("ABLAUF_DEMO_DELAY", "0")
    return
