//! Broker triggers ([`Triggers`]): what each consumes and calls, the lease that lets one node at a
//! time consume it, and the one transaction in which a batch of its messages becomes invocations
//! ([`Triggers::commit_trigger_batch`]).
//!
//! The lease is a row's `owner` and `owner_until`, taken and renewed in single `UPDATE`s (as a
//! rollout's). A batch commits only while its node holds the lease, checked in the batch's own
//! transaction: a node that lost its lease (paused past it, cut off from the database) stores
//! nothing, and does not ack. Each invocation carries its message's CloudEvents id as its
//! idempotency key (caller [`TRIGGER_CALLER`]), claimed in the same transaction: a message
//! delivered again after a crash between the commit and the ack is counted as a duplicate and
//! stored once.

use sluice_core::UnixMs;
use sluice_core::trigger::{Credentials, Source};
use sqlx::Executor;

use crate::queue::{EnqueueOp, TriggerBatchOp, json_array};
use crate::rows::{StoreRow, get};
use crate::sql::{Bind, Conn, Engine, SqlStore};
use crate::{NewInvocation, StoreError, StoreResult, corrupt};

/// The caller of a trigger's idempotency keys: no API key id takes this form.
pub const TRIGGER_CALLER: &str = "trigger";

/// What `triggers create` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTrigger {
    pub tenant: String,
    pub name: String,
    pub function: String,
    pub alias: String,
    /// Its URL without credentials.
    pub source: Source,
    pub credentials: Credentials,
    /// The request's path below the function.
    pub path: String,
    pub batch_max: u32,
    pub window_ms: u64,
    /// One invocation in flight per subject, routing key or topic, in the broker's order.
    pub ordered: bool,
}

/// A trigger as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    pub id: i64,
    pub tenant: String,
    pub name: String,
    pub function: String,
    pub alias: String,
    pub source: Source,
    pub credentials: Credentials,
    /// The name it consumes under in the broker, made at create: `sluice-{32 hex}`.
    pub consumer: String,
    pub path: String,
    pub batch_max: u32,
    pub window_ms: u64,
    /// One invocation in flight per subject, routing key or topic, in the broker's order.
    pub ordered: bool,
    pub paused: bool,
    /// The node consuming it, while its lease lasts.
    pub owner: Option<String>,
    pub owner_until: UnixMs,
    pub received: u64,
    pub enqueued: u64,
    pub duplicates: u64,
    pub lag: Option<u64>,
    pub acked_per_s: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<UnixMs>,
    pub last_commit_at: Option<UnixMs>,
    /// What the consumer stored with its last batch ([`Triggers::commit_trigger_batch`]).
    pub recent: Option<String>,
    pub created_at: UnixMs,
    pub updated_at: UnixMs,
}

/// What the owner of a trigger saw of it lately, written every second or so.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TriggerProgress {
    pub lag: Option<u64>,
    pub acked_per_s: Option<u64>,
    /// A new error to show (`None` keeps the last one).
    pub error: Option<String>,
}

store_trait! {
    /// Broker triggers.
    pub trait Triggers {
        /// Creates a trigger of an existing function: `NotFound` for an unknown function,
        /// `Conflict` for a name the tenant uses already.
        async fn create_trigger(&self, new: &NewTrigger) -> StoreResult<Trigger>;
        async fn get_trigger(&self, tenant: &str, name: &str) -> StoreResult<Option<Trigger>>;
        /// A tenant's triggers by name.
        async fn list_triggers(&self, tenant: &str) -> StoreResult<Vec<Trigger>>;
        async fn count_triggers(&self, tenant: &str) -> StoreResult<u64>;
        /// `false` if there was no such trigger.
        async fn delete_trigger(&self, tenant: &str, name: &str) -> StoreResult<bool>;
        /// Pauses (its owner stops consuming at its next renewal) or resumes. `None` if there is
        /// no such trigger.
        async fn set_trigger_paused(&self, tenant: &str, name: &str, paused: bool) -> StoreResult<Option<Trigger>>;
        /// Renews `owner`'s leases of the triggers it holds and takes at most `take` more whose
        /// lease is free or expired, each until `lease_ms` from now; returns every trigger
        /// `owner` holds now. Paused triggers are neither renewed nor taken.
        async fn claim_triggers(&self, owner: &str, lease_ms: u64, take: u32) -> StoreResult<Vec<Trigger>>;
        /// Gives up `owner`'s lease of a trigger (shutdown), so another node takes it at once.
        async fn release_trigger(&self, id: i64, owner: &str) -> StoreResult<()>;
        /// Stores a batch of a trigger's invocations, in one transaction, if `owner` still holds
        /// its lease: `Some(stored)` (a message whose key is held already is not stored again,
        /// and counts as a duplicate), or `None` and nothing stored if it does not. Each
        /// invocation must carry an idempotency key of caller [`TRIGGER_CALLER`]. `recent`, if
        /// given, replaces what the trigger keeps of its last batches' positions.
        async fn commit_trigger_batch(
            &self,
            id: i64,
            owner: &str,
            batch: &[NewInvocation],
            recent: Option<&str>,
        ) -> StoreResult<Option<u64>>;
        /// Records what the owner saw (lag, rate, an error); nothing if it no longer owns it.
        async fn trigger_progress(&self, id: i64, owner: &str, progress: &TriggerProgress) -> StoreResult<()>;
    }
}

