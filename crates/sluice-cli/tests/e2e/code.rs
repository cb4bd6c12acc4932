//! Code on a node: versions cost their metadata until called, the code cache stays within its
//! bounds, blobs belong to their tenant, and unused blobs and artifacts are collected.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Node, assert_error, distinct, guests};

/// Uploads `wasm` as a blob of `tenant` with `key` and returns its digest.
fn upload(node: &Node, key: &str, tenant: &str, wasm: Vec<u8>) -> String {
    let res = node
        .client()
        .post(format!("{}/v1/tenants/{tenant}/blobs", node.url))
        .bearer_auth(key)
        .body(wasm)
        .send()
        .unwrap();
    assert_eq!(res.status(), 201);
    res.json::<Value>().unwrap()["digest"].as_str().unwrap().to_string()
}

/// Deploys a stored blob as `tenant/function` with `key`; returns the response.
fn create_version(
    node: &Node,
    key: &str,
    tenant: &str,
    function: &str,
    digest: &str,
) -> reqwest::blocking::Response {
    node.client()
        .post(format!("{}/v1/tenants/{tenant}/functions/{function}/versions", node.url))
        .bearer_auth(key)
        .json(&json!({ "digest": digest, "config": { "public": true } }))
        .send()
        .unwrap()
}

fn deploy_distinct(node: &Node, function: &str, n: u64) -> Value {
    let wasm = distinct(&std::fs::read(&guests().hello).unwrap(), n);
    let digest = upload(node, &node.token, "default", wasm);
    let res = create_version(node, &node.token, "default", function, &digest);
    assert_eq!(res.status(), 201);
    res.json().unwrap()
}

fn code_cache(node: &Node) -> Value {
    let res = node.get("/v1/node");
    assert_eq!(res.status(), 200);
    res.json::<Value>().unwrap()["code_cache"].clone()
}

#[test]
fn code_is_loaded_on_first_call_and_the_cache_keeps_its_bound() {
    let mut node = Node::start(&["--code-cache-entries", "2"]);
    for n in 0..4 {
        let deployed = deploy_distinct(&node, &format!("f{n}"), n);
        assert_eq!(deployed["artifact_cached"], false, "a new digest is compiled: {deployed}");
    }
    // The same bytes again (another function): compiled once, the deploy only finds it.
    let again = deploy_distinct(&node, "f0-again", 0);
    assert_eq!((again["artifact_cached"].as_bool(), again["compile_ms"].as_u64()), (Some(true), Some(0)));
    for round in 0..2 {
        for n in 0..4 {
            let res = node.get(&format!("/fn/default/f{n}/"));
            assert_eq!(res.status(), 200, "round {round}, f{n}");
            assert_eq!(res.text().unwrap(), "hello from sluice\n");
        }
    }
    let cache = code_cache(&node);
    assert!(cache["entries"].as_u64().unwrap() <= 2, "{cache}");
    // Four functions called in turn through room for two: least recently used out, every call
    // after the first round maps its code again.
    assert!(cache["evictions"].as_u64().unwrap() >= 4, "{cache}");
    assert_eq!(cache["compiles"], 4, "{cache}");
    assert!(cache["loads"].as_u64().unwrap() >= 4, "evicted code is mapped again from disk: {cache}");

    // After a restart nothing is loaded until it is called, and nothing is compiled again.
    assert!(node.terminate().success());
    node.spawn();
    let info: Value = node.get("/v1/node").json().unwrap();
    assert_eq!(info["functions"], 5, "{info}");
    assert_eq!(info["code_cache"]["entries"], 0, "{info}");
    assert_eq!(info["artifacts"]["files"], 4, "{info}");
    assert_eq!(node.get("/fn/default/f3/").status(), 200);
    assert_eq!(node.get("/fn/default/f3/").status(), 200);
    let cache = code_cache(&node);
    assert_eq!((cache["misses"].as_u64(), cache["loads"].as_u64()), (Some(1), Some(1)), "{cache}");
    assert_eq!((cache["hits"].as_u64(), cache["compiles"].as_u64()), (Some(1), Some(0)), "{cache}");

    let (ok, out, err) = node.cli(&["node"]);
    assert!(ok, "{err}");
    assert!(out.contains("code cache   1 of 2 loaded"), "{out}");
}

