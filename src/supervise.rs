//! The process survives its own faults. Every long-lived thread (the accept loops, the config
//! watcher, the refresher, the ledger flusher, the shared-state probe, the signal handler) runs
//! under `Threads`: a panic is caught, logged and counted, and the thread's work starts again
//! after a backoff that doubles while it keeps failing. A connection's panic is caught by its
//! worker (the client gets a 500 if nothing was sent yet) and counted here too.
//!
//! In debug builds (what `cargo test` builds) `inject` panics where the environment variable
//! `LLM_GATEWAY_PANIC` names: `point` panics every time, `point=N` the first N times, several
//! separated by commas. Release builds compile it to nothing.

use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The first restart's delay; each further one in a row doubles it, up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A run this long without a panic ends a series: the next panic starts the backoff over.
const STABLE: Duration = Duration::from_secs(60);
/// Panics in a row (each run shorter than `STABLE`) after which a thread is failing.
const FAILING_AFTER: u32 = 3;

/// One supervised thread's record.
struct Record {
    /// Whether its failing makes the instance unready.
    needed_for_ready: bool,
    panics: u64,
    /// Panics in a row, each after a run shorter than `STABLE`.
    in_a_row: u32,
    started: Instant,
    last_panic: Option<String>,
}

/// The supervised threads and the panic counts, for status, `/ready` and `/metrics`.
#[derive(Default)]
pub struct Threads {
    records: Mutex<BTreeMap<&'static str, Record>>,
    /// Panics while serving a connection.
    connection_panics: AtomicU64,
}

impl Threads {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Record>> {
        // Only whole records are inserted or updated under the lock.
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `work` on a thread of its own under supervision. `needed_for_ready`: whether
    /// `/ready` fails while the thread keeps dying.
    pub fn spawn(
        self: &Arc<Self>,
        name: &'static str,
        needed_for_ready: bool,
        work: impl Fn() + Send + 'static,
    ) -> std::io::Result<()> {
        let threads = Arc::clone(self);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || threads.run_here(name, needed_for_ready, work))
            .map(drop)
    }

    /// Runs `work` on this thread under supervision until it returns.
    pub fn run_here(&self, name: &'static str, needed_for_ready: bool, work: impl Fn()) {
        self.lock().insert(
            name,
            Record {
                needed_for_ready,
                panics: 0,
                in_a_row: 0,
                started: Instant::now(),
                last_panic: None,
            },
        );
        loop {
            let Err(payload) = panic::catch_unwind(AssertUnwindSafe(&work)) else {
                return;
            };
            // The panic hook logged where and why; this says what happens next.
            let backoff = self.panicked(name, &message(payload.as_ref()));
            warn!("thread {name} restarts in {} ms", backoff.as_millis());
            std::thread::sleep(backoff);
            if let Some(record) = self.lock().get_mut(name) {
                record.started = Instant::now();
            }
        }
    }

    /// Records a panic of `name` and returns the backoff before its restart.
    fn panicked(&self, name: &'static str, why: &str) -> Duration {
        let mut records = self.lock();
        let Some(record) = records.get_mut(name) else {
            return FIRST_BACKOFF;
        };
        record.panics += 1;
        record.in_a_row = if record.started.elapsed() >= STABLE {
            1
        } else {
            record.in_a_row.saturating_add(1)
        };
        record.last_panic = Some(why.to_string());
        let doublings = record.in_a_row.saturating_sub(1).min(16);
        (FIRST_BACKOFF * 2u32.pow(doublings)).min(MAX_BACKOFF)
    }

    /// Counts a panic while serving a connection.
    pub fn connection_panicked(&self) {
        self.connection_panics.fetch_add(1, Ordering::Relaxed);
        warn!("the connection whose request panicked is closed; its worker serves on");
    }

