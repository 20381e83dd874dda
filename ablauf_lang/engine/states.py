"""Display states of nodes: one word per node, skipped branches told apart (one walk)."""

from __future__ import annotations

from ablauf_lang.engine.kinds import Leaf, Node
from ablauf_lang.engine.nodes import LeafState


def state_of(node: Node) -> str:
    """One word for a node's state: unset, pending, success, failure, timeout, skipped."""
    if isinstance(node, Leaf):
        return "unset" if node.result is None else str(node.result)
    if node.done:
        return "failure" if node.failed else "success"
    if node.inflight:
        return "pending"
    return "unset"


def states(root: Node) -> dict[int, str]:
    """`state_of` for every node, with branches that never ran shown `skipped`.

    A branch is skipped when it is done without having run anything: all its leaves were
    skipped, or it is the branch not taken (a try's rescue after its body succeeded, an
    if's other branch: the kind's `taken`), empty ones included. One pass, no recursion.
    """
    out: dict[int, str] = {}
    ran: dict[int, bool] = {}  # something below ran (a leaf neither unset nor skipped)
    skipped: dict[int, bool] = {}  # every leaf below was skipped (and there is one)
    stack: list[tuple[Node, bool, bool]] = [(root, False, False)]
    while stack:
        node, not_taken, expanded = stack.pop()
        if isinstance(node, Leaf):
            out[node.id] = state_of(node)
            ran[node.id] = node.result not in (None, LeafState.SKIPPED)
            skipped[node.id] = node.result is LeafState.SKIPPED
            continue
        kids = node.children
        if not expanded:
            stack.append((node, not_taken, True))
            taken = node.taken()
            stack.extend((kid, i not in taken, False) for i, kid in enumerate(kids))
            continue
        ran[node.id] = any(ran[k.id] for k in kids)
        skipped[node.id] = bool(kids) and all(skipped[k.id] for k in kids)
        state = state_of(node)
        if state == "success" and not ran[node.id] and (not_taken or skipped[node.id]):
            state = "skipped"
        out[node.id] = state
    return out
