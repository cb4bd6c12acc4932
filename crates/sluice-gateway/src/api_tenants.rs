//! `/v1/tenants` and `/v1/keys`: creating tenants and minting, listing and revoking API keys.
//!
//! Managing tenants and keys is for admin keys. A tenant key sees its own tenant and its keys but
//! may not mint or revoke keys (403); other tenants and their keys answer 404 like missing ones.
//! A key is shown once, in the answer that creates it, and stored only as its SHA-256. Every
//! change reloads the node's key cache, so a new key works and a revoked key fails at once.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};
use sluice_core::vocab::listed;
use sluice_core::{Clock, Scope, SluiceError, SystemClock, rfc3339};
use sluice_store::{KeyRecord, Tenant};
use utoipa::ToSchema;

use crate::api_common::{ApiResult, Auth, ErrorBody, admin_only, json_body, require_tenant};
use crate::api_openapi::{key_scopes_schema, tenant_scopes_schema};
use crate::node::Node;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    /// 1-63 characters of a-z, 0-9 and '-', not starting with '-'.
    #[schema(pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub name: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct TenantInfo {
    pub name: String,
    #[schema(format = DateTime)]
    pub created_at: String,
}

impl TenantInfo {
    fn of(t: &Tenant) -> Self {
        Self { name: t.name.clone(), created_at: rfc3339(t.created_at) }
    }
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct TenantList {
    pub tenants: Vec<TenantInfo>,
}

/// Create a tenant (admin only).
#[utoipa::path(
    post,
    path = "/v1/tenants",
    tag = "tenants",
    request_body = CreateTenant,
    responses(
        (status = 201, description = "Created", body = TenantInfo),
        (status = 400, description = "Invalid name or body", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 409, description = "The tenant exists", body = ErrorBody),
        (status = 413, description = "Request body too large", body = ErrorBody),
    )
)]
pub(crate) async fn create_tenant(
    State(node): State<Arc<Node>>,
    auth: Auth,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<TenantInfo>)> {
    if !auth.0.is_admin() {
        return Err(admin_only("create tenants").into());
    }
    let req: CreateTenant = json_body(&body, "tenant")?;
    if !sluice_core::ids::valid_name(&req.name) {
        return Err(SluiceError::bad_request(format!(
            "invalid tenant name {:?}: use 1-63 characters of a-z, 0-9 and '-', not starting with '-'",
            req.name
        ))
        .into());
    }
    let tenant = node.store.create_tenant(&req.name).await?;
    Ok((StatusCode::CREATED, Json(TenantInfo::of(&tenant))))
}

/// List tenants: all of them for an admin key, the key's own tenant otherwise.
#[utoipa::path(
    get,
    path = "/v1/tenants",
    tag = "tenants",
    responses((status = 200, description = "The tenants this key sees", body = TenantList))
)]
pub(crate) async fn list_tenants(State(node): State<Arc<Node>>, auth: Auth) -> ApiResult<Json<TenantList>> {
    let tenants = node.store.list_tenants().await?;
    let tenants = tenants.iter().filter(|t| auth.0.sees(&t.name)).map(TenantInfo::of).collect();
    Ok(Json(TenantList { tenants }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// What the key may do in the tenant (`Scope::TENANT`: `admin` keys are bound to no tenant
    /// and are not minted here). Duplicates are ignored.
    #[schema(schema_with = tenant_scopes_schema)]
    pub scopes: Vec<String>,
    /// Limit the key to calling this alias of the tenant's functions (`/fn/{t}/{f}@{alias}/`):
    /// not `latest`, other aliases, versions by number or `sluice-version`. Omitted: any.
    #[serde(default)]
    pub alias: Option<String>,
}

/// An API key as listed: never the key itself or its hash.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct KeyInfo {
    pub id: String,
    /// Null for admin keys, which are not bound to a tenant.
    pub tenant: Option<String>,
    #[schema(schema_with = key_scopes_schema)]
    pub scopes: Vec<Scope>,
    #[schema(format = DateTime)]
    pub created_at: String,
    pub revoked: bool,
    /// The only alias the key may call; null: any.
    pub alias: Option<String>,
}

impl KeyInfo {
    fn of(k: &KeyRecord) -> Self {
        Self {
            id: k.id.clone(),
            tenant: k.tenant.clone(),
            scopes: k.scopes.clone(),
            created_at: rfc3339(k.created_at),
            revoked: k.revoked,
            alias: k.alias.clone(),
        }
    }
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<KeyInfo>,
}

/// A key just minted: the only answer that ever contains it.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub info: KeyInfo,
    /// The API key. It is not stored and cannot be shown again.
    pub key: String,
}

