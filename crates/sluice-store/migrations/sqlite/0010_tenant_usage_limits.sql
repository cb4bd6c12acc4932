-- Migration 10: per-tenant usage limits (issue 19): what a tenant may keep queued and stored.
-- Never edit a migration that has shipped: append a new numbered file instead.

-- A tenant's own limits; a NULL column (or no row) takes the node's default (`serve --tenant-*`).
CREATE TABLE tenant_usage_limits (
    tenant               TEXT    PRIMARY KEY REFERENCES tenants (name) ON DELETE CASCADE,
    queued_max           INTEGER CHECK (queued_max >= 0),
    queued_bytes_max     INTEGER CHECK (queued_bytes_max >= 0),
    components_bytes_max INTEGER CHECK (components_bytes_max >= 0),
    functions_max        INTEGER CHECK (functions_max >= 0),
    versions_max         INTEGER CHECK (versions_max >= 0)
) STRICT;

-- What an async invocation's stored request weighs against its tenant's queued-bytes quota: its
-- body plus its header names and values (`StoredRequest::quota_bytes`), written at enqueue. Rows
-- that were unfinished before this migration get their stored sizes (headers as hex JSON, a
-- little more than their bytes); finished rows keep NULL (a re-driven one counts 0 bytes).
ALTER TABLE invocations ADD COLUMN request_bytes INTEGER;
UPDATE invocations SET request_bytes = length(request_body) + length(request_headers)
    WHERE status IN ('queued', 'failed', 'running') AND mode = 'async';

-- Each node re-reads every tenant's unfinished invocations (count and bytes) with one GROUP BY:
-- the version-retention index (migration 6) with the bytes added covers it, so that read walks
-- only the index of unfinished rows, never the table, and no enqueue writes one index more.
-- `status` is in it too: SQLite counts an index as covering only if it holds every column the
-- query names, the partial index's own WHERE included (its entries already change with status).
DROP INDEX invocations_pending_version;
CREATE INDEX invocations_pending_version
    ON invocations (tenant, function, version, request_bytes, status)
    WHERE status IN ('queued', 'failed', 'running');
