//! Client authentication: gateway keys (`lgw_…`) presented as `x-api-key` or
//! `Authorization: Bearer`. Only SHA-256 hashes are held, and they are compared in constant
//! time. The client's credential is checked here and never travels further.

use std::sync::{Arc, RwLock};

use crate::config::{ClientKey, KeyLimits};
use crate::encoding;
use crate::error::ApiError;
use crate::http::Request;
use crate::secret::{self, Secret};

pub const KEY_PREFIX: &str = "lgw_";
/// The id of the one anonymous client when `auth.open` serves requests without a key.
const OPEN_ID: &str = "-";

/// A freshly generated gateway key: 256 bits of OS randomness behind a recognisable prefix.
pub fn generate_key() -> Secret {
    Secret::new(format!(
        "{KEY_PREFIX}{}",
        encoding::base64url(&secret::random_bytes::<32>())
    ))
}

/// `sha256:<hex>`, the stored form of a key.
pub fn hash_for_storage(key: &Secret) -> String {
    format!(
        "sha256:{}",
        encoding::hex(&secret::sha256(key.expose().as_bytes()))
    )
}

/// Who made a request, for logs and (later) limits.
#[derive(Debug, Clone)]
pub struct Client {
    /// The key's id (`-` when auth is open), for the ledger and limits.
    pub id: String,
    pub name: String,
    /// May read status and metrics.
    pub admin: bool,
    /// `None`: no limit of any kind.
    pub limits: Option<Arc<KeyLimits>>,
}

impl Client {
    /// The anonymous client of `auth.open`, not a key.
    pub fn is_open(&self) -> bool {
        self.id == OPEN_ID
    }
}

pub struct ClientKeys {
    keys: RwLock<Arc<Vec<ClientKey>>>,
    /// Serve requests without a key (config `auth.open`).
    open: bool,
}

impl ClientKeys {
    pub fn new(keys: Vec<ClientKey>, open: bool) -> ClientKeys {
        ClientKeys {
            keys: RwLock::new(Arc::new(keys)),
            open,
        }
    }

