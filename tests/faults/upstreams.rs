//! Broken upstreams (fault suite): an account whose upstream stalls a body, resets mid-event,
//! answers garbage with 200, or trickles one event per 3 s, and an upstream with an untrusted
//! TLS certificate. Refused connections, silence before the head, and clean mid-stream breaks
//! are covered in tests/proxy.rs and tests/balance.rs. Each case checks the client's error in
//! its own format (Anthropic and OpenAI, streaming and not) within the read timeout, the
//! account's state per the failover rules, and that a healthy account keeps serving.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::accounts::{
    KEY_A, KEY_B, account, admin_status, assert_served_by, each_case, poll_until, served_by,
    started, started_ab,
};
use crate::support::{
    Config, Conn, RawUpstream, Response, Seen, baseline, call, relative_limit, request_bytes,
    sse_events,
};

/// The read timeout every case configures; a fault must surface within it plus `MARGIN` (an
/// absolute limit: README's Reliability table promises the error "within the read timeout").
const READ_TIMEOUT: Duration = Duration::from_secs(1);
const MARGIN: Duration = Duration::from_secs(2);

/// What the faulty account's upstream does.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// Headers, part of the body, then silence.
    StallBody,
    /// Headers, half an event (or half a JSON body), then a TCP reset.
    HalfAndReset,
    /// 200 with garbage: an HTML page declared as JSON, or as `text/html` to a stream request.
    Garbage,
    /// A stream of one event per 3 s; a plain answer whose head takes 3 s.
    Slow,
}

const SSE_HEAD: &str =
    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";

/// Holds the connection open until the gateway closes it.
fn hold(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut sink = [0u8; 64];
    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
}

fn healthy(seen: &Seen, mut stream: TcpStream) {
    let bytes = if seen.stream {
        format!("{SSE_HEAD}{}", sse_events(2).concat())
    } else {
        let body = served_by(&seen.api_key);
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let _ = stream.write_all(bytes.as_bytes());
    // One byte of the request is still unread: drain it so the close is a clean FIN.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    hold(stream);
}

fn faulty(fault: Fault, seen: &Seen, mut stream: TcpStream) {
    let events = sse_events(2);
    let json = served_by(KEY_A);
    let json_head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n",
        json.len()
    );
    let mut write = |s: &str| {
        let _ = stream.write_all(s.as_bytes());
        let _ = stream.flush();
    };
    match (fault, seen.stream) {
        (Fault::StallBody, true) => write(&format!("{SSE_HEAD}{}", events[0])),
        (Fault::StallBody, false) => write(&format!("{json_head}{}", &json[..20])),
        (Fault::HalfAndReset, true) => {
            write(&format!("{SSE_HEAD}{}{}", events[0], &events[1][..30]));
            return; // dropped with unread request bytes: a reset
        }
        (Fault::HalfAndReset, false) => {
            write(&format!("{json_head}{}", &json[..20]));
            return;
        }
        (Fault::Garbage, stream_wanted) => {
            let page = "<html><body><h1>502 Bad Gateway</h1></body></html>";
            let ct = if stream_wanted {
                "text/html"
            } else {
                "application/json"
            };
            write(&format!(
                "HTTP/1.1 200 OK\r\ncontent-type: {ct}\r\nconnection: close\r\n\
                 content-length: {}\r\n\r\n{page}",
                page.len()
            ));
        }
        (Fault::Slow, true) => {
            write(SSE_HEAD);
            for event in &events {
                thread::sleep(Duration::from_secs(3)); // the fault itself: a trickle
                write(event);
            }
            return;
        }
        (Fault::Slow, false) => {
            thread::sleep(Duration::from_secs(3)); // the fault itself: a late head
            write(&format!("{json_head}{json}"));
            return;
        }
    }
    hold(stream);
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Api {
    Anthropic,
    OpenAI,
}

#[derive(Debug)]
struct Case {
    fault: Fault,
    api: Api,
    stream: bool,
}

impl Case {
    /// Whether the fault shows before anything could go downstream (so failover applies).
    fn before_first_byte(&self) -> bool {
        !self.stream || self.fault == Fault::Garbage
    }

    /// The status and the words the client's error must carry when it fails before the first byte.
    fn expected(&self) -> (u16, &'static str) {
        match self.fault {
            Fault::StallBody | Fault::Slow => (504, "timed out"),
            Fault::HalfAndReset => (502, "upstream"),
            Fault::Garbage => (502, "garbage"),
        }
    }
}

/// What the client saw: a status and a plain body, or a 200 stream's events.
struct Outcome {
    status: u16,
    body: Option<Response>,
    events: Vec<String>,
    elapsed: Duration,
}

fn send(addr: SocketAddr, key: &str, case: &Case) -> Outcome {
    let stream = if case.stream { r#","stream":true"# } else { "" };
    let (path, auth, body) = match case.api {
        Api::Anthropic => (
            "/v1/messages",
            ("x-api-key", key.to_string()),
            format!(
                r#"{{"model":"claude-sonnet-4-5","max_tokens":16{stream},"messages":[{{"role":"user","content":"{case:?}"}}]}}"#
            ),
        ),
        Api::OpenAI => (
            "/v1/chat/completions",
            ("authorization", format!("Bearer {key}")),
            format!(
                r#"{{"model":"claude-sonnet-4-5","max_tokens":16{stream},"messages":[{{"role":"user","content":"{case:?}"}}]}}"#
            ),
        ),
    };
    let started = Instant::now();
    let mut conn = Conn::open(addr);
    conn.send(&request_bytes(
        "POST",
        path,
        &[
            (auth.0, auth.1.as_str()),
            ("content-type", "application/json"),
            ("connection", "close"),
        ],
        body.as_bytes(),
    ));
    let (status, headers) = conn.read_head();
    let is_sse = headers
        .iter()
        .any(|(n, v)| n == "content-type" && v.starts_with("text/event-stream"));
    if !is_sse {
        let rest = conn.read_until_closed();
        let body = decode_body(&headers, rest);
        return Outcome {
            status,
            body: Some(Response {
                status,
                headers,
                body,
            }),
            events: Vec::new(),
            elapsed: started.elapsed(),
        };
    }
    let mut sse = conn.into_sse(&headers);
    let mut events = Vec::new();
    while let Some(ev) = sse.next_event() {
        events.push(ev.raw);
    }
    Outcome {
        status,
        body: None,
        events,
        elapsed: started.elapsed(),
    }
}

/// Undoes chunked framing, if any.
fn decode_body(headers: &[(String, String)], raw: Vec<u8>) -> Vec<u8> {
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    if !chunked {
        return raw;
    }
    let mut out = Vec::new();
    let mut rest = &raw[..];
    while let Some(pos) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..pos]).trim(), 16)
            .expect("chunk size");
        if size == 0 {
            break;
        }
        out.extend_from_slice(&rest[pos + 2..pos + 2 + size]);
        rest = &rest[pos + 4 + size..];
    }
    out
}

