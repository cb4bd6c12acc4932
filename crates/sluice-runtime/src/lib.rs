//! sluice-runtime: the only crate that imports wasmtime. It owns the node's engines (light and
//! heavy: pooling allocator, epoch interruption; `engine`), turns uploaded bytes into validated
//! (`validate`), compiled and pre-instantiated components (native artifacts on disk:
//! `artifacts`; a bounded cache of loaded ones: `code`), and runs one invocation in a fresh
//! `Store` (`invoke`, with a guest's state in `host`) with its own memory limit, deadline, log
//! capture and outbound policy. It keeps the node's adaptive concurrency limits of the
//! downstreams functions call (`downstream`), which the outbound policy obeys and feeds.
//!
//! It knows nothing of keys, the store or HTTP routing (a tenant is only a name it groups by:
//! slow-lane and heavy slots, artifact directories, warm pools, downstream limits): callers hand
//! it a request and a [`FunctionConfig`](sluice_core::FunctionConfig) (`call`) and get back a
//! response head, a streaming body and, when the guest is done, an [`Outcome`], its failure
//! classified once (`classify`). This file only declares the modules and re-exports.

mod artifacts;
mod call;
mod classify;
mod code;
mod compiler;
mod config;
mod dns;
pub mod downstream;
mod engine;
mod heavy;
mod host;
mod invoke;
mod lanes;
mod logs;
mod memory;
pub mod metrics;
mod outbound;
mod runtime;
pub mod trace;
mod validate;
pub mod warm;

pub use artifacts::{ArtifactFile, ArtifactUsage, BlobSource};
pub use call::{Call, GuestBody, Lane, OnDone, Outcome, Responded, Running, TraceParent};
pub use code::{
    COMPILE_MEMORY_BYTES_MAX_DEFAULT, COMPILE_MEMORY_BYTES_MIN, COMPILE_TIMEOUT_DEFAULT, CodeConfig, CodeKey,
    CodeStats, CompileIn, Origin, Prepared,
};
pub use compiler::compile_worker_main;
pub use config::{HEAVY_MEMORY_BYTES, HEAVY_MEMORY_MAX_DEFAULT, RuntimeConfig};
pub use dns::DnsConfig;
pub use downstream::{DownstreamState, Downstreams};
pub use engine::EPOCH_TICK;
pub use invoke::INVOCATION_ID_HEADER;
pub use lanes::{LaneConfig, LaneStats};
pub use logs::LogCapture;
pub use outbound::is_private;
pub use runtime::Runtime;
pub use validate::initial_memory_bytes;
pub use wasmtime_wasi_http::Error as BodyError;
