//! `/v1/invocations`: reading invocations (one, or a page of a tenant's), their stored responses
//! and log lines, and re-driving dead ones.
//!
//! An invocation is visible to keys of its tenant with `read` (and to admin keys); another
//! tenant's invocation answers 404 exactly like an unknown id. Re-driving needs `invoke`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use http::{HeaderName, HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};
use sluice_core::{Clock, ErrorKind, Mode, Scope, SluiceError, SystemClock, rfc3339};
use sluice_store::{Invocation, InvocationFilter, InvocationStatus};
use utoipa::{IntoParams, ToSchema};

use crate::api_common::{ApiError, ApiResult, Auth, ErrorBody, LogLineInfo, require_tenant};
use crate::api_openapi::{invocation_status_schema, mode_schema};
use crate::error::INVOCATION_ID;
use crate::node::Node;

/// Invocations returned by one list call at most.
const INVOCATIONS_PER_PAGE_MAX: u32 = 1000;
/// Invocations returned by one list call when the caller does not say.
const INVOCATIONS_PER_PAGE_DEFAULT: u32 = 50;

/// Marks a response that is a stored invocation response, so the API's error normalization lets
/// it through as it was produced, whatever its status and content type.
#[derive(Clone, Copy)]
pub(crate) struct StoredResponseMark;

/// What `GET /v1/invocations/{id}` shows.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct InvocationInfo {
    pub id: String,
    pub tenant: String,
    pub function: String,
    pub version: i64,
    #[schema(schema_with = mode_schema)]
    pub mode: Mode,
    #[schema(schema_with = invocation_status_schema)]
    pub status: InvocationStatus,
    pub attempts: u32,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub started_at: Option<String>,
    #[schema(format = DateTime)]
    pub finished_at: Option<String>,
    /// HTTP status of the (last) response, if there was one.
    pub status_code: Option<u16>,
    /// Why the last attempt failed (an error code such as `timeout` or `trap`).
    pub error_kind: Option<String>,
    /// Milliseconds the invocation spent on a thread (instantiation, guest code, the host calls
    /// it made), summed over its attempts; null before an attempt finished. Recorded for every
    /// async invocation, and for sync calls that are recorded (with logs or an error).
    pub cpu_ms: Option<f64>,
    /// Why its last attempt waited to start, as the scheduler that leased it saw it: the whole
    /// wait (`queued_ms`, from when it became runnable) and the milliseconds of it that each
    /// reason held it (`quota_ms`, `utilization_ms`, `downstream_ms`, `start_window_ms`; a reason
    /// that did not hold it is left out). Null for sync calls and before the first lease.
    #[schema(value_type = Option<Object>)]
    pub waits: Option<serde_json::Value>,
    /// The `Idempotency-Key` it was enqueued with; a schedule's invocations carry
    /// `sched:{schedule id}:{occurrence, unix ms}`.
    pub idempotency_key: Option<String>,
}

impl InvocationInfo {
    fn of(inv: &Invocation) -> Result<Self, SluiceError> {
        Ok(Self {
            id: inv.id.clone(),
            tenant: inv.tenant.clone(),
            function: inv.function.clone(),
            version: inv.version,
            mode: stored_mode(inv)?,
            status: inv.status,
            attempts: inv.attempts,
            created_at: rfc3339(inv.created_at),
            started_at: inv.started_at.map(rfc3339),
            finished_at: inv.finished_at.map(rfc3339),
            status_code: inv.status_code,
            error_kind: inv.error_kind.clone(),
            cpu_ms: inv.cpu_us.map(|us| us as f64 / 1000.0),
            waits: inv.waits.as_deref().and_then(|w| serde_json::from_str(w).ok()),
            idempotency_key: inv.idempotency_key.clone(),
        })
    }
}

/// The store keeps the mode as its word (a CHECK constraint holds it to [`Mode::WORDS`]).
fn stored_mode(inv: &Invocation) -> Result<Mode, SluiceError> {
    inv.mode.parse().map_err(|e| SluiceError::internal(format!("invocation {}: stored {e}", inv.id)))
}

