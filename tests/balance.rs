//! Balancing and failover: which account serves, failover before the first byte, cooldowns that
//! end by themselves, sticky sessions, priority tiers and ejection.
//!
//! The fake upstream tells accounts apart by the `x-api-key` the gateway sends, so a test can
//! make one account fail while another succeeds, and read from the recorded requests which
//! accounts were tried, in which order, and when.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::accounts::{
    KEY_A, KEY_B, KEY_C, KEY_D, account, admin_status, assert_rested, assert_served_by, ceil_secs,
    each_case, error_body, first_account_apart, first_request_limited, limiting_upstream,
    poll_until, post, post_body, rate_limited, rests_key_a_once, retry_after, served_by, started,
    started_ab, unix_now,
};
use crate::support::{
    Config, FakeUpstream, Reply, assert_error, assert_exit, call, in_parallel, open_sse, sse_events,
};

#[test]
fn failures_before_the_first_byte_move_the_request_to_the_next_account() {
    let triggers: [(u16, &str, &str); 7] = [
        (
            429,
            "rate_limit_error",
            "Number of request tokens has exceeded your rate limit",
        ),
        (529, "overloaded_error", "Overloaded"),
        (500, "api_error", "Internal server error"),
        (502, "api_error", "Bad gateway"),
        (503, "api_error", "Service unavailable"),
        (504, "timeout_error", "Gateway timeout"),
        (401, "authentication_error", "invalid x-api-key"),
    ];
    each_case(&triggers, |&(status, kind, message)| {
        // The account used first is A: it fails with `status`; every other account succeeds.
        let up = first_account_apart(move |key, first| {
            if first {
                Reply::json(status, &error_body(kind, message, key))
            } else {
                Reply::json(200, &served_by(key))
            }
        });
        let (gw, _) = started_ab(&Config::new(up.base_url()));

        let resp = post(&gw);
        let keys = up.keys();
        assert_eq!(
            keys.len(),
            2,
            "{status}: upstream saw {keys:?}, want A then B"
        );
        let (a, b) = (&keys[0], &keys[1]);
        assert_ne!(a, b, "{status}: the retry must use another account");
        assert_eq!(resp.status, 200, "{status}: client got {}", resp.text());
        assert_eq!(
            resp.text(),
            served_by(b),
            "{status}: client gets B's answer"
        );

        // A 429 or an API key's 401 rests the account at once: new conversations skip it
        // (were A available, least_busy would rotate to it within two requests).
        if matches!(status, 429 | 401) {
            for i in 0..3 {
                assert_served_by(&gw, b, &format!("request {i} after A's rest began"));
            }
            assert!(
                up.keys()[2..].iter().all(|k| k == b),
                "{status}: A is resting: {:?}",
                up.keys()
            );
        }
    });
}

#[test]
fn when_every_attempt_fails_the_client_gets_the_last_answer() {
    // (max_attempts configured or not, how many upstream attempts that allows)
    let cases: [(Option<u32>, usize); 2] = [(None, 3), (Some(2), 2)];
    each_case(&cases, |&(max_attempts, expected)| {
        let up = FakeUpstream::start(|req| {
            Reply::json(
                500,
                &error_body("api_error", "Internal server error", req.api_key()),
            )
        });
        let mut config = Config::new(up.base_url());
        if let Some(n) = max_attempts {
            config = config.section(&format!("balance:\n  max_attempts: {n}\n"));
        }
        let accounts: [(&str, &str, &[&str]); 4] = [
            ("a", KEY_A, &[]),
            ("b", KEY_B, &[]),
            ("c", KEY_C, &[]),
            ("d", KEY_D, &[]),
        ];
        let (gw, _) = started(&config, &accounts);

        let resp = post(&gw);
        let keys = up.keys();
        assert_eq!(keys.len(), expected, "attempts: {keys:?}");
        let mut distinct = keys.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(
            distinct.len(),
            expected,
            "each attempt on another account: {keys:?}"
        );
        assert_eq!(resp.status, 500);
        let last = keys.last().expect("an attempt");
        assert_eq!(
            resp.text(),
            error_body("api_error", "Internal server error", last),
            "the client gets the last account's answer"
        );
    });
}

