//! `sluice triggers create|list|show|pause|resume|delete`: a tenant's broker triggers, each of
//! which turns the messages of a JetStream stream, an AMQP queue or an MQTT topic into durable
//! async invocations of a function. The nodes consume them; this only manages them.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use sluice_core::units::parse_duration;

use crate::client::{Client, Target};
use crate::output::OutputArgs;

#[derive(clap::Subcommand, Debug)]
pub enum TriggersCommand {
    /// Create a trigger: exactly one of --nats (with --stream and --subject), --amqp (with
    /// --queue) and --mqtt (with --topic).
    Create(Box<CreateArgs>),
    /// List the tenant's triggers with their counts and lag.
    List {
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Show a trigger: its broker, the node consuming it, counts, lag, acks per second and its
    /// last error.
    Show {
        name: String,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Pause a trigger: messages wait in the broker until it is resumed.
    Pause {
        name: String,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Resume a paused trigger from where it stopped.
    Resume {
        name: String,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Delete a trigger (the invocations it enqueued stay; messages not taken stay in the broker).
    Delete {
        name: String,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Trigger name (a-z, 0-9 and '-'), unique in the tenant.
    name: String,
    /// The function each message invokes (asynchronously, through the durable queue).
    #[arg(long)]
    function: String,
    /// The alias whose version runs, chosen at each enqueue.
    #[arg(long, default_value = "latest")]
    alias: String,
    /// A NATS server with JetStream: nats://[user:password@]host:4222.
    #[arg(long, conflicts_with_all = ["amqp", "mqtt"], required_unless_present_any = ["amqp", "mqtt"], requires_all = ["stream", "subject"])]
    nats: Option<String>,
    /// The JetStream stream (it must exist).
    #[arg(long, requires = "nats")]
    stream: Option<String>,
    /// The subject filter, wildcards allowed: 'orders.>'.
    #[arg(long, requires = "nats")]
    subject: Option<String>,
    /// An AMQP 0-9-1 broker (RabbitMQ): amqp://[user:password@]host:5672/%2f.
    #[arg(long, conflicts_with = "mqtt", requires = "queue")]
    amqp: Option<String>,
    /// The queue (it must exist).
    #[arg(long, requires = "amqp")]
    queue: Option<String>,
    /// An MQTT broker: mqtt://[user:password@]host:1883.
    #[arg(long, requires = "topic")]
    mqtt: Option<String>,
    /// The topic filter: 'sensors/#'.
    #[arg(long, requires = "mqtt")]
    topic: Option<String>,
    /// The MQTT QoS (1: at least once, acked after the enqueue commits).
    #[arg(long, requires = "mqtt", default_value_t = 1)]
    qos: u8,
    /// Most messages stored per commit.
    #[arg(long, default_value_t = 100)]
    batch: u32,
    /// Longest a batch waits to fill: 50ms.
    #[arg(long, value_parser = parse_duration, default_value = "20ms")]
    window: Duration,
    /// The path (and query) below the function each invocation's request is sent to (POST).
    #[arg(long, default_value = "/")]
    path: String,
    /// One invocation at a time per subject (nats), routing key (amqp) or topic (mqtt), in the
    /// broker's order: the next starts after the one before has finished (retries included).
    #[arg(long)]
    ordered: bool,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    target: Target,
}

pub async fn run(command: TriggersCommand) -> anyhow::Result<()> {
    match command {
        TriggersCommand::Create(args) => {
            let a = *args;
            let mut req = json!({
                "name": a.name,
                "function": a.function,
                "alias": a.alias,
                "path": a.path,
                "batch": a.batch,
                "window_ms": u64::try_from(a.window.as_millis()).unwrap_or(u64::MAX),
                "ordered": a.ordered,
            });
            if let Some(url) = a.nats {
                req["kind"] = json!("nats");
                req["url"] = json!(url);
                req["stream"] = json!(a.stream);
                req["subject"] = json!(a.subject);
            } else if let Some(url) = a.amqp {
                req["kind"] = json!("amqp");
                req["url"] = json!(url);
                req["queue"] = json!(a.queue);
            } else if let Some(url) = a.mqtt {
                req["kind"] = json!("mqtt");
                req["url"] = json!(url);
                req["topic"] = json!(a.topic);
                req["qos"] = json!(a.qos);
            }
            let client = Client::new(&a.target)?;
            let v = client
                .json(client.request(Method::POST, &client.tenant_path("/triggers")).json(&req))
                .await?;
            if a.output.json(&v)? {
                return Ok(());
            }
            print!("created trigger {}\n{}", a.name, show_text(&v));
        }
        TriggersCommand::List { output, target } => {
            let client = Client::new(&target)?;
            let v = client.json(client.request(Method::GET, &client.tenant_path("/triggers"))).await?;
            if output.json(&v)? {
                return Ok(());
            }
            print!("{}", list_text(&v));
        }
        TriggersCommand::Show { name, output, target } => {
            let client = Client::new(&target)?;
            let v = client
                .json(client.request(Method::GET, &client.tenant_path(&format!("/triggers/{name}"))))
                .await?;
            if output.json(&v)? {
                return Ok(());
            }
            print!("{}", show_text(&v));
        }
        TriggersCommand::Pause { name, output, target } => change(&name, "pause", output, target).await?,
        TriggersCommand::Resume { name, output, target } => change(&name, "resume", output, target).await?,
        TriggersCommand::Delete { name, target } => {
            let client = Client::new(&target)?;
            client
                .json(client.request(Method::DELETE, &client.tenant_path(&format!("/triggers/{name}"))))
                .await?;
            println!("deleted trigger {name} of tenant {}", client.tenant);
        }
    }
    Ok(())
}

async fn change(name: &str, action: &str, output: OutputArgs, target: Target) -> anyhow::Result<()> {
    let client = Client::new(&target)?;
    let path = client.tenant_path(&format!("/triggers/{name}/{action}"));
    let v = client.json(client.request(Method::POST, &path)).await?;
    if output.json(&v)? {
        return Ok(());
    }
    print!("{}", show_text(&v));
    Ok(())
}

/// `nats://127.0.0.1:4222 stream ORDERS subject orders.>`.
fn source(v: &Value) -> String {
    let text = |k: &str| v[k].as_str().unwrap_or("-").to_string();
    match v["kind"].as_str() {
        Some("nats") => format!("{} stream {} subject {}", text("url"), text("stream"), text("subject")),
        Some("amqp") => format!("{} queue {}", text("url"), text("queue")),
        Some("mqtt") => format!("{} topic {} qos {}", text("url"), text("topic"), v["qos"]),
        _ => text("url"),
    }
}

fn state(v: &Value) -> String {
    if v["paused"].as_bool().unwrap_or(false) {
        "paused".into()
    } else if v["last_error"].is_string() && v["acked_per_s"].as_u64().unwrap_or(0) == 0 {
        "failing".into()
    } else if v["node"].is_string() {
        "running".into()
    } else {
        "waiting".into()
    }
}

fn opt(v: &Value) -> String {
    v.as_u64().map_or_else(|| "-".to_string(), |n| n.to_string())
}

/// What `triggers list` prints.
fn list_text(v: &Value) -> String {
    let triggers = v["triggers"].as_array().cloned().unwrap_or_default();
    if triggers.is_empty() {
        return "no triggers (create one: sluice triggers create NAME --function F --nats nats://127.0.0.1:4222 --stream S --subject 'orders.>')\n".into();
    }
    let mut out = format!(
        "{:<20}  {:<20}  {:<5}  {:<8}  {:>10}  {:>10}  {:>8}  {:>8}\n",
        "NAME", "FUNCTION", "KIND", "STATE", "ENQUEUED", "DUPLICATES", "LAG", "ACKED/S"
    );
    for t in &triggers {
        out += &format!(
            "{:<20}  {:<20}  {:<5}  {:<8}  {:>10}  {:>10}  {:>8}  {:>8}\n",
            t["name"].as_str().unwrap_or_default(),
            format!(
                "{}@{}",
                t["function"].as_str().unwrap_or_default(),
                t["alias"].as_str().unwrap_or_default()
            ),
            t["kind"].as_str().unwrap_or_default(),
            state(t),
            t["enqueued"].as_u64().unwrap_or_default(),
            t["duplicates"].as_u64().unwrap_or_default(),
            opt(&t["lag"]),
            opt(&t["acked_per_s"]),
        );
    }
    out
}

/// What `triggers show` (and create, pause, resume) prints.
fn show_text(v: &Value) -> String {
    let text = |k: &str| v[k].as_str().unwrap_or("-").to_string();
    let mut out =
        format!("{}: {}@{}  {}  {}\n", text("name"), text("function"), text("alias"), text("kind"), state(v));
    out += &format!(
        "source: {}{}\n",
        source(v),
        if v["credentials"].as_bool().unwrap_or(false) { " (credentials kept)" } else { "" }
    );
    out += &format!(
        "batch {} within {} ms, POST {}{}\n",
        v["batch"],
        v["window_ms"],
        text("path"),
        if v["ordered"].as_bool().unwrap_or(false) { ", in order per key" } else { "" }
    );
    out += &format!("node: {}\n", text("node"));
    out += &format!(
        "received {}, enqueued {}, duplicates {} (redeliveries stored once); last commit {}\n",
        v["received"],
        v["enqueued"],
        v["duplicates"],
        text("last_commit_at")
    );
    out += &format!("lag {}, acked/s {}\n", opt(&v["lag"]), opt(&v["acked_per_s"]));
    if let Some(e) = v["last_error"].as_str() {
        out += &format!("last error: {e} (at {})\n", text("last_error_at"));
    }
    out
}
