//! Versions and aliases through the real binary: calls addressed to `latest`, an alias or a
//! version; weighted splits and routing-key stickiness; header pinning only for the tenant's own
//! keys; rollback as an alias move without a compile; async calls keeping their version across a
//! retry after the alias moved.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Node, assert_error, guests, wait_until};

/// Calls `path` (GET) with `key` and `headers`; returns the status, the `sluice-version` header
/// and the body.
fn call(node: &Node, key: Option<&str>, path: &str, headers: &[(&str, &str)]) -> (u16, Option<i64>, String) {
    let mut req = node.client().get(format!("{}{path}", node.url));
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().unwrap();
    let version = res.headers().get("sluice-version").map(|v| v.to_str().unwrap().parse().unwrap());
    (res.status().as_u16(), version, res.text().unwrap())
}

/// The version that served `path` (which must answer 200).
fn served_by(node: &Node, path: &str, headers: &[(&str, &str)]) -> i64 {
    let (status, version, body) = call(node, Some(&node.token), path, headers);
    assert_eq!(status, 200, "{path}: {body}");
    version.expect("every sync response names its version")
}

fn cli_ok(node: &Node, args: &[&str]) -> String {
    let (ok, out, err) = node.cli(args);
    assert!(ok, "sluice {args:?} failed: {out}{err}");
    out
}

fn tenant_key(node: &Node, tenant: &str) -> String {
    if tenant != "default" {
        cli_ok(node, &["tenants", "create", tenant]);
    }
    let out = cli_ok(node, &["keys", "create", "--tenant", tenant, "--scope", "invoke"]);
    out.split_whitespace().find(|w| w.starts_with("sk_")).expect("a key").to_string()
}

#[test]
fn calls_address_latest_an_alias_or_a_version() {
    let node = Node::start(&[]);
    for mark in ["v1", "v2"] {
        node.deploy("tg", &guests().testguest, &["--env", &format!("MARK={mark}")]);
    }
    let out = node.deploy("tg", &guests().testguest, &["--env", "MARK=v3", "--no-promote"]);
    assert!(out.contains("not promoted"), "{out}");

    // `latest` stayed on 2; version 3 is served by number only.
    let (status, version, body) = call(&node, Some(&node.token), "/fn/default/tg/env", &[]);
    assert_eq!((status, version), (200, Some(2)), "{body}");
    assert!(body.contains("MARK=v2"), "{body}");
    assert!(call(&node, Some(&node.token), "/fn/default/tg@3/env", &[]).2.contains("MARK=v3"));
    assert_eq!(served_by(&node, "/fn/default/tg@latest/ok", &[]), 2);

    let out = cli_ok(&node, &["alias", "set", "tg", "prod", "1"]);
    assert!(out.contains("tg@prod -> 1"), "{out}");
    assert!(out.contains("/fn/default/tg@prod/"), "{out}");
    assert!(call(&node, Some(&node.token), "/fn/default/tg@prod/env", &[]).2.contains("MARK=v1"));
    // The path below the function reaches the guest as it does without an alias.
    assert_eq!(call(&node, Some(&node.token), "/fn/default/tg@prod/status?code=418", &[]).0, 418);

    let listed = cli_ok(&node, &["versions", "list", "tg"]);
    let lines: Vec<&str> = listed.lines().collect();
    assert!(lines[0].starts_with("VERSION"), "{listed}");
    assert!(lines[1].trim_start().starts_with('3') && lines[1].contains(" - "), "{listed}");
    assert!(lines[2].trim_start().starts_with('2') && lines[2].contains("latest"), "{listed}");
    assert!(lines[3].trim_start().starts_with('1') && lines[3].contains("prod"), "{listed}");
    assert!(lines[1].contains("memory 128") && lines[1].contains("1 env"), "{listed}");
    let shown = cli_ok(&node, &["versions", "show", "tg", "1"]);
    assert!(shown.contains("aliases   prod") && shown.contains("MARK"), "{shown}");
    let aliases = cli_ok(&node, &["alias", "list", "tg"]);
    assert!(aliases.contains("latest") && aliases.contains("prod"), "{aliases}");

    // Unknown targets are 404s that say what is missing; `latest` cannot be deleted.
    let msg = assert_error(node.get("/fn/default/tg@canary/ok"), 404, "not_found");
    assert!(msg.contains("no alias canary"), "{msg}");
    let msg = assert_error(node.get("/fn/default/tg@9/ok"), 404, "not_found");
    assert!(msg.contains("no version 9"), "{msg}");
    let (ok, _, err) = node.cli(&["alias", "delete", "tg", "latest"]);
    assert!(!ok && err.contains("cannot be deleted"), "{err}");
    let (ok, _, err) = node.cli(&["alias", "set", "tg", "prod", "7"]);
    assert!(!ok && err.contains("version 7"), "{err}");
    let (ok, _, err) = node.cli(&["alias", "set", "tg", "prod", "1", "2"]);
    assert!(!ok && err.contains("VERSION=WEIGHT"), "{err}");

    cli_ok(&node, &["alias", "delete", "tg", "prod"]);
    assert_error(node.get("/fn/default/tg@prod/ok"), 404, "not_found");

    // At most 32 aliases per function, `latest` included: the 33rd is refused, saying why.
    let set = |name: &str| {
        node.client()
            .put(format!("{}/v1/tenants/default/functions/tg/aliases/{name}", node.url))
            .bearer_auth(&node.token)
            .json(&serde_json::json!({ "routes": [{ "version": 1, "weight": 1 }] }))
            .send()
            .unwrap()
    };
    for i in 1..32 {
        assert_eq!(set(&format!("a{i}")).status(), 200);
    }
    let msg = assert_error(set("one-more"), 409, "conflict");
    assert!(msg.contains("has 32 aliases, at most 32"), "{msg}");
    assert_eq!(set("a1").status(), 200, "an alias that exists can still be moved");
}

