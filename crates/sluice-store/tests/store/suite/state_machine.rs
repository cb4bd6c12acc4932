//! The invocation state machine as a property: random sequences of queue operations, by two
//! owners that may be stale, with the clock jumping past leases, must keep the queue's invariants
//! after every step, and every invocation must end in exactly one final state once drained.
//!
//! The model here is small on purpose: it remembers only what the test itself handed out (which
//! lease token is the newest per invocation) and what it observed after the previous step, and
//! predicts from those alone whether a report or a heartbeat must be accepted.

use std::collections::HashMap;

use super::ended;
use proptest::prelude::*;
use sluice_store::{
    Criticality, Enqueued, Invocation, InvocationFilter, InvocationStatus, NewInvocation, Store,
};

use super::ManualClock;
use super::queue::{failure, invocation, success};

const OWNERS: [&str; 2] = ["node-a", "node-b"];
const LEASE_MS: u64 = 1_000;
const TENANT: &str = "acme";

#[derive(Debug, Clone)]
pub enum Outcome {
    Success,
    Retry { delay_ms: u16 },
    Final,
}

/// One step. `pick` chooses among the invocations created so far (modulo their number).
#[derive(Debug, Clone)]
pub enum QueueOp {
    Enqueue {
        criticality: u8,
        delay_ms: u16,
        window_ms: Option<u16>,
        attempts_max: u8,
        short_lived: bool,
        key: Option<u8>,
    },
    Lease {
        owner: usize,
        limit: u8,
    },
    Complete {
        pick: usize,
        owner: usize,
        stale: bool,
        outcome: Outcome,
    },
    Advance {
        ms: u16,
    },
    Release {
        pick: usize,
        owner: usize,
    },
    Heartbeat {
        pick: usize,
        owner: usize,
    },
    RetryDead {
        pick: usize,
    },
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        Just(Outcome::Success),
        (0..3_000u16).prop_map(|delay_ms| Outcome::Retry { delay_ms }),
        Just(Outcome::Final),
    ]
}

fn queue_op() -> impl Strategy<Value = QueueOp> {
    prop_oneof![
        3 => (0..3u8, 0..2_000u16, proptest::option::of(0..3_000u16), 1..4u8, any::<bool>(), proptest::option::of(0..3u8))
            .prop_map(|(criticality, delay_ms, window_ms, attempts_max, short_lived, key)| QueueOp::Enqueue {
                criticality, delay_ms, window_ms, attempts_max, short_lived, key
            }),
        3 => (0..2usize, 0..4u8).prop_map(|(owner, limit)| QueueOp::Lease { owner, limit }),
        3 => (any::<usize>(), 0..2usize, proptest::bool::weighted(0.2), outcome())
            .prop_map(|(pick, owner, stale, outcome)| QueueOp::Complete { pick, owner, stale, outcome }),
        2 => (0..2_500u16).prop_map(|ms| QueueOp::Advance { ms }),
        1 => (any::<usize>(), 0..2usize).prop_map(|(pick, owner)| QueueOp::Release { pick, owner }),
        1 => (any::<usize>(), 0..2usize).prop_map(|(pick, owner)| QueueOp::Heartbeat { pick, owner }),
        1 => any::<usize>().prop_map(|pick| QueueOp::RetryDead { pick }),
    ]
}

pub fn queue_ops() -> impl Strategy<Value = Vec<QueueOp>> {
    proptest::collection::vec(queue_op(), 1..30)
}

/// Everything the test knows.
#[derive(Default)]
struct Model {
    /// Every invocation created, in order.
    ids: Vec<String>,
    attempts_max: HashMap<String, u32>,
    keys: HashMap<String, String>,
    /// The newest lease handed out per invocation: (owner index, attempt).
    lease: HashMap<String, (usize, u32)>,
    /// The state observed after the previous step.
    seen: HashMap<String, Invocation>,
}

impl Model {
    fn pick(&self, pick: usize) -> Option<String> {
        (!self.ids.is_empty()).then(|| self.ids[pick % self.ids.len()].clone())
    }

    /// True if `owner` holds the newest lease of `id` and it has not been taken away since.
    fn holds(&self, id: &str, owner: usize) -> bool {
        self.seen[id].status == InvocationStatus::Running
            && self.lease.get(id).is_some_and(|(o, _)| *o == owner)
    }
}

async fn observe(store: &dyn Store) -> HashMap<String, Invocation> {
    let filter = InvocationFilter { tenant: TENANT.into(), limit: 1_000, ..InvocationFilter::default() };
    let listed = store.list_invocations(&filter).await.unwrap();
    let count = listed.len();
    let by_id: HashMap<String, Invocation> = listed.into_iter().map(|i| (i.id.clone(), i)).collect();
    assert_eq!(by_id.len(), count, "an invocation is listed twice");
    by_id
}

/// Checks the invariants against the previous observation; `redriven` is the one invocation the
/// step was allowed to take out of a final state.
fn check(model: &mut Model, now: HashMap<String, Invocation>, redriven: Option<&str>, step: &QueueOp) {
    assert_eq!(now.len(), model.ids.len(), "after {step:?}: every invocation exists exactly once");
    for id in &model.ids {
        let inv = now.get(id).unwrap_or_else(|| panic!("after {step:?}: {id} vanished"));
        assert!(inv.attempts <= model.attempts_max[id], "after {step:?}: {inv:?} ran too often");
        assert_eq!(inv.finished_at.is_some(), inv.status.is_final(), "after {step:?}: {inv:?}");
        if let Some(before) = model.seen.get(id)
            && before.status.is_final()
            && redriven != Some(id.as_str())
        {
            assert_eq!(inv, before, "after {step:?}: a final state changed");
        }
        if inv.status != InvocationStatus::Running {
            model.lease.remove(id);
        }
    }
    model.seen = now;
}

