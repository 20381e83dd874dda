"""Pictures of programs and runs: the job tree as SVG, in pure Python (no system binary).

    program_svg   :: Node -> str                  the tree before it runs
    run_svg       :: Job -> str                   the tree with each node's state
    run_states    :: Job -> {id: state}           display states, waits told apart
    graph_layout  :: Node, states -> Layout       boxes, edges and folds (the web page's too)
    layout_svg    :: Layout -> str                a layout drawn
    write_picture :: str, path -> None            .svg as it is, .png through cairosvg

`do!!` children are drawn top to bottom in order, indented under their parent; `dopar!!`
children and the fixed children of `try!!` (body, rescue, finally), `if!!` and `timeout!!`
side by side in a row under it, each labelled by its role. In a run, edges into nodes
that ran are drawn strong and branches never entered are faded. A branch with more than
`fold` children shows its first few and one box counting the rest by state. Everything a
program or an action produced is escaped. The layout is three passes over the nodes
shown, without recursion.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from ablauf_lang.engine.job import Job
from ablauf_lang.engine.kinds import Leaf, Node, label_of, roles_of
from ablauf_lang.engine.states import states as states_of
from ablauf_lang.engine.waits import waits as waits_of
from ablauf_lang.errors import AblaufError
from ablauf_lang.ui.render import format_value, wait_form

__all__ = [
    "FOLD",
    "PICTURE_FORMATS",
    "STATE_COLOURS",
    "Box",
    "Edge",
    "Fold",
    "Layout",
    "graph_layout",
    "layout_svg",
    "picture_format",
    "program_svg",
    "run_states",
    "run_svg",
    "write_picture",
]

# Fill colours of node states (the stroke is a darker shade of the same colour).
STATE_COLOURS: dict[str, str] = {
    "unset": "#eef1f5",
    "pending": "#ffe08a",
    "success": "#b7e4c7",
    "failure": "#f4a6a6",
    "timeout": "#dcb8f2",
    "skipped": "#f6f6f6",
    "waiting": "#a9d6f5",
}
_STROKES: dict[str, str] = {
    "unset": "#8c959f",
    "pending": "#b58900",
    "success": "#2d8a4e",
    "failure": "#c62828",
    "timeout": "#7b3fa0",
    "skipped": "#b8bec6",
    "waiting": "#1f6fb2",
}
# States in which a node ran (or runs): the path taken.
_RAN = frozenset({"pending", "success", "failure", "timeout", "waiting"})

FOLD = 50  # a branch with more children than this is folded
FOLD_HEAD = 5  # the children a folded branch still shows
PICTURE_FORMATS = ("svg", "png")

# Geometry, in pixels: a 12px monospace font is about 7.3px a character.
CHAR_W = 7.3
NODE_H = 38
PAD_X = 8
MIN_W = 64
GAP_X = 16
GAP_Y = 12
INDENT = 26
MARGIN = 16
TEXT_MAX = 44  # characters of a box's second line
DETAIL_MAX = 400  # characters of each value in a box's tooltip

# Kinds whose children are drawn side by side (the others: top to bottom, in order).
SIDE_BY_SIDE = frozenset({"par", "pmap", "try", "if", "deadline"})


# ---------------------------------------------------------------- layout


@dataclass(frozen=True, slots=True)
class Box:
    """One node drawn: where, its state and its two lines of text.

    `id` is None for a node of a template (the body a `doseq!!`/`pmap!!` copies per
    element: its nodes get their ids when it is expanded)."""

    id: int | None
    kind: str
    state: str
    x: float
    y: float
    w: float
    h: float
    head: str  # the kind's label (or the child's role) and the id
    text: str  # a leaf's action and payload; a branch's test, collection or size
    detail: str  # every line a tooltip shows
    template: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "x": self.x,
            "y": self.y,
            "w": self.w,
            "h": self.h,
            "head": self.head,
            "text": self.text,
            "detail": self.detail,
            "template": self.template,
        }


@dataclass(frozen=True, slots=True)
class Edge:
    """A line from a parent to a child (or to a fold): `taken` (the child ran), `faded`
    (it never did) or `plain` (a program before it runs)."""

    parent: int | None
    child: int | None
    points: tuple[tuple[float, float], ...]
    style: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "parent": self.parent,
            "child": self.child,
            "points": [list(p) for p in self.points],
            "style": self.style,
        }


@dataclass(frozen=True, slots=True)
class Fold:
    """The children of a wide branch that are not drawn: how many, and how many are in
    each state (in the order of `STATE_COLOURS`)."""

    parent: int
    x: float
    y: float
    w: float
    h: float
    hidden: int
    counts: dict[str, int]
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "parent": self.parent,
            "x": self.x,
            "y": self.y,
            "w": self.w,
            "h": self.h,
            "hidden": self.hidden,
            "counts": dict(self.counts),
            "text": self.text,
        }


@dataclass(frozen=True, slots=True)
class Layout:
    """Boxes, edges and folds of one tree, and the size of the picture (before margins)."""

    width: float
    height: float
    boxes: list[Box] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    folds: list[Fold] = field(default_factory=list)
    with_states: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-able data (for the web page)."""
        return {
            "width": self.width,
            "height": self.height,
            "with_states": self.with_states,
            "boxes": [b.to_dict() for b in self.boxes],
            "edges": [e.to_dict() for e in self.edges],
            "folds": [f.to_dict() for f in self.folds],
        }


