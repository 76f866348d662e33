//! Helpers for tests with several upstream accounts: keys the fake upstream tells apart,
//! bodies that name the account that served them, a gateway started with accounts, bounded
//! polling, cases run side by side, and reading the status views.

use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::{Config, FakeUpstream, Gateway, Reply, Response, call};

pub const KEY_A: &str = "sk-ant-api03-BalanceAccountAlpha-aaaa";
pub const KEY_B: &str = "sk-ant-api03-BalanceAccountBravo-bbbb";
pub const KEY_C: &str = "sk-ant-api03-BalanceAccountCharlie-cccc";
pub const KEY_D: &str = "sk-ant-api03-BalanceAccountDelta-dddd";

/// A success body that names the account (by its key's last four characters) that served it.
pub fn served_by(key: &str) -> String {
    format!(
        r#"{{"id":"msg_balance","type":"message","role":"assistant","content":[],"served_by":"{}"}}"#,
        &key[key.len() - 4..]
    )
}

/// An Anthropic error body; `key` is named in the message so the client's copy shows its origin.
pub fn error_body(kind: &str, message: &str, key: &str) -> String {
    format!(
        r#"{{"type":"error","error":{{"type":"{kind}","message":"{message} ({})"}}}}"#,
        &key[key.len() - 4..]
    )
}

/// A 429 `rate_limit_error` for `key`'s account with `retry-after: {retry_after}`.
pub fn rate_limited(retry_after: &str, key: &str) -> Reply {
    Reply::json_with(
        429,
        &[("retry-after", retry_after)],
        &error_body("rate_limit_error", "rate limited", key),
    )
}

/// An upstream that answers `KEY_A` with 429 and `retry-after: 2` once each time the returned
/// switch is set (set from the start when `armed`), and every other request with `served_by`.
pub fn rests_key_a_once(armed: bool) -> (FakeUpstream, Arc<AtomicBool>) {
    let switch = Arc::new(AtomicBool::new(armed));
    let set = Arc::clone(&switch);
    let up = FakeUpstream::start(move |req| {
        let key = req.api_key();
        if key == KEY_A && set.swap(false, Ordering::SeqCst) {
            rate_limited("2", key)
        } else {
            Reply::json(200, &served_by(key))
        }
    });
    (up, switch)
}

/// An upstream that names the serving account in each answer, and answers 429
/// (`retry-after: 60`) for the key in `limited`, if any.
pub fn limiting_upstream(limited: &Arc<Mutex<Option<String>>>) -> FakeUpstream {
    let limited = Arc::clone(limited);
    FakeUpstream::start(move |req| {
        let key = req.api_key();
        if key.is_empty() {
            // An OAuth account (the outage test has one): no key to name.
            return Reply::json(200, &served_by("oauth"));
        }
        if limited.lock().expect("limited lock").as_deref() == Some(key) {
            rate_limited("60", key)
        } else {
            Reply::json(200, &served_by(key))
        }
    })
}

/// An upstream that answers its first request 429 (`rate_limit_error`, with `headers`),
/// whichever account sent it, and every later one with `served_by`.
pub fn first_request_limited(headers: &[(&str, &str)]) -> FakeUpstream {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    let limited_once = AtomicBool::new(true);
    FakeUpstream::start(move |req| {
        if limited_once.swap(false, Ordering::SeqCst) {
            Reply::Json {
                status: 429,
                headers: headers.clone(),
                body: error_body("rate_limit_error", "rate limited", req.api_key()).into(),
            }
        } else {
            Reply::json(200, &served_by(req.api_key()))
        }
    })
}

/// An upstream that tells the account it heard from first from the others: it answers
/// `reply(key, first)`, where `first` says whether `key` is that account's.
pub fn first_account_apart(reply: impl Fn(&str, bool) -> Reply + Send + 'static) -> FakeUpstream {
    let mut first: Option<String> = None;
    FakeUpstream::start(move |req| {
        let key = req.api_key();
        let is_first = *first.get_or_insert_with(|| key.to_string()) == key;
        reply(key, is_first)
    })
}

/// A running gateway with these API-key accounts (name, key, extra flags) and one client key;
/// returns it with the account ids, in the same order.
pub fn started(config: &Config, accounts: &[(&str, &str, &[&str])]) -> (Gateway, Vec<String>) {
    let mut gw = Gateway::new(config);
    let ids = accounts
        .iter()
        .map(|(name, key, extra)| gw.add_api_key_with(name, key, extra))
        .collect();
    gw.add_client_key("tests");
    gw.start();
    (gw, ids)
}

/// A running gateway with two plain accounts, "a" (`KEY_A`) and "b" (`KEY_B`), and one
/// client key; returns it with the two account ids.
pub fn started_ab(config: &Config) -> (Gateway, Vec<String>) {
    started(config, &[("a", KEY_A, &[]), ("b", KEY_B, &[])])
}

/// A Messages body that starts a conversation of its own, so no sticky pin (which, without a
/// session, follows the first message) ties it to an account used before.
pub fn new_conversation() -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[{{"role":"user","content":"conversation {n}"}}]}}"#
    )
}

