//! CPU lanes: a call that outgrows the fast lane moves to the slow lane (and says so in its
//! logs), a tenant's slow-lane slots are bounded and waiting for one counts against the timeout,
//! CPU time is recorded, and a client that goes away cancels its call. The heavy engine's slots,
//! which calls also wait for, are shared out per tenant.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Node, assert_error, guests};

/// The hostile tenant's test guest, and hello in `default`.
fn node_with_mallory(serve_flags: &[&str], tg_flags: &[&str]) -> Node {
    let node = Node::start(serve_flags);
    let (ok, out, err) = node.cli(&["tenants", "create", "mallory"]);
    assert!(ok, "{out}{err}");
    let mut flags = vec!["--tenant", "mallory"];
    flags.extend_from_slice(tg_flags);
    node.deploy("tg", &guests().testguest, &flags);
    node.deploy("hello", &guests().hello, &[]);
    node
}

fn logs_of(node: &Node, id: &str) -> String {
    node.wait_json(&format!("/v1/invocations/{id}/logs"), |v| !v["lines"].as_array().unwrap().is_empty())
        .to_string()
}

#[test]
fn spinning_guests_move_to_the_slow_lane_and_wait_for_their_tenants_slots() {
    // Two HTTP workers, pinned, and four spinners: enough to take every worker without lanes. The
    // tenant may run one call on the slow lane at a time.
    let node = node_with_mallory(&["--workers", "2", "--slow-lane-tenant-slots", "1"], &["--timeout", "3s"]);
    let (url, token) = (node.url.clone(), node.token.clone());
    let spinners: Vec<_> = (0..4)
        .map(|_| {
            let (url, token) = (url.clone(), token.clone());
            std::thread::spawn(move || {
                let c = crate::harness::http_builder().timeout(Duration::from_secs(30)).build().unwrap();
                let res = c.get(format!("{url}/fn/mallory/tg/spin")).bearer_auth(token).send().unwrap();
                let id = res.headers()["sluice-invocation-id"].to_str().unwrap().to_string();
                let message = assert_error(res, 504, "timeout");
                (id, message)
            })
        })
        .collect();
    node.wait_sync_in_flight(4);
    let client = node.client();
    let mut slowest = Duration::ZERO;
    for _ in 0..50 {
        let started = Instant::now();
        let res = client.get(format!("{url}/fn/default/hello/")).bearer_auth(&token).send().unwrap();
        assert_eq!(res.status(), 200);
        slowest = slowest.max(started.elapsed());
    }
    assert!(slowest < Duration::from_secs(1), "a neighbour call took {slowest:?} while guests spun");
    let done: Vec<(String, String)> = spinners.into_iter().map(|s| s.join().unwrap()).collect();
    // One slot: while one spinner ran, the others waited, and their timeout says so.
    let waited = done.iter().filter(|(_, m)| m.contains("waited")).count();
    assert!(waited >= 3, "three spinners waited for mallory's only slot: {done:?}");
    for (id, _) in &done {
        let logs = logs_of(&node, id);
        assert!(logs.contains("moved to a slow-lane slot"), "{logs}");
    }
}

#[test]
fn cpu_time_is_recorded_for_sync_and_async_calls() {
    let node = node_with_mallory(&[], &["--public"]);
    // A sync call that computes for 100 ms of wall time: moved to the slow lane (a log line, so
    // it is recorded). Its CPU time is at least the fast-lane slice and at most its wall time
    // (other tests compete for the cores, so it may get less than all of it).
    let res = node.get("/fn/mallory/tg/burn?ms=100");
    assert_eq!(res.status(), 200);
    let id = res.headers()["sluice-invocation-id"].to_str().unwrap().to_string();
    let inv = node.wait_json(&format!("/v1/invocations/{id}"), |v| v["cpu_ms"].is_number());
    assert_cpu_between(&inv, 2.0, 1_000.0);
    assert!(logs_of(&node, &id).contains("moved to a slow-lane slot"));

    // The same, queued: the attempt's CPU time is in the invocation, also through the CLI.
    let res = node
        .client()
        .post(format!("{}/fn/mallory/tg/burn?ms=100", node.url))
        .header("prefer", "respond-async")
        .send()
        .unwrap();
    assert_eq!(res.status(), 202);
    let id = res.headers()["sluice-invocation-id"].to_str().unwrap().to_string();
    node.wait_json(&format!("/v1/invocations/{id}"), |v| v["status"] == "succeeded");
    let (ok, out, err) = node.cli(&["invocations", "get", &id]);
    assert!(ok, "{err}");
    let inv: Value = serde_json::from_str(&out).unwrap();
    assert_cpu_between(&inv, 2.0, 1_000.0);
    // It ran on the slow lane's threads from the start, and took a slot once over its slice.
    assert!(logs_of(&node, &id).contains("moved to a slow-lane slot"));

    // A short call is recorded with its (small) time too. On the fast lane that time is wall
    // time inside the call's polls, which includes any preemption by the OS: under the load of a
    // parallel test run it is not bounded tightly, so only its order of magnitude is checked.
    let res = node.get("/fn/mallory/tg/stdout");
    let id = res.headers()["sluice-invocation-id"].to_str().unwrap().to_string();
    let inv = node.wait_json(&format!("/v1/invocations/{id}"), |v| v["cpu_ms"].is_number());
    assert_cpu_between(&inv, 0.001, 100.0);
}

