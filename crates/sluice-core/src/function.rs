//! What a deployed function version is configured with, and what an API key may do.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::limits::{
    ASYNC_TIMEOUT_MS_DEFAULT, ATTEMPTS_MAX_DEFAULT, FUNCTION_MEMORY_BYTES_DEFAULT,
    FUNCTION_TIMEOUT_MS_DEFAULT, MAX_AGE_MS_DEFAULT,
};
use crate::{Limits, Secrets, SluiceError};

/// The slowest rate limit: one call a day. Slower rates are indistinguishable from "never" and
/// their refill period would not fit the token bucket's clock.
pub const RATE_PER_SEC_MIN: f64 = 1.0 / 86_400.0;
/// The fastest rate limit: beyond it a limit is pointless (and the refill period rounds to 0).
pub const RATE_PER_SEC_MAX: f64 = 1e9;

/// The largest reservation a tenant or function may hold: more than any node's async slots, so
/// that it never binds by itself, small enough that sums cannot overflow.
pub const RESERVED_CONCURRENCY_MAX: u32 = 100_000;
/// The widest default start window (the idempotency window is a day; a week is plenty for work
/// that can wait).
pub const START_WINDOW_MS_MAX: u64 = 7 * 24 * 60 * 60 * 1000;

/// Most calls one instance may serve (`reuse_calls`).
pub const REUSE_CALLS_MAX: u32 = 1_000_000;
/// How long a warm instance waits for its next call by default, and at most.
pub const REUSE_IDLE_MS_DEFAULT: u64 = 60_000;
pub const REUSE_IDLE_MS_MAX: u64 = 60 * 60 * 1000;

/// The configuration of one immutable function version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FunctionConfig {
    /// Linear memory a single instance may grow to.
    pub memory_bytes: u64,
    /// Wall-clock limit of a synchronous call.
    pub timeout_ms: u64,
    /// Wall-clock limit of one async attempt.
    pub async_timeout_ms: u64,
    /// Environment variables the guest sees, in order.
    pub env: Vec<(String, String)>,
    /// Hosts the guest may call over outbound HTTP: `name`, `name:port`, `[ipv6]`, `[ipv6]:port`
    /// (see [`OutboundHost::parse`]). Empty: none.
    pub allow_outbound: Vec<String>,
    /// A public function's `/fn` URL needs no API key.
    pub public: bool,
    /// Attempts of an async invocation before it is dead.
    pub attempts_max: u32,
    /// Age after which an async invocation is not retried any more.
    pub max_age_ms: u64,
    /// Token-bucket rate (calls per second) for this function; `None`: unlimited.
    pub rate_per_sec: Option<f64>,
    /// Token-bucket burst; defaults to the rate rounded up.
    pub burst: Option<u32>,
    /// Calls of this function running at once on a node; `None`: bounded only by the node.
    pub max_concurrency: Option<u32>,
    /// Async calls of this function that start whatever the node's load (guaranteed
    /// concurrency, counted over the cluster): a part of its tenant's reserved quota, which
    /// bounds it (the deploy checks it; the scheduler caps the sum of a tenant's functions by it);
    /// `None`: only the tenant's reservation applies.
    pub reserved_concurrency: Option<u32>,
    /// The start window an async call gets when it names no `sluice-deadline`: its deadline is
    /// then this long after its start time, and the scheduler may hold it for a trough
    /// meanwhile. `None`: no deadline (it runs as soon as capacity allows).
    pub start_window_ms: Option<u64>,
    /// Calls one instance may serve, one after another, before it is discarded (`deploy
    /// --reuse N`); 1: a fresh instance for every call. A reused instance keeps its memory
    /// (globals, caches) from one call to the next, like a warm execution environment of Lambda;
    /// it is never shared by two calls at once, by two versions or by two tenants, and one that
    /// trapped, timed out or hit a limit is discarded.
    pub reuse_calls: u32,
    /// How long a warm instance may wait for its next call before it is discarded.
    pub reuse_idle_ms: u64,
    /// Instances of this version alive at once on a node; more calls wait for one (the wait
    /// counts against their timeout). `None`: unbounded, except for heavy components (a large
    /// initial memory), which get the node's default (`serve --heavy-memory-max` over their
    /// initial memory, or `--heavy-instances-max`).
    pub instances_max: Option<u32>,
    /// Environment variables the guest sees after `env`, whose values are never shown. Not part
    /// of the serialized configuration: the store keeps the values beside it, and the API
    /// shows only the names.
    #[serde(skip)]
    pub secrets: Secrets,
}

