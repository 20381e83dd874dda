-- The statements of the shared SQL store (`stores/sql.py`, SQLite and PostgreSQL), by name,
-- loaded once by `stores.queries.load_queries`. Written with `?` placeholders: the dialect
-- turns them into its own (`Dialect.q`). A `{marks}` is filled in by Python with one `?`
-- per key of an `IN (...)` list; WHERE filters, ORDER BY and LIMIT of the listing are
-- appended to `info_select` by Python.

-- name: info_select
-- runs, leases and forks columns for RunInfo (the deltas' and nodes' counts are asked apart).
SELECT r.id, r.run_id, r.status, r.created, r.updated, r.restarts, r.filename, r.error, r.aborted, r.snapshot_seq, r.head_seq, r.n_nodes, l.token, l.host, l.pid, l.started, l.heartbeat, l.expires, f.parent, f.parent_step FROM runs r LEFT JOIN leases l ON l.run = r.id LEFT JOIN forks f ON f.run = r.id

-- name: log_select
SELECT run, count(*), min(seq), max(seq), max(updated), max(restarts) FROM deltas WHERE run IN ({marks}) GROUP BY run

-- name: nodes_select
SELECT run, count(*) FROM nodes WHERE run IN ({marks}) GROUP BY run

-- name: insert_delta
INSERT INTO deltas (run, seq, updated, restarts, data) SELECT ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM runs WHERE id = ? AND snapshot_seq > ?) ON CONFLICT (run, seq) DO NOTHING

-- name: upsert_node
INSERT INTO nodes (run, node, spec, state, children) VALUES (?, ?, ?, ?, ?) ON CONFLICT (run, node) DO UPDATE SET spec = excluded.spec, state = excluded.state, children = excluded.children

-- name: update_state
UPDATE nodes SET state = ? WHERE run = ? AND node = ?

-- name: upsert_context
INSERT INTO context (run, key, pos, value) VALUES (?, ?, ?, ?) ON CONFLICT (run, key) DO UPDATE SET pos = excluded.pos, value = excluded.value

-- name: snapshot_run
UPDATE runs SET status = ?, updated = ?, restarts = ?, aborted = ?, todo = ?, touched = ?, n_nodes = ?, error = ?, format = ?, snapshot_seq = ?, head_seq = ? WHERE id = ?

-- name: snapshot_run_after
-- `snapshot_run`, refused unless the snapshot is still the one read.
UPDATE runs SET status = ?, updated = ?, restarts = ?, aborted = ?, todo = ?, touched = ?, n_nodes = ?, error = ?, format = ?, snapshot_seq = ?, head_seq = ? WHERE id = ? AND snapshot_seq = ?

-- name: finish_step
UPDATE runs SET status = ?, error = ?, aborted = ?, updated = ? WHERE id = ?

-- name: run_exists
SELECT 1 FROM runs WHERE run_id = ?

-- name: run_status
SELECT status FROM runs WHERE run_id = ?

-- name: count_deltas
SELECT count(*), max(seq) FROM deltas WHERE run = ?

-- name: delete_nodes_from
DELETE FROM nodes WHERE run = ? AND node >= ?

-- name: delete_context_of_run
DELETE FROM context WHERE run = ?

-- name: delete_deltas_of_run
DELETE FROM deltas WHERE run = ?

-- name: delete_nodes_of_run
DELETE FROM nodes WHERE run = ?

-- name: run_seqs
SELECT id, snapshot_seq, head_seq FROM runs WHERE run_id = ?

-- name: max_seq
SELECT max(seq) FROM deltas WHERE run = ?

-- name: writes_since
-- A run's writes after the one a store knows, in order: those folded into the snapshot
-- since (kept in its history), then its deltas. Params: run, seq, run, seq.
SELECT h.seq, h.data FROM history h, runs r
WHERE r.id = ? AND h.run = r.id AND h.seq > ? AND h.seq <= r.snapshot_seq
UNION ALL
SELECT d.seq, d.data FROM deltas d WHERE d.run = ? AND d.seq > ?
ORDER BY 1

-- name: snapshot_of
SELECT snapshot_seq FROM runs WHERE id = ?

-- name: load_run
-- A run's row, with its lease and the run it was forked from (NULLs: none).
SELECT r.id, r.run_id, r.status, r.created, r.updated, r.restarts, r.aborted, r.todo, r.touched, r.n_nodes, r.snapshot_seq, r.source, r.filename, r.initial_context, r.format, r.error, r.head_seq, l.token, l.host, l.pid, l.started, l.heartbeat, l.expires, f.parent, f.parent_step FROM runs r LEFT JOIN leases l ON l.run = r.id LEFT JOIN forks f ON f.run = r.id WHERE r.run_id = ?

