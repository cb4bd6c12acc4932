//! The heavy engine's pool slots, shared out per tenant.
//!
//! A heavy instance (a Python or JavaScript component) needs one of the node's few heavy slots
//! for as long as it lives, and a call that finds none free waits for one, bounded by its own
//! timeout. The slots are a [`TenantShares`] (the bound the gateway uses for sync calls and
//! deploys), but here nothing is refused: calls wait in one queue, and a freed slot goes to the
//! first waiting call whose tenant holds less than its share, else to the first waiting call.
//!
//! So the share is work-conserving: a tenant alone on the node may use every slot, as it could
//! before shares, and a tenant beyond its share takes a free slot only while no tenant under its
//! share waits for one. What it cannot do is make another tenant wait behind its own queue: a
//! tenant under its share waits at most until one slot is freed (the end of one call, or an
//! idle warm instance given up for it), however many calls the tenant beyond its share has
//! queued. A slot beyond the share is not taken back before its call ends, as the CPU lanes
//! take back a slow-lane slot at the next yield: the slot is the instance's memory, which lives
//! until the call is done.
//!
//! Invariant: while a call waits, no slot is free (every freed slot is handed to a waiting call
//! before the queue's lock is released), so a new call that finds the queue empty takes a free
//! slot without looking at shares, and one that finds it not empty queues behind it.
//!
//! This module must not know tenants beyond their names: a tenant is the caller's group.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sluice_core::share::{SharedSlot, TenantShares};
use sluice_core::{ErrorKind, SluiceError};
use tokio::sync::oneshot;

/// The heavy slots of a node and the calls waiting for one.
#[derive(Debug)]
pub(crate) struct HeavySlots {
    shares: TenantShares,
    /// Calls waiting for a slot, in the order they came. Bounded by the calls in flight, which
    /// the gateway and the scheduler bound.
    waiting: Mutex<VecDeque<Waiter>>,
    next_waiter: AtomicU64,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    tenant: Arc<str>,
    grant: oneshot::Sender<HeavySlot>,
}

/// One slot of the heavy engine's pool, held by a tenant; handed on to the next waiting call
/// when dropped.
#[derive(Debug)]
pub struct HeavySlot {
    slot: Option<SharedSlot>,
    slots: Arc<HeavySlots>,
}

impl Drop for HeavySlot {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            drop(slot);
            self.slots.hand_on();
        }
    }
}

impl HeavySlots {
    /// `slots_max` slots, of which a tenant holds `tenant_share` while others wait.
    pub(crate) fn new(slots_max: usize, tenant_share: usize) -> Arc<Self> {
        Arc::new(Self {
            shares: TenantShares::new("instances of heavy components", slots_max, tenant_share),
            waiting: Mutex::default(),
            next_waiter: AtomicU64::new(0),
        })
    }

    /// Slots held now.
    pub(crate) fn in_use(&self) -> usize {
        self.shares.current()
    }

    /// A slot for a call of `tenant`, waiting until `deadline` (past it: 503 `overloaded`, retry
    /// in 1 s). `evict` drops an idle warm instance that holds a slot, if there is one, and
    /// says whether it did: a call that needs a fresh instance comes before one that may never
    /// come.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        tenant: &str,
        deadline: Instant,
        evict: impl Fn() -> bool,
    ) -> Result<HeavySlot, SluiceError> {
        let (grant, mut granted) = oneshot::channel();
        let id = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        let mut may_evict = true;
        loop {
            let mut waiting = self.waiting.lock().expect("heavy slots lock");
            // Nobody waits, so nobody needs a free slot more than `tenant` (the module's
            // invariant): beyond its share or not, it may take it.
            if waiting.is_empty()
                && let Ok(slot) = self.shares.admit_beyond_share(tenant)
            {
                return Ok(self.held(slot));
            }
            if may_evict {
                // Not under the lock: the dropped instance's slot is handed on through it (to
                // the first waiting call, if any; else it is free for this one).
                drop(waiting);
                may_evict = evict();
                continue;
            }
            waiting.push_back(Waiter { id, tenant: Arc::from(tenant), grant });
            break;
        }
        let queued = Queued { slots: self, id };
        let granted = match tokio::time::timeout_at(deadline.into(), &mut granted).await {
            Ok(Ok(slot)) => Ok(slot),
            Ok(Err(_)) => Err(SluiceError::internal("the heavy slots were dropped")),
            Err(_elapsed) => {
                let waiting = self.waiting.lock().expect("heavy slots lock");
                // Granted just now, between the deadline and the lock: the call may still use it.
                match granted.try_recv() {
                    Ok(slot) => Ok(slot),
                    Err(_) => {
                        let held = self.shares.held_by(tenant);
                        drop(waiting);
                        Err(SluiceError::new(
                            ErrorKind::Overloaded,
                            format!(
                                "all {} instances of heavy components this node runs at once are busy \
                                 (tenant {tenant} holds {held} of them, its share while others wait is {}); \
                                 retry later",
                                self.shares.node_max(),
                                self.shares.tenant_max().min(self.shares.node_max()),
                            ),
                        )
                        .retry_after(1))
                    }
                }
            }
        };
        drop(queued);
        granted
    }

    fn held(self: &Arc<Self>, slot: SharedSlot) -> HeavySlot {
        HeavySlot { slot: Some(slot), slots: self.clone() }
    }

    /// Hands free slots to waiting calls: each to the first whose tenant holds less than its
    /// share, else to the first.
    fn hand_on(self: &Arc<Self>) {
        let mut waiting = self.waiting.lock().expect("heavy slots lock");
        while !waiting.is_empty() {
            let share = self.shares.tenant_max();
            let next = waiting.iter().position(|w| self.shares.held_by(&w.tenant) < share).unwrap_or(0);
            let Ok(slot) = self.shares.admit_beyond_share(&waiting[next].tenant) else {
                return; // No slot is free.
            };
            let waiter = waiting.remove(next).expect("a waiter at a found position");
            if let Err(mut refused) = waiter.grant.send(self.held(slot)) {
                // The call went away before its `Queued` was dropped: the slot goes straight
                // back, without handing it on from here (the lock is held), and the loop hands
                // it to the next.
                drop(refused.slot.take());
            }
        }
    }
}

