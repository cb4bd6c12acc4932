//! The store suite against SQLite files in a temporary directory, and the SQLite-only promises:
//! data survives a reopen, and two stores on one file (two processes) still number versions
//! without gaps or duplicates.

use std::path::PathBuf;
use std::sync::Arc;

use sluice_core::{Clock, FunctionConfig, Scope};
use sluice_store::{InvocationStatus, KeyRecord, LogStream, SqliteStore, Store, SyncRecord};

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
    Harness {
        _dir: dir,
        path,
        clock,
        store,
    }
}

crate::run_suite!(
    fresh;
    tenants_are_unique_and_listed_by_name,
    keys_are_listed_revoked_and_filtered,
    blobs_are_content_addressed,
    versions_are_numbered_from_one,
    concurrent_deploys_get_distinct_consecutive_versions,
    functions_are_listed_per_tenant,
    deleting_a_function_deletes_its_versions_only,
    all_latest_versions_has_one_entry_per_function,
    sync_records_and_their_logs_are_readable,
    function_logs_tail_and_page,
    large_sync_batches_are_recorded_whole,
);

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
    };
    store.create_key(&key).await.unwrap();
    store.put_blob("d1", b"component").await.unwrap();
    let config = FunctionConfig {
        public: true,
        ..FunctionConfig::default()
    };
    store
        .create_version("acme", "hello", "d1", &config)
        .await
        .unwrap();
    let version = store
        .create_version("acme", "hello", "d1", &config)
        .await
        .unwrap();
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
        logs: vec![(LogStream::Stdout, "hi".into(), 1_005)],
    };
    store.record_sync(&[record]).await.unwrap();
    let invocation = store.get_invocation("inv-1").await.unwrap();
    let logs = store.invocation_logs("inv-1").await.unwrap();
    harness.store.close().await;

    let reopened = SqliteStore::open(&harness.path).await.unwrap();
    assert_eq!(
        reopened
            .get_tenant("acme")
            .await
            .unwrap()
            .unwrap()
            .created_at,
        1_000
    );
    assert_eq!(reopened.get_key("k1").await.unwrap(), Some(key));
    assert_eq!(
        reopened.get_blob("d1").await.unwrap(),
        Some(b"component".to_vec())
    );
    assert_eq!(
        reopened.latest_version("acme", "hello").await.unwrap(),
        Some(version)
    );
    assert_eq!(reopened.get_invocation("inv-1").await.unwrap(), invocation);
    assert_eq!(reopened.invocation_logs("inv-1").await.unwrap(), logs);
    // The counter survived too: the next deploy is 3, not 1.
    let next = reopened
        .create_version("acme", "hello", "d1", &config)
        .await
        .unwrap();
    assert_eq!(next.version, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_stores_on_one_file_number_versions_together() {
    const DEPLOYS_EACH: usize = 10;
    let harness = fresh().await;
    let other = SqliteStore::open(&harness.path).await.unwrap();
    harness.store().create_tenant("acme").await.unwrap();
    harness.store().put_blob("d1", b"component").await.unwrap();
    let config = FunctionConfig::default();
    let stores: [&dyn Store; 2] = [harness.store(), &other];
    let deploys = stores.iter().flat_map(|store| {
        (0..DEPLOYS_EACH).map(|_| store.create_version("acme", "hello", "d1", &config))
    });
    let mut versions: Vec<i64> = futures::future::join_all(deploys)
        .await
        .into_iter()
        .map(|r| r.unwrap().version)
        .collect();
    versions.sort_unstable();
    assert_eq!(
        versions,
        (1..=(2 * DEPLOYS_EACH) as i64).collect::<Vec<_>>()
    );
}
