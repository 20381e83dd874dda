"""Show jobs to people: node labels, coloured states, the job tree, leaf counts.

Shared by the REPL (`:tree`, `:step`) and the command line (`ablauf run` progress,
`ablauf runs show`). Builds `rich` renderables; printing is the caller's business.
A node's label and the roles of its children come from its kind (`engine.kinds`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Group
from rich.text import Text
from rich.tree import Tree

from ablauf_lang.engine.job import Job
from ablauf_lang.engine.kinds import Leaf, label_of, roles_of
from ablauf_lang.engine.nodes import LeafState
from ablauf_lang.engine.states import state_of
from ablauf_lang.engine.states import states as states_of
from ablauf_lang.engine.waits import waits as waits_of
from ablauf_lang.stdlib.actions import AWAIT, SLEEP, WAIT_ACTIONS
from ablauf_lang.stdlib.builtins import show_value
from ablauf_lang.stdlib.durations import format_duration, format_instant

if TYPE_CHECKING:
    from ablauf_lang.api import Run
    from ablauf_lang.codec.history import HistoryStep

__all__ = [
    "BY_HAND",
    "FULL_WIDTH",
    "STATE_STYLES",
    "LeafCounts",
    "attempt_text",
    "changed_ids",
    "dispatch_text",
    "format_value",
    "job_tree",
    "leaf_counts",
    "node_text",
    "outcome",
    "program_tree",
    "state_text",
    "status_text",
    "value_width",
    "wait_form",
    "waits_lines",
]

# Colours of node states and run statuses.
STATE_STYLES: dict[str, str] = {
    "success": "green",
    "failure": "bold red",
    "timeout": "bold magenta",
    "pending": "yellow",
    "skipped": "dim",
    "unset": "dim cyan",
}

# Marks a node whose state changed in the last step.
CHANGED_MARK = "●"

# The console width used for output that is not a terminal (piped, a file): whole lines,
# never wrapped or cut.
FULL_WIDTH = 1_000_000


def value_width(width: int, share: int = 3) -> int:
    """How many columns a value may take on a line of `width` (0: all it needs, for
    output that is not a terminal)."""
    return 0 if width >= FULL_WIDTH else max(16, width // share)


# ---------------------------------------------------------------- values


def format_value(value: Any, limit: int = 60) -> str:
    """Show a payload, output or error in the language's own notation, cut at `limit`
    (0: whole). The notation is the language's own (`show_value`), map entries apart by ", "."""
    text = show_value(value, limit + 3 if limit else None, entries=", ")
    if limit and len(text) > limit:
        text = text[: max(1, limit - 1)] + "…"
    return text


# ---------------------------------------------------------------- nodes


def state_text(state: str) -> Text:
    """A state word, coloured."""
    return Text(state, style=STATE_STYLES.get(state, ""))


def status_text(status: str) -> Text:
    """A run status (pending, success, failure), coloured."""
    return Text(str(status), style=STATE_STYLES.get(str(status), "bold"))


# `timing` value of an action whose result was given by hand (the REPL's :ok / :fail).
BY_HAND = None


