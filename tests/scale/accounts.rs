//! Account state shared through Redis: a cooldown one instance put on an account keeps the
//! others off it, and a sticky session stays on its account whichever instance it reaches.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use super::{start_instances, state_section};
use crate::support::accounts::{
    KEY_A, KEY_B, KEY_C, assert_rested, error_body, limiting_upstream, new_conversation,
    poll_until, post_body, rests_key_a_once, served_by,
};
use crate::support::redis::RedisServer;
use crate::support::{Config, FakeUpstream, Gateway, Reply, call};

/// A gateway (not started) with the accounts "x" (`KEY_A`) and "y" (`KEY_B`) and one client
/// key.
fn x_and_y(config: &Config) -> Gateway {
    let mut gw = Gateway::new(config);
    gw.add_api_key("x", KEY_A);
    gw.add_api_key("y", KEY_B);
    gw.add_client_key("tests");
    gw
}

/// Posts new conversations through `gw` until one reached the account with `key` (which
/// answers 429, so the gateway fails over and the client still gets a 200). Fails the test if
/// the instance never picks that account.
pub fn until_it_meets(gw: &Gateway, up: &FakeUpstream, key: &str, what: &str) {
    for _ in 0..12 {
        let before = up.keys().len();
        let resp = post_body(gw, &new_conversation());
        assert_eq!(resp.status, 200, "{what}: {}", resp.text());
        if up.keys()[before..].iter().any(|k| k == key) {
            return;
        }
    }
    panic!("{what}: 12 requests and the limited account was never tried");
}

#[test]
fn a_429_seen_by_one_instance_benches_the_account_for_all() {
    // After one instance got a 429 with retry-after 60 from an account, no instance sends that
    // account anything until the minute is over.
    let redis = RedisServer::start();
    let limited = Arc::new(Mutex::new(Some(KEY_A.to_string())));
    let up = limiting_upstream(&limited);
    let config = Config::new(up.base_url()).section(&state_section(&redis));
    let gws = start_instances(x_and_y(&config), 3);

    until_it_meets(&gws[0], &up, KEY_A, "instance A");
    let benched_at = up.keys().len();
    for round in 0..10 {
        for (i, gw) in gws[1..].iter().enumerate() {
            let resp = post_body(gw, &new_conversation());
            assert_eq!(resp.status, 200, "round {round}, instance {}", i + 1);
            assert_eq!(resp.text(), served_by(KEY_B));
        }
    }
    let after = up.keys()[benched_at..].to_vec();
    assert_eq!(after.len(), 20, "one upstream request each: {after:?}");
    assert!(
        after.iter().all(|k| k == KEY_B),
        "another instance used the benched account: {after:?}"
    );
}

/// A Messages body of turn `turn` of a conversation; `user_id`, if given, carries the session.
fn turn_body(user_id: Option<&str>, turn: usize) -> String {
    let mut body = json!({
        "model": "claude-sonnet-4-5", "max_tokens": 16,
        "messages": [{"role": "user", "content": format!("turn {turn} of a long talk")}],
    });
    if let Some(user_id) = user_id {
        body["metadata"] = json!({"user_id": user_id});
    }
    body.to_string()
}

/// Claude Code's `metadata.user_id` for `session`.
fn user_id(session: &str) -> String {
    format!(
        "user_{}_account_7c1b6a53-2f0e-4b8e-9a43-1d2c3b4a5f60_session_{session}",
        "5e".repeat(32)
    )
}

