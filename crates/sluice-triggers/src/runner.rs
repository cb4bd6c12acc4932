//! The node's trigger task ([`run`]): leases, a consumer per held trigger, progress; and the
//! consumer's loop ([`batches`]): take a batch, build its invocations, commit, then ack.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sluice_core::trigger::{Source, event_id};
use sluice_core::{Clock, Criticality, SystemClock};
use sluice_gateway::api_triggers::{TRIGGER_LEASE, TRIGGER_LEASE_RENEW};
use sluice_gateway::node::Node;
use sluice_gateway::quota::Reservation;
use sluice_store::{
    IdempotencyKey, InOrder, NewInvocation, StoredRequest, TRIGGER_CALLER, Trigger, TriggerProgress,
};

use crate::broker::{Broker, Message};
use crate::{amqp, mqtt, nats};

/// The log target of trigger events (a consumer started, stopped, failing, refused by a quota).
pub const EVENTS: &str = "sluice::trigger";
/// Most triggers a node takes in one renewal: with several nodes starting at once, triggers
/// spread over them instead of all going to the first.
pub const TAKE_PER_RENEWAL: u32 = 4;
/// How long a consumer waits before trying its broker again after an error, at most.
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long messages refused by the tenant's quota, or whose function is missing, wait in the
/// broker before they come again.
const RETRY_LATER: Duration = Duration::from_secs(2);

/// The header each invocation carries with its trigger's name.
pub const TRIGGER_HEADER: &str = "sluice-trigger";

/// What a consumer counts, read by the lease task to report progress.
#[derive(Default)]
struct Counters {
    acked: AtomicU64,
    error: std::sync::Mutex<Option<String>>,
    lag: AtomicU64,
}

const LAG_UNKNOWN: u64 = u64::MAX;

struct Running {
    trigger: Trigger,
    task: tokio::task::JoinHandle<()>,
    counters: Arc<Counters>,
    acked_before: u64,
    seen_at: Instant,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The node's trigger task: leases, consumers, progress. Returns when the node is gone.
pub async fn run(node: std::sync::Weak<Node>) {
    let mut running: HashMap<i64, Running> = HashMap::new();
    let mut failing = false;
    let mut tick = tokio::time::interval(TRIGGER_LEASE_RENEW);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        let held = match node
            .store
            .claim_triggers(&node.id, TRIGGER_LEASE.as_millis() as u64, TAKE_PER_RENEWAL)
            .await
        {
            Ok(held) => {
                if failing {
                    tracing::info!(target: EVENTS, "renewing trigger leases works again");
                    failing = false;
                }
                held
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(target: EVENTS, error = %e, "renewing trigger leases failed; trying again");
                    failing = true;
                }
                // Leases run out on their own; a consumer whose batch cannot prove its lease
                // commits nothing, so keep going until the store answers or the lease ends.
                running.retain(|_, r| r.trigger.owner_until > SystemClock.now_ms());
                continue;
            }
        };
        let mut keep = HashMap::with_capacity(held.len());
        for t in held {
            let id = t.id;
            match running.remove(&id) {
                Some(mut r) if same_consumer(&r.trigger, &t) && !r.task.is_finished() => {
                    r.trigger.owner_until = t.owner_until;
                    r.trigger.recent = t.recent.clone();
                    keep.insert(id, r);
                }
                _ => {
                    tracing::info!(target: EVENTS, tenant = %t.tenant, trigger = %t.name, kind = t.source.kind(), "consuming");
                    let counters = Arc::new(Counters::default());
                    counters.lag.store(LAG_UNKNOWN, Ordering::Relaxed);
                    let task = tokio::spawn(consume(Arc::downgrade(&node), t.clone(), counters.clone()));
                    keep.insert(
                        id,
                        Running { trigger: t, task, counters, acked_before: 0, seen_at: Instant::now() },
                    );
                }
            }
        }
        for (_, r) in running.drain() {
            tracing::info!(target: EVENTS, tenant = %r.trigger.tenant, trigger = %r.trigger.name, "stopped consuming (lease given up, paused, changed or deleted)");
        }
        running = keep;
        for r in running.values_mut() {
            let acked = r.counters.acked.load(Ordering::Relaxed);
            let elapsed = r.seen_at.elapsed().as_secs_f64().max(0.001);
            let progress = TriggerProgress {
                lag: Some(r.counters.lag.load(Ordering::Relaxed)).filter(|&l| l != LAG_UNKNOWN),
                acked_per_s: Some(((acked - r.acked_before) as f64 / elapsed).round() as u64),
                error: r.counters.error.lock().expect("error lock").take(),
            };
            r.acked_before = acked;
            r.seen_at = Instant::now();
            if let Err(e) = node.store.trigger_progress(r.trigger.id, &node.id, &progress).await {
                tracing::debug!(target: EVENTS, error = %e, "recording a trigger's progress failed");
            }
        }
    }
}

