//! The cluster's node registry ([`Nodes`]). Both databases keep the same table, but who writes a
//! heartbeat and whose clock stamps it differ (SQLite's writer task, PostgreSQL's clock), so both
//! methods are the [`Engine`]'s.

use crate::StoreResult;
use crate::sql::{Engine, SqlStore};
use sluice_core::UnixMs;

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

store_trait! {
    /// The node registry.
    pub trait Nodes {
        /// Records a node's heartbeat (inserting it on the first); `heartbeat_at` is the store's
        /// own clock. With `stopped` the node says it stopped cleanly.
        async fn node_heartbeat(&self, node: &NodeRecord, stopped: bool) -> StoreResult<()>;
        /// Every node that heartbeated within `within_ms` of the store's clock (stopped ones
        /// included), by id, and the store's clock now: health is judged against it, not the
        /// reader's.
        async fn list_nodes(&self, within_ms: u64) -> StoreResult<(Vec<NodeRecord>, UnixMs)>;
    }
}

#[async_trait::async_trait]
impl<E: Engine> Nodes for SqlStore<E> {
    async fn node_heartbeat(&self, node: &NodeRecord, stopped: bool) -> StoreResult<()> {
        E::node_heartbeat(self, node, stopped).await
    }

    async fn list_nodes(&self, within_ms: u64) -> StoreResult<(Vec<NodeRecord>, UnixMs)> {
        E::list_nodes(self, within_ms).await
    }
}
