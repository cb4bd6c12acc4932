//! Code: the bounded cache of loaded components, and what a loaded component is ([`Prepared`]).
//!
//! A call asks the [`CodeCache`] (through `Runtime::code`, in `artifacts`) for the version's
//! [`Prepared`] component:
//!
//! - a hit costs a hash lookup;
//! - a miss maps the artifact (`Component::deserialize_file`: the code pages are the file's, clean,
//!   and the kernel's to drop) and links it; concurrent misses of one key share one load;
//! - an artifact that is missing or made by another engine is compiled again from the blob, on
//!   the compile pool.
//!
//! The cache is bounded in bytes (the artifacts' sizes) and in entries, and evicts the least
//! recently used entry first (moka with its LRU policy). Each entry weighs at
//! least `bytes_max / entries_max`, so one weight bound keeps both. A call holds its `Arc` to the
//! component, so an entry evicted mid-call is freed when the call ends.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use wasmtime::Engine;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use crate::host::Host;

/// A component that is validated, compiled, linked and pre-instantiated: ready to serve.
pub struct Prepared {
    pub(crate) pre: ProxyPre<Host>,
    /// The engine it was compiled for: its stores are made there.
    pub(crate) engine: Engine,
    pub digest: String,
    /// How it was loaded.
    pub origin: Origin,
    /// The largest initial linear memory of its core modules: what every instance starts with
    /// (a componentize-py component starts with tens of MiB of initialized interpreter heap).
    pub initial_memory_bytes: u64,
    pub(crate) heavy: bool,
}

impl Prepared {
    /// A component whose instances start with at least
    /// [`HEAVY_MEMORY_BYTES`](crate::HEAVY_MEMORY_BYTES) of memory: it runs on the heavy engine,
    /// in its bounded pool.
    pub fn heavy(&self) -> bool {
        self.heavy
    }
}

/// Which compiled component: a tenant's blob digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CodeKey {
    pub tenant: Arc<str>,
    pub digest: Arc<str>,
}

impl CodeKey {
    pub fn new(tenant: &str, digest: &str) -> Self {
        Self { tenant: Arc::from(tenant), digest: Arc::from(digest) }
    }
}

/// Where the node compiles components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompileIn {
    /// On the node's own compile pool. For embedders and tests, whose executable has no compile
    /// command; the memory and time limits of [`CodeConfig`] do not apply.
    Node,
    /// In a child process per compile: `program args…` must reach [`compile_worker_main`](crate::compile_worker_main)
    /// (the `sluice` binary's hidden `compile-worker` command).
    Child { program: PathBuf, args: Vec<String> },
}

/// The default address space of a child compile: the 21 MiB Python example compiles in a few
/// hundred MiB, and what a compile can reserve stays a fraction of the machine.
pub const COMPILE_MEMORY_BYTES_MAX_DEFAULT: u64 = 4 << 30;
/// Below this a child compile cannot even start its threads (each reserves its stack and a
/// malloc arena of address space).
pub const COMPILE_MEMORY_BYTES_MIN: u64 = 256 << 20;
/// The default time a child compile may take (the Python example takes about 10 s on one core).
pub const COMPILE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(300);

/// Bounds of the code cache and the compile pool.
#[derive(Debug, Clone)]
pub struct CodeConfig {
    /// Artifact bytes of the components kept loaded.
    pub cache_bytes_max: u64,
    /// Components kept loaded.
    pub cache_entries_max: u64,
    /// Compiles running at once.
    pub compile_slots: usize,
    /// Threads one compile may use (at nice 10).
    pub compile_threads: usize,
    /// Where compiles run.
    pub compile_in: CompileIn,
    /// The address space of a child compile ([`CompileIn::Child`]): a component that needs more
    /// to compile is refused.
    pub compile_memory_bytes_max: u64,
    /// How long a child compile may take before it is killed and the component refused.
    pub compile_timeout: Duration,
}

