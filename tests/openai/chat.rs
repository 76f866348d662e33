//! Non-streaming Chat Completions: the Anthropic request the upstream receives, the
//! `chat.completion` the client gets back, and tool calls and tool results going round.

use serde_json::{Value, json};

use super::{
    ALIAS_SECTION, CHAT_PATH, anthropic_message, assert_created_now, body_json, post_openai,
    system_text,
};
use crate::support::{ACCOUNT_KEY, Config, FakeUpstream, Gateway, Reply, now_unix, sorted_keys};

/// A tool definition as OpenAI clients send it.
fn weather_tool() -> Value {
    json!({
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    })
}

#[test]
fn chat_request_is_converted_and_the_answer_is_a_chat_completion() {
    let up = FakeUpstream::start(|_| {
        Reply::json_with(
            200,
            &[("request-id", "req_plain")],
            &anthropic_message(
                "msg_01Plain",
                json!([
                    {"type": "thinking", "thinking": "French, then.", "signature": "EqQBCgIYAhIM"},
                    {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"},
                    {"type": "text", "text": "Bonjour"},
                    {"type": "text", "text": " !"},
                ]),
                "end_turn",
                json!({
                    "input_tokens": 100,
                    "output_tokens": 25,
                    "cache_creation_input_tokens": 10,
                    "cache_read_input_tokens": 50,
                }),
            ),
        )
    });
    let config =
        Config::new(up.base_url()).section(&format!("{ALIAS_SECTION}  default_max_tokens: 1234\n"));
    let gw = Gateway::started(&config);
    let request = json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello"},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {"role": "user", "content": [{"type": "text", "text": "What is the weather?"}]},
        ],
        "tools": [weather_tool()],
        "tool_choice": "required",
        "temperature": 0.5,
        "seed": 7,
        "presence_penalty": 0,
    });

    let before = now_unix();
    let resp = post_openai(&gw, CHAT_PATH, &request);
    let after = now_unix();

    // What went upstream: one Anthropic Messages request with the account's key.
    let reqs = up.requests();
    assert_eq!(reqs.len(), 1, "one upstream request");
    let req = &reqs[0];
    assert_eq!(
        (req.method.as_str(), req.target.as_str()),
        ("POST", "/v1/messages")
    );
    assert_eq!(req.all("x-api-key"), vec![ACCOUNT_KEY], "the account's key");
    assert!(
        req.header("authorization").is_none(),
        "the client's bearer key stays at the gateway"
    );
    assert!(
        req.header("anthropic-version").is_some(),
        "Anthropic needs anthropic-version"
    );
    let sent = body_json(&req.body);
    assert_eq!(sent["model"], "claude-sonnet-4-5", "alias → upstream model");
    assert_eq!(
        system_text(&sent),
        "You are terse.\nAnswer in French.",
        "system and developer hoisted, in order: {sent}"
    );
    assert_eq!(
        sent["messages"],
        json!([{"role": "user", "content": [
            {"type": "text", "text": "Hello"},
            {"type": "text", "text": "What is the weather?"},
        ]}]),
        "the two user turns merge into one, with two text blocks"
    );
    assert_eq!(sent["max_tokens"], 1234, "models.default_max_tokens");
    assert_eq!(
        sent["tools"],
        json!([{
            "name": "get_weather",
            "description": "Current weather in a city",
            "input_schema": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        }])
    );
    assert_eq!(
        sent["tool_choice"],
        json!({"type": "any"}),
        "required → any"
    );
    assert_eq!(sent["temperature"], 0.5);
    assert!(
        matches!(sent.get("stream"), None | Some(Value::Bool(false))),
        "not a stream: {sent}"
    );
    let mut keys = sorted_keys(&sent);
    keys.retain(|k| *k != "stream");
    assert_eq!(
        keys,
        [
            "max_tokens",
            "messages",
            "model",
            "system",
            "temperature",
            "tool_choice",
            "tools"
        ],
        "seed and presence_penalty are dropped, nothing else added: {sent}"
    );

    // What came back: a chat.completion naming the model the client asked for.
    assert_eq!(resp.status, 200, "body: {}", resp.text());
    assert!(
        resp.header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "content-type {:?}",
        resp.header("content-type")
    );
    let v = resp.json();
    assert_eq!(v["id"], "chatcmpl-01Plain");
    assert_eq!(v["object"], "chat.completion");
    assert_created_now(&v, before, after);
    assert_eq!(v["model"], "gpt-4o", "the name the client asked for");
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 1, "exactly one choice: {v}");
    let choice = &choices[0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["finish_reason"], "stop", "end_turn → stop");
    let message = &choice["message"];
    assert_eq!(message["role"], "assistant");
    assert_eq!(message["content"], "Bonjour !", "text blocks concatenated");
    assert_eq!(
        message["reasoning_content"], "French, then.",
        "thinking as reasoning_content; redacted thinking and signatures dropped"
    );
    assert!(
        message.get("refusal").is_some_and(Value::is_null),
        "refusal: null: {message}"
    );
    assert!(
        message
            .get("tool_calls")
            .is_none_or(|t| t.is_null() || t.as_array().is_some_and(Vec::is_empty)),
        "no tool calls: {message}"
    );
    let usage = &v["usage"];
    assert_eq!(
        usage["prompt_tokens"], 160,
        "input + cache creation + cache read: {usage}"
    );
    assert_eq!(usage["completion_tokens"], 25);
    assert_eq!(usage["total_tokens"], 185);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 50);
}

