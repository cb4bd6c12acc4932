//! The async queue's writer, shared by both stores: every queue write (enqueue, complete, and on
//! SQLite also lease, heartbeat, release, retry_dead, purge, and the writes beside the queue that
//! are frequent or large: sync records, blobs and the node registry's heartbeats) is an [`Op`]
//! sent over a bounded
//! channel to one task that owns one connection. The task takes everything that is waiting (up to
//! [`WRITER_BATCH_OPS_MAX`] ops or [`WRITER_BATCH_BYTES_MAX`] bytes), applies it in a single
//! transaction, and only then answers each op: one commit (one fsync) for the whole batch (group
//! commit). While one batch is being committed the next one accumulates in the channel, so batches
//! grow exactly as fast as load does, without a timer.
//!
//! A batch is applied kind by kind, each kind with a few multi-row statements over JSON arrays (a
//! statement is a round trip, and a batch of 500 enqueues must not cost 500 of them). If any of
//! it fails for a logical reason (a duplicate id, a violated check), the transaction is rolled
//! back and the batch redone with every kind under a savepoint, and a kind that fails op by op,
//! each under its own savepoint, so that one bad op fails alone. A failure of the database itself (disk
//! full, I/O error, lock timeout, lost connection) fails the whole batch: every op gets the error
//! and none is acknowledged.
//!
//! Ops in one batch were all in flight at the same time (a caller waits for its answer before it
//! sends its next op), so applying them in any order is a valid serial order of the calls. The
//! order chosen puts `lease` last, so that a lease sees the invocations enqueued beside it.
//!
//! What is backend-specific — the SQL, how a transaction starts, the ops only one database sends
//! through its writer — is a [`Backend`]; what both run alike is [`Statements`], once. This module
//! must not decide policy: the caller computes every timestamp it passes in, and the transitions
//! are the ones `Store`'s documentation promises.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sluice_core::UnixMs;
use sqlx::{Connection, Executor};
use tokio::sync::{mpsc, oneshot};

use crate::dialect::{Bind, Conn, Dialect, tuples};
use crate::rows::GuestText;

use crate::{
    AttemptResult, Completion, Enqueued, IDEMPOTENCY_WINDOW_MS, Leased, NewInvocation, StoreError,
    StoreResult,
};

/// Ops waiting for the writer. When the channel is full, callers wait for room (backpressure);
/// nothing is dropped.
pub const WRITER_QUEUE_OPS_MAX: usize = 4_096;
/// Most ops in one transaction. Large enough that a batch amortizes its fsync over hundreds of
/// calls, small enough that the first op of a batch is not kept waiting behind a long one.
pub const WRITER_BATCH_OPS_MAX: usize = 512;
/// Most encoded payload (request and response bodies, hex-encoded, plus log lines) in one
/// transaction. An op larger than this still runs, alone.
pub const WRITER_BATCH_BYTES_MAX: usize = 16 * 1024 * 1024;

/// A queue write, encoded by the caller (in the caller's task, so the writer only joins strings).
pub(crate) enum Op {
    Enqueue(EnqueueOp),
    Complete(CompleteOp),
    Release(ReleaseOp),
    Heartbeat(HeartbeatOp),
    RetryDead(RetryDeadOp),
    Purge(PurgeOp),
    RecordWaits(RecordWaitsOp),
    /// SQLite only (PostgreSQL writes these from its pool, beside the writer): a batch of sync
    /// calls' records, a component's bytes, this node's row in the registry. Through the writer,
    /// SQLite has one writer and no second one waiting on its lock (or timing out on it).
    RecordSync(RecordSyncOp),
    PutBlob(PutBlobOp),
    NodeHeartbeat(NodeHeartbeatOp),
    /// SQLite only: a trigger's batch, in the writer's transaction rather than beside it.
    TriggerBatch(TriggerBatchOp),
    Lease(LeaseOp),
}

/// The answer to an [`Op`], one variant per kind.
#[derive(Debug)]
pub(crate) enum Done {
    Enqueued(Enqueued),
    Completed(bool),
    Released,
    /// The leases (id, attempt) the owner no longer holds.
    Heartbeat(Vec<(String, u32)>),
    Retried(bool),
    Purged(u64),
    WaitsRecorded,
    SyncRecorded,
    BlobPut,
    NodeHeartbeat,
    /// What the batch stored; `None` if the lease was not the owner's.
    TriggerBatch(Option<u64>),
    Leased(Vec<Leased>),
    /// What each ask leased, in the asks' order.
    LeasedAsks(Vec<Vec<Leased>>),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Enqueue,
    Complete,
    Release,
    Heartbeat,
    RetryDead,
    Purge,
    RecordWaits,
    RecordSync,
    PutBlob,
    NodeHeartbeat,
    TriggerBatch,
    Lease,
}

impl Kind {
    /// The order in which a batch applies its kinds (see the module documentation).
    const ORDER: [Kind; 12] = [
        Kind::Enqueue,
        Kind::TriggerBatch,
        Kind::Complete,
        Kind::Release,
        Kind::Heartbeat,
        Kind::RetryDead,
        Kind::Purge,
        Kind::RecordWaits,
        Kind::RecordSync,
        Kind::PutBlob,
        Kind::NodeHeartbeat,
        Kind::Lease,
    ];
}

impl Op {
    fn kind(&self) -> Kind {
        match self {
            Op::Enqueue(_) => Kind::Enqueue,
            Op::Complete(_) => Kind::Complete,
            Op::Release(_) => Kind::Release,
            Op::Heartbeat(_) => Kind::Heartbeat,
            Op::RetryDead(_) => Kind::RetryDead,
            Op::Purge(_) => Kind::Purge,
            Op::RecordWaits(_) => Kind::RecordWaits,
            Op::RecordSync(_) => Kind::RecordSync,
            Op::PutBlob(_) => Kind::PutBlob,
            Op::NodeHeartbeat(_) => Kind::NodeHeartbeat,
            Op::TriggerBatch(_) => Kind::TriggerBatch,
            Op::Lease(_) => Kind::Lease,
        }
    }

    /// Roughly what the op adds to the batch's statements, for [`WRITER_BATCH_BYTES_MAX`].
    fn size_bytes(&self) -> usize {
        const SMALL: usize = 256;
        match self {
            Op::Enqueue(op) => op.row.len(),
            Op::Complete(op) => op.row.len() + op.response.as_ref().map_or(0, String::len) + op.logs.len(),
            Op::Release(ReleaseOp { leases, .. }) | Op::Heartbeat(HeartbeatOp { leases, .. }) => {
                SMALL + leases.len()
            }
            Op::RecordWaits(op) => SMALL + op.rows.len(),
            Op::RecordSync(op) => SMALL + op.invocations.len() + op.logs.len(),
            Op::PutBlob(op) => SMALL + op.bytes.len(),
            Op::TriggerBatch(op) => SMALL + op.rows.len(),
            Op::Lease(op) => SMALL * (1 + op.asks.as_ref().map_or(0, Vec::len)),
            Op::RetryDead(_) | Op::Purge(_) | Op::NodeHeartbeat(_) => SMALL,
        }
    }
}

