//! Backend-independent store tests. Every function takes a fresh, empty store and the manual
//! clock that store was opened with, so timestamps are exact.

use std::sync::atomic::{AtomicI64, Ordering};

use sluice_core::alias::Route;
use sluice_core::ids::sha256_hex;
use sluice_core::{Clock, FunctionConfig, RolloutStatus, Scope, UnixMs};
use sluice_store::{
    AttemptResult, Completion, Invocation, InvocationStatus, KeyRecord, LogLine, LogStream, NewRollout,
    RolloutMove, StepCounts, Store, StoreError, SyncRecord, TenantStorage,
};

mod queue;
mod schedules;
mod state_machine;
mod triggers;

pub use queue::*;
pub use schedules::*;
pub use state_machine::*;
pub use triggers::*;

/// The end of an attempt with no log lines and no time on a thread, which is what most tests
/// report; the rest override fields (`Completion { logs: &logs, ..ended(...) }`).
pub fn ended<'a>(
    id: &'a str,
    owner: &'a str,
    attempt: u32,
    result: &'a AttemptResult,
    now: UnixMs,
) -> Completion<'a> {
    Completion { id, owner, attempt, result, logs: &[], cpu_us: 0, now }
}

/// A clock that only moves when told to.
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(now_ms: UnixMs) -> Self {
        Self(AtomicI64::new(now_ms))
    }
    pub fn set(&self, now_ms: UnixMs) {
        self.0.store(now_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> UnixMs {
        self.0.load(Ordering::SeqCst)
    }
}

/// Expands to one `#[tokio::test]` per suite function, each given a fresh store from
/// `$fresh().await`, which must return something with `store() -> &dyn Store` and a `clock`.
#[macro_export]
macro_rules! run_suite {
    // `$fresh().await` returns `Option<harness>`: `None` skips the test (the backend is not
    // available here, and `$fresh` said so).
    (optional $fresh:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let Some(harness) = $fresh().await else { return };
                $crate::suite::$name(harness.store(), &harness.clock).await;
            }
        )*
    };
    ($fresh:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let harness = $fresh().await;
                $crate::suite::$name(harness.store(), &harness.clock).await;
            }
        )*
    };
}

/// [`run_suite!`] with every suite function: `run_whole_suite!(fresh)` or
/// `run_whole_suite!(optional fresh)`. A new suite function is added here, once, for every backend.
#[macro_export]
macro_rules! run_whole_suite {
    ($($fresh:tt)+) => {
        $crate::run_suite!(
            $($fresh)+;
    nodes_heartbeat_are_listed_and_purged,
    tenants_are_unique_and_listed_by_name,
    tenant_rates_are_set_replaced_and_cleared,
    keys_are_listed_revoked_and_filtered,
    blobs_are_content_addressed,
    blobs_belong_to_their_tenant,
    unnamed_blobs_are_purged_after_their_grace,
    old_versions_are_retired_unless_an_unfinished_invocation_names_them,
    versions_are_numbered_from_one,
    concurrent_deploys_get_distinct_consecutive_versions,
    functions_are_listed_per_tenant,
    deleting_a_function_deletes_its_versions_only,
    all_latest_versions_has_one_entry_per_function,
    deploys_move_latest_unless_not_promoted,
    aliases_are_set_listed_and_deleted,
    a_function_has_at_most_aliases_max_aliases_even_when_set_at_once,
    aliased_versions_are_never_retired,
    routing_lists_aliases_and_the_versions_they_name,
    keys_may_be_limited_to_an_alias,
    rollouts_move_their_alias_step_by_step_fenced_by_an_owner,
    a_rollout_is_one_per_alias_and_a_manual_move_cancels_it,
    sync_records_and_their_logs_are_readable,
    guest_text_with_nul_is_stored_with_a_replacement_character,
    function_logs_tail_and_page,
    large_sync_batches_are_recorded_whole,
    async_invocations_run_and_keep_their_response,
    idempotency_keys_return_the_first_invocation,
    idempotency_keys_belong_to_their_caller_and_their_request,
    concurrent_enqueues_with_one_key_create_one_invocation,
    leases_follow_criticality_then_deadline_then_run_after,
    a_closed_start_window_expires_the_invocation,
    an_expired_lease_is_reclaimed_and_its_old_owner_fenced,
    a_reclaimed_invocation_past_its_deadline_expires,
    concurrent_reports_of_one_attempt_are_recorded_once,
    failed_attempts_are_retried_until_attempts_run_out,
    attempts_never_exceed_attempts_max_when_leases_are_lost,
    invocations_past_their_max_age_die,
    released_leases_do_not_count_as_attempts,
    dead_and_expired_invocations_can_be_redriven,
    invocations_are_listed_newest_first_by_filter_and_page,
    purge_deletes_finished_invocations_before_the_cutoff,
    many_concurrent_enqueues_are_all_stored,
    an_enqueue_with_a_taken_id_fails_alone,
    lease_asks_take_one_tenants_class_in_its_order,
    tenant_quotas_are_set_replaced_and_cleared,
    tenant_usage_limits_are_set_replaced_and_cleared,
    queued_usage_counts_unfinished_invocations_and_their_bytes,
    ordered_invocations_run_one_at_a_time_per_key,
    schedules_are_created_listed_paused_and_deleted_with_their_function,
    concurrent_firings_of_one_occurrence_enqueue_it_once,
    buffered_occurrences_are_due_until_fired,
    occurrences_fired_ahead_are_read_once_and_taken_back_by_pause_and_delete,
    triggers_are_created_listed_paused_and_deleted_with_their_function,
    a_trigger_has_one_lease_holder_and_only_it_commits,
    concurrent_claims_give_each_trigger_one_holder,
        );
    };
}

fn key(id: &str, tenant: Option<&str>, scopes: &[Scope], created_at: UnixMs) -> KeyRecord {
    KeyRecord {
        id: id.to_owned(),
        tenant: tenant.map(str::to_owned),
        scopes: scopes.to_vec(),
        hash: sha256_hex(id.as_bytes()),
        created_at,
        revoked: false,
        alias: None,
    }
}

/// Stores `bytes` as a blob of `tenant` and returns its digest.
async fn blob(store: &dyn Store, tenant: &str, bytes: &[u8]) -> String {
    let digest = sha256_hex(bytes);
    store.put_blob(tenant, &digest, bytes).await.unwrap();
    digest
}

fn ids<T>(items: &[T], id: impl Fn(&T) -> String) -> Vec<String> {
    items.iter().map(id).collect()
}

