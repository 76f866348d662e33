//! OAuth token refresh. At most one refresh per account at a time, across the refresher
//! thread, request threads and other processes: a per-account lock file, then a re-read of the
//! account's tokens from config.yaml (someone else may have refreshed or logged in again), and
//! only then, if still needed, one call to the token endpoint. Rotated tokens are written to
//! config.yaml before they are used; if that write fails they are kept in memory, retried, and
//! reported, never dropped silently.
//!
//! With shared state (`state.backend: redis`) the tokens live in Redis and the lock is a Redis
//! lease with a fencing value, taken after the local lock: the holder re-reads the tokens,
//! refreshes, stores the rotated pair while its fence still holds, then releases. Others wait
//! for its tokens. Without the lease (Redis down) nothing is refreshed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::accounts::{Accounts, Entry};
use crate::config::{self, OAuthSettings, Tokens};
use crate::oauth::{Client, TokenEndpoint, TokenError};
use crate::secret::Secret;
use crate::shared::{Lease, Shared};
use crate::store;
use crate::time::now_unix;

/// A token this close to expiry is treated as expired when a request is about to use it.
const EXPIRY_SKEW_SECS: u64 = 60;
/// Backoff after failed refreshes: 5 s, doubling, at most 5 minutes.
const BACKOFF_START: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Why tokens are wanted.
#[derive(Debug, Clone)]
pub enum Need {
    /// The refresher found the token inside its lead window.
    Due,
    /// A request is about to use a token that is (nearly) expired.
    Expired,
    /// The upstream answered 401 to this token, which we believed valid.
    Rejected(Secret),
}

#[derive(Debug, Clone)]
pub enum RefreshError {
    /// The refresh token is dead or the account was never logged in: a person must log in.
    NeedsLogin(String),
    /// The refresh failed or is backing off after failures; other accounts should serve.
    Unavailable(String),
}

impl std::fmt::Display for RefreshError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RefreshError::NeedsLogin(m) => write!(f, "needs a new login: {m}"),
            RefreshError::Unavailable(m) => write!(f, "token refresh unavailable: {m}"),
        }
    }
}

pub struct Refresher {
    path: PathBuf,
    settings: OAuthSettings,
    endpoint: TokenEndpoint,
    shared: Option<Arc<Shared>>,
}

/// What `take_lease` found: fresh tokens another holder stored, or the lease (`None` without
/// shared state) and the tokens to refresh.
enum Leased<'s> {
    Done(Tokens),
    Held(Tokens, Option<Lease<'s>>),
}

/// How often a request waiting for another instance's refresh looks at Redis.
const AWAIT_POLL: Duration = Duration::from_millis(20);

impl Refresher {
    pub fn new(path: PathBuf, settings: &OAuthSettings, shared: Option<Arc<Shared>>) -> Refresher {
        Refresher {
            path,
            settings: settings.clone(),
            endpoint: TokenEndpoint::new(settings),
            shared,
        }
    }

    /// The shared lease outlives a token endpoint call that times out, and the store after it.
    fn lease_ttl(&self) -> Duration {
        self.settings.token_timeout * 2 + Duration::from_secs(2)
    }

    /// The lead for `tokens`: the configured one, but at most half the token's lifetime, so a
    /// short-lived token is not refreshed continuously.
    fn lead(&self, tokens: &Tokens) -> u64 {
        let lead = self.settings.refresh_lead.as_secs();
        if tokens.issued_at > 0 && tokens.expires_at > tokens.issued_at {
            lead.min((tokens.expires_at - tokens.issued_at) / 2)
        } else {
            lead
        }
    }

    fn satisfied(&self, need: &Need, tokens: &Tokens, now: u64) -> bool {
        match need {
            Need::Due => now + self.lead(tokens) < tokens.expires_at,
            Need::Expired => now + EXPIRY_SKEW_SECS < tokens.expires_at,
            Need::Rejected(bad) => {
                tokens.access != *bad && now + EXPIRY_SKEW_SECS < tokens.expires_at
            }
        }
    }

    /// Tokens for `entry` good enough for `need`, refreshing at most once across every
    /// thread and process: what is held, else under the account's lock what the file or
    /// Redis holds now, else (under the shared lease) one call to the token endpoint.
    pub fn ensure(&self, entry: &Entry, need: Need) -> Result<Tokens, RefreshError> {
        let Some(oauth) = entry.account.oauth() else {
            return Err(RefreshError::Unavailable("not an OAuth account".into()));
        };
        if let Some(held) = self.held(entry, &need) {
            return held;
        }
        let _lock = store::account_lock(&self.path, entry.id())
            .map_err(|e| RefreshError::Unavailable(e.to_string()))?;
        let current = self.current_tokens(entry)?;
        if self.satisfied(&need, &current, now_unix()) {
            return Ok(current);
        }
        self.check_interval(entry)?;
        let (current, lease) = match self.take_lease(entry, &need, current)? {
            Leased::Done(tokens) => return Ok(tokens),
            Leased::Held(current, lease) => (current, lease),
        };
        let client = Client {
            id: &oauth.client_id,
            secret: oauth.client_secret.as_ref(),
            via: entry.egress(),
        };
        match self.endpoint.refresh(&client, &current.refresh) {
            Ok(grant) => Ok(self.refreshed(entry, grant, current, lease)),
            Err(TokenError::InvalidGrant(message)) => {
                Err(self.refused(entry, message, &current, lease.as_ref()))
            }
            Err(e) => Err(self.failed(entry, &e)),
        }
    }

