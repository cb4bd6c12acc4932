//! Guest stdout/stderr become the invocation's log lines, readable per invocation and per
//! function (CLI `sluice logs`).

use crate::harness::{Node, guests};

#[test]
fn guest_output_is_kept_per_invocation_and_per_function() {
    let node = Node::start(&[]);
    node.deploy("tg", &guests().testguest, &[]);
    let res = node.get("/fn/default/tg/stdout");
    assert_eq!(res.status(), 200);
    let id = res.headers()["sluice-invocation-id"].to_str().unwrap().to_string();

    let v =
        node.wait_json(&format!("/v1/invocations/{id}/logs"), |v| v["lines"].as_array().unwrap().len() >= 3);
    let lines: Vec<(String, String)> = v["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["stream"].as_str().unwrap().to_string(), l["line"].as_str().unwrap().to_string()))
        .collect();
    assert!(lines.contains(&("stdout".into(), "stdout line 1".into())), "{lines:?}");
    assert!(lines.contains(&("stdout".into(), "stdout line 2".into())), "{lines:?}");
    assert!(lines.contains(&("stderr".into(), "stderr line 1".into())), "{lines:?}");

    let inv = node.wait_json(&format!("/v1/invocations/{id}"), |_| true);
    assert_eq!(inv["status"], "succeeded");
    assert_eq!(inv["status_code"], 200);
    assert_eq!(inv["function"], "tg");

    // A trap's message goes to the logs, not to the response.
    let res = node.get("/fn/default/tg/panic");
    let trap_id = res.headers()["sluice-invocation-id"].to_str().unwrap().to_string();
    let body = res.text().unwrap();
    assert!(!body.contains("panicked on purpose"), "{body}");
    let v = node.wait_json(&format!("/v1/invocations/{trap_id}/logs"), |v| {
        v.to_string().contains("invocation failed")
    });
    assert!(v.to_string().contains("panicked on purpose"), "{v}");
    let inv = node.wait_json(&format!("/v1/invocations/{trap_id}"), |_| true);
    assert_eq!(inv["error_kind"], "trap");

    let (ok, out, err) = node.cli(&["logs", "tg"]);
    assert!(ok, "{err}");
    assert!(out.contains("stdout line 1") && out.contains("stderr line 1"), "{out}");
    let (ok, out, _) = node.cli(&["logs", "--invocation", &id]);
    assert!(ok && out.contains("stdout line 2"), "{out}");

    // Another tenant's key cannot read them (here: no key at all, and a made-up id).
    let res = node.client().get(format!("{}/v1/invocations/{id}/logs", node.url)).send().unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(node.get("/v1/invocations/00000000000000000000000000000000/logs").status(), 404);
}

#[test]
fn finished_invocations_and_their_logs_are_removed_after_the_retention() {
    let node = Node::start(&["--retention", "1s"]);
    node.deploy("tg", &guests().testguest, &[]);
    let res = node.get("/fn/default/tg/stdout");
    let id = res.headers()["sluice-invocation-id"].to_str().unwrap().to_string();
    node.wait_json(&format!("/v1/invocations/{id}"), |v| v["status"] == "succeeded");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while node.get(&format!("/v1/invocations/{id}")).status() != 404 {
        assert!(std::time::Instant::now() < deadline, "the invocation outlived its retention");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(node.get(&format!("/v1/invocations/{id}/logs")).status(), 404);
    let (ok, out, _) = node.cli(&["logs", "tg"]);
    assert!(ok && !out.contains("stdout line 1"), "logs outlived the retention: {out}");
}