pub async fn tenant_rates_are_set_replaced_and_cleared(store: &dyn Store, _clock: &ManualClock) {
    store.create_tenant("acme").await.unwrap();
    store.create_tenant("beta").await.unwrap();
    assert_eq!(store.tenant_rates().await.unwrap(), vec![]);
    store.set_tenant_rate("acme", Some((10.0, 20))).await.unwrap();
    store.set_tenant_rate("beta", Some((0.5, 1))).await.unwrap();
    store.set_tenant_rate("acme", Some((100.0, 200))).await.unwrap();
    assert_eq!(
        store.tenant_rates().await.unwrap(),
        vec![("acme".to_string(), 100.0, 200), ("beta".to_string(), 0.5, 1)]
    );
    store.set_tenant_rate("beta", None).await.unwrap();
    assert_eq!(store.tenant_rates().await.unwrap(), vec![("acme".to_string(), 100.0, 200)]);
    let err = store.set_tenant_rate("nobody", Some((1.0, 1))).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
}

pub async fn nodes_heartbeat_are_listed_and_purged(store: &dyn Store, clock: &ManualClock) {
    let node = |id: &str, started_at: UnixMs| sluice_store::NodeRecord {
        id: id.into(),
        address: format!("http://{id}"),
        version: "0.1.0".into(),
        started_at,
        heartbeat_at: 0,
        stopped_at: None,
        slots: 256,
        in_flight: 3,
        queue_lag_ms: 12,
    };
    clock.set(1_000);
    store.node_heartbeat(&node("a", 900), false).await.unwrap();
    store.node_heartbeat(&node("b", 950), false).await.unwrap();
    clock.set(5_000);
    store.node_heartbeat(&node("b", 950), false).await.unwrap();
    store.node_heartbeat(&node("c", 4_000), true).await.unwrap();

    let (nodes, now) = store.list_nodes(10_000).await.unwrap();
    assert_eq!(now, 5_000, "the store's clock");
    let seen: Vec<(&str, UnixMs, Option<UnixMs>)> =
        nodes.iter().map(|n| (n.id.as_str(), n.heartbeat_at, n.stopped_at)).collect();
    assert_eq!(seen, [("a", 1_000, None), ("b", 5_000, None), ("c", 5_000, Some(5_000))], "by start");
    assert_eq!((nodes[1].slots, nodes[1].in_flight, nodes[1].queue_lag_ms), (256, 3, 12));
    let (recent, _) = store.list_nodes(2_000).await.unwrap();
    assert_eq!(recent.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["b", "c"]);

    // Retention removes nodes not heard from since its cutoff.
    assert_eq!(store.purge(2_000, 100).await.unwrap(), 1);
    let (left, _) = store.list_nodes(10_000).await.unwrap();
    assert_eq!(left.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["b", "c"]);
}

pub async fn tenants_are_unique_and_listed_by_name(store: &dyn Store, clock: &ManualClock) {
    assert_eq!(store.list_tenants().await.unwrap(), vec![]);
    clock.set(1_000);
    let zeta = store.create_tenant("zeta").await.unwrap();
    assert_eq!((zeta.name.as_str(), zeta.created_at), ("zeta", 1_000));
    clock.set(2_000);
    let acme = store.create_tenant("acme").await.unwrap();
    assert_eq!(acme.created_at, 2_000);

    let err = store.create_tenant("acme").await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

    assert_eq!(store.get_tenant("acme").await.unwrap(), Some(acme.clone()));
    assert_eq!(store.get_tenant("nope").await.unwrap(), None);
    // The failed duplicate did not overwrite the first row's timestamp.
    assert_eq!(store.list_tenants().await.unwrap(), vec![acme, zeta]);
}

pub async fn keys_are_listed_revoked_and_filtered(store: &dyn Store, clock: &ManualClock) {
    store.create_tenant("acme").await.unwrap();
    store.create_tenant("beta").await.unwrap();
    let k1 = key("k1", Some("acme"), &[Scope::Deploy, Scope::Invoke], 10);
    let k2 = key("k2", Some("beta"), &[Scope::Read], 20);
    let k3 = key("k3", None, &[Scope::Admin], 30);
    let k4 = key("k4", Some("acme"), &[], 40);
    for k in [&k1, &k2, &k3, &k4] {
        store.create_key(k).await.unwrap();
    }
    clock.set(99);

    assert_eq!(store.get_key("k1").await.unwrap(), Some(k1.clone()));
    assert_eq!(store.get_key("k3").await.unwrap(), Some(k3.clone()));
    assert_eq!(store.get_key("k4").await.unwrap(), Some(k4.clone()), "empty scopes round-trip");
    assert_eq!(store.get_key("nope").await.unwrap(), None);
    assert_eq!(store.list_keys(Some("acme")).await.unwrap(), vec![k1.clone(), k4.clone()]);
    assert_eq!(store.list_keys(Some("nope")).await.unwrap(), vec![]);
    assert_eq!(store.list_keys(None).await.unwrap().len(), 4);

    assert!(store.revoke_key("k1").await.unwrap());
    assert!(!store.revoke_key("nope").await.unwrap());
    let revoked = store.get_key("k1").await.unwrap().unwrap();
    assert!(revoked.revoked);
    let active = store.active_keys().await.unwrap();
    assert_eq!(ids(&active, |k| k.id.clone()), ["k2", "k3", "k4"]);
    assert!(active.iter().all(|k| !k.revoked));
    // Revoked keys stay listed, marked.
    assert_eq!(store.list_keys(Some("acme")).await.unwrap(), vec![revoked, k4]);

    let same_id = KeyRecord { hash: "other".into(), ..k2.clone() };
    let err = store.create_key(&same_id).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let same_hash = KeyRecord { id: "k5".into(), ..k2 };
    let err = store.create_key(&same_hash).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let err = store.create_key(&key("k6", Some("nope"), &[Scope::Read], 50)).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    assert_eq!(store.list_keys(None).await.unwrap().len(), 4);
}

pub async fn blobs_are_content_addressed(store: &dyn Store, _clock: &ManualClock) {
    store.create_tenant("acme").await.unwrap();
    // Large and not uniform, so truncation or a mix-up of two blobs shows.
    let bytes: Vec<u8> = (0..1_000_003u32).map(|i| (i * 31 % 251) as u8).collect();
    let digest = blob(store, "acme", &bytes).await;
    store.put_blob("acme", &digest, &bytes).await.unwrap();
    let small = blob(store, "acme", b"small").await;

    assert_eq!(store.get_blob("acme", &digest).await.unwrap(), Some(bytes));
    assert_eq!(store.get_blob("acme", &small).await.unwrap(), Some(b"small".to_vec()));
    assert_eq!(store.get_blob("acme", &sha256_hex(b"never stored")).await.unwrap(), None);
    let err = store.put_blob("nope", &small, b"small").await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
}

