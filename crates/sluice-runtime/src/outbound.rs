//! The outbound HTTP policy: a guest reaches only the hosts in its version's allow list, and never
//! loopback, private, link-local or metadata addresses unless the operator allowed them. It also
//! bounds how many requests one invocation makes and how long each may wait.
//!
//! The host is resolved once, every address is checked, and the connection goes to one of those
//! checked addresses: handing the request to a client that resolves again would let a DNS answer
//! that changes between the two lookups (rebinding) walk past the check. So this module is its
//! own small HTTP/1.1 client, mirroring wasmtime-wasi-http's `default_send_request` (same TLS
//! roots, same error codes, same three timeouts) except for where it connects. Names are looked
//! up by the node's async resolver ([`crate::dns`]), within the request's connect timeout and
//! one of its tenant's lookup slots, so a slow name costs the calling guest time, not a thread.
//!
//! A denied request fails inside the guest with a wasi:http error (`HTTP-request-denied`, or
//! `destination-IP-prohibited` for a private address), never touches the network beyond the
//! name lookup, never touches the downstream limits, and leaves a `system` line in the
//! invocation's log.
//!
//! An allowed request takes a permit of its function's limit for its `host:port`
//! ([`crate::downstream`]) after the address check and before connecting, and reports what it
//! saw: 429, 503 and 504, a failed connection, no connection or no response head in time are
//! overload; any other response head is a success with its latency. The wait for a permit is part
//! of connecting (it counts against the connect timeout), and the permit is held until the
//! response body has ended or been dropped, since the downstream is busy until then.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use sluice_core::FunctionConfig;
use sluice_core::limits::OutboundLimits;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

use crate::dns::{Resolver, TenantLookups};
use crate::downstream::{Acquire, DownstreamPermit, Downstreams, Outcome};
use crate::logs::LogCapture;
use crate::trace::{ClientSpan, Propagation};

/// Where names are resolved and connections made. The system one in production; tests inject
/// one that answers differently on every lookup and records where it was asked to connect.
pub(crate) trait Network: Send + Sync {
    fn resolve(&self, host: &str, port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>>;
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>>;
}

/// The node's resolver and the system's sockets.
struct SystemNetwork {
    resolver: Resolver,
}

impl Network for SystemNetwork {
    fn resolve(&self, host: &str, port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>> {
        self.resolver.lookup(host, port)
    }

    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> {
        Box::pin(TcpStream::connect(addr))
    }
}

/// The node's way out, shared by every invocation: where names are resolved and connections
/// made, and the bound on each tenant's name lookups in flight.
#[derive(Clone)]
pub(crate) struct Egress {
    pub(crate) network: Arc<dyn Network>,
    pub(crate) lookups: Arc<TenantLookups>,
}

impl Egress {
    /// The node's resolver and sockets.
    pub(crate) fn system(resolver: Resolver, lookups_per_tenant_max: u32) -> Self {
        Self {
            network: Arc::new(SystemNetwork { resolver }),
            lookups: Arc::new(TenantLookups::new(lookups_per_tenant_max)),
        }
    }
}

/// Whose downstream limits an invocation's requests count against.
#[derive(Clone)]
pub(crate) struct DownstreamScope {
    pub(crate) registry: Arc<Downstreams>,
    pub(crate) tenant: Arc<str>,
    pub(crate) function: Arc<str>,
}

impl DownstreamScope {
    fn acquire(&self, host_port: &str) -> Acquire {
        self.registry.acquire(&self.tenant, &self.function, host_port)
    }
}

/// Per-invocation outbound policy; implements wasmtime-wasi-http's hooks.
pub struct OutboundPolicy {
    config: Arc<FunctionConfig>,
    allow_private: bool,
    limits: OutboundLimits,
    egress: Egress,
    logs: LogCapture,
    downstream: DownstreamScope,
    /// The trace context each request carries on (and the parent of its span).
    propagation: Propagation,
    /// Requests the guest has asked for so far, denied ones included.
    requests_made: u32,
}

impl OutboundPolicy {
    pub(crate) fn new(
        config: Arc<FunctionConfig>,
        allow_private: bool,
        limits: OutboundLimits,
        egress: Egress,
        logs: LogCapture,
        downstream: DownstreamScope,
        propagation: Propagation,
    ) -> Self {
        let mut policy = Self::with_network(config, allow_private, limits, egress, logs, downstream);
        policy.propagation = propagation;
        policy
    }