#[test]
fn a_split_alias_follows_its_weights_and_a_routing_key_sticks() {
    let node = Node::start(&[]);
    for _ in 0..3 {
        node.deploy("tg", &guests().testguest, &[]);
    }
    let out = cli_ok(&node, &["alias", "set", "tg", "prod", "1=70", "2=20", "3=10"]);
    assert!(out.contains("3=10% 2=20% 1=70%"), "{out}");

    // Random choices: 3000 calls from 4 threads. Each share must fall within 6 standard deviations
    // of its weight (for 10%: 300 ± 99), which a correct split misses once in 10^9 runs.
    const CALLS: usize = 3000;
    let counts = count_versions(&node, CALLS, |_| None);
    for (version, share) in [(1, 0.7), (2, 0.2), (3, 0.1)] {
        let expected = CALLS as f64 * share;
        let sd = (CALLS as f64 * share * (1.0 - share)).sqrt();
        let got = f64::from(counts.get(&version).copied().unwrap_or(0));
        assert!((got - expected).abs() < 6.0 * sd, "version {version}: {got} of {CALLS} calls: {counts:?}");
    }

    // Routing keys: the choice is a fixed function of the key (a stable hash, the same on every
    // node and every run: a fixed seed), so 10,000 users split the same way each time; within 4
    // standard deviations (for 10%: 1000 ± 120), and as the hash always splits them.
    const USERS: usize = 10_000;
    let by_key = count_versions(&node, USERS, |i| Some(format!("user-{i}")));
    for (version, share) in [(1, 0.7), (2, 0.2), (3, 0.1)] {
        let expected = USERS as f64 * share;
        let sd = (USERS as f64 * share * (1.0 - share)).sqrt();
        let got = f64::from(by_key.get(&version).copied().unwrap_or(0));
        assert!((got - expected).abs() < 4.0 * sd, "version {version}: {got} of {USERS} users: {by_key:?}");
    }
    assert_eq!(by_key, split_by_hash(USERS, &[(3, 10), (2, 20), (1, 70)]), "the split is the stable hash's");
    // One user sees one version, call after call.
    let mut sticky: HashMap<i64, u64> = HashMap::new();
    for user in 0..40 {
        let key = format!("user-{user}");
        let first = served_by(&node, "/fn/default/tg@prod/ok", &[("sluice-routing-key", &key)]);
        for _ in 0..5 {
            assert_eq!(served_by(&node, "/fn/default/tg@prod/ok", &[("sluice-routing-key", &key)]), first);
        }
        *sticky.entry(first).or_default() += 6;
    }

    // `/metrics` counts each version's calls, exactly as the callers saw them answered.
    let text = node.get("/metrics").text().unwrap();
    for version in 1..=3 {
        let seen =
            [&counts, &by_key].iter().map(|c| u64::from(c.get(&version).copied().unwrap_or(0))).sum::<u64>()
                + sticky.get(&version).copied().unwrap_or(0);
        assert_eq!(version_metric(&text, "invocations", version), Some(seen), "version {version}");
        assert_eq!(version_metric(&text, "errors", version), Some(0), "version {version}");
    }
}

