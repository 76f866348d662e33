//! Per-key limits, checked before a request goes upstream: the model allow-list, requests per
//! minute (a sliding window, exact), concurrent requests, and daily and monthly token budgets
//! (read from the usage ledger, so they hold across restarts). Each refusal says which limit
//! and, for the 429s, when to retry. With shared state the minute window, the concurrent
//! slots and the budgets count every instance's requests (in Redis); while Redis is down each
//! instance enforces them on its own requests.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::Client;
use crate::config::KeyLimits;
use crate::ledger::Ledger;
use crate::shared::Shared;
use crate::usage::Spend;

mod budgets;

use budgets::Spent;
pub use budgets::{Estimate, Left};

/// Why a gateway key's own limits refuse a request: the limits boundary's error.
/// `ApiError::from` says what each is to the client (429 with its retry, or 403).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A budget is spent, or reserved by requests in flight; `retry_after` is its reset (none
    /// for a total budget, which does not reset).
    Budget {
        message: String,
        retry_after: Option<u64>,
    },
    /// Requests per minute; the oldest of the minute leaves it in `retry_after` seconds.
    Rate { rpm: u32, retry_after: u64 },
    /// Requests at once.
    Concurrency { max: u32 },
    /// A model outside the key's allow-list.
    Model { model: String, allowed: Vec<String> },
    /// A key with a USD budget asked for a model no price row matches.
    Unpriced { model: String },
}

#[derive(Default)]
struct KeyState {
    /// Start times of the requests of the last minute, oldest first.
    recent: VecDeque<Instant>,
    in_flight: u32,
    /// Tickets of its requests waiting for a slot (its `queue`), oldest first.
    waiting: VecDeque<u64>,
    /// What the key's requests in flight may still cost (`Limiter::reserve`).
    reserved: Spend,
    /// Its requests polling Redis for a slot another instance may free: at most its `queue`.
    polling: u32,
}

#[derive(Default)]
pub struct Limiter {
    keys: Mutex<HashMap<String, KeyState>>,
    shared: Option<Arc<Shared>>,
    /// This instance's slots in Redis (slot → key), renewed while held.
    slots: Mutex<HashMap<String, String>>,
    /// This instance's budget reservations in Redis (member → key), renewed while held.
    reservations: Mutex<HashMap<String, String>>,
    /// Told when a key's request ends: what requests in its queue wait on.
    freed: std::sync::Condvar,
    /// Numbers the requests that join a queue.
    tickets: std::sync::atomic::AtomicU64,
}

/// How long a queued request waits between looks at its client.
const QUEUE_SLICE: Duration = Duration::from_millis(250);

/// A key at its concurrency limit waits this long for a slot before the 429, in steps: the
/// client that just got its answer may be a moment ahead of the slot's release.
const SLOT_GRACE_STEP: Duration = Duration::from_millis(10);
const SLOT_GRACE_STEPS: u32 = 5;

/// A request admitted under a key's concurrency limit; releases its slot when dropped.
pub struct Permit {
    limiter: Arc<Limiter>,
    /// `None` for a key without limits (boxed: a permit travels with every answer).
    held: Option<Box<Held>>,
}

struct Held {
    key: String,
    /// The slot taken in Redis, when the concurrency limit is shared.
    slot: Option<String>,
    /// What is reserved against the key's budgets until the answer is metered: here, or in
    /// Redis under this name.
    reserved: Spend,
    shared_reservation: Option<String>,
    /// What the request was estimated to cost when it was admitted (whether held here or in
    /// Redis): what a request cut short is charged at least.
    estimated: Option<Charge>,
}

/// What a request cut short is charged at least: its tokens, and its nano-USD when its model
/// is priced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Charge {
    pub tokens: u64,
    pub nano: Option<u64>,
}

impl Permit {
    /// What the request was estimated to cost, if it was reserved against budgets.
    pub fn estimated(&self) -> Option<Charge> {
        self.held.as_ref().and_then(|h| h.estimated)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(held) = &self.held {
            let key = &held.key;
            if let (Some(slot), Some(shared)) = (&held.slot, &self.limiter.shared) {
                self.limiter.lock_slots().remove(slot);
                shared.release(key, slot);
            }
            if let (Some(member), Some(shared)) = (&held.shared_reservation, &self.limiter.shared) {
                lock(&self.limiter.reservations).remove(member);
                shared.unreserve(key, member);
            }
            let mut keys = self.limiter.keys.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(state) = keys.get_mut(key) {
                state.in_flight = state.in_flight.saturating_sub(1);
                state.reserved.tokens = state.reserved.tokens.saturating_sub(held.reserved.tokens);
                state.reserved.nano = state.reserved.nano.saturating_sub(held.reserved.nano);
                if !state.waiting.is_empty() {
                    self.limiter.freed.notify_all();
                }
            }
        }
    }
}

