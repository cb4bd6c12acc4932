//! Every limit fires within its bound, answers with its kind, and leaves the node (and other
//! functions) serving.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::harness::{Node, assert_error, guests};

fn node_with_testguest(flags: &[&str]) -> Node {
    let node = Node::start(&["--outbound-allow-private", "--header-read-timeout", "1s"]);
    node.deploy("tg", &guests().testguest, flags);
    node.deploy("hello", &guests().hello, &[]);
    node
}

#[test]
fn guest_failures_map_to_their_kinds_within_their_limits() {
    let node = node_with_testguest(&["--timeout", "1s", "--memory", "32MiB"]);

    let msg = assert_error(node.get("/fn/default/tg/panic"), 500, "trap");
    assert!(msg.contains("/logs"), "the message points at the logs: {msg}");
    let msg = assert_error(node.get("/fn/default/tg/recurse"), 500, "trap");
    assert!(msg.contains("call stack exhausted"), "{msg}");
    assert!(!msg.contains("testguest"), "the guest's internals stay in its logs: {msg}");

    let started = Instant::now();
    assert_error(node.get("/fn/default/tg/spin"), 504, "timeout");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "spin stopped after {took:?}"
    );

    let started = Instant::now();
    assert_error(node.get("/fn/default/tg/sleep?ms=10000"), 504, "timeout");
    assert!(started.elapsed() < Duration::from_secs(5), "a sleeping guest is stopped at its timeout too");

    assert_error(node.get("/fn/default/tg/alloc?bytes=67108864"), 500, "memory_limit");
    assert_eq!(node.get("/fn/default/tg/alloc?bytes=1048576").status(), 200, "within the limit is fine");

    assert_error(node.get("/fn/default/tg/no-response"), 500, "no_response");
    assert_eq!(node.get("/fn/default/tg/sleep?ms=10").status(), 200);
}

