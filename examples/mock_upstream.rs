//! A fast stand-in for Anthropic's API, for `make bench` (bench/run.sh): plain HTTP/1.1 on
//! loopback, one thread per connection (small stacks, so 1000+ concurrent streams fit), keep-alive.
//!
//! - `POST /v1/messages` with `"stream": true`: a chunked SSE stream, one event per chunk, each
//!   written at once: `message_start`, `content_block_start`, N `content_block_delta` text
//!   events, `content_block_stop`, `message_delta` with usage, `message_stop`. Every delta's
//!   text is `t=<Unix nanoseconds when it was written> `, so a client (examples/ssebench.rs) can
//!   compute each event's delay, in Anthropic's format or after conversion to OpenAI chunks.
//!   N and the spacing come from the `x-mock-events` and `x-mock-interval-ms` request headers
//!   (default 40 and 100); the first delta leaves one interval after `message_start`.
//! - `POST /v1/messages` otherwise: a small JSON message with usage.
//! - `POST /v1/messages/count_tokens`, `GET /v1/models`, and `POST …/oauth/token` (a token
//!   grant for any code or refresh token, so the OAuth login flow can run against it).
//!
//! Credentials are ignored. Usage: `mock_upstream [ADDR]` (default `127.0.0.1:0`) prints
//! `listening on ADDR` once bound; `mock_upstream --free-port` prints a free loopback port.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Per connection: request parsing and formatting only, no deep recursion.
const STACK: usize = 64 * 1024;
const DEFAULT_EVENTS: u64 = 40;
const DEFAULT_INTERVAL_MS: u64 = 100;
/// Request bodies larger than this are refused (a benchmark never sends them).
const MAX_BODY: usize = 1 << 20;

const MESSAGE: &str = r#"{"id":"msg_mock","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"Hello from the mock upstream."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,"output_tokens":8,"cache_creation_input_tokens":0,"cache_read_input_tokens":0}}"#;
const MODELS: &str = r#"{"data":[{"type":"model","id":"claude-sonnet-4-5","display_name":"Claude Sonnet 4.5","created_at":"2025-09-29T00:00:00Z"}],"has_more":false,"first_id":"claude-sonnet-4-5","last_id":"claude-sonnet-4-5"}"#;
const COUNT: &str = r#"{"input_tokens":12}"#;
const NOT_FOUND: &str =
    r#"{"type":"error","error":{"type":"not_found_error","message":"mock: no such route"}}"#;

static TOKENS: AtomicU64 = AtomicU64::new(0);

fn main() {
    let arg = std::env::args().nth(1);
    if arg.as_deref() == Some("--free-port") {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        println!("{}", l.local_addr().expect("local address").port());
        return;
    }
    let addr = arg.unwrap_or_else(|| "127.0.0.1:0".into());
    let addr = if addr.contains(':') {
        addr
    } else {
        format!("127.0.0.1:{addr}")
    };
    let listener = match TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("mock_upstream: cannot bind {addr}: {e}");
            std::process::exit(1);
        }
    };
    deepen_backlog(&listener);
    println!(
        "listening on {}",
        listener.local_addr().expect("local address")
    );
    for conn in listener.incoming() {
        let Ok(stream) = conn else {
            // EMFILE and friends: wait a little rather than spin.
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        let spawned = thread::Builder::new()
            .stack_size(STACK)
            .spawn(move || serve(stream));
        if let Err(e) = spawned {
            eprintln!("mock_upstream: cannot start a thread: {e}");
        }
    }
}

/// One request head, as much as the mock needs of it.
struct Head {
    method: String,
    path: String,
    length: usize,
    chunked: bool,
    close: bool,
    events: u64,
    interval_ms: u64,
}

fn serve(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut out = write_half;
    let mut reader = BufReader::with_capacity(16 * 1024, stream);
    let mut body = Vec::new();
    loop {
        let head = match read_head(&mut reader) {
            Ok(Some(h)) => h,
            _ => return,
        };
        body.clear();
        let read = if head.chunked {
            read_chunked(&mut reader, &mut body)
        } else if head.length > MAX_BODY {
            Err(io::Error::other("body too large"))
        } else {
            body.resize(head.length, 0);
            reader.read_exact(&mut body)
        };
        if read.is_err() {
            return;
        }
        if answer(&mut out, &head, &body).is_err() || head.close {
            return;
        }
    }
}

/// Reads one request head; `None` when the peer closed between requests.
fn read_head(reader: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut line = String::new();
    // Tolerate stray empty lines between requests.
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if !line.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default().to_string();
    let mut head = Head {
        method,
        path,
        length: 0,
        chunked: false,
        close: line.contains("HTTP/1.0"),
        events: DEFAULT_EVENTS,
        interval_ms: DEFAULT_INTERVAL_MS,
    };
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            return Ok(Some(head));
        }
        let Some((name, value)) = l.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => head.length = value.parse().unwrap_or(0),
            "transfer-encoding" => head.chunked = value.eq_ignore_ascii_case("chunked"),
            "connection" => head.close = value.eq_ignore_ascii_case("close"),
            "x-mock-events" => head.events = value.parse().unwrap_or(DEFAULT_EVENTS),
            "x-mock-interval-ms" => head.interval_ms = value.parse().unwrap_or(DEFAULT_INTERVAL_MS),
            _ => {}
        }
    }
}

