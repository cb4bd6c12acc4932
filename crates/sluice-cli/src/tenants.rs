//! `sluice tenants create NAME|list|limits NAME|usage NAME`.

use reqwest::Method;
use serde_json::json;
use sluice_core::units::format_bytes;

use crate::client::{Client, Target};

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
        target: Target,
    },
    /// What a tenant keeps: functions, versions, uploaded components and compiled artifacts.
    Usage {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Set a tenant's rate limit over all its functions, or clear it (needs an admin key).
    Limits {
        name: String,
        /// Calls per second, e.g. 100/s (also 6000/min).
        #[arg(long, value_parser = crate::deploy::parse_rate, required_unless_present = "clear")]
        rate: Option<f64>,
        /// Calls allowed at once above the rate (default: the rate per second, rounded up).
        #[arg(long, requires = "rate")]
        burst: Option<u32>,
        /// Remove the tenant's own limit; the node default (serve --tenant-rate) applies again.
        #[arg(long, conflicts_with = "rate")]
        clear: bool,
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
        TenantsCommand::List { target } => {
            let client = Client::new(&target)?;
            let v = client.json(client.request(Method::GET, "/v1/tenants")).await?;
            println!("{:<24} CREATED", "NAME");
            for t in v["tenants"].as_array().into_iter().flatten() {
                println!(
                    "{:<24} {}",
                    t["name"].as_str().unwrap_or_default(),
                    t["created_at"].as_str().unwrap_or_default()
                );
            }
        }
        TenantsCommand::Usage { name, target } => {
            let client = Client::new(&target)?;
            let v = client.json(client.request(Method::GET, &format!("/v1/tenants/{name}/usage"))).await?;
            let n = |p: &str| v.pointer(p).and_then(|x| x.as_u64()).unwrap_or(0);
            println!("tenant     {name}");
            println!("functions  {} ({} versions)", n("/functions"), n("/versions"));
            println!("components {} stored, {}", n("/blobs"), format_bytes(n("/blob_bytes")));
            println!(
                "artifacts  {} on this node, {}",
                n("/artifacts/files"),
                format_bytes(n("/artifacts/bytes"))
            );
        }
        TenantsCommand::Limits { name, rate, burst, clear, target } => {
            let client = Client::new(&target)?;
            let body = json!({ "rate_per_sec": if clear { None } else { rate }, "burst": burst });
            let req = client.request(Method::PUT, &format!("/v1/tenants/{name}/limits")).json(&body);
            let v = client.json(req).await?;
            match v["rate_per_sec"].as_f64() {
                Some(r) => println!("tenant {name}: {r}/s, burst {}", v["burst"]),
                None => println!("tenant {name}: no own limit (the node default applies)"),
            }
        }
    }
    Ok(())
}
