//! `llm-gateway server`: builds the running gateway from the validated config, binds, announces
//! the address, applies config.yaml changes live (every half second, or at once on SIGHUP),
//! runs the listener, and on SIGTERM/SIGINT drains in-flight requests before exiting.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::http::Conn;
use crate::ledger::{Journal, Ledger};
use crate::listener::{self, PoolSettings, Workers};
use crate::logger;
use crate::reload::{Watched, stamp, watch_config};
use crate::router::{self, Listener};
use crate::shared::Shared;
use crate::sys::{self, Signal};

/// Connections the kernel may hold for the accept loop (capped by `net.core.somaxconn`).
const ACCEPT_BACKLOG: i32 = 4096;
/// How often the shared state is probed (while Redis is down) and synced (tokens, bans).
const SHARED_SYNC: Duration = Duration::from_millis(500);

/// Why the server did not start.
#[derive(Debug)]
pub enum StartError {
    Bind {
        addr: String,
        error: std::io::Error,
    },
    /// The usage ledger cannot be read or recovered: serving would mean serving without
    /// budgets.
    Ledger(std::io::Error),
    /// A long-lived thread could not be started (out of threads or memory).
    Thread {
        name: &'static str,
        error: std::io::Error,
    },
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Bind { addr, error } => write!(f, "cannot listen on {addr}: {error}"),
            StartError::Ledger(error) => write!(f, "usage ledger: {error}"),
            StartError::Thread { name, error } => {
                write!(f, "cannot start the {name} thread: {error}")
            }
        }
    }
}

/// Runs the server until SIGTERM or SIGINT has drained it (or a second one exits at once).
pub fn run(config: Config, listen: Option<String>) -> Result<(), StartError> {
    let signals = prepare_process(&config);
    let listener = bind_main(&config, listen)?;
    let (gateway, journal) = assemble(&config)?;
    if !config.digest.is_empty() {
        crate::applied::record(&config.path, &config.digest);
    }
    announce(&listener);
    let (reload_tx, reload_rx) = mpsc::channel();
    start_background(&gateway, &config, journal.as_ref(), reload_rx)?;
    let listeners = listeners(&gateway, &config, &listener);
    if signals {
        start_signals(&gateway, listeners, reload_tx)?;
    }
    serve(&gateway, &config, listener);
    drain(&gateway, config.server.shutdown_grace);
    if let (Some(ledger), Some(journal)) = (&gateway.ledger, &journal) {
        ledger.flush(&mut journal.lock().unwrap_or_else(|p| p.into_inner()));
    }
    crate::applied::forget(&config.path);
    info!("stopped");
    Ok(())
}

/// What the whole process needs before any thread starts: the signal mask (every thread
/// inherits it, so signals wait for the one thread that takes them), the log level, a
/// one-line panic report, and the config's warnings. Returns whether signals are ours.
fn prepare_process(config: &Config) -> bool {
    let signals = match sys::block_signals() {
        Ok(()) => true,
        Err(e) => {
            warn!(
                "signals keep their default action ({e}): no graceful shutdown, no SIGHUP reload"
            );
            false
        }
    };
    logger::set_level(config.log_level);
    // A panic is one log line (the supervisor or the worker that caught it says what
    // happens next), not std's multi-line report.
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let at = info
            .location()
            .map_or_else(String::new, |l| format!(" at {}:{}", l.file(), l.line()));
        error!(
            "panic in thread {}{at}: {}",
            thread.name().unwrap_or("unnamed"),
            crate::supervise::message(info.payload())
        );
    }));
    for warning in &config.warnings {
        warn!("{warning}");
    }
    if config.auth_open {
        warn!(
            "AUTH IS OPEN (auth.open: true): every request is served without a gateway key. \
             A loopback address does not make this safe when a local proxy forwards to it."
        );
    }
    signals
}

/// Binds the main listener (`--listen`, else `server.listen`) with a deep accept queue.
fn bind_main(config: &Config, listen: Option<String>) -> Result<TcpListener, StartError> {
    let addr = listen.unwrap_or_else(|| config.server.listen.clone());
    let listener = bind(&addr, config.server.reuse_port).map_err(|error| StartError::Bind {
        addr: addr.clone(),
        error,
    })?;
    if let Err(e) = crate::sys::deepen_backlog(&listener, ACCEPT_BACKLOG) {
        warn!("could not deepen the accept queue ({e}); bursts of connections may wait a second");
    }
    Ok(listener)
}

