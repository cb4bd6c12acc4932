//! Traces: a node with `--otlp-endpoint` exports its spans to a collector stand-in (an OTLP/HTTP
//! receiver in this test, decoding the protobuf the way a collector does), and the caller's
//! `traceparent` reaches the guest's outbound requests; without an exporter the caller's context
//! is still passed on.

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;

use crate::harness::{Node, guests, read_request};

/// A span as the collector received it.
#[derive(Debug, Clone)]
struct Received {
    name: String,
    kind: SpanKind,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
    start_ns: u64,
    end_ns: u64,
    service: String,
}

/// An OTLP/HTTP receiver on 127.0.0.1: decodes each `POST /v1/traces` body as an
/// `ExportTraceServiceRequest` and keeps its spans.
fn collector() -> (u16, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let spans = Arc::new(Mutex::new(Vec::new()));
    let kept = spans.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let kept = kept.clone();
            std::thread::spawn(move || {
                let mut stream = stream.unwrap();
                while let Some((head, body)) = read_request(&mut stream) {
                    assert!(head.starts_with("POST /v1/traces "), "the exporter posts to /v1/traces: {head}");
                    assert!(
                        head.to_ascii_lowercase().contains("content-type: application/x-protobuf"),
                        "{head}"
                    );
                    let request =
                        ExportTraceServiceRequest::decode(body.as_slice()).expect("an OTLP trace export");
                    let mut kept = kept.lock().unwrap();
                    for resource in request.resource_spans {
                        let service = resource
                            .resource
                            .iter()
                            .flat_map(|r| &r.attributes)
                            .find(|kv| kv.key == "service.name")
                            .map(|kv| value(kv.value.as_ref()))
                            .unwrap_or_default();
                        for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                            kept.push(Received {
                                kind: span.kind(),
                                name: span.name,
                                trace_id: hex(&span.trace_id),
                                span_id: hex(&span.span_id),
                                parent_span_id: hex(&span.parent_span_id),
                                attributes: span
                                    .attributes
                                    .iter()
                                    .map(|kv| (kv.key.clone(), value(kv.value.as_ref())))
                                    .collect(),
                                start_ns: span.start_time_unix_nano,
                                end_ns: span.end_time_unix_nano,
                                service: service.clone(),
                            });
                        }
                    }
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
                    );
                }
            });
        }
    });
    (port, spans)
}

fn value(v: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A downstream that answers `pong` and keeps the `traceparent` of each request it gets.
fn downstream() -> (u16, Arc<Mutex<Vec<Option<String>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let kept = kept.clone();
            std::thread::spawn(move || {
                let mut stream = stream.unwrap();
                while let Some((head, _)) = read_request(&mut stream) {
                    let traceparent = head.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("traceparent").then(|| v.trim().to_string())
                    });
                    kept.lock().unwrap().push(traceparent);
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\npong");
                }
            });
        }
    });
    (port, seen)
}

/// Waits until `spans` holds `n` spans of `trace_id`; returns them.
fn spans_of(spans: &Mutex<Vec<Received>>, trace_id: &str, n: usize) -> Vec<Received> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let of: Vec<Received> =
            spans.lock().unwrap().iter().filter(|s| s.trace_id == trace_id).cloned().collect();
        if of.len() >= n || Instant::now() > deadline {
            return of;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn one<'a>(spans: &'a [Received], name: &str) -> &'a Received {
    let found: Vec<&Received> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one {name:?} span in {spans:#?}");
    found[0]
}

