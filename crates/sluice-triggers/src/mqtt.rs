//! MQTT 3.1.1 (Mosquitto): a persistent session (client id: the trigger's `consumer`, clean session
//! off) subscribed at QoS 1 with manual acks; a message is PUBACKed after its batch commits.
//!
//! MQTT gives a message no id that outlives its delivery: its packet id is reused once acked.
//! What the broker does guarantee is that after a reconnect it sends the messages not acked
//! again, with the same packet id and the DUP flag. So each batch stores, in the same
//! transaction, the positions it gave its messages by packet id (`Trigger::recent`: the last
//! [`REMEMBERED`] messages, or two batches if more); a DUP message whose packet id is there gets
//! that position again (its `ce-id` and idempotency key), and any other message a fresh one.
//! What can come again is what the broker had in flight unacked, at most its per-client in-flight
//! limit (Mosquitto's `max_inflight_messages`, 20 by default): keep that below [`REMEMBERED`]. A
//! broker hands packet ids out in turn (Mosquitto counts up to 65535), so an id is not reused
//! among the positions kept.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::Context as _;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use sluice_core::trigger::Source;
use sluice_store::Trigger;

use crate::broker::{Broker, Message};

/// How long a batch waits for its next message before it commits what it has.
const IDLE_GAP: Duration = Duration::from_millis(2);

/// How many messages' positions a trigger keeps, at least.
pub const REMEMBERED: usize = 256;

pub struct Mqtt {
    client: AsyncClient,
    rx: tokio::sync::mpsc::Receiver<anyhow::Result<Publish>>,
    poller: tokio::task::JoinHandle<()>,
    /// Positions by packet id of the last messages committed, oldest first.
    recent: VecDeque<(u16, String)>,
    /// Messages given back (a quota refusal), offered again after `retry_at`.
    given_back: VecDeque<Publish>,
    retry_at: tokio::time::Instant,
}

impl Drop for Mqtt {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

impl Mqtt {
    pub async fn connect(t: &Trigger) -> anyhow::Result<Self> {
        let Source::Mqtt { url, topic, .. } = &t.source else { anyhow::bail!("not an mqtt trigger") };
        let authority = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
        let authority = authority.split('/').next().unwrap_or(authority);
        let (host, port) = authority
            .rsplit_once(':')
            .and_then(|(h, p)| {
                Some((h.trim_start_matches('[').trim_end_matches(']'), p.parse::<u16>().ok()?))
            })
            .ok_or_else(|| anyhow::anyhow!("url {url} has no host:port"))?;
        let mut options = MqttOptions::new(t.consumer.as_str(), host, port);
        options.set_clean_session(false).set_manual_acks(true).set_keep_alive(Duration::from_secs(10));
        options.set_inflight(u16::try_from(t.batch_max * 2).unwrap_or(u16::MAX));
        if let Some(user) = &t.credentials.user {
            options.set_credentials(user.clone(), t.credentials.password.clone().unwrap_or_default());
        }
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        // The first connection, answered within 5 s, or an error to show.
        let connected = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(anyhow::anyhow!("connecting to {url}: {e}")),
                }
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {url}: no answer within 5 s"))?;
        connected?;
        client.subscribe(topic.as_str(), QoS::AtLeastOnce).await.context("subscribing")?;
        let (tx, rx) = tokio::sync::mpsc::channel(t.batch_max as usize * 2 + 16);
        let poller = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send(Ok(p)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(anyhow::anyhow!("the broker connection failed: {e}"))).await;
                        return;
                    }
                }
            }
        });
        let recent: VecDeque<(u16, String)> =
            t.recent.as_deref().and_then(|r| serde_json::from_str(r).ok()).unwrap_or_default();
        Ok(Mqtt {
            client,
            rx,
            poller,
            recent,
            given_back: VecDeque::new(),
            retry_at: tokio::time::Instant::now(),
        })
    }

    fn message(&self, p: Publish) -> Message<Publish> {
        // The newest position given to this packet id, for a message sent again.
        let kept = if p.dup { self.recent.iter().rev().find(|(id, _)| *id == p.pkid) } else { None };
        let position = kept.map(|(_, pos)| pos.clone()).unwrap_or_else(sluice_core::ids::invocation_id);
        Message {
            position,
            subject: p.topic.clone(),
            time: None,
            content_type: None,
            body: p.payload.clone(),
            extensions: vec![("mqttpacketid", p.pkid.to_string()), ("mqttdup", p.dup.to_string())],
            delivery: p,
        }
    }
}

#[async_trait::async_trait]
impl Broker for Mqtt {
    type Delivery = Publish;

    async fn next_batch(&mut self, max: usize, window: Duration) -> anyhow::Result<Vec<Message<Publish>>> {
        if !self.given_back.is_empty() {
            tokio::time::sleep_until(self.retry_at).await;
            let n = self.given_back.len().min(max);
            let again: Vec<Publish> = self.given_back.drain(..n).collect();
            return Ok(again.into_iter().map(|p| self.message(p)).collect());
        }
        // The broker sends at most its in-flight limit (Mosquitto: 20) before acks: a batch ends
        // when the flow pauses, not only at its window.
        let batch = crate::broker::collect(&mut self.rx, max, window, IDLE_GAP).await?;
        Ok(batch.into_iter().map(|p| self.message(p)).collect())
    }

    async fn ack(&mut self, deliveries: Vec<Publish>) -> anyhow::Result<()> {
        for p in deliveries {
            self.client.ack(&p).await.context("acking")?;
        }
        Ok(())
    }

    async fn retry_later(&mut self, deliveries: Vec<Publish>, delay: Duration) -> anyhow::Result<()> {
        // MQTT has no negative ack: the broker would send them again only after a reconnect.
        // They wait here instead, unacked, and are offered again.
        self.given_back.extend(deliveries);
        self.retry_at = tokio::time::Instant::now() + delay;
        Ok(())
    }

    async fn lag(&mut self) -> Option<u64> {
        None
    }

    fn remember(&mut self, batch: &[Message<Publish>]) -> Option<String> {
        // Kept: this batch, the one before, and older ones up to REMEMBERED messages.
        let keep = REMEMBERED.max(2 * batch.len());
        self.recent.extend(batch.iter().map(|m| (m.delivery.pkid, m.position.clone())));
        let extra = self.recent.len().saturating_sub(keep);
        self.recent.drain(..extra);
        serde_json::to_string(&self.recent).ok()
    }
}
