//! Trust boundaries, part 3 (README: Reliability): the upstream cannot exhaust the gateway.
//! An event that never ends is cut at `upstream.max_event_bytes` with an error, and memory
//! stays flat; answers that have no body (204, 304) are relayed without one and a 101 is a
//! 502; the upstream's request id travels as `request-id`; and whatever the upstream echoes
//! of the account's key, no client sees it.

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

use crate::oauth::rig::Rig;
use crate::support::{
    Config, Conn, FakeUpstream, Gateway, RawUpstream, Reply, Response, Script, Seen, call,
    proc_status, request_bytes, sse_events,
};

/// The account key every case here uses: long enough to be looked for.
const KEY: &str = "sk-ant-api03-ExhaustTestsAccountKey-0123456789abcdef";
const STREAM_BODY: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":16,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
const PLAIN_BODY: &str =
    r#"{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#;
const SSE_HEAD: &str =
    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";

fn gateway(up: &RawUpstream, extra: &str) -> Gateway {
    let mut gw = Gateway::new(&Config::new(up.base_url()).section(extra));
    gw.add_api_key("only", KEY);
    gw.add_client_key("tests");
    gw.start();
    gw
}

/// Writes a whole response and closes, draining what the gateway still sends.
fn answer(mut stream: TcpStream, bytes: &[u8]) {
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 1024];
    while matches!(std::io::Read::read(&mut stream, &mut sink), Ok(n) if n > 0) {}
}

fn json_response(status: &str, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The gateway's peak resident memory so far, in KiB.
fn peak_kib(gw: &Gateway) -> u64 {
    proc_status(gw.pid(), "VmHWM")
}

#[test]
fn an_event_that_never_ends_is_cut_at_the_limit_with_an_error_and_memory_stays_flat() {
    // The upstream opens an event and sends 96 MiB of one data line that never ends. The
    // client gets an error in its format after at most `max_event_bytes` were held, the
    // connection closes, the upstream's is dropped long before it is done, and the gateway's
    // peak memory grows by a few MiB at most.
    const TOTAL: usize = 96 << 20;
    let written = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&written);
    let up = RawUpstream::start(move |_seen: Seen, mut stream| {
        let _ = stream.write_all(SSE_HEAD.as_bytes());
        let _ = stream.write_all(b"event: content_block_delta\ndata: {\"text\":\"");
        let piece = vec![b'a'; 64 << 10];
        let mut sent = 0;
        while sent < TOTAL && stream.write_all(&piece).is_ok() {
            sent += piece.len();
        }
        counted.store(sent, Ordering::SeqCst);
    });
    let gw = gateway(&up, "");
    // Warm: the first request's allocations are in the baseline.
    for (path, body) in [
        ("/v1/messages", PLAIN_BODY),
        ("/v1/chat/completions", PLAIN_BODY),
    ] {
        call(gw.addr(), "POST", path, &[gw.auth()], body.as_bytes());
    }
    for (path, error_marker) in [
        ("/v1/messages", "event: error"),
        ("/v1/chat/completions", "\"error\""),
    ] {
        let before = peak_kib(&gw);
        let mut conn = Conn::open(gw.addr());
        conn.send(&request_bytes(
            "POST",
            path,
            &[gw.auth(), ("content-type", "application/json")],
            STREAM_BODY.as_bytes(),
        ));
        let got = conn.read_until_closed();
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{path}: {text}");
        assert!(
            text.contains(error_marker) && text.contains("max_event_bytes"),
            "{path}: the client is told why the stream ended: {text}"
        );
        assert!(
            got.len() < 64 << 10,
            "{path}: none of the endless event was relayed ({} bytes came)",
            got.len()
        );
        let grew = peak_kib(&gw).saturating_sub(before);
        assert!(
            grew < 16 << 10,
            "{path}: peak memory grew by {grew} KiB for one endless event (limit 1 MiB)"
        );
        crate::support::wait_until(
            "the upstream's writes fail",
            std::time::Duration::from_secs(10),
            || written.load(Ordering::SeqCst) > 0,
        );
        let sent = written.swap(0, Ordering::SeqCst);
        assert!(
            sent < TOTAL / 2,
            "{path}: the gateway kept reading the endless event ({sent} bytes)"
        );
    }
}

