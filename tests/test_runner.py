"""The asyncio runner behind `ablauf_lang.eval`: actions, concurrency, errors."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

import ablauf_lang
from ablauf_lang import ActionFailed, Status
from ablauf_lang.engine.job import make_job, restart_job
from ablauf_lang.engine.nodes import LeafState, success
from ablauf_lang.runners.local import LocalRunner
from tests.builders import Do, L, Par_, number


def run_tree(tree: Any, actions: dict[str, Any], context: dict[str, Any] | None = None):
    return asyncio.run(LocalRunner(actions).run(make_job(number(tree), context)))


def test_sync_and_async_actions_get_payload_and_context() -> None:
    seen: list[Any] = []

    def sync_action(payload: Any, context: Any) -> Any:
        seen.append(("sync", payload, dict(context)))
        return payload * 2

    async def async_action(payload: Any, context: Any) -> Any:
        await asyncio.sleep(0)
        seen.append(("async", payload, dict(context)))
        return payload + 1

    tree = Do(L("s", 2, augment=((), ("doubled",))), L("a", 5))
    job = run_tree(tree, {"s": sync_action, "a": async_action}, {"k": "v"})
    assert job.status is Status.SUCCESS
    assert seen == [("sync", 2, {"k": "v"}), ("async", 5, {"k": "v", "doubled": 4})]
    assert [leaf.output for leaf in job.leaves()] == [4, 6]


def test_exception_fails_the_leaf_naming_type_and_message() -> None:
    def broken(payload: Any, context: Any) -> Any:
        raise ValueError("no such host: db-7")

    job = run_tree(Do(L("b"), L("never")), {"b": broken})
    leaf = job.node(1)
    assert leaf.result is LeafState.FAILURE
    assert leaf.error == "ValueError: no such host: db-7"
    assert job.context["exec/last-error"] == "ValueError: no such host: db-7"


def test_action_failed_carries_data_as_the_error() -> None:
    def refuse(payload: Any, context: Any) -> Any:
        raise ActionFailed({"code": 409})

    job = run_tree(L("r"), {"r": refuse})
    assert job.node(0).error == {"code": 409}


def test_unregistered_action_fails_its_leaf_and_the_run_goes_on() -> None:
    job = run_tree(Par_(L("nobody/home"), L("action/log", "still runs")), {})
    assert "nobody/home" in job.node(1).error
    assert job.node(2).result is LeafState.SUCCESS
    assert job.status is Status.FAILURE


def test_user_actions_override_the_standard_library() -> None:
    job = run_tree(L("action/log", "x"), {"action/log": lambda p, c: "mine"})
    assert job.node(0).output == "mine"


def test_blocking_sync_actions_overlap_in_threads() -> None:
    barrier = threading.Barrier(3, timeout=5)

    def wait_for_the_others(payload: Any, context: Any) -> Any:
        barrier.wait()  # deadlocks unless all three run at the same time
        return threading.get_ident()

    job = run_tree(Par_(L("w"), L("w"), L("w")), {"w": wait_for_the_others})
    assert job.status is Status.SUCCESS
    assert len({leaf.output for leaf in job.leaves()}) == 3


def test_async_actions_in_dopar_run_concurrently() -> None:
    async def nap(payload: Any, context: Any) -> Any:
        await asyncio.sleep(0.2)
        return payload

    start = time.perf_counter()
    job = run_tree(Par_(*[L("nap", i) for i in range(10)]), {"nap": nap})
    assert job.status is Status.SUCCESS
    assert time.perf_counter() - start < 1.5  # 10 x 0.2 s one after the other would be 2 s


def test_results_arriving_together_are_applied_in_one_restart() -> None:
    restarts: list[int] = []

    async def quick(payload: Any, context: Any) -> Any:
        return payload

    runner = LocalRunner({"q": quick}, on_restart=lambda job, d, r: restarts.append(len(r)))
    job = asyncio.run(runner.run(make_job(number(Par_(*[L("q", i) for i in range(200)])))))
    assert job.status is Status.SUCCESS
    assert len(restarts) < 50
    assert sum(restarts) == 200


def test_eval_runs_a_program() -> None:
    run = ablauf_lang.eval(
        '(do!! (with-augment [:id :repo] (action!! :git/create {:name "svc"})) (log!! :done))',
        actions={"git/create": lambda p, c: {"id": f"repo-{p['name']}"}},
        context={"who": "me"},
    )
    assert run.status == "success"
    assert run.context == {"who": "me", "repo": "repo-svc"}
    assert isinstance(run.run_id, str)
    assert run.run_id
    assert run.to_dict()["status"] == "success"


def test_eval_runs_a_compiled_tree_or_a_job_stepped_by_hand() -> None:
    tree = ablauf_lang.compile("(do!! (log!! 1) (action!! :x/inc 2))")
    actions = {"x/inc": lambda p, c: p + 1}
    assert ablauf_lang.eval(tree, actions=actions).job.node(2).output == 3

    job = ablauf_lang.make_job(tree, context={"who": "me"})
    job, dispatches = ablauf_lang.restart_job(job, [])
    job, _ = ablauf_lang.restart_job(job, [ablauf_lang.success(dispatches[0], 10)])
    # #2 was dispatched and is in flight: prepare_replay hands it back to be performed.
    run = ablauf_lang.eval(ablauf_lang.prepare_replay(job, retry_interrupted=True), actions=actions)
    assert run.status == "success"
    assert run.context == {"who": "me"}
    assert [run.job.node(1).output, run.job.node(2).output] == [10, 3]


def test_eval_refuses_a_job_with_actions_in_flight_and_other_values() -> None:
    job, _ = ablauf_lang.restart_job(ablauf_lang.make_job("(dopar!! (log!! 1) (log!! 2))"), [])
    with pytest.raises(ablauf_lang.AblaufError, match="2 action\\(s\\) in flight"):
        ablauf_lang.eval(job)
    with pytest.raises(ablauf_lang.AblaufError, match="not int"):
        ablauf_lang.eval(42)  # type: ignore[arg-type]


def test_actions_may_be_named_with_a_colon() -> None:
    run = ablauf_lang.eval("(action!! :x/y 1)", actions={":x/y": lambda p, c: p + 1})
    assert run.job.node(0).output == 2


async def test_eval_async_on_a_running_loop() -> None:
    run = await ablauf_lang.eval_async("(dopar!! (log!! 1) (log!! 2))")
    assert run.status == "success"


async def test_eval_inside_a_running_loop_says_to_await() -> None:
    with pytest.raises(ablauf_lang.AblaufError, match="eval_async"):
        ablauf_lang.eval("(log!! 1)")


def test_restart_shares_the_untouched_tree() -> None:
    job, [d] = restart_job(make_job(number(Do(*[L("a", i) for i in range(10_000)]))))
    new, _ = restart_job(job, [success(d, 0)])
    assert new.root is not job.root
    same = sum(a is b for a, b in zip(new.root.children, job.root.children, strict=True))
    assert same == 10_000 - 2  # only the finished leaf and the next one are new


# ---------------------------------------------------------------- concurrency, threads


class Gauge:
    """Counts how many calls run at the same time, and the most there ever were."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0

    def __enter__(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.now -= 1


@pytest.mark.parametrize("limit", [1, 3, 12])
def test_concurrency_bounds_sync_and_async_actions_together(limit: int) -> None:
    gauge = Gauge()

    def blocking(payload: Any, context: Any) -> Any:
        with gauge:
            time.sleep(0.05)
        return payload

    async def waiting(payload: Any, context: Any) -> Any:
        with gauge:
            await asyncio.sleep(0.05)
        return payload

    tree = Par_(*[L("b" if i % 2 else "w", i) for i in range(12)])
    runner = LocalRunner({"b": blocking, "w": waiting}, concurrency=limit)
    job = asyncio.run(runner.run(make_job(number(tree))))
    assert job.status is Status.SUCCESS
    assert gauge.most == limit  # never more, and the slots were used


def test_the_default_is_not_the_machine_s_thread_pool_size() -> None:
    # asyncio's default executor has min(32, cpus + 4) threads: six on two cores.
    barrier = threading.Barrier(20, timeout=10)

    def meet(payload: Any, context: Any) -> Any:
        barrier.wait()  # deadlocks unless all twenty run at the same time
        return payload

    job = run_tree(Par_(*[L("m", i) for i in range(20)]), {"m": meet})
    assert job.status is Status.SUCCESS


def test_queued_time_is_not_an_action_s_duration() -> None:
    def nap(payload: Any, context: Any) -> Any:
        time.sleep(0.1)
        return payload

    runner = LocalRunner({"n": nap}, concurrency=1)
    results: list[Any] = []
    runner.on_restart = lambda job, dispatches, got: results.extend(got)
    job = asyncio.run(runner.run(make_job(number(Par_(*[L("n", i) for i in range(4)])))))
    assert job.status is Status.SUCCESS
    # All four were dispatched together; each waited for the one before it, yet each
    # result says it took about 0.1 s from its own start.
    for r in results:
        assert 0.09 <= r.finished_at - r.started_at < 0.25
    starts = sorted(r.started_at for r in results)
    assert starts[-1] - starts[0] >= 0.25  # they really ran one after the other


def test_action_threads_are_daemons_and_end_when_closed() -> None:
    from ablauf_lang.runners.local import ActionThreads

    threads = ActionThreads(2)
    futures = [threads.submit(lambda: threading.current_thread()) for _ in range(4)]
    seen = {f.result(timeout=5) for f in futures}
    assert 1 <= len(seen) <= 2
    assert all(t.daemon for t in seen)
    threads.close()
    for t in seen:
        t.join(timeout=5)
        assert not t.is_alive()


@pytest.mark.parametrize(
    "raise_it",
    [
        lambda: (_ for _ in ()).throw(SystemExit(3)),
        lambda: (_ for _ in ()).throw(SystemExit("bye")),
        lambda: (_ for _ in ()).throw(KeyboardInterrupt()),
    ],
    ids=["SystemExit(3)", "SystemExit(str)", "KeyboardInterrupt-in-a-thread"],
)
def test_an_action_that_exits_fails_its_leaf(raise_it: Any) -> None:
    def leave(payload: Any, context: Any) -> Any:
        raise_it()

    async def leave_async(payload: Any, context: Any) -> Any:
        raise SystemExit(4)

    # In a dopar!!, sync actions run in threads; the async one on the loop.
    job = run_tree(Par_(L("x"), L("y"), L("action/log", 1)), {"x": leave, "y": leave_async})
    assert job.status is Status.FAILURE
    assert job.node(1).result is LeafState.FAILURE
    assert job.node(2).error == "SystemExit: 4"
    assert job.node(3).result is LeafState.SUCCESS


def test_an_inline_action_that_calls_sys_exit_fails_its_leaf() -> None:
    def leave(payload: Any, context: Any) -> Any:
        raise SystemExit(3)

    run = ablauf_lang.eval("(do!! (action!! :x/exit 1) (log!! 2))", {"x/exit": leave})
    assert run.status is Status.FAILURE
    assert run.job.node(1).error == "SystemExit: 3"


def test_eval_takes_a_concurrency() -> None:
    gauge = Gauge()

    def blocking(payload: Any, context: Any) -> Any:
        with gauge:
            time.sleep(0.03)
        return payload

    source = "(dopar!! " + " ".join(f"(action!! :b {i})" for i in range(6)) + ")"
    run = ablauf_lang.eval(source, {"b": blocking}, concurrency=2)
    assert run.status is Status.SUCCESS
    assert gauge.most == 2
    with pytest.raises(ablauf_lang.AblaufError, match="at least 1"):
        ablauf_lang.eval(source, {"b": blocking}, concurrency=0)


def test_run_to_dict_lists_failed_steps() -> None:
    run = ablauf_lang.eval('(try!! (fail!! "disk") (rescue!! (log!! "r")))')
    assert run.status is Status.SUCCESS
    assert run.to_dict()["failed"] == [
        {"id": 2, "action": "action/fail", "state": "failure", "error": "disk"}
    ]
    assert "failed" not in ablauf_lang.eval("(log!! 1)").to_dict()