-- The rows of a run by its public id (`load` reads them with its `runs` row at once).
-- name: load_nodes
SELECT node, spec, state, children FROM nodes WHERE run = (SELECT id FROM runs WHERE run_id = ?)

-- name: load_context
SELECT key, pos, value FROM context WHERE run = (SELECT id FROM runs WHERE run_id = ?)

-- name: load_deltas
SELECT seq, updated, data FROM deltas WHERE run = (SELECT id FROM runs WHERE run_id = ?) ORDER BY seq

-- name: count_runs
SELECT count(*) FROM runs r

-- name: run_id_exact
SELECT run_id FROM runs WHERE run_id = ?

-- name: run_id_prefix
SELECT run_id FROM runs WHERE substr(run_id, 1, ?) = ? LIMIT 50

-- name: delete_leases_in
DELETE FROM leases WHERE run IN ({marks})

-- name: delete_deltas_in
DELETE FROM deltas WHERE run IN ({marks})

-- name: delete_context_in
DELETE FROM context WHERE run IN ({marks})

-- name: delete_nodes_in
DELETE FROM nodes WHERE run IN ({marks})

-- name: delete_runs_in
DELETE FROM runs WHERE id IN ({marks})

-- name: prune_select
-- Runs last updated (their newest delta, else the run row) before `?`; Python appends
-- ` AND r.status = ?` for a status, then ` ORDER BY r.created, r.id`.
SELECT r.id, r.run_id, r.status, l.token, l.host, l.pid, l.started, l.heartbeat, l.expires FROM runs r LEFT JOIN leases l ON l.run = r.id WHERE COALESCE((SELECT max(d.updated) FROM deltas d WHERE d.run = r.id), r.updated) < ?

-- name: lease_of_run
SELECT r.id, l.token, l.host, l.pid, l.started, l.heartbeat, l.expires FROM runs r LEFT JOIN leases l ON l.run = r.id WHERE r.run_id = ?

-- name: take_lease
INSERT INTO leases (run, token, host, pid, started, heartbeat, expires) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run) DO NOTHING

-- name: take_over_lease
UPDATE leases SET token = ?, host = ?, pid = ?, started = ?, heartbeat = ?, expires = ? WHERE run = ? AND token = ?

-- name: renew_lease
UPDATE leases SET heartbeat = ?, expires = ? WHERE run = (SELECT id FROM runs WHERE run_id = ?) AND token = ?

-- name: release_lease
UPDATE leases SET heartbeat = ?, expires = 0 WHERE run = (SELECT id FROM runs WHERE run_id = ?) AND token = ?

-- name: drop_lease
DELETE FROM leases WHERE run = (SELECT id FROM runs WHERE run_id = ?) AND token = ?

-- ---------------------------------------------------------------- signals and waits

-- name: signal_run
-- The run a signal is sent to: its key, status and abort reason (the PostgreSQL store
-- locks the row: one sender at a time numbers the run's signals).
SELECT id, status, aborted FROM runs WHERE run_id = ?

-- name: newest_signal
SELECT max(seq) FROM signals WHERE run = ?

-- name: insert_signal
-- The run's next signal (numbered right after `newest_signal`, under the write lock).
INSERT INTO signals (run, seq, name, value, sent_at) VALUES (?, ?, ?, ?, ?)

-- name: next_signal
-- The earliest signal `name` of the run not taken by another node (unconsumed, or taken
-- by this node before a crash kept its result from being recorded).
SELECT seq, value, consumed_by FROM signals WHERE run = ? AND name = ? AND (consumed_by IS NULL OR consumed_by = ?) ORDER BY seq LIMIT 1

-- name: consume_signal
UPDATE signals SET consumed_by = ?, consumed_at = ? WHERE run = ? AND seq = ? AND consumed_by IS NULL

-- name: signal_sent
-- Whether a signal whose COMMIT answer was lost was written (its seq).
SELECT s.seq FROM signals s JOIN runs r ON r.id = s.run WHERE r.run_id = ? AND s.name = ? AND s.sent_at = ? AND s.value = ?

-- name: signals_of_run
SELECT seq, name, value, sent_at, consumed_by, consumed_at FROM signals WHERE run = ? ORDER BY seq

-- name: upsert_wait
-- A leaf's wait: `signal` is the signal awaited (a retry's wait: the action it runs again).
INSERT INTO waits (run, node, kind, signal, until, attempt) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run, node) DO UPDATE SET kind = excluded.kind, signal = excluded.signal, until = excluded.until, attempt = excluded.attempt

-- name: delete_wait
DELETE FROM waits WHERE run = ? AND node = ?

-- name: delete_waits_from
DELETE FROM waits WHERE run = ? AND node >= ?

-- name: delete_waits_of_run
DELETE FROM waits WHERE run = ?

