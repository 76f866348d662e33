//! The read-only dashboard: one HTML/CSS/JS bundle embedded in the binary (`assets/`, no
//! build step, no CDN; charts are SVG drawn by its own script), the JSON it reads under
//! `/admin/api/` (`api`), the session cookie its login form sets (`Sessions`), and the recent
//! trouble it shows (`Trouble`, kept in memory).
//!
//! Access follows the status rules: no key on the loopback admin listener; elsewhere an admin
//! key, sent as a header or exchanged once for a session cookie (an HMAC of its expiry, keyed
//! from `gateway.key`, so every instance accepts it).

pub mod api;
pub mod routes;

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

/// Session cookies: `<key id>.<expiry>.<hex HMAC-SHA256 of "v1.<key id>.<expiry>">`. The
/// key id is the admin key that signed in: a session ends with that key (revoked, disabled,
/// no longer admin), whatever its expiry.
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

    /// A cookie value for admin key `key_id`, valid until `now + SESSION_SECS`.
    pub fn issue(&self, key_id: &str, now: u64) -> Option<String> {
        let key = self.key.as_ref()?;
        let expiry = now + SESSION_SECS;
        let tag = ring::hmac::sign(key, format!("v1.{key_id}.{expiry}").as_bytes());
        Some(format!(
            "{key_id}.{expiry}.{}",
            crate::encoding::hex(tag.as_ref())
        ))
    }

    /// The admin key id a cookie this deployment issued names, if it has not expired.
    pub fn valid<'a>(&self, value: &'a str, now: u64) -> Option<&'a str> {
        let key = self.key.as_ref()?;
        let mut parts = value.split('.');
        let (key_id, expiry, tag) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || key_id.is_empty() {
            return None;
        }
        let (at, tag) = (
            expiry.parse::<u64>().ok()?,
            crate::encoding::hex_decode(tag)?,
        );
        let fresh = at > now && at <= now + SESSION_SECS;
        let signed = format!("v1.{key_id}.{expiry}");
        (fresh && ring::hmac::verify(key, signed.as_bytes(), &tag).is_ok()).then_some(key_id)
    }
}

/// Whether a request's `Host` names this machine (or is absent): keyless access on the
/// loopback admin listener is for programs and browsers here, and a web page that rebinds its
/// own name to 127.0.0.1 still sends its own name.
pub fn loopback_host(host: Option<&str>) -> bool {
    let Some(host) = host.map(str::trim) else {
        return true;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        }),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
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
    pub path: String,
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
        let cookie = sessions.issue("ck_1", 1_000).expect("a cookie");
        assert_eq!(sessions.valid(&cookie, 1_000), Some("ck_1"));
        assert_eq!(
            sessions.valid(&cookie, 1_000 + SESSION_SECS - 1),
            Some("ck_1")
        );
        assert_eq!(
            sessions.valid(&cookie, 1_000 + SESSION_SECS),
            None,
            "expired"
        );
        // Another instance with the same key accepts it; another key does not.
        assert!(Sessions::new(Some(&key())).valid(&cookie, 2_000).is_some());
        let other =
            crate::secret::SecretKey::from_base64(&crate::encoding::base64(&[8u8; 32]), "o".into())
                .expect("key");
        assert!(Sessions::new(Some(&other)).valid(&cookie, 2_000).is_none());
        // Its tag with another key id, or a later expiry: refused; garbage too.
        let tag = cookie.rsplit('.').next().expect("a tag");
        assert!(
            sessions
                .valid(&format!("ck_2.{}.{tag}", 1_000 + SESSION_SECS), 2_000)
                .is_none()
        );
        assert!(
            sessions
                .valid(&format!("ck_1.{}.{tag}", 1_000 + SESSION_SECS - 5), 2_000)
                .is_none()
        );
        for bad in [
            "",
            ".",
            "x.y",
            "ck.99999999999.00",
            &format!("ck_1.{}.zz", 2_000),
            "a.b.c.d",
        ] {
            assert!(sessions.valid(bad, 1_500).is_none(), "{bad:?}");
        }
        assert!(Sessions::new(None).issue("ck_1", 1).is_none());
    }

    #[test]
    fn only_this_machines_names_are_loopback_hosts() {
        for ok in [
            None,
            Some("127.0.0.1:8081"),
            Some("localhost"),
            Some("LOCALHOST:1"),
            Some("[::1]:8081"),
            Some("127.1.2.3"),
        ] {
            assert!(loopback_host(ok), "{ok:?}");
        }
        for bad in [
            "evil.example:8081",
            "10.0.0.1",
            "localhost.evil.example",
            "[::2]:1",
            "",
        ] {
            assert!(!loopback_host(Some(bad)), "{bad:?}");
        }
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
                path: String::new(),
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
