-- Migration 2: the async queue (DESIGN.md section 3). Applied once, inside a transaction.
-- Never edit a migration that has shipped: append a new numbered file instead.
--
-- The queue lives in `invocations` itself: an async invocation is a row with mode 'async' whose
-- status moves queued -> running -> succeeded | failed (retrying) -> dead, or expired. Columns are
-- added, not a new table built, because rebuilding `invocations` would cascade-delete the log
-- lines of every existing row (`log_lines` references it with ON DELETE CASCADE). Sync rows keep
-- NULL in every request and queue column; no queue index below covers them.

-- The request as received, replayed on every attempt. `request_headers` is a JSON array of
-- [name, hex(value)] pairs: header values are bytes, not necessarily UTF-8.
ALTER TABLE invocations ADD COLUMN request_method  TEXT;
ALTER TABLE invocations ADD COLUMN request_path    TEXT;
ALTER TABLE invocations ADD COLUMN request_headers TEXT;
ALTER TABLE invocations ADD COLUMN request_body    BLOB;
-- 0 high, 1 normal, 2 low: leased in that order.
ALTER TABLE invocations ADD COLUMN criticality INTEGER NOT NULL DEFAULT 1
    CHECK (criticality IN (0, 1, 2));
-- Not leased before `run_after`; `expired` if not started by `deadline`.
ALTER TABLE invocations ADD COLUMN run_after INTEGER;
ALTER TABLE invocations ADD COLUMN deadline  INTEGER;
-- The store's own guard on the promise that attempts never exceed attempts_max: a bug that tried
-- fails its statement instead of running an invocation once too often. Sync rows (attempts 1)
-- satisfy it through the default.
ALTER TABLE invocations ADD COLUMN attempts_max INTEGER NOT NULL DEFAULT 1
    CHECK (attempts BETWEEN 0 AND attempts_max);
-- `max_age_ms` as enqueued, and the instant it runs out: created_at + max_age_ms at first, and
-- now + max_age_ms after a re-drive (`retry_dead`), so that a re-driven invocation is not dead on
-- arrival.
ALTER TABLE invocations ADD COLUMN max_age_ms INTEGER;
ALTER TABLE invocations ADD COLUMN max_age_at INTEGER;
-- Who holds the lease of a running row, and until when.
ALTER TABLE invocations ADD COLUMN lease_owner      TEXT;
ALTER TABLE invocations ADD COLUMN lease_expires_at INTEGER;
ALTER TABLE invocations ADD COLUMN idempotency_key  TEXT;

-- The response of the last attempt that produced one.
CREATE TABLE responses (
    invocation_id TEXT    NOT NULL PRIMARY KEY REFERENCES invocations (id) ON DELETE CASCADE,
    status        INTEGER NOT NULL,
    -- JSON array of [name, hex(value)], like `invocations.request_headers`.
    headers       TEXT    NOT NULL,
    body          BLOB    NOT NULL
) STRICT;

-- Idempotency keys, valid for IDEMPOTENCY_WINDOW_MS after `created_at`. A separate table, not a
-- unique index on `invocations`, because a key must keep answering with its first invocation
-- even after that invocation was purged, and because an expired key is reused by overwriting it.
CREATE TABLE idempotency_keys (
    tenant          TEXT    NOT NULL,
    function        TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    invocation_id   TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (tenant, function, idempotency_key)
) STRICT;
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- `lease` walks this index in lease order and stops after `limit` rows, so its cost does not grow
-- with the backlog. COALESCE puts rows without a deadline last (SQLite sorts NULL first); the
-- lease query orders by the very same expression so that no sort step is needed.
CREATE INDEX invocations_runnable
    ON invocations (criticality, COALESCE(deadline, 9223372036854775807), run_after, id)
    WHERE status IN ('queued', 'failed');
-- Pending rows whose start window closed (-> expired) and that grew too old (-> dead).
CREATE INDEX invocations_pending_deadline ON invocations (deadline)
    WHERE status IN ('queued', 'failed') AND deadline IS NOT NULL;
CREATE INDEX invocations_pending_age ON invocations (max_age_at)
    WHERE status IN ('queued', 'failed');
-- Running rows whose lease expired: their node died; they are reclaimed.
CREATE INDEX invocations_leases ON invocations (lease_expires_at) WHERE status = 'running';
-- Finished rows, sync and async, oldest first for `purge`.
CREATE INDEX invocations_finished ON invocations (finished_at)
    WHERE status IN ('succeeded', 'dead', 'expired');
-- `list_invocations`: newest first per tenant, or per function.
CREATE INDEX invocations_tenant ON invocations (tenant, id);
CREATE INDEX invocations_function ON invocations (tenant, function, id);
