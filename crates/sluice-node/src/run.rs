//! A node's life, top to bottom: config → store → runtime → gateway → background tasks → serve →
//! shutdown. [`run`] is the one place that builds a node from its parts and starts anything; the
//! CLI only turns flags into a [`Config`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sluice_gateway::recorder::Recorder;
use sluice_gateway::tls::{Tls, TlsFiles};
use sluice_gateway::{Node, NodeConfig, Server};
use sluice_runtime::{Runtime, RuntimeConfig};
use sluice_store::{Engine, PostgresStore, STORE_CALL_TIMEOUT, SqlStore, SqliteStore, Store, Timed};

use crate::bootstrap::{ADMIN_TOKEN_FILE, bootstrap};
use crate::tasks::{Tasks, Upkeep};

/// Everything a node is made of, checked (`sluice serve` maps its flags into it).
pub struct Config {
    /// Address of the HTTP front; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Serve HTTPS with this certificate and key (reloaded when the files change or on SIGHUP).
    pub tls: Option<TlsFiles>,
    /// HTTP worker threads, each with its own runtime and socket.
    pub workers: usize,
    /// `sqlite` (the embedded store in the data directory) or a PostgreSQL URL.
    pub store: String,
    /// The gateway's settings (its `data_dir` holds the store, the artifacts and admin.token).
    pub node: NodeConfig,
    pub runtime: RuntimeConfig,
    pub upkeep: Upkeep,
    /// Functions with their own series in `/metrics`; `None`: nothing is counted.
    pub metrics_functions_max: Option<usize>,
    /// Also serve `GET /metrics` without a key on this address.
    pub metrics_listen: Option<SocketAddr>,
    /// Export OpenTelemetry traces over OTLP/HTTP to this collector.
    pub otlp_endpoint: Option<String>,
    /// For tests of the supervisor: a background task that panics this long after start.
    pub test_panic_task_after: Option<Duration>,
}

/// Runs a node until SIGINT or SIGTERM (or until one of its background tasks dies), then stops
/// it in order.
pub fn run(config: Config) -> anyhow::Result<()> {
    if let Some(series_max) = config.metrics_functions_max {
        // Before anything makes its handles (the store's writer makes its own at open).
        sluice_gateway::metrics::install(series_max);
    }
    // The node's runtimes besides the per-core HTTP workers (`Server`) and the slow lane (the
    // runtime's): the control runtime runs the scheduler, the store's queue writer and the
    // heartbeats; the API runtime the control plane's handlers (`/v1`, `/metrics`), so no API
    // request, however slow, holds a thread the heartbeats need.
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(CONTROL_THREADS)
        .thread_name("sluice-control")
        .enable_all()
        .build()?;
    let api = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(API_THREADS)
        .thread_name("sluice-api")
        .enable_all()
        .build()?;
    let result = control.block_on(serve(config, api.handle().clone()));
    // Requests the API runtime still runs are cut short here; the HTTP workers stopped first.
    api.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Threads of the control runtime (scheduler, queue writer, heartbeats, upkeep).
const CONTROL_THREADS: usize = 2;
/// Threads of the API runtime (`/v1` and `/metrics` handlers). One: the API is bounded per key,
/// tenant and node (`--api-*`), and its handlers mostly wait for the store.
const API_THREADS: usize = 1;

async fn serve(config: Config, api: tokio::runtime::Handle) -> anyhow::Result<()> {
    let Config { listen, workers, mut node, runtime, upkeep, .. } = config;
    // Read before anything starts: a certificate that cannot serve fails the start.
    let tls = match &config.tls {
        Some(files) => Some(Arc::new(Tls::load(files.clone()).map_err(anyhow::Error::msg)?)),
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let data_dir = node.data_dir.clone();

    // The store, and on first run the default tenant and an admin key.
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    let OpenedStore { store, queue_store, writers: store_writers } =
        open_store(&config.store, &data_dir).await?;
    if let Some(key) = bootstrap(&store, &data_dir).await? {
        eprintln!(
            "created tenant `default` and an admin API key (saved to {}):\n  {key}",
            data_dir.join(ADMIN_TOKEN_FILE).display()
        );
    }

    // The runtime, then the gateway's state over both; the recorder's writer runs from here on.
    let runtime = Arc::new(Runtime::new(runtime)?);
    let (recorder, recorder_writer) =
        Recorder::new(store.clone(), node.limits.log_queue_max, node.limits.log_queue_bytes_max);
    let recorder_task = tokio::spawn(recorder_writer);
    node.api_runtime = Some(api.clone());
    let node = Node::open(node, store, runtime, recorder).await?;
    let exporter = match &config.otlp_endpoint {
        Some(endpoint) => {
            let exporter = sluice_runtime::trace::install(endpoint, &node.id)?;
            eprintln!("exporting traces to {endpoint}");
            Some(exporter)
        }
        None => None,
    };

    // The HTTP front, then the background tasks, under one supervisor.
    let server = Server::start(node.clone(), listen, workers, tls.clone())
        .with_context(|| format!("listening on {listen}"))?;
    let addr = server.local_addr();
    *node.public_url.write().expect("public url lock") = format!("{scheme}://{addr}");
    if let Some(tls) = tls {
        // Not supervised: a node whose certificate cannot be reloaded still serves the one it has.
        tokio::spawn(tls.watch());
    }
    let tasks = Tasks::start(&node, upkeep, queue_store);
    let supervisor = tasks.supervisor();
    supervisor.watch("recorder", recorder_task);
    for task in store_writers {
        supervisor.watch("store writer", task);
    }
    if let Some(listen) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening for metrics on {listen}"))?;
        eprintln!("metrics without a key on http://{}/metrics", listener.local_addr()?);
        // The keyless scrape is control-plane work like `/metrics` on the main address.
        let listener = listener.into_std()?;
        let node = node.clone();
        supervisor.watch(
            "metrics listener",
            api.spawn(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).expect("registering the metrics listener");
                sluice_gateway::metrics::serve_open(node, listener).await
            }),
        );
    }
    eprintln!(
        "sluice {} listening on {scheme}://{addr}/ (data: {}, {workers} workers)",
        env!("CARGO_PKG_VERSION"),
        data_dir.display()
    );
    if let Some(after) = config.test_panic_task_after {
        supervisor.spawn("test-panic", async move {
            tokio::time::sleep(after).await;
            panic!("--test-panic-task-after fired");
        });
    }

    // Serve until a signal, or until a background task the node cannot run without dies.
    let failure = tokio::select! {
        () = shutdown_signal() => None,
        failure = supervisor.failed() => Some(failure),
    };
    supervisor.stopping();
    match &failure {
        None => eprintln!(
            "sluice: shutting down; in-flight calls get up to {}",
            sluice_core::units::format_duration(node.config.limits.shutdown_grace)
        ),
        Some(failure) => eprintln!("sluice: {failure}; the node cannot run without it, stopping"),
    }
    // HTTP first (no new calls, in-flight ones finish), then the scheduler (running async calls
    // finish or go back to the queue), then the last log records.
    tasks.stop_triggers().await;
    server.shutdown().await;
    tasks.stop_scheduler().await;
    node.recorder.flush().await;
    if let Some(exporter) = exporter {
        // The SDK's flush blocks on its export thread.
        let _ = tokio::task::spawn_blocking(move || exporter.shutdown()).await;
    }
    tasks.mark_stopped().await;
    match failure {
        None => {
            eprintln!("sluice: stopped");
            Ok(())
        }
        Some(failure) => Err(anyhow::anyhow!("{failure}")),
    }
}

