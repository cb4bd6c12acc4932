//! The store suite against PostgreSQL, and the promises only a shared database has to keep:
//! nodes starting together migrate once, the database's clock decides leases, a function's log
//! tail skips nothing while nodes commit concurrently, and other nodes' changes are announced.
//!
//! Needs `SLUICE_TEST_PG_URL` (CI sets it to the local server); each test creates its own database
//! and drops it afterwards. Without the variable every test here passes after saying it skipped.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::suite::ended;
use sluice_core::{Clock, SystemClock};
use sluice_store::{
    Change, ClockSource, Code, Completion, Enqueued, InvocationStatus, Invocations, LogStream, Logs,
    NewInvocation, PostgresStore, SWEEP_BATCH_MAX, Store, Tenants,
};
use sqlx::Connection;

use crate::suite::ManualClock;

/// The variable naming the server; the URL's database is used only to create and drop others.
pub const URL_VARIABLE: &str = "SLUICE_TEST_PG_URL";

/// A database of its own, dropped (with every connection to it) when the harness drops.
pub struct TempDatabase {
    admin_url: String,
    pub name: String,
    pub url: String,
}

impl TempDatabase {
    /// `None`, after saying so, when no server is configured.
    pub async fn create() -> Option<Self> {
        let Ok(admin_url) = std::env::var(URL_VARIABLE) else {
            eprintln!("skipped: {URL_VARIABLE} is not set, so there is no PostgreSQL to test against");
            return None;
        };
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let name =
            format!("sluice_test_{}_{}_{nanos}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let mut admin = sqlx::PgConnection::connect(&admin_url).await.expect("connecting to the test server");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("creating a test database");
        let _ = admin.close().await;
        let url = with_database(&admin_url, &name);
        Some(Self { admin_url, name, url })
    }
}

/// `url` with its database replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base,
    };
    format!("{base}/{name}{query}")
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot be blocked on: a thread of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let mut admin = sqlx::PgConnection::connect(&admin_url).await?;
                sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                    .execute(&mut admin)
                    .await?;
                admin.close().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}: {dropped:?}", self.name);
        }
    }
}

pub struct Harness {
    pub clock: Arc<ManualClock>,
    store: PostgresStore,
    // Dropped after the store.
    database: TempDatabase,
}

impl Harness {
    pub fn store(&self) -> &dyn Store {
        &self.store
    }
}

/// A fresh database, with leases on the caller's (manual) clock like the SQLite suite.
async fn fresh() -> Option<Harness> {
    let database = TempDatabase::create().await?;
    let clock = Arc::new(ManualClock::new(0));
    let store =
        PostgresStore::connect_with(&database.url, clock.clone() as Arc<dyn Clock>, ClockSource::Caller)
            .await
            .expect("connect to a fresh database");
    Some(Harness { clock, store, database })
}

crate::run_whole_suite!(optional fresh);

proptest::proptest! {
    // Each case creates and drops a database: fewer cases than on SQLite keep it at seconds.
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 16, ..Default::default() })]
    #[test]
    fn queue_state_machine_keeps_its_invariants(ops in crate::suite::queue_ops()) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async {
            let Some(harness) = fresh().await else { return };
            crate::suite::queue_state_machine_keeps_its_invariants(harness.store(), &harness.clock, ops).await;
        });
    }
}

/// Three nodes connecting to a new database at once: each migration is applied once, and all
/// three work.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_starting_together_migrate_once() {
    let Some(database) = TempDatabase::create().await else { return };
    let stores = futures::future::join_all((0..3).map(|_| PostgresStore::connect(&database.url))).await;
    let stores: Vec<PostgresStore> = stores.into_iter().map(|s| s.expect("every node connects")).collect();
    let mut admin = sqlx::PgConnection::connect(&database.url).await.unwrap();
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_version ORDER BY version")
        .fetch_all(&mut admin)
        .await
        .unwrap();
    assert_eq!(applied, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    for (i, store) in stores.iter().enumerate() {
        store.create_tenant(&format!("t{i}")).await.unwrap();
    }
    assert_eq!(stores[0].list_tenants().await.unwrap().len(), 3);
    admin.close().await.unwrap();
    for store in &stores {
        store.close().await;
    }
}

