//! Per-invocation capture of the guest's stdout and stderr as log lines.
//!
//! Writes never fail and never block the guest: past the per-invocation budget the rest is
//! dropped and the capture remembers that it truncated, so a chatty guest cannot use logging to
//! grow host memory. The budget charges what a line really costs — its text plus a fixed
//! overhead — and the number of lines is capped too, so a guest that prints `\n` a million times
//! is stopped as early as one that prints a megabyte.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use sluice_core::limits::{LOG_LINE_OVERHEAD_BYTES, LOG_LINES_PER_INVOCATION_MAX};
use sluice_core::{LogStream, UnixMs};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// How much a guest may write in one `write` call; any non-zero value works since we never
/// push back, it only bounds the host allocation per call.
const WRITE_PERMIT_BYTES: usize = 64 * 1024;
/// A line longer than this is cut into several.
const LINE_BYTES_MAX: usize = 8 * 1024;
/// Lines sluice writes itself (a trap message, a denied outbound call) may go this far past the
/// line cap, so that the reason a call failed survives a guest that filled its logs.
const SYSTEM_LINES_RESERVE: usize = 8;

#[derive(Debug, Default)]
struct State {
    lines: Vec<(LogStream, String, UnixMs)>,
    partial: [Vec<u8>; 2],
    /// Bytes charged so far: line text plus [`LOG_LINE_OVERHEAD_BYTES`] per line.
    bytes: usize,
    /// Set at the first write that did not fit; everything after it is dropped.
    truncated: bool,
}

/// The log lines of one invocation. Cheap to clone: clones share the buffer.
#[derive(Debug, Clone)]
pub struct LogCapture {
    state: Arc<Mutex<State>>,
    bytes_max: usize,
    lines_max: usize,
}

impl LogCapture {
    /// A capture of at most `bytes_max` bytes (line overhead included) and
    /// [`LOG_LINES_PER_INVOCATION_MAX`] lines.
    pub fn new(bytes_max: usize) -> Self {
        Self::with_lines_max(bytes_max, LOG_LINES_PER_INVOCATION_MAX)
    }

    fn with_lines_max(bytes_max: usize, lines_max: usize) -> Self {
        Self { state: Arc::default(), bytes_max, lines_max }
    }

    /// A stream for the guest's stdout or stderr.
    pub fn stream(&self, stream: LogStream) -> LogWriter {
        LogWriter { capture: self.clone(), stream }
    }

    /// Adds a line written by sluice itself (a trap message, a denied outbound call). A guest can
    /// provoke these in a loop, so they are capped too, a little later than its own lines.
    pub fn system(&self, line: impl Into<String>) {
        let mut st = self.state.lock().expect("log capture lock");
        if st.lines.len() >= self.lines_max + SYSTEM_LINES_RESERVE {
            st.truncated = true;
            return;
        }
        st.lines.push((LogStream::System, line.into(), now_ms()));
    }

    fn write(&self, stream: LogStream, bytes: &[u8]) {
        let mut st = self.state.lock().expect("log capture lock");
        let idx = usize::from(stream == LogStream::Stderr);
        let at = now_ms();
        let mut rest = bytes;
        while !rest.is_empty() && !st.truncated {
            // The text that goes into the current line, and whether the line ends after it: at a
            // newline (which is consumed), or because the line is full and more text follows.
            let room_in_line = LINE_BYTES_MAX - st.partial[idx].len();
            let window = &rest[..rest.len().min(room_in_line + 1)];
            let (text, consumed, ends_line) = match window.iter().position(|&b| b == b'\n') {
                Some(i) => (i, i + 1, true),
                None if rest.len() > room_in_line => (room_in_line, room_in_line, true),
                None => (rest.len(), rest.len(), false),
            };
            // The line's overhead is kept free, so that text which fits can still become a line.
            let room = self.bytes_max.saturating_sub(st.bytes + LOG_LINE_OVERHEAD_BYTES);
            let fits = text.min(room);
            st.bytes += fits;
            st.partial[idx].extend_from_slice(&rest[..fits]);
            if fits < text {
                st.truncated = true;
                break;
            }
            rest = &rest[consumed..];
            if ends_line {
                self.end_line(&mut st, stream, at);
            }
        }
    }

    /// Turns the partial line of `stream` into a line, if the budget has room for one more.
    fn end_line(&self, st: &mut State, stream: LogStream, at: UnixMs) {
        let idx = usize::from(stream == LogStream::Stderr);
        let line = std::mem::take(&mut st.partial[idx]);
        if st.lines.len() >= self.lines_max || st.bytes + LOG_LINE_OVERHEAD_BYTES > self.bytes_max {
            st.truncated = true;
            return;
        }
        st.bytes += LOG_LINE_OVERHEAD_BYTES;
        st.lines.push((stream, String::from_utf8_lossy(&line).into_owned(), at));
    }

