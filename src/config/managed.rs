//! The managed lists: accounts, their secrets opened with the key (and nowhere else), and the
//! client keys. Each entry is checked alone, then the list for duplicate ids.

use super::*;
use crate::secret::{self, KeySource, Secret, SecretError, SecretKey};

/// The secret key, loaded only if some account value is sealed.
pub(super) fn secret_key(
    keys: &KeySource,
    accounts: &[RawAccount],
) -> Result<Option<SecretKey>, ConfigError> {
    let sealed = accounts.iter().any(|a| {
        a.clone()
            .secret_fields()
            .iter()
            .any(|(_, v)| v.as_deref().is_some_and(secret::is_sealed))
    });
    if !sealed {
        return Ok(None);
    }
    let key = keys.load()?.ok_or(SecretError::NoKey {
        file: keys.file.clone(),
    })?;
    Ok(Some(key))
}

/// What an account that sets none takes from `upstream`, and where its files are found.
pub(super) struct Defaults<'a> {
    pub(super) egress: Option<&'a Egress>,
    pub(super) ca: Option<&'a Trust>,
    pub(super) dir: &'a std::path::Path,
}

pub(super) fn accounts(
    raw: Vec<RawAccount>,
    key: Option<&SecretKey>,
    defaults: &Defaults<'_>,
    warnings: &mut Vec<String>,
) -> Result<Vec<Account>, AccountError> {
    let accounts = (raw.into_iter())
        .map(|a| validate_account(a, key, defaults, warnings))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ids: Vec<&str> = accounts.iter().map(|a| a.id.as_str()).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(AccountError::Invalid(format!(
            "two accounts have the id {}",
            w[0]
        )));
    }
    Ok(accounts)
}

pub(super) fn client_keys(raw: Vec<RawClientKey>) -> Result<Vec<ClientKey>, String> {
    raw.into_iter().map(client_key).collect()
}

fn client_key(k: RawClientKey) -> Result<ClientKey, String> {
    let hash = (k.hash.strip_prefix("sha256:"))
        .and_then(crate::encoding::hex_decode)
        .and_then(|h| <[u8; 32]>::try_from(h).ok())
        .ok_or_else(|| format!("client key {}: hash must be sha256:<64 hex digits>", k.id))?;
    let expires_at = match &k.expires {
        None => None,
        Some(text) => Some(parse_time(text).ok_or_else(|| {
            format!(
                "client key {}: expires {text:?} is not a date (2026-12-31) or an RFC 3339 time",
                k.id
            )
        })?),
    };
    let usd = |what: &str, v: Option<f64>| match v {
        None => Ok(None),
        Some(v) => crate::pricing::parse_usd(&format!("{v}"))
            .filter(|n| *n > 0)
            .map(Some)
            .ok_or_else(|| {
                format!(
                    "client key {}: {what} {v} is not an amount of USD above 0",
                    k.id
                )
            }),
    };
    let (daily_usd, weekly_usd) = (
        usd("daily_usd", k.daily_usd)?,
        usd("weekly_usd", k.weekly_usd)?,
    );
    let (monthly_usd, total_usd) = (
        usd("monthly_usd", k.monthly_usd)?,
        usd("total_usd", k.total_usd)?,
    );
    Ok(ClientKey {
        id: k.id,
        name: k.name,
        hash,
        enabled: k.enabled,
        admin: k.admin,
        limits: KeyLimits {
            models: k.models,
            rpm: k.rpm,
            max_concurrent: k.max_concurrent,
            queue: k.queue,
            daily_tokens: k.daily_tokens,
            monthly_tokens: k.monthly_tokens,
            daily_usd,
            weekly_usd,
            monthly_usd,
            total_usd,
        },
        expires_at,
        revoked: k.revoked_at.is_some(),
    })
}

pub(super) enum AccountError {
    Secret(SecretError),
    Invalid(String),
}

/// Opens one secret field: sealed values with the key, clear ones (written by hand) with a
/// warning, since the next write seals them.
fn open_field(
    id: &str,
    field: &str,
    value: Option<&String>,
    key: Option<&SecretKey>,
    warnings: &mut Vec<String>,
) -> Result<Option<Secret>, AccountError> {
    let Some(value) = value else {
        return Ok(None);
    };
    if secret::is_sealed(value) {
        // `needs_key` guarantees a key whenever a sealed value exists.
        let key = key.ok_or(AccountError::Invalid(format!(
            "account {id}: sealed {field} but no secret key"
        )))?;
        return key
            .open(id, field, value)
            .map(Some)
            .map_err(AccountError::Secret);
    }
    warnings.push(format!(
        "account {id} has its {field} in clear in the config file; it will be sealed at the next write"
    ));
    Ok(Some(Secret::new(value.trim())))
}

