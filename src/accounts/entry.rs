//! One account: its configuration, what the gateway has learned about it (`Live`: health,
//! tokens, bans, probes), its configured `State`, and the transitions `accounts` asks of it.

use super::*;

/// What other instances found about one account, as `shared::View` holds it.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Found<'a> {
    pub(super) cool: Option<&'a (u64, String)>,
    pub(super) ban: Option<&'a String>,
    pub(super) quota: Option<&'a crate::quota::Readings>,
}

impl<'a> Found<'a> {
    pub(super) fn at(view: &'a crate::shared::View, i: usize) -> Found<'a> {
        Found {
            cool: view.cools.get(i).and_then(Option::as_ref),
            ban: view.bans.get(i).and_then(Option::as_ref),
            quota: view.quotas.get(i).and_then(Option::as_ref),
        }
    }
}

/// One account and what the gateway has learned about it since loading it.
/// Other instances hold every slot of an account.
#[derive(Debug)]
pub(super) struct AllLeased;

#[derive(Debug)]
pub struct Entry {
    pub account: Account,
    /// Shared with the entry this one replaced at a reload, so a refresh finishing on an old
    /// entry still lands where new requests look.
    pub(super) live: Arc<Mutex<Live>>,
    /// Requests using this account now; read by least_busy without the live lock.
    pub(super) in_flight: Arc<AtomicU32>,
    /// Tickets of the requests waiting for one of its `max_concurrent` slots, oldest first.
    pub(super) queue: Arc<Mutex<std::collections::VecDeque<u64>>>,
    /// What every account of the list shares: the wake-up for queues, the shared state.
    pub(super) common: Arc<Common>,
    /// The slots this instance holds in Redis (`max_concurrent` across instances), renewed
    /// while held.
    pub(super) leases: Arc<Mutex<Vec<String>>>,
    /// Since start: requests sent and failures seen, for status.
    pub(super) requests: Arc<AtomicU64>,
    pub(super) failures: Arc<AtomicU64>,
}

/// An account's configured state: whether it may serve at all, before its health counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Enabled,
    Disabled,
    /// An OAuth account whose refresh token was refused: a person must log in again.
    NeedsLogin,
    /// An OAuth account never logged in.
    NotLoggedIn,
    /// Its credential cannot be used (an unset environment variable, say).
    Unusable,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Enabled => "enabled",
            State::Disabled => "disabled",
            State::NeedsLogin => "needs_login",
            State::NotLoggedIn => "not_logged_in",
            State::Unusable => "unusable",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Entry {
    pub(super) fn new(account: Account, previous: Option<&Entry>, common: &Arc<Common>) -> Entry {
        let previous = previous.filter(|p| p.account.kind == account.kind);
        let shared = previous.map(|p| Arc::clone(&p.live)).unwrap_or_default();
        {
            let mut live = shared.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(oauth) = account.oauth() {
                // The file is the truth unless it is older than what this process holds: tokens
                // rotated but not written yet, or fresher ones adopted from another instance.
                let older = match (&live.tokens, &oauth.tokens) {
                    (Some(held), Some(file)) => file.issued_at < held.issued_at,
                    _ => false,
                };
                if live.persist_error.is_none() && !older {
                    live.tokens = oauth.tokens.clone();
                    live.needs_login = oauth.needs_login;
                }
            }
            if account.enabled {
                live.disabled_reason = None;
            }
            // `enable-account` ran since: the account is back now, whatever it rested for.
            let stamped = previous.is_some_and(|p| p.account.enabled_at != account.enabled_at);
            if stamped && account.enabled_at.is_some() {
                live.health = Default::default();
                live.long_context = None;
                live.suspected_ban = None;
                live.banned_elsewhere = false;
            }
        }
        Entry {
            account,
            live: shared,
            in_flight: previous
                .map(|p| Arc::clone(&p.in_flight))
                .unwrap_or_default(),
            queue: previous.map(|p| Arc::clone(&p.queue)).unwrap_or_default(),
            common: Arc::clone(common),
            leases: previous.map(|p| Arc::clone(&p.leases)).unwrap_or_default(),
            requests: previous
                .map(|p| Arc::clone(&p.requests))
                .unwrap_or_default(),
            failures: previous
                .map(|p| Arc::clone(&p.failures))
                .unwrap_or_default(),
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests waiting for one of its slots.
    pub fn queued(&self) -> usize {
        self.lock_queue().len()
    }

    pub(super) fn lock_leases(&self) -> MutexGuard<'_, Vec<String>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The name of its slots in Redis.
    pub(super) fn lease_key(&self) -> String {
        format!("acct:{}", self.id())
    }

    /// With shared state and a `max_concurrent`, takes one of its slots across instances
    /// (a lease that frees itself if this instance dies); `false` when other instances hold
    /// them all. Without Redis (or while it is away) the local count alone decides, and no
    /// lease is held.
    pub(super) fn lease_slot(&self) -> Result<Option<String>, AllLeased> {
        let (Some(max), Some(shared)) = (self.account.max_concurrent, &self.common.shared) else {
            return Ok(None);
        };
        match shared.acquire(&self.lease_key(), max) {
            Ok(Some(lease)) => {
                self.lock_leases().push(lease.clone());
                Ok(Some(lease))
            }
            Ok(None) => Err(AllLeased),
            Err(_) => Ok(None),
        }
    }

    pub(super) fn lock_queue(&self) -> MutexGuard<'_, std::collections::VecDeque<u64>> {
        // A queue of numbers, whole after every change.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a request holding `ticket` (if any) may take a slot now: one is free, and no
    /// request that came earlier waits for it.
    pub(super) fn has_slot_for(&self, ticket: Option<u64>) -> bool {
        let free = (self.account.max_concurrent).is_none_or(|max| self.in_flight() < max);
        free && self
            .lock_queue()
            .front()
            .is_none_or(|first| Some(*first) == ticket)
    }

    pub fn counts(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }

    pub(super) fn live(&self) -> MutexGuard<'_, Live> {
        // Live state is plain data, consistent after every assignment: poison carries no news.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn id(&self) -> &str {
        &self.account.id
    }

    /// How everything done for the account goes out: its proxy (`None`: direct) and the CA
    /// its TLS trusts (`None`: the public roots).
    pub fn egress(&self) -> crate::upstream::Via<'_> {
        crate::upstream::Via {
            proxy: self.account.proxy.as_ref().map(|e| &e.proxy),
            tls: self.account.ca.as_ref().map(|t| &t.tls),
            within: None,
        }
    }

    pub fn is_oauth(&self) -> bool {
        self.account.oauth().is_some()
    }

    /// Whether requests may be sent with this account now.
    pub fn usable(&self) -> bool {
        self.usable_with(&self.live())
    }

    pub(super) fn usable_with(&self, live: &Live) -> bool {
        self.account.enabled
            && live.disabled_reason.is_none()
            && match &self.account.credential {
                Credential::ApiKey(_) => true,
                Credential::OAuth(_) => !live.needs_login && live.tokens.is_some(),
                Credential::Unusable(_) => false,
            }
    }

    /// The configured state, for lists.
    pub fn state(&self) -> State {
        self.state_with(&self.live())
    }

    /// `state`, with the live state already in hand (its lock is not taken again).
    pub(super) fn state_with(&self, live: &Live) -> State {
        if !self.account.enabled || live.disabled_reason.is_some() {
            return State::Disabled;
        }
        match &self.account.credential {
            Credential::OAuth(_) if live.needs_login => State::NeedsLogin,
            Credential::OAuth(_) if live.tokens.is_none() => State::NotLoggedIn,
            Credential::Unusable(_) => State::Unusable,
            _ => State::Enabled,
        }
    }

    /// The running state for status: `active`, `cooling`, `invalid`, or the configured state
    /// when the account is out of service; with the reason.
    pub fn status(&self, now: Instant) -> (&'static str, Option<String>) {
        let live = self.live();
        match self.state_with(&live) {
            State::Enabled => live.health.describe(now),
            State::Disabled => ("disabled", live.disabled_reason.clone()),
            State::Unusable => match &self.account.credential {
                Credential::Unusable(why) => ("unusable", Some(why.clone())),
                _ => ("unusable", None),
            },
            State::NeedsLogin => {
                let why = match &live.last_refresh_error {
                    Some(e) => format!("the refresh token was refused ({e}): run oauth-start"),
                    None => "a new login is needed: run oauth-start".into(),
                };
                ("needs_login", Some(why))
            }
            State::NotLoggedIn => (
                "not_logged_in",
                Some("never logged in: run oauth-start".into()),
            ),
        }
    }

    /// Records what using the account brought; returns the cooldown it started, if any.
    pub fn record(&self, signal: Signal, settings: &BalanceSettings) -> Option<Cooldown> {
        let failed = !matches!(signal, Signal::Success);
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let now = Now {
            instant: Instant::now(),
            unix_ms: crate::time::now_unix_millis(),
        };
        // Jitter only spreads the return of accounts put to cool; a success needs none.
        let jitter = if failed {
            cooldown::jitter()
        } else {
            Duration::ZERO
        };
        let mut live = self.live();
        let before = live.health.cooldown.clone();
        live.health.record(signal, now, jitter, settings);
        if let (Some(rest), None) = (&before, &live.health.cooldown) {
            debug!(
                "account {}: back in service, its rest ({}) over",
                self.id(),
                rest.reason
            );
        }
        if live.health.invalid && failed {
            error!(
                "account {} ({}) is invalid: its key was refused again and again; fix it and restart, or remove it",
                self.id(),
                self.account.name
            );
        }
        let c = live
            .health
            .cooldown
            .as_ref()
            .filter(|c| Some(*c) != before.as_ref())?;
        warn!(
            "account {} ({}) cooling down until {}: {}",
            self.id(),
            self.account.name,
            crate::time::rfc3339(c.until_unix_ms / 1000),
            c.reason
        );
        Some(c.clone())
    }

    /// Meets the tokens Redis holds for this account: takes them when as new as ours or newer
    /// (`adopt_stored`), else offers ours; rotated tokens that could not be stored before and
    /// now are clear `persist_error`.
    pub fn meet_stored(&self, shared: &Shared, stored: Option<&Stored>) -> Result<(), Down> {
        let offer = adopt_stored(&mut self.live(), stored);
        if let Some(tokens) = offer
            && shared.offer(self.id(), &tokens)?
        {
            let mut live = self.live();
            if live.persist_error.is_some() && live.tokens.as_ref() == Some(&tokens) {
                live.persist_error = None;
                info!("stored the rotated tokens of account {} at last", self.id());
            }
        }
        Ok(())
    }

    /// Takes what other instances found (through Redis): a longer cooldown, a ban, a lifted
    /// ban, newer quota readings.
    pub(super) fn adopt(&self, live: &mut Live, found: Found<'_>, now: Now) {
        let Found { cool, ban, quota } = found;
        if let Some(quota) = quota {
            live.quota.merge(quota.clone());
        }
        if let Some((until_ms, reason)) = cool
            && *until_ms > now.unix_ms
            && live
                .health
                .cooldown
                .as_ref()
                .is_none_or(|c| c.until_unix_ms < *until_ms)
        {
            live.health.cooldown = Some(Cooldown {
                until: now.instant + Duration::from_millis(until_ms - now.unix_ms),
                until_unix_ms: *until_ms,
                reason: reason.clone(),
            });
        }
        match ban {
            Some(reason) if live.disabled_reason.is_none() => {
                live.disabled_reason = Some(reason.clone());
                live.banned_elsewhere = true;
            }
            None if live.banned_elsewhere => {
                live.disabled_reason = None;
                live.banned_elsewhere = false;
            }
            _ => {}
        }
    }
}
