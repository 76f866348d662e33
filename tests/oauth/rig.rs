//! The OAuth test rig: a gateway wired to a fake token endpoint and a fake upstream, CLI helpers
//! for the login flow, and the leak check that every OAuth test ends with.
//!
//! The rig remembers every CLI output and every secret the test handed out (codes, client
//! secrets) or the endpoint issued (tokens, and the verifiers it received), so
//! `assert_no_leaks` can look for all of them at once.

use std::net::SocketAddr;
use std::process::Output;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

use crate::support::{
    ACCOUNT_KEY, Config, FakeTokenEndpoint, FakeUpstream, Gateway, MESSAGE_BODY, Recorded,
    Response, Script, assert_exit, call, now_unix,
};

/// The OAuth client id every test account logs in with.
pub const CLIENT_ID: &str = "client-id-for-tests-7d3e";

/// The token an upstream request carried as `authorization: Bearer`, if any.
pub fn bearer(req: &Recorded) -> Option<&str> {
    req.header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
}

pub fn stdout_json(out: &Output, what: &str) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Every integer value of `key:` in a YAML text (the account list is block-style YAML).
pub fn yaml_ints(yaml: &str, key: &str) -> Vec<u64> {
    yaml.lines()
        .filter_map(|line| {
            let line = line.trim_start().trim_start_matches("- ");
            line.strip_prefix(key)?
                .strip_prefix(':')?
                .trim()
                .parse()
                .ok()
        })
        .collect()
}

fn percent_decode(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = raw.get(i + 1..i + 3).expect("two hex digits after %");
            out.push(u8::from_str_radix(hex, 16).expect("hex escape"));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("UTF-8 after decoding")
}

/// What `oauth-start --json` gave.
pub struct Login {
    pub url: String,
    /// Query parameters in order: name, raw value, decoded value.
    pub params: Vec<(String, String, String)>,
    pub state: String,
    pub challenge: String,
    pub expires_at: u64,
}

impl Login {
    fn find(&self, name: &str) -> &(String, String, String) {
        self.params
            .iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("no {name} in {}", self.url))
    }

    /// A query parameter, decoded.
    pub fn param(&self, name: &str) -> &str {
        &self.find(name).2
    }

    /// A query parameter as it appears in the URL.
    pub fn raw(&self, name: &str) -> &str {
        &self.find(name).1
    }
}

pub struct Rig {
    pub gw: Gateway,
    pub tokens: FakeTokenEndpoint,
    pub up: FakeUpstream,
    /// Every CLI run through the rig, for the leak check.
    outputs: Mutex<Vec<Output>>,
    /// Codes and client secrets the test handed to the CLI.
    secrets: Mutex<Vec<String>>,
    /// Every state an oauth-start printed: not secret in output, but never clear in the file.
    states: Mutex<Vec<String>>,
    codes: AtomicUsize,
}

impl Rig {
    /// A gateway (not started) with a client key, wired to `up` and a token endpoint running
    /// `script`; `config` adds settings. Logs at debug level, so the leak check sees everything.
    pub fn new(script: Script, up: FakeUpstream, config: impl FnOnce(Config) -> Config) -> Rig {
        let tokens = FakeTokenEndpoint::start(script);
        let base = Config::new(up.base_url())
            .log_level("debug")
            .oauth("authorize_url", tokens.authorize_url())
            .oauth("token_url", tokens.token_url())
            .oauth("refresh_min_interval", "1s")
            .oauth("token_timeout", "5s");
        let mut gw = Gateway::new(&config(base));
        gw.add_client_key("tests");
        Rig {
            gw,
            tokens,
            up,
            outputs: Mutex::new(Vec::new()),
            secrets: Mutex::new(Vec::new()),
            states: Mutex::new(Vec::new()),
            codes: AtomicUsize::new(0),
        }
    }

    /// Runs the CLI on the rig's config and keeps the output for the leak check.
    pub fn cli(&self, args: &[&str]) -> Output {
        let out = self.gw.run_cli(args);
        self.outputs.lock().expect("outputs").push(out.clone());
        out
    }

    /// A value the test handed out that must never be printed back.
    pub fn remember(&self, secret: &str) {
        self.secrets
            .lock()
            .expect("secrets")
            .push(secret.to_string());
    }

