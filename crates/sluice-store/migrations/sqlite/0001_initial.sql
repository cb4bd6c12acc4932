-- Migration 1: the initial schema. Applied once, inside a transaction, by `SqliteStore::open`.
-- Never edit a migration that has shipped: append a new numbered file instead.
--
-- Tables are STRICT so that SQLite rejects a value of the wrong type instead of storing it under
-- its usual type affinity rules. Every timestamp is unix milliseconds (INTEGER).

CREATE TABLE tenants (
    name       TEXT    NOT NULL PRIMARY KEY,
    created_at INTEGER NOT NULL
) STRICT;

CREATE TABLE api_keys (
    id         TEXT    NOT NULL PRIMARY KEY,
    -- NULL for admin keys, which belong to no tenant.
    tenant     TEXT    REFERENCES tenants (name),
    -- Comma-separated scope names (`admin,deploy,...`).
    scopes     TEXT    NOT NULL,
    -- Hex SHA-256 of the key; the key itself is never stored.
    hash       TEXT    NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked    INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1))
) STRICT;

CREATE TABLE blobs (
    digest     TEXT    NOT NULL PRIMARY KEY,
    bytes      BLOB    NOT NULL,
    size       INTEGER NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;

CREATE TABLE functions (
    tenant         TEXT    NOT NULL REFERENCES tenants (name),
    name           TEXT    NOT NULL,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    latest_version INTEGER NOT NULL,
    PRIMARY KEY (tenant, name)
) STRICT;

CREATE TABLE versions (
    tenant      TEXT    NOT NULL,
    function    TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    blob_digest TEXT    NOT NULL REFERENCES blobs (digest),
    -- serde_json of sluice_core::FunctionConfig.
    config      TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (tenant, function, version),
    FOREIGN KEY (tenant, function) REFERENCES functions (tenant, name) ON DELETE CASCADE
) STRICT;
-- A foreign key needs an index on the child side, or every blob check scans `versions`.
CREATE INDEX versions_blob ON versions (blob_digest);

-- Invocations outlive the function they ran (history stays readable after a delete), so there
-- is no foreign key to `functions`.
CREATE TABLE invocations (
    id          TEXT    NOT NULL PRIMARY KEY,
    tenant      TEXT    NOT NULL,
    function    TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    mode        TEXT    NOT NULL,
    status      TEXT    NOT NULL,
    attempts    INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    started_at  INTEGER,
    finished_at INTEGER,
    status_code INTEGER,
    error_kind  TEXT
) STRICT;

-- AUTOINCREMENT (not just INTEGER PRIMARY KEY) so that a `seq` is never reused, even after the
-- newest lines are deleted: `logs -f` pages with `seq > after_seq` and must not skip lines.
CREATE TABLE log_lines (
    seq           INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    invocation_id TEXT    NOT NULL REFERENCES invocations (id) ON DELETE CASCADE,
    tenant        TEXT    NOT NULL,
    function      TEXT    NOT NULL,
    stream        TEXT    NOT NULL,
    line          TEXT    NOT NULL,
    at            INTEGER NOT NULL
) STRICT;
CREATE INDEX log_lines_function ON log_lines (tenant, function, seq);
CREATE INDEX log_lines_invocation ON log_lines (invocation_id, seq);
