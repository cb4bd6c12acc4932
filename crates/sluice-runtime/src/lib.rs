//! sluice-runtime: the only crate that imports wasmtime. It owns the node's one `Engine`
//! (pooling allocator, epoch interruption), turns uploaded bytes into validated, compiled and
//! pre-instantiated components (native artifacts on disk, a bounded cache of loaded ones: `code`),
//! and runs one invocation in a fresh `Store` with its own memory limit, deadline, log capture
//! and outbound policy. It keeps the node's adaptive concurrency limits of the downstreams
//! functions call (`downstream`), which the outbound policy obeys and feeds.
//!
//! It knows nothing of keys, the store or HTTP routing (a tenant is only a name for a lane group,
//! an artifact directory and a key of downstream limits): callers hand it a request and a
//! [`FunctionConfig`] and get back a response head, a streaming body and, when the guest is done,
//! an [`Outcome`].
//!
//! This file only declares the modules and re-exports what other crates use; each module holds
//! one thing: the settings (`config`), the engines (`engine`), a guest's store state (`host`),
//! the checks of a component's bytes (`validate`), loaded components (`code`) and their
//! artifacts on disk (`artifacts`), the [`Runtime`] itself (`runtime`), one call's inputs and
//! results (`call`), its run (`invoke`) and the classification of its failure (`classify`).

mod artifacts;
mod call;
mod classify;
mod code;
mod config;
mod dns;
pub mod downstream;
mod engine;
mod heavy;
mod host;
mod invoke;
mod lanes;
mod logs;
pub mod metrics;
mod outbound;
mod runtime;
pub mod trace;
mod validate;
pub mod warm;

pub use artifacts::{ArtifactFile, ArtifactUsage, BlobSource};
pub use call::{Call, GuestBody, Lane, OnDone, Outcome, Responded, Running, TraceParent};
pub use code::{CodeConfig, CodeKey, CodeStats, Origin, Prepared};
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
