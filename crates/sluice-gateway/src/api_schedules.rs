//! The schedule routes of `/v1`: create, list, show (with the next fire times), pause, resume,
//! delete and backfill a tenant's schedules. A schedule is state in the store; every node's
//! [`crate::schedule::tick`] fires it.
//!
//! Managing schedules takes the `deploy` scope (a schedule makes the platform call a function on
//! the tenant's behalf, as deploying decides what runs); reading them takes `read`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use bytes::Bytes;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use sluice_core::schedule::{
    BACKFILL_MAX, NEXT_FIRES_SHOWN, SCHEDULE_FLEX_MS_MAX, SCHEDULE_INTERVAL_MS_MAX, SCHEDULE_INTERVAL_MS_MIN,
    When,
};
use sluice_core::{Catchup, Clock, ErrorKind, Overlap, Scope, SluiceError, SystemClock, rfc3339};
use sluice_store::{NewSchedule, Schedule};
use utoipa::ToSchema;

use crate::api_common::{ApiResult, Auth, ErrorBody, json_body};
use crate::node::Node;

/// Most headers a schedule's request carries, and most bytes of each value.
pub const SCHEDULE_HEADERS_MAX: usize = 32;
pub const SCHEDULE_HEADER_BYTES_MAX: usize = 8 * 1024;
/// Most bytes of a schedule's request path and query.
pub const SCHEDULE_PATH_BYTES_MAX: usize = 2 * 1024;

/// A schedule to create: a name, the function (and alias) it calls, exactly one of `cron`,
/// `every_ms` and `at`, and the request each invocation gets (`POST` to `path` with these
/// headers and body).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSchedule {
    /// 1-63 characters of a-z, 0-9 and '-', not starting with '-'; unique in the tenant.
    #[schema(pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub name: String,
    pub function: String,
    /// The alias whose version each invocation runs, chosen when it is enqueued.
    #[serde(default = "default_alias")]
    #[schema(default = "latest")]
    pub alias: String,
    /// A cron expression: 5 fields (minute first) or 6 (second first), e.g. `*/5 * * * *`.
    pub cron: Option<String>,
    /// The IANA time zone the cron expression is read in (with its DST changes).
    pub tz: Option<String>,
    /// Fire every this many milliseconds (1000 to 31622400000), at multiples of it since the
    /// Unix epoch.
    #[schema(minimum = 1000, maximum = 31622400000_i64)]
    pub every_ms: Option<u64>,
    /// Fire once, at this time (RFC 3339).
    #[schema(format = DateTime)]
    pub at: Option<String>,
    /// The invocations' start window in milliseconds (0 to 86400000): each may start up to this
    /// long after its occurrence, when the node has room (time-shifting).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 86400000)]
    pub flex_ms: u64,
    /// When an occurrence is due while the previous one's invocation has not finished.
    #[serde(default = "default_overlap")]
    #[schema(schema_with = crate::api_openapi::overlap_schema)]
    pub overlap: Overlap,
    /// What to do with occurrences missed while no node ran.
    #[serde(default = "default_catchup")]
    #[schema(schema_with = crate::api_openapi::catchup_schema)]
    pub catchup: Catchup,
    /// The request's path below the function, with its query.
    #[serde(default = "default_path")]
    #[schema(default = "/", pattern = "^/")]
    pub path: String,
    /// `[name, value]` pairs the request carries.
    #[serde(default)]
    #[schema(schema_with = crate::api_openapi::header_pairs_schema)]
    pub headers: Vec<(String, String)>,
    /// The request body (text).
    #[serde(default)]
    pub body: String,
}

fn default_path() -> String {
    "/".to_string()
}

fn default_alias() -> String {
    sluice_core::alias::LATEST.to_string()
}
fn default_overlap() -> Overlap {
    Overlap::Skip
}
fn default_catchup() -> Catchup {
    Catchup::Latest
}