pub async fn blobs_belong_to_their_tenant(store: &dyn Store, _clock: &ManualClock) {
    store.create_tenant("acme").await.unwrap();
    store.create_tenant("beta").await.unwrap();
    let digest = blob(store, "acme", b"acme's component").await;
    // Another tenant cannot read it, nor deploy it by its digest: it must upload the bytes.
    assert_eq!(store.get_blob("beta", &digest).await.unwrap(), None);
    let err = store.create_version("beta", "f", &digest, &FunctionConfig::default(), true).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    blob(store, "beta", b"acme's component").await;
    store.create_version("beta", "f", &digest, &FunctionConfig::default(), true).await.unwrap();
    let keys = store.blob_keys().await.unwrap();
    assert_eq!(keys, [("acme".to_string(), digest.clone()), ("beta".to_string(), digest.clone())]);

    let acme = store.tenant_storage("acme").await.unwrap();
    assert_eq!(acme, TenantStorage { functions: 0, versions: 0, blobs: 1, blob_bytes: 16 });
    let beta = store.tenant_storage("beta").await.unwrap();
    assert_eq!(beta, TenantStorage { functions: 1, versions: 1, blobs: 1, blob_bytes: 16 });
    let err = store.tenant_storage("nope").await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
}

pub async fn unnamed_blobs_are_purged_after_their_grace(store: &dyn Store, clock: &ManualClock) {
    store.create_tenant("acme").await.unwrap();
    let config = FunctionConfig::default();
    clock.set(1_000);
    let named = blob(store, "acme", b"named").await;
    store.create_version("acme", "keep", &named, &config, true).await.unwrap();
    let deleted = blob(store, "acme", b"of a deleted function").await;
    store.create_version("acme", "gone", &deleted, &config, true).await.unwrap();
    store.create_version("acme", "gone", &named, &config, true).await.unwrap();
    store.delete_function("acme", "gone").await.unwrap();
    let stale = blob(store, "acme", b"uploaded, never deployed").await;
    clock.set(5_000);
    let fresh = blob(store, "acme", b"uploaded just now").await;
    // Uploading again restarts the grace period.
    clock.set(6_000);
    store.put_blob("acme", &stale, b"uploaded, never deployed").await.unwrap();

    // Cut-off 2_000: only the deleted function's blob is unnamed and old enough.
    let gone = store.purge_blobs(2_000, 100).await.unwrap();
    assert_eq!(gone, [("acme".to_string(), deleted.clone())]);
    assert_eq!(store.get_blob("acme", &deleted).await.unwrap(), None);
    assert!(store.purge_blobs(2_000, 100).await.unwrap().is_empty());
    // Later: at most `limit` per call, oldest upload first; a named blob is never taken.
    let gone = store.purge_blobs(10_000, 1).await.unwrap();
    assert_eq!(gone, [("acme".to_string(), fresh.clone())]);
    let gone = store.purge_blobs(10_000, 100).await.unwrap();
    assert_eq!(gone, [("acme".to_string(), stale.clone())]);
    assert!(store.get_blob("acme", &named).await.unwrap().is_some());
    assert_eq!(store.blob_keys().await.unwrap(), [("acme".to_string(), named)]);
    // A deploy of a purged blob is refused: it must be uploaded again.
    let err = store.create_version("acme", "late", &stale, &config, true).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
}

pub async fn old_versions_are_retired_unless_an_unfinished_invocation_names_them(
    store: &dyn Store,
    clock: &ManualClock,
) {
    store.create_tenant("acme").await.unwrap();
    let config = FunctionConfig::default();
    let mut digests = Vec::new();
    for v in 1..=5u8 {
        clock.set(i64::from(v) * 1_000);
        let digest = blob(store, "acme", &[b'v', v]).await;
        store.create_version("acme", "hello", &digest, &config, true).await.unwrap();
        digests.push(digest);
    }
    store.create_version("acme", "single", &digests[0], &config, true).await.unwrap();
    // Version 2 has a queued invocation; version 1 only a finished one.
    let pending = sluice_store::NewInvocation { version: 2, ..queue::invocation("pending") };
    store.enqueue(&pending).await.unwrap();
    store.enqueue(&sluice_store::NewInvocation { version: 1, ..queue::invocation("done") }).await.unwrap();
    let leased = store.lease("node", 10_000, 30_000, 10).await.unwrap();
    let done = leased.iter().find(|l| l.id == "done").expect("leased");
    let finished = queue::success(200);
    assert!(store.complete(ended("done", "node", done.attempt, &finished, 10_000)).await.unwrap());
    let pending = leased.iter().find(|l| l.id == "pending").expect("leased");
    store.release("node", &[("pending".to_string(), pending.attempt)]).await.unwrap();

    // Keep the newest 2 of each function: 1 and 3 go, 2 is named by a queued invocation.
    assert_eq!(store.purge_versions(2, 1).await.unwrap(), 1, "at most `limit`");
    assert_eq!(store.purge_versions(2, 100).await.unwrap(), 1);
    assert_eq!(store.purge_versions(2, 100).await.unwrap(), 0);
    let left: Vec<i64> = futures::future::join_all((1..=5).map(|v| store.get_version("acme", "hello", v)))
        .await
        .into_iter()
        .filter_map(|r| r.unwrap().map(|v| v.version))
        .collect();
    assert_eq!(left, [2, 4, 5]);
    assert!(store.get_version("acme", "single", 1).await.unwrap().is_some(), "a latest version stays");
    // Their blobs are unnamed now (the first is still named by acme/single).
    let gone = store.purge_blobs(i64::MAX, 100).await.unwrap();
    assert_eq!(gone, [("acme".to_string(), digests[2].clone())]);
    // Keeping 0 still keeps the latest.
    store.purge_versions(0, 100).await.unwrap();
    assert_eq!(store.latest_version("acme", "hello").await.unwrap().unwrap().version, 5);
}

pub async fn versions_are_numbered_from_one(store: &dyn Store, clock: &ManualClock) {
    store.create_tenant("acme").await.unwrap();
    store.create_tenant("beta").await.unwrap();
    let digest = blob(store, "acme", b"component").await;
    blob(store, "beta", b"component").await;
    let custom = FunctionConfig {
        memory_bytes: 64 * 1024 * 1024,
        env: vec![("GREETING".into(), "hi".into())],
        allow_outbound: vec!["api.example.com:443".into()],
        public: true,
        rate_per_sec: Some(2.5),
        burst: Some(5),
        max_concurrency: Some(3),
        secrets: sluice_core::Secrets::new(vec![("API_TOKEN".into(), "hunter2".into())]),
        ..FunctionConfig::default()
    };

    clock.set(1_000);
    let v1 = store.create_version("acme", "hello", &digest, &FunctionConfig::default(), true).await.unwrap();
    clock.set(2_000);
    let v2 = store.create_version("acme", "hello", &digest, &custom, true).await.unwrap();
    clock.set(3_000);
    let v3 = store.create_version("acme", "hello", &digest, &FunctionConfig::default(), true).await.unwrap();
    assert_eq!([v1.version, v2.version, v3.version], [1, 2, 3]);
    assert_eq!((v2.tenant.as_str(), v2.function.as_str(), v2.created_at), ("acme", "hello", 2_000));
    assert_eq!(v2.blob_digest, digest);

    // Numbering is per function and per tenant.
    let other = store.create_version("acme", "other", &digest, &custom, true).await.unwrap();
    let beta = store.create_version("beta", "hello", &digest, &custom, true).await.unwrap();
    assert_eq!((other.version, beta.version), (1, 1));

    assert_eq!(store.latest_version("acme", "hello").await.unwrap(), Some(v3.clone()));
    assert_eq!(store.get_version("acme", "hello", 2).await.unwrap(), Some(v2.clone()));
    assert_eq!(store.get_version("acme", "hello", 1).await.unwrap(), Some(v1));
    assert_eq!(store.get_version("acme", "hello", 4).await.unwrap(), None);
    assert_eq!(store.get_version("beta", "nope", 1).await.unwrap(), None);
    assert_eq!(store.latest_version("acme", "nope").await.unwrap(), None);
    assert_eq!(store.latest_version("nope", "hello").await.unwrap(), None);

    let err = store.create_version("nope", "hello", &digest, &custom, true).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    let err =
        store.create_version("acme", "hello", &sha256_hex(b"missing"), &custom, true).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    // A refused deploy does not use up a number.
    let v4 = store.create_version("acme", "hello", &digest, &custom, true).await.unwrap();
    assert_eq!(v4.version, 4);
    assert_eq!(store.latest_version("acme", "hello").await.unwrap(), Some(v4));
}

