//! The fake OAuth token endpoint: a scripted stand-in for Anthropic's `/v1/oauth/token` that records every call.
//!
//! It runs on a `FakeUpstream` (so requests are recorded as they arrive, before any
//! scripted delay) and issues numbered tokens: the n-th grant is `access_token(n)` and
//! `refresh_token(n)`. It keeps the set of refresh tokens still alive, so a test can
//! prove that a rotated refresh token was persisted: with `rotate`, using a token twice
//! is an `invalid_grant`, as it is at Anthropic.
//!
//! `hold_next_refresh` parks the next refresh call before the endpoint looks at it, until the
//! test releases it: processed (the refresh token rotates even if the caller is gone by then)
//! or dropped unprocessed (as if the caller had died before its call got through).

use std::collections::HashSet;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::upstream::{FakeUpstream, Recorded, Reply};

/// Where the token endpoint listens, as in the real `token_url`.
pub const TOKEN_PATH: &str = "/v1/oauth/token";

/// Identity fields every successful token response carries.
pub const ACCOUNT_EMAIL: &str = "owner@example.test";
pub const ORG_UUID: &str = "org-uuid-4f1c";
pub const ORG_NAME: &str = "Example Org";
pub const ACCOUNT_UUID: &str = "acct-uuid-9b2e";
pub const GRANTED_SCOPE: &str = "user:inference user:profile";

/// Marks every value this endpoint issues, so a leak check cannot miss one or match by accident.
const TAG: &str = "Tq7vXk";

/// The access token of the n-th grant (1-based).
pub fn access_token(n: u32) -> String {
    format!("at-{n}-{TAG}")
}

/// The refresh token of the n-th grant.
pub fn refresh_token(n: u32) -> String {
    format!("rt-{n}-{TAG}")
}

/// How the endpoint behaves; change it mid-test with `FakeTokenEndpoint::script`.
#[derive(Clone, Debug)]
pub struct Script {
    /// `expires_in` of authorization-code grants.
    pub exchange_expires_in: u64,
    /// `expires_in` of refresh grants.
    pub refresh_expires_in: u64,
    /// Refresh grants carry a new refresh token and the presented one dies. Without it,
    /// refresh responses carry no `refresh_token` at all (the old one stays valid).
    pub rotate: bool,
    /// How long a refresh answer is held back, to widen race windows. `FakeUpstream` runs one
    /// handler at a time, so other answers wait too; arrivals are still recorded at once, so a
    /// second refresh racing the first is counted.
    pub refresh_delay: Duration,
    /// Every refresh is answered 400 `invalid_grant`.
    pub refresh_invalid_grant: bool,
    /// Every code exchange is answered 400 `invalid_grant` with this description.
    pub exchange_error: Option<String>,
    /// Every call is answered 400 with an error that quotes the whole request body back
    /// (code, verifier, refresh token, client secret), as a careless endpoint might.
    pub echo: bool,
    /// Grants carry this access token instead of a numbered one (an endpoint that lies).
    pub access_token: Option<String>,
    /// Refresh grants carry the presented refresh token back (one that does not rotate, sent
    /// anyway, as RFC 6749 §6 allows).
    pub echo_refresh_token: bool,
}

impl Default for Script {
    fn default() -> Script {
        Script {
            exchange_expires_in: 3600,
            refresh_expires_in: 3600,
            rotate: false,
            refresh_delay: Duration::ZERO,
            refresh_invalid_grant: false,
            exchange_error: None,
            echo: false,
            access_token: None,
            echo_refresh_token: false,
        }
    }
}

/// One answer the endpoint gave.
#[derive(Clone, Debug)]
pub struct Answer {
    pub grant_type: String,
    pub status: u16,
    /// When the request reached the handler (before any scripted delay).
    pub at: SystemTime,
}

struct State {
    script: Script,
    issued: u32,
    /// Refresh tokens that a refresh grant still accepts.
    alive: HashSet<String>,
    answers: Vec<Answer>,
    /// Where the next refresh call waits for the test's word, if it is to be held.
    hold: Option<Receiver<Release>>,
}

/// What a held refresh call does once released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// Answered as usual (with `rotate`, the presented refresh token dies now).
    Process,
    /// Never processed: no answer is recorded, nothing rotates, and the connection is left
    /// to the caller to close.
    Drop,
}

/// The test's side of a held refresh call.
pub struct Hold {
    tx: Sender<Release>,
}

impl Hold {
    pub fn release(self, how: Release) {
        // The endpoint may have given up waiting (its 30 s deadline); then there is no one to tell.
        let _ = self.tx.send(how);
    }
}

/// How long a held refresh call waits for the test before it is dropped unprocessed.
const HOLD_LIMIT: Duration = Duration::from_secs(30);

pub struct FakeTokenEndpoint {
    server: FakeUpstream,
    state: Arc<Mutex<State>>,
}

impl FakeTokenEndpoint {
    pub fn start(script: Script) -> FakeTokenEndpoint {
        let state = Arc::new(Mutex::new(State {
            script,
            issued: 0,
            alive: HashSet::new(),
            answers: Vec::new(),
            hold: None,
        }));
        let handler_state = Arc::clone(&state);
        let server = FakeUpstream::start(move |req| answer(&handler_state, req));
        FakeTokenEndpoint { server, state }
    }

