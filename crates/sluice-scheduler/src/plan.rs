//! The XFaaS policy of the async scheduler (DESIGN.md section 4), as pure functions of what the
//! loop measured: which runnable invocations a node leases in one round, and why the rest wait.
//!
//! Two kinds of capacity, granted in this order each round:
//! 1. **Reserved** work: a tenant with a reserved quota (which only an admin sets) gets calls
//!    started up to it, counted over the whole cluster, whatever the node's load. A function's
//!    own reservation (`deploy --reserved`) is a part of its tenant's, never more: its calls take
//!    the tenant's reserved room before the tenant's other plain calls, and the reservations the
//!    plan honours add up to at most the tenant's quota.
//! 2. **Opportunistic** work, beyond reservations, at the pace of the utilization target: the
//!    [`Pacer`] turns measured utilization into how many more calls may run here, and that
//!    budget is shared by weighted fair queueing over tenants: each call goes to the tenant
//!    whose recent opportunistic service divided by its weight is lowest (start-time fair
//!    queueing, with service decaying so that no tenant banks credit while idle). A tenant asking
//!    for less than its share leaves the rest to the others. Calls without a deadline are served
//!    before calls with a wide start window, which wait for a trough (time-shifting).
//!
//! **Due** work (a deadline within the promotion horizon) is an order inside a tenant, not a
//! class of capacity: it is first in the tenant's reserved room and first in its fair share, but
//! it counts against both like any other call. A caller cannot jump the fair share by sending a
//! near `sluice-deadline`; a tenant whose deadlines must hold under load needs a reservation.
//!
//! Criticality orders work only within a tenant's grant (the store's order inside each class), so
//! a tenant that marks every call `high` gets its share and not more. Names order nothing: the
//! tenant each phase starts with turns by one every round.
//!
//! Nothing here reads a clock or the store: the loop passes everything in, which is what lets the
//! tests drive it with a simulated clock and executor.

use std::collections::{BTreeMap, HashMap};

use sluice_store::{LeaseAsk, LeaseClass, Quota, TenantDemand};

/// Why runnable work was not started in a round (what an invocation's `waits` reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WaitReason {
    /// The tenant had used its fair share of the capacity beyond reservations (or the node's
    /// slots were all taken).
    Quota,
    /// The node was at or over its utilization target: reserved work started, and the rest
    /// shared the pacer's shrinking budget (due calls included, first in their tenant's share).
    Utilization,
    /// A downstream of the function was saturated (its adaptive concurrency limit reached).
    Downstream,
    /// A call with a wide start window, held for a trough while there was other work or the node
    /// was over target.
    StartWindow,
}

impl WaitReason {
    pub const ALL: [WaitReason; 4] =
        [WaitReason::Quota, WaitReason::Utilization, WaitReason::Downstream, WaitReason::StartWindow];

    pub fn as_str(self) -> &'static str {
        match self {
            WaitReason::Quota => "quota",
            WaitReason::Utilization => "utilization",
            WaitReason::Downstream => "downstream",
            WaitReason::StartWindow => "start_window",
        }
    }
}

/// One tenant as a round sees it.
#[derive(Debug, Clone, Default)]
pub struct TenantInput {
    pub quota: Quota,
    /// Runnable work by class (capped counts from the store).
    pub demand: TenantDemand,
    /// Its invocations running now, on every node.
    pub running: u32,
    /// Functions with a reservation of their own: `(function, reserved, running on every node)`.
    /// Each is a part of the tenant's reservation ([`Quota::reserved`]), which bounds them all.
    pub function_reservations: Vec<(String, u32, u32)>,
    /// Functions not to start (a downstream is saturated).
    pub excluded: Vec<String>,
    /// Opportunistic calls it was granted recently (a decaying count, see [`Service`]).
    pub served: f64,
}

