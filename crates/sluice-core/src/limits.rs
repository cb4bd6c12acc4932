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
