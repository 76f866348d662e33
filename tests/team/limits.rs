//! Per-key limits as a client meets them: the model allow-list (403 in the caller's format),
//! requests per minute and requests at once (429 with `retry-after`), and daily and monthly
//! token budgets that hold across a restart. A refused request never reaches the upstream.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::{
    ALIAS_SECTION, GPT, HAIKU, SONNET, Tokens, add_key, answer, anthropic_body,
    assert_openai_error, cli_ok, openai_body, post_anthropic, post_openai, retry_after,
    secs_to_midnight, secs_to_next_month, stream_events,
};
use crate::support::accounts::poll_until;
use crate::support::{
    ACCOUNT_KEY, Config, FakeUpstream, Gateway, Response, STEP_TIMEOUT, assert_error, now_unix,
    open_sse,
};

/// A gateway with one account and no keys yet; keys are added by each test.
fn gateway(up: &FakeUpstream) -> Gateway {
    let gw = Gateway::new(&Config::new(up.base_url()).section(ALIAS_SECTION));
    gw.add_api_key("primary", ACCOUNT_KEY);
    gw
}

const SMALL: Tokens = Tokens::new(3, 2, 0, 0);

/// A small Anthropic request with `key`.
fn ask(gw: &Gateway, key: &str, model: &str, stream: bool, tag: &str) -> Response {
    post_anthropic(
        gw.addr(),
        key,
        &anthropic_body(model, SMALL, stream, tag),
        &[],
    )
}

/// A small OpenAI request with `key`.
fn ask_openai(gw: &Gateway, key: &str, model: &str, tag: &str) -> Response {
    post_openai(gw.addr(), key, &openai_body(model, SMALL, false, tag), &[])
}

#[test]
fn the_model_allow_list_refuses_other_models_in_the_callers_format() {
    let up = FakeUpstream::start(answer);
    let mut gw = gateway(&up);
    let (_, key) = add_key(&gw, "haiku-only", &["--models", "claude-haiku-4-5,gpt-4o"]);
    gw.start();

    let ok = ask(&gw, &key, HAIKU, false, "a");
    assert_eq!(ok.status, 200, "{}", ok.text());
    let ok = ask_openai(&gw, &key, GPT, "b");
    assert_eq!(ok.status, 200, "an allowed OpenAI model: {}", ok.text());
    let served = up.requests().len();

    let refused = ask(&gw, &key, SONNET, false, "c");
    let body = assert_error(&refused, 403, Some("permission_error"));
    let message = body["error"]["message"].as_str().unwrap_or_default();
    for allowed in [HAIKU, GPT] {
        assert!(
            message.contains(allowed),
            "the 403 names the allowed models: {message}"
        );
    }
    let refused = ask_openai(&gw, &key, "gpt-4o-mini", "d");
    let error = assert_openai_error(&refused, 403);
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains(HAIKU), "{message}");
    // A stream is refused the same way, before any event.
    let refused = ask(&gw, &key, SONNET, true, "e");
    assert_error(&refused, 403, Some("permission_error"));

    assert_eq!(
        up.requests().len(),
        served,
        "refused requests never reach the upstream"
    );
}

#[test]
fn rpm_refuses_the_request_past_the_limit_within_the_minute() {
    let up = FakeUpstream::start(answer);
    let mut gw = gateway(&up);
    let (_, key) = add_key(&gw, "three-a-minute", &["--rpm", "3"]);
    let (_, free) = add_key(&gw, "unlimited", &[]);
    gw.start();

    let started = Instant::now();
    for i in 0..3 {
        let resp = post_anthropic(
            gw.addr(),
            &key,
            &anthropic_body(SONNET, SMALL, i == 1, &format!("rpm {i}")),
            &[],
        );
        assert_eq!(resp.status, 200, "request {i} of 3: {}", resp.text());
    }
    let refused = ask(&gw, &key, SONNET, false, "4th");
    let elapsed = started.elapsed().as_secs();
    assert_error(&refused, 429, Some("rate_limit_error"));
    let wait = retry_after(&refused);
    assert!(
        (1..=60).contains(&wait),
        "retry-after {wait} is not within the minute"
    );
    assert!(
        wait + elapsed + 1 >= 60,
        "retry-after {wait}: the oldest request ({elapsed} s ago) leaves the window only then"
    );
    let refused = ask_openai(&gw, &key, GPT, "5th");
    assert_openai_error(&refused, 429);
    let wait = retry_after(&refused);
    assert!(
        (1..=60).contains(&wait),
        "OpenAI caller: retry-after {wait}"
    );

    // The limit is the key's own: another key is served.
    let other = ask(&gw, &free, SONNET, false, "free");
    assert_eq!(other.status, 200);
    assert_eq!(
        up.requests().len(),
        4,
        "only the admitted requests went upstream"
    );
}

