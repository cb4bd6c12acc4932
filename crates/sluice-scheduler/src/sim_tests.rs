//! The scheduling policy ([`crate::plan`]) against a simulated node: a clock that advances in
//! steps, a queue with the store's classes and orders, and an executor of `cores` cores shared
//! by the running calls (processor sharing). The loop mirrors the real one: every round the
//! pacer sees the utilization measured over the last [`PACE`], the planner turns demand into
//! asks, and the asks take calls from the queue in the store's order.

use std::collections::{BTreeMap, HashMap};

use sluice_store::{Criticality, LeaseClass, Quota, TenantDemand};

use crate::plan::{Pacer, Service, TenantInput, plan};

/// Milliseconds per simulation step (and per scheduling round).
const STEP: i64 = 10;
/// The pacer adjusts every this many milliseconds, as the real loop does (`PACE`).
const PACE_MS: i64 = 100;
const PROMOTE_AHEAD: i64 = 2_000;

#[derive(Debug, Clone)]
struct Call {
    id: u64,
    tenant: String,
    criticality: Criticality,
    deadline: Option<i64>,
    arrived: i64,
    /// CPU milliseconds it needs.
    work: f64,
}

#[derive(Debug)]
struct Started {
    call: Call,
    left: f64,
    opportunistic: bool,
}

struct Sim {
    now: i64,
    cores: f64,
    slots: u32,
    target: f64,
    quotas: HashMap<String, Quota>,
    queue: Vec<Call>,
    running: Vec<Started>,
    pacer: Pacer,
    busy_since_pace: f64,
    last_pace: i64,
    utilization: f64,
    next_id: u64,
    /// `(call, started at)` of every call started.
    log: Vec<(Call, i64)>,
    /// CPU used per second of simulated time.
    cpu_per_second: Vec<f64>,
    /// Tenants with an endless backlog: `(tenant, criticality, work, deadline from arrival)`,
    /// topped up every step to [`FLOOD_QUEUED`] queued calls (an endless queue without
    /// simulating every call of it).
    floods: Vec<(String, Criticality, f64, Option<i64>)>,
    service: Service,
    rounds: u64,
}

/// Queued calls a flooding tenant always has.
const FLOOD_QUEUED: usize = 300;

impl Sim {
    fn new(cores: f64, target: f64) -> Self {
        Self {
            now: 0,
            cores,
            slots: 256,
            target,
            quotas: HashMap::new(),
            queue: Vec::new(),
            running: Vec::new(),
            pacer: Pacer::new(target, 256),
            busy_since_pace: 0.0,
            last_pace: 0,
            utilization: 0.0,
            next_id: 0,
            log: Vec::new(),
            cpu_per_second: Vec::new(),
            floods: Vec::new(),
            service: Service::default(),
            rounds: 0,
        }
    }

    fn submit(&mut self, tenant: &str, criticality: Criticality, deadline: Option<i64>, work: f64) -> u64 {
        self.next_id += 1;
        let call = Call {
            id: self.next_id,
            tenant: tenant.to_string(),
            criticality,
            deadline,
            arrived: self.now,
            work,
        };
        self.queue.push(call);
        self.next_id
    }

    fn class_of(&self, c: &Call) -> LeaseClass {
        match c.deadline {
            None => LeaseClass::Plain,
            Some(d) if d <= self.now + PROMOTE_AHEAD => LeaseClass::Due,
            Some(_) => LeaseClass::Deferrable,
        }
    }

    fn flood(&mut self, tenant: &str, criticality: Criticality, work: f64) {
        self.floods.push((tenant.to_string(), criticality, work, None));
    }

    /// A flood of calls whose deadline is `deadline_in` after they arrive.
    fn flood_with_deadline(&mut self, tenant: &str, work: f64, deadline_in: i64) {
        self.floods.push((tenant.to_string(), Criticality::Normal, work, Some(deadline_in)));
    }

