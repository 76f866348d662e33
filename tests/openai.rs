//! OpenAI Chat Completions end to end: the running gateway converts an OpenAI request into the
//! Anthropic request the fake upstream records, and the upstream's answer back into OpenAI's
//! `chat.completion`, chunk stream or error, as `shared/spec/openai-conversion.md` describes.
//!
//! The pure converters have table tests beside them (`src/openai/mod.rs`); these tests check
//! what only the whole binary can show: the bytes on both wires, that chunks leave as their
//! upstream events arrive, that invalid requests never reach the upstream, that error statuses
//! and their headers survive, format detection on both paths, and the official `openai` Python
//! SDK talking to the gateway.
//!
//! `chat` covers non-streaming conversations and tool round trips, `stream` the chunk streams
//! and their failures, `errors` refusals and upstream errors, `routes` format detection and the
//! model list, and `sdk` the Python SDK run.

use std::time::Instant;

use serde_json::{Value, json};

use crate::support::{Conn, Gateway, Response, SseStream, StreamEnd, call, request_bytes};

mod chat;
mod codex;
mod errors;
mod responses;
mod routes;
mod sdk;
mod stream;

/// OpenAI's path, as the SDK posts it under a `/v1` base URL.
const CHAT_PATH: &str = "/v1/chat/completions";

/// The `models:` section most tests configure: one alias, the default `max_tokens` untouched.
const ALIAS_SECTION: &str = "models:\n  aliases:\n    gpt-4o: claude-sonnet-4-5\n";

/// `Authorization: Bearer <gateway key>`, the header the openai SDK sends.
fn bearer(gw: &Gateway) -> String {
    format!("Bearer {}", gw.client_key())
}

/// Posts `body` to `path` authenticated the way the openai SDK does.
fn post_openai(gw: &Gateway, path: &str, body: &Value) -> Response {
    let auth = bearer(gw);
    call(
        gw.addr(),
        "POST",
        path,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
}

/// Posts a streaming request, checks the answer is a 200 event stream, and returns its event
/// reader.
fn open_stream(gw: &Gateway, path: &str, body: &Value) -> SseStream {
    let auth = bearer(gw);
    let mut conn = Conn::open(gw.addr());
    conn.send(&request_bytes(
        "POST",
        path,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
            ("connection", "close"),
        ],
        body.to_string().as_bytes(),
    ));
    let (status, headers) = conn.read_head();
    let mut sse = conn.into_sse(&headers);
    if status != 200 {
        let mut rest = String::new();
        while let Some(ev) = sse.next_event() {
            rest.push_str(&ev.raw);
        }
        panic!("stream answered {status}, not 200: {rest}");
    }
    let content_type = header_of(&headers, "content-type");
    assert!(
        content_type.is_some_and(|v| v.starts_with("text/event-stream")),
        "a stream is text/event-stream, not {content_type:?}"
    );
    sse
}

/// A header's value from a response head (names are lowercase).
fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The payload of the next `data:` line of an OpenAI stream and when it arrived, skipping SSE
/// comments (a keep-alive is allowed); `None` once the stream has ended. OpenAI streams carry
/// no `event:` names (older openai-python skips named events), and one `data:` line per event.
fn next_data(sse: &mut SseStream) -> Option<(String, Instant)> {
    loop {
        let ev = sse.next_event()?;
        let lines: Vec<&str> = ev.raw.lines().filter(|l| !l.is_empty()).collect();
        if lines.iter().all(|l| l.starts_with(':')) {
            continue;
        }
        assert!(
            !lines.iter().any(|l| l.starts_with("event:")),
            "named SSE event in an OpenAI stream: {:?}",
            ev.raw
        );
        assert!(
            ev.raw.ends_with("\n\n"),
            "each chunk ends with a blank line: {:?}",
            ev.raw
        );
        let data: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        assert_eq!(
            data.len(),
            1,
            "one `data: ` line per event, nothing else: {:?}",
            ev.raw
        );
        return Some((data[0].to_string(), ev.at));
    }
}

/// Every remaining `data:` payload, once the stream has ended, and that it ended cleanly (the
/// response framing complete, not cut).
fn rest_of_stream(sse: &mut SseStream) -> Vec<String> {
    let mut rest = Vec::new();
    while let Some((data, _)) = next_data(sse) {
        rest.push(data);
    }
    assert_eq!(
        sse.end(),
        Some(&StreamEnd::Clean),
        "the stream should end properly after {rest:?}"
    );
    rest
}

/// The `error` object of a body in OpenAI's error shape: an object with `message`, `type`,
/// `param` and `code`, and no top-level `type` (Anthropic's shape has one).
fn openai_error_object<'a>(v: &'a Value, what: &str) -> &'a Value {
    let error = v
        .get("error")
        .filter(|e| e.is_object())
        .unwrap_or_else(|| panic!("{what}: no `error` object in {v}"));
    assert!(
        v.get("type").is_none(),
        "{what}: OpenAI's shape, not Anthropic's (top-level `type`): {v}"
    );
    for field in ["message", "type", "param", "code"] {
        assert!(
            error.get(field).is_some(),
            "{what}: error.{field} missing in {v}"
        );
    }
    error
}

