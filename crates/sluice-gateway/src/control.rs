//! Admission to the control plane (`/v1` and `/metrics`): a token bucket per API key, a bound
//! on requests in flight per tenant, and a bound per node.
//!
//! The control API runs on a runtime of its own (the API runtime, one thread: `serve`), not on
//! the control runtime where the scheduler, the queue writer and the heartbeats run, so API work
//! can never keep their threads busy. But a read such as `GET /v1/invocations?limit=1000` still
//! costs a store query and a large JSON body: without these bounds a `read` key looping such
//! calls could keep the API runtime and the store's pooled connections busy for everyone else's
//! API calls. The checks are made on the accepting core, before anything is spawned on the API
//! runtime, from the in-memory key cache; a refusal is immediate (429 or 503 with
//! `Retry-After`), nothing waits.
//!
//! Callers are told apart by their key: requests without a valid key (which the API answers with
//! 401 without touching the store) share one "anonymous" tenant share. Admin keys belong to the
//! operator (`sluice top` polls seven routes at once with one): they have no rate limit and no
//! tenant share, but count against the node's bound like everyone else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use governor::clock::{Clock, DefaultClock};
use sluice_core::SluiceError;

use crate::admission::{Bucket, Rate};
use crate::principal::Principal;
use sluice_core::share::{SharedSlot, TenantShares};

/// Keys with a bucket at once; past it the map starts over (every key gets a full bucket again),
/// which bounds the memory a flood of distinct keys could take.
const KEY_BUCKETS_MAX: usize = 10_000;

/// The control plane's bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControlConfig {
    /// Requests per second of one API key (admin keys: none).
    pub key_rate: Rate,
    /// Requests of one tenant's keys (or of the callers without a valid key) in flight at once.
    pub tenant_inflight_max: usize,
    /// Requests in flight at once on this node.
    pub inflight_max: usize,
}

impl Default for ControlConfig {
    fn default() -> Self {
        // A person or a CLI makes a few calls a second; `sluice top` polls seven routes at once
        // every second, `invocations --wait` a few times a second. 100/s leaves room for scripts,
        // not for a flood; 16 in flight for a tenant's `top` beside its scripts.
        Self { key_rate: Rate { per_sec: 100.0, burst: 200 }, tenant_inflight_max: 16, inflight_max: 64 }
    }
}

impl ControlConfig {
    /// Rejects settings that cannot work, naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.key_rate.per_sec.is_finite()
            && self.key_rate.per_sec >= 0.001
            && self.key_rate.per_sec <= 1e9)
        {
            return Err(format!(
                "the API rate per key must be between 0.001/s and 1e9/s, got {}",
                self.key_rate.per_sec
            ));
        }
        if self.tenant_inflight_max == 0 || self.inflight_max == 0 {
            return Err("API requests in flight (per tenant and per node) must be at least 1".into());
        }
        Ok(())
    }
}

/// Who a control-plane request counts against.
enum Caller<'a> {
    Anonymous,
    Admin,
    Tenant { key_id: &'a str, tenant: &'a str },
}

/// The control plane's admission state on one node.
pub struct ControlAdmission<C: Clock = DefaultClock> {
    config: ControlConfig,
    clock: C,
    /// Requests in flight, per tenant (`""`: callers without a valid key; admin keys: the node's
    /// bound only).
    inflight: TenantShares,
    keys: Mutex<HashMap<String, Arc<Bucket<C>>>>,
}

/// A request admitted to the control plane: its slots, given back when it is dropped.
pub type ControlPass = SharedSlot;

impl<C: Clock + Clone> ControlAdmission<C> {
    pub fn new(config: ControlConfig, clock: C) -> Self {
        let inflight = TenantShares::new(
            "control API requests in flight",
            config.inflight_max,
            config.tenant_inflight_max,
        );
        Self { config, clock, inflight, keys: Mutex::default() }
    }

    pub fn config(&self) -> &ControlConfig {
        &self.config
    }

    /// Requests in flight on the control plane now.
    pub fn inflight(&self) -> usize {
        self.inflight.current()
    }

