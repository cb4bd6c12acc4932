//! `sluice versions list|show`: a function's immutable versions and the aliases naming them.

use reqwest::Method;
use serde_json::Value;

use crate::client::{Client, Target};
use crate::output::OutputArgs;

#[derive(clap::Subcommand, Debug)]
pub enum VersionsCommand {
    /// List a function's versions, newest first, with the aliases that name each.
    List {
        /// Function name.
        name: String,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Show one version: its component, configuration and aliases.
    Show {
        /// Function name.
        name: String,
        /// Version number.
        version: i64,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: Target,
    },
}

pub async fn run(cmd: VersionsCommand) -> anyhow::Result<()> {
    match cmd {
        VersionsCommand::List { name, output, target } => {
            let client = Client::new(&target)?;
            let path = client.tenant_path(&format!("/functions/{name}/versions"));
            let v = client.json(client.request(Method::GET, &path)).await?;
            if output.json(&v)? {
                return Ok(());
            }
            println!(
                "{:>7}  {:<24}  {:<12}  {:>10}  {:<16}  CONFIG",
                "VERSION", "CREATED", "DIGEST", "SIZE", "ALIASES"
            );
            for version in v["versions"].as_array().into_iter().flatten() {
                println!(
                    "{:>7}  {:<24}  {:<12}  {:>10}  {:<16}  {}",
                    version["version"].as_i64().unwrap_or_default(),
                    version["created_at"].as_str().unwrap_or_default(),
                    short_digest(&version["digest"]),
                    sluice_core::units::format_bytes(version["size"].as_u64().unwrap_or_default()),
                    aliases(&version["aliases"]),
                    version["config"].as_str().unwrap_or_default(),
                );
            }
        }
        VersionsCommand::Show { name, version, output, target } => {
            let client = Client::new(&target)?;
            let path = client.tenant_path(&format!("/functions/{name}/versions/{version}"));
            let v = client.json(client.request(Method::GET, &path)).await?;
            if output.json(&v)? {
                return Ok(());
            }
            println!("{}/{} version {}", v["tenant"].as_str().unwrap_or_default(), name, v["version"]);
            println!("created   {}", v["created_at"].as_str().unwrap_or_default());
            println!(
                "component {} ({})",
                v["digest"].as_str().unwrap_or_default(),
                sluice_core::units::format_bytes(v["size"].as_u64().unwrap_or_default())
            );
            println!("aliases   {}", aliases(&v["aliases"]));
            println!(
                "url       {}",
                v["url"].as_str().unwrap_or_default().trim_end_matches('/').to_string()
                    + "@"
                    + &version.to_string()
                    + "/"
            );
            println!(
                "config    {}",
                serde_json::to_string_pretty(&v["config"])?.replace('\n', "\n          ")
            );
            let secrets: Vec<&str> =
                v["secrets"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            if !secrets.is_empty() {
                println!("secrets   {}", secrets.join(", "));
            }
        }
    }
    Ok(())
}

/// The first 12 hex digits: enough to tell versions apart in a table.
fn short_digest(v: &Value) -> String {
    v.as_str().unwrap_or_default().chars().take(12).collect()
}

fn aliases(v: &Value) -> String {
    let names: Vec<&str> = v.as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if names.is_empty() { "-".to_string() } else { names.join(",") }
}