/// The upstream's answer for the `x-case` the test sent.
fn bodiless(seen: Seen, stream: TcpStream) {
    let case = seen.header("x-case").unwrap_or_default().to_string();
    let bytes: Vec<u8> = match case.as_str() {
        "204" => b"HTTP/1.1 204 No Content\r\nx-upstream: yes\r\nconnection: close\r\n\r\n".to_vec(),
        "304" => b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\nconnection: close\r\n\r\n".to_vec(),
        "101" => b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nraw bytes of another protocol".to_vec(),
        "both-ids" => json_response(
            "200 OK",
            "request-id: req_upstream_1\r\nx-request-id: upstream-dup\r\n",
            PLAIN_REPLY,
        ),
        "x-id-only" => json_response("200 OK", "x-request-id: upstream-only\r\n", PLAIN_REPLY),
        // Chunked, so it is not read whole before the relay: the converter finds it garbage.
        "garbage" => b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n9\r\n<html>oh!\r\n0\r\n\r\n".to_vec(),
        _ => json_response("200 OK", "", PLAIN_REPLY),
    };
    answer(stream, &bytes);
}

const PLAIN_REPLY: &str = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"ok"}],"stop_reason":"end_turn","usage":{"input_tokens":3,"output_tokens":1}}"#;

/// One request for `case` on a fresh connection, and its answer.
fn one_case(gw: &Gateway, path: &str, case: &str) -> Response {
    call(
        gw.addr(),
        "POST",
        path,
        &[gw.auth(), ("x-case", case)],
        PLAIN_BODY.as_bytes(),
    )
}

/// Sends a request for `case` on `conn`, with a request id of the client's own.
fn send_case(conn: &mut Conn, gw: &Gateway, path: &str, case: &str) {
    send_case_with(
        conn,
        gw,
        path,
        case,
        ("x-request-id", "client-chosen-id"),
        PLAIN_BODY,
    );
}

/// Sends `body` for `case` on `conn`, with one more header.
fn send_case_with(
    conn: &mut Conn,
    gw: &Gateway,
    path: &str,
    case: &str,
    extra: (&str, &str),
    body: &str,
) {
    conn.send(&request_bytes(
        "POST",
        path,
        &[
            gw.auth(),
            ("content-type", "application/json"),
            ("x-case", case),
            extra,
        ],
        body.as_bytes(),
    ));
}

#[test]
fn answers_without_a_body_are_relayed_without_one_and_the_upstream_id_is_request_id() {
    let up = RawUpstream::start(bodiless);
    let gw = gateway(&up, "");
    for case in ["204", "304"] {
        // Keep-alive: a body or a chunked terminator that should not be there would be read as
        // the next response's start.
        let mut conn = Conn::open(gw.addr());
        send_case(&mut conn, &gw, "/v1/messages", case);
        let (status, headers) = conn.read_head();
        assert_eq!(status.to_string(), case, "{headers:?}");
        let has = |name: &str| headers.iter().any(|(n, _)| n == name);
        assert!(
            !has("transfer-encoding") && !has("content-length"),
            "{case}: no framing header on an answer without a body: {headers:?}"
        );
        send_case(&mut conn, &gw, "/v1/messages", "plain");
        let next = conn.read_response();
        assert_eq!(next.status, 200, "{case}: the connection is still in step");
        assert_eq!(next.json()["id"], "msg_1");
        // The chat route has no message to convert: a clear 502 in OpenAI's shape.
        let resp = one_case(&gw, "/v1/chat/completions", case);
        assert_eq!(resp.status, 502, "{case} on chat: {}", resp.text());
        assert!(
            resp.json()["error"]["message"].is_string(),
            "{}",
            resp.text()
        );
    }
    // A protocol switch nobody asked for is a 502, not an open tunnel.
    let resp = one_case(&gw, "/v1/messages", "101");
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert!(!resp.text().contains("raw bytes"), "{}", resp.text());

    // An answer that is not JSON is reported as garbage, not as an unreachable upstream.
    let resp = one_case(&gw, "/v1/chat/completions", "garbage");
    assert_eq!(resp.status, 502, "{}", resp.text());
    let message = resp.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        message.starts_with("upstream answered garbage"),
        "{message}"
    );

    // One x-request-id, ours; the upstream's id under Anthropic's name.
    for (case, upstream_id) in [
        ("both-ids", "req_upstream_1"),
        ("x-id-only", "upstream-only"),
    ] {
        let mut conn = Conn::open(gw.addr());
        send_case(&mut conn, &gw, "/v1/messages", case);
        let resp = conn.read_response();
        assert_eq!(resp.status, 200);
        let ids: Vec<&str> = (resp.headers.iter())
            .filter(|(n, _)| n == "x-request-id")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(ids, ["client-chosen-id"], "{case}: {:?}", resp.headers);
        let request_ids: Vec<&str> = (resp.headers.iter())
            .filter(|(n, _)| n == "request-id")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(request_ids, [upstream_id], "{case}: {:?}", resp.headers);
    }
}

