//! Broker triggers through the real binary and the real brokers on this machine (NATS JetStream
//! 4222, RabbitMQ 5672, Mosquitto 1883): every message becomes exactly one durable invocation
//! with its CloudEvents headers and body; a node killed with SIGKILL mid-stream loses none and
//! stores none twice after its restart; bad triggers get clear errors, and a trigger whose
//! broker fails says why in `triggers show`. A test whose broker is not reachable says so and
//! passes (as the PostgreSQL tests do when their URL is unset).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Node, guests};

fn reachable(port: u16) -> bool {
    let ok =
        std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).is_ok();
    if !ok {
        eprintln!("skipped: no broker on 127.0.0.1:{port}");
    }
    ok
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    )
}

fn cli_ok(node: &Node, args: &[&str]) -> String {
    let (ok, out, err) = node.cli(args);
    assert!(ok, "sluice {args:?} failed: {out}{err}");
    out
}

/// The invocations of `function` by their idempotency key (all pages).
fn by_key(node: &Node, function: &str) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let mut before: Option<String> = None;
    loop {
        let mut path = format!("/v1/invocations?function={function}&limit=1000");
        if let Some(b) = &before {
            path += &format!("&before={b}");
        }
        let page: Value = node.get(&path).json().unwrap();
        for inv in page["invocations"].as_array().unwrap() {
            let key = inv["idempotency_key"].as_str().unwrap_or_else(|| panic!("no key: {inv}")).to_string();
            assert!(out.insert(key.clone(), inv.clone()).is_none(), "two invocations with key {key}");
        }
        match page["next_before"].as_str() {
            Some(next) => before = Some(next.to_string()),
            None => break,
        }
    }
    out
}

