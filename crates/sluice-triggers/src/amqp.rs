//! AMQP 0-9-1 (RabbitMQ): a consumer on the trigger's queue with manual acks and a prefetch of
//! twice the batch. A batch is acked with one `basic.ack` (multiple) after its commit.
//!
//! AMQP gives a message no position that survives a redelivery (a delivery tag is the channel's),
//! so a message's position is its `message-id` property, which publishers set to make their
//! messages' enqueues exactly-once. A message without one gets a fresh id: a crash between its
//! commit and its ack stores it twice (at least once), and `ce-amqpredelivered` says so.

use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer};
use sluice_core::trigger::Source;
use sluice_store::Trigger;

use crate::broker::{Broker, Message};

/// How long a consumer waits for a delivery, while its queue holds ready messages, before it
/// takes itself for stuck and reconnects.
pub const STALL_AFTER: Duration = Duration::from_secs(5);

pub struct Amqp {
    _connection: Connection,
    channel: Channel,
    consumer: Consumer,
    queue: String,
}

impl Amqp {
    pub async fn connect(t: &Trigger) -> anyhow::Result<Self> {
        let Source::Amqp { url, queue } = &t.source else { anyhow::bail!("not an amqp trigger") };
        let uri = t.credentials.apply(url);
        let connection = tokio::time::timeout(
            Duration::from_secs(5),
            Connection::connect(&uri, ConnectionProperties::default()),
        )
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {url}: no answer within 5 s"))?
        .with_context(|| format!("connecting to {url}"))?;
        let channel = connection.create_channel().await.context("opening a channel")?;
        let prefetch = u16::try_from(t.batch_max * 2).unwrap_or(u16::MAX);
        channel.basic_qos(prefetch, BasicQosOptions::default()).await.context("setting the prefetch")?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                t.consumer.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("consuming queue {queue}"))?;
        Ok(Amqp { _connection: connection, channel, consumer, queue: queue.clone() })
    }

    fn message(d: Delivery) -> Message<Delivery> {
        let position = match d.properties.message_id() {
            Some(id) => format!("id:{}", id.as_str()),
            None => format!("new:{}", uuid_like()),
        };
        let extensions = vec![
            ("amqpdeliverytag", d.delivery_tag.to_string()),
            ("amqpredelivered", d.redelivered.to_string()),
        ];
        Message {
            position,
            subject: d.routing_key.as_str().to_string(),
            time: d.properties.timestamp().and_then(|s| i64::try_from(s).ok()).map(|s| s * 1000),
            content_type: d.properties.content_type().as_ref().map(|c| c.as_str().to_string()),
            body: bytes::Bytes::from(d.data.clone()),
            extensions,
            delivery: d,
        }
    }
}

/// A fresh id for a message that has none (an invocation id is one).
fn uuid_like() -> String {
    sluice_core::ids::invocation_id()
}

#[async_trait::async_trait]
impl Broker for Amqp {
    type Delivery = Delivery;

    async fn next_batch(&mut self, max: usize, window: Duration) -> anyhow::Result<Vec<Message<Delivery>>> {
        let next = |d: Option<lapin::Result<Delivery>>| -> anyhow::Result<Delivery> {
            match d {
                Some(Ok(d)) => Ok(d),
                Some(Err(e)) => Err(anyhow::anyhow!("consuming: {e}")),
                None => Err(anyhow::anyhow!("the broker ended the consumer")),
            }
        };
        // A consumer that holds no unacked delivery (the last batch is acked) and gets nothing
        // while the queue holds ready messages is stuck: seen under load, with the channel's
        // prefetch taken by deliveries the consumer never yielded (cause not found). Reconnecting
        // gives them back to the queue; their keys make the redelivery store nothing twice.
        let first = loop {
            match tokio::time::timeout(STALL_AFTER, self.consumer.next()).await {
                Ok(d) => break next(d)?,
                Err(_) => {
                    if let Some(ready) = self.lag().await.filter(|&n| n > 0) {
                        anyhow::bail!(
                            "no delivery for {} s while queue {} holds {ready} ready messages: reconnecting",
                            STALL_AFTER.as_secs(),
                            self.queue
                        );
                    }
                }
            }
        };
        let mut batch = vec![Self::message(first)];
        let until = tokio::time::Instant::now() + window;
        while batch.len() < max {
            match tokio::time::timeout_at(until, self.consumer.next()).await {
                Ok(d) => batch.push(Self::message(next(d)?)),
                Err(_) => break,
            }
        }
        Ok(batch)
    }

    async fn ack(&mut self, deliveries: Vec<Delivery>) -> anyhow::Result<()> {
        // One frame acks the batch: every delivery before the last is settled already (acked
        // or given back) or in this batch.
        if let Some(last) = deliveries.last() {
            last.acker.ack(BasicAckOptions { multiple: true }).await.context("acking")?;
        }
        Ok(())
    }

    async fn retry_later(&mut self, deliveries: Vec<Delivery>, _delay: Duration) -> anyhow::Result<()> {
        for d in deliveries {
            d.acker.nack(BasicNackOptions { multiple: false, requeue: true }).await.context("giving back")?;
        }
        Ok(())
    }

    async fn lag(&mut self) -> Option<u64> {
        let options = QueueDeclareOptions { passive: true, ..Default::default() };
        let declared = self.channel.queue_declare(self.queue.as_str().into(), options, FieldTable::default());
        match tokio::time::timeout(Duration::from_millis(500), declared).await {
            Ok(Ok(q)) => Some(u64::from(q.message_count())),
            _ => None,
        }
    }
}
