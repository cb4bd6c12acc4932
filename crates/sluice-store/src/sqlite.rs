//! [`SqliteStore`]: the embedded [`Store`](crate::Store) of a single node, one SQLite file in WAL
//! mode: the shared [`SqlStore`] over the [`SqliteEngine`].
//!
//! This module owns the connection options, the schema (an append-only list of numbered
//! migrations, applied at open), the one mapping from SQLite result codes to [`StoreError`], and
//! the statements that are SQLite's own (the purges by `rowid`, the lease indexes named with
//! `INDEXED BY`).
//! It must not decide policy: what a limit is, who may see what, or how an error becomes an HTTP
//! status belongs to the callers.
//!
//! Concurrency: every transaction that writes starts with `BEGIN IMMEDIATE`, so it takes SQLite's
//! single write lock before it reads anything. A deferred transaction that reads and then tries to
//! write fails at once with `SQLITE_BUSY` when another connection committed in between (the busy
//! timeout does not help it), which would turn two concurrent deploys into a spurious 503.
//!
//! The async queue's writes do not use the pool: they go to one writer task with its own
//! connection, which commits them in groups (see [`queue`]). So do the other writes that are
//! frequent or large (sync records, component blobs, the node's heartbeat): SQLite has one write
//! lock, and a second writer waiting on it would either stall the queue's commits or fail with
//! `SQLITE_BUSY` after the busy timeout. Reads use the pool; the rare writes of the control plane
//! (tenants, keys, versions) still take `BEGIN IMMEDIATE` on a pooled connection.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sluice_core::{Clock, SystemClock, UnixMs};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteQueryResult,
    SqliteSynchronous,
};
use sqlx::{Pool, Sqlite, Transaction};
use tokio::sync::broadcast;

use crate::queue::Writer;
use crate::rows::{node_from_row, rows, sync_batch_json};
use crate::sql::{Dialect, Engine, SqlStore};
use crate::{Change, LeaseAsk, Leased, NodeRecord, StoreError, StoreResult, SyncRecord};

mod queue;

/// Connections in the pool. SQLite has one writer at a time anyway; the extra connections let
/// reads (auth cache loads, `GET /v1/invocations`, log tails) proceed beside a write in WAL mode.
pub const POOL_CONNECTIONS_MAX: u32 = 4;
/// How long a statement waits for another connection's write lock before failing with
/// `SQLITE_BUSY` (which the store reports as [`StoreError::Unavailable`]).
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a caller waits for a free pooled connection. Longer than [`BUSY_TIMEOUT`], so that a
/// caller queued behind a slow writer sees the writer's own outcome first.
pub const POOL_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// Prepared statements kept per connection. The store issues a few dozen distinct statements, so
/// every one stays prepared.
pub const STATEMENT_CACHE_CAPACITY: usize = 100;

/// One step of the schema. The list is append-only: a migration that has shipped is never edited
/// (databases in the field have already applied it); a change is a new, higher-numbered entry.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

/// Every migration, in increasing order (a unit test checks this). Numbers may skip: parallel
/// branches take numbers of their own, and a database applies every one it has not seen.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial schema",
        sql: include_str!("../migrations/sqlite/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "async queue",
        sql: include_str!("../migrations/sqlite/0002_async_queue.sql"),
    },
    Migration {
        version: 3,
        name: "tenant limits",
        sql: include_str!("../migrations/sqlite/0003_tenant_limits.sql"),
    },
    Migration { version: 4, name: "cpu time", sql: include_str!("../migrations/sqlite/0004_cpu_time.sql") },
    Migration {
        version: 5,
        name: "tenant blobs",
        sql: include_str!("../migrations/sqlite/0005_tenant_blobs.sql"),
    },
    Migration {
        version: 6,
        name: "version retention",
        sql: include_str!("../migrations/sqlite/0006_version_retention.sql"),
    },
    Migration { version: 7, name: "nodes", sql: include_str!("../migrations/sqlite/0007_nodes.sql") },
    Migration {
        version: 8,
        name: "scheduling",
        sql: include_str!("../migrations/sqlite/0008_scheduling.sql"),
    },
    Migration {
        version: 9,
        name: "idempotency callers",
        sql: include_str!("../migrations/sqlite/0009_idempotency_callers.sql"),
    },
    Migration {
        version: 10,
        name: "tenant usage limits",
        sql: include_str!("../migrations/sqlite/0010_tenant_usage_limits.sql"),
    },
    Migration {
        version: 11,
        name: "vocabulary checks",
        sql: include_str!("../migrations/sqlite/0011_vocabulary_checks.sql"),
    },
    Migration { version: 12, name: "aliases", sql: include_str!("../migrations/sqlite/0012_aliases.sql") },
    Migration { version: 13, name: "rollouts", sql: include_str!("../migrations/sqlite/0013_rollouts.sql") },
    Migration {
        version: 14,
        name: "schedules",
        sql: include_str!("../migrations/sqlite/0014_schedules.sql"),
    },
    Migration { version: 15, name: "triggers", sql: include_str!("../migrations/sqlite/0015_triggers.sql") },
    Migration {
        version: 16,
        name: "ordered invocations",
        sql: include_str!("../migrations/sqlite/0016_ordered_invocations.sql"),
    },
];

