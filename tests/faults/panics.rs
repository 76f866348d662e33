//! The process survives its own faults (README: Reliability). Panics are injected through
//! `LLM_GATEWAY_PANIC`, which debug builds (what `cargo test` builds) honour: a panic while
//! serving costs its request a 500 (or, mid-answer, its connection) and never a pool slot; a
//! long-lived thread that panics is restarted and works again; one that keeps dying shows in
//! status and fails `/ready`, except the shared-state probe.

use std::time::Duration;

use serde_json::Value;

use crate::support::accounts::{admin_status, poll_until, post_body};
use crate::support::redis::RedisServer;
use crate::support::{
    ACCOUNT_KEY, Config, Conn, FakeUpstream, Framing, Gateway, MESSAGE_BODY, Meeting, Reply, call,
    in_parallel, post_message, request_bytes, sse_events,
};

const STREAM_BODY: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":16,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
const CHAT_BODY: &str =
    r#"{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"hi"}]}"#;
const OK: &str = r#"{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"text","text":"ok"}],"usage":{"input_tokens":3,"output_tokens":1}}"#;
/// Long enough for a supervisor's first restarts (100, 200, 400 ms) on a busy machine.
const RESTARTS: Duration = Duration::from_secs(10);

fn gateway(up: &FakeUpstream, panic: &str, workers: usize, extra: &str) -> Gateway {
    let mut gw = Gateway::new(
        &Config::new(up.base_url())
            .workers(workers)
            .admin_listen("127.0.0.1:0")
            .section(extra),
    );
    gw.env("LLM_GATEWAY_PANIC", panic);
    gw.add_api_key("only", ACCOUNT_KEY);
    gw.add_client_key("tests");
    gw.start();
    gw
}

fn metric(gw: &Gateway, line: &str) -> Option<u64> {
    let text = call(gw.admin_addr(), "GET", "/metrics", &[], b"").text();
    text.lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
}

fn thread(gw: &Gateway, name: &str) -> Value {
    admin_status(gw)["supervised"]["threads"][name].clone()
}

#[test]
fn a_panic_while_serving_is_a_500_and_the_pool_keeps_its_strength() {
    // Six requests panic, three times the pool's two workers; then both workers serve two
    // requests at once, and a stream whose relay panics after its first event is cut (its
    // chunked body never terminated) while the next stream is whole.
    let meeting = Meeting::new(2, Duration::from_secs(10));
    let held = meeting.clone();
    let up = FakeUpstream::start(move |req| {
        if String::from_utf8_lossy(&req.body).contains(r#""stream":true"#) {
            Reply::Sse {
                events: sse_events(3),
                gate: None,
                framing: Framing::Chunked,
            }
        } else if req.header("x-together").is_some() {
            Reply::Held {
                meeting: held.clone(),
                then: Box::new(Reply::json(200, OK)),
            }
        } else {
            Reply::json(200, OK)
        }
    });
    let gw = gateway(&up, "request=6,relay=1", 2, "");
    for i in 0..6 {
        let (path, body) = if i % 2 == 0 {
            ("/v1/messages", MESSAGE_BODY)
        } else {
            ("/v1/chat/completions", CHAT_BODY)
        };
        let resp = call(gw.addr(), "POST", path, &[gw.auth()], body.as_bytes());
        assert_eq!(resp.status, 500, "request {i}: {}", resp.text());
        let v = resp.json();
        let message = if path == "/v1/messages" {
            assert_eq!(v["type"], "error", "Anthropic's shape: {v}");
            &v["error"]["message"]
        } else {
            assert!(v["error"]["type"].is_string(), "OpenAI's shape: {v}");
            &v["error"]["message"]
        };
        assert!(
            message.as_str().is_some_and(|m| m.contains("failed")),
            "{v}"
        );
    }
    assert!(up.requests().is_empty(), "nothing went upstream");

    // Both workers, at once: each request waits upstream until the other has arrived.
    let together = in_parallel(2, |_| {
        post_message(gw.addr(), &[gw.auth(), ("x-together", "1")]).status
    });
    assert_eq!(together, [200, 200], "the pool is at full strength");
    assert_eq!(meeting.arrived(), 2);

    // A panic after the first byte: the connection is closed, the body never ends.
    let stream = |what: &str| {
        let mut conn = Conn::open(gw.addr());
        conn.send(&request_bytes(
            "POST",
            "/v1/messages",
            &[
                gw.auth(),
                ("content-type", "application/json"),
                ("connection", "close"),
            ],
            STREAM_BODY.as_bytes(),
        ));
        let got = String::from_utf8_lossy(&conn.read_until_closed()).into_owned();
        assert!(got.starts_with("HTTP/1.1 200"), "{what}: {got}");
        got
    };
    let cut = stream("the relay panics");
    assert!(
        !cut.ends_with("0\r\n\r\n"),
        "a cut body is not a complete one: {cut}"
    );
    let whole = stream("the next stream");
    assert!(
        whole.contains("message_stop") && whole.ends_with("0\r\n\r\n"),
        "{whole}"
    );

    assert_eq!(
        metric(&gw, "llm_gateway_panics_total{thread=\"connection\"}"),
        Some(7)
    );
    let status = admin_status(&gw);
    assert_eq!(status["supervised"]["connection_panics"], 7, "{status}");
    assert_eq!(status["workers"]["max"], 2, "{status}");
    assert!(
        gw.stderr().contains("panic in thread worker")
            && gw.stderr().contains("injected at request"),
        "each panic is logged: {}",
        gw.stderr()
    );
}

