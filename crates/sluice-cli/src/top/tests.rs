//! The dashboard driven by JSON fixtures shaped like the node's answers, and keys; drawn into a
//! `TestBackend` to check what a person would see.

use ratatui::Terminal;
use ratatui::backend::TestBackend;
use serde_json::{Value, json};
use sluice_core::rfc3339;

use super::model::{Key, Model, Poll, SortBy, View};
use super::render::render;

/// 2026-12-01T00:00:00Z.
const NOW: i64 = 1_796_083_200_000;

/// A finished invocation of `function`, created `ago_ms` before NOW, that ran `ms`.
fn finished(id: &str, function: &str, ago_ms: i64, ms: i64, status: &str, cpu_ms: f64) -> Value {
    let created = NOW - ago_ms;
    json!({
        "id": id, "tenant": "default", "function": function, "version": 1, "mode": "sync",
        "status": status, "attempts": 1,
        "created_at": rfc3339(created), "started_at": rfc3339(created), "finished_at": rfc3339(created + ms),
        "status_code": if status == "succeeded" { json!(200) } else { Value::Null },
        "error_kind": if status == "succeeded" { Value::Null } else { json!("trap") },
        "cpu_ms": cpu_ms, "waits": null,
    })
}

fn queued(id: &str, function: &str) -> Value {
    json!({
        "id": id, "tenant": "default", "function": function, "version": 1, "mode": "async",
        "status": "queued", "attempts": 0, "created_at": rfc3339(NOW - 100),
        "started_at": null, "finished_at": null, "status_code": null, "error_kind": null,
        "cpu_ms": null, "waits": null,
    })
}

fn functions(names: &[&str]) -> Value {
    json!({ "functions": names.iter().map(|n| json!({
        "name": n, "latest_version": 2, "updated_at": rfc3339(NOW - 60_000), "url": format!("/fn/default/{n}")
    })).collect::<Vec<_>>() })
}

fn usage() -> Value {
    json!({ "tenant": "default", "functions": 3, "async": {
        "reserved": 0, "weight": 1, "running": 2, "borrowed": 0, "queued": 7, "queued_windowed": 0,
        "later": 1, "waiting": { "plain": "utilization" }, "downstream_held": [],
        "node_utilization": 0.42, "node_utilization_target": 0.8,
    }})
}

fn node() -> Value {
    json!({ "version": "0.1.0", "functions": 3,
        "code_cache": { "entries": 3, "entries_max": 64 },
        "lanes": { "slow_running": 1, "slow_waiting": 0, "demoted_total": 4, "slow_priority": "idle" } })
}

fn nodes() -> Value {
    json!({ "nodes": [
        { "id": "a", "health": "up", "slots": 16, "in_flight": 4, "queue_lag_ms": 35, "this": true },
        { "id": "b", "health": "up", "slots": 16, "in_flight": 2, "queue_lag_ms": 120, "this": false },
        { "id": "c", "health": "down", "slots": 16, "in_flight": 9, "queue_lag_ms": 9000, "this": false },
    ]})
}

/// Three functions: `fast` called 20 times in the last 10 s, `slow` 4 times (one of them failed),
/// `idle` never; one `fast` call is queued.
fn poll() -> Poll {
    let mut invocations = vec![queued("q1", "fast")];
    for i in 0..20 {
        invocations.push(finished(&format!("f{i}"), "fast", 200 + i * 400, 2 + i % 3, "succeeded", 1.0));
    }
    for i in 0..4 {
        let status = if i == 1 { "failed" } else { "succeeded" };
        invocations.push(finished(&format!("s{i}"), "slow", 1_000 + i * 2_000, 800 + i * 100, status, 50.0));
    }
    // An old call of `slow`: outside the rate window, inside the sample.
    invocations.push(finished("s-old", "slow", 60_000, 5_000, "succeeded", 50.0));
    Poll {
        now_ms: NOW,
        functions: Ok(functions(&["fast", "slow", "idle"])),
        invocations: Ok(json!({ "invocations": invocations, "next_before": null })),
        usage: Ok(usage()),
        node: Ok(node()),
        nodes: Ok(nodes()),
        logs: None,
        metrics: Err("this key may not read metrics (forbidden, HTTP 403)".to_string()),
    }
}