pub async fn concurrent_deploys_get_distinct_consecutive_versions(store: &dyn Store, _clock: &ManualClock) {
    const DEPLOYS: i64 = 20;
    store.create_tenant("acme").await.unwrap();
    let digest = blob(store, "acme", b"component").await;
    let config = FunctionConfig::default();
    let deploys = (0..DEPLOYS).map(|_| store.create_version("acme", "hello", &digest, &config, true));
    let mut versions: Vec<i64> = futures::future::join_all(deploys)
        .await
        .into_iter()
        .map(|r| r.expect("every concurrent deploy succeeds").version)
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, (1..=DEPLOYS).collect::<Vec<_>>());
    let latest = store.latest_version("acme", "hello").await.unwrap().unwrap();
    assert_eq!(latest.version, DEPLOYS);
    for version in 1..=DEPLOYS {
        assert!(store.get_version("acme", "hello", version).await.unwrap().is_some());
    }
}

pub async fn functions_are_listed_per_tenant(store: &dyn Store, clock: &ManualClock) {
    store.create_tenant("acme").await.unwrap();
    store.create_tenant("beta").await.unwrap();
    store.create_tenant("empty").await.unwrap();
    let digest = blob(store, "acme", b"component").await;
    blob(store, "beta", b"component").await;
    let config = FunctionConfig::default();
    clock.set(1_000);
    store.create_version("acme", "zed", &digest, &config, true).await.unwrap();
    store.create_version("acme", "alpha", &digest, &config, true).await.unwrap();
    store.create_version("beta", "beta-only", &digest, &config, true).await.unwrap();
    clock.set(5_000);
    store.create_version("acme", "zed", &digest, &config, true).await.unwrap();

    let listed = store.list_functions("acme").await.unwrap();
    assert_eq!(ids(&listed, |f| f.name.clone()), ["alpha", "zed"]);
    let zed = &listed[1];
    assert_eq!(zed.tenant, "acme");
    assert_eq!((zed.latest_version, zed.created_at, zed.updated_at), (2, 1_000, 5_000));
    assert_eq!((listed[0].latest_version, listed[0].updated_at), (1, 1_000));
    assert_eq!(store.list_functions("empty").await.unwrap(), vec![]);
    assert_eq!(store.list_functions("nope").await.unwrap(), vec![]);
}

pub async fn deleting_a_function_deletes_its_versions_only(store: &dyn Store, _clock: &ManualClock) {
    store.create_tenant("acme").await.unwrap();
    let digest = blob(store, "acme", b"component").await;
    let config = FunctionConfig::default();
    for _ in 0..3 {
        store.create_version("acme", "hello", &digest, &config, true).await.unwrap();
    }
    store.create_version("acme", "keep", &digest, &config, true).await.unwrap();

    assert!(store.delete_function("acme", "hello").await.unwrap());
    assert!(!store.delete_function("acme", "hello").await.unwrap());
    assert!(!store.delete_function("acme", "never").await.unwrap());
    assert_eq!(store.latest_version("acme", "hello").await.unwrap(), None);
    for version in 1..=3 {
        assert_eq!(store.get_version("acme", "hello", version).await.unwrap(), None);
    }
    let listed = store.list_functions("acme").await.unwrap();
    assert_eq!(ids(&listed, |f| f.name.clone()), ["keep"]);
    assert!(store.latest_version("acme", "keep").await.unwrap().is_some());
    // Blobs outlive the function (until purge_blobs finds them unnamed past their grace).
    assert!(store.get_blob("acme", &digest).await.unwrap().is_some());
    // A redeployed function is a new function: numbering starts again.
    let again = store.create_version("acme", "hello", &digest, &config, true).await.unwrap();
    assert_eq!(again.version, 1);
}

pub async fn all_latest_versions_has_one_entry_per_function(store: &dyn Store, clock: &ManualClock) {
    assert_eq!(store.all_latest_versions().await.unwrap(), vec![]);
    store.create_tenant("acme").await.unwrap();
    store.create_tenant("beta").await.unwrap();
    let one = blob(store, "acme", b"one").await;
    let two = blob(store, "acme", b"two").await;
    blob(store, "beta", b"one").await;
    blob(store, "beta", b"two").await;
    let config = FunctionConfig::default();
    clock.set(1_000);
    store.create_version("beta", "b", &one, &config, true).await.unwrap();
    store.create_version("acme", "a", &one, &config, true).await.unwrap();
    clock.set(2_000);
    let acme_a = store.create_version("acme", "a", &two, &config, true).await.unwrap();
    let acme_c = store.create_version("acme", "c", &two, &config, true).await.unwrap();
    let beta_b = store.create_version("beta", "b", &two, &config, true).await.unwrap();
    store.create_version("beta", "gone", &one, &config, true).await.unwrap();
    store.delete_function("beta", "gone").await.unwrap();

    let latest = store.all_latest_versions().await.unwrap();
    assert_eq!(latest, vec![acme_a, acme_c, beta_b]);
}

pub async fn deploys_move_latest_unless_not_promoted(store: &dyn Store, clock: &ManualClock) {
    store.create_tenant("acme").await.unwrap();
    let digest = blob(store, "acme", b"component").await;
    let config = FunctionConfig::default();
    clock.set(1_000);
    // The first version is `latest` even when not promoted: the function must name something.
    store.create_version("acme", "hello", &digest, &config, false).await.unwrap();
    store.create_version("acme", "hello", &digest, &config, true).await.unwrap();
    store.create_version("acme", "hello", &digest, &config, false).await.unwrap();
    let aliases = store.list_aliases("acme", "hello").await.unwrap();
    assert_eq!(aliases.len(), 1);
    assert_eq!(aliases[0].name, "latest");
    assert_eq!(aliases[0].routes, [Route { version: 2, weight: 100 }]);
    // `latest_version` is the newest, promoted or not.
    assert_eq!(store.latest_version("acme", "hello").await.unwrap().unwrap().version, 3);
    let listed: Vec<(i64, u64)> = store
        .list_versions("acme", "hello")
        .await
        .unwrap()
        .into_iter()
        .map(|v| (v.record.version, v.blob_bytes))
        .collect();
    assert_eq!(listed, [(3, 9), (2, 9), (1, 9)], "newest first, with the component's size");
}

