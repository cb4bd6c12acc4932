//! [`PostgresStore`]: the [`Store`] of a cluster. Identical nodes share one PostgreSQL database;
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

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sluice_core::{Clock, FunctionConfig, SystemClock, UnixMs};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Postgres as Pg, QueryBuilder, Transaction};
use tokio::sync::broadcast;

use crate::queue::{LeaseOp, Writer};
use crate::rows::{
    QUEUE_DEPTH, QUEUED_USAGE, USAGE_LIMITS, config_to_json, demand_from_rows, get, invocation_from_row,
    key_from_row, log_line_from_row, node_from_row, queue_depth_from_rows, queued_usage_from_rows,
    quota_from_row, response_from_row, rows, scopes_to_text, summary_from_row, sync_batch_json,
    tenant_from_row, tenant_queue_from_counts, usage_limit_column, usage_limits_from_rows, version_from_row,
};
use crate::{
    AttemptResult, Change, Enqueued, FunctionSummary, IDEMPOTENCY_WINDOW_MS, Invocation, InvocationFilter,
    KeyRecord, LeaseAsk, Leased, LogLine, LogStream, NewInvocation, NodeRecord, OwnUsageLimits, QueueDemand,
    QueuedUsage, Quota, Store, StoreError, StoreResult, StoredResponse, SyncRecord, Tenant, TenantQueue,
    TenantStorage, VersionRecord, corrupt,
};

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
/// Most log lines one `function_logs` call returns, whatever `limit` the caller asks for.
pub const FUNCTION_LOGS_LIMIT_MAX: u32 = 10_000;
/// Most invocations one `list_invocations` call returns, whatever `limit` the caller asks for.
pub const LIST_INVOCATIONS_LIMIT_MAX: u32 = 1_000;
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

/// Each tenant's runnable work by class, each count stopping at $3 rows (see the SQLite store's
/// `QUEUE_DEMAND`): $1 now or NULL, $2 promote_ahead_ms.
const QUEUE_DEMAND: &str = "
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