    /// The `token_url` to configure.
    pub fn token_url(&self) -> String {
        format!("{}{TOKEN_PATH}", self.server.base_url())
    }

    /// An `authorize_url` on the same host; nothing is served there, it is only printed.
    pub fn authorize_url(&self) -> String {
        format!("{}/oauth/authorize", self.server.base_url())
    }

    pub fn script(&self, change: impl FnOnce(&mut Script)) {
        change(&mut self.state.lock().expect("token state").script);
    }

    /// Every request as it arrived, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.server.requests()
    }

    /// The JSON body of every request with this `grant_type`, in arrival order.
    pub fn calls(&self, grant_type: &str) -> Vec<Value> {
        self.requests()
            .iter()
            .filter_map(|r| serde_json::from_slice::<Value>(&r.body).ok())
            .filter(|v| v["grant_type"] == grant_type)
            .collect()
    }

    pub fn exchanges(&self) -> Vec<Value> {
        self.calls("authorization_code")
    }

    pub fn refreshes(&self) -> Vec<Value> {
        self.calls("refresh_token")
    }

    /// Parks the next refresh call (it is recorded as it arrives, so `refreshes()` counts it)
    /// until `Hold::release`. The endpoint answers one call at a time: others wait behind it.
    pub fn hold_next_refresh(&self) -> Hold {
        let (tx, rx) = mpsc::channel();
        self.state.lock().expect("token state").hold = Some(rx);
        Hold { tx }
    }

    /// The refresh calls the endpoint answered 200: those that minted new tokens.
    pub fn granted_refreshes(&self) -> usize {
        self.answers()
            .iter()
            .filter(|a| a.grant_type == "refresh_token" && a.status == 200)
            .count()
    }

    pub fn answers(&self) -> Vec<Answer> {
        self.state.lock().expect("token state").answers.clone()
    }

    /// Every token value handed out so far (the refresh tokens of non-rotating refreshes are
    /// listed though never sent: harmless for the leak checks this serves).
    pub fn issued(&self) -> Vec<String> {
        let n = self.state.lock().expect("token state").issued;
        (1..=n)
            .flat_map(|i| [access_token(i), refresh_token(i)])
            .collect()
    }
}

fn error(description: &str) -> Reply {
    Reply::json(
        400,
        &json!({"error": "invalid_grant", "error_description": description}).to_string(),
    )
}

fn answer(state: &Mutex<State>, req: &Recorded) -> Reply {
    let at = SystemTime::now();
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let grant_type = body["grant_type"].as_str().unwrap_or_default().to_string();
    let record = |status: u16| {
        state.lock().expect("token state").answers.push(Answer {
            grant_type: grant_type.clone(),
            status,
            at,
        });
    };
    if req.method != "POST" || req.target != TOKEN_PATH {
        record(404);
        return Reply::json(404, r#"{"error":"not_found"}"#);
    }
    let script = state.lock().expect("token state").script.clone();
    if script.echo {
        record(400);
        let quoted = String::from_utf8_lossy(&req.body);
        let description = format!("malformed request: {quoted}");
        return Reply::json(
            400,
            &json!({"error": "invalid_request", "error_description": description}).to_string(),
        );
    }
    let (expires_in, new_refresh) = match grant_type.as_str() {
        "authorization_code" => {
            if let Some(description) = &script.exchange_error {
                record(400);
                return error(description);
            }
            (script.exchange_expires_in, true)
        }
        "refresh_token" => {
            let hold = state.lock().expect("token state").hold.take();
            if let Some(hold) = hold {
                // Waited on outside the state lock, so the test can look meanwhile.
                let how = hold.recv_timeout(HOLD_LIMIT).unwrap_or(Release::Drop);
                if how == Release::Drop {
                    return Reply::Hang;
                }
            }
            let presented = body["refresh_token"].as_str().unwrap_or_default();
            let alive = state.lock().expect("token state").alive.contains(presented);
            if script.refresh_invalid_grant || !alive {
                record(400);
                return error("Refresh token not found or invalid");
            }
            // Held outside the state lock, so the test can read what happened meanwhile.
            thread::sleep(script.refresh_delay);
            if script.rotate {
                state.lock().expect("token state").alive.remove(presented);
            }
            (script.refresh_expires_in, script.rotate)
        }
        _ => {
            record(400);
            return Reply::json(400, r#"{"error":"unsupported_grant_type"}"#);
        }
    };
    let n = {
        let mut s = state.lock().expect("token state");
        s.issued += 1;
        if new_refresh {
            let fresh = refresh_token(s.issued);
            s.alive.insert(fresh);
        }
        s.issued
    };
    let mut grant = json!({
        "token_type": "Bearer",
        "access_token": script.access_token.clone().unwrap_or_else(|| access_token(n)),
        "expires_in": expires_in,
        "scope": GRANTED_SCOPE,
        "organization": {"uuid": ORG_UUID, "name": ORG_NAME},
        "account": {"uuid": ACCOUNT_UUID, "email_address": ACCOUNT_EMAIL},
    });
    if new_refresh {
        grant["refresh_token"] = refresh_token(n).into();
    } else if script.echo_refresh_token {
        grant["refresh_token"] = body["refresh_token"].clone();
    }
    record(200);
    Reply::json(200, &grant.to_string())
}
