//! The fake upstream: a scripted Anthropic stand-in on 127.0.0.1:0 that records every request.
//!
//! It is a plain `TcpListener` so a test decides every byte and every pause: SSE
//! events go out one chunk at a time, optionally waiting on a gate channel, and a
//! reply can be held at a `Meeting` until enough requests are in flight together.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::wire::{header, read_body, read_head};

/// One request as the fake upstream received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query, as sent on the request line.
    pub target: String,
    /// Lowercase names, values trimmed, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The body after removing any chunked framing.
    pub body: Vec<u8>,
    /// When the whole request had arrived.
    pub at: Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The `x-api-key` the gateway sent: which account it used. Empty when absent.
    pub fn api_key(&self) -> &str {
        self.header("x-api-key").unwrap_or_default()
    }

    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// How an SSE reply is delimited.
pub enum Framing {
    /// `transfer-encoding: chunked`, one chunk per event, then the terminating chunk.
    Chunked,
    /// No length at all: the body ends when the upstream closes the connection.
    CloseDelimited,
}

/// What the fake upstream answers to one request.
pub enum Reply {
    /// A complete response with `content-length`.
    Json {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// `text/event-stream`: each event written and flushed on its own; with a gate,
    /// the upstream waits for one message on it before writing each event after the first.
    Sse {
        events: Vec<String>,
        gate: Option<Receiver<()>>,
        framing: Framing,
    },
    /// A JSON body sent chunked (in pieces of `piece` bytes) or close-delimited, not with a
    /// `content-length`.
    Framed {
        status: u16,
        body: Vec<u8>,
        framing: Framing,
        piece: usize,
    },
    /// A chunked SSE response whose connection is dropped after these events, with no terminating chunk.
    BreakMidStream { events: Vec<String> },
    /// Reads the request and never answers; the connection stays open until the gateway closes it.
    Hang,
    /// Waits at the meeting (outside the handler lock, so other connections keep flowing),
    /// then answers with the inner reply.
    Held {
        meeting: Arc<Meeting>,
        then: Box<Reply>,
    },
    /// A chunked SSE response that sends these events and then goes silent without ending,
    /// reading the connection until the gateway closes it (or 30 s pass); the moment it saw
    /// the close is in `FakeUpstream::closed_times`.
    Stall { events: Vec<String> },
}

impl Reply {
    pub fn json(status: u16, body: &str) -> Reply {
        Reply::Json {
            status,
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
        }
    }

    /// A complete JSON response with extra headers.
    pub fn json_with(status: u16, headers: &[(&str, &str)], body: &str) -> Reply {
        Reply::Json {
            status,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: body.as_bytes().to_vec(),
        }
    }
}

/// A meeting point for held replies: each one waits until `expected` requests have arrived,
/// so they are provably in flight at the same time. A meeting that never fills opens at its
/// deadline instead (`arrived()` then shows the shortfall), so a test fails rather than hangs.
pub struct Meeting {
    expected: usize,
    limit: Duration,
    arrived: Mutex<usize>,
    full: Condvar,
}

impl Meeting {
    pub fn new(expected: usize, limit: Duration) -> Arc<Meeting> {
        Arc::new(Meeting {
            expected,
            limit,
            arrived: Mutex::new(0),
            full: Condvar::new(),
        })
    }

    /// How many requests have arrived so far.
    pub fn arrived(&self) -> usize {
        *self.arrived.lock().expect("meeting lock")
    }

    /// Counts one arrival and waits for the rest, or for the deadline.
    fn attend(&self) {
        let deadline = Instant::now() + self.limit;
        let mut arrived = self.arrived.lock().expect("meeting lock");
        *arrived += 1;
        if *arrived >= self.expected {
            self.full.notify_all();
            return;
        }
        while *arrived < self.expected {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            arrived = self
                .full
                .wait_timeout(arrived, left)
                .expect("meeting lock")
                .0;
        }
    }
}

type Handler = Box<dyn FnMut(&Recorded) -> Reply + Send>;

/// An HTTP/1.1 server on 127.0.0.1:0 that records every request and answers from a per-test script.
pub struct FakeUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    requests: Mutex<Vec<Recorded>>,
    /// When each SSE event was handed to the socket, in order, across all responses.
    sse_writes: Mutex<Vec<Instant>>,
    handler: Mutex<Handler>,
    stop: AtomicBool,
    /// When each `Reply::Stall` connection saw the gateway close it.
    closed: Mutex<Vec<Instant>>,
}

