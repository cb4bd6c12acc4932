//! Code: compiled components on disk and the bounded cache of loaded ones.
//!
//! A deployed version costs the node its metadata until it is called. Its code lives in a native
//! artifact on disk, `<artifact_dir>/<tenant>/<digest>-<engine>.cwasm`, written once when the
//! component is compiled (at deploy, or the first time a node needs it). A call asks the
//! [`CodeCache`] for the version's [`Prepared`] component:
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
//!
//! Artifacts are kept per tenant even when two tenants upload the same bytes: a shared artifact
//! would tell a tenant, by a deploy that compiles in no time, that another tenant runs that code.
//!
//! Compiles run on a pool of their own: at most `compile_slots` at once, each on a rayon pool
//! whose threads run at nice 10, so a burst of deploys takes what the calls leave.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use futures::future::BoxFuture;
use sluice_core::{ErrorKind, SluiceError};
use wasmtime::component::Component;

use crate::{Prepared, Runtime, check_header};

/// The blob a missing artifact is compiled from, fetched only when one is.
pub type BlobSource = Box<dyn FnOnce() -> BoxFuture<'static, Result<Option<Vec<u8>>, SluiceError>> + Send>;

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
}

impl CodeConfig {
    pub fn for_cores(cores: usize) -> Self {
        Self {
            cache_bytes_max: 512 << 20,
            cache_entries_max: 1000,
            compile_slots: 1,
            compile_threads: cores.max(1),
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
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: Arc<AtomicU64>,
    loads: AtomicU64,
    load_us_total: AtomicU64,
    load_us_max: AtomicU64,
    compiles: AtomicU64,
    compile_ms_total: AtomicU64,
    compile_failures: AtomicU64,
}

/// The node's loaded components and its compile pool.
pub(crate) struct CodeCache {
    cache: moka::future::Cache<CodeKey, Arc<Prepared>>,
    counters: Counters,
    config: CodeConfig,
    compile_slots: tokio::sync::Semaphore,
    compile_pool: rayon::ThreadPool,
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
        Ok(Self { cache, counters, config, compile_slots, compile_pool })
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

impl Runtime {
    /// The ready component of `key`: from the cache, else loaded from its artifact, else compiled
    /// from `blob()`. Concurrent calls for one key share one load. Returns whether it was a hit.
    /// `blob` is called only on a miss that must compile, so a hit allocates nothing.
    pub async fn code(
        self: &Arc<Self>,
        key: &CodeKey,
        blob: impl FnOnce() -> BlobSource + Send,
    ) -> Result<(Arc<Prepared>, bool), SluiceError> {
        let code = &self.code;
        if let Some(prepared) = code.cache.get(key).await {
            code.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Ok((prepared, true));
        }
        code.counters.misses.fetch_add(1, Ordering::Relaxed);
        let this = self.clone();
        let loaded = code
            .cache
            .try_get_with_by_ref(key, async move { this.load_or_compile(key, blob).await })
            .await
            .map_err(|e| (*e).clone())?;
        // moka applies reads and evictions in batches; after a load (a millisecond or more
        // anyway) apply them now, so the bounds hold whenever no load is in flight.
        code.cache.run_pending_tasks().await;
        Ok((loaded, false))
    }

    /// Makes sure the artifact of `key` is on disk, compiling it from `blob()` if not, without
    /// loading it into the cache. Returns whether it compiled.
    pub async fn ensure_artifact(
        self: &Arc<Self>,
        key: &CodeKey,
        blob: BlobSource,
    ) -> Result<bool, SluiceError> {
        if self.existing_artifact(key).is_some() {
            return Ok(false);
        }
        let bytes = blob().await?.ok_or_else(|| missing_blob(key))?;
        self.compile_to_disk(key, bytes).await.map(|_| true)
    }

    /// Drops the loaded component of `key` (its artifact was removed); calls running it keep it.
    pub async fn forget(&self, key: &CodeKey) {
        self.code.cache.invalidate(key).await;
    }

    /// What the code cache and the compiler have done.
    pub async fn code_stats(&self) -> CodeStats {
        self.code.stats().await
    }

    /// The artifact of `key` on disk, compiled for the light or the heavy engine.
    pub fn artifact_path(&self, key: &CodeKey, heavy: bool) -> PathBuf {
        self.config.artifact_dir.join(&*key.tenant).join(format!(
            "{}-{}.cwasm",
            key.digest,
            self.engine_for(heavy).fingerprint
        ))
    }

    /// The artifact of `key` that is on disk, and whether it is the heavy engine's. A component
    /// is compiled for one engine only (its memory decides), so at most one of them exists.
    pub fn existing_artifact(&self, key: &CodeKey) -> Option<(PathBuf, bool)> {
        [false, true]
            .into_iter()
            .map(|heavy| (self.artifact_path(key, heavy), heavy))
            .find(|(p, _)| p.exists())
    }

    async fn load_or_compile(
        self: Arc<Self>,
        key: &CodeKey,
        blob: impl FnOnce() -> BlobSource + Send,
    ) -> Result<Arc<Prepared>, SluiceError> {
        let started = Instant::now();
        if let Some((path, heavy)) = self.existing_artifact(key) {
            let this = self.clone();
            let k = key.clone();
            let p = path.clone();
            match blocking(move || this.load_artifact(heavy, &k, &p, None)).await {
                Ok(prepared) => {
                    let us = started.elapsed().as_micros() as u64;
                    let c = &self.code.counters;
                    c.loads.fetch_add(1, Ordering::Relaxed);
                    c.load_us_total.fetch_add(us, Ordering::Relaxed);
                    c.load_us_max.fetch_max(us, Ordering::Relaxed);
                    return Ok(prepared);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "artifact unusable; compiling again")
                }
            }
        }
        let bytes = blob()().await?.ok_or_else(|| missing_blob(key))?;
        let prepared = self.compile_to_disk(key, bytes).await?;
        Ok(prepared)
    }

    /// Validates and compiles `bytes`, writes the artifact and returns the component loaded from
    /// it (not from the compiler's in-memory copy, so its code pages are the file's). On the
    /// compile pool; every rejection is `invalid_component` naming what is wrong.
    async fn compile_to_disk(
        self: &Arc<Self>,
        key: &CodeKey,
        bytes: Vec<u8>,
    ) -> Result<Arc<Prepared>, SluiceError> {
        let _slot = self
            .code
            .compile_slots
            .acquire()
            .await
            .map_err(|_| SluiceError::internal("the compile pool is closed"))?;
        let this = self.clone();
        let key = key.clone();
        let result = blocking(move || {
            let started = Instant::now();
            let invalid = |m: String| SluiceError::new(ErrorKind::InvalidComponent, m);
            check_header(&bytes).map_err(invalid)?;
            // Which engine: a component that does not parse goes to the light one, whose
            // compile then says what is wrong with it.
            let heavy =
                crate::initial_memory_bytes(&bytes).is_some_and(|m| m >= this.config.heavy_from_bytes);
            let engine = this
                .engine_for(heavy)
                .compiler()
                .map_err(|e| SluiceError::internal(format!("making a compile engine: {e:#}")))?;
            let artifact = this
                .code
                .compile_pool
                .install(|| engine.precompile_component(&bytes))
                .map_err(|e| invalid(format!("not a valid WebAssembly component: {e:#}")));
            // The compiler's working contexts go with its engine, before the memory is trimmed.
            drop(engine);
            let compile_ms = started.elapsed().as_millis() as u64;
            let path = this.artifact_path(&key, heavy);
            let written = artifact.map(|artifact| write_atomically(&path, &artifact));
            // The compiler's working memory (hundreds of MiB for a large component) is free now
            // but stays in the allocator's arenas; give it back, or a node that compiled one big
            // function keeps that much RSS for good. Also after a failed compile.
            release_freed_memory();
            written?
                .map_err(|e| SluiceError::internal(format!("writing artifact {}: {e}", path.display())))?;
            let loaded = this.load_artifact(heavy, &key, &path, Some(compile_ms));
            if loaded.is_err() {
                // A component that compiles but cannot be served (wrong world, unknown imports)
                // leaves nothing behind that would look like a usable artifact.
                let _ = std::fs::remove_file(&path);
            }
            loaded
        })
        .await;
        let c = &self.code.counters;
        match &result {
            Ok(p) => {
                c.compiles.fetch_add(1, Ordering::Relaxed);
                c.compile_ms_total.fetch_add(p.origin.compile_ms, Ordering::Relaxed);
                crate::metrics::histogram("sluice_compile_seconds", &[])
                    .record_duration(std::time::Duration::from_millis(p.origin.compile_ms));
            }
            Err(_) => {
                c.compile_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    /// Maps an artifact and links it. `compile_ms` is the compile's time when this load follows
    /// one.
    fn load_artifact(
        &self,
        heavy: bool,
        key: &CodeKey,
        path: &Path,
        compile_ms: Option<u64>,
    ) -> Result<Arc<Prepared>, SluiceError> {
        // SAFETY: artifacts in this directory are written only by `compile_to_disk`, named by the
        // engine fingerprint, and wasmtime checks the engine compatibility header again.
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize_file(&self.engine_for(heavy).engine, path) }
            .map_err(|e| SluiceError::internal(format!("artifact {}: {e:#}", path.display())))?;
        let artifact_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let origin =
            Origin { compiled: compile_ms.is_some(), compile_ms: compile_ms.unwrap_or(0), artifact_bytes };
        self.prepare(heavy, &key.digest, &component, origin)
    }
}

fn missing_blob(key: &CodeKey) -> SluiceError {
    SluiceError::internal(format!("blob {} of tenant {} is missing from the store", key.digest, key.tenant))
}

/// Returns the allocator's free memory to the kernel (glibc keeps freed memory in its arenas).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_freed_memory() {
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas; it is
    // thread-safe and takes no pointers.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_freed_memory() {}

/// Runs blocking work (file mapping, linking, compiling) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SluiceError> + Send + 'static,
) -> Result<T, SluiceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SluiceError::internal(format!("loading task failed: {e}")))?
}

/// Writes through a file of its own and renames it into place, so a reader sees the whole
/// artifact or none, and two writers of one artifact (a deploy and a call's load) never share
/// the temporary file.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// One file in the artifact directory, as the collector sees it.
#[derive(Debug, Clone)]
pub struct ArtifactFile {
    pub path: PathBuf,
    pub bytes: u64,
    /// Whose artifact it is; `None` for a file that is not one of this layout's artifacts.
    pub key: Option<CodeKey>,
    /// A write in progress, or one that never finished.
    pub temporary: bool,
    /// Made by this engine: an artifact of another engine is never loaded again.
    pub current: bool,
    pub modified: std::time::SystemTime,
}

/// Artifact files and bytes on disk.
#[derive(Debug, Clone, Copy, Default)]
pub struct ArtifactUsage {
    pub files: u64,
    pub bytes: u64,
}

impl Runtime {
    /// Every file in the artifact directory, listed on a blocking thread.
    pub async fn artifact_files(self: &Arc<Self>) -> Result<Vec<ArtifactFile>, SluiceError> {
        let this = self.clone();
        blocking(move || {
            this.list_artifact_files().map_err(|e| SluiceError::internal(format!("listing artifacts: {e}")))
        })
        .await
    }

