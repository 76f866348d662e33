//! OAuth accounts: the PKCE login through the CLI, token refresh (ahead of expiry, on demand,
//! after a 401, once per account across threads and processes, rotation persisted), how requests
//! are shaped for an OAuth account, bans and `needs_login` failover, and that no token, code,
//! verifier or client secret ever shows in the server's stderr or the CLI's output.
//!
//! `login` checks the CLI flow, `refresh` the token lifecycle in a running server, `requests`
//! what reaches the upstream; `rig` is their shared setup. Every test ends with
//! `Rig::assert_no_leaks`, which is what checks the last point.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::support::{FakeUpstream, Framing, Recorded, Reply, base64url, sse_events};

mod endpoint;
mod login;
mod refresh;
mod requests;
pub mod rig;

/// The prompt configured in most tests here.
const TEST_PROMPT: &str = "You are the gateway's test prompt.";
/// The prompt the gateway injects when none is configured.
const DEFAULT_PROMPT: &str = "你是 Claude Code，Anthropic的官方CLI工具";
const OAUTH_BETA: &str = "oauth-2025-04-20";
const DEFAULT_REDIRECT: &str = "https://platform.claude.com/oauth/code/callback";
const DEFAULT_SCOPES: &str = "org:create_api_key user:profile user:inference";
const BAN_403: &str = "OAuth authentication is currently not allowed for this organization.";
const BAN_400: &str = "This organization has been disabled.";
const OK_BODY: &str = r#"{"id":"msg_01Ok","type":"message","role":"assistant","content":[]}"#;
/// How long the server gets to act on its own timers (the refresher's 1 s tick).
const SERVER_ACTS: Duration = Duration::from_secs(8);
/// The server applies config.yaml changes within about a second; this bound leaves slack.
const RELOAD: Duration = Duration::from_secs(3);

/// `x` is a base64url string without padding of the given length.
fn assert_base64url(what: &str, x: &str, len: usize) {
    assert_eq!(x.len(), len, "{what} length: {x:?}");
    assert!(
        x.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{what} is not base64url without padding: {x:?}"
    );
}

fn sha256_base64url(text: &str) -> String {
    base64url(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref())
}

/// Seconds since the epoch with a fraction, to compare instants with whole-second expiries.
fn unix_f64(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

fn json_of(req: &Recorded) -> Value {
    serde_json::from_slice(&req.body).unwrap_or_else(|e| {
        panic!(
            "upstream body is not JSON ({e}): {}",
            String::from_utf8_lossy(&req.body)
        )
    })
}

fn sorted(list: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// An upstream that answers every request 200, streaming when the body asks for it.
fn answering_upstream() -> FakeUpstream {
    FakeUpstream::start(|req| {
        if serde_json::from_slice::<Value>(&req.body).is_ok_and(|v| v["stream"] == true) {
            Reply::Sse {
                events: sse_events(3),
                gate: None,
                framing: Framing::Chunked,
            }
        } else {
            Reply::json(200, OK_BODY)
        }
    })
}
