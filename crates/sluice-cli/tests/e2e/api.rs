//! The HTTP API as a client program sees it: the OpenAPI document describes what the node really
//! serves, and the invocation routes (list, get, stored response, retry) and their CLI work.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Node, assert_error, guests};

fn doc(node: &Node) -> Value {
    // No key: the document is public.
    let res = node.client().get(format!("{}/v1/openapi.json", node.url)).send().unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/json");
    res.json().unwrap()
}

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "DELETE", "PATCH"];

#[test]
fn the_openapi_document_lists_exactly_the_routes_the_node_serves() {
    let node = Node::start(&[]);
    let doc = doc(&node);
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.contains_key("/fn/{tenant}/{function}/{path}"), "the call path is documented");
    assert!(paths.len() >= 12, "{:?}", paths.keys());
    for (template, item) in paths {
        let path = template.replace("{path}", "sub").replace(['{', '}'], "");
        for method in METHODS {
            let documented = item.get(method.to_lowercase()).is_some();
            let res = node
                .client()
                .request(
                    reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                    format!("{}{path}", node.url),
                )
                .send()
                .unwrap();
            let status = res.status().as_u16();
            if template == "/v1/openapi.json" && documented {
                assert_eq!(status, 200);
            } else if documented {
                // Routed, and refused for want of a key before anything else happens.
                assert_error(res, 401, "unauthorized");
            } else if template.starts_with("/v1/") {
                assert_error(res, 405, "method_not_allowed");
            } else {
                panic!("{method} {template}: /fn takes every method, the document lists {:?}", item);
            }
        }
    }
    // A path the document does not know is no route at all.
    assert_error(node.get("/v1/nothing-here"), 404, "not_found");
}

fn wait_status(node: &Node, id: &str, status: &str) -> Value {
    node.wait_json(&format!("/v1/invocations/{id}"), |v| v["status"] == status)
}

/// Deploys the test guest through the API with one attempt per async call, so failures die at
/// once.
fn deploy_one_attempt(node: &Node, name: &str) {
    let wasm = std::fs::read(&guests().testguest).unwrap();
    let c = node.client();
    let blob: Value = c
        .post(format!("{}/v1/tenants/default/blobs", node.url))
        .bearer_auth(&node.token)
        .body(wasm)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let res = c
        .post(format!("{}/v1/tenants/default/functions/{name}/versions", node.url))
        .bearer_auth(&node.token)
        .json(&json!({ "digest": blob["digest"], "config": { "attempts_max": 1 } }))
        .send()
        .unwrap();
    assert_eq!(res.status(), 201);
}

#[test]
fn a_stored_response_is_returned_as_it_was_produced() {
    let node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &[]);
    let id = node.enqueue("/fn/default/tg/status?code=418", &[]);
    wait_status(&node, &id, "succeeded");

    let res = node.get(&format!("/v1/invocations/{id}/response"));
    assert_eq!(res.status(), 418, "the stored status, not 200");
    assert_eq!(res.headers()["sluice-invocation-id"], id.as_str());
    assert!(res.headers().get("sluice-error").is_none(), "a stored response is not sluice's error");
    assert_eq!(res.text().unwrap(), "status 418");

    let (ok, out, err) = node.cli(&["invocations", "response", &id, "-i"]);
    assert!(ok, "{err}");
    assert_eq!(out, "status 418");
    assert!(err.contains("HTTP 418") && err.contains(&format!("sluice-invocation-id: {id}")), "{err}");

    // Not run yet: no response, said as sluice's own 404.
    let later = sluice_core::rfc3339(sluice_core::Clock::now_ms(&sluice_core::SystemClock) + 3_600_000);
    let queued = node.enqueue("/fn/default/tg/ok", &[("sluice-start-after", &later)]);
    let msg = assert_error(node.get(&format!("/v1/invocations/{queued}/response")), 404, "not_found");
    assert!(msg.contains("no stored response yet") && msg.contains("queued"), "{msg}");
    let (ok, _, err) = node.cli(&["invocations", "response", &queued]);
    assert!(!ok && err.contains("no stored response yet"), "{err}");
    assert_error(node.get(&format!("/v1/invocations/{}/response", "0".repeat(32))), 404, "not_found");
}

