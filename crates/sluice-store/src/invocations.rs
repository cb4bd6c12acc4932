//! Invocations: sync records, the async queue (DESIGN.md section 3) and what the API reads of
//! both ([`Invocations`]). The queue's writes go through the group-committing writer
//! ([`crate::queue`]); its reads and the API's are statements on the pool.

use sluice_core::UnixMs;
use sqlx::{Executor, QueryBuilder};

use crate::queue::to_i64;
use crate::rows::{
    QUEUE_DEPTH, QUEUED_USAGE, demand_from_rows, invocation_from_row, queue_depth_from_rows,
    queued_usage_from_rows, response_from_row, rows, tenant_queue_from_counts,
};
use crate::sql::{Bind, Conn, Engine, SqlStore, Tuple, tuples};
use crate::{
    Completion, Criticality, Enqueued, IDEMPOTENCY_WINDOW_MS, Invocation, InvocationFilter, LeaseAsk, Leased,
    NewInvocation, QueueDemand, QueuedUsage, StoreResult, StoredResponse, SyncRecord, TenantQueue,
};

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
                    started_at, finished_at, status_code, error_kind, cpu_us, waits
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
                    started_at, finished_at, status_code, error_kind, cpu_us, waits
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