/// An upstream that quotes the key it was sent wherever `x-case` says.
fn echoing(seen: Seen, stream: TcpStream) {
    let key = seen.api_key.clone();
    let case = seen.header("x-case").unwrap_or_default().to_string();
    let quoted = format!("the key {key} is not valid here");
    let message = |text: &str| {
        serde_json::json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 3, "output_tokens": 1}})
        .to_string()
    };
    let bytes: Vec<u8> = match case.as_str() {
        "400" => json_response(
            "400 Bad Request",
            &format!("x-echo: {key}\r\n"),
            &serde_json::json!({"type": "error", "error": {"type": "invalid_request_error", "message": quoted}})
                .to_string(),
        ),
        "small" => json_response("200 OK", &format!("x-echo: {key}\r\n"), &message(&quoted)),
        "large" => {
            // Over the size read whole, so it is copied in pieces; the key lands at every
            // offset modulo the copy size, so some copies straddle two pieces.
            let mut text = String::new();
            while text.len() < 600 << 10 {
                text.push_str(&quoted);
                text.push_str(&"x".repeat(text.len() % 97));
            }
            json_response("200 OK", "", &message(&text))
        }
        "chunked" => {
            let body = message(&quoted);
            let cut = body.find(&key).expect("key in body") + key.len() / 2;
            let (a, b) = body.split_at(cut);
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                a.len(),
                b.len()
            )
            .into_bytes()
        }
        _ => {
            let mut events = sse_events(1);
            events.insert(
                2,
                format!(
                    "event: content_block_delta\ndata: {}\n\n",
                    serde_json::json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": quoted}})
                ),
            );
            format!("{SSE_HEAD}{}", events.concat()).into_bytes()
        }
    };
    answer(stream, &bytes);
}

#[test]
fn what_the_upstream_echoes_of_the_key_never_reaches_the_client() {
    let up = RawUpstream::start(echoing);
    let gw = gateway(&up, "");
    for path in ["/v1/messages", "/v1/chat/completions"] {
        for case in ["400", "small", "large", "chunked", "sse"] {
            let body = if case == "sse" {
                STREAM_BODY
            } else {
                PLAIN_BODY
            };
            let mut conn = Conn::open(gw.addr());
            send_case_with(&mut conn, &gw, path, case, ("connection", "close"), body);
            let got = conn.read_until_closed();
            let text = String::from_utf8_lossy(&got);
            assert!(
                !text.contains(KEY) && !text.contains(&KEY[..KEY.len() / 2 + 4]),
                "{path} {case}: the key came back:\n{}",
                &text[..text.len().min(2000)]
            );
            assert!(
                text.contains("the key ") && text.contains("****"),
                "{path} {case}: the rest of what the upstream said still comes, masked:\n{}",
                &text[..text.len().min(2000)]
            );
            if !matches!(case, "sse" | "chunked") {
                // Masked byte for byte: the body is still the JSON it was, of the same length.
                let body = &got[text.find("\r\n\r\n").expect("head") + 4..];
                serde_json::from_slice::<Value>(body)
                    .unwrap_or_else(|e| panic!("{path} {case}: the body is no longer JSON ({e})"));
            }
        }
    }
}

