//! Records finished sync invocations (their outcome and log lines) off the request path.
//!
//! Calls hand records to a queue bounded in records and in bytes without waiting; one background
//! task writes them in batches, at its own pace, and gives their bytes back once a batch is
//! written. Sync records are not acknowledged data: when either bound is reached a record is
//! dropped and counted instead of slowing the call down. A batch is written all or nothing, so
//! a record the store refuses (for a reason of its own, not because the store is unavailable)
//! is found by halving the batch and dropped alone: it cannot cost other tenants their records.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use sluice_core::limits::LOG_LINE_OVERHEAD_BYTES;
use sluice_store::{Store, StoreError, SyncRecord};
use tokio::sync::mpsc;

/// Records written in one transaction at most.
const BATCH_RECORDS_MAX: usize = 1000;
/// How long a record may wait for its batch to fill.
const BATCH_WAIT: Duration = Duration::from_millis(50);
/// What a record costs in the queue beyond its strings and log lines (the struct itself and the
/// channel slot).
const RECORD_OVERHEAD_BYTES: usize = 256;
/// How long `flush` waits for the queue to drain.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<SyncRecord>,
    dropped: Arc<AtomicU64>,
    /// Bytes of the records in the channel or in the writer's current batch.
    queued_bytes: Arc<AtomicUsize>,
    queue_bytes_max: usize,
}

impl Recorder {
    /// The recorder and its writer, which the composition root spawns and supervises (nothing
    /// is written until it runs).
    pub fn new(
        store: Arc<dyn Store>,
        queue_max: usize,
        queue_bytes_max: usize,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (tx, rx) = mpsc::channel(queue_max.max(1));
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let writer = write_batches(store, rx, queued_bytes.clone(), dropped.clone());
        (Self { tx, dropped, queued_bytes, queue_bytes_max }, writer)
    }

