//! Several gateway instances sharing state through Redis (`state: {backend: redis}`): OAuth
//! tokens refreshed once for all and never lost when an instance dies mid-refresh, cooldowns
//! and sticky pins seen by every instance, a key's limits and its usage counted once across
//! them, and requests that keep flowing while Redis is down.
//!
//! Every test starts a real `redis-server` (`support::redis`) and gateway instances that are
//! what an operator would run: one directory each, with its own config.yaml and usage ledger,
//! and the same `gateway.key` copied in (`Gateway::sibling`). `tokens` covers the OAuth
//! tests, `accounts` cooldowns and sticky pins, `limits` a gateway key's rpm and concurrency,
//! `usage` the shared counters, `outage` Redis going away and coming back.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::oauth::rig::Rig;
use crate::support::redis::RedisServer;
use crate::support::{
    Config, Conn, FakeUpstream, Framing, Gateway, Reply, Response, Script, call, request_bytes,
};

mod accounts;
mod limits;
mod outage;
mod tokens;
mod usage;

/// The key prefix the tests configure, so a key the gateway writes can be told from any other.
const PREFIX: &str = "scale-test";

/// A success body, the same whichever account served it.
const OK_BODY: &str = r#"{"id":"msg_scale","type":"message","role":"assistant","content":[]}"#;

/// How long shared state may take to show on another instance: Redis is read at every pick,
/// so this is only room for a busy machine.
const SHARED: Duration = Duration::from_secs(5);

/// The `state:` section that points an instance at `redis`.
fn state_section(redis: &RedisServer) -> String {
    format!(
        "state:\n  backend: redis\n  redis_url: {}\n  prefix: {PREFIX}\n  timeout: 250ms\n",
        redis.url()
    )
}

/// An OAuth rig (`oauth::rig`) whose instances share state through `redis`: `script` drives
/// its token endpoint, `up` is its upstream, `config` adds settings.
fn shared_rig(
    redis: &RedisServer,
    script: Script,
    up: FakeUpstream,
    config: impl FnOnce(Config) -> Config,
) -> Rig {
    Rig::new(script, up, |c| config(c.section(&state_section(redis))))
}

/// A gateway (not started) whose `config` also points it at `redis`, with the one account
/// "alpha" (`KEY_A`) and no client key yet.
fn shared_gateway(config: Config, redis: &RedisServer) -> Gateway {
    let gw = Gateway::new(&config.section(&state_section(redis)));
    gw.add_api_key("alpha", crate::support::accounts::KEY_A);
    gw
}

/// A token endpoint whose logins last `expires_in` seconds and whose refreshes rotate the
/// refresh token.
fn rotating(expires_in: u64) -> Script {
    Script {
        exchange_expires_in: expires_in,
        rotate: true,
        ..Script::default()
    }
}

/// Starts `first` and `n - 1` siblings of it (same config.yaml and key, own directories);
/// returns them all, `first` included, in that order.
fn start_instances(mut first: Gateway, n: usize) -> Vec<Gateway> {
    let mut all = vec![];
    for _ in 1..n {
        all.push(first.sibling());
    }
    first.start();
    all.insert(0, first);
    for gw in &mut all[1..] {
        gw.start();
    }
    all
}

/// An upstream that answers every request 200, streaming when the body asks for it.
fn answering_upstream() -> FakeUpstream {
    FakeUpstream::start(|req| {
        if serde_json::from_slice::<Value>(&req.body).is_ok_and(|v| v["stream"] == true) {
            Reply::Sse {
                events: crate::support::sse_events(2),
                gate: None,
                framing: Framing::Chunked,
            }
        } else {
            Reply::json(200, OK_BODY)
        }
    })
}

/// `GET /ready` on the main listener (no key needed): its status and JSON.
fn ready(addr: SocketAddr) -> (u16, Value) {
    let resp = call(addr, "GET", "/ready", &[], b"");
    let json = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
    (resp.status, json)
}

/// POSTs a Messages body; `None` if the gateway did not answer in full within the client's
/// step timeout (an instance waiting out a dead holder's lease may take that long).
fn try_post(addr: SocketAddr, key: &str, body: &str) -> Option<Response> {
    let headers = [
        ("x-api-key", key),
        ("content-type", "application/json"),
        ("connection", "close"),
    ];
    let mut conn = Conn::open(addr);
    conn.send(&request_bytes(
        "POST",
        "/v1/messages",
        &headers,
        body.as_bytes(),
    ));
    conn.try_read_response().ok()
}

/// `GET /admin/status` on the main listener with an admin key.
fn admin_status(addr: SocketAddr, admin_key: &str) -> Value {
    let resp = call(
        addr,
        "GET",
        "/admin/status",
        &[("x-api-key", admin_key)],
        b"",
    );
    assert_eq!(resp.status, 200, "admin status: {}", resp.text());
    resp.json()
}

/// The `state` of account `id` in a status view.
fn account_state(view: &Value, id: &str) -> String {
    crate::support::accounts::account(view, id)["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Everything stored under the prefix, as text: every key with its value(s), for checks that
/// look for what must not be there (a token in clear) and for failure messages.
fn dump(redis: &RedisServer) -> String {
    let mut out = String::new();
    for key in redis.keys(&format!("{PREFIX}:*")) {
        let value = match redis.command(&["TYPE", &key]).as_str() {
            "string" => redis.command(&["GET", &key]),
            "hash" => redis.command(&["HGETALL", &key]),
            "list" => redis.command(&["LRANGE", &key, "0", "-1"]),
            "set" => redis.command(&["SMEMBERS", &key]),
            "zset" => redis.command(&["ZRANGE", &key, "0", "-1", "WITHSCORES"]),
            other => format!("({other})"),
        };
        out.push_str(&format!("{key} = {}\n", value.replace('\n', " | ")));
    }
    out
}

/// Whether a server's log has a warning about Redis.
fn warned_about_redis(log: &str) -> bool {
    log.lines()
        .any(|l| l.contains("WARN") && l.to_lowercase().contains("redis"))
}

/// Polls `done` every 5 ms until it holds; fails after `limit`. For the moments a test must
/// act on quickly (killing an instance while its call is held has a one-second window).
fn promptly(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
