//! Traces: OpenTelemetry spans exported over OTLP/HTTP when `serve --otlp-endpoint` installs an
//! exporter, and W3C trace context (`traceparent`, `tracestate`) carried from a caller through
//! the queue to the guest and on to its outbound requests, always.
//!
//! The spans of one call, each with the invocation id as `sluice.invocation_id`:
//! - `gateway` (server): the HTTP request at the node, from its head to the end of the guest (a
//!   sync call) or to the 202 (an async one); the child of the caller's `traceparent`.
//! - `queue wait` (internal, async only): from when the call became runnable to its start, one
//!   per attempt.
//! - `run` (internal): the guest, from instantiation to its end, one per attempt.
//! - one client span per outbound request the guest makes.
//!
//! What the guest sees: its request's `traceparent` names its `run` span, so a guest that makes
//! spans of its own nests them under the run. An outbound request the guest sends without a
//! `traceparent` of its own gets the one of its client span (or, with tracing off, the caller's,
//! passed on unchanged); one with its own keeps it. An async call's trace context is stored with
//! its request (the gateway span's), so its run continues the caller's trace on whichever node
//! leases it.
//!
//! Off (no exporter installed), nothing here allocates or takes a lock: [`enabled`] is one load.

use std::sync::OnceLock;
use std::time::SystemTime;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use sluice_core::{Mode, SluiceError};

pub use opentelemetry::Context as TraceContext;

/// The attribute every span of a call carries.
pub const INVOCATION_ID: &str = "sluice.invocation_id";

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// The installed exporter: [`Exporter::shutdown`] sends what is still buffered.
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Exports the spans still buffered (bounded by the SDK's export timeout) and stops.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "flushing the last spans to the OTLP endpoint failed");
        }
    }
}

/// Installs the process's span exporter: OTLP over HTTP (protobuf) to `endpoint`, the
/// collector's base URL (`http://collector:4318`; `/v1/traces` is added unless the URL has a
/// path of its own). Spans are batched on the SDK's own thread; its standard variables
/// (`OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_TRACES_SAMPLER`, ...) apply. The
/// default sampler follows the caller's sampled flag and samples every call without one.
pub fn install(endpoint: &str, node_id: &str) -> anyhow::Result<Exporter> {
    let url = traces_url(endpoint)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(url)
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("sluice")
        .with_attribute(KeyValue::new("service.instance.id", node_id.to_string()))
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
    let tracer = provider.tracer("sluice");
    TRACER.set(tracer).map_err(|_| anyhow::anyhow!("a span exporter is already installed"))?;
    Ok(Exporter { provider })
}

/// `endpoint` checked and with the traces path: the exporter takes a programmatic endpoint as
/// the full URL.
fn traces_url(endpoint: &str) -> anyhow::Result<String> {
    let uri: http::Uri =
        endpoint.parse().map_err(|e| anyhow::anyhow!("--otlp-endpoint {endpoint:?}: {e}"))?;
    anyhow::ensure!(
        uri.scheme_str() == Some("http") && uri.host().is_some(),
        "--otlp-endpoint must be an http:// URL of an OTLP/HTTP receiver (e.g. http://127.0.0.1:4318), \
         got {endpoint:?}"
    );
    Ok(match uri.path() {
        "" | "/" => format!("{}/v1/traces", endpoint.trim_end_matches('/')),
        _ => endpoint.to_string(),
    })
}

/// Whether spans are made at all.
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}

/// The trace context a caller sent in `headers` (an empty context without a valid one).
fn extract(headers: &HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// The trace context stored with a queued request's headers.
pub fn stored_parent(headers: &[(String, Vec<u8>)]) -> Option<Context> {
    enabled().then(|| TraceContextPropagator::new().extract(&StoredHeaders(headers)))
}

struct StoredHeaders<'a>(&'a [(String, Vec<u8>)]);

impl Extractor for StoredHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// Writes `cx`'s span as the `traceparent` (and `tracestate`) of `headers`, replacing any.
fn inject(cx: &Context, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
}

/// The `gateway` span of one request at the node. Dropped without [`GatewaySpan::end`] (a
/// cancelled request), it ends as it is.
pub struct GatewaySpan {
    cx: Context,
}

