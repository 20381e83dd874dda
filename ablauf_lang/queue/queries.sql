-- The task queue the workers share (`ablauf_lang.queue`): every statement it runs, by name.
-- Tables: `stores/postgres/migrations/*.sql` (schema `ablauf`). `tasks` holds 'restart'
-- tasks (a result to apply, or none) and 'action' tasks (a dispatch to perform, leased to
-- a worker while performed). NOTIFY channel `ablauf_tasks`: tasks are ready to be taken
-- (the payload: how many; "1 RUN_ID" for a restart task queued for that run alone).

-- name: listen
LISTEN ablauf_tasks;

-- name: notify
-- Wake this many idle workers (the payload is a count; LISTEN wakes all anyway).
SELECT pg_notify('ablauf_tasks', %s);

-- name: clock
SELECT clock_timestamp();

-- name: claim
-- Take the oldest ready tasks: restarts, and actions among those given (all when NULL);
-- lease the actions (one statement, autocommit). Ready: no due time (index tasks_ready),
-- or a due time that has come (index tasks_due); a task due later is never looked at.
-- Params: actions, actions, limit, actions, actions, limit, limit, owner, lease seconds.
WITH r AS (SELECT task_id FROM ablauf.tasks
           WHERE lease_owner IS NULL AND error IS NULL AND not_before IS NULL
           AND (kind = 'restart' OR %s::text[] IS NULL OR action = ANY(%s::text[]))
           ORDER BY task_id LIMIT %s FOR UPDATE SKIP LOCKED),
     d AS (SELECT task_id FROM ablauf.tasks
           WHERE lease_owner IS NULL AND error IS NULL AND not_before <= now()
           AND (kind = 'restart' OR %s::text[] IS NULL OR action = ANY(%s::text[]))
           ORDER BY not_before LIMIT %s FOR UPDATE SKIP LOCKED),
     t AS (SELECT task_id, run_id, kind FROM ablauf.tasks
           WHERE task_id IN (SELECT task_id FROM r UNION ALL SELECT task_id FROM d)
           ORDER BY task_id LIMIT %s),
     a AS (UPDATE ablauf.tasks k SET lease_owner = %s,
           lease_until = now() + %s * interval '1 second', tries = k.tries + 1 FROM t
           WHERE k.task_id = t.task_id AND t.kind = 'action'
           RETURNING k.task_id, k.node, k.attempt, k.action, k.idempotent, k.payload, k.context,
                     k.woken, k.timeout, k.heartbeat)
SELECT t.task_id, t.run_id, t.kind, a.node, a.attempt, a.action, a.idempotent,
       a.payload, a.context, a.woken, a.timeout, a.heartbeat
FROM t LEFT JOIN a ON a.task_id = t.task_id;

-- name: next_due
-- Seconds until the next task that is due later falls due (none: NULL), among the actions
-- given (all when NULL); an await with no deadline ('infinity') never falls due. One
-- index probe (tasks_due). Params: actions, actions.
SELECT extract(epoch FROM min(not_before) - now())::float8 FROM ablauf.tasks
WHERE lease_owner IS NULL AND error IS NULL AND not_before > now()
AND not_before < 'infinity' AND (%s::text[] IS NULL OR action = ANY(%s::text[]));

-- name: take_task
-- Lock the oldest ready task no one holds (no due time, or one that has come), or none.
SELECT task_id, run_id, kind FROM ablauf.tasks
WHERE lease_owner IS NULL AND error IS NULL AND (not_before IS NULL OR not_before <= now())
ORDER BY task_id LIMIT 1 FOR UPDATE SKIP LOCKED;

