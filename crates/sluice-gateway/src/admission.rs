//! Admission control on the request path: per-tenant and per-function token buckets, per-function
//! concurrency caps, and node-wide load shedding. Each refusal is immediate — no work is done and
//! nothing waits — and tells the client when to come back.
//!
//! Rate limits use governor's GCRA (lock-free, one atomic per check) with its clock injected, so
//! tests advance time instead of sleeping (linkerd2-proxy's approach).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
pub use sluice_core::share::{Gauge, Slot};
use sluice_core::share::{SharedSlot, TenantShares};
use sluice_core::{ErrorKind, SluiceError};

/// A rate: `per_sec` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_sec: f64,
    pub burst: u32,
}

impl Rate {
    /// The rate of a function version's configuration, if it has one.
    pub fn of(per_sec: Option<f64>, burst: Option<u32>) -> Option<Self> {
        let per_sec = per_sec?;
        Some(Self { per_sec, burst: burst.unwrap_or_else(|| per_sec.ceil().max(1.0) as u32) })
    }
}

/// One token bucket, named for the `RateLimit-Policy` header.
pub struct Bucket<C: Clock = DefaultClock> {
    name: &'static str,
    rate: Rate,
    limiter: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>,
    clock: C,
}

impl<C: Clock + Clone> Bucket<C> {
    /// `None` for a rate that cannot be a bucket (not positive, or a refill period that does not
    /// fit a `Duration`); callers validate rates first, this only keeps a bad one from panicking.
    pub fn new(name: &'static str, rate: Rate, clock: C) -> Option<Self> {
        if !(rate.per_sec.is_finite() && rate.per_sec > 0.0) {
            return None;
        }
        let period = Duration::try_from_secs_f64(1.0 / rate.per_sec).ok()?;
        let quota = Quota::with_period(period)?.allow_burst(std::num::NonZeroU32::new(rate.burst.max(1))?);
        let limiter = RateLimiter::direct_with_clock(quota, clock.clone());
        Some(Self { name, rate, limiter, clock })
    }

    /// Takes a token, or says how long until one is free, as a 429 with `Retry-After` and the
    /// IETF `RateLimit-Policy`/`RateLimit` fields (draft-ietf-httpapi-ratelimit-headers).
    pub fn check(&self, what: &str) -> Result<(), SluiceError> {
        match self.limiter.check() {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                let window = (f64::from(self.rate.burst) / self.rate.per_sec).ceil().max(1.0) as u64;
                Err(SluiceError::new(
                    ErrorKind::RateLimited,
                    format!(
                        "{what} is over its rate limit of {}/s (burst {}); retry in {secs}s",
                        self.rate.per_sec, self.rate.burst
                    ),
                )
                .retry_after(secs)
                .header("ratelimit-policy", format!("\"{}\";q={};w={window}", self.name, self.rate.burst))
                .header("ratelimit", format!("\"{}\";r=0;t={secs}", self.name)))
            }
        }
    }
}

/// What a node admits, node-wide and per tenant.
pub struct Admission<C: Clock = DefaultClock> {
    clock: C,
    /// Sync calls running on this node at most; beyond it new calls are shed with 503.
    pub sync_inflight_max: usize,
    /// Sync calls in flight, with a share per tenant (none unless [`Admission::with_sync_tenant_max`]).
    sync_inflight: TenantShares,
    tenant_default: Option<Rate>,
    tenants: RwLock<HashMap<String, Arc<Bucket<C>>>>,
    /// The tenants with a rate of their own, and that rate.
    own_rates: RwLock<HashMap<String, Rate>>,
    /// The rate of each tenant's keyless callers (of its public functions), a bucket per tenant
    /// apart from the tenant's own, so that anonymous traffic cannot take all of the tenant's
    /// rate; `None`: no such bucket.
    pub anonymous_default: Option<Rate>,
    anonymous: RwLock<HashMap<String, Arc<Bucket<C>>>>,
}

impl<C: Clock + Clone> Admission<C> {
    pub fn new(clock: C, sync_inflight_max: usize, tenant_default: Option<Rate>) -> Self {
        Self {
            clock,
            sync_inflight_max,
            sync_inflight: TenantShares::new("sync calls in flight", sync_inflight_max, sync_inflight_max),
            tenant_default,
            tenants: RwLock::default(),
            own_rates: RwLock::default(),
            anonymous_default: None,
            anonymous: RwLock::default(),
        }
    }

    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// Sets (or, with `None`, removes) a tenant's own rate, replacing the node default.
    pub fn set_tenant_rate(&self, tenant: &str, rate: Option<Rate>) {
        let mut own = self.own_rates.write().expect("own rates lock");
        match rate {
            Some(r) => own.insert(tenant.to_string(), r),
            None => own.remove(tenant),
        };
        let mut map = self.tenants.write().expect("tenant buckets lock");
        match rate.and_then(|r| Bucket::new("tenant", r, self.clock.clone())) {
            Some(b) => map.insert(tenant.to_string(), Arc::new(b)),
            None => map.remove(tenant),
        };
    }

