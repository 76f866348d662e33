//! Test harness: temp dirs, the `llm-gateway` binary under test, a scripted fake upstream and a raw HTTP/1.1 client.
//!
//! Everything here talks plain bytes over `std::net` so tests keep byte-level
//! control and can observe timing. Waits are blocking reads or channel
//! receives with a timeout; a timeout only ever fails the test, it never
//! paces it.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// The binary under test, built by cargo for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_llm-gateway");

/// How long any single blocking step (a read, a channel receive) may take before the test fails.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one CLI invocation may run before it is killed and the test fails.
const CLI_TIMEOUT: Duration = Duration::from_secs(20);

/// The upstream (Anthropic) API key of the account that `Gateway::started` registers.
pub const ACCOUNT_KEY: &str = "sk-ant-api03-FAKEaccountKEYforTESTSonly-Zq7x";

/// A minimal, valid `POST /v1/messages` body.
pub const MESSAGE_BODY: &str =
    r#"{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#;

/// A base URL nothing listens on: any connection attempt is refused, nothing leaves the host.
pub fn refused_base_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a throwaway port");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    format!("http://{addr}")
}

/// The mask the gateway shows for an upstream key: `sk-ant-…` and the last four characters.
pub fn masked(key: &str) -> String {
    format!("sk-ant-…{}", &key[key.len() - 4..])
}

/// Standard base64 with padding, for building `LLM_GATEWAY_SECRET_KEY` values.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Panics with the command's output unless it exited with `code`.
pub fn assert_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: expected exit code {code}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

/// Runs a prepared command to completion, feeding `stdin` if given, and kills it if it outlives `CLI_TIMEOUT`.
pub fn run(mut cmd: Command, stdin: Option<&[u8]>) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn llm-gateway");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin pipe");
        let input = input.to_vec();
        // A writer thread, so a child that never reads stdin cannot block the test.
        thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let stdout = drain(child.stdout.take().expect("stdout pipe"));
    let stderr = drain(child.stderr.take().expect("stderr pipe"));
    let stdout = match stdout.recv_timeout(CLI_TIMEOUT) {
        Ok(bytes) => bytes,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {CLI_TIMEOUT:?}");
        }
    };
    let stderr = stderr
        .recv_timeout(CLI_TIMEOUT)
        .expect("stderr closes with stdout");
    let status = child.wait().expect("wait for llm-gateway");
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Reads a pipe to its end on a thread and hands the bytes over a channel.
fn drain<R: Read + Send + 'static>(mut pipe: R) -> Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "llm-gateway-test-{}-{n}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The test `config.yaml`, with the few knobs tests turn.
pub struct Config {
    base_url: String,
    read_timeout: String,
}

impl Config {
    pub fn new(base_url: impl Into<String>) -> Config {
        Config {
            base_url: base_url.into(),
            read_timeout: "3s".to_string(),
        }
    }

    pub fn read_timeout(mut self, value: &str) -> Config {
        self.read_timeout = value.to_string();
        self
    }

    pub fn yaml(&self) -> String {
        format!(
            "server:\n  listen: 127.0.0.1:0\n  workers: 32\n  max_body_bytes: 1048576\n  \
             header_timeout: 2s\n  body_timeout: 2s\n  keepalive_timeout: 5s\n\
             upstream:\n  base_url: {}\n  connect_timeout: 2s\n  read_timeout: {}\n",
            self.base_url, self.read_timeout
        )
    }
}

/// The gateway under test: its own temp dir and config, CLI runs against it, and at most one server process.
pub struct Gateway {
    dir: TempDir,
    client_key: Option<String>,
    server: Option<Server>,
}

