//! Async invocations through the real binary: 202 only after a durable enqueue, runs with
//! retries, idempotency, start windows, crash recovery and graceful hand-back.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Node, assert_error, guests};

fn post_async(node: &Node, path: &str, headers: &[(&str, &str)], body: &str) -> reqwest::blocking::Response {
    let mut req = node
        .client()
        .post(format!("{}{path}", node.url))
        .bearer_auth(&node.token)
        .header("prefer", "respond-async")
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().unwrap()
}

fn accepted(res: reqwest::blocking::Response) -> String {
    assert_eq!(res.status(), 202);
    let location = res.headers()["location"].to_str().unwrap().to_string();
    let v: Value = res.json().unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("/v1/invocations/{id}"));
    id
}

fn wait_status(node: &Node, id: &str, status: &str) -> Value {
    node.wait_json(&format!("/v1/invocations/{id}"), |v| v["status"] == status)
}

fn rfc3339_in(offset_ms: i64) -> String {
    use sluice_core::Clock;
    sluice_core::rfc3339(sluice_core::SystemClock.now_ms() + offset_ms)
}

#[test]
fn async_call_is_accepted_run_and_its_response_kept() {
    let node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &[]);
    // A client cannot choose the id the guest sees.
    let forged = [("x-custom", "yes"), ("sluice-invocation-id", "forged")];
    let id = accepted(post_async(&node, "/fn/default/tg/headers?x=1", &forged, ""));
    let inv = wait_status(&node, &id, "succeeded");
    assert_eq!(inv["attempts"], 1);
    assert_eq!(inv["mode"], "async");
    assert_eq!(inv["status_code"], 200);
    assert!(inv["started_at"].is_string() && inv["finished_at"].is_string(), "{inv}");

    let res = node.get(&format!("/v1/invocations/{id}/response"));
    assert_eq!(res.status(), 200);
    let body = res.text().unwrap();
    assert!(body.contains(&format!("sluice-invocation-id: {id}")), "the guest sees the id: {body}");
    assert!(!body.contains("forged"), "the client's id reached the guest: {body}");
    assert!(body.contains("x-custom: yes"), "{body}");
    assert!(!body.to_lowercase().contains("authorization"), "{body}");

    // Echo: the stored body is replayed to the guest.
    let id = accepted(post_async(&node, "/fn/default/tg/echo", &[], "queued body"));
    wait_status(&node, &id, "succeeded");
    assert_eq!(node.get(&format!("/v1/invocations/{id}/response")).text().unwrap(), "queued body");
}

#[test]
fn failures_retry_then_die_and_4xx_is_a_result() {
    let node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &["--attempts", "2"]);
    let id = accepted(post_async(&node, "/fn/default/tg/status?code=503", &[], ""));
    let inv = wait_status(&node, &id, "dead");
    assert_eq!(inv["attempts"], 2, "{inv}");
    assert_eq!(inv["status_code"], 503);
    assert_eq!(inv["error_kind"], "server_error");

    let id = accepted(post_async(&node, "/fn/default/tg/panic", &[], ""));
    let inv = wait_status(&node, &id, "dead");
    assert_eq!((inv["attempts"].as_u64(), inv["error_kind"].as_str()), (Some(2), Some("trap")), "{inv}");

    let id = accepted(post_async(&node, "/fn/default/tg/status?code=404", &[], ""));
    let inv = wait_status(&node, &id, "succeeded");
    assert_eq!((inv["attempts"].as_u64(), inv["status_code"].as_u64()), (Some(1), Some(404)));
}

#[test]
fn idempotency_key_returns_the_first_invocation() {
    let node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &[]);
    let first = post_async(&node, "/fn/default/tg/ok", &[("idempotency-key", "order-42")], "");
    let first = accepted(first);
    let again = post_async(&node, "/fn/default/tg/ok", &[("idempotency-key", "order-42")], "");
    assert_eq!(again.headers()["sluice-idempotent-replay"], "true");
    assert_eq!(accepted(again), first);
    let other = accepted(post_async(&node, "/fn/default/tg/ok", &[("idempotency-key", "order-43")], ""));
    assert_ne!(other, first);
    wait_status(&node, &first, "succeeded");
}

