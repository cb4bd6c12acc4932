//! `sluice new NAME` writes a project that builds with cargo for wasm32-wasip2 and deploys as it
//! is, with the commands it prints.

use std::process::Command;

use crate::harness::{BIN, Node, guests};

#[test]
fn a_new_project_builds_deploys_and_answers() {
    // Building the guests first fetches examples/hello's dependencies, which the project's
    // lockfile pins, so its own build finds them in cargo's cache.
    guests();
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(BIN).args(["new", "demo"]).current_dir(tmp.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).unwrap();
    let deploy_line = "sluice deploy demo target/wasm32-wasip2/release/demo.wasm";
    assert!(printed.contains("cargo build --release --target wasm32-wasip2"), "{printed}");
    assert!(printed.contains(deploy_line), "{printed}");

    // The build the README and the output name, in the project, into its own target directory
    // (one small crate; the lockfile pins what examples/hello already fetched).
    let project = tmp.path().join("demo");
    let build = Command::new("cargo")
        .args(["build", "--quiet", "--release", "--target", "wasm32-wasip2"])
        .current_dir(&project)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "the new project did not build: {}",
        String::from_utf8_lossy(&build.stderr)
    );
    let wasm = project.join("target/wasm32-wasip2/release/demo.wasm");
    assert!(wasm.is_file(), "no component at {}", wasm.display());

    let node = Node::start(&[]);
    node.deploy("demo", &wasm, &[]);
    let (ok, out, err) = node.cli(&["invoke", "demo", "/hello?x=1"]);
    assert!(ok, "{err}");
    assert_eq!(out, "hello from demo: GET /hello?x=1\n");
    let res = node
        .client()
        .post(format!("{}/fn/default/demo/items", node.url))
        .bearer_auth(&node.token)
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().unwrap(), "hello from demo: POST /items\n");
    // Each call's log line is kept (it makes the call a recorded one that `sluice top` counts).
    node.wait_json("/v1/tenants/default/functions/demo/logs", |v| {
        let text = v.to_string();
        text.contains("GET /hello?x=1") && text.contains("POST /items")
    });
}

#[test]
fn a_bad_name_or_an_existing_directory_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let new = |name: &str| Command::new(BIN).args(["new", name]).current_dir(tmp.path()).output().unwrap();

    for bad in ["My_Fn", "1st", "fn"] {
        let out = new(bad);
        assert!(!out.status.success(), "{bad} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("invalid name \"{bad}\"")), "{err}");
        assert!(!tmp.path().join(bad).exists(), "{bad}: a directory was written");
    }

    std::fs::create_dir(tmp.path().join("taken")).unwrap();
    std::fs::write(tmp.path().join("taken/keep.txt"), "mine").unwrap();
    let out = new("taken");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("./taken already exists"));
    assert_eq!(std::fs::read_dir(tmp.path().join("taken")).unwrap().count(), 1, "files were added");
}
