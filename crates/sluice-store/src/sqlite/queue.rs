//! The async queue of [`SqliteStore`](super::SqliteStore): its one writer task and its SQL.
//!
//! Every queue write (enqueue, lease, heartbeat, complete, release, retry_dead, purge) is an
//! [`Op`] sent over a bounded channel to one task that owns one connection. The task takes
//! everything that is waiting (up to [`WRITER_BATCH_OPS_MAX`] ops or [`WRITER_BATCH_BYTES_MAX`]
//! bytes), applies it in a single `BEGIN IMMEDIATE` ... `COMMIT`, and only then answers each op:
//! one fsync for the whole batch (group commit). While one batch is being committed the next one
//! accumulates in the channel, so batches grow exactly as fast as load does, without a timer.
//!
//! A batch is applied kind by kind, each kind with a few multi-row statements over JSON arrays
//! (`jsonb_each`: unlike `json_each` it hands each element over as binary JSONB, so the dozen
//! `->>` lookups per row do not each re-parse the element's text — that parsing was a tenth of
//! the node's CPU at 6,000 enqueues/s). A statement is a round trip to the connection's worker
//! thread, and a batch of 500 enqueues must not cost 500 of them. Within the transaction every kind runs under a
//! savepoint; if it fails for a logical reason (a duplicate id, a violated check) the savepoint is
//! rolled back and the kind is redone op by op, each under its own savepoint, so that one bad op
//! fails alone. A failure of the database itself (disk full, I/O error, lock timeout) fails the
//! whole batch: every op gets the error and none is acknowledged.
//!
//! Ops in one batch were all in flight at the same time (a caller waits for its answer before it
//! sends its next op), so applying them in any order is a valid serial order of the calls. The
//! order chosen puts `lease` last, so that a lease sees the invocations enqueued beside it.
//!
//! This module must not decide policy either: the caller computes every timestamp it passes in,
//! and the transitions here are the ones `Store`'s documentation promises.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sluice_core::{LogStream, UnixMs};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteRow};
use sqlx::{ConnectOptions, Connection};
use tokio::sync::{mpsc, oneshot};

use super::{classify, corrupt, get};
use crate::{
    AttemptResult, Criticality, Enqueued, IDEMPOTENCY_WINDOW_MS, Leased, NewInvocation, StoreError,
    StoreResult, StoredRequest, StoredResponse,
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
/// Sorts "no deadline" after every deadline; the same literal is in the lease index (migration 2).
const NO_DEADLINE: i64 = i64::MAX;

/// A queue write, encoded by the caller (in the caller's task, so the writer only joins strings).
pub(super) enum Op {
    Enqueue(EnqueueOp),
    Complete(CompleteOp),
    Release(ReleaseOp),
    Heartbeat(HeartbeatOp),
    RetryDead(RetryDeadOp),
    Purge(PurgeOp),
    Lease(LeaseOp),
}

/// The answer to an [`Op`], one variant per kind.
#[derive(Debug)]
pub(super) enum Done {
    Enqueued(Enqueued),
    Completed(bool),
    Released,
    /// The ids whose lease the owner no longer holds.
    Heartbeat(Vec<String>),
    Retried(bool),
    Purged(u64),
    Leased(Vec<Leased>),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Enqueue,
    Complete,
    Release,
    Heartbeat,
    RetryDead,
    Purge,
    Lease,
}

impl Kind {
    /// The order in which a batch applies its kinds (see the module documentation).
    const ORDER: [Kind; 7] = [
        Kind::Enqueue,
        Kind::Complete,
        Kind::Release,
        Kind::Heartbeat,
        Kind::RetryDead,
        Kind::Purge,
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
            Op::Lease(_) => Kind::Lease,
        }
    }

    /// Roughly what the op adds to the batch's statements, for [`WRITER_BATCH_BYTES_MAX`].
    fn size_bytes(&self) -> usize {
        const SMALL: usize = 256;
        match self {
            Op::Enqueue(op) => op.row.len(),
            Op::Complete(op) => op.row.len() + op.response.as_ref().map_or(0, String::len) + op.logs.len(),
            Op::Release(ReleaseOp { ids, .. }) | Op::Heartbeat(HeartbeatOp { ids, .. }) => SMALL + ids.len(),
            Op::RetryDead(_) | Op::Purge(_) | Op::Lease(_) => SMALL,
        }
    }
}

