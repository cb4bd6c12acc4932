//! Per-tenant usage quotas (issue 19): how many async invocations a tenant may have unfinished,
//! and how many bytes of requests they may hold in the queue, so that no tenant (nor anonymous
//! callers of its public functions) fills the disk that every tenant's store shares. The storage
//! quotas (components, functions, versions) are checked at deploy, in `api`, against the store.
//!
//! The queued quotas are checked on the async call path, which runs thousands of times a second,
//! so they never ask the store. Each node keeps a counter per tenant in memory: seeded from the
//! store at start and re-read every [`QUEUE_USAGE_REFRESH`] (one `GROUP BY` of
//! [`sluice_store::Store::queued_usage`]), and moved in between by this node's own enqueues (a
//! reservation taken before the commit, given back if nothing was stored) and completions.
//!
//! A counter is a `base` that only the refresh writes, a `delta` of committed changes (kept
//! enqueues, completions) and the enqueues in flight (reserved, not committed yet). The refresh
//! notes each delta before it reads the store and sets `base = stored - noted`, which leaves in
//! the count exactly what was committed after the note, plus what is in flight. So a refresh never
//! loses an enqueue racing it; one that commits between the note and the read is counted twice
//! until the next refresh (too many, the safe side: at most the enqueues in flight then, bounded
//! by `--async-enqueue-inflight-max` per node). A node alone therefore admits past a quota only
//! by an enqueue whose client went away while its commit was pending (the reservation is dropped
//! with the request's future; the row, if the commit lands, counts from the next refresh).
//!
//! Nothing here allocates per call: a read lock, one map lookup by the tenant's name, and a few
//! atomic operations.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sluice_core::{ErrorKind, OwnUsageLimits, SluiceError, UsageLimits};
use sluice_store::QueuedUsage;

/// How often a node re-reads every tenant's unfinished invocations from the store, by default
/// (`serve --quota-refresh`). Between two reads a node sees only its own enqueues and completions
/// (see ARCHITECTURE.md for what that allows a cluster).
pub const QUEUE_USAGE_REFRESH: Duration = Duration::from_secs(5);

/// `Retry-After` of a call refused for a queued quota: a backlog that reached its quota does not
/// drain much sooner (this node's completions free room at once; others' at the next refresh).
pub const QUOTA_RETRY_AFTER_SECS: u64 = 5;

/// One tenant's queued count and bytes, and the quotas they are held to.
#[derive(Debug)]
struct TenantCounter {
    base_count: AtomicI64,
    delta_count: AtomicI64,
    inflight_count: AtomicI64,
    base_bytes: AtomicI64,
    delta_bytes: AtomicI64,
    inflight_bytes: AtomicI64,
    queued_max: AtomicU64,
    queued_bytes_max: AtomicU64,
}

impl TenantCounter {
    fn new(limits: &UsageLimits) -> Self {
        Self {
            base_count: AtomicI64::new(0),
            delta_count: AtomicI64::new(0),
            inflight_count: AtomicI64::new(0),
            base_bytes: AtomicI64::new(0),
            delta_bytes: AtomicI64::new(0),
            inflight_bytes: AtomicI64::new(0),
            queued_max: AtomicU64::new(limits.queued_max),
            queued_bytes_max: AtomicU64::new(limits.queued_bytes_max),
        }
    }

    fn count(&self) -> u64 {
        let n = self.base_count.load(Ordering::Acquire)
            + self.delta_count.load(Ordering::Acquire)
            + self.inflight_count.load(Ordering::Acquire);
        n.max(0) as u64
    }

    fn bytes(&self) -> u64 {
        let n = self.base_bytes.load(Ordering::Acquire)
            + self.delta_bytes.load(Ordering::Acquire)
            + self.inflight_bytes.load(Ordering::Acquire);
        n.max(0) as u64
    }

    fn add(&self, count: i64, bytes: i64) {
        self.delta_count.fetch_add(count, Ordering::AcqRel);
        self.delta_bytes.fetch_add(bytes, Ordering::AcqRel);
    }