/// A schedule, with its next fire times.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ScheduleInfo {
    pub id: i64,
    pub name: String,
    pub function: String,
    pub alias: String,
    pub cron: Option<String>,
    pub tz: Option<String>,
    pub every_ms: Option<u64>,
    #[schema(format = DateTime)]
    pub at: Option<String>,
    pub flex_ms: u64,
    #[schema(schema_with = crate::api_openapi::overlap_schema)]
    pub overlap: Overlap,
    #[schema(schema_with = crate::api_openapi::catchup_schema)]
    pub catchup: Catchup,
    pub path: String,
    #[schema(schema_with = crate::api_openapi::header_pairs_schema)]
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub paused: bool,
    /// The next occurrences (at most five); empty when paused or when a one-time schedule fired.
    /// The first may be fired ahead already: enqueued before its time (see `serve
    /// --schedule-fire-ahead`), runnable at it, and then also `last_fired_for`.
    #[schema(value_type = Vec<String>)]
    pub next_fires: Vec<String>,
    /// An occurrence waiting for the previous invocation to finish (`buffer-one`).
    #[schema(format = DateTime)]
    pub buffered_for: Option<String>,
    /// The last occurrence enqueued, and its invocation.
    #[schema(format = DateTime)]
    pub last_fired_for: Option<String>,
    pub last_invocation: Option<String>,
    /// Invocations enqueued so far, and occurrences skipped (by the overlap or catch-up policy,
    /// a quota, or a missing alias).
    pub fires: u64,
    pub skipped: u64,
    /// Why an occurrence was last skipped for a reason other than the policies.
    pub last_error: Option<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
}

/// A tenant's schedules, by name.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ScheduleList {
    pub schedules: Vec<ScheduleInfo>,
}

/// The occurrences to enqueue now, whatever the policies: every one in `[from, to]` (at most
/// 1000), each with the schedule's idempotency key, so occurrences fired in the last 24 hours
/// are not enqueued again.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Backfill {
    #[schema(format = DateTime)]
    pub from: String,
    #[schema(format = DateTime)]
    pub to: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct BackfillDone {
    /// Occurrences in the range.
    pub occurrences: u64,
    /// Invocations stored (the others had fired already).
    pub enqueued: u64,
}

/// Create a schedule.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant}/schedules",
    tag = "schedules",
    params(("tenant" = String, Path, description = "Tenant name", example = "default")),
    request_body = CreateSchedule,
    responses(
        (status = 201, description = "Created, with its next fire times", body = ScheduleInfo),
        (status = 400, description = "Bad name, timing, policy, header or body", body = ErrorBody),
        (status = 403, description = "The key lacks the `deploy` scope", body = ErrorBody),
        (status = 404, description = "No such tenant or function (or another tenant's)", body = ErrorBody),
        (status = 409, description = "The tenant has a schedule of this name", body = ErrorBody),
        (status = 413, description = "Request body too large", body = ErrorBody),
        (status = 507, description = "The tenant is at its quota of schedules (schedules_max)",
            body = ErrorBody),
    )
)]
pub(crate) async fn create_schedule(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path(tenant): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<ScheduleInfo>)> {
    auth.require(&tenant, Scope::Deploy)?;
    let req: CreateSchedule = json_body(&body, "schedule")?;
    let now = SystemClock.now_ms();
    let new = validate(&node, &tenant, req, now)?;
    let limits = node.quotas.limits(&tenant);
    let count = node.store.count_schedules(&tenant).await?;
    if count >= limits.schedules_max {
        return Err(SluiceError::new(
            ErrorKind::StorageQuotaExceeded,
            format!(
                "tenant {tenant} has {count} schedules, its quota (schedules_max) is {}; delete one first",
                limits.schedules_max
            ),
        )
        .into());
    }
    let created = node.store.create_schedule(&new).await?;
    Ok((StatusCode::CREATED, Json(info(&created, now))))
}

