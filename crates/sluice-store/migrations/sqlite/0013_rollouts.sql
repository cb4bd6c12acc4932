-- Migration 13: automatic rollouts (issue 22).
-- Never edit a migration that has shipped: append a new numbered file instead.
--
-- A rollout moves an alias from its stable version to a canary in steps (percent of the alias's
-- calls), judging each step by the two versions' error rates. Its state is here, not in a node, so
-- it survives a restart and any node may advance it: the node that holds `owner` until
-- `owner_until` (unix ms), taken in one UPDATE like an invocation's lease.
CREATE TABLE rollouts (
    id              INTEGER PRIMARY KEY,
    tenant          TEXT    NOT NULL,
    function        TEXT    NOT NULL,
    alias           TEXT    NOT NULL,
    stable_version  INTEGER NOT NULL,
    canary_version  INTEGER NOT NULL,
    -- The canary's percent at each step, comma-separated, rising, the last 100 ("5,25,50,100").
    steps           TEXT    NOT NULL,
    -- Index into `steps` of the step running (or the last one run).
    step            INTEGER NOT NULL,
    every_ms        INTEGER NOT NULL CHECK (every_ms > 0),
    -- Basis points (1% = 100) the canary's error rate may exceed the stable version's by.
    margin_bp       INTEGER NOT NULL CHECK (margin_bp >= 0),
    -- Canary calls a step needs before it is judged.
    min_calls       INTEGER NOT NULL CHECK (min_calls > 0),
    status          TEXT    NOT NULL CHECK (status IN ('running', 'promoted', 'rolled_back', 'cancelled')),
    reason          TEXT,
    owner           TEXT,
    owner_until     INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    FOREIGN KEY (tenant, function) REFERENCES functions (tenant, name) ON DELETE CASCADE
) STRICT;
-- One running rollout per alias: a second start is a unique violation (409).
CREATE UNIQUE INDEX rollouts_running ON rollouts (tenant, function, alias) WHERE status = 'running';
-- `rollout status`: the newest rollout of an alias.
CREATE INDEX rollouts_alias ON rollouts (tenant, function, alias, id);

-- Calls and errors of each version during one step, summed over every node: each node adds what
-- it counted since its last flush, so the node that judges the step sees the whole cluster.
CREATE TABLE rollout_steps (
    rollout        INTEGER NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
    step           INTEGER NOT NULL,
    percent        INTEGER NOT NULL,
    started_at     INTEGER NOT NULL,
    canary_calls   INTEGER NOT NULL DEFAULT 0,
    canary_errors  INTEGER NOT NULL DEFAULT 0,
    stable_calls   INTEGER NOT NULL DEFAULT 0,
    stable_errors  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (rollout, step)
) STRICT;
