//! sluice-store: everything sluice keeps durably — tenants, API keys (hashed), content-addressed
//! component blobs, functions and their immutable versions, invocations and their log lines.
//!
//! This is the only crate that talks to a database. [`Store`] is the one interface, made of one
//! trait per domain: [`Tenants`] (and their keys), [`Code`] (blobs, functions, versions),
//! [`Invocations`] (sync records and the async queue), [`Logs`] and [`Nodes`]. [`SqlStore`]
//! implements it once for both databases; an [`Engine`] holds what differs between them:
//! [`SqliteStore`] is the embedded default, [`PostgresStore`] the cluster's. Timestamps are unix
//! milliseconds ([`UnixMs`]) everywhere so both databases compare them identically. Nothing here
//! knows about HTTP or wasm.
#![forbid(unsafe_code)]

// First: its `store_trait!` defines each domain's trait.
#[macro_use]
mod timed;

mod code;
mod invocations;
mod logs;
mod nodes;
mod postgres;
mod queue;
mod rows;
mod sql;
mod sqlite;
mod tenants;

pub use code::Code;
pub use invocations::{Invocations, LIST_INVOCATIONS_LIMIT_MAX};
pub use logs::{FUNCTION_LOGS_LIMIT_MAX, Logs};
pub use nodes::Nodes;
pub use postgres::{ClockSource, PostgresEngine, PostgresStore, SWEEP_BATCH_MAX};
pub use sql::{Engine, SqlStore};
pub use sqlite::{SqliteEngine, SqliteStore};
pub use tenants::Tenants;
pub use timed::{STORE_CALL_TIMEOUT, Timed};

pub use sluice_core::OwnUsageLimits;
pub use sluice_core::{Criticality, InvocationStatus, LogStream};
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
    /// Microseconds the call spent on a thread.
    pub cpu_us: u64,
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
    /// Microseconds on a thread, summed over attempts; `None` before any attempt finished (and
    /// for rows recorded before CPU time was).
    pub cpu_us: Option<u64>,
    /// Why its last attempt waited to start, as the scheduler that leased it saw it (a JSON
    /// object of milliseconds by reason); `None` for sync calls and before any lease.
    pub waits: Option<String>,
}

