//! The example function in each language (examples/rust, examples/python built with
//! componentize-py, examples/js built with componentize-js; no sluice SDK) deploys and answers
//! the same: JSON in and out, a variable set at deploy, an outbound call to an allowed host, a
//! refused call to a host that is not allowed, and JSON 4xx errors for bad input.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Node, examples};

#[test]
fn the_rust_example_answers_json_with_its_env_and_an_allowed_upstream() {
    the_example_answers("rust", &examples().rust);
}

#[test]
fn the_python_example_answers_json_with_its_env_and_an_allowed_upstream() {
    the_example_answers("python", &examples().python);
}

#[test]
fn the_js_example_answers_json_with_its_env_and_an_allowed_upstream() {
    the_example_answers("js", &examples().js);
}

fn the_example_answers(lang: &str, wasm: &Path) {
    let _heavy = crate::harness::cpu_heavy();
    let upstream = Upstream::start();
    let lookup = format!("http://127.0.0.1:{}/lookup", upstream.port);
    // The downstream listens on loopback, which only an operator may open to guests.
    let node = Node::start(&["--outbound-allow-private"]);
    let allowed = format!("127.0.0.1:{}", upstream.port);
    let greeting = "GREETING=Bonjour".to_string();
    let upstream_url = format!("UPSTREAM_URL={lookup}");
    node.deploy("greet", wasm, &["--env", &greeting, "--env", &upstream_url, "--allow-outbound", &allowed]);

    // JSON in, the deploy-time variable and the upstream's JSON answer out.
    let (status, doc) = post(&node, "greet", r#"{"name": "Ada Lovelace"}"#);
    assert_eq!(status, 200, "{doc}");
    let url = format!("{lookup}?name=Ada%20Lovelace");
    let expected = json!({
        "message": "Bonjour, Ada Lovelace!",
        "lang": lang,
        "upstream": {"url": url, "status": 200, "body": {"path": "/lookup?name=Ada%20Lovelace"}},
    });
    assert_eq!(doc, expected);
    assert_eq!(upstream.paths(), ["/lookup?name=Ada%20Lovelace"]);

    // Bad input: JSON errors with a 4xx status, from the function (not from sluice).
    for (body, status, code) in [
        ("not json", 400, "invalid_json"),
        ("[1, 2]", 422, "invalid_name"),
        (r#"{"nom": "Ada"}"#, 422, "invalid_name"),
        (r#"{"name": "  "}"#, 422, "invalid_name"),
        (r#"{"name": 7}"#, 422, "invalid_name"),
    ] {
        let (got, doc) = post(&node, "greet", body);
        assert_eq!((got, doc["error"]["code"].as_str()), (status, Some(code)), "{body}: {doc}");
        assert!(doc["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{doc}");
    }
    let big = format!(r#"{{"name": "{}"}}"#, "a".repeat(70 * 1024));
    let (got, doc) = post(&node, "greet", &big);
    assert_eq!((got, doc["error"]["code"].as_str()), (413, Some("body_too_large")), "{doc}");
    let res = node.get("/fn/default/greet/");
    assert_eq!(res.status(), 405);
    assert!(res.headers().get("sluice-error").is_none(), "the guest's error, not the platform's");
    assert_eq!(res.json::<Value>().unwrap()["error"]["code"], "method_not_allowed");
    assert_eq!(upstream.paths().len(), 1, "bad input never reaches the upstream");

    // Without the variables: the default greeting and no upstream call.
    node.deploy("plain", wasm, &[]);
    let (status, doc) = post(&node, "plain", r#"{"name": "Ada"}"#);
    assert_eq!((status, doc), (200, json!({"message": "Hello, Ada!", "lang": lang})));

    // The same URL, not in this function's allow list: refused inside the guest (502 from the
    // function), without a connection, and said in the call's log.
    node.deploy("denied", wasm, &["--env", &upstream_url, "--allow-outbound", "example.com"]);
    let connections = upstream.connections();
    let res = node
        .client()
        .post(format!("{}/fn/default/denied/", node.url))
        .bearer_auth(&node.token)
        .body(r#"{"name": "Ada"}"#)
        .send()
        .unwrap();
    let id = res.headers()["sluice-invocation-id"].to_str().unwrap().to_string();
    assert_eq!(res.status(), 502);
    let doc: Value = res.json().unwrap();
    assert_eq!(doc["error"]["code"], "upstream_failed", "{doc}");
    assert_eq!(upstream.connections(), connections, "the refused call never connected");
    let logs = node.wait_json(&format!("/v1/invocations/{id}/logs"), |v| {
        v["lines"].as_array().is_some_and(|lines| !lines.is_empty())
    });
    assert!(logs.to_string().contains("not in this function's allow list"), "{logs}");

    // None of greet's calls failed once its answer was out (a trap after a whole answer would
    // not show in any status above). Its records are written by now: the refused call's, later
    // in the same queue, are.
    let listed: Value = node.get("/v1/invocations?function=greet&limit=100").json().unwrap();
    for call in listed["invocations"].as_array().unwrap() {
        assert_eq!((&call["status"], &call["error_kind"]), (&json!("succeeded"), &Value::Null), "{call}");
    }
}

/// POSTs `body` to the function; its status and JSON answer.
fn post(node: &Node, function: &str, body: &str) -> (u16, Value) {
    let res = node
        .client()
        .post(format!("{}/fn/default/{function}/", node.url))
        .bearer_auth(&node.token)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .unwrap();
    let status = res.status().as_u16();
    assert_eq!(
        res.headers().get("content-type").map(|v| v.to_str().unwrap()),
        Some("application/json"),
        "status {status}"
    );
    let text = res.text().unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")))
}

/// A downstream on 127.0.0.1 that answers every request with `{"path": "<its path>"}` and
/// remembers the paths.
struct Upstream {
    port: u16,
    paths: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
}

impl Upstream {
    fn start() -> Upstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let paths = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (seen, count) = (paths.clone(), connections.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let Some((head, _)) = crate::harness::read_request(&mut stream) else { return };
                    let mut buf = [0u8; 4096];
                    let path = head.split_whitespace().nth(1).unwrap_or_default().to_string();
                    seen.lock().unwrap().push(path.clone());
                    let body = json!({ "path": path }).to_string();
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(answer.as_bytes());
                    // Like a keep-alive server, leave closing to the client (see limits.rs,
                    // `pong_server`: a server that closes first can cut a guest's request body).
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
                });
            }
        });
        Upstream { port, paths, connections }
    }

    fn paths(&self) -> Vec<String> {
        self.paths.lock().unwrap().clone()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// A heavy component (the Python example: 15 MiB of initial memory) runs in the heavy engine's
/// pool: the node's bound of heavy instances holds across functions, calls beyond it wait for a
/// slot, and an idle warm instance gives its slot up to a call that needs a fresh one.
#[test]
fn heavy_components_share_the_nodes_heavy_slots_and_idle_ones_give_theirs_up() {
    let _heavy = crate::harness::cpu_heavy();
    let node = Node::start(&["--heavy-slots-max", "1"]);
    node.deploy("warm", &examples().python, &["--reuse", "100"]);
    node.deploy("fresh", &examples().python, &[]);
    node.deploy("light", &examples().rust, &[]);
    let heavy = |node: &Node| node.get("/v1/node").json::<Value>().unwrap()["heavy"].clone();
    assert_eq!(heavy(&node)["slots_max"], 1);

    // The warm instance keeps the only slot while it waits for its next call.
    assert_eq!(post(&node, "warm", r#"{"name": "Ada"}"#).0, 200);
    let h = node.wait_json("/v1/node", |v| v["warm"]["idle"] == 1);
    assert_eq!(h["heavy"]["slots_in_use"], 1, "{h}");

    // A light function does not use heavy slots.
    assert_eq!(post(&node, "light", r#"{"name": "Ada"}"#).0, 200);

    // A fresh call of another heavy function takes the slot from the idle instance at once
    // (not after its minute of idle time).
    let started = std::time::Instant::now();
    assert_eq!(post(&node, "fresh", r#"{"name": "Ada"}"#).0, 200);
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    let v = node.wait_json("/v1/node", |v| v["heavy"]["slots_in_use"] == 0);
    assert_eq!(v["warm"]["idle"], 0, "{v}");
    assert!(v["warm"]["dropped_full_total"].as_u64().unwrap() >= 1, "{v}");

    // Three calls at once with one slot: each waits for it in turn, none fails.
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let (url, token) = (format!("{}/fn/default/fresh/", node.url), node.token.clone());
            std::thread::spawn(move || {
                let res = crate::harness::http()
                    .post(url)
                    .bearer_auth(token)
                    .header("content-type", "application/json")
                    .body(r#"{"name": "Ada"}"#)
                    .timeout(Duration::from_secs(60))
                    .send()
                    .unwrap();
                (res.status().as_u16(), res.text().unwrap())
            })
        })
        .collect();
    for c in calls {
        let (status, body) = c.join().unwrap();
        assert_eq!(status, 200, "{body}");
    }
    // The slot is given back when the store is dropped, just after the response is sent.
    node.wait_json("/v1/node", |v| v["heavy"]["slots_in_use"] == 0);
}