    fn with_network(
        config: Arc<FunctionConfig>,
        allow_private: bool,
        limits: OutboundLimits,
        egress: Egress,
        logs: LogCapture,
        downstream: DownstreamScope,
    ) -> Self {
        Self {
            config,
            allow_private,
            limits,
            egress,
            logs,
            downstream,
            propagation: Propagation::default(),
            requests_made: 0,
        }
    }
}

type IoFuture = Box<dyn Future<Output = Result<(), HttpError>> + Send>;
type SendFuture = Box<dyn Future<Output = Result<(http::Response<WasiBody>, IoFuture), HttpError>> + Send>;

impl WasiHttpHooks for OutboundPolicy {
    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: IoFuture,
    ) -> SendFuture {
        drop(fut);
        let uri = request.uri();
        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']).to_string();
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let logs = self.logs.clone();
        let max = self.limits.requests_per_invocation_max;
        if self.requests_made >= max {
            // One line, not one per refused request: a guest retrying in a loop would otherwise
            // fill its log with the same sentence.
            if self.requests_made == max {
                logs.system(format!(
                    "outbound request to {host}:{port} denied: this invocation already made its \
                     {max} outbound requests (the limit per invocation); later ones are denied too"
                ));
            }
            self.requests_made = self.requests_made.saturating_add(1);
            crate::metrics::outbound("denied");
            return Box::new(async move {
                drain(request.into_body());
                Err(HttpError::HttpRequestDenied)
            });
        }
        self.requests_made += 1;
        if !self.config.outbound_allowed(&host, Some(port)) {
            logs.system(format!(
                "outbound request to {host}:{port} denied: host is not in this function's allow list"
            ));
            crate::metrics::outbound("denied");
            return Box::new(async move {
                drain(request.into_body());
                Err(HttpError::HttpRequestDenied)
            });
        }
        let (method, uri) = (request.method().clone(), request.uri().clone());
        let span = self.propagation.outbound(&method, &uri, request.headers_mut());
        let timeouts = Timeouts::of(options, &self.limits);
        let allow_private = self.allow_private;
        let egress = self.egress.clone();
        let downstream = self.downstream.clone();
        Box::new(async move {
            // One deadline for resolving, waiting for a permit, connecting and the TLS handshake,
            // over every address tried: a per-address timeout would let a name with many dead
            // addresses multiply it.
            let deadline = Instant::now() + timeouts.connect;
            let tenant = &downstream.tenant;
            let addrs =
                match resolve_checked(&egress, tenant, &host, port, allow_private, deadline, &logs).await {
                    Ok(addrs) => addrs,
                    Err(err) => {
                        end_span(span, None, Some(&err));
                        drain(request.into_body());
                        return Err(err);
                    }
                };
            let key = downstream_key(&host, port);
            let Ok(mut permit) = timeout_at(deadline, downstream.acquire(&key)).await else {
                logs.system(format!(
                    "outbound request to {key} timed out waiting for a slot: this function already \
                     had as many requests in flight to that downstream as its adaptive limit allows"
                ));
                crate::metrics::outbound("error");
                end_span(span, None, Some(&HttpError::ConnectionTimeout));
                drain(request.into_body());
                return Err(HttpError::ConnectionTimeout);
            };
            let sent_at = Instant::now();
            let exchange = async {
                let stream = match connect_first(&*egress.network, &addrs, deadline).await {
                    Ok(stream) => stream,
                    Err(err) => {
                        drain(request.into_body());
                        return Err(err);
                    }
                };
                let stream: Box<dyn Connection> = if https {
                    let name = tls_server_name(&host)?;
                    let tls = timeout_at(deadline, tls_connector().connect(name, stream))
                        .await
                        .map_err(|_| HttpError::ConnectionTimeout)?
                        .map_err(HttpError::Tls)?;
                    Box::new(tls)
                } else {
                    Box::new(stream)
                };
                send(stream, request, deadline, timeouts).await
            };
            match exchange.await {
                Ok((res, io)) => {
                    let outcome = response_outcome(res.status(), sent_at.elapsed());
                    crate::metrics::outbound(if matches!(outcome, Outcome::Overload) {
                        "overload"
                    } else {
                        "ok"
                    });
                    permit.record(outcome);
                    end_span(span, Some(res.status().as_u16()), None);
                    let res = res.map(|body| ResponseBody { permit: Some(permit), ..body });
                    Ok((res.map(BodyExt::boxed_unsync), Box::new(io) as IoFuture))
                }
                Err(err) => {
                    crate::metrics::outbound("error");
                    permit.done(failure_outcome(&err));
                    // The guest may see only a closed body stream (its write of the request body
                    // fails once the request is gone): the cause is written here.
                    logs.system(format!("outbound request to {key} failed: {err}"));
                    end_span(span, None, Some(&err));
                    Err(err)
                }
            }
        })
    }
}

/// Ends an outbound request's span, if tracing made one, with its status or its failure.
fn end_span(span: Option<ClientSpan>, status: Option<u16>, failure: Option<&HttpError>) {
    if let Some(span) = span {
        span.end(status, failure.map(|e| e.to_string()).as_deref());
    }
}

/// The key of a downstream's limit: `host:port`, the host in lower case (names are
/// case-insensitive) and an IPv6 literal in brackets.
fn downstream_key(host: &str, port: u16) -> String {
    let host = host.to_ascii_lowercase();
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

/// What a response head says about its downstream's load: 429 (too many requests), 503
/// (unavailable) and 504 (a gateway in front of it timed out) are overload; anything else is an
/// answer, however unwelcome.
fn response_outcome(status: http::StatusCode, latency: Duration) -> Outcome {
    match status.as_u16() {
        429 | 503 | 504 => Outcome::Overload,
        _ => Outcome::Ok { latency },
    }
}

/// What a request that got no response head says about its downstream's load.
fn failure_outcome(err: &HttpError) -> Outcome {
    match err {
        // A refused or unanswered connection, or a response head that did not come in time, is
        // what an overloaded (or down) downstream looks like from here.
        HttpError::Connect(_)
        | HttpError::ConnectionRefused
        | HttpError::ConnectionTimeout
        | HttpError::ConnectionReadTimeout
        | HttpError::ConnectionLimitReached
        | HttpError::DestinationUnavailable => Outcome::Overload,
        // TLS and protocol failures say nothing about load.
        _ => Outcome::Other,
    }
}

/// The three timeouts of one request: the guest's own where it set them (capped at the node's
/// maximum), the node's defaults where it did not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timeouts {
    connect: Duration,
    first_byte: Duration,
    between_bytes: Duration,
}

impl Timeouts {
    fn of(options: Option<RequestOptions>, limits: &OutboundLimits) -> Self {
        let options = options.unwrap_or_default();
        let pick = |set: Option<Duration>, default: Duration, max: Duration| set.unwrap_or(default).min(max);
        Self {
            connect: pick(
                options.connect_timeout,
                limits.connect_timeout_default,
                limits.connect_timeout_max,
            ),
            first_byte: pick(
                options.first_byte_timeout,
                limits.first_byte_timeout_default,
                limits.first_byte_timeout_max,
            ),
            between_bytes: pick(
                options.between_bytes_timeout,
                limits.between_bytes_timeout_default,
                limits.between_bytes_timeout_max,
            ),
        }
    }
}

/// Resolves `host` once (an IP literal is not resolved at all) and returns its addresses if
/// every one of them may be reached. One private address refuses the whole name: which address a
/// client ends up using is not something a policy should leave to chance.
async fn resolve_checked(
    egress: &Egress,
    tenant: &Arc<str>,
    host: &str,
    port: u16,
    allow_private: bool,
    deadline: Instant,
    logs: &LogCapture,
) -> Result<Vec<SocketAddr>, HttpError> {
    let addrs = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => {
            // Held until the lookup is done or abandoned (which aborts it); the wait for it is
            // part of the lookup's time.
            let Some(_slot) = egress.lookups.acquire(tenant, deadline).await else {
                logs.system(format!(
                    "outbound request to {host}:{port} timed out waiting to look up its name: this \
                     tenant already had {} name lookups in flight on this node",
                    egress.lookups.max()
                ));
                return Err(HttpError::DnsTimeout);
            };
            match timeout_at(deadline, egress.network.resolve(host, port)).await {
                Ok(Ok(addrs)) => addrs,
                Err(_) => return Err(HttpError::DnsTimeout),
                Ok(Err(err)) if err.kind() == io::ErrorKind::TimedOut => return Err(HttpError::DnsTimeout),
                Ok(Err(_)) => {
                    return Err(HttpError::DnsError { rcode: Some("lookup failed".into()), info_code: None });
                }
            }
        }
    };
    if addrs.is_empty() {
        return Err(HttpError::DnsError { rcode: Some("no addresses".into()), info_code: None });
    }
    if !allow_private && let Some(private) = addrs.iter().find(|a| is_private(a.ip())) {
        logs.system(format!(
            "outbound request to {host}:{port} denied: {} is a private address",
            private.ip()
        ));
        return Err(HttpError::DestinationIpProhibited);
    }
    Ok(addrs)
}

