//! The `/v1` control API: deploy, list and delete functions, read invocations and logs.
//!
//! Every route authenticates with an API key and checks object-level access: another tenant's
//! objects answer 404 exactly like missing ones. Every error, including the router's own (unknown
//! route, wrong method), leaves as the JSON of DESIGN.md section 5.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Value, json};
use sluice_core::{ErrorKind, FunctionConfig, Scope, SluiceError, rfc3339};
use sluice_store::{Invocation, LogLine, VersionRecord};
use tower::ServiceExt;

use crate::body::{Body, BoxError};
use crate::error::{error_response, kind_for_status, store_error};
use crate::node::{Node, Principal, bearer};

/// Log lines returned by one logs call at most.
const LOG_LINES_PER_PAGE_MAX: u32 = 1000;

pub async fn handle(node: Arc<Node>, req: Request<Incoming>) -> Response<Body> {
    let router = router(node);
    let res = match router.oneshot(req.map(axum::body::Body::new)).await {
        Ok(res) => res,
        Err(never) => match never {},
    };
    let res = normalize_error(res).await;
    res.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync())
}

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/v1/tenants/{tenant}/blobs", post(upload_blob))
        .route("/v1/tenants/{tenant}/functions", get(list_functions))
        .route(
            "/v1/tenants/{tenant}/functions/{function}",
            get(get_function).delete(delete_function),
        )
        .route(
            "/v1/tenants/{tenant}/functions/{function}/versions",
            post(create_version),
        )
        .route(
            "/v1/tenants/{tenant}/functions/{function}/logs",
            get(function_logs),
        )
        .route("/v1/invocations/{id}", get(get_invocation))
        .route("/v1/invocations/{id}/logs", get(invocation_logs))
        .with_state(node)
}

/// Rewrites a non-JSON error response (from the router or an extractor) into sluice's error
/// format, keeping its status and text.
async fn normalize_error(res: axum::response::Response) -> axum::response::Response {
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if status.as_u16() < 400 || is_json {
        return res;
    }
    let text = match axum::body::to_bytes(res.into_body(), 64 * 1024).await {
        Ok(b) if !b.is_empty() => String::from_utf8_lossy(&b).into_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_string(),
    };
    let err = SluiceError::new(kind_for_status(status), text);
    error_response(&err, None).map(axum::body::Body::new)
}

/// An API error: rendered by the one error function.
pub struct ApiError(SluiceError);

impl From<SluiceError> for ApiError {
    fn from(e: SluiceError) -> Self {
        Self(e)
    }
}

impl From<sluice_store::StoreError> for ApiError {
    fn from(e: sluice_store::StoreError) -> Self {
        Self(store_error(e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        error_response(&self.0, None).map(axum::body::Body::new)
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The authenticated caller of an API route.
pub struct Auth(pub Arc<Principal>);

impl FromRequestParts<Arc<Node>> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        node: &Arc<Node>,
    ) -> Result<Self, Self::Rejection> {
        let key = bearer(&parts.headers).ok_or_else(|| {
            SluiceError::new(
                ErrorKind::Unauthorized,
                "missing API key: send Authorization: Bearer <key>",
            )
        })?;
        let principal = node.principal_for_key(key).ok_or_else(|| {
            SluiceError::new(ErrorKind::Unauthorized, "invalid or revoked API key")
        })?;
        Ok(Auth(principal))
    }
}

impl Auth {
    /// Checks access to a tenant's objects: unseen tenants are 404, a missing scope is 403.
    fn require(&self, tenant: &str, scope: Scope) -> Result<(), SluiceError> {
        if !self.0.sees(tenant) {
            return Err(SluiceError::not_found(format!("no tenant {tenant}")));
        }
        if !self.0.may(tenant, scope) {
            return Err(SluiceError::new(
                ErrorKind::Forbidden,
                format!(
                    "this key lacks the {} scope for tenant {tenant}",
                    scope.as_str()
                ),
            ));
        }
        Ok(())
    }
}

async fn require_tenant(node: &Node, tenant: &str) -> Result<(), ApiError> {
    if node.store.get_tenant(tenant).await?.is_none() {
        return Err(SluiceError::not_found(format!("no tenant {tenant}")).into());
    }
    Ok(())
}

async fn upload_blob(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path(tenant): Path<String>,
    body: axum::body::Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    auth.require(&tenant, Scope::Deploy)?;
    require_tenant(&node, &tenant).await?;
    let max = node.config.limits.upload_bytes_max;
    let bytes = read_limited(body, max).await?;
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(SluiceError::new(
            ErrorKind::InvalidComponent,
            "upload is not a WebAssembly binary (it does not start with the \\0asm magic)",
        )
        .into());
    }
    let digest = sluice_core::ids::sha256_hex(&bytes);
    node.store.put_blob(&digest, &bytes).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "digest": digest, "size": bytes.len() })),
    ))
}

