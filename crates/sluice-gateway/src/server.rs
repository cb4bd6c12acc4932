//! The HTTP front: one current-thread runtime per core, each accepting on its own
//! `SO_REUSEPORT` socket bound to the same address, so a connection and the guest calls it makes
//! stay on one core with no work-stealing (notes/sync-path-perf.md: ~25% faster than a
//! work-stealing runtime with a spawn per request).
//!
//! Hard limits are applied by hyper before any handler runs: the header-read deadline
//! (slowloris), the header buffer size and the header count. Shutdown stops accepting, lets open
//! connections finish their in-flight calls within the grace period, then closes them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use sluice_core::{ErrorKind, SluiceError};
use tokio::sync::watch;

use crate::body::{Body, full};
use crate::error::error_response;
use crate::node::Node;
use crate::sniff::SniffIo;
use crate::tls::Tls;

/// How long an accept loop pauses after an accept error (e.g. out of file descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

pub struct Server {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Binds `listen` once per worker and starts the workers. Binding happens here, before
    /// anything else, so a bad address fails the start instead of a worker. With `tls`, every
    /// connection is TLS (HTTP/2 or HTTP/1.1 by ALPN).
    pub fn start(
        node: Arc<Node>,
        listen: SocketAddr,
        workers: usize,
        tls: Option<Arc<Tls>>,
    ) -> std::io::Result<Self> {
        let workers = workers.max(1);
        let first = bind(listen)?;
        // With port 0 the kernel picks a port for the first socket; the others join it.
        let addr = first.local_addr()?;
        let mut listeners = vec![first];
        for _ in 1..workers {
            listeners.push(bind(addr)?);
        }
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut handles = Vec::with_capacity(workers);
        for (i, listener) in listeners.into_iter().enumerate() {
            let node = node.clone();
            let shutdown_rx = shutdown_rx.clone();
            let tls = tls.clone();
            let handle = std::thread::Builder::new().name(format!("sluice-http-{i}")).spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("building a worker runtime");
                rt.block_on(accept_loop(node, listener, tls, shutdown_rx));
            })?;
            handles.push(handle);
        }
        Ok(Self { addr, shutdown, workers: handles })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and waits for the workers to drain (each bounded by the grace period).
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let workers = self.workers;
        let _ = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
        })
        .await;
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

async fn accept_loop(
    node: Arc<Node>,
    listener: std::net::TcpListener,
    tls: Option<Arc<Tls>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("registering the listener");
    let limits = node.config.limits.clone();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(limits.header_read_timeout)
        // hyper's read buffer is the backstop for the request head (a head that cannot fit is
        // answered 431 and the connection closed); the exact limit is `check_head`. Twice the
        // limit leaves room for the request line and a pipelined request. (hyper's floor: 8 KiB.)
        .max_buf_size((limits.header_bytes_max * 2).max(8192));
    // hyper parses up to 100 headers on the stack; setting any value moves them to the heap
    // (~5% per request), so only do it when the limit differs from that default.
    if limits.header_count_max != 100 {
        builder.max_headers(limits.header_count_max);
    }
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                };
                // Responses are written in one go; Nagle would only delay the last segment.
                let _ = stream.set_nodelay(true);
                if let Some(tls) = &tls {
                    let secure = serve_tls(node.clone(), tls.clone(), stream, builder.clone(), graceful.watcher());
                    tokio::spawn(secure);
                    continue;
                }
                let (stream, framing_conflict) = SniffIo::new(stream);
                let node = node.clone();
                let service = hyper::service::service_fn(move |req| {
                    let node = node.clone();
                    // Read and cleared per request: set by the sniffer when this head (or one
                    // read with it) had both framings; hyper closes such a connection after.
                    let conflict = framing_conflict.swap(false, Ordering::Relaxed);
                    async move { Ok::<_, Infallible>(route(&node, req, conflict).await) }
                });
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("shutdown grace period over; closing remaining connections");
    }
}

