//! sluice-gateway: the node's HTTP front. It owns the request path from socket to runtime — hard
//! limits, authentication, routing — the `/v1` control API, and the node state those share.
//!
//! It must not import wasmtime (that is `sluice-runtime`) or a database driver (`sluice-store`),
//! nor start anything: `sluice-node` builds the node and runs its tasks.
#![forbid(unsafe_code)]

pub mod admission;
pub mod api;
pub mod api_common;
pub mod api_invocations;
pub mod api_node;
pub mod api_openapi;
pub mod api_rollouts;
pub mod api_schedules;
pub mod api_tenants;
#[cfg(test)]
mod api_tests;
pub mod api_triggers;
pub mod api_versions;
pub mod body;
pub mod control;
pub mod credentials;
pub mod error;
pub mod invoke;
pub mod metrics;
pub mod node;
pub mod principal;
pub mod quota;
pub mod recent;
pub mod recorder;
pub mod rollout;
pub mod schedule;
pub mod server;
pub mod sniff;
pub mod tls;

pub use node::{Node, NodeConfig};
pub use server::Server;

/// The tenant every new store starts with, and the one an admin key acts on when none is named.
pub const DEFAULT_TENANT: &str = "default";
