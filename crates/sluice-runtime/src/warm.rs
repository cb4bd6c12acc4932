//! Warm instances (`deploy --reuse N`): an instance that served a call well is kept, idle, for
//! the next call of the same function version, up to N calls in all.
//!
//! The rules a user relies on:
//! - one call at a time: an instance is taken out of its pool for a call and put back after it;
//! - never across tenants, functions, versions or configurations: the pool is keyed by tenant,
//!   function, version and code digest, and an instance whose configuration differs from the
//!   call's (a function deleted and created again under the same version) is discarded;
//! - only after a clean call: one that trapped, timed out, hit its memory limit, set no response
//!   or lost its client is dropped, never put back;
//! - bounded: at most `per_function_max` idle instances per version and `total_max` on the node
//!   (beyond either, the instance is dropped instead of kept), each for at most its function's
//!   idle time (a sweeper drops older ones every [`SWEEP_EVERY`]).
//!
//! An idle instance holds a slot of the pooling allocator and the memory its guest touched.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sluice_core::FunctionConfig;
use tokio::sync::OwnedSemaphorePermit;
use wasmtime::Store;
use wasmtime_wasi_http::p2::bindings::Proxy;

use crate::host::Host;
use crate::logs::LogCapture;

/// How often idle instances past their idle time are dropped.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The instances that may serve a call: one version of one function of one tenant, with one
/// component.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WarmKey {
    pub tenant: Arc<str>,
    pub function: Arc<str>,
    pub version: i64,
    pub digest: Arc<str>,
}

/// What a call asks of the warm pools: where its instance comes from and goes back to.
#[derive(Debug, Clone)]
pub struct Reuse {
    pub key: WarmKey,
}

impl WarmKey {
    pub fn new(tenant: &str, function: &str, version: i64, digest: &str) -> Self {
        Self { tenant: Arc::from(tenant), function: Arc::from(function), version, digest: Arc::from(digest) }
    }
}

impl Reuse {
    /// What a call of this version asks of the pools: `None` unless its configuration lets an
    /// instance serve more than one call.
    pub fn of(
        tenant: &str,
        function: &str,
        version: i64,
        digest: &str,
        config: &FunctionConfig,
    ) -> Option<Self> {
        (config.reuse_calls > 1).then(|| Self {
            key: WarmKey {
                tenant: Arc::from(tenant),
                function: Arc::from(function),
                version,
                digest: Arc::from(digest),
            },
        })
    }
}

/// An idle instance.
pub(crate) struct Warm {
    pub(crate) store: Store<Host>,
    pub(crate) proxy: Proxy,
    /// The configuration it was made with: a call with another one does not get it.
    pub(crate) config: Arc<FunctionConfig>,
    /// Its log capture (the guest's stdout and stderr are bound to it); drained after each call.
    pub(crate) logs: LogCapture,
    /// Calls it has served.
    pub(crate) calls: u32,
    /// Its linear memory, which stays allocated while it waits.
    bytes: u64,
    idle_since: Instant,
    /// The heavy engine's pool slot it holds (a heavy component's): given back after the store
    /// is dropped (fields drop in order), so the pool never has more instances than slots.
    pub(crate) heavy_slot: Option<crate::heavy::HeavySlot>,
}

impl Warm {
    pub(crate) fn new(
        store: Store<Host>,
        proxy: Proxy,
        config: Arc<FunctionConfig>,
        logs: LogCapture,
        calls: u32,
        heavy_slot: Option<crate::heavy::HeavySlot>,
    ) -> Self {
        let bytes = store.data().limiter.memory_bytes as u64;
        Self { store, proxy, config, logs, calls, bytes, idle_since: Instant::now(), heavy_slot }
    }

    fn expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.idle_since) >= Duration::from_millis(self.config.reuse_idle_ms)
    }
}

/// Bounds of the warm pools.
#[derive(Debug, Clone, Copy)]
pub struct WarmConfig {
    /// Idle instances kept on the node, over all functions.
    pub total_max: usize,
    /// Idle instances kept per function version.
    pub per_function_max: usize,
    /// Linear memory of the idle instances kept on the node, over all functions: a guest that
    /// grew to its memory limit before returning must not make the pool hold that much times
    /// its count.
    pub memory_max: u64,
}

impl Default for WarmConfig {
    fn default() -> Self {
        Self { total_max: 32, per_function_max: 8, memory_max: 512 << 20 }
    }
}

