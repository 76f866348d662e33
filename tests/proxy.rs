//! Proxy behaviour: what reaches the upstream, what comes back downstream, client auth, and streaming.

use std::sync::mpsc;
use std::time::Duration;

use crate::support::{
    ACCOUNT_KEY, Config, Conn, FakeUpstream, Framing, Gateway, MESSAGE_BODY, Recorded, Reply,
    Response, SseStream, StreamEnd, assert_error, call, message_request, ok_upstream_and_gateway,
    open_sse, post_message, request_bytes, sse_events,
};

const STREAM_BODY: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"count"}]}"#;

#[test]
fn json_round_trip_is_byte_for_byte() {
    let upstream_body = "{\"id\" :  \"msg_01XYZ\",\n  \"type\":\"message\",\"role\" : \"assistant\",\t\"content\":[{\"type\":\"text\",\"text\":\"h\\u00e9llo  w\u{f6}rld\"}] ,\"usage\":{\"input_tokens\":3,\"output_tokens\":2}}  \n";
    let up = FakeUpstream::start(move |_| Reply::Json {
        status: 200,
        headers: vec![
            ("request-id".into(), "req_011CTestRequestId".into()),
            ("anthropic-ratelimit-requests-remaining".into(), "99".into()),
            ("keep-alive".into(), "timeout=5, max=100".into()),
        ],
        body: upstream_body.as_bytes().to_vec(),
    });
    let gw = Gateway::started(&Config::new(up.base_url()));
    let client_body = "{ \"model\":\"claude-sonnet-4-5\" ,\"max_tokens\": 16,\n\"messages\":[{\"role\":\"user\",\"content\":\"h\\u00e9  w\u{f6}rld\"}] }";

    let resp = call(
        gw.addr(),
        "POST",
        "/v1/messages?beta=true",
        &[gw.auth(), ("content-type", "application/json")],
        client_body.as_bytes(),
    );

    assert_eq!(resp.status, 200, "body: {}", resp.text());
    assert_eq!(
        resp.body,
        upstream_body.as_bytes(),
        "downstream body differs"
    );
    assert_eq!(resp.header("request-id"), Some("req_011CTestRequestId"));
    assert_eq!(
        resp.header("anthropic-ratelimit-requests-remaining"),
        Some("99")
    );
    assert_ne!(
        resp.header("keep-alive"),
        Some("timeout=5, max=100"),
        "hop-by-hop keep-alive forwarded"
    );
    let lengths: Vec<&str> = resp
        .headers
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| v.as_str())
        .collect();
    let body_len = upstream_body.len().to_string();
    assert!(
        lengths.is_empty() || lengths == [body_len.as_str()],
        "downstream content-length {lengths:?}"
    );
    let reqs = up.requests();
    assert_eq!(reqs.len(), 1, "exactly one upstream request");
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].target, "/v1/messages?beta=true");
    assert_eq!(
        reqs[0].body,
        client_body.as_bytes(),
        "upstream body differs"
    );
}

/// The client got a 200 for the one request that reached the upstream, with `MESSAGE_BODY`
/// as its body, whatever framing the client sent it in.
fn assert_message_forwarded(resp: &Response, up: &FakeUpstream) {
    assert_eq!(resp.status, 200, "body: {}", resp.text());
    let reqs = up.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].body, MESSAGE_BODY.as_bytes());
}

/// Asserts the credential rules every upstream request must follow.
fn assert_clean_credentials(req: &Recorded, client_key: &str) {
    assert_eq!(
        req.all("x-api-key"),
        vec![ACCOUNT_KEY],
        "upstream x-api-key"
    );
    for (name, value) in &req.headers {
        assert!(
            !value.contains(client_key),
            "upstream header {name} carries the client's gateway key"
        );
    }
    assert!(
        req.header("authorization").is_none(),
        "authorization forwarded upstream"
    );
    assert!(req.header("cookie").is_none(), "cookie forwarded upstream");
    assert_eq!(
        req.all("accept-encoding"),
        vec!["identity"],
        "upstream accept-encoding"
    );
}

