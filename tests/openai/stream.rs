//! Streaming Chat Completions: Anthropic events in, `chat.completion.chunk`s out, each chunk
//! leaving as soon as its upstream event arrived, upstream framing quirks tolerated, and streams
//! that break or end early reported as errors rather than finished.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::Instant;

use serde_json::{Value, json};

use super::{
    ALIAS_SECTION, CHAT_PATH, block_delta, block_start, block_stop, body_json, chunks_until_done,
    event, message_start, next_data, open_stream, ping, rest_of_stream,
};
use crate::support::accounts::each_case;
use crate::support::{Config, FakeUpstream, Framing, Gateway, Reply, now_unix};

/// One upstream event and the chunks the client must get for it, in order. A chunk is written
/// as what the spec fixes: `{"delta", "finish_reason"?}`, `{"usage"}` for the usage chunk
/// (`choices: []`), or the string `[DONE]`.
struct Step {
    event: String,
    chunks: Vec<Value>,
}

fn step(event_data: Value, chunks: Vec<Value>) -> Step {
    Step {
        event: event(event_data),
        chunks,
    }
}

fn delta(d: Value) -> Value {
    json!({"delta": d})
}

/// A tool call's first delta: index, id, name and empty arguments.
fn tool_start(index: u32, id: &str, name: &str) -> Value {
    delta(json!({"tool_calls": [{
        "index": index, "id": id, "type": "function",
        "function": {"name": name, "arguments": ""},
    }]}))
}

/// A later delta of a tool call: arguments only.
fn tool_arguments(index: u32, arguments: &str) -> Value {
    delta(json!({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}))
}

/// What every chunk of one stream shares: fixed at the first chunk.
struct Frame {
    id: String,
    created: u64,
    model: &'static str,
    include_usage: bool,
}

