"""Topic names and where a run's messages go. Pure: no client library here.

    restarter_topic("ablauf")              ablauf.restarter
    action_topic("ablauf", "git/push")     ablauf.action.git.push
    dead_letter_topic("ablauf")            ablauf.dead-letters
    partition_of(run_id, partitions)       crc32 of the run id, modulo the partitions

One topic per action: a worker subscribes to exactly the actions it has (`--only`), an
action's backlog and consumer lag are visible per action in any Kafka tool, and a slow
action never holds up a fast one. An action name becomes a topic name with `/` as `.`;
any other character Kafka does not allow in a name (and `.` itself, which would make
`a.b/c` and `a/b.c` the same topic) is replaced with `_` and the name gets the crc32 of
the action as a suffix, so two actions never share a topic.

Every producer chooses the partition of a restarter message itself, from the run id, so
all of a run's messages are on one partition (in order, handled by one restarter at a
time) and a restarter can tell which runs are its own (for their timers).
"""

from __future__ import annotations

import re
import zlib

from ablauf_lang.errors import AblaufError

DEFAULT_PREFIX = "ablauf"
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,150}")
_PLAIN = re.compile(r"[A-Za-z0-9_-]+")


def check_prefix(prefix: str) -> str:
    """The prefix, or AblaufError saying what a prefix may be."""
    if not _PREFIX.fullmatch(prefix):
        raise AblaufError(
            f"bad Kafka topic prefix {prefix!r}: letters, digits, '.', '_' and '-' "
            "(at most 150, starting with a letter or digit)"
        )
    return prefix


def restarter_topic(prefix: str) -> str:
    """The topic of new runs, results and wake-ups (keyed by run id)."""
    return f"{prefix}.restarter"


def dead_letter_topic(prefix: str) -> str:
    """Where malformed messages are set aside (with the error and where they came from)."""
    return f"{prefix}.dead-letters"


def action_topic(prefix: str, action: str) -> str:
    """The topic of one action's dispatches."""
    ns, _, name = action.rpartition("/")
    parts = [p for p in (ns, name) if p]
    plain = all(_PLAIN.fullmatch(p) for p in parts) and len(parts) >= 1
    if plain:
        topic = f"{prefix}.action." + ".".join(parts)
    else:
        safe = ".".join(re.sub(r"[^A-Za-z0-9_-]", "_", p) or "_" for p in parts or ["_"])
        topic = f"{prefix}.action.{safe}-{zlib.crc32(action.encode()):08x}"
    if len(topic) > 249:  # Kafka's limit
        topic = f"{topic[:230]}-{zlib.crc32(action.encode()):08x}"
    return topic


def partition_of(run_id: str, partitions: int) -> int:
    """The restarter partition of a run: the same in every process."""
    return zlib.crc32(run_id.encode()) % max(1, partitions)
