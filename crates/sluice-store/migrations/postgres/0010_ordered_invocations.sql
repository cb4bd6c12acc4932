-- Migration 10: invocations in order per key (see SQLite migration 16).
ALTER TABLE invocations ADD COLUMN order_key TEXT;
ALTER TABLE invocations ADD COLUMN order_seq BIGINT;
CREATE INDEX invocations_ordered ON invocations (order_key, run_after, order_seq, id)
    WHERE order_key IS NOT NULL AND status IN ('queued', 'failed', 'running');
ALTER TABLE triggers ADD COLUMN ordered BIGINT NOT NULL DEFAULT 0 CHECK (ordered IN (0, 1));
