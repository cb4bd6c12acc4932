//! `GET /metrics`: scraped with the reference Prometheus parser, its counts match the calls made;
//! who may scrape, and what a tenant's key sees (its own tenant's series only).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Node, guests};

/// The samples of `text`, parsed by `prometheus_client` (scripts/parse-metrics.py).
fn parse(text: &str) -> Vec<Value> {
    let python = std::env::var("SLUICE_TEST_METRICS_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/parse-metrics.py");
    let mut child = Command::new(&python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {python}: {e} (scripts/test.sh sets up prometheus_client)"));
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused the text (or is missing: run through scripts/test.sh): {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().unwrap().clone()
}

/// The value of the sample `name` whose labels include `labels`, summed over the others.
fn value(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .map(|s| s["value"].as_f64().unwrap())
        .sum()
}

fn scrape(node: &Node, key: Option<&str>) -> reqwest::blocking::Response {
    let req = node.client().get(format!("{}/metrics", node.url));
    match key {
        Some(k) => req.bearer_auth(k),
        None => req,
    }
    .send()
    .unwrap()
}

#[test]
fn metrics_count_the_calls_made_and_show_each_tenant_only_its_own() {
    let node = Node::start(&["--metrics-listen", "127.0.0.1:0"]);
    node.deploy("hello", &guests().hello, &[]);
    node.deploy("tg", &guests().testguest, &[]);
    let call = |path: &str| {
        node.client().get(format!("{}{path}", node.url)).bearer_auth(&node.token).send().unwrap()
    };
    for _ in 0..7 {
        // A new connection per call, closed as soon as the body is read (as curl does).
        let res = node
            .client()
            .get(format!("{}/fn/default/hello/", node.url))
            .bearer_auth(&node.token)
            .header("connection", "close")
            .send()
            .unwrap();
        assert_eq!(res.status(), 200);
        res.bytes().unwrap();
    }
    for (code, times) in [(404, 2), (500, 3)] {
        for _ in 0..times {
            let res = call(&format!("/fn/default/tg/status?code={code}"));
            assert_eq!(res.status().as_u16(), code);
            res.bytes().unwrap();
        }
    }
    // Refused before running: no such function, and a bad key.
    assert_eq!(call("/fn/default/nope/").status(), 404);
    let res =
        node.client().get(format!("{}/fn/default/hello/", node.url)).bearer_auth("sk_bad").send().unwrap();
    assert_eq!(res.status(), 401);
    // Four async calls, run by the scheduler.
    let ids: Vec<String> = (0..4).map(|_| node.enqueue("/fn/default/hello/", &[])).collect();
    for id in &ids {
        node.wait_json(&format!("/v1/invocations/{id}"), |v| v["status"] == "succeeded");
    }

    // A sync call is counted when its guest is done, a moment after its client has the response.
    let deadline = Instant::now() + Duration::from_secs(10);
    let samples = loop {
        let res = scrape(&node, Some(&node.token));
        assert_eq!(res.status(), 200);
        let content_type = res.headers()["content-type"].to_str().unwrap().to_string();
        assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
        let samples = parse(&res.text().unwrap());
        let sync = value(&samples, "sluice_invocations_total", &[("kind", "sync")]);
        let asynchronous = value(&samples, "sluice_invocations_total", &[("kind", "async")]);
        if (sync, asynchronous) == (12.0, 4.0) || Instant::now() > deadline {
            break samples;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let hello = [("tenant", "default"), ("function", "hello")];
    let tg = [("tenant", "default"), ("function", "tg")];
    let count = |labels: &[(&str, &str)]| value(&samples, "sluice_invocations_total", labels);
    // A client that read the whole response (hello sets its length) and hung up while the guest
    // was still returning did not go away early: every call is `ok`.
    assert_eq!(count(&[hello[0], hello[1], ("kind", "sync"), ("outcome", "ok")]), 7.0);
    assert_eq!(count(&[("outcome", "client_closed")]), 0.0);
    assert_eq!(count(&[tg[0], tg[1], ("kind", "sync"), ("outcome", "client_error")]), 2.0);
    assert_eq!(count(&[tg[0], tg[1], ("kind", "sync"), ("outcome", "server_error")]), 3.0);
    assert_eq!(count(&[hello[0], hello[1], ("kind", "async"), ("outcome", "ok")]), 4.0);
    assert_eq!(value(&samples, "sluice_requests_refused_total", &[("reason", "not_found")]), 1.0);
    assert_eq!(value(&samples, "sluice_requests_refused_total", &[("reason", "unauthorized")]), 1.0);
    // Histograms: one observation per call, in seconds, with buckets.
    let runs =
        value(&samples, "sluice_invocation_run_seconds_count", &[hello[0], hello[1], ("kind", "sync")]);
    assert_eq!(runs, 7.0);
    let total = value(&samples, "sluice_invocation_duration_seconds_sum", &hello);
    assert!(total > 0.0 && total < 60.0, "{total}");
    let inf =
        value(&samples, "sluice_invocation_queue_wait_seconds_bucket", &[hello[0], hello[1], ("le", "+Inf")]);
    assert_eq!(inf, 4.0);
    assert_eq!(value(&samples, "sluice_compiles_total", &[]), 2.0);
    assert!(value(&samples, "sluice_code_cache_hits_total", &[]) >= 16.0);
    assert!(value(&samples, "sluice_store_commit_seconds_count", &[]) >= 1.0);
    assert_eq!(value(&samples, "sluice_queue_depth", &[("status", "queued")]), 0.0);
    assert_eq!(value(&samples, "sluice_functions", &[]), 2.0);
    assert_eq!(value(&samples, "sluice_utilization_target", &[]), 0.8);

    // Who may scrape: no key 401, a key without the scope 403, a tenant's metrics key sees the
    // node-wide series and its own tenant's only.
    assert_eq!(scrape(&node, None).status(), 401);
    let (ok, _, err) = node.cli(&["tenants", "create", "acme"]);
    assert!(ok, "{err}");
    let key = |scope: &str| {
        let (ok, out, err) = node.cli(&["keys", "create", "--tenant", "acme", "--scope", scope]);
        assert!(ok, "{err}");
        out.trim().to_string()
    };
    assert_eq!(scrape(&node, Some(&key("read"))).status(), 403);
    node.deploy("mine", &guests().hello, &["--tenant", "acme"]);
    let acme = key("metrics");
    let seen = parse(&scrape(&node, Some(&acme)).text().unwrap());
    assert!(!seen.is_empty() && seen.iter().all(|s| s["labels"]["tenant"] == "acme"), "{seen:?}");
    let mine =
        |s: &&Value| s["name"] == "sluice_invocation_run_seconds_count" && s["labels"]["function"] == "mine";
    assert!(seen.iter().any(|s| mine(&s)), "its own function's series: {seen:?}");
    assert!(
        seen.iter().all(|s| s["name"] != "sluice_functions"),
        "node-wide series add up every tenant's work"
    );

    // The open listener needs no key and serves only /metrics.
    let line = node.stderr.lock().unwrap().iter().find(|l| l.contains("metrics without a key")).cloned();
    let url =
        line.expect("the node says where it serves metrics").split_whitespace().last().unwrap().to_string();
    let res = node.client().get(&url).send().unwrap();
    assert_eq!(res.status(), 200);
    assert!(value(&parse(&res.text().unwrap()), "sluice_invocations_total", &[]) >= 16.0);
    let other = url.replace("/metrics", "/v1/node");
    assert_eq!(node.client().get(other).send().unwrap().status(), 404);
}

#[test]
fn a_node_started_without_metrics_says_so() {
    let node = Node::start(&["--no-metrics"]);
    let res = scrape(&node, Some(&node.token));
    assert_eq!(res.status(), 404);
    assert!(res.text().unwrap().contains("--no-metrics"));
}
