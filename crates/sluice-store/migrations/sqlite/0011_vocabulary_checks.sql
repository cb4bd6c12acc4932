-- Migration 11 (issue 21): the vocabulary's columns accept only its words.
-- Never edit a migration that has shipped: append a new numbered file instead.
--
-- `invocations.status` and `.mode` and `log_lines.stream` were free text: a typo in a statement
-- would have stored a state no query looks for, and the call would have been lost from view. Each
-- now has a CHECK listing the words of its `sluice_core::vocab` enum (`criticality` has had one
-- since migration 2). The store's `vocabulary` test holds each list to its enum's `ALL`.
--
-- SQLite cannot add a CHECK to a table: `invocations`, `log_lines` and `responses` are rebuilt,
-- with the same columns in the same order, every row, every index, and `log_lines`'
-- AUTOINCREMENT counter (a `seq` is never handed out twice: `logs -f` pages by it). Foreign keys
-- stay on (the migration runs inside a transaction, where they cannot be switched off), and with
-- them on, dropping `invocations` would cascade-delete every log line and response. So the
-- children are rebuilt first, pointing at the new parent, and the old tables are dropped child
-- first, when nothing references them any more; the renames then rewrite the children's
-- REFERENCES to the final names. There are no triggers or views on these tables.
PRAGMA defer_foreign_keys = ON;

CREATE TABLE invocations_v11 (
    id               TEXT    NOT NULL PRIMARY KEY,
    tenant           TEXT    NOT NULL,
    function         TEXT    NOT NULL,
    version          INTEGER NOT NULL,
    mode             TEXT    NOT NULL
        CONSTRAINT invocations_mode_known CHECK (mode IN ('sync', 'async')),
    status           TEXT    NOT NULL
        CONSTRAINT invocations_status_known
        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'dead', 'expired')),
    attempts         INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    status_code      INTEGER,
    error_kind       TEXT,
    request_method   TEXT,
    request_path     TEXT,
    request_headers  TEXT,
    request_body     BLOB,
    -- 0 high, 1 normal, 2 low: leased in that order.
    criticality      INTEGER NOT NULL DEFAULT 1 CHECK (criticality IN (0, 1, 2)),
    run_after        INTEGER,
    deadline         INTEGER,
    attempts_max     INTEGER NOT NULL DEFAULT 1 CHECK (attempts BETWEEN 0 AND attempts_max),
    max_age_ms       INTEGER,
    max_age_at       INTEGER,
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    idempotency_key  TEXT,
    cpu_us           INTEGER CHECK (cpu_us IS NULL OR cpu_us >= 0),
    waits            TEXT,
    request_bytes    INTEGER
) STRICT;
INSERT INTO invocations_v11
SELECT id, tenant, function, version, mode, status, attempts, created_at, started_at, finished_at,
    status_code, error_kind, request_method, request_path, request_headers, request_body,
    criticality, run_after, deadline, attempts_max, max_age_ms, max_age_at, lease_owner,
    lease_expires_at, idempotency_key, cpu_us, waits, request_bytes
FROM invocations;

CREATE TABLE log_lines_v11 (
    seq           INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    invocation_id TEXT    NOT NULL REFERENCES invocations_v11 (id) ON DELETE CASCADE,
    tenant        TEXT    NOT NULL,
    function      TEXT    NOT NULL,
    stream        TEXT    NOT NULL
        CONSTRAINT log_lines_stream_known CHECK (stream IN ('stdout', 'stderr', 'system')),
    line          TEXT    NOT NULL,
    at            INTEGER NOT NULL
) STRICT;
INSERT INTO log_lines_v11 (seq, invocation_id, tenant, function, stream, line, at)
SELECT seq, invocation_id, tenant, function, stream, line, at FROM log_lines;
-- The counter goes on from where the old table's stood, not from its highest surviving row.
DELETE FROM sqlite_sequence WHERE name = 'log_lines_v11';
INSERT INTO sqlite_sequence (name, seq)
SELECT 'log_lines_v11', seq FROM sqlite_sequence WHERE name = 'log_lines';

CREATE TABLE responses_v11 (
    invocation_id TEXT    NOT NULL PRIMARY KEY REFERENCES invocations_v11 (id) ON DELETE CASCADE,
    status        INTEGER NOT NULL,
    -- JSON array of [name, hex(value)], like `invocations.request_headers`.
    headers       TEXT    NOT NULL,
    body          BLOB    NOT NULL
) STRICT;
INSERT INTO responses_v11 (invocation_id, status, headers, body)
SELECT invocation_id, status, headers, body FROM responses;

-- Children first: once they are gone, nothing references the old `invocations`, and dropping it
-- deletes nothing else.
DROP TABLE log_lines;
DROP TABLE responses;
DROP TABLE invocations;
-- Renaming also rewrites the children's REFERENCES (and the sqlite_sequence row).
ALTER TABLE invocations_v11 RENAME TO invocations;
ALTER TABLE log_lines_v11 RENAME TO log_lines;
ALTER TABLE responses_v11 RENAME TO responses;

-- Every index the three tables had, as its latest migration wrote it.
CREATE INDEX invocations_runnable
    ON invocations (criticality, COALESCE(deadline, 9223372036854775807), run_after, id)
    WHERE status IN ('queued', 'failed');
CREATE INDEX invocations_pending_deadline ON invocations (deadline)
    WHERE status IN ('queued', 'failed') AND deadline IS NOT NULL;
CREATE INDEX invocations_pending_age ON invocations (max_age_at)
    WHERE status IN ('queued', 'failed');
CREATE INDEX invocations_leases ON invocations (lease_expires_at) WHERE status = 'running';
CREATE INDEX invocations_finished ON invocations (finished_at)
    WHERE status IN ('succeeded', 'dead', 'expired');
CREATE INDEX invocations_tenant ON invocations (tenant, id);
CREATE INDEX invocations_function ON invocations (tenant, function, id);
CREATE INDEX invocations_tenant_plain ON invocations (tenant, criticality, run_after, id)
    WHERE status IN ('queued', 'failed') AND deadline IS NULL;
CREATE INDEX invocations_tenant_windowed ON invocations (tenant, criticality, deadline, run_after, id)
    WHERE status IN ('queued', 'failed') AND deadline IS NOT NULL;
CREATE INDEX invocations_pending_version
    ON invocations (tenant, function, version, request_bytes, status)
    WHERE status IN ('queued', 'failed', 'running');
CREATE INDEX log_lines_function ON log_lines (tenant, function, seq);
CREATE INDEX log_lines_invocation ON log_lines (invocation_id, seq);