#[test]
fn client_errors_are_never_retried() {
    let cases: [(u16, &str, &str); 2] = [
        (400, "invalid_request_error", "max_tokens: Field required"),
        (
            413,
            "request_too_large",
            "Request exceeds the maximum allowed number of bytes",
        ),
    ];
    each_case(&cases, |&(status, kind, message)| {
        let up = FakeUpstream::start(move |req| {
            Reply::json(status, &error_body(kind, message, req.api_key()))
        });
        let (gw, _) = started_ab(&Config::new(up.base_url()));

        let resp = post(&gw);
        let keys = up.keys();
        assert_eq!(
            keys.len(),
            1,
            "{status} must not be retried: upstream saw {keys:?}"
        );
        assert_eq!(resp.status, status, "{}", resp.text());
        assert_eq!(resp.text(), error_body(kind, message, &keys[0]));
    });
}

#[test]
fn no_retry_after_the_first_byte_and_the_break_counts_as_a_failure() {
    let events = sse_events(2)[..4].to_vec();
    let scripted = events.clone();
    let broke = AtomicBool::new(false);
    let up = FakeUpstream::start(move |req| {
        if broke.swap(true, Ordering::SeqCst) {
            Reply::json(200, &served_by(req.api_key()))
        } else {
            Reply::BreakMidStream {
                events: scripted.clone(),
            }
        }
    });
    let (gw, ids) = started_ab(&Config::new(up.base_url()).admin_listen("127.0.0.1:0"));

    let mut sse = open_sse(
        gw.addr(),
        "/v1/messages",
        &[gw.auth(), ("connection", "close")],
        br#"{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"count"}]}"#,
    );
    sse.assert_events_then_error(&events);

    let keys = up.keys();
    assert_eq!(keys.len(), 1, "no retry after the first byte: {keys:?}");
    let (broken, other) = if keys[0] == KEY_A {
        (&ids[0], &ids[1])
    } else {
        (&ids[1], &ids[0])
    };
    // The failure is counted as the relay ends, just after the client's last byte.
    poll_until(
        Duration::from_secs(2),
        "status counts the broken stream",
        || {
            account(&admin_status(&gw), broken)["failures"]
                .as_u64()
                .is_some_and(|n| n >= 1)
        },
    );
    let view = admin_status(&gw);
    assert_eq!(account(&view, other)["failures"], 0, "{view}");
}

#[test]
fn retry_after_rests_an_account_until_it_ends_then_it_serves_again() {
    // Two accounts: the first one used answers 429 `retry-after: 2` once.
    let up = first_request_limited(&[("retry-after", "2")]);
    let (gw, _) = started_ab(&Config::new(up.base_url()));

    let resp = post(&gw);
    let keys = up.keys();
    assert_eq!(keys.len(), 2, "429 moves the request: {keys:?}");
    let (a, b) = (keys[0].clone(), keys[1].clone());
    assert_eq!(resp.text(), served_by(&b));
    let limited_at = up.requests()[0].at;
    for i in 0..4 {
        assert_served_by(&gw, &b, &format!("request {i} while A rests"));
    }
    assert!(
        limited_at.elapsed() < Duration::from_secs(2),
        "the test was too slow to observe the rest"
    );
    assert!(up.keys()[2..].iter().all(|k| *k == b), "{:?}", up.keys());

    // A returns by itself once its 2 s (+ at most 250 ms) are over.
    poll_until(Duration::from_secs(5), "A serves again", || {
        post(&gw).text() == served_by(&a)
    });
    let back = up
        .requests()
        .into_iter()
        .skip(1)
        .find(|r| r.api_key() == a)
        .expect("A was used again");
    assert_rested(back.at - limited_at, Duration::from_secs(2), "A");
}

