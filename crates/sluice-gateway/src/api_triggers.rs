//! The trigger routes of `/v1`: create, list, show, pause, resume and delete a tenant's broker
//! triggers. A trigger is state in the store; the node holding its lease consumes it (crate
//! `sluice-triggers`).
//!
//! Managing triggers takes the `deploy` scope (a trigger makes the platform call a function on
//! the tenant's behalf); reading them takes `read`. Credentials given in a URL are kept by the
//! store and never shown again: responses say only whether there are some.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use bytes::Bytes;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use sluice_core::trigger::{
    Source, TRIGGER_BATCH_DEFAULT, TRIGGER_BATCH_MAX, TRIGGER_WINDOW_MS_DEFAULT, TRIGGER_WINDOW_MS_MAX,
    TRIGGERS_PER_TENANT_MAX,
};
use sluice_core::{Clock, ErrorKind, Scope, SluiceError, SystemClock, rfc3339};
use sluice_store::{NewTrigger, Trigger};
use utoipa::ToSchema;

use crate::api_common::{ApiResult, Auth, ErrorBody, json_body};
use crate::api_schedules::SCHEDULE_PATH_BYTES_MAX;
use crate::node::Node;

/// How long a node's lease of a trigger lasts; it is renewed every [`TRIGGER_LEASE_RENEW`]. A
/// node that dies holds its triggers this long at most.
pub const TRIGGER_LEASE: std::time::Duration = std::time::Duration::from_secs(10);
pub const TRIGGER_LEASE_RENEW: std::time::Duration = std::time::Duration::from_secs(2);

/// A trigger to create: a name, the function (and alias) it calls, and its broker: `kind` with
/// `url` and, for `nats`, `stream` and `subject`; for `amqp`, `queue`; for `mqtt`, `topic` (and
/// `qos` 1).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTrigger {
    /// 1-63 characters of a-z, 0-9 and '-', not starting with '-'; unique in the tenant.
    #[schema(pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub name: String,
    pub function: String,
    /// The alias whose version each invocation runs, chosen when it is enqueued.
    #[serde(default = "default_alias")]
    #[schema(default = "latest")]
    pub alias: String,
    /// `nats` (JetStream), `amqp` (RabbitMQ) or `mqtt`.
    #[schema(pattern = "^(nats|amqp|mqtt)$")]
    pub kind: String,
    /// The broker, e.g. `nats://127.0.0.1:4222`; credentials in it (`amqp://user:pass@host`) are
    /// kept apart and never shown.
    pub url: String,
    /// nats: the stream, which must exist.
    pub stream: Option<String>,
    /// nats: the subject filter (wildcards allowed), e.g. `orders.>`.
    pub subject: Option<String>,
    /// amqp: the queue, which must exist.
    pub queue: Option<String>,
    /// mqtt: the topic filter, e.g. `sensors/#`.
    pub topic: Option<String>,
    /// mqtt: the QoS, 1 (the only one with acks).
    #[schema(minimum = 1, maximum = 1)]
    pub qos: Option<u8>,
    /// The request's path below the function.
    #[serde(default = "default_path")]
    #[schema(default = "/", pattern = "^/")]
    pub path: String,
    /// Most messages stored per commit (1 to 1000).
    #[serde(default = "default_batch")]
    #[schema(default = 100, minimum = 1, maximum = 1000)]
    pub batch: u32,
    /// Longest a batch waits to fill, in milliseconds (0 to 10000).
    #[serde(default = "default_window")]
    #[schema(default = 20, minimum = 0, maximum = 10000)]
    pub window_ms: u64,
    /// Run the messages of each subject (nats), routing key (amqp) or topic (mqtt) one at a
    /// time, in the broker's order: a message's invocation starts only after the one before it
    /// with the same key has finished (succeeded, or dead after its retries).
    #[serde(default)]
    pub ordered: bool,
}