#[test]
fn a_sticky_session_stays_on_its_account_across_instances() {
    // A session keeps its account whichever instance each turn reaches, while round robin
    // alone would move it at every turn.
    let redis = RedisServer::start();
    let up = limiting_upstream(&Arc::default());
    let config = Config::new(up.base_url()).section(&format!(
        "balance:\n  strategy: round_robin\nsticky:\n  enabled: true\n  ttl: 1h\n{}",
        state_section(&redis)
    ));
    let mut gw = Gateway::new(&config);
    for (name, key) in [("a", KEY_A), ("b", KEY_B), ("c", KEY_C)] {
        gw.add_api_key(name, key);
    }
    gw.add_client_key("tests");
    let gws = start_instances(gw, 3);

    // Each instance's round robin at a different account (A at the first, B at the second, C
    // at the third), so without shared pins a session's first turn on each would differ.
    for (i, gw) in gws.iter().enumerate() {
        for _ in 0..i {
            assert_eq!(post_body(gw, &new_conversation()).status, 200);
        }
    }

    // One session in metadata.user_id, its turns through A, B, C, A, B, C, ...
    let session = user_id("9b2f4e1a-6c3d-4e5f-8a7b-0c1d2e3f4a5b");
    let before = up.keys().len();
    for turn in 0..12 {
        let resp = post_body(&gws[turn % 3], &turn_body(Some(&session), turn));
        assert_eq!(resp.status, 200, "turn {turn}: {}", resp.text());
    }
    let used = up.keys()[before..].to_vec();
    assert!(
        used.iter().all(|k| *k == used[0]),
        "the metadata session hopped between accounts: {used:?}"
    );

    // The pins live in Redis with the configured TTL (1 h), not forever.
    let pins = redis.keys(&format!("{}:pin:*", super::PREFIX));
    assert!(!pins.is_empty(), "no pin in Redis: {:?}", redis.keys("*"));
    for pin in &pins {
        let ttl: i64 = redis.command(&["PTTL", pin]).parse().expect("PTTL");
        assert!(
            ttl > 0 && ttl <= 3_600_000,
            "pin {pin} lives {ttl} ms; the ttl is 1h"
        );
    }

    // One session named by `x-session-id`, with a new first message at every turn.
    let before = up.keys().len();
    for turn in 0..9 {
        let gw = &gws[(turn + 1) % 3];
        let resp = call(
            gw.addr(),
            "POST",
            "/v1/messages",
            &[
                gw.auth(),
                ("content-type", "application/json"),
                ("x-session-id", "scale-header-session-1"),
            ],
            turn_body(None, 100 + turn).as_bytes(),
        );
        assert_eq!(resp.status, 200, "header turn {turn}: {}", resp.text());
    }
    let used = up.keys()[before..].to_vec();
    assert!(
        used.iter().all(|k| *k == used[0]),
        "the x-session-id session hopped between accounts: {used:?}"
    );

    // Other sessions are free to land elsewhere: round robin spreads new ones.
    let before = up.keys().len();
    for i in 0..6 {
        let session = user_id(&format!("0000000{i}-aaaa-4bbb-8ccc-dddddddddddd"));
        let resp = post_body(&gws[i % 3], &turn_body(Some(&session), 0));
        assert_eq!(resp.status, 200, "new session {i}: {}", resp.text());
    }
    let mut spread = up.keys()[before..].to_vec();
    spread.sort();
    spread.dedup();
    assert!(spread.len() >= 2, "new sessions all went to {spread:?}");
}

#[test]
fn a_401_or_an_ejection_seen_by_one_instance_benches_the_account_for_all() {
    // An API key refused with 401, or ejected after three 5xx in a row, by one instance is
    // left alone by every instance while it rests.
    for (status, failures) in [(401u16, 1usize), (500, 3)] {
        let redis = RedisServer::start();
        let up = FakeUpstream::start(move |req| {
            let key = req.api_key();
            if key == KEY_A {
                let kind = if status == 401 {
                    "authentication_error"
                } else {
                    "api_error"
                };
                Reply::json(status, &error_body(kind, "refused", key))
            } else {
                Reply::json(200, &served_by(key))
            }
        });
        let config = Config::new(up.base_url()).section(&format!(
            "balance:\n  eject_cooldown: 60s\n{}",
            state_section(&redis)
        ));
        let gws = start_instances(x_and_y(&config), 3);

        // Instance A meets the failing account until it benches it.
        for i in 0..30 {
            let resp = post_body(&gws[0], &new_conversation());
            assert_eq!(resp.status, 200, "{status}: request {i}: {}", resp.text());
            if up.keys().iter().filter(|k| *k == KEY_A).count() >= failures {
                break;
            }
        }
        let met = up.keys().iter().filter(|k| *k == KEY_A).count();
        assert_eq!(
            met, failures,
            "{status}: instance A met the account {met} times"
        );
        let benched_at = up.keys().len();
        for round in 0..8 {
            for gw in &gws {
                let resp = post_body(gw, &new_conversation());
                assert_eq!(resp.status, 200, "{status}: round {round}: {}", resp.text());
            }
        }
        let after = up.keys()[benched_at..].to_vec();
        assert!(
            after.iter().all(|k| k == KEY_B),
            "{status}: the benched account was used again: {after:?}"
        );
    }
}

#[test]
fn a_shared_cooldown_ends_when_its_retry_after_says_on_every_instance() {
    // A 429 with retry-after 2 on one instance rests the account for two seconds on another:
    // not less, and not much more.
    let redis = RedisServer::start();
    let (up, _) = rests_key_a_once(true);
    let config = Config::new(up.base_url()).section(&format!(
        "balance:\n  strategy: round_robin\nsticky:\n  enabled: false\n{}",
        state_section(&redis)
    ));
    let gws = start_instances(x_and_y(&config), 2);

    until_it_meets(&gws[0], &up, KEY_A, "instance A");
    let limited_at = up
        .requests()
        .iter()
        .find(|r| r.api_key() == KEY_A)
        .map(|r| r.at)
        .expect("the 429");
    let from = up.requests().len();
    poll_until(
        Duration::from_secs(6),
        "instance B uses the account again",
        || {
            let resp = post_body(&gws[1], &new_conversation());
            assert_eq!(resp.status, 200, "{}", resp.text());
            resp.text() == served_by(KEY_A)
        },
    );
    let back = up.requests()[from..]
        .iter()
        .find(|r| r.api_key() == KEY_A)
        .map(|r| r.at)
        .expect("the account's request");
    assert_rested(
        back - limited_at,
        Duration::from_secs(2),
        "the account on instance B",
    );
}

