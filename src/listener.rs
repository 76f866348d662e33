//! The listener and its worker pool: one thread accepts; at most `workers` threads serve
//! connections, started on demand and retired after `server.worker_idle` (a minute by
//! default) idle, so an idle gateway stays small. When every worker is busy, connections wait
//! in a bounded queue; past that they get an immediate 503 with `retry-after` instead of
//! hanging. Accept errors (EMFILE under load) are logged and survived. `Workers::stop` ends the
//! accept loop for a graceful shutdown.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::supervise::Threads;

/// Idle workers beyond this many retire after `PoolSettings::idle_retire`.
const KEEP_IDLE: usize = 4;
// Worker stacks: serde_json caps nesting at 128, and TLS needs tens of KiB; 256 KiB of address
// space each, of which only touched pages cost memory (see `memory`).
use crate::memory::WORKER_STACK;

pub struct PoolSettings {
    pub workers: usize,
    pub queue: usize,
    /// How long a worker beyond `KEEP_IDLE` waits for a connection before its thread ends.
    pub idle_retire: Duration,
}

/// Worker counts, readable by status while the pool runs.
#[derive(Default)]
pub struct Workers {
    alive: AtomicUsize,
    busy: AtomicUsize,
    /// Connections accepted and waiting for a worker: in flight too, for a shutdown.
    queued: AtomicUsize,
    /// Set by `stop`: the accept loop returns at its next wake-up.
    stopping: AtomicBool,
}

impl Workers {
    /// Connections being served or waiting for a worker.
    pub fn in_flight(&self) -> usize {
        self.busy.load(Ordering::SeqCst) + self.queued.load(Ordering::SeqCst)
    }

    /// Ends the accept loop serving `listener` (a clone of the one `run` was given): no
    /// connection is accepted after this; those already accepted are still served.
    pub fn stop(&self, listener: &TcpListener) {
        self.stopping.store(true, Ordering::SeqCst);
        crate::sys::stop_listening(listener);
    }

    /// (busy, alive).
    pub fn counts(&self) -> (usize, usize) {
        (
            self.busy.load(Ordering::Relaxed),
            self.alive.load(Ordering::Relaxed),
        )
    }
}

/// Counts a worker as busy while it lives.
struct Busy<'a>(&'a Workers);

