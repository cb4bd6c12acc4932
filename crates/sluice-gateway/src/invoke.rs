//! `ANY /fn/{tenant}/{function}/{*path}`: the synchronous call path, in the order its checks run.
//!
//! 1. the declared body size (CL+TE smuggling and header limits were refused in `server`),
//! 2. function lookup (in memory) and authentication — a private function needs an `invoke` key
//!    of its tenant; an unknown function and another tenant's function both answer 404, and a
//!    caller without a valid key learns nothing (401) about what exists,
//! 3. the guest request is built (path below the function, `sluice-invocation-id` added, the
//!    platform's `Authorization` removed for private functions), the body bounded while it
//!    streams, and the runtime runs it in a fresh instance,
//! 4. the response head is returned as soon as the guest sets it; the outcome is recorded off the
//!    request path.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{HeaderValue, Request, Response, Uri, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use sluice_core::{ErrorKind, Scope, SluiceError};
use sluice_runtime::{Call, Outcome};
use sluice_store::{InvocationStatus, SyncRecord};

use crate::body::{Body, BoxError, Limited};
use crate::error::{INVOCATION_ID, error_response};
use crate::node::{Deployed, Node, bearer};

/// Splits `/fn/{tenant}/{function}/{rest}` into its parts; `rest` keeps its leading slash.
pub fn split_fn_path(path: &str) -> Option<(&str, &str, &str)> {
    let rest = path.strip_prefix("/fn/")?;
    let (tenant, rest) = rest.split_once('/')?;
    let (function, sub) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    (!tenant.is_empty() && !function.is_empty()).then_some((tenant, function, sub))
}

pub async fn handle(node: &Arc<Node>, req: Request<Incoming>) -> Response<Body> {
    let invocation_id = sluice_core::ids::invocation_id();
    match call(node, req, &invocation_id).await {
        Ok(res) => res,
        Err(e) => error_response(&e, Some(&invocation_id)),
    }
}

async fn call(
    node: &Arc<Node>,
    req: Request<Incoming>,
    invocation_id: &str,
) -> Result<Response<Body>, SluiceError> {
    let limits = &node.config.limits;
    let headers = req.headers();
    // A request with both framings can be read two ways by two parsers (request smuggling).
    if headers.contains_key(header::TRANSFER_ENCODING)
        && headers.contains_key(header::CONTENT_LENGTH)
    {
        return Err(SluiceError::bad_request(
            "request has both Content-Length and Transfer-Encoding; send exactly one",
        ));
    }
    if let Some(len) = content_length(headers)?
        && len > limits.sync_body_bytes_max
    {
        return Err(too_large(limits.sync_body_bytes_max));
    }

    let (tenant, function, sub) = split_fn_path(req.uri().path())
        .ok_or_else(|| SluiceError::not_found("use /fn/{tenant}/{function}/{path}"))?;
    let deployed = node.function(tenant, function);
    let public = deployed.as_ref().is_some_and(|d| d.config.public);
    if !public {
        let key = bearer(headers).ok_or_else(|| {
            SluiceError::new(
                ErrorKind::Unauthorized,
                "missing API key: send Authorization: Bearer <key>",
            )
        })?;
        let principal = node.principal_for_key(key).ok_or_else(|| {
            SluiceError::new(ErrorKind::Unauthorized, "invalid or revoked API key")
        })?;
        if deployed.is_none() || !principal.sees(tenant) {
            return Err(SluiceError::not_found(format!(
                "no function {function} in tenant {tenant}"
            )));
        }
        if !principal.may(tenant, Scope::Invoke) {
            return Err(SluiceError::new(
                ErrorKind::Forbidden,
                "this key may not invoke functions",
            ));
        }
    }
    let deployed = deployed.ok_or_else(|| {
        SluiceError::not_found(format!("no function {function} in tenant {tenant}"))
    })?;

    let path_and_query = match req.uri().query() {
        Some(q) => format!("{sub}?{q}"),
        None => sub.to_string(),
    };
    let (mut parts, body) = req.into_parts();
    parts.uri = Uri::try_from(path_and_query)
        .map_err(|e| SluiceError::bad_request(format!("bad path: {e}")))?;
    if !public {
        parts.headers.remove(header::AUTHORIZATION);
    }
    parts
        .headers
        .insert(INVOCATION_ID, header_value(invocation_id));
    if !parts.headers.contains_key(header::HOST) {
        parts
            .headers
            .insert(header::HOST, HeaderValue::from_static("localhost"));
    }
    let (body, body_exceeded) = Limited::new(body, limits.sync_body_bytes_max);

    let call = Call {
        invocation_id: invocation_id.to_string(),
        config: deployed.config.clone(),
        timeout: Duration::from_millis(deployed.config.timeout_ms),
        recorder: Some(recorder(node, &deployed)),
    };
    let running = node
        .runtime
        .invoke(&deployed.prepared, call, Request::from_parts(parts, body));
    match running.response().await {
        Ok((res, _done)) => {
            let mut res = res.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync());
            res.headers_mut()
                .insert(INVOCATION_ID, header_value(invocation_id));
            Ok(res)
        }
        Err(_) if body_exceeded.load(Ordering::Relaxed) => {
            Err(too_large(limits.sync_body_bytes_max))
        }
        Err(outcome) => {
            let mut err = outcome
                .error
                .unwrap_or_else(|| SluiceError::internal("the invocation failed"));
            if err.kind.source() == sluice_core::ErrorSource::Guest {
                err.message = format!(
                    "{}; logs: GET /v1/invocations/{invocation_id}/logs",
                    err.message
                );
            }
            Err(err)
        }
    }
}

