//! A gateway key's limits are one budget across instances: its requests per minute, its
//! requests in flight and its token budgets are counted in Redis, not per instance.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use super::{SHARED, shared_gateway, start_instances};
use crate::support::redis::RedisServer;
use crate::support::{Config, FakeUpstream, assert_error, in_parallel, wait_until};
use crate::team::{
    SONNET, Tokens, add_key, answer, anthropic_body, post_anthropic, retry_after, usage,
};

const SMALL: Tokens = Tokens::new(10, 2, 0, 0);

/// The team upstream, except that a request tagged `hold-me` says it arrived and waits there
/// until the test releases it.
fn holding_upstream() -> (FakeUpstream, mpsc::Receiver<()>, mpsc::Sender<()>) {
    let (arrived_tx, arrived) = mpsc::channel::<()>();
    let (release, release_rx) = mpsc::channel::<()>();
    let up = FakeUpstream::start(move |req| {
        if String::from_utf8_lossy(&req.body).contains("hold-me") {
            let _ = arrived_tx.send(());
            let _ = release_rx.recv_timeout(Duration::from_secs(10));
        }
        answer(req)
    });
    (up, arrived, release)
}

#[test]
fn a_keys_rpm_and_concurrency_hold_across_instances() {
    // Three requests a minute means three in all, whichever instances they reach; one at a
    // time means one in flight in all.
    let redis = RedisServer::start();
    let (up, arrived, release) = holding_upstream();
    let gw = shared_gateway(Config::new(up.base_url()), &redis);
    let (_, rpm_key) = add_key(&gw, "three-a-minute", &["--rpm", "3"]);
    let (_, one_key) = add_key(&gw, "one-at-a-time", &["--max-concurrent", "1"]);
    let gws = start_instances(gw, 3);

    for (i, gw) in gws.iter().enumerate() {
        let body = anthropic_body(SONNET, SMALL, false, &format!("rpm {i}"));
        let resp = post_anthropic(gw.addr(), &rpm_key, &body, &[]);
        assert_eq!(resp.status, 200, "request {i} of 3: {}", resp.text());
    }
    for (i, gw) in gws.iter().enumerate() {
        let body = anthropic_body(SONNET, SMALL, false, &format!("rpm past {i}"));
        let refused = post_anthropic(gw.addr(), &rpm_key, &body, &[]);
        assert_error(&refused, 429, Some("rate_limit_error"));
        assert!(
            refused.header("retry-after").is_some(),
            "instance {i}: no retry-after on the refusal"
        );
    }

    // One request of the one-at-a-time key held in flight on instance 0: the others refuse it.
    thread::scope(|s| {
        let held = s.spawn(|| {
            let body = anthropic_body(SONNET, SMALL, false, "hold-me");
            post_anthropic(gws[0].addr(), &one_key, &body, &[])
        });
        arrived
            .recv_timeout(Duration::from_secs(5))
            .expect("the held request reaches the upstream");
        for (i, gw) in gws.iter().enumerate().skip(1) {
            let body = anthropic_body(SONNET, SMALL, false, &format!("second {i}"));
            let refused = post_anthropic(gw.addr(), &one_key, &body, &[]);
            assert_eq!(
                refused.status,
                429,
                "instance {i}: a second request in flight: {}",
                refused.text()
            );
        }
        release.send(()).expect("release the held request");
        let held = held.join().expect("held request thread");
        assert_eq!(held.status, 200, "the held request: {}", held.text());
    });
    // Its slot is given back: the key is served again, on any instance. (Given back just
    // after the answer is written, so the first try may come too early: see the next test.)
    for (i, gw) in gws.iter().enumerate() {
        wait_until(
            &format!("instance {i} serves the key again"),
            SHARED,
            || {
                let body = anthropic_body(SONNET, SMALL, false, &format!("after {i}"));
                post_anthropic(gw.addr(), &one_key, &body, &[]).status == 200
            },
        );
    }
}

