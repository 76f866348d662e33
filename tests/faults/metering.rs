//! Trust boundaries, part 2 (README: Reliability): every token an answer costs is metered,
//! whatever its framing and size, so budgets count it; an error inside a stream is an error.

use std::time::Duration;

use serde_json::Value;

use crate::support::accounts::{account, admin_status};
use crate::support::{
    ACCOUNT_KEY, Config, FakeUpstream, Framing, Gateway, MESSAGE_BODY, Reply, assert_exit, call,
    in_parallel, post_message, sse_events,
};
use crate::team::add_key;

/// A message of `input` + `output` tokens, padded to `pad` bytes of text, with its `usage`
/// last (where a streaming scan meets it only at the very end).
fn message(input: u64, output: u64, pad: usize) -> Vec<u8> {
    format!(
        r#"{{"id":"msg_big","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{{"type":"text","text":"{}"}}],"stop_reason":"end_turn","usage":{{"input_tokens":{input},"output_tokens":{output},"cache_read_input_tokens":0}}}}"#,
        "x".repeat(pad)
    )
    .into_bytes()
}

/// Non-streaming answers sent chunked, close-delimited, or larger than the gateway reads
/// whole (300 KiB) are metered as they pass: the ledger holds their tokens and a 100-token
/// daily budget trips after the first.
#[test]
fn answers_of_every_framing_and_size_are_metered() {
    let up = FakeUpstream::start(|req| {
        let body = String::from_utf8_lossy(&req.body).into_owned();
        if body.contains("chunked") {
            Reply::Framed {
                status: 200,
                body: message(4_000, 6_000, 2_000),
                framing: Framing::Chunked,
                piece: 7,
            }
        } else if body.contains("close") {
            Reply::Framed {
                status: 200,
                body: message(4_000, 6_000, 2_000),
                framing: Framing::CloseDelimited,
                piece: 1000,
            }
        } else {
            Reply::Json {
                status: 200,
                headers: Vec::new(),
                body: message(4_000, 6_000, 300 * 1024),
            }
        }
    });
    let mut gw = Gateway::new(&Config::new(up.base_url()));
    gw.add_api_key("primary", ACCOUNT_KEY);
    let mut keys = Vec::new();
    for framing in ["chunked", "close", "large"] {
        let (_, key) = add_key(&gw, framing, &["--daily-tokens", "100"]);
        keys.push((framing, key));
    }
    gw.start();
    for (framing, key) in &keys {
        let body = MESSAGE_BODY.replace("\"hi\"", &format!("\"{framing}\""));
        let first = call(
            gw.addr(),
            "POST",
            "/v1/messages",
            &[("x-api-key", key)],
            body.as_bytes(),
        );
        assert_eq!(first.status, 200, "{framing}: {}", first.text());
        let v: Value = first.json();
        assert_eq!(
            v["usage"]["output_tokens"], 6_000,
            "{framing}: relayed whole"
        );
        // The answer is metered as its relay ends, a moment after the client has it whole:
        // wait until the ledger has it.
        let served = (keys.iter().position(|(f, _)| f == framing)).map_or(0, |i| i + 1);
        crate::support::accounts::poll_until(Duration::from_secs(10), "recorded", || {
            let out = gw.run_cli(&["usage", "--json"]);
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            v["total"]["requests"].as_u64() == Some(2 * served as u64 - 1)
        });
        let second = call(
            gw.addr(),
            "POST",
            "/v1/messages",
            &[("x-api-key", key)],
            body.as_bytes(),
        );
        assert_eq!(
            second.status,
            429,
            "{framing}: the budget counted the first: {}",
            second.text()
        );
    }
    // The ledger on disk (flushed every second) holds them too: three answers of 10,000
    // tokens each.
    let mut last = String::new();
    crate::support::accounts::poll_until(Duration::from_secs(10), "usage on disk", || {
        let out = gw.run_cli(&["usage", "--json"]);
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        let usage: Value = serde_json::from_str(&last).unwrap_or_default();
        usage["total"]["input_tokens"] == 12_000 && usage["total"]["output_tokens"] == 18_000
    });
}