/// Checks one received `data:` payload against the chunk the spec requires.
fn check_chunk(data: &str, expected: &Value, frame: &Frame, what: &str) {
    if expected == "[DONE]" {
        assert_eq!(data, "[DONE]", "{what}");
        return;
    }
    let chunk: Value =
        serde_json::from_str(data).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {data}"));
    assert_eq!(chunk["object"], "chat.completion.chunk", "{what}: {chunk}");
    assert_eq!(chunk["id"], frame.id.as_str(), "{what}: one id: {chunk}");
    assert_eq!(
        chunk["created"], frame.created,
        "{what}: one created: {chunk}"
    );
    assert_eq!(
        chunk["model"], frame.model,
        "{what}: the requested model: {chunk}"
    );
    if let Some(usage) = expected.get("usage") {
        assert_eq!(
            chunk["choices"],
            json!([]),
            "{what}: the usage chunk has no choices"
        );
        assert_eq!(&chunk["usage"], usage, "{what}: usage");
        return;
    }
    if frame.include_usage {
        assert!(
            chunk.get("usage").is_some_and(Value::is_null),
            "{what}: with include_usage every chunk carries usage: null: {chunk}"
        );
    } else {
        assert!(
            chunk.get("usage").is_none_or(Value::is_null),
            "{what}: no usage without include_usage: {chunk}"
        );
    }
    let choices = chunk["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 1, "{what}: one choice: {chunk}");
    let choice = &choices[0];
    assert_eq!(choice["index"], 0, "{what}");
    assert!(
        choice.get("logprobs").is_some_and(Value::is_null),
        "{what}: logprobs: null: {chunk}"
    );
    assert_eq!(choice["delta"], expected["delta"], "{what}: delta");
    let finish = expected
        .get("finish_reason")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(choice["finish_reason"], finish, "{what}: finish_reason");
}

/// The stream of spec cases 14, 15, 16 and 18: thinking with a signature, pings, text, two
/// tool calls whose argument deltas interleave, and a tool call without arguments; the chunks
/// each event must produce, with or without `include_usage` (case 17).
fn rich_stream(include_usage: bool) -> Vec<Step> {
    let mut stop = vec![];
    if include_usage {
        stop.push(json!({"usage": {
            "prompt_tokens": 16,
            "completion_tokens": 20,
            "total_tokens": 36,
            "prompt_tokens_details": {"cached_tokens": 4},
        }}));
    }
    stop.push(json!("[DONE]"));
    vec![
        step(
            message_start(
                "msg_01Rich",
                json!({"input_tokens": 10, "cache_creation_input_tokens": 2,
                       "cache_read_input_tokens": 4, "output_tokens": 1}),
            ),
            vec![delta(json!({"role": "assistant", "content": ""}))],
        ),
        step(ping(), vec![]),
        step(
            block_start(0, json!({"type": "thinking", "thinking": ""})),
            vec![],
        ),
        step(
            block_delta(
                0,
                json!({"type": "thinking_delta", "thinking": "The user wants"}),
            ),
            vec![delta(json!({"reasoning_content": "The user wants"}))],
        ),
        step(
            block_delta(
                0,
                json!({"type": "thinking_delta", "thinking": " two cities."}),
            ),
            vec![delta(json!({"reasoning_content": " two cities."}))],
        ),
        step(
            block_delta(
                0,
                json!({"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA"}),
            ),
            vec![],
        ),
        step(block_stop(0), vec![]),
        step(block_start(1, json!({"type": "text", "text": ""})), vec![]),
        step(
            block_delta(1, json!({"type": "text_delta", "text": "Checking"})),
            vec![delta(json!({"content": "Checking"}))],
        ),
        step(ping(), vec![]),
        step(
            block_delta(1, json!({"type": "text_delta", "text": " both."})),
            vec![delta(json!({"content": " both."}))],
        ),
        step(
            block_start(
                2,
                json!({"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {}}),
            ),
            vec![tool_start(0, "toolu_a", "get_weather")],
        ),
        step(
            block_start(
                3,
                json!({"type": "tool_use", "id": "toolu_b", "name": "get_time", "input": {}}),
            ),
            vec![tool_start(1, "toolu_b", "get_time")],
        ),
        step(
            block_delta(2, json!({"type": "input_json_delta", "partial_json": ""})),
            vec![],
        ),
        step(
            block_delta(
                2,
                json!({"type": "input_json_delta", "partial_json": "{\"city\":"}),
            ),
            vec![tool_arguments(0, "{\"city\":")],
        ),
        step(
            block_delta(
                3,
                json!({"type": "input_json_delta", "partial_json": "{\"tz\":\"Asia/Tokyo\"}"}),
            ),
            vec![tool_arguments(1, "{\"tz\":\"Asia/Tokyo\"}")],
        ),
        step(
            block_delta(
                2,
                json!({"type": "input_json_delta", "partial_json": "\"Paris\"}"}),
            ),
            vec![tool_arguments(0, "\"Paris\"}")],
        ),
        step(block_stop(1), vec![]),
        step(block_stop(2), vec![]),
        step(block_stop(3), vec![]),
        step(ping(), vec![]),
        step(
            block_start(
                4,
                json!({"type": "tool_use", "id": "toolu_c", "name": "get_date", "input": {}}),
            ),
            vec![tool_start(2, "toolu_c", "get_date")],
        ),
        step(
            block_delta(4, json!({"type": "input_json_delta", "partial_json": ""})),
            vec![],
        ),
        // Spec 15: a call that got no argument bytes still assembles to valid JSON.
        step(block_stop(4), vec![tool_arguments(2, "{}")]),
        step(
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
                   "usage": {"output_tokens": 20}}),
            vec![json!({"delta": {}, "finish_reason": "tool_calls"})],
        ),
        step(json!({"type": "message_stop"}), stop),
    ]
}

/// What an OpenAI client assembles from the tool-call deltas: per index, id, name and the
/// concatenated arguments. Checks that id and name come only in a call's first delta.
fn assemble_tool_calls(chunks: &[Value]) -> BTreeMap<u64, (String, String, String)> {
    let mut calls: BTreeMap<u64, (String, String, String)> = BTreeMap::new();
    for chunk in chunks {
        let Some(list) = chunk["choices"][0]["delta"]["tool_calls"].as_array() else {
            continue;
        };
        for call in list {
            let index = call["index"].as_u64().expect("tool call index");
            let arguments = call["function"]["arguments"].as_str().unwrap_or("");
            match calls.get_mut(&index) {
                None => {
                    let id = call["id"].as_str().expect("first delta has the id");
                    let name = call["function"]["name"]
                        .as_str()
                        .expect("first delta has the name");
                    calls.insert(
                        index,
                        (id.to_string(), name.to_string(), arguments.to_string()),
                    );
                }
                Some(known) => {
                    assert!(
                        call.get("id").is_none() && call["function"].get("name").is_none(),
                        "id and name only in a call's first delta: {call}"
                    );
                    known.2.push_str(arguments);
                }
            }
        }
    }
    calls
}

#[test]
fn stream_converts_each_event_as_it_arrives() {
    each_case(&[false, true], |&include_usage| {
        let steps = rich_stream(include_usage);
        let events: Vec<String> = steps.iter().map(|s| s.event.clone()).collect();
        let (gate_tx, gate_rx) = mpsc::channel();
        let mut gate = Some(gate_rx);
        let up = FakeUpstream::start(move |_| Reply::Sse {
            events: events.clone(),
            gate: gate.take(),
            framing: Framing::Chunked,
        });
        let gw = Gateway::started(&Config::new(up.base_url()).section(ALIAS_SECTION));
        let mut request = json!({
            "model": "gpt-4o",
            "stream": true,
            "messages": [{"role": "user", "content": "Weather and time in Paris and Tokyo?"}],
        });
        if include_usage {
            request["stream_options"] = json!({"include_usage": true});
        }

        let before = now_unix();
        let mut sse = open_stream(&gw, CHAT_PATH, &request);

        // The upstream writes event i+1 only after the gate opens, and the gate opens only once
        // event i's chunks reached the client: a converter that held anything back would stall
        // here and fail on the read timeout.
        let mut frame: Option<Frame> = None;
        let mut received: Vec<Value> = Vec::new();
        let mut arrivals: Vec<(usize, Instant)> = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            for (j, expected) in step.chunks.iter().enumerate() {
                let what = format!("event {i} chunk {j} (include_usage {include_usage})");
                let (data, at) = next_data(&mut sse)
                    .unwrap_or_else(|| panic!("{what}: stream ended: {:?}", sse.end()));
                let frame = frame.get_or_insert_with(|| {
                    let first: Value = serde_json::from_str(&data).expect("first chunk is JSON");
                    // A converter that held chunks back would leave this read waiting until the
                    // gateway's upstream read timeout turned the stall into an error line.
                    let created = first["created"]
                        .as_u64()
                        .unwrap_or_else(|| panic!("{what}: expected the first chunk, got {first}"));
                    assert!(
                        (before..=now_unix()).contains(&created),
                        "created {created} is not now"
                    );
                    Frame {
                        id: "chatcmpl-01Rich".into(),
                        created,
                        model: "gpt-4o",
                        include_usage,
                    }
                });
                check_chunk(&data, expected, frame, &what);
                if data != "[DONE]" {
                    received.push(serde_json::from_str(&data).expect("chunk JSON"));
                }
                arrivals.push((i, at));
            }
            if i + 1 < steps.len() {
                gate_tx.send(()).expect("upstream waits on the gate");
            }
        }
        let rest = rest_of_stream(&mut sse);
        assert!(rest.is_empty(), "nothing after [DONE]: {rest:?}");

        let written = up.sse_write_times();
        assert_eq!(
            written.len(),
            steps.len(),
            "every upstream event was written"
        );
        for (i, at) in arrivals {
            if let Some(next) = written.get(i + 1) {
                assert!(
                    at <= *next,
                    "a chunk of event {i} arrived after event {} was sent",
                    i + 1
                );
            }
        }

        // What a client assembles: text, reasoning, and three calls with valid JSON arguments.
        let text: String = received
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "Checking both.");
        let reasoning: String = received
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["reasoning_content"].as_str())
            .collect();
        assert_eq!(
            reasoning, "The user wants two cities.",
            "the signature is not surfaced"
        );
        let calls = assemble_tool_calls(&received);
        let parsed: Vec<(u64, &str, &str, Value)> = calls
            .iter()
            .map(|(k, (id, name, args))| {
                let v = serde_json::from_str(args)
                    .unwrap_or_else(|e| panic!("call {k} arguments are not JSON ({e}): {args}"));
                (*k, id.as_str(), name.as_str(), v)
            })
            .collect();
        assert_eq!(
            parsed,
            [
                (0, "toolu_a", "get_weather", json!({"city": "Paris"})),
                (1, "toolu_b", "get_time", json!({"tz": "Asia/Tokyo"})),
                (2, "toolu_c", "get_date", json!({})),
            ]
        );
        let finishes = received
            .iter()
            .filter(|c| !c["choices"][0]["finish_reason"].is_null())
            .count();
        assert_eq!(finishes, 1, "exactly one finish chunk");

        let reqs = up.requests();
        assert_eq!(reqs.len(), 1);
        let sent = body_json(&reqs[0].body);
        assert_eq!(sent["stream"], true, "the upstream request streams");
        assert_eq!(sent["model"], "claude-sonnet-4-5");
        assert!(
            sent.get("stream_options").is_none(),
            "stream_options is the gateway's, not Anthropic's: {sent}"
        );
    });
}

