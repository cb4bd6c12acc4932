//! `sluice serve`: run a node on the embedded store in `--data-dir`. This file maps the flags to
//! a checked `sluice_node::Config`; `sluice_node::run` builds and runs the node.
//!
//! Configuration is checked before the socket is bound; the one line a script or test waits for
//! is `listening on http://ADDR/` on stderr, with the real address (also for `--listen` port 0).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use sluice_core::Limits;
use sluice_core::units::{parse_bytes, parse_duration};
use sluice_gateway::NodeConfig;
use sluice_gateway::admission::Rate;
use sluice_node::{CodeConfig, CompileIn, LaneConfig, RuntimeConfig, WarmConfig};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Directory of the embedded store, the artifact cache and admin.token.
    #[arg(long, env = "SLUICE_DATA_DIR", default_value = "./.sluice")]
    pub data_dir: PathBuf,
    /// Serve HTTPS (HTTP/2 and HTTP/1.1 by ALPN) with this certificate chain (PEM), with
    /// --tls-key. Replacing the files (or SIGHUP) loads the new certificate for new connections
    /// without dropping open ones.
    #[arg(long, env = "SLUICE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, env = "SLUICE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Where the node keeps its state: `sqlite` (the embedded store in --data-dir) or a
    /// PostgreSQL URL, `postgres://user@host:5432/db`, shared by every node of a cluster (each
    /// node still keeps its compiled artifacts in its own --data-dir).
    #[arg(long, env = "SLUICE_STORE", default_value = "sqlite")]
    pub store: String,
    /// HTTP worker threads, each with its own runtime and socket. Default: one per core.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Do not count anything for `/metrics` (it then answers 404): for measuring what counting
    /// costs.
    #[arg(long)]
    pub no_metrics: bool,
    /// Also serve `GET /metrics` without a key on this address (for a scraper on a private
    /// network); the node's own address always needs an admin key or the `metrics` scope.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Functions (tenant, function pairs) with their own series in `/metrics`; later ones are
    /// counted together under `tenant="_other", function="_other"`.
    #[arg(long, default_value_t = 1000)]
    pub metrics_functions_max: usize,
    /// Format of the node's own log lines on stderr: `text` or `json` (one object per line).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Log one line per call (and per async attempt) with its invocation id, status and
    /// duration, at the `sluice::access` target.
    #[arg(long)]
    pub access_log: bool,
    /// Export OpenTelemetry traces over OTLP/HTTP to this collector, e.g.
    /// http://127.0.0.1:4318 (`/v1/traces` is added): spans for each call's gateway, queue
    /// wait, run and outbound requests. The OTEL_BSP_* and OTEL_TRACES_SAMPLER variables apply.
    #[arg(long, env = "SLUICE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Let guests call loopback and private addresses that are in their allow list (off:
    /// such addresses are refused even when allowed by name).
    #[arg(long)]
    pub outbound_allow_private: bool,
    /// Largest request head (all header bytes), e.g. 64KiB.
    #[arg(long, default_value = "64KiB", value_parser = parse_bytes)]
    pub header_bytes_max: u64,
    /// Most request header fields.
    #[arg(long, default_value_t = 100)]
    pub header_count_max: usize,
    /// Time a client has to send the whole request head, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// Largest body of a synchronous call, e.g. 6MiB.
    #[arg(long, default_value = "6MiB", value_parser = parse_bytes)]
    pub sync_body_max: u64,
    /// Largest body of an async call (stored whole in the queue), e.g. 1MiB.
    #[arg(long, default_value = "1MiB", value_parser = parse_bytes)]
    pub async_body_max: u64,
    /// Every tenant's rate limit in calls per second (0: unlimited).
    #[arg(long, default_value_t = 0.0)]
    pub tenant_rate: f64,
    /// Every tenant's burst (default: the rate, rounded up).
    #[arg(long)]
    pub tenant_burst: Option<u32>,
    /// Control API (`/v1`, `/metrics`) requests per second of one API key; over it, 429 with
    /// Retry-After. Admin keys have no rate limit.
    #[arg(long, default_value_t = 100.0)]
    pub api_rate: f64,
    /// Burst of `--api-rate` (default: twice the rate).
    #[arg(long)]
    pub api_burst: Option<u32>,
    /// Control API requests of one tenant's keys (or of all callers without a valid key) in
    /// flight at once; beyond it, 429 at once. Admin keys have no share, only the node's bound.
    #[arg(long, default_value_t = 16)]
    pub api_tenant_inflight_max: usize,
    /// Control API requests in flight at once on this node; beyond it, 503 at once. They share
    /// the control runtime with the scheduler and the heartbeats.
    #[arg(long, default_value_t = 64)]
    pub api_inflight_max: usize,
    /// Calls per second that each tenant's public functions take from callers without a key of
    /// the tenant, together: a bucket of its own per tenant, within the tenant's rate, so that
    /// anonymous traffic cannot take all of it (0: no such bucket).
    #[arg(long, default_value_t = 1000.0)]
    pub anonymous_rate: f64,
    /// Keyless calls each tenant's public functions take at once above --anonymous-rate.
    #[arg(long, default_value_t = 2000)]
    pub anonymous_burst: u32,
    /// Each tenant's unfinished async invocations (queued, running, waiting for a retry) at
    /// most, unless it has its own (`tenants limits --queued-max`); beyond it async calls get 429.
    #[arg(long, default_value_t = sluice_core::UsageLimits::QUEUED_MAX_DEFAULT)]
    pub tenant_queued_max: u64,
    /// Bytes of each tenant's unfinished async invocations' requests (body plus header names and
    /// values) at most, e.g. 1GiB; beyond it async calls get 429.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    pub tenant_queued_bytes_max: u64,
    /// Bytes of each tenant's uploaded components at most, e.g. 2GiB; beyond it uploads get 507.
    #[arg(long, default_value = "2GiB", value_parser = parse_bytes)]
    pub tenant_components_bytes_max: u64,
    /// Functions of each tenant at most; a deploy of one more gets 507.
    #[arg(long, default_value_t = sluice_core::UsageLimits::FUNCTIONS_MAX_DEFAULT)]
    pub tenant_functions_max: u64,
    /// Versions each tenant stores over all its functions at most (twice --versions-kept for
    /// each of --tenant-functions-max functions); a deploy beyond it gets 507.
    #[arg(long, default_value_t = sluice_core::UsageLimits::VERSIONS_MAX_DEFAULT)]
    pub tenant_versions_max: u64,
    /// Schedules of each tenant at most; creating one more gets 507.
    #[arg(long, default_value_t = sluice_core::UsageLimits::SCHEDULES_MAX_DEFAULT)]
    pub tenant_schedules_max: u64,
    /// How often the node re-reads every tenant's unfinished async invocations for the queued
    /// quotas, e.g. 5s. In between it counts only its own enqueues and completions: on a cluster
    /// of N nodes a tenant may queue up to N times its quota for this long.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub quota_refresh: Duration,
    /// The fraction of the node's sync calls in flight and async calls being accepted (and, at
    /// least half, of its uploads and deploys) that one tenant (its keys and its public
    /// functions' anonymous callers) may hold; beyond it the tenant's new ones get 429 at once
    /// (1: no share). Also a tenant's share of the heavy slots (--heavy-slots-max): there calls
    /// wait instead, and a freed slot goes to a tenant under its share before one beyond it.
    #[arg(long, default_value_t = 0.25)]
    pub tenant_share: f64,
    /// Sync calls running at once on this node; beyond it new calls get 503 at once.
    #[arg(long, default_value_t = 512)]
    pub sync_inflight_max: usize,
    /// Async invocations running at once on this node.
    #[arg(long, default_value_t = 256)]
    pub async_inflight_max: usize,
    /// Fraction of the node's cores that guests may use before async work beyond tenants'
    /// reservations waits (0.05-1): calls with a wide start window are held for a trough.
    #[arg(long, default_value_t = 0.8)]
    pub utilization_target: f64,
    /// An async call whose deadline is this close starts whatever the node's load (its expected
    /// run time plus slack), e.g. 30s.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub promote_ahead: Duration,
    /// A schedule's occurrence is missed once it is this late (no node ran for a while, or the
    /// store was down): its catch-up policy decides whether it still fires, e.g. 5s (at least 1s
    /// more than a tick, 200ms).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub schedule_missed_after: Duration,
    /// How far ahead of an occurrence a node may enqueue it, runnable at the occurrence, so a
    /// burst of schedules due in one second is stored before that second, e.g. 5s; 0: only when
    /// due. An occurrence fired ahead chose its version then; pausing or deleting the schedule
    /// takes it back.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub schedule_fire_ahead: Duration,
    /// The only brokers triggers may connect to, comma-separated `host:port` or `host` (any
    /// port), e.g. 127.0.0.1:4222,rabbit.internal. Unset: any broker the node can reach (a
    /// tenant's trigger can then probe the node's network; set this where tenants are not
    /// trusted).
    #[arg(long, value_delimiter = ',')]
    pub trigger_brokers: Option<Vec<String>>,
    /// Async calls reading their body at once, and as many waiting for their commit (each holds
    /// up to its body); a tenant may take a quarter of each. Beyond a tenant's share its new calls
    /// get 429 at once, beyond the node's 503.
    #[arg(long, default_value_t = 256)]
    pub async_enqueue_inflight_max: usize,
    /// Component uploads and deploys in flight at once (each holds up to a component while it is
    /// read, waits for a compile slot and compiles); a tenant may take half. Beyond a
    /// tenant's share its new ones get 429 at once, beyond the node's 503.
    #[arg(long, default_value_t = 8)]
    pub deploy_inflight_max: usize,
    /// Lease of an async invocation; renewed every third of it while it runs, reclaimed by
    /// another node (or this one after a restart) when it lapses, e.g. 30s.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub lease: Duration,
    /// How long finished invocations (status, response, logs) are kept, e.g. 7days.
    #[arg(long, default_value = "7days", value_parser = parse_duration)]
    pub retention: Duration,
    /// How long an uploaded component that no version uses is kept before it is removed (with
    /// its compiled artifact), counted from its last upload, e.g. 1h.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub blob_grace: Duration,
    /// Versions of each function kept: older ones are deleted (with their components, after
    /// --blob-grace) unless an unfinished async invocation still names them. 0 keeps every
    /// version.
    #[arg(long, default_value_t = 10)]
    pub versions_kept: u32,
    /// Compiled components kept loaded, at most: beyond it the least recently used is dropped
    /// (and mapped again from its artifact on its next call).
    #[arg(long, default_value_t = 1000)]
    pub code_cache_entries: u64,
    /// Artifact bytes of the compiled components kept loaded, at most, e.g. 512MiB.
    #[arg(long, default_value = "512MiB", value_parser = parse_bytes)]
    pub code_cache: u64,
    /// Compiles running at once (each uses every core, at a lower priority than calls).
    #[arg(long, default_value_t = 1)]
    pub compile_slots: usize,
    /// Address space of one compile, e.g. 4GiB: each compile runs in a child process that gives
    /// all its memory back when it exits, and a component that needs more to compile is refused.
    #[arg(long, default_value = "4GiB", value_parser = parse_bytes)]
    pub compile_memory: u64,
    /// Time one compile may take, e.g. 5m; past it the compile is killed and the component
    /// refused.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub compile_timeout: Duration,
    /// Largest component upload, e.g. 64MiB.
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes)]
    pub upload_max: u64,
    /// Time a client has to send the whole body of an upload or an async call, e.g. 30s; past
    /// it the call gets 408.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub body_read_timeout: Duration,
    /// Component instances alive at once on this node (sizes the instance pool).
    #[arg(long, default_value_t = 1000)]
    pub instances_max: u32,
    /// Time in-flight calls get to finish on shutdown, e.g. 30s.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Bytes of each freed instance's linear memory kept resident and reset in place (only the
    /// pages it dirtied) instead of returned to the kernel. Larger values make guests that use a
    /// lot of memory (up to this much) much cheaper to run again, at the cost of RSS: every pool
    /// slot that held such a guest keeps up to this much resident. e.g. 4MiB, 64MiB.
    #[arg(long, default_value = "4MiB", value_parser = parse_bytes)]
    pub memory_keep_resident: u64,
    /// Idle warm instances (of functions deployed with --reuse) kept on this node at most, over
    /// all functions; each holds an instance slot and the memory its guest touched.
    #[arg(long, default_value_t = 32)]
    pub warm_instances_max: usize,
    /// Instances of one heavy function version (8 MiB or more of initial memory, e.g. Python or
    /// JavaScript) alive at once, unless it sets its own (`deploy --instances`); more calls
    /// wait. Default: --heavy-memory-max divided by the component's initial memory.
    #[arg(long)]
    pub heavy_instances_max: Option<u32>,
    /// Initial memory of one heavy version's instances alive at once, together, e.g. 40MiB:
    /// two instances of a 15 MiB Python component, four of a 9 MiB JavaScript one.
    #[arg(long, default_value = "40MiB", value_parser = parse_bytes)]
    pub heavy_memory_max: u64,
    /// Instances of heavy components alive at once on this node, over all of them (default: 4
    /// per core). Heavy components copy their memory image into pages kept resident instead of
    /// mapping it copy-on-write, so each slot keeps up to --heavy-memory-keep-resident. More
    /// calls wait for a slot: a tenant alone may use them all, but a freed slot goes first to a
    /// waiting call of a tenant holding less than its --tenant-share of them.
    #[arg(long)]
    pub heavy_slots_max: Option<u32>,
    /// Bytes of a heavy instance's memory kept resident in its slot after it ends (only the
    /// pages it dirtied are reset), e.g. 64MiB: at least the image of the largest heavy
    /// component, or its instances fault their image in again.
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes)]
    pub heavy_memory_keep_resident: u64,
    /// Initial memory from which a component is heavy (its own engine, bounded instances), e.g.
    /// 8MiB. A component is placed when it is compiled: artifacts already on disk keep theirs.
    #[arg(long, default_value = "8MiB", value_parser = parse_bytes)]
    pub heavy_from: u64,
    /// Idle warm instances kept per function version at most.
    #[arg(long, default_value_t = 8)]
    pub warm_per_function_max: usize,
    /// Linear memory of all idle warm instances at most, e.g. 512MiB: an instance that would go
    /// beyond it is dropped instead of kept.
    #[arg(long, default_value = "512MiB", value_parser = parse_bytes)]
    pub warm_memory_max: u64,
    /// Time a call may spend on a thread before it leaves the fast lane (its core's HTTP worker)
    /// for the slow lane, whose threads run at the lowest OS priority, e.g. 2ms.
    #[arg(long, default_value = "2ms", value_parser = parse_duration)]
    pub fast_lane_slice: Duration,
    /// Threads of the slow lane. Default: one per core.
    #[arg(long)]
    pub slow_lane_threads: Option<usize>,
    /// Calls running on the slow lane at once on this node; more wait (the wait counts against
    /// their timeout). Default: 4 per core.
    #[arg(long)]
    pub slow_lane_slots: Option<usize>,
    /// Calls of one tenant running on the slow lane at once. Default: one per core.
    #[arg(long)]
    pub slow_lane_tenant_slots: Option<usize>,
    /// A function's share of its tenant's slow-lane slots: it holds more only while no other
    /// function of the tenant waits for one, and gives them back at its next yield (1 ms) when
    /// one does. Default: half the tenant's slots, rounded up.
    #[arg(long)]
    pub slow_lane_function_share: Option<usize>,
    /// For tests of the supervisor: a background task that panics this long after start.
    #[arg(long, hide = true, value_parser = parse_duration)]
    pub test_panic_task_after: Option<Duration>,
    /// For tests of the API runtime's isolation: every `/v1` request blocks its thread this
    /// long before it is handled, as a CPU-bound handler would.
    #[arg(long, hide = true, value_parser = parse_duration)]
    pub test_api_stall: Option<Duration>,
}

