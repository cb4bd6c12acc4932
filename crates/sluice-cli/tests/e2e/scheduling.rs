//! XFaaS scheduling through the real binary: quotas and usage, why an invocation waited,
//! time-shifting of calls with a wide start window, and a saturated downstream.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Node, assert_error, guests};

fn status(node: &Node, id: &str) -> String {
    node.get(&format!("/v1/invocations/{id}")).json::<Value>().unwrap()["status"]
        .as_str()
        .unwrap()
        .to_string()
}

fn rfc3339_in(offset_ms: i64) -> String {
    use sluice_core::Clock;
    sluice_core::rfc3339(sluice_core::SystemClock.now_ms() + offset_ms)
}

#[test]
fn quotas_are_set_through_the_cli_and_shown_in_usage_and_waits() {
    let node = Node::start(&[]);
    let (ok, out, err) = node.cli(&["tenants", "quota", "default", "--reserved", "2", "--weight", "3"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("reserved 2, weight 3"), "{out}");
    let q: Value = node.get("/v1/tenants/default/quota").json().unwrap();
    assert_eq!(q, json!({"reserved": 2, "weight": 3}));
    // Bad input gets a clear error and changes nothing.
    let res = node
        .client()
        .put(format!("{}/v1/tenants/default/quota", node.url))
        .bearer_auth(&node.token)
        .json(&json!({"reserved": 1, "weight": 0}))
        .send()
        .unwrap();
    let message = assert_error(res, 400, "bad_request");
    assert!(message.contains("weight must be between 1 and 1000"), "{message}");
    assert_eq!(node.get("/v1/tenants/default/quota").json::<Value>().unwrap()["weight"], 3);
    let (ok, _, err) = node.cli(&["tenants", "quota", "nobody", "--reserved", "1"]);
    assert!(!ok && err.contains("nobody"), "{err}");

    node.deploy("tg", &guests().testguest, &[]);
    let id = node.enqueue("/fn/default/tg/ok", &[]);
    let inv = node.wait_json(&format!("/v1/invocations/{id}"), |v| v["status"] == "succeeded");
    // Leased at once: a wait of (nearly) nothing, with no reason.
    assert!(inv["waits"]["queued_ms"].as_i64().is_some_and(|ms| ms < 5_000), "{inv}");
    let usage: Value = node.get("/v1/tenants/default/usage").json().unwrap();
    let a = &usage["async"];
    assert_eq!(
        (a["reserved"].as_u64(), a["weight"].as_u64(), a["queued"].as_u64()),
        (Some(2), Some(3), Some(0))
    );
    assert!(a["node_utilization_target"].as_f64() == Some(0.8), "{usage}");
    let (ok, out, _) = node.cli(&["tenants", "usage", "default"]);
    assert!(ok && out.contains("reserved 2, weight 3"), "{out}");
}

/// Time-shifting, judged by what the node reports rather than by timing: while it says it is
/// over its target, a call with a wide start window is held for its window and a call near its
/// deadline (within its tenant's reservation) runs; once the load stops, the held call runs in
/// the trough, long before its deadline would have promoted it.
#[test]
fn a_wide_start_window_waits_for_a_trough_and_a_near_deadline_does_not() {
    // Async calls start on the slow lane's SCHED_IDLE threads, which another test's compile
    // starves.
    let _heavy = crate::harness::cpu_heavy();
    let node =
        Node::start(&["--utilization-target", "0.05", "--promote-ahead", "10s", "--fast-lane-slice", "1s"]);
    node.deploy("tg", &guests().testguest, &[]);
    // A deadline is kept whatever the load within a reservation (beyond it, a due call waits for
    // its tenant's fair share like any other): `gold` holds one.
    let (ok, out, err) = node.cli(&["tenants", "create", "gold"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = node.cli(&["tenants", "quota", "gold", "--reserved", "1"]);
    assert!(ok, "{out}{err}");
    node.deploy("tg", &guests().testguest, &["--tenant", "gold"]);

    // The load that puts the node over its target is sync calls: with a fast-lane slice longer
    // than each of them they stay on their HTTP worker at normal priority, so a loaded machine
    // slows them but cannot starve them. (Async burns run on the slow lane: on CI they barely
    // ran, and the node stayed under its target.)
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (url, token, stop) = (node.url.clone(), node.token.clone(), stop.clone());
        std::thread::spawn(move || {
            let client = crate::harness::http();
            while !stop.load(Ordering::Relaxed) {
                let res = client.get(format!("{url}/fn/default/tg/burn?ms=300")).bearer_auth(&token).send();
                assert_eq!(res.unwrap().status(), 200);
            }
        })
    };
    node.wait_json("/v1/tenants/default/usage", |u| {
        u["async"]["node_utilization"].as_f64().is_some_and(|u| u > 0.05)
    });
    // Over target, the pacer allows one opportunistic call at a time: async calls without a
    // deadline take it (they sleep, so the slow lane's priority does not matter)...
    let plain: Vec<String> = (0..2).map(|_| node.enqueue("/fn/default/tg/sleep?ms=20000", &[])).collect();
    node.wait_json(&format!("/v1/invocations/{}", plain[0]), |v| v["status"] == "running");

    // ...and a call that may start any time in the next minute is held back for its window...
    let wide_deadline = rfc3339_in(60_000);
    let wide = node.enqueue("/fn/default/tg/ok", &[("sluice-deadline", &wide_deadline)]);
    node.wait_json("/v1/tenants/default/usage", |u| {
        u["async"]["waiting"]["deferrable"] == "start_window" && u["async"]["queued_windowed"] == 1
    });
    // ...while one whose deadline is within the promotion horizon, within its tenant's
    // reservation, runs all the same.
    let due = node.enqueue("/fn/gold/tg/ok", &[("sluice-deadline", &rfc3339_in(8_000))]);
    let inv = node.wait_json(&format!("/v1/invocations/{due}"), |v| v["status"] == "succeeded");
    assert!(inv["waits"]["queued_ms"].as_i64().is_some_and(|ms| ms < 8_000), "{inv}");
    assert_eq!(
        status(&node, &wide),
        "queued",
        "a call with a wide window ran while the node was over target"
    );

    // The load stops: in the trough the pacer allows more, the held call runs (the plain calls
    // still sleeping), and it says why it waited.
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let inv = node.wait_json(&format!("/v1/invocations/{wide}"), |v| v["status"] == "succeeded");
    assert_eq!(status(&node, &plain[0]), "running", "the held call ran only after the plain ones");
    assert!(inv["waits"]["start_window_ms"].as_i64().is_some_and(|ms| ms > 0), "{inv}");
    let started = inv["started_at"].as_str().and_then(sluice_core::parse_rfc3339).unwrap();
    let promoted = sluice_core::parse_rfc3339(&wide_deadline).unwrap() - 10_000;
    assert!(started < promoted, "the wide call ran only when its deadline promoted it: {inv}");
}

#[test]
fn a_function_reserves_at_most_its_tenants_reserved_quota() {
    let node = Node::start(&[]);
    let wasm = guests().testguest.to_str().unwrap().to_string();
    // The tenant holds no reservation: its functions cannot reserve any, and the deploy says
    // who can change that.
    let (ok, out, err) = node.cli(&["deploy", "tg", &wasm, "--reserved", "3"]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("reserved quota of 0") && err.contains("sluice tenants quota default --reserved N"),
        "{err}"
    );
    // Through the API, a JSON error; within the quota, a deploy.
    node.deploy("tg", &guests().testguest, &[]);
    let digest = node.get("/v1/tenants/default/functions/tg").json::<Value>().unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let deploy = |reserved: u32| {
        node.client()
            .post(format!("{}/v1/tenants/default/functions/tg/versions", node.url))
            .bearer_auth(&node.token)
            .json(&json!({"digest": digest, "config": {"reserved_concurrency": reserved}}))
            .send()
            .unwrap()
    };
    let (ok, out, err) = node.cli(&["tenants", "quota", "default", "--reserved", "2"]);
    assert!(ok, "{out}{err}");
    let message = assert_error(deploy(100_000), 400, "bad_request");
    assert!(
        message.contains("reserved concurrency 100000 is more than tenant default's reserved quota of 2"),
        "{message}"
    );
    let res = deploy(2);
    assert_eq!(res.status().as_u16(), 201, "{}", res.text().unwrap());
    let latest: Value = node.get("/v1/tenants/default/functions/tg").json().unwrap();
    assert_eq!(latest["config"]["reserved_concurrency"], 2, "{latest}");
}

/// A downstream that answers 503 after `delay` to every request, counting them.
fn overloaded_downstream(delay: Duration) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                // The whole request, so that closing never resets the connection.
                if crate::harness::read_request(&mut stream).is_none() {
                    return;
                }
                let mut buf = [0u8; 4096];
                std::thread::sleep(delay);
                let _ = stream.write_all(
                    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\nconnection: close\r\n\r\nbusy",
                );
                // A graceful close: the client's end first, so no reset can overtake the answer.
                let _ = stream.shutdown(std::net::Shutdown::Write);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    port
}

/// A downstream at its concurrency limit makes its function saturated: a sync call is refused at
/// once (503, Retry-After), and an async call is not lost. (The scheduler does not hold a
/// saturated function's queued calls: that hold is switched off, see `NodeFunctions::saturated`
/// in sluice-node. The call is leased, waits for a permit inside the guest, bounded by the
/// connect timeout, and is retried if it must; it runs once the request in flight ends.)
#[test]
fn a_saturated_downstream_refuses_sync_calls_and_async_ones_still_run() {
    let port = overloaded_downstream(Duration::from_millis(1500));
    let node = Node::start(&["--outbound-allow-private"]);
    let target = format!("127.0.0.1:{port}");
    node.deploy("tg", &guests().testguest, &["--allow-outbound", &target]);
    let fetch = format!("/fn/default/tg/fetch?url=http://{target}/");
    // Overloads halve the limit (2 to 1; once per cooldown, so one after the other). A call's
    // own answer does not matter here (a loaded machine can reset the stub's connection).
    let overloaded = Instant::now() + Duration::from_secs(30);
    loop {
        let _ = node.get(&fetch).text();
        let list: Value = node.get("/v1/tenants/default/functions/tg/downstreams").json().unwrap();
        if list["downstreams"][0]["limit"] == 1
            && list["downstreams"][0]["overloads_total"].as_u64() >= Some(2)
        {
            break;
        }
        assert!(Instant::now() < overloaded, "the limit did not come down: {list}");
    }
    let list: Value = node.get("/v1/tenants/default/functions/tg/downstreams").json().unwrap();
    let host = &list["downstreams"][0];
    assert_eq!((host["host"].as_str(), host["limit"].as_u64()), (Some(target.as_str()), Some(1)), "{list}");

    // One request in flight fills the limit: the function is saturated while it lasts.
    let url = format!("{}{fetch}", node.url);
    let token = node.token.clone();
    let in_flight = std::thread::spawn(move || {
        let res = crate::harness::http().get(url).bearer_auth(token).send().unwrap();
        (res.status(), res.text().unwrap())
    });
    node.wait_json("/v1/tenants/default/functions/tg/downstreams", |v| v["saturated"] == true);
    let res = node.get(&fetch);
    assert!(res.headers().contains_key("retry-after"), "{:?}", res.headers());
    let message = assert_error(res, 503, "overloaded");
    assert!(message.contains("downstream"), "{message}");
    let queued = node.enqueue(&fetch, &[]);

    let (code, body) = in_flight.join().unwrap();
    assert_eq!(code, 200, "{body}");
    let inv = node.wait_json(&format!("/v1/invocations/{queued}"), |v| v["status"] == "succeeded");
    assert_eq!(inv["status_code"], 200, "{inv}");
}