/// Checks a request and computes the schedule's first occurrence.
fn validate(node: &Node, tenant: &str, req: CreateSchedule, now: i64) -> Result<NewSchedule, SluiceError> {
    fn bad(message: impl Into<String>) -> SluiceError {
        SluiceError::bad_request(message)
    }
    if !sluice_core::ids::valid_name(&req.name) {
        return Err(bad("name must be 1-63 characters of a-z, 0-9 and '-', not starting with '-'"));
    }
    if !sluice_core::ids::valid_name(&req.function) {
        return Err(SluiceError::not_found(format!("no function {} in tenant {tenant}", req.function)));
    }
    if !sluice_core::alias::valid_name(&req.alias) {
        return Err(bad(format!("alias {:?} is not a valid alias name", req.alias)));
    }
    if req.tz.is_some() && req.cron.is_none() {
        return Err(bad("tz applies to a cron expression only"));
    }
    let when = match (req.cron, req.every_ms, req.at) {
        (Some(expr), None, None) => When::Cron { expr, tz: req.tz.unwrap_or_else(|| "UTC".into()) },
        (None, Some(every_ms), None) => When::Every { every_ms },
        (None, None, Some(at)) => When::At {
            at: sluice_core::parse_rfc3339(&at).ok_or_else(|| {
                bad(format!("at {at:?} is not an RFC 3339 time (e.g. 2026-11-21T20:00:00Z)"))
            })?,
        },
        _ => return Err(bad("give exactly one of cron, every_ms and at")),
    };
    if let When::Every { every_ms } = when
        && !(SCHEDULE_INTERVAL_MS_MIN..=SCHEDULE_INTERVAL_MS_MAX).contains(&every_ms)
    {
        return Err(bad(format!(
            "every_ms must be from {SCHEDULE_INTERVAL_MS_MIN} to {SCHEDULE_INTERVAL_MS_MAX}, not {every_ms}"
        )));
    }
    let table = when.timetable().map_err(bad)?;
    if let When::At { at } = when
        && at <= now
    {
        return Err(bad(format!("at {} is in the past", rfc3339(at))));
    }
    if req.flex_ms > SCHEDULE_FLEX_MS_MAX {
        return Err(bad(format!("flex_ms must be from 0 to {SCHEDULE_FLEX_MS_MAX}, not {}", req.flex_ms)));
    }
    if !req.path.starts_with('/')
        || req.path.len() > SCHEDULE_PATH_BYTES_MAX
        || http::uri::PathAndQuery::try_from(req.path.as_str()).is_err()
    {
        return Err(bad(format!(
            "path must start with / and be a valid URL path (and query) of at most {SCHEDULE_PATH_BYTES_MAX} bytes"
        )));
    }
    if req.headers.len() > SCHEDULE_HEADERS_MAX {
        return Err(bad(format!("at most {SCHEDULE_HEADERS_MAX} headers")));
    }
    let mut headers = Vec::with_capacity(req.headers.len());
    for (name, value) in req.headers {
        let parsed = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| bad(format!("header name {name:?} is not a valid HTTP header name")))?;
        if parsed.as_str().starts_with("sluice-") {
            return Err(bad(format!("header {name}: names starting with sluice- are the platform's")));
        }
        if value.len() > SCHEDULE_HEADER_BYTES_MAX || http::HeaderValue::from_str(&value).is_err() {
            return Err(bad(format!(
                "header {name}: the value must be visible ASCII (and spaces), at most {SCHEDULE_HEADER_BYTES_MAX} bytes"
            )));
        }
        headers.push((parsed.as_str().to_string(), value.into_bytes()));
    }
    let body_max = node.config.limits.async_body_bytes_max;
    if req.body.len() as u64 > body_max {
        return Err(bad(format!("body must be at most {body_max} bytes (the async body limit)")));
    }
    Ok(NewSchedule {
        tenant: tenant.to_string(),
        name: req.name,
        function: req.function,
        alias: req.alias,
        path: req.path,
        next_fire_at: table.next_after(now),
        when,
        flex_ms: req.flex_ms,
        overlap: req.overlap,
        catchup: req.catchup,
        headers,
        body: req.body.into_bytes(),
    })
}

/// List a tenant's schedules.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant}/schedules",
    tag = "schedules",
    params(("tenant" = String, Path, description = "Tenant name", example = "default")),
    responses(
        (status = 200, description = "The tenant's schedules, by name", body = ScheduleList),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 404, description = "No such tenant (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn list_schedules(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path(tenant): Path<String>,
) -> ApiResult<Json<ScheduleList>> {
    auth.require(&tenant, Scope::Read)?;
    let now = SystemClock.now_ms();
    let schedules = node.store.list_schedules(&tenant).await?;
    Ok(Json(ScheduleList { schedules: schedules.iter().map(|s| info(s, now)).collect() }))
}

