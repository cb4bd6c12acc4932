//! A node-wide bound on things in flight with a share per tenant: one tenant (or all the
//! anonymous callers of its public functions) can take at most its share of the node's slots,
//! so the rest stay for everyone else. The gateway bounds sync calls, async accepts and deploys
//! with it; the runtime its heavy engine's slots (there calls wait instead of being refused, and
//! the waiting is the runtime's: see `sluice_runtime::heavy`). The CPU lanes do the same for
//! slow-lane slots.
//!
//! The tenant's slot is taken first: a tenant at its share must not hold node slots that other
//! tenants could use. Both refusals are immediate; nothing waits, and nothing here does I/O.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::{ErrorKind, SluiceError};

/// A counter of calls in flight with a bound; the permit gives its slot back when dropped.
#[derive(Debug, Default)]
pub struct Gauge {
    inflight: AtomicUsize,
}

impl Gauge {
    pub fn try_acquire(self: &Arc<Self>, max: usize) -> Option<Slot> {
        let mut current = self.inflight.load(Ordering::Relaxed);
        loop {
            if current >= max {
                return None;
            }
            match self.inflight.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(Slot(self.clone())),
                Err(seen) => current = seen,
            }
        }
    }

    pub fn current(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// A slot under a node-wide bound, or 503 `overloaded` with `Retry-After` at once, saying
    /// `refusal`.
    pub fn admit(
        self: &Arc<Self>,
        max: usize,
        refusal: impl FnOnce() -> String,
    ) -> Result<Slot, SluiceError> {
        self.try_acquire(max).ok_or_else(|| SluiceError::new(ErrorKind::Overloaded, refusal()).retry_after(1))
    }
}

