//! Invocations: sync records, the async queue (DESIGN.md section 3) and what the API reads of
//! both ([`Invocations`]). The queue's writes go through the group-committing writer
//! ([`crate::queue`]); its reads and the API's are statements on the pool.

use sluice_core::{Criticality, InvocationStatus, LogStream, UnixMs};
use sqlx::{Executor, QueryBuilder};

use crate::StoreResult;
use crate::queue::to_i64;
use crate::rows::{
    QUEUE_DEPTH, QUEUED_USAGE, demand_from_rows, invocation_from_row, queue_depth_from_rows,
    queued_usage_from_rows, response_from_row, rows, tenant_queue_from_counts,
};
use crate::sql::{Bind, Conn, Engine, SqlStore, Tuple, tuples};

/// A finished synchronous invocation, recorded in batches off the request path. Sync records are
/// not acknowledged data: under pressure they may be dropped (and counted), never block a call.
#[derive(Debug, Clone)]
pub struct SyncRecord {
    pub id: String,
    pub tenant: String,
    pub function: String,
    pub version: i64,
    /// `Succeeded` or `Dead` (a sync call has exactly one attempt).
    pub status: InvocationStatus,
    pub status_code: Option<u16>,
    pub error_kind: Option<String>,
    pub started_at: UnixMs,
    pub finished_at: UnixMs,
    /// Microseconds the call spent on a thread.
    pub cpu_us: u64,
    pub logs: Vec<(LogStream, String, UnixMs)>,
}

/// What `GET /v1/invocations/{id}` shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    pub id: String,
    pub tenant: String,
    pub function: String,
    pub version: i64,
    /// `sync` or `async`.
    pub mode: String,
    pub status: InvocationStatus,
    pub attempts: u32,
    pub created_at: UnixMs,
    pub started_at: Option<UnixMs>,
    pub finished_at: Option<UnixMs>,
    pub status_code: Option<u16>,
    pub error_kind: Option<String>,
    /// Microseconds on a thread, summed over attempts; `None` before any attempt finished (and
    /// for rows recorded before CPU time was).
    pub cpu_us: Option<u64>,
    /// Why its last attempt waited to start, as the scheduler that leased it saw it (a JSON
    /// object of milliseconds by reason); `None` for sync calls and before any lease.
    pub waits: Option<String>,
    /// The `Idempotency-Key` it was enqueued with (a schedule's: `sched:{id}:{scheduled_for}`).
    pub idempotency_key: Option<String>,
}

/// An HTTP request or response as stored for an async invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRequest {
    pub method: String,
    /// Path below the function, with the query: `/sub/path?x=1`.
    pub path_and_query: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl StoredRequest {
    /// What the request weighs against its tenant's queued-bytes quota: the body and every header
    /// name and value. The store keeps this number with the row (`request_bytes`), so the gateway
    /// (at enqueue), the scheduler (at completion) and the store's sums count the same bytes.
    pub fn quota_bytes(&self) -> u64 {
        let headers: usize = self.headers.iter().map(|(name, value)| name.len() + value.len()).sum();
        (self.body.len() + headers) as u64
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

/// How long an idempotency key keeps answering with its first invocation (DESIGN.md section 3):
/// an `enqueue` with the same key, caller, tenant and function within this span of the first
/// one's creation returns [`Enqueued::Existing`] (or [`Enqueued::KeyReused`] for a different
/// request).
pub const IDEMPOTENCY_WINDOW_MS: UnixMs = 24 * 60 * 60 * 1000;

/// The caller of a call that carries no API key (a public function's), for [`IdempotencyKey`].
/// Key ids never take this form.
pub const ANONYMOUS_CALLER: &str = "anonymous";

/// An `Idempotency-Key` and who sent it. Keys are scoped by caller: two callers using the same
/// key get two invocations, so no caller can make another's call a replay of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    pub key: String,
    /// The API key's id, or [`ANONYMOUS_CALLER`].
    pub caller: String,
}

/// An async invocation to enqueue.
#[derive(Debug, Clone)]
pub struct NewInvocation {
    pub id: String,
    pub tenant: String,
    pub function: String,
    pub version: i64,
    pub request: StoredRequest,
    /// Same key + caller + tenant + function within the idempotency window returns the first
    /// invocation if the request is the same (method, path and query, body), and is refused if
    /// it is not.
    pub idempotency_key: Option<IdempotencyKey>,
    pub criticality: Criticality,
    /// Not leased before this time (`sluice-start-after`, or now).
    pub run_after: UnixMs,
    /// Not started by this time: `expired` (`sluice-deadline`).
    pub deadline: Option<UnixMs>,
    pub attempts_max: u32,
    /// After `created_at + max_age_ms` a failed attempt is not retried: `dead`.
    pub max_age_ms: u64,
    /// Runs only after every earlier invocation of the same key has finished (one in flight per
    /// key, retries included); `None`: whenever the scheduler likes.
    pub in_order: Option<InOrder>,
}

/// Where an invocation stands in its key's order: it runs after every unfinished invocation with
/// the same `key` and a smaller `seq` (then id) has finished, succeeded or not. Until then it is
/// stored with `run_after` [`HELD`], and released (`run_after` = now) when it becomes the key's
/// head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InOrder {
    pub key: String,
    pub seq: i64,
}

