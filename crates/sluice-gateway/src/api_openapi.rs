//! The OpenAPI document of sluice's HTTP API, served at `GET /v1/openapi.json`.
//!
//! It is generated from the code: every `/v1` route is registered through its handler's
//! `#[utoipa::path]` (see `api::openapi_router`), and bodies are the handlers' own types. What no
//! handler annotation can say is added here, in one place: the `/fn` route (served by the invoke
//! path, not the router), the bearer security scheme, and the responses every route can give
//! because of the layers in front of it (header limits, authentication, the store).

use axum::Extension;
use axum::response::IntoResponse;
use http::{HeaderValue, header};
use serde::{Deserialize, Serialize};
use sluice_core::{Criticality, ErrorKind, InvocationStatus, LogStream, Mode, Scope};
use utoipa::ToSchema;
use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{ArrayBuilder, KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{InfoBuilder, OpenApi, Ref, RefOr};

/// Name of the security scheme in the document.
pub(crate) const BEARER: &str = "bearer";

/// The error body of every error sluice makes (DESIGN.md section 5). Documentation only: the
/// body itself is written by `SluiceError::to_json`; a test keeps the two in step.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    /// A stable code a program can switch on; also in the `sluice-error` header.
    #[schema(schema_with = error_code_schema)]
    pub code: String,
    /// What went wrong and what to do about it, for a person.
    pub message: String,
}

/// The answer to an async call (`Prefer: respond-async`): the call is durably queued.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct AsyncAccepted {
    pub id: String,
    /// `queued`.
    #[schema(schema_with = invocation_status_schema)]
    pub status: sluice_core::InvocationStatus,
    /// `/v1/invocations/{id}`: where to follow it.
    pub location: String,
}

/// Bytes passed as they are (a request body of any content).
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)] // a schema only
pub struct Binary(Vec<u8>);

/// The configuration of a function version. Omitted fields take their defaults. This is the
/// schema of `sluice_core::FunctionConfig`; a test checks that both have the same fields.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct FunctionConfigSchema {
    /// Linear memory one instance may grow to, in bytes (64 KiB to 1 GiB).
    #[schema(minimum = 65536, maximum = 1073741824)]
    pub memory_bytes: u64,
    /// Wall-clock limit of a synchronous call, in milliseconds (at most 15 minutes).
    #[schema(minimum = 1, maximum = 900000)]
    pub timeout_ms: u64,
    /// Wall-clock limit of one async attempt, in milliseconds (at most 15 minutes).
    #[schema(minimum = 1, maximum = 900000)]
    pub async_timeout_ms: u64,
    /// Environment variables the guest sees, in order, as `[name, value]` pairs.
    #[schema(schema_with = env_schema)]
    pub env: Vec<(String, String)>,
    /// Hosts (`name`, `name:port`, `[ipv6]`, `[ipv6]:port`) the guest may call over outbound
    /// HTTP; empty: none.
    #[schema(schema_with = outbound_schema)]
    pub allow_outbound: Vec<String>,
    /// A public function's `/fn` URL needs no API key.
    pub public: bool,
    /// Attempts of an async invocation before it is dead (1-100).
    #[schema(minimum = 1, maximum = 100)]
    pub attempts_max: u32,
    /// Age in milliseconds after which an async invocation is not retried any more.
    pub max_age_ms: u64,
    /// Token-bucket rate (calls per second); null: unlimited.
    #[schema(exclusive_minimum = 0)]
    pub rate_per_sec: Option<f64>,
    /// Token-bucket burst; null: the rate rounded up.
    #[schema(minimum = 1)]
    pub burst: Option<u32>,
    /// Calls of this function running at once on a node; null: bounded by the node only.
    #[schema(minimum = 1)]
    pub max_concurrency: Option<u32>,
    /// Async calls that start whatever the node's load (reserved concurrency over the cluster);
    /// a part of the tenant's reserved quota, at most that (400 beyond it); null: only the
    /// tenant's reservation.
    #[schema(minimum = 0, maximum = 100000)]
    pub reserved_concurrency: Option<u32>,
    /// Default start window in milliseconds of async calls without `sluice-deadline`; null: none.
    #[schema(minimum = 1000, maximum = 604800000)]
    pub start_window_ms: Option<u64>,
    /// Calls one instance serves, one after another, before it is discarded; 1: a fresh
    /// instance per call. Globals persist between the calls of a reused instance.
    #[schema(minimum = 1, maximum = 1000000)]
    pub reuse_calls: u32,
    /// Milliseconds a warm instance may wait for its next call.
    #[schema(minimum = 100, maximum = 3600000)]
    pub reuse_idle_ms: u64,
    /// Instances of this version alive at once on a node; more calls wait for one. Null:
    /// unbounded, except for heavy components (large initial memory), which get the node's
    /// default.
    #[schema(minimum = 1)]
    pub instances_max: Option<u32>,
}