/// The embedded store.
pub type SqliteStore = SqlStore<SqliteEngine>;

/// What is SQLite's own in the [`SqliteStore`]: nothing but its statements, since every queue
/// write, and every other write that is frequent or large, goes through the one writer task.
#[derive(Debug, Clone)]
pub struct SqliteEngine;

impl SqliteStore {
    /// Opens (creating if missing) the database at `path` and brings its schema up to date, with
    /// timestamps from the wall clock.
    pub async fn open(path: &Path) -> StoreResult<Self> {
        Self::open_with_clock(path, Arc::new(SystemClock)).await
    }

    /// Like [`SqliteStore::open`], with timestamps taken from `clock`.
    pub async fn open_with_clock(path: &Path, clock: Arc<dyn Clock>) -> StoreResult<Self> {
        Self::open_with_options(path, clock, BUSY_TIMEOUT).await
    }

    async fn open_with_options(
        path: &Path,
        clock: Arc<dyn Clock>,
        busy_timeout: Duration,
    ) -> StoreResult<Self> {
        // Every option that matters is stated, even where it equals today's sqlx or SQLite
        // default: a default that changes under us must not change durability.
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .read_only(false)
            // WAL: readers never block the writer, and a commit is one sequential append.
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before it returns. A 202 for an async call promises this.
            .synchronous(SqliteSynchronous::Full)
            // SQLite leaves foreign keys off unless asked, per connection.
            .foreign_keys(true)
            .busy_timeout(busy_timeout)
            .statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
        let pool = SqlitePoolOptions::new()
            .max_connections(POOL_CONNECTIONS_MAX)
            .min_connections(0)
            .acquire_timeout(POOL_ACQUIRE_TIMEOUT)
            // A SQLite connection is a file handle: nothing goes stale, so nothing is recycled,
            // and the ping sqlx would send before each checkout is a wasted round trip.
            .idle_timeout(None)
            .max_lifetime(None)
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await
            .map_err(classify)?;
        migrate(&pool, MIGRATIONS, clock.now_ms()).await?;
        // Same options as the pool: the writer's commits must be exactly as durable.
        let writer = Writer::start(queue::Sqlite(options, Default::default())).await?;
        Ok(Self { pool, clock, enqueues: writer.clone(), writer, engine: SqliteEngine })
    }

    /// Closes every connection, waiting for checked-out ones to come back, after the queue writer
    /// has committed the batch it holds; queue writes still waiting then fail as `Unavailable`.
    /// The last connection to close checkpoints the WAL into the main file.
    pub async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
    }

    /// The queue writer's task, for the node to watch: it ends only after [`SqliteStore::close`]
    /// or when the last clone is dropped, unless it panicked. `None` after the first call.
    pub fn take_writer_task(&self) -> Option<tokio::task::JoinHandle<()>> {
        self.writer.take_task()
    }

    /// How many group commits the queue writer has made: tests use it to show that concurrent
    /// queue writes share transactions.
    #[doc(hidden)]
    pub fn commits(&self) -> u64 {
        self.writer.commits()
    }
}

impl Dialect for SqliteEngine {
    type DB = Sqlite;

    fn classify(error: sqlx::Error) -> StoreError {
        classify(error)
    }

    fn rows_affected(done: &SqliteQueryResult) -> u64 {
        done.rows_affected()
    }
}

