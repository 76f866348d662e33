//! Secrets: the `Secret` type that never prints itself, the gateway's AES-256-GCM key, and
//! sealing/opening of the `enc:v1:` values stored in config.yaml. All decryption happens here.
//!
//! A sealed value is `enc:v1:` + base64(nonce ‖ ciphertext‖tag) with a fresh 96-bit OS-random
//! nonce each time and `"<account id>/<field>"` as associated data, so a sealed value copied onto
//! another account or field does not open.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};

use crate::encoding;

const PREFIX: &str = "enc:v1:";
/// The environment variable that, when set, holds the key (base64 of 32 bytes).
pub const KEY_ENV: &str = "LLM_GATEWAY_SECRET_KEY";

/// A credential in clear, in memory only. `Debug` and `Display` print a mask.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The clear value, for the one place that needs it (an upstream header, a seal).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `sk-ant-…abcd`: enough to tell keys apart, never enough to use one.
    pub fn mask(&self) -> String {
        let v = &self.0;
        let tail: String = if v.chars().count() >= 16 {
            let chars: Vec<char> = v.chars().collect();
            chars[chars.len() - 4..].iter().collect()
        } else {
            String::new()
        };
        let head = ["sk-ant-", "lgw_"]
            .into_iter()
            .find(|p| v.starts_with(p))
            .unwrap_or("");
        format!("{head}…{tail}")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.mask())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.mask())
    }
}

/// What went wrong with the key or a sealed value. Messages name the thing, never its value.
#[derive(Debug)]
pub enum SecretError {
    /// Sealed values exist but no key was found.
    NoKey { file: PathBuf },
    /// The key from the environment or the key file is not base64 of 32 bytes.
    BadKey { source: String },
    /// A sealed value did not open with this key (wrong key, or the value was altered).
    WrongKey { what: String, source: String },
    /// A value starting with `enc:` is not a well-formed `enc:v1:` value.
    Malformed { what: String },
    /// The key file may be read by its group or others (as ssh does, we refuse to use it).
    Exposed { file: PathBuf, mode: u32 },
    /// Reading or creating the key file failed.
    Io {
        file: PathBuf,
        error: std::io::Error,
    },
}

impl fmt::Display for SecretError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretError::NoKey { file } => write!(
                f,
                "config.yaml holds sealed secrets but there is no key to open them: set {KEY_ENV} or restore {}",
                file.display()
            ),
            SecretError::BadKey { source } => {
                write!(f, "the secret key from {source} is not base64 of 32 bytes")
            }
            SecretError::WrongKey { what, source } => write!(
                f,
                "{what} could not be opened with the secret key from {source} (wrong key, or the value was altered)"
            ),
            SecretError::Malformed { what } => write!(f, "{what} is not a valid enc:v1: value"),
            SecretError::Exposed { file, mode } => write!(
                f,
                "secret key file {} is open to others (mode {mode:03o}); anyone who can read it can open every sealed secret, and anyone who can write it can replace the key. Fix it with: chmod 600 {}",
                file.display(),
                file.display()
            ),
            SecretError::Io { file, error } => {
                write!(f, "secret key file {}: {error}", file.display())
            }
        }
    }
}

/// The AES-256-GCM key and where it came from (for error messages).
pub struct SecretKey {
    cipher: Aes256Gcm,
    /// Keys derived for other purposes (the dashboard's session cookies) come from this, never
    /// the sealing key itself.
    derive: ring::hmac::Key,
    source: String,
}

/// Where the key is looked for: the environment first, then the key file.
pub struct KeySource {
    pub env: Option<String>,
    pub file: PathBuf,
}

impl KeySource {
    pub fn from_env(file: PathBuf) -> KeySource {
        KeySource {
            env: std::env::var(KEY_ENV).ok().filter(|v| !v.trim().is_empty()),
            file,
        }
    }