fn read_chunked(reader: &mut impl BufRead, body: &mut Vec<u8>) -> io::Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let size = line.trim().split(';').next().unwrap_or_default();
        let size = usize::from_str_radix(size, 16).map_err(io::Error::other)?;
        if size == 0 {
            // Trailers, if any, end with an empty line.
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                    return Ok(());
                }
            }
        }
        if body.len() + size > MAX_BODY {
            return Err(io::Error::other("body too large"));
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        line.clear();
        reader.read_line(&mut line)?;
    }
}

fn answer(out: &mut TcpStream, head: &Head, body: &[u8]) -> io::Result<()> {
    match (head.method.as_str(), head.path.as_str()) {
        ("POST", "/v1/messages") if wants_stream(body) => stream(out, head),
        ("POST", "/v1/messages") => json(out, 200, MESSAGE),
        ("POST", "/v1/messages/count_tokens") => json(out, 200, COUNT),
        ("GET", "/v1/models") => json(out, 200, MODELS),
        ("POST", p) if p.ends_with("/oauth/token") => {
            let n = TOKENS.fetch_add(1, Ordering::Relaxed);
            let grant = format!(
                r#"{{"access_token":"mock-access-{n}","refresh_token":"mock-refresh-{n}","expires_in":86400,"scope":"user:inference","organization":{{"uuid":"org-mock","name":"Mock Org"}},"account":{{"uuid":"acct-mock","email_address":"bench@example.com"}}}}"#
            );
            json(out, 200, &grant)
        }
        _ => json(out, 404, NOT_FOUND),
    }
}

/// Whether the JSON body has `"stream": true` (any spacing), without parsing it all.
fn wants_stream(body: &[u8]) -> bool {
    let key = b"\"stream\"";
    let mut rest = body;
    while let Some(at) = rest.windows(key.len()).position(|w| w == key) {
        let after = &rest[at + key.len()..];
        let value = after.trim_ascii_start();
        if let Some(value) = value.strip_prefix(b":") {
            return value.trim_ascii_start().starts_with(b"true");
        }
        rest = after;
    }
    false
}

fn json(out: &mut TcpStream, status: u16, body: &str) -> io::Result<()> {
    let reason = if status == 200 { "OK" } else { "Not Found" };
    let mut buf = Vec::with_capacity(body.len() + 160);
    write!(
        buf,
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nrequest-id: req_mock\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )?;
    buf.extend_from_slice(body.as_bytes());
    out.write_all(&buf)
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Writes one SSE event as one HTTP chunk, in one write (TCP_NODELAY sends it at once).
fn event(out: &mut TcpStream, buf: &mut Vec<u8>, name: &str, data: &str) -> io::Result<()> {
    let len = "event: ".len() + name.len() + "\ndata: ".len() + data.len() + "\n\n".len();
    buf.clear();
    write!(buf, "{len:x}\r\nevent: {name}\ndata: {data}\n\n\r\n")?;
    out.write_all(buf)
}

fn stream(out: &mut TcpStream, head: &Head) -> io::Result<()> {
    out.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\nrequest-id: req_mock\r\ntransfer-encoding: chunked\r\n\r\n",
    )?;
    let mut buf = Vec::with_capacity(512);
    event(
        out,
        &mut buf,
        "message_start",
        r#"{"type":"message_start","message":{"id":"msg_mock","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":12,"output_tokens":1,"cache_creation_input_tokens":0,"cache_read_input_tokens":0}}}"#,
    )?;
    event(
        out,
        &mut buf,
        "content_block_start",
        r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
    )?;
    // An absolute schedule: a late wake-up does not push every later event back.
    let start = Instant::now();
    let interval = Duration::from_millis(head.interval_ms);
    for k in 1..=head.events {
        let due = start + interval * k as u32;
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        let data = format!(
            r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":"t={} "}}}}"#,
            now_nanos()
        );
        event(out, &mut buf, "content_block_delta", &data)?;
    }
    event(
        out,
        &mut buf,
        "content_block_stop",
        r#"{"type":"content_block_stop","index":0}"#,
    )?;
    let delta = format!(
        r#"{{"type":"message_delta","delta":{{"stop_reason":"end_turn","stop_sequence":null}},"usage":{{"output_tokens":{}}}}}"#,
        head.events.max(1)
    );
    event(out, &mut buf, "message_delta", &delta)?;
    event(out, &mut buf, "message_stop", r#"{"type":"message_stop"}"#)?;
    out.write_all(b"0\r\n\r\n")
}

/// std listens with a backlog of 128; a thousand streams opening within 100 ms overflow it and
/// the dropped SYNs come back a second later, which would be measured as the proxy's fault.
/// Listening again on a listening socket only changes its backlog (as the gateway does).
fn deepen_backlog(listener: &TcpListener) {
    use std::os::fd::AsRawFd;
    unsafe extern "C" {
        fn listen(fd: i32, backlog: i32) -> i32;
    }
    // SAFETY: a valid listening socket for the borrow's duration; listen() reads no memory.
    unsafe {
        listen(listener.as_raw_fd(), 4096);
    }
}
