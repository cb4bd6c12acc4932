//! `GET /metrics`: the node's counters, histograms and gauges in the Prometheus text format.
//!
//! Calls record through handles made once per function (`sluice_runtime::metrics`) into the
//! process's recorder, which this module installs ([`install`]) and renders. What the node
//! already keeps as its own atomics (lanes, code cache, slots, the scheduler's utilization) and
//! the queue's depth (a store query) are read at scrape time, so they cost nothing per call.
//!
//! Who may scrape: an admin key sees everything; a tenant key with the `metrics` scope sees only
//! its own tenant's series (the node-wide ones, like the queue's depth or outbound requests, add up
//! every tenant's work). `serve --metrics-listen` serves the whole text without a key on a
//! separate address (for a scraper on a private network), at most [`OPEN_CONNECTIONS_MAX`]
//! connections at once.
//!
//! A scrape costs the node a render and, at most once per [`crate::recent::STORE_READ_EVERY`] whoever scrapes, a
//! count of the queue's unfinished rows: a key that scrapes in a loop cannot turn into a loop of
//! queries on the database.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::{Response, StatusCode, header};
use metrics::{Counter, counter, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use sluice_core::{Criticality, ErrorKind, InvocationStatus, Scope, SluiceError};

use crate::body::{Body, full};
use crate::error::{error_response, store_error};
use crate::node::{Node, bearer};

static EXPORTER: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process's recorder (once; later calls keep the first), with at most
/// `function_series_max` (tenant, function) pairs labeled. Without it every record is a no-op and
/// `/metrics` answers 404. Call it before the store opens: handles made earlier count nowhere.
pub fn install(function_series_max: usize) {
    sluice_runtime::metrics::set_function_series_max(function_series_max);
    EXPORTER.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(SCHEDULE_LATENESS.into()),
                SCHEDULE_LATENESS_BUCKETS,
            )
            .expect("the buckets are not empty")
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(TRIGGER_COMMIT_TO_ACK.into()),
                TRIGGER_COMMIT_TO_ACK_BUCKETS,
            )
            .expect("the buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        describe();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!(
                "another metrics recorder is installed; /metrics shows only what it does not take"
            );
        }
        handle
    });
}

/// Whether the recorder is installed.
pub fn enabled() -> bool {
    EXPORTER.get().is_some()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        "sluice_invocations_total",
        "Calls that ended, by kind (sync, or async attempts) and outcome"
    );
    describe_counter!("sluice_requests_refused_total", "Calls refused before running, by reason");
    describe_counter!("sluice_outbound_requests_total", "Guests' outbound HTTP requests, by outcome");
    describe_gauge!(
        "sluice_queue_depth",
        "Unfinished async invocations in the cluster, by status and criticality"
    );
    describe_gauge!("sluice_sync_inflight", "Sync calls running on this node");
    describe_gauge!("sluice_sync_inflight_max", "Sync calls this node runs at once before shedding");
    describe_gauge!("sluice_async_inflight", "Async invocations running on this node");
    describe_gauge!("sluice_async_inflight_max", "Async invocations this node runs at once");
    describe_gauge!("sluice_lane_slow_running", "Calls holding a slow-lane slot");
    describe_gauge!("sluice_lane_slow_waiting", "Calls waiting for a slow-lane slot");
    describe_counter!("sluice_lane_demoted_total", "Calls moved to the slow lane");
    describe_gauge!("sluice_utilization", "Share of the node's cores guests used (the scheduler's measure)");
    describe_gauge!(
        "sluice_utilization_target",
        "The utilization above which opportunistic async work waits"
    );
    describe_counter!("sluice_code_cache_hits_total", "Calls that found their component loaded");
    describe_counter!("sluice_code_cache_misses_total", "Calls that had to load or compile their component");
    describe_counter!("sluice_code_cache_evictions_total", "Components dropped from the cache");
    describe_counter!("sluice_compiles_total", "Components compiled");
    describe_counter!("sluice_compile_failures_total", "Compiles refused or failed");
    describe_gauge!("sluice_code_cache_entries", "Components loaded");
    describe_gauge!("sluice_warm_instances", "Idle warm instances kept for functions with reuse");
    describe_gauge!("sluice_warm_instances_bytes", "Linear memory of the idle warm instances");
    describe_counter!("sluice_warm_reused_total", "Calls of functions with reuse served by a warm instance");
    describe_counter!("sluice_warm_fresh_total", "Calls of functions with reuse that got a fresh instance");
    describe_counter!(
        "sluice_warm_dropped_total",
        "Warm instances dropped: a bound was full, or idle too long"
    );
    describe_gauge!("sluice_code_cache_bytes", "Artifact bytes of the components loaded");
    describe_gauge!("sluice_functions", "Functions installed on this node");
    metrics::describe_histogram!(
        SCHEDULE_LATENESS,
        metrics::Unit::Seconds,
        "How long after its occurrence this node enqueued a schedule's invocation (catch-ups included)"
    );
    describe_counter!("sluice_schedule_fires_total", "Schedule occurrences this node enqueued");
    metrics::describe_histogram!(
        TRIGGER_COMMIT_TO_ACK,
        metrics::Unit::Seconds,
        "From a trigger batch's enqueue commit to its broker ack, per message"
    );
    describe_counter!(
        "sluice_trigger_messages_total",
        "Broker messages this node committed as invocations (duplicates included), by broker kind"
    );
    describe_counter!(
        "sluice_metrics_functions_folded_total",
        "Function installs counted under _other (the label bound was reached)"
    );
}