/// A stream whose upstream sends `event: error` part way is an error: the access log line and
/// the ledger record carry it, metrics count it by its kind (`overloaded_error` and
/// `api_error` 5xx, `rate_limit_error` and `invalid_request_error` 4xx), and the account is
/// charged as for the equivalent answer: a failure, a 429 rest, or nothing (the client's).
#[test]
fn an_error_event_inside_a_stream_is_an_error() {
    let up = FakeUpstream::start(|req| {
        let body = String::from_utf8_lossy(&req.body).into_owned();
        let kind = [
            "overloaded_error",
            "api_error",
            "rate_limit_error",
            "invalid_request_error",
        ]
        .into_iter()
        .find(|k| body.contains(k));
        let mut events = sse_events(2);
        if let Some(kind) = kind {
            events.truncate(4);
            events.push(format!(
                "event: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"{kind}\",\"message\":\"it went wrong\"}}}}\n\n"
            ));
        }
        Reply::Sse {
            events,
            gate: None,
            framing: Framing::Chunked,
        }
    });
    let mut gw = Gateway::new(&Config::new(up.base_url()).admin_listen("127.0.0.1:0"));
    let id = gw.add_api_key("primary", ACCOUNT_KEY);
    gw.add_client_key("tests");
    gw.start();
    let stream = |kind: &str| {
        let body = format!(
            r#"{{"model":"claude-sonnet-4-5","max_tokens":16,"stream":true,"messages":[{{"role":"user","content":"{kind}"}}]}}"#
        );
        let resp = call(
            gw.addr(),
            "POST",
            "/v1/messages",
            &[gw.auth()],
            body.as_bytes(),
        );
        assert_eq!(resp.status, 200, "{kind}");
        let text = resp.text();
        assert!(
            text.contains("event: error") == (kind != "fine"),
            "{kind}: {text}"
        );
    };
    // The account is charged just after the stream's last byte: poll for it.
    let account_is = |state: &str, failures: u64, what: &str| {
        crate::support::accounts::poll_until(Duration::from_secs(5), what, || {
            let view = admin_status(&gw);
            let row = account(&view, &id);
            row["state"] == state && row["failures"] == failures
        });
    };
    stream("fine");
    stream("invalid_request_error");
    account_is("active", 0, "the client's error is not the account's");
    stream("overloaded_error");
    stream("api_error");
    account_is("active", 2, "overloaded and api errors are the account's");
    stream("rate_limit_error");
    account_is("cooling", 3, "a rate limit rests the account");

    // Metrics and the access line follow the account's charge: poll for them too.
    let count = |metrics: &str, class: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "llm_gateway_requests_total{{status_class=\"{class}\""
                ))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let mut metrics = String::new();
    crate::support::accounts::poll_until(Duration::from_secs(5), "metrics by class", || {
        metrics = call(gw.admin_addr(), "GET", "/metrics", &[], b"").text();
        let classes = (
            count(&metrics, "2xx"),
            count(&metrics, "4xx"),
            count(&metrics, "5xx"),
        );
        classes == (1, 2, 2)
    });
    let message_lines = || -> Vec<Value> {
        (gw.stderr().lines())
            .filter(|l| l.contains("\"request_id\""))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["path"] == "/v1/messages")
            .collect()
    };
    crate::support::accounts::poll_until(Duration::from_secs(5), "five access lines", || {
        message_lines().len() == 5
    });
    let lines = message_lines();
    let log = gw.stderr();
    let errors: Vec<&str> = lines.iter().filter_map(|l| l["error"].as_str()).collect();
    assert_eq!(errors.len(), 4, "{log}");
    for kind in [
        "overloaded_error",
        "api_error",
        "rate_limit_error",
        "invalid_request_error",
    ] {
        assert!(
            errors.iter().any(|e| e.contains(kind)),
            "{kind}: {errors:?}"
        );
    }
    crate::support::accounts::poll_until(Duration::from_secs(10), "errors in the ledger", || {
        let out = gw.run_cli(&["usage", "--json"]);
        let usage: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        usage["total"]["requests"] == 5 && usage["total"]["errors"] == 4
    });
}

