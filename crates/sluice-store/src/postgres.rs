//! [`PostgresStore`]: the [`Store`](crate::Store) of a cluster, the shared [`SqlStore`] over the
//! [`PostgresEngine`]. Identical nodes share one PostgreSQL database;
//! PostgreSQL holds all shared state and decides every race, and sluice adds no consensus of its
//! own.
//!
//! What a cluster needs beyond the SQLite store, and where it is:
//! - Migrations run at connect under an advisory lock, so nodes starting together are safe.
//! - Leases are judged by the database's clock ([`ClockSource::Database`]), never a node's.
//! - Leases take rows with `FOR UPDATE SKIP LOCKED`; sweeps of expired work are bounded and run
//!   outside the lease statement (see [`queue`]).
//! - Other nodes' changes to keys, limits and functions arrive as notifications (`LISTEN
//!   sluice_changes`, sent by triggers at commit), and queued work as `sluice_queue`; a lost
//!   listening connection is reported as [`Change::Resync`].
//! - `synchronous_commit` stays on: a 202 means the row is on the primary's disk.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sluice_core::{Clock, SystemClock, UnixMs};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgQueryResult};
use sqlx::{Pool, Postgres as Pg, Transaction};
use tokio::sync::broadcast;

use crate::queue::{LeaseOp, Writer, to_i64};
use crate::rows::{node_from_row, rows, sync_batch_json};
use crate::sql::{Dialect, Engine, SqlStore, Tuple, conflict};
use crate::{Change, LeaseAsk, Leased, NodeRecord, StoreError, StoreResult, SyncRecord};

mod queue;

/// Connections in each node's pool (the queue writer and the listener have their own).
pub const POOL_CONNECTIONS_MAX: u32 = 16;
/// How long a caller waits for a pooled connection, and a new connection for the server: when
/// PostgreSQL is unreachable an async call must get its 503 quickly, not hang.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Rows each sweep of a lease changes at most (expired deadlines, old rows, lost leases).
pub const SWEEP_BATCH_MAX: i64 = 1_000;
/// A node sweeps before a lease at most this often (on the database's clock; on the caller's
/// clock, before every lease, so tests see each transition at once). Leases pass over rows past
/// their deadline or max age anyway; a lost lease is reclaimed up to this much later.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(250);
/// Changes kept for a slow subscriber before it is told to resync.
const CHANGES_BUFFER: usize = 1_024;
/// The notification channels (see migration 1).
const CHANGES_CHANNEL: &str = "sluice_changes";
pub(crate) const QUEUE_CHANNEL: &str = "sluice_queue";
/// The advisory lock held while migrations run.
const MIGRATION_LOCK: i64 = 0x736c_7569_6365; // "sluice"

struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

/// Every migration, in increasing order; append-only, like the SQLite store's. Numbers may skip
/// (parallel branches take their own): a database applies every one it has not seen.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial schema",
        sql: include_str!("../migrations/postgres/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "scheduling",
        sql: include_str!("../migrations/postgres/0002_scheduling.sql"),
    },
    Migration {
        version: 3,
        name: "idempotency callers",
        sql: include_str!("../migrations/postgres/0003_idempotency_callers.sql"),
    },
    Migration {
        version: 4,
        name: "tenant usage limits",
        sql: include_str!("../migrations/postgres/0004_tenant_usage_limits.sql"),
    },
    Migration {
        version: 5,
        name: "vocabulary checks",
        sql: include_str!("../migrations/postgres/0005_vocabulary_checks.sql"),
    },
    Migration { version: 6, name: "aliases", sql: include_str!("../migrations/postgres/0006_aliases.sql") },
    Migration { version: 7, name: "rollouts", sql: include_str!("../migrations/postgres/0007_rollouts.sql") },
    Migration {
        version: 8,
        name: "schedules",
        sql: include_str!("../migrations/postgres/0008_schedules.sql"),
    },
    Migration { version: 9, name: "triggers", sql: include_str!("../migrations/postgres/0009_triggers.sql") },
    Migration {
        version: 10,
        name: "ordered invocations",
        sql: include_str!("../migrations/postgres/0010_ordered_invocations.sql"),
    },
];