/// Posts a new conversation.
pub fn post(gw: &Gateway) -> Response {
    post_body(gw, &new_conversation())
}

pub fn post_body(gw: &Gateway, body: &str) -> Response {
    call(
        gw.addr(),
        "POST",
        "/v1/messages",
        &[gw.auth(), ("content-type", "application/json")],
        body.as_bytes(),
    )
}

/// Posts a new conversation and checks it was served (200) by the account with `key`.
pub fn assert_served_by(gw: &Gateway, key: &str, what: &str) {
    let resp = post(gw);
    assert_eq!(resp.status, 200, "{what}: {}", resp.text());
    assert_eq!(
        resp.text(),
        served_by(key),
        "{what}: served by the wrong account"
    );
}

/// Calls `attempt` until it returns true, failing the test if `limit` passes first. Returns
/// when it succeeded. The pause between attempts paces the loop; the deadline bounds it.
pub fn poll_until(limit: Duration, what: &str, mut attempt: impl FnMut() -> bool) -> Instant {
    let deadline = Instant::now() + limit;
    loop {
        if attempt() {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `check` on every case at once, one thread each, and fails naming every case that failed.
pub fn each_case<T: Sync + std::fmt::Debug>(cases: &[T], check: impl Fn(&T) + Sync) {
    let failed: Vec<String> = thread::scope(|s| {
        let running: Vec<_> = cases
            .iter()
            .map(|case| (case, s.spawn(|| check(case))))
            .collect();
        running
            .into_iter()
            .filter_map(|(case, handle)| {
                handle.join().err().map(|panic| {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    format!("case {case:?}: {message}")
                })
            })
            .collect()
    });
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// Unix time now, in seconds with a fraction.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// Parses an RFC 3339 timestamp (`2026-11-26T07:04:00Z`, with optional fraction and offset)
/// into Unix seconds.
pub fn unix_from_rfc3339(s: &str) -> f64 {
    let bad = || panic!("not an RFC 3339 timestamp: {s:?}");
    if s.len() < 20 || &s[4..5] != "-" || &s[7..8] != "-" || &s[13..14] != ":" {
        bad();
    }
    let num = |from: usize, to: usize| -> i64 { s[from..to].parse().unwrap_or_else(|_| bad()) };
    let (y, m, d) = (num(0, 4), num(5, 7), num(8, 10));
    let secs = num(11, 13) * 3600 + num(14, 16) * 60 + num(17, 19);
    // Days from the civil date (Howard Hinnant's algorithm).
    let yy = if m <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let mut rest = &s[19..];
    let mut fraction = 0.0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        fraction = format!("0.{}", &frac[..digits]).parse().unwrap_or(0.0);
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && (rest.starts_with('+') || rest.starts_with('-')) => {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            let hours: i64 = rest[1..3].parse().unwrap_or_else(|_| bad());
            let minutes: i64 = rest[4..6].parse().unwrap_or_else(|_| bad());
            sign * (hours * 3600 + minutes * 60)
        }
        _ => bad(),
    };
    (days * 86_400 + secs - offset) as f64 + fraction
}

/// `GET /admin/status` on the admin listener (no key needed there).
pub fn admin_status(gw: &Gateway) -> Value {
    let resp = call(gw.admin_addr(), "GET", "/admin/status", &[], b"");
    assert_eq!(resp.status, 200, "admin status: {}", resp.text());
    resp.json()
}

/// The account with `id` in a status or health-check view.
pub fn account<'a>(view: &'a Value, id: &str) -> &'a Value {
    view["accounts"]
        .as_array()
        .unwrap_or_else(|| panic!("no accounts array in {view}"))
        .iter()
        .find(|a| a["id"] == id)
        .unwrap_or_else(|| panic!("account {id} missing from {view}"))
}

pub fn stdout_json(out: &Output, what: &str) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

pub fn retry_after(resp: &Response) -> u64 {
    resp.header("retry-after")
        .unwrap_or_else(|| panic!("no retry-after on {} {}", resp.status, resp.text()))
        .parse()
        .unwrap_or_else(|e| panic!("retry-after is not whole seconds ({e}): {resp:?}"))
}

/// How much longer than its cooldown an account may take to serve again: the gateway's jitter
/// (at most 250 ms) plus the test's polling, with room for a busy machine.
pub const RETURN_SLACK: Duration = Duration::from_millis(750);

/// Asserts that an account rested `rested` for a cooldown of `cooldown`: not less, and not
/// longer than the jitter and the polling explain.
pub fn assert_rested(rested: Duration, cooldown: Duration, what: &str) {
    assert!(
        rested >= cooldown,
        "{what}: used again after {rested:?}, before its {cooldown:?} were over"
    );
    assert!(
        rested <= cooldown + RETURN_SLACK,
        "{what}: used again only after {rested:?}; the cooldown was {cooldown:?}"
    );
}

/// Rounds up to whole seconds, at least 1: what `retry-after` says for this much time left.
pub fn ceil_secs(secs: f64) -> u64 {
    (secs.ceil() as u64).max(1)
}
