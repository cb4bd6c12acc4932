//! `ANY /fn/{tenant}/{function}/{*path}`: the call path, in the order its checks run.
//!
//! 1. the declared body size (CL+TE smuggling and the header limits were refused in `server`),
//! 2. function lookup and version choice (in memory: `/fn/{t}/{f}/` runs what the alias `latest`
//!    names, `{f}@prod` the alias `prod`, `{f}@3` version 3; a split alias picks by the
//!    `sluice-routing-key` header's hash, or at random), then authentication: a private function
//!    needs an `invoke` key of its tenant; an unknown function and another tenant's function both
//!    answer 404, and a caller without a valid key learns nothing (401) about what exists. Only
//!    then may a version no alias names be read from the store, and a `sluice-version` header
//!    (keys of the tenant only) pin the version,
//! 3. admission: the anonymous callers' bucket (a public function called without a key of its
//!    tenant), the tenant's and the function's token buckets (429), then — sync only — the
//!    function's concurrency cap (429) and the node's load-shedding bound (503). No work is done
//!    for a refused call,
//! 4. async (`Prefer: respond-async`): the tenant's queued quotas (429, counted in memory), then
//!    the whole request is stored durably and answered 202;
//!    sync: the guest request is built (path below the function, `sluice-invocation-id` added by
//!    the runtime,
//!    the platform's credentials removed, see `credentials`), the body bounded while it
//!    streams, and the runtime runs it in a fresh instance. The response head is returned as soon
//!    as the guest sets it; the outcome is recorded off the request path.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use sluice_core::{Clock, ErrorKind, Mode, Scope, SluiceError, SystemClock};
use sluice_runtime::metrics::CallOutcome;
use sluice_runtime::trace::GatewaySpan;
use sluice_runtime::{Call, Lane, Outcome, TraceParent};
use sluice_store::{
    ANONYMOUS_CALLER, Criticality, Enqueued, IDEMPOTENCY_WINDOW_MS, IdempotencyKey, InvocationStatus,
    NewInvocation, StoredRequest, SyncRecord,
};

use crate::admission::Slot;
use crate::body::{Body, BoxError, Limited, collect_limited, full, too_large};
use crate::credentials::strip_platform_credentials;
use crate::error::{INVOCATION_ID, error_response, store_error};
use crate::node::{Deployed, Node, Principal, bearer};

/// Longest accepted `Idempotency-Key`.
const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;

/// The request header that pins a call to a version (for testing a version before an alias names
/// it); only keys of the function's tenant may send it.
pub const VERSION_HEADER: &str = "sluice-version";
/// The request header whose hash picks the version of a split alias: one caller, one version.
pub const ROUTING_KEY_HEADER: &str = "sluice-routing-key";

/// What the function segment of a call path addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// `f`: the alias `latest`.
    Latest,
    /// `f@prod`.
    Alias(&'a str),
    /// `f@3`.
    Version(i64),
}

/// Splits the function segment `f`, `f@prod` or `f@3` into the function and its target. `@` is
/// a plain path character (RFC 3986 `pchar`), so proxies and CDNs pass it as it is.
pub fn split_target(segment: &str) -> Result<(&str, Target<'_>), SluiceError> {
    let Some((function, target)) = segment.split_once('@') else {
        return Ok((segment, Target::Latest));
    };
    if target.starts_with(|c: char| c.is_ascii_digit()) {
        let version = target.parse().map_err(|_| {
            SluiceError::not_found(format!("{target:?} is neither a version number nor an alias name"))
        })?;
        return Ok((function, Target::Version(version)));
    }
    Ok((function, if target == sluice_core::alias::LATEST { Target::Latest } else { Target::Alias(target) }))
}

/// Splits `/fn/{tenant}/{function}/{rest}` into its parts; `rest` keeps its leading slash.
pub fn split_fn_path(path: &str) -> Option<(&str, &str, &str)> {
    let rest = path.strip_prefix("/fn/")?;
    let (tenant, rest) = rest.split_once('/')?;
    let (function, sub) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    (!tenant.is_empty() && !function.is_empty()).then_some((tenant, function, sub))
}

