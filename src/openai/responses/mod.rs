//! The OpenAI Responses API (`POST /v1/responses`), converted to Anthropic Messages and
//! back: `request` (the request), this file (the `response` object and its output items,
//! made from a whole message), `stream` (Anthropic SSE → Responses events). Pure functions, no
//! I/O; table-tested from fixtures in tests/data/openai/responses/.

mod input;
pub mod request;
pub mod stream;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use request::REDACTED;

/// What the answer's conversion needs from the request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    /// The model the client asked for, reported back.
    pub model: String,
    /// Tools whose calls go back as `custom_tool_call` (their input is one string).
    pub custom_tools: Vec<String>,
    /// `prompt_cache_key`: the conversation, which the sticky session follows.
    pub session: Option<String>,
}

/// The response id: Anthropic's message id behind OpenAI's prefix.
pub fn response_id(message_id: &str) -> String {
    format!(
        "resp_{}",
        message_id.strip_prefix("msg_").unwrap_or(message_id)
    )
}

/// The Responses `usage` from Anthropic's: input counts both cache counts (Anthropic's
/// `input_tokens` excludes them), cached tokens are the cache reads; Anthropic does not count
/// thinking apart, so reasoning tokens are 0.
pub fn usage(u: &Value) -> Value {
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let input = n("input_tokens")
        .saturating_add(n("cache_creation_input_tokens"))
        .saturating_add(n("cache_read_input_tokens"));
    let output = n("output_tokens");
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": n("cache_read_input_tokens")},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input.saturating_add(output),
    })
}

/// `status` and `incomplete_details` for Anthropic's `stop_reason`.
fn status(stop_reason: Option<&str>) -> (&'static str, Value) {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => {
            ("incomplete", json!({"reason": "max_output_tokens"}))
        }
        Some("refusal") => ("incomplete", json!({"reason": "content_filter"})),
        _ => ("completed", Value::Null),
    }
}

/// A `response` object, in the fields the openai SDK and Codex read.
pub fn response_object(
    id: &str,
    reply: &Reply,
    created_at: u64,
    state: (&str, Value),
    output: Vec<Value>,
    usage: Value,
) -> Value {
    let (status, incomplete) = state;
    let error = if status == "failed" {
        incomplete.clone()
    } else {
        Value::Null
    };
    let incomplete = if status == "incomplete" {
        incomplete
    } else {
        Value::Null
    };
    json!({
        "id": id, "object": "response", "created_at": created_at, "status": status,
        "error": error, "incomplete_details": incomplete, "model": reply.model,
        "output": output, "usage": usage, "parallel_tool_calls": true, "tool_choice": "auto",
        "tools": [], "store": false, "metadata": {}, "instructions": null,
        "temperature": null, "top_p": null, "text": {"format": {"type": "text"}},
    })
}

/// An output message holding one text.
pub fn message_item(id: &str, text: &str, status: &str) -> Value {
    let content = if status == "in_progress" {
        json!([])
    } else {
        json!([{"type": "output_text", "text": text, "annotations": []}])
    };
    json!({"type": "message", "id": id, "status": status, "role": "assistant", "content": content})
}

/// A tool call: `function_call` with its JSON `arguments`, or, for a custom tool,
/// `custom_tool_call` with its `input` string.
pub fn call_item(
    reply: &Reply,
    id: &str,
    call_id: &str,
    name: &str,
    arguments: &str,
    status: &str,
) -> Value {
    if reply.custom_tools.iter().any(|t| t == name) {
        let input: Value = crate::json::from_str(arguments).unwrap_or_default();
        let input = input.get("input").and_then(Value::as_str).unwrap_or("");
        return json!({"type": "custom_tool_call", "id": id, "call_id": call_id, "name": name,
            "input": input, "status": status});
    }
    json!({"type": "function_call", "id": id, "call_id": call_id, "name": name,
        "arguments": arguments, "status": status})
}

/// A reasoning item: the thinking as its summary, and its signature (or a redacted block's
/// data) as `encrypted_content`, always: the gateway keeps no state, so the signature must
/// travel with the history for a next turn with thinking to be accepted (asking for it in
/// `include` changes nothing).
pub fn reasoning_item(
    id: &str,
    thinking: &str,
    signature: Option<&str>,
    redacted: Option<&str>,
) -> Value {
    let summary = if thinking.is_empty() {
        json!([])
    } else {
        json!([{"type": "summary_text", "text": thinking}])
    };
    let mut item = json!({"type": "reasoning", "id": id, "summary": summary});
    let encrypted = match redacted {
        Some(data) => Some(format!("{REDACTED}{data}")),
        None => signature.map(String::from),
    };
    if let Some(e) = encrypted {
        item["encrypted_content"] = e.into();
    }
    item
}

