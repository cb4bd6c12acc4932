//! `sluice invoke NAME [PATH]`: call a function like curl would; the body goes to stdout.

use std::io::Write;

use anyhow::{Context, bail};
use reqwest::Method;

use crate::client::{Client, Target};

#[derive(clap::Args, Debug)]
pub struct InvokeArgs {
    /// Function name.
    pub name: String,
    /// Path below the function, e.g. /users?id=1.
    #[arg(default_value = "/")]
    pub path: String,
    /// HTTP method.
    #[arg(short = 'X', long = "request", default_value = "GET")]
    pub method: String,
    /// Request header (repeatable), 'K: V'.
    #[arg(short = 'H', long = "header")]
    pub headers: Vec<String>,
    /// Request body; @FILE reads it from a file. Implies POST unless -X is given.
    #[arg(short = 'd', long = "data")]
    pub data: Option<String>,
    /// Print the response status and headers to stderr.
    #[arg(short = 'i', long)]
    pub include: bool,
    #[command(flatten)]
    pub target: Target,
}

pub async fn run(args: InvokeArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.target)?;
    let method = if args.data.is_some() && args.method == "GET" {
        "POST"
    } else {
        args.method.as_str()
    };
    let method = Method::from_bytes(method.as_bytes()).context("invalid method")?;
    let path = if args.path.starts_with('/') {
        args.path.clone()
    } else {
        format!("/{}", args.path)
    };
    let mut req = client.request(
        method,
        &format!("/fn/{}/{}{path}", client.tenant, args.name),
    );
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .with_context(|| format!("header {h:?} is not 'K: V'"))?;
        req = req.header(k.trim(), v.trim());
    }
    if let Some(data) = args.data {
        let body = match data.strip_prefix('@') {
            Some(file) => std::fs::read(file).with_context(|| format!("reading {file}"))?,
            None => data.into_bytes(),
        };
        req = req.body(body);
    }
    let res = client.send(req).await?;
    let status = res.status();
    let platform_error = res.headers().get("sluice-error").is_some();
    if args.include {
        eprintln!("HTTP {status}");
        for (k, v) in res.headers() {
            eprintln!("{k}: {}", v.to_str().unwrap_or("<binary>"));
        }
    }
    if platform_error {
        crate::client::check(res).await?;
        bail!("HTTP {status}");
    }
    let mut out = std::io::stdout().lock();
    let mut res = res;
    while let Some(chunk) = res.chunk().await? {
        out.write_all(&chunk)?;
    }
    out.flush()?;
    Ok(())
}