-- name: waits_select
-- The waits of the listed runs (`{marks}`: their keys).
SELECT run, node, kind, signal, until, attempt FROM waits WHERE run IN ({marks}) ORDER BY run, node

-- name: waits_of_run
SELECT node, kind, signal, until, attempt FROM waits WHERE run = ? ORDER BY node

-- name: due_runs
-- Pending runs with a wait due at `?` (the until index), or awaiting a signal that is in
-- their mailbox (the index of unconsumed signals, each looked up in its run's waits), the
-- longest due first. CROSS JOIN: the due rows first, then their runs (SQLite keeps that
-- order; the runs are never walked).
SELECT r.run_id FROM (SELECT w.run AS run, w.until AS due FROM waits w WHERE w.until <= ? UNION ALL SELECT s.run AS run, s.sent_at AS due FROM signals s WHERE s.consumed_by IS NULL AND EXISTS (SELECT 1 FROM waits w WHERE w.run = s.run AND w.kind = 'signal' AND w.signal = s.name)) d CROSS JOIN runs r WHERE r.id = d.run AND r.status = 'pending' GROUP BY r.run_id ORDER BY min(d.due), r.run_id LIMIT ?

-- name: next_wake
SELECT min(until) FROM waits WHERE until IS NOT NULL

-- name: taken_unrecorded
-- Pending runs with an await that took a signal whose result was never recorded (the
-- process died between the two): the await still waits and the signal is marked taken by
-- it. One walk over the waits for signals: a worker asks once, when it starts.
SELECT DISTINCT r.run_id FROM waits w JOIN signals s ON s.run = w.run AND s.consumed_by = w.node JOIN runs r ON r.id = w.run WHERE w.kind = 'signal' AND r.status = 'pending' ORDER BY r.run_id

-- name: delete_signals_in
DELETE FROM signals WHERE run IN ({marks})

-- name: delete_waits_in
DELETE FROM waits WHERE run IN ({marks})

-- ---------------------------------------------------------------- attempts of actions

-- name: attempt_runs
-- The runs of a batch of claims: key, public id, status (`{marks}`: their public ids).
SELECT id, run_id, status FROM runs WHERE run_id IN ({marks})

-- name: insert_attempt
-- A claim of an attempt no one claimed before (one already there is left as it is).
INSERT INTO attempts (run, node, attempt, owner, lease_until, started_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run, node, attempt) DO NOTHING

-- name: attempts_select
-- The claims of a batch (`{marks}`: one `(?, ?, ?)` per run key, node, attempt).
SELECT run, node, attempt, owner, lease_until, started_at, taken_from, result FROM attempts WHERE (run, node, attempt) IN (VALUES {marks})

-- name: take_over_attempt
-- A claim whose lease ran out without a result, taken over (`taken_from`: its old owner).
UPDATE attempts SET owner = ?, lease_until = ?, started_at = ?, taken_from = ? WHERE run = ? AND node = ? AND attempt = ? AND result IS NULL

-- name: renew_attempts
UPDATE attempts SET lease_until = ? WHERE owner = ? AND result IS NULL AND (run, node, attempt) IN (VALUES {marks})

-- name: finish_attempt
-- The first result kept stays (a later one is a redelivery's).
UPDATE attempts SET result = ?, lease_until = NULL, finished_at = ? WHERE run = (SELECT id FROM runs WHERE run_id = ?) AND node = ? AND attempt = ? AND result IS NULL

-- name: clear_wait
-- A retry's wait whose dispatch was sent: due_runs and next_wake no longer give it.
DELETE FROM waits WHERE run = (SELECT id FROM runs WHERE run_id = ?) AND node = ? AND kind = 'retry' AND attempt = ?

-- name: delete_attempts_in
DELETE FROM attempts WHERE run IN ({marks})

-- name: insert_history
-- One write kept in the run's history (write 0: the whole job as created).
INSERT INTO history (run, seq, updated, restarts, data) VALUES (?, ?, ?, ?, ?)

-- name: archive_deltas
-- At a fold: the step log's writes move to the history (deleted from `deltas` after).
INSERT INTO history (run, seq, updated, restarts, data) SELECT run, seq, updated, restarts, data FROM deltas WHERE run = ?

-- name: load_history
-- Every write kept of a run, oldest first: the history, then the live step log.
SELECT seq, updated, data FROM history WHERE run = ? UNION ALL SELECT seq, updated, data FROM deltas WHERE run = ? ORDER BY seq

-- name: delete_history_in
DELETE FROM history WHERE run IN ({marks})

-- name: insert_fork
INSERT INTO forks (run, parent, parent_step) VALUES (?, ?, ?)

-- name: delete_forks_in
DELETE FROM forks WHERE run IN ({marks})