/// A page of invocations, newest first.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct InvocationPage {
    pub invocations: Vec<InvocationInfo>,
    /// Pass as `before` for the next (older) page; null on the last page.
    pub next_before: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Tenant whose invocations to list; default: the key's tenant (`default` for admin keys).
    tenant: Option<String>,
    /// Only this function's invocations.
    function: Option<String>,
    /// Only invocations in this state.
    #[param(schema_with = invocation_status_schema)]
    status: Option<String>,
    /// Invocations per page, 1 to 1000 (values outside are clamped); default 50.
    limit: Option<u32>,
    /// Only invocations older than this id: the `next_before` of the previous page.
    before: Option<String>,
}

/// List a tenant's invocations, newest first.
#[utoipa::path(
    get,
    path = "/v1/invocations",
    tag = "invocations",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of invocations", body = InvocationPage),
        (status = 400, description = "Unknown status or bad parameter", body = ErrorBody),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 404, description = "No such tenant (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn list_invocations(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<InvocationPage>> {
    let tenant = match (q.tenant, &auth.0.tenant) {
        (Some(t), _) => t,
        (None, Some(own)) => own.clone(),
        (None, None) => crate::DEFAULT_TENANT.to_string(),
    };
    auth.require(&tenant, Scope::Read)?;
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(s.parse::<InvocationStatus>().map_err(|e| SluiceError::bad_request(e.to_string()))?),
    };
    require_tenant(&node, &tenant).await?;
    let limit = q.limit.unwrap_or(INVOCATIONS_PER_PAGE_DEFAULT).clamp(1, INVOCATIONS_PER_PAGE_MAX);
    let filter = InvocationFilter { tenant, function: q.function, status, before_id: q.before, limit };
    let page = node.store.list_invocations(&filter).await?;
    // A short page is the last one; a full page may have more behind it.
    let next_before = if page.len() as u32 >= limit { page.last().map(|i| i.id.clone()) } else { None };
    let invocations = page.iter().map(InvocationInfo::of).collect::<Result<_, _>>()?;
    Ok(Json(InvocationPage { invocations, next_before }))
}

/// An invocation the caller may read, or 404 (also for another tenant's).
async fn visible_invocation(
    node: &Node,
    auth: &Auth,
    id: &str,
    scope: Scope,
) -> Result<Invocation, ApiError> {
    let not_found = || SluiceError::not_found(format!("no invocation {id}"));
    let inv = node.store.get_invocation(id).await?.ok_or_else(not_found)?;
    if !auth.0.sees(&inv.tenant) {
        return Err(not_found().into());
    }
    auth.require(&inv.tenant, scope)?;
    Ok(inv)
}

/// Show one invocation.
#[utoipa::path(
    get,
    path = "/v1/invocations/{id}",
    tag = "invocations",
    params(("id" = String, Path, description = "Invocation id")),
    responses(
        (status = 200, description = "The invocation", body = InvocationInfo),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 404, description = "No such invocation (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn get_invocation(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<InvocationInfo>> {
    let inv = visible_invocation(&node, &auth, &id, Scope::Read).await?;
    Ok(Json(InvocationInfo::of(&inv)?))
}

/// Headers of a stored response that described its original transfer, not its content: the
/// stored body is sent whole with a length of its own.
const NOT_REPLAYED: [HeaderName; 3] = [header::CONTENT_LENGTH, header::TRANSFER_ENCODING, header::CONNECTION];

