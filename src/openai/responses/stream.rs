//! Anthropic SSE → the Responses event stream, incrementally: each upstream event goes in as
//! it arrives and its events come out at once, each with its `type` and an increasing
//! `sequence_number` (Codex reads events by their `type` field). `response.completed` carries
//! the whole output, as OpenAI's does: the one thing kept, bounded by `MAX_KEPT`. Pure.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::{
    Reply, call_item, message_item, reasoning_item, response_id, response_object, status, usage,
};

/// The output kept for `response.completed`, in bytes of text, arguments and signatures; past
/// it the stream ends in `response.failed` (as a whole answer past its buffer is refused).
pub const MAX_KEPT: usize = 64 * 1024 * 1024;

/// Blocks open at once beyond this are not tracked (Anthropic opens one at a time).
const MAX_OPEN: usize = 256;

/// The usage counts kept from the upstream's events.
const USAGE_KEYS: [&str; 4] = [
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
];

/// An output item being streamed.
struct Open {
    output_index: usize,
    id: String,
    kind: Kind,
    /// The text, the arguments' JSON or the thinking, as it grows.
    text: String,
    signature: String,
}

enum Kind {
    Text,
    Call { call_id: String, name: String },
    Reasoning,
    Redacted(String),
}

pub struct ResponseStream {
    reply: Reply,
    created_at: u64,
    id: String,
    sequence: u64,
    open: HashMap<u64, Open>,
    /// Items done, for `response.completed`.
    output: Vec<Value>,
    kept: usize,
    usage: serde_json::Map<String, Value>,
    stop_reason: Option<String>,
    closed: bool,
    /// The answer grew past `MAX_KEPT`: the rest of the upstream is not worth reading.
    gave_up: bool,
}

impl ResponseStream {
    pub fn new(reply: Reply, created_at: u64) -> ResponseStream {
        ResponseStream {
            reply,
            created_at,
            id: response_id(""),
            sequence: 0,
            open: HashMap::new(),
            output: Vec::new(),
            kept: 0,
            usage: serde_json::Map::new(),
            stop_reason: None,
            closed: false,
            gave_up: false,
        }
    }

    /// Whether the stream reached its end (`response.completed`, or a reported failure).
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Whether it ended because the answer outgrew what is kept.
    pub fn gave_up(&self) -> bool {
        self.gave_up
    }

    fn emit(&mut self, out: &mut Vec<u8>, kind: &str, mut data: Value) {
        data["type"] = kind.into();
        data["sequence_number"] = self.sequence.into();
        self.sequence += 1;
        out.extend_from_slice(format!("event: {kind}\ndata: {data}\n\n").as_bytes());
    }

    fn object(&self, state: (&str, Value), output: Vec<Value>) -> Value {
        let usage = usage(&Value::Object(self.usage.clone()));
        response_object(&self.id, &self.reply, self.created_at, state, output, usage)
    }

