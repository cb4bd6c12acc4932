//! Automatic rollouts: what a node counts per version, and the [`Driver`] that advances the
//! rollouts kept in the store. The node's task (`sluice-node`) calls [`Driver::tick`] every
//! [`ROLLOUT_TICK`].
//!
//! Counting: each served version counts its sync calls, async attempts and their errors in
//! [`VersionOutcomes`](sluice_runtime::metrics::VersionOutcomes), the counts `/metrics` shows as
//! `sluice_version_invocations_total` and `sluice_version_errors_total` (relaxed atomic adds per
//! call, no lock). On every
//! tick each node adds what its versions counted since its last tick to the store's row of the
//! rollout's current step, so the node that judges a step sees the calls of the whole cluster,
//! at most one tick late. Judging: one node at a time holds a rollout (a lease of
//! [`ROLLOUT_LEASE_MS`], taken in one statement); once a step has run its `every` and has at
//! least its minimum of canary calls, it compares the canary's error rate with the stable
//! version's plus the margin and moves the alias on, or back.
//!
//! Known limit: a version's counts are the version's, not the alias's: calls to `@4` by number
//! during a rollout of `prod` to 4 count for the canary too.

use std::collections::HashSet;
use std::time::Duration;

use sluice_core::{Clock, RolloutStatus, SluiceError, SystemClock};
use sluice_store::{Rollout, RolloutMove, RolloutStep, StepCounts};

use crate::error::store_error;
use crate::node::Node;

/// The log target of rollout events (started, each step, promoted, rolled back, cancelled),
/// which `sluice serve` logs at `info` whatever its level: they are what a person reads after a
/// rollback.
pub const EVENTS: &str = "sluice::rollout";

/// How often a node adds its counts to the store and judges the rollouts it holds. A step's
/// window is never judged before its `every`, so this bounds how late a decision is, not when.
pub const ROLLOUT_TICK: Duration = Duration::from_millis(500);
/// How long a node holds a rollout without renewing it (it renews every tick): a node that dies
/// holding one delays it by at most this much before another node takes it over.
pub const ROLLOUT_LEASE_MS: u64 = 10_000;

/// A node's share of the rollouts: which ones it has started counting for.
#[derive(Default)]
pub struct Driver {
    /// Rollouts this node has seen running: counts before the first sight belong to no step.
    seen: HashSet<i64>,
}

impl Driver {
    /// Adds this node's counts to every running rollout and advances the ones this node holds.
    pub async fn tick(&mut self, node: &Node) -> Result<(), SluiceError> {
        let running = node.store.running_rollouts().await.map_err(store_error)?;
        self.seen.retain(|id| running.iter().any(|r| r.id == *id));
        for rollout in &running {
            let counts = take_counts(node, rollout);
            if self.seen.insert(rollout.id) {
                // Counted before this node knew of the rollout: not the step's calls.
                continue;
            }
            if !counts.is_empty() {
                node.store.add_rollout_counts(rollout.id, rollout.step, counts).await.map_err(store_error)?;
            }
        }
        for rollout in running {
            if node.store.claim_rollout(rollout.id, &node.id, ROLLOUT_LEASE_MS).await.map_err(store_error)? {
                advance(node, &rollout).await?;
            }
        }
        Ok(())
    }
}

/// What this node's served canary and stable versions counted since the last take.
fn take_counts(node: &Node, rollout: &Rollout) -> StepCounts {
    let Some(served) = node.served(&rollout.tenant, &rollout.function) else { return StepCounts::default() };
    let take = |version| served.versions.get(&version).map(|d| d.outcomes.take()).unwrap_or_default();
    let (canary_calls, canary_errors) = take(rollout.canary_version);
    let (stable_calls, stable_errors) = take(rollout.stable_version);
    StepCounts { canary_calls, canary_errors, stable_calls, stable_errors }
}

/// What a step's counts say.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Its window has not run out, or it has too few canary calls to judge.
    Wait,
    Pass,
    /// The canary failed more than the stable version plus the margin: why, in words.
    Fail(String),
}

/// Judges step `steps.last()` of `rollout` at `now`. When the step has no stable calls (at 100%)
/// the stable version's rate is taken over the earlier steps.
pub fn judge(rollout: &Rollout, steps: &[RolloutStep], now: sluice_core::UnixMs) -> Verdict {
    let Some(step) = steps.last() else { return Verdict::Wait };
    let every = i64::try_from(rollout.every_ms).unwrap_or(i64::MAX);
    let c = step.counts;
    if now < step.started_at.saturating_add(every) || c.canary_calls < rollout.min_calls {
        return Verdict::Wait;
    }
    let (stable_errors, stable_calls) = if c.stable_calls > 0 {
        (c.stable_errors, c.stable_calls)
    } else {
        steps.iter().fold((0, 0), |(e, n), s| (e + s.counts.stable_errors, n + s.counts.stable_calls))
    };
    let canary_rate = rate(c.canary_errors, c.canary_calls);
    let stable_rate = rate(stable_errors, stable_calls);
    let margin = f64::from(rollout.margin_bp) / 100.0;
    if canary_rate > stable_rate + margin {
        return Verdict::Fail(format!(
            "at step {} ({}%): version {} failed {canary_rate:.1}% of its calls ({} of {}), more than \
             version {}'s {stable_rate:.1}% ({stable_errors} of {stable_calls}) plus the margin of {margin}%",
            step.step + 1,
            step.percent,
            rollout.canary_version,
            c.canary_errors,
            c.canary_calls,
            rollout.stable_version,
        ));
    }
    Verdict::Pass
}

