"""The dashboard's Starlette application: pages, JSON endpoints, live events, actions.

    GET  /                          the runs (status and text filters, newest first, pages)
    GET  /runs/{id}                 a run: its graph, node details, context, waits, timeline
    GET  /runs/{id}/history         its history: one line per write, each linked to
    GET  /runs/{id}/at/{n}          the run as it was after restart n (graph, context)
    GET  /runs/{id}/svg             the run's picture (`ui.graph.run_svg`; ?unfold=ID,ID)
    GET  /partials/runs             the runs table alone (the live list redraws it)
    GET  /partials/runs/{id}        the run's live part alone (the live page redraws it)
    GET  /api/runs                  a page of runs as JSON
    GET  /api/runs/{id}             a run as JSON (`api.show_run`)
    GET  /api/runs/{id}/nodes/{n}   one node: payload, sent, output, error, attempts, times
    GET  /api/events                server-sent events: the runs list changed
    GET  /api/runs/{id}/events      server-sent events: the run changed
    POST /runs/{id}/retry|resume|abort|signal   the actions, with the page's CSRF token

Everything goes through `ablauf_lang.api`, with the command line's rules and refusals: a
refusal (RunError) is shown on the page with status 409, a bad input with 400, a missing
or wrong CSRF token is 403. Retry and resume run the run in this process, in a thread,
with the actions `create_app` was given; on a PostgreSQL store they hand it back to the
workers (`api.requeue`). Every value is escaped (Jinja's autoescape; the SVG escapes its
own text), and no route reads a file: static files come from the package only.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import anyio.to_thread
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ablauf_lang import api
from ablauf_lang.errors import AblaufError, RunError
from ablauf_lang.ui.graph import run_states, run_svg
from ablauf_lang.ui.render import step_line
from ablauf_lang.values import dumps_json
from ablauf_lang.web import live

HERE = Path(__file__).parent
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
STATES = ("pending", "running", "abandoned", "success", "failure", "aborted", "damaged")
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
TIMELINE_MAX = 200  # leaves the timeline shows (the latest dispatched)
HISTORY_MAX = 500  # writes the history page shows (the latest)
STARTED_WAIT = 1.5  # seconds an action waits for a refusal before it says "started"
FORM_MAX = 256 * 1024  # bytes of a posted form
VALUE_MAX = 20_000  # characters of a value shown in a node's details
CONTEXT_NOTE = (
    "the context a leaf was dispatched with is not stored per leaf: this is the run's "
    "context as last recorded"
)
_ID = re.compile(r"[0-9A-Za-z_.:-]{1,200}")
_HEX = re.compile(r"[0-9a-f]{1,32}")
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)


@dataclass
class Dashboard:
    """What the application keeps: the store, the actions, the CSRF secret, and the
    runs this process drives (retry, resume) with how the last of each ended."""

    url: str
    actions: Mapping[str, api.Action] | None
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    driving: dict[str, Future[Any]] = field(default_factory=dict)
    ended: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


# ---------------------------------------------------------------- helpers


def _when(stamp: float | None) -> str:
    if stamp is None:
        return ""
    return datetime.fromtimestamp(stamp).isoformat(sep=" ", timespec="seconds")


def _json(value: Any, limit: int = VALUE_MAX) -> str:
    """A value as indented JSON text (cut at `limit` characters)."""
    try:
        text = dumps_json(value, indent=2)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _note(info: api.RunInfo) -> str:
    text = info.damage or (f"aborted: {info.aborted}" if info.aborted is not None else None)
    text = text or info.error or info.waiting or ""
    return " ".join(str(text).split())


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(HERE / "templates")),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["json"] = _json
    env.globals["note_of"] = _note
    return env


def _int(text: str | None, default: int, least: int, most: int | None = None) -> int:
    """A query parameter as an int in range; AblaufError (400) for anything else."""
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise AblaufError(f"not a whole number: {text[:40]!r}") from None
    if value < least or (most is not None and value > most):
        top = "" if most is None else f" and {most}"
        raise AblaufError(f"{value} is out of range (between {least}{top})")
    return value


def _unfold(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return sorted({int(part) for part in text.split(",") if part.strip()})[:100]
    except ValueError:
        raise AblaufError(f"unfold takes node ids separated by commas, not {text[:40]!r}") from None


@dataclass
class Query:
    """The runs list's filters and page."""

    status: str | None
    text: str
    waiting: bool
    limit: int
    offset: int

    @classmethod
    def of(cls, request: Request) -> Query:
        q = request.query_params
        status = q.get("status") or None
        if status is not None and status not in STATES:
            raise AblaufError(f"no run state {status[:40]!r}: one of {', '.join(STATES)}")
        return cls(
            status=status,
            text=(q.get("text") or "").strip()[:200],
            waiting=q.get("waiting") in ("1", "on", "true"),
            limit=_int(q.get("limit"), DEFAULT_LIMIT, 1, MAX_LIMIT),
            offset=_int(q.get("offset"), 0, 0),
        )

    def params(self, **changed: Any) -> str:
        """The query string of this list (with `changed` values)."""
        data: dict[str, Any] = {
            "status": self.status or "",
            "text": self.text,
            "waiting": "1" if self.waiting else "",
            "limit": self.limit,
            "offset": self.offset,
        }
        data.update(changed)
        return urlencode({k: v for k, v in data.items() if v not in ("", None)})

    def find(self) -> dict[str, Any]:
        """The arguments of `api.find_runs` for a filename text (the id prefix aside)."""
        return {
            "state": self.status,
            "filename": self.text or None,
            "limit": self.limit,
            "offset": self.offset,
            "waiting": self.waiting,
        }