    /// A fresh authorization code, remembered as a secret.
    pub fn next_code(&self) -> String {
        let n = self.codes.fetch_add(1, Ordering::SeqCst) + 1;
        let code = format!("code-{n}-Cd4wPz");
        self.remember(&code);
        code
    }

    /// `add-oauth --json`; `secret` is (flag, flag value, the secret itself).
    pub fn add_oauth(&self, name: &str, secret: Option<(&str, &str, &str)>) -> String {
        let mut args = vec![
            "add-oauth",
            "--name",
            name,
            "--client-id",
            CLIENT_ID,
            "--json",
        ];
        if let Some((flag, value, secret)) = secret {
            self.remember(secret);
            args.extend([flag, value]);
        }
        let out = self.cli(&args);
        assert_exit(&out, 0, "add-oauth");
        let v = stdout_json(&out, "add-oauth");
        let id = v["id"]
            .as_str()
            .unwrap_or_else(|| panic!("add-oauth: id in {v}"))
            .to_string();
        assert!(id.starts_with("acc_"), "add-oauth id {id}");
        assert_eq!(v["name"], name, "{v}");
        assert_eq!(v["kind"], "oauth", "{v}");
        assert_eq!(v["state"], "not_logged_in", "{v}");
        id
    }

    /// `oauth-start --json`, its URL taken apart.
    pub fn start_login(&self, id: &str) -> Login {
        let out = self.cli(&["oauth-start", "--account-id", id, "--json"]);
        assert_exit(&out, 0, "oauth-start");
        let v = stdout_json(&out, "oauth-start");
        assert_eq!(v["id"], id, "{v}");
        let url = v["authorize_url"]
            .as_str()
            .unwrap_or_else(|| panic!("oauth-start: authorize_url in {v}"))
            .to_string();
        let query = url.split_once('?').map(|(_, q)| q).unwrap_or_default();
        let params: Vec<(String, String, String)> = query
            .split('&')
            .map(|pair| {
                let (name, raw) = pair.split_once('=').unwrap_or((pair, ""));
                (name.to_string(), raw.to_string(), percent_decode(raw))
            })
            .collect();
        let mut login = Login {
            url,
            params,
            state: String::new(),
            challenge: String::new(),
            expires_at: v["expires_at"]
                .as_u64()
                .unwrap_or_else(|| panic!("oauth-start: expires_at in {v}")),
        };
        login.state = login.param("state").to_string();
        login.challenge = login.param("code_challenge").to_string();
        self.states
            .lock()
            .expect("states")
            .push(login.state.clone());
        login
    }

    /// `oauth-callback --json` with whatever the user would paste.
    pub fn callback(&self, id: &str, pasted: &str) -> Output {
        self.cli(&[
            "oauth-callback",
            "--account-id",
            id,
            "--code",
            pasted,
            "--json",
        ])
    }

    /// Adds an OAuth account and logs it in through `CODE#STATE`.
    pub fn login(&self, name: &str) -> String {
        let id = self.add_oauth(name, None);
        let login = self.start_login(&id);
        let code = self.next_code();
        let out = self.callback(&id, &format!("{code}#{}", login.state));
        assert_exit(&out, 0, "oauth-callback");
        id
    }

    pub fn accounts(&self) -> Vec<Value> {
        let out = self.cli(&["list-accounts", "--json"]);
        assert_exit(&out, 0, "list-accounts");
        stdout_json(&out, "list-accounts")
            .as_array()
            .expect("list-accounts --json prints an array")
            .clone()
    }

    pub fn account_ids(&self) -> Vec<String> {
        self.accounts()
            .iter()
            .map(|a| a["id"].as_str().expect("id").to_string())
            .collect()
    }

    /// The `list-accounts --json` row of `id`.
    pub fn account(&self, id: &str) -> Value {
        self.accounts()
            .into_iter()
            .find(|a| a["id"] == id)
            .unwrap_or_else(|| panic!("account {id} not listed"))
    }