struct Server {
    child: Child,
    addr: SocketAddr,
    /// Everything the server wrote to stderr so far, drained by a thread so the pipe never fills.
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Gateway {
    pub fn new(config: &Config) -> Gateway {
        Gateway::with_yaml(&config.yaml())
    }

    pub fn with_yaml(yaml: &str) -> Gateway {
        let dir = TempDir::new();
        std::fs::write(dir.path().join("config.yaml"), yaml).expect("write config.yaml");
        Gateway {
            dir,
            client_key: None,
            server: None,
        }
    }

    /// A running gateway with one API-key account (`ACCOUNT_KEY`) and one client key.
    pub fn started(config: &Config) -> Gateway {
        let mut gw = Gateway::new(config);
        gw.add_api_key("primary", ACCOUNT_KEY);
        gw.add_client_key("tests");
        gw.start();
        gw
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }

    pub fn config_text(&self) -> String {
        std::fs::read_to_string(self.config_path()).expect("read config.yaml")
    }

    /// The binary with a clean environment and the temp dir as working directory; no `--config` yet.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.env_remove("LLM_GATEWAY_SECRET_KEY")
            .env_remove("LLM_GATEWAY_CONFIG")
            .current_dir(self.dir.path());
        cmd
    }

    /// `llm-gateway --config <this config> ARGS...`
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut cmd = self.command();
        cmd.arg("--config").arg(self.config_path()).args(args);
        cmd
    }

    pub fn run_cli(&self, args: &[&str]) -> Output {
        run(self.cli(args), None)
    }

    pub fn run_cli_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        run(self.cli(args), Some(stdin))
    }

    /// Adds an API-key account and returns its id.
    pub fn add_api_key(&self, name: &str, key: &str) -> String {
        let out = self.run_cli(&["add-api-key", "--name", name, "--key", key, "--json"]);
        assert_exit(&out, 0, "add-api-key");
        let v: Value = serde_json::from_slice(&out.stdout).expect("add-api-key --json prints JSON");
        v["id"]
            .as_str()
            .expect("add-api-key --json has an id")
            .to_string()
    }

    /// Adds a client key, remembers it for `client_key()`, and returns it.
    pub fn add_client_key(&mut self, name: &str) -> String {
        let out = self.run_cli(&["add-client-key", "--name", name, "--json"]);
        assert_exit(&out, 0, "add-client-key");
        let v: Value =
            serde_json::from_slice(&out.stdout).expect("add-client-key --json prints JSON");
        let key = v["key"]
            .as_str()
            .expect("add-client-key --json has a key")
            .to_string();
        self.client_key = Some(key.clone());
        key
    }

    pub fn client_key(&self) -> &str {
        self.client_key.as_deref().expect("no client key added")
    }

    pub fn start(&mut self) -> SocketAddr {
        self.start_with(&[])
    }

    /// Starts `server` with extra arguments and waits for its `listening on` line.
    pub fn start_with(&mut self, extra: &[&str]) -> SocketAddr {
        assert!(self.server.is_none(), "server already started");
        let mut cmd = self.cli(&["server"]);
        cmd.args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn llm-gateway server");
        let stdout = child.stdout.take().expect("stdout pipe");
        let mut stderr_pipe = child.stderr.take().expect("stderr pipe");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .expect("stderr lock")
                    .extend_from_slice(&buf[..n]);
            }
        });
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the server never blocks on a full stdout pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait();
                let err =
                    String::from_utf8_lossy(&stderr.lock().expect("stderr lock")).into_owned();
                panic!("server printed no `listening on` line (status {status:?}); stderr:\n{err}");
            }
        };
        let prefix = "llm-gateway listening on http://";
        let addr: SocketAddr = line
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("first stdout line should start with {prefix:?}: {line:?}"))
            .parse()
            .unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"));
        self.server = Some(Server {
            child,
            addr,
            stderr,
        });
        addr
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.as_ref().expect("server not started").addr
    }

    /// What the server has written to stderr so far.
    pub fn stderr(&self) -> String {
        let server = self.server.as_ref().expect("server not started");
        String::from_utf8_lossy(&server.stderr.lock().expect("stderr lock")).into_owned()
    }

    /// Headers that authenticate as this gateway's client key.
    pub fn auth(&self) -> (&'static str, &str) {
        ("x-api-key", self.client_key())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(server) = &mut self.server {
            let _ = server.child.kill();
            let _ = server.child.wait();
        }
    }
}

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
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
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
    /// A chunked SSE response whose connection is dropped after these events, with no terminating chunk.
    BreakMidStream { events: Vec<String> },
    /// Reads the request and never answers; the connection stays open until the gateway closes it.
    Hang,
}