/// The chunks of the rest of a stream that must end cleanly in `[DONE]`, parsed.
fn chunks_until_done(sse: &mut SseStream) -> Vec<Value> {
    let data = rest_of_stream(sse);
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "a complete stream ends in [DONE]: {data:?}"
    );
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("chunk ({e}): {d:.200}")))
        .collect()
}

/// Checks an OpenAI error response (`{"error":{"message","type","param","code"}}`, JSON, with
/// this status and type) and returns its `error` object.
fn assert_openai_error(resp: &Response, status: u16, error_type: &str) -> Value {
    assert_eq!(resp.status, status, "status; body: {}", resp.text());
    let content_type = resp.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "an OpenAI error is JSON, not {content_type:?}: {}",
        resp.text()
    );
    let v = resp.json();
    let error = openai_error_object(&v, &format!("a {status}"));
    assert_eq!(error["type"], error_type, "error.type in {v}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error.message should say something: {v}"
    );
    error.clone()
}

/// A complete Anthropic message, as the upstream answers a non-streaming request.
fn anthropic_message(id: &str, content: Value, stop_reason: &str, usage: Value) -> String {
    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": null,
        "usage": usage,
    })
    .to_string()
}

/// One upstream SSE event, named after its `type` as Anthropic names them.
fn event(data: Value) -> String {
    let name = data["type"].as_str().expect("event type").to_string();
    format!("event: {name}\ndata: {data}\n\n")
}

/// Anthropic's `message_start` for message `id` with the starting `usage`.
fn message_start(id: &str, usage: Value) -> Value {
    json!({"type": "message_start", "message": {
        "id": id, "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
        "content": [], "stop_reason": null, "stop_sequence": null, "usage": usage,
    }})
}

/// `content_block_start` of `block` at `index`.
fn block_start(index: u64, block: Value) -> Value {
    json!({"type": "content_block_start", "index": index, "content_block": block})
}

/// `content_block_delta` at `index`.
fn block_delta(index: u64, d: Value) -> Value {
    json!({"type": "content_block_delta", "index": index, "delta": d})
}

/// `content_block_stop` at `index`.
fn block_stop(index: u64) -> Value {
    json!({"type": "content_block_stop", "index": index})
}

/// A keep-alive `ping`.
fn ping() -> Value {
    json!({"type": "ping"})
}

/// The usage the SDK tests' scripted answers report: prompt 10 + 2 + 3 = 15, completion 7.
fn usage() -> Value {
    json!({"input_tokens": 10, "cache_creation_input_tokens": 2,
           "cache_read_input_tokens": 3, "output_tokens": 7})
}

/// A chunked SSE reply of these events.
fn sse(events: Vec<Value>) -> crate::support::Reply {
    crate::support::Reply::Sse {
        events: events.into_iter().map(event).collect(),
        gate: None,
        framing: crate::support::Framing::Chunked,
    }
}

/// A streamed text answer in `parts`, reporting `usage()`.
fn text_stream(id: &str, parts: &[&str]) -> Vec<Value> {
    let mut events = vec![
        message_start(id, usage()),
        block_start(0, json!({"type": "text", "text": ""})),
        ping(),
    ];
    for part in parts {
        events.push(block_delta(0, json!({"type": "text_delta", "text": part})));
    }
    events.push(block_stop(0));
    events.push(
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                       "usage": {"output_tokens": 7}}),
    );
    events.push(json!({"type": "message_stop"}));
    events
}

/// The scenario a request belongs to: the `[tag]` that opens its first user message.
fn scenario(body: &Value) -> String {
    let content = &body["messages"][0]["content"];
    let text = content[0]["text"]
        .as_str()
        .or(content.as_str())
        .unwrap_or_default();
    text.strip_prefix('[')
        .and_then(|t| t.split_once(']'))
        .map(|(tag, _)| tag.to_string())
        .unwrap_or_default()
}

/// `python3 SCRIPT BASE_URL KEY` for an SDK script against `gw`, with nothing configured from
/// outside: no proxies, no OpenAI settings.
fn python_sdk(script: &str, gw: &Gateway) -> std::process::Command {
    let mut cmd = std::process::Command::new(crate::support::PYTHON);
    cmd.arg(script)
        .arg(format!("http://{}/v1", gw.addr()))
        .arg(gw.client_key());
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "OPENAI_ORG_ID",
        "OPENAI_PROJECT_ID",
        "OPENAI_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("NO_PROXY", "*").env("PYTHONUNBUFFERED", "1");
    cmd
}

/// The upstream request body, parsed.
fn body_json(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "upstream body is not JSON ({e}): {}",
            String::from_utf8_lossy(body)
        )
    })
}

/// The Anthropic `system` as one text: a string as is, text blocks joined with `\n` (the spec
/// allows either form).
fn system_text(body: &Value) -> String {
    match &body["system"] {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .map(|b| {
                assert_eq!(b["type"], "text", "system block {b}");
                b["text"].as_str().expect("system block text").to_string()
            })
            .collect::<Vec<_>>()
            .join("\n"),
        other => panic!("no system in the upstream body: {other}"),
    }
}

/// Asserts `created` is Unix seconds taken while the test ran.
fn assert_created_now(v: &Value, from: u64, to: u64) {
    let created = v["created"]
        .as_u64()
        .unwrap_or_else(|| panic!("created is not Unix seconds: {v}"));
    assert!(
        (from..=to).contains(&created),
        "created {created} outside the request's time {from}..={to}"
    );
}