pub(crate) struct EnqueueOp {
    pub id: String,
    /// Whether it runs in its key's order: its key's head is released in the batch.
    pub ordered: bool,
    /// When it was created: a released head is runnable from then.
    pub created_at: UnixMs,
    /// What the request is compared by when its idempotency key is already held; `None` without
    /// a key.
    pub fingerprint: Option<Fingerprint>,
    /// One JSON object, an element of the array the enqueue statements read.
    pub row: String,
}

/// A keyed request's fingerprint, as the IETF Idempotency-Key draft and Stripe compare it: the
/// method, the path with its query, and the SHA-256 of the body (hex).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    pub method: String,
    pub path: String,
    pub body_sha256: String,
}

impl Fingerprint {
    /// What differs between this request and the one the key was first used for.
    fn differs(&self, first: &Fingerprint) -> Vec<&'static str> {
        [
            (self.method != first.method, "method"),
            (self.path != first.path, "path"),
            (self.body_sha256 != first.body_sha256, "body"),
        ]
        .into_iter()
        .filter_map(|(differs, what)| differs.then_some(what))
        .collect()
    }
}

/// Who holds a keyed enqueue's key now: `(position in the array, invocation id, method, path,
/// body SHA-256)`, the fingerprint being that of the request the key was first used for.
pub(crate) type KeyHolder = (i64, String, String, String, String);

pub(crate) struct CompleteOp {
    pub id: String,
    /// When the attempt ended: the next of its key (if it has one) is runnable from then.
    pub now: UnixMs,
    /// The fencing check and the state change, one JSON object.
    pub row: String,
    /// The response to store, one JSON object; `None` deletes an earlier attempt's.
    pub response: Option<String>,
    /// Log lines as comma-separated JSON objects (possibly none).
    pub logs: String,
}

pub(crate) struct ReleaseOp {
    pub owner: String,
    /// A JSON array of `{"id": …, "attempt": …}` objects.
    pub leases: String,
}

pub(crate) struct HeartbeatOp {
    pub owner: String,
    /// A JSON array of `{"id": …, "attempt": …}` objects.
    pub leases: String,
    pub now: UnixMs,
    pub lease_ms: i64,
    pub asked: Vec<(String, u32)>,
}

pub(crate) struct RetryDeadOp {
    pub id: String,
    pub now: UnixMs,
}

pub(crate) struct PurgeOp {
    pub cutoff: UnixMs,
    /// Idempotency keys created at or before this are out of the window.
    pub keys_cutoff: UnixMs,
    pub limit: i64,
}

pub(crate) struct LeaseOp {
    pub owner: String,
    pub now: UnixMs,
    pub lease_ms: i64,
    pub limit: i64,
    /// The scheduler's asks, each with its excluded functions as a JSON array; `None`: one lease
    /// in the queue's global order, up to `limit`.
    pub asks: Option<Vec<(crate::LeaseAsk, String)>>,
    pub promote_ahead_ms: i64,
}

impl LeaseOp {
    pub(crate) fn new(
        owner: &str,
        now: UnixMs,
        lease_ms: u64,
        limit: u32,
        asks: Option<(&[crate::LeaseAsk], u64)>,
    ) -> StoreResult<Self> {
        let (asks, promote_ahead_ms) = match asks {
            None => (None, 0),
            Some((asks, ahead)) => {
                let asks = asks
                    .iter()
                    .map(|a| Ok((a.clone(), encode("excluded functions", &a.exclude)?)))
                    .collect::<StoreResult<Vec<_>>>()?;
                (Some(asks), to_i64("promote_ahead_ms", ahead)?)
            }
        };
        Ok(Self {
            owner: owner.to_owned(),
            now,
            lease_ms: to_i64("lease_ms", lease_ms)?,
            limit: i64::from(limit),
            asks,
            promote_ahead_ms,
        })
    }
}

/// A batch of a trigger's messages, encoded: what [`crate::Triggers::commit_trigger_batch`] commits.
pub struct TriggerBatchOp {
    pub id: i64,
    pub owner: String,
    pub now: UnixMs,
    /// The invocations, as the queue's writer encodes them (a JSON array).
    pub rows: String,
    pub count: i64,
    /// Some invocation runs in its key's order.
    pub ordered: bool,
    pub recent: Option<String>,
}

/// A batch of sync calls' records: two JSON arrays (see [`crate::rows::sync_batch_json`]).
pub(crate) struct RecordSyncOp {
    pub invocations: String,
    pub logs: String,
}

/// A component's bytes, content-addressed within its tenant.
pub(crate) struct PutBlobOp {
    pub tenant: String,
    pub digest: String,
    pub bytes: Vec<u8>,
    pub now: UnixMs,
}

/// This node's row in the registry.
pub(crate) struct NodeHeartbeatOp {
    pub node: crate::NodeRecord,
    pub stopped: bool,
    pub now: UnixMs,
}

/// Why leased attempts waited, as a JSON array of `{id, attempt, waits}`.
pub(crate) struct RecordWaitsOp {
    pub rows: String,
}
/// `(name, hex(value))`: header values are bytes, JSON strings are not.
fn headers_to_json(headers: &[(String, Vec<u8>)]) -> Vec<(&str, String)> {
    headers.iter().map(|(name, value)| (name.as_str(), hex::encode(value))).collect()
}

pub(crate) fn encode(what: &str, value: &impl serde::Serialize) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Other(format!("encoding {what}: {e}")))
}

pub(crate) fn to_i64(what: &str, value: u64) -> StoreResult<i64> {
    i64::try_from(value).map_err(|_| StoreError::Other(format!("{what} {value} is out of range")))
}

impl EnqueueOp {
    pub(crate) fn new(inv: &NewInvocation, created_at: UnixMs) -> StoreResult<Self> {
        #[derive(serde::Serialize)]
        struct Row<'a> {
            id: &'a str,
            tenant: &'a str,
            function: &'a str,
            version: i64,
            method: &'a str,
            path: &'a str,
            headers: Vec<(&'a str, String)>,
            body: String,
            criticality: i64,
            run_after: UnixMs,
            deadline: Option<UnixMs>,
            attempts_max: u32,
            max_age_ms: i64,
            max_age_at: UnixMs,
            idempotency_key: Option<&'a str>,
            caller: Option<&'a str>,
            body_sha256: Option<&'a str>,
            created_at: UnixMs,
            request_bytes: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            order_key: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            order_seq: Option<i64>,
        }
        if inv.attempts_max == 0 {
            return Err(StoreError::Other(format!(
                "invocation {} has attempts_max 0: it could never run",
                inv.id
            )));
        }
        let max_age_ms = to_i64("max_age_ms", inv.max_age_ms)?;
        // Hashed only for a keyed call, here in the caller's task (not the writer's), from the
        // body already in memory.
        let fingerprint = inv.idempotency_key.as_ref().map(|_| Fingerprint {
            method: inv.request.method.clone(),
            path: inv.request.path_and_query.clone(),
            body_sha256: sluice_core::ids::sha256_hex(&inv.request.body),
        });
        let row = Row {
            id: &inv.id,
            tenant: &inv.tenant,
            function: &inv.function,
            version: inv.version,
            method: &inv.request.method,
            path: &inv.request.path_and_query,
            headers: headers_to_json(&inv.request.headers),
            body: hex::encode(&inv.request.body),
            criticality: inv.criticality as i64,
            // An ordered invocation waits until it is its key's head: released in this batch if
            // its key is idle.
            run_after: if inv.in_order.is_some() { crate::HELD } else { inv.run_after },
            deadline: inv.deadline,
            attempts_max: inv.attempts_max,
            max_age_ms,
            max_age_at: created_at.saturating_add(max_age_ms),
            idempotency_key: inv.idempotency_key.as_ref().map(|k| k.key.as_str()),
            caller: inv.idempotency_key.as_ref().map(|k| k.caller.as_str()),
            body_sha256: fingerprint.as_ref().map(|f| f.body_sha256.as_str()),
            created_at,
            request_bytes: inv.request.quota_bytes(),
            order_key: inv.in_order.as_ref().map(|o| o.key.as_str()),
            order_seq: inv.in_order.as_ref().map(|o| o.seq),
        };
        Ok(Self {
            id: inv.id.clone(),
            ordered: inv.in_order.is_some(),
            created_at,
            row: encode("invocation", &row)?,
            fingerprint,
        })
    }
}

