//! An account's live state, and the transitions other rooms ask for. `Live` is written only
//! here and in the rest of `accounts`: the refresher, failover and status read a `View` and
//! ask for a change by name (adopt tokens, a refresh succeeded or failed, a ban suspected),
//! so the rules (the newer token wins; rotated tokens are in use only once saved or marked
//! unsaved) are kept by this API, not by each caller.

use std::time::{Duration, Instant};

use std::collections::{BTreeMap, BTreeSet};

use super::Entry;
use super::cooldown::{Cooldown, Health};
use crate::anthropic::Ban;
use crate::config::Tokens;
use crate::quota::{Family, Reading, Readings, Window};

/// Readings unchanged in substance are told to other instances this often, so theirs stay
/// fresh.
const TELL_EVERY_SECS: u64 = 60;

#[derive(Debug, Clone, Default)]
pub(super) struct Live {
    /// The OAuth tokens in use. Newer than the file's while `persist_error` is set.
    pub(super) tokens: Option<Tokens>,
    /// invalid_grant seen: a person must log in again.
    pub(super) needs_login: bool,
    /// A permanent failure seen at run time (a ban): the account is out of service.
    pub(super) disabled_reason: Option<String>,
    /// A ban the upstream announced that a probe could not settle: the account rests, and is
    /// probed again before it next serves.
    pub(super) suspected_ban: Option<crate::anthropic::Ban>,
    /// A probe of the account is in flight (`failover::confirm_ban`): one at a time.
    pub(super) probing: bool,
    /// Consecutive failed refresh attempts, and when the next may be made.
    pub(super) refresh_failures: u32,
    pub(super) next_refresh_attempt: Option<Instant>,
    pub(super) last_refresh: Option<Instant>,
    pub(super) last_refresh_error: Option<String>,
    /// Since start, for metrics.
    pub(super) refreshes_ok: u64,
    pub(super) refreshes_failed: u64,
    /// Rotated tokens could not be written to config.yaml: they exist only in memory until a
    /// retry succeeds. Shown loudly; never silent.
    pub(super) persist_error: Option<String>,
    /// Cooldowns and failure counts.
    pub(super) health: Health,
    /// `disabled_reason` came from another instance's ban (through Redis), and goes when the
    /// ban is lifted there.
    pub(super) banned_elsewhere: bool,
    /// What its answers (here or, through Redis, elsewhere) said of its quota.
    pub(super) quota: Readings,
    /// The families it was passed over for at its last pick, for the hysteresis.
    pub(super) quota_over: BTreeSet<Family>,
    /// What other instances were last told of its quota, and when (Unix seconds).
    pub(super) quota_told: Option<(Readings, u64)>,
    /// A long-context request of this many body bytes was refused for want of extra usage:
    /// requests as large skip the account until then (Unix seconds).
    pub(super) long_context: Option<(usize, u64)>,
}

/// What other rooms read of an account's live state, copied out under one lock.
#[derive(Debug, Clone)]
pub struct View {
    pub tokens: Option<Tokens>,
    pub needs_login: bool,
    /// Out of service (a ban, here or elsewhere).
    pub disabled: bool,
    pub suspected_ban: Option<Ban>,
    pub refresh_failures: u32,
    /// While a failed refresh backs off: when the next may be made.
    pub next_refresh_attempt: Option<Instant>,
    pub last_refresh: Option<Instant>,
    pub last_refresh_error: Option<String>,
    pub refreshes_ok: u64,
    pub refreshes_failed: u64,
    /// Rotated tokens in use that are not saved yet, and why.
    pub persist_error: Option<String>,
    pub cooldown: Option<Cooldown>,
    /// The latest quota reading that still counts (`quota::Reading::current`).
    pub quota: Option<Reading>,
    /// The model-scoped window per model family, while it still counts.
    pub quota_scoped: BTreeMap<Family, Window>,
}

/// The one probe of an account in flight; dropping it (however the probe ended) lets the next.
pub struct Probing<'a>(&'a Entry);

impl Drop for Probing<'_> {
    fn drop(&mut self) {
        self.0.live().probing = false;
    }
}

impl Entry {
    pub fn view(&self) -> View {
        let now = crate::time::now_unix();
        let live = self.live();
        let (quota, quota_scoped) = live.quota.current(now);
        View {
            tokens: live.tokens.clone(),
            needs_login: live.needs_login,
            disabled: live.disabled_reason.is_some(),
            suspected_ban: live.suspected_ban.clone(),
            refresh_failures: live.refresh_failures,
            next_refresh_attempt: live.next_refresh_attempt,
            last_refresh: live.last_refresh,
            last_refresh_error: live.last_refresh_error.clone(),
            refreshes_ok: live.refreshes_ok,
            refreshes_failed: live.refreshes_failed,
            persist_error: live.persist_error.clone(),
            cooldown: live.health.cooldown.clone(),
            quota,
            quota_scoped,
        }
    }

