//! Bounds on what a client can make a node hold: request bodies that never finish, async calls
//! being accepted at once, and node settings that would break it at start.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{BIN, Node, assert_error, guests};

/// Opens a connection and sends a request head declaring a 100-byte body, then 10 bytes of it:
/// a client that stalls in the middle of its body.
fn stalled_body(node: &Node, target: &str, extra_headers: &str) -> TcpStream {
    let addr = node.url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let head = format!(
        "POST {target} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n{extra_headers}content-length: 100\r\n\r\n",
        node.token
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&[b'x'; 10]).unwrap();
    s
}

/// Reads until the response head and its JSON body have arrived (or the connection closes).
fn read_response(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.ends_with(b"}}") {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn a_body_that_stalls_is_cut_off_at_the_read_deadline() {
    let node = Node::start(&["--body-read-timeout", "1s"]);
    node.deploy("tg", &guests().testguest, &[]);
    for (target, headers) in
        [("/fn/default/tg/echo", "prefer: respond-async\r\n"), ("/v1/tenants/default/blobs", "")]
    {
        let started = Instant::now();
        let mut s = stalled_body(&node, target, headers);
        let res = read_response(&mut s);
        let took = started.elapsed();
        assert!(res.starts_with("HTTP/1.1 408") && res.contains("request_timeout"), "{target}: {res}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "{target}: answered after {took:?}"
        );
    }
    assert_eq!(node.get("/fn/default/tg/ok").status(), 200, "the node keeps serving");
}

#[test]
fn async_calls_reading_their_body_take_their_tenants_share_not_the_nodes_slots() {
    // Four slots on the node: each tenant's share is one.
    let node = Node::start(&["--async-enqueue-inflight-max", "4", "--body-read-timeout", "30s"]);
    node.deploy("tg", &guests().testguest, &[]);
    let (ok, out, err) = node.cli(&["tenants", "create", "mallory"]);
    assert!(ok, "{out}{err}");
    node.deploy("tg", &guests().testguest, &["--tenant", "mallory", "--public"]);
    let client = node.client();
    let enqueue = |target: &str| {
        client
            .post(format!("{}{target}", node.url))
            .bearer_auth(&node.token)
            .header("prefer", "respond-async")
            .body("hello")
            .send()
            .unwrap()
    };
    let polled = |target: &str, want: u16| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let res = enqueue(target);
            if res.status().as_u16() == want {
                return res;
            }
            assert!(Instant::now() < deadline, "{target} never answered {want}; last {}", res.status());
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    // As many clients as the node has slots call mallory's public function and never send their
    // bodies. They take mallory's share only: mallory's next call is refused at once...
    let stalled: Vec<_> =
        (0..4).map(|_| stalled_body(&node, "/fn/mallory/tg/echo", "prefer: respond-async\r\n")).collect();
    let res = polled("/fn/mallory/tg/echo", 429);
    assert!(res.headers().get("retry-after").is_some(), "429 says when to come back");
    assert_error(res, 429, "concurrency_limited");
    // ...while every other tenant's async calls are still accepted.
    for _ in 0..3 {
        assert_eq!(enqueue("/fn/default/tg/echo").status(), 202, "another tenant was refused");
    }

    // When those clients go away mallory's slot comes back.
    drop(stalled);
    assert_eq!(polled("/fn/mallory/tg/echo", 202).status(), 202);
}

#[test]
fn serve_refuses_durations_that_would_break_the_node() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, value) in [
        ("--lease", "2ms"),
        ("--retention", "0s"),
        ("--header-read-timeout", "0s"),
        ("--body-read-timeout", "0s"),
        ("--shutdown-grace", "1000days"),
    ] {
        let out = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args([flag, value])
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value} was accepted: {stderr}");
        assert!(stderr.contains(flag), "{flag} {value}: the error names the flag: {stderr}");
        assert!(!stderr.contains("listening on"), "{flag} {value}: refused before binding: {stderr}");
    }
}

#[test]
fn a_background_task_that_dies_takes_the_node_down_loudly() {
    let mut node = Node::start(&["--test-panic-task-after", "300ms"]);
    let mut child = node.child.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the node kept running without its task");
        std::thread::sleep(Duration::from_millis(20));
    };
    // The stderr reader thread may still be collecting the last lines.
    crate::harness::wait_until("the node's last lines", || {
        let stderr = node.stderr.lock().unwrap();
        stderr.iter().any(|l| l.contains("panicked")) && stderr.iter().any(|l| l.contains("stopping"))
    });
    let stderr = node.stderr.lock().unwrap().join("\n");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("background task `test-panic` panicked"), "{stderr}");
    assert!(stderr.contains("stopping"), "{stderr}");
}