/// A waiting call's place in the queue, given up when the call stops waiting (granted, timed out
/// or dropped).
struct Queued<'a> {
    slots: &'a Arc<HeavySlots>,
    id: u64,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let mut waiting = self.slots.waiting.lock().expect("heavy slots lock");
        if let Some(i) = waiting.iter().position(|w| w.id == self.id) {
            waiting.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        for _ in 0..500 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("timed out waiting until {what}");
    }

    fn queued(slots: &HeavySlots) -> usize {
        slots.waiting.lock().unwrap().len()
    }

    #[tokio::test]
    async fn a_tenant_alone_uses_every_slot() {
        let slots = HeavySlots::new(4, 1);
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(slots.acquire("acme", soon(), || false).await.unwrap());
        }
        assert_eq!(slots.in_use(), 4);
        let late = slots.acquire("acme", Instant::now() + Duration::from_millis(20), || false).await;
        let e = late.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Overloaded);
        assert!(e.message.contains("tenant acme holds 4 of them"), "{}", e.message);
        assert_eq!(queued(&slots), 0, "a call that timed out left the queue");
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_a_tenant_under_its_share_before_the_queue_of_one_beyond_it() {
        // Mallory holds both slots and queues three more calls; acme comes after them.
        let slots = HeavySlots::new(2, 1);
        let mut mallory = vec![
            slots.acquire("mallory", soon(), || false).await.unwrap(),
            slots.acquire("mallory", soon(), || false).await.unwrap(),
        ];
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for who in ["mallory", "mallory", "mallory", "acme"] {
            let (mine, order) = (slots.clone(), order.clone());
            let n = queued(&slots);
            tasks.push(tokio::spawn(async move {
                let slot = mine.acquire(who, soon(), || false).await.unwrap();
                order.lock().unwrap().push(who);
                // Hold it a moment, so the order shows who got the slot first.
                tokio::time::sleep(Duration::from_millis(20)).await;
                drop(slot);
            }));
            until("the call queued", || queued(&slots) == n + 1).await;
        }
        drop(mallory.pop());
        until("a call got the freed slot", || !order.lock().unwrap().is_empty()).await;
        let first = order.lock().unwrap()[0];
        assert_eq!(first, "acme", "the first freed slot went to {first}, not to the tenant under its share");
        drop(mallory);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(order.lock().unwrap().len(), 4, "every queued call got a slot in the end");
        assert_eq!(slots.in_use(), 0);
    }

    #[tokio::test]
    async fn a_call_that_stops_waiting_leaves_the_queue_and_its_grant_goes_on() {
        let slots = HeavySlots::new(1, 1);
        let first = slots.acquire("acme", soon(), || false).await.unwrap();
        let gone = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire("acme", soon(), || false).await.map(drop) }
        });
        until("the call queued", || queued(&slots) == 1).await;
        gone.abort();
        until("the dropped call left the queue", || queued(&slots) == 0).await;
        drop(first);
        assert_eq!(slots.in_use(), 0, "nobody holds the freed slot");
        let again = slots.acquire("bravo", soon(), || false).await.unwrap();
        assert_eq!(slots.in_use(), 1);
        drop(again);
    }

    #[tokio::test]
    async fn an_idle_instance_is_evicted_only_when_no_slot_is_free() {
        let slots = HeavySlots::new(1, 1);
        let idle = Mutex::new(Some(slots.acquire("acme", soon(), || false).await.unwrap()));
        let evict = || idle.lock().unwrap().take().is_some();
        let slot = slots.acquire("bravo", soon(), evict).await.unwrap();
        assert!(idle.lock().unwrap().is_none(), "the idle instance gave its slot up");
        assert_eq!(slots.in_use(), 1);
        drop(slot);
    }
}