pub async fn aliases_are_set_listed_and_deleted(store: &dyn Store, clock: &ManualClock) {
    store.create_tenant("acme").await.unwrap();
    store.create_tenant("beta").await.unwrap();
    let digest = blob(store, "acme", b"component").await;
    let config = FunctionConfig::default();
    for _ in 0..4 {
        store.create_version("acme", "hello", &digest, &config, true).await.unwrap();
    }
    clock.set(5_000);
    let split = [Route { version: 3, weight: 90 }, Route { version: 4, weight: 10 }];
    let prod = store.set_alias("acme", "hello", "prod", &split).await.unwrap();
    assert_eq!(prod.routes, [Route { version: 4, weight: 10 }, Route { version: 3, weight: 90 }]);
    assert_eq!(prod.updated_at, 5_000);
    // Setting again replaces every route.
    clock.set(6_000);
    let moved = store.set_alias("acme", "hello", "prod", &[Route { version: 2, weight: 1 }]).await.unwrap();
    let listed = store.list_aliases("acme", "hello").await.unwrap();
    assert_eq!(listed.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), ["latest", "prod"]);
    assert_eq!(listed[1], moved);
    // The move touched the function (which announces it to other nodes).
    let summary = store.list_functions("acme").await.unwrap().remove(0);
    assert_eq!(summary.updated_at, 6_000);

    let missing = store.set_alias("acme", "hello", "prod", &[Route { version: 9, weight: 1 }]).await;
    assert!(matches!(missing, Err(StoreError::NotFound(_))), "{missing:?}");
    let other = store.set_alias("beta", "hello", "prod", &[Route { version: 1, weight: 1 }]).await;
    assert!(matches!(other, Err(StoreError::NotFound(_))), "{other:?}");
    let empty = store.set_alias("acme", "hello", "prod", &[]).await;
    assert!(matches!(empty, Err(StoreError::Conflict(_))), "{empty:?}");
    // A failed move leaves the alias as it was.
    assert_eq!(store.list_aliases("acme", "hello").await.unwrap()[1], moved);

    assert!(store.delete_alias("acme", "hello", "prod").await.unwrap());
    assert!(!store.delete_alias("acme", "hello", "prod").await.unwrap());
    assert_eq!(store.list_aliases("acme", "hello").await.unwrap().len(), 1);
    // Deleting the function takes its aliases with it.
    store.set_alias("acme", "hello", "prod", &[Route { version: 1, weight: 1 }]).await.unwrap();
    assert!(store.delete_function("acme", "hello").await.unwrap());
    assert_eq!(store.list_aliases("acme", "hello").await.unwrap(), vec![]);
}

pub async fn a_function_has_at_most_aliases_max_aliases_even_when_set_at_once(
    store: &dyn Store,
    _clock: &ManualClock,
) {
    store.create_tenant("acme").await.unwrap();
    let digest = blob(store, "acme", b"component").await;
    let config = FunctionConfig::default();
    store.create_version("acme", "hello", &digest, &config, true).await.unwrap();
    store.create_version("acme", "other", &digest, &config, true).await.unwrap();
    let one = [Route { version: 1, weight: 1 }];
    // `latest` is one; leave room for three more, then set ten new ones at once.
    for i in 0..sluice_core::alias::ALIASES_MAX - 4 {
        store.set_alias("acme", "hello", &format!("a{i}"), &one).await.unwrap();
    }
    let sets = (0..10).map(|i| {
        let name = format!("race{i}");
        async move { store.set_alias("acme", "hello", &name, &one).await }
    });
    let results = futures::future::join_all(sets).await;
    let refused = results.iter().filter(|r| matches!(r, Err(StoreError::Conflict(_)))).count();
    assert_eq!(refused, 7, "{results:?}");
    let listed = store.list_aliases("acme", "hello").await.unwrap();
    assert_eq!(listed.len(), sluice_core::alias::ALIASES_MAX);
    let Err(StoreError::Conflict(why)) = store.set_alias("acme", "hello", "more", &one).await else {
        panic!("a set past the bound must be refused");
    };
    assert!(why.contains(&format!("at most {}", sluice_core::alias::ALIASES_MAX)), "{why}");
    // At the bound, an alias that exists can still be moved, and one deleted makes room.
    store.set_alias("acme", "hello", "a0", &one).await.unwrap();
    assert!(store.delete_alias("acme", "hello", "a0").await.unwrap());
    store.set_alias("acme", "hello", "more", &one).await.unwrap();
    // The bound is per function.
    store.set_alias("acme", "other", "prod", &one).await.unwrap();
}

pub async fn aliased_versions_are_never_retired(store: &dyn Store, clock: &ManualClock) {
    store.create_tenant("acme").await.unwrap();
    let config = FunctionConfig::default();
    let mut digests = Vec::new();
    for v in 1..=4u8 {
        clock.set(i64::from(v) * 1_000);
        let digest = blob(store, "acme", &[b'v', v]).await;
        store.create_version("acme", "hello", &digest, &config, true).await.unwrap();
        digests.push(digest);
    }
    // A rollback target two versions back, and a canary split naming version 2.
    store.set_alias("acme", "hello", "stable", &[Route { version: 1, weight: 1 }]).await.unwrap();
    let split = [Route { version: 2, weight: 5 }, Route { version: 4, weight: 95 }];
    store.set_alias("acme", "hello", "prod", &split).await.unwrap();
    // Keep only the newest: 3 goes, 1 and 2 stay for their aliases.
    assert_eq!(store.purge_versions(1, 100).await.unwrap(), 1);
    assert!(store.get_version("acme", "hello", 3).await.unwrap().is_none());
    for kept in [1, 2, 4] {
        assert!(store.get_version("acme", "hello", kept).await.unwrap().is_some(), "version {kept}");
    }
    // Only version 3's blob is unnamed; the aliased versions keep theirs (and so their artifacts).
    let gone = store.purge_blobs(i64::MAX, 100).await.unwrap();
    assert_eq!(gone, [("acme".to_string(), digests[2].clone())]);
    // Once no alias names it, a version is retired like any other.
    store.delete_alias("acme", "hello", "stable").await.unwrap();
    assert_eq!(store.purge_versions(1, 100).await.unwrap(), 1);
    assert!(store.get_version("acme", "hello", 1).await.unwrap().is_none());
}

