//! NATS JetStream: a durable pull consumer (named by the trigger's `consumer`) on the trigger's
//! stream, filtered to its subject, with explicit acks. The position of a message is its stream sequence, which a
//! redelivery keeps, so a message's `ce-id` is the same however often it comes.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use sluice_core::trigger::Source;
use sluice_store::Trigger;

use crate::broker::{Broker, Message};

/// How long JetStream waits for an ack before it delivers a message again: a node that died
/// mid-batch has its unacked messages redelivered (to the next lease holder) after this.
pub const ACK_WAIT: Duration = Duration::from_secs(10);

pub struct Nats {
    messages: pull::Stream,
    lag: Option<u64>,
}

impl Nats {
    pub async fn connect(t: &Trigger) -> anyhow::Result<Self> {
        let Source::Nats { url, stream, subject } = &t.source else { anyhow::bail!("not a nats trigger") };
        let mut options = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(5));
        if let (Some(user), Some(password)) = (&t.credentials.user, &t.credentials.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        let client = options.connect(url.as_str()).await.with_context(|| format!("connecting to {url}"))?;
        let js = jetstream::new(client);
        let stream = js.get_stream(stream).await.with_context(|| format!("stream {stream}"))?;
        let durable = t.consumer.clone();
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_or_create_consumer(
                &durable,
                pull::Config {
                    durable_name: Some(durable.clone()),
                    filter_subject: subject.clone(),
                    deliver_policy: DeliverPolicy::All,
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: ACK_WAIT,
                    max_ack_pending: 20_000,
                    ..Default::default()
                },
            )
            .await
            .with_context(|| format!("consumer {durable}"))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch((t.batch_max as usize * 2).max(200))
            .messages()
            .await
            .context("pulling messages")?;
        Ok(Nats { messages, lag: None })
    }

    fn message(&mut self, m: jetstream::Message) -> anyhow::Result<Message<jetstream::Message>> {
        let info = m.info().map_err(|e| anyhow::anyhow!("a message without JetStream info: {e}"))?;
        let seq = info.stream_sequence;
        let extensions = vec![
            ("natsstream", info.stream.to_string()),
            ("natssequence", seq.to_string()),
            ("natsdelivered", info.delivered.to_string()),
        ];
        let time = i64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).ok();
        self.lag = Some(info.pending);
        let content_type =
            m.headers.as_ref().and_then(|h| h.get("Content-Type")).map(|v| v.as_str().to_string());
        Ok(Message {
            position: seq.to_string(),
            subject: m.subject.to_string(),
            time,
            content_type,
            body: m.payload.clone(),
            extensions,
            delivery: m,
        })
    }
}

#[async_trait::async_trait]
impl Broker for Nats {
    type Delivery = jetstream::Message;

    async fn next_batch(
        &mut self,
        max: usize,
        window: Duration,
    ) -> anyhow::Result<Vec<Message<Self::Delivery>>> {
        let next = |m: Option<Result<jetstream::Message, _>>| -> anyhow::Result<jetstream::Message> {
            match m {
                Some(Ok(m)) => Ok(m),
                Some(Err(e)) => Err(anyhow::anyhow!("pulling messages: {e}")),
                None => Err(anyhow::anyhow!("the consumer's message stream ended")),
            }
        };
        let first = next(self.messages.next().await)?;
        let mut batch = vec![self.message(first)?];
        let until = tokio::time::Instant::now() + window;
        while batch.len() < max {
            match tokio::time::timeout_at(until, self.messages.next()).await {
                Ok(m) => {
                    let m = next(m)?;
                    batch.push(self.message(m)?);
                }
                Err(_) => break,
            }
        }
        Ok(batch)
    }

    async fn ack(&mut self, deliveries: Vec<Self::Delivery>) -> anyhow::Result<()> {
        for m in deliveries {
            m.ack().await.map_err(|e| anyhow::anyhow!("acking: {e}"))?;
        }
        Ok(())
    }

    async fn retry_later(&mut self, deliveries: Vec<Self::Delivery>, delay: Duration) -> anyhow::Result<()> {
        for m in deliveries {
            m.ack_with(AckKind::Nak(Some(delay))).await.map_err(|e| anyhow::anyhow!("giving back: {e}"))?;
        }
        Ok(())
    }

    async fn lag(&mut self) -> Option<u64> {
        self.lag
    }
}
