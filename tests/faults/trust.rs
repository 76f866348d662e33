//! Trust boundaries, part 1 (README: Reliability): what a hostile client can reach. No request
//! can disable an account (a ban is decided on the whole upstream message, then confirmed by a
//! probe of the account); only model names reach the upstream's model path; keys are checked
//! from the head, before any body is read; idle and slow clients do not hold workers; one key
//! cannot steer another's sticky pins; bodies with invalid text are refused before they are
//! forwarded; credential headers go nowhere in any spelling; and the CLI and the files it
//! reads keep secrets out of sight.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::accounts::{KEY_A, KEY_B, account, admin_status, poll_until, served_by};
use crate::support::{
    ACCOUNT_KEY, Config, Conn, FakeUpstream, Gateway, MESSAGE_BODY, Recorded, Reply, assert_exit,
    baseline, call, message_request, post_message, printed, relative_limit,
};

const BAN_400: &str = "This organization has been disabled.";
const BAN_403: &str = "OAuth authentication is currently not allowed for this organization.";

fn ban_body(status: u16, message: &str) -> String {
    let kind = if status == 403 {
        "permission_error"
    } else {
        "invalid_request_error"
    };
    serde_json::json!({"type": "error", "error": {"type": kind, "message": message}}).to_string()
}

/// What the real API does with what it does not know: an unknown `anthropic-beta` value and an
/// unknown content tag come back quoted in a 400's message.
fn quoting_upstream_answer(req: &Recorded) -> Option<Reply> {
    const KNOWN_BETAS: [&str; 2] = ["oauth-2025-04-20", "prompt-caching-2024-07-31"];
    for value in req.all("anthropic-beta") {
        for beta in value.split(',').map(str::trim) {
            if !KNOWN_BETAS.contains(&beta) {
                let message = format!(
                    "Unexpected value(s) `{beta}` for the `anthropic-beta` header. Please consult our documentation at docs.anthropic.com or try again without the header."
                );
                return Some(Reply::json(400, &ban_body(400, &message)));
            }
        }
    }
    let body: Value = serde_json::from_slice(&req.body).unwrap_or_default();
    let blocks = body["messages"][0]["content"].as_array().cloned();
    for block in blocks.unwrap_or_default() {
        let tag = block["type"].as_str().unwrap_or("");
        if !["text", "image"].contains(&tag) {
            let message = format!(
                "messages.0.content.0: Input tag '{tag}' found using 'type' does not match any of the expected tags: 'text', 'image'"
            );
            return Some(Reply::json(400, &ban_body(400, &message)));
        }
    }
    None
}

fn messages_to(up: &FakeUpstream, key: &str) -> usize {
    up.requests()
        .iter()
        .filter(|r| r.api_key() == key && r.target.starts_with("/v1/messages"))
        .count()
}

fn probes_of(up: &FakeUpstream, key: &str) -> usize {
    up.requests()
        .iter()
        .filter(|r| r.api_key() == key && r.target.starts_with("/v1/models"))
        .count()
}