impl Default for FunctionConfigSchema {
    fn default() -> Self {
        let c = sluice_core::FunctionConfig::default();
        Self {
            memory_bytes: c.memory_bytes,
            timeout_ms: c.timeout_ms,
            async_timeout_ms: c.async_timeout_ms,
            env: c.env,
            allow_outbound: c.allow_outbound,
            public: c.public,
            attempts_max: c.attempts_max,
            max_age_ms: c.max_age_ms,
            rate_per_sec: c.rate_per_sec,
            burst: c.burst,
            max_concurrency: c.max_concurrency,
            reserved_concurrency: c.reserved_concurrency,
            start_window_ms: c.start_window_ms,
            reuse_calls: c.reuse_calls,
            reuse_idle_ms: c.reuse_idle_ms,
            instances_max: c.instances_max,
        }
    }
}

fn string_enum<'a>(values: impl IntoIterator<Item = &'a str>) -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String).enum_values(Some(values))
}

/// Every error code: generated from [`ErrorKind::ALL`], so a new kind is documented at once.
pub(crate) fn error_code_schema() -> Schema {
    string_enum(ErrorKind::ALL.iter().map(|k| k.as_str())).into()
}

// The vocabulary's schemas: each lists its enum's `WORDS`, so a new word is documented at once.

pub(crate) fn tenant_scopes_schema() -> Schema {
    let scopes = Scope::TENANT.map(Scope::as_str);
    ArrayBuilder::new().items(string_enum(scopes)).min_items(Some(1)).into()
}

pub(crate) fn key_scopes_schema() -> Schema {
    ArrayBuilder::new().items(string_enum(Scope::WORDS)).into()
}

pub(crate) fn invocation_status_schema() -> Schema {
    string_enum(InvocationStatus::WORDS).into()
}

pub(crate) fn rollout_status_schema() -> Schema {
    string_enum(sluice_core::RolloutStatus::WORDS).into()
}

pub(crate) fn overlap_schema() -> Schema {
    string_enum(sluice_core::Overlap::WORDS).into()
}

pub(crate) fn catchup_schema() -> Schema {
    string_enum(sluice_core::Catchup::WORDS).into()
}

/// `[name, value]` pairs of a schedule's request headers.
pub(crate) fn header_pairs_schema() -> Schema {
    let text = || ObjectBuilder::new().schema_type(Type::String);
    let pair = ArrayBuilder::new()
        .prefix_items([Schema::from(text()), Schema::from(text())])
        .items(utoipa::openapi::schema::ArrayItems::False)
        .min_items(Some(2))
        .max_items(Some(2));
    ArrayBuilder::new().items(pair).into()
}

pub(crate) fn mode_schema() -> Schema {
    string_enum(Mode::WORDS).into()
}

pub(crate) fn log_stream_schema() -> Schema {
    string_enum(LogStream::WORDS).into()
}

/// `[name, value]` pairs; `FunctionConfig::validate` refuses names that are empty or hold `=`
/// or NUL.
pub(crate) fn env_schema() -> Schema {
    let name = ObjectBuilder::new().schema_type(Type::String).pattern(Some("^[^=\\u0000]+$"));
    let value = ObjectBuilder::new().schema_type(Type::String);
    let pair = ArrayBuilder::new()
        .prefix_items([Schema::from(name), Schema::from(value)])
        .items(utoipa::openapi::schema::ArrayItems::False)
        .min_items(Some(2))
        .max_items(Some(2));
    ArrayBuilder::new().items(pair).into()
}

/// Hosts in the shapes `OutboundHost::parse` reads: `name[:port]`, `[ipv6][:port]`, bare `ipv6`.
/// The pattern admits everything the parser accepts (and some it refuses, e.g. port 99999), so
/// a request the document calls invalid is always refused.
fn outbound_schema() -> Schema {
    const HOST: &str = r"^([A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*\.?(:[0-9]+)?|\[[0-9A-Fa-f:.]+\](:[0-9]+)?|[0-9A-Fa-f.]*:[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*)$";
    ArrayBuilder::new().items(ObjectBuilder::new().schema_type(Type::String).pattern(Some(HOST))).into()
}

