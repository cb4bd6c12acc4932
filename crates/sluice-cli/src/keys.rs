//! `sluice keys create --tenant T --scope S...|list|revoke ID`.
//!
//! `create` prints the new key alone on stdout (so `KEY=$(sluice keys create ...)` works) and
//! what it is on stderr: the node shows a key only once.

use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{Client, Target};
use crate::output::OutputArgs;

#[derive(clap::Subcommand, Debug)]
pub enum KeysCommand {
    /// Mint an API key for the tenant given with --tenant (needs an admin key).
    Create {
        /// What the key may do in the tenant (repeatable).
        #[arg(long = "scope", required = true, value_parser = clap::builder::PossibleValuesParser::new(
            sluice_core::Scope::TENANT.map(|s| s.as_str())
        ))]
        scopes: Vec<String>,
        /// Limit the key to one alias of the tenant's functions: it may call NAME@ALIAS only
        /// (not NAME, NAME@VERSION or a pinned version). Default: any.
        #[arg(long)]
        alias: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// List the keys of the tenant given with --tenant, revoked ones included.
    List {
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Revoke a key by its id; it stops working at once (needs an admin key).
    Revoke {
        /// Key id, as `keys list` shows it.
        id: String,
        #[command(flatten)]
        target: Target,
    },
}

pub async fn run(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Create { scopes, alias, target } => {
            let client = Client::new(&target)?;
            let req = client
                .request(Method::POST, &client.tenant_path("/keys"))
                .json(&json!({ "scopes": scopes, "alias": alias }));
            let v = client.json(req).await?;
            let only = v["alias"].as_str().map(|a| format!(", for alias {a} only")).unwrap_or_default();
            eprintln!(
                "created key {} for tenant {} with scopes {}{only} (it is shown only this once):",
                v["id"].as_str().unwrap_or_default(),
                v["tenant"].as_str().unwrap_or_default(),
                scope_list(&v)
            );
            println!("{}", v["key"].as_str().unwrap_or_default());
        }
        KeysCommand::List { output, target } => {
            let client = Client::new(&target)?;
            let v = client.json(client.request(Method::GET, &client.tenant_path("/keys"))).await?;
            if output.json(&v)? {
                return Ok(());
            }
            println!("{:<22} {:<22} {:<26} STATE", "ID", "SCOPES", "CREATED");
            for k in v["keys"].as_array().into_iter().flatten() {
                println!(
                    "{:<22} {:<22} {:<26} {}",
                    k["id"].as_str().unwrap_or_default(),
                    scope_list(k),
                    k["created_at"].as_str().unwrap_or_default(),
                    if k["revoked"].as_bool() == Some(true) { "revoked" } else { "active" }
                );
            }
        }
        KeysCommand::Revoke { id, target } => {
            let client = Client::new(&target)?;
            client.json(client.request(Method::DELETE, &format!("/v1/keys/{id}"))).await?;
            println!("revoked {id}");
        }
    }
    Ok(())
}

fn scope_list(key: &Value) -> String {
    let scopes: Vec<&str> =
        key["scopes"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    scopes.join(",")
}