/// The `run_after` of an ordered invocation waiting for the one before it: no lease reaches it.
pub const HELD: UnixMs = i64::MAX;

/// What `enqueue` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    /// Durably stored (committed) under the new id.
    Created,
    /// The idempotency key was seen within the window, for the same request: the first
    /// invocation's id. Nothing stored.
    Existing(String),
    /// The idempotency key was seen within the window for a different request: nothing stored.
    /// `differs` names what differed (`method`, `path`, `body`), in that order.
    KeyReused { first: String, differs: Vec<&'static str> },
}

/// A leased invocation: the scheduler runs it and reports back with `lease_owner` + `attempt`.
#[derive(Debug, Clone, PartialEq)]
pub struct Leased {
    pub id: String,
    pub tenant: String,
    pub function: String,
    pub version: i64,
    pub request: StoredRequest,
    /// 1 for the first attempt; the fencing token of this lease.
    pub attempt: u32,
    pub attempts_max: u32,
    pub created_at: UnixMs,
    /// `created_at + max_age_ms` is when the invocation becomes too old to start again. After a
    /// re-drive ([`Invocations::retry_dead`]) the age counts from the re-drive, so this is longer than
    /// the `max_age_ms` it was enqueued with.
    pub max_age_ms: u64,
    pub criticality: Criticality,
    pub deadline: Option<UnixMs>,
    /// When it became runnable (enqueued, or its retry was due): how long it waited is the
    /// queue's lag.
    pub run_after: UnixMs,
}

/// Which of a tenant's runnable invocations a [`LeaseAsk`] takes: the scheduler's classes
/// (DESIGN.md section 4). "Due" is relative to the ask's `promote_ahead_ms`: a call whose
/// deadline is within it must start now, whatever the node's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LeaseClass {
    /// With a deadline within `now + promote_ahead_ms`: earliest deadline first.
    Due,
    /// Without a deadline: criticality, then `run_after`.
    Plain,
    /// With a deadline beyond `now + promote_ahead_ms` (a wide start window, so it can wait for a
    /// trough): criticality, then deadline.
    Deferrable,
}

impl LeaseClass {
    pub const ALL: [LeaseClass; 3] = [LeaseClass::Due, LeaseClass::Plain, LeaseClass::Deferrable];

    pub fn as_str(self) -> &'static str {
        match self {
            LeaseClass::Due => "due",
            LeaseClass::Plain => "plain",
            LeaseClass::Deferrable => "deferrable",
        }
    }
}

