-- ablauf on PostgreSQL, schema version 5: tasks with a due time (timers, retry waits,
-- awaits), and the limits of an attempt.
--
--   tasks.not_before  an action task is not taken before this time (NULL: at once): a
--                     sleep's wake-up, a retry's wait, an await's deadline ('infinity':
--                     none). Workers take only tasks with not_before NULL or <= now(), and
--                     an idle worker sleeps on LISTEN until the next one falls due (one
--                     indexed min(not_before)), so a parked task costs nothing.
--   tasks.signal      an await's signal name; `queue.wake_awaits` sets not_before = now()
--                     on a run's awaits of a name when a signal of that name arrives.
--   tasks.woken       how many times a signal woke the task: a worker that found no
--                     signal puts the await back to sleep only if no wake-up came meanwhile.
--   tasks.timeout, tasks.heartbeat   the dispatch's limits of one attempt, in seconds.
--
-- The ready index now holds only tasks with no due time; tasks_due holds the others, in
-- due order, so neither the claim nor the idle wait looks at tasks that are not due.
-- (Read not_before in SQL, or through the queue view: psycopg cannot load 'infinity'
-- into a Python datetime; the view shows an await with no deadline as NULL, 'waiting'.)

ALTER TABLE ablauf.tasks ADD COLUMN not_before timestamptz;
ALTER TABLE ablauf.tasks ADD COLUMN signal text;
ALTER TABLE ablauf.tasks ADD COLUMN woken integer NOT NULL DEFAULT 0;
ALTER TABLE ablauf.tasks ADD COLUMN timeout double precision;
ALTER TABLE ablauf.tasks ADD COLUMN heartbeat double precision;

DROP INDEX ablauf.tasks_ready;
CREATE INDEX tasks_ready ON ablauf.tasks (task_id)
    WHERE lease_owner IS NULL AND error IS NULL AND not_before IS NULL;
CREATE INDEX tasks_due ON ablauf.tasks (not_before)
    WHERE lease_owner IS NULL AND error IS NULL AND not_before IS NOT NULL;
CREATE INDEX tasks_awaits ON ablauf.tasks (run_id, signal) WHERE signal IS NOT NULL;

CREATE OR REPLACE VIEW ablauf.queue AS
    SELECT task_id, run_id, kind, node, action, created,
           CASE WHEN error IS NOT NULL THEN 'broken'
                WHEN lease_owner IS NULL AND not_before > now() THEN 'waiting'
                WHEN lease_owner IS NULL THEN 'ready'
                WHEN lease_until < now() THEN 'lease expired'
                ELSE 'running' END AS state,
           lease_owner, lease_until, tries, error, attempt, note,
           nullif(not_before, 'infinity') AS not_before, signal
    FROM ablauf.tasks ORDER BY task_id;
