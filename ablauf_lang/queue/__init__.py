"""The PostgreSQL task queue the workers share: named queries only, no engine calls.

- `queries.sql`: every statement of the queue, by name (loaded once into `tasks.Q`);
- `tasks`: rows on a connection the caller holds: enqueue (with a due time), take, leases
  (renew, release, recover), awaits put back to sleep, set aside, the workers table,
  LISTEN/NOTIFY and the next due time;
- `steps`: the workers' transactions: `claim`, `run_restart`, `deliver`, `queue_result`
  (a step's engine call comes in as a callable, `Advance`; the actions a worker performs
  within a step, as one too, `Local`);
- `runs`: `submit`, `requeue`, `repair_stranded` (the replay comes in as a callable),
  `wake_awaits` (a signal arrived), `notes`, `queue_counts`.

The worker (`runners/worker.py`) decides when; this package runs the statements.
"""

from ablauf_lang.queue.runs import (
    notes,
    queue_counts,
    repair_stranded,
    requeue,
    submit,
    wake_awaits,
)
from ablauf_lang.queue.steps import (
    Advance,
    Claimed,
    Delivery,
    Local,
    Step,
    claim,
    deliver,
    queue_result,
    run_restart,
)
from ablauf_lang.queue.tasks import (
    DUE,
    Task,
    enqueue_restart,
    listen,
    live_workers,
    next_due,
    park_await,
    process_name,
    recover_leases,
    register_worker,
    release_leases,
    renew_leases,
    set_aside,
    take_task,
    unregister_worker,
)

__all__ = [
    "DUE",
    "Advance",
    "Claimed",
    "Delivery",
    "Local",
    "Step",
    "Task",
    "claim",
    "deliver",
    "enqueue_restart",
    "listen",
    "live_workers",
    "next_due",
    "notes",
    "park_await",
    "process_name",
    "queue_counts",
    "queue_result",
    "recover_leases",
    "register_worker",
    "release_leases",
    "renew_leases",
    "repair_stranded",
    "requeue",
    "run_restart",
    "set_aside",
    "submit",
    "take_task",
    "unregister_worker",
    "wake_awaits",
]
