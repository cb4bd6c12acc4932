//! [`Timed`]: a [`Store`] whose every call ends within a bound.
//!
//! The SQLite store bounds its own waits where SQLite lets it (the pool's acquire timeout, the
//! busy timeout of each statement), but not everything a call can wait on: the queue writer's
//! channel, a writer stuck in a slow fsync, a batch that retries op by op. A node wraps its store
//! in this, so that a request answers 503 and a background task logs and tries again instead of
//! hanging with whatever it holds (an admission slot, a body, a lease).
//!
//! A call that times out may still complete later (a queued write is not withdrawn), so callers
//! must treat it like any other `Unavailable`: nothing was acknowledged. Trying again is safe for
//! reads and fenced writes; an enqueue tried again may be stored twice unless it carries an
//! idempotency key (at-least-once, as with any client retry).

use std::future::Future;
use std::time::Duration;

use sluice_core::{FunctionConfig, UnixMs};

use crate::{
    AttemptResult, Change, Criticality, Enqueued, FunctionSummary, Invocation, InvocationFilter, KeyRecord,
    LeaseAsk, Leased, LogLine, LogStream, NewInvocation, NodeRecord, OwnUsageLimits, QueueDemand,
    QueuedUsage, Quota, Store, StoreError, StoreResult, StoredResponse, SyncRecord, Tenant, TenantQueue,
    TenantStorage, VersionRecord,
};

/// The longest any store call may take. Longer than the SQLite store's own bounds
/// ([`crate::sqlite::POOL_ACQUIRE_TIMEOUT`] plus [`crate::sqlite::BUSY_TIMEOUT`]), so that when
/// those fire their more specific error is what the caller sees.
pub const STORE_CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// A store whose calls fail with [`StoreError::Unavailable`] once they take longer than a bound.
#[derive(Debug)]
pub struct Timed<S> {
    inner: S,
    timeout: Duration,
}

impl<S: Store> Timed<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self { inner, timeout }
    }

    async fn bound<T>(&self, call: &str, answer: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!(
                "{call} did not finish within {}",
                sluice_core::units::format_duration(self.timeout)
            ))),
        }
    }
}