/// The histogram of schedules' fire lateness, and its buckets: the tick is 200 ms, a healthy
/// node fires within it; seconds mean a busy store, minutes an outage caught up.
const SCHEDULE_LATENESS: &str = "sluice_schedule_lateness_seconds";
const SCHEDULE_LATENESS_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0, 300.0, 3600.0];

/// Counts a schedule occurrence this node enqueued, `lateness` after the occurrence.
pub fn schedule_fired(lateness: std::time::Duration) {
    static HANDLES: OnceLock<(metrics::Histogram, Counter)> = OnceLock::new();
    let (late, fires) = HANDLES
        .get_or_init(|| (metrics::histogram!(SCHEDULE_LATENESS), counter!("sluice_schedule_fires_total")));
    late.record(lateness.as_secs_f64());
    fires.increment(1);
}

/// The histogram of a trigger message's time from its batch's commit to its ack, and its buckets.
const TRIGGER_COMMIT_TO_ACK: &str = "sluice_trigger_commit_to_ack_seconds";
const TRIGGER_COMMIT_TO_ACK_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// Counts a trigger batch of `messages` of a broker `kind` (nats, amqp, mqtt), acked
/// `commit_to_ack` after its commit.
pub fn trigger_acked(kind: &'static str, messages: u64, commit_to_ack: std::time::Duration) {
    metrics::histogram!(TRIGGER_COMMIT_TO_ACK).record_many(commit_to_ack.as_secs_f64(), messages as usize);
    counter!("sluice_trigger_messages_total", "kind" => kind).increment(messages);
}

/// Counts a call refused before it ran (rate limited, shed, unauthorized, ...), by its kind.
pub fn refused(kind: ErrorKind) {
    static HANDLES: OnceLock<Vec<Counter>> = OnceLock::new();
    let handles = HANDLES.get_or_init(|| {
        ErrorKind::ALL
            .iter()
            .map(|k| counter!("sluice_requests_refused_total", "reason" => k.as_str()))
            .collect()
    });
    if let Some(i) = ErrorKind::ALL.iter().position(|k| *k == kind) {
        handles[i].increment(1);
    }
}

/// `GET /metrics` on the node's address: for an admin key, or a key with the `metrics` scope.
pub async fn handle(node: Arc<Node>, headers: http::HeaderMap) -> Response<Body> {
    let Some(key) = bearer(&headers) else {
        let e =
            SluiceError::new(ErrorKind::Unauthorized, "missing API key: send Authorization: Bearer <key>");
        return error_response(&e, None);
    };
    let Some(principal) = node.principal_for_key(key) else {
        return error_response(
            &SluiceError::new(ErrorKind::Unauthorized, "invalid or revoked API key"),
            None,
        );
    };
    let only = match (&principal.tenant, principal.is_admin()) {
        (_, true) => None,
        (Some(tenant), false) if principal.may(tenant, Scope::Metrics) => Some(tenant.clone()),
        _ => {
            let e = SluiceError::new(ErrorKind::Forbidden, "this key lacks the metrics scope");
            return error_response(&e, None);
        }
    };
    scrape(&node, only.as_deref()).await
}

/// Connections the key-less metrics address serves at once; more are closed when accepted.
pub const OPEN_CONNECTIONS_MAX: usize = 16;

