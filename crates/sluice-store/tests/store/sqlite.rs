//! The store suite against SQLite files in a temporary directory, and the SQLite-only promises:
//! data survives a reopen, and two stores on one file (two processes) still number versions
//! without gaps or duplicates.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::suite::ended;
use sluice_core::{Clock, FunctionConfig, Scope};
use sluice_store::{
    Code, Enqueued, InvocationStatus, Invocations, KeyRecord, LogStream, Logs, NewInvocation, SqliteStore,
    Store, SyncRecord, Tenants,
};

use crate::suite::ManualClock;

/// A fresh database file; the directory is removed when the harness drops.
pub struct Harness {
    _dir: tempfile::TempDir,
    path: PathBuf,
    pub clock: Arc<ManualClock>,
    store: SqliteStore,
}

impl Harness {
    pub fn store(&self) -> &dyn Store {
        &self.store
    }
}

async fn fresh() -> Harness {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("sluice.db");
    let clock = Arc::new(ManualClock::new(0));
    let store = SqliteStore::open_with_clock(&path, clock.clone() as Arc<dyn Clock>)
        .await
        .expect("open a fresh store");
    Harness { _dir: dir, path, clock, store }
}

crate::run_whole_suite!(fresh);

proptest::proptest! {
    // Each case opens a fresh database and commits a few dozen times: 64 cases keep the test at
    // seconds, not minutes.
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]
    #[test]
    fn queue_state_machine_keeps_its_invariants(ops in crate::suite::queue_ops()) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let harness = fresh().await;
            crate::suite::queue_state_machine_keeps_its_invariants(harness.store(), &harness.clock, ops).await;
        });
    }
}

/// Group commit: concurrent queue writes share transactions. Without it, this would take one
/// commit (and one fsync) per enqueue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_enqueues_share_commits() {
    const CALLS: usize = 500;
    const COMMITS_MAX: u64 = 50;
    let harness = fresh().await;
    let invocations: Vec<NewInvocation> =
        (0..CALLS).map(|i| crate::suite::invocation(&format!("inv-{i:04}"))).collect();
    let before = harness.store.commits();
    let results = futures::future::join_all(invocations.iter().map(|inv| harness.store().enqueue(inv))).await;
    let commits = harness.store.commits() - before;
    assert!(results.into_iter().all(|r| r.unwrap() == Enqueued::Created));
    assert!(commits <= COMMITS_MAX, "{CALLS} enqueues took {commits} commits");
    eprintln!("{CALLS} concurrent enqueues: {commits} commits");
    for inv in &invocations {
        assert!(harness.store().get_invocation(&inv.id).await.unwrap().is_some());
    }
}