/// The first events of a text stream, and the chunks they give.
fn text_opening() -> Vec<Step> {
    vec![
        step(
            message_start("msg_01Cut", json!({"input_tokens": 5, "output_tokens": 1})),
            vec![delta(json!({"role": "assistant", "content": ""}))],
        ),
        step(block_start(0, json!({"type": "text", "text": ""})), vec![]),
        step(
            block_delta(0, json!({"type": "text_delta", "text": "partial"})),
            vec![delta(json!({"content": "partial"}))],
        ),
    ]
}

/// Streams `reply` to a client and checks it gets the chunks `steps` promise, then one
/// unnamed error line, and no `[DONE]` (unless `done_allowed`: after an upstream error event
/// the spec allows one).
fn assert_stream_ends_in_error(
    what: &str,
    steps: &[Step],
    reply: impl Fn() -> Reply + Send + 'static,
    done_allowed: bool,
) -> Value {
    let up = FakeUpstream::start(move |_| reply());
    let gw = Gateway::started(&Config::new(up.base_url()));
    let mut sse = open_stream(
        &gw,
        CHAT_PATH,
        &json!({"model": "claude-sonnet-4-5", "stream": true,
                "messages": [{"role": "user", "content": "say something"}]}),
    );
    let mut frame: Option<Frame> = None;
    for (i, step) in steps.iter().enumerate() {
        for expected in &step.chunks {
            let (data, _) = next_data(&mut sse)
                .unwrap_or_else(|| panic!("{what}: ended before event {i}'s chunk"));
            let frame = frame.get_or_insert_with(|| {
                let first: Value = serde_json::from_str(&data).expect("chunk JSON");
                Frame {
                    id: first["id"].as_str().expect("id").to_string(),
                    created: first["created"].as_u64().expect("created"),
                    model: "claude-sonnet-4-5",
                    include_usage: false,
                }
            });
            check_chunk(&data, expected, frame, &format!("{what}: event {i}"));
        }
    }
    let (data, _) = next_data(&mut sse)
        .unwrap_or_else(|| panic!("{what}: the stream ended with no error: {:?}", sse.end()));
    let v: Value = serde_json::from_str(&data)
        .unwrap_or_else(|e| panic!("{what}: the last line is not JSON ({e}): {data}"));
    let error = v
        .get("error")
        .filter(|e| e.is_object())
        .unwrap_or_else(|| panic!("{what}: expected an error line, got {v}"));
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: error.message: {v}"
    );
    assert!(error["type"].is_string(), "{what}: error.type: {v}");
    assert!(
        v.get("choices").is_none(),
        "{what}: an error, not a chunk: {v}"
    );
    let rest = rest_of_stream(&mut sse);
    if done_allowed {
        assert!(
            rest.is_empty() || rest == ["[DONE]"],
            "{what}: at most [DONE] after the error: {rest:?}"
        );
    } else {
        assert!(
            rest.is_empty(),
            "{what}: nothing after the error, no [DONE] after a truncation: {rest:?}"
        );
    }
    error.clone()
}