/// `/metrics` of a node where `fast` ended `calls` calls (`errors` of them timed out), each
/// `cpu_ms` of CPU, with `le_1ms` of them within 1 ms and the rest within 10 ms.
fn metrics_text(calls: u64, errors: u64, le_1ms: u64, cpu_ms: f64) -> String {
    format!(
        r#"# TYPE sluice_invocations_total counter
sluice_invocations_total{{tenant="default",function="fast",kind="sync",outcome="ok"}} {ok}
sluice_invocations_total{{tenant="default",function="fast",kind="async",outcome="timeout"}} {errors}
sluice_invocations_total{{tenant="other",function="idle",kind="sync",outcome="ok"}} 999
sluice_invocation_duration_seconds_bucket{{tenant="default",function="fast",kind="sync",le="0.001"}} {le_1ms}
sluice_invocation_duration_seconds_bucket{{tenant="default",function="fast",kind="sync",le="0.01"}} {calls}
sluice_invocation_duration_seconds_bucket{{tenant="default",function="fast",kind="sync",le="+Inf"}} {calls}
sluice_invocation_cpu_seconds_sum{{tenant="default",function="fast",kind="sync"}} {cpu}
sluice_invocation_cpu_seconds_count{{tenant="default",function="fast",kind="sync"}} {calls}
"#,
        ok = calls - errors,
        cpu = calls as f64 * cpu_ms / 1000.0,
    )
}

fn model() -> Model {
    let mut m = Model::new("default", "http://127.0.0.1:8080");
    m.apply(poll());
    m
}

fn names(m: &Model) -> Vec<String> {
    m.visible_rows().iter().map(|r| r.name.clone()).collect()
}

/// The screen as text, one string per row.
fn draw(m: &Model) -> Vec<String> {
    let mut terminal = Terminal::new(TestBackend::new(140, 30)).unwrap();
    terminal.draw(|f| render(f, m)).unwrap();
    let buffer = terminal.backend().buffer();
    (0..buffer.area.height)
        .map(|y| (0..buffer.area.width).map(|x| buffer[(x, y)].symbol()).collect::<String>())
        .collect()
}

fn screen_line<'a>(screen: &'a [String], needle: &str) -> &'a str {
    screen
        .iter()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?}:\n{}", screen.join("\n")))
}

#[test]
fn without_metrics_rates_percentiles_errors_and_cpu_come_from_the_invocations() {
    let m = model();
    let rows = m.visible_rows();
    let fast = rows.iter().find(|r| r.name == "fast").unwrap();
    // 20 finished and 1 queued call created in the last 10 s.
    assert_eq!(fast.rate_per_sec, 2.1);
    assert_eq!((fast.calls, fast.errors, fast.active, fast.version), (20, 0, 1, 2));
    assert_eq!((fast.p50_ms, fast.p99_ms), (Some(3.0), Some(4.0)));
    assert_eq!(fast.cpu_ms, Some(1.0));
    let slow = rows.iter().find(|r| r.name == "slow").unwrap();
    assert_eq!(slow.rate_per_sec, 0.4);
    assert_eq!((slow.calls, slow.errors), (5, 1));
    // Durations 800, 900, 1000, 1100, 5000: nearest rank.
    assert_eq!((slow.p50_ms, slow.p99_ms), (Some(1000.0), Some(5000.0)));
    let idle = rows.iter().find(|r| r.name == "idle").unwrap();
    assert_eq!((idle.rate_per_sec, idle.calls, idle.p50_ms), (0.0, 0, None));

    assert_eq!(m.slowest().iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["slow", "fast"]);
    assert_eq!(m.failing().iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["slow"]);
    let c = &m.capacity;
    // The down node does not count.
    assert_eq!((c.slots_busy, c.slots, c.nodes_up, c.queue_lag_ms), (Some(6), Some(32), Some(2), Some(120)));
    assert_eq!((c.queued, c.later, c.running), (Some(7), Some(1), Some(2)));
    assert_eq!((c.utilization, c.utilization_target), (Some(0.42), Some(0.8)));
    assert_eq!(c.waiting, ["plain: utilization"]);
}

