//! `sluice rollout NAME --to N`, `rollout status NAME`, `rollout cancel NAME`: move an alias to a
//! new version in steps while its error rate stays within the stable version's, and back at once
//! when it does not. The nodes advance it; this only starts, shows and cancels it.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use sluice_core::units::{format_duration, parse_duration};

use crate::client::{Client, Target};
use crate::output::OutputArgs;

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct RolloutArgs {
    #[command(subcommand)]
    command: Option<RolloutCommand>,
    /// Function name.
    #[arg(required = true)]
    name: Option<String>,
    /// The version to roll out.
    #[arg(long, required = true)]
    to: Option<i64>,
    #[command(flatten)]
    plan: Plan,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    target: Target,
}

#[derive(clap::Args, Debug)]
struct Plan {
    /// The alias to move; its current version is the stable one.
    #[arg(long, default_value = "latest")]
    alias: String,
    /// The new version's percent of the alias's calls at each step, rising, the last 100.
    #[arg(long, default_value = "5,25,50,100", value_delimiter = ',')]
    steps: Vec<u32>,
    /// How long each step runs before it is judged (500ms to 24h).
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    every: Duration,
    /// How many percentage points the new version's error rate (5xx answers and failed calls)
    /// may exceed the stable version's over a step before the alias goes back: `1%` or `1`.
    #[arg(long, default_value = "1%", value_parser = parse_percent)]
    max_error_rate: f64,
    /// Calls to the new version a step needs before it is judged; with fewer it waits.
    #[arg(long, default_value_t = 20)]
    min_calls: u64,
}

#[derive(clap::Subcommand, Debug)]
enum RolloutCommand {
    /// Show an alias's newest rollout: its steps with each version's calls and errors, and why
    /// it ended.
    Status {
        /// Function name.
        name: String,
        /// The alias.
        #[arg(long, default_value = "latest")]
        alias: String,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Stop an alias's running rollout and put the alias back on the stable version.
    Cancel {
        /// Function name.
        name: String,
        /// The alias.
        #[arg(long, default_value = "latest")]
        alias: String,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: Target,
    },
}

fn parse_percent(s: &str) -> Result<f64, String> {
    let n: f64 = s.trim_end_matches('%').parse().map_err(|_| format!("{s:?} is not a percent (1%)"))?;
    if !(0.0..=100.0).contains(&n) {
        return Err(format!("{s} is not from 0% to 100%"));
    }
    Ok(n)
}

pub async fn run(args: RolloutArgs) -> anyhow::Result<()> {
    let (name, alias, method, body, output, target) = match args.command {
        Some(RolloutCommand::Status { name, alias, output, target }) => {
            (name, alias, Method::GET, None, output, target)
        }
        Some(RolloutCommand::Cancel { name, alias, output, target }) => {
            (name, alias, Method::DELETE, None, output, target)
        }
        None => {
            let (Some(name), Some(to)) = (args.name, args.to) else {
                anyhow::bail!("usage: sluice rollout NAME --to VERSION");
            };
            let body = json!({
                "to": to,
                "steps": args.plan.steps,
                "every_ms": u64::try_from(args.plan.every.as_millis()).unwrap_or(u64::MAX),
                "max_error_rate_percent": args.plan.max_error_rate,
                "min_calls": args.plan.min_calls,
            });
            (name, args.plan.alias, Method::PUT, Some(body), args.output, args.target)
        }
    };
    let client = Client::new(&target)?;
    let path = client.tenant_path(&format!("/functions/{name}/aliases/{alias}/rollout"));
    let mut req = client.request(method, &path);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let v = client.json(req).await?;
    if output.json(&v)? {
        return Ok(());
    }
    print!("{}", status_text(&name, &v));
    Ok(())
}

/// What `rollout status` prints.
fn status_text(name: &str, v: &Value) -> String {
    let n = |k: &str| v[k].as_i64().unwrap_or_default();
    let every = format_duration(Duration::from_millis(v["every_ms"].as_u64().unwrap_or_default()));
    let mut out = format!(
        "{name}@{}: version {} -> {}  {}  now {}% on {}\n",
        v["alias"].as_str().unwrap_or_default(),
        n("stable_version"),
        n("canary_version"),
        v["status"].as_str().unwrap_or_default(),
        v["percent"],
        n("canary_version"),
    );
    out += &format!(
        "steps {} every {every}, max error rate +{}%, at least {} calls per step\n",
        v["plan"].as_array().into_iter().flatten().map(|p| p.to_string()).collect::<Vec<_>>().join(","),
        v["max_error_rate_percent"],
        v["min_calls"],
    );
    out += &format!(
        "{:<4}  {:>4}  {:<24}  {:>13}  {:>16}\n",
        "STEP", "PCT", "STARTED", "NEW CALLS/ERR", "STABLE CALLS/ERR"
    );
    for (i, s) in v["steps"].as_array().into_iter().flatten().enumerate() {
        out += &format!(
            "{:<4}  {:>4}  {:<24}  {:>13}  {:>16}\n",
            i + 1,
            format!("{}%", s["percent"]),
            s["started_at"].as_str().unwrap_or_default(),
            format!("{}/{}", s["canary_calls"], s["canary_errors"]),
            format!("{}/{}", s["stable_calls"], s["stable_errors"]),
        );
    }
    if let Some(reason) = v["reason"].as_str() {
        out += &format!("reason: {reason}\n");
    }
    out
}