#[test]
fn invocations_are_listed_newest_first_in_pages_and_filtered() {
    let node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &[]);
    node.deploy("other", &guests().testguest, &[]);
    let ids: Vec<String> = (0..3).map(|_| node.enqueue("/fn/default/tg/ok", &[])).collect();
    let other = node.enqueue("/fn/default/other/ok", &[]);
    for id in ids.iter().chain([&other]) {
        wait_status(&node, id, "succeeded");
    }

    let page: Value = node.get("/v1/invocations?function=tg&limit=2").json().unwrap();
    let first: Vec<&str> =
        page["invocations"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(first, [ids[2].as_str(), ids[1].as_str()], "newest first");
    let before = page["next_before"].as_str().expect("a full page has a cursor");
    let page: Value =
        node.get(&format!("/v1/invocations?function=tg&limit=2&before={before}")).json().unwrap();
    let rest: Vec<&str> =
        page["invocations"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(rest, [ids[0].as_str()]);
    assert_eq!(page["next_before"], Value::Null, "the last page has no cursor");

    let all: Value = node.get("/v1/invocations").json().unwrap();
    assert_eq!(all["invocations"].as_array().unwrap().len(), 4, "{all}");
    let dead: Value = node.get("/v1/invocations?status=dead").json().unwrap();
    assert_eq!(dead["invocations"], json!([]));
    let msg = assert_error(node.get("/v1/invocations?status=finished"), 400, "bad_request");
    assert!(msg.contains("\"finished\"") && msg.contains("succeeded"), "{msg}");
    assert_error(node.get("/v1/invocations?limit=-1"), 400, "bad_request");
    assert_error(node.get("/v1/invocations?tenant=nosuch"), 404, "not_found");

    let (ok, out, err) = node.cli(&["invocations", "list", "--function", "tg", "--limit", "2"]);
    assert!(ok, "{err}");
    assert!(out.contains(&ids[2]) && out.contains(&ids[1]) && !out.contains(&ids[0]), "{out}");
    assert!(err.contains(&format!("more: --before {}", ids[1])), "{err}");
    let (ok, out, _) = node.cli(&["invocations", "list", "--status", "succeeded"]);
    assert!(ok && out.contains(&other) && out.contains("succeeded"), "{out}");
    let (ok, _, err) = node.cli(&["invocations", "list", "--status", "finished"]);
    // The CLI knows the states itself: it refuses, listing them, without asking the node.
    assert!(!ok && err.contains("'finished'") && err.contains("succeeded, failed, dead, expired"), "{err}");

    let (ok, out, err) = node.cli(&["invocations", "get", &other]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["id"].as_str(), v["function"].as_str(), v["status"].as_str()),
        (Some(&other[..]), Some("other"), Some("succeeded"))
    );
}

#[test]
fn a_dead_invocation_can_be_retried_and_nothing_else_can() {
    let node = Node::start(&[]);
    deploy_one_attempt(&node, "tg");
    let id = node.enqueue("/fn/default/tg/panic", &[]);
    let dead = wait_status(&node, &id, "dead");
    assert_eq!(dead["attempts"], 1);

    let res = node
        .client()
        .post(format!("{}/v1/invocations/{id}/retry", node.url))
        .bearer_auth(&node.token)
        .send()
        .unwrap();
    assert_eq!(res.status(), 202);
    assert_eq!(res.headers()["location"], format!("/v1/invocations/{id}").as_str());
    let v: Value = res.json().unwrap();
    assert_eq!(v["id"], id.as_str());
    assert!(["queued", "running", "dead"].contains(&v["status"].as_str().unwrap()), "{v}");
    // It runs again (and dies again, with its attempts counted afresh).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: Value = node.get(&format!("/v1/invocations/{id}")).json().unwrap();
        if v["status"] == "dead" && v["finished_at"] != dead["finished_at"] {
            assert_eq!(v["attempts"], 1, "attempts were reset: {v}");
            break;
        }
        assert!(Instant::now() < deadline, "the retried invocation did not run again: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, out, err) = node.cli(&["invocations", "retry", &id]);
    assert!(ok, "{err}");
    assert!(out.starts_with(&format!("queued {id} again")), "{out}");
    wait_status(&node, &id, "dead");

    // A succeeded invocation, a sync one and an unknown one cannot be retried.
    let ok_id = node.enqueue("/fn/default/tg/ok", &[]);
    wait_status(&node, &ok_id, "succeeded");
    let retry = |id: &str| {
        node.client()
            .post(format!("{}/v1/invocations/{id}/retry", node.url))
            .bearer_auth(&node.token)
            .send()
            .unwrap()
    };
    let msg = assert_error(retry(&ok_id), 409, "conflict");
    assert!(msg.contains("succeeded") && msg.contains("dead or expired"), "{msg}");
    let res = node.get("/fn/default/tg/stdout");
    let sync_id = res.headers()["sluice-invocation-id"].to_str().unwrap().to_string();
    node.wait_json(&format!("/v1/invocations/{sync_id}"), |_| true);
    let msg = assert_error(retry(&sync_id), 409, "conflict");
    assert!(msg.contains("synchronous"), "{msg}");
    assert_error(retry(&"0".repeat(32)), 404, "not_found");
    let (ok, _, err) = node.cli(&["invocations", "retry", &ok_id]);
    assert!(!ok && err.contains("409"), "{err}");
}
