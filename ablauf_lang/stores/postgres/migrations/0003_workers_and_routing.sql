-- ablauf on PostgreSQL, schema version 3 (version 2 is another change's; the store applies
-- every file whose version the database has not recorded, in order).
--
--   runs.on_queue   the run is served by the workers (submitted or handed back with
--                   `runs resume/retry --queue`); a write through the API, which drives
--                   the run in its own process from then on, clears it. The janitor looks
--                   only at such runs for steps left pending with no task to finish them.
--   tasks.note      why a restart task was queued (submit, requeue, janitor ...)
--   workers         the live workers: the actions each can perform, renewed with a
--                   heartbeat, so `runs show` can say which action no worker serves
--   tasks_run       the tasks of one run (requeue, the janitor, routing notes, cleanup)

ALTER TABLE ablauf.runs ADD COLUMN on_queue boolean NOT NULL DEFAULT false;
-- Runs the workers were serving before this version: those with tasks, or with steps
-- written by workers (the restarts table holds only those).
UPDATE ablauf.runs r SET on_queue = true
WHERE EXISTS (SELECT 1 FROM ablauf.tasks t WHERE t.run_id = r.run_id)
   OR EXISTS (SELECT 1 FROM ablauf.restarts x WHERE x.run_id = r.run_id);
CREATE INDEX runs_served ON ablauf.runs (id) WHERE status = 'pending' AND on_queue;

ALTER TABLE ablauf.tasks ADD COLUMN note text;
CREATE INDEX tasks_run ON ablauf.tasks (run_id, kind, task_id);
DROP INDEX ablauf.tasks_restarts;  -- tasks_run serves its queries

CREATE TABLE ablauf.workers (
    name         text PRIMARY KEY,       -- host:pid:tag, as in tasks.lease_owner (+ /slot)
    host         text NOT NULL,
    pid          integer NOT NULL,
    actions      text[] NOT NULL,        -- the actions it performs (it claims only those)
    concurrency  integer NOT NULL,
    started      timestamptz NOT NULL DEFAULT now(),
    heartbeat    timestamptz NOT NULL DEFAULT now(),
    expires      timestamptz NOT NULL    -- taken for gone after this without a heartbeat
);

CREATE OR REPLACE VIEW ablauf.queue AS
    SELECT task_id, run_id, kind, node, action, created,
           CASE WHEN error IS NOT NULL THEN 'broken'
                WHEN lease_owner IS NULL THEN 'ready'
                WHEN lease_until < now() THEN 'lease expired'
                ELSE 'running' END AS state,
           lease_owner, lease_until, tries, error, attempt, note
    FROM ablauf.tasks ORDER BY task_id;