def node_text(
    node: Any,
    role: str | None = None,
    *,
    changed: bool = False,
    width: int = 40,
    timing: Mapping[int, float | None] | None = None,
    states: bool = True,
    show_id: bool = True,
    state: str | None = None,
) -> Text:
    """One line for a node: id, what it is, its state, and its output or error.

    The line never wraps: what does not fit the terminal ends in an ellipsis. `width`
    cuts each value shown (0: values in full, for output that is not a terminal).
    `timing` maps an action's id to when it really began (its duration is counted from
    there, not from its dispatch: time spent queued or waiting for a person is left out),
    or to `BY_HAND` for a result given by hand (no duration). `states=False` leaves out
    states and results (a compiled tree, `ablauf check --tree`). `state`: the node's state
    word when the caller knows it in its tree (`engine.states.states`: a branch that never
    ran is `skipped`), else `engine.states.state_of(node)`.
    """
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(CHANGED_MARK + " " if changed else "  ", style="bold yellow")
    if show_id:
        text.append(f"#{node.id} ", style="bold" if changed else "dim")
    if state is None:
        state = state_of(node)
    if isinstance(node, Leaf):
        form = wait_form(node, width)
        if form is not None:  # a sleep or an await: shown as written
            text.append(form[0], style="bold")
            text.append(form[1])
        else:
            text.append(node.action, style="bold")
            if node.payload is not None:
                text.append(" " + format_value(node.payload, width))
            if node.idempotent:
                text.append(" idempotent", style="dim")
    else:
        text.append(role or label_of(node.kind), style="bold blue")
        if hasattr(node, "test"):  # (if!! test ...): the test, decided when reached
            text.append(" " + format_value(node.test, width))
        if hasattr(node, "var") and hasattr(node, "coll"):  # (doseq!! [x coll] ...)
            text.append(f" [{node.var} {format_value(node.coll, width)}]")
    if not states:
        return text
    text.append("  ")
    text.append_text(state_text(state))
    if not isinstance(node, Leaf):
        if getattr(node, "error", None) is not None:  # a test or collection that failed
            text.append(" → " + format_value(node.error, width), style="red")
    else:
        # Attempts and duration first: a long output may be cut at the terminal's edge.
        policy = getattr(node, "retry", None)
        most = policy.get("max") if isinstance(policy, dict) else None
        if node.attempt > 1 or (most is not None and node.attempt >= 1):
            of = f" of {most}" if most is not None else ""
            text.append(f" attempt {node.attempt}{of}", style="dim")
        began = _began(node, timing)
        if began is _HAND:
            if node.done:
                text.append(" by hand", style="dim")
        elif isinstance(began, float | int) and node.finished_at is not None:
            text.append(" " + duration_text(max(0.0, node.finished_at - began)), style="dim")
        # A wake-up, a deadline, or a retry's next attempt that has not started yet.
        waits = node.action in WAIT_ACTIONS or node.started_at is None
        if node.result is LeafState.PENDING and node.wake is not None and waits:
            text.append(" until " + format_instant(node.wake), style="yellow")
        if node.result is LeafState.SUCCESS and node.output is not None:
            text.append(" → " + format_value(node.output, width), style="green")
        elif node.result in (LeafState.FAILURE, LeafState.TIMEOUT):
            text.append(" → " + format_value(node.error, width), style="red")
    return text


_HAND = object()


def wait_form(leaf: Leaf, width: int = 40) -> tuple[str, str] | None:
    """A wait leaf as its form: ("sleep!!", " 10m"), ("sleep-until!!", " 2026-...Z"),
    ("await!!", " :approval {:timeout 24h}"); None for any other leaf."""
    payload = leaf.payload if isinstance(leaf.payload, dict) else {}

    def shown(value: Any, as_time: Any) -> str:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return as_time(float(value)) if number else format_value(value, width)

    if leaf.action == SLEEP:
        if payload.get("until") is not None and "seconds" not in payload:
            return "sleep-until!!", " " + shown(payload["until"], format_instant)
        return "sleep!!", " " + shown(payload.get("seconds"), format_duration)
    if leaf.action == AWAIT:
        rest = f" :{payload.get('signal')}"
        if payload.get("timeout") is not None:
            rest += " {:timeout " + shown(payload["timeout"], format_duration) + "}"
        return "await!!", rest
    return None


def _began(node: Any, timing: Mapping[int, float | None] | None) -> Any:
    """When an action really began: `timing`, else its recorded start, else its dispatch."""
    if timing is not None and node.id in timing:
        began = timing[node.id]
        return _HAND if began is BY_HAND else began
    started = getattr(node, "started_at", None)  # recorded by engines that keep it
    return started if started is not None else node.dispatched_at


def attempt_text(attempt: Mapping[str, Any], width: int = 40) -> Text:
    """One line for an earlier attempt of a leaf (`Leaf.attempts`): its number, how it
    ended, when it started and ended, and its error."""
    state = str(attempt.get("state") or "?")
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(f"attempt {attempt.get('attempt', '?')} ", style="dim")
    text.append_text(state_text(state))
    started, finished = attempt.get("started_at"), attempt.get("finished_at")
    if isinstance(started, int | float):
        text.append(f" {format_instant(started)}", style="dim")
        if isinstance(finished, int | float):
            text.append(f" – {format_instant(finished)}", style="dim")
            text.append(f" ({duration_text(max(0.0, finished - started))})", style="dim")
    elif isinstance(finished, int | float):
        text.append(f" ended {format_instant(finished)}", style="dim")
    if attempt.get("error") is not None:
        text.append(" → " + format_value(attempt["error"], width), style="red")
    return text


