//! Usage counted in Redis: what three instances served, counted exactly once, readable from
//! any instance's config with `usage --json`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{ready, shared_gateway, start_instances, state_section, warned_about_redis};
use crate::support::accounts::{KEY_A, KEY_B};
use crate::support::redis::RedisServer;
use crate::support::{Config, FakeUpstream, Gateway, wait_until};
use crate::team::{
    ALIAS_SECTION, GPT, HAIKU, SONNET, Tokens, add_key, answer, anthropic_body, openai_body,
    post_anthropic, post_openai, row_tokens, served_tokens, usage,
};

/// Requests, errors and tokens of a `usage --json` row.
fn counts(row: &Value) -> (Option<u64>, Option<u64>, Tokens) {
    (
        row["requests"].as_u64(),
        row["errors"].as_u64(),
        row_tokens(row),
    )
}

#[test]
fn usage_totals_equal_what_the_upstream_served() {
    // The totals `usage --json` reads from Redis are what the upstream served through all
    // instances: every request once, every token once, and they stay so.
    let redis = RedisServer::start();
    let up = FakeUpstream::start(answer);
    let gw = Gateway::new(
        &Config::new(up.base_url())
            .section(ALIAS_SECTION)
            .section(&state_section(&redis)),
    );
    gw.add_api_key("alpha", KEY_A);
    gw.add_api_key("bravo", KEY_B);
    let keys: Vec<(String, String)> = ["alice", "bob"]
        .iter()
        .map(|name| add_key(&gw, name, &[]))
        .collect();
    let gws = start_instances(gw, 3);

    // 36 requests, 12 per instance at once: JSON and streams, Anthropic and OpenAI formats.
    const N: usize = 36;
    thread::scope(|s| {
        for (g, gw) in gws.iter().enumerate() {
            let keys = &keys;
            s.spawn(move || {
                for i in (g..N).step_by(3) {
                    let n = i as u64;
                    let tokens = Tokens::new(100 + n, 1 + n % 9, n % 4 * 3, n % 5 * 2);
                    let stream = i % 2 == 0;
                    let tag = format!("scale-{i}");
                    let key = &keys[i % 2].1;
                    let resp = if i % 4 == 3 {
                        post_openai(gw.addr(), key, &openai_body(GPT, tokens, stream, &tag), &[])
                    } else {
                        let model = if i % 3 == 0 { HAIKU } else { SONNET };
                        let body = anthropic_body(model, tokens, stream, &tag);
                        post_anthropic(gw.addr(), key, &body, &[])
                    };
                    assert_eq!(resp.status, 200, "{tag}: {}", resp.text());
                    let text = resp.text();
                    if stream {
                        assert!(
                            text.contains("event: message_stop") || text.contains("data: [DONE]"),
                            "{tag}: the stream ended properly: {text}"
                        );
                    }
                }
            });
        }
    });

    // What the upstream served, by the gateway key that asked (the tag names it).
    let served = up.requests();
    assert_eq!(served.len(), N, "one upstream request per client request");
    let mut total = Tokens::default();
    for req in &served {
        total.add(served_tokens(req));
    }
    let mut by_key: BTreeMap<String, (u64, Tokens)> = BTreeMap::new();
    for i in 0..N {
        let n = i as u64;
        let entry = by_key.entry(keys[i % 2].0.clone()).or_default();
        entry.0 += 1;
        entry
            .1
            .add(Tokens::new(100 + n, 1 + n % 9, n % 4 * 3, n % 5 * 2));
    }
    let all: Tokens = by_key.values().fold(Tokens::default(), |mut t, (_, k)| {
        t.add(*k);
        t
    });
    assert_eq!(all, total, "the upstream reported what the requests asked");
    let expected = (Some(N as u64), Some(0), total);

    // Each instance flushes within its interval (1 s); the totals add up from any config.
    assert_counted_once(&gws, expected);
    let view = usage(&gws[1], &["--by", "key"]);
    let rows: BTreeMap<String, (u64, Tokens)> = view["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("no rows in {view}"))
        .iter()
        .map(|r| {
            let id = r["key"].as_str().unwrap_or_default().to_string();
            (id, (r["requests"].as_u64().unwrap_or(0), row_tokens(r)))
        })
        .collect();
    assert_eq!(rows, by_key, "usage --by key: {view}");
}

/// Polls `usage --json` (from each instance's config in turn) until its totals equal
/// `expected`, then for three flush intervals more, failing if they ever move past it.
fn assert_counted_once(gws: &[Gateway], expected: (Option<u64>, Option<u64>, Tokens)) {
    let mut last = Value::Null;
    let mut round = 0;
    wait_until(
        &format!("usage --json totals equal what was served, {expected:?}"),
        Duration::from_secs(10),
        || {
            last = usage(&gws[round % gws.len()], &[]);
            round += 1;
            counts(&last["total"]) == expected
        },
    );
    let until = Instant::now() + Duration::from_secs(3);
    wait_until(
        "three more flush intervals",
        Duration::from_secs(10),
        || {
            let view = usage(&gws[round % gws.len()], &[]);
            round += 1;
            assert_eq!(
                counts(&view["total"]),
                expected,
                "usage moved after it matched: {view}\n(first match: {last})"
            );
            Instant::now() >= until
        },
    );
}

#[test]
fn usage_is_counted_once_when_redis_stalls_mid_flush() {
    // Flushes that time out while Redis stalls (and may be applied once it wakes) are counted
    // once: the totals still equal what the upstream served.
    let redis = RedisServer::start();
    let up = FakeUpstream::start(answer);
    let gw = shared_gateway(Config::new(up.base_url()), &redis);
    let (_, key) = add_key(&gw, "alice", &[]);
    let gws = start_instances(gw, 2);

    let stop = AtomicBool::new(false);
    let sent = AtomicUsize::new(0);
    let more = |n: usize, what: &str| {
        let target = sent.load(Ordering::SeqCst) + n;
        wait_until(what, Duration::from_secs(20), || {
            sent.load(Ordering::SeqCst) >= target
        });
    };
    thread::scope(|s| {
        for (g, gw) in gws.iter().enumerate() {
            let (key, stop, sent) = (&key, &stop, &sent);
            s.spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let tokens = Tokens::new(10 + i % 7, 1 + i % 3, i % 2, 0);
                    let tag = format!("stall-{g}-{i}");
                    let body = anthropic_body(SONNET, tokens, i.is_multiple_of(2), &tag);
                    let resp = post_anthropic(gw.addr(), key, &body, &[]);
                    assert_eq!(resp.status, 200, "{tag}: {}", resp.text());
                    sent.fetch_add(1, Ordering::SeqCst);
                    i += 1;
                }
            });
        }
        for stall in 0..2 {
            more(10, &format!("10 requests before stall {stall}"));
            // Blocks the server (not the data) for 2 s: every call meanwhile times out.
            assert_eq!(redis.command(&["DEBUG", "SLEEP", "2"]), "OK");
            for (i, gw) in gws.iter().enumerate() {
                wait_until(
                    &format!("instance {i} sees Redis up after stall {stall}"),
                    Duration::from_secs(5),
                    || ready(gw.addr()).1["shared_state"] == "up",
                );
            }
        }
        more(10, "10 requests after the stalls");
        stop.store(true, Ordering::SeqCst);
    });

    // The stalls were felt: calls timed out and the instances said so.
    for (i, gw) in gws.iter().enumerate() {
        let log = gw.stderr();
        assert!(
            warned_about_redis(&log),
            "instance {i} never noticed the stalls:\n{log}"
        );
    }
    let served = up.requests();
    let mut total = Tokens::default();
    for req in &served {
        total.add(served_tokens(req));
    }
    assert_counted_once(&gws, (Some(served.len() as u64), Some(0), total));
}