    /// Makes `rates` the tenants' own rates: a tenant whose rate changed gets a new bucket, one
    /// that lost its rate goes back to the default, and the others keep their buckets (and the
    /// tokens they used), so reloading an unchanged list changes nothing.
    pub fn replace_tenant_rates(&self, rates: &[(String, Rate)]) {
        let current = self.own_rates.read().expect("own rates lock").clone();
        let wanted: HashMap<&str, Rate> = rates.iter().map(|(t, r)| (t.as_str(), *r)).collect();
        for tenant in current.keys().filter(|t| !wanted.contains_key(t.as_str())) {
            self.set_tenant_rate(tenant, None);
        }
        for (tenant, rate) in wanted {
            if current.get(tenant) != Some(&rate) {
                self.set_tenant_rate(tenant, Some(rate));
            }
        }
    }

    fn tenant_bucket(&self, tenant: &str) -> Option<Arc<Bucket<C>>> {
        if let Some(b) = self.tenants.read().expect("tenant buckets lock").get(tenant) {
            return Some(b.clone());
        }
        let rate = self.tenant_default?;
        let bucket = Arc::new(Bucket::new("tenant", rate, self.clock.clone())?);
        let mut map = self.tenants.write().expect("tenant buckets lock");
        Some(map.entry(tenant.to_string()).or_insert(bucket).clone())
    }

    /// Gives each tenant a share of the node's sync calls in flight: `max` of them.
    pub fn with_sync_tenant_max(mut self, max: usize) -> Self {
        self.sync_inflight = TenantShares::new("sync calls in flight", self.sync_inflight_max, max);
        self
    }

    /// Load shedding: a slot for one more sync call of `tenant`, or at once 429 when the tenant
    /// holds its share of the node's, 503 when the node is full.
    pub fn shed(&self, tenant: &str) -> Result<SharedSlot, SluiceError> {
        self.sync_inflight.admit(tenant, || format!("tenant {tenant}"))
    }

    /// The tenant's token bucket.
    pub fn tenant(&self, tenant: &str) -> Result<(), SluiceError> {
        match self.tenant_bucket(tenant) {
            Some(b) => b.check(&format!("tenant {tenant}")),
            None => Ok(()),
        }
    }

    /// The bucket of `tenant`'s anonymous callers (none without [`Admission::anonymous_default`]).
    pub fn anonymous(&self, tenant: &str) -> Result<(), SluiceError> {
        let Some(rate) = self.anonymous_default else { return Ok(()) };
        let found = self.anonymous.read().expect("anonymous buckets lock").get(tenant).cloned();
        let bucket = match found {
            Some(b) => b,
            None => {
                let Some(b) = Bucket::new("anonymous", rate, self.clock.clone()) else { return Ok(()) };
                let mut map = self.anonymous.write().expect("anonymous buckets lock");
                map.entry(tenant.to_string()).or_insert(Arc::new(b)).clone()
            }
        };
        bucket.check(&format!("anonymous calls to tenant {tenant} (calls without a key)"))
    }

    pub fn sync_inflight(&self) -> usize {
        self.sync_inflight.current()
    }
}

/// The admission state of one function version: its bucket and its concurrency gauge, both shared
/// with the versions before and after it (see [`FunctionAdmission::inherit`]).
pub struct FunctionAdmission<C: Clock = DefaultClock> {
    pub bucket: Option<Arc<Bucket<C>>>,
    pub max_concurrency: Option<usize>,
    pub inflight: Arc<Gauge>,
}

impl<C: Clock + Clone> FunctionAdmission<C> {
    pub fn new(rate: Option<Rate>, max_concurrency: Option<u32>, clock: C) -> Self {
        Self {
            bucket: rate.and_then(|r| Bucket::new("function", r, clock)).map(Arc::new),
            max_concurrency: max_concurrency.map(|m| m as usize),
            inflight: Arc::default(),
        }
    }

    /// Takes over the function's state from the version this one replaces, so that a redeploy
    /// resets nothing: calls still running on the old version count against the new cap, and the
    /// bucket carries over unless the rate changed (tokens counted at another rate mean nothing
    /// at the new one).
    pub fn inherit(&mut self, previous: &Self) {
        self.inflight = previous.inflight.clone();
        if let (Some(new), Some(old)) = (&self.bucket, &previous.bucket)
            && new.rate == old.rate
        {
            self.bucket = Some(old.clone());
        }
    }

    /// The function's token bucket.
    pub fn check_rate(&self, name: &str) -> Result<(), SluiceError> {
        match &self.bucket {
            Some(b) => b.check(&format!("function {name}")),
            None => Ok(()),
        }
    }

