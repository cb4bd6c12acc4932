//! Deploying components and calling them: the happy path and every bad upload.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::harness::{Node, assert_error, guests};

#[test]
fn deploy_then_invoke_with_curl_and_cli() {
    let node = Node::start(&[]);
    let out = node.deploy("hello", &guests().hello, &[]);
    assert!(out.contains("deployed default/hello version 1"), "{out}");
    assert!(out.contains(&format!("{}/fn/default/hello/", node.url)), "{out}");

    let res = node.get("/fn/default/hello/");
    assert_eq!(res.status(), 200);
    let id = res.headers()["sluice-invocation-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert_eq!(res.text().unwrap(), "hello from sluice\n");

    let (ok, out, err) = node.cli(&["invoke", "hello"]);
    assert!(ok, "{err}");
    assert_eq!(out, "hello from sluice\n");

    // A second deploy is a new immutable version.
    let out = node.deploy("hello", &guests().hello, &[]);
    assert!(out.contains("version 2"), "{out}");
    let (ok, out, _) = node.cli(&["functions", "list"]);
    assert!(ok);
    assert!(out.contains("hello") && out.contains(" 2 "), "{out}");
}

#[test]
fn guest_sees_path_query_env_and_invocation_id_but_not_the_key() {
    let node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &["--env", "GREETING=hi there", "--env", "B=2"]);
    let env = node.get("/fn/default/tg/env").text().unwrap();
    assert!(env.contains("GREETING=hi there\n") && env.contains("B=2\n"), "{env}");

    let res = node.get("/fn/default/tg/headers");
    let id = res.headers()["sluice-invocation-id"].to_str().unwrap().to_string();
    let headers = res.text().unwrap();
    assert!(headers.contains(&format!("sluice-invocation-id: {id}")), "{headers}");
    assert!(!headers.to_lowercase().contains("authorization"), "the platform key leaked: {headers}");

    let res = node
        .client()
        .post(format!("{}/fn/default/tg/echo", node.url))
        .bearer_auth(&node.token)
        .body("ping")
        .send()
        .unwrap();
    assert_eq!(res.text().unwrap(), "ping");
    let (ok, out, _) = node.cli(&["invoke", "tg", "/status?code=418"]);
    assert!(ok);
    assert_eq!(out, "status 418");

    // An async call waited for prints its response like a sync one...
    let (ok, out, err) = node.cli(&["invoke", "tg", "/echo", "-d", "queued ping", "--async", "--wait"]);
    assert!(ok, "{err}");
    assert_eq!(out, "queued ping");
    // ...and one that ends dead fails with why, and where its logs are.
    let (ok, out, err) = node.cli(&["invoke", "tg", "/panic", "--async", "--wait", "-X", "POST"]);
    assert!(!ok && out.is_empty(), "{out}");
    assert!(
        err.contains("dead after") && err.contains("trap") && err.contains("sluice logs --invocation"),
        "{err}"
    );
}

#[test]
fn large_bodies_pass_through_whole() {
    let node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &[]);
    let body: Vec<u8> = (0..5 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let res = node
        .client()
        .post(format!("{}/fn/default/tg/echo", node.url))
        .bearer_auth(&node.token)
        .body(body.clone())
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.bytes().unwrap().as_ref(), body.as_slice());
}

/// Reads from `r` until what was read contains `want`, failing after the stream's read timeout.
fn read_until(r: &mut impl Read, seen: &mut Vec<u8>, want: &[u8]) {
    let mut buf = [0u8; 4096];
    while !seen.windows(want.len()).any(|w| w == want) {
        let n = r.read(&mut buf).unwrap_or_else(|e| panic!("waiting for {want:?}: {e}; got {seen:?}"));
        assert!(n > 0, "closed before {want:?}; got {:?}", String::from_utf8_lossy(seen));
        seen.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn bodies_stream_both_ways() {
    let node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &[]);

    // Response: `trickle` sends a chunk, pauses a second, then sends the rest. Streamed, the
    // first chunk arrives while the guest is still paused; buffered, both arrive together.
    let started = Instant::now();
    let mut res = node.get("/fn/default/tg/trickle");
    assert_eq!(res.status(), 200);
    let mut seen = Vec::new();
    read_until(&mut res, &mut seen, b"first\n");
    let first_at = started.elapsed();
    read_until(&mut res, &mut seen, b"rest\n");
    let done_at = started.elapsed();
    assert_eq!(seen, b"first\nrest\n");
    assert!(done_at >= Duration::from_secs(1), "the guest pauses a second: {done_at:?}");
    assert!(
        done_at - first_at >= Duration::from_millis(500),
        "the first chunk came with the rest (at {first_at:?} of {done_at:?}): the body was buffered"
    );

    // Request: `echo` copies the body as it arrives, so the start of the echo comes back while
    // the request body is still open. A node that read the whole body first would never answer
    // and the read below would time out.
    let addr = node.url.trim_start_matches("http://");
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST /fn/default/tg/echo HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n\
         transfer-encoding: chunked\r\n\r\n",
        node.token
    );
    conn.write_all(head.as_bytes()).unwrap();
    conn.write_all(b"6\r\nfirst\n\r\n").unwrap();
    let mut seen = Vec::new();
    read_until(&mut conn, &mut seen, b"first\n");
    assert!(seen.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&seen));
    conn.write_all(b"5\r\nrest\n\r\n0\r\n\r\n").unwrap();
    read_until(&mut conn, &mut seen, b"0\r\n\r\n");
    assert!(String::from_utf8_lossy(&seen).contains("rest\n"), "{:?}", String::from_utf8_lossy(&seen));
}