    /// The answer from what this process holds, without any lock: a login needed, tokens
    /// good enough, or a refresh backing off; `None` when a refresh may be needed.
    fn held(&self, entry: &Entry, need: &Need) -> Option<Result<Tokens, RefreshError>> {
        let live = entry.view();
        if live.needs_login {
            return Some(Err(RefreshError::NeedsLogin(format!(
                "account {} needs a new login (oauth-start)",
                entry.id()
            ))));
        }
        if let Some(t) = live.tokens
            && self.satisfied(need, &t, now_unix())
        {
            return Some(Ok(t));
        }
        if let Some(at) = live.next_refresh_attempt
            && Instant::now() < at
            && !matches!(need, Need::Rejected(_))
        {
            return Some(Err(RefreshError::Unavailable(format!(
                "backing off after {} failed refreshes: {}",
                live.refresh_failures,
                live.last_refresh_error.as_deref().unwrap_or("")
            ))));
        }
        None
    }

    /// Refuses a second refresh of one account within `oauth.refresh_min_interval`.
    fn check_interval(&self, entry: &Entry) -> Result<(), RefreshError> {
        match entry.view().last_refresh {
            Some(last) if last.elapsed() < self.settings.refresh_min_interval => {
                Err(RefreshError::Unavailable(format!(
                    "refreshed {}s ago; not again within {}s",
                    last.elapsed().as_secs(),
                    self.settings.refresh_min_interval.as_secs()
                )))
            }
            _ => Ok(()),
        }
    }