/// An HTTP request or response as stored for an async invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRequest {
    pub method: String,
    /// Path below the function, with the query: `/sub/path?x=1`.
    pub path_and_query: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl StoredRequest {
    /// What the request weighs against its tenant's queued-bytes quota: the body and every header
    /// name and value. The store keeps this number with the row (`request_bytes`), so the gateway
    /// (at enqueue), the scheduler (at completion) and the store's sums count the same bytes.
    pub fn quota_bytes(&self) -> u64 {
        let headers: usize = self.headers.iter().map(|(name, value)| name.len() + value.len()).sum();
        (self.body.len() + headers) as u64
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

/// How long an idempotency key keeps answering with its first invocation (DESIGN.md section 3):
/// an `enqueue` with the same key, caller, tenant and function within this span of the first
/// one's creation returns [`Enqueued::Existing`] (or [`Enqueued::KeyReused`] for a different
/// request).
pub const IDEMPOTENCY_WINDOW_MS: UnixMs = 24 * 60 * 60 * 1000;

/// The caller of a call that carries no API key (a public function's), for [`IdempotencyKey`].
/// Key ids never take this form.
pub const ANONYMOUS_CALLER: &str = "anonymous";

/// An `Idempotency-Key` and who sent it. Keys are scoped by caller: two callers using the same
/// key get two invocations, so no caller can make another's call a replay of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    pub key: String,
    /// The API key's id, or [`ANONYMOUS_CALLER`].
    pub caller: String,
}

/// An async invocation to enqueue.
#[derive(Debug, Clone)]
pub struct NewInvocation {
    pub id: String,
    pub tenant: String,
    pub function: String,
    pub version: i64,
    pub request: StoredRequest,
    /// Same key + caller + tenant + function within the idempotency window returns the first
    /// invocation if the request is the same (method, path and query, body), and is refused if
    /// it is not.
    pub idempotency_key: Option<IdempotencyKey>,
    pub criticality: Criticality,
    /// Not leased before this time (`sluice-start-after`, or now).
    pub run_after: UnixMs,
    /// Not started by this time: `expired` (`sluice-deadline`).
    pub deadline: Option<UnixMs>,
    pub attempts_max: u32,
    /// After `created_at + max_age_ms` a failed attempt is not retried: `dead`.
    pub max_age_ms: u64,
}

/// What `enqueue` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    /// Durably stored (committed) under the new id.
    Created,
    /// The idempotency key was seen within the window, for the same request: the first
    /// invocation's id. Nothing stored.
    Existing(String),
    /// The idempotency key was seen within the window for a different request: nothing stored.
    /// `differs` names what differed (`method`, `path`, `body`), in that order.
    KeyReused { first: String, differs: Vec<&'static str> },
}

/// A leased invocation: the scheduler runs it and reports back with `lease_owner` + `attempt`.
#[derive(Debug, Clone, PartialEq)]
pub struct Leased {
    pub id: String,
    pub tenant: String,
    pub function: String,
    pub version: i64,
    pub request: StoredRequest,
    /// 1 for the first attempt; the fencing token of this lease.
    pub attempt: u32,
    pub attempts_max: u32,
    pub created_at: UnixMs,
    /// `created_at + max_age_ms` is when the invocation becomes too old to start again. After a
    /// re-drive ([`Invocations::retry_dead`]) the age counts from the re-drive, so this is longer than
    /// the `max_age_ms` it was enqueued with.
    pub max_age_ms: u64,
    pub criticality: Criticality,
    pub deadline: Option<UnixMs>,
    /// When it became runnable (enqueued, or its retry was due): how long it waited is the
    /// queue's lag.
    pub run_after: UnixMs,
}

/// Which of a tenant's runnable invocations a [`LeaseAsk`] takes: the scheduler's classes
/// (DESIGN.md section 4). "Due" is relative to the ask's `promote_ahead_ms`: a call whose
/// deadline is within it must start now, whatever the node's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LeaseClass {
    /// With a deadline within `now + promote_ahead_ms`: earliest deadline first.
    Due,
    /// Without a deadline: criticality, then `run_after`.
    Plain,
    /// With a deadline beyond `now + promote_ahead_ms` (a wide start window, so it can wait for a
    /// trough): criticality, then deadline.
    Deferrable,
}

impl LeaseClass {
    pub const ALL: [LeaseClass; 3] = [LeaseClass::Due, LeaseClass::Plain, LeaseClass::Deferrable];

    pub fn as_str(self) -> &'static str {
        match self {
            LeaseClass::Due => "due",
            LeaseClass::Plain => "plain",
            LeaseClass::Deferrable => "deferrable",
        }
    }
}

/// Part of a lease: up to `limit` runnable invocations of one tenant (and function), of one class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseAsk {
    pub tenant: String,
    /// Only this function's invocations; `None`: any of the tenant's.
    pub function: Option<String>,
    /// Functions whose invocations are not taken (their downstream is saturated).
    pub exclude: Vec<String>,
    pub class: LeaseClass,
    pub limit: u32,
}

/// How much runnable work a tenant has, per class, each count capped at the `cap` asked for (the
/// scheduler needs to know "at least this much", and a count must not cost a scan of the queue).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantDemand {
    pub tenant: String,
    pub due: u32,
    pub plain: u32,
    pub deferrable: u32,
}

/// What the scheduler plans a round with: every tenant's runnable work, and what runs now in the
/// whole cluster, by `(tenant, function)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueDemand {
    /// Tenants with any runnable work, by name.
    pub tenants: Vec<TenantDemand>,
    /// `(tenant, function, running invocations)`, by tenant and function.
    pub running: Vec<(String, String, u32)>,
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