#[derive(serde::Serialize)]
struct ResponseRow<'a> {
    invocation_id: &'a str,
    status: u16,
    headers: Vec<(&'a str, String)>,
    body: String,
}

impl CompleteOp {
    pub(crate) fn new(completion: Completion<'_>) -> StoreResult<Self> {
        let Completion { id, owner, attempt, result, logs, cpu_us, now } = completion;
        #[derive(serde::Serialize)]
        struct Row<'a> {
            id: &'a str,
            owner: &'a str,
            attempt: u32,
            succeeded: bool,
            status_code: Option<u16>,
            error_kind: Option<GuestText<'a>>,
            retry_at: Option<UnixMs>,
            cpu_us: u64,
            now: UnixMs,
        }
        #[derive(serde::Serialize)]
        struct LogRow<'a> {
            invocation_id: &'a str,
            stream: &'static str,
            line: GuestText<'a>,
            at: UnixMs,
        }
        let (row, response) = match result {
            AttemptResult::Succeeded { response } => (
                Row {
                    id,
                    owner,
                    attempt,
                    succeeded: true,
                    status_code: Some(response.status),
                    error_kind: None,
                    retry_at: None,
                    cpu_us,
                    now,
                },
                Some(response),
            ),
            AttemptResult::Failed { error_kind, status_code, response, retry_at } => (
                Row {
                    id,
                    owner,
                    attempt,
                    succeeded: false,
                    status_code: *status_code,
                    error_kind: Some(GuestText(error_kind)),
                    retry_at: *retry_at,
                    cpu_us,
                    now,
                },
                response.as_ref(),
            ),
        };
        let response = response
            .map(|r| {
                encode(
                    "response",
                    &ResponseRow {
                        invocation_id: id,
                        status: r.status,
                        headers: headers_to_json(&r.headers),
                        body: hex::encode(&r.body),
                    },
                )
            })
            .transpose()?;
        let logs = logs
            .iter()
            .map(|(stream, line, at)| {
                encode(
                    "log line",
                    &LogRow { invocation_id: id, stream: stream.as_str(), line: GuestText(line), at: *at },
                )
            })
            .collect::<StoreResult<Vec<_>>>()?
            .join(",");
        Ok(Self { id: id.to_owned(), now, row: encode("completion", &row)?, response, logs })
    }
}

/// A JSON array of already-encoded elements.
pub(crate) fn json_array<'a>(elements: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::from("[");
    for element in elements.into_iter().filter(|e| !e.is_empty()) {
        if out.len() > 1 {
            out.push(',');
        }
        out.push_str(element);
    }
    out.push(']');
    out
}

/// `[{"id": …, "attempt": …}, …]`: leases as the heartbeat and release statements read them.
/// `[{id, attempt, waits}]`: the rows [`RecordWaitsOp`] applies.
pub(crate) fn waits_json(waits: &[(String, u32, String)]) -> StoreResult<String> {
    #[derive(serde::Serialize)]
    struct Row<'a> {
        id: &'a str,
        attempt: u32,
        waits: &'a str,
    }
    let rows: Vec<Row<'_>> =
        waits.iter().map(|(id, attempt, waits)| Row { id, attempt: *attempt, waits }).collect();
    encode("waits", &rows)
}

pub(crate) fn leases_json(leases: &[(String, u32)]) -> StoreResult<String> {
    #[derive(serde::Serialize)]
    struct Lease<'a> {
        id: &'a str,
        attempt: u32,
    }
    let leases: Vec<Lease<'_>> = leases.iter().map(|(id, attempt)| Lease { id, attempt: *attempt }).collect();
    encode("leases", &leases)
}

// --- in order per key: the SQL both databases share ---

/// The first held invocation of key `k.key`, in its order.
macro_rules! held_head {
    () => {
        "(SELECT h.id FROM invocations AS h
          WHERE h.order_key = k.key AND h.status IN ('queued', 'failed', 'running')
            AND h.run_after = 9223372036854775807
          ORDER BY h.order_seq, h.id LIMIT 1)"
    };
}

/// Key `k.key` has nothing in flight: no unfinished invocation of it that is not held (running,
/// runnable, or waiting for a retry).
macro_rules! key_idle {
    () => {
        "NOT EXISTS (SELECT 1 FROM invocations AS e
                     WHERE e.order_key = k.key AND e.status IN ('queued', 'failed', 'running')
                       AND e.run_after < 9223372036854775807)"
    };
}

/// Up to `$limit` keys with unfinished invocations after `$after`, in key order: a loose index
/// scan, one seek per key, however many invocations each has.
macro_rules! ordered_keys_after {
    ($after:literal, $limit:literal) => {
        concat!(
            "WITH RECURSIVE keys(key, n) AS (
                 SELECT (SELECT MIN(order_key) FROM invocations
                         WHERE order_key IS NOT NULL AND order_key > ",
            $after,
            "
                           AND status IN ('queued', 'failed', 'running')), 1
                 UNION ALL
                 SELECT (SELECT MIN(order_key) FROM invocations
                         WHERE order_key IS NOT NULL AND order_key > keys.key
                           AND status IN ('queued', 'failed', 'running')), keys.n + 1
                 FROM keys WHERE keys.key IS NOT NULL AND keys.n < ",
            $limit,
            ")
             SELECT key FROM keys WHERE key IS NOT NULL"
        )
    };
}

/// Keys one run of [`release_orphaned_heads`] walks at most: a tenant with a million keys
/// (each an unfinished invocation under its queued quota) costs every run the same.
pub const ORDERED_KEYS_PER_RUN: i64 = 1_000;

/// `[{"order_key": …}, …]`: the keys as [`Backend::RELEASE_HEADS`] reads them.
pub(crate) fn order_keys_json(keys: &[String]) -> StoreResult<String> {
    #[derive(serde::Serialize)]
    struct Key<'a> {
        order_key: &'a str,
    }
    encode("order keys", &keys.iter().map(|k| Key { order_key: k }).collect::<Vec<_>>())
}

