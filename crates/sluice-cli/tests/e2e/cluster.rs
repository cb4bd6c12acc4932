//! Nodes sharing one PostgreSQL database: a deploy on one node runs on another, a key revoked on
//! one is refused on another, the registry lists them, and a node whose database goes away keeps
//! serving what it knows and recovers by itself.
//!
//! Needs `SLUICE_TEST_PG_URL` (CI sets it); each test creates its own database and drops it.
//! Without it every test here passes after saying it skipped.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::{Node, assert_error, guests};

/// A database of its own on the test server, dropped (with its connections) at the end.
pub struct PgDatabase {
    admin_url: String,
    pub name: String,
    pub url: String,
}

impl PgDatabase {
    /// `None`, after saying so, when `SLUICE_TEST_PG_URL` is not set.
    pub fn create() -> Option<Self> {
        let Ok(admin_url) = std::env::var("SLUICE_TEST_PG_URL") else {
            eprintln!(
                "skipped: SLUICE_TEST_PG_URL is not set, so there is no PostgreSQL to run a cluster on"
            );
            return None;
        };
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let name = format!("sluice_e2e_{}_{}", std::process::id(), nanos % 1_000_000_000_000);
        psql(&admin_url, &format!("CREATE DATABASE {name}"));
        let base = admin_url.rsplit_once('/').map_or(admin_url.as_str(), |(base, _)| base);
        let url = format!("{base}/{name}");
        Some(Self { admin_url, name, url })
    }

    /// Terminates every connection to this database but the caller's: what a PostgreSQL restart
    /// looks like to its clients.
    pub fn terminate_connections(&self) -> usize {
        let out = psql(
            &self.admin_url,
            &format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = '{}' AND pid <> pg_backend_pid()",
                self.name
            ),
        );
        out.trim().parse().unwrap_or(0)
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([&self.admin_url, "-qAtc", &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)])
            .output();
    }
}

fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql").args([url, "-qAtc", sql]).output().expect("running psql");
    assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Starts a node of the cluster on `db`; nodes after the first get the first node's admin key.
pub fn cluster_node(db: &PgDatabase, token: Option<&str>, extra: &[&str]) -> Node {
    let mut args = vec!["--store", db.url.as_str()];
    args.extend_from_slice(extra);
    let mut node = Node::start(&args);
    if let Some(token) = token {
        node.token = token.to_string();
    }
    node
}