pub async fn handle(node: &Arc<Node>, req: Request<Incoming>) -> Response<Body> {
    let invocation_id = sluice_core::ids::invocation_id();
    let mut follow = Follow::start(&req, &invocation_id);
    let mut version = None;
    match call(node, req, &invocation_id, &mut follow, &mut version).await {
        Ok(mut res) => {
            // A sync call's follower went with it, to end when the guest does.
            follow.end(&invocation_id, res.status().as_u16(), None, None);
            if let Some(v) = version {
                res.headers_mut().insert(VERSION_HEADER, HeaderValue::from(v));
            }
            res
        }
        Err(e) => {
            crate::metrics::refused(e.kind);
            follow.end(&invocation_id, e.kind.status().as_u16(), Some(&e), None);
            let mut res = error_response(&e, Some(&invocation_id));
            // A call that failed in its version (a trap, a timeout) says which version that was.
            if let Some(v) = version {
                res.headers_mut().insert(VERSION_HEADER, HeaderValue::from(v));
            }
            res
        }
    }
}

/// What follows one call to its end, each part only when it is switched on: its `gateway`
/// span (`serve --otlp-endpoint`) and its access log line (`serve --access-log`: one line per
/// call at the `sluice::access` target, with its invocation id).
#[derive(Default)]
struct Follow {
    span: Option<GatewaySpan>,
    access: Option<Access>,
}

struct Access {
    method: http::Method,
    path: String,
    arrived: Instant,
    kind: &'static str,
    version: Option<i64>,
}

impl Follow {
    fn start(req: &Request<Incoming>, invocation_id: &str) -> Self {
        let span = GatewaySpan::start(req.method(), req.uri().path(), req.headers(), invocation_id);
        let access = tracing::enabled!(target: "sluice::access", tracing::Level::INFO).then(|| Access {
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            arrived: Instant::now(),
            kind: "",
            version: None,
        });
        Self { span, access }
    }

    fn function(&mut self, tenant: &str, function: &str, version: i64, mode: Mode) {
        if let Some(span) = &self.span {
            span.function(tenant, function, version, mode);
        }
        if let Some(access) = &mut self.access {
            access.kind = mode.as_str();
            access.version = Some(version);
        }
    }

    /// Moves the parts out, for a call that ends later than its response head.
    fn take(&mut self) -> Self {
        std::mem::take(self)
    }

    fn end(self, invocation_id: &str, status: u16, error: Option<&SluiceError>, cpu_us: Option<u64>) {
        if let Some(span) = self.span {
            span.end(status, error);
        }
        if let Some(a) = self.access {
            tracing::info!(
                target: "sluice::access",
                %invocation_id,
                method = %a.method,
                path = %a.path,
                kind = %a.kind,
                version = a.version,
                status,
                error = error.map(|e| tracing::field::display(e.kind.as_str())),
                duration_ms = a.arrived.elapsed().as_secs_f64() * 1000.0,
                cpu_us,
                "call"
            );
        }
    }
}

