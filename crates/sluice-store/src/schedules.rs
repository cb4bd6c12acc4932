//! Schedules ([`Schedules`]): what each one fires and when, and the one transaction in which a
//! node enqueues a schedule's due occurrences and advances it ([`Schedules::fire_schedules`]).
//!
//! No node leads. Any node's ticker reads the due schedules, decides what to enqueue, and commits
//! it together with each schedule's new state, fenced by the `revision` it read: of two nodes that
//! read the same revision, one commits and the other changes nothing. A tick's firings go in one
//! transaction (one commit for hundreds of schedules); on PostgreSQL it first locks the rows it
//! fires with `SKIP LOCKED`, so two nodes ticking at once split the due schedules between them
//! instead of waiting on each other's locks. Each invocation also
//! carries the idempotency key `sched:{id}:{scheduled_for}` (caller [`SCHEDULE_CALLER`]), claimed
//! in the same transaction, so even a second enqueue of one occurrence by another path (a
//! backfill over fired occurrences) stores nothing.

use std::collections::HashSet;

use sluice_core::schedule::When;
use sluice_core::{Catchup, Overlap, UnixMs};
use sqlx::Executor;

use crate::queue::{EnqueueOp, json_array};
use crate::rows::{StoreRow, get, headers_from_json};
use crate::sql::{Bind, Conn, Engine, SqlStore};
use crate::{NewInvocation, StoreError, StoreResult, corrupt};

/// The caller of a schedule's idempotency keys: no API key id takes this form, so no caller's
/// own `Idempotency-Key` can collide with a schedule's.
pub const SCHEDULE_CALLER: &str = "schedule";

/// The idempotency key of a schedule's occurrence.
pub fn schedule_key(id: i64, scheduled_for: UnixMs) -> String {
    format!("sched:{id}:{scheduled_for}")
}

/// What `schedules create` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSchedule {
    pub tenant: String,
    pub name: String,
    pub function: String,
    pub alias: String,
    pub when: When,
    pub flex_ms: u64,
    pub overlap: Overlap,
    pub catchup: Catchup,
    /// The request's path below the function, with its query (`/report?x=1`).
    pub path: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// Its first occurrence (computed by the caller from its clock); `None`: never fires.
    pub next_fire_at: Option<UnixMs>,
}

/// A schedule as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub id: i64,
    pub tenant: String,
    pub name: String,
    pub function: String,
    pub alias: String,
    pub when: When,
    pub flex_ms: u64,
    pub overlap: Overlap,
    pub catchup: Catchup,
    pub path: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub paused: bool,
    /// The next occurrence not yet handled; `None` once a one-time schedule fired.
    pub next_fire_at: Option<UnixMs>,
    /// `buffer-one`: an occurrence waiting for the previous invocation to finish.
    pub buffered_for: Option<UnixMs>,
    pub last_fired_for: Option<UnixMs>,
    pub last_invocation: Option<String>,
    /// Invocations enqueued, and occurrences skipped (overlap, catch-up, quota, no version).
    pub fires: u64,
    pub skipped: u64,
    /// Why the last occurrence skipped for a reason other than the policies, if it did.
    pub last_error: Option<String>,
    pub revision: i64,
    pub created_at: UnixMs,
    pub updated_at: UnixMs,
}

/// What one node decided for a due schedule: committed only if the schedule is still at
/// `revision` and not paused.
#[derive(Debug, Clone)]
pub struct Firing {
    pub id: i64,
    pub revision: i64,
    pub next_fire_at: Option<UnixMs>,
    pub buffered_for: Option<UnixMs>,
    /// The invocations to enqueue, each with its occurrence, oldest first. Their idempotency keys
    /// must be the schedule's ([`schedule_key`], caller [`SCHEDULE_CALLER`]).
    pub enqueue: Vec<(UnixMs, NewInvocation)>,
    pub skipped: u64,
    pub last_error: Option<String>,
}

/// What [`Schedules::fire_schedules`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fired {
    /// Per firing, in order: whether it committed.
    pub committed: Vec<bool>,
    /// Invocations stored, over all the firings.
    pub inserted: u64,
}

