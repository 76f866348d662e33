//! Cooldown rules: what one upstream outcome does to an account's availability. Pure: the
//! clock and the jitter come in as arguments, so every rule is tested exactly. Every cooldown
//! is a point in time, checked at selection: it expires by itself, with no job to run and no
//! restart needed.

use std::time::{Duration, Instant};

use crate::config::BalanceSettings;

/// What happened when an account was used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    Success,
    /// 429: `retry_after` from its header, and `unified_reset` (Unix seconds) only when the
    /// unified status said `rejected`.
    RateLimited {
        retry_after: Option<Duration>,
        unified_reset: Option<u64>,
    },
    /// 529, 5xx, a connection failure or timeout, a broken stream: `what` says which.
    Failure(String),
    /// An API key was refused (401).
    AuthFailed,
    /// The plan is used up (`anthropic::PlanLimit`), or, with `overage: plan_only`, an answer
    /// came from extra usage: the account rests until `until` (Unix seconds) when known, else
    /// `plan_limit_cooldown`.
    PlanLimit {
        until: Option<u64>,
        why: String,
    },
    /// The upstream announced a ban that a probe of the account could neither confirm nor
    /// refute: the account rests like an ejection, and is probed again before it serves.
    SuspectedBan(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cooldown {
    pub until: Instant,
    /// The same moment in Unix milliseconds, for people and `retry-after`.
    pub until_unix_ms: u64,
    pub reason: String,
}

/// An account's failure bookkeeping.
#[derive(Debug, Clone, Default)]
pub struct Health {
    pub cooldown: Option<Cooldown>,
    /// 529/5xx/connection failures in a row.
    pub consecutive_failures: u32,
    /// Ejections in a row: each one doubles the next.
    pub ejections: u32,
    /// 429s without reset information in a row: each one doubles the backoff.
    pub rate_limit_strikes: u32,
    /// 401s in a row, and when the first of them came (Unix seconds).
    pub auth_failures: u32,
    pub first_auth_failure: Option<u64>,
    /// Repeated 401s over a long window: the key is wrong, not the moment.
    pub invalid: bool,
}

/// The clock as the rules see it.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub instant: Instant,
    pub unix_ms: u64,
}

impl Health {
    /// Whether the account may be chosen at `now`.
    pub fn available(&self, now: Instant) -> bool {
        !self.invalid && self.cooldown.as_ref().is_none_or(|c| now >= c.until)
    }