/// Whether a consumer started for `old` still serves `new` (same broker, function and shape).
fn same_consumer(old: &Trigger, new: &Trigger) -> bool {
    old.source == new.source
        && old.credentials == new.credentials
        && old.function == new.function
        && old.alias == new.alias
        && old.path == new.path
        && old.batch_max == new.batch_max
        && old.window_ms == new.window_ms
        && old.ordered == new.ordered
}

/// Gives up this node's leases (shutdown), so other nodes take its triggers at once.
pub async fn release_all(node: &Node) {
    let Ok(held) = node.store.claim_triggers(&node.id, 0, 0).await else { return };
    for t in held {
        let _ = node.store.release_trigger(t.id, &node.id).await;
    }
}

/// One trigger's consumer: connects, and moves batches until its lease is lost (or its task is
/// aborted). Broker errors are recorded and retried with a growing pause.
async fn consume(node: std::sync::Weak<Node>, t: Trigger, counters: Arc<Counters>) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let allowed = match node.upgrade() {
            Some(node) => t.source.broker_allowed(node.config.trigger_brokers.as_deref()),
            None => return,
        };
        let result = match &t.source {
            // Created on a node with another list, perhaps: this one does not connect.
            _ if !allowed => Err(anyhow::anyhow!(
                "broker {} is not one this node's triggers may connect to (serve --trigger-brokers)",
                t.source.broker_address()
            )),
            Source::Nats { .. } => match nats::Nats::connect(&t).await {
                Ok(b) => batches(&node, &t, &counters, b).await,
                Err(e) => Err(e),
            },
            Source::Amqp { .. } => match amqp::Amqp::connect(&t).await {
                Ok(b) => batches(&node, &t, &counters, b).await,
                Err(e) => Err(e),
            },
            Source::Mqtt { .. } => match mqtt::Mqtt::connect(&t).await {
                Ok(b) => batches(&node, &t, &counters, b).await,
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(Ended::LeaseLost) => {
                tracing::info!(target: EVENTS, tenant = %t.tenant, trigger = %t.name, "lease lost: stopped consuming");
                return;
            }
            Ok(Ended::NodeGone) => return,
            Err(e) => {
                let error = format!("{e:#}");
                tracing::warn!(target: EVENTS, tenant = %t.tenant, trigger = %t.name, %error, "trigger failing; trying again in {backoff:?}");
                *counters.error.lock().expect("error lock") = Some(error);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

enum Ended {
    LeaseLost,
    NodeGone,
}

async fn batches<B: Broker>(
    node: &std::sync::Weak<Node>,
    t: &Trigger,
    counters: &Counters,
    mut broker: B,
) -> anyhow::Result<Ended> {
    let window = Duration::from_millis(t.window_ms);
    let mut lag_at: Option<Instant> = None;
    let mut last_seq = 0;
    loop {
        let mut batch = broker.next_batch(t.batch_max as usize, window).await?;
        let Some(node) = node.upgrade() else { return Ok(Ended::NodeGone) };
        // A message larger than an async call's body may be stays in the broker, said in
        // `triggers show`: storing it would bypass the limit, dropping it would lose it.
        let body_max = node.config.limits.async_body_bytes_max;
        if batch.iter().any(|m| m.body.len() as u64 > body_max) {
            let (fit, over): (Vec<_>, Vec<_>) =
                batch.into_iter().partition(|m| m.body.len() as u64 <= body_max);
            let why = format!(
                "message {} ({}) is {} bytes, over the node's async body limit of {body_max} bytes (serve --async-body-max); it stays in the broker",
                over[0].position,
                over[0].subject,
                over[0].body.len()
            );
            tracing::warn!(target: EVENTS, tenant = %t.tenant, trigger = %t.name, error = %why, "message too large");
            *counters.error.lock().expect("error lock") = Some(why);
            broker.retry_later(over.into_iter().map(|m| m.delivery).collect(), RETRY_LATER).await?;
            if fit.is_empty() {
                continue;
            }
            batch = fit;
        }
        // A broker may answer this with a round trip: once a second at most.
        if lag_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
            lag_at = Some(Instant::now());
            if let Some(lag) = broker.lag().await {
                counters.lag.store(lag, Ordering::Relaxed);
            }
        }
        let seq = next_seq(last_seq);
        let built = match invocations(&node, t, &batch, seq) {
            Ok(built) => built,
            Err(e) => {
                // No version to run (deployed elsewhere a moment ago, perhaps): read it again.
                let _ = node.refresh_function(&t.tenant, &t.function).await;
                match invocations(&node, t, &batch, seq) {
                    Ok(built) => built,
                    Err(_) => {
                        *counters.error.lock().expect("error lock") = Some(e.clone());
                        broker
                            .retry_later(batch.into_iter().map(|m| m.delivery).collect(), RETRY_LATER)
                            .await?;
                        tokio::time::sleep(RETRY_LATER).await;
                        continue;
                    }
                }
            }
        };
        // The tenant's queued quotas: the messages that fit go now, the rest later.
        let mut reserved: Vec<Reservation> = Vec::with_capacity(built.len());
        let mut refused = None;
        for inv in &built {
            match node.quotas.reserve(&inv.tenant, inv.request.quota_bytes()) {
                Ok(r) => reserved.push(r),
                Err(e) => {
                    refused = Some(e.message);
                    break;
                }
            }
        }
        let later: Vec<_> = batch.split_off(reserved.len()).into_iter().map(|m| m.delivery).collect();
        if !later.is_empty() {
            broker.retry_later(later, RETRY_LATER).await?;
        }
        if let Some(why) = &refused {
            tracing::info!(target: EVENTS, tenant = %t.tenant, trigger = %t.name, error = %why, "messages wait in the broker: the tenant is at its queued quota");
            *counters.error.lock().expect("error lock") = Some(why.clone());
        }
        if batch.is_empty() {
            tokio::time::sleep(RETRY_LATER).await;
            continue;
        }
        let invs = &built[..batch.len()];
        let recent = broker.remember(&batch);
        let committed = node.store.commit_trigger_batch(t.id, &node.id, invs, recent.as_deref()).await;
        match committed {
            Ok(Some(stored)) => {
                crash_point();
                let committed_at = Instant::now();
                // Duplicates took no new place in the queue.
                for (i, r) in reserved.into_iter().enumerate() {
                    if (i as u64) < stored {
                        r.keep();
                    }
                }
                if stored > 0 {
                    node.notify_scheduler();
                }
                let n = batch.len() as u64;
                last_seq = seq + n as i64;
                broker.ack(batch.into_iter().map(|m| m.delivery).collect()).await?;
                sluice_gateway::metrics::trigger_acked(t.source.kind(), n, committed_at.elapsed());
                counters.acked.fetch_add(n, Ordering::Relaxed);
            }
            Ok(None) => return Ok(Ended::LeaseLost),
            Err(e) => {
                drop(reserved);
                broker.retry_later(batch.into_iter().map(|m| m.delivery).collect(), RETRY_LATER).await?;
                return Err(anyhow::anyhow!("storing a batch failed: {e}"));
            }
        }
    }
}

/// The first sequence number of a batch, in its key's order: the wall clock in microseconds, so
/// a consumer that takes the trigger over on another node continues after this one (as far as
/// their clocks agree), and never below the last batch's end, so two batches within a
/// microsecond keep their order.
fn next_seq(last: i64) -> i64 {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    micros.max(last)
}

/// Longest subject kept as it is in an ordered invocation's key; a longer one (an MQTT topic may
/// have 65,535 bytes) is keyed by its SHA-256, so a publisher cannot bloat the queue's index.
const ORDER_KEY_SUBJECT_MAX: usize = 256;

/// The key an ordered trigger's message runs in order under: its trigger's, and its subject's.
fn order_key(trigger: i64, subject: &str) -> String {
    if subject.len() <= ORDER_KEY_SUBJECT_MAX {
        format!("trigger:{trigger}:{subject}")
    } else {
        format!("trigger:{trigger}:sha256:{}", sluice_core::ids::sha256_hex(subject.as_bytes()))
    }
}

/// The tests' way to crash a node exactly between a batch's commit and its ack, the window the
/// idempotency keys exist for: with `SLUICE_TEST_TRIGGER_ABORT_AFTER_BATCHES=N` in its
/// environment, the process aborts (no cleanup, like SIGKILL) after its Nth committed batch.
fn crash_point() {
    static AFTER: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    static COMMITTED: AtomicU64 = AtomicU64::new(0);
    let after = AFTER.get_or_init(|| {
        std::env::var("SLUICE_TEST_TRIGGER_ABORT_AFTER_BATCHES").ok().and_then(|v| v.parse().ok())
    });
    if let Some(n) = after
        && COMMITTED.fetch_add(1, Ordering::Relaxed) + 1 == *n
    {
        eprintln!(
            "sluice: aborting after committed trigger batch {n}, before its ack (SLUICE_TEST_TRIGGER_ABORT_AFTER_BATCHES)"
        );
        std::process::abort();
    }
}

/// A batch's invocations, in CloudEvents HTTP binary mode, of the version the trigger's alias
/// names on this node now; `Err` (a message to show) if it names none. An ordered trigger's
/// messages take the sequence numbers from `seq` on (see [`next_seq`]).
fn invocations<D>(
    node: &Node,
    t: &Trigger,
    batch: &[Message<D>],
    seq: i64,
) -> Result<Vec<NewInvocation>, String> {
    let served = node.served(&t.tenant, &t.function).ok_or_else(|| format!("no function {}", t.function))?;
    let alias =
        served.alias(&t.alias).ok_or_else(|| format!("no alias {} of function {}", t.alias, t.function))?;
    let now = SystemClock.now_ms();
    let source = t.source.event_source();
    Ok(batch
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let id = event_id(t.id, t.source.kind(), &m.position);
            let deployed = alias.choose(Some(m.subject.as_bytes()));
            let mut headers: Vec<(String, Vec<u8>)> = vec![
                (
                    "content-type".into(),
                    m.content_type.as_deref().unwrap_or("application/octet-stream").into(),
                ),
                ("ce-specversion".into(), b"1.0".to_vec()),
                ("ce-id".into(), id.clone().into_bytes()),
                ("ce-source".into(), source.clone().into_bytes()),
                ("ce-type".into(), t.source.event_type().into()),
                ("ce-time".into(), sluice_core::rfc3339(m.time.unwrap_or(now)).into_bytes()),
                ("ce-subject".into(), m.subject.clone().into_bytes()),
                (TRIGGER_HEADER.into(), t.name.clone().into_bytes()),
            ];
            headers.extend(m.extensions.iter().map(|(k, v)| (format!("ce-{k}"), v.clone().into_bytes())));
            NewInvocation {
                id: sluice_core::ids::invocation_id(),
                tenant: t.tenant.clone(),
                function: t.function.clone(),
                version: deployed.record.version,
                request: StoredRequest {
                    method: "POST".into(),
                    path_and_query: t.path.clone(),
                    headers,
                    body: m.body.to_vec(),
                },
                idempotency_key: Some(IdempotencyKey { key: id, caller: TRIGGER_CALLER.into() }),
                criticality: Criticality::Normal,
                run_after: now,
                deadline: deployed
                    .config
                    .start_window_ms
                    .and_then(|w| i64::try_from(w).ok())
                    .map(|w| now + w),
                attempts_max: deployed.config.attempts_max,
                max_age_ms: deployed.config.max_age_ms,
                // Keys of the trigger's own, so two triggers never wait for each other.
                in_order: t
                    .ordered
                    .then(|| InOrder { key: order_key(t.id, &m.subject), seq: seq.saturating_add(i as i64) }),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_subjects_are_keyed_by_their_hash() {
        assert_eq!(order_key(7, "orders.eu"), "trigger:7:orders.eu");
        let long = "t/".repeat(40_000);
        let key = order_key(7, &long);
        assert!(key.starts_with("trigger:7:sha256:") && key.len() == "trigger:7:sha256:".len() + 64, "{key}");
        assert_ne!(key, order_key(7, &"u/".repeat(40_000)), "different subjects, different keys");
        assert_eq!(order_key(7, &"x".repeat(256)).len(), "trigger:7:".len() + 256, "the bound is inclusive");
    }
}