    fn add_inflight(&self, count: i64, bytes: i64) {
        self.inflight_count.fetch_add(count, Ordering::AcqRel);
        self.inflight_bytes.fetch_add(bytes, Ordering::AcqRel);
    }
}

/// One enqueue's place under its tenant's queued quotas, taken before the store commits it.
/// Dropped without [`Reservation::keep`] (the store failed, or an idempotency key answered with
/// an earlier invocation), it gives the place back.
#[must_use]
#[derive(Debug)]
pub struct Reservation {
    counter: Arc<TenantCounter>,
    bytes: i64,
    kept: bool,
}

impl Reservation {
    /// The invocation is stored: it counts until it finishes (or the next refresh).
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // Committed first, then out of flight: the count never dips below the truth meanwhile.
        if self.kept {
            self.counter.add(1, self.bytes);
        }
        self.counter.add_inflight(-1, -self.bytes);
    }
}

/// What a refresh noted before it read the store: each counter's delta then.
pub struct Marks(Vec<(String, Arc<TenantCounter>, i64, i64)>);

/// Every tenant's usage limits and queued counters on this node.
pub struct Quotas {
    defaults: UsageLimits,
    own: RwLock<HashMap<String, OwnUsageLimits>>,
    counters: RwLock<HashMap<String, Arc<TenantCounter>>>,
}

impl Quotas {
    pub fn new(defaults: UsageLimits) -> Self {
        Self { defaults, own: RwLock::default(), counters: RwLock::default() }
    }

    pub fn defaults(&self) -> &UsageLimits {
        &self.defaults
    }

    /// The limits `tenant` is held to: its own where it has them, else the node's defaults.
    pub fn limits(&self, tenant: &str) -> UsageLimits {
        let own = self.own.read().expect("usage limits lock");
        own.get(tenant).map_or(self.defaults, |o| o.over(&self.defaults))
    }

    /// Makes `all` the tenants' own limits (a reload from the store).
    pub fn replace_own(&self, all: Vec<(String, OwnUsageLimits)>) {
        *self.own.write().expect("usage limits lock") = all.into_iter().collect();
        for (tenant, counter) in self.counters.read().expect("queued counters lock").iter() {
            self.apply_limits(tenant, counter);
        }
    }

    /// Sets one tenant's own limits (this node's own write; other nodes reload).
    pub fn set_own(&self, tenant: &str, limits: OwnUsageLimits) {
        {
            let mut own = self.own.write().expect("usage limits lock");
            if limits.is_empty() {
                own.remove(tenant);
            } else {
                own.insert(tenant.to_string(), limits);
            }
        }
        if let Some(counter) = self.counters.read().expect("queued counters lock").get(tenant) {
            self.apply_limits(tenant, counter);
        }
    }

    fn apply_limits(&self, tenant: &str, counter: &TenantCounter) {
        let limits = self.limits(tenant);
        counter.queued_max.store(limits.queued_max, Ordering::Release);
        counter.queued_bytes_max.store(limits.queued_bytes_max, Ordering::Release);
    }

    fn counter(&self, tenant: &str) -> Arc<TenantCounter> {
        if let Some(c) = self.counters.read().expect("queued counters lock").get(tenant) {
            return c.clone();
        }
        let fresh = Arc::new(TenantCounter::new(&self.limits(tenant)));
        self.counters
            .write()
            .expect("queued counters lock")
            .entry(tenant.to_string())
            .or_insert(fresh)
            .clone()
    }

