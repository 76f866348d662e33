//! Limits and failures: error shapes, size limits, timeouts, slow clients and ambiguous framing.

use std::io::Write;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::{
    ACCOUNT_KEY, Config, Conn, FakeUpstream, Gateway, MESSAGE_BODY, Reply, assert_error,
    assert_exit, baseline, call, message_request, ok_upstream_and_gateway, open_sse, post_message,
    refused_base_url, relative_limit,
};

/// The gateway's configured `header_timeout` and `body_timeout` (see `Config::yaml`).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// Slack on top of a configured timeout before the test calls it missed.
const MARGIN: Duration = Duration::from_millis(2500);

/// Earlier than this, a client timeout fired before its configured 2 s.
const EARLY: Duration = Duration::from_millis(1500);

#[test]
fn request_errors_are_anthropic_shaped() {
    let (up, gw) = ok_upstream_and_gateway();

    let malformed = call(
        gw.addr(),
        "POST",
        "/v1/messages",
        &[gw.auth(), ("content-type", "application/json")],
        br#"{"model": "claude-sonnet-4-5", "messages": ["#,
    );
    assert_error(&malformed, 400, Some("invalid_request_error"));

    let unknown = call(gw.addr(), "GET", "/v1/nope", &[gw.auth()], b"");
    assert_error(&unknown, 404, Some("not_found_error"));
    let unknown_post = call(
        gw.addr(),
        "POST",
        "/v2/messages",
        &[gw.auth()],
        MESSAGE_BODY.as_bytes(),
    );
    assert_error(&unknown_post, 404, Some("not_found_error"));

    let wrong_method = call(gw.addr(), "GET", "/v1/messages", &[gw.auth()], b"");
    assert_error(&wrong_method, 405, None);
    // An Anthropic client sends anthropic-version; without it, /v1/models speaks OpenAI.
    let wrong_method = call(
        gw.addr(),
        "DELETE",
        "/v1/models",
        &[gw.auth(), ("anthropic-version", "2023-06-01")],
        b"",
    );
    assert_error(&wrong_method, 405, None);

    assert!(
        up.requests().is_empty(),
        "none of these may reach the upstream"
    );
}

#[test]
fn no_enabled_account_gives_503() {
    let up = FakeUpstream::json(200, r#"{"ok":true}"#);

    let mut none = Gateway::new(&Config::new(up.base_url()));
    none.add_client_key("tests");
    none.start();
    let resp = post_message(none.addr(), &[none.auth()]);
    assert_error(&resp, 503, None);

    let mut disabled = Gateway::new(&Config::new(up.base_url()));
    for (name, key) in [
        ("first", ACCOUNT_KEY),
        ("second", "sk-ant-api03-SecondDisabled-0002"),
    ] {
        let id = disabled.add_api_key(name, key);
        let out = disabled.run_cli(&["disable-account", "--account-id", &id]);
        assert_exit(&out, 0, "disable-account");
    }
    disabled.add_client_key("tests");
    disabled.start();
    let resp = post_message(disabled.addr(), &[disabled.auth()]);
    assert_error(&resp, 503, None);

    assert!(up.requests().is_empty(), "no account, no upstream request");
}

#[test]
fn upstream_refusing_connections_gives_502() {
    let gw = Gateway::started(&Config::new(refused_base_url()));
    let resp = post_message(gw.addr(), &[gw.auth()]);
    assert_error(&resp, 502, None);
}

#[test]
fn upstream_that_never_answers_gives_504_after_read_timeout() {
    let up = FakeUpstream::start(|_| Reply::Hang);
    let gw = Gateway::started(&Config::new(up.base_url()).read_timeout("1s"));

    let started = Instant::now();
    let resp = post_message(gw.addr(), &[gw.auth()]);
    let took = started.elapsed();

    assert_error(&resp, 504, None);
    // Absolute, as README states it: `upstream.read_timeout` is the longest upstream silence
    // before a `504` (1 s here; 3 s of slack for a loaded machine).
    assert!(
        took >= Duration::from_millis(900),
        "504 before read_timeout elapsed: {took:?}"
    );
    assert!(
        took < Duration::from_secs(4),
        "504 long after read_timeout: {took:?}"
    );
    assert!(
        !up.requests().is_empty(),
        "the request did reach the upstream"
    );
}

#[test]
fn oversized_body_is_refused_without_reading_it() {
    let (up, gw) = ok_upstream_and_gateway();

    // The body is never sent: a 413 can only come from the declared length.
    let mut conn = Conn::open(gw.addr());
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: gateway.test\r\nx-api-key: {}\r\n\
         content-type: application/json\r\ncontent-length: 2000000\r\n\r\n",
        gw.client_key()
    );
    conn.send(head.as_bytes());
    let resp = conn.read_response();
    assert_error(&resp, 413, Some("request_too_large"));

    for declared in [
        "1099511627776",
        "18446744073709551615",
        "18446744073709551616",
    ] {
        let mut conn = Conn::open(gw.addr());
        let head = format!(
            "POST /v1/messages HTTP/1.1\r\nhost: gateway.test\r\nx-api-key: {}\r\n\
             content-length: {declared}\r\n\r\n",
            gw.client_key()
        );
        conn.send(head.as_bytes());
        let resp = conn.read_response();
        assert!(
            resp.status == 413 || resp.status == 400,
            "content-length {declared}: expected 413 or 400, got {} {}",
            resp.status,
            resp.text()
        );
        assert_error(&resp, resp.status, None);
    }

    assert!(
        up.requests().is_empty(),
        "oversized requests must not reach the upstream"
    );
    let health = call(gw.addr(), "GET", "/health", &[], b"");
    assert_eq!(health.status, 200, "gateway keeps serving");
    let ok = post_message(gw.addr(), &[gw.auth()]);
    assert_eq!(ok.status, 200, "gateway keeps proxying: {}", ok.text());
}