/// Releases what sweeps (an expired or dead predecessor) and races between nodes left held: the
/// held heads of up to `limit` keys after `cursor` (`keys_after`, then `release_heads`, at `now`;
/// `None`: the database's clock). Returns where the next run starts: after the last key walked,
/// or from the first key again ("") once the walk came to the end.
pub(crate) async fn release_orphaned_heads<E: Dialect>(
    connection: &mut Conn<E>,
    keys_after: &'static str,
    release_heads: &'static str,
    cursor: &str,
    limit: i64,
    now: Option<UnixMs>,
) -> StoreResult<String>
where
    for<'c> &'c mut Conn<E>: Executor<'c, Database = E::DB>,
    for<'a> &'a str: Bind<E::DB>,
    i64: Bind<E::DB>,
    Option<i64>: Bind<E::DB>,
{
    let found = sqlx::query(keys_after)
        .bind(cursor)
        .bind(limit)
        .fetch_all(&mut *connection)
        .await
        .map_err(E::classify)?;
    let keys: Vec<String> = tuples::<_, (String,)>(found)?.into_iter().map(|(k,)| k).collect();
    if !keys.is_empty() {
        sqlx::query(release_heads)
            .bind(order_keys_json(&keys)?.as_str())
            .bind(now)
            .execute(&mut *connection)
            .await
            .map_err(E::classify)?;
    }
    let full = i64::try_from(keys.len()).is_ok_and(|n| n >= limit);
    Ok(if full { keys.last().cloned().unwrap_or_default() } else { String::new() })
}

pub(crate) use {held_head, key_idle, ordered_keys_after};

// --- the backend ---

/// What the writer needs from a database: a connection, how a transaction starts, the statements
/// of each kind of op, and the ops only one database routes through its writer. The statements
/// whose shape both databases share are run once, by [`Statements`]; each backend gives their SQL,
/// which binds what each constant says.
#[async_trait::async_trait]
pub(crate) trait Backend: Send + Sync + 'static {
    /// The database's errors and types.
    type Engine: Dialect;

    /// Starts the batch's transaction (on SQLite holding the write lock from the start).
    const BEGIN: &'static str;
    /// Claims the idempotency keys of a JSON array (`$1`) of enqueue rows, first come first
    /// served in array order: a key (of a caller) that is free, or whose holder is out of the
    /// window (`$2`), passes to the row's invocation with the row's fingerprint; a key held within
    /// the window stays with its holder.
    const CLAIM_KEYS: &'static str;
    /// Who holds each keyed row's key (of its caller) now, with that holder's fingerprint:
    /// `position, invocation_id, request_method, request_path, body_sha256`.
    const KEY_HOLDERS: &'static str;
    /// Stores a JSON array (`$1`) of responses, replacing earlier attempts'.
    const UPSERT_RESPONSES: &'static str;
    /// Deletes the responses of a JSON array (`$1`) of invocation ids.
    const DELETE_RESPONSES: &'static str;
    /// Gives back the leases of a JSON array (`$2`) of `{id, attempt}` that owner `$1` still holds.
    const RELEASE: &'static str;
    /// Renews the leases of a JSON array (`$3`) of `{id, attempt}` that owner `$2` still holds to
    /// now (`$1`, NULL for the database's clock) + `$4`, never shortening one: `RETURNING id,
    /// attempts` of those it renewed.
    const HEARTBEAT: &'static str;
    /// Re-drives the dead or expired async invocation `$2` from now (`$1`, as for `HEARTBEAT`).
    const RETRY_DEAD: &'static str;
    /// Records why attempts waited: a JSON array (`$1`) of `{id, attempt, waits}`, fenced by
    /// attempt (a later attempt keeps its own).
    const RECORD_WAITS: &'static str;
    /// Deletes up to `$2` finished invocations that finished before `$1` (their logs and
    /// responses go with them: ON DELETE CASCADE).
    const PURGE_FINISHED: &'static str;
    /// Deletes up to `$2` idempotency keys created at or before `$1`.
    const PURGE_KEYS: &'static str;
    /// Releases the head of each key named by a JSON array (`$1`) of objects with an
    /// `order_key` (enqueue rows, or completed invocations' keys) if it is held: `run_after` =
    /// `$2` (NULL for the database's clock).
    const RELEASE_HEADS: &'static str;

    async fn connect(&self) -> StoreResult<Conn<Self::Engine>>;
    /// The caller's `now`, or `None` where the statement must take the database's.
    fn now(&self, caller: UnixMs) -> Option<UnixMs>;
    /// Inserts the rows without a key and those that won theirs; returns how many. A store that
    /// other nodes share also tells them there is work.
    /// `ordered`: some row runs in its key's order (carries `order_key`, `order_seq`).
    async fn insert_queued(
        &self,
        connection: &mut Conn<Self::Engine>,
        rows: &str,
        ordered: bool,
    ) -> StoreResult<u64>;
    /// Records each completion of a JSON array whose lease still holds (status running, same
    /// owner, same attempt: the fencing check); returns the ids it changed, with their order keys.
    async fn complete_fenced(
        &self,
        connection: &mut Conn<Self::Engine>,
        rows: &str,
    ) -> StoreResult<Vec<(String, Option<String>)>>;
    /// Inserts log lines in array order, so that `seq` follows it.
    async fn insert_logs(&self, connection: &mut Conn<Self::Engine>, rows: &str) -> StoreResult<()>;
    /// The ops only this database sends through its writer (and a lease, if it does).
    async fn apply_own(&self, connection: &mut Conn<Self::Engine>, op: &Op) -> StoreResult<Done>;
    /// Tells other nodes that invocations became runnable (where other nodes share the store).
    async fn announce(&self, _connection: &mut Conn<Self::Engine>) -> StoreResult<()> {
        Ok(())
    }
}