/// `sluice_version_{what}_total` of function `tg` of tenant `default`, version `version`, from
/// the text of `/metrics`.
fn version_metric(text: &str, what: &str, version: i64) -> Option<u64> {
    let series =
        format!("sluice_version_{what}_total{{tenant=\"default\",function=\"tg\",version=\"{version}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&series)).map(|n| n.parse().unwrap())
}

/// How `users` routing keys `user-{i}` split over `routes` (`(version, weight)`, in the order the
/// node adds the weights up: highest version first, as the store lists them), computed here from
/// the documented hash.
fn split_by_hash(users: usize, routes: &[(i64, u64)]) -> HashMap<i64, u32> {
    let total: u64 = routes.iter().map(|r| r.1).sum();
    let mut counts = HashMap::new();
    for i in 0..users {
        let point = sluice_core::alias::stable_hash(format!("user-{i}").as_bytes()) % total;
        let mut upto = 0;
        let version = routes.iter().find(|r| {
            upto += r.1;
            point < upto
        });
        *counts.entry(version.unwrap().0).or_default() += 1;
    }
    counts
}

/// Calls `tg@prod` `calls` times from 4 threads, the i-th call with routing key `key(i)`;
/// returns how many each version served.
fn count_versions(
    node: &Node,
    calls: usize,
    key: impl Fn(usize) -> Option<String> + Sync,
) -> HashMap<i64, u32> {
    let threads = 4;
    let key = &key;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut counts: HashMap<i64, u32> = HashMap::new();
                    for i in (t..calls).step_by(threads) {
                        let routing = key(i);
                        let headers: Vec<(&str, &str)> =
                            routing.as_deref().map(|k| ("sluice-routing-key", k)).into_iter().collect();
                        *counts.entry(served_by(node, "/fn/default/tg@prod/ok", &headers)).or_default() += 1;
                    }
                    counts
                })
            })
            .collect();
        let mut total: HashMap<i64, u32> = HashMap::new();
        for h in handles {
            for (v, n) in h.join().unwrap() {
                *total.entry(v).or_default() += n;
            }
        }
        total
    })
}

#[test]
fn pinning_a_version_is_only_for_the_tenants_own_keys() {
    let node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &["--public", "--env", "MARK=v1"]);
    node.deploy("tg", &guests().testguest, &["--public", "--env", "MARK=v2"]);
    let own = tenant_key(&node, "default");
    let other = tenant_key(&node, "beta");
    let pin = [("sluice-version", "1")];

    let (status, version, body) = call(&node, Some(&own), "/fn/default/tg/env", &pin);
    assert_eq!((status, version), (200, Some(1)), "{body}");
    assert!(body.contains("MARK=v1"), "{body}");
    // The public function serves anyone, but only the tenant may choose its version.
    for key in [None, Some(other.as_str()), Some("sk_not_a_key")] {
        let mut req =
            node.client().get(format!("{}/fn/default/tg/env", node.url)).header("sluice-version", "1");
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        let msg = assert_error(req.send().unwrap(), 403, "forbidden");
        assert!(msg.contains("only for keys of tenant default"), "{msg}");
        let (status, version, _) = call(&node, key, "/fn/default/tg/env", &[]);
        assert_eq!((status, version), (200, Some(2)), "without the header: latest");
    }
    let msg = assert_error(
        node.client()
            .get(format!("{}/fn/default/tg/ok", node.url))
            .bearer_auth(&own)
            .header("sluice-version", "two")
            .send()
            .unwrap(),
        400,
        "bad_request",
    );
    assert!(msg.contains("sluice-version"), "{msg}");
}

/// `code_cache.compiles` of `GET /v1/node`: components compiled since the node started.
fn compiles(node: &Node) -> u64 {
    node.get("/v1/node").json::<Value>().unwrap()["code_cache"]["compiles"].as_u64().unwrap()
}

#[test]
fn rollback_moves_an_alias_without_a_compile_and_retention_keeps_its_version() {
    // Keep one version per function, and collect every 1.5 s. (A shorter grace races the
    // deploys' own upload-then-create of a blob with the collector.)
    let node = Node::start(&["--versions-kept", "1", "--blob-grace", "3s"]);
    node.deploy("app", &guests().hello, &[]);
    cli_ok(&node, &["alias", "set", "app", "stable", "1"]);
    let started = Instant::now();
    node.deploy("app", &guests().testguest, &[]);
    let deploy_took = started.elapsed();
    node.deploy("app", &guests().testguest, &["--env", "MARK=v3"]);
    // Version 2 is retired; version 1 stays for its alias, with its component.
    wait_until("version 2 retired", || {
        let listed = cli_ok(&node, &["versions", "list", "app", "--output", "json"]);
        let v: Value = serde_json::from_str(&listed).unwrap();
        let numbers: Vec<i64> =
            v["versions"].as_array().unwrap().iter().map(|x| x["version"].as_i64().unwrap()).collect();
        numbers == [3, 1]
    });
    // Past the blob grace and a collection: an unnamed blob would be gone by now.
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(served_by(&node, "/fn/default/app/echo", &[]), 3);

    let before = compiles(&node);
    let started = Instant::now();
    cli_ok(&node, &["alias", "set", "app", "latest", "1"]);
    let rollback_took = started.elapsed();
    // Served by version 1 from the answer on: no compile, no wait.
    let (status, version, body) = call(&node, Some(&node.token), "/fn/default/app/", &[]);
    assert_eq!((status, version), (200, Some(1)), "{body}");
    assert!(body.contains("hello"), "{body}");
    assert_eq!(compiles(&node), before, "a rollback compiled something");
    eprintln!("deploy of a new component: {deploy_took:?}; rollback: {rollback_took:?}");
}

