//! Tenants, their own limits (rate, quota, usage limits) and API keys: the store's [`Tenants`].

use sluice_core::{Scope, UnixMs};
use sqlx::query::Query;
use sqlx::{Database, Executor, Pool};

use crate::rows::{USAGE_LIMITS, usage_limits_from_rows};
use crate::rows::{key_from_row, quota_from_row, rows, scopes_to_text, tenant_from_row, usage_limit_column};
use crate::sql::{Bind, Conn, Engine, SqlStore, conflict, require, tuples};
use crate::{OwnUsageLimits, StoreResult, corrupt};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub name: String,
    pub created_at: UnixMs,
}

/// An API key as stored: never the key itself, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    /// `None` for admin keys, which are not bound to a tenant.
    pub tenant: Option<String>,
    pub scopes: Vec<Scope>,
    pub hash: String,
    pub created_at: UnixMs,
    pub revoked: bool,
    /// The one alias this key may call (`keys create --alias`); `None`: any.
    pub alias: Option<String>,
}

/// A tenant's share of async capacity (DESIGN.md section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Async calls of the tenant that start whatever the node's load (guaranteed concurrency).
    pub reserved: u32,
    /// Its weight in the fair share of what is beyond reservations (1 for everyone by default).
    pub weight: u32,
}

impl Default for Quota {
    fn default() -> Self {
        Self { reserved: 0, weight: 1 }
    }
}

store_trait! {
    /// Tenants and their keys.
    pub trait Tenants {
        /// Creates a tenant; `Conflict` if it exists.
        async fn create_tenant(&self, name: &str) -> StoreResult<Tenant>;
        async fn get_tenant(&self, name: &str) -> StoreResult<Option<Tenant>>;
        async fn list_tenants(&self) -> StoreResult<Vec<Tenant>>;
        /// Sets a tenant's own rate limit `(calls per second, burst)`, or with `None` removes it
        /// (the node default applies again). `NotFound` for an unknown tenant.
        async fn set_tenant_rate(&self, tenant: &str, rate: Option<(f64, u32)>) -> StoreResult<()>;
        /// Every tenant's own rate limit: `(tenant, calls per second, burst)`.
        async fn tenant_rates(&self) -> StoreResult<Vec<(String, f64, u32)>>;
        /// Sets a tenant's quota, or with `None` removes it (no reservation, weight 1). `NotFound`
        /// for an unknown tenant. Announced to other nodes as [`crate::Change::Limits`].
        async fn set_tenant_quota(&self, tenant: &str, quota: Option<Quota>) -> StoreResult<()>;
        /// Every tenant's quota that was set.
        async fn tenant_quotas(&self) -> StoreResult<Vec<(String, Quota)>>;
        /// Sets a tenant's own usage limits (a `None` field, or all of them, takes the node's
        /// default). `NotFound` for an unknown tenant. Announced to other nodes as
        /// [`crate::Change::Limits`].
        async fn set_tenant_usage_limits(&self, tenant: &str, limits: &OwnUsageLimits) -> StoreResult<()>;
        /// Every tenant's own usage limits that were set, by tenant.
        async fn tenant_usage_limits(&self) -> StoreResult<Vec<(String, OwnUsageLimits)>>;

        async fn create_key(&self, key: &KeyRecord) -> StoreResult<()>;
        /// Keys of one tenant, or all keys when `tenant` is `None`. Revoked keys included.
        async fn list_keys(&self, tenant: Option<&str>) -> StoreResult<Vec<KeyRecord>>;
        /// Marks a key revoked; `false` if there is no such key.
        async fn revoke_key(&self, id: &str) -> StoreResult<bool>;
        async fn get_key(&self, id: &str) -> StoreResult<Option<KeyRecord>>;
        /// Every key that is not revoked: the gateway's auth cache is built from this.
        async fn active_keys(&self) -> StoreResult<Vec<KeyRecord>>;
    }
}