/// An environment variable's name as a shell writes one: `[A-Za-z_][A-Za-z0-9_]*`.
fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && name.len() <= 255
}

fn validate_account(
    mut a: RawAccount,
    key: Option<&SecretKey>,
    defaults: &Defaults<'_>,
    warnings: &mut Vec<String>,
) -> Result<Account, AccountError> {
    if a.name.trim().is_empty() {
        return Err(AccountError::Invalid("an account has an empty name".into()));
    }
    let id = a.id.clone().unwrap_or_else(|| derived_account_id(&a.name));
    let mut open =
        |field: &str, value: &Option<String>| open_field(&id, field, value.as_ref(), key, warnings);
    let proxy = match open("proxy", &a.proxy)? {
        None => defaults.egress.cloned(),
        Some(url) => {
            Egress::parse(&url).map_err(|e| AccountError::Invalid(format!("account {id}: {e}")))?
        }
    };
    let ca = match &a.ca_file {
        None => defaults.ca.cloned(),
        Some(file) => Some(
            Trust::load(defaults.dir, file)
                .map_err(|e| AccountError::Invalid(format!("account {id}: ca_file {e}")))?,
        ),
    };
    let credential = match a.kind {
        AccountKind::ApiKey => match (open("api_key", &a.api_key)?, &a.api_key_env) {
            (Some(_), Some(_)) => {
                return Err(AccountError::Invalid(format!(
                    "account {id}: give api_key or api_key_env, not both"
                )));
            }
            (None, None) => {
                return Err(AccountError::Invalid(format!(
                    "account {id}: needs api_key or api_key_env"
                )));
            }
            (Some(key), None) => Credential::ApiKey(key),
            (None, Some(var)) if !is_env_name(var) => {
                return Err(AccountError::Invalid(format!(
                    "account {id}: api_key_env must be the name of an environment variable (letters, digits and _, such as ANTHROPIC_KEY_PROD), not {}; if that is a key, move it out of the file: give the variable's name here, or add it with `llm-gateway add-api-key --key-file`",
                    Secret::new(var.as_str()).mask()
                )));
            }
            (None, Some(var)) => match std::env::var(var) {
                Ok(v) if !v.trim().is_empty() => Credential::ApiKey(Secret::new(v.trim())),
                _ => {
                    warnings.push(format!(
                        "account {id} ({}): its api_key_env names {var}, which is not set; the account cannot serve until it is",
                        a.name
                    ));
                    Credential::Unusable(format!("environment variable {var} is not set"))
                }
            },
        },
        AccountKind::Oauth => {
            let client_id = a
                .client_id
                .take()
                .filter(|c| !c.trim().is_empty())
                .ok_or_else(|| {
                    AccountError::Invalid(format!("account {id}: an oauth account needs client_id"))
                })?;
            let tokens = match (
                open("access_token", &a.access_token)?,
                open("refresh_token", &a.refresh_token)?,
            ) {
                (Some(access), Some(refresh)) => Some(Tokens {
                    access,
                    refresh,
                    expires_at: a.expires_at.unwrap_or(0),
                    issued_at: a.issued_at.unwrap_or(0),
                }),
                _ => None,
            };
            let pending = match (
                open("login_state", &a.login_state)?,
                open("login_verifier", &a.login_verifier)?,
            ) {
                (Some(state), Some(verifier)) => Some(PendingLogin {
                    state,
                    verifier,
                    expires_at: a.login_expires_at.unwrap_or(0),
                }),
                _ => None,
            };
            Credential::OAuth(Box::new(OAuth {
                client_id,
                client_secret: open("client_secret", &a.client_secret)?,
                tokens,
                needs_login: a.needs_login,
                pending,
                scopes: a.scopes.take(),
                organization: a.organization_name.take().or(a.organization_uuid.take()),
                email: a.account_email.take(),
            }))
        }
    };
    let quota = super::validate::account_quota(&id, &a).map_err(AccountError::Invalid)?;
    let max_concurrent = match a.max_concurrent {
        Some(0) => {
            return Err(AccountError::Invalid(format!(
                "account {id}: max_concurrent 0 would refuse every request; give 1 or more, or leave it out"
            )));
        }
        n => n,
    };
    Ok(Account {
        id,
        name: a.name,
        kind: a.kind,
        credential,
        enabled: a.enabled,
        priority: a.priority,
        weight: a.weight.max(1),
        quota,
        max_concurrent,
        proxy,
        ca,
        disabled_reason: a.disabled_reason,
        created_at: a.created_at,
        enabled_at: a.enabled_at,
    })
}