/// A Chat Completions body of `n` tiny messages (every 50th with a content block list) and
/// 100 tools, and its size.
fn tiny_messages(n: usize, chat: bool) -> Vec<u8> {
    let mut body = String::with_capacity(n * 32);
    body.push_str(r#"{"model":"claude-sonnet-4-5","max_tokens":16,"messages":["#);
    for i in 0..n {
        if i > 0 {
            body.push(',');
        }
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        if i % 50 == 0 {
            body.push_str(&format!(
                r#"{{"role":"{role}","content":[{{"type":"text","text":"y"}}]}}"#
            ));
        } else {
            body.push_str(&format!(r#"{{"role":"{role}","content":"x"}}"#));
        }
    }
    body.push_str(r#"],"tools":["#);
    for i in 0..100 {
        if i > 0 {
            body.push(',');
        }
        if chat {
            body.push_str(&format!(
                r#"{{"type":"function","function":{{"name":"t{i}","parameters":{{"type":"object"}}}}}}"#
            ));
        } else {
            body.push_str(&format!(
                r#"{{"name":"t{i}","input_schema":{{"type":"object"}}}}"#
            ));
        }
    }
    body.push_str("]}");
    body.into_bytes()
}

/// Posts `body` to `path` and returns the status, with the gateway's peak memory during the
/// request and its resident memory before and after, in KiB.
fn measured_post(gw: &Gateway, path: &str, body: &[u8]) -> (u16, u64, u64, u64) {
    let before = proc_status(gw.pid(), "VmRSS");
    // The peak so far is reset where the kernel allows it (clear_refs 5), so the peak read
    // after is this request's.
    let _ = std::fs::write(format!("/proc/{}/clear_refs", gw.pid()), "5");
    let mut conn = Conn::open_waiting(gw.addr(), std::time::Duration::from_secs(120));
    conn.send(&request_bytes(
        "POST",
        path,
        &[
            gw.auth(),
            ("content-type", "application/json"),
            ("connection", "close"),
        ],
        body,
    ));
    let status = conn.read_response().status;
    let peak = peak_kib(gw);
    let after = proc_status(gw.pid(), "VmRSS");
    (status, peak, before, after)
}

#[test]
fn a_body_of_a_million_tiny_messages_costs_a_small_multiple_of_its_size() {
    // A 32 MiB Chat Completions body of a million tiny messages, converted; and the same as a
    // Messages body through an OAuth account, whose system prompt is spliced in. Each costs
    // at most four times the body at its peak, and the memory is returned afterwards.
    const LIMIT: usize = 32 << 20;
    let seen = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&seen);
    let up = RawUpstream::start(move |seen: Seen, stream| {
        counted.fetch_add(1, Ordering::SeqCst);
        let _ = seen;
        answer(stream, &json_response("200 OK", "", PLAIN_REPLY));
    });
    let mut gw = Gateway::new(
        &Config::new(up.base_url())
            .server("max_body_bytes", &LIMIT.to_string())
            .body_timeout("60s"),
    );
    gw.add_api_key("only", KEY);
    gw.add_client_key("tests");
    gw.start();
    call(
        gw.addr(),
        "POST",
        "/v1/chat/completions",
        &[gw.auth()],
        PLAIN_BODY.as_bytes(),
    );

    let body = tiny_messages(1_000_000, true);
    assert!(
        body.len() <= LIMIT && body.len() > LIMIT * 9 / 10,
        "{}",
        body.len()
    );
    let (status, peak, before, after) = measured_post(&gw, "/v1/chat/completions", &body);
    assert_eq!(status, 200);
    assert_eq!(
        seen.load(Ordering::SeqCst),
        2,
        "the converted body went upstream"
    );
    assert_small_multiple("chat", "converting", body.len(), (peak, before, after));

    // Through an OAuth account: the system prompt is spliced into the raw bytes.
    let up = FakeUpstream::start(|req| {
        let prompt = format!(r#""system":[{{"type":"text","text":"{PROMPT}"}}]"#);
        let spliced = String::from_utf8_lossy(&req.body).contains(&prompt);
        Reply::json(if spliced { 200 } else { 500 }, PLAIN_REPLY)
    });
    let mut rig = Rig::new(Script::default(), up, |c| {
        c.server("max_body_bytes", &LIMIT.to_string())
            .body_timeout("60s")
            .oauth("system_prompt", PROMPT)
    });
    rig.login("carrier");
    rig.gw.start();
    let body = tiny_messages(1_000_000, false);
    let (status, peak, before, after) = measured_post(&rig.gw, "/v1/messages", &body);
    assert_eq!(status, 200, "the prompt was spliced in first");
    assert_small_multiple(
        "oauth",
        "injecting the prompt into",
        body.len(),
        (peak, before, after),
    );
    rig.assert_no_leaks(&[]);
}

/// A body of `len` bytes cost the gateway at most four times its size at the peak, and the
/// memory came back: within a quarter of its size of where it was (`rss` is the peak, before
/// and after, in KiB). `doing` says what the gateway did with the body.
fn assert_small_multiple(what: &str, doing: &str, len: usize, rss: (u64, u64, u64)) {
    let (peak, before, after) = rss;
    let body_kib = len as u64 / 1024;
    assert!(
        peak.saturating_sub(before) <= 4 * body_kib,
        "{doing} a {body_kib} KiB body took the gateway from {before} KiB to a peak of {peak} KiB"
    );
    assert!(
        after <= before + body_kib / 4,
        "memory is returned: {after} KiB after, {before} KiB before"
    );
    eprintln!(
        "{what}: {body_kib} KiB body, {before} KiB before, peak {peak} KiB, {after} KiB after"
    );
}

const PROMPT: &str = "You are the exhaust test's prompt.";