-- name: run_state
-- Under the run's lock, in a statement of its own (so that it sees what the holder of the
-- lock it waited for wrote): the run's newest write, the clock, and the results queued for
-- it that no one else holds, taken out of the queue: the oldest 10,000 (the others stay
-- queued for the next step; by an array of ids, so that no plan the server keeps for the
-- statement, made while the queue was small, can join 100,000 queued results against
-- the queue in a loop: a wide run on 4 workers hung so). Sent with the lock (`lock_run`),
-- which it runs after. Params: run_id, run_id.
WITH b AS (DELETE FROM ablauf.tasks WHERE task_id = ANY(ARRAY(
               SELECT task_id FROM ablauf.tasks
               WHERE run_id = %s AND kind = 'restart' AND error IS NULL
               ORDER BY task_id LIMIT 10000 FOR UPDATE SKIP LOCKED))
           RETURNING task_id, result)
SELECT coalesce((SELECT max(d.seq) FROM ablauf.deltas d WHERE d.run = r.id), r.snapshot_seq),
       clock_timestamp(),
       (SELECT coalesce(json_agg(json_build_array(b.task_id, b.result) ORDER BY b.task_id),
                        '[]')::text FROM b)
FROM ablauf.runs r WHERE r.run_id = %s;

-- fragment: deliver_tail
-- How both deliveries end (after their CTEs t: the tasks removed, r: the run's row if its
-- lock was had, n: the NOTIFYs sent): take the results queued for the run (when its lock
-- was had) and return the row described under `deliver`. Param: run_id.
b AS (DELETE FROM ablauf.tasks WHERE task_id = ANY(ARRAY(
               SELECT task_id FROM ablauf.tasks
               WHERE run_id = %s AND EXISTS (SELECT 1 FROM r)
               AND kind = 'restart' AND error IS NULL
               ORDER BY task_id LIMIT 10000 FOR UPDATE SKIP LOCKED))
           RETURNING task_id, result)
SELECT (SELECT array_agg(task_id) FROM t), (SELECT id FROM r),
       coalesce((SELECT max(d.seq) FROM ablauf.deltas d WHERE d.run = (SELECT id FROM r)),
                (SELECT snapshot_seq FROM r)),
       clock_timestamp(),
       (SELECT coalesce(json_agg(json_build_array(b.task_id, b.result) ORDER BY b.task_id),
                        '[]')::text FROM b),
       (SELECT count(*) FROM n);

-- name: deliver
-- Deliver results of one run, in one statement: remove their action tasks (those still
-- leased to this worker), try the run's row lock without waiting; when another transaction
-- holds it, queue the results as restart tasks (and wake a worker); when this one got it,
-- take the results queued for the run and read its newest write. Row: the task ids removed
-- (NULL: every lease was lost), the run's key (NULL: the results were queued), its newest
-- write, the clock, the queued results, NOTIFYs sent.
-- (The lock is taken without waiting, so the statement's snapshot is as new as the lock;
-- were it not, the write of the step would conflict and be refused, not lost.)
-- `s` sleeps only under injected faults (0 seconds otherwise): between taking the
-- snapshot and trying the lock, as a busy server does now and then.
-- Params: sleep, task ids, owner, run_id, run_id, results (a JSON array of [task id,
-- result] rows), run_id.
WITH s AS (SELECT pg_sleep(%s)),
     t AS (DELETE FROM ablauf.tasks WHERE EXISTS (SELECT 1 FROM s)
           AND task_id = ANY(%s) AND lease_owner = %s RETURNING task_id),
     r AS (SELECT id, snapshot_seq FROM ablauf.runs WHERE run_id = %s
           AND EXISTS (SELECT 1 FROM t) FOR NO KEY UPDATE SKIP LOCKED),
     q AS (INSERT INTO ablauf.tasks (run_id, kind, result) SELECT %s, 'restart', u->>1
           FROM json_array_elements(%s::json) AS u
           WHERE (u->>0)::bigint IN (SELECT task_id FROM t) AND NOT EXISTS (SELECT 1 FROM r)
           RETURNING task_id),
     n AS (SELECT pg_notify('ablauf_tasks', count(*)::text) FROM q HAVING count(*) > 0),
{{deliver_tail}};

