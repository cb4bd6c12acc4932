//! sluice-store: everything sluice keeps durably — tenants, API keys (hashed), content-addressed
//! component blobs, functions and their immutable versions, invocations and their log lines.
//!
//! This is the only crate that talks to a database. [`Store`] is the one interface; [`SqliteStore`]
//! is the embedded default. Timestamps are unix milliseconds ([`UnixMs`]) everywhere so both
//! backends compare them identically. Nothing here knows about HTTP or wasm.
#![forbid(unsafe_code)]

mod sqlite;

pub use sqlite::SqliteStore;

pub use sluice_core::LogStream;
use sluice_core::{FunctionConfig, Scope, UnixMs};

/// Store failures, classified so the gateway can answer 404/409/503 without parsing strings.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    /// The database refused a write it should take later (full disk, locked, read-only): the
    /// caller should answer 503 with `Retry-After`; nothing was acknowledged.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store error: {0}")]
    Other(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

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

#[derive(Debug, Clone, PartialEq)]
pub struct FunctionSummary {
    pub tenant: String,
    pub name: String,
    pub latest_version: i64,
    pub created_at: UnixMs,
    pub updated_at: UnixMs,
}

/// A guest log line. `seq` orders lines of one function across invocations (for `logs -f`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub seq: i64,
    pub invocation_id: String,
    pub stream: LogStream,
    pub line: String,
    pub at: UnixMs,
}

/// The state of an invocation (DESIGN.md section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvocationStatus {
    Queued,
    Running,
    Succeeded,
    /// Failed an attempt, waiting for its retry.
    Failed,
    Dead,
    Expired,
}

impl InvocationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Dead => "dead",
            Self::Expired => "expired",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Queued,
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::Dead,
            Self::Expired,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Dead | Self::Expired)
    }
}

/// A finished synchronous invocation, recorded in batches off the request path. Sync records are
/// not acknowledged data: under pressure they may be dropped (and counted), never block a call.
#[derive(Debug, Clone)]
pub struct SyncRecord {
    pub id: String,
    pub tenant: String,
    pub function: String,
    pub version: i64,
    /// `Succeeded` or `Dead` (a sync call has exactly one attempt).
    pub status: InvocationStatus,
    pub status_code: Option<u16>,
    pub error_kind: Option<String>,
    pub started_at: UnixMs,
    pub finished_at: UnixMs,
    pub logs: Vec<(LogStream, String, UnixMs)>,
}

/// What `GET /v1/invocations/{id}` shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    pub id: String,
    pub tenant: String,
    pub function: String,
    pub version: i64,
    /// `sync` or `async`.
    pub mode: String,
    pub status: InvocationStatus,
    pub attempts: u32,
    pub created_at: UnixMs,
    pub started_at: Option<UnixMs>,
    pub finished_at: Option<UnixMs>,
    pub status_code: Option<u16>,
    pub error_kind: Option<String>,
}

/// The single interface to durable state. Implementations must be safe to share across tasks.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    // --- tenants ---
    /// Creates a tenant; `Conflict` if it exists.
    async fn create_tenant(&self, name: &str) -> StoreResult<Tenant>;
    async fn get_tenant(&self, name: &str) -> StoreResult<Option<Tenant>>;
    async fn list_tenants(&self) -> StoreResult<Vec<Tenant>>;

    // --- keys ---
    async fn create_key(&self, key: &KeyRecord) -> StoreResult<()>;
    /// Keys of one tenant, or all keys when `tenant` is `None`. Revoked keys included.
    async fn list_keys(&self, tenant: Option<&str>) -> StoreResult<Vec<KeyRecord>>;
    /// Marks a key revoked; `false` if there is no such key.
    async fn revoke_key(&self, id: &str) -> StoreResult<bool>;
    async fn get_key(&self, id: &str) -> StoreResult<Option<KeyRecord>>;
    /// Every key that is not revoked: the gateway's auth cache is built from this.
    async fn active_keys(&self) -> StoreResult<Vec<KeyRecord>>;

    // --- blobs ---
    /// Stores component bytes under their digest; storing the same digest again is a no-op.
    async fn put_blob(&self, digest: &str, bytes: &[u8]) -> StoreResult<()>;
    async fn get_blob(&self, digest: &str) -> StoreResult<Option<Vec<u8>>>;

    // --- functions ---
    /// Creates the next version (1, 2, ...) of `tenant/function`, creating the function if
    /// needed. The tenant and blob must exist (`NotFound` otherwise).
    async fn create_version(
        &self,
        tenant: &str,
        function: &str,
        blob_digest: &str,
        config: &FunctionConfig,
    ) -> StoreResult<VersionRecord>;
    async fn latest_version(
        &self,
        tenant: &str,
        function: &str,
    ) -> StoreResult<Option<VersionRecord>>;
    async fn get_version(
        &self,
        tenant: &str,
        function: &str,
        version: i64,
    ) -> StoreResult<Option<VersionRecord>>;
    async fn list_functions(&self, tenant: &str) -> StoreResult<Vec<FunctionSummary>>;
    /// Deletes a function and its versions (blobs stay: they are content-addressed and shared);
    /// `false` if there was none.
    async fn delete_function(&self, tenant: &str, function: &str) -> StoreResult<bool>;
    /// The latest version of every function: what a starting node loads.
    async fn all_latest_versions(&self) -> StoreResult<Vec<VersionRecord>>;

    // --- invocations and logs ---
    /// Records a batch of finished sync invocations and their log lines in one transaction.
    async fn record_sync(&self, batch: &[SyncRecord]) -> StoreResult<()>;
    async fn get_invocation(&self, id: &str) -> StoreResult<Option<Invocation>>;
    async fn invocation_logs(&self, id: &str) -> StoreResult<Vec<LogLine>>;
    /// Log lines of a function with `seq > after_seq`, oldest first, at most `limit`. With
    /// `after_seq = None` the *last* `limit` lines are returned (still oldest first).
    async fn function_logs(
        &self,
        tenant: &str,
        function: &str,
        after_seq: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<LogLine>>;
}
