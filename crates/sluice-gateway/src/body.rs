//! Body types of the gateway: every response is boxed into one type, and request bodies are
//! bounded while they stream.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use sluice_core::{ErrorKind, SluiceError};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// The error for a request body over its limit.
pub fn too_large(max: u64) -> SluiceError {
    SluiceError::new(
        ErrorKind::PayloadTooLarge,
        format!("request body is larger than the limit of {max} bytes"),
    )
}

/// Reads a whole request body of at most `max` bytes within `read_timeout`: 413 beyond the size,
/// 408 past the deadline, 400 if reading fails. The deadline covers the whole body, not each
/// read: a client sending one byte a second never times out a per-read deadline.
pub async fn collect_limited<B>(body: B, max: u64, read_timeout: Duration) -> Result<Bytes, SluiceError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let collect = http_body_util::Limited::new(body, max as usize).collect();
    match tokio::time::timeout(read_timeout, collect).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(max)),
        Ok(Err(e)) => Err(SluiceError::bad_request(format!("reading the request body: {e}"))),
        Err(_) => Err(SluiceError::new(
            ErrorKind::RequestTimeout,
            format!(
                "the request body did not arrive within {}",
                sluice_core::units::format_duration(read_timeout)
            ),
        )),
    }
}

/// A request body that fails once more than `max_bytes` arrive, and remembers that it did so the
/// caller can answer 413 rather than blame the function.
pub struct Limited<B> {
    inner: B,
    remaining: u64,
    max_bytes: u64,
    exceeded: Arc<AtomicBool>,
}

impl<B> Limited<B> {
    pub fn new(inner: B, max_bytes: u64) -> (Self, Arc<AtomicBool>) {
        let exceeded = Arc::new(AtomicBool::new(false));
        (Self { inner, remaining: max_bytes, max_bytes, exceeded: exceeded.clone() }, exceeded)
    }
}

impl<B> http_body::Body for Limited<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<sluice_runtime::BodyError>,
{
    type Data = Bytes;
    type Error = sluice_runtime::BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > self.remaining {
                        self.exceeded.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(sluice_runtime::BodyError::HttpRequestBodySize(Some(
                            self.max_bytes,
                        )))));
                    }
                    self.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            other => other.map(|_| None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