#[test]
fn a_client_that_waits_for_each_answer_is_never_refused_by_max_concurrent_one() {
    // One request at a time, each sent once the last answer is in: never two in flight, so
    // never refused, whichever instances they reach.
    let redis = RedisServer::start();
    let up = FakeUpstream::start(answer);
    let gw = shared_gateway(Config::new(up.base_url()), &redis);
    let (_, one_key) = add_key(&gw, "one-at-a-time", &["--max-concurrent", "1"]);
    let gws = start_instances(gw, 3);
    // The race this guards against is narrow: enough turns to meet it most runs.
    const TURNS: usize = 150;
    let mut refused = Vec::new();
    for i in 0..TURNS {
        let body = anthropic_body(SONNET, SMALL, false, &format!("in turn {i}"));
        let resp = post_anthropic(gws[i % 3].addr(), &one_key, &body, &[]);
        if resp.status != 200 {
            refused.push(format!("request {i}: {} {}", resp.status, resp.text()));
        }
    }
    assert!(
        refused.is_empty(),
        "{} of {TURNS} sequential requests refused:\n{}",
        refused.len(),
        refused.join("\n")
    );
}

#[test]
fn a_keys_daily_token_budget_is_spent_across_instances() {
    // Tokens a key spent through one instance count against its budget on every instance.
    let redis = RedisServer::start();
    let up = FakeUpstream::start(answer);
    let gw = shared_gateway(Config::new(up.base_url()), &redis);
    let (daily_id, daily) = add_key(&gw, "daily", &["--daily-tokens", "120"]);
    let gws = start_instances(gw, 3);

    // 50 + 50 + 21 tokens through instance A: over the 120 by the last answer's size.
    let steps = [
        Tokens::new(30, 10, 5, 5),
        Tokens::new(20, 15, 10, 5),
        Tokens::new(10, 5, 3, 3),
    ];
    for (i, tokens) in steps.into_iter().enumerate() {
        let body = anthropic_body(SONNET, tokens, i == 1, &format!("budget {i}"));
        let resp = post_anthropic(gws[0].addr(), &daily, &body, &[]);
        assert_eq!(resp.status, 200, "budget {i}: {}", resp.text());
    }
    // Once the shared totals have them (A's flush), every instance refuses the key.
    wait_until("the key's 121 tokens reach Redis", SHARED, || {
        let view = usage(&gws[1], &["--by", "key"]);
        view["rows"].as_array().is_some_and(|rows| {
            rows.iter()
                .any(|r| r["key"] == daily_id.as_str() && r["total_tokens"] == 121)
        })
    });
    for (i, gw) in gws.iter().enumerate() {
        let body = anthropic_body(SONNET, SMALL, false, &format!("over {i}"));
        let refused = post_anthropic(gw.addr(), &daily, &body, &[]);
        assert_error(&refused, 429, Some("rate_limit_error"));
        let wait = retry_after(&refused);
        assert!(wait > 0, "instance {i}: retry-after {wait}");
    }
    assert_eq!(
        up.requests().len(),
        3,
        "only the admitted requests went upstream"
    );
}

/// Requests sent at once in the budget tests, and their body.
const PARALLEL: usize = 10;
const BUDGET_BODY: &str =
    r#"{"model":"claude-sonnet-4-5","max_tokens":40,"messages":[{"role":"user","content":"hi"}]}"#;

/// `PARALLEL` requests of `BUDGET_BODY` at once over two instances sharing Redis, each
/// answered (once all have arrived, or after 2 s) with `input` and 40 output tokens; returns
/// how many were admitted, checking every other was a 429 and only the admitted went upstream.
fn admitted_at_once(flags: &[&str], input: u64) -> usize {
    let redis = RedisServer::start();
    let answer = format!(
        r#"{{"id":"m","type":"message","content":[],"usage":{{"input_tokens":{input},"output_tokens":40}}}}"#
    );
    let (up, _) = FakeUpstream::meeting(PARALLEL, Duration::from_secs(2), move |_| {
        crate::support::Reply::json(200, &answer)
    });
    let gw = shared_gateway(Config::new(up.base_url()).read_timeout("10s"), &redis);
    let (_, key) = add_key(&gw, "budgeted", flags);
    let gws = start_instances(gw, 2);
    let statuses = in_parallel(PARALLEL, |i| {
        post_anthropic(gws[i % 2].addr(), &key, BUDGET_BODY, &[]).status
    });
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(
        admitted + statuses.iter().filter(|s| **s == 429).count(),
        PARALLEL,
        "{statuses:?}"
    );
    assert_eq!(up.requests().len(), admitted, "{statuses:?}");
    admitted
}

