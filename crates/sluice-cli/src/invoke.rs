//! `sluice invoke NAME [PATH]`: call a function like curl would; the body goes to stdout.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use sluice_core::{Criticality, InvocationStatus};

use crate::client::{Client, Target};

#[derive(clap::Args, Debug)]
pub struct InvokeArgs {
    /// Function name.
    pub name: String,
    /// Path below the function, e.g. /users?id=1.
    #[arg(default_value = "/")]
    pub path: String,
    /// HTTP method.
    #[arg(short = 'X', long = "request", default_value = "GET")]
    pub method: String,
    /// Request header (repeatable), 'K: V'.
    #[arg(short = 'H', long = "header")]
    pub headers: Vec<String>,
    /// Request body; @FILE reads it from a file. Implies POST unless -X is given.
    #[arg(short = 'd', long = "data")]
    pub data: Option<String>,
    /// Print the response status and headers to stderr.
    #[arg(short = 'i', long)]
    pub include: bool,
    /// Queue the call (Prefer: respond-async) and print its invocation id instead of waiting.
    #[arg(long = "async")]
    pub queue: bool,
    /// With --async: this key and API key within 24 h return the first invocation for the same
    /// request (method, path, body) and are refused (422) for a different one.
    #[arg(long, requires = "queue")]
    pub idempotency_key: Option<String>,
    /// With --async: do not start before this RFC 3339 time.
    #[arg(long, requires = "queue")]
    pub start_after: Option<String>,
    /// With --async: expire if not started by this RFC 3339 time.
    #[arg(long, requires = "queue")]
    pub deadline: Option<String>,
    /// With --async: how urgently it runs (queued calls are leased high first); default normal.
    #[arg(long, requires = "queue", value_parser = clap::builder::PossibleValuesParser::new(Criticality::WORDS))]
    pub criticality: Option<String>,
    /// With --async: wait for the invocation to finish, showing its state (queued, running,
    /// retrying) meanwhile, then print its response like a sync call; fails if it failed.
    /// Interrupting the wait leaves the invocation running.
    #[arg(long, requires = "queue")]
    pub wait: bool,
    #[command(flatten)]
    pub target: Target,
}

pub async fn run(args: InvokeArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.target)?;
    let method = if args.data.is_some() && args.method == "GET" { "POST" } else { args.method.as_str() };
    let method = Method::from_bytes(method.as_bytes()).context("invalid method")?;
    let path = if args.path.starts_with('/') { args.path.clone() } else { format!("/{}", args.path) };
    let mut req = client.request(method, &format!("/fn/{}/{}{path}", client.tenant, args.name));
    for h in &args.headers {
        let (k, v) = h.split_once(':').with_context(|| format!("header {h:?} is not 'K: V'"))?;
        req = req.header(k.trim(), v.trim());
    }
    if args.queue {
        req = req.header("prefer", "respond-async");
        for (name, value) in [
            ("idempotency-key", &args.idempotency_key),
            ("sluice-start-after", &args.start_after),
            ("sluice-deadline", &args.deadline),
            ("sluice-criticality", &args.criticality),
        ] {
            if let Some(v) = value {
                req = req.header(name, v.as_str());
            }
        }
    }
    if let Some(data) = args.data {
        let body = match data.strip_prefix('@') {
            Some(file) => std::fs::read(file).with_context(|| format!("reading {file}"))?,
            None => data.into_bytes(),
        };
        req = req.body(body);
    }
    let res = client.send(req).await?;
    let status = res.status();
    let platform_error = res.headers().get("sluice-error").is_some();
    if args.include {
        eprintln!("HTTP {status}");
        for (k, v) in res.headers() {
            eprintln!("{k}: {}", v.to_str().unwrap_or("<binary>"));
        }
    }
    if platform_error {
        crate::client::check(res).await?;
        bail!("HTTP {status}");
    }
    if args.queue {
        let v: serde_json::Value = res.json().await?;
        let id = v["id"].as_str().unwrap_or_default();
        if args.wait {
            return wait_for(&client, id).await;
        }
        let replay = if status == reqwest::StatusCode::ACCEPTED { "" } else { " (unexpected status)" };
        println!("{id}");
        eprintln!("queued{replay}: sluice invocations get {id}");
        return Ok(());
    }
    copy_body(res).await
}

async fn copy_body(mut res: reqwest::Response) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = res.chunk().await? {
        out.write_all(&chunk)?;
    }
    out.flush()?;
    Ok(())
}

/// How often `--wait` asks for the invocation's state.
const WAIT_POLL: Duration = Duration::from_millis(250);

/// Polls invocation `id` until it is finished, with a spinner that says what it is doing; then
/// prints its stored response, or fails with why it did not succeed.
async fn wait_for(client: &Client, id: &str) -> anyhow::Result<()> {
    let spinner = ProgressBar::with_draw_target(None, crate::deploy::draw_target());
    spinner.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})")?);
    spinner.enable_steady_tick(Duration::from_millis(100));
    let (v, status) = loop {
        let v = client.json(client.request(Method::GET, &format!("/v1/invocations/{id}"))).await;
        let v = match v {
            Ok(v) => v,
            Err(e) => {
                spinner.finish_and_clear();
                return Err(e.context(format!("waiting for invocation {id}")));
            }
        };
        if let Some(status) = status_of(&v).filter(|s| s.is_final()) {
            break (v, status);
        }
        spinner.set_message(state_line(id, &v));
        tokio::time::sleep(WAIT_POLL).await;
    };
    spinner.finish_and_clear();
    if status != InvocationStatus::Succeeded {
        bail!(
            "invocation {id} {status} after {} attempt(s){}; logs: sluice logs --invocation {id}",
            v["attempts"],
            v["error_kind"].as_str().map(|k| format!(": {k}")).unwrap_or_default()
        );
    }
    let res = client.send(client.request(Method::GET, &format!("/v1/invocations/{id}/response"))).await?;
    let res = if res.headers().contains_key("sluice-error") { crate::client::check(res).await? } else { res };
    copy_body(res).await
}

/// The `status` of an invocation as the node shows it (`None` if it is not one).
fn status_of(v: &serde_json::Value) -> Option<InvocationStatus> {
    v["status"].as_str().and_then(InvocationStatus::parse)
}

/// What a waiting invocation is doing, in a few words.
fn state_line(id: &str, v: &serde_json::Value) -> String {
    let attempts = v["attempts"].as_u64().unwrap_or(0);
    match status_of(v) {
        Some(InvocationStatus::Failed) => format!(
            "{id}: attempt {attempts} failed ({}); waiting to retry",
            v["error_kind"].as_str().unwrap_or("error")
        ),
        Some(InvocationStatus::Queued) if attempts > 0 => {
            format!("{id}: queued again after {attempts} attempt(s)")
        }
        Some(InvocationStatus::Queued) => format!("{id}: queued"),
        Some(InvocationStatus::Running) => format!("{id}: running, attempt {attempts}"),
        _ => format!("{id}: {}", v["status"]),
    }
}
