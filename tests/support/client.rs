//! The raw downstream client: requests as bytes, responses read to the last byte, SSE read event by event.
//!
//! Every read has a `STEP_TIMEOUT`; running into it fails the test.

use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use serde_json::Value;

use super::wire::{header, read_body, read_head, read_line};
use super::{MESSAGE_BODY, STEP_TIMEOUT};

/// A response as the raw client read it.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Lowercase names, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {}", self.text()))
    }
}

/// Error types Anthropic's API uses.
const ANTHROPIC_ERROR_TYPES: &[&str] = &[
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "api_error",
    "overloaded_error",
    "timeout_error",
    "billing_error",
];

/// Checks an Anthropic-shaped error (`{"type":"error","error":{"type","message"}}`) and returns its JSON.
/// Without an expected type, the type must still be one Anthropic uses.
pub fn assert_error(resp: &Response, status: u16, error_type: Option<&str>) -> Value {
    assert_eq!(resp.status, status, "status; body: {}", resp.text());
    let content_type = resp.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "error content-type should be JSON, got {content_type:?}"
    );
    let v = resp.json();
    assert_eq!(v["type"], "error", "top-level type in {v}");
    let kind = v["error"]["type"]
        .as_str()
        .unwrap_or_else(|| panic!("error.type in {v}"));
    match error_type {
        Some(expected) => assert_eq!(kind, expected, "error.type in {v}"),
        None => assert!(
            ANTHROPIC_ERROR_TYPES.contains(&kind),
            "unexpected error.type in {v}"
        ),
    }
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        !message.is_empty(),
        "error.message should say something: {v}"
    );
    v
}

/// Serialises a request; adds `host` and, for bodies and POSTs, `content-length`.
pub fn request_bytes(method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    // This machine's name, as a client here sends it (keyless admin access needs one), unless
    // the test names another.
    let host = if headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        ""
    } else {
        "host: localhost\r\n"
    };
    let mut head = format!("{method} {target} HTTP/1.1\r\n{host}");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// One request on a fresh connection (`connection: close`), and its response.
pub fn call(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut all = headers.to_vec();
    all.push(("connection", "close"));
    let mut conn = Conn::open(addr);
    conn.send(&request_bytes(method, target, &all, body));
    conn.read_response()
}

/// `POST /v1/messages` with `MESSAGE_BODY` and these headers, on a fresh connection.
pub fn post_message(addr: SocketAddr, headers: &[(&str, &str)]) -> Response {
    call(
        addr,
        "POST",
        "/v1/messages",
        headers,
        MESSAGE_BODY.as_bytes(),
    )
}

/// The bytes of `POST /v1/messages` with `MESSAGE_BODY` and these headers, to send on a
/// connection of one's own.
pub fn message_request(headers: &[(&str, &str)]) -> Vec<u8> {
    request_bytes("POST", "/v1/messages", headers, MESSAGE_BODY.as_bytes())
}