#[async_trait::async_trait]
impl Engine for SqliteEngine {
    /// The writing transaction holds the database's one write lock already.
    const LOCK_SCHEDULES: &'static str =
        "SELECT id FROM schedules WHERE id IN (SELECT value FROM json_each($1))";
    const FIRE_SCHEDULES: &'static str = "
        UPDATE schedules SET revision = revision + 1, next_fire_at = f.value ->> 'next_fire_at',
            buffered_for = f.value ->> 'buffered_for',
            last_fired_for = COALESCE(f.value ->> 'last_fired_for', last_fired_for),
            last_invocation = COALESCE(f.value ->> 'last_invocation', last_invocation),
            fires = fires + (f.value ->> 'fires'), skipped = skipped + (f.value ->> 'skipped'),
            last_error = COALESCE(f.value ->> 'last_error', last_error), updated_at = $2
        FROM jsonb_each($1) AS f
        WHERE schedules.id = f.value ->> 'id' AND schedules.revision = f.value ->> 'revision'
          AND schedules.paused = 0
        RETURNING schedules.id AS id";
    const TENANT_EXISTS: &'static str = "SELECT 1 FROM tenants WHERE name = $1";
    const BLOB_EXISTS: &'static str = "SELECT 1 FROM blobs WHERE tenant = $1 AND digest = $2";
    /// One statement: a deploy that names the blob commits either before it (the blob is named,
    /// so kept) or after it (the blob is gone and the deploy answers NotFound).
    const PURGE_BLOBS: &'static str = "
        DELETE FROM blobs WHERE rowid IN (
            SELECT b.rowid FROM blobs b
            WHERE b.created_at < $1
              AND NOT EXISTS (SELECT 1 FROM versions v
                              WHERE v.tenant = b.tenant AND v.blob_digest = b.digest)
            ORDER BY b.created_at
            LIMIT $2)
        RETURNING tenant, digest";
    /// One statement, like `PURGE_BLOBS`: a retry that re-queues an invocation of an old version
    /// commits either before it (the version is named, so kept) or after it (the attempt finds
    /// the version gone and ends `dead`, saying so).
    const PURGE_VERSIONS: &'static str = "
        DELETE FROM versions WHERE rowid IN (
            SELECT v.rowid FROM versions v
            JOIN functions f ON f.tenant = v.tenant AND f.name = v.function
            WHERE v.version <= f.latest_version - $1
              AND NOT EXISTS (SELECT 1 FROM invocations i
                              WHERE i.tenant = v.tenant AND i.function = v.function
                                AND i.version = v.version
                                AND i.status IN ('queued', 'failed', 'running'))
              AND NOT EXISTS (SELECT 1 FROM aliases a
                              WHERE a.tenant = v.tenant AND a.function = v.function
                                AND a.version = v.version)
            ORDER BY v.created_at
            LIMIT $2)";
    /// An index probe per tenant and class, not a scan of the queue.
    const QUEUE_DEMAND: &'static str = "
        SELECT * FROM (
            SELECT t.name AS tenant,
                (SELECT count(*) FROM (SELECT 1 FROM invocations INDEXED BY invocations_tenant_windowed
                    WHERE status IN ('queued', 'failed') AND deadline IS NOT NULL AND tenant = t.name
                      AND deadline <= $1 + $2 AND run_after <= $1 LIMIT $3)) AS due,
                (SELECT count(*) FROM (SELECT 1 FROM invocations INDEXED BY invocations_tenant_plain
                    WHERE status IN ('queued', 'failed') AND deadline IS NULL AND tenant = t.name
                      AND run_after <= $1 LIMIT $3)) AS plain,
                (SELECT count(*) FROM (SELECT 1 FROM invocations INDEXED BY invocations_tenant_windowed
                    WHERE status IN ('queued', 'failed') AND deadline IS NOT NULL AND tenant = t.name
                      AND deadline > $1 + $2 AND run_after <= $1 LIMIT $3)) AS windowed
            FROM tenants AS t)
        WHERE due + plain + windowed > 0
        ORDER BY tenant";
    /// The running rows are few: at most every node's slots.
    const RUNNING_BY_FUNCTION: &'static str = "
        SELECT tenant, function, count(*) FROM invocations INDEXED BY invocations_leases
        WHERE status = 'running' GROUP BY tenant, function ORDER BY tenant, function";