#[test]
fn max_concurrent_refuses_a_second_request_while_the_first_is_held() {
    let (arrived_tx, arrived) = mpsc::channel::<()>();
    let (release, release_rx) = mpsc::channel::<()>();
    let mut first = true;
    // The first request is held at the upstream, before any answer, until the test releases
    // it; blocking the handler is fine here, as nothing else may reach the upstream meanwhile.
    let up = FakeUpstream::start(move |req| {
        if std::mem::take(&mut first) {
            let _ = arrived_tx.send(());
            let _ = release_rx.recv_timeout(Duration::from_secs(10));
        }
        answer(req)
    });
    let mut gw = gateway(&up);
    let (_, key) = add_key(&gw, "one-at-a-time", &["--max-concurrent", "1"]);
    gw.start();

    thread::scope(|s| {
        let held = s.spawn(|| ask(&gw, &key, SONNET, false, "held"));
        arrived
            .recv_timeout(STEP_TIMEOUT)
            .expect("the first request reaches the upstream");

        let refused = ask(&gw, &key, SONNET, false, "2nd");
        assert_error(&refused, 429, Some("rate_limit_error"));
        assert_eq!(refused.header("retry-after"), Some("1"));
        let refused = ask_openai(&gw, &key, GPT, "3rd");
        assert_openai_error(&refused, 429);
        assert_eq!(refused.header("retry-after"), Some("1"));
        assert_eq!(
            up.requests().len(),
            1,
            "refused requests stay at the gateway"
        );

        release.send(()).expect("release the held request");
        let resp = held.join().expect("held request thread");
        assert_eq!(resp.status, 200, "{}", resp.text());
    });
    // Once the first has completed, the key may send again.
    poll_until(
        Duration::from_secs(2),
        "a request after the first completed",
        || ask(&gw, &key, SONNET, false, "after").status == 200,
    );
    assert_eq!(up.requests().len(), 2);
}

/// Stricter reading of "requests at once": a stream is in flight until its last event, not
/// only until its response head.
#[test]
fn max_concurrent_counts_a_stream_until_it_ends() {
    let (up, gate) = FakeUpstream::gated_first(stream_events(SMALL), answer);
    let mut gw = gateway(&up);
    let (_, key) = add_key(&gw, "one-stream", &["--max-concurrent", "1"]);
    gw.start();

    let mut sse = open_sse(
        gw.addr(),
        "/v1/messages",
        &[
            ("x-api-key", &key),
            ("content-type", "application/json"),
            ("connection", "close"),
        ],
        anthropic_body(SONNET, SMALL, true, "stream").as_bytes(),
    );
    let first = sse
        .next_event()
        .expect("the first event of the held stream");
    assert_eq!(first.field("event"), Some("message_start"));

    let refused = ask(&gw, &key, SONNET, false, "2nd");
    let still_streaming = refused.status;
    // Let the stream finish either way, so a failure below leaves nothing hanging.
    for _ in 1..stream_events(SMALL).len() {
        let _ = gate.send(());
    }
    while sse.next_event().is_some() {}
    assert_eq!(
        still_streaming,
        429,
        "a second request while the key's one stream is still running: {}",
        refused.text()
    );
    assert_eq!(refused.header("retry-after"), Some("1"));
    poll_until(
        Duration::from_secs(2),
        "a request after the stream ended",
        || ask(&gw, &key, SONNET, false, "after").status == 200,
    );
}

