//! Node lifecycle: first start, restart from the artifact cache, graceful shutdown.

use crate::harness::{Node, guests};

#[test]
fn first_start_creates_an_admin_key_file_readable_only_by_the_owner() {
    use std::os::unix::fs::PermissionsExt;
    let node = Node::start(&[]);
    let meta = std::fs::metadata(node.dir.path().join("admin.token")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(node.token.starts_with("sk_"));
    let printed = node.stderr.lock().unwrap().join("\n");
    assert!(printed.contains(&node.token), "the key is printed once on first start");
}

#[test]
fn restart_serves_deployed_functions_from_the_artifact_cache() {
    let mut node = Node::start(&[]);
    node.deploy("hello", &guests().hello, &[]);
    let token = node.token.clone();
    assert!(node.terminate().success());
    let artifacts: Vec<_> = std::fs::read_dir(node.dir.path().join("artifacts/default")).unwrap().collect();
    assert_eq!(artifacts.len(), 1, "one cached artifact");

    node.spawn();
    assert_eq!(node.token, token, "the key survives a restart");
    let created = node.stderr.lock().unwrap().iter().filter(|l| l.contains("admin API key")).count();
    assert_eq!(created, 1, "a restart does not create another admin key");
    assert_eq!(node.get("/fn/default/hello/").text().unwrap(), "hello from sluice\n");
}

#[test]
fn sigterm_lets_in_flight_calls_finish() {
    let mut node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &[]);
    let url = format!("{}/fn/default/tg/sleep?ms=1500", node.url);
    let token = node.token.clone();
    let call = std::thread::spawn(move || {
        let c = crate::harness::http();
        let res = c.get(url).bearer_auth(token).send().unwrap();
        (res.status().as_u16(), res.text().unwrap())
    });
    node.wait_sync_in_flight(1);
    assert!(!call.is_finished(), "the call ended before the signal; the test proves nothing");
    let status = node.terminate();
    assert!(status.success(), "exit status {status:?}");
    // The call was in flight when the signal came, and still got its whole answer.
    assert_eq!(call.join().unwrap(), (200, "slept 1500".to_string()));
}