#[test]
fn upstream_gets_account_key_and_never_client_credentials() {
    let (up, gw) = ok_upstream_and_gateway();
    let key = gw.client_key().to_string();
    let bearer = format!("Bearer {key}");

    let first = post_message(
        gw.addr(),
        &[
            ("x-api-key", &key),
            ("cookie", "session=secret-cookie"),
            ("user-agent", "claude-cli/1.0.0 (test)"),
            ("x-custom", "kept"),
            (
                "anthropic-beta",
                "prompt-caching-2024-07-31,token-efficient-tools-2025-02-19",
            ),
            ("accept-encoding", "gzip, br"),
            ("content-type", "application/json"),
        ],
    );
    assert_eq!(first.status, 200, "body: {}", first.text());
    let second = post_message(
        gw.addr(),
        &[
            ("authorization", &bearer),
            ("anthropic-version", "2024-10-22"),
            ("content-type", "application/json"),
        ],
    );
    assert_eq!(second.status, 200, "body: {}", second.text());

    let reqs = up.requests();
    assert_eq!(reqs.len(), 2);
    for req in &reqs {
        assert_clean_credentials(req, &key);
    }
    let (a, b) = (&reqs[0], &reqs[1]);
    assert_eq!(
        a.all("anthropic-version"),
        vec!["2023-06-01"],
        "version added when absent"
    );
    assert_eq!(
        a.header("anthropic-beta"),
        Some("prompt-caching-2024-07-31,token-efficient-tools-2025-02-19")
    );
    assert_eq!(a.header("x-custom"), Some("kept"));
    assert_eq!(a.header("user-agent"), Some("claude-cli/1.0.0 (test)"));
    assert_eq!(
        b.all("anthropic-version"),
        vec!["2024-10-22"],
        "client's version kept"
    );

    let log = gw.stderr();
    assert!(
        !log.contains(ACCOUNT_KEY),
        "server log leaks the account key"
    );
    assert!(!log.contains(&key), "server log leaks the client key");
    assert!(
        !log.contains("secret-cookie"),
        "server log leaks the cookie"
    );
}

#[test]
fn client_auth_accepts_gateway_keys_only() {
    let (up, gw) = ok_upstream_and_gateway();
    let bearer = format!("Bearer {}", gw.client_key());

    let health = call(gw.addr(), "GET", "/health", &[], b"");
    assert_eq!(
        health.status,
        200,
        "health needs no auth: {}",
        health.text()
    );
    assert!(health.json().is_object(), "health answers a JSON object");

    let ok = post_message(gw.addr(), &[("authorization", &bearer)]);
    assert_eq!(ok.status, 200, "bearer auth: {}", ok.text());

    let wrong_key = format!("{}x", gw.client_key());
    let wrong_bearer = format!("Bearer {wrong_key}");
    let cases: [(&str, Vec<(&str, &str)>); 4] = [
        ("wrong x-api-key", vec![("x-api-key", &wrong_key)]),
        ("wrong bearer", vec![("authorization", &wrong_bearer)]),
        (
            "account key as client key",
            vec![("x-api-key", ACCOUNT_KEY)],
        ),
        ("no credentials", vec![]),
    ];
    for (what, headers) in cases {
        let resp = post_message(gw.addr(), &headers);
        assert_eq!(resp.status, 401, "{what}");
        assert_error(&resp, 401, Some("authentication_error"));
    }
    let models = call(
        gw.addr(),
        "GET",
        "/v1/models",
        &[("anthropic-version", "2023-06-01")],
        b"",
    );
    assert_error(&models, 401, Some("authentication_error"));
    assert_eq!(
        up.requests().len(),
        1,
        "rejected requests must not reach the upstream"
    );
}

#[test]
fn no_client_keys_configured_says_how_to_add_one() {
    let up = FakeUpstream::json(200, r#"{"ok":true}"#);
    let mut gw = Gateway::new(&Config::new(up.base_url()));
    gw.add_api_key("primary", ACCOUNT_KEY);
    gw.start();

    for headers in [vec![("x-api-key", "lgw_made_up_key")], vec![]] {
        let resp = post_message(gw.addr(), &headers);
        let v = assert_error(&resp, 401, Some("authentication_error"));
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("add-client-key"),
            "message should point to add-client-key: {message}"
        );
    }
    assert!(up.requests().is_empty());
}

