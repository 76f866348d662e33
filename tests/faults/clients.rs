//! Hostile and vanishing clients (brief H2): clients that leave mid-stream, hostile request
//! framing and bodies, slow-loris floods, and running out of file descriptors. Each test says
//! what must stay true, and checks that the gateway is alive and serving afterwards.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{
    Config, Conn, FakeUpstream, Gateway, MESSAGE_BODY, Reply, STEP_TIMEOUT, assert_error, call,
    request_bytes, sse_events, wait_until,
};

const MESSAGES_STREAM: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"count"}]}"#;
const CHAT_STREAM: &str = r#"{"model":"claude-sonnet-4-5","stream":true,"messages":[{"role":"user","content":"count"}]}"#;
const CHAT_BODY: &str =
    r#"{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"hi"}]}"#;

/// A line from `/proc/<pid>/status` (`VmRSS`, `Threads`), as its number.
fn proc_status(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("the gateway process is alive (/proc/<pid>/status readable)");
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn rss_kib(gw: &Gateway) -> u64 {
    proc_status(gw.pid(), "VmRSS")
}

fn threads(gw: &Gateway) -> u64 {
    proc_status(gw.pid(), "Threads")
}

/// The main pool's busy workers, from the admin listener (served by its own pool).
fn busy_workers(gw: &Gateway) -> u64 {
    let resp = call(gw.admin_addr(), "GET", "/admin/status", &[], b"");
    assert_eq!(resp.status, 200, "admin status: {}", resp.text());
    resp.json()["workers"]["busy"]
        .as_u64()
        .unwrap_or_else(|| panic!("workers.busy in {}", resp.text()))
}

/// Asserts the gateway still answers a normal request on `path` with 200.
fn assert_serving(gw: &Gateway, path: &str, body: &str) {
    let resp = call(gw.addr(), "POST", path, &[gw.auth()], body.as_bytes());
    assert_eq!(resp.status, 200, "{path} still served: {}", resp.text());
}

/// An OpenAI-shaped error (`{"error":{"message","type"}}`) with this status.
fn assert_openai_error(resp: &crate::support::Response, status: u16) -> Value {
    assert_eq!(resp.status, status, "status; body: {}", resp.text());
    let v = resp.json();
    assert!(
        v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "OpenAI error shape: {v}"
    );
    assert!(v["error"]["type"].is_string(), "OpenAI error type: {v}");
    assert!(v.get("type").is_none(), "not Anthropic's shape: {v}");
    v
}

/// The gateway's JSON access lines (stderr) whose `path` is `path`.
fn access_lines(gw: &Gateway, path: &str) -> Vec<Value> {
    gw.stderr()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["path"] == path)
        .collect()
}

/// A client that reads the first event of a stream and closes while the upstream is silent:
/// within a second the upstream connection is closed, the worker is free again, and the access
/// line says the client went away. Holds for Anthropic and OpenAI streams; depends on the
/// relay's client watch (250 ms slices), not on `upstream.read_timeout` (30 s here).
#[test]
fn client_leaving_a_silent_stream_frees_worker_and_upstream_within_a_second() {
    let first = sse_events(0).remove(0);
    let up = FakeUpstream::start(move |_| Reply::Stall {
        events: vec![first.clone()],
    });
    let config = Config::new(up.base_url())
        .read_timeout("30s")
        .admin_listen("127.0.0.1:0");
    let gw = Gateway::started(&config);
    let key = gw.client_key().to_string();

    for (round, (path, body)) in [
        ("/v1/messages", MESSAGES_STREAM),
        ("/v1/chat/completions", CHAT_STREAM),
    ]
    .into_iter()
    .enumerate()
    {
        let mut conn = Conn::open(gw.addr());
        conn.send(&request_bytes(
            "POST",
            path,
            &[("x-api-key", &key), ("content-type", "application/json")],
            body.as_bytes(),
        ));
        let (status, headers) = conn.read_head();
        assert_eq!(status, 200, "{path}: stream starts");
        let mut events = conn.into_sse(&headers);
        let event = events.next_event().expect("the first event arrives");
        assert!(event.raw.contains("message_start") || event.raw.contains("chat.completion"));
        assert_eq!(busy_workers(&gw), 1, "{path}: one worker relays the stream");
        drop(events);
        let left = Instant::now();

        wait_until(
            &format!("{path}: the upstream connection closed"),
            Duration::from_secs(5),
            || up.closed_times().len() > round,
        );
        let closed = up.closed_times()[round];
        let after = closed.saturating_duration_since(left);
        assert!(
            after < Duration::from_secs(1),
            "{path}: upstream closed {after:?} after the client left; must be under 1 s"
        );
        wait_until(
            &format!("{path}: the worker is free"),
            Duration::from_secs(1),
            || busy_workers(&gw) == 0,
        );
        wait_until(
            &format!("{path}: an access line saying the client went away"),
            Duration::from_secs(2),
            || {
                access_lines(&gw, path).iter().any(|v| {
                    v.to_string().contains("client went away")
                })
            },
        );
    }
    assert_eq!(up.requests().len(), 2, "one upstream request per stream");
}
