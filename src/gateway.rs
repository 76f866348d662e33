//! The running gateway: `Gateway`, everything a worker needs to serve a request (accounts,
//! keys, the upstream client, limits, ledger, metrics, the live settings and the registry of
//! open connections), built once from the validated config and shared by every thread.

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use crate::access::AccessLog;
use crate::accounts::Accounts;
use crate::auth::ClientKeys;
use crate::config::{Config, ModelSettings};
use crate::http::Limits;
use crate::ledger::Ledger;
use crate::limits::Limiter;
use crate::listener::Workers;
use crate::metrics::Metrics;
use crate::pricing::Cost;
use crate::refresh::Refresher;
use crate::shared::Shared;
use crate::supervise::Threads;
use crate::upstream::Upstream;
use crate::usage::Usage;

/// The settings a config.yaml change applies live, replaced whole: a request reads the ones in
/// force when it asks, and a stream in flight keeps the ones it started with.
pub struct Settings {
    pub system_prompt: String,
    pub models: ModelSettings,
    pub pricing: crate::pricing::Table,
    pub limits: Limits,
    pub access_log: bool,
    pub trusted_proxies: Vec<crate::access::Cidr>,
}

impl Settings {
    /// What `usage` of `model` (as the client named it: an alias is priced as its target)
    /// cost; `charged` overrides it.
    pub fn cost(&self, model: Option<&str>, usage: &Usage, charged: Option<u64>) -> Cost {
        if let Some(nano) = charged {
            return Cost::Priced {
                nano,
                estimated: true,
            };
        }
        let model = model.unwrap_or("-");
        let model = self.models.aliases.get(model).map_or(model, String::as_str);
        self.pricing.cost(model, usage)
    }

    /// What a request for `model` may cost at most: `input` and `output` tokens priced.
    pub fn estimate(&self, model: Option<&str>, input: u64, output: u64) -> Option<u64> {
        let Some(model) = model else {
            return Some(0);
        };
        let model = self.models.aliases.get(model).map_or(model, String::as_str);
        self.pricing.estimate(model, input, output)
    }

    fn new(config: &Config) -> Settings {
        let s = &config.server;
        Settings {
            system_prompt: config.oauth.system_prompt.clone(),
            models: config.models.clone(),
            pricing: config.pricing.clone(),
            limits: Limits {
                max_body: s.max_body_bytes,
                header_timeout: s.header_timeout,
                body_timeout: s.body_timeout,
                keepalive_timeout: s.keepalive_timeout,
                body_min_rate: s.body_min_rate,
                body_rate_grace: s.body_rate_grace,
            },
            access_log: config.access_log,
            trusted_proxies: s.trusted_proxies.clone(),
        }
    }
}

/// Everything a worker needs to serve a request, shared by all workers.
pub struct Gateway {
    pub accounts: Accounts,
    pub clients: ClientKeys,
    /// Rebuilt (a new connection pool) only when the `upstream:` settings change.
    upstream: RwLock<Arc<Upstream>>,
    pub refresher: Refresher,
    /// Where config.yaml is, for the changes the server itself makes (tokens, bans).
    pub config_path: PathBuf,
    live: RwLock<Arc<Settings>>,
    pub access: AccessLog,
    /// `None` when usage recording is off or another process holds the ledger.
    pub ledger: Option<Arc<Ledger>>,
    pub limiter: Arc<Limiter>,
    pub metrics: Metrics,
    pub started: Instant,
    pub workers: Arc<Workers>,
    pub max_workers: usize,
    /// Open downstream connections, so a shutdown can close the idle ones.
    pub(crate) connections: Connections,
    /// The supervised threads and the panics caught.
    pub threads: Arc<Threads>,
    /// Why the last change of config.yaml could not be applied (and when), until one is.
    pub reload_error: Mutex<Option<String>>,
    /// The dashboard's session cookies, keyed from `gateway.key`.
    pub sessions: crate::dashboard::Sessions,
    /// This instance's recent errors and failovers, for the dashboard.
    pub trouble: crate::dashboard::Recent,
}

impl Gateway {
    /// Records how the last reload went: `None` once a config applied.
    pub fn set_reload_error(&self, error: Option<String>) {
        *self.reload_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
    }