impl Default for FunctionConfig {
    fn default() -> Self {
        Self {
            memory_bytes: FUNCTION_MEMORY_BYTES_DEFAULT,
            timeout_ms: FUNCTION_TIMEOUT_MS_DEFAULT,
            async_timeout_ms: ASYNC_TIMEOUT_MS_DEFAULT,
            env: Vec::new(),
            allow_outbound: Vec::new(),
            public: false,
            attempts_max: ATTEMPTS_MAX_DEFAULT,
            max_age_ms: MAX_AGE_MS_DEFAULT,
            rate_per_sec: None,
            burst: None,
            max_concurrency: None,
            reserved_concurrency: None,
            start_window_ms: None,
            reuse_calls: 1,
            reuse_idle_ms: REUSE_IDLE_MS_DEFAULT,
            instances_max: None,
            secrets: Secrets::default(),
        }
    }
}

impl FunctionConfig {
    /// Rejects a configuration the node cannot honour, naming the field.
    pub fn validate(&self, limits: &Limits) -> Result<(), SluiceError> {
        let bad = |m: String| Err(SluiceError::bad_request(m));
        if self.memory_bytes < 64 * 1024 || self.memory_bytes > limits.function_memory_bytes_max {
            return bad(format!(
                "memory must be between 64KiB and {} bytes, got {}",
                limits.function_memory_bytes_max, self.memory_bytes
            ));
        }
        let timeout_max = limits.function_timeout_max.as_millis() as u64;
        for (name, v) in [("timeout", self.timeout_ms), ("async timeout", self.async_timeout_ms)] {
            if v == 0 || v > timeout_max {
                return bad(format!("{name} must be between 1ms and {timeout_max}ms, got {v}ms"));
            }
        }
        if self.attempts_max == 0 || self.attempts_max > 100 {
            return bad(format!("attempts must be between 1 and 100, got {}", self.attempts_max));
        }
        for (k, _) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return bad(format!("invalid environment variable name {k:?}"));
            }
        }
        // Messages name a secret, never its value.
        let mut secret_names = std::collections::HashSet::new();
        for name in self.secrets.names() {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return bad(format!("invalid secret name {name:?}"));
            }
            if !secret_names.insert(name) {
                return bad(format!("secret {name} is given twice"));
            }
            if self.env.iter().any(|(k, _)| k == name) {
                return bad(format!("{name} is both an environment variable and a secret: choose one"));
            }
        }
        for entry in &self.allow_outbound {
            if let Err(why) = OutboundHost::parse(entry) {
                return bad(format!(
                    "invalid outbound host {entry:?}: {why}; give host, host:port, [ipv6] or [ipv6]:port"
                ));
            }
        }
        if let Some(rate) = self.rate_per_sec
            && !(RATE_PER_SEC_MIN..=RATE_PER_SEC_MAX).contains(&rate)
        {
            return bad(format!(
                "rate must be between {RATE_PER_SEC_MIN} and {RATE_PER_SEC_MAX} calls per second, got {rate}"
            ));
        }
        if self.max_concurrency == Some(0) || self.burst == Some(0) {
            return bad("max concurrency and burst must be at least 1".into());
        }
        if let Some(r) = self.reserved_concurrency
            && r > RESERVED_CONCURRENCY_MAX
        {
            return bad(format!("reserved concurrency must be at most {RESERVED_CONCURRENCY_MAX}, got {r}"));
        }
        if let Some(w) = self.start_window_ms
            && !(1_000..=START_WINDOW_MS_MAX).contains(&w)
        {
            return bad(format!("the start window must be between 1s and 7d, got {w}ms"));
        }
        if !(1..=REUSE_CALLS_MAX).contains(&self.reuse_calls) {
            return bad(format!(
                "reuse must be between 1 and {REUSE_CALLS_MAX} calls, got {}",
                self.reuse_calls
            ));
        }
        if self.instances_max == Some(0) {
            return bad("instances must be at least 1".into());
        }
        if !(100..=REUSE_IDLE_MS_MAX).contains(&self.reuse_idle_ms) {
            return bad(format!(
                "the reuse idle time must be between 100ms and 1h, got {}ms",
                self.reuse_idle_ms
            ));
        }
        Ok(())
    }

    /// Whether the guest may call `host` (with `port`). An entry without a port allows any port.
    /// `host` is the URI's host with any IPv6 brackets removed; IP literals match by value, so
    /// `[2001:db8::1]` allows `2001:DB8:0::1`.
    pub fn outbound_allowed(&self, host: &str, port: Option<u16>) -> bool {
        let ip = host.parse::<IpAddr>().ok();
        self.allow_outbound.iter().filter_map(|entry| OutboundHost::parse(entry).ok()).any(|entry| {
            let host_matches = match (&entry.host, ip) {
                (HostPattern::Ip(allowed), Some(ip)) => *allowed == ip,
                (HostPattern::Name(allowed), None) => allowed.eq_ignore_ascii_case(host),
                _ => false,
            };
            host_matches && entry.port.is_none_or(|p| Some(p) == port)
        })
    }
}