#[test]
fn s_cycles_the_sort_and_the_order_follows() {
    let mut m = model();
    assert_eq!(m.sort, SortBy::Rate);
    assert_eq!(names(&m), ["fast", "slow", "idle"]);
    let mut seen = vec![m.sort];
    for _ in 0..SortBy::ALL.len() {
        m.key(Key::Char('s'));
        seen.push(m.sort);
        match m.sort {
            SortBy::P99 | SortBy::Errors | SortBy::Cpu | SortBy::P50 => {
                assert_eq!(names(&m)[0], "slow", "{:?}", m.sort)
            }
            SortBy::Calls | SortBy::Rate => assert_eq!(names(&m)[0], "fast", "{:?}", m.sort),
            SortBy::Name => assert_eq!(names(&m), ["fast", "idle", "slow"]),
        }
    }
    // Every column once, and back to the start.
    assert_eq!(seen.first(), seen.last());
    assert_eq!(seen.len(), SortBy::ALL.len() + 1);
}

#[test]
fn slash_filters_by_name_and_esc_clears_the_filter() {
    let mut m = model();
    m.key(Key::Char('/'));
    assert!(m.filtering);
    for c in "sl".chars() {
        m.key(Key::Char(c));
    }
    assert_eq!(names(&m), ["slow"]);
    // While typing, 'q' and 's' are letters, not commands.
    m.key(Key::Char('q'));
    assert!(!m.quit);
    assert_eq!(m.filter, "slq");
    assert!(names(&m).is_empty());
    m.key(Key::Backspace);
    m.key(Key::Enter);
    assert!(!m.filtering);
    assert_eq!((names(&m), m.selected.as_deref()), (vec!["slow".to_string()], Some("slow")));
    m.key(Key::Esc);
    assert_eq!(m.filter, "");
    assert_eq!(names(&m).len(), 3);
}

#[test]
fn arrows_move_the_selection_and_enter_opens_a_function_until_esc() {
    let mut m = model();
    assert_eq!(m.selected.as_deref(), Some("fast"));
    m.key(Key::Up);
    assert_eq!(m.selected.as_deref(), Some("fast"), "stays at the top");
    m.key(Key::Down);
    m.key(Key::Down);
    m.key(Key::Down);
    assert_eq!(m.selected.as_deref(), Some("idle"), "stays at the bottom");
    m.key(Key::Up);
    assert_eq!(m.selected.as_deref(), Some("slow"));
    // The selection follows the function when the order changes.
    m.key(Key::Char('s'));
    m.key(Key::Char('s'));
    assert_eq!(m.selected.as_deref(), Some("slow"));

    m.key(Key::Enter);
    assert_eq!(m.view, View::Function("slow".into()));
    assert_eq!(m.open_function(), Some("slow"));
    let calls = m.open_invocations();
    assert_eq!(calls.len(), 5);
    assert_eq!((calls[1].status.as_str(), calls[1].error_kind.as_deref()), ("failed", Some("trap")));
    let mut p = poll();
    p.logs = Some((
        "slow".into(),
        Ok(
            json!({ "lines": [{ "at": rfc3339(NOW), "invocation_id": "0123456789abcdef", "stream": "stdout", "line": "working hard" }], "next_after": 1 }),
        ),
    ));
    m.apply(p);
    assert_eq!(m.logs.len(), 1);
    assert!(m.logs[0].ends_with("89abcdef stdout working hard"), "{:?}", m.logs);
    // In the function view 's' does nothing; Esc goes back, q quits.
    m.key(Key::Char('s'));
    assert_eq!(m.sort, SortBy::Errors);
    m.key(Key::Esc);
    assert_eq!((m.view.clone(), m.logs.len()), (View::Functions, 0));
    m.key(Key::Char('q'));
    assert!(m.quit);
}

