//! config.yaml: raw serde structs (unknown keys are errors with line and column), validated once
//! into `Config`, whose fields need no further checking. Secrets are opened here, through
//! `secret::SecretKey`, and nowhere else.
//!
//! Operator-owned settings and machine-managed lists (`accounts`, `client_keys`) share one file;
//! `store` rewrites only the managed sections so operator comments elsewhere survive.

mod egress;
mod keys;
mod managed;
mod pricing;
mod raw;
mod validate;

pub use crate::quota::QuotaSettings;
pub use egress::{Egress, Trust};
pub use keys::{ClientKey, KeyLimits, parse_time};
pub use raw::*;
pub use validate::validate;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::logger::Level;
use crate::secret::{self, KeySource, Secret, SecretError, SecretKey};

/// Where the config lives when neither `--config` nor `LLM_GATEWAY_CONFIG` says.
pub const DEFAULT_PATH: &str = "config.yaml";
pub const PATH_ENV: &str = "LLM_GATEWAY_CONFIG";

// ---------------------------------------------------------------------------------------------
// Validated: what the rest of the program uses.

#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub server: ServerSettings,
    pub upstream: UpstreamSettings,
    pub oauth: OAuthSettings,
    pub balance: BalanceSettings,
    pub sticky: StickySettings,
    /// The admin listener's address; `None` when switched off.
    pub admin_listen: Option<String>,
    pub models: ModelSettings,
    /// What tokens cost: the embedded list prices with the `pricing:` rows over them.
    pub pricing: crate::pricing::Table,
    /// Serve without gateway keys. Deliberate, and warned about at every start.
    pub auth_open: bool,
    pub log_level: Level,
    pub access_log: bool,
    /// The access log's file; stderr when `None`.
    pub access_file: Option<PathBuf>,
    pub usage: UsageSettings,
    /// Where state shared by several instances lives; `None` for the local default.
    pub state: Option<RedisSettings>,
    pub accounts: Vec<Account>,
    pub client_keys: Vec<ClientKey>,
    /// Things worth telling the operator that do not stop the gateway.
    pub warnings: Vec<String>,
    /// The digest of the text this config was read from (`applied`); empty when not read
    /// from a file.
    pub digest: String,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: String,
    /// The most worker threads; each serves one connection at a time.
    pub workers: usize,
    /// Accepted connections waiting for a worker before new ones get 503.
    pub accept_queue: usize,
    pub max_body_bytes: u64,
    /// The whole request head must arrive within this.
    pub header_timeout: Duration,
    /// The longest a request body may stall between reads.
    pub body_timeout: Duration,
    /// How long an idle keep-alive connection is kept.
    pub keepalive_timeout: Duration,
    /// The slowest average a request body may arrive at (bytes a second; 0: none), after
    /// `body_rate_grace`.
    pub body_min_rate: u64,
    pub body_rate_grace: Duration,
    /// Bind both listeners with SO_REUSEPORT, so the next server can start on the same
    /// address before this one stops.
    pub reuse_port: bool,
    /// After SIGTERM/SIGINT, how long in-flight requests and streams may take to finish.
    pub shutdown_grace: Duration,
    /// How long a worker beyond the few kept waits idle before its thread ends.
    pub worker_idle: Duration,
    /// Proxies whose `X-Forwarded-For` is believed, for the client address logged.
    pub trusted_proxies: Vec<crate::access::Cidr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    /// Scheme, host and optional port and path prefix, without a trailing slash.
    pub base_url: String,
    pub connect_timeout: Duration,
    /// The longest the upstream may stay silent: before the response head and between reads
    /// of its body. There is deliberately no total timeout: a long healthy stream is fine.
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    /// The largest SSE event relayed: a stream whose event grows past it gets an error event
    /// and is closed, so an upstream that never ends an event cannot fill our memory.
    pub max_event_bytes: usize,
    /// The egress of accounts that set none, and the CA their TLS trusts.
    pub proxy: Option<Egress>,
    pub ca: Option<Trust>,
}

/// The OAuth protocol constants; defaults are Anthropic's (see shared/spec), all overridable
/// because Anthropic moves endpoints and tests use fakes.
#[derive(Debug, Clone, PartialEq)]
pub struct OAuthSettings {
    pub authorize_url: String,
    pub token_url: String,
    pub redirect_uri: String,
    /// Space-separated.
    pub scopes: String,
    /// Injected as the first system block of every request an OAuth account carries.
    pub system_prompt: String,
    /// Refresh this long before expiry (at most half the token's lifetime).
    pub refresh_lead: Duration,
    /// Never refresh one account twice within this.
    pub refresh_min_interval: Duration,
    /// Timeout of one call to the token endpoint.
    pub token_timeout: Duration,
}