fn list_accounts(gw: &Gateway) -> Vec<Value> {
    let out = gw.run_cli(&["list-accounts", "--json"]);
    assert_exit(&out, 0, "list-accounts --json");
    serde_json::from_slice::<Value>(&out.stdout)
        .expect("list-accounts --json prints JSON")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn state_of(gw: &Gateway, id: &str) -> String {
    let rows = list_accounts(gw);
    let row = rows
        .iter()
        .find(|a| a["id"] == id)
        .unwrap_or_else(|| panic!("account {id} not listed: {rows:?}"));
    row["state"].as_str().unwrap_or_default().to_string()
}

/// Two API-key accounts (A preferred: priority 0, B priority 1) and a client key.
fn two_accounts(up: &FakeUpstream, extra: &str) -> (Gateway, String, String) {
    let mut gw = Gateway::new(
        &Config::new(up.base_url())
            .admin_listen("127.0.0.1:0")
            .section(extra),
    );
    let a = gw.add_api_key_with("alpha", KEY_A, &["--priority", "0"]);
    let b = gw.add_api_key_with("bravo", KEY_B, &["--priority", "1"]);
    gw.add_client_key("tests");
    gw.start();
    (gw, a, b)
}

fn post_messages(gw: &Gateway, headers: &[(&str, &str)], body: &str) -> crate::support::Response {
    let mut all = vec![gw.auth(), ("content-type", "application/json")];
    all.extend_from_slice(headers);
    call(gw.addr(), "POST", "/v1/messages", &all, body.as_bytes())
}

/// A client that writes a ban sentence where the upstream quotes the request (a beta header,
/// a content tag, in both ban sentences) gets the upstream's 400 as its own error: no account
/// is disabled or rested, nothing fails over, and no probe is needed, since the message is not
/// the ban sentence itself.
#[test]
fn a_ban_sentence_quoted_back_from_the_request_disables_no_account() {
    let up = FakeUpstream::start(|req| {
        quoting_upstream_answer(req).unwrap_or_else(|| Reply::json(200, &served_by(req.api_key())))
    });
    let (gw, a, b) = two_accounts(&up, "");
    for sentence in [BAN_400, BAN_403] {
        let resp = post_messages(&gw, &[("anthropic-beta", sentence)], MESSAGE_BODY);
        assert_eq!(resp.status, 400, "quoted beta: {}", resp.text());
        assert!(resp.text().contains("anthropic-beta"), "{}", resp.text());
        let body = format!(
            r#"{{"model":"claude-sonnet-4-5","max_tokens":8,"messages":[{{"role":"user","content":[{{"type":"{sentence}","text":"x"}}]}}]}}"#
        );
        let resp = post_messages(&gw, &[], &body);
        assert_eq!(resp.status, 400, "quoted tag: {}", resp.text());
    }
    assert_eq!(messages_to(&up, KEY_A), 4, "every request went to A once");
    assert_eq!(messages_to(&up, KEY_B), 0, "nothing failed over to B");
    assert_eq!(probes_of(&up, KEY_A), 0, "no probe for a quoted sentence");
    for id in [&a, &b] {
        assert_eq!(state_of(&gw, id), "enabled");
    }
    assert!(
        !gw.config_text().contains("disabled_reason"),
        "{}",
        gw.config_text()
    );
    // And the next request is served by A as ever.
    let resp = post_messages(&gw, &[], MESSAGE_BODY);
    assert_eq!(resp.text(), served_by(KEY_A));
}

/// The OAuth-only ban sentence, word for word, from an API-key account is not a ban: that
/// sentence is about OAuth, and such an account has none. The client gets the 403.
#[test]
fn the_oauth_ban_sentence_does_not_disable_an_api_key_account() {
    let up = FakeUpstream::start(|req| {
        if req.api_key() == KEY_A {
            Reply::json(403, &ban_body(403, BAN_403))
        } else {
            Reply::json(200, &served_by(req.api_key()))
        }
    });
    let (gw, a, _) = two_accounts(&up, "");
    let resp = post_messages(&gw, &[], MESSAGE_BODY);
    assert_eq!(resp.status, 403, "{}", resp.text());
    assert_eq!(state_of(&gw, &a), "enabled");
    assert_eq!(messages_to(&up, KEY_B), 0);
    assert_eq!(probes_of(&up, KEY_A), 0);
}

/// A real ban (the ban sentence, and the account's probe answers the same) disables that
/// account only, with its reason, in config.yaml too; the request fails over and is served.
#[test]
fn a_ban_confirmed_by_the_probe_disables_only_the_banned_account() {
    let up = FakeUpstream::start(|req| {
        if req.api_key() == KEY_A {
            Reply::json(400, &ban_body(400, &format!("  {BAN_400}\n")))
        } else {
            Reply::json(200, &served_by(req.api_key()))
        }
    });
    let (gw, a, b) = two_accounts(&up, "");
    let resp = post_messages(&gw, &[], MESSAGE_BODY);
    assert_eq!(resp.status, 200, "failed over: {}", resp.text());
    assert_eq!(resp.text(), served_by(KEY_B));
    assert_eq!(probes_of(&up, KEY_A), 1, "A was probed once");
    let probe = up
        .requests()
        .into_iter()
        .find(|r| r.target.starts_with("/v1/models"))
        .expect("the probe");
    assert_eq!(probe.method, "GET");
    assert!(probe.body.is_empty(), "the probe carries no content");
    assert_eq!(state_of(&gw, &a), "disabled");
    assert_eq!(state_of(&gw, &b), "enabled");
    let rows = list_accounts(&gw);
    let row = rows.iter().find(|r| r["id"] == a.as_str()).expect("A");
    assert_eq!(row["disabled_reason"], BAN_400);
    for _ in 0..3 {
        assert_eq!(post_messages(&gw, &[], MESSAGE_BODY).status, 200);
    }
    assert_eq!(messages_to(&up, KEY_A), 1, "a disabled account is not used");
}

/// The ban sentence whose probe succeeds was the request's doing: the client gets the answer
/// as its own error, nothing fails over, and the account stays in service.
#[test]
fn a_ban_refuted_by_the_probe_is_the_clients_own_error() {
    let up = FakeUpstream::start(|req| match (req.api_key(), req.method.as_str()) {
        (KEY_A, "POST") => Reply::json(400, &ban_body(400, BAN_400)),
        (KEY_A, _) => Reply::json(200, r#"{"data":[],"has_more":false}"#),
        (key, _) => Reply::json(200, &served_by(key)),
    });
    let (gw, a, _) = two_accounts(&up, "");
    let resp = post_messages(&gw, &[], MESSAGE_BODY);
    assert_eq!(resp.status, 400, "{}", resp.text());
    assert_eq!(resp.json()["error"]["message"], BAN_400);
    assert_eq!(probes_of(&up, KEY_A), 1);
    assert_eq!(messages_to(&up, KEY_B), 0, "no failover");
    assert_eq!(state_of(&gw, &a), "enabled");
    let status = admin_status(&gw);
    let row = account(&status, &a);
    assert_eq!(row["state"], "active", "{row}");
}

/// A probe that settles nothing (a 500) rests the account like an ejection and fails the
/// request over; when the rest ends the account is probed again before it serves, and it is
/// disabled only on a confirmed probe.
#[test]
fn an_inconclusive_probe_rests_the_account_and_it_is_probed_again() {
    let probes = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&probes);
    let up = FakeUpstream::start(move |req| match (req.api_key(), req.method.as_str()) {
        (KEY_A, "POST") => Reply::json(400, &ban_body(400, BAN_400)),
        (KEY_A, _) => match seen.fetch_add(1, Ordering::SeqCst) {
            0 => Reply::json(
                500,
                r#"{"type":"error","error":{"type":"api_error","message":"x"}}"#,
            ),
            _ => Reply::json(400, &ban_body(400, BAN_400)),
        },
        (key, _) => Reply::json(200, &served_by(key)),
    });
    let (gw, a, _) = two_accounts(
        &up,
        "balance:\n  eject_cooldown: 1s\n  eject_cooldown_max: 1s\n",
    );
    let resp = post_messages(&gw, &[], MESSAGE_BODY);
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), served_by(KEY_B));
    assert_eq!(probes.load(Ordering::SeqCst), 1);
    assert_eq!(state_of(&gw, &a), "enabled", "not disabled on a 500");
    // While it rests, B serves and A is not probed.
    let resp = post_messages(&gw, &[], MESSAGE_BODY);
    assert_eq!(resp.text(), served_by(KEY_B));
    assert_eq!(probes.load(Ordering::SeqCst), 1, "no probe while it rests");
    // After the rest, the first request that would use A probes it first; the probe now
    // confirms the ban, A is disabled, and the request is served by B.
    poll_until(Duration::from_secs(10), "A probed again", || {
        let resp = post_messages(&gw, &[], MESSAGE_BODY);
        assert_eq!(resp.status, 200, "{}", resp.text());
        probes.load(Ordering::SeqCst) >= 2
    });
    assert_eq!(state_of(&gw, &a), "disabled");
    assert_eq!(
        messages_to(&up, KEY_A),
        1,
        "A was never sent the request again while suspect"
    );
}