    /// Where the account stands against its threshold by its latest reading (the model-scoped
    /// windows aside: they are per family), for status and metrics.
    pub fn quota_standing(&self, policy: &crate::quota::Policy) -> crate::quota::Standing {
        let now = crate::time::now_unix();
        let live = self.live();
        let latest = live.quota.latest.as_ref().and_then(|r| r.current(now));
        policy.standing(latest.as_ref(), None, !live.quota_over.is_empty())
    }

    /// Keeps what the latest answer (to a request of `family`) said of the account's quota.
    /// When other instances `share` it, returns the readings to tell them if they hold news
    /// for them (or they have not been told for a while).
    pub fn observe_quota(&self, reading: Reading, family: Family, share: bool) -> Option<Readings> {
        let now = reading.seen_at;
        let mut live = self.live();
        live.quota.observe(reading, family);
        if !share {
            return None;
        }
        let due = live.quota_told.as_ref().is_none_or(|(told, at)| {
            live.quota.news_since(told) || now >= at.saturating_add(TELL_EVERY_SECS)
        });
        due.then(|| {
            live.quota_told = Some((live.quota.clone(), now));
            live.quota.clone()
        })
    }

    /// A 429 named `family`'s own weekly limit without a window to say until when: the
    /// family rests as if its window were rejected, until `until` (Unix seconds).
    pub fn rest_family(&self, family: Family, now: u64, until: Option<u64>) {
        let window = Window {
            status: Some(crate::quota::Status::Rejected),
            utilization: None,
            reset: until,
        };
        self.live().quota.scoped.insert(family, (now, window));
    }

    /// A long-context request of `body_len` bytes was refused for want of extra usage:
    /// requests as large go elsewhere until `until` (Unix seconds).
    pub fn rest_long_context(&self, body_len: usize, until: u64) {
        let now = crate::time::now_unix();
        let mut live = self.live();
        let held = live.long_context.filter(|(_, until)| *until > now);
        let smallest = held.map_or(body_len, |(n, _)| n.min(body_len));
        live.long_context = Some((smallest, until));
    }

    /// Takes `tokens` (read from config.yaml) unless the ones in use are newer; returns the
    /// ones in use after.
    pub fn adopt_tokens(&self, tokens: Tokens) -> Tokens {
        let mut live = self.live();
        match &live.tokens {
            Some(held) if held.issued_at > tokens.issued_at => held.clone(),
            _ => {
                live.tokens = Some(tokens.clone());
                tokens
            }
        }
    }

    /// A refresh brought `tokens`, already saved (`Ok`) or not (`Err`, why): they are in use
    /// from now on, and the refresh backoff is over.
    pub fn refreshed(&self, tokens: &Tokens, saved: Result<(), String>) {
        let mut live = self.live();
        live.tokens = Some(tokens.clone());
        live.last_refresh = Some(Instant::now());
        live.refresh_failures = 0;
        live.refreshes_ok += 1;
        live.next_refresh_attempt = None;
        live.last_refresh_error = None;
        live.persist_error = saved.err();
    }

    /// A refresh failed for a reason that may pass: the next waits `backoff(failures in a
    /// row)`. Returns that count and the wait.
    pub fn refresh_failed(
        &self,
        error: String,
        backoff: impl FnOnce(u32) -> Duration,
    ) -> (u32, Duration) {
        let mut live = self.live();
        live.refresh_failures += 1;
        live.refreshes_failed += 1;
        let wait = backoff(live.refresh_failures);
        live.next_refresh_attempt = Some(Instant::now() + wait);
        live.last_refresh_error = Some(error);
        (live.refresh_failures, wait)
    }

    /// A person must log in again: the token endpoint refused the refresh token (`refused`,
    /// counted as a failed refresh), or the config or shared state says so.
    pub fn needs_login(&self, refused: bool) {
        let mut live = self.live();
        live.needs_login = true;
        if refused {
            live.refreshes_failed += 1;
        }
    }

    /// Rotated tokens in use were saved at last (`None`), or still cannot be (why).
    pub fn unsaved(&self, error: Option<String>) {
        self.live().persist_error = error;
    }

    /// The upstream announced a ban that a probe could not settle (`Some`), or it was settled.
    pub fn suspect_ban(&self, ban: Option<Ban>) {
        self.live().suspected_ban = ban;
    }

    /// Takes the account out of service in memory (a confirmed ban).
    pub fn disable(&self, reason: &str) {
        self.live().disabled_reason = Some(reason.to_string());
    }

    /// Starts the one probe of this account, unless one is running.
    pub fn start_probe(&self) -> Option<Probing<'_>> {
        let mut live = self.live();
        if live.probing {
            return None;
        }
        live.probing = true;
        Some(Probing(self))
    }
}
