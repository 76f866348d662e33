//! Waiting for an account's slot: `max_concurrent` requests at once per account, the rest
//! in a bounded FIFO queue per account (`Ticket`), woken when a slot frees (`Freed`); with
//! Redis, the slots are leases every instance counts (`Entry::lease_slot`), renewed while
//! held.

use super::*;

/// What every entry of the list shares.
#[derive(Default)]
pub(super) struct Common {
    pub(super) freed: Freed,
    pub(super) shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for Common {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Common")
            .field("freed", &self.freed)
            .finish_non_exhaustive()
    }
}

/// A count of slots freed, and the condition that wakes those waiting for one.
#[derive(Debug, Default)]
pub(super) struct Freed {
    ended: Mutex<u64>,
    wake: std::sync::Condvar,
}

impl Freed {
    pub(super) fn tell(&self) {
        *self.ended.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.wake.notify_all();
    }
}

/// A request's place in an account's queue; leaving it (served elsewhere, timed out, the
/// client gone) frees the place.
pub struct Ticket {
    entry: Arc<Entry>,
    pub number: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.entry.lock_queue().retain(|n| *n != self.number);
        // The next in line may now take a slot that was free.
        self.entry.common.freed.tell();
    }
}

/// A request's place in a queue, and until when it may wait.
pub struct Queued {
    ticket: Ticket,
    pub(super) until: Instant,
}

impl Queued {
    pub fn number(&self) -> u64 {
        self.ticket.number
    }
}

/// Why a wait for a slot ended without one: the client gets a 429 (`retry-after: 1`), or
/// nothing when it left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueEnd {
    /// `balance.queue_size` requests wait already: the account's name.
    Full(String),
    /// `balance.queue_timeout` passed.
    TimedOut(String),
    ClientLeft,
}

impl Accounts {
    /// The account whose queue a request waits in when every account that could serve it
    /// has its slots taken: its sticky pin's, else the best tier's shortest queue.
    pub(super) fn queue_for(
        &self,
        full: &[&Arc<Entry>],
        sticky: Option<u64>,
        view: Option<&crate::shared::View>,
        now: Instant,
    ) -> Option<Arc<Entry>> {
        let pinned = match view {
            Some(view) => view.pin.clone(),
            None => sticky
                .zip(self.sticky.as_ref())
                .and_then(|(key, pins)| pins.find(key, now, |id| Some(id.to_string()))),
        };
        if let Some(e) = full.iter().find(|e| pinned.as_deref() == Some(e.id())) {
            return Some(Arc::clone(e));
        }
        let best = full.iter().map(|e| e.account.priority).min()?;
        (full.iter())
            .filter(|e| e.account.priority == best)
            .min_by_key(|e| e.queued())
            .map(|e| Arc::clone(e))
    }

    /// Joins `entry`'s queue, unless `queue_size` requests wait there already.
    pub fn join_queue(&self, entry: &Arc<Entry>) -> Option<Ticket> {
        let mut queue = entry.lock_queue();
        if queue.len() >= self.settings().queue_size {
            return None;
        }
        let number = self.tickets.fetch_add(1, Ordering::Relaxed);
        queue.push_back(number);
        Some(Ticket {
            entry: Arc::clone(entry),
            number,
        })
    }

    /// Keeps this instance's account slots in Redis alive (the `shared-state` thread, every
    /// few seconds): a slot not renewed, because its instance died, frees itself.
    pub fn renew_leases(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        let held: Vec<(String, String)> = (self.snapshot().iter())
            .flat_map(|e| {
                let key = e.lease_key();
                e.lock_leases()
                    .iter()
                    .map(|lease| (key.clone(), lease.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        if !held.is_empty() {
            let _ = shared.renew(&held);
        }
    }

    /// How many picks have ended so far: what `wait_freed` waits to change.
    pub fn ended(&self) -> u64 {
        *self
            .common
            .freed
            .ended
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until a pick ends after `seen` (`ended`), or `slice` passes.
    pub fn wait_freed(&self, seen: u64, slice: Duration) {
        let ended = self
            .common
            .freed
            .ended
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let _ = (self.common.freed.wake).wait_timeout_while(ended, slice, |n| *n == seen);
    }

    /// Waits in `entry`'s queue (joined on the first call, and again when the queue to wait in
    /// changed) until a slot may be free: a pick ended after `seen` (read before the pick that
    /// found every slot taken, so a slot freed in between is not missed), or (with Redis, where
    /// other instances tell no one) a quarter second passed. The whole wait is bounded by
    /// `balance.queue_timeout`, from the first call; `client_left` is asked each slice.
    pub fn wait(
        &self,
        entry: &Arc<Entry>,
        queued: &mut Option<Queued>,
        seen: u64,
        client_left: impl Fn() -> bool,
    ) -> Result<(), QueueEnd> {
        let name = || format!("{} ({})", entry.id(), entry.account.name);
        let moved = queued.take_if(|q| !Arc::ptr_eq(&q.ticket.entry, entry));
        if queued.is_none() {
            // A place in another account's queue goes before this one is taken.
            let until = moved.map(|q| q.until);
            let ticket = self
                .join_queue(entry)
                .ok_or_else(|| QueueEnd::Full(name()))?;
            debug!("account {}: request queued ({})", entry.id(), ticket.number);
            let until = until.unwrap_or_else(|| Instant::now() + self.settings().queue_timeout);
            *queued = Some(Queued { ticket, until });
        }
        let until = queued.as_ref().map_or_else(Instant::now, |q| q.until);
        loop {
            if client_left() {
                *queued = None;
                return Err(QueueEnd::ClientLeft);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                *queued = None;
                return Err(QueueEnd::TimedOut(name()));
            }
            self.wait_freed(seen, left.min(Duration::from_millis(250)));
            if self.ended() != seen || self.shared.is_some() {
                return Ok(());
            }
        }
    }
}
