//! `sluice functions list|delete`.

use reqwest::Method;

use crate::client::{Client, Target};
use crate::output::OutputArgs;

#[derive(clap::Subcommand, Debug)]
pub enum FunctionsCommand {
    /// List the tenant's functions.
    List {
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Delete a function and all its versions.
    Delete {
        name: String,
        #[command(flatten)]
        target: Target,
    },
}

pub async fn run(cmd: FunctionsCommand) -> anyhow::Result<()> {
    match cmd {
        FunctionsCommand::List { output, target } => {
            let client = Client::new(&target)?;
            let v = client.json(client.request(Method::GET, &client.tenant_path("/functions"))).await?;
            if output.json(&v)? {
                return Ok(());
            }
            let functions = v["functions"].as_array().cloned().unwrap_or_default();
            if functions.is_empty() {
                println!("no functions in tenant {}", client.tenant);
                return Ok(());
            }
            println!("{:<24} {:>7}  {:<24}  URL", "NAME", "VERSION", "UPDATED");
            for f in functions {
                println!(
                    "{:<24} {:>7}  {:<24}  {}",
                    f["name"].as_str().unwrap_or_default(),
                    f["latest_version"].as_i64().unwrap_or_default(),
                    f["updated_at"].as_str().unwrap_or_default(),
                    f["url"].as_str().unwrap_or_default()
                );
            }
        }
        FunctionsCommand::Delete { name, target } => {
            let client = Client::new(&target)?;
            client
                .json(client.request(Method::DELETE, &client.tenant_path(&format!("/functions/{name}"))))
                .await?;
            println!("deleted {}/{name}", client.tenant);
        }
    }
    Ok(())
}