    /// Applies `signal`. `jitter` (at most 250 ms) spreads the return of accounts limited at
    /// the same moment.
    pub fn record(&mut self, signal: Signal, now: Now, jitter: Duration, s: &BalanceSettings) {
        let cool = |this: &mut Health, d: Duration, reason: String| {
            let d = d.min(Duration::from_secs(crate::quota::MAX_RESET_AHEAD));
            this.cooldown = Some(Cooldown {
                until: now.instant + d,
                until_unix_ms: now.unix_ms + d.as_millis() as u64,
                reason,
            });
        };
        match signal {
            Signal::Success => *self = Health::default(),
            Signal::RateLimited {
                retry_after,
                unified_reset,
            } => {
                let until_reset = unified_reset.map(|reset| {
                    Duration::from_millis(reset.saturating_mul(1000).saturating_sub(now.unix_ms))
                });
                let (wait, reason) = match (retry_after, until_reset) {
                    (Some(d), _) => (
                        d,
                        format!("rate limited (429, retry-after {}s)", d.as_secs()),
                    ),
                    (None, Some(d)) => (
                        d,
                        "rate limited (429, unified limit rejected until its reset)".to_string(),
                    ),
                    (None, None) => {
                        let d = doubling(
                            s.rate_limit_backoff,
                            self.rate_limit_strikes,
                            s.rate_limit_backoff_max,
                        );
                        self.rate_limit_strikes += 1;
                        (
                            d,
                            format!("rate limited (429 without reset, backoff {}s)", d.as_secs()),
                        )
                    }
                };
                cool(self, wait + jitter, reason);
            }
            Signal::Failure(what) => {
                self.consecutive_failures += 1;
                if self.consecutive_failures >= s.eject_after {
                    let d = doubling(s.eject_cooldown, self.ejections, s.eject_cooldown_max);
                    self.ejections += 1;
                    let reason = format!(
                        "ejected after {} failures in a row, last: {what}",
                        self.consecutive_failures
                    );
                    cool(self, d + jitter, reason);
                }
            }
            Signal::PlanLimit { until, why } => {
                let wait = until
                    .map(|u| {
                        Duration::from_millis(u.saturating_mul(1000).saturating_sub(now.unix_ms))
                    })
                    .filter(|d| !d.is_zero())
                    .unwrap_or(s.plan_limit_cooldown);
                cool(self, wait + jitter, why);
            }
            Signal::SuspectedBan(what) => {
                let d = doubling(s.eject_cooldown, self.ejections, s.eject_cooldown_max);
                self.ejections += 1;
                cool(self, d + jitter, what);
            }
            Signal::AuthFailed => {
                self.auth_failures += 1;
                let now_s = now.unix_ms / 1000;
                let first = *self.first_auth_failure.get_or_insert(now_s);
                if self.auth_failures >= s.invalid_after
                    && now_s.saturating_sub(first) >= s.invalid_window.as_secs()
                {
                    self.invalid = true;
                    self.cooldown = None;
                } else {
                    cool(
                        self,
                        s.auth_cooldown + jitter,
                        "the API key was refused (401); probed again when this ends".into(),
                    );
                }
            }
        }
    }

    /// `invalid`, `cooling` or `active`, with the reason, for status.
    pub fn describe(&self, now: Instant) -> (&'static str, Option<String>) {
        if self.invalid {
            return (
                "invalid",
                Some(format!(
                    "{} refusals (401) in a row since {}",
                    self.auth_failures,
                    crate::time::rfc3339(self.first_auth_failure.unwrap_or(0))
                )),
            );
        }
        match &self.cooldown {
            Some(c) if now < c.until => ("cooling", Some(c.reason.clone())),
            _ => ("active", None),
        }
    }
}

fn doubling(start: Duration, times: u32, max: Duration) -> Duration {
    start.saturating_mul(1u32 << times.min(20)).min(max)
}