async fn call(
    node: &Arc<Node>,
    req: Request<Incoming>,
    invocation_id: &str,
    follow: &mut Follow,
    executed: &mut Option<i64>,
) -> Result<Response<Body>, SluiceError> {
    let arrived = Instant::now();
    let limits = &node.config.limits;
    let headers = req.headers();
    let is_async = prefers_async(headers);
    let body_max = if is_async { limits.async_body_bytes_max } else { limits.sync_body_bytes_max };
    if let Some(len) = content_length(headers)?
        && len > body_max
    {
        return Err(too_large(body_max));
    }

    let (tenant, segment, sub) = split_fn_path(req.uri().path())
        .ok_or_else(|| SluiceError::not_found("use /fn/{tenant}/{function}/{path}"))?;
    let (function, target) = split_target(segment)?;
    let served = node.served(tenant, function);
    // In memory: the alias's choice, or a version by number this node serves. A version no alias
    // names is read from the store below, after the caller is authenticated.
    let chosen = served.as_deref().and_then(|s| match target {
        Target::Latest => s.alias(sluice_core::alias::LATEST).map(|a| a.choose(routing_key(headers)).clone()),
        Target::Alias(name) => s.alias(name).map(|a| a.choose(routing_key(headers)).clone()),
        Target::Version(n) => s.versions.get(&n).cloned(),
    });
    // Whether a key is needed is the chosen version's to say; for a version still to be read, the
    // function's `latest`'s.
    let public = match (&chosen, &served) {
        (Some(d), _) => d.config.public,
        (None, Some(s)) => s.latest().is_some_and(|d| d.config.public),
        (None, None) => false,
    };
    let principal = if public {
        None
    } else {
        let key = bearer(headers).ok_or_else(|| {
            SluiceError::new(ErrorKind::Unauthorized, "missing API key: send Authorization: Bearer <key>")
        })?;
        let principal = node
            .principal_for_key(key)
            .ok_or_else(|| SluiceError::new(ErrorKind::Unauthorized, "invalid or revoked API key"))?;
        if served.is_none() || !principal.sees(tenant) {
            return Err(no_function(tenant, function));
        }
        if !principal.may(tenant, Scope::Invoke) {
            return Err(SluiceError::new(ErrorKind::Forbidden, "this key may not invoke functions"));
        }
        if let Some(only) = principal.alias.as_deref() {
            let addressed = match target {
                Target::Latest => sluice_core::alias::LATEST,
                Target::Alias(name) => name,
                Target::Version(_) => "",
            };
            if addressed != only || headers.contains_key(VERSION_HEADER) {
                return Err(SluiceError::new(
                    ErrorKind::Forbidden,
                    format!("this key may only call the alias {only}: /fn/{tenant}/{function}@{only}/"),
                ));
            }
        }
        Some(principal)
    };
    let served = served.ok_or_else(|| no_function(tenant, function))?;
    let deployed = match (chosen, target) {
        (Some(d), _) => d,
        (None, Target::Version(n)) => node.version(&served, tenant, function, n).await?.ok_or_else(|| {
            SluiceError::not_found(format!("no version {n} of function {function} in tenant {tenant}"))
        })?,
        (None, Target::Alias(name)) => {
            return Err(SluiceError::not_found(format!(
                "no alias {name} of function {function} in tenant {tenant}"
            )));
        }
        (None, Target::Latest) => return Err(no_function(tenant, function)),
    };
    let deployed = match pinned(headers)? {
        None => deployed,
        Some(n) => {
            // Pinning picks a version no alias may name yet: for the tenant's own testing, never
            // for anonymous callers or other tenants' keys of a public function, nor for a key
            // limited to one alias (refused above on a private function; here on a public one).
            let may_pin = |p: &Principal| p.may(tenant, Scope::Invoke) && p.alias.is_none();
            let own = principal.as_deref().is_some_and(may_pin)
                || bearer(headers).and_then(|k| node.principal_for_key(k)).is_some_and(|p| may_pin(&p));
            if !own {
                return Err(SluiceError::new(
                    ErrorKind::Forbidden,
                    format!(
                        "header {VERSION_HEADER} is only for keys of tenant {tenant} with the invoke \
                         scope; call an alias (/fn/{tenant}/{function}@ALIAS/) instead"
                    ),
                ));
            }
            node.version(&served, tenant, function, n).await?.ok_or_else(|| {
                SluiceError::not_found(format!("no version {n} of function {function} in tenant {tenant}"))
            })?
        }
    };
    *executed = Some(deployed.record.version);
    follow.function(
        tenant,
        function,
        deployed.record.version,
        if is_async { Mode::Async } else { Mode::Sync },
    );

    if public {
        node.admit_anonymous(tenant, headers)?;
    }
    node.admission.tenant(tenant)?;
    deployed.admission.check_rate(function)?;
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{sub}?{q}"),
        None => sub.to_string(),
    };
    if is_async {
        let principal = principal.as_deref();
        let span = follow.span.as_ref();
        return enqueue(node, &deployed, req, path_and_query, public, principal, invocation_id, span).await;
    }
    // A downstream the function calls is at its adaptive limit: another call would only wait
    // for it (or add to its overload). Async calls wait in the queue instead.
    if node.runtime.downstreams().saturated(tenant, function) {
        return Err(SluiceError::new(
            ErrorKind::Overloaded,
            format!(
                "a downstream service of {tenant}/{function} is saturated (its concurrency limit is \
                 reached); retry later, or call asynchronously to wait in the queue"
            ),
        )
        .retry_after(1));
    }
    let function_slot = deployed.admission.acquire(function)?;
    let node_slot = node.admission.shed(&deployed.record.tenant)?;
    // A hot function's code is in the cache; a cold one's is mapped from its artifact (or, after
    // an engine change, compiled) here, once for all the calls that wait for it.
    let (prepared, _) = node.code(&deployed.code_key).await?;
    let timeout = Duration::from_millis(deployed.config.timeout_ms);
    // A version whose instances alive at once are bounded (a heavy component, or its own
    // `instances_max`) waits here for room, within its timeout.
    let instance = node
        .runtime
        .instance_permit(&deployed.instance_key, &prepared, &deployed.config, Instant::now() + timeout)
        .await?;

    let (mut parts, body) = req.into_parts();
    parts.uri =
        Uri::try_from(path_and_query).map_err(|e| SluiceError::bad_request(format!("bad path: {e}")))?;
    strip_platform_credentials(&mut parts.headers, public);
    let (body, body_exceeded) = Limited::new(body, limits.sync_body_bytes_max);

    let follow = follow.take();
    let trace = follow.span.as_ref().map(|s| TraceParent { cx: s.context(), attempt: None });
    let call = Call {
        invocation_id: invocation_id.to_string(),
        config: deployed.config.clone(),
        timeout,
        lane: Lane::Sync,
        group: deployed.tenant_group.clone(),
        function: deployed.function_name.clone(),
        on_done: Some(recorder(node, &deployed, (function_slot, node_slot), arrived, follow)),
        trace,
        reuse: deployed.reuse.clone(),
        instance,
    };
    let running = node.runtime.invoke(&prepared, call, Request::from_parts(parts, body));
    match running.response().await {
        Ok((res, _done)) => {
            let mut res = res.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync());
            res.headers_mut().insert(INVOCATION_ID, header_value(invocation_id));
            Ok(res)
        }
        Err(_) if body_exceeded.load(Ordering::Relaxed) => Err(too_large(limits.sync_body_bytes_max)),
        Err(outcome) => {
            let mut err = outcome.error.unwrap_or_else(|| SluiceError::internal("the invocation failed"));
            if err.kind.source() == sluice_core::ErrorSource::Guest {
                err.message = format!("{}; logs: GET /v1/invocations/{invocation_id}/logs", err.message);
            }
            Err(err)
        }
    }
}