fn criticality_schema() -> Schema {
    string_enum(Criticality::WORDS).into()
}

fn rfc3339_schema() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
        .into()
}

/// The request headers of an async call (`Prefer: respond-async`).
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // documentation only: `invoke` reads these headers
pub struct AsyncHeaders {
    /// `respond-async`: queue the call durably and answer 202.
    prefer: Option<String>,
    /// Async (at most 255 bytes): keys belong to their caller (its API key, or every keyless
    /// caller of a public function together). The same key from the same caller within 24 hours
    /// returns the first invocation if the request is the same (method, path and query, body;
    /// not headers), and is refused with 422 if it is not.
    #[serde(rename = "idempotency-key")]
    idempotency_key: Option<String>,
    /// Async: not started before this RFC 3339 time.
    #[serde(rename = "sluice-start-after")]
    #[param(schema_with = rfc3339_schema)]
    start_after: Option<String>,
    /// Async: `expired` if not started by this RFC 3339 time.
    #[serde(rename = "sluice-deadline")]
    #[param(schema_with = rfc3339_schema)]
    deadline: Option<String>,
    /// Async: queued calls are leased in this order; default `normal`.
    #[serde(rename = "sluice-criticality")]
    #[param(schema_with = criticality_schema)]
    criticality: Option<String>,
}

/// The request headers that choose a version (sync and async calls).
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // documentation only: `invoke` reads these headers
pub struct VersionHeaders {
    /// Run this version number, whatever the path addresses: for testing a version before an
    /// alias names it. Only keys of the function's tenant with the `invoke` scope may send it
    /// (403 `forbidden` otherwise, also on a public function).
    #[serde(rename = "sluice-version")]
    version: Option<i64>,
    /// For an alias split over several versions: the same key always gets the same version (a
    /// stable hash of it picks the share), on every node, so a user's session sees one version.
    /// Without it each call picks at random by the weights.
    #[serde(rename = "sluice-routing-key")]
    routing_key: Option<String>,
}

/// Call a function.
///
/// The function segment addresses what runs: `hello` is the alias `latest` (which a deploy moves
/// unless `promote` is false), `hello@prod` the alias `prod`, `hello@3` version 3. `@` is a plain
/// path character, so proxies and CDNs keep it as it is. The response's `sluice-version` header
/// names the version that ran (for an async call, the version queued: an alias is resolved when
/// the call is accepted, and every attempt runs that version).
///
/// Any method is accepted (five are listed); the method, the path below the function, the query,
/// the headers and the body are passed to the function, whose response comes back as it produces
/// it, with `sluice-invocation-id` added. A private function needs a key with the `invoke` scope
/// of its tenant; a public one needs none. Errors made by sluice carry the `sluice-error` header
/// and a JSON body; everything else is the function's. With `Prefer: respond-async` the request is
/// queued durably and answered 202.
#[utoipa::path(
    method(get, post, put, delete, patch),
    path = "/fn/{tenant}/{function}/{path}",
    tag = "invoke",
    params(
        ("tenant" = String, Path, description = "Tenant name", example = "default"),
        ("function" = String, Path, description = "Function name, optionally with `@ALIAS` or `@VERSION`",
            example = "hello@prod"),
        ("path" = String, Path, example = "greeting", description = "Path below the function (may contain '/'), passed to it \
            with the query string"),
        VersionHeaders,
        AsyncHeaders,
    ),
    request_body(content = Option<Binary>, content_type = "application/octet-stream",
        description = "Passed to the function as it is (any content type)"),
    security((), ("bearer" = [])),
    responses(
        (status = 202, description = "Queued (async)", body = AsyncAccepted, headers(
            ("location" = String, description = "`/v1/invocations/{id}`"),
            ("sluice-invocation-id" = String, description = "The invocation's id"))),
        (status = 400, description = "Bad request: framing, or an async header (named)", body = ErrorBody),
        (status = 401, description = "A private function and no valid key", body = ErrorBody),
        (status = 403, description = "The key lacks the `invoke` scope, or sent `sluice-version` \
            without being a key of the function's tenant", body = ErrorBody),
        (status = 404, description = "No such function (or another tenant's), alias or version", body = ErrorBody),
        (status = 413, description = "Body larger than the sync or async limit, or an async \
            request alone larger than the tenant's queued-bytes quota", body = ErrorBody),
        (status = 422, description = "Async: the `Idempotency-Key` was used by this caller within 24 h \
            for a different request (method, path and query, or body; named); nothing was queued", body = ErrorBody),
        (status = 429, description = "Over the tenant's, its anonymous callers' or the function's \
            rate, the function's concurrency limit, (async) the tenant's queued quota \
            (`quota_exceeded`, naming it) or the tenant's share of the node's async calls being \
            read or committed (`concurrency_limited`); no work was done and nothing was stored", body = ErrorBody, headers(
            ("retry-after" = u64, description = "Seconds to wait"),
            ("ratelimit-policy" = String, description = "IETF RateLimit-Policy of the bucket (rate limits)"),
            ("ratelimit" = String, description = "IETF RateLimit of the bucket (rate limits)"))),
        (status = 500, description = "The function trapped, ran out of memory or gave no response \
            (details in the invocation's logs)", body = ErrorBody),
        (status = 503, description = "The node is overloaded or its store unavailable", body = ErrorBody,
            headers(("retry-after" = u64, description = "Seconds to wait"))),
        (status = 504, description = "The function timed out", body = ErrorBody),
        (status = "default", description = "The function's response, as it produced it",
            headers(("sluice-invocation-id" = String, description = "The invocation's id"),
                ("sluice-version" = i64, description = "The version that ran"))),
    )
)]
#[allow(dead_code)] // documentation only: `/fn` is served by `invoke::handle`, not the router
fn invoke_function() {}