fn default_alias() -> String {
    sluice_core::alias::LATEST.to_string()
}
fn default_path() -> String {
    "/".to_string()
}
fn default_batch() -> u32 {
    TRIGGER_BATCH_DEFAULT
}
fn default_window() -> u64 {
    TRIGGER_WINDOW_MS_DEFAULT
}

/// A trigger, with what its consumer saw lately.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct TriggerInfo {
    pub id: i64,
    pub name: String,
    pub function: String,
    pub alias: String,
    pub kind: String,
    /// The broker's URL, without credentials.
    pub url: String,
    /// Whether credentials are kept (they are never shown).
    pub credentials: bool,
    pub stream: Option<String>,
    pub subject: Option<String>,
    pub queue: Option<String>,
    pub topic: Option<String>,
    pub qos: Option<u8>,
    pub path: String,
    pub batch: u32,
    pub window_ms: u64,
    /// One invocation in flight per subject, routing key or topic, in order.
    pub ordered: bool,
    pub paused: bool,
    /// The node consuming it now, if one holds its lease.
    pub node: Option<String>,
    /// Messages committed, invocations stored, and redeliveries whose invocation was stored
    /// already (not stored again).
    pub received: u64,
    pub enqueued: u64,
    pub duplicates: u64,
    /// Messages the broker holds that the trigger has not taken yet, as last seen.
    pub lag: Option<u64>,
    /// Acks per second over the last seconds, as last seen.
    pub acked_per_s: Option<u64>,
    pub last_error: Option<String>,
    #[schema(format = DateTime)]
    pub last_error_at: Option<String>,
    #[schema(format = DateTime)]
    pub last_commit_at: Option<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
}

/// A tenant's triggers, by name.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct TriggerList {
    pub triggers: Vec<TriggerInfo>,
}

/// Create a trigger.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant}/triggers",
    tag = "triggers",
    params(("tenant" = String, Path, description = "Tenant name", example = "default")),
    request_body = CreateTrigger,
    responses(
        (status = 201, description = "Created", body = TriggerInfo),
        (status = 400, description = "Bad name, broker, batch or path", body = ErrorBody),
        (status = 403, description = "The key lacks the `deploy` scope", body = ErrorBody),
        (status = 404, description = "No such tenant or function (or another tenant's)", body = ErrorBody),
        (status = 409, description = "The tenant has a trigger of this name", body = ErrorBody),
        (status = 413, description = "Request body too large", body = ErrorBody),
        (status = 507, description = "The tenant has as many triggers as it may", body = ErrorBody),
    )
)]
pub(crate) async fn create_trigger(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path(tenant): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<TriggerInfo>)> {
    auth.require(&tenant, Scope::Deploy)?;
    let req: CreateTrigger = json_body(&body, "trigger")?;
    let new = validate(&node, &tenant, req)?;
    let count = node.store.count_triggers(&tenant).await?;
    if count >= TRIGGERS_PER_TENANT_MAX {
        return Err(SluiceError::new(
            ErrorKind::StorageQuotaExceeded,
            format!("tenant {tenant} has {count} triggers, the most a tenant may have; delete one first"),
        )
        .into());
    }
    let created = node.store.create_trigger(&new).await?;
    Ok((StatusCode::CREATED, Json(info(&created, SystemClock.now_ms()))))
}

