//! The runtime's node-level settings ([`RuntimeConfig`]), gathering each part's own (`code`,
//! `dns`, `lanes`, `warm`), and the defaults of heavy components.

use std::path::PathBuf;

use crate::code::CodeConfig;
use crate::dns::DnsConfig;
use crate::lanes::LaneConfig;
use crate::warm;

/// Node-level settings of the runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Component instances alive at once: sizes every pool of the allocator.
    pub instances_max: u32,
    /// Largest linear memory any function may be given.
    pub function_memory_bytes_max: u64,
    /// Bytes of each freed linear memory kept resident and reset in place instead of `madvise`d
    /// away (see notes/sync-path-perf.md: with pagemap scan this removes the TLB shootdowns).
    pub memory_keep_resident_bytes: usize,
    /// Heavy components (see [`Prepared::heavy`](crate::Prepared::heavy)) run on an engine of
    /// their own that copies each instance's initialized memory into pages kept resident (up to
    /// this many bytes per slot; with pagemap scan only the pages an instance dirtied are reset),
    /// instead of mapping it copy-on-write: a large image's copy-on-write faults each cost a
    /// TLB-shootdown IPI (a VM exit on a virtual machine), which made fresh instances of an
    /// 18 MiB Python component slower than copying (BENCHMARKS.md).
    pub heavy_memory_keep_resident_bytes: usize,
    /// Initial memory from which a component is heavy ([`HEAVY_MEMORY_BYTES`] by default).
    pub heavy_from_bytes: u64,
    /// Instances of heavy components alive at once on this node, over all their versions: the
    /// size of the heavy engine's pool, so at most this many slots keep
    /// `heavy_memory_keep_resident_bytes` resident. More calls wait for a slot.
    pub heavy_slots_max: u32,
    /// The fraction of the heavy slots a tenant holds while other tenants' calls wait for one
    /// (rounded down, at least one slot): a freed slot goes to a waiting call of a tenant under
    /// its share first. A tenant alone may use every slot (see `heavy`). 1: first come, first
    /// served.
    pub heavy_tenant_share: f64,
    /// Initial memory that the instances of one heavy version alive at once may have together,
    /// unless the function sets its own `instances_max`: a version whose instances start with
    /// 15 MiB may have `heavy_memory_max / 15 MiB` of them (at least one).
    pub heavy_memory_max: u64,
    /// The same for tables.
    pub table_keep_resident_bytes: usize,
    /// Directory of compiled artifacts (`<tenant>/<digest>-<engine>.cwasm`).
    pub artifact_dir: PathBuf,
    /// The code cache and the compile pool.
    pub code: CodeConfig,
    /// Guest log bytes kept per invocation.
    pub log_bytes_per_invocation_max: usize,
    /// Let guests reach loopback and private addresses (still only hosts in their allow list).
    pub outbound_allow_private: bool,
    /// The fast and slow CPU lanes.
    pub lanes: LaneConfig,
    /// Outbound requests per invocation and their timeouts.
    pub outbound: sluice_core::limits::OutboundLimits,
    /// The resolver of outbound requests' names: its cache and each tenant's lookups in flight.
    pub dns: DnsConfig,
    /// Bounds of the warm instances kept for functions with reuse.
    pub warm: warm::WarmConfig,
    /// Instances of one heavy function version alive at once, unless the function sets its own
    /// `instances_max`; `None`: from `heavy_memory_max`.
    pub heavy_instances_max: Option<u32>,
}

impl RuntimeConfig {
    pub fn new(artifact_dir: PathBuf) -> Self {
        let limits = sluice_core::Limits::default();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        Self {
            instances_max: limits.instances_max,
            function_memory_bytes_max: limits.function_memory_bytes_max,
            memory_keep_resident_bytes: 4 << 20,
            heavy_memory_keep_resident_bytes: 64 << 20,
            heavy_from_bytes: HEAVY_MEMORY_BYTES,
            heavy_slots_max: 4 * cores,
            heavy_tenant_share: 0.25,
            heavy_memory_max: HEAVY_MEMORY_MAX_DEFAULT,
            table_keep_resident_bytes: 1 << 20,
            artifact_dir,
            code: CodeConfig::for_cores(cores as usize),
            log_bytes_per_invocation_max: limits.log_bytes_per_invocation_max,
            outbound_allow_private: false,
            lanes: LaneConfig::for_cores(cores as usize),
            outbound: limits.outbound,
            dns: DnsConfig::default(),
            warm: warm::WarmConfig::default(),
            heavy_instances_max: None,
        }
    }
}

/// Initial memory from which a component counts as heavy: it runs on the heavy engine (memory
/// copied into resident pages, not mapped copy-on-write) and its instances alive at once are
/// bounded by default (`RuntimeConfig::heavy_memory_max`).
pub const HEAVY_MEMORY_BYTES: u64 = 8 << 20;
/// Default of [`RuntimeConfig::heavy_memory_max`]: two instances of the 15 MiB Python example,
/// four of the 9 MiB JavaScript one (BENCHMARKS.md: more add memory faster than throughput).
pub const HEAVY_MEMORY_MAX_DEFAULT: u64 = 40 << 20;