/// The scheduler's own read pool (see `SqlStore::with_own_pool`).
const SCHEDULER_POOL_CONNECTIONS: u32 = 4;

/// The store `--store` names and the same store over the scheduler's own read pool, both bounded
/// by [`STORE_CALL_TIMEOUT`], and its queue writers' tasks for the supervisor.
struct OpenedStore {
    store: Arc<dyn Store>,
    queue_store: Arc<dyn Store>,
    writers: Vec<tokio::task::JoinHandle<()>>,
}

impl OpenedStore {
    fn new<E: Engine>(store: SqlStore<E>, writers: Vec<tokio::task::JoinHandle<()>>) -> Self
    where
        SqlStore<E>: Store,
    {
        let queue_store =
            Arc::new(Timed::new(store.with_own_pool(SCHEDULER_POOL_CONNECTIONS), STORE_CALL_TIMEOUT));
        Self { store: Arc::new(Timed::new(store, STORE_CALL_TIMEOUT)), queue_store, writers }
    }
}

async fn open_store(store: &str, data_dir: &std::path::Path) -> anyhow::Result<OpenedStore> {
    if store == "sqlite" {
        let db = data_dir.join("sluice.db");
        let sqlite = SqliteStore::open(&db).await.with_context(|| format!("opening {}", db.display()))?;
        let writers = sqlite.take_writer_task().into_iter().collect();
        return Ok(OpenedStore::new(sqlite, writers));
    }
    anyhow::ensure!(
        store.starts_with("postgres://") || store.starts_with("postgresql://"),
        "--store must be `sqlite` or a PostgreSQL URL (postgres://user@host:5432/db), got {store:?}"
    );
    let postgres = PostgresStore::connect(store)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", redact_password(store)))?;
    let writers = postgres.take_writer_tasks();
    Ok(OpenedStore::new(postgres, writers))
}

/// `url` with its password, if any, replaced by `***`: URLs end up in logs and error messages.
fn redact_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else { return url.to_string() };
    let authority_end = url[scheme_end..].find('/').map_or(url.len(), |i| scheme_end + i);
    let authority = &url[scheme_end..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => {
            format!("{}{}:***{}", &url[..scheme_end], &authority[..colon], &url[scheme_end + at..])
        }
        _ => url.to_string(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::redact_password;

    #[test]
    fn passwords_are_redacted_from_store_urls() {
        assert_eq!(redact_password("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact_password("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_password("postgres://h:5432/db"), "postgres://h:5432/db");
    }
}