    /// Takes the captured lines, flushing unterminated ones and noting a truncation once.
    pub fn take(&self) -> Vec<(LogStream, String, UnixMs)> {
        let mut st = self.state.lock().expect("log capture lock");
        let at = now_ms();
        for stream in [LogStream::Stdout, LogStream::Stderr] {
            let idx = usize::from(stream == LogStream::Stderr);
            if !st.partial[idx].is_empty() {
                self.end_line(&mut st, stream, at);
            }
        }
        if std::mem::take(&mut st.truncated) {
            let note = format!(
                "log output truncated: at most {} lines and {} bytes per invocation, each line \
                 counting {LOG_LINE_OVERHEAD_BYTES} bytes more than its text",
                self.lines_max, self.bytes_max
            );
            st.lines.push((LogStream::System, note, at));
        }
        // The budget is per invocation: a reused instance's next call starts with all of it.
        st.bytes = 0;
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

    fn texts(cap: &LogCapture) -> Vec<(LogStream, String)> {
        cap.take().into_iter().map(|(s, l, _)| (s, l)).collect()
    }

    #[test]
    fn splits_lines_per_stream() {
        let cap = LogCapture::new(64 * 1024);
        cap.write(LogStream::Stdout, b"one\ntw");
        cap.write(LogStream::Stderr, b"err\n");
        cap.write(LogStream::Stdout, b"o\nthree");
        assert_eq!(
            texts(&cap),
            vec![
                (LogStream::Stdout, "one".to_string()),
                (LogStream::Stderr, "err".to_string()),
                (LogStream::Stdout, "two".to_string()),
                (LogStream::Stdout, "three".to_string()),
            ]
        );
    }

    #[test]
    fn long_lines_are_cut_without_an_empty_line_after_an_exact_fit() {
        let cap = LogCapture::new(1024 * 1024);
        let mut exact = vec![b'x'; LINE_BYTES_MAX];
        exact.push(b'\n');
        cap.write(LogStream::Stdout, &exact);
        cap.write(LogStream::Stdout, &[b'y'; LINE_BYTES_MAX + 10]);
        let lengths: Vec<usize> = cap.take().iter().map(|(_, l, _)| l.len()).collect();
        assert_eq!(lengths, vec![LINE_BYTES_MAX, LINE_BYTES_MAX, 10]);
    }

    #[test]
    fn a_line_over_the_byte_budget_keeps_its_prefix_and_notes_the_truncation() {
        let cap = LogCapture::new(LOG_LINE_OVERHEAD_BYTES + 100);
        cap.write(LogStream::Stdout, &[b'x'; 1000]);
        let lines = cap.take();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0].1.len(), 100);
        assert!(lines[1].1.contains("truncated"), "{lines:?}");
        assert_eq!(lines[1].0, LogStream::System);
    }

    #[test]
    fn empty_lines_are_charged_their_overhead() {
        let cap = LogCapture::with_lines_max(10 * LOG_LINE_OVERHEAD_BYTES, usize::MAX);
        cap.write(LogStream::Stdout, &vec![b'\n'; 1_000_000]);
        let lines = cap.take();
        assert_eq!(lines.len(), 10 + 1, "ten empty lines fit, then the note");
        assert!(lines[10].1.contains("truncated"));
    }

    #[test]
    fn lines_are_capped_per_invocation_and_the_truncation_noted_once() {
        let cap = LogCapture::with_lines_max(1024 * 1024, 5);
        for _ in 0..100 {
            cap.write(LogStream::Stderr, b"a\nb\n");
        }
        let lines = cap.take();
        assert_eq!(lines.len(), 5 + 1, "{lines:?}");
        assert_eq!(lines.iter().filter(|(_, l, _)| l.contains("truncated")).count(), 1);
        assert_eq!(LogCapture::new(usize::MAX).lines_max, LOG_LINES_PER_INVOCATION_MAX);
    }

    #[test]
    fn system_lines_survive_a_full_capture_but_are_capped_too() {
        let cap = LogCapture::with_lines_max(1024 * 1024, 3);
        cap.write(LogStream::Stdout, b"1\n2\n3\n4\n");
        cap.system("the call trapped");
        for _ in 0..1000 {
            cap.system("outbound call denied");
        }
        let lines = cap.take();
        assert_eq!(lines[3].1, "the call trapped");
        assert_eq!(lines.len(), 3 + SYSTEM_LINES_RESERVE + 1, "{lines:?}");
    }
}
