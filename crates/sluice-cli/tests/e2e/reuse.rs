//! `deploy --reuse N`: one instance serves up to N calls, one after another, of one version of
//! one function of one tenant, and only after clean calls. The test guest's `/count` answers how
//! many calls its instance has served (a global counter) and logs it.

use serde_json::Value;

use crate::harness::{Node, guests};

fn count(node: &Node, function: &str) -> (u64, String) {
    count_as(node, &node.token, "default", function)
}

/// Waits until every call of a function with reuse has ended: its instance is back in its pool
/// (or dropped). A client has the response a moment before the guest's task ends.
fn settle(node: &Node) {
    node.wait_json("/v1/node", |v| {
        let w = &v["warm"];
        w["ended_total"].as_u64()
            == Some(w["reused_total"].as_u64().unwrap() + w["fresh_total"].as_u64().unwrap())
    });
}

fn count_as(node: &Node, key: &str, tenant: &str, function: &str) -> (u64, String) {
    settle(node);
    let res = node
        .client()
        .get(format!("{}/fn/{tenant}/{function}/count", node.url))
        .bearer_auth(key)
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    let id = res.headers()["sluice-invocation-id"].to_str().unwrap().to_string();
    let body = res.text().unwrap();
    let n = body.strip_prefix("count ").unwrap_or_else(|| panic!("{body}")).parse().unwrap();
    (n, id)
}

fn counts(node: &Node, function: &str, n: usize) -> Vec<u64> {
    (0..n).map(|_| count(node, function).0).collect()
}

fn log_lines(node: &Node, id: &str) -> Vec<String> {
    let v =
        node.wait_json(&format!("/v1/invocations/{id}/logs"), |v| !v["lines"].as_array().unwrap().is_empty());
    v["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["line"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn an_instance_serves_up_to_n_calls_and_only_its_own_version_and_tenant() {
    let node = Node::start(&[]);
    let tg = &guests().testguest;
    node.deploy("fresh", tg, &[]);
    assert_eq!(counts(&node, "fresh", 3), [1, 1, 1], "by default every call gets a fresh instance");

    node.deploy("warm", tg, &["--reuse", "3"]);
    assert_eq!(counts(&node, "warm", 7), [1, 2, 3, 1, 2, 3, 1], "three calls per instance, then a fresh one");

    // Each call's log has its own lines only.
    let (n, id) = count(&node, "warm");
    assert_eq!(n, 2);
    let lines = log_lines(&node, &id);
    assert_eq!(lines, ["call 2 of this instance"], "{lines:?}");

    // A call that traps discards its instance.
    let res = node.get("/fn/default/warm/panic");
    assert_eq!(res.status(), 500);
    res.bytes().unwrap();
    assert_eq!(count(&node, "warm").0, 1, "after a trap the next call gets a fresh instance");

    // A new version starts afresh, even with the same component and configuration.
    assert_eq!(count(&node, "warm").0, 2);
    node.deploy("warm", tg, &["--reuse", "3"]);
    assert_eq!(count(&node, "warm").0, 1, "the new version does not get the old version's instance");

    // Another tenant's function with the same component never gets this one's instances.
    let (ok, out, err) = node.cli(&["tenants", "create", "other"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) =
        node.cli(&["keys", "create", "--tenant", "other", "--scope", "deploy", "--scope", "invoke"]);
    assert!(ok, "{out}{err}");
    let key =
        out.split_whitespace().find(|w| w.starts_with("sk_")).unwrap_or_else(|| panic!("{out}")).to_string();
    let (ok, out, err) =
        node.cli_as(&key, &["deploy", "warm", tg.to_str().unwrap(), "--reuse", "3", "--tenant", "other"]);
    assert!(ok, "{out}{err}");
    assert_eq!(count(&node, "warm").0, 2, "ours is still warm");
    assert_eq!(count_as(&node, &key, "other", "warm").0, 1, "theirs starts fresh");

    // Async calls of the version share its warm instances.
    assert_eq!(count(&node, "warm").0, 3);
    assert_eq!(count(&node, "warm").0, 1);
    let id = node.enqueue("/fn/default/warm/count", &[]);
    let v = node.wait_json(&format!("/v1/invocations/{id}"), |v| v["status"] == "succeeded");
    assert_eq!(v["status"], "succeeded");
    let res = node.get(&format!("/v1/invocations/{id}/response"));
    assert_eq!(res.text().unwrap(), "count 2", "the async attempt ran on the warm instance");

    settle(&node);
    let info: Value = node.get("/v1/node").json().unwrap();
    let warm = &info["warm"];
    assert!(warm["reused_total"].as_u64().unwrap() >= 8, "{warm}");
    assert!(warm["idle"].as_u64().unwrap() >= 1, "{warm}");
    let metrics = node.get("/metrics").text().unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("sluice_warm_reused_total ")), "{metrics}");
}

