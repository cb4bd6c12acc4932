//! greet: a sluice function in Rust, on the raw `wasip2` bindings (no SDK).
//!
//! POST a JSON body like `{"name": "Ada"}`. It answers
//! `{"message": "<GREETING>, Ada!", "lang": "rust", "upstream": ...}`, where GREETING is an
//! environment variable set at deploy (`sluice deploy --env GREETING=Hi`, default "Hello"), and
//! "upstream" is what `GET $UPSTREAM_URL?name=Ada` answered (JSON, or text), when UPSTREAM_URL is
//! set: its host must be in the function's allow list (`--allow-outbound HOST[:PORT]`).
//!
//! Errors are JSON, `{"error": {"code": "...", "message": "..."}}`: 405 for a method other than
//! POST, 413 for a body over 64 KiB, 400 for a body that is not JSON, 422 for a missing or empty
//! name, 502 when the upstream call fails (a host not allowed included).

use serde_json::{json, Value};
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingRequest, OutgoingResponse,
    ResponseOutparam, Scheme,
};
use wasip2::io::streams::{InputStream, StreamError};

wasip2::http::proxy::export!(Greet);

struct Greet;

const BODY_MAX: usize = 64 * 1024;

/// A response other than 200: its status, code and message.
struct HttpError(u16, &'static str, String);

impl wasip2::exports::http::incoming_handler::Guest for Greet {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let (status, doc) = match greet(request) {
            Ok(doc) => (200, doc),
            Err(HttpError(status, code, message)) => {
                (status, json!({"error": {"code": code, "message": message}}))
            }
        };
        let mut body = doc.to_string().into_bytes();
        body.push(b'\n');
        let headers = Fields::from_list(&[
            ("content-type".to_string(), b"application/json".to_vec()),
            ("content-length".to_string(), body.len().to_string().into_bytes()),
        ])
        .unwrap();
        let response = OutgoingResponse::new(headers);
        response.set_status_code(status).unwrap();
        let out = response.body().unwrap();
        ResponseOutparam::set(response_out, Ok(response));
        // An error writing means nobody reads any more: the host closes the connection once the
        // whole answer is out when a request body was left unread (the 413), which can end the
        // last flush. There is no one left to tell.
        {
            let stream = out.write().unwrap();
            // blocking_write_and_flush takes at most 4096 bytes at a time.
            for chunk in body.chunks(4096) {
                if stream.blocking_write_and_flush(chunk).is_err() {
                    break;
                }
            }
        }
        let _ = OutgoingBody::finish(out, None);
    }
}

fn greet(request: IncomingRequest) -> Result<Value, HttpError> {
    if !matches!(request.method(), Method::Post) {
        return Err(HttpError(
            405,
            "method_not_allowed",
            r#"send POST with a JSON body like {"name": "Ada"}"#.into(),
        ));
    }
    let body = request.consume().unwrap();
    let raw = read_all(&body.stream().unwrap(), 413, "body_too_large")?;
    drop(IncomingBody::finish(body));
    let doc: Value = serde_json::from_slice(&raw)
        .map_err(|e| HttpError(400, "invalid_json", format!("the body is not JSON: {e}")))?;
    let name = match doc.get("name") {
        Some(Value::String(name)) if !name.trim().is_empty() => name.clone(),
        _ => return Err(HttpError(422, "invalid_name", r#""name" must be a non-empty string"#.into())),
    };

    let greeting = std::env::var("GREETING").unwrap_or_else(|_| "Hello".into());
    let mut result = json!({"message": format!("{greeting}, {name}!"), "lang": "rust"});
    if let Ok(url) = std::env::var("UPSTREAM_URL") {
        if !url.is_empty() {
            result["upstream"] = lookup(&url, &name)?;
        }
    }
    Ok(result)
}

/// GET url?name=NAME; the status and body (parsed when it is JSON).
fn lookup(base: &str, name: &str) -> Result<Value, HttpError> {
    let url = format!("{base}{}name={}", if base.contains('?') { '&' } else { '?' }, percent_encode(name));
    let failed = |why: String| HttpError(502, "upstream_failed", format!("GET {url}: {why}"));
    let (scheme, rest) = match url.split_once("://") {
        Some(("http", rest)) => (Scheme::Http, rest),
        Some(("https", rest)) => (Scheme::Https, rest),
        _ => return Err(failed("UPSTREAM_URL is not an http(s) URL".into())),
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(at) if rest[at..].starts_with('/') => (&rest[..at], rest[at..].to_string()),
        Some(at) => (&rest[..at], format!("/{}", &rest[at..])),
        None => (rest, "/".to_string()),
    };

    let headers = Fields::from_list(&[("accept".to_string(), b"application/json".to_vec())]).unwrap();
    let request = OutgoingRequest::new(headers);
    request.set_scheme(Some(&scheme)).unwrap();
    request.set_authority(Some(authority)).map_err(|()| failed("invalid host".into()))?;
    request.set_path_with_query(Some(&path)).map_err(|()| failed("invalid path".into()))?;
    // A host outside the allow list ends here (HTTP-request-denied), without a connection.
    let pending = outgoing_handler::handle(request, None).map_err(|e| failed(format!("{e:?}")))?;
    pending.subscribe().block();
    let response = match pending.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(e))) => return Err(failed(format!("{e:?}"))),
        _ => return Err(failed("no response".into())),
    };
    let status = response.status();
    let body = response.consume().unwrap();
    let raw = read_all(&body.stream().unwrap(), 502, "upstream_failed")?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok(json!({"url": url, "status": status, "body": body}))
}

/// The whole stream, refused past BODY_MAX.
fn read_all(stream: &InputStream, status: u16, code: &'static str) -> Result<Vec<u8>, HttpError> {
    let mut data = Vec::new();
    loop {
        match stream.blocking_read(16 * 1024) {
            Ok(chunk) => data.extend_from_slice(&chunk),
            Err(StreamError::Closed) => return Ok(data),
            Err(StreamError::LastOperationFailed(e)) => {
                return Err(HttpError(status, code, e.to_debug_string()));
            }
        }
        if data.len() > BODY_MAX {
            return Err(HttpError(status, code, format!("a body is at most {BODY_MAX} bytes")));
        }
    }
}

/// Every byte but the unreserved ones (RFC 3986) as %XX, as the other examples do.
fn percent_encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
