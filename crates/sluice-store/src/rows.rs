//! Reading the store's rows, the same way from either database: the row types differ, what a
//! column means does not.

use sluice_core::{FunctionConfig, Scope, Secrets, UnixMs};
use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;

use crate::{
    Criticality, FunctionSummary, Invocation, InvocationStatus, KeyRecord, Leased, LogLine, LogStream,
    NodeRecord, QueueDemand, Quota, StoreError, StoreResult, StoredRequest, StoredResponse, SyncRecord,
    Tenant, TenantDemand, TenantQueue, VersionRecord, corrupt,
};

/// A row from which a column of type `T` can be read, by name or by position.
pub trait Column<T> {
    fn column(&self, name: &str) -> StoreResult<T>;
    fn column_at(&self, index: usize) -> StoreResult<T>;
}

macro_rules! columns {
    ($row:ty: $($t:ty),*) => {
        $(impl Column<$t> for $row {
            fn column(&self, name: &str) -> StoreResult<$t> {
                self.try_get(name).map_err(|e| StoreError::Other(format!("reading column {name}: {e}")))
            }
            fn column_at(&self, index: usize) -> StoreResult<$t> {
                self.try_get(index).map_err(|e| StoreError::Other(format!("reading column {index}: {e}")))
            }
        })*
    };
}

columns!(SqliteRow: String, Option<String>, i64, Option<i64>, f64, bool, Vec<u8>);
columns!(PgRow: String, Option<String>, i64, Option<i64>, f64, bool, Vec<u8>);

/// A row of either database.
pub trait StoreRow:
    Column<String>
    + Column<Option<String>>
    + Column<i64>
    + Column<Option<i64>>
    + Column<f64>
    + Column<bool>
    + Column<Vec<u8>>
{
}

impl<R> StoreRow for R where
    R: Column<String>
        + Column<Option<String>>
        + Column<i64>
        + Column<Option<i64>>
        + Column<f64>
        + Column<bool>
        + Column<Vec<u8>>
{
}

pub(crate) fn get<T, R: Column<T>>(row: &R, column: &str) -> StoreResult<T> {
    row.column(column)
}

pub(crate) fn tenant_from_row(row: &impl StoreRow) -> StoreResult<Tenant> {
    Ok(Tenant { name: get(row, "name")?, created_at: get(row, "created_at")? })
}

pub(crate) fn scopes_to_text(scopes: &[Scope]) -> String {
    scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",")
}

pub(crate) fn scopes_from_text(text: &str) -> StoreResult<Vec<Scope>> {
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| Scope::parse(s).ok_or_else(|| corrupt(format_args!("unknown scope {s:?}"))))
        .collect()
}

pub(crate) fn key_from_row(row: &impl StoreRow) -> StoreResult<KeyRecord> {
    Ok(KeyRecord {
        id: get(row, "id")?,
        tenant: get(row, "tenant")?,
        scopes: scopes_from_text(&get::<String, _>(row, "scopes")?)?,
        hash: get(row, "hash")?,
        created_at: get(row, "created_at")?,
        revoked: get(row, "revoked")?,
        alias: get(row, "alias")?,
    })
}

/// Member of a version's stored configuration JSON that holds its secrets as `[name, value]`
/// pairs. `FunctionConfig` does not serialize them (so nothing that shows a configuration can
/// show a value); only the store writes and reads this member. Versions stored before secrets
/// existed have no such member and load with none.
pub(crate) const SECRETS_MEMBER: &str = "secrets";

pub(crate) fn config_to_json(config: &FunctionConfig) -> StoreResult<String> {
    let mut json = serde_json::to_value(config)
        .map_err(|e| StoreError::Other(format!("serializing function config: {e}")))?;
    if !config.secrets.is_empty()
        && let Some(object) = json.as_object_mut()
    {
        object.insert(SECRETS_MEMBER.into(), serde_json::json!(config.secrets.expose()));
    }
    Ok(json.to_string())
}

