//! What a guest may never see: sluice keys (sync and async, public and private functions), and
//! the admin token file's permissions.

use serde_json::Value;

use crate::harness::{Node, guests};

/// Calls `tg/headers` with `authorization` (sync), returning what the guest saw.
fn headers_seen(node: &Node, function: &str, authorization: &str) -> String {
    let res = node
        .client()
        .get(format!("{}/fn/default/{function}/headers", node.url))
        .header("authorization", authorization)
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    res.text().unwrap()
}

/// Queues `tg/headers` with `authorization` and returns the replayed guest's response body: what
/// the guest saw of the stored request.
fn headers_seen_async(node: &Node, function: &str, authorization: &str) -> String {
    let res = node
        .client()
        .post(format!("{}/fn/default/{function}/headers", node.url))
        .header("authorization", authorization)
        .header("prefer", "respond-async")
        .send()
        .unwrap();
    assert_eq!(res.status(), 202);
    let id = res.json::<Value>().unwrap()["id"].as_str().unwrap().to_string();
    node.wait_json(&format!("/v1/invocations/{id}"), |v| v["status"] == "succeeded");
    let res = node.get(&format!("/v1/invocations/{id}/response"));
    assert_eq!(res.status(), 200);
    res.text().unwrap()
}

#[test]
fn a_sluice_key_never_reaches_a_guest_other_credentials_reach_a_public_one() {
    let node = Node::start(&[]);
    node.deploy("pub", &guests().testguest, &["--public"]);
    node.deploy("priv", &guests().testguest, &[]);
    let admin = format!("Bearer {}", node.token);

    let seen = headers_seen(&node, "pub", &admin);
    assert!(!seen.contains("sk_"), "a public function saw the admin key (sync): {seen}");
    let seen = headers_seen_async(&node, "pub", &admin);
    assert!(!seen.contains("sk_"), "a public function saw the admin key (async): {seen}");

    // `sluice invoke` always sends the key it is configured with.
    let (ok, out, err) = node.cli(&["invoke", "pub", "/headers"]);
    assert!(ok, "{err}");
    assert!(!out.contains("sk_"), "sluice invoke leaked its key: {out}");

    let own = "Bearer not-a-sluice-key";
    let seen = headers_seen(&node, "pub", own);
    assert!(seen.contains(&format!("authorization: {own}\n")), "a public function's own auth: {seen}");
    let seen = headers_seen_async(&node, "pub", own);
    assert!(seen.contains(&format!("authorization: {own}\n")), "async: {seen}");

    for seen in [headers_seen(&node, "priv", &admin), headers_seen_async(&node, "priv", &admin)] {
        assert!(!seen.contains("sk_"), "a private function saw the key: {seen}");
        assert!(!seen.contains("authorization"), "{seen}");
    }
}

#[cfg(unix)]
#[test]
fn the_admin_token_file_is_0600_whenever_the_node_starts() {
    use std::os::unix::fs::PermissionsExt;
    let mut node = Node::start(&[]);
    let path = node.dir.path().join("admin.token");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    node.terminate();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    node.spawn();
    assert_eq!(mode(&path), 0o600, "the node left a readable token file");
    let stderr = node.stderr.lock().unwrap().join("\n");
    assert!(stderr.contains("admin.token") && stderr.contains("0600"), "no warning: {stderr}");
}

