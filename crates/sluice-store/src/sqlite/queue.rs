//! The SQL of [`SqliteStore`](super::SqliteStore)'s async queue, applied by the shared writer
//! ([`crate::queue`]) on its one connection.
//!
//! Statements read their ops from JSON arrays with `jsonb_each`: unlike `json_each` it hands each
//! element over as binary JSONB, so the dozen `->>` lookups per row do not each re-parse the
//! element's text (that parsing was a tenth of the node's CPU at 6,000 enqueues/s).

use sluice_core::UnixMs;
use sqlx::ConnectOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

use super::{SqliteEngine, classify};
use crate::queue::{
    Backend, Done, LeaseOp, NodeHeartbeatOp, Op, PutBlobOp, RecordSyncOp, Statements, held_head, key_idle,
    ordered_keys_after,
};
use crate::rows::leased_from_row;
use crate::sql::{Engine, require};
use crate::{LeaseClass, StoreError, StoreResult};

/// Rows each sweep of a lease changes at most (expired start windows, rows too old to start, lost
/// leases), as on PostgreSQL: a million rows expiring at once are marked over many leases, each
/// a short transaction, not in one that holds the writer (and every 202 behind it) for seconds.
/// The lease itself passes over rows past their deadline or max age that no sweep has marked yet.
pub const SWEEP_BATCH_MAX: i64 = 1_000;

/// How often a lease also releases the held heads of keys whose predecessor a sweep ended
/// ([`crate::queue::release_orphaned_heads`]), at most. Completions release their successors at
/// once.
pub const ORPHANED_HEADS_INTERVAL_MS: i64 = 1_000;

/// The writer's connection to the database file, opened with the pool's options: its commits must
/// be exactly as durable. And when its leases last released orphaned heads, and the key the next
/// run starts after.
pub(super) struct Sqlite(pub(super) SqliteConnectOptions, pub(super) std::sync::Mutex<(i64, String)>);

#[async_trait::async_trait]
impl Backend for Sqlite {
    type Engine = SqliteEngine;

    /// `IMMEDIATE`: the write lock from the first statement (see the store's module documentation).
    const BEGIN: &'static str = "BEGIN IMMEDIATE";
    const CLAIM_KEYS: &'static str = CLAIM_KEYS;
    const KEY_HOLDERS: &'static str = KEY_HOLDERS;
    const UPSERT_RESPONSES: &'static str = UPSERT_RESPONSES;
    const DELETE_RESPONSES: &'static str = DELETE_RESPONSES;
    const RELEASE: &'static str = RELEASE;
    const HEARTBEAT: &'static str = HEARTBEAT;
    const RETRY_DEAD: &'static str = RETRY_DEAD;
    const RECORD_WAITS: &'static str = RECORD_WAITS;
    const PURGE_FINISHED: &'static str = PURGE_FINISHED;
    const PURGE_KEYS: &'static str = PURGE_KEYS;
    const RELEASE_HEADS: &'static str = RELEASE_HEADS;

    async fn connect(&self) -> StoreResult<SqliteConnection> {
        self.0.connect().await.map_err(classify)
    }

    fn now(&self, caller: UnixMs) -> Option<UnixMs> {
        Some(caller)
    }

    async fn insert_queued(
        &self,
        connection: &mut SqliteConnection,
        rows: &str,
        ordered: bool,
    ) -> StoreResult<u64> {
        self.statement(connection, if ordered { INSERT_QUEUED_ORDERED } else { INSERT_QUEUED }, rows).await
    }

    async fn complete_fenced(
        &self,
        connection: &mut SqliteConnection,
        rows: &str,
    ) -> StoreResult<Vec<(String, Option<String>)>> {
        sqlx::query_as(COMPLETE_FENCED).bind(rows).fetch_all(&mut *connection).await.map_err(classify)
    }

    async fn insert_logs(&self, connection: &mut SqliteConnection, rows: &str) -> StoreResult<()> {
        self.statement(connection, INSERT_LOGS, rows).await.map(drop)
    }