/// Whose clock decides leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockSource {
    /// The database's (`clock_timestamp()`): what a cluster uses, so that skew between nodes never
    /// decides who owns an invocation. The `now` a caller passes to lease, heartbeat and complete
    /// is ignored.
    Database,
    /// The caller's `now` (and the store's clock for timestamps it takes itself): for tests that
    /// move time by hand.
    Caller,
}

/// The cluster's store.
pub type PostgresStore = SqlStore<PostgresEngine>;

/// What is PostgreSQL's own in the [`PostgresStore`]: whose clock decides, the listener of other
/// nodes' changes, and when this node last swept. Cloning shares all of it.
#[derive(Clone)]
pub struct PostgresEngine {
    source: ClockSource,
    changes: broadcast::Sender<Change>,
    listener: Arc<Listener>,
    /// When this node last swept (see [`SWEEP_INTERVAL`]).
    swept: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl std::fmt::Debug for PostgresEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresEngine").field("source", &self.source).finish_non_exhaustive()
    }
}

/// The listening task; stopped when the last clone of the store is dropped.
struct Listener(tokio::task::JoinHandle<()>);

impl Drop for Listener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://…`), brings the schema up to date and starts listening for
    /// other nodes' changes. Leases follow the database's clock.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        Self::connect_with(url, Arc::new(SystemClock), ClockSource::Database).await
    }

    /// Like [`PostgresStore::connect`], with timestamps from `clock` and leases judged by `source`.
    pub async fn connect_with(url: &str, clock: Arc<dyn Clock>, source: ClockSource) -> StoreResult<Self> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Other(format!("not a PostgreSQL URL: {e}")))?
            .application_name("sluice")
            // Stated, though it is the default: a 202 promises the row is on disk.
            .options([("synchronous_commit", "on")]);
        // One connection first, so that a server that refuses (wrong host, port, database, role)
        // is reported as what it said, not as a pool that timed out.
        let first = tokio::time::timeout(
            CONNECT_TIMEOUT,
            <sqlx::PgConnection as sqlx::Connection>::connect_with(&options),
        )
        .await
        .map_err(|_| {
            StoreError::Unavailable(format!(
                "no answer from the server within {}",
                sluice_core::units::format_duration(CONNECT_TIMEOUT)
            ))
        })?
        .map_err(classify)?;
        let _ = sqlx::Connection::close(first).await;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_CONNECTIONS_MAX)
            .min_connections(0)
            .acquire_timeout(CONNECT_TIMEOUT)
            // A connection that died with its server (restart, failover) is found out before use.
            .test_before_acquire(true)
            .connect_with(options.clone())
            .await
            .map_err(classify)?;
        migrate(&pool, clock.now_ms()).await?;
        let db_clock = source == ClockSource::Database;
        // Every statement of the writers finds its rows by key. Their plans must not depend on
        // statistics, which lag far behind a queue table that grows by thousands of rows a
        // second: planned while the table looked small, a join of a batch with `invocations`
        // became a hash join over a scan of the whole table, and stayed one as it grew.
        let options = options.options([
            ("enable_seqscan", "off"),
            ("enable_hashjoin", "off"),
            ("enable_mergejoin", "off"),
        ]);
        let enqueues = Writer::start(queue::Postgres { options: options.clone(), db_clock }).await?;
        let writer = Writer::start(queue::Postgres { options, db_clock }).await?;
        let (changes, _) = broadcast::channel(CHANGES_BUFFER);
        let mut listener = PgListener::connect_with(&pool).await.map_err(classify)?;
        listener.listen_all([CHANGES_CHANNEL, QUEUE_CHANNEL]).await.map_err(classify)?;
        let listener = Arc::new(Listener(tokio::spawn(listen(listener, changes.clone()))));
        let engine = PostgresEngine { source, changes, listener, swept: Arc::default() };
        Ok(Self { pool, clock, enqueues, writer, engine })
    }

    /// Closes the queue writers (after the batches they hold) and every connection.
    pub async fn close(&self) {
        self.enqueues.close().await;
        self.writer.close().await;
        self.engine.listener.0.abort();
        self.pool.close().await;
    }

    /// The queue writers' tasks, for the node to watch (see
    /// [`crate::SqliteStore::take_writer_task`]); empty after the first call.
    pub fn take_writer_tasks(&self) -> Vec<tokio::task::JoinHandle<()>> {
        [self.enqueues.take_task(), self.writer.take_task()].into_iter().flatten().collect()
    }

    /// How many group commits the queue writers have made.
    #[doc(hidden)]
    pub fn commits(&self) -> u64 {
        self.enqueues.commits() + self.writer.commits()
    }
}

