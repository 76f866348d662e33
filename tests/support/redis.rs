//! A real `redis-server` for the shared-state tests: started on an ephemeral port in a temp
//! dir, with no persistence, stopped and restarted on the same port to play an outage, and
//! killed on drop.
//!
//! The test talks RESP to it over a plain `TcpStream` (`command`), so no Redis client crate is
//! needed to look at what the gateways stored. With TLS (`with_tls`) the server listens on a
//! second port for `rediss://`, with the certificate in `tests/data/tls/redis/` (a test CA,
//! `ca.pem`, and a server certificate for 127.0.0.1 it signed), while the plain port stays
//! for the test. Readiness is a PING answered, polled against a
//! deadline; nothing waits by sleeping a guessed time.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::TempDir;

/// How long a started `redis-server` may take to answer PING.
const READY_LIMIT: Duration = Duration::from_secs(10);

/// How many ephemeral ports are tried before giving up (another process may grab the one we
/// picked between dropping our listener and redis binding it).
const PORT_ATTEMPTS: usize = 5;

/// A `redis-server` child process on 127.0.0.1, killed on drop.
pub struct RedisServer {
    port: u16,
    dir: TempDir,
    child: Option<Child>,
    /// `requirepass`, if set; `command` authenticates with it.
    password: Option<String>,
    /// The TLS port, when started `with_tls`.
    tls_port: Option<u16>,
}

/// The directory of the TLS fixtures for Redis.
pub fn tls_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tls/redis")
}

/// One RESP reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<String>),
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The reply as text: strings as they are, integers in decimal, nil as `(nil)`, arrays one
    /// element per line. An error reply fails the test.
    pub fn text(&self) -> String {
        match self {
            Resp::Simple(s) | Resp::Bulk(Some(s)) => s.clone(),
            Resp::Integer(n) => n.to_string(),
            Resp::Bulk(None) | Resp::Array(None) => "(nil)".to_string(),
            Resp::Array(Some(items)) => items.iter().map(Resp::text).collect::<Vec<_>>().join("\n"),
            Resp::Error(e) => panic!("redis answered an error: {e}"),
        }
    }
}

/// Where `redis-server` is on PATH; a clear failure when it is not installed.
fn redis_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("redis-server"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "redis-server is not on PATH: the shared-state tests need it. Run `make test`, \
                 which installs it (apt-get install redis-server)."
            )
        })
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a throwaway port");
    let port = listener.local_addr().expect("local addr").port();
    drop(listener);
    port
}

impl RedisServer {
    /// Starts a fresh server on an ephemeral port and waits until it answers PING.
    pub fn start() -> RedisServer {
        RedisServer::start_with(None, false)
    }

    /// A server that requires this password (`requirepass`).
    pub fn with_password(password: &str) -> RedisServer {
        RedisServer::start_with(Some(password.to_string()), false)
    }

    /// A server that also serves TLS (`tls_url`), with the fixtures' certificate.
    pub fn with_tls() -> RedisServer {
        RedisServer::start_with(None, true)
    }

