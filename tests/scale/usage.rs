//! Usage counted in Redis: what three instances served, counted exactly once, readable from
//! any instance's config with `usage --json`.

use std::collections::BTreeMap;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{start_instances, state_section};
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
    let mut last = Value::Null;
    wait_until(
        "usage --json totals equal what was served",
        Duration::from_secs(10),
        || {
            last = usage(&gws[0], &[]);
            counts(&last["total"]) == expected
        },
    );
    // Three flush intervals more: nothing is counted twice.
    let until = Instant::now() + Duration::from_secs(3);
    let mut round = 0;
    wait_until(
        "three more flush intervals",
        Duration::from_secs(10),
        || {
            let gw = &gws[round % 3];
            round += 1;
            let view = usage(gw, &[]);
            assert_eq!(
                counts(&view["total"]),
                expected,
                "usage from instance {}'s config, {round} rounds after they matched: {view}\n\
             (first match: {last})",
                (round - 1) % 3
            );
            Instant::now() >= until
        },
    );
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
