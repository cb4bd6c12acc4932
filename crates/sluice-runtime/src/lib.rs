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

mod code;
mod dns;
pub mod downstream;
mod heavy;
mod lanes;
mod logs;
pub mod metrics;
mod outbound;
pub mod trace;
pub mod warm;

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_core::limits::WASM_STACK_BYTES;
use sluice_core::{Clock, ErrorKind, FunctionConfig, LogStream, SluiceError, SystemClock, UnixMs};
use tokio::sync::oneshot;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    Trap, UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

pub use code::{ArtifactFile, ArtifactUsage, BlobSource, CodeConfig, CodeKey, CodeStats, Origin};
pub use dns::DnsConfig;
pub use downstream::{DownstreamState, Downstreams};
pub use lanes::{LaneConfig, LaneStats};
pub use logs::LogCapture;
pub use outbound::is_private;
pub use wasmtime_wasi_http::Error as BodyError;

/// The request header that carries the invocation id to the guest.
pub const INVOCATION_ID_HEADER: &str = "sluice-invocation-id";

/// How often the epoch advances. A running guest is interrupted at this granularity: to check its
/// deadline, to check whether it has used its fast-lane slice (see [`lanes`]), and to yield the
/// thread to other calls, so a spinning guest holds a core for at most one tick at a time. One
/// millisecond keeps a neighbour's wait for the core below the fast-lane target; the ticks cost
/// a wake-up of one thread per millisecond and a callback per running guest (BENCHMARKS.md).
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Host-side resources (streams, bodies, pollables) a guest may hold at once.
const RESOURCE_TABLE_CAPACITY_MAX: usize = 10_000;
/// Table elements a guest table may grow to.
const TABLE_ELEMENTS_MAX: usize = 100_000;

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
    /// Heavy components (see [`Prepared::heavy`]) run on an engine of their own that copies
    /// each instance's initialized memory into pages kept resident (up to this many bytes per
    /// slot; with pagemap scan only the pages an instance dirtied are reset), instead of mapping
    /// it copy-on-write: a large image's copy-on-write faults each cost a TLB-shootdown IPI
    /// (a VM exit on a virtual machine), which made fresh instances of an 18 MiB Python
    /// component slower than copying (BENCHMARKS.md).
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

/// The per-store state a guest's host calls see.
struct Host {
    table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: outbound::OutboundPolicy,
    limiter: Limiter,
    deadline: Instant,
    /// This call's time on threads, checked against the fast-lane slice at every epoch tick.
    meter: Arc<lanes::Meter>,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.hooks }
    }
}

/// Enforces the function's memory limit and records that it fired, so a memory kill is reported
/// as `memory_limit` without parsing the trap message (Spin's approach).
struct Limiter {
    memory_bytes_max: usize,
    memory_limit_hit: bool,
    /// The instance's linear memories, in bytes, summed (a memory's creation counts as growth
    /// from 0): what a warm instance holds while it waits.
    memory_bytes: usize,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes_max {
            self.memory_limit_hit = true;
            return Ok(false);
        }
        self.memory_bytes = self.memory_bytes.saturating_add(desired.saturating_sub(current));
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= TABLE_ELEMENTS_MAX)
    }
}

/// A component that is validated, compiled, linked and pre-instantiated: ready to serve.
pub struct Prepared {
    pre: ProxyPre<Host>,
    /// The engine it was compiled for: its stores are made there.
    engine: Engine,
    pub digest: String,
    /// How it was loaded.
    pub origin: Origin,
    /// The largest initial linear memory of its core modules: what every instance starts with
    /// (a componentize-py component starts with tens of MiB of initialized interpreter heap).
    pub initial_memory_bytes: u64,
    heavy: bool,
}

impl Prepared {
    /// A component whose instances start with at least [`HEAVY_MEMORY_BYTES`] of memory: it runs
    /// on the heavy engine, in its bounded pool.
    pub fn heavy(&self) -> bool {
        self.heavy
    }
}

/// Initial memory from which a component counts as heavy: it runs on the heavy engine (memory
/// copied into resident pages, not mapped copy-on-write) and its instances alive at once are
/// bounded by default (`RuntimeConfig::heavy_memory_max`).
pub const HEAVY_MEMORY_BYTES: u64 = 8 << 20;
/// Default of [`RuntimeConfig::heavy_memory_max`]: two instances of the 15 MiB Python example,
/// four of the 9 MiB JavaScript one (BENCHMARKS.md: more add memory faster than throughput).
pub const HEAVY_MEMORY_MAX_DEFAULT: u64 = 40 << 20;

/// One wasmtime engine with its pool, linker and artifact fingerprint.
struct EngineSet {
    engine: Engine,
    /// The engine's settings with instances allocated on demand: each compile makes an engine of
    /// its own from them (see [`EngineSet::compiler`]).
    compile_config: Config,
    linker: Linker<Host>,
    fingerprint: String,
}

