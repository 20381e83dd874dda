-- ablauf on PostgreSQL, schema version 7: the history of runs and the lineage of forks.
-- (The same change as the SQLite store's schema version 5, see ablauf_lang/stores/sqlite.py.)
--
--   history  every write of a run folded out of its step log (`deltas`), in the same
--            delta format (codec.delta), and write 0: the whole job as created
--            (codec.history.whole_data). `deltas` + `history` hold every write of a run
--            made since this migration (`ablauf runs history`, `runs show --at`, fork).
--   forks    a run made by `ablauf runs fork`: the run it was forked from (its public
--            id: the parent may be deleted later) and the restart it was forked at.

CREATE TABLE ablauf.history (
    run       bigint NOT NULL REFERENCES ablauf.runs (id) ON DELETE CASCADE,
    seq       bigint NOT NULL,
    updated   double precision NOT NULL,
    restarts  bigint NOT NULL,
    data      text NOT NULL,
    PRIMARY KEY (run, seq)
);

CREATE TABLE ablauf.forks (
    run          bigint PRIMARY KEY REFERENCES ablauf.runs (id) ON DELETE CASCADE,
    parent       text NOT NULL,
    parent_step  bigint NOT NULL
);
CREATE INDEX forks_by_parent ON ablauf.forks (parent);