    /// Artifact files and bytes on disk: one tenant's, or every tenant's with `None`.
    pub async fn artifact_usage(
        self: &Arc<Self>,
        tenant: Option<&str>,
    ) -> Result<ArtifactUsage, SluiceError> {
        let Some(tenant) = tenant else {
            let files = self.artifact_files().await?;
            return Ok(ArtifactUsage {
                files: files.len() as u64,
                bytes: files.iter().map(|f| f.bytes).sum(),
            });
        };
        let dir = self.config.artifact_dir.join(tenant);
        blocking(move || {
            let mut usage = ArtifactUsage::default();
            if let Ok(entries) = std::fs::read_dir(dir) {
                for meta in entries.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()) {
                    usage.files += 1;
                    usage.bytes += meta.len();
                }
            }
            Ok(usage)
        })
        .await
    }

    fn list_artifact_files(&self) -> std::io::Result<Vec<ArtifactFile>> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.config.artifact_dir)? {
            let entry = entry?;
            let file_type = entry.file_type()?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if file_type.is_dir() {
                for inner in std::fs::read_dir(entry.path())? {
                    let inner = inner?;
                    if inner.file_type()?.is_file() {
                        files.push(self.artifact_file(Some(&name), &inner)?);
                    }
                }
            } else if file_type.is_file() {
                files.push(self.artifact_file(None, &entry)?);
            }
        }
        Ok(files)
    }

    fn artifact_file(
        &self,
        tenant: Option<&str>,
        entry: &std::fs::DirEntry,
    ) -> std::io::Result<ArtifactFile> {
        let meta = entry.metadata()?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let parsed = name.strip_suffix(".cwasm").and_then(|stem| stem.rsplit_once('-'));
        let (key, current) = match (tenant, parsed) {
            (Some(tenant), Some((digest, engine))) => {
                let current = engine == self.light.fingerprint || engine == self.heavy.fingerprint;
                (Some(CodeKey::new(tenant, digest)), current)
            }
            _ => (None, false),
        };
        let temporary = name.contains(".tmp");
        Ok(ArtifactFile {
            path: entry.path(),
            bytes: meta.len(),
            key,
            current,
            temporary,
            modified: meta.modified()?,
        })
    }
}
