//! The `/v1` control API: the router, authentication and object-level access checks shared by
//! every route, and the function routes (upload, deploy, list, delete, logs). Tenants and keys
//! live in `api_tenants`, invocations in `api_invocations`, the OpenAPI document in `api_openapi`.
//!
//! Every route authenticates with an API key and checks object-level access: another tenant's
//! objects answer 404 exactly like missing ones. Every error, including the router's own (unknown
//! route, wrong method), leaves as the JSON of DESIGN.md section 5.
//!
//! Routes are registered only through `utoipa_axum::routes!`, which takes each path from the
//! handler's `#[utoipa::path]`: the router and the OpenAPI document are built from the same
//! annotations, so they cannot disagree.

use std::sync::{Arc, OnceLock};

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::{Json, Router};
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use sluice_core::{ErrorKind, FunctionConfig, Scope, Secrets, SluiceError, rfc3339};
use sluice_store::VersionRecord;
use tower::ServiceExt;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api_common::{ApiResult, Auth, ErrorBody, LogLineInfo, json_body, require_tenant};
use crate::api_openapi::FunctionConfigSchema;
use crate::body::{Body, BoxError};
use crate::error::{error_response, kind_for_status, store_error};
use crate::node::Node;

/// Log lines returned by one logs call at most.
const LOG_LINES_PER_PAGE_MAX: u32 = 1000;
/// Largest JSON request body of the control API (a deploy request with its configuration is the
/// biggest). Component uploads have their own limit, `Limits::upload_bytes_max`.
const JSON_BODY_BYTES_MAX: usize = 1024 * 1024;

pub async fn handle(node: Arc<Node>, req: Request<Incoming>) -> Response<Body> {
    let router = routes().0.clone().with_state(node);
    let res = match router.oneshot(req.map(axum::body::Body::new)).await {
        Ok(res) => res,
        Err(never) => match never {},
    };
    let res = normalize_error(res).await;
    res.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync())
}

/// The router and its OpenAPI document (JSON), built once: both come from the same handler
/// annotations.
pub(crate) fn routes() -> &'static (Router<Arc<Node>>, String) {
    static ROUTES: OnceLock<(Router<Arc<Node>>, String)> = OnceLock::new();
    ROUTES.get_or_init(|| {
        let (router, doc) = openapi_router().split_for_parts();
        let doc = crate::api_openapi::finish(doc);
        let json = doc.to_json().expect("the OpenAPI document serializes");
        let router = router.layer(axum::Extension(crate::api_openapi::OpenApiJson(Arc::from(json.as_str()))));
        (router, json)
    })
}

/// Every `/v1` route. Register routes here with `routes!` only (see the module docs); the
/// `api_openapi` tests fail for a route the document does not list.
pub(crate) fn openapi_router() -> OpenApiRouter<Arc<Node>> {
    use crate::{
        api_invocations as inv, api_node, api_openapi as doc, api_rollouts as ro, api_schedules as sch,
        api_tenants as ten, api_triggers as trg, api_versions as ver,
    };
    OpenApiRouter::with_openapi(doc::base())
        .routes(routes!(doc::openapi_json))
        .routes(routes!(ten::create_tenant, ten::list_tenants))
        .routes(routes!(ten::create_key, ten::list_keys))
        .routes(routes!(ten::revoke_key))
        .routes(routes!(ten::set_tenant_limits, ten::get_tenant_limits))
        .routes(routes!(ten::set_tenant_quota, ten::get_tenant_quota))
        .routes(routes!(api_node::tenant_usage))
        .routes(routes!(api_node::function_downstreams))
        .routes(routes!(api_node::node_info))
        .routes(routes!(api_node::list_nodes))
        .routes(routes!(upload_blob))
        .routes(routes!(list_functions))
        .routes(routes!(get_function, delete_function))
        .routes(routes!(create_version, ver::list_versions))
        .routes(routes!(ver::get_version))
        .routes(routes!(ver::list_aliases))
        .routes(routes!(ver::set_alias, ver::delete_alias))
        .routes(routes!(ro::start_rollout, ro::get_rollout, ro::cancel_rollout))
        .routes(routes!(sch::create_schedule, sch::list_schedules))
        .routes(routes!(sch::get_schedule, sch::delete_schedule))
        .routes(routes!(sch::pause_schedule))
        .routes(routes!(sch::resume_schedule))
        .routes(routes!(sch::backfill_schedule))
        .routes(routes!(trg::create_trigger, trg::list_triggers))
        .routes(routes!(trg::get_trigger, trg::delete_trigger))
        .routes(routes!(trg::pause_trigger))
        .routes(routes!(trg::resume_trigger))
        .routes(routes!(function_logs))
        .routes(routes!(inv::list_invocations))
        .routes(routes!(inv::get_invocation))
        .routes(routes!(inv::invocation_response))
        .routes(routes!(inv::invocation_logs))
        .routes(routes!(inv::retry_invocation))
        .layer(DefaultBodyLimit::max(JSON_BODY_BYTES_MAX))
}

