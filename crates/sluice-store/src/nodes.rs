//! The cluster's node registry ([`Nodes`]). Both databases keep the same table, but who writes a
//! heartbeat and whose clock stamps it differ (SQLite's writer task, PostgreSQL's clock), so both
//! methods are the [`Engine`]'s.

use sluice_core::UnixMs;

use crate::sql::{Engine, SqlStore};
use crate::{NodeRecord, StoreResult};

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