#[test]
fn a_single_resting_account_gives_529_then_serves_again() {
    let up = first_request_limited(&[("retry-after", "2")]);
    let (gw, _) = started(&Config::new(up.base_url()), &[("only", KEY_A, &[])]);

    let sent = Instant::now();
    let first = post(&gw);
    assert_eq!(
        first.status, 429,
        "with no other account the client gets the 429"
    );
    let resting = post(&gw);
    let elapsed = sent.elapsed().as_secs_f64();
    assert_error(&resting, 529, Some("overloaded_error"));
    let secs = retry_after(&resting);
    // 2 s plus at most 250 ms of jitter, minus what has passed, rounded up.
    let lowest = ceil_secs(2.0 - elapsed);
    assert!(
        (lowest..=3).contains(&secs),
        "retry-after {secs}, expected {lowest}..=3 ({elapsed:.3}s after the 429)"
    );
    assert_eq!(up.requests().len(), 1, "a resting account is not asked");

    poll_until(Duration::from_secs(5), "the account serves again", || {
        post(&gw).status == 200
    });
    let reqs = up.requests();
    assert_eq!(reqs.len(), 2, "one 429, then one success");
    assert_rested(
        reqs[1].at - reqs[0].at,
        Duration::from_secs(2),
        "the account",
    );
}

#[derive(Debug)]
enum Unified {
    /// `rejected` with a reset 3 s ahead: rests until the reset.
    Rejected,
    /// `allowed_warning` with a reset a minute ahead: not a limit, only the bare backoff.
    AllowedWarning,
    /// `rejected` with a reset a minute ahead and `retry-after: 1`: retry-after wins.
    RejectedWithRetryAfter,
}

#[test]
fn unified_rate_limit_reset_is_honoured_only_when_rejected() {
    let cases = [
        Unified::Rejected,
        Unified::AllowedWarning,
        Unified::RejectedWithRetryAfter,
    ];
    each_case(&cases, |case| {
        // The monotonic clock first: the reset instant derived below then errs early, never late.
        let mono = Instant::now();
        let wall = unix_now();
        // Whole seconds, as Anthropic sends them. A reset 3 s ahead (2–3 s left) cannot be
        // mistaken for the 1 s backoff of a 429 without reset information.
        let ahead = match case {
            Unified::Rejected => 3,
            _ => 60,
        };
        let reset = wall.floor() as u64 + ahead;
        let reset_at = mono + Duration::from_secs_f64(reset as f64 - wall);
        let status = match case {
            Unified::AllowedWarning => "allowed_warning",
            _ => "rejected",
        };
        let reset_header = reset.to_string();
        let mut headers = vec![
            ("anthropic-ratelimit-unified-status", status),
            ("anthropic-ratelimit-unified-reset", reset_header.as_str()),
        ];
        if let Unified::RejectedWithRetryAfter = case {
            headers.push(("retry-after", "1"));
        }
        let up = first_request_limited(&headers);
        let (gw, _) = started(&Config::new(up.base_url()), &[("only", KEY_A, &[])]);

        assert_eq!(post(&gw).status, 429);
        let limited_at = up.requests()[0].at;
        poll_until(Duration::from_secs(6), "the account serves again", || {
            post(&gw).status == 200
        });
        let back = up.requests()[1].at;
        match case {
            Unified::Rejected => {
                assert_rested(back - limited_at, reset_at - limited_at, "until the reset")
            }
            // The minute-long reset is not used: a 1 s rest, from `retry-after: 1` or, with
            // no reset honoured, from the first step of the 429 backoff.
            _ => assert_rested(back - limited_at, Duration::from_secs(1), "a 1 s rest"),
        }
    });
}

#[test]
fn every_account_resting_gives_529_with_the_soonest_return() {
    // The first account used is limited for 3 s, the other for 5 s.
    let up = first_account_apart(|key, first| {
        let wait = if first { "3" } else { "5" };
        rate_limited(wait, key)
    });
    let (gw, _) = started_ab(&Config::new(up.base_url()));

    let sent = Instant::now();
    let both = post(&gw);
    let keys = up.keys();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_eq!(
        both.status,
        429,
        "the last account's answer: {}",
        both.text()
    );
    assert_eq!(
        both.text(),
        error_body("rate_limit_error", "rate limited", &keys[1])
    );

    let resting = post(&gw);
    let elapsed = sent.elapsed().as_secs_f64();
    let v = assert_error(&resting, 529, Some("overloaded_error"));
    let secs = retry_after(&resting);
    let lowest = ceil_secs(3.0 - elapsed);
    assert!(
        (lowest..=4).contains(&secs),
        "retry-after {secs}: the first account returns in 3 s (+≤250 ms) from the 429, \
         {elapsed:.3}s ago, so expected {lowest}..=4; {v}"
    );
    assert_eq!(up.requests().len(), 2, "resting accounts are not asked");
}