/// 5,000 concurrent enqueues, drained by leases of 500 and a completion each: every call
/// completes exactly once. Also the store's micro-benchmark (BENCHMARKS.md): it prints how fast
/// that went, which a release build with `--nocapture` makes worth reading. Under a second in a
/// debug build, so it runs with the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_throughput() {
    const CALLS: usize = 5_000;
    const LEASE_BATCH: u32 = 500;
    let harness = fresh().await;
    let store = harness.store();
    let invocations: Vec<NewInvocation> =
        (0..CALLS).map(|i| crate::suite::invocation(&format!("inv-{i:05}"))).collect();
    let started = Instant::now();
    let commits = harness.store.commits();
    let results = futures::future::join_all(invocations.iter().map(|inv| store.enqueue(inv))).await;
    let enqueued = started.elapsed();
    assert!(results.into_iter().all(|r| r.is_ok()));
    let enqueue_commits = harness.store.commits() - commits;

    let started = Instant::now();
    let mut done = 0;
    loop {
        let leased = store.lease("node-a", 0, 30_000, LEASE_BATCH).await.unwrap();
        if leased.is_empty() {
            break;
        }
        let result = crate::suite::success(200);
        let completions = futures::future::join_all(
            leased.iter().map(|l| store.complete(ended(&l.id, "node-a", l.attempt, &result, 1))),
        )
        .await;
        done += completions.into_iter().filter(|c| *c.as_ref().unwrap()).count();
    }
    let drained = started.elapsed();
    assert_eq!(done, CALLS);
    let per_sec = |d: std::time::Duration| CALLS as f64 / d.as_secs_f64();
    eprintln!(
        "{CALLS} concurrent enqueues: {enqueued:?} ({:.0}/s, {enqueue_commits} commits); \
         lease {LEASE_BATCH} + complete each until drained: {drained:?} ({:.0}/s); \
         end to end {:.0} invocations/s",
        per_sec(enqueued),
        per_sec(drained),
        per_sec(enqueued + drained),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn data_survives_a_reopen() {
    let harness = fresh().await;
    let store = harness.store();
    harness.clock.set(1_000);
    store.create_tenant("acme").await.unwrap();
    let key = KeyRecord {
        id: "k1".into(),
        tenant: Some("acme".into()),
        scopes: vec![Scope::Deploy, Scope::Read],
        hash: "h1".into(),
        created_at: 1_000,
        revoked: false,
        alias: None,
    };
    store.create_key(&key).await.unwrap();
    store.put_blob("acme", "d1", b"component").await.unwrap();
    let config = FunctionConfig { public: true, ..FunctionConfig::default() };
    store.create_version("acme", "hello", "d1", &config, true).await.unwrap();
    let version = store.create_version("acme", "hello", "d1", &config, true).await.unwrap();
    let record = SyncRecord {
        id: "inv-1".into(),
        tenant: "acme".into(),
        function: "hello".into(),
        version: 2,
        status: InvocationStatus::Succeeded,
        status_code: Some(200),
        error_kind: None,
        started_at: 1_000,
        finished_at: 1_010,
        cpu_us: 0,
        logs: vec![(LogStream::Stdout, "hi".into(), 1_005)],
    };
    store.record_sync(&[record]).await.unwrap();
    let invocation = store.get_invocation("inv-1").await.unwrap();
    let logs = store.invocation_logs("inv-1").await.unwrap();
    harness.store.close().await;

    let reopened = SqliteStore::open(&harness.path).await.unwrap();
    assert_eq!(reopened.get_tenant("acme").await.unwrap().unwrap().created_at, 1_000);
    assert_eq!(reopened.get_key("k1").await.unwrap(), Some(key));
    assert_eq!(reopened.get_blob("acme", "d1").await.unwrap(), Some(b"component".to_vec()));
    assert_eq!(reopened.latest_version("acme", "hello").await.unwrap(), Some(version));
    assert_eq!(reopened.get_invocation("inv-1").await.unwrap(), invocation);
    assert_eq!(reopened.invocation_logs("inv-1").await.unwrap(), logs);
    // The counter survived too: the next deploy is 3, not 1.
    let next = reopened.create_version("acme", "hello", "d1", &config, true).await.unwrap();
    assert_eq!(next.version, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_stores_on_one_file_number_versions_together() {
    const DEPLOYS_EACH: usize = 10;
    let harness = fresh().await;
    let other = SqliteStore::open(&harness.path).await.unwrap();
    harness.store().create_tenant("acme").await.unwrap();
    harness.store().put_blob("acme", "d1", b"component").await.unwrap();
    let config = FunctionConfig::default();
    let stores: [&dyn Store; 2] = [harness.store(), &other];
    let deploys = stores.iter().flat_map(|store| {
        (0..DEPLOYS_EACH).map(|_| store.create_version("acme", "hello", "d1", &config, true))
    });
    let mut versions: Vec<i64> =
        futures::future::join_all(deploys).await.into_iter().map(|r| r.unwrap().version).collect();
    versions.sort_unstable();
    assert_eq!(versions, (1..=(2 * DEPLOYS_EACH) as i64).collect::<Vec<_>>());
}
