//! sluice-node: the composition root. [`run`] builds a node from its parts (store, runtime,
//! gateway) and lives its life; what it starts is beside it: the first-run tenant and admin key
//! (`bootstrap`), the scheduler of async invocations, the retention purge and the other
//! background tasks (`tasks`, `gc`), and the supervisor that stops the node when one of them dies
//! (`supervisor`).
//!
//! It holds no request-path logic: HTTP is `sluice-gateway` (whose `Node` is the state the
//! workers share), running queued calls is `sluice-scheduler`, durable state is `sluice-store`.
#![forbid(unsafe_code)]

mod bootstrap;
pub mod gc;
mod run;
pub mod supervisor;
mod tasks;

pub use bootstrap::{ADMIN_TOKEN_FILE, bootstrap};
pub use run::{Config, run};
pub use sluice_runtime::warm::WarmConfig;
pub use sluice_runtime::{CodeConfig, CompileIn, LaneConfig, RuntimeConfig, compile_worker_main};
pub use supervisor::Supervisor;
pub use tasks::{CLUSTER_REFRESH, PURGE_BATCH_MAX, Tasks, Upkeep};