# An item of the layout's first pass: a node, a template node, or a fold.
_NODE, _TEMPLATE, _FOLD = 0, 1, 2


class _Item:
    __slots__ = (
        "box_w",
        "box_x",
        "detail",
        "fold",
        "h",
        "head",
        "kids",
        "kind",
        "node",
        "parent",
        "side",
        "state",
        "text",
        "w",
        "what",
        "x",
        "y",
    )

    def __init__(self, what: int, parent: int) -> None:
        self.what = what
        self.parent = parent
        self.node: Any = None
        self.kind = ""
        self.state = "unset"
        self.head = ""
        self.text = ""
        self.detail = ""
        self.fold: tuple[int, dict[str, int]] | None = None
        self.kids: list[int] = []
        self.side = False
        self.box_w = 0.0
        self.w = 0.0
        self.h = 0.0
        self.x = 0.0
        self.y = 0.0
        self.box_x = 0.0


def graph_layout(
    root: Node,
    states: Mapping[int, str] | None = None,
    fold: int = FOLD,
    *,
    unfold: Collection[int] = (),
    templates: bool = True,
) -> Layout:
    """Lay a tree out: one box per node shown, edges from parents to children.

    `states`: each node's display state (`run_states`); None for a program before it runs
    (every node unset, edges plain). `fold`: a branch with more children than this shows
    its first few and one `Fold` for the rest (0: never fold); `unfold`: ids of branches
    shown whole anyway. `templates`: draw the body of a `doseq!!`/`pmap!!` not yet
    expanded (dashed, without ids).
    """
    items: list[_Item] = []
    # pre-order: node, parent item, role, in a template
    stack: list[tuple[Any, int, str | None, bool]] = [(root, -1, None, False)]
    while stack:
        node, parent, role, in_template = stack.pop()
        if node is None:  # the fold of a wide branch, after the children it shows
            _add_fold(items, parent)
            continue
        item = _Item(_TEMPLATE if in_template else _NODE, parent)
        index = len(items)
        items.append(item)
        if parent >= 0:
            items[parent].kids.append(index)
        item.node = node
        item.kind = str(node.kind)
        if states is not None and not in_template:
            item.state = states.get(node.id, "unset")
        _describe(item, node, role, in_template, states is not None)
        kids = list(getattr(node, "children", ()))
        item.side = item.kind in SIDE_BY_SIDE
        roles: tuple[str | None, ...] = roles_of(item.kind)
        if len(roles) != len(kids):
            roles = (None,) * len(kids)
        entries = [(kid, index, r, in_template) for kid, r in zip(kids, roles, strict=True)]
        if fold and len(kids) > fold and (in_template or node.id not in unfold):
            head = min(fold, FOLD_HEAD)
            entries = entries[:head]
            counts: dict[str, int] = {}
            if states is not None and not in_template:
                for kid in kids[head:]:
                    word = states.get(kid.id, "unset")
                    counts[word] = counts.get(word, 0) + 1
            # the fold comes after the children shown: pushed first, popped last
            stack.append((None, index, None, in_template))
            item.fold = (len(kids) - head, counts)
        template = getattr(node, "template", None)
        unexpanded = not getattr(node, "expanded", False) and getattr(node, "error", None) is None
        if templates and template is not None and not kids and unexpanded:
            entries.append((template, index, "each", True))
        stack.extend(reversed(entries))
    _sizes(items)
    return _place(items, states is not None)


