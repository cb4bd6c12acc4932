-- Migration 16: invocations in order per key (issue 23: a trigger's `--ordered`).
-- Never edit a migration that has shipped: append a new numbered file instead.
--
-- An invocation with an `order_key` runs only when nothing else of its key is in flight, the
-- held ones in `order_seq` (then id) order: one in flight per key, retries included, as SQS FIFO
-- message groups do. Such an invocation is stored held (`run_after` at the largest integer, so
-- no lease sees it) and released (`run_after` = now) when its key has nothing in flight and it
-- is the first held: at its own enqueue if the key is idle, at the completion of the one before
-- it otherwise, and by a periodic sweep where the one before ended some other way (expired).
ALTER TABLE invocations ADD COLUMN order_key TEXT;
ALTER TABLE invocations ADD COLUMN order_seq INTEGER;
-- A key's unfinished invocations: those in flight (run_after below HELD) before the held ones,
-- which follow in their order; so "is anything in flight" and "the first held" are one seek each.
CREATE INDEX invocations_ordered ON invocations (order_key, run_after, order_seq, id)
    WHERE order_key IS NOT NULL AND status IN ('queued', 'failed', 'running');
-- A trigger whose messages run in order per subject, routing key or topic.
ALTER TABLE triggers ADD COLUMN ordered INTEGER NOT NULL DEFAULT 0 CHECK (ordered IN (0, 1));
