//! `sluice logs NAME [-f]` and `sluice logs --invocation ID`.

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use anyhow::bail;

use crate::client::{Client, Target};
use crate::output::OutputArgs;

/// How often `-f` asks for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(500);

#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    /// Function name (omit with --invocation).
    #[arg(required_unless_present = "invocation")]
    pub name: Option<String>,
    /// Show the lines of one invocation instead.
    #[arg(long, conflicts_with = "name")]
    pub invocation: Option<String>,
    /// Keep printing new lines as they arrive.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Recent lines to show first.
    #[arg(short = 'n', long, default_value_t = 100)]
    pub lines: u32,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub target: Target,
}

pub async fn run(args: LogsArgs) -> anyhow::Result<()> {
    if args.follow && args.output.is_json() {
        // -o json promises one document; following would print one per poll.
        bail!("--follow prints lines as they come and cannot be combined with --output json");
    }
    let client = Client::new(&args.target)?;
    if let Some(id) = &args.invocation {
        let v = client.json(client.request(Method::GET, &format!("/v1/invocations/{id}/logs"))).await?;
        if !args.output.json(&v)? {
            print_lines(&v);
        }
        return Ok(());
    }
    let name = args.name.as_deref().unwrap_or_default();
    let path = client.tenant_path(&format!("/functions/{name}/logs"));
    let v = client.json(client.request(Method::GET, &path).query(&[("limit", args.lines)])).await?;
    if args.output.json(&v)? {
        return Ok(());
    }
    print_lines(&v);
    // With no lines yet, everything after sequence 0 is new.
    let mut after = v["next_after"].as_i64().unwrap_or(0);
    if !args.follow {
        return Ok(());
    }
    loop {
        tokio::time::sleep(FOLLOW_POLL).await;
        let req = client.request(Method::GET, &path).query(&[("limit", 1000), ("after", after)]);
        let v = client.json(req).await?;
        print_lines(&v);
        after = v["next_after"].as_i64().unwrap_or(after);
    }
}

fn print_lines(v: &Value) {
    for l in v["lines"].as_array().into_iter().flatten() {
        println!("{}", format_line(l));
    }
}

/// One log line of the API's answer as the CLI shows it: time, the invocation id's last 8
/// characters, stream, text (`sluice logs` and `sluice top`).
pub fn format_line(l: &Value) -> String {
    let id = l["invocation_id"].as_str().unwrap_or_default();
    format!(
        "{} {} {:<6} {}",
        l["at"].as_str().unwrap_or_default(),
        &id[id.len().saturating_sub(8)..],
        l["stream"].as_str().unwrap_or_default(),
        l["line"].as_str().unwrap_or_default()
    )
}
