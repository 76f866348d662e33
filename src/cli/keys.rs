//! Commands for gateway (client) keys: create one (shown once; only its hash is stored), list
//! them with their limits, change limits, and revoke. A running server applies changes within a
//! second.

use std::path::Path;

use argh::FromArgs;
use serde_json::json;

use super::{CliError, Exit, check_name, new_id, print_json, print_table};
use crate::auth;
use crate::config::{self, RawClientKey};
use crate::store::{self, ChangeError};
use crate::time;

#[derive(FromArgs)]
/// Create a gateway key for a client. It is printed once; only its hash is stored.
#[argh(subcommand, name = "add-client-key")]
pub struct AddClientKey {
    /// who the key is for, e.g. alice
    #[argh(option)]
    pub name: String,
    /// the key may also read status and metrics
    #[argh(switch)]
    pub admin: bool,
    /// models it may use, comma-separated (default: all)
    #[argh(option)]
    pub models: Option<String>,
    /// requests per minute
    #[argh(option)]
    pub rpm: Option<u32>,
    /// requests at once
    #[argh(option)]
    pub max_concurrent: Option<u32>,
    /// requests that may wait, in arrival order, for one of those (default: none, a 429)
    #[argh(option)]
    pub queue: Option<u32>,
    /// tokens per UTC day (input, output and cache together)
    #[argh(option)]
    pub daily_tokens: Option<u64>,
    /// tokens per UTC month
    #[argh(option)]
    pub monthly_tokens: Option<u64>,
    /// USD per UTC day, e.g. 5 or 2.50 (priced from the gateway's table)
    #[argh(option)]
    pub daily_usd: Option<String>,
    /// USD per week (Monday 00:00 UTC to Monday)
    #[argh(option)]
    pub weekly_usd: Option<String>,
    /// USD per UTC month
    #[argh(option)]
    pub monthly_usd: Option<String>,
    /// USD in all, never reset
    #[argh(option)]
    pub total_usd: Option<String>,
    /// when the key stops working: 2026-12-31 or an RFC 3339 time
    #[argh(option)]
    pub expires: Option<String>,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs)]
/// List gateway keys: ids, names, first characters, state and limits (never the keys).
#[argh(subcommand, name = "list-client-keys")]
pub struct ListClientKeys {
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs)]
/// Change a gateway key's name or limits ("none" removes a limit), or enable or disable it.
#[argh(subcommand, name = "update-client-key")]
pub struct UpdateClientKey {
    /// the key's id (see list-client-keys)
    #[argh(option)]
    pub key_id: String,
    /// a new name
    #[argh(option)]
    pub name: Option<String>,
    /// models it may use, comma-separated, or none
    #[argh(option)]
    pub models: Option<String>,
    /// requests per minute, or none
    #[argh(option)]
    pub rpm: Option<String>,
    /// requests at once, or none
    #[argh(option)]
    pub max_concurrent: Option<String>,
    /// requests that may wait for one of those, or none
    #[argh(option)]
    pub queue: Option<String>,
    /// tokens per UTC day, or none
    #[argh(option)]
    pub daily_tokens: Option<String>,
    /// tokens per UTC month, or none
    #[argh(option)]
    pub monthly_tokens: Option<String>,
    /// USD per UTC day, or none
    #[argh(option)]
    pub daily_usd: Option<String>,
    /// USD per week from Monday (UTC), or none
    #[argh(option)]
    pub weekly_usd: Option<String>,
    /// USD per UTC month, or none
    #[argh(option)]
    pub monthly_usd: Option<String>,
    /// USD in all, or none
    #[argh(option)]
    pub total_usd: Option<String>,
    /// expiry (2026-12-31 or RFC 3339), or none
    #[argh(option)]
    pub expires: Option<String>,
    /// let the key read status and metrics (true or false)
    #[argh(option)]
    pub admin: Option<bool>,
    /// enable the key
    #[argh(switch)]
    pub enable: bool,
    /// disable the key (reversible; revoke-client-key is not)
    #[argh(switch)]
    pub disable: bool,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs)]
