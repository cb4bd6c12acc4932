//! Detects request heads that carry both `Content-Length` and `Transfer-Encoding`.
//!
//! hyper handles such a request the RFC 7230 way (chunked wins, `Content-Length` is dropped, the
//! connection closes after the response), which defeats smuggling but hides the fact from the
//! handler. sluice refuses such requests outright (DESIGN.md section 6), so the connection's read
//! side scans what arrives: a header line starting `transfer-encoding:` in a chunk that also has a
//! `content-length:` line raises a flag the handler checks. The scan looks only at the byte after
//! each newline, so ordinary requests pay a `memchr` pass and nothing more.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream that flags conflicting body framing in what it reads.
pub struct SniffIo<S> {
    inner: S,
    conflict: Arc<AtomicBool>,
}

impl<S> SniffIo<S> {
    pub fn new(inner: S) -> (Self, Arc<AtomicBool>) {
        let conflict = Arc::new(AtomicBool::new(false));
        (Self { inner, conflict: conflict.clone() }, conflict)
    }
}

/// Whether `bytes` holds a header line of each framing.
pub fn has_both_framings(bytes: &[u8]) -> bool {
    let (mut te, mut cl) = (false, false);
    for i in memchr::memchr_iter(b'\n', bytes) {
        let line = &bytes[i + 1..];
        match line.first() {
            Some(b't' | b'T') => te |= starts_with_ignore_case(line, b"transfer-encoding:"),
            Some(b'c' | b'C') => cl |= starts_with_ignore_case(line, b"content-length:"),
            _ => {}
        }
    }
    te && cl
}

fn starts_with_ignore_case(line: &[u8], prefix: &[u8]) -> bool {
    line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix)
}

impl<S: AsyncRead + Unpin> AsyncRead for SniffIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if res.is_ready() && has_both_framings(&buf.filled()[before..]) {
            self.conflict.store(true, Ordering::Relaxed);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SniffIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_only_heads_with_both_framings() {
        assert!(has_both_framings(
            b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(has_both_framings(
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n"
        ));
        assert!(!has_both_framings(b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd"));
        assert!(!has_both_framings(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"));
        assert!(!has_both_framings(b"GET / HTTP/1.1\r\ncontent-type: x\r\ntrailer: y\r\n\r\n"));
    }
}
