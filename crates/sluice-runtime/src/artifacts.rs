//! Artifacts: compiled components on disk, and the [`Runtime`]'s methods that load a version's
//! component into the code cache (`code`), compiling it when its artifact is missing.
//!
//! A deployed version costs the node its metadata until it is called. Its code lives in a native
//! artifact on disk, `<artifact_dir>/<tenant>/<digest>-<engine>.cwasm`, written once when the
//! component is compiled (at deploy, or the first time a node needs it).
//!
//! Artifacts are kept per tenant even when two tenants upload the same bytes: a shared artifact
//! would tell a tenant, by a deploy that compiles in no time, that another tenant runs that code.
//!
//! Compiles wait for one of `compile_slots`; each runs in a child process (see
//! [`compiler`](crate::compiler)) or, for embedders, on a rayon pool of the node's; both at nice
//! 10, so a burst of deploys takes what the calls leave.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use futures::future::BoxFuture;
use sluice_core::{ErrorKind, SluiceError};
use wasmtime::component::Component;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use crate::code::{CodeKey, CodeStats, CompileIn, Origin, Prepared};
use crate::compiler::{ChildLimits, compile_in_child};
use crate::runtime::Runtime;
use crate::validate::{check_header, import_supported, initial_memory_bytes};

/// The blob a missing artifact is compiled from, fetched only when one is.
pub type BlobSource = Box<dyn FnOnce() -> BoxFuture<'static, Result<Option<Vec<u8>>, SluiceError>> + Send>;

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
        let lock = self.code.compile_lock(key);
        let _held = lock.lock().await;
        // A compile of this key that held the lock first (a call's, a deploy's) wrote it.
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
        if let Some(prepared) = self.load_existing(key).await {
            return Ok(prepared);
        }
        // One compile of a key at a time on this node: a call's (concurrent calls already share
        // this load), a deploy's, or the background check that compiles missing artifacts again.
        let lock = self.code.compile_lock(key);
        let _held = lock.lock().await;
        if let Some(prepared) = self.load_existing(key).await {
            return Ok(prepared);
        }
        let bytes = blob()().await?.ok_or_else(|| missing_blob(key))?;
        let prepared = self.compile_to_disk(key, bytes).await?;
        Ok(prepared)
    }

    /// The component loaded from its artifact on disk, if there is a usable one.
    async fn load_existing(self: &Arc<Self>, key: &CodeKey) -> Option<Arc<Prepared>> {
        let started = Instant::now();
        let (path, heavy) = self.existing_artifact(key)?;
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
                Some(prepared)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "artifact unusable; compiling again");
                None
            }
        }
    }

    /// Validates and compiles `bytes`, writes the artifact and returns the component loaded from
    /// it (not from the compiler's in-memory copy, so its code pages are the file's). Every
    /// rejection is `invalid_component` naming what is wrong.
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
        let started = Instant::now();
        let result = self.compile(key, bytes, started).await;
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

    /// Compiles `bytes` (where [`CompileIn`] says), writes the artifact and loads it.
    async fn compile(
        self: &Arc<Self>,
        key: &CodeKey,
        bytes: Vec<u8>,
        started: Instant,
    ) -> Result<Arc<Prepared>, SluiceError> {
        let invalid = |m: String| SluiceError::new(ErrorKind::InvalidComponent, m);
        let this = self.clone();
        // Which engine: a component that does not parse goes to the light one, whose compile
        // then says what is wrong with it.
        let (heavy, bytes) = blocking(move || {
            check_header(&bytes).map_err(invalid)?;
            let heavy = initial_memory_bytes(&bytes).is_some_and(|m| m >= this.config.heavy_from_bytes);
            Ok((heavy, bytes))
        })
        .await?;
        let path = self.artifact_path(key, heavy);
        let code = &self.code.config;
        match &code.compile_in {
            CompileIn::Node => {
                let this = self.clone();
                let path = path.clone();
                blocking(move || {
                    let engine = this
                        .engine_for(heavy)
                        .compiler()
                        .map_err(|e| SluiceError::internal(format!("making a compile engine: {e:#}")))?;
                    let artifact = this
                        .code
                        .compile_pool
                        .install(|| engine.precompile_component(&bytes))
                        .map_err(|e| invalid(format!("not a valid WebAssembly component: {e:#}")));
                    // The compiler's working contexts go with its engine, and the component's
                    // bytes (tens of MiB for Python or JS), before the memory is trimmed.
                    drop(engine);
                    drop(bytes);
                    let written = artifact.map(|artifact| write_atomically(&path, &artifact));
                    // The compiler's working memory (hundreds of MiB for a large component) is
                    // free now but stays in the allocator's arenas; give back what can be (see
                    // `compiler` for what cannot). Also after a failed compile.
                    crate::memory::release_freed_memory();
                    written?.map_err(|e| {
                        SluiceError::internal(format!("writing artifact {}: {e}", path.display()))
                    })
                })
                .await?;
            }
            CompileIn::Child { program, args } => {
                let tmp = temporary_path(&path);
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| SluiceError::internal(format!("creating {}: {e}", dir.display())))?;
                }
                let limits = ChildLimits {
                    threads: code.compile_threads,
                    memory_bytes_max: code.compile_memory_bytes_max,
                    timeout: code.compile_timeout,
                };
                let cow = self.engine_for(heavy).memory_init_cow;
                let compiled = compile_in_child(program, args, cow, &limits, bytes, &tmp).await;
                // The component's bytes are freed now; what of them sits in the main arena can
                // go back (a thread arena's top cannot, see `compiler`).
                crate::memory::release_freed_memory();
                compiled?;
                std::fs::rename(&tmp, &path).map_err(|e| {
                    let _ = std::fs::remove_file(&tmp);
                    SluiceError::internal(format!("writing artifact {}: {e}", path.display()))
                })?;
            }
        }
        let compile_ms = started.elapsed().as_millis() as u64;
        let this = self.clone();
        let key = key.clone();
        blocking(move || {
            let loaded = this.load_artifact(heavy, &key, &path, Some(compile_ms));
            if loaded.is_err() {
                // A component that compiles but cannot be served (wrong world, unknown imports)
                // leaves nothing behind that would look like a usable artifact.
                let _ = std::fs::remove_file(&path);
            }
            loaded
        })
        .await
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
}

fn missing_blob(key: &CodeKey) -> SluiceError {
    SluiceError::internal(format!("blob {} of tenant {} is missing from the store", key.digest, key.tenant))
}

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
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = temporary_path(path);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// A file of its own to write `path` through: the collector knows these names as writes in
/// progress.
fn temporary_path(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    path.with_extension(format!("tmp{}-{n}", std::process::id()))
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