/// The ledger never fails open: a truncated summary is recovered from the previous one and
/// the journals kept since it (a key over its budget stays refused); with nothing to recover
/// from, a `usage/` that is a symlink, or a lock path that is a directory, the server refuses
/// to start, naming the file; a record dated in the future counts against no budget, and it,
/// a record with negative tokens and a line of 1 MiB are skipped and reported.
#[test]
fn the_ledger_never_fails_open() {
    let up = FakeUpstream::json(
        200,
        r#"{"id":"m","type":"message","content":[],"usage":{"input_tokens":60,"output_tokens":60}}"#,
    );
    let mut gw = Gateway::new(&Config::new(up.base_url()));
    gw.add_api_key("primary", ACCOUNT_KEY);
    let (key_id, key) = add_key(&gw, "budgeted", &["--daily-tokens", "100"]);
    let post = |gw: &Gateway| post_message(gw.addr(), &[("x-api-key", &key)]).status;
    let usage_dir = gw.dir().join("usage");
    let flushed = |gw: &Gateway, requests: u64| {
        crate::support::accounts::poll_until(Duration::from_secs(10), "flushed", || {
            let out = gw.run_cli(&["usage", "--json"]);
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            v["total"]["requests"] == requests
        });
    };
    gw.start();
    assert_eq!(post(&gw), 200);
    assert_eq!(post(&gw), 429, "120 tokens spent of 100");
    flushed(&gw, 2);
    gw.stop();
    // A second start folds the journal into summary.json (the first summary becomes the
    // previous one); then summary.json is cut in half.
    gw.start();
    gw.stop();
    let summary = usage_dir.join("summary.json");
    let bytes = std::fs::read(&summary).expect("summary.json");
    std::fs::write(&summary, &bytes[..bytes.len() / 2]).expect("truncate");
    gw.start();
    assert_eq!(post(&gw), 429, "the budget held through the recovery");
    assert!(gw.stderr().contains("recovered"), "{}", gw.stderr());
    gw.stop();

    let refused = |gw: &Gateway, what: &str, names: &str| {
        let out = gw.run_cli(&["server"]);
        assert_exit(&out, 1, what);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(names), "{what}: {err}");
        assert!(out.stdout.is_empty(), "{what}: never listened");
    };
    std::fs::write(&summary, b"{").expect("corrupt");
    std::fs::write(usage_dir.join("summary.prev.json"), b"{").expect("corrupt");
    refused(&gw, "nothing to recover from", "summary.json");

    std::fs::remove_dir_all(&usage_dir).expect("remove usage");
    let elsewhere = gw.dir().join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("mkdir");
    std::os::unix::fs::symlink(&elsewhere, &usage_dir).expect("symlink");
    refused(&gw, "a symlinked usage directory", "symlink");
    std::fs::remove_file(&usage_dir).expect("unlink");

    std::fs::create_dir_all(usage_dir.join(".lock")).expect("lock dir");
    refused(&gw, "a lock path that is a directory", ".lock");
    std::fs::remove_dir_all(&usage_dir).expect("remove usage");

    // A record from the year 2100 for this key, 1000 tokens: it counts for nothing today.
    std::fs::create_dir(&usage_dir).expect("mkdir");
    let future = format!(
        "{{\"t\":4102444800,\"key\":\"{key_id}\",\"account\":\"-\",\"model\":\"-\",\"status\":200,\"input\":1000,\"output\":0,\"cache_creation\":0,\"cache_read\":0}}\n"
    );
    // And a line with negative tokens and one of 1 MiB: skipped, and said so.
    let negative = format!(
        "{{\"t\":1,\"key\":\"{key_id}\",\"account\":\"-\",\"model\":\"-\",\"status\":200,\"input\":-5,\"output\":0,\"cache_creation\":0,\"cache_read\":0}}\n"
    );
    let long = format!("{}\n", "x".repeat(1024 * 1024));
    std::fs::write(
        usage_dir.join("journal-00000001.jsonl"),
        format!("{future}{negative}{long}"),
    )
    .expect("journal");
    gw.start();
    assert_eq!(post(&gw), 200, "a future record spends no budget");
    let log = gw.stderr();
    for said in [
        "dated in the future",
        "not a valid record",
        "longer than 64 KiB",
    ] {
        assert!(log.contains(said), "{said}: {log}");
    }
}