#[test]
fn oversized_head_gives_431() {
    let (up, gw) = ok_upstream_and_gateway();

    let filler = "a".repeat(1000);
    let mut head = format!(
        "GET /v1/models HTTP/1.1\r\nhost: gateway.test\r\nx-api-key: {}\r\n",
        gw.client_key()
    );
    for i in 0..34 {
        head.push_str(&format!("x-filler-{i}: {filler}\r\n"));
    }
    head.push_str("\r\n");
    assert!(head.len() > 32 * 1024 + 512);

    let mut conn = Conn::open(gw.addr());
    conn.send(head.as_bytes());
    let resp = conn.read_response();
    assert_error(&resp, 431, None);
    assert!(up.requests().is_empty());

    let health = call(gw.addr(), "GET", "/health", &[], b"");
    assert_eq!(health.status, 200, "gateway keeps serving");
}

#[test]
fn stalled_clients_do_not_block_others() {
    let (up, gw) = ok_upstream_and_gateway();

    // Half a head, then nothing.
    let half_started = Instant::now();
    let mut half_head = Conn::open(gw.addr());
    half_head.send(b"POST /v1/messages HTTP/1.1\r\nhost: gateway.test\r\nx-api-");

    // A full head promising 100 bytes, 10 of them sent.
    let mut stalled_body = Conn::open(gw.addr());
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: gateway.test\r\nx-api-key: {}\r\n\
         content-length: 100\r\n\r\n{{\"model\":",
        gw.client_key()
    );
    stalled_body.send(head.as_bytes());
    let body_stalled_at = Instant::now();

    // A head dribbled one byte every 100 ms: 2 s buys only 20 bytes of it.
    let dribble_started = Instant::now();
    let mut dribbler = Conn::open(gw.addr());
    let mut writer = dribbler.writer();
    let dribble = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: gateway.test\r\nx-slow: {}\r\n\r\n",
        "z".repeat(200)
    );
    let dribble_thread = thread::spawn(move || {
        for byte in dribble.bytes() {
            // Pacing a deliberately slow client, not synchronisation.
            if writer.write_all(&[byte]).is_err() {
                return true;
            }
            thread::sleep(Duration::from_millis(100));
        }
        false
    });

    // Meanwhile a normal client is served at once.
    let started = Instant::now();
    let resp = post_message(gw.addr(), &[gw.auth()]);
    let took = started.elapsed();
    assert_eq!(resp.status, 200, "body: {}", resp.text());
    // Absolute, as README (Reliability) states it: next to stallers, other clients are served
    // in under 1 s.
    assert!(
        took < Duration::from_secs(1),
        "normal request took {took:?} next to stalled clients"
    );

    let resp = stalled_body.read_response();
    let waited = body_stalled_at.elapsed();
    assert_error(&resp, 408, None);
    assert!(
        waited < CLIENT_TIMEOUT + MARGIN,
        "408 for the stalled body after {waited:?}"
    );
    assert!(
        waited >= EARLY,
        "408 for the stalled body after {waited:?}, before body_timeout"
    );

    for (what, conn, since) in [
        ("half head", &mut half_head, half_started),
        ("dribbled head", &mut dribbler, dribble_started),
    ] {
        let got = conn.read_until_closed();
        let waited = since.elapsed();
        assert!(
            waited < CLIENT_TIMEOUT + MARGIN,
            "{what} connection cut only after {waited:?}"
        );
        assert!(
            waited >= EARLY,
            "{what} connection cut after {waited:?}, before header_timeout"
        );
        assert!(
            got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
            "{what}: if anything is sent before closing, it is a 408: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    // The dribbler's writes end when the connection is gone; the join cannot outlast its 20 s script.
    let _ = dribble_thread.join();
    assert_eq!(
        up.requests().len(),
        1,
        "only the normal request reached the upstream"
    );
}

#[test]
fn ambiguous_framing_is_rejected() {
    let (up, gw) = ok_upstream_and_gateway();
    let key = gw.client_key().to_string();

    let both = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: gateway.test\r\nx-api-key: {key}\r\n\
         content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    let dup = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: gateway.test\r\nx-api-key: {key}\r\n\
         content-length: 2\r\ncontent-length: 3\r\n\r\n{{}}"
    );
    let list = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: gateway.test\r\nx-api-key: {key}\r\n\
         content-length: 2, 3\r\n\r\n{{}}"
    );
    for (what, raw) in [("CL + TE", both), ("duplicate CL", dup), ("CL list", list)] {
        let mut conn = Conn::open(gw.addr());
        conn.send(raw.as_bytes());
        let resp = conn.read_response();
        assert_eq!(resp.status, 400, "{what}: {}", resp.text());
        assert_error(&resp, 400, Some("invalid_request_error"));
    }
    assert!(
        up.requests().is_empty(),
        "ambiguous requests must not reach the upstream"
    );

    let ok = post_message(gw.addr(), &[gw.auth()]);
    assert_eq!(ok.status, 200);
}