impl Limiter {
    pub fn new(shared: Option<Arc<Shared>>) -> Limiter {
        Limiter {
            keys: Mutex::default(),
            shared,
            slots: Mutex::default(),
            reservations: Mutex::default(),
            freed: std::sync::Condvar::new(),
            tickets: Default::default(),
        }
    }

    /// Whether `client` may use `model` (its allow-list), once the body has named it.
    pub fn allow_model(client: &Client, model: Option<&str>) -> Result<(), Refusal> {
        let Some(limits) = client.limits.as_ref().filter(|l| !l.models.is_empty()) else {
            return Ok(());
        };
        let model = model.unwrap_or("");
        if limits.models.iter().any(|m| m == model) {
            return Ok(());
        }
        Err(Refusal::Model {
            model: model.to_string(),
            allowed: limits.models.clone(),
        })
    }

    /// Admits `client` under its budgets, rate and concurrency, or says which limit refuses
    /// it: all of it from the head, before the body is read. A key with a `queue` waits for a
    /// slot, in arrival order, up to `queue_timeout`.
    pub fn admit(
        self: &Arc<Self>,
        client: &Client,
        ledger: Option<&Ledger>,
        queue_timeout: Duration,
    ) -> Result<Permit, Refusal> {
        let deadline = Instant::now() + queue_timeout;
        let Some(limits) = &client.limits else {
            return Ok(Permit {
                limiter: Arc::clone(self),
                held: None,
            });
        };
        if let Some(ledger) = ledger {
            let reserved = self.reserved(&client.id);
            Spent::read(limits, &client.id, ledger).check(limits, reserved)?;
        }
        let slot = self.take_shared(client, limits, deadline)?;
        if let Err(refusal) = self.take_local(client, limits, slot.is_some(), deadline) {
            if let (Some(slot), Some(shared)) = (&slot, &self.shared) {
                shared.release(&client.id, slot);
            }
            return Err(refusal);
        }
        if let Some(slot) = &slot {
            self.lock_slots().insert(slot.clone(), client.id.clone());
        }
        Ok(Permit {
            limiter: Arc::clone(self),
            held: Some(Box::new(Held {
                key: client.id.clone(),
                slot,
                reserved: Spend::default(),
                shared_reservation: None,
                estimated: None,
            })),
        })
    }

    /// With shared state, the counts of every instance: a concurrency slot (waiting the short
    /// grace for one) and the minute window. While Redis is down, nothing is taken here and
    /// the local count decides.
    fn take_shared(
        &self,
        client: &Client,
        limits: &KeyLimits,
        deadline: Instant,
    ) -> Result<Option<String>, Refusal> {
        let Some(shared) = &self.shared else {
            return Ok(None);
        };
        let mut slot = None;
        // This request's place among the key's pollers, given back however the wait ends.
        let mut polling: Option<Polling<'_>> = None;
        if let Some(max) = limits.max_concurrent {
            let mut waited = 0;
            loop {
                match shared.acquire(&client.id, max) {
                    Ok(None) if waited < SLOT_GRACE_STEPS => {
                        std::thread::sleep(SLOT_GRACE_STEP);
                        waited += 1;
                    }
                    // A key with a queue waits on, as many at once as its queue holds: slots
                    // other instances hold free in time.
                    Ok(None)
                        if Instant::now() < deadline
                            && !crate::watch::client_left()
                            && (polling.is_some()
                                || self.start_polling(client, limits, &mut polling)) =>
                    {
                        std::thread::sleep(SLOT_GRACE_STEP * 10);
                    }
                    Ok(None) => return Err(Refusal::Concurrency { max }),
                    Ok(taken) => break slot = taken,
                    Err(_) => break,
                }
            }
        }
        if let Some(rpm) = limits.rpm
            && let Ok(Some(wait)) = shared.rpm(&client.id, rpm)
        {
            if let Some(slot) = slot {
                shared.release(&client.id, &slot);
            }
            return Err(Refusal::Rate {
                rpm,
                retry_after: crate::accounts::ceil_secs(wait).max(1),
            });
        }
        Ok(slot)
    }