#[async_trait::async_trait]
impl<E: Engine> Tenants for SqlStore<E>
where
    for<'c> &'c mut Conn<E>: Executor<'c, Database = E::DB>,
    for<'a> &'a str: Bind<E::DB>,
    Option<String>: Bind<E::DB>,
    i64: Bind<E::DB>,
    Option<i64>: Bind<E::DB>,
    f64: Bind<E::DB>,
    bool: Bind<E::DB>,
{
    async fn create_tenant(&self, name: &str) -> StoreResult<Tenant> {
        let tenant = Tenant { name: name.to_owned(), created_at: self.clock.now_ms() };
        sqlx::query("INSERT INTO tenants (name, created_at) VALUES ($1, $2)")
            .bind(name)
            .bind(tenant.created_at)
            .execute(&self.pool)
            .await
            .map_err(|e| conflict(E::classify(e), |_| format!("tenant {name} exists")))?;
        Ok(tenant)
    }

    async fn get_tenant(&self, name: &str) -> StoreResult<Option<Tenant>> {
        sqlx::query("SELECT name, created_at FROM tenants WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(E::classify)?
            .as_ref()
            .map(tenant_from_row)
            .transpose()
    }

    async fn list_tenants(&self) -> StoreResult<Vec<Tenant>> {
        let found = sqlx::query("SELECT name, created_at FROM tenants ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(E::classify)?;
        rows(found, tenant_from_row)
    }

    async fn set_tenant_rate(&self, tenant: &str, rate: Option<(f64, u32)>) -> StoreResult<()> {
        let upsert = rate.map(|(per_sec, burst)| {
            sqlx::query(
                "INSERT INTO tenant_limits (tenant, rate_per_sec, burst) VALUES ($1, $2, $3)
                 ON CONFLICT (tenant) DO UPDATE
                     SET rate_per_sec = excluded.rate_per_sec, burst = excluded.burst",
            )
            .bind(tenant)
            .bind(per_sec)
            .bind(i64::from(burst))
        });
        set_tenant_row::<E>(&self.pool, tenant, upsert, "DELETE FROM tenant_limits WHERE tenant = $1").await
    }

    async fn tenant_rates(&self) -> StoreResult<Vec<(String, f64, u32)>> {
        let found = sqlx::query("SELECT tenant, rate_per_sec, burst FROM tenant_limits ORDER BY tenant")
            .fetch_all(&self.pool)
            .await
            .map_err(E::classify)?;
        tuples::<_, (String, f64, i64)>(found)?
            .into_iter()
            .map(|(tenant, per_sec, burst)| {
                let burst = u32::try_from(burst).map_err(|_| corrupt(format_args!("burst {burst}")))?;
                Ok((tenant, per_sec, burst))
            })
            .collect()
    }

    async fn set_tenant_quota(&self, tenant: &str, quota: Option<Quota>) -> StoreResult<()> {
        let upsert = quota.map(|q| {
            sqlx::query(
                "INSERT INTO tenant_quotas (tenant, reserved, weight) VALUES ($1, $2, $3)
                 ON CONFLICT (tenant) DO UPDATE SET reserved = excluded.reserved, weight = excluded.weight",
            )
            .bind(tenant)
            .bind(i64::from(q.reserved))
            .bind(i64::from(q.weight))
        });
        set_tenant_row::<E>(&self.pool, tenant, upsert, "DELETE FROM tenant_quotas WHERE tenant = $1").await
    }

    async fn tenant_quotas(&self) -> StoreResult<Vec<(String, Quota)>> {
        let found = sqlx::query("SELECT tenant, reserved, weight FROM tenant_quotas ORDER BY tenant")
            .fetch_all(&self.pool)
            .await
            .map_err(E::classify)?;
        tuples(found)?.into_iter().map(quota_from_row).collect()
    }

    async fn set_tenant_usage_limits(&self, tenant: &str, limits: &OwnUsageLimits) -> StoreResult<()> {
        let upsert = if limits.is_empty() {
            None
        } else {
            Some(
                sqlx::query(
                    "INSERT INTO tenant_usage_limits (tenant, queued_max, queued_bytes_max,
                         components_bytes_max, functions_max, versions_max, schedules_max)
                         VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (tenant) DO UPDATE SET
                         queued_max = excluded.queued_max, queued_bytes_max = excluded.queued_bytes_max,
                         components_bytes_max = excluded.components_bytes_max,
                         functions_max = excluded.functions_max, versions_max = excluded.versions_max,
                         schedules_max = excluded.schedules_max",
                )
                .bind(tenant)
                .bind(usage_limit_column(limits.queued_max)?)
                .bind(usage_limit_column(limits.queued_bytes_max)?)
                .bind(usage_limit_column(limits.components_bytes_max)?)
                .bind(usage_limit_column(limits.functions_max)?)
                .bind(usage_limit_column(limits.versions_max)?)
                .bind(usage_limit_column(limits.schedules_max)?),
            )
        };
        set_tenant_row::<E>(&self.pool, tenant, upsert, "DELETE FROM tenant_usage_limits WHERE tenant = $1")
            .await
    }

    async fn tenant_usage_limits(&self) -> StoreResult<Vec<(String, OwnUsageLimits)>> {
        let found = sqlx::query(USAGE_LIMITS).fetch_all(&self.pool).await.map_err(E::classify)?;
        usage_limits_from_rows(tuples(found)?)
    }

    async fn create_key(&self, key: &KeyRecord) -> StoreResult<()> {
        // The tenant check and the insert share the transaction (and its lock), so the answer
        // cannot go stale.
        let mut tx = E::begin_write(&self.pool).await?;
        if let Some(tenant) = &key.tenant {
            require::<E>(&mut tx, E::TENANT_EXISTS, &[tenant], || format!("tenant {tenant}")).await?;
        }
        sqlx::query(
            "INSERT INTO api_keys (id, tenant, scopes, hash, created_at, revoked, alias)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(key.id.as_str())
        .bind(key.tenant.clone())
        .bind(scopes_to_text(&key.scopes).as_str())
        .bind(key.hash.as_str())
        .bind(key.created_at)
        .bind(key.revoked)
        .bind(key.alias.clone())
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            conflict(E::classify(e), |_| format!("a key with id {} or the same hash exists", key.id))
        })?;
        tx.commit().await.map_err(E::classify)
    }

    async fn list_keys(&self, tenant: Option<&str>) -> StoreResult<Vec<KeyRecord>> {
        let found = match tenant {
            Some(tenant) => {
                sqlx::query(
                    "SELECT id, tenant, scopes, hash, created_at, revoked, alias FROM api_keys
                     WHERE tenant = $1 ORDER BY created_at, id",
                )
                .bind(tenant)
                .fetch_all(&self.pool)
                .await
            }
            None => {
                sqlx::query(
                    "SELECT id, tenant, scopes, hash, created_at, revoked, alias FROM api_keys
                     ORDER BY created_at, id",
                )
                .fetch_all(&self.pool)
                .await
            }
        }
        .map_err(E::classify)?;
        rows(found, key_from_row)
    }

    async fn revoke_key(&self, id: &str) -> StoreResult<bool> {
        let done = sqlx::query("UPDATE api_keys SET revoked = TRUE WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(E::classify)?;
        Ok(E::rows_affected(&done) > 0)
    }

    async fn get_key(&self, id: &str) -> StoreResult<Option<KeyRecord>> {
        sqlx::query("SELECT id, tenant, scopes, hash, created_at, revoked, alias FROM api_keys WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(E::classify)?
            .as_ref()
            .map(key_from_row)
            .transpose()
    }

    async fn active_keys(&self) -> StoreResult<Vec<KeyRecord>> {
        let found = sqlx::query(
            "SELECT id, tenant, scopes, hash, created_at, revoked, alias FROM api_keys
             WHERE NOT revoked ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(E::classify)?;
        rows(found, key_from_row)
    }
}

/// Writes (`upsert`) or deletes (`delete`, `$1` the tenant) the row of one of a tenant's own
/// settings, in a transaction that first makes sure the tenant exists.
async fn set_tenant_row<E: Engine>(
    pool: &Pool<E::DB>,
    tenant: &str,
    upsert: Option<Query<'_, E::DB, <E::DB as Database>::Arguments>>,
    delete: &'static str,
) -> StoreResult<()>
where
    for<'c> &'c mut Conn<E>: Executor<'c, Database = E::DB>,
    for<'a> &'a str: Bind<E::DB>,
{
    let mut tx = E::begin_write(pool).await?;
    require::<E>(&mut tx, E::TENANT_EXISTS, &[tenant], || format!("tenant {tenant}")).await?;
    match upsert {
        Some(upsert) => upsert.execute(&mut *tx).await,
        None => sqlx::query(delete).bind(tenant).execute(&mut *tx).await,
    }
    .map_err(E::classify)?;
    tx.commit().await.map_err(E::classify)
}