const SYNC_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const ASYNC_TRACE: &str = "5cf92f3577b34da6a3ce929d0e0e4737";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[test]
fn spans_of_sync_and_async_calls_reach_the_collector_and_the_context_reaches_the_downstream() {
    let (collector_port, spans) = collector();
    let (downstream_port, seen) = downstream();
    let endpoint = format!("http://127.0.0.1:{collector_port}");
    let node = Node::start_with_env(
        &["--otlp-endpoint", &endpoint, "--outbound-allow-private", "--access-log"],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    node.deploy("tg", &guests().testguest, &["--allow-outbound", &format!("127.0.0.1:{downstream_port}")]);
    let fetch = format!("/fn/default/tg/fetch?url=http://127.0.0.1:{downstream_port}/");

    // A sync call with the caller's context.
    let res = node
        .client()
        .get(format!("{}{fetch}", node.url))
        .bearer_auth(&node.token)
        .header("traceparent", format!("00-{SYNC_TRACE}-{CALLER_SPAN}-01"))
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    let sync_id = res.headers()["sluice-invocation-id"].to_str().unwrap().to_string();
    assert_eq!(res.text().unwrap(), "status=200\npong");

    let trace = spans_of(&spans, SYNC_TRACE, 3);
    let gateway = one(&trace, "GET /fn/{tenant}/{function}");
    assert_eq!(gateway.kind, SpanKind::Server);
    assert_eq!(gateway.parent_span_id, CALLER_SPAN, "the gateway span is the caller's child");
    assert_eq!(gateway.service, "sluice");
    for (k, v) in [
        ("sluice.invocation_id", sync_id.as_str()),
        ("sluice.tenant", "default"),
        ("sluice.function", "tg"),
        ("sluice.kind", "sync"),
        ("sluice.version", "1"),
        ("http.response.status_code", "200"),
        ("http.route", "/fn/{tenant}/{function}/{*path}"),
    ] {
        assert_eq!(gateway.attributes.get(k).map(String::as_str), Some(v), "{k} of {gateway:#?}");
    }
    let run = one(&trace, "run");
    assert_eq!(run.parent_span_id, gateway.span_id, "the run is the gateway's child");
    assert_eq!(run.attributes["sluice.invocation_id"], sync_id);
    assert!(run.start_ns >= gateway.start_ns && run.end_ns <= gateway.end_ns + 1_000_000, "{trace:#?}");
    let client = one(&trace, "GET");
    assert_eq!(client.kind, SpanKind::Client);
    assert_eq!(client.parent_span_id, run.span_id, "the outbound request is the run's child");
    assert_eq!(client.attributes["http.response.status_code"], "200");
    assert_eq!(client.attributes["server.address"], "127.0.0.1");
    assert_eq!(trace.len(), 3, "{trace:#?}");
    assert_eq!(
        seen.lock().unwrap()[0].as_deref(),
        Some(format!("00-{SYNC_TRACE}-{}-01", client.span_id).as_str()),
        "the downstream gets the trace, with the client span as its parent"
    );

    // An async call: its context goes through the queue.
    let async_id = node.enqueue(&fetch, &[("traceparent", &format!("00-{ASYNC_TRACE}-{CALLER_SPAN}-01"))]);
    node.wait_json(&format!("/v1/invocations/{async_id}"), |v| v["status"] == "succeeded");
    let trace = spans_of(&spans, ASYNC_TRACE, 4);
    let gateway = one(&trace, "POST /fn/{tenant}/{function}");
    assert_eq!(gateway.parent_span_id, CALLER_SPAN);
    assert_eq!(gateway.attributes["sluice.kind"], "async");
    assert_eq!(gateway.attributes["http.response.status_code"], "202");
    let wait = one(&trace, "queue wait");
    let run = one(&trace, "run");
    for span in [wait, run] {
        assert_eq!(span.parent_span_id, gateway.span_id, "{} is the gateway's child", span.name);
        assert_eq!(span.attributes["sluice.invocation_id"], async_id);
        assert_eq!(span.attributes["sluice.attempt"], "1");
    }
    assert!(wait.end_ns <= run.start_ns + 1_000_000, "the wait ends where the run starts: {trace:#?}");
    let client = one(&trace, "GET");
    assert_eq!(client.parent_span_id, run.span_id);
    assert_eq!(
        seen.lock().unwrap()[1].as_deref(),
        Some(format!("00-{ASYNC_TRACE}-{}-01", client.span_id).as_str())
    );

    // A call with no context starts a trace of its own at the gateway.
    let res = node.get("/fn/default/tg/ok");
    let id = res.headers()["sluice-invocation-id"].to_str().unwrap().to_string();
    assert_eq!(res.text().unwrap(), "ok");
    let deadline = Instant::now() + Duration::from_secs(30);
    let root = loop {
        let found = spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.attributes.get("sluice.invocation_id") == Some(&id) && s.kind == SpanKind::Server)
            .cloned();
        if let Some(root) = found {
            break root;
        }
        assert!(Instant::now() < deadline, "no gateway span for {id}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(root.parent_span_id.is_empty(), "{root:#?}");

    // The access log has a line per call, with its invocation id.
    let lines = node.stderr.lock().unwrap().clone();
    for id in [&sync_id, &async_id, &id] {
        assert!(
            lines.iter().any(|l| l.contains("sluice::access") && l.contains(id.as_str())),
            "no access line for {id}: {lines:#?}"
        );
    }
    // The sync call's line names the version that ran.
    assert!(
        lines
            .iter()
            .any(|l| l.contains("sluice::access") && l.contains(sync_id.as_str()) && l.contains("version=1")),
        "no version on the access line of {sync_id}: {lines:#?}"
    );
}

#[test]
fn without_an_exporter_the_callers_context_is_passed_on_unchanged() {
    let (downstream_port, seen) = downstream();
    let node = Node::start(&["--outbound-allow-private"]);
    node.deploy("tg", &guests().testguest, &["--allow-outbound", &format!("127.0.0.1:{downstream_port}")]);
    let caller = format!("00-{SYNC_TRACE}-{CALLER_SPAN}-01");
    let res = node
        .client()
        .get(format!("{}/fn/default/tg/fetch?url=http://127.0.0.1:{downstream_port}/", node.url))
        .bearer_auth(&node.token)
        .header("traceparent", &caller)
        .header("tracestate", "vendor=1")
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(seen.lock().unwrap().as_slice(), [Some(caller.clone())]);
    let res = node
        .client()
        .get(format!("{}/fn/default/tg/headers", node.url))
        .bearer_auth(&node.token)
        .header("traceparent", &caller)
        .send()
        .unwrap();
    assert!(res.text().unwrap().contains(&format!("traceparent: {caller}\n")), "the guest sees it too");
    assert!(
        !node.stderr.lock().unwrap().iter().any(|l| l.contains("sluice::access")),
        "no access log unless asked for"
    );
}
