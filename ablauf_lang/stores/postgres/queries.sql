-- The PostgreSQL store's own statements (besides the dialect-neutral ones of `stores/sql.py`),
-- loaded by name (`stores/postgres/queries.py`). Tables: `migrations/*.sql`, schema `ablauf`.

-- name: schema_exists
-- Whether the migrations table exists, looked up in pg_catalog with the statement's own
-- snapshot (not `to_regclass`: a backend's catalog cache can keep saying "no such table"
-- after another backend created it, for the rest of a transaction that waited for that one).
SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = 'ablauf' AND c.relname = 'schema_version');

-- name: schema_versions
SELECT version FROM ablauf.schema_version;

-- name: record_version
INSERT INTO ablauf.schema_version (version) VALUES (%s);

-- name: migration_lock
-- One migrator at a time: a session advisory lock, key 0x61626C61 ("abla").
SELECT pg_advisory_lock(1633840225);

-- name: migration_unlock
SELECT pg_advisory_unlock(1633840225);

-- name: use_schema
-- The schema's tables are the connection's default names (the statements of stores/sql.py).
SET search_path TO ablauf, public;

-- name: begin_read
-- A read: one snapshot for every SELECT of it.
BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY;

-- name: lock_run
-- Lock the run's row for this transaction (one restart of a run at a time): `FOR NO KEY
-- UPDATE`, the lock an UPDATE of the row takes, excludes other restarts of the run but not
-- the foreign-key checks of rows inserted for it (a queued result, a delta).
SELECT id FROM ablauf.runs WHERE run_id = %s FOR NO KEY UPDATE;

-- name: try_lock_run
-- `lock_run` without waiting: no row when another transaction holds it.
SELECT id FROM ablauf.runs WHERE run_id = %s FOR NO KEY UPDATE SKIP LOCKED;

-- name: lock_run_api
-- The same for a write through the API, which also needs to know whether workers serve it.
SELECT id, on_queue FROM ablauf.runs WHERE run_id = %s FOR NO KEY UPDATE;

-- name: try_lock_run_api
-- The same without waiting: no row when another transaction holds it.
SELECT id, on_queue FROM ablauf.runs WHERE run_id = %s FOR NO KEY UPDATE SKIP LOCKED;

-- name: run_exists
SELECT 1 FROM ablauf.runs WHERE run_id = %s;

-- name: run_keys
-- Numbers for new runs' rows, taken in advance (`PostgresStore._new_key`).
SELECT nextval(pg_get_serial_sequence('ablauf.runs', 'id')) FROM generate_series(1, %s);

-- name: newest_write
-- The run's newest write: its newest delta, else its snapshot.
SELECT coalesce((SELECT max(d.seq) FROM ablauf.deltas d WHERE d.run = r.id), r.snapshot_seq)
FROM ablauf.runs r WHERE r.run_id = %s;

-- name: notify_finished
-- The run finished: wake whoever waits for it (`LISTEN ablauf_runs`).
SELECT pg_notify('ablauf_runs', %s);

-- name: listen_finished
LISTEN ablauf_runs;

-- name: serving
-- The tasks of one run by state (see `Serving`).
SELECT count(*) FILTER (WHERE kind = 'action' AND lease_owner IS NULL AND error IS NULL),
       count(*) FILTER (WHERE kind = 'action' AND lease_owner IS NOT NULL
                        AND lease_until >= now() AND error IS NULL),
       count(*) FILTER (WHERE kind = 'action' AND lease_owner IS NOT NULL
                        AND lease_until < now() AND error IS NULL),
       count(*) FILTER (WHERE kind = 'restart' AND error IS NULL),
       count(*) FILTER (WHERE error IS NOT NULL),
       array_agg(DISTINCT lease_owner) FILTER (WHERE lease_until >= now()),
       min(error)
FROM ablauf.tasks WHERE run_id = %s;

-- name: take_off_queue
-- An API write on a run the workers served: drop its action tasks (none of them may be
-- performed any more), mark it driven by the caller.
WITH dropped AS (DELETE FROM ablauf.tasks WHERE run_id = %s AND kind = 'action')
UPDATE ablauf.runs SET on_queue = false WHERE run_id = %s;

-- name: signal_run
-- The run a signal is sent to or taken from, its row locked: senders number the run's
-- signals one at a time, and a signal is taken between two steps of the run, never during.
SELECT id, status, aborted FROM ablauf.runs WHERE run_id = %s FOR NO KEY UPDATE;

-- name: attempt_runs
-- The runs of a batch of claims (`{marks}`: their public ids), kept from being deleted
-- until the claims are written (`FOR KEY SHARE`: a restart of the run is not held up).
SELECT id, run_id, status FROM ablauf.runs WHERE run_id IN ({marks}) FOR KEY SHARE;

-- name: attempts_select
-- The claims of a batch (`{marks}`: one `(%s, %s, %s)` per run key, node, attempt), locked
-- until the claim's transaction ends (in key order, as the claims were inserted: two batches
-- never wait for each other in a circle): one claimer takes over an abandoned attempt.
SELECT run, node, attempt, owner, lease_until, started_at, taken_from, result
FROM ablauf.attempts WHERE (run, node, attempt) IN (VALUES {marks})
ORDER BY run, node, attempt FOR UPDATE;

-- name: upsert_node_rows
-- Bulk forms of statements of `stores/sql.sql` (`Dialect.bulk`, `_rows` added to the
-- name): one statement for many rows, given as one JSON array of the statement's
-- parameter rows (each in its order).
INSERT INTO ablauf.nodes (run, node, spec, state, children)
SELECT (e->>0)::bigint, (e->>1)::integer, e->>2, e->>3, e->>4 FROM json_array_elements(%s::json) e
ON CONFLICT (run, node) DO UPDATE
SET spec = excluded.spec, state = excluded.state, children = excluded.children;

-- name: update_state_rows
UPDATE ablauf.nodes n SET state = e->>0 FROM json_array_elements(%s::json) e
WHERE n.run = (e->>1)::bigint AND n.node = (e->>2)::integer;

-- name: upsert_context_rows
INSERT INTO ablauf.context (run, key, pos, value)
SELECT (e->>0)::bigint, e->>1, (e->>2)::integer, e->>3 FROM json_array_elements(%s::json) e
ON CONFLICT (run, key) DO UPDATE SET pos = excluded.pos, value = excluded.value;