/// Checks an error body in the API's own shape and returns its message.
fn error_message(api: Api, resp: &Response) -> String {
    let v: Value = resp.json();
    match api {
        Api::Anthropic => {
            assert_eq!(v["type"], "error", "{v}");
            assert_eq!(v["error"]["type"], "api_error", "{v}");
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        }
        Api::OpenAI => {
            assert_eq!(v["error"]["type"], "server_error", "{v}");
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        }
    }
}

/// Checks that a stream ends with an error event in the API's own shape.
fn assert_stream_ends_in_error(api: Api, events: &[String]) {
    let last = events.last().expect("at least one event");
    match api {
        Api::Anthropic => {
            assert!(
                last.starts_with("event: error\n"),
                "last event is not an error: {events:?}"
            );
            let data = last
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .expect("data");
            let v: Value = serde_json::from_str(data).expect("error data is JSON");
            assert_eq!(v["type"], "error", "{v}");
            assert_eq!(v["error"]["type"], "api_error", "{v}");
        }
        Api::OpenAI => {
            assert!(
                events.iter().all(|e| !e.contains("[DONE]")),
                "a broken stream must not end with [DONE]: {events:?}"
            );
            let data = last
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .expect("data");
            let v: Value = serde_json::from_str(data).expect("error data is JSON");
            assert_eq!(v["error"]["type"], "server_error", "{v}");
        }
    }
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for fault in [
        Fault::StallBody,
        Fault::HalfAndReset,
        Fault::Garbage,
        Fault::Slow,
    ] {
        for api in [Api::Anthropic, Api::OpenAI] {
            for stream in [false, true] {
                cases.push(Case { fault, api, stream });
            }
        }
    }
    cases
}

fn config(base_url: String) -> Config {
    Config::new(base_url)
        .read_timeout("1s")
        .admin_listen("127.0.0.1:0")
        .section("balance:\n  eject_after: 1\n  eject_cooldown: 60s\n")
}