    /// Takes a place among `client`'s requests polling Redis for a slot, if its queue has one.
    fn start_polling<'a>(
        &'a self,
        client: &Client,
        limits: &KeyLimits,
        polling: &mut Option<Polling<'a>>,
    ) -> bool {
        let Some(queue) = limits.queue else {
            return false;
        };
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let state = keys.entry(client.id.clone()).or_default();
        if state.polling >= queue {
            return false;
        }
        state.polling += 1;
        *polling = Some(Polling {
            limiter: self,
            key: client.id.clone(),
        });
        true
    }

    /// This instance's counts: the minute window while Redis does not keep it, and requests
    /// at once unless a shared slot was taken (waiting the short grace for one to free).
    fn take_local(
        &self,
        client: &Client,
        limits: &KeyLimits,
        has_slot: bool,
        deadline: Instant,
    ) -> Result<(), Refusal> {
        let shared_up = self.shared_up();
        let mut waited = 0;
        let mut ticket: Option<u64> = None;
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let now = Instant::now();
            let state = keys.entry(client.id.clone()).or_default();
            if let Some(rpm) = limits.rpm.filter(|_| !shared_up) {
                let minute = Duration::from_secs(60);
                while (state.recent.front()).is_some_and(|t| now.duration_since(*t) >= minute) {
                    state.recent.pop_front();
                }
                if state.recent.len() >= rpm as usize {
                    if let Some(t) = ticket {
                        state.waiting.retain(|n| *n != t);
                        self.freed.notify_all();
                    }
                    let oldest = state.recent.front().copied().unwrap_or(now);
                    let wait = minute.saturating_sub(now.duration_since(oldest));
                    return Err(Refusal::Rate {
                        rpm,
                        retry_after: crate::accounts::ceil_secs(wait).max(1),
                    });
                }
            }
            let ahead = state.waiting.front().is_some_and(|t| Some(*t) != ticket);
            if let Some(max) = limits.max_concurrent
                && !has_slot
                && (state.in_flight >= max || ahead)
            {
                if let Some(size) = limits.queue {
                    // In line: the first waiting takes the next slot; the others wait on.
                    let left = deadline.saturating_duration_since(now);
                    let joined = match ticket {
                        Some(_) => true,
                        None if state.waiting.len() < size as usize => {
                            let n = self.tickets.fetch_add(1, Ordering::Relaxed);
                            state.waiting.push_back(n);
                            ticket = Some(n);
                            true
                        }
                        None => false,
                    };
                    if joined && !left.is_zero() && !crate::watch::client_left() {
                        keys = match self.freed.wait_timeout(keys, left.min(QUEUE_SLICE)) {
                            Ok((guard, _)) => guard,
                            Err(p) => p.into_inner().0,
                        };
                        continue;
                    }
                    if let Some(t) = ticket {
                        state.waiting.retain(|n| *n != t);
                        self.freed.notify_all();
                    }
                    return Err(Refusal::Concurrency { max });
                }
                drop(keys);
                if waited < SLOT_GRACE_STEPS {
                    std::thread::sleep(SLOT_GRACE_STEP);
                    waited += 1;
                    keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
                    continue;
                }
                return Err(Refusal::Concurrency { max });
            }
            if let Some(t) = ticket {
                state.waiting.retain(|n| *n != t);
                // The next in line may take a slot still free.
                self.freed.notify_all();
            }
            if limits.rpm.is_some() {
                state.recent.push_back(now);
            }
            state.in_flight += 1;
            return Ok(());
        }
    }

    /// What the key's requests in flight have reserved.
    fn reserved(&self, key: &str) -> Spend {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.get(key).map_or_else(Spend::default, |s| s.reserved)
    }

    /// What is left of each of `client`'s budgets, as the ledger says now.
    pub fn budgets_left(client: &Client, ledger: &Ledger) -> Vec<Left> {
        client.limits.as_ref().map_or_else(Vec::new, |limits| {
            Spent::read(limits, &client.id, ledger).report(limits)
        })
    }

    /// Reserves what an admitted request may cost (`estimate`: input estimated from its body,
    /// output up to its `max_tokens`, priced from the table) against its key's budgets, until
    /// `permit` is dropped after the answer is metered. Refused when what is spent plus what
    /// requests in flight reserved already reaches a budget: parallel requests overshoot by
    /// one request at most. A key with a USD budget may not use a model the table cannot
    /// price.
    pub fn reserve(
        &self,
        permit: &mut Permit,
        client: &Client,
        estimate: Estimate<'_>,
        ledger: Option<&Ledger>,
    ) -> Result<(), Refusal> {
        // Refused only for what others hold: the request before this one, whose answer this
        // client may already have read, is a moment from giving its reservation back, so it
        // gets the concurrency slots' short grace.
        let mut waited = 0;
        loop {
            match self.reserve_once(permit, client, estimate, ledger) {
                Err((_, true)) if waited < SLOT_GRACE_STEPS => {
                    std::thread::sleep(SLOT_GRACE_STEP);
                    waited += 1;
                }
                Err((refusal, _)) => return Err(refusal),
                Ok(()) => return Ok(()),
            }
        }
    }

    /// One try of `reserve`; a refusal says whether only others' reservations caused it.
    fn reserve_once(
        &self,
        permit: &mut Permit,
        client: &Client,
        estimate: Estimate<'_>,
        ledger: Option<&Ledger>,
    ) -> Result<(), (Refusal, bool)> {
        let (Some(limits), Some(ledger), Some(held)) = (&client.limits, ledger, &mut permit.held)
        else {
            return Ok(());
        };
        if limits.budgets().next().is_none() {
            return Ok(());
        }
        let usd = limits.has_usd_budget();
        held.estimated = Some(Charge {
            tokens: estimate.tokens,
            nano: estimate.nano,
        });
        let estimate = Spend {
            tokens: estimate.tokens,
            // Dollars are reserved only against dollar budgets (old instances read a
            // reservation's tokens alone).
            nano: match estimate.nano {
                Some(nano) if usd => nano,
                Some(_) => 0,
                None if usd => {
                    let model = estimate.model.unwrap_or("").to_string();
                    return Err((Refusal::Unpriced { model }, false));
                }
                None => 0,
            },
        };
        // With shared state the reservations are every instance's, checked and taken in one
        // script; while Redis is down this instance reserves on its own. (A request another
        // instance settled in the last flush interval may be in neither count: the window
        // README names.)
        if let Some(shared) = self.shared.as_ref().filter(|_| self.shared_up()) {
            let spent = Spent::read(limits, &client.id, ledger);
            match shared.reserve(&client.id, spent.left(limits), estimate) {
                Ok(Ok(member)) => {
                    lock(&self.reservations).insert(member.clone(), client.id.clone());
                    held.shared_reservation = Some(member);
                    return Ok(());
                }
                Ok(Err(reserved)) => {
                    // The script saw a reservation sum reach what is left: refuse saying as
                    // much (at the edge, where Lua's doubles round, as the sum at the limit).
                    let by_others = reserved != Spend::default()
                        && spent.check(limits, Spend::default()).is_ok();
                    let left = spent.left(limits);
                    let at_edge = Spend {
                        tokens: reserved.tokens.max(left.tokens),
                        nano: reserved.nano.max(left.nano),
                    };
                    let refusal = spent
                        .check(limits, reserved)
                        .and_then(|()| spent.check(limits, at_edge));
                    return refusal.map_err(|e| (e, by_others));
                }
                Err(_) => {}
            }
        }
        // Spent is read under the lock, so no request settles (recorded, then its
        // reservation given back) between reading the one and the other.
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let spent = Spent::read(limits, &client.id, ledger);
        let state = keys.entry(client.id.clone()).or_default();
        if let Err(refusal) = spent.check(limits, state.reserved) {
            let by_others =
                state.reserved != Spend::default() && spent.check(limits, Spend::default()).is_ok();
            return Err((refusal, by_others));
        }
        state.reserved.add(estimate);
        held.reserved = estimate;
        Ok(())
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        lock(&self.slots)
    }

    /// Keeps this instance's shared concurrency slots alive (the `shared-state` thread, every
    /// few seconds): a slot not renewed, because its instance died, frees itself.
    pub fn renew_slots(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        let slots: Vec<(String, String)> = self
            .lock_slots()
            .iter()
            .map(|(slot, key)| (key.clone(), slot.clone()))
            .collect();
        if !slots.is_empty() {
            let _ = shared.renew(&slots);
        }
        let held: Vec<(String, String)> = lock(&self.reservations)
            .iter()
            .map(|(member, key)| (key.clone(), member.clone()))
            .collect();
        if !held.is_empty() {
            let _ = shared.renew_reservations(&held);
        }
    }

    /// Whether Redis counts for every instance now (else this instance counts alone).
    fn shared_up(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| s.outage().is_none())
    }
}