    /// Loads the key; `Ok(None)` when neither the variable nor the file exists.
    pub fn load(&self) -> Result<Option<SecretKey>, SecretError> {
        if let Some(text) = &self.env {
            return SecretKey::from_base64(text, format!("${KEY_ENV}")).map(Some);
        }
        match std::fs::read_to_string(&self.file) {
            Ok(text) => {
                // Read: anyone could open every secret; written: anyone could swap the key.
                if let Some(mode) = mode_with_any(&self.file, 0o066) {
                    return Err(SecretError::Exposed {
                        file: self.file.clone(),
                        mode,
                    });
                }
                SecretKey::from_base64(&text, self.file.display().to_string()).map(Some)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(SecretError::Io {
                file: self.file.clone(),
                error,
            }),
        }
    }

    /// Loads the key, or creates the key file with 32 OS-random bytes (mode 0600) if there is
    /// none. Two processes racing here agree on one key: each writes a private temp file and
    /// hard-links it into place, which fails for the loser, who then reads the winner's key.
    pub fn load_or_create(&self) -> Result<SecretKey, SecretError> {
        if let Some(key) = self.load()? {
            return Ok(key);
        }
        let io = |error| SecretError::Io {
            file: self.file.clone(),
            error,
        };
        let text = encoding::base64(&random_bytes::<32>());
        let tmp = temp_sibling(&self.file);
        let result = (|| {
            let mut f = create_private(&tmp)?;
            f.write_all(format!("{text}\n").as_bytes())?;
            f.sync_all()?;
            match std::fs::hard_link(&tmp, &self.file) {
                Ok(()) => sync_parent(&self.file),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                Err(e) => Err(e),
            }
        })();
        let _ = std::fs::remove_file(&tmp);
        result.map_err(io)?;
        self.load()?.ok_or_else(|| {
            io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "key file vanished after creation",
            ))
        })
    }
}

impl SecretKey {
    pub fn from_base64(text: &str, source: String) -> Result<SecretKey, SecretError> {
        let bytes = encoding::base64_decode(text.trim())
            .filter(|b| b.len() == 32)
            .ok_or_else(|| SecretError::BadKey {
                source: source.clone(),
            })?;
        let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|_| SecretError::BadKey {
            source: source.clone(),
        })?;
        let derive = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes);
        Ok(SecretKey {
            cipher,
            derive,
            source,
        })
    }

    /// An HMAC-SHA256 key for `purpose`, derived from this key (HMAC of the purpose's name):
    /// every instance with the same key file derives the same one, and it opens no secret.
    pub fn derive(&self, purpose: &str) -> ring::hmac::Key {
        let tag = ring::hmac::sign(&self.derive, purpose.as_bytes());
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, tag.as_ref())
    }

    /// Seals `value` for `(owner, field)`.
    pub fn seal(&self, owner: &str, field: &str, value: &Secret) -> String {
        let nonce = random_bytes::<12>();
        let aad = format!("{owner}/{field}");
        let payload = Payload {
            msg: value.expose().as_bytes(),
            aad: aad.as_bytes(),
        };
        // Encryption with a valid key and an in-memory buffer cannot fail.
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), payload)
            .unwrap_or_default();
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&sealed);
        format!("{PREFIX}{}", encoding::base64(&blob))
    }

    /// Opens a sealed value for `(owner, field)`.
    pub fn open(&self, owner: &str, field: &str, sealed: &str) -> Result<Secret, SecretError> {
        let what = format!("{field} of {owner}");
        let blob = sealed
            .strip_prefix(PREFIX)
            .and_then(encoding::base64_decode)
            .filter(|b| b.len() >= 12 + 16)
            .ok_or_else(|| SecretError::Malformed { what: what.clone() })?;
        let aad = format!("{owner}/{field}");
        let (nonce, ciphertext) = blob.split_at(12);
        let payload = Payload {
            msg: ciphertext,
            aad: aad.as_bytes(),
        };
        let clear = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), payload)
            .map_err(|_| SecretError::WrongKey {
                what: what.clone(),
                source: self.source.clone(),
            })?;
        String::from_utf8(clear)
            .map(Secret)
            .map_err(|_| SecretError::Malformed { what })
    }
}