/// A downstream on 127.0.0.1 that answers every request with `pong`; returns its port and the
/// number of connections it accepted.
fn pong_server() -> (u16, Arc<AtomicUsize>) {
    let downstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = downstream.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for stream in downstream.incoming() {
            let mut stream = stream.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            // A thread per connection: each stays open until its client closes it.
            std::thread::spawn(move || {
                // Read the whole request head before answering, not just its first segment.
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request_complete(&request) {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\npong");
                // Like a keep-alive server, leave closing to the client: a server that closes
                // first ends the exchange before a guest has finished its (empty) request body,
                // which wstd then reports as a "connection reset" (see `fetch_through`).
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    (port, hits)
}

/// Whether `bytes` hold a whole request head (and the last chunk of a chunked body).
fn request_complete(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes).to_ascii_lowercase();
    match text.split_once("\r\n\r\n") {
        None => false,
        Some((head, body)) => !head.contains("transfer-encoding: chunked") || body.ends_with("0\r\n\r\n"),
    }
}

/// The status and body of a call, and its log once it is recorded (a call is recorded only when
/// it has log lines or an error, so only ask for the log of one that should have them).
fn call_with_logs(node: &Node, path: &str) -> (u16, String) {
    let res = node.get(path);
    let id = res.headers()["sluice-invocation-id"].to_str().unwrap().to_string();
    let status = res.status().as_u16();
    let body = res.text().unwrap();
    assert!(body.contains("fetch error"), "{status} {body}");
    let logs =
        node.wait_json(&format!("/v1/invocations/{id}/logs"), |v| !v["lines"].as_array().unwrap().is_empty());
    (status, logs.to_string())
}

#[test]
fn outbound_http_only_to_allowed_hosts() {
    let (port, hits) = pong_server();
    let node = node_with_testguest(&[]);
    let target = format!("http://127.0.0.1:{port}/x");

    // Not in the allow list: fails inside the guest, never reaches the network, is logged.
    let (status, logs) = call_with_logs(&node, &format!("/fn/default/tg/fetch?url={target}"));
    assert_eq!(status, 502);
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    assert!(logs.contains("not in this function's allow list"), "{logs}");

    // Allowed by host and port: goes through.
    node.deploy("allowed", &guests().testguest, &["--allow-outbound", &format!("127.0.0.1:{port}")]);
    let (status, body, attempts) = fetch_through(&node, &format!("/fn/default/allowed/fetch?url={target}"));
    assert_eq!((status, body.as_str()), (200, "status=200\npong"));
    assert_eq!(hits.load(Ordering::SeqCst), attempts, "one connection per call");
}

/// Calls a `fetch` that should go through, again if the guest saw its own request body's stream
/// closed (wstd's "connection reset"): a race inside the guest library between finishing an
/// empty request body and an exchange the host has already completed, seen in about 1 call in
/// 200 here against a keep-alive server, with sluice's client and wasmtime's default alike.
/// Returns the status, the body and how many calls it took.
fn fetch_through(node: &Node, path: &str) -> (u16, String, usize) {
    for attempt in 1..=5 {
        let res = node.get(path);
        let status = res.status().as_u16();
        let body = res.text().unwrap();
        if !(status == 502 && body.contains("connection reset")) {
            return (status, body, attempt);
        }
    }
    panic!("five calls of {path} ended in the guest library's connection reset");
}

#[test]
fn private_addresses_need_the_operator_flag_even_when_allowed() {
    // A listener that would answer: a refusal can only come from the policy, not the port.
    let (port, hits) = pong_server();
    let allow = format!("127.0.0.1:{port}");
    let path = format!("/fn/default/tg/fetch?url=http://127.0.0.1:{port}/");

    let node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &["--allow-outbound", &allow]);
    let (status, logs) = call_with_logs(&node, &path);
    assert_eq!(status, 502);
    assert!(logs.contains("denied: 127.0.0.1 is a private address"), "{logs}");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the listener was never connected to");

    // An allow list entry the parser cannot read is refused at deploy, naming the entry.
    let (ok, out, err) =
        node.cli(&["deploy", "bad", guests().testguest.to_str().unwrap(), "--allow-outbound", "[::1"]);
    assert!(!ok && err.contains("invalid outbound host \"[::1\""), "{out}{err}");
    drop(node);

    let node = Node::start(&["--outbound-allow-private"]);
    node.deploy("tg", &guests().testguest, &["--allow-outbound", &allow]);
    let (status, body, attempts) = fetch_through(&node, &path);
    assert_eq!((status, body.as_str()), (200, "status=200\npong"));
    assert_eq!(hits.load(Ordering::SeqCst), attempts, "one connection per call");
}

/// Names go through the node's resolver: `localhost` (answered without a name server) reaches the
/// listener, and a name that cannot exist (`.invalid`, RFC 6761) fails inside the guest as a DNS
/// error without a connection.
#[test]
fn outbound_names_are_resolved_by_the_node() {
    let (port, hits) = pong_server();
    let node = Node::start(&["--outbound-allow-private"]);
    let allow = format!("localhost:{port}");
    node.deploy(
        "tg",
        &guests().testguest,
        &["--allow-outbound", &allow, "--allow-outbound", "nothing.invalid"],
    );
    let path = format!("/fn/default/tg/fetch?url=http://localhost:{port}/x");
    let (status, body, attempts) = fetch_through(&node, &path);
    assert_eq!((status, body.as_str()), (200, "status=200\npong"));
    assert_eq!(hits.load(Ordering::SeqCst), attempts, "one connection per call");

    let res = node.get("/fn/default/tg/fetch?url=http://nothing.invalid/");
    let (status, body) = (res.status().as_u16(), res.text().unwrap());
    assert_eq!(status, 502, "{body}");
    assert!(body.to_ascii_lowercase().contains("dns"), "{body}");
    assert_eq!(hits.load(Ordering::SeqCst), attempts, "nothing was connected to");
}

/// Sends raw bytes and returns what the server answered (until it closes or 5 s pass).
fn raw(node: &Node, request: &[u8]) -> String {
    let addr = node.url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn gateway_limits_reject_abuse_and_keep_serving() {
    let node = node_with_testguest(&[]);
    let auth = format!("authorization: Bearer {}\r\n", node.token);

    // Oversized head (64 KiB default): 431 with sluice's JSON error. A head beyond hyper's
    // buffer backstop is answered by hyper and the connection closed; the client may still be
    // writing, so the kernel can turn that close into a reset that swallows the 431. Either way
    // the request never reaches a function.
    let big = format!(
        "GET /fn/default/hello/ HTTP/1.1\r\nhost: x\r\n{auth}x-big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let res = raw(&node, big.as_bytes());
    assert!(res.starts_with("HTTP/1.1 431") && res.contains("headers_too_large"), "{res}");
    let huge = format!(
        "GET /fn/default/hello/ HTTP/1.1\r\nhost: x\r\n{auth}x-big: {}\r\n\r\n",
        "a".repeat(300 * 1024)
    );
    let res = raw(&node, huge.as_bytes());
    assert!(res.is_empty() || res.starts_with("HTTP/1.1 431"), "{res}");
    let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let many = format!("GET /fn/default/hello/ HTTP/1.1\r\nhost: x\r\n{auth}{many}\r\n");
    assert!(raw(&node, many.as_bytes()).starts_with("HTTP/1.1 431"));

    // Both framings: 400 from sluice, before the body is read.
    let smuggle = format!(
        "POST /fn/default/tg/echo HTTP/1.1\r\nhost: x\r\n{auth}content-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    let res = raw(&node, smuggle.as_bytes());
    assert!(res.starts_with("HTTP/1.1 400") && res.contains("Transfer-Encoding"), "{res}");
    // Two different Content-Lengths: hyper refuses to parse it.
    let dup = format!(
        "POST /fn/default/tg/echo HTTP/1.1\r\nhost: x\r\n{auth}content-length: 4\r\ncontent-length: 5\r\n\r\nabcd"
    );
    assert!(raw(&node, dup.as_bytes()).starts_with("HTTP/1.1 400"));

    // Slowloris: a head that never completes is cut off at the header-read deadline (1 s here).
    let addr = node.url.trim_start_matches("http://").to_string();
    let started = Instant::now();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /fn/default/hello/ HTTP/1.1\r\nhost: x\r\n").unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "slow head held the connection {:?}",
        started.elapsed()
    );

    // Body over the sync limit: 413 whether declared or streamed. A declared length is refused
    // from the head alone, before any of the body is read.
    let declared = format!(
        "POST /fn/default/tg/echo HTTP/1.1\r\nhost: x\r\n{auth}content-length: {}\r\n\r\n",
        7 * 1024 * 1024
    );
    let res = raw(&node, declared.as_bytes());
    assert!(res.starts_with("HTTP/1.1 413") && res.contains("payload_too_large"), "{res}");
    let client = node.client();
    // Streamed without a length, the limit fires while the body flows. If the guest has not
    // answered yet that is a 413; an echoing guest has already sent its head, so the response is
    // cut off instead. Either way the full oversized body never comes back as a success.
    let res = client
        .post(format!("{}/fn/default/tg/echo", node.url))
        .bearer_auth(&node.token)
        .body(reqwest::blocking::Body::new(unsized_body(7 * 1024 * 1024)))
        .send();
    match res {
        Ok(res) if res.status() == 413 => assert_error(res, 413, "payload_too_large").len(),
        Ok(res) => {
            let status = res.status();
            let body = res.bytes();
            assert!(
                body.is_err() || body.unwrap().len() < 7 * 1024 * 1024,
                "status {status}: oversized body passed"
            );
            0
        }
        Err(_) => 0,
    };

    // Keys and names.
    let res = client.get(format!("{}/fn/default/hello/", node.url)).send().unwrap();
    assert_error(res, 401, "unauthorized");
    let res = client.get(format!("{}/fn/default/hello/", node.url)).bearer_auth("sk_wrong").send().unwrap();
    assert_error(res, 401, "unauthorized");
    assert_error(node.get("/fn/default/missing/"), 404, "not_found");
    assert_error(node.get("/fn/nobody/hello/"), 404, "not_found");
    assert_error(node.get("/v1/tenants/default/functions/missing"), 404, "not_found");
    assert_error(node.get("/v1/nothing-here"), 404, "not_found");

    assert_eq!(node.get("/fn/default/hello/").text().unwrap(), "hello from sluice\n");
}

/// A reader of `len` bytes with no declared length, so reqwest sends it chunked.
fn unsized_body(len: usize) -> impl Read + Send + 'static {
    std::io::repeat(7).take(len as u64)
}
