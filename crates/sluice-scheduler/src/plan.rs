//! The XFaaS policy of the async scheduler (DESIGN.md section 4), as pure functions of what the
//! loop measured: which runnable invocations a node leases in one round, and why the rest wait.
//!
//! Three kinds of capacity, granted in this order each round:
//! 1. **Due** work — a call whose deadline is near (within the promotion horizon) — starts
//!    whatever the node's load: no call misses a feasible deadline for want of a trough.
//! 2. **Reserved** work: a tenant (or a function) with reserved concurrency gets calls started up
//!    to its reservation, counted over the whole cluster, whatever the load.
//! 3. **Opportunistic** work, beyond reservations, only while the node is under its utilization
//!    target: the [`Pacer`] turns measured utilization into how many more calls may run here, and
//!    that budget is shared by weighted fair queueing over tenants: each call goes to the tenant
//!    whose recent opportunistic service divided by its weight is lowest (start-time fair
//!    queueing, with service decaying so that no tenant banks credit while idle). A tenant asking
//!    for less than its share leaves the rest to the others. Calls without a deadline are served
//!    before calls with a wide start window, which wait for a trough (time-shifting).
//!
//! Criticality orders work only within a tenant's grant (the store's order inside each class), so
//! a tenant that marks every call `high` gets its share and not more.
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
    /// The node was at or over its utilization target: only reserved and due work started.
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
/// `opportunistic` how many more the pacer allows beyond reserved and due work; `over_target`
/// whether the node measured itself at or over its utilization target (which names why work
/// waits). Tenants are processed in name order, so the plan is deterministic.
pub fn plan(
    tenants: &BTreeMap<String, TenantInput>,
    mut free: u32,
    opportunistic: u32,
    over_target: bool,
) -> Plan {
    let mut out = Plan::default();
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

    // 1. Due work starts whatever the load.
    let mut granted: HashMap<&str, u32> = HashMap::new();
    for (name, t) in tenants {
        let n = t.demand.due.min(free);
        ask(&mut out, name, None, LeaseClass::Due, n, &t.excluded);
        free -= n;
        *granted.entry(name).or_default() += n;
        if n < t.demand.due {
            out.held.insert((name.clone(), LeaseClass::Due), WaitReason::Quota);
        }
    }

    // 2. Reservations: a function's own first, then the tenant's.
    let mut plain_left: HashMap<&str, u32> =
        tenants.iter().map(|(n, t)| (n.as_str(), t.demand.plain)).collect();
    for (name, t) in tenants {
        let left = plain_left.get_mut(name.as_str()).expect("every tenant has an entry");
        for (function, reserved, running) in &t.function_reservations {
            let n = reserved.saturating_sub(*running).min(free).min(*left);
            ask(&mut out, name, Some(function), LeaseClass::Plain, n, &t.excluded);
            free -= n;
            *left -= n;
            *granted.entry(name).or_default() += n;
        }
        let used = t.running + granted.get(name.as_str()).copied().unwrap_or(0);
        let n = t.quota.reserved.saturating_sub(used).min(free).min(*left);
        ask(&mut out, name, None, LeaseClass::Plain, n, &t.excluded);
        free -= n;
        *left -= n;
        *granted.entry(name).or_default() += n;
    }

    // 3. Opportunistic work: plain first, then deferrable, each shared by weighted fair queueing.
    let mut budget = opportunistic.min(free);
    let mut served: Vec<f64> = tenants.values().map(|t| t.served).collect();
    for class in [LeaseClass::Plain, LeaseClass::Deferrable] {
        let wants: Vec<(f64, u32, u32)> = tenants
            .iter()
            .zip(&served)
            .map(|((name, t), served)| {
                let demand = match class {
                    LeaseClass::Plain => plain_left[name.as_str()],
                    _ => t.demand.deferrable,
                };
                (*served, t.quota.weight.max(1), demand)
            })
            .collect();
        let shares = fair_shares(&wants, budget);
        for (((name, t), share), served) in tenants.iter().zip(&shares).zip(served.iter_mut()) {
            ask(&mut out, name, None, class, *share, &t.excluded);
            budget -= share;
            *served += f64::from(*share);
            out.opportunistic += share;
            let demand = match class {
                LeaseClass::Plain => plain_left[name.as_str()],
                _ => t.demand.deferrable,
            };
            if *share < demand {
                let reason = match class {
                    LeaseClass::Deferrable => WaitReason::StartWindow,
                    _ if over_target => WaitReason::Utilization,
                    _ => WaitReason::Quota,
                };
                out.held.insert((name.to_string(), class), reason);
            }
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
        let p = plan(&tenants, 100, 0, true);
        let got: Vec<(&str, LeaseClass, u32)> =
            p.asks.iter().map(|a| (a.tenant.as_str(), a.class, a.limit)).collect();
        // a: 2 due; reserved 3 minus (1 running + 2 due) = 0 more plain. Nothing opportunistic.
        assert_eq!(got, vec![("a", LeaseClass::Due, 2)]);
        assert_eq!(p.held.get(&("a".into(), LeaseClass::Plain)), Some(&WaitReason::Utilization));
        assert_eq!(p.held.get(&("a".into(), LeaseClass::Deferrable)), Some(&WaitReason::StartWindow));
        assert_eq!(p.held.get(&("b".into(), LeaseClass::Plain)), Some(&WaitReason::Utilization));
    }

    #[test]
    fn deferrable_work_gets_only_what_plain_work_leaves() {
        let mut tenants = BTreeMap::new();
        tenants.insert("a".to_string(), TenantInput { demand: demand(3, 50, 0), ..Default::default() });
        let p = plan(&tenants, 100, 10, false);
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