/// What the warm pools hold and have done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WarmStats {
    /// Idle instances now, and their linear memory in bytes.
    pub idle: u64,
    pub idle_bytes: u64,
    /// Function versions with at least one.
    pub functions: u64,
    /// Calls served by a warm instance, and by a fresh one of a function with reuse on.
    pub reused_total: u64,
    pub fresh_total: u64,
    /// Instances dropped instead of kept because a bound was reached, and because they waited
    /// longer than their idle time.
    pub dropped_full_total: u64,
    pub expired_total: u64,
    /// Calls of functions with reuse that have ended (their instance kept or dropped): equal to
    /// `reused_total + fresh_total` when none is running.
    pub ended_total: u64,
}

#[derive(Default)]
pub(crate) struct WarmPools {
    config: WarmConfig,
    /// Most recently idle last: calls take the warmest, the rest age out.
    idle: Mutex<HashMap<WarmKey, Vec<Warm>>>,
    reused: AtomicU64,
    fresh: AtomicU64,
    dropped_full: AtomicU64,
    expired: AtomicU64,
    ended: AtomicU64,
    /// Calls in a row that failed on a warm instance, per version; at [`WARM_FAILURES_MAX`] the
    /// version is not reused any more (`unreusable`).
    warm_failures: Mutex<HashMap<WarmKey, u32>>,
    unreusable: Mutex<std::collections::HashSet<WarmKey>>,
}

/// Calls in a row that may fail on a warm instance of a version before its instances are no
/// longer reused: some guests cannot serve a second call (componentize-js 0.23's StarlingMonkey
/// answers the second with "FetchEvent#respondWith can't be called twice").
pub const WARM_FAILURES_MAX: u32 = 3;

/// Versions whose warm failures (or unreusability) are remembered, at most: past it the record
/// starts over, so a tenant deploying versions in a loop cannot grow it without bound. A version
/// forgotten that way only fails [`WARM_FAILURES_MAX`] more warm calls before it is found out
/// again.
pub const TRACKED_VERSIONS_MAX: usize = 4096;

impl WarmPools {
    pub(crate) fn new(config: WarmConfig) -> Arc<Self> {
        let pools = Arc::new(Self { config, ..Self::default() });
        spawn_sweeper(Arc::downgrade(&pools));
        pools
    }