    pub fn record(&self, record: SyncRecord) {
        let size = record_bytes(&record);
        let reserved = self.queued_bytes.fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
            (queued + size <= self.queue_bytes_max).then_some(queued + size)
        });
        if reserved.is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.tx.try_send(record).is_err() {
            self.queued_bytes.fetch_sub(size, Ordering::AcqRel);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records dropped: the queue was full, or the store did not write them.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Bytes of records accepted and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Acquire)
    }

    /// Waits until everything queued so far has been written (used at shutdown and in tests),
    /// at most [`FLUSH_TIMEOUT`].
    pub async fn flush(&self) {
        let deadline = tokio::time::Instant::now() + FLUSH_TIMEOUT;
        while self.queued_bytes() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// What a record holds on to while it waits: its strings, and each log line's text plus
/// [`LOG_LINE_OVERHEAD_BYTES`].
fn record_bytes(r: &SyncRecord) -> usize {
    let lines: usize = r.logs.iter().map(|(_, line, _)| line.len() + LOG_LINE_OVERHEAD_BYTES).sum();
    RECORD_OVERHEAD_BYTES
        + r.id.len()
        + r.tenant.len()
        + r.function.len()
        + r.error_kind.as_ref().map_or(0, String::len)
        + lines
}

async fn write_batches(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<SyncRecord>,
    queued_bytes: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(BATCH_RECORDS_MAX);
    loop {
        if rx.recv_many(&mut batch, BATCH_RECORDS_MAX).await == 0 {
            return;
        }
        let fill_until = tokio::time::Instant::now() + BATCH_WAIT;
        while batch.len() < BATCH_RECORDS_MAX {
            let room = BATCH_RECORDS_MAX - batch.len();
            match tokio::time::timeout_at(fill_until, rx.recv_many(&mut batch, room)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let lost = write(store.as_ref(), &batch).await;
        dropped.fetch_add(lost as u64, Ordering::Relaxed);
        // Written or given up on: either way the batch no longer holds memory.
        let written: usize = batch.iter().map(record_bytes).sum();
        queued_bytes.fetch_sub(written, Ordering::AcqRel);
        batch.clear();
    }
}

/// Writes `batch`; returns how many of its records were not written. When the store refuses the
/// batch for a reason of its own (a duplicate id, a value it cannot take), the batch is halved
/// and each half written again, down to single records, which are dropped alone: `k` bad
/// records among `n` cost at most about `2k log2(n)` more writes, and never the others' records.
/// When the store is unavailable, halving would only multiply failing writes: the rest goes.
async fn write(store: &dyn Store, batch: &[SyncRecord]) -> usize {
    let mut lost = 0;
    let mut parts = vec![batch];
    while let Some(part) = parts.pop() {
        match store.record_sync(part).await {
            Ok(()) => {}
            Err(e @ StoreError::Unavailable(_)) => {
                let records = part.len() + parts.iter().map(|p| p.len()).sum::<usize>();
                tracing::warn!(error = %e, records, "dropping sync invocation records");
                return lost + records;
            }
            Err(e) if part.len() == 1 => {
                tracing::warn!(error = %e, invocation_id = %part[0].id, "dropping a sync invocation record");
                lost += 1;
            }
            Err(_) => {
                let (first, second) = part.split_at(part.len() / 2);
                parts.push(second);
                parts.push(first);
            }
        }
    }
    lost
}

#[cfg(test)]
mod tests {
    use sluice_core::LogStream;
    use sluice_store::{InvocationStatus, SqliteStore};

    use super::*;

    fn record(id: &str, log_bytes: usize) -> SyncRecord {
        SyncRecord {
            id: id.to_string(),
            tenant: "default".to_string(),
            function: "f".to_string(),
            version: 1,
            status: InvocationStatus::Succeeded,
            status_code: Some(200),
            error_kind: None,
            started_at: 1,
            finished_at: 2,
            cpu_us: 0,
            logs: vec![(LogStream::Stdout, "x".repeat(log_bytes), 1)],
        }
    }

    // A current-thread runtime: the writer runs only when the test awaits, so what `record`
    // accepts before that is exactly what the bound allows.
    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_and_gives_them_back_once_written() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("db")).await.unwrap());
        let one = record_bytes(&record("inv_1", 10_000));
        let (recorder, writer) = Recorder::new(store, 1000, 2 * one);
        tokio::spawn(writer);

        recorder.record(record("inv_1", 10_000));
        recorder.record(record("inv_2", 10_000));
        assert_eq!(recorder.dropped(), 0);
        recorder.record(record("inv_3", 10_000));
        assert_eq!(recorder.dropped(), 1, "the third record is over the byte bound");
        assert_eq!(recorder.queued_bytes(), 2 * one);

        recorder.flush().await;
        assert_eq!(recorder.queued_bytes(), 0, "written batches give their bytes back");
        recorder.record(record("inv_4", 10_000));
        assert_eq!(recorder.dropped(), 1, "room again after the batch was written");
    }

    /// The store writes a batch all or nothing; a record it refuses (here a duplicate id) is
    /// dropped alone, and the records batched with it, other tenants' among them, are written.
    #[tokio::test]
    async fn a_record_the_store_refuses_does_not_drop_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("db")).await.unwrap());
        let (recorder, writer) = Recorder::new(store.clone(), 1000, 1 << 20);
        tokio::spawn(writer);
        recorder.record(record("inv_dup", 10));
        recorder.flush().await;

        let ids: Vec<String> = (0..9).map(|i| format!("inv_{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            recorder.record(record(id, 10));
            if i == 4 {
                recorder.record(record("inv_dup", 10));
            }
        }
        recorder.flush().await;
        let mut missing = Vec::new();
        for id in &ids {
            if store.get_invocation(id).await.unwrap().is_none() {
                missing.push(id.as_str());
            }
        }
        assert!(missing.is_empty(), "records lost with the refused one: {missing:?}");
        assert_eq!(recorder.dropped(), 1, "the refused record, alone");
        assert_eq!(recorder.queued_bytes(), 0);
    }
}