/// Selection, failover and cooldown rules (see README for the reasoning behind defaults).
#[derive(Debug, Clone)]
pub struct BalanceSettings {
    pub strategy: Strategy,
    /// Accounts tried for one request, at most.
    pub max_attempts: u32,
    /// No new attempt starts after a request has spent this long.
    pub failover_timeout: Duration,
    /// Consecutive 5xx/529/connection failures before an account is ejected.
    pub eject_after: u32,
    pub eject_cooldown: Duration,
    pub eject_cooldown_max: Duration,
    /// 429 without reset information: backoff start and cap.
    pub rate_limit_backoff: Duration,
    pub rate_limit_backoff_max: Duration,
    /// An API key answered 401: out this long, then probed again.
    pub auth_cooldown: Duration,
    /// An API key is `invalid` after this many 401s in a row spanning at least `invalid_window`.
    pub invalid_after: u32,
    pub invalid_window: Duration,
    /// Quota steering for accounts that do not set their own.
    pub quota: crate::quota::Policy,
    /// A plan-limit refusal without a reset rests the account this long.
    pub plan_limit_cooldown: Duration,
    /// Requests waiting for a slot of one account (its `max_concurrent`), at most, and how long
    /// each may wait.
    pub queue_size: usize,
    pub queue_timeout: Duration,
}

/// Model names for OpenAI-format clients.
#[derive(Debug, Clone)]
pub struct ModelSettings {
    /// Client model name → upstream model name (`gpt-4o: claude-sonnet-4-5`).
    pub aliases: std::collections::HashMap<String, String>,
    /// `max_tokens` for OpenAI requests that give none (Anthropic requires one).
    pub default_max_tokens: u64,
    /// Model names known to metrics (configured names, alias names and targets).
    pub names: Vec<String>,
}

/// The usage ledger.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageSettings {
    pub enabled: bool,
    pub dir: PathBuf,
    /// How often buffered records reach the journal: the most a `kill -9` can lose.
    pub flush_interval: Duration,
}

/// `state.backend: redis`: the Redis that instances share (see `shared`).
#[derive(Clone)]
pub struct RedisSettings {
    /// Without a password: that comes from `password`.
    pub url: String,
    pub password: Option<Secret>,
    /// PEM bytes of the CA for `rediss://`, when not the system's.
    pub ca: Option<Vec<u8>>,
    /// Every key starts with `prefix:`, so gateways can share one Redis.
    pub prefix: String,
    /// Each Redis call's connect, read and write timeout.
    pub timeout: Duration,
    /// Seals the OAuth tokens kept in Redis: every instance needs the same key.
    pub key: Arc<SecretKey>,
}

