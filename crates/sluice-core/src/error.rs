//! Errors are classified once, here: every error sluice reports has a stable [`ErrorKind`] that
//! decides the HTTP status, the JSON `code`, the metric label, whether an async attempt is retried
//! and who is at fault. The gateway has one function that turns a [`SluiceError`] into a response.

use http::StatusCode;

/// Who caused an error: decides whether it counts against the platform's reliability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The caller sent something wrong (bad header, too large, no key).
    Client,
    /// The function misbehaved (trap, timeout, memory, no response).
    Guest,
    /// sluice itself or its store failed.
    Platform,
}

/// A short, stable error kind. The string form is the JSON `code`, the `sluice-error` header
/// value and the `error_kind` recorded for an invocation; renaming one is a breaking change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    BadRequest,
    InvalidComponent,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Conflict,
    /// An `Idempotency-Key` came back, from the same caller within its window, with a different
    /// request (method, path and query, or body): 422, as the IETF Idempotency-Key draft says.
    IdempotencyKeyReused,
    PayloadTooLarge,
    HeadersTooLarge,
    /// The client did not send its request body within the read deadline.
    RequestTimeout,
    RateLimited,
    ConcurrencyLimited,
    /// The tenant holds as many queued async invocations (or queued bytes) as its quota allows:
    /// the call is refused, nothing is stored, and it may succeed once some of them finish.
    QuotaExceeded,
    /// A deploy would take the tenant over a storage quota (component bytes, functions,
    /// versions). Nothing is stored.
    StorageQuotaExceeded,
    Overloaded,
    Unavailable,
    Timeout,
    Trap,
    MemoryLimit,
    NoResponse,
    /// The client closed the connection before the response was complete; the guest was stopped.
    ClientClosed,
    Internal,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 23] = [
        Self::BadRequest,
        Self::InvalidComponent,
        Self::Unauthorized,
        Self::Forbidden,
        Self::NotFound,
        Self::MethodNotAllowed,
        Self::Conflict,
        Self::IdempotencyKeyReused,
        Self::PayloadTooLarge,
        Self::HeadersTooLarge,
        Self::RequestTimeout,
        Self::RateLimited,
        Self::ConcurrencyLimited,
        Self::QuotaExceeded,
        Self::StorageQuotaExceeded,
        Self::Overloaded,
        Self::Unavailable,
        Self::Timeout,
        Self::Trap,
        Self::MemoryLimit,
        Self::NoResponse,
        Self::ClientClosed,
        Self::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::InvalidComponent => "invalid_component",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Conflict => "conflict",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::PayloadTooLarge => "payload_too_large",
            Self::HeadersTooLarge => "headers_too_large",
            Self::RequestTimeout => "request_timeout",
            Self::RateLimited => "rate_limited",
            Self::ConcurrencyLimited => "concurrency_limited",
            Self::QuotaExceeded => "quota_exceeded",
            Self::StorageQuotaExceeded => "storage_quota_exceeded",
            Self::Overloaded => "overloaded",
            Self::Unavailable => "unavailable",
            Self::Timeout => "timeout",
            Self::Trap => "trap",
            Self::MemoryLimit => "memory_limit",
            Self::NoResponse => "no_response",
            Self::ClientClosed => "client_closed",
            Self::Internal => "internal",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest | Self::InvalidComponent => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict => StatusCode::CONFLICT,
            Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::RateLimited | Self::ConcurrencyLimited | Self::QuotaExceeded => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::StorageQuotaExceeded => StatusCode::INSUFFICIENT_STORAGE,
            Self::Overloaded | Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            // nginx's "client closed request": nobody reads it, but the record says what happened.
            Self::ClientClosed => StatusCode::from_u16(499).expect("499 is a valid status code"),
            Self::Trap | Self::MemoryLimit | Self::NoResponse | Self::Internal => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    pub fn source(self) -> ErrorSource {
        match self {
            Self::Timeout | Self::Trap | Self::MemoryLimit | Self::NoResponse => ErrorSource::Guest,
            Self::Overloaded | Self::Unavailable | Self::Internal => ErrorSource::Platform,
            _ => ErrorSource::Client,
        }
    }

    /// Whether an async attempt that ended with this kind is tried again (while attempts remain).
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Self::Timeout
                | Self::Trap
                | Self::MemoryLimit
                | Self::NoResponse
                | Self::Internal
                | Self::Overloaded
                | Self::Unavailable
        )
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error sluice reports to a client: a kind plus a message a person can act on.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct SluiceError {
    pub kind: ErrorKind,
    pub message: String,
    /// Seconds a client should wait before trying again (429 and 503).
    pub retry_after_secs: Option<u64>,
    /// Further response headers that explain the error (e.g. the IETF `RateLimit` fields).
    pub headers: Vec<(&'static str, String)>,
}

impl SluiceError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), retry_after_secs: None, headers: Vec::new() }
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs.max(1));
        self
    }

    pub fn header(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// The JSON body of DESIGN.md section 5.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "error": { "code": self.kind.as_str(), "message": self.message } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_and_guest_kinds_are_retryable() {
        for kind in ErrorKind::ALL {
            assert_eq!(ErrorKind::parse(kind.as_str()), Some(kind));
            if kind.source() == ErrorSource::Guest {
                assert!(kind.retryable(), "{kind} should be retried");
                assert!(kind.status().is_server_error());
            }
            if kind.source() == ErrorSource::Client {
                assert!(!kind.retryable(), "{kind} is the caller's fault");
                // 507 (RFC 4918) is the one status that says "the server cannot store this";
                // it is a 5xx, but the tenant's quota, not the platform, refused the deploy.
                assert!(kind.status().is_client_error() || kind == ErrorKind::StorageQuotaExceeded);
            }
        }
    }
}