impl PostgresEngine {
    /// Whether a lease should sweep first; claims the sweep if so.
    fn sweep_due(&self) -> bool {
        if self.source == ClockSource::Caller {
            return true;
        }
        let mut swept = self.swept.lock().expect("sweep clock lock");
        let due = swept.is_none_or(|at| at.elapsed() >= SWEEP_INTERVAL);
        if due {
            *swept = Some(std::time::Instant::now());
        }
        due
    }
}

/// Sweeps (at most every [`SWEEP_INTERVAL`]) and leases, on a pooled connection.
async fn lease_on_pool(store: &PostgresStore, op: &LeaseOp, now: UnixMs) -> StoreResult<Vec<Vec<Leased>>> {
    let now = store.engine.now(now);
    let mut connection = store.pool.acquire().await.map_err(classify)?;
    if store.engine.sweep_due() {
        queue::sweep(&mut connection, now).await?;
    }
    match op.asks {
        None => Ok(vec![queue::lease(&mut connection, op, now).await?]),
        Some(_) => queue::lease_asks(&mut connection, op, now).await,
    }
}

impl Dialect for PostgresEngine {
    type DB = Pg;

    fn classify(error: sqlx::Error) -> StoreError {
        classify(error)
    }

    fn rows_affected(done: &PgQueryResult) -> u64 {
        done.rows_affected()
    }
}

