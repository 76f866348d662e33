//! Commands for API-key accounts and account state: add, list, set, enable, disable, remove.

use std::path::Path;

use argh::FromArgs;
use serde_json::json;

use super::{CliError, Exit, check_name, new_id, print_json, print_table, read_secret};
use crate::accounts::Accounts;
use crate::config::{self, AccountKind, RawAccount};
use crate::store::{self, ChangeError};

#[derive(FromArgs)]
/// Add an Anthropic API-key account. The key comes from --key-file, --key, or standard input
/// (prefer the file or stdin: a key on the command line shows in /proc and shell history).
#[argh(subcommand, name = "add-api-key")]
pub struct AddApiKey {
    /// a name for people, e.g. "Production Account"
    #[argh(option)]
    pub name: String,
    /// the API key (sk-ant-…)
    #[argh(option)]
    pub key: Option<String>,
    /// read the API key from this file
    #[argh(option)]
    pub key_file: Option<String>,
    /// priority tier: lower is preferred (default 0)
    #[argh(option, default = "0")]
    pub priority: u32,
    /// share of traffic within its tier (default 1)
    #[argh(option, default = "1")]
    pub weight: u32,
    /// share of quota used (0–1] past which the account is passed over (default: balance's)
    #[argh(option)]
    pub quota_threshold: Option<f64>,
    /// how far under its threshold a passed-over account must fall to serve again
    #[argh(option)]
    pub quota_hysteresis: Option<f64>,
    /// true: over its threshold, the account never serves, even when nothing else can
    #[argh(option)]
    pub quota_hard_stop: Option<bool>,
    /// plan_only (rest when an answer comes from extra usage) or allow
    #[argh(option)]
    pub overage: Option<crate::quota::Overage>,
    /// requests sent with the account at once, at most; more wait in its queue
    #[argh(option)]
    pub max_concurrent: Option<u32>,
    /// its egress: http://user:pass@host:port, https://…, socks5h://… or direct (stored sealed)
    #[argh(option)]
    pub proxy: Option<String>,
    /// a PEM CA bundle its TLS trusts instead of the public roots (a TLS-intercepting proxy's)
    #[argh(option)]
    pub ca_file: Option<String>,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs)]
/// List upstream accounts (keys masked).
#[argh(subcommand, name = "list-accounts")]
pub struct ListAccounts {
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs)]
/// Change an account's name, priority, weight or quota steering.
#[argh(subcommand, name = "set-account")]
pub struct SetAccount {
    /// the account id (see list-accounts)
    #[argh(option)]
    pub account_id: String,
    /// a new name
    #[argh(option)]
    pub name: Option<String>,
    /// a new priority tier (lower is preferred)
    #[argh(option)]
    pub priority: Option<u32>,
    /// a new weight within its tier
    #[argh(option)]
    pub weight: Option<u32>,
    /// share of quota used (0–1] past which the account is passed over (default: balance's)
    #[argh(option)]
    pub quota_threshold: Option<f64>,
    /// how far under its threshold a passed-over account must fall to serve again
    #[argh(option)]
    pub quota_hysteresis: Option<f64>,
    /// true: over its threshold, the account never serves, even when nothing else can
    #[argh(option)]
    pub quota_hard_stop: Option<bool>,
    /// plan_only (rest when an answer comes from extra usage) or allow
    #[argh(option)]
    pub overage: Option<crate::quota::Overage>,
    /// requests sent with the account at once, at most; more wait in its queue
    #[argh(option)]
    pub max_concurrent: Option<u32>,
    /// its egress: http://user:pass@host:port, https://…, socks5h://… or direct (stored sealed)
    #[argh(option)]
    pub proxy: Option<String>,
    /// a PEM CA bundle its TLS trusts instead of the public roots (a TLS-intercepting proxy's)
    #[argh(option)]
    pub ca_file: Option<String>,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs)]
/// Remove an account.
#[argh(subcommand, name = "remove-account")]
pub struct RemoveAccount {
    /// the account id (see list-accounts)
    #[argh(option)]
    pub account_id: String,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs)]
/// Enable an account.
#[argh(subcommand, name = "enable-account")]
pub struct EnableAccount {
    /// the account id (see list-accounts)
    #[argh(option)]
    pub account_id: String,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs)]