impl Reply {
    pub fn json(status: u16, body: &str) -> Reply {
        Reply::Json {
            status,
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
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
        };
        shared
            .requests
            .lock()
            .expect("requests lock")
            .push(req.clone());
        let reply = (shared.handler.lock().expect("handler lock"))(&req);
        let keep_going = match reply {
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
                let ok = write_sse(&mut out, shared, &events, gate.as_ref(), chunked);
                if chunked {
                    ok && out.write_all(b"0\r\n\r\n").is_ok()
                } else {
                    let _ = out.shutdown(Shutdown::Both);
                    false
                }
            }
            Reply::BreakMidStream { events } => {
                write_sse(&mut out, shared, &events, None, true);
                let _ = out.shutdown(Shutdown::Both);
                false
            }
            Reply::Hang => {
                let mut sink = [0u8; 1024];
                while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
                false
            }
        };
        if !keep_going || header(&req.headers, "connection") == Some("close") {
            return;
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
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        529 => "Overloaded",
        _ => "Status",
    }
}

/// Header names (lowercase) and values, in arrival order.
type Headers = Vec<(String, String)>;

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Reads one line without its CRLF; `None` at a clean end of stream.
fn read_line(r: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    if r.read_until(b'\n', &mut buf)? == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "line cut short",
        ));
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// Reads a start line and headers (names lowercased); `None` if the stream ends before any byte.
fn read_head(r: &mut impl BufRead) -> io::Result<Option<(String, Headers)>> {
    let Some(start) = read_line(r)? else {
        return Ok(None);
    };
    let mut headers = Vec::new();
    loop {
        let line = read_line(r)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "head cut short"))?;
        if line.is_empty() {
            return Ok(Some((start, headers)));
        }
        let (name, value) = line.split_once(':').unwrap_or((&line, ""));
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
}

/// Reads a message body as its headers frame it; `to_eof` allows a close-delimited body.
fn read_body(
    r: &mut impl BufRead,
    headers: &[(String, String)],
    to_eof: bool,
) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if header(headers, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        loop {
            let line = read_line(r)?.ok_or_else(|| {
                io::Error::new(io::ErrorKind::UnexpectedEof, "chunk size missing")
            })?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if size == 0 {
                while !read_line(r)?.unwrap_or_default().is_empty() {}
                return Ok(body);
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
        }
    } else if let Some(len) = header(headers, "content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad content-length"))?;
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else if to_eof {
        r.read_to_end(&mut body)?;
    }
    Ok(body)
}

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
    let mut head = format!("{method} {target} HTTP/1.1\r\nhost: gateway.test\r\n");
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

/// A raw client connection with a `STEP_TIMEOUT` read timeout.
pub struct Conn {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> Conn {
        let writer = TcpStream::connect(addr).expect("connect to gateway");
        writer
            .set_read_timeout(Some(STEP_TIMEOUT))
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

/// A realistic Anthropic event stream with `deltas` text deltas, ending in `message_stop`.
pub fn sse_events(deltas: usize) -> Vec<String> {
    let mut events = vec![
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01Stream\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\",\"stop_reason\":null,\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n".to_string(),
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n".to_string(),
        "event: ping\ndata: {\"type\": \"ping\"}\n\n".to_string(),
    ];
    for i in 0..deltas {
        events.push(format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"word{i} \"}}}}\n\n"
        ));
    }
    events.push(
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n"
            .to_string(),
    );
    events.push("event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":9}}\n\n".to_string());
    events.push("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".to_string());
    events
}