/// Ten requests at once against a 100-token daily budget: each reserves what it may cost
/// (its body at four bytes a token, plus its `max_tokens`) while in flight, so only as many
/// are admitted as the budget holds, plus one at most; the rest get 429 at once.
#[test]
fn budgets_hold_under_concurrency() {
    const PARALLEL: usize = 10;
    let (up, _) = FakeUpstream::meeting(PARALLEL, Duration::from_secs(2), |_| {
        Reply::json(
            200,
            r#"{"id":"m","type":"message","content":[],"usage":{"input_tokens":10,"output_tokens":40}}"#,
        )
    });
    let mut gw = Gateway::new(&Config::new(up.base_url()).read_timeout("10s"));
    gw.add_api_key("primary", ACCOUNT_KEY);
    let (_, key) = add_key(&gw, "budgeted", &["--daily-tokens", "100"]);
    gw.start();
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":40,"messages":[{"role":"user","content":"hi"}]}"#;
    let statuses = in_parallel(PARALLEL, |_| {
        call(
            gw.addr(),
            "POST",
            "/v1/messages",
            &[("x-api-key", &key)],
            body.as_bytes(),
        )
        .status
    });
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(admitted + refused, PARALLEL, "{statuses:?}");
    // Each may cost 40 + 22 (89 bytes / 4) = 62 tokens: 0 and 62 reserved are under 100, 124
    // is not. Spent: 2 x 50 = 100, the budget exactly.
    assert_eq!(admitted, 2, "{statuses:?}");
    assert_eq!(
        up.requests().len(),
        admitted,
        "refused requests never went upstream"
    );
}

