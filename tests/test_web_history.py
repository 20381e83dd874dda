"""The dashboard's history (issue 16): a run's writes, each linked to the run as it was
after that restart; a fork's page names its parent. A real SQLite store, Starlette's
TestClient."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

import ablauf_lang
from ablauf_lang.web.app import create_app

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SOURCE = '(do!! (log!! "build") (log!! "<b>test</b>") (log!! "ship"))'


def test_history_and_the_run_after_any_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/runs.db"
    run = ablauf_lang.eval(SOURCE, store=url, filename="release.abl")
    fork = ablauf_lang.fork(run.run_id, 2, store=url)
    client = TestClient(create_app(url), base_url="http://127.0.0.1")

    page = client.get(f"/runs/{run.run_id}/history")
    assert page.status_code == 200
    text = page.text
    assert "sent 1 :action/log &#34;build&#34;" in text
    assert "&lt;b&gt;test&lt;/b&gt;" in text
    assert "<b>test</b>" not in text
    for n in range(5):
        assert f'href="/runs/{run.run_id}/at/{n}"' in text

    at = client.get(f"/runs/{run.run_id}/at/2")
    assert at.status_code == 200
    assert "as after restart 2" in at.text
    assert f"ablauf runs fork {run.run_id} --at 2" in at.text
    assert 'data-node="3"' in at.text
    assert "unset" in at.text

    assert client.get(f"/runs/{run.run_id}/at/9").status_code == 404
    assert "restart 9 is out of range" in client.get(f"/runs/{run.run_id}/at/9").text
    assert client.get("/runs/nosuch/history").status_code == 404

    data = client.get(f"/api/runs/{run.run_id}/history").json()
    assert [s["restart"] for s in data["steps"]] == [0, 1, 2, 3, 4]
    assert data["steps"][2]["results"][0]["output"] == "build"

    forked = client.get(f"/runs/{fork}")
    assert f'forked from <a class="id" href="/runs/{run.run_id}">' in forked.text
    history = client.get(f"/runs/{fork}/history").text
    assert f"forked from {run.run_id} at restart 2" in history