/// A Claude Code style body for one turn of a conversation.
fn turn_body(user_id: &str, turn: usize) -> String {
    serde_json::json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 16,
        "metadata": {"user_id": user_id},
        "messages": [{"role": "user", "content": format!("turn {turn}")}],
    })
    .to_string()
}

#[test]
fn sticky_sessions_stay_on_one_account_and_move_when_it_is_limited() {
    each_case(&["least_busy", "round_robin"], |strategy| {
        let limited: Arc<Mutex<Option<String>>> = Arc::default();
        let up = limiting_upstream(&limited);
        let config = Config::new(up.base_url()).section(&format!(
            "balance:\n  strategy: {strategy}\nsticky:\n  enabled: true\n  ttl: 1h\n"
        ));
        let (gw, _) = started(
            &config,
            &[("a", KEY_A, &[]), ("b", KEY_B, &[]), ("c", KEY_C, &[])],
        );
        let user = |session: &str| {
            format!(
                "user_{}_account_7c1b6a53-2f0e-4b8e-9a43-1d2c3b4a5f60_session_{session}",
                "5e".repeat(32)
            )
        };
        let used_since = |n: usize| up.keys()[n..].to_vec();

        // Without a shared session, the strategy spreads the work.
        for i in 0..3 {
            let body = turn_body(&user(&format!("0000000{i}-aaaa-4bbb-8ccc-dddddddddddd")), i);
            assert_eq!(post_body(&gw, &body).status, 200);
        }
        let mut spread = used_since(0);
        spread.sort();
        spread.dedup();
        assert!(
            spread.len() >= 2,
            "distinct sessions all went to {spread:?}"
        );

        // One session, in either user_id form, stays on one account whatever the turn says.
        let session = user("9b2f4e1a-6c3d-4e5f-8a7b-0c1d2e3f4a5b");
        let json_session = r#"{"device_id":"d-1","account_uuid":"","session_id":"1f2e3d4c-5b6a-4789-8a9b-0c1d2e3f4a5b"}"#;
        for user_id in [session.as_str(), json_session] {
            let before = up.keys().len();
            for turn in 0..6 {
                let resp = post_body(&gw, &turn_body(user_id, turn));
                assert_eq!(resp.status, 200, "{}", resp.text());
            }
            let used = used_since(before);
            assert!(
                used.iter().all(|k| *k == used[0]),
                "session {user_id} hopped between accounts: {used:?}"
            );
        }

        // Its account starts answering 429: the conversation moves once, and stays moved.
        let before = up.keys().len();
        assert_eq!(post_body(&gw, &turn_body(&session, 6)).status, 200);
        let pinned = up.keys()[before].clone();
        *limited.lock().expect("limited lock") = Some(pinned.clone());
        let before = up.keys().len();
        let moved = post_body(&gw, &turn_body(&session, 7));
        let used = used_since(before);
        assert_eq!(used.len(), 2, "pinned account, then another: {used:?}");
        assert_eq!(used[0], pinned, "the pin held until the 429");
        assert_ne!(used[1], pinned);
        assert_eq!(moved.status, 200, "{}", moved.text());
        assert_eq!(moved.text(), served_by(&used[1]));
        let before = up.keys().len();
        for turn in 8..14 {
            let resp = post_body(&gw, &turn_body(&session, turn));
            assert_eq!(
                resp.text(),
                served_by(&used[1]),
                "turn {turn} left the new pin"
            );
        }
        assert!(
            used_since(before).iter().all(|k| *k == used[1]),
            "{:?}",
            used_since(before)
        );
    });
}