/// The running gateway: shared state, the ledger (its journal kept for the last flush) and
/// everything `Gateway` holds.
fn assemble(config: &Config) -> Result<(Arc<Gateway>, Option<SharedJournal>), StartError> {
    let shared = start_shared(config);
    let (ledger, journal) = match open_ledger(config, shared.clone())? {
        Some((ledger, journal)) => (Some(ledger), Some(journal)),
        None => (None, None),
    };
    let gateway = Arc::new(Gateway::new(config, ledger, shared));
    info!(
        "serving {} accounts to {} client keys, upstream {}, up to {} workers",
        gateway.accounts.count(),
        config.client_keys.len(),
        config.upstream.base_url,
        config.server.workers
    );
    if config.client_keys.is_empty() && !config.auth_open {
        warn!(
            "no client keys: every request will get 401 until you run `llm-gateway add-client-key`"
        );
    }
    Ok((gateway, journal))
}

/// Prints the one line scripts and tests wait for: the address really bound.
fn announce(listener: &TcpListener) {
    use std::io::Write;
    if let Ok(local) = listener.local_addr() {
        println!("llm-gateway listening on http://{local}");
    }
    let _ = std::io::stdout().flush();
}

/// Starts the long-lived threads, each supervised (`supervise`: a panic restarts it): the
/// config watcher, the shared-state sync, the ledger's flusher and the OAuth refresher. One
/// that cannot even be started is an error at start, not a gateway running without it.
fn start_background(
    gateway: &Arc<Gateway>,
    config: &Config,
    journal: Option<&SharedJournal>,
    reload_rx: mpsc::Receiver<()>,
) -> Result<(), StartError> {
    let threads = &gateway.threads;
    let watching = Arc::clone(gateway);
    let watched = Mutex::new(Watched {
        last: stamp(&config.path),
        running: config.clone(),
        applying: None,
    });
    started(
        "config-watch",
        threads.spawn("config-watch", true, move || {
            let mut watched = watched.lock().unwrap_or_else(|p| p.into_inner());
            watch_config(&watching, &mut watched, &reload_rx);
        }),
    )?;
    if let Some(shared) = gateway.accounts.shared().cloned() {
        let syncing = Arc::clone(gateway);
        // Not needed for /ready: a Redis outage never takes every instance out of the load
        // balancer, and neither does the thread that watches Redis.
        started(
            "shared-state",
            threads.spawn("shared-state", false, move || {
                let mut renewed = Instant::now();
                loop {
                    crate::supervise::inject("shared-state");
                    shared.probe();
                    let _ = syncing.accounts.sync();
                    if renewed.elapsed() >= crate::shared::SLOT_HOLD / 6 {
                        syncing.limiter.renew_slots();
                        syncing.accounts.renew_leases();
                        renewed = Instant::now();
                    }
                    std::thread::sleep(SHARED_SYNC);
                }
            }),
        )?;
    }
    if let (Some(ledger), Some(journal)) = (&gateway.ledger, journal) {
        let (flusher, flushed) = (Arc::clone(ledger), Arc::clone(journal));
        let interval = config.usage.flush_interval;
        started(
            "usage-ledger",
            threads.spawn("usage-ledger", true, move || {
                loop {
                    std::thread::sleep(interval);
                    crate::supervise::inject("usage-ledger");
                    // Only this thread and the final flush take it; a panic mid-flush leaves
                    // the journal as usable as an I/O error would.
                    flusher.flush(&mut flushed.lock().unwrap_or_else(|p| p.into_inner()));
                }
            }),
        )?;
    }
    let refreshing = Arc::clone(gateway);
    started(
        "oauth-refresh",
        threads.spawn("oauth-refresh", true, move || {
            loop {
                crate::supervise::inject("oauth-refresh");
                refreshing.refresher.tick(&refreshing.accounts);
                std::thread::sleep(Duration::from_secs(1));
            }
        }),
    )
}

/// Starts the admin listener; returns both listeners with their pools, for the signal
/// thread to stop.
fn listeners(
    gateway: &Arc<Gateway>,
    config: &Config,
    listener: &TcpListener,
) -> Vec<(TcpListener, Arc<Workers>)> {
    let mut listeners = Vec::new();
    if let Ok(clone) = listener.try_clone() {
        listeners.push((clone, Arc::clone(&gateway.workers)));
    }
    if let Some(addr) = &config.admin_listen
        && let Some(admin) = start_admin(gateway, addr, config.server.reuse_port)
    {
        listeners.push(admin);
    }
    listeners
}

/// Starts the signal thread, which reloads on SIGHUP and stops `listeners` on SIGTERM/SIGINT.
fn start_signals(
    gateway: &Arc<Gateway>,
    listeners: Vec<(TcpListener, Arc<Workers>)>,
    reload_tx: Sender<()>,
) -> Result<(), StartError> {
    // Kept across restarts: a signal after a panic is still the second one.
    let stopping = AtomicBool::new(false);
    started(
        "signals",
        gateway.threads.spawn("signals", true, move || {
            take_signals(&listeners, &reload_tx, &stopping)
        }),
    )
}