/// Calls `path` on `node` with `key` until the status is `want`; returns how long that took.
fn until_status(node: &Node, key: &str, path: &str, want: u16, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let status =
            node.client().get(format!("{}{path}", node.url)).bearer_auth(key).send().unwrap().status();
        if status.as_u16() == want {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "{path} on the other node still answers {status}, not {want}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends an async call of `path` to `node`.
fn post_async(node: &Node, path: &str) -> reqwest::blocking::Response {
    let request = node.client().post(format!("{}{path}", node.url)).bearer_auth(&node.token);
    request.header("prefer", "respond-async").send().unwrap()
}

#[test]
fn a_deploy_and_a_revoke_on_one_node_reach_the_other() {
    let Some(db) = PgDatabase::create() else { return };
    let one = cluster_node(&db, None, &[]);
    let two = cluster_node(&db, Some(&one.token), &[]);
    assert!(!two.dir.path().join("admin.token").exists(), "the second node made a key of its own");

    one.deploy("hello", &guests().hello, &[]);
    // Node two installs the version once it has compiled its own artifact, and loads nothing
    // until a call comes: code is loaded on demand on every node.
    let installed = two.wait_json("/v1/node", |v| v["functions"] == 1);
    assert_eq!(installed["code_cache"]["compiles"], 1, "{installed}");
    assert_eq!(installed["code_cache"]["entries"], 0, "{installed}");
    let deployed = until_status(&two, &two.token, "/fn/default/hello", 200, Duration::from_secs(5));
    eprintln!("a deploy on node one ran on node two after {deployed:?}");

    // A key made on one node works on the other; revoked on one, it is refused on the other.
    let res = one
        .client()
        .post(format!("{}/v1/tenants/default/keys", one.url))
        .bearer_auth(&one.token)
        .json(&serde_json::json!({"scopes": ["invoke"]}))
        .send()
        .unwrap();
    assert_eq!(res.status(), 201);
    let created: serde_json::Value = res.json().unwrap();
    let (key, id) = (created["key"].as_str().unwrap(), created["id"].as_str().unwrap());
    until_status(&two, key, "/fn/default/hello", 200, Duration::from_secs(5));
    let res =
        one.client().delete(format!("{}/v1/keys/{id}", one.url)).bearer_auth(&one.token).send().unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    let revoked = until_status(&two, key, "/fn/default/hello", 401, Duration::from_secs(5));
    eprintln!("a key revoked on node one was refused on node two after {revoked:?}");

    // A new version deployed on the other node replaces the first everywhere; a delete removes it.
    two.deploy("hello", &guests().testguest, &[]);
    until_status(&one, &one.token, "/fn/default/hello/echo", 200, Duration::from_secs(5));
    let (ok, out, err) = two.cli(&["functions", "delete", "hello"]);
    assert!(ok, "{out}{err}");
    until_status(&one, &one.token, "/fn/default/hello", 404, Duration::from_secs(5));

    // The registry lists both, each once, and knows which one answered.
    let nodes = two.wait_json("/v1/nodes", |v| v["nodes"].as_array().is_some_and(|n| n.len() == 2));
    let nodes = nodes["nodes"].as_array().unwrap();
    assert!(nodes.iter().all(|n| n["health"] == "up"), "{nodes:?}");
    assert_eq!(nodes.iter().filter(|n| n["this"] == true).count(), 1);
    let addresses: Vec<&str> = nodes.iter().map(|n| n["address"].as_str().unwrap()).collect();
    assert!(addresses.contains(&one.url.as_str()) && addresses.contains(&two.url.as_str()), "{addresses:?}");
}

#[test]
fn async_calls_accepted_by_one_node_run_and_a_stopped_node_says_so() {
    let Some(db) = PgDatabase::create() else { return };
    let mut one = cluster_node(&db, None, &[]);
    let two = cluster_node(&db, Some(&one.token), &[]);
    one.deploy("hello", &guests().hello, &[]);
    until_status(&two, &two.token, "/fn/default/hello", 200, Duration::from_secs(5));
    let ids: Vec<String> =
        (0..20).map(|i| (if i % 2 == 0 { &one } else { &two }).enqueue("/fn/default/hello", &[])).collect();
    for id in &ids {
        let v = two.wait_json(&format!("/v1/invocations/{id}"), |v| v["status"] == "succeeded");
        assert_eq!(v["attempts"], 1);
    }
    // A clean stop shows as `stopped`, not `down`.
    assert!(one.terminate().success());
    let nodes = two.wait_json("/v1/nodes", |v| {
        v["nodes"].as_array().is_some_and(|n| n.iter().any(|n| n["health"] == "stopped"))
    });
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 2);
}

/// A rolling restart: SIGTERM on a node gives its running invocations back (the attempt not
/// counted) and another node runs them at once, not after their leases lapse.
#[test]
fn a_node_stopped_with_sigterm_hands_its_work_to_the_others() {
    let Some(db) = PgDatabase::create() else { return };
    let mut one = cluster_node(&db, None, &["--shutdown-grace", "200ms", "--lease", "60s"]);
    one.deploy("tg", &guests().testguest, &["--async-timeout", "60s"]);
    let ids: Vec<String> = (0..4).map(|_| one.enqueue("/fn/default/tg/sleep?ms=4000", &[])).collect();
    for id in &ids {
        one.wait_json(&format!("/v1/invocations/{id}"), |v| v["status"] == "running");
    }
    let two = cluster_node(&db, Some(&one.token), &[]);
    let stopped = Instant::now();
    assert!(one.terminate().success());
    for id in &ids {
        let (v, _) = wait_long(&two, &format!("/v1/invocations/{id}"), |v| v["status"] == "succeeded");
        assert_eq!(v["attempts"], 1, "a released attempt does not count: {v}");
    }
    let took = stopped.elapsed();
    assert!(took < Duration::from_secs(30), "waited {took:?}: for the 60 s leases, not for the hand-over");
    eprintln!("four 4 s invocations handed over and finished {took:?} after SIGTERM");
}

/// Polls `path` until `pred` holds, for up to a minute.
/// Returns the value and the states it went through on the way.
fn wait_long(
    node: &Node,
    path: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> (serde_json::Value, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    // What it showed on the way, for the message if it never gets there.
    let mut seen: Vec<String> = Vec::new();
    loop {
        let res = node.get(path);
        if res.status().is_success() {
            let v: serde_json::Value = res.json().unwrap();
            if pred(&v) {
                return (v, seen);
            }
            let state = format!("{} attempts={} error_kind={}", v["status"], v["attempts"], v["error_kind"]);
            if seen.last() != Some(&state) {
                seen.push(state);
            }
        }
        assert!(Instant::now() < deadline, "timed out waiting on {path}; it went {seen:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An HTTP server that holds each request for `hold` before answering 200, and records for each
/// connection whether the client hung up first (and when).
fn holding_server(hold: Duration) -> (u16, Arc<Mutex<Vec<Option<Instant>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Arc<Mutex<Vec<Option<Instant>>>> = Arc::default();
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let seen = seen2.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                let me = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(None);
                    seen.len() - 1
                };
                stream.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                let until = Instant::now() + hold;
                while Instant::now() < until {
                    let hung_up = match stream.read(&mut buf) {
                        Ok(0) => true,
                        Ok(_) => false,
                        Err(e) => {
                            !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
                        }
                    };
                    if hung_up {
                        seen.lock().unwrap()[me] = Some(Instant::now());
                        return;
                    }
                }
                let _ =
                    stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
            });
        }
    });
    (port, seen)
}