    /// Sync records, blobs and this node's heartbeat go through the writer too: SQLite has one
    /// writer, and a second one would wait on its lock (or time out on it). So do leases.
    async fn apply_own(&self, connection: &mut SqliteConnection, op: &Op) -> StoreResult<Done> {
        match op {
            Op::RecordSync(op) => record_sync(connection, op).await,
            Op::PutBlob(op) => put_blob(connection, op).await,
            Op::NodeHeartbeat(op) => node_heartbeat(connection, op).await,
            Op::TriggerBatch(op) => Ok(Done::TriggerBatch(
                crate::triggers::commit_batch_in::<SqliteEngine>(connection, op).await?,
            )),
            Op::Lease(op) => {
                let cursor = {
                    let mut orphans = self.1.lock().expect("orphaned heads lock");
                    let due =
                        op.now.saturating_sub(orphans.0) >= ORPHANED_HEADS_INTERVAL_MS || op.now < orphans.0;
                    due.then(|| {
                        orphans.0 = op.now;
                        orphans.1.clone()
                    })
                };
                let (done, next) = lease(connection, op, cursor).await?;
                if let Some(next) = next {
                    self.1.lock().expect("orphaned heads lock").1 = next;
                }
                Ok(done)
            }
            _ => unreachable!("the shared writer applies every other op"),
        }
    }
}

// --- enqueue ---

/// Claims the idempotency keys of a batch, first come first served in array order: a caller's key
/// that is free, or whose holder is out of the window, passes to this invocation with its
/// request's fingerprint; a key held within the window stays with its holder.
pub(super) const CLAIM_KEYS: &str = "
    INSERT INTO idempotency_keys (tenant, function, caller, idempotency_key, invocation_id,
        created_at, request_method, request_path, body_sha256)
    SELECT j.value ->> 'tenant', j.value ->> 'function', j.value ->> 'caller',
           j.value ->> 'idempotency_key', j.value ->> 'id', j.value ->> 'created_at',
           j.value ->> 'method', j.value ->> 'path', j.value ->> 'body_sha256'
    FROM jsonb_each(?1) AS j
    WHERE j.value ->> 'idempotency_key' IS NOT NULL
    ORDER BY j.key
    ON CONFLICT (tenant, function, caller, idempotency_key) DO UPDATE
        SET invocation_id = excluded.invocation_id, created_at = excluded.created_at,
            request_method = excluded.request_method, request_path = excluded.request_path,
            body_sha256 = excluded.body_sha256
        WHERE idempotency_keys.created_at <= excluded.created_at - ?2";

/// Inserts the invocations without a key and those that won theirs: the columns every invocation
/// has, and those given (an ordered one's, for [`INSERT_QUEUED_ORDERED`]).
macro_rules! insert_queued {
    ($columns:literal, $values:literal) => {
        concat!(
            "INSERT INTO invocations (id, tenant, function, version, mode, status, attempts, created_at,
                request_method, request_path, request_headers, request_body, criticality, run_after,
                deadline, attempts_max, max_age_ms, max_age_at, idempotency_key, request_bytes",
            $columns,
            ")
            SELECT j.value ->> 'id', j.value ->> 'tenant', j.value ->> 'function', j.value ->> 'version',
                   'async', 'queued', 0, j.value ->> 'created_at',
                   j.value ->> 'method', j.value ->> 'path', j.value -> 'headers',
                   unhex(j.value ->> 'body'), j.value ->> 'criticality', j.value ->> 'run_after',
                   j.value ->> 'deadline', j.value ->> 'attempts_max', j.value ->> 'max_age_ms',
                   j.value ->> 'max_age_at', j.value ->> 'idempotency_key', j.value ->> 'request_bytes'",
            $values,
            "
            FROM jsonb_each(?1) AS j
            WHERE j.value ->> 'idempotency_key' IS NULL
               OR EXISTS (
                   SELECT 1 FROM idempotency_keys AS k
                   WHERE k.tenant = j.value ->> 'tenant' AND k.function = j.value ->> 'function'
                     AND k.caller = j.value ->> 'caller'
                     AND k.idempotency_key = j.value ->> 'idempotency_key'
                     AND k.invocation_id = j.value ->> 'id')
            ORDER BY j.key"
        )
    };
}