store_trait! {
    /// Schedules.
    pub trait Schedules {
        /// Creates a schedule of an existing function: `NotFound` for an unknown function,
        /// `Conflict` for a name the tenant uses already.
        async fn create_schedule(&self, new: &NewSchedule) -> StoreResult<Schedule>;
        async fn get_schedule(&self, tenant: &str, name: &str) -> StoreResult<Option<Schedule>>;
        /// A tenant's schedules by name.
        async fn list_schedules(&self, tenant: &str) -> StoreResult<Vec<Schedule>>;
        async fn count_schedules(&self, tenant: &str) -> StoreResult<u64>;
        /// `false` if there was no such schedule. An occurrence fired ahead (its invocation still
        /// queued, not yet runnable) is taken back with it.
        async fn delete_schedule(&self, tenant: &str, name: &str) -> StoreResult<bool>;
        /// Pauses, or resumes from `next_fire_at` (a paused schedule misses nothing: the caller
        /// passes the first occurrence after now). Drops a buffered occurrence. Pausing takes
        /// back an occurrence fired ahead whose invocation is still queued and not yet runnable
        /// (its invocation and its idempotency key are deleted, and it becomes the next
        /// occurrence again). `None` if there is no such schedule.
        async fn set_schedule_paused(
            &self,
            tenant: &str,
            name: &str,
            paused: bool,
            next_fire_at: Option<UnixMs>,
        ) -> StoreResult<Option<Schedule>>;
        /// Schedules not paused whose next occurrence is at or before `now`, or that hold a
        /// buffered occurrence, or that may fire their next occurrence ahead: it is at or before
        /// `ahead_until`, none is fired ahead already (`last_fired_for` not after `now`), none is
        /// buffered, and the overlap policy lets it fire now (`allow`, or the previous
        /// occurrence's invocation finished or gone). At most `limit`: the oldest second first,
        /// and within a second in the order `spread` gives (by `id * spread` modulo a prime; 1 is
        /// id order). Nodes that tick together with different spreads start on different
        /// schedules, rather than all on the same first `limit` (which only one of them could
        /// fire).
        async fn due_schedules(
            &self,
            now: UnixMs,
            ahead_until: UnixMs,
            limit: u32,
            spread: u32,
        ) -> StoreResult<Vec<Schedule>>;
        /// Commits [`Firing`]s: each schedule's new state and its invocations, all in one
        /// transaction. A firing changes nothing if another node fires (or has fired) its
        /// schedule, or it was paused, changed or deleted since it was read. Returns which
        /// firings committed, and how many invocations were stored (an occurrence whose key is
        /// held already is not stored again).
        async fn fire_schedules(&self, firings: &[Firing]) -> StoreResult<Fired>;
        /// Enqueues occurrences of a schedule outside its timetable (`backfill`), with the
        /// schedule's keys, in one transaction: returns how many were stored (occurrences fired
        /// within the idempotency window are not stored again).
        async fn backfill_schedule(&self, id: i64, enqueue: &[(UnixMs, NewInvocation)]) -> StoreResult<u64>;
    }
}

macro_rules! select_schedules {
    ($rest:literal) => {
        concat!(
            "SELECT id, tenant, name, function, alias, cron, tz, every_ms, at, flex_ms, overlap, catchup, \
             request_path, request_headers, request_body, paused, next_fire_at, buffered_for, last_fired_for, \
             last_invocation, fires, skipped, last_error, revision, created_at, updated_at FROM schedules ",
            $rest
        )
    };
}