/// Revoke a gateway key for good (kept in the list for its usage history).
#[argh(subcommand, name = "revoke-client-key")]
pub struct RevokeClientKey {
    /// the key's id (see list-client-keys)
    #[argh(option)]
    pub key_id: String,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

/// A USD budget flag: an amount above 0 with at most nine decimals.
fn check_usd(flag: &str, text: &str) -> Result<f64, CliError> {
    let text = text.trim().trim_start_matches('$');
    match crate::pricing::parse_usd(text) {
        Some(n) if n > 0 => Ok(n as f64 / crate::pricing::NANO as f64),
        _ => Err(CliError::usage(format!(
            "--{flag} {text:?}: give an amount of USD above 0, such as 5 or 2.50"
        ))),
    }
}

/// The four USD budget flags of add-client-key.
fn usd_budgets(flags: [(&str, &Option<String>); 4]) -> Result<[Option<f64>; 4], CliError> {
    let mut out = [None; 4];
    for (slot, (flag, text)) in out.iter_mut().zip(flags) {
        *slot = text.as_deref().map(|t| check_usd(flag, t)).transpose()?;
    }
    Ok(out)
}

fn models_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty() && *m != "none")
        .map(String::from)
        .collect()
}

/// `--expires`: a date (the key ends at 00:00 UTC that day) or an RFC 3339 time with its
/// offset, in the future.
fn check_expires(text: &str) -> Result<String, CliError> {
    let at = config::parse_time(text).ok_or_else(|| {
        CliError::usage(format!(
            "--expires {text:?}: use 2026-12-31 (the key ends at 00:00 UTC that day) or an RFC 3339 time such as 2026-12-31T18:00:00+01:00"
        ))
    })?;
    if at <= time::now_unix() {
        return Err(CliError::usage(format!(
            "--expires {text:?} is in the past: the key would never work; to end a key now, use revoke-client-key or update-client-key --disable"
        )));
    }
    Ok(text.trim().to_string())
}

/// `--models`: a non-empty list (an empty one would mean every model, surely not meant).
fn check_models(text: &str) -> Result<Vec<String>, CliError> {
    let models = models_list(text);
    if models.is_empty() {
        return Err(CliError::usage(format!(
            "--models {text:?} names no model: give a comma-separated list (omit --models for every model)"
        )));
    }
    Ok(models)
}

/// A limit of 0 would refuse every request: that is disabling, said plainly.
fn check_positive<T: PartialEq + Default + Copy>(
    flag: &str,
    value: Option<T>,
) -> Result<Option<T>, CliError> {
    if value == Some(T::default()) {
        return Err(CliError::usage(format!(
            "--{flag} 0 would refuse every request; to stop a key, use update-client-key --disable"
        )));
    }
    Ok(value)
}

/// `none` → `Some(None)` (remove the limit); a number above 0 → `Some(Some(n))`.
fn limit<T: std::str::FromStr + PartialEq + Default + Copy>(
    flag: &str,
    value: &Option<String>,
) -> Result<Option<Option<T>>, CliError> {
    match value.as_deref().map(str::trim) {
        None => Ok(None),
        Some("none") => Ok(Some(None)),
        Some(v) => {
            let n = v
                .parse()
                .map_err(|_| CliError::usage(format!("--{flag} {v:?}: a whole number, or none")))?;
            Ok(Some(check_positive(flag, Some(n))?))
        }
    }
}

/// Refuses `name` when a key other than `except` has it (revoked keys keep theirs, for the
/// usage history).
fn unique_key_name(
    m: &store::Managed,
    name: &str,
    except: Option<&str>,
) -> Result<(), ChangeError<CliError>> {
    match (m.client_keys.iter()).find(|k| k.name == name && Some(k.id.as_str()) != except) {
        Some(k) => Err(ChangeError::Change(CliError::usage(format!(
            "a client key is already named {name:?} ({}); names label logs and usage, so each must be unique",
            k.id
        )))),
        None => Ok(()),
    }
}