#[test]
fn an_idle_instance_is_dropped_after_its_idle_time_and_the_bounds_hold() {
    let node = Node::start(&["--warm-per-function-max", "1"]);
    node.deploy("warm", &guests().testguest, &["--reuse", "100", "--reuse-idle", "200ms"]);
    assert_eq!(counts(&node, "warm", 2), [1, 2]);
    // The node drops the instance once it has waited its idle time, and says so...
    node.wait_json("/v1/node", |v| v["warm"]["expired_total"] == 1 && v["warm"]["idle"] == 0);
    // ...and the next call gets a fresh one.
    assert_eq!(count(&node, "warm").0, 1, "the idle instance expired");

    // Two calls at once need two instances; only one may stay idle for this function.
    node.deploy("busy", &guests().testguest, &["--reuse", "100"]);
    // Long enough that the two overlap on a loaded machine too.
    let url = format!("{}/fn/default/busy/sleep?ms=2000", node.url);
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let (url, token) = (url.clone(), node.token.clone());
            std::thread::spawn(move || {
                // The body is read to its end: a caller that hangs up after the head cancels a
                // guest still writing its body, and a cancelled instance is not kept.
                let res = crate::harness::http().get(url).bearer_auth(token).send().unwrap();
                (res.status(), res.text().unwrap())
            })
        })
        .collect();
    for c in calls {
        assert_eq!(c.join().unwrap(), (reqwest::StatusCode::OK, "slept 2000".to_string()));
    }
    settle(&node);
    let info: Value = node.get("/v1/node").json().unwrap();
    assert_eq!(info["warm"]["idle"], 1, "only busy's one instance (warm's expired): {}", info["warm"]);
    assert!(info["warm"]["dropped_full_total"].as_u64().unwrap() >= 1, "{}", info["warm"]);

    let (ok, _, err) = node.cli(&["deploy", "bad", guests().testguest.to_str().unwrap(), "--reuse", "0"]);
    assert!(!ok && err.contains("0"), "{err}");
}

#[test]
fn a_bounded_version_runs_its_calls_one_instance_at_a_time() {
    let node = Node::start(&[]);
    node.deploy("one", &guests().testguest, &["--reuse", "100", "--instances", "1"]);
    let url = format!("{}/fn/default/one/count", node.url);
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let (url, token) = (url.clone(), node.token.clone());
            std::thread::spawn(move || {
                let body = crate::harness::http().get(url).bearer_auth(token).send().unwrap().text().unwrap();
                body.strip_prefix("count ").unwrap().parse::<u64>().unwrap()
            })
        })
        .collect();
    let mut counts: Vec<u64> = calls.into_iter().map(|c| c.join().unwrap()).collect();
    counts.sort_unstable();
    assert_eq!(counts, [1, 2, 3, 4, 5, 6], "six calls at once, one instance, each after the other");
}

#[test]
fn a_function_whose_instances_cannot_serve_twice_stops_being_reused() {
    let node = Node::start(&[]);
    node.deploy("once", &guests().testguest, &["--reuse", "10"]);
    let call = || {
        settle(&node);
        let res = node.get("/fn/default/once/once");
        let id = res.headers()["sluice-invocation-id"].to_str().unwrap().to_string();
        let status = res.status().as_u16();
        res.bytes().unwrap();
        (status, id)
    };
    // Fresh, warm (fails, discarded), fresh, ... until three warm calls in a row failed.
    let statuses: Vec<u16> = (0..6).map(|_| call().0).collect();
    assert_eq!(statuses, [200, 500, 200, 500, 200, 500]);
    let (_, failed_id) = node.wait_json("/v1/invocations?function=once&status=dead", |v| {
        v["invocations"].as_array().unwrap().len() == 3
    })["invocations"][0]["id"]
        .as_str()
        .map(|id| ((), id.to_string()))
        .unwrap();
    let logs = node.get(&format!("/v1/invocations/{failed_id}/logs")).text().unwrap();
    assert!(logs.contains("fresh instance for every call from now on"), "{logs}");
    let statuses: Vec<u16> = (0..4).map(|_| call().0).collect();
    assert_eq!(statuses, [200, 200, 200, 200], "every call now gets a fresh instance");
}

#[test]
fn idle_instances_are_bounded_by_their_memory_too() {
    let node = Node::start(&["--warm-memory-max", "40MiB"]);
    node.deploy("big", &guests().testguest, &["--reuse", "100", "--memory", "128MiB"]);
    // An instance that grew its memory past the node's budget is not kept.
    let res = node.get("/fn/default/big/alloc?bytes=52428800");
    assert_eq!(res.text().unwrap(), "allocated 52428800");
    settle(&node);
    let info: Value = node.get("/v1/node").json().unwrap();
    let warm = &info["warm"];
    assert_eq!((warm["idle"].as_u64(), warm["dropped_full_total"].as_u64()), (Some(0), Some(1)), "{warm}");
    // A small one is.
    assert_eq!(count(&node, "big").0, 1);
    settle(&node);
    let info: Value = node.get("/v1/node").json().unwrap();
    let warm = &info["warm"];
    let bytes = warm["idle_bytes"].as_u64().unwrap();
    assert_eq!(warm["idle"], 1, "{warm}");
    assert!(bytes > 0 && bytes < 40 << 20, "{warm}");
    assert_eq!(warm["memory_max"], 40 << 20);
    let (ok, out, err) = node.cli(&["node"]);
    assert!(ok, "{err}");
    let line = out.lines().find(|l| l.starts_with("warm ")).unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("1 idle of 32") && line.contains("of 40.0 MiB") && line.contains("1 dropped full"),
        "{line}"
    );
}