-- name: deliver_one
-- `deliver` for one result (the step of a sequence), with plain parameters: quicker.
-- Params: sleep, task id, owner, run_id, run_id, result, run_id.
WITH s AS (SELECT pg_sleep(%s)),
     t AS (DELETE FROM ablauf.tasks WHERE EXISTS (SELECT 1 FROM s)
           AND task_id = %s AND lease_owner = %s RETURNING task_id),
     r AS (SELECT id, snapshot_seq FROM ablauf.runs WHERE run_id = %s
           AND EXISTS (SELECT 1 FROM t) FOR NO KEY UPDATE SKIP LOCKED),
     q AS (INSERT INTO ablauf.tasks (run_id, kind, result) SELECT %s, 'restart', %s
           WHERE EXISTS (SELECT 1 FROM t) AND NOT EXISTS (SELECT 1 FROM r) RETURNING task_id),
     n AS (SELECT pg_notify('ablauf_tasks', '1') FROM q),
{{deliver_tail}};

-- name: deliver_now
-- An action's result delivered with the step it makes, computed from what the worker
-- knows (a run with no other step in flight: `queue.deliver`): remove the task leased to
-- this worker and lock the run's row, or fail the transaction (`ablauf.held`); queued
-- results of the run stay queued for the next restart. Params: sleep, task id, owner,
-- run_id.
WITH s AS (SELECT pg_sleep(%s)),
     t AS (DELETE FROM ablauf.tasks WHERE EXISTS (SELECT 1 FROM s)
           AND task_id = %s AND lease_owner = %s RETURNING task_id),
     r AS (SELECT id FROM ablauf.runs WHERE run_id = %s
           AND EXISTS (SELECT 1 FROM t) FOR NO KEY UPDATE SKIP LOCKED)
SELECT ablauf.held(EXISTS (SELECT 1 FROM r));

-- name: queue_result
-- Remove an action task leased to this worker and queue its result (one statement).
-- Params: task id, owner, result. Row: the run id (none: the lease was lost).
WITH t AS (DELETE FROM ablauf.tasks WHERE task_id = %s AND lease_owner = %s RETURNING run_id),
     q AS (INSERT INTO ablauf.tasks (run_id, kind, result) SELECT run_id, 'restart', %s
           FROM t RETURNING run_id),
     n AS (SELECT pg_notify('ablauf_tasks', '1') FROM q)
SELECT q.run_id, (SELECT count(*) FROM n) FROM q;

-- name: log_step
-- One row per recorded step. Params: run_id, seq, worker, results (NULL: not a restart),
-- dispatches, started (NULL: now).
INSERT INTO ablauf.restarts (run_id, seq, worker, results, dispatches, started, finished)
VALUES (%s, %s, %s, %s, %s, coalesce(%s, clock_timestamp()), clock_timestamp());

