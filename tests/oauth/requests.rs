//! What an OAuth account sends upstream (bearer token, merged beta, the system prompt first)
//! next to an API-key account that sends the client's request untouched; bans; and leak checks
//! on the human-readable CLI output and debug logs.

use serde_json::{Value, json};

use super::rig::{self, Rig, bearer};
use super::{
    BAN_400, BAN_403, DEFAULT_PROMPT, OAUTH_BETA, OK_BODY, TEST_PROMPT, answering_upstream, json_of,
};
use crate::support::{
    ACCOUNT_KEY, Conn, FakeUpstream, MESSAGE_BODY, Recorded, Reply, Script, access_token,
    assert_exit, call, request_bytes, sse_events,
};

/// One request variant for `oauth_requests_get_bearer_beta_and_the_system_prompt`.
struct Variant {
    what: &'static str,
    method: &'static str,
    target: &'static str,
    betas: &'static [&'static str],
    body: Value,
    /// The `system` an OAuth account must send; `None` for a request without a body.
    oauth_system: Option<Value>,
    oauth_beta: &'static str,
}

/// Sends `v` until both accounts have carried it, then checks what each sent upstream.
fn check_variant(rig: &Rig, v: &Variant) {
    let body = if v.body.is_null() {
        String::new()
    } else {
        v.body.to_string()
    };
    let start = rig.up.requests().len();
    let mut seen = Vec::new();
    for _ in 0..8 {
        // An Anthropic client: anthropic-version says which shape /v1/models answers in.
        let mut headers = vec![
            rig.gw.auth(),
            ("content-type", "application/json"),
            ("anthropic-version", "2023-06-01"),
        ];
        headers.extend(v.betas.iter().map(|b| ("anthropic-beta", *b)));
        let streaming = v.body["stream"] == true;
        let text = if streaming {
            let mut conn = Conn::open(rig.gw.addr());
            headers.push(("connection", "close"));
            conn.send(&request_bytes(
                v.method,
                v.target,
                &headers,
                body.as_bytes(),
            ));
            let (status, head) = conn.read_head();
            assert_eq!(status, 200, "{}", v.what);
            let mut sse = conn.into_sse(&head);
            let mut got = String::new();
            while let Some(ev) = sse.next_event() {
                got.push_str(&ev.raw);
            }
            got
        } else {
            let resp = call(rig.gw.addr(), v.method, v.target, &headers, body.as_bytes());
            assert_eq!(resp.status, 200, "{}: {}", v.what, resp.text());
            resp.text()
        };
        let expected = if streaming {
            sse_events(3).concat()
        } else {
            OK_BODY.to_string()
        };
        assert_eq!(text, expected, "{}: downstream answer", v.what);
        seen = rig.up.requests()[start..].to_vec();
        if seen.iter().any(|r| bearer(r).is_some()) && seen.iter().any(|r| bearer(r).is_none()) {
            break;
        }
    }
    let (oauth, api): (Vec<&Recorded>, Vec<&Recorded>) =
        seen.iter().partition(|r| bearer(r).is_some());
    assert!(
        !oauth.is_empty() && !api.is_empty(),
        "{}: both accounts should have served",
        v.what
    );
    for req in oauth {
        assert_eq!(req.target, v.target, "{}", v.what);
        assert_eq!(
            req.all("authorization"),
            [format!("Bearer {}", access_token(1))],
            "{}",
            v.what
        );
        assert!(req.all("x-api-key").is_empty(), "{}: x-api-key", v.what);
        assert_eq!(
            req.all("anthropic-beta"),
            [v.oauth_beta],
            "{}: merged anthropic-beta",
            v.what
        );
        match &v.oauth_system {
            Some(system) => {
                let mut expected = v.body.clone();
                expected["system"] = system.clone();
                assert_eq!(json_of(req), expected, "{}: OAuth body", v.what);
            }
            None => assert!(req.body.is_empty(), "{}", v.what),
        }
    }
    for req in api {
        assert_eq!(req.all("x-api-key"), [ACCOUNT_KEY], "{}", v.what);
        assert!(req.header("authorization").is_none(), "{}", v.what);
        assert_eq!(
            req.all("anthropic-beta"),
            v.betas,
            "{}: client's betas",
            v.what
        );
        assert_eq!(
            req.body,
            body.as_bytes(),
            "{}: API-key body byte for byte",
            v.what
        );
    }
}