pub async fn routing_lists_aliases_and_the_versions_they_name(store: &dyn Store, clock: &ManualClock) {
    assert_eq!(store.all_routing().await.unwrap(), vec![]);
    store.create_tenant("acme").await.unwrap();
    store.create_tenant("beta").await.unwrap();
    let acme = blob(store, "acme", b"one").await;
    let beta = blob(store, "beta", b"one").await;
    let config = FunctionConfig::default();
    clock.set(1_000);
    let v1 = store.create_version("acme", "a", &acme, &config, true).await.unwrap();
    store.create_version("acme", "a", &acme, &config, true).await.unwrap();
    let v3 = store.create_version("acme", "a", &acme, &config, false).await.unwrap();
    let b1 = store.create_version("beta", "b", &beta, &config, true).await.unwrap();
    store
        .set_alias("acme", "a", "prod", &[Route { version: 1, weight: 3 }, Route { version: 3, weight: 1 }])
        .await
        .unwrap();
    store.set_alias("acme", "a", "latest", &[Route { version: 1, weight: 1 }]).await.unwrap();

    let a = store.function_routing("acme", "a").await.unwrap().expect("routing of acme/a");
    assert_eq!(a.newest_version, 3);
    assert_eq!(a.aliases.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(), ["latest", "prod"]);
    // Version 2 is named by nothing now: a node need not hold it.
    assert_eq!(a.versions, vec![v1, v3]);
    assert_eq!(store.function_routing("acme", "nope").await.unwrap(), None);
    assert_eq!(store.function_routing("beta", "a").await.unwrap(), None);

    let all = store.all_routing().await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0], a);
    assert_eq!((all[1].tenant.as_str(), all[1].function.as_str()), ("beta", "b"));
    assert_eq!(all[1].versions, vec![b1]);
}

pub async fn keys_may_be_limited_to_an_alias(store: &dyn Store, _clock: &ManualClock) {
    store.create_tenant("acme").await.unwrap();
    let limited = KeyRecord { alias: Some("prod".into()), ..key("k1", Some("acme"), &[Scope::Invoke], 10) };
    store.create_key(&limited).await.unwrap();
    store.create_key(&key("k2", Some("acme"), &[Scope::Invoke], 20)).await.unwrap();
    assert_eq!(store.get_key("k1").await.unwrap(), Some(limited.clone()));
    let active = store.active_keys().await.unwrap();
    assert_eq!(active.iter().map(|k| k.alias.as_deref()).collect::<Vec<_>>(), [Some("prod"), None]);
}

fn record(id: &str, function: &str, status: InvocationStatus, started_at: UnixMs) -> SyncRecord {
    SyncRecord {
        id: id.to_owned(),
        tenant: "acme".to_owned(),
        function: function.to_owned(),
        version: 1,
        status,
        status_code: Some(200),
        error_kind: None,
        started_at,
        finished_at: started_at + 5,
        cpu_us: 250,
        logs: vec![],
    }
}

fn lines(logs: &[LogLine]) -> Vec<&str> {
    logs.iter().map(|l| l.line.as_str()).collect()
}

pub async fn sync_records_and_their_logs_are_readable(store: &dyn Store, _clock: &ManualClock) {
    store.record_sync(&[]).await.unwrap();
    let mut ok = record("inv-1", "hello", InvocationStatus::Succeeded, 1_000);
    ok.logs = vec![(LogStream::Stdout, "one".into(), 1_001), (LogStream::Stderr, "two".into(), 1_002)];
    let mut dead = record("inv-2", "hello", InvocationStatus::Dead, 2_000);
    dead.version = 7;
    dead.status_code = Some(500);
    dead.error_kind = Some("trap".into());
    dead.logs = vec![(LogStream::System, "wasm trap: unreachable".into(), 2_003)];
    let mut other = record("inv-3", "other", InvocationStatus::Succeeded, 3_000);
    other.status_code = None;
    other.logs = vec![(LogStream::Stdout, "elsewhere".into(), 3_001)];
    store.record_sync(&[ok, dead, other]).await.unwrap();

    let got = store.get_invocation("inv-2").await.unwrap().unwrap();
    let expected = Invocation {
        id: "inv-2".into(),
        tenant: "acme".into(),
        function: "hello".into(),
        version: 7,
        mode: "sync".into(),
        status: InvocationStatus::Dead,
        attempts: 1,
        created_at: 2_000,
        started_at: Some(2_000),
        finished_at: Some(2_005),
        status_code: Some(500),
        error_kind: Some("trap".into()),
        cpu_us: Some(250),
        waits: None,
        idempotency_key: None,
    };
    assert_eq!(got, expected);
    let got = store.get_invocation("inv-3").await.unwrap().unwrap();
    assert_eq!((got.status, got.status_code, got.error_kind), (InvocationStatus::Succeeded, None, None));
    assert_eq!(store.get_invocation("nope").await.unwrap(), None);

    let logs = store.invocation_logs("inv-1").await.unwrap();
    assert_eq!(lines(&logs), ["one", "two"]);
    assert_eq!(logs[0].stream, LogStream::Stdout);
    assert_eq!(logs[1].stream, LogStream::Stderr);
    assert_eq!((logs[0].invocation_id.as_str(), logs[0].at, logs[1].at), ("inv-1", 1_001, 1_002));
    assert!(logs[0].seq < logs[1].seq);
    let logs = store.invocation_logs("inv-2").await.unwrap();
    assert_eq!(logs[0].stream, LogStream::System);
    assert_eq!(store.invocation_logs("nope").await.unwrap(), vec![]);

    // A batch is all or nothing: a duplicate id refuses the whole batch.
    let mut fresh = record("inv-4", "hello", InvocationStatus::Succeeded, 4_000);
    fresh.logs = vec![(LogStream::Stdout, "lost".into(), 4_001)];
    let duplicate = record("inv-1", "hello", InvocationStatus::Succeeded, 4_000);
    let err = store.record_sync(&[fresh, duplicate]).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(store.get_invocation("inv-4").await.unwrap(), None);
    assert_eq!(store.invocation_logs("inv-4").await.unwrap(), vec![]);
    let all = store.function_logs("acme", "hello", None, 100).await.unwrap();
    assert_eq!(lines(&all), ["one", "two", "wasm trap: unreachable"]);
}