/// Connects to the first of the checked addresses that accepts, in the resolver's order.
async fn connect_first(
    network: &dyn Network,
    addrs: &[SocketAddr],
    deadline: Instant,
) -> Result<TcpStream, HttpError> {
    let attempts = async {
        let mut last_error = None;
        for addr in addrs {
            match network.connect(*addr).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last_error = Some(e),
            }
        }
        Err(HttpError::Connect(last_error.expect("resolve_checked never returns an empty list")))
    };
    timeout_at(deadline, attempts).await.map_err(|_| HttpError::ConnectionTimeout)?
}

/// The name the server's certificate is checked against: the host the guest asked for, never
/// the address it resolved to.
fn tls_server_name(host: &str) -> Result<rustls::pki_types::ServerName<'static>, HttpError> {
    use rustls::pki_types::ServerName;
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ServerName::from(ip));
    }
    Ok(ServerName::try_from(host)?.to_owned())
}

/// The same rustls setup as wasmtime-wasi-http's default (webpki roots, no client auth), built
/// once per process rather than once per request: the root store is ~150 certificates.
fn tls_connector() -> tokio_rustls::TlsConnector {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.into() };
        Arc::new(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
    });
    tokio_rustls::TlsConnector::from(config.clone())
}

trait Connection: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static {}
impl<T> Connection for T where T: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static {}

/// Runs the HTTP/1.1 exchange on an open connection: from here on this is
/// `wasmtime_wasi_http::default_send_request` (48.0.8), with its error mapping.
async fn send(
    stream: Box<dyn Connection>,
    mut request: http::Request<WasiBody>,
    deadline: Instant,
    timeouts: Timeouts,
) -> Result<(http::Response<ResponseBody>, impl Future<Output = Result<(), HttpError>> + Send), HttpError> {
    let (mut sender, conn) =
        timeout_at(deadline, hyper::client::conn::http1::Builder::new().handshake(TokioIo::new(stream)))
            .await
            .map_err(|_| HttpError::ConnectionTimeout)??;

    // The request carries the scheme and authority, but on the wire they belong only in a
    // request to a proxy; hyper's `send_request` does not strip them.
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    *request.uri_mut() =
        http::Uri::builder().path_and_query(path).build().expect("comes from a valid request");

    keep_unsent_body(&mut request);
    let between_bytes = timeouts.between_bytes;
    let send = async move {
        let res = tokio::time::timeout(timeouts.first_byte, sender.send_request(request))
            .await
            .map_err(|_| HttpError::ConnectionReadTimeout)?
            .map_err(HttpError::from)?;
        // Tokio panics on a zero interval; 1 ns is as good as zero.
        let mut timeout = tokio::time::interval(between_bytes.max(Duration::from_nanos(1)));
        timeout.reset();
        Ok(res.map(|incoming| ResponseBody { incoming, timeout, permit: None }))
    };
    let mut send = pin!(send);
    let mut conn = Some(conn);
    // Wait for the response head while driving the connection's I/O.
    let res = std::future::poll_fn(|cx| match send.as_mut().poll(cx) {
        Poll::Ready(result) => Poll::Ready(result),
        Poll::Pending => {
            let Some(fut) = conn.as_mut() else {
                return Poll::Pending;
            };
            let res = ready!(Pin::new(fut).poll(cx));
            conn = None;
            match res {
                Ok(()) => send.as_mut().poll(cx),
                Err(err) => Poll::Ready(Err(HttpError::from(err))),
            }
        }
    })
    .await?;
    Ok((res, async move {
        let Some(conn) = conn.take() else {
            return Ok(());
        };
        conn.await.map_err(|err| if err.is_timeout() { HttpError::HttpResponseTimeout } else { err.into() })
    }))
}

/// Reads (and discards) a request's body until the guest finishes or drops it, for a request
/// that failed before it was sent. Dropping the body at once would close the stream the guest is
/// finishing concurrently, and the guest could report that (`connection reset`) instead of the
/// failure itself: a race it loses on a loaded node.
fn drain(mut body: WasiBody) {
    if http_body::Body::is_end_stream(&body) {
        return;
    }
    tokio::spawn(async move { while let Some(Ok(_)) = body.frame().await {} });
}

/// hyper sends no body with a GET, HEAD or CONNECT request that names no length (it writes the
/// head and drops the body), but a guest writes and finishes its request body after `handle`,
/// concurrently with the exchange. If hyper has dropped the body by then, the guest's write finds
/// the stream closed and fails as `connection reset`: a race it loses whenever it is descheduled
/// while the request goes out (a loaded node). Such a body is taken from the request and drained
/// (hyper would not have sent it either) until the guest finishes or drops it.
fn keep_unsent_body(request: &mut http::Request<WasiBody>) {
    let bodiless =
        matches!(*request.method(), http::Method::GET | http::Method::HEAD | http::Method::CONNECT);
    let headers = request.headers();
    if !bodiless
        || headers.contains_key(http::header::CONTENT_LENGTH)
        || headers.contains_key(http::header::TRANSFER_ENCODING)
    {
        return;
    }
    let empty = http_body_util::Empty::new().map_err(|never| match never {}).boxed_unsync();
    let mut unsent = std::mem::replace(request.body_mut(), empty);
    if http_body::Body::is_end_stream(&unsent) {
        return;
    }
    tokio::spawn(async move { while let Some(Ok(_)) = unsent.frame().await {} });
}