impl PartialEq for RedisSettings {
    fn eq(&self, other: &Self) -> bool {
        (
            &self.url,
            &self.password,
            &self.ca,
            &self.prefix,
            self.timeout,
        ) == (
            &other.url,
            &other.password,
            &other.ca,
            &other.prefix,
            other.timeout,
        )
    }
}

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &self.url)
            .field("password", &self.password)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl BalanceSettings {
    /// The defaults, for unit tests that build settings without a file.
    #[cfg(test)]
    pub fn test() -> BalanceSettings {
        validate::balance(&RawBalance::default()).unwrap_or_else(|e| unreachable!("{e}"))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StickySettings {
    pub enabled: bool,
    pub ttl: Duration,
    pub max_entries: usize,
    /// The most pins one client key may hold, so that no key can fill the table.
    pub max_per_key: usize,
}

pub const DEFAULT_SYSTEM_PROMPT: &str = "你是 Claude Code，Anthropic的官方CLI工具";

#[derive(Debug, Clone)]
pub struct Account {
    pub id: String,
    pub name: String,
    pub kind: AccountKind,
    pub credential: Credential,
    pub enabled: bool,
    pub priority: u32,
    pub weight: u32,
    pub quota: QuotaSettings,
    /// Requests sent with it at once, at most (`None`: no limit).
    pub max_concurrent: Option<u32>,
    /// Its egress (its own, else `upstream.proxy`); `None`: direct.
    pub proxy: Option<Egress>,
    /// Its TLS's CA (its own `ca_file`, else `upstream.ca_file`); `None`: public roots.
    pub ca: Option<Trust>,
    pub disabled_reason: Option<String>,
    pub created_at: Option<String>,
    /// When `enable-account` last ran (Unix ms); a change clears the account's rests.
    pub enabled_at: Option<u64>,
}

#[derive(Debug, Clone)]
pub enum Credential {
    ApiKey(Secret),
    OAuth(Box<OAuth>),
    /// The account cannot be used; the text says why (e.g. an unset environment variable).
    Unusable(String),
}

/// An OAuth account's credential as stored: client, tokens, pending login, identity.
#[derive(Debug, Clone)]
pub struct OAuth {
    pub client_id: String,
    pub client_secret: Option<Secret>,
    /// None until the first successful login.
    pub tokens: Option<Tokens>,
    /// The token endpoint refused the refresh token (invalid_grant): log in again.
    pub needs_login: bool,
    pub pending: Option<PendingLogin>,
    pub scopes: Option<String>,
    pub organization: Option<String>,
    pub email: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub access: Secret,
    pub refresh: Secret,
    /// Unix seconds.
    pub expires_at: u64,
    /// Unix seconds; 0 when unknown.
    pub issued_at: u64,
}

/// What `oauth-start` left for `oauth-callback`.
#[derive(Debug, Clone)]
pub struct PendingLogin {
    pub state: Secret,
    pub verifier: Secret,
    /// Unix seconds.
    pub expires_at: u64,
}

impl Account {
    /// The credential as shown to people: masked, or its state.
    pub fn key_display(&self) -> String {
        match &self.credential {
            Credential::ApiKey(s) => s.mask(),
            Credential::OAuth(o) => match &o.tokens {
                _ if o.needs_login => "(needs login: run oauth-start)".into(),
                None => "(not logged in: run oauth-start)".into(),
                Some(t) => {
                    let now = crate::time::now_unix();
                    if t.expires_at > now {
                        format!(
                            "token, expires in {}",
                            crate::time::human_duration(t.expires_at - now)
                        )
                    } else {
                        "token expired (refreshed on next use)".into()
                    }
                }
            },
            Credential::Unusable(why) => format!("({why})"),
        }
    }

    pub fn oauth(&self) -> Option<&OAuth> {
        match &self.credential {
            Credential::OAuth(o) => Some(o),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub enum ConfigError {
    /// The file exists but could not be read, or the lock could not be taken.
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The YAML does not parse or has an unknown key; the message carries line and column.
    Parse { path: PathBuf, message: String },
    /// A value is out of range or inconsistent.
    Invalid { path: PathBuf, message: String },
    /// The file could not be written; the old file is intact.
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A secret could not be opened or sealed.
    Secret(SecretError),
    /// No file at the path a command that needs one was given (writes never create one).
    Missing { path: PathBuf },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            ConfigError::Parse { path, message } => write!(f, "{}: {message}", path.display()),
            ConfigError::Invalid { path, message } => write!(f, "{}: {message}", path.display()),
            ConfigError::Write { path, error } => write!(
                f,
                "{}: could not write ({error}); the previous file is unchanged",
                path.display()
            ),
            ConfigError::Secret(e) => e.fmt(f),
            ConfigError::Missing { path } => write!(
                f,
                "{}: no config file here; create one with `llm-gateway --config {} init`, or point --config or ${PATH_ENV} at yours",
                path.display(),
                path.display()
            ),
        }
    }
}

impl From<SecretError> for ConfigError {
    fn from(e: SecretError) -> ConfigError {
        ConfigError::Secret(e)
    }
}

/// Whether the file names a shared state backend (read without opening any secret), so a CLI
/// command that must tell Redis pays for the full load only then.
pub fn shares_state(path: &Path) -> bool {
    read_text(path)
        .ok()
        .flatten()
        .and_then(|text| parse_raw(path, &text).ok())
        .is_some_and(|raw| raw.state.backend.as_deref() == Some("redis"))
}

/// The config path: `--config`, else `$LLM_GATEWAY_CONFIG`, else `./config.yaml`.
pub fn resolve_path(flag: Option<&str>) -> PathBuf {
    flag.map(PathBuf::from)
        .or_else(|| {
            std::env::var_os(PATH_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
}

/// Reads the file; a missing file is an empty one (every setting has a safe default).
pub fn read_text(path: &Path) -> Result<Option<String>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(ConfigError::Io {
            path: path.to_path_buf(),
            error,
        }),
    }
}

pub fn parse_raw(path: &Path, text: &str) -> Result<RawConfig, ConfigError> {
    let blank = text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#') || l.trim() == "---");
    if blank {
        return Ok(RawConfig::default());
    }
    serde_yaml::from_str(text).map_err(|e| {
        let mut message = e.to_string();
        // serde_yaml prints no position for errors at the very start of the document (an
        // unknown top-level key): find the key ourselves.
        if !message.contains(" at line ") {
            let position = unknown_field(&message)
                .and_then(|f| key_position(text, f))
                .or_else(|| e.location().map(|l| (l.line(), l.column())));
            if let Some((line, column)) = position {
                message.push_str(&format!(" at line {line} column {column}"));
            }
        }
        ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        }
    })
}

/// The field named in serde's "unknown field `x`" message.
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.split("unknown field `").nth(1)?;
    rest.split('`').next()
}

/// 1-based line and column of the first `key:` in `text`.
fn key_position(text: &str, key: &str) -> Option<(usize, usize)> {
    text.lines().enumerate().find_map(|(i, line)| {
        let indent = line.len() - line.trim_start().len();
        let rest = line.trim_start().strip_prefix(key)?;
        rest.trim_start()
            .starts_with(':')
            .then_some((i + 1, indent + 1))
    })
}

/// `load`, for a command that needs a real file: a missing one is `ConfigError::Missing`, not
/// a config of defaults (a wrong path must not look like an empty gateway).
pub fn load_existing(path: &Path) -> Result<Config, ConfigError> {
    match read_text(path)? {
        None => Err(ConfigError::Missing {
            path: path.to_path_buf(),
        }),
        text => load_text(path, text),
    }
}

/// The settings and client keys of the config at `path`, validated without its accounts, so
/// no secret is opened and no key is needed (`usage`, `list-client-keys`). A missing file is
/// `ConfigError::Missing`.
pub fn load_public(path: &Path) -> Result<Config, ConfigError> {
    let text = read_text(path)?.ok_or_else(|| ConfigError::Missing {
        path: path.to_path_buf(),
    })?;
    let mut raw = parse_raw(path, &text)?;
    raw.accounts = None;
    validate(path, raw)
}

/// The accounts' ids and names as the file holds them, without opening any secret.
pub fn account_names(path: &Path) -> Result<Vec<(String, String)>, ConfigError> {
    let text = read_text(path)?.unwrap_or_default();
    let accounts = parse_raw(path, &text)?.accounts.unwrap_or_default();
    Ok((accounts.into_iter())
        .map(|a| {
            let id = a.id.unwrap_or_else(|| derived_account_id(&a.name));
            (id, a.name)
        })
        .collect())
}

/// Loads and validates the config at `path`, opening its secrets.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_text(path, read_text(path)?)
}

/// `load`, of the text already read from `path` (`None`: no file there).
fn load_text(path: &Path, text: Option<String>) -> Result<Config, ConfigError> {
    if let (Some(_), Some(mode)) = (&text, secret::writable_by_others(path)) {
        // Whoever can write it can point the gateway at their own upstream, or add a key. (A
        // group may write it on purpose: an operators' group, umask 002.)
        return Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            message: format!(
                "others may write this file (mode {mode:03o}), and whoever can write it controls the gateway; fix it with: chmod o-w {}",
                path.display()
            ),
        });
    }
    let mut config = validate(path, parse_raw(path, text.as_deref().unwrap_or(""))?)?;
    match &text {
        Some(text) => config.digest = crate::applied::digest(text),
        None => config.warnings.push(format!(
            "no config file at {}; using built-in defaults",
            path.display()
        )),
    }
    config
        .warnings
        .extend(exposure_warning(path, text.as_deref()));
    Ok(config)
}

