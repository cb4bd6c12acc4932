//! Rate limits, concurrency caps and load shedding against the live node: refusals are
//! immediate, say when to come back, and do no work.

use std::time::{Duration, Instant};

use crate::harness::{Node, assert_error, guests};

#[test]
fn function_rate_limit_answers_429_with_ratelimit_headers() {
    let node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &["--rate", "1/s", "--burst", "2"]);
    assert_eq!(node.get("/fn/default/tg/stdout").status(), 200);
    assert_eq!(node.get("/fn/default/tg/stdout").status(), 200);
    let res = node.get("/fn/default/tg/stdout");
    let id = res.headers()["sluice-invocation-id"].to_str().unwrap().to_string();
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(res.headers()["ratelimit-policy"], "\"function\";q=2;w=2");
    assert_eq!(res.headers()["ratelimit"], "\"function\";r=0;t=1");
    assert_error(res, 429, "rate_limited");
    // The bucket refills (one token a second): until it does, every call is refused the same way.
    let refilled = Instant::now() + Duration::from_secs(5);
    let later = loop {
        let res = node.get("/fn/default/tg/stdout");
        if res.status() == 200 {
            break res.headers()["sluice-invocation-id"].to_str().unwrap().to_string();
        }
        assert_error(res, 429, "rate_limited");
        assert!(Instant::now() < refilled, "the bucket did not refill");
        std::thread::sleep(Duration::from_millis(50));
    };
    // No work was done: the refused call never ran, so it left no invocation or logs behind. Sync
    // records are written in order, so once the later call's record is there, the refused one's
    // would be too.
    node.wait_json(&format!("/v1/invocations/{later}"), |v| v["status"] == "succeeded");
    assert_eq!(node.get(&format!("/v1/invocations/{id}")).status(), 404);
}

#[test]
fn tenant_rate_limit_covers_all_its_functions() {
    let node = Node::start(&["--tenant-rate", "2", "--tenant-burst", "3"]);
    node.deploy("a", &guests().hello, &[]);
    node.deploy("b", &guests().hello, &[]);
    let statuses: Vec<u16> = ["a", "b", "a", "b"]
        .iter()
        .map(|f| node.get(&format!("/fn/default/{f}/")).status().as_u16())
        .collect();
    assert_eq!(statuses, vec![200, 200, 200, 429]);
    let res = node.get("/fn/default/a/");
    assert_eq!(res.headers()["ratelimit-policy"], "\"tenant\";q=3;w=2");
    assert_error(res, 429, "rate_limited");
}

#[test]
fn concurrency_cap_refuses_at_once() {
    let node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &["--max-concurrency", "1"]);
    let slow = sleep_in_background(&node, 1500);
    node.wait_sync_in_flight(1);
    let started = Instant::now();
    let res = node.get("/fn/default/tg/ok");
    assert!(started.elapsed() < Duration::from_millis(500), "the refusal waited");
    assert_error(res, 429, "concurrency_limited");
    assert_eq!(slow.join().unwrap(), 200);
    node.wait_until_admitted("/fn/default/tg/ok", Duration::from_secs(2));
}

