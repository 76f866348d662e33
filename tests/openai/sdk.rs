//! The official `openai` Python SDK against the gateway: `tests/sdk/openai_sdk.py` makes the
//! calls an OpenAI application makes (plain, streamed with and without usage, tools and tool
//! results, streamed tool calls, an image, refused and rate-limited requests) and checks what
//! the SDK parses; this test scripts the fake upstream for those calls, runs the script, and
//! checks what reached the upstream.
//!
//! The SDK is a test dependency (`tests/sdk/requirements.txt`, installed by `make test`). When
//! it is missing the test fails and says how to install it: a skipped SDK check would pass
//! silently on exactly the machine where nobody looked.

use serde_json::{Value, json};

use super::{
    ALIAS_SECTION, anthropic_message, block_delta, block_start, block_stop, body_json,
    message_start, scenario, sse, text_stream, usage,
};
use crate::support::{
    Config, FakeUpstream, Gateway, Recorded, Reply, assert_exit, require_python, run,
};

/// The script (run with `support::PYTHON`).
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_sdk.py");

/// The 1×1 PNG the script sends as a data URL.
const PIXEL_PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==";

/// Whether the last turn carries tool results.
fn answers_tools(body: &Value) -> bool {
    body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_array())
        .is_some_and(|blocks| blocks.iter().any(|b| b["type"] == "tool_result"))
}

/// The fake upstream's script for the SDK's calls.
fn answer(req: &Recorded) -> Reply {
    let body = body_json(&req.body);
    match scenario(&body).as_str() {
        "plain" => Reply::json(
            200,
            &anthropic_message(
                "msg_01Plain",
                json!([{"type": "text", "text": "Hello from Claude"}]),
                "end_turn",
                usage(),
            ),
        ),
        "stream" => sse(text_stream("msg_01Stream", &["one", " two", " three"])),
        "tools" if answers_tools(&body) => Reply::json(
            200,
            &anthropic_message(
                "msg_01Answer",
                json!([{"type": "text", "text": "Sunny in Paris; 21:00 in Tokyo."}]),
                "end_turn",
                usage(),
            ),
        ),
        "tools" => Reply::json(
            200,
            &anthropic_message(
                "msg_01Tools",
                json!([
                    {"type": "tool_use", "id": "toolu_01W", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_01T", "name": "get_time", "input": {"tz": "Asia/Tokyo"}},
                ]),
                "tool_use",
                usage(),
            ),
        ),
        "stream-tools" => sse(vec![
            message_start("msg_01StreamTools", usage()),
            block_start(0, json!({"type": "text", "text": ""})),
            block_delta(0, json!({"type": "text_delta", "text": "Checking."})),
            block_stop(0),
            block_start(
                1,
                json!({"type": "tool_use", "id": "toolu_S1", "name": "get_weather", "input": {}}),
            ),
            block_start(
                2,
                json!({"type": "tool_use", "id": "toolu_S2", "name": "get_time", "input": {}}),
            ),
            block_delta(
                1,
                json!({"type": "input_json_delta", "partial_json": "{\"city\":"}),
            ),
            block_delta(
                2,
                json!({"type": "input_json_delta", "partial_json": "{\"tz\":\"Asia/Tokyo\"}"}),
            ),
            block_delta(
                1,
                json!({"type": "input_json_delta", "partial_json": "\"Paris\"}"}),
            ),
            block_stop(1),
            block_stop(2),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 7}}),
            json!({"type": "message_stop"}),
        ]),
        "image" => Reply::json(
            200,
            &anthropic_message(
                "msg_01Image",
                json!([{"type": "text", "text": "A single red pixel."}]),
                "end_turn",
                usage(),
            ),
        ),
        "stream-error" => sse(vec![
            message_start("msg_01Broken", usage()),
            block_start(0, json!({"type": "text", "text": ""})),
            block_delta(0, json!({"type": "text_delta", "text": "Hel"})),
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        ]),
        "rate-limit" => Reply::json_with(
            429,
            &[("retry-after", "7"), ("request-id", "req_sdk_429")],
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"}}"#,
        ),
        other => Reply::json(
            500,
            &json!({"type": "error", "error": {"type": "api_error",
                    "message": format!("the fake upstream has no script for {other:?}")}})
            .to_string(),
        ),
    }
}

/// Fails, saying how to install it, unless `import openai` works.
fn require_openai_package() {
    let version = require_python(
        "import openai; print(openai.__version__)",
        "openai",
        "the openai SDK test",
    );
    eprintln!("openai SDK {}", version.trim());
}

#[test]
fn the_openai_python_sdk_works_against_the_gateway() {
    require_openai_package();
    let up = FakeUpstream::start(answer);
    let gw = Gateway::started(&Config::new(up.base_url()).section(ALIAS_SECTION));

    let cmd = super::python_sdk(SCRIPT, &gw);
    let out = run(cmd, None);
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    assert_exit(&out, 0, "tests/sdk/openai_sdk.py");

    // What reached the upstream: every call but the refused n=2, converted.
    let reqs = up.requests();
    let seen: Vec<(String, bool)> = reqs
        .iter()
        .map(|r| {
            let body = body_json(&r.body);
            (scenario(&body), body["stream"] == true)
        })
        .collect();
    let expected: Vec<(String, bool)> = [
        ("plain", false),
        ("stream", true),
        ("stream", true),
        ("tools", false),
        ("tools", false),
        ("stream-tools", true),
        ("image", false),
        ("stream-error", true),
        ("rate-limit", false),
    ]
    .iter()
    .map(|(s, stream)| (s.to_string(), *stream))
    .collect();
    assert_eq!(seen, expected, "the upstream requests, in order");
    for req in &reqs {
        assert_eq!(req.target, "/v1/messages");
        assert!(
            req.header("authorization").is_none(),
            "the SDK's bearer key went upstream"
        );
        assert_eq!(body_json(&req.body)["model"], "claude-sonnet-4-5");
    }
    let image = body_json(&reqs[6].body);
    assert_eq!(
        image["messages"][0]["content"][1],
        json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL_PNG}}),
        "the data URL became a base64 image"
    );
    // The assistant message the SDK returned, sent back as the SDK serialises it (with its
    // null fields), became tool_use blocks answered by tool_result blocks.
    let results = body_json(&reqs[4].body);
    assert_eq!(
        results["messages"][1],
        json!({"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_01W", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_01T", "name": "get_time", "input": {"tz": "Asia/Tokyo"}},
        ]}),
        "{results}"
    );
    let blocks = results["messages"][2]["content"]
        .as_array()
        .expect("tool results");
    let ids: Vec<&Value> = blocks.iter().map(|b| &b["tool_use_id"]).collect();
    assert_eq!(ids, [&json!("toolu_01W"), &json!("toolu_01T")], "{results}");
    assert!(
        blocks.iter().all(|b| b["type"] == "tool_result"),
        "{results}"
    );
}