/// Sends `POST target` on a fresh connection and reads the answer's head, which must be a
/// 200; the body is then read event by event.
pub fn open_sse(
    addr: SocketAddr,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> SseStream {
    let mut conn = Conn::open(addr);
    conn.send(&request_bytes("POST", target, headers, body));
    let (status, head) = conn.read_head();
    assert_eq!(status, 200, "POST {target}: the stream starts");
    conn.into_sse(&head)
}

/// A raw client connection with a `STEP_TIMEOUT` read timeout.
pub struct Conn {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> Conn {
        Conn::open_waiting(addr, STEP_TIMEOUT)
    }

    /// A connection whose reads wait up to `timeout` (for answers a debug build takes long
    /// to make, such as a 32 MiB body's).
    pub fn open_waiting(addr: SocketAddr, timeout: std::time::Duration) -> Conn {
        let writer = TcpStream::connect(addr).expect("connect to gateway");
        writer
            .set_read_timeout(Some(timeout))
            .expect("set read timeout");
        let reader = BufReader::new(writer.try_clone().expect("clone stream"));
        Conn { writer, reader }
    }

    /// A second handle on the socket, for writing from another thread.
    pub fn writer(&self) -> TcpStream {
        self.writer.try_clone().expect("clone stream")
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write to gateway");
        self.writer.flush().expect("flush to gateway");
    }

    /// Reads a status line and headers, including interim (1xx) ones.
    pub fn read_head(&mut self) -> (u16, Vec<(String, String)>) {
        match read_head(&mut self.reader) {
            Ok(Some((line, headers))) => (parse_status(&line), headers),
            Ok(None) => panic!("gateway closed the connection without a response"),
            Err(e) => panic!("no response head from the gateway within {STEP_TIMEOUT:?}: {e}"),
        }
    }

    /// Reads a final response, skipping interim ones.
    pub fn read_response(&mut self) -> Response {
        self.try_read_response()
            .unwrap_or_else(|e| panic!("no complete response within {STEP_TIMEOUT:?}: {e}"))
    }

    pub fn try_read_response(&mut self) -> io::Result<Response> {
        loop {
            let (line, headers) = read_head(&mut self.reader)?
                .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed"))?;
            let status = parse_status(&line);
            if (100..200).contains(&status) {
                continue;
            }
            let body = read_body(&mut self.reader, &headers, true)?;
            return Ok(Response {
                status,
                headers,
                body,
            });
        }
    }

    /// Reads whatever arrives until the gateway closes the connection (or resets it).
    /// Fails the test if the connection is still open after `STEP_TIMEOUT` of silence.
    pub fn read_until_closed(&mut self) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("connection still open after {STEP_TIMEOUT:?} of silence")
                }
                Err(_) => return got,
            }
        }
    }

    /// Turns the connection into an event reader, after `read_head` returned these headers.
    pub fn into_sse(self, headers: &[(String, String)]) -> SseStream {
        let framing = if header(headers, "transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            BodyFraming::Chunked
        } else if let Some(len) = header(headers, "content-length") {
            BodyFraming::Length(len.parse().expect("numeric content-length"))
        } else {
            BodyFraming::Close
        };
        SseStream {
            reader: self.reader,
            framing,
            pending: Vec::new(),
            arrived: Instant::now(),
            end: None,
        }
    }
}

fn parse_status(line: &str) -> u16 {
    let mut parts = line.split(' ');
    let version = parts.next().unwrap_or_default();
    assert!(
        version.starts_with("HTTP/1."),
        "not an HTTP/1 status line: {line:?}"
    );
    parts
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"))
}

enum BodyFraming {
    Chunked,
    Length(usize),
    Close,
}

/// How an event stream ended.
#[derive(Debug, PartialEq)]
pub enum StreamEnd {
    /// The framing said so: the terminating chunk, the full length, or EOF on a close-delimited body.
    Clean,
    /// EOF before the framing was complete (no terminating chunk, or short of content-length).
    Truncated,
    /// The socket failed (e.g. reset).
    Broken(String),
}

/// One SSE event (its text including the blank line that ends it) and when its last byte arrived.
pub struct Event {
    pub raw: String,
    pub at: Instant,
}

impl Event {
    /// The value of the first `name:` line.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.raw.lines().find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(':'))
                .map(|v| v.strip_prefix(' ').unwrap_or(v))
        })
    }
}

/// Reads a downstream SSE body event by event as the bytes arrive.
pub struct SseStream {
    reader: BufReader<TcpStream>,
    framing: BodyFraming,
    pending: Vec<u8>,
    arrived: Instant,
    end: Option<StreamEnd>,
}