def duration_text(seconds: float) -> str:
    """A duration for people: `850us`, `12ms`, `3.4s`, `2m05s`."""
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f}us"
    if seconds < 1:
        return f"{seconds * 1e3:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s"


def dispatch_text(dispatch: Any, width: int = 60) -> Text:
    """One line for a dispatch: `#id action payload`."""
    text = Text()
    text.append(f"#{dispatch.id} ", style="bold")
    text.append(dispatch.action, style="bold")
    if dispatch.payload is not None:
        text.append(" " + format_value(dispatch.payload, width))
    return text


def job_tree(
    job: Job,
    *,
    changed: Iterable[int] = (),
    max_nodes: int | None = None,
    label: Text | str | None = None,
    width: int = 40,
    timing: Mapping[int, float | None] | None = None,
) -> Tree:
    """The job as a tree, each node with its id and state; `changed` ids are marked.

    With `max_nodes`, nodes after that many (in pre-order) are summed up in one line.
    `width` and `timing`: see `node_text`.
    """
    return _tree(
        job.root,
        label if label is not None else _job_label(job),
        total=len(job.paths),
        changed=set(changed),
        max_nodes=max_nodes,
        width=width,
        timing=timing,
    )


def program_tree(root: Any, *, label: Text | str, width: int = 40) -> Tree:
    """A compiled tree as `ablauf check --tree` shows it: ids and what each node does, kept
    run-time expressions as source, and the body a `doseq!!`/`pmap!!` copies per element
    (its nodes get their ids when it is expanded)."""
    return _tree(root, label, total=None, width=width, states=False, templates=True)


def _tree(
    root: Any,
    label: Text | str,
    *,
    total: int | None,
    changed: set[int] | frozenset[int] = frozenset(),
    max_nodes: int | None = None,
    width: int = 40,
    timing: Mapping[int, float | None] | None = None,
    states: bool = True,
    templates: bool = False,
) -> Tree:
    top = Tree(label, guide_style="dim")
    # One pass for every node's state: a rescue or else branch that never ran is skipped.
    state_words = states_of(root) if states else {}
    # Pre-order walk with an explicit stack: deep trees never hit the recursion limit.
    # An entry: node, parent, role, and whether it belongs to a template (no id yet).
    stack: list[tuple[Any, Tree, str | None, bool]] = [(root, top, None, False)]
    shown = 0
    while stack:
        node, parent, role, in_template = stack.pop()
        if max_nodes is not None and shown >= max_nodes:
            more = f"… {total - shown} more nodes" if total is not None else "… more nodes"
            parent.add(Text(more, style="dim"))
            break
        shown += 1
        line = node_text(
            node,
            role,
            changed=node.id in changed,
            width=width,
            timing=timing,
            states=states,
            show_id=not in_template,
            state=None if in_template else state_words.get(node.id),
        )
        branch = parent.add(line)
        if states and not in_template:
            for attempt in getattr(node, "attempts", None) or ():
                branch.add(attempt_text(attempt, width))
        kids = list(getattr(node, "children", ()))
        roles: tuple[str | None, ...] = roles_of(node.kind)
        if len(roles) != len(kids):
            roles = (None,) * len(kids)
        entries = [
            (kid, branch, kid_role, in_template) for kid, kid_role in zip(kids, roles, strict=True)
        ]
        template = getattr(node, "template", None)
        if templates and template is not None and not kids:
            entries.append((template, branch, "each", True))
        stack.extend(reversed(entries))
    return top


def _job_label(job: Job) -> Text:
    text = Text("job ", style="bold")
    text.append_text(status_text(job.status))
    text.append(f"  restarts {job.restarts}", style="dim")
    if job.aborted is not None:
        text.append(f"  aborted: {job.aborted}", style="red")
    return text


def changed_ids(before: Job | None, after: Job) -> set[int]:
    """Ids of the nodes whose state word differs between two versions of a job."""
    if before is None:
        return set()
    old = states_of(before.root)
    new = states_of(after.root)
    return {i for i, state in new.items() if old.get(i) != state}


def waits_lines(job: Job) -> list[Text]:
    """One line per wait of an unfinished job: `#3 waiting: approval (until ...)`,
    `#1 sleeping until ...`, `#5 retrying :x/y (attempt 3 at ...)` (none once done)."""
    if job.done:
        return []
    return [
        Text(f"#{wait.node} ", style="dim") + Text(wait.describe(), style="yellow")
        for wait in waits_of(job)
    ]