/// Shortest `--lease`: it is renewed every third of it, and a renewal is a store write.
const LEASE_MIN: Duration = Duration::from_secs(1);
/// Longest `--lease`: how long the invocations of a dead node wait before another takes them.
const LEASE_MAX: Duration = Duration::from_secs(60 * 60);
/// Shortest `--retention`: finished invocations must stay readable for at least a moment.
const RETENTION_MIN: Duration = Duration::from_secs(1);
/// Longest `--retention`, so that "now minus retention" stays a representable time.
const RETENTION_MAX: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);
/// Longest `--shutdown-grace`, `--body-read-timeout` and `--header-read-timeout`: far beyond any
/// real use, but small enough that timers computed from them cannot overflow.
const TIMEOUT_MAX: Duration = Duration::from_secs(60 * 60);

/// Checks that `value` of `flag` lies in `min..=max`, naming the flag and the bounds if not.
fn check_duration(flag: &str, value: Duration, min: Duration, max: Duration) -> anyhow::Result<()> {
    use sluice_core::units::format_duration;
    anyhow::ensure!(
        (min..=max).contains(&value),
        "{flag} must be between {} and {}, got {}",
        format_duration(min),
        format_duration(max),
        format_duration(value)
    );
    Ok(())
}

impl ServeArgs {
    /// Every duration flag, checked before anything starts: a zero or absurd duration would
    /// otherwise surface later as a panicking timer in a background task.
    fn check_durations(&self) -> anyhow::Result<()> {
        let nanosecond = Duration::from_nanos(1);
        check_duration("--lease", self.lease, LEASE_MIN, LEASE_MAX)?;
        check_duration("--retention", self.retention, RETENTION_MIN, RETENTION_MAX)?;
        check_duration("--blob-grace", self.blob_grace, RETENTION_MIN, RETENTION_MAX)?;
        check_duration("--shutdown-grace", self.shutdown_grace, Duration::ZERO, TIMEOUT_MAX)?;
        check_duration("--header-read-timeout", self.header_read_timeout, nanosecond, TIMEOUT_MAX)?;
        check_duration("--body-read-timeout", self.body_read_timeout, nanosecond, TIMEOUT_MAX)?;
        check_duration("--quota-refresh", self.quota_refresh, Duration::from_millis(100), TIMEOUT_MAX)?;
        Ok(())
    }

