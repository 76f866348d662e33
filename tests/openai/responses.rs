//! The Responses API (`POST /v1/responses`) end to end: the official openai SDK's
//! `responses.create` and `responses.stream` (`tests/sdk/openai_responses.py`) with text, a
//! function-call round trip and reasoning replayed, against a fake upstream scripted per
//! scenario; then the route's own edges (stored-response routes, compressed bodies, a budget
//! refusal) on the wire.

use serde_json::{Value, json};

use super::{
    ALIAS_SECTION, anthropic_message, block_delta, block_start, block_stop, body_json,
    message_start, scenario, sse, system_text, text_stream, usage,
};
use crate::support::{
    Config, FakeUpstream, Gateway, Recorded, Reply, assert_exit, call, require_python, run,
};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_responses.py");

fn last_turn(body: &Value) -> &Value {
    body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .unwrap_or(&Value::Null)
}

fn text_message(id: &str, text: &str) -> Reply {
    let content = json!([{"type": "text", "text": text}]);
    Reply::json(200, &anthropic_message(id, content, "end_turn", usage()))
}

fn answer(req: &Recorded) -> Reply {
    let body = body_json(&req.body);
    let answered_tool = last_turn(&body)["content"][0]["type"] == "tool_result";
    match scenario(&body).as_str() {
        "r-plain" => text_message("msg_01Plain", "Hello from Claude"),
        "r-stream" => sse(text_stream("msg_01Stream", &["one", " two", " three"])),
        "r-tools" if answered_tool => text_message("msg_01Answer", "Sunny, 21 degrees."),
        "r-tools" => Reply::json(
            200,
            &anthropic_message(
                "msg_01Tools",
                json!([{"type": "tool_use", "id": "toolu_01W", "name": "get_weather", "input": {"city": "Paris"}}]),
                "tool_use",
                usage(),
            ),
        ),
        "r-stream-tools" => sse(vec![
            message_start("msg_01StreamTools", usage()),
            block_start(
                0,
                json!({"type": "tool_use", "id": "toolu_S1", "name": "get_weather", "input": {}}),
            ),
            block_delta(
                0,
                json!({"type": "input_json_delta", "partial_json": "{\"city\":"}),
            ),
            block_delta(
                0,
                json!({"type": "input_json_delta", "partial_json": "\"Paris\"}"}),
            ),
            block_stop(0),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 7}}),
            json!({"type": "message_stop"}),
        ]),
        "r-reason" if body["messages"].as_array().map_or(0, Vec::len) > 1 => {
            text_message("msg_01Then", "Then more.")
        }
        "r-reason" => Reply::json(
            200,
            &anthropic_message(
                "msg_01Reason",
                json!([
                    {"type": "thinking", "thinking": "Because.", "signature": "sig-reason"},
                    {"type": "text", "text": "That is why."},
                ]),
                "end_turn",
                usage(),
            ),
        ),
        other => Reply::json(
            500,
            &json!({"type": "error", "error": {"type": "api_error",
                    "message": format!("no script for {other:?}")}})
            .to_string(),
        ),
    }
}