/// With the database's clock, a node whose own clock runs an hour ahead (or behind) neither
/// steals a live lease nor keeps a dead one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_database_clock_decides_leases() {
    let Some(database) = TempDatabase::create().await else { return };
    let store = PostgresStore::connect(&database.url).await.unwrap();
    let now = SystemClock.now_ms();
    let inv = NewInvocation { run_after: now - 1_000, ..crate::suite::invocation("inv-1") };
    assert_eq!(store.enqueue(&inv).await.unwrap(), Enqueued::Created);

    let hour = 3_600_000;
    let a = store.lease("node-a", now - hour, 2_000, 10).await.unwrap();
    assert_eq!(a.len(), 1, "a clock an hour behind still sees the row runnable");
    // Node b's clock is an hour ahead: by its clock node a's lease expired long ago.
    assert!(store.lease("node-b", now + hour, 2_000, 10).await.unwrap().is_empty(), "stolen by skew");
    // A heartbeat from the slow clock still renews for the lease's length, from the database's now.
    assert!(store.heartbeat("node-a", &[("inv-1".into(), 1)], now - hour, 2_000).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    let b = store.lease("node-b", now - hour, 2_000, 10).await.unwrap();
    assert_eq!(b.len(), 1, "a lapsed lease is reclaimed whatever the caller's clock says");
    assert_eq!(b[0].attempt, 2);
    store.close().await;
}

/// Two nodes complete invocations of one function concurrently, each with a log line, while a
/// third reader tails the function with `seq > last seen`. Sequence numbers are handed out at
/// insert, not at commit; the tail must still see every line.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_log_tail_skips_no_line_while_nodes_commit_concurrently() {
    const PER_NODE: usize = 300;
    let Some(database) = TempDatabase::create().await else { return };
    let nodes = [
        PostgresStore::connect(&database.url).await.unwrap(),
        PostgresStore::connect(&database.url).await.unwrap(),
    ];
    let now = SystemClock.now_ms();
    for i in 0..2 * PER_NODE {
        let inv =
            NewInvocation { run_after: now - 1_000, ..crate::suite::invocation(&format!("inv-{i:04}")) };
        nodes[i % 2].enqueue(&inv).await.unwrap();
    }
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tail = {
        let reader = PostgresStore::connect(&database.url).await.unwrap();
        let done = done.clone();
        tokio::spawn(async move {
            let mut seen = BTreeSet::new();
            let mut after = Some(0);
            loop {
                let finished = done.load(Ordering::Acquire);
                let lines = reader.function_logs("acme", "hello", after, 1_000).await.unwrap();
                for line in &lines {
                    seen.insert(line.line.clone());
                    after = Some(line.seq);
                }
                if finished && lines.is_empty() {
                    return seen;
                }
            }
        })
    };
    let work = nodes.iter().enumerate().map(|(n, node)| async move {
        let owner = format!("node-{n}");
        let mut completed = 0;
        while completed < PER_NODE {
            let leased = node.lease(&owner, 0, 30_000, 8).await.unwrap();
            let completions = leased.iter().map(|l| {
                let logs = [(LogStream::Stdout, l.id.clone(), 0)];
                let owner = owner.clone();
                async move {
                    node.complete(Completion {
                        logs: &logs,
                        ..ended(&l.id, &owner, l.attempt, &crate::suite::success(200), 0)
                    })
                    .await
                    .unwrap()
                }
            });
            completed += futures::future::join_all(completions).await.into_iter().filter(|c| *c).count();
            if leased.is_empty() {
                break;
            }
        }
    });
    futures::future::join_all(work).await;
    done.store(true, Ordering::Release);
    let seen = tail.await.unwrap();
    let expected: BTreeSet<String> = (0..2 * PER_NODE).map(|i| format!("inv-{i:04}")).collect();
    let missed: Vec<&String> = expected.difference(&seen).collect();
    assert!(missed.is_empty(), "the tail skipped {} lines, e.g. {:?}", missed.len(), missed.first());
    let succeeded = futures::future::join_all(expected.iter().map(|id| nodes[0].get_invocation(id))).await;
    assert!(
        succeeded.iter().all(|i| i.as_ref().unwrap().as_ref().unwrap().status == InvocationStatus::Succeeded)
    );
}