pub(super) struct EnqueueOp {
    id: String,
    keyed: bool,
    /// One JSON object, an element of the `json_each` array of `INSERT_QUEUED`.
    row: String,
}

pub(super) struct CompleteOp {
    id: String,
    /// The fencing check and the state change, one JSON object.
    row: String,
    /// The response to store, one JSON object; `None` deletes an earlier attempt's.
    response: Option<String>,
    /// Log lines as comma-separated JSON objects (possibly none).
    logs: String,
}

pub(super) struct ReleaseOp {
    pub owner: String,
    /// A JSON array of ids.
    pub ids: String,
}

pub(super) struct HeartbeatOp {
    pub owner: String,
    pub ids: String,
    pub until: UnixMs,
    pub asked: Vec<String>,
}

pub(super) struct RetryDeadOp {
    pub id: String,
    pub now: UnixMs,
}

pub(super) struct PurgeOp {
    pub cutoff: UnixMs,
    /// Idempotency keys created at or before this are out of the window.
    pub keys_cutoff: UnixMs,
    pub limit: i64,
}

pub(super) struct LeaseOp {
    pub owner: String,
    pub now: UnixMs,
    pub until: UnixMs,
    pub limit: i64,
}

/// `(name, hex(value))`: header values are bytes, JSON strings are not.
fn headers_to_json(headers: &[(String, Vec<u8>)]) -> Vec<(&str, String)> {
    headers.iter().map(|(name, value)| (name.as_str(), hex::encode(value))).collect()
}

fn headers_from_json(text: &str) -> StoreResult<Vec<(String, Vec<u8>)>> {
    let pairs: Vec<(String, String)> =
        serde_json::from_str(text).map_err(|e| corrupt(format_args!("stored headers: {e}")))?;
    pairs
        .into_iter()
        .map(|(name, value)| {
            let value = hex::decode(&value).map_err(|e| corrupt(format_args!("header {name}: {e}")))?;
            Ok((name, value))
        })
        .collect()
}

fn encode(what: &str, value: &impl serde::Serialize) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Other(format!("encoding {what}: {e}")))
}

fn to_i64(what: &str, value: u64) -> StoreResult<i64> {
    i64::try_from(value).map_err(|_| StoreError::Other(format!("{what} {value} is out of range")))
}

impl EnqueueOp {
    pub(super) fn new(inv: &NewInvocation, created_at: UnixMs) -> StoreResult<Self> {
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
            created_at: UnixMs,
        }
        if inv.attempts_max == 0 {
            return Err(StoreError::Other(format!(
                "invocation {} has attempts_max 0: it could never run",
                inv.id
            )));
        }
        let max_age_ms = to_i64("max_age_ms", inv.max_age_ms)?;
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
            run_after: inv.run_after,
            deadline: inv.deadline,
            attempts_max: inv.attempts_max,
            max_age_ms,
            max_age_at: created_at.saturating_add(max_age_ms),
            idempotency_key: inv.idempotency_key.as_deref(),
            created_at,
        };
        Ok(Self {
            id: inv.id.clone(),
            keyed: inv.idempotency_key.is_some(),
            row: encode("invocation", &row)?,
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
    pub(super) fn new(
        id: &str,
        owner: &str,
        attempt: u32,
        result: &AttemptResult,
        logs: &[(LogStream, String, UnixMs)],
        cpu_us: u64,
        now: UnixMs,
    ) -> StoreResult<Self> {
        #[derive(serde::Serialize)]
        struct Row<'a> {
            id: &'a str,
            owner: &'a str,
            attempt: u32,
            succeeded: bool,
            status_code: Option<u16>,
            error_kind: Option<&'a str>,
            retry_at: Option<UnixMs>,
            cpu_us: u64,
            now: UnixMs,
        }
        #[derive(serde::Serialize)]
        struct LogRow<'a> {
            invocation_id: &'a str,
            stream: &'static str,
            line: &'a str,
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
                    error_kind: Some(error_kind),
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
                encode("log line", &LogRow { invocation_id: id, stream: stream.as_str(), line, at: *at })
            })
            .collect::<StoreResult<Vec<_>>>()?
            .join(",");
        Ok(Self { id: id.to_owned(), row: encode("completion", &row)?, response, logs })
    }
}

