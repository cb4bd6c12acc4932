//! Every bound a node enforces, with its default from DESIGN.md section 6. A limit is a named
//! setting here, never a literal at the point of use.

use std::time::Duration;

/// Node-wide limits. Per-function limits (memory, timeout) live in [`crate::FunctionConfig`] and
/// are checked against the `*_max` values here at deploy time.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Total bytes of request headers a client may send.
    pub header_bytes_max: usize,
    /// Number of request header fields a client may send.
    pub header_count_max: usize,
    /// Time a client has to send the complete request head (slowloris bound).
    pub header_read_timeout: Duration,
    /// Largest request body of a synchronous call.
    pub sync_body_bytes_max: u64,
    /// Largest request body of an async call (stored whole in the queue).
    pub async_body_bytes_max: u64,
    /// Largest component upload.
    pub upload_bytes_max: u64,
    /// Time a client has to send a whole request body that sluice reads before acting (uploads,
    /// async calls): a client that trickles its body would otherwise hold a slot forever.
    pub body_read_timeout: Duration,
    /// Largest memory limit a function version may ask for.
    pub function_memory_bytes_max: u64,
    /// Longest timeout a function version may ask for.
    pub function_timeout_max: Duration,
    /// Guest log bytes kept per invocation (stdout and stderr together); the rest is dropped and
    /// the truncation noted.
    pub log_bytes_per_invocation_max: usize,
    /// Concurrent instances on this node: sizes the pooling allocator.
    pub instances_max: u32,
    /// Time in-flight calls get to finish on graceful shutdown.
    pub shutdown_grace: Duration,
    /// Log records waiting to be written; beyond this they are dropped and counted.
    pub log_queue_max: usize,
    /// Bytes of log records waiting to be written (line text plus [`LOG_LINE_OVERHEAD_BYTES`] a
    /// line); beyond this they are dropped and counted. Without it the record bound alone would
    /// allow `log_queue_max` × the log budget of an invocation (4 GiB).
    pub log_queue_bytes_max: usize,
    /// Bounds on a guest's outbound HTTP requests.
    pub outbound: OutboundLimits,
}

/// Bounds on the outbound HTTP requests of one invocation. A guest that sets a timeout in its
/// `request-options` gets it, capped at the `*_max`; one that sets none gets the `*_default`
/// (wasmtime's own default is 600 s, longer than a sync call may run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundLimits {
    /// Outbound requests one invocation may make; the next fails with `HTTP-request-denied`.
    pub requests_per_invocation_max: u32,
    /// Name resolution plus TCP connect plus TLS handshake, over all addresses tried.
    pub connect_timeout_default: Duration,
    pub connect_timeout_max: Duration,
    /// From the request sent to the response head.
    pub first_byte_timeout_default: Duration,
    pub first_byte_timeout_max: Duration,
    /// Between two frames of the response body.
    pub between_bytes_timeout_default: Duration,
    pub between_bytes_timeout_max: Duration,
}

impl Default for OutboundLimits {
    fn default() -> Self {
        Self {
            requests_per_invocation_max: 100,
            connect_timeout_default: Duration::from_secs(10),
            connect_timeout_max: Duration::from_secs(60),
            first_byte_timeout_default: Duration::from_secs(30),
            first_byte_timeout_max: Duration::from_secs(5 * 60),
            between_bytes_timeout_default: Duration::from_secs(30),
            between_bytes_timeout_max: Duration::from_secs(5 * 60),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_bytes_max: 64 * 1024,
            header_count_max: 100,
            header_read_timeout: Duration::from_secs(10),
            sync_body_bytes_max: 6 * 1024 * 1024,
            async_body_bytes_max: 1024 * 1024,
            upload_bytes_max: 64 * 1024 * 1024,
            body_read_timeout: Duration::from_secs(30),
            function_memory_bytes_max: 1024 * 1024 * 1024,
            function_timeout_max: Duration::from_secs(15 * 60),
            log_bytes_per_invocation_max: 64 * 1024,
            instances_max: 1000,
            shutdown_grace: Duration::from_secs(30),
            log_queue_max: 65_536,
            log_queue_bytes_max: 64 * 1024 * 1024,
            outbound: OutboundLimits::default(),
        }
    }
}

