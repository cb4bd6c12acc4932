//! What a guest may never see and the API never returns: sluice keys (sync and async, public and
//! private functions), the admin token file's permissions, and secret values.

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

#[test]
fn secrets_reach_the_guest_and_only_their_names_leave_the_node() {
    let mut node = Node::start(&[]);
    let file = node.dir.path().join("secrets.env");
    std::fs::write(&file, "# database\nDB_PASSWORD=pa55=word\n\n").unwrap();
    let out = node.deploy(
        "tg",
        &guests().testguest,
        &["--env", "PLAIN=1", "--secret", "API_TOKEN=s3cr3t-value", "--secret-file", file.to_str().unwrap()],
    );
    let values = ["s3cr3t-value", "pa55=word"];
    let assert_no_value = |what: &str, text: &str| {
        for v in values {
            assert!(!text.contains(v), "{what} shows a secret value: {text}");
        }
    };
    assert!(out.contains("secrets: API_TOKEN, DB_PASSWORD"), "{out}");
    assert_no_value("deploy output", &out);

    let env = node.get("/fn/default/tg/env").text().unwrap();
    assert!(env.contains("PLAIN=1\n"), "{env}");
    assert!(env.contains("API_TOKEN=s3cr3t-value\n") && env.contains("DB_PASSWORD=pa55=word\n"), "{env}");

    let version: Value = node.get("/v1/tenants/default/functions/tg").json().unwrap();
    assert_eq!(version["secrets"], serde_json::json!(["API_TOKEN", "DB_PASSWORD"]));
    assert_no_value("the version JSON", &version.to_string());

    // A read key sees names and never a value, wherever it looks.
    let (ok, read_key, err) = node.cli(&["keys", "create", "--tenant", "default", "--scope", "read"]);
    assert!(ok, "{err}");
    let read_key = read_key.trim();
    for path in [
        "/v1/tenants/default/functions",
        "/v1/tenants/default/functions/tg",
        "/v1/tenants/default/functions/tg/logs",
        "/v1/invocations?tenant=default",
        "/v1/openapi.json",
    ] {
        let res = node.client().get(format!("{}{path}", node.url)).bearer_auth(read_key).send().unwrap();
        assert_eq!(res.status(), 200, "{path}");
        assert_no_value(path, &res.text().unwrap());
    }
    let (ok, out, err) = node.cli_as(read_key, &["functions", "list"]);
    assert!(ok, "{err}");
    assert_no_value("functions list", &out);

    // A name in both --env and --secret is refused, naming it and not its value.
    let (ok, out, err) = node.cli(&[
        "deploy",
        "tg",
        guests().testguest.to_str().unwrap(),
        "--env",
        "X=1",
        "--secret",
        "X=s3cr3t-value",
    ]);
    assert!(!ok && err.contains("X is both an environment variable and a secret"), "{out}{err}");
    assert_no_value("the refusal", &err);

    // The values are stored: after a restart the guest still sees them, sync and async.
    node.terminate();
    node.spawn();
    let env = node.get("/fn/default/tg/env").text().unwrap();
    assert!(env.contains("API_TOKEN=s3cr3t-value\n"), "{env}");
    let res = node
        .client()
        .post(format!("{}/fn/default/tg/env", node.url))
        .bearer_auth(&node.token)
        .header("prefer", "respond-async")
        .send()
        .unwrap();
    let id = res.json::<Value>().unwrap()["id"].as_str().unwrap().to_string();
    node.wait_json(&format!("/v1/invocations/{id}"), |v| v["status"] == "succeeded");
    let env = node.get(&format!("/v1/invocations/{id}/response")).text().unwrap();
    assert!(env.contains("DB_PASSWORD=pa55=word\n"), "{env}");
    assert_no_value("the node's log", &node.stderr.lock().unwrap().join("\n"));
}
