//! Account state: the one owner of the runtime view of upstream accounts, behind one RwLock.
//! Each entry pairs the account as configured with its live state (OAuth tokens in use,
//! refresh bookkeeping, a ban noticed at run time). Config reloads replace the list and carry
//! the live state over by account id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use crate::config::{Account, Credential, Tokens};
use crate::error::ApiError;

pub struct Accounts {
    list: RwLock<Arc<Vec<Arc<Entry>>>>,
    /// Round-robin cursor over the usable accounts.
    next: AtomicUsize,
}

/// One account and what the gateway has learned about it since loading it.
#[derive(Debug)]
pub struct Entry {
    pub account: Account,
    /// Shared with the entry this one replaced at a reload, so a refresh finishing on an old
    /// entry still lands where new requests look.
    live: Arc<Mutex<Live>>,
}

#[derive(Debug, Clone, Default)]
pub struct Live {
    /// The OAuth tokens in use. Newer than the file's while `persist_error` is set.
    pub tokens: Option<Tokens>,
    /// invalid_grant seen: a person must log in again.
    pub needs_login: bool,
    /// A permanent failure seen at run time (a ban): the account is out of service.
    pub disabled_reason: Option<String>,
    /// Consecutive failed refresh attempts, and when the next may be made.
    pub refresh_failures: u32,
    pub next_refresh_attempt: Option<Instant>,
    pub last_refresh: Option<Instant>,
    pub last_refresh_error: Option<String>,
    /// Rotated tokens could not be written to config.yaml: they exist only in memory until a
    /// retry succeeds. Shown loudly; never silent.
    pub persist_error: Option<String>,
}

impl Entry {
    fn new(account: Account, previous: Option<&Entry>) -> Entry {
        let shared = previous
            .filter(|p| p.account.kind == account.kind)
            .map(|p| Arc::clone(&p.live))
            .unwrap_or_default();
        {
            let mut live = shared.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(oauth) = account.oauth() {
                // The file is the truth, except for tokens we rotated but could not write yet.
                if live.persist_error.is_none() {
                    live.tokens = oauth.tokens.clone();
                }
                live.needs_login = oauth.needs_login;
            }
            if account.enabled {
                live.disabled_reason = None;
            }
        }
        Entry {
            account,
            live: shared,
        }
    }

    pub fn live(&self) -> MutexGuard<'_, Live> {
        // Live state is plain data, consistent after every assignment: poison carries no news.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn id(&self) -> &str {
        &self.account.id
    }

    /// Whether requests may be sent with this account now.
    pub fn usable(&self) -> bool {
        if !self.account.enabled {
            return false;
        }
        let live = self.live();
        if live.disabled_reason.is_some() {
            return false;
        }
        match &self.account.credential {
            Credential::ApiKey(_) => true,
            Credential::OAuth(_) => !live.needs_login && live.tokens.is_some(),
            Credential::Unusable(_) => false,
        }
    }

    /// `enabled`, `disabled`, `needs_login`, `not_logged_in`, `unusable`: for lists and status.
    pub fn state(&self) -> &'static str {
        let live = self.live();
        if !self.account.enabled || live.disabled_reason.is_some() {
            return "disabled";
        }
        match &self.account.credential {
            Credential::OAuth(_) if live.needs_login => "needs_login",
            Credential::OAuth(_) if live.tokens.is_none() => "not_logged_in",
            Credential::Unusable(_) => "unusable",
            _ => "enabled",
        }
    }
}

impl Accounts {
    pub fn new(accounts: Vec<Account>) -> Accounts {
        let list = accounts
            .into_iter()
            .map(|a| Arc::new(Entry::new(a, None)))
            .collect();
        Accounts {
            list: RwLock::new(Arc::new(list)),
            next: AtomicUsize::new(0),
        }
    }