/// With `--queue`, a key at its `max_concurrent` waits for its slot instead of the 429:
/// Claude Code's parallel sub-agents wait a moment rather than fail.
#[test]
fn a_key_with_a_queue_waits_for_its_slot_instead_of_a_429() {
    let (up, gate) = FakeUpstream::gated_first(stream_events(SMALL), answer);
    let mut gw = gateway(&up);
    let (_, key) = add_key(&gw, "queued", &["--max-concurrent", "1", "--queue", "4"]);
    gw.start();
    let mut sse = open_sse(
        gw.addr(),
        "/v1/messages",
        &[("x-api-key", &key), ("content-type", "application/json")],
        anthropic_body(SONNET, SMALL, true, "stream").as_bytes(),
    );
    assert!(sse.next_event().is_some(), "the held stream starts");
    let waiting = thread::scope(|s| {
        let second = s.spawn(|| ask(&gw, &key, SONNET, false, "2nd"));
        // The second request waits (nothing reaches the upstream) until the stream ends.
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(300) {
            assert_eq!(up.requests().len(), 1, "the second waits for the slot");
            thread::yield_now();
        }
        for _ in 1..stream_events(SMALL).len() {
            let _ = gate.send(());
        }
        while sse.next_event().is_some() {}
        second.join().expect("second")
    });
    assert_eq!(waiting.status, 200, "{}", waiting.text());
    assert_eq!(up.requests().len(), 2);
}

#[test]
fn token_budgets_refuse_with_429_until_the_period_ends_and_survive_a_restart() {
    let up = FakeUpstream::start(answer);
    let mut gw = gateway(&up);
    let (daily_id, daily) = add_key(&gw, "daily", &["--daily-tokens", "120"]);
    let (monthly_id, monthly) = add_key(&gw, "monthly", &["--monthly-tokens", "60"]);
    gw.start();

    // 50 + 50 + 21 tokens: the third is admitted at 100 of 120 and goes over by its own size.
    let steps: [(Tokens, bool, &str); 3] = [
        (Tokens::new(30, 10, 5, 5), false, "budget-1"),
        (Tokens::new(20, 15, 10, 5), true, "budget-2"),
        (Tokens::new(10, 5, 3, 3), false, "budget-3"),
    ];
    let mut spent = 0;
    for (tokens, stream, tag) in steps {
        let resp = post_anthropic(
            gw.addr(),
            &daily,
            &anthropic_body(SONNET, tokens, stream, tag),
            &[],
        );
        assert_eq!(resp.status, 200, "{tag}: {}", resp.text());
        // The client has its answer before the gateway is bound to have counted it; once
        // the ledger files show it, the budget has it too.
        spent += tokens.total();
        wait_for_tokens(&gw, &daily_id, spent);
    }
    assert_eq!(spent, 121);
    let check_daily = |gw: &Gateway, what: &str| {
        let before = now_unix();
        let refused = ask(gw, &daily, SONNET, false, "over");
        let after = now_unix();
        assert_error(&refused, 429, Some("rate_limit_error"));
        let wait = retry_after(&refused);
        assert!(
            wait > 0 && wait >= secs_to_midnight(after) && wait <= secs_to_midnight(before),
            "{what}: retry-after {wait} should run to the next UTC midnight ({} s)",
            secs_to_midnight(before)
        );
        let refused = ask_openai(gw, &daily, GPT, "over");
        assert_openai_error(&refused, 429);
        assert!(retry_after(&refused) > 0, "{what}: OpenAI caller");
    };
    check_daily(&gw, "daily budget spent");

    let resp = post_anthropic(
        gw.addr(),
        &monthly,
        &anthropic_body(HAIKU, Tokens::new(40, 10, 5, 5), true, "month-1"),
        &[],
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    wait_for_tokens(&gw, &monthly_id, 60);
    let check_monthly = |gw: &Gateway, what: &str| {
        let before = now_unix();
        let refused = ask(gw, &monthly, HAIKU, false, "over");
        let after = now_unix();
        assert_error(&refused, 429, Some("rate_limit_error"));
        let wait = retry_after(&refused);
        assert!(
            wait > 0 && wait >= secs_to_next_month(after) && wait <= secs_to_next_month(before),
            "{what}: retry-after {wait} should run to the first of next month ({} s)",
            secs_to_next_month(before)
        );
    };
    check_monthly(&gw, "monthly budget spent");
    assert_eq!(
        up.requests().len(),
        4,
        "refused requests never reach the upstream"
    );

    // The ledger files hold both (waited for above): a restart (kill -9) keeps them spent.
    gw.stop();
    gw.start();
    check_daily(&gw, "after a restart");
    check_monthly(&gw, "after a restart");
    assert_eq!(up.requests().len(), 4);

    // A budget raised while running admits the key again.
    cli_ok(
        &gw,
        &[
            "update-client-key",
            "--key-id",
            &daily_id,
            "--daily-tokens",
            "1000",
        ],
    );
    poll_until(super::RELOAD_LIMIT, "a raised budget", || {
        ask(&gw, &daily, SONNET, false, "raised").status == 200
    });
}

/// Waits until the ledger files credit key `id` with `total` tokens.
fn wait_for_tokens(gw: &Gateway, id: &str, total: u64) {
    crate::support::wait_until(
        &format!("usage showing {total} tokens for {id}"),
        super::FLUSH_LIMIT,
        || {
            let v = super::usage(gw, &["--by", "key"]);
            v["rows"]
                .as_array()
                .and_then(|rows| rows.iter().find(|r| r["key"] == id))
                .is_some_and(|r| r["total_tokens"] == total)
        },
    );
}

/// One call of the official anthropic SDK (two retries allowed) with `key`: the requests it
/// sent, the final status and the `x-should-retry` it saw.
fn sdk_call(gw: &Gateway, key: &str, model: &str) -> serde_json::Value {
    crate::support::require_python(
        "import anthropic; print(anthropic.__version__)",
        "anthropic",
        "the anthropic SDK retry test",
    );
    let mut cmd = std::process::Command::new(crate::support::PYTHON);
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/sdk/anthropic_retries.py"
    ))
    .arg(format!("http://{}", gw.addr()))
    .arg(key)
    .arg(model)
    .env_remove("ANTHROPIC_API_KEY")
    .env_remove("ANTHROPIC_BASE_URL")
    .env("NO_PROXY", "*");
    let out = crate::support::run(cmd, None);
    crate::support::assert_exit(&out, 0, "tests/sdk/anthropic_retries.py");
    serde_json::from_slice(&out.stdout).expect("the script prints JSON")
}