/// A thread's start, as a start error naming it.
fn started(name: &'static str, result: std::io::Result<()>) -> Result<(), StartError> {
    result.map_err(|error| StartError::Thread { name, error })
}

/// Serves the main listener on the worker pool until the signal thread stops it.
fn serve(gateway: &Arc<Gateway>, config: &Config, listener: TcpListener) {
    let settings = PoolSettings {
        workers: config.server.workers,
        queue: config.server.accept_queue,
        idle_retire: config.server.worker_idle,
    };
    let serving = Arc::clone(gateway);
    let reclaiming = Arc::clone(gateway);
    listener::run(
        listener,
        settings,
        Arc::clone(&gateway.workers),
        move |stream| serve_connection(&serving, stream, Listener::Main),
        move || reclaiming.connections.reclaim_idle(),
        &gateway.threads,
        "accept",
    );
}

/// The signal thread: SIGHUP asks the watcher for a reload; the first SIGTERM or SIGINT stops
/// the listeners (the main thread then drains), a second one exits at once with 128 + signal.
fn take_signals(
    listeners: &[(TcpListener, Arc<Workers>)],
    reload: &Sender<()>,
    stopping: &AtomicBool,
) {
    loop {
        crate::supervise::inject("signals");
        match sys::wait_signal() {
            Ok(Signal::Hangup) => {
                info!("SIGHUP: reloading config.yaml");
                let _ = reload.send(());
            }
            Ok(signal) if stopping.load(Ordering::SeqCst) => {
                error!(
                    "{} again: exiting now with code {}, cutting what is in flight",
                    signal.name(),
                    128 + signal.number()
                );
                std::process::exit(128 + signal.number());
            }
            Ok(signal) => {
                stopping.store(true, Ordering::SeqCst);
                info!(
                    "{}: shutting down; no new connections (send it again to exit at once)",
                    signal.name()
                );
                for (listener, workers) in listeners {
                    workers.stop(listener);
                }
            }
            Err(e) => {
                error!("waiting for signals failed: {e}; signals are no longer handled");
                return;
            }
        }
    }
}

/// After the listener stopped: closes idle connections, lets in-flight requests and streams
/// finish within `grace`, and says what it waited for and what it cut.
fn drain(gw: &Gateway, grace: Duration) {
    let closed = gw.connections.drain();
    let deadline = Instant::now() + grace;
    let in_flight = gw.workers.in_flight();
    info!(
        "shutdown: closed {closed} idle connections; waiting up to {}s for {in_flight} in flight",
        grace.as_secs()
    );
    let mut said = Instant::now();
    loop {
        let in_flight = gw.workers.in_flight();
        if in_flight == 0 {
            info!("shutdown: nothing in flight");
            return;
        }
        if Instant::now() >= deadline {
            warn!(
                "shutdown: grace of {}s over; cutting {in_flight} requests still in flight",
                grace.as_secs()
            );
            return;
        }
        if said.elapsed() >= Duration::from_secs(5) {
            info!("shutdown: still waiting for {in_flight} in flight");
            said = Instant::now();
        }
        // Nothing signals the last request's end; a short poll costs nothing here.
        std::thread::sleep(Duration::from_millis(20).min(deadline - Instant::now()));
    }
}

/// The admin listener: status, health and readiness with no key, on an address that should
/// stay private (loopback by default). A failure to bind it is reported, not fatal: status
/// stays reachable on the main listener with an admin key.
fn start_admin(
    gateway: &Arc<Gateway>,
    addr: &str,
    reuse_port: bool,
) -> Option<(TcpListener, Arc<Workers>)> {
    let listener = match bind(addr, reuse_port) {
        Ok(l) => l,
        Err(e) => {
            warn!("admin listener not started: cannot listen on {addr}: {e}");
            return None;
        }
    };
    let mut kind = Listener::AdminKeyed;
    if let Ok(local) = listener.local_addr() {
        // Second line on stdout, after the main listener's, for scripts and tests.
        println!("llm-gateway admin on http://{local}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
        if local.ip().is_loopback() {
            kind = Listener::AdminLoopback;
            info!("admin listener on http://{local} (status, /health, /ready)");
        } else {
            warn!(
                "admin listener on http://{local} is not loopback: status and metrics there need an admin key (add-client-key --admin)"
            );
        }
    }
    let gw = Arc::clone(gateway);
    let workers = Arc::new(Workers::default());
    let stop = (listener.try_clone().ok()?, Arc::clone(&workers));
    // Its accept loop is supervised inside `listener::run`, as the main one is.
    let spawned = std::thread::Builder::new()
        .name("admin-accept".into())
        .spawn(move || {
            let threads = Arc::clone(&gw.threads);
            let settings = PoolSettings {
                workers: 4,
                queue: 16,
                idle_retire: Duration::from_secs(60),
            };
            // The admin pool's connections are few; it frees none of the main pool's.
            listener::run(
                listener,
                settings,
                workers,
                move |stream| serve_connection(&gw, stream, kind),
                || false,
                &threads,
                "admin-accept",
            );
        });
    if let Err(e) = spawned {
        warn!("admin listener not started: {e}");
        return None;
    }
    Some(stop)
}

/// Binds `addr`; with `reuse_port`, with SO_REUSEPORT (and SO_REUSEADDR), so that a new
/// server can listen on the address of the one it replaces while that one drains: the kernel
/// spreads new connections over every socket bound so.
fn bind(addr: &str, reuse_port: bool) -> std::io::Result<TcpListener> {
    if !reuse_port {
        return TcpListener::bind(addr);
    }
    use std::net::ToSocketAddrs;
    let at = addr.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the address resolves to nothing",
        )
    })?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(at),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&at.into())?;
    socket.listen(ACCEPT_BACKLOG)?;
    Ok(socket.into())
}

