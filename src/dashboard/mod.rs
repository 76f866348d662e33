//! The read-only dashboard: one HTML/CSS/JS bundle embedded in the binary (`assets/`, no
//! build step, no CDN; charts are SVG drawn by its own script), the JSON it reads under
//! `/admin/api/` (`api`), the session cookie its login form sets (`Sessions`), and the recent
//! trouble it shows (`Trouble`, kept in memory).
//!
//! Access follows the status rules: no key on the loopback admin listener; elsewhere an admin
//! key, sent as a header or exchanged once for a session cookie (an HMAC of its expiry, keyed
//! from `gateway.key`, so every instance accepts it).

pub mod api;

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

/// The session cookie's name.
pub const COOKIE: &str = "lgw_session";

/// How long a session lasts.
pub const SESSION_SECS: u64 = 12 * 3600;

/// Trouble entries kept.
const TROUBLE_KEPT: usize = 50;

/// The bundle: (path, content type, bytes).
pub const ASSETS: [(&str, &str, &str); 3] = [
    (
        "/dashboard",
        "text/html; charset=utf-8",
        include_str!("assets/index.html"),
    ),
    (
        "/dashboard/app.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/app.js"),
    ),
    (
        "/dashboard/app.css",
        "text/css; charset=utf-8",
        include_str!("assets/app.css"),
    ),
];

/// The headers every dashboard answer carries: only the page's own scripts and styles run,
/// nothing frames it, nothing is cached or sent elsewhere.
pub const HEADERS: [(&str, &str); 5] = [
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    ("cache-control", "no-store"),
];

/// Session cookies: `<expiry>.<hex HMAC-SHA256 of "v1.<expiry>">`.
pub struct Sessions {
    key: Option<ring::hmac::Key>,
}

impl Sessions {
    /// Sessions keyed from `key`; without one (no `gateway.key`) none can be made.
    pub fn new(key: Option<&crate::secret::SecretKey>) -> Sessions {
        Sessions {
            key: key.map(|k| k.derive("llm-gateway dashboard session v1")),
        }
    }

    /// A cookie value valid until `now + SESSION_SECS`.
    pub fn issue(&self, now: u64) -> Option<String> {
        let key = self.key.as_ref()?;
        let expiry = now + SESSION_SECS;
        let tag = ring::hmac::sign(key, format!("v1.{expiry}").as_bytes());
        Some(format!("{expiry}.{}", crate::encoding::hex(tag.as_ref())))
    }

    /// Whether `value` is a cookie this deployment issued that has not expired.
    pub fn valid(&self, value: &str, now: u64) -> bool {
        let (Some(key), Some((expiry, tag))) = (&self.key, value.split_once('.')) else {
            return false;
        };
        let (Ok(at), Some(tag)) = (expiry.parse::<u64>(), crate::encoding::hex_decode(tag)) else {
            return false;
        };
        at > now
            && at <= now + SESSION_SECS
            && ring::hmac::verify(key, format!("v1.{expiry}").as_bytes(), &tag).is_ok()
    }
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.trim())
}

/// One request that failed or failed over, as the dashboard lists it.
#[derive(Debug, Clone, Serialize)]
pub struct Trouble {
    pub time: String,
    pub request_id: String,
    pub client: String,
    pub account: String,
    pub model: Option<String>,
    pub status: u16,
    pub error: Option<String>,
    /// The accounts that did not serve it, and why.
    pub failover: Vec<String>,
}

/// The last `TROUBLE_KEPT` troubles of this instance, newest last.
#[derive(Default)]
pub struct Recent {
    kept: Mutex<VecDeque<Trouble>>,
}

impl Recent {
    pub fn note(&self, trouble: Trouble) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() == TROUBLE_KEPT {
            kept.pop_front();
        }
        kept.push_back(trouble);
    }

    pub fn list(&self) -> Vec<Trouble> {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.iter().rev().cloned().collect()
    }
}

/// Text cut at `max` characters (an error's message may be long, and may quote a request).
pub fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> crate::secret::SecretKey {
        let text = crate::encoding::base64(&[7u8; 32]);
        crate::secret::SecretKey::from_base64(&text, "test".into()).expect("key")
    }

    #[test]
    fn sessions_are_accepted_until_they_expire_and_only_when_signed() {
        let sessions = Sessions::new(Some(&key()));
        let cookie = sessions.issue(1_000).expect("a cookie");
        assert!(sessions.valid(&cookie, 1_000));
        assert!(sessions.valid(&cookie, 1_000 + SESSION_SECS - 1));
        assert!(!sessions.valid(&cookie, 1_000 + SESSION_SECS), "expired");
        // Another instance with the same key accepts it; another key does not.
        assert!(Sessions::new(Some(&key())).valid(&cookie, 2_000));
        let other =
            crate::secret::SecretKey::from_base64(&crate::encoding::base64(&[8u8; 32]), "o".into())
                .expect("key");
        assert!(!Sessions::new(Some(&other)).valid(&cookie, 2_000));
        // A later expiry with the old tag, a far expiry, garbage: refused.
        let (_, tag) = cookie.split_once('.').expect("two parts");
        assert!(!sessions.valid(&format!("{}.{tag}", 1_000 + SESSION_SECS + 60), 2_000));
        for bad in ["", ".", "x.y", "99999999999.00", &format!("{}.zz", 2_000)] {
            assert!(!sessions.valid(bad, 1_500), "{bad:?}");
        }
        assert!(Sessions::new(None).issue(1).is_none());
    }

    #[test]
    fn cookies_are_found_by_name() {
        assert_eq!(cookie("a=1; lgw_session=x.y; b=2", COOKIE), Some("x.y"));
        assert_eq!(cookie("lgw_session_old=1", COOKIE), None);
    }

    #[test]
    fn trouble_keeps_the_newest() {
        let recent = Recent::default();
        for i in 0..(TROUBLE_KEPT + 5) {
            recent.note(Trouble {
                time: String::new(),
                request_id: i.to_string(),
                client: String::new(),
                account: String::new(),
                model: None,
                status: 500,
                error: None,
                failover: Vec::new(),
            });
        }
        let list = recent.list();
        assert_eq!(list.len(), TROUBLE_KEPT);
        assert_eq!(
            list[0].request_id,
            (TROUBLE_KEPT + 4).to_string(),
            "newest first"
        );
        assert_eq!(cut("héllo", 2), "hé…");
    }
}