    /// One scheduling round, then `STEP` ms of execution.
    fn step(&mut self) {
        for (tenant, criticality, work, deadline_in) in self.floods.clone() {
            let queued = self.queue.iter().filter(|c| c.tenant == tenant).count();
            for _ in queued..FLOOD_QUEUED {
                self.submit(&tenant, criticality, deadline_in.map(|d| self.now + d), work);
            }
        }
        // Measure and pace, as the loop does every PACE.
        if self.now - self.last_pace >= PACE_MS {
            let span = (self.now - self.last_pace) as f64;
            let used = self.busy_since_pace / (span * self.cores);
            self.utilization = 0.6 * self.utilization + 0.4 * used;
            let opp = self.running.iter().filter(|s| s.opportunistic).count() as u32;
            self.pacer.adjust(self.utilization, opp);
            self.busy_since_pace = 0.0;
            self.last_pace = self.now;
        }
        let opp_running = self.running.iter().filter(|s| s.opportunistic).count() as u32;
        let opportunistic = self.pacer.limit().saturating_sub(opp_running);
        let over_target = self.utilization >= self.target;
        // Demand and running per tenant.
        let mut tenants: BTreeMap<String, TenantInput> = BTreeMap::new();
        for c in &self.queue {
            let class = self.class_of(c);
            let t = tenants.entry(c.tenant.clone()).or_insert_with(|| TenantInput {
                quota: self.quotas.get(&c.tenant).copied().unwrap_or_default(),
                demand: TenantDemand { tenant: c.tenant.clone(), ..Default::default() },
                ..Default::default()
            });
            match class {
                LeaseClass::Due => t.demand.due += 1,
                LeaseClass::Plain => t.demand.plain += 1,
                LeaseClass::Deferrable => t.demand.deferrable += 1,
            }
        }
        for s in &self.running {
            if let Some(t) = tenants.get_mut(&s.call.tenant) {
                t.running += 1;
            }
        }
        self.service.decay_to(self.now);
        for (name, t) in tenants.iter_mut() {
            t.served = self.service.of(name);
        }
        let free = self.slots.saturating_sub(self.running.len() as u32);
        let p = plan(&tenants, free, opportunistic, over_target, self.rounds);
        self.rounds += 1;
        let firm: u32 = p.asks.iter().map(|a| a.limit).sum::<u32>() - p.opportunistic;
        let mut seen = 0;
        for ask in &p.asks {
            let opportunistic = seen >= firm;
            seen += ask.limit;
            // The store's order within the class.
            let mut picked: Vec<usize> = (0..self.queue.len())
                .filter(|&i| self.queue[i].tenant == ask.tenant && self.class_of(&self.queue[i]) == ask.class)
                .collect();
            picked.sort_by_key(|&i| {
                let c = &self.queue[i];
                match ask.class {
                    LeaseClass::Due => (0, c.deadline.unwrap_or(i64::MAX), c.arrived, c.id),
                    _ => (c.criticality as i64, c.deadline.unwrap_or(i64::MAX), c.arrived, c.id),
                }
            });
            picked.truncate(ask.limit as usize);
            if opportunistic {
                self.service.add(&ask.tenant, picked.len() as u32);
            }
            picked.sort_unstable_by(|a, b| b.cmp(a));
            for i in picked {
                let call = self.queue.remove(i);
                self.log.push((call.clone(), self.now));
                self.running.push(Started { left: call.work, call, opportunistic });
            }
        }
        // Execute: processor sharing of the cores among the running calls.
        let n = self.running.len() as f64;
        if n > 0.0 {
            let per_call = (self.cores / n).min(1.0) * STEP as f64;
            let used = per_call * n;
            self.busy_since_pace += used;
            let second = (self.now / 1000) as usize;
            if self.cpu_per_second.len() <= second {
                self.cpu_per_second.resize(second + 1, 0.0);
            }
            self.cpu_per_second[second] += used / 1000.0;
            for s in &mut self.running {
                s.left -= per_call;
            }
            self.running.retain(|s| s.left > 0.0);
        }
        self.now += STEP;
    }

