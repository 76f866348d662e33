//! `llm-gateway server`: builds the running gateway from the validated config, binds, announces
//! the address, watches config.yaml for account and key changes, and runs the listener.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::access::AccessLog;
use crate::accounts::Accounts;
use crate::auth::ClientKeys;
use crate::config::{self, Config, ModelSettings};
use crate::error::ApiError;
use crate::http::{Conn, Limits};
use crate::ledger::Ledger;
use crate::limits::Limiter;
use crate::listener::{self, PoolSettings, Workers};
use crate::log;
use crate::metrics::Metrics;
use crate::refresh::Refresher;
use crate::router;
use crate::upstream::Upstream;

/// Connections the kernel may hold for the accept loop (capped by `net.core.somaxconn`).
const ACCEPT_BACKLOG: i32 = 4096;

/// Everything a worker needs to serve a request, shared by all workers.
pub struct Gateway {
    pub accounts: Accounts,
    pub clients: ClientKeys,
    pub upstream: Upstream,
    pub refresher: Refresher,
    /// Where config.yaml is, for the changes the server itself makes (tokens, bans).
    pub config_path: PathBuf,
    pub system_prompt: String,
    pub models: ModelSettings,
    pub limits: Limits,
    pub access_log: bool,
    pub access: AccessLog,
    /// `None` when usage recording is off or another process holds the ledger.
    pub ledger: Option<Arc<Ledger>>,
    pub limiter: Arc<Limiter>,
    pub metrics: Metrics,
    pub started: Instant,
    pub workers: Arc<Workers>,
    pub max_workers: usize,
}

impl Gateway {
    pub fn new(config: &Config, ledger: Option<Arc<Ledger>>) -> Gateway {
        let s = &config.server;
        Gateway {
            accounts: Accounts::new(config.accounts.clone(), &config.balance, &config.sticky),
            clients: ClientKeys::new(config.client_keys.clone(), config.auth_open),
            upstream: Upstream::new(&config.upstream, s.workers),
            refresher: Refresher::new(config.path.clone(), &config.oauth),
            config_path: config.path.clone(),
            system_prompt: config.oauth.system_prompt.clone(),
            models: config.models.clone(),
            limits: Limits {
                max_body: s.max_body_bytes,
                header_timeout: s.header_timeout,
                body_timeout: s.body_timeout,
                keepalive_timeout: s.keepalive_timeout,
            },
            access_log: config.access_log,
            access: match &config.access_file {
                None => AccessLog::stderr(),
                Some(path) => AccessLog::file(path).unwrap_or_else(|e| {
                    warn!("access log {}: {e}; writing it to stderr", path.display());
                    AccessLog::stderr()
                }),
            },
            ledger,
            limiter: Arc::default(),
            metrics: Metrics::new(known_models(config)),
            started: Instant::now(),
            workers: Arc::default(),
            max_workers: s.workers,
        }
    }
}

#[derive(Debug)]
pub struct BindError {
    pub addr: String,
    pub error: std::io::Error,
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot listen on {}: {}", self.addr, self.error)
    }
}

/// Runs the server until the process is stopped.
pub fn run(config: Config, listen: Option<String>) -> Result<(), BindError> {
    log::set_level(config.log_level);
    for warning in &config.warnings {
        warn!("{warning}");
    }
    if config.auth_open {
        warn!(
            "AUTH IS OPEN (auth.open: true): every request is served without a gateway key. \
             A loopback address does not make this safe when a local proxy forwards to it."
        );
    }
    let addr = listen.unwrap_or_else(|| config.server.listen.clone());
    let listener = TcpListener::bind(&addr).map_err(|error| BindError {
        addr: addr.clone(),
        error,
    })?;
    let local = listener.local_addr().map_err(|error| BindError {
        addr: addr.clone(),
        error,
    })?;
    if let Err(e) = crate::sys::deepen_backlog(&listener, ACCEPT_BACKLOG) {
        warn!("could not deepen the accept queue ({e}); bursts of connections may wait a second");
    }
    let ledger = open_ledger(&config);
    let gateway = Arc::new(Gateway::new(&config, ledger));
    info!(
        "serving {} accounts to {} client keys, upstream {}, up to {} workers",
        gateway.accounts.len(),
        config.client_keys.len(),
        config.upstream.base_url,
        config.server.workers
    );
    if config.client_keys.is_empty() && !config.auth_open {
        warn!(
            "no client keys: every request will get 401 until you run `llm-gateway add-client-key`"
        );
    }
    // The one line scripts and tests wait for.
    println!("llm-gateway listening on http://{local}");
    {
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }

    let watched = Arc::clone(&gateway);
    let path = config.path.clone();
    let _ = std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || watch_config(&watched, path));

    let refreshing = Arc::clone(&gateway);
    let _ = std::thread::Builder::new()
        .name("oauth-refresh".into())
        .spawn(move || {
            loop {
                refreshing.refresher.tick(&refreshing.accounts);
                std::thread::sleep(Duration::from_secs(1));
            }
        });

    if let Some(addr) = &config.admin_listen {
        start_admin(&gateway, addr);
    }
    let settings = PoolSettings {
        workers: config.server.workers,
        queue: config.server.accept_queue,
        idle_retire: config.server.worker_idle,
    };
    let workers = Arc::clone(&gateway.workers);
    listener::run(listener, settings, workers, move |stream| {
        serve_connection(&gateway, stream, false)
    });
    Ok(())
}