/// A request's place among its key's pollers for a shared slot.
struct Polling<'a> {
    limiter: &'a Limiter,
    key: String,
}

impl Drop for Polling<'_> {
    fn drop(&mut self) {
        let mut keys = self.limiter.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(state) = keys.get_mut(&self.key) {
            state.polling = state.polling.saturating_sub(1);
        }
    }
}

/// A map of names, consistent after every insert or remove: poison carries no news.
fn lock(
    map: &Mutex<HashMap<String, String>>,
) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
    map.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeyLimits;

    fn client(limits: KeyLimits) -> Client {
        Client {
            id: "ck_1".into(),
            name: "alice".into(),
            admin: false,
            limits: Some(Arc::new(limits)),
        }
    }

    #[test]
    fn rpm_is_a_sliding_window() {
        let limiter = Arc::new(Limiter::default());
        let c = client(KeyLimits {
            rpm: Some(2),
            ..KeyLimits::default()
        });
        let a = limiter.admit(&c, None, Duration::ZERO).expect("first");
        let b = limiter.admit(&c, None, Duration::ZERO).expect("second");
        drop((a, b));
        let err = limiter
            .admit(&c, None, Duration::ZERO)
            .err()
            .expect("third in the minute");
        assert!(
            matches!(
                err,
                Refusal::Rate {
                    rpm: 2,
                    retry_after: 59..=60
                }
            ),
            "{err:?}"
        );
        let err = crate::error::ApiError::from(err);
        assert_eq!(
            (err.status(), err.retry_after().map(|s| s >= 59)),
            (429, Some(true))
        );
    }

    #[test]
    fn concurrency_is_released_with_the_permit() {
        let limiter = Arc::new(Limiter::default());
        let c = client(KeyLimits {
            max_concurrent: Some(1),
            ..KeyLimits::default()
        });
        let held = limiter.admit(&c, None, Duration::ZERO).expect("first");
        assert_eq!(
            limiter.admit(&c, None, Duration::ZERO).err(),
            Some(Refusal::Concurrency { max: 1 })
        );
        drop(held);
        assert!(limiter.admit(&c, None, Duration::ZERO).is_ok());
    }

    #[test]
    fn models_outside_the_list_are_forbidden() {
        let c = client(KeyLimits {
            models: vec!["claude-haiku".into()],
            ..KeyLimits::default()
        });
        assert!(Limiter::allow_model(&c, Some("claude-haiku")).is_ok());
        let err = Limiter::allow_model(&c, Some("claude-opus")).expect_err("forbidden");
        assert_eq!(crate::error::ApiError::from(err).status(), 403);
        assert!(Limiter::allow_model(&c, None).is_err());
        assert!(Limiter::allow_model(&client(KeyLimits::default()), Some("x")).is_ok());
    }

    #[test]
    fn month_boundaries() {
        // 2026-11-26 07:04 UTC: the month began 2026-11-01, the next begins 2026-12-01.
        let (first, next) = crate::usage::first_day_of_month(1_795_676_640);
        assert_eq!(crate::time::rfc3339(first * 86_400), "2026-11-01T00:00:00Z");
        assert_eq!(crate::time::rfc3339(next * 86_400), "2026-12-01T00:00:00Z");
    }

    #[test]
    fn a_key_with_a_queue_waits_for_its_slot_in_arrival_order() {
        let limiter = Arc::new(Limiter::default());
        let c = client(KeyLimits {
            max_concurrent: Some(1),
            queue: Some(2),
            ..KeyLimits::default()
        });
        let held = limiter.admit(&c, None, Duration::ZERO).expect("the slot");
        let order = Arc::new(Mutex::new(Vec::new()));
        std::thread::scope(|s| {
            let waiters: Vec<_> = (1..=2)
                .map(|n| {
                    let (limiter, c, order) = (&limiter, &c, &order);
                    let w = s.spawn(move || {
                        let permit = limiter.admit(c, None, Duration::from_secs(10));
                        order.lock().expect("order").push(n);
                        permit.map(drop)
                    });
                    // The next arrives once this one waits.
                    while limiter.keys.lock().expect("keys")["ck_1"].waiting.len() < n {
                        std::thread::yield_now();
                    }
                    w
                })
                .collect();
            let full = limiter.admit(&c, None, Duration::from_secs(10));
            assert_eq!(
                full.err(),
                Some(Refusal::Concurrency { max: 1 }),
                "the queue is full"
            );
            drop(held);
            for w in waiters {
                assert!(w.join().expect("waiter").is_ok());
            }
        });
        assert_eq!(*order.lock().expect("order"), [1, 2]);
        let late = limiter
            .admit(&c, None, Duration::from_millis(50))
            .expect("free again");
        let timed_out = limiter.admit(&c, None, Duration::from_millis(50));
        assert_eq!(timed_out.err(), Some(Refusal::Concurrency { max: 1 }));
        drop(late);
        assert!(
            limiter.keys.lock().expect("keys")["ck_1"]
                .waiting
                .is_empty()
        );
    }
}