macro_rules! select_triggers {
    ($rest:literal) => {
        concat!(
            "SELECT id, tenant, name, function, alias, source, credentials, consumer, request_path, batch_max, window_ms, \
             ordered, paused, owner, owner_until, received, enqueued, duplicates, lag, acked_per_s, last_error, \
             last_error_at, last_commit_at, recent, created_at, updated_at FROM triggers ",
            $rest
        )
    };
}

#[async_trait::async_trait]
impl<E: Engine> Triggers for SqlStore<E>
where
    for<'c> &'c mut Conn<E>: Executor<'c, Database = E::DB>,
    for<'a> &'a str: Bind<E::DB>,
    Option<String>: Bind<E::DB>,
    Option<i64>: Bind<E::DB>,
    Vec<u8>: Bind<E::DB>,
    i64: Bind<E::DB>,
{
    async fn create_trigger(&self, new: &NewTrigger) -> StoreResult<Trigger> {
        let now = self.clock.now_ms();
        let source = serde_json::to_string(&new.source)
            .map_err(|e| StoreError::Other(format!("encoding a trigger's source: {e}")))?;
        let consumer = format!("sluice-{}", sluice_core::ids::invocation_id());
        let mut tx = E::begin_write(&self.pool).await?;
        let function = sqlx::query("SELECT 1 AS known FROM functions WHERE tenant = $1 AND name = $2")
            .bind(new.tenant.as_str())
            .bind(new.function.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(E::classify)?;
        if function.is_none() {
            return Err(StoreError::NotFound(format!(
                "no function {} in tenant {}",
                new.function, new.tenant
            )));
        }
        let row = sqlx::query(
            "INSERT INTO triggers (tenant, name, function, alias, source, credentials, request_path, batch_max,
                 window_ms, created_at, updated_at, consumer, ordered)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11, $12) RETURNING id",
        )
        .bind(new.tenant.as_str())
        .bind(new.name.as_str())
        .bind(new.function.as_str())
        .bind(new.alias.as_str())
        .bind(source.as_str())
        .bind(new.credentials.stored())
        .bind(new.path.as_str())
        .bind(i64::from(new.batch_max))
        .bind(to_i64(new.window_ms)?)
        .bind(now)
        .bind(consumer.as_str())
        .bind(i64::from(new.ordered))
        .fetch_one(&mut *tx)
        .await
        .map_err(E::classify)
        .map_err(|e| match e {
            StoreError::Conflict(_) => {
                StoreError::Conflict(format!("tenant {} has a trigger {} already", new.tenant, new.name))
            }
            other => other,
        })?;
        let id: i64 = get(&row, "id")?;
        let created = sqlx::query(select_triggers!("WHERE id = $1"))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(E::classify)?;
        tx.commit().await.map_err(E::classify)?;
        created
            .as_ref()
            .map(trigger_from_row)
            .transpose()?
            .ok_or_else(|| corrupt(format!("trigger {id} vanished in its own transaction")))
    }

    async fn get_trigger(&self, tenant: &str, name: &str) -> StoreResult<Option<Trigger>> {
        let found = sqlx::query(select_triggers!("WHERE tenant = $1 AND name = $2"))
            .bind(tenant)
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(E::classify)?;
        found.as_ref().map(trigger_from_row).transpose()
    }

    async fn list_triggers(&self, tenant: &str) -> StoreResult<Vec<Trigger>> {
        let found = sqlx::query(select_triggers!("WHERE tenant = $1 ORDER BY name"))
            .bind(tenant)
            .fetch_all(&self.pool)
            .await
            .map_err(E::classify)?;
        found.iter().map(trigger_from_row).collect()
    }

    async fn count_triggers(&self, tenant: &str) -> StoreResult<u64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM triggers WHERE tenant = $1")
            .bind(tenant)
            .fetch_one(&self.pool)
            .await
            .map_err(E::classify)?;
        count(get(&row, "n")?)
    }

    async fn delete_trigger(&self, tenant: &str, name: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM triggers WHERE tenant = $1 AND name = $2")
            .bind(tenant)
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(E::classify)?;
        Ok(E::rows_affected(&done) == 1)
    }

    async fn set_trigger_paused(
        &self,
        tenant: &str,
        name: &str,
        paused: bool,
    ) -> StoreResult<Option<Trigger>> {
        let now = self.clock.now_ms();
        let done =
            sqlx::query("UPDATE triggers SET paused = $3, updated_at = $4 WHERE tenant = $1 AND name = $2")
                .bind(tenant)
                .bind(name)
                .bind(i64::from(paused))
                .bind(now)
                .execute(&self.pool)
                .await
                .map_err(E::classify)?;
        if E::rows_affected(&done) == 0 {
            return Ok(None);
        }
        self.get_trigger(tenant, name).await
    }

    async fn claim_triggers(&self, owner: &str, lease_ms: u64, take: u32) -> StoreResult<Vec<Trigger>> {
        let now = self.clock.now_ms();
        let until = now.saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX / 2));
        // Most nodes most of the time: nothing to renew or take. A read says so without the
        // write lock (SQLite's one writer is the queue's).
        let work = sqlx::query(
            "SELECT 1 AS some FROM triggers
             WHERE paused = 0 AND (owner = $1 OR owner IS NULL OR owner_until < $2) LIMIT 1",
        )
        .bind(owner)
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(E::classify)?;
        if work.is_none() {
            return Ok(Vec::new());
        }
        // Renewal: only what this node still holds (another may have taken an expired lease).
        sqlx::query("UPDATE triggers SET owner_until = $2 WHERE owner = $1 AND paused = 0")
            .bind(owner)
            .bind(until)
            .execute(&self.pool)
            .await
            .map_err(E::classify)?;
        // Taking: the outer condition is checked again on the row it locks (PostgreSQL re-reads
        // a row another transaction changed), so two nodes cannot both take one lease.
        sqlx::query(
            "UPDATE triggers SET owner = $1, owner_until = $2
             WHERE paused = 0 AND (owner IS NULL OR owner_until < $3) AND id IN (
                 SELECT id FROM triggers WHERE paused = 0 AND (owner IS NULL OR owner_until < $3)
                 ORDER BY id LIMIT $4)",
        )
        .bind(owner)
        .bind(until)
        .bind(now)
        .bind(i64::from(take))
        .execute(&self.pool)
        .await
        .map_err(E::classify)?;
        let held = sqlx::query(select_triggers!(
            "WHERE owner = $1 AND owner_until >= $2 AND paused = 0 ORDER BY id"
        ))
        .bind(owner)
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(E::classify)?;
        held.iter().map(trigger_from_row).collect()
    }

    async fn release_trigger(&self, id: i64, owner: &str) -> StoreResult<()> {
        sqlx::query("UPDATE triggers SET owner = NULL, owner_until = 0 WHERE id = $1 AND owner = $2")
            .bind(id)
            .bind(owner)
            .execute(&self.pool)
            .await
            .map_err(E::classify)?;
        Ok(())
    }

    async fn commit_trigger_batch(
        &self,
        id: i64,
        owner: &str,
        batch: &[NewInvocation],
        recent: Option<&str>,
    ) -> StoreResult<Option<u64>> {
        let now = self.clock.now_ms();
        let mut rows = Vec::with_capacity(batch.len());
        for inv in batch {
            assert!(
                inv.idempotency_key.as_ref().is_some_and(|k| k.caller == TRIGGER_CALLER),
                "a trigger's invocation carries its message's idempotency key"
            );
            rows.push(EnqueueOp::new(inv, now)?.row);
        }
        let op = TriggerBatchOp {
            id,
            owner: owner.to_owned(),
            now,
            rows: json_array(rows.iter().map(String::as_str)),
            count: batch.len() as i64,
            ordered: batch.iter().any(|inv| inv.in_order.is_some()),
            recent: recent.map(str::to_owned),
        };
        E::commit_trigger_batch(self, op).await
    }

    async fn trigger_progress(&self, id: i64, owner: &str, progress: &TriggerProgress) -> StoreResult<()> {
        let now = self.clock.now_ms();
        let opt = |v: Option<u64>| v.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
        sqlx::query(
            "UPDATE triggers SET lag = $3, acked_per_s = $4, last_error = COALESCE($5, last_error),
                 last_error_at = CASE WHEN $5 IS NULL THEN last_error_at ELSE $6 END
             WHERE id = $1 AND owner = $2",
        )
        .bind(id)
        .bind(owner)
        .bind(opt(progress.lag))
        .bind(opt(progress.acked_per_s))
        .bind(progress.error.clone())
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(E::classify)?;
        Ok(())
    }
}

