//! Errors for OpenAI clients: requests the gateway refuses itself (400 naming the field, no
//! upstream call), failed client authentication, and upstream errors converted to OpenAI's
//! shape with their status and headers kept, before any 200 goes out; and failover, which
//! applies to OpenAI requests as to any other.

use serde_json::{Value, json};

use super::{
    CHAT_PATH, anthropic_message, assert_openai_error, bearer, body_json, openai_error_object,
    post_openai, system_text,
};
use crate::support::accounts::{each_case, error_body, first_account_apart, started_ab};
use crate::support::{Config, FakeUpstream, Gateway, Reply, call, ok_upstream_and_gateway};

/// What `param` must say: exactly this field, or a field within this one (the spec names the
/// offending part but not how deep the name goes).
#[derive(Debug)]
enum Param {
    Exact(&'static str),
    Within(&'static str),
}

fn user(content: Value) -> Value {
    json!({"role": "user", "content": content})
}

#[test]
fn invalid_requests_are_400_naming_the_field_and_never_reach_the_upstream() {
    let up = FakeUpstream::json(
        200,
        r#"{"id":"msg_01Ok","type":"message","role":"assistant","content":[{"type":"text","text":"ok"}],"stop_reason":"end_turn","usage":{"input_tokens":1,"output_tokens":1}}"#,
    );
    let gw = Gateway::started(&Config::new(up.base_url()));
    let hi = user(json!("hi"));
    let call_with = |arguments: &str| {
        json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}},
        ]})
    };
    let f_tool = json!({"type": "function", "function": {"name": "f"}});
    let cases: Vec<(&str, &str, Value, Param)> = vec![
        (
            "n=2 (spec 9)",
            CHAT_PATH,
            json!({"model": "claude-sonnet-4-5", "n": 2, "messages": [hi]}),
            Param::Exact("n"),
        ),
        (
            "n=2 posted to /v1/messages: still OpenAI's body, OpenAI's error",
            "/v1/messages",
            json!({"model": "claude-sonnet-4-5", "n": 2, "messages": [hi]}),
            Param::Exact("n"),
        ),
        (
            "arguments that are not JSON (spec 5)",
            CHAT_PATH,
            json!({"model": "claude-sonnet-4-5", "tools": [f_tool],
                   "messages": [hi, call_with("{bad"), {"role": "tool", "tool_call_id": "call_1", "content": "r"}]}),
            Param::Exact("messages[1].tool_calls[0].function.arguments"),
        ),
        (
            "arguments that are JSON but not an object",
            CHAT_PATH,
            json!({"model": "claude-sonnet-4-5", "tools": [f_tool],
                   "messages": [hi, call_with("[1,2]"), {"role": "tool", "tool_call_id": "call_1", "content": "r"}]}),
            Param::Exact("messages[1].tool_calls[0].function.arguments"),
        ),
        (
            "a data URL without ;base64 (spec 6)",
            CHAT_PATH,
            json!({"model": "claude-sonnet-4-5", "messages": [user(json!([
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:image/png,notbase64"}},
            ]))]}),
            Param::Within("messages[0].content[1]"),
        ),
        (
            "a data URL whose base64 does not decode",
            CHAT_PATH,
            json!({"model": "claude-sonnet-4-5", "messages": [user(json!([
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not base64@@"}},
            ]))]}),
            Param::Within("messages[0].content[0]"),
        ),
        (
            "an unknown role",
            CHAT_PATH,
            json!({"model": "claude-sonnet-4-5", "messages": [hi, {"role": "robot", "content": "beep"}]}),
            Param::Exact("messages[1].role"),
        ),
        (
            "a tool that is not a function",
            CHAT_PATH,
            json!({"model": "claude-sonnet-4-5", "messages": [hi],
                   "tools": [{"type": "custom", "custom": {"name": "grammar"}}]}),
            Param::Within("tools[0]"),
        ),
        (
            "a file_id part",
            CHAT_PATH,
            json!({"model": "claude-sonnet-4-5", "messages": [user(json!([
                {"type": "file", "file": {"file_id": "file-abc123"}},
            ]))]}),
            Param::Within("messages[0].content[0]"),
        ),
        (
            "a tool message without tool_call_id",
            CHAT_PATH,
            json!({"model": "claude-sonnet-4-5", "tools": [f_tool],
                   "messages": [hi, call_with("{}"), {"role": "tool", "content": "r"}]}),
            Param::Within("messages[2]"),
        ),
        (
            "no messages",
            CHAT_PATH,
            json!({"model": "claude-sonnet-4-5"}),
            Param::Exact("messages"),
        ),
        (
            "no model",
            CHAT_PATH,
            json!({"messages": [hi]}),
            Param::Exact("model"),
        ),
    ];
    for (what, path, body, param) in &cases {
        let resp = post_openai(&gw, path, body);
        let error = assert_openai_error(&resp, 400, "invalid_request_error");
        let got = error["param"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: param should name the field: {error}"));
        match param {
            Param::Exact(p) => assert_eq!(got, *p, "{what}: param"),
            Param::Within(p) => assert!(
                got == *p || got.starts_with(&format!("{p}.")),
                "{what}: param {got:?} should name a field within {p}"
            ),
        }
        assert!(
            up.requests().is_empty(),
            "{what}: an invalid request must not reach the upstream"
        );
    }

    // Malformed JSON is OpenAI-shaped too.
    let auth = bearer(&gw);
    let malformed = call(
        gw.addr(),
        "POST",
        CHAT_PATH,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        b"{\"model\": \"claude-sonnet-4-5\", \"messages\": [",
    );
    assert_openai_error(&malformed, 400, "invalid_request_error");
    assert!(up.requests().is_empty(), "malformed JSON went upstream");

    // The control: n=1 and a valid data URL are fine, and that request does go upstream.
    let ok = post_openai(
        &gw,
        CHAT_PATH,
        &json!({"model": "claude-sonnet-4-5", "n": 1, "messages": [user(json!([
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
        ]))]}),
    );
    assert_eq!(ok.status, 200, "n=1 is accepted: {}", ok.text());
    let reqs = up.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        body_json(&reqs[0].body)["messages"][0]["content"][1],
        json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}})
    );
}