#[test]
fn deployments_with_different_prefixes_do_not_share() {
    // Two deployments on one Redis under different prefixes: a 429 in one benches nothing in
    // the other.
    let redis = RedisServer::start();
    let limited = Arc::new(Mutex::new(Some(KEY_A.to_string())));
    let up = limiting_upstream(&limited);
    let deployment = |prefix: &str| {
        let section = state_section(&redis).replace(
            &format!("prefix: {}", super::PREFIX),
            &format!("prefix: {prefix}"),
        );
        let mut gw = x_and_y(&Config::new(up.base_url()).section(&section));
        gw.start();
        gw
    };
    let first = deployment("team-one");
    let second = deployment("team-two");
    until_it_meets(&first, &up, KEY_A, "the first deployment");
    assert!(
        !redis.keys("team-one:cool:*").is_empty(),
        "no cooldown under the first prefix: {:?}",
        redis.keys("*")
    );
    assert!(
        redis.keys("team-two:cool:*").is_empty(),
        "a cooldown under the second prefix: {:?}",
        redis.keys("*")
    );
    until_it_meets(&second, &up, KEY_A, "the second deployment");
}

#[test]
fn one_instances_quota_reading_steers_the_others() {
    // X's answers say it has used 95 % of its 5-hour window; Y's, 30 %. Once one instance has
    // heard that from X, no instance sends X a new conversation: the others never asked X.
    let reset = (crate::support::now_unix() + 3600).to_string();
    let up = FakeUpstream::start(move |req| {
        let key = req.api_key();
        let used = if key == KEY_A { "0.95" } else { "0.30" };
        Reply::json_with(
            200,
            &[
                ("anthropic-ratelimit-unified-status", "allowed"),
                ("anthropic-ratelimit-unified-5h-status", "allowed"),
                ("anthropic-ratelimit-unified-5h-utilization", used),
                ("anthropic-ratelimit-unified-5h-reset", reset.as_str()),
            ],
            &served_by(key),
        )
    });
    let redis = RedisServer::start();
    let config = Config::new(up.base_url()).section(&state_section(&redis));
    let gws = start_instances(x_and_y(&config), 3);

    let met_x = (0..6).any(|_| {
        let resp = post_body(&gws[0], &new_conversation());
        assert_eq!(resp.status, 200, "{}", resp.text());
        resp.text() == served_by(KEY_A)
    });
    assert!(met_x, "instance A never picked X");
    let heard = up.keys().len();
    for round in 0..8 {
        for (i, gw) in gws.iter().enumerate() {
            let resp = post_body(gw, &new_conversation());
            assert_eq!(resp.text(), served_by(KEY_B), "round {round}, instance {i}");
        }
    }
    assert!(up.keys()[heard..].iter().all(|k| k == KEY_B));
    // What the instances share: X's readings, as JSON, under its quota key.
    let keys = redis.command(&["KEYS", &format!("{}:quota:*", super::PREFIX)]);
    let x = keys
        .lines()
        .find(|k| redis.command(&["GET", k]).contains("0.95"));
    assert!(x.is_some(), "no shared reading of X among {keys:?}");
}

#[test]
fn an_accounts_slots_are_leases_every_instance_counts() {
    // X may serve one request at once. While one instance streams through it, another
    // instance's request waits in its own queue, and is served once the stream ends.
    let events = crate::support::sse_events(2);
    let held = events.len();
    let (up, gate) =
        FakeUpstream::gated_first(events, |req| Reply::json(200, &served_by(req.api_key())));
    let redis = RedisServer::start();
    let config = Config::new(up.base_url()).section(&state_section(&redis));
    let mut first = Gateway::new(&config);
    first.add_api_key_with("x", KEY_A, &["--max-concurrent", "1"]);
    first.add_client_key("tests");
    let gws = start_instances(first, 2);
    let body = |stream: bool| {
        format!(
            r#"{{"model":"claude-sonnet-4-5","max_tokens":16,"stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
        )
    };
    let mut sse = crate::support::open_sse(
        gws[0].addr(),
        "/v1/messages",
        &[gws[0].auth(), ("content-type", "application/json")],
        body(true).as_bytes(),
    );
    assert!(sse.next_event().is_some(), "the stream holds X's one slot");
    let waited = std::thread::scope(|s| {
        let other = s.spawn(|| post_body(&gws[1], &body(false)));
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_millis(600) {
            assert_eq!(
                up.requests().len(),
                1,
                "the other instance waits for the slot"
            );
            std::thread::yield_now();
        }
        for _ in 1..held {
            let _ = gate.send(());
        }
        while sse.next_event().is_some() {}
        other.join().expect("the other request")
    });
    assert_eq!(waited.status, 200, "{}", waited.text());
    assert_eq!(up.requests().len(), 2);
}