#[test]
fn the_anthropic_sdk_stops_at_hopeless_refusals_and_retries_the_rest() {
    let (up, gate) = FakeUpstream::gated_first(stream_events(SMALL), answer);
    // The held stream outlasts Python's start (seconds), so the upstream may be silent longer.
    let mut gw = Gateway::new(
        &Config::new(up.base_url())
            .section(ALIAS_SECTION)
            .read_timeout("60s"),
    );
    gw.add_api_key("primary", ACCOUNT_KEY);
    let (budget_id, budget) = add_key(&gw, "tiny-budget", &["--daily-tokens", "1"]);
    let (_, haiku_only) = add_key(&gw, "haiku-only", &["--models", HAIKU]);
    let (_, one) = add_key(&gw, "one-at-a-time", &["--max-concurrent", "1"]);
    gw.start();

    // A key at its concurrency limit invites the retry: the SDK tries three times. (First:
    // the upstream holds its first answer, a stream, until the gate opens.)
    let mut held = open_sse(
        gw.addr(),
        "/v1/messages",
        &[
            ("x-api-key", &one),
            ("content-type", "application/json"),
            ("connection", "close"),
        ],
        anthropic_body(SONNET, SMALL, true, "held").as_bytes(),
    );
    assert!(held.next_event().is_some(), "the held stream starts");
    let busy = sdk_call(&gw, &one, SONNET);
    for _ in 1..stream_events(SMALL).len() {
        let _ = gate.send(());
    }
    while held.next_event().is_some() {}
    assert_eq!(busy["status"], 429, "{busy}");
    assert!(busy["x-should-retry"].is_null(), "{busy}");
    assert_eq!(
        busy["requests"], 3,
        "the SDK should retry a concurrency 429: {busy}"
    );

    // A spent budget: one request, no retry (the SDK retries every other 429).
    assert_eq!(ask(&gw, &budget, SONNET, true, "spend").status, 200);
    wait_for_tokens(&gw, &budget_id, SMALL.total());
    let spent = sdk_call(&gw, &budget, SONNET);
    assert_eq!(spent["status"], 429, "{spent}");
    assert_eq!(spent["x-should-retry"], "false", "{spent}");
    assert_eq!(
        spent["requests"], 1,
        "the SDK retried a spent budget: {spent}"
    );
    // A model the key may not use, and a wrong key: one request each.
    let forbidden = sdk_call(&gw, &haiku_only, SONNET);
    assert_eq!(
        (forbidden["status"].clone(), forbidden["requests"].clone()),
        (403.into(), 1.into()),
        "{forbidden}"
    );
    assert_eq!(forbidden["x-should-retry"], "false", "{forbidden}");
    let wrong = sdk_call(&gw, "lgw_not-a-key", SONNET);
    assert_eq!(
        (wrong["status"].clone(), wrong["requests"].clone()),
        (401.into(), 1.into()),
        "{wrong}"
    );
    assert_eq!(wrong["x-should-retry"], "false", "{wrong}");
}
