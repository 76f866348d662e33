//! Account state: the one owner of the runtime view of upstream accounts, behind one RwLock.
//! Each entry pairs the account as configured with its live state (OAuth tokens in use,
//! refresh bookkeeping, cooldowns, a ban noticed at run time) and its load. Config reloads
//! replace the list and carry the live state over by account id. Selection happens here:
//! priority tier first, then the sticky pin, then the strategy.

pub mod balance;
pub mod cooldown;
mod entry;
mod live;
mod queue;
pub mod sticky;

use entry::Found;
pub use entry::{Entry, State};
use live::Live;
pub use live::{Probing, View};
use queue::{Common, Freed};
pub use queue::{QueueEnd, Queued, Ticket};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use crate::config::{Account, BalanceSettings, Credential, StickySettings, Tokens};
use crate::quota::{self, Family};
use crate::shared::{Down, Shared, Stored};
use balance::Load;
use cooldown::{Cooldown, Now, Signal};
use sticky::{Key, Sticky};

pub struct Accounts {
    list: RwLock<Arc<Vec<Arc<Entry>>>>,
    /// Replaced whole when config.yaml changes; readers keep the one they took.
    settings: RwLock<Arc<BalanceSettings>>,
    /// `None` when sticky sessions are off.
    sticky: Option<Sticky>,
    /// Cooldowns, bans and pins shared with other instances (`state.backend: redis`).
    shared: Option<Arc<Shared>>,
    /// Advances with every pick: rotates round robin and breaks ties.
    turn: AtomicU64,
    /// Makes reading the loads and taking a slot one step, so a burst spreads evenly and no
    /// account takes more than its `max_concurrent`.
    picking: Mutex<()>,
    /// What the entries share: the wake-up for queues (told whenever a slot frees), the
    /// shared state.
    common: Arc<Common>,
    /// Numbers the requests that join a queue, in arrival order.
    tickets: AtomicU64,
}

/// What one request asks of selection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ask<'a> {
    /// Accounts that already failed this request.
    pub tried: &'a [String],
    pub sticky: Option<Key<'a>>,
    /// The model asked for: a model-scoped window or rest is its family's.
    pub model: Option<&'a str>,
    /// The request body's size: an account refused a long-context request skips those at
    /// least as large.
    pub body_len: usize,
    /// This account or none (a conversation sent back to where its signatures are from).
    pub only: Option<&'a str>,
    /// The request's place in a queue, when it waits for a slot.
    pub ticket: Option<u64>,
}

/// An account that may serve a request, with where it stands against its quota.
struct Candidate<'a> {
    entry: &'a Arc<Entry>,
    standing: crate::quota::Standing,
    sticky_limit: f64,
}

/// A chosen account, counted as in flight until dropped.
pub struct Pick {
    pub entry: Arc<Entry>,
    /// Its slot's lease in Redis, when it took one; released with it, and no other.
    lease: Option<String>,
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.entry.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.entry.account.max_concurrent.is_some() {
            if let (Some(lease), Some(shared)) = (self.lease.take(), &self.entry.common.shared) {
                self.entry.lock_leases().retain(|held| *held != lease);
                shared.release(&self.entry.lease_key(), &lease);
            }
            self.entry.common.freed.tell();
        }
    }
}

impl Accounts {
    pub fn new(
        accounts: Vec<Account>,
        settings: &BalanceSettings,
        sticky: &StickySettings,
        shared: Option<Arc<Shared>>,
    ) -> Accounts {
        let common = Arc::new(Common {
            freed: Freed::default(),
            shared: shared.clone(),
        });
        let list = accounts
            .into_iter()
            .map(|a| Arc::new(Entry::new(a, None, &common)))
            .collect();
        Accounts {
            list: RwLock::new(Arc::new(list)),
            settings: RwLock::new(Arc::new(settings.clone())),
            sticky: sticky
                .enabled
                .then(|| Sticky::new(sticky.ttl, sticky.max_entries, sticky.max_per_key)),
            shared,
            turn: AtomicU64::new(0),
            picking: Mutex::new(()),
            common,
            tickets: AtomicU64::new(0),
        }
    }

    /// The accounts as the CLI shows them: with what Redis knows, when instances share state.
    pub fn load(config: &crate::config::Config) -> Accounts {
        let shared = crate::shared::open(config);
        let accounts = Accounts::new(
            config.accounts.clone(),
            &config.balance,
            &config.sticky,
            shared,
        );
        if let Err(e) = accounts.sync() {
            warn!("{e}; showing config.yaml's view only");
        }
        accounts
    }