/// The `sluice-routing-key` of a call, if it sent one.
fn routing_key(headers: &HeaderMap) -> Option<&[u8]> {
    headers.get(ROUTING_KEY_HEADER).map(HeaderValue::as_bytes)
}

/// The version a `sluice-version` header pins, if it sent one.
fn pinned(headers: &HeaderMap) -> Result<Option<i64>, SluiceError> {
    match headers.get(VERSION_HEADER) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .filter(|n| *n >= 1)
            .map(Some)
            .ok_or_else(|| header_error(VERSION_HEADER, "must be a version number (1, 2, ...)")),
    }
}

fn no_function(tenant: &str, function: &str) -> SluiceError {
    SluiceError::not_found(format!("no function {function} in tenant {tenant}"))
}

/// RFC 7240: `Prefer` may list several preferences, separated by commas.
fn prefers_async(headers: &HeaderMap) -> bool {
    headers.get_all("prefer").iter().filter_map(|v| v.to_str().ok()).any(|v| {
        v.split(',').any(|p| p.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("respond-async"))
    })
}

/// Headers that describe one hop, not the request: not stored for a later replay.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
    "proxy-authorization",
    "proxy-connection",
    "content-length",
];

/// The async path: store the whole request durably, then answer 202. Nothing is acknowledged
/// before the store says the commit is on disk. `principal` is the key a private function was
/// called with.
#[allow(clippy::too_many_arguments)]
async fn enqueue(
    node: &Arc<Node>,
    deployed: &Arc<Deployed>,
    req: Request<Incoming>,
    path_and_query: String,
    public: bool,
    principal: Option<&Principal>,
    invocation_id: &str,
    span: Option<&GatewaySpan>,
) -> Result<Response<Body>, SluiceError> {
    // Held while the body is read (up to a whole async body in memory): a client that trickles
    // its body in holds a slot of its function's tenant's share, not one of the commit's.
    let tenant = deployed.record.tenant.as_str();
    let reading = node.async_reads.admit(tenant, || format!("tenant {tenant}"))?;
    let now = SystemClock.now_ms();
    let headers = req.headers();
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let key = v.to_str().map_err(|_| header_error("Idempotency-Key", "must be visible ASCII"))?;
            if key.is_empty() || key.len() > IDEMPOTENCY_KEY_BYTES_MAX {
                return Err(header_error(
                    "Idempotency-Key",
                    &format!("must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} bytes, got {}", key.len()),
                ));
            }
            Some(IdempotencyKey { key: key.to_string(), caller: caller(node, headers, principal) })
        }
    };
    let start_after = time_header(headers, "sluice-start-after")?;
    let deadline = time_header(headers, "sluice-deadline")?;
    if let (Some(s), Some(d)) = (start_after, deadline)
        && d < s
    {
        return Err(header_error("sluice-deadline", "is before sluice-start-after"));
    }
    let criticality = match headers.get("sluice-criticality") {
        None => Criticality::Normal,
        Some(v) => v.to_str().ok().and_then(|s| Criticality::parse(s.trim())).ok_or_else(|| {
            let words = sluice_core::vocab::listed(Criticality::WORDS);
            header_error("sluice-criticality", &format!("must be {words}"))
        })?,
    };

    let (mut parts, body) = req.into_parts();
    strip_platform_credentials(&mut parts.headers, public);
    if let Some(span) = span {
        // The run continues this trace, later and perhaps on another node.
        span.inject(&mut parts.headers);
    }
    let limits = &node.config.limits;
    let body = collect_limited(body, limits.async_body_bytes_max, limits.body_read_timeout).await?;
    // Held until the 202 (or the error) is ready: the body waits in memory for the group commit.
    let _slot = node.async_enqueues.admit(tenant, || format!("tenant {tenant}"))?;
    drop(reading);
    let stored_headers = parts
        .headers
        .iter()
        .filter(|(k, _)| !HOP_BY_HOP.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
        .collect();
    let inv = NewInvocation {
        id: invocation_id.to_string(),
        tenant: deployed.record.tenant.clone(),
        function: deployed.record.function.clone(),
        version: deployed.record.version,
        request: StoredRequest {
            method: parts.method.to_string(),
            path_and_query,
            headers: stored_headers,
            body: body.to_vec(),
        },
        idempotency_key,
        criticality,
        run_after: start_after.unwrap_or(now),
        // Without its own deadline a call gets the function's default start window, if any.
        deadline: deadline.or_else(|| {
            let window = i64::try_from(deployed.config.start_window_ms?).ok()?;
            Some(start_after.unwrap_or(now).saturating_add(window))
        }),
        attempts_max: deployed.config.attempts_max,
        max_age_ms: deployed.config.max_age_ms,
        in_order: None,
    };
    // The tenant's queued quotas, counted in memory (no store query); given back unless stored.
    let reserved = node.quotas.reserve(&inv.tenant, inv.request.quota_bytes())?;
    let (id, replay) = match node.store.enqueue(&inv).await.map_err(store_error)? {
        Enqueued::Created => {
            reserved.keep();
            node.notify_scheduler();
            (inv.id, false)
        }
        Enqueued::Existing(first) => (first, true),
        Enqueued::KeyReused { differs, .. } => {
            let key = inv.idempotency_key.map(|k| k.key).unwrap_or_default();
            return Err(SluiceError::new(
                ErrorKind::IdempotencyKeyReused,
                format!(
                    "Idempotency-Key {key:?} was already used in the last {} h for a request with \
                     a different {}; a key names one request: send a new key for a new request",
                    IDEMPOTENCY_WINDOW_MS / 3_600_000,
                    listed(&differs),
                ),
            ));
        }
    };
    let location = format!("/v1/invocations/{id}");
    let body = serde_json::json!({ "id": id, "status": InvocationStatus::Queued, "location": location });
    let mut res = Response::new(full(body.to_string()));
    *res.status_mut() = StatusCode::ACCEPTED;
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::LOCATION, header_value(&location));
    h.insert(INVOCATION_ID, header_value(&id));
    h.insert("preference-applied", HeaderValue::from_static("respond-async"));
    if replay {
        h.insert("sluice-idempotent-replay", HeaderValue::from_static("true"));
    }
    Ok(res)
}

