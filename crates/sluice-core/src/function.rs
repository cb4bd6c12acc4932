//! What a deployed function version is configured with, and what an API key may do.

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
    /// Hosts (`name` or `name:port`) the guest may call over outbound HTTP. Empty: none.
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
        for host in &self.allow_outbound {
            if host.is_empty() || host.contains('/') || host.contains(' ') {
                return bad(format!("invalid outbound host {host:?}: give a host or host:port"));
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
        Ok(())
    }

    /// Whether the guest may call `host` (with `port`). An entry without a port allows any port.
    pub fn outbound_allowed(&self, host: &str, port: Option<u16>) -> bool {
        self.allow_outbound.iter().any(|entry| match entry.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => {
                h.eq_ignore_ascii_case(host) && p.parse::<u16>().ok() == port
            }
            _ => entry.eq_ignore_ascii_case(host),
        })
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