    fn run_until(&mut self, t: i64) {
        while self.now < t {
            self.step();
        }
    }

    fn started(&self, id: u64) -> Option<i64> {
        self.log.iter().find(|(c, _)| c.id == id).map(|(_, at)| *at)
    }

    fn running_of(&self, tenant: &str) -> usize {
        self.running.iter().filter(|s| s.call.tenant == tenant).count()
    }
}

#[test]
fn reserved_work_starts_within_its_bound_under_a_flood_of_opportunistic_work() {
    let mut sim = Sim::new(2.0, 0.8);
    sim.quotas.insert("gold".into(), Quota { reserved: 4, weight: 1 });
    sim.flood("flood", Criticality::High, 200.0);
    sim.run_until(10_000);
    // The flood holds the node at its target.
    assert!(sim.utilization > 0.6, "utilization {}", sim.utilization);
    let ids: Vec<u64> = (0..4).map(|_| sim.submit("gold", Criticality::Low, None, 50.0)).collect();
    let submitted = sim.now;
    sim.run_until(12_000);
    for id in ids {
        let at = sim.started(id).expect("reserved call started");
        assert!(at - submitted <= STEP, "a reserved call waited {} ms", at - submitted);
    }
}

#[test]
fn lent_capacity_is_reclaimed_when_its_owner_needs_it() {
    let mut sim = Sim::new(2.0, 0.8);
    sim.quotas.insert("owner".into(), Quota { reserved: 6, weight: 1 });
    sim.flood("borrower", Criticality::Normal, 100.0);
    sim.run_until(10_000);
    // With the owner idle, the borrower uses the node up to the target: 1.6 of 2 cores.
    let used: f64 = sim.cpu_per_second[5..10].iter().sum::<f64>() / 5.0;
    assert!((1.3..=1.9).contains(&used), "the borrower used {used:.2} cores");
    // The owner now keeps 6 calls busy: they start at once.
    sim.flood("owner", Criticality::Normal, 100.0);
    sim.run_until(10_000 + STEP);
    assert!(sim.running_of("owner") >= 6, "the owner gets its reservation back at once");
    // And the borrower, the node over target now, is squeezed to the one opportunistic call the
    // pacer always allows, within a few seconds.
    sim.run_until(15_000);
    assert!(sim.running_of("owner") >= 6);
    assert!(sim.running_of("borrower") <= 1, "the borrower still runs {}", sim.running_of("borrower"));
}

#[test]
fn a_tenant_marking_everything_high_gets_its_share_not_more() {
    let mut sim = Sim::new(2.0, 0.8);
    sim.flood("loud", Criticality::High, 50.0);
    sim.flood("quiet", Criticality::Low, 50.0);
    sim.run_until(60_000);
    let count = |t: &str| sim.log.iter().filter(|(c, _)| c.tenant == t).count() as f64;
    let (loud, quiet) = (count("loud"), count("quiet"));
    assert!(quiet > 100.0, "quiet ran {quiet}");
    let ratio = loud / quiet;
    assert!((0.9..=1.1).contains(&ratio), "loud {loud} quiet {quiet}");
}

#[test]
fn a_tenant_sending_only_near_deadlines_gets_its_share_not_more() {
    let mut sim = Sim::new(2.0, 0.8);
    // Every call of "hasty" is due the moment it arrives (its deadline is within the promotion
    // horizon); "patient" sends plain calls. Equal weights, no reservations.
    sim.flood_with_deadline("hasty", 50.0, PROMOTE_AHEAD / 2);
    sim.flood("patient", Criticality::Normal, 50.0);
    sim.run_until(60_000);
    let count = |t: &str| sim.log.iter().filter(|(c, _)| c.tenant == t).count() as f64;
    let (hasty, patient) = (count("hasty"), count("patient"));
    assert!(patient > 100.0, "patient ran {patient}");
    let ratio = hasty / patient;
    assert!((0.9..=1.1).contains(&ratio), "hasty {hasty} patient {patient}");
    // And the node stays at its target: due work beyond reservations is paced like the rest.
    let used: f64 = sim.cpu_per_second[30..60].iter().sum::<f64>() / 30.0;
    assert!(used <= 1.8, "the node used {used:.2} of 2 cores");
}