/// Each sweep changes at most `SWEEP_BATCH_MAX` rows: a backlog of expired invocations is marked
/// over several leases, never in one long statement that locks it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sweeps_are_bounded() {
    let Some(harness) = fresh().await else { return };
    let store = harness.store();
    let backlog = SWEEP_BATCH_MAX as usize + 200;
    let late: Vec<NewInvocation> = (0..backlog)
        .map(|i| NewInvocation { deadline: Some(10), ..crate::suite::invocation(&format!("late-{i:05}")) })
        .collect();
    for result in futures::future::join_all(late.iter().map(|inv| store.enqueue(inv))).await {
        assert_eq!(result.unwrap(), Enqueued::Created);
    }
    let mut admin = sqlx::PgConnection::connect(&harness.database.url).await.unwrap();
    let mut expired = async || -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM invocations WHERE status = 'expired'")
            .fetch_one(&mut admin)
            .await
            .unwrap()
    };
    assert!(store.lease("node", 20, 1_000, 10).await.unwrap().is_empty(), "past their deadline");
    assert_eq!(expired().await, SWEEP_BATCH_MAX, "one sweep");
    assert!(store.lease("node", 20, 1_000, 10).await.unwrap().is_empty());
    assert_eq!(expired().await, backlog as i64, "the rest at the next lease");
}

/// A change made through one node is announced to the others when it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn other_nodes_hear_of_changes() {
    let Some(database) = TempDatabase::create().await else { return };
    let writer = PostgresStore::connect(&database.url).await.unwrap();
    let other = PostgresStore::connect(&database.url).await.unwrap();
    let mut changes = other.changes().expect("a shared store announces changes");
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(5), changes.recv())
            .await
            .expect("announced in time")
            .unwrap()
    };
    writer.create_tenant("acme").await.unwrap();
    writer.set_tenant_rate("acme", Some((5.0, 5))).await.unwrap();
    assert_eq!(next().await, Change::Limits);
    let key = sluice_store::KeyRecord {
        id: "k1".into(),
        tenant: Some("acme".into()),
        scopes: vec![sluice_core::Scope::Read],
        hash: "h".into(),
        created_at: 0,
        revoked: false,
        alias: None,
    };
    writer.create_key(&key).await.unwrap();
    assert_eq!(next().await, Change::Keys);
    writer.revoke_key("k1").await.unwrap();
    assert_eq!(next().await, Change::Keys);
    writer.put_blob("acme", "d1", b"component").await.unwrap();
    writer.create_version("acme", "hello", "d1", &Default::default(), true).await.unwrap();
    let deployed = Change::Function { tenant: "acme".into(), function: "hello".into() };
    assert_eq!(next().await, deployed);
    writer.enqueue(&crate::suite::invocation("inv-1")).await.unwrap();
    assert_eq!(next().await, Change::Queue);
    writer.delete_function("acme", "hello").await.unwrap();
    assert_eq!(next().await, deployed);
}

#[test]
fn urls_get_their_database_replaced() {
    assert_eq!(with_database("postgres://u@h:5432/postgres", "x"), "postgres://u@h:5432/x");
    assert_eq!(with_database("postgres://u@h/db?sslmode=disable", "x"), "postgres://u@h/x?sslmode=disable");
    assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
}
