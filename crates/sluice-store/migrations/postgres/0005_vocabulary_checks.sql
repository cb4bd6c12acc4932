-- Migration 5 of the PostgreSQL store (issue 21; SQLite migration 11): the vocabulary's columns
-- accept only its words.
-- Never edit a migration that has shipped: append a new numbered file instead.
--
-- `invocations.status` and `.mode` and `log_lines.stream` were free text; each now has a CHECK
-- listing the words of its `sluice_core::vocab` enum (`criticality` has had one since migration
-- 1). The store's `vocabulary` test holds each list to its enum's `ALL`. Adding a CHECK reads
-- every row once, under the table's lock, while the migration runs.
ALTER TABLE invocations
    ADD CONSTRAINT invocations_mode_known CHECK (mode IN ('sync', 'async')),
    ADD CONSTRAINT invocations_status_known
        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'dead', 'expired'));
ALTER TABLE log_lines
    ADD CONSTRAINT log_lines_stream_known CHECK (stream IN ('stdout', 'stderr', 'system'));
