//! Schedules: the ticker that turns due occurrences into durable async invocations. The node's
//! task (`sluice-node`) calls [`tick`] every [`SCHEDULE_TICK`]; every node runs it, none leads.
//!
//! A tick reads the schedules due now, and for each decides, from its policies, which
//! occurrences to enqueue: catch-up first (of the occurrences due at once, `all` keeps each, the
//! most recent hundred at most; `latest` the most recent only; `none` the most recent only if it
//! is on time, less than `serve --schedule-missed-after` late), then overlap
//! against the previous occurrence's invocation (`skip` drops an occurrence while it has not
//! finished, `buffer-one` keeps one until it has, `allow` enqueues at once). The version is
//! chosen from the schedule's alias at enqueue, as for an async HTTP call, and the call counts
//! against the tenant's queued quotas. The store commits the invocations together with the
//! schedule's next occurrence, fenced by the revision the tick read, all of a tick's schedules in
//! one transaction ([`sluice_store::Schedules::fire_schedules`]), and each invocation carries the
//! idempotency key
//! `sched:{id}:{scheduled_for}`: two nodes that race, or a node that crashes and a second that
//! retries, store each occurrence once.

use std::time::Duration;

use sluice_core::schedule::{Timetable, catch_up};
use sluice_core::{Clock, Criticality, Overlap, SluiceError, SystemClock, UnixMs};
use sluice_store::{
    Firing, IdempotencyKey, NewInvocation, SCHEDULE_CALLER, Schedule, StoredRequest, schedule_key,
};

use crate::error::store_error;
use crate::node::Node;
use crate::quota::Reservation;

/// The log target of schedule events (skips for a reason other than the policies, quota
/// refusals): `sluice serve` logs them at `info` whatever its level.
pub const EVENTS: &str = "sluice::schedule";

/// How often a node looks for due occurrences: the bound of a fire's lateness on a healthy node
/// (plus the transaction), well within the 1 s the issue asks for at p99.
pub const SCHEDULE_TICK: Duration = Duration::from_millis(200);
/// How long after each multiple of [`SCHEDULE_TICK`] on the wall clock a node ticks: late enough
/// that an occurrence on the multiple is due (clocks of a cluster's nodes agree to a few ms under
/// NTP; a node whose clock is behind fires it at its next tick), early enough not to add to the
/// lateness.
pub const SCHEDULE_TICK_AFTER_MS: i64 = 5;
/// Most schedules one tick fires; the rest wait for the next tick (the oldest due go first).
pub const DUE_BATCH_MAX: u32 = 1_000;

/// The header each scheduled invocation's request carries with its schedule's name, and the one
/// with its occurrence (RFC 3339), so a guest can tell a late catch-up from an on-time fire.
pub const SCHEDULE_HEADER: &str = "sluice-schedule";
pub const SCHEDULED_FOR_HEADER: &str = "sluice-scheduled-for";

/// What one tick did, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Ticked {
    /// Invocations stored.
    pub enqueued: u64,
    /// Schedules another node fired first (or that changed under the tick).
    pub lost: u64,
}

/// Fires every schedule due now, [`DUE_BATCH_MAX`] per transaction, one transaction after the
/// other while they come full and this node fires some of them. A schedule whose decision fails
/// (a read refused) is logged and tried again next tick; the others go on. Two nodes that tick
/// at once do not wait for each other: each starts on different schedules (the store's
/// `spread`), and the store skips the schedules the other is firing.
pub async fn tick(node: &Node) -> Result<Ticked, SluiceError> {
    let spread = spread(&node.id);
    let mut total = Ticked::default();
    loop {
        let (ticked, again) = tick_once(node, spread).await?;
        total.enqueued += ticked.enqueued;
        total.lost += ticked.lost;
        if !again {
            return Ok(total);
        }
    }
}

/// This node's order of the schedules due in one second: a number from 1 to the store's prime
/// less one, from the node's id.
fn spread(node: &str) -> u32 {
    let hash =
        node.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    1 + (hash % 1_000_002) as u32
}

