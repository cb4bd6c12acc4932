-- Migration 9: broker triggers (see SQLite migration 15).
CREATE TABLE triggers (
    id           BIGSERIAL PRIMARY KEY,
    tenant       TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    function     TEXT    NOT NULL,
    alias        TEXT    NOT NULL,
    source       TEXT    NOT NULL,
    credentials  TEXT,
    -- The name it consumes under in the broker (JetStream durable consumer, MQTT client id,
    -- AMQP consumer tag): unique to this trigger whatever other installations share the broker.
    consumer     TEXT    NOT NULL,
    request_path TEXT    NOT NULL DEFAULT '/',
    batch_max    BIGINT  NOT NULL CHECK (batch_max >= 1),
    window_ms    BIGINT  NOT NULL CHECK (window_ms >= 0),
    paused       BIGINT  NOT NULL DEFAULT 0 CHECK (paused IN (0, 1)),
    owner        TEXT,
    owner_until  BIGINT  NOT NULL DEFAULT 0,
    received     BIGINT  NOT NULL DEFAULT 0,
    enqueued     BIGINT  NOT NULL DEFAULT 0,
    duplicates   BIGINT  NOT NULL DEFAULT 0,
    lag          BIGINT,
    acked_per_s  BIGINT,
    last_error   TEXT,
    last_error_at BIGINT,
    -- Where the last batches were in the broker, for a broker whose positions are not stable
    -- across redeliveries (MQTT packet ids): JSON the consumer reads back after a restart.
    recent       TEXT,
    last_commit_at BIGINT,
    created_at   BIGINT  NOT NULL,
    updated_at   BIGINT  NOT NULL,
    UNIQUE (tenant, name),
    FOREIGN KEY (tenant, function) REFERENCES functions (tenant, name) ON DELETE CASCADE
);
CREATE INDEX triggers_function ON triggers (tenant, function);