/// One tenant's unfinished async invocations (queued, running, waiting for a retry), as the
/// queued quotas count them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueuedUsage {
    pub tenant: String,
    pub invocations: u64,
    /// The sum of their [`StoredRequest::quota_bytes`].
    pub bytes: u64,
}

/// A tenant's async work now, exactly counted (`GET /v1/tenants/{t}/usage`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantQueue {
    /// Invocations running, on any node.
    pub running: u64,
    /// Runnable now (queued, or failed and due for their retry).
    pub runnable: u64,
    /// Of those, with a deadline (a start window).
    pub runnable_windowed: u64,
    /// Not runnable yet (`sluice-start-after` in the future, or waiting for a retry).
    pub later: u64,
}

/// The result of one attempt, recorded together with the state change.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptResult {
    /// The guest answered (any status below 500): `succeeded`.
    Succeeded { response: StoredResponse },
    /// The attempt failed. With `retry_at` it goes back to the queue (`failed`, leased again from
    /// then on); without, it is `dead`.
    Failed {
        error_kind: String,
        status_code: Option<u16>,
        response: Option<StoredResponse>,
        retry_at: Option<UnixMs>,
    },
}

/// An attempt's end, as the scheduler that ran it reports it ([`Invocations::complete`]).
#[derive(Debug, Clone, Copy)]
pub struct Completion<'a> {
    pub id: &'a str,
    /// The lease the attempt ran under: it is recorded only if `owner` still holds `attempt`.
    pub owner: &'a str,
    pub attempt: u32,
    pub result: &'a AttemptResult,
    /// The attempt's guest log lines.
    pub logs: &'a [(LogStream, String, UnixMs)],
    /// The attempt's time on a thread, added to the invocation's.
    pub cpu_us: u64,
    pub now: UnixMs,
}

/// Filter and page of `list_invocations`, newest first.
#[derive(Debug, Clone, Default)]
pub struct InvocationFilter {
    pub tenant: String,
    pub function: Option<String>,
    pub status: Option<InvocationStatus>,
    /// Only ids less than this (ids sort by creation time): the cursor of the next page.
    pub before_id: Option<String>,
    pub limit: u32,
}

/// A change another node made that this node's caches must follow (cluster stores only; see
/// [`Store::changes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// API keys were created or revoked.
    Keys,
    /// A tenant's rate limit, quota or usage limits were set or cleared.
    Limits,
    /// A function was deployed (a new version) or deleted.
    Function { tenant: String, function: String },
    /// Invocations became runnable (enqueued or re-driven).
    Queue,
    /// Notifications may have been missed (the listening connection was lost): reload everything.
    Resync,
}

/// A node of the cluster as its own heartbeats describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: String,
    /// Where its API answers (`http://host:port`).
    pub address: String,
    /// The sluice version it runs.
    pub version: String,
    pub started_at: UnixMs,
    /// The store's clock at its last heartbeat (set by the store, not the node).
    pub heartbeat_at: UnixMs,
    /// When it stopped cleanly, if it did.
    pub stopped_at: Option<UnixMs>,
    /// Async invocations it may run at once, and runs now.
    pub slots: u32,
    pub in_flight: u32,
    /// How long the invocations it last leased had waited past their start time.
    pub queue_lag_ms: u64,
}

/// The single interface to durable state, one trait per domain (each in its module, with the one
/// implementation both databases share). Implementations must be safe to share across tasks.
pub trait Store: Tenants + Code + Invocations + Logs + Nodes + Send + Sync + 'static {
    /// Changes made by other nodes, for a store that other nodes share; `None` for a store only
    /// this process uses (its caches follow its own writes). Each call subscribes anew.
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<Change>> {
        None
    }
}

/// A row the store wrote but cannot read back: a bug or a hand-edited database.
pub(crate) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Other(format!("corrupt row: {what}"))
}