/// One transaction of [`tick`]; and whether to go on at once (it took as many schedules as it
/// could, and advanced some: more may be due).
async fn tick_once(node: &Node, spread: u32) -> Result<(Ticked, bool), SluiceError> {
    let now = SystemClock.now_ms();
    let ahead_until =
        now.saturating_add(i64::try_from(node.config.schedule_fire_ahead.as_millis()).unwrap_or(0));
    let due = node.store.due_schedules(now, ahead_until, DUE_BATCH_MAX, spread).await.map_err(store_error)?;
    let full = due.len() >= DUE_BATCH_MAX as usize;
    let mut firings = Vec::with_capacity(due.len());
    let mut reservations = Vec::with_capacity(due.len());
    for schedule in &due {
        match decide(node, schedule, now, ahead_until).await {
            Ok(Some((firing, reserved))) => {
                firings.push(firing);
                reservations.push(reserved);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(
                tenant = %schedule.tenant, schedule = %schedule.name, error = %e,
                "firing a schedule failed; the next tick tries again"
            ),
        }
    }
    let fired = node.store.fire_schedules(&firings).await.map_err(store_error)?;
    let committed_at = SystemClock.now_ms();
    let mut ticked = Ticked { enqueued: fired.inserted, lost: 0 };
    for ((committed, reserved), firing) in fired.committed.iter().zip(reservations).zip(&firings) {
        if *committed {
            reserved.into_iter().for_each(Reservation::keep);
            for (occurrence, _) in &firing.enqueue {
                let late = u64::try_from(committed_at - occurrence).unwrap_or(0);
                crate::metrics::schedule_fired(Duration::from_millis(late));
            }
        } else {
            ticked.lost += 1;
        }
    }
    if ticked.enqueued > 0 {
        node.notify_scheduler();
    }
    let advanced = fired.committed.iter().filter(|c| **c).count();
    Ok((ticked, full && advanced > 0))
}

/// Decides what a due schedule does now, with the quota places of its invocations; `None` if
/// nothing changes (only a buffered occurrence, still waiting; or one that may not fire ahead).
async fn decide(
    node: &Node,
    s: &Schedule,
    now: UnixMs,
    ahead_until: UnixMs,
) -> Result<Option<(Firing, Vec<Reservation>)>, SluiceError> {
    let table = s.when.timetable().map_err(SluiceError::internal)?;
    if let Some(next) = s.next_fire_at
        && next > now
        && s.buffered_for.is_none()
    {
        return decide_ahead(node, s, &table, next, now, ahead_until).await;
    }
    let (due, next_fire_at) = match s.next_fire_at {
        Some(first) if first <= now => {
            // Walking back from now: an outage of a year costs a bounded number of steps.
            let due = table.latest_between(first, now, sluice_core::schedule::CATCHUP_ALL_MAX + 10);
            (due, table.next_after(now))
        }
        other => (Vec::new(), other),
    };
    let missed_after = i64::try_from(node.config.schedule_missed_after.as_millis()).unwrap_or(i64::MAX);
    let (kept, dropped) = catch_up(s.catchup, &due, now, missed_after);
    let mut skipped = dropped + due_before(&table, s.next_fire_at, due.first().copied());
    let mut busy = previous_unfinished(node, s).await?;
    let mut buffered = s.buffered_for;
    let mut fire_at = Vec::new();
    if let Some(b) = buffered
        && !busy
    {
        fire_at.push(b);
        buffered = None;
        busy = true;
    }
    for t in kept {
        match s.overlap {
            Overlap::Allow => fire_at.push(t),
            _ if !busy => {
                fire_at.push(t);
                busy = true;
            }
            Overlap::BufferOne if buffered.is_none() => buffered = Some(t),
            Overlap::Skip | Overlap::BufferOne => skipped += 1,
        }
    }
    if due.is_empty() && buffered == s.buffered_for && fire_at.is_empty() {
        // Only a buffered occurrence still waiting: nothing changes.
        return Ok(None);
    }
    let mut last_error = None;
    let mut enqueue = Vec::with_capacity(fire_at.len());
    let mut reservations = Vec::new();
    if !fire_at.is_empty() {
        match invocations(node, s, &fire_at, now).await {
            Ok(built) => {
                for (t, inv) in built {
                    match node.quotas.reserve(&inv.tenant, inv.request.quota_bytes()) {
                        Ok(reserved) => {
                            reservations.push(reserved);
                            enqueue.push((t, inv));
                        }
                        Err(e) => {
                            skipped += 1;
                            last_error = Some(format!("{}: {}", sluice_core::rfc3339(t), e.message));
                        }
                    }
                }
            }
            Err(e) => {
                skipped += fire_at.len() as u64;
                last_error = Some(e.message);
            }
        }
    }
    if let Some(error) = &last_error {
        tracing::info!(target: EVENTS, tenant = %s.tenant, schedule = %s.name, %error, "occurrence skipped");
    }
    let firing = Firing {
        id: s.id,
        revision: s.revision,
        next_fire_at,
        buffered_for: buffered,
        enqueue,
        skipped,
        last_error,
    };
    Ok(Some((firing, reservations)))
}

/// Whether the previous occurrence's invocation has not finished, for the overlap policies
/// (`allow` never waits for it).
async fn previous_unfinished(node: &Node, s: &Schedule) -> Result<bool, SluiceError> {
    Ok(match (&s.overlap, &s.last_invocation) {
        (Overlap::Allow, _) | (_, None) => false,
        (_, Some(id)) => node
            .store
            .get_invocation(id)
            .await
            .map_err(store_error)?
            .is_some_and(|inv| !inv.status.is_final()),
    })
}

/// Fires the next occurrence ahead, runnable at its time, when nothing could decide otherwise
/// by then: it is within `ahead_until`, none is fired ahead already, and the overlap policy lets
/// it fire now. Anything that would skip it (an unfinished previous call, a missing alias, a
/// full quota) leaves it to the tick at its time, which decides and reports as for any due
/// occurrence.
async fn decide_ahead(
    node: &Node,
    s: &Schedule,
    table: &Timetable,
    next: UnixMs,
    now: UnixMs,
    ahead_until: UnixMs,
) -> Result<Option<(Firing, Vec<Reservation>)>, SluiceError> {
    if next > ahead_until || s.last_fired_for.is_some_and(|t| t > now) || previous_unfinished(node, s).await?
    {
        return Ok(None);
    }
    let Ok(built) = invocations(node, s, &[next], now).await else { return Ok(None) };
    let mut reservations = Vec::with_capacity(built.len());
    for (_, inv) in &built {
        match node.quotas.reserve(&inv.tenant, inv.request.quota_bytes()) {
            Ok(reserved) => reservations.push(reserved),
            Err(_) => return Ok(None),
        }
    }
    let firing = Firing {
        id: s.id,
        revision: s.revision,
        next_fire_at: table.next_after(next),
        buffered_for: None,
        enqueue: built,
        skipped: 0,
        last_error: None,
    };
    Ok(Some((firing, reservations)))
}

/// Occurrences between the schedule's next fire time and the first one the tick looked at, which
/// the walk back from now did not reach (only after a long outage): counted as skipped. At most
/// a bounded count is walked; beyond it the count is a lower bound.
fn due_before(table: &Timetable, from: Option<UnixMs>, first_seen: Option<UnixMs>) -> u64 {
    match (from, first_seen) {
        (Some(from), Some(first)) if from < first => table.between(from, first - 1, 10_000).len() as u64,
        _ => 0,
    }
}

/// The invocations of a schedule's occurrences: the version its alias names on this node now.
async fn invocations(
    node: &Node,
    s: &Schedule,
    fire_at: &[UnixMs],
    now: UnixMs,
) -> Result<Vec<(UnixMs, NewInvocation)>, SluiceError> {
    let chosen = || {
        node.served(&s.tenant, &s.function).and_then(|f| f.alias(&s.alias).map(|a| a.choose(None).clone()))
    };
    let deployed = match chosen() {
        Some(d) => d,
        None => {
            // Deployed on another node a moment ago, perhaps: read it before calling it missing.
            node.refresh_function(&s.tenant, &s.function).await?;
            chosen().ok_or_else(|| {
                SluiceError::not_found(format!("no alias {} of function {}", s.alias, s.function))
            })?
        }
    };
    Ok(fire_at
        .iter()
        .map(|&t| {
            let mut headers = s.headers.clone();
            headers.push((SCHEDULE_HEADER.into(), s.name.clone().into_bytes()));
            headers.push((SCHEDULED_FOR_HEADER.into(), sluice_core::rfc3339(t).into_bytes()));
            // A start window opens at the occurrence (one fired ahead is not runnable before),
            // or when a missed one is enqueued (now), so a catch-up does not expire at once.
            let deadline = if s.flex_ms > 0 {
                Some(now.max(t).saturating_add(i64::try_from(s.flex_ms).unwrap_or(i64::MAX)))
            } else {
                deployed
                    .config
                    .start_window_ms
                    .and_then(|w| i64::try_from(w).ok())
                    .map(|w| now.max(t).saturating_add(w))
            };
            let inv = NewInvocation {
                id: sluice_core::ids::invocation_id(),
                tenant: s.tenant.clone(),
                function: s.function.clone(),
                version: deployed.record.version,
                request: StoredRequest {
                    method: "POST".into(),
                    path_and_query: s.path.clone(),
                    headers,
                    body: s.body.clone(),
                },
                idempotency_key: Some(IdempotencyKey {
                    key: schedule_key(s.id, t),
                    caller: SCHEDULE_CALLER.into(),
                }),
                criticality: Criticality::Normal,
                run_after: t,
                deadline,
                attempts_max: deployed.config.attempts_max,
                max_age_ms: deployed.config.max_age_ms,
                in_order: None,
            };
            (t, inv)
        })
        .collect())
}

/// The invocations of a `backfill`: every occurrence in `[from, to]`, at most
/// [`BACKFILL_MAX`](sluice_core::schedule::BACKFILL_MAX), whatever the policies (a backfill is
/// asked for explicitly), with the schedule's keys: occurrences fired already are not stored
/// again.
pub async fn backfill(
    node: &Node,
    s: &Schedule,
    from: UnixMs,
    to: UnixMs,
) -> Result<(usize, u64), SluiceError> {
    let table = s.when.timetable().map_err(SluiceError::internal)?;
    let occurrences = table.between(from, to, sluice_core::schedule::BACKFILL_MAX);
    let now = SystemClock.now_ms();
    let built = invocations(node, s, &occurrences, now).await?;
    let mut reservations = Vec::with_capacity(built.len());
    for (_, inv) in &built {
        reservations.push(node.quotas.reserve(&inv.tenant, inv.request.quota_bytes())?);
    }
    let stored = node.store.backfill_schedule(s.id, &built).await.map_err(store_error)?;
    for reserved in reservations {
        reserved.keep();
    }
    if stored > 0 {
        node.notify_scheduler();
    }
    Ok((occurrences.len(), stored))
}

#[cfg(test)]
mod tests {
    use sluice_core::schedule::When;

    use super::*;

    #[test]
    fn occurrences_the_walk_back_did_not_reach_are_counted() {
        let every = When::Every { every_ms: 1_000 }.timetable().unwrap();
        assert_eq!(due_before(&every, Some(10_000), Some(15_000)), 5);
        assert_eq!(due_before(&every, Some(15_000), Some(15_000)), 0);
        assert_eq!(due_before(&every, None, None), 0);
    }
}