/// The document's base: what the router does not contribute.
pub(crate) fn base() -> OpenApi {
    #[derive(utoipa::OpenApi)]
    #[openapi(paths(invoke_function), components(schemas(ErrorBody)))]
    struct Base;
    <Base as utoipa::OpenApi>::openapi()
}

/// Completes the document built from the router: info, the security scheme, and the responses
/// every route can give because of what runs before its handler.
pub(crate) fn finish(mut doc: OpenApi) -> OpenApi {
    doc.info = InfoBuilder::new()
        .title("sluice")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(
            "Serverless WebAssembly functions: the control API (`/v1`) and the call path (`/fn`). \
             Authenticate with `Authorization: Bearer <API key>`. Another tenant's objects answer \
             404 exactly like missing ones.",
        ))
        .build();
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        BEARER,
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
    );
    // Every operation needs a key unless it says otherwise (`security(())`).
    doc.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new::<_, _, &str>(BEARER, [])]);
    for item in doc.paths.paths.values_mut() {
        for op in operations(item) {
            add_common_responses(op);
        }
    }
    doc
}

fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
    ]
    .into_iter()
    .filter_map(Option::as_mut)
}

/// Whether an operation needs a key: it inherits the document's requirement or names the scheme.
fn needs_key(op: &Operation) -> bool {
    match &op.security {
        None => true,
        Some(reqs) => {
            let json = serde_json::to_value(reqs).unwrap_or_default();
            json.as_array().is_some_and(|a| a.iter().any(|r| r.get(BEARER).is_some()))
        }
    }
}

fn add_common_responses(op: &mut Operation) {
    let needs_key = needs_key(op);
    let responses = &mut op.responses.responses;
    let mut add = |status: &str, response: Response| {
        responses.entry(status.to_string()).or_insert(RefOr::T(response));
    };
    // The server checks framing and header limits before any route (`server::route`), and
    // extractors refuse path segments that are not UTF-8.
    add(
        "400",
        error_response("Bad request: both Content-Length and Transfer-Encoding, or a malformed parameter"),
    );
    add("431", error_response("Request headers over the node's size or count limit"));
    if needs_key {
        add("401", error_response("No API key, or an invalid or revoked one"));
        // Every route that needs a key reads or writes the store, which may refuse for a while.
        add("503", retry_after(error_response("The store is unavailable; retry after the given seconds")));
    }
}

fn error_response(description: &str) -> Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build(),
        )
        .build()
}

fn retry_after(mut response: Response) -> Response {
    let header = HeaderBuilder::new()
        .schema(ObjectBuilder::new().schema_type(Type::Integer))
        .description(Some("Seconds to wait before trying again"))
        .build();
    response.headers.insert("retry-after".to_string(), header);
    response
}

/// This document.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "meta",
    security(()),
    responses((status = 200, description = "The OpenAPI document of this API", body = serde_json::Value))
)]
pub(crate) async fn openapi_json(Extension(doc): Extension<OpenApiJson>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], doc.0.to_string())
}

/// The finished document as JSON, handed to [`openapi_json`] by the router that was built with
/// it (`api::routes`), so this module never reaches back into the router.
#[derive(Clone)]
pub(crate) struct OpenApiJson(pub std::sync::Arc<str>);
