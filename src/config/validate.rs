//! Turning the raw file into a `Config`: every default in one table (`default`), then one
//! check per section, each naming the setting it refuses. Nothing after this re-checks a value.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::managed::{AccountError, accounts, client_keys, secret_key};
use super::*;
use crate::logger::Level;
use crate::secret::{KeySource, Secret, SecretKey};

/// What a setting the file leaves out is. README's settings tables say the same.
pub(super) mod default {
    use std::time::Duration;

    const fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    pub const LISTEN: &str = "127.0.0.1:8080";
    pub const WORKERS: usize = 1280;
    pub const ACCEPT_QUEUE: usize = 256;
    pub const MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;
    pub const HEADER_TIMEOUT: Duration = secs(10);
    pub const BODY_TIMEOUT: Duration = secs(30);
    pub const KEEPALIVE_TIMEOUT: Duration = secs(60);
    /// 8 KiB/s is 64 kbit/s, slower than any link people still work on (a 2G phone uploads
    /// faster), so honest bodies pass, a 32 MiB one included (68 minutes); a client holding a
    /// worker must at least keep sending that much.
    pub const BODY_MIN_RATE: u64 = 8 * 1024;
    /// Covers TCP slow start and a client that waits a moment before sending.
    pub const BODY_RATE_GRACE: Duration = secs(10);
    pub const SHUTDOWN_GRACE: Duration = secs(30);
    pub const SHUTDOWN_GRACE_MAX: Duration = secs(3600);
    pub const WORKER_IDLE: Duration = secs(60);

    pub const BASE_URL: &str = "https://api.anthropic.com";
    pub const CONNECT_TIMEOUT: Duration = secs(10);
    pub const READ_TIMEOUT: Duration = secs(600);
    pub const WRITE_TIMEOUT: Duration = secs(60);
    pub const MAX_EVENT_BYTES: u64 = 1024 * 1024;
    /// The range `upstream.max_event_bytes` may take: an event is held whole before it is
    /// relayed.
    pub const MAX_EVENT_RANGE: std::ops::RangeInclusive<u64> = 1024..=64 * 1024 * 1024;

    pub const AUTHORIZE_URL: &str = "https://claude.ai/oauth/authorize";
    pub const TOKEN_URL: &str = "https://platform.claude.com/v1/oauth/token";
    pub const REDIRECT_URI: &str = "https://platform.claude.com/oauth/code/callback";
    pub const SCOPES: &str = "org:create_api_key user:profile user:inference";
    pub const REFRESH_LEAD: Duration = secs(600);
    pub const REFRESH_MIN_INTERVAL: Duration = secs(30);
    pub const TOKEN_TIMEOUT: Duration = secs(30);

    pub const MAX_ATTEMPTS: u32 = 3;
    pub const FAILOVER_TIMEOUT: Duration = secs(30);
    pub const EJECT_AFTER: u32 = 3;
    pub const EJECT_COOLDOWN: Duration = secs(10);
    pub const EJECT_COOLDOWN_MAX: Duration = secs(300);
    pub const RATE_LIMIT_BACKOFF: Duration = secs(1);
    pub const RATE_LIMIT_BACKOFF_MAX: Duration = secs(300);
    pub const AUTH_COOLDOWN: Duration = secs(600);
    pub const INVALID_AFTER: u32 = 3;
    pub const INVALID_WINDOW: Duration = secs(1800);
    pub const QUOTA_THRESHOLD: f64 = 0.9;
    pub const QUOTA_HYSTERESIS: f64 = 0.05;
    /// A pinned conversation moves only this close to the wall: losing its prompt cache once
    /// costs less than a 429 in the middle of a turn.
    pub const QUOTA_STICKY_LIMIT: f64 = 0.98;
    /// A plan-limit refusal that names no reset: the windows are hours long.
    pub const PLAN_LIMIT_COOLDOWN: Duration = secs(3600);
    /// A burst of sub-agents waits rather than failing; the wait is bounded twice.
    pub const QUEUE_SIZE: usize = 100;
    pub const QUEUE_TIMEOUT: Duration = secs(60);