#[test]
fn every_long_lived_thread_restarts_after_a_panic_and_works_again() {
    // The accept loop, config watcher, refresher, ledger flusher and signal handler each
    // panic once or twice; each is restarted, /ready stays 200, and each does its work: the
    // server accepts, applies a new key, counts usage and reloads on SIGHUP.
    let up = FakeUpstream::json(200, OK);
    let mut gw = gateway(
        &up,
        "accept=1,config-watch=2,oauth-refresh=2,usage-ledger=2,signals=1",
        4,
        "usage:\n  flush_interval: 200ms\n",
    );
    for (name, panics) in [
        ("config-watch", 2),
        ("oauth-refresh", 2),
        ("usage-ledger", 2),
        ("signals", 1),
    ] {
        poll_until(RESTARTS, &format!("{name} restarted"), || {
            thread(&gw, name)["panics"] == panics
        });
    }
    // The first connection the accept loop took was dropped by its panic; later ones serve.
    let _ = std::net::TcpStream::connect(gw.addr()).map(|s| {
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = std::io::Read::read(&mut &s, &mut [0u8; 16]);
    });
    poll_until(RESTARTS, "the accept loop restarted", || {
        thread(&gw, "accept")["panics"] == 1
    });
    let resp = post_body(&gw, MESSAGE_BODY);
    assert_eq!(resp.status, 200, "accepting again: {}", resp.text());
    let ready = call(gw.admin_addr(), "GET", "/ready", &[], b"");
    assert_eq!(
        ready.status,
        200,
        "restarted threads are fine: {}",
        ready.text()
    );
    for name in [
        "accept",
        "config-watch",
        "oauth-refresh",
        "usage-ledger",
        "signals",
    ] {
        assert_eq!(thread(&gw, name)["state"], "running", "{name}");
    }

    // The watcher applies a key added now.
    let fresh = gw.add_client_key("added-after-the-panics");
    poll_until(RESTARTS, "the new key is honoured", || {
        let resp = post_message(gw.addr(), &[("x-api-key", &fresh)]);
        resp.status == 200
    });
    // The flusher writes usage.
    poll_until(RESTARTS, "usage is flushed", || {
        let out = gw.run_cli(&["usage", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["total"]["requests"].as_u64() >= Some(2)
    });
    // The signal handler takes SIGHUP.
    gw.signal("HUP");
    poll_until(RESTARTS, "SIGHUP reloads", || {
        gw.stderr().contains("SIGHUP: reloading")
    });
    assert_eq!(
        metric(&gw, "llm_gateway_panics_total{thread=\"config-watch\"}"),
        Some(2)
    );
    let admin_url = format!("http://{}", gw.admin_addr());
    let out = gw.run_cli(&["status", "--url", &admin_url]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("thread config-watch: running, 2 panics"),
        "{text}"
    );
}

#[test]
fn a_thread_that_keeps_dying_fails_ready_except_the_shared_state_probe() {
    let up = FakeUpstream::json(200, OK);
    let gw = gateway(&up, "oauth-refresh", 4, "");
    poll_until(RESTARTS, "/ready fails", || {
        call(gw.admin_addr(), "GET", "/ready", &[], b"").status == 503
    });
    let ready = call(gw.admin_addr(), "GET", "/ready", &[], b"").json();
    assert!(
        ready["reason"]
            .as_str()
            .is_some_and(|r| r.contains("oauth-refresh")),
        "{ready}"
    );
    assert_eq!(thread(&gw, "oauth-refresh")["state"], "failing");
    let resp = post_body(&gw, MESSAGE_BODY);
    assert_eq!(
        resp.status,
        200,
        "requests are still served: {}",
        resp.text()
    );

    // The shared-state probe dying is shown, and the instance stays ready.
    let redis = RedisServer::start();
    let state = format!(
        "state:\n  backend: redis\n  redis_url: {}\n  prefix: panics\n  timeout: 250ms\n",
        redis.url()
    );
    let gw = gateway(&up, "shared-state", 4, &state);
    poll_until(RESTARTS, "the probe keeps dying", || {
        thread(&gw, "shared-state")["state"] == "failing"
    });
    let ready = call(gw.admin_addr(), "GET", "/ready", &[], b"");
    assert_eq!(ready.status, 200, "{}", ready.text());
}