#[test]
fn a_failed_poll_keeps_the_last_picture_and_says_why() {
    let mut m = model();
    let mut p = poll();
    p.functions = Err("cannot reach the node".into());
    p.node = Err("only an admin key may read the node's state (forbidden, HTTP 403)".into());
    m.apply(p);
    assert_eq!(names(&m).len(), 3);
    assert_eq!(m.error.as_deref(), Some("cannot reach the node"));
    let screen = draw(&m);
    screen_line(&screen, "error: cannot reach the node");
    screen_line(&screen, "node view unavailable: only an admin key");
    // The next good poll clears it.
    m.apply(poll());
    assert_eq!(m.error, None);
}

#[test]
fn the_table_shows_each_function_with_its_rate_and_the_sort_marker_moves() {
    let mut m = model();
    let screen = draw(&m);
    let fast = screen_line(&screen, "│fast   ");
    for cell in ["2.1", "20", "3.0ms", "4.0ms", "1.0ms"] {
        assert!(fast.contains(cell), "{cell} missing from {fast:?}");
    }
    let header = screen_line(&screen, "FUNCTION");
    assert!(header.contains("RATE/s▼") && !header.contains("CALLS▼"), "{header}");
    screen_line(&screen, "slots 6/32 busy (19%) on 2 node(s)");
    screen_line(&screen, "utilization 42% of target 80%");
    screen_line(&screen, "queue 7 queued, 1 later, 2 running, lag 120 ms");
    screen_line(&screen, "held: plain: utilization");
    screen_line(&screen, "slow lane 1 running, 0 waiting");
    screen_line(&screen, "slowest: slow p99 5000ms, fast p99 4.0ms");
    screen_line(&screen, "failing: slow 1/5 failed");
    // The first row is the selected one; rows keep the sort order.
    let fast_at = screen.iter().position(|l| l.contains("│fast   ")).unwrap();
    let slow_at = screen.iter().position(|l| l.contains("│slow   ")).unwrap();
    assert!(fast_at < slow_at);

    m.key(Key::Char('s'));
    let header = draw(&m).into_iter().find(|l| l.contains("FUNCTION")).unwrap();
    assert!(header.contains("CALLS▼") && !header.contains("RATE/s▼"), "{header}");
    m.key(Key::Char('s'));
    m.key(Key::Char('s'));
    let screen = draw(&m);
    assert!(screen_line(&screen, "FUNCTION").contains("P50▼"));
    // Sorted by p50, slow comes first.
    let fast_at = screen.iter().position(|l| l.contains("│fast   ")).unwrap();
    let slow_at = screen.iter().position(|l| l.contains("│slow   ")).unwrap();
    assert!(slow_at < fast_at);
}

#[test]
fn the_function_view_shows_its_invocations_and_log_lines() {
    let mut m = model();
    m.key(Key::Down);
    m.key(Key::Enter);
    let mut p = poll();
    p.logs = Some((
        "slow".into(),
        Ok(
            json!({ "lines": [{ "at": rfc3339(NOW), "invocation_id": "0123456789abcdef", "stream": "stderr", "line": "disk is slow" }], "next_after": 1 }),
        ),
    ));
    m.apply(p);
    let screen = draw(&m);
    screen_line(&screen, "slow: recent invocations");
    let failed = screen_line(&screen, "s1 ");
    assert!(failed.contains("failed") && failed.contains("trap") && failed.contains("900ms"), "{failed}");
    screen_line(&screen, "89abcdef stderr disk is slow");
    screen_line(&screen, "Esc back");
    // The typing prompt shows in the list view.
    m.key(Key::Esc);
    m.key(Key::Char('/'));
    m.key(Key::Char('f'));
    screen_line(&draw(&m), "filter: f");
}

#[test]
fn the_interval_has_a_floor() {
    assert_eq!(super::parse_interval("250ms"), Ok(std::time::Duration::from_millis(250)));
    assert!(super::parse_interval("10ms").unwrap_err().contains("100ms"));
    assert!(super::parse_interval("soon").is_err());
}