#[test]
fn failed_client_auth_is_a_401_in_openai_shape() {
    let (up, gw) = ok_upstream_and_gateway();
    let wrong = format!("Bearer {}x", gw.client_key());
    let body = json!({"model": "claude-sonnet-4-5", "messages": [user(json!("hi"))]}).to_string();
    // (what, method, path, authorization header if any)
    let cases: [(&str, &str, &str, Option<&str>); 4] = [
        ("wrong bearer", "POST", CHAT_PATH, Some(&wrong)),
        ("no credentials", "POST", CHAT_PATH, None),
        (
            "no credentials, /chat/completions",
            "POST",
            "/chat/completions",
            None,
        ),
        (
            "OpenAI model list, wrong bearer",
            "GET",
            "/v1/models",
            Some(&wrong),
        ),
    ];
    for (what, method, path, auth) in cases {
        let payload = if method == "POST" {
            body.as_bytes()
        } else {
            b""
        };
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let resp = call(gw.addr(), method, path, &headers, payload);
        assert_eq!(resp.status, 401, "{what}: {}", resp.text());
        let v = resp.json();
        let error = openai_error_object(&v, what);
        assert!(
            error["type"].as_str().is_some_and(|t| !t.is_empty()),
            "{what}: {v}"
        );
    }
    assert!(
        up.requests().is_empty(),
        "unauthenticated requests went upstream"
    );
}

#[test]
fn upstream_429_and_529_keep_their_status_and_headers_stream_or_not() {
    // (status, Anthropic error type, stream)
    let cases: [(u16, &str, bool); 4] = [
        (429, "rate_limit_error", false),
        (429, "rate_limit_error", true),
        (529, "overloaded_error", false),
        (529, "overloaded_error", true),
    ];
    each_case(&cases, |&(status, kind, stream)| {
        let message = format!("upstream says {status}");
        let body = json!({"type": "error", "error": {"type": kind, "message": message},
                          "request_id": "req_upstream_err"})
        .to_string();
        let up = FakeUpstream::start(move |_| {
            Reply::json_with(
                status,
                &[("retry-after", "7"), ("request-id", "req_upstream_err")],
                &body,
            )
        });
        // One account: the first request's error is the answer (the account then rests, so
        // a second request would be the gateway's own "all cooling down").
        let gw = Gateway::started(&Config::new(up.base_url()));
        let mut request = json!({"model": "claude-sonnet-4-5", "messages": [user(json!("hi"))]});
        if stream {
            request["stream"] = json!(true);
            request["stream_options"] = json!({"include_usage": true});
        }
        let resp = post_openai(&gw, CHAT_PATH, &request);

        let what = format!("{status}, stream {stream}");
        // A plain JSON error, not a 200 event stream: nothing went out before the status.
        let error = assert_openai_error(&resp, status, kind);
        assert_eq!(error["message"], message.as_str(), "{what}");
        assert!(error["param"].is_null(), "{what}: {error}");
        if status == 429 {
            assert_eq!(error["code"], "rate_limit_exceeded", "{what}: {error}");
        }
        assert_eq!(resp.header("retry-after"), Some("7"), "{what}: retry-after");
        assert_eq!(
            resp.header("request-id"),
            Some("req_upstream_err"),
            "{what}: request-id"
        );
        assert_eq!(up.requests().len(), 1, "{what}: one upstream attempt");

        // The 429 rested the only account: the next request gets the gateway's own 529,
        // still in OpenAI's shape, with the time left as retry-after.
        if status == 429 {
            let next = post_openai(&gw, CHAT_PATH, &request);
            assert_openai_error(&next, 529, "overloaded_error");
            let secs: u64 = next
                .header("retry-after")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{what}: whole-second retry-after on {next:?}"));
            // 7 s and the gateway's cooldown jitter (at most 250 ms), rounded up.
            assert!((1..=8).contains(&secs), "{what}: retry-after {secs}");
            assert_eq!(
                up.requests().len(),
                1,
                "{what}: the resting account was not used"
            );
        }
    });
}