/// What one round decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub asks: Vec<LeaseAsk>,
    /// How many of the asks' calls are opportunistic (count against the pacer's limit).
    pub opportunistic: u32,
    /// Per tenant, per class, why work of that class was left waiting this round.
    pub held: BTreeMap<(String, LeaseClass), WaitReason>,
}

/// Plans one round. `free` is how many more calls this node may run now (its slots);
/// `opportunistic` how many more the pacer allows beyond reservations; `over_target` whether the
/// node measured itself at or over its utilization target (which names why work waits); `round`
/// counts the loop's rounds: the tenant each phase starts with is the `round`-th (modulo their
/// number), so that when the slots run out part-way through a phase, the tenant cut short goes
/// earlier in the next round, and no tenant is favoured by its name. (Ordering by deficit —
/// running over weight — was the other choice; but `running` is read every few rounds and lags
/// other nodes' leases, so between reads the same tenant would win every round. Turning needs
/// no state beyond a counter and costs nothing.)
///
/// O(tenants + functions) apart from [`fair_shares`], which is O(budget × tenants).
pub fn plan(
    tenants: &BTreeMap<String, TenantInput>,
    mut free: u32,
    opportunistic: u32,
    over_target: bool,
    round: u64,
) -> Plan {
    let mut out = Plan::default();
    if tenants.is_empty() {
        return out;
    }
    let ask =
        |out: &mut Plan, tenant: &str, function: Option<&str>, class, limit: u32, excluded: &[String]| {
            if limit > 0 {
                out.asks.push(LeaseAsk {
                    tenant: tenant.to_string(),
                    function: function.map(str::to_string),
                    exclude: excluded.to_vec(),
                    class,
                    limit,
                });
            }
        };
    let first = (round % tenants.len() as u64) as usize;
    let order: Vec<(&str, &TenantInput)> =
        tenants.iter().map(|(name, t)| (name.as_str(), t)).cycle().skip(first).take(tenants.len()).collect();
    // What each tenant (by its place in `order`) still wants of the due and the plain class.
    let mut due_left: Vec<u32> = order.iter().map(|(_, t)| t.demand.due).collect();
    let mut plain_left: Vec<u32> = order.iter().map(|(_, t)| t.demand.plain).collect();

    // 1. Reservations, whatever the load: the tenant's quota minus what it runs on every node.
    // Due calls first; then the functions with a reservation of their own, each up to it, out of
    // the same room (so that a deploy key cannot reserve more than an admin gave the tenant);
    // then the tenant's other plain calls.
    for (i, (name, t)) in order.iter().enumerate() {
        let mut room = t.quota.reserved.saturating_sub(t.running).min(free);
        let n = due_left[i].min(room);
        ask(&mut out, name, None, LeaseClass::Due, n, &t.excluded);
        due_left[i] -= n;
        room -= n;
        free -= n;
        for (function, reserved, running) in &t.function_reservations {
            let n = reserved.saturating_sub(*running).min(room).min(plain_left[i]);
            ask(&mut out, name, Some(function), LeaseClass::Plain, n, &t.excluded);
            plain_left[i] -= n;
            room -= n;
            free -= n;
        }
        let n = plain_left[i].min(room);
        ask(&mut out, name, None, LeaseClass::Plain, n, &t.excluded);
        plain_left[i] -= n;
        free -= n;
    }

    // 2. Opportunistic work, each pass shared by weighted fair queueing: due and plain calls in
    // one pass (a tenant's due calls first within its grant, counted against it), then
    // deferrable ones with what is left. `wants` lists tenants in `order`, so ties go to the
    // tenant this round starts with.
    let mut budget = opportunistic.min(free);
    let mut served: Vec<f64> = order.iter().map(|(_, t)| t.served).collect();
    let weights: Vec<u32> = order.iter().map(|(_, t)| t.quota.weight.max(1)).collect();
    let held_reason = if over_target { WaitReason::Utilization } else { WaitReason::Quota };
    let wants: Vec<(f64, u32, u32)> =
        (0..order.len()).map(|i| (served[i], weights[i], due_left[i] + plain_left[i])).collect();
    let shares = fair_shares(&wants, budget);
    for (i, (name, t)) in order.iter().enumerate() {
        let share = shares[i];
        let due = share.min(due_left[i]);
        let plain = share - due;
        ask(&mut out, name, None, LeaseClass::Due, due, &t.excluded);
        ask(&mut out, name, None, LeaseClass::Plain, plain, &t.excluded);
        budget -= share;
        served[i] += f64::from(share);
        out.opportunistic += share;
        if due < due_left[i] {
            out.held.insert((name.to_string(), LeaseClass::Due), held_reason);
        }
        if plain < plain_left[i] {
            out.held.insert((name.to_string(), LeaseClass::Plain), held_reason);
        }
    }
    let wants: Vec<(f64, u32, u32)> =
        order.iter().enumerate().map(|(i, (_, t))| (served[i], weights[i], t.demand.deferrable)).collect();
    let shares = fair_shares(&wants, budget);
    for (i, (name, t)) in order.iter().enumerate() {
        ask(&mut out, name, None, LeaseClass::Deferrable, shares[i], &t.excluded);
        out.opportunistic += shares[i];
        if shares[i] < t.demand.deferrable {
            out.held.insert((name.to_string(), LeaseClass::Deferrable), WaitReason::StartWindow);
        }
    }
    out
}