    /// Replaces the account list after the config changed, keeping live state by id.
    pub fn replace(&self, accounts: Vec<Account>) {
        let old = self.snapshot();
        let by_id: HashMap<&str, &Arc<Entry>> = old.iter().map(|e| (e.id(), e)).collect();
        let fresh: Vec<Arc<Entry>> = accounts
            .into_iter()
            .map(|a| {
                let previous = by_id.get(a.id.as_str()).map(|e| e.as_ref());
                Arc::new(Entry::new(a, previous))
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

    /// Picks the next usable account not in `tried`, round robin, or says why there is none.
    pub fn pick(&self, tried: &[String]) -> Result<Arc<Entry>, ApiError> {
        let all = self.snapshot();
        let candidates: Vec<&Arc<Entry>> = all
            .iter()
            .filter(|e| !tried.iter().any(|t| t == e.id()) && e.usable())
            .collect();
        if candidates.is_empty() {
            return Err(ApiError::NoAccount(why_none(&all, tried)));
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed) % candidates.len();
        Ok(Arc::clone(candidates[n]))
    }

    pub fn len(&self) -> usize {
        self.snapshot().len()
    }
}

fn why_none(all: &[Arc<Entry>], tried: &[String]) -> String {
    if all.is_empty() {
        return "no upstream account is configured: add one with `llm-gateway add-api-key`".into();
    }
    let count = |state: &str| all.iter().filter(|e| e.state() == state).count();
    let (disabled, needs_login) = (count("disabled"), count("needs_login"));
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
        (count("not_logged_in"), "not logged in yet (oauth-start)"),
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
    use crate::config::{AccountKind, OAuth};
    use crate::secret::Secret;

    fn account(id: &str, enabled: bool) -> Account {
        Account {
            id: id.into(),
            name: id.into(),
            kind: AccountKind::ApiKey,
            credential: Credential::ApiKey(Secret::new("sk-ant-x")),
            enabled,
            disabled_reason: None,
            created_at: None,
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

    fn ids(accounts: &Accounts, n: usize, tried: &[String]) -> Vec<String> {
        (0..n)
            .map(|_| accounts.pick(tried).expect("usable").id().to_string())
            .collect()
    }

    #[test]
    fn round_robin_skips_disabled_tried_and_logged_out_accounts() {
        let accounts = Accounts::new(vec![
            account("a", true),
            account("b", false),
            account("c", true),
            oauth("d", None),
        ]);
        assert_eq!(ids(&accounts, 4, &[]), ["a", "c", "a", "c"]);
        assert_eq!(ids(&accounts, 2, &["a".to_string()]), ["c", "c"]);
    }

    #[test]
    fn none_usable_says_why() {
        let none = Accounts::new(vec![]);
        assert!(
            none.pick(&[])
                .expect_err("none")
                .to_string()
                .contains("add-api-key")
        );
        let off = Accounts::new(vec![account("a", false)]);
        let err = off.pick(&[]).expect_err("disabled");
        assert_eq!(err.status(), 503);
        assert!(err.to_string().contains("enable-account"));
        let mut unset = account("u", true);
        unset.credential = Credential::Unusable("environment variable K is not set".into());
        let err = Accounts::new(vec![unset]).pick(&[]).expect_err("unusable");
        assert!(err.to_string().contains("K is not set"));
        let login = Accounts::new(vec![oauth("o", None)]);
        assert!(
            login
                .pick(&[])
                .expect_err("login")
                .to_string()
                .contains("oauth-start")
        );
    }

    #[test]
    fn reload_keeps_unpersisted_tokens_and_adopts_the_files_otherwise() {
        let accounts = Accounts::new(vec![oauth("o", Some(tokens("file-1")))]);
        let entry = accounts.pick(&[]).expect("usable");
        entry.live().tokens = Some(tokens("memory-2"));
        entry.live().persist_error = Some("disk full".into());
        accounts.replace(vec![oauth("o", Some(tokens("file-1")))]);
        let entry = accounts.pick(&[]).expect("usable");
        let access = |e: &Entry| e.live().tokens.as_ref().map(|t| t.access.clone());
        assert_eq!(access(&entry), Some(Secret::new("memory-2")));
        entry.live().persist_error = None;
        accounts.replace(vec![oauth("o", Some(tokens("file-3")))]);
        let entry = accounts.pick(&[]).expect("usable");
        assert_eq!(access(&entry), Some(Secret::new("file-3")));
    }
}