/// PostgreSQL refuses a NUL in `text` and `\u0000` in `jsonb`, and a guest decides what it
/// prints: a NUL in a log line (or an error) must cost neither its own record nor the others of
/// its batch, on either backend. It is stored as U+FFFD, the same on both.
pub async fn guest_text_with_nul_is_stored_with_a_replacement_character(
    store: &dyn Store,
    clock: &ManualClock,
) {
    let mut nul = record("inv-nul", "hello", InvocationStatus::Dead, 1_000);
    nul.status_code = Some(500);
    nul.error_kind = Some("trap\0".into());
    nul.logs = vec![
        (LogStream::Stdout, "a\0b".into(), 1_001),
        (LogStream::System, "panicked at src/lib.rs: \0\0".into(), 1_002),
    ];
    let mut other = record("inv-other", "hello", InvocationStatus::Succeeded, 1_000);
    other.logs = vec![(LogStream::Stdout, "another tenant's line".into(), 1_003)];
    store.record_sync(&[nul, other]).await.expect("a batch with a NUL in it is recorded");
    let logs = store.invocation_logs("inv-nul").await.unwrap();
    assert_eq!(lines(&logs), ["a\u{fffd}b", "panicked at src/lib.rs: \u{fffd}\u{fffd}"]);
    let got = store.get_invocation("inv-nul").await.unwrap().unwrap();
    assert_eq!(got.error_kind.as_deref(), Some("trap\u{fffd}"));
    assert_eq!(lines(&store.invocation_logs("inv-other").await.unwrap()), ["another tenant's line"]);

    // An async attempt's result is recorded the first time, so the guest does not run again.
    clock.set(2_000);
    store.enqueue(&queue::invocation("inv-async")).await.unwrap();
    let leased = store.lease("node", 2_000, queue::LEASE_MS, 10).await.unwrap();
    assert_eq!(leased.len(), 1);
    let response = sluice_store::StoredResponse {
        status: 500,
        headers: vec![("x-bytes".into(), b"a\0b".to_vec())],
        body: b"\0 body \0".to_vec(),
    };
    let result = sluice_store::AttemptResult::Failed {
        error_kind: "trap\0".into(),
        status_code: Some(500),
        response: Some(response.clone()),
        retry_at: None,
    };
    let logs = [(LogStream::Stderr, "x\0y".to_string(), 2_001)];
    assert!(
        store
            .complete(Completion { logs: &logs, ..ended("inv-async", "node", 1, &result, 2_002) })
            .await
            .expect("recorded")
    );
    let got = store.get_invocation("inv-async").await.unwrap().unwrap();
    assert_eq!((got.status, got.attempts), (InvocationStatus::Dead, 1));
    assert_eq!(got.error_kind.as_deref(), Some("trap\u{fffd}"));
    assert_eq!(lines(&store.invocation_logs("inv-async").await.unwrap()), ["x\u{fffd}y"]);
    // Header values and bodies are bytes, kept byte for byte.
    assert_eq!(store.get_response("inv-async").await.unwrap(), Some(response));
    let tail = store.function_logs("acme", "hello", None, 10).await.unwrap();
    assert_eq!(tail.len(), 4, "{tail:?}");
}