pub(crate) fn config_from_json(text: &str) -> StoreResult<FunctionConfig> {
    let mut json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| corrupt(format_args!("version config: {e}")))?;
    let secrets = json.as_object_mut().and_then(|o| o.remove(SECRETS_MEMBER));
    let mut config: FunctionConfig =
        serde_json::from_value(json).map_err(|e| corrupt(format_args!("version config: {e}")))?;
    if let Some(secrets) = secrets {
        // serde's message could quote a value: say only what is wrong.
        let pairs = serde_json::from_value(secrets)
            .map_err(|_| corrupt(format_args!("version secrets are not [name, value] pairs")))?;
        config.secrets = Secrets::new(pairs);
    }
    Ok(config)
}

pub(crate) fn version_from_row(row: &impl StoreRow) -> StoreResult<VersionRecord> {
    let config: String = get(row, "config")?;
    Ok(VersionRecord {
        tenant: get(row, "tenant")?,
        function: get(row, "function")?,
        version: get(row, "version")?,
        blob_digest: get(row, "blob_digest")?,
        config: config_from_json(&config)?,
        created_at: get(row, "created_at")?,
    })
}

pub(crate) fn summary_from_row(row: &impl StoreRow) -> StoreResult<FunctionSummary> {
    Ok(FunctionSummary {
        tenant: get(row, "tenant")?,
        name: get(row, "name")?,
        latest_version: get(row, "latest_version")?,
        created_at: get(row, "created_at")?,
        updated_at: get(row, "updated_at")?,
    })
}

pub(crate) fn invocation_from_row(row: &impl StoreRow) -> StoreResult<Invocation> {
    let status: String = get(row, "status")?;
    let attempts: i64 = get(row, "attempts")?;
    let status_code: Option<i64> = get(row, "status_code")?;
    let cpu_us: Option<i64> = get(row, "cpu_us")?;
    Ok(Invocation {
        id: get(row, "id")?,
        tenant: get(row, "tenant")?,
        function: get(row, "function")?,
        version: get(row, "version")?,
        mode: get(row, "mode")?,
        status: InvocationStatus::parse(&status)
            .ok_or_else(|| corrupt(format_args!("invocation status {status:?}")))?,
        attempts: u32::try_from(attempts)
            .map_err(|_| corrupt(format_args!("invocation attempts {attempts}")))?,
        created_at: get(row, "created_at")?,
        started_at: get(row, "started_at")?,
        finished_at: get(row, "finished_at")?,
        status_code: status_code
            .map(|c| u16::try_from(c).map_err(|_| corrupt(format_args!("status code {c}"))))
            .transpose()?,
        error_kind: get(row, "error_kind")?,
        cpu_us: cpu_us
            .map(|c| u64::try_from(c).map_err(|_| corrupt(format_args!("cpu time {c}"))))
            .transpose()?,
        waits: get(row, "waits")?,
        idempotency_key: get(row, "idempotency_key")?,
    })
}

pub(crate) fn log_line_from_row(row: &impl StoreRow) -> StoreResult<LogLine> {
    let stream: String = get(row, "stream")?;
    Ok(LogLine {
        seq: get(row, "seq")?,
        invocation_id: get(row, "invocation_id")?,
        stream: LogStream::parse(&stream).ok_or_else(|| corrupt(format_args!("log stream {stream:?}")))?,
        line: get(row, "line")?,
        at: get(row, "at")?,
    })
}

pub(crate) fn rows<R: StoreRow, T>(rows: Vec<R>, from_row: fn(&R) -> StoreResult<T>) -> StoreResult<Vec<T>> {
    rows.iter().map(from_row).collect()
}

/// One invocation of a [`SyncRecord`] batch, as a JSON object for `json_each`.
#[derive(serde::Serialize)]
struct SyncInvocationRow<'a> {
    id: &'a str,
    tenant: &'a str,
    function: &'a str,
    version: i64,
    status: &'static str,
    started_at: UnixMs,
    finished_at: UnixMs,
    status_code: Option<u16>,
    error_kind: Option<GuestText<'a>>,
    cpu_us: u64,
}