    /// One complete upstream event (its `data:` lines) → the bytes to send for it.
    pub fn event(&mut self, event: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        if self.closed {
            return out;
        }
        let Some(data) = crate::sse::data(event) else {
            return out;
        };
        let Ok(v) = crate::json::from_slice::<Value>(&data) else {
            return out;
        };
        let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
        match v.get("type").and_then(Value::as_str).unwrap_or("") {
            "message_start" => {
                let m = &v["message"];
                if let Some(id) = m.get("id").and_then(Value::as_str) {
                    self.id = response_id(id);
                }
                self.merge_usage(&m["usage"]);
                let response = self.object(("in_progress", Value::Null), Vec::new());
                self.emit(&mut out, "response.created", json!({"response": response}));
                self.emit(
                    &mut out,
                    "response.in_progress",
                    json!({"response": response}),
                );
            }
            "content_block_start" => self.start(index, &v["content_block"], &mut out),
            "content_block_delta" => self.delta(index, &v["delta"], &mut out),
            "content_block_stop" => self.stop(index, &mut out),
            "message_delta" => {
                self.merge_usage(&v["usage"]);
                if let Some(reason) = v["delta"].get("stop_reason").and_then(Value::as_str) {
                    self.stop_reason = Some(reason.to_string());
                }
            }
            "message_stop" => {
                // Blocks the upstream left open are done now.
                let mut left: Vec<u64> = self.open.keys().copied().collect();
                left.sort_unstable();
                for index in left {
                    self.stop(index, &mut out);
                }
                let state = status(self.stop_reason.as_deref());
                let kind = if state.0 == "incomplete" {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                let output = std::mem::take(&mut self.output);
                let response = self.object(state, output);
                self.emit(&mut out, kind, json!({"response": response}));
                self.closed = true;
            }
            "error" => {
                let e = &v["error"];
                let kind = e.get("type").and_then(Value::as_str).unwrap_or("api_error");
                let message = e
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("upstream error");
                self.fail(kind, message, &mut out);
            }
            // ping, and event types newer than this code.
            _ => {}
        }
        if self.kept > MAX_KEPT && !self.closed {
            self.gave_up = true;
            self.fail(
                "api_error",
                "the answer is larger than the gateway keeps for response.completed",
                &mut out,
            );
        }
        out
    }

    fn start(&mut self, index: u64, block: &Value, out: &mut Vec<u8>) {
        // A block started again at an open index closes the first: every item added is done.
        if self.open.contains_key(&index) {
            self.stop(index, out);
        }
        if self.open.len() >= MAX_OPEN {
            return;
        }
        // Every item is kept, however empty: its ids, name and data, and its frame.
        self.kept += 256
            + ["id", "name", "data"]
                .iter()
                .filter_map(|k| block.get(k).and_then(Value::as_str))
                .map(|v| 2 * v.len())
                .sum::<usize>();
        let s = |k: &str| {
            block
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let output_index = self.output.len() + self.open.len();
        let base = self
            .id
            .strip_prefix("resp_")
            .unwrap_or(&self.id)
            .to_string();
        let (kind, id) = match s("type").as_str() {
            "text" => (Kind::Text, format!("msg_{base}_{index}")),
            "tool_use" => (
                Kind::Call {
                    call_id: s("id"),
                    name: s("name"),
                },
                format!("fc_{}", s("id")),
            ),
            "thinking" => (Kind::Reasoning, format!("rs_{base}_{index}")),
            "redacted_thinking" => (Kind::Redacted(s("data")), format!("rs_{base}_{index}")),
            _ => return,
        };
        let mut open = Open {
            output_index,
            id,
            kind,
            text: String::new(),
            signature: String::new(),
        };
        let item = self.item(&open, "in_progress");
        self.emit(
            out,
            "response.output_item.added",
            json!({"output_index": output_index, "item": item}),
        );
        match &open.kind {
            Kind::Text => {
                self.emit(out, "response.content_part.added", json!({"item_id": open.id, "output_index": output_index,
                    "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}));
                let initial = s("text");
                if !initial.is_empty() {
                    self.emit(
                        out,
                        "response.output_text.delta",
                        json!({"item_id": open.id,
                        "output_index": output_index, "content_index": 0, "delta": initial}),
                    );
                    self.kept += initial.len();
                    open.text = initial;
                }
            }
            Kind::Reasoning => {
                self.emit(out, "response.reasoning_summary_part.added", json!({"item_id": open.id,
                    "output_index": output_index, "summary_index": 0, "part": {"type": "summary_text", "text": ""}}));
            }
            _ => {}
        }
        self.open.insert(index, open);
    }

    fn delta(&mut self, index: u64, d: &Value, out: &mut Vec<u8>) {
        let Some(open) = self.open.get_mut(&index) else {
            return;
        };
        let piece = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let (event, data) = match (d.get("type").and_then(Value::as_str), &open.kind) {
            (Some("text_delta"), Kind::Text) => {
                let text = piece("text");
                open.text.push_str(&text);
                (
                    "response.output_text.delta",
                    json!({"item_id": open.id, "output_index": open.output_index,
                    "content_index": 0, "delta": text}),
                )
            }
            (Some("input_json_delta"), Kind::Call { name, .. }) => {
                let part = piece("partial_json");
                open.text.push_str(&part);
                // A custom tool's input is one string, known whole only at the end.
                if self.reply.custom_tools.contains(name) || part.is_empty() {
                    self.kept += part.len();
                    return;
                }
                (
                    "response.function_call_arguments.delta",
                    json!({"item_id": open.id,
                    "output_index": open.output_index, "delta": part}),
                )
            }
            (Some("thinking_delta"), Kind::Reasoning) => {
                let text = piece("thinking");
                open.text.push_str(&text);
                (
                    "response.reasoning_summary_text.delta",
                    json!({"item_id": open.id,
                    "output_index": open.output_index, "summary_index": 0, "delta": text}),
                )
            }
            (Some("signature_delta"), Kind::Reasoning) => {
                let signature = piece("signature");
                self.kept += signature.len();
                open.signature.push_str(&signature);
                return;
            }
            // citations_delta and anything newer: not for Responses clients.
            _ => return,
        };
        self.kept += data["delta"].as_str().map_or(0, str::len);
        self.emit(out, event, data);
    }

    fn stop(&mut self, index: u64, out: &mut Vec<u8>) {
        let Some(open) = self.open.remove(&index) else {
            return;
        };
        let at = open.output_index;
        match &open.kind {
            Kind::Text => {
                self.emit(
                    out,
                    "response.output_text.done",
                    json!({"item_id": open.id, "output_index": at,
                    "content_index": 0, "text": open.text}),
                );
                self.emit(out, "response.content_part.done", json!({"item_id": open.id, "output_index": at,
                    "content_index": 0, "part": {"type": "output_text", "text": open.text, "annotations": []}}));
            }
            Kind::Call { name, .. } if !self.reply.custom_tools.contains(name) => {
                let arguments = if open.text.is_empty() {
                    "{}"
                } else {
                    open.text.as_str()
                };
                self.emit(
                    out,
                    "response.function_call_arguments.done",
                    json!({"item_id": open.id,
                    "output_index": at, "arguments": arguments}),
                );
            }
            Kind::Reasoning => {
                self.emit(
                    out,
                    "response.reasoning_summary_text.done",
                    json!({"item_id": open.id,
                    "output_index": at, "summary_index": 0, "text": open.text}),
                );
                self.emit(out, "response.reasoning_summary_part.done", json!({"item_id": open.id,
                    "output_index": at, "summary_index": 0, "part": {"type": "summary_text", "text": open.text}}));
            }
            _ => {}
        }
        let item = self.item(&open, "completed");
        self.emit(
            out,
            "response.output_item.done",
            json!({"output_index": at, "item": item}),
        );
        self.output.push(item);
    }

    fn item(&self, open: &Open, status: &str) -> Value {
        let done = status == "completed";
        match &open.kind {
            Kind::Text => message_item(&open.id, &open.text, status),
            Kind::Call { call_id, name } => {
                let arguments = if !done {
                    ""
                } else if open.text.is_empty() {
                    "{}"
                } else {
                    &open.text
                };
                call_item(&self.reply, &open.id, call_id, name, arguments, status)
            }
            Kind::Reasoning => {
                let signature =
                    (done && !open.signature.is_empty()).then_some(open.signature.as_str());
                reasoning_item(
                    &open.id,
                    if done { &open.text } else { "" },
                    signature,
                    None,
                )
            }
            Kind::Redacted(data) => {
                reasoning_item(&open.id, "", None, done.then_some(data.as_str()))
            }
        }
    }

    /// The upstream stream ended or broke. One that did not reach `message_stop` is reported
    /// as `response.failed`, never as a clean finish.
    pub fn end(&mut self, broke: Option<&str>) -> Vec<u8> {
        let mut out = Vec::new();
        if self.closed {
            return out;
        }
        let why = match broke {
            Some(e) => format!("the upstream stream broke before it finished: {e}"),
            None => "the upstream stream ended before it finished".to_string(),
        };
        self.fail("api_error", &why, &mut out);
        out
    }

    fn fail(&mut self, kind: &str, message: &str, out: &mut Vec<u8>) {
        self.closed = true;
        let code = match kind {
            "api_error" => "server_error",
            "overloaded_error" => "overloaded",
            "rate_limit_error" => "rate_limit_exceeded",
            other => other,
        };
        let output = std::mem::take(&mut self.output);
        let response = self.object(
            ("failed", json!({"code": code, "message": message})),
            output,
        );
        self.emit(out, "response.failed", json!({"response": response}));
    }

    /// Keeps the counts a usage is made of, and nothing else an upstream may put there.
    fn merge_usage(&mut self, u: &Value) {
        for key in USAGE_KEYS {
            if let Some(n) = u.get(key).filter(|v| v.is_u64()) {
                self.usage.insert(key.to_string(), n.clone());
            }
        }
    }
}