impl EngineSet {
    fn new(pool: PoolingAllocationConfig, memory_init_cow: bool) -> anyhow::Result<Self> {
        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            // No wasm backtraces: capturing one walks the guest's whole stack in host code that
            // no epoch tick interrupts, on the core of the fast lane (a deep recursion that
            // overflows its 512 KiB stack spent most of its time there, BENCHMARKS.md). The trap
            // kind and the guest's own stderr (e.g. a Rust panic message) are still logged.
            .wasm_backtrace_max_frames(None)
            .memory_init_cow(memory_init_cow)
            .epoch_interruption(true)
            .max_wasm_stack(WASM_STACK_BYTES)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm)?;
        let mut compile_config = wasm.clone();
        compile_config.allocation_strategy(InstanceAllocationStrategy::OnDemand);
        let fingerprint = fingerprint(&engine);
        let mut linker: Linker<Host> = Linker::new(&engine);
        // The full WASI 0.2 set, as `wasmtime serve` links it: Rust's std imports
        // wasi:cli/environment, exit and terminal-* even in a pure HTTP handler. Filesystem
        // calls find no preopens and sockets are denied in the context below.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        spawn_epoch_ticker(&engine);
        Ok(Self { engine, compile_config, linker, fingerprint })
    }

    /// An engine for one compile, dropped after it. Cranelift keeps one working context per
    /// compile thread inside its engine for good, each as large as the largest function it has
    /// compiled (an 18 MB Python component left about 90 MiB of them); with an engine per compile
    /// they go with it. Its artifacts are the serving engine's: the settings that shape code are
    /// the same (only where instances are allocated differs), which wasmtime checks again when
    /// the artifact is loaded.
    fn compiler(&self) -> anyhow::Result<Engine> {
        Ok(Engine::new(&self.compile_config)?)
    }
}

/// What names an engine's artifacts: the hash of the settings its compiled code depends on.
fn fingerprint(engine: &Engine) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// A pool for `n` component instances of `cores` core instances (and as many tables) and
/// `memories` memories each, at most.
fn pool_config(
    n: u32,
    (cores, memories): (u32, u32),
    config: &RuntimeConfig,
    memory_keep_resident: usize,
) -> PoolingAllocationConfig {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(cores))
        .total_memories(n.saturating_mul(memories))
        .total_tables(n.saturating_mul(cores))
        .total_stacks(n)
        .max_memory_size(config.function_memory_bytes_max as usize)
        .table_elements(TABLE_ELEMENTS_MAX)
        .linear_memory_keep_resident(memory_keep_resident)
        .table_keep_resident(config.table_keep_resident_bytes)
        // Resets only the pages a guest dirtied (Linux >= 6.7); without it keep-resident
        // would rewrite the whole kept region on every free.
        .pagemap_scan(Enabled::Auto);
    pool
}

/// The largest initial linear memory that a core module of the component `bytes` defines, read
/// from its memory sections without compiling: it decides the engine a component is compiled
/// for, before it is compiled. `None` when the bytes do not parse (the compile then says why).
pub fn initial_memory_bytes(bytes: &[u8]) -> Option<u64> {
    let mut max = 0u64;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        if let wasmparser::Payload::MemorySection(reader) = payload.ok()? {
            for memory in reader {
                let memory = memory.ok()?;
                let page = memory.page_size_log2.map_or(64 * 1024, |log2| 1u64 << log2.min(16));
                max = max.max(memory.initial.saturating_mul(page));
            }
        }
    }
    Some(max)
}

/// The node's wasm runtime.
pub struct Runtime {
    /// Light components: memory images mapped copy-on-write.
    light: EngineSet,
    /// Heavy components: memory images copied into resident pages (see
    /// [`RuntimeConfig::heavy_memory_keep_resident_bytes`]).
    heavy: EngineSet,
    /// Room in the heavy engine's pool, shared out per tenant.
    heavy_slots: Arc<heavy::HeavySlots>,
    config: RuntimeConfig,
    lanes: Arc<lanes::Lanes>,
    code: code::CodeCache,
    downstreams: Arc<Downstreams>,
    /// Where guests' outbound requests resolve names and connect.
    egress: outbound::Egress,
    warm: Arc<warm::WarmPools>,
    instance_limits: warm::InstanceLimits,
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> anyhow::Result<Self> {
        // A Rust wasip2 component instantiates a few core instances (the program plus shims)
        // with one memory and a few tables; a componentize-py one a dozen, sharing one memory.
        // The heavy pool is small, so its room per instance is generous: slots cost address
        // space, not memory, until they are used.
        let light_pool =
            pool_config(config.instances_max, (4, 2), &config, config.memory_keep_resident_bytes);
        let light = EngineSet::new(light_pool, true)?;
        let heavy_pool =
            pool_config(config.heavy_slots_max, (64, 4), &config, config.heavy_memory_keep_resident_bytes);
        let heavy = EngineSet::new(heavy_pool, false)?;
        let heavy_slots_max = config.heavy_slots_max as usize;
        let heavy_slots = heavy::HeavySlots::new(
            heavy_slots_max,
            sluice_core::share::TenantShares::share_of(heavy_slots_max, config.heavy_tenant_share),
        );
        std::fs::create_dir_all(&config.artifact_dir)?;
        let lanes = Arc::new(lanes::Lanes::new(config.lanes.clone())?);
        let code = code::CodeCache::new(config.code.clone())?;
        let downstreams = Arc::new(Downstreams::new());
        let resolver = dns::Resolver::from_system(&config.dns)?;
        let egress = outbound::Egress::system(resolver, config.dns.lookups_per_tenant_max);
        let warm = warm::WarmPools::new(config.warm);
        Ok(Self {
            light,
            heavy,
            heavy_slots,
            config,
            lanes,
            code,
            downstreams,
            egress,
            warm,
            instance_limits: Default::default(),
        })
    }

