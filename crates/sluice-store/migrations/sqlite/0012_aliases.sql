-- Migration 12: aliases (issue 22).
-- Never edit a migration that has shipped: append a new numbered file instead.
--
-- An alias names one or more versions of a function, each with a weight; `/fn/{t}/{f}@name/`
-- calls it and `/fn/{t}/{f}/` calls the alias `latest`, which a deploy moves. One row per
-- (alias, version). A version an alias names is never retired (see `PURGE_VERSIONS`), so its blob
-- and artifact stay and moving an alias back needs no compile; the cascade only runs when the
-- whole function is deleted.
CREATE TABLE aliases (
    tenant     TEXT    NOT NULL,
    function   TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    weight     INTEGER NOT NULL CHECK (weight > 0),
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, function, name, version),
    FOREIGN KEY (tenant, function, version) REFERENCES versions (tenant, function, version)
        ON DELETE CASCADE
) STRICT;
-- The foreign key's child side, and the retirement check's lookup.
CREATE INDEX aliases_version ON aliases (tenant, function, version);

-- Every function's newest version was what `/fn` served: it becomes `latest`.
INSERT INTO aliases (tenant, function, name, version, weight, updated_at)
    SELECT tenant, name, 'latest', latest_version, 100, updated_at FROM functions;

-- A key may be limited to one alias of its tenant's functions: it calls `f@prod/` only, never
-- `f/`, `f@3/` or a pinned version, so a tenant can hand out production access without its test
-- versions. NULL: any alias or version.
ALTER TABLE api_keys ADD COLUMN alias TEXT;