impl GatewaySpan {
    /// Starts the span of a `/fn/...` request, the child of the caller's `traceparent`; `None`
    /// when tracing is off.
    pub fn start(
        method: &http::Method,
        path: &str,
        headers: &HeaderMap,
        invocation_id: &str,
    ) -> Option<Self> {
        let tracer = tracer()?;
        let parent = extract(headers);
        let span = tracer
            .span_builder(format!("{method} /fn/{{tenant}}/{{function}}"))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new(INVOCATION_ID, invocation_id.to_string()),
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("http.route", "/fn/{tenant}/{function}/{*path}"),
                KeyValue::new("url.path", path.to_string()),
            ])
            .start_with_context(tracer, &parent);
        Some(Self { cx: parent.with_span(span) })
    }

    /// Names the function called, once it is known.
    pub fn function(&self, tenant: &str, function: &str, version: i64, mode: Mode) {
        self.cx.span().set_attributes([
            KeyValue::new("sluice.tenant", tenant.to_string()),
            KeyValue::new("sluice.function", function.to_string()),
            KeyValue::new("sluice.version", version),
            KeyValue::new("sluice.kind", mode.as_str()),
        ]);
    }

    /// The context the call's later spans (its run, or its queue wait) are children of.
    pub fn context(&self) -> Context {
        self.cx.clone()
    }

    /// Writes this span as the `traceparent` of `headers`: what an async call stores with its
    /// request, so that its run, later and perhaps on another node, continues this trace.
    pub fn inject(&self, headers: &mut HeaderMap) {
        inject(&self.cx, headers);
    }

    /// Ends the span with the response status (and the error that made it, if any).
    pub fn end(self, status: u16, error: Option<&SluiceError>) {
        end(&self.cx, Some(status), error);
    }
}

/// Ends the span of `cx`: an error status for a 5xx or a sluice error of the platform, with the
/// error's kind as `error.type`.
fn end(cx: &Context, status: Option<u16>, error: Option<&SluiceError>) {
    let span = cx.span();
    if let Some(status) = status {
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
    }
    if let Some(e) = error {
        span.set_attribute(KeyValue::new("error.type", e.kind.as_str()));
        span.set_status(Status::error(e.message.clone()));
    } else if status.is_some_and(|s| s >= 500) {
        span.set_attribute(KeyValue::new("error.type", status.unwrap_or_default().to_string()));
        span.set_status(Status::error(""));
    }
    span.end();
}

/// An async attempt's `queue wait` span, made when the attempt starts: from `since` (when the
/// call became runnable) to now.
pub fn queue_wait(parent: &Context, invocation_id: &str, attempt: u32, since: SystemTime) {
    let Some(tracer) = tracer() else { return };
    let span = tracer
        .span_builder("queue wait")
        .with_kind(SpanKind::Internal)
        .with_start_time(since)
        .with_attributes([
            KeyValue::new(INVOCATION_ID, invocation_id.to_string()),
            KeyValue::new("sluice.attempt", i64::from(attempt)),
        ])
        .start_with_context(tracer, parent);
    let cx = parent.with_span(span);
    cx.span().end();
}

/// The `run` span of one attempt: a guest from its instantiation to its end.
pub(crate) struct RunSpan {
    cx: Context,
}

impl RunSpan {
    pub(crate) fn start(
        parent: &Context,
        invocation_id: &str,
        function: &str,
        attempt: Option<u32>,
    ) -> Option<Self> {
        let tracer = tracer()?;
        let mut attributes = vec![
            KeyValue::new(INVOCATION_ID, invocation_id.to_string()),
            KeyValue::new("sluice.function", function.to_string()),
        ];
        if let Some(attempt) = attempt {
            attributes.push(KeyValue::new("sluice.attempt", i64::from(attempt)));
        }
        let span = tracer
            .span_builder("run")
            .with_kind(SpanKind::Internal)
            .with_attributes(attributes)
            .start_with_context(tracer, parent);
        Some(Self { cx: parent.with_span(span) })
    }

    pub(crate) fn end(self, status: Option<u16>, error: Option<&SluiceError>, cpu_us: u64) {
        self.cx
            .span()
            .set_attribute(KeyValue::new("sluice.cpu_us", i64::try_from(cpu_us).unwrap_or(i64::MAX)));
        end(&self.cx, status, error);
    }
}

/// What an invocation passes on in its guest's outbound requests.
#[derive(Clone, Default)]
pub(crate) struct Propagation {
    /// With tracing on: the run span, parent of each request's client span.
    run: Option<Context>,
    /// With tracing off: the caller's headers, passed on unchanged.
    traceparent: Option<HeaderValue>,
    tracestate: Option<HeaderValue>,
}