/// The writer's statements, run the same way on either database: implemented for every
/// [`Backend`] whose database binds what they bind (both do). The writer's code asks for this
/// trait, so these bounds are checked once per database, where the writer is started.
#[async_trait::async_trait]
pub(crate) trait Statements: Backend {
    async fn close(&self, connection: Conn<Self::Engine>);
    async fn begin(&self, connection: &mut Conn<Self::Engine>) -> StoreResult<()>;
    async fn commit(&self, connection: &mut Conn<Self::Engine>) -> StoreResult<()>;
    /// Runs SQL without parameters: transactions and savepoints.
    async fn execute(&self, connection: &mut Conn<Self::Engine>, sql: &'static str) -> StoreResult<()>;
    /// Runs a statement whose one parameter is a JSON array; returns the rows it changed.
    async fn statement(
        &self,
        connection: &mut Conn<Self::Engine>,
        sql: &'static str,
        rows: &str,
    ) -> StoreResult<u64>;
    async fn claim_keys(&self, connection: &mut Conn<Self::Engine>, rows: &str) -> StoreResult<()>;
    async fn key_holders(
        &self,
        connection: &mut Conn<Self::Engine>,
        rows: &str,
    ) -> StoreResult<Vec<KeyHolder>>;
    /// One op of a rare kind (anything but enqueue and complete): a few per node and second.
    async fn apply_one(&self, connection: &mut Conn<Self::Engine>, op: &Op) -> StoreResult<Done>;
    /// Releases the held heads of the keys a JSON array of `{order_key}` objects names
    /// ([`Backend::RELEASE_HEADS`]); other nodes hear of what it released.
    async fn release_heads(
        &self,
        connection: &mut Conn<Self::Engine>,
        rows: &str,
        now: UnixMs,
    ) -> StoreResult<u64>;
}

#[async_trait::async_trait]
impl<B: Backend> Statements for B
where
    for<'c> &'c mut Conn<B::Engine>: Executor<'c, Database = <B::Engine as Dialect>::DB>,
    for<'a> &'a str: Bind<<B::Engine as Dialect>::DB>,
    i64: Bind<<B::Engine as Dialect>::DB>,
    Option<i64>: Bind<<B::Engine as Dialect>::DB>,
{
    async fn close(&self, connection: Conn<Self::Engine>) {
        let _ = Connection::close(connection).await;
    }

    async fn begin(&self, connection: &mut Conn<Self::Engine>) -> StoreResult<()> {
        self.execute(connection, Self::BEGIN).await
    }

    async fn commit(&self, connection: &mut Conn<Self::Engine>) -> StoreResult<()> {
        self.execute(connection, "COMMIT").await
    }

    async fn execute(&self, connection: &mut Conn<Self::Engine>, sql: &'static str) -> StoreResult<()> {
        sqlx::raw_sql(sql).execute(&mut *connection).await.map_err(Self::Engine::classify)?;
        Ok(())
    }

    async fn statement(
        &self,
        connection: &mut Conn<Self::Engine>,
        sql: &'static str,
        rows: &str,
    ) -> StoreResult<u64> {
        let done =
            sqlx::query(sql).bind(rows).execute(&mut *connection).await.map_err(Self::Engine::classify)?;
        Ok(Self::Engine::rows_affected(&done))
    }

    async fn claim_keys(&self, connection: &mut Conn<Self::Engine>, rows: &str) -> StoreResult<()> {
        sqlx::query(Self::CLAIM_KEYS)
            .bind(rows)
            .bind(IDEMPOTENCY_WINDOW_MS)
            .execute(&mut *connection)
            .await
            .map_err(Self::Engine::classify)?;
        Ok(())
    }

    async fn key_holders(
        &self,
        connection: &mut Conn<Self::Engine>,
        rows: &str,
    ) -> StoreResult<Vec<KeyHolder>> {
        let found = sqlx::query(Self::KEY_HOLDERS)
            .bind(rows)
            .fetch_all(&mut *connection)
            .await
            .map_err(Self::Engine::classify)?;
        tuples(found)
    }

    async fn release_heads(
        &self,
        connection: &mut Conn<Self::Engine>,
        rows: &str,
        now: UnixMs,
    ) -> StoreResult<u64> {
        let done = sqlx::query(Self::RELEASE_HEADS)
            .bind(rows)
            .bind(self.now(now))
            .execute(&mut *connection)
            .await
            .map_err(Self::Engine::classify)?;
        let released = Self::Engine::rows_affected(&done);
        if released > 0 {
            self.announce(connection).await?;
        }
        Ok(released)
    }

    async fn apply_one(&self, connection: &mut Conn<Self::Engine>, op: &Op) -> StoreResult<Done> {
        let classify = Self::Engine::classify;
        match op {
            Op::Enqueue(_) | Op::Complete(_) => {
                unreachable!("the writer applies enqueues and completions in groups")
            }
            // The attempt did not happen: given back, and the other nodes hear of it at once.
            Op::Release(op) => {
                let released = sqlx::query(Self::RELEASE)
                    .bind(op.owner.as_str())
                    .bind(op.leases.as_str())
                    .execute(&mut *connection)
                    .await
                    .map_err(classify)?;
                if Self::Engine::rows_affected(&released) > 0 {
                    self.announce(connection).await?;
                }
                Ok(Done::Released)
            }
            Op::Heartbeat(op) => {
                let held = sqlx::query(Self::HEARTBEAT)
                    .bind(self.now(op.now))
                    .bind(op.owner.as_str())
                    .bind(op.leases.as_str())
                    .bind(op.lease_ms)
                    .fetch_all(&mut *connection)
                    .await
                    .map_err(classify)?;
                let held: HashSet<(String, i64)> = tuples(held)?.into_iter().collect();
                Ok(Done::Heartbeat(
                    op.asked
                        .iter()
                        .filter(|(id, attempt)| !held.contains(&(id.clone(), i64::from(*attempt))))
                        .cloned()
                        .collect(),
                ))
            }
            Op::RetryDead(op) => {
                let changed = sqlx::query(Self::RETRY_DEAD)
                    .bind(self.now(op.now))
                    .bind(op.id.as_str())
                    .execute(&mut *connection)
                    .await
                    .map_err(classify)?;
                if Self::Engine::rows_affected(&changed) == 0 {
                    return Ok(Done::Retried(false));
                }
                // The old response belongs to an attempt of the previous life.
                self.statement(connection, Self::DELETE_RESPONSES, &encode("ids", &[&op.id])?).await?;
                self.announce(connection).await?;
                Ok(Done::Retried(true))
            }
            Op::Purge(op) => {
                let mut deleted = 0;
                for (sql, cutoff) in [(Self::PURGE_FINISHED, op.cutoff), (Self::PURGE_KEYS, op.keys_cutoff)] {
                    let done = sqlx::query(sql)
                        .bind(cutoff)
                        .bind(op.limit)
                        .execute(&mut *connection)
                        .await
                        .map_err(classify)?;
                    deleted += Self::Engine::rows_affected(&done);
                }
                let nodes = sqlx::query(PURGE_NODES)
                    .bind(op.cutoff)
                    .execute(&mut *connection)
                    .await
                    .map_err(classify)?;
                Ok(Done::Purged(deleted + Self::Engine::rows_affected(&nodes)))
            }
            Op::RecordWaits(op) => {
                self.statement(connection, Self::RECORD_WAITS, &op.rows).await?;
                Ok(Done::WaitsRecorded)
            }
            op => self.apply_own(connection, op).await,
        }
    }
}

/// Nodes not heard from since `$1`: each start of a node is a new row, so without this the
/// registry would grow with every restart.
const PURGE_NODES: &str = "DELETE FROM nodes WHERE heartbeat_at < $1";

async fn enqueue_many<B: Statements>(
    backend: &B,
    connection: &mut Conn<B::Engine>,
    ops: &[&EnqueueOp],
) -> StoreResult<Vec<Done>> {
    let rows = json_array(ops.iter().map(|op| op.row.as_str()));
    let keyed = ops.iter().any(|op| op.fingerprint.is_some());
    if keyed {
        backend.claim_keys(connection, &rows).await?;
    }
    let ordered = ops.iter().any(|op| op.ordered);
    let inserted = backend.insert_queued(connection, &rows, ordered).await.map_err(|e| match e {
        StoreError::Conflict(m) => StoreError::Conflict(format!("an invocation with this id exists: {m}")),
        other => other,
    })?;
    if let Some(now) = ops.iter().filter(|op| op.ordered).map(|op| op.created_at).max() {
        backend.release_heads(connection, &rows, now).await?;
    }
    let mut holders: HashMap<usize, (String, Fingerprint)> = HashMap::new();
    if keyed {
        for (position, holder, method, path, body_sha256) in backend.key_holders(connection, &rows).await? {
            let position = usize::try_from(position).expect("positions are array indices");
            holders.insert(position, (holder, Fingerprint { method, path, body_sha256 }));
        }
    }
    let done: Vec<Done> = ops
        .iter()
        .enumerate()
        .map(|(position, op)| match (holders.remove(&position), &op.fingerprint) {
            (Some((holder, first)), Some(this)) if holder != op.id => {
                let differs = this.differs(&first);
                Done::Enqueued(if differs.is_empty() {
                    Enqueued::Existing(holder)
                } else {
                    Enqueued::KeyReused { first: holder, differs }
                })
            }
            _ => Done::Enqueued(Enqueued::Created),
        })
        .collect();
    let created = done.iter().filter(|d| matches!(d, Done::Enqueued(Enqueued::Created))).count();
    if usize::try_from(inserted).ok() != Some(created) {
        return Err(StoreError::Other(format!(
            "enqueue inserted {inserted} rows for {created} new invocations"
        )));
    }
    Ok(done)
}

async fn complete_many<B: Statements>(
    backend: &B,
    connection: &mut Conn<B::Engine>,
    ops: &[&CompleteOp],
) -> StoreResult<Vec<Done>> {
    let mut done: Vec<Option<Done>> = ops.iter().map(|_| None).collect();
    let mut logs = Vec::new();
    // The keys of ordered invocations that finished an attempt: their next may be released.
    let mut keys: Vec<String> = Vec::new();
    // Two completions of one invocation in one batch go in separate rounds, the first first: one
    // multi-row UPDATE cannot tell which of two matching elements it applied.
    let mut pending: Vec<usize> = (0..ops.len()).collect();
    while !pending.is_empty() {
        let mut ids = HashSet::new();
        let (round, later): (Vec<usize>, Vec<usize>) =
            pending.into_iter().partition(|&i| ids.insert(&ops[i].id));
        let rows = json_array(round.iter().map(|&i| ops[i].row.as_str()));
        let mut fenced: HashSet<String> = HashSet::new();
        for (id, key) in backend.complete_fenced(connection, &rows).await? {
            if let Some(key) = key {
                keys.push(key);
            }
            fenced.insert(id);
        }
        let applied: Vec<&CompleteOp> =
            round.iter().map(|&i| ops[i]).filter(|op| fenced.contains(&op.id)).collect();
        let responses = json_array(applied.iter().filter_map(|op| op.response.as_deref()));
        if responses != "[]" {
            backend.statement(connection, B::UPSERT_RESPONSES, &responses).await?;
        }
        let without: Vec<&str> =
            applied.iter().filter(|op| op.response.is_none()).map(|op| op.id.as_str()).collect();
        if !without.is_empty() {
            backend.statement(connection, B::DELETE_RESPONSES, &encode("ids", &without)?).await?;
        }
        logs.extend(applied.iter().map(|op| op.logs.as_str()));
        for i in round {
            done[i] = Some(Done::Completed(fenced.contains(&ops[i].id)));
        }
        pending = later;
    }
    if !keys.is_empty() {
        let now = ops.iter().map(|op| op.now).max().expect("a batch has completions");
        backend.release_heads(connection, &order_keys_json(&keys)?, now).await?;
    }
    // Last, so that a store that must lock to keep `seq` in commit order holds that lock only
    // from here to the commit.
    let logs = json_array(logs);
    if logs != "[]" {
        backend.insert_logs(connection, &logs).await?;
    }
    Ok(done.into_iter().map(|d| d.expect("every completion has a round")).collect())
}

// --- the writer task ---

struct Request {
    op: Op,
    reply: oneshot::Sender<StoreResult<Done>>,
}

enum Message {
    Op(Request),
    /// Finish the batch in hand, close the connection and stop.
    Close(oneshot::Sender<()>),
}

/// The handle every clone of a store shares. The writer stops when the last handle is dropped
/// or [`Writer::close`] is called.
#[derive(Clone)]
pub(crate) struct Writer {
    sender: mpsc::Sender<Message>,
    commits: Arc<AtomicU64>,
    /// The writer task, until someone takes it to watch it.
    task: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

fn closed() -> StoreError {
    StoreError::Unavailable("the store is closed".into())
}

impl Writer {
    /// Opens the writer's own connection (so that a store that cannot write fails at open, not at
    /// its first enqueue) and starts the task on the current tokio runtime.
    pub(crate) async fn start<B: Statements>(backend: B) -> StoreResult<Self> {
        let connection = backend.connect().await?;
        let (sender, receiver) = mpsc::channel(WRITER_QUEUE_OPS_MAX);
        let commits = Arc::new(AtomicU64::new(0));
        let task = Task {
            receiver,
            backend,
            connection: Some(connection),
            commits: commits.clone(),
            carried: None,
            metrics: WriterMetrics::new(),
        };
        let task = tokio::spawn(task.run());
        Ok(Self { sender, commits, task: Arc::new(std::sync::Mutex::new(Some(task))) })
    }

