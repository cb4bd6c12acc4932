//! Automatic rollouts of an alias ([`Rollouts`]): their state, fenced like a lease so one node at
//! a time advances each, and the calls and errors every node counted per step. The alias moves
//! happen in the same transaction as the rollout's own change, so the alias and the rollout never
//! disagree after a crash.

use sluice_core::alias::Route;
use sluice_core::{RolloutStatus, UnixMs};
use sqlx::Executor;

use crate::code::{replace_alias, touch_function};
use crate::rows::{StoreRow, get};
use crate::sql::{Bind, Conn, Engine, SqlStore};
use crate::{StoreError, StoreResult, corrupt};

/// What `rollout start` asks for. The stable version is whatever the alias names when it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRollout {
    pub tenant: String,
    pub function: String,
    pub alias: String,
    pub canary_version: i64,
    /// The canary's percent at each step: rising, each 1 to 100, the last 100.
    pub steps: Vec<u32>,
    pub every_ms: u64,
    /// Basis points (1% = 100) the canary's error rate may exceed the stable version's by.
    pub margin_bp: u32,
    /// Canary calls a step needs before it is judged; fewer and the step waits.
    pub min_calls: u64,
}

/// A rollout as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    pub id: i64,
    pub tenant: String,
    pub function: String,
    pub alias: String,
    pub stable_version: i64,
    pub canary_version: i64,
    pub steps: Vec<u32>,
    /// Index into `steps` of the step running (or the last one run).
    pub step: usize,
    pub every_ms: u64,
    pub margin_bp: u32,
    pub min_calls: u64,
    pub status: RolloutStatus,
    /// Why it ended, for every end but `promoted`.
    pub reason: Option<String>,
    /// The node advancing it, while `owner_until` (unix ms) has not passed.
    pub owner: Option<String>,
    pub owner_until: UnixMs,
    pub created_at: UnixMs,
    pub updated_at: UnixMs,
}

impl Rollout {
    /// The alias's routes while step `step` runs.
    pub fn routes_at(&self, step: usize) -> Vec<Route> {
        split(self.stable_version, self.canary_version, self.steps[step])
    }
}

/// The alias's routes with `percent` of its calls on the canary.
fn split(stable: i64, canary: i64, percent: u32) -> Vec<Route> {
    if percent >= 100 {
        return vec![Route { version: canary, weight: 100 }];
    }
    vec![Route { version: canary, weight: percent }, Route { version: stable, weight: 100 - percent }]
}

/// Calls and errors (5xx answers and failed calls) of the two versions during one step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepCounts {
    pub canary_calls: u64,
    pub canary_errors: u64,
    pub stable_calls: u64,
    pub stable_errors: u64,
}

impl StepCounts {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// One step of a rollout, with what every node counted during it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutStep {
    pub step: usize,
    pub percent: u32,
    pub started_at: UnixMs,
    pub counts: StepCounts,
}

/// Where [`Rollouts::move_rollout`] takes a running rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutMove {
    /// To step `n` (its alias weights, and a fresh count).
    Step(usize),
    /// To an end: `promoted` leaves the alias on the canary, any other end on the stable version.
    End { status: RolloutStatus, reason: Option<String> },
}

store_trait! {
    /// Automatic rollouts.
    pub trait Rollouts {
        /// Starts a rollout of `new.alias` and moves the alias to its first step, in one
        /// transaction. The stable version is the one version the alias names; `Conflict` when it
        /// is split, already names the canary, or has a rollout running; `NotFound` for an unknown
        /// function or version.
        async fn start_rollout(&self, new: &NewRollout) -> StoreResult<Rollout>;
        /// The newest rollout of an alias, running or ended.
        async fn latest_rollout(&self, tenant: &str, function: &str, alias: &str) -> StoreResult<Option<Rollout>>;
        /// Every running rollout.
        async fn running_rollouts(&self) -> StoreResult<Vec<Rollout>>;
        /// A rollout's steps so far, in order.
        async fn rollout_steps(&self, id: i64) -> StoreResult<Vec<RolloutStep>>;
        /// Adds what a node counted to step `step` of a rollout (nothing if the step has no row).
        async fn add_rollout_counts(&self, id: i64, step: usize, counts: StepCounts) -> StoreResult<()>;
        /// Makes `owner` the node that advances a running rollout until `lease_ms` from now, in
        /// one statement: `true` if it was free, expired or already `owner`'s.
        async fn claim_rollout(&self, id: i64, owner: &str, lease_ms: u64) -> StoreResult<bool>;
        /// Moves a running rollout and its alias, fenced: with `owner`, only while that node holds
        /// it; without (a cancel), whoever holds it. `None` if it was not running or not the
        /// owner's (nothing changed).
        async fn move_rollout(&self, id: i64, owner: Option<&str>, to: RolloutMove) -> StoreResult<Option<Rollout>>;
    }
}

