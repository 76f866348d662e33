//! The one way config.yaml is changed, by the CLI or the server: take an exclusive lock, re-read,
//! change the machine-managed sections, seal any clear secret, check the result parses back to
//! exactly what was meant, write a temp file, fsync, rename over, fsync the directory.
//!
//! Only the top-level `accounts:` and `client_keys:` blocks are rewritten; every other line of
//! the file, operator comments included, is kept byte for byte. Comments inside those two blocks
//! are not kept (the file says so on the section line).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::{self, ConfigError, RawAccount, RawClientKey, Tokens};
use crate::oauth::Grant;
use crate::secret::{self, KeySource, Secret, SecretError, SecretKey};

/// The machine-managed part of the config, as a change sees and edits it.
pub struct Managed {
    pub accounts: Vec<RawAccount>,
    pub client_keys: Vec<RawClientKey>,
    sealer: Sealer,
}

impl Managed {
    /// Seals `value` for `(owner, field)`, creating the key file on first use.
    pub fn seal(
        &mut self,
        owner: &str,
        field: &str,
        value: &Secret,
    ) -> Result<String, SecretError> {
        self.sealer.seal(owner, field, value)
    }

    /// Whether an account already holds upstream key `key` (sealed values are opened to
    /// compare, in constant time; one that does not open is not a match).
    pub fn holds_api_key(&mut self, key: &Secret) -> Result<bool, SecretError> {
        for a in &self.accounts {
            let (Some(id), Some(stored)) = (&a.id, &a.api_key) else {
                continue;
            };
            let stored = if secret::is_sealed(stored) {
                match self.sealer.key()?.open(id, "api_key", stored) {
                    Ok(opened) => opened,
                    Err(_) => continue,
                }
            } else {
                Secret::new(stored.trim())
            };
            if secret::constant_time_eq(stored.expose().as_bytes(), key.expose().as_bytes()) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Loads (or creates) the secret key the first time something needs sealing.
struct Sealer {
    source: KeySource,
    key: Option<SecretKey>,
}

impl Sealer {
    fn key(&mut self) -> Result<&SecretKey, SecretError> {
        if self.key.is_none() {
            self.key = Some(self.source.load_or_create()?);
        }
        self.key.as_ref().ok_or(SecretError::NoKey {
            file: self.source.file.clone(),
        })
    }

    fn seal(&mut self, owner: &str, field: &str, value: &Secret) -> Result<String, SecretError> {
        if let Some(key) = &self.key {
            return Ok(key.seal(owner, field, value));
        }
        let key = self.source.load_or_create()?;
        let sealed = key.seal(owner, field, value);
        self.key = Some(key);
        Ok(sealed)
    }
}

/// Why a change was refused before anything was written.
pub enum ChangeError<E> {
    Config(ConfigError),
    /// The change itself declined (e.g. no such account).
    Change(E),
}

impl<E> From<ConfigError> for ChangeError<E> {
    fn from(e: ConfigError) -> Self {
        ChangeError::Config(e)
    }
}

impl<E> From<SecretError> for ChangeError<E> {
    fn from(e: SecretError) -> Self {
        ChangeError::Config(ConfigError::Secret(e))
    }
}

/// Applies `change` to the managed sections of the config at `path` and writes the result
/// atomically. Concurrent callers (threads or processes) are serialised by a lock file beside
/// the config; each sees the others' completed changes.
pub fn update<T, E>(
    path: &Path,
    change: impl FnOnce(&mut Managed) -> Result<T, ChangeError<E>>,
) -> Result<T, ChangeError<E>> {
    // A path with no file is a mistake to report, never a new, empty config to create: a key
    // written there would be one the real server never accepts (`init` creates a config).
    // (Checked before the lock too, so no lock file is left beside a path that was a typo.)
    let missing = || ConfigError::Missing {
        path: path.to_path_buf(),
    };
    if !path.exists() {
        return Err(missing().into());
    }
    let _lock = lock(path)?;
    let text = config::read_text(path)?.ok_or_else(missing)?;
    let raw = config::parse_raw(path, &text)?;
    let sealer = Sealer {
        source: config::key_source(path, &raw),
        key: None,
    };
    // Refuse to touch a file whose secrets this key cannot open: a write would mix two keys.
    config::validate(path, config::parse_raw(path, &text)?)?;

    let mut managed = Managed {
        accounts: raw.accounts.unwrap_or_default(),
        client_keys: raw.client_keys.unwrap_or_default(),
        sealer,
    };
    let out = change(&mut managed)?;
    seal_clear_values(&mut managed)?;

    let mut new_text = replace_section(&text, "accounts", &render("accounts", &managed.accounts));
    new_text = replace_section(
        &new_text,
        "client_keys",
        &render("client_keys", &managed.client_keys),
    );

    // Never write what would not read back as intended.
    let check = config::parse_raw(path, &new_text)?;
    if check.accounts.unwrap_or_default() != managed.accounts
        || check.client_keys.unwrap_or_default() != managed.client_keys
    {
        return Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            message: "could not locate the top-level accounts:/client_keys: sections to rewrite; \
                      write top-level keys in block style (key: value at column 0)"
                .into(),
        }
        .into());
    }
    config::validate(path, config::parse_raw(path, &new_text)?)?;
    write_atomically(path, new_text.as_bytes()).map_err(|error| ConfigError::Write {
        path: path.to_path_buf(),
        error,
    })?;
    Ok(out)
}

/// Gives hand-written accounts their id and seals any key written in clear.
fn seal_clear_values(m: &mut Managed) -> Result<(), SecretError> {
    for a in &mut m.accounts {
        let id =
            a.id.get_or_insert_with(|| config::derived_account_id(&a.name))
                .clone();
        for (field, value) in a.secret_fields() {
            if let Some(clear) = value.as_deref().filter(|v| !secret::is_sealed(v)) {
                *value = Some(m.sealer.seal(&id, field, &Secret::new(clear.trim()))?);
            }
        }
    }
    Ok(())
}

/// Server-side account changes, each one `update`.
///
/// Stores freshly issued tokens (sealed) and, from a login, the identity that came with them;
/// clears a pending login and any `needs_login` mark.
pub fn save_tokens(
    path: &Path,
    id: &str,
    tokens: &Tokens,
    grant: Option<&Grant>,
) -> Result<(), ChangeError<String>> {
    update(path, |m| {
        let access = m.seal(id, "access_token", &tokens.access)?;
        let refresh = m.seal(id, "refresh_token", &tokens.refresh)?;
        let a = find(&mut m.accounts, id)?;
        a.access_token = Some(access);
        a.refresh_token = Some(refresh);
        a.expires_at = Some(tokens.expires_at);
        a.issued_at = Some(tokens.issued_at);
        a.needs_login = false;
        if let Some(g) = grant {
            a.login_state = None;
            a.login_verifier = None;
            a.login_expires_at = None;
            a.scopes = g.scope.clone().or(a.scopes.take());
            a.organization_uuid = g.organization_uuid.clone().or(a.organization_uuid.take());
            a.organization_name = g.organization_name.clone().or(a.organization_name.take());
            a.account_uuid = g.account_uuid.clone().or(a.account_uuid.take());
            a.account_email = g.account_email.clone().or(a.account_email.take());
        }
        Ok(())
    })
}

/// Marks an OAuth account as needing a new login (the token endpoint said invalid_grant).
pub fn mark_needs_login(path: &Path, id: &str) -> Result<(), ChangeError<String>> {
    update(path, |m| {
        find(&mut m.accounts, id)?.needs_login = true;
        Ok(())
    })
}

/// Takes an account out of service for a permanent reason (a ban), saying why.
pub fn disable_account(path: &Path, id: &str, reason: &str) -> Result<(), ChangeError<String>> {
    update(path, |m| {
        let a = find(&mut m.accounts, id)?;
        a.enabled = false;
        a.disabled_reason = Some(reason.to_string());
        Ok(())
    })
}

fn find<'a>(
    accounts: &'a mut [RawAccount],
    id: &str,
) -> Result<&'a mut RawAccount, ChangeError<String>> {
    accounts
        .iter_mut()
        .find(|a| a.id.as_deref() == Some(id))
        .ok_or_else(|| ChangeError::Change(format!("account {id} is no longer in the config")))
}