pub fn add_client_key(path: &Path, cmd: AddClientKey) -> Result<(), CliError> {
    let name = check_name(&cmd.name)?;
    let expires = cmd.expires.as_deref().map(check_expires).transpose()?;
    let models = cmd.models.as_deref().map(check_models).transpose()?;
    let rpm = check_positive("rpm", cmd.rpm)?;
    let max_concurrent = check_positive("max-concurrent", cmd.max_concurrent)?;
    let queue = check_positive("queue", cmd.queue)?;
    let daily_tokens = check_positive("daily-tokens", cmd.daily_tokens)?;
    let monthly_tokens = check_positive("monthly-tokens", cmd.monthly_tokens)?;
    let [daily_usd, weekly_usd, monthly_usd, total_usd] = usd_budgets([
        ("daily-usd", &cmd.daily_usd),
        ("weekly-usd", &cmd.weekly_usd),
        ("monthly-usd", &cmd.monthly_usd),
        ("total-usd", &cmd.total_usd),
    ])?;
    let key = auth::generate_key();
    let id = store::update(path, |m| {
        unique_key_name(m, &name, None)?;
        let id = new_id("ck_", |id| m.client_keys.iter().any(|k| k.id == id));
        m.client_keys.push(RawClientKey {
            id: id.clone(),
            name: name.clone(),
            hash: auth::hash_for_storage(&key),
            prefix: Some(key.expose().chars().take(12).collect()),
            enabled: true,
            admin: cmd.admin,
            models: models.clone().unwrap_or_default(),
            rpm,
            max_concurrent,
            queue,
            daily_tokens,
            monthly_tokens,
            daily_usd,
            weekly_usd,
            monthly_usd,
            total_usd,
            expires: expires.clone(),
            revoked_at: None,
            created_at: Some(time::rfc3339(time::now_unix())),
        });
        Ok::<_, ChangeError<CliError>>(id)
    })?;
    // The one place a gateway key is ever shown in clear.
    if cmd.json {
        print_json(&json!({"id": id, "name": name, "key": key.expose()}));
    } else {
        println!("gateway key {id} for \"{name}\":\n\n    {}\n", key.expose());
        println!(
            "It is shown only this once; only its hash is stored. Send it as x-api-key or Authorization: Bearer."
        );
    }
    Ok(())
}

fn state(k: &RawClientKey) -> &'static str {
    let expired = k
        .expires
        .as_deref()
        .and_then(config::parse_time)
        .is_some_and(|at| time::now_unix() >= at);
    match () {
        _ if k.revoked_at.is_some() => "revoked",
        _ if expired => "expired",
        _ if !k.enabled => "disabled",
        _ => "enabled",
    }
}