/// Weighted fair shares of `budget` new calls. Each entry is `(served, weight, demand)`: every
/// call goes to the entry with the lowest `(served + granted) / weight` that still wants one
/// (ties to the earlier entry), so over many rounds each gets service in proportion to its
/// weight, and an entry that wants less leaves the rest to the others. Returns the grant of each
/// entry, in order; the grants sum to at most `budget`.
pub fn fair_shares(wants: &[(f64, u32, u32)], budget: u32) -> Vec<u32> {
    let mut grants = vec![0u32; wants.len()];
    // One call at a time: budgets are a round's worth of slots, and this is exact and
    // deterministic.
    for _ in 0..budget {
        let mut best: Option<(usize, f64)> = None;
        for (i, (served, weight, demand)) in wants.iter().enumerate() {
            if grants[i] >= *demand {
                continue;
            }
            let level = (served + f64::from(grants[i]) + 1.0) / f64::from((*weight).max(1));
            if best.is_none_or(|(_, b)| level < b) {
                best = Some((i, level));
            }
        }
        let Some((i, _)) = best else { break };
        grants[i] += 1;
    }
    grants
}

/// Each tenant's recent opportunistic service: a count of calls granted that decays by half
/// every [`SERVICE_HALF_LIFE_MS`], so a tenant idle for a while comes back with no debt and no
/// credit.
#[derive(Debug, Default, Clone)]
pub struct Service {
    served: HashMap<String, f64>,
    at: i64,
}

/// How fast past service is forgotten.
pub const SERVICE_HALF_LIFE_MS: i64 = 10_000;

impl Service {
    /// Decays everyone's service to `now`.
    pub fn decay_to(&mut self, now: i64) {
        let elapsed = now - self.at;
        if elapsed <= 0 {
            return;
        }
        let factor = 0.5f64.powf(elapsed as f64 / SERVICE_HALF_LIFE_MS as f64);
        self.served.retain(|_, s| {
            *s *= factor;
            *s > 0.01
        });
        self.at = now;
    }

    pub fn of(&self, tenant: &str) -> f64 {
        self.served.get(tenant).copied().unwrap_or(0.0)
    }

    pub fn add(&mut self, tenant: &str, calls: u32) {
        if calls > 0 {
            *self.served.entry(tenant.to_string()).or_default() += f64::from(calls);
        }
    }
}