/// One parsed entry of a function's outbound allow list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundHost {
    pub host: HostPattern,
    /// `None`: any port.
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Name(String),
    Ip(IpAddr),
}

impl OutboundHost {
    /// Parses `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 literal. A bare literal
    /// never carries a port: in `2001:db8::1:8443` the last group is part of the address, so a
    /// port on an IPv6 address needs the brackets (as in a URL).
    pub fn parse(entry: &str) -> Result<Self, String> {
        if let Some(rest) = entry.strip_prefix('[') {
            let (inside, after) = rest.split_once(']').ok_or("a '[' without its ']'")?;
            let v6: Ipv6Addr = inside.parse().map_err(|_| format!("{inside:?} is not an IPv6 address"))?;
            let port = match after {
                "" => None,
                _ => Some(parse_port(after.strip_prefix(':').ok_or("expected ':port' after ']'")?)?),
            };
            return Ok(Self { host: HostPattern::Ip(IpAddr::V6(v6)), port });
        }
        if entry.matches(':').count() > 1 {
            let v6: Ipv6Addr = entry
                .parse()
                .map_err(|_| "more than one ':' but not an IPv6 address (write [ipv6]:port)".to_string())?;
            return Ok(Self { host: HostPattern::Ip(IpAddr::V6(v6)), port: None });
        }
        let (host, port) = match entry.split_once(':') {
            Some((host, port)) => (host, Some(parse_port(port)?)),
            None => (entry, None),
        };
        if let Ok(ip) = host.parse::<Ipv4Addr>() {
            return Ok(Self { host: HostPattern::Ip(IpAddr::V4(ip)), port });
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if host.is_empty() || host.len() > 253 || !host.trim_end_matches('.').split('.').all(label_ok) {
            return Err(format!("{host:?} is not a host name"));
        }
        Ok(Self { host: HostPattern::Name(host.trim_end_matches('.').to_string()), port })
    }
}

fn parse_port(port: &str) -> Result<u16, String> {
    match port.parse::<u16>() {
        Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
        _ => Err(format!("{port:?} is not a port (1-65535)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbound_allowlist_matches_host_and_optional_port() {
        let cfg = FunctionConfig {
            allow_outbound: vec!["api.example.com".into(), "127.0.0.1:9000".into()],
            ..Default::default()
        };
        assert!(cfg.outbound_allowed("api.example.com", Some(443)));
        assert!(cfg.outbound_allowed("API.example.com", None));
        assert!(cfg.outbound_allowed("127.0.0.1", Some(9000)));
        assert!(!cfg.outbound_allowed("127.0.0.1", Some(9001)));
        assert!(!cfg.outbound_allowed("example.com", Some(443)));
        assert!(!FunctionConfig::default().outbound_allowed("api.example.com", Some(443)));
    }

    #[test]
    fn outbound_allowlist_takes_ipv6_hosts() {
        let cfg = FunctionConfig {
            allow_outbound: vec!["::1".into(), "[2001:db8::1]:8443".into(), "[fd00::7]".into()],
            ..Default::default()
        };
        // A bare literal allows every port; `rsplit_once(':')` used to read `::1` as host `:`
        // and port 1.
        assert!(cfg.outbound_allowed("::1", Some(80)));
        assert!(cfg.outbound_allowed("::1", Some(1)));
        assert!(cfg.outbound_allowed("2001:db8::1", Some(8443)));
        assert!(cfg.outbound_allowed("2001:DB8:0:0::1", Some(8443)), "IP literals match by value");
        assert!(!cfg.outbound_allowed("2001:db8::1", Some(443)));
        assert!(cfg.outbound_allowed("fd00::7", Some(443)));
        assert!(!cfg.outbound_allowed("fd00::8", Some(443)));
        assert!(!cfg.outbound_allowed(":", Some(1)));
    }

    #[test]
    fn outbound_hosts_parse_or_say_why_not() {
        let ok = |entry: &str, host: HostPattern, port: Option<u16>| {
            assert_eq!(OutboundHost::parse(entry), Ok(OutboundHost { host, port }), "{entry}");
        };
        let name = |n: &str| HostPattern::Name(n.into());
        let ip = |i: &str| HostPattern::Ip(i.parse().unwrap());
        ok("api.example.com", name("api.example.com"), None);
        ok("api.example.com:8443", name("api.example.com"), Some(8443));
        ok("localhost", name("localhost"), None);
        ok("10.0.0.1:80", ip("10.0.0.1"), Some(80));
        ok("::1", ip("::1"), None);
        ok("2001:db8::1:8443", ip("2001:db8::1:8443"), None);
        ok("[::1]", ip("::1"), None);
        ok("[2001:db8::1]:8443", ip("2001:db8::1"), Some(8443));
        for bad in [
            "",
            "host:",
            "host:0",
            "host:65536",
            "host:+80",
            "host:http",
            "http://host",
            "a b",
            "host/path",
            "[::1",
            "[::1]8443",
            "[::1]:",
            "[10.0.0.1]",
            "[not-v6]:80",
            "fe80::1%eth0",
            "a::b::c",
            "bad..name",
        ] {
            assert!(OutboundHost::parse(bad).is_err(), "{bad:?} should be refused");
        }
        let cfg = FunctionConfig { allow_outbound: vec!["[::1".into()], ..Default::default() };
        let msg = cfg.validate(&Limits::default()).unwrap_err().message;
        assert!(msg.contains("invalid outbound host \"[::1\"") && msg.contains("']'"), "{msg}");
    }

    #[test]
    fn validation_names_the_field() {
        let limits = Limits::default();
        assert!(FunctionConfig::default().validate(&limits).is_ok());
        let too_big = FunctionConfig { memory_bytes: 1 << 40, ..Default::default() };
        assert!(too_big.validate(&limits).unwrap_err().message.contains("memory"));
        let no_attempts = FunctionConfig { attempts_max: 0, ..Default::default() };
        assert!(no_attempts.validate(&limits).unwrap_err().message.contains("attempts"));
        for rate in [5e-324, 0.0, -1.0, f64::NAN, f64::INFINITY, 1e12] {
            let cfg = FunctionConfig { rate_per_sec: Some(rate), ..Default::default() };
            assert!(cfg.validate(&limits).unwrap_err().message.contains("rate"), "{rate}");
        }
        let bad_env = FunctionConfig { env: vec![("A=B".into(), "x".into())], ..Default::default() };
        assert!(bad_env.validate(&limits).unwrap_err().message.contains("environment"));
        let secret = |name: &str| (name.to_string(), "hunter2".to_string());
        for (secrets, problem) in [
            (vec![secret("A=B")], "invalid secret name"),
            (vec![secret("S"), secret("S")], "given twice"),
            (vec![secret("GREETING")], "both an environment variable and a secret"),
        ] {
            let cfg = FunctionConfig {
                env: vec![("GREETING".into(), "hi".into())],
                secrets: Secrets::new(secrets),
                ..Default::default()
            };
            let message = cfg.validate(&limits).unwrap_err().message;
            assert!(message.contains(problem) && !message.contains("hunter2"), "{message}");
        }
    }
}