/// A response body that fails with `connection-read-timeout` when no frame arrives within the
/// between-bytes timeout, and holds the request's downstream permit until it has ended.
struct ResponseBody {
    incoming: hyper::body::Incoming,
    timeout: tokio::time::Interval,
    permit: Option<DownstreamPermit>,
}

impl ResponseBody {
    /// The exchange is over (the body ended or failed): the downstream slot is free.
    fn release(&mut self) {
        self.permit.take();
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, HttpError>>> {
        match Pin::new(&mut self.incoming).poll_frame(cx) {
            Poll::Ready(None) => {
                self.release();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(err))) => {
                self.release();
                Poll::Ready(Some(Err(if err.is_timeout() {
                    HttpError::HttpResponseTimeout
                } else {
                    HttpError::from(err)
                })))
            }
            Poll::Ready(Some(Ok(frame))) => {
                self.timeout.reset();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                ready!(self.timeout.poll_tick(cx));
                self.release();
                Poll::Ready(Some(Err(HttpError::ConnectionReadTimeout)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.incoming.size_hint()
    }
}

/// Whether a guest must not reach `ip` without `--outbound-allow-private`: every range that is
/// not the public internet (RFC 6890's special-purpose registries, as far as they can reach
/// something), IPv6 addresses that embed an IPv4 address which is one of those (mapped,
/// compatible, translated, NAT64, 6to4), and Teredo whole.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_private_v4(v4),
        IpAddr::V6(v6) => is_private_v6(v6),
    }
}

/// IPv4 special-purpose ranges a guest must not reach, as (network, prefix length).
const PRIVATE_V4: [(Ipv4Addr, u8); 11] = [
    (Ipv4Addr::new(0, 0, 0, 0), 8), // "this network"; Linux connects 0.0.0.0 to loopback
    (Ipv4Addr::new(10, 0, 0, 0), 8), // RFC 1918
    (Ipv4Addr::new(100, 64, 0, 0), 10), // carrier-grade NAT (RFC 6598)
    (Ipv4Addr::new(127, 0, 0, 0), 8), // loopback
    (Ipv4Addr::new(169, 254, 0, 0), 16), // link-local, including cloud metadata 169.254.169.254
    (Ipv4Addr::new(172, 16, 0, 0), 12), // RFC 1918
    (Ipv4Addr::new(192, 0, 0, 0), 24), // IETF protocol assignments (RFC 6890)
    (Ipv4Addr::new(192, 168, 0, 0), 16), // RFC 1918
    (Ipv4Addr::new(198, 18, 0, 0), 15), // benchmarking (RFC 2544)
    (Ipv4Addr::new(224, 0, 0, 0), 4), // multicast
    (Ipv4Addr::new(240, 0, 0, 0), 4), // reserved, including broadcast 255.255.255.255
];

fn is_private_v4(ip: Ipv4Addr) -> bool {
    let ip = u32::from(ip);
    PRIVATE_V4.iter().any(|&(net, len)| ip >> (32 - len) == u32::from(net) >> (32 - len))
}

fn is_private_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let o = ip.octets();
    let v4 = |a: usize| Ipv4Addr::new(o[a], o[a + 1], o[a + 2], o[a + 3]);
    match s {
        // IPv4-mapped (::ffff:0:0/96) and IPv4-compatible (::/96, which holds :: and ::1 too:
        // they embed 0.0.0.0 and 0.0.0.1, both in 0.0.0.0/8): the socket reaches the IPv4 host.
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0, 0, _, _] => is_private_v4(v4(12)),
        // IPv4-translated (::ffff:0:0:0/96, SIIT, RFC 2765): a stateless translator on the path
        // turns it into the embedded IPv4 address, so it is judged by that address like the
        // mapped form one segment over.
        [0, 0, 0, 0, 0xffff, 0, _, _] => is_private_v4(v4(12)),
        // NAT64 (64:ff9b::/96): the translator connects to the embedded IPv4 address, so it is
        // judged by that address rather than refused outright; on an IPv6-only network with
        // NAT64 this prefix is how every public IPv4 host is reached.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => is_private_v4(v4(12)),
        // Local-use NAT64 (64:ff9b:1::/48): its embedding depends on a local prefix length, so
        // the IPv4 address cannot be read back; refused.
        [0x64, 0xff9b, 1, ..] => true,
        // 6to4 (2002::/16): the relay forwards to the IPv4 address in bits 16..48.
        [0x2002, ..] => is_private_v4(v4(2)),
        // Teredo (2001::/32, RFC 4380): refused whole. It embeds two IPv4 addresses (the server
        // in bits 32..64, the client's NAT, XORed, in the last 32 bits), and which one a packet
        // reaches depends on the relay; judging one would let the other through. No public
        // service is reachable only over Teredo, which operating systems have dropped.
        [0x2001, 0, ..] => true,
        [first, ..] => {
            first & 0xff00 == 0xff00 // multicast ff00::/8
                || first & 0xfe00 == 0xfc00 // unique local fc00::/7
                || first & 0xffc0 == 0xfe80 // link-local fe80::/10
                || first & 0xffc0 == 0xfec0 // site-local fec0::/10 (deprecated, still routed by some)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::Empty;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::downstream::Phase;

    #[test]
    fn private_ranges_with_their_boundaries() {
        // (address, private?): for each range its first and last address and, where the
        // neighbour is public, the address just outside on each side.
        let table = [
            ("0.0.0.0", true),
            ("0.255.255.255", true),
            ("1.0.0.0", false),
            ("9.255.255.255", false),
            ("10.0.0.0", true),
            ("10.255.255.255", true),
            ("11.0.0.0", false),
            ("100.63.255.255", false),
            ("100.64.0.0", true),
            ("100.127.255.255", true),
            ("100.128.0.0", false),
            ("126.255.255.255", false),
            ("127.0.0.0", true),
            ("127.255.255.255", true),
            ("128.0.0.0", false),
            ("169.253.255.255", false),
            ("169.254.0.0", true),
            ("169.254.169.254", true),
            ("169.254.255.255", true),
            ("169.255.0.0", false),
            ("172.15.255.255", false),
            ("172.16.0.0", true),
            ("172.31.255.255", true),
            ("172.32.0.0", false),
            ("191.255.255.255", false),
            ("192.0.0.0", true),
            ("192.0.0.255", true),
            ("192.0.1.0", false),
            ("192.167.255.255", false),
            ("192.168.0.0", true),
            ("192.168.255.255", true),
            ("192.169.0.0", false),
            ("198.17.255.255", false),
            ("198.18.0.0", true),
            ("198.19.255.255", true),
            ("198.20.0.0", false),
            ("223.255.255.255", false),
            ("224.0.0.0", true),
            ("239.255.255.255", true),
            ("240.0.0.0", true),
            ("255.255.255.254", true),
            ("255.255.255.255", true),
            ("8.8.8.8", false),
            ("93.184.216.34", false),
            // IPv6
            ("::", true),
            ("::1", true),
            ("2606:4700::1111", false),
            ("2001:db8::1", false),
            // IPv4-mapped and -compatible: judged by the embedded address.
            ("::ffff:127.0.0.1", true),
            ("::ffff:169.254.169.254", true),
            ("::ffff:8.8.8.8", false),
            ("::127.0.0.1", true),
            ("::10.0.0.1", true),
            ("::8.8.8.8", false),
            ("::1:0:0:0", false), // outside ::/96
            // IPv4-translated (SIIT) ::ffff:0:0:0/96: judged by the embedded address.
            ("::ffff:0:127.0.0.1", true),
            ("::ffff:0:169.254.169.254", true),
            ("::ffff:0:10.0.0.1", true),
            ("::ffff:0:8.8.8.8", false),
            ("::fffe:0:127.0.0.1", false), // outside: neither mapped nor translated
            ("::ffff:1:127.0.0.1", false), // outside ::ffff:0:0:0/96
            // Teredo 2001::/32, refused whole, even when both embedded addresses are public
            // (server 8.8.8.8, client 8.8.8.8 XORed).
            ("2000:ffff:ffff:ffff:ffff:ffff:ffff:ffff", false),
            ("2001::", true),
            ("2001:0:808:808::f7f7:f7f7", true),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", true), // RFC 4380's example
            ("2001:0:ffff:ffff:ffff:ffff:ffff:ffff", true),
            ("2001:1::", false),
            // NAT64
            ("64:ff9b::127.0.0.1", true),
            ("64:ff9b::10.1.2.3", true),
            ("64:ff9b::8.8.8.8", false),
            ("64:ff9b:1::8.8.8.8", true),
            ("64:ff9a:ffff:ffff:ffff:ffff:ffff:ffff", false),
            // 6to4: 2002:AABB:CCDD:: embeds AA.BB.CC.DD
            ("2002:7f00:1::", true),
            ("2002:a9fe:a9fe::1", true),
            ("2002:0808:0808::1", false),
            ("2001:ffff:ffff:ffff:ffff:ffff:ffff:ffff", false),
            ("2003::", false),
            // unique local fc00::/7
            ("fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", false),
            ("fc00::", true),
            ("fd00::1", true),
            ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", true),
            ("fe00::", false),
            // link-local fe80::/10 and site-local fec0::/10
            ("fe7f:ffff:ffff:ffff:ffff:ffff:ffff:ffff", false),
            ("fe80::", true),
            ("febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", true),
            ("fec0::1", true),
            ("feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", true),
            // multicast ff00::/8
            ("ff00::", true),
            ("ff02::1", true),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", true),
        ];
        let wrong: Vec<_> =
            table.iter().filter(|(ip, private)| is_private(ip.parse().unwrap()) != *private).collect();
        assert!(wrong.is_empty(), "misclassified (address, expected): {wrong:?}");
    }

    #[test]
    fn timeouts_default_when_unset_and_are_capped_when_too_long() {
        let limits = OutboundLimits::default();
        let none = Timeouts::of(None, &limits);
        assert_eq!(none.connect, limits.connect_timeout_default);
        assert_eq!(none.first_byte, limits.first_byte_timeout_default);
        assert_eq!(none.between_bytes, limits.between_bytes_timeout_default);
        let hour = Duration::from_secs(3600);
        let long = RequestOptions {
            connect_timeout: Some(hour),
            first_byte_timeout: Some(hour),
            between_bytes_timeout: Some(hour),
        };
        let capped = Timeouts::of(Some(long), &limits);
        assert_eq!(capped.connect, limits.connect_timeout_max);
        assert_eq!(capped.first_byte, limits.first_byte_timeout_max);
        assert_eq!(capped.between_bytes, limits.between_bytes_timeout_max);
        let ms = Duration::from_millis(5);
        let short = RequestOptions { connect_timeout: Some(ms), first_byte_timeout: None, ..long };
        let kept = Timeouts::of(Some(short), &limits);
        assert_eq!((kept.connect, kept.first_byte), (ms, limits.first_byte_timeout_default));
    }

    /// A resolver that gives a different answer on each lookup (the last one repeats), and a
    /// connector that records every address it is asked for and connects to a local test
    /// server instead, so a request to any address can complete.
    struct FakeNetwork {
        answers: Vec<Vec<SocketAddr>>,
        lookups: AtomicUsize,
        connects: Mutex<Vec<SocketAddr>>,
        refuse: Vec<SocketAddr>,
        server: SocketAddr,
    }

    impl FakeNetwork {
        fn new(answers: &[&[&str]], server: SocketAddr) -> Arc<Self> {
            let answers = answers.iter().map(|a| a.iter().map(|s| s.parse().unwrap()).collect()).collect();
            Arc::new(Self {
                answers,
                lookups: AtomicUsize::new(0),
                connects: Mutex::default(),
                refuse: Vec::new(),
                server,
            })
        }

        fn connects(&self) -> Vec<SocketAddr> {
            self.connects.lock().unwrap().clone()
        }
    }

    impl Network for FakeNetwork {
        fn resolve(&self, _host: &str, _port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>> {
            let n = self.lookups.fetch_add(1, Ordering::SeqCst);
            let answer = self.answers[n.min(self.answers.len() - 1)].clone();
            Box::pin(async move { Ok(answer) })
        }

        fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> {
            self.connects.lock().unwrap().push(addr);
            if self.refuse.contains(&addr) {
                return Box::pin(async { Err(io::ErrorKind::ConnectionRefused.into()) });
            }
            Box::pin(TcpStream::connect(self.server))
        }
    }

    /// A local HTTP server answering every request with `pong` (or never, if `silent`).
    async fn server(silent: bool) -> SocketAddr {
        let pong: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\npong";
        serve((!silent).then_some(pong)).await
    }

    /// A local HTTP server answering every request with `response` (or never, if `None`).
    async fn serve(response: Option<&'static [u8]>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let Some(response) = response else {
                        return std::future::pending::<()>().await;
                    };
                    let _ = s.write_all(response).await;
                });
            }
        });
        addr
    }

    fn policy_for(
        allow: &str,
        allow_private: bool,
        limits: OutboundLimits,
        network: Arc<FakeNetwork>,
    ) -> OutboundPolicy {
        policy_in(allow, allow_private, limits, network, Arc::new(Downstreams::new()))
    }

    /// A policy of function `f` of tenant `t` that counts against the limits in `registry`.
    fn policy_in(
        allow: &str,
        allow_private: bool,
        limits: OutboundLimits,
        network: Arc<FakeNetwork>,
        registry: Arc<Downstreams>,
    ) -> OutboundPolicy {
        let egress = Egress { network, lookups: Arc::new(TenantLookups::new(16)) };
        policy_of("t", &[allow], allow_private, limits, egress, registry)
    }

    /// A policy of function `f` of `tenant` that goes out through `egress`.
    fn policy_of(
        tenant: &str,
        allow: &[&str],
        allow_private: bool,
        limits: OutboundLimits,
        egress: Egress,
        registry: Arc<Downstreams>,
    ) -> OutboundPolicy {
        let config = FunctionConfig {
            allow_outbound: allow.iter().map(|&a| a.into()).collect(),
            ..Default::default()
        };
        let downstream = DownstreamScope { registry, tenant: tenant.into(), function: "f".into() };
        OutboundPolicy::with_network(
            Arc::new(config),
            allow_private,
            limits,
            egress,
            LogCapture::new(1 << 16),
            downstream,
        )
    }

    /// Sends a GET through the policy and returns the response body, or the error.
    async fn get(
        policy: &mut OutboundPolicy,
        url: &str,
        options: Option<RequestOptions>,
    ) -> Result<String, HttpError> {
        let body = Empty::<Bytes>::new().map_err(|never| match never {}).boxed_unsync();
        let request = http::Request::get(url).body(body).unwrap();
        let (res, io) = Pin::from(policy.send_request(request, options, Box::new(async { Ok(()) }))).await?;
        tokio::spawn(Pin::from(io));
        let body = res.into_body().collect().await?.to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    fn system_lines(policy: &OutboundPolicy) -> String {
        policy.logs.take().into_iter().map(|(_, line, _)| line).collect::<Vec<_>>().join("\n")
    }

    /// A guest finishes its request body after `handle`, concurrently with the exchange: the body
    /// of a GET must still take its writes after hyper sent the head without it (the guest would
    /// otherwise fail with `connection reset` whenever the request went out first).
    #[tokio::test]
    async fn a_get_body_the_guest_finishes_late_still_takes_its_writes() {
        let server = server(false).await;
        let network = FakeNetwork::new(&[&["93.184.216.34:80"]], server);
        let mut policy = policy_for("svc.example", false, OutboundLimits::default(), network);
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        // Alive as long as the body is: tells when the drain has let it go.
        let alive = Arc::new(());
        let body_alive = Arc::downgrade(&alive);
        let frames = futures::stream::unfold((rx, alive), |(mut rx, alive)| async move {
            rx.recv().await.map(|b| (Ok::<_, HttpError>(http_body::Frame::data(b)), (rx, alive)))
        });
        let body = http_body_util::StreamBody::new(frames).boxed_unsync();
        let request = http::Request::get("http://svc.example/x").body(body).unwrap();
        let (res, io) =
            Pin::from(policy.send_request(request, None, Box::new(async { Ok(()) }))).await.unwrap();
        tokio::spawn(Pin::from(io));
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"pong");
        tokio::task::yield_now().await;
        assert!(!tx.is_closed(), "the request body was dropped while the guest may still write it");
        // Every write is taken (the channel holds one: they are drained, not left to block).
        for _ in 0..100 {
            tx.send(Bytes::from_static(b"late")).await.expect("the guest's late write is taken");
        }
        // The drain ends with the guest's end of the body (its instance dropped): nothing is left
        // running after the call.
        drop(tx);
        tokio::time::timeout(Duration::from_secs(5), async {
            while body_alive.upgrade().is_some() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the drain let the body go once the guest dropped its end");
    }

    #[tokio::test]
    async fn connects_only_to_the_address_that_was_checked() {
        for allow_private in [false, true] {
            let server = server(false).await;
            // Rebinding: a public answer for the check, loopback for any later lookup.
            let network = FakeNetwork::new(&[&["93.184.216.34:80"], &["127.0.0.1:80"]], server);
            let mut policy =
                policy_for("svc.example", allow_private, OutboundLimits::default(), network.clone());
            assert_eq!(get(&mut policy, "http://svc.example/x", None).await.unwrap(), "pong");
            assert_eq!(network.lookups.load(Ordering::SeqCst), 1, "resolved once");
            assert_eq!(
                network.connects(),
                ["93.184.216.34:80".parse().unwrap()],
                "allow_private={allow_private}"
            );
        }
    }

    #[tokio::test]
    async fn one_private_address_refuses_the_name() {
        let server = server(false).await;
        let network = FakeNetwork::new(&[&["93.184.216.34:443", "10.0.0.1:443"]], server);
        let mut policy = policy_for("svc.example", false, OutboundLimits::default(), network.clone());
        let err = get(&mut policy, "https://svc.example/", None).await.unwrap_err();
        assert!(matches!(err, HttpError::DestinationIpProhibited), "{err:?}");
        assert!(network.connects().is_empty(), "nothing was connected to");
        let logs = system_lines(&policy);
        assert!(logs.contains("denied: 10.0.0.1 is a private address"), "{logs}");

        // An IP literal is checked without a lookup.
        let mut policy = policy_for("169.254.169.254", false, OutboundLimits::default(), network.clone());
        let err = get(&mut policy, "http://169.254.169.254/latest/meta-data/", None).await.unwrap_err();
        assert!(matches!(err, HttpError::DestinationIpProhibited), "{err:?}");
        assert!(network.connects().is_empty());
        assert_eq!(network.lookups.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_refused_address_falls_through_to_the_next_checked_one() {
        let server = server(false).await;
        let mut network = FakeNetwork::new(&[&["93.184.216.34:80", "93.184.216.35:80"]], server);
        Arc::get_mut(&mut network).unwrap().refuse = vec!["93.184.216.34:80".parse().unwrap()];
        let mut policy = policy_for("svc.example", false, OutboundLimits::default(), network.clone());
        assert_eq!(get(&mut policy, "http://svc.example/", None).await.unwrap(), "pong");
        let tried: Vec<SocketAddr> =
            vec!["93.184.216.34:80".parse().unwrap(), "93.184.216.35:80".parse().unwrap()];
        assert_eq!(network.connects(), tried);
    }

    #[tokio::test]
    async fn an_invocation_makes_at_most_its_share_of_requests() {
        let server = server(false).await;
        let network = FakeNetwork::new(&[&["93.184.216.34:80"]], server);
        let limits = OutboundLimits { requests_per_invocation_max: 2, ..Default::default() };
        let mut policy = policy_for("svc.example", false, limits, network.clone());
        for _ in 0..2 {
            assert_eq!(get(&mut policy, "http://svc.example/", None).await.unwrap(), "pong");
        }
        for _ in 0..3 {
            let err = get(&mut policy, "http://svc.example/", None).await.unwrap_err();
            assert!(matches!(err, HttpError::HttpRequestDenied), "{err:?}");
        }
        assert_eq!(network.connects().len(), 2);
        let logs = system_lines(&policy);
        assert_eq!(logs.matches("already made its 2 outbound requests").count(), 1, "logged once: {logs}");
    }

    #[tokio::test]
    async fn a_silent_server_is_cut_off_at_the_capped_first_byte_timeout() {
        let server = server(true).await;
        let network = FakeNetwork::new(&[&["93.184.216.34:80"]], server);
        let limits = OutboundLimits {
            first_byte_timeout_default: Duration::from_secs(3600),
            first_byte_timeout_max: Duration::from_millis(100),
            ..Default::default()
        };
        let mut policy = policy_for("svc.example", false, limits, network);
        let asks_an_hour =
            RequestOptions { first_byte_timeout: Some(Duration::from_secs(3600)), ..Default::default() };
        let started = std::time::Instant::now();
        let err = get(&mut policy, "http://svc.example/", Some(asks_an_hour)).await.unwrap_err();
        assert!(matches!(err, HttpError::ConnectionReadTimeout), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    }

    #[test]
    fn downstream_keys_and_what_a_response_says_about_load() {
        assert_eq!(downstream_key("API.Example.com", 443), "api.example.com:443");
        assert_eq!(downstream_key("2001:db8::1", 8080), "[2001:db8::1]:8080");
        let ms = Duration::from_millis(7);
        for status in [429, 503, 504] {
            assert_eq!(response_outcome(status.try_into().unwrap(), ms), Outcome::Overload, "{status}");
        }
        for status in [200, 404, 500, 502] {
            assert_eq!(
                response_outcome(status.try_into().unwrap(), ms),
                Outcome::Ok { latency: ms },
                "{status}"
            );
        }
        assert_eq!(failure_outcome(&HttpError::ConnectionTimeout), Outcome::Overload);
        assert_eq!(failure_outcome(&HttpError::ConnectionReadTimeout), Outcome::Overload);
        assert_eq!(
            failure_outcome(&HttpError::Connect(io::ErrorKind::ConnectionRefused.into())),
            Outcome::Overload
        );
        assert_eq!(failure_outcome(&HttpError::TlsCertificateError), Outcome::Other);
    }

    #[tokio::test]
    async fn a_downstream_answering_503_lowers_its_limit_and_denied_requests_leave_it_alone() {
        let registry = Arc::new(Downstreams::new());
        let limit = |registry: &Downstreams| {
            let states = registry.snapshot("t", "f");
            assert_eq!(states.len(), 1, "{states:?}");
            states[0].clone()
        };

        // Successes one after another grow the limit only as far as it is used (1 in flight:
        // up to 3).
        let ok = FakeNetwork::new(&[&["93.184.216.34:80"]], server(false).await);
        let mut policy = policy_in("svc.example", false, OutboundLimits::default(), ok, registry.clone());
        for _ in 0..3 {
            assert_eq!(get(&mut policy, "http://svc.example/", None).await.unwrap(), "pong");
        }
        let state = limit(&registry);
        assert_eq!(state.host, "svc.example:80");
        assert_eq!((state.limit, state.in_flight, state.successes_total), (3, 0, 3));
        assert_eq!(state.phase, Phase::SlowStart);
        assert!(state.latency_min_ms.is_some() && state.latency_ewma_ms.is_some());

        // The same downstream, now answering 503: the guest gets the response, the limit halves.
        let busy: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 4\r\n\
                            connection: close\r\n\r\nbusy";
        let unavailable = FakeNetwork::new(&[&["93.184.216.34:80"]], serve(Some(busy)).await);
        let mut policy =
            policy_in("svc.example", false, OutboundLimits::default(), unavailable.clone(), registry.clone());
        assert_eq!(get(&mut policy, "http://svc.example/", None).await.unwrap(), "busy");
        let state = limit(&registry);
        assert_eq!((state.limit, state.in_flight, state.overloads_total), (1, 0, 1));
        assert_eq!(state.phase, Phase::Avoidance);
        assert!(state.last_decrease_ago_ms.is_some());

        // A refused connection is an overload too (within the cooldown: counted, not halved
        // again; the limit is at its floor anyway).
        let mut refusing = FakeNetwork::new(&[&["93.184.216.34:80"]], serve(Some(busy)).await);
        Arc::get_mut(&mut refusing).unwrap().refuse = vec!["93.184.216.34:80".parse().unwrap()];
        let mut policy =
            policy_in("svc.example", false, OutboundLimits::default(), refusing, registry.clone());
        let err = get(&mut policy, "http://svc.example/", None).await.unwrap_err();
        assert!(matches!(err, HttpError::Connect(_)), "{err:?}");
        let state = limit(&registry);
        assert_eq!((state.limit, state.in_flight, state.overloads_total), (1, 0, 2));

        // Denied requests (not allowed, private) never reach the limiter.
        let mut policy =
            policy_in("svc.example", false, OutboundLimits::default(), unavailable, registry.clone());
        assert!(matches!(
            get(&mut policy, "http://other.example/", None).await.unwrap_err(),
            HttpError::HttpRequestDenied
        ));
        let private = FakeNetwork::new(&[&["10.0.0.1:80"]], serve(Some(busy)).await);
        let mut policy =
            policy_in("svc.example", false, OutboundLimits::default(), private, registry.clone());
        assert!(matches!(
            get(&mut policy, "http://svc.example/", None).await.unwrap_err(),
            HttpError::DestinationIpProhibited
        ));
        let state = limit(&registry);
        assert_eq!((state.successes_total, state.overloads_total, state.others_total), (3, 2, 0));
    }

    #[tokio::test]
    async fn a_request_that_cannot_get_a_slot_in_time_fails_as_a_connect_timeout() {
        let registry = Arc::new(Downstreams::new());
        // Another invocation of the same function holds both slots of the initial limit.
        let held = [
            registry.acquire("t", "f", "svc.example:80").await,
            registry.acquire("t", "f", "svc.example:80").await,
        ];
        assert!(registry.saturated("t", "f"));
        let network = FakeNetwork::new(&[&["93.184.216.34:80"]], server(false).await);
        let mut policy =
            policy_in("svc.example", false, OutboundLimits::default(), network.clone(), registry.clone());
        let short = RequestOptions { connect_timeout: Some(Duration::from_millis(50)), ..Default::default() };
        let err = get(&mut policy, "http://svc.example/", Some(short)).await.unwrap_err();
        assert!(matches!(err, HttpError::ConnectionTimeout), "{err:?}");
        assert!(network.connects().is_empty(), "it never connected");
        let state = &registry.snapshot("t", "f")[0];
        assert_eq!((state.in_flight, state.waiting, state.overloads_total), (2, 0, 0), "gave up its place");
        assert!(system_lines(&policy).contains("timed out waiting for a slot"));

        // Once a slot frees, the request goes through.
        drop(held);
        assert_eq!(get(&mut policy, "http://svc.example/", None).await.unwrap(), "pong");
    }

    /// A resolver that answers `fast.example` at once with a public address (the test server
    /// stands in for it) and never answers any other name, counting the lookups in flight: an
    /// abandoned lookup is dropped, which takes it off the count.
    struct SlowNames {
        in_flight: Arc<AtomicUsize>,
        server: SocketAddr,
    }

    struct InFlight(Arc<AtomicUsize>);

    impl Drop for InFlight {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl Network for SlowNames {
        fn resolve(&self, host: &str, port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>> {
            if host == "fast.example" {
                return Box::pin(async move { Ok(vec![SocketAddr::from(([93, 184, 216, 34], port))]) });
            }
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            let in_flight = InFlight(self.in_flight.clone());
            Box::pin(async move {
                let _in_flight = in_flight;
                std::future::pending().await
            })
        }

        fn connect(&self, _addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> {
            Box::pin(TcpStream::connect(self.server))
        }
    }

    fn connect_within(ms: u64) -> Option<RequestOptions> {
        Some(RequestOptions { connect_timeout: Some(Duration::from_millis(ms)), ..Default::default() })
    }

    /// A name the name server never answers costs the request its connect timeout (the guest's
    /// own, shorter than the resolver's per-query one), and fails as a DNS timeout.
    #[tokio::test]
    async fn an_unanswered_name_fails_as_a_dns_timeout_within_the_connect_timeout() {
        let (name_server, queries) = crate::dns::tests::name_server(false);
        let resolver = crate::dns::tests::resolver_of(name_server, &crate::dns::DnsConfig::default());
        let egress = Egress::system(resolver, 16);
        let registry = Arc::new(Downstreams::new());
        let mut policy =
            policy_of("t", &["slow.example"], false, OutboundLimits::default(), egress, registry.clone());
        let started = std::time::Instant::now();
        let err = get(&mut policy, "http://slow.example/", connect_within(200)).await.unwrap_err();
        assert!(matches!(err, HttpError::DnsTimeout), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
        assert!(queries.load(Ordering::SeqCst) > 0, "the name server was asked");
        assert!(registry.snapshot("t", "f").is_empty(), "no downstream permit was taken");
    }

    /// One tenant's slow lookups fill only its own slots: its next request, even for a name
    /// that would answer at once, waits for one (and fails as a DNS timeout when its connect
    /// timeout passes first, without reaching the resolver), while another tenant's goes through.
    #[tokio::test]
    async fn a_tenant_has_at_most_its_lookups_in_flight() {
        let server = server(false).await;
        let in_flight = Arc::new(AtomicUsize::new(0));
        let network = Arc::new(SlowNames { in_flight: in_flight.clone(), server });
        let egress = Egress { network, lookups: Arc::new(TenantLookups::new(2)) };
        let registry = Arc::new(Downstreams::new());
        let policy = |tenant: &str| {
            let allow = ["slow-0.example", "slow-1.example", "fast.example"];
            policy_of(tenant, &allow, false, OutboundLimits::default(), egress.clone(), registry.clone())
        };
        let slow: Vec<_> = (0..2)
            .map(|i| {
                let mut policy = policy("t");
                tokio::spawn(async move {
                    get(&mut policy, &format!("http://slow-{i}.example/"), connect_within(60_000)).await
                })
            })
            .collect();
        crate::dns::tests::until_at_least(&in_flight, 2).await;

        let mut t = policy("t");
        let err = get(&mut t, "http://fast.example/", connect_within(100)).await.unwrap_err();
        assert!(matches!(err, HttpError::DnsTimeout), "{err:?}");
        assert!(system_lines(&t).contains("this tenant already had 2 name lookups in flight"));
        let mut u = policy("u");
        assert_eq!(get(&mut u, "http://fast.example/", connect_within(100)).await.unwrap(), "pong");
        assert_eq!(in_flight.load(Ordering::SeqCst), 2);

        // Abandoned lookups give their slots back.
        for request in slow {
            request.abort();
            assert!(request.await.unwrap_err().is_cancelled());
        }
        assert_eq!(in_flight.load(Ordering::SeqCst), 0);
        assert_eq!(get(&mut t, "http://fast.example/", connect_within(100)).await.unwrap(), "pong");
    }
}