-- name: enqueue_action
-- One action task, leased to the owner when `mine`. Params: run_id, node, attempt, action,
-- idempotent, payload, context, owner or NULL, mine, lease seconds, tries, not before
-- (epoch seconds or NULL: at once), signal (an await's), timeout, heartbeat.
INSERT INTO ablauf.tasks (run_id, kind, node, attempt, action, idempotent, payload, context,
                          lease_owner, lease_until, tries, not_before, signal, timeout,
                          heartbeat)
VALUES (%s, 'action', %s, %s, %s, %s, %s, %s, %s,
        CASE WHEN %s THEN now() + %s * interval '1 second' END, %s,
        to_timestamp(%s::float8), %s, %s, %s)
RETURNING task_id, node, lease_owner IS NOT NULL;

-- name: enqueue_actions
-- Many action tasks at once. Params: run_id, owner, lease seconds, the tasks as one JSON
-- array (one row each: node, attempt, action, idempotent, payload, context, mine, not
-- before, signal, timeout, heartbeat; numbers that are not finite given as text): JSON,
-- not arrays, because psycopg builds a text array's literal a character at a time. Rows:
-- those leased (task_id, node, true), not the others (a wide step queues 100,000).
WITH i AS (
INSERT INTO ablauf.tasks (run_id, kind, node, attempt, action, idempotent, payload, context,
                          lease_owner, lease_until, tries, not_before, signal, timeout,
                          heartbeat)
SELECT %s, 'action', (u->>0)::int, (u->>1)::int, u->>2, (u->>3)::bool, u->>4, u->>5,
       CASE WHEN (u->>6)::bool THEN %s END,
       CASE WHEN (u->>6)::bool THEN now() + %s * interval '1 second' END,
       CASE WHEN (u->>6)::bool THEN 1 ELSE 0 END,
       to_timestamp((u->>7)::float8), u->>8, (u->>9)::float8, (u->>10)::float8
FROM json_array_elements(%s::json) AS u
RETURNING task_id, node, lease_owner IS NOT NULL AS mine)
SELECT task_id, node, mine FROM i WHERE mine;

-- fragment: restart_task
-- A restart task queued (result and note: the last parameters) and a NOTIFY naming its run.
q AS (INSERT INTO ablauf.tasks (run_id, kind, result, note)
      VALUES (%s, 'restart', %s, %s) RETURNING run_id)
SELECT pg_notify('ablauf_tasks', '1 ' || q.run_id) FROM q

-- name: enqueue_restart
-- A restart task (with a result to apply, or none) and a NOTIFY. Params: run_id, result,
-- note (why: shown in the `ablauf.queue` view).
WITH {{restart_task}};

-- name: hand_to_workers
-- The workers serve the run (its steps are theirs to perform): its first restart task
-- queued, in one statement. Params: run_id, run_id, NULL, note.
WITH u AS (UPDATE ablauf.runs SET on_queue = true WHERE run_id = %s),
     {{restart_task}};

-- name: renew_leases
-- Params: lease seconds, task ids, owners.
UPDATE ablauf.tasks SET lease_until = now() + %s * interval '1 second'
WHERE task_id = ANY(%s) AND lease_owner = ANY(%s);

-- name: release_leases
-- Put action tasks leased to an owner back in the queue, as if never taken: those given
-- (NULL: all of the owner's) but those kept. Params: owner, task ids or NULL, ids to keep.
UPDATE ablauf.tasks SET lease_owner = NULL, lease_until = NULL, tries = greatest(tries - 1, 0)
WHERE lease_owner = %s AND (%s::bigint[] IS NULL OR task_id = ANY(%s::bigint[]))
AND NOT (task_id = ANY(%s::bigint[]));

-- name: expired_leases
-- Action tasks whose lease expired, of one run (NULL: any). Params: run_id, run_id, limit.
SELECT task_id, run_id, node, attempt, action, idempotent, lease_owner
FROM ablauf.tasks WHERE lease_owner IS NOT NULL AND lease_until < now()
AND error IS NULL AND (%s::text IS NULL OR run_id = %s)
ORDER BY lease_until LIMIT %s FOR UPDATE SKIP LOCKED;

-- name: unlease
-- Params: task ids.
UPDATE ablauf.tasks SET lease_owner = NULL, lease_until = NULL WHERE task_id = ANY(%s);

-- name: delete_tasks
-- Params: task ids.
DELETE FROM ablauf.tasks WHERE task_id = ANY(%s);

-- name: queue_interrupted
-- Failure results of expired non-idempotent actions, as restart tasks. Params: run ids,
-- results.
INSERT INTO ablauf.tasks (run_id, kind, result, note)
SELECT u.run_id, 'restart', u.result, 'lease expired'
FROM unnest(%s::text[], %s::text[]) AS u(run_id, result);

-- name: set_aside
-- Keep a run's restart tasks that cannot be processed out of the queue, saying why.
-- Params: message, run_id.
UPDATE ablauf.tasks SET error = %s WHERE run_id = %s AND kind = 'restart' AND error IS NULL;

-- name: run_error
-- Params: message, updated (epoch seconds), run_id.
UPDATE ablauf.runs SET error = %s, updated = %s WHERE run_id = %s;

-- name: restart_logged
-- Whether a write with this token was logged (a requeue whose COMMIT answer was lost).
SELECT 1 FROM ablauf.restarts WHERE run_id = %s AND worker = %s;

-- name: stranded
-- Runs the workers serve that are not done, have no task at all, are not being restarted
-- (checked again under the lock) and were last written more than %s seconds ago.
SELECT r.run_id FROM ablauf.runs r WHERE r.status = 'pending' AND r.on_queue
AND NOT EXISTS (SELECT 1 FROM ablauf.tasks t WHERE t.run_id = r.run_id)
AND coalesce((SELECT max(d.updated) FROM ablauf.deltas d WHERE d.run = r.id), r.updated)
    < extract(epoch FROM now()) - %s
ORDER BY r.id LIMIT %s;

-- name: unserved
-- Actions of a run's ready tasks, older than %s seconds, that no live worker serves.
SELECT t.action, count(*), extract(epoch FROM now() - min(t.created))
FROM ablauf.tasks t WHERE t.run_id = %s AND t.kind = 'action'
AND t.lease_owner IS NULL AND t.error IS NULL
AND (t.not_before IS NULL OR t.not_before <= now())
AND t.created < now() - %s * interval '1 second'
AND NOT EXISTS (SELECT 1 FROM ablauf.workers w WHERE w.expires > now()
                AND t.action = ANY(w.actions))
GROUP BY t.action ORDER BY t.action;

-- name: on_queue
SELECT on_queue FROM ablauf.runs WHERE run_id = %s;

-- name: counts
-- Tasks by state: ready (due: tasks waiting for a later time are not counted), leased,
-- broken.
SELECT count(*) FILTER (WHERE lease_owner IS NULL AND error IS NULL
                        AND (not_before IS NULL OR not_before <= now())),
       count(*) FILTER (WHERE lease_owner IS NOT NULL),
       count(*) FILTER (WHERE error IS NOT NULL)
FROM ablauf.tasks;

-- name: register_worker
-- Say (again) that a worker is alive and serves these actions, for so many seconds.
-- Params: name, host, pid, actions, concurrency, lease seconds.
INSERT INTO ablauf.workers (name, host, pid, actions, concurrency, expires)
VALUES (%s, %s, %s, %s, %s, now() + %s * interval '1 second')
ON CONFLICT (name) DO UPDATE SET heartbeat = now(), expires = excluded.expires,
                                 actions = excluded.actions;

-- name: unregister_worker
-- A worker that stops says so (and forgets workers gone for more than a day).
DELETE FROM ablauf.workers WHERE name = %s OR expires < now() - interval '1 day';

-- name: live_workers
SELECT name, actions FROM ablauf.workers WHERE expires > now() ORDER BY name;

-- name: park_await
-- An await leased to this worker that found no signal, under its row lock (a wake-up by
-- `wake_awaits` waits for this transaction): the wake-ups it had when taken, and whether
-- its deadline passed. Params: deadline (epoch seconds or NULL: none), task id, owner.
SELECT woken, coalesce(to_timestamp(%s::float8) <= now(), false)
FROM ablauf.tasks WHERE task_id = %s AND lease_owner = %s FOR UPDATE;

-- name: sleep_await
-- Put the await back to sleep until its deadline ('infinity': none). Params: deadline
-- (epoch seconds or NULL), task id.
UPDATE ablauf.tasks SET lease_owner = NULL, lease_until = NULL,
       not_before = coalesce(to_timestamp(%s::float8), 'infinity')
WHERE task_id = %s;

-- name: wake_awaits
-- A signal arrived: the run's awaits of that name are due now (and count the wake-up).
-- Params: run_id, signal name.
UPDATE ablauf.tasks SET not_before = now(), woken = woken + 1
WHERE run_id = %s AND signal = %s AND kind = 'action' AND error IS NULL;

-- name: drop_settled
-- Action tasks not taken yet of leaves a step settled without their result (a deadline
-- passed, a timer no longer needed): nothing they would do counts. Params: run_id, nodes.
DELETE FROM ablauf.tasks WHERE run_id = %s AND kind = 'action' AND node = ANY(%s::int[])
AND lease_owner IS NULL;

