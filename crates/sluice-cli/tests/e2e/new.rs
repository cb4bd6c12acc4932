//! `sluice new NAME [--lang rust|python|js]` writes a project that builds with the one command
//! it prints and its README names, and deploys as it is.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{BIN, Node, examples, guests};

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

    answers_like_the_template(&wasm, "demo");
}

#[test]
fn a_new_python_project_builds_deploys_and_answers() {
    // The tests install nothing: build.sh uses the componentize-py that
    // scripts/build-examples.sh installed when it is first on the PATH (this fails saying to run
    // that script when it did not).
    let _heavy = crate::harness::cpu_heavy();
    examples();
    let venv_bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/examples-venv/bin");
    let (_tmp, project) =
        new_project("python", "demo-py", "./build.sh", "sluice deploy demo-py demo-py.wasm");
    let path = format!("{}:{}", venv_bin.canonicalize().unwrap().display(), std::env::var("PATH").unwrap());
    run_in(&project, "./build.sh", &[], &[("PATH", &path)]);
    answers_like_the_template(&project.join("demo-py.wasm"), "demo-py");
}

#[test]
fn a_new_js_project_builds_deploys_and_answers() {
    // `npm ci` resolves the lockfile examples/js pins, which scripts/build-examples.sh installed,
    // so npm's cache has every package.
    let _heavy = crate::harness::cpu_heavy();
    examples();
    let (_tmp, project) =
        new_project("js", "demo-js", "npm ci && npm run build", "sluice deploy demo-js demo-js.wasm");
    run_in(&project, "npm", &["ci", "--prefer-offline", "--no-audit", "--no-fund"], &[]);
    run_in(&project, "npm", &["run", "build"], &[]);
    answers_like_the_template(&project.join("demo-js.wasm"), "demo-js");
}

/// Runs `sluice new NAME --lang LANG` in a temporary directory, checks that it printed the build
/// and deploy commands and that the project's README says them too; the directory and the
/// project's path.
fn new_project(lang: &str, name: &str, build: &str, deploy: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(BIN).args(["new", name, "--lang", lang]).current_dir(tmp.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).unwrap();
    let project = tmp.path().join(name);
    let readme = std::fs::read_to_string(project.join("README.md")).unwrap();
    for text in [&printed, &readme] {
        assert!(text.contains(build) && text.contains(deploy), "{text}");
    }
    (tmp, project)
}

fn run_in(dir: &Path, program: &str, args: &[&str], env: &[(&str, &str)]) {
    let out = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_BACKTRACE")
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed in the new project: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every template answers the same: a greeting naming the method and path, and one log line per
/// call.
fn answers_like_the_template(wasm: &Path, name: &str) {
    assert!(wasm.is_file(), "no component at {}", wasm.display());
    let node = Node::start(&[]);
    node.deploy(name, wasm, &[]);
    let (ok, out, err) = node.cli(&["invoke", name, "/hello?x=1"]);
    assert!(ok, "{err}");
    assert_eq!(out, format!("hello from {name}: GET /hello?x=1\n"));
    let res = node
        .client()
        .post(format!("{}/fn/default/{name}/items", node.url))
        .bearer_auth(&node.token)
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().unwrap(), format!("hello from {name}: POST /items\n"));
    // Each call's log line is kept (it makes the call a recorded one that `sluice top` counts).
    node.wait_json(&format!("/v1/tenants/default/functions/{name}/logs"), |v| {
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