/// The stored HTTP response of an invocation, as the function produced it.
///
/// The answer *is* that response: its status, headers and body, plus `sluice-invocation-id`.
/// Errors made by sluice (e.g. no response yet) carry the `sluice-error` header; a stored
/// response does not.
#[utoipa::path(
    get,
    path = "/v1/invocations/{id}/response",
    tag = "invocations",
    params(("id" = String, Path, description = "Invocation id")),
    responses(
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 404, description = "No such invocation (or another tenant's), or no response stored \
            yet; told apart from a stored 404 by the `sluice-error` header", body = ErrorBody),
        (status = "default", description = "The stored response: the function's status, headers and body",
            headers(("sluice-invocation-id" = String, description = "The invocation's id"))),
    )
)]
pub(crate) async fn invocation_response(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<axum::response::Response> {
    let inv = visible_invocation(&node, &auth, &id, Scope::Read).await?;
    let stored = node.store.get_response(&inv.id).await?.ok_or_else(|| {
        SluiceError::not_found(format!(
            "invocation {id} has no stored response yet (it is {})",
            inv.status.as_str()
        ))
    })?;
    let status = StatusCode::from_u16(stored.status).map_err(|_| {
        SluiceError::internal(format!("stored status {} is not an HTTP status", stored.status))
    })?;
    let mut res = axum::response::Response::new(axum::body::Body::from(stored.body));
    *res.status_mut() = status;
    let headers = res.headers_mut();
    for (name, value) in &stored.headers {
        // The store only holds headers that were valid when produced; skip rather than fail if not.
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(value))
        else {
            continue;
        };
        if !NOT_REPLAYED.contains(&name) {
            headers.append(name, value);
        }
    }
    headers.insert(INVOCATION_ID, HeaderValue::from_str(&inv.id).expect("ids are ASCII"));
    res.extensions_mut().insert(StoredResponseMark);
    Ok(res)
}

/// An invocation's guest log lines.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct InvocationLogs {
    pub invocation_id: String,
    pub lines: Vec<LogLineInfo>,
}

/// Read one invocation's log lines.
#[utoipa::path(
    get,
    path = "/v1/invocations/{id}/logs",
    tag = "invocations",
    params(("id" = String, Path, description = "Invocation id")),
    responses(
        (status = 200, description = "Log lines, oldest first", body = InvocationLogs),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 404, description = "No such invocation (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn invocation_logs(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<InvocationLogs>> {
    let inv = visible_invocation(&node, &auth, &id, Scope::Read).await?;
    let lines = node.store.invocation_logs(&inv.id).await?;
    Ok(Json(InvocationLogs { invocation_id: inv.id, lines: lines.iter().map(LogLineInfo::of).collect() }))
}

/// Re-drive a dead or expired invocation: it is queued again with its attempts reset.
#[utoipa::path(
    post,
    path = "/v1/invocations/{id}/retry",
    tag = "invocations",
    params(("id" = String, Path, description = "Invocation id")),
    responses(
        (status = 202, description = "Queued again", body = InvocationInfo,
            headers(("location" = String, description = "Where to follow the invocation"))),
        (status = 403, description = "The key lacks the `invoke` scope", body = ErrorBody),
        (status = 404, description = "No such invocation (or another tenant's)", body = ErrorBody),
        (status = 409, description = "The invocation is not a dead or expired async one", body = ErrorBody),
    )
)]
pub(crate) async fn retry_invocation(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let inv = visible_invocation(&node, &auth, &id, Scope::Invoke).await?;
    let not_retryable = |status: InvocationStatus| {
        SluiceError::new(
            ErrorKind::Conflict,
            format!(
                "invocation {id} is {}; only dead or expired invocations can be retried",
                status.as_str()
            ),
        )
    };
    if stored_mode(&inv)? != Mode::Async {
        // A sync call's request was streamed to the guest and never stored: there is nothing to
        // run again.
        return Err(SluiceError::new(
            ErrorKind::Conflict,
            format!("invocation {id} was a synchronous call; only async invocations can be retried"),
        )
        .into());
    }
    if !matches!(inv.status, InvocationStatus::Dead | InvocationStatus::Expired) {
        return Err(not_retryable(inv.status).into());
    }
    // The store decides under its own lock: a concurrent retry of the same invocation loses here.
    if !node.store.retry_dead(&inv.id, SystemClock.now_ms()).await? {
        return Err(not_retryable(inv.status).into());
    }
    node.notify_scheduler();
    // Purged between the two reads: as gone as an unknown id.
    let inv = node
        .store
        .get_invocation(&inv.id)
        .await?
        .ok_or_else(|| SluiceError::not_found(format!("no invocation {id}")))?;
    let location = format!("/v1/invocations/{}", inv.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, HeaderValue::from_str(&location).expect("ids are ASCII"))],
        Json(InvocationInfo::of(&inv)?),
    ))
}