    pub const STICKY_TTL: Duration = secs(3600);
    pub const STICKY_MAX_ENTRIES: usize = 10_000;
    /// `sticky.max_per_key` is this share of the table: ten busy keys could fill it, no
    /// single one can.
    pub const STICKY_PER_KEY_DIVISOR: usize = 10;

    pub const ADMIN_LISTEN: &str = "127.0.0.1:8081";
    /// The largest output every current Claude model accepts: a higher default fails on
    /// small models, a lower one cuts answers short.
    pub const DEFAULT_MAX_TOKENS: u64 = 8192;
    pub const USAGE_DIR: &str = "usage";
    pub const FLUSH_INTERVAL: Duration = secs(1);
    pub const FLUSH_INTERVAL_MIN: Duration = Duration::from_millis(50);

    pub const STATE_PREFIX: &str = "llm-gateway";
    pub const STATE_TIMEOUT: Duration = Duration::from_millis(250);
    pub const STATE_TIMEOUT_MAX: Duration = secs(10);
}

/// A duration the file gives, or its default.
fn dur(d: Option<Dur>, default: Duration) -> Duration {
    d.map_or(default, |d| d.0)
}

pub fn validate(path: &Path, raw: RawConfig) -> Result<Config, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let dir = path.parent().unwrap_or(Path::new(""));
    let mut warnings = Vec::new();
    let server = server(&raw.server).map_err(invalid)?;
    let upstream = upstream(&raw.upstream, dir).map_err(invalid)?;
    let oauth = oauth(&raw.oauth).map_err(invalid)?;
    let balance = balance(&raw.balance).map_err(invalid)?;
    let sticky = sticky(&raw.sticky);
    let admin_listen = admin_listen(&raw.admin).map_err(invalid)?;
    let models = models(&raw.models).map_err(invalid)?;
    let pricing =
        super::pricing::table(raw.pricing.as_deref().unwrap_or_default()).map_err(invalid)?;
    let usage = UsageSettings {
        enabled: raw.usage.enabled.unwrap_or(true),
        dir: dir.join(raw.usage.dir.as_deref().unwrap_or(default::USAGE_DIR)),
        flush_interval: dur(raw.usage.flush_interval, default::FLUSH_INTERVAL)
            .max(default::FLUSH_INTERVAL_MIN),
    };
    let log_level = match raw.log.level.as_deref() {
        None => Level::Info,
        Some(text) => Level::parse(text).ok_or_else(|| {
            invalid(format!(
                "log.level {text:?} is not one of error, warn, info, debug"
            ))
        })?,
    };
    let keys = key_source(path, &raw);
    let key = secret_key(&keys, raw.accounts.as_deref().unwrap_or_default())?;
    let accounts = accounts(
        raw.accounts.unwrap_or_default(),
        key.as_ref(),
        &super::managed::Defaults {
            egress: upstream.proxy.as_ref(),
            ca: upstream.ca.as_ref(),
            dir,
        },
        &mut warnings,
    )
    .map_err(|e| match e {
        AccountError::Secret(e) => ConfigError::Secret(e),
        AccountError::Invalid(m) => invalid(m),
    })?;
    let client_keys = client_keys(raw.client_keys.unwrap_or_default()).map_err(invalid)?;
    warnings.extend(duplicate_names(
        "accounts",
        accounts.iter().map(|a| &a.name),
    ));
    warnings.extend(duplicate_names(
        "client keys",
        client_keys.iter().map(|k| &k.name),
    ));
    let state = redis_settings(&raw.state, dir, &keys, key).map_err(invalid)?;
    if !usage.enabled
        && client_keys.iter().any(|k| {
            k.limits.daily_tokens.is_some()
                || k.limits.monthly_tokens.is_some()
                || k.limits.has_usd_budget()
        })
    {
        warnings.push(
            "usage.enabled is false: no budget of any client key is counted (they need the usage ledger)".into(),
        );
    }
    let auth_open = raw.auth.open.unwrap_or(false);
    if auth_open {
        warnings.push(
            "auth.open is true: anyone who can reach the listener can spend these accounts".into(),
        );
    }
    Ok(Config {
        path: path.to_path_buf(),
        server,
        upstream,
        oauth,
        balance,
        sticky,
        admin_listen,
        models,
        pricing,
        auth_open,
        log_level,
        access_log: raw.log.access.unwrap_or(true),
        access_file: raw.log.access_file.as_deref().map(|f| dir.join(f)),
        usage,
        state,
        accounts,
        client_keys,
        warnings,
        digest: String::new(),
    })
}

