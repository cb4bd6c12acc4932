//! What a caller hands the runtime for one invocation ([`Call`]) and what it gets back: the call
//! in flight ([`Running`]), the guest's streaming response body ([`GuestBody`]) and, when the
//! guest is done, its [`Outcome`]. Dropping either before the response is complete cancels the
//! guest.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sluice_core::{ErrorKind, FunctionConfig, LogStream, SluiceError, UnixMs};
use tokio::sync::oneshot;
use wasmtime_wasi_http::Error as BodyError;
use wasmtime_wasi_http::p2::bindings::http::types::ErrorCode;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use crate::{trace, warm};

/// Resolves when the caller went away: the [`CancelOnDrop`] was dropped while armed. A disarmed
/// guard (the response was delivered whole) never resolves it.
pub(crate) async fn cancelled(rx: oneshot::Receiver<()>) {
    if rx.await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Cancels the guest's task when dropped, unless disarmed first: held by [`Running`] until the
/// response head arrives, then by the response body until its last frame.
pub(crate) struct CancelOnDrop(pub(crate) Option<oneshot::Sender<()>>);

impl CancelOnDrop {
    fn disarm(&mut self) {
        self.0.take();
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// Where a call starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// On the current runtime: an HTTP worker, whose core the caller is waiting on.
    Sync,
    /// On the slow lane's threads: queued work that nobody waits on at the other end of a
    /// socket, kept off the control runtime that hosts the queue writer and the API.
    Async,
}

/// Receives an invocation's outcome when the guest is done.
pub type OnDone = Box<dyn FnOnce(&Outcome) + Send>;

/// What a caller asks of one invocation.
pub struct Call {
    pub invocation_id: String,
    pub config: Arc<FunctionConfig>,
    pub timeout: Duration,
    /// Where the call starts.
    pub lane: Lane,
    /// Slow-lane slots are bounded per group: the caller passes the tenant.
    pub group: Arc<str>,
    /// The function's name (within the group): downstream concurrency limits are kept per
    /// (tenant, function, downstream host).
    pub function: Arc<str>,
    /// Called with the outcome when the guest is done, before the outcome is sent to
    /// [`Running`]; the place to record it without keeping a task per call.
    pub on_done: Option<OnDone>,
    /// The span the call's `run` span is a child of (`None` with tracing off).
    pub trace: Option<TraceParent>,
    /// Where a warm instance comes from and goes back to, for a function with `reuse_calls` above
    /// 1 (`None`: a fresh instance that is dropped after the call).
    pub reuse: Option<warm::Reuse>,
    /// Room for its instance among the version's bounded instances
    /// ([`Runtime::instance_permit`](crate::Runtime::instance_permit)); held until the guest is
    /// done.
    pub instance: Option<warm::InstancePermit>,
}

/// Where an attempt's `run` span belongs in its trace.
pub struct TraceParent {
    pub cx: trace::TraceContext,
    /// The attempt of an async call.
    pub attempt: Option<u32>,
}

/// How an invocation ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub invocation_id: String,
    /// `None` when the guest returned normally after setting a response.
    pub error: Option<SluiceError>,
    /// The status of the response the guest set, if it set one.
    pub status_code: Option<u16>,
    pub logs: Vec<(LogStream, String, UnixMs)>,
    pub started_at: UnixMs,
    pub finished_at: UnixMs,
    /// Time the call spent on a thread (instantiation, guest code and the host calls it made), in
    /// microseconds: wall time inside its polls on the fast lane, thread CPU time on the slow.
    pub cpu_us: u64,
}

/// The body of a guest's response. Dropping it before its last frame (the client went away)
/// cancels the guest.
pub struct GuestBody {
    inner: HyperOutgoingBody,
    cancel: CancelOnDrop,
    /// Bytes of a response with a length (`content-length`) still to come. hyper stops polling
    /// such a body once it has written that many bytes, so the end is never seen as a last frame:
    /// without counting, a client that had the whole response would count as gone away while the
    /// guest was still returning.
    remaining: Option<u64>,
}

impl GuestBody {
    /// `length`: the response's `content-length`, if it has one.
    fn new(inner: HyperOutgoingBody, cancel: CancelOnDrop, length: Option<u64>) -> Self {
        let remaining = length.or_else(|| http_body::Body::size_hint(&inner).exact());
        let mut cancel = cancel;
        if remaining == Some(0) {
            // Nothing follows the head: hyper will not poll the body at all.
            cancel.disarm();
        }
        Self { inner, cancel, remaining }
    }
}

impl http_body::Body for GuestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(None) => self.cancel.disarm(),
            std::task::Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                if let Some(remaining) = self.remaining.as_mut() {
                    *remaining = remaining.saturating_sub(len);
                    if *remaining == 0 {
                        self.cancel.disarm();
                    }
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The response a guest set, and the receiver of its outcome once it is done.
pub type Responded = (http::Response<GuestBody>, oneshot::Receiver<Outcome>);

/// An invocation in flight. Dropping it before the response head arrived cancels the guest.
pub struct Running {
    pub(crate) head: oneshot::Receiver<Result<http::Response<HyperOutgoingBody>, ErrorCode>>,
    pub(crate) done: oneshot::Receiver<Outcome>,
    pub(crate) cancel: CancelOnDrop,
}

impl Running {
    /// Waits for the response head. On success the body streams while the guest keeps running
    /// and the returned receiver yields the outcome once it is done; on failure the outcome says
    /// why there is no response.
    pub async fn response(mut self) -> Result<Responded, Outcome> {
        // The outcome can come first: a call that timed out on the slow lane has its instance
        // (and with it the unset response) freed there, possibly later.
        let head = tokio::select! {
            biased;
            head = &mut self.head => head,
            done = &mut self.done => {
                self.cancel.disarm();
                return Err(done.unwrap_or_else(|_| lost_outcome()));
            }
        };
        match head {
            Ok(Ok(response)) => {
                let cancel = CancelOnDrop(self.cancel.0.take());
                let length = response
                    .headers()
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok());
                let response = response.map(|inner| GuestBody::new(inner, cancel, length));
                Ok((response, self.done))
            }
            Ok(Err(code)) => {
                self.cancel.disarm();
                let mut outcome = (&mut self.done).await.unwrap_or_else(|_| lost_outcome());
                outcome.error.get_or_insert_with(|| {
                    SluiceError::new(ErrorKind::Trap, format!("the function answered with error {code:?}"))
                });
                Err(outcome)
            }
            Err(_) => {
                self.cancel.disarm();
                Err((&mut self.done).await.unwrap_or_else(|_| lost_outcome()))
            }
        }
    }
}

fn lost_outcome() -> Outcome {
    Outcome {
        invocation_id: String::new(),
        error: Some(SluiceError::internal("the invocation task ended without an outcome")),
        status_code: None,
        logs: Vec::new(),
        started_at: 0,
        finished_at: 0,
        cpu_us: 0,
    }
}