/// Issue 2: when every worker is busy and the accept queue is full, a new connection gets an
/// immediate 503 with `retry-after` instead of hanging; queued connections are served later.
#[test]
fn saturated_pool_answers_503_and_serves_the_queue_later() {
    let mut gates = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..2 {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        gates.push(tx);
        receivers.push(rx);
    }
    let events = crate::support::sse_events(1);
    let event_count = events.len();
    let up = FakeUpstream::start(move |_| match receivers.pop() {
        Some(gate) => Reply::Sse {
            events: events.clone(),
            gate: Some(gate),
            framing: crate::support::Framing::Chunked,
        },
        None => Reply::json(200, r#"{"queued":"served"}"#),
    });
    let gw = Gateway::started(
        &Config::new(up.base_url())
            .workers(2)
            .server("accept_queue", "1"),
    );
    let headers = [gw.auth(), ("connection", "close")];
    // What an answer takes here while a worker is free (one the gateway makes itself, as the
    // refusal is): "at once" is relative to it.
    let ordinary = baseline(3, || {
        assert_eq!(call(gw.addr(), "GET", "/health", &[], b"").status, 200);
    });

    // Two streams hold both workers: their first event has arrived, the rest is gated.
    let mut streams = Vec::new();
    for _ in 0..2 {
        let body = r#"{"model":"m","stream":true}"#;
        let mut sse = open_sse(gw.addr(), "/v1/messages", &headers, body.as_bytes());
        assert!(sse.next_event().is_some(), "first event of a held stream");
        streams.push(sse);
    }
    // A third connection waits in the queue; a fourth is refused at once.
    let mut queued = Conn::open(gw.addr());
    queued.send(&message_request(&headers));
    let refused_at = Instant::now();
    let mut refused = Conn::open(gw.addr());
    refused.send(&message_request(&headers));
    let resp = refused.read_response();
    let waited = refused_at.elapsed();
    assert!(
        waited < relative_limit(ordinary),
        "the refusal must not wait for a worker: {waited:?}, an ordinary answer {ordinary:?}"
    );
    let body = assert_error(&resp, 503, Some("overloaded_error"));
    assert_eq!(resp.header("retry-after"), Some("1"));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("2 busy workers")
    );

    // Releasing the streams frees the workers, and the queued request is served.
    for gate in &gates {
        for _ in 1..event_count {
            let _ = gate.send(());
        }
    }
    for mut sse in streams {
        let mut last = None;
        while let Some(event) = sse.next_event() {
            last = event.field("event").map(str::to_string);
        }
        assert_eq!(
            last.as_deref(),
            Some("message_stop"),
            "held streams complete"
        );
    }
    let resp = queued.read_response();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), r#"{"queued":"served"}"#);
}