    /// Sends `op` to the writer and waits for its answer, which comes after its batch committed.
    pub(crate) async fn call(&self, op: Op) -> StoreResult<Done> {
        let (reply, answer) = oneshot::channel();
        self.sender.send(Message::Op(Request { op, reply })).await.map_err(|_| closed())?;
        // A dropped reply means the writer stopped (closed) before it applied the op.
        answer.await.map_err(|_| closed())?
    }

    pub(crate) async fn close(&self) {
        let (done, finished) = oneshot::channel();
        if self.sender.send(Message::Close(done)).await.is_ok() {
            // An error here only means another clone closed the writer first.
            let _ = finished.await;
        }
    }

    pub(crate) fn take_task(&self) -> Option<tokio::task::JoinHandle<()>> {
        self.task.lock().expect("writer task lock").take()
    }

    pub(crate) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}

/// The `Store` calls that go through the writer, for both stores.
impl Writer {
    pub(crate) async fn enqueue(&self, inv: &NewInvocation, created_at: UnixMs) -> StoreResult<Enqueued> {
        match self.call(Op::Enqueue(EnqueueOp::new(inv, created_at)?)).await? {
            Done::Enqueued(enqueued) => Ok(enqueued),
            other => unreachable!("the writer answered an enqueue with {other:?}"),
        }
    }

    pub(crate) async fn lease(
        &self,
        owner: &str,
        now: UnixMs,
        lease_ms: u64,
        limit: u32,
    ) -> StoreResult<Vec<Leased>> {
        let op = LeaseOp::new(owner, now, lease_ms, limit, None)?;
        match self.call(Op::Lease(op)).await? {
            Done::Leased(leased) => Ok(leased),
            other => unreachable!("the writer answered a lease with {other:?}"),
        }
    }

    pub(crate) async fn lease_asks(
        &self,
        owner: &str,
        now: UnixMs,
        lease_ms: u64,
        promote_ahead_ms: u64,
        asks: &[crate::LeaseAsk],
    ) -> StoreResult<Vec<Vec<Leased>>> {
        if asks.is_empty() {
            return Ok(Vec::new());
        }
        let op = LeaseOp::new(owner, now, lease_ms, 0, Some((asks, promote_ahead_ms)))?;
        match self.call(Op::Lease(op)).await? {
            Done::LeasedAsks(leased) => Ok(leased),
            other => unreachable!("the writer answered a lease with {other:?}"),
        }
    }

