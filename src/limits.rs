//! Per-key limits, checked before a request goes upstream: the model allow-list, requests per
//! minute (a sliding window, exact), concurrent requests, and daily and monthly token budgets
//! (read from the usage ledger, so they hold across restarts). Each refusal says which limit
//! and, for the 429s, when to retry. With shared state the minute window, the concurrent
//! slots and the budgets count every instance's requests (in Redis); while Redis is down each
//! instance enforces them on its own requests.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::Client;
use crate::error::ApiError;
use crate::ledger::Ledger;
use crate::shared::Shared;

#[derive(Default)]
struct KeyState {
    /// Start times of the requests of the last minute, oldest first.
    recent: VecDeque<Instant>,
    in_flight: u32,
}

#[derive(Default)]
pub struct Limiter {
    keys: Mutex<HashMap<String, KeyState>>,
    shared: Option<Arc<Shared>>,
    /// This instance's slots in Redis (slot → key), renewed while held.
    slots: Mutex<HashMap<String, String>>,
}

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
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(held) = &self.held {
            let key = &held.key;
            if let (Some(slot), Some(shared)) = (&held.slot, &self.limiter.shared) {
                self.limiter.lock_slots().remove(slot);
                shared.release(key, slot);
            }
            let mut keys = self.limiter.keys.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(state) = keys.get_mut(key) {
                state.in_flight = state.in_flight.saturating_sub(1);
            }
        }
    }
}

/// Seconds from `now` (Unix) to the next UTC midnight, and to the first of next month.
fn until_next_day(now: u64) -> u64 {
    86_400 - now % 86_400
}

fn first_day_of_month(now: u64) -> (u64, u64) {
    let today = now / 86_400;
    let date = crate::time::rfc3339(now);
    let day_of_month: u64 = date[8..10].parse().unwrap_or(1);
    let first = today + 1 - day_of_month;
    // The first of next month: 28 days on, then forward to the next day numbered 1.
    let mut next = first + 28;
    while crate::time::rfc3339(next * 86_400)[8..10] != *"01" {
        next += 1;
    }
    (first, next)
}

impl Limiter {
    pub fn new(shared: Option<Arc<Shared>>) -> Limiter {
        Limiter {
            keys: Mutex::default(),
            shared,
            slots: Mutex::default(),
        }
    }

    /// Whether `client` may use `model` (its allow-list), once the body has named it.
    pub fn allow_model(client: &Client, model: Option<&str>) -> Result<(), ApiError> {
        let Some(limits) = client.limits.as_ref().filter(|l| !l.models.is_empty()) else {
            return Ok(());
        };
        let model = model.unwrap_or("");
        if limits.models.iter().any(|m| m == model) {
            return Ok(());
        }
        Err(ApiError::Forbidden(format!(
            "this gateway key may not use model {model:?}; allowed: {}",
            limits.models.join(", ")
        )))
    }