/// The PostgreSQL implementation of [`Store`]. Cloning is cheap and shares the pool, the writer
/// and the listener.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// Enqueues, group-committed on their own connection: a 202 does not wait behind a batch of
    /// completions (PostgreSQL commits the two connections' transactions side by side).
    enqueues: Writer,
    /// Everything else the queue writes: completions, heartbeats, releases, re-drives, purges.
    writer: Writer,
    clock: Arc<dyn Clock>,
    source: ClockSource,
    changes: broadcast::Sender<Change>,
    listener: Arc<Listener>,
    /// When this node last swept (see [`SWEEP_INTERVAL`]).
    swept: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore").field("source", &self.source).finish_non_exhaustive()
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
        Ok(Self { pool, enqueues, writer, clock, source, changes, listener, swept: Arc::default() })
    }

    /// Closes the queue writers (after the batches they hold) and every connection.
    pub async fn close(&self) {
        self.enqueues.close().await;
        self.writer.close().await;
        self.listener.0.abort();
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

    /// The `now` a statement binds: the caller's, or `None` for the database's clock.
    fn now(&self, caller: UnixMs) -> Option<UnixMs> {
        (self.source == ClockSource::Caller).then_some(caller)
    }

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

    async fn begin(&self) -> StoreResult<Transaction<'static, Pg>> {
        self.pool.begin().await.map_err(classify)
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

/// `NotFound` unless the tenant exists; inside the transaction that depends on it, with the row
/// locked so it cannot be deleted before the commit.
async fn require_tenant(tx: &mut Transaction<'static, Pg>, tenant: &str) -> StoreResult<()> {
    let exists: Option<String> = sqlx::query_scalar("SELECT name FROM tenants WHERE name = $1 FOR SHARE")
        .bind(tenant)
        .fetch_optional(&mut **tx)
        .await
        .map_err(classify)?;
    match exists {
        Some(_) => Ok(()),
        None => Err(StoreError::NotFound(format!("tenant {tenant}"))),
    }
}

fn to_i64(what: &str, value: u64) -> StoreResult<i64> {
    i64::try_from(value).map_err(|_| StoreError::Other(format!("{what} {value} is out of range")))
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    async fn create_tenant(&self, name: &str) -> StoreResult<Tenant> {
        let tenant = Tenant { name: name.to_owned(), created_at: self.clock.now_ms() };
        sqlx::query("INSERT INTO tenants (name, created_at) VALUES ($1, $2)")
            .bind(&tenant.name)
            .bind(tenant.created_at)
            .execute(&self.pool)
            .await
            .map_err(|e| match classify(e) {
                StoreError::Conflict(_) => StoreError::Conflict(format!("tenant {name} exists")),
                other => other,
            })?;
        Ok(tenant)
    }

    async fn get_tenant(&self, name: &str) -> StoreResult<Option<Tenant>> {
        sqlx::query("SELECT name, created_at FROM tenants WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?
            .as_ref()
            .map(tenant_from_row)
            .transpose()
    }

    async fn list_tenants(&self) -> StoreResult<Vec<Tenant>> {
        let found = sqlx::query("SELECT name, created_at FROM tenants ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        rows(found, tenant_from_row)
    }

    async fn set_tenant_rate(&self, tenant: &str, rate: Option<(f64, u32)>) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        require_tenant(&mut tx, tenant).await?;
        match rate {
            Some((per_sec, burst)) => {
                sqlx::query(
                    "INSERT INTO tenant_limits (tenant, rate_per_sec, burst) VALUES ($1, $2, $3)
                     ON CONFLICT (tenant) DO UPDATE
                         SET rate_per_sec = excluded.rate_per_sec, burst = excluded.burst",
                )
                .bind(tenant)
                .bind(per_sec)
                .bind(i64::from(burst))
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
            }
            None => {
                sqlx::query("DELETE FROM tenant_limits WHERE tenant = $1")
                    .bind(tenant)
                    .execute(&mut *tx)
                    .await
                    .map_err(classify)?;
            }
        }
        tx.commit().await.map_err(classify)
    }

    async fn tenant_rates(&self) -> StoreResult<Vec<(String, f64, u32)>> {
        let found: Vec<(String, f64, i64)> =
            sqlx::query_as("SELECT tenant, rate_per_sec, burst FROM tenant_limits ORDER BY tenant")
                .fetch_all(&self.pool)
                .await
                .map_err(classify)?;
        found
            .into_iter()
            .map(|(tenant, per_sec, burst)| {
                let burst = u32::try_from(burst).map_err(|_| corrupt(format_args!("burst {burst}")))?;
                Ok((tenant, per_sec, burst))
            })
            .collect()
    }

    async fn set_tenant_quota(&self, tenant: &str, quota: Option<Quota>) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        require_tenant(&mut tx, tenant).await?;
        match quota {
            Some(q) => {
                sqlx::query(
                    "INSERT INTO tenant_quotas (tenant, reserved, weight) VALUES ($1, $2, $3)
                     ON CONFLICT (tenant) DO UPDATE SET reserved = excluded.reserved, weight = excluded.weight",
                )
                .bind(tenant)
                .bind(i64::from(q.reserved))
                .bind(i64::from(q.weight))
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
            }
            None => {
                sqlx::query("DELETE FROM tenant_quotas WHERE tenant = $1")
                    .bind(tenant)
                    .execute(&mut *tx)
                    .await
                    .map_err(classify)?;
            }
        }
        tx.commit().await.map_err(classify)
    }

    async fn tenant_quotas(&self) -> StoreResult<Vec<(String, Quota)>> {
        let found: Vec<(String, i64, i64)> =
            sqlx::query_as("SELECT tenant, reserved, weight FROM tenant_quotas ORDER BY tenant")
                .fetch_all(&self.pool)
                .await
                .map_err(classify)?;
        found.into_iter().map(quota_from_row).collect()
    }

    async fn set_tenant_usage_limits(&self, tenant: &str, limits: &OwnUsageLimits) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        require_tenant(&mut tx, tenant).await?;
        if limits.is_empty() {
            sqlx::query("DELETE FROM tenant_usage_limits WHERE tenant = $1")
                .bind(tenant)
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
        } else {
            sqlx::query(
                "INSERT INTO tenant_usage_limits (tenant, queued_max, queued_bytes_max,
                     components_bytes_max, functions_max, versions_max) VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (tenant) DO UPDATE SET
                     queued_max = excluded.queued_max, queued_bytes_max = excluded.queued_bytes_max,
                     components_bytes_max = excluded.components_bytes_max,
                     functions_max = excluded.functions_max, versions_max = excluded.versions_max",
            )
            .bind(tenant)
            .bind(usage_limit_column(limits.queued_max)?)
            .bind(usage_limit_column(limits.queued_bytes_max)?)
            .bind(usage_limit_column(limits.components_bytes_max)?)
            .bind(usage_limit_column(limits.functions_max)?)
            .bind(usage_limit_column(limits.versions_max)?)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        }
        tx.commit().await.map_err(classify)
    }

    async fn tenant_usage_limits(&self) -> StoreResult<Vec<(String, OwnUsageLimits)>> {
        let found = sqlx::query_as(USAGE_LIMITS).fetch_all(&self.pool).await.map_err(classify)?;
        usage_limits_from_rows(found)
    }

    async fn create_key(&self, key: &KeyRecord) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        if let Some(tenant) = &key.tenant {
            require_tenant(&mut tx, tenant).await?;
        }
        sqlx::query(
            "INSERT INTO api_keys (id, tenant, scopes, hash, created_at, revoked)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&key.id)
        .bind(&key.tenant)
        .bind(scopes_to_text(&key.scopes))
        .bind(&key.hash)
        .bind(key.created_at)
        .bind(key.revoked)
        .execute(&mut *tx)
        .await
        .map_err(|e| match classify(e) {
            StoreError::Conflict(_) => {
                StoreError::Conflict(format!("a key with id {} or the same hash exists", key.id))
            }
            other => other,
        })?;
        tx.commit().await.map_err(classify)
    }

    async fn list_keys(&self, tenant: Option<&str>) -> StoreResult<Vec<KeyRecord>> {
        let found = sqlx::query(
            "SELECT id, tenant, scopes, hash, created_at, revoked FROM api_keys
             WHERE $1::text IS NULL OR tenant = $1 ORDER BY created_at, id",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows(found, key_from_row)
    }

    async fn revoke_key(&self, id: &str) -> StoreResult<bool> {
        let done = sqlx::query("UPDATE api_keys SET revoked = true WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(done.rows_affected() > 0)
    }

    async fn get_key(&self, id: &str) -> StoreResult<Option<KeyRecord>> {
        sqlx::query("SELECT id, tenant, scopes, hash, created_at, revoked FROM api_keys WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?
            .as_ref()
            .map(key_from_row)
            .transpose()
    }

    async fn active_keys(&self) -> StoreResult<Vec<KeyRecord>> {
        let found = sqlx::query(
            "SELECT id, tenant, scopes, hash, created_at, revoked FROM api_keys
             WHERE NOT revoked ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows(found, key_from_row)
    }

    async fn put_blob(&self, tenant: &str, digest: &str, bytes: &[u8]) -> StoreResult<()> {
        let size = i64::try_from(bytes.len()).expect("a blob in memory fits in i64 bytes");
        let mut tx = self.begin().await?;
        require_tenant(&mut tx, tenant).await?;
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
        .bind(self.clock.now_ms())
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)
    }

    async fn get_blob(&self, tenant: &str, digest: &str) -> StoreResult<Option<Vec<u8>>> {
        sqlx::query_scalar("SELECT bytes FROM blobs WHERE tenant = $1 AND digest = $2")
            .bind(tenant)
            .bind(digest)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)
    }

    async fn purge_blobs(&self, uploaded_before: UnixMs, limit: u32) -> StoreResult<Vec<(String, String)>> {
        // A deploy that names the blob locks it (its foreign key check takes a share lock) or
        // commits first; SKIP LOCKED leaves such a blob alone, and the re-check after the lock
        // sees a version committed meanwhile.
        sqlx::query_as(
            "DELETE FROM blobs AS b
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
             RETURNING b.tenant, b.digest",
        )
        .bind(uploaded_before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)
    }

    async fn purge_versions(&self, keep_latest: u32, limit: u32) -> StoreResult<u64> {
        let done = sqlx::query(
            "DELETE FROM versions AS d
             WHERE (d.tenant, d.function, d.version) IN (
                 SELECT v.tenant, v.function, v.version FROM versions v
                 JOIN functions f ON f.tenant = v.tenant AND f.name = v.function
                 WHERE v.version <= f.latest_version - $1
                   AND NOT EXISTS (SELECT 1 FROM invocations i
                                   WHERE i.tenant = v.tenant AND i.function = v.function
                                     AND i.version = v.version
                                     AND i.status IN ('queued', 'failed', 'running'))
                 ORDER BY v.created_at
                 LIMIT $2
                 FOR UPDATE OF v SKIP LOCKED)
               AND NOT EXISTS (SELECT 1 FROM invocations i
                               WHERE i.tenant = d.tenant AND i.function = d.function
                                 AND i.version = d.version
                                 AND i.status IN ('queued', 'failed', 'running'))",
        )
        .bind(i64::from(keep_latest.max(1)))
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(done.rows_affected())
    }

    async fn blob_keys(&self) -> StoreResult<Vec<(String, String)>> {
        sqlx::query_as("SELECT tenant, digest FROM blobs ORDER BY tenant, digest")
            .fetch_all(&self.pool)
            .await
            .map_err(classify)
    }

    async fn tenant_storage(&self, tenant: &str) -> StoreResult<TenantStorage> {
        let row = sqlx::query(
            "SELECT EXISTS (SELECT 1 FROM tenants WHERE name = $1) AS known,
                    (SELECT COUNT(*) FROM functions WHERE tenant = $1) AS functions,
                    (SELECT COUNT(*) FROM versions WHERE tenant = $1) AS versions,
                    (SELECT COUNT(*) FROM blobs WHERE tenant = $1) AS blobs,
                    (SELECT COALESCE(SUM(size), 0)::BIGINT FROM blobs WHERE tenant = $1) AS blob_bytes",
        )
        .bind(tenant)
        .fetch_one(&self.pool)
        .await
        .map_err(classify)?;
        if !get::<bool, _>(&row, "known")? {
            return Err(StoreError::NotFound(format!("tenant {tenant}")));
        }
        let count = |column: &str| -> StoreResult<u64> {
            u64::try_from(get::<i64, _>(&row, column)?).map_err(|_| corrupt(format!("negative {column}")))
        };
        Ok(TenantStorage {
            functions: count("functions")?,
            versions: count("versions")?,
            blobs: count("blobs")?,
            blob_bytes: count("blob_bytes")?,
        })
    }

    /// Numbering restarts at 1 after [`Store::delete_function`], as on SQLite.
    async fn create_version(
        &self,
        tenant: &str,
        function: &str,
        blob_digest: &str,
        config: &FunctionConfig,
    ) -> StoreResult<VersionRecord> {
        let config_json = config_to_json(config)?;
        let now = self.clock.now_ms();
        // The function row's upsert locks it: concurrent deploys of one function, on any node,
        // take their numbers one after the other, without gaps or duplicates.
        let mut tx = self.begin().await?;
        require_tenant(&mut tx, tenant).await?;
        let blob: Option<String> =
            sqlx::query_scalar("SELECT digest FROM blobs WHERE tenant = $1 AND digest = $2 FOR SHARE")
                .bind(tenant)
                .bind(blob_digest)
                .fetch_optional(&mut *tx)
                .await
                .map_err(classify)?;
        if blob.is_none() {
            return Err(StoreError::NotFound(format!("blob {blob_digest}")));
        }
        let version: i64 = sqlx::query_scalar(
            "INSERT INTO functions (tenant, name, created_at, updated_at, latest_version)
             VALUES ($1, $2, $3, $3, 1)
             ON CONFLICT (tenant, name) DO UPDATE
                 SET latest_version = functions.latest_version + 1, updated_at = excluded.updated_at
             RETURNING latest_version",
        )
        .bind(tenant)
        .bind(function)
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
        sqlx::query(
            "INSERT INTO versions (tenant, function, version, blob_digest, config, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(tenant)
        .bind(function)
        .bind(version)
        .bind(blob_digest)
        .bind(&config_json)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(VersionRecord {
            tenant: tenant.to_owned(),
            function: function.to_owned(),
            version,
            blob_digest: blob_digest.to_owned(),
            config: config.clone(),
            created_at: now,
        })
    }

    async fn latest_version(&self, tenant: &str, function: &str) -> StoreResult<Option<VersionRecord>> {
        sqlx::query(
            "SELECT v.tenant, v.function, v.version, v.blob_digest, v.config, v.created_at
             FROM functions f
             JOIN versions v
               ON v.tenant = f.tenant AND v.function = f.name AND v.version = f.latest_version
             WHERE f.tenant = $1 AND f.name = $2",
        )
        .bind(tenant)
        .bind(function)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?
        .as_ref()
        .map(version_from_row)
        .transpose()
    }

    async fn get_version(
        &self,
        tenant: &str,
        function: &str,
        version: i64,
    ) -> StoreResult<Option<VersionRecord>> {
        sqlx::query(
            "SELECT tenant, function, version, blob_digest, config, created_at FROM versions
             WHERE tenant = $1 AND function = $2 AND version = $3",
        )
        .bind(tenant)
        .bind(function)
        .bind(version)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?
        .as_ref()
        .map(version_from_row)
        .transpose()
    }

    async fn list_functions(&self, tenant: &str) -> StoreResult<Vec<FunctionSummary>> {
        let found = sqlx::query(
            "SELECT tenant, name, latest_version, created_at, updated_at FROM functions
             WHERE tenant = $1 ORDER BY name",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows(found, summary_from_row)
    }

    async fn delete_function(&self, tenant: &str, function: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM functions WHERE tenant = $1 AND name = $2")
            .bind(tenant)
            .bind(function)
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(done.rows_affected() > 0)
    }

    async fn all_latest_versions(&self) -> StoreResult<Vec<VersionRecord>> {
        let found = sqlx::query(
            "SELECT v.tenant, v.function, v.version, v.blob_digest, v.config, v.created_at
             FROM functions f
             JOIN versions v
               ON v.tenant = f.tenant AND v.function = f.name AND v.version = f.latest_version
             ORDER BY f.tenant, f.name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows(found, version_from_row)
    }

    async fn record_sync(&self, batch: &[SyncRecord]) -> StoreResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let (invocations, logs) = sync_batch_json(batch)?;
        let mut tx = self.begin().await?;
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
        .map_err(|e| match classify(e) {
            StoreError::Conflict(m) => {
                StoreError::Conflict(format!("an invocation of the batch is already recorded: {m}"))
            }
            other => other,
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

    async fn get_invocation(&self, id: &str) -> StoreResult<Option<Invocation>> {
        sqlx::query(
            "SELECT id, tenant, function, version, mode, status, attempts, created_at,
                    started_at, finished_at, status_code, error_kind, cpu_us, waits
             FROM invocations WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?
        .as_ref()
        .map(invocation_from_row)
        .transpose()
    }

    async fn invocation_logs(&self, id: &str) -> StoreResult<Vec<LogLine>> {
        let found = sqlx::query(
            "SELECT seq, invocation_id, stream, line, at FROM log_lines
             WHERE invocation_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows(found, log_line_from_row)
    }

    async fn function_logs(
        &self,
        tenant: &str,
        function: &str,
        after_seq: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<LogLine>> {
        let limit = i64::from(limit.min(FUNCTION_LOGS_LIMIT_MAX));
        let found = match after_seq {
            Some(after_seq) => {
                sqlx::query(
                    "SELECT seq, invocation_id, stream, line, at FROM log_lines
                     WHERE tenant = $1 AND function = $2 AND seq > $3
                     ORDER BY seq LIMIT $4",
                )
                .bind(tenant)
                .bind(function)
                .bind(after_seq)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
            }
            None => {
                sqlx::query(
                    "SELECT seq, invocation_id, stream, line, at FROM (
                         SELECT seq, invocation_id, stream, line, at FROM log_lines
                         WHERE tenant = $1 AND function = $2
                         ORDER BY seq DESC LIMIT $3
                     ) AS newest ORDER BY seq",
                )
                .bind(tenant)
                .bind(function)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
            }
        }
        .map_err(classify)?;
        rows(found, log_line_from_row)
    }

    async fn enqueue(&self, inv: &NewInvocation) -> StoreResult<Enqueued> {
        self.enqueues.enqueue(inv, self.clock.now_ms()).await
    }

    async fn lease(&self, owner: &str, now: UnixMs, lease_ms: u64, limit: u32) -> StoreResult<Vec<Leased>> {
        let op = LeaseOp::new(owner, now, lease_ms, limit, None)?;
        let mut connection = self.pool.acquire().await.map_err(classify)?;
        if self.sweep_due() {
            queue::sweep(&mut connection, self.now(now)).await?;
        }
        queue::lease(&mut connection, &op, self.now(now)).await
    }

    async fn lease_asks(
        &self,
        owner: &str,
        now: UnixMs,
        lease_ms: u64,
        promote_ahead_ms: u64,
        asks: &[LeaseAsk],
    ) -> StoreResult<Vec<Vec<Leased>>> {
        if asks.is_empty() {
            return Ok(Vec::new());
        }
        let op = LeaseOp::new(owner, now, lease_ms, 0, Some((asks, promote_ahead_ms)))?;
        let mut connection = self.pool.acquire().await.map_err(classify)?;
        if self.sweep_due() {
            queue::sweep(&mut connection, self.now(now)).await?;
        }
        queue::lease_asks(&mut connection, &op, self.now(now)).await
    }

    async fn queue_demand(&self, now: UnixMs, promote_ahead_ms: u64, cap: u32) -> StoreResult<QueueDemand> {
        let ahead = to_i64("promote_ahead_ms", promote_ahead_ms)?;
        let tenants: Vec<(String, i64, i64, i64)> = sqlx::query_as(QUEUE_DEMAND)
            .bind(self.now(now))
            .bind(ahead)
            .bind(i64::from(cap))
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        let running: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT tenant, function, count(*) FROM invocations WHERE status = 'running'
             GROUP BY tenant, function ORDER BY tenant, function",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        demand_from_rows(tenants, running)
    }

    async fn tenant_queue(&self, tenant: &str, now: UnixMs) -> StoreResult<TenantQueue> {
        let (running, runnable, runnable_windowed, later): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT
                (SELECT count(*) FROM invocations WHERE status = 'running' AND tenant = $1),
                (SELECT count(*) FROM invocations
                 WHERE status IN ('queued', 'failed') AND tenant = $1 AND run_after <= $2),
                (SELECT count(*) FROM invocations
                 WHERE status IN ('queued', 'failed') AND tenant = $1 AND run_after <= $2
                   AND deadline IS NOT NULL),
                (SELECT count(*) FROM invocations
                 WHERE status IN ('queued', 'failed') AND tenant = $1 AND run_after > $2)",
        )
        .bind(tenant)
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .map_err(classify)?;
        tenant_queue_from_counts(running, runnable, runnable_windowed, later)
    }

    async fn queue_depth(&self) -> StoreResult<Vec<(String, crate::Criticality, u64)>> {
        let rows = sqlx::query_as(QUEUE_DEPTH).fetch_all(&self.pool).await.map_err(classify)?;
        queue_depth_from_rows(rows)
    }

    async fn queued_usage(&self) -> StoreResult<Vec<QueuedUsage>> {
        let found = sqlx::query_as(QUEUED_USAGE).fetch_all(&self.pool).await.map_err(classify)?;
        queued_usage_from_rows(found)
    }

    async fn record_waits(&self, waits: &[(String, u32, String)]) -> StoreResult<()> {
        self.writer.record_waits(waits).await
    }

    async fn heartbeat(
        &self,
        owner: &str,
        leases: &[(String, u32)],
        now: UnixMs,
        lease_ms: u64,
    ) -> StoreResult<Vec<(String, u32)>> {
        self.writer.heartbeat(owner, leases, now, lease_ms).await
    }

    async fn complete(
        &self,
        id: &str,
        owner: &str,
        attempt: u32,
        result: &AttemptResult,
        logs: &[(LogStream, String, UnixMs)],
        cpu_us: u64,
        now: UnixMs,
    ) -> StoreResult<bool> {
        self.writer.complete(id, owner, attempt, result, logs, cpu_us, now).await
    }

    async fn release(&self, owner: &str, leases: &[(String, u32)]) -> StoreResult<()> {
        self.writer.release(owner, leases).await
    }

    async fn get_response(&self, id: &str) -> StoreResult<Option<StoredResponse>> {
        sqlx::query("SELECT status, headers, body FROM responses WHERE invocation_id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?
            .as_ref()
            .map(response_from_row)
            .transpose()
    }

    async fn list_invocations(&self, filter: &InvocationFilter) -> StoreResult<Vec<Invocation>> {
        let limit = i64::from(filter.limit.min(LIST_INVOCATIONS_LIMIT_MAX));
        let mut query = QueryBuilder::<Pg>::new(
            "SELECT id, tenant, function, version, mode, status, attempts, created_at,
                    started_at, finished_at, status_code, error_kind, cpu_us, waits
             FROM invocations WHERE tenant = ",
        );
        query.push_bind(&filter.tenant);
        if let Some(function) = &filter.function {
            query.push(" AND function = ").push_bind(function);
        }
        if let Some(status) = filter.status {
            query.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(before_id) = &filter.before_id {
            query.push(" AND id < ").push_bind(before_id);
        }
        query.push(" ORDER BY id DESC LIMIT ").push_bind(limit);
        let found = query.build().fetch_all(&self.pool).await.map_err(classify)?;
        rows(found, invocation_from_row)
    }

    async fn retry_dead(&self, id: &str, now: UnixMs) -> StoreResult<bool> {
        self.writer.retry_dead(id, now).await
    }

    async fn purge(&self, cutoff: UnixMs, limit: u32) -> StoreResult<u64> {
        let keys_cutoff = self.clock.now_ms().saturating_sub(IDEMPOTENCY_WINDOW_MS);
        self.writer.purge(cutoff, keys_cutoff, limit).await
    }

    async fn node_heartbeat(&self, node: &NodeRecord, stopped: bool) -> StoreResult<()> {
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
        .bind(self.now(self.clock.now_ms()))
        .bind(stopped)
        .bind(i64::from(node.slots))
        .bind(i64::from(node.in_flight))
        .bind(to_i64("queue lag", node.queue_lag_ms)?)
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    async fn list_nodes(&self, within_ms: u64) -> StoreResult<(Vec<NodeRecord>, UnixMs)> {
        let mut tx = self.begin().await?;
        let now: i64 = sqlx::query_scalar("SELECT COALESCE($1::bigint, sluice_now_ms())")
            .bind(self.now(self.clock.now_ms()))
            .fetch_one(&mut *tx)
            .await
            .map_err(classify)?;
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

    fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        Some(self.changes.subscribe())
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