/// The admin listener: status, health and readiness with no key, on an address that should
/// stay private (loopback by default). A failure to bind it is reported, not fatal: status
/// stays reachable on the main listener with an admin key.
fn start_admin(gateway: &Arc<Gateway>, addr: &str) {
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            warn!("admin listener not started: cannot listen on {addr}: {e}");
            return;
        }
    };
    if let Ok(local) = listener.local_addr() {
        // Second line on stdout, after the main listener's, for scripts and tests.
        println!("llm-gateway admin on http://{local}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
        info!("admin listener on http://{local} (status, /health, /ready)");
    }
    let gw = Arc::clone(gateway);
    let _ = std::thread::Builder::new()
        .name("admin-accept".into())
        .spawn(move || {
            let settings = PoolSettings {
                workers: 4,
                queue: 16,
                idle_retire: Duration::from_secs(60),
            };
            listener::run(listener, settings, Arc::default(), move |stream| {
                serve_connection(&gw, stream, true)
            });
        });
}

/// Model names metrics may label by: configured names, aliases and their targets, and every
/// key's allow-list.
fn known_models(config: &Config) -> Vec<String> {
    let mut names = config.models.names.clone();
    for key in &config.client_keys {
        names.extend(key.limits.models.iter().cloned());
    }
    names
}

/// Opens the usage ledger and starts its flusher, or explains why usage is not recorded.
fn open_ledger(config: &Config) -> Option<Arc<Ledger>> {
    if !config.usage.enabled {
        return None;
    }
    match Ledger::open(&config.usage.dir) {
        Ok((ledger, journal)) => {
            let flusher = Arc::clone(&ledger);
            let interval = config.usage.flush_interval;
            let _ = std::thread::Builder::new()
                .name("usage-ledger".into())
                .spawn(move || flusher.flush_forever(journal, interval));
            Some(ledger)
        }
        Err(e) => {
            warn!(
                "usage is not recorded by this process ({}: {e}); token budgets are not enforced",
                config.usage.dir.display()
            );
            None
        }
    }
}

/// Serves requests on one connection until it closes, errs or stops being reusable.
fn serve_connection(gw: &Gateway, stream: TcpStream, admin: bool) {
    let _ = stream.set_nodelay(true);
    // A client that stops reading a response for this long is given up on.
    let _ = stream.set_write_timeout(Some(gw.limits.body_timeout.max(Duration::from_secs(10))));
    let mut conn = Conn::new(stream);
    loop {
        match conn.read_request(&gw.limits) {
            Ok(req) => {
                if !router::handle(gw, req, &mut conn, admin) {
                    break;
                }
            }
            Err(e) => {
                if let Some((status, message)) = e.answer(gw.limits.max_body) {
                    router::refuse_unread(gw, &mut conn, &ApiError::Http { status, message });
                    conn.linger();
                }
                break;
            }
        }
    }
}

/// Every half second, if config.yaml changed, reload its accounts and client keys. Settings
/// that need a restart (listen address, workers) are left as they are.
fn watch_config(gw: &Gateway, path: PathBuf) {
    // Writers replace the file by rename, so the inode changes even within one mtime tick.
    let stamp = |p: &PathBuf| -> Option<(SystemTime, u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len(), m.ino()))
    };
    let mut last = stamp(&path);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        match config::load(&path) {
            Ok(fresh) => {
                gw.accounts.replace(fresh.accounts.clone());
                gw.clients.replace(fresh.client_keys.clone());
                gw.metrics.set_known_models(known_models(&fresh));
                info!(
                    "config reloaded: {} accounts, {} client keys",
                    fresh.accounts.len(),
                    fresh.client_keys.len()
                );
            }
            Err(e) => error!("config changed but cannot be loaded, keeping the previous one: {e}"),
        }
    }
}