    /// A place for one more queued invocation of `bytes` (see [`sluice_store::StoredRequest::quota_bytes`]),
    /// or the refusal: 429 `quota_exceeded` with `Retry-After` when the tenant is at a quota, 413
    /// when this request alone is larger than its queued-bytes quota.
    pub fn reserve(&self, tenant: &str, bytes: u64) -> Result<Reservation, SluiceError> {
        let counter = self.counter(tenant);
        let bytes_max = counter.queued_bytes_max.load(Ordering::Acquire);
        if bytes > bytes_max {
            return Err(SluiceError::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "this request holds {bytes} bytes, more than tenant {tenant} may have queued in all \
                     (its quota queued_bytes_max is {bytes_max})"
                ),
            ));
        }
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        counter.add_inflight(1, bytes);
        // A reservation from here on: an early return gives the place back.
        let reservation = Reservation { counter: counter.clone(), bytes, kept: false };
        let (count, queued_bytes) = (counter.count(), counter.bytes());
        let max = counter.queued_max.load(Ordering::Acquire);
        if count > max {
            return Err(refused(format!(
                "tenant {tenant} has {} queued invocations, its quota (queued_max) is {max}; retry \
                 when some have finished",
                count - 1
            )));
        }
        if queued_bytes > bytes_max {
            return Err(refused(format!(
                "tenant {tenant} has {} bytes of queued requests and this one adds {bytes}, over its \
                 quota (queued_bytes_max) of {bytes_max}; retry when some have finished",
                queued_bytes as i64 - bytes
            )));
        }
        Ok(reservation)
    }

    /// An unfinished invocation of `tenant` holding `bytes` finished on this node.
    pub fn finished(&self, tenant: &str, bytes: u64) {
        self.counter(tenant).add(-1, -i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// `(queued invocations, queued bytes)` of `tenant` as this node counts them.
    pub fn queued(&self, tenant: &str) -> (u64, u64) {
        match self.counters.read().expect("queued counters lock").get(tenant) {
            Some(c) => (c.count(), c.bytes()),
            None => (0, 0),
        }
    }

    /// Notes every counter's delta: call before reading the store, hand the result to
    /// [`Quotas::refreshed`] with what was read.
    pub fn mark(&self) -> Marks {
        let counters = self.counters.read().expect("queued counters lock");
        Marks(
            counters
                .iter()
                .map(|(t, c)| {
                    (
                        t.clone(),
                        c.clone(),
                        c.delta_count.load(Ordering::Acquire),
                        c.delta_bytes.load(Ordering::Acquire),
                    )
                })
                .collect(),
        )
    }

    /// Makes the stored usage (read after `marks`) the counters' base. A tenant missing from
    /// `usage` has nothing unfinished.
    pub fn refreshed(&self, marks: Marks, usage: Vec<QueuedUsage>) {
        let mut stored: HashMap<String, (i64, i64)> = usage
            .into_iter()
            .map(|u| {
                let n = i64::try_from(u.invocations).unwrap_or(i64::MAX);
                (u.tenant, (n, i64::try_from(u.bytes).unwrap_or(i64::MAX)))
            })
            .collect();
        for (tenant, counter, count_noted, bytes_noted) in marks.0 {
            let (count, bytes) = stored.remove(&tenant).unwrap_or((0, 0));
            counter.base_count.store(count - count_noted, Ordering::Release);
            counter.base_bytes.store(bytes - bytes_noted, Ordering::Release);
        }
        // Tenants this node had no counter for when it noted: their delta then was 0.
        for (tenant, (count, bytes)) in stored {
            let counter = self.counter(&tenant);
            counter.base_count.store(count, Ordering::Release);
            counter.base_bytes.store(bytes, Ordering::Release);
        }
    }
}

fn refused(message: String) -> SluiceError {
    SluiceError::new(ErrorKind::QuotaExceeded, message).retry_after(QUOTA_RETRY_AFTER_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quotas(queued_max: u64, queued_bytes_max: u64) -> Quotas {
        Quotas::new(UsageLimits { queued_max, queued_bytes_max, ..UsageLimits::default() })
    }

    fn usage(tenant: &str, invocations: u64, bytes: u64) -> QueuedUsage {
        QueuedUsage { tenant: tenant.into(), invocations, bytes }
    }

    #[test]
    fn the_count_quota_refuses_the_call_past_it_and_names_it() {
        let q = quotas(2, 1 << 20);
        q.reserve("a", 10).unwrap().keep();
        q.reserve("a", 10).unwrap().keep();
        let err = q.reserve("a", 10).unwrap_err();
        assert_eq!((err.kind, err.retry_after_secs), (ErrorKind::QuotaExceeded, Some(5)));
        assert!(err.message.contains("tenant a has 2 queued invocations"), "{}", err.message);
        assert!(err.message.contains("queued_max"), "{}", err.message);
        // A refusal takes no place, and other tenants have their own.
        assert_eq!(q.queued("a"), (2, 20));
        q.reserve("b", 10).unwrap().keep();
        q.finished("a", 10);
        q.reserve("a", 10).unwrap().keep();
        assert_eq!(q.queued("a"), (2, 20));
    }

    #[test]
    fn the_bytes_quota_refuses_and_one_request_over_it_alone_is_too_large() {
        let q = quotas(100, 100);
        q.reserve("a", 60).unwrap().keep();
        let err = q.reserve("a", 50).unwrap_err();
        assert_eq!(err.kind, ErrorKind::QuotaExceeded);
        assert!(err.message.contains("60 bytes of queued requests"), "{}", err.message);
        assert!(err.message.contains("queued_bytes_max"), "{}", err.message);
        assert_eq!(q.reserve("a", 101).unwrap_err().kind, ErrorKind::PayloadTooLarge);
        q.reserve("a", 40).unwrap().keep();
        assert_eq!(q.queued("a"), (2, 100));
    }

    #[test]
    fn a_reservation_not_kept_gives_its_place_back() {
        let q = quotas(1, 1000);
        drop(q.reserve("a", 10).unwrap());
        assert_eq!(q.queued("a"), (0, 0));
        q.reserve("a", 10).unwrap().keep();
        assert!(q.reserve("a", 10).is_err());
    }

    #[test]
    fn a_refresh_keeps_what_moved_after_its_mark() {
        let q = quotas(1000, 1 << 30);
        q.reserve("a", 5).unwrap().keep();
        q.reserve("a", 5).unwrap().keep();
        let marks = q.mark();
        // While the store is read: another enqueue here, and the store knows of 7 more (other
        // nodes') besides the two noted.
        q.reserve("a", 5).unwrap().keep();
        q.refreshed(marks, vec![usage("a", 9, 45), usage("b", 4, 8)]);
        assert_eq!(q.queued("a"), (10, 50), "the stored 9 and the one enqueued after the mark");
        assert_eq!(q.queued("b"), (4, 8), "a tenant only the store knew");
        // The next refresh with nothing moving makes the count the store's.
        let marks = q.mark();
        q.refreshed(marks, vec![usage("a", 10, 50)]);
        assert_eq!(q.queued("a"), (10, 50));
        assert_eq!(q.queued("b"), (0, 0), "b's calls finished elsewhere");
        // Completions here count down at once.
        q.finished("a", 5);
        assert_eq!(q.queued("a"), (9, 45));
    }

    #[test]
    fn an_enqueue_in_flight_across_a_refresh_is_never_lost() {
        let q = quotas(1000, 1 << 30);
        // Committed after the store was read: counted once, before and after its commit.
        let late = q.reserve("a", 5).unwrap();
        let marks = q.mark();
        q.refreshed(marks, vec![]);
        assert_eq!(q.queued("a"), (1, 5));
        late.keep();
        assert_eq!(q.queued("a"), (1, 5));
        // Committed between the note and the read: counted twice until the next refresh.
        let racing = q.reserve("a", 5).unwrap();
        let marks = q.mark();
        racing.keep();
        q.refreshed(marks, vec![usage("a", 2, 10)]);
        assert_eq!(q.queued("a"), (3, 15), "one too many, never one too few");
        let marks = q.mark();
        q.refreshed(marks, vec![usage("a", 2, 10)]);
        assert_eq!(q.queued("a"), (2, 10));
    }

    #[test]
    fn own_limits_replace_the_defaults_and_apply_to_live_counters() {
        let q = quotas(1, 1000);
        q.reserve("a", 1).unwrap().keep();
        assert!(q.reserve("a", 1).is_err());
        q.set_own("a", OwnUsageLimits { queued_max: Some(2), ..Default::default() });
        q.reserve("a", 1).unwrap().keep();
        assert!(q.reserve("a", 1).is_err());
        assert_eq!(q.limits("a").queued_bytes_max, 1000, "the other limits stay the defaults");
        q.replace_own(Vec::new());
        assert_eq!(q.limits("a").queued_max, 1);
    }
}
