-- ablauf on PostgreSQL, schema version 1. Applied by ablauf_lang/stores/postgres.py, in one
-- transaction, the first time a store or a worker opens the database.
--
-- Everything lives in the schema "ablauf":
--   runs      one row per run: status, restarts, what the next restart must look at
--   nodes     a snapshot of each run's job tree: one row per node (spec, state, children)
--   context   a snapshot of each run's context: one row per top-level key
--   deltas    what each step changed since the snapshot (one small row per step); every
--             so many steps they are folded into nodes and context
--             (runs, nodes, context, deltas: as ablauf_lang/stores/sqlbase.py writes them)
--   tasks     the queue: 'restart' tasks carry a result to apply, 'action' tasks an action
--             to perform; workers take them with FOR UPDATE SKIP LOCKED
--   restarts  one row per recorded step of a run: who wrote it, when, how many results
--   run_list, queue   views for people: times as timestamps, the queue's state in words
--
-- JSON is stored as text written by json.dumps (cast with ::json to query into it); times
-- in runs are seconds since the epoch (see the run_list view).

CREATE SCHEMA IF NOT EXISTS ablauf;

CREATE TABLE ablauf.schema_version (
    version  integer PRIMARY KEY,
    applied  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ablauf.runs (
    id              bigserial PRIMARY KEY,
    run_id          text NOT NULL UNIQUE,        -- the public id
    status          text NOT NULL CHECK (status IN ('pending', 'success', 'failure')),
    created         double precision NOT NULL,   -- seconds since the epoch
    updated         double precision NOT NULL,   -- as of the snapshot (see run_list)
    restarts        integer NOT NULL,            -- as of the snapshot
    aborted         text,                        -- the abort reason, once aborted
    todo            text NOT NULL,               -- JSON: branches the next restart must visit
    touched         text NOT NULL,               -- JSON: node ids the last write changed
    n_nodes         integer NOT NULL,            -- rows the snapshot has in nodes
    snapshot_seq    bigint NOT NULL,             -- the write nodes and context are current with
    source          text,                        -- the program
    filename        text,                        -- where it came from
    initial_context text NOT NULL,               -- JSON
    format          integer NOT NULL,            -- ablauf_lang.serde.VERSION of the records
    error           text                         -- why the run failed, or why a restart of
                                                 -- it could not be performed
);
CREATE INDEX runs_created ON ablauf.runs (created);

CREATE TABLE ablauf.nodes (
    run       bigint NOT NULL REFERENCES ablauf.runs (id) ON DELETE CASCADE,
    node      integer NOT NULL,   -- pre-order id in the job tree
    spec      text NOT NULL,      -- JSON: what the node is (kind, action, payload ...)
    state     text NOT NULL,      -- JSON: what happened (result, output, error, attempt ...)
    children  text,               -- JSON: a branch's child ids; null for a leaf
    PRIMARY KEY (run, node)
);

CREATE TABLE ablauf.deltas (
    run       bigint NOT NULL REFERENCES ablauf.runs (id) ON DELETE CASCADE,
    seq       bigint NOT NULL,             -- write number: snapshot_seq + 1, + 2 ...
    updated   double precision NOT NULL,
    restarts  integer NOT NULL,
    data      text NOT NULL,               -- JSON: the nodes, context keys, fields changed
    PRIMARY KEY (run, seq)
);

-- A worker sends the INSERT of a step's delta together with its COMMIT; this check, sent
-- between them, makes sure the row is the one this transaction wrote (another writer of the
-- same write number would have won the race), else the transaction fails and rolls back.
CREATE FUNCTION ablauf.check_delta(p_run bigint, p_seq bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM ablauf.deltas WHERE run = p_run AND seq = p_seq
                   AND xmin::text::bigint = txid_current() % 4294967296) THEN
        RAISE EXCEPTION 'write % of run % was taken by another process', p_seq, p_run
            USING ERRCODE = 'serialization_failure';
    END IF;
END
$$;

CREATE TABLE ablauf.context (
    run    bigint NOT NULL REFERENCES ablauf.runs (id) ON DELETE CASCADE,
    key    text NOT NULL,        -- JSON of the key
    pos    integer NOT NULL,     -- the key's place in the context's order
    value  text NOT NULL,        -- JSON
    PRIMARY KEY (run, key)
);

CREATE TABLE ablauf.tasks (
    task_id     bigserial PRIMARY KEY,      -- queue order
    run_id      text NOT NULL REFERENCES ablauf.runs (run_id) ON DELETE CASCADE,
    kind        text NOT NULL CHECK (kind IN ('restart', 'action')),
    created     timestamptz NOT NULL DEFAULT now(),
    -- restart tasks: the result to apply (JSON; null: restart without one, e.g. a new run)
    result      text,
    -- action tasks: the dispatch to perform
    node        integer,
    attempt     integer,
    action      text,
    idempotent  boolean,
    payload     text,                       -- JSON
    context     text,                       -- JSON: the context when it was dispatched
    -- an action being performed is leased by one worker, which renews the lease while the
    -- action runs; when a lease expires (its worker died) any worker recovers the task
    lease_owner text,                       -- host:pid of the worker
    lease_until timestamptz,
    tries       integer NOT NULL DEFAULT 0, -- how many times the action was taken
    error       text,                       -- set when the task could not be processed:
                                            -- kept, never taken again
    CHECK (kind = 'action' OR lease_owner IS NULL)
);
CREATE INDEX tasks_ready ON ablauf.tasks (task_id) WHERE lease_owner IS NULL AND error IS NULL;
CREATE INDEX tasks_restarts ON ablauf.tasks (run_id, task_id) WHERE kind = 'restart';
CREATE INDEX tasks_leases ON ablauf.tasks (lease_until) WHERE lease_owner IS NOT NULL;

CREATE TABLE ablauf.restarts (
    run_id      text NOT NULL REFERENCES ablauf.runs (run_id) ON DELETE CASCADE,
    seq         bigint NOT NULL,        -- the write number of this step (deltas.seq)
    worker      text NOT NULL,          -- host:pid of the process that wrote it
    results     integer,                -- results applied (null: written through the API)
    dispatches  integer,                -- actions started
    started     timestamptz NOT NULL,   -- when the run's row lock was taken
    finished    timestamptz NOT NULL,   -- when the step's writes were done
    PRIMARY KEY (run_id, seq)
);

CREATE VIEW ablauf.run_list AS
    SELECT r.run_id, r.status, to_timestamp(r.created) AS created,
           to_timestamp(coalesce(d.updated, r.updated)) AS updated,
           coalesce(d.restarts, r.restarts) AS restarts, r.n_nodes AS nodes, r.filename,
           r.aborted, r.error
    FROM ablauf.runs r
    LEFT JOIN LATERAL (SELECT updated, restarts FROM ablauf.deltas
                       WHERE run = r.id ORDER BY seq DESC LIMIT 1) d ON true
    ORDER BY r.created DESC;

CREATE VIEW ablauf.queue AS
    SELECT task_id, run_id, kind, node, action, created,
           CASE WHEN error IS NOT NULL THEN 'broken'
                WHEN lease_owner IS NULL THEN 'ready'
                WHEN lease_until < now() THEN 'lease expired'
                ELSE 'running' END AS state,
           lease_owner, lease_until, tries, error
    FROM ablauf.tasks ORDER BY task_id;
