//! Sticky sessions: keep a conversation on one account so Anthropic's prompt cache stays warm.
//! The key comes from the request (`metadata.user_id`'s session, else `x-session-id`, else a
//! hash of the system prompt and first message), scoped by the client key that sent it, so no
//! key can reach another's pin by sending its session id. Pins expire after a TTL, and the
//! table is bounded twice: one key holds at most `max_per_key` pins (its own oldest go first),
//! and past `max_entries`, expired pins go first, then the oldest.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::value::RawValue;

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    /// Raw, so a value of the wrong type (the upstream's to refuse) spoils no other field.
    #[serde(borrow, default)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    metadata: Option<Metadata<'a>>,
    #[serde(borrow, default)]
    system: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<First<'a>>,
}

/// The first element of an array, the rest skipped unkept.
struct First<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for First<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<First<'a>, D::Error> {
        struct Visitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visitor<'a> {
            type Value = First<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<First<'a>, A::Error> {
                let first = seq.next_element::<&'de RawValue>()?;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(First(first))
            }
        }
        d.deserialize_seq(Visitor(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct Metadata<'a> {
    #[serde(borrow, default)]
    user_id: Option<Cow<'a, str>>,
}

/// The session part of Claude Code's `metadata.user_id`: either
/// `user_<hex>_account_<uuid>_session_<uuid>` or a JSON string with `session_id`.
pub fn session_of_user_id(user_id: &str) -> Option<String> {
    if let Some((_, session)) = user_id.rsplit_once("_session_") {
        return Some(session.to_string()).filter(|s| !s.is_empty());
    }
    if user_id.trim_start().starts_with('{') {
        let value: serde_json::Value = crate::json::from_str(user_id).ok()?;
        return value["session_id"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(String::from);
    }
    None
}

/// What selection and accounting need from a request body, read in one pass.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// The sticky key, if the request has anything to stick by.
    pub key: Option<u64>,
    /// The `model` it names.
    pub model: Option<String>,
    /// Its `max_tokens`: the most output it may cost.
    pub max_tokens: Option<u64>,
}

pub fn facts(body: &[u8], session_header: Option<&str>) -> Facts {
    let probe: Option<Probe<'_>> = crate::json::from_slice(body).ok();
    Facts {
        model: probe
            .as_ref()
            .and_then(|p| p.model.as_deref())
            .map(String::from),
        key: key_of(probe.as_ref(), session_header),
        max_tokens: (probe.as_ref())
            .and_then(|p| p.max_tokens)
            .and_then(|raw| raw.get().parse().ok()),
    }
}

/// The sticky key of a Messages request, if it has anything to stick by.
#[cfg(test)]
pub fn key(body: &[u8], session_header: Option<&str>) -> Option<u64> {
    facts(body, session_header).key
}

fn key_of(probe: Option<&Probe<'_>>, session_header: Option<&str>) -> Option<u64> {
    let session = probe
        .and_then(|p| p.metadata.as_ref())
        .and_then(|m| m.user_id.as_deref())
        .and_then(session_of_user_id);
    if let Some(session) = session {
        return Some(hash(&[b"session", session.as_bytes()]));
    }
    if let Some(header) = session_header.filter(|h| !h.is_empty()) {
        return Some(hash(&[b"header", header.as_bytes()]));
    }
    let probe = probe?;
    let first = probe.messages.as_ref().and_then(|m| m.0);
    if probe.system.is_none() && first.is_none() {
        return None;
    }
    Some(hash(&[
        b"content",
        probe.system.map_or("", |s| s.get()).as_bytes(),
        first.map_or("", |m| m.get()).as_bytes(),
    ]))
}

/// A request's sticky key: the conversation's hash scoped by the client key that sent it, and
/// that key's id (`owner`), whose share of the table is bounded; `None` when auth is open and
/// every request is the one anonymous client's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key<'a> {
    pub hash: u64,
    pub owner: Option<&'a str>,
}

impl Key<'_> {
    pub fn new(conversation: u64, owner: Option<&str>) -> Key<'_> {
        Key {
            hash: hash(&[
                b"scope",
                owner.unwrap_or("").as_bytes(),
                &conversation.to_le_bytes(),
            ]),
            owner,
        }
    }
}