/// Connects the shared state `state:` names, and says where it is (or that it is not there
/// yet: an outage at start is survived like any other).
fn start_shared(config: &Config) -> Option<Arc<Shared>> {
    let shared = crate::shared::open(config)?;
    let settings = config.state.as_ref()?;
    // A failure is logged where it happens; the probe finds Redis when it comes.
    if shared.ping().is_ok() {
        info!(
            "shared state: Redis at {} (keys {}:*)",
            settings.url, settings.prefix
        );
    }
    Some(shared)
}

/// The ledger's journal, shared by its flusher thread and the last flush before a graceful
/// exit.
type SharedJournal = Arc<Mutex<Journal>>;
/// The ledger and its journal.
type Opened = (Arc<Ledger>, SharedJournal);

/// Opens the usage ledger, or explains why usage is not recorded.
fn open_ledger(config: &Config, shared: Option<Arc<Shared>>) -> Result<Option<Opened>, StartError> {
    if !config.usage.enabled {
        return Ok(None);
    }
    match Ledger::open(&config.usage.dir, shared) {
        Ok((ledger, journal)) => Ok(Some((ledger, Arc::new(Mutex::new(journal))))),
        // A ledger that cannot be read never silently means "no budgets".
        Err(e) => Err(StartError::Ledger(e)),
    }
}

/// Serves requests on one connection until it closes, errs or stops being reusable. While the
/// server drains, the request in hand is answered with `connection: close` and an idle
/// connection is closed.
fn serve_connection(gw: &Gateway, stream: TcpStream, listener: Listener) {
    let _ = stream.set_nodelay(true);
    let limits = gw.live().limits;
    // A client that stops reading a response for this long is given up on.
    let _ = stream.set_write_timeout(Some(limits.body_timeout.max(Duration::from_secs(10))));
    let mut conn = Conn::new(stream);
    let registered = gw
        .connections
        .register(conn.socket(), listener == Listener::Main);
    let mut first = true;
    loop {
        // Between requests the connection is idle: a drain closes it, and so may a newcomer
        // needing its worker. One with a pipelined request already here is not idle. A
        // connection accepted before the drain still gets its first request answered.
        if !first && !conn.has_buffered() && !registered.idle() {
            break;
        }
        first = false;
        let limits = gw.live().limits;
        let read = conn.read_head(&limits);
        if !registered.busy() {
            break;
        }
        match read {
            Ok(mut req) => {
                if gw.connections.draining() {
                    req.keep_alive = false;
                }
                // A bug of ours costs this request, never the worker or its pool slot: the
                // client gets a 500 if nothing was sent yet, else the connection is closed.
                let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    router::handle(gw, req, &mut conn, listener)
                }));
                match handled {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(_) => {
                        gw.threads.connection_panicked();
                        if !conn.responded() {
                            let error = ApiError::Http {
                                status: 500,
                                message: "the gateway failed while serving this request; it was not retried".into(),
                            };
                            router::refuse_unread(gw, &mut conn, &error);
                            // A body left unread would make the close a reset that can
                            // destroy the answer before it is read.
                            conn.skip_arrived_body();
                            if conn.body_unread() {
                                conn.linger();
                            }
                        }
                        break;
                    }
                }
            }
            Err(e) => {
                if let Some((status, message)) = e.answer(limits.max_body) {
                    router::refuse_unread(gw, &mut conn, &ApiError::Http { status, message });
                    conn.linger();
                }
                break;
            }
        }
    }
}