def _add_fold(items: list[_Item], owner: int) -> None:
    fold = items[owner].fold
    assert fold is not None
    hidden, counts = fold
    item = _Item(_FOLD, owner)
    item.kind = "fold"
    ordered = {s: counts[s] for s in STATE_COLOURS if s in counts}
    ordered.update({s: n for s, n in counts.items() if s not in ordered})
    item.fold = (hidden, ordered)
    parts = ", ".join(f"{n:,} {s}" for s, n in ordered.items())
    item.text = f"{hidden:,} more" + (f": {parts}" if parts else "")
    item.box_w = max(MIN_W, CHAR_W * len(item.text) + 2 * PAD_X)
    items[owner].kids.append(len(items))
    items.append(item)


def _describe(item: _Item, node: Any, role: str | None, in_template: bool, run: bool) -> None:
    """The two lines of a node's box and its tooltip."""
    label = label_of(item.kind)
    name = f"#{node.id}" if not in_template else "(each)"
    if isinstance(node, Leaf):
        form = wait_form(node, TEXT_MAX)
        if form is not None:
            label, text = form[0], form[1].strip()
        else:
            text = node.action
            # in a run, the payload sent (one computed when reached) rather than as written
            payload = node.sent if run and node.sent is not None else node.payload
            if payload is not None:
                room = max(8, TEXT_MAX - len(text) - 1)
                text += " " + format_value(payload, room)
    else:
        text = ""
        if hasattr(node, "test"):
            text = "test " + format_value(node.test, TEXT_MAX - 5)
        elif hasattr(node, "var") and hasattr(node, "coll"):
            text = f"[{node.var} {format_value(node.coll, TEXT_MAX)}]"
        elif role is not None:
            text = label
        else:
            count = len(getattr(node, "children", ()))
            text = f"{count:,} child" + ("" if count == 1 else "ren")
    head = f"{role or label} {name}"
    if run and not in_template:
        head += f" · {item.state}"
    item.head = _cut(head, TEXT_MAX)
    item.text = _cut(text, TEXT_MAX)
    item.detail = _detail(node, role, item.state if run and not in_template else None)
    width = CHAR_W * max(len(item.head), len(item.text)) + 2 * PAD_X
    item.box_w = max(MIN_W, width)


def _detail(node: Any, role: str | None, state: str | None) -> str:
    lines = [f"{'#' + str(node.id) + ' ' if state is not None else ''}{label_of(node.kind)}"]
    if role is not None:
        lines[0] += f" ({role})"
    if state is not None:
        lines.append(f"state: {state}")
    if isinstance(node, Leaf):
        lines.append(f"action: {node.action}")
        if node.payload is not None:
            lines.append("payload: " + format_value(node.payload, DETAIL_MAX))
        if state is not None:
            if node.sent is not None:
                lines.append("sent: " + format_value(node.sent, DETAIL_MAX))
            if node.attempt > 1:
                lines.append(f"attempt: {node.attempt}")
            if node.output is not None:
                lines.append("output: " + format_value(node.output, DETAIL_MAX))
            if node.error is not None:
                lines.append("error: " + format_value(node.error, DETAIL_MAX))
    elif state is not None and getattr(node, "error", None) is not None:
        lines.append("error: " + format_value(node.error, DETAIL_MAX))
    return "\n".join(lines)