/// A batch of invocations none of which runs in order: no lookups of keys its rows lack (a
/// missing key costs a walk of the whole JSONB object, per row).
pub(super) const INSERT_QUEUED: &str = insert_queued!("", "");
/// A batch with invocations that run in their key's order.
pub(super) const INSERT_QUEUED_ORDERED: &str =
    insert_queued!(", order_key, order_seq", ", j.value ->> 'order_key', j.value ->> 'order_seq'");

/// Who holds each keyed element's key now, and the fingerprint it was first used with.
const KEY_HOLDERS: &str = "
    SELECT j.key AS position, k.invocation_id, k.request_method, k.request_path, k.body_sha256
    FROM jsonb_each(?1) AS j
    JOIN idempotency_keys AS k
      ON k.tenant = j.value ->> 'tenant' AND k.function = j.value ->> 'function'
     AND k.caller = j.value ->> 'caller' AND k.idempotency_key = j.value ->> 'idempotency_key'";

// --- in order per key ---

/// Releases, for each key in a JSON array (?1) of objects with an `order_key` that has nothing
/// in flight, its first held invocation: runnable from ?2. Two index seeks per key
/// (`invocations_ordered`), however many wait behind it.
pub(super) const RELEASE_HEADS: &str = concat!(
    "UPDATE invocations SET run_after = ?2
     WHERE run_after = 9223372036854775807 AND status IN ('queued', 'failed') AND id IN (
         SELECT ",
    held_head!(),
    "
         FROM (SELECT DISTINCT j.value ->> 'order_key' AS key FROM jsonb_each(?1) AS j
               WHERE j.value ->> 'order_key' IS NOT NULL) AS k
         WHERE ",
    key_idle!(),
    ")"
);

/// Keys for [`crate::queue::release_orphaned_heads`]: ?2 at most, after ?1.
pub(super) const ORDERED_KEYS_AFTER: &str = ordered_keys_after!("?1", "?2");

// --- complete ---

/// Records each attempt's outcome where its lease still holds (status running, same owner, same
/// attempt: the fencing check); returns the ids it changed. A failure with `retry_at` goes back to
/// the queue only if an attempt is left and the retry would start before the invocation is too
/// old; otherwise it is dead now rather than at some later lease.
const COMPLETE_FENCED: &str = "
    UPDATE invocations SET
        status = c.next_status,
        status_code = c.status_code,
        error_kind = c.error_kind,
        run_after = CASE c.next_status WHEN 'failed' THEN c.retry_at ELSE invocations.run_after END,
        finished_at = CASE c.next_status WHEN 'failed' THEN NULL ELSE c.now END,
        cpu_us = COALESCE(invocations.cpu_us, 0) + c.cpu_us,
        lease_owner = NULL,
        lease_expires_at = NULL
    FROM (
        SELECT i.id AS id,
               j.value ->> 'status_code' AS status_code,
               j.value ->> 'error_kind' AS error_kind,
               j.value ->> 'retry_at' AS retry_at,
               j.value ->> 'now' AS now,
               j.value ->> 'cpu_us' AS cpu_us,
               CASE
                   WHEN j.value ->> 'succeeded' THEN 'succeeded'
                   WHEN j.value ->> 'retry_at' IS NOT NULL
                        AND i.attempts < i.attempts_max
                        AND j.value ->> 'retry_at' <= i.max_age_at THEN 'failed'
                   ELSE 'dead'
               END AS next_status
        FROM jsonb_each(?1) AS j
        JOIN invocations AS i ON i.id = j.value ->> 'id'
        WHERE i.status = 'running'
          AND i.lease_owner = j.value ->> 'owner'
          AND i.attempts = j.value ->> 'attempt'
    ) AS c
    WHERE invocations.id = c.id
    RETURNING id, order_key";

const UPSERT_RESPONSES: &str = "
    INSERT INTO responses (invocation_id, status, headers, body)
    SELECT j.value ->> 'invocation_id', j.value ->> 'status', j.value -> 'headers',
           unhex(j.value ->> 'body')
    FROM jsonb_each(?1) AS j
    WHERE true
    ON CONFLICT (invocation_id) DO UPDATE
        SET status = excluded.status, headers = excluded.headers, body = excluded.body";

const DELETE_RESPONSES: &str =
    "DELETE FROM responses WHERE invocation_id IN (SELECT value FROM jsonb_each(?1))";

/// `ORDER BY j.key` makes `seq` follow the order of the lines.
const INSERT_LOGS: &str = "
    INSERT INTO log_lines (invocation_id, tenant, function, stream, line, at)
    SELECT i.id, i.tenant, i.function, j.value ->> 'stream', j.value ->> 'line', j.value ->> 'at'
    FROM jsonb_each(?1) AS j
    JOIN invocations AS i ON i.id = j.value ->> 'invocation_id'
    ORDER BY j.key";

// --- lease ---

/// Pending rows whose start window closed before they started, at most ?2 of them.
const EXPIRE_PAST_DEADLINE: &str = "
    UPDATE invocations SET status = 'expired', finished_at = ?1, error_kind = 'expired'
    WHERE id IN (SELECT id FROM invocations INDEXED BY invocations_pending_deadline
                 WHERE status IN ('queued', 'failed') AND deadline IS NOT NULL AND deadline < ?1
                 LIMIT ?2)";

/// Pending rows that grew too old to start, at most ?2 of them.
const KILL_PAST_MAX_AGE: &str = "
    UPDATE invocations SET status = 'dead', finished_at = ?1, error_kind = 'max_age'
    WHERE id IN (SELECT id FROM invocations INDEXED BY invocations_pending_age
                 WHERE status IN ('queued', 'failed') AND max_age_at < ?1
                 LIMIT ?2)";

/// Running rows whose lease expired: their owner died mid-attempt, and the attempt counts. Past
/// their deadline they are `expired` (a new attempt would start too late); with an attempt left
/// (and young enough) they wait for the lease below like any failed attempt; otherwise they are
/// dead, with the kind of their last failure if they had one.
const RECLAIM_EXPIRED_LEASES: &str = "
    UPDATE invocations SET
        status = CASE
            WHEN deadline < ?1 THEN 'expired'
            WHEN max_age_at < ?1 OR attempts >= attempts_max THEN 'dead'
            ELSE 'failed' END,
        error_kind = CASE
            WHEN deadline < ?1 THEN 'expired'
            WHEN max_age_at < ?1 THEN 'max_age'
            WHEN attempts >= attempts_max THEN COALESCE(error_kind, 'lease_lost')
            ELSE 'lease_lost' END,
        finished_at = CASE
            WHEN deadline < ?1 OR max_age_at < ?1 OR attempts >= attempts_max THEN ?1
            ELSE NULL END,
        lease_owner = NULL,
        lease_expires_at = NULL
    WHERE id IN (SELECT id FROM invocations INDEXED BY invocations_leases
                 WHERE status = 'running' AND lease_expires_at < ?1
                 LIMIT ?2)";

/// The lease itself (which also records how long each call waited, `queued_ms`; the scheduler
/// adds reasons only where something held the call): walks `invocations_runnable` in its order (the ORDER BY repeats the index's
/// expressions exactly) and stops after `limit` rows. A row past its deadline or max age that the
/// bounded sweeps have not marked yet is passed over: that check is on the update (one row by
/// key), not the walk, so no condition tempts the planner away from the lease's index.
const LEASE_RUNNABLE: &str = "
    UPDATE invocations SET
        status = 'running',
        attempts = attempts + 1,
        lease_owner = ?2,
        lease_expires_at = ?1 + ?3,
        started_at = COALESCE(started_at, ?1),
        waits = '{\"queued_ms\":' || MAX(?1 - run_after, 0) || '}'
    WHERE id IN (
        SELECT id FROM invocations
        WHERE status IN ('queued', 'failed') AND run_after <= ?1
        ORDER BY criticality, COALESCE(deadline, 9223372036854775807), run_after, id
        LIMIT ?4)
      AND (deadline IS NULL OR deadline >= ?1) AND max_age_at >= ?1
    RETURNING id, tenant, function, version, request_method, request_path, request_headers,
              request_body, attempts, attempts_max, created_at, max_age_at, criticality,
              deadline, run_after";

/// The scheduler's asks ([`crate::LeaseAsk`]), one statement per class, each walking the index
/// whose order is its class's: ?1 now, ?2 owner, ?3 lease_ms, ?4 promote_ahead_ms, ?5 tenant,
/// ?6 function or NULL, ?7 excluded functions (a JSON array), ?8 limit.
macro_rules! lease_ask {
    ($index:literal, $class:literal, $order:literal) => {
        concat!(
            "UPDATE invocations SET
                status = 'running',
                attempts = attempts + 1,
                lease_owner = ?2,
                lease_expires_at = ?1 + ?3,
                started_at = COALESCE(started_at, ?1),
                waits = '{\"queued_ms\":' || MAX(?1 - run_after, 0) || '}'
            WHERE id IN (
                SELECT id FROM invocations INDEXED BY ",
            $index,
            "
                WHERE status IN ('queued', 'failed') AND ",
            $class,
            "
                  AND tenant = ?5 AND run_after <= ?1 AND (?6 IS NULL OR function = ?6)
                  AND function NOT IN (SELECT value FROM json_each(?7))
                ORDER BY ",
            $order,
            "
                LIMIT ?8)
              AND (deadline IS NULL OR deadline >= ?1) AND max_age_at >= ?1
            RETURNING id, tenant, function, version, request_method, request_path, request_headers,
                      request_body, attempts, attempts_max, created_at, max_age_at, criticality,
                      deadline, run_after"
        )
    };
}

const LEASE_DUE: &str = lease_ask!(
    "invocations_pending_deadline",
    "deadline IS NOT NULL AND deadline <= ?1 + ?4",
    "deadline, run_after, id"
);
const LEASE_PLAIN: &str =
    lease_ask!("invocations_tenant_plain", "deadline IS NULL", "criticality, run_after, id");
const LEASE_DEFERRABLE: &str = lease_ask!(
    "invocations_tenant_windowed",
    "deadline IS NOT NULL AND deadline > ?1 + ?4",
    "criticality, deadline, run_after, id"
);

pub(in crate::sqlite) fn lease_ask_sql(class: LeaseClass) -> &'static str {
    match class {
        LeaseClass::Due => LEASE_DUE,
        LeaseClass::Plain => LEASE_PLAIN,
        LeaseClass::Deferrable => LEASE_DEFERRABLE,
    }
}