/// The fields of a message a response is made of; blocks are parsed one at a time.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(default)]
    id: Value,
    #[serde(borrow, default)]
    content: Vec<&'a RawValue>,
    #[serde(default)]
    stop_reason: Value,
    #[serde(default)]
    usage: Value,
}

/// A converted whole answer, and the message's usage (for the ledger).
pub struct Converted {
    pub body: Vec<u8>,
    pub usage: Value,
}

/// An Anthropic message → a `response` object.
pub fn response(
    body: &[u8],
    reply: &Reply,
    created_at: u64,
) -> Result<Converted, serde_json::Error> {
    let m: Message = crate::json::from_slice(body)?;
    let message_id = m.id.as_str().unwrap_or("");
    let mut output = Vec::new();
    for (i, raw) in m.content.iter().enumerate() {
        let Ok(block) = crate::json::from_str::<Value>(raw.get()) else {
            continue;
        };
        let s = |k: &str| block.get(k).and_then(Value::as_str).unwrap_or("");
        let id = |prefix: &str| {
            format!(
                "{prefix}_{}_{i}",
                message_id.strip_prefix("msg_").unwrap_or(message_id)
            )
        };
        match s("type") {
            "text" => output.push(message_item(&id("msg"), s("text"), "completed")),
            "tool_use" => {
                let arguments = block
                    .get("input")
                    .map_or_else(|| "{}".to_string(), Value::to_string);
                output.push(call_item(
                    reply,
                    &format!("fc_{}", s("id")),
                    s("id"),
                    s("name"),
                    &arguments,
                    "completed",
                ));
            }
            "thinking" => output.push(reasoning_item(
                &id("rs"),
                s("thinking"),
                Some(s("signature")),
                None,
            )),
            "redacted_thinking" => {
                output.push(reasoning_item(&id("rs"), "", None, Some(s("data"))))
            }
            // Server tools' blocks and block types newer than this code.
            _ => {}
        }
    }
    let state = status(m.stop_reason.as_str());
    let object = response_object(
        &response_id(message_id),
        reply,
        created_at,
        state,
        output,
        usage(&m.usage),
    );
    Ok(Converted {
        body: object.to_string().into_bytes(),
        usage: m.usage,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::{Value, json};

    use super::*;
    use crate::openai::request::Options;

    fn fixtures(kind: &str) -> Vec<(String, Value)> {
        crate::openai::tests::fixtures_in(&format!("tests/data/openai/responses/{kind}"))
    }

    fn reply(case: &Value) -> Reply {
        let r = &case["reply"];
        Reply {
            model: r["model"].as_str().unwrap_or("").into(),
            custom_tools: (r["custom_tools"].as_array().into_iter().flatten())
                .filter_map(|t| t.as_str().map(String::from))
                .collect(),
            session: None,
        }
    }

    #[test]
    fn request_fixtures() {
        let aliases = HashMap::from([("gpt-4o".to_string(), "claude-sonnet-4-5".to_string())]);
        let options = Options {
            default_max_tokens: 8192,
            aliases: &aliases,
        };
        for (name, case) in fixtures("request") {
            let result = request::convert(case["input"].to_string().as_bytes(), &options);
            if let Some(param) = case.get("error_param").and_then(Value::as_str) {
                let err = result.expect_err(&name);
                assert_eq!(err.param.as_deref(), Some(param), "{name}: {}", err.message);
                continue;
            }
            let converted = result.unwrap_or_else(|e| panic!("{name}: {e:?}"));
            let body: Value = serde_json::from_slice(&converted.body).expect("JSON");
            assert_eq!(body, case["expected"], "{name}");
            let model = case["requested_model"]
                .as_str()
                .or(case["input"]["model"].as_str());
            assert_eq!(Some(converted.requested_model.as_str()), model, "{name}");
            assert_eq!(
                converted.session.as_deref(),
                case["session"].as_str(),
                "{name}"
            );
            let custom: Vec<&str> = (case["custom_tools"].as_array().into_iter().flatten())
                .filter_map(Value::as_str)
                .collect();
            assert_eq!(converted.custom_tools, custom, "{name}");
        }
    }

    #[test]
    fn response_fixtures() {
        for (name, case) in fixtures("response") {
            let made = response(
                case["input"].to_string().as_bytes(),
                &reply(&case),
                1_700_000_000,
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            let body: Value = serde_json::from_slice(&made.body).expect("JSON");
            assert_eq!(body, case["expected"], "{name}");
        }
    }

    /// The events of a converted stream: (the `event:` name, the data), checking each event's
    /// name is its data's `type`.
    fn events(out: &[u8]) -> Vec<Value> {
        let text = String::from_utf8(out.to_vec()).expect("utf8");
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (name, data) = e.split_once('\n').expect("two lines");
                let data: Value =
                    serde_json::from_str(data.strip_prefix("data: ").expect("data")).expect("JSON");
                assert_eq!(
                    Some(name.strip_prefix("event: ").expect("event")),
                    data["type"].as_str()
                );
                data
            })
            .collect()
    }

    #[test]
    fn stream_fixtures() {
        for (name, case) in fixtures("stream") {
            let mut stream = stream::ResponseStream::new(reply(&case), 1_700_000_000);
            let mut out = Vec::new();
            for e in case["events"].as_array().expect("events") {
                out.extend(
                    stream.event(
                        format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap_or(""))
                            .as_bytes(),
                    ),
                );
            }
            out.extend(stream.end(None));
            assert!(stream.closed(), "{name}");
            let got = events(&out);
            let types: Vec<&str> = got.iter().filter_map(|e| e["type"].as_str()).collect();
            let want: Vec<&str> = (case["types"].as_array().expect("types").iter())
                .filter_map(Value::as_str)
                .collect();
            assert_eq!(types, want, "{name}");
            for (i, e) in got.iter().enumerate() {
                assert_eq!(e["sequence_number"], json!(i), "{name}: numbered in order");
            }
            let last = &got.last().expect("an event")["response"];
            for (key, value) in case["completed"].as_object().expect("completed") {
                assert_eq!(&last[key], value, "{name}: response.{key}");
            }
            check_items(&name, &got);
        }
    }

    /// What the SDK's stream accumulator relies on: each item is added at the next output
    /// index, every event about it names its id and index, it is done once, and the deltas of a
    /// text or arguments add up to what its done event says.
    fn check_items(name: &str, events: &[Value]) {
        let mut items: Vec<(String, String, String)> = Vec::new(); // (id, deltas, done)
        for e in events {
            let kind = e["type"].as_str().unwrap_or("");
            let index = e["output_index"].as_u64().map(|i| i as usize);
            match kind {
                "response.output_item.added" => {
                    assert_eq!(
                        index,
                        Some(items.len()),
                        "{name}: added at the next index: {e}"
                    );
                    let id = e["item"]["id"].as_str().expect("an item id").to_string();
                    items.push((id, String::new(), String::new()));
                }
                _ if e.get("item_id").is_some() => {
                    let i = index.expect("an output_index");
                    assert_eq!(
                        e["item_id"].as_str(),
                        Some(items[i].0.as_str()),
                        "{name}: {e}"
                    );
                    let delta = e["delta"].as_str().unwrap_or("");
                    items[i].1.push_str(delta);
                    for done in ["text", "arguments"] {
                        if let Some(t) = e[done].as_str() {
                            items[i].2 = t.to_string();
                        }
                    }
                }
                "response.output_item.done" => {
                    let i = index.expect("an output_index");
                    assert_eq!(
                        e["item"]["id"].as_str(),
                        Some(items[i].0.as_str()),
                        "{name}"
                    );
                }
                _ => {}
            }
        }
        for (id, deltas, done) in &items {
            if !done.is_empty() && done != "{}" {
                assert_eq!(
                    deltas, done,
                    "{name}: {id}'s deltas add up to its done event"
                );
            }
        }
    }

    #[test]
    fn an_answer_past_what_is_kept_fails_instead_of_growing() {
        let mut stream = stream::ResponseStream::new(Reply::default(), 0);
        let start = r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#;
        stream.event(start.as_bytes());
        let piece = "x".repeat(1024 * 1024);
        let delta = json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}});
        let mut failed = false;
        for _ in 0..(stream::MAX_KEPT / piece.len() + 2) {
            let out = stream.event(format!("data: {delta}").as_bytes());
            if String::from_utf8_lossy(&out).contains("response.failed") {
                failed = true;
                break;
            }
        }
        assert!(failed && stream.closed());
    }
}
