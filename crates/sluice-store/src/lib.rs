//! sluice-store: everything sluice keeps durably — tenants, API keys (hashed), content-addressed
//! component blobs, functions and their immutable versions, invocations and their log lines.
//!
//! This is the only crate that talks to a database. [`Store`] is the one interface, made of one
//! trait per domain: [`Tenants`] (and their keys), [`Code`] (blobs, functions, versions),
//! [`Invocations`] (sync records and the async queue), [`Logs`], [`Nodes`], [`Rollouts`], [`Schedules`] and [`Triggers`]. [`SqlStore`]
//! implements it once for both databases; an [`Engine`] holds what differs between them:
//! [`SqliteStore`] is the embedded default, [`PostgresStore`] the cluster's. Timestamps are unix
//! milliseconds ([`sluice_core::UnixMs`]) everywhere so both databases compare them identically. Nothing here
//! knows about HTTP or wasm.
#![forbid(unsafe_code)]

// First: its `store_trait!` defines each domain's trait.
#[macro_use]
mod timed;

mod code;
mod dialect;
mod invocations;
mod logs;
mod nodes;
mod postgres;
mod queue;
mod rollouts;
mod rows;
mod schedules;
mod sql;
mod sqlite;
mod tenants;
mod triggers;

pub use code::{
    AliasRecord, Code, FunctionRouting, FunctionSummary, TenantStorage, VersionListing, VersionRecord,
};
pub use invocations::{
    ANONYMOUS_CALLER, AttemptResult, Completion, Enqueued, HELD, IDEMPOTENCY_WINDOW_MS, IdempotencyKey,
    InOrder, Invocation, InvocationFilter, Invocations, LIST_INVOCATIONS_LIMIT_MAX, LeaseAsk, LeaseClass,
    Leased, NewInvocation, QueueDemand, QueuedUsage, StoredRequest, StoredResponse, SyncRecord, TenantDemand,
    TenantQueue,
};
pub use logs::{FUNCTION_LOGS_LIMIT_MAX, LogLine, Logs};
pub use nodes::{Change, NodeRecord, Nodes};
pub use postgres::{ClockSource, PostgresEngine, PostgresStore, SWEEP_BATCH_MAX};
pub use rollouts::{
    NewRollout, Rollout, RolloutMove, RolloutStep, Rollouts, STEPS_MAX as ROLLOUT_STEPS_MAX, StepCounts,
    check_steps,
};
pub use schedules::{Fired, Firing, NewSchedule, SCHEDULE_CALLER, Schedule, Schedules, schedule_key};
pub use sql::{Engine, SqlStore};
pub use sqlite::{SqliteEngine, SqliteStore};
pub use tenants::{KeyRecord, Quota, Tenant, Tenants};
pub use timed::{STORE_CALL_TIMEOUT, Timed};
pub use triggers::{NewTrigger, TRIGGER_CALLER, Trigger, TriggerProgress, Triggers};

pub use sluice_core::OwnUsageLimits;
pub use sluice_core::{Criticality, InvocationStatus, LogStream};

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

/// The single interface to durable state, one trait per domain (each in its module, with the one
/// implementation both databases share). Implementations must be safe to share across tasks.
pub trait Store:
    Tenants + Code + Invocations + Logs + Nodes + Rollouts + Schedules + Triggers + Send + Sync + 'static
{
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
