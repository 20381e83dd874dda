-- ablauf on PostgreSQL, schema version 4: the signals mailbox and what runs wait for.
-- (The same change as the SQLite store's schema version 3, see ablauf_lang/stores/sqlite.py;
-- version 5 is the task queue's due times.)
--
--   signals   a run's mailbox: `ablauf signal RUN NAME VALUE` appends one, numbered 1, 2 ...
--             per run in order of arrival (the sender holds the run's row lock). An
--             `await!!` leaf takes the earliest of its name: `consumed_by` is set to its node
--             in the same transaction, so a signal is given to one node only, and again to
--             that node after a crash that kept its result from being recorded.
--   waits     one row per leaf in flight that waits (`engine.waits.wait_of`): a sleep, an
--             await, a retry's wait before its next attempt. Written by the store with the
--             step that starts or ends the wait, deleted when the run finishes. `until` is
--             the wake-up, deadline or next attempt (seconds since the epoch); `signal` the
--             signal awaited (a retry's wait: the action it runs again).
--
-- Due runs are found through two indexes, never a scan of the runs: `waits_until` (waits
-- whose time has come) and `signals_unconsumed` (signals no node took yet, joined to the
-- waits of their run).

CREATE TABLE ablauf.signals (
    run          bigint NOT NULL REFERENCES ablauf.runs (id) ON DELETE CASCADE,
    seq          bigint NOT NULL,            -- 1, 2 ... per run, in order of arrival
    name         text NOT NULL,
    value        text NOT NULL,              -- JSON (ablauf_lang.values.encode)
    sent_at      double precision NOT NULL,  -- seconds since the epoch
    consumed_by  integer,                    -- the node that took it, or null
    consumed_at  double precision,
    PRIMARY KEY (run, seq)
);
CREATE INDEX signals_unconsumed ON ablauf.signals (run, name, seq) WHERE consumed_by IS NULL;

CREATE TABLE ablauf.waits (
    run      bigint NOT NULL REFERENCES ablauf.runs (id) ON DELETE CASCADE,
    node     integer NOT NULL,
    kind     text NOT NULL,                 -- sleep, signal or retry
    signal   text,
    until    double precision,
    attempt  integer NOT NULL DEFAULT 0,
    PRIMARY KEY (run, node)
);
CREATE INDEX waits_until ON ablauf.waits (until) WHERE until IS NOT NULL;