    fn limits(&self) -> anyhow::Result<Limits> {
        anyhow::ensure!(self.header_count_max >= 1, "--header-count-max must be at least 1");
        anyhow::ensure!(self.header_bytes_max >= 1024, "--header-bytes-max must be at least 1KiB");
        anyhow::ensure!(self.instances_max >= 1, "--instances-max must be at least 1");
        anyhow::ensure!(
            self.async_enqueue_inflight_max >= 1,
            "--async-enqueue-inflight-max must be at least 1"
        );
        anyhow::ensure!(self.deploy_inflight_max >= 1, "--deploy-inflight-max must be at least 1");
        anyhow::ensure!(
            (0.05..=1.0).contains(&self.utilization_target),
            "--utilization-target must be between 0.05 and 1, got {}",
            self.utilization_target
        );
        self.check_durations()?;
        self.usage_limits()?;
        self.anonymous_rate()?;
        self.lanes()?;
        self.code()?;
        anyhow::ensure!(
            self.memory_keep_resident <= 1 << 30,
            "--memory-keep-resident must be at most 1GiB (the largest function memory)"
        );
        Ok(Limits {
            header_bytes_max: self.header_bytes_max as usize,
            header_count_max: self.header_count_max,
            header_read_timeout: self.header_read_timeout,
            sync_body_bytes_max: self.sync_body_max,
            async_body_bytes_max: self.async_body_max,
            upload_bytes_max: self.upload_max,
            body_read_timeout: self.body_read_timeout,
            instances_max: self.instances_max,
            shutdown_grace: self.shutdown_grace,
            ..Limits::default()
        })
    }
}