/// The statements of one lease, each with its number of parameters and the index it must use
/// (checked by a query-plan test, so that a schema change cannot quietly make `lease` scan).
#[cfg(test)]
pub(in crate::sqlite) const LEASE_STATEMENTS: [(&str, usize, &str); 4] = [
    (EXPIRE_PAST_DEADLINE, 2, "invocations_pending_deadline"),
    (KILL_PAST_MAX_AGE, 2, "invocations_pending_age"),
    (RECLAIM_EXPIRED_LEASES, 2, "invocations_leases"),
    (LEASE_RUNNABLE, 4, "invocations_runnable"),
];

/// Sweeps; releases the heads the sweeps (or earlier ones) left held, from `orphans` on, if given
/// (and says where the next run starts); and leases.
async fn lease(
    connection: &mut SqliteConnection,
    op: &LeaseOp,
    orphans: Option<String>,
) -> StoreResult<(Done, Option<String>)> {
    for statement in [EXPIRE_PAST_DEADLINE, KILL_PAST_MAX_AGE, RECLAIM_EXPIRED_LEASES] {
        sqlx::query(statement)
            .bind(op.now)
            .bind(SWEEP_BATCH_MAX)
            .execute(&mut *connection)
            .await
            .map_err(classify)?;
    }
    let next = match orphans {
        Some(cursor) => Some(
            crate::queue::release_orphaned_heads::<SqliteEngine>(
                connection,
                ORDERED_KEYS_AFTER,
                RELEASE_HEADS,
                &cursor,
                crate::queue::ORDERED_KEYS_PER_RUN,
                Some(op.now),
            )
            .await?,
        ),
        None => None,
    };
    let Some(asks) = &op.asks else {
        let found = sqlx::query(LEASE_RUNNABLE)
            .bind(op.now)
            .bind(&op.owner)
            .bind(op.lease_ms)
            .bind(op.limit)
            .fetch_all(&mut *connection)
            .await
            .map_err(classify)?;
        return Ok((Done::Leased(in_lease_order(&found)?), next));
    };
    let mut leased = Vec::new();
    for (ask, excluded) in asks {
        if ask.limit == 0 {
            leased.push(Vec::new());
            continue;
        }
        let found = sqlx::query(lease_ask_sql(ask.class))
            .bind(op.now)
            .bind(&op.owner)
            .bind(op.lease_ms)
            .bind(op.promote_ahead_ms)
            .bind(&ask.tenant)
            .bind(ask.function.as_deref())
            .bind(excluded.as_str())
            .bind(i64::from(ask.limit))
            .fetch_all(&mut *connection)
            .await
            .map_err(classify)?;
        leased.push(in_lease_order(&found)?);
    }
    Ok((Done::LeasedAsks(leased), next))
}