impl<'a> Busy<'a> {
    fn new(workers: &'a Workers) -> Busy<'a> {
        workers.busy.fetch_add(1, Ordering::SeqCst);
        Busy(workers)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

struct State {
    queue: VecDeque<TcpStream>,
    /// Workers waiting for a connection.
    idle: usize,
    /// Workers alive.
    total: usize,
    /// Workers retired since the heap was last trimmed.
    trim_pending: bool,
}

struct Pool {
    state: Mutex<State>,
    ready: Condvar,
    settings: PoolSettings,
    workers: Arc<Workers>,
    /// Asks one idle keep-alive connection to give its worker up; true when one did.
    reclaim: Box<dyn Fn() -> bool + Send + Sync>,
    /// Where a panic that escaped a connection's own containment is counted.
    threads: Arc<Threads>,
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker that panicked while holding the lock left the queue consistent (it only
        // pushes and pops), so the poison flag carries no information here.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Accepts connections until `Workers::stop`, handing each to `serve` on a worker thread.
/// When every worker is busy, `reclaim` is asked to close one idle keep-alive connection, whose
/// worker then takes the newcomer: an idle client never costs a new one its answer. The accept
/// loop runs under `threads` as `name`: a panic in it restarts it, with the pool as it was.
pub fn run<F, R>(
    listener: TcpListener,
    settings: PoolSettings,
    workers: Arc<Workers>,
    serve: F,
    reclaim: R,
    threads: &Arc<Threads>,
    name: &'static str,
) where
    F: Fn(TcpStream) + Send + Sync + 'static,
    R: Fn() -> bool + Send + Sync + 'static,
{
    let pool = Arc::new(Pool {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            idle: 0,
            total: 0,
            trim_pending: false,
        }),
        ready: Condvar::new(),
        settings,
        workers,
        reclaim: Box::new(reclaim),
        threads: Arc::clone(threads),
    });
    let serve = Arc::new(serve);
    threads.run_here(name, true, || accept(&listener, &pool, &serve, name));
}

fn accept<F>(listener: &TcpListener, pool: &Arc<Pool>, serve: &Arc<F>, name: &str)
where
    F: Fn(TcpStream) + Send + Sync + 'static,
{
    let mut last_error_log: Option<Instant> = None;
    loop {
        if pool.workers.stopping.load(Ordering::SeqCst) {
            return;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                crate::supervise::inject(name);
                dispatch(pool, serve, stream);
            }
            Err(_) if pool.workers.stopping.load(Ordering::SeqCst) => return,
            Err(e) => {
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted
                ) {
                    continue;
                }
                // Out of descriptors or memory: say so at most once a second, back off briefly
                // so the workers can release some, and keep accepting.
                if last_error_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    error!("accept failed: {e}; retrying");
                    last_error_log = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn dispatch<F>(pool: &Arc<Pool>, serve: &Arc<F>, stream: TcpStream)
where
    F: Fn(TcpStream) + Send + Sync + 'static,
{
    let mut state = pool.lock();
    if state.idle > state.queue.len() {
        state.queue.push_back(stream);
        pool.workers.queued.fetch_add(1, Ordering::SeqCst);
        drop(state);
        pool.ready.notify_one();
        return;
    }
    if state.total < pool.settings.workers {
        state.total += 1;
        // Counted busy from here, so a shutdown counting in-flight connections sees this one
        // before its thread runs; the worker adopts the count.
        pool.workers.busy.fetch_add(1, Ordering::SeqCst);
        drop(state);
        let (p, s) = (Arc::clone(pool), Arc::clone(serve));
        let spawned = std::thread::Builder::new()
            .name("worker".into())
            .stack_size(WORKER_STACK)
            .spawn(move || worker(&p, &*s, stream));
        if let Err(e) = spawned {
            pool.lock().total -= 1;
            pool.workers.busy.fetch_sub(1, Ordering::SeqCst);
            warn!("could not start a worker thread: {e}");
        }
        return;
    }
    // Every worker is busy. One held by an idle keep-alive connection is freed for this one
    // (the connection is closed, as a server may close any idle one); else it waits in the
    // queue, if there is room.
    drop(state);
    let reclaimed = (pool.reclaim)();
    let mut state = pool.lock();
    if reclaimed || state.queue.len() < pool.settings.queue {
        state.queue.push_back(stream);
        pool.workers.queued.fetch_add(1, Ordering::SeqCst);
        drop(state);
        pool.ready.notify_one();
        return;
    }
    let workers = state.total;
    drop(state);
    reject(stream, workers);
}

fn worker<F: Fn(TcpStream)>(pool: &Pool, serve: &F, first: TcpStream) {
    crate::memory::mark_top();
    pool.workers.alive.fetch_add(1, Ordering::Relaxed);
    {
        let _busy = Busy(&pool.workers);
        serve_contained(pool, serve, first);
    }
    loop {
        let mut state = pool.lock();
        let (stream, _busy) = loop {
            if let Some(stream) = state.queue.pop_front() {
                // Busy before no longer queued, so a shutdown never sees it in neither.
                let busy = Busy::new(&pool.workers);
                pool.workers.queued.fetch_sub(1, Ordering::SeqCst);
                break (stream, busy);
            }
            state.idle += 1;
            let (guard, wait) = pool
                .ready
                .wait_timeout(state, pool.settings.idle_retire)
                .unwrap_or_else(|p| p.into_inner());
            state = guard;
            state.idle -= 1;
            if !wait.timed_out() || !state.queue.is_empty() {
                continue;
            }
            if state.idle >= KEEP_IDLE {
                state.total -= 1;
                state.trim_pending = true;
                pool.workers.alive.fetch_sub(1, Ordering::Relaxed);
                return;
            }
            if state.trim_pending {
                // A kept worker, idle for a whole period after a wave of retirements: every
                // retiree has exited by now, so the heap their connections freed can go back
                // to the system, once per wave.
                state.trim_pending = false;
                drop(state);
                crate::sys::trim_heap();
                state = pool.lock();
            }
        };
        drop(state);
        serve_contained(pool, serve, stream);
    }
}

/// Serves one connection; a panic that escapes `serve` (which contains its own) ends only the
/// connection, never the worker, so the pool keeps its strength.
fn serve_contained<F: Fn(TcpStream)>(pool: &Pool, serve: &F, stream: TcpStream) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve(stream))).is_err() {
        pool.threads.connection_panicked();
    }
}

/// Answers 503 without a worker. The socket is fresh, so the tiny response fits its send
/// buffer and a non-blocking write never stalls the accept loop.
fn reject(mut stream: TcpStream, workers: usize) {
    let body = crate::error::anthropic_error_json(
        "overloaded_error",
        &format!("the gateway is at its limit of {workers} busy workers; retry shortly"),
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    if stream.set_nonblocking(true).is_ok() {
        let _ = stream.write_all(response.as_bytes());
        // Drain what the client already sent so closing does not reset the connection and
        // discard our answer before it is read.
        let mut sink = [0u8; 4096];
        while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
}
