//! Per-invocation capture of the guest's stdout and stderr as log lines.
//!
//! Writes never fail and never block the guest: past the per-invocation byte budget the rest is
//! dropped and the capture remembers that it truncated, so a chatty guest cannot use logging to
//! grow host memory.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use sluice_core::{LogStream, UnixMs};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// How much a guest may write in one `write` call; any non-zero value works since we never
/// push back, it only bounds the host allocation per call.
const WRITE_PERMIT_BYTES: usize = 64 * 1024;
/// A line longer than this is cut into several.
const LINE_BYTES_MAX: usize = 8 * 1024;

#[derive(Debug, Default)]
struct State {
    lines: Vec<(LogStream, String, UnixMs)>,
    partial: [Vec<u8>; 2],
    bytes: usize,
    truncated: bool,
}

/// The log lines of one invocation. Cheap to clone: clones share the buffer.
#[derive(Debug, Clone)]
pub struct LogCapture {
    state: Arc<Mutex<State>>,
    bytes_max: usize,
}

impl LogCapture {
    pub fn new(bytes_max: usize) -> Self {
        Self { state: Arc::default(), bytes_max }
    }

    /// A stream for the guest's stdout or stderr.
    pub fn stream(&self, stream: LogStream) -> LogWriter {
        LogWriter { capture: self.clone(), stream }
    }

    /// Adds a line written by sluice itself (a trap message, a denied outbound call).
    pub fn system(&self, line: impl Into<String>) {
        let mut st = self.state.lock().expect("log capture lock");
        st.lines.push((LogStream::System, line.into(), now_ms()));
    }

    fn write(&self, stream: LogStream, mut bytes: &[u8]) {
        let mut st = self.state.lock().expect("log capture lock");
        let room = self.bytes_max.saturating_sub(st.bytes);
        if bytes.len() > room {
            bytes = &bytes[..room];
            st.truncated = true;
        }
        st.bytes += bytes.len();
        let idx = usize::from(stream == LogStream::Stderr);
        let at = now_ms();
        for &b in bytes {
            if b == b'\n' || st.partial[idx].len() >= LINE_BYTES_MAX {
                let line = std::mem::take(&mut st.partial[idx]);
                st.lines.push((stream, String::from_utf8_lossy(&line).into_owned(), at));
                if b == b'\n' {
                    continue;
                }
            }
            st.partial[idx].push(b);
        }
    }

    /// Takes the captured lines, flushing unterminated ones and noting a truncation.
    pub fn take(&self) -> Vec<(LogStream, String, UnixMs)> {
        let mut st = self.state.lock().expect("log capture lock");
        let at = now_ms();
        for (idx, stream) in [(0, LogStream::Stdout), (1, LogStream::Stderr)] {
            let rest = std::mem::take(&mut st.partial[idx]);
            if !rest.is_empty() {
                st.lines.push((stream, String::from_utf8_lossy(&rest).into_owned(), at));
            }
        }
        if std::mem::take(&mut st.truncated) {
            let note = format!("log output truncated at {} bytes", self.bytes_max);
            st.lines.push((LogStream::System, note, at));
        }
        std::mem::take(&mut st.lines)
    }
}

fn now_ms() -> UnixMs {
    use sluice_core::Clock;
    sluice_core::SystemClock.now_ms()
}

/// One of the guest's output streams, writing into a [`LogCapture`].
#[derive(Debug, Clone)]
pub struct LogWriter {
    capture: LogCapture,
    stream: LogStream,
}

impl IsTerminal for LogWriter {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogWriter {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogWriter {
    async fn ready(&mut self) {}
}

impl OutputStream for LogWriter {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.capture.write(self.stream, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT_BYTES)
    }
}

impl tokio::io::AsyncWrite for LogWriter {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.capture.write(self.stream, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_per_stream_and_truncates() {
        let cap = LogCapture::new(32);
        cap.write(LogStream::Stdout, b"one\ntw");
        cap.write(LogStream::Stderr, b"err\n");
        cap.write(LogStream::Stdout, b"o\nthree");
        let lines: Vec<_> = cap.take().into_iter().map(|(s, l, _)| (s, l)).collect();
        assert_eq!(
            lines,
            vec![
                (LogStream::Stdout, "one".to_string()),
                (LogStream::Stderr, "err".to_string()),
                (LogStream::Stdout, "two".to_string()),
                (LogStream::Stdout, "three".to_string()),
            ]
        );
        cap.write(LogStream::Stdout, &[b'x'; 100]);
        let lines = cap.take();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0].1.len(), 32 - 17);
        assert!(lines[1].1.contains("truncated"));
    }
}