/// A JSON array of already-encoded elements.
fn json_array<'a>(elements: impl IntoIterator<Item = &'a str>) -> String {
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

pub(super) fn ids_json(ids: &[String]) -> StoreResult<String> {
    encode("ids", &ids)
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

/// The handle every clone of the store shares. The writer stops when the last handle is dropped
/// or [`Writer::close`] is called.
#[derive(Clone)]
pub(super) struct Writer {
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
    pub(super) async fn start(options: SqliteConnectOptions) -> StoreResult<Self> {
        let connection = options.connect().await.map_err(classify)?;
        let (sender, receiver) = mpsc::channel(WRITER_QUEUE_OPS_MAX);
        let commits = Arc::new(AtomicU64::new(0));
        let task =
            Task { receiver, options, connection: Some(connection), commits: commits.clone(), carried: None };
        let task = tokio::spawn(task.run());
        Ok(Self { sender, commits, task: Arc::new(std::sync::Mutex::new(Some(task))) })
    }

    /// Sends `op` to the writer and waits for its answer, which comes after its batch committed.
    pub(super) async fn call(&self, op: Op) -> StoreResult<Done> {
        let (reply, answer) = oneshot::channel();
        self.sender.send(Message::Op(Request { op, reply })).await.map_err(|_| closed())?;
        // A dropped reply means the writer stopped (closed) before it applied the op.
        answer.await.map_err(|_| closed())?
    }

    pub(super) async fn close(&self) {
        let (done, finished) = oneshot::channel();
        if self.sender.send(Message::Close(done)).await.is_ok() {
            // An error here only means another clone closed the writer first.
            let _ = finished.await;
        }
    }

    pub(super) fn take_task(&self) -> Option<tokio::task::JoinHandle<()>> {
        self.task.lock().expect("writer task lock").take()
    }

    pub(super) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}

struct Task {
    receiver: mpsc::Receiver<Message>,
    options: SqliteConnectOptions,
    /// `None` after a failed batch: the next batch reconnects, so a connection left in an
    /// unknown state by an I/O error is never reused.
    connection: Option<SqliteConnection>,
    commits: Arc<AtomicU64>,
    /// An op that did not fit in the previous batch.
    carried: Option<Request>,
}

impl Task {
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
                    let _ = connection.close().await;
                }
                let _ = done.send(());
                return;
            }
        }
        if let Some(connection) = self.connection.take() {
            let _ = connection.close().await;
        }
    }

    async fn run_batch(&mut self, batch: Vec<Request>) {
        let (ops, replies): (Vec<Op>, Vec<_>) = batch.into_iter().map(|r| (r.op, r.reply)).unzip();
        let outcome = match self.connection.as_mut() {
            Some(connection) => apply_batch(connection, &ops).await,
            None => match self.options.connect().await {
                Ok(connection) => apply_batch(self.connection.insert(connection), &ops).await,
                Err(e) => Err(classify(e)),
            },
        };
        match outcome {
            Ok(results) => {
                self.commits.fetch_add(1, Ordering::Relaxed);
                for (reply, result) in replies.into_iter().zip(results) {
                    // The caller may have given up waiting; its op is committed all the same.
                    let _ = reply.send(result);
                }
            }
            Err(error) => {
                tracing::warn!(ops = ops.len(), %error, "queue write batch failed; none of it is acknowledged");
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

/// Applies `ops` in one transaction. `Ok` holds each op's own result, committed. `Err` means no op
/// is acknowledged: the transaction was rolled back (or, if COMMIT itself failed with an I/O error,
/// its fate is unknown; callers only ever retry what was not acknowledged, never the reverse).
async fn apply_batch(connection: &mut SqliteConnection, ops: &[Op]) -> StoreResult<Vec<StoreResult<Done>>> {
    let mut tx = connection.begin_with("BEGIN IMMEDIATE").await.map_err(classify)?;
    let mut results: Vec<Option<StoreResult<Done>>> = ops.iter().map(|_| None).collect();
    for kind in Kind::ORDER {
        let group: Vec<usize> = (0..ops.len()).filter(|&i| ops[i].kind() == kind).collect();
        if group.is_empty() {
            continue;
        }
        savepoint(&mut tx).await?;
        match apply_group(&mut tx, ops, &group).await {
            Ok(done) => {
                release_savepoint(&mut tx).await?;
                for (i, done) in group.into_iter().zip(done) {
                    results[i] = Some(Ok(done));
                }
            }
            Err(error @ StoreError::Unavailable(_)) => return Err(error),
            Err(error) if group.len() == 1 => {
                rollback_savepoint(&mut tx).await?;
                results[group[0]] = Some(Err(error));
            }
            Err(error) => {
                tracing::debug!(%error, ?kind, "a batched queue write failed; retrying its ops one by one");
                rollback_savepoint(&mut tx).await?;
                for i in group {
                    savepoint(&mut tx).await?;
                    match apply_group(&mut tx, ops, &[i]).await {
                        Ok(mut done) => {
                            release_savepoint(&mut tx).await?;
                            results[i] = Some(Ok(done.pop().expect("one op, one answer")));
                        }
                        Err(error @ StoreError::Unavailable(_)) => return Err(error),
                        Err(error) => {
                            rollback_savepoint(&mut tx).await?;
                            results[i] = Some(Err(error));
                        }
                    }
                }
            }
        }
    }
    tx.commit().await.map_err(classify)?;
    Ok(results.into_iter().map(|r| r.expect("every op of the batch has a result")).collect())
}

async fn savepoint(connection: &mut SqliteConnection) -> StoreResult<()> {
    sqlx::raw_sql("SAVEPOINT queue_group").execute(connection).await.map_err(classify)?;
    Ok(())
}

async fn release_savepoint(connection: &mut SqliteConnection) -> StoreResult<()> {
    sqlx::raw_sql("RELEASE queue_group").execute(connection).await.map_err(classify)?;
    Ok(())
}

/// Undoes everything since the savepoint and ends it. If SQLite already rolled back the whole
/// transaction (it does on some I/O errors), this fails and so does the batch.
async fn rollback_savepoint(connection: &mut SqliteConnection) -> StoreResult<()> {
    sqlx::raw_sql("ROLLBACK TO queue_group; RELEASE queue_group")
        .execute(connection)
        .await
        .map_err(classify)?;
    Ok(())
}

/// Applies the ops at `indices` (all of one kind), returning their answers in the same order.
async fn apply_group(
    connection: &mut SqliteConnection,
    ops: &[Op],
    indices: &[usize],
) -> StoreResult<Vec<Done>> {
    match ops[indices[0]].kind() {
        Kind::Enqueue => {
            let enqueues: Vec<&EnqueueOp> = indices
                .iter()
                .map(|&i| match &ops[i] {
                    Op::Enqueue(op) => op,
                    _ => unreachable!("a group holds one kind of op"),
                })
                .collect();
            enqueue_many(connection, &enqueues).await
        }
        Kind::Complete => {
            let completes: Vec<&CompleteOp> = indices
                .iter()
                .map(|&i| match &ops[i] {
                    Op::Complete(op) => op,
                    _ => unreachable!("a group holds one kind of op"),
                })
                .collect();
            complete_many(connection, &completes).await
        }
        // Rare ops (a few per node and second): one after the other.
        _ => {
            let mut done = Vec::with_capacity(indices.len());
            for &i in indices {
                done.push(apply_one(connection, &ops[i]).await?);
            }
            Ok(done)
        }
    }
}

async fn apply_one(connection: &mut SqliteConnection, op: &Op) -> StoreResult<Done> {
    match op {
        Op::Enqueue(op) => Ok(enqueue_many(connection, &[op]).await?.remove(0)),
        Op::Complete(op) => Ok(complete_many(connection, &[op]).await?.remove(0)),
        Op::Release(op) => release(connection, op).await,
        Op::Heartbeat(op) => heartbeat(connection, op).await,
        Op::RetryDead(op) => retry_dead(connection, op).await,
        Op::Purge(op) => purge(connection, op).await,
        Op::Lease(op) => lease(connection, op).await,
    }
}

// --- enqueue ---

/// Claims the idempotency keys of a batch, first come first served in array order: a key that is
/// free, or whose holder is out of the window, passes to this invocation; a key held within the
/// window stays with its holder.
const CLAIM_KEYS: &str = "
    INSERT INTO idempotency_keys (tenant, function, idempotency_key, invocation_id, created_at)
    SELECT j.value ->> 'tenant', j.value ->> 'function', j.value ->> 'idempotency_key',
           j.value ->> 'id', j.value ->> 'created_at'
    FROM jsonb_each(?1) AS j
    WHERE j.value ->> 'idempotency_key' IS NOT NULL
    ORDER BY j.key
    ON CONFLICT (tenant, function, idempotency_key) DO UPDATE
        SET invocation_id = excluded.invocation_id, created_at = excluded.created_at
        WHERE idempotency_keys.created_at <= excluded.created_at - ?2";

/// Inserts the invocations without a key and those that won theirs.
const INSERT_QUEUED: &str = "
    INSERT INTO invocations (id, tenant, function, version, mode, status, attempts, created_at,
        request_method, request_path, request_headers, request_body, criticality, run_after,
        deadline, attempts_max, max_age_ms, max_age_at, idempotency_key)
    SELECT j.value ->> 'id', j.value ->> 'tenant', j.value ->> 'function', j.value ->> 'version',
           'async', 'queued', 0, j.value ->> 'created_at',
           j.value ->> 'method', j.value ->> 'path', j.value -> 'headers',
           unhex(j.value ->> 'body'), j.value ->> 'criticality', j.value ->> 'run_after',
           j.value ->> 'deadline', j.value ->> 'attempts_max', j.value ->> 'max_age_ms',
           j.value ->> 'max_age_at', j.value ->> 'idempotency_key'
    FROM jsonb_each(?1) AS j
    WHERE j.value ->> 'idempotency_key' IS NULL
       OR EXISTS (
           SELECT 1 FROM idempotency_keys AS k
           WHERE k.tenant = j.value ->> 'tenant' AND k.function = j.value ->> 'function'
             AND k.idempotency_key = j.value ->> 'idempotency_key'
             AND k.invocation_id = j.value ->> 'id')
    ORDER BY j.key";

/// Who holds each keyed element's key now.
const KEY_HOLDERS: &str = "
    SELECT j.key AS position, k.invocation_id AS invocation_id
    FROM jsonb_each(?1) AS j
    JOIN idempotency_keys AS k
      ON k.tenant = j.value ->> 'tenant' AND k.function = j.value ->> 'function'
     AND k.idempotency_key = j.value ->> 'idempotency_key'";

async fn enqueue_many(connection: &mut SqliteConnection, ops: &[&EnqueueOp]) -> StoreResult<Vec<Done>> {
    let rows = json_array(ops.iter().map(|op| op.row.as_str()));
    let keyed = ops.iter().any(|op| op.keyed);
    if keyed {
        sqlx::query(CLAIM_KEYS)
            .bind(&rows)
            .bind(IDEMPOTENCY_WINDOW_MS)
            .execute(&mut *connection)
            .await
            .map_err(classify)?;
    }
    let inserted = sqlx::query(INSERT_QUEUED)
        .bind(&rows)
        .execute(&mut *connection)
        .await
        .map_err(|e| match classify(e) {
            StoreError::Conflict(m) => {
                StoreError::Conflict(format!("an invocation with this id exists: {m}"))
            }
            other => other,
        })?
        .rows_affected();
    let mut holders: HashMap<usize, String> = HashMap::new();
    if keyed {
        let found =
            sqlx::query(KEY_HOLDERS).bind(&rows).fetch_all(&mut *connection).await.map_err(classify)?;
        for row in &found {
            let position: i64 = get(row, "position")?;
            let position = usize::try_from(position).expect("json_each keys are array indices");
            holders.insert(position, get(row, "invocation_id")?);
        }
    }
    let done: Vec<Done> = ops
        .iter()
        .enumerate()
        .map(|(position, op)| match holders.remove(&position) {
            Some(holder) if holder != op.id => Done::Enqueued(Enqueued::Existing(holder)),
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
    RETURNING id";

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

async fn complete_many(connection: &mut SqliteConnection, ops: &[&CompleteOp]) -> StoreResult<Vec<Done>> {
    let mut done: Vec<Option<Done>> = ops.iter().map(|_| None).collect();
    // Two completions of one invocation in one batch go in separate rounds, the first first: one
    // multi-row UPDATE cannot tell which of two matching elements it applied.
    let mut pending: Vec<usize> = (0..ops.len()).collect();
    while !pending.is_empty() {
        let mut ids = HashSet::new();
        let (round, later): (Vec<usize>, Vec<usize>) =
            pending.into_iter().partition(|&i| ids.insert(&ops[i].id));
        let fenced: HashSet<String> = sqlx::query_scalar(COMPLETE_FENCED)
            .bind(json_array(round.iter().map(|&i| ops[i].row.as_str())))
            .fetch_all(&mut *connection)
            .await
            .map_err(classify)?
            .into_iter()
            .collect();
        let applied: Vec<&CompleteOp> =
            round.iter().map(|&i| ops[i]).filter(|op| fenced.contains(&op.id)).collect();
        let responses = json_array(applied.iter().filter_map(|op| op.response.as_deref()));
        if responses != "[]" {
            sqlx::query(UPSERT_RESPONSES)
                .bind(responses)
                .execute(&mut *connection)
                .await
                .map_err(classify)?;
        }
        let without: Vec<&str> =
            applied.iter().filter(|op| op.response.is_none()).map(|op| op.id.as_str()).collect();
        if !without.is_empty() {
            sqlx::query(DELETE_RESPONSES)
                .bind(encode("ids", &without)?)
                .execute(&mut *connection)
                .await
                .map_err(classify)?;
        }
        let logs = json_array(applied.iter().map(|op| op.logs.as_str()));
        if logs != "[]" {
            sqlx::query(INSERT_LOGS).bind(logs).execute(&mut *connection).await.map_err(classify)?;
        }
        for i in round {
            done[i] = Some(Done::Completed(fenced.contains(&ops[i].id)));
        }
        pending = later;
    }
    Ok(done.into_iter().map(|d| d.expect("every completion has a round")).collect())
}

// --- lease ---

/// Pending rows whose start window closed before they started.
const EXPIRE_PAST_DEADLINE: &str = "
    UPDATE invocations SET status = 'expired', finished_at = ?1, error_kind = 'expired'
    WHERE status IN ('queued', 'failed') AND deadline < ?1";

/// Pending rows that grew too old to start.
const KILL_PAST_MAX_AGE: &str = "
    UPDATE invocations SET status = 'dead', finished_at = ?1, error_kind = 'max_age'
    WHERE status IN ('queued', 'failed') AND max_age_at < ?1";

/// Running rows whose lease expired: their owner died mid-attempt, and the attempt counts. With an
/// attempt left (and young enough) they wait for the lease below like any failed attempt;
/// otherwise they are dead, with the kind of their last failure if they had one.
const RECLAIM_EXPIRED_LEASES: &str = "
    UPDATE invocations SET
        status = CASE
            WHEN max_age_at < ?1 OR attempts >= attempts_max THEN 'dead'
            ELSE 'failed' END,
        error_kind = CASE
            WHEN max_age_at < ?1 THEN 'max_age'
            WHEN attempts >= attempts_max THEN COALESCE(error_kind, 'lease_lost')
            ELSE 'lease_lost' END,
        finished_at = CASE
            WHEN max_age_at < ?1 OR attempts >= attempts_max THEN ?1
            ELSE NULL END,
        lease_owner = NULL,
        lease_expires_at = NULL
    WHERE status = 'running' AND lease_expires_at < ?1";

/// The lease itself: walks `invocations_runnable` in its order (the ORDER BY repeats the index's
/// expressions exactly) and stops after `limit` rows.
const LEASE_RUNNABLE: &str = "
    UPDATE invocations SET
        status = 'running',
        attempts = attempts + 1,
        lease_owner = ?2,
        lease_expires_at = ?3,
        started_at = COALESCE(started_at, ?1)
    WHERE id IN (
        SELECT id FROM invocations
        WHERE status IN ('queued', 'failed') AND run_after <= ?1
        ORDER BY criticality, COALESCE(deadline, 9223372036854775807), run_after, id
        LIMIT ?4)
    RETURNING id, tenant, function, version, request_method, request_path, request_headers,
              request_body, attempts, attempts_max, created_at, max_age_at, criticality,
              deadline, run_after";

/// The statements of one lease, each with its number of parameters and the index it must use
/// (checked by a query-plan test, so that a schema change cannot quietly make `lease` scan).
#[cfg(test)]
pub(super) const LEASE_STATEMENTS: [(&str, usize, &str); 4] = [
    (EXPIRE_PAST_DEADLINE, 1, "invocations_pending_deadline"),
    (KILL_PAST_MAX_AGE, 1, "invocations_pending_age"),
    (RECLAIM_EXPIRED_LEASES, 1, "invocations_leases"),
    (LEASE_RUNNABLE, 4, "invocations_runnable"),
];

fn criticality_from_i64(value: i64) -> StoreResult<Criticality> {
    match value {
        0 => Ok(Criticality::High),
        1 => Ok(Criticality::Normal),
        2 => Ok(Criticality::Low),
        other => Err(corrupt(format_args!("criticality {other}"))),
    }
}

fn u32_column(row: &SqliteRow, column: &str) -> StoreResult<u32> {
    let value: i64 = get(row, column)?;
    u32::try_from(value).map_err(|_| corrupt(format_args!("{column} {value}")))
}

/// A leased row, with the keys it was leased in order of.
fn leased_from_row(row: &SqliteRow) -> StoreResult<((i64, i64, i64, String), Leased)> {
    let id: String = get(row, "id")?;
    let criticality: i64 = get(row, "criticality")?;
    let deadline: Option<UnixMs> = get(row, "deadline")?;
    let run_after: UnixMs = get(row, "run_after")?;
    let created_at: UnixMs = get(row, "created_at")?;
    let max_age_at: UnixMs = get(row, "max_age_at")?;
    let headers: String = get(row, "request_headers")?;
    let leased = Leased {
        id: id.clone(),
        tenant: get(row, "tenant")?,
        function: get(row, "function")?,
        version: get(row, "version")?,
        request: StoredRequest {
            method: get(row, "request_method")?,
            path_and_query: get(row, "request_path")?,
            headers: headers_from_json(&headers)?,
            body: get(row, "request_body")?,
        },
        attempt: u32_column(row, "attempts")?,
        attempts_max: u32_column(row, "attempts_max")?,
        created_at,
        // After a re-drive the age counts from the re-drive: reporting the remaining span this way
        // keeps `created_at + max_age_ms` the instant the store itself uses.
        max_age_ms: u64::try_from(max_age_at.saturating_sub(created_at)).unwrap_or(0),
        criticality: criticality_from_i64(criticality)?,
        deadline,
    };
    let order = (criticality, deadline.unwrap_or(NO_DEADLINE), run_after, id);
    Ok((order, leased))
}

async fn lease(connection: &mut SqliteConnection, op: &LeaseOp) -> StoreResult<Done> {
    for statement in [EXPIRE_PAST_DEADLINE, KILL_PAST_MAX_AGE, RECLAIM_EXPIRED_LEASES] {
        sqlx::query(statement).bind(op.now).execute(&mut *connection).await.map_err(classify)?;
    }
    let found = sqlx::query(LEASE_RUNNABLE)
        .bind(op.now)
        .bind(&op.owner)
        .bind(op.until)
        .bind(op.limit)
        .fetch_all(&mut *connection)
        .await
        .map_err(classify)?;
    // RETURNING yields rows in no promised order: sort them back into lease order.
    let mut leased = found.iter().map(leased_from_row).collect::<StoreResult<Vec<_>>>()?;
    leased.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Done::Leased(leased.into_iter().map(|(_, l)| l).collect()))
}

// --- heartbeat, release, retry_dead, purge ---

/// Never shortens a lease: a late heartbeat must not undo a newer one.
const HEARTBEAT: &str = "
    UPDATE invocations SET lease_expires_at = MAX(lease_expires_at, ?3)
    WHERE status = 'running' AND lease_owner = ?1 AND id IN (SELECT value FROM jsonb_each(?2))
    RETURNING id";

async fn heartbeat(connection: &mut SqliteConnection, op: &HeartbeatOp) -> StoreResult<Done> {
    let held: HashSet<String> = sqlx::query_scalar(HEARTBEAT)
        .bind(&op.owner)
        .bind(&op.ids)
        .bind(op.until)
        .fetch_all(&mut *connection)
        .await
        .map_err(classify)?
        .into_iter()
        .collect();
    Ok(Done::Heartbeat(op.asked.iter().filter(|id| !held.contains(*id)).cloned().collect()))
}

/// The attempt did not happen: it is given back, and a row that never ran has no start time.
const RELEASE: &str = "
    UPDATE invocations SET
        status = 'queued',
        attempts = attempts - 1,
        started_at = CASE WHEN attempts = 1 THEN NULL ELSE started_at END,
        lease_owner = NULL,
        lease_expires_at = NULL
    WHERE status = 'running' AND lease_owner = ?1 AND id IN (SELECT value FROM jsonb_each(?2))";

async fn release(connection: &mut SqliteConnection, op: &ReleaseOp) -> StoreResult<Done> {
    sqlx::query(RELEASE).bind(&op.owner).bind(&op.ids).execute(&mut *connection).await.map_err(classify)?;
    Ok(Done::Released)
}

/// Only async rows: a sync record has no stored request to run again.
const RETRY_DEAD: &str = "
    UPDATE invocations SET
        status = 'queued',
        attempts = 0,
        run_after = ?2,
        deadline = NULL,
        max_age_at = ?2 + max_age_ms,
        error_kind = NULL,
        status_code = NULL,
        started_at = NULL,
        finished_at = NULL,
        lease_owner = NULL,
        lease_expires_at = NULL
    WHERE id = ?1 AND mode = 'async' AND status IN ('dead', 'expired')";

async fn retry_dead(connection: &mut SqliteConnection, op: &RetryDeadOp) -> StoreResult<Done> {
    let changed = sqlx::query(RETRY_DEAD)
        .bind(&op.id)
        .bind(op.now)
        .execute(&mut *connection)
        .await
        .map_err(classify)?
        .rows_affected();
    if changed == 0 {
        return Ok(Done::Retried(false));
    }
    // The old response belongs to an attempt of the previous life.
    sqlx::query("DELETE FROM responses WHERE invocation_id = ?1")
        .bind(&op.id)
        .execute(&mut *connection)
        .await
        .map_err(classify)?;
    Ok(Done::Retried(true))
}

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

async fn purge(connection: &mut SqliteConnection, op: &PurgeOp) -> StoreResult<Done> {
    let invocations = sqlx::query(PURGE_FINISHED)
        .bind(op.cutoff)
        .bind(op.limit)
        .execute(&mut *connection)
        .await
        .map_err(classify)?
        .rows_affected();
    let keys = sqlx::query(PURGE_KEYS)
        .bind(op.keys_cutoff)
        .bind(op.limit)
        .execute(&mut *connection)
        .await
        .map_err(classify)?
        .rows_affected();
    Ok(Done::Purged(invocations + keys))
}

// --- reads (through the pool, not the writer) ---

pub(super) fn response_from_row(row: &SqliteRow) -> StoreResult<StoredResponse> {
    let status: i64 = get(row, "status")?;
    let headers: String = get(row, "headers")?;
    Ok(StoredResponse {
        status: u16::try_from(status).map_err(|_| corrupt(format_args!("status {status}")))?,
        headers: headers_from_json(&headers)?,
        body: get(row, "body")?,
    })
}