impl CodeConfig {
    pub fn for_cores(cores: usize) -> Self {
        Self {
            cache_bytes_max: 512 << 20,
            cache_entries_max: 1000,
            compile_slots: 1,
            compile_threads: cores.max(1),
            compile_in: CompileIn::Node,
            compile_memory_bytes_max: COMPILE_MEMORY_BYTES_MAX_DEFAULT,
            compile_timeout: COMPILE_TIMEOUT_DEFAULT,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.cache_entries_max == 0 || self.cache_bytes_max == 0 {
            return Err("the code cache needs room for at least one component".into());
        }
        // Each entry weighs at least bytes/entries, and moka weighs entries in u32.
        if self.cache_bytes_max / self.cache_entries_max > u64::from(u32::MAX) {
            return Err("the code cache's bytes per entry must be under 4 GiB".into());
        }
        if self.compile_slots == 0 || self.compile_threads == 0 {
            return Err("compiles need at least one slot and one thread".into());
        }
        if self.compile_memory_bytes_max < COMPILE_MEMORY_BYTES_MIN {
            return Err(format!("a compile needs at least {} MiB", COMPILE_MEMORY_BYTES_MIN >> 20));
        }
        if self.compile_timeout.is_zero() {
            return Err("the compile timeout must be above zero".into());
        }
        Ok(())
    }
}

/// How a component came to be loaded, as a deploy reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// Compiled for this load (the artifact was missing or from another engine).
    pub compiled: bool,
    pub compile_ms: u64,
    pub artifact_bytes: u64,
}

/// What the code cache and the compiler have done since the node started.
#[derive(Debug, Clone, Default)]
pub struct CodeStats {
    pub entries: u64,
    /// Artifact bytes of the loaded components.
    pub bytes: u64,
    pub entries_max: u64,
    pub bytes_max: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    /// Loads from an artifact on disk (misses that did not compile).
    pub loads: u64,
    pub load_us_total: u64,
    pub load_us_max: u64,
    pub compiles: u64,
    pub compile_ms_total: u64,
    pub compile_failures: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    evictions: Arc<AtomicU64>,
    pub(crate) loads: AtomicU64,
    pub(crate) load_us_total: AtomicU64,
    pub(crate) load_us_max: AtomicU64,
    pub(crate) compiles: AtomicU64,
    pub(crate) compile_ms_total: AtomicU64,
    pub(crate) compile_failures: AtomicU64,
}

/// The node's loaded components and its compile pool.
pub(crate) struct CodeCache {
    pub(crate) cache: moka::future::Cache<CodeKey, Arc<Prepared>>,
    pub(crate) counters: Counters,
    pub(crate) config: CodeConfig,
    pub(crate) compile_slots: tokio::sync::Semaphore,
    pub(crate) compile_pool: rayon::ThreadPool,
    /// One lock per key being compiled (see [`CodeCache::compile_lock`]).
    compiling: std::sync::Mutex<HashMap<CodeKey, Weak<tokio::sync::Mutex<()>>>>,
}

impl CodeCache {
    pub(crate) fn new(config: CodeConfig) -> anyhow::Result<Self> {
        config.validate().map_err(anyhow::Error::msg)?;
        let counters = Counters::default();
        let evictions = counters.evictions.clone();
        let weight_min = (config.cache_bytes_max / config.cache_entries_max).max(1);
        let cache = moka::future::Cache::builder()
            .max_capacity(config.cache_bytes_max)
            // Plain LRU: TinyLFU's admission would keep a newly deployed or newly busy function
            // out of the cache until it had been called often enough.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .weigher(move |_: &CodeKey, p: &Arc<Prepared>| {
                u32::try_from(p.origin.artifact_bytes.max(weight_min)).unwrap_or(u32::MAX)
            })
            .eviction_listener(move |_, _, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    evictions.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        let compile_pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.compile_threads)
            .thread_name(|i| format!("sluice-compile-{i}"))
            .start_handler(|_| crate::lanes::nice_this_thread(10))
            .build()?;
        let compile_slots = tokio::sync::Semaphore::new(config.compile_slots);
        Ok(Self { cache, counters, config, compile_slots, compile_pool, compiling: Default::default() })
    }

    /// The lock a compile of `key` holds, shared by every compile of that key while one is
    /// held or waited for; gone when none is.
    pub(crate) fn compile_lock(&self, key: &CodeKey) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.compiling.lock().expect("compile locks");
        if let Some(lock) = locks.get(key).and_then(Weak::upgrade) {
            return lock;
        }
        locks.retain(|_, l| l.strong_count() > 0);
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        locks.insert(key.clone(), Arc::downgrade(&lock));
        lock
    }

    pub(crate) async fn stats(&self) -> CodeStats {
        self.cache.run_pending_tasks().await;
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CodeStats {
            entries: self.cache.entry_count(),
            bytes: self.cache.iter().map(|(_, p)| p.origin.artifact_bytes).sum(),
            entries_max: self.config.cache_entries_max,
            bytes_max: self.config.cache_bytes_max,
            hits: n(&c.hits),
            misses: n(&c.misses),
            evictions: n(&c.evictions),
            loads: n(&c.loads),
            load_us_total: n(&c.load_us_total),
            load_us_max: n(&c.load_us_max),
            compiles: n(&c.compiles),
            compile_ms_total: n(&c.compile_ms_total),
            compile_failures: n(&c.compile_failures),
        }
    }
}