impl<'a> From<&'a SyncRecord> for SyncInvocationRow<'a> {
    fn from(r: &'a SyncRecord) -> Self {
        Self {
            id: &r.id,
            tenant: &r.tenant,
            function: &r.function,
            version: r.version,
            status: r.status.as_str(),
            started_at: r.started_at,
            finished_at: r.finished_at,
            status_code: r.status_code,
            error_kind: r.error_kind.as_deref().map(GuestText),
            cpu_us: r.cpu_us,
        }
    }
}

/// One log line of a [`SyncRecord`] batch, as a JSON object for `json_each`.
#[derive(serde::Serialize)]
struct SyncLogRow<'a> {
    invocation_id: &'a str,
    tenant: &'a str,
    function: &'a str,
    stream: &'static str,
    line: GuestText<'a>,
    at: UnixMs,
}

/// A batch of sync records as two JSON arrays: the invocations and their log lines, in order.
pub(crate) fn sync_batch_json(batch: &[SyncRecord]) -> StoreResult<(String, String)> {
    for record in batch {
        debug_assert!(
            matches!(record.status, InvocationStatus::Succeeded | InvocationStatus::Dead),
            "a sync invocation ends succeeded or dead, not {:?}",
            record.status
        );
    }
    let invocations: Vec<SyncInvocationRow<'_>> = batch.iter().map(SyncInvocationRow::from).collect();
    let logs: Vec<SyncLogRow<'_>> = batch
        .iter()
        .flat_map(|r| {
            r.logs.iter().map(move |(stream, line, at)| SyncLogRow {
                invocation_id: &r.id,
                tenant: &r.tenant,
                function: &r.function,
                stream: stream.as_str(),
                line: GuestText(line),
                at: *at,
            })
        })
        .collect();
    let invocations = serde_json::to_string(&invocations)
        .map_err(|e| StoreError::Other(format!("encoding invocations: {e}")))?;
    let logs =
        serde_json::to_string(&logs).map_err(|e| StoreError::Other(format!("encoding log lines: {e}")))?;
    Ok((invocations, logs))
}

pub(crate) fn node_from_row(row: &impl StoreRow) -> StoreResult<NodeRecord> {
    let number = |column: &str| -> StoreResult<i64> { get(row, column) };
    let narrow = |column: &str| -> StoreResult<u32> {
        let value = number(column)?;
        u32::try_from(value).map_err(|_| corrupt(format_args!("{column} {value}")))
    };
    Ok(NodeRecord {
        id: get(row, "id")?,
        address: get(row, "address")?,
        version: get(row, "version")?,
        started_at: get(row, "started_at")?,
        heartbeat_at: get(row, "heartbeat_at")?,
        stopped_at: get(row, "stopped_at")?,
        slots: narrow("slots")?,
        in_flight: narrow("in_flight")?,
        queue_lag_ms: u64::try_from(number("queue_lag_ms")?).unwrap_or(0),
    })
}

fn u32_column(row: &impl StoreRow, column: &str) -> StoreResult<u32> {
    let value: i64 = get(row, column)?;
    u32::try_from(value).map_err(|_| corrupt(format_args!("{column} {value}")))
}

/// A leased row, with the keys it was leased in order of.
pub(crate) fn leased_from_row(row: &impl StoreRow) -> StoreResult<((i64, i64, i64, String), Leased)> {
    let id: String = get(row, "id")?;
    let criticality: i64 = get(row, "criticality")?;
    let deadline: Option<UnixMs> = get(row, "deadline")?;
    let run_after: UnixMs = get(row, "run_after")?;
    let created_at: UnixMs = get(row, "created_at")?;
    let max_age_at: UnixMs = get(row, "max_age_at")?;
    let headers: String = get(row, "request_headers")?;
    let leased = Leased {
        id: id.clone(),
        tenant: get(row, "tenant")?,
        function: get(row, "function")?,
        version: get(row, "version")?,
        request: StoredRequest {
            method: get(row, "request_method")?,
            path_and_query: get(row, "request_path")?,
            headers: headers_from_json(&headers)?,
            body: get(row, "request_body")?,
        },
        attempt: u32_column(row, "attempts")?,
        attempts_max: u32_column(row, "attempts_max")?,
        created_at,
        // After a re-drive the age counts from the re-drive: reporting the remaining span this way
        // keeps `created_at + max_age_ms` the instant the store itself uses.
        max_age_ms: u64::try_from(max_age_at.saturating_sub(created_at)).unwrap_or(0),
        criticality: criticality_from_i64(criticality)?,
        deadline,
        run_after,
    };
    let order = (criticality, deadline.unwrap_or(NO_DEADLINE), run_after, id);
    Ok((order, leased))
}