/// Part of a lease: up to `limit` runnable invocations of one tenant (and function), of one class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseAsk {
    pub tenant: String,
    /// Only this function's invocations; `None`: any of the tenant's.
    pub function: Option<String>,
    /// Functions whose invocations are not taken (their downstream is saturated).
    pub exclude: Vec<String>,
    pub class: LeaseClass,
    pub limit: u32,
}

/// How much runnable work a tenant has, per class, each count capped at the `cap` asked for (the
/// scheduler needs to know "at least this much", and a count must not cost a scan of the queue).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantDemand {
    pub tenant: String,
    pub due: u32,
    pub plain: u32,
    pub deferrable: u32,
}

/// What the scheduler plans a round with: every tenant's runnable work, and what runs now in the
/// whole cluster, by `(tenant, function)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueDemand {
    /// Tenants with any runnable work, by name.
    pub tenants: Vec<TenantDemand>,
    /// `(tenant, function, running invocations)`, by tenant and function.
    pub running: Vec<(String, String, u32)>,
}

/// One tenant's unfinished async invocations (queued, running, waiting for a retry), as the
/// queued quotas count them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueuedUsage {
    pub tenant: String,
    pub invocations: u64,
    /// The sum of their [`StoredRequest::quota_bytes`].
    pub bytes: u64,
}

/// A tenant's async work now, exactly counted (`GET /v1/tenants/{t}/usage`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantQueue {
    /// Invocations running, on any node.
    pub running: u64,
    /// Runnable now (queued, or failed and due for their retry).
    pub runnable: u64,
    /// Of those, with a deadline (a start window).
    pub runnable_windowed: u64,
    /// Not runnable yet (`sluice-start-after` in the future, or waiting for a retry).
    pub later: u64,
}

/// The result of one attempt, recorded together with the state change.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptResult {
    /// The guest answered (any status below 500): `succeeded`.
    Succeeded { response: StoredResponse },
    /// The attempt failed. With `retry_at` it goes back to the queue (`failed`, leased again from
    /// then on); without, it is `dead`.
    Failed {
        error_kind: String,
        status_code: Option<u16>,
        response: Option<StoredResponse>,
        retry_at: Option<UnixMs>,
    },
}

/// An attempt's end, as the scheduler that ran it reports it ([`Invocations::complete`]).
#[derive(Debug, Clone, Copy)]
pub struct Completion<'a> {
    pub id: &'a str,
    /// The lease the attempt ran under: it is recorded only if `owner` still holds `attempt`.
    pub owner: &'a str,
    pub attempt: u32,
    pub result: &'a AttemptResult,
    /// The attempt's guest log lines.
    pub logs: &'a [(LogStream, String, UnixMs)],
    /// The attempt's time on a thread, added to the invocation's.
    pub cpu_us: u64,
    pub now: UnixMs,
}

/// Filter and page of `list_invocations`, newest first.
#[derive(Debug, Clone, Default)]
pub struct InvocationFilter {
    pub tenant: String,
    pub function: Option<String>,
    pub status: Option<InvocationStatus>,
    /// Only ids less than this (ids sort by creation time): the cursor of the next page.
    pub before_id: Option<String>,
    pub limit: u32,
}

/// Most invocations one `list_invocations` call returns, whatever `limit` the caller asks for.
pub const LIST_INVOCATIONS_LIMIT_MAX: u32 = 1_000;

