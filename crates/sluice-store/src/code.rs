//! What tenants deploy: component blobs, functions and their immutable versions ([`Code`]).

use sluice_core::alias::{self, Route};
use sluice_core::{FunctionConfig, UnixMs};
use sqlx::Executor;

use crate::rows::{StoreRow, config_to_json, get, rows, summary_from_row, version_from_row};
use crate::sql::{Bind, Conn, Engine, SqlStore, require, tuples};
use crate::{StoreError, StoreResult, corrupt};

/// What one tenant keeps in the store: its functions, their versions and its component blobs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantStorage {
    pub functions: u64,
    pub versions: u64,
    pub blobs: u64,
    pub blob_bytes: u64,
}

/// One immutable version of a function.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionRecord {
    pub tenant: String,
    pub function: String,
    pub version: i64,
    pub blob_digest: String,
    pub config: FunctionConfig,
    pub created_at: UnixMs,
}

/// A version as `versions list` shows it: its record and its component's size.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionListing {
    pub record: VersionRecord,
    pub blob_bytes: u64,
}

/// An alias of a function: the versions it routes to, with their weights, highest version first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasRecord {
    pub tenant: String,
    pub function: String,
    pub name: String,
    pub routes: Vec<Route>,
    pub updated_at: UnixMs,
}

