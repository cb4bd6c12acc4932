-- Migration 1 of the PostgreSQL store: the whole schema as the SQLite store has it after its
-- migration 7, for a cluster of nodes sharing one database. Applied once, inside a transaction,
-- under an advisory lock, by `PostgresStore::connect`.
-- Never edit a migration that has shipped: append a new numbered file instead.
--
-- Every timestamp is unix milliseconds (BIGINT), as on SQLite, so both stores compare them the
-- same way. Every integer is BIGINT so that the store reads i64 from either database.

-- The database's clock, which decides leases: no node's clock does (clock skew between nodes must
-- not decide who owns an invocation). clock_timestamp(), not now(): inside a long transaction
-- now() stands still.
CREATE FUNCTION sluice_now_ms() RETURNS BIGINT LANGUAGE sql VOLATILE AS $$
    SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT
$$;

CREATE TABLE tenants (
    name       TEXT   NOT NULL PRIMARY KEY,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id         TEXT    NOT NULL PRIMARY KEY,
    -- NULL for admin keys, which belong to no tenant.
    tenant     TEXT    REFERENCES tenants (name),
    -- Comma-separated scope names (`admin,deploy,...`).
    scopes     TEXT    NOT NULL,
    -- Hex SHA-256 of the key; the key itself is never stored.
    hash       TEXT    NOT NULL UNIQUE,
    created_at BIGINT  NOT NULL,
    revoked    BOOLEAN NOT NULL DEFAULT false
);
CREATE INDEX api_keys_tenant ON api_keys (tenant);

CREATE TABLE tenant_limits (
    tenant       TEXT             PRIMARY KEY REFERENCES tenants (name) ON DELETE CASCADE,
    rate_per_sec DOUBLE PRECISION NOT NULL CHECK (rate_per_sec > 0),
    burst        BIGINT           NOT NULL CHECK (burst >= 1)
);

-- Blobs belong to one tenant (see SQLite migration 5). `created_at` is the last upload.
CREATE TABLE blobs (
    tenant     TEXT   NOT NULL REFERENCES tenants (name),
    digest     TEXT   NOT NULL,
    bytes      BYTEA  NOT NULL,
    size       BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, digest)
);
CREATE INDEX blobs_created ON blobs (created_at);

CREATE TABLE functions (
    tenant         TEXT   NOT NULL REFERENCES tenants (name),
    name           TEXT   NOT NULL,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    latest_version BIGINT NOT NULL,
    PRIMARY KEY (tenant, name)
);

CREATE TABLE versions (
    tenant      TEXT   NOT NULL,
    function    TEXT   NOT NULL,
    version     BIGINT NOT NULL,
    blob_digest TEXT   NOT NULL,
    -- serde_json of sluice_core::FunctionConfig (with its secrets member).
    config      TEXT   NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (tenant, function, version),
    FOREIGN KEY (tenant, function) REFERENCES functions (tenant, name) ON DELETE CASCADE,
    FOREIGN KEY (tenant, blob_digest) REFERENCES blobs (tenant, digest)
);
CREATE INDEX versions_blob ON versions (tenant, blob_digest);

-- Invocations outlive the function they ran, so there is no foreign key to `functions`. Sync
-- rows keep NULL in every request and queue column (see SQLite migration 2).
CREATE TABLE invocations (
    id               TEXT   NOT NULL PRIMARY KEY,
    tenant           TEXT   NOT NULL,
    function         TEXT   NOT NULL,
    version          BIGINT NOT NULL,
    mode             TEXT   NOT NULL,
    status           TEXT   NOT NULL,
    attempts         BIGINT NOT NULL,
    created_at       BIGINT NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT,
    status_code      BIGINT,
    error_kind       TEXT,
    request_method   TEXT,
    request_path     TEXT,
    -- JSON array of [name, hex(value)].
    request_headers  TEXT,
    request_body     BYTEA,
    -- 0 high, 1 normal, 2 low: leased in that order.
    criticality      BIGINT NOT NULL DEFAULT 1 CHECK (criticality IN (0, 1, 2)),
    run_after        BIGINT,
    deadline         BIGINT,
    attempts_max     BIGINT NOT NULL DEFAULT 1 CHECK (attempts BETWEEN 0 AND attempts_max),
    max_age_ms       BIGINT,
    max_age_at       BIGINT,
    lease_owner      TEXT,
    lease_expires_at BIGINT,
    idempotency_key  TEXT,
    cpu_us           BIGINT CHECK (cpu_us IS NULL OR cpu_us >= 0)
);
-- `lease` walks this index in lease order (the query repeats its expressions exactly).
CREATE INDEX invocations_runnable
    ON invocations (criticality, COALESCE(deadline, 9223372036854775807), run_after, id)
    WHERE status IN ('queued', 'failed');