impl Propagation {
    /// Gives the guest's request its run span as `traceparent` (with tracing on), and keeps what
    /// its outbound requests will carry.
    pub(crate) fn for_guest(run: Option<&RunSpan>, headers: &mut HeaderMap) -> Self {
        match run {
            Some(run) => {
                inject(&run.cx, headers);
                Self { run: Some(run.cx.clone()), ..Self::default() }
            }
            None => Self {
                run: None,
                traceparent: headers.get(TRACEPARENT).cloned(),
                tracestate: headers.get(TRACESTATE).cloned(),
            },
        }
    }

    /// Starts the client span of one outbound request and writes it as the request's
    /// `traceparent`, unless the guest sent one of its own; with tracing off, passes the
    /// caller's on. The span ends when the returned value is ended or dropped.
    pub(crate) fn outbound(
        &self,
        method: &http::Method,
        uri: &http::Uri,
        headers: &mut HeaderMap,
    ) -> Option<ClientSpan> {
        let guest_set = headers.contains_key(TRACEPARENT);
        let Some((run, tracer)) = self.run.as_ref().zip(tracer()) else {
            if !guest_set && let Some(tp) = &self.traceparent {
                headers.insert(TRACEPARENT, tp.clone());
                if let Some(ts) = &self.tracestate {
                    headers.insert(TRACESTATE, ts.clone());
                }
            }
            return None;
        };
        let mut attributes = vec![
            KeyValue::new("http.request.method", method.to_string()),
            KeyValue::new("url.full", uri.to_string()),
        ];
        if let Some(host) = uri.host() {
            attributes.push(KeyValue::new("server.address", host.to_string()));
        }
        if let Some(port) = uri.port_u16() {
            attributes.push(KeyValue::new("server.port", i64::from(port)));
        }
        let span = tracer
            .span_builder(method.to_string())
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(tracer, run);
        let cx = run.with_span(span);
        if !guest_set {
            inject(&cx, headers);
        }
        Some(ClientSpan { cx })
    }
}

/// The span of one outbound request.
pub(crate) struct ClientSpan {
    cx: Context,
}

impl ClientSpan {
    pub(crate) fn end(self, status: Option<u16>, failure: Option<&str>) {
        let span = self.cx.span();
        if let Some(status) = status {
            span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
            if status >= 500 {
                span.set_attribute(KeyValue::new("error.type", status.to_string()));
                span.set_status(Status::error(""));
            }
        }
        if let Some(failure) = failure {
            span.set_attribute(KeyValue::new("error.type", "request_failed"));
            span.set_status(Status::error(failure.to_string()));
        }
        span.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_gets_the_traces_path_unless_it_has_one() {
        assert_eq!(traces_url("http://127.0.0.1:4318").unwrap(), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/").unwrap(), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/otlp/v1/traces").unwrap(), "http://c:4318/otlp/v1/traces");
        assert!(traces_url("https://c:4318").unwrap_err().to_string().contains("http://"));
        assert!(traces_url("127.0.0.1:4318").is_err());
        assert!(traces_url("not a url").is_err());
    }

    #[test]
    fn with_tracing_off_the_callers_context_is_passed_on_unless_the_guest_sent_its_own() {
        let caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut incoming = HeaderMap::new();
        incoming.insert(TRACEPARENT, HeaderValue::from_static(caller));
        incoming.insert(TRACESTATE, HeaderValue::from_static("vendor=x"));
        let propagation = Propagation::for_guest(None, &mut incoming);
        assert_eq!(incoming[TRACEPARENT], caller, "the guest sees the caller's context");

        let uri: http::Uri = "http://api.example.com/x".parse().unwrap();
        let mut out = HeaderMap::new();
        assert!(propagation.outbound(&http::Method::GET, &uri, &mut out).is_none());
        assert_eq!(out[TRACEPARENT], caller);
        assert_eq!(out[TRACESTATE], "vendor=x");

        let own = "00-11111111111111111111111111111111-2222222222222222-01";
        let mut out = HeaderMap::new();
        out.insert(TRACEPARENT, HeaderValue::from_static(own));
        propagation.outbound(&http::Method::GET, &uri, &mut out);
        assert_eq!(out[TRACEPARENT], own, "the guest's own context wins");

        let mut nothing = HeaderMap::new();
        let propagation = Propagation::for_guest(None, &mut HeaderMap::new());
        propagation.outbound(&http::Method::GET, &uri, &mut nothing);
        assert!(nothing.is_empty(), "no context is made up");
    }

    #[test]
    fn a_stored_request_gives_back_its_context() {
        let stored = vec![(
            "TraceParent".to_string(),
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_vec(),
        )];
        let cx = TraceContextPropagator::new().extract(&StoredHeaders(&stored));
        let span = cx.span();
        let sc = span.span_context();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(sc.trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
    }
}