/// `SELECT` of every rollout column, then `$rest` (a literal, so the statement stays static).
macro_rules! select_rollouts {
    ($rest:literal) => {
        concat!(
            "SELECT id, tenant, function, alias, stable_version, canary_version, steps, step, every_ms, \
             margin_bp, min_calls, status, reason, owner, owner_until, created_at, updated_at FROM rollouts ",
            $rest
        )
    };
}

#[async_trait::async_trait]
impl<E: Engine> Rollouts for SqlStore<E>
where
    for<'c> &'c mut Conn<E>: Executor<'c, Database = E::DB>,
    for<'a> &'a str: Bind<E::DB>,
    Option<String>: Bind<E::DB>,
    i64: Bind<E::DB>,
{
    async fn start_rollout(&self, new: &NewRollout) -> StoreResult<Rollout> {
        check_steps(&new.steps).map_err(StoreError::Conflict)?;
        let now = self.clock.now_ms();
        let (tenant, function, alias) = (new.tenant.as_str(), new.function.as_str(), new.alias.as_str());
        let mut tx = E::begin_write(&self.pool).await?;
        touch_function::<E>(&mut tx, tenant, function, now).await?;
        // Said first: while a rollout runs, its alias is split, which would be the less useful
        // refusal. The unique index still decides between two concurrent starts.
        let running = sqlx::query(
            "SELECT id FROM rollouts WHERE tenant = $1 AND function = $2 AND alias = $3 AND status = 'running'",
        )
        .bind(tenant)
        .bind(function)
        .bind(alias)
        .fetch_optional(&mut *tx)
        .await
        .map_err(E::classify)?;
        if running.is_some() {
            return Err(running_conflict(alias, function));
        }
        let named =
            sqlx::query("SELECT version FROM aliases WHERE tenant = $1 AND function = $2 AND name = $3")
                .bind(tenant)
                .bind(function)
                .bind(alias)
                .fetch_all(&mut *tx)
                .await
                .map_err(E::classify)?;
        let stable: i64 = match named.as_slice() {
            [] => return Err(StoreError::NotFound(format!("alias {alias} of function {function}"))),
            [one] => get(one, "version")?,
            _ => {
                return Err(StoreError::Conflict(format!(
                    "alias {alias} is split over {} versions: point it at one version before a rollout",
                    named.len()
                )));
            }
        };
        if stable == new.canary_version {
            return Err(StoreError::Conflict(format!(
                "alias {alias} already names version {stable}: there is nothing to roll out"
            )));
        }
        let steps_text = new.steps.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let row = sqlx::query(
            "INSERT INTO rollouts (tenant, function, alias, stable_version, canary_version, steps, step,
                 every_ms, margin_bp, min_calls, status, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $8, $9, 'running', $10, $10) RETURNING id",
        )
        .bind(tenant)
        .bind(function)
        .bind(alias)
        .bind(stable)
        .bind(new.canary_version)
        .bind(steps_text.as_str())
        .bind(i64::try_from(new.every_ms).map_err(|_| StoreError::Conflict("every_ms too large".into()))?)
        .bind(i64::from(new.margin_bp))
        .bind(i64::try_from(new.min_calls).map_err(|_| StoreError::Conflict("min_calls too large".into()))?)
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(E::classify)
        .map_err(|e| match e {
            StoreError::Conflict(_) => running_conflict(alias, function),
            other => other,
        })?;
        let id: i64 = get(&row, "id")?;
        insert_step::<E>(&mut tx, id, 0, new.steps[0], now).await?;
        replace_alias::<E>(
            &mut tx,
            tenant,
            function,
            alias,
            &split(stable, new.canary_version, new.steps[0]),
            now,
        )
        .await?;
        let started = select_one::<E>(&mut tx, id).await?;
        tx.commit().await.map_err(E::classify)?;
        started.ok_or_else(|| corrupt(format!("rollout {id} vanished in its own transaction")))
    }

    async fn latest_rollout(
        &self,
        tenant: &str,
        function: &str,
        alias: &str,
    ) -> StoreResult<Option<Rollout>> {
        let found = sqlx::query(select_rollouts!(
            "WHERE tenant = $1 AND function = $2 AND alias = $3 ORDER BY id DESC LIMIT 1"
        ))
        .bind(tenant)
        .bind(function)
        .bind(alias)
        .fetch_optional(&self.pool)
        .await
        .map_err(E::classify)?;
        found.as_ref().map(rollout_from_row).transpose()
    }

    async fn running_rollouts(&self) -> StoreResult<Vec<Rollout>> {
        let found = sqlx::query(select_rollouts!("WHERE status = 'running' ORDER BY id"))
            .fetch_all(&self.pool)
            .await
            .map_err(E::classify)?;
        found.iter().map(rollout_from_row).collect()
    }

    async fn rollout_steps(&self, id: i64) -> StoreResult<Vec<RolloutStep>> {
        let found = sqlx::query(
            "SELECT step, percent, started_at, canary_calls, canary_errors, stable_calls, stable_errors
             FROM rollout_steps WHERE rollout = $1 ORDER BY step",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(E::classify)?;
        found
            .iter()
            .map(|row| {
                Ok(RolloutStep {
                    step: count(get(row, "step")?)? as usize,
                    percent: u32::try_from(get::<i64, _>(row, "percent")?)
                        .map_err(|_| corrupt("step percent"))?,
                    started_at: get(row, "started_at")?,
                    counts: StepCounts {
                        canary_calls: count(get(row, "canary_calls")?)?,
                        canary_errors: count(get(row, "canary_errors")?)?,
                        stable_calls: count(get(row, "stable_calls")?)?,
                        stable_errors: count(get(row, "stable_errors")?)?,
                    },
                })
            })
            .collect()
    }

    async fn add_rollout_counts(&self, id: i64, step: usize, counts: StepCounts) -> StoreResult<()> {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        sqlx::query(
            "UPDATE rollout_steps SET canary_calls = canary_calls + $3, canary_errors = canary_errors + $4,
                 stable_calls = stable_calls + $5, stable_errors = stable_errors + $6
             WHERE rollout = $1 AND step = $2",
        )
        .bind(id)
        .bind(step as i64)
        .bind(n(counts.canary_calls))
        .bind(n(counts.canary_errors))
        .bind(n(counts.stable_calls))
        .bind(n(counts.stable_errors))
        .execute(&self.pool)
        .await
        .map_err(E::classify)?;
        Ok(())
    }

    async fn claim_rollout(&self, id: i64, owner: &str, lease_ms: u64) -> StoreResult<bool> {
        let now = self.clock.now_ms();
        let until = now.saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX / 2));
        // One statement decides: two nodes that both see the lease expired cannot both take it.
        let done = sqlx::query(
            "UPDATE rollouts SET owner = $2, owner_until = $3
             WHERE id = $1 AND status = 'running' AND (owner IS NULL OR owner = $2 OR owner_until < $4)",
        )
        .bind(id)
        .bind(owner)
        .bind(until)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(E::classify)?;
        Ok(E::rows_affected(&done) == 1)
    }

    async fn move_rollout(
        &self,
        id: i64,
        owner: Option<&str>,
        to: RolloutMove,
    ) -> StoreResult<Option<Rollout>> {
        let now = self.clock.now_ms();
        let mut tx = E::begin_write(&self.pool).await?;
        let Some(current) = select_one::<E>(&mut tx, id).await? else { return Ok(None) };
        let fenced_out =
            owner.is_some_and(|o| current.owner.as_deref() != Some(o) || current.owner_until < now);
        if current.status != RolloutStatus::Running || fenced_out {
            return Ok(None);
        }
        // Locks the function row (and notifies other nodes) before the rollout row is rewritten,
        // in the order `set_alias` takes them.
        touch_function::<E>(&mut tx, &current.tenant, &current.function, now).await?;
        let (step, status, reason, routes) = match &to {
            RolloutMove::Step(n) => {
                let percent =
                    *current.steps.get(*n).ok_or_else(|| corrupt(format!("rollout {id} step {n}")))?;
                insert_step::<E>(&mut tx, id, *n, percent, now).await?;
                (*n, RolloutStatus::Running, None, current.routes_at(*n))
            }
            RolloutMove::End { status: RolloutStatus::Promoted, reason } => {
                // The promotion is the last step (100%): it gets its row, so status shows it.
                let last = current.steps.len() - 1;
                if current.step != last {
                    insert_step::<E>(&mut tx, id, last, current.steps[last], now).await?;
                }
                let routes = vec![Route { version: current.canary_version, weight: 100 }];
                (last, RolloutStatus::Promoted, reason.clone(), routes)
            }
            RolloutMove::End { status, reason } => {
                let routes = vec![Route { version: current.stable_version, weight: 100 }];
                (current.step, *status, reason.clone(), routes)
            }
        };
        // The row was read in this writing transaction; the status in the WHERE keeps a racing
        // cancel (PostgreSQL reads committed) from being overwritten.
        let done = sqlx::query(
            "UPDATE rollouts SET step = $2, status = $3, reason = $4, updated_at = $5
             WHERE id = $1 AND status = 'running'",
        )
        .bind(id)
        .bind(step as i64)
        .bind(status.as_str())
        .bind(reason.clone())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(E::classify)?;
        if E::rows_affected(&done) == 0 {
            return Ok(None);
        }
        replace_alias::<E>(&mut tx, &current.tenant, &current.function, &current.alias, &routes, now).await?;
        let moved = select_one::<E>(&mut tx, id).await?;
        tx.commit().await.map_err(E::classify)?;
        Ok(moved)
    }
}