/// A warning naming the names several `what` share (metrics and logs label by name, so two
/// with one name cannot be told apart); the CLI refuses new ones.
fn duplicate_names<'a>(what: &str, names: impl Iterator<Item = &'a String>) -> Option<String> {
    let mut names: Vec<&String> = names.collect();
    names.sort();
    let mut repeated: Vec<&str> = (names.windows(2))
        .filter(|w| w[0] == w[1])
        .map(|w| w[0].as_str())
        .collect();
    repeated.dedup();
    (!repeated.is_empty()).then(|| {
        format!(
            "several {what} share a name ({}): metrics and logs cannot tell them apart; rename them (set-account --name, update-client-key --name)",
            repeated.join(", ")
        )
    })
}

fn server(s: &RawServer) -> Result<ServerSettings, String> {
    let listen = s.listen.clone().unwrap_or_else(|| default::LISTEN.into());
    if !listen.contains(':') {
        return Err(format!(
            "server.listen {listen:?} needs a port, such as {}",
            default::LISTEN
        ));
    }
    let workers = s.workers.unwrap_or(default::WORKERS);
    if !(1..=65_536).contains(&workers) {
        return Err(format!(
            "server.workers must be between 1 and 65536, not {workers}"
        ));
    }
    let server = ServerSettings {
        listen,
        workers,
        accept_queue: s.accept_queue.unwrap_or(default::ACCEPT_QUEUE),
        max_body_bytes: s.max_body_bytes.unwrap_or(default::MAX_BODY_BYTES),
        header_timeout: dur(s.header_timeout, default::HEADER_TIMEOUT),
        body_timeout: dur(s.body_timeout, default::BODY_TIMEOUT),
        keepalive_timeout: dur(s.keepalive_timeout, default::KEEPALIVE_TIMEOUT),
        body_min_rate: s.body_min_rate.unwrap_or(default::BODY_MIN_RATE),
        body_rate_grace: dur(s.body_rate_grace, default::BODY_RATE_GRACE),
        reuse_port: s.reuse_port.unwrap_or(false),
        shutdown_grace: dur(s.shutdown_grace, default::SHUTDOWN_GRACE),
        worker_idle: dur(s.worker_idle, default::WORKER_IDLE),
        trusted_proxies: (s.trusted_proxies.iter().flatten())
            .map(|c| {
                crate::access::Cidr::parse(c).ok_or_else(|| {
                    format!(
                        "server.trusted_proxies: {c:?} is not an address or CIDR such as 10.0.0.0/8"
                    )
                })
            })
            .collect::<Result<_, _>>()?,
    };
    if server.shutdown_grace > default::SHUTDOWN_GRACE_MAX {
        return Err(
            "server.shutdown_grace must be at most 1h (0s cuts in-flight requests at once)".into(),
        );
    }
    for (name, d) in [
        ("server.header_timeout", server.header_timeout),
        ("server.body_timeout", server.body_timeout),
        ("server.keepalive_timeout", server.keepalive_timeout),
        ("server.worker_idle", server.worker_idle),
    ] {
        if d.is_zero() {
            return Err(format!("{name} must be more than zero"));
        }
    }
    Ok(server)
}