impl std::fmt::Display for ChangeError<String> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChangeError::Config(e) => e.fmt(f),
            ChangeError::Change(e) => f.write_str(e),
        }
    }
}

/// Held while it lives; released on drop.
pub struct FileLock(std::fs::File);

impl Drop for FileLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// Takes the exclusive lock on `.<config name>.lock` beside the config. The lock is not on the
/// config itself because the config is replaced by rename: a lock on the old inode would not
/// exclude a writer that opened the new one. Held only for a local read-change-write, never
/// across a network call.
fn lock(path: &Path) -> Result<FileLock, ConfigError> {
    lock_named(path, "lock")
}

/// The per-account lock that serialises token refreshes and logins of one account across
/// threads and processes (`flock` excludes per open file, so two threads of one process that
/// each open the file exclude each other too). Held across the token endpoint call.
pub fn account_lock(path: &Path, account_id: &str) -> Result<FileLock, ConfigError> {
    let safe = crate::encoding::word_chars(account_id);
    lock_named(path, &format!("{safe}.lock"))
}

/// Takes `dir/.lock` without waiting: `Err(WouldBlock)` when another process holds it. For
/// directories with one writer (the usage ledger).
pub fn lock_dir(dir: &Path) -> std::io::Result<FileLock> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let path = dir.join(".lock");
    let named =
        |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let file = options.open(&path).map_err(named)?;
    match file.try_lock() {
        Ok(()) => Ok(FileLock(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            format!("{} is in use by another llm-gateway process", dir.display()),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(named(e)),
    }
}

fn lock_named(path: &Path, suffix: &str) -> Result<FileLock, ConfigError> {
    let io = |error| ConfigError::Io {
        path: path.to_path_buf(),
        error,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let lock_path: PathBuf = path.with_file_name(format!(".{name}.{suffix}"));
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(&lock_path).map_err(io)?;
    file.lock().map_err(io)?;
    Ok(FileLock(file))
}

/// temp file (0600) → write → fsync → rename over `path` → fsync the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = secret::temp_sibling(path);
    let result = (|| {
        let mut f = secret::create_private(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        secret::sync_parent(path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `key:` followed by the list, indented two spaces; `key: []` when empty.
fn render<T: serde::Serialize>(key: &str, items: &[T]) -> String {
    let note = "# managed by llm-gateway; comments inside this list are not kept";
    if items.is_empty() {
        return format!("{key}: []  {note}\n");
    }
    // Serialising plain structs of strings and bools cannot fail.
    let body = serde_yaml::to_string(items).unwrap_or_default();
    let mut out = format!("{key}:  {note}\n");
    for line in body.lines() {
        if line.is_empty() {
            out.push('\n');
        } else {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Replaces the top-level block `key:` in `text` by `section`, or appends `section` if there is
/// none. A block is its key line and every following line that is indented or starts a
/// sequence item, up to the next top-level line; comment and blank lines that trail the block
/// belong to whatever follows and are kept.
fn replace_section(text: &str, key: &str, section: &str) -> String {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let is_key_line = |l: &str| {
        l.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix(':'))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
    };
    let Some(start) = lines.iter().position(|l| is_key_line(l)) else {
        let mut out = text.to_string();
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(section);
        return out;
    };
    let mut end = start + 1;
    for (i, line) in lines.iter().enumerate().skip(start + 1) {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if line.starts_with([' ', '\t', '-']) && !line.starts_with("---") {
            end = i + 1;
        } else {
            break;
        }
    }
    let mut out = lines[..start].concat();
    out.push_str(section);
    out.push_str(&lines[end..].concat());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_the_named_block_and_keeps_comments() {
        let text = "# top comment\nserver:\n  listen: 1.2.3.4:5 # inline\n\naccounts:\n  - id: a\n    name: x\n  # inner\n  - id: b\n    name: y\n\n# about auth\nauth:\n  open: false\n";
        let out = replace_section(text, "accounts", "accounts: []\n");
        assert_eq!(
            out,
            "# top comment\nserver:\n  listen: 1.2.3.4:5 # inline\n\naccounts: []\n\n# about auth\nauth:\n  open: false\n"
        );
    }

    #[test]
    fn handles_sequences_at_column_zero_and_flow_lists() {
        let text = "accounts:\n- id: a\n  name: x\nlog:\n  level: info\n";
        assert_eq!(
            replace_section(text, "accounts", "accounts: []\n"),
            "accounts: []\nlog:\n  level: info\n"
        );
        let text = "accounts: []\nlog: {}\n";
        assert_eq!(
            replace_section(text, "accounts", "accounts: X\n"),
            "accounts: X\nlog: {}\n"
        );
    }

    #[test]
    fn appends_a_missing_block_and_ignores_lookalike_keys() {
        assert_eq!(
            replace_section("server: {}", "accounts", "accounts: []\n"),
            "server: {}\naccounts: []\n"
        );
        let text = "accounts_old: 1\n";
        assert_eq!(
            replace_section(text, "accounts", "accounts: []\n"),
            "accounts_old: 1\naccounts: []\n"
        );
    }

    #[test]
    fn rendered_sections_parse_back() {
        let mut account = RawAccount::new(
            "acc_1".into(),
            "Team: \"prod\" #1\nsecond line".into(),
            config::AccountKind::Oauth,
        );
        account.enabled = false;
        account.client_id = Some("c-1".into());
        account.access_token = Some("enc:v1:AAAA".into());
        account.expires_at = Some(1_795_676_640);
        let accounts = vec![account];
        let text = replace_section("server: {}\n", "accounts", &render("accounts", &accounts));
        let raw = config::parse_raw(Path::new("x"), &text).expect("parses");
        assert_eq!(raw.accounts.expect("present"), accounts);
    }
}
