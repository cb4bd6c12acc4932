//! [`SqlStore`]: the one implementation of [`Store`](crate::Store) for both databases.
//!
//! The statements both databases agree on are written once, in the domain modules (`tenants`,
//! `code`, `invocations`, `logs`, `nodes`), as generic code over the [`Engine`]'s sqlx
//! database. They use `$1`-style placeholders, which PostgreSQL reads natively and sqlx's SQLite
//! driver binds by number too (`$NNN`), so no statement is rewritten at run time. What truly
//! differs is an [`Engine`]: its errors, how a writing transaction starts, the few statements that
//! lock or walk an index their own way, and the calls one database routes differently (SQLite's
//! single writer task, PostgreSQL's `SKIP LOCKED` lease on the pool and its database clock).
//!
//! A new table needs one migration per database and one implementation of its methods here; a
//! method goes to its [`Engine`] only where the databases cannot share a statement.

use std::sync::Arc;

use sluice_core::{Clock, UnixMs};
use sqlx::{Pool, Transaction};
use tokio::sync::broadcast;

pub(crate) use crate::dialect::{Bind, Conn, Dialect, Tuple, tuples};
use crate::queue::Writer;
use crate::{Change, LeaseAsk, Leased, NodeRecord, StoreError, StoreResult, SyncRecord};

/// The store over one database: a pool for reads and the control plane's writes, the queue's
/// group-committing writer(s), and the [`Engine`] for what is particular to the database. Cloning
/// is cheap and shares all of it.
pub struct SqlStore<E: Engine> {
    pub(crate) pool: Pool<E::DB>,
    pub(crate) clock: Arc<dyn Clock>,
    /// The writer enqueues go through (PostgreSQL gives them a connection of their own, so a 202
    /// does not wait behind a batch of completions; SQLite has one writer for everything).
    pub(crate) enqueues: Writer,
    /// The writer of everything else the queue writes.
    pub(crate) writer: Writer,
    pub(crate) engine: E,
}

impl<E: Engine> Clone for SqlStore<E> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            clock: self.clock.clone(),
            enqueues: self.enqueues.clone(),
            writer: self.writer.clone(),
            engine: self.engine.clone(),
        }
    }
}

impl<E: Engine> std::fmt::Debug for SqlStore<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore").field("engine", &self.engine).finish_non_exhaustive()
    }
}

impl<E: Engine> SqlStore<E> {
    /// This store over a read pool of its own (at most `connections`), sharing its writers. sqlx
    /// gives a connection back to its pool from a task on the runtime that dropped it, so a pool
    /// shared with a busy runtime waits on that runtime: while the one-thread API runtime was
    /// busy, the connections its handlers had used waited there to be returned, and the
    /// scheduler's reads waited for them. The scheduler reads through a pool of its own.
    pub fn with_own_pool(&self, connections: u32) -> Self {
        let options = (*self.pool.connect_options()).clone();
        let pool = self.pool.options().clone().max_connections(connections.max(1)).connect_lazy_with(options);
        Self { pool, ..self.clone() }
    }
}

/// What is particular to one database. Its statements take the same parameters as the shared
/// code binds; each says which.
#[async_trait::async_trait]
pub trait Engine: Dialect {
    /// `known` for a tenant `$1`, locking its row until the commit where the database can (a
    /// tenant must not be deleted under a write that depends on it).
    const TENANT_EXISTS: &'static str;
    /// `known` for the blob `$2` of tenant `$1`, locked like [`Engine::TENANT_EXISTS`].
    const BLOB_EXISTS: &'static str;
    /// Deletes up to `$2` unnamed blobs uploaded before `$1`, `RETURNING tenant, digest`.
    const PURGE_BLOBS: &'static str;
    /// Deletes up to `$2` versions older than the newest `$1` of their function that no
    /// unfinished invocation names.
    const PURGE_VERSIONS: &'static str;
    /// `tenant, due, plain, windowed` of each tenant with runnable work, each count stopping at
    /// `$3`: `$1` now (NULL for the database's clock), `$2` promote_ahead_ms.
    const QUEUE_DEMAND: &'static str;
    /// `tenant, function, count` of what runs now.
    const RUNNING_BY_FUNCTION: &'static str;
    /// `id` of each schedule of a JSON array of ids (`$1`) that this transaction may fire, locked
    /// until its commit; where rows lock one by one (PostgreSQL), those another transaction holds
    /// are skipped, not waited for.
    const LOCK_SCHEDULES: &'static str;
    /// Advances each schedule of a JSON array (`$1`) of firings (`id, revision, next_fire_at,
    /// buffered_for, last_fired_for, last_invocation, fires, skipped, last_error`) whose
    /// revision is still the one read and that is not paused, at `$2`: `RETURNING id`.
    const FIRE_SCHEDULES: &'static str;