#[async_trait::async_trait]
impl Engine for PostgresEngine {
    const LOCK_SCHEDULES: &'static str = "SELECT id FROM schedules
         WHERE id IN (SELECT jsonb_array_elements_text($1::jsonb)::bigint) ORDER BY id FOR UPDATE SKIP LOCKED";
    const FIRE_SCHEDULES: &'static str = "
        UPDATE schedules AS s SET revision = s.revision + 1, next_fire_at = f.next_fire_at,
            buffered_for = f.buffered_for,
            last_fired_for = COALESCE(f.last_fired_for, s.last_fired_for),
            last_invocation = COALESCE(f.last_invocation, s.last_invocation),
            fires = s.fires + f.fires, skipped = s.skipped + f.skipped,
            last_error = COALESCE(f.last_error, s.last_error), updated_at = $2
        FROM jsonb_to_recordset($1::jsonb) AS f(id bigint, revision bigint, next_fire_at bigint,
            buffered_for bigint, last_fired_for bigint, last_invocation text, fires bigint,
            skipped bigint, last_error text)
        WHERE s.id = f.id AND s.revision = f.revision AND s.paused = 0
        RETURNING s.id";
    const TENANT_EXISTS: &'static str = "SELECT 1 FROM tenants WHERE name = $1 FOR SHARE";
    /// Locked: the deploy's foreign key check would lock it anyway, and [`Engine::PURGE_BLOBS`]
    /// passes over a locked blob.
    const BLOB_EXISTS: &'static str = "SELECT 1 FROM blobs WHERE tenant = $1 AND digest = $2 FOR SHARE";
    /// A deploy that names the blob locks it (its foreign key check takes a share lock) or
    /// commits first; SKIP LOCKED leaves such a blob alone, and the re-check after the lock sees
    /// a version committed meanwhile.
    const PURGE_BLOBS: &'static str = "
        DELETE FROM blobs AS b
        WHERE (b.tenant, b.digest) IN (
            SELECT c.tenant, c.digest FROM blobs AS c
            WHERE c.created_at < $1
              AND NOT EXISTS (SELECT 1 FROM versions v
                              WHERE v.tenant = c.tenant AND v.blob_digest = c.digest)
            ORDER BY c.created_at
            LIMIT $2
            FOR UPDATE SKIP LOCKED)
          AND b.created_at < $1
          AND NOT EXISTS (SELECT 1 FROM versions v WHERE v.tenant = b.tenant AND v.blob_digest = b.digest)
        RETURNING b.tenant, b.digest";
    const PURGE_VERSIONS: &'static str = "
        DELETE FROM versions AS d
        WHERE (d.tenant, d.function, d.version) IN (
            SELECT v.tenant, v.function, v.version FROM versions v
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
            LIMIT $2
            FOR UPDATE OF v SKIP LOCKED)
          AND NOT EXISTS (SELECT 1 FROM invocations i
                          WHERE i.tenant = d.tenant AND i.function = d.function
                            AND i.version = d.version
                            AND i.status IN ('queued', 'failed', 'running'))
          AND NOT EXISTS (SELECT 1 FROM aliases a
                          WHERE a.tenant = d.tenant AND a.function = d.function AND a.version = d.version)";
    /// Like SQLite's, without naming indexes; `now` is the database's when `$1` is NULL.
    const QUEUE_DEMAND: &'static str = "
        WITH now AS (SELECT COALESCE($1::bigint, sluice_now_ms()) AS ms)
        SELECT * FROM (
            SELECT t.name AS tenant,
                (SELECT count(*) FROM (SELECT 1 FROM invocations, now
                    WHERE status IN ('queued', 'failed') AND deadline IS NOT NULL AND tenant = t.name
                      AND deadline <= now.ms + $2 AND run_after <= now.ms LIMIT $3) AS d) AS due,
                (SELECT count(*) FROM (SELECT 1 FROM invocations, now
                    WHERE status IN ('queued', 'failed') AND deadline IS NULL AND tenant = t.name
                      AND run_after <= now.ms LIMIT $3) AS p) AS plain,
                (SELECT count(*) FROM (SELECT 1 FROM invocations, now
                    WHERE status IN ('queued', 'failed') AND deadline IS NOT NULL AND tenant = t.name
                      AND deadline > now.ms + $2 AND run_after <= now.ms LIMIT $3) AS w) AS windowed
            FROM tenants AS t) AS counts
        WHERE due + plain + windowed > 0
        ORDER BY tenant";
    const RUNNING_BY_FUNCTION: &'static str = "
        SELECT tenant, function, count(*) FROM invocations WHERE status = 'running'
        GROUP BY tenant, function ORDER BY tenant, function";