/// The lease fence of a batch: locks the trigger's row, so a node taking the lease over waits
/// for this batch to commit, and this one sees its lease as the taker left it.
const FENCE: &str =
    "UPDATE triggers SET last_commit_at = $3 WHERE id = $1 AND owner = $2 AND owner_until >= $3";
/// The batch's counts, after its invocations.
const COUNT: &str = "UPDATE triggers SET received = received + $2, enqueued = enqueued + $3,
         duplicates = duplicates + $4, recent = COALESCE($5, recent)
     WHERE id = $1";

/// Commits a batch in the caller's transaction: the fence first, then the invocations (their
/// keys claimed, ordered keys released), then the counts. `None` if the lease is not this
/// owner's; then nothing is written.
pub(crate) async fn commit_batch_in<E: Engine>(
    tx: &mut Conn<E>,
    op: &TriggerBatchOp,
) -> StoreResult<Option<u64>>
where
    for<'c> &'c mut Conn<E>: Executor<'c, Database = E::DB>,
    for<'a> &'a str: Bind<E::DB>,
    Option<String>: Bind<E::DB>,
    i64: Bind<E::DB>,
{
    let fenced = sqlx::query(FENCE)
        .bind(op.id)
        .bind(op.owner.as_str())
        .bind(op.now)
        .execute(&mut *tx)
        .await
        .map_err(E::classify)?;
    if E::rows_affected(&fenced) == 0 {
        return Ok(None);
    }
    let inserted =
        if op.count == 0 { 0 } else { E::enqueue_in(tx, &op.rows, op.ordered.then_some(op.now)).await? };
    let inserted = to_i64(inserted)?;
    sqlx::query(COUNT)
        .bind(op.id)
        .bind(op.count)
        .bind(inserted)
        .bind(op.count - inserted)
        .bind(op.recent.clone())
        .execute(&mut *tx)
        .await
        .map_err(E::classify)?;
    Ok(Some(count(inserted)?))
}