pub(crate) fn response_from_row(row: &impl StoreRow) -> StoreResult<StoredResponse> {
    let status: i64 = get(row, "status")?;
    let headers: String = get(row, "headers")?;
    Ok(StoredResponse {
        status: u16::try_from(status).map_err(|_| corrupt(format_args!("status {status}")))?,
        headers: headers_from_json(&headers)?,
        body: get(row, "body")?,
    })
}

pub(crate) fn quota_from_row((tenant, reserved, weight): (String, i64, i64)) -> StoreResult<(String, Quota)> {
    let reserved = u32::try_from(reserved).map_err(|_| corrupt(format_args!("reserved {reserved}")))?;
    let weight = u32::try_from(weight).map_err(|_| corrupt(format_args!("weight {weight}")))?;
    Ok((tenant, Quota { reserved, weight }))
}

fn count(what: &str, n: i64) -> StoreResult<u32> {
    u32::try_from(n).map_err(|_| corrupt(format_args!("{what} count {n}")))
}

pub(crate) fn demand_from_rows(
    tenants: Vec<(String, i64, i64, i64)>,
    running: Vec<(String, String, i64)>,
) -> StoreResult<QueueDemand> {
    Ok(QueueDemand {
        tenants: tenants
            .into_iter()
            .map(|(tenant, due, plain, deferrable)| {
                Ok(TenantDemand {
                    tenant,
                    due: count("due", due)?,
                    plain: count("plain", plain)?,
                    deferrable: count("deferrable", deferrable)?,
                })
            })
            .collect::<StoreResult<_>>()?,
        running: running
            .into_iter()
            .map(|(tenant, function, n)| Ok((tenant, function, count("running", n)?)))
            .collect::<StoreResult<_>>()?,
    })
}

pub(crate) fn tenant_queue_from_counts(
    running: i64,
    runnable: i64,
    runnable_windowed: i64,
    later: i64,
) -> StoreResult<TenantQueue> {
    let n = |what: &str, v: i64| u64::try_from(v).map_err(|_| corrupt(format_args!("{what} count {v}")));
    Ok(TenantQueue {
        running: n("running", running)?,
        runnable: n("runnable", runnable)?,
        runnable_windowed: n("runnable", runnable_windowed)?,
        later: n("later", later)?,
    })
}

/// The unfinished async invocations by (status, criticality): one statement for both stores.
pub(crate) const QUEUE_DEPTH: &str = "
    SELECT status, criticality, count(*) FROM invocations
    WHERE status IN ('queued', 'failed', 'running')
    GROUP BY status, criticality ORDER BY status, criticality";

pub(crate) fn queue_depth_from_rows(
    rows: Vec<(String, i64, i64)>,
) -> StoreResult<Vec<(String, crate::Criticality, u64)>> {
    rows.into_iter()
        .map(|(status, criticality, count)| {
            Ok((status, criticality_from_i64(criticality)?, u64::try_from(count).unwrap_or(0)))
        })
        .collect()
}

/// Every tenant's unfinished invocations and their request bytes (both stores). Its `WHERE` is
/// the partial index's own, so the planner may answer it from `invocations_pending_version`.
pub(crate) const QUEUED_USAGE: &str = "
    SELECT tenant, count(*), CAST(COALESCE(SUM(request_bytes), 0) AS BIGINT) FROM invocations
    WHERE status IN ('queued', 'failed', 'running')
    GROUP BY tenant ORDER BY tenant";

