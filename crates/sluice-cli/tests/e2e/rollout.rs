//! Automatic rollouts through the real binary: a healthy version promoted step by step, a version
//! failing a fifth of its calls rolled back with the rates that decided it, a rollout that
//! outlives a restart of its node, and the ways a person stops one (cancel, a manual alias move,
//! a second start refused), and two nodes on PostgreSQL where one node's calls decide a rollout
//! the other may be advancing. Steps of 1 s; every wait polls `rollout status` while calls are
//! driven, and decisions are judged by what the status says, never by a sleep.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cluster::{PgDatabase, cluster_node};
use crate::harness::{Node, assert_error, guests, wait_until};

fn cli_ok(node: &Node, args: &[&str]) -> String {
    let (ok, out, err) = node.cli(args);
    assert!(ok, "sluice {args:?} failed: {out}{err}");
    out
}

fn status(node: &Node, function: &str) -> Value {
    serde_json::from_str(&cli_ok(node, &["rollout", "status", function, "-o", "json"])).unwrap()
}

/// Calls `paths` in turn (GET, admin key) until `rollout status` satisfies `done`; returns that
/// status and the versions that answered, as (version, status code) pairs. A minute at most: a
/// step of 1 s with 20 calls needs a small fraction of that even on a loaded machine.
fn drive_until(node: &Node, function: &str, paths: &[&str], done: impl Fn(&Value) -> bool) -> Value {
    let client = node.client();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    loop {
        for _ in 0..20 {
            let path = paths[i % paths.len()];
            i += 1;
            let res = client.get(format!("{}{path}", node.url)).bearer_auth(&node.token).send().unwrap();
            let status = res.status();
            assert!(
                res.headers().contains_key("sluice-version"),
                "{path}: {status}: {}",
                res.text().unwrap()
            );
        }
        let now = status(node, function);
        if done(&now) {
            return now;
        }
        assert!(Instant::now() < deadline, "the rollout did not get there in 60 s: {now:#}");
    }
}