    /// Rewrites every `key: <integer>` in config.yaml (the server must not be running).
    pub fn set_config_ints(&self, key: &str, value: u64) {
        let text = self.gw.config_text();
        let mut changed = 0;
        let lines: Vec<String> = text
            .lines()
            .map(|line| {
                let indent = line.len() - line.trim_start().len();
                let body = &line[indent..];
                let (dash, rest) = match body.strip_prefix("- ") {
                    Some(rest) => ("- ", rest),
                    None => ("", body),
                };
                match rest.strip_prefix(key).and_then(|r| r.strip_prefix(':')) {
                    Some(v) if v.trim().parse::<u64>().is_ok() => {
                        changed += 1;
                        format!("{}{dash}{key}: {value}", &line[..indent])
                    }
                    _ => line.to_string(),
                }
            })
            .collect();
        assert!(changed > 0, "no integer {key}: in config.yaml\n{text}");
        std::fs::write(self.gw.config_path(), lines.join("\n") + "\n").expect("write config.yaml");
    }

    /// Makes the pending login of the (only) OAuth account expire, as if 10 minutes had passed.
    pub fn expire_pending_login(&self) {
        self.set_config_ints("login_expires_at", now_unix() - 60);
    }

    /// Adds the API-key account "steady" (`ACCOUNT_KEY`), there to serve what the OAuth
    /// accounts cannot, and starts the server: its address.
    pub fn start_with_steady_key(&mut self) -> SocketAddr {
        self.gw.add_api_key("steady", ACCOUNT_KEY);
        self.gw.start()
    }

    /// Posts `n` messages, each served (200), and checks that every upstream request so far
    /// went out on the "steady" API key.
    pub fn assert_steady_serves(&self, addr: SocketAddr, n: usize) {
        for i in 0..n {
            let resp = self.post(addr, MESSAGE_BODY);
            assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
        }
        for req in self.up.requests() {
            assert_eq!(req.all("x-api-key"), [ACCOUNT_KEY], "served by the API key");
        }
    }

    /// How many Messages requests reached the upstream with an OAuth token.
    pub fn oauth_requests(&self) -> usize {
        self.up
            .requests()
            .iter()
            .filter(|r| bearer(r).is_some() && r.target.starts_with("/v1/messages"))
            .count()
    }

    /// `POST /v1/messages` with the rig's client key.
    pub fn post(&self, addr: SocketAddr, body: &str) -> Response {
        call(
            addr,
            "POST",
            "/v1/messages",
            &[self.gw.auth(), ("content-type", "application/json")],
            body.as_bytes(),
        )
    }

    /// No token, code, verifier or client secret in any CLI output or server stderr (this
    /// rig's servers and `other_logs`), and none of those nor a state in config.yaml. Stops
    /// the rig's server first, so its stderr is read to the end.
    pub fn assert_no_leaks(&mut self, other_logs: &[String]) {
        if self.gw.running() {
            self.gw.stop();
        }
        let mut secrets: Vec<(String, String)> = Vec::new();
        for token in self.tokens.issued() {
            secrets.push(("token".into(), token));
        }
        for exchange in self.tokens.exchanges() {
            if let Some(v) = exchange["code_verifier"].as_str() {
                secrets.push(("PKCE verifier".into(), v.to_string()));
            }
        }
        for s in self.secrets.lock().expect("secrets").iter() {
            secrets.push(("code or client secret".into(), s.clone()));
        }
        let mut texts: Vec<(String, String)> = Vec::new();
        for (i, out) in self.outputs.lock().expect("outputs").iter().enumerate() {
            texts.push((
                format!("CLI run #{i} stdout"),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            ));
            texts.push((
                format!("CLI run #{i} stderr"),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        texts.push(("server stderr".into(), self.gw.all_stderr()));
        for (i, log) in other_logs.iter().enumerate() {
            texts.push((format!("other server #{i} stderr"), log.clone()));
        }
        let mut leaks = Vec::new();
        for (where_, text) in &texts {
            for (what, secret) in &secrets {
                if text.contains(secret.as_str()) {
                    leaks.push(format!("{where_} shows a {what} ({secret}):\n{text}"));
                }
            }
        }
        let config = self.gw.config_text();
        for state in self.states.lock().expect("states").iter() {
            secrets.push(("login state".into(), state.clone()));
        }
        for (what, secret) in &secrets {
            if config.contains(secret.as_str()) {
                leaks.push(format!("config.yaml holds a {what} in clear ({secret})"));
            }
        }
        assert!(leaks.is_empty(), "{}", leaks.join("\n\n"));
    }
}