/// A held slot of a [`Gauge`].
#[derive(Debug)]
pub struct Slot(Arc<Gauge>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Slots of a node-wide bound, shared out per tenant.
#[derive(Debug)]
pub struct TenantShares {
    /// What is bounded, for the refusals ("async calls being accepted").
    what: &'static str,
    node_max: usize,
    tenant_max: usize,
    node: Arc<Gauge>,
    /// In-flight counts per tenant. Tenants are bounded by the store; an entry is a counter.
    tenants: RwLock<HashMap<String, Arc<Gauge>>>,
}

/// A tenant's slot and the node's, given back when dropped.
#[derive(Debug)]
pub struct SharedSlot {
    _tenant: Option<Slot>,
    _node: Slot,
}

impl TenantShares {
    /// `tenant_max` at or above `node_max` means no share: one tenant may take every slot.
    pub fn new(what: &'static str, node_max: usize, tenant_max: usize) -> Self {
        Self { what, node_max, tenant_max, node: Arc::default(), tenants: RwLock::default() }
    }

    /// A tenant's share of `node_max` slots: `fraction` of them (the default, 1/4, is a
    /// tenant's share of the slow lane), rounded down, at least 1.
    pub fn share_of(node_max: usize, fraction: f64) -> usize {
        ((node_max as f64 * fraction) as usize).clamp(1, node_max.max(1))
    }

    pub fn node_max(&self) -> usize {
        self.node_max
    }

    pub fn tenant_max(&self) -> usize {
        self.tenant_max
    }

    /// Slots held now, on the whole node.
    pub fn current(&self) -> usize {
        self.node.current()
    }

    /// A slot for one more of `tenant`'s, or at once: 429 `concurrency_limited` when the tenant
    /// holds its share (`who` names it in the message), 503 `overloaded` when the node is full.
    /// Both say `Retry-After: 1`.
    pub fn admit(&self, tenant: &str, who: impl FnOnce() -> String) -> Result<SharedSlot, SluiceError> {
        if self.tenant_max >= self.node_max {
            // No share: a full node is the only refusal.
            return self.admit_unshared();
        }
        let gauge = self.tenant_gauge(tenant);
        let tenant_slot = gauge.try_acquire(self.tenant_max).ok_or_else(|| {
            SluiceError::new(
                ErrorKind::ConcurrencyLimited,
                format!(
                    "{} already has {} {} on this node, its share; retry shortly",
                    who(),
                    self.tenant_max,
                    self.what
                ),
            )
            .retry_after(1)
        })?;
        let mut slot = self.admit_unshared()?;
        slot._tenant = Some(tenant_slot);
        Ok(slot)
    }

    /// A slot beyond `tenant`'s share, counted in its holdings (see [`TenantShares::held_by`]):
    /// only the node's bound applies. For a caller that has decided no other tenant needs the
    /// slot (the heavy slots: nobody else waits for one).
    pub fn admit_beyond_share(&self, tenant: &str) -> Result<SharedSlot, SluiceError> {
        let tenant_slot = self.tenant_gauge(tenant).try_acquire(usize::MAX).expect("an unbounded gauge");
        let mut slot = self.admit_unshared()?;
        slot._tenant = Some(tenant_slot);
        Ok(slot)
    }

    /// Slots `tenant` holds now (those taken through [`TenantShares::admit`] with a share, or
    /// [`TenantShares::admit_beyond_share`]).
    pub fn held_by(&self, tenant: &str) -> usize {
        self.tenants.read().expect("tenant shares lock").get(tenant).map_or(0, |g| g.current())
    }

    /// A slot of the node's bound only, for a caller no tenant's share applies to (the
    /// operator's admin keys).
    pub fn admit_unshared(&self) -> Result<SharedSlot, SluiceError> {
        let max = self.node_max;
        let node_slot =
            self.node.admit(max, || format!("this node already has {max} {}; retry shortly", self.what))?;
        Ok(SharedSlot { _tenant: None, _node: node_slot })
    }

    fn tenant_gauge(&self, tenant: &str) -> Arc<Gauge> {
        // Read-locked on the sync path (every call): a write only for a tenant's first call.
        if let Some(g) = self.tenants.read().expect("tenant shares lock").get(tenant) {
            return g.clone();
        }
        let mut map = self.tenants.write().expect("tenant shares lock");
        map.entry(tenant.to_string()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_at_its_share_is_refused_and_holds_no_node_slot() {
        let shares = TenantShares::new("async calls being accepted", 3, 2);
        let held: Vec<_> =
            (0..2).map(|_| shares.admit("mallory", || "tenant mallory".into()).unwrap()).collect();
        let refused = shares.admit("mallory", || "tenant mallory".into()).unwrap_err();
        assert_eq!(refused.kind, ErrorKind::ConcurrencyLimited);
        assert_eq!(refused.retry_after_secs, Some(1));
        assert!(
            refused.message.contains("tenant mallory already has 2 async calls being accepted"),
            "{}",
            refused.message
        );
        assert_eq!(shares.current(), 2, "the refusal took no node slot");
        let acme = shares.admit("acme", || "tenant acme".into()).unwrap();
        let full = shares.admit("bravo", || "tenant bravo".into()).unwrap_err();
        assert_eq!(full.kind, ErrorKind::Overloaded);
        drop((held, acme));
        assert_eq!(shares.current(), 0);
        shares.admit("mallory", || "tenant mallory".into()).unwrap();
    }

    #[test]
    fn a_slot_beyond_the_share_counts_for_the_tenant_and_the_node() {
        let shares = TenantShares::new("heavy instances", 3, 1);
        let first = shares.admit("acme", || "tenant acme".into()).unwrap();
        let beyond = shares.admit_beyond_share("acme").unwrap();
        assert_eq!((shares.held_by("acme"), shares.held_by("bravo"), shares.current()), (2, 0, 2));
        let _bravo = shares.admit("bravo", || "tenant bravo".into()).unwrap();
        let full = shares.admit_beyond_share("acme").unwrap_err();
        assert_eq!(full.kind, ErrorKind::Overloaded);
        assert_eq!(shares.held_by("acme"), 2, "the refusal counted nothing for acme");
        drop((first, beyond));
        assert_eq!((shares.held_by("acme"), shares.current()), (0, 1));
    }

    #[test]
    fn a_share_is_a_fraction_of_the_node_and_at_least_one() {
        assert_eq!(TenantShares::share_of(256, 0.25), 64);
        assert_eq!(TenantShares::share_of(8, 0.25), 2);
        assert_eq!(TenantShares::share_of(2, 0.25), 1);
        assert_eq!(TenantShares::share_of(8, 1.0), 8);
    }
}