def _cut(text: str, limit: int) -> str:
    text = " ".join(text.split())  # one line
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _sizes(items: list[_Item]) -> None:
    """Each item's extent, children first (the items are in pre-order)."""
    for item in reversed(items):
        if not item.kids:
            item.w, item.h = item.box_w, NODE_H
            continue
        kids = [items[k] for k in item.kids]
        if item.side:
            row = sum(k.w for k in kids) + GAP_X * (len(kids) - 1)
            item.w = max(item.box_w, row)
            item.h = NODE_H + 2 * GAP_Y + max(k.h for k in kids)
        else:
            item.w = max(item.box_w, INDENT + max(k.w for k in kids))
            item.h = NODE_H + sum(GAP_Y + k.h for k in kids)


def _place(items: list[_Item], run: bool) -> Layout:
    """Positions from the top, edges, and the boxes and folds to draw."""
    boxes: list[Box] = []
    folds: list[Fold] = []
    edges: list[Edge] = []
    if not items:
        return Layout(0, 0, with_states=run)
    for index, item in enumerate(items):
        if index == 0:
            item.x = item.y = 0.0
        item.box_x = item.x
        parent = items[item.parent] if item.parent >= 0 else None
        if parent is not None:
            edges.append(_edge(parent, item, run))
        if item.kids:
            kids = [items[k] for k in item.kids]
            if item.side:
                x = item.x
                y = item.y + NODE_H + 2 * GAP_Y
                for kid in kids:
                    kid.x, kid.y = x, y
                    x += kid.w + GAP_X
            else:
                y = item.y + NODE_H + GAP_Y
                for kid in kids:
                    kid.x, kid.y = item.x + INDENT, y
                    y += kid.h + GAP_Y
        if item.what == _FOLD:
            assert item.fold is not None
            assert parent is not None
            folds.append(
                Fold(
                    parent.node.id,
                    item.box_x,
                    item.y,
                    item.box_w,
                    NODE_H,
                    item.fold[0],
                    item.fold[1],
                    item.text,
                )
            )
            continue
        node = item.node
        boxes.append(
            Box(
                None if item.what == _TEMPLATE else node.id,
                item.kind,
                item.state,
                item.box_x,
                item.y,
                item.box_w,
                NODE_H,
                item.head,
                item.text,
                item.detail,
                item.what == _TEMPLATE,
            )
        )
    edges.sort(key=lambda e: _EDGE_ORDER[e.style])  # strong edges drawn last, on top
    root = items[0]
    return Layout(root.w, root.h, boxes, edges, folds, run)


_EDGE_ORDER = {"faded": 0, "plain": 1, "taken": 2}


def _edge(parent: _Item, child: _Item, run: bool) -> Edge:
    if not run:
        style = "plain"
    elif child.what == _FOLD:
        counts = child.fold[1] if child.fold is not None else {}
        style = "taken" if any(s in _RAN for s in counts) else "faded"
    elif child.what == _TEMPLATE:
        style = "faded"
    else:
        style = "taken" if child.state in _RAN else "faded"
    top = parent.y + NODE_H
    if parent.side:
        px = parent.box_x + INDENT / 2
        cx = child.box_x + min(child.box_w / 2, INDENT)
        bus = top + GAP_Y
        points: tuple[tuple[float, float], ...] = ((px, top), (px, bus), (cx, bus), (cx, child.y))
    else:
        sx = parent.box_x + INDENT / 2
        mid = child.y + NODE_H / 2
        points = ((sx, top), (sx, mid), (child.box_x, mid))
    parent_id = parent.node.id if parent.what == _NODE else None
    child_id = child.node.id if child.what == _NODE else None
    return Edge(parent_id, child_id, points, style)


# ---------------------------------------------------------------- states


def run_states(job: Job) -> dict[int, str]:
    """Each node's display state (`engine.states.states`), a leaf that waits for a time
    or a signal (`engine.waits`) shown `waiting`."""
    shown = states_of(job.root)
    if not job.done:
        for wait in waits_of(job):
            shown[wait.node] = "waiting"
    return shown


# ---------------------------------------------------------------- SVG