impl ServeArgs {
    /// The tenants' default usage quotas; each at least 1 (0 would refuse every tenant) and
    /// storable.
    fn usage_limits(&self) -> anyhow::Result<sluice_core::UsageLimits> {
        for (flag, value) in [
            ("--tenant-queued-max", self.tenant_queued_max),
            ("--tenant-queued-bytes-max", self.tenant_queued_bytes_max),
            ("--tenant-components-bytes-max", self.tenant_components_bytes_max),
            ("--tenant-functions-max", self.tenant_functions_max),
            ("--tenant-versions-max", self.tenant_versions_max),
            ("--tenant-schedules-max", self.tenant_schedules_max),
        ] {
            anyhow::ensure!(
                (1..=i64::MAX as u64).contains(&value),
                "{flag} must be between 1 and {}, got {value}",
                i64::MAX
            );
        }
        Ok(sluice_core::UsageLimits {
            queued_max: self.tenant_queued_max,
            queued_bytes_max: self.tenant_queued_bytes_max,
            components_bytes_max: self.tenant_components_bytes_max,
            functions_max: self.tenant_functions_max,
            versions_max: self.tenant_versions_max,
            schedules_max: self.tenant_schedules_max,
        })
    }

    /// The anonymous callers' rate, `None` for 0.
    fn anonymous_rate(&self) -> anyhow::Result<Option<Rate>> {
        use sluice_core::function::{RATE_PER_SEC_MAX, RATE_PER_SEC_MIN};
        if self.anonymous_rate == 0.0 {
            return Ok(None);
        }
        anyhow::ensure!(
            (RATE_PER_SEC_MIN..=RATE_PER_SEC_MAX).contains(&self.anonymous_rate),
            "--anonymous-rate must be 0 (off) or between {RATE_PER_SEC_MIN} and {RATE_PER_SEC_MAX}, got {}",
            self.anonymous_rate
        );
        anyhow::ensure!(self.anonymous_burst >= 1, "--anonymous-burst must be at least 1");
        Ok(Rate::of(Some(self.anonymous_rate), Some(self.anonymous_burst)))
    }

