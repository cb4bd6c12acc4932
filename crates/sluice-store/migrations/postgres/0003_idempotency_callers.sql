-- Migration 3: idempotency keys scoped by caller, with the request's fingerprint (see SQLite
-- migration 9, which also says why the keys of calls accepted before it are dropped).
DROP TABLE idempotency_keys;
CREATE TABLE idempotency_keys (
    tenant          TEXT   NOT NULL,
    function        TEXT   NOT NULL,
    caller          TEXT   NOT NULL,
    idempotency_key TEXT   NOT NULL,
    invocation_id   TEXT   NOT NULL,
    created_at      BIGINT NOT NULL,
    request_method  TEXT   NOT NULL,
    request_path    TEXT   NOT NULL,
    body_sha256     TEXT   NOT NULL,
    PRIMARY KEY (tenant, function, caller, idempotency_key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
