//! The version and alias routes of `/v1`: list and show a function's versions, and set, list and
//! delete its aliases. An alias move is a store write and a refresh of this node's registry (the
//! path other nodes take on the change notification); it never compiles, because the versions an
//! alias can name are kept with their artifacts (see `Code::purge_versions`).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use bytes::Bytes;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use sluice_core::alias::{self, Route};
use sluice_core::{FunctionConfig, Scope, SluiceError, rfc3339};
use sluice_store::{AliasRecord, VersionListing};
use utoipa::ToSchema;

use crate::api::{VersionInfo, no_function, public_url, version_info};
use crate::api_common::{ApiResult, Auth, ErrorBody, json_body};
use crate::node::Node;

/// One version as `versions list` shows it.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct VersionSummary {
    pub version: i64,
    #[schema(format = DateTime)]
    pub created_at: String,
    /// The component's digest.
    pub digest: String,
    /// The component's size in bytes.
    pub size: u64,
    /// A one-line summary of the version's configuration (memory, timeout, public, ...).
    pub config: String,
    /// The aliases that name this version, with its weight in each (`prod=90`).
    pub aliases: Vec<String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct VersionList {
    /// Newest first.
    pub versions: Vec<VersionSummary>,
}

/// One version in full, with the aliases naming it.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct VersionDetail {
    #[serde(flatten)]
    pub version: VersionInfo,
    /// The component's size in bytes.
    pub size: u64,
    pub aliases: Vec<String>,
}

/// One version an alias routes to, and its weight.
#[derive(Serialize, Deserialize, ToSchema, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct RouteInfo {
    pub version: i64,
    /// Its share of the alias's calls is weight / the sum of the weights.
    pub weight: u32,
}

/// An alias: where `/fn/{tenant}/{function}@{name}/` goes.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct AliasInfo {
    pub name: String,
    /// Highest version first.
    pub routes: Vec<RouteInfo>,
    /// Where the alias is served.
    pub url: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct AliasList {
    /// By name; `latest` is always there.
    pub aliases: Vec<AliasInfo>,
}

/// Where an alias points: one version (weight 100) or a split.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetAlias {
    /// 1 to 8 distinct versions with positive weights.
    pub routes: Vec<RouteInfo>,
}

/// List a function's versions.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant}/functions/{function}/versions",
    tag = "functions",
    params(
        ("tenant" = String, Path, description = "Tenant name", example = "default"),
        ("function" = String, Path, description = "Function name", example = "hello"),
    ),
    responses(
        (status = 200, description = "Every stored version, newest first", body = VersionList),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 404, description = "No such function (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn list_versions(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, function)): Path<(String, String)>,
) -> ApiResult<Json<VersionList>> {
    auth.require(&tenant, Scope::Read)?;
    let listed = node.store.list_versions(&tenant, &function).await?;
    if listed.is_empty() {
        return Err(no_function(&tenant, &function).into());
    }
    let aliases = node.store.list_aliases(&tenant, &function).await?;
    let versions = listed
        .iter()
        .map(|VersionListing { record, blob_bytes }| VersionSummary {
            version: record.version,
            created_at: rfc3339(record.created_at),
            digest: record.blob_digest.clone(),
            size: *blob_bytes,
            config: config_summary(&record.config),
            aliases: naming(&aliases, record.version),
        })
        .collect();
    Ok(Json(VersionList { versions }))
}

/// Show one version of a function.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant}/functions/{function}/versions/{version}",
    tag = "functions",
    params(
        ("tenant" = String, Path, description = "Tenant name", example = "default"),
        ("function" = String, Path, description = "Function name", example = "hello"),
        ("version" = i64, Path, description = "Version number", example = 3),
    ),
    responses(
        (status = 200, description = "The version", body = VersionDetail),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 404, description = "No such version (retired, never made, or another tenant's)",
            body = ErrorBody),
    )
)]
pub(crate) async fn get_version(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, function, version)): Path<(String, String, i64)>,
) -> ApiResult<Json<VersionDetail>> {
    auth.require(&tenant, Scope::Read)?;
    let listed = node.store.list_versions(&tenant, &function).await?;
    let Some(found) = listed.into_iter().find(|v| v.record.version == version) else {
        return Err(SluiceError::not_found(format!(
            "no version {version} of function {function} in tenant {tenant}"
        ))
        .into());
    };
    let aliases = node.store.list_aliases(&tenant, &function).await?;
    Ok(Json(VersionDetail {
        version: version_info(&node, &found.record),
        size: found.blob_bytes,
        aliases: naming(&aliases, version),
    }))
}