    /// Admits one request of `principal` (`None`: no valid key), or refuses it at once: 429
    /// `rate_limited` over the key's rate, 429 `concurrency_limited` over the tenant's share, 503
    /// `overloaded` over the node's bound.
    pub fn admit(&self, principal: Option<&Principal>) -> Result<ControlPass, SluiceError> {
        let caller = match principal {
            None => Caller::Anonymous,
            Some(p) if p.is_admin() => Caller::Admin,
            Some(p) => Caller::Tenant { key_id: &p.key_id, tenant: p.tenant.as_deref().unwrap_or_default() },
        };
        if let Caller::Tenant { key_id, .. } = caller {
            self.key_bucket(key_id).check("this API key")?;
        }
        match caller {
            Caller::Anonymous => self.inflight.admit("", || "requests without a valid API key".into()),
            Caller::Admin => self.inflight.admit_unshared(),
            Caller::Tenant { tenant, .. } => self.inflight.admit(tenant, || format!("tenant {tenant}")),
        }
    }

    fn key_bucket(&self, key_id: &str) -> Arc<Bucket<C>> {
        let mut map = self.keys.lock().expect("control keys lock");
        if let Some(b) = map.get(key_id) {
            return b.clone();
        }
        if map.len() >= KEY_BUCKETS_MAX {
            map.clear();
        }
        let bucket = Bucket::new("api-key", self.config.key_rate, self.clock.clone())
            .expect("the API key rate is validated before the node starts");
        map.entry(key_id.to_string()).or_insert(Arc::new(bucket)).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use sluice_core::{ErrorKind, Scope};
    use std::time::Duration;

    fn key(id: &str, tenant: &str) -> Principal {
        Principal { key_id: id.into(), tenant: Some(tenant.into()), scopes: vec![Scope::Read], alias: None }
    }

    fn admin() -> Principal {
        Principal { key_id: "admin".into(), tenant: None, scopes: vec![Scope::Admin], alias: None }
    }

    fn control(
        key_rate: Rate,
        tenant: usize,
        node: usize,
    ) -> (ControlAdmission<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let config = ControlConfig { key_rate, tenant_inflight_max: tenant, inflight_max: node };
        (ControlAdmission::new(config, clock.clone()), clock)
    }

    #[test]
    fn a_key_over_its_rate_gets_429_with_retry_after_and_others_do_not() {
        let (c, clock) = control(Rate { per_sec: 10.0, burst: 2 }, 100, 100);
        let mallory = key("k1", "mallory");
        drop(c.admit(Some(&mallory)).unwrap());
        drop(c.admit(Some(&mallory)).unwrap());
        let refused = c.admit(Some(&mallory)).unwrap_err();
        assert_eq!(refused.kind, ErrorKind::RateLimited);
        assert_eq!(refused.retry_after_secs, Some(1));
        // Another key, even of the same tenant, has its own bucket; admin keys have none.
        drop(c.admit(Some(&key("k2", "mallory"))).unwrap());
        for _ in 0..50 {
            drop(c.admit(Some(&admin())).unwrap());
        }
        clock.advance(Duration::from_millis(100));
        drop(c.admit(Some(&mallory)).unwrap());
    }

    #[test]
    fn a_tenant_at_its_share_is_refused_without_taking_the_nodes_slots() {
        let (c, _) = control(Rate { per_sec: 1000.0, burst: 1000 }, 2, 3);
        let held: Vec<_> =
            (0..2).map(|i| c.admit(Some(&key(&format!("k{i}"), "mallory"))).unwrap()).collect();
        let refused = c.admit(Some(&key("k9", "mallory"))).unwrap_err();
        assert_eq!(refused.kind, ErrorKind::ConcurrencyLimited);
        assert!(refused.message.contains("tenant mallory"), "{}", refused.message);
        assert_eq!(c.inflight(), 2, "the refused request holds no node slot");
        // Another tenant still gets the node's last slot; then the node is full for everyone.
        let other = c.admit(Some(&key("a1", "acme"))).unwrap();
        let full = c.admit(None).unwrap_err();
        assert_eq!(full.kind, ErrorKind::Overloaded);
        drop(other);
        // Anonymous callers share one share of their own.
        let anon = c.admit(None).unwrap();
        drop((held, anon));
        assert_eq!(c.inflight(), 0);
    }
}