    async fn begin_write(pool: &Pool<Pg>) -> StoreResult<Transaction<'static, Pg>> {
        pool.begin().await.map_err(classify)
    }

    fn now(&self, caller: UnixMs) -> Option<UnixMs> {
        (self.source == ClockSource::Caller).then_some(caller)
    }

    fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        Some(self.changes.subscribe())
    }

    async fn put_blob(store: &PostgresStore, tenant: &str, digest: &str, bytes: &[u8]) -> StoreResult<()> {
        let size = i64::try_from(bytes.len()).expect("a blob in memory fits in i64 bytes");
        let mut tx = store.pool.begin().await.map_err(classify)?;
        crate::sql::require::<Self>(&mut tx, Self::TENANT_EXISTS, &[tenant], || format!("tenant {tenant}"))
            .await?;
        // Content-addressed: a second put only restarts the grace period, and two nodes storing
        // the same digest at once both succeed.
        sqlx::query(
            "INSERT INTO blobs (tenant, digest, bytes, size, created_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tenant, digest) DO UPDATE SET created_at = excluded.created_at",
        )
        .bind(tenant)
        .bind(digest)
        .bind(bytes)
        .bind(size)
        .bind(store.clock.now_ms())
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)
    }

    /// On the pool, beside the writers: PostgreSQL commits transactions of many connections side
    /// by side, so a batch of sync records waits for no queue write (nor one for it).
    async fn record_sync(store: &PostgresStore, batch: &[SyncRecord]) -> StoreResult<()> {
        let (invocations, logs) = sync_batch_json(batch)?;
        let mut tx = store.pool.begin().await.map_err(classify)?;
        sqlx::query(
            "INSERT INTO invocations (id, tenant, function, version, mode, status, attempts,
                 created_at, started_at, finished_at, status_code, error_kind, cpu_us)
             SELECT r.id, r.tenant, r.function, r.version, 'sync', r.status, 1,
                    r.started_at, r.started_at, r.finished_at, r.status_code, r.error_kind, r.cpu_us
             FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS j(value, ord)
             CROSS JOIN LATERAL jsonb_to_record(j.value) AS r(
                 id text, tenant text, function text, version bigint, status text,
                 started_at bigint, finished_at bigint, status_code bigint, error_kind text,
                 cpu_us bigint)
             ORDER BY j.ord",
        )
        .bind(invocations)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            conflict(classify(e), |m| format!("an invocation of the batch is already recorded: {m}"))
        })?;
        if logs != "[]" {
            // The same per-function lock as the queue's log inserts (see `queue`), so a tail of a
            // function with sync and async calls skips nothing either.
            sqlx::query(
                "SELECT count(pg_advisory_xact_lock(f.key)) FROM (
                     SELECT DISTINCT hashtextextended((j.value ->> 'tenant') || '/' || (j.value ->> 'function'), 0) AS key
                     FROM jsonb_array_elements($1::jsonb) AS j(value)
                     ORDER BY key) AS f",
            )
            .bind(&logs)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
            sqlx::query(
                "INSERT INTO log_lines (invocation_id, tenant, function, stream, line, at)
                 SELECT r.invocation_id, r.tenant, r.function, r.stream, r.line, r.at
                 FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS j(value, ord)
                 CROSS JOIN LATERAL jsonb_to_record(j.value) AS r(
                     invocation_id text, tenant text, function text, stream text, line text, at bigint)
                 ORDER BY j.ord",
            )
            .bind(&logs)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        }
        tx.commit().await.map_err(classify)
    }

    /// On the pool, not through the writer: each lease is its own short statement, and `SKIP
    /// LOCKED` lets nodes leasing at once take different rows.
    async fn lease(
        store: &PostgresStore,
        owner: &str,
        now: UnixMs,
        lease_ms: u64,
        limit: u32,
    ) -> StoreResult<Vec<Leased>> {
        let op = LeaseOp::new(owner, now, lease_ms, limit, None)?;
        Ok(lease_on_pool(store, &op, now).await?.into_iter().flatten().collect())
    }

    async fn lease_asks(
        store: &PostgresStore,
        owner: &str,
        now: UnixMs,
        lease_ms: u64,
        promote_ahead_ms: u64,
        asks: &[LeaseAsk],
    ) -> StoreResult<Vec<Vec<Leased>>> {
        let op = LeaseOp::new(owner, now, lease_ms, 0, Some((asks, promote_ahead_ms)))?;
        lease_on_pool(store, &op, now).await
    }

    /// Stamped with the database's clock (unless the caller's decides), on the pool.
    async fn node_heartbeat(store: &PostgresStore, node: &NodeRecord, stopped: bool) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO nodes (id, address, version, started_at, heartbeat_at, stopped_at, slots,
                                in_flight, queue_lag_ms)
             SELECT $1, $2, $3, $4, now.ms, CASE WHEN $6 THEN now.ms END, $7, $8, $9
             FROM (SELECT COALESCE($5::bigint, sluice_now_ms()) AS ms) AS now
             ON CONFLICT (id) DO UPDATE SET
                 address = excluded.address, version = excluded.version,
                 heartbeat_at = excluded.heartbeat_at, stopped_at = excluded.stopped_at,
                 slots = excluded.slots, in_flight = excluded.in_flight,
                 queue_lag_ms = excluded.queue_lag_ms",
        )
        .bind(&node.id)
        .bind(&node.address)
        .bind(&node.version)
        .bind(node.started_at)
        .bind(store.engine.now(store.clock.now_ms()))
        .bind(stopped)
        .bind(i64::from(node.slots))
        .bind(i64::from(node.in_flight))
        .bind(to_i64("queue lag", node.queue_lag_ms)?)
        .execute(&store.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    async fn list_nodes(store: &PostgresStore, within_ms: u64) -> StoreResult<(Vec<NodeRecord>, UnixMs)> {
        let mut tx = store.pool.begin().await.map_err(classify)?;
        let now = sqlx::query("SELECT COALESCE($1::bigint, sluice_now_ms())")
            .bind(store.engine.now(store.clock.now_ms()))
            .fetch_one(&mut *tx)
            .await
            .map_err(classify)?;
        let (now,): (i64,) = Tuple::from_row(&now)?;
        let found = sqlx::query(
            "SELECT id, address, version, started_at, heartbeat_at, stopped_at, slots, in_flight,
                    queue_lag_ms
             FROM nodes WHERE heartbeat_at >= $1 ORDER BY started_at, id",
        )
        .bind(now.saturating_sub(to_i64("window", within_ms)?))
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok((rows(found, node_from_row)?, now))
    }

    async fn commit_trigger_batch(
        store: &PostgresStore,
        op: crate::queue::TriggerBatchOp,
    ) -> StoreResult<Option<u64>> {
        crate::triggers::commit_batch_on_pool(store, op).await
    }

    async fn enqueue_in(
        connection: &mut sqlx::PgConnection,
        rows: &str,
        ordered: Option<UnixMs>,
    ) -> StoreResult<u64> {
        sqlx::query(queue::CLAIM_KEYS)
            .bind(rows)
            .bind(crate::IDEMPOTENCY_WINDOW_MS)
            .execute(&mut *connection)
            .await
            .map_err(classify)?;
        let inserted: i64 = sqlx::query_scalar(queue::INSERT_QUEUED)
            .bind(rows)
            .bind(QUEUE_CHANNEL)
            .fetch_one(&mut *connection)
            .await
            .map_err(classify)?;
        if let Some(now) = ordered {
            sqlx::query(queue::RELEASE_HEADS)
                .bind(rows)
                .bind(now)
                .execute(&mut *connection)
                .await
                .map_err(classify)?;
        }
        Ok(u64::try_from(inserted).unwrap_or(0))
    }
}