pub async fn queue_state_machine_keeps_its_invariants(
    store: &dyn Store,
    clock: &ManualClock,
    ops: Vec<QueueOp>,
) {
    let mut model = Model::default();
    let mut now = 0;
    clock.set(now);
    for step in &ops {
        let mut redriven = None;
        match step {
            QueueOp::Enqueue { criticality, delay_ms, window_ms, attempts_max, short_lived, key } => {
                // A refused (Existing) enqueue stored nothing, so its id may be used again.
                let id = format!("inv-{:04}", model.ids.len());
                let key = key.map(|k| format!("key-{k}"));
                let idempotency_key = key.as_deref().and_then(|k| super::keyed_by(k, "key_a"));
                let inv = NewInvocation {
                    criticality: [Criticality::High, Criticality::Normal, Criticality::Low]
                        [*criticality as usize],
                    run_after: now + i64::from(*delay_ms),
                    deadline: window_ms.map(|w| now + i64::from(*delay_ms) + i64::from(w)),
                    attempts_max: u32::from(*attempts_max),
                    max_age_ms: if *short_lived { 4_000 } else { 3_600_000 },
                    in_order: None,
                    idempotency_key,
                    ..invocation(&id)
                };
                let result = store.enqueue(&inv).await.unwrap();
                match (key.as_ref().and_then(|k| model.keys.get(k)), result) {
                    (None, Enqueued::Created) => {
                        model.ids.push(id.clone());
                        model.attempts_max.insert(id.clone(), inv.attempts_max);
                        if let Some(key) = key {
                            model.keys.insert(key, id);
                        }
                    }
                    (Some(first), Enqueued::Existing(existing)) => assert_eq!(&existing, first),
                    (expected, got) => {
                        panic!("enqueue of {id} with {key:?}: expected {expected:?}, got {got:?}")
                    }
                }
            }
            QueueOp::Lease { owner, limit } => {
                let leased = store.lease(OWNERS[*owner], now, LEASE_MS, u32::from(*limit)).await.unwrap();
                assert!(leased.len() <= usize::from(*limit));
                for lease in &leased {
                    let before = &model.seen[&lease.id];
                    assert!(!before.status.is_final(), "leased a finished invocation: {before:?}");
                    assert_eq!(lease.attempt, before.attempts + 1, "{before:?}");
                    assert!(lease.attempt <= lease.attempts_max);
                    model.lease.insert(lease.id.clone(), (*owner, lease.attempt));
                }
            }
            QueueOp::Complete { pick, owner, stale, outcome } => {
                let Some(id) = model.pick(*pick) else { continue };
                let newest = model.lease.get(&id).map_or(1, |(_, attempt)| *attempt);
                let attempt = if *stale { newest.saturating_sub(1) } else { newest };
                let expected = model.holds(&id, *owner) && attempt == newest;
                let result = match outcome {
                    Outcome::Success => success(200),
                    Outcome::Retry { delay_ms } => failure("trap", Some(now + i64::from(*delay_ms))),
                    Outcome::Final => failure("trap", None),
                };
                let recorded =
                    store.complete(ended(&id, OWNERS[*owner], attempt, &result, now)).await.unwrap();
                assert_eq!(
                    recorded,
                    expected,
                    "{step:?} on {:?} with lease {:?}",
                    model.seen[&id],
                    model.lease.get(&id)
                );
            }
            QueueOp::Advance { ms } => {
                now += i64::from(*ms);
                clock.set(now);
            }
            QueueOp::Release { pick, owner } => {
                let Some(id) = model.pick(*pick) else { continue };
                let attempt = model.lease.get(&id).map_or(1, |(_, attempt)| *attempt);
                store.release(OWNERS[*owner], &[(id, attempt)]).await.unwrap();
            }
            QueueOp::Heartbeat { pick, owner } => {
                let Some(id) = model.pick(*pick) else { continue };
                let attempt = model.lease.get(&id).map_or(1, |(_, attempt)| *attempt);
                let not_held =
                    store.heartbeat(OWNERS[*owner], &[(id.clone(), attempt)], now, 500).await.unwrap();
                assert_eq!(
                    not_held.is_empty(),
                    model.holds(&id, *owner),
                    "{step:?} on {:?}",
                    model.seen[&id]
                );
            }
            QueueOp::RetryDead { pick } => {
                let Some(id) = model.pick(*pick) else { continue };
                let before = model.seen[&id].status;
                let retried = store.retry_dead(&id, now).await.unwrap();
                assert_eq!(retried, matches!(before, InvocationStatus::Dead | InvocationStatus::Expired));
                if retried {
                    redriven = Some(id);
                }
            }
        }
        let observed = observe(store).await;
        check(&mut model, observed, redriven.as_deref(), step);
    }

    // Drain: far enough ahead that every lease expired and every retry is due, lease everything
    // and report success, until nothing is left to lease.
    const DRAIN_ROUNDS_MAX: usize = 10;
    for _ in 0..DRAIN_ROUNDS_MAX {
        now += 10_000;
        clock.set(now);
        let leased = store.lease(OWNERS[0], now, LEASE_MS, 1_000).await.unwrap();
        if leased.is_empty() {
            break;
        }
        for lease in &leased {
            assert!(
                store.complete(ended(&lease.id, OWNERS[0], lease.attempt, &success(200), now)).await.unwrap()
            );
        }
        let observed = observe(store).await;
        check(&mut model, observed, None, &QueueOp::Advance { ms: 0 });
    }
    let observed = observe(store).await;
    for id in &model.ids {
        assert!(observed[id].status.is_final(), "{:?} did not finish", observed[id]);
    }
}
