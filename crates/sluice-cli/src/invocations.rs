//! `sluice invocations list|get|response|retry`.

use std::io::Write;

use reqwest::Method;
use serde_json::Value;

use crate::client::{Client, Target, check};
use crate::output::OutputArgs;

#[derive(clap::Subcommand, Debug)]
pub enum InvocationsCommand {
    /// List the tenant's invocations, newest first.
    List {
        /// Only this function's invocations.
        #[arg(long)]
        function: Option<String>,
        /// Only invocations in this state.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(sluice_core::InvocationStatus::WORDS))]
        status: Option<String>,
        /// Invocations to show, 1 to 1000.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only invocations older than this id (the cursor printed after a full page).
        #[arg(long)]
        before: Option<String>,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Show one invocation, as JSON whatever --output says (it is one document either way).
    #[command(visible_alias = "show")]
    Get {
        id: String,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Print an invocation's stored response body to stdout.
    Response {
        id: String,
        /// Print the stored status and headers to stderr.
        #[arg(short = 'i', long)]
        include: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Queue a dead or expired async invocation again, with its attempts reset.
    Retry {
        id: String,
        #[command(flatten)]
        target: Target,
    },
}

pub async fn run(cmd: InvocationsCommand) -> anyhow::Result<()> {
    match cmd {
        InvocationsCommand::List { function, status, limit, before, output, target } => {
            let client = Client::new(&target)?;
            let mut query = vec![("tenant", client.tenant.clone()), ("limit", limit.to_string())];
            query.extend(function.map(|f| ("function", f)));
            query.extend(status.map(|s| ("status", s)));
            query.extend(before.map(|b| ("before", b)));
            let req = client.request(Method::GET, "/v1/invocations").query(&query);
            let v = client.json(req).await?;
            // The document holds `next_before`: no hint beside it.
            if output.json(&v)? {
                return Ok(());
            }
            print_list(&v);
            if let Some(next) = v["next_before"].as_str() {
                eprintln!("more: --before {next}");
            }
        }
        InvocationsCommand::Get { id, output: _, target } => {
            let client = Client::new(&target)?;
            let v = client.json(client.request(Method::GET, &format!("/v1/invocations/{id}"))).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        InvocationsCommand::Response { id, include, target } => {
            let client = Client::new(&target)?;
            let res =
                client.send(client.request(Method::GET, &format!("/v1/invocations/{id}/response"))).await?;
            // A stored response may have any status; only sluice's own errors are failures here.
            let mut res = if res.headers().contains_key("sluice-error") { check(res).await? } else { res };
            if include {
                eprintln!("HTTP {}", res.status());
                for (k, v) in res.headers() {
                    eprintln!("{k}: {}", v.to_str().unwrap_or("<binary>"));
                }
            }
            let mut out = std::io::stdout().lock();
            while let Some(chunk) = res.chunk().await? {
                out.write_all(&chunk)?;
            }
            out.flush()?;
        }
        InvocationsCommand::Retry { id, target } => {
            let client = Client::new(&target)?;
            let v = client.json(client.request(Method::POST, &format!("/v1/invocations/{id}/retry"))).await?;
            println!(
                "queued {} again ({})",
                v["id"].as_str().unwrap_or(&id),
                v["status"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

fn print_list(v: &Value) {
    println!(
        "{:<32} {:<20} {:>7} {:<9} {:>8} {:>6} {:>10}  CREATED",
        "ID", "FUNCTION", "VERSION", "STATUS", "ATTEMPTS", "CODE", "CPU"
    );
    for i in v["invocations"].as_array().into_iter().flatten() {
        println!(
            "{:<32} {:<20} {:>7} {:<9} {:>8} {:>6} {:>10}  {}",
            i["id"].as_str().unwrap_or_default(),
            i["function"].as_str().unwrap_or_default(),
            i["version"].as_i64().unwrap_or_default(),
            i["status"].as_str().unwrap_or_default(),
            i["attempts"].as_u64().unwrap_or_default(),
            i["status_code"].as_u64().map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
            i["cpu_ms"].as_f64().map(|ms| format!("{ms:.1}ms")).unwrap_or_else(|| "-".into()),
            i["created_at"].as_str().unwrap_or_default()
        );
    }
}