/// Mint an API key for a tenant (admin only).
///
/// The key is in this answer only; sluice keeps its SHA-256. It works at once.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant}/keys",
    tag = "keys",
    params(("tenant" = String, Path, description = "Tenant name", example = "default")),
    request_body = CreateKey,
    responses(
        (status = 201, description = "Created; `key` is shown only here", body = CreatedKey),
        (status = 400, description = "No scopes, or an unknown or admin scope", body = ErrorBody),
        (status = 403, description = "Not an admin key (a tenant key cannot mint keys)", body = ErrorBody),
        (status = 404, description = "No such tenant (or another tenant's)", body = ErrorBody),
        (status = 413, description = "Request body too large", body = ErrorBody),
    )
)]
pub(crate) async fn create_key(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path(tenant): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, [(header::HeaderName, HeaderValue); 1], Json<CreatedKey>)> {
    auth.require_admin(&tenant, "mint keys")?;
    require_tenant(&node, &tenant).await?;
    let req: CreateKey = json_body(&body, "key request")?;
    let tenant_scopes = listed(Scope::TENANT.map(Scope::as_str));
    let mut scopes = Vec::with_capacity(req.scopes.len());
    for name in &req.scopes {
        match Scope::parse(name) {
            Some(s) if Scope::TENANT.contains(&s) => scopes.push(s),
            known => {
                let problem = if known.is_some() { "cannot be given to a tenant key" } else { "is unknown" };
                let message = format!("scope {name:?} {problem}: use {tenant_scopes}");
                return Err(SluiceError::bad_request(message).into());
            }
        }
    }
    scopes.sort();
    scopes.dedup();
    if scopes.is_empty() {
        return Err(
            SluiceError::bad_request(format!("a key needs at least one scope: {tenant_scopes}")).into()
        );
    }
    if let Some(alias) = req.alias.as_deref().filter(|a| !sluice_core::alias::valid_name(a)) {
        return Err(SluiceError::bad_request(format!(
            "invalid alias name {alias:?}: use 1-63 characters of a-z, 0-9 and '-', starting with a letter"
        ))
        .into());
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret)
        .map_err(|e| SluiceError::internal(format!("no randomness for a key: {e}")))?;
    let key = sluice_core::ids::api_key_from_secret(&secret);
    let record = KeyRecord {
        id: sluice_core::ids::short_id("key"),
        tenant: Some(tenant),
        scopes,
        hash: sluice_core::ids::hash_api_key(&key),
        created_at: SystemClock.now_ms(),
        revoked: false,
        alias: req.alias,
    };
    node.store.create_key(&record).await?;
    node.reload_keys().await?;
    // The answer holds a secret: no cache along the way may keep it.
    let no_store = [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))];
    Ok((StatusCode::CREATED, no_store, Json(CreatedKey { info: KeyInfo::of(&record), key })))
}

/// List a tenant's keys, revoked ones included (never the keys themselves).
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant}/keys",
    tag = "keys",
    params(("tenant" = String, Path, description = "Tenant name", example = "default")),
    responses(
        (status = 200, description = "The tenant's keys", body = KeyList),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 404, description = "No such tenant (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn list_keys(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path(tenant): Path<String>,
) -> ApiResult<Json<KeyList>> {
    auth.require(&tenant, Scope::Read)?;
    require_tenant(&node, &tenant).await?;
    let keys = node.store.list_keys(Some(&tenant)).await?;
    Ok(Json(KeyList { keys: keys.iter().map(KeyInfo::of).collect() }))
}

