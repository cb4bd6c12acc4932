//! `sluice schedules create|list|show|pause|resume|delete|backfill`: a tenant's schedules, each
//! of which enqueues a durable async invocation of a function at its occurrences. The nodes fire
//! them; this only manages them.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use sluice_core::units::{format_duration, parse_duration};

use crate::client::{Client, Target};
use crate::output::OutputArgs;

#[derive(clap::Subcommand, Debug)]
pub enum SchedulesCommand {
    /// Create a schedule: exactly one of --cron, --every and --at says when it fires.
    Create(Box<CreateArgs>),
    /// List the tenant's schedules with their next fire time.
    List {
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Show a schedule: its timing, policies, counts and next fire times.
    Show {
        name: String,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Pause a schedule: nothing fires until it is resumed.
    Pause {
        name: String,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Resume a paused schedule from its next occurrence (what fell in the pause is skipped).
    Resume {
        name: String,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Delete a schedule (the invocations it enqueued stay).
    Delete {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Enqueue every occurrence in a range now (at most 1000), whatever the policies; ones that
    /// fired in the last 24 h are not enqueued again.
    Backfill {
        name: String,
        /// RFC 3339 start of the range (inclusive).
        #[arg(long)]
        from: String,
        /// RFC 3339 end of the range (inclusive).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Schedule name (a-z, 0-9 and '-'), unique in the tenant.
    name: String,
    /// The function each occurrence invokes (asynchronously, through the durable queue).
    #[arg(long)]
    function: String,
    /// The alias whose version runs, chosen at each enqueue.
    #[arg(long, default_value = "latest")]
    alias: String,
    /// A cron expression, seconds optional: '*/5 * * * *' (minute first) or
    /// '*/10 * * * * *' (second first).
    #[arg(long, conflicts_with_all = ["every", "at"], required_unless_present_any = ["every", "at"])]
    cron: Option<String>,
    /// The IANA time zone the cron expression is read in, with its DST changes (default UTC).
    #[arg(long, requires = "cron")]
    tz: Option<String>,
    /// Fire every this long (1s at least), at multiples of it since the Unix epoch: 30s, 5m.
    #[arg(long, value_parser = parse_duration, conflicts_with = "at")]
    every: Option<Duration>,
    /// Fire once, at this RFC 3339 time: 2026-12-24T18:00:00+01:00.
    #[arg(long)]
    at: Option<String>,
    /// The invocations' start window (default none): each may start up to this long after its
    /// occurrence, when the cluster has room (time-shifting), e.g. 10m.
    #[arg(long, value_parser = parse_duration)]
    flex: Option<Duration>,
    /// When an occurrence is due while the previous invocation has not finished: skip it,
    /// buffer-one (run it once the previous finished; at most one waits) or allow.
    #[arg(long, default_value = "skip")]
    overlap: String,
    /// Occurrences missed while no node ran: latest (enqueue the most recent one, however
    /// late), all (each, the most recent 100 at most) or none (only an occurrence on time,
    /// less than `serve --schedule-missed-after` late, fires).
    #[arg(long, default_value = "latest")]
    catchup: String,
    /// The path (and query) below the function each invocation's request is sent to (POST).
    #[arg(long, default_value = "/")]
    path: String,
    /// The request body each invocation gets: text, or @FILE.
    #[arg(long)]
    body: Option<String>,
    /// A request header, NAME:VALUE (repeatable).
    #[arg(long = "header", value_name = "NAME:VALUE")]
    headers: Vec<String>,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    target: Target,
}

pub async fn run(command: SchedulesCommand) -> anyhow::Result<()> {
    match command {
        SchedulesCommand::Create(args) => {
            let CreateArgs {
                name,
                function,
                alias,
                cron,
                tz,
                every,
                at,
                flex,
                overlap,
                catchup,
                path,
                body,
                headers,
                output,
                target,
            } = *args;
            let body = match body.as_deref() {
                None => String::new(),
                Some(b) => match b.strip_prefix('@') {
                    Some(path) => {
                        let bytes = std::fs::read(path)
                            .map_err(|e| anyhow::anyhow!("reading --body @{path}: {e}"))?;
                        String::from_utf8(bytes).map_err(|_| {
                            anyhow::anyhow!("--body @{path}: a schedule's body is text (UTF-8)")
                        })?
                    }
                    None => b.to_string(),
                },
            };
            let headers = headers
                .iter()
                .map(|h| {
                    let (k, v) =
                        h.split_once(':').ok_or_else(|| anyhow::anyhow!("--header {h:?}: use NAME:VALUE"))?;
                    Ok(json!([k.trim(), v.trim()]))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            let mut req = json!({
                "name": name,
                "function": function,
                "alias": alias,
                "flex_ms": flex.map(ms).unwrap_or(0),
                "overlap": overlap,
                "catchup": catchup,
                "path": path,
                "headers": headers,
                "body": body,
            });
            if let Some(cron) = cron {
                req["cron"] = json!(cron);
            }
            if let Some(tz) = tz {
                req["tz"] = json!(tz);
            }
            if let Some(every) = every {
                req["every_ms"] = json!(ms(every));
            }
            if let Some(at) = at {
                req["at"] = json!(at);
            }
            let client = Client::new(&target)?;
            let v = client
                .json(client.request(Method::POST, &client.tenant_path("/schedules")).json(&req))
                .await?;
            if output.json(&v)? {
                return Ok(());
            }
            print!("created schedule {name}\n{}", show_text(&v));
        }
        SchedulesCommand::List { output, target } => {
            let client = Client::new(&target)?;
            let v = client.json(client.request(Method::GET, &client.tenant_path("/schedules"))).await?;
            if output.json(&v)? {
                return Ok(());
            }
            print!("{}", list_text(&v));
        }
        SchedulesCommand::Show { name, output, target } => {
            let client = Client::new(&target)?;
            let path = client.tenant_path(&format!("/schedules/{name}"));
            let v = client.json(client.request(Method::GET, &path)).await?;
            if output.json(&v)? {
                return Ok(());
            }
            print!("{}", show_text(&v));
        }
        SchedulesCommand::Pause { name, output, target } => change(&name, "pause", output, target).await?,
        SchedulesCommand::Resume { name, output, target } => change(&name, "resume", output, target).await?,
        SchedulesCommand::Delete { name, target } => {
            let client = Client::new(&target)?;
            let path = client.tenant_path(&format!("/schedules/{name}"));
            client.json(client.request(Method::DELETE, &path)).await?;
            println!("deleted schedule {name} of tenant {}", client.tenant);
        }
        SchedulesCommand::Backfill { name, from, to, output, target } => {
            let client = Client::new(&target)?;
            let path = client.tenant_path(&format!("/schedules/{name}/backfill"));
            let v = client
                .json(client.request(Method::POST, &path).json(&json!({"from": from, "to": to})))
                .await?;
            if output.json(&v)? {
                return Ok(());
            }
            println!(
                "backfilled {name}: {} occurrences, {} enqueued (the others had fired already)",
                v["occurrences"], v["enqueued"]
            );
        }
    }
    Ok(())
}

async fn change(name: &str, action: &str, output: OutputArgs, target: Target) -> anyhow::Result<()> {
    let client = Client::new(&target)?;
    let path = client.tenant_path(&format!("/schedules/{name}/{action}"));
    let v = client.json(client.request(Method::POST, &path)).await?;
    if output.json(&v)? {
        return Ok(());
    }
    print!("{}", show_text(&v));
    Ok(())
}

/// `cron '*/5 * * * *' Europe/Berlin`, `every 30s`, `at 2026-…`.
fn timing(v: &Value) -> String {
    if let Some(cron) = v["cron"].as_str() {
        return format!("cron '{cron}' {}", v["tz"].as_str().unwrap_or("UTC"));
    }
    if let Some(ms) = v["every_ms"].as_u64() {
        return format!("every {}", format_duration(Duration::from_millis(ms)));
    }
    format!("at {}", v["at"].as_str().unwrap_or("?"))
}

fn state(v: &Value) -> &'static str {
    if v["paused"].as_bool().unwrap_or(false) {
        "paused"
    } else if v["next_fires"].as_array().is_none_or(|a| a.is_empty()) {
        "done"
    } else {
        "active"
    }
}

/// What `schedules list` prints.
fn list_text(v: &Value) -> String {
    let schedules = v["schedules"].as_array().cloned().unwrap_or_default();
    if schedules.is_empty() {
        return "no schedules (create one: sluice schedules create NAME --function F --every 1m)\n".into();
    }
    let mut out = format!(
        "{:<20}  {:<20}  {:<32}  {:<7}  {:<24}  {:>6}  {:>7}\n",
        "NAME", "FUNCTION", "WHEN", "STATE", "NEXT FIRE", "FIRES", "SKIPPED"
    );
    for s in &schedules {
        out += &format!(
            "{:<20}  {:<20}  {:<32}  {:<7}  {:<24}  {:>6}  {:>7}\n",
            s["name"].as_str().unwrap_or_default(),
            format!(
                "{}@{}",
                s["function"].as_str().unwrap_or_default(),
                s["alias"].as_str().unwrap_or_default()
            ),
            timing(s),
            state(s),
            s["next_fires"][0].as_str().unwrap_or("-"),
            s["fires"].as_u64().unwrap_or_default(),
            s["skipped"].as_u64().unwrap_or_default(),
        );
    }
    out
}

/// What `schedules show` (and create, pause, resume) prints.
fn show_text(v: &Value) -> String {
    let text = |k: &str| v[k].as_str().unwrap_or("-").to_string();
    let flex = v["flex_ms"].as_u64().unwrap_or(0);
    let mut out =
        format!("{}: {}@{}  {}  {}\n", text("name"), text("function"), text("alias"), timing(v), state(v));
    out += &format!(
        "overlap {}, catch-up {}, flex {}\n",
        text("overlap"),
        text("catchup"),
        if flex == 0 { "none".to_string() } else { format_duration(Duration::from_millis(flex)) }
    );
    out += &format!(
        "fired {} times, skipped {}; last fired for {} ({})\n",
        v["fires"],
        v["skipped"],
        text("last_fired_for"),
        text("last_invocation")
    );
    if let Some(b) = v["buffered_for"].as_str() {
        out += &format!("buffered: {b} (waits for the previous invocation)\n");
    }
    if let Some(e) = v["last_error"].as_str() {
        out += &format!("last error: {e}\n");
    }
    let next: Vec<&str> =
        v["next_fires"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if next.is_empty() {
        out += "next fires: none\n";
    } else {
        out += "next fires:\n";
        for t in next {
            if Some(t) == v["last_fired_for"].as_str() {
                // `serve --schedule-fire-ahead`: stored already, runnable at its time.
                out += &format!("  {t}  (fired ahead: queued until then)\n");
            } else {
                out += &format!("  {t}\n");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_and_list_read_the_answer() {
        let v = json!({
            "name": "nightly", "function": "report", "alias": "latest", "cron": "0 3 * * *",
            "tz": "Europe/Berlin", "flex_ms": 600000, "overlap": "skip", "catchup": "latest",
            "paused": false, "next_fires": ["2026-12-08T02:00:00.000Z"], "fires": 3, "skipped": 1,
            "last_fired_for": "2026-12-07T02:00:00.000Z", "last_invocation": "abc",
        });
        let shown = show_text(&v);
        assert!(
            shown.starts_with("nightly: report@latest  cron '0 3 * * *' Europe/Berlin  active\n"),
            "{shown}"
        );
        assert!(shown.contains("overlap skip, catch-up latest, flex 10m"), "{shown}");
        assert!(shown.contains("  2026-12-08T02:00:00.000Z\n"), "{shown}");
        let listed = list_text(&json!({"schedules": [v]}));
        assert!(listed.lines().nth(1).unwrap().starts_with("nightly"), "{listed}");
        assert_eq!(state(&json!({"paused": false, "next_fires": []})), "done");
    }
}