/// Up to 250 ms, from the OS generator.
pub fn jitter() -> Duration {
    let [a, b] = crate::secret::random_bytes::<2>();
    Duration::from_millis(u64::from(u16::from_le_bytes([a, b])) % 251)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BalanceSettings {
        BalanceSettings::test()
    }

    fn at(base: Instant, secs: u64) -> Now {
        Now {
            instant: base + Duration::from_secs(secs),
            unix_ms: (1_000_000_000 + secs) * 1000,
        }
    }

    fn remaining(h: &Health, now: Now) -> Duration {
        h.cooldown.as_ref().expect("cooling").until - now.instant
    }

    #[test]
    fn retry_after_wins_and_expires_by_itself() {
        let t0 = Instant::now();
        let mut h = Health::default();
        let limited = Signal::RateLimited {
            retry_after: Some(Duration::from_secs(2)),
            unified_reset: Some(1_000_000_000 + 3600),
        };
        h.record(limited, at(t0, 0), Duration::from_millis(100), &settings());
        assert_eq!(remaining(&h, at(t0, 0)), Duration::from_millis(2100));
        assert!(!h.available(at(t0, 1).instant));
        assert!(
            h.available(at(t0, 3).instant),
            "back after 2 s without anything running"
        );
    }

    #[test]
    fn unified_reset_and_backoff_without_reset() {
        let t0 = Instant::now();
        let mut h = Health::default();
        let unified = Signal::RateLimited {
            retry_after: None,
            unified_reset: Some(1_000_000_000 + 90),
        };
        h.record(unified, at(t0, 0), Duration::ZERO, &settings());
        assert_eq!(remaining(&h, at(t0, 0)), Duration::from_secs(90));

        let mut h = Health::default();
        let bare = || Signal::RateLimited {
            retry_after: None,
            unified_reset: None,
        };
        let mut waits = Vec::new();
        for _ in 0..4 {
            h.record(bare(), at(t0, 0), Duration::ZERO, &settings());
            waits.push(remaining(&h, at(t0, 0)).as_secs());
        }
        assert_eq!(waits, [1, 2, 4, 8]);
        h.record(Signal::Success, at(t0, 0), Duration::ZERO, &settings());
        assert!(h.available(at(t0, 0).instant));
        assert_eq!(h.rate_limit_strikes, 0);
    }

    #[test]
    fn ejection_after_consecutive_failures_doubles_and_success_resets() {
        let t0 = Instant::now();
        let s = settings();
        let mut h = Health::default();
        let fail = || Signal::Failure("529 overloaded".into());
        h.record(fail(), at(t0, 0), Duration::ZERO, &s);
        h.record(fail(), at(t0, 0), Duration::ZERO, &s);
        assert!(h.available(at(t0, 0).instant), "two failures do not eject");
        h.record(fail(), at(t0, 0), Duration::ZERO, &s);
        assert_eq!(remaining(&h, at(t0, 0)), Duration::from_secs(10));
        assert!(h.cooldown.as_ref().expect("cooling").reason.contains("529"));
        h.record(fail(), at(t0, 11), Duration::ZERO, &s);
        assert_eq!(remaining(&h, at(t0, 11)), Duration::from_secs(20));
        h.record(Signal::Success, at(t0, 40), Duration::ZERO, &s);
        assert_eq!((h.consecutive_failures, h.ejections), (0, 0));
    }

    #[test]
    fn a_suspected_ban_ejects_at_once_and_doubles() {
        let t0 = Instant::now();
        let s = settings();
        let mut h = Health::default();
        let suspect = || Signal::SuspectedBan("ban unconfirmed".into());
        h.record(suspect(), at(t0, 0), Duration::ZERO, &s);
        assert_eq!(remaining(&h, at(t0, 0)), Duration::from_secs(10));
        assert_eq!(
            h.cooldown.as_ref().expect("cooling").reason,
            "ban unconfirmed"
        );
        h.record(suspect(), at(t0, 11), Duration::ZERO, &s);
        assert_eq!(remaining(&h, at(t0, 11)), Duration::from_secs(20));
    }

    #[test]
    fn one_401_cools_and_only_repeated_401s_over_the_window_invalidate() {
        let t0 = Instant::now();
        let s = settings();
        let mut h = Health::default();
        h.record(Signal::AuthFailed, at(t0, 0), Duration::ZERO, &s);
        assert_eq!(remaining(&h, at(t0, 0)), Duration::from_secs(600));
        assert!(!h.invalid);
        h.record(Signal::AuthFailed, at(t0, 600), Duration::ZERO, &s);
        h.record(Signal::AuthFailed, at(t0, 1200), Duration::ZERO, &s);
        assert!(!h.invalid, "three 401s within 20 minutes are not yet proof");
        h.record(Signal::AuthFailed, at(t0, 1800), Duration::ZERO, &s);
        assert!(h.invalid);
        assert!(!h.available(at(t0, 99_999).instant));
        assert_eq!(h.describe(at(t0, 1800).instant).0, "invalid");
        h.record(Signal::Success, at(t0, 1900), Duration::ZERO, &s);
        assert!(!h.invalid, "a success (after a fix and restart) clears it");
    }

    #[test]
    fn jitter_is_bounded() {
        assert!((0..100).all(|_| jitter() <= Duration::from_millis(250)));
    }
}
