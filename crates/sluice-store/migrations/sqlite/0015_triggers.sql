-- Migration 15: broker triggers (issue 23).
-- Never edit a migration that has shipped: append a new numbered file instead.
--
-- A trigger turns each message of a broker (a JetStream stream, an AMQP queue, an MQTT topic)
-- into a durable async invocation of a function. One node at a time consumes a trigger: the one
-- holding its lease (`owner` until `owner_until`), renewed every few seconds; a batch of
-- invocations commits only while its node still holds the lease, and the broker is acked only
-- after that commit. Each invocation's idempotency key is the message's CloudEvents id (the
-- trigger and the message's position in the broker), so a redelivery after a crash stores
-- nothing twice.
CREATE TABLE triggers (
    id           INTEGER PRIMARY KEY,
    tenant       TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    function     TEXT    NOT NULL,
    alias        TEXT    NOT NULL,
    -- The source as JSON ({"kind": "nats", "url": ..., "stream": ..., "subject": ...}), its URL
    -- without credentials.
    source       TEXT    NOT NULL,
    -- `user\npassword`, never shown.
    credentials  TEXT,
    -- The name it consumes under in the broker (JetStream durable consumer, MQTT client id,
    -- AMQP consumer tag): unique to this trigger whatever other installations share the broker.
    consumer     TEXT    NOT NULL,
    request_path TEXT    NOT NULL DEFAULT '/',
    batch_max    INTEGER NOT NULL CHECK (batch_max >= 1),
    window_ms    INTEGER NOT NULL CHECK (window_ms >= 0),
    paused       INTEGER NOT NULL DEFAULT 0 CHECK (paused IN (0, 1)),
    owner        TEXT,
    owner_until  INTEGER NOT NULL DEFAULT 0,
    -- Messages received (committed batches), invocations stored, and redeliveries whose
    -- invocation was stored already.
    received     INTEGER NOT NULL DEFAULT 0,
    enqueued     INTEGER NOT NULL DEFAULT 0,
    duplicates   INTEGER NOT NULL DEFAULT 0,
    -- The broker's count of messages not yet delivered, and acks per second, as the owner last
    -- saw them.
    lag          INTEGER,
    acked_per_s  INTEGER,
    last_error   TEXT,
    last_error_at INTEGER,
    -- Where the last batches were in the broker, for a broker whose positions are not stable
    -- across redeliveries (MQTT packet ids): JSON the consumer reads back after a restart.
    recent       TEXT,
    last_commit_at INTEGER,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    UNIQUE (tenant, name),
    FOREIGN KEY (tenant, function) REFERENCES functions (tenant, name) ON DELETE CASCADE
) STRICT;
CREATE INDEX triggers_function ON triggers (tenant, function);
