-- Migration 9 (issue 19): an idempotency key belongs to its caller, and remembers the request it
-- was first used for.
-- Never edit a migration that has shipped: append a new numbered file instead.
--
-- Keys were shared by every caller of a function, and the request was not compared: on a public
-- function anyone who guessed a webhook's next key could send it first with a forged body, and
-- the real webhook became a replay of the forgery. A key is now scoped by `caller` (the API key's
-- id, or `anonymous` for a keyless call to a public function), and a key that comes back with a
-- different method, path and query, or body (`body_sha256`, hex) is refused (422).
--
-- The keys of calls accepted before this migration are dropped, not carried over: who sent them
-- was never recorded, so they cannot be scoped. A retry, after the upgrade, of a call accepted
-- in the 24 h before it runs again (execution is at-least-once anyway); nothing acknowledged is
-- lost, since the invocations themselves stay.
DROP TABLE idempotency_keys;
CREATE TABLE idempotency_keys (
    tenant          TEXT    NOT NULL,
    function        TEXT    NOT NULL,
    caller          TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    invocation_id   TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    request_method  TEXT    NOT NULL,
    request_path    TEXT    NOT NULL,
    body_sha256     TEXT    NOT NULL,
    PRIMARY KEY (tenant, function, caller, idempotency_key)
) STRICT;
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