    pub fn settings(&self) -> Arc<BalanceSettings> {
        // Replacing an Arc cannot leave it half-written, so a poisoned lock holds a whole value.
        Arc::clone(&self.settings.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Applies changed balancing settings to the next picks and outcomes.
    pub fn set_settings(&self, settings: &BalanceSettings) {
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(settings.clone());
    }

    /// Replaces the account list after the config changed, keeping live state by id.
    pub fn replace(&self, accounts: Vec<Account>) {
        let old = self.snapshot();
        let by_id: HashMap<&str, &Arc<Entry>> = old.iter().map(|e| (e.id(), e)).collect();
        let fresh: Vec<Arc<Entry>> = accounts
            .into_iter()
            .map(|a| {
                let previous = by_id.get(a.id.as_str()).map(|e| e.as_ref());
                Arc::new(Entry::new(a, previous, &self.common))
            })
            .collect();
        let fresh = Arc::new(fresh);
        match self.list.write() {
            Ok(mut guard) => *guard = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
    }

    pub fn snapshot(&self) -> Arc<Vec<Arc<Entry>>> {
        match self.list.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Whether some account could take a request now (for `/ready`).
    pub fn any_available(&self) -> bool {
        let now = Instant::now();
        self.snapshot()
            .iter()
            .any(|e| e.usable() && e.live().health.available(now))
    }

    /// Chooses an account for `ask`: among those that may serve it now (not tried, in
    /// service, not resting, not resting for its model family or its size), the best
    /// priority tier; within it, accounts under their quota threshold before those over it;
    /// the sticky pin while its account is under `quota_sticky_limit`; else the strategy.
    /// When all that could serve are resting: 529 with the soonest return as `retry-after`;
    /// when none can: 503 saying why.
    pub fn pick(&self, ask: &Ask<'_>) -> Result<Pick, Unavailable> {
        // Accounts whose slots other instances hold: passed over, one more each round.
        let mut elsewhere = Vec::new();
        loop {
            if let Some(picked) = self.pick_once(ask, &mut elsewhere) {
                return picked;
            }
        }
    }

    /// One round of `pick`; `None` when the account chosen had no slot left across instances
    /// (it joins `elsewhere`, and the next round passes it over).
    fn pick_once(
        &self,
        ask: &Ask<'_>,
        elsewhere: &mut Vec<String>,
    ) -> Option<Result<Pick, Unavailable>> {
        let all = self.snapshot();
        let settings = self.settings();
        let now = Instant::now();
        let now_unix = crate::time::now_unix();
        let family = ask.model.map_or(Family::Other, Family::of);
        // The key's hash with its pins' TTL, when sticky sessions are on.
        let sticky_key = ask.sticky;
        let sticky = (sticky_key.map(|k| k.hash)).zip(self.sticky.as_ref().map(Sticky::ttl));
        let sticky_hash = sticky.map(|(hash, _)| hash);
        // One round trip: what other instances found about these accounts, and the pin.
        let view = self.shared.as_ref().and_then(|shared| {
            let ids: Vec<&str> = all.iter().map(|e| e.id()).collect();
            shared.view(&ids, sticky).ok()
        });
        let clock = Now {
            instant: now,
            unix_ms: crate::time::now_unix_millis(),
        };
        let mut soonest: Option<Instant> = None;
        let mut rest_until = |at: Instant| {
            if soonest.is_none_or(|s| at < s) {
                soonest = Some(at);
            }
        };
        let at_unix = |until: u64| {
            now + Duration::from_secs(quota::reset_at(until, now_unix).saturating_sub(now_unix))
        };
        // From here to the slot taken, one pick at a time: no account passes max_concurrent.
        let picking = self.picking.lock().unwrap_or_else(|p| p.into_inner());
        let mut full: Vec<&Arc<Entry>> = Vec::new();
        let mut candidates: Vec<Candidate<'_>> = Vec::with_capacity(all.len());
        for (i, e) in all.iter().enumerate() {
            let mut live = e.live();
            if let Some(view) = &view {
                e.adopt(&mut live, Found::at(view, i), clock);
            }
            if ask.only.is_some_and(|only| only != e.id()) {
                continue;
            }
            if ask.tried.iter().any(|t| t == e.id()) {
                debug!(
                    "account {}: skipped, already tried for this request",
                    e.id()
                );
                continue;
            }
            if !e.usable_with(&live) {
                debug!(
                    "account {}: skipped, not in service ({})",
                    e.id(),
                    e.state_with(&live)
                );
                continue;
            }
            if !live.health.available(now) {
                if let Some(c) = &live.health.cooldown {
                    debug!(
                        "account {}: skipped, resting {} ms more ({})",
                        e.id(),
                        c.until.saturating_duration_since(now).as_millis(),
                        c.reason
                    );
                    if !live.health.invalid {
                        rest_until(c.until);
                    }
                }
                continue;
            }
            if let Some(until) = live.quota.family_rest(family, now_unix) {
                debug!(
                    "account {}: skipped, its {} limit is reached",
                    e.id(),
                    family.as_str()
                );
                rest_until(at_unix(until));
                continue;
            }
            if let Some((_, until)) = live
                .long_context
                .filter(|(len, until)| ask.body_len >= *len && *until > now_unix)
            {
                debug!(
                    "account {}: skipped, long context needs extra usage",
                    e.id()
                );
                rest_until(at_unix(until));
                continue;
            }
            let policy = settings.policy(&e.account);
            let was_over = live.quota_over.contains(&family);
            let standing = live.quota.standing(&policy, family, was_over, now_unix);
            if standing.over {
                live.quota_over.insert(family);
            } else {
                live.quota_over.remove(&family);
            }
            if standing.over && policy.hard_stop {
                debug!(
                    "account {}: skipped, {:.0} % of its quota used (hard stop)",
                    e.id(),
                    standing.used * 100.0
                );
                let until = standing
                    .reset
                    .unwrap_or(now_unix + crate::quota::STALE_AFTER_SECS);
                rest_until(at_unix(until));
                continue;
            }
            drop(live);
            if !e.has_slot_for(ask.ticket) || elsewhere.iter().any(|id| id == e.id()) {
                debug!("account {}: skipped, its slots are taken", e.id());
                full.push(e);
                continue;
            }
            candidates.push(Candidate {
                entry: e,
                standing,
                sticky_limit: policy.sticky_limit,
            });
        }
        let Some(best) = candidates.iter().map(|c| c.entry.account.priority).min() else {
            if let Some(queue) = self.queue_for(&full, sticky_hash, view.as_ref(), now) {
                return Some(Err(Unavailable::Full(queue)));
            }
            return Some(Err(match soonest {
                Some(at) => Unavailable::Resting {
                    retry_after: ceil_secs(at.saturating_duration_since(now)).max(1),
                },
                None => Unavailable::None(why_none(&all, ask.tried)),
            }));
        };
        candidates.retain(|c| c.entry.account.priority == best);
        let position = |id: &str| candidates.iter().position(|c| c.entry.id() == id);
        let pinned = match &view {
            // Redis answered: its pin is the one every instance follows.
            Some(view) => view.pin.as_deref().and_then(position),
            None => sticky_hash
                .zip(self.sticky.as_ref())
                .and_then(|(key, sticky)| sticky.find(key, now, position)),
        };
        // A pin holds until its account nears the wall while another has headroom.
        let room_elsewhere =
            |p: usize| (candidates.iter().enumerate()).any(|(i, c)| i != p && !c.standing.over);
        let pinned = pinned.filter(|&p| {
            let c = &candidates[p];
            let holds = c.standing.used < c.sticky_limit || !room_elsewhere(p);
            if !holds {
                debug!(
                    "account {}: {:.0} % of its quota used; its sticky conversation moves",
                    c.entry.id(),
                    c.standing.used * 100.0
                );
            }
            holds
        });
        let index = pinned.unwrap_or_else(|| {
            // Over their threshold, accounts serve only when none has headroom.
            let any_room = candidates.iter().any(|c| !c.standing.over);
            let pool: Vec<usize> = (0..candidates.len())
                .filter(|&i| !any_room || !candidates[i].standing.over)
                .collect();
            let loads: Vec<Load> = (pool.iter())
                .map(|&i| Load {
                    in_flight: candidates[i].entry.in_flight(),
                    weight: candidates[i].entry.account.weight,
                    headroom: candidates[i].standing.headroom(),
                })
                .collect();
            let turn = self.turn.fetch_add(1, Ordering::Relaxed);
            pool[balance::choose(settings.strategy, &loads, turn)]
        });
        let chosen = &candidates[index];
        let entry = Arc::clone(chosen.entry);
        let Ok(lease) = entry.lease_slot() else {
            elsewhere.push(entry.id().to_string());
            return None;
        };
        entry.in_flight.fetch_add(1, Ordering::Relaxed);
        entry.requests.fetch_add(1, Ordering::Relaxed);
        // New conversations are not pinned to an account over its threshold.
        let pin_it = pinned.is_some() || !chosen.standing.over;
        if let (Some(key), Some(ttl), Some(pins), true) =
            (sticky_key, sticky.map(|(_, t)| t), &self.sticky, pin_it)
        {
            pins.pin(key, entry.id(), now);
            drop(picking);
            // The view renewed a pin that still holds; a new or moved one is written (outside
            // the picking lock: a round trip).
            if let (Some(view), Some(shared)) = (&view, &self.shared)
                && view.pin.as_deref() != Some(entry.id())
            {
                let _ = shared.pin(key.hash, entry.id(), view.pin.as_deref(), ttl);
            }
        }
        Some(Ok(Pick { entry, lease }))
    }

    /// The account a conversation was pinned to before its pin last moved (the one whose
    /// thinking signatures it may carry).
    pub fn previous_pin(&self, key: Key<'_>) -> Option<String> {
        let shared = (self.shared.as_ref()).and_then(|s| s.previous_pin(key.hash).ok().flatten());
        shared.or_else(|| self.sticky.as_ref()?.previous(key.hash, Instant::now()))
    }

    /// Keeps what an answer to a request for `model` said of `entry`'s quota, and tells the
    /// other instances when it is news to them.
    pub fn observe_quota(
        &self,
        entry: &Entry,
        reading: crate::quota::Reading,
        model: Option<&str>,
    ) {
        let family = model.map_or(Family::Other, Family::of);
        let news = entry.observe_quota(reading, family, self.shared.is_some());
        if let (Some(readings), Some(shared)) = (news, &self.shared) {
            let _ = shared.quota(entry.id(), &readings);
        }
    }

    /// How many accounts there are.
    pub fn count(&self) -> usize {
        self.snapshot().len()
    }

    /// Records what using `entry` brought, and shares a cooldown it started.
    pub fn record(&self, entry: &Entry, signal: Signal) {
        let started = entry.record(signal, &self.settings());
        if let (Some(c), Some(shared)) = (started, &self.shared) {
            let _ = shared.cool(entry.id(), c.until_unix_ms, &c.reason);
        }
    }

    /// Takes `entry` out of service on every instance (a ban the upstream announced).
    pub fn share_ban(&self, entry: &Entry, reason: &str) {
        if let Some(shared) = &self.shared
            && let Err(e) = shared.ban(entry.id(), reason)
        {
            warn!("account {}: the ban is not shared: {e}", entry.id());
        }
    }

    /// Brings this instance in line with the others (once a second, and before the CLI shows
    /// accounts): adopts fresher OAuth tokens and a `needs_login` found in Redis, offers
    /// fresher ones of its own (config.yaml after a login, tokens it could not store), and
    /// takes the shared cooldowns and bans.
    pub fn sync(&self) -> Result<(), Down> {
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        let all = self.snapshot();
        let oauth: Vec<&Arc<Entry>> = all.iter().filter(|e| e.account.oauth().is_some()).collect();
        let ids: Vec<&str> = oauth.iter().map(|e| e.id()).collect();
        for (e, stored) in oauth.iter().zip(shared.tokens(&ids)?) {
            e.meet_stored(shared, stored.as_ref())?;
        }
        let ids: Vec<&str> = all.iter().map(|e| e.id()).collect();
        let view = shared.view(&ids, None)?;
        let now = Now {
            instant: Instant::now(),
            unix_ms: crate::time::now_unix_millis(),
        };
        for (i, e) in all.iter().enumerate() {
            e.adopt(&mut e.live(), Found::at(&view, i), now);
        }
        Ok(())
    }

    /// The shared state, when instances share one.
    pub fn shared(&self) -> Option<&Arc<Shared>> {
        self.shared.as_ref()
    }

    /// How many sticky pins are held (bounded by `sticky.max_entries`).
    pub fn sticky_pins(&self) -> usize {
        self.sticky.as_ref().map_or(0, Sticky::pins)
    }
}

/// Takes tokens Redis holds when they are as new as this instance's or newer (a
/// `needs_login` there sticks to the tokens it names); returns this instance's tokens when
/// they are newer, for Redis.
fn adopt_stored(live: &mut Live, stored: Option<&Stored>) -> Option<Tokens> {
    let Some(stored) = stored else {
        return live.tokens.clone().filter(|_| !live.needs_login);
    };
    let held = live.tokens.as_ref().map_or(0, |t| t.issued_at);
    if live.tokens.is_some() && held > stored.tokens.issued_at {
        return live.tokens.clone().filter(|_| !live.needs_login);
    }
    if live.tokens.is_none() || stored.tokens.issued_at > held {
        live.tokens = Some(stored.tokens.clone());
        live.needs_login = stored.needs_login;
    } else {
        live.tokens = Some(stored.tokens.clone());
        live.needs_login |= stored.needs_login;
    }
    None
}

/// Why no account can be picked: the selection boundary's error. `ApiError::from` makes the
/// first a 529 with its retry and the second a 503.
#[derive(Debug, Clone)]
pub enum Unavailable {
    /// Every account that could serve is resting; the first returns in `retry_after` seconds.
    Resting { retry_after: u64 },
    /// None can serve, and none will recover by itself: why.
    None(String),
    /// Every account that could serve has its `max_concurrent` slots taken: the request may
    /// wait in this account's queue.
    Full(Arc<Entry>),
}

/// Rounded-up seconds until `d` has passed, for `retry-after`.
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn why_none(all: &[Arc<Entry>], tried: &[String]) -> String {
    if all.is_empty() {
        return "no upstream account is configured: add one with `llm-gateway add-api-key`".into();
    }
    let count = |state: State| all.iter().filter(|e| e.state() == state).count();
    let (disabled, needs_login) = (count(State::Disabled), count(State::NeedsLogin));
    if disabled == all.len() {
        return format!(
            "all {} upstream accounts are disabled: enable one with `llm-gateway enable-account`",
            all.len()
        );
    }
    let mut parts = Vec::new();
    if !tried.is_empty() {
        parts.push(format!("{} failed for this request", tried.len()));
    }
    for (n, what) in [
        (disabled, "disabled"),
        (needs_login, "need a new login (oauth-start)"),
        (count(State::NotLoggedIn), "not logged in yet (oauth-start)"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {what}"));
        }
    }
    for e in all {
        if let Credential::Unusable(why) = &e.account.credential {
            parts.push(format!("{} unusable ({why})", e.id()));
        }
    }
    format!("no upstream account is usable: {}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AccountKind, OAuth, Strategy};
    use crate::secret::Secret;

    fn account(id: &str, enabled: bool) -> Account {
        Account {
            id: id.into(),
            name: id.into(),
            kind: AccountKind::ApiKey,
            credential: Credential::ApiKey(Secret::new("sk-ant-x")),
            enabled,
            priority: 0,
            weight: 1,
            quota: Default::default(),
            max_concurrent: None,
            proxy: None,
            ca: None,
            disabled_reason: None,
            created_at: None,
            enabled_at: None,
        }
    }

    fn oauth(id: &str, tokens: Option<Tokens>) -> Account {
        Account {
            kind: AccountKind::Oauth,
            credential: Credential::OAuth(Box::new(OAuth {
                client_id: "c".into(),
                client_secret: None,
                tokens,
                needs_login: false,
                pending: None,
                scopes: None,
                organization: None,
                email: None,
            })),
            ..account(id, true)
        }
    }

    fn tokens(access: &str) -> Tokens {
        Tokens {
            access: Secret::new(access),
            refresh: Secret::new("r"),
            expires_at: u64::MAX,
            issued_at: 0,
        }
    }

    fn settings(strategy: Strategy) -> BalanceSettings {
        BalanceSettings {
            strategy,
            eject_after: 1,
            eject_cooldown: Duration::from_secs(60),
            ..BalanceSettings::test()
        }
    }

    fn pool(accounts: Vec<Account>, strategy: Strategy) -> Accounts {
        let sticky = StickySettings {
            enabled: true,
            ttl: Duration::from_secs(3600),
            max_entries: 100,
            max_per_key: 100,
        };
        Accounts::new(accounts, &settings(strategy), &sticky, None)
    }

    fn ids(accounts: &Accounts, n: usize, tried: &[String], key: Option<u64>) -> Vec<String> {
        (0..n)
            .map(|_| {
                accounts
                    .pick(&Ask {
                        tried,
                        sticky: key.map(|k| Key::new(k, Some("ck_test"))),
                        ..Ask::default()
                    })
                    .expect("usable")
                    .entry
                    .id()
                    .to_string()
            })
            .collect()
    }

    /// The account a plain request gets.
    fn picked(accounts: &Accounts) -> Arc<Entry> {
        Arc::clone(&accounts.pick(&Ask::default()).expect("usable").entry)
    }

    fn cool(accounts: &Accounts, id: &str) {
        let all = accounts.snapshot();
        let e = all.iter().find(|e| e.id() == id).expect("account");
        e.record(Signal::Failure("test".into()), &accounts.settings());
    }

    #[test]
    fn skips_disabled_tried_and_logged_out_accounts() {
        let accounts = pool(
            vec![
                account("a", true),
                account("b", false),
                account("c", true),
                oauth("d", None),
            ],
            Strategy::RoundRobin,
        );
        assert_eq!(ids(&accounts, 4, &[], None), ["a", "c", "a", "c"]);
        assert_eq!(ids(&accounts, 2, &["a".to_string()], None), ["c", "c"]);
    }

    #[test]
    fn lower_tiers_serve_only_when_the_better_tier_is_unavailable() {
        let mut backup = account("backup", true);
        backup.priority = 5;
        let accounts = pool(vec![backup, account("main", true)], Strategy::LeastBusy);
        assert_eq!(ids(&accounts, 3, &[], None), ["main", "main", "main"]);
        cool(&accounts, "main");
        assert_eq!(ids(&accounts, 2, &[], None), ["backup", "backup"]);
    }

    #[test]
    fn all_cooling_is_529_with_the_soonest_return() {
        let accounts = pool(
            vec![account("a", true), account("b", true)],
            Strategy::LeastBusy,
        );
        cool(&accounts, "a");
        cool(&accounts, "b");
        let err = crate::error::ApiError::from(
            accounts.pick(&Ask::default()).err().expect("all cooling"),
        );
        assert_eq!(err.status(), 529);
        assert_eq!(err.error_type(), "overloaded_error");
        let retry = err.retry_after().expect("retry-after");
        assert!((60..=61).contains(&retry), "{retry}");
    }

    #[test]
    fn sticky_keys_stay_and_move_when_the_pinned_account_cools() {
        let accounts = pool(
            vec![account("a", true), account("b", true), account("c", true)],
            Strategy::RoundRobin,
        );
        let first = ids(&accounts, 1, &[], Some(7))[0].clone();
        assert!(
            ids(&accounts, 5, &[], Some(7))
                .iter()
                .all(|id| *id == first)
        );
        cool(&accounts, &first);
        let moved = ids(&accounts, 1, &[], Some(7))[0].clone();
        assert_ne!(moved, first);
        assert!(
            ids(&accounts, 5, &[], Some(7))
                .iter()
                .all(|id| *id == moved),
            "re-pinned"
        );
    }

    #[test]
    fn least_busy_counts_what_is_in_flight() {
        let accounts = pool(
            vec![account("a", true), account("b", true)],
            Strategy::LeastBusy,
        );
        let held: Vec<Pick> = (0..10)
            .map(|_| accounts.pick(&Ask::default()).expect("ok"))
            .collect();
        let on_a = held.iter().filter(|p| p.entry.id() == "a").count();
        assert_eq!(on_a, 5);
        drop(held);
        assert!(accounts.snapshot().iter().all(|e| e.in_flight() == 0));
    }

    /// Not a check: prints what one selection costs, for the closing notes and the benchmark
    /// (`cargo test --release measure_pick -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn measure_pick_cost() {
        for (n, strategy) in [
            (4, Strategy::LeastBusy),
            (32, Strategy::LeastBusy),
            (32, Strategy::RoundRobin),
        ] {
            let list = (0..n).map(|i| account(&format!("a{i}"), true)).collect();
            let accounts = pool(list, strategy);
            let rounds = 200_000u64;
            let started = Instant::now();
            for i in 0..rounds {
                let pick = accounts
                    .pick(&Ask {
                        sticky: Some(Key::new(i % 1000, Some("ck_test"))),
                        ..Ask::default()
                    })
                    .expect("usable");
                std::hint::black_box(&pick);
            }
            let ns = started.elapsed().as_nanos() as f64 / rounds as f64;
            eprintln!("pick with {n} accounts, {strategy:?}, sticky on: {ns:.0} ns");
        }
    }

    #[test]
    fn none_usable_says_why() {
        let none = pool(vec![], Strategy::LeastBusy);
        let err = crate::error::ApiError::from(none.pick(&Ask::default()).err().expect("none"));
        assert!(err.to_string().contains("add-api-key"));
        let off = pool(vec![account("a", false)], Strategy::LeastBusy);
        let err = crate::error::ApiError::from(off.pick(&Ask::default()).err().expect("disabled"));
        assert_eq!(err.status(), 503);
        assert!(err.to_string().contains("enable-account"));
        let mut unset = account("u", true);
        unset.credential = Credential::Unusable("environment variable K is not set".into());
        let err = pool(vec![unset], Strategy::LeastBusy)
            .pick(&Ask::default())
            .err()
            .expect("unusable");
        assert!(matches!(&err, Unavailable::None(why) if why.contains("K is not set")));
        let login = pool(vec![oauth("o", None)], Strategy::LeastBusy);
        let err = crate::error::ApiError::from(login.pick(&Ask::default()).err().expect("login"));
        assert!(err.to_string().contains("oauth-start"));
    }

    fn issued(access: &str, issued_at: u64) -> Tokens {
        Tokens {
            issued_at,
            ..tokens(access)
        }
    }

    fn stored(access: &str, issued_at: u64, needs_login: bool) -> Stored {
        Stored {
            tokens: issued(access, issued_at),
            needs_login,
        }
    }

    #[test]
    fn shared_tokens_newer_wins_and_a_needs_login_sticks_to_its_tokens() {
        let access = |live: &Live| live.tokens.as_ref().map(|t| t.access.expose().to_string());
        // Redis has nothing: ours are offered, unless a login is needed.
        let mut live = Live {
            tokens: Some(issued("mine", 10)),
            ..Live::default()
        };
        assert_eq!(adopt_stored(&mut live, None), Some(issued("mine", 10)));
        live.needs_login = true;
        assert_eq!(adopt_stored(&mut live, None), None);
        // Newer in Redis: taken, with its needs_login (a login elsewhere clears ours).
        assert_eq!(
            adopt_stored(&mut live, Some(&stored("theirs", 20, false))),
            None
        );
        assert_eq!(access(&live).as_deref(), Some("theirs"));
        assert!(!live.needs_login);
        // Ours newer (a login here): offered, not replaced.
        live.tokens = Some(issued("login", 30));
        let offer = adopt_stored(&mut live, Some(&stored("theirs", 20, false)));
        assert_eq!(offer, Some(issued("login", 30)));
        assert_eq!(access(&live).as_deref(), Some("login"));
        // The same tokens: a needs_login found on either side stays.
        assert_eq!(
            adopt_stored(&mut live, Some(&stored("login", 30, true))),
            None
        );
        assert!(live.needs_login);
        assert_eq!(
            adopt_stored(&mut live, Some(&stored("login", 30, false))),
            None
        );
        assert!(live.needs_login, "not cleared by the same tokens unmarked");
        // Nothing held: whatever Redis has.
        let mut empty = Live::default();
        assert_eq!(adopt_stored(&mut empty, Some(&stored("r", 1, true))), None);
        assert!(empty.needs_login);
    }

    #[test]
    fn shared_cooldowns_extend_and_shared_bans_come_and_go() {
        let accounts = pool(vec![account("a", true)], Strategy::LeastBusy);
        let e = Arc::clone(&accounts.snapshot()[0]);
        let now = Now {
            instant: Instant::now(),
            unix_ms: 1_000_000,
        };
        let cool = (1_060_000, "rate limited elsewhere".to_string());
        let found = |cool, ban| Found {
            cool,
            ban,
            quota: None,
        };
        e.adopt(&mut e.live(), found(Some(&cool), None), now);
        let c = e.live().health.cooldown.clone().expect("adopted");
        assert_eq!(c.until_unix_ms, 1_060_000);
        assert_eq!(c.until, now.instant + Duration::from_secs(60));
        assert!(!e.live().health.available(now.instant));
        // A shorter or past one changes nothing.
        let (short, past) = ((1_010_000, "short".into()), (999_000, "past".into()));
        e.adopt(&mut e.live(), found(Some(&short), None), now);
        e.adopt(&mut e.live(), found(Some(&past), None), now);
        assert_eq!(e.live().health.cooldown.as_ref(), Some(&c));
        // A ban from elsewhere disables; its lifting enables again.
        let banned = "banned".to_string();
        e.adopt(&mut e.live(), found(None, Some(&banned)), now);
        assert!(!e.usable());
        e.adopt(&mut e.live(), found(None, None), now);
        assert!(e.usable());
        // A ban seen here is not lifted by Redis having none.
        e.live().disabled_reason = Some("seen here".into());
        e.adopt(&mut e.live(), found(None, None), now);
        assert!(!e.usable());
    }

    #[test]
    fn reload_keeps_unpersisted_tokens_and_adopts_the_files_otherwise() {
        let accounts = pool(
            vec![oauth("o", Some(tokens("file-1")))],
            Strategy::LeastBusy,
        );
        let entry = picked(&accounts);
        entry.live().tokens = Some(tokens("memory-2"));
        entry.live().persist_error = Some("disk full".into());
        accounts.replace(vec![oauth("o", Some(tokens("file-1")))]);
        let entry = picked(&accounts);
        let access = |e: &Entry| e.live().tokens.as_ref().map(|t| t.access.clone());
        assert_eq!(access(&entry), Some(Secret::new("memory-2")));
        entry.live().persist_error = None;
        accounts.replace(vec![oauth("o", Some(tokens("file-3")))]);
        let entry = picked(&accounts);
        assert_eq!(access(&entry), Some(Secret::new("file-3")));
    }

    #[test]
    fn transitions_keep_the_newer_token_and_say_whether_it_is_saved() {
        let accounts = pool(
            vec![oauth("o", Some(tokens("file-1")))],
            Strategy::LeastBusy,
        );
        let entry = picked(&accounts);
        let newer = Tokens {
            issued_at: 20,
            ..tokens("refreshed-2")
        };
        entry.refreshed(&newer, Err("disk full".into()));
        let view = entry.view();
        assert_eq!(view.tokens.as_ref(), Some(&newer));
        assert_eq!(view.persist_error.as_deref(), Some("disk full"));
        assert_eq!(view.refreshes_ok, 1);
        // An older copy read from the file does not replace the refreshed tokens.
        let older = Tokens {
            issued_at: 10,
            ..tokens("file-1")
        };
        assert_eq!(entry.adopt_tokens(older), newer);
        entry.unsaved(None);
        assert_eq!(entry.view().persist_error, None);
        // A later login in the file wins.
        let login = Tokens {
            issued_at: 30,
            ..tokens("login-3")
        };
        assert_eq!(entry.adopt_tokens(login.clone()), login);
        // Failures back off by their count; a refused refresh token means a new login.
        let (n, wait) =
            entry.refresh_failed("timeout".into(), |n| Duration::from_secs(u64::from(n) * 7));
        assert_eq!((n, wait), (1, Duration::from_secs(7)));
        let (n, _) = entry.refresh_failed("timeout".into(), |_| Duration::ZERO);
        assert_eq!(n, 2);
        entry.needs_login(true);
        let view = entry.view();
        assert!(view.needs_login);
        assert_eq!(view.refreshes_failed, 3);
        assert!(!entry.usable());
        // One probe at a time.
        let probe = entry.start_probe().expect("the first probe");
        assert!(entry.start_probe().is_none());
        drop(probe);
        assert!(entry.start_probe().is_some());
    }

    #[test]
    fn a_request_that_must_wait_elsewhere_moves_its_place_and_keeps_its_deadline() {
        let accounts = pool(
            vec![account("a", true), account("b", true)],
            Strategy::LeastBusy,
        );
        let all = accounts.snapshot();
        let (a, b) = (&all[0], &all[1]);
        let mut queued = None;
        // A pick ended since `seen`: each wait returns at once, with the place taken.
        let seen = accounts.ended().wrapping_sub(1);
        assert_eq!(accounts.wait(a, &mut queued, seen, || false), Ok(()));
        let until = queued.as_ref().map(|q: &Queued| q.until).expect("queued");
        assert_eq!((a.queued(), b.queued()), (1, 0));
        assert_eq!(accounts.wait(b, &mut queued, seen, || false), Ok(()));
        assert_eq!(
            (a.queued(), b.queued()),
            (0, 1),
            "no stale place left in a's queue"
        );
        assert_eq!(
            queued.as_ref().map(|q| q.until),
            Some(until),
            "the deadline stays"
        );
    }
}