#[test]
fn broken_upstream_answers_become_precise_errors_or_failover_while_a_healthy_account_serves() {
    // Every fault reaches the client as an error in its own API's format within the read
    // timeout (or, before the first byte, fails over to the healthy account), ejects the faulty
    // account per `eject_after`, and the healthy account keeps serving.
    each_case(&cases(), |case| {
        let fault = case.fault;
        let up = RawUpstream::start(move |seen, stream| {
            if seen.api_key == KEY_A {
                faulty(fault, &seen, stream);
            } else {
                healthy(&seen, stream);
            }
        });

        // Alone: the faulty account is all there is, so the client sees the fault.
        let (alone, _) = started(&config(up.base_url()), &[("a", KEY_A, &[])]);
        let seen = send(alone.addr(), alone.client_key(), case);
        assert!(
            seen.elapsed <= READ_TIMEOUT + MARGIN,
            "alone: took {:?}",
            seen.elapsed
        );
        if case.before_first_byte() {
            let (status, words) = case.expected();
            assert_eq!(seen.status, status, "alone: {:?}", seen.body);
            let body = seen.body.as_ref().expect("a plain error body");
            let message = error_message(case.api, body);
            assert!(
                message.contains(words),
                "alone: {message:?} lacks {words:?}"
            );
        } else {
            assert_eq!(seen.status, 200, "alone: the stream had started");
            assert_stream_ends_in_error(case.api, &seen.events);
        }

        // Paired with a healthy backup: before the first byte the request fails over.
        let (gw, ids) = started(
            &config(up.base_url()),
            &[("a", KEY_A, &[]), ("b", KEY_B, &["--priority", "1"])],
        );
        let seen = send(gw.addr(), gw.client_key(), case);
        assert!(
            seen.elapsed <= READ_TIMEOUT + MARGIN,
            "paired: took {:?}",
            seen.elapsed
        );
        assert_eq!(seen.status, 200, "paired: {:?}", seen.body);
        if case.before_first_byte() {
            if case.stream {
                assert!(
                    seen.events.iter().all(|e| !e.contains("error")),
                    "failover gives a clean stream: {:?}",
                    seen.events
                );
            } else {
                let text = seen.body.as_ref().expect("body").text();
                match case.api {
                    Api::Anthropic => assert_eq!(text, served_by(KEY_B)),
                    Api::OpenAI => assert!(text.contains("chat.completion"), "{text}"),
                }
            }
        } else {
            assert_stream_ends_in_error(case.api, &seen.events);
        }
        // The faulty account rests (eject_after: 1); the stream's failure is counted as the
        // relay ends, just after the client's last byte.
        poll_until(Duration::from_secs(3), "the faulty account rests", || {
            account(&admin_status(&gw), &ids[0])["state"] == "cooling"
        });
        let view = admin_status(&gw);
        let a = account(&view, &ids[0]);
        assert!(
            a["reason"]
                .as_str()
                .is_some_and(|r| r.contains("ejected after 1 failures")),
            "{a}"
        );
        assert_eq!(account(&view, &ids[1])["state"], "active", "{view}");
        assert_served_by(&gw, KEY_B, "the healthy account keeps serving");
    });
}

#[test]
fn an_untrusted_tls_certificate_is_a_precise_502_without_a_retry_storm() {
    // An upstream whose certificate no root vouches for gets a 502 saying the certificate is
    // not trusted, after one handshake per request (every account shares the address, so
    // failing over could only repeat it), and no account is blamed.
    use std::sync::atomic::{AtomicUsize, Ordering};

    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tls");
    let tls = crate::support::tls_server(&format!("{dir}/cert.pem"), &format!("{dir}/key.pem"));
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind TLS upstream");
    let addr = listener.local_addr().expect("addr");
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&handshakes);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            counter.fetch_add(1, Ordering::SeqCst);
            let Ok(mut conn) = rustls::ServerConnection::new(Arc::clone(&tls)) else {
                continue;
            };
            thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                // The client refuses the certificate; the handshake ends with its alert.
                while conn.is_handshaking() {
                    if conn.complete_io(&mut stream).is_err() {
                        break;
                    }
                }
            });
        }
    });

    let (gw, ids) = started_ab(&config(format!("https://{addr}")));
    // What an answer the gateway makes itself takes here: the refusal, one handshake and no
    // timeout waited out, is relative to it.
    let ordinary = baseline(3, || {
        assert_eq!(call(gw.addr(), "GET", "/health", &[], b"").status, 200);
    });
    for api in [Api::Anthropic, Api::OpenAI] {
        let case = Case {
            fault: Fault::Garbage,
            api,
            stream: false,
        };
        let seen = send(gw.addr(), gw.client_key(), &case);
        assert!(
            seen.elapsed <= relative_limit(ordinary),
            "{api:?}: took {:?}, an answer from the gateway itself {ordinary:?}",
            seen.elapsed
        );
        assert_eq!(seen.status, 502, "{:?}", seen.body);
        let message = error_message(api, seen.body.as_ref().expect("error body"));
        assert!(
            message.contains("certificate is not trusted"),
            "{api:?}: {message}"
        );
    }
    assert_eq!(
        handshakes.load(Ordering::SeqCst),
        2,
        "one handshake per request, no failover"
    );
    let view = admin_status(&gw);
    for id in &ids {
        assert_eq!(account(&view, id)["state"], "active", "{view}");
        assert_eq!(account(&view, id)["failures"], 0, "{view}");
    }
}