/// Writes the `Store` impl of [`Timed`]: every method forwards to the inner store under
/// [`Timed::bound`]. A method added to `Store` must be listed here (the compiler says so).
macro_rules! timed_store {
    ($(fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        #[async_trait::async_trait]
        impl<S: Store> Store for Timed<S> {
            $(
                async fn $name(&self $(, $arg: $ty)*) -> StoreResult<$ret> {
                    self.bound(stringify!($name), self.inner.$name($($arg),*)).await
                }
            )*

            fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<Change>> {
                self.inner.changes()
            }
        }
    };
}

timed_store! {
    fn create_tenant(&self, name: &str) -> Tenant;
    fn get_tenant(&self, name: &str) -> Option<Tenant>;
    fn list_tenants(&self) -> Vec<Tenant>;
    fn set_tenant_rate(&self, tenant: &str, rate: Option<(f64, u32)>) -> ();
    fn tenant_rates(&self) -> Vec<(String, f64, u32)>;
    fn set_tenant_quota(&self, tenant: &str, quota: Option<Quota>) -> ();
    fn tenant_quotas(&self) -> Vec<(String, Quota)>;
    fn set_tenant_usage_limits(&self, tenant: &str, limits: &OwnUsageLimits) -> ();
    fn tenant_usage_limits(&self) -> Vec<(String, OwnUsageLimits)>;
    fn create_key(&self, key: &KeyRecord) -> ();
    fn list_keys(&self, tenant: Option<&str>) -> Vec<KeyRecord>;
    fn revoke_key(&self, id: &str) -> bool;
    fn get_key(&self, id: &str) -> Option<KeyRecord>;
    fn active_keys(&self) -> Vec<KeyRecord>;
    fn put_blob(&self, tenant: &str, digest: &str, bytes: &[u8]) -> ();
    fn get_blob(&self, tenant: &str, digest: &str) -> Option<Vec<u8>>;
    fn purge_blobs(&self, uploaded_before: UnixMs, limit: u32) -> Vec<(String, String)>;
    fn purge_versions(&self, keep_latest: u32, limit: u32) -> u64;
    fn blob_keys(&self) -> Vec<(String, String)>;
    fn tenant_storage(&self, tenant: &str) -> TenantStorage;
    fn create_version(
        &self,
        tenant: &str,
        function: &str,
        blob_digest: &str,
        config: &FunctionConfig
    ) -> VersionRecord;
    fn latest_version(&self, tenant: &str, function: &str) -> Option<VersionRecord>;
    fn get_version(&self, tenant: &str, function: &str, version: i64) -> Option<VersionRecord>;
    fn list_functions(&self, tenant: &str) -> Vec<FunctionSummary>;
    fn delete_function(&self, tenant: &str, function: &str) -> bool;
    fn all_latest_versions(&self) -> Vec<VersionRecord>;
    fn record_sync(&self, batch: &[SyncRecord]) -> ();
    fn get_invocation(&self, id: &str) -> Option<Invocation>;
    fn invocation_logs(&self, id: &str) -> Vec<LogLine>;
    fn function_logs(
        &self,
        tenant: &str,
        function: &str,
        after_seq: Option<i64>,
        limit: u32
    ) -> Vec<LogLine>;
    fn enqueue(&self, inv: &NewInvocation) -> Enqueued;
    fn lease(&self, owner: &str, now: UnixMs, lease_ms: u64, limit: u32) -> Vec<Leased>;
    fn lease_asks(
        &self,
        owner: &str,
        now: UnixMs,
        lease_ms: u64,
        promote_ahead_ms: u64,
        asks: &[LeaseAsk]
    ) -> Vec<Vec<Leased>>;
    fn queue_demand(&self, now: UnixMs, promote_ahead_ms: u64, cap: u32) -> QueueDemand;
    fn tenant_queue(&self, tenant: &str, now: UnixMs) -> TenantQueue;
    fn queue_depth(&self) -> Vec<(String, Criticality, u64)>;
    fn queued_usage(&self) -> Vec<QueuedUsage>;
    fn record_waits(&self, waits: &[(String, u32, String)]) -> ();
    fn heartbeat(
        &self,
        owner: &str,
        leases: &[(String, u32)],
        now: UnixMs,
        lease_ms: u64
    ) -> Vec<(String, u32)>;
    fn complete(
        &self,
        id: &str,
        owner: &str,
        attempt: u32,
        result: &AttemptResult,
        logs: &[(LogStream, String, UnixMs)],
        cpu_us: u64,
        now: UnixMs
    ) -> bool;
    fn release(&self, owner: &str, leases: &[(String, u32)]) -> ();
    fn get_response(&self, id: &str) -> Option<StoredResponse>;
    fn list_invocations(&self, filter: &InvocationFilter) -> Vec<Invocation>;
    fn retry_dead(&self, id: &str, now: UnixMs) -> bool;
    fn purge(&self, cutoff: UnixMs, limit: u32) -> u64;
    fn node_heartbeat(&self, node: &NodeRecord, stopped: bool) -> ();
    fn list_nodes(&self, within_ms: u64) -> (Vec<NodeRecord>, UnixMs);
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use sqlx::{ConnectOptions, Connection};

    use super::*;
    use crate::SqliteStore;

    /// Another connection holds SQLite's write lock, so every write of the store waits for the
    /// busy timeout (5 s): the wrapper must answer long before that.
    #[tokio::test]
    async fn a_call_that_waits_too_long_is_unavailable_within_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.db");
        let store = Timed::new(SqliteStore::open(&path).await.unwrap(), Duration::from_millis(200));
        let mut locker = sqlx::sqlite::SqliteConnectOptions::new().filename(&path).connect().await.unwrap();
        sqlx::query("BEGIN IMMEDIATE").execute(&mut locker).await.unwrap();

        let started = Instant::now();
        let err = store.create_tenant("t").await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert!(err.to_string().contains("create_tenant"), "{err}");
        // Through the queue writer too.
        let err = store.purge(0, 10).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());

        sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
        locker.close().await.unwrap();
        assert!(store.list_tenants().await.is_ok(), "answers again once the lock is gone");
    }
}