/// Turns measured utilization into how many opportunistic calls may run on this node: a limit
/// that grows while the node is under its target (at most ×1.5 per adjustment, so admitted work
/// shows in the measurement before more is admitted) and shrinks in proportion when it is over.
#[derive(Debug, Clone)]
pub struct Pacer {
    /// Fraction of the node's cores guests may use before opportunistic work waits.
    pub target: f64,
    /// Most calls the limit can reach (the node's async slots).
    pub max: u32,
    limit: f64,
}

/// The opportunistic limit a node starts with, before it has measured anything.
pub const PACER_START: f64 = 2.0;

impl Pacer {
    pub fn new(target: f64, max: u32) -> Self {
        Self { target, max, limit: PACER_START.min(f64::from(max)) }
    }

    /// Adjusts the limit to `utilization` (fraction of the node's cores used by guests over the
    /// last measurement window) while `running` opportunistic calls run here, and returns it.
    pub fn adjust(&mut self, utilization: f64, running: u32) -> u32 {
        let max = f64::from(self.max);
        if utilization < self.target {
            // Grow only a limit that is in use: an idle node must not bank a limit that a later
            // flood would be admitted under all at once.
            if f64::from(running) + 1.0 >= self.limit * 0.5 {
                let factor = if utilization > 0.0 { (self.target / utilization).min(1.5) } else { 1.5 };
                self.limit = (self.limit * factor).max(self.limit + 1.0);
            }
        } else {
            self.limit *= self.target / utilization;
        }
        // Never 0: work without a deadline or a reservation still makes progress, one call at a
        // time, on a node whose own sync traffic keeps it over target.
        self.limit = self.limit.clamp(1.0, max.max(1.0));
        self.limit()
    }