/// What a node needs to serve one function: its aliases, the versions they name and the newest
/// version number (a call to `@N` above it is refused without a store read).
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionRouting {
    pub tenant: String,
    pub function: String,
    pub newest_version: i64,
    pub aliases: Vec<AliasRecord>,
    /// Every version an alias names, by number.
    pub versions: Vec<VersionRecord>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FunctionSummary {
    pub tenant: String,
    pub name: String,
    pub latest_version: i64,
    pub created_at: UnixMs,
    pub updated_at: UnixMs,
}

store_trait! {
    /// Blobs, functions and versions.
    pub trait Code {
        /// Stores component bytes of `tenant` under their digest. Blobs belong to one tenant: the
        /// same bytes uploaded by two tenants are stored twice, so no tenant can learn what
        /// another uploaded. Storing the same digest again keeps the bytes and restarts the
        /// blob's grace period (see [`Code::purge_blobs`]). `NotFound` for an unknown tenant.
        async fn put_blob(&self, tenant: &str, digest: &str, bytes: &[u8]) -> StoreResult<()>;
        async fn get_blob(&self, tenant: &str, digest: &str) -> StoreResult<Option<Vec<u8>>>;
        /// Deletes up to `limit` blobs that no version names and that were last uploaded before
        /// `uploaded_before`; returns the `(tenant, digest)` of each. A deploy racing the delete
        /// either names the blob first (and keeps it) or finds it gone (`NotFound`).
        async fn purge_blobs(&self, uploaded_before: UnixMs, limit: u32) -> StoreResult<Vec<(String, String)>>;
        /// Deletes up to `limit` versions that are older than the newest `keep_latest` (at least
        /// 1) of their function and that neither an alias nor an unfinished invocation (queued,
        /// failed and waiting for its retry, running) names, oldest first; returns how many. Their blobs are then
        /// unnamed, for [`Code::purge_blobs`].
        async fn purge_versions(&self, keep_latest: u32, limit: u32) -> StoreResult<u64>;
        /// `(tenant, digest)` of every stored blob: what the node's compiled artifacts may belong
        /// to.
        async fn blob_keys(&self) -> StoreResult<Vec<(String, String)>>;
        /// What a tenant keeps in the store. `NotFound` for an unknown tenant.
        async fn tenant_storage(&self, tenant: &str) -> StoreResult<TenantStorage>;

        /// Creates the next version (1, 2, ...) of `tenant/function`, creating the function if
        /// needed. The tenant and blob must exist (`NotFound` otherwise). Numbering restarts at 1
        /// after [`Code::delete_function`]: the function row that carries the counter is gone,
        /// and a redeployed function is a new function. (Old invocation records naming
        /// `version 1` then refer to the deleted function's version 1.) With `promote` (and
        /// always for a function's first version) the alias `latest` moves to the new version in
        /// the same transaction.
        async fn create_version(
            &self,
            tenant: &str,
            function: &str,
            blob_digest: &str,
            config: &FunctionConfig,
            promote: bool,
        ) -> StoreResult<VersionRecord>;
        /// The newest version of a function (the last deployed, promoted or not).
        async fn latest_version(&self, tenant: &str, function: &str) -> StoreResult<Option<VersionRecord>>;
        async fn get_version(
            &self,
            tenant: &str,
            function: &str,
            version: i64,
        ) -> StoreResult<Option<VersionRecord>>;
        async fn list_functions(&self, tenant: &str) -> StoreResult<Vec<FunctionSummary>>;
        /// Deletes a function and its versions (its blobs stay until [`Code::purge_blobs`] finds
        /// them unnamed); `false` if there was none.
        async fn delete_function(&self, tenant: &str, function: &str) -> StoreResult<bool>;
        /// The newest version of every function.
        async fn all_latest_versions(&self) -> StoreResult<Vec<VersionRecord>>;
        /// Every version of a function still stored, newest first, with its component's size.
        async fn list_versions(&self, tenant: &str, function: &str) -> StoreResult<Vec<VersionListing>>;

        /// Points alias `name` of a function at `routes` (checked with
        /// [`alias::check_routes`]), creating or replacing it. `NotFound` for an unknown function or
        /// version. The function's row is touched in the same transaction, which announces the
        /// move to other nodes like a deploy.
        async fn set_alias(&self, tenant: &str, function: &str, name: &str, routes: &[Route]) -> StoreResult<AliasRecord>;
        /// Deletes an alias; `false` if there was none.
        async fn delete_alias(&self, tenant: &str, function: &str, name: &str) -> StoreResult<bool>;
        /// A function's aliases, by name.
        async fn list_aliases(&self, tenant: &str, function: &str) -> StoreResult<Vec<AliasRecord>>;
        /// What a node serves of one function; `None` if there is no such function.
        async fn function_routing(&self, tenant: &str, function: &str) -> StoreResult<Option<FunctionRouting>>;
        /// What a node serves of every function: what a starting node loads.
        async fn all_routing(&self) -> StoreResult<Vec<FunctionRouting>>;
    }
}

#[async_trait::async_trait]
impl<E: Engine> Code for SqlStore<E>
where
    for<'c> &'c mut Conn<E>: Executor<'c, Database = E::DB>,
    for<'a> &'a str: Bind<E::DB>,
    i64: Bind<E::DB>,
{
    async fn put_blob(&self, tenant: &str, digest: &str, bytes: &[u8]) -> StoreResult<()> {
        E::put_blob(self, tenant, digest, bytes).await
    }

    async fn get_blob(&self, tenant: &str, digest: &str) -> StoreResult<Option<Vec<u8>>> {
        sqlx::query("SELECT bytes FROM blobs WHERE tenant = $1 AND digest = $2")
            .bind(tenant)
            .bind(digest)
            .fetch_optional(&self.pool)
            .await
            .map_err(E::classify)?
            .map(|row| get(&row, "bytes"))
            .transpose()
    }

    async fn purge_blobs(&self, uploaded_before: UnixMs, limit: u32) -> StoreResult<Vec<(String, String)>> {
        let gone = sqlx::query(E::PURGE_BLOBS)
            .bind(uploaded_before)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(E::classify)?;
        tuples(gone)
    }

    async fn purge_versions(&self, keep_latest: u32, limit: u32) -> StoreResult<u64> {
        let done = sqlx::query(E::PURGE_VERSIONS)
            .bind(i64::from(keep_latest.max(1)))
            .bind(i64::from(limit))
            .execute(&self.pool)
            .await
            .map_err(E::classify)?;
        Ok(E::rows_affected(&done))
    }

    async fn blob_keys(&self) -> StoreResult<Vec<(String, String)>> {
        let found = sqlx::query("SELECT tenant, digest FROM blobs ORDER BY tenant, digest")
            .fetch_all(&self.pool)
            .await
            .map_err(E::classify)?;
        tuples(found)
    }

    async fn tenant_storage(&self, tenant: &str) -> StoreResult<TenantStorage> {
        let row = sqlx::query(
            "SELECT EXISTS (SELECT 1 FROM tenants WHERE name = $1) AS known,
                    (SELECT COUNT(*) FROM functions WHERE tenant = $1) AS functions,
                    (SELECT COUNT(*) FROM versions WHERE tenant = $1) AS versions,
                    (SELECT COUNT(*) FROM blobs WHERE tenant = $1) AS blobs,
                    (SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM blobs WHERE tenant = $1) AS blob_bytes",
        )
        .bind(tenant)
        .fetch_one(&self.pool)
        .await
        .map_err(E::classify)?;
        if !get::<bool, _>(&row, "known")? {
            return Err(StoreError::NotFound(format!("tenant {tenant}")));
        }
        let count = |column: &str| -> StoreResult<u64> {
            u64::try_from(get::<i64, _>(&row, column)?).map_err(|_| corrupt(format!("negative {column}")))
        };
        Ok(TenantStorage {
            functions: count("functions")?,
            versions: count("versions")?,
            blobs: count("blobs")?,
            blob_bytes: count("blob_bytes")?,
        })
    }

    async fn create_version(
        &self,
        tenant: &str,
        function: &str,
        blob_digest: &str,
        config: &FunctionConfig,
        promote: bool,
    ) -> StoreResult<VersionRecord> {
        let config_json = config_to_json(config)?;
        let now = self.clock.now_ms();
        // One write transaction from the existence checks to the version insert. The function
        // row's upsert serializes concurrent deploys of one function (on SQLite the write lock
        // already has, on PostgreSQL the row lock does, on any node): each sees the previous
        // one's counter, so numbers are neither duplicated nor skipped.
        let mut tx = E::begin_write(&self.pool).await?;
        require::<E>(&mut tx, E::TENANT_EXISTS, &[tenant], || format!("tenant {tenant}")).await?;
        require::<E>(&mut tx, E::BLOB_EXISTS, &[tenant, blob_digest], || format!("blob {blob_digest}"))
            .await?;
        let counter = sqlx::query(
            "INSERT INTO functions (tenant, name, created_at, updated_at, latest_version)
             VALUES ($1, $2, $3, $3, 1)
             ON CONFLICT (tenant, name) DO UPDATE
                 SET latest_version = functions.latest_version + 1, updated_at = excluded.updated_at
             RETURNING latest_version",
        )
        .bind(tenant)
        .bind(function)
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(E::classify)?;
        let version: i64 = get(&counter, "latest_version")?;
        sqlx::query(
            "INSERT INTO versions (tenant, function, version, blob_digest, config, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(tenant)
        .bind(function)
        .bind(version)
        .bind(blob_digest)
        .bind(config_json.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(E::classify)?;
        // A function's first version is its `latest` whatever was asked: `/fn/{t}/{f}/` must name
        // something from the first deploy on.
        if promote || version == 1 {
            let latest = [Route { version, weight: 100 }];
            replace_alias::<E>(&mut tx, tenant, function, alias::LATEST, &latest, now).await?;
            let why = format!("version {version} was deployed and moved the alias");
            cancel_running::<E>(&mut tx, tenant, function, alias::LATEST, &why, now).await?;
        }
        tx.commit().await.map_err(E::classify)?;
        Ok(VersionRecord {
            tenant: tenant.to_owned(),
            function: function.to_owned(),
            version,
            blob_digest: blob_digest.to_owned(),
            config: config.clone(),
            created_at: now,
        })
    }

    async fn latest_version(&self, tenant: &str, function: &str) -> StoreResult<Option<VersionRecord>> {
        sqlx::query(
            "SELECT v.tenant, v.function, v.version, v.blob_digest, v.config, v.created_at
             FROM functions f
             JOIN versions v
               ON v.tenant = f.tenant AND v.function = f.name AND v.version = f.latest_version
             WHERE f.tenant = $1 AND f.name = $2",
        )
        .bind(tenant)
        .bind(function)
        .fetch_optional(&self.pool)
        .await
        .map_err(E::classify)?
        .as_ref()
        .map(version_from_row)
        .transpose()
    }

    async fn get_version(
        &self,
        tenant: &str,
        function: &str,
        version: i64,
    ) -> StoreResult<Option<VersionRecord>> {
        sqlx::query(
            "SELECT tenant, function, version, blob_digest, config, created_at FROM versions
             WHERE tenant = $1 AND function = $2 AND version = $3",
        )
        .bind(tenant)
        .bind(function)
        .bind(version)
        .fetch_optional(&self.pool)
        .await
        .map_err(E::classify)?
        .as_ref()
        .map(version_from_row)
        .transpose()
    }

    async fn list_functions(&self, tenant: &str) -> StoreResult<Vec<FunctionSummary>> {
        let found = sqlx::query(
            "SELECT tenant, name, latest_version, created_at, updated_at FROM functions
             WHERE tenant = $1 ORDER BY name",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await
        .map_err(E::classify)?;
        rows(found, summary_from_row)
    }

    async fn delete_function(&self, tenant: &str, function: &str) -> StoreResult<bool> {
        // Versions go with the function through `ON DELETE CASCADE`.
        let done = sqlx::query("DELETE FROM functions WHERE tenant = $1 AND name = $2")
            .bind(tenant)
            .bind(function)
            .execute(&self.pool)
            .await
            .map_err(E::classify)?;
        Ok(E::rows_affected(&done) > 0)
    }

    async fn all_latest_versions(&self) -> StoreResult<Vec<VersionRecord>> {
        let found = sqlx::query(
            "SELECT v.tenant, v.function, v.version, v.blob_digest, v.config, v.created_at
             FROM functions f
             JOIN versions v
               ON v.tenant = f.tenant AND v.function = f.name AND v.version = f.latest_version
             ORDER BY f.tenant, f.name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(E::classify)?;
        rows(found, version_from_row)
    }

    async fn list_versions(&self, tenant: &str, function: &str) -> StoreResult<Vec<VersionListing>> {
        let found = sqlx::query(
            "SELECT v.tenant, v.function, v.version, v.blob_digest, v.config, v.created_at,
                    COALESCE(b.size, 0) AS blob_bytes
             FROM versions v LEFT JOIN blobs b ON b.tenant = v.tenant AND b.digest = v.blob_digest
             WHERE v.tenant = $1 AND v.function = $2
             ORDER BY v.version DESC",
        )
        .bind(tenant)
        .bind(function)
        .fetch_all(&self.pool)
        .await
        .map_err(E::classify)?;
        rows(found, |row| {
            let bytes: i64 = get(row, "blob_bytes")?;
            Ok(VersionListing {
                record: version_from_row(row)?,
                blob_bytes: u64::try_from(bytes).map_err(|_| corrupt("negative blob size"))?,
            })
        })
    }

    async fn set_alias(
        &self,
        tenant: &str,
        function: &str,
        name: &str,
        routes: &[Route],
    ) -> StoreResult<AliasRecord> {
        alias::check_routes(routes).map_err(|e| StoreError::Conflict(format!("alias {name}: {e}")))?;
        let now = self.clock.now_ms();
        let mut tx = E::begin_write(&self.pool).await?;
        // The function's row is locked first (by this update), so concurrent sets of new aliases
        // of one function count one after the other and cannot pass the bound together.
        touch_function::<E>(&mut tx, tenant, function, now).await?;
        let row = sqlx::query(
            "SELECT COUNT(DISTINCT name) AS others FROM aliases
             WHERE tenant = $1 AND function = $2 AND name <> $3",
        )
        .bind(tenant)
        .bind(function)
        .bind(name)
        .fetch_one(&mut *tx)
        .await
        .map_err(E::classify)?;
        let others: i64 = get(&row, "others")?;
        if usize::try_from(others).unwrap_or(usize::MAX) >= alias::ALIASES_MAX {
            return Err(StoreError::Conflict(format!(
                "function {function} has {others} aliases, at most {} are allowed; delete one first \
                 (sluice alias delete {function} NAME)",
                alias::ALIASES_MAX
            )));
        }
        replace_alias::<E>(&mut tx, tenant, function, name, routes, now).await?;
        // A move by hand wins over an automatic rollout of the alias, which would move it back.
        cancel_running::<E>(&mut tx, tenant, function, name, "the alias was set by hand", now).await?;
        tx.commit().await.map_err(E::classify)?;
        let mut routes = routes.to_vec();
        routes.sort_by_key(|r| std::cmp::Reverse(r.version));
        Ok(AliasRecord {
            tenant: tenant.to_owned(),
            function: function.to_owned(),
            name: name.to_owned(),
            routes,
            updated_at: now,
        })
    }

    async fn delete_alias(&self, tenant: &str, function: &str, name: &str) -> StoreResult<bool> {
        let now = self.clock.now_ms();
        let mut tx = E::begin_write(&self.pool).await?;
        let done = sqlx::query("DELETE FROM aliases WHERE tenant = $1 AND function = $2 AND name = $3")
            .bind(tenant)
            .bind(function)
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(E::classify)?;
        let deleted = E::rows_affected(&done) > 0;
        if deleted {
            // Announces the change to other nodes, as `set_alias` does.
            touch_function::<E>(&mut tx, tenant, function, now).await?;
            cancel_running::<E>(&mut tx, tenant, function, name, "the alias was deleted", now).await?;
        }
        tx.commit().await.map_err(E::classify)?;
        Ok(deleted)
    }

    async fn list_aliases(&self, tenant: &str, function: &str) -> StoreResult<Vec<AliasRecord>> {
        let found = sqlx::query(
            "SELECT tenant, function, name, version, weight, updated_at FROM aliases
             WHERE tenant = $1 AND function = $2 ORDER BY tenant, function, name, version DESC",
        )
        .bind(tenant)
        .bind(function)
        .fetch_all(&self.pool)
        .await
        .map_err(E::classify)?;
        group_aliases(found)
    }

    async fn function_routing(&self, tenant: &str, function: &str) -> StoreResult<Option<FunctionRouting>> {
        let functions =
            sqlx::query("SELECT tenant, name, latest_version FROM functions WHERE tenant = $1 AND name = $2")
                .bind(tenant)
                .bind(function)
                .fetch_all(&self.pool)
                .await
                .map_err(E::classify)?;
        let aliases = sqlx::query(
            "SELECT tenant, function, name, version, weight, updated_at FROM aliases
             WHERE tenant = $1 AND function = $2 ORDER BY tenant, function, name, version DESC",
        )
        .bind(tenant)
        .bind(function)
        .fetch_all(&self.pool)
        .await
        .map_err(E::classify)?;
        let versions = sqlx::query(
            "SELECT v.tenant, v.function, v.version, v.blob_digest, v.config, v.created_at FROM versions v
             WHERE v.tenant = $1 AND v.function = $2
               AND EXISTS (SELECT 1 FROM aliases a
                           WHERE a.tenant = v.tenant AND a.function = v.function AND a.version = v.version)",
        )
        .bind(tenant)
        .bind(function)
        .fetch_all(&self.pool)
        .await
        .map_err(E::classify)?;
        Ok(assemble_routing(functions, aliases, versions)?.pop())
    }

    async fn all_routing(&self) -> StoreResult<Vec<FunctionRouting>> {
        let functions = sqlx::query("SELECT tenant, name, latest_version FROM functions")
            .fetch_all(&self.pool)
            .await
            .map_err(E::classify)?;
        let aliases = sqlx::query(
            "SELECT tenant, function, name, version, weight, updated_at FROM aliases
             ORDER BY tenant, function, name, version DESC",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(E::classify)?;
        let versions = sqlx::query(
            "SELECT v.tenant, v.function, v.version, v.blob_digest, v.config, v.created_at FROM versions v
             WHERE EXISTS (SELECT 1 FROM aliases a
                           WHERE a.tenant = v.tenant AND a.function = v.function AND a.version = v.version)",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(E::classify)?;
        assemble_routing(functions, aliases, versions)
    }
}

/// Touches a function's row inside the caller's transaction: that takes its lock (and, on
/// PostgreSQL, fires the change notification other nodes follow) before anything else is
/// checked, so a concurrent deploy or delete of the function is ordered with the caller's write.
/// `NotFound` for an unknown function.
pub(crate) async fn touch_function<E: Engine>(
    tx: &mut Conn<E>,
    tenant: &str,
    function: &str,
    now: UnixMs,
) -> StoreResult<()>
where
    for<'c> &'c mut Conn<E>: Executor<'c, Database = E::DB>,
    for<'a> &'a str: Bind<E::DB>,
    i64: Bind<E::DB>,
{
    let touched = sqlx::query("UPDATE functions SET updated_at = $3 WHERE tenant = $1 AND name = $2")
        .bind(tenant)
        .bind(function)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(E::classify)?;
    if E::rows_affected(&touched) == 0 {
        return Err(StoreError::NotFound(format!("function {function}")));
    }
    Ok(())
}

/// Replaces the rows of alias `name` with `routes`, inside the caller's transaction. `NotFound`
/// for a version that does not exist (the foreign key would say so less clearly).
pub(crate) async fn replace_alias<E: Engine>(
    tx: &mut Conn<E>,
    tenant: &str,
    function: &str,
    name: &str,
    routes: &[Route],
    now: UnixMs,
) -> StoreResult<()>
where
    for<'c> &'c mut Conn<E>: Executor<'c, Database = E::DB>,
    for<'a> &'a str: Bind<E::DB>,
    i64: Bind<E::DB>,
{
    sqlx::query("DELETE FROM aliases WHERE tenant = $1 AND function = $2 AND name = $3")
        .bind(tenant)
        .bind(function)
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(E::classify)?;
    for route in routes {
        let found =
            sqlx::query("SELECT 1 FROM versions WHERE tenant = $1 AND function = $2 AND version = $3")
                .bind(tenant)
                .bind(function)
                .bind(route.version)
                .fetch_optional(&mut *tx)
                .await
                .map_err(E::classify)?;
        if found.is_none() {
            return Err(StoreError::NotFound(format!("version {} of function {function}", route.version)));
        }
        sqlx::query(
            "INSERT INTO aliases (tenant, function, name, version, weight, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(tenant)
        .bind(function)
        .bind(name)
        .bind(route.version)
        .bind(i64::from(route.weight))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(E::classify)?;
    }
    Ok(())
}

/// Alias rows ordered by (tenant, function, name) as records.
fn group_aliases<R: StoreRow>(found: Vec<R>) -> StoreResult<Vec<AliasRecord>> {
    let mut aliases: Vec<AliasRecord> = Vec::new();
    for row in &found {
        let (tenant, function, name): (String, String, String) =
            (get(row, "tenant")?, get(row, "function")?, get(row, "name")?);
        let weight: i64 = get(row, "weight")?;
        let route = Route {
            version: get(row, "version")?,
            weight: u32::try_from(weight).map_err(|_| corrupt(format!("alias weight {weight}")))?,
        };
        let updated_at: UnixMs = get(row, "updated_at")?;
        match aliases.last_mut() {
            Some(a) if a.tenant == tenant && a.function == function && a.name == name => {
                a.routes.push(route);
                a.updated_at = a.updated_at.max(updated_at);
            }
            _ => aliases.push(AliasRecord { tenant, function, name, routes: vec![route], updated_at }),
        }
    }
    Ok(aliases)
}

/// Functions (`tenant, name, latest_version`), their aliases (grouped by [`group_aliases`]) and the
/// versions those name, as one [`FunctionRouting`] per function, ordered by tenant and name.
fn assemble_routing<R: StoreRow>(
    functions: Vec<R>,
    aliases: Vec<R>,
    versions: Vec<R>,
) -> StoreResult<Vec<FunctionRouting>> {
    let mut by_function: std::collections::BTreeMap<(String, String), FunctionRouting> = Default::default();
    for row in &functions {
        let (tenant, function): (String, String) = (get(row, "tenant")?, get(row, "name")?);
        let routing = FunctionRouting {
            tenant: tenant.clone(),
            function: function.clone(),
            newest_version: get(row, "latest_version")?,
            aliases: Vec::new(),
            versions: Vec::new(),
        };
        by_function.insert((tenant, function), routing);
    }
    for alias in group_aliases(aliases)? {
        // A function deleted between the reads has no entry: its alias rows are gone too.
        if let Some(r) = by_function.get_mut(&(alias.tenant.clone(), alias.function.clone())) {
            r.aliases.push(alias);
        }
    }
    for row in &versions {
        let version = version_from_row(row)?;
        if let Some(r) = by_function.get_mut(&(version.tenant.clone(), version.function.clone())) {
            r.versions.push(version);
        }
    }
    let mut all: Vec<FunctionRouting> = by_function.into_values().collect();
    for r in &mut all {
        r.versions.sort_by_key(|v| v.version);
    }
    Ok(all)
}

/// Ends the running rollout of an alias, if any, inside the caller's transaction: the alias was
/// moved by hand (or by a deploy), and a rollout must not move it back.
pub(crate) async fn cancel_running<E: Engine>(
    tx: &mut Conn<E>,
    tenant: &str,
    function: &str,
    alias: &str,
    reason: &str,
    now: UnixMs,
) -> StoreResult<()>
where
    for<'c> &'c mut Conn<E>: Executor<'c, Database = E::DB>,
    for<'a> &'a str: Bind<E::DB>,
    i64: Bind<E::DB>,
{
    sqlx::query(
        "UPDATE rollouts SET status = 'cancelled', reason = $4, updated_at = $5
         WHERE tenant = $1 AND function = $2 AND alias = $3 AND status = 'running'",
    )
    .bind(tenant)
    .bind(function)
    .bind(alias)
    .bind(reason)
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(E::classify)?;
    Ok(())
}