    /// What the CPU lanes are doing.
    pub fn lane_stats(&self) -> LaneStats {
        self.lanes.stats()
    }

    /// What the warm pools hold and have done.
    pub fn warm_stats(&self) -> warm::WarmStats {
        self.warm.stats()
    }

    /// How many instances of `prepared` with `config` may be alive at once on this node: the
    /// function's own `instances_max`, else [`RuntimeConfig::heavy_instances_max`] for a heavy
    /// component, else no bound.
    pub fn instances_max(&self, prepared: &Prepared, config: &FunctionConfig) -> Option<u32> {
        config.instances_max.or_else(|| {
            prepared.heavy().then(|| {
                self.config.heavy_instances_max.unwrap_or_else(|| {
                    let n = self.config.heavy_memory_max / prepared.initial_memory_bytes.max(1);
                    u32::try_from(n).unwrap_or(u32::MAX).max(1)
                })
            })
        })
    }

    /// Waits, until `deadline`, for room for one more instance of version `key` (`None` when the
    /// version is not bounded). The permit goes in the call's [`Call::instance`].
    pub async fn instance_permit(
        &self,
        key: &warm::WarmKey,
        prepared: &Prepared,
        config: &FunctionConfig,
        deadline: Instant,
    ) -> Result<Option<warm::InstancePermit>, SluiceError> {
        let Some(max) = self.instances_max(prepared, config) else { return Ok(None) };
        let mut permit = self.instance_limits.acquire(key, max, deadline).await?;
        if prepared.heavy() {
            permit.heavy_slot = Some(self.heavy_slot(&key.tenant, deadline).await?);
        }
        Ok(Some(permit))
    }

    /// A slot of the heavy engine's pool for a call of `tenant`, waiting until `deadline` (a
    /// tenant under its share before one beyond it: `heavy`). Idle warm instances of heavy
    /// components give theirs up first: a call that needs a fresh instance comes before one
    /// that may never come.
    async fn heavy_slot(&self, tenant: &str, deadline: Instant) -> Result<heavy::HeavySlot, SluiceError> {
        self.heavy_slots.acquire(tenant, deadline, || self.warm.drop_idle_heavy()).await
    }