/// Forwards notifications as [`Change`]s until the store is dropped. When the connection is lost,
/// sqlx reconnects and listens again; what was sent meanwhile is lost, so subscribers get
/// [`Change::Resync`].
async fn listen(mut listener: PgListener, changes: broadcast::Sender<Change>) {
    // Said once per outage, not once per retry.
    let mut failing = false;
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => {
                failing = false;
                let change = if notification.channel() == QUEUE_CHANNEL {
                    Some(Change::Queue)
                } else {
                    parse_change(notification.payload())
                };
                if let Some(change) = change {
                    // No subscriber is not an error: nothing to keep fresh.
                    let _ = changes.send(change);
                }
            }
            Ok(None) => {
                tracing::warn!("lost the connection listening for cluster changes; reconnected");
                let _ = changes.send(Change::Resync);
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "listening for cluster changes failed; retrying every second");
                    failing = true;
                }
                let _ = changes.send(Change::Resync);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn parse_change(payload: &str) -> Option<Change> {
    #[derive(serde::Deserialize)]
    struct Payload {
        kind: String,
        tenant: Option<String>,
        function: Option<String>,
    }
    let parsed: Payload = match serde_json::from_str(payload) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(%payload, error = %e, "ignoring a change notification sluice does not know");
            return None;
        }
    };
    match (parsed.kind.as_str(), parsed.tenant, parsed.function) {
        ("keys", ..) => Some(Change::Keys),
        ("limits", ..) => Some(Change::Limits),
        ("function", Some(tenant), Some(function)) => Some(Change::Function { tenant, function }),
        _ => {
            tracing::warn!(%payload, "ignoring a change notification sluice does not know");
            None
        }
    }
}

