//! Multi-mode test guest for sluice's limit/chaos tests.
//!
//! Exports `wasi:http/incoming-handler` (the `wasi:http/proxy` world). The mode
//! is chosen by the LAST path segment, so `/fn/default/tg/sleep?ms=5` and
//! `/sleep?ms=5` behave the same. Modes are listed in `route`
//! (`no-response` and `trickle` are handled before it, on the raw bindings).

use std::hint::black_box;
use std::io::Write as _;

use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::types::{IncomingRequest, ResponseOutparam};
use wstd::http::{Body, Client, Error, Request, Response, StatusCode};
use wstd::http::server::Responder;

struct TestGuest;

impl Guest for TestGuest {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path_q = request.path_with_query().unwrap_or_default();
        if mode_of(&path_q) == "no-response" {
            // Deliberately never call `ResponseOutparam::set`: dropping the
            // outparam and returning is the genuine "no response" case.
            drop(response_out);
            drop(request);
            return;
        }
        if mode_of(&path_q) == "trickle" {
            drop(request);
            trickle(response_out);
            return;
        }

        let responder = Responder::new(response_out);
        wstd::runtime::block_on(async move {
            match wstd::http::request::try_from_incoming(request) {
                Ok(req) => match route(req).await {
                    Ok(resp) => responder.respond(resp).await.unwrap(),
                    Err(err) => responder.fail(err),
                },
                Err(err) => responder.fail(err),
            }
        })
    }
}

wasip2::http::proxy::export!(TestGuest with_types_in wasip2);

/// How long `trickle` pauses between its two chunks.
const TRICKLE_PAUSE_NS: u64 = 1_000_000_000;

/// Mode `trickle`: sends the head and `first\n`, waits `TRICKLE_PAUSE_NS`, then sends `rest\n`.
/// A client that reads `first` well before the pause is over got a streamed body; a host that
/// buffers the body would deliver both chunks together, after the pause. Written against the raw
/// bindings so that each write is flushed to the host at once.
fn trickle(response_out: ResponseOutparam) {
    use wasip2::http::types::{Fields, OutgoingBody, OutgoingResponse};
    let response = OutgoingResponse::new(Fields::new());
    let body = response.body().expect("the body is taken once");
    ResponseOutparam::set(response_out, Ok(response));
    {
        let out = body.write().expect("the stream is taken once");
        out.blocking_write_and_flush(b"first\n").expect("writing the first chunk");
        wasip2::clocks::monotonic_clock::subscribe_duration(TRICKLE_PAUSE_NS).block();
        out.blocking_write_and_flush(b"rest\n").expect("writing the rest");
    }
    OutgoingBody::finish(body, None).expect("finishing the body");
}

/// Path part (before `?`) of a path-with-query.
fn path_of(path_q: &str) -> &str {
    path_q.split('?').next().unwrap_or("")
}

/// The last non-empty path segment.
fn mode_of(path_q: &str) -> &str {
    path_of(path_q)
        .rsplit('/')
        .find(|s| !s.is_empty())
        .unwrap_or("")
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// application/x-www-form-urlencoded decoding of one component.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push(h * 16 + l);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(req: &Request<Body>, name: &str) -> Option<String> {
    let q = req.uri().query()?;
    q.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k) == name).then(|| decode(v))
    })
}

fn text(status: u16, body: impl Into<String>) -> Result<Response<Body>, Error> {
    Ok(Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Body::from(body.into()))?)
}

fn parse_u64(req: &Request<Body>, name: &str) -> Result<u64, String> {
    let v = query_param(req, name).ok_or_else(|| format!("missing query parameter {name}"))?;
    v.trim()
        .parse::<u64>()
        .map_err(|e| format!("bad {name}={v:?}: {e}"))
}