/// Percent.
fn rate(errors: u64, calls: u64) -> f64 {
    if calls == 0 { 0.0 } else { errors as f64 * 100.0 / calls as f64 }
}

/// Judges the rollout's current step and moves it (and its alias) when the step is decided.
async fn advance(node: &Node, rollout: &Rollout) -> Result<(), SluiceError> {
    let steps = node.store.rollout_steps(rollout.id).await.map_err(store_error)?;
    let to = match judge(rollout, &steps, SystemClock.now_ms()) {
        Verdict::Wait => return Ok(()),
        Verdict::Fail(reason) => RolloutMove::End { status: RolloutStatus::RolledBack, reason: Some(reason) },
        // The step before the last passed: the last (100%) is the promotion itself.
        Verdict::Pass if rollout.step + 2 >= rollout.steps.len() => {
            RolloutMove::End { status: RolloutStatus::Promoted, reason: None }
        }
        Verdict::Pass => RolloutMove::Step(rollout.step + 1),
    };
    let Some(moved) = node.store.move_rollout(rollout.id, Some(&node.id), to).await.map_err(store_error)?
    else {
        return Ok(());
    };
    let (tenant, function, alias) = (&moved.tenant, &moved.function, &moved.alias);
    match moved.status {
        RolloutStatus::RolledBack => tracing::warn!(
            target: EVENTS,
            %tenant, %function, %alias, rollout = moved.id, version = moved.stable_version,
            reason = moved.reason.as_deref().unwrap_or_default(),
            "rollout rolled back: the alias names the stable version again"
        ),
        RolloutStatus::Promoted => tracing::info!(
            target: EVENTS,
            %tenant, %function, %alias, rollout = moved.id, version = moved.canary_version,
            "rollout promoted: the alias names the new version"
        ),
        _ => tracing::info!(
            target: EVENTS,
            %tenant, %function, %alias, rollout = moved.id, percent = moved.steps[moved.step],
            "rollout step: the alias sends this percent of its calls to version {}", moved.canary_version
        ),
    }
    node.refresh_function(tenant, function).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(step: usize) -> Rollout {
        Rollout {
            id: 1,
            tenant: "t".into(),
            function: "f".into(),
            alias: "prod".into(),
            stable_version: 3,
            canary_version: 4,
            steps: vec![10, 50, 100],
            step,
            every_ms: 1_000,
            margin_bp: 100,
            min_calls: 20,
            status: RolloutStatus::Running,
            reason: None,
            owner: None,
            owner_until: 0,
            created_at: 0,
            updated_at: 0,
        }
    }

    fn step(n: usize, percent: u32, counts: (u64, u64, u64, u64)) -> RolloutStep {
        let (canary_calls, canary_errors, stable_calls, stable_errors) = counts;
        RolloutStep {
            step: n,
            percent,
            started_at: 0,
            counts: StepCounts { canary_calls, canary_errors, stable_calls, stable_errors },
        }
    }

    #[test]
    fn a_step_waits_for_its_window_and_its_minimum_of_canary_calls() {
        let r = rollout(0);
        assert_eq!(judge(&r, &[step(0, 10, (100, 0, 900, 0))], 999), Verdict::Wait);
        assert_eq!(judge(&r, &[step(0, 10, (19, 0, 900, 0))], 5_000), Verdict::Wait);
        assert_eq!(judge(&r, &[step(0, 10, (20, 0, 900, 0))], 1_000), Verdict::Pass);
    }

    #[test]
    fn the_canary_may_fail_as_often_as_the_stable_version_plus_the_margin() {
        let r = rollout(0);
        // 5% against 4% + 1%: within.
        assert_eq!(judge(&r, &[step(0, 10, (100, 5, 100, 4))], 1_000), Verdict::Pass);
        let Verdict::Fail(why) = judge(&r, &[step(0, 10, (100, 6, 100, 4))], 1_000) else { panic!() };
        assert!(why.contains("6.0% of its calls (6 of 100)") && why.contains("4.0% (4 of 100)"), "{why}");
    }

    #[test]
    fn at_full_weight_the_stable_rate_is_the_earlier_steps() {
        let r = rollout(2);
        let steps =
            [step(0, 10, (20, 0, 180, 18)), step(1, 50, (50, 0, 50, 2)), step(2, 100, (100, 11, 0, 0))];
        // 11% against 20 of 230 (8.7%) + 1%.
        assert!(matches!(judge(&r, &steps, 1_000), Verdict::Fail(_)));
        let steps =
            [step(0, 10, (20, 0, 180, 18)), step(1, 50, (50, 0, 50, 2)), step(2, 100, (100, 9, 0, 0))];
        assert_eq!(judge(&r, &steps, 1_000), Verdict::Pass);
    }
}