async fn read_limited(body: axum::body::Body, max: u64) -> Result<Bytes, ApiError> {
    let limited = http_body_util::Limited::new(body, max as usize);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(SluiceError::new(
            ErrorKind::PayloadTooLarge,
            format!("upload is larger than the limit of {max} bytes"),
        )
        .into()),
        Err(e) => Err(SluiceError::bad_request(format!("reading the request body: {e}")).into()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateVersion {
    digest: String,
    #[serde(default)]
    config: FunctionConfig,
}

async fn create_version(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, function)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    auth.require(&tenant, Scope::Deploy)?;
    require_tenant(&node, &tenant).await?;
    if !sluice_core::ids::valid_name(&function) {
        return Err(SluiceError::bad_request(format!(
            "invalid function name {function:?}: use 1-63 characters of a-z, 0-9 and '-'"
        ))
        .into());
    }
    let req: CreateVersion = serde_json::from_slice(&body)
        .map_err(|e| SluiceError::bad_request(format!("invalid deploy request: {e}")))?;
    req.config.validate(&node.config.limits)?;
    let bytes = node.store.get_blob(&req.digest).await?.ok_or_else(|| {
        SluiceError::not_found(format!("no blob {}: upload it first", req.digest))
    })?;
    // Compiling takes a core for up to seconds: keep it off the async threads.
    let runtime = node.runtime.clone();
    let digest = req.digest.clone();
    let (prepared, report) = tokio::task::spawn_blocking(move || runtime.compile(&digest, &bytes))
        .await
        .map_err(|e| SluiceError::internal(format!("compile task failed: {e}")))??;
    let record = node
        .store
        .create_version(&tenant, &function, &req.digest, &req.config)
        .await?;
    let body = version_json(&node, &record);
    node.install(crate::node::Deployed {
        config: Arc::new(record.config.clone()),
        record,
        prepared,
    });
    let mut body = body;
    body["compile_ms"] = json!(report.compile_ms);
    body["artifact_cached"] = json!(report.cached);
    body["artifact_bytes"] = json!(report.artifact_bytes);
    Ok((StatusCode::CREATED, Json(body)))
}

fn version_json(node: &Node, v: &VersionRecord) -> Value {
    let base = node.public_url.read().expect("public url lock").clone();
    json!({
        "tenant": v.tenant,
        "function": v.function,
        "version": v.version,
        "digest": v.blob_digest,
        "url": format!("{base}/fn/{}/{}/", v.tenant, v.function),
        "created_at": rfc3339(v.created_at),
        "config": v.config,
    })
}

async fn list_functions(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path(tenant): Path<String>,
) -> ApiResult<Json<Value>> {
    auth.require(&tenant, Scope::Read)?;
    require_tenant(&node, &tenant).await?;
    let base = node.public_url.read().expect("public url lock").clone();
    let functions: Vec<Value> = node
        .store
        .list_functions(&tenant)
        .await?
        .into_iter()
        .map(|f| {
            json!({
                "name": f.name,
                "latest_version": f.latest_version,
                "created_at": rfc3339(f.created_at),
                "updated_at": rfc3339(f.updated_at),
                "url": format!("{base}/fn/{}/{}/", f.tenant, f.name),
            })
        })
        .collect();
    Ok(Json(json!({ "functions": functions })))
}

async fn get_function(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, function)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    auth.require(&tenant, Scope::Read)?;
    let record = node
        .store
        .latest_version(&tenant, &function)
        .await?
        .ok_or_else(|| {
            SluiceError::not_found(format!("no function {function} in tenant {tenant}"))
        })?;
    Ok(Json(version_json(&node, &record)))
}

async fn delete_function(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, function)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    auth.require(&tenant, Scope::Deploy)?;
    if !node.store.delete_function(&tenant, &function).await? {
        return Err(
            SluiceError::not_found(format!("no function {function} in tenant {tenant}")).into(),
        );
    }
    node.uninstall(&tenant, &function);
    Ok(StatusCode::NO_CONTENT)
}

/// An invocation the caller may read, or 404 (also for another tenant's).
async fn visible_invocation(node: &Node, auth: &Auth, id: &str) -> Result<Invocation, ApiError> {
    let not_found = || SluiceError::not_found(format!("no invocation {id}"));
    let inv = node.store.get_invocation(id).await?.ok_or_else(not_found)?;
    if !auth.0.sees(&inv.tenant) {
        return Err(not_found().into());
    }
    auth.require(&inv.tenant, Scope::Read)?;
    Ok(inv)
}

async fn get_invocation(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let inv = visible_invocation(&node, &auth, &id).await?;
    Ok(Json(invocation_json(&inv)))
}

pub fn invocation_json(inv: &Invocation) -> Value {
    json!({
        "id": inv.id,
        "tenant": inv.tenant,
        "function": inv.function,
        "version": inv.version,
        "mode": inv.mode,
        "status": inv.status.as_str(),
        "attempts": inv.attempts,
        "created_at": rfc3339(inv.created_at),
        "started_at": inv.started_at.map(rfc3339),
        "finished_at": inv.finished_at.map(rfc3339),
        "status_code": inv.status_code,
        "error_kind": inv.error_kind,
    })
}

fn log_json(l: &LogLine) -> Value {
    json!({
        "seq": l.seq,
        "invocation_id": l.invocation_id,
        "stream": l.stream.as_str(),
        "line": l.line,
        "at": rfc3339(l.at),
    })
}

async fn invocation_logs(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let inv = visible_invocation(&node, &auth, &id).await?;
    let lines: Vec<Value> = node
        .store
        .invocation_logs(&inv.id)
        .await?
        .iter()
        .map(log_json)
        .collect();
    Ok(Json(json!({ "invocation_id": inv.id, "lines": lines })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    after: Option<i64>,
    limit: Option<u32>,
}

async fn function_logs(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, function)): Path<(String, String)>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<Json<Value>> {
    auth.require(&tenant, Scope::Read)?;
    if node
        .store
        .latest_version(&tenant, &function)
        .await?
        .is_none()
    {
        return Err(
            SluiceError::not_found(format!("no function {function} in tenant {tenant}")).into(),
        );
    }
    let limit = q.limit.unwrap_or(100).clamp(1, LOG_LINES_PER_PAGE_MAX);
    let lines = node
        .store
        .function_logs(&tenant, &function, q.after, limit)
        .await?;
    let next_after = lines.last().map(|l| l.seq).or(q.after);
    let lines: Vec<Value> = lines.iter().map(log_json).collect();
    Ok(Json(json!({ "lines": lines, "next_after": next_after })))
}