/// List a function's aliases.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant}/functions/{function}/aliases",
    tag = "functions",
    params(
        ("tenant" = String, Path, description = "Tenant name", example = "default"),
        ("function" = String, Path, description = "Function name", example = "hello"),
    ),
    responses(
        (status = 200, description = "The aliases, by name", body = AliasList),
        (status = 403, description = "The key lacks the `read` scope", body = ErrorBody),
        (status = 404, description = "No such function (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn list_aliases(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, function)): Path<(String, String)>,
) -> ApiResult<Json<AliasList>> {
    auth.require(&tenant, Scope::Read)?;
    let aliases = node.store.list_aliases(&tenant, &function).await?;
    if aliases.is_empty() {
        // Every function has `latest`: none means no function.
        return Err(no_function(&tenant, &function).into());
    }
    let base = public_url(&node);
    Ok(Json(AliasList { aliases: aliases.iter().map(|a| alias_info(&base, a)).collect() }))
}

/// Set an alias: point it at one version, or split its calls over several.
///
/// Takes effect on this node before the answer and on the others through the change
/// notification. Nothing is compiled: rolling back is moving an alias back.
#[utoipa::path(
    put,
    path = "/v1/tenants/{tenant}/functions/{function}/aliases/{alias}",
    tag = "functions",
    params(
        ("tenant" = String, Path, description = "Tenant name", example = "default"),
        ("function" = String, Path, description = "Function name", example = "hello"),
        ("alias" = String, Path, description = "Alias name: a-z first, then a-z, 0-9 and '-'",
            example = "prod"),
    ),
    request_body = SetAlias,
    responses(
        (status = 200, description = "The alias as set", body = AliasInfo),
        (status = 400, description = "Bad alias name or routes", body = ErrorBody),
        (status = 403, description = "The key lacks the `deploy` scope", body = ErrorBody),
        (status = 404, description = "No such function or version (or another tenant's)",
            body = ErrorBody),
        (status = 409, description = "The function has as many aliases as it may (32, `latest` \
            included); delete one first", body = ErrorBody),
    )
)]
pub(crate) async fn set_alias(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, function, name)): Path<(String, String, String)>,
    body: Bytes,
) -> ApiResult<Json<AliasInfo>> {
    auth.require(&tenant, Scope::Deploy)?;
    if !alias::valid_name(&name) {
        return Err(SluiceError::bad_request(format!(
            "invalid alias name {name:?}: use 1-63 characters of a-z, 0-9 and '-', starting with a letter"
        ))
        .into());
    }
    let req: SetAlias = json_body(&body, "alias")?;
    let routes: Vec<Route> =
        req.routes.iter().map(|r| Route { version: r.version, weight: r.weight }).collect();
    alias::check_routes(&routes).map_err(|e| SluiceError::bad_request(format!("alias {name}: {e}")))?;
    let record = node.store.set_alias(&tenant, &function, &name, &routes).await?;
    node.refresh_function(&tenant, &function).await?;
    tracing::info!(%tenant, %function, alias = %name, routes = %routes_text(&record.routes), "alias set");
    Ok(Json(alias_info(&public_url(&node), &record)))
}

/// Delete an alias. `latest` cannot be deleted (a deploy moves it; set it to roll back).
#[utoipa::path(
    delete,
    path = "/v1/tenants/{tenant}/functions/{function}/aliases/{alias}",
    tag = "functions",
    params(
        ("tenant" = String, Path, description = "Tenant name", example = "default"),
        ("function" = String, Path, description = "Function name", example = "hello"),
        ("alias" = String, Path, description = "Alias name", example = "prod"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "`latest` cannot be deleted", body = ErrorBody),
        (status = 403, description = "The key lacks the `deploy` scope", body = ErrorBody),
        (status = 404, description = "No such alias (or another tenant's)", body = ErrorBody),
    )
)]
pub(crate) async fn delete_alias(
    State(node): State<Arc<Node>>,
    auth: Auth,
    Path((tenant, function, name)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    auth.require(&tenant, Scope::Deploy)?;
    if name == alias::LATEST {
        return Err(SluiceError::bad_request(
            "the alias latest cannot be deleted: it is what /fn/{tenant}/{function}/ calls; move it \
             with `sluice alias set NAME latest VERSION`",
        )
        .into());
    }
    if !node.store.delete_alias(&tenant, &function, &name).await? {
        return Err(SluiceError::not_found(format!(
            "no alias {name} of function {function} in tenant {tenant}"
        ))
        .into());
    }
    node.refresh_function(&tenant, &function).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn alias_info(base: &str, a: &AliasRecord) -> AliasInfo {
    let at = if a.name == alias::LATEST { String::new() } else { format!("@{}", a.name) };
    AliasInfo {
        name: a.name.clone(),
        routes: a.routes.iter().map(|r| RouteInfo { version: r.version, weight: r.weight }).collect(),
        url: format!("{base}/fn/{}/{}{at}/", a.tenant, a.function),
        updated_at: rfc3339(a.updated_at),
    }
}

/// The aliases naming `version`: `prod` when it has all of the alias, `prod=10%` for a share.
fn naming(aliases: &[AliasRecord], version: i64) -> Vec<String> {
    aliases
        .iter()
        .filter_map(|a| {
            let route = a.routes.iter().find(|r| r.version == version)?;
            if a.routes.len() == 1 {
                return Some(a.name.clone());
            }
            let total: u64 = a.routes.iter().map(|r| u64::from(r.weight)).sum();
            let percent = u64::from(route.weight) * 100 / total.max(1);
            Some(format!("{}={percent}%", a.name))
        })
        .collect()
}

/// `4=10 3=90`, for the log.
pub(crate) fn routes_text(routes: &[Route]) -> String {
    routes.iter().map(|r| format!("{}={}", r.version, r.weight)).collect::<Vec<_>>().join(" ")
}

/// The settings a person compares between versions, in one line.
fn config_summary(c: &FunctionConfig) -> String {
    let mut parts = vec![
        format!("memory {}", sluice_core::units::format_bytes(c.memory_bytes)),
        format!(
            "timeout {}",
            sluice_core::units::format_duration(std::time::Duration::from_millis(c.timeout_ms))
        ),
    ];
    if c.public {
        parts.push("public".into());
    }
    if !c.env.is_empty() {
        parts.push(format!("{} env", c.env.len()));
    }
    let secrets = c.secrets.names().count();
    if secrets > 0 {
        parts.push(format!("{secrets} secrets"));
    }
    if let Some(m) = c.max_concurrency {
        parts.push(format!("max concurrency {m}"));
    }
    if let Some(r) = c.rate_per_sec {
        parts.push(format!("rate {r}/s"));
    }
    parts.join(", ")
}
