//! `sluice deploy NAME FILE.wasm`: upload the component, then create a version (the node
//! validates and compiles it; a spinner shows while that runs).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::Method;
use serde_json::json;
use sluice_core::FunctionConfig;
use sluice_core::units::{parse_bytes, parse_duration};

use crate::client::{Client, Target};

#[derive(clap::Args, Debug)]
pub struct DeployArgs {
    /// Function name: 1-63 characters of a-z, 0-9 and '-'.
    pub name: String,
    /// The component: a .wasm file exporting wasi:http/incoming-handler.
    pub file: PathBuf,
    /// Memory limit of one instance, e.g. 128MiB.
    #[arg(long, default_value = "128MiB", value_parser = parse_bytes)]
    pub memory: u64,
    /// Wall-clock limit of a synchronous call, e.g. 30s.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Environment variable for the guest (repeatable), K=V.
    #[arg(long = "env", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Secret environment variable for the guest (repeatable), K=V: set after the --env ones;
    /// the node never shows its value again (versions list the names only).
    #[arg(long = "secret", value_parser = parse_env)]
    pub secrets: Vec<(String, String)>,
    /// File of secrets, one K=V per line (dotenv style: blank lines and lines starting with #
    /// are skipped; the value is everything after the first '=', taken literally — no quotes
    /// or escapes). Combined with --secret; a name given twice is an error.
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Host the guest may call over HTTP (repeatable): host, host:port, [ipv6] or [ipv6]:port.
    /// Default: none.
    #[arg(long = "allow-outbound")]
    pub allow_outbound: Vec<String>,
    /// Wall-clock limit of one async attempt, e.g. 15min.
    #[arg(long, default_value = "15min", value_parser = parse_duration)]
    pub async_timeout: Duration,
    /// Attempts of an async invocation before it is dead.
    #[arg(long, default_value_t = sluice_core::limits::ATTEMPTS_MAX_DEFAULT)]
    pub attempts: u32,
    /// Age after which a failing async invocation is not retried any more, e.g. 6h.
    #[arg(long, default_value = "6h", value_parser = parse_duration)]
    pub max_age: Duration,
    /// Rate limit of this function, e.g. 100/s (also 6000/min).
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Burst of the rate limit (default: the rate per second, rounded up).
    #[arg(long, requires = "rate")]
    pub burst: Option<u32>,
    /// Calls of this function running at once on a node.
    #[arg(long)]
    pub max_concurrency: Option<u32>,
    /// Async calls of this function that start whatever the node's load (reserved
    /// concurrency over the cluster; beyond it, calls run only while nodes are under their
    /// utilization target). A part of the tenant's reserved quota, which only an admin sets
    /// (`tenants quota --reserved`): at most that, or the deploy is refused.
    #[arg(long = "reserved")]
    pub reserved: Option<u32>,
    /// Default start window of async calls that name no sluice-deadline, e.g. 1h: such a call
    /// must start within it and may be held for a trough meanwhile (time-shifting).
    #[arg(long, value_parser = parse_duration)]
    pub start_window: Option<Duration>,
    /// Let one instance serve up to N calls, one after another, instead of a fresh instance per
    /// call (1). Globals and caches then persist from one call to the next, as in a warm Lambda
    /// execution environment: faster for a function with a large start-up, but calls of one
    /// instance can see what earlier ones left behind. Never two calls at once, never across
    /// versions or tenants; an instance that trapped, timed out or hit a limit is discarded.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub reuse: u32,
    /// With --reuse: how long a warm instance may wait for its next call, e.g. 1min.
    #[arg(long, default_value = "1min", value_parser = parse_duration, requires = "reuse")]
    pub reuse_idle: Duration,
    /// Instances of this version alive at once on a node; more calls wait for one (within their
    /// timeout). Default: unbounded, except for a heavy component (8 MiB or more of initial
    /// memory, e.g. a Python or JavaScript one), which gets the node's default (--heavy-memory-max
    /// over its initial memory, or --heavy-instances-max).
    #[arg(long = "instances", value_parser = clap::value_parser!(u32).range(1..))]
    pub instances_max: Option<u32>,
    /// Serve the function's /fn URL without an API key.
    #[arg(long)]
    pub public: bool,
    /// Leave the alias `latest` (what /fn/TENANT/NAME/ calls) where it is: the new version is
    /// served only as NAME@VERSION (and through aliases set to it) until `sluice alias set`.
    /// A function's first version is always `latest`.
    #[arg(long)]
    pub no_promote: bool,
    #[command(flatten)]
    pub target: Target,
}

/// `100/s`, `6000/min`, `10/h` or a bare number per second.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let (n, unit) = s.split_once('/').unwrap_or((s, "s"));
    let n: f64 = n.trim().parse().map_err(|_| format!("invalid rate {s:?}: expected e.g. 100/s"))?;
    let per = match unit.trim() {
        "s" | "sec" => 1.0,
        "m" | "min" => 60.0,
        "h" | "hour" => 3600.0,
        other => return Err(format!("invalid rate unit {other:?}: use /s, /min or /h")),
    };
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("invalid rate {s:?}: must be positive"));
    }
    Ok(n / per)
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    // The value is left out of the message: this also parses --secret.
    let (k, v) = s.split_once('=').ok_or_else(|| "expected K=V (no '=' found)".to_string())?;
    Ok((k.to_string(), v.to_string()))
}