    /// An idle instance for a call of `key` with `config`, if there is one.
    pub(crate) fn take(&self, key: &WarmKey, config: &FunctionConfig) -> Option<Warm> {
        let mut stale = Vec::new();
        let mut found = None;
        if !self.reusable(key) {
            self.fresh.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        {
            let mut idle = self.idle.lock().expect("warm pools lock");
            if let Some(list) = idle.get_mut(key) {
                let now = Instant::now();
                while let Some(w) = list.pop() {
                    if *w.config == *config && !w.expired(now) {
                        found = Some(w);
                        break;
                    }
                    stale.push(w);
                }
                if list.is_empty() {
                    idle.remove(key);
                }
            }
        }
        // Instances are dropped outside the lock: freeing one resets its memory.
        self.expired.fetch_add(stale.len() as u64, Ordering::Relaxed);
        drop(stale);
        let counter = if found.is_some() { &self.reused } else { &self.fresh };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Whether instances of `key` may still serve more than one call.
    pub(crate) fn reusable(&self, key: &WarmKey) -> bool {
        !self.unreusable.lock().expect("warm pools lock").contains(key)
    }

    /// Notes how a call on a warm instance of `key` ended; returns true when this failure makes
    /// the version unreusable.
    pub(crate) fn warm_call_ended(&self, key: &WarmKey, failed: bool) -> bool {
        let mut failures = self.warm_failures.lock().expect("warm pools lock");
        if !failed {
            failures.remove(key);
            return false;
        }
        if failures.len() >= TRACKED_VERSIONS_MAX && !failures.contains_key(key) {
            failures.clear();
        }
        let n = failures.entry(key.clone()).or_default();
        *n += 1;
        if *n < WARM_FAILURES_MAX {
            return false;
        }
        failures.remove(key);
        drop(failures);
        {
            let mut unreusable = self.unreusable.lock().expect("warm pools lock");
            if unreusable.len() >= TRACKED_VERSIONS_MAX {
                unreusable.clear();
            }
            unreusable.insert(key.clone());
        }
        // Its idle instances go too.
        let gone = self.idle.lock().expect("warm pools lock").remove(key);
        drop(gone);
        true
    }

    /// Counts the end of a call of a function with reuse, after its instance was kept (or not).
    pub(crate) fn ended(&self) {
        self.ended.fetch_add(1, Ordering::Relaxed);
    }

    /// Keeps `warm` for the next call of `key`, unless a bound is reached (it is dropped then).
    pub(crate) fn put(&self, key: WarmKey, warm: Warm) {
        if !self.reusable(&key) {
            return;
        }
        let mut idle = self.idle.lock().expect("warm pools lock");
        let total: usize = idle.values().map(Vec::len).sum();
        let bytes: u64 = idle.values().flatten().map(|w| w.bytes).sum();
        let list = idle.entry(key).or_default();
        if total >= self.config.total_max
            || list.len() >= self.config.per_function_max
            || bytes.saturating_add(warm.bytes) > self.config.memory_max
        {
            drop(idle);
            self.dropped_full.fetch_add(1, Ordering::Relaxed);
            drop(warm);
            return;
        }
        list.push(warm);
    }

    /// Drops the idle instance of a heavy component that has waited longest, if there is one, so
    /// its pool slot serves a call that needs a fresh one. Returns whether it dropped one.
    pub(crate) fn drop_idle_heavy(&self) -> bool {
        let gone = {
            let mut idle = self.idle.lock().expect("warm pools lock");
            let oldest = idle
                .iter()
                .filter_map(|(k, list)| {
                    // Most recently idle last: the first is the oldest of its version.
                    list.first().filter(|w| w.heavy_slot.is_some()).map(|w| (k.clone(), w.idle_since))
                })
                .min_by_key(|(_, since)| *since);
            oldest.map(|(key, _)| {
                let list = idle.get_mut(&key).expect("found above");
                let w = list.remove(0);
                if list.is_empty() {
                    idle.remove(&key);
                }
                w
            })
        };
        let dropped = gone.is_some();
        if dropped {
            self.dropped_full.fetch_add(1, Ordering::Relaxed);
        }
        dropped
    }

    /// Drops the idle instances that waited longer than their idle time.
    fn sweep(&self, now: Instant) {
        let mut gone = Vec::new();
        {
            let mut idle = self.idle.lock().expect("warm pools lock");
            idle.retain(|_, list| {
                let (old, keep): (Vec<Warm>, Vec<Warm>) =
                    std::mem::take(list).into_iter().partition(|w| w.expired(now));
                gone.extend(old);
                *list = keep;
                !list.is_empty()
            });
        }
        self.expired.fetch_add(gone.len() as u64, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> WarmStats {
        let idle = self.idle.lock().expect("warm pools lock");
        WarmStats {
            idle: idle.values().map(|l| l.len() as u64).sum(),
            idle_bytes: idle.values().flatten().map(|w| w.bytes).sum(),
            functions: idle.len() as u64,
            reused_total: self.reused.load(Ordering::Relaxed),
            fresh_total: self.fresh.load(Ordering::Relaxed),
            dropped_full_total: self.dropped_full.load(Ordering::Relaxed),
            expired_total: self.expired.load(Ordering::Relaxed),
            ended_total: self.ended.load(Ordering::Relaxed),
        }
    }
}

/// The bounds of instances alive at once, per function version (`instances_max`, or the default
/// of heavy components): a semaphore per version, shared by its sync and async calls, kept while
/// a caller holds it (weakly referenced here, so versions that are gone take nothing).
#[derive(Default)]
pub(crate) struct InstanceLimits {
    by_version: Mutex<HashMap<WarmKey, Weak<tokio::sync::Semaphore>>>,
}

/// Room for one instance of a bounded version (and for a heavy component, a slot in the heavy
/// engine's pool); given back when dropped.
pub struct InstancePermit {
    _permit: OwnedSemaphorePermit,
    pub(crate) heavy_slot: Option<crate::heavy::HeavySlot>,
}

impl InstanceLimits {
    pub(crate) async fn acquire(
        &self,
        key: &WarmKey,
        max: u32,
        deadline: Instant,
    ) -> Result<InstancePermit, sluice_core::SluiceError> {
        let semaphore = {
            let mut map = self.by_version.lock().expect("instance limits lock");
            match map.get(key).and_then(Weak::upgrade) {
                Some(s) => s,
                None => {
                    map.retain(|_, s| s.strong_count() > 0);
                    let s = Arc::new(tokio::sync::Semaphore::new(max as usize));
                    map.insert(key.clone(), Arc::downgrade(&s));
                    s
                }
            }
        };
        let permit = acquire_by(semaphore, deadline, || {
            format!("all {max} instances this node runs at once of {}/{} are busy", key.tenant, key.function)
        })
        .await?;
        Ok(InstancePermit { _permit: permit, heavy_slot: None })
    }
}

/// A permit of `semaphore`, waiting until `deadline`; past it, `overloaded` with a retry in 1 s,
/// saying what was `busy`.
pub(crate) async fn acquire_by(
    semaphore: Arc<tokio::sync::Semaphore>,
    deadline: Instant,
    busy: impl FnOnce() -> String,
) -> Result<OwnedSemaphorePermit, sluice_core::SluiceError> {
    match tokio::time::timeout_at(deadline.into(), semaphore.acquire_owned()).await {
        Ok(Ok(permit)) => Ok(permit),
        Ok(Err(_)) => Err(sluice_core::SluiceError::internal("an instance limit was closed")),
        Err(_) => Err(sluice_core::SluiceError::new(
            sluice_core::ErrorKind::Overloaded,
            format!("{}; retry later", busy()),
        )
        .retry_after(1)),
    }
}

/// Sweeps every [`SWEEP_EVERY`] from a plain thread, which ends with the pools.
fn spawn_sweeper(pools: Weak<WarmPools>) {
    std::thread::Builder::new()
        .name("sluice-warm".into())
        .spawn(move || {
            loop {
                std::thread::sleep(SWEEP_EVERY);
                let Some(pools) = pools.upgrade() else { return };
                pools.sweep(Instant::now());
            }
        })
        .expect("spawning the warm-pool sweeper");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_whose_warm_calls_keep_failing_is_not_reused_any_more() {
        let pools = WarmPools::default();
        let key = WarmKey::new("t", "f", 1, "d");
        assert!(!pools.warm_call_ended(&key, true));
        assert!(!pools.warm_call_ended(&key, false), "a success starts the count again");
        for _ in 1..WARM_FAILURES_MAX {
            assert!(!pools.warm_call_ended(&key, true));
        }
        assert!(pools.reusable(&key));
        assert!(pools.warm_call_ended(&key, true), "the third failure in a row");
        assert!(!pools.reusable(&key));
        assert!(pools.take(&key, &FunctionConfig::default()).is_none());
        assert!(pools.reusable(&WarmKey::new("t", "f", 2, "d")), "another version is not affected");
    }

    #[test]
    fn the_record_of_failing_versions_is_bounded() {
        let pools = WarmPools::default();
        for v in 0..(TRACKED_VERSIONS_MAX as i64 + 10) {
            let key = WarmKey::new("t", "f", v, "d");
            for _ in 0..WARM_FAILURES_MAX {
                pools.warm_call_ended(&key, true);
            }
            pools.warm_call_ended(&WarmKey::new("t", "g", v, "d"), true);
        }
        assert!(pools.warm_failures.lock().unwrap().len() <= TRACKED_VERSIONS_MAX);
        assert!(pools.unreusable.lock().unwrap().len() <= TRACKED_VERSIONS_MAX);
        let last = WarmKey::new("t", "f", TRACKED_VERSIONS_MAX as i64 + 9, "d");
        assert!(!pools.reusable(&last), "the newest stays recorded");
    }

    #[tokio::test]
    async fn an_instance_bound_makes_calls_wait_and_refuses_them_at_their_deadline() {
        let limits = InstanceLimits::default();
        let key = WarmKey::new("t", "f", 1, "d");
        let soon = || Instant::now() + Duration::from_millis(100);
        let first = limits.acquire(&key, 1, soon()).await.unwrap();
        let err = limits.acquire(&key, 1, soon()).await.err().unwrap();
        assert_eq!(err.kind, sluice_core::ErrorKind::Overloaded);
        assert!(err.message.contains("all 1 instances") && err.message.contains("t/f"), "{}", err.message);
        drop(first);
        let again = limits.acquire(&key, 1, soon()).await.unwrap();
        // Another version has a bound of its own.
        let other = limits.acquire(&WarmKey::new("t", "f", 2, "d"), 1, soon()).await.unwrap();
        drop((again, other));
        // A version nobody holds leaves nothing behind.
        limits.acquire(&WarmKey::new("t", "g", 1, "d"), 1, soon()).await.unwrap();
        let held = limits.by_version.lock().unwrap().values().filter(|s| s.strong_count() > 0).count();
        assert_eq!(held, 0);
    }
}