#[test]
fn sse_is_forwarded_event_by_event() {
    let events = sse_events(16);
    let (gate_tx, gate_rx) = mpsc::channel();
    let mut gate = Some(gate_rx);
    let scripted = events.clone();
    let up = FakeUpstream::start(move |_| Reply::Sse {
        events: scripted.clone(),
        gate: gate.take(),
        framing: Framing::Chunked,
    });
    let gw = Gateway::started(&Config::new(up.base_url()));

    let mut conn = Conn::open(gw.addr());
    conn.send(&request_bytes(
        "POST",
        "/v1/messages?beta=true",
        &[
            gw.auth(),
            ("content-type", "application/json"),
            ("connection", "close"),
        ],
        STREAM_BODY.as_bytes(),
    ));
    let (status, headers) = conn.read_head();
    assert_eq!(status, 200);
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(header("content-type").as_deref(), Some("text/event-stream"));
    assert_eq!(header("transfer-encoding").as_deref(), Some("chunked"));
    assert_eq!(header("request-id").as_deref(), Some("req_sse_stream"));
    let mut sse = conn.into_sse(&headers);

    // The upstream writes event i+1 only after the gate opens, and the gate opens only
    // after event i reached the client: so each event provably arrived on its own.
    let mut arrivals = Vec::new();
    let mut received = String::new();
    for (i, sent) in events.iter().enumerate() {
        let ev = sse
            .next_event()
            .unwrap_or_else(|| panic!("stream ended before event {i}: {:?}", sse.end()));
        assert_eq!(&ev.raw, sent, "event {i}");
        received.push_str(&ev.raw);
        arrivals.push(ev.at);
        if i + 1 < events.len() {
            gate_tx.send(()).expect("upstream waits on the gate");
        }
    }
    let extra = sse.next_event().map(|e| e.raw);
    assert_eq!(extra, None, "nothing after message_stop");
    assert_eq!(sse.end(), Some(&StreamEnd::Clean));
    assert_eq!(
        received,
        events.concat(),
        "downstream bytes equal upstream bytes"
    );

    let written = up.sse_write_times();
    assert_eq!(written.len(), events.len());
    let mut delays: Vec<Duration> = arrivals
        .iter()
        .zip(&written)
        .map(|(got, sent)| got.saturating_duration_since(*sent))
        .collect();
    delays.sort();
    eprintln!(
        "SSE per-event delay (upstream write -> client arrival) over {} events: p50 {:?}, max {:?}",
        delays.len(),
        delays[delays.len() / 2],
        delays[delays.len() - 1]
    );
}

/// A gateway on `up`, and the event stream of a `STREAM_BODY` request through it.
fn stream_through(up: &FakeUpstream) -> (Gateway, SseStream) {
    let gw = Gateway::started(&Config::new(up.base_url()));
    let sse = open_sse(
        gw.addr(),
        "/v1/messages",
        &[gw.auth(), ("connection", "close")],
        STREAM_BODY.as_bytes(),
    );
    (gw, sse)
}

#[test]
fn sse_from_close_delimited_upstream_is_forwarded_whole() {
    let events = sse_events(3);
    let scripted = events.clone();
    let up = FakeUpstream::start(move |_| Reply::Sse {
        events: scripted.clone(),
        gate: None,
        framing: Framing::CloseDelimited,
    });
    let (_gw, mut sse) = stream_through(&up);
    let mut received = String::new();
    while let Some(ev) = sse.next_event() {
        received.push_str(&ev.raw);
    }
    assert_eq!(
        received,
        events.concat(),
        "a complete stream passes unchanged, no error added"
    );
    assert_eq!(sse.end(), Some(&StreamEnd::Clean));
}

/// Streams `reply` through a gateway and checks the client sees `sent` then one `event: error`, then a clean end.
fn assert_truncated_stream_reports_error(
    sent: &[String],
    reply: impl Fn() -> Reply + Send + 'static,
) {
    let up = FakeUpstream::start(move |_| reply());
    let (_gw, mut sse) = stream_through(&up);
    sse.assert_events_then_error(sent);
}

#[test]
fn upstream_breaking_mid_stream_ends_with_error_event() {
    let events = sse_events(2)[..4].to_vec();
    let scripted = events.clone();
    assert_truncated_stream_reports_error(&events, move || Reply::BreakMidStream {
        events: scripted.clone(),
    });
}

#[test]
fn stream_without_message_stop_ends_with_error_event() {
    let all = sse_events(2);
    let events = all[..all.len() - 1].to_vec();
    let chunked = events.clone();
    assert_truncated_stream_reports_error(&events, move || Reply::Sse {
        events: chunked.clone(),
        gate: None,
        framing: Framing::Chunked,
    });
    let closed = events.clone();
    assert_truncated_stream_reports_error(&events, move || Reply::Sse {
        events: closed.clone(),
        gate: None,
        framing: Framing::CloseDelimited,
    });
}

#[test]
fn upstream_error_status_passes_through() {
    let cases = [
        (
            429,
            vec![
                ("retry-after", "7"),
                ("anthropic-ratelimit-requests-remaining", "0"),
            ],
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"},"request_id":"req_429"}"#,
        ),
        (
            529,
            vec![("request-id", "req_529")],
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_529"}"#,
        ),
    ];
    for (status, headers, body) in cases {
        let owned: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        let up = FakeUpstream::start(move |_| Reply::Json {
            status,
            headers: owned.clone(),
            body: body.as_bytes().to_vec(),
        });
        let gw = Gateway::started(&Config::new(up.base_url()));
        let resp = post_message(gw.addr(), &[gw.auth()]);
        assert_eq!(resp.status, status, "body: {}", resp.text());
        assert_eq!(resp.text(), body, "status {status} body passes unchanged");
        for (name, value) in headers {
            assert_eq!(
                resp.header(name),
                Some(value),
                "status {status} header {name}"
            );
        }
    }
}