/// The versions `latest` routes to, as (version, weight).
fn latest_routes(node: &Node, function: &str) -> Vec<(i64, u64)> {
    let out = cli_ok(node, &["alias", "list", function, "-o", "json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let latest = v["aliases"].as_array().unwrap().iter().find(|a| a["name"] == "latest").unwrap().clone();
    latest["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["version"].as_i64().unwrap(), r["weight"].as_u64().unwrap()))
        .collect()
}

fn percents(v: &Value) -> Vec<u64> {
    v["steps"].as_array().unwrap().iter().map(|s| s["percent"].as_u64().unwrap()).collect()
}

#[test]
fn a_healthy_version_is_promoted_through_its_steps() {
    let node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &["--env", "MARK=v1"]);
    node.deploy("tg", &guests().testguest, &["--env", "MARK=v2", "--no-promote"]);

    let out = cli_ok(&node, &["rollout", "tg", "--to", "2", "--steps", "20,50,100", "--every", "1s"]);
    assert!(out.contains("tg@latest: version 1 -> 2  running  now 20% on 2"), "{out}");
    assert_eq!(latest_routes(&node, "tg"), [(2, 20), (1, 80)]);
    // One rollout per alias at a time.
    let res = node
        .client()
        .put(format!("{}/v1/tenants/default/functions/tg/aliases/latest/rollout", node.url))
        .bearer_auth(&node.token)
        .json(&json!({ "to": 2 }))
        .send()
        .unwrap();
    let message = assert_error(res, 409, "conflict");
    assert!(message.contains("has a rollout running"), "{message}");

    let done = drive_until(&node, "tg", &["/fn/default/tg/ok"], |s| s["status"] != "running");
    assert_eq!(done["status"], "promoted", "{done:#}");
    assert_eq!(percents(&done), [20, 50, 100], "{done:#}");
    for step in &done["steps"].as_array().unwrap()[..2] {
        // Each judged step had its minimum of calls on the new version, and none failed.
        assert!(step["canary_calls"].as_u64().unwrap() >= 20, "{done:#}");
        assert!(step["stable_calls"].as_u64().unwrap() > 0, "{done:#}");
        assert_eq!((step["canary_errors"].as_u64(), step["stable_errors"].as_u64()), (Some(0), Some(0)));
    }
    assert_eq!(latest_routes(&node, "tg"), [(2, 100)]);
    let res =
        node.client().get(format!("{}/fn/default/tg/env", node.url)).bearer_auth(&node.token).send().unwrap();
    assert_eq!(res.headers()["sluice-version"], "2");
    assert!(res.text().unwrap().contains("MARK=v2"));

    let table = cli_ok(&node, &["rollout", "status", "tg"]);
    assert!(table.contains("tg@latest: version 1 -> 2  promoted  now 100% on 2"), "{table}");
    assert!(table.contains("STEP") && table.lines().count() == 6, "three steps under the header:\n{table}");
    assert!(node.stderr.lock().unwrap().iter().any(|l| l.contains("rollout promoted")), "an event is logged");
}

#[test]
fn a_version_failing_a_fifth_of_its_calls_is_rolled_back() {
    let node = Node::start(&[]);
    // Version 1 answers 200 to every path; version 2 answers /status?code=500 with a 500.
    node.deploy("tg", &guests().hello, &[]);
    node.deploy("tg", &guests().testguest, &["--no-promote"]);
    // 100 calls on the new version before a step is judged: with a fifth failing, the chance of
    // seeing 1% or less is below 1e-8.
    cli_ok(
        &node,
        &["rollout", "tg", "--to", "2", "--steps", "50,100", "--every", "1s", "--min-calls", "100"],
    );
    let paths = [
        "/fn/default/tg/status?code=500",
        "/fn/default/tg/ok",
        "/fn/default/tg/ok",
        "/fn/default/tg/ok",
        "/fn/default/tg/ok",
    ];
    let done = drive_until(&node, "tg", &paths, |s| s["status"] != "running");
    assert_eq!(done["status"], "rolled_back", "{done:#}");
    assert_eq!(percents(&done), [50], "it never got past its first step: {done:#}");
    let step = &done["steps"][0];
    let (calls, errors) = (step["canary_calls"].as_u64().unwrap(), step["canary_errors"].as_u64().unwrap());
    assert!(calls >= 100 && errors * 100 > calls, "{done:#}");
    assert_eq!(step["stable_errors"], 0, "{done:#}");
    let reason = done["reason"].as_str().unwrap();
    assert!(
        reason.contains("version 2 failed") && reason.contains(&format!("({errors} of {calls})")),
        "{reason}"
    );
    assert!(reason.contains("version 1's 0.0%") && reason.contains("margin of 1%"), "{reason}");
    assert_eq!(latest_routes(&node, "tg"), [(1, 100)]);

    let table = cli_ok(&node, &["rollout", "status", "tg"]);
    assert!(table.contains("rolled_back") && table.contains(&format!("reason: {reason}")), "{table}");
    let logged =
        node.stderr.lock().unwrap().iter().any(|l| l.contains("rollout rolled back") && l.contains("failed"));
    assert!(logged, "the rollback is logged with its reason");
}

#[test]
fn a_rollout_survives_a_restart_of_its_node() {
    let mut node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &["--env", "MARK=v1"]);
    node.deploy("tg", &guests().testguest, &["--env", "MARK=v2", "--no-promote"]);
    cli_ok(&node, &["rollout", "tg", "--to", "2", "--steps", "10,50,100", "--every", "1s"]);
    let before =
        drive_until(&node, "tg", &["/fn/default/tg/ok"], |s| s["steps"].as_array().unwrap().len() >= 2);
    assert_eq!(before["status"], "running", "{before:#}");

    assert!(node.terminate().success());
    node.spawn();
    let after = status(&node, "tg");
    assert_eq!((&after["id"], &after["status"]), (&before["id"], &json!("running")), "{after:#}");
    assert_eq!(
        latest_routes(&node, "tg"),
        [(2, 50), (1, 50)],
        "the restarted node serves the step it reached"
    );
    // The stopped node's hold on the rollout runs out (10 s at most); then this one goes on.
    let done = drive_until(&node, "tg", &["/fn/default/tg/ok"], |s| s["status"] != "running");
    assert_eq!((done["status"].as_str(), percents(&done)), (Some("promoted"), vec![10, 50, 100]), "{done:#}");
    assert_eq!(latest_routes(&node, "tg"), [(2, 100)]);
}

#[test]
fn a_rollout_is_stopped_by_cancel_or_by_setting_its_alias() {
    let node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &["--env", "MARK=v1"]);
    node.deploy("tg", &guests().testguest, &["--env", "MARK=v2", "--no-promote"]);
    // Steps of an hour: nothing moves but what the test does.
    cli_ok(&node, &["rollout", "tg", "--to", "2", "--every", "1h"]);
    assert_eq!(latest_routes(&node, "tg"), [(2, 5), (1, 95)]);
    let (ok, _, err) = node.cli(&["rollout", "tg", "--to", "2"]);
    assert!(!ok && err.contains("has a rollout running"), "{err}");

    let out = cli_ok(&node, &["rollout", "cancel", "tg"]);
    assert!(
        out.contains("cancelled") && out.contains("reason: cancelled by `sluice rollout cancel`"),
        "{out}"
    );
    assert_eq!(latest_routes(&node, "tg"), [(1, 100)]);
    let (ok, _, err) = node.cli(&["rollout", "cancel", "tg"]);
    assert!(!ok && err.contains("has ended already"), "{err}");

    cli_ok(&node, &["rollout", "tg", "--to", "2", "--every", "1h"]);
    cli_ok(&node, &["alias", "set", "tg", "latest", "2"]);
    let ended = status(&node, "tg");
    assert_eq!(ended["status"], "cancelled", "{ended:#}");
    assert_eq!(ended["reason"], "the alias was set by hand");
    assert_eq!(latest_routes(&node, "tg"), [(2, 100)], "the manual move stays");

    let (ok, _, err) = node.cli(&["rollout", "tg", "--to", "1", "--steps", "50,25,100"]);
    assert!(!ok && err.contains("steps must rise"), "{err}");
}