/// Hands the outcome to the recorder when there is something to look at later (log lines or a
/// failure); a silent success is only counted, which keeps recording off the hot path.
fn recorder(node: &Arc<Node>, deployed: &Arc<Deployed>) -> Box<dyn FnOnce(&Outcome) + Send> {
    let recorder = node.recorder.clone();
    let deployed = deployed.clone();
    Box::new(move |o: &Outcome| {
        if o.error.is_none() && o.logs.is_empty() {
            return;
        }
        recorder.record(SyncRecord {
            id: o.invocation_id.clone(),
            tenant: deployed.record.tenant.clone(),
            function: deployed.record.function.clone(),
            version: deployed.record.version,
            status: if o.error.is_some() {
                InvocationStatus::Dead
            } else {
                InvocationStatus::Succeeded
            },
            status_code: o
                .status_code
                .or(o.error.as_ref().map(|e| e.kind.status().as_u16())),
            error_kind: o.error.as_ref().map(|e| e.kind.as_str().to_string()),
            started_at: o.started_at,
            finished_at: o.finished_at,
            logs: o.logs.clone(),
        });
    })
}

pub fn too_large(max: u64) -> SluiceError {
    SluiceError::new(
        ErrorKind::PayloadTooLarge,
        format!("request body is larger than the limit of {max} bytes"),
    )
}

fn content_length(headers: &http::HeaderMap) -> Result<Option<u64>, SluiceError> {
    match headers.get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| SluiceError::bad_request("invalid Content-Length")),
    }
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).expect("ids are ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fn_paths() {
        assert_eq!(
            split_fn_path("/fn/default/hello"),
            Some(("default", "hello", "/"))
        );
        assert_eq!(
            split_fn_path("/fn/default/hello/"),
            Some(("default", "hello", "/"))
        );
        assert_eq!(split_fn_path("/fn/t/f/a/b"), Some(("t", "f", "/a/b")));
        assert_eq!(split_fn_path("/fn/t"), None);
        assert_eq!(split_fn_path("/fn//f"), None);
        assert_eq!(split_fn_path("/v1/x"), None);
    }
}
