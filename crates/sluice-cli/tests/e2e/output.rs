//! `-o json` on the read commands: stdout is the node's answer, one JSON document that parses,
//! with nothing else on it; the default stays a table for people.

use serde_json::Value;

use crate::harness::{Node, guests};

/// Runs the CLI, asserts it succeeded and that stdout is exactly one JSON document.
fn json(node: &Node, args: &[&str]) -> Value {
    let (ok, out, err) = node.cli(args);
    assert!(ok, "{args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} printed no JSON document ({e}): {out}"))
}

fn names<'a>(v: &'a Value, list: &str, field: &str) -> Vec<&'a str> {
    v[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} in {v}"))
        .iter()
        .filter_map(|x| x[field].as_str())
        .collect()
}

#[test]
fn read_commands_print_the_nodes_json_with_output_json() {
    let node = Node::start(&[]);
    node.deploy("hi", &guests().hello, &[]);
    node.deploy("tg", &guests().testguest, &[]);
    let res = node.get("/fn/default/tg/stdout");
    assert_eq!(res.status(), 200);
    let id = res.headers()["sluice-invocation-id"].to_str().unwrap().to_string();
    node.wait_json(&format!("/v1/invocations/{id}/logs"), |v| !v["lines"].as_array().unwrap().is_empty());

    let v = json(&node, &["functions", "list", "-o", "json"]);
    let functions = names(&v, "functions", "name");
    assert!(functions.contains(&"hi") && functions.contains(&"tg"), "{v}");
    assert_eq!(v["functions"][0]["latest_version"], 1, "{v}");
    // The long form is the same flag.
    assert_eq!(json(&node, &["functions", "list", "--output", "json"]), v);

    let v = json(&node, &["tenants", "list", "-o", "json"]);
    assert!(names(&v, "tenants", "name").contains(&"default"), "{v}");
    let v = json(&node, &["tenants", "usage", "default", "-o", "json"]);
    assert_eq!((v["tenant"].as_str(), v["functions"].as_u64()), (Some("default"), Some(2)), "{v}");
    assert!(v["async"]["node_utilization_target"].is_number(), "{v}");
    let v = json(&node, &["tenants", "quota", "default", "-o", "json"]);
    assert!(v["reserved"].is_number() && v["weight"].is_number(), "{v}");
    let v = json(&node, &["keys", "list", "-o", "json"]);
    assert!(v["keys"].is_array(), "{v}");

    let v = json(&node, &["node", "-o", "json"]);
    assert_eq!(v["functions"], 2, "{v}");
    assert!(v["code_cache"]["entries_max"].as_u64().unwrap() > 0, "{v}");
    let v = json(&node, &["nodes", "-o", "json"]);
    assert_eq!(v["nodes"][0]["this"], true, "{v}");

    let v = json(&node, &["invocations", "list", "--function", "tg", "-o", "json"]);
    assert_eq!(names(&v, "invocations", "id"), [id.as_str()], "{v}");
    assert_eq!(v["invocations"][0]["status"], "succeeded", "{v}");
    let v = json(&node, &["invocations", "show", &id, "-o", "json"]);
    assert_eq!((v["id"].as_str(), v["function"].as_str()), (Some(id.as_str()), Some("tg")), "{v}");

    let v = json(&node, &["logs", "tg", "-o", "json"]);
    assert!(names(&v, "lines", "line").contains(&"stdout line 1"), "{v}");
    let v = json(&node, &["logs", "--invocation", &id, "-o", "json"]);
    assert!(names(&v, "lines", "line").contains(&"stdout line 2"), "{v}");
    let (ok, _, err) = node.cli(&["logs", "tg", "-f", "-o", "json"]);
    assert!(!ok && err.contains("--follow"), "{err}");

    // Without the flag it is a table; an unknown format is refused with the choices.
    let (ok, out, _) = node.cli(&["functions", "list"]);
    assert!(ok && out.starts_with("NAME") && serde_json::from_str::<Value>(&out).is_err(), "{out}");
    let (ok, _, err) = node.cli(&["functions", "list", "-o", "yaml"]);
    assert!(!ok && err.contains("table") && err.contains("json"), "{err}");
    // Write commands do not take it.
    let (ok, _, err) = node.cli(&["functions", "delete", "hi", "-o", "json"]);
    assert!(!ok && err.contains("unexpected argument '-o'"), "{err}");
}
