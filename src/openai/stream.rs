//! Anthropic SSE → OpenAI `chat.completion.chunk` stream, incrementally: each upstream event
//! goes in as it arrives and its chunks come out at once; nothing is held back. Pure. Rules
//! from shared/spec/openai-conversion.md §3.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::response::{completion_id, finish_reason, usage};

/// A tool block's OpenAI index and whether any argument bytes went out for it.
struct Tool {
    index: u32,
    sent_arguments: bool,
}

/// The Anthropic usage counts an OpenAI usage is computed from.
const USAGE_KEYS: [&str; 4] = [
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
];

/// Tool-use blocks open at once beyond this are not tracked (Anthropic opens one at a time):
/// an upstream that starts blocks and never stops them cannot grow the map.
const MAX_OPEN_TOOLS: usize = 256;

pub struct ChunkStream {
    /// The model name the client asked for.
    model: String,
    include_usage: bool,
    created: u64,
    id: String,
    /// Anthropic block index → tool call state; OpenAI counts tool calls from 0, whatever
    /// text or thinking blocks come before them.
    tools: HashMap<u64, Tool>,
    next_tool: u32,
    /// Anthropic usage, merged from message_start and message_delta (output is cumulative).
    usage: serde_json::Map<String, Value>,
    finished: bool,
    /// `[DONE]` or an error went out: the stream is over.
    closed: bool,
}

impl ChunkStream {
    pub fn new(model: &str, include_usage: bool, created: u64) -> ChunkStream {
        ChunkStream {
            model: model.to_string(),
            include_usage,
            created,
            id: completion_id(""),
            tools: HashMap::new(),
            next_tool: 0,
            usage: serde_json::Map::new(),
            finished: false,
            closed: false,
        }
    }

    /// The Anthropic usage seen so far (from message_start and message_delta).
    pub fn usage(&self) -> Value {
        Value::Object(self.usage.clone())
    }

    /// Whether the stream reached its proper end (or a reported error).
    pub fn closed(&self) -> bool {
        self.closed
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Vec<u8> {
        let mut c = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        data_line(&c)
    }

    /// One complete upstream event (its `data:` lines) → the bytes to send for it.
    pub fn event(&mut self, event: &[u8]) -> Vec<u8> {
        if self.closed {
            return Vec::new();
        }
        let Some(data) = crate::sse::data(event) else {
            return Vec::new();
        };
        let Ok(v) = crate::json::from_slice::<Value>(&data) else {
            return Vec::new();
        };
        let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
        match v.get("type").and_then(Value::as_str).unwrap_or("") {
            "message_start" => {
                let m = &v["message"];
                if let Some(id) = m.get("id").and_then(Value::as_str) {
                    self.id = completion_id(id);
                }
                self.merge_usage(&m["usage"]);
                self.chunk(json!({"role": "assistant", "content": ""}), None)
            }
            "content_block_start" => {
                let block = &v["content_block"];
                match block.get("type").and_then(Value::as_str) {
                    Some("tool_use") => {
                        if self.tools.len() >= MAX_OPEN_TOOLS {
                            return Vec::new();
                        }
                        let k = self.next_tool;
                        self.next_tool = self.next_tool.saturating_add(1);
                        self.tools.insert(
                            index,
                            Tool {
                                index: k,
                                sent_arguments: false,
                            },
                        );
                        self.chunk(
                            json!({"tool_calls": [{
                                "index": k,
                                "id": block.get("id").cloned().unwrap_or_default(),
                                "type": "function",
                                "function": {"name": block.get("name").cloned().unwrap_or_default(), "arguments": ""},
                            }]}),
                            None,
                        )
                    }
                    Some("text") => match block.get("text").and_then(Value::as_str) {
                        Some(t) if !t.is_empty() => self.chunk(json!({"content": t}), None),
                        _ => Vec::new(),
                    },
                    _ => Vec::new(),
                }
            }
            "content_block_delta" => {
                let d = &v["delta"];
                match d.get("type").and_then(Value::as_str) {
                    Some("text_delta") => {
                        self.chunk(json!({"content": d.get("text").cloned().unwrap_or_default()}), None)
                    }
                    Some("thinking_delta") => self.chunk(
                        json!({"reasoning_content": d.get("thinking").cloned().unwrap_or_default()}),
                        None,
                    ),
                    Some("input_json_delta") => {
                        let part = d.get("partial_json").and_then(Value::as_str).unwrap_or("");
                        match self.tools.get_mut(&index) {
                            Some(tool) if !part.is_empty() => {
                                tool.sent_arguments = true;
                                let k = tool.index;
                                self.chunk(
                                    json!({"tool_calls": [{"index": k, "function": {"arguments": part}}]}),
                                    None,
                                )
                            }
                            _ => Vec::new(),
                        }
                    }
                    // signature_delta, citations_delta and anything newer: not for OpenAI clients.
                    _ => Vec::new(),
                }
            }
            "content_block_stop" => match self.tools.remove(&index) {
                // A call with no argument bytes still needs valid JSON arguments.
                Some(tool) if !tool.sent_arguments => {
                    let k = tool.index;
                    self.chunk(
                        json!({"tool_calls": [{"index": k, "function": {"arguments": "{}"}}]}),
                        None,
                    )
                }
                _ => Vec::new(),
            },
            "message_delta" => {
                self.merge_usage(&v["usage"]);
                let reason = finish_reason(v["delta"].get("stop_reason").and_then(Value::as_str));
                if self.finished {
                    return Vec::new();
                }
                self.finished = true;
                self.chunk(json!({}), Some(reason))
            }
            "message_stop" => {
                let mut out = Vec::new();
                if !self.finished {
                    self.finished = true;
                    out.extend(self.chunk(json!({}), Some("stop")));
                }
                if self.include_usage {
                    let u = json!({
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": usage(&Value::Object(self.usage.clone())),
                    });
                    out.extend(data_line(&u));
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                self.closed = true;
                out
            }
            "error" => {
                let e = &v["error"];
                self.error(
                    e.get("type").and_then(Value::as_str).unwrap_or("api_error"),
                    e.get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("upstream error"),
                )
            }
            // ping, and event types newer than this code.
            _ => Vec::new(),
        }
    }

    /// The upstream stream ended or broke. A stream that did not reach message_stop is
    /// reported as an error, never as a clean finish.
    pub fn end(&mut self, broke: Option<&str>) -> Vec<u8> {
        if self.closed {
            return Vec::new();
        }
        let why = match broke {
            Some(e) => format!("the upstream stream broke before it finished: {e}"),
            None => "the upstream stream ended before it finished".to_string(),
        };
        self.error("api_error", &why)
    }

    /// An error as an unnamed `data:` line (older openai-python reads only unnamed events).
    fn error(&mut self, error_type: &str, message: &str) -> Vec<u8> {
        self.closed = true;
        let kind = if error_type == "api_error" {
            "server_error"
        } else {
            error_type
        };
        data_line(
            &json!({"error": {"message": message, "type": kind, "param": null, "code": null}}),
        )
    }

    /// Keeps the counts an OpenAI usage is made of, and nothing else an upstream may put
    /// there: the map stays four entries long however many events bring new keys.
    fn merge_usage(&mut self, u: &Value) {
        for key in USAGE_KEYS {
            if let Some(n) = u.get(key).filter(|v| v.is_u64()) {
                self.usage.insert(key.to_string(), n.clone());
            }
        }
    }
}

fn data_line(v: &Value) -> Vec<u8> {
    format!("data: {v}\n\n").into_bytes()
}
