//! The wasmtime engines: one per kind of component (light and heavy), each with its pooling
//! allocator, its linker, the fingerprint that names its artifacts, and its epoch ticker.

use std::hash::{Hash, Hasher};
use std::time::Duration;

use sluice_core::limits::WASM_STACK_BYTES;
use wasmtime::component::Linker;
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::config::RuntimeConfig;
use crate::host::{Host, TABLE_ELEMENTS_MAX};

/// How often the epoch advances. A running guest is interrupted at this granularity: to check its
/// deadline, to check whether it has used its fast-lane slice (see [`lanes`](crate::lanes)), and
/// to yield the thread to other calls, so a spinning guest holds a core for at most one tick at a
/// time. One millisecond keeps a neighbour's wait for the core below the fast-lane target; the
/// ticks cost a wake-up of one thread per millisecond and a callback per running guest
/// (BENCHMARKS.md).
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// One wasmtime engine with its pool, linker and artifact fingerprint.
pub(crate) struct EngineSet {
    pub(crate) engine: Engine,
    /// The engine's settings with instances allocated on demand: each compile makes an engine of
    /// its own from them (see [`EngineSet::compiler`]).
    compile_config: Config,
    /// The one setting of [`code_config`] that differs between the engines: what a child
    /// compiler is told (see [`compiler`](crate::compiler)).
    pub(crate) memory_init_cow: bool,
    pub(crate) linker: Linker<Host>,
    pub(crate) fingerprint: String,
}

impl EngineSet {
    pub(crate) fn new(pool: PoolingAllocationConfig, memory_init_cow: bool) -> anyhow::Result<Self> {
        let mut wasm = code_config(memory_init_cow);
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm)?;
        let compile_config = code_config(memory_init_cow);
        let fingerprint = fingerprint(&engine);
        let mut linker: Linker<Host> = Linker::new(&engine);
        // The full WASI 0.2 set, as `wasmtime serve` links it: Rust's std imports
        // wasi:cli/environment, exit and terminal-* even in a pure HTTP handler. Filesystem
        // calls find no preopens and sockets are denied in the context below.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        spawn_epoch_ticker(&engine);
        Ok(Self { engine, compile_config, memory_init_cow, linker, fingerprint })
    }

    /// An engine for one compile, dropped after it. Cranelift keeps one working context per
    /// compile thread inside its engine for good, each as large as the largest function it has
    /// compiled (an 18 MB Python component left about 90 MiB of them); with an engine per compile
    /// they go with it. Its artifacts are the serving engine's: the settings that shape code are
    /// the same (only where instances are allocated differs), which wasmtime checks again when
    /// the artifact is loaded.
    pub(crate) fn compiler(&self) -> anyhow::Result<Engine> {
        Ok(Engine::new(&self.compile_config)?)
    }
}

/// The settings that shape compiled code, with instances allocated on demand: a serving engine
/// adds its pool to them, and a compile (in the node or in a child process) uses them as they
/// are, so its artifacts load in the serving engine (wasmtime checks again at load).
pub(crate) fn code_config(memory_init_cow: bool) -> Config {
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
        .allocation_strategy(InstanceAllocationStrategy::OnDemand);
    wasm
}

/// What names an engine's artifacts: the hash of the settings its compiled code depends on.
fn fingerprint(engine: &Engine) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// A pool for `n` component instances of `cores` core instances (and as many tables) and
/// `memories` memories each, at most.
pub(crate) fn pool_config(
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
    use wasmtime::component::Component;

    use super::*;

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
}