pub(crate) fn queued_usage_from_rows(rows: Vec<(String, i64, i64)>) -> StoreResult<Vec<crate::QueuedUsage>> {
    rows.into_iter()
        .map(|(tenant, invocations, bytes)| {
            Ok(crate::QueuedUsage {
                invocations: u64::try_from(invocations).map_err(|_| corrupt("negative count"))?,
                bytes: u64::try_from(bytes).map_err(|_| corrupt("negative request bytes"))?,
                tenant,
            })
        })
        .collect()
}

/// Every tenant's own usage limits (both stores).
pub(crate) const USAGE_LIMITS: &str = "
    SELECT tenant, queued_max, queued_bytes_max, components_bytes_max, functions_max, versions_max,
           schedules_max
    FROM tenant_usage_limits ORDER BY tenant";

type UsageLimitsRow = (String, Option<i64>, Option<i64>, Option<i64>, Option<i64>, Option<i64>, Option<i64>);

pub(crate) fn usage_limits_from_rows(
    rows: Vec<UsageLimitsRow>,
) -> StoreResult<Vec<(String, sluice_core::OwnUsageLimits)>> {
    let value = |v: Option<i64>| -> StoreResult<Option<u64>> {
        v.map(|v| u64::try_from(v).map_err(|_| corrupt(format_args!("usage limit {v}")))).transpose()
    };
    rows.into_iter()
        .map(|(tenant, queued, queued_bytes, components_bytes, functions, versions, schedules)| {
            Ok((
                tenant,
                sluice_core::OwnUsageLimits {
                    queued_max: value(queued)?,
                    queued_bytes_max: value(queued_bytes)?,
                    components_bytes_max: value(components_bytes)?,
                    functions_max: value(functions)?,
                    versions_max: value(versions)?,
                    schedules_max: value(schedules)?,
                },
            ))
        })
        .collect()
}

/// A usage limit as a column value; the API keeps them below `i64::MAX`.
pub(crate) fn usage_limit_column(v: Option<u64>) -> StoreResult<Option<i64>> {
    v.map(|v| i64::try_from(v).map_err(|_| StoreError::Other(format!("usage limit {v} is too large"))))
        .transpose()
}

/// Sorts "no deadline" after every deadline; the same literal is in the lease indexes.
pub(crate) const NO_DEADLINE: i64 = i64::MAX;

/// Text a guest controls (a log line, and for safety an error kind), serialized as both
/// databases can store it. PostgreSQL refuses NUL in `text` and `\u0000` in `jsonb`, and with it
/// the whole statement: a guest printing `\0` would lose its own async result (and run again
/// until dead) and a whole batch of other tenants' sync records. NUL becomes U+FFFD REPLACEMENT
/// CHARACTER, which the runtime's log capture already puts where a guest wrote invalid UTF-8: an
/// escape such as `\0` could not be told from a guest that printed those two characters (unless
/// every backslash were escaped too, changing every line with one). SQLite gets the same text,
/// so both stores read back alike. No allocation unless there is a NUL.
#[derive(Clone, Copy)]
pub(crate) struct GuestText<'a>(pub &'a str);

impl serde::Serialize for GuestText<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.0.contains('\0') {
            serializer.serialize_str(&self.0.replace('\0', "\u{FFFD}"))
        } else {
            serializer.serialize_str(self.0)
        }
    }
}

pub(crate) fn headers_from_json(text: &str) -> StoreResult<Vec<(String, Vec<u8>)>> {
    let pairs: Vec<(String, String)> =
        serde_json::from_str(text).map_err(|e| corrupt(format_args!("stored headers: {e}")))?;
    pairs
        .into_iter()
        .map(|(name, value)| {
            let value = hex::decode(&value).map_err(|e| corrupt(format_args!("header {name}: {e}")))?;
            Ok((name, value))
        })
        .collect()
}

pub(crate) fn criticality_from_i64(value: i64) -> StoreResult<Criticality> {
    match value {
        0 => Ok(Criticality::High),
        1 => Ok(Criticality::Normal),
        2 => Ok(Criticality::Low),
        other => Err(corrupt(format_args!("criticality {other}"))),
    }
}