    pub(crate) async fn record_waits(&self, waits: &[(String, u32, String)]) -> StoreResult<()> {
        if waits.is_empty() {
            return Ok(());
        }
        match self.call(Op::RecordWaits(RecordWaitsOp { rows: waits_json(waits)? })).await? {
            Done::WaitsRecorded => Ok(()),
            other => unreachable!("the writer answered record_waits with {other:?}"),
        }
    }

    pub(crate) async fn heartbeat(
        &self,
        owner: &str,
        leases: &[(String, u32)],
        now: UnixMs,
        lease_ms: u64,
    ) -> StoreResult<Vec<(String, u32)>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let op = HeartbeatOp {
            owner: owner.to_owned(),
            leases: leases_json(leases)?,
            now,
            lease_ms: to_i64("lease_ms", lease_ms)?,
            asked: leases.to_vec(),
        };
        match self.call(Op::Heartbeat(op)).await? {
            Done::Heartbeat(not_held) => Ok(not_held),
            other => unreachable!("the writer answered a heartbeat with {other:?}"),
        }
    }

    pub(crate) async fn complete(&self, completion: Completion<'_>) -> StoreResult<bool> {
        let op = CompleteOp::new(completion)?;
        match self.call(Op::Complete(op)).await? {
            Done::Completed(applied) => Ok(applied),
            other => unreachable!("the writer answered a completion with {other:?}"),
        }
    }

    pub(crate) async fn release(&self, owner: &str, leases: &[(String, u32)]) -> StoreResult<()> {
        if leases.is_empty() {
            return Ok(());
        }
        let op = ReleaseOp { owner: owner.to_owned(), leases: leases_json(leases)? };
        match self.call(Op::Release(op)).await? {
            Done::Released => Ok(()),
            other => unreachable!("the writer answered a release with {other:?}"),
        }
    }

    pub(crate) async fn retry_dead(&self, id: &str, now: UnixMs) -> StoreResult<bool> {
        match self.call(Op::RetryDead(RetryDeadOp { id: id.to_owned(), now })).await? {
            Done::Retried(retried) => Ok(retried),
            other => unreachable!("the writer answered a retry with {other:?}"),
        }
    }

    pub(crate) async fn commit_trigger_batch(&self, op: TriggerBatchOp) -> StoreResult<Option<u64>> {
        match self.call(Op::TriggerBatch(op)).await? {
            Done::TriggerBatch(stored) => Ok(stored),
            other => unreachable!("the writer answered a trigger batch with {other:?}"),
        }
    }

    pub(crate) async fn record_sync(&self, invocations: String, logs: String) -> StoreResult<()> {
        match self.call(Op::RecordSync(RecordSyncOp { invocations, logs })).await? {
            Done::SyncRecorded => Ok(()),
            other => unreachable!("the writer answered record_sync with {other:?}"),
        }
    }

    pub(crate) async fn put_blob(
        &self,
        tenant: &str,
        digest: &str,
        bytes: &[u8],
        now: UnixMs,
    ) -> StoreResult<()> {
        let op =
            PutBlobOp { tenant: tenant.to_owned(), digest: digest.to_owned(), bytes: bytes.to_vec(), now };
        match self.call(Op::PutBlob(op)).await? {
            Done::BlobPut => Ok(()),
            other => unreachable!("the writer answered put_blob with {other:?}"),
        }
    }

    pub(crate) async fn node_heartbeat(
        &self,
        node: &crate::NodeRecord,
        stopped: bool,
        now: UnixMs,
    ) -> StoreResult<()> {
        let op = NodeHeartbeatOp { node: node.clone(), stopped, now };
        match self.call(Op::NodeHeartbeat(op)).await? {
            Done::NodeHeartbeat => Ok(()),
            other => unreachable!("the writer answered node_heartbeat with {other:?}"),
        }
    }