_STYLE = (
    ".node text,.fold text,.legend text{fill:#1f2328}"
    ".node .head{font-weight:bold}"
    ".node .text,.fold text{fill:#3d444d}"
    ".edge{fill:none;stroke:#8c959f;stroke-width:1.2}"
    ".edge.taken{stroke:#1f2328;stroke-width:2.4}"
    ".edge.faded{stroke:#c9d1d9;stroke-dasharray:4 3}"
    ".run .state-unset,.run .state-skipped,.template{opacity:.6}"
    ".title{font-weight:bold;font-size:14px}"
)

# Characters XML 1.0 cannot hold (control characters, lone surrogates): shown as U+FFFD.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_CLASS = re.compile("[^A-Za-z0-9_-]")


def _x(text: str) -> str:
    """Text escaped for an element or a double-quoted attribute."""
    text = _NOT_XML.sub("\ufffd", text)
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


def _n(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")


def layout_svg(layout: Layout, *, title: str | None = None) -> str:
    """Draw a layout as an SVG document (a string, no XML declaration: it may be written
    to a file as UTF-8 or put in a web page as it is)."""
    top = MARGIN
    head: list[str] = []
    width = 0.0
    if title is not None:
        title = _cut(title, 200)
        head.append(f'<text class="title" x="{MARGIN}" y="{_n(top + 14)}">{_x(title)}</text>')
        top += 26
        width = CHAR_W * 14 / 12 * len(title)  # the title's font is 14px
    if layout.with_states:
        legend, legend_width = _legend(layout, top)
        head.append(legend)
        top += 24
        width = max(width, legend_width)
    width = max(width, layout.width) + 2 * MARGIN
    height = top + layout.height + MARGIN
    mode = "run" if layout.with_states else "program"
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="ablauf-graph {mode}" '
        f'width="{_n(width)}" height="{_n(height)}" viewBox="0 0 {_n(width)} {_n(height)}" '
        'font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" font-size="12">',
        f"<title>{_x(title or 'ablauf graph')}</title>",
        f"<style>{_STYLE}</style>",
        f'<rect class="background" width="{_n(width)}" height="{_n(height)}" fill="#ffffff"/>',
        *head,
        f'<g transform="translate({MARGIN},{_n(top)})">',
        '<g class="edges">',
    ]
    for edge in layout.edges:
        path = "M" + " L".join(f"{_n(x)},{_n(y)}" for x, y in edge.points)
        out.append(f'<path class="edge {edge.style}" d="{path}"/>')
    out.append("</g>")
    for box in layout.boxes:
        out.append(_box(box))
    for fold in layout.folds:
        out.append(_fold(fold))
    out.append("</g></svg>")
    return "\n".join(out) + "\n"


def _box(box: Box) -> str:
    kind = _CLASS.sub("_", box.kind)
    state = box.state if box.state in STATE_COLOURS else "unset"
    if box.template:
        opening = f'<g class="template kind-{kind}">'
        fill, stroke, dash = "#ffffff", _STROKES["unset"], ' stroke-dasharray="3 3"'
    else:
        opening = (
            f'<g class="node state-{_CLASS.sub("_", box.state)} kind-{kind}" '
            f'id="n{box.id}" data-node="{box.id}">'
        )
        fill, stroke, dash = STATE_COLOURS[state], _STROKES[state], ""
    x, y = box.x, box.y
    return (
        f"{opening}<title>{_x(box.detail)}</title>"
        f'<rect x="{_n(x)}" y="{_n(y)}" width="{_n(box.w)}" height="{_n(box.h)}" rx="5" '
        f'fill="{fill}" stroke="{stroke}" stroke-width="1.3"{dash}/>'
        f'<text class="head" x="{_n(x + PAD_X)}" y="{_n(y + 15)}">{_x(box.head)}</text>'
        f'<text class="text" x="{_n(x + PAD_X)}" y="{_n(y + 30)}">{_x(box.text)}</text></g>'
    )