#[test]
fn with_metrics_the_table_shows_what_changed_over_the_window() {
    let mut m = Model::new("default", "http://127.0.0.1:8080");
    let at = |ms: i64, text: String| Poll { now_ms: NOW + ms, metrics: Ok(vec![text]), ..poll() };
    m.apply(at(0, metrics_text(1000, 10, 900, 0.5)));
    let fast = m.visible_rows().into_iter().find(|r| r.name == "fast").cloned().unwrap();
    assert_eq!(
        (fast.rate_per_sec, fast.calls, fast.errors),
        (0.0, 1000, 10),
        "first poll: the totals, no rate"
    );
    assert_eq!(m.source_note, None);

    // 2 s later: 200 more calls, 100 of them within 1 ms, 4 more errors, 2 ms of CPU each.
    m.apply(at(2_000, metrics_text(1200, 14, 1000, 0.5 + 0.3)));
    let rows = m.visible_rows();
    let fast = rows.iter().find(|r| r.name == "fast").unwrap();
    assert_eq!((fast.rate_per_sec, fast.calls, fast.errors), (100.0, 200, 4));
    assert_eq!(fast.p50_ms, Some(1.0), "100 of 200 within 1 ms");
    assert!((fast.p99_ms.unwrap() - 9.82).abs() < 1e-9, "{:?}: interpolated in (1, 10] ms", fast.p99_ms);
    assert!((fast.cpu_ms.unwrap() - 2.3).abs() < 1e-9, "{:?}", fast.cpu_ms);
    assert_eq!(fast.active, 1, "queued work still comes from the invocations list");
    let slow = rows.iter().find(|r| r.name == "slow").unwrap();
    assert_eq!((slow.calls, slow.p99_ms), (0, None), "not in /metrics: no calls on the node");
    assert_eq!(rows.iter().filter(|r| r.name == "idle").count(), 1, "another tenant's series are not ours");

    // Past the window, the base moves: 12 s after the start, the base is the 2 s snapshot.
    m.apply(at(12_000, metrics_text(1300, 14, 1100, 0.8 + 0.1)));
    let fast = m.visible_rows().into_iter().find(|r| r.name == "fast").cloned().unwrap();
    assert_eq!((fast.rate_per_sec, fast.calls, fast.errors), (10.0, 100, 0));

    // A node that restarted counts from zero.
    m.apply(at(13_000, metrics_text(50, 0, 50, 0.05)));
    let fast = m.visible_rows().into_iter().find(|r| r.name == "fast").cloned().unwrap();
    assert_eq!(fast.calls, 50);

    let screen = draw(&m);
    assert!(screen_line(&screen, "functions (last 10s)").contains("functions"));
}

#[test]
fn without_the_metrics_scope_the_table_says_where_its_numbers_come_from() {
    let m = model();
    assert!(m.source_note.as_deref().unwrap().contains("HTTP 403"));
    let screen = draw(&m);
    screen_line(&screen, "functions (recent recorded calls)");
    screen_line(&screen, "sync calls that succeeded without a log line are missing");
}

#[test]
fn a_cluster_is_scraped_on_every_node_that_is_up() {
    let mut m = Model::new("default", "http://127.0.0.1:8080");
    let mut p = poll();
    p.nodes = Ok(json!({ "nodes": [
        { "id": "a", "health": "up", "address": "http://10.0.0.1:8080" },
        { "id": "b", "health": "down", "address": "http://10.0.0.2:8080" },
        { "id": "c", "health": "up", "address": "http://10.0.0.3:8080" },
    ]}));
    p.metrics = Ok(vec![metrics_text(10, 0, 10, 1.0), metrics_text(30, 3, 30, 1.0)]);
    m.apply(p);
    assert_eq!(m.metrics_targets, ["http://10.0.0.1:8080", "http://10.0.0.3:8080"]);
    let fast = m.visible_rows().into_iter().find(|r| r.name == "fast").cloned().unwrap();
    assert_eq!((fast.calls, fast.errors), (40, 3), "the nodes' counts add up");
}