async fn route(req: Request<Body>) -> Result<Response<Body>, Error> {
    let full_path = req.uri().path().to_string();
    let mode = mode_of(&full_path).to_string();
    match mode.as_str() {
        "ok" => text(200, "ok"),

        "echo" => {
            let ct = req.headers().get("content-type").cloned();
            let mut b = Response::builder().status(200);
            if let Some(ct) = ct {
                b = b.header("content-type", ct);
            }
            // The incoming body is spliced straight into the outgoing one.
            Ok(b.body(req.into_body())?)
        }

        "sleep" => {
            let ms = match parse_u64(&req, "ms") {
                Ok(v) => v,
                Err(e) => return text(400, e),
            };
            // monotonic-clock subscribe-duration + poll: a real host wait.
            wstd::task::sleep(wstd::time::Duration::from_millis(ms)).await;
            text(200, format!("slept {ms}"))
        }

        "spin" => {
            let mut x: u64 = 0;
            loop {
                x = black_box(x.wrapping_add(1));
            }
        }

        "alloc" => {
            let n = match parse_u64(&req, "bytes") {
                Ok(v) => v as usize,
                Err(e) => return text(400, e),
            };
            let v = black_box(vec![1u8; n]);
            let mut sum: u64 = 0;
            let mut i = 0;
            while i < v.len() {
                sum += v[i] as u64;
                i += 4096;
            }
            if let Some(last) = v.last() {
                sum += *last as u64;
            }
            black_box(sum);
            drop(v);
            text(200, format!("allocated {n}"))
        }

        "panic" => panic!("testguest panicked on purpose"),

        "env" => {
            let mut lines: Vec<String> = std::env::vars_os()
                .map(|(k, v)| format!("{}={}\n", k.to_string_lossy(), v.to_string_lossy()))
                .collect();
            lines.sort();
            text(200, lines.concat())
        }

        "stdout" => {
            println!("stdout line 1");
            println!("stdout line 2");
            let _ = std::io::stdout().flush();
            eprintln!("stderr line 1");
            text(200, "logged")
        }

        // Prints `text` (form-decoded, so `%00` is a NUL) on stdout and stderr, then answers
        // with it; with `panic=1` panics with it instead, so it reaches the trap message too.
        "print" => {
            let text_param = query_param(&req, "text").unwrap_or_default();
            println!("{text_param}");
            eprintln!("{text_param}");
            let _ = std::io::stdout().flush();
            if query_param(&req, "panic").as_deref() == Some("1") {
                panic!("{text_param}");
            }
            text(200, text_param)
        }

        "fetch" => {
            let url = match query_param(&req, "url") {
                Some(u) => u,
                None => return text(400, "missing query parameter url"),
            };
            let result: Result<(u16, Vec<u8>), Error> = async {
                let out = Request::get(url.as_str()).body(Body::empty())?;
                let mut resp = Client::new().send(out).await?;
                let status = resp.status().as_u16();
                let body = resp.body_mut().contents().await?.to_vec();
                Ok((status, body))
            }
            .await;
            match result {
                Ok((status, body)) => {
                    let mut out = format!("status={status}\n").into_bytes();
                    out.extend_from_slice(&body);
                    Ok(Response::builder()
                        .status(200)
                        .header("content-type", "text/plain")
                        .body(Body::from(out))?)
                }
                Err(e) => {
                    eprintln!("fetch error: {e:#}");
                    text(502, format!("fetch error: {e:#}"))
                }
            }
        }

        "status" => {
            let code = match parse_u64(&req, "code") {
                Ok(v) => v,
                Err(e) => return text(400, e),
            };
            match u16::try_from(code).ok().and_then(|c| StatusCode::from_u16(c).ok()) {
                Some(sc) => text(sc.as_u16(), format!("status {code}")),
                None => text(400, format!("invalid status code {code}")),
            }
        }

        "headers" => {
            let mut lines: Vec<String> = req
                .headers()
                .iter()
                .map(|(k, v)| format!("{}: {}\n", k.as_str(), String::from_utf8_lossy(v.as_bytes())))
                .collect();
            lines.sort();
            text(200, lines.concat())
        }

        "count" => {
            // Instance state: how many calls this instance has served (1 on a fresh instance
            // every time; more when the function is deployed with --reuse). Logs it too.
            static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            println!("call {n} of this instance");
            text(200, format!("count {n}"))
        }

        "once" => {
            // Serves one call per instance: later calls on the same instance trap, like a guest
            // runtime that cannot be entered twice.
            static SERVED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if SERVED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                panic!("this instance already served its call");
            }
            text(200, "once")
        }

        "report" => {
            let url = match query_param(&req, "url") {
                Some(u) => u,
                None => return text(400, "missing query parameter url"),
            };
            let id = req
                .headers()
                .get("sluice-invocation-id")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default();
            let result: Result<u16, Error> = async {
                let out = Request::post(url.as_str())
                    .header("content-type", "text/plain")
                    .body(Body::from(id.clone()))?;
                let mut resp = Client::new().send(out).await?;
                // Drain the downstream body so the exchange completes cleanly.
                let _ = resp.body_mut().contents().await?;
                Ok(resp.status().as_u16())
            }
            .await;
            match result {
                Ok(s) if (200..300).contains(&s) => text(200, format!("reported {id}")),
                Ok(s) => text(500, format!("report failed: downstream status {s}")),
                Err(e) => text(500, format!("report failed: {e:#}")),
            }
        }

        "burn" => {
            // CPU-bound for `ms` milliseconds of wall time, then answers: a call that outgrows
            // the fast lane but finishes.
            let ms = match parse_u64(&req, "ms") {
                Ok(v) => v,
                Err(e) => return text(400, e),
            };
            let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
            let mut x: u64 = 0;
            while std::time::Instant::now() < until {
                for _ in 0..1000 {
                    x = black_box(x.wrapping_add(1));
                }
            }
            text(200, format!("burned {ms}"))
        }

        "work" => {
            // A fixed amount of CPU work (`k` thousand loop iterations), however long it takes:
            // a call whose cost does not shrink when it shares a core (`burn` spins for a span of
            // wall-clock time instead).
            let k = match parse_u64(&req, "k") {
                Ok(v) => v,
                Err(e) => return text(400, e),
            };
            let mut x: u64 = 0;
            for _ in 0..k {
                for _ in 0..1000 {
                    x = black_box(x.wrapping_add(1));
                }
            }
            text(200, format!("worked {k}k"))
        }

        "hog" => {
            // Grows in 1 MiB steps, touching every page, until the memory limit refuses a grow:
            // the whole limit is dirtied before the kill.
            let mut held: Vec<Vec<u8>> = Vec::new();
            loop {
                held.push(black_box(vec![1u8; 1 << 20]));
                black_box(&held);
            }
        }

        "recurse" => {
            // Unbounded recursion: a stack overflow trap.
            #[allow(unconditional_recursion)]
            fn down(n: u64) -> u64 {
                black_box(down(black_box(n + 1))) + 1
            }
            text(200, format!("{}", down(0)))
        }

        "big" => {
            // Streams `bytes` bytes in 64 KiB chunks.
            let n = match parse_u64(&req, "bytes") {
                Ok(v) => v,
                Err(e) => return text(400, e),
            };
            const CHUNK: u64 = 64 * 1024;
            let chunk = bytes::Bytes::from(vec![b'x'; CHUNK as usize]);
            let chunks = (0..n.div_ceil(CHUNK)).map(move |i| chunk.slice(0..(CHUNK.min(n - i * CHUNK)) as usize));
            Ok(Response::builder()
                .status(200)
                .header("content-type", "application/octet-stream")
                .body(Body::from_stream(futures_lite::stream::iter(chunks)))?)
        }

        _ => text(404, format!("unknown mode: {full_path}")),
    }
}