pub async fn function_logs_tail_and_page(store: &dyn Store, _clock: &ManualClock) {
    let mut batch = Vec::new();
    for i in 0..4 {
        let mut r = record(&format!("inv-{i}"), "hello", InvocationStatus::Succeeded, i * 100);
        r.logs = (0..3).map(|j| (LogStream::Stdout, format!("{i}.{j}"), i * 100 + j)).collect();
        batch.push(r);
    }
    let mut other = record("inv-x", "other", InvocationStatus::Succeeded, 50);
    other.logs = vec![(LogStream::Stdout, "not hello".into(), 51)];
    batch.insert(2, other);
    store.record_sync(&batch).await.unwrap();

    // No cursor: the last `limit` lines, oldest first.
    let tail = store.function_logs("acme", "hello", None, 4).await.unwrap();
    assert_eq!(lines(&tail), ["2.2", "3.0", "3.1", "3.2"]);
    let everything = store.function_logs("acme", "hello", None, 1_000).await.unwrap();
    assert_eq!(everything.len(), 12);
    assert!(everything.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(store.function_logs("acme", "hello", None, 0).await.unwrap(), vec![]);
    assert_eq!(store.function_logs("acme", "nope", None, 10).await.unwrap(), vec![]);
    assert_eq!(store.function_logs("beta", "hello", None, 10).await.unwrap(), vec![]);

    // With a cursor: pages of `limit` after it, oldest first, until caught up.
    let mut seen = Vec::new();
    let mut cursor = Some(0);
    loop {
        let page = store.function_logs("acme", "hello", cursor, 5).await.unwrap();
        assert!(page.len() <= 5);
        let Some(last) = page.last() else { break };
        cursor = Some(last.seq);
        seen.extend(page.iter().map(|l| l.line.clone()));
    }
    assert_eq!(seen, lines(&everything));

    // Following: lines recorded later appear after the cursor, and nothing before it again.
    let mut later = record("inv-9", "hello", InvocationStatus::Succeeded, 900);
    later.logs = vec![(LogStream::Stderr, "late".into(), 901)];
    store.record_sync(&[later]).await.unwrap();
    let page = store.function_logs("acme", "hello", cursor, 5).await.unwrap();
    assert_eq!(lines(&page), ["late"]);
    assert_eq!(page[0].stream, LogStream::Stderr);
}

pub async fn large_sync_batches_are_recorded_whole(store: &dyn Store, _clock: &ManualClock) {
    const RECORDS: i64 = 1_000;
    const LINES_PER_RECORD: i64 = 3;
    let batch: Vec<SyncRecord> = (0..RECORDS)
        .map(|i| {
            let mut r = record(&format!("inv-{i:04}"), "hello", InvocationStatus::Succeeded, i);
            r.logs = (0..LINES_PER_RECORD).map(|j| (LogStream::Stdout, format!("{i}.{j}"), i)).collect();
            r
        })
        .collect();
    let started = std::time::Instant::now();
    store.record_sync(&batch).await.unwrap();
    // Printed, not asserted: speed is measured in benchmarks, never in unit tests.
    eprintln!("record_sync: {RECORDS} records x {LINES_PER_RECORD} lines in {:?}", started.elapsed());
    let logs = store.function_logs("acme", "hello", None, 10_000).await.unwrap();
    assert_eq!(logs.len() as i64, RECORDS * LINES_PER_RECORD);
    assert_eq!(logs.last().unwrap().line, format!("{}.{}", RECORDS - 1, LINES_PER_RECORD - 1));
    assert!(store.get_invocation("inv-0999").await.unwrap().is_some());
}

/// A function `hello` of `acme` with versions 1 to 3, `prod` on 1.
async fn rollout_fixture(store: &dyn Store) {
    store.create_tenant("acme").await.unwrap();
    let digest = blob(store, "acme", b"component").await;
    for _ in 0..3 {
        store.create_version("acme", "hello", &digest, &FunctionConfig::default(), true).await.unwrap();
    }
    store.set_alias("acme", "hello", "prod", &[Route { version: 1, weight: 100 }]).await.unwrap();
}

fn new_rollout(alias: &str, canary: i64, steps: &[u32]) -> NewRollout {
    NewRollout {
        tenant: "acme".into(),
        function: "hello".into(),
        alias: alias.into(),
        canary_version: canary,
        steps: steps.to_vec(),
        every_ms: 1_000,
        margin_bp: 100,
        min_calls: 20,
    }
}

async fn prod_routes(store: &dyn Store) -> Vec<Route> {
    store.list_aliases("acme", "hello").await.unwrap().into_iter().find(|a| a.name == "prod").unwrap().routes
}

pub async fn rollouts_move_their_alias_step_by_step_fenced_by_an_owner(
    store: &dyn Store,
    clock: &ManualClock,
) {
    rollout_fixture(store).await;
    clock.set(10_000);
    let started = store.start_rollout(&new_rollout("prod", 3, &[10, 50, 100])).await.unwrap();
    assert_eq!((started.stable_version, started.canary_version, started.step), (1, 3, 0));
    assert_eq!(started.status, RolloutStatus::Running);
    assert_eq!(
        prod_routes(store).await,
        [Route { version: 3, weight: 10 }, Route { version: 1, weight: 90 }]
    );
    assert_eq!(store.running_rollouts().await.unwrap(), std::slice::from_ref(&started));

    // Counts from two nodes add up in the step's row.
    let counts = StepCounts { canary_calls: 5, canary_errors: 1, stable_calls: 40, stable_errors: 0 };
    store.add_rollout_counts(started.id, 0, counts).await.unwrap();
    store.add_rollout_counts(started.id, 0, counts).await.unwrap();
    let steps = store.rollout_steps(started.id).await.unwrap();
    assert_eq!(steps.len(), 1);
    assert_eq!((steps[0].percent, steps[0].started_at), (10, 10_000));
    assert_eq!(
        steps[0].counts,
        StepCounts { canary_calls: 10, canary_errors: 2, stable_calls: 80, stable_errors: 0 }
    );

    // One owner at a time; a lease that ran out is taken over, and its old owner is fenced.
    assert!(store.claim_rollout(started.id, "node-a", 5_000).await.unwrap());
    assert!(!store.claim_rollout(started.id, "node-b", 5_000).await.unwrap());
    assert!(store.claim_rollout(started.id, "node-a", 5_000).await.unwrap(), "renewing is taking it again");
    clock.set(16_000);
    assert!(store.claim_rollout(started.id, "node-b", 5_000).await.unwrap());
    assert_eq!(store.move_rollout(started.id, Some("node-a"), RolloutMove::Step(1)).await.unwrap(), None);
    let moved = store.move_rollout(started.id, Some("node-b"), RolloutMove::Step(1)).await.unwrap().unwrap();
    assert_eq!(moved.step, 1);
    assert_eq!(
        prod_routes(store).await,
        [Route { version: 3, weight: 50 }, Route { version: 1, weight: 50 }]
    );
    let steps = store.rollout_steps(started.id).await.unwrap();
    assert_eq!((steps[1].step, steps[1].percent, steps[1].started_at), (1, 50, 16_000));
    assert!(steps[1].counts.is_empty(), "a step counts from zero");

    let promoted = store
        .move_rollout(
            started.id,
            Some("node-b"),
            RolloutMove::End { status: RolloutStatus::Promoted, reason: None },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!((promoted.status, promoted.step), (RolloutStatus::Promoted, 2));
    let steps = store.rollout_steps(started.id).await.unwrap();
    assert_eq!(steps.iter().map(|s| s.percent).collect::<Vec<_>>(), [10, 50, 100], "the promotion is a step");
    assert_eq!(prod_routes(store).await, [Route { version: 3, weight: 100 }]);
    assert_eq!(store.running_rollouts().await.unwrap(), vec![]);
    assert!(!store.claim_rollout(started.id, "node-b", 5_000).await.unwrap(), "an ended rollout is nobody's");
    assert_eq!(store.latest_rollout("acme", "hello", "prod").await.unwrap(), Some(promoted));

    // A rollback puts the alias back on the stable version and keeps the reason.
    store.set_alias("acme", "hello", "prod", &[Route { version: 1, weight: 100 }]).await.unwrap();
    let second = store.start_rollout(&new_rollout("prod", 2, &[100])).await.unwrap();
    assert_eq!(prod_routes(store).await, [Route { version: 2, weight: 100 }]);
    let why = Some("canary 20.0% errors".to_string());
    let back = store
        .move_rollout(
            second.id,
            None,
            RolloutMove::End { status: RolloutStatus::RolledBack, reason: why.clone() },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!((back.status, back.reason), (RolloutStatus::RolledBack, why));
    assert_eq!(prod_routes(store).await, [Route { version: 1, weight: 100 }]);
}

pub async fn a_rollout_is_one_per_alias_and_a_manual_move_cancels_it(
    store: &dyn Store,
    _clock: &ManualClock,
) {
    rollout_fixture(store).await;
    let first = store.start_rollout(&new_rollout("prod", 3, &[5, 100])).await.unwrap();
    let again = store.start_rollout(&new_rollout("prod", 2, &[5, 100])).await;
    assert!(matches!(&again, Err(StoreError::Conflict(m)) if m.contains("rollout running")), "{again:?}");
    // Bad steps, a split alias, the canary already named, a missing version: refused, nothing kept.
    let bad = store.start_rollout(&new_rollout("latest", 1, &[50, 25, 100])).await;
    assert!(matches!(bad, Err(StoreError::Conflict(_))), "{bad:?}");
    let same = store.start_rollout(&new_rollout("latest", 3, &[100])).await;
    assert!(matches!(&same, Err(StoreError::Conflict(m)) if m.contains("already names")), "{same:?}");
    let missing = store.start_rollout(&new_rollout("latest", 9, &[100])).await;
    assert!(matches!(missing, Err(StoreError::NotFound(_))), "{missing:?}");
    store
        .set_alias(
            "acme",
            "hello",
            "split",
            &[Route { version: 1, weight: 1 }, Route { version: 2, weight: 1 }],
        )
        .await
        .unwrap();
    let split = store.start_rollout(&new_rollout("split", 3, &[100])).await;
    assert!(matches!(&split, Err(StoreError::Conflict(m)) if m.contains("split")), "{split:?}");
    assert_eq!(store.running_rollouts().await.unwrap().len(), 1);

    // Setting the alias by hand ends the rollout where it was, and the new alias stays.
    store.set_alias("acme", "hello", "prod", &[Route { version: 2, weight: 100 }]).await.unwrap();
    let ended = store.latest_rollout("acme", "hello", "prod").await.unwrap().unwrap();
    assert_eq!((ended.id, ended.status), (first.id, RolloutStatus::Cancelled));
    assert!(ended.reason.unwrap().contains("by hand"));
    assert_eq!(store.move_rollout(first.id, None, RolloutMove::Step(1)).await.unwrap(), None);
    assert_eq!(prod_routes(store).await, [Route { version: 2, weight: 100 }]);

    // A deploy that moves `latest` cancels a rollout of `latest`.
    store.start_rollout(&new_rollout("latest", 1, &[5, 100])).await.unwrap();
    let digest = blob(store, "acme", b"component").await;
    store.create_version("acme", "hello", &digest, &FunctionConfig::default(), true).await.unwrap();
    let ended = store.latest_rollout("acme", "hello", "latest").await.unwrap().unwrap();
    assert_eq!(ended.status, RolloutStatus::Cancelled);
    assert!(ended.reason.unwrap().contains("version 4 was deployed"));
}