fn validate(node: &Node, tenant: &str, req: CreateTrigger) -> Result<NewTrigger, SluiceError> {
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
    let only = |allowed: &[&str]| -> Result<(), SluiceError> {
        let given = [
            ("stream", req.stream.is_some()),
            ("subject", req.subject.is_some()),
            ("queue", req.queue.is_some()),
            ("topic", req.topic.is_some()),
            ("qos", req.qos.is_some()),
        ];
        match given.iter().find(|(name, set)| *set && !allowed.contains(name)) {
            Some((name, _)) => Err(bad(format!("{name} does not apply to a {} trigger", req.kind))),
            None => Ok(()),
        }
    };
    let need = |what: &str, v: &Option<String>| {
        v.clone().ok_or_else(|| bad(format!("a {} trigger needs {what}", req.kind)))
    };
    let source = match req.kind.as_str() {
        "nats" => {
            only(&["stream", "subject"])?;
            Source::Nats {
                url: req.url.clone(),
                stream: need("stream", &req.stream)?,
                subject: need("subject", &req.subject)?,
            }
        }
        "amqp" => {
            only(&["queue"])?;
            Source::Amqp { url: req.url.clone(), queue: need("queue", &req.queue)? }
        }
        "mqtt" => {
            only(&["topic", "qos"])?;
            Source::Mqtt {
                url: req.url.clone(),
                topic: need("topic", &req.topic)?,
                qos: req.qos.unwrap_or(1),
            }
        }
        other => return Err(bad(format!("kind must be nats, amqp or mqtt, not {other:?}"))),
    };
    let (source, credentials) = source.checked().map_err(bad)?;
    if !source.broker_allowed(node.config.trigger_brokers.as_deref()) {
        return Err(bad(format!(
            "broker {} is not one this node's triggers may connect to (serve --trigger-brokers)",
            source.broker_address()
        )));
    }
    if !(1..=TRIGGER_BATCH_MAX).contains(&req.batch) {
        return Err(bad(format!("batch must be from 1 to {TRIGGER_BATCH_MAX}, not {}", req.batch)));
    }
    if req.window_ms > TRIGGER_WINDOW_MS_MAX {
        return Err(bad(format!(
            "window_ms must be from 0 to {TRIGGER_WINDOW_MS_MAX}, not {}",
            req.window_ms
        )));
    }
    if !req.path.starts_with('/')
        || req.path.len() > SCHEDULE_PATH_BYTES_MAX
        || http::uri::PathAndQuery::try_from(req.path.as_str()).is_err()
    {
        return Err(bad(format!(
            "path must start with / and be a valid URL path (and query) of at most {SCHEDULE_PATH_BYTES_MAX} bytes"
        )));
    }
    Ok(NewTrigger {
        tenant: tenant.to_string(),
        name: req.name,
        function: req.function,
        alias: req.alias,
        source,
        credentials,
        path: req.path,
        batch_max: req.batch,
        window_ms: req.window_ms,
        ordered: req.ordered,
    })
}

/// List a tenant's triggers.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant}/triggers",
    tag = "triggers",
    params(("tenant" = String, Path, description = "Tenant name", example = "default")),
    responses(
        (status = 200, description = "The tenant's triggers, by name", body = TriggerList),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 404, description = "No such tenant (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn list_triggers(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path(tenant): Path<String>,
) -> ApiResult<Json<TriggerList>> {
    auth.require(&tenant, Scope::Read)?;
    let now = SystemClock.now_ms();
    let triggers = node.store.list_triggers(&tenant).await?;
    Ok(Json(TriggerList { triggers: triggers.iter().map(|t| info(t, now)).collect() }))
}

/// Show a trigger: its broker, its node, and its counts, lag, rate and last error.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant}/triggers/{trigger}",
    tag = "triggers",
    params(
        ("tenant" = String, Path, description = "Tenant name", example = "default"),
        ("trigger" = String, Path, description = "Trigger name", example = "orders"),
    ),
    responses(
        (status = 200, description = "The trigger", body = TriggerInfo),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 404, description = "No such trigger (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn get_trigger(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, name)): Path<(String, String)>,
) -> ApiResult<Json<TriggerInfo>> {
    auth.require(&tenant, Scope::Read)?;
    let t = node.store.get_trigger(&tenant, &name).await?.ok_or_else(|| no_trigger(&tenant, &name))?;
    Ok(Json(info(&t, SystemClock.now_ms())))
}