/// Disable an account without removing it.
#[argh(subcommand, name = "disable-account")]
pub struct DisableAccount {
    /// the account id (see list-accounts)
    #[argh(option)]
    pub account_id: String,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

pub fn add_api_key(path: &Path, cmd: AddApiKey) -> Result<(), CliError> {
    let name = check_name(&cmd.name)?;
    let weight = check_weight(cmd.weight)?;
    let steering = Steering::checked(
        cmd.quota_threshold,
        cmd.quota_hysteresis,
        cmd.quota_hard_stop,
        cmd.overage,
        cmd.max_concurrent,
    )?;
    let proxy = check_proxy(cmd.proxy.as_deref())?;
    let ca_file = check_ca_file(cmd.ca_file.as_deref())?;
    let key = read_secret("API key", cmd.key.as_deref(), cmd.key_file.as_deref(), true)?;
    if !key.expose().starts_with("sk-ant-") {
        eprintln!("warning: the key does not start with sk-ant-; adding it anyway");
    }
    let id = store::update(path, |m| {
        unique_account_name(m, &name, None)?;
        if m.holds_api_key(&key)? {
            return Err(ChangeError::Change(CliError::usage(format!(
                "an account already uses the key {}; see `llm-gateway list-accounts`",
                key.mask()
            ))));
        }
        let id = new_id("acc_", |id| {
            m.accounts.iter().any(|a| a.id.as_deref() == Some(id))
        });
        let mut account = RawAccount::new(id.clone(), name.clone(), AccountKind::ApiKey);
        account.api_key = Some(m.seal(&id, "api_key", &key)?);
        account.priority = cmd.priority;
        account.weight = weight;
        steering.apply(&mut account);
        if let Some(proxy) = &proxy {
            account.proxy = Some(m.seal(&id, "proxy", proxy)?);
        }
        account.ca_file.clone_from(&ca_file);
        m.accounts.push(account);
        Ok::<_, ChangeError<CliError>>(id)
    })?;
    if cmd.json {
        print_json(&json!({
            "id": id, "name": name, "kind": "api_key", "key": key.mask(), "enabled": true,
        }));
    } else {
        println!("added account {id} \"{name}\" ({})", key.mask());
    }
    Ok(())
}

pub fn list_accounts(path: &Path, as_json: bool) -> Result<(), CliError> {
    let config = config::load_existing(path)?;
    let accounts = Accounts::load(&config);
    let entries = accounts.snapshot();
    if as_json {
        let rows: Vec<_> = entries
            .iter()
            .map(|e| {
                let a = &e.account;
                let oauth = a.oauth();
                json!({
                    "id": a.id, "name": a.name, "kind": a.kind.as_str(), "enabled": a.enabled,
                    "priority": a.priority, "weight": a.weight,
                    "quota": steering(&config.balance.policy(a)),
                    "max_concurrent": a.max_concurrent,
                    "proxy": a.proxy.as_ref().map(|e| e.url.mask()),
                    "ca_file": a.ca.as_ref().map(|t| t.path.display().to_string()),
                    "state": e.state(), "key": a.key_display(),
                    "disabled_reason": a.disabled_reason,
                    "expires_at": oauth.and_then(|o| o.tokens.as_ref()).map(|t| t.expires_at),
                    "email": oauth.and_then(|o| o.email.clone()),
                    "organization": oauth.and_then(|o| o.organization.clone()),
                    "scopes": oauth.and_then(|o| o.scopes.clone()),
                    "created_at": a.created_at,
                })
            })
            .collect();
        print_json(&serde_json::Value::Array(rows));
        return Ok(());
    }
    if entries.is_empty() {
        println!("no accounts; add one with `llm-gateway add-api-key --name NAME --key-file PATH`");
        return Ok(());
    }
    let rows: Vec<[String; 5]> = entries
        .iter()
        .map(|e| {
            let a = &e.account;
            let state = match &a.disabled_reason {
                Some(why) => format!("disabled: {why}"),
                None => e.state().to_string(),
            };
            [
                a.id.clone(),
                a.name.clone(),
                a.kind.as_str().to_string(),
                state,
                a.key_display(),
            ]
        })
        .collect();
    print_table(&["ID", "NAME", "KIND", "STATE", "KEY"], &rows);
    Ok(())
}

/// An account's quota steering as it applies (its own settings over `balance`'s).
fn steering(p: &crate::quota::Policy) -> serde_json::Value {
    json!({
        "threshold": p.threshold, "hysteresis": p.hysteresis, "hard_stop": p.hard_stop,
        "overage": p.overage,
    })
}

pub enum Change {
    Remove,
    Enable(bool),
    Set {
        name: Option<String>,
        priority: Option<u32>,
        weight: Option<u32>,
        steering: Steering,
        proxy: Option<crate::secret::Secret>,
        ca_file: Option<String>,
    },
}

/// An account's quota steering and concurrency as flags give it (`None`: unchanged, or `balance`'s).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Steering {
    threshold: Option<f64>,
    hysteresis: Option<f64>,
    hard_stop: Option<bool>,
    overage: Option<crate::quota::Overage>,
    max_concurrent: Option<u32>,
}