/// Reads a `--secret-file`. Errors name the line, never its text: the text may be a secret.
fn read_secret_file(path: &std::path::Path) -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut secrets = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .with_context(|| format!("{} line {}: expected K=V", path.display(), i + 1))?;
        secrets.push((k.trim_end().to_string(), v.to_string()));
    }
    Ok(secrets)
}

/// Progress goes to stderr only when it is a terminal, so scripts and CI logs stay clean.
pub fn draw_target() -> ProgressDrawTarget {
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}

/// Upload chunk size: also the granularity of the progress bar.
const UPLOAD_CHUNK_BYTES: usize = 64 * 1024;

/// What one upload-and-create gave: the version, or the node's 404 for a blob collected between
/// the two (with its error, for when it happens again).
enum Created {
    Version(serde_json::Value),
    BlobGone(anyhow::Error),
}

/// Uploads the component (with a progress bar on a terminal), then creates the version from it
/// with `body` (the config, secrets and promotion; the digest is added here).
async fn upload_and_create(
    client: &Client,
    bytes: &[u8],
    name: &str,
    body: &serde_json::Value,
) -> anyhow::Result<Created> {
    let bar = ProgressBar::with_draw_target(Some(bytes.len() as u64), draw_target());
    bar.set_style(ProgressStyle::with_template("uploading {bytes}/{total_bytes} {wide_bar}")?);
    let total = bytes.len();
    let chunks: Vec<bytes::Bytes> =
        bytes.chunks(UPLOAD_CHUNK_BYTES).map(bytes::Bytes::copy_from_slice).collect();
    let progress = bar.clone();
    let stream = futures::stream::iter(chunks).map(move |c| {
        progress.inc(c.len() as u64);
        Ok::<_, std::io::Error>(c)
    });
    let upload = client
        .request(Method::POST, &client.tenant_path("/blobs"))
        .header("content-type", "application/wasm")
        .header("content-length", total)
        .body(reqwest::Body::wrap_stream(stream));
    let blob = client.json(upload).await;
    bar.finish_and_clear();
    let blob = blob?;
    let mut body = body.clone();
    body["digest"] = blob["digest"].clone();

    let spinner = ProgressBar::with_draw_target(None, draw_target());
    spinner.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})")?);
    spinner.set_message(format!("validating and compiling {name}"));
    spinner.enable_steady_tick(Duration::from_millis(100));
    let create =
        client.request(Method::POST, &client.tenant_path(&format!("/functions/{name}/versions"))).json(&body);
    let res = client.send(create).await;
    spinner.finish_and_clear();
    let res = res?;
    let gone = res.status() == reqwest::StatusCode::NOT_FOUND;
    match crate::client::check(res).await {
        Ok(res) => Ok(Created::Version(res.json().await.context("reading the node's JSON answer")?)),
        Err(e) if gone => Ok(Created::BlobGone(e)),
        Err(e) => Err(e),
    }
}

pub async fn run(args: DeployArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.target)?;
    let bytes = std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let mut secrets = args.secrets;
    if let Some(path) = &args.secret_file {
        secrets.extend(read_secret_file(path)?);
    }
    let config = FunctionConfig {
        memory_bytes: args.memory,
        timeout_ms: args.timeout.as_millis() as u64,
        env: args.env,
        allow_outbound: args.allow_outbound,
        public: args.public,
        async_timeout_ms: args.async_timeout.as_millis() as u64,
        attempts_max: args.attempts,
        max_age_ms: args.max_age.as_millis() as u64,
        rate_per_sec: args.rate,
        burst: args.burst,
        max_concurrency: args.max_concurrency,
        reserved_concurrency: args.reserved,
        start_window_ms: args.start_window.map(|d| d.as_millis() as u64),
        reuse_calls: args.reuse,
        reuse_idle_ms: args.reuse_idle.as_millis() as u64,
        instances_max: args.instances_max,
        secrets: Default::default(),
    };

    let body = json!({ "config": config, "secrets": secrets, "promote": !args.no_promote });
    // A 404 for the create after an upload that succeeded means the node collected the upload
    // while it compiled (a compile that outlasted `serve --blob-grace`): upload once more.
    let version = match upload_and_create(&client, &bytes, &args.name, &body).await? {
        Created::Version(v) => v,
        Created::BlobGone(_) => match upload_and_create(&client, &bytes, &args.name, &body).await? {
            Created::Version(v) => v,
            Created::BlobGone(e) => return Err(e),
        },
    };
    let compiled = if version["artifact_cached"].as_bool() == Some(true) {
        "artifact cached".to_string()
    } else {
        format!("compiled in {} ms", version["compile_ms"])
    };
    println!(
        "deployed {}/{} version {} ({compiled})\n{}",
        version["tenant"].as_str().unwrap_or_default(),
        version["function"].as_str().unwrap_or_default(),
        version["version"],
        version["url"].as_str().unwrap_or_default()
    );
    if version["promoted"].as_bool() == Some(false) {
        println!(
            "not promoted: latest still names the version before; call it as {}@{}, or move latest with \
             `sluice alias set {} latest {}`",
            args.name, version["version"], args.name, version["version"]
        );
    }
    let names: Vec<&str> =
        version["secrets"].as_array().into_iter().flatten().filter_map(|n| n.as_str()).collect();
    if !names.is_empty() {
        println!("secrets: {}", names.join(", "));
    }
    Ok(())
}