    /// Starts a transaction that writes (SQLite: holding the write lock from its first statement).
    async fn begin_write(pool: &Pool<Self::DB>) -> StoreResult<Transaction<'static, Self::DB>>;
    /// The `now` a statement binds: the caller's, or `None` where the database's clock decides.
    fn now(&self, caller: UnixMs) -> Option<UnixMs>;
    /// Changes other nodes made, for a store they share.
    fn changes(&self) -> Option<broadcast::Receiver<Change>>;

    // The calls each database routes its own way (see the engines' module documentation).
    async fn put_blob(store: &SqlStore<Self>, tenant: &str, digest: &str, bytes: &[u8]) -> StoreResult<()>;
    async fn record_sync(store: &SqlStore<Self>, batch: &[SyncRecord]) -> StoreResult<()>;
    async fn lease(
        store: &SqlStore<Self>,
        owner: &str,
        now: UnixMs,
        lease_ms: u64,
        limit: u32,
    ) -> StoreResult<Vec<Leased>>;
    async fn lease_asks(
        store: &SqlStore<Self>,
        owner: &str,
        now: UnixMs,
        lease_ms: u64,
        promote_ahead_ms: u64,
        asks: &[LeaseAsk],
    ) -> StoreResult<Vec<Vec<Leased>>>;
    async fn node_heartbeat(store: &SqlStore<Self>, node: &NodeRecord, stopped: bool) -> StoreResult<()>;
    /// Commits a trigger's batch ([`crate::Triggers::commit_trigger_batch`]).
    async fn commit_trigger_batch(
        store: &SqlStore<Self>,
        op: crate::queue::TriggerBatchOp,
    ) -> StoreResult<Option<u64>>;
    async fn list_nodes(store: &SqlStore<Self>, within_ms: u64) -> StoreResult<(Vec<NodeRecord>, UnixMs)>;
    /// Claims the idempotency keys of a JSON array of enqueue rows (encoded as the queue's writer
    /// encodes them) and inserts the invocations that won theirs, with the writer's statements
    /// but in the caller's transaction (a schedule's firing); tells the other nodes there is
    /// work where they share the store. Returns how many it inserted. With `ordered` (some rows
    /// run in their key's order), also releases their keys' heads, runnable from that time.
    async fn enqueue_in(connection: &mut Conn<Self>, rows: &str, ordered: Option<UnixMs>)
    -> StoreResult<u64>;
}

impl<E: Engine> crate::Store for SqlStore<E>
where
    Self: crate::Tenants
        + crate::Code
        + crate::Invocations
        + crate::Logs
        + crate::Nodes
        + crate::Rollouts
        + crate::Schedules
        + crate::Triggers,
{
    fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        self.engine.changes()
    }
}

/// Says what a unique violation (given the database's message) was about; passes any other error.
pub(crate) fn conflict(error: StoreError, what: impl FnOnce(&str) -> String) -> StoreError {
    match error {
        StoreError::Conflict(message) => StoreError::Conflict(what(&message)),
        other => other,
    }
}

/// `NotFound` (saying `missing`) unless `sql` finds a row for `keys`: an existence check inside
/// the transaction that depends on it, with the row locked where the engine's statement locks it.
pub(crate) async fn require<E: Engine>(
    connection: &mut Conn<E>,
    sql: &'static str,
    keys: &[&str],
    missing: impl FnOnce() -> String,
) -> StoreResult<()>
where
    for<'c> &'c mut Conn<E>: sqlx::Executor<'c, Database = E::DB>,
    for<'a> &'a str: Bind<E::DB>,
{
    let mut query = sqlx::query(sql);
    for key in keys {
        query = query.bind(*key);
    }
    match query.fetch_optional(&mut *connection).await.map_err(E::classify)? {
        Some(_) => Ok(()),
        None => Err(StoreError::NotFound(missing())),
    }
}