/// Delete a trigger. Its node stops consuming within a lease renewal; invocations it enqueued
/// stay; messages not yet taken stay in the broker.
#[utoipa::path(
    delete,
    path = "/v1/tenants/{tenant}/triggers/{trigger}",
    tag = "triggers",
    params(
        ("tenant" = String, Path, description = "Tenant name", example = "default"),
        ("trigger" = String, Path, description = "Trigger name", example = "orders"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 403, description = "The key lacks the `deploy` scope", body = ErrorBody),
        (status = 404, description = "No such trigger (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn delete_trigger(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    auth.require(&tenant, Scope::Deploy)?;
    if !node.store.delete_trigger(&tenant, &name).await? {
        return Err(no_trigger(&tenant, &name).into());
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Pause a trigger: its node stops consuming within a lease renewal; messages wait in the broker.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant}/triggers/{trigger}/pause",
    tag = "triggers",
    params(
        ("tenant" = String, Path, description = "Tenant name", example = "default"),
        ("trigger" = String, Path, description = "Trigger name", example = "orders"),
    ),
    responses(
        (status = 200, description = "Paused", body = TriggerInfo),
        (status = 403, description = "The key lacks the `deploy` scope", body = ErrorBody),
        (status = 404, description = "No such trigger (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn pause_trigger(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, name)): Path<(String, String)>,
) -> ApiResult<Json<TriggerInfo>> {
    set_paused(&node, auth, &tenant, &name, true).await
}

/// Resume a paused trigger: a node takes its lease within a renewal and consumes from where it
/// stopped.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant}/triggers/{trigger}/resume",
    tag = "triggers",
    params(
        ("tenant" = String, Path, description = "Tenant name", example = "default"),
        ("trigger" = String, Path, description = "Trigger name", example = "orders"),
    ),
    responses(
        (status = 200, description = "Resumed", body = TriggerInfo),
        (status = 403, description = "The key lacks the `deploy` scope", body = ErrorBody),
        (status = 404, description = "No such trigger (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn resume_trigger(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, name)): Path<(String, String)>,
) -> ApiResult<Json<TriggerInfo>> {
    set_paused(&node, auth, &tenant, &name, false).await
}

async fn set_paused(
    node: &Node,
    auth: Auth,
    tenant: &str,
    name: &str,
    paused: bool,
) -> ApiResult<Json<TriggerInfo>> {
    auth.require(tenant, Scope::Deploy)?;
    let t =
        node.store.set_trigger_paused(tenant, name, paused).await?.ok_or_else(|| no_trigger(tenant, name))?;
    Ok(Json(info(&t, SystemClock.now_ms())))
}

fn no_trigger(tenant: &str, name: &str) -> SluiceError {
    SluiceError::not_found(format!("no trigger {name} in tenant {tenant}"))
}

fn info(t: &Trigger, now: i64) -> TriggerInfo {
    let (mut stream, mut subject, mut queue, mut topic, mut qos) = (None, None, None, None, None);
    match &t.source {
        Source::Nats { stream: s, subject: j, .. } => (stream, subject) = (Some(s.clone()), Some(j.clone())),
        Source::Amqp { queue: q, .. } => queue = Some(q.clone()),
        Source::Mqtt { topic: p, qos: q, .. } => (topic, qos) = (Some(p.clone()), Some(*q)),
    }
    TriggerInfo {
        id: t.id,
        name: t.name.clone(),
        function: t.function.clone(),
        alias: t.alias.clone(),
        kind: t.source.kind().to_string(),
        url: t.source.url().to_string(),
        credentials: !t.credentials.is_empty(),
        stream,
        subject,
        queue,
        topic,
        qos,
        path: t.path.clone(),
        batch: t.batch_max,
        window_ms: t.window_ms,
        ordered: t.ordered,
        paused: t.paused,
        node: t.owner.clone().filter(|_| t.owner_until >= now),
        received: t.received,
        enqueued: t.enqueued,
        duplicates: t.duplicates,
        lag: t.lag,
        acked_per_s: t.acked_per_s,
        last_error: t.last_error.clone(),
        last_error_at: t.last_error_at.map(rfc3339),
        last_commit_at: t.last_commit_at.map(rfc3339),
        created_at: rfc3339(t.created_at),
        updated_at: rfc3339(t.updated_at),
    }
}
