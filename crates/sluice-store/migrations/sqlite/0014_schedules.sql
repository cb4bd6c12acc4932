-- Migration 14: schedules (issue 23).
-- Never edit a migration that has shipped: append a new numbered file instead.
--
-- A schedule enqueues a durable async invocation of a function at each of its occurrences (a cron
-- expression in a time zone, a fixed interval, or one instant). No node leads: whichever node's
-- ticker finds an occurrence due enqueues it, in the transaction that advances `next_fire_at` and
-- bumps `revision`, fenced by the revision it read; the invocation's idempotency key
-- `sched:{id}:{scheduled_for}` makes a second enqueue of one occurrence a no-op as well.
CREATE TABLE schedules (
    id              INTEGER PRIMARY KEY,
    tenant          TEXT    NOT NULL,
    name            TEXT    NOT NULL,
    function        TEXT    NOT NULL,
    -- The alias the invocation's version is chosen from at each enqueue, as an async HTTP call's.
    alias           TEXT    NOT NULL,
    -- Exactly one of these three says when it fires.
    cron            TEXT,
    tz              TEXT,
    every_ms        INTEGER CHECK (every_ms > 0),
    at              INTEGER,
    -- The invocations' start window (their deadline is the occurrence plus this); 0: none.
    flex_ms         INTEGER NOT NULL DEFAULT 0 CHECK (flex_ms >= 0),
    overlap         TEXT    NOT NULL CHECK (overlap IN ('skip', 'buffer-one', 'allow')),
    catchup         TEXT    NOT NULL CHECK (catchup IN ('latest', 'all', 'none')),
    -- The request each invocation gets: `POST` to this path (below the function, with its query),
    -- these headers (JSON [name, hex(value)]) and this body.
    request_path    TEXT    NOT NULL DEFAULT '/',
    request_headers TEXT    NOT NULL,
    request_body    BLOB    NOT NULL DEFAULT X'',
    paused          INTEGER NOT NULL DEFAULT 0 CHECK (paused IN (0, 1)),
    -- The next occurrence not yet handled; NULL once a one-time schedule has fired.
    next_fire_at    INTEGER,
    -- buffer-one: the occurrence waiting for the previous invocation to finish.
    buffered_for    INTEGER,
    -- The last occurrence enqueued and its invocation (what `skip` and `buffer-one` watch).
    last_fired_for  INTEGER,
    last_invocation TEXT,
    fires           INTEGER NOT NULL DEFAULT 0,
    skipped         INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    -- Bumped by every change: a node's fire commits only if the row is still as it read it.
    revision        INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    CHECK ((cron IS NOT NULL) + (every_ms IS NOT NULL) + (at IS NOT NULL) = 1),
    UNIQUE (tenant, name),
    -- Deleting a function deletes its schedules.
    FOREIGN KEY (tenant, function) REFERENCES functions (tenant, name) ON DELETE CASCADE
) STRICT;
-- The tickers' question: which schedules are due now.
CREATE INDEX schedules_due ON schedules (next_fire_at) WHERE paused = 0 AND next_fire_at IS NOT NULL;
CREATE INDEX schedules_function ON schedules (tenant, function);

ALTER TABLE tenant_usage_limits ADD COLUMN schedules_max INTEGER CHECK (schedules_max >= 0);
