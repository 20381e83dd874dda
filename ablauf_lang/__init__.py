"""ablauf_lang: a small s-expression language for durable, long-running workflows.

import ablauf_lang
run = ablauf_lang.eval('(do!! (log!! "hello") (log!! "world"))')
run.status  # Status.SUCCESS
"""

from ablauf_lang.api import (
    abort_run,
    compile,
    delete_run,
    eval,
    eval_async,
    fork,
    job_at,
    list_runs,
    make_job,
    parse,
    prune_runs,
    resolve_run_id,
    restart_job,
    resume,
    resume_async,
    retry,
    retry_async,
    run_history,
    signal,
)
from ablauf_lang.codec.job import install as _install_job_codec
from ablauf_lang.engine.job import Job
from ablauf_lang.engine.nodes import Dispatch, LeafState, Result, Status, failure, success, timeout
from ablauf_lang.engine.replay import abort, prepare_replay
from ablauf_lang.errors import (
    AblaufCompileError,
    AblaufError,
    AblaufSyntaxError,
    InvariantError,
    JobError,
    RunError,
    StoreError,
)
from ablauf_lang.runners.clock import SystemClock, VirtualClock, heartbeat
from ablauf_lang.runners.local import Run
from ablauf_lang.stdlib.actions import ActionFailed
from ablauf_lang.stdlib.registry import action
from ablauf_lang.stores.backend import open_store
from ablauf_lang.stores.base import JobStore

_install_job_codec()  # Job.to_json and Job.from_json (the engine cannot import the codec)

__version__ = "0.1.0"

__all__ = [
    "AblaufCompileError",
    "AblaufError",
    "AblaufSyntaxError",
    "ActionFailed",
    "Dispatch",
    "InvariantError",
    "Job",
    "JobError",
    "JobStore",
    "LeafState",
    "Result",
    "Run",
    "RunError",
    "Status",
    "StoreError",
    "SystemClock",
    "VirtualClock",
    "__version__",
    "abort",
    "abort_run",
    "action",
    "compile",
    "delete_run",
    "eval",
    "eval_async",
    "failure",
    "fork",
    "heartbeat",
    "job_at",
    "list_runs",
    "make_job",
    "open_store",
    "parse",
    "prepare_replay",
    "prune_runs",
    "resolve_run_id",
    "restart_job",
    "resume",
    "resume_async",
    "retry",
    "retry_async",
    "run_history",
    "signal",
    "success",
    "timeout",
]