/// Revoke a key (admin only). It stops working at once; revoking it again changes nothing.
#[utoipa::path(
    delete,
    path = "/v1/keys/{id}",
    tag = "keys",
    params(("id" = String, Path, description = "Key id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 404, description = "No such key (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn revoke_key(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let not_found = || SluiceError::not_found(format!("no key {id}"));
    let key = node.store.get_key(&id).await?.ok_or_else(not_found)?;
    // Admin keys belong to no tenant: only an admin sees them.
    let visible = match &key.tenant {
        Some(t) => auth.0.sees(t),
        None => auth.0.is_admin(),
    };
    if !visible {
        return Err(not_found().into());
    }
    if !auth.0.is_admin() {
        return Err(admin_only("revoke keys").into());
    }
    if !node.store.revoke_key(&id).await? {
        return Err(not_found().into());
    }
    node.reload_keys().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A tenant's own limits. `PUT` replaces them all: a field left out (or null) takes the node's
/// default (`serve --tenant-rate`, `--tenant-queued-max` and so on).
#[derive(Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct TenantLimits {
    /// Calls per second over all the tenant's functions (sync and async enqueues).
    #[schema(minimum = 0.000011574074074074073, maximum = 1000000000.0)]
    pub rate_per_sec: Option<f64>,
    /// Calls allowed at once above the rate; default: the rate rounded up.
    #[schema(minimum = 1)]
    pub burst: Option<u32>,
    /// Async invocations not yet finished (queued, running, waiting for a retry); beyond it
    /// async calls get 429 `quota_exceeded`.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
    pub queued_max: Option<u64>,
    /// Bytes of those invocations' requests (body plus header names and values).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
    pub queued_bytes_max: Option<u64>,
    /// Bytes of uploaded components; beyond it uploads get 507 `storage_quota_exceeded`.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
    pub components_bytes_max: Option<u64>,
    /// Functions; a deploy of a new one beyond it gets 507.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
    pub functions_max: Option<u64>,
    /// Versions stored over all its functions (retired ones not counted); beyond it deploys get
    /// 507.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
    pub versions_max: Option<u64>,
    /// Schedules; creating one beyond it gets 507.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
    pub schedules_max: Option<u64>,
}

impl TenantLimits {
    fn usage(&self) -> sluice_core::OwnUsageLimits {
        sluice_core::OwnUsageLimits {
            queued_max: self.queued_max,
            queued_bytes_max: self.queued_bytes_max,
            components_bytes_max: self.components_bytes_max,
            functions_max: self.functions_max,
            versions_max: self.versions_max,
            schedules_max: self.schedules_max,
        }
    }

    fn of(rate: Option<crate::admission::Rate>, usage: &sluice_core::OwnUsageLimits) -> Self {
        Self {
            rate_per_sec: rate.map(|r| r.per_sec),
            burst: rate.map(|r| r.burst),
            queued_max: usage.queued_max,
            queued_bytes_max: usage.queued_bytes_max,
            components_bytes_max: usage.components_bytes_max,
            functions_max: usage.functions_max,
            versions_max: usage.versions_max,
            schedules_max: usage.schedules_max,
        }
    }
}

/// Set a tenant's own limits (admin only), replacing those it had: its rate limit (over it, calls
/// get 429 `rate_limited` with `Retry-After`) and its usage quotas (queued invocations and bytes:
/// 429 `quota_exceeded`; component bytes, functions, versions: 507 on deploy).
#[utoipa::path(
    put,
    path = "/v1/tenants/{tenant}/limits",
    tag = "tenants",
    params(("tenant" = String, Path, description = "Tenant name")),
    request_body = TenantLimits,
    responses(
        (status = 200, description = "The tenant's own limits now", body = TenantLimits),
        (status = 400, description = "Invalid rate, burst or quota", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
        (status = 413, description = "Request body too large", body = ErrorBody),
    )
)]
pub(crate) async fn set_tenant_limits(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path(tenant): Path<String>,
    body: Bytes,
) -> ApiResult<Json<TenantLimits>> {
    if !auth.0.sees(&tenant) {
        return Err(SluiceError::not_found(format!("no tenant {tenant}")).into());
    }
    if !auth.0.is_admin() {
        return Err(admin_only("set tenant limits").into());
    }
    let req: TenantLimits = json_body(&body, "limits")?;
    let rate = match req.rate_per_sec {
        None => None,
        Some(per_sec) => {
            use sluice_core::function::{RATE_PER_SEC_MAX, RATE_PER_SEC_MIN};
            if !(RATE_PER_SEC_MIN..=RATE_PER_SEC_MAX).contains(&per_sec) {
                return Err(SluiceError::bad_request(format!(
                    "rate_per_sec must be between {RATE_PER_SEC_MIN} and {RATE_PER_SEC_MAX}, got {per_sec}"
                ))
                .into());
            }
            if req.burst == Some(0) {
                return Err(SluiceError::bad_request("burst must be at least 1").into());
            }
            crate::admission::Rate::of(Some(per_sec), req.burst)
        }
    };
    let usage = req.usage();
    for (name, value) in [
        ("queued_max", usage.queued_max),
        ("queued_bytes_max", usage.queued_bytes_max),
        ("components_bytes_max", usage.components_bytes_max),
        ("functions_max", usage.functions_max),
        ("versions_max", usage.versions_max),
        ("schedules_max", usage.schedules_max),
    ] {
        if let Some(v) = value
            && i64::try_from(v).is_err()
        {
            return Err(
                SluiceError::bad_request(format!("{name} must be at most {}, got {v}", i64::MAX)).into()
            );
        }
    }
    node.store.set_tenant_rate(&tenant, rate.map(|r| (r.per_sec, r.burst))).await?;
    node.store.set_tenant_usage_limits(&tenant, &usage).await?;
    node.admission.set_tenant_rate(&tenant, rate);
    node.quotas.set_own(&tenant, usage);
    Ok(Json(TenantLimits::of(rate, &usage)))
}

/// A tenant's own limits (fields that are null take the node's defaults; `GET
/// /v1/tenants/{t}/usage` shows the limits in force and what the tenant uses of them).
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant}/limits",
    tag = "tenants",
    params(("tenant" = String, Path, description = "Tenant name")),
    responses(
        (status = 200, description = "The tenant's own limits", body = TenantLimits),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 404, description = "No such tenant (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn get_tenant_limits(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path(tenant): Path<String>,
) -> ApiResult<Json<TenantLimits>> {
    auth.require(&tenant, Scope::Read)?;
    require_tenant(&node, &tenant).await?;
    let rate = node
        .store
        .tenant_rates()
        .await?
        .into_iter()
        .find(|(t, _, _)| *t == tenant)
        .map(|(_, per_sec, burst)| crate::admission::Rate { per_sec, burst });
    let usage = node
        .store
        .tenant_usage_limits()
        .await?
        .into_iter()
        .find(|(t, _)| *t == tenant)
        .map(|(_, u)| u)
        .unwrap_or_default();
    Ok(Json(TenantLimits::of(rate, &usage)))
}

/// A tenant's share of async capacity (DESIGN.md section 4).
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantQuota {
    /// Async calls of the tenant that start whatever the nodes' load (counted over the
    /// cluster). Beyond it, its calls are opportunistic: they run only while a node is under its
    /// utilization target, sharing that capacity with other tenants by weight.
    #[schema(minimum = 0, maximum = 100000)]
    pub reserved: u32,
    /// Its weight in the fair share of opportunistic capacity; default 1.
    #[schema(minimum = 1, maximum = 1000)]
    #[serde(default = "weight_default")]
    pub weight: u32,
}

fn weight_default() -> u32 {
    1
}

/// Most weight a tenant may hold against another's 1.
pub const WEIGHT_MAX: u32 = 1000;

/// Set a tenant's async quota (admin only): reserved concurrency and fair-share weight.
#[utoipa::path(
    put,
    path = "/v1/tenants/{tenant}/quota",
    tag = "tenants",
    params(("tenant" = String, Path, description = "Tenant name")),
    request_body = TenantQuota,
    responses(
        (status = 200, description = "The quota now in force", body = TenantQuota),
        (status = 400, description = "Invalid reservation or weight", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
        (status = 413, description = "Request body too large", body = ErrorBody),
    )
)]
pub(crate) async fn set_tenant_quota(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path(tenant): Path<String>,
    body: Bytes,
) -> ApiResult<Json<TenantQuota>> {
    if !auth.0.sees(&tenant) {
        return Err(SluiceError::not_found(format!("no tenant {tenant}")).into());
    }
    if !auth.0.is_admin() {
        return Err(admin_only("set tenant quotas").into());
    }
    let req: TenantQuota = json_body(&body, "quota")?;
    let max = sluice_core::function::RESERVED_CONCURRENCY_MAX;
    if req.reserved > max {
        return Err(SluiceError::bad_request(format!(
            "reserved must be at most {max}, got {}",
            req.reserved
        ))
        .into());
    }
    if !(1..=WEIGHT_MAX).contains(&req.weight) {
        return Err(SluiceError::bad_request(format!(
            "weight must be between 1 and {WEIGHT_MAX}, got {}",
            req.weight
        ))
        .into());
    }
    let quota = sluice_store::Quota { reserved: req.reserved, weight: req.weight };
    // The default quota is stored as no row: `tenants quota t --reserved 0` restores it.
    let stored = (quota != sluice_store::Quota::default()).then_some(quota);
    node.store.set_tenant_quota(&tenant, stored).await?;
    Ok(Json(req))
}

/// A tenant's async quota (reserved concurrency and weight).
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant}/quota",
    tag = "tenants",
    params(("tenant" = String, Path, description = "Tenant name")),
    responses(
        (status = 200, description = "The quota in force", body = TenantQuota),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 404, description = "No such tenant (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn get_tenant_quota(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path(tenant): Path<String>,
) -> ApiResult<Json<TenantQuota>> {
    auth.require(&tenant, Scope::Read)?;
    require_tenant(&node, &tenant).await?;
    let quota = node
        .store
        .tenant_quotas()
        .await?
        .into_iter()
        .find(|(t, _)| *t == tenant)
        .map(|(_, q)| q)
        .unwrap_or_default();
    Ok(Json(TenantQuota { reserved: quota.reserved, weight: quota.weight }))
}