#[test]
fn a_tenant_cannot_use_or_probe_another_tenants_blob() {
    let node = Node::start(&[]);
    let (ok, _, err) = node.cli(&["tenants", "create", "beta"]);
    assert!(ok, "{err}");
    let (ok, out, err) = node.cli(&[
        "keys", "create", "--tenant", "beta", "--scope", "deploy", "--scope", "invoke", "--scope", "read",
    ]);
    assert!(ok, "{err}");
    let beta_key = out.split_whitespace().find(|w| w.starts_with("sk_")).expect("a key").to_string();

    let digest = upload(&node, &node.token, "default", std::fs::read(&guests().hello).unwrap());
    let res = create_version(&node, &beta_key, "beta", "stolen", &digest);
    let message = assert_error(res, 404, "not_found");
    assert!(message.contains("upload it first"), "{message}");
    // With its own upload of the same bytes it deploys: the artifact is its own too.
    upload(&node, &beta_key, "beta", std::fs::read(&guests().hello).unwrap());
    let res = create_version(&node, &beta_key, "beta", "mine", &digest);
    assert_eq!(res.status(), 201);
    let deployed: Value = res.json().unwrap();
    assert_eq!(deployed["artifact_cached"], false, "compiled for beta, not shared: {deployed}");
    assert!(node.dir.path().join("artifacts/beta").is_dir());
    assert_eq!(node.get("/fn/beta/mine/").status(), 200);

    let usage: Value = node
        .client()
        .get(format!("{}/v1/tenants/beta/usage", node.url))
        .bearer_auth(&beta_key)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!((usage["functions"].as_u64(), usage["blobs"].as_u64()), (Some(1), Some(1)), "{usage}");
    assert_eq!(usage["artifacts"]["files"], 1, "{usage}");
    let res =
        node.client().get(format!("{}/v1/tenants/default/usage", node.url)).bearer_auth(&beta_key).send();
    assert_error(res.unwrap(), 404, "not_found");
    let res = node.client().get(format!("{}/v1/node", node.url)).bearer_auth(&beta_key).send();
    assert_error(res.unwrap(), 403, "forbidden");
}