    pub fn limit(&self) -> u32 {
        self.limit as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(plain: u32, deferrable: u32, due: u32) -> TenantDemand {
        TenantDemand { tenant: String::new(), due, plain, deferrable }
    }

    #[test]
    fn fair_shares_follow_weights_and_demand() {
        // Equal weights, both hungry: an even split.
        assert_eq!(fair_shares(&[(0.0, 1, 100), (0.0, 1, 100)], 10), vec![5, 5]);
        // A tenant asking for less leaves the rest to the other.
        assert_eq!(fair_shares(&[(0.0, 1, 2), (0.0, 1, 100)], 10), vec![2, 8]);
        // Weight 3 against 1.
        assert_eq!(fair_shares(&[(0.0, 3, 100), (0.0, 1, 100)], 8), vec![6, 2]);
        // A tenant served more recently waits until the other catches up.
        assert_eq!(fair_shares(&[(10.0, 1, 100), (0.0, 1, 100)], 6), vec![0, 6]);
        // Never more than the budget, never more than the demand.
        assert_eq!(fair_shares(&[(0.0, 1, 1), (0.0, 1, 1)], 10), vec![1, 1]);
    }

    #[test]
    fn service_decays_by_half_every_half_life() {
        let mut s = Service::default();
        s.add("a", 8);
        s.decay_to(SERVICE_HALF_LIFE_MS);
        assert!((s.of("a") - 4.0).abs() < 1e-9);
        s.decay_to(SERVICE_HALF_LIFE_MS * 20);
        assert_eq!(s.of("a"), 0.0);
    }

    #[test]
    fn due_and_reserved_work_start_over_target_and_the_rest_says_why() {
        let mut tenants = BTreeMap::new();
        tenants.insert(
            "a".to_string(),
            TenantInput {
                quota: Quota { reserved: 3, weight: 1 },
                demand: demand(10, 5, 2),
                running: 1,
                ..Default::default()
            },
        );
        tenants.insert("b".to_string(), TenantInput { demand: demand(10, 0, 0), ..Default::default() });
        let p = plan(&tenants, 100, 0, true, 0);
        let got: Vec<(&str, LeaseClass, u32)> =
            p.asks.iter().map(|a| (a.tenant.as_str(), a.class, a.limit)).collect();
        // a: 2 due; reserved 3 minus (1 running + 2 due) = 0 more plain. Nothing opportunistic.
        assert_eq!(got, vec![("a", LeaseClass::Due, 2)]);
        assert_eq!(p.held.get(&("a".into(), LeaseClass::Plain)), Some(&WaitReason::Utilization));
        assert_eq!(p.held.get(&("a".into(), LeaseClass::Deferrable)), Some(&WaitReason::StartWindow));
        assert_eq!(p.held.get(&("b".into(), LeaseClass::Plain)), Some(&WaitReason::Utilization));
    }

    /// `(tenant, function, class, limit)` of every ask, in order.
    fn asks(p: &Plan) -> Vec<(&str, Option<&str>, LeaseClass, u32)> {
        p.asks.iter().map(|a| (a.tenant.as_str(), a.function.as_deref(), a.class, a.limit)).collect()
    }

    #[test]
    fn due_calls_count_against_their_tenants_fair_share() {
        // One tenant sends only calls with a near deadline, the other plain calls; equal weights.
        let mut tenants = BTreeMap::new();
        tenants.insert("due".to_string(), TenantInput { demand: demand(0, 0, 50), ..Default::default() });
        tenants.insert("plain".to_string(), TenantInput { demand: demand(50, 0, 0), ..Default::default() });
        let p = plan(&tenants, 100, 10, false, 0);
        assert_eq!(asks(&p), vec![("due", None, LeaseClass::Due, 5), ("plain", None, LeaseClass::Plain, 5)]);
        assert_eq!(p.opportunistic, 10);
        assert_eq!(p.held.get(&("due".into(), LeaseClass::Due)), Some(&WaitReason::Quota));
        // Over target with the pacer's budget used up, due work without a reservation waits too.
        let p = plan(&tenants, 100, 0, true, 0);
        assert_eq!(asks(&p), vec![]);
        assert_eq!(p.held.get(&("due".into(), LeaseClass::Due)), Some(&WaitReason::Utilization));
    }

    #[test]
    fn due_calls_go_first_in_their_tenants_reservation_and_share() {
        let mut tenants = BTreeMap::new();
        tenants.insert(
            "a".to_string(),
            TenantInput {
                quota: Quota { reserved: 2, weight: 1 },
                demand: demand(10, 0, 3),
                ..Default::default()
            },
        );
        let p = plan(&tenants, 100, 4, false, 0);
        assert_eq!(
            asks(&p),
            vec![
                ("a", None, LeaseClass::Due, 2),
                ("a", None, LeaseClass::Due, 1),
                ("a", None, LeaseClass::Plain, 3)
            ]
        );
        // The reserved 2 start over target, the rest waits for the pacer.
        let p = plan(&tenants, 100, 0, true, 0);
        assert_eq!(asks(&p), vec![("a", None, LeaseClass::Due, 2)]);
    }

    #[test]
    fn function_reservations_are_capped_by_their_tenants_quota() {
        let mut tenants = BTreeMap::new();
        tenants.insert(
            "a".to_string(),
            TenantInput {
                quota: Quota { reserved: 2, weight: 1 },
                demand: demand(1000, 0, 0),
                function_reservations: vec![("big".into(), 100_000, 0)],
                ..Default::default()
            },
        );
        tenants.insert("b".to_string(), TenantInput { demand: demand(1000, 0, 0), ..Default::default() });
        // 2 reserved beyond an even split of the pacer's 10; b is not crowded out.
        let p = plan(&tenants, 200, 10, false, 0);
        assert_eq!(
            asks(&p),
            vec![
                ("a", Some("big"), LeaseClass::Plain, 2),
                ("a", None, LeaseClass::Plain, 5),
                ("b", None, LeaseClass::Plain, 5)
            ]
        );
        // Over target, only the 2.
        let p = plan(&tenants, 200, 0, true, 0);
        assert_eq!(asks(&p), vec![("a", Some("big"), LeaseClass::Plain, 2)]);
        // Several functions share the tenant's room: quota 3, one call of f running.
        let a = tenants.get_mut("a").unwrap();
        a.quota.reserved = 3;
        a.running = 1;
        a.function_reservations = vec![("f".into(), 2, 1), ("g".into(), 2, 0), ("h".into(), 5, 0)];
        let p = plan(&tenants, 200, 0, true, 0);
        assert_eq!(
            asks(&p),
            vec![("a", Some("f"), LeaseClass::Plain, 1), ("a", Some("g"), LeaseClass::Plain, 1)]
        );
        // A function's reservation in a tenant without one is nothing.
        let a = tenants.get_mut("a").unwrap();
        a.quota.reserved = 0;
        a.running = 0;
        assert_eq!(asks(&plan(&tenants, 200, 0, true, 0)), vec![]);
    }

    #[test]
    fn no_tenant_is_favoured_by_its_name() {
        // Both under their reservation, one free slot per round: they take turns.
        let mut tenants = BTreeMap::new();
        for name in ["a", "z"] {
            tenants.insert(
                name.to_string(),
                TenantInput {
                    quota: Quota { reserved: 10, weight: 1 },
                    demand: demand(100, 0, 0),
                    ..Default::default()
                },
            );
        }
        let mut winners = Vec::new();
        for round in 0..6 {
            let p = plan(&tenants, 1, 0, true, round);
            assert_eq!(p.asks.len(), 1, "{p:?}");
            let winner = p.asks[0].tenant.clone();
            tenants.get_mut(&winner).unwrap().running += 1;
            winners.push(winner);
        }
        assert_eq!(winners, ["a", "z", "a", "z", "a", "z"]);
        // No reservations and no recent service on either side (a tie in the fair share): the
        // same.
        let mut tenants = BTreeMap::new();
        for name in ["a", "z"] {
            tenants.insert(name.to_string(), TenantInput { demand: demand(100, 0, 0), ..Default::default() });
        }
        let winners: Vec<String> =
            (0..4).map(|round| plan(&tenants, 1, 1, false, round).asks[0].tenant.clone()).collect();
        assert_eq!(winners, ["a", "z", "a", "z"]);
    }

    #[test]
    fn deferrable_work_gets_only_what_plain_work_leaves() {
        let mut tenants = BTreeMap::new();
        tenants.insert("a".to_string(), TenantInput { demand: demand(3, 50, 0), ..Default::default() });
        let p = plan(&tenants, 100, 10, false, 0);
        let got: Vec<(LeaseClass, u32)> = p.asks.iter().map(|a| (a.class, a.limit)).collect();
        assert_eq!(got, vec![(LeaseClass::Plain, 3), (LeaseClass::Deferrable, 7)]);
        assert_eq!(p.opportunistic, 10);
        assert_eq!(p.held.get(&("a".into(), LeaseClass::Deferrable)), Some(&WaitReason::StartWindow));
    }

    #[test]
    fn the_pacer_grows_under_target_and_shrinks_over_it() {
        let mut p = Pacer::new(0.8, 256);
        assert_eq!(p.limit(), 2);
        // Under target with the limit in use: ×1.5 at most per adjustment.
        let mut last = p.limit();
        for _ in 0..5 {
            let now = p.adjust(0.1, last);
            assert!(now > last && f64::from(now) <= f64::from(last) * 1.5 + 1.0, "{last} -> {now}");
            last = now;
        }
        // An unused limit does not grow.
        assert_eq!(p.adjust(0.1, 0), last);
        // Over target: shrinks in proportion, never below 1.
        let over = p.adjust(1.6, last);
        assert_eq!(over, ((f64::from(last)) * 0.5) as u32);
        for _ in 0..20 {
            p.adjust(2.0, 1);
        }
        assert_eq!(p.limit(), 1);
    }
}