    /// The concurrency limits of every function's downstreams on this node: the scheduler and
    /// the gateway ask it whether a function may start, the API shows it.
    pub fn downstreams(&self) -> &Arc<Downstreams> {
        &self.downstreams
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Identifies the engines' code generation settings (light and heavy); part of every
    /// artifact's file name.
    pub fn engine_fingerprint(&self) -> String {
        format!("{}+{}", self.light.fingerprint, self.heavy.fingerprint)
    }

    /// The engine for components whose instances start with `initial_memory_bytes`.
    fn engine_for(&self, heavy: bool) -> &EngineSet {
        if heavy { &self.heavy } else { &self.light }
    }

    /// Heavy instances alive now, and at most.
    pub fn heavy_slots(&self) -> (u32, u32) {
        let max = self.config.heavy_slots_max;
        (self.heavy_slots.in_use() as u32, max)
    }

    fn prepare(
        &self,
        heavy: bool,
        digest: &str,
        component: &Component,
        origin: Origin,
    ) -> Result<Arc<Prepared>, SluiceError> {
        let invalid = |m: String| SluiceError::new(ErrorKind::InvalidComponent, m);
        let set = self.engine_for(heavy);
        let ty = component.component_type();
        let unsupported: Vec<String> =
            ty.imports(&set.engine).map(|(n, _)| n.to_string()).filter(|n| !import_supported(n)).collect();
        if !unsupported.is_empty() {
            return Err(invalid(format!(
                "component imports interfaces sluice does not provide: {}",
                unsupported.join(", ")
            )));
        }
        let exports: Vec<String> = ty.exports(&set.engine).map(|(n, _)| n.to_string()).collect();
        if !exports.iter().any(|e| e.starts_with("wasi:http/incoming-handler@0.2")) {
            return Err(invalid(format!(
                "component does not export wasi:http/incoming-handler@0.2.x (it exports: {}); \
                 build it against the wasi:http/proxy world",
                if exports.is_empty() { "nothing".to_string() } else { exports.join(", ") }
            )));
        }
        let pre = set
            .linker
            .instantiate_pre(component)
            .map_err(|e| invalid(format!("component cannot be linked: {e:#}")))?;
        let pre =
            ProxyPre::new(pre).map_err(|e| invalid(format!("component is not a wasi:http proxy: {e:#}")))?;
        let initial_memory_bytes = component
            .resources_required()
            .and_then(|r| r.max_initial_memory_size)
            .map_or(0, |pages| pages.saturating_mul(64 * 1024));
        Ok(Arc::new(Prepared {
            pre,
            engine: set.engine.clone(),
            digest: digest.to_string(),
            origin,
            initial_memory_bytes,
            heavy,
        }))
    }

    /// A fresh store for `call`: its guest's stdout and stderr go to `logs`, its outbound
    /// requests through `hooks`; its epoch callback stops it at its deadline and moves it off the
    /// fast lane once it used its slice.
    fn new_store(
        &self,
        engine: &Engine,
        call: &Call,
        logs: &LogCapture,
        hooks: outbound::OutboundPolicy,
        deadline: Instant,
        meter: Arc<lanes::Meter>,
    ) -> Store<Host> {
        let fast_slice = self.lanes.config().fast_slice;
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(logs.stream(LogStream::Stdout))
            .stderr(logs.stream(LogStream::Stderr))
            .envs(&call.config.env)
            .envs(call.config.secrets.expose())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        let mut table = ResourceTable::new();
        table.set_max_capacity(RESOURCE_TABLE_CAPACITY_MAX);
        let host = Host {
            table,
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            hooks,
            limiter: Limiter {
                memory_bytes_max: call.config.memory_bytes as usize,
                memory_limit_hit: false,
                memory_bytes: 0,
            },
            deadline,
            meter,
        };
        let mut store = Store::new(engine, host);
        store.limiter(|h| &mut h.limiter);
        store.epoch_deadline_callback(move |ctx| {
            let host = ctx.data();
            if Instant::now() >= host.deadline {
                return Ok(UpdateDeadline::Interrupt);
            }
            host.meter.check_slice(fast_slice);
            // The yield is where a call that used its slice leaves the fast lane (`LaneFuture`
            // sees the request when this future returns pending), and where a call that did not
            // lets its neighbours on this thread run.
            Ok(UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now())))
        });
        store
    }

    /// Starts one invocation in a fresh store (or a warm one, see [`warm`]). A [`Lane::Sync`] call starts on the current
    /// runtime (the HTTP worker of its core) so a short call never leaves it; a [`Lane::Async`]
    /// call, and a sync call of a heavy component, starts on the slow lane's threads. Either moves to a slow-lane slot once it has used
    /// its fast-lane slice. The request gets `sluice-invocation-id` (and a `Host` if it has none)
    /// here, for every caller.
    pub fn invoke<B>(&self, prepared: &Arc<Prepared>, mut call: Call, request: http::Request<B>) -> Running
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BodyError>,
    {
        let mut request = request;
        let headers = request.headers_mut();
        // The guest contract: every attempt sees the invocation id — sluice's, replacing any a
        // client sent — and wasi:http needs an authority, so a request without `Host` gets one.
        let id = http::HeaderValue::from_str(&call.invocation_id).expect("invocation ids are ASCII");
        headers.insert(INVOCATION_ID_HEADER, id);
        if !headers.contains_key(http::header::HOST) {
            headers.insert(http::header::HOST, http::HeaderValue::from_static("localhost"));
        }
        let run_span = call
            .trace
            .as_ref()
            .and_then(|p| trace::RunSpan::start(&p.cx, &call.invocation_id, &call.function, p.attempt));
        let propagation = trace::Propagation::for_guest(run_span.as_ref(), headers);
        let started_at = SystemClock.now_ms();
        let deadline = Instant::now() + call.timeout;
        let meter = Arc::new(lanes::Meter::new());
        let fast_slice = self.lanes.config().fast_slice;
        // A warm instance of this version (`deploy --reuse`), or a fresh one.
        let warm = call.reuse.as_ref().and_then(|r| self.warm.take(&r.key, &call.config));
        let logs = match &warm {
            Some(w) => w.logs.clone(),
            None => LogCapture::new(self.config.log_bytes_per_invocation_max),
        };
        let hooks = outbound::OutboundPolicy::new(
            call.config.clone(),
            &self.config,
            self.egress.clone(),
            logs.clone(),
            outbound::DownstreamScope {
                registry: self.downstreams.clone(),
                tenant: call.group.clone(),
                function: call.function.clone(),
            },
            propagation,
        );
        // A heavy component's fresh instance takes the pool slot its permit reserved; a warm one
        // already holds its own.
        let fresh_slot = call.instance.as_mut().and_then(|p| p.heavy_slot.take());
        let (mut store, proxy, served, heavy_slot) = match warm {
            Some(warm::Warm { mut store, proxy, calls, heavy_slot, .. }) => {
                drop(fresh_slot);
                // What belongs to this call; the guest's own state (memory, resources it kept)
                // stays.
                let host = store.data_mut();
                host.hooks = hooks;
                host.limiter.memory_limit_hit = false;
                host.deadline = deadline;
                host.meter = meter.clone();
                (store, Some(proxy), calls, heavy_slot)
            }
            None => {
                let store = self.new_store(&prepared.engine, &call, &logs, hooks, deadline, meter.clone());
                (store, None, 0, fresh_slot)
            }
        };
        store.set_epoch_deadline(1);
        let reusable = call.reuse.is_some() && served + 1 < call.config.reuse_calls;

        let (head_tx, head_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
        let status = Arc::new(AtomicU16::new(0));
        let status_seen = status.clone();
        let heavy = prepared.heavy();
        let prepared = prepared.clone();
        // The guest's part of the call, which may move between lanes: it owns the store, so
        // wherever it ends (or is dropped) the instance is freed there.
        // One value, so that however the future below ends (even unpolled) the store drops
        // before its slot.
        let held = Held { store, heavy_slot };
        let run = async move {
            let mut held = held;
            let store = &mut held.store;
            let result = async {
                let req = store.data_mut().http().new_incoming_request(Scheme::Http, request)?;
                let out = store.data_mut().http().new_response_outparam_from_callback(move |res| {
                    if let Ok(r) = &res {
                        status_seen.store(r.status().as_u16(), Ordering::Relaxed);
                    }
                    let _ = head_tx.send(res);
                })?;
                let proxy = match proxy {
                    Some(proxy) => proxy,
                    None => prepared.pre.instantiate_async(&mut *store).await?,
                };
                proxy.wasi_http_incoming_handler().call_handle(&mut *store, req, out).await?;
                Ok(proxy)
            }
            .await;
            let memory_hit = store.data().limiter.memory_limit_hit;
            match result {
                // Kept for the task to decide whether it serves again, when it may.
                Ok(proxy) if reusable => Ran { result: Ok(()), memory_hit, kept: Some((held, proxy)) },
                result => {
                    // Dropping the store at once frees its slot and drops an unset response
                    // outparam, which tells the waiting caller that no response is coming.
                    drop(held);
                    Ran { result: result.map(drop), memory_hit, kept: None }
                }
            }
        };
        let guest = lanes::LaneFuture::new(
            run,
            meter.clone(),
            self.lanes.clone(),
            call.group.clone(),
            call.function.clone(),
        );
        let invocation_id = call.invocation_id.clone();
        let memory_bytes = call.config.memory_bytes;
        let lane = call.lane;
        let warm_pools = self.warm.clone();
        let instance_permit = call.instance;
        let task = async move {
            let _instance_permit = instance_permit;
            // The epoch callback stops a guest that computes past its deadline; this outer bound
            // stops one that waits in a host call (a sleep, a slow downstream) or for a slot.
            let ended = tokio::select! {
                biased;
                () = cancelled(cancel_rx) => Ended::Cancelled,
                r = tokio::time::timeout_at(deadline.into(), guest) => match r {
                    Ok(ran) => Ended::Ran(ran),
                    Err(_elapsed) => Ended::TimedOut,
                },
            };
            let status_code = match status.load(Ordering::Relaxed) {
                0 => None,
                s => Some(s),
            };
            let mut detail = None;
            let mut kept = None;
            let error = match ended {
                Ended::Cancelled => Some(SluiceError::new(
                    ErrorKind::ClientClosed,
                    "the client closed the connection before the response was complete",
                )),
                Ended::TimedOut => Some(timeout_error(call.timeout, meter.waited())),
                Ended::Ran(Ran { result: Ok(()), .. }) if status_code.is_none() => Some(SluiceError::new(
                    ErrorKind::NoResponse,
                    "the function returned without setting a response",
                )),
                Ended::Ran(Ran { result: Ok(()), memory_hit, kept: k }) => {
                    // A guest that coped with a refused memory.grow is not reused either: it
                    // hit a limit.
                    if !memory_hit {
                        kept = k;
                    }
                    None
                }
                Ended::Ran(Ran { result: Err(e), memory_hit, .. }) => {
                    detail = trap_detail(&e);
                    Some(classify(&e, memory_hit, memory_bytes, call.timeout, meter.waited()))
                }
            };
            if meter.demoted() {
                // Says why a call took longer than its neighbours, and what it waited for.
                let mut line = format!(
                    "used its fast-lane slice of {}; moved to a slow-lane slot",
                    sluice_core::units::format_duration(fast_slice)
                );
                if let Some(waited) = waited_ms(meter.waited()) {
                    line.push_str(&format!(", where it waited {waited} for a slot"));
                }
                logs.system(line);
            }
            if let Some(e) = &error {
                let said = detail.as_deref().unwrap_or(&e.message);
                logs.system(format!("invocation failed ({}): {said}", e.kind));
            }
            if let Some(reuse) = &call.reuse
                && served > 0
            {
                // A call on a warm instance: some guests cannot serve a second call.
                let failed = error.as_ref().is_some_and(|e| e.kind != ErrorKind::ClientClosed);
                if warm_pools.warm_call_ended(&reuse.key, failed) {
                    let line = format!(
                        "{} calls in a row failed on reused instances of this version: it gets a \
                         fresh instance for every call from now on (this function's instances \
                         cannot serve more than one call; deploy it without --reuse)",
                        warm::WARM_FAILURES_MAX
                    );
                    tracing::warn!(tenant = %reuse.key.tenant, function = %reuse.key.function, version = reuse.key.version, "{line}");
                    logs.system(line);
                }
            }
            let cpu_us = meter.busy().as_micros() as u64;
            if let Some(span) = run_span {
                span.end(status_code, error.as_ref(), cpu_us);
            }
            let outcome = Outcome {
                invocation_id,
                error,
                status_code,
                logs: logs.take(),
                started_at,
                finished_at: SystemClock.now_ms(),
                cpu_us,
            };
            // Only after its lines were taken: the next call on this instance starts with none.
            let served = served + 1;
            if let Some(reuse) = &call.reuse {
                if let Some((Held { store, heavy_slot }, proxy)) = kept {
                    warm_pools.put(
                        reuse.key.clone(),
                        warm::Warm::new(store, proxy, call.config.clone(), logs, served, heavy_slot),
                    );
                }
                warm_pools.ended();
            }
            if let Some(on_done) = call.on_done {
                on_done(&outcome);
            }
            let _ = done_tx.send(outcome);
        };
        // A heavy component's sync call starts on the slow lane's threads too: its instances are
        // bounded per version, and on the accepting core's worker two of them could share one
        // core while the other waited (Python fresh: 414 req/s there, 655-689 here; BENCHMARKS.md).
        // Most of its calls outlast the fast-lane slice anyway.
        match lane {
            Lane::Sync if !heavy => drop(tokio::spawn(task)),
            _ => drop(self.lanes.handle().spawn(task)),
        }
        Running { head: head_rx, done: done_rx, cancel: CancelOnDrop(Some(cancel_tx)) }
    }
}