fn upstream(u: &RawUpstream, dir: &Path) -> Result<UpstreamSettings, String> {
    let base_url = u
        .base_url
        .as_deref()
        .unwrap_or(default::BASE_URL)
        .trim_end_matches('/')
        .to_string();
    match base_url.parse::<ureq::http::Uri>() {
        Ok(uri)
            if matches!(uri.scheme_str(), Some("http" | "https"))
                && uri.host().is_some()
                && uri.query().is_none() => {}
        _ => {
            return Err(format!(
                "upstream.base_url {base_url:?} is not an http:// or https:// URL without a query"
            ));
        }
    }
    let proxy = match &u.proxy {
        None => None,
        Some(url) => {
            Egress::parse(&Secret::new(url.as_str())).map_err(|e| format!("upstream.{e}"))?
        }
    };
    let max_event_bytes = u.max_event_bytes.unwrap_or(default::MAX_EVENT_BYTES);
    if !default::MAX_EVENT_RANGE.contains(&max_event_bytes) {
        return Err(format!(
            "upstream.max_event_bytes {max_event_bytes} must be from {} to {} (64 MiB)",
            default::MAX_EVENT_RANGE.start(),
            default::MAX_EVENT_RANGE.end()
        ));
    }
    Ok(UpstreamSettings {
        base_url,
        connect_timeout: dur(u.connect_timeout, default::CONNECT_TIMEOUT),
        read_timeout: dur(u.read_timeout, default::READ_TIMEOUT),
        write_timeout: dur(u.write_timeout, default::WRITE_TIMEOUT),
        max_event_bytes: max_event_bytes as usize,
        proxy,
        ca: match &u.ca_file {
            None => None,
            Some(file) => {
                Some(Trust::load(dir, file).map_err(|e| format!("upstream.ca_file {e}"))?)
            }
        },
    })
}

fn oauth(o: &RawOAuth) -> Result<OAuthSettings, String> {
    let url = |value: &Option<String>, default: &str, name: &str| -> Result<String, String> {
        let v = value.as_deref().unwrap_or(default);
        if v.starts_with("https://") || v.starts_with("http://") {
            Ok(v.to_string())
        } else {
            Err(format!("oauth.{name} {v:?} is not an http(s) URL"))
        }
    };
    Ok(OAuthSettings {
        authorize_url: url(&o.authorize_url, default::AUTHORIZE_URL, "authorize_url")?,
        token_url: url(&o.token_url, default::TOKEN_URL, "token_url")?,
        redirect_uri: url(&o.redirect_uri, default::REDIRECT_URI, "redirect_uri")?,
        scopes: o.scopes.as_deref().unwrap_or(default::SCOPES).into(),
        system_prompt: (o.system_prompt.as_deref())
            .unwrap_or(DEFAULT_SYSTEM_PROMPT)
            .into(),
        refresh_lead: dur(o.refresh_lead, default::REFRESH_LEAD),
        refresh_min_interval: dur(o.refresh_min_interval, default::REFRESH_MIN_INTERVAL),
        token_timeout: dur(o.token_timeout, default::TOKEN_TIMEOUT),
    })
}