/// One TLS connection: the handshake (bounded by the header-read deadline, so a client that
/// stalls in it holds nothing for long), then HTTP/2 if the client chose it by ALPN, else
/// HTTP/1.1 with the same limits as plain connections. HTTP/2 has no conflicting framings to
/// sniff; its header block is bounded by `--header-bytes-max`, its streams per connection by
/// [`H2_STREAMS_MAX`].
async fn serve_tls(
    node: Arc<Node>,
    tls: Arc<Tls>,
    stream: tokio::net::TcpStream,
    h1: http1::Builder,
    watcher: Watcher,
) {
    let limits = &node.config.limits;
    let stream = match tokio::time::timeout(limits.header_read_timeout, tls.acceptor().accept(stream)).await {
        Ok(Ok(stream)) => stream,
        // Scanners and clients that distrust the certificate end here: not worth a line each.
        Ok(Err(e)) => return tracing::debug!(error = %e, "TLS handshake failed"),
        Err(_) => return tracing::debug!("TLS handshake timed out"),
    };
    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(H2_STREAMS_MAX)
            .max_header_list_size(u32::try_from(limits.header_bytes_max).unwrap_or(u32::MAX));
        let service = hyper::service::service_fn(move |req| {
            let node = node.clone();
            async move { Ok::<_, Infallible>(route(&node, req, false).await) }
        });
        let _ = watcher.watch(h2.serve_connection(TokioIo::new(stream), service)).await;
        return;
    }
    let (stream, framing_conflict) = SniffIo::new(stream);
    let service = hyper::service::service_fn(move |req| {
        let node = node.clone();
        let conflict = framing_conflict.swap(false, Ordering::Relaxed);
        async move { Ok::<_, Infallible>(route(&node, req, conflict).await) }
    });
    let _ = watcher.watch(h1.serve_connection(TokioIo::new(stream), service)).await;
}

/// Most HTTP/2 streams one connection has open at once (each a call in flight; the node's own
/// bounds on calls apply as well).
pub const H2_STREAMS_MAX: u32 = 100;

/// The exact header limits, checked before anything else looks at the request. Size counts each
/// field as it travels on the wire: `name: value\r\n`.
fn check_head(req: &Request<Incoming>, limits: &sluice_core::Limits) -> Result<(), SluiceError> {
    let headers = req.headers();
    if headers.len() > limits.header_count_max {
        return Err(SluiceError::new(
            sluice_core::ErrorKind::HeadersTooLarge,
            format!("request has {} header fields; the limit is {}", headers.len(), limits.header_count_max),
        ));
    }
    let bytes: usize = headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    if bytes > limits.header_bytes_max {
        return Err(SluiceError::new(
            sluice_core::ErrorKind::HeadersTooLarge,
            format!("request headers are {bytes} bytes; the limit is {}", limits.header_bytes_max),
        ));
    }
    Ok(())
}

/// The top of the request path: `/fn` calls go straight to the invoke path on this core; the
/// control API runs on the API runtime, away from both the HTTP workers and the control runtime
/// that runs the scheduler, the queue writer and the heartbeats.
async fn route(node: &Arc<Node>, req: Request<Incoming>, framing_conflict: bool) -> Response<Body> {
    if framing_conflict {
        let e = SluiceError::bad_request(
            "request has both Content-Length and Transfer-Encoding; send exactly one",
        );
        return error_response(&e, None);
    }
    if let Err(e) = check_head(&req, &node.config.limits) {
        return error_response(&e, None);
    }
    let path = req.uri().path();
    if path.starts_with("/fn/") {
        return crate::invoke::handle(node, req).await;
    }
    if path == "/healthz" {
        return Response::new(full("ok\n"));
    }
    let metrics = path == "/metrics";
    if metrics || path == "/v1" || path.starts_with("/v1/") {
        if metrics && req.method() != http::Method::GET {
            return error_response(&SluiceError::new(ErrorKind::MethodNotAllowed, "use GET /metrics"), None);
        }
        // Bounded here, on the accepting core, before anything reaches the API runtime
        // (`control`).
        let principal = crate::node::bearer(req.headers()).and_then(|key| node.principal_for_key(key));
        let pass = match node.control_admission.admit(principal.as_deref()) {
            Ok(pass) => pass,
            Err(e) => return error_response(&e, None),
        };
        let spawned = if metrics {
            let fut = crate::metrics::handle(node.clone(), req.headers().clone());
            node.api.spawn(async move {
                let _pass = pass;
                fut.await
            })
        } else {
            let mut req = req;
            if let Some(principal) = principal {
                req.extensions_mut().insert(crate::api_common::Admitted(principal));
            }
            let fut = crate::api::handle(node.clone(), req);
            let stall = node.config.test_api_stall;
            node.api.spawn(async move {
                let _pass = pass;
                if let Some(stall) = stall {
                    std::thread::sleep(stall);
                }
                fut.await
            })
        };
        return match spawned.await {
            Ok(res) => res,
            Err(e) => error_response(&SluiceError::internal(format!("control API task failed: {e}")), None),
        };
    }
    error_response(&SluiceError::not_found(format!("no route for {path}: use /fn/... or /v1/...")), None)
}