/// Whom an idempotency key belongs to: the caller's API key, or, on a public function called
/// without a valid one, every anonymous caller.
fn caller(node: &Node, headers: &HeaderMap, principal: Option<&Principal>) -> String {
    match principal {
        Some(principal) => principal.key_id.clone(),
        None => bearer(headers)
            .and_then(|key| node.principal_for_key(key))
            .map_or_else(|| ANONYMOUS_CALLER.to_string(), |principal| principal.key_id.clone()),
    }
}

/// `["method", "body"]` as "method and body".
fn listed(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => (*one).to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

fn header_error(name: &str, problem: &str) -> SluiceError {
    SluiceError::bad_request(format!("header {name} {problem}"))
}

fn time_header(headers: &HeaderMap, name: &str) -> Result<Option<i64>, SluiceError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(sluice_core::parse_rfc3339)
            .map(Some)
            .ok_or_else(|| header_error(name, "is not an RFC 3339 time (e.g. 2026-11-21T20:00:00Z)")),
    }
}

/// Hands the outcome to the recorder when there is something to look at later (log lines or a
/// failure); a silent success is only counted, which keeps recording off the hot path. The
/// admission slots live in the closure, so they are given back when the guest is done — after
/// a streamed body too.
fn recorder(
    node: &Arc<Node>,
    deployed: &Arc<Deployed>,
    slots: (Option<Slot>, sluice_core::share::SharedSlot),
    arrived: Instant,
    follow: Follow,
) -> sluice_runtime::OnDone {
    let recorder = node.recorder.clone();
    let deployed = deployed.clone();
    let started = Instant::now();
    Box::new(move |o: &Outcome| {
        drop(slots);
        let outcome = CallOutcome::of(o.error.as_ref().map(|e| e.kind), o.status_code);
        deployed.metrics.finished(Mode::Sync, outcome, arrived.elapsed(), started.elapsed(), o.cpu_us);
        deployed.outcomes.finished(outcome);
        let status = o.status_code.or(o.error.as_ref().map(|e| e.kind.status().as_u16())).unwrap_or(500);
        follow.end(&o.invocation_id, status, o.error.as_ref(), Some(o.cpu_us));
        if o.error.is_none() && o.logs.is_empty() {
            return;
        }
        recorder.record(SyncRecord {
            id: o.invocation_id.clone(),
            tenant: deployed.record.tenant.clone(),
            function: deployed.record.function.clone(),
            version: deployed.record.version,
            status: if o.error.is_some() { InvocationStatus::Dead } else { InvocationStatus::Succeeded },
            status_code: o.status_code.or(o.error.as_ref().map(|e| e.kind.status().as_u16())),
            error_kind: o.error.as_ref().map(|e| e.kind.as_str().to_string()),
            started_at: o.started_at,
            finished_at: o.finished_at,
            cpu_us: o.cpu_us,
            logs: o.logs.clone(),
        });
    })
}

