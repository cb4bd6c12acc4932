//! The rollout routes of `/v1`: start an automatic rollout of an alias, read where it is, cancel
//! it. A rollout is state in the store; the nodes' [`crate::rollout::Driver`] moves it on.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use bytes::Bytes;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use sluice_core::{ErrorKind, RolloutStatus, Scope, SluiceError, rfc3339};
use sluice_store::{NewRollout, Rollout, RolloutMove, RolloutStep};
use utoipa::ToSchema;

use crate::api_common::{ApiResult, Auth, ErrorBody, json_body};
use crate::node::Node;
use crate::rollout::{EVENTS, ROLLOUT_TICK};

/// The shortest step: a node judges its rollouts once per tick, so a shorter step would only
/// pretend to be shorter.
const EVERY_MS_MIN: u64 = ROLLOUT_TICK.as_millis() as u64;
/// The longest step: a day.
const EVERY_MS_MAX: u64 = 86_400_000;
/// The most canary calls a step may ask for before it is judged.
const MIN_CALLS_MAX: u64 = 1_000_000;

/// How to roll an alias out to a new version.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRollout {
    /// The version to roll out (the canary). The stable version is the one the alias names now.
    pub to: i64,
    /// The canary's percent of the alias's calls at each step: rising, the last 100.
    #[serde(default = "default_steps")]
    #[schema(default = json!([5, 25, 50, 100]))]
    pub steps: Vec<u32>,
    /// How long each step runs before it is judged, in milliseconds (500 to 86400000).
    #[serde(default = "default_every_ms")]
    #[schema(default = 120000)]
    pub every_ms: u64,
    /// How many percentage points the canary's error rate (5xx answers and failed calls) may
    /// exceed the stable version's, over a step, before the alias goes back.
    #[serde(default = "default_margin")]
    #[schema(default = 1.0)]
    pub max_error_rate_percent: f64,
    /// Canary calls a step needs before it is judged: with fewer it waits.
    #[serde(default = "default_min_calls")]
    #[schema(default = 20)]
    pub min_calls: u64,
}

fn default_steps() -> Vec<u32> {
    vec![5, 25, 50, 100]
}
fn default_every_ms() -> u64 {
    120_000
}
fn default_margin() -> f64 {
    1.0
}
fn default_min_calls() -> u64 {
    20
}

/// One step of a rollout and what the cluster counted during it.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct RolloutStepInfo {
    /// The canary's percent of the alias's calls.
    pub percent: u32,
    #[schema(format = DateTime)]
    pub started_at: String,
    pub canary_calls: u64,
    pub canary_errors: u64,
    pub stable_calls: u64,
    pub stable_errors: u64,
}

/// A rollout: where it is, and for an end that is not `promoted`, why.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct RolloutInfo {
    pub id: i64,
    pub alias: String,
    pub stable_version: i64,
    pub canary_version: i64,
    #[schema(schema_with = crate::api_openapi::rollout_status_schema)]
    pub status: RolloutStatus,
    /// Why it was rolled back or cancelled: for a rollback, both error rates and their counts.
    pub reason: Option<String>,
    /// The canary's percent now (its last step's, once ended).
    pub percent: u32,
    /// The steps asked for.
    pub plan: Vec<u32>,
    /// The steps run so far, in order.
    pub steps: Vec<RolloutStepInfo>,
    pub every_ms: u64,
    pub max_error_rate_percent: f64,
    pub min_calls: u64,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
}

/// Start an automatic rollout of an alias to a new version.
///
/// The alias moves to the first step at once; then, every `every_ms`, a step whose canary error
/// rate stayed within the stable version's plus the margin moves on, and one that did not puts
/// the alias back on the stable version (`rolled_back`). After the step before 100% passes, the
/// alias names only the new version (`promoted`). Setting the alias by hand cancels the rollout.
#[utoipa::path(
    put,
    path = "/v1/tenants/{tenant}/functions/{function}/aliases/{alias}/rollout",
    tag = "functions",
    params(
        ("tenant" = String, Path, description = "Tenant name", example = "default"),
        ("function" = String, Path, description = "Function name", example = "hello"),
        ("alias" = String, Path, description = "Alias name", example = "latest"),
    ),
    request_body = StartRollout,
    responses(
        (status = 201, description = "Started: the alias is at the first step", body = RolloutInfo),
        (status = 400, description = "Bad steps, step length, margin or minimum", body = ErrorBody),
        (status = 403, description = "The key lacks the `deploy` scope", body = ErrorBody),
        (status = 404, description = "No such function, alias or version (or another tenant's)",
            body = ErrorBody),
        (status = 409, description = "The alias has a rollout running, is split, or already names \
            the version", body = ErrorBody),
    )
)]
pub(crate) async fn start_rollout(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, function, alias)): Path<(String, String, String)>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<RolloutInfo>)> {
    auth.require(&tenant, Scope::Deploy)?;
    let req: StartRollout = json_body(&body, "rollout")?;
    sluice_store::check_steps(&req.steps).map_err(|e| SluiceError::bad_request(format!("steps: {e}")))?;
    if !(EVERY_MS_MIN..=EVERY_MS_MAX).contains(&req.every_ms) {
        return Err(SluiceError::bad_request(format!(
            "every_ms must be from {EVERY_MS_MIN} to {EVERY_MS_MAX}, not {}",
            req.every_ms
        ))
        .into());
    }
    if !(0.0..=100.0).contains(&req.max_error_rate_percent) {
        return Err(SluiceError::bad_request("max_error_rate_percent must be from 0 to 100").into());
    }
    if !(1..=MIN_CALLS_MAX).contains(&req.min_calls) {
        return Err(SluiceError::bad_request(format!("min_calls must be from 1 to {MIN_CALLS_MAX}")).into());
    }
    let started = node
        .store
        .start_rollout(&NewRollout {
            tenant: tenant.clone(),
            function: function.clone(),
            alias: alias.clone(),
            canary_version: req.to,
            steps: req.steps,
            every_ms: req.every_ms,
            margin_bp: (req.max_error_rate_percent * 100.0).round() as u32,
            min_calls: req.min_calls,
        })
        .await?;
    node.refresh_function(&tenant, &function).await?;
    tracing::info!(
        target: EVENTS,
        %tenant, %function, %alias, rollout = started.id, from = started.stable_version,
        to = started.canary_version, "rollout started"
    );
    let steps = node.store.rollout_steps(started.id).await?;
    Ok((StatusCode::CREATED, Json(rollout_info(&started, &steps))))
}