    /// `IMMEDIATE`: the write lock from the first statement (see the module documentation for
    /// why every writing transaction must).
    async fn begin_write(pool: &Pool<Sqlite>) -> StoreResult<Transaction<'static, Sqlite>> {
        pool.begin_with("BEGIN IMMEDIATE").await.map_err(classify)
    }

    fn now(&self, caller: UnixMs) -> Option<UnixMs> {
        Some(caller)
    }

    /// This process's own writes are all there is: nothing to follow.
    fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        None
    }

    async fn put_blob(store: &SqliteStore, tenant: &str, digest: &str, bytes: &[u8]) -> StoreResult<()> {
        store.writer.put_blob(tenant, digest, bytes, store.clock.now_ms()).await
    }

    async fn record_sync(store: &SqliteStore, batch: &[SyncRecord]) -> StoreResult<()> {
        // Two JSON arrays, two statements, in the writer's transaction: all of it or none of it.
        let (invocations, logs) = sync_batch_json(batch)?;
        store.writer.record_sync(invocations, logs).await
    }

    async fn lease(
        store: &SqliteStore,
        owner: &str,
        now: UnixMs,
        lease_ms: u64,
        limit: u32,
    ) -> StoreResult<Vec<Leased>> {
        store.writer.lease(owner, now, lease_ms, limit).await
    }

    async fn lease_asks(
        store: &SqliteStore,
        owner: &str,
        now: UnixMs,
        lease_ms: u64,
        promote_ahead_ms: u64,
        asks: &[LeaseAsk],
    ) -> StoreResult<Vec<Vec<Leased>>> {
        store.writer.lease_asks(owner, now, lease_ms, promote_ahead_ms, asks).await
    }

    async fn node_heartbeat(store: &SqliteStore, node: &NodeRecord, stopped: bool) -> StoreResult<()> {
        // Through the writer, on its own connection: API reads that hold every pooled connection
        // cannot make this node look dead to the others.
        store.writer.node_heartbeat(node, stopped, store.clock.now_ms()).await
    }

    async fn list_nodes(store: &SqliteStore, within_ms: u64) -> StoreResult<(Vec<NodeRecord>, UnixMs)> {
        let now = store.clock.now_ms();
        let found = sqlx::query(
            "SELECT id, address, version, started_at, heartbeat_at, stopped_at, slots, in_flight,
                    queue_lag_ms
             FROM nodes WHERE heartbeat_at >= $1 ORDER BY started_at, id",
        )
        .bind(now.saturating_sub(i64::try_from(within_ms).unwrap_or(i64::MAX)))
        .fetch_all(&store.pool)
        .await
        .map_err(classify)?;
        Ok((rows(found, node_from_row)?, now))
    }

    /// Through the queue's writer: in its transaction with the completions and enqueues beside
    /// it (one fsync for all), instead of waiting for SQLite's one write lock against it.
    async fn commit_trigger_batch(
        store: &SqliteStore,
        op: crate::queue::TriggerBatchOp,
    ) -> StoreResult<Option<u64>> {
        store.writer.commit_trigger_batch(op).await
    }

    async fn enqueue_in(
        connection: &mut sqlx::SqliteConnection,
        rows: &str,
        ordered: Option<UnixMs>,
    ) -> StoreResult<u64> {
        sqlx::query(queue::CLAIM_KEYS)
            .bind(rows)
            .bind(crate::IDEMPOTENCY_WINDOW_MS)
            .execute(&mut *connection)
            .await
            .map_err(classify)?;
        let insert = if ordered.is_some() { queue::INSERT_QUEUED_ORDERED } else { queue::INSERT_QUEUED };
        let done = sqlx::query(insert).bind(rows).execute(&mut *connection).await.map_err(classify)?;
        if let Some(now) = ordered {
            sqlx::query(queue::RELEASE_HEADS)
                .bind(rows)
                .bind(now)
                .execute(&mut *connection)
                .await
                .map_err(classify)?;
        }
        Ok(done.rows_affected())
    }
}

/// Applies every one of `migrations` the database has not seen yet, each in its own write
/// transaction.
async fn migrate(pool: &SqlitePool, migrations: &[Migration], now: UnixMs) -> StoreResult<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS schema_version (
            version    INTEGER NOT NULL PRIMARY KEY,
            name       TEXT    NOT NULL,
            applied_at INTEGER NOT NULL
        ) STRICT",
    )
    .execute(pool)
    .await
    .map_err(classify)?;

    let known = migrations.last().map_or(0, |m| m.version);
    for migration in migrations {
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(classify)?;
        // Read under the write lock: another process may have opened the same file and applied
        // this migration since we started.
        let current: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            .fetch_one(&mut *tx)
            .await
            .map_err(classify)?;
        if current > known {
            return Err(StoreError::Other(format!(
                "database schema version {current} is newer than this sluice knows ({known}); \
                 upgrade sluice or restore a matching backup"
            )));
        }
        let applied: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM schema_version WHERE version = ?)")
                .bind(migration.version)
                .fetch_one(&mut *tx)
                .await
                .map_err(classify)?;
        if !applied {
            sqlx::raw_sql(migration.sql).execute(&mut *tx).await.map_err(classify)?;
            sqlx::query("INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)")
                .bind(migration.version)
                .bind(migration.name)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
            tracing::info!(version = migration.version, name = migration.name, "applied migration");
        }
        tx.commit().await.map_err(classify)?;
    }
    Ok(())
}

// SQLite primary result codes (https://www.sqlite.org/rescode.html). sqlx reports the extended
// code, which keeps the primary code in its low byte.
const SQLITE_BUSY: i32 = 5;
const SQLITE_READONLY: i32 = 8;
const SQLITE_IOERR: i32 = 10;
const SQLITE_FULL: i32 = 13;
const SQLITE_CANTOPEN: i32 = 14;