#[test]
fn priority_tiers_use_the_backup_only_while_the_main_account_rests() {
    let (up, limit_main_once) = rests_key_a_once(false);
    // The backup is added first, so only its priority keeps it back.
    let (gw, ids) = started(
        &Config::new(up.base_url()),
        &[
            ("backup", KEY_B, &["--priority", "5"]),
            ("main", KEY_A, &["--priority", "0"]),
        ],
    );
    let main = ids[1].clone();

    for i in 0..4 {
        assert_served_by(&gw, KEY_A, &format!("request {i} with both tiers up"));
    }
    assert!(up.keys().iter().all(|k| k == KEY_A), "{:?}", up.keys());

    limit_main_once.store(true, Ordering::SeqCst);
    let before = up.keys().len();
    assert_served_by(&gw, KEY_B, "main limited: backup serves");
    assert_eq!(up.keys()[before..], [KEY_A, KEY_B]);
    let limited_at = up.requests()[before].at;
    for i in 0..3 {
        assert_served_by(&gw, KEY_B, &format!("request {i} while main rests"));
    }
    assert!(
        limited_at.elapsed() < Duration::from_secs(2),
        "too slow to observe"
    );

    poll_until(Duration::from_secs(5), "main serves again", || {
        post(&gw).text() == served_by(KEY_A)
    });
    let back = up
        .requests()
        .into_iter()
        .skip(before + 1)
        .find(|r| r.api_key() == KEY_A)
        .expect("main used again");
    assert_rested(back.at - limited_at, Duration::from_secs(2), "main");

    // Demoting main below the backup takes effect in the running server.
    let out = gw.run_cli(&["set-account", "--account-id", &main, "--priority", "10"]);
    assert_exit(&out, 0, "set-account --priority");
    poll_until(
        Duration::from_secs(2),
        "the running server applies the new priority",
        || post(&gw).text() == served_by(KEY_B),
    );
    for i in 0..3 {
        assert_served_by(&gw, KEY_B, &format!("request {i} after the demotion"));
    }
}

#[test]
fn least_busy_spreads_concurrent_requests_evenly() {
    const REQUESTS: usize = 100;
    // Every request is held upstream until all of them are in flight together.
    let (up, meeting) = FakeUpstream::meeting(REQUESTS, Duration::from_secs(4), |req| {
        Reply::json(200, &served_by(req.api_key()))
    });
    let config = Config::new(up.base_url())
        .workers(256)
        .read_timeout("10s")
        .section("balance:\n  strategy: least_busy\n");
    let (gw, _) = started(
        &config,
        &[
            ("a", KEY_A, &[]),
            ("b", KEY_B, &[]),
            ("c", KEY_C, &[]),
            ("d", KEY_D, &[]),
        ],
    );

    let addr = gw.addr();
    let auth = gw.client_key().to_string();
    let statuses = in_parallel(REQUESTS, |i| {
        // Distinct conversations, so no sticky pin groups them.
        let body = format!(
            r#"{{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[{{"role":"user","content":"request {i}"}}]}}"#
        );
        call(
            addr,
            "POST",
            "/v1/messages",
            &[("x-api-key", &auth)],
            body.as_bytes(),
        )
        .status
    });

    assert!(statuses.iter().all(|s| *s == 200), "statuses: {statuses:?}");
    assert_eq!(
        meeting.arrived(),
        REQUESTS,
        "not all requests reached the upstream"
    );
    let keys = up.keys();
    assert_eq!(keys.len(), REQUESTS);
    let counts: Vec<usize> = [KEY_A, KEY_B, KEY_C, KEY_D]
        .iter()
        .map(|key| keys.iter().filter(|k| k == key).count())
        .collect();
    // Even is 25 each; within 10% is 22.5..=27.5.
    assert!(
        counts.iter().all(|n| (23..=27).contains(n)),
        "per-account counts {counts:?}, want 25 ± 2.5 each"
    );
}