#[test]
fn a_keys_budget_holds_under_parallel_requests_across_instances() {
    // Ten requests at once, five to each of two instances, against one 100-token budget:
    // each reserves what it may cost (max_tokens 40 plus its body at four bytes a token) in
    // Redis while in flight, so only as many are admitted in all as the budget holds.
    // 62 tokens each may cost: 0 and 62 reserved are under 100, 124 is not, on either host.
    assert_eq!(admitted_at_once(&["--daily-tokens", "100"], 10), 2);
}

#[test]
fn a_keys_usd_budget_holds_under_parallel_requests_across_instances() {
    // As above, in dollars: each request reserves its price from the table (Sonnet: its body
    // at four bytes a token at $3 per million, max_tokens 40 at $15), and the budget is two
    // such reservations. Each costs more than it reserved (100 input tokens), so once two
    // are settled the budget is spent whenever a late one arrives.
    let reserved = (BUDGET_BODY.len() as u64 / 4) * 3_000 + 40 * 15_000;
    let budget = format!("0.{:09}", 2 * reserved);
    assert_eq!(
        admitted_at_once(&["--daily-usd", &budget], 100),
        2,
        "{budget} holds two reservations"
    );
}

#[test]
fn a_keys_queue_is_bounded_with_shared_state_too() {
    // One slot, a queue of one: with the slot held, of three more requests one waits and two
    // are refused at once. (With Redis the waiting request polls for a slot other instances
    // may free; the queue still bounds how many wait, on each instance.)
    let redis = RedisServer::start();
    let (up, arrived, release) = holding_upstream();
    let gw = shared_gateway(Config::new(up.base_url()), &redis);
    let (_, key) = add_key(&gw, "queued", &["--max-concurrent", "1", "--queue", "1"]);
    let gws = start_instances(gw, 1);
    let addr = gws[0].addr();
    thread::scope(|s| {
        let held = s.spawn(|| {
            post_anthropic(
                addr,
                &key,
                &anthropic_body(SONNET, SMALL, false, "hold-me"),
                &[],
            )
        });
        arrived
            .recv_timeout(Duration::from_secs(10))
            .expect("the slot is held");
        let (done_tx, done) = mpsc::channel::<u16>();
        let waiting: Vec<_> = (0..3)
            .map(|i| {
                let (done_tx, key) = (done_tx.clone(), &key);
                s.spawn(move || {
                    let body = anthropic_body(SONNET, SMALL, false, &format!("q{i}"));
                    let status = post_anthropic(addr, key, &body, &[]).status;
                    let _ = done_tx.send(status);
                    status
                })
            })
            .collect();
        // While the slot is held, two answers come back at once: the queue holds one.
        let until = std::time::Instant::now() + Duration::from_secs(2);
        let early: Vec<u16> = (0..2)
            .filter_map(|_| {
                let left = until.saturating_duration_since(std::time::Instant::now());
                done.recv_timeout(left).ok()
            })
            .collect();
        let _ = release.send(());
        assert_eq!(held.join().expect("held").status, 200);
        let statuses: Vec<u16> = waiting
            .into_iter()
            .map(|w| w.join().expect("request"))
            .collect();
        assert_eq!(
            early,
            [429, 429],
            "two refused while the slot was held: {statuses:?}"
        );
        assert_eq!(
            statuses.iter().filter(|s| **s == 200).count(),
            1,
            "{statuses:?}"
        );
    });
}