/// Show a schedule and its next fire times.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant}/schedules/{schedule}",
    tag = "schedules",
    params(
        ("tenant" = String, Path, description = "Tenant name", example = "default"),
        ("schedule" = String, Path, description = "Schedule name", example = "nightly"),
    ),
    responses(
        (status = 200, description = "The schedule", body = ScheduleInfo),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 404, description = "No such schedule (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn get_schedule(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, name)): Path<(String, String)>,
) -> ApiResult<Json<ScheduleInfo>> {
    auth.require(&tenant, Scope::Read)?;
    let s = found(&node, &tenant, &name).await?;
    Ok(Json(info(&s, SystemClock.now_ms())))
}

/// Delete a schedule. Invocations it enqueued stay.
#[utoipa::path(
    delete,
    path = "/v1/tenants/{tenant}/schedules/{schedule}",
    tag = "schedules",
    params(
        ("tenant" = String, Path, description = "Tenant name", example = "default"),
        ("schedule" = String, Path, description = "Schedule name", example = "nightly"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 403, description = "The key lacks the `deploy` scope", body = ErrorBody),
        (status = 404, description = "No such schedule (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn delete_schedule(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    auth.require(&tenant, Scope::Deploy)?;
    if !node.store.delete_schedule(&tenant, &name).await? {
        return Err(no_schedule(&tenant, &name).into());
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Pause a schedule: nothing fires until it is resumed (a buffered occurrence is dropped).
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant}/schedules/{schedule}/pause",
    tag = "schedules",
    params(
        ("tenant" = String, Path, description = "Tenant name", example = "default"),
        ("schedule" = String, Path, description = "Schedule name", example = "nightly"),
    ),
    responses(
        (status = 200, description = "Paused", body = ScheduleInfo),
        (status = 403, description = "The key lacks the `deploy` scope", body = ErrorBody),
        (status = 404, description = "No such schedule (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn pause_schedule(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, name)): Path<(String, String)>,
) -> ApiResult<Json<ScheduleInfo>> {
    auth.require(&tenant, Scope::Deploy)?;
    let paused = node
        .store
        .set_schedule_paused(&tenant, &name, true, None)
        .await?
        .ok_or_else(|| no_schedule(&tenant, &name))?;
    Ok(Json(info(&paused, SystemClock.now_ms())))
}

/// Resume a paused schedule from its next occurrence after now: what fell in the pause is not
/// caught up.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant}/schedules/{schedule}/resume",
    tag = "schedules",
    params(
        ("tenant" = String, Path, description = "Tenant name", example = "default"),
        ("schedule" = String, Path, description = "Schedule name", example = "nightly"),
    ),
    responses(
        (status = 200, description = "Resumed", body = ScheduleInfo),
        (status = 403, description = "The key lacks the `deploy` scope", body = ErrorBody),
        (status = 404, description = "No such schedule (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn resume_schedule(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, name)): Path<(String, String)>,
) -> ApiResult<Json<ScheduleInfo>> {
    auth.require(&tenant, Scope::Deploy)?;
    let s = found(&node, &tenant, &name).await?;
    let now = SystemClock.now_ms();
    let next = if s.paused {
        let table = s.when.timetable().map_err(SluiceError::internal)?;
        // What fell in the pause is skipped, a one-time schedule's time too: it never fires.
        table.next_after(now)
    } else {
        s.next_fire_at
    };
    let resumed = node
        .store
        .set_schedule_paused(&tenant, &name, false, next)
        .await?
        .ok_or_else(|| no_schedule(&tenant, &name))?;
    Ok(Json(info(&resumed, now)))
}

/// Enqueue a schedule's occurrences in a range now (at most 1000), whatever its policies.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant}/schedules/{schedule}/backfill",
    tag = "schedules",
    params(
        ("tenant" = String, Path, description = "Tenant name", example = "default"),
        ("schedule" = String, Path, description = "Schedule name", example = "nightly"),
    ),
    request_body = Backfill,
    responses(
        (status = 200, description = "Enqueued", body = BackfillDone),
        (status = 400, description = "Bad range", body = ErrorBody),
        (status = 403, description = "The key lacks the `deploy` scope", body = ErrorBody),
        (status = 404, description = "No such schedule, or its alias is missing (or another tenant's)",
            body = ErrorBody),
        (status = 413, description = "Request body too large", body = ErrorBody),
        (status = 429, description = "The tenant is at its queued quota", body = ErrorBody),
    )
)]
pub(crate) async fn backfill_schedule(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<BackfillDone>> {
    auth.require(&tenant, Scope::Deploy)?;
    let req: Backfill = json_body(&body, "backfill")?;
    let time = |what: &str, t: &str| {
        sluice_core::parse_rfc3339(t)
            .ok_or_else(|| SluiceError::bad_request(format!("{what} {t:?} is not an RFC 3339 time")))
    };
    let (from, to) = (time("from", &req.from)?, time("to", &req.to)?);
    if to < from {
        return Err(SluiceError::bad_request("to is before from").into());
    }
    let s = found(&node, &tenant, &name).await?;
    let (occurrences, enqueued) = crate::schedule::backfill(&node, &s, from, to).await?;
    if occurrences == BACKFILL_MAX {
        tracing::info!(target: crate::schedule::EVENTS, %tenant, schedule = %name, "backfill stopped at {BACKFILL_MAX} occurrences");
    }
    Ok(Json(BackfillDone { occurrences: occurrences as u64, enqueued }))
}

async fn found(node: &Node, tenant: &str, name: &str) -> Result<Schedule, SluiceError> {
    node.store
        .get_schedule(tenant, name)
        .await
        .map_err(crate::error::store_error)?
        .ok_or_else(|| no_schedule(tenant, name))
}

fn no_schedule(tenant: &str, name: &str) -> SluiceError {
    SluiceError::not_found(format!("no schedule {name} in tenant {tenant}"))
}

fn info(s: &Schedule, now: i64) -> ScheduleInfo {
    let (cron, tz, every_ms, at) = match &s.when {
        When::Cron { expr, tz } => (Some(expr.clone()), Some(tz.clone()), None, None),
        When::Every { every_ms } => (None, None, Some(*every_ms), None),
        When::At { at } => (None, None, None, Some(rfc3339(*at))),
    };
    // An occurrence fired ahead (enqueued, runnable at its time) is still to come: listed first.
    let ahead = s.last_fired_for.filter(|t| *t > now && !s.paused);
    let next_fires = match (s.paused, s.next_fire_at, s.when.timetable()) {
        (false, Some(next), Ok(table)) => {
            // The stored next occurrence first (it may be due), then the ones after it.
            let mut fires: Vec<i64> = ahead.into_iter().chain([next]).collect();
            // After a due one, the next are those after now (a due one fires at the next tick).
            let mut t = next.max(now);
            while fires.len() < NEXT_FIRES_SHOWN {
                match table.next_after(t) {
                    Some(after) => {
                        fires.push(after);
                        t = after;
                    }
                    None => break,
                }
            }
            fires.into_iter().map(rfc3339).collect()
        }
        _ => ahead.into_iter().map(rfc3339).collect(),
    };
    ScheduleInfo {
        id: s.id,
        name: s.name.clone(),
        function: s.function.clone(),
        alias: s.alias.clone(),
        cron,
        tz,
        every_ms,
        at,
        flex_ms: s.flex_ms,
        overlap: s.overlap,
        catchup: s.catchup,
        path: s.path.clone(),
        headers: s
            .headers
            .iter()
            .map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect(),
        body: String::from_utf8_lossy(&s.body).into_owned(),
        paused: s.paused,
        next_fires,
        buffered_for: s.buffered_for.map(rfc3339),
        last_fired_for: s.last_fired_for.map(rfc3339),
        last_invocation: s.last_invocation.clone(),
        fires: s.fires,
        skipped: s.skipped,
        last_error: s.last_error.clone(),
        created_at: rfc3339(s.created_at),
        updated_at: rfc3339(s.updated_at),
    }
}