fn hash(parts: &[&[u8]]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

struct Pin {
    account: String,
    /// The account it was pinned to before it last moved: the one whose thinking signatures
    /// the conversation may carry.
    previous: Option<String>,
    expires: Instant,
    /// The client key whose pin it is, if its share is bounded.
    owner: Option<String>,
}

/// The pins, and each bounded key's pins ordered by expiry (its oldest first).
#[derive(Default)]
struct Table {
    pins: HashMap<u64, Pin>,
    by_owner: HashMap<String, BTreeSet<(Instant, u64)>>,
}

impl Table {
    fn owned(&mut self, owner: &Option<String>) -> Option<&mut BTreeSet<(Instant, u64)>> {
        self.by_owner.get_mut(owner.as_deref()?)
    }

    fn remove(&mut self, key: u64) {
        if let Some(pin) = self.pins.remove(&key)
            && let Some(owner) = pin.owner
            && let Some(set) = self.by_owner.get_mut(&owner)
        {
            set.remove(&(pin.expires, key));
            if set.is_empty() {
                self.by_owner.remove(&owner);
            }
        }
    }

    /// Removes the pins `drop` names.
    fn remove_where(&mut self, drop: impl Fn(&Pin) -> bool) {
        let gone: Vec<u64> = (self.pins.iter())
            .filter(|(_, p)| drop(p))
            .map(|(k, _)| *k)
            .collect();
        for key in gone {
            self.remove(key);
        }
    }
}

/// The pins, bounded in number overall and per client key.
pub struct Sticky {
    table: Mutex<Table>,
    ttl: Duration,
    max_entries: usize,
    max_per_key: usize,
}

impl Sticky {
    pub fn new(ttl: Duration, max_entries: usize, max_per_key: usize) -> Sticky {
        Sticky {
            table: Mutex::default(),
            ttl,
            max_entries: max_entries.max(1),
            max_per_key: max_per_key.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The account pinned for `key`, if the pin is still alive.
    #[cfg(test)]
    pub fn get(&self, key: u64, now: Instant) -> Option<String> {
        self.find(key, now, |id| Some(id.to_string()))
    }

    /// `lookup` applied to the account pinned for `key`, if the pin is still alive (no copy of
    /// the id is made on this hot path).
    pub fn find<T>(
        &self,
        key: u64,
        now: Instant,
        lookup: impl FnOnce(&str) -> Option<T>,
    ) -> Option<T> {
        let table = self.lock();
        table
            .pins
            .get(&key)
            .filter(|p| now < p.expires)
            .and_then(|p| lookup(&p.account))
    }

    /// The account `key` was pinned to before its pin last moved, while the pin lives.
    pub fn previous(&self, key: u64, now: Instant) -> Option<String> {
        let table = self.lock();
        let pin = table.pins.get(&key).filter(|p| now < p.expires)?;
        pin.previous.clone()
    }

    /// Pins `key` to `account` for the TTL from now (a use renews the pin).
    pub fn pin(&self, key: Key<'_>, account: &str, now: Instant) {
        let expires = now + self.ttl;
        let mut table = self.lock();
        let table = &mut *table;
        if let Some(p) = table.pins.get_mut(&key.hash) {
            let before = std::mem::replace(&mut p.expires, expires);
            if p.account != account {
                p.previous = Some(std::mem::replace(&mut p.account, account.to_string()));
            }
            let owner = p.owner.clone();
            if let Some(set) = table.owned(&owner) {
                set.remove(&(before, key.hash));
                set.insert((expires, key.hash));
            }
            return;
        }
        if let Some(owner) = key.owner {
            let oldest = (table.by_owner.get(owner))
                .filter(|set| set.len() >= self.max_per_key)
                .and_then(|set| set.first())
                .map(|(_, k)| *k);
            // The key is at its share: its own oldest pin makes room, nobody else's.
            if let Some(oldest) = oldest {
                table.remove(oldest);
            }
        }
        if table.pins.len() >= self.max_entries {
            table.remove_where(|p| now >= p.expires);
            if table.pins.len() >= self.max_entries {
                // Drop the oldest tenth in one sweep, so eviction stays rare and cheap.
                let mut ages: Vec<Instant> = table.pins.values().map(|p| p.expires).collect();
                let cut = (self.max_entries / 10).max(1).min(ages.len() - 1);
                let (_, nth, _) = ages.select_nth_unstable(cut);
                let limit = *nth;
                table.remove_where(|p| p.expires <= limit);
            }
        }
        if let Some(owner) = key.owner {
            let set = table.by_owner.entry(owner.to_string()).or_default();
            set.insert((expires, key.hash));
        }
        table.pins.insert(
            key.hash,
            Pin {
                account: account.to_string(),
                previous: None,
                expires,
                owner: key.owner.map(String::from),
            },
        );
    }

    /// How long a pin lives after its last use.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How many pins the table holds.
    pub fn pins(&self) -> usize {
        self.lock().pins.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_id_sessions_in_both_forms() {
        let hex = "a".repeat(64);
        assert_eq!(
            session_of_user_id(&format!("user_{hex}_account_1b2c_session_9f3e-11")).as_deref(),
            Some("9f3e-11")
        );
        assert_eq!(
            session_of_user_id(&format!("user_{hex}_account__session_s2")).as_deref(),
            Some("s2")
        );
        assert_eq!(
            session_of_user_id(r#"{"device_id":"d","account_uuid":"a","session_id":"s3"}"#)
                .as_deref(),
            Some("s3")
        );
        assert_eq!(session_of_user_id("someone@example.com"), None);
    }

    #[test]
    fn keys_follow_the_precedence() {
        let with_session =
            br#"{"metadata":{"user_id":"user_x_account__session_S"},"system":"a","messages":[{"role":"user","content":"hi"}]}"#;
        let other_content =
            br#"{"metadata":{"user_id":"user_x_account__session_S"},"system":"b","messages":[]}"#;
        assert_eq!(key(with_session, None), key(other_content, Some("h")));

        let plain = br#"{"system":"a","messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"x"}]}"#;
        let next_turn = br#"{"system":"a","messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"y"},{"role":"user","content":"z"}]}"#;
        assert_eq!(key(plain, None), key(next_turn, None), "same conversation");
        assert_ne!(
            key(plain, None),
            key(br#"{"system":"b","messages":[]}"#, None)
        );
        assert_eq!(
            key(plain, Some("h1")),
            key(b"{}", Some("h1")),
            "header beats content"
        );
        assert_eq!(key(b"{}", None), None);
        assert_eq!(key(b"not json", None), None);
    }

    #[test]
    fn pins_expire_and_renew() {
        let s = Sticky::new(Duration::from_secs(10), 100, 100);
        let t0 = Instant::now();
        let k = Key::new(1, Some("ck_1"));
        s.pin(k, "a", t0);
        assert_eq!(
            s.get(k.hash, t0 + Duration::from_secs(9)).as_deref(),
            Some("a")
        );
        s.pin(k, "a", t0 + Duration::from_secs(9));
        assert_eq!(
            s.get(k.hash, t0 + Duration::from_secs(15)).as_deref(),
            Some("a")
        );
        assert_eq!(s.get(k.hash, t0 + Duration::from_secs(20)), None);
        s.pin(k, "b", t0);
        assert_eq!(s.get(k.hash, t0).as_deref(), Some("b"), "re-pinned");
    }

    #[test]
    fn the_table_stays_bounded() {
        let s = Sticky::new(Duration::from_secs(3600), 1000, 1000);
        let t0 = Instant::now();
        let owners = ["ck_1", "ck_2", "ck_3"];
        for k in 0..50_000u64 {
            let key = Key::new(k, Some(owners[k as usize % 3]));
            s.pin(key, "a", t0 + Duration::from_millis(k));
            assert!(s.pins() <= 1000);
        }
        let newest = Key::new(49_999, Some(owners[49_999 % 3]));
        assert!(s.get(newest.hash, t0).is_some(), "the newest pins survive");
        assert!(
            s.get(Key::new(0, Some("ck_1")).hash, t0).is_none(),
            "the oldest were evicted"
        );
        let table = s.lock();
        let owned: usize = table.by_owner.values().map(BTreeSet::len).sum();
        assert_eq!(owned, table.pins.len(), "every pin is in its owner's order");
    }

    #[test]
    fn keys_are_scoped_and_hold_at_most_their_share() {
        assert_ne!(
            Key::new(7, Some("ck_1")).hash,
            Key::new(7, Some("ck_2")).hash
        );
        let s = Sticky::new(Duration::from_secs(3600), 100, 5);
        let t0 = Instant::now();
        let kept = Key::new(0, Some("ck_quiet"));
        s.pin(kept, "a", t0);
        let flood = |k: u64| Key::new(k, Some("ck_flood"));
        s.pin(flood(0), "b", t0);
        for k in 1..500u64 {
            let at = t0 + Duration::from_millis(k);
            s.pin(flood(k), "b", at);
            // Its first pin stays in use: renewed, it is never its oldest.
            s.pin(flood(0), "b", at);
        }
        assert_eq!(s.pins(), 6, "the flooding key holds its share only");
        assert_eq!(s.get(kept.hash, t0).as_deref(), Some("a"));
        assert!(s.get(flood(499).hash, t0).is_some(), "its newest pins stay");
        assert!(s.get(flood(0).hash, t0).is_some(), "and the one in use");
        assert!(s.get(flood(1).hash, t0).is_none(), "its oldest went");
        // The open client (auth.open) is not bounded per key.
        let open = Sticky::new(Duration::from_secs(3600), 100, 5);
        for k in 0..50u64 {
            open.pin(Key::new(k, None), "a", t0);
        }
        assert_eq!(open.pins(), 50);
    }
}