/// Applies every migration the database has not seen yet, each in its own transaction, all under
/// an advisory lock: nodes starting together apply each migration once.
async fn migrate(pool: &PgPool, now: UnixMs) -> StoreResult<()> {
    let mut connection = pool.acquire().await.map_err(classify)?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *connection)
        .await
        .map_err(classify)?;
    let result = apply_migrations(&mut connection, now).await;
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *connection)
        .await
        .map_err(classify);
    result.and(unlocked.map(|_| ()))
}

async fn apply_migrations(connection: &mut sqlx::PgConnection, now: UnixMs) -> StoreResult<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS schema_version (
            version    BIGINT NOT NULL PRIMARY KEY,
            name       TEXT   NOT NULL,
            applied_at BIGINT NOT NULL
        )",
    )
    .execute(&mut *connection)
    .await
    .map_err(classify)?;
    let known = MIGRATIONS.last().map_or(0, |m| m.version);
    let current: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_version")
        .fetch_one(&mut *connection)
        .await
        .map_err(classify)?;
    if current > known {
        return Err(StoreError::Other(format!(
            "database schema version {current} is newer than this sluice knows ({known}); \
             upgrade sluice or restore a matching backup"
        )));
    }
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_version")
        .fetch_all(&mut *connection)
        .await
        .map_err(classify)?;
    for migration in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        let mut tx = sqlx::Connection::begin(&mut *connection).await.map_err(classify)?;
        sqlx::raw_sql(migration.sql).execute(&mut *tx).await.map_err(classify)?;
        sqlx::query("INSERT INTO schema_version (version, name, applied_at) VALUES ($1, $2, $3)")
            .bind(migration.version)
            .bind(migration.name)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        tracing::info!(version = migration.version, name = migration.name, "applied migration");
    }
    Ok(())
}

/// The one place a PostgreSQL error is classified. `Unavailable` means "nothing was stored, try
/// again later": the server is unreachable, restarting or out of room, a connection was
/// terminated, or the transaction lost a deadlock or serialization race.
fn classify(error: sqlx::Error) -> StoreError {
    match &error {
        sqlx::Error::Database(db) => {
            if db.is_unique_violation() {
                return StoreError::Conflict(db.message().to_owned());
            }
            let code = db.code().unwrap_or_default();
            let transient = code.starts_with("08") // connection exception
                || code.starts_with("53") // insufficient resources (disk full, too many connections)
                || code.starts_with("57P") // admin shutdown, crash shutdown, cannot connect now
                || code == "40001" // serialization failure
                || code == "40P01" // deadlock detected
                || code == "25006"; // read-only transaction (a standby)
            if transient {
                StoreError::Unavailable(error.to_string())
            } else {
                StoreError::Other(error.to_string())
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(error.to_string()),
        _ => StoreError::Other(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order() {
        let mut previous = 0;
        for migration in MIGRATIONS {
            assert!(migration.version > previous, "migration {:?}", migration.name);
            previous = migration.version;
        }
    }

    #[test]
    fn change_payloads_parse() {
        assert_eq!(parse_change(r#"{"kind":"keys"}"#), Some(Change::Keys));
        assert_eq!(parse_change(r#"{"kind":"limits"}"#), Some(Change::Limits));
        assert_eq!(
            parse_change(r#"{"kind":"function","tenant":"t","function":"f"}"#),
            Some(Change::Function { tenant: "t".into(), function: "f".into() })
        );
        assert_eq!(parse_change(r#"{"kind":"function"}"#), None);
        assert_eq!(parse_change("nonsense"), None);
    }
}
