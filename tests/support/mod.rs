//! Test harness: temp dirs, the `llm-gateway` binary under test, a scripted fake upstream and a raw HTTP/1.1 client.
//!
//! Everything here talks plain bytes over `std::net` so tests keep byte-level
//! control and can observe timing. Waits are blocking reads or channel
//! receives with a timeout; a timeout only ever fails the test, it never
//! paces it.
//!
//! This file holds the process side (temp dirs, CLI runs, the server children);
//! `upstream` is the fake upstream, `token` the fake OAuth token endpoint,
//! `client` the raw downstream client, `wire` the HTTP parsing they share,
//! `accounts` the helpers for tests with several upstream accounts, and `redis` a real
//! `redis-server` for the shared-state tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

pub mod accounts;
mod client;
pub mod egress;
mod raw;
pub mod redis;
mod token;
mod upstream;
mod wire;

pub use client::*;
pub use raw::*;
pub use token::*;
pub use upstream::*;

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

/// Base64url without padding (RFC 4648 §5), the encoding of PKCE verifiers and challenges
/// (the `base64` crate itself, not the gateway's wrapper of it).
pub fn base64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Seconds since the Unix epoch, as the gateway writes them in config.yaml and prints them.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// A rustls server configuration with the PEM certificate and key at these paths.
pub fn tls_server(cert: &str, key: &str) -> std::sync::Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let cert = CertificateDer::from_pem_file(cert).expect("test certificate");
    let key = PrivateKeyDer::from_pem_file(key).expect("test key");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .expect("server config"),
    )
}

/// Waits until `done` holds, checking every 50 ms, and fails the test after `limit`.
///
/// Only for things the server does on its own timer (the token refresher, the config
/// watcher): there is no event to wait on, so the condition is polled against a deadline.
pub fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// How long `ordinary` took, the slowest of `runs` runs: a baseline measured in the same run
/// (on the same machine, under the same load) for a time limit README states no number for.
pub fn baseline(runs: usize, mut ordinary: impl FnMut()) -> Duration {
    (0..runs)
        .map(|_| {
            let started = std::time::Instant::now();
            ordinary();
            started.elapsed()
        })
        .max()
        .unwrap_or_default()
}

/// The limit for something that should take about as long as an ordinary request: ten times
/// the `baseline`, plus half a second so a fast baseline does not turn a scheduler's hiccup
/// into a failure.
pub fn relative_limit(baseline: Duration) -> Duration {
    baseline * 10 + Duration::from_millis(500)
}

/// Runs `f(0..n)` on `n` threads released together, and returns the results in order.
pub fn in_parallel<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let barrier = Barrier::new(n);
    thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (barrier, f) = (&barrier, &f);
                s.spawn(move || {
                    barrier.wait();
                    f(i)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a thread of in_parallel"))
            .collect()
    })
}

/// The Python the SDK and metrics tests run.
pub const PYTHON: &str = "python3";

/// How to install the Python packages those tests import.
const PYTHON_INSTALL: &str = "pip install -r tests/sdk/requirements.txt";

/// Runs `code` in `PYTHON` and returns what it printed; fails, saying how to install what is
/// missing, unless it exits 0. `package` is what `code` imports, `test` the test that needs it.
pub fn require_python(code: &str, package: &str, test: &str) -> String {
    let probe = Command::new(PYTHON)
        .args(["-c", code])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{PYTHON} is needed for {test} ({e}); install Python 3, then run `{PYTHON_INSTALL}`"
            )
        });
    assert!(
        probe.status.success(),
        "the {package} Python package is not installed: run `{PYTHON_INSTALL}` (make test does)\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    String::from_utf8_lossy(&probe.stdout).into_owned()
}