#[test]
fn flood_of_a_slow_function_is_shed_fast_and_admitted_calls_stay_bounded() {
    // One tenant may fill the node here: the node-wide bound is what this test is about.
    let node = Node::start(&["--sync-inflight-max", "8", "--tenant-share", "1"]);
    node.deploy("tg", &guests().testguest, &[]);
    let (url, token) = (node.url.clone(), node.token.clone());
    let threads: Vec<_> = (0..40)
        .map(|_| {
            let (url, token) = (url.clone(), token.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                let res = crate::harness::http()
                    .get(format!("{url}/fn/default/tg/sleep?ms=1000"))
                    .bearer_auth(token)
                    .send()
                    .unwrap();
                let retry_after = res.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
                (res.status().as_u16(), started.elapsed(), retry_after)
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let admitted: Vec<_> = results.iter().filter(|r| r.0 == 200).collect();
    let shed: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    assert_eq!(admitted.len() + shed.len(), 40, "only 200 or 503: {results:?}");
    assert!(admitted.len() >= 8 && !shed.is_empty(), "{} admitted, {} shed", admitted.len(), shed.len());
    // Bounds with room for a loaded machine (the suite runs its tests in parallel on 2 cores):
    // a shed call never waits for one of the 1 s sleeps, and admitted calls are never queued
    // behind each other (40 sleeps one after another would take 40 s).
    for (_, took, retry_after) in &shed {
        assert!(*took < Duration::from_millis(900), "a shed call waited {took:?}");
        assert_eq!(retry_after.as_deref(), Some("1"));
    }
    for (_, took, _) in &admitted {
        assert!(*took < Duration::from_secs(5), "an admitted call took {took:?}");
    }
    // Async enqueues are still accepted while the sync side sheds: the queue absorbs bursts.
    let res = node
        .client()
        .post(format!("{}/fn/default/tg/ok", node.url))
        .bearer_auth(&node.token)
        .header("prefer", "respond-async")
        .send()
        .unwrap();
    assert_eq!(res.status(), 202);
}

#[test]
fn a_tenants_own_limit_is_set_by_the_api_and_survives_a_restart() {
    let mut node = Node::start(&[]);
    node.deploy("hello", &guests().hello, &[]);
    let put = |node: &Node, body: serde_json::Value| {
        node.client()
            .put(format!("{}/v1/tenants/default/limits", node.url))
            .bearer_auth(&node.token)
            .json(&body)
            .send()
            .unwrap()
    };
    let res = put(&node, serde_json::json!({ "rate_per_sec": 0.5, "burst": 2 }));
    assert_eq!(res.status(), 200);
    assert_error(put(&node, serde_json::json!({ "rate_per_sec": 5e-324 })), 400, "bad_request");
    let statuses = |node: &Node| -> Vec<u16> {
        (0..3).map(|_| node.get("/fn/default/hello/").status().as_u16()).collect()
    };
    assert_eq!(statuses(&node), vec![200, 200, 429]);

    assert!(node.terminate().success());
    node.spawn();
    assert_eq!(statuses(&node), vec![200, 200, 429], "the limit was stored");
    assert_eq!(put(&node, serde_json::json!({ "rate_per_sec": null })).status(), 200);
    assert_eq!(statuses(&node), vec![200, 200, 200], "cleared");
}

#[test]
fn redeploying_resets_neither_the_bucket_nor_the_calls_in_flight() {
    let node = Node::start(&[]);
    let flags = ["--rate", "1/min", "--burst", "1", "--max-concurrency", "1"];
    node.deploy("tg", &guests().testguest, &flags);
    let slow = sleep_in_background(&node, 4000);
    node.wait_sync_in_flight(1);
    let out = node.deploy("tg", &guests().testguest, &flags);
    assert!(out.contains("version 2"), "{out}");
    // The only token of the minute went to the slow call, which is still running on version 1.
    assert_error(node.get("/fn/default/tg/ok"), 429, "rate_limited");
    assert!(!slow.is_finished(), "the slow call ended before the check; the test proves nothing");

    // A new rate starts a new bucket; the call in flight on version 1 still holds the only slot.
    node.deploy("tg", &guests().testguest, &["--rate", "100/s", "--max-concurrency", "1"]);
    assert_error(node.get("/fn/default/tg/ok"), 429, "concurrency_limited");
    assert!(!slow.is_finished(), "the slow call ended before the check; the test proves nothing");
    assert_eq!(slow.join().unwrap(), 200);
    node.wait_until_admitted("/fn/default/tg/ok", Duration::from_secs(2));
}

/// Calls the test guest's `sleep` mode for `ms` from another thread; joins to its status.
fn sleep_in_background(node: &Node, ms: u64) -> std::thread::JoinHandle<u16> {
    let (url, token) = (node.url.clone(), node.token.clone());
    std::thread::spawn(move || {
        crate::harness::http()
            .get(format!("{url}/fn/default/tg/sleep?ms={ms}"))
            .bearer_auth(token)
            .send()
            .unwrap()
            .status()
            .as_u16()
    })
}

#[test]
fn a_tenants_flood_of_slow_calls_takes_its_share_of_the_node_and_others_are_served() {
    // Eight sync calls in flight on the node; a tenant's share is a quarter of them, two.
    let node = Node::start(&["--sync-inflight-max", "8"]);
    node.deploy("tg", &guests().testguest, &[]);
    let (ok, out, err) = node.cli(&["tenants", "create", "mallory"]);
    assert!(ok, "{out}{err}");
    node.deploy("tg", &guests().testguest, &["--tenant", "mallory", "--public"]);
    let url = node.url.clone();
    // Sixteen slow calls of mallory's public function at once, without a key.
    let flood: Vec<_> = (0..16)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let res =
                    crate::harness::http().get(format!("{url}/fn/mallory/tg/sleep?ms=2000")).send().unwrap();
                let code = res.headers().get("sluice-error").map(|v| v.to_str().unwrap().to_string());
                (res.status().as_u16(), code, res.headers().contains_key("retry-after"))
            })
        })
        .collect();
    // Mallory's share of the node (two) is taken.
    node.wait_sync_in_flight(2);
    // While mallory's admitted calls sleep, another tenant's calls are served.
    for _ in 0..5 {
        assert_eq!(
            node.get("/fn/default/tg/ok").status(),
            200,
            "tenant default was refused during mallory's flood"
        );
    }
    let answers: Vec<_> = flood.into_iter().map(|t| t.join().unwrap()).collect();
    let admitted = answers.iter().filter(|a| a.0 == 200).count();
    assert!(admitted >= 2, "mallory's share was admitted: {answers:?}");
    assert!(
        answers
            .iter()
            .all(|a| a.0 == 200 || (a.0 == 429 && a.1.as_deref() == Some("concurrency_limited") && a.2)),
        "the rest was refused with 429 concurrency_limited and Retry-After: {answers:?}"
    );
    assert!(admitted < 16, "nothing of mallory's was refused: {answers:?}");
}
