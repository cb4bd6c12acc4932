//! `sluice`: one binary that runs a node (`serve`) and talks to one (every other subcommand).
#![forbid(unsafe_code)]

mod alias;
mod client;
mod completions;
mod deploy;
mod functions;
mod invocations;
mod invoke;
mod keys;
mod logs;
mod new;
mod node;
mod output;
mod rollout;
mod schedules;
mod serve;
mod tenants;
mod top;
mod triggers;
mod versions;

use clap::{CommandFactory, Parser, Subcommand};

/// sluice: serverless WebAssembly functions on one binary.
#[derive(Parser)]
#[command(name = "sluice", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: serve functions over HTTP from an embedded store (or a shared PostgreSQL one).
    Serve(Box<serve::ServeArgs>),
    /// Upload a component and create a new version of a function.
    Deploy(deploy::DeployArgs),
    /// List or delete functions.
    #[command(subcommand)]
    Functions(functions::FunctionsCommand),
    /// List a function's versions or show one.
    #[command(subcommand)]
    Versions(versions::VersionsCommand),
    /// Name versions of a function, split calls between them, roll back by moving a name.
    #[command(subcommand)]
    Alias(alias::AliasCommand),
    /// Move an alias to a new version in steps, judged by its error rate; show or cancel it.
    Rollout(rollout::RolloutArgs),
    /// Fire a function on a cron expression, an interval or once: create, list, show, pause,
    /// resume, delete or backfill schedules.
    #[command(subcommand)]
    Schedules(schedules::SchedulesCommand),
    /// Turn a broker's messages (NATS JetStream, AMQP, MQTT) into durable async invocations:
    /// create, list, show, pause, resume or delete triggers.
    #[command(subcommand)]
    Triggers(triggers::TriggersCommand),
    /// Call a function, like curl would.
    Invoke(invoke::InvokeArgs),
    /// Show a function's (or one invocation's) guest log lines.
    Logs(logs::LogsArgs),
    /// Create or list tenants, show or set their limits and quotas, or show their usage.
    #[command(subcommand)]
    Tenants(tenants::TenantsCommand),
    /// Mint, list or revoke API keys.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Show what the node holds and does: code cache, artifacts, CPU lanes (needs an admin key).
    Node(node::NodeArgs),
    /// List the cluster's nodes with their health and load (needs an admin key).
    Nodes(node::NodeArgs),
    /// List invocations, show one or its stored response, or re-drive a dead one.
    #[command(subcommand)]
    Invocations(invocations::InvocationsCommand),
    /// A live dashboard of the tenant's functions and the node's load (q quits).
    Top(top::TopArgs),
    /// Create a Rust function project in ./NAME that builds to a deployable component.
    New(new::NewArgs),
    /// Print the shell completion script for bash, zsh, fish, elvish or powershell.
    Completions(completions::CompletionsArgs),
    /// A node's child process that compiles one component (not for people: `serve` runs it).
    #[command(hide = true)]
    CompileWorker {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() {
    // The TLS of `https://` node URLs (and of the node's own clients) uses ring, as the rest of
    // the tree; installed once, before any client is built.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::New(args) => new::run(args),
        Command::CompileWorker { args } => std::process::exit(sluice_node::compile_worker_main(&args)),
        Command::Completions(args) => {
            quiet_on_broken_pipe();
            completions::run(args, Cli::command())
        }
        other => client_runtime().and_then(|rt| {
            quiet_on_broken_pipe();
            rt.block_on(async move {
                match other {
                    Command::Deploy(a) => deploy::run(a).await,
                    Command::Functions(c) => functions::run(c).await,
                    Command::Versions(c) => versions::run(c).await,
                    Command::Alias(c) => alias::run(c).await,
                    Command::Rollout(a) => rollout::run(a).await,
                    Command::Schedules(c) => schedules::run(c).await,
                    Command::Triggers(c) => triggers::run(c).await,
                    Command::Invoke(a) => invoke::run(a).await,
                    Command::Logs(a) => logs::run(a).await,
                    Command::Tenants(c) => tenants::run(c).await,
                    Command::Keys(c) => keys::run(c).await,
                    Command::Invocations(c) => invocations::run(c).await,
                    Command::Node(a) => node::run(a).await,
                    Command::Nodes(a) => node::run_nodes(a).await,
                    Command::Top(a) => top::run(a).await,
                    Command::Serve(_)
                    | Command::New(_)
                    | Command::Completions(_)
                    | Command::CompileWorker { .. } => {
                        unreachable!("handled above")
                    }
                }
            })
        }),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// A client command whose reader went away (`sluice invocations list | head`) stops quietly, as
/// `ls | head` does, instead of panicking: Rust ignores SIGPIPE, so `println!` meets EPIPE and
/// panics with "failed printing to stdout". Not for `serve`, whose panics the supervisor reports.
fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info)
    }));
}

fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}
