//! The raw config: exactly what config.yaml says, as serde structs. Unknown keys are errors
//! (with line and column); every field is optional here and gets its default, and its checks,
//! in `validate`. The managed lists (`accounts`, `client_keys`) are written back from these
//! structs by `store`, so their field order is the file's order.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub server: RawServer,
    pub upstream: RawUpstream,
    pub auth: RawAuth,
    pub log: RawLog,
    pub oauth: RawOAuth,
    pub balance: RawBalance,
    pub sticky: RawSticky,
    pub admin: RawAdmin,
    pub models: RawModels,
    pub usage: RawUsage,
    pub state: RawState,
    /// Price rows over the embedded ones (`pricing::Table`).
    pub pricing: Option<Vec<RawPrice>>,
    pub secret_key_file: Option<String>,
    pub accounts: Option<Vec<RawAccount>>,
    pub client_keys: Option<Vec<RawClientKey>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: Option<String>,
    pub workers: Option<usize>,
    pub accept_queue: Option<usize>,
    pub max_body_bytes: Option<u64>,
    pub header_timeout: Option<Dur>,
    pub body_timeout: Option<Dur>,
    pub keepalive_timeout: Option<Dur>,
    pub body_min_rate: Option<u64>,
    pub reuse_port: Option<bool>,
    pub body_rate_grace: Option<Dur>,
    pub shutdown_grace: Option<Dur>,
    pub worker_idle: Option<Dur>,
    /// Proxies (CIDRs) whose `X-Forwarded-For` names the client in the access log.
    pub trusted_proxies: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawUpstream {
    pub base_url: Option<String>,
    pub connect_timeout: Option<Dur>,
    pub read_timeout: Option<Dur>,
    pub write_timeout: Option<Dur>,
    pub max_event_bytes: Option<u64>,
    /// Every account's egress unless it sets its own (`http://user:pass@host:port`, …).
    pub proxy: Option<String>,
    /// A PEM CA bundle TLS trusts instead of the public roots, relative to the config.
    pub ca_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAuth {
    pub open: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawOAuth {
    pub authorize_url: Option<String>,
    pub token_url: Option<String>,
    pub redirect_uri: Option<String>,
    pub scopes: Option<String>,
    pub system_prompt: Option<String>,
    pub refresh_lead: Option<Dur>,
    pub refresh_min_interval: Option<Dur>,
    pub token_timeout: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBalance {
    pub strategy: Option<Strategy>,
    pub max_attempts: Option<u32>,
    pub failover_timeout: Option<Dur>,
    pub eject_after: Option<u32>,
    pub eject_cooldown: Option<Dur>,
    pub eject_cooldown_max: Option<Dur>,
    pub rate_limit_backoff: Option<Dur>,
    pub rate_limit_backoff_max: Option<Dur>,
    pub auth_cooldown: Option<Dur>,
    pub invalid_after: Option<u32>,
    pub invalid_window: Option<Dur>,
    pub quota_threshold: Option<f64>,
    pub quota_hysteresis: Option<f64>,
    pub quota_hard_stop: Option<bool>,
    pub quota_sticky_limit: Option<f64>,
    pub overage: Option<crate::quota::Overage>,
    pub plan_limit_cooldown: Option<Dur>,
    pub queue_size: Option<usize>,
    pub queue_timeout: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSticky {
    pub enabled: Option<bool>,
    pub ttl: Option<Dur>,
    pub max_entries: Option<usize>,
    pub max_per_key: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawModels {
    pub aliases: Option<std::collections::HashMap<String, String>>,
    pub default_max_tokens: Option<u64>,
    /// Model names metrics label by name; others are `other`.
    pub names: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawUsage {
    pub enabled: Option<bool>,
    /// The ledger's directory, relative to the config file.
    pub dir: Option<String>,
    pub flush_interval: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawState {
    /// `local` (the default) or `redis`.
    pub backend: Option<String>,
    pub redis_url: Option<String>,
    /// The name of an environment variable holding the Redis password (never the password).
    pub redis_password_env: Option<String>,
    /// A PEM CA bundle for `rediss://` to a private CA, relative to the config.
    pub redis_ca_file: Option<String>,
    pub prefix: Option<String>,
    pub timeout: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    pub listen: Option<String>,
}

/// How an account is chosen within the best available priority tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Fewest in-flight requests per unit of weight.
    #[default]
    LeastBusy,
    /// Weighted rotation.
    RoundRobin,
    /// The first available account until it is limited.
    FillFirst,
    /// The account with the most quota left (by its latest reading).
    MostHeadroom,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub level: Option<String>,
    pub access: Option<bool>,
    /// Where access log lines go: a file path (relative to the config), or stderr when unset.
    pub access_file: Option<String>,
}

/// One upstream account as stored. Written back by `store`, so field order is the file's order.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccount {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub name: String,
    #[serde(default)]
    pub kind: AccountKind,
    /// `enc:v1:…` (or, written by hand, a plain key that the next write seals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// The name of an environment variable holding the key, for container deployments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Lower is preferred; accounts of a worse tier serve only when the better are unavailable.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: u32,
    /// Share of traffic within a tier.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub weight: u32,
    /// Quota steering for this account, over `balance`'s (`None`: the global setting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_threshold: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_hysteresis: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_hard_stop: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overage: Option<crate::quota::Overage>,
    /// Requests sent with this account at once, at most; more wait in its queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Where everything done for this account goes out (`enc:v1:…`, sealed: the URL may hold
    /// a password): `http://`, `https://`, `socks5h://` or `direct`; unset, `upstream.proxy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    /// A PEM CA bundle its TLS trusts (a TLS-intercepting proxy's), relative to the config;
    /// unset, `upstream.ca_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Why the gateway disabled the account (a ban it recognised), for people to read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// When `enable-account` last ran (Unix ms): a running server that sees it change puts
    /// the account back in service at once, its rests and invalid mark cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled_at: Option<u64>,
    /// OAuth accounts only, from here on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// Unix seconds when the access token expires, and when it was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization_uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_email: Option<String>,
    /// Set when the token endpoint answered invalid_grant: a person must log in again.
    #[serde(default, skip_serializing_if = "is_false")]
    pub needs_login: bool,
    /// A pending `oauth-start`: sealed state and PKCE verifier, and when they expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_verifier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_expires_at: Option<u64>,
}

impl RawAccount {
    /// A new account of `kind` with nothing but its identity set.
    pub fn new(id: String, name: String, kind: AccountKind) -> RawAccount {
        RawAccount {
            id: Some(id),
            name,
            kind,
            api_key: None,
            api_key_env: None,
            enabled: true,
            priority: 0,
            weight: 1,
            quota_threshold: None,
            quota_hysteresis: None,
            quota_hard_stop: None,
            overage: None,
            max_concurrent: None,
            proxy: None,
            ca_file: None,
            disabled_reason: None,
            created_at: Some(crate::time::rfc3339(crate::time::now_unix())),
            enabled_at: None,
            client_id: None,
            client_secret: None,
            access_token: None,
            refresh_token: None,
            expires_at: None,
            issued_at: None,
            scopes: None,
            organization_uuid: None,
            organization_name: None,
            account_uuid: None,
            account_email: None,
            needs_login: false,
            login_state: None,
            login_verifier: None,
            login_expires_at: None,
        }
    }

    /// The fields that hold secrets, by name, for sealing and opening.
    pub fn secret_fields(&mut self) -> [(&'static str, &mut Option<String>); 7] {
        [
            ("api_key", &mut self.api_key),
            ("proxy", &mut self.proxy),
            ("client_secret", &mut self.client_secret),
            ("access_token", &mut self.access_token),
            ("refresh_token", &mut self.refresh_token),
            ("login_state", &mut self.login_state),
            ("login_verifier", &mut self.login_verifier),
        ]
    }
}

fn is_false(v: &bool) -> bool {
    !*v
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

fn one() -> u32 {
    1
}

fn is_one(v: &u32) -> bool {
    *v == 1
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    #[default]
    ApiKey,
    Oauth,
}

impl AccountKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountKind::ApiKey => "api_key",
            AccountKind::Oauth => "oauth",
        }
    }
}

/// A gateway (client) key as stored: only its SHA-256, never the key.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawClientKey {
    pub id: String,
    pub name: String,
    /// `sha256:<hex>` of the full key.
    pub hash: String,
    /// The first characters of the key, to recognise it in lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// May read the admin endpoints (status, metrics) on the main listener.
    #[serde(default, skip_serializing_if = "is_false")]
    pub admin: bool,
    /// Models this key may use; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Requests that may wait for one of its `max_concurrent` slots (FIFO, up to
    /// `balance.queue_timeout`) instead of a 429 at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<u32>,
    /// Tokens (input, output and cache, all counted) per UTC day and per UTC month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly_tokens: Option<u64>,
    /// USD per UTC day, per week (from Monday, UTC), per UTC month, and in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weekly_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_usd: Option<f64>,
    /// RFC 3339 time (or a date, meaning its midnight UTC) after which the key is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// When the key was revoked; a revoked key is refused for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
}

/// One price row: USD per million tokens of each kind. The cache rates default to
/// Anthropic's ratios: writes 1.25× input (5 minutes) and 2× (1 hour), reads 0.1×.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    /// A model id or a prefix of one; `*` for every model no other row matches.
    pub model: String,
    pub input: f64,
    pub output: f64,
    pub cache_write_5m: Option<f64>,
    pub cache_write_1h: Option<f64>,
    pub cache_read: Option<f64>,
    pub long_context: Option<RawTier>,
}

/// Higher rates for requests whose input passes `above` tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTier {
    pub above: u64,
    pub input: f64,
    pub output: f64,
    pub cache_write_5m: Option<f64>,
    pub cache_write_1h: Option<f64>,
    pub cache_read: Option<f64>,
}

fn yes() -> bool {
    true
}

/// A duration written as `500ms`, `30s`, `5m`, `1h`, or a whole number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    pub fn parse(text: &str) -> Option<Duration> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let n: u64 = digits.parse().ok()?;
        let millis = match unit.trim() {
            "ms" => n,
            // A bare number is refused: 30 could mean seconds or milliseconds.
            "s" => n.checked_mul(1000)?,
            "m" => n.checked_mul(60_000)?,
            "h" => n.checked_mul(3_600_000)?,
            _ => return None,
        };
        Some(Duration::from_millis(millis))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 500ms, 30s, 5m or 1h")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "the duration {v} has no unit: write {v}s, or use ms, m or h"
                )))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "the duration {v} has no unit (and cannot be negative): write it like 30s"
                )))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Dur, E> {
                Dur::parse(v).map(Dur).ok_or_else(|| {
                    E::custom(format!(
                        "invalid duration {v:?}: use a number with its unit, ms, s, m or h, such as 30s"
                    ))
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}