impl SseStream {
    /// The next event, or `None` once the stream has ended. A leftover without its blank line
    /// is returned as a last event. Fails the test after `STEP_TIMEOUT` without data.
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(end) = event_end(&self.pending) {
                let raw: Vec<u8> = self.pending.drain(..end).collect();
                return Some(self.event(raw));
            }
            if self.end.is_some() {
                if self.pending.is_empty() {
                    return None;
                }
                let raw = std::mem::take(&mut self.pending);
                return Some(self.event(raw));
            }
            self.fill();
        }
    }

    pub fn end(&self) -> Option<&StreamEnd> {
        self.end.as_ref()
    }

    /// Checks that the stream goes on with exactly the events `sent`, then one `event: error`
    /// in Anthropic's shape, then nothing, and ends properly: how a stream cut short upstream
    /// reaches the client.
    pub fn assert_events_then_error(&mut self, sent: &[String]) {
        for (i, expected) in sent.iter().enumerate() {
            let ev = self
                .next_event()
                .unwrap_or_else(|| panic!("stream ended before event {i}: {:?}", self.end()));
            assert_eq!(&ev.raw, expected, "event {i} before the error");
        }
        let err = self
            .next_event()
            .unwrap_or_else(|| panic!("no error event after a truncated stream: {:?}", self.end()));
        assert_eq!(
            err.field("event"),
            Some("error"),
            "final event: {:?}",
            err.raw
        );
        let data = err
            .field("data")
            .unwrap_or_else(|| panic!("error event has no data: {:?}", err.raw));
        let v: Value = serde_json::from_str(data).expect("error data is JSON");
        assert_eq!(v["type"], "error", "{v}");
        assert!(v["error"]["type"].is_string(), "{v}");
        assert!(v["error"]["message"].is_string(), "{v}");
        let extra = self.next_event().map(|e| e.raw);
        assert_eq!(extra, None, "nothing after the error event");
        assert_eq!(
            self.end(),
            Some(&StreamEnd::Clean),
            "stream should end properly"
        );
    }

    fn event(&self, raw: Vec<u8>) -> Event {
        Event {
            raw: String::from_utf8(raw).expect("SSE is UTF-8"),
            at: self.arrived,
        }
    }

    fn fill(&mut self) {
        let result = match self.framing {
            BodyFraming::Chunked => self.fill_chunk(),
            BodyFraming::Length(0) => {
                self.end = Some(StreamEnd::Clean);
                Ok(())
            }
            BodyFraming::Length(left) => {
                let mut buf = vec![0u8; left.min(8192)];
                match self.reader.read(&mut buf) {
                    Ok(0) => {
                        self.end = Some(StreamEnd::Truncated);
                        Ok(())
                    }
                    Ok(n) => {
                        self.framing = BodyFraming::Length(left - n);
                        self.push(&buf[..n]);
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            BodyFraming::Close => {
                let mut buf = [0u8; 8192];
                match self.reader.read(&mut buf) {
                    Ok(0) => {
                        self.end = Some(StreamEnd::Clean);
                        Ok(())
                    }
                    Ok(n) => {
                        self.push(&buf[..n]);
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(e) = result {
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                panic!("no SSE data from the gateway within {STEP_TIMEOUT:?}");
            }
            self.end = Some(match e.kind() {
                io::ErrorKind::UnexpectedEof => StreamEnd::Truncated,
                _ => StreamEnd::Broken(e.to_string()),
            });
        }
    }

    fn fill_chunk(&mut self) -> io::Result<()> {
        let Some(line) = read_line(&mut self.reader)? else {
            self.end = Some(StreamEnd::Truncated);
            return Ok(());
        };
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| io::Error::other(format!("bad chunk size line {line:?}")))?;
        if size == 0 {
            while !read_line(&mut self.reader)?.unwrap_or_default().is_empty() {}
            self.end = Some(StreamEnd::Clean);
            return Ok(());
        }
        let mut chunk = vec![0u8; size];
        self.reader.read_exact(&mut chunk)?;
        let mut crlf = [0u8; 2];
        self.reader.read_exact(&mut crlf)?;
        if &crlf != b"\r\n" {
            return Err(io::Error::other("chunk not followed by CRLF"));
        }
        self.push(&chunk);
        Ok(())
    }

    fn push(&mut self, bytes: &[u8]) {
        self.arrived = Instant::now();
        self.pending.extend_from_slice(bytes);
    }
}

/// Where the first event in `buf` ends (just past its blank line), if it is complete.
fn event_end(buf: &[u8]) -> Option<usize> {
    let find = |pat: &[u8]| {
        buf.windows(pat.len())
            .position(|w| w == pat)
            .map(|i| i + pat.len())
    };
    match (find(b"\n\n"), find(b"\r\n\r\n")) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