/// [`commit_batch_in`] in a transaction of its own on the pool (PostgreSQL: any connection;
/// other nodes write beside it).
pub(crate) async fn commit_batch_on_pool<E: Engine>(
    store: &SqlStore<E>,
    op: TriggerBatchOp,
) -> StoreResult<Option<u64>>
where
    for<'c> &'c mut Conn<E>: Executor<'c, Database = E::DB>,
    for<'a> &'a str: Bind<E::DB>,
    Option<String>: Bind<E::DB>,
    i64: Bind<E::DB>,
{
    let mut tx = E::begin_write(&store.pool).await?;
    let committed = commit_batch_in::<E>(&mut tx, &op).await?;
    if committed.is_some() {
        tx.commit().await.map_err(E::classify)?;
    }
    Ok(committed)
}

fn to_i64(v: u64) -> StoreResult<i64> {
    i64::try_from(v).map_err(|_| StoreError::Conflict(format!("{v} is out of range")))
}

fn count(v: i64) -> StoreResult<u64> {
    u64::try_from(v).map_err(|_| corrupt(format!("negative count {v}")))
}

fn trigger_from_row(row: &impl StoreRow) -> StoreResult<Trigger> {
    let source: String = get(row, "source")?;
    let credentials: Option<String> = get(row, "credentials")?;
    let opt = |v: Option<i64>| v.map(count).transpose();
    Ok(Trigger {
        id: get(row, "id")?,
        tenant: get(row, "tenant")?,
        name: get(row, "name")?,
        function: get(row, "function")?,
        alias: get(row, "alias")?,
        source: serde_json::from_str(&source).map_err(|e| corrupt(format!("trigger source: {e}")))?,
        credentials: Credentials::from_stored(credentials.as_deref()),
        consumer: get(row, "consumer")?,
        path: get(row, "request_path")?,
        batch_max: u32::try_from(get::<i64, _>(row, "batch_max")?)
            .map_err(|_| corrupt("trigger batch_max"))?,
        window_ms: count(get(row, "window_ms")?)?,
        ordered: get::<i64, _>(row, "ordered")? != 0,
        paused: get::<i64, _>(row, "paused")? != 0,
        owner: get(row, "owner")?,
        owner_until: get(row, "owner_until")?,
        received: count(get(row, "received")?)?,
        enqueued: count(get(row, "enqueued")?)?,
        duplicates: count(get(row, "duplicates")?)?,
        lag: opt(get(row, "lag")?)?,
        acked_per_s: opt(get(row, "acked_per_s")?)?,
        last_error: get(row, "last_error")?,
        last_error_at: get(row, "last_error_at")?,
        last_commit_at: get(row, "last_commit_at")?,
        recent: get(row, "recent")?,
        created_at: get(row, "created_at")?,
        updated_at: get(row, "updated_at")?,
    })
}