fn running_conflict(alias: &str, function: &str) -> StoreError {
    StoreError::Conflict(format!(
        "alias {alias} of function {function} has a rollout running: wait for it or cancel it first"
    ))
}

/// Steps are percents of the alias's calls on the canary: 1 to 100, rising, ending at 100, at
/// most [`STEPS_MAX`].
pub fn check_steps(steps: &[u32]) -> Result<(), String> {
    if steps.is_empty() || steps.len() > STEPS_MAX {
        return Err(format!("a rollout has 1 to {STEPS_MAX} steps, not {}", steps.len()));
    }
    if steps.iter().any(|p| !(1..=100).contains(p)) {
        return Err("each step is a percent from 1 to 100".into());
    }
    if steps.windows(2).any(|w| w[0] >= w[1]) {
        return Err("steps must rise (5,25,50,100)".into());
    }
    if steps.last() != Some(&100) {
        return Err("the last step must be 100: a rollout ends with the alias on the new version".into());
    }
    Ok(())
}

/// Steps of one rollout, at most: each is a row and a line of `rollout status`.
pub const STEPS_MAX: usize = 20;

async fn insert_step<E: Engine>(
    tx: &mut Conn<E>,
    id: i64,
    step: usize,
    percent: u32,
    now: UnixMs,
) -> StoreResult<()>
where
    for<'c> &'c mut Conn<E>: Executor<'c, Database = E::DB>,
    i64: Bind<E::DB>,
{
    sqlx::query("INSERT INTO rollout_steps (rollout, step, percent, started_at) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(step as i64)
        .bind(i64::from(percent))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(E::classify)?;
    Ok(())
}

async fn select_one<E: Engine>(tx: &mut Conn<E>, id: i64) -> StoreResult<Option<Rollout>>
where
    for<'c> &'c mut Conn<E>: Executor<'c, Database = E::DB>,
    i64: Bind<E::DB>,
{
    let found = sqlx::query(select_rollouts!("WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(E::classify)?;
    found.as_ref().map(rollout_from_row).transpose()
}

fn count(v: i64) -> StoreResult<u64> {
    u64::try_from(v).map_err(|_| corrupt(format!("negative count {v}")))
}

fn rollout_from_row(row: &impl StoreRow) -> StoreResult<Rollout> {
    let steps: String = get(row, "steps")?;
    let status: String = get(row, "status")?;
    Ok(Rollout {
        id: get(row, "id")?,
        tenant: get(row, "tenant")?,
        function: get(row, "function")?,
        alias: get(row, "alias")?,
        stable_version: get(row, "stable_version")?,
        canary_version: get(row, "canary_version")?,
        steps: steps
            .split(',')
            .map(|p| p.parse().map_err(|_| corrupt(format!("rollout steps {steps:?}"))))
            .collect::<StoreResult<_>>()?,
        step: count(get(row, "step")?)? as usize,
        every_ms: count(get(row, "every_ms")?)?,
        margin_bp: u32::try_from(get::<i64, _>(row, "margin_bp")?).map_err(|_| corrupt("rollout margin"))?,
        min_calls: count(get(row, "min_calls")?)?,
        status: status.parse().map_err(|e| corrupt(format!("rollout status: {e}")))?,
        reason: get(row, "reason")?,
        owner: get(row, "owner")?,
        owner_until: get(row, "owner_until")?,
        created_at: get(row, "created_at")?,
        updated_at: get(row, "updated_at")?,
    })
}