    fn code(&self) -> anyhow::Result<CodeConfig> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut code = CodeConfig::for_cores(cores);
        code.cache_entries_max = self.code_cache_entries;
        code.cache_bytes_max = self.code_cache;
        code.compile_slots = self.compile_slots;
        code.compile_memory_bytes_max = self.compile_memory;
        code.compile_timeout = self.compile_timeout;
        // Compiles run in this same binary's hidden `compile-worker` command. On Linux through
        // /proc/self/exe, which still names this binary after an upgrade replaced its file: the
        // child must compile for this node's engine, not the new one's.
        let proc_exe = std::path::PathBuf::from("/proc/self/exe");
        let program = if proc_exe.exists() {
            proc_exe
        } else {
            std::env::current_exe()
                .map_err(|e| anyhow::anyhow!("finding this executable, to compile components with it: {e}"))?
        };
        code.compile_in = CompileIn::Child { program, args: vec!["compile-worker".into()] };
        code.validate().map_err(|e| {
            anyhow::anyhow!(
                "{e} (--code-cache, --code-cache-entries, --compile-slots, --compile-memory, --compile-timeout)"
            )
        })?;
        Ok(code)
    }

    fn lanes(&self) -> anyhow::Result<LaneConfig> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut lanes = LaneConfig::for_cores(cores);
        lanes.fast_slice = self.fast_lane_slice;
        lanes.slow_threads = self.slow_lane_threads.unwrap_or(lanes.slow_threads);
        lanes.slow_slots_max = self.slow_lane_slots.unwrap_or(lanes.slow_slots_max);
        lanes.slow_slots_per_group_max =
            self.slow_lane_tenant_slots.unwrap_or(lanes.slow_slots_per_group_max);
        lanes.slow_slots_per_member_share =
            self.slow_lane_function_share.unwrap_or(lanes.slow_slots_per_group_max.div_ceil(2));
        lanes.validate().map_err(|e| {
            anyhow::anyhow!(
                "{e} (--fast-lane-slice, --slow-lane-threads, --slow-lane-slots, --slow-lane-tenant-slots, \
                 --slow-lane-function-share)"
            )
        })?;
        Ok(lanes)
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    init_tracing(args.log_format == "json", args.access_log);
    sluice_node::run(args.config()?)
}