/// A node starved past its lease (here: the lease made to lapse in the database) that leases the
/// same invocation again stops its first attempt instead of running both side by side.
#[test]
fn a_node_that_lost_a_lease_stops_that_attempt() {
    let Some(db) = PgDatabase::create() else { return };
    let (port, connections) = holding_server(Duration::from_secs(10));
    let node = cluster_node(&db, None, &["--outbound-allow-private", "--lease", "3s"]);
    let outbound = format!("127.0.0.1:{port}");
    node.deploy("tg", &guests().testguest, &["--allow-outbound", &outbound, "--async-timeout", "60s"]);
    let id = node.enqueue(&format!("/fn/default/tg/fetch?url=http%3A%2F%2F127.0.0.1%3A{port}%2Fhold"), &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while connections.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "attempt 1 never called out");
        std::thread::sleep(Duration::from_millis(20));
    }
    // As if this node had not renewed attempt 1's lease in time and a sweep had reclaimed it.
    // (Only making the lease lapse would race with this node's next heartbeat, which renews a
    // lapsed lease nobody has reclaimed yet.)
    let lapsed = Instant::now();
    psql(
        &db.url,
        &format!(
            "UPDATE invocations SET status = 'failed', error_kind = 'lease_lost', lease_owner = NULL,
                 lease_expires_at = NULL
             WHERE id = '{id}'"
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let first_closed = loop {
        let seen = connections.lock().unwrap().clone();
        if let Some(Some(at)) = seen.first() {
            break *at;
        }
        assert!(Instant::now() < deadline, "attempt 1 kept running after its lease was lost: {seen:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("attempt 1 stopped {:?} after its lease lapsed", first_closed - lapsed);
    let (v, went) = wait_long(&node, &format!("/v1/invocations/{id}"), |v| v["status"] == "succeeded");
    let logs = node.get(&format!("/v1/invocations/{id}/logs")).text().unwrap_or_default();
    let node_log = node.stderr.lock().unwrap().join("\n");
    assert_eq!(v["attempts"], 2, "{v}\nit went {went:?}\nits logs: {logs}\nthe node's log:\n{node_log}");
    let seen = connections.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "one call out per attempt: {seen:?}");
    assert_eq!(seen[1], None, "attempt 2 ran to the end");
}

/// A TCP proxy in front of PostgreSQL that can be cut (every connection closed, new ones refused
/// at once) and restored: the database becoming unreachable, as the node sees it.
struct Cuttable {
    port: u16,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Cuttable {
    fn to(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (target, cut2, open2) = (target.to_string(), cut.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if cut2.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else { continue };
                let mut open = open2.lock().unwrap();
                open.push(client.try_clone().unwrap());
                open.push(server.try_clone().unwrap());
                drop(open);
                for (mut from, mut to) in
                    [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Self { port, cut, open }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

#[test]
fn without_its_database_a_node_serves_what_it_knows_refuses_async_calls_and_recovers() {
    let Some(db) = PgDatabase::create() else { return };
    let target =
        db.url.split('@').nth(1).and_then(|rest| rest.split('/').next()).expect("host:port in the URL");
    let proxy = Cuttable::to(target);
    let url = db.url.replacen(target, &format!("127.0.0.1:{}", proxy.port), 1);
    let node = Node::start(&["--store", &url]);
    node.deploy("hello", &guests().hello, &[]);
    assert_eq!(node.get("/fn/default/hello").status(), 200);

    proxy.cut();
    for _ in 0..20 {
        assert_eq!(node.get("/fn/default/hello").status(), 200, "sync calls of a known version keep working");
    }
    let started = Instant::now();
    let res = post_async(&node, "/fn/default/hello");
    assert!(res.headers().contains_key("retry-after"), "{:?}", res.headers());
    assert_error(res, 503, "unavailable");
    assert!(started.elapsed() < Duration::from_secs(10), "the refusal took {:?}", started.elapsed());

    proxy.restore();
    // Recovers by itself: the next async call is accepted and runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        let res = post_async(&node, "/fn/default/hello");
        if res.status() == 202 {
            break res.json::<serde_json::Value>().unwrap()["id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "the node did not recover: {}", res.status());
        std::thread::sleep(Duration::from_millis(200));
    };
    node.wait_json(&format!("/v1/invocations/{id}"), |v| v["status"] == "succeeded");
}

/// The log lines of `id`, as (stream, line), once at least `at_least` are recorded.
fn log_lines(node: &Node, id: &str, at_least: usize) -> Vec<(String, String)> {
    let v = node.wait_json(&format!("/v1/invocations/{id}/logs"), |v| {
        v["lines"].as_array().is_some_and(|l| l.len() >= at_least)
    });
    let line =
        |l: &serde_json::Value| (l["stream"].as_str().unwrap().into(), l["line"].as_str().unwrap().into());
    v["lines"].as_array().unwrap().iter().map(line).collect()
}

/// PostgreSQL refuses a NUL in text and `\u0000` in jsonb. A guest that prints one has its lines
/// recorded with U+FFFD in its place: on sync calls (whose records are written in batches with
/// other calls'), in a trap's message, and on an async call, whose result is recorded by its
/// first attempt instead of the guest running again until it is dead.
#[test]
fn a_guest_printing_nul_is_recorded_on_postgres() {
    let Some(db) = PgDatabase::create() else { return };
    let node = cluster_node(&db, None, &[]);
    node.deploy("tg", &guests().testguest, &[]);
    let id_of = |res: &reqwest::blocking::Response| {
        res.headers()["sluice-invocation-id"].to_str().unwrap().to_string()
    };
    // Sent together, so that the recorder writes them in one batch.
    let printed = node.get("/fn/default/tg/print?text=a%00b");
    let plain = node.get("/fn/default/tg/stdout");
    let trapped = node.get("/fn/default/tg/print?text=boom%00&panic=1");
    let statuses = [printed.status(), plain.status(), trapped.status()].map(|s| s.as_u16());
    assert_eq!(statuses, [200, 200, 500]);
    let stdout = ("stdout".to_string(), "a\u{fffd}b".to_string());
    assert!(log_lines(&node, &id_of(&printed), 2).contains(&stdout));
    assert!(log_lines(&node, &id_of(&plain), 3).contains(&("stdout".into(), "stdout line 1".into())));
    let trap = log_lines(&node, &id_of(&trapped), 3);
    assert!(trap.iter().any(|(_, line)| line.contains("boom\u{fffd}")), "{trap:?}");

    let id = node.enqueue("/fn/default/tg/print?text=x%00y", &[]);
    let inv = node
        .wait_json(&format!("/v1/invocations/{id}"), |v| v["status"] != "queued" && v["status"] != "running");
    assert_eq!((inv["status"].as_str(), inv["attempts"].as_u64()), (Some("succeeded"), Some(1)), "{inv}");
    assert!(log_lines(&node, &id, 2).contains(&("stderr".into(), "x\u{fffd}y".into())));
}

#[test]
fn an_alias_move_on_one_node_reaches_the_other() {
    let Some(db) = PgDatabase::create() else { return };
    let one = cluster_node(&db, None, &[]);
    let two = cluster_node(&db, Some(&one.token), &[]);
    one.deploy("app", &guests().hello, &[]);
    one.deploy("app", &guests().testguest, &[]);
    // Node two serves version 2 as `latest` once it has followed both deploys.
    until_status(&two, &two.token, "/fn/default/app/echo", 200, Duration::from_secs(5));

    // A rollback on node one: node two serves version 1 (hello answers any path) without a
    // deploy, as soon as the change notification arrives. Ten moves, each timed.
    let version_on_two = || {
        let res = two
            .client()
            .get(format!("{}/fn/default/app/ok", two.url))
            .bearer_auth(&two.token)
            .send()
            .unwrap();
        res.headers().get("sluice-version").map(|v| v.to_str().unwrap().to_string())
    };
    let mut seen = Vec::new();
    for (i, to) in ["1", "2"].iter().cycle().take(10).enumerate() {
        let (ok, out, err) = one.cli(&["alias", "set", "app", "latest", to]);
        assert!(ok, "move {i}: {out}{err}");
        let moved = Instant::now();
        while version_on_two().as_deref() != Some(to) {
            assert!(moved.elapsed() < Duration::from_secs(5), "move {i} to {to} did not reach node two");
            std::thread::sleep(Duration::from_millis(5));
        }
        seen.push(moved.elapsed());
    }
    seen.sort();
    eprintln!(
        "an alias move on node one was served by node two after {:?} (median), {:?} (max)",
        seen[5], seen[9]
    );
}