/// The one place a database error is classified. `Unavailable` means "the write may succeed
/// later, nothing was stored": the disk is full or read-only, the file cannot be opened or read,
/// or another writer held the lock past [`BUSY_TIMEOUT`].
fn classify(error: sqlx::Error) -> StoreError {
    match &error {
        sqlx::Error::Database(db) => {
            if db.is_unique_violation() {
                return StoreError::Conflict(db.message().to_owned());
            }
            let primary = db.code().and_then(|code| code.parse::<i32>().ok()).map(|code| code & 0xff);
            match primary {
                Some(SQLITE_BUSY | SQLITE_READONLY | SQLITE_IOERR | SQLITE_FULL | SQLITE_CANTOPEN) => {
                    StoreError::Unavailable(error.to_string())
                }
                _ => StoreError::Other(error.to_string()),
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(error.to_string()),
        _ => StoreError::Other(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Code, InvocationStatus, Invocations, LogStream, Logs, Nodes, Tenants};
    use sqlx::Row;
    use sqlx::sqlite::SqliteRow;

    async fn open_temp() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("sluice.db")).await.expect("open");
        (dir, store)
    }

    /// An async call of acme's hello with an empty GET, one attempt, runnable now; tests change
    /// what they need with struct update syntax.
    fn invocation(id: impl Into<String>) -> crate::NewInvocation {
        crate::NewInvocation {
            id: id.into(),
            tenant: "acme".into(),
            function: "hello".into(),
            version: 1,
            request: crate::StoredRequest {
                method: "GET".into(),
                path_and_query: "/".into(),
                headers: vec![],
                body: vec![],
            },
            idempotency_key: None,
            criticality: crate::Criticality::Normal,
            run_after: 0,
            deadline: None,
            attempts_max: 1,
            max_age_ms: 1_000,
            in_order: None,
        }
    }

    #[test]
    fn migrations_are_numbered_in_order() {
        let mut previous = 0;
        for migration in MIGRATIONS {
            assert!(migration.version > previous, "migration {:?}", migration.name);
            previous = migration.version;
            assert!(!migration.sql.trim().is_empty());
        }
    }

    #[tokio::test]
    async fn connection_options_are_in_effect() {
        let (_dir, store) = open_temp().await;
        let mut conn = store.pool.acquire().await.unwrap();
        let journal: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&mut *conn).await.unwrap();
        let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(&mut *conn).await.unwrap();
        let foreign_keys: i64 =
            sqlx::query_scalar("PRAGMA foreign_keys").fetch_one(&mut *conn).await.unwrap();
        let busy_timeout_ms: i64 =
            sqlx::query_scalar("PRAGMA busy_timeout").fetch_one(&mut *conn).await.unwrap();
        assert_eq!(journal, "wal");
        assert_eq!(synchronous, 2, "2 is FULL");
        assert_eq!(foreign_keys, 1);
        assert_eq!(busy_timeout_ms, BUSY_TIMEOUT.as_millis() as i64);
    }

    #[tokio::test]
    async fn migrations_apply_once_and_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.db");
        let store = SqliteStore::open(&path).await.unwrap();
        store.close().await;
        let store = SqliteStore::open(&path).await.unwrap();
        let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_version ORDER BY version")
            .fetch_all(&store.pool)
            .await
            .unwrap();
        let expected: Vec<i64> = MIGRATIONS.iter().map(|m| m.version).collect();
        assert_eq!(applied, expected);

        // A database written by a newer sluice: opening it must fail rather than guess.
        sqlx::query("INSERT INTO schema_version (version, name, applied_at) VALUES (?, 'future', 0)")
            .bind(expected.last().unwrap() + 1)
            .execute(&store.pool)
            .await
            .unwrap();
        store.close().await;
        let err = SqliteStore::open(&path).await.unwrap_err();
        assert!(matches!(&err, StoreError::Other(m) if m.contains("newer")), "{err:?}");
    }

    /// Migration 5 gives every blob to the tenants whose versions name it, keeps every version
    /// and its foreign keys, and drops blobs no version names.
    #[tokio::test]
    async fn blobs_move_to_the_tenants_that_use_them() {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("sluice.db"))
            .create_if_missing(true)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
        migrate(&pool, &MIGRATIONS[..4], 0).await.unwrap();
        sqlx::raw_sql(
            "INSERT INTO tenants VALUES ('a', 0), ('b', 0);
             INSERT INTO blobs VALUES ('shared', x'01', 1, 10), ('only-a', x'0202', 2, 20),
                                      ('unused', x'03', 1, 30);
             INSERT INTO functions VALUES ('a', 'f', 0, 0, 2), ('b', 'g', 0, 0, 1);
             INSERT INTO versions VALUES ('a', 'f', 1, 'shared', '{}', 0), ('a', 'f', 2, 'only-a', '{}', 0),
                                         ('b', 'g', 1, 'shared', '{}', 0);",
        )
        .execute(&pool)
        .await
        .unwrap();
        migrate(&pool, MIGRATIONS, 0).await.unwrap();

        let blobs: Vec<(String, String, i64, i64)> =
            sqlx::query_as("SELECT tenant, digest, size, created_at FROM blobs ORDER BY tenant, digest")
                .fetch_all(&pool)
                .await
                .unwrap();
        let expected = [("a", "only-a", 2, 20), ("a", "shared", 1, 10), ("b", "shared", 1, 10)];
        let expected: Vec<_> =
            expected.iter().map(|(t, d, s, c)| (t.to_string(), d.to_string(), *s, *c)).collect();
        assert_eq!(blobs, expected);
        let versions: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM versions").fetch_one(&pool).await.unwrap();
        assert_eq!(versions, 3);
        let violations: Vec<SqliteRow> =
            sqlx::query("PRAGMA foreign_key_check").fetch_all(&pool).await.unwrap();
        assert!(violations.is_empty());
        // The renamed table's foreign key names `blobs`: a version of a blob its tenant lacks is
        // refused, and deleting a function still takes its versions.
        let err = sqlx::query("INSERT INTO versions VALUES ('b', 'g', 2, 'only-a', '{}', 0)")
            .execute(&pool)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("FOREIGN KEY"), "{err}");
        sqlx::query("DELETE FROM functions WHERE tenant = 'a'").execute(&pool).await.unwrap();
        let versions: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM versions").fetch_one(&pool).await.unwrap();
        assert_eq!(versions, 1);
    }

    #[tokio::test]
    async fn a_read_only_database_is_unavailable() {
        let (dir, store) = open_temp().await;
        store.close().await;
        let options = SqliteConnectOptions::new().filename(dir.path().join("sluice.db")).read_only(true);
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
        let err = sqlx::query("INSERT INTO tenants (name, created_at) VALUES ('a', 0)")
            .execute(&pool)
            .await
            .unwrap_err();
        assert!(matches!(classify(err), StoreError::Unavailable(_)));
    }

    #[tokio::test]
    async fn a_lock_held_past_the_busy_timeout_is_unavailable() {
        let (dir, store) = open_temp().await;
        let _writer = SqliteEngine::begin_write(&store.pool).await.unwrap();
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("sluice.db"))
            .busy_timeout(Duration::from_millis(10));
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
        let err = pool.begin_with("BEGIN IMMEDIATE").await.unwrap_err();
        assert!(matches!(classify(err), StoreError::Unavailable(_)));
    }

    /// The steps of `statement`'s query plan (its parameters bound to 0: the plan does not
    /// depend on them, and nothing runs).
    async fn query_plan(store: &SqliteStore, statement: &str, parameters: usize) -> Vec<String> {
        let explain = format!("EXPLAIN QUERY PLAN {statement}");
        let mut query = sqlx::query(sqlx::AssertSqlSafe(explain));
        for _ in 0..parameters {
            query = query.bind(0_i64);
        }
        query.fetch_all(&store.pool).await.unwrap().iter().map(|row| row.get::<String, _>("detail")).collect()
    }

    #[tokio::test]
    async fn lease_statements_walk_their_indexes() {
        let (_dir, store) = open_temp().await;
        for (statement, parameters, index) in queue::LEASE_STATEMENTS {
            let plan = query_plan(&store, statement, parameters).await;
            let shown = plan.join("\n");
            assert!(shown.contains(index), "{statement}\n{shown}");
            // A sort step would mean reading every runnable row to return `limit` of them.
            assert!(!shown.contains("TEMP B-TREE"), "{statement}\n{shown}");
            assert!(!plan.iter().any(|step| step == "SCAN invocations"), "{statement}\n{shown}");
        }
    }

    /// Releasing a key's next invocation seeks the index of ordered rows, whatever waits behind
    /// the key: no statement of it scans the invocations.
    #[tokio::test]
    async fn ordered_releases_seek_their_index() {
        let (_dir, store) = open_temp().await;
        for (statement, parameters) in [(queue::RELEASE_HEADS, 2), (queue::ORDERED_KEYS_AFTER, 2)] {
            let plan = query_plan(&store, statement, parameters).await;
            let shown = plan.join("\n");
            assert!(shown.contains("invocations_ordered"), "{statement}\n{shown}");
            assert!(
                !plan.iter().any(|step| step.starts_with("SCAN invocations")
                    || step.starts_with("SCAN h")
                    || step.starts_with("SCAN e")),
                "{statement}\n{shown}"
            );
        }
    }

    /// One run of the orphaned heads' release, two keys at most.
    async fn run_orphans(connection: &mut sqlx::SqliteConnection, cursor: &str) -> String {
        crate::queue::release_orphaned_heads::<SqliteEngine>(
            connection,
            queue::ORDERED_KEYS_AFTER,
            queue::RELEASE_HEADS,
            cursor,
            2,
            Some(5_000),
        )
        .await
        .unwrap()
    }

    /// The release of orphaned heads walks at most its limit of keys per run, and the next run
    /// goes on after the last key walked, then from the first again: however many keys a tenant
    /// has, every key is reached, and no run costs more than the limit.
    #[tokio::test]
    async fn orphaned_heads_are_released_a_bounded_walk_at_a_time() {
        let (_dir, store) = open_temp().await;
        for key in ["a", "b", "c"] {
            for seq in [1, 2] {
                let inv = crate::NewInvocation {
                    in_order: Some(crate::InOrder { key: key.into(), seq }),
                    ..invocation(format!("{key}{seq}"))
                };
                store.enqueue(&inv).await.unwrap();
            }
        }
        // The heads (released at their enqueue) end as a sweep would end them: the seconds wait.
        sqlx::query("UPDATE invocations SET status = 'expired' WHERE id IN ('a1', 'b1', 'c1')")
            .execute(&store.pool)
            .await
            .unwrap();
        let held = |id: &'static str| {
            let pool = store.pool.clone();
            async move {
                let run_after: i64 = sqlx::query_scalar("SELECT run_after FROM invocations WHERE id = ?")
                    .bind(id)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                run_after == crate::HELD
            }
        };
        assert!(held("a2").await && held("b2").await && held("c2").await);
        let mut connection = store.pool.acquire().await.unwrap();
        let next = run_orphans(&mut connection, "").await;
        assert_eq!(next, "b", "two keys walked, the next run goes on after the second");
        assert!(!held("a2").await && !held("b2").await && held("c2").await);
        let next = run_orphans(&mut connection, &next).await;
        assert_eq!(next, "", "the walk came to the end: the next run starts again");
        assert!(!held("c2").await);
    }

    /// The periodic read of every tenant's queued usage walks the index of unfinished rows, which
    /// carries the bytes: it never reads the table (whose rows hold the request bodies).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn queued_usage_reads_only_the_index_of_unfinished_rows() {
        let (_dir, store) = open_temp().await;
        let explain = format!("EXPLAIN QUERY PLAN {}", crate::rows::QUEUED_USAGE);
        let plan: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(explain))
            .fetch_all(&store.pool)
            .await
            .unwrap()
            .iter()
            .map(|row| row.get::<String, _>("detail"))
            .collect();
        let shown = plan.join("\n");
        assert!(shown.contains("COVERING INDEX invocations_pending_version"), "{shown}");
        assert!(!shown.contains("TEMP B-TREE"), "{shown}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_failed_batch_acknowledges_nothing_and_the_writer_recovers() {
        use crate::{Enqueued, NewInvocation};
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_with_options(
            &dir.path().join("sluice.db"),
            Arc::new(SystemClock),
            Duration::from_millis(10),
        )
        .await
        .unwrap();
        let blocked: Vec<NewInvocation> = (0..20).map(|i| invocation(format!("blocked-{i}"))).collect();

        // Another connection holds the write lock past the writer's busy timeout.
        let lock = SqliteEngine::begin_write(&store.pool).await.unwrap();
        let results = futures::future::join_all(blocked.iter().map(|inv| store.enqueue(inv))).await;
        for result in results {
            assert!(matches!(result, Err(StoreError::Unavailable(_))), "{result:?}");
        }
        drop(lock);

        let fine = invocation("fine");
        assert_eq!(store.enqueue(&fine).await.unwrap(), Enqueued::Created);
        for inv in &blocked {
            assert_eq!(store.get_invocation(&inv.id).await.unwrap(), None, "{}", inv.id);
        }
        assert!(store.get_invocation("fine").await.unwrap().is_some());
    }

    /// Sync records, blobs and queue writes all at once, with a busy timeout far shorter than any
    /// of their commits: with a second writer beside the queue writer, one of them would wait past
    /// it for the other's lock and fail with `Unavailable`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sync_records_blobs_and_queue_writes_never_wait_on_each_others_lock() {
        use crate::{NewInvocation, StoredRequest};
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_with_options(
            &dir.path().join("sluice.db"),
            Arc::new(SystemClock),
            Duration::from_millis(1),
        )
        .await
        .unwrap();
        store.create_tenant("acme").await.unwrap();
        let enqueues = (0..400).map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let inv = NewInvocation {
                    request: StoredRequest {
                        method: "POST".into(),
                        path_and_query: "/".into(),
                        headers: vec![],
                        body: vec![7; 64 << 10],
                    },
                    max_age_ms: 60_000,
                    in_order: None,
                    ..invocation(format!("async-{i}"))
                };
                store.enqueue(&inv).await.map(|_| ())
            })
        });
        let records = (0..40).map(|batch| {
            let store = store.clone();
            tokio::spawn(async move {
                let records: Vec<SyncRecord> = (0..200)
                    .map(|i| SyncRecord {
                        id: format!("sync-{batch}-{i}"),
                        tenant: "acme".into(),
                        function: "hello".into(),
                        version: 1,
                        status: crate::InvocationStatus::Succeeded,
                        status_code: Some(200),
                        error_kind: None,
                        started_at: 1,
                        finished_at: 2,
                        cpu_us: 3,
                        logs: vec![(LogStream::Stdout, "x".repeat(200), 2)],
                    })
                    .collect();
                store.record_sync(&records).await
            })
        });
        let blobs = (0..12).map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store.put_blob("acme", &format!("digest-{i}"), &vec![i as u8; 8 << 20]).await
            })
        });
        let enqueues = futures::future::join_all(enqueues);
        let records = futures::future::join_all(records);
        let blobs = futures::future::join_all(blobs);
        let (enqueues, records, blobs) = tokio::join!(enqueues, records, blobs);
        for result in enqueues.into_iter().chain(records).chain(blobs) {
            result.unwrap().unwrap();
        }
        assert_eq!(store.get_blob("acme", "digest-11").await.unwrap().unwrap().len(), 8 << 20);
        assert!(store.get_invocation("sync-39-199").await.unwrap().is_some());
        // A blob of a tenant that does not exist is refused, as before.
        assert!(matches!(store.put_blob("nobody", "d", b"x").await, Err(StoreError::NotFound(_))));
    }

    /// The node's heartbeat does not need a pooled connection: API reads that hold all of them
    /// (a `read` key looping over large listings) cannot make the node look dead.
    #[tokio::test]
    async fn the_node_heartbeat_is_written_while_readers_hold_every_pooled_connection() {
        let (_dir, store) = open_temp().await;
        let mut held = Vec::new();
        for _ in 0..POOL_CONNECTIONS_MAX {
            held.push(store.pool.acquire().await.unwrap());
        }
        let node = NodeRecord {
            id: "node-1".into(),
            address: "http://127.0.0.1:1".into(),
            version: "test".into(),
            started_at: 1,
            heartbeat_at: 0,
            stopped_at: None,
            slots: 4,
            in_flight: 0,
            queue_lag_ms: 0,
        };
        tokio::time::timeout(Duration::from_secs(2), store.node_heartbeat(&node, false))
            .await
            .expect("the heartbeat waited for a pooled connection")
            .unwrap();
        drop(held);
        let (nodes, _) = store.list_nodes(60_000).await.unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].id, "node-1");
    }

    /// A million rows past their start window are not marked in one transaction: each lease marks
    /// at most [`queue::SWEEP_BATCH_MAX`], and leases none of the rest meanwhile.
    #[tokio::test]
    async fn sweeps_are_bounded_and_the_lease_passes_over_rows_they_have_not_marked() {
        use crate::NewInvocation;
        let (_dir, store) = open_temp().await;
        store.create_tenant("acme").await.unwrap();
        let n = usize::try_from(queue::SWEEP_BATCH_MAX).unwrap() + 500;
        let now = store.clock.now_ms();
        let invs: Vec<NewInvocation> = (0..n)
            .map(|i| NewInvocation {
                deadline: Some(now + 10),
                max_age_ms: 3_600_000,
                in_order: None,
                ..invocation(format!("late-{i:05}"))
            })
            .collect();
        futures::future::try_join_all(invs.iter().map(|inv| store.enqueue(inv))).await.unwrap();
        let expired = || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM invocations WHERE status = 'expired'")
                .fetch_one(&store.pool)
                .await
                .unwrap()
        };
        let later = now + 1_000;
        let leased = store.lease("node", later, 30_000, 100).await.unwrap();
        assert!(leased.is_empty(), "leased rows past their deadline: {}", leased.len());
        assert_eq!(expired().await, queue::SWEEP_BATCH_MAX);
        assert!(store.lease("node", later, 30_000, 100).await.unwrap().is_empty());
        assert_eq!(expired().await, i64::try_from(n).unwrap());
    }

    #[tokio::test]
    async fn the_queue_migration_keeps_existing_sync_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.db");
        let options = SqliteConnectOptions::new().filename(&path).create_if_missing(true).foreign_keys(true);
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
        migrate(&pool, &MIGRATIONS[..1], 0).await.unwrap();
        sqlx::query(
            "INSERT INTO invocations (id, tenant, function, version, mode, status, attempts,
                 created_at, started_at, finished_at, status_code, error_kind)
             VALUES ('old', 'acme', 'hello', 1, 'sync', 'dead', 1, 10, 10, 20, 500, 'trap')",
        )
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO log_lines (invocation_id, tenant, function, stream, line, at)
             VALUES ('old', 'acme', 'hello', 'stderr', 'it trapped', 15)",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;

        let store = SqliteStore::open(&path).await.unwrap();
        let old = store.get_invocation("old").await.unwrap().unwrap();
        assert_eq!(
            (old.mode.as_str(), old.status, old.attempts, old.error_kind.as_deref()),
            ("sync", InvocationStatus::Dead, 1, Some("trap"))
        );
        assert_eq!(store.invocation_logs("old").await.unwrap().len(), 1);
        // Sync records are history, not work: never leased, never re-driven.
        assert_eq!(store.lease("node", 1_000, 1_000, 10).await.unwrap(), vec![]);
        assert!(!store.retry_dead("old", 1_000).await.unwrap());
        assert_eq!(store.purge(21, 10).await.unwrap(), 1);
        assert_eq!(store.invocation_logs("old").await.unwrap(), vec![]);
    }

    #[tokio::test]
    async fn a_file_that_cannot_be_opened_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let err = SqliteStore::open(&dir.path().join("missing-dir").join("sluice.db")).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_unique_violation_is_a_conflict_and_other_errors_are_other() {
        let (_dir, store) = open_temp().await;
        let insert = "INSERT INTO tenants (name, created_at) VALUES ('a', 0)";
        sqlx::query(insert).execute(&store.pool).await.unwrap();
        let err = sqlx::query(insert).execute(&store.pool).await.unwrap_err();
        assert!(matches!(classify(err), StoreError::Conflict(_)));
        let err = sqlx::query("SELECT nope FROM tenants").execute(&store.pool).await.unwrap_err();
        assert!(matches!(classify(err), StoreError::Other(_)));
    }
}