#[test]
fn upstream_breaking_mid_stream_ends_in_an_error_line() {
    let steps = text_opening();
    let events: Vec<String> = steps.iter().map(|s| s.event.clone()).collect();
    assert_stream_ends_in_error(
        "break mid-stream",
        &steps,
        move || Reply::BreakMidStream {
            events: events.clone(),
        },
        false,
    );
}

#[test]
fn stream_ending_without_message_stop_ends_in_an_error_line() {
    // Cut after the last content block: no finish chunk may have gone out.
    let mut steps = text_opening();
    steps.push(step(block_stop(0), vec![]));
    let events: Vec<String> = steps.iter().map(|s| s.event.clone()).collect();
    assert_stream_ends_in_error(
        "chunked end before message_delta",
        &steps,
        move || Reply::Sse {
            events: events.clone(),
            gate: None,
            framing: Framing::Chunked,
        },
        false,
    );

    // Cut after message_delta: its finish chunk went out when it came, but the stream still
    // ends in an error, not [DONE].
    let mut steps = text_opening();
    steps.push(step(block_stop(0), vec![]));
    steps.push(step(
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}}),
        vec![json!({"delta": {}, "finish_reason": "stop"})],
    ));
    let events: Vec<String> = steps.iter().map(|s| s.event.clone()).collect();
    assert_stream_ends_in_error(
        "close-delimited end before message_stop",
        &steps,
        move || Reply::Sse {
            events: events.clone(),
            gate: None,
            framing: Framing::CloseDelimited,
        },
        false,
    );
}