pub(super) fn balance(b: &RawBalance) -> Result<BalanceSettings, String> {
    let threshold = share(
        "balance.quota_threshold",
        b.quota_threshold,
        default::QUOTA_THRESHOLD,
    )?;
    let quota = crate::quota::Policy {
        threshold,
        hysteresis: hysteresis("balance", b.quota_hysteresis, threshold)?
            .unwrap_or(default::QUOTA_HYSTERESIS.min(threshold)),
        hard_stop: b.quota_hard_stop.unwrap_or(false),
        sticky_limit: share(
            "balance.quota_sticky_limit",
            b.quota_sticky_limit,
            default::QUOTA_STICKY_LIMIT,
        )?,
        overage: b.overage.unwrap_or_default(),
    };
    Ok(BalanceSettings {
        strategy: b.strategy.unwrap_or_default(),
        max_attempts: b.max_attempts.unwrap_or(default::MAX_ATTEMPTS).max(1),
        failover_timeout: dur(b.failover_timeout, default::FAILOVER_TIMEOUT),
        eject_after: b.eject_after.unwrap_or(default::EJECT_AFTER).max(1),
        eject_cooldown: dur(b.eject_cooldown, default::EJECT_COOLDOWN),
        eject_cooldown_max: dur(b.eject_cooldown_max, default::EJECT_COOLDOWN_MAX),
        rate_limit_backoff: dur(b.rate_limit_backoff, default::RATE_LIMIT_BACKOFF),
        rate_limit_backoff_max: dur(b.rate_limit_backoff_max, default::RATE_LIMIT_BACKOFF_MAX),
        auth_cooldown: dur(b.auth_cooldown, default::AUTH_COOLDOWN),
        invalid_after: b.invalid_after.unwrap_or(default::INVALID_AFTER).max(1),
        invalid_window: dur(b.invalid_window, default::INVALID_WINDOW),
        quota,
        plan_limit_cooldown: dur(b.plan_limit_cooldown, default::PLAN_LIMIT_COOLDOWN),
        queue_size: b.queue_size.unwrap_or(default::QUEUE_SIZE),
        queue_timeout: dur(b.queue_timeout, default::QUEUE_TIMEOUT),
    })
}

/// A share of a quota (`quota_threshold`, `quota_sticky_limit`): above 0, at most 1.
fn share(name: &str, value: Option<f64>, default: f64) -> Result<f64, String> {
    match value {
        None => Ok(default),
        Some(v) if v > 0.0 && v <= 1.0 => Ok(v),
        Some(v) => Err(format!(
            "{name} is {v}: give a share of the quota above 0 and at most 1 (0.9 is 90 %)"
        )),
    }
}

/// `quota_hysteresis`: at least 0 and below the threshold it applies to.
fn hysteresis(scope: &str, value: Option<f64>, threshold: f64) -> Result<Option<f64>, String> {
    match value {
        Some(v) if v.is_nan() || v < 0.0 || v >= threshold => Err(format!(
            "{scope}.quota_hysteresis is {v}: give at least 0 and less than the threshold ({threshold})"
        )),
        v => Ok(v),
    }
}

/// An account's own quota settings, checked like `balance`'s.
pub(super) fn account_quota(id: &str, a: &RawAccount) -> Result<QuotaSettings, String> {
    let scope = format!("account {id}");
    let threshold = match a.quota_threshold {
        Some(t) => Some(share(&format!("{scope}: quota_threshold"), Some(t), t)?),
        None => None,
    };
    // Without a threshold of its own, the account's is `balance`'s: checked against it there.
    let hysteresis = hysteresis(&scope, a.quota_hysteresis, threshold.unwrap_or(1.0))?;
    Ok(QuotaSettings {
        threshold,
        hysteresis,
        hard_stop: a.quota_hard_stop,
        overage: a.overage,
    })
}

fn sticky(s: &RawSticky) -> StickySettings {
    let max_entries = s.max_entries.unwrap_or(default::STICKY_MAX_ENTRIES);
    StickySettings {
        enabled: s.enabled.unwrap_or(true),
        ttl: dur(s.ttl, default::STICKY_TTL),
        max_entries,
        max_per_key: (s.max_per_key)
            .unwrap_or(max_entries / default::STICKY_PER_KEY_DIVISOR)
            .max(1),
    }
}

fn admin_listen(a: &RawAdmin) -> Result<Option<String>, String> {
    match a.listen.as_deref().map(str::trim) {
        None => Ok(Some(default::ADMIN_LISTEN.to_string())),
        Some("" | "off") => Ok(None),
        Some(addr) if addr.contains(':') => Ok(Some(addr.to_string())),
        Some(addr) => Err(format!(
            "admin.listen {addr:?} needs a port, such as {} (or off)",
            default::ADMIN_LISTEN
        )),
    }
}