/// How many records the instance's local journal holds (`usage/journal-*.jsonl` lines).
fn journaled(gw: &Gateway) -> usize {
    let dir = gw.dir().join("usage");
    std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("journal-"))
                .map(|e| {
                    std::fs::read_to_string(e.path())
                        .unwrap_or_default()
                        .lines()
                        .count()
                })
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn usage_journaled_while_redis_stalls_reaches_redis_after_a_restart() {
    // Requests an instance served and journaled while Redis did not answer are counted in
    // Redis once it answers, even if the instance was restarted meanwhile (a deploy during an
    // outage): the journal has them, so the shared totals must too.
    let redis = RedisServer::start();
    let up = FakeUpstream::start(answer);
    let gw = shared_gateway(Config::new(up.base_url()), &redis);
    let (_, key) = add_key(&gw, "alice", &[]);
    let mut gws = start_instances(gw, 2);
    let post = |gw: &Gateway, tag: &str| {
        let body = anthropic_body(SONNET, Tokens::new(20, 5, 0, 0), false, tag);
        let resp = post_anthropic(gw.addr(), &key, &body, &[]);
        assert_eq!(resp.status, 200, "{tag}: {}", resp.text());
    };
    for i in 0..3 {
        post(&gws[0], &format!("before {i}"));
    }
    let before = (Some(3), Some(0), Tokens::new(60, 15, 0, 0));
    wait_until(
        "the first requests reach Redis",
        Duration::from_secs(10),
        || counts(&usage(&gws[1], &[])["total"]) == before,
    );

    thread::scope(|s| {
        // Redis stalls 4 s (its data kept); meanwhile instance 0 serves, journals, and is
        // restarted gracefully.
        let stall = s.spawn(|| redis.command(&["DEBUG", "SLEEP", "4"]));
        wait_until("instance 0 sees Redis down", Duration::from_secs(3), || {
            post(&gws[0], "probe");
            ready(gws[0].addr()).1["shared_state"] == "down"
        });
        for i in 0..3 {
            post(&gws[0], &format!("during {i}"));
        }
        let served = up.requests().len();
        wait_until(
            "instance 0 journals what it served",
            Duration::from_secs(3),
            || journaled(&gws[0]) >= served,
        );
        gws[0].signal("TERM");
        assert!(
            gws[0].wait_exit(Duration::from_secs(3)).is_some(),
            "instance 0 did not stop on SIGTERM"
        );
        gws[0].stop();
        assert_eq!(stall.join().expect("stall thread"), "OK");
    });
    gws[0].start();

    let served = up.requests();
    let mut total = Tokens::default();
    for req in &served {
        total.add(served_tokens(req));
    }
    let expected = (Some(served.len() as u64), Some(0), total);
    let mut last = usage(&gws[1], &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while counts(&last["total"]) != expected {
        assert!(
            Instant::now() < deadline,
            "Redis totals {:?} are not what was served {expected:?}, though instance 0 had \
             journaled every request before its restart",
            counts(&last["total"]),
        );
        thread::sleep(Duration::from_millis(200));
        last = usage(&gws[1], &[]);
    }
}