#[test]
fn in_a_cluster_every_node_counts_and_one_node_at_a_time_advances() {
    let Some(db) = PgDatabase::create() else { return };
    let a = cluster_node(&db, None, &[]);
    let b = cluster_node(&db, Some(&a.token), &[]);
    a.deploy("tg", &guests().testguest, &["--env", "MARK=v1"]);
    a.deploy("tg", &guests().testguest, &["--env", "MARK=v2", "--no-promote"]);
    // Node b follows the deploys (and compiles version 2's artifact) before it takes calls.
    wait_until("node b serving version 2", || b.get("/fn/default/tg@2/ok").status() == 200);
    cli_ok(&a, &["rollout", "tg", "--to", "2", "--steps", "50,100", "--every", "1s", "--min-calls", "40"]);

    // Every call goes to node b; whichever node holds the rollout judges it by b's counts.
    let done = drive_until(&b, "tg", &["/fn/default/tg/ok"], |s| s["status"] != "running");
    assert_eq!((done["status"].as_str(), percents(&done)), (Some("promoted"), vec![50, 100]), "{done:#}");
    assert!(done["steps"][0]["canary_calls"].as_u64().unwrap() >= 40, "{done:#}");
    assert_eq!(latest_routes(&a, "tg"), [(2, 100)]);
    // The promotion happened once, on one node.
    let promoted =
        |n: &Node| n.stderr.lock().unwrap().iter().filter(|l| l.contains("rollout promoted")).count();
    assert_eq!(promoted(&a) + promoted(&b), 1);
}
