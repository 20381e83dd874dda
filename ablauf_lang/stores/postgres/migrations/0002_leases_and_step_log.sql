-- ablauf on PostgreSQL, schema version 2: who is driving a run, and a checked step log.
-- (The same change as the SQLite store's schema version 2, see ablauf_lang/stores/sqlite.py.)
--
--   runs.head_seq   the newest write of the run (a delta's seq, or the snapshot's): the
--                   deltas of a run must be exactly snapshot_seq + 1 .. head_seq, so a lost
--                   delta row, or all of them, is seen as damage instead of loading an older
--                   state silently. Kept by the trigger below on every delta insert, and by
--                   the store when it writes a snapshot.
--   leases          the process driving a run in its own process (`ablauf run`, eval,
--                   resume, retry): its host and pid, renewed by a heartbeat, released at the
--                   end. `runs list/show` say "running (host, pid)" while it is live and
--                   "abandoned" once it expired or its process is gone; resume and retry
--                   refuse a live run. Times are seconds since the epoch, like runs.created.

ALTER TABLE ablauf.runs ADD COLUMN head_seq bigint NOT NULL DEFAULT 0;
UPDATE ablauf.runs r SET head_seq = greatest(r.snapshot_seq,
    coalesce((SELECT max(d.seq) FROM ablauf.deltas d WHERE d.run = r.id), 0));

CREATE FUNCTION ablauf.delta_head() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE ablauf.runs SET head_seq = NEW.seq WHERE id = NEW.run AND head_seq < NEW.seq;
    RETURN NULL;
END
$$;
CREATE TRIGGER deltas_head AFTER INSERT ON ablauf.deltas
    FOR EACH ROW EXECUTE FUNCTION ablauf.delta_head();

CREATE TABLE ablauf.leases (
    run        bigint PRIMARY KEY REFERENCES ablauf.runs (id) ON DELETE CASCADE,
    token      text NOT NULL,               -- this lease (a fresh id each time one is taken)
    host       text NOT NULL,               -- where the driving process runs
    pid        integer NOT NULL,
    started    double precision,            -- when that process started (pid reuse check)
    heartbeat  double precision NOT NULL,   -- last renewal
    expires    double precision NOT NULL    -- taken for gone after this without a renewal;
                                            -- set to 0 when released before the run ended
);