fn upload(node: &Node, bytes: Vec<u8>) -> reqwest::blocking::Response {
    node.client()
        .post(format!("{}/v1/tenants/default/blobs", node.url))
        .bearer_auth(&node.token)
        .body(bytes)
        .send()
        .unwrap()
}

fn create_version(node: &Node, name: &str, digest: &str) -> reqwest::blocking::Response {
    node.client()
        .post(format!("{}/v1/tenants/default/functions/{name}/versions", node.url))
        .bearer_auth(&node.token)
        .json(&serde_json::json!({ "digest": digest }))
        .send()
        .unwrap()
}

#[test]
fn bad_uploads_are_rejected_with_a_reason() {
    let node = Node::start(&["--upload-max", "1MiB"]);
    let msg = assert_error(upload(&node, b"#!/bin/sh\necho hi\n".to_vec()), 400, "invalid_component");
    assert!(msg.contains("not a WebAssembly binary"), "{msg}");

    // A core module (version 1, layer 0): uploaded, then refused at deploy.
    let core = b"\0asm\x01\0\0\0".to_vec();
    let digest: serde_json::Value = upload(&node, core).json().unwrap();
    let msg = assert_error(
        create_version(&node, "core", digest["digest"].as_str().unwrap()),
        400,
        "invalid_component",
    );
    assert!(msg.contains("core WebAssembly module, not a component"), "{msg}");

    // An empty component exports nothing.
    let empty = b"\0asm\x0d\0\x01\0".to_vec();
    let digest: serde_json::Value = upload(&node, empty).json().unwrap();
    let msg = assert_error(
        create_version(&node, "empty", digest["digest"].as_str().unwrap()),
        400,
        "invalid_component",
    );
    assert!(msg.contains("does not export wasi:http/incoming-handler"), "{msg}");

    // Garbage after a valid header.
    let mut broken = b"\0asm\x0d\0\x01\0".to_vec();
    broken.extend_from_slice(&[0xff; 64]);
    let digest: serde_json::Value = upload(&node, broken).json().unwrap();
    let msg = assert_error(
        create_version(&node, "broken", digest["digest"].as_str().unwrap()),
        400,
        "invalid_component",
    );
    assert!(msg.contains("not a valid WebAssembly component"), "{msg}");

    assert_error(upload(&node, vec![0; 2 * 1024 * 1024]), 413, "payload_too_large");
    assert_error(create_version(&node, "x", "0000"), 404, "not_found");
    let res = node
        .client()
        .post(format!("{}/v1/tenants/default/functions/Bad_Name/versions", node.url))
        .bearer_auth(&node.token)
        .json(&serde_json::json!({ "digest": "0" }))
        .send()
        .unwrap();
    assert_error(res, 400, "bad_request");

    // None of that hurt the node: the CLI reports the reason and a good deploy still works.
    let (ok, _, err) = node.cli(&["deploy", "nope", "/etc/hostname"]);
    assert!(!ok && err.contains("not a WebAssembly binary"), "{err}");
    node.deploy("hello", &guests().hello, &[]);
    assert_eq!(node.get("/fn/default/hello/").status(), 200);
}

#[test]
fn component_with_foreign_imports_is_refused_listing_them() {
    let node = Node::start(&[]);
    let wasm = crate::harness::component_importing(&[
        "fermyon:spin/key-value@2.0.0",
        "wasi:keyvalue/store@0.2.0-draft",
    ]);
    let digest: serde_json::Value = upload(&node, wasm).json().unwrap();
    let msg = assert_error(
        create_version(&node, "spin", digest["digest"].as_str().unwrap()),
        400,
        "invalid_component",
    );
    assert!(msg.contains("fermyon:spin/key-value@2.0.0"), "{msg}");
    assert!(msg.contains("wasi:keyvalue/store@0.2.0-draft"), "{msg}");
}

#[test]
fn a_compile_past_its_limits_is_refused_and_the_node_serves_on() {
    // Compiles run in a child process with a deadline: one that takes longer is killed and the
    // component refused with the reason, and nothing is left that looks like an artifact.
    let node = Node::start(&["--compile-timeout", "1ms"]);
    let (ok, _, err) = node.cli(&["deploy", "hello", guests().hello.to_str().unwrap()]);
    assert!(!ok, "a compile past its timeout was accepted");
    assert!(err.contains("longer than the node allows a compile (1ms"), "{err}");
    let artifacts = std::fs::read_dir(node.dir.path().join("artifacts/default"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect::<Vec<_>>())
        .unwrap_or_default();
    assert!(artifacts.is_empty(), "left behind: {artifacts:?}");
    assert_eq!(node.get("/healthz").status(), 200);

    // A compile's memory is the child's, capped: hello compiles in 256 MiB, the 21 MiB Python
    // example does not, and the node says so and serves on.
    let node = Node::start(&["--compile-memory", "256MiB"]);
    node.deploy("hello", &guests().hello, &[]);
    let (ok, _, err) = node.cli(&["deploy", "py", crate::harness::examples().python.to_str().unwrap()]);
    assert!(!ok, "a compile past its memory limit was accepted");
    assert!(err.contains("needed more memory than the node allows a compile (256 MiB"), "{err}");
    assert!(!err.contains("RUST_BACKTRACE"), "{err}");
    assert_eq!(node.get("/fn/default/hello/").text().unwrap(), "hello from sluice\n");
}