#[test]
fn upstream_error_event_becomes_an_unnamed_error_line() {
    let mut steps = text_opening();
    steps.push(step(
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        vec![],
    ));
    let events: Vec<String> = steps.iter().map(|s| s.event.clone()).collect();
    let error = assert_stream_ends_in_error(
        "upstream error event",
        &steps[..3],
        move || Reply::Sse {
            events: events.clone(),
            gate: None,
            framing: Framing::Chunked,
        },
        true,
    );
    assert_eq!(error["message"], "Overloaded", "{error}");
    assert_eq!(error["type"], "overloaded_error", "{error}");
}

#[test]
fn stream_parsing_tolerates_what_an_upstream_may_send() {
    // Spec §3 "Parsing upstream": CRLF line ends, `data:` without a space, an event split across
    // two writes, a line far longer than 64 KiB, and an event type this gateway does not know.
    let long = "x".repeat(100_000);
    let split = event(block_delta(
        0,
        json!({"type": "text_delta", "text": "split across writes"}),
    ));
    let (head, tail) = split.split_at(split.len() / 2);
    let events = vec![
        event(message_start(
            "msg_01Odd",
            json!({"input_tokens": 3, "output_tokens": 1}),
        ))
        .replace('\n', "\r\n"),
        format!(
            "event: content_block_start\ndata:{}\n\n",
            block_start(0, json!({"type": "text", "text": ""}))
        ),
        "event: something_new\ndata: {\"type\":\"something_new\",\"detail\":1}\n\n".to_string(),
        head.to_string(),
        tail.to_string(),
        event(block_delta(0, json!({"type": "text_delta", "text": long}))),
        event(block_stop(0)),
        event(
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                     "usage": {"output_tokens": 5}}),
        ),
        event(json!({"type": "message_stop"})),
    ];
    let up = FakeUpstream::start(move |_| Reply::Sse {
        events: events.clone(),
        gate: None,
        framing: Framing::Chunked,
    });
    let gw = Gateway::started(&Config::new(up.base_url()));
    let mut sse = open_stream(
        &gw,
        CHAT_PATH,
        &json!({"model": "claude-sonnet-4-5", "stream": true,
                "messages": [{"role": "user", "content": "go"}]}),
    );
    let chunks = chunks_until_done(&mut sse);
    let frame = Frame {
        id: "chatcmpl-01Odd".into(),
        created: chunks[0]["created"].as_u64().expect("created"),
        model: "claude-sonnet-4-5",
        include_usage: false,
    };
    let expected = [
        delta(json!({"role": "assistant", "content": ""})),
        delta(json!({"content": "split across writes"})),
        delta(json!({"content": long})),
        json!({"delta": {}, "finish_reason": "stop"}),
    ];
    assert_eq!(chunks.len(), expected.len(), "one chunk per text event");
    for (i, (chunk, want)) in chunks.iter().zip(&expected).enumerate() {
        check_chunk(&chunk.to_string(), want, &frame, &format!("chunk {i}"));
    }
}
