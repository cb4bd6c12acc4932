//! The CLI's connection to a node: `SLUICE_URL` and `SLUICE_TOKEN`, falling back to
//! `http://127.0.0.1:8080` and the key in `./.sluice/admin.token`.

use anyhow::{Context, anyhow, bail};
use reqwest::{Method, RequestBuilder, Response};
use serde_json::Value;

pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";
pub const DEFAULT_TOKEN_FILE: &str = "./.sluice/admin.token";

/// Where and as whom the CLI talks to a node.
#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// Base URL of the node.
    #[arg(long, env = "SLUICE_URL", default_value = DEFAULT_URL, global = true)]
    pub url: String,
    /// API key; default: the contents of ./.sluice/admin.token.
    #[arg(long, env = "SLUICE_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Tenant the command acts on.
    #[arg(long, default_value = "default", global = true)]
    pub tenant: String,
    /// For an `https://` URL: also trust the CA certificates in this PEM file (a node's
    /// self-signed or private CA certificate), beside the system's.
    #[arg(long, env = "SLUICE_CA_CERT", global = true)]
    pub ca_cert: Option<std::path::PathBuf>,
}

pub struct Client {
    pub http: reqwest::Client,
    pub base: String,
    token: Option<String>,
    pub tenant: String,
}

impl Client {
    pub fn new(target: &Target) -> anyhow::Result<Self> {
        let token = match &target.token {
            Some(t) => Some(t.trim().to_string()),
            None => std::fs::read_to_string(DEFAULT_TOKEN_FILE).ok().map(|t| t.trim().to_string()),
        };
        let mut builder = reqwest::Client::builder();
        if let Some(path) = &target.ca_cert {
            let pem = std::fs::read(path).with_context(|| format!("reading --ca-cert {}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("--ca-cert {}: not PEM certificates", path.display()))?;
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder.build()?;
        Ok(Self {
            http,
            base: target.url.trim_end_matches('/').to_string(),
            token,
            tenant: target.tenant.clone(),
        })
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.request_at(&self.base, method, path)
    }

    /// A request to another node of the cluster (at `base`, e.g. `http://10.0.0.2:8080`) with
    /// the same key.
    pub fn request_at(&self, base: &str, method: Method, path: &str) -> RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", base.trim_end_matches('/')));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Sends a control-API request and returns its JSON, turning a sluice error into a message.
    pub async fn json(&self, req: RequestBuilder) -> anyhow::Result<Value> {
        let res = self.send(req).await?;
        let res = check(res).await?;
        if res.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        res.json().await.context("reading the node's JSON answer")
    }

    pub async fn send(&self, req: RequestBuilder) -> anyhow::Result<Response> {
        req.send().await.map_err(|e| {
            // reqwest's message is the outermost layer only: look through the chain for the
            // TLS verifier's reason, and say what to do about it.
            let chain = format!("{:#}", anyhow::Error::new(e));
            let hint = if chain.contains("certificate") {
                "the node's TLS certificate is not trusted: pass --ca-cert FILE (or SLUICE_CA_CERT) \
                 with its CA, or with the certificate itself if it is self-signed (not a CA: \
                 basicConstraints CA:FALSE)"
            } else {
                "is `sluice serve` running?"
            };
            anyhow!("cannot reach the node at {} ({hint}): {chain}", self.base)
        })
    }

    pub fn tenant_path(&self, rest: &str) -> String {
        format!("/v1/tenants/{}{rest}", self.tenant)
    }
}

/// Passes a success through; turns a sluice JSON error into an error with its message and code.
pub async fn check(res: Response) -> anyhow::Result<Response> {
    if res.status().is_success() {
        return Ok(res);
    }
    let status = res.status();
    let text = res.text().await.unwrap_or_default();
    match serde_json::from_str::<Value>(&text) {
        Ok(v) if v["error"]["message"].is_string() => Err(anyhow!(
            "{} ({}, HTTP {})",
            v["error"]["message"].as_str().unwrap_or(""),
            v["error"]["code"].as_str().unwrap_or(""),
            status.as_u16()
        )),
        _ if text.is_empty() => bail!("HTTP {status}"),
        _ => bail!("HTTP {status}: {text}"),
    }
}
