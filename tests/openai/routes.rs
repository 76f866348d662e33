//! Which format a request is served in: a body clearly in the other API's format than its path
//! is served as what it is, both ways; and the model list in the caller's format, with the
//! configured aliases.

use serde_json::{Value, json};

use super::{
    ALIAS_SECTION, CHAT_PATH, anthropic_message, bearer, body_json, chunks_until_done, open_stream,
    system_text,
};
use crate::support::accounts::unix_from_rfc3339;
use crate::support::{
    Config, FakeUpstream, Framing, Gateway, Reply, StreamEnd, call, open_sse, sse_events,
};

#[test]
fn openai_body_posted_to_messages_is_answered_in_openai_format() {
    let up = FakeUpstream::start(|req| {
        if body_json(&req.body)["stream"] == true {
            Reply::Sse {
                events: sse_events(2),
                gate: None,
                framing: Framing::Chunked,
            }
        } else {
            Reply::json(
                200,
                &anthropic_message(
                    "msg_01Detect",
                    json!([{"type": "text", "text": "hello"}]),
                    "end_turn",
                    json!({"input_tokens": 3, "output_tokens": 1}),
                ),
            )
        }
    });
    let gw = Gateway::started(&Config::new(up.base_url()));

    // A system role is OpenAI's; the key comes as an Anthropic client sends it.
    let body = json!({"model": "claude-sonnet-4-5", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]});
    let resp = call(
        gw.addr(),
        "POST",
        "/v1/messages",
        &[gw.auth(), ("content-type", "application/json")],
        body.to_string().as_bytes(),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let v = resp.json();
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert_eq!(v["id"], "chatcmpl-01Detect");
    assert_eq!(v["choices"][0]["message"]["content"], "hello");
    let reqs = up.requests();
    assert_eq!(reqs[0].target, "/v1/messages");
    let sent = body_json(&reqs[0].body);
    assert_eq!(system_text(&sent), "Be brief.", "converted: {sent}");
    assert_eq!(
        sent["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    );
    assert_eq!(sent["max_tokens"], 8192);

    // stream_options is OpenAI's: the stream comes back as chunks.
    let mut sse = open_stream(
        &gw,
        "/v1/messages",
        &json!({"model": "claude-sonnet-4-5", "stream": true,
                "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": "count"}]}),
    );
    let parsed = chunks_until_done(&mut sse);
    assert!(
        parsed
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk"),
        "{parsed:?}"
    );
    assert_eq!(parsed[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = parsed
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "word0 word1 ");
    let usage = parsed.last().expect("usage chunk");
    assert_eq!(usage["choices"], json!([]), "{usage}");
    assert_eq!(usage["usage"]["prompt_tokens"], 12);
    assert_eq!(usage["usage"]["completion_tokens"], 9);
}

#[test]
fn anthropic_body_posted_to_chat_completions_passes_through() {
    let reply = "{\"id\":\"msg_01Pass\" , \"type\":\"message\",\"role\":\"assistant\",\"content\":[{\"type\":\"text\",\"text\":\"hi\"}],\"stop_reason\":\"end_turn\",\"usage\":{\"input_tokens\":4,\"output_tokens\":1}}\n";
    let events = sse_events(3);
    let scripted = events.clone();
    let up = FakeUpstream::start(move |req| {
        if body_json(&req.body)["stream"] == true {
            Reply::Sse {
                events: scripted.clone(),
                gate: None,
                framing: Framing::Chunked,
            }
        } else {
            Reply::json_with(200, &[("request-id", "req_pass")], reply)
        }
    });
    let gw = Gateway::started(&Config::new(up.base_url()));
    let auth = bearer(&gw);

    // A top-level system is Anthropic's. Odd spacing shows the body is not re-serialised.
    let body = "{ \"model\":\"claude-sonnet-4-5\",\"max_tokens\": 64,\n  \"system\" : \"Be brief.\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"h\\u00e9llo\"}]}] }";
    let resp = call(
        gw.addr(),
        "POST",
        CHAT_PATH,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), reply, "Anthropic's answer, unchanged");
    assert_eq!(resp.header("request-id"), Some("req_pass"));

    // tool_result parts are Anthropic's: a stream passes through event for event.
    let stream_body = "{\"model\":\"claude-sonnet-4-5\",\"max_tokens\":64,\"stream\":true,\"tools\":[{\"name\":\"f\",\"input_schema\":{\"type\":\"object\"}}],\"messages\":[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":[{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"f\",\"input\":{}}]},{\"role\":\"user\",\"content\":[{\"type\":\"tool_result\",\"tool_use_id\":\"toolu_1\",\"content\":\"42\"}]}]}";
    let mut sse = open_sse(
        gw.addr(),
        CHAT_PATH,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
            ("connection", "close"),
        ],
        stream_body.as_bytes(),
    );
    let mut received = String::new();
    while let Some(ev) = sse.next_event() {
        received.push_str(&ev.raw);
    }
    assert_eq!(received, events.concat(), "Anthropic's events, unchanged");
    assert_eq!(sse.end(), Some(&StreamEnd::Clean));

    let reqs = up.requests();
    assert_eq!(reqs.len(), 2);
    for (req, sent) in reqs.iter().zip([body, stream_body]) {
        assert_eq!(
            (req.method.as_str(), req.target.as_str()),
            ("POST", "/v1/messages")
        );
        assert_eq!(
            req.body,
            sent.as_bytes(),
            "the upstream gets the client's bytes"
        );
    }
}

/// An Anthropic model list of two models, as `GET /v1/models` answers.
const MODEL_LIST: &str = r#"{"data":[{"type":"model","id":"claude-sonnet-4-5","display_name":"Claude Sonnet 4.5","created_at":"2025-09-29T00:00:00Z"},{"type":"model","id":"claude-opus-4-1","display_name":"Claude Opus 4.1","created_at":"2025-08-05T00:00:00Z"}],"has_more":false,"first_id":"claude-sonnet-4-5","last_id":"claude-opus-4-1"}"#;
const ONE_MODEL: &str = r#"{"type":"model","id":"claude-sonnet-4-5","display_name":"Claude Sonnet 4.5","created_at":"2025-09-29T00:00:00Z"}"#;

/// The fake upstream's model endpoints; unknown ids are Anthropic's 404.
fn models_upstream() -> FakeUpstream {
    FakeUpstream::start(|req| {
        let path = req.target.split('?').next().unwrap_or_default();
        match path {
            "/v1/models" => Reply::json(200, MODEL_LIST),
            "/v1/models/claude-sonnet-4-5" => Reply::json(200, ONE_MODEL),
            _ => Reply::json_with(
                404,
                &[("request-id", "req_404")],
                &json!({"type": "error", "error": {"type": "not_found_error",
                        "message": format!("model: {}", path.trim_start_matches("/v1/models/"))}})
                .to_string(),
            ),
        }
    })
}

/// `GET path` with the gateway key as a bearer; `anthropic` adds the header Anthropic's SDK sends.
fn get(gw: &Gateway, path: &str, anthropic: bool) -> crate::support::Response {
    let auth = bearer(gw);
    let mut headers = vec![("authorization", auth.as_str())];
    if anthropic {
        headers.push(("anthropic-version", "2023-06-01"));
    }
    call(gw.addr(), "GET", path, &headers, b"")
}

/// Checks an OpenAI model object.
fn assert_model(m: &Value, id: &str, owned_by: &str) {
    assert_eq!(m["id"], id, "{m}");
    assert_eq!(m["object"], "model", "{m}");
    assert_eq!(m["owned_by"], owned_by, "{m}");
    assert!(m["created"].is_u64(), "created is Unix seconds: {m}");
}

#[test]
fn model_list_comes_in_the_callers_format_with_aliases() {
    let up = models_upstream();
    let gw = Gateway::started(&Config::new(up.base_url()).section(ALIAS_SECTION));

    // With anthropic-version: Anthropic's answer as it came.
    let anthropic = get(&gw, "/v1/models", true);
    assert_eq!(anthropic.status, 200, "{}", anthropic.text());
    assert_eq!(anthropic.text(), MODEL_LIST);

    // Without: OpenAI's list, every upstream model and then the aliases.
    let list = get(&gw, "/v1/models", false);
    assert_eq!(list.status, 200, "{}", list.text());
    let v = list.json();
    assert_eq!(v["object"], "list", "{v}");
    let data = v["data"].as_array().expect("data");
    assert_eq!(data.len(), 3, "two models and one alias: {v}");
    assert_model(&data[0], "claude-sonnet-4-5", "anthropic");
    assert_eq!(
        data[0]["created"].as_u64(),
        Some(unix_from_rfc3339("2025-09-29T00:00:00Z") as u64),
        "created from created_at"
    );
    assert_model(&data[1], "claude-opus-4-1", "anthropic");
    assert_model(&data[2], "gpt-4o", "llm-gateway");

    // One model, OpenAI's shape.
    let one = get(&gw, "/v1/models/claude-sonnet-4-5", false);
    assert_eq!(one.status, 200, "{}", one.text());
    assert_model(&one.json(), "claude-sonnet-4-5", "anthropic");

    // An unknown model: the upstream's 404, in OpenAI's shape.
    let missing = get(&gw, "/v1/models/claude-nope", false);
    let error = super::assert_openai_error(&missing, 404, "not_found_error");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("claude-nope")),
        "{error}"
    );
    assert_eq!(missing.header("request-id"), Some("req_404"));

    let targets: Vec<String> = up.requests().iter().map(|r| r.target.clone()).collect();
    assert_eq!(
        targets,
        [
            "/v1/models",
            "/v1/models?limit=1000",
            "/v1/models/claude-sonnet-4-5",
            "/v1/models/claude-nope",
        ],
        "OpenAI clients get every model, not Anthropic's first page"
    );
    for req in up.requests() {
        assert_eq!(req.method, "GET");
        assert!(req.header("authorization").is_none());
    }
}

/// The contract lists aliases as models; an OpenAI client may then retrieve one by the id the
/// list gave it (the stricter reading of "`/v1/models/{id}`").
#[test]
fn an_alias_listed_as_a_model_can_be_retrieved() {
    let up = models_upstream();
    let gw = Gateway::started(&Config::new(up.base_url()).section(ALIAS_SECTION));
    let resp = get(&gw, "/v1/models/gpt-4o", false);
    assert_eq!(
        resp.status,
        200,
        "GET /v1/models/gpt-4o, an id /v1/models lists: {}",
        resp.text()
    );
    let v = resp.json();
    assert_eq!(v["id"], "gpt-4o", "{v}");
    assert_eq!(v["object"], "model", "{v}");
}