/// How the guest's task ended.
enum Ended {
    Ran(Ran),
    TimedOut,
    Cancelled,
}

/// A guest that ran to its end (or its trap).
struct Ran {
    result: wasmtime::Result<()>,
    /// A `memory.grow` was refused by the function's limit.
    memory_hit: bool,
    /// The instance, after a clean return: it may serve again.
    kept: Option<(Held, wasmtime_wasi_http::p2::bindings::Proxy)>,
}

/// A call's store and the heavy pool slot it occupies, if any: fields drop in order, so the slot
/// is given back only after the store (and its instance) is gone.
struct Held {
    store: Store<Host>,
    heavy_slot: Option<heavy::HeavySlot>,
}

/// Resolves when the caller went away: the [`CancelOnDrop`] was dropped while armed. A disarmed
/// guard (the response was delivered whole) never resolves it.
async fn cancelled(rx: oneshot::Receiver<()>) {
    if rx.await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Cancels the guest's task when dropped, unless disarmed first: held by [`Running`] until the
/// response head arrives, then by the response body until its last frame.
struct CancelOnDrop(Option<oneshot::Sender<()>>);

impl CancelOnDrop {
    fn disarm(&mut self) {
        self.0.take();
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// Where a call starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// On the current runtime: an HTTP worker, whose core the caller is waiting on.
    Sync,
    /// On the slow lane's threads: queued work that nobody waits on at the other end of a
    /// socket, kept off the control runtime that hosts the queue writer and the API.
    Async,
}

/// Receives an invocation's outcome when the guest is done.
pub type OnDone = Box<dyn FnOnce(&Outcome) + Send>;

/// What a caller asks of one invocation.
pub struct Call {
    pub invocation_id: String,
    pub config: Arc<FunctionConfig>,
    pub timeout: Duration,
    /// Where the call starts.
    pub lane: Lane,
    /// Slow-lane slots are bounded per group: the caller passes the tenant.
    pub group: Arc<str>,
    /// The function's name (within the group): downstream concurrency limits are kept per
    /// (tenant, function, downstream host).
    pub function: Arc<str>,
    /// Called with the outcome when the guest is done, before the outcome is sent to
    /// [`Running`]; the place to record it without keeping a task per call.
    pub on_done: Option<OnDone>,
    /// The span the call's `run` span is a child of (`None` with tracing off).
    pub trace: Option<TraceParent>,
    /// Where a warm instance comes from and goes back to, for a function with `reuse_calls` above
    /// 1 (`None`: a fresh instance that is dropped after the call).
    pub reuse: Option<warm::Reuse>,
    /// Room for its instance among the version's bounded instances ([`Runtime::instance_permit`]);
    /// held until the guest is done.
    pub instance: Option<warm::InstancePermit>,
}

/// Where an attempt's `run` span belongs in its trace.
pub struct TraceParent {
    pub cx: trace::TraceContext,
    /// The attempt of an async call.
    pub attempt: Option<u32>,
}

/// How an invocation ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub invocation_id: String,
    /// `None` when the guest returned normally after setting a response.
    pub error: Option<SluiceError>,
    /// The status of the response the guest set, if it set one.
    pub status_code: Option<u16>,
    pub logs: Vec<(LogStream, String, UnixMs)>,
    pub started_at: UnixMs,
    pub finished_at: UnixMs,
    /// Time the call spent on a thread (instantiation, guest code and the host calls it made), in
    /// microseconds: wall time inside its polls on the fast lane, thread CPU time on the slow.
    pub cpu_us: u64,
}

/// The body of a guest's response. Dropping it before its last frame (the client went away)
/// cancels the guest.
pub struct GuestBody {
    inner: HyperOutgoingBody,
    cancel: CancelOnDrop,
    /// Bytes of a response with a length (`content-length`) still to come. hyper stops polling
    /// such a body once it has written that many bytes, so the end is never seen as a last frame:
    /// without counting, a client that had the whole response would count as gone away while the
    /// guest was still returning.
    remaining: Option<u64>,
}

impl GuestBody {
    /// `length`: the response's `content-length`, if it has one.
    fn new(inner: HyperOutgoingBody, cancel: CancelOnDrop, length: Option<u64>) -> Self {
        let remaining = length.or_else(|| http_body::Body::size_hint(&inner).exact());
        let mut cancel = cancel;
        if remaining == Some(0) {
            // Nothing follows the head: hyper will not poll the body at all.
            cancel.disarm();
        }
        Self { inner, cancel, remaining }
    }
}

impl http_body::Body for GuestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(None) => self.cancel.disarm(),
            std::task::Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                if let Some(remaining) = self.remaining.as_mut() {
                    *remaining = remaining.saturating_sub(len);
                    if *remaining == 0 {
                        self.cancel.disarm();
                    }
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The response a guest set, and the receiver of its outcome once it is done.
pub type Responded = (http::Response<GuestBody>, oneshot::Receiver<Outcome>);

/// An invocation in flight. Dropping it before the response head arrived cancels the guest.
pub struct Running {
    head: oneshot::Receiver<Result<http::Response<HyperOutgoingBody>, ErrorCode>>,
    done: oneshot::Receiver<Outcome>,
    cancel: CancelOnDrop,
}

impl Running {
    /// Waits for the response head. On success the body streams while the guest keeps running
    /// and the returned receiver yields the outcome once it is done; on failure the outcome says
    /// why there is no response.
    pub async fn response(mut self) -> Result<Responded, Outcome> {
        // The outcome can come first: a call that timed out on the slow lane has its instance
        // (and with it the unset response) freed there, possibly later.
        let head = tokio::select! {
            biased;
            head = &mut self.head => head,
            done = &mut self.done => {
                self.cancel.disarm();
                return Err(done.unwrap_or_else(|_| lost_outcome()));
            }
        };
        match head {
            Ok(Ok(response)) => {
                let cancel = CancelOnDrop(self.cancel.0.take());
                let length = response
                    .headers()
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok());
                let response = response.map(|inner| GuestBody::new(inner, cancel, length));
                Ok((response, self.done))
            }
            Ok(Err(code)) => {
                self.cancel.disarm();
                let mut outcome = (&mut self.done).await.unwrap_or_else(|_| lost_outcome());
                outcome.error.get_or_insert_with(|| {
                    SluiceError::new(ErrorKind::Trap, format!("the function answered with error {code:?}"))
                });
                Err(outcome)
            }
            Err(_) => {
                self.cancel.disarm();
                Err((&mut self.done).await.unwrap_or_else(|_| lost_outcome()))
            }
        }
    }
}

fn lost_outcome() -> Outcome {
    Outcome {
        invocation_id: String::new(),
        error: Some(SluiceError::internal("the invocation task ended without an outcome")),
        status_code: None,
        logs: Vec::new(),
        started_at: 0,
        finished_at: 0,
        cpu_us: 0,
    }
}

/// A wait for a slow-lane slot, to the millisecond, if it lasted one.
fn waited_ms(waited: Duration) -> Option<String> {
    let ms = Duration::from_millis(waited.as_millis() as u64);
    (!ms.is_zero()).then(|| sluice_core::units::format_duration(ms))
}

fn timeout_error(timeout: Duration, waited: Duration) -> SluiceError {
    let mut message = format!(
        "the function did not finish within its timeout of {}",
        sluice_core::units::format_duration(timeout)
    );
    if let Some(waited) = waited_ms(waited) {
        message.push_str(&format!(" (of which it waited {waited} for a slow-lane slot)"));
    }
    SluiceError::new(ErrorKind::Timeout, message)
}

/// Classifies a failed guest call once, by type, never by message text.
fn classify(
    err: &wasmtime::Error,
    memory_hit: bool,
    memory_bytes: u64,
    timeout: Duration,
    waited: Duration,
) -> SluiceError {
    if memory_hit {
        return SluiceError::new(
            ErrorKind::MemoryLimit,
            format!("the function exceeded its memory limit of {memory_bytes} bytes"),
        );
    }
    if err.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some() {
        return SluiceError::new(ErrorKind::Overloaded, "no free instance slot on this node").retry_after(1);
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => timeout_error(timeout, waited),
        // The kind of trap only: the caller of a function learns that it failed and how, not
        // its internals. The whole chain goes to the invocation's logs (`trap_detail`).
        Some(trap) => SluiceError::new(ErrorKind::Trap, format!("the function trapped ({trap})")),
        None => SluiceError::new(ErrorKind::Trap, "the function failed in a host call"),
    }
}

/// What the logs say about a failed call beyond its [`SluiceError`]: the error chain of a trap.
fn trap_detail(err: &wasmtime::Error) -> Option<String> {
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => None,
        _ => Some(format!("{err:#}")),
    }
}