store_trait! {
    /// Invocations and the async queue.
    pub trait Invocations {
        /// Records a batch of finished sync invocations and their log lines in one transaction.
        async fn record_sync(&self, batch: &[SyncRecord]) -> StoreResult<()>;
        async fn get_invocation(&self, id: &str) -> StoreResult<Option<Invocation>>;
        /// Stores an async invocation with status `queued`. Returns only after the row is durably
        /// committed (`synchronous=FULL`); concurrent calls share commits (group commit). An id
        /// that is already stored is a `Conflict` (for that call alone); `attempts_max` 0 is
        /// refused.
        async fn enqueue(&self, inv: &NewInvocation) -> StoreResult<Enqueued>;
        /// Leases up to `limit` runnable invocations for `owner` until `now + lease_ms`: `queued`
        /// or `failed` ones whose `run_after <= now`, and `running` ones whose lease expired
        /// (their owner died). Order: criticality, then deadline (none last), then `run_after`.
        /// Each leased row becomes `running` with `attempts + 1`. Rows whose deadline passed
        /// before they started become `expired` instead; rows past `created_at + max_age` become
        /// `dead`. A reclaimed row keeps its lost attempt: past its deadline it becomes
        /// `expired`; with no attempt left it becomes `dead` (error kind of its last failure,
        /// else `lease_lost`), so `attempts` never exceeds `attempts_max`. A cluster store takes
        /// `now` from the database's clock, so that clock skew between nodes cannot decide who
        /// owns an invocation.
        async fn lease(&self, owner: &str, now: UnixMs, lease_ms: u64, limit: u32) -> StoreResult<Vec<Leased>>;
        /// Leases like [`Invocations::lease`], but what each [`LeaseAsk`] selects, asks in order
        /// (the scheduler's plan); returns what each ask leased, in the asks' order. An
        /// invocation is leased at most once even if two asks select it. `promote_ahead_ms`
        /// splits the classes (see [`crate::LeaseClass`]); a cluster store measures it from the
        /// database's clock.
        async fn lease_asks(
            &self,
            owner: &str,
            now: UnixMs,
            lease_ms: u64,
            promote_ahead_ms: u64,
            asks: &[LeaseAsk],
        ) -> StoreResult<Vec<Vec<Leased>>>;
        /// Every tenant's runnable work by class (each count capped at `cap`), and what runs now.
        async fn queue_demand(&self, now: UnixMs, promote_ahead_ms: u64, cap: u32) -> StoreResult<QueueDemand>;
        /// One tenant's async work now, counted exactly (costs a scan of its pending rows).
        async fn tenant_queue(&self, tenant: &str, now: UnixMs) -> StoreResult<TenantQueue>;
        /// The cluster's unfinished async invocations, counted by (status, criticality):
        /// `queued`, `failed` (waiting for a retry) and `running`. For `/metrics`; costs a scan
        /// of those rows.
        async fn queue_depth(&self) -> StoreResult<Vec<(String, Criticality, u64)>>;
        /// Every tenant with unfinished async invocations: how many, and their request bytes, by
        /// tenant. One `GROUP BY` over the index of unfinished rows (it carries the bytes), never
        /// the table: what each node re-reads periodically to correct its in-memory quota
        /// counters.
        async fn queued_usage(&self) -> StoreResult<Vec<QueuedUsage>>;
        /// Records why leased attempts waited: `(id, attempt, JSON)`, for the attempts that are
        /// still that attempt (a later one keeps its own).
        async fn record_waits(&self, waits: &[(String, u32, String)]) -> StoreResult<()>;
        /// Extends the leases `owner` still holds, each for the same attempt (the fencing token),
        /// to `now + lease_ms` (never shortening one). Returns the leases it no longer holds
        /// (reclaimed, and perhaps leased again as a later attempt). A cluster store takes `now`
        /// from the database's clock, not the caller's.
        async fn heartbeat(
            &self,
            owner: &str,
            leases: &[(String, u32)],
            now: UnixMs,
            lease_ms: u64,
        ) -> StoreResult<Vec<(String, u32)>>;
        /// Records an attempt's result and its guest log lines in the same transaction as its
        /// state change, if its `owner` still holds the lease for its `attempt`; `false` (and
        /// nothing written) otherwise. Its `cpu_us` is added to the invocation's. Concurrent
        /// completions share commits. A failure with `retry_at` becomes `dead` at once if no
        /// attempt is left or `retry_at` is past `created_at + max_age`.
        async fn complete(&self, completion: Completion<'_>) -> StoreResult<bool>;
        /// Gives leases back without counting the attempt (graceful shutdown): `queued` again.
        /// Only leases `owner` still holds for the same attempt are given back.
        async fn release(&self, owner: &str, leases: &[(String, u32)]) -> StoreResult<()>;
        /// The stored response of an invocation (the last attempt's), if any.
        async fn get_response(&self, id: &str) -> StoreResult<Option<StoredResponse>>;
        async fn list_invocations(&self, filter: &InvocationFilter) -> StoreResult<Vec<Invocation>>;
        /// Re-drives a `dead` or `expired` async invocation: `queued` again from `now`, with its
        /// attempts reset, its deadline, error and response cleared, and its max age counted from
        /// `now`. `false` if it is not in such a state (or does not exist, or is a sync record).
        async fn retry_dead(&self, id: &str, now: UnixMs) -> StoreResult<bool>;
        /// Deletes up to `limit` finished invocations, sync or async (and their logs and
        /// responses), that finished before `cutoff`, oldest first, up to `limit` idempotency keys
        /// older than the window, and the nodes not heard from since `cutoff`. Returns the rows
        /// deleted: 0 once nothing is left.
        async fn purge(&self, cutoff: UnixMs, limit: u32) -> StoreResult<u64>;
    }
}

#[async_trait::async_trait]
impl<E: Engine> Invocations for SqlStore<E>
where
    for<'c> &'c mut Conn<E>: Executor<'c, Database = E::DB>,
    for<'a> &'a str: Bind<E::DB>,
    i64: Bind<E::DB>,
    Option<i64>: Bind<E::DB>,
{
    async fn record_sync(&self, batch: &[SyncRecord]) -> StoreResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        E::record_sync(self, batch).await
    }

    async fn get_invocation(&self, id: &str) -> StoreResult<Option<Invocation>> {
        sqlx::query(
            "SELECT id, tenant, function, version, mode, status, attempts, created_at,
                    started_at, finished_at, status_code, error_kind, cpu_us, waits, idempotency_key
             FROM invocations WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(E::classify)?
        .as_ref()
        .map(invocation_from_row)
        .transpose()
    }

    async fn enqueue(&self, inv: &NewInvocation) -> StoreResult<Enqueued> {
        self.enqueues.enqueue(inv, self.clock.now_ms()).await
    }

    async fn lease(&self, owner: &str, now: UnixMs, lease_ms: u64, limit: u32) -> StoreResult<Vec<Leased>> {
        E::lease(self, owner, now, lease_ms, limit).await
    }

    async fn lease_asks(
        &self,
        owner: &str,
        now: UnixMs,
        lease_ms: u64,
        promote_ahead_ms: u64,
        asks: &[LeaseAsk],
    ) -> StoreResult<Vec<Vec<Leased>>> {
        if asks.is_empty() {
            return Ok(Vec::new());
        }
        E::lease_asks(self, owner, now, lease_ms, promote_ahead_ms, asks).await
    }

    async fn queue_demand(&self, now: UnixMs, promote_ahead_ms: u64, cap: u32) -> StoreResult<QueueDemand> {
        let tenants = sqlx::query(E::QUEUE_DEMAND)
            .bind(self.engine.now(now))
            .bind(to_i64("promote_ahead_ms", promote_ahead_ms)?)
            .bind(i64::from(cap))
            .fetch_all(&self.pool)
            .await
            .map_err(E::classify)?;
        let running = sqlx::query(E::RUNNING_BY_FUNCTION).fetch_all(&self.pool).await.map_err(E::classify)?;
        demand_from_rows(tuples(tenants)?, tuples(running)?)
    }

    async fn tenant_queue(&self, tenant: &str, now: UnixMs) -> StoreResult<TenantQueue> {
        let counts = sqlx::query(
            "SELECT
                (SELECT count(*) FROM invocations WHERE status = 'running' AND tenant = $1),
                (SELECT count(*) FROM invocations
                 WHERE status IN ('queued', 'failed') AND tenant = $1 AND run_after <= $2),
                (SELECT count(*) FROM invocations
                 WHERE status IN ('queued', 'failed') AND tenant = $1 AND run_after <= $2
                   AND deadline IS NOT NULL),
                (SELECT count(*) FROM invocations
                 WHERE status IN ('queued', 'failed') AND tenant = $1 AND run_after > $2)",
        )
        .bind(tenant)
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .map_err(E::classify)?;
        let (running, runnable, runnable_windowed, later) = Tuple::from_row(&counts)?;
        tenant_queue_from_counts(running, runnable, runnable_windowed, later)
    }

    async fn queue_depth(&self) -> StoreResult<Vec<(String, Criticality, u64)>> {
        let found = sqlx::query(QUEUE_DEPTH).fetch_all(&self.pool).await.map_err(E::classify)?;
        queue_depth_from_rows(tuples(found)?)
    }

    async fn queued_usage(&self) -> StoreResult<Vec<QueuedUsage>> {
        let found = sqlx::query(QUEUED_USAGE).fetch_all(&self.pool).await.map_err(E::classify)?;
        queued_usage_from_rows(tuples(found)?)
    }

    async fn record_waits(&self, waits: &[(String, u32, String)]) -> StoreResult<()> {
        self.writer.record_waits(waits).await
    }

    async fn heartbeat(
        &self,
        owner: &str,
        leases: &[(String, u32)],
        now: UnixMs,
        lease_ms: u64,
    ) -> StoreResult<Vec<(String, u32)>> {
        self.writer.heartbeat(owner, leases, now, lease_ms).await
    }

    async fn complete(&self, completion: Completion<'_>) -> StoreResult<bool> {
        self.writer.complete(completion).await
    }

    async fn release(&self, owner: &str, leases: &[(String, u32)]) -> StoreResult<()> {
        self.writer.release(owner, leases).await
    }

    async fn get_response(&self, id: &str) -> StoreResult<Option<StoredResponse>> {
        sqlx::query("SELECT status, headers, body FROM responses WHERE invocation_id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(E::classify)?
            .as_ref()
            .map(response_from_row)
            .transpose()
    }

    async fn list_invocations(&self, filter: &InvocationFilter) -> StoreResult<Vec<Invocation>> {
        let limit = i64::from(filter.limit.min(LIST_INVOCATIONS_LIMIT_MAX));
        // Built from fixed pieces, so there are only a handful of distinct statements and each
        // stays prepared; optional filters are left out rather than written as `? IS NULL OR`,
        // which would keep SQLite from seeking `invocations_tenant` / `invocations_function`.
        let mut query = QueryBuilder::<E::DB>::new(
            "SELECT id, tenant, function, version, mode, status, attempts, created_at,
                    started_at, finished_at, status_code, error_kind, cpu_us, waits, idempotency_key
             FROM invocations WHERE tenant = ",
        );
        query.push_bind(filter.tenant.as_str());
        if let Some(function) = &filter.function {
            query.push(" AND function = ").push_bind(function.as_str());
        }
        if let Some(status) = filter.status {
            query.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(before_id) = &filter.before_id {
            query.push(" AND id < ").push_bind(before_id.as_str());
        }
        query.push(" ORDER BY id DESC LIMIT ").push_bind(limit);
        let found = query.build().fetch_all(&self.pool).await.map_err(E::classify)?;
        rows(found, invocation_from_row)
    }

    async fn retry_dead(&self, id: &str, now: UnixMs) -> StoreResult<bool> {
        self.writer.retry_dead(id, now).await
    }

    async fn purge(&self, cutoff: UnixMs, limit: u32) -> StoreResult<u64> {
        let keys_cutoff = self.clock.now_ms().saturating_sub(IDEMPOTENCY_WINDOW_MS);
        self.writer.purge(cutoff, keys_cutoff, limit).await
    }
}