/// Defaults of a function version.
pub const FUNCTION_MEMORY_BYTES_DEFAULT: u64 = 128 * 1024 * 1024;
pub const FUNCTION_TIMEOUT_MS_DEFAULT: u64 = 30_000;
pub const ASYNC_TIMEOUT_MS_DEFAULT: u64 = 15 * 60 * 1000;
pub const WASM_STACK_BYTES: usize = 512 * 1024;
pub const ATTEMPTS_MAX_DEFAULT: u32 = 3;
pub const MAX_AGE_MS_DEFAULT: u64 = 6 * 60 * 60 * 1000;
/// Log lines kept per invocation (stdout, stderr and sluice's own lines together); the rest is
/// dropped and the truncation noted. Each line is also charged against
/// [`Limits::log_bytes_per_invocation_max`] for more than its text.
pub const LOG_LINES_PER_INVOCATION_MAX: usize = 1000;
/// What one log line costs beyond its text, charged against the per-invocation log budget and
/// the recorder's queue: the `(LogStream, String, UnixMs)` tuple and the `String` header in memory
/// (40 bytes), and the store's row (invocation id, stream, timestamp, rowid). An empty line is not
/// free.
pub const LOG_LINE_OVERHEAD_BYTES: usize = 64;

/// What one tenant may keep at once, so that no tenant fills the disk every tenant's store
/// shares (issue 19). The node's defaults are `serve` flags; a tenant may have its own
/// ([`OwnUsageLimits`], `PUT /v1/tenants/{t}/limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageLimits {
    /// Async invocations not yet finished (queued, running, waiting for a retry).
    pub queued_max: u64,
    /// Bytes of those invocations' stored requests (body plus header names and values).
    pub queued_bytes_max: u64,
    /// Bytes of the tenant's uploaded components.
    pub components_bytes_max: u64,
    /// Functions of the tenant.
    pub functions_max: u64,
    /// Versions of all the tenant's functions together, as stored (retired ones not counted).
    pub versions_max: u64,
    /// Schedules of the tenant (issue 23).
    pub schedules_max: u64,
}

impl UsageLimits {
    /// 100,000 queued calls is a day of a steady 1/s per function for a tenant with a few
    /// functions, or ~30 minutes of backlog at 50/s: far more than a healthy queue holds, far less
    /// than a flood left for hours. 1 GiB of queued requests is 1,000 of the largest async bodies
    /// (1 MiB), or 100,000 calls of 10 KiB.
    pub const QUEUED_MAX_DEFAULT: u64 = 100_000;
    pub const QUEUED_BYTES_MAX_DEFAULT: u64 = 1 << 30;
    /// 2 GiB: 32 of the largest uploads (64 MiB), or hundreds of typical 2-10 MiB components;
    /// retired versions' components are collected after `--blob-grace`.
    pub const COMPONENTS_BYTES_MAX_DEFAULT: u64 = 2 << 30;
    pub const FUNCTIONS_MAX_DEFAULT: u64 = 1_000;
    /// Twice what version retention keeps for the default functions (1,000 functions × 10
    /// versions kept, `serve --versions-kept`): the other half is room for versions that
    /// unfinished invocations still name and for those retention has not retired yet.
    pub const VERSIONS_MAX_DEFAULT: u64 = 20_000;
    /// 100 schedules: ten for each of ten functions. At the shortest interval (1 s) that is 100
    /// enqueues a second for the tenant, within what one node's ticker keeps on time.
    pub const SCHEDULES_MAX_DEFAULT: u64 = 100;
}

impl Default for UsageLimits {
    fn default() -> Self {
        Self {
            queued_max: Self::QUEUED_MAX_DEFAULT,
            queued_bytes_max: Self::QUEUED_BYTES_MAX_DEFAULT,
            components_bytes_max: Self::COMPONENTS_BYTES_MAX_DEFAULT,
            functions_max: Self::FUNCTIONS_MAX_DEFAULT,
            versions_max: Self::VERSIONS_MAX_DEFAULT,
            schedules_max: Self::SCHEDULES_MAX_DEFAULT,
        }
    }
}

/// A tenant's own usage limits, as stored: `None` takes the node's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OwnUsageLimits {
    pub queued_max: Option<u64>,
    pub queued_bytes_max: Option<u64>,
    pub components_bytes_max: Option<u64>,
    pub functions_max: Option<u64>,
    pub versions_max: Option<u64>,
    pub schedules_max: Option<u64>,
}

impl OwnUsageLimits {
    /// The limits in force: each own value, else the node's default.
    pub fn over(&self, defaults: &UsageLimits) -> UsageLimits {
        UsageLimits {
            queued_max: self.queued_max.unwrap_or(defaults.queued_max),
            queued_bytes_max: self.queued_bytes_max.unwrap_or(defaults.queued_bytes_max),
            components_bytes_max: self.components_bytes_max.unwrap_or(defaults.components_bytes_max),
            functions_max: self.functions_max.unwrap_or(defaults.functions_max),
            versions_max: self.versions_max.unwrap_or(defaults.versions_max),
            schedules_max: self.schedules_max.unwrap_or(defaults.schedules_max),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}