impl Steering {
    /// The flags, refused when the config would refuse them.
    pub fn checked(
        threshold: Option<f64>,
        hysteresis: Option<f64>,
        hard_stop: Option<bool>,
        overage: Option<crate::quota::Overage>,
        max_concurrent: Option<u32>,
    ) -> Result<Steering, CliError> {
        if max_concurrent == Some(0) {
            return Err(CliError::usage(
                "--max-concurrent 0 would refuse every request: give 1 or more",
            ));
        }
        if let Some(t) = threshold
            && !(t > 0.0 && t <= 1.0)
        {
            return Err(CliError::usage(format!(
                "--quota-threshold is {t}: give a share above 0 and at most 1 (0.9 is 90 %)"
            )));
        }
        if let Some(h) = hysteresis
            && !(h >= 0.0 && h < threshold.unwrap_or(1.0))
        {
            return Err(CliError::usage(format!(
                "--quota-hysteresis is {h}: give at least 0 and less than the threshold"
            )));
        }
        Ok(Steering {
            threshold,
            hysteresis,
            hard_stop,
            overage,
            max_concurrent,
        })
    }

    fn is_empty(&self) -> bool {
        *self == Steering::default()
    }

    pub fn apply(&self, a: &mut RawAccount) {
        a.quota_threshold = self.threshold.or(a.quota_threshold);
        a.quota_hysteresis = self.hysteresis.or(a.quota_hysteresis);
        a.quota_hard_stop = self.hard_stop.or(a.quota_hard_stop);
        a.overage = self.overage.or(a.overage);
        a.max_concurrent = self.max_concurrent.or(a.max_concurrent);
    }
}

/// Refuses `name` when an account other than the one at `except` has it: metrics and logs label by name.
pub fn unique_account_name(
    m: &store::Managed,
    name: &str,
    except: Option<usize>,
) -> Result<(), ChangeError<CliError>> {
    let taken = (m.accounts.iter().enumerate())
        .find(|(i, a)| a.name == name && Some(*i) != except)
        .map(|(_, a)| a);
    match taken {
        Some(a) => Err(ChangeError::Change(CliError::usage(format!(
            "an account is already named {name:?} ({}); names label metrics and logs, so each must be unique",
            a.id.as_deref().unwrap_or("no id")
        )))),
        None => Ok(()),
    }
}

/// A `--proxy` as the config would take it (its text never shown but masked).
pub fn check_proxy(proxy: Option<&str>) -> Result<Option<crate::secret::Secret>, CliError> {
    let Some(proxy) = proxy else {
        return Ok(None);
    };
    let proxy = crate::secret::Secret::new(proxy.trim());
    config::Egress::parse(&proxy).map_err(|e| CliError::usage(format!("--{e}")))?;
    Ok(Some(proxy))
}

/// A `--ca-file` as an absolute path to a readable PEM bundle with a certificate in it.
pub fn check_ca_file(file: Option<&str>) -> Result<Option<String>, CliError> {
    let Some(file) = file else {
        return Ok(None);
    };
    let path =
        std::path::absolute(file).map_err(|e| CliError::usage(format!("--ca-file {file}: {e}")))?;
    let text = path.display().to_string();
    config::Trust::load(std::path::Path::new(""), &text)
        .map_err(|e| CliError::usage(format!("--ca-file {e}")))?;
    Ok(Some(text))
}