impl ServeArgs {
    /// The node these flags describe, checked before anything starts.
    fn config(&self) -> anyhow::Result<sluice_node::Config> {
        let limits = self.limits()?;
        let workers =
            self.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        anyhow::ensure!((1..=256).contains(&workers), "--workers must be between 1 and 256");
        let mut node = NodeConfig::new(self.data_dir.clone());
        node.tenant_rate =
            (self.tenant_rate > 0.0).then(|| Rate::of(Some(self.tenant_rate), self.tenant_burst)).flatten();
        node.anonymous_rate = self.anonymous_rate()?;
        node.usage_limits = self.usage_limits()?;
        node.quota_refresh = self.quota_refresh;
        node.sync_inflight_max = self.sync_inflight_max;
        anyhow::ensure!(
            self.tenant_share > 0.0 && self.tenant_share <= 1.0,
            "--tenant-share must be above 0 and at most 1, got {}",
            self.tenant_share
        );
        node.tenant_share = self.tenant_share;
        node.async_inflight_max = self.async_inflight_max;
        node.utilization_target = self.utilization_target;
        node.promote_ahead = self.promote_ahead;
        anyhow::ensure!(
            self.schedule_missed_after >= Duration::from_millis(400),
            "--schedule-missed-after must be at least 400ms (two ticks), got {}",
            sluice_core::units::format_duration(self.schedule_missed_after)
        );
        node.schedule_missed_after = self.schedule_missed_after;
        anyhow::ensure!(
            self.schedule_fire_ahead <= Duration::from_secs(60),
            "--schedule-fire-ahead must be at most 60s, got {}",
            sluice_core::units::format_duration(self.schedule_fire_ahead)
        );
        node.schedule_fire_ahead = self.schedule_fire_ahead;
        node.trigger_brokers = self.trigger_brokers.clone();
        node.async_enqueue_inflight_max = self.async_enqueue_inflight_max;
        node.deploy_inflight_max = self.deploy_inflight_max;
        node.lease_ms = self.lease.as_millis() as u64;
        node.control = sluice_gateway::control::ControlConfig {
            key_rate: Rate {
                per_sec: self.api_rate,
                burst: self.api_burst.unwrap_or_else(|| (self.api_rate * 2.0).ceil().clamp(1.0, 1e9) as u32),
            },
            tenant_inflight_max: self.api_tenant_inflight_max,
            inflight_max: self.api_inflight_max,
        };
        node.control.validate().map_err(|e| {
            anyhow::anyhow!("{e} (--api-rate, --api-burst, --api-tenant-inflight-max, --api-inflight-max)")
        })?;
        node.test_api_stall = self.test_api_stall;
        let runtime = self.runtime(&limits)?;
        node.limits = limits;
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                Some(sluice_gateway::tls::TlsFiles { cert: cert.clone(), key: key.clone() })
            }
            _ => None,
        };
        Ok(sluice_node::Config {
            listen: self.listen,
            tls,
            workers,
            store: self.store.clone(),
            node,
            runtime,
            upkeep: sluice_node::Upkeep {
                retention: self.retention,
                blob_grace: self.blob_grace,
                versions_kept: (self.versions_kept > 0).then_some(self.versions_kept),
            },
            metrics_functions_max: (!self.no_metrics).then_some(self.metrics_functions_max),
            metrics_listen: self.metrics_listen,
            otlp_endpoint: self.otlp_endpoint.clone(),
            test_panic_task_after: self.test_panic_task_after,
        })
    }

    /// The runtime's settings: the node's limits, and the lane, heavy, warm and code flags.
    fn runtime(&self, limits: &Limits) -> anyhow::Result<RuntimeConfig> {
        let mut rt = RuntimeConfig::new(self.data_dir.join("artifacts"));
        rt.instances_max = limits.instances_max;
        rt.function_memory_bytes_max = limits.function_memory_bytes_max;
        rt.log_bytes_per_invocation_max = limits.log_bytes_per_invocation_max;
        rt.outbound = limits.outbound.clone();
        rt.outbound_allow_private = self.outbound_allow_private;
        rt.lanes = self.lanes()?;
        rt.memory_keep_resident_bytes = self.memory_keep_resident as usize;
        if let Some(n) = self.heavy_instances_max {
            anyhow::ensure!(n >= 1, "--heavy-instances-max must be at least 1");
            rt.heavy_instances_max = Some(n);
        }
        if let Some(n) = self.heavy_slots_max {
            anyhow::ensure!(
                (1..=self.instances_max).contains(&n),
                "--heavy-slots-max must be between 1 and --instances-max ({})",
                self.instances_max
            );
            rt.heavy_slots_max = n;
        }
        anyhow::ensure!(self.heavy_memory_max >= 1 << 20, "--heavy-memory-max must be at least 1MiB");
        rt.heavy_memory_max = self.heavy_memory_max;
        anyhow::ensure!(
            self.heavy_memory_keep_resident <= 1 << 30,
            "--heavy-memory-keep-resident must be at most 1GiB (the largest function memory)"
        );
        rt.heavy_memory_keep_resident_bytes = self.heavy_memory_keep_resident as usize;
        rt.heavy_from_bytes = self.heavy_from;
        rt.heavy_tenant_share = self.tenant_share;
        anyhow::ensure!(
            self.warm_instances_max < self.instances_max as usize,
            "--warm-instances-max ({}) must be below --instances-max ({}): idle instances hold slots",
            self.warm_instances_max,
            self.instances_max
        );
        rt.warm = WarmConfig {
            total_max: self.warm_instances_max,
            per_function_max: self.warm_per_function_max,
            memory_max: self.warm_memory_max,
        };
        rt.code = self.code()?;
        Ok(rt)
    }
}

fn init_tracing(json: bool, access_log: bool) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Rollout events (a step, a promotion, a rollback and why) are what a person reads after
    // the fact: logged at any level.
    filter = filter.add_directive(
        format!("{}=info", sluice_gateway::rollout::EVENTS).parse().expect("a valid directive"),
    );
    // So are schedule events (an occurrence skipped over a quota or a missing alias).
    filter = filter.add_directive(
        format!("{}=info", sluice_gateway::schedule::EVENTS).parse().expect("a valid directive"),
    );
    if access_log {
        filter = filter.add_directive("sluice::access=info".parse().expect("a valid directive"));
    }
    // Colours only for a person at a terminal, not in a file or a log collector.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = if json { fmt.json().flatten_event(true).try_init() } else { fmt.try_init() };
}