# ---------------------------------------------------------------- counts


@dataclass(frozen=True, slots=True)
class LeafCounts:
    """How many leaves are in each state."""

    total: int = 0
    unset: int = 0
    pending: int = 0
    success: int = 0
    failed: int = 0
    skipped: int = 0

    @property
    def done(self) -> int:
        """Leaves that finished: succeeded, failed or skipped."""
        return self.success + self.failed + self.skipped


def leaf_counts(job: Job) -> LeafCounts:
    """Count the leaves of a job by state (a walk over the tree)."""
    counts = {"unset": 0, "pending": 0, "success": 0, "failed": 0, "skipped": 0}
    total = 0
    for leaf in job.leaves():
        total += 1
        state = leaf.result
        if state is None:
            counts["unset"] += 1
        elif state is LeafState.PENDING:
            counts["pending"] += 1
        elif state is LeafState.SUCCESS:
            counts["success"] += 1
        elif state is LeafState.SKIPPED:
            counts["skipped"] += 1
        else:
            counts["failed"] += 1
    return LeafCounts(total=total, **counts)


# ---------------------------------------------------------------- runs


def outcome(run: Run, elapsed: float | None, width: int) -> Group:
    """The result of a run as `ablauf run` prints it: status, id, restarts (and `elapsed`
    seconds), the abort reason, each failed step with its error, the context."""
    full = width >= FULL_WIDTH
    line = Text()
    line.append_text(status_text(run.status))
    line.append(f"  run {run.run_id}  restarts {run.job.restarts}", style="dim")
    if elapsed is not None:
        line.append(f"  {elapsed:.2f}s", style="dim")
    if run.job.aborted is not None:
        line.append(f"  aborted: {run.job.aborted}", style="red")
    lines = [line]
    for leaf in run.job.leaves():
        if leaf.result in (LeafState.FAILURE, LeafState.TIMEOUT):
            err = Text(f"  #{leaf.id} {leaf.action} {leaf.result}: ", style="red")
            err.append(format_value(leaf.error, 0 if full else 200))
            lines.append(err)
    if run.context:
        lines.append(
            Text("context ", style="dim") + Text(format_value(run.context, 0 if full else 400))
        )
    return Group(*lines)


# ---------------------------------------------------------------- history

TEXT_WIDTH = 40  # of an output, error or payload in a history line


def step_line(step: HistoryStep, parent: str | None = None, parent_step: int | None = None) -> str:
    """One write of a run's history in a line: `ok 1 :t/echo -> 1; sent 2 :t/echo 2; ctx
    x = 1` (`runs history`, the REPL's `:history`, the dashboard). `parent`: the run it
    was forked from, for its first line."""
    parts: list[str] = []
    if step.kind == "start":
        if parent is not None:
            parts.append(f"forked from {parent} at restart {parent_step}")
        else:
            parts.append("created")
    elif step.kind == "abort":
        parts.append(f"aborted: {step.aborted}")
    elif step.kind == "replay":
        parts.append("resumed or retried: leaves handed back")
    elif step.kind == "whole":
        parts.append("written whole")
    for r in step.results:
        if r.state == "success":
            parts.append(f"ok {r.node} :{r.action} -> {format_value(r.output, TEXT_WIDTH)}")
        else:
            parts.append(f"{r.state} {r.node} :{r.action}: {format_value(r.error, TEXT_WIDTH)}")
    for d in step.dispatches:
        again = f" (attempt {d.attempt})" if d.attempt > 1 else ""
        parts.append(f"sent {d.node} :{d.action} {format_value(d.payload, TEXT_WIDTH)}{again}")
    if step.context and step.kind not in ("start", "whole"):
        keys = ", ".join(
            f"{_key_text(key)} = {format_value(value, TEXT_WIDTH)}"
            for key, value in step.context.items()
        )
        parts.append(f"ctx {keys}")
    if step.dropped:
        parts.append("ctx dropped " + ", ".join(_key_text(k) for k in step.dropped))
    if step.status != "pending" and step.kind != "start":
        parts.append(f"run {step.status}")
    return "; ".join(parts) or "nothing changed"


def _key_text(key: object) -> str:
    from ablauf_lang.ui.render import format_value

    return key if isinstance(key, str) else format_value(key, TEXT_WIDTH)