/// Rewrites a non-JSON error response (from the router or an extractor) into sluice's error
/// format, keeping its status and text.
async fn normalize_error(res: axum::response::Response) -> axum::response::Response {
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    // A stored invocation response passes through as it was produced, whatever its status.
    let is_stored = res.extensions().get::<crate::api_invocations::StoredResponseMark>().is_some();
    if status.as_u16() < 400 || is_json || is_stored {
        return res;
    }
    let text = match axum::body::to_bytes(res.into_body(), 64 * 1024).await {
        Ok(b) if !b.is_empty() => String::from_utf8_lossy(&b).into_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_string(),
    };
    let err = SluiceError::new(kind_for_status(status), text);
    error_response(&err, None).map(axum::body::Body::new)
}

pub(crate) fn no_function(tenant: &str, function: &str) -> SluiceError {
    SluiceError::not_found(format!("no function {function} in tenant {tenant}"))
}

/// A stored component: its address and size.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct BlobInfo {
    /// Hex SHA-256 of the bytes: pass it to the versions route.
    pub digest: String,
    pub size: u64,
}

/// Upload a component.
///
/// Stores the bytes under their SHA-256 digest; uploading the same bytes again is a no-op. The
/// component is validated when a version is created from it.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant}/blobs",
    tag = "functions",
    params(("tenant" = String, Path, description = "Tenant name", example = "default")),
    request_body(description = "A WebAssembly component binary (the content type is not checked)",
        content((crate::api_openapi::Binary = "application/wasm"),
            (crate::api_openapi::Binary = "application/octet-stream"))),
    responses(
        (status = 201, description = "Stored", body = BlobInfo),
        (status = 400, description = "Not a WebAssembly binary (`invalid_component`) or a bad request",
            body = ErrorBody),
        (status = 403, description = "The key lacks the `deploy` scope", body = ErrorBody),
        (status = 404, description = "No such tenant (or another tenant's)", body = ErrorBody),
        (status = 413, description = "Larger than the upload limit, or alone larger than the \
            tenant's quota of component bytes", body = ErrorBody),
        (status = 429, description = "The tenant has its share (half) of the node's uploads \
            and deploys in flight (`concurrency_limited`, with `Retry-After`)", body = ErrorBody),
        (status = 503, description = "Too many uploads and deploys in flight on this node \
            (`overloaded`, with `Retry-After`)", body = ErrorBody),
        (status = 507, description = "The tenant's quota of component bytes would be exceeded \
            (`storage_quota_exceeded`)", body = ErrorBody),
    )
)]
pub(crate) async fn upload_blob(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path(tenant): Path<String>,
    body: axum::body::Body,
) -> ApiResult<(StatusCode, Json<BlobInfo>)> {
    auth.require(&tenant, Scope::Deploy)?;
    require_tenant(&node, &tenant).await?;
    let _slot = node.deploy_slot(&tenant)?;
    let max = node.config.limits.upload_bytes_max;
    let bytes = crate::body::collect_limited(body, max, node.config.limits.body_read_timeout).await?;
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(SluiceError::new(
            ErrorKind::InvalidComponent,
            "upload is not a WebAssembly binary (it does not start with the \\0asm magic)",
        )
        .into());
    }
    let digest = sluice_core::ids::sha256_hex(&bytes);
    check_components_quota(&node, &tenant, &digest, bytes.len() as u64).await?;
    node.store.put_blob(&tenant, &digest, &bytes).await?;
    Ok((StatusCode::CREATED, Json(BlobInfo { digest, size: bytes.len() as u64 })))
}

/// A deploy request: a stored component and the version's configuration.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVersion {
    /// Digest returned by the blob upload.
    pub digest: String,
    /// Omitted fields take their defaults.
    #[serde(default)]
    #[schema(value_type = FunctionConfigSchema)]
    pub config: FunctionConfig,
    /// Secret environment variables, as `[name, value]` pairs: the guest sees them after
    /// `config.env`; no response ever shows a value again (versions list the names only).
    #[serde(default)]
    #[schema(schema_with = crate::api_openapi::env_schema)]
    pub secrets: Vec<(String, String)>,
    /// Move the alias `latest` (what `/fn/{tenant}/{function}/` calls) to the new version;
    /// default true. A function's first version is always `latest`.
    #[serde(default = "promote_by_default")]
    pub promote: bool,
}

