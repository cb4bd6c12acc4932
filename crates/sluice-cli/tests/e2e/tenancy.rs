//! Multi-tenancy: tenants and keys, what each scope allows, and object-level authorization —
//! another tenant's objects answer 404 exactly like missing ones, and trying leaves them as they
//! were.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use reqwest::blocking::Response;
use serde_json::{Value, json};

use crate::harness::{Node, assert_error, guests};

/// A caller of the node: one API key.
struct Caller<'a> {
    node: &'a Node,
    key: String,
}

impl<'a> Caller<'a> {
    fn admin(node: &'a Node) -> Self {
        Self { node, key: node.token.clone() }
    }

    fn send(&self, method: &str, path: &str, body: Option<Body>) -> Response {
        send(self.node, Some(&self.key), method, path, body, &[])
    }

    fn get(&self, path: &str) -> Response {
        self.send("GET", path, None)
    }

    fn json(&self, method: &str, path: &str, body: Option<Body>) -> Value {
        let res = self.send(method, path, body);
        let status = res.status();
        let text = res.text().unwrap();
        assert!(status.is_success(), "{method} {path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Runs the CLI with this key.
    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        self.node.cli_as(&self.key, args)
    }
}

#[derive(Clone)]
enum Body {
    Json(Value),
    Bytes(Vec<u8>),
}

fn send(
    node: &Node,
    key: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Body>,
    headers: &[(&str, &str)],
) -> Response {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = node.client().request(method, format!("{}{path}", node.url));
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req = match body {
        Some(Body::Json(v)) => req.json(&v),
        Some(Body::Bytes(b)) => req.body(b),
        None => req,
    };
    req.send().unwrap()
}

fn create_tenant(node: &Node, name: &str) {
    Caller::admin(node).json("POST", "/v1/tenants", Some(Body::Json(json!({ "name": name }))));
}

/// Mints a key as admin; returns (id, key).
fn mint(node: &Node, tenant: &str, scopes: &[&str]) -> (String, String) {
    let v = Caller::admin(node).json(
        "POST",
        &format!("/v1/tenants/{tenant}/keys"),
        Some(Body::Json(json!({ "scopes": scopes }))),
    );
    (v["id"].as_str().unwrap().to_string(), v["key"].as_str().unwrap().to_string())
}

/// Polls `path` as `caller` until it answers 200 (sync records are written in batches).
fn wait_ok(caller: &Caller, path: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let res = caller.get(path);
        if res.status() == 200 {
            return res.json().unwrap();
        }
        assert!(Instant::now() < deadline, "timed out waiting on {path}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

const ALL: [&str; 3] = ["deploy", "invoke", "read"];

/// Two tenants, `alpha` and `bravo`, each with a full key (deploy, invoke, read), a `hello`
/// function deployed with that key, and a recorded invocation of `tg` (a function that logs).
struct World {
    node: Node,
    a_key: String,
    a_key_id: String,
    a_invocation: String,
    b_key: String,
    b_key_id: String,
    b_invocation: String,
}

fn world() -> World {
    let node = Node::start(&[]);
    create_tenant(&node, "alpha");
    create_tenant(&node, "bravo");
    let (a_key_id, a_key) = mint(&node, "alpha", &ALL);
    let (b_key_id, b_key) = mint(&node, "bravo", &ALL);
    let mut invocations = Vec::new();
    for (tenant, key) in [("alpha", &a_key), ("bravo", &b_key)] {
        let caller = Caller { node: &node, key: key.clone() };
        for (name, wasm) in [("hello", &guests().hello), ("tg", &guests().testguest)] {
            let (ok, out, err) = caller.cli(&["deploy", name, wasm.to_str().unwrap(), "--tenant", tenant]);
            assert!(ok, "deploy {tenant}/{name} with the tenant's own key: {out}{err}");
        }
        // A schedule far in the future: an object of the tenant's that never fires in the test.
        let (ok, out, err) = caller.cli(&[
            "schedules",
            "create",
            "sched",
            "--function",
            "hello",
            "--every",
            "1d",
            "--tenant",
            tenant,
        ]);
        assert!(ok, "schedule {tenant}/sched with the tenant's own key: {out}{err}");
        // A trigger whose broker is not there (port 9): an object of the tenant's that only fails.
        let (ok, out, err) = caller.cli(&[
            "triggers",
            "create",
            "trig",
            "--function",
            "hello",
            "--amqp",
            "amqp://127.0.0.1:9",
            "--queue",
            "q",
            "--tenant",
            tenant,
        ]);
        assert!(ok, "trigger {tenant}/trig with the tenant's own key: {out}{err}");
        let res = caller.get(&format!("/fn/{tenant}/tg/stdout"));
        assert_eq!(res.status(), 200);
        let id = res.headers()["sluice-invocation-id"].to_str().unwrap().to_string();
        wait_ok(&caller, &format!("/v1/invocations/{id}"));
        invocations.push(id);
    }
    let b_invocation = invocations.pop().unwrap();
    let a_invocation = invocations.pop().unwrap();
    World { node, a_key, a_key_id, a_invocation, b_key, b_key_id, b_invocation }
}

/// What a request may do to a tenant's objects, per route of the OpenAPI document.
struct Route {
    method: &'static str,
    /// The path as the OpenAPI document writes it.
    template: &'static str,
    body: Option<Body>,
}

fn route(method: &'static str, template: &'static str, body: Option<Body>) -> Route {
    Route { method, template, body }
}

/// Names that point at bravo's objects, and names of objects that do not exist at all.
struct Names {
    tenant: String,
    function: String,
    invocation: String,
    key: String,
    schedule: String,
    trigger: String,
}

impl Names {
    fn fill(&self, template: &str) -> String {
        let id = if template.starts_with("/v1/keys/") { &self.key } else { &self.invocation };
        let path = template
            .replace("{tenant}", &self.tenant)
            .replace("{function}", &self.function)
            .replace("{id}", id)
            .replace("{version}", "1")
            .replace("{alias}", "latest")
            .replace("{schedule}", &self.schedule)
            .replace("{trigger}", &self.trigger)
            .replace("{path}", "sub/path");
        // The list route names its tenant in the query.
        if template == "/v1/invocations" { format!("{path}?tenant={}", self.tenant) } else { path }
    }

    /// A message with these names replaced by placeholders, to compare two answers.
    fn neutral(&self, message: &str) -> String {
        message
            .replace(&self.invocation, "{id}")
            .replace(&self.key, "{id}")
            .replace(&self.tenant, "{tenant}")
            .replace(&self.function, "{function}")
            .replace(&self.schedule, "{schedule}")
            .replace(&self.trigger, "{trigger}")
    }
}

/// The routes of the document as (METHOD, path) pairs.
fn documented_routes(node: &Node) -> BTreeSet<(String, String)> {
    let doc: Value =
        node.client().get(format!("{}/v1/openapi.json", node.url)).send().unwrap().json().unwrap();
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "put", "post", "delete", "patch", "head", "options"].contains(&method.as_str()) {
                routes.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    routes
}

#[test]
fn another_tenants_objects_answer_404_like_missing_ones_on_every_route_with_no_side_effect() {
    let w = world();
    let node = &w.node;
    let admin = Caller::admin(node);
    let a = Caller { node, key: w.a_key.clone() };
    let b = Caller { node, key: w.b_key.clone() };

    // A blob alpha may deploy, so a refused deploy into bravo is refused for the tenant alone.
    let hello = std::fs::read(&guests().hello).unwrap();
    let blob = a.json("POST", "/v1/tenants/alpha/blobs", Some(Body::Bytes(hello.clone())));
    let digest = blob["digest"].as_str().unwrap().to_string();

    let b_keys_before = admin.json("GET", "/v1/tenants/bravo/keys", None);
    let b_invocations_before = b.json("GET", "/v1/invocations?tenant=bravo&limit=1000", None);
    let b_logs_before = b.json("GET", "/v1/tenants/bravo/functions/tg/logs", None);

    let fn_methods = ["GET", "POST", "PUT", "DELETE", "PATCH"];
    let mut object_routes = vec![
        route("POST", "/v1/tenants/{tenant}/keys", Some(Body::Json(json!({ "scopes": ["read"] })))),
        route("GET", "/v1/tenants/{tenant}/keys", None),
        route("DELETE", "/v1/keys/{id}", None),
        route("PUT", "/v1/tenants/{tenant}/limits", Some(Body::Json(json!({ "rate_per_sec": 1.0 })))),
        route("GET", "/v1/tenants/{tenant}/limits", None),
        route("GET", "/v1/tenants/{tenant}/usage", None),
        route("PUT", "/v1/tenants/{tenant}/quota", Some(Body::Json(json!({ "reserved": 1 })))),
        route("GET", "/v1/tenants/{tenant}/quota", None),
        route("GET", "/v1/tenants/{tenant}/functions/{function}/downstreams", None),
        route("POST", "/v1/tenants/{tenant}/blobs", Some(Body::Bytes(hello.clone()))),
        route("GET", "/v1/tenants/{tenant}/functions", None),
        route("GET", "/v1/tenants/{tenant}/functions/{function}", None),
        route("DELETE", "/v1/tenants/{tenant}/functions/{function}", None),
        route(
            "POST",
            "/v1/tenants/{tenant}/functions/{function}/versions",
            Some(Body::Json(json!({ "digest": digest }))),
        ),
        route("GET", "/v1/tenants/{tenant}/functions/{function}/logs", None),
        route("GET", "/v1/tenants/{tenant}/functions/{function}/versions", None),
        route("GET", "/v1/tenants/{tenant}/functions/{function}/versions/{version}", None),
        route("GET", "/v1/tenants/{tenant}/functions/{function}/aliases", None),
        route(
            "PUT",
            "/v1/tenants/{tenant}/functions/{function}/aliases/{alias}",
            Some(Body::Json(json!({ "routes": [{ "version": 1, "weight": 1 }] }))),
        ),
        route("DELETE", "/v1/tenants/{tenant}/functions/{function}/aliases/{alias}", None),
        route(
            "PUT",
            "/v1/tenants/{tenant}/functions/{function}/aliases/{alias}/rollout",
            Some(Body::Json(json!({ "to": 1 }))),
        ),
        route("GET", "/v1/tenants/{tenant}/functions/{function}/aliases/{alias}/rollout", None),
        route("DELETE", "/v1/tenants/{tenant}/functions/{function}/aliases/{alias}/rollout", None),
        route(
            "POST",
            "/v1/tenants/{tenant}/schedules",
            Some(Body::Json(json!({ "name": "new", "function": "hello", "every_ms": 60000 }))),
        ),
        route("GET", "/v1/tenants/{tenant}/schedules", None),
        route("GET", "/v1/tenants/{tenant}/schedules/{schedule}", None),
        route("DELETE", "/v1/tenants/{tenant}/schedules/{schedule}", None),
        route("POST", "/v1/tenants/{tenant}/schedules/{schedule}/pause", None),
        route("POST", "/v1/tenants/{tenant}/schedules/{schedule}/resume", None),
        route(
            "POST",
            "/v1/tenants/{tenant}/schedules/{schedule}/backfill",
            Some(Body::Json(json!({ "from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z" }))),
        ),
        route(
            "POST",
            "/v1/tenants/{tenant}/triggers",
            Some(Body::Json(
                json!({ "name": "new", "function": "hello", "kind": "mqtt", "url": "mqtt://127.0.0.1:9", "topic": "t" }),
            )),
        ),
        route("GET", "/v1/tenants/{tenant}/triggers", None),
        route("GET", "/v1/tenants/{tenant}/triggers/{trigger}", None),
        route("DELETE", "/v1/tenants/{tenant}/triggers/{trigger}", None),
        route("POST", "/v1/tenants/{tenant}/triggers/{trigger}/pause", None),
        route("POST", "/v1/tenants/{tenant}/triggers/{trigger}/resume", None),
        route("GET", "/v1/invocations", None),
        route("GET", "/v1/invocations/{id}", None),
        route("GET", "/v1/invocations/{id}/response", None),
        route("GET", "/v1/invocations/{id}/logs", None),
        route("POST", "/v1/invocations/{id}/retry", None),
    ];
    for m in fn_methods {
        object_routes.push(route(m, "/fn/{tenant}/{function}/{path}", Some(Body::Bytes(b"ping".to_vec()))));
    }
    // Routes about no tenant's objects: checked below, but listed so the coverage check is exact.
    let other_routes = [
        ("GET", "/v1/tenants"),
        ("POST", "/v1/tenants"),
        ("GET", "/v1/openapi.json"),
        ("GET", "/v1/node"),
        ("GET", "/v1/nodes"),
    ];

    // Every route of the API is in this test: a new route must be added here.
    let covered: BTreeSet<(String, String)> = object_routes
        .iter()
        .map(|r| (r.method.to_string(), r.template.to_string()))
        .chain(other_routes.iter().map(|(m, p)| (m.to_string(), p.to_string())))
        .collect();
    assert_eq!(covered, documented_routes(node), "the matrix and the OpenAPI document list different routes");

    let bravo = Names {
        tenant: "bravo".into(),
        function: "hello".into(),
        invocation: w.b_invocation.clone(),
        key: w.b_key_id.clone(),
        schedule: "sched".into(),
        trigger: "trig".into(),
    };
    let missing = Names {
        tenant: "nosuch".into(),
        function: "nofn".into(),
        invocation: "0".repeat(32),
        key: "key_0000000000000000".into(),
        schedule: "nosched".into(),
        trigger: "notrig".into(),
    };
    for r in &object_routes {
        let mut answers = Vec::new();
        for names in [&bravo, &missing] {
            let path = names.fill(r.template);
            let res = a.send(r.method, &path, r.body.clone());
            let what = format!("alpha's key: {} {path}", r.method);
            assert_eq!(res.status().as_u16(), 404, "{what}");
            let message = assert_error(res, 404, "not_found");
            answers.push(names.neutral(&message));
        }
        assert_eq!(
            answers[0], answers[1],
            "{} {}: bravo's object differs from a missing one",
            r.method, r.template
        );
    }
    // The async form of a call is refused the same way, before anything is queued.
    let res = send(node, Some(&w.a_key), "POST", "/fn/bravo/hello/", None, &[("prefer", "respond-async")]);
    assert_error(res, 404, "not_found");

    // The routes without a tenant in the path: alpha sees only itself and may not create.
    let tenants = a.json("GET", "/v1/tenants", None);
    let names: Vec<&str> =
        tenants["tenants"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["alpha"]);
    let res = a.send("POST", "/v1/tenants", Some(Body::Json(json!({ "name": "charlie" }))));
    assert_error(res, 403, "forbidden");
    assert_error(a.send("GET", "/v1/node", None), 403, "forbidden");
    assert_error(a.send("GET", "/v1/nodes", None), 403, "forbidden");
    assert_eq!(node.client().get(format!("{}/v1/openapi.json", node.url)).send().unwrap().status(), 200);

    // No side effect: bravo's function, key, invocations and logs are as they were.
    let f = b.json("GET", "/v1/tenants/bravo/functions/hello", None);
    assert_eq!(f["version"], 1, "no version was added to bravo/hello: {f}");
    let res = b.get("/fn/bravo/hello/");
    assert_eq!(res.status(), 200, "bravo's key still works and its function still runs");
    assert_eq!(res.text().unwrap(), "hello from sluice\n");
    assert_eq!(admin.json("GET", "/v1/tenants/bravo/keys", None), b_keys_before, "bravo's keys unchanged");
    let b_invocations_after = b.json("GET", "/v1/invocations?tenant=bravo&limit=1000", None);
    assert_eq!(b_invocations_after, b_invocations_before, "nothing was queued or run for bravo");
    assert_eq!(b.json("GET", "/v1/tenants/bravo/functions/tg/logs", None), b_logs_before);
    let schedules = b.json("GET", "/v1/tenants/bravo/schedules", None);
    let names: Vec<&str> =
        schedules["schedules"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["sched"], "bravo's schedules unchanged: {schedules}");
    assert_eq!(schedules["schedules"][0]["paused"], false, "{schedules}");
    let triggers = b.json("GET", "/v1/tenants/bravo/triggers", None);
    let names: Vec<&str> =
        triggers["triggers"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["trig"], "bravo's triggers unchanged: {triggers}");
    assert_eq!(triggers["triggers"][0]["paused"], false, "{triggers}");
    let tenants = admin.json("GET", "/v1/tenants", None);
    assert!(!tenants.to_string().contains("charlie"), "{tenants}");
}

#[test]
fn each_scope_allows_only_its_own_actions() {
    let w = world();
    let node = &w.node;
    let (_, read_key) = mint(node, "alpha", &["read"]);
    let (_, invoke_key) = mint(node, "alpha", &["invoke"]);
    let read = Caller { node, key: read_key };
    let invoke = Caller { node, key: invoke_key };
    let full = Caller { node, key: w.a_key.clone() };
    let wasm = std::fs::read(&guests().hello).unwrap();

    // Read-only: reading works, deploying and invoking are forbidden (the objects are visible).
    assert_eq!(read.get("/v1/tenants/alpha/functions").status(), 200);
    assert_eq!(read.get("/v1/tenants/alpha/keys").status(), 200);
    assert_eq!(read.get(&format!("/v1/invocations/{}", w.a_invocation)).status(), 200);
    assert_eq!(read.get("/v1/invocations").status(), 200, "the list defaults to the key's tenant");
    assert_eq!(read.get("/v1/tenants/alpha/schedules/sched").status(), 200);
    for (method, path, body) in [
        ("POST", "/v1/tenants/alpha/blobs", Some(Body::Bytes(wasm.clone()))),
        ("POST", "/v1/tenants/alpha/functions/hello/versions", Some(Body::Json(json!({ "digest": "00" })))),
        ("DELETE", "/v1/tenants/alpha/functions/hello", None),
        ("GET", "/fn/alpha/hello/", None),
        ("POST", &format!("/v1/invocations/{}/retry", w.a_invocation), None),
        // Managing schedules takes `deploy`; reading them `read`.
        ("POST", "/v1/tenants/alpha/schedules/sched/pause", None),
        ("DELETE", "/v1/tenants/alpha/schedules/sched", None),
    ] {
        let msg = assert_error(read.send(method, path, body), 403, "forbidden");
        assert!(!msg.is_empty(), "{method} {path}");
    }
    let (ok, _, err) = read.cli(&["deploy", "again", guests().hello.to_str().unwrap(), "--tenant", "alpha"]);
    assert!(!ok && err.contains("deploy scope"), "{err}");
    let (ok, _, err) = read.cli(&["invoke", "hello", "--tenant", "alpha"]);
    assert!(!ok && err.contains("may not invoke"), "{err}");

    // Invoke-only: calls work, reading does not.
    assert_eq!(invoke.get("/fn/alpha/hello/").status(), 200);
    assert_error(invoke.get("/v1/tenants/alpha/functions"), 403, "forbidden");

    // A tenant key, even with every tenant scope, cannot manage tenants or keys.
    let res = full.send("POST", "/v1/tenants/alpha/keys", Some(Body::Json(json!({ "scopes": ["read"] }))));
    assert_error(res, 403, "forbidden");
    assert_error(full.send("DELETE", &format!("/v1/keys/{}", w.a_key_id), None), 403, "forbidden");
    let res = full.send("POST", "/v1/tenants", Some(Body::Json(json!({ "name": "delta" }))));
    assert_error(res, 403, "forbidden");
    assert_eq!(full.get("/fn/alpha/hello/").status(), 200, "the refused attempts changed nothing");
}

#[test]
fn a_revoked_key_is_refused_at_once() {
    let w = world();
    let node = &w.node;
    let admin = Caller::admin(node);
    let (id, key) = mint(node, "alpha", &ALL);
    let k = Caller { node, key };
    assert_eq!(k.get("/v1/tenants/alpha/functions").status(), 200);
    assert_eq!(k.get("/fn/alpha/hello/").status(), 200);

    let (ok, out, err) = admin.cli(&["keys", "revoke", &id]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), format!("revoked {id}"));
    // No wait: the node's key cache was reloaded with the revocation.
    assert_error(k.get("/v1/tenants/alpha/functions"), 401, "unauthorized");
    assert_error(k.get("/fn/alpha/hello/"), 401, "unauthorized");
    let (ok, _, err) = k.cli(&["functions", "list", "--tenant", "alpha"]);
    assert!(!ok && err.contains("invalid or revoked API key"), "{err}");

    let keys = admin.json("GET", "/v1/tenants/alpha/keys", None);
    let listed = keys["keys"].as_array().unwrap().iter().find(|k| k["id"] == id.as_str()).unwrap();
    assert_eq!(listed["revoked"], true);
    // Revoking again is harmless; the other keys of the tenant are untouched.
    assert_eq!(admin.send("DELETE", &format!("/v1/keys/{id}"), None).status(), 204);
    assert_eq!(Caller { node, key: w.a_key.clone() }.get("/fn/alpha/hello/").status(), 200);
    assert_error(admin.send("DELETE", "/v1/keys/key_0000000000000000", None), 404, "not_found");
}

#[test]
fn an_admin_key_sees_every_tenant() {
    let w = world();
    let node = &w.node;
    let admin = Caller::admin(node);
    let tenants = admin.json("GET", "/v1/tenants", None);
    let names: BTreeSet<&str> =
        tenants["tenants"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, BTreeSet::from(["alpha", "bravo", "default"]));
    for (tenant, invocation) in [("alpha", &w.a_invocation), ("bravo", &w.b_invocation)] {
        let fns = admin.json("GET", &format!("/v1/tenants/{tenant}/functions"), None);
        assert_eq!(fns["functions"].as_array().unwrap().len(), 2, "{fns}");
        assert_eq!(admin.get(&format!("/fn/{tenant}/hello/")).status(), 200);
        assert_eq!(admin.get(&format!("/v1/invocations/{invocation}")).status(), 200);
        let page = admin.json("GET", &format!("/v1/invocations?tenant={tenant}"), None);
        assert!(page.to_string().contains(invocation.as_str()), "{page}");
    }
    // Without a tenant, an admin lists the default tenant's invocations (none here).
    let page = admin.json("GET", "/v1/invocations", None);
    assert_eq!(page["invocations"], json!([]));
}

#[test]
fn tenants_and_keys_are_validated_and_keys_are_shown_once() {
    let node = Node::start(&[]);
    let admin = Caller::admin(&node);
    let res = admin.send("POST", "/v1/tenants", Some(Body::Json(json!({ "name": "acme" }))));
    assert_eq!(res.status(), 201);
    let t: Value = res.json().unwrap();
    assert_eq!(t["name"], "acme");
    let res = admin.send("POST", "/v1/tenants", Some(Body::Json(json!({ "name": "acme" }))));
    assert_error(res, 409, "conflict");
    for bad in [json!({ "name": "Acme" }), json!({ "name": "-x" }), json!({}), json!({ "name": "a", "x": 1 })]
    {
        let res = admin.send("POST", "/v1/tenants", Some(Body::Json(bad.clone())));
        assert_error(res, 400, "bad_request");
    }

    for bad in [json!({ "scopes": [] }), json!({ "scopes": ["admin"] }), json!({ "scopes": ["write"] })] {
        let res = admin.send("POST", "/v1/tenants/acme/keys", Some(Body::Json(bad.clone())));
        let msg = assert_error(res, 400, "bad_request");
        assert!(msg.contains("scope"), "{bad}: {msg}");
    }
    assert_error(
        admin.send("POST", "/v1/tenants/nosuch/keys", Some(Body::Json(json!({ "scopes": ["read"] })))),
        404,
        "not_found",
    );

    let res =
        admin.send("POST", "/v1/tenants/acme/keys", Some(Body::Json(json!({ "scopes": ["read", "read"] }))));
    assert_eq!(res.status(), 201);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let created: Value = res.json().unwrap();
    let key = created["key"].as_str().unwrap();
    assert!(key.starts_with("sk_") && key.len() == 67, "{key}");
    assert_eq!(created["scopes"], json!(["read"]), "duplicates are ignored");
    assert_eq!(created["tenant"], "acme");
    let listed = admin.json("GET", "/v1/tenants/acme/keys", None);
    let text = listed.to_string();
    assert!(text.contains(created["id"].as_str().unwrap()), "{text}");
    assert!(!text.contains(key) && !text.contains("hash") && !text.contains("\"key\""), "{text}");
    // The admin key is no tenant's: it is not listed under one.
    assert_eq!(listed["keys"].as_array().unwrap().len(), 1, "{text}");
}

#[test]
fn tenants_and_keys_from_the_cli() {
    let node = Node::start(&[]);
    let admin = Caller::admin(&node);
    let (ok, out, err) = admin.cli(&["tenants", "create", "acme"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "created tenant acme");
    let (ok, _, err) = admin.cli(&["tenants", "create", "acme"]);
    assert!(!ok && err.contains("conflict") && err.contains("409"), "{err}");
    let (ok, out, _) = admin.cli(&["tenants", "list"]);
    assert!(ok && out.contains("acme") && out.contains("default"), "{out}");

    let (ok, out, err) =
        admin.cli(&["keys", "create", "--tenant", "acme", "--scope", "deploy", "--scope", "invoke"]);
    assert!(ok, "{err}");
    let key = out.trim().to_string();
    assert!(key.starts_with("sk_") && !key.contains(' '), "stdout is the key alone: {out}");
    assert!(
        err.contains("for tenant acme with scopes deploy,invoke") && err.contains("only this once"),
        "{err}"
    );
    let id = err.split_whitespace().nth(2).unwrap().to_string();
    assert!(id.starts_with("key_"), "{err}");
    let (ok, _, err) = admin.cli(&["keys", "create", "--tenant", "acme", "--scope", "admin"]);
    assert!(!ok && err.contains("invalid value 'admin'"), "{err}");

    let tenant = Caller { node: &node, key: key.clone() };
    let (ok, out, err) =
        tenant.cli(&["deploy", "hello", guests().hello.to_str().unwrap(), "--tenant", "acme"]);
    assert!(ok, "{out}{err}");
    let (ok, out, _) = tenant.cli(&["invoke", "hello", "--tenant", "acme"]);
    assert!(ok && out == "hello from sluice\n", "{out}");
    let (ok, _, err) = tenant.cli(&["tenants", "create", "other"]);
    assert!(!ok && err.contains("only an admin key may create tenants"), "{err}");
    let (ok, out, _) = tenant.cli(&["tenants", "list"]);
    assert!(ok && out.contains("acme") && !out.contains("default"), "{out}");

    let (ok, out, _) = admin.cli(&["keys", "list", "--tenant", "acme"]);
    assert!(ok, "{out}");
    let line = out.lines().find(|l| l.starts_with(&id)).unwrap_or_else(|| panic!("{id} not listed: {out}"));
    assert!(line.contains("deploy,invoke") && line.ends_with("active"), "{line}");
    assert!(!out.contains(&key), "a listing never shows the key");

    let (ok, out, err) = admin.cli(&["keys", "revoke", &id]);
    assert!(ok && out.trim() == format!("revoked {id}"), "{out}{err}");
    let (ok, out, _) = admin.cli(&["keys", "list", "--tenant", "acme"]);
    assert!(ok && out.lines().any(|l| l.starts_with(&id) && l.ends_with("revoked")), "{out}");
    let (ok, _, err) = tenant.cli(&["invoke", "hello", "--tenant", "acme"]);
    assert!(!ok && err.contains("invalid or revoked API key"), "{err}");
}