/// A warning when config.yaml holds sealed secrets and its group or others may read it:
/// sealed values are safe without the key, but there is no reason to hand them out.
pub fn exposure_warning(path: &Path, text: Option<&str>) -> Option<String> {
    // A sealed value, not the prefix named in a comment (the shipped file explains it).
    let sealed = (text?.lines()).any(|line| {
        line.split('#')
            .next()
            .is_some_and(|v| v.contains("enc:v1:"))
    });
    if !sealed {
        return None;
    }
    let mode = secret::readable_by_others(path)?;
    Some(format!(
        "{} holds sealed secrets and is readable by others (mode {mode:03o}); fix it with: chmod 600 {}",
        path.display(),
        path.display()
    ))
}

/// Where the secret key is looked for, given the raw config at `path`.
pub fn key_source(path: &Path, raw: &RawConfig) -> KeySource {
    let name = raw.secret_key_file.as_deref().unwrap_or("gateway.key");
    let dir = path.parent().unwrap_or(Path::new(""));
    KeySource::from_env(dir.join(name))
}

/// The id an account written by hand without one gets: stable, derived from its name.
pub fn derived_account_id(name: &str) -> String {
    format!(
        "acc_{}",
        &crate::encoding::hex(&secret::sha256(name.as_bytes()))[..8]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let path = Path::new("/nonexistent/config.yaml");
        validate(path, parse_raw(path, text)?)
    }

    #[test]
    fn durations_parse_in_every_form() {
        assert_eq!(Dur::parse("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(Dur::parse("30s"), Some(Duration::from_secs(30)));
        assert_eq!(Dur::parse("5m"), Some(Duration::from_secs(300)));
        assert_eq!(Dur::parse("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(Dur::parse("12"), None, "a bare number has no unit");
        assert_eq!(Dur::parse("1d"), None);
        assert_eq!(Dur::parse("s"), None);
        assert_eq!(Dur::parse("99999999999999999999h"), None);
    }

    #[test]
    fn empty_and_comment_only_files_give_defaults() {
        for text in ["", "# nothing\n\n", "---\n"] {
            let c = parse(text).expect("defaults");
            assert_eq!(c.server.listen, "127.0.0.1:8080");
            assert_eq!(c.upstream.base_url, "https://api.anthropic.com");
            assert_eq!(c.server.max_body_bytes, 32 * 1024 * 1024);
            assert!(!c.auth_open);
        }
    }

    #[test]
    fn unknown_key_is_an_error_with_its_line() {
        let err = parse("server:\n  listen: 127.0.0.1:1\n  wrokers: 3\n").expect_err("typo");
        let text = err.to_string();
        assert!(text.contains("wrokers"), "{text}");
        assert!(text.contains("line 3"), "{text}");
    }

    #[test]
    fn unknown_top_level_key_gets_a_position_too() {
        let err = parse("# hi\nserverr:\n  listen: x\n").expect_err("typo");
        assert!(err.to_string().contains("line 2 column 1"), "{err}");
    }

    #[test]
    fn wrong_types_and_ranges_are_errors() {
        assert!(parse("server:\n  workers: many\n").is_err());
        assert!(parse("server:\n  workers: 0\n").is_err());
        assert!(parse("server:\n  header_timeout: 1d\n").is_err());
        assert!(parse("server:\n  worker_idle: 0s\n").is_err());
        assert!(parse("server:\n  worker_idle: soon\n").is_err());
        let bare = parse("server:\n  header_timeout: 30\n").expect_err("no unit");
        assert!(bare.to_string().contains("write 30s"), "{bare}");
        assert!(parse("upstream:\n  base_url: ftp://x\n").is_err());
        assert!(parse("server:\n  listen: nowhere\n").is_err());
        assert!(parse("log:\n  level: loud\n").is_err());
    }

    #[test]
    fn plain_keys_are_accepted_with_a_warning_and_env_keys_resolve() {
        let c = parse(
            "accounts:\n  - name: Hand\n    api_key: sk-ant-handwritten-000000001234\n  - name: Env\n    api_key_env: LLM_GATEWAY_TEST_UNSET_VARIABLE\n",
        )
        .expect("valid");
        assert_eq!(c.accounts[0].id, derived_account_id("Hand"));
        assert_eq!(c.accounts[0].key_display(), "sk-ant-…1234");
        assert!(c.warnings.iter().any(|w| w.contains("in clear")));
        assert!(!c.warnings.iter().any(|w| w.contains("handwritten")));
        assert!(matches!(c.accounts[1].credential, Credential::Unusable(_)));
    }

    #[test]
    fn duplicate_account_ids_are_rejected() {
        let err = parse(
            "accounts:\n  - {id: a, name: x, api_key: sk-ant-1}\n  - {id: a, name: y, api_key: sk-ant-2}\n",
        )
        .expect_err("duplicate");
        assert!(err.to_string().contains("two accounts"));
    }

    #[test]
    fn only_a_sealed_value_makes_an_exposed_file_worth_a_warning() {
        let dir = std::env::temp_dir().join(format!("llm-gateway-exposure-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("config.yaml");
        std::fs::write(&path, "x: 1\n").expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let comment = "# secrets are sealed (enc:v1:...)\naccounts: []\n";
        assert_eq!(exposure_warning(&path, Some(comment)), None);
        let sealed = "accounts:\n- key: enc:v1:AAAA # sealed\n";
        assert!(exposure_warning(&path, Some(sealed)).is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