fn promote_by_default() -> bool {
    true
}

/// One immutable version of a function.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct VersionInfo {
    pub tenant: String,
    pub function: String,
    pub version: i64,
    /// The component's digest.
    pub digest: String,
    /// Where the function is served.
    pub url: String,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(value_type = FunctionConfigSchema)]
    pub config: FunctionConfig,
    /// Names of the version's secret environment variables; their values are never returned.
    pub secrets: Vec<String>,
}

/// A version just created, with what compiling it cost.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct DeployedVersion {
    #[serde(flatten)]
    pub version: VersionInfo,
    pub compile_ms: u64,
    /// The native artifact was already cached: nothing was compiled.
    pub artifact_cached: bool,
    pub artifact_bytes: u64,
    /// The alias `latest` now names this version.
    pub promoted: bool,
}

/// Deploy: create the next version of a function.
///
/// Validates and compiles the component (it must export `wasi:http/incoming-handler` and import
/// nothing sluice does not provide), then makes the new version the one `/fn` serves.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant}/functions/{function}/versions",
    tag = "functions",
    params(
        ("tenant" = String, Path, description = "Tenant name", example = "default"),
        ("function" = String, Path, description = "Function name: 1-63 characters of a-z, 0-9 and '-'",
            example = "hello"),
    ),
    request_body = CreateVersion,
    responses(
        (status = 201, description = "Deployed", body = DeployedVersion),
        (status = 400, description = "Bad name, bad configuration (among them a reserved \
            concurrency beyond the tenant's reserved quota) or not a usable component \
            (`invalid_component`, naming the reason)", body = ErrorBody),
        (status = 403, description = "The key lacks the `deploy` scope", body = ErrorBody),
        (status = 404, description = "No such tenant or blob", body = ErrorBody),
        (status = 413, description = "Request body too large", body = ErrorBody),
        (status = 429, description = "The tenant has its share (half) of the node's uploads \
            and deploys in flight (`concurrency_limited`, with `Retry-After`)", body = ErrorBody),
        (status = 503, description = "Too many uploads and deploys in flight on this node \
            (`overloaded`, with `Retry-After`)", body = ErrorBody),
        (status = 507, description = "The tenant's quota of functions or versions is reached \
            (`storage_quota_exceeded`)", body = ErrorBody),
    )
)]
pub(crate) async fn create_version(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, function)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<DeployedVersion>)> {
    auth.require(&tenant, Scope::Deploy)?;
    require_tenant(&node, &tenant).await?;
    if !sluice_core::ids::valid_name(&function) {
        return Err(SluiceError::bad_request(format!(
            "invalid function name {function:?}: use 1-63 characters of a-z, 0-9 and '-'"
        ))
        .into());
    }
    let req: CreateVersion = json_body(&body, "deploy request")?;
    let config = FunctionConfig { secrets: Secrets::new(req.secrets), ..req.config };
    config.validate(&node.config.limits)?;
    if let Some(reserved) = config.reserved_concurrency.filter(|r| *r > 0) {
        require_reservation_within_quota(&node, &tenant, reserved).await?;
    }
    check_deploy_quotas(&node, &tenant, &function).await?;
    let _slot = node.deploy_slot(&tenant)?;
    let bytes = node
        .store
        .get_blob(&tenant, &req.digest)
        .await?
        .ok_or_else(|| SluiceError::not_found(format!("no blob {}: upload it first", req.digest)))?;
    // Compiles on the node's compile pool, once for concurrent deploys of one blob; an artifact
    // already on disk is only mapped. Either way the component is now loaded in the code cache.
    let key = sluice_runtime::CodeKey::new(&tenant, &req.digest);
    let blob: sluice_runtime::BlobSource = Box::new(move || Box::pin(async move { Ok(Some(bytes)) }));
    let (prepared, hit) = node.runtime.code(&key, || blob).await?;
    let origin = prepared.origin;
    drop(prepared);
    let record = match node.store.create_version(&tenant, &function, &req.digest, &config, req.promote).await
    {
        Err(sluice_store::StoreError::NotFound(what)) if what.starts_with("blob ") => {
            return Err(SluiceError::not_found(format!(
                "blob {} was collected while the deploy compiled it (an upload no version names is \
                 collected after serve --blob-grace): upload it again",
                req.digest
            ))
            .into());
        }
        other => other?,
    };
    let version = version_info(&node, &record);
    // Serves what the store now says (the new `latest`, if it moved): the same path other nodes
    // take on the change notification. Its artifact is on disk already.
    node.refresh_function(&tenant, &function).await?;
    let promoted = req.promote || record.version == 1;
    let compiled = !hit && origin.compiled;
    Ok((
        StatusCode::CREATED,
        Json(DeployedVersion {
            version,
            compile_ms: if compiled { origin.compile_ms } else { 0 },
            artifact_cached: !compiled,
            artifact_bytes: origin.artifact_bytes,
            promoted,
        }),
    ))
}