/// RETURNING yields rows in no promised order: sorts them back into lease order.
fn in_lease_order(found: &[sqlx::sqlite::SqliteRow]) -> StoreResult<Vec<crate::Leased>> {
    let mut leased = found.iter().map(leased_from_row).collect::<StoreResult<Vec<_>>>()?;
    leased.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(leased.into_iter().map(|(_, l)| l).collect())
}

// --- the writes beside the queue: sync records, blobs, the node registry ---

/// One statement per table for the whole batch: each sqlx statement is a round trip to the
/// connection's worker thread, and a batch of 1000 calls with a few log lines each would otherwise
/// cost thousands of them.
const RECORD_SYNC_INVOCATIONS: &str = "
    INSERT INTO invocations (id, tenant, function, version, mode, status, attempts,
        created_at, started_at, finished_at, status_code, error_kind, cpu_us)
    SELECT value ->> 'id', value ->> 'tenant', value ->> 'function',
           value ->> 'version', 'sync', value ->> 'status', 1,
           value ->> 'started_at', value ->> 'started_at', value ->> 'finished_at',
           value ->> 'status_code', value ->> 'error_kind', value ->> 'cpu_us'
    FROM jsonb_each(?1) ORDER BY key";

/// `ORDER BY key` (the array index) makes `seq` follow the order of the lines.
const RECORD_SYNC_LOGS: &str = "
    INSERT INTO log_lines (invocation_id, tenant, function, stream, line, at)
    SELECT value ->> 'invocation_id', value ->> 'tenant', value ->> 'function',
           value ->> 'stream', value ->> 'line', value ->> 'at'
    FROM jsonb_each(?1) ORDER BY key";