/// The text, every series (or, with `only`, that tenant's).
pub async fn scrape(node: &Node, only: Option<&str>) -> Response<Body> {
    let Some(exporter) = EXPORTER.get() else {
        return error_response(
            &SluiceError::not_found("metrics are off on this node (it was started with serve --no-metrics)"),
            None,
        );
    };
    if let Err(e) = read_node(node).await {
        return error_response(&e, None);
    }
    exporter.run_upkeep();
    let mut text = exporter.render();
    text.push_str(&sluice_runtime::metrics::render_histograms(|_| true));
    text.push_str(&render_versions(&node.all_served()));
    if let Some(tenant) = only {
        text = only_tenant(&text, tenant);
    }
    let mut res = Response::new(full(text));
    *res.status_mut() = StatusCode::OK;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    res
}

/// Sets the series read at scrape time from what the node keeps.
async fn read_node(node: &Node) -> Result<(), SluiceError> {
    let depth = node.queue_depth.get(|| node.store.queue_depth()).await.map_err(store_error)?;
    for status in InvocationStatus::ALL.into_iter().filter(|s| !s.is_final()).map(InvocationStatus::as_str) {
        for criticality in Criticality::ALL {
            let n = depth.iter().find(|(s, c, _)| s == status && *c == criticality).map_or(0, |(_, _, n)| *n);
            gauge!("sluice_queue_depth", "status" => status, "criticality" => criticality.as_str())
                .set(n as f64);
        }
    }
    gauge!("sluice_sync_inflight").set(node.admission.sync_inflight() as f64);
    gauge!("sluice_sync_inflight_max").set(node.admission.sync_inflight_max as f64);
    gauge!("sluice_async_inflight_max").set(node.config.async_inflight_max as f64);
    let scheduling = node.scheduling.read().expect("scheduling lock").clone();
    if let Some(stats) = scheduling {
        gauge!("sluice_async_inflight").set(stats.in_flight() as f64);
        let view = stats.report(None);
        gauge!("sluice_utilization").set(view.utilization);
        gauge!("sluice_utilization_target").set(view.utilization_target);
    }
    let lanes = node.runtime.lane_stats();
    gauge!("sluice_lane_slow_running").set(lanes.slow_running as f64);
    gauge!("sluice_lane_slow_waiting").set(lanes.slow_waiting as f64);
    counter!("sluice_lane_demoted_total").absolute(lanes.demoted_total);
    let code = node.runtime.code_stats().await;
    counter!("sluice_code_cache_hits_total").absolute(code.hits);
    counter!("sluice_code_cache_misses_total").absolute(code.misses);
    counter!("sluice_code_cache_evictions_total").absolute(code.evictions);
    counter!("sluice_compiles_total").absolute(code.compiles);
    counter!("sluice_compile_failures_total").absolute(code.compile_failures);
    gauge!("sluice_code_cache_entries").set(code.entries as f64);
    gauge!("sluice_code_cache_bytes").set(code.bytes as f64);
    gauge!("sluice_functions").set(node.function_count() as f64);
    let warm = node.runtime.warm_stats();
    gauge!("sluice_warm_instances").set(warm.idle as f64);
    gauge!("sluice_warm_instances_bytes").set(warm.idle_bytes as f64);
    counter!("sluice_warm_reused_total").absolute(warm.reused_total);
    counter!("sluice_warm_fresh_total").absolute(warm.fresh_total);
    counter!("sluice_warm_dropped_total", "reason" => "full").absolute(warm.dropped_full_total);
    counter!("sluice_warm_dropped_total", "reason" => "expired").absolute(warm.expired_total);
    Ok(())
}

/// Versions of one function with series of their own, at most: the newest this node serves that
/// have counted a call (a split alias names at most [`sluice_core::alias::ROUTES_MAX`], as many).
/// With the bound on functions with series of their own, this bounds the version series.
pub const VERSION_SERIES_MAX: usize = sluice_core::alias::ROUTES_MAX;