/// A function's reservation is a part of its tenant's, which only an admin sets: a deploy that
/// asks for more is refused rather than accepted and then cut down by the scheduler without a
/// word (the scheduler caps it all the same, for a quota lowered after the deploy, and for the
/// sum of several functions' reservations, which this does not check).
async fn require_reservation_within_quota(node: &Node, tenant: &str, reserved: u32) -> ApiResult<()> {
    let quota = node
        .store
        .tenant_quotas()
        .await?
        .into_iter()
        .find(|(t, _)| t == tenant)
        .map(|(_, q)| q)
        .unwrap_or_default();
    if reserved > quota.reserved {
        return Err(SluiceError::bad_request(format!(
            "reserved concurrency {reserved} is more than tenant {tenant}'s reserved quota of {}: a \
             function's reservation is a part of its tenant's; an admin can raise it with `sluice \
             tenants quota {tenant} --reserved N`",
            quota.reserved
        ))
        .into());
    }
    Ok(())
}

/// The tenant's quota of component bytes: 413 for an upload larger than the quota alone, 507
/// for one that would take the tenant over it. Bytes already stored under the same digest add
/// nothing. Checked against the store, not under its write lock: deploys in flight at once (at
/// most `--deploy-inflight-max` per node) may pass it together.
async fn check_components_quota(
    node: &Node,
    tenant: &str,
    digest: &str,
    size: u64,
) -> Result<(), SluiceError> {
    let max = node.quotas.limits(tenant).components_bytes_max;
    if size > max {
        return Err(SluiceError::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "this component is {size} bytes, more than tenant {tenant} may store in all (its quota \
                 components_bytes_max is {max})"
            ),
        ));
    }
    let stored = node.store.tenant_storage(tenant).await.map_err(store_error)?.blob_bytes;
    if stored.saturating_add(size) > max
        && node.store.get_blob(tenant, digest).await.map_err(store_error)?.is_none()
    {
        return Err(SluiceError::new(
            ErrorKind::StorageQuotaExceeded,
            format!(
                "tenant {tenant} stores {stored} bytes of components and this one adds {size}, over its \
                 quota (components_bytes_max) of {max}; delete functions or old versions first"
            ),
        ));
    }
    Ok(())
}

/// The tenant's quotas of functions (for a function it does not have yet) and of versions: 507.
async fn check_deploy_quotas(node: &Node, tenant: &str, function: &str) -> Result<(), SluiceError> {
    let limits = node.quotas.limits(tenant);
    let storage = node.store.tenant_storage(tenant).await.map_err(store_error)?;
    if storage.functions >= limits.functions_max
        && node.store.latest_version(tenant, function).await.map_err(store_error)?.is_none()
    {
        return Err(SluiceError::new(
            ErrorKind::StorageQuotaExceeded,
            format!(
                "tenant {tenant} has {} functions, its quota (functions_max) is {}; delete one first",
                storage.functions, limits.functions_max
            ),
        ));
    }
    if storage.versions >= limits.versions_max {
        return Err(SluiceError::new(
            ErrorKind::StorageQuotaExceeded,
            format!(
                "tenant {tenant} stores {} versions, its quota (versions_max) is {}; old versions are \
                 retired past `serve --versions-kept` unless unfinished invocations name them, or \
                 delete a function",
                storage.versions, limits.versions_max
            ),
        ));
    }
    Ok(())
}

pub(crate) fn public_url(node: &Node) -> String {
    node.public_url.read().expect("public url lock").clone()
}

fn function_url(base: &str, tenant: &str, function: &str) -> String {
    format!("{base}/fn/{tenant}/{function}/")
}

