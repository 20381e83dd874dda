-- ablauf on PostgreSQL, schema version 1.
--
-- Everything lives in the schema "ablauf":
--   runs      one row per run: its status, context and what the next restart must look at
--   nodes     one row per node of a run's job tree; a restart rewrites only the nodes it
--             changed, so a step costs the same whatever the size of the tree
--   tasks     the queue: 'restart' tasks carry a result to apply, 'action' tasks carry an
--             action to perform; workers take them with FOR UPDATE SKIP LOCKED
--   restarts  one row per recorded step of a run (who, when, how many results), in order
--   schema_version  which of these migration files have been applied
--
-- The store applies this file itself (ablauf_lang/stores/postgres.py), in one transaction.

CREATE SCHEMA IF NOT EXISTS ablauf;

CREATE TABLE ablauf.schema_version (
    version  integer PRIMARY KEY,
    applied  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ablauf.runs (
    run_id          text PRIMARY KEY,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'success', 'failure')),
    created         timestamptz NOT NULL DEFAULT now(),
    updated         timestamptz NOT NULL DEFAULT now(),
    restarts        integer NOT NULL DEFAULT 0,  -- restarts the job went through
    version         bigint NOT NULL DEFAULT 0,   -- +1 on every write; node rows carry it
    filename        text,                        -- where the program came from
    source          text,                        -- the program
    initial_context json NOT NULL,
    context         json NOT NULL,               -- the context now
    todo            json NOT NULL,               -- branches the next restart must look at
    aborted         text,                        -- the abort reason, once aborted
    error           text                         -- why a restart of this run could not run
);
CREATE INDEX runs_created ON ablauf.runs (created DESC);
CREATE INDEX runs_pending ON ablauf.runs (updated) WHERE status = 'pending';

CREATE TABLE ablauf.nodes (
    run_id   text NOT NULL REFERENCES ablauf.runs ON DELETE CASCADE,
    node_id  integer NOT NULL,      -- pre-order id in the job tree
    version  bigint NOT NULL,       -- the run's version when this row was last written
    kind     text NOT NULL,         -- leaf, seq, par, try ...
    action   text,                  -- leaves: the action
    result   text,                  -- leaves: null (not started), pending, success, failure ...
    record   json NOT NULL,         -- the node as ablauf_lang.serde.encode_node writes it
    PRIMARY KEY (run_id, node_id)
);
-- A worker that has an older copy of a job in memory reads only the rows written since.
CREATE INDEX nodes_version ON ablauf.nodes (run_id, version);

CREATE TABLE ablauf.tasks (
    task_id     bigserial PRIMARY KEY,      -- queue order
    run_id      text NOT NULL REFERENCES ablauf.runs ON DELETE CASCADE,
    kind        text NOT NULL CHECK (kind IN ('restart', 'action')),
    created     timestamptz NOT NULL DEFAULT now(),
    -- restart tasks: the result to apply (null: restart without a result, e.g. a new run)
    result      json,
    -- action tasks: the dispatch to perform
    node_id     integer,
    attempt     integer,
    action      text,
    idempotent  boolean,
    payload     json,
    context     json,                       -- the context when the action was dispatched
    -- an action task being performed is leased by one worker, which renews the lease;
    -- when a lease expires (the worker died) any worker recovers the task
    lease_owner text,
    lease_until timestamptz,
    tries       integer NOT NULL DEFAULT 0, -- how many times the action was taken
    error       text,                       -- set when the task could not be processed;
                                            -- such a task is kept and never taken again
    CHECK (kind = 'action' OR lease_owner IS NULL)
);
CREATE INDEX tasks_ready ON ablauf.tasks (task_id)
    WHERE lease_owner IS NULL AND error IS NULL;
CREATE INDEX tasks_run_restarts ON ablauf.tasks (run_id, task_id)
    WHERE kind = 'restart';
CREATE INDEX tasks_run_actions ON ablauf.tasks (run_id)
    WHERE kind = 'action';
CREATE INDEX tasks_leases ON ablauf.tasks (lease_until)
    WHERE lease_owner IS NOT NULL;

CREATE TABLE ablauf.restarts (
    run_id      text NOT NULL REFERENCES ablauf.runs ON DELETE CASCADE,
    version     bigint NOT NULL,        -- the run version this step wrote
    worker      text NOT NULL,          -- host:pid of the process that wrote it
    results     integer,                -- results applied (null: written through the API)
    dispatches  integer,                -- actions started
    started     timestamptz NOT NULL,   -- when the run's row lock was taken
    finished    timestamptz NOT NULL,   -- when the step's writes were done
    PRIMARY KEY (run_id, version)
);