fn content_length(headers: &http::HeaderMap) -> Result<Option<u64>, SluiceError> {
    match headers.get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| SluiceError::bad_request("invalid Content-Length")),
    }
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).expect("ids are ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fn_paths() {
        assert_eq!(split_fn_path("/fn/default/hello"), Some(("default", "hello", "/")));
        assert_eq!(split_fn_path("/fn/default/hello/"), Some(("default", "hello", "/")));
        assert_eq!(split_fn_path("/fn/t/f/a/b"), Some(("t", "f", "/a/b")));
        assert_eq!(split_fn_path("/fn/t"), None);
        assert_eq!(split_fn_path("/fn//f"), None);
        assert_eq!(split_fn_path("/v1/x"), None);
    }

    #[test]
    fn function_segments_address_latest_an_alias_or_a_version() {
        assert_eq!(split_target("hello").unwrap(), ("hello", Target::Latest));
        assert_eq!(split_target("hello@latest").unwrap(), ("hello", Target::Latest));
        assert_eq!(split_target("hello@prod").unwrap(), ("hello", Target::Alias("prod")));
        assert_eq!(split_target("hello@3").unwrap(), ("hello", Target::Version(3)));
        assert_eq!(split_target("hello@3x").unwrap_err().kind, ErrorKind::NotFound);
        assert_eq!(split_target("hello@99999999999999999999").unwrap_err().kind, ErrorKind::NotFound);
        // An unknown alias is the registry's to refuse (404), with its name.
        assert_eq!(split_target("hello@").unwrap(), ("hello", Target::Alias("")));
    }

    #[test]
    fn prefer_header_lists() {
        let mut h = HeaderMap::new();
        assert!(!prefers_async(&h));
        h.insert("prefer", HeaderValue::from_static("return=minimal, respond-async; wait=10"));
        assert!(prefers_async(&h));
        h.insert("prefer", HeaderValue::from_static("respond-asynchronously"));
        assert!(!prefers_async(&h));
    }
}
