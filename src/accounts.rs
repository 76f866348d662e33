//! Account state: the one owner of the runtime view of upstream accounts, behind one RwLock.
//! Everything else asks it for an account to use; config reloads replace its contents.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::config::{Account, Credential};
use crate::error::ApiError;

pub struct Accounts {
    /// Enabled-or-not, usable-or-not: the whole configured list, in config order.
    list: RwLock<Arc<Vec<Arc<Account>>>>,
    /// Round-robin cursor over the usable accounts.
    next: AtomicUsize,
}

impl Accounts {
    pub fn new(accounts: Vec<Account>) -> Accounts {
        Accounts {
            list: RwLock::new(Arc::new(accounts.into_iter().map(Arc::new).collect())),
            next: AtomicUsize::new(0),
        }
    }

    /// Replaces the account list after the config changed.
    pub fn replace(&self, accounts: Vec<Account>) {
        let fresh = Arc::new(accounts.into_iter().map(Arc::new).collect());
        match self.list.write() {
            Ok(mut guard) => *guard = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
    }

    fn snapshot(&self) -> Arc<Vec<Arc<Account>>> {
        match self.list.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Picks the next usable account, round robin, or says why there is none.
    pub fn pick(&self) -> Result<Arc<Account>, ApiError> {
        let all = self.snapshot();
        let usable = |a: &Account| a.enabled && matches!(a.credential, Credential::ApiKey(_));
        let count = all.iter().filter(|a| usable(a)).count();
        if count == 0 {
            return Err(ApiError::NoAccount(why_none(&all)));
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed) % count;
        all.iter()
            .filter(|a| usable(a))
            .nth(n)
            .cloned()
            .ok_or_else(|| ApiError::NoAccount(why_none(&all)))
    }

    pub fn len(&self) -> usize {
        self.snapshot().len()
    }
}

fn why_none(all: &[Arc<Account>]) -> String {
    if all.is_empty() {
        return "no upstream account is configured: add one with `llm-gateway add-api-key`".into();
    }
    let disabled = all.iter().filter(|a| !a.enabled).count();
    if disabled == all.len() {
        return format!(
            "all {} upstream accounts are disabled: enable one with `llm-gateway enable-account`",
            all.len()
        );
    }
    let reasons: Vec<String> = all
        .iter()
        .filter_map(|a| match &a.credential {
            Credential::Unusable(why) if a.enabled => Some(format!("{} ({why})", a.id)),
            _ => None,
        })
        .collect();
    format!(
        "no upstream account is usable: {disabled} disabled, unusable: {}",
        reasons.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AccountKind;
    use crate::secret::Secret;

    fn account(id: &str, enabled: bool) -> Account {
        Account {
            id: id.into(),
            name: id.into(),
            kind: AccountKind::ApiKey,
            credential: Credential::ApiKey(Secret::new("sk-ant-x")),
            enabled,
            created_at: None,
        }
    }

    #[test]
    fn round_robin_skips_disabled_accounts() {
        let accounts = Accounts::new(vec![
            account("a", true),
            account("b", false),
            account("c", true),
        ]);
        let picks: Vec<String> = (0..4)
            .map(|_| accounts.pick().expect("usable").id.clone())
            .collect();
        assert_eq!(picks, ["a", "c", "a", "c"]);
    }

    #[test]
    fn none_usable_says_why() {
        let none = Accounts::new(vec![]);
        assert!(
            none.pick()
                .expect_err("none")
                .to_string()
                .contains("add-api-key")
        );
        let off = Accounts::new(vec![account("a", false)]);
        let err = off.pick().expect_err("disabled");
        assert_eq!(err.status(), 503);
        assert!(err.to_string().contains("enable-account"));
        let mut unset = account("u", true);
        unset.credential = Credential::Unusable("environment variable K is not set".into());
        let err = Accounts::new(vec![unset]).pick().expect_err("unusable");
        assert!(err.to_string().contains("K is not set"));
    }
}