    /// Admits `client` now under its budgets, rate and concurrency, or says which limit
    /// refuses it: all of it from the head, before the body is read.
    pub fn admit(
        self: &Arc<Self>,
        client: &Client,
        ledger: Option<&Ledger>,
    ) -> Result<Permit, ApiError> {
        let Some(limits) = &client.limits else {
            return Ok(Permit {
                limiter: Arc::clone(self),
                held: None,
            });
        };
        let now_unix = crate::time::now_unix();
        if let Some(ledger) = ledger {
            let today = now_unix / 86_400;
            if let Some(budget) = limits.daily_tokens {
                let used = ledger.tokens_since(&client.id, today);
                if used >= budget {
                    return Err(ApiError::RateLimited {
                        message: format!(
                            "this gateway key used its daily budget of {budget} tokens ({used} used); it resets at 00:00 UTC"
                        ),
                        retry_after: until_next_day(now_unix),
                    });
                }
            }
            if let Some(budget) = limits.monthly_tokens {
                let (first, next) = first_day_of_month(now_unix);
                let used = ledger.tokens_since(&client.id, first);
                if used >= budget {
                    return Err(ApiError::RateLimited {
                        message: format!(
                            "this gateway key used its monthly budget of {budget} tokens ({used} used); it resets on the 1st, 00:00 UTC"
                        ),
                        retry_after: next * 86_400 - now_unix,
                    });
                }
            }
        }
        let mut slot = None;
        if let Some(shared) = &self.shared {
            if let Some(max) = limits.max_concurrent {
                for waited in 0.. {
                    match shared.acquire(&client.id, max) {
                        Ok(Some(taken)) => slot = Some(taken),
                        Ok(None) if waited < SLOT_GRACE_STEPS => {
                            std::thread::sleep(SLOT_GRACE_STEP);
                            continue;
                        }
                        Ok(None) => return Err(too_many(max)),
                        // Redis is down: the local count below decides.
                        Err(_) => {}
                    }
                    break;
                }
            }
            if let Some(rpm) = limits.rpm
                && let Ok(Some(wait)) = shared.rpm(&client.id, rpm)
            {
                if let Some(slot) = slot {
                    shared.release(&client.id, &slot);
                }
                return Err(ApiError::RateLimited {
                    message: format!("this gateway key is limited to {rpm} requests per minute"),
                    retry_after: crate::accounts::ceil_secs(wait).max(1),
                });
            }
        }
        let shared_up = self.shared_up();
        for waited in 0.. {
            let now = Instant::now();
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            let state = keys.entry(client.id.clone()).or_default();
            if let Some(rpm) = limits.rpm.filter(|_| !shared_up) {
                while state
                    .recent
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
                {
                    state.recent.pop_front();
                }
                if state.recent.len() >= rpm as usize {
                    let oldest = state.recent.front().copied().unwrap_or(now);
                    let wait = Duration::from_secs(60).saturating_sub(now.duration_since(oldest));
                    if let (Some(slot), Some(shared)) = (&slot, &self.shared) {
                        shared.release(&client.id, slot);
                    }
                    return Err(ApiError::RateLimited {
                        message: format!(
                            "this gateway key is limited to {rpm} requests per minute"
                        ),
                        retry_after: crate::accounts::ceil_secs(wait).max(1),
                    });
                }
            }
            if let Some(max) = limits.max_concurrent
                && slot.is_none()
                && state.in_flight >= max
            {
                drop(keys);
                if waited < SLOT_GRACE_STEPS {
                    std::thread::sleep(SLOT_GRACE_STEP);
                    continue;
                }
                return Err(too_many(max));
            }
            if limits.rpm.is_some() {
                state.recent.push_back(now);
            }
            state.in_flight += 1;
            break;
        }
        if let Some(slot) = &slot {
            self.lock_slots().insert(slot.clone(), client.id.clone());
        }
        Ok(Permit {
            limiter: Arc::clone(self),
            held: Some(Box::new(Held {
                key: client.id.clone(),
                slot,
            })),
        })
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
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
    }

    /// Whether Redis counts for every instance now (else this instance counts alone).
    fn shared_up(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| s.outage().is_none())
    }
}

fn too_many(max: u32) -> ApiError {
    ApiError::RateLimited {
        message: format!("this gateway key is limited to {max} requests at once"),
        retry_after: 1,
    }
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
        let a = limiter.admit(&c, None).expect("first");
        let b = limiter.admit(&c, None).expect("second");
        drop((a, b));
        let err = limiter.admit(&c, None).err().expect("third in the minute");
        assert_eq!(err.status(), 429);
        assert!((59..=60).contains(&err.retry_after().unwrap_or(0)));
    }

    #[test]
    fn concurrency_is_released_with_the_permit() {
        let limiter = Arc::new(Limiter::default());
        let c = client(KeyLimits {
            max_concurrent: Some(1),
            ..KeyLimits::default()
        });
        let held = limiter.admit(&c, None).expect("first");
        assert_eq!(limiter.admit(&c, None).err().map(|e| e.status()), Some(429));
        drop(held);
        assert!(limiter.admit(&c, None).is_ok());
    }

    #[test]
    fn models_outside_the_list_are_forbidden() {
        let c = client(KeyLimits {
            models: vec!["claude-haiku".into()],
            ..KeyLimits::default()
        });
        assert!(Limiter::allow_model(&c, Some("claude-haiku")).is_ok());
        let err = Limiter::allow_model(&c, Some("claude-opus")).expect_err("forbidden");
        assert_eq!(err.status(), 403);
        assert!(Limiter::allow_model(&c, None).is_err());
        assert!(Limiter::allow_model(&client(KeyLimits::default()), Some("x")).is_ok());
    }

    #[test]
    fn month_boundaries() {
        // 2026-11-26 07:04 UTC: the month began 2026-11-01, the next begins 2026-12-01.
        let (first, next) = first_day_of_month(1_795_676_640);
        assert_eq!(crate::time::rfc3339(first * 86_400), "2026-11-01T00:00:00Z");
        assert_eq!(crate::time::rfc3339(next * 86_400), "2026-12-01T00:00:00Z");
        assert_eq!(until_next_day(86_400 * 5 + 3600), 82_800);
    }
}
