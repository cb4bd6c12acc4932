//! Triggers, for any backend: created with their credentials kept apart, listed, paused and
//! deleted with their function; the lease that gives each trigger one consumer; and the batch
//! commit the runner stands on: only the lease holder commits, and a message's key stores it once
//! however often it is delivered.

use sluice_core::FunctionConfig;
use sluice_core::trigger::{Credentials, Source};
use sluice_store::{
    IdempotencyKey, InvocationFilter, NewInvocation, NewTrigger, Store, StoreError, TRIGGER_CALLER,
    TriggerProgress,
};

use super::{ManualClock, invocation};

async fn fixture(store: &dyn Store) {
    store.create_tenant("acme").await.unwrap();
    let digest = sluice_core::ids::sha256_hex(b"component");
    store.put_blob("acme", &digest, b"component").await.unwrap();
    store.create_version("acme", "hello", &digest, &FunctionConfig::default(), true).await.unwrap();
}

fn nats(name: &str) -> NewTrigger {
    NewTrigger {
        tenant: "acme".into(),
        name: name.into(),
        function: "hello".into(),
        alias: "latest".into(),
        source: Source::Nats {
            url: "nats://127.0.0.1:4222".into(),
            stream: "S".into(),
            subject: "orders.>".into(),
        },
        credentials: Credentials { user: Some("app".into()), password: Some("s3cret".into()) },
        path: "/".into(),
        batch_max: 100,
        window_ms: 20,
        ordered: false,
    }
}

fn message(trigger: i64, seq: u64) -> NewInvocation {
    let key = format!("nats:{trigger}:{seq}");
    NewInvocation {
        idempotency_key: Some(IdempotencyKey { key, caller: TRIGGER_CALLER.into() }),
        ..invocation(&format!("inv-{trigger}-{seq}-{}", sluice_core::ids::invocation_id()))
    }
}

pub async fn triggers_are_created_listed_paused_and_deleted_with_their_function(
    store: &dyn Store,
    clock: &ManualClock,
) {
    fixture(store).await;
    clock.set(1_000);
    let t = store.create_trigger(&nats("orders")).await.unwrap();
    assert_eq!(t.credentials.password.as_deref(), Some("s3cret"), "kept for the broker client");
    assert_eq!((t.batch_max, t.window_ms, t.paused, t.created_at), (100, 20, false, 1_000));
    let err = store.create_trigger(&nats("orders")).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let err = store.create_trigger(&NewTrigger { function: "nope".into(), ..nats("x") }).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    store
        .create_trigger(&NewTrigger { credentials: Credentials::default(), ..nats("another") })
        .await
        .unwrap();
    let names: Vec<String> = store.list_triggers("acme").await.unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(names, ["another", "orders"]);
    assert_eq!(store.count_triggers("acme").await.unwrap(), 2);
    assert!(store.set_trigger_paused("acme", "orders", true).await.unwrap().unwrap().paused);
    assert!(store.set_trigger_paused("acme", "nothing", true).await.unwrap().is_none());
    assert!(store.delete_trigger("acme", "another").await.unwrap());
    assert!(!store.delete_trigger("acme", "another").await.unwrap());
    store.delete_function("acme", "hello").await.unwrap();
    assert_eq!(store.count_triggers("acme").await.unwrap(), 0, "deleting a function deletes its triggers");
}

pub async fn a_trigger_has_one_lease_holder_and_only_it_commits(store: &dyn Store, clock: &ManualClock) {
    fixture(store).await;
    clock.set(10_000);
    let t = store.create_trigger(&nats("orders")).await.unwrap();
    let a = store.claim_triggers("node-a", 5_000, 4).await.unwrap();
    assert_eq!(a.iter().map(|t| t.id).collect::<Vec<_>>(), [t.id]);
    assert!(store.claim_triggers("node-b", 5_000, 4).await.unwrap().is_empty(), "held by a");

    // a commits; b, without the lease, stores nothing.
    let batch: Vec<_> = (1..=3).map(|s| message(t.id, s)).collect();
    assert_eq!(store.commit_trigger_batch(t.id, "node-a", &batch, None).await.unwrap(), Some(3));
    let other: Vec<_> = (4..=5).map(|s| message(t.id, s)).collect();
    assert_eq!(store.commit_trigger_batch(t.id, "node-b", &other, None).await.unwrap(), None);

    // A redelivered batch (new invocation ids, the same keys) stores nothing again.
    let again: Vec<_> = (2..=4).map(|s| message(t.id, s)).collect();
    assert_eq!(
        store.commit_trigger_batch(t.id, "node-a", &again, Some("{\"7\":\"x\"}")).await.unwrap(),
        Some(1)
    );
    let shown = store.get_trigger("acme", "orders").await.unwrap().unwrap();
    assert_eq!((shown.received, shown.enqueued, shown.duplicates), (6, 4, 2));
    assert_eq!(shown.recent.as_deref(), Some("{\"7\":\"x\"}"));
    let stored = store
        .list_invocations(&InvocationFilter { tenant: "acme".into(), limit: 100, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(stored.len(), 4);

    // a's lease runs out: b takes it, and a is fenced out.
    clock.set(15_001);
    let b = store.claim_triggers("node-b", 5_000, 4).await.unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(store.commit_trigger_batch(t.id, "node-a", &[message(t.id, 9)], None).await.unwrap(), None);
    assert!(store.claim_triggers("node-a", 5_000, 4).await.unwrap().is_empty());
    store
        .trigger_progress(
            t.id,
            "node-b",
            &TriggerProgress { lag: Some(7), acked_per_s: Some(100), error: Some("slow".into()) },
        )
        .await
        .unwrap();
    store
        .trigger_progress(t.id, "node-a", &TriggerProgress { lag: Some(1), ..Default::default() })
        .await
        .unwrap();
    let shown = store.get_trigger("acme", "orders").await.unwrap().unwrap();
    assert_eq!(
        (shown.lag, shown.acked_per_s, shown.last_error.as_deref()),
        (Some(7), Some(100), Some("slow"))
    );

    // Released: taken at once. Paused: neither renewed nor taken.
    store.release_trigger(t.id, "node-b").await.unwrap();
    assert_eq!(store.claim_triggers("node-a", 5_000, 4).await.unwrap().len(), 1);
    store.set_trigger_paused("acme", "orders", true).await.unwrap();
    assert!(store.claim_triggers("node-a", 5_000, 4).await.unwrap().is_empty());
    assert!(store.claim_triggers("node-b", 5_000, 4).await.unwrap().is_empty());
}

pub async fn concurrent_claims_give_each_trigger_one_holder(store: &dyn Store, clock: &ManualClock) {
    fixture(store).await;
    clock.set(1_000);
    for i in 0..12 {
        store.create_trigger(&nats(&format!("t{i}"))).await.unwrap();
    }
    let claims =
        (0..4).map(|n| async move { store.claim_triggers(&format!("node-{n}"), 10_000, 4).await.unwrap() });
    let held: Vec<Vec<_>> = futures::future::join_all(claims).await;
    let mut ids: Vec<i64> = held.iter().flatten().map(|t| t.id).collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "a trigger held by two nodes: {held:?}");
    assert!(held.iter().all(|h| h.len() <= 4), "at most 4 taken per claim");
}