    /// With shared state, takes the account's lease, or waits for the instance holding it.
    /// Another holder may end without fresh tokens (it failed, or died and its lease
    /// lapsed): then the lease is taken here, once more at most.
    fn take_lease<'s>(
        &'s self,
        entry: &Entry,
        need: &Need,
        current: Tokens,
    ) -> Result<Leased<'s>, RefreshError> {
        let Some(shared) = &self.shared else {
            return Ok(Leased::Held(current, None));
        };
        for round in 0..2 {
            match shared.lease(entry.id(), self.lease_ttl()) {
                Ok(Some(held)) => {
                    // The last holder may have stored fresh tokens just before releasing.
                    let current = self.current_tokens(entry)?;
                    if self.satisfied(need, &current, now_unix()) {
                        return Ok(Leased::Done(current));
                    }
                    return Ok(Leased::Held(current, Some(held)));
                }
                Ok(None) if matches!(need, Need::Due) => {
                    return Err(RefreshError::Unavailable(
                        "another instance is refreshing this account".into(),
                    ));
                }
                Ok(None) => {
                    if let Some(tokens) = self.await_holder(shared, entry, need)? {
                        return Ok(Leased::Done(tokens));
                    }
                    if round == 1 {
                        break;
                    }
                }
                Err(e) => {
                    return Err(RefreshError::Unavailable(format!(
                        "{e}; a token is refreshed only under the shared lease"
                    )));
                }
            }
        }
        Err(RefreshError::Unavailable(
            "other instances' refreshes ended without fresh tokens".into(),
        ))
    }

    /// The token endpoint granted new tokens: persisted before use (a rotated refresh token
    /// exists nowhere else), then in use, saved or not.
    fn refreshed(
        &self,
        entry: &Entry,
        grant: crate::oauth::Grant,
        current: Tokens,
        lease: Option<Lease<'_>>,
    ) -> Tokens {
        let now = now_unix();
        let tokens = Tokens {
            access: grant.access_token,
            // A response without a refresh token keeps the old one.
            refresh: grant.refresh_token.unwrap_or(current.refresh),
            expires_at: grant.expires_at,
            issued_at: now,
        };
        let persisted = self.persist(entry, &tokens, lease.as_ref());
        drop(lease);
        match &persisted {
            Ok(()) => info!(
                "refreshed the token of account {} ({}); it expires in {}",
                entry.id(),
                entry.account.name,
                crate::time::human_duration(tokens.expires_at.saturating_sub(now))
            ),
            Err(e) => error!(
                "refreshed the token of account {} but could NOT save it: {e}. \
                 The new tokens live only in this process until a retry succeeds",
                entry.id(),
            ),
        }
        entry.refreshed(&tokens, persisted);
        tokens
    }

    /// The token endpoint refused the refresh token: a person must log in again, as this
    /// process, other instances and config.yaml are told.
    fn refused(
        &self,
        entry: &Entry,
        message: String,
        current: &Tokens,
        lease: Option<&Lease<'_>>,
    ) -> RefreshError {
        entry.needs_login(true);
        error!(
            "account {} ({}) needs a new login: {message}",
            entry.id(),
            entry.account.name
        );
        if let Some(lease) = lease
            && let Err(e) = lease.needs_login(current.issued_at)
        {
            error!(
                "could not tell other instances that account {} needs a login: {e}",
                entry.id()
            );
        }
        if let Err(e) = store::mark_needs_login(&self.path, entry.id()) {
            error!(
                "could not record that account {} needs a login: {e}",
                entry.id()
            );
        }
        RefreshError::NeedsLogin(message)
    }

    /// A refresh failed for a reason that may pass: the next one backs off.
    fn failed(&self, entry: &Entry, e: &TokenError) -> RefreshError {
        let (failures, backoff) = entry.refresh_failed(e.to_string(), |failures| {
            BACKOFF_START
                .saturating_mul(1 << (failures - 1).min(10))
                .min(BACKOFF_MAX)
        });
        warn!(
            "refreshing account {} failed ({failures} in a row, next try in {}s): {e}",
            entry.id(),
            backoff.as_secs()
        );
        RefreshError::Unavailable(e.to_string())
    }

    /// Stores rotated tokens: in Redis under the lease (and config.yaml as this instance's
    /// copy), or in config.yaml.
    fn persist(
        &self,
        entry: &Entry,
        tokens: &Tokens,
        lease: Option<&Lease<'_>>,
    ) -> Result<(), String> {
        let Some(lease) = lease else {
            return store::save_tokens(&self.path, entry.id(), tokens, None)
                .map_err(|e| format!("{e} ({})", self.path.display()));
        };
        match lease.store(entry.id(), tokens) {
            Ok(true) => {
                if let Err(e) = store::save_tokens(&self.path, entry.id(), tokens, None) {
                    warn!(
                        "account {}: tokens stored in Redis, but not in {}: {e}",
                        entry.id(),
                        self.path.display()
                    );
                }
                Ok(())
            }
            Ok(false) => Err("the refresh lease expired before the tokens were stored".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Another instance holds the lease: waits for the tokens it stores, as long as a live
    /// holder can take (one token endpoint call and the store), not the whole lease: a request
    /// should fail over rather than sit out a dead holder's lease. `None` when the lease ended
    /// without tokens.
    fn await_holder(
        &self,
        shared: &Shared,
        entry: &Entry,
        need: &Need,
    ) -> Result<Option<Tokens>, RefreshError> {
        let deadline = Instant::now() + self.settings.token_timeout + Duration::from_secs(2);
        let unavailable = |e: crate::shared::Down| RefreshError::Unavailable(e.to_string());
        loop {
            std::thread::sleep(AWAIT_POLL);
            // Lease first: the holder stores, then releases, so tokens read after a released
            // lease include what it stored.
            let leased = shared.leased(entry.id()).map_err(unavailable)?;
            let current = self.shared_tokens(shared, entry)?;
            if let Some(tokens) = current
                && self.satisfied(need, &tokens, now_unix())
            {
                return Ok(Some(tokens));
            }
            if !leased {
                return Ok(None);
            }
            if Instant::now() >= deadline {
                return Err(RefreshError::Unavailable(
                    "timed out waiting for another instance's refresh".into(),
                ));
            }
        }
    }

    /// The tokens in Redis, adopted when as new as ours or newer (ours offered when newer).
    fn shared_tokens(
        &self,
        shared: &Shared,
        entry: &Entry,
    ) -> Result<Option<Tokens>, RefreshError> {
        let stored = shared
            .tokens(&[entry.id()])
            .map_err(|e| RefreshError::Unavailable(e.to_string()))?
            .pop()
            .flatten();
        // Redis answered just now; an offer that fails here is retried by the sync.
        let _ = entry.meet_stored(shared, stored.as_ref());
        let live = entry.view();
        if live.needs_login {
            return Err(RefreshError::NeedsLogin(
                "marked in the shared state (another instance's refresh was refused)".into(),
            ));
        }
        Ok(live.tokens)
    }

    /// The account's tokens as they are now: from Redis with shared state, else (or when
    /// neither holds any) from config.yaml, adopting them; unless this process holds newer
    /// ones it has not managed to save.
    fn current_tokens(&self, entry: &Entry) -> Result<Tokens, RefreshError> {
        let live = entry.view();
        if live.persist_error.is_some() {
            return (live.tokens).ok_or_else(|| RefreshError::Unavailable("no tokens".into()));
        }
        if let Some(shared) = &self.shared
            && let Some(tokens) = self.shared_tokens(shared, entry)?
        {
            return Ok(tokens);
        }
        let config = config::load(&self.path)
            .map_err(|e| RefreshError::Unavailable(format!("cannot read the config: {e}")))?;
        let account = config
            .accounts
            .into_iter()
            .find(|a| a.id == entry.id())
            .ok_or_else(|| RefreshError::Unavailable("the account was removed".into()))?;
        let oauth = account
            .oauth()
            .ok_or_else(|| RefreshError::Unavailable("no longer an OAuth account".into()))?;
        if oauth.needs_login {
            entry.needs_login(false);
            return Err(RefreshError::NeedsLogin("marked in the config".into()));
        }
        let tokens = oauth
            .tokens
            .clone()
            .ok_or_else(|| RefreshError::NeedsLogin("never logged in".into()))?;
        let tokens = entry.adopt_tokens(tokens);
        if let Some(shared) = &self.shared {
            let _ = shared.offer(entry.id(), &tokens);
        }
        Ok(tokens)
    }

    /// One pass of the refresher thread: refresh what is due, retry unsaved tokens.
    pub fn tick(&self, accounts: &Accounts) {
        let now = now_unix();
        for entry in accounts.snapshot().iter() {
            if entry.account.oauth().is_none() || !entry.account.enabled {
                continue;
            }
            let (due, unsaved) = {
                let live = entry.view();
                if live.needs_login || live.disabled {
                    continue;
                }
                let Some(tokens) = &live.tokens else { continue };
                let waiting = live
                    .next_refresh_attempt
                    .is_some_and(|at| Instant::now() < at);
                let recent = live
                    .last_refresh
                    .is_some_and(|t| t.elapsed() < self.settings.refresh_min_interval);
                let due = !self.satisfied(&Need::Due, tokens, now) && !waiting && !recent;
                let unsaved = live.persist_error.is_some().then(|| tokens.clone());
                (due, unsaved)
            };
            // With shared state, `Accounts::sync` offers unsaved tokens to Redis.
            if let Some(tokens) = unsaved.filter(|_| self.shared.is_none()) {
                self.retry_save(entry, &tokens);
            }
            if due {
                let _ = self.ensure(entry, Need::Due);
            }
        }
    }

    fn retry_save(&self, entry: &Entry, tokens: &Tokens) {
        let Ok(_lock) = store::account_lock(&self.path, entry.id()) else {
            return;
        };
        match store::save_tokens(&self.path, entry.id(), tokens, None) {
            Ok(()) => {
                entry.unsaved(None);
                info!("saved the rotated tokens of account {} at last", entry.id());
            }
            Err(e) => {
                entry.unsaved(Some(e.to_string()));
                warn!(
                    "still cannot save the rotated tokens of account {}: {e}",
                    entry.id()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(lead: u64) -> OAuthSettings {
        OAuthSettings {
            authorize_url: String::new(),
            token_url: "http://127.0.0.1:9/token".into(),
            redirect_uri: String::new(),
            scopes: String::new(),
            system_prompt: String::new(),
            refresh_lead: Duration::from_secs(lead),
            refresh_min_interval: Duration::from_secs(30),
            token_timeout: Duration::from_secs(1),
        }
    }

    fn tokens(issued_at: u64, expires_at: u64) -> Tokens {
        Tokens {
            access: Secret::new("a"),
            refresh: Secret::new("r"),
            expires_at,
            issued_at,
        }
    }

    #[test]
    fn lead_is_at_most_half_the_lifetime() {
        let r = Refresher::new(PathBuf::from("/x"), &settings(600), None);
        assert_eq!(
            r.lead(&tokens(0, 28_800)),
            600,
            "unknown issue time: configured lead"
        );
        assert_eq!(r.lead(&tokens(1000, 1000 + 28_800)), 600);
        assert_eq!(
            r.lead(&tokens(1000, 1060)),
            30,
            "a 60 s token is refreshed at half-life"
        );
    }

    #[test]
    fn needs_are_judged_against_expiry() {
        let r = Refresher::new(PathBuf::from("/x"), &settings(600), None);
        let t = tokens(0, 10_000);
        assert!(r.satisfied(&Need::Due, &t, 9_000));
        assert!(!r.satisfied(&Need::Due, &t, 9_500));
        assert!(r.satisfied(&Need::Expired, &t, 9_900));
        assert!(!r.satisfied(&Need::Expired, &t, 9_950));
        assert!(!r.satisfied(&Need::Rejected(Secret::new("a")), &t, 0));
        assert!(r.satisfied(&Need::Rejected(Secret::new("old")), &t, 0));
    }
}