/// `sluice_version_invocations_total` and `sluice_version_errors_total` by tenant, function and
/// version, read from the served versions' counts at scrape time: a version no longer served
/// (retired, or no longer named by an alias) drops out instead of staying forever. Functions
/// folded under `_other` have none.
fn render_versions(served: &[Arc<crate::node::Served>]) -> String {
    use std::fmt::Write;
    let mut calls = String::from(
        "# HELP sluice_version_invocations_total Sync calls and async attempts of one version \
         served by this node, since it was installed here\n\
         # TYPE sluice_version_invocations_total counter\n",
    );
    let mut errors = String::from(
        "# HELP sluice_version_errors_total Those of them that failed (5xx, traps, timeouts, memory \
         limits, no response); 4xx and closed clients are not counted\n\
         # TYPE sluice_version_errors_total counter\n",
    );
    for function in served {
        let mut versions: Vec<_> = function.versions.values().filter(|d| d.outcomes.totals().0 > 0).collect();
        versions.sort_by_key(|d| std::cmp::Reverse(d.record.version));
        for d in versions.into_iter().take(VERSION_SERIES_MAX) {
            let Some((tenant, name)) = d.metrics.labels() else { continue };
            let (n, failed) = d.outcomes.totals();
            let labels = format!("tenant=\"{tenant}\",function=\"{name}\",version=\"{}\"", d.record.version);
            let _ = writeln!(calls, "sluice_version_invocations_total{{{labels}}} {n}");
            let _ = writeln!(errors, "sluice_version_errors_total{{{labels}}} {failed}");
        }
    }
    calls + &errors
}

/// Serves `GET /metrics` without a key on `listener` (`serve --metrics-listen`); anything else
/// is 404. Runs until the node stops.
pub async fn serve_open(node: Arc<Node>, listener: tokio::net::TcpListener) {
    serve_bounded(listener, OPEN_CONNECTIONS_MAX, move |req| {
        let node = node.clone();
        async move {
            if req.uri().path() == "/metrics" && req.method() == http::Method::GET {
                scrape(&node, None).await
            } else {
                error_response(&SluiceError::not_found("this address serves only GET /metrics"), None)
            }
        }
    })
    .await
}

/// Serves HTTP/1 on `listener` with `handler`, at most `max` connections at once (a connection
/// beyond that is closed as soon as it is accepted), each bounded in time: its request head
/// within 10 s, the whole connection within 60 s.
async fn serve_bounded<H, F>(listener: tokio::net::TcpListener, max: usize, handler: H)
where
    H: Fn(http::Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let open = Arc::new(tokio::sync::Semaphore::new(max));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a metrics connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let res = handler(req);
                async move { Ok::<_, std::convert::Infallible>(res.await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(io, service);
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
            drop(permit);
        });
    }
}

/// Keeps only the samples of `tenant` (tenant names need no escaping: they are lowercase
/// letters, digits and dashes), and the `# HELP`/`# TYPE` lines.
fn only_tenant(text: &str, tenant: &str) -> String {
    let own = format!("tenant=\"{tenant}\"");
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.starts_with('#') || line.contains(&own) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_sees_only_its_own_series() {
        let text = "# TYPE sluice_invocations_total counter\n\
            sluice_invocations_total{tenant=\"acme\",function=\"f\",kind=\"sync\",outcome=\"ok\"} 3\n\
            sluice_invocations_total{tenant=\"acme-2\",function=\"f\",kind=\"sync\",outcome=\"ok\"} 4\n\
            sluice_invocations_total{tenant=\"beta\",function=\"f\",kind=\"sync\",outcome=\"ok\"} 5\n\
            sluice_invocation_run_seconds_bucket{tenant=\"acme\",function=\"f\",kind=\"sync\",le=\"+Inf\"} 3\n\
            sluice_functions 3\n";
        let seen = only_tenant(text, "acme");
        assert!(seen.contains("tenant=\"acme\",function=\"f\",kind=\"sync\",outcome=\"ok\"} 3"));
        assert!(seen.contains("sluice_invocation_run_seconds_bucket{tenant=\"acme\""));
        assert!(!seen.contains("acme-2"), "a tenant whose name starts with another's is another tenant");
        assert!(!seen.contains("beta"));
        assert!(!seen.contains("sluice_functions"), "node-wide series add up every tenant's work");
        assert!(seen.starts_with("# TYPE"));
    }

    #[tokio::test]
    async fn the_open_listener_serves_at_most_its_bound_of_connections() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_bounded(listener, 2, |_req| async { Response::new(full("ok")) }));
        // Two idle connections hold both places.
        let idle = [
            tokio::net::TcpStream::connect(addr).await.unwrap(),
            tokio::net::TcpStream::connect(addr).await.unwrap(),
        ];
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf)).await.unwrap();
        assert!(matches!(n, Ok(0) | Err(_)), "a third connection is closed at once: {n:?}");
        // A place given back serves the next connection.
        drop(idle);
        let next = loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
            if !answer.is_empty() {
                break answer;
            }
        };
        let text = String::from_utf8_lossy(&next).into_owned();
        assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("ok"), "{text}");
    }
}