async fn record_sync(connection: &mut SqliteConnection, op: &RecordSyncOp) -> StoreResult<Done> {
    sqlx::query(RECORD_SYNC_INVOCATIONS).bind(&op.invocations).execute(&mut *connection).await.map_err(
        |e| match classify(e) {
            StoreError::Conflict(m) => {
                StoreError::Conflict(format!("an invocation of the batch is already recorded: {m}"))
            }
            other => other,
        },
    )?;
    if op.logs != "[]" {
        sqlx::query(RECORD_SYNC_LOGS).bind(&op.logs).execute(&mut *connection).await.map_err(classify)?;
    }
    Ok(Done::SyncRecorded)
}

/// Content-addressed: the same digest always names the same bytes, so a second put does not
/// rewrite megabytes; it only restarts the grace period of an unnamed blob.
async fn put_blob(connection: &mut SqliteConnection, op: &PutBlobOp) -> StoreResult<Done> {
    let tenant = op.tenant.as_str();
    require::<SqliteEngine>(connection, SqliteEngine::TENANT_EXISTS, &[tenant], || {
        format!("tenant {tenant}")
    })
    .await?;
    let touched = sqlx::query("UPDATE blobs SET created_at = ? WHERE tenant = ? AND digest = ?")
        .bind(op.now)
        .bind(&op.tenant)
        .bind(&op.digest)
        .execute(&mut *connection)
        .await
        .map_err(classify)?;
    if touched.rows_affected() == 0 {
        let size = i64::try_from(op.bytes.len()).expect("a blob in memory fits in i64 bytes");
        sqlx::query("INSERT INTO blobs (tenant, digest, bytes, size, created_at) VALUES (?, ?, ?, ?, ?)")
            .bind(&op.tenant)
            .bind(&op.digest)
            .bind(&op.bytes)
            .bind(size)
            .bind(op.now)
            .execute(&mut *connection)
            .await
            .map_err(classify)?;
    }
    Ok(Done::BlobPut)
}