    /// Purges finished invocations before `cutoff` and idempotency keys created at or before
    /// `keys_cutoff`.
    pub(crate) async fn purge(&self, cutoff: UnixMs, keys_cutoff: UnixMs, limit: u32) -> StoreResult<u64> {
        match self.call(Op::Purge(PurgeOp { cutoff, keys_cutoff, limit: i64::from(limit) })).await? {
            Done::Purged(deleted) => Ok(deleted),
            other => unreachable!("the writer answered a purge with {other:?}"),
        }
    }
}

struct Task<B: Statements> {
    receiver: mpsc::Receiver<Message>,
    backend: B,
    /// `None` after a failed batch: the next batch reconnects, so a connection left in an
    /// unknown state by an I/O error is never reused.
    connection: Option<Conn<B::Engine>>,
    commits: Arc<AtomicU64>,
    /// An op that did not fit in the previous batch.
    carried: Option<Request>,
    metrics: WriterMetrics,
}

/// The writer's series in `/metrics`.
struct WriterMetrics {
    /// How long a group commit took, from its first statement to its answer.
    commit_seconds: Arc<sluice_core::metrics::Histogram>,
    /// Ops per group commit.
    batch_ops: Arc<sluice_core::metrics::Histogram>,
}

impl WriterMetrics {
    fn new() -> Self {
        Self {
            commit_seconds: sluice_core::metrics::histogram("sluice_store_commit_seconds", &[]),
            batch_ops: sluice_core::metrics::histogram("sluice_store_commit_batch_ops", &[]),
        }
    }
}

impl<B: Statements> Task<B> {
    async fn run(mut self) {
        loop {
            let first = match self.carried.take() {
                Some(request) => Message::Op(request),
                None => match self.receiver.recv().await {
                    Some(message) => message,
                    None => break,
                },
            };
            let mut batch = Vec::new();
            let mut batch_bytes = 0;
            let mut closing = None;
            let mut next = Some(first);
            while let Some(message) = next.take() {
                match message {
                    Message::Close(done) => closing = Some(done),
                    Message::Op(request) => {
                        let size = request.op.size_bytes();
                        if !batch.is_empty() && batch_bytes + size > WRITER_BATCH_BYTES_MAX {
                            self.carried = Some(request);
                            break;
                        }
                        batch_bytes += size;
                        batch.push(request);
                    }
                }
                if closing.is_none() && batch.len() < WRITER_BATCH_OPS_MAX {
                    next = self.receiver.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                self.run_batch(batch).await;
            }
            if let Some(done) = closing {
                // Ops still queued behind the close are dropped with their reply senders: their
                // callers get "the store is closed", and nothing of theirs was written.
                self.receiver.close();
                self.carried = None;
                if let Some(connection) = self.connection.take() {
                    self.backend.close(connection).await;
                }
                let _ = done.send(());
                return;
            }
        }
        if let Some(connection) = self.connection.take() {
            self.backend.close(connection).await;
        }
    }

    async fn run_batch(&mut self, batch: Vec<Request>) {
        let (ops, replies): (Vec<Op>, Vec<_>) = batch.into_iter().map(|r| (r.op, r.reply)).unzip();
        let began = std::time::Instant::now();
        let outcome = match self.connection.as_mut() {
            Some(connection) => apply_batch(&self.backend, connection, &ops).await,
            None => match self.backend.connect().await {
                Ok(connection) => apply_batch(&self.backend, self.connection.insert(connection), &ops).await,
                Err(e) => Err(e),
            },
        };
        match outcome {
            Ok(results) => {
                self.commits.fetch_add(1, Ordering::Relaxed);
                self.metrics.commit_seconds.record_duration(began.elapsed());
                self.metrics.batch_ops.record_count(ops.len() as u64);
                for (reply, result) in replies.into_iter().zip(results) {
                    // The caller may have given up waiting; its op is committed all the same.
                    let _ = reply.send(result);
                }
            }
            Err(error) => {
                tracing::warn!(ops = ops.len(), %error, "queue write batch failed; none of it is acknowledged");
                // Dropping the connection rolls back whatever the batch had begun.
                self.connection = None;
                for reply in replies {
                    let _ = reply.send(Err(same_error(&error)));
                }
            }
        }
    }
}

/// The batch's error, once per op.
fn same_error(error: &StoreError) -> StoreError {
    match error {
        StoreError::NotFound(m) => StoreError::NotFound(m.clone()),
        StoreError::Conflict(m) => StoreError::Conflict(m.clone()),
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        StoreError::Other(m) => StoreError::Other(m.clone()),
    }
}

const SAVEPOINT: &str = "SAVEPOINT queue_group";
const RELEASE_SAVEPOINT: &str = "RELEASE SAVEPOINT queue_group";
/// Undoes everything since the savepoint and ends it. If the database already rolled back the
/// whole transaction (SQLite does on some I/O errors), this fails and so does the batch.
const ROLLBACK_SAVEPOINT: &str = "ROLLBACK TO SAVEPOINT queue_group";

/// Applies `ops` in one transaction. `Ok` holds each op's own result, committed. `Err` means no op
/// is acknowledged: the transaction was rolled back (or, if COMMIT itself failed with an I/O error,
/// its fate is unknown; callers only ever retry what was not acknowledged, never the reverse).
/// On `Err` the caller drops the connection, which rolls back what was begun.
async fn apply_batch<B: Statements>(
    backend: &B,
    connection: &mut Conn<B::Engine>,
    ops: &[Op],
) -> StoreResult<Vec<StoreResult<Done>>> {
    // Fast path: the whole batch without savepoints, which would cost two round trips per kind
    // of op. Almost every batch takes it.
    backend.begin(connection).await?;
    match apply_all(backend, connection, ops).await {
        Ok(done) => {
            backend.commit(connection).await?;
            return Ok(done.into_iter().map(Ok).collect());
        }
        Err(error @ StoreError::Unavailable(_)) => return Err(error),
        Err(error) => {
            tracing::debug!(%error, "a batched queue write failed; redoing the batch kind by kind");
            backend.execute(connection, "ROLLBACK").await?;
        }
    }
    // Slow path: an op failed for a reason of its own (a duplicate id, a violated check). Each
    // kind under a savepoint, and a kind that fails op by op, so that the bad op fails alone.
    backend.begin(connection).await?;
    let mut results: Vec<Option<StoreResult<Done>>> = ops.iter().map(|_| None).collect();
    for kind in Kind::ORDER {
        let group: Vec<usize> = (0..ops.len()).filter(|&i| ops[i].kind() == kind).collect();
        if group.is_empty() {
            continue;
        }
        backend.execute(connection, SAVEPOINT).await?;
        match apply_group(backend, connection, ops, &group).await {
            Ok(done) => {
                backend.execute(connection, RELEASE_SAVEPOINT).await?;
                for (i, done) in group.into_iter().zip(done) {
                    results[i] = Some(Ok(done));
                }
            }
            Err(error @ StoreError::Unavailable(_)) => return Err(error),
            Err(error) if group.len() == 1 => {
                rollback_savepoint(backend, connection).await?;
                results[group[0]] = Some(Err(error));
            }
            Err(error) => {
                tracing::debug!(%error, ?kind, "a batched queue write failed; retrying its ops one by one");
                rollback_savepoint(backend, connection).await?;
                for i in group {
                    backend.execute(connection, SAVEPOINT).await?;
                    match apply_group(backend, connection, ops, &[i]).await {
                        Ok(mut done) => {
                            backend.execute(connection, RELEASE_SAVEPOINT).await?;
                            results[i] = Some(Ok(done.pop().expect("one op, one answer")));
                        }
                        Err(error @ StoreError::Unavailable(_)) => return Err(error),
                        Err(error) => {
                            rollback_savepoint(backend, connection).await?;
                            results[i] = Some(Err(error));
                        }
                    }
                }
            }
        }
    }
    backend.commit(connection).await?;
    Ok(results.into_iter().map(|r| r.expect("every op of the batch has a result")).collect())
}

/// Applies every op, kind by kind in [`Kind::ORDER`], with no savepoint: any error fails it all.
async fn apply_all<B: Statements>(
    backend: &B,
    connection: &mut Conn<B::Engine>,
    ops: &[Op],
) -> StoreResult<Vec<Done>> {
    let mut results: Vec<Option<Done>> = ops.iter().map(|_| None).collect();
    for kind in Kind::ORDER {
        let group: Vec<usize> = (0..ops.len()).filter(|&i| ops[i].kind() == kind).collect();
        if group.is_empty() {
            continue;
        }
        for (i, done) in group.iter().zip(apply_group(backend, connection, ops, &group).await?) {
            results[*i] = Some(done);
        }
    }
    Ok(results.into_iter().map(|r| r.expect("every op of the batch has a result")).collect())
}

async fn rollback_savepoint<B: Statements>(backend: &B, connection: &mut Conn<B::Engine>) -> StoreResult<()> {
    backend.execute(connection, ROLLBACK_SAVEPOINT).await?;
    backend.execute(connection, RELEASE_SAVEPOINT).await
}

/// The ops at `indices`, which are all of the one kind `pick` unwraps.
fn of_kind<'a, T>(ops: &'a [Op], indices: &[usize], pick: fn(&'a Op) -> Option<&'a T>) -> Vec<&'a T> {
    indices.iter().map(|&i| pick(&ops[i]).expect("a group holds one kind of op")).collect()
}

/// Applies the ops at `indices` (all of one kind), returning their answers in the same order.
async fn apply_group<B: Statements>(
    backend: &B,
    connection: &mut Conn<B::Engine>,
    ops: &[Op],
    indices: &[usize],
) -> StoreResult<Vec<Done>> {
    match ops[indices[0]].kind() {
        Kind::Enqueue => {
            let enqueues = of_kind(ops, indices, |op| if let Op::Enqueue(op) = op { Some(op) } else { None });
            enqueue_many(backend, connection, &enqueues).await
        }
        Kind::Complete => {
            let completes =
                of_kind(ops, indices, |op| if let Op::Complete(op) = op { Some(op) } else { None });
            complete_many(backend, connection, &completes).await
        }
        // Rare ops (a few per node and second): one after the other.
        _ => {
            let mut done = Vec::with_capacity(indices.len());
            for &i in indices {
                done.push(backend.apply_one(connection, &ops[i]).await?);
            }
            Ok(done)
        }
    }
}