    pub fn reload_error(&self) -> Option<String> {
        self.reload_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn new(
        config: &Config,
        ledger: Option<Arc<Ledger>>,
        shared: Option<Arc<Shared>>,
    ) -> Gateway {
        let s = &config.server;
        Gateway {
            accounts: Accounts::new(
                config.accounts.clone(),
                &config.balance,
                &config.sticky,
                shared.clone(),
            ),
            clients: ClientKeys::new(config.client_keys.clone(), config.auth_open),
            upstream: RwLock::new(Arc::new(Upstream::new(&config.upstream, s.workers))),
            refresher: Refresher::new(config.path.clone(), &config.oauth, shared.clone()),
            config_path: config.path.clone(),
            live: RwLock::new(Arc::new(Settings::new(config))),
            access: match &config.access_file {
                None => AccessLog::stderr(),
                Some(path) => AccessLog::file(path).unwrap_or_else(|e| {
                    warn!("access log {}: {e}; writing it to stderr", path.display());
                    AccessLog::stderr()
                }),
            },
            ledger,
            limiter: Arc::new(Limiter::new(shared)),
            metrics: Metrics::new(known_models(config)),
            started: Instant::now(),
            workers: Arc::default(),
            max_workers: s.workers,
            connections: Connections::default(),
            threads: Arc::default(),
            reload_error: Mutex::default(),
            sessions: crate::dashboard::Sessions::new(session_key(config).as_ref()),
            trouble: crate::dashboard::Recent::default(),
        }
    }

    /// The live settings in force now.
    pub fn live(&self) -> Arc<Settings> {
        // Replacing an Arc cannot leave it half-written, so a poisoned lock holds a whole value.
        Arc::clone(&self.live.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The upstream client in force now.
    pub fn upstream(&self) -> Arc<Upstream> {
        Arc::clone(&self.upstream.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Puts a reloaded config's live settings in force (requests in flight keep theirs).
    pub(crate) fn replace_settings(&self, config: &Config) {
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Settings::new(config));
    }

    /// Puts a new upstream client in force (requests in flight keep the one they started with).
    pub(crate) fn replace_upstream(&self, upstream: Upstream) {
        *self.upstream.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(upstream);
    }
}

/// Open downstream connections, each registered once, with whether it is idle between
/// requests. Once draining, a connection that would go idle closes instead, and `drain` closes
/// those already idle; a newcomer needing a worker closes the oldest idle one. Per request
/// only the connection's own state changes: no lock.
#[derive(Default)]
pub(crate) struct Connections {
    open: Mutex<HashMap<u64, Arc<Open>>>,
    next: AtomicU64,
    draining: AtomicBool,
}

struct Open {
    socket: Arc<TcpStream>,
    /// `BUSY`, `IDLE` or `CLOSED`. Only an idle connection is closed from outside, and only by
    /// swapping `IDLE` for `CLOSED`, which its worker's own swap back to `BUSY` then loses: a
    /// request that arrived as it was closed is never served into a shut socket.
    state: AtomicU8,
    /// On the main listener: its worker may be reclaimed for the main pool.
    main: bool,
}

const BUSY: u8 = 0;
const IDLE: u8 = 1;
const CLOSED: u8 = 2;

impl Open {
    /// Closes the connection if it is idle; true when it was.
    fn close_if_idle(&self) -> bool {
        let closed = (self.state)
            .compare_exchange(IDLE, CLOSED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if closed {
            let _ = self.socket.shutdown(Shutdown::Both);
        }
        closed
    }
}

/// A connection's place in the registry; leaving it unregisters the connection.
pub(crate) struct Registered<'a> {
    connections: &'a Connections,
    id: u64,
    open: Arc<Open>,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Open>>> {
        // The map is only inserted into and removed from: a poisoned one is still consistent.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn register(&self, socket: Arc<TcpStream>, main: bool) -> Registered<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let open = Arc::new(Open {
            socket,
            state: AtomicU8::new(BUSY),
            main,
        });
        self.lock().insert(id, Arc::clone(&open));
        Registered {
            connections: self,
            id,
            open,
        }
    }

    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Closes the oldest main-listener connection idle between requests, so its worker can
    /// serve a new one; false when none is idle.
    pub(crate) fn reclaim_idle(&self) -> bool {
        let open = self.lock();
        let mut idle: Vec<(&u64, &Arc<Open>)> = (open.iter())
            .filter(|(_, c)| c.main && c.state.load(Ordering::SeqCst) == IDLE)
            .collect();
        idle.sort_unstable_by_key(|(id, _)| **id);
        // The oldest first; one that got a request meanwhile is skipped.
        idle.iter().any(|(_, c)| c.close_if_idle())
    }

    /// Starts draining and closes every idle connection; returns how many were closed.
    pub(crate) fn drain(&self) -> usize {
        // SeqCst on both sides (here and in `Registered::idle`): a connection going idle either
        // sees the drain and closes itself, or is seen idle here and closed.
        self.draining.store(true, Ordering::SeqCst);
        let open = self.lock();
        open.values().filter(|c| c.close_if_idle()).count()
    }
}

impl Registered<'_> {
    /// Marks the connection idle (waiting for its next request); false when draining, and the
    /// connection should close instead.
    pub(crate) fn idle(&self) -> bool {
        self.open.state.store(IDLE, Ordering::SeqCst);
        !self.connections.draining()
    }

    /// Marks the connection busy (a request arrived, or the read ended); false when it was
    /// closed from outside while idle, and whatever was read must not be served.
    pub(crate) fn busy(&self) -> bool {
        let swapped =
            (self.open.state).compare_exchange(IDLE, BUSY, Ordering::SeqCst, Ordering::SeqCst);
        !matches!(swapped, Err(CLOSED))
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.connections.lock().remove(&self.id);
    }
}

/// Model names metrics may label by: configured names, aliases and their targets, and every
/// key's allow-list.
pub(crate) fn known_models(config: &Config) -> Vec<String> {
    let mut names = config.models.names.clone();
    for key in &config.client_keys {
        names.extend(key.limits.models.iter().cloned());
    }
    names
}

/// The key the dashboard's sessions are derived from: `gateway.key` (made beside an existing
/// config if there is none yet, as the first sealed secret would make it), or none when it
/// cannot be read.
fn session_key(config: &Config) -> Option<crate::secret::SecretKey> {
    let text = crate::config::read_text(&config.path).ok().flatten()?;
    let raw = crate::config::parse_raw(&config.path, &text).ok()?;
    match crate::config::key_source(&config.path, &raw).load_or_create() {
        Ok(key) => Some(key),
        Err(e) => {
            warn!("dashboard sessions are off: {e}");
            None
        }
    }
}
