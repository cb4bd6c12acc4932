//! Deploying components and calling them: the happy path and every bad upload.

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
}

#[test]
fn large_bodies_stream_both_ways() {
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