def find(url: str, query: Query) -> tuple[list[api.RunInfo], int, str | None]:
    """The runs the list shows, how many there are in all, and a note: the text is a
    run id prefix when it names one run (in the state asked), else a program file."""
    note = None
    if query.text and _HEX.fullmatch(query.text):
        try:
            run_id = api.resolve_run_id(query.text, url)
        except RunError as exc:
            if "ambiguous" in exc.message:
                note = "several run ids start with this: type more of the id"
        else:
            info = api.load_run(run_id, url).info
            ok = query.status is None or query.status == info.state
            ok = ok or (query.status == "pending" and info.status is api.Status.PENDING)
            ok = ok or (query.status == "failure" and info.status is api.Status.FAILURE)
            shown = [info] if ok and query.offset == 0 else []
            return shown, int(ok), None
    infos, total = api.find_runs(url, **query.find())
    return infos, total, note


def _resolved(url: str, given: str) -> str:
    if not _ID.fullmatch(given):
        raise RunError(f"no run {given[:60]!r}")
    return api.resolve_run_id(given, url)


def _timeline(job: api.Job) -> dict[str, Any]:
    """The leaves that ran, by the time they were dispatched (the latest TIMELINE_MAX),
    each with its attempts, placed on one time scale (percent of the span)."""
    rows: list[dict[str, Any]] = []
    for leaf in job.leaves():
        if leaf.dispatched_at is None and leaf.started_at is None and not leaf.attempts:
            continue
        spans: list[dict[str, Any]] = []
        for a in leaf.attempts:
            start = a.get("started_at")
            spans.append(
                {
                    "attempt": a.get("attempt"),
                    "state": str(a.get("state") or ""),
                    "start": start,
                    "end": a.get("finished_at") or start,
                }
            )
        start = leaf.started_at or leaf.dispatched_at
        state = str(leaf.result) if leaf.result is not None else "pending"
        spans.append(
            {"attempt": leaf.attempt, "state": state, "start": start, "end": leaf.finished_at}
        )
        rows.append(
            {
                "id": leaf.id,
                "action": leaf.action,
                "dispatched": leaf.dispatched_at,
                "started": leaf.started_at,
                "finished": leaf.finished_at,
                "state": state,
                "spans": spans,
            }
        )
    total = len(rows)
    rows.sort(key=lambda r: r["dispatched"] or r["started"] or 0.0)
    rows = rows[-TIMELINE_MAX:]
    now = time.time()
    stamps = [s["start"] for r in rows for s in r["spans"] if s["start"] is not None]
    ends = [s["end"] or now for r in rows for s in r["spans"] if s["start"] is not None]
    lo = min(stamps, default=now)
    hi = max(ends, default=now)
    width = max(hi - lo, 1e-3)
    for r in rows:
        for s in r["spans"]:
            if s["start"] is None:
                s["left"], s["width"] = 0.0, 0.0
                continue
            end = s["end"] or now
            s["left"] = round(100 * (s["start"] - lo) / width, 2)
            s["width"] = round(max(0.4, 100 * (end - s["start"]) / width), 2)
            s["seconds"] = max(0.0, end - s["start"])
    return {"rows": rows, "total": total, "start": lo, "span": hi - lo}


