//! Writing a response on a downstream connection: the head (status line and headers, framing
//! added on send) and the body, in one write with `content-length`, without a body at all
//! (204, 304), chunked, close-delimited, or copied through with a known length.

use std::io::{self, Write};
use std::net::TcpStream;

use crate::http::Conn;

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        417 => "Expectation Failed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        529 => "Overloaded",
        _ => "",
    }
}

/// Writes one response on a connection. Consumed by the method that sends the body; its result
/// says whether the connection may serve another request.
pub struct Responder<'a> {
    pub(crate) conn: &'a mut Conn,
    pub(crate) minor_version: u8,
    pub(crate) keep_alive: bool,
    /// Sent back as `x-request-id` on every response.
    pub(crate) request_id: Option<String>,
}

/// A response head under construction: status line and headers, framing added on send.
pub struct Head {
    buf: Vec<u8>,
}

impl Head {
    pub fn new(status: u16) -> Head {
        let mut buf = Vec::with_capacity(512);
        buf.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason(status)).as_bytes());
        Head { buf }
    }

    /// Adds a header. Values come from httparse or `http::HeaderValue`, so hold no CR or LF;
    /// anything else is dropped rather than risk response splitting.
    pub fn header(&mut self, name: &str, value: &[u8]) -> &mut Head {
        if value.iter().any(|&b| b == b'\r' || b == b'\n') || name.is_empty() {
            return self;
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.extend_from_slice(b": ");
        self.buf.extend_from_slice(value);
        self.buf.extend_from_slice(b"\r\n");
        self
    }
}

impl<'a> Responder<'a> {
    pub fn with_request_id(mut self, id: &str) -> Responder<'a> {
        self.request_id = Some(id.to_string());
        self
    }

    fn finish_head(&mut self, head: &mut Head, framing: &str) {
        self.conn.responded = true;
        if let Some(id) = &self.request_id {
            head.header("x-request-id", id.as_bytes());
        }
        head.buf.extend_from_slice(framing.as_bytes());
        if !self.keep_alive {
            head.buf.extend_from_slice(b"connection: close\r\n");
        } else if self.minor_version == 0 {
            head.buf.extend_from_slice(b"connection: keep-alive\r\n");
        }
        head.buf.extend_from_slice(b"\r\n");
    }

    /// Sends a complete response with Content-Length in one write. Returns whether the
    /// connection may be reused.
    pub fn send(mut self, mut head: Head, body: &[u8]) -> bool {
        self.finish_head(&mut head, &format!("content-length: {}\r\n", body.len()));
        head.buf.extend_from_slice(body);
        (&*self.conn.stream).write_all(&head.buf).is_ok() && self.keep_alive
    }

    /// Sends a response that has no body by definition (204, 304): no framing header at all.
    pub fn send_bodiless(mut self, mut head: Head) -> bool {
        self.finish_head(&mut head, "");
        (&*self.conn.stream).write_all(&head.buf).is_ok() && self.keep_alive
    }

    /// Starts a body of unknown length: chunked for HTTP/1.1, close-delimited for HTTP/1.0.
    pub fn stream(mut self, mut head: Head) -> io::Result<BodyWriter<'a>> {
        let chunked = self.minor_version == 1;
        if chunked {
            self.finish_head(&mut head, "transfer-encoding: chunked\r\n");
        } else {
            self.keep_alive = false;
            self.finish_head(&mut head, "");
        }
        (&*self.conn.stream).write_all(&head.buf)?;
        Ok(BodyWriter {
            stream: &self.conn.stream,
            chunked,
            keep_alive: self.keep_alive,
            scratch: Vec::new(),
            remaining: None,
        })
    }

    /// Starts a body of known length, copied through as it arrives.
    pub fn stream_with_length(mut self, mut head: Head, len: u64) -> io::Result<BodyWriter<'a>> {
        self.finish_head(&mut head, &format!("content-length: {len}\r\n"));
        (&*self.conn.stream).write_all(&head.buf)?;
        Ok(BodyWriter {
            stream: &self.conn.stream,
            chunked: false,
            keep_alive: self.keep_alive,
            scratch: Vec::new(),
            remaining: Some(len),
        })
    }
}

/// Writes body bytes as they come; each `write` reaches the socket before it returns.
pub struct BodyWriter<'a> {
    stream: &'a TcpStream,
    chunked: bool,
    keep_alive: bool,
    scratch: Vec<u8>,
    /// For a Content-Length body, the bytes still owed.
    remaining: Option<u64>,
}

impl BodyWriter<'_> {
    /// The client's socket, for watching whether the client is still there (`watch`).
    pub fn socket(&self) -> &TcpStream {
        self.stream
    }

    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if let Some(left) = &mut self.remaining {
            *left = left.saturating_sub(data.len() as u64);
        }
        if !self.chunked {
            return self.stream.write_all(data);
        }
        // One write per chunk: size line, data and CRLF together.
        self.scratch.clear();
        self.scratch
            .extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        self.scratch.extend_from_slice(data);
        self.scratch.extend_from_slice(b"\r\n");
        self.stream.write_all(&self.scratch)
    }

    /// Ends the body properly. Returns whether the connection may be reused.
    pub fn finish(self) -> bool {
        if self.chunked {
            return (&*self.stream).write_all(b"0\r\n\r\n").is_ok() && self.keep_alive;
        }
        self.keep_alive && self.remaining.is_none_or(|left| left == 0)
    }

    /// Ends the body without its terminator, so the client sees a truncated response rather
    /// than a complete one. The connection must then be closed.
    pub fn abort(self) -> bool {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_values_with_line_breaks_are_dropped() {
        let mut h = Head::new(200);
        h.header("x-a", b"ok").header("x-b", b"bad\r\nx-evil: 1");
        let text = String::from_utf8(h.buf).expect("ascii");
        assert!(text.contains("x-a: ok"));
        assert!(!text.contains("evil"));
    }
}
