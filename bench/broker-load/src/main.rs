//! `broker-load publish KIND TARGET N [BYTES] [RATE]` publishes N messages of BYTES bytes
//! (default 64), each acked by the broker, and prints the rate; MQTT at RATE messages/s if given
//! (a broker drops what a slower subscriber's queue cannot hold: Mosquitto keeps 1000). `broker-load drain KIND TARGET N` consumes N
//! messages with a bare consumer that acks each and does nothing else, and prints the rate: the
//! broker's ceiling, which sluice's trigger (consume, commit, ack) is compared with.
//!
//! KIND and TARGET: `nats STREAM` (subject `STREAM.lower.x`; the stream must exist), `amqp QUEUE`
//! (the queue must exist), `mqtt TOPIC`. Brokers on 127.0.0.1 at their standard ports.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, kind, target, n, rest @ ..] = args.as_slice() else {
        bail!("usage: broker-load publish|drain nats|amqp|mqtt TARGET N [BYTES]");
    };
    let n: usize = n.parse().context("N")?;
    let bytes: usize = rest.first().map(|b| b.parse()).transpose()?.unwrap_or(64);
    // Messages per second offered (MQTT only; 0: as fast as the broker acks).
    let rate: u64 = rest.get(1).map(|r| r.parse()).transpose()?.unwrap_or(0);
    let started = Instant::now();
    match (mode.as_str(), kind.as_str()) {
        ("publish", "nats") => nats_publish(target, n, bytes).await?,
        ("drain", "nats") => nats_drain(target, n).await?,
        ("publish", "amqp") => amqp_publish(target, n, bytes).await?,
        ("drain", "amqp") => amqp_drain(target, n).await?,
        ("publish", "mqtt") => mqtt_publish(target, n, bytes, rate).await?,
        ("drain", "mqtt") => mqtt_drain(target, n).await?,
        _ => bail!("usage: broker-load publish|drain nats|amqp|mqtt TARGET N [BYTES]"),
    }
    let s = started.elapsed().as_secs_f64();
    println!("{mode} {kind} {n} messages in {s:.2} s: {:.0}/s", n as f64 / s);
    Ok(())
}

fn body(i: usize, bytes: usize) -> Vec<u8> {
    let mut b = format!("{{\"n\":{i}}}").into_bytes();
    b.resize(bytes.max(b.len()), b' ');
    b
}

async fn nats_publish(stream: &str, n: usize, bytes: usize) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(async_nats::connect("127.0.0.1:4222").await?);
    let subject = format!("{}.x", stream.to_lowercase());
    let mut acks = futures::stream::FuturesOrdered::new();
    for i in 0..n {
        acks.push_back(std::future::IntoFuture::into_future(
            js.publish(subject.clone(), body(i, bytes).into()).await?,
        ));
        // At most 2,000 unacked publishes in flight.
        if acks.len() >= 2_000 {
            acks.next().await.expect("an ack")?;
        }
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    Ok(())
}

async fn nats_drain(stream: &str, n: usize) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::{AckPolicy, pull};
    let js = async_nats::jetstream::new(async_nats::connect("127.0.0.1:4222").await?);
    let consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(stream)
        .await?
        .create_consumer(pull::Config { ack_policy: AckPolicy::Explicit, ..Default::default() })
        .await?;
    let mut messages = consumer.stream().max_messages_per_batch(200).messages().await?;
    for _ in 0..n {
        let m = messages.next().await.context("stream ended")?.map_err(|e| anyhow::anyhow!("{e}"))?;
        m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(())
}

async fn amqp_channel() -> anyhow::Result<(lapin::Connection, lapin::Channel)> {
    let conn =
        lapin::Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", Default::default()).await?;
    let channel = conn.create_channel().await?;
    Ok((conn, channel))
}

async fn amqp_publish(queue: &str, n: usize, bytes: usize) -> anyhow::Result<()> {
    use lapin::BasicProperties;
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let (_conn, channel) = amqp_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut confirms = futures::stream::FuturesOrdered::new();
    for i in 0..n {
        let props = BasicProperties::default().with_message_id(format!("m{i}").as_str().into());
        confirms.push_back(
            channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &body(i, bytes),
                    props,
                )
                .await?,
        );
        if confirms.len() >= 2_000 {
            confirms.next().await.expect("a confirm")?;
        }
    }
    while let Some(c) = confirms.next().await {
        c?;
    }
    Ok(())
}

async fn amqp_drain(queue: &str, n: usize) -> anyhow::Result<()> {
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
    let (_conn, channel) = amqp_channel().await?;
    channel.basic_qos(200, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(queue.into(), "drain".into(), BasicConsumeOptions::default(), Default::default())
        .await?;
    for _ in 0..n {
        let d = consumer.next().await.context("consumer ended")??;
        d.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}

async fn mqtt_publish(topic: &str, n: usize, bytes: usize, rate: u64) -> anyhow::Result<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut options = MqttOptions::new(format!("broker-load-{}", std::process::id()), "127.0.0.1", 1883);
    options.set_inflight(1_000);
    let (client, mut eventloop) = AsyncClient::new(options, 2_000);
    let topic = topic.to_string();
    let publisher = tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        for i in 0..n {
            client.publish(topic.as_str(), QoS::AtLeastOnce, false, body(i, bytes)).await?;
            if rate > 0 && i % 50 == 49 {
                tokio::time::sleep_until(started + Duration::from_secs_f64((i + 1) as f64 / rate as f64))
                    .await;
            }
        }
        anyhow::Ok(client)
    });
    let mut acked = 0;
    while acked < n {
        if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await? {
            acked += 1;
        }
    }
    let client = publisher.await??;
    client.disconnect().await?;
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    Ok(())
}

async fn mqtt_drain(topic: &str, n: usize) -> anyhow::Result<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut options = MqttOptions::new("broker-load-drain", "127.0.0.1", 1883);
    options.set_clean_session(false).set_manual_acks(true);
    let (client, mut eventloop) = AsyncClient::new(options, 2_000);
    client.subscribe(topic, QoS::AtLeastOnce).await?;
    let mut got = 0;
    while got < n {
        if let Event::Incoming(Packet::Publish(p)) = eventloop.poll().await? {
            client.ack(&p).await?;
            got += 1;
        }
    }
    Ok(())
}