#[test]
fn oauth_requests_get_bearer_beta_and_the_system_prompt() {
    let prompt = json!({"type": "text", "text": TEST_PROMPT});
    // Each variant must reach both accounts: rotate, and do not pin identical bodies.
    let mut rig = Rig::new(Script::default(), answering_upstream(), |c| {
        c.oauth("system_prompt", json!(TEST_PROMPT).to_string())
            .section("balance:\n  strategy: round_robin\nsticky:\n  enabled: false\n")
    });
    rig.login("shaped");
    rig.gw.add_api_key("plain", ACCOUNT_KEY);
    rig.gw.start();

    let cached = json!([
        {"type": "text", "text": "Cached context.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "More."}
    ]);
    let mut with_prompt = vec![prompt.clone()];
    with_prompt.extend(cached.as_array().expect("array").iter().cloned());
    let already = json!([prompt, {"type": "text", "text": "Client's own."}]);
    let variants = [
        Variant {
            what: "JSON, string system",
            method: "POST",
            target: "/v1/messages",
            betas: &["a,oauth-2025-04-20"],
            body: json!({"model": "claude-sonnet-4-5", "max_tokens": 16, "system": "Be brief.",
                "messages": [{"role": "user", "content": "hi"}]}),
            oauth_system: Some(json!([prompt, {"type": "text", "text": "Be brief."}])),
            oauth_beta: "a,oauth-2025-04-20",
        },
        Variant {
            what: "SSE, array system with cache_control",
            method: "POST",
            target: "/v1/messages?beta=true",
            betas: &[],
            body: json!({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": true,
                "system": cached, "messages": [{"role": "user", "content": "count"}]}),
            oauth_system: Some(Value::Array(with_prompt)),
            oauth_beta: OAUTH_BETA,
        },
        Variant {
            what: "prompt already first",
            method: "POST",
            target: "/v1/messages",
            betas: &["b, a"],
            body: json!({"model": "claude-sonnet-4-5", "max_tokens": 16, "system": already,
                "messages": [{"role": "user", "content": "hi"}]}),
            oauth_system: Some(already.clone()),
            oauth_beta: "b,a,oauth-2025-04-20",
        },
        Variant {
            what: "count_tokens, no system",
            method: "POST",
            target: "/v1/messages/count_tokens",
            betas: &["tools-1", "tools-1,oauth-2025-04-20"],
            body: json!({"model": "claude-sonnet-4-5",
                "messages": [{"role": "user", "content": "how many"}]}),
            oauth_system: Some(json!([prompt])),
            oauth_beta: "tools-1,oauth-2025-04-20",
        },
        Variant {
            what: "GET /v1/models",
            method: "GET",
            target: "/v1/models",
            betas: &[],
            body: Value::Null,
            oauth_system: None,
            oauth_beta: OAUTH_BETA,
        },
    ];
    for v in &variants {
        check_variant(&rig, v);
    }
    rig.assert_no_leaks(&[]);
}

#[test]
fn default_system_prompt_is_claude_codes() {
    let mut rig = Rig::new(Script::default(), answering_upstream(), |c| c);
    rig.login("default");
    let addr = rig.gw.start();
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":16,"system":"Be brief.","messages":[{"role":"user","content":"hi"}]}"#;
    let resp = rig.post(addr, body);
    assert_eq!(resp.status, 200, "{}", resp.text());
    let reqs = rig.up.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        json_of(&reqs[0])["system"],
        json!([
            {"type": "text", "text": DEFAULT_PROMPT},
            {"type": "text", "text": "Be brief."}
        ])
    );
    rig.assert_no_leaks(&[]);
}