def _fold(fold: Fold) -> str:
    x, y = fold.x, fold.y
    parts = [
        f'<g class="fold" data-parent="{fold.parent}">',
        f"<title>{_x(fold.text)}</title>",
        f'<rect x="{_n(x)}" y="{_n(y)}" width="{_n(fold.w)}" height="{_n(fold.h)}" rx="5" '
        f'fill="#ffffff" stroke="{_STROKES["unset"]}" stroke-dasharray="5 3"/>',
        f'<text x="{_n(x + PAD_X)}" y="{_n(y + 15)}">{_x(fold.text)}</text>',
    ]
    total = sum(fold.counts.values())
    if total:  # a bar of the hidden children's states
        left, bar = x + PAD_X, fold.w - 2 * PAD_X
        for state, count in fold.counts.items():
            part = bar * count / total
            colour = STATE_COLOURS.get(state, STATE_COLOURS["unset"])
            parts.append(
                f'<rect class="bar state-{_CLASS.sub("_", state)}" x="{_n(left)}" '
                f'y="{_n(y + 24)}" width="{part:.2f}" height="7" fill="{colour}" '
                f'stroke="{_STROKES.get(state, _STROKES["unset"])}" stroke-width="0.5"/>'
            )
            left += part
    parts.append("</g>")
    return "".join(parts)


def _legend(layout: Layout, top: float) -> tuple[str, float]:
    """One row: a swatch and a count for each state among the nodes drawn and folded."""
    counts: dict[str, int] = {}
    for box in layout.boxes:
        if not box.template:
            counts[box.state] = counts.get(box.state, 0) + 1
    for fold in layout.folds:
        for state, n in fold.counts.items():
            counts[state] = counts.get(state, 0) + n
    parts = ['<g class="legend">']
    x = float(MARGIN)
    for state in STATE_COLOURS:
        if state not in counts:
            continue
        label = f"{state} {counts[state]:,}"
        parts.append(
            f'<rect x="{_n(x)}" y="{_n(top + 2)}" width="12" height="12" rx="2" '
            f'fill="{STATE_COLOURS[state]}" stroke="{_STROKES[state]}"/>'
            f'<text x="{_n(x + 17)}" y="{_n(top + 12)}">{_x(label)}</text>'
        )
        x += 17 + CHAR_W * len(label) + 14
    parts.append("</g>")
    return "".join(parts), x - MARGIN


def program_svg(root: Node, *, title: str | None = None, fold: int = FOLD) -> str:
    """A compiled program's tree before it runs (`ablauf check --graph`)."""
    return layout_svg(graph_layout(root, None, fold), title=title)


def run_svg(
    job: Job, *, title: str | None = None, fold: int = FOLD, unfold: Collection[int] = ()
) -> str:
    """A job's tree with each node's state (`ablauf runs graph`, the REPL's `:graph`).

    `title` None: the job's status and restarts (and its abort reason)."""
    if title is None:
        title = f"job {job.status} · restarts {job.restarts}"
        if job.aborted is not None:
            title += f" · aborted: {job.aborted}"
    layout = graph_layout(job.root, run_states(job), fold, unfold=unfold)
    return layout_svg(layout, title=title)


# ---------------------------------------------------------------- files


def picture_format(path: str) -> str:
    """The format of a picture file, "svg" or "png", from its name; AblaufError for any
    other name, and for a PNG when cairosvg is not installed."""
    suffix = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    if suffix not in PICTURE_FORMATS:
        raise AblaufError(f"{path}: a picture is FILE.svg or FILE.png")
    if suffix == "png" and _cairosvg() is None:
        raise AblaufError(f"{path}: PNG needs cairosvg (pip install cairosvg); .svg works as is")
    return suffix


def _cairosvg() -> Any:
    try:
        import cairosvg  # type: ignore[import-not-found, unused-ignore]
    except (ImportError, OSError):  # not installed, or its cairo library is missing
        return None
    return cairosvg


def write_picture(svg: str, path: str) -> None:
    """Write an SVG document to `path`: as it is for .svg, converted for .png (cairosvg).

    AblaufError for a name that is neither, a PNG without cairosvg, or a file that cannot
    be written."""
    kind = picture_format(path)
    try:
        if kind == "svg":
            with open(path, "w", encoding="utf-8") as f:
                f.write(svg)
        else:
            _cairosvg().svg2png(bytestring=svg.encode("utf-8"), write_to=path)
    except OSError as exc:
        raise AblaufError(f"{path}: cannot write ({exc.strerror or exc})") from None