impl FakeUpstream {
    pub fn start(handler: impl FnMut(&Recorded) -> Reply + Send + 'static) -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake upstream");
        let addr = listener.local_addr().expect("fake upstream addr");
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            sse_writes: Mutex::new(Vec::new()),
            handler: Mutex::new(Box::new(handler)),
            stop: AtomicBool::new(false),
            closed: Mutex::new(Vec::new()),
        });
        let accept_shared = Arc::clone(&shared);
        thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let conn_shared = Arc::clone(&accept_shared);
                thread::spawn(move || serve_connection(stream, &conn_shared));
            }
        });
        FakeUpstream { addr, shared }
    }

    /// An upstream that holds every request at a meeting until `expected` are in flight
    /// together (or `limit` has passed), then answers it with `then`; and the meeting, to
    /// check how many came.
    pub fn meeting(
        expected: usize,
        limit: Duration,
        mut then: impl FnMut(&Recorded) -> Reply + Send + 'static,
    ) -> (FakeUpstream, Arc<Meeting>) {
        let meeting = Meeting::new(expected, limit);
        let held = Arc::clone(&meeting);
        let up = FakeUpstream::start(move |req| Reply::Held {
            meeting: Arc::clone(&held),
            then: Box::new(then(req)),
        });
        (up, meeting)
    }

    /// An upstream whose first request gets a chunked stream of `events`, each after the
    /// first written only when the test sends on the returned gate; every later request gets
    /// `then`.
    pub fn gated_first(
        events: Vec<String>,
        mut then: impl FnMut(&Recorded) -> Reply + Send + 'static,
    ) -> (FakeUpstream, Sender<()>) {
        let (gate, gate_rx) = mpsc::channel::<()>();
        let mut gate_rx = Some(gate_rx);
        let up = FakeUpstream::start(move |req| match gate_rx.take() {
            Some(gate) => Reply::Sse {
                events: events.clone(),
                gate: Some(gate),
                framing: Framing::Chunked,
            },
            None => then(req),
        });
        (up, gate)
    }

    /// An upstream that answers every request with the same JSON.
    pub fn json(status: u16, body: &str) -> FakeUpstream {
        let body = body.to_string();
        FakeUpstream::start(move |_| Reply::json(status, &body))
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().expect("requests lock").clone()
    }

    /// The `x-api-key` of every request so far, in arrival order: which accounts were used.
    pub fn keys(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|r| r.api_key().to_string())
            .collect()
    }

    /// When each stalled stream (`Reply::Stall`) saw the gateway close its connection.
    pub fn closed_times(&self) -> Vec<Instant> {
        self.shared.closed.lock().expect("closed lock").clone()
    }

    pub fn sse_write_times(&self) -> Vec<Instant> {
        self.shared.sse_writes.lock().expect("sse lock").clone()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so its thread ends.
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve_connection(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut out = stream;
    loop {
        let Ok(Some((line, headers))) = read_head(&mut reader) else {
            return;
        };
        let mut parts = line.split(' ');
        let method = parts.next().unwrap_or_default().to_string();
        let target = parts.next().unwrap_or_default().to_string();
        if header(&headers, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
            && out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err()
        {
            return;
        }
        let Ok(body) = read_body(&mut reader, &headers, false) else {
            return;
        };
        let req = Recorded {
            method,
            target,
            headers,
            body,
            at: Instant::now(),
        };
        shared
            .requests
            .lock()
            .expect("requests lock")
            .push(req.clone());
        let reply = (shared.handler.lock().expect("handler lock"))(&req);
        let keep_going = write_reply(&mut out, &mut reader, shared, reply);
        if !keep_going || header(&req.headers, "connection") == Some("close") {
            return;
        }
    }
}

/// Writes one reply; returns whether the connection may serve another request.
fn write_reply(
    out: &mut TcpStream,
    reader: &mut impl BufRead,
    shared: &Shared,
    reply: Reply,
) -> bool {
    match reply {
        Reply::Json {
            status,
            headers,
            body,
        } => {
            let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
            if !headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
            {
                head.push_str("content-type: application/json\r\n");
            }
            for (n, v) in &headers {
                head.push_str(&format!("{n}: {v}\r\n"));
            }
            head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
            let mut bytes = head.into_bytes();
            bytes.extend_from_slice(&body);
            out.write_all(&bytes).and_then(|()| out.flush()).is_ok()
        }
        Reply::Sse {
            events,
            gate,
            framing,
        } => {
            let chunked = matches!(framing, Framing::Chunked);
            let ok = write_sse(out, shared, &events, gate.as_ref(), chunked);
            if chunked {
                ok && out.write_all(b"0\r\n\r\n").is_ok()
            } else {
                let _ = out.shutdown(Shutdown::Both);
                false
            }
        }
        Reply::Framed {
            status,
            body,
            framing,
            piece,
        } => {
            let chunked = matches!(framing, Framing::Chunked);
            let mut head = format!(
                "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\n",
                reason(status)
            );
            head.push_str(if chunked {
                "transfer-encoding: chunked\r\n\r\n"
            } else {
                "connection: close\r\n\r\n"
            });
            if out.write_all(head.as_bytes()).is_err() {
                return false;
            }
            for part in body.chunks(piece.max(1)) {
                let written = if chunked {
                    let mut chunk = format!("{:x}\r\n", part.len()).into_bytes();
                    chunk.extend_from_slice(part);
                    chunk.extend_from_slice(b"\r\n");
                    out.write_all(&chunk)
                } else {
                    out.write_all(part)
                };
                if written.and_then(|()| out.flush()).is_err() {
                    return false;
                }
            }
            if chunked {
                out.write_all(b"0\r\n\r\n").is_ok()
            } else {
                let _ = out.shutdown(Shutdown::Both);
                false
            }
        }
        Reply::BreakMidStream { events } => {
            write_sse(out, shared, &events, None, true);
            let _ = out.shutdown(Shutdown::Both);
            false
        }
        Reply::Hang => {
            let mut sink = [0u8; 1024];
            while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
            false
        }
        Reply::Stall { events } => {
            if write_sse(out, shared, &events, None, true) {
                let mut sink = [0u8; 1024];
                // EOF or a reset: the gateway let go. A timeout (30 s) is not a close.
                let closed = loop {
                    match reader.read(&mut sink) {
                        Ok(0) => break true,
                        Ok(_) => {}
                        Err(e) => {
                            break !matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            );
                        }
                    }
                };
                if closed {
                    shared
                        .closed
                        .lock()
                        .expect("closed lock")
                        .push(Instant::now());
                }
            }
            false
        }
        Reply::Held { meeting, then } => {
            // Whether the meeting filled is the test's to check (`Meeting::arrived`); the
            // reply goes out either way, so nothing hangs.
            meeting.attend();
            write_reply(out, reader, shared, *then)
        }
    }
}

/// Writes an SSE response head and its events; returns false if the socket failed or the gate was dropped.
fn write_sse(
    out: &mut TcpStream,
    shared: &Shared,
    events: &[String],
    gate: Option<&Receiver<()>>,
    chunked: bool,
) -> bool {
    let framing = if chunked {
        "transfer-encoding: chunked\r\n"
    } else {
        "connection: close\r\n"
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
         request-id: req_sse_stream\r\n{framing}\r\n"
    );
    if out
        .write_all(head.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        return false;
    }
    for (i, event) in events.iter().enumerate() {
        if i > 0
            && let Some(gate) = gate
            && gate.recv().is_err()
        {
            return false;
        }
        let mut bytes = Vec::new();
        if chunked {
            bytes.extend_from_slice(format!("{:x}\r\n", event.len()).as_bytes());
            bytes.extend_from_slice(event.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        } else {
            bytes.extend_from_slice(event.as_bytes());
        }
        // Stamped before the write, so it is recorded by the time anyone can have read the event.
        shared
            .sse_writes
            .lock()
            .expect("sse lock")
            .push(Instant::now());
        if out.write_all(&bytes).and_then(|()| out.flush()).is_err() {
            return false;
        }
    }
    true
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        529 => "Overloaded",
        _ => "Status",
    }
}
