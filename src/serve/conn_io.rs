//! The connection's byte stream as hyper sees it, with one change: hyper's own answer to a request it
//! cannot parse (a request line or header that is not HTTP/1.1, such as raw bytes outside ASCII; a
//! head too large; a URI too long) is a bare status line with an empty body, written before any
//! handler runs. Every other error of the server is `{"error": ...}` JSON, so those answers are
//! rewritten here into the same shape, with the status hyper chose.
//!
//! Hyper writes that answer as the whole head in one write. A write that begins with a status line of
//! 400, 414 or 431 and has no content-type header can only be it: every response of the router has a
//! content type (`json_errors` in http.rs sees to it for errors). Anything else passes through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct JsonParseErrors<S> {
    inner: S,
    /// A rewritten answer still to be written, and how much of it is out.
    pending: Vec<u8>,
    sent: usize,
}

impl<S> JsonParseErrors<S> {
    pub fn new(inner: S) -> Self {
        JsonParseErrors { inner, pending: Vec::new(), sent: 0 }
    }
}

/// The JSON answer replacing hyper's bare one, or None when `head` is not such an answer.
fn rewrite(head: &[u8]) -> Option<Vec<u8>> {
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    if end + 4 != head.len() {
        return None; // a body follows: not hyper's automatic answer
    }
    let text = std::str::from_utf8(&head[..end]).ok()?;
    let mut lines = text.split("\r\n");
    let status = lines.next()?.strip_prefix("HTTP/1.1 ")?.get(..3)?;
    let msg = match status {
        "400" => {
            "malformed HTTP request: the request line or a header is not valid HTTP/1.1 (bytes outside ASCII, a bad method, URI or version)"
        }
        "414" => "the request URI is too long",
        "431" => "the request head (request line and headers) is too large",
        _ => return None,
    };
    let mut content_length_zero = false;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        if name.trim().eq_ignore_ascii_case("content-type") {
            return None;
        }
        if name.trim().eq_ignore_ascii_case("content-length") {
            content_length_zero = value.trim() == "0";
        }
    }
    if !content_length_zero {
        return None;
    }
    let reason = match status {
        "400" => "Bad Request",
        "414" => "URI Too Long",
        _ => "Request Header Fields Too Large",
    };
    let body = serde_json::json!({ "error": msg }).to_string();
    Some(
        format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

impl<S: AsyncWrite + Unpin> JsonParseErrors<S> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.pending.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.pending.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonParseErrors<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonParseErrors<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        if buf.starts_with(b"HTTP/1.1 4")
            && let Some(answer) = rewrite(buf)
        {
            this.pending = answer;
            // The caller's bytes count as written; the answer goes out now or at flush/shutdown.
            let _ = this.poll_drain(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    // Not vectored: hyper then writes a head as one buffer, which `rewrite` needs to see whole.
}

#[cfg(test)]
mod tests {
    use super::rewrite;

    #[test]
    fn only_hypers_bare_parse_error_answers_are_rewritten() {
        let bare = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Mon, 30 Nov 2026 12:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(rewrite(bare).expect("rewritten")).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n") && head.contains("content-type: application/json"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(v["error"].as_str().unwrap().contains("malformed HTTP request"));
        let big = rewrite(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n").unwrap();
        assert!(String::from_utf8(big).unwrap().contains("too large"));
        // The router's answers (a content type, a body) and other statuses pass through.
        assert!(
            rewrite(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n")
                .is_none()
        );
        assert!(rewrite(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}").is_none());
        assert!(rewrite(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(rewrite(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n").is_none());
    }
}