pub(crate) fn version_info(node: &Node, v: &VersionRecord) -> VersionInfo {
    VersionInfo {
        tenant: v.tenant.clone(),
        function: v.function.clone(),
        version: v.version,
        digest: v.blob_digest.clone(),
        url: function_url(&public_url(node), &v.tenant, &v.function),
        created_at: rfc3339(v.created_at),
        config: v.config.clone(),
        secrets: v.config.secrets.names().map(str::to_string).collect(),
    }
}

/// A function: its latest version and where it is served.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct FunctionInfo {
    pub name: String,
    pub latest_version: i64,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
    pub url: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct FunctionList {
    pub functions: Vec<FunctionInfo>,
}

/// List a tenant's functions.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant}/functions",
    tag = "functions",
    params(("tenant" = String, Path, description = "Tenant name", example = "default")),
    responses(
        (status = 200, description = "The functions", body = FunctionList),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 404, description = "No such tenant (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn list_functions(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path(tenant): Path<String>,
) -> ApiResult<Json<FunctionList>> {
    auth.require(&tenant, Scope::Read)?;
    require_tenant(&node, &tenant).await?;
    let base = public_url(&node);
    let functions = node
        .store
        .list_functions(&tenant)
        .await?
        .into_iter()
        .map(|f| FunctionInfo {
            url: function_url(&base, &f.tenant, &f.name),
            name: f.name,
            latest_version: f.latest_version,
            created_at: rfc3339(f.created_at),
            updated_at: rfc3339(f.updated_at),
        })
        .collect();
    Ok(Json(FunctionList { functions }))
}

/// Show a function's newest version (promoted or not; `alias list` shows what `latest` names).
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant}/functions/{function}",
    tag = "functions",
    params(
        ("tenant" = String, Path, description = "Tenant name", example = "default"),
        ("function" = String, Path, description = "Function name", example = "hello"),
    ),
    responses(
        (status = 200, description = "The newest version", body = VersionInfo),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 404, description = "No such function (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn get_function(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, function)): Path<(String, String)>,
) -> ApiResult<Json<VersionInfo>> {
    auth.require(&tenant, Scope::Read)?;
    let record = node
        .store
        .latest_version(&tenant, &function)
        .await?
        .ok_or_else(|| no_function(&tenant, &function))?;
    Ok(Json(version_info(&node, &record)))
}

/// Delete a function and all its versions.
#[utoipa::path(
    delete,
    path = "/v1/tenants/{tenant}/functions/{function}",
    tag = "functions",
    params(
        ("tenant" = String, Path, description = "Tenant name", example = "default"),
        ("function" = String, Path, description = "Function name", example = "hello"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 403, description = "The key lacks the `deploy` scope", body = ErrorBody),
        (status = 404, description = "No such function (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn delete_function(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, function)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    auth.require(&tenant, Scope::Deploy)?;
    if !node.store.delete_function(&tenant, &function).await? {
        return Err(no_function(&tenant, &function).into());
    }
    node.uninstall(&tenant, &function);
    Ok(StatusCode::NO_CONTENT)
}

/// A page of a function's log lines, oldest first.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct LogPage {
    pub lines: Vec<LogLineInfo>,
    /// Pass as `after` to get the lines that follow; null when there are none yet.
    pub next_after: Option<i64>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Only lines with a sequence number above this; omitted: the most recent lines.
    after: Option<i64>,
    /// Lines to return, 1 to 1000 (values outside are clamped); default 100.
    limit: Option<u32>,
}

/// Read a function's log lines.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant}/functions/{function}/logs",
    tag = "functions",
    params(
        ("tenant" = String, Path, description = "Tenant name", example = "default"),
        ("function" = String, Path, description = "Function name", example = "hello"),
        LogsQuery,
    ),
    responses(
        (status = 200, description = "Log lines, oldest first", body = LogPage),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 404, description = "No such function (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn function_logs(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, function)): Path<(String, String)>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<Json<LogPage>> {
    auth.require(&tenant, Scope::Read)?;
    if node.store.latest_version(&tenant, &function).await?.is_none() {
        return Err(no_function(&tenant, &function).into());
    }
    let limit = q.limit.unwrap_or(100).clamp(1, LOG_LINES_PER_PAGE_MAX);
    let lines = node.store.function_logs(&tenant, &function, q.after, limit).await?;
    let next_after = lines.last().map(|l| l.seq).or(q.after);
    Ok(Json(LogPage { lines: lines.iter().map(LogLineInfo::of).collect(), next_after }))
}