fn models(m: &RawModels) -> Result<ModelSettings, String> {
    let aliases = m.aliases.clone().unwrap_or_default();
    if let Some((alias, _)) = aliases.iter().find(|(a, t)| a.is_empty() || t.is_empty()) {
        return Err(format!(
            "models.aliases: {alias:?} needs a non-empty name and target"
        ));
    }
    let mut names: Vec<String> = m.names.clone().unwrap_or_default();
    names.extend(aliases.iter().flat_map(|(a, t)| [a.clone(), t.clone()]));
    names.sort();
    names.dedup();
    Ok(ModelSettings {
        names,
        aliases,
        default_max_tokens: (m.default_max_tokens)
            .unwrap_or(default::DEFAULT_MAX_TOKENS)
            .max(1),
    })
}

/// The `state:` section: `None` for the local backend. The Redis password comes from an
/// environment variable, so no secret sits in the file; one written into the URL is refused.
fn redis_settings(
    raw: &RawState,
    dir: &Path,
    keys: &KeySource,
    key: Option<SecretKey>,
) -> Result<Option<RedisSettings>, String> {
    match raw.backend.as_deref().unwrap_or("local") {
        "local" => return Ok(None),
        "redis" => {}
        other => {
            return Err(format!(
                "state.backend {other:?} is not one of local, redis"
            ));
        }
    }
    let url = raw
        .redis_url
        .clone()
        .ok_or("state.backend is redis but state.redis_url is not set (redis://host:6379/0)")?;
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!(
            "state.redis_url {url:?} is not a redis:// or rediss:// URL"
        ));
    };
    if !matches!(scheme, "redis" | "rediss") {
        return Err(format!(
            "state.redis_url must start with redis:// or rediss://, not {scheme}://"
        ));
    }
    if rest
        .split('/')
        .next()
        .is_some_and(|authority| authority.contains('@'))
    {
        return Err(
            "state.redis_url must not carry credentials: put the password in an environment \
             variable and name it in state.redis_password_env"
                .into(),
        );
    }
    redis::IntoConnectionInfo::into_connection_info(url.as_str())
        .map_err(|e| format!("state.redis_url {url:?}: {e}"))?;
    let password = match &raw.redis_password_env {
        None => None,
        Some(name) => match std::env::var(name) {
            Ok(value) if !value.is_empty() => Some(Secret::new(value)),
            _ => {
                return Err(format!(
                    "state.redis_password_env names {name}, which is not set in the environment"
                ));
            }
        },
    };
    let ca = match &raw.redis_ca_file {
        None => None,
        Some(file) => {
            let path = dir.join(file);
            Some(
                std::fs::read(&path)
                    .map_err(|e| format!("state.redis_ca_file {}: {e}", path.display()))?,
            )
        }
    };
    let prefix = raw
        .prefix
        .as_deref()
        .unwrap_or(default::STATE_PREFIX)
        .to_string();
    if prefix.is_empty() || prefix.chars().any(|c| c.is_whitespace()) {
        return Err(format!(
            "state.prefix {prefix:?} must be a non-empty word (it starts every Redis key)"
        ));
    }
    let timeout = dur(raw.timeout, default::STATE_TIMEOUT);
    if timeout.is_zero() || timeout > default::STATE_TIMEOUT_MAX {
        return Err("state.timeout must be between 1ms and 10s".into());
    }
    let key = match key {
        Some(key) => key,
        // The tokens in Redis are sealed with it: every instance needs the same file.
        None => keys.load_or_create().map_err(|e| e.to_string())?,
    };
    Ok(Some(RedisSettings {
        url,
        password,
        ca,
        prefix,
        timeout,
        key: Arc::new(key),
    }))
}