/// The keys of a JSON object, sorted.
pub fn sorted_keys(v: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("not a JSON object: {v}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

/// Standard base64 with padding, for building `LLM_GATEWAY_SECRET_KEY` values.
pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
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

/// What a command printed: its stdout, then its stderr.
pub fn printed(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
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
    log_level: Option<String>,
    /// `oauth:` settings in order, values as YAML scalars.
    oauth: Vec<(String, String)>,
    workers: usize,
    header_timeout: String,
    body_timeout: String,
    /// More `server:` settings, values as YAML scalars.
    server: Vec<(String, String)>,
    admin_listen: String,
    /// Further `upstream:` keys.
    upstream: Vec<(String, String)>,
    sections: String,
}

impl Config {
    pub fn new(base_url: impl Into<String>) -> Config {
        Config {
            base_url: base_url.into(),
            read_timeout: "3s".to_string(),
            log_level: None,
            oauth: Vec::new(),
            workers: 32,
            header_timeout: "2s".to_string(),
            body_timeout: "2s".to_string(),
            server: Vec::new(),
            admin_listen: "off".to_string(),
            upstream: Vec::new(),
            sections: String::new(),
        }
    }

    pub fn read_timeout(mut self, value: &str) -> Config {
        self.read_timeout = value.to_string();
        self
    }

    pub fn workers(mut self, n: usize) -> Config {
        self.workers = n;
        self
    }

    /// `server.header_timeout` (2s here).
    pub fn header_timeout(mut self, value: &str) -> Config {
        self.header_timeout = value.to_string();
        self
    }

    /// `server.body_timeout` (2s here).
    pub fn body_timeout(mut self, value: &str) -> Config {
        self.body_timeout = value.to_string();
        self
    }

    /// One more `server:` setting the harness does not write itself (`accept_queue`,
    /// `worker_idle`, …); `value` goes into the YAML as written.
    /// One more `upstream:` setting.
    pub fn upstream(mut self, key: &str, value: &str) -> Config {
        self.upstream.push((key.to_string(), value.to_string()));
        self
    }

    pub fn server(mut self, key: &str, value: &str) -> Config {
        self.server.push((key.to_string(), value.to_string()));
        self
    }

    /// `admin.listen`: `off` (the default here) or an address such as `127.0.0.1:0`.
    pub fn admin_listen(mut self, value: &str) -> Config {
        self.admin_listen = value.to_string();
        self
    }

    /// Appends top-level YAML sections the harness does not write itself (`balance:`,
    /// `sticky:`, …), verbatim; each line ends with a newline.
    pub fn section(mut self, yaml: &str) -> Config {
        self.sections.push_str(yaml);
        if !yaml.ends_with('\n') {
            self.sections.push('\n');
        }
        self
    }

    /// `log.level`: `debug` lets leak checks see everything the server can say.
    pub fn log_level(mut self, value: &str) -> Config {
        self.log_level = Some(value.to_string());
        self
    }

    /// One `oauth:` setting; `value` goes into the YAML as written (quote it if needed). A
    /// setting given again replaces the earlier value (a test overriding the rig's default).
    pub fn oauth(mut self, key: &str, value: impl Into<String>) -> Config {
        let value = value.into();
        match self.oauth.iter_mut().find(|(k, _)| k == key) {
            Some(setting) => setting.1 = value,
            None => self.oauth.push((key.to_string(), value)),
        }
        self
    }

    pub fn yaml(&self) -> String {
        let mut yaml = format!(
            "server:\n  listen: 127.0.0.1:0\n  workers: {}\n  \
             header_timeout: {}\n  body_timeout: {}\n  keepalive_timeout: 5s\n",
            self.workers, self.header_timeout, self.body_timeout
        );
        // 1 MiB unless the test sets its own.
        if !self.server.iter().any(|(key, _)| key == "max_body_bytes") {
            yaml.push_str("  max_body_bytes: 1048576\n");
        }
        for (key, value) in &self.server {
            yaml.push_str(&format!("  {key}: {value}\n"));
        }
        yaml.push_str(&format!(
            "upstream:\n  base_url: {}\n  connect_timeout: 2s\n  read_timeout: {}\n",
            self.base_url, self.read_timeout
        ));
        for (key, value) in &self.upstream {
            yaml.push_str(&format!("  {key}: {value}\n"));
        }
        yaml.push_str(&format!("admin:\n  listen: {}\n", self.admin_listen));
        if let Some(level) = &self.log_level {
            yaml.push_str(&format!("log:\n  level: {level}\n"));
        }
        if !self.oauth.is_empty() {
            yaml.push_str("oauth:\n");
            for (key, value) in &self.oauth {
                yaml.push_str(&format!("  {key}: {value}\n"));
            }
        }
        yaml.push_str(&self.sections);
        yaml
    }
}

/// The gateway under test: its own temp dir and config, CLI runs against it, and at most one server process.
pub struct Gateway {
    dir: TempDir,
    client_key: Option<String>,
    server: Option<Server>,
    /// What servers stopped with `stop` wrote to stderr, kept for leak checks.
    past_stderr: String,
    /// Environment variables every command and server of this gateway gets.
    envs: Vec<(String, String)>,
}

/// One `llm-gateway server` process, killed on drop.
pub struct Server {
    child: Child,
    addr: SocketAddr,
    /// Everything the server wrote to stderr so far, drained by a thread so the pipe never fills.
    stderr: Arc<Mutex<Vec<u8>>>,
    /// The drain thread; it ends when the process is gone and its stderr is fully read.
    drain: Option<thread::JoinHandle<()>>,
    /// The stdout lines after the first, as they come (the admin listener's line, if on).
    more_stdout: Mutex<Receiver<String>>,
    /// The admin listener's address, once read from stdout.
    admin: OnceLock<SocketAddr>,
}

impl Server {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The process id, for reading `/proc/<pid>/status` (memory, threads).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process and waits until everything it wrote to stderr has been collected.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(drain) = self.drain.take() {
            let _ = drain.join();
        }
    }

    /// What the server has written to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("stderr lock")).into_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
            past_stderr: String::new(),
            envs: Vec::new(),
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

    /// Another instance of the same deployment: a new directory with a copy of this one's
    /// config.yaml and secret key file (`gateway.key`), and the same client key. It has its
    /// own usage ledger, and no server yet.
    pub fn sibling(&self) -> Gateway {
        let mut other = Gateway::with_yaml(&self.config_text());
        let key = self.dir.path().join("gateway.key");
        std::fs::copy(&key, other.dir.path().join("gateway.key"))
            .unwrap_or_else(|e| panic!("copy {key:?}: {e}"));
        other.client_key = self.client_key.clone();
        other.envs = self.envs.clone();
        other
    }

    /// Sets an environment variable for every later command and server of this gateway
    /// (replacing an earlier value).
    pub fn env(&mut self, name: &str, value: &str) {
        self.envs.retain(|(n, _)| n != name);
        self.envs.push((name.to_string(), value.to_string()));
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }

    /// Sets client key `id`'s `expires` in config.yaml by hand, as an operator could: the CLI
    /// refuses an expiry already past, and tests need expired keys.
    pub fn expire_client_key(&self, id: &str, expires: &str) {
        let text = self.config_text();
        let mut out = Vec::new();
        let mut inside = false;
        for line in text.lines() {
            if line.trim_start().starts_with("- id: ") {
                inside = line.trim_start() == format!("- id: {id}");
                out.push(line.to_string());
                if inside {
                    out.push(format!("    expires: '{expires}'"));
                }
                continue;
            }
            if inside && line.trim_start().starts_with("expires:") {
                continue;
            }
            out.push(line.to_string());
        }
        std::fs::write(self.config_path(), out.join("\n") + "\n").expect("write config.yaml");
    }

    pub fn config_text(&self) -> String {
        std::fs::read_to_string(self.config_path()).expect("read config.yaml")
    }

    /// The binary with a clean environment and the temp dir as working directory; no `--config` yet.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.env_remove("LLM_GATEWAY_SECRET_KEY")
            .env_remove("LLM_GATEWAY_CONFIG")
            .env_remove("LLM_GATEWAY_ADMIN_KEY")
            .envs(self.envs.iter().map(|(n, v)| (n, v)))
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
        self.add_api_key_with(name, key, &[])
    }

    /// Adds an API-key account with extra flags (`--priority`, `--weight`) and returns its id.
    pub fn add_api_key_with(&self, name: &str, key: &str, extra: &[&str]) -> String {
        let mut args = vec!["add-api-key", "--name", name, "--key", key, "--json"];
        args.extend_from_slice(extra);
        let out = self.run_cli(&args);
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

    /// Adds a client key that may also read status (`--admin`) and returns it; `client_key()`
    /// stays as it was.
    pub fn add_admin_key(&self, name: &str) -> String {
        let out = self.run_cli(&["add-client-key", "--name", name, "--admin", "--json"]);
        assert_exit(&out, 0, "add-client-key --admin");
        let v: Value =
            serde_json::from_slice(&out.stdout).expect("add-client-key --json prints JSON");
        v["key"]
            .as_str()
            .expect("add-client-key --json has a key")
            .to_string()
    }

    /// Logs OAuth account `id` in through the CLI, as an operator would: `oauth-start`, then
    /// `oauth-callback` with `code#state`.
    pub fn oauth_login(&self, id: &str, code: &str) {
        let out = self.run_cli(&["oauth-start", "--account-id", id, "--json"]);
        assert_exit(&out, 0, "oauth-start");
        let v: Value = serde_json::from_slice(&out.stdout).expect("oauth-start --json prints JSON");
        let url = v["authorize_url"].as_str().expect("authorize_url");
        let state = url
            .split(['?', '&'])
            .find_map(|p| p.strip_prefix("state="))
            .unwrap_or_else(|| panic!("no state in {url}"));
        let pasted = format!("{code}#{state}");
        let out = self.run_cli(&[
            "oauth-callback",
            "--account-id",
            id,
            "--code",
            &pasted,
            "--json",
        ]);
        assert_exit(&out, 0, "oauth-callback");
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
        let server = self.spawn_server(extra);
        let addr = server.addr;
        self.server = Some(server);
        addr
    }

    /// Another server process on this same config, owned by the caller (e.g. a second
    /// gateway sharing config.yaml with the first).
    pub fn spawn_server(&self, extra: &[&str]) -> Server {
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
        let drain = thread::spawn(move || {
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
        let (more_tx, more_rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the server never blocks on a full stdout pipe; later lines
            // (the admin listener's address) are passed on.
            for line in lines {
                let Ok(line) = line else { break };
                let _ = more_tx.send(line);
            }
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
        Server {
            child,
            addr,
            stderr,
            drain: Some(drain),
            more_stdout: Mutex::new(more_rx),
            admin: OnceLock::new(),
        }
    }

    /// Kills the server (as a crash or an operator would) and keeps what it wrote to stderr.
    pub fn stop(&mut self) {
        let mut server = self.server.take().expect("server not started");
        server.kill();
        self.past_stderr.push_str(&server.stderr());
    }

    pub fn running(&self) -> bool {
        self.server.is_some()
    }

    /// Sends `signal` (`TERM`, `INT`, `HUP`) to the server with kill(1).
    pub fn signal(&self, signal: &str) {
        let server = self.server.as_ref().expect("server not started");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(server.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits (polling, up to `limit`) for the server to exit; its status, or `None` if it is
    /// still running at the deadline.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let server = self.server.as_mut().expect("server not started");
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = server.child.try_wait().expect("try_wait") {
                if let Some(drain) = server.drain.take() {
                    let _ = drain.join();
                }
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.as_ref().expect("server not started").addr
    }

    /// The admin listener's address, from the server's second stdout line
    /// (`llm-gateway admin on http://ADDR`); waits up to `STEP_TIMEOUT` for it.
    pub fn admin_addr(&self) -> SocketAddr {
        let server = self.server.as_ref().expect("server not started");
        *server.admin.get_or_init(|| {
            let line = server
                .more_stdout
                .lock()
                .expect("stdout lock")
                .recv_timeout(STEP_TIMEOUT)
                .unwrap_or_else(|_| {
                    panic!("no second stdout line (admin listener) within {STEP_TIMEOUT:?}")
                });
            let prefix = "llm-gateway admin on http://";
            line.strip_prefix(prefix)
                .unwrap_or_else(|| {
                    panic!("second stdout line should start with {prefix:?}: {line:?}")
                })
                .parse()
                .unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"))
        })
    }

    /// What the server has written to stderr so far.
    pub fn stderr(&self) -> String {
        self.server.as_ref().expect("server not started").stderr()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.server.as_ref().expect("server not started").pid()
    }

    /// Everything every server started with `start` wrote to stderr, stopped ones included.
    pub fn all_stderr(&self) -> String {
        let mut all = self.past_stderr.clone();
        if let Some(server) = &self.server {
            all.push_str(&server.stderr());
        }
        all
    }

    /// Headers that authenticate as this gateway's client key.
    pub fn auth(&self) -> (&'static str, &str) {
        ("x-api-key", self.client_key())
    }
}

/// An upstream that answers every request 200 `{"ok":true}`, and a gateway on it as
/// `Gateway::started` makes one.
pub fn ok_upstream_and_gateway() -> (FakeUpstream, Gateway) {
    let up = FakeUpstream::json(200, r#"{"ok":true}"#);
    let gw = Gateway::started(&Config::new(up.base_url()));
    (up, gw)
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

/// A line from `/proc/<pid>/status` (`VmRSS`, `Threads`), as its number.
pub fn proc_status(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("the gateway process is alive (/proc/<pid>/status readable)");
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A test that cannot run here says so where it is seen: on the real stderr (not the output
/// the harness captures and hides for a passing test), naming why. With
/// `LLM_GATEWAY_NO_SKIP=1` (CI on a machine that can run everything) a skip is a failure.
pub fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let line = format!("SKIPPED {test}: {why}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    assert!(
        std::env::var_os("LLM_GATEWAY_NO_SKIP").is_none_or(|v| v != "1"),
        "{test} was skipped ({why}) and LLM_GATEWAY_NO_SKIP=1 forbids it"
    );
}