/// A weight of 0 would starve the account silently: refuse it.
pub fn check_weight(weight: u32) -> Result<u32, CliError> {
    if weight == 0 {
        return Err(CliError::usage("--weight must be at least 1"));
    }
    Ok(weight)
}

pub fn set_account(path: &Path, cmd: SetAccount) -> Result<(), CliError> {
    let steering = Steering::checked(
        cmd.quota_threshold,
        cmd.quota_hysteresis,
        cmd.quota_hard_stop,
        cmd.overage,
        cmd.max_concurrent,
    )?;
    let proxy = check_proxy(cmd.proxy.as_deref())?;
    let ca_file = check_ca_file(cmd.ca_file.as_deref())?;
    if cmd.name.is_none()
        && cmd.priority.is_none()
        && cmd.weight.is_none()
        && steering.is_empty()
        && proxy.is_none()
        && ca_file.is_none()
    {
        return Err(CliError::usage(
            "nothing to change: give --name, --priority, --weight, --quota-threshold, --quota-hysteresis, --quota-hard-stop, --overage, --max-concurrent, --proxy or --ca-file",
        ));
    }
    let change = Change::Set {
        name: cmd.name.as_deref().map(check_name).transpose()?,
        priority: cmd.priority,
        weight: cmd.weight.map(check_weight).transpose()?,
        steering,
        proxy,
        ca_file,
    };
    change_account(path, &cmd.account_id, cmd.json, change)
}

pub fn change_account(
    path: &Path,
    id: &str,
    as_json: bool,
    change: Change,
) -> Result<(), CliError> {
    // Redis first: a server that applies the stamp below and then syncs must find no shared
    // ban or cooldown left to adopt again.
    if matches!(change, Change::Enable(true))
        && config::shares_state(path)
        && let Ok(config) = config::load(path)
        && let Some(shared) = crate::shared::open(&config)
        && let Err(e) = shared.clear(id)
    {
        warn!("the account is enabled here, but its shared ban or cooldown stays: {e}");
    }
    let name = store::update(path, |m| {
        let index = m
            .accounts
            .iter()
            .position(|a| {
                a.id.as_deref() == Some(id)
                    || config::derived_account_id(&a.name) == id && a.id.is_none()
            })
            .ok_or_else(|| {
                ChangeError::Change(CliError {
                    exit: Exit::NotFound,
                    message: format!("no account with id {id}; see `llm-gateway list-accounts`"),
                })
            })?;
        match &change {
            Change::Remove => return Ok(m.accounts.remove(index).name),
            Change::Enable(on) => {
                m.accounts[index].enabled = *on;
                if *on {
                    m.accounts[index].disabled_reason = None;
                    // The stamp a running server applies: rests and the invalid mark go.
                    m.accounts[index].enabled_at = Some(crate::time::now_unix_millis());
                }
            }
            Change::Set {
                name,
                priority,
                weight,
                steering,
                proxy,
                ca_file,
            } => {
                if let Some(name) = name {
                    unique_account_name(m, name, Some(index))?;
                }
                let a = &mut m.accounts[index];
                // A hand-written account without an id is known by the one derived from its
                // name: pin it before a rename, so its id (ledger, locks, Redis) stays.
                if a.id.is_none() {
                    a.id = Some(config::derived_account_id(&a.name));
                }
                if let Some(name) = name {
                    a.name.clone_from(name);
                }
                a.priority = priority.unwrap_or(a.priority);
                a.weight = weight.unwrap_or(a.weight);
                steering.apply(a);
                if ca_file.is_some() {
                    a.ca_file.clone_from(ca_file);
                }
                if let Some(proxy) = proxy {
                    let id = a.id.clone().unwrap_or_default();
                    let sealed = m.seal(&id, "proxy", proxy)?;
                    m.accounts[index].proxy = Some(sealed);
                }
            }
        }
        Ok(m.accounts[index].name.clone())
    })?;
    let (verb, enabled) = match change {
        Change::Remove => ("removed", None),
        Change::Enable(true) => ("enabled", Some(true)),
        Change::Enable(false) => ("disabled", Some(false)),
        Change::Set { .. } => ("updated", None),
    };
    if as_json {
        print_json(&json!({"id": id, "name": name, "result": verb, "enabled": enabled}));
    } else {
        println!("{verb} account {id} \"{name}\"");
    }
    Ok(())
}