/// `/v1/models/{id}` forwards model names only: traversal, encoded separators, control and
/// other bytes get a 4xx made here, and the upstream sees nothing. A query string that is
/// not plain `key=value` text never leaves either.
#[test]
fn only_model_names_reach_the_upstreams_model_path() {
    let up = FakeUpstream::json(200, r#"{"id":"claude-sonnet-4-5","type":"model"}"#);
    let gw = Gateway::started(&Config::new(up.base_url()));
    let version = ("anthropic-version", "2023-06-01");
    for bad in [
        "/v1/models/..",
        "/v1/models/..%2F..%2Fv1%2Fmessages",
        "/v1/models/%2e%2e",
        "/v1/models/a%2fb",
        "/v1/models/a%5Cb",
        "/v1/models/a\\b",
        "/v1/models/claude%00x",
        "/v1/models/claude%0d%0aX-Injected:%201",
        "/v1/models/claude..x",
        "/v1/models/.hidden",
        "/v1/models/claude;x",
        "/v1/models/claude?x=%zz",
        "/v1/models?limit=1%0d%0a",
        "/v1/messages?beta=%ff",
    ] {
        let method = if bad.starts_with("/v1/messages") {
            "POST"
        } else {
            "GET"
        };
        let resp = call(
            gw.addr(),
            method,
            bad,
            &[gw.auth(), version],
            if method == "POST" {
                MESSAGE_BODY.as_bytes()
            } else {
                b""
            },
        );
        assert!(
            resp.status == 400 || resp.status == 404,
            "{bad}: {} {}",
            resp.status,
            resp.text()
        );
    }
    assert!(
        up.requests().is_empty(),
        "forwarded: {:?}",
        up.requests()
            .iter()
            .map(|r| r.target.clone())
            .collect::<Vec<_>>()
    );
    for good in [
        "/v1/models/claude-sonnet-4-5",
        "/v1/models/claude-3-5-sonnet-20241022",
        "/v1/models?limit=5&after_id=claude-x",
    ] {
        let resp = call(gw.addr(), "GET", good, &[gw.auth(), version], b"");
        assert_eq!(resp.status, 200, "{good}: {}", resp.text());
    }
    let targets: Vec<String> = up.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(
        targets,
        [
            "/v1/models/claude-sonnet-4-5",
            "/v1/models/claude-3-5-sonnet-20241022",
            "/v1/models?limit=5&after_id=claude-x"
        ]
    );
}

/// A head that announces a body, sent alone: the answer to it must come without the body.
fn head_only(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> (Conn, Instant) {
    let mut all = headers.to_vec();
    all.push(("content-type", "application/json"));
    all.push(("content-length", "1000000"));
    let mut conn = Conn::open(gw.addr());
    let mut head = format!("POST {path} HTTP/1.1\r\nhost: gw\r\n");
    for (n, v) in &all {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.send(head.as_bytes());
    (conn, Instant::now())
}

/// No key, a wrong key, a revoked or expired one, a key over its rate and one at its
/// concurrency: each gets its refusal from the head alone, before a byte of the body is sent
/// (the body timeout would make it a 408), an `Expect: 100-continue` answered by the refusal
/// and never by `100 Continue`; the connection is closed after it. A refused request whose
/// small body arrived with its head keeps its connection.
#[test]
fn keys_are_checked_from_the_head_before_the_body_is_read() {
    let up = FakeUpstream::start(|req| {
        if String::from_utf8_lossy(&req.body).contains("hold-me") {
            Reply::Hang
        } else {
            Reply::json(200, r#"{"id":"m","type":"message","content":[]}"#)
        }
    });
    let mut gw = Gateway::new(&Config::new(up.base_url()).body_timeout("30s"));
    gw.add_api_key("primary", ACCOUNT_KEY);
    let revoked = gw.add_client_key("revoked");
    let expired = gw.add_client_key("expired");
    let limited = gw.add_client_key("limited");
    let busy = gw.add_client_key("busy");
    let keys = gw.run_cli(&["list-client-keys", "--json"]);
    let keys: Value = serde_json::from_slice(&keys.stdout).expect("json");
    let id_of = |name: &str| {
        keys.as_array()
            .and_then(|k| k.iter().find(|k| k["name"] == name))
            .and_then(|k| k["id"].as_str())
            .expect("key id")
            .to_string()
    };
    for (name, args) in [
        ("revoked", vec!["revoke-client-key"]),
        ("limited", vec!["update-client-key", "--rpm", "1"]),
        ("busy", vec!["update-client-key", "--max-concurrent", "1"]),
    ] {
        let id = id_of(name);
        let mut args = args;
        args.extend(["--key-id", id.as_str()]);
        assert_exit(&gw.run_cli(&args), 0, name);
    }
    // By hand: the CLI refuses an expiry already past.
    gw.expire_client_key(&id_of("expired"), "2020-01-01");
    gw.start();
    // What an ordinary request takes here: "answered from the head" is relative to it.
    let ordinary = baseline(1, || {
        let ok = post_message(gw.addr(), &[("x-api-key", &limited)]);
        assert_eq!(ok.status, 200, "the limited key's first request");
    });
    // The busy key's one slot is held by a request the upstream never answers.
    let addr = gw.addr();
    let held_key = busy.clone();
    let held = thread::spawn(move || {
        let body = MESSAGE_BODY.replace("\"hi\"", "\"hold-me\"");
        call(
            addr,
            "POST",
            "/v1/messages",
            &[("x-api-key", &held_key)],
            body.as_bytes(),
        )
        .status
    });
    poll_until(Duration::from_secs(5), "the held request upstream", || {
        up.requests().len() == 2
    });
    let bearer_expired = format!("Bearer {expired}");
    let cases: Vec<(Vec<(&str, &str)>, u16)> = vec![
        (vec![], 401),
        (vec![("x-api-key", "lgw_wrong")], 401),
        (vec![("x-api-key", revoked.as_str())], 401),
        (vec![("authorization", bearer_expired.as_str())], 401),
        (vec![("x-api-key", limited.as_str())], 429),
        (vec![("x-api-key", busy.as_str())], 429),
    ];
    for (path, expect) in [("/v1/messages", false), ("/v1/chat/completions", true)] {
        for (headers, status) in &cases {
            let mut headers = headers.clone();
            if expect {
                headers.push(("expect", "100-continue"));
            }
            let (mut conn, sent) = head_only(&gw, path, &headers);
            let raw = String::from_utf8_lossy(&conn.read_until_closed()).into_owned();
            assert!(
                raw.starts_with(&format!("HTTP/1.1 {status} ")),
                "{path} {headers:?}: {raw}"
            );
            let took = sent.elapsed();
            assert!(
                took < relative_limit(ordinary),
                "{path} {headers:?}: answered from the head, not after the body: took \
                 {took:?}, an ordinary request {ordinary:?}"
            );
            assert!(raw.contains("connection: close"), "{headers:?}: {raw}");
            assert!(!raw.contains("100 Continue"), "{headers:?}: {raw}");
        }
    }
    assert_eq!(
        up.requests().len(),
        2,
        "only the admitted requests went upstream"
    );
    assert_eq!(held.join().expect("held request"), 504);

    // A small body that came with its head is dropped, not left on the wire: the connection
    // serves the next request.
    let mut conn = Conn::open(gw.addr());
    conn.send(&message_request(&[("x-api-key", "lgw_wrong")]));
    let refused = conn.read_response();
    assert_eq!(refused.status, 401);
    assert_eq!(refused.header("connection"), None, "kept open");
    conn.send(&message_request(&[gw.auth()]));
    assert_eq!(
        conn.read_response().status,
        200,
        "the same connection serves on"
    );
}

/// With every worker held by an idle keep-alive connection, a new connection is served: an
/// idle connection gives its worker up instead of the newcomer being refused.
#[test]
fn an_idle_keep_alive_connection_gives_its_worker_up_to_a_new_one() {
    let up = FakeUpstream::json(200, r#"{"id":"m","type":"message","content":[]}"#);
    let gw = Gateway::started(
        &Config::new(up.base_url())
            .workers(2)
            .server("accept_queue", "0"),
    );
    let idle: Vec<Conn> = (0..2)
        .map(|_| {
            let mut conn = Conn::open(gw.addr());
            conn.send(&message_request(&[gw.auth()]));
            assert_eq!(conn.read_response().status, 200);
            conn
        })
        .collect();
    // A connection is idle once its worker is back waiting for its next request, a moment
    // after the client has its answer: a newcomer in that moment may still be refused, so
    // each is given a few tries (without reclaiming, every try is refused).
    for i in 0..3 {
        let mut last = String::new();
        poll_until(
            Duration::from_secs(5),
            &format!("newcomer {i} served"),
            || {
                let resp = post_message(gw.addr(), &[gw.auth()]);
                last = resp.text();
                resp.status == 200
            },
        );
    }
    drop(idle);
}

/// A body trickled slower than `server.body_min_rate` (after its grace) is cut with 408, though
/// no single pause reaches the body timeout; one at an honest pace above it passes.
#[test]
fn a_body_slower_than_the_minimum_rate_is_cut() {
    let up = FakeUpstream::json(200, r#"{"id":"m","type":"message","content":[]}"#);
    let gw = Gateway::started(
        &Config::new(up.base_url())
            .body_timeout("5s")
            .server("body_min_rate", "2000")
            .server("body_rate_grace", "1s"),
    );
    let trickle = |len: usize, piece: usize, pause: Duration| -> (u16, Duration) {
        let body = format!(
            r#"{{"model":"claude-sonnet-4-5","max_tokens":8,"messages":[{{"role":"user","content":"{}"}}]}}"#,
            "x".repeat(len)
        )
        .into_bytes();
        let mut stream = TcpStream::connect(gw.addr()).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let head = format!(
            "POST /v1/messages HTTP/1.1\r\nhost: gw\r\nx-api-key: {}\r\ncontent-length: {}\r\n\r\n",
            gw.client_key(),
            body.len()
        );
        stream.write_all(head.as_bytes()).expect("head");
        let started = Instant::now();
        let cut = Arc::new(AtomicBool::new(false));
        let writer = stream.try_clone().expect("clone");
        let stop = Arc::clone(&cut);
        let sender = thread::spawn(move || {
            let mut writer = writer;
            for chunk in body.chunks(piece) {
                if stop.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(15) {
                    return;
                }
                if writer.write_all(chunk).is_err() {
                    return;
                }
                thread::sleep(pause);
            }
        });
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&reply).contains("\r\n\r\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => reply.extend_from_slice(&buf[..n]),
            }
        }
        let took = started.elapsed();
        cut.store(true, Ordering::SeqCst);
        let _ = sender.join();
        let text = String::from_utf8_lossy(&reply);
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, took)
    };
    // 20 bytes every 400 ms is 50 B/s: far under 2000 B/s, each pause far under 5 s.
    let (status, took) = trickle(4000, 20, Duration::from_millis(400));
    assert_eq!(status, 408, "a trickled body is cut");
    // Absolute: README's 408 once `body_rate_grace` (1 s here) is over; 10 s leaves a loaded
    // machine room and still fails a gateway that only cuts at the body timeout (the sender
    // gives up at 15 s, then 5 s of silence).
    assert!(took < Duration::from_secs(10), "cut after {took:?}");
    // 1000 bytes every 100 ms is ~10 kB/s: served.
    let (status, _) = trickle(20_000, 1000, Duration::from_millis(100));
    assert_eq!(status, 200, "an honest slow body passes");
}

/// Round-robin over two accounts (A, then B) for two client keys, `one` and `two`, with these
/// `sticky:` settings; the upstream names the account that served.
fn two_keys(sticky: &str) -> (Gateway, FakeUpstream, String, String) {
    let up = FakeUpstream::start(|req| Reply::json(200, &served_by(req.api_key())));
    let mut gw = Gateway::new(
        &Config::new(up.base_url())
            .admin_listen("127.0.0.1:0")
            .section(&format!(
                "balance:\n  strategy: round_robin\nsticky:\n{sticky}"
            )),
    );
    gw.add_api_key("alpha", KEY_A);
    gw.add_api_key("bravo", KEY_B);
    let one = gw.add_client_key("one");
    let two = gw.add_client_key("two");
    gw.start();
    (gw, up, one, two)
}

/// Posts a message for `session` with `key`; the body names the account that served it.
fn post_session(gw: &Gateway, key: &str, session: &str) -> String {
    post_message(gw.addr(), &[("x-api-key", key), ("x-session-id", session)]).text()
}

/// One key's session id does not reach another key's pin: with round-robin over two accounts,
/// key 1's session lands on A and stays there; key 2 sending the same session id gets a pin
/// of its own (B).
#[test]
fn one_key_cannot_use_another_keys_sticky_pin() {
    let (gw, _up, one, two) = two_keys("  enabled: true\n");
    let post = |key: &str, session: &str| post_session(&gw, key, session);
    assert_eq!(post(&one, "shared-session"), served_by(KEY_A));
    assert_eq!(post(&one, "shared-session"), served_by(KEY_A));
    assert_eq!(
        post(&two, "shared-session"),
        served_by(KEY_B),
        "key two got a pin of its own"
    );
    assert_eq!(post(&one, "shared-session"), served_by(KEY_A));
}

/// One key cannot fill the pin table and evict everyone's pins: past its share
/// (`sticky.max_per_key`) its own oldest pins go.
#[test]
fn one_key_cannot_evict_other_keys_pins() {
    let (gw, _up, one, two) = two_keys("  max_entries: 20\n  max_per_key: 4\n");
    let post = |key: &str, session: &str| post_session(&gw, key, session);
    assert_eq!(post(&one, "keep"), served_by(KEY_A));
    for i in 0..60 {
        post(&two, &format!("flood-{i}"));
    }
    // Without its pin, key one's next request would take the round-robin turn (61: B).
    assert_eq!(post(&one, "keep"), served_by(KEY_A), "key one's pin held");
    let status = admin_status(&gw);
    let pins = status["sticky_pins"].as_u64().expect("sticky_pins");
    assert!(pins <= 5, "key two holds at most its share: {pins} pins");
}

/// Invalid UTF-8 or a lone surrogate escape in any string of the body, fields the gateway does
/// not read included, is a 400 naming the problem, on both APIs, and nothing is forwarded; a
/// proper surrogate pair passes.
#[test]
fn bodies_with_invalid_text_are_refused_before_forwarding() {
    let up = FakeUpstream::json(200, r#"{"id":"m","type":"message","content":[]}"#);
    let gw = Gateway::started(&Config::new(up.base_url()));
    let message = |extra: &[u8]| -> Vec<u8> {
        let mut body =
            br#"{"model":"claude-sonnet-4-5","max_tokens":8,"messages":[{"role":"user","content":"hi"}],"x_unread":{"deep":[""#.to_vec();
        body.extend_from_slice(extra);
        body.extend_from_slice(br#""]}}"#);
        body
    };
    let chat = |extra: &[u8]| -> Vec<u8> {
        let mut body =
            br#"{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":""#.to_vec();
        body.extend_from_slice(extra);
        body.extend_from_slice(br#""}]}"#);
        body
    };
    for (what, bad, word) in [
        ("invalid UTF-8", &b"caf\xc3"[..], "UTF-8"),
        ("a lone high surrogate", &br"x\ud800y"[..], "surrogate"),
        ("a lone low surrogate", &br"\uDC00"[..], "surrogate"),
        ("a high surrogate at the end", &br"\ud83d"[..], "surrogate"),
        ("two high surrogates", &br"\ud83d\ud83d"[..], "surrogate"),
    ] {
        for (path, body) in [
            ("/v1/messages", message(bad)),
            ("/v1/chat/completions", chat(bad)),
        ] {
            let resp = call(gw.addr(), "POST", path, &[gw.auth()], &body);
            assert_eq!(resp.status, 400, "{what} on {path}: {}", resp.text());
            assert!(
                resp.text().contains(word),
                "{what} on {path}: the error names it: {}",
                resp.text()
            );
        }
    }
    assert!(up.requests().is_empty(), "nothing forwarded");
    for ok in [&br"\ud83d\ude00 and \\ud800 as text"[..], "é 中".as_bytes()] {
        let resp = call(
            gw.addr(),
            "POST",
            "/v1/messages",
            &[gw.auth()],
            &message(ok),
        );
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    assert_eq!(up.requests().len(), 2);
}

/// Credential headers in any spelling (mixed case, underscores) are dropped like
/// `x-api-key`: the upstream sees only the account's key.
#[test]
fn client_credential_headers_are_dropped_in_any_spelling() {
    let up = FakeUpstream::json(200, r#"{"id":"m","type":"message","content":[]}"#);
    let gw = Gateway::started(&Config::new(up.base_url()));
    let bearer = format!("Bearer {}", gw.client_key());
    let resp = post_message(
        gw.addr(),
        &[
            ("Authorization", &bearer),
            ("X_Api_Key", "sk-ant-client-own-key-underscore"),
            ("x_api_key", "sk-ant-client-own-key-lower"),
            ("Proxy-Authorization", "Basic c2VjcmV0"),
            ("proxy_authorization", "Basic c2VjcmV0"),
            ("COOKIE", "session=secret"),
            ("x-custom", "kept"),
        ],
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let reqs = up.requests();
    let sent = &reqs[0];
    for (name, value) in &sent.headers {
        let name = name.replace('_', "-");
        assert!(
            !["authorization", "proxy-authorization", "cookie"].contains(&name.as_str()),
            "{name}: {value}"
        );
        if name == "x-api-key" {
            assert_eq!(value, ACCOUNT_KEY);
        }
    }
    assert_eq!(sent.all("x-api-key"), [ACCOUNT_KEY]);
    assert_eq!(sent.header("x-custom"), Some("kept"));
}

/// A command-line argument that is not UTF-8 is a usage error (exit 2) whose message never
/// shows the argument, secret and all.
#[test]
fn a_non_utf8_argument_is_a_usage_error_that_hides_its_value() {
    use std::os::unix::ffi::OsStrExt;
    let gw = Gateway::new(&Config::new("http://127.0.0.1:9"));
    let mut arg = b"--key=sk-ant-api03-SecretInTheArgument-".to_vec();
    arg.push(0xff);
    let mut cmd = gw.cli(&["add-api-key", "--name", "x"]);
    cmd.arg(std::ffi::OsStr::from_bytes(&arg));
    let out = crate::support::run(cmd, None);
    assert_exit(&out, 2, "a non-UTF-8 argument");
    let all = printed(&out);
    assert!(!all.contains("SecretInTheArgument"), "{all}");
    assert!(all.contains("UTF-8"), "{all}");
}

/// `status --url` follows no redirect: the admin key goes only to the URL given, and the
/// redirect is an error naming its target.
#[test]
fn status_follows_no_redirect() {
    let elsewhere = FakeUpstream::json(200, r#"{"version":"x","accounts":[]}"#);
    let target = format!("{}/admin/status", elsewhere.base_url());
    let location = target.clone();
    let redirecting =
        FakeUpstream::start(move |_| Reply::json_with(302, &[("location", &location)], "{}"));
    let gw = Gateway::new(&Config::new("http://127.0.0.1:9"));
    let key_file = gw.dir().join("admin.key");
    std::fs::write(&key_file, "lgw_AdminKeyThatMustNotTravel").expect("write key");
    let out = gw.run_cli(&[
        "status",
        "--url",
        &redirecting.base_url(),
        "--admin-key-file",
        key_file.to_str().expect("path"),
    ]);
    assert_exit(&out, 5, "a redirect is not a status");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&target), "names the target: {err}");
    assert_eq!(redirecting.requests().len(), 1);
    assert!(elsewhere.requests().is_empty(), "the key went nowhere else");
}

/// `api_key_env` takes a variable name: a value that looks like a key is refused (exit 3), and
/// the key is shown masked in what every command prints.
#[test]
fn api_key_env_holding_a_key_is_refused_and_masked() {
    let secret = "sk-ant-api03-PastedIntoApiKeyEnv-Qw3rty-XYZ9";
    let yaml = format!(
        "{}accounts:\n  - id: acc_pasted\n    name: Pasted\n    kind: api_key\n    api_key_env: {secret}\n",
        Config::new("http://127.0.0.1:9").yaml()
    );
    let gw = Gateway::with_yaml(&yaml);
    for args in [
        vec!["list-accounts"],
        vec!["list-accounts", "--json"],
        vec!["health-check"],
        vec!["server"],
    ] {
        let out = gw.run_cli(&args);
        assert_exit(&out, 3, &format!("{args:?}"));
        let all = printed(&out);
        assert!(!all.contains(secret), "{args:?}: {all}");
        assert!(all.contains("api_key_env"), "{args:?}: {all}");
        assert!(
            all.contains("XYZ9"),
            "{args:?}: masked, last four shown: {all}"
        );
    }
}

/// A key file group or others may write (not only read), or a config.yaml others may write,
/// is refused at start with the chmod that fixes it (a group may write the config); the usage
/// directory is created 0700.
#[test]
fn writable_key_and_config_files_are_refused_and_usage_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let up = FakeUpstream::json(200, r#"{"id":"m","type":"message","content":[]}"#);
    let mut gw = Gateway::new(&Config::new(up.base_url()));
    gw.add_api_key("primary", ACCOUNT_KEY);
    gw.add_client_key("tests");
    let chmod = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    // Each mode of the file is refused at start with this exit code and this fix.
    let refused = |path: &std::path::Path, modes: [u32; 2], exit: i32, fix: &str| {
        for mode in modes {
            chmod(path, mode);
            let out = gw.run_cli(&["server"]);
            assert_exit(&out, exit, &format!("{} of mode {mode:o}", path.display()));
            let err = String::from_utf8_lossy(&out.stderr);
            let fix = format!("{fix} {}", path.display());
            assert!(err.contains(&fix), "{err}");
        }
        chmod(path, 0o600);
    };
    refused(
        &gw.dir().join("gateway.key"),
        [0o620, 0o602],
        4,
        "chmod 600",
    );
    let config = gw.config_path();
    refused(&config, [0o602, 0o666], 3, "chmod o-w");
    // A group may write it on purpose (an operators' group with umask 002).
    chmod(&config, 0o660);
    assert_exit(
        &gw.run_cli(&["list-accounts"]),
        0,
        "a group-writable config.yaml",
    );
    chmod(&config, 0o600);
    gw.start();
    let resp = post_message(gw.addr(), &[gw.auth()]);
    assert_eq!(resp.status, 200);
    let usage = gw.dir().join("usage");
    let mode = std::fs::metadata(&usage)
        .expect("usage dir")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700, "the usage directory is private");
}
