//! The garbage collector of code: versions past the newest few of their function that nothing
//! pending names, blobs that no version names any more (after retirement, `functions delete`, or
//! uploads never deployed) and compiled artifacts whose blob is gone or that an older
//! engine made. It runs in bounded steps on the control runtime: at most [`GC_BATCH_MAX`] blobs
//! per store call and [`GC_BATCH_MAX`] files per pass, so a large backlog never becomes one long
//! write or one long stall.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sluice_core::{Clock, SluiceError, SystemClock};
use sluice_gateway::Node;
use sluice_gateway::error::store_error;
use sluice_runtime::CodeKey;

/// Blobs deleted per store call, and artifact files removed per pass, at most.
pub const GC_BATCH_MAX: u32 = 1000;

/// A temporary file of an artifact write is left alone this long (a compile may be writing it).
const TMP_FILE_AGE_MIN: Duration = Duration::from_secs(60 * 60);

/// What one pass of the collector removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Collected {
    pub versions: u64,
    pub blobs: u64,
    pub artifacts: u64,
    pub artifact_bytes: u64,
}

/// One pass: old versions (keeping `versions_kept` per function, if set), blobs unnamed for
/// longer than `blob_grace`, then artifacts without a blob.
pub async fn collect(
    node: &Arc<Node>,
    blob_grace: Duration,
    versions_kept: Option<u32>,
) -> Result<Collected, SluiceError> {
    let mut collected = Collected::default();
    if let Some(keep) = versions_kept {
        collected.versions = drain(GC_BATCH_MAX, || async {
            node.store.purge_versions(keep, GC_BATCH_MAX).await.map_err(store_error)
        })
        .await?;
    }
    let cutoff = SystemClock.now_ms().saturating_sub(blob_grace.as_millis() as i64);
    collected.blobs = drain(GC_BATCH_MAX, || async {
        let gone = node.store.purge_blobs(cutoff, GC_BATCH_MAX).await.map_err(store_error)?;
        Ok(gone.len() as u64)
    })
    .await?;

    // The files are listed before the blobs are read: a compile writes its artifact only after
    // its blob is stored, so every artifact listed whose blob exists is in the set read after.
    let files = node.runtime.artifact_files().await?;
    let blobs: HashSet<CodeKey> = node
        .store
        .blob_keys()
        .await
        .map_err(store_error)?
        .into_iter()
        .map(|(tenant, digest)| CodeKey::new(&tenant, &digest))
        .collect();
    let now = SystemTime::now();
    let stale = files.into_iter().filter(|f| match &f.key {
        _ if f.temporary => now.duration_since(f.modified).unwrap_or_default() > TMP_FILE_AGE_MIN,
        Some(key) => !f.current || !blobs.contains(key),
        // A file of an older layout (artifacts were once shared by every tenant).
        None => true,
    });
    for file in stale.take(GC_BATCH_MAX as usize) {
        match std::fs::remove_file(&file.path) {
            Ok(()) => {
                collected.artifacts += 1;
                collected.artifact_bytes += file.bytes;
                if let Some(key) = &file.key {
                    node.runtime.forget(key).await;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %file.path.display(), error = %e, "cannot remove artifact"),
        }
    }
    Ok(collected)
}

/// Calls `step`, which removes at most `batch` rows and says how many, until a call removes fewer,
/// yielding between calls so a large backlog is many short store calls, not one long one.
/// Returns the rows removed.
pub async fn drain<E, F, Fut>(batch: u32, mut step: F) -> Result<u64, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, E>>,
{
    let mut total = 0;
    loop {
        let n = step().await?;
        total += n;
        if n < u64::from(batch) {
            return Ok(total);
        }
        tokio::task::yield_now().await;
    }
}

/// Compiles the artifact of every installed version that has none on this node's disk (a new
/// engine after an upgrade, a data directory restored without its artifacts), one at a time on
/// the compile pool, so first calls find them. Returns how many it compiled.
pub async fn prepare_artifacts(node: &Arc<Node>) -> u64 {
    let mut seen = HashSet::new();
    let mut compiled = 0;
    for deployed in node.deployed() {
        if !seen.insert(deployed.code_key.clone()) {
            continue;
        }
        match node.runtime.ensure_artifact(&deployed.code_key, node.blob_source(&deployed.code_key)).await {
            Ok(true) => compiled += 1,
            Ok(false) => {}
            Err(e) => tracing::warn!(
                tenant = %deployed.record.tenant,
                function = %deployed.record.function,
                error = %e,
                "cannot compile the installed version; its calls will fail until it is redeployed"
            ),
        }
    }
    compiled
}