/// Polls until `function` has `n` invocations; `within` at most.
fn wait_invocations(node: &Node, function: &str, n: usize, within: Duration) -> BTreeMap<String, Value> {
    let deadline = Instant::now() + within;
    loop {
        let now = by_key(node, function);
        if now.len() >= n {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} invocations after {within:?}; trigger: {}",
            now.len(),
            cli_ok(node, &["triggers", "list"])
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn trigger_json(node: &Node, name: &str) -> Value {
    serde_json::from_str(&cli_ok(node, &["triggers", "show", name, "-o", "json"])).unwrap()
}

struct Stream {
    js: async_nats::jetstream::Context,
    name: String,
    subject: String,
}

impl Stream {
    async fn create() -> Stream {
        let client = async_nats::connect("127.0.0.1:4222").await.unwrap();
        let js = async_nats::jetstream::new(client);
        let name = unique("SLUICE_T_");
        let subject = name.to_lowercase();
        js.create_stream(async_nats::jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{subject}.>")],
            ..Default::default()
        })
        .await
        .unwrap();
        Stream { js, name, subject }
    }

    /// Publishes `n` messages `{from + i}` on `{subject}.orders.{i % 3}`, each acked by JetStream.
    async fn publish(&self, from: usize, n: usize) {
        let mut acks = Vec::with_capacity(n);
        for i in from..from + n {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Content-Type", "application/json");
            let subject = format!("{}.orders.{}", self.subject, i % 3);
            let body = format!("{{\"order\":{i}}}");
            acks.push(self.js.publish_with_headers(subject, headers, body.into()).await.unwrap());
        }
        for ack in acks {
            ack.await.unwrap();
        }
    }

    async fn delete(self) {
        let _ = self.js.delete_stream(&self.name).await;
    }
}

#[test]
fn nats_messages_become_one_invocation_each_with_their_cloudevent() {
    if !reachable(4222) {
        return;
    }
    let rt = runtime();
    let stream = rt.block_on(Stream::create());
    let node = Node::start(&[]);
    node.deploy("orders", &guests().testguest, &[]);
    let subject = format!("{}.>", stream.subject);
    let out = cli_ok(
        &node,
        &[
            "triggers",
            "create",
            "t1",
            "--function",
            "orders",
            "--nats",
            "nats://127.0.0.1:4222",
            "--stream",
            &stream.name,
            "--subject",
            &subject,
            "--path",
            "/headers",
            "--batch",
            "50",
            "--window",
            "10ms",
        ],
    );
    assert!(out.contains("created trigger t1") && out.contains(&stream.name), "{out}");
    let id = trigger_json(&node, "t1")["id"].as_i64().unwrap();
    rt.block_on(stream.publish(0, 300));
    let invs = wait_invocations(&node, "orders", 300, Duration::from_secs(60));
    let keys: Vec<String> = (1..=300).map(|seq| format!("nats:{id}:{seq}")).collect();
    assert_eq!(
        invs.keys().cloned().collect::<std::collections::BTreeSet<_>>(),
        keys.iter().cloned().collect(),
        "one invocation per stream sequence"
    );

    // What the function got: the CloudEvent in binary mode.
    let first = &invs[&keys[0]];
    let inv_id = first["id"].as_str().unwrap();
    let done = node.wait_json(&format!("/v1/invocations/{inv_id}"), |v| v["status"] == "succeeded");
    assert_eq!(done["status"], "succeeded");
    let headers = node.get(&format!("/v1/invocations/{inv_id}/response")).text().unwrap();
    for want in [
        "ce-specversion: 1.0".to_string(),
        format!("ce-id: nats:{id}:1"),
        format!("ce-source: nats://127.0.0.1:4222/streams/{}", stream.name),
        "ce-type: io.nats.jetstream.message".to_string(),
        format!("ce-subject: {}.orders.0", stream.subject),
        "ce-natssequence: 1".to_string(),
        "content-type: application/json".to_string(),
        "sluice-trigger: t1".to_string(),
    ] {
        assert!(headers.contains(&want), "{want:?} missing in:\n{headers}");
    }
    assert!(headers.contains("ce-time: 20"), "{headers}");

    // show: the counts, the node, no error.
    let shown = node.wait_json("/v1/tenants/default/triggers/t1", |v| v["enqueued"] == 300);
    assert_eq!(shown["duplicates"], 0, "{shown}");
    assert!(shown["node"].is_string() && shown["last_error"].is_null(), "{shown}");
    let listed = cli_ok(&node, &["triggers", "list"]);
    assert!(listed.contains("t1") && listed.contains("nats") && listed.contains("300"), "{listed}");

    // Paused: messages wait in the stream; resumed: they come.
    cli_ok(&node, &["triggers", "pause", "t1"]);
    std::thread::sleep(Duration::from_secs(3));
    rt.block_on(stream.publish(300, 20));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(by_key(&node, "orders").len(), 300, "a paused trigger consumes nothing");
    cli_ok(&node, &["triggers", "resume", "t1"]);
    wait_invocations(&node, "orders", 320, Duration::from_secs(30));

    cli_ok(&node, &["triggers", "delete", "t1"]);
    let (ok, _, err) = node.cli(&["triggers", "show", "t1"]);
    assert!(!ok && err.contains("no trigger t1"), "{err}");
    rt.block_on(stream.delete());
}

fn wait_until_more(node: &Node, function: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while by_key(node, function).len() < n {
        assert!(Instant::now() < deadline, "fewer than {n} invocations after 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn amqp_messages_become_invocations_keyed_by_message_id() {
    if !reachable(5672) {
        return;
    }
    use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};
    let rt = runtime();
    let queue = unique("sluice-t-");
    let channel = rt.block_on(async {
        let conn =
            Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", ConnectionProperties::default())
                .await
                .unwrap();
        let channel = conn.create_channel().await.unwrap();
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap();
        std::mem::forget(conn);
        channel
    });
    let node = Node::start(&[]);
    node.deploy("amqpf", &guests().testguest, &[]);
    let out = cli_ok(
        &node,
        &[
            "triggers",
            "create",
            "rabbit",
            "--function",
            "amqpf",
            "--amqp",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "--queue",
            &queue,
            "--path",
            "/echo",
        ],
    );
    assert!(
        out.contains("credentials kept") && !out.contains("guest:guest"),
        "credentials are never shown: {out}"
    );
    let shown = trigger_json(&node, "rabbit");
    assert_eq!(shown["url"], "amqp://127.0.0.1:5672/%2f");
    assert!(!shown.to_string().contains("guest"), "{shown}");
    rt.block_on(async {
        for i in 0..200 {
            let props = BasicProperties::default()
                .with_message_id(format!("m{i}").as_str().into())
                .with_content_type("text/plain".into());
            channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    format!("body {i}").as_bytes(),
                    props,
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
    let invs = wait_invocations(&node, "amqpf", 200, Duration::from_secs(60));
    let id = shown["id"].as_i64().unwrap();
    for i in 0..200 {
        assert!(invs.contains_key(&format!("amqp:{id}:id:m{i}")), "message m{i}");
    }
    let inv = &invs[&format!("amqp:{id}:id:m7")];
    let inv_id = inv["id"].as_str().unwrap();
    node.wait_json(&format!("/v1/invocations/{inv_id}"), |v| v["status"] == "succeeded");
    assert_eq!(
        node.get(&format!("/v1/invocations/{inv_id}/response")).text().unwrap(),
        "body 7",
        "the body, unchanged"
    );
    rt.block_on(async {
        let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
    });
}

#[test]
fn mqtt_messages_become_one_invocation_each() {
    if !reachable(1883) {
        return;
    }
    use rumqttc::{AsyncClient, MqttOptions, QoS};
    let rt = runtime();
    let topic = unique("sluice/t/");
    let node = Node::start(&[]);
    node.deploy("mqttf", &guests().testguest, &[]);
    cli_ok(
        &node,
        &[
            "triggers",
            "create",
            "sensors",
            "--function",
            "mqttf",
            "--mqtt",
            "mqtt://127.0.0.1:1883",
            "--topic",
            &format!("{topic}/#"),
            "--path",
            "/echo",
        ],
    );
    // The subscription exists once the trigger's node connected: wait for its lease.
    wait_consuming(&node, "sensors");
    std::thread::sleep(Duration::from_secs(1));
    rt.block_on(async {
        let (client, mut eventloop) =
            AsyncClient::new(MqttOptions::new(unique("pub"), "127.0.0.1", 1883), 100);
        let poller = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        for i in 0..100 {
            client
                .publish(format!("{topic}/s{}", i % 4), QoS::AtLeastOnce, false, format!("reading {i}"))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        client.disconnect().await.unwrap();
        let _ = poller.await;
    });
    let invs = wait_invocations(&node, "mqttf", 100, Duration::from_secs(60));
    assert_eq!(invs.len(), 100);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(by_key(&node, "mqttf").len(), 100, "no more than one each");
}

#[test]
fn bad_triggers_are_refused_and_a_failing_broker_says_why() {
    let node = Node::start(&[]);
    node.deploy("f", &guests().testguest, &[]);
    let (ok, _, err) = node.cli(&[
        "triggers",
        "create",
        "x",
        "--function",
        "f",
        "--nats",
        "http://127.0.0.1:4222",
        "--stream",
        "S",
        "--subject",
        "a.>",
    ]);
    assert!(!ok && err.contains("must start with nats://"), "{err}");
    let (ok, _, err) = node.cli(&[
        "triggers",
        "create",
        "x",
        "--function",
        "nope",
        "--amqp",
        "amqp://127.0.0.1",
        "--queue",
        "q",
    ]);
    assert!(!ok && err.contains("no function nope"), "{err}");
    let (ok, _, err) = node.cli(&[
        "triggers",
        "create",
        "x",
        "--function",
        "f",
        "--mqtt",
        "mqtt://127.0.0.1",
        "--topic",
        "t",
        "--qos",
        "2",
    ]);
    assert!(!ok && err.contains("qos must be 1"), "{err}");
    let (ok, _, err) = node.cli(&[
        "triggers",
        "create",
        "x",
        "--function",
        "f",
        "--nats",
        "nats://127.0.0.1",
        "--stream",
        "S",
        "--subject",
        "a.>",
        "--batch",
        "0",
    ]);
    assert!(!ok && err.contains("batch must be from 1 to 1000"), "{err}");
    // Nothing listens on port 9: the trigger is created, and says why it cannot consume.
    cli_ok(
        &node,
        &["triggers", "create", "down", "--function", "f", "--amqp", "amqp://127.0.0.1:9", "--queue", "q"],
    );
    let (ok, _, err) = node.cli(&[
        "triggers",
        "create",
        "down",
        "--function",
        "f",
        "--amqp",
        "amqp://127.0.0.1:9",
        "--queue",
        "q",
    ]);
    assert!(!ok && err.contains("has a trigger down already"), "{err}");
    let shown = node.wait_json("/v1/tenants/default/triggers/down", |v| v["last_error"].is_string());
    assert!(shown["last_error"].as_str().unwrap().contains("127.0.0.1:9"), "{shown}");
    let out = cli_ok(&node, &["triggers", "show", "down"]);
    assert!(out.contains("last error:") && out.contains("failing"), "{out}");
}

/// A node that lets triggers reach only the brokers it names refuses the others at create, and
/// a message larger than an async call's body stays in the broker, said in `triggers show`.
#[test]
fn brokers_outside_the_allow_list_and_oversized_messages_are_refused() {
    let node = Node::start(&["--trigger-brokers", "127.0.0.1:4222,localhost", "--async-body-max", "1KiB"]);
    node.deploy("f", &guests().testguest, &[]);
    let (ok, _, err) = node.cli(&[
        "triggers",
        "create",
        "x",
        "--function",
        "f",
        "--amqp",
        "amqp://10.1.2.3:5672",
        "--queue",
        "q",
    ]);
    assert!(
        !ok && err.contains("broker 10.1.2.3:5672 is not one this node's triggers may connect to"),
        "{err}"
    );
    let (ok, _, err) = node.cli(&[
        "triggers",
        "create",
        "x",
        "--function",
        "f",
        "--nats",
        "nats://127.0.0.1:6379",
        "--stream",
        "S",
        "--subject",
        "a.>",
    ]);
    assert!(!ok && err.contains("--trigger-brokers"), "{err}");
    if !reachable(4222) {
        return;
    }
    let rt = runtime();
    let stream = rt.block_on(Stream::create());
    let subject = format!("{}.>", stream.subject);
    cli_ok(
        &node,
        &[
            "triggers",
            "create",
            "big",
            "--function",
            "f",
            "--nats",
            "nats://127.0.0.1:4222",
            "--stream",
            &stream.name,
            "--subject",
            &subject,
        ],
    );
    rt.block_on(async {
        stream.js.publish(format!("{}.small", stream.subject), "small".into()).await.unwrap().await.unwrap();
        stream
            .js
            .publish(format!("{}.large", stream.subject), vec![b'x'; 4096].into())
            .await
            .unwrap()
            .await
            .unwrap();
        stream.js.publish(format!("{}.small", stream.subject), "after".into()).await.unwrap().await.unwrap();
    });
    let invs = wait_invocations(&node, "f", 2, Duration::from_secs(60));
    let id = trigger_json(&node, "big")["id"].as_i64().unwrap();
    assert_eq!(
        invs.keys().cloned().collect::<Vec<_>>(),
        [format!("nats:{id}:1"), format!("nats:{id}:3")],
        "the messages that fit, not the large one"
    );
    let shown = node.wait_json("/v1/tenants/default/triggers/big", |v| v["last_error"].is_string());
    let error = shown["last_error"].as_str().unwrap();
    assert!(
        error.contains("message 2") && error.contains("4096 bytes") && error.contains("stays in the broker"),
        "{error}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(by_key(&node, "f").len(), 2, "still not stored after its redeliveries");
    rt.block_on(stream.delete());
}

/// An ordered trigger runs one invocation at a time per subject, in the stream's order, while
/// subjects run beside each other.
#[test]
fn an_ordered_trigger_runs_each_subject_one_at_a_time_in_order() {
    if !reachable(4222) {
        return;
    }
    let rt = runtime();
    let stream = rt.block_on(Stream::create());
    let node = Node::start(&[]);
    node.deploy("slow", &guests().testguest, &[]);
    let subject = format!("{}.>", stream.subject);
    let out = cli_ok(
        &node,
        &[
            "triggers",
            "create",
            "inorder",
            "--function",
            "slow",
            "--nats",
            "nats://127.0.0.1:4222",
            "--stream",
            &stream.name,
            "--subject",
            &subject,
            "--path",
            "/sleep?ms=100",
            "--ordered",
        ],
    );
    assert!(out.contains("in order per key"), "{out}");
    // 30 messages on three subjects (i % 3), published at once.
    rt.block_on(stream.publish(0, 30));
    let invs = wait_invocations(&node, "slow", 30, Duration::from_secs(60));
    let id = trigger_json(&node, "inorder")["id"].as_i64().unwrap();
    let mut by_subject: BTreeMap<u64, Vec<(u64, i64, i64)>> = BTreeMap::new();
    for seq in 1..=30u64 {
        let inv = &invs[&format!("nats:{id}:{seq}")];
        let done = node.wait_json(&format!("/v1/invocations/{}", inv["id"].as_str().unwrap()), |v| {
            v["status"] == "succeeded"
        });
        let ms = |k: &str| sluice_core::parse_rfc3339(done[k].as_str().unwrap()).unwrap();
        by_subject.entry((seq - 1) % 3).or_default().push((seq, ms("started_at"), ms("finished_at")));
    }
    for (subject, runs) in &by_subject {
        for pair in runs.windows(2) {
            let ((a, _, a_end), (b, b_start, _)) = (pair[0], pair[1]);
            assert!(
                b_start >= a_end,
                "subject {subject}: message {b} started at {b_start}, before message {a} finished at {a_end}: {runs:?}"
            );
        }
    }
    // The subjects did not wait for each other: some of their runs overlapped.
    let spans: Vec<(i64, i64)> = by_subject.values().map(|r| (r[0].1, r[r.len() - 1].2)).collect();
    assert!(
        spans.iter().any(|a| spans.iter().any(|b| a != b && a.0 < b.1 && b.0 < a.1)),
        "subjects ran one after the other: {spans:?}"
    );
    rt.block_on(stream.delete());
}

/// Waits (60 s at most: a loaded machine runs a backlog) until invocation `id` succeeded.
fn wait_succeeded(node: &Node, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: Value = node.get(&format!("/v1/invocations/{id}")).json().unwrap();
        match v["status"].as_str() {
            Some("succeeded") => return,
            Some("dead" | "expired") => panic!("{v}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "not succeeded after 60 s: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A node that aborts right after committing its third batch, before acking it (the test hook
/// `SLUICE_TEST_TRIGGER_ABORT_AFTER_BATCHES`), batches of 10.
fn crashing_node() -> Node {
    let node = Node::start_with_env(&[], &[("SLUICE_TEST_TRIGGER_ABORT_AFTER_BATCHES", "3")]);
    node.deploy("sink", &guests().testguest, &[]);
    node
}

/// Waits for the hook's abort, then restarts the node without it.
fn restart_after_abort(node: &mut Node) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let child = node.child.as_mut().unwrap();
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the node did not abort after its third batch");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        node.stderr.lock().unwrap().iter().any(|l| l.contains("aborting after committed trigger batch 3"))
    );
    node.child = None;
    node.env.clear();
    node.spawn();
}

/// After the restart: `total` invocations, one per key, and the third batch's messages (at least
/// `batch`), sent again because never acked, counted as duplicates and stored nothing (with more
/// before them whose acks had not left the process when it aborted, on MQTT).
fn one_each_after_the_crash(node: &Node, total: usize, batch: u64) -> BTreeMap<String, Value> {
    let invs = wait_invocations(node, "sink", total, Duration::from_secs(90));
    // The counts are the store's, committed with the batches: 60 s for a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(60);
    let shown = loop {
        let shown = trigger_json(node, "crash");
        if shown["duplicates"].as_u64() >= Some(batch) || Instant::now() > deadline {
            break shown;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stored = by_key(node, "sink").len();
    assert!(
        shown["duplicates"].as_u64() >= Some(batch),
        "the unacked batch came again ({stored} stored): {shown}"
    );
    assert_eq!(shown["enqueued"], total, "{shown}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(by_key(node, "sink").len(), total, "nothing stored twice");
    invs
}

#[test]
fn nats_a_crash_between_commit_and_ack_stores_nothing_twice() {
    if !reachable(4222) {
        return;
    }
    let rt = runtime();
    let stream = rt.block_on(Stream::create());
    rt.block_on(stream.publish(0, 100));
    let mut node = crashing_node();
    let subject = format!("{}.>", stream.subject);
    cli_ok(
        &node,
        &[
            "triggers",
            "create",
            "crash",
            "--function",
            "sink",
            "--nats",
            "nats://127.0.0.1:4222",
            "--stream",
            &stream.name,
            "--subject",
            &subject,
            "--path",
            "/ok",
            "--batch",
            "10",
        ],
    );
    restart_after_abort(&mut node);
    let invs = one_each_after_the_crash(&node, 100, 10);
    let id = trigger_json(&node, "crash")["id"].as_i64().unwrap();
    assert!((1..=100).all(|seq| invs.contains_key(&format!("nats:{id}:{seq}"))));
    rt.block_on(stream.delete());
}

#[test]
fn amqp_a_crash_between_commit_and_ack_stores_nothing_twice() {
    if !reachable(5672) {
        return;
    }
    use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};
    let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let queue = unique("sluice-crash-");
    runtime().block_on(async {
        let conn = Connection::connect(url, ConnectionProperties::default()).await.unwrap();
        let channel = conn.create_channel().await.unwrap();
        let options = QueueDeclareOptions { durable: true, ..Default::default() };
        channel.queue_declare(queue.as_str().into(), options, FieldTable::default()).await.unwrap();
        for i in 0..100 {
            let props = BasicProperties::default().with_message_id(format!("m{i}").as_str().into());
            let publish = channel.basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                b"x",
                props,
            );
            publish.await.unwrap().await.unwrap();
        }
    });
    let mut node = crashing_node();
    cli_ok(
        &node,
        &[
            "triggers",
            "create",
            "crash",
            "--function",
            "sink",
            "--amqp",
            url,
            "--queue",
            &queue,
            "--path",
            "/ok",
            "--batch",
            "10",
        ],
    );
    restart_after_abort(&mut node);
    let invs = one_each_after_the_crash(&node, 100, 10);
    let id = trigger_json(&node, "crash")["id"].as_i64().unwrap();
    assert!((0..100).all(|i| invs.contains_key(&format!("amqp:{id}:id:m{i}"))));
    runtime().block_on(async {
        let conn = Connection::connect(url, ConnectionProperties::default()).await.unwrap();
        let channel = conn.create_channel().await.unwrap();
        let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
    });
}

#[test]
fn mqtt_a_crash_between_commit_and_ack_stores_nothing_twice() {
    if !reachable(1883) {
        return;
    }
    use rumqttc::{AsyncClient, MqttOptions, QoS};
    let topic = unique("sluice/crash/");
    let mut node = crashing_node();
    cli_ok(
        &node,
        &[
            "triggers",
            "create",
            "crash",
            "--function",
            "sink",
            "--mqtt",
            "mqtt://127.0.0.1:1883",
            "--topic",
            &format!("{topic}/#"),
            "--path",
            "/echo",
            "--batch",
            "10",
            "--window",
            "100ms",
        ],
    );
    wait_consuming(&node, "crash");
    std::thread::sleep(Duration::from_secs(1));
    runtime().block_on(async {
        let (client, mut eventloop) =
            AsyncClient::new(MqttOptions::new(unique("pub"), "127.0.0.1", 1883), 200);
        let poller = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        for i in 0..100 {
            client.publish(format!("{topic}/x"), QoS::AtLeastOnce, false, format!("{i}")).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        client.disconnect().await.unwrap();
        let _ = poller.await;
    });
    restart_after_abort(&mut node);
    // A live MQTT batch is what arrived within its 2 ms gap, not always 10: at least one came again.
    let invs = one_each_after_the_crash(&node, 100, 1);
    let mut bodies = std::collections::BTreeSet::new();
    for inv in invs.values() {
        let id = inv["id"].as_str().unwrap();
        wait_succeeded(&node, id);
        bodies.insert(node.get(&format!("/v1/invocations/{id}/response")).text().unwrap());
    }
    assert_eq!(bodies.len(), 100, "every message once");
}

/// Two nodes on PostgreSQL: one consumes the trigger (its lease), the other waits; when the
/// consuming node is killed, the other takes the trigger over after the lease, and every message
/// is one invocation in the shared store.
#[test]
fn in_a_cluster_one_node_consumes_and_another_takes_over_when_it_dies() {
    use crate::cluster::{PgDatabase, cluster_node};
    if !reachable(4222) {
        return;
    }
    let Some(db) = PgDatabase::create() else { return };
    let rt = runtime();
    let stream = rt.block_on(Stream::create());
    let a = cluster_node(&db, None, &[]);
    let b = cluster_node(&db, Some(&a.token), &[]);
    a.deploy("sink", &guests().testguest, &[]);
    let subject = format!("{}.>", stream.subject);
    cli_ok(
        &a,
        &[
            "triggers",
            "create",
            "c",
            "--function",
            "sink",
            "--nats",
            "nats://127.0.0.1:4222",
            "--stream",
            &stream.name,
            "--subject",
            &subject,
            "--path",
            "/ok",
        ],
    );
    rt.block_on(stream.publish(0, 500));
    wait_invocations(&b, "sink", 500, Duration::from_secs(60));
    let holder = trigger_json(&b, "c")["node"].as_str().unwrap().to_string();
    let mut nodes = [a, b];
    let dies = nodes
        .iter()
        .position(|n| holder.starts_with(&format!("{}-", n.child.as_ref().unwrap().id())))
        .expect("the holder is one of the two");
    nodes[dies].kill9();
    let survivor = &nodes[1 - dies];
    rt.block_on(stream.publish(500, 500));
    let invs = wait_invocations(survivor, "sink", 1_000, Duration::from_secs(60));
    let shown = trigger_json(survivor, "c");
    assert_ne!(shown["node"].as_str(), Some(holder.as_str()), "taken over: {shown}");
    let id = shown["id"].as_i64().unwrap();
    assert!((1..=1_000).all(|seq| invs.contains_key(&format!("nats:{id}:{seq}"))), "every message once");
    assert_eq!(invs.len(), 1_000);
    rt.block_on(stream.delete());
}

/// The broker of a chaos run.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Nats,
    Amqp,
    Mqtt,
}

/// Publishes message `i` (body `"{i}"`, AMQP `message-id` `m{i}`) at `rate` per second for
/// `seconds`, each acked by the broker, on its own thread and connection; returns how many.
fn publisher(kind: Kind, target: String, rate: u64, seconds: u64) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        runtime().block_on(async move {
            let started = tokio::time::Instant::now();
            let until = started + Duration::from_secs(seconds);
            let pace = |i: usize| started + Duration::from_secs_f64(i as f64 / rate as f64);
            let mut i = 0;
            match kind {
                Kind::Nats => {
                    let js = async_nats::jetstream::new(async_nats::connect("127.0.0.1:4222").await.unwrap());
                    while tokio::time::Instant::now() < until {
                        js.publish(format!("{target}.x"), format!("{i}").into())
                            .await
                            .unwrap()
                            .await
                            .unwrap();
                        i += 1;
                        tokio::time::sleep_until(pace(i)).await;
                    }
                }
                Kind::Amqp => {
                    use lapin::options::BasicPublishOptions;
                    use lapin::{BasicProperties, Connection, ConnectionProperties};
                    let conn = Connection::connect(AMQP, ConnectionProperties::default()).await.unwrap();
                    let channel = conn.create_channel().await.unwrap();
                    while tokio::time::Instant::now() < until {
                        let props =
                            BasicProperties::default().with_message_id(format!("m{i}").as_str().into());
                        let body = format!("{i}");
                        let options = BasicPublishOptions::default();
                        let publish = channel.basic_publish(
                            "".into(),
                            target.as_str().into(),
                            options,
                            body.as_bytes(),
                            props,
                        );
                        publish.await.unwrap().await.unwrap();
                        i += 1;
                        tokio::time::sleep_until(pace(i)).await;
                    }
                }
                Kind::Mqtt => {
                    use rumqttc::{AsyncClient, MqttOptions, QoS};
                    let (client, mut eventloop) =
                        AsyncClient::new(MqttOptions::new(unique("pub"), "127.0.0.1", 1883), 100);
                    let poller = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
                    while tokio::time::Instant::now() < until {
                        client
                            .publish(format!("{target}/x"), QoS::AtLeastOnce, false, format!("{i}"))
                            .await
                            .unwrap();
                        i += 1;
                        tokio::time::sleep_until(pace(i)).await;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    client.disconnect().await.unwrap();
                    let _ = poller.await;
                }
            }
            i
        })
    })
}

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The chaos test of a broker's trigger: a publisher publishes for `seconds` while the node is
/// killed with SIGKILL and restarted every `every` (after it consumed something since the last
/// restart); at the end each message is exactly one invocation. The broker keeps what the dead
/// node had not acked, and sends it again to the next lease holder, whose commit finds the keys
/// held: those count as duplicates and store nothing.
fn chaos(kind: Kind, seconds: u64, rate: u64, every: Duration) {
    let port = match kind {
        Kind::Nats => 4222,
        Kind::Amqp => 5672,
        Kind::Mqtt => 1883,
    };
    if !reachable(port) {
        return;
    }
    let rt = runtime();
    let mut node = Node::start(&[]);
    node.deploy("sink", &guests().testguest, &[]);
    let mut stream = None;
    let target = match kind {
        Kind::Nats => {
            let s = rt.block_on(Stream::create());
            let subject = format!("{}.>", s.subject);
            cli_ok(
                &node,
                &[
                    "triggers",
                    "create",
                    "chaos",
                    "--function",
                    "sink",
                    "--nats",
                    "nats://127.0.0.1:4222",
                    "--stream",
                    &s.name,
                    "--subject",
                    &subject,
                    "--path",
                    "/echo",
                ],
            );
            let target = s.subject.clone();
            stream = Some(s);
            target
        }
        Kind::Amqp => {
            use lapin::options::QueueDeclareOptions;
            use lapin::types::FieldTable;
            let queue = unique("sluice-chaos-");
            rt.block_on(async {
                let conn = lapin::Connection::connect(AMQP, Default::default()).await.unwrap();
                let channel = conn.create_channel().await.unwrap();
                let options = QueueDeclareOptions { durable: true, ..Default::default() };
                channel.queue_declare(queue.as_str().into(), options, FieldTable::default()).await.unwrap();
            });
            cli_ok(
                &node,
                &[
                    "triggers",
                    "create",
                    "chaos",
                    "--function",
                    "sink",
                    "--amqp",
                    AMQP,
                    "--queue",
                    &queue,
                    "--path",
                    "/echo",
                ],
            );
            queue
        }
        Kind::Mqtt => {
            let topic = unique("sluice/chaos/");
            cli_ok(
                &node,
                &[
                    "triggers",
                    "create",
                    "chaos",
                    "--function",
                    "sink",
                    "--mqtt",
                    "mqtt://127.0.0.1:1883",
                    "--topic",
                    &format!("{topic}/#"),
                    "--path",
                    "/echo",
                ],
            );
            // Its persistent session exists once the node first connected.
            wait_consuming(&node, "chaos");
            std::thread::sleep(Duration::from_secs(1));
            topic
        }
    };
    let publishing = publisher(kind, target.clone(), rate, seconds);
    let mut kills = 0;
    while !publishing.is_finished() {
        let before = by_key(&node, "sink").len();
        std::thread::sleep(every);
        if publishing.is_finished() {
            break;
        }
        wait_until_more(&node, "sink", before + 1);
        node.kill9();
        node.spawn();
        kills += 1;
    }
    let total = publishing.join().unwrap();
    let invs = wait_invocations(&node, "sink", total, Duration::from_secs(180));
    std::thread::sleep(Duration::from_secs(2));
    let shown = trigger_json(&node, "chaos");
    assert_eq!(by_key(&node, "sink").len(), total, "one invocation per message: {shown}");
    let id = shown["id"].as_i64().unwrap();
    match kind {
        Kind::Nats => {
            assert!((1..=total).all(|seq| invs.contains_key(&format!("nats:{id}:{seq}"))), "a sequence lost")
        }
        Kind::Amqp => {
            assert!((0..total).all(|i| invs.contains_key(&format!("amqp:{id}:id:m{i}"))), "a message id lost")
        }
        Kind::Mqtt => {
            // No id survives MQTT: every body once.
            let mut bodies = std::collections::BTreeSet::new();
            for inv in invs.values() {
                let inv_id = inv["id"].as_str().unwrap();
                wait_succeeded(&node, inv_id);
                let body = node.get(&format!("/v1/invocations/{inv_id}/response")).text().unwrap();
                assert!(bodies.insert(body.clone()), "message {body} stored twice");
            }
            assert_eq!(bodies.len(), total);
        }
    }
    eprintln!(
        "{kind:?} chaos: {total} published and acked by the broker, {total} invocations, 0 lost, 0 stored twice; \
         {kills} kills; {} redeliveries absorbed (duplicates)",
        shown["duplicates"]
    );
    if let Some(s) = stream {
        rt.block_on(s.delete());
    }
}

/// The short forms (CI): 12 s of publishing, a kill every 4 s.
#[test]
fn nats_trigger_loses_nothing_and_stores_nothing_twice_across_kill_9() {
    chaos(Kind::Nats, 12, 200, Duration::from_secs(4));
}

#[test]
fn amqp_trigger_loses_nothing_and_stores_nothing_twice_across_kill_9() {
    chaos(Kind::Amqp, 12, 200, Duration::from_secs(4));
}

/// MQTT at 40/s: Mosquitto keeps 1000 messages for a session whose node is down (a kill costs up
/// to 12 s: the lease runs out, the next node takes it).
#[test]
fn mqtt_trigger_loses_nothing_and_stores_nothing_twice_across_kill_9() {
    chaos(Kind::Mqtt, 12, 40, Duration::from_secs(4));
}

/// The long forms: `scripts/chaos.sh SECONDS nats|amqp|mqtt`.
fn long_seconds() -> u64 {
    std::env::var("CHAOS_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(120)
}

#[test]
#[ignore = "long: scripts/chaos.sh SECONDS nats"]
fn long_chaos_nats() {
    chaos(Kind::Nats, long_seconds(), 1_000, Duration::from_secs(8));
}

#[test]
#[ignore = "long: scripts/chaos.sh SECONDS amqp"]
fn long_chaos_amqp() {
    chaos(Kind::Amqp, long_seconds(), 1_000, Duration::from_secs(8));
}

#[test]
#[ignore = "long: scripts/chaos.sh SECONDS mqtt"]
fn long_chaos_mqtt() {
    chaos(Kind::Mqtt, long_seconds(), 40, Duration::from_secs(8));
}

/// Waits (60 s at most: a loaded machine) until a node holds the trigger's lease.
fn wait_consuming(node: &Node, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !trigger_json(node, name)["node"].is_string() {
        assert!(Instant::now() < deadline, "no node took trigger {name} within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}