#[test]
fn banned_oauth_account_is_disabled_and_others_serve() {
    for (status, message) in [(403, BAN_403), (400, BAN_400)] {
        let error_type = if status == 403 {
            "permission_error"
        } else {
            "invalid_request_error"
        };
        let ban = json!({"type": "error", "error": {"type": error_type, "message": message},
            "request_id": "req_ban"})
        .to_string();
        let up = FakeUpstream::start(move |req| {
            if bearer(req).is_some() {
                Reply::json(status, &ban)
            } else {
                Reply::json(200, OK_BODY)
            }
        });
        let mut rig = Rig::new(Script::default(), up, |c| c);
        let id = rig.login("banned");
        let addr = rig.start_with_steady_key();

        for i in 0..4 {
            let resp = rig.post(addr, MESSAGE_BODY);
            assert_eq!(resp.status, 200, "{status}: request {i}: {}", resp.text());
            assert_eq!(resp.text(), OK_BODY, "{status}: served by the API key");
            if rig.oauth_requests() > 0 {
                break;
            }
        }
        assert_eq!(
            rig.oauth_requests(),
            1,
            "{status}: the OAuth account was tried"
        );
        let probes = rig.up.requests().into_iter().filter(|r| {
            bearer(r).is_some() && r.method == "GET" && r.target.starts_with("/v1/models")
        });
        assert_eq!(probes.count(), 1, "{status}: a probe confirmed the ban");
        let row = rig.account(&id);
        assert_eq!(row["enabled"], false, "{status}: {row}");
        assert_eq!(row["state"], "disabled", "{status}: {row}");
        assert_eq!(row["disabled_reason"], message, "{status}: {row}");
        let config = rig.gw.config_text();
        assert!(
            config.contains(message),
            "{status}: config.yaml records the reason\n{config}"
        );

        for i in 0..6 {
            let resp = rig.post(addr, MESSAGE_BODY);
            assert_eq!(resp.status, 200, "{status}: later request {i}");
        }
        assert_eq!(
            rig.oauth_requests(),
            1,
            "{status}: a banned account is never used again"
        );
        rig.assert_no_leaks(&[]);
    }
}

#[test]
fn human_readable_output_and_debug_logs_leak_nothing() {
    let up = FakeUpstream::start(|req| {
        if bearer(req) == Some(access_token(1).as_str()) {
            Reply::json(
                401,
                r#"{"type":"error","error":{"type":"authentication_error","message":"invalid token"}}"#,
            )
        } else {
            Reply::json(200, OK_BODY)
        }
    });
    let mut rig = Rig::new(Script::default(), up, |c| c);
    let secret = "cs-PlainOutputSecret-3vH8";
    rig.remember(secret);
    let out = rig.cli(&[
        "add-oauth",
        "--name",
        "plain",
        "--client-id",
        rig::CLIENT_ID,
        "--client-secret",
        secret,
    ]);
    assert_exit(&out, 0, "add-oauth");
    let id = rig.account_ids()[0].clone();
    let out = rig.cli(&["oauth-start", &format!("--account-id={id}")]);
    assert_exit(&out, 0, "oauth-start");
    // The human format is free; the JSON one (which replaces that login) gives the state.
    let state = rig.start_login(&id).state;
    let code = rig.next_code();
    let out = rig.cli(&[
        "oauth-callback",
        "--account-id",
        &id,
        "--code",
        &format!("{code}#{state}"),
    ]);
    assert_exit(&out, 0, "oauth-callback");
    assert_exit(&rig.cli(&["list-accounts"]), 0, "list-accounts");
    let addr = rig.start_with_steady_key();
    for _ in 0..4 {
        let resp = rig.post(addr, MESSAGE_BODY);
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    assert_eq!(rig.tokens.refreshes().len(), 1, "the 401 caused a refresh");
    assert_exit(&rig.cli(&["list-accounts"]), 0, "list-accounts");
    rig.assert_no_leaks(&[]);
}
