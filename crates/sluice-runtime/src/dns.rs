//! Name resolution for guests' outbound HTTP: the node's one resolver (hickory-resolver, set up
//! once from `/etc/resolv.conf` and `/etc/hosts`, with a bounded cache) and the bound on each
//! tenant's lookups in flight.
//!
//! A lookup must never hold a thread. The getaddrinfo this replaces ran on tokio's shared
//! blocking pool, and a lookup the caller had given up on kept its thread until the C library
//! gave up too, so a guest asking for slow or nonexistent names in a loop could hold every
//! blocking thread that other tenants' artifact loads (`code`) need. Here a lookup is a task on
//! the resolver's own runtime (one thread, never blocked: its sockets are non-blocking), and it
//! is aborted as soon as its caller stops waiting for it.
//!
//! This module does not decide which names or addresses a guest may reach: that is `outbound`'s.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver as HickoryResolver, TokioResolver};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};

/// Settings of the node's resolver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsConfig {
    /// Answers the resolver keeps, one per name and record type (a lookup asks for A and AAAA, so
    /// it keeps up to two). Least useful out first; a guest asking for ever new names only
    /// replaces entries. An answer is at most 64 KiB (most are under 512 B).
    pub cache_entries_max: u64,
    /// Longest an answer is kept, whatever its TTL says: a changed record is seen within this.
    pub positive_ttl_max: Duration,
    /// Longest a "no such name" or "no address" answer is kept.
    pub negative_ttl_max: Duration,
    /// Lookups one tenant may have in flight on this node; more wait, within their request's
    /// connect timeout.
    pub lookups_per_tenant_max: u32,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            cache_entries_max: 1024,
            positive_ttl_max: Duration::from_secs(5 * 60),
            negative_ttl_max: Duration::from_secs(30),
            lookups_per_tenant_max: 16,
        }
    }
}

/// The node's resolver. Its lookups and the tasks that drive its sockets run on a runtime of its
/// own, on one thread at normal priority: hickory spawns a connection's background task on
/// whichever runtime makes the first request through it and reuses the connection for every
/// later one, which here could be the slow lane (`SCHED_IDLE`), where everyone's answers would
/// then wait for the CPU that spinning guests leave over.
pub(crate) struct Resolver {
    resolver: Arc<TokioResolver>,
    runtime: tokio::runtime::Handle,
    /// Dropped with the resolver, which ends its thread.
    _stop: oneshot::Sender<()>,
}

impl Resolver {
    /// The system's configuration (`/etc/resolv.conf`: name servers, search list, `ndots`,
    /// `timeout`, `attempts`), or, where it cannot be read, the name server on this machine
    /// (what glibc falls back to). `/etc/hosts` is read once, here; `localhost` needs neither.
    pub(crate) fn from_system(config: &DnsConfig) -> io::Result<Self> {
        let system = hickory_resolver::system_conf::read_system_conf();
        let (servers, options) = system.unwrap_or_else(|err| {
            tracing::warn!(
                %err,
                "cannot read the system's resolver configuration; outbound HTTP asks the name \
                 server on 127.0.0.1"
            );
            let local = NameServerConfig::udp_and_tcp(IpAddr::V4(Ipv4Addr::LOCALHOST));
            (ResolverConfig::from_name_servers(vec![local]), ResolverOpts::default())
        });
        Self::new(servers, options, config)
    }

    /// A resolver asking `servers`, with `options` (the per-query timeout and attempts, the
    /// search list) and the bounds of `config`.
    pub(crate) fn new(
        servers: ResolverConfig,
        mut options: ResolverOpts,
        config: &DnsConfig,
    ) -> io::Result<Self> {
        options.cache_size = config.cache_entries_max;
        options.positive_min_ttl = Some(Duration::ZERO);
        options.positive_max_ttl = Some(config.positive_ttl_max);
        options.negative_min_ttl = Some(Duration::ZERO);
        options.negative_max_ttl = Some(config.negative_ttl_max);
        // Both families at once, IPv4 first: `connect_first` tries addresses in order, and a host
        // without IPv6 routes fails an IPv6 address only after a round trip or worse.
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        options.use_hosts_file = ResolveHosts::Always;
        let resolver = HickoryResolver::builder_with_config(servers, TokioRuntimeProvider::default())
            .with_options(options)
            .build()
            .map_err(io::Error::other)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            // Nothing of the resolver's blocks; a blocking thread here would be a bug.
            .max_blocking_threads(1)
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new().name("sluice-dns".into()).spawn(move || {
            // Ends when the resolver is dropped; dropping the runtime then aborts its lookups.
            let _ = runtime.block_on(stopped);
        })?;
        Ok(Self { resolver: Arc::new(resolver), runtime: handle, _stop: stop })
    }

