//! The downstream wire: HTTP/1.1 requests read from a client connection with httparse, under
//! hard limits (head size and total head time, body size and idle time); `respond` writes the
//! answers back.
//!
//! Why in-tree and not tiny_http: see ARCHITECTURE.md. Nothing here allocates what the client
//! merely declares: a body buffer grows with bytes actually received.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::respond::Responder;

/// The largest request head accepted; more is 431.
pub const MAX_HEAD: usize = 32 * 1024;
const MAX_HEADERS: usize = 128;
const READ_CHUNK: usize = 8 * 1024;

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_body: u64,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub keepalive_timeout: Duration,
    /// The slowest average a body may arrive at, in bytes a second, once `body_rate_grace`
    /// has passed (0: no minimum).
    pub body_min_rate: u64,
    pub body_rate_grace: Duration,
}

pub struct Request {
    pub method: String,
    /// Origin-form target: path and optional `?query`.
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Names lowercased, in arrival order; values as sent.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// Whether the client allows the connection to be reused after this request.
    pub keep_alive: bool,
}

impl Request {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// The first value of header `name` (lowercase), if it is valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .map(str::trim)
    }
}

/// Why no request could be read. Every variant but `Closed` and `Io` is answered, then the
/// connection is closed.
#[derive(Debug)]
pub enum ReadError {
    /// The client closed or idled out between requests: there is nobody to answer.
    Closed,
    /// The head did not arrive completely within the header timeout.
    HeadTimeout,
    /// The head exceeded MAX_HEAD or had too many header fields.
    HeadTooLarge,
    /// The declared or received body exceeds the configured limit.
    BodyTooLarge,
    /// The body stalled longer than the body timeout.
    BodyTimeout,
    /// The body arrived slower than the minimum rate (bytes a second) allows.
    BodyTooSlow(u64),
    /// The request violates HTTP/1.1 framing (or would allow request smuggling).
    Malformed(&'static str),
    /// A framing feature we do not implement, such as a transfer coding other than chunked.
    NotImplemented(&'static str),
    /// Expect with something other than 100-continue.
    ExpectationFailed,
    /// The connection failed; there is nobody to answer.
    Io,
}

impl ReadError {
    /// The status and message to answer with, or `None` when there is nobody to answer.
    pub fn answer(&self, max_body: u64) -> Option<(u16, String)> {
        Some(match self {
            ReadError::Closed | ReadError::Io => return None,
            ReadError::HeadTimeout => (408, "the request head did not arrive in time".into()),
            ReadError::HeadTooLarge => (
                431,
                format!("the request head is larger than {} KiB", MAX_HEAD / 1024),
            ),
            ReadError::BodyTooLarge => (
                413,
                format!("the request body is larger than the gateway's limit of {max_body} bytes"),
            ),
            ReadError::BodyTimeout => (408, "the request body stalled".into()),
            ReadError::BodyTooSlow(rate) => (
                408,
                format!("the request body arrived slower than {rate} bytes a second"),
            ),
            ReadError::Malformed(why) => (400, format!("malformed HTTP request: {why}")),
            ReadError::NotImplemented(why) => (501, format!("not supported: {why}")),
            ReadError::ExpectationFailed => (417, "only Expect: 100-continue is supported".into()),
        })
    }
}

pub enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// A client connection and the bytes read from it but not yet consumed (pipelining).
pub struct Conn {
    /// Shared with the server's connection registry, which may shut an idle one down.
    pub(crate) stream: Arc<TcpStream>,
    /// The peer's address, read once at accept.
    pub peer: Option<std::net::IpAddr>,
    buf: Vec<u8>,
    served: u64,
    /// What the current request's head said, once read: for answering and logging a request
    /// whose body is then refused.
    last_head: Option<HeadInfo>,
    /// The framing of a body announced by the head just read and not read yet.
    pending: Option<Framing>,
    /// A body was refused part way: the rest of it is still on the wire.
    broken: bool,
    /// When the body being read started, and the bytes received for it since.
    body_clock: (Instant, u64),
    /// Whether a response to the current request has started going out.
    pub(crate) responded: bool,
}

/// The parts of a request head that identify it in logs.
#[derive(Debug, Clone)]
pub struct HeadInfo {
    pub method: String,
    pub path: String,
    pub request_id: Option<String>,
}

/// The method and path of a head that was refused before it could be parsed whole.
fn request_line(buf: &[u8]) -> Option<HeadInfo> {
    let line = buf.split(|&b| b == b'\n').next()?;
    let mut parts = std::str::from_utf8(line).ok()?.split(' ');
    let method = parts.next()?.to_string();
    let target = parts.next()?;
    let path = target.split('?').next().unwrap_or(target).to_string();
    Some(HeadInfo {
        method,
        path,
        request_id: None,
    })
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl Conn {
    pub fn new(stream: TcpStream) -> Conn {
        Conn {
            peer: stream.peer_addr().ok().map(|a| a.ip()),
            stream: Arc::new(stream),
            buf: Vec::new(),
            served: 0,
            last_head: None,
            pending: None,
            broken: false,
            body_clock: (Instant::now(), 0),
            responded: false,
        }
    }

    /// The client's socket, shared: another thread may shut it down.
    pub fn socket(&self) -> Arc<TcpStream> {
        Arc::clone(&self.stream)
    }

    /// Reads more bytes into `buf`, waiting at most `wait`. `Ok(0)` is end of stream.
    fn fill(&mut self, wait: Duration) -> io::Result<usize> {
        self.stream
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
        let start = self.buf.len();
        self.buf.resize(start + READ_CHUNK, 0);
        let result = loop {
            match (&*self.stream).read(&mut self.buf[start..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        self.buf.truncate(start + *result.as_ref().unwrap_or(&0));
        result
    }

    /// The head of the request being read, if it was read.
    pub fn last_head(&self) -> Option<&HeadInfo> {
        self.last_head.as_ref()
    }

    /// Whether bytes of a next request (pipelined) are already here.
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Whether the request just read left bytes of its body on the wire (it was answered
    /// without reading it, or reading it failed): the connection must close after the answer.
    pub fn body_unread(&self) -> bool {
        self.pending.is_some() || self.broken
    }

    /// Drops an unread body that has already arrived whole (a small one sent with its head), so
    /// a request answered without its body can still leave the connection reusable.
    pub fn skip_arrived_body(&mut self) {
        if let Some(Framing::Length(n)) = self.pending
            && !self.broken
            && self.buf.len() as u64 >= n
        {
            self.buf.drain(..n as usize);
            self.pending = None;
            self.finish_request();
        }
    }

    /// Reads the next request, head and body (the fuzzer's whole-request entry point).
    pub fn read_request(&mut self, limits: &Limits) -> Result<Request, ReadError> {
        let mut req = self.read_head(limits)?;
        self.read_body(&mut req, limits)?;
        Ok(req)
    }

    /// Reads the next request's head. Its body, if it has one, stays unread until
    /// `read_body`: the key and the per-key limits are checked first.
    pub fn read_head(&mut self, limits: &Limits) -> Result<Request, ReadError> {
        self.last_head = None;
        self.pending = None;
        self.responded = false;
        let first = self.served == 0;
        let started = Instant::now();
        if self.buf.is_empty() {
            // A fresh connection has the header timeout to start; a reused one the keep-alive.
            let wait = if first {
                limits.header_timeout
            } else {
                limits.keepalive_timeout
            };
            match self.fill(wait) {
                Ok(0) => return Err(ReadError::Closed),
                Ok(_) => {}
                Err(e) if is_timeout(&e) => return Err(ReadError::Closed),
                Err(_) => return Err(ReadError::Io),
            }
        }
        // The whole head must arrive within the header timeout of its first byte (or of the
        // accept, for a new connection): a client trickling one byte a second is cut.
        let deadline = if first { started } else { Instant::now() } + limits.header_timeout;
        let (request, framing, head_len) = loop {
            let parsed = parse_head(&self.buf).inspect_err(|_| {
                // Refused for its framing or fields: the request line still tells the error
                // answer which API's shape the client speaks.
                self.last_head = request_line(&self.buf);
            })?;
            match parsed {
                Some(parsed) => break parsed,
                None if self.buf.len() >= MAX_HEAD => {
                    self.last_head = request_line(&self.buf);
                    return Err(ReadError::HeadTooLarge);
                }
                None => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReadError::HeadTimeout);
            }
            match self.fill(left) {
                Ok(0) => return Err(ReadError::Closed),
                Ok(_) => {}
                Err(e) if is_timeout(&e) => return Err(ReadError::HeadTimeout),
                Err(_) => return Err(ReadError::Io),
            }
        };
        self.buf.drain(..head_len);
        self.last_head = Some(HeadInfo {
            method: request.method.clone(),
            path: request.path().to_string(),
            request_id: request.header("x-request-id").map(String::from),
        });
        match framing {
            Framing::Length(n) if n > limits.max_body => {
                self.pending = Some(framing);
                return Err(ReadError::BodyTooLarge);
            }
            Framing::None | Framing::Length(0) => {}
            _ => self.pending = Some(framing),
        }
        if let Some(expect) = request.header("expect")
            && !expect.eq_ignore_ascii_case("100-continue")
        {
            return Err(ReadError::ExpectationFailed);
        }
        if self.pending.is_none() {
            self.finish_request();
        }
        Ok(request)
    }

    /// Reads the body the head of `req` announced (nothing if it announced none), under the
    /// size limit, the idle timeout and the minimum rate.
    pub fn read_body(&mut self, req: &mut Request, limits: &Limits) -> Result<(), ReadError> {
        let Some(framing) = self.pending.take() else {
            return Ok(());
        };
        // Ask for the body only now that it will be read, and if it has not started arriving.
        if req
            .header("expect")
            .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
            && self.buf.is_empty()
            && req.minor_version == 1
        {
            (&*self.stream)
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .map_err(|_| ReadError::Io)?;
        }
        self.body_clock = (Instant::now(), self.buf.len() as u64);
        let body = match framing {
            Framing::None => Ok(Vec::new()),
            Framing::Length(n) => self.read_exact_body(n, limits),
            Framing::Chunked => self.read_chunked_body(limits),
        };
        match body {
            Ok(body) => {
                req.body = body;
                self.finish_request();
                Ok(())
            }
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    /// A request was read whole.
    fn finish_request(&mut self) {
        self.served += 1;
        if self.buf.is_empty() {
            // The answer may stream for minutes: hold no read buffer meanwhile.
            self.buf = Vec::new();
        }
    }

    /// More body bytes: waits no longer than the body timeout, nor past the moment the body
    /// falls below the minimum rate (after its grace period, the bytes received so far buy
    /// `1 / body_min_rate` seconds each).
    fn need(&mut self, limits: &Limits) -> Result<(), ReadError> {
        let (started, received) = self.body_clock;
        let mut wait = limits.body_timeout;
        let mut rate_bound = false;
        if limits.body_min_rate > 0 {
            let earned = Duration::from_secs_f64(received as f64 / limits.body_min_rate as f64);
            let left = (started + limits.body_rate_grace + earned)
                .saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReadError::BodyTooSlow(limits.body_min_rate));
            }
            if left < wait {
                (wait, rate_bound) = (left, true);
            }
        }
        match self.fill(wait) {
            Ok(0) => Err(ReadError::Closed),
            Ok(n) => {
                self.body_clock.1 += n as u64;
                Ok(())
            }
            Err(e) if is_timeout(&e) && rate_bound => {
                Err(ReadError::BodyTooSlow(limits.body_min_rate))
            }
            Err(e) if is_timeout(&e) => Err(ReadError::BodyTimeout),
            Err(_) => Err(ReadError::Io),
        }
    }

    fn read_exact_body(&mut self, n: u64, limits: &Limits) -> Result<Vec<u8>, ReadError> {
        // n <= max_body, which fits in memory by configuration.
        let n = n as usize;
        let mut body = Vec::with_capacity(n.min(1024 * 1024));
        loop {
            let take = (n - body.len()).min(self.buf.len());
            body.extend_from_slice(&self.buf[..take]);
            self.buf.drain(..take);
            if body.len() == n {
                return Ok(body);
            }
            self.need(limits)?;
        }
    }

    /// One CRLF- (or LF-) terminated line, without its terminator.
    fn read_line(&mut self, limits: &Limits) -> Result<Vec<u8>, ReadError> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.buf.len() > 4096 {
                return Err(ReadError::Malformed("chunk header line too long"));
            }
            self.need(limits)?;
        }
    }

    fn read_chunked_body(&mut self, limits: &Limits) -> Result<Vec<u8>, ReadError> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line(limits)?;
            let size = parse_chunk_size(&line)?;
            if size == 0 {
                // Trailers: read and discard up to the blank line, within the head limit.
                let mut trailer_bytes = 0;
                loop {
                    let line = self.read_line(limits)?;
                    if line.is_empty() {
                        return Ok(body);
                    }
                    trailer_bytes += line.len();
                    if trailer_bytes > MAX_HEAD {
                        return Err(ReadError::HeadTooLarge);
                    }
                }
            }
            if body.len() as u64 + size > limits.max_body {
                return Err(ReadError::BodyTooLarge);
            }
            let chunk = self.read_exact_body(size, limits)?;
            body.extend_from_slice(&chunk);
            if !self.read_line(limits)?.is_empty() {
                return Err(ReadError::Malformed("chunk data longer than its size"));
            }
        }
    }

    /// Before closing after an error answer: stop sending, then read and discard what the client
    /// is still sending (bounded in time and bytes), so the close does not reset the connection
    /// and destroy the answer before the client reads it.
    pub fn linger(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut discarded = 0usize;
        let mut sink = [0u8; 8192];
        while discarded < 4 * 1024 * 1024 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stream.set_read_timeout(Some(left)).is_err() {
                break;
            }
            match (&*self.stream).read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
    }

    /// Whether a response to the request last read has started going out (a panic after that
    /// can only close the connection).
    pub fn responded(&self) -> bool {
        self.responded
    }

    /// Starts a response. `keep_alive` is what the request allows; the responder may still close.
    pub fn respond(&mut self, minor_version: u8, keep_alive: bool) -> Responder<'_> {
        Responder {
            conn: self,
            minor_version,
            keep_alive,
            request_id: None,
        }
    }
}

/// Parses a complete head from `buf`: `Ok(None)` if more bytes are needed.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Request, Framing, usize)>, ReadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ReadError::HeadTooLarge),
        Err(_) => return Err(ReadError::Malformed("invalid request head")),
    };
    if head_len > MAX_HEAD {
        return Err(ReadError::HeadTooLarge);
    }
    let method = req.method.unwrap_or_default().to_string();
    let target = req.path.unwrap_or_default().to_string();
    if !target.starts_with('/') {
        return Err(ReadError::Malformed("the request target must be a path"));
    }
    let minor_version = req.version.unwrap_or(1);
    let headers: Vec<(String, Vec<u8>)> = req
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect();

    let values = |name: &str| list_values(&headers, name);
    let codings = values("transfer-encoding");
    let lengths = values("content-length");
    let has_cl = headers.iter().any(|(n, _)| n == "content-length");
    let framing = if !codings.is_empty() {
        if has_cl {
            return Err(ReadError::Malformed(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        if minor_version == 0 {
            return Err(ReadError::Malformed(
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        if codings.iter().any(|c| c != "chunked") || codings.len() > 1 {
            return Err(ReadError::NotImplemented(
                "transfer codings other than a single chunked",
            ));
        }
        Framing::Chunked
    } else if has_cl {
        let mut parsed = lengths.iter().map(|v| {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // More digits than u64 holds is simply too large.
            Some(v.parse::<u64>().unwrap_or(u64::MAX))
        });
        let first = parsed.next().flatten();
        match first {
            Some(n) if parsed.all(|p| p == Some(n)) => Framing::Length(n),
            _ => {
                return Err(ReadError::Malformed(
                    "invalid or conflicting Content-Length",
                ));
            }
        }
    } else {
        Framing::None
    };

    let connection = values("connection");
    let keep_alive = if minor_version == 0 {
        connection.iter().any(|c| c == "keep-alive")
    } else {
        !connection.iter().any(|c| c == "close")
    };
    Ok(Some((
        Request {
            method,
            target,
            minor_version,
            headers,
            body: Vec::new(),
            keep_alive,
        },
        framing,
        head_len,
    )))
}

/// The comma-separated values of every `name` header, trimmed and lowercased.
pub fn list_values(headers: &[(String, Vec<u8>)], name: &str) -> Vec<String> {
    headers
        .iter()
        .filter(|(n, _)| n == name)
        .flat_map(|(_, v)| v.split(|&b| b == b','))
        .map(|v| String::from_utf8_lossy(v).trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
        .collect()
}

pub fn parse_chunk_size(line: &[u8]) -> Result<u64, ReadError> {
    let digits = line.split(|&b| b == b';').next().unwrap_or(&[]);
    let digits = String::from_utf8_lossy(digits);
    let digits = digits.trim();
    if digits.is_empty() || digits.len() > 15 {
        return Err(ReadError::Malformed("invalid chunk size"));
    }
    u64::from_str_radix(digits, 16).map_err(|_| ReadError::Malformed("invalid chunk size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<(Request, Framing, usize)>, ReadError> {
        parse_head(text.as_bytes())
    }

    #[test]
    fn parses_a_simple_request() {
        let text = "POST /v1/messages?beta=true HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nX-Api-Key: k\r\n\r\nhello";
        let (req, framing, len) = head(text).expect("valid").expect("complete");
        assert_eq!(req.method, "POST");
        assert_eq!(req.path(), "/v1/messages");
        assert_eq!(req.target, "/v1/messages?beta=true");
        assert_eq!(req.header("x-api-key"), Some("k"));
        assert!(req.keep_alive);
        assert!(matches!(framing, Framing::Length(5)));
        assert_eq!(len, text.len() - "hello".len());
    }

    #[test]
    fn partial_heads_ask_for_more() {
        assert!(matches!(head("GET / HTTP/1.1\r\nHost:"), Ok(None)));
    }

    #[test]
    fn smuggling_shapes_are_rejected() {
        let both = "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(head(both), Err(ReadError::Malformed(_))));
        let conflicting = "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
        assert!(matches!(head(conflicting), Err(ReadError::Malformed(_))));
        let list = "POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\n";
        assert!(matches!(head(list), Err(ReadError::Malformed(_))));
        let signed = "POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n";
        assert!(matches!(head(signed), Err(ReadError::Malformed(_))));
        let gzip = "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert!(matches!(head(gzip), Err(ReadError::NotImplemented(_))));
        let old = "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(head(old), Err(ReadError::Malformed(_))));
    }

    #[test]
    fn equal_duplicate_lengths_and_huge_lengths_parse() {
        let dup = "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n";
        assert!(matches!(head(dup), Ok(Some((_, Framing::Length(3), _)))));
        let huge = "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n";
        assert!(matches!(
            head(huge),
            Ok(Some((_, Framing::Length(u64::MAX), _)))
        ));
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_header() {
        let close = head("GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(!close.expect("ok").expect("complete").0.keep_alive);
        let old = head("GET / HTTP/1.0\r\n\r\n");
        assert!(!old.expect("ok").expect("complete").0.keep_alive);
        let old_ka = head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(old_ka.expect("ok").expect("complete").0.keep_alive);
    }

    #[test]
    fn absolute_targets_and_garbage_are_malformed() {
        assert!(matches!(
            head("GET http://x/ HTTP/1.1\r\n\r\n"),
            Err(ReadError::Malformed(_))
        ));
        assert!(matches!(
            head("\x01\x02 nonsense\r\n\r\n"),
            Err(ReadError::Malformed(_))
        ));
    }

    #[test]
    fn chunk_sizes_parse_strictly() {
        assert_eq!(parse_chunk_size(b"1a").ok(), Some(26));
        assert_eq!(parse_chunk_size(b"1A;ext=1").ok(), Some(26));
        assert!(parse_chunk_size(b"").is_err());
        assert!(parse_chunk_size(b"zz").is_err());
        assert!(parse_chunk_size(b"ffffffffffffffffff").is_err());
    }
}