/// A guessed key sent first, keyless, to a public function does not make the real call (with a
/// key) a replay: keys belong to their caller. The same caller reusing its key for another
/// request is refused (422); the same request again is still the first invocation.
#[test]
fn idempotency_keys_belong_to_their_caller_and_name_one_request() {
    let node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &["--public"]);
    let anonymous = |body: &str| {
        let req = node.client().post(format!("{}/fn/default/tg/echo", node.url));
        let req = req.header("prefer", "respond-async").header("idempotency-key", "evt_124");
        req.body(body.to_string()).send().unwrap()
    };
    let key = [("idempotency-key", "evt_124")];
    let forged = accepted(anonymous("forged"));
    let real = accepted(post_async(&node, "/fn/default/tg/echo", &key, "real"));
    assert_ne!(real, forged, "another caller's key is another invocation");
    let again = post_async(&node, "/fn/default/tg/echo", &key, "real");
    assert_eq!(again.headers()["sluice-idempotent-replay"], "true");
    assert_eq!(accepted(again), real);
    assert_eq!(accepted(anonymous("forged")), forged);

    let msg = assert_error(
        post_async(&node, "/fn/default/tg/echo", &key, "changed"),
        422,
        "idempotency_key_reused",
    );
    assert!(msg.contains("evt_124") && msg.contains("body"), "{msg}");
    let msg = assert_error(
        post_async(&node, "/fn/default/tg/echo?v=2", &key, "real"),
        422,
        "idempotency_key_reused",
    );
    assert!(msg.contains("path") && !msg.contains("body"), "{msg}");
    let all = node.get("/v1/invocations?tenant=default").json::<Value>().unwrap();
    assert_eq!(all["invocations"].as_array().unwrap().len(), 2, "refused calls stored nothing: {all}");
    let echoed = wait_status(&node, &real, "succeeded");
    assert_eq!(echoed["attempts"], 1, "{echoed}");
}

#[test]
fn bad_async_headers_name_the_header() {
    let node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &[]);
    let msg = assert_error(
        post_async(&node, "/fn/default/tg/ok", &[("sluice-start-after", "tomorrow")], ""),
        400,
        "bad_request",
    );
    assert!(msg.contains("sluice-start-after"), "{msg}");
    let msg = assert_error(
        post_async(&node, "/fn/default/tg/ok", &[("sluice-criticality", "urgent")], ""),
        400,
        "bad_request",
    );
    assert!(msg.contains("sluice-criticality"), "{msg}");
    let later = rfc3339_in(60_000);
    let sooner = rfc3339_in(30_000);
    let msg = assert_error(
        post_async(
            &node,
            "/fn/default/tg/ok",
            &[("sluice-start-after", &later), ("sluice-deadline", &sooner)],
            "",
        ),
        400,
        "bad_request",
    );
    assert!(msg.contains("sluice-deadline"), "{msg}");
    let long_key = "k".repeat(256);
    let msg = assert_error(
        post_async(&node, "/fn/default/tg/ok", &[("idempotency-key", &long_key)], ""),
        400,
        "bad_request",
    );
    assert!(msg.contains("Idempotency-Key"), "{msg}");
    let big = "x".repeat(1024 * 1024 + 1);
    assert_error(post_async(&node, "/fn/default/tg/echo", &[], &big), 413, "payload_too_large");
}

#[test]
fn start_window_defers_and_deadline_expires() {
    let node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &[]);
    let start = rfc3339_in(1500);
    let id = accepted(post_async(&node, "/fn/default/tg/ok", &[("sluice-start-after", &start)], ""));
    // Not started before its window opened, by the node's own account.
    let inv = wait_status(&node, &id, "succeeded");
    let started = inv["started_at"].as_str().and_then(sluice_core::parse_rfc3339);
    assert!(started >= sluice_core::parse_rfc3339(&start), "started before its window: {inv}");

    let past = rfc3339_in(-60_000);
    let id = accepted(post_async(&node, "/fn/default/tg/ok", &[("sluice-deadline", &past)], ""));
    let inv = wait_status(&node, &id, "expired");
    assert_eq!(inv["attempts"], 0, "an expired call never ran: {inv}");
}

#[test]
fn sigkill_loses_no_acknowledged_invocation() {
    let mut node = Node::start(&["--lease", "1s"]);
    node.deploy("tg", &guests().testguest, &[]);
    // Queued behind a start window, and running when the node dies.
    let start = rfc3339_in(1000);
    let queued: Vec<String> = (0..20)
        .map(|_| accepted(post_async(&node, "/fn/default/tg/ok", &[("sluice-start-after", &start)], "")))
        .collect();
    let running = accepted(post_async(&node, "/fn/default/tg/sleep?ms=1500", &[], ""));
    wait_status(&node, &running, "running");
    node.child.as_mut().unwrap().kill().unwrap();
    node.child.take().unwrap().wait().unwrap();
    node.spawn();
    for id in &queued {
        wait_status(&node, id, "succeeded");
    }
    let inv = node.wait_json(&format!("/v1/invocations/{running}"), |v| v["status"] == "succeeded");
    assert_eq!(inv["attempts"], 2, "the attempt cut off by SIGKILL counts, the lease was reclaimed: {inv}");
}

#[test]
fn graceful_shutdown_returns_running_calls_to_the_queue() {
    let mut node = Node::start(&["--shutdown-grace", "300ms"]);
    node.deploy("tg", &guests().testguest, &[]);
    let id = accepted(post_async(&node, "/fn/default/tg/sleep?ms=3000", &[], ""));
    wait_status(&node, &id, "running");
    let started = Instant::now();
    assert!(node.terminate().success());
    assert!(started.elapsed() < Duration::from_secs(3), "shutdown waited for the whole call");
    node.spawn();
    let inv = wait_status(&node, &id, "succeeded");
    assert_eq!(inv["attempts"], 1, "a released attempt does not count: {inv}");
}