/// Show an alias's newest rollout, running or ended.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant}/functions/{function}/aliases/{alias}/rollout",
    tag = "functions",
    params(
        ("tenant" = String, Path, description = "Tenant name", example = "default"),
        ("function" = String, Path, description = "Function name", example = "hello"),
        ("alias" = String, Path, description = "Alias name", example = "latest"),
    ),
    responses(
        (status = 200, description = "The newest rollout of the alias", body = RolloutInfo),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 404, description = "The alias never had a rollout (or is another tenant's)",
            body = ErrorBody),
    )
)]
pub(crate) async fn get_rollout(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, function, alias)): Path<(String, String, String)>,
) -> ApiResult<Json<RolloutInfo>> {
    auth.require(&tenant, Scope::Read)?;
    let rollout = newest(&node, &tenant, &function, &alias).await?;
    let steps = node.store.rollout_steps(rollout.id).await?;
    Ok(Json(rollout_info(&rollout, &steps)))
}

/// Cancel an alias's running rollout: the alias goes back to the stable version.
#[utoipa::path(
    delete,
    path = "/v1/tenants/{tenant}/functions/{function}/aliases/{alias}/rollout",
    tag = "functions",
    params(
        ("tenant" = String, Path, description = "Tenant name", example = "default"),
        ("function" = String, Path, description = "Function name", example = "hello"),
        ("alias" = String, Path, description = "Alias name", example = "latest"),
    ),
    responses(
        (status = 200, description = "Cancelled: the alias names the stable version", body = RolloutInfo),
        (status = 403, description = "The key lacks the `deploy` scope", body = ErrorBody),
        (status = 404, description = "No rollout of the alias (or another tenant's)", body = ErrorBody),
        (status = 409, description = "The alias's newest rollout has ended already", body = ErrorBody),
    )
)]
pub(crate) async fn cancel_rollout(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, function, alias)): Path<(String, String, String)>,
) -> ApiResult<Json<RolloutInfo>> {
    auth.require(&tenant, Scope::Deploy)?;
    let rollout = newest(&node, &tenant, &function, &alias).await?;
    let why = Some("cancelled by `sluice rollout cancel`".to_string());
    let to = RolloutMove::End { status: RolloutStatus::Cancelled, reason: why };
    let Some(cancelled) = node.store.move_rollout(rollout.id, None, to).await? else {
        let now = node.store.latest_rollout(&tenant, &function, &alias).await?.unwrap_or(rollout);
        return Err(SluiceError::new(
            ErrorKind::Conflict,
            format!(
                "the rollout of {function}@{alias} to version {} has ended already ({})",
                now.canary_version, now.status
            ),
        )
        .into());
    };
    node.refresh_function(&tenant, &function).await?;
    tracing::info!(target: EVENTS, %tenant, %function, %alias, rollout = cancelled.id, "rollout cancelled");
    let steps = node.store.rollout_steps(cancelled.id).await?;
    Ok(Json(rollout_info(&cancelled, &steps)))
}

async fn newest(node: &Node, tenant: &str, function: &str, alias: &str) -> Result<Rollout, SluiceError> {
    node.store
        .latest_rollout(tenant, function, alias)
        .await
        .map_err(crate::error::store_error)?
        .ok_or_else(|| SluiceError::not_found(format!("no rollout of {function}@{alias} in tenant {tenant}")))
}

fn rollout_info(r: &Rollout, steps: &[RolloutStep]) -> RolloutInfo {
    RolloutInfo {
        id: r.id,
        alias: r.alias.clone(),
        stable_version: r.stable_version,
        canary_version: r.canary_version,
        status: r.status,
        reason: r.reason.clone(),
        percent: match r.status {
            RolloutStatus::Promoted => 100,
            RolloutStatus::RolledBack | RolloutStatus::Cancelled => 0,
            RolloutStatus::Running => r.steps[r.step],
        },
        plan: r.steps.clone(),
        steps: steps
            .iter()
            .map(|s| RolloutStepInfo {
                percent: s.percent,
                started_at: rfc3339(s.started_at),
                canary_calls: s.counts.canary_calls,
                canary_errors: s.counts.canary_errors,
                stable_calls: s.counts.stable_calls,
                stable_errors: s.counts.stable_errors,
            })
            .collect(),
        every_ms: r.every_ms,
        max_error_rate_percent: f64::from(r.margin_bp) / 100.0,
        min_calls: r.min_calls,
        created_at: rfc3339(r.created_at),
        updated_at: rfc3339(r.updated_at),
    }
}