    /// The threads that keep dying and are needed for `/ready`.
    pub fn failing_for_ready(&self) -> Vec<&'static str> {
        (self.lock().iter())
            .filter(|(_, r)| r.needed_for_ready && failing(r))
            .map(|(name, _)| *name)
            .collect()
    }

    /// Each thread's state, for status.
    pub fn view(&self) -> Value {
        let threads: serde_json::Map<String, Value> = (self.lock().iter())
            .map(|(name, r)| {
                let state = if failing(r) { "failing" } else { "running" };
                (
                    name.to_string(),
                    json!({"state": state, "panics": r.panics, "last_panic": r.last_panic}),
                )
            })
            .collect();
        json!({
            "threads": threads,
            "connection_panics": self.connection_panics.load(Ordering::Relaxed),
        })
    }

    /// `llm_gateway_panics_total`, by thread (`connection` for a connection's worker).
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        out.push_str("# HELP llm_gateway_panics_total Panics caught, by thread (connection: a worker serving one); each thread was restarted.\n# TYPE llm_gateway_panics_total counter\n");
        let _ = writeln!(
            out,
            "llm_gateway_panics_total{{thread=\"connection\"}} {}",
            self.connection_panics.load(Ordering::Relaxed)
        );
        for (name, r) in self.lock().iter() {
            let _ = writeln!(
                out,
                "llm_gateway_panics_total{{thread=\"{name}\"}} {}",
                r.panics
            );
        }
    }
}

/// Whether a thread keeps dying: several panics in a row, the last run not yet stable.
fn failing(r: &Record) -> bool {
    r.in_a_row >= FAILING_AFTER && r.started.elapsed() < STABLE
}

/// A panic's message, when it is text.
pub fn message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Panics here if `LLM_GATEWAY_PANIC` names `point` (debug builds only).
#[cfg(debug_assertions)]
pub fn inject(point: &str) {
    use std::sync::OnceLock;
    /// Each point's remaining panics (`None`: every time).
    static PLAN: OnceLock<Mutex<BTreeMap<String, Option<u64>>>> = OnceLock::new();
    let plan = PLAN.get_or_init(|| {
        let spec = std::env::var("LLM_GATEWAY_PANIC").unwrap_or_default();
        let points = (spec.split(','))
            .filter(|p| !p.trim().is_empty())
            .map(|p| match p.split_once('=') {
                Some((name, n)) => (name.trim().to_string(), n.trim().parse().ok()),
                None => (p.trim().to_string(), None),
            })
            .collect();
        Mutex::new(points)
    });
    let fire = {
        let mut plan = plan.lock().unwrap_or_else(|p| p.into_inner());
        match plan.get_mut(point) {
            None | Some(Some(0)) => false,
            Some(None) => true,
            Some(Some(left)) => {
                *left -= 1;
                true
            }
        }
    };
    if fire {
        panic!("injected at {point} (LLM_GATEWAY_PANIC)");
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn inject(_point: &str) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_thread_is_restarted_and_marked_failing_while_it_keeps_dying() {
        let threads = Arc::new(Threads::default());
        let runs = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&runs);
        // Panics three times, then returns: the supervisor returns too.
        threads.run_here("flaky", true, move || {
            if counted.fetch_add(1, Ordering::SeqCst) < 3 {
                panic!("boom");
            }
        });
        assert_eq!(runs.load(Ordering::SeqCst), 4);
        assert_eq!(threads.failing_for_ready(), ["flaky"], "three in a row");
        let view = threads.view();
        assert_eq!(view["threads"]["flaky"]["panics"], 3);
        assert_eq!(view["threads"]["flaky"]["last_panic"], "boom");
        let mut metrics = String::new();
        threads.render(&mut metrics);
        assert!(
            metrics.contains("llm_gateway_panics_total{thread=\"flaky\"} 3"),
            "{metrics}"
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let threads = Threads::default();
        threads.lock().insert(
            "t",
            Record {
                needed_for_ready: false,
                panics: 0,
                in_a_row: 0,
                started: Instant::now(),
                last_panic: None,
            },
        );
        let delays: Vec<u128> = (0..12)
            .map(|_| threads.panicked("t", "x").as_millis())
            .collect();
        assert_eq!(&delays[..4], [100, 200, 400, 800]);
        assert_eq!(*delays.last().expect("some"), 30_000);
        assert!(
            threads.failing_for_ready().is_empty(),
            "not needed for ready"
        );
    }
}