    /// A slot under the function's concurrency cap (none needed without a cap).
    pub fn acquire(&self, name: &str) -> Result<Option<Slot>, SluiceError> {
        match self.max_concurrency {
            None => Ok(None),
            Some(max) => self.inflight.try_acquire(max).map(Some).ok_or_else(|| {
                SluiceError::new(
                    ErrorKind::ConcurrencyLimited,
                    format!("function {name} already runs {max} calls at once (its max concurrency)"),
                )
                .retry_after(1)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    #[test]
    fn bucket_allows_burst_then_refuses_until_refilled() {
        let clock = FakeRelativeClock::default();
        let b = Bucket::new("function", Rate { per_sec: 2.0, burst: 3 }, clock.clone()).unwrap();
        for _ in 0..3 {
            b.check("f").unwrap();
        }
        let err = b.check("f").unwrap_err();
        assert_eq!(err.kind, ErrorKind::RateLimited);
        assert_eq!(err.retry_after_secs, Some(1));
        assert!(
            err.headers.contains(&("ratelimit-policy", "\"function\";q=3;w=2".to_string())),
            "{:?}",
            err.headers
        );
        assert!(err.headers.contains(&("ratelimit", "\"function\";r=0;t=1".to_string())));
        clock.advance(Duration::from_millis(499));
        assert!(b.check("f").is_err(), "not yet refilled");
        clock.advance(Duration::from_millis(1));
        b.check("f").unwrap();
        assert!(b.check("f").is_err());
    }

    #[test]
    fn rates_that_cannot_be_buckets_are_refused_not_panicked_on() {
        for per_sec in [5e-324, 0.0, -1.0, f64::NAN, f64::INFINITY, 1e300] {
            assert!(
                Bucket::new("f", Rate { per_sec, burst: 1 }, FakeRelativeClock::default()).is_none(),
                "{per_sec}"
            );
        }
    }

    #[test]
    fn slow_rates_report_long_retry_after() {
        let clock = FakeRelativeClock::default();
        let b = Bucket::new("tenant", Rate { per_sec: 0.1, burst: 1 }, clock.clone()).unwrap();
        b.check("t").unwrap();
        assert_eq!(b.check("t").unwrap_err().retry_after_secs, Some(10));
        clock.advance(Duration::from_secs(10));
        b.check("t").unwrap();
    }

    #[test]
    fn tenants_have_separate_buckets_and_overrides() {
        let clock = FakeRelativeClock::default();
        let a = Admission::new(clock.clone(), 10, Some(Rate { per_sec: 1.0, burst: 1 }));
        a.tenant("x").unwrap();
        assert!(a.tenant("x").is_err());
        a.tenant("y").unwrap();
        a.set_tenant_rate("y", Some(Rate { per_sec: 100.0, burst: 5 }));
        for _ in 0..5 {
            a.tenant("y").unwrap();
        }
        assert!(a.tenant("y").is_err());
        let unlimited = Admission::new(clock, 10, None);
        for _ in 0..1000 {
            unlimited.tenant("x").unwrap();
        }
    }

    #[test]
    fn anonymous_callers_have_a_bucket_per_tenant_apart_from_the_tenants() {
        let clock = FakeRelativeClock::default();
        let mut a = Admission::new(clock.clone(), 10, Some(Rate { per_sec: 100.0, burst: 100 }));
        a.anonymous_default = Some(Rate { per_sec: 1.0, burst: 2 });
        a.anonymous("x").unwrap();
        a.anonymous("x").unwrap();
        let err = a.anonymous("x").unwrap_err();
        assert_eq!(err.kind, ErrorKind::RateLimited);
        assert!(err.message.contains("anonymous calls to tenant x"), "{}", err.message);
        assert!(err.headers.contains(&("ratelimit-policy", "\"anonymous\";q=2;w=2".to_string())));
        // The tenant's own bucket is untouched, and another tenant's anonymous callers have theirs.
        a.tenant("x").unwrap();
        a.anonymous("y").unwrap();
        clock.advance(Duration::from_secs(1));
        a.anonymous("x").unwrap();
    }

    #[test]
    fn concurrency_and_shedding_give_slots_back() {
        let clock = FakeRelativeClock::default();
        let f = FunctionAdmission::new(None, Some(2), clock.clone());
        let s1 = f.acquire("f").unwrap();
        let _s2 = f.acquire("f").unwrap();
        assert_eq!(f.acquire("f").unwrap_err().kind, ErrorKind::ConcurrencyLimited);
        drop(s1);
        assert!(f.acquire("f").is_ok());

        let a = Admission::new(clock, 2, None).with_sync_tenant_max(1);
        let slot = a.shed("t").unwrap();
        let err = a.shed("t").unwrap_err();
        assert_eq!((err.kind, err.retry_after_secs), (ErrorKind::ConcurrencyLimited, Some(1)));
        let other = a.shed("u").unwrap();
        let err = a.shed("v").unwrap_err();
        assert_eq!((err.kind, err.retry_after_secs), (ErrorKind::Overloaded, Some(1)));
        drop((slot, other));
        assert_eq!(a.sync_inflight(), 0);
        assert!(a.shed("t").is_ok());
    }
}