/// Rejects bytes that are not a component before handing them to the compiler, so the message
/// says what the bytes are rather than where parsing stopped.
pub(crate) fn check_header(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err("not a WebAssembly binary (it does not start with the \\0asm magic)".into());
    }
    // Bytes 4..8 are a version and a layer: layer 0 is a core module, layer 1 a component.
    if bytes[6..8] == [0, 0] {
        return Err("this is a core WebAssembly module, not a component: build it for the \
                    wasm32-wasip2 target (or wrap it with `wasm-tools component new`)"
            .into());
    }
    Ok(())
}

/// The WASI 0.2 packages sluice links. Anything else a component imports is refused at deploy.
fn import_supported(name: &str) -> bool {
    const PACKAGES: [&str; 7] = [
        "wasi:io/",
        "wasi:clocks/",
        "wasi:random/",
        "wasi:cli/",
        "wasi:filesystem/",
        "wasi:sockets/",
        "wasi:http/",
    ];
    PACKAGES.iter().any(|p| name.starts_with(p)) && name.contains("@0.2.")
}

/// Advances the engine's epoch every [`EPOCH_TICK`] from a plain thread. The thread holds only a
/// weak reference, so it ends when the engine is dropped (Spin's pattern).
fn spawn_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("sluice-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .expect("spawning the epoch thread");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_memory_is_read_from_the_core_modules_of_a_component() {
        let component = |memory: &str| {
            wat::parse_str(format!(
                "(component (core module (memory {memory})) (core module (memory 1)) \
                 (component (core module (memory 3))))"
            ))
            .unwrap()
        };
        // The largest initial memory of any core module, nested components included.
        assert_eq!(initial_memory_bytes(&component("240")), Some(240 * 64 * 1024));
        assert_eq!(initial_memory_bytes(&component("2")), Some(3 * 64 * 1024));
        assert!(initial_memory_bytes(&component("240")).unwrap() >= HEAVY_MEMORY_BYTES);
        let none = wat::parse_str("(component (core module (func)))").unwrap();
        assert_eq!(initial_memory_bytes(&none), Some(0));
        // Bytes that do not parse decide nothing: the compile says what is wrong.
        let mut cut = component("240");
        cut.truncate(cut.len() - 3);
        assert_eq!(initial_memory_bytes(&cut), None);
        assert_eq!(initial_memory_bytes(b"not wasm at all"), None);
    }

    #[test]
    fn a_compile_engines_artifacts_load_in_the_serving_engine() {
        let config = RuntimeConfig::new(std::env::temp_dir());
        for (cow, pool) in
            [(true, pool_config(8, (4, 2), &config, 0)), (false, pool_config(2, (64, 4), &config, 0))]
        {
            let set = EngineSet::new(pool, cow).unwrap();
            let compiler = set.compiler().unwrap();
            assert_eq!(fingerprint(&compiler), set.fingerprint);
            let component = wat::parse_str("(component (core module (memory 1)))").unwrap();
            let artifact = compiler.precompile_component(&component).unwrap();
            drop(compiler);
            // SAFETY: the artifact was just made by an engine of the same settings.
            #[allow(unsafe_code)]
            let loaded = unsafe { Component::deserialize(&set.engine, &artifact) };
            assert!(loaded.is_ok(), "{:?}", loaded.err());
        }
    }

    #[test]
    fn header_check_names_the_problem() {
        assert!(check_header(b"hello world").unwrap_err().contains("not a WebAssembly binary"));
        assert!(check_header(b"\0asm\x01\0\0\0").unwrap_err().contains("core WebAssembly module"));
        assert!(check_header(b"\0asm\x0d\0\x01\0").is_ok());
    }

    #[test]
    fn supported_imports() {
        assert!(import_supported("wasi:http/types@0.2.4"));
        assert!(import_supported("wasi:cli/environment@0.2.0"));
        assert!(!import_supported("fermyon:spin/key-value@2.0.0"));
        assert!(!import_supported("wasi:keyvalue/store@0.2.0-draft"));
        assert!(!import_supported("wasi:http/types@0.3.0"));
    }
}
