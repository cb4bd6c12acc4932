//! `sluice tenants create NAME|list|limits NAME|quota NAME|usage NAME`.

use reqwest::Method;
use serde_json::json;
use sluice_core::units::{format_bytes, parse_bytes};

use crate::client::{Client, Target};
use crate::output::OutputArgs;

#[derive(clap::Subcommand, Debug)]
pub enum TenantsCommand {
    /// Create a tenant (needs an admin key).
    Create {
        /// Tenant name: 1-63 characters of a-z, 0-9 and '-'.
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// List the tenants this key sees (all of them for an admin key).
    List {
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: Target,
    },
    /// What a tenant keeps and uses: functions, versions, uploaded components, compiled
    /// artifacts, its async work, and its use of each usage quota.
    Usage {
        name: String,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Show a tenant's own limits, or set some of them (needs an admin key): its rate over all
    /// its functions and its usage quotas. Limits not named keep their value; a tenant without
    /// its own value takes the node's default (`serve --tenant-rate`, `--tenant-queued-max` ...).
    Limits {
        name: String,
        /// Calls per second, e.g. 100/s (also 6000/min).
        #[arg(long, value_parser = crate::deploy::parse_rate)]
        rate: Option<f64>,
        /// Calls allowed at once above the rate (default: the rate per second, rounded up).
        #[arg(long, requires = "rate")]
        burst: Option<u32>,
        /// Async invocations not yet finished (queued, running, waiting for a retry); beyond it
        /// async calls get 429.
        #[arg(long)]
        queued_max: Option<u64>,
        /// Bytes of those invocations' requests, e.g. 1GiB; beyond it async calls get 429.
        #[arg(long, value_parser = parse_bytes)]
        queued_bytes_max: Option<u64>,
        /// Bytes of uploaded components, e.g. 2GiB; beyond it uploads get 507.
        #[arg(long, value_parser = parse_bytes)]
        components_bytes_max: Option<u64>,
        /// Functions; a deploy of one more gets 507.
        #[arg(long)]
        functions_max: Option<u64>,
        /// Versions stored over all its functions; a deploy beyond it gets 507.
        #[arg(long)]
        versions_max: Option<u64>,
        /// Schedules; creating one more gets 507.
        #[arg(long)]
        schedules_max: Option<u64>,
        /// Remove all the tenant's own limits (applied before the values given with it): the
        /// node's defaults apply again.
        #[arg(long)]
        clear: bool,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Show or set a tenant's async quota (setting needs an admin key): reserved concurrency
    /// (calls that start whatever the load) and its weight in the fair share of the rest.
    Quota {
        name: String,
        /// Async calls that start whatever the nodes' load (0 removes the reservation).
        #[arg(long)]
        reserved: Option<u32>,
        /// Weight in the fair share of capacity beyond reservations (default 1).
        #[arg(long, requires = "reserved")]
        weight: Option<u32>,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: Target,
    },
}

pub async fn run(cmd: TenantsCommand) -> anyhow::Result<()> {
    match cmd {
        TenantsCommand::Create { name, target } => {
            let client = Client::new(&target)?;
            let req = client.request(Method::POST, "/v1/tenants").json(&json!({ "name": name }));
            let v = client.json(req).await?;
            println!("created tenant {}", v["name"].as_str().unwrap_or_default());
        }
        TenantsCommand::List { output, target } => {
            let client = Client::new(&target)?;
            let v = client.json(client.request(Method::GET, "/v1/tenants")).await?;
            if output.json(&v)? {
                return Ok(());
            }
            println!("{:<24} CREATED", "NAME");
            for t in v["tenants"].as_array().into_iter().flatten() {
                println!(
                    "{:<24} {}",
                    t["name"].as_str().unwrap_or_default(),
                    t["created_at"].as_str().unwrap_or_default()
                );
            }
        }
        TenantsCommand::Usage { name, output, target } => {
            let client = Client::new(&target)?;
            let v = client.json(client.request(Method::GET, &format!("/v1/tenants/{name}/usage"))).await?;
            if output.json(&v)? {
                return Ok(());
            }
            let n = |p: &str| v.pointer(p).and_then(|x| x.as_u64()).unwrap_or(0);
            println!("tenant     {name}");
            println!("functions  {} ({} versions)", n("/functions"), n("/versions"));
            println!("components {} stored, {}", n("/blobs"), format_bytes(n("/blob_bytes")));
            println!(
                "artifacts  {} on this node, {}",
                n("/artifacts/files"),
                format_bytes(n("/artifacts/bytes"))
            );
            println!(
                "async      reserved {}, weight {}; running {} ({} borrowed); queued {} ({} with a start window), {} later",
                n("/async/reserved"),
                n("/async/weight"),
                n("/async/running"),
                n("/async/borrowed"),
                n("/async/queued"),
                n("/async/queued_windowed"),
                n("/async/later"),
            );
            let waiting: Vec<String> = v
                .pointer("/async/waiting")
                .and_then(|w| w.as_object())
                .into_iter()
                .flatten()
                .map(|(class, reason)| format!("{class} work by {}", reason.as_str().unwrap_or_default()))
                .collect();
            if !waiting.is_empty() {
                println!("waiting    {}", waiting.join(", "));
            }
            let held: Vec<&str> = v
                .pointer("/async/downstream_held")
                .and_then(|w| w.as_array())
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str())
                .collect();
            if !held.is_empty() {
                println!("held       {} (a downstream is saturated)", held.join(", "));
            }
            let quota = |what: &str, field: &str, bytes: bool| {
                let (used, max) = (n(&format!("/quotas/{field}/used")), n(&format!("/quotas/{field}/max")));
                let shown = |x: u64| if bytes { format_bytes(x) } else { x.to_string() };
                let percent = if max == 0 { 100.0 } else { used as f64 * 100.0 / max as f64 };
                println!("  {what:<18} {} of {} ({percent:.0}%)", shown(used), shown(max));
            };
            println!("quotas");
            quota("queued calls", "queued", false);
            quota("queued bytes", "queued_bytes", true);
            quota("component bytes", "components_bytes", true);
            quota("functions", "functions", false);
            quota("versions", "versions", false);
            quota("schedules", "schedules", false);
            println!(
                "node       guests use {:.0}% of its cores (target {:.0}%)",
                v.pointer("/async/node_utilization").and_then(|x| x.as_f64()).unwrap_or(0.0) * 100.0,
                v.pointer("/async/node_utilization_target").and_then(|x| x.as_f64()).unwrap_or(0.0) * 100.0,
            );
        }
        TenantsCommand::Quota { name, reserved, weight, output, target } => {
            let client = Client::new(&target)?;
            let path = format!("/v1/tenants/{name}/quota");
            let v = match reserved {
                Some(reserved) => {
                    let body = json!({ "reserved": reserved, "weight": weight.unwrap_or(1) });
                    client.json(client.request(Method::PUT, &path).json(&body)).await?
                }
                None => client.json(client.request(Method::GET, &path)).await?,
            };
            if output.json(&v)? {
                return Ok(());
            }
            println!("tenant {name}: reserved {}, weight {}", v["reserved"], v["weight"]);
        }
        TenantsCommand::Limits {
            name,
            rate,
            burst,
            queued_max,
            queued_bytes_max,
            components_bytes_max,
            functions_max,
            versions_max,
            schedules_max,
            clear,
            output,
            target,
        } => {
            let client = Client::new(&target)?;
            let path = format!("/v1/tenants/{name}/limits");
            let changes = [
                ("queued_max", queued_max),
                ("queued_bytes_max", queued_bytes_max),
                ("components_bytes_max", components_bytes_max),
                ("functions_max", functions_max),
                ("versions_max", versions_max),
                ("schedules_max", schedules_max),
            ];
            let setting = clear || rate.is_some() || changes.iter().any(|(_, v)| v.is_some());
            let v = if setting {
                // PUT replaces every limit: start from the tenant's own (or none, with --clear)
                // and change what was named.
                let mut body =
                    if clear { json!({}) } else { client.json(client.request(Method::GET, &path)).await? };
                if let Some(rate) = rate {
                    body["rate_per_sec"] = json!(rate);
                    body["burst"] = json!(burst);
                }
                for (field, value) in changes {
                    if let Some(value) = value {
                        body[field] = json!(value);
                    }
                }
                client.json(client.request(Method::PUT, &path).json(&body)).await?
            } else {
                client.json(client.request(Method::GET, &path)).await?
            };
            if output.json(&v)? {
                return Ok(());
            }
            match v["rate_per_sec"].as_f64() {
                Some(r) => println!("tenant {name}: {r}/s, burst {}", v["burst"]),
                None => println!("tenant {name}: no own rate limit (the node default applies)"),
            }
            let own: Vec<String> = ["queued_max", "queued_bytes_max", "components_bytes_max"]
                .into_iter()
                .chain(["functions_max", "versions_max", "schedules_max"])
                .filter_map(|field| {
                    let n = v[field].as_u64()?;
                    Some(if field.contains("bytes") {
                        format!("{field} {}", format_bytes(n))
                    } else {
                        format!("{field} {n}")
                    })
                })
                .collect();
            if own.is_empty() {
                println!("tenant {name}: no own quotas (the node defaults apply)");
            } else {
                println!("tenant {name}: {}", own.join(", "));
            }
        }
    }
    Ok(())
}