async fn node_heartbeat(connection: &mut SqliteConnection, op: &NodeHeartbeatOp) -> StoreResult<Done> {
    let node = &op.node;
    sqlx::query(
        "INSERT INTO nodes (id, address, version, started_at, heartbeat_at, stopped_at, slots,
                            in_flight, queue_lag_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, CASE WHEN ?6 THEN ?5 END, ?7, ?8, ?9)
         ON CONFLICT (id) DO UPDATE SET
             address = excluded.address, version = excluded.version,
             heartbeat_at = excluded.heartbeat_at, stopped_at = excluded.stopped_at,
             slots = excluded.slots, in_flight = excluded.in_flight,
             queue_lag_ms = excluded.queue_lag_ms",
    )
    .bind(&node.id)
    .bind(&node.address)
    .bind(&node.version)
    .bind(node.started_at)
    .bind(op.now)
    .bind(op.stopped)
    .bind(i64::from(node.slots))
    .bind(i64::from(node.in_flight))
    .bind(i64::try_from(node.queue_lag_ms).unwrap_or(i64::MAX))
    .execute(&mut *connection)
    .await
    .map_err(classify)?;
    Ok(Done::NodeHeartbeat)
}

/// Fenced by attempt: a later attempt keeps its own reasons.
const RECORD_WAITS: &str = "
    UPDATE invocations SET waits = w.value ->> 'waits'
    FROM (SELECT value FROM jsonb_each(?1)) AS w
    WHERE invocations.id = w.value ->> 'id' AND invocations.attempts = w.value ->> 'attempt'";

// --- heartbeat, release, retry_dead, purge ---

/// Renews the leases the owner still holds for the same attempt (the fencing token): a node that
/// lost a lease and leased the invocation again must not renew the new attempt's lease for the
/// old one. Never shortens a lease: a late heartbeat must not undo a newer one.
const HEARTBEAT: &str = "
    UPDATE invocations SET lease_expires_at = MAX(lease_expires_at, $1 + $4)
    FROM (SELECT j.value ->> 'id' AS id, j.value ->> 'attempt' AS attempt FROM jsonb_each($3) AS j) AS l
    WHERE invocations.id = l.id AND invocations.attempts = l.attempt
      AND invocations.status = 'running' AND invocations.lease_owner = $2
    RETURNING invocations.id, invocations.attempts";

/// The attempt did not happen: it is given back, and a row that never ran has no start time.
const RELEASE: &str = "
    UPDATE invocations SET
        status = 'queued',
        attempts = attempts - 1,
        started_at = CASE WHEN attempts = 1 THEN NULL ELSE started_at END,
        lease_owner = NULL,
        lease_expires_at = NULL
    FROM (SELECT j.value ->> 'id' AS id, j.value ->> 'attempt' AS attempt FROM jsonb_each(?2) AS j) AS l
    WHERE invocations.id = l.id AND invocations.attempts = l.attempt
      AND invocations.status = 'running' AND invocations.lease_owner = ?1";

/// Only async rows: a sync record has no stored request to run again.
const RETRY_DEAD: &str = "
    UPDATE invocations SET
        status = 'queued',
        attempts = 0,
        run_after = $1,
        deadline = NULL,
        max_age_at = $1 + max_age_ms,
        error_kind = NULL,
        status_code = NULL,
        started_at = NULL,
        finished_at = NULL,
        lease_owner = NULL,
        lease_expires_at = NULL
    WHERE id = $2 AND mode = 'async' AND status IN ('dead', 'expired')";

/// Log lines and responses go with their invocation (ON DELETE CASCADE).
const PURGE_FINISHED: &str = "
    DELETE FROM invocations WHERE id IN (
        SELECT id FROM invocations
        WHERE status IN ('succeeded', 'dead', 'expired') AND finished_at < ?1
        ORDER BY finished_at
        LIMIT ?2)";

const PURGE_KEYS: &str = "
    DELETE FROM idempotency_keys WHERE rowid IN (
        SELECT rowid FROM idempotency_keys WHERE created_at <= ?1 ORDER BY created_at LIMIT ?2)";
