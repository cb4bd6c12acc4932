//! Records finished sync invocations (their outcome and log lines) off the request path.
//!
//! Calls hand records to a bounded queue without waiting; one background task writes them in
//! batches, at its own pace. Sync records are not acknowledged data: when the queue is full a
//! record is dropped and counted instead of slowing the call down.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sluice_store::{Store, SyncRecord};
use tokio::sync::mpsc;

/// Records written in one transaction at most.
const BATCH_RECORDS_MAX: usize = 1000;
/// How long a record may wait for its batch to fill.
const BATCH_WAIT: Duration = Duration::from_millis(50);

#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<SyncRecord>,
    dropped: Arc<AtomicU64>,
}

impl Recorder {
    /// Starts the writer task on the current runtime.
    pub fn start(store: Arc<dyn Store>, queue_max: usize) -> Self {
        let (tx, rx) = mpsc::channel(queue_max.max(1));
        tokio::spawn(write_batches(store, rx));
        Self { tx, dropped: Arc::default() }
    }

    pub fn record(&self, record: SyncRecord) {
        if self.tx.try_send(record).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits until everything queued so far has been written (used at shutdown and in tests).
    pub async fn flush(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.tx.capacity() < self.tx.max_capacity() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The last batch may be in the writer's hands: give it one batch period.
        tokio::time::sleep(BATCH_WAIT * 2).await;
    }
}

async fn write_batches(store: Arc<dyn Store>, mut rx: mpsc::Receiver<SyncRecord>) {
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
        if let Err(e) = store.record_sync(&batch).await {
            tracing::warn!(error = %e, records = batch.len(), "dropping sync invocation records");
        }
        batch.clear();
    }
}