fn limits_text(k: &RawClientKey) -> String {
    let mut parts = Vec::new();
    if !k.models.is_empty() {
        parts.push(format!("models={}", k.models.join(",")));
    }
    for (label, value) in [
        ("rpm", k.rpm.map(u64::from)),
        ("concurrent", k.max_concurrent.map(u64::from)),
        ("queue", k.queue.map(u64::from)),
        ("daily", k.daily_tokens),
        ("monthly", k.monthly_tokens),
    ] {
        if let Some(v) = value {
            parts.push(format!("{label}={v}"));
        }
    }
    for (label, value) in [
        ("daily", k.daily_usd),
        ("weekly", k.weekly_usd),
        ("monthly", k.monthly_usd),
        ("total", k.total_usd),
    ] {
        if let Some(v) = value {
            parts.push(format!("{label}=${v}"));
        }
    }
    if k.admin {
        parts.push("admin".into());
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

pub fn list_client_keys(path: &Path, as_json: bool) -> Result<(), CliError> {
    // Validated first (a broken file is an error), then listed as stored; no secret is
    // opened, so no key is needed.
    config::load_public(path)?;
    let text = config::read_text(path)?.unwrap_or_default();
    let keys = config::parse_raw(path, &text)?
        .client_keys
        .unwrap_or_default();
    if as_json {
        let rows: Vec<_> = keys
            .iter()
            .map(|k| {
                json!({
                    "id": k.id, "name": k.name, "prefix": k.prefix, "enabled": k.enabled,
                    "state": state(k), "admin": k.admin, "models": k.models, "rpm": k.rpm,
                    "max_concurrent": k.max_concurrent, "queue": k.queue,
                    "daily_tokens": k.daily_tokens,
                    "monthly_tokens": k.monthly_tokens, "daily_usd": k.daily_usd,
                    "weekly_usd": k.weekly_usd, "monthly_usd": k.monthly_usd,
                    "total_usd": k.total_usd, "expires": k.expires,
                    "revoked_at": k.revoked_at, "created_at": k.created_at,
                })
            })
            .collect();
        print_json(&serde_json::Value::Array(rows));
        return Ok(());
    }
    if keys.is_empty() {
        println!("no client keys; create one with `llm-gateway add-client-key --name NAME`");
        return Ok(());
    }
    let rows: Vec<[String; 6]> = keys
        .iter()
        .map(|k| {
            [
                k.id.clone(),
                k.name.clone(),
                format!("{}…", k.prefix.as_deref().unwrap_or("")),
                state(k).to_string(),
                limits_text(k),
                k.expires.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print_table(&["ID", "NAME", "KEY", "STATE", "LIMITS", "EXPIRES"], &rows);
    Ok(())
}

fn find<'a>(
    keys: &'a mut [RawClientKey],
    id: &str,
) -> Result<&'a mut RawClientKey, ChangeError<CliError>> {
    keys.iter_mut().find(|k| k.id == id).ok_or_else(|| {
        ChangeError::Change(CliError {
            exit: Exit::NotFound,
            message: format!("no client key with id {id}; see `llm-gateway list-client-keys`"),
        })
    })
}

pub fn update_client_key(path: &Path, cmd: UpdateClientKey) -> Result<(), CliError> {
    if cmd.enable && cmd.disable {
        return Err(CliError::usage("give --enable or --disable, not both"));
    }
    let name = cmd.name.as_deref().map(check_name).transpose()?;
    // `none` lifts the allow-list; an empty list is refused as on add-client-key.
    let models = match cmd.models.as_deref().map(str::trim) {
        None => None,
        Some("none") => Some(Vec::new()),
        Some(text) => Some(check_models(text)?),
    };
    let rpm = limit::<u32>("rpm", &cmd.rpm)?;
    let concurrent = limit::<u32>("max-concurrent", &cmd.max_concurrent)?;
    let queue = limit::<u32>("queue", &cmd.queue)?;
    let daily = limit::<u64>("daily-tokens", &cmd.daily_tokens)?;
    let monthly = limit::<u64>("monthly-tokens", &cmd.monthly_tokens)?;
    let usd = |flag: &str, text: &Option<String>| match text.as_deref().map(str::trim) {
        None => Ok(None),
        Some("none") => Ok(Some(None)),
        Some(t) => check_usd(flag, t).map(|v| Some(Some(v))),
    };
    let usd_budgets = [
        usd("daily-usd", &cmd.daily_usd)?,
        usd("weekly-usd", &cmd.weekly_usd)?,
        usd("monthly-usd", &cmd.monthly_usd)?,
        usd("total-usd", &cmd.total_usd)?,
    ];
    let expires = match cmd.expires.as_deref().map(str::trim) {
        None => None,
        Some("none") => Some(None),
        Some(text) => Some(Some(check_expires(text)?)),
    };
    let updated = store::update(path, |m| {
        find(&mut m.client_keys, &cmd.key_id)?;
        if let Some(name) = &name {
            unique_key_name(m, name, Some(&cmd.key_id))?;
        }
        let k = find(&mut m.client_keys, &cmd.key_id)?;
        if k.revoked_at.is_some() {
            return Err(ChangeError::Change(CliError::usage(format!(
                "client key {} was revoked; create a new one",
                k.id
            ))));
        }
        if let Some(name) = &name {
            k.name.clone_from(name);
        }
        if let Some(models) = &models {
            k.models.clone_from(models);
        }
        if let Some(v) = rpm {
            k.rpm = v;
        }
        if let Some(v) = concurrent {
            k.max_concurrent = v;
        }
        if let Some(v) = queue {
            k.queue = v;
        }
        if let Some(v) = daily {
            k.daily_tokens = v;
        }
        if let Some(v) = monthly {
            k.monthly_tokens = v;
        }
        let slots = [
            &mut k.daily_usd,
            &mut k.weekly_usd,
            &mut k.monthly_usd,
            &mut k.total_usd,
        ];
        for (slot, v) in slots.into_iter().zip(usd_budgets) {
            if let Some(v) = v {
                *slot = v;
            }
        }
        if let Some(v) = &expires {
            k.expires.clone_from(v);
        }
        if let Some(admin) = cmd.admin {
            k.admin = admin;
        }
        if cmd.enable || cmd.disable {
            k.enabled = cmd.enable;
        }
        Ok(k.clone())
    })?;
    if cmd.json {
        print_json(
            &json!({"id": updated.id, "name": updated.name, "state": state(&updated), "limits": limits_text(&updated)}),
        );
    } else {
        println!(
            "updated client key {} \"{}\": {} ({})",
            updated.id,
            updated.name,
            state(&updated),
            limits_text(&updated)
        );
    }
    Ok(())
}

pub fn revoke_client_key(path: &Path, cmd: RevokeClientKey) -> Result<(), CliError> {
    let name = store::update(path, |m| {
        let k = find(&mut m.client_keys, &cmd.key_id)?;
        k.revoked_at
            .get_or_insert_with(|| time::rfc3339(time::now_unix()));
        Ok(k.name.clone())
    })?;
    if cmd.json {
        print_json(&json!({"id": cmd.key_id, "name": name, "state": "revoked"}));
    } else {
        println!(
            "revoked client key {} \"{name}\"; requests with it now get 401",
            cmd.key_id
        );
    }
    Ok(())
}
