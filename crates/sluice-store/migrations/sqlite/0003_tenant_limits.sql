-- Per-tenant rate limits. A tenant without a row uses the node's default (`serve --tenant-rate`).
CREATE TABLE tenant_limits (
    tenant       TEXT    PRIMARY KEY REFERENCES tenants (name) ON DELETE CASCADE,
    rate_per_sec REAL    NOT NULL CHECK (rate_per_sec > 0),
    burst        INTEGER NOT NULL CHECK (burst >= 1)
) STRICT;