    /// The addresses of `host`, each with `port`. An IP address is returned as it is (callers
    /// should not ask). The lookup runs on the resolver's runtime and is aborted when the
    /// returned future is dropped.
    pub(crate) fn lookup(&self, host: &str, port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>> {
        let resolver = self.resolver.clone();
        let host = host.to_string();
        let task = AbortOnDrop(self.runtime.spawn(async move { resolver.lookup_ip(host.as_str()).await }));
        Box::pin(async move {
            match task.await {
                Ok(Ok(ips)) => Ok(ips.iter().map(|ip| SocketAddr::new(ip, port)).collect()),
                Ok(Err(err)) if err.is_no_records_found() => {
                    Err(io::Error::new(io::ErrorKind::NotFound, err.to_string()))
                }
                Ok(Err(hickory_resolver::net::NetError::Timeout)) => {
                    Err(io::Error::new(io::ErrorKind::TimedOut, "name lookup timed out"))
                }
                Ok(Err(err)) => Err(io::Error::other(err.to_string())),
                // The resolver's runtime is gone (the node is shutting down).
                Err(err) => Err(io::Error::other(err.to_string())),
            }
        })
    }
}

/// A task that is aborted when its handle is dropped: a caller that stops waiting for a lookup
/// (its connect timeout passed, its guest was cancelled) leaves nothing running.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Each tenant's lookups in flight on this node, at most [`DnsConfig::lookups_per_tenant_max`]:
/// one tenant's guests asking for slow names cannot fill the resolver (its queries, sockets and
/// tasks) for the others. A tenant with no lookup in flight leaves only a dead entry behind,
/// swept when a new tenant is added.
pub(crate) struct TenantLookups {
    max: u32,
    by_tenant: Mutex<HashMap<Arc<str>, Weak<Semaphore>>>,
}

impl TenantLookups {
    pub(crate) fn new(max: u32) -> Self {
        assert!(max > 0, "a tenant must be able to make one lookup");
        Self { max, by_tenant: Mutex::default() }
    }

    /// A slot for one lookup of `tenant`, waiting until `deadline`; `None` when it passed first.
    pub(crate) async fn acquire(&self, tenant: &Arc<str>, deadline: Instant) -> Option<OwnedSemaphorePermit> {
        let semaphore = {
            let mut map = self.by_tenant.lock().expect("tenant lookups lock");
            match map.get(tenant).and_then(Weak::upgrade) {
                Some(s) => s,
                None => {
                    map.retain(|_, s| s.strong_count() > 0);
                    let s = Arc::new(Semaphore::new(self.max as usize));
                    map.insert(tenant.clone(), Arc::downgrade(&s));
                    s
                }
            }
        };
        timeout_at(deadline, semaphore.acquire_owned()).await.ok()?.ok()
    }