    fn start_with(password: Option<String>, tls: bool) -> RedisServer {
        let dir = TempDir::new();
        let mut server = RedisServer {
            port: 0,
            dir,
            child: None,
            password,
            tls_port: None,
        };
        let mut failures = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            server.port = free_port();
            server.tls_port = tls.then(free_port);
            match server.launch() {
                Ok(()) => return server,
                Err(why) => failures.push(format!("port {}: {why}", server.port)),
            }
        }
        panic!(
            "redis-server did not come up after {PORT_ATTEMPTS} ports:\n{}",
            failures.join("\n")
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:PORT/0`, for `state.redis_url`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// `rediss://127.0.0.1:TLS_PORT/0`, for a server started `with_tls`.
    pub fn tls_url(&self) -> String {
        let port = self.tls_port.expect("redis-server started without TLS");
        format!("rediss://127.0.0.1:{port}/0")
    }

    /// Kills the server (an outage, not a clean shutdown) and waits for it to be gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty (nothing is persisted), and waits until
    /// it answers PING. The port was ours a moment ago; should the kernel not have let go of
    /// it yet, the start is tried again until the deadline.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server is still running");
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            match self.launch() {
                Ok(()) => return,
                Err(why) => assert!(
                    Instant::now() < deadline,
                    "redis-server did not restart on port {}: {why}",
                    self.port
                ),
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// One `redis-server` on `self.port`; Ok once it answers PING, Err (and no child) if it
    /// exits or stays silent.
    fn launch(&mut self) -> Result<(), String> {
        let log = self.dir.path().join("redis.log");
        let mut cmd = Command::new(redis_binary());
        if let Some(password) = &self.password {
            cmd.args(["--requirepass", password]);
        }
        if let Some(port) = self.tls_port {
            let tls = tls_dir();
            cmd.arg("--tls-port")
                .arg(port.to_string())
                .arg("--tls-cert-file")
                .arg(tls.join("server.pem"))
                .arg("--tls-key-file")
                .arg(tls.join("server-key.pem"))
                .arg("--tls-ca-cert-file")
                .arg(tls.join("ca.pem"))
                .args(["--tls-auth-clients", "no"]);
        }
        let mut child = cmd
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            // DEBUG SLEEP lets a test stall the server without losing its data.
            .args(["--enable-debug-command", "local"])
            .args(["--daemonize", "no", "--dir"])
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn redis-server: {e}"))?;
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("exited with {status}; log:\n{}", self.log()));
            }
            if self.ping() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "no PONG within {READY_LIMIT:?}; log:\n{}",
                    self.log()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// Whether the server answers PING right now.
    pub fn ping(&self) -> bool {
        matches!(self.try_query(&["PING"]), Ok(Resp::Simple(s)) if s == "PONG")
    }

    /// Sends one command and returns its reply as text (see `Resp::text`); fails the test if
    /// the server cannot be reached or answers an error.
    pub fn command(&self, args: &[&str]) -> String {
        self.query(args).text()
    }

    /// Sends one command and returns its reply; fails the test if the server cannot be reached.
    pub fn query(&self, args: &[&str]) -> Resp {
        self.try_query(args)
            .unwrap_or_else(|e| panic!("redis {args:?} on port {}: {e}", self.port))
    }

    /// The keys matching `pattern` (KEYS: fine for a test server holding a few keys), sorted.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys: Vec<String> = match self.query(&["KEYS", pattern]) {
            Resp::Array(Some(items)) => items.iter().map(Resp::text).collect(),
            other => panic!("KEYS {pattern}: not an array: {other:?}"),
        };
        keys.sort();
        keys
    }

    fn try_query(&self, args: &[&str]) -> std::io::Result<Resp> {
        let mut stream = TcpStream::connect_timeout(&self.addr(), Duration::from_secs(1))?;
        // Long enough for a `DEBUG SLEEP` to answer.
        stream.set_read_timeout(Some(Duration::from_secs(15)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        if let Some(password) = &self.password {
            stream.write_all(&encode(&["AUTH", password]))?;
            match read_resp(&mut reader)? {
                Resp::Simple(ok) if ok == "OK" => {}
                other => return Err(bad(format!("AUTH answered {other:?}"))),
            }
        }
        stream.write_all(&encode(args))?;
        read_resp(&mut reader)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A command as a RESP array of bulk strings.
fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
    out
}

fn bad(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

/// Reads one RESP2 value.
fn read_resp(reader: &mut impl BufRead) -> std::io::Result<Resp> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(bad("connection closed before a reply".into()));
    }
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at(line.len().min(1));
    let number = || {
        rest.parse::<i64>()
            .map_err(|_| bad(format!("bad number in {line:?}")))
    };
    Ok(match kind {
        "+" => Resp::Simple(rest.to_string()),
        "-" => Resp::Error(rest.to_string()),
        ":" => Resp::Integer(number()?),
        "$" => match number()? {
            n if n < 0 => Resp::Bulk(None),
            n => {
                let mut buf = vec![0u8; n as usize + 2];
                reader.read_exact(&mut buf)?;
                buf.truncate(n as usize);
                Resp::Bulk(Some(String::from_utf8_lossy(&buf).into_owned()))
            }
        },
        "*" => match number()? {
            n if n < 0 => Resp::Array(None),
            n => Resp::Array(Some(
                (0..n)
                    .map(|_| read_resp(reader))
                    .collect::<std::io::Result<_>>()?,
            )),
        },
        _ => return Err(bad(format!("not a RESP reply: {line:?}"))),
    })
}

#[test]
fn the_redis_harness_starts_answers_stops_and_restarts_on_its_port() {
    let mut redis = RedisServer::start();
    assert!(redis.url().starts_with("redis://127.0.0.1:"));
    assert_eq!(redis.command(&["SET", "harness:k", "v 1"]), "OK");
    assert_eq!(redis.command(&["GET", "harness:k"]), "v 1");
    assert_eq!(redis.command(&["HSET", "harness:h", "f", "x"]), "1");
    assert_eq!(redis.command(&["HGET", "harness:h", "nope"]), "(nil)");
    assert_eq!(redis.keys("harness:*"), ["harness:h", "harness:k"]);
    let port = redis.port();
    redis.stop();
    assert!(!redis.ping(), "stopped redis still answers");
    redis.restart();
    assert_eq!(redis.port(), port, "restarted on the same port");
    assert!(redis.keys("harness:*").is_empty(), "nothing persisted");
    assert_eq!(redis.command(&["PING"]), "PONG");
}