#[test]
fn an_async_call_keeps_the_version_it_was_queued_for_across_a_retry() {
    let node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &["--attempts", "2"]);
    node.deploy("tg", &guests().hello, &[]);
    cli_ok(&node, &["alias", "set", "tg", "prod", "1"]);
    // Version 1 answers 503 (a retryable failure); version 2 would answer 200.
    let id = node.enqueue("/fn/default/tg@prod/status?code=503", &[]);
    // Moved before the retry (backoff ≥ 1 s) and quite likely before the first attempt.
    cli_ok(&node, &["alias", "set", "tg", "prod", "2"]);
    let inv = node.wait_json(&format!("/v1/invocations/{id}"), |v| v["status"] == "dead");
    assert_eq!((inv["attempts"].as_u64(), inv["version"].as_i64()), (Some(2), Some(1)), "{inv}");
    assert_eq!(inv["status_code"], 503, "every attempt ran version 1: {inv}");
    // A call queued after the move runs the new version.
    let id = node.enqueue("/fn/default/tg@prod/status?code=503", &[]);
    let inv = node.wait_json(&format!("/v1/invocations/{id}"), |v| v["status"] == "succeeded");
    assert_eq!(inv["version"], 2, "{inv}");
    // Async attempts count for the version that ran them: each of version 1's failed (its first
    // attempt may have run before the move, while `latest` still served it, or after it).
    let text = node.get("/metrics").text().unwrap();
    let failed = version_metric(&text, "invocations", 1).unwrap_or(0);
    assert!((1..=2).contains(&failed), "{text}");
    assert_eq!(version_metric(&text, "errors", 1), Some(failed), "{text}");
    assert_eq!(
        (version_metric(&text, "invocations", 2), version_metric(&text, "errors", 2)),
        (Some(1), Some(0)),
        "{text}"
    );
}

#[test]
fn a_key_limited_to_an_alias_calls_that_alias_only() {
    let node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &[]);
    node.deploy("tg", &guests().testguest, &[]);
    cli_ok(&node, &["alias", "set", "tg", "prod", "1"]);
    let (ok, key, err) =
        node.cli(&["keys", "create", "--tenant", "default", "--scope", "invoke", "--alias", "prod"]);
    assert!(ok && err.contains("for alias prod only"), "{err}");
    let key = key.trim();
    let (status, version, body) = call(&node, Some(key), "/fn/default/tg@prod/ok", &[]);
    assert_eq!((status, version), (200, Some(1)), "{body}");
    for (path, pin) in [
        ("/fn/default/tg/ok", None),
        ("/fn/default/tg@latest/ok", None),
        ("/fn/default/tg@2/ok", None),
        ("/fn/default/tg@1/ok", None),
        ("/fn/default/tg@prod/ok", Some("2")),
    ] {
        let mut req = node.client().get(format!("{}{path}", node.url)).bearer_auth(key);
        if let Some(pin) = pin {
            req = req.header("sluice-version", pin);
        }
        let msg = assert_error(req.send().unwrap(), 403, "forbidden");
        assert!(msg.contains("only call the alias prod"), "{path}: {msg}");
    }
    // On a public function anyone may call any alias, but the limited key still may not pin.
    node.deploy("pub", &guests().testguest, &["--public"]);
    let res = node
        .client()
        .get(format!("{}/fn/default/pub/ok", node.url))
        .bearer_auth(key)
        .header("sluice-version", "1");
    assert_error(res.send().unwrap(), 403, "forbidden");
    let listed = node.get("/v1/tenants/default/keys").json::<Value>().unwrap();
    assert!(listed["keys"].as_array().unwrap().iter().any(|k| k["alias"] == "prod"), "{listed}");
}