#[test]
fn repeated_server_errors_eject_an_account_after_eject_after() {
    let up = FakeUpstream::start(|req| {
        let key = req.api_key();
        if key == KEY_A {
            Reply::json(500, &error_body("api_error", "Internal server error", key))
        } else {
            Reply::json(200, &served_by(key))
        }
    });
    let (gw, ids) = started_ab(&Config::new(up.base_url()).admin_listen("127.0.0.1:0"));
    let tried_a = || up.keys().iter().filter(|k| *k == KEY_A).count();

    // Each failure moves the request to B; A stays in rotation until its third in a row.
    for _ in 0..12 {
        if tried_a() == 3 {
            break;
        }
        assert_served_by(&gw, KEY_B, "A fails over to B");
    }
    assert_eq!(
        tried_a(),
        3,
        "A should be tried three times before it is ejected"
    );
    for i in 0..4 {
        assert_served_by(&gw, KEY_B, &format!("request {i} after the ejection"));
    }
    assert_eq!(
        tried_a(),
        3,
        "an ejected account is not tried: {:?}",
        up.keys()
    );
    let a = account(&admin_status(&gw), &ids[0]).clone();
    assert_eq!(a["state"], "cooling", "{a}");
    assert!(
        a["reason"].as_str().is_some_and(|r| r.contains("500")),
        "the reason should name the 500: {a}"
    );
}

/// The number in a `new_conversation` body ("conversation N"), or in `body` generally.
fn waiter(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let at = text.find("waiter ").map_or(0, |i| i + 7);
    text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect()
}

#[test]
fn with_one_slot_twenty_clients_wait_in_arrival_order_and_none_is_refused() {
    let events = sse_events(2);
    let held = events.len();
    let (up, gate) =
        FakeUpstream::gated_first(events, |req| Reply::json(200, &served_by(req.api_key())));
    let (gw, ids) = started(
        &Config::new(up.base_url()).admin_listen("127.0.0.1:0"),
        &[("one", KEY_A, &["--max-concurrent", "1"])],
    );
    let queued = |gw: &crate::support::Gateway| {
        account(&admin_status(gw), &ids[0])["queued"]
            .as_u64()
            .expect("queued")
    };
    let body = |n: usize| {
        format!(
            r#"{{"model":"claude-sonnet-4-5","max_tokens":16,"stream":{},"messages":[{{"role":"user","content":"waiter {n}"}}]}}"#,
            n == 0
        )
    };
    // The one slot is held by a stream.
    let mut holder = open_sse(
        gw.addr(),
        "/v1/messages",
        &[gw.auth(), ("content-type", "application/json")],
        body(0).as_bytes(),
    );
    assert!(holder.next_event().is_some(), "the held stream starts");
    // A client that leaves while waiting frees its place.
    let mut leaver = crate::support::Conn::open(gw.addr());
    leaver.send(&crate::support::request_bytes(
        "POST",
        "/v1/messages",
        &[gw.auth(), ("content-type", "application/json")],
        body(99).as_bytes(),
    ));
    poll_until(Duration::from_secs(5), "the leaver waits", || {
        queued(&gw) == 1
    });
    drop(leaver);
    poll_until(Duration::from_secs(5), "its place is freed", || {
        queued(&gw) == 0
    });
    // Nineteen more arrive one after another and wait.
    std::thread::scope(|s| {
        let mut answers = Vec::new();
        for n in 1..20 {
            let gw = &gw;
            answers.push(s.spawn(move || post_body(gw, &body(n))));
            poll_until(Duration::from_secs(5), "the next one waits", || {
                queued(gw) == n as u64
            });
        }
        for _ in 1..held {
            let _ = gate.send(());
        }
        while holder.next_event().is_some() {}
        for (n, answer) in answers.into_iter().enumerate() {
            let resp = answer.join().expect("client thread");
            assert_eq!(resp.status, 200, "client {}: {}", n + 1, resp.text());
        }
    });
    let order: Vec<String> = up.requests().iter().map(|r| waiter(&r.body)).collect();
    let expected: Vec<String> = (0..20).map(|n| n.to_string()).collect();
    assert_eq!(order, expected, "served in arrival order, the leaver never");
    assert_eq!(queued(&gw), 0);
}