fn assert_cpu_between(inv: &Value, low_ms: f64, high_ms: f64) {
    let cpu = inv["cpu_ms"].as_f64().unwrap_or(-1.0);
    assert!(cpu >= low_ms && cpu <= high_ms, "cpu_ms not in [{low_ms}, {high_ms}]: {inv}");
}

#[test]
fn a_client_that_goes_away_cancels_its_call_and_frees_its_slot() {
    let node = node_with_mallory(&[], &["--timeout", "20s", "--max-concurrency", "1", "--public"]);
    let impatient = crate::harness::http_builder().timeout(Duration::from_millis(500)).build().unwrap();
    let started = Instant::now();
    let err = impatient.get(format!("{}/fn/mallory/tg/spin", node.url)).send().unwrap_err();
    assert!(err.is_timeout(), "{err}");
    // The only concurrency slot comes back once the guest is stopped, long before its timeout.
    node.wait_until_admitted("/fn/mallory/tg/ok", Duration::from_secs(10));
    assert!(started.elapsed() < Duration::from_secs(10));
    let page = node.wait_json("/v1/invocations?tenant=mallory&function=tg&status=dead", |v| {
        v["invocations"].as_array().unwrap().iter().any(|i| i["error_kind"] == "client_closed")
    });
    assert!(page.to_string().contains("client_closed"), "{page}");
}

/// The heavy slots are shared out per tenant: a tenant's queue of slow heavy calls does not
/// make another tenant's heavy call wait behind it. Calls wait for a heavy slot rather than
/// being refused; the first slot freed goes to the tenant holding less than its share.
#[test]
fn a_tenants_queue_of_slow_heavy_calls_does_not_hold_back_another_tenants_heavy_call() {
    // Every component is heavy here (the test guest starts with about 1 MiB); two heavy slots,
    // a tenant's share of them one.
    let node =
        Node::start(&["--heavy-from", "64KiB", "--heavy-slots-max", "2", "--heavy-instances-max", "16"]);
    node.deploy("tg", &guests().testguest, &[]);
    let (ok, out, err) = node.cli(&["tenants", "create", "mallory"]);
    assert!(ok, "{out}{err}");
    node.deploy("tg", &guests().testguest, &["--tenant", "mallory"]);
    assert_eq!(node.get("/v1/node").json::<Value>().unwrap()["heavy"]["slots_max"], 2);

    // Mallory: eight calls of 1.5 s at once; two run, six wait for a slot.
    let done = Arc::new(AtomicUsize::new(0));
    let flood: Vec<_> = (0..8)
        .map(|_| {
            let (url, token, done) = (node.url.clone(), node.token.clone(), done.clone());
            std::thread::spawn(move || {
                let res = crate::harness::http()
                    .get(format!("{url}/fn/mallory/tg/sleep?ms=1500"))
                    .bearer_auth(token)
                    .timeout(Duration::from_secs(60))
                    .send()
                    .unwrap();
                let status = res.status().as_u16();
                done.fetch_add(1, Ordering::SeqCst);
                status
            })
        })
        .collect();
    node.wait_json("/v1/node", |v| v["heavy"]["slots_in_use"] == 2);
    // The other six are in the node too, waiting for a slot.
    node.wait_sync_in_flight(8);
    assert_eq!(done.load(Ordering::SeqCst), 0, "mallory's first calls ended before the queue formed");

    // Tenant default's heavy call gets the first slot mallory frees, not the seventh.
    let began = Instant::now();
    let res = node.get("/fn/default/tg/ok");
    let waited = began.elapsed();
    let mallory_done = done.load(Ordering::SeqCst);
    assert_eq!(res.status(), 200);
    eprintln!("default's heavy call took {waited:?}; {mallory_done} of mallory's 8 calls had ended");
    assert!(
        mallory_done <= 2,
        "default's call waited until {mallory_done} of mallory's calls had ended ({waited:?}): it queued \
         behind mallory's"
    );
    let statuses: Vec<u16> = flood.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(statuses.iter().all(|s| *s == 200), "mallory's calls all ran in the end: {statuses:?}");
    node.wait_json("/v1/node", |v| v["heavy"]["slots_in_use"] == 0);
}
