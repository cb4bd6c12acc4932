//! `sluice alias set|list|delete`: name versions of a function, split calls between them, and
//! roll back by moving a name (no compile: the versions an alias names keep their artifacts).

use anyhow::Context;
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{Client, Target};
use crate::output::OutputArgs;

#[derive(clap::Subcommand, Debug)]
pub enum AliasCommand {
    /// Point an alias at a version (`prod 3`) or split its calls (`prod 3=90 4=10`). Calls go to
    /// /fn/TENANT/NAME@ALIAS/; `latest` is what /fn/TENANT/NAME/ calls. A caller sending the
    /// header sluice-routing-key always gets the same version of a split.
    Set {
        /// Function name.
        name: String,
        /// Alias name: a-z first, then a-z, 0-9 and '-'.
        alias: String,
        /// VERSION, or VERSION=WEIGHT for each version of a split (weights are shares: 90 and
        /// 10 send 90% and 10% of the calls).
        #[arg(required = true, num_args = 1..)]
        routes: Vec<String>,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: Target,
    },
    /// List a function's aliases.
    List {
        /// Function name.
        name: String,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Delete an alias (not `latest`).
    Delete {
        /// Function name.
        name: String,
        alias: String,
        #[command(flatten)]
        target: Target,
    },
}

pub async fn run(cmd: AliasCommand) -> anyhow::Result<()> {
    match cmd {
        AliasCommand::Set { name, alias, routes, output, target } => {
            let routes = sluice_core::alias::parse_routes(&routes)
                .map_err(anyhow::Error::msg)
                .context("bad routes")?;
            let client = Client::new(&target)?;
            let path = client.tenant_path(&format!("/functions/{name}/aliases/{alias}"));
            let v =
                client.json(client.request(Method::PUT, &path).json(&json!({ "routes": routes }))).await?;
            if output.json(&v)? {
                return Ok(());
            }
            println!("{name}@{} -> {}\n{}", v["name"].as_str().unwrap_or_default(), routes_text(&v), url(&v));
        }
        AliasCommand::List { name, output, target } => {
            let client = Client::new(&target)?;
            let path = client.tenant_path(&format!("/functions/{name}/aliases"));
            let v = client.json(client.request(Method::GET, &path)).await?;
            if output.json(&v)? {
                return Ok(());
            }
            println!("{:<16}  {:<20}  {:<24}  URL", "ALIAS", "VERSIONS", "UPDATED");
            for a in v["aliases"].as_array().into_iter().flatten() {
                println!(
                    "{:<16}  {:<20}  {:<24}  {}",
                    a["name"].as_str().unwrap_or_default(),
                    routes_text(a),
                    a["updated_at"].as_str().unwrap_or_default(),
                    url(a)
                );
            }
        }
        AliasCommand::Delete { name, alias, target } => {
            let client = Client::new(&target)?;
            let path = client.tenant_path(&format!("/functions/{name}/aliases/{alias}"));
            client.json(client.request(Method::DELETE, &path)).await?;
            println!("deleted alias {alias} of {}/{name}", client.tenant);
        }
    }
    Ok(())
}

/// `3` for a single version, `4=10% 3=90%` for a split.
fn routes_text(alias: &Value) -> String {
    let routes = alias["routes"].as_array().cloned().unwrap_or_default();
    if let [only] = routes.as_slice() {
        return only["version"].to_string();
    }
    let total: u64 = routes.iter().filter_map(|r| r["weight"].as_u64()).sum();
    routes
        .iter()
        .map(|r| {
            let weight = r["weight"].as_u64().unwrap_or_default();
            format!("{}={}%", r["version"], percent(weight, total))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `weight` of `total` as a percent, to a tenth where it is not whole (`5` of `9`: `55.6`).
fn percent(weight: u64, total: u64) -> String {
    let tenths = (weight * 1000 + total / 2) / total.max(1);
    if tenths.is_multiple_of(10) {
        (tenths / 10).to_string()
    } else {
        format!("{}.{}", tenths / 10, tenths % 10)
    }
}

fn url(alias: &Value) -> &str {
    alias["url"].as_str().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_shown_to_a_tenth_and_whole_ones_without() {
        let alias = |w: &[(i64, u64)]| serde_json::json!({ "routes": w.iter().map(|(v, w)| serde_json::json!({"version": v, "weight": w})).collect::<Vec<_>>() });
        assert_eq!(routes_text(&alias(&[(3, 1)])), "3");
        assert_eq!(routes_text(&alias(&[(4, 10), (3, 90)])), "4=10% 3=90%");
        assert_eq!(routes_text(&alias(&[(2, 5), (1, 4)])), "2=55.6% 1=44.4%");
        assert_eq!(routes_text(&alias(&[(3, 1), (2, 1), (1, 1)])), "3=33.3% 2=33.3% 1=33.3%");
    }
}