/// True for values in the sealed format (whether or not they open).
pub fn is_sealed(value: &str) -> bool {
    value.starts_with("enc:")
}

/// `N` bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut out = [0u8; N];
    // The OS generator failing is not recoverable in any useful way; it has never been seen on Linux.
    if ring::rand::SystemRandom::new().fill(&mut out).is_err() {
        panic!("the operating system's random number generator failed");
    }
    out
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Constant-time equality of two byte strings of equal length.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The permission bits of `path` when its group or others may read it (`None` otherwise, or
/// when it cannot be examined: reading it then fails on its own).
pub fn readable_by_others(path: &Path) -> Option<u32> {
    mode_with_any(path, 0o044)
}

/// The permission bits of `path` when others (not its group) may write it.
pub fn writable_by_others(path: &Path) -> Option<u32> {
    mode_with_any(path, 0o002)
}

/// The permission bits of `path` when any of `bits` is set.
fn mode_with_any(path: &Path, bits: u32) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        (mode & bits != 0).then_some(mode)
    }
    #[cfg(not(unix))]
    {
        let _ = (path, bits);
        None
    }
}

/// Creates a new file readable by its owner only; fails if it exists.
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// `dir/.name.tmp.<pid>.<random>`: a private temp name beside `path`.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tag = encoding::hex(&random_bytes::<6>());
    path.with_file_name(format!(".{name}.tmp.{}.{tag}", std::process::id()))
}

/// fsync the directory holding `path`, so a rename or link in it survives a crash.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretKey {
        SecretKey::from_base64(&encoding::base64(&[7u8; 32]), "test".into()).expect("valid key")
    }

    #[test]
    fn seal_then_open_round_trips_with_fresh_nonces() {
        let k = key();
        let s = Secret::new("sk-ant-api03-secret-value-1234");
        let a = k.seal("acc_1", "api_key", &s);
        let b = k.seal("acc_1", "api_key", &s);
        assert!(a.starts_with("enc:v1:"));
        assert_ne!(a, b, "each seal uses a fresh nonce");
        assert!(!a.contains("secret-value"));
        assert_eq!(k.open("acc_1", "api_key", &a).expect("opens"), s);
    }

    #[test]
    fn associated_data_binds_owner_and_field() {
        let k = key();
        let sealed = k.seal("acc_1", "api_key", &Secret::new("x"));
        assert!(matches!(
            k.open("acc_2", "api_key", &sealed),
            Err(SecretError::WrongKey { .. })
        ));
        assert!(matches!(
            k.open("acc_1", "refresh_token", &sealed),
            Err(SecretError::WrongKey { .. })
        ));
    }

    #[test]
    fn wrong_key_and_garbage_are_errors_not_panics() {
        let other = SecretKey::from_base64(&encoding::base64(&[9u8; 32]), "other".into())
            .expect("valid key");
        let sealed = key().seal("a", "f", &Secret::new("v"));
        let err = other.open("a", "f", &sealed).expect_err("wrong key");
        assert!(err.to_string().contains("f of a"));
        assert!(matches!(
            key().open("a", "f", "enc:v1:@@@"),
            Err(SecretError::Malformed { .. })
        ));
        assert!(matches!(
            key().open("a", "f", "enc:v1:AAAA"),
            Err(SecretError::Malformed { .. })
        ));
        assert!(SecretKey::from_base64("c2hvcnQ=", "x".into()).is_err());
    }

    #[test]
    fn secrets_never_print_in_clear() {
        let s = Secret::new("sk-ant-api03-abcdefghijklmnop-wxyz");
        assert_eq!(s.mask(), "sk-ant-…wxyz");
        assert_eq!(format!("{s}"), "sk-ant-…wxyz");
        assert!(!format!("{s:?}").contains("abcdefgh"));
        assert_eq!(Secret::new("short").mask(), "…");
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