#[test]
fn failover_moves_an_openai_request_to_the_next_account() {
    // Whichever account is used first answers 529; the other one serves.
    let up = first_account_apart(|key, first| {
        if first {
            Reply::json(529, &error_body("overloaded_error", "Overloaded", key))
        } else {
            Reply::json(
                200,
                &anthropic_message(
                    "msg_01Second",
                    json!([{"type": "text", "text": "from the second account"}]),
                    "end_turn",
                    json!({"input_tokens": 1, "output_tokens": 1}),
                ),
            )
        }
    });
    let (gw, _) = started_ab(&Config::new(up.base_url()));

    let resp = post_openai(
        &gw,
        CHAT_PATH,
        &json!({"model": "claude-sonnet-4-5", "messages": [
            {"role": "system", "content": "Be brief."}, user(json!("hi")),
        ]}),
    );

    assert_eq!(resp.status, 200, "{}", resp.text());
    let v = resp.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "from the second account"
    );
    let reqs = up.requests();
    assert_eq!(reqs.len(), 2, "one failover");
    assert_ne!(reqs[0].api_key(), reqs[1].api_key(), "another account");
    assert_eq!(
        reqs[0].body, reqs[1].body,
        "the second account gets the same converted request"
    );
    assert_eq!(system_text(&body_json(&reqs[1].body)), "Be brief.");
}

#[test]
fn upstream_prefill_refusal_is_a_400_invalid_request_error() {
    let refusal = "This model does not support assistant message prefill. The conversation must end with a user message.";
    let body =
        json!({"type": "error", "error": {"type": "invalid_request_error", "message": refusal},
                      "request_id": "req_prefill"})
        .to_string();
    let up = FakeUpstream::start(move |_| {
        Reply::json_with(400, &[("request-id", "req_prefill")], &body)
    });
    let gw = Gateway::started(&Config::new(up.base_url()));

    let resp = post_openai(
        &gw,
        CHAT_PATH,
        &json!({"model": "claude-opus-4-6", "messages": [
            user(json!("Write a haiku")),
            {"role": "assistant", "content": "Autumn"},
        ]}),
    );

    let error = assert_openai_error(&resp, 400, "invalid_request_error");
    assert_eq!(error["message"], refusal);
    assert_eq!(resp.header("request-id"), Some("req_prefill"));
    let reqs = up.requests();
    assert_eq!(reqs.len(), 1, "a request's own 400 is not retried");
    let sent = body_json(&reqs[0].body);
    assert_eq!(
        sent["messages"][1],
        json!({"role": "assistant", "content": [{"type": "text", "text": "Autumn"}]}),
        "the trailing assistant turn went upstream as sent"
    );
}

#[test]
fn wrong_method_on_the_chat_path_is_an_openai_error() {
    let (up, gw) = ok_upstream_and_gateway();
    let auth = bearer(&gw);
    let resp = call(
        gw.addr(),
        "GET",
        CHAT_PATH,
        &[("authorization", &auth)],
        b"",
    );
    assert_eq!(resp.status, 405, "{}", resp.text());
    assert_eq!(resp.header("allow"), Some("POST"));
    let v = resp.json();
    assert!(
        v["error"].is_object() && v.get("type").is_none(),
        "a client of OpenAI's path gets OpenAI's error shape: {v}"
    );
    assert!(up.requests().is_empty());
}