/// A restart on one host loses nothing. A second server on the same config (another port, or
/// the same one with `server.reuse_port`) enforces budgets from its first request, records its
/// own requests, and takes the ledger over within a flush interval once the first stops
/// (SIGTERM, or `kill -9`): `usage` then counts exactly what the upstream served, once.
#[test]
fn a_restart_on_one_host_loses_nothing() {
    for (stop, same_port) in [("TERM", false), ("KILL", false), ("TERM", true)] {
        let what = format!("stop by {stop}, same port {same_port}");
        let up = FakeUpstream::json(
            200,
            r#"{"id":"m","type":"message","content":[],"usage":{"input_tokens":10,"output_tokens":20}}"#,
        );
        let mut config = Config::new(up.base_url());
        if same_port {
            config = config.server("reuse_port", "true");
        }
        let mut gw = Gateway::new(&config);
        gw.add_api_key("primary", ACCOUNT_KEY);
        let (_, spent) = add_key(&gw, "spent", &["--daily-tokens", "50"]);
        let (_, free) = add_key(&gw, "free", &[]);
        let post = |addr, key: &str| post_message(addr, &[("x-api-key", key)]).status;
        let first = gw.start();
        assert_eq!(post(first, &spent), 200, "{what}");
        assert_eq!(post(first, &spent), 200, "{what}: 30 of 50");
        assert_eq!(post(first, &spent), 429, "{what}: 60 of 50");
        // The second server, once the first flushed what it served.
        crate::support::accounts::poll_until(Duration::from_secs(10), "flushed", || {
            let v: Value = serde_json::from_slice(&gw.run_cli(&["usage", "--json"]).stdout)
                .unwrap_or_default();
            v["total"]["requests"] == 3
        });
        let listen = if same_port {
            first.to_string()
        } else {
            "127.0.0.1:0".to_string()
        };
        let second = gw.spawn_server(&["--listen", &listen]);
        let second_addr = second.addr();
        // Logged before the listening line, but read from stderr by another thread.
        crate::support::wait_until("the follower says so", Duration::from_secs(5), || {
            second.stderr().contains("takes the ledger over")
        });
        if !same_port {
            assert_eq!(
                post(second_addr, &spent),
                429,
                "{what}: from its first request"
            );
        }
        for i in 0..6 {
            let addr = if i % 2 == 0 { first } else { second_addr };
            assert_eq!(post(addr, &free), 200, "{what}: request {i}");
        }
        if stop == "KILL" {
            gw.stop();
        } else {
            gw.signal("TERM");
            assert!(
                gw.wait_exit(Duration::from_secs(10)).is_some(),
                "{what}: drained"
            );
        }
        crate::support::accounts::poll_until(Duration::from_secs(10), "taken over", || {
            second
                .stderr()
                .contains("this server records the usage now")
        });
        for i in 0..4 {
            assert_eq!(post(second_addr, &free), 200, "{what}: after, {i}");
        }
        assert_eq!(
            post(second_addr, &spent),
            429,
            "{what}: the budget still holds"
        );
        // Exactly what was served, once.
        let served = up.requests().len() as u64;
        let mut last = Value::Null;
        let exact = (0..200).any(|_| {
            last = serde_json::from_slice(&gw.run_cli(&["usage", "--json"]).stdout)
                .unwrap_or_default();
            let t = &last["total"];
            let done = t["input_tokens"].as_u64() == Some(10 * served)
                && t["output_tokens"].as_u64() == Some(20 * served);
            if !done {
                std::thread::sleep(Duration::from_millis(50));
            }
            done
        });
        assert!(exact, "{what}: {served} served, usage says {last}");
        drop(second);
    }
}

/// A client that hangs up before an answer's trailing `usage` has passed is still charged:
/// what its request reserved counts against its budget, so hanging up early is no way around
/// one.
#[test]
fn hanging_up_before_the_usage_is_still_charged() {
    // 16 MiB: more than loopback's buffers hold, so the relay is cut before the usage.
    let up = FakeUpstream::start(|_| Reply::Json {
        status: 200,
        headers: Vec::new(),
        body: message(4_000, 6_000, 16 * 1024 * 1024),
    });
    let mut gw = Gateway::new(&Config::new(up.base_url()));
    gw.add_api_key("primary", ACCOUNT_KEY);
    let (_, key) = add_key(&gw, "budgeted", &["--daily-tokens", "100"]);
    gw.start();
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":200,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut conn = crate::support::Conn::open(gw.addr());
    conn.send(&crate::support::request_bytes(
        "POST",
        "/v1/messages",
        &[("x-api-key", &key)],
        body.as_bytes(),
    ));
    let (status, _) = conn.read_head();
    assert_eq!(status, 200);
    drop(conn);
    crate::support::accounts::poll_until(Duration::from_secs(10), "charged", || {
        let v: Value =
            serde_json::from_slice(&gw.run_cli(&["usage", "--json"]).stdout).unwrap_or_default();
        // What it reserved (its body / 4 plus 200), not the 10,000 the answer would have said.
        v["total"]["total_tokens"]
            .as_u64()
            .is_some_and(|t| (200..1000).contains(&t))
    });
    let again = call(
        gw.addr(),
        "POST",
        "/v1/messages",
        &[("x-api-key", &key)],
        body.as_bytes(),
    );
    assert_eq!(again.status, 429, "{}", again.text());
}
