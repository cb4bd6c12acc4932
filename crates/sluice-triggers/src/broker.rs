//! What an adapter gives the runner: a [`Broker`] connection that hands over batches of
//! [`Message`]s and acks them, and [`collect`], the batching of a client that hands messages
//! over one by one.

use std::time::Duration;

use bytes::Bytes;
use sluice_core::UnixMs;

/// One message, as an adapter hands it over.
pub struct Message<D> {
    /// Where it is in the broker, stable across redeliveries (a stream sequence, a message id):
    /// with the trigger, its `ce-id` and idempotency key.
    pub position: String,
    /// The subject, routing key or topic.
    pub subject: String,
    /// When the broker (or its publisher) says it was published.
    pub time: Option<UnixMs>,
    pub content_type: Option<String>,
    pub body: Bytes,
    /// CloudEvents extensions (`ce-{name}`) with the broker's own position.
    pub extensions: Vec<(&'static str, String)>,
    /// What acks it.
    pub delivery: D,
}

/// A broker connection of one trigger.
#[async_trait::async_trait]
pub trait Broker: Send {
    type Delivery: Send;
    /// The next batch: at least one message (waiting as long as it takes), then as many more as
    /// come within `window`, at most `max`.
    async fn next_batch(
        &mut self,
        max: usize,
        window: Duration,
    ) -> anyhow::Result<Vec<Message<Self::Delivery>>>;
    /// Acks deliveries whose invocations are committed, in order.
    async fn ack(&mut self, deliveries: Vec<Self::Delivery>) -> anyhow::Result<()>;
    /// Gives deliveries back, to come again after about `delay`.
    async fn retry_later(&mut self, deliveries: Vec<Self::Delivery>, delay: Duration) -> anyhow::Result<()>;
    /// Messages the broker holds for this trigger that it has not delivered yet, if it says.
    async fn lag(&mut self) -> Option<u64>;
    /// What to keep in the store with a batch about to commit (an adapter whose positions need
    /// it, see [`mqtt`]); `None` keeps what is there.
    fn remember(&mut self, _batch: &[Message<Self::Delivery>]) -> Option<String> {
        None
    }
}

/// Collects a batch from a channel of messages: the first as it comes, then what comes within
/// `window`, at most `max`, and no longer than `gap` passes without one (a broker that sends a
/// few unacked messages at a time sends no more until they are acked). An adapter whose client
/// hands messages one by one uses it.
pub(crate) async fn collect<T>(
    rx: &mut tokio::sync::mpsc::Receiver<anyhow::Result<T>>,
    max: usize,
    window: Duration,
    gap: Duration,
) -> anyhow::Result<Vec<T>> {
    let first = rx.recv().await.ok_or_else(|| anyhow::anyhow!("the broker connection ended"))??;
    let mut batch = Vec::with_capacity(max.min(1024));
    batch.push(first);
    let until = tokio::time::Instant::now() + window;
    while batch.len() < max {
        // What is here already, without waiting.
        match rx.try_recv() {
            Ok(m) => {
                batch.push(m?);
                continue;
            }
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => break,
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {}
        }
        let wait = until.min(tokio::time::Instant::now() + gap);
        match tokio::time::timeout_at(wait, rx.recv()).await {
            Ok(Some(m)) => batch.push(m?),
            Ok(None) | Err(_) => break,
        }
    }
    Ok(batch)
}
