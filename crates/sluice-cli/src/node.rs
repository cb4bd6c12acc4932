//! `sluice node`: what the node holds and does; `sluice nodes`: the cluster (admin key).

use reqwest::Method;
use serde_json::Value;
use sluice_core::units::format_bytes;

use crate::client::{Client, Target};
use crate::output::OutputArgs;

#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub target: Target,
}

pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.target)?;
    let v = client.json(client.request(Method::GET, "/v1/node")).await?;
    if args.output.json(&v)? {
        return Ok(());
    }
    let n = |p: &str| v.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    let s = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or_default().to_string();
    println!("sluice {} (engine {})", s("/version"), s("/engine"));
    println!("functions    {} installed", n("/functions"));
    println!(
        "code cache   {} of {} loaded, {} of {}",
        n("/code_cache/entries"),
        n("/code_cache/entries_max"),
        format_bytes(n("/code_cache/bytes")),
        format_bytes(n("/code_cache/bytes_max"))
    );
    let loads = n("/code_cache/loads");
    println!(
        "             {} hits, {} misses, {} evictions; {} loads from disk (mean {:.2} ms, max {:.2} ms)",
        n("/code_cache/hits"),
        n("/code_cache/misses"),
        n("/code_cache/evictions"),
        loads,
        if loads == 0 { 0.0 } else { n("/code_cache/load_us_total") as f64 / loads as f64 / 1000.0 },
        n("/code_cache/load_us_max") as f64 / 1000.0
    );
    println!(
        "compiles     {} ({} ms in all), {} refused or failed",
        n("/code_cache/compiles"),
        n("/code_cache/compile_ms_total"),
        n("/code_cache/compile_failures")
    );
    println!("artifacts    {} files, {}", n("/artifacts/files"), format_bytes(n("/artifacts/bytes")));
    println!(
        "slow lane    {} running, {} waiting, {} moved since start (priority: {})",
        n("/lanes/slow_running"),
        n("/lanes/slow_waiting"),
        n("/lanes/demoted_total"),
        s("/lanes/slow_priority")
    );
    println!(
        "warm         {} idle of {} ({} of {}), {} reused / {} fresh calls, {} dropped full, {} expired",
        n("/warm/idle"),
        n("/warm/idle_max"),
        format_bytes(n("/warm/idle_bytes")),
        format_bytes(n("/warm/memory_max")),
        n("/warm/reused_total"),
        n("/warm/fresh_total"),
        n("/warm/dropped_full_total"),
        n("/warm/expired_total")
    );
    println!(
        "heavy        {} of {} slots in use (each keeps up to {} resident), {} of initial memory per version",
        n("/heavy/slots_in_use"),
        n("/heavy/slots_max"),
        format_bytes(n("/heavy/memory_keep_resident_bytes")),
        format_bytes(n("/heavy/memory_max"))
    );
    Ok(())
}

pub async fn run_nodes(args: NodeArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.target)?;
    let v = client.json(client.request(Method::GET, "/v1/nodes")).await?;
    if args.output.json(&v)? {
        return Ok(());
    }
    let nodes = v.get("nodes").and_then(Value::as_array).cloned().unwrap_or_default();
    println!(
        "{:<30} {:<8} {:<24} {:>9} {:>11} {:>10} {:>8}",
        "NODE", "HEALTH", "ADDRESS", "HEARTBEAT", "IN FLIGHT", "QUEUE LAG", "VERSION"
    );
    for n in &nodes {
        let s = |k: &str| n.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
        let u = |k: &str| n.get(k).and_then(Value::as_u64).unwrap_or(0);
        // The node that answered is marked.
        let this = if n.get("this").and_then(Value::as_bool) == Some(true) { " *" } else { "" };
        println!(
            "{:<30} {:<8} {:<24} {:>8}s {:>11} {:>8}ms {:>8}",
            format!("{}{this}", s("id")),
            s("health"),
            s("address"),
            n.get("heartbeat_age_ms").and_then(Value::as_i64).unwrap_or(0) / 1000,
            format!("{}/{}", u("in_flight"), u("slots")),
            u("queue_lag_ms"),
            s("version"),
        );
    }
    Ok(())
}
