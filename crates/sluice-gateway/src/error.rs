//! The one place that turns an error into an HTTP response (DESIGN.md section 5): JSON
//! `{"error": {"code", "message"}}`, the `sluice-error` header, and `Retry-After` where a client
//! should come back.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use sluice_core::{ErrorKind, SluiceError};

use crate::body::{Body, full};

pub const SLUICE_ERROR: &str = "sluice-error";
/// The header naming the invocation, on the guest's request and on every `/fn` response.
pub const INVOCATION_ID: &str = sluice_runtime::INVOCATION_ID_HEADER;

pub fn error_response(err: &SluiceError, invocation_id: Option<&str>) -> Response<Body> {
    let body = Bytes::from(err.to_json().to_string());
    let mut res = Response::new(full(body));
    *res.status_mut() = err.kind.status();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(SLUICE_ERROR, HeaderValue::from_static(err.kind.as_str()));
    if let Some(secs) = err.retry_after_secs {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    for (name, value) in &err.headers {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(*name, v);
        }
    }
    if let Some(id) = invocation_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        h.insert(INVOCATION_ID, id);
    }
    res
}

/// The kind sluice uses for a bare HTTP status (from the router or a library layer).
pub fn kind_for_status(status: StatusCode) -> ErrorKind {
    match status.as_u16() {
        400 => ErrorKind::BadRequest,
        401 => ErrorKind::Unauthorized,
        403 => ErrorKind::Forbidden,
        404 => ErrorKind::NotFound,
        405 => ErrorKind::MethodNotAllowed,
        408 => ErrorKind::RequestTimeout,
        409 => ErrorKind::Conflict,
        413 => ErrorKind::PayloadTooLarge,
        415 | 422 => ErrorKind::BadRequest,
        429 => ErrorKind::RateLimited,
        503 => ErrorKind::Unavailable,
        504 => ErrorKind::Timeout,
        s if s < 500 => ErrorKind::BadRequest,
        _ => ErrorKind::Internal,
    }
}

/// Store errors seen by an API call.
pub fn store_error(e: sluice_store::StoreError) -> SluiceError {
    use sluice_store::StoreError;
    match e {
        StoreError::NotFound(m) => SluiceError::not_found(m),
        StoreError::Conflict(m) => SluiceError::new(ErrorKind::Conflict, m),
        StoreError::Unavailable(m) => {
            tracing::warn!(error = %m, "store unavailable");
            SluiceError::new(ErrorKind::Unavailable, "the store is unavailable; try again shortly")
                .retry_after(2)
        }
        StoreError::Other(m) => {
            tracing::error!(error = %m, "store error");
            SluiceError::internal("internal store error")
        }
    }
}