#[async_trait::async_trait]
impl<E: Engine> Schedules for SqlStore<E>
where
    for<'c> &'c mut Conn<E>: Executor<'c, Database = E::DB>,
    for<'a> &'a str: Bind<E::DB>,
    Option<String>: Bind<E::DB>,
    Option<i64>: Bind<E::DB>,
    Vec<u8>: Bind<E::DB>,
    i64: Bind<E::DB>,
{
    async fn create_schedule(&self, new: &NewSchedule) -> StoreResult<Schedule> {
        let now = self.clock.now_ms();
        let (cron, tz, every_ms, at) = match &new.when {
            When::Cron { expr, tz } => (Some(expr.clone()), Some(tz.clone()), None, None),
            When::Every { every_ms } => (None, None, Some(to_i64(*every_ms)?), None),
            When::At { at } => (None, None, None, Some(*at)),
        };
        let headers = serde_json::to_string(
            &new.headers.iter().map(|(n, v)| (n.as_str(), hex::encode(v))).collect::<Vec<_>>(),
        )
        .map_err(|e| StoreError::Other(format!("encoding headers: {e}")))?;
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
            "INSERT INTO schedules (tenant, name, function, alias, cron, tz, every_ms, at, flex_ms, overlap,
                 catchup, request_path, request_headers, request_body, next_fire_at, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $16) RETURNING id",
        )
        .bind(new.tenant.as_str())
        .bind(new.name.as_str())
        .bind(new.function.as_str())
        .bind(new.alias.as_str())
        .bind(cron)
        .bind(tz)
        .bind(every_ms)
        .bind(at)
        .bind(to_i64(new.flex_ms)?)
        .bind(new.overlap.as_str())
        .bind(new.catchup.as_str())
        .bind(new.path.as_str())
        .bind(headers.as_str())
        .bind(new.body.clone())
        .bind(new.next_fire_at)
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(E::classify)
        .map_err(|e| match e {
            StoreError::Conflict(_) => {
                StoreError::Conflict(format!("tenant {} has a schedule {} already", new.tenant, new.name))
            }
            other => other,
        })?;
        let id: i64 = get(&row, "id")?;
        let created = select_by_id::<E>(&mut tx, id).await?;
        tx.commit().await.map_err(E::classify)?;
        created.ok_or_else(|| corrupt(format!("schedule {id} vanished in its own transaction")))
    }

    async fn get_schedule(&self, tenant: &str, name: &str) -> StoreResult<Option<Schedule>> {
        let found = sqlx::query(select_schedules!("WHERE tenant = $1 AND name = $2"))
            .bind(tenant)
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(E::classify)?;
        found.as_ref().map(schedule_from_row).transpose()
    }

    async fn list_schedules(&self, tenant: &str) -> StoreResult<Vec<Schedule>> {
        let found = sqlx::query(select_schedules!("WHERE tenant = $1 ORDER BY name"))
            .bind(tenant)
            .fetch_all(&self.pool)
            .await
            .map_err(E::classify)?;
        found.iter().map(schedule_from_row).collect()
    }

    async fn count_schedules(&self, tenant: &str) -> StoreResult<u64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM schedules WHERE tenant = $1")
            .bind(tenant)
            .fetch_one(&self.pool)
            .await
            .map_err(E::classify)?;
        count(get(&row, "n")?)
    }

    async fn delete_schedule(&self, tenant: &str, name: &str) -> StoreResult<bool> {
        let now = self.clock.now_ms();
        let mut tx = E::begin_write(&self.pool).await?;
        take_back_ahead::<E>(&mut tx, tenant, name, now).await?;
        let done = sqlx::query("DELETE FROM schedules WHERE tenant = $1 AND name = $2")
            .bind(tenant)
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(E::classify)?;
        tx.commit().await.map_err(E::classify)?;
        Ok(E::rows_affected(&done) == 1)
    }

    async fn set_schedule_paused(
        &self,
        tenant: &str,
        name: &str,
        paused: bool,
        next_fire_at: Option<UnixMs>,
    ) -> StoreResult<Option<Schedule>> {
        let now = self.clock.now_ms();
        let mut tx = E::begin_write(&self.pool).await?;
        if paused && let Some(taken) = take_back_ahead::<E>(&mut tx, tenant, name, now).await? {
            // The occurrence taken back is the next one again (show says it; resume replaces it).
            sqlx::query(
                "UPDATE schedules SET next_fire_at = $3, fires = fires - 1, last_fired_for = NULL,
                     last_invocation = NULL
                 WHERE tenant = $1 AND name = $2",
            )
            .bind(tenant)
            .bind(name)
            .bind(taken)
            .execute(&mut *tx)
            .await
            .map_err(E::classify)?;
        }
        // Pausing keeps the next occurrence (show still says it); resuming replaces it.
        let done = sqlx::query(
            "UPDATE schedules SET paused = $3, buffered_for = NULL, revision = revision + 1, updated_at = $5,
                 next_fire_at = CASE WHEN $3 = 1 THEN next_fire_at ELSE $4 END
             WHERE tenant = $1 AND name = $2",
        )
        .bind(tenant)
        .bind(name)
        .bind(i64::from(paused))
        .bind(next_fire_at)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(E::classify)?;
        if E::rows_affected(&done) == 0 {
            return Ok(None);
        }
        let found = sqlx::query(select_schedules!("WHERE tenant = $1 AND name = $2"))
            .bind(tenant)
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(E::classify)?;
        tx.commit().await.map_err(E::classify)?;
        found.as_ref().map(schedule_from_row).transpose()
    }

    async fn due_schedules(
        &self,
        now: UnixMs,
        ahead_until: UnixMs,
        limit: u32,
        spread: u32,
    ) -> StoreResult<Vec<Schedule>> {
        // Two index scans: by next occurrence (up to `ahead_until`), and the few with a buffered
        // one; then a sort of what is due (ids and the prime below stay far from overflowing 64
        // bits). Of those due only ahead, the ones fired ahead already or whose overlap policy
        // holds them are left out here, one primary-key read each at most, rather than
        // read again by every tick until they are due.
        let found = sqlx::query(select_schedules!(
            "WHERE paused = 0 AND (
                 next_fire_at <= $4 AND (
                     next_fire_at <= $1
                     OR (buffered_for IS NULL AND (last_fired_for IS NULL OR last_fired_for <= $1)
                         AND (overlap = 'allow' OR last_invocation IS NULL OR NOT EXISTS (
                             SELECT 1 FROM invocations i WHERE i.id = schedules.last_invocation
                             AND i.status NOT IN ('succeeded', 'dead', 'expired'))))
                 )
                 OR buffered_for IS NOT NULL)
             ORDER BY COALESCE(buffered_for, next_fire_at) / 1000, (id % 1000003) * $3 % 1000003, id
             LIMIT $2"
        ))
        .bind(now)
        .bind(i64::from(limit))
        .bind(i64::from(spread))
        .bind(ahead_until.max(now))
        .fetch_all(&self.pool)
        .await
        .map_err(E::classify)?;
        found.iter().map(schedule_from_row).collect()
    }

    async fn fire_schedules(&self, firings: &[Firing]) -> StoreResult<Fired> {
        let mut fired = Fired { committed: vec![false; firings.len()], inserted: 0 };
        if firings.is_empty() {
            return Ok(fired);
        }
        let now = self.clock.now_ms();
        let ids = serde_json::to_string(&firings.iter().map(|f| f.id).collect::<Vec<_>>())
            .map_err(|e| StoreError::Other(format!("encoding schedule ids: {e}")))?;
        let mut tx = E::begin_write(&self.pool).await?;
        let locked = sqlx::query(E::LOCK_SCHEDULES)
            .bind(ids.as_str())
            .fetch_all(&mut *tx)
            .await
            .map_err(E::classify)?;
        let locked: HashSet<i64> =
            locked.iter().map(|row| get::<i64, _>(row, "id")).collect::<StoreResult<_>>()?;
        // Not locked: another node is firing it right now.
        let mine: Vec<&Firing> = firings.iter().filter(|f| locked.contains(&f.id)).collect();
        let advanced =
            if mine.is_empty() { HashSet::new() } else { fire_all::<E>(&mut tx, &mine, now).await? };
        let mut rows = Vec::new();
        for (i, firing) in firings.iter().enumerate() {
            if advanced.contains(&firing.id) {
                fired.committed[i] = true;
                rows.extend(enqueue_rows(firing.id, &firing.enqueue, now)?);
            }
        }
        if !rows.is_empty() {
            fired.inserted =
                E::enqueue_in(&mut tx, &json_array(rows.iter().map(String::as_str)), None).await?;
        }
        tx.commit().await.map_err(E::classify)?;
        Ok(fired)
    }

    async fn backfill_schedule(&self, id: i64, enqueue: &[(UnixMs, NewInvocation)]) -> StoreResult<u64> {
        let now = self.clock.now_ms();
        let rows = enqueue_rows(id, enqueue, now)?;
        let mut tx = E::begin_write(&self.pool).await?;
        let inserted = if rows.is_empty() {
            0
        } else {
            E::enqueue_in(&mut tx, &json_array(rows.iter().map(String::as_str)), None).await?
        };
        let done = sqlx::query("UPDATE schedules SET fires = fires + $2, updated_at = $3 WHERE id = $1")
            .bind(id)
            .bind(to_i64(inserted)?)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(E::classify)?;
        if E::rows_affected(&done) == 0 {
            return Err(StoreError::NotFound(format!("schedule {id}")));
        }
        tx.commit().await.map_err(E::classify)?;
        Ok(inserted)
    }
}