# ---------------------------------------------------------------- the application


def create_app(
    store_url: str,
    *,
    actions: Mapping[str, api.Action] | None = None,
    public: bool = False,
) -> Starlette:
    """The dashboard of the store at `store_url`; retry and resume perform `actions`.

    Requests must name a loopback host (`Host: 127.0.0.1`) unless `public`: a page of
    another site cannot reach the dashboard through its own name (DNS rebinding)."""
    board = Dashboard(store_url, actions)
    env = _environment()

    def page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        html = env.get_template(name).render(request=request, csrf=board.csrf, **context)
        response = HTMLResponse(html, status_code=status_code)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        return response

    def problem(request: Request, exc: AblaufError, status_code: int) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": exc.message}, status_code=status_code)
        return page(request, "message.html", status_code, message=exc.message)

    async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))

    # ---------------------------------------------------------------- runs

    def runs_context(query: Query) -> dict[str, Any]:
        infos, total, note = find(board.url, query)
        prev = max(0, query.offset - query.limit) if query.offset else None
        nxt = query.offset + len(infos) if query.offset + len(infos) < total else None
        return {
            "infos": infos,
            "total": total,
            "note": note,
            "query": query,
            "states": STATES,
            "prev": None if prev is None else query.params(offset=prev),
            "next": None if nxt is None else query.params(offset=nxt),
        }

    async def runs_page(request: Request) -> Response:
        query = Query.of(request)
        data = await call(runs_context, query)
        return page(request, "runs.html", **data)

    async def runs_partial(request: Request) -> Response:
        query = Query.of(request)
        data = await call(runs_context, query)
        return page(request, "_runs_table.html", **data)

    async def runs_json(request: Request) -> Response:
        query = Query.of(request)
        infos, total, note = await call(find, board.url, query)
        return JSONResponse(
            {
                "runs": [i.to_dict() for i in infos],
                "total": total,
                "limit": query.limit,
                "offset": query.offset,
                "note": note,
            }
        )

    async def runs_events(request: Request) -> Response:
        query = Query.of(request)
        lifetime = float(_int(request.query_params.get("lifetime"), int(live.LIFETIME), 1, 3600))

        def look() -> dict[str, Any]:
            infos, total, _ = find(board.url, query)
            rows = [(i.run_id, i.state, i.updated, i.restarts) for i in infos]
            return {
                "total": total,
                "digest": hashlib.sha1(repr((rows, total)).encode()).hexdigest(),
            }

        return _sse(live.stream(look, request.is_disconnected, key=_digest, lifetime=lifetime))

    # ---------------------------------------------------------------- a run

    def run_context(run_id: str, unfold: list[int]) -> dict[str, Any]:
        stored = api.load_run(run_id, board.url)
        job = stored.job
        title = f"run {run_id} · {stored.info.filename or '<program>'} · {job.status}"
        svg = run_svg(job, title=title, unfold=unfold)
        with board.lock:
            driving = run_id in board.driving and not board.driving[run_id].done()
            ended = board.ended.get(run_id)
        return {
            "run_id": run_id,
            "info": stored.info,
            "job": job,
            "svg": svg,
            "unfold": ",".join(map(str, unfold)),
            "timeline": _timeline(job),
            "context_text": _json(job.context),
            "initial_text": _json(stored.initial_context),
            "driving": driving,
            "ended": ended,
            "shared": api.is_shared_store(board.url),
        }

    async def run_page(request: Request) -> Response:
        run_id = await call(_resolved, board.url, request.path_params["run_id"])
        unfold = _unfold(request.query_params.get("unfold"))
        data = await call(run_context, run_id, unfold)
        done = request.query_params.get("done")
        return page(request, "run.html", done=done and done[:300], **data)

    async def run_partial(request: Request) -> Response:
        run_id = await call(_resolved, board.url, request.path_params["run_id"])
        unfold = _unfold(request.query_params.get("unfold"))
        data = await call(run_context, run_id, unfold)
        return page(request, "_run_live.html", **data)

    def history_context(run_id: str) -> dict[str, Any]:
        info = api.load_run(run_id, board.url).info
        history = api.run_history(run_id, board.url)
        steps = list(history.steps)
        shown = steps[-HISTORY_MAX:]
        rows = [
            {
                "restart": step.restart,
                "seq": step.seq,
                "updated": step.updated,
                "kind": step.kind,
                "status": step.status,
                "what": step_line(step, info.parent, info.parent_step)
                if step is steps[0]
                else step_line(step),
                "last": i == len(shown) - 1 or shown[i + 1].restart != step.restart,
            }
            for i, step in enumerate(shown)
        ]
        return {
            "run_id": run_id,
            "info": info,
            "rows": rows,
            "total": len(steps),
            "partial": history.partial,
        }

    async def history_page(request: Request) -> Response:
        run_id = await call(_resolved, board.url, request.path_params["run_id"])
        data = await call(history_context, run_id)
        return page(request, "history.html", **data)

    async def history_json(request: Request) -> Response:
        run_id = await call(_resolved, board.url, request.path_params["run_id"])
        history = await call(api.run_history, run_id, board.url)
        steps = [step.to_dict() for step in history.steps]
        return Response(
            dumps_json({"run_id": run_id, "partial": history.partial, "steps": steps}),
            media_type="application/json",
        )

    def at_context(run_id: str, at: int) -> dict[str, Any]:
        stored = api.run_at(run_id, at, board.url)
        job = stored.job
        title = f"run {run_id} · as after restart {at} · {job.status}"
        return {
            "run_id": run_id,
            "at": at,
            "info": stored.info,
            "job": job,
            "svg": run_svg(job, title=title),
            "context_text": _json(job.context),
        }

    async def at_page(request: Request) -> Response:
        run_id = await call(_resolved, board.url, request.path_params["run_id"])
        at = _int(request.path_params["at"], 0, 0)
        data = await call(at_context, run_id, at)
        return page(request, "at.html", **data)

    async def run_svg_route(request: Request) -> Response:
        run_id = await call(_resolved, board.url, request.path_params["run_id"])
        unfold = _unfold(request.query_params.get("unfold"))
        stored = await call(api.load_run, run_id, board.url)
        svg = run_svg(stored.job, title=f"run {run_id}", unfold=unfold)
        return Response(
            svg,
            media_type="image/svg+xml",
            headers={"Content-Security-Policy": "script-src 'none'"},
        )

    async def run_json(request: Request) -> Response:
        run_id = await call(_resolved, board.url, request.path_params["run_id"])
        stored = await call(api.load_run, run_id, board.url)
        return Response(dumps_json(api.show_run(stored)), media_type="application/json")

    def node_data(run_id: str, node_id: int) -> dict[str, Any]:
        stored = api.load_run(run_id, board.url)
        job = stored.job
        shown = api.show_run(stored)
        found: dict[str, Any] | None = next((n for n in shown["nodes"] if n["id"] == node_id), None)
        if found is None:
            raise _NoSuch(f"run {run_id} has no node {node_id}")
        found["state"] = run_states(job).get(node_id, found["state"])
        found["context"] = job.context
        found["context_note"] = CONTEXT_NOTE
        for stamp in ("dispatched_at", "started_at", "finished_at"):
            if found.get(stamp) is not None:
                found[stamp + "_text"] = _when(found[stamp])
        for attempt in found.get("attempts", ()):
            for stamp in ("started_at", "finished_at"):
                if attempt.get(stamp) is not None:
                    attempt[stamp + "_text"] = _when(attempt[stamp])
        return found

    async def node_json(request: Request) -> Response:
        run_id = await call(_resolved, board.url, request.path_params["run_id"])
        node_id = _int(request.path_params["node"], 0, 0)
        data = await call(node_data, run_id, node_id)
        return Response(dumps_json(data), media_type="application/json")

    async def run_events(request: Request) -> Response:
        run_id = await call(_resolved, board.url, request.path_params["run_id"])
        lifetime = float(_int(request.query_params.get("lifetime"), int(live.LIFETIME), 1, 3600))

        def look() -> dict[str, Any]:
            state = live.run_snapshot(board.url, run_id)
            with board.lock:
                future = board.driving.get(run_id)
                state["driving"] = future is not None and not future.done()
            state["done"] = state["done"] and not state["driving"]
            return state

        def key(state: dict[str, Any]) -> Any:
            return (state["updated"], state["restarts"], state["state"], state["driving"])

        return _sse(live.stream(look, request.is_disconnected, key=key, lifetime=lifetime))

    # ---------------------------------------------------------------- actions

    async def checked_form(request: Request) -> dict[str, str]:
        """The form of a POST, its CSRF token and origin checked (403 otherwise)."""
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if origin is not None and origin != "null" and urlsplit(origin).netloc != host:
            raise _Forbidden("this request comes from another site")
        form = await _form(request)
        token = form.get("csrf", "")
        if not hmac.compare_digest(token.encode(), board.csrf.encode()):
            raise _Forbidden("the form's CSRF token is missing or wrong: reload the page")
        return form

    def again(run_id: str, retry: bool) -> str:
        """Retry or resume: handed to the workers (PostgreSQL) or driven in a thread here;
        a refusal that comes at once is raised, else the run is said started."""
        word = "retry" if retry else "resume"
        if api.is_shared_store(board.url):
            api.requeue(run_id, board.url, retry=retry)
            return f"{word}: handed back to the workers"
        with board.lock:
            running = board.driving.get(run_id)
            if running is not None and not running.done():
                raise RunError(f"run {run_id} is already being driven by this server")
            future: Future[Any] = Future()
            board.driving[run_id] = future
            board.ended.pop(run_id, None)

        def work() -> None:
            try:
                fn = api.retry if retry else api.resume
                run = fn(run_id, board.url, board.actions)
            except BaseException as exc:
                message = exc.message if isinstance(exc, AblaufError) else repr(exc)
                with board.lock:
                    board.ended[run_id] = f"{word} ended with an error: {message}"
                future.set_exception(exc)
                return
            with board.lock:
                board.ended[run_id] = f"{word} ended: {run.status}"
            future.set_result(run)

        threading.Thread(target=work, name=f"ablauf-ui-{word}-{run_id}", daemon=True).start()
        try:
            run = future.result(timeout=STARTED_WAIT)
        except FutureTimeout:
            return f"{word} started: the run goes on in the server"
        except AblaufError:
            with board.lock:
                board.ended.pop(run_id, None)
            raise
        return f"{word}: the run ended, {run.status}"

    def act(run_id: str, what: str, form: dict[str, str]) -> str:
        if what in ("retry", "resume"):
            return again(run_id, what == "retry")
        if what == "abort":
            reason = form.get("reason", "").strip() or "aborted"
            run = api.abort_run(run_id, board.url, reason=reason[:2000])
            return f"aborted ({run.status}): {reason[:200]}"
        name = form.get("name", "").strip().removeprefix(":")
        if not name:
            raise _BadInput("a signal needs a name")
        text = form.get("value", "").strip()
        value = None
        if text:
            import json

            try:
                value = json.loads(text)
            except ValueError as exc:
                raise _BadInput(f"the signal's value is not JSON: {exc}") from None
        seq = api.signal(run_id, name, value, board.url)
        return f"sent signal {name} (#{seq})"

    async def action(request: Request) -> Response:
        what = request.path_params["action"]
        if what not in ("retry", "resume", "abort", "signal"):
            return problem(request, AblaufError(f"no action {what[:40]!r}"), 404)
        try:
            form = await checked_form(request)
        except _Forbidden as exc:
            return page(request, "message.html", 403, message=str(exc))
        except _BadInput as exc:
            return page(request, "message.html", 400, message=str(exc))
        try:
            run_id = await call(_resolved, board.url, request.path_params["run_id"])
            done = await call(act, run_id, what, form)
        except _BadInput as exc:
            return await refused(request, str(exc), 400)
        except AblaufError as exc:
            return await refused(request, exc.message, 409)
        target = f"/runs/{run_id}?" + urlencode({"done": done})
        return RedirectResponse(target, status_code=303)

    async def refused(request: Request, message: str, status_code: int) -> Response:
        try:
            run_id = await call(_resolved, board.url, request.path_params["run_id"])
            data = await call(run_context, run_id, [])
        except AblaufError:
            return page(request, "message.html", status_code, message=message)
        return page(request, "run.html", status_code, refusal=message, done=None, **data)

    # ---------------------------------------------------------------- errors

    async def on_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, RunError):
            missing = isinstance(exc, _NoSuch) or exc.message.startswith("no run")
            missing = missing or "is out of range" in exc.message
            status = 404 if missing else 409
            return problem(request, exc, status)
        if isinstance(exc, AblaufError):
            return problem(request, exc, 400)
        raise exc

    async def not_found(request: Request, exc: Exception) -> Response:
        return problem(request, AblaufError("no such page"), 404)

    routes = [
        Route("/", runs_page),
        Route("/partials/runs", runs_partial),
        Route("/partials/runs/{run_id}", run_partial),
        Route("/runs/{run_id}", run_page),
        Route("/runs/{run_id}/svg", run_svg_route),
        Route("/runs/{run_id}/history", history_page),
        Route("/runs/{run_id}/at/{at}", at_page),
        Route("/api/runs/{run_id}/history", history_json),
        Route("/runs/{run_id}/{action}", action, methods=["POST"]),
        Route("/api/runs", runs_json),
        Route("/api/events", runs_events),
        Route("/api/runs/{run_id}", run_json),
        Route("/api/runs/{run_id}/events", run_events),
        Route("/api/runs/{run_id}/nodes/{node}", node_json),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    middleware = []
    if not public:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_HOSTS)))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={AblaufError: on_error, 404: not_found},
    )
    app.state.dashboard = board
    return app


class _NoSuch(RunError):
    """A node the run does not have: 404."""


class _Forbidden(Exception):
    """A POST without the page's CSRF token (or from another site): 403."""


class _BadInput(Exception):
    """A form field that cannot be used: 400."""


async def _form(request: Request) -> dict[str, str]:
    """A urlencoded form (what the pages post), at most FORM_MAX bytes; the first value
    of each field. Anything else is an empty form (and so fails the CSRF check)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return {}
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_MAX:
            raise _BadInput(f"the form is larger than {FORM_MAX:,} bytes")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items() if v}


def _digest(state: dict[str, Any]) -> Any:
    return state["digest"]


def _sse(events: Any) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
