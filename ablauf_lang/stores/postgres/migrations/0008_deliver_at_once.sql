-- ablauf on PostgreSQL, schema version 8: a delivery that writes its step at once.
--
-- A worker that knows a run whose only step in flight is the one it delivers computes the
-- step the result makes without waiting for the server, and sends the delivery, the step
-- and the COMMIT together (`queue.deliver`, `deliver_now`). The delivery checks with this
-- function that it removed the task leased to the worker and took the run's lock; if not,
-- the transaction fails (lock_not_available) and nothing of the step is written: the
-- worker then delivers the result the usual way.

CREATE FUNCTION ablauf.held(p_ok boolean) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT p_ok THEN
        RAISE EXCEPTION 'the task or the run is not this worker''s to write at once'
            USING ERRCODE = 'lock_not_available';
    END IF;
    RETURN true;
END
$$;