/// The firings' fenced updates, in one statement ([`Engine::FIRE_SCHEDULES`]): whoever commits
/// first bumps a schedule's revision, and every other firing of the same read finds no row and
/// changes nothing. Returns the schedules it advanced.
async fn fire_all<E: Engine>(tx: &mut Conn<E>, firings: &[&Firing], now: UnixMs) -> StoreResult<HashSet<i64>>
where
    for<'c> &'c mut Conn<E>: Executor<'c, Database = E::DB>,
    for<'a> &'a str: Bind<E::DB>,
    i64: Bind<E::DB>,
{
    #[derive(serde::Serialize)]
    struct Row<'a> {
        id: i64,
        revision: i64,
        next_fire_at: Option<UnixMs>,
        buffered_for: Option<UnixMs>,
        last_fired_for: Option<UnixMs>,
        last_invocation: Option<&'a str>,
        fires: i64,
        skipped: i64,
        last_error: Option<&'a str>,
    }
    let rows = firings
        .iter()
        .map(|f| {
            let last = f.enqueue.last();
            Ok(Row {
                id: f.id,
                revision: f.revision,
                next_fire_at: f.next_fire_at,
                buffered_for: f.buffered_for,
                last_fired_for: last.map(|(t, _)| *t),
                last_invocation: last.map(|(_, inv)| inv.id.as_str()),
                fires: f.enqueue.len() as i64,
                skipped: to_i64(f.skipped)?,
                last_error: f.last_error.as_deref(),
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
    let rows =
        serde_json::to_string(&rows).map_err(|e| StoreError::Other(format!("encoding firings: {e}")))?;
    let advanced = sqlx::query(E::FIRE_SCHEDULES)
        .bind(rows.as_str())
        .bind(now)
        .fetch_all(&mut *tx)
        .await
        .map_err(E::classify)?;
    advanced.iter().map(|row| get::<i64, _>(row, "id")).collect()
}

/// Takes back the occurrence a schedule fired ahead, if its invocation is still queued and not
/// yet runnable (`run_after` after `now`): deletes the invocation and its idempotency key (so
/// that firing the occurrence again, after a resume, stores it). Returns the occurrence taken
/// back. An invocation already runnable, running or finished has fired: it stays.
async fn take_back_ahead<E: Engine>(
    tx: &mut Conn<E>,
    tenant: &str,
    name: &str,
    now: UnixMs,
) -> StoreResult<Option<UnixMs>>
where
    for<'c> &'c mut Conn<E>: Executor<'c, Database = E::DB>,
    for<'a> &'a str: Bind<E::DB>,
    i64: Bind<E::DB>,
{
    let row = sqlx::query(
        "SELECT id, function, last_fired_for, last_invocation FROM schedules
         WHERE tenant = $1 AND name = $2 AND last_fired_for > $3 AND last_invocation IS NOT NULL",
    )
    .bind(tenant)
    .bind(name)
    .bind(now)
    .fetch_optional(&mut *tx)
    .await
    .map_err(E::classify)?;
    let Some(row) = row else { return Ok(None) };
    let (id, function, occurrence, invocation): (i64, String, i64, String) = (
        get(&row, "id")?,
        get(&row, "function")?,
        get(&row, "last_fired_for")?,
        get(&row, "last_invocation")?,
    );
    let deleted =
        sqlx::query("DELETE FROM invocations WHERE id = $1 AND status = 'queued' AND run_after > $2")
            .bind(invocation.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(E::classify)?;
    if E::rows_affected(&deleted) == 0 {
        return Ok(None);
    }
    sqlx::query(
        "DELETE FROM idempotency_keys
         WHERE tenant = $1 AND function = $2 AND caller = $3 AND idempotency_key = $4",
    )
    .bind(tenant)
    .bind(function.as_str())
    .bind(SCHEDULE_CALLER)
    .bind(schedule_key(id, occurrence).as_str())
    .execute(&mut *tx)
    .await
    .map_err(E::classify)?;
    Ok(Some(occurrence))
}

/// The enqueue rows (as the queue's writer encodes them) of a schedule's occurrences, after
/// checking that each carries the schedule's key: a firing without them could fire twice.
fn enqueue_rows(id: i64, enqueue: &[(UnixMs, NewInvocation)], now: UnixMs) -> StoreResult<Vec<String>> {
    let mut rows = Vec::with_capacity(enqueue.len());
    for (scheduled_for, inv) in enqueue {
        let key = inv.idempotency_key.as_ref();
        assert!(
            key.is_some_and(|k| k.caller == SCHEDULE_CALLER && k.key == schedule_key(id, *scheduled_for)),
            "a schedule's invocation carries the schedule's idempotency key"
        );
        rows.push(EnqueueOp::new(inv, now)?.row);
    }
    Ok(rows)
}

async fn select_by_id<E: Engine>(tx: &mut Conn<E>, id: i64) -> StoreResult<Option<Schedule>>
where
    for<'c> &'c mut Conn<E>: Executor<'c, Database = E::DB>,
    i64: Bind<E::DB>,
{
    let found = sqlx::query(select_schedules!("WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(E::classify)?;
    found.as_ref().map(schedule_from_row).transpose()
}

fn to_i64(v: u64) -> StoreResult<i64> {
    i64::try_from(v).map_err(|_| StoreError::Conflict(format!("{v} is out of range")))
}

fn count(v: i64) -> StoreResult<u64> {
    u64::try_from(v).map_err(|_| corrupt(format!("negative count {v}")))
}

fn schedule_from_row(row: &impl StoreRow) -> StoreResult<Schedule> {
    let cron: Option<String> = get(row, "cron")?;
    let every_ms: Option<i64> = get(row, "every_ms")?;
    let at: Option<i64> = get(row, "at")?;
    let when = match (cron, every_ms, at) {
        (Some(expr), None, None) => {
            When::Cron { expr, tz: get::<Option<String>, _>(row, "tz")?.unwrap_or_else(|| "UTC".into()) }
        }
        (None, Some(every), None) => When::Every { every_ms: count(every)? },
        (None, None, Some(at)) => When::At { at },
        _ => return Err(corrupt("a schedule without exactly one of cron, every_ms, at")),
    };
    let overlap: String = get(row, "overlap")?;
    let catchup: String = get(row, "catchup")?;
    let headers: String = get(row, "request_headers")?;
    Ok(Schedule {
        id: get(row, "id")?,
        tenant: get(row, "tenant")?,
        name: get(row, "name")?,
        function: get(row, "function")?,
        alias: get(row, "alias")?,
        when,
        flex_ms: count(get(row, "flex_ms")?)?,
        overlap: overlap.parse().map_err(|e| corrupt(format!("schedule overlap: {e}")))?,
        catchup: catchup.parse().map_err(|e| corrupt(format!("schedule catchup: {e}")))?,
        path: get(row, "request_path")?,
        headers: headers_from_json(&headers)?,
        body: get(row, "request_body")?,
        paused: get::<i64, _>(row, "paused")? != 0,
        next_fire_at: get(row, "next_fire_at")?,
        buffered_for: get(row, "buffered_for")?,
        last_fired_for: get(row, "last_fired_for")?,
        last_invocation: get(row, "last_invocation")?,
        fires: count(get(row, "fires")?)?,
        skipped: count(get(row, "skipped")?)?,
        last_error: get(row, "last_error")?,
        revision: get(row, "revision")?,
        created_at: get(row, "created_at")?,
        updated_at: get(row, "updated_at")?,
    })
}
