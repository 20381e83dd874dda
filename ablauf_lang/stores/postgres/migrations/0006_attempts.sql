-- ablauf on PostgreSQL, schema version 6: the claims of actions' attempts.
-- (The same change as the SQLite store's schema version 4, see ablauf_lang/stores/sqlite.py.)
--
--   attempts  one row per attempt of a non-idempotent action an action worker claimed
--             (`begin_attempts`) before performing it, so a dispatch Kafka delivers again
--             is never performed twice: `owner` holds it until `lease_until` (renewed by
--             `renew_attempts`), `result` is what it gave (`finish_attempts`: the result
--             message's text, sent again to a later claim). A claim whose lease ran out
--             without a result is taken over: `taken_from` is its old owner. Deleted with
--             the run.

CREATE TABLE ablauf.attempts (
    run          bigint NOT NULL REFERENCES ablauf.runs (id) ON DELETE CASCADE,
    node         integer NOT NULL,
    attempt      integer NOT NULL,
    owner        text NOT NULL,
    lease_until  double precision,            -- seconds since the epoch; null once finished
    started_at   double precision NOT NULL,
    taken_from   text,
    result       text,                        -- codec.records.encode_result text
    finished_at  double precision,
    PRIMARY KEY (run, node, attempt)
);