#[test]
fn weights_divide_opportunistic_capacity() {
    let mut sim = Sim::new(2.0, 0.8);
    sim.quotas.insert("heavy".into(), Quota { reserved: 0, weight: 3 });
    sim.flood("heavy", Criticality::Normal, 50.0);
    sim.flood("light", Criticality::Normal, 50.0);
    sim.run_until(60_000);
    let count = |t: &str| sim.log.iter().filter(|(c, _)| c.tenant == t).count() as f64;
    let ratio = count("heavy") / count("light");
    assert!((2.5..=3.5).contains(&ratio), "heavy/light {ratio}");
}

#[test]
fn no_call_misses_a_feasible_deadline_while_the_node_is_over_target() {
    let mut sim = Sim::new(2.0, 0.5);
    // A steady plain load that keeps the node over its target on its own.
    let mut windowed = Vec::new();
    for second in 0..60 {
        for _ in 0..30 {
            sim.submit("steady", Criticality::High, None, 50.0);
        }
        // Calls that can wait, with deadlines 5 to 30 s out: feasible (beyond the promotion
        // horizon plus their run time).
        for k in 0..5 {
            let deadline = sim.now + 5_000 + 5_000 * k;
            windowed.push((sim.submit("batch", Criticality::Low, Some(deadline), 50.0), deadline));
        }
        sim.run_until((second + 1) * 1000);
    }
    sim.run_until(100_000);
    for (id, deadline) in windowed {
        let at = sim.started(id).unwrap_or_else(|| panic!("call {id} never started"));
        assert!(at <= deadline, "call {id} started at {at}, after its deadline {deadline}");
    }
}

#[test]
fn time_shifting_flattens_a_day_shaped_load() {
    // A day of 240 s: arrivals follow a sine with peak-to-trough 4.3, 70% of them with a start
    // window of a day, on a node whose capacity at its target is the mean load; three days, the
    // third measured.
    let mut sim = Sim::new(2.0, 0.75);
    let period = 240_000i64;
    // The mean load is what the pacer holds this node at: 1.6 of 2 cores (calls that use a whole
    // core each, so the node's concurrency moves between 1 and 2 around a 0.75 target). Calls of
    // 50 ms.
    let mean_per_s = 32.0;
    let a = 3.3 / 5.3;
    let mut carry = 0.0;
    let mut arrivals = Vec::new();
    while sim.now < 3 * period {
        let phase = (sim.now as f64 / period as f64) * std::f64::consts::TAU;
        let rate = mean_per_s * (1.0 + a * phase.sin());
        carry += rate * STEP as f64 / 1000.0;
        while carry >= 1.0 {
            carry -= 1.0;
            let windowed = sim.next_id % 10 < 7;
            let deadline = windowed.then_some(sim.now + period);
            sim.submit(if windowed { "batch" } else { "web" }, Criticality::Normal, deadline, 50.0);
            arrivals.push(sim.now);
        }
        sim.step();
    }
    // Executed CPU per 10 s over the third day (the first days build the standing backlog).
    let buckets: Vec<f64> = sim.cpu_per_second[(2 * period / 1000) as usize..(3 * period / 1000) as usize]
        .chunks(10)
        .map(|c| c.iter().sum::<f64>() / c.len() as f64)
        .collect();
    let max = buckets.iter().cloned().fold(f64::MIN, f64::max);
    let min = buckets.iter().cloned().fold(f64::MAX, f64::min);
    assert!(max / min <= 1.3, "executed peak-to-trough {:.2} ({max:.2} / {min:.2} cores)", max / min);
    // And no call missed its deadline.
    for (c, at) in &sim.log {
        if let Some(d) = c.deadline {
            assert!(*at <= d, "a call started {} ms after its deadline", at - d);
        }
    }
}
