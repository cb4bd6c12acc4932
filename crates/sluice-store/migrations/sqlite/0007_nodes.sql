-- Migration 7: the node registry (issue 8).
-- Never edit a migration that has shipped: append a new numbered file instead.
--
-- Each node heartbeats a row: who it is, where it answers, how busy it is. On SQLite there is one
-- node, but `GET /v1/nodes` reads the same table on both stores.
CREATE TABLE nodes (
    id           TEXT    NOT NULL PRIMARY KEY,
    address      TEXT    NOT NULL,
    version      TEXT    NOT NULL,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    stopped_at   INTEGER,
    slots        INTEGER NOT NULL CHECK (slots >= 0),
    in_flight    INTEGER NOT NULL CHECK (in_flight >= 0),
    queue_lag_ms INTEGER NOT NULL CHECK (queue_lag_ms >= 0)
) STRICT;
CREATE INDEX nodes_heartbeat ON nodes (heartbeat_at);