#[test]
fn unused_blobs_and_artifacts_are_collected_after_their_grace() {
    // The grace leaves a deploy room to compile (in a child process, slower in a debug build on
    // a busy machine) before its own upload, not yet named by a version, could be collected.
    let node = Node::start(&["--blob-grace", "3s"]);
    deploy_distinct(&node, "kept", 1);
    deploy_distinct(&node, "dropped", 2);
    // Uploaded and never deployed: collected too, after its grace.
    upload(&node, &node.token, "default", distinct(&std::fs::read(&guests().hello).unwrap(), 3));
    let (ok, out, err) = node.cli(&["tenants", "usage", "default"]);
    assert!(ok, "{err}");
    assert!(out.contains("components 3 stored"), "{out}");
    let (ok, _, err) = node.cli(&["functions", "delete", "dropped"]);
    assert!(ok, "{err}");

    let usage =
        node.wait_json("/v1/tenants/default/usage", |u| u["blobs"] == 1 && u["artifacts"]["files"] == 1);
    assert_eq!(usage["functions"], 1, "{usage}");
    assert_eq!(node.get("/fn/default/kept/").status(), 200);
    let left: Vec<_> = std::fs::read_dir(node.dir.path().join("artifacts/default")).unwrap().collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

#[test]
fn a_missing_artifact_is_compiled_again_after_a_restart() {
    let mut node = Node::start(&[]);
    deploy_distinct(&node, "f", 7);
    assert!(node.terminate().success());
    let dir = node.dir.path().join("artifacts/default");
    for file in std::fs::read_dir(&dir).unwrap() {
        std::fs::remove_file(file.unwrap().path()).unwrap();
    }
    // Artifacts of an older layout and of another engine, left behind: collected.
    let old_layout = node.dir.path().join("artifacts/0123abcd-0123456789abcdef.cwasm");
    std::fs::write(&old_layout, b"stale").unwrap();
    let old_engine = dir.join("0123abcd-0000000000000000.cwasm");
    std::fs::write(&old_engine, b"stale").unwrap();
    node.spawn();
    // A call at once, while the node's check of its artifacts compiles the missing one (or
    // before it starts): the two share one compile.
    assert_eq!(node.get("/fn/default/f/").text().unwrap(), "hello from sluice\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    // One artifact in place: not a compile's temporary file (`….tmpPID-N`), which is there while
    // the compile's child writes it and is renamed into place only after the child exits.
    let artifacts = || -> Vec<String> {
        std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    while !matches!(artifacts().as_slice(), [one] if one.ends_with(".cwasm")) || old_layout.exists() {
        assert!(Instant::now() < deadline, "the missing artifact was not compiled again");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(node.get("/fn/default/f/").text().unwrap(), "hello from sluice\n");
    let cache = code_cache(&node);
    assert_eq!(cache["compiles"], 1, "{cache}");
}

#[test]
fn concurrent_deploys_and_first_calls_of_one_blob_compile_and_load_once() {
    let mut node = Node::start(&[]);
    let digest = upload(&node, &node.token, "default", distinct(&std::fs::read(&guests().hello).unwrap(), 9));
    let deploys: Vec<_> = (0..4)
        .map(|i| {
            let (url, token, digest) = (node.url.clone(), node.token.clone(), digest.clone());
            std::thread::spawn(move || {
                crate::harness::http()
                    .post(format!("{url}/v1/tenants/default/functions/f{i}/versions"))
                    .bearer_auth(token)
                    .json(&json!({ "digest": digest }))
                    .send()
                    .unwrap()
                    .status()
            })
        })
        .collect();
    for d in deploys {
        assert_eq!(d.join().unwrap(), 201);
    }
    assert_eq!(code_cache(&node)["compiles"], 1);

    // After a restart, concurrent first calls of four functions sharing the blob map it once.
    assert!(node.terminate().success());
    node.spawn();
    let calls: Vec<_> = (0..4)
        .map(|i| {
            let (url, token) = (node.url.clone(), node.token.clone());
            std::thread::spawn(move || {
                let c = crate::harness::http();
                c.get(format!("{url}/fn/default/f{i}/")).bearer_auth(token).send().unwrap().status()
            })
        })
        .collect();
    for c in calls {
        assert_eq!(c.join().unwrap(), 200);
    }
    let cache = code_cache(&node);
    assert_eq!((cache["loads"].as_u64(), cache["compiles"].as_u64()), (Some(1), Some(0)), "{cache}");
    assert_eq!(cache["entries"], 1, "{cache}");
}

#[test]
fn async_calls_pinned_to_an_older_version_use_the_same_cache() {
    use sluice_core::Clock;
    let mut node = Node::start(&[]);
    deploy_distinct(&node, "f", 11);
    // Queued for version 1, to start after version 2 is deployed and the node has restarted
    // (which empties the cache).
    let start_after = sluice_core::rfc3339(sluice_core::SystemClock.now_ms() + 3_000);
    let ids: Vec<String> = (0..2)
        .map(|_| {
            let res = node
                .client()
                .post(format!("{}/fn/default/f/", node.url))
                .header("prefer", "respond-async")
                .header("sluice-start-after", &start_after)
                .send()
                .unwrap();
            assert_eq!(res.status(), 202);
            res.json::<Value>().unwrap()["id"].as_str().unwrap().to_string()
        })
        .collect();
    deploy_distinct(&node, "f", 12);
    assert!(node.terminate().success());
    node.spawn();
    for id in &ids {
        let inv = node.wait_json(&format!("/v1/invocations/{id}"), |v| v["status"] == "succeeded");
        assert_eq!(inv["version"], 1, "{inv}");
    }
    let cache = code_cache(&node);
    assert_eq!((cache["loads"].as_u64(), cache["compiles"].as_u64()), (Some(1), Some(0)), "{cache}");
    assert_eq!(cache["entries"], 1, "only version 1's code was loaded: {cache}");
}

#[test]
fn old_versions_are_retired_with_their_code() {
    // The grace leaves each deploy room to compile before its own upload could be collected.
    let node = Node::start(&["--versions-kept", "2", "--blob-grace", "3s"]);
    for n in 0..4 {
        deploy_distinct(&node, "f", 20 + n);
    }
    let usage = node.wait_json("/v1/tenants/default/usage", |u| {
        u["versions"] == 2 && u["blobs"] == 2 && u["artifacts"]["files"] == 2
    });
    assert_eq!(usage["functions"], 1, "{usage}");
    let f: Value = node.get("/v1/tenants/default/functions/f").json().unwrap();
    assert_eq!(f["version"], 4, "{f}");
    assert_eq!(node.get("/fn/default/f/").text().unwrap(), "hello from sluice\n");
}

#[test]
fn a_cli_whose_reader_went_away_exits_quietly() {
    let node = Node::start(&[]);
    // A pipe whose read end is already closed: every write to it fails with EPIPE, as when
    // `sluice node | head -1` has printed its line.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(crate::harness::BIN)
        .arg("node")
        .env("SLUICE_URL", &node.url)
        .env("SLUICE_TOKEN", &node.token)
        .env_remove("RUST_BACKTRACE")
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?} {stderr}", out.status);
}

#[test]
fn deploys_in_flight_are_bounded_and_the_rest_refused_at_once() {
    // Two on the node, and each tenant's share is one of them (half).
    let node = Node::start(&["--deploy-inflight-max", "2"]);
    let testguest = std::fs::read(&guests().testguest).unwrap();
    // Uploaded one at a time (each holds the only slot only while it is read).
    let digests: Vec<String> =
        (0..6).map(|n| upload(&node, &node.token, "default", distinct(&testguest, 100 + n))).collect();
    // Six deploys of distinct components at once: each compiles for a good part of a second
    // while it holds the tenant's only slot, so the others arriving meanwhile are refused, not
    // queued.
    let deploys: Vec<_> = digests
        .into_iter()
        .enumerate()
        .map(|(i, digest)| {
            let (url, token) = (node.url.clone(), node.token.clone());
            std::thread::spawn(move || {
                let res = crate::harness::http()
                    .post(format!("{url}/v1/tenants/default/functions/f{i}/versions"))
                    .bearer_auth(token)
                    .json(&json!({ "digest": digest }))
                    .send()
                    .unwrap();
                let retry_after = res.headers().get("retry-after").is_some();
                (res.status().as_u16(), retry_after)
            })
        })
        .collect();
    let answers: Vec<(u16, bool)> = deploys.into_iter().map(|d| d.join().unwrap()).collect();
    assert!(answers.iter().any(|a| a.0 == 201), "{answers:?}");
    assert!(answers.contains(&(429, true)), "refused with Retry-After: {answers:?}");
    assert!(answers.iter().all(|a| a.0 == 201 || a.0 == 429), "{answers:?}");
    // The slot comes back: a deploy afterwards is taken.
    assert_eq!(
        create_version(
            &node,
            &node.token,
            "default",
            "after",
            &upload(&node, &node.token, "default", distinct(&testguest, 200))
        )
        .status(),
        201
    );
}