#[test]
fn the_openai_sdk_responses_create_and_stream_work_through_the_gateway() {
    require_python("import openai", "openai", "the Responses SDK test");
    let up = FakeUpstream::start(answer);
    let gw = Gateway::started(&Config::new(up.base_url()).section(ALIAS_SECTION));
    let cmd = super::python_sdk(SCRIPT, &gw);
    let out = run(cmd, None);
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    assert_exit(&out, 0, "tests/sdk/openai_responses.py");

    let reqs: Vec<Value> = up.requests().iter().map(|r| body_json(&r.body)).collect();
    let seen: Vec<(String, bool)> = (reqs.iter())
        .map(|b| (scenario(b), b["stream"] == true))
        .collect();
    let want: Vec<(String, bool)> = [
        ("r-plain", false),
        ("r-stream", true),
        ("r-tools", false),
        ("r-tools", false),
        ("r-stream-tools", true),
        ("r-reason", false),
        ("r-reason", false),
    ]
    .iter()
    .map(|(s, st)| (s.to_string(), *st))
    .collect();
    assert_eq!(
        seen, want,
        "the upstream requests, in order (the refused one never left)"
    );
    for b in &reqs {
        assert_eq!(b["model"], "claude-sonnet-4-5", "the alias's target");
    }
    assert_eq!(system_text(&reqs[0]), "Be brief.");
    // The round trip: the SDK's function_call item became tool_use, its output tool_result.
    let round = &reqs[3];
    assert_eq!(
        round["messages"][1],
        json!({"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_01W", "name": "get_weather", "input": {"city": "Paris"}}]}),
        "{round}"
    );
    assert_eq!(
        round["messages"][2]["content"][0],
        json!({"type": "tool_result", "tool_use_id": "toolu_01W", "content": "{\"temp\": 21}",
               "cache_control": {"type": "ephemeral"}}),
        "the last block of the last turn is a cache breakpoint"
    );
    assert_eq!(round["tools"][0]["name"], "get_weather");
    // Reasoning: effort low is the chat route's budget; the replayed history carries the
    // thinking block with its signature.
    assert_eq!(
        reqs[5]["thinking"],
        json!({"type": "enabled", "budget_tokens": 1024})
    );
    assert_eq!(
        reqs[6]["messages"][1]["content"][0],
        json!({"type": "thinking", "thinking": "Because.", "signature": "sig-reason"}),
        "{}",
        reqs[6]
    );
}

#[test]
fn the_routes_edges_answer_clearly_in_openais_shape() {
    let up = FakeUpstream::start(|_| text_message("msg_01X", "ok"));
    let mut gw = Gateway::new(&Config::new(up.base_url()));
    gw.add_api_key("primary", crate::support::ACCOUNT_KEY);
    let out = gw.run_cli(&[
        "add-client-key",
        "--name",
        "capped",
        "--daily-usd",
        "0.000001",
        "--json",
    ]);
    assert_exit(&out, 0, "add-client-key");
    let capped: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let capped = capped["key"].as_str().expect("key").to_string();
    let key = gw.add_client_key("plain");
    gw.start();
    let bearer = format!("Bearer {key}");
    let post = |path: &str, headers: &[(&str, &str)], body: &[u8]| {
        let mut all = vec![
            ("authorization", bearer.as_str()),
            ("content-type", "application/json"),
        ];
        all.extend_from_slice(headers);
        call(gw.addr(), "POST", path, &all, body)
    };
    let body = json!({"model": "claude-haiku-4-5", "input": "hi"}).to_string();
    let ok = post("/responses", &[], body.as_bytes());
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.json()["output"][0]["content"][0]["text"], "ok");

    for path in [
        "/v1/responses/resp_1",
        "/v1/responses/compact",
        "/v1/responses/resp_1/input_items",
    ] {
        let resp = post(path, &[], body.as_bytes());
        assert_eq!(resp.status, 404, "{path}");
        assert!(
            resp.json()["error"]["message"].as_str().is_some(),
            "OpenAI's shape: {}",
            resp.text()
        );
    }
    let gz = post(
        "/v1/responses",
        &[("content-encoding", "gzip")],
        b"\x1f\x8b\x08\x00",
    );
    assert_eq!(gz.status, 415, "{}", gz.text());
    assert!(gz.text().contains("content-encoding"), "{}", gz.text());

    // A budget spent is OpenAI's own insufficient_quota on this route too.
    let capped_bearer = format!("Bearer {capped}");
    let spend = |n: usize| {
        let body =
            json!({"model": "claude-haiku-4-5", "input": format!("q{n}"), "max_output_tokens": 5});
        call(
            gw.addr(),
            "POST",
            "/v1/responses",
            &[
                ("authorization", capped_bearer.as_str()),
                ("content-type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
    };
    // The first is admitted (nothing spent or reserved yet) and spends past the budget.
    assert_eq!(spend(0).status, 200);
    // Charged before its last byte went out: the next is refused at once.
    let refused = spend(1);
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(
        refused.json()["error"]["code"],
        "insufficient_quota",
        "{}",
        refused.text()
    );
    assert_eq!(refused.json()["error"]["type"], "insufficient_quota");
    assert_eq!(refused.header("x-should-retry"), Some("false"));
    assert_eq!(up.requests().len(), 2, "the refusal never went upstream");
}