#[test]
fn stop_reasons_map_to_finish_reasons() {
    // (Anthropic stop_reason, OpenAI finish_reason), spec §2 and case 13.
    let cases: [(&str, &str); 7] = [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("pause_turn", "stop"),
        ("refusal", "content_filter"),
        ("some_future_reason", "stop"),
    ];
    let up = FakeUpstream::start(|req| {
        // The stop reason to answer with is the user's text.
        let sent = body_json(&req.body);
        let reason = sent["messages"][0]["content"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        Reply::json(
            200,
            &anthropic_message(
                "msg_01Stop",
                json!([{"type": "text", "text": "x"}]),
                &reason,
                json!({"input_tokens": 1, "output_tokens": 1}),
            ),
        )
    });
    let gw = Gateway::started(&Config::new(up.base_url()));
    for (stop_reason, finish_reason) in cases {
        // `/chat/completions` (no /v1) is OpenAI's path too.
        let resp = post_openai(
            &gw,
            "/chat/completions",
            &json!({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": stop_reason}]}),
        );
        assert_eq!(resp.status, 200, "{stop_reason}: {}", resp.text());
        assert_eq!(
            resp.json()["choices"][0]["finish_reason"],
            finish_reason,
            "stop_reason {stop_reason}"
        );
    }
    assert_eq!(up.requests().len(), cases.len());
}

/// The `tool_calls` of a response message, as (id, name, parsed arguments).
fn tool_calls(message: &Value) -> Vec<(String, String, Value)> {
    message["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool_calls in {message}"))
        .iter()
        .map(|call| {
            assert_eq!(call["type"], "function", "{call}");
            let arguments = call["function"]["arguments"]
                .as_str()
                .unwrap_or_else(|| panic!("arguments must be a JSON string: {call}"));
            let parsed: Value = serde_json::from_str(arguments)
                .unwrap_or_else(|e| panic!("arguments are not JSON ({e}): {arguments}"));
            (
                call["id"].as_str().expect("tool call id").to_string(),
                call["function"]["name"]
                    .as_str()
                    .expect("function name")
                    .to_string(),
                parsed,
            )
        })
        .collect()
}

#[test]
fn tool_calls_and_tool_results_round_trip() {
    let usage = json!({"input_tokens": 20, "output_tokens": 10});
    let answers = [
        // Spec 11: text, a tool call, more text.
        anthropic_message(
            "msg_01Tool",
            json!([
                {"type": "text", "text": "Let me check. "},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "text", "text": "One moment."},
            ]),
            "tool_use",
            usage.clone(),
        ),
        // Spec 12: only tool calls.
        anthropic_message(
            "msg_02Tools",
            json!([
                {"type": "tool_use", "id": "toolu_A", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_B", "name": "get_weather", "input": {"city": "Tokyo", "unit": {"deg": "C"}}},
            ]),
            "tool_use",
            usage.clone(),
        ),
        anthropic_message(
            "msg_03Done",
            json!([{"type": "text", "text": "Sunny in Paris, rain in Tokyo."}]),
            "end_turn",
            usage.clone(),
        ),
        anthropic_message(
            "msg_04Done",
            json!([{"type": "text", "text": "42 it is."}]),
            "end_turn",
            usage,
        ),
    ];
    let mut next = answers.into_iter();
    let up = FakeUpstream::start(move |_| {
        Reply::json(200, &next.next().expect("no more scripted answers"))
    });
    let gw = Gateway::started(&Config::new(up.base_url()));
    let ask = json!({"role": "user", "content": "Weather in Paris and Tokyo?"});

    // 1. Text around a tool call: the text is joined, the call is listed.
    let first = post_openai(
        &gw,
        CHAT_PATH,
        &json!({"model": "claude-sonnet-4-5", "messages": [ask], "tools": [weather_tool()]}),
    );
    assert_eq!(first.status, 200, "{}", first.text());
    let choice = &first.json()["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], "Let me check. One moment.");
    assert_eq!(
        tool_calls(&choice["message"]),
        [(
            "toolu_01".to_string(),
            "get_weather".to_string(),
            json!({"city": "Paris"})
        )]
    );

    // 2. Only tool calls: content is null.
    let second = post_openai(
        &gw,
        CHAT_PATH,
        &json!({"model": "claude-sonnet-4-5", "messages": [ask], "tools": [weather_tool()]}),
    );
    assert_eq!(second.status, 200, "{}", second.text());
    let v = second.json();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert!(
        choice["message"]["content"].is_null(),
        "content null with only tool calls: {v}"
    );
    let calls = tool_calls(&choice["message"]);
    assert_eq!(
        calls,
        [
            (
                "toolu_A".to_string(),
                "get_weather".to_string(),
                json!({"city": "Paris"})
            ),
            (
                "toolu_B".to_string(),
                "get_weather".to_string(),
                json!({"city": "Tokyo", "unit": {"deg": "C"}})
            ),
        ]
    );

    // 3. Spec 3: the client replays the assistant turn as it got it (content null, both calls)
    // and answers each call, then says more.
    let assistant = json!({
        "role": "assistant",
        "content": null,
        "tool_calls": v["choices"][0]["message"]["tool_calls"],
    });
    let third = post_openai(
        &gw,
        CHAT_PATH,
        &json!({
            "model": "claude-sonnet-4-5",
            "tools": [weather_tool()],
            "messages": [
                ask,
                assistant,
                {"role": "tool", "tool_call_id": "toolu_A", "content": "sunny"},
                {"role": "tool", "tool_call_id": "toolu_B", "content": [{"type": "text", "text": "rain"}]},
                {"role": "user", "content": "go on"},
            ],
        }),
    );
    assert_eq!(third.status, 200, "{}", third.text());
    assert_eq!(
        third.json()["choices"][0]["message"]["content"],
        "Sunny in Paris, rain in Tokyo."
    );

    // 4. Spec 4: a user message between the call and its result; an id Anthropic would
    // refuse (a dot), and empty arguments.
    let fourth = post_openai(
        &gw,
        CHAT_PATH,
        &json!({
            "model": "claude-sonnet-4-5",
            "tools": [weather_tool()],
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "calling", "tool_calls": [
                    {"id": "call.9", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
                ]},
                {"role": "user", "content": "also this"},
                {"role": "tool", "tool_call_id": "call.9", "content": "42"},
            ],
        }),
    );
    assert_eq!(fourth.status, 200, "{}", fourth.text());

    let reqs = up.requests();
    assert_eq!(reqs.len(), 4);
    for req in &reqs {
        assert_eq!(req.target, "/v1/messages");
        let sent = body_json(&req.body);
        assert_eq!(
            sent["max_tokens"], 8192,
            "the default max_tokens without a models section"
        );
        assert_eq!(sent["tools"][0]["name"], "get_weather");
        assert!(
            sent.get("tool_choice").is_none(),
            "no tool_choice given, none sent: {sent}"
        );
    }
    let third_sent = body_json(&reqs[2].body);
    assert_eq!(
        third_sent["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Tokyo?"}]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_A", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_B", "name": "get_weather", "input": {"city": "Tokyo", "unit": {"deg": "C"}}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_A", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_B", "content": [{"type": "text", "text": "rain"}]},
                {"type": "text", "text": "go on"},
            ]},
        ]),
        "spec 3: no empty text block; both results in one user turn, before the text"
    );
    let fourth_sent = body_json(&reqs[3].body);
    assert_eq!(
        fourth_sent["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "q"}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "calling"},
                {"type": "tool_use", "id": "call_9", "name": "get_weather", "input": {}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_9", "content": "42"},
                {"type": "text", "text": "also this"},
            ]},
        ]),
        "spec 4: the tool_result moves first; the id is sanitised the same on both sides; \
         empty arguments are {{}}"
    );
}