#[test]
fn models_and_count_tokens_are_forwarded() {
    let up = FakeUpstream::start(|req| {
        let body = match req.target.as_str() {
            "/v1/models?limit=5" => {
                r#"{"data":[{"id":"claude-sonnet-4-5","type":"model"}],"has_more":false}"#
            }
            "/v1/models/claude-sonnet-4-5" => r#"{"id":"claude-sonnet-4-5","type":"model"}"#,
            "/v1/messages/count_tokens" => r#"{"input_tokens":12}"#,
            _ => r#"{"unexpected":true}"#,
        };
        Reply::json(200, body)
    });
    let gw = Gateway::started(&Config::new(up.base_url()));

    // With anthropic-version, the model endpoints pass through in Anthropic's shape.
    let anthropic = ("anthropic-version", "2023-06-01");
    let list = call(
        gw.addr(),
        "GET",
        "/v1/models?limit=5",
        &[gw.auth(), anthropic],
        b"",
    );
    assert_eq!(list.status, 200);
    assert_eq!(list.json()["data"][0]["id"], "claude-sonnet-4-5");
    let one = call(
        gw.addr(),
        "GET",
        "/v1/models/claude-sonnet-4-5",
        &[gw.auth(), anthropic],
        b"",
    );
    assert_eq!(one.text(), r#"{"id":"claude-sonnet-4-5","type":"model"}"#);
    let count_body =
        r#"{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"how many"}]}"#;
    let count = call(
        gw.addr(),
        "POST",
        "/v1/messages/count_tokens",
        &[gw.auth()],
        count_body.as_bytes(),
    );
    assert_eq!(count.text(), r#"{"input_tokens":12}"#);

    let reqs = up.requests();
    let seen: Vec<(&str, &str)> = reqs
        .iter()
        .map(|r| (r.method.as_str(), r.target.as_str()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("GET", "/v1/models?limit=5"),
            ("GET", "/v1/models/claude-sonnet-4-5"),
            ("POST", "/v1/messages/count_tokens"),
        ]
    );
    assert!(reqs[0].body.is_empty() && reqs[1].body.is_empty());
    assert_eq!(reqs[2].body, count_body.as_bytes());
    for req in &reqs {
        assert_clean_credentials(req, gw.client_key());
    }
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let up = FakeUpstream::json(200, r#"{"id":"msg_keepalive"}"#);
    let gw = Gateway::started(&Config::new(up.base_url()));
    let mut conn = Conn::open(gw.addr());

    conn.send(&message_request(&[gw.auth()]));
    let first = conn.read_response();
    assert_eq!(first.status, 200);
    assert_eq!(first.text(), r#"{"id":"msg_keepalive"}"#);
    assert_ne!(
        first.header("connection"),
        Some("close"),
        "HTTP/1.1 keeps the connection"
    );

    conn.send(&request_bytes("GET", "/health", &[], b""));
    assert_eq!(conn.read_response().status, 200);

    conn.send(&message_request(&[gw.auth(), ("connection", "close")]));
    let third = conn.read_response();
    assert_eq!(third.status, 200);
    assert_eq!(third.text(), r#"{"id":"msg_keepalive"}"#);
    assert_eq!(up.requests().len(), 2);
}

#[test]
fn chunked_request_body_is_forwarded_dechunked() {
    let (up, gw) = ok_upstream_and_gateway();
    let (a, b) = MESSAGE_BODY.split_at(20);
    let (b, c) = b.split_at(30);
    let mut raw = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: gateway.test\r\nx-api-key: {}\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
        gw.client_key()
    );
    for part in [a, b, c] {
        raw.push_str(&format!("{:x};ext=1\r\n{part}\r\n", part.len()));
    }
    raw.push_str("0\r\n\r\n");

    let mut conn = Conn::open(gw.addr());
    conn.send(raw.as_bytes());
    let resp = conn.read_response();

    assert_message_forwarded(&resp, &up);
}

#[test]
fn expect_100_continue_is_honoured() {
    let (up, gw) = ok_upstream_and_gateway();
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: gateway.test\r\nx-api-key: {}\r\n\
         expect: 100-continue\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        gw.client_key(),
        MESSAGE_BODY.len()
    );
    let mut conn = Conn::open(gw.addr());
    conn.send(head.as_bytes());
    let (status, _) = conn.read_head();
    assert_eq!(
        status, 100,
        "gateway should invite the body with 100 Continue"
    );
    conn.send(MESSAGE_BODY.as_bytes());
    let resp = conn.read_response();

    assert_message_forwarded(&resp, &up);
}