    pub fn replace(&self, keys: Vec<ClientKey>) {
        let fresh = Arc::new(keys);
        match self.keys.write() {
            Ok(mut guard) => *guard = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
    }

    fn snapshot(&self) -> Arc<Vec<ClientKey>> {
        match self.keys.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Checks the request's gateway key.
    pub fn authenticate(&self, req: &Request) -> Result<Client, ApiError> {
        let presented = presented_key(req);
        let keys = self.snapshot();
        if self.open && presented.is_none() {
            return Ok(Client {
                id: OPEN_ID.into(),
                name: "open".into(),
                admin: false,
                limits: None,
            });
        }
        if keys.is_empty() && !self.open {
            return Err(ApiError::Unauthorized(
                "this gateway has no client keys yet: create one with `llm-gateway add-client-key --name=NAME` and send it as x-api-key or Authorization: Bearer".into(),
            ));
        }
        let Some(presented) = presented else {
            return Err(ApiError::Unauthorized(
                "missing gateway key: send it as x-api-key or Authorization: Bearer".into(),
            ));
        };
        let hash = secret::sha256(presented.as_bytes());
        // Look at every key, whatever matches, so timing says nothing about which did.
        let mut found = None;
        for key in keys.iter() {
            if secret::constant_time_eq(&key.hash, &hash) && found.is_none() {
                found = Some(key);
            }
        }
        let key = found.ok_or_else(|| ApiError::Unauthorized("invalid gateway key".into()))?;
        if key.revoked {
            return Err(ApiError::Unauthorized(
                "this gateway key was revoked".into(),
            ));
        }
        if !key.enabled {
            return Err(ApiError::Unauthorized(
                "this gateway key is disabled".into(),
            ));
        }
        if let Some(at) = key.expires_at
            && crate::time::now_unix() >= at
        {
            return Err(ApiError::Unauthorized(format!(
                "this gateway key expired at {}",
                crate::time::rfc3339(at)
            )));
        }
        Ok(Client::of(key))
    }

    /// Every key's id and name (revoked ones too: their usage stays).
    pub fn list(&self) -> Vec<(String, String)> {
        (self.snapshot().iter())
            .map(|k| (k.id.clone(), k.name.clone()))
            .collect()
    }

    /// Whether key `id` is an admin key in force (enabled, not revoked, not expired).
    pub fn is_active_admin(&self, id: &str) -> bool {
        let now = crate::time::now_unix();
        self.snapshot().iter().any(|k| {
            k.id == id
                && k.admin
                && k.enabled
                && !k.revoked
                && k.expires_at.is_none_or(|at| now < at)
        })
    }

    /// Every key that is not revoked, as a client with its limits.
    pub fn clients(&self) -> Vec<Client> {
        (self.snapshot().iter())
            .filter(|k| !k.revoked)
            .map(Client::of)
            .collect()
    }

    /// The key whose id or name is `wanted` (revoked and disabled ones too: their usage
    /// stays readable), for an admin asking about it.
    pub fn named(&self, wanted: &str) -> Option<Client> {
        let keys = self.snapshot();
        let key = (keys.iter().find(|k| k.id == wanted))
            .or_else(|| keys.iter().find(|k| k.name == wanted))?;
        Some(Client::of(key))
    }
}

impl Client {
    fn of(key: &ClientKey) -> Client {
        let limited = key.limits != KeyLimits::default();
        Client {
            id: key.id.clone(),
            name: key.name.clone(),
            admin: key.admin,
            limits: limited.then(|| Arc::new(key.limits.clone())),
        }
    }
}

/// The key from `x-api-key`, else from `Authorization: Bearer`.
fn presented_key(req: &Request) -> Option<&str> {
    if let Some(key) = req.header("x-api-key").filter(|k| !k.is_empty()) {
        return Some(key);
    }
    let auth = req.header("authorization")?;
    let (scheme, token) = auth.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> Request {
        Request {
            method: "POST".into(),
            target: "/v1/messages".into(),
            minor_version: 1,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect(),
            body: Vec::new(),
            keep_alive: true,
        }
    }

    fn keys_with(key: &Secret, enabled: bool) -> ClientKeys {
        let stored = hash_for_storage(key);
        let hash = encoding::hex_decode(stored.trim_start_matches("sha256:")).expect("hex");
        ClientKeys::new(
            vec![ClientKey {
                id: "ck_1".into(),
                name: "alice".into(),
                hash: hash.try_into().expect("32 bytes"),
                enabled,
                admin: false,
                limits: KeyLimits::default(),
                expires_at: None,
                revoked: false,
            }],
            false,
        )
    }

    #[test]
    fn generated_keys_are_long_and_prefixed() {
        let k = generate_key();
        assert!(k.expose().starts_with("lgw_"));
        assert_eq!(k.expose().len(), 4 + 43);
        assert_ne!(k, generate_key());
    }

    #[test]
    fn accepts_x_api_key_and_bearer() {
        let key = generate_key();
        let keys = keys_with(&key, true);
        let by_header = keys.authenticate(&request(&[("x-api-key", key.expose())]));
        assert_eq!(by_header.expect("valid").name, "alice");
        let bearer = format!("Bearer {}", key.expose());
        let by_bearer = keys.authenticate(&request(&[("authorization", &bearer)]));
        assert_eq!(by_bearer.expect("valid").id, "ck_1");
    }

    #[test]
    fn rejects_missing_wrong_and_disabled_keys() {
        let key = generate_key();
        let keys = keys_with(&key, true);
        assert_eq!(
            keys.authenticate(&request(&[]))
                .expect_err("missing")
                .status(),
            401
        );
        let wrong = keys.authenticate(&request(&[("x-api-key", "lgw_nope")]));
        assert_eq!(wrong.expect_err("wrong").status(), 401);
        let disabled = keys_with(&key, false);
        assert!(
            disabled
                .authenticate(&request(&[("x-api-key", key.expose())]))
                .is_err()
        );
    }

    #[test]
    fn no_keys_configured_points_at_add_client_key() {
        let keys = ClientKeys::new(vec![], false);
        let err = keys
            .authenticate(&request(&[("x-api-key", "anything")]))
            .expect_err("closed");
        assert!(err.to_string().contains("add-client-key"));
        let open = ClientKeys::new(vec![], true);
        assert!(open.authenticate(&request(&[])).is_ok());
    }
}