CREATE INDEX invocations_pending_deadline ON invocations (deadline)
    WHERE status IN ('queued', 'failed') AND deadline IS NOT NULL;
CREATE INDEX invocations_pending_age ON invocations (max_age_at) WHERE status IN ('queued', 'failed');
CREATE INDEX invocations_leases ON invocations (lease_expires_at) WHERE status = 'running';
CREATE INDEX invocations_finished ON invocations (finished_at)
    WHERE status IN ('succeeded', 'dead', 'expired');
CREATE INDEX invocations_tenant ON invocations (tenant, id);
CREATE INDEX invocations_function ON invocations (tenant, function, id);
CREATE INDEX invocations_pending_version ON invocations (tenant, function, version)
    WHERE status IN ('queued', 'failed', 'running');

-- `seq` orders a function's lines for `logs -f`, which pages with `seq > after_seq`. A sequence
-- hands out numbers at insert, not at commit, so two transactions can commit out of order; the
-- store serializes the log inserts of one function (an advisory lock held to the commit), so that
-- within a function `seq` follows commit order and a tail never skips a line.
CREATE TABLE log_lines (
    seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    invocation_id TEXT   NOT NULL REFERENCES invocations (id) ON DELETE CASCADE,
    tenant        TEXT   NOT NULL,
    function      TEXT   NOT NULL,
    stream        TEXT   NOT NULL,
    line          TEXT   NOT NULL,
    at            BIGINT NOT NULL
);
CREATE INDEX log_lines_function ON log_lines (tenant, function, seq);
CREATE INDEX log_lines_invocation ON log_lines (invocation_id, seq);

CREATE TABLE responses (
    invocation_id TEXT   NOT NULL PRIMARY KEY REFERENCES invocations (id) ON DELETE CASCADE,
    status        BIGINT NOT NULL,
    headers       TEXT   NOT NULL,
    body          BYTEA  NOT NULL
);

CREATE TABLE idempotency_keys (
    tenant          TEXT   NOT NULL,
    function        TEXT   NOT NULL,
    idempotency_key TEXT   NOT NULL,
    invocation_id   TEXT   NOT NULL,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (tenant, function, idempotency_key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

CREATE TABLE nodes (
    id           TEXT   NOT NULL PRIMARY KEY,
    address      TEXT   NOT NULL,
    version      TEXT   NOT NULL,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    stopped_at   BIGINT,
    slots        BIGINT NOT NULL CHECK (slots >= 0),
    in_flight    BIGINT NOT NULL CHECK (in_flight >= 0),
    queue_lag_ms BIGINT NOT NULL CHECK (queue_lag_ms >= 0)
);
CREATE INDEX nodes_heartbeat ON nodes (heartbeat_at);

-- Every node caches keys, limits and functions. A change to them, whichever node makes it (or a
-- person with psql), is announced on `sluice_changes` when it commits; each node listens and
-- reloads what changed. The payload is JSON: {"kind": "keys" | "limits" | "function", ...}.
CREATE FUNCTION sluice_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed RECORD;
BEGIN
    IF TG_OP = 'DELETE' THEN changed := OLD; ELSE changed := NEW; END IF;
    IF TG_TABLE_NAME = 'api_keys' THEN
        PERFORM pg_notify('sluice_changes', '{"kind":"keys"}');
    ELSIF TG_TABLE_NAME = 'tenant_limits' THEN
        PERFORM pg_notify('sluice_changes', '{"kind":"limits"}');
    ELSIF TG_TABLE_NAME = 'functions' THEN
        PERFORM pg_notify('sluice_changes', json_build_object(
            'kind', 'function', 'tenant', changed.tenant, 'function', changed.name)::text);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER api_keys_changed AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION sluice_notify_change();
CREATE TRIGGER tenant_limits_changed AFTER INSERT OR UPDATE OR DELETE ON tenant_limits
    FOR EACH ROW EXECUTE FUNCTION sluice_notify_change();
CREATE TRIGGER functions_changed AFTER INSERT OR UPDATE OR DELETE ON functions
    FOR EACH ROW EXECUTE FUNCTION sluice_notify_change();

-- The queue rewrites its rows several times each (queued, running, finished): dead row versions
-- and dead entries in the lease index pile up at thousands per second. Vacuum and analyze this
-- table far more eagerly than PostgreSQL's defaults (20% of the table) would, so that a lease
-- does not walk a growing run of dead index entries and the planner's row counts keep up with a
-- queue that grows by tens of thousands of rows in seconds.
ALTER TABLE invocations SET (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_analyze_scale_factor = 0.0,
    autovacuum_analyze_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0
);