    pub(crate) fn max(&self) -> u32 {
        self.max
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::UdpSocket;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hickory_resolver::proto::op::{Message, MessageType, OpCode};
    use hickory_resolver::proto::rr::rdata::{A, AAAA};
    use hickory_resolver::proto::rr::{RData, Record, RecordType};

    use super::*;

    /// A name server on 127.0.0.1 that counts the queries it receives and answers none (or, if
    /// `answer`, every A and AAAA query, with an hour's TTL). Its thread lives as long as the
    /// test process.
    pub(crate) fn name_server(answer: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let queries = Arc::new(AtomicUsize::new(0));
        let counted = queries.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf) else { return };
                counted.fetch_add(1, Ordering::SeqCst);
                if !answer {
                    continue;
                }
                let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
                let mut response = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
                response.metadata.recursion_desired = query.metadata.recursion_desired;
                response.metadata.recursion_available = true;
                for q in &query.queries {
                    let rdata = match q.query_type() {
                        RecordType::A => RData::A(A::new(93, 184, 216, 34)),
                        RecordType::AAAA => RData::AAAA(AAAA::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
                        _ => continue,
                    };
                    response.add_answer(Record::from_rdata(q.name().clone(), 3600, rdata));
                }
                response.add_queries(query.queries.clone());
                let _ = socket.send_to(&response.to_vec().unwrap(), from);
            }
        });
        (addr, queries)
    }

    /// A resolver that asks only `server`, over UDP, waiting a minute for each answer: whatever
    /// ends a lookup in these tests, it is not the resolver's own timeout.
    pub(crate) fn resolver_of(server: SocketAddr, config: &DnsConfig) -> Resolver {
        let mut ns = NameServerConfig::udp(server.ip());
        ns.connections[0].port = server.port();
        let mut options = ResolverOpts::default();
        options.timeout = Duration::from_secs(60);
        options.attempts = 1;
        Resolver::new(ResolverConfig::from_name_servers(vec![ns]), options, config).unwrap()
    }

    /// Waits (up to 10 s) until `count` reaches `n`.
    pub(crate) async fn until_at_least(count: &AtomicUsize, n: usize) {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while count.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "only {} of {n}", count.load(Ordering::SeqCst));
    }

    /// The promise of this module: lookups that hang hold no thread of the caller's blocking pool.
    /// With two blocking threads, 32 lookups that are never answered would have held both (the
    /// getaddrinfo this replaced ran each on one) and the artifact load would wait behind them.
    #[test]
    fn lookups_that_hang_leave_the_blocking_pool_alone() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (server, queries) = name_server(false);
            let resolver = resolver_of(server, &DnsConfig::default());
            let hanging: Vec<_> =
                (0..32).map(|i| tokio::spawn(resolver.lookup(&format!("slow-{i}.example"), 80))).collect();
            // Every lookup has asked (A and AAAA each), and none has an answer.
            until_at_least(&queries, 64).await;
            assert!(hanging.iter().all(|h| !h.is_finished()));
            let load = tokio::task::spawn_blocking(|| "loaded");
            let loaded = tokio::time::timeout(Duration::from_secs(5), load).await;
            assert_eq!(loaded.expect("a blocking task ran while the lookups hung").unwrap(), "loaded");
            // A lookup given up on is aborted, on the resolver's runtime too.
            for h in &hanging {
                h.abort();
            }
            for h in hanging {
                assert!(h.await.unwrap_err().is_cancelled());
            }
        });
    }

    /// A guest asking for ever new names only replaces cache entries: after 300 names (600
    /// answers), asking for them all again finds at most the cache's capacity of them cached.
    #[tokio::test]
    async fn the_cache_keeps_at_most_its_capacity() {
        let (server, queries) = name_server(true);
        let config = DnsConfig { cache_entries_max: 16, ..DnsConfig::default() };
        let resolver = resolver_of(server, &config);

        // It caches: the same name twice asks once (A and AAAA).
        for _ in 0..2 {
            let addrs = resolver.lookup("again.example", 443).await.unwrap();
            let want: Vec<SocketAddr> =
                vec!["93.184.216.34:443".parse().unwrap(), "[2001:db8::1]:443".parse().unwrap()];
            assert_eq!(addrs, want, "IPv4 first");
        }
        assert_eq!(queries.load(Ordering::SeqCst), 2);

        let names: Vec<String> = (0..300).map(|i| format!("n{i}.example")).collect();
        for name in &names {
            resolver.lookup(name, 80).await.unwrap();
        }
        let asked = queries.load(Ordering::SeqCst);
        assert_eq!(asked, 2 + 600);
        for name in &names {
            resolver.lookup(name, 80).await.unwrap();
        }
        let cached = 600 - (queries.load(Ordering::SeqCst) - asked);
        // moka, the cache, evicts in batches (after up to 64 writes or on reads), so a few more
        // than its capacity may be held for a moment.
        assert!(cached <= 16 + 64, "{cached} of 600 answers were still cached");
    }

    /// `localhost` is answered without a name server (RFC 6761), `/etc/hosts` names from the file.
    #[tokio::test]
    async fn localhost_never_asks_the_name_server() {
        let (server, queries) = name_server(false);
        let resolver = resolver_of(server, &DnsConfig::default());
        let addrs = resolver.lookup("localhost", 8080).await.unwrap();
        assert_eq!(addrs.first(), Some(&"127.0.0.1:8080".parse().unwrap()), "{addrs:?}");
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
        assert_eq!(queries.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_tenant_has_at_most_its_lookups_in_flight_and_others_have_theirs() {
        let lookups = TenantLookups::new(2);
        let (t, u): (Arc<str>, Arc<str>) = ("t".into(), "u".into());
        let soon = || Instant::now() + Duration::from_millis(50);
        let held = [lookups.acquire(&t, soon()).await.unwrap(), lookups.acquire(&t, soon()).await.unwrap()];
        assert!(lookups.acquire(&t, soon()).await.is_none(), "a third of t's waits past its deadline");
        let other = lookups.acquire(&u, soon()).await.expect("u's lookups are its own");
        drop(held);
        let again = lookups.acquire(&t, soon()).await.expect("a slot freed");
        drop((again, other));
        // Tenants with nothing in flight leave only dead entries, swept when a new one comes.
        drop(lookups.acquire(&"v".into(), soon()).await.unwrap());
        let live = lookups.by_tenant.lock().unwrap().values().filter(|s| s.strong_count() > 0).count();
        assert_eq!(live, 0);
    }
}
