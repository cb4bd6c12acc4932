-- Migration 5: blobs belong to a tenant (issue 10).
-- Never edit a migration that has shipped: append a new numbered file instead.
--
-- A global, content-addressed blob table let one tenant learn whether another had uploaded a
-- given component (deploy it by digest and see whether the blob is there). Now a blob is stored
-- per (tenant, digest): the same bytes uploaded by two tenants are two rows, and a version can
-- only name a blob of its own tenant. `created_at` is when the blob was last uploaded: the
-- garbage collector keeps a blob that no version names for a grace period after that, so an
-- upload is not collected before the deploy that follows it.
--
-- Blobs that no version names are not carried over (no tenant can be told for them); the CLI
-- uploads and deploys in one step, so at most an upload in flight across the upgrade is lost,
-- and its deploy answers "upload it first".
--
-- SQLite cannot change a foreign key in place: both tables are rebuilt. Foreign keys stay on (the
-- migration runs inside a transaction, where they cannot be switched off), so the checks are
-- deferred to the commit.
PRAGMA defer_foreign_keys = ON;

CREATE TABLE blobs_v5 (
    tenant     TEXT    NOT NULL REFERENCES tenants (name),
    digest     TEXT    NOT NULL,
    bytes      BLOB    NOT NULL,
    size       INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, digest)
) STRICT;

INSERT INTO blobs_v5 (tenant, digest, bytes, size, created_at)
SELECT used.tenant, b.digest, b.bytes, b.size, b.created_at
FROM blobs b
JOIN (SELECT DISTINCT tenant, blob_digest FROM versions) used ON used.blob_digest = b.digest;

CREATE TABLE versions_v5 (
    tenant      TEXT    NOT NULL,
    function    TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    blob_digest TEXT    NOT NULL,
    -- serde_json of sluice_core::FunctionConfig.
    config      TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (tenant, function, version),
    FOREIGN KEY (tenant, function) REFERENCES functions (tenant, name) ON DELETE CASCADE,
    FOREIGN KEY (tenant, blob_digest) REFERENCES blobs_v5 (tenant, digest)
) STRICT;

INSERT INTO versions_v5 (tenant, function, version, blob_digest, config, created_at)
SELECT tenant, function, version, blob_digest, config, created_at FROM versions;

DROP TABLE versions;
DROP TABLE blobs;
-- Renaming also rewrites the foreign key of versions_v5 to name `blobs`.
ALTER TABLE blobs_v5 RENAME TO blobs;
ALTER TABLE versions_v5 RENAME TO versions;

-- A foreign key needs an index on the child side, or every blob check scans `versions`.
CREATE INDEX versions_blob ON versions (tenant, blob_digest);
-- The collector looks for blobs uploaded before its grace cut-off.
CREATE INDEX blobs_created ON blobs (created_at);
