//! Anthropic Messages response → OpenAI `chat.completion`, and Anthropic error bodies →
//! OpenAI error bodies. Pure. Rules from shared/spec/openai-conversion.md §2.

use serde::de;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};

/// `stop_reason` → `finish_reason`; unknown and null are `stop`, never passed through raw.
pub fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

/// OpenAI's usage object from Anthropic's. Anthropic's `input_tokens` excludes both cache
/// counts, so the prompt total adds them back.
pub fn usage(u: &Value) -> Value {
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    // Saturating: the counts are the upstream's, and nothing bounds them.
    let prompt = n("input_tokens")
        .saturating_add(n("cache_creation_input_tokens"))
        .saturating_add(n("cache_read_input_tokens"));
    let completion = n("output_tokens");
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt.saturating_add(completion),
        "prompt_tokens_details": {"cached_tokens": n("cache_read_input_tokens")},
    })
}

/// The response id: Anthropic's message id behind OpenAI's prefix.
pub fn completion_id(message_id: &str) -> String {
    format!(
        "chatcmpl-{}",
        message_id.strip_prefix("msg_").unwrap_or(message_id)
    )
}

/// A `chat.completion` made from an Anthropic message, and the message's usage (for the
/// ledger).
pub struct Completion {
    pub body: Vec<u8>,
    pub usage: Value,
}

/// The fields of a message a completion is made of. The content blocks are folded as they are
/// read (text and thinking appended, tool calls kept small), so a message of a million tiny
/// blocks never becomes a million values.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(default)]
    id: Value,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
    #[serde(default)]
    stop_reason: Value,
    #[serde(default)]
    usage: Value,
}

#[derive(Default)]
struct Folded {
    text: String,
    reasoning: String,
    tool_calls: Vec<ToolCall>,
}

#[derive(Serialize)]
struct ToolCall {
    id: Value,
    #[serde(rename = "type")]
    kind: &'static str,
    function: Function,
}

#[derive(Serialize)]
struct Function {
    name: Value,
    arguments: String,
}

impl<'de> Deserialize<'de> for Folded {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Folded, D::Error> {
        /// Values, not typed fields: a field of another type is ignored, as it always was.
        #[derive(Deserialize)]
        struct Block {
            #[serde(rename = "type", default)]
            kind: Value,
            #[serde(default)]
            text: Value,
            #[serde(default)]
            thinking: Value,
            #[serde(default)]
            id: Value,
            #[serde(default)]
            name: Value,
            #[serde(default)]
            input: Option<Value>,
        }
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Folded;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("content blocks")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Folded, A::Error> {
                let mut folded = Folded::default();
                while let Some(raw) = seq.next_element::<&'de RawValue>()? {
                    // A block of another shape is skipped, as an unknown type is.
                    // Each block is parsed whole (and so checked): it is small, and dropped at
                    // once.
                    let block: Block = match crate::json::from_str(raw.get()) {
                        Ok(block) => block,
                        Err(e) if raw.get().starts_with('{') => return Err(de::Error::custom(e)),
                        // Not a block at all: skipped, as an unknown type is.
                        Err(_) => continue,
                    };
                    match block.kind.as_str() {
                        Some("text") => folded.text.push_str(block.text.as_str().unwrap_or("")),
                        Some("thinking") => folded
                            .reasoning
                            .push_str(block.thinking.as_str().unwrap_or("")),
                        Some("tool_use") => folded.tool_calls.push(ToolCall {
                            id: block.id,
                            kind: "function",
                            function: Function {
                                name: block.name,
                                arguments: block
                                    .input
                                    .map_or_else(|| "{}".to_string(), |i| i.to_string()),
                            },
                        }),
                        _ => {}
                    }
                }
                Ok(folded)
            }
        }
        d.deserialize_seq(Visitor)
    }
}

/// A complete Anthropic message → a `chat.completion` reporting `model` (the name the client
/// asked for) and created at `created`. An error when the body is not a JSON object.
pub fn completion(message: &[u8], model: &str, created: u64) -> serde_json::Result<Completion> {
    let message: Message = crate::json::from_slice(message)?;
    // Content that is not a list of blocks carries nothing to show.
    let blocks = message.content.filter(|c| c.get().starts_with('['));
    let Folded {
        text,
        reasoning,
        tool_calls,
    } = match blocks {
        Some(raw) => crate::json::from_str(raw.get())?,
        None => Folded::default(),
    };
    #[derive(Serialize)]
    struct Msg {
        role: &'static str,
        content: Option<String>,
        refusal: Option<()>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        tool_calls: Vec<ToolCall>,
        #[serde(skip_serializing_if = "String::is_empty")]
        reasoning_content: String,
    }
    let content = (tool_calls.is_empty() || !text.is_empty()).then_some(text);
    let msg = Msg {
        role: "assistant",
        content,
        refusal: None,
        tool_calls,
        reasoning_content: reasoning,
    };
    #[derive(Serialize)]
    struct Choice {
        index: u32,
        message: Msg,
        logprobs: Option<()>,
        finish_reason: &'static str,
    }
    #[derive(Serialize)]
    struct Chat<'a> {
        id: String,
        object: &'static str,
        created: u64,
        model: &'a str,
        choices: [Choice; 1],
        usage: Value,
    }
    let body = serde_json::to_vec(&Chat {
        id: completion_id(message.id.as_str().unwrap_or("")),
        object: "chat.completion",
        created,
        model,
        choices: [Choice {
            index: 0,
            message: msg,
            logprobs: None,
            finish_reason: finish_reason(message.stop_reason.as_str()),
        }],
        usage: usage(&message.usage),
    })?;
    Ok(Completion {
        body,
        usage: message.usage,
    })
}

/// OpenAI's error body for an error of `error_type` (Anthropic's vocabulary) at `status`.
pub fn error_body(status: u16, error_type: &str, message: &str, param: Option<&str>) -> Value {
    let code = match (status, error_type) {
        (401, _) | (_, "authentication_error") => Some("invalid_api_key"),
        (429, _) | (_, "rate_limit_error") => Some("rate_limit_exceeded"),
        (404, _) | (_, "not_found_error") => Some("model_not_found"),
        (529, _) | (_, "overloaded_error") => Some("overloaded"),
        _ => None,
    };
    let kind = match error_type {
        "api_error" => "server_error",
        other => other,
    };
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

/// An Anthropic error body (`{"type":"error","error":{"type","message"}}`) → OpenAI's. A body
/// that is not Anthropic's shape keeps its text as the message.
pub fn error_from_anthropic(status: u16, body: &[u8]) -> Value {
    let value: Value = crate::json::from_slice(body).unwrap_or_default();
    let kind = value["error"]["type"].as_str().unwrap_or(if status >= 500 {
        "api_error"
    } else {
        "invalid_request_error"
    });
    let message = value["error"]["message"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned());
    error_body(status, kind, &message, None)
}

/// Anthropic's model list → OpenAI's.
pub fn models(list: &Value) -> Value {
    let data: Vec<Value> = list
        .get("data")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(model)
        .collect();
    json!({"object": "list", "data": data})
}

/// One Anthropic model object → OpenAI's.
pub fn model(m: &Value) -> Value {
    let created = m
        .get("created_at")
        .and_then(Value::as_str)
        .and_then(crate::time::parse_rfc3339)
        .unwrap_or(0);
    json!({
        "id": m.get("id").cloned().unwrap_or_default(),
        "object": "model",
        "created": created,
        "owned_by": "anthropic",
    })
}

/// The upstream's model list (or one model) in OpenAI's shape, with our aliases.
pub fn model_list(
    v: &serde_json::Value,
    aliases: &[String],
    alias: Option<&str>,
) -> serde_json::Value {
    if v.get("data").is_some() {
        let mut list = models(v);
        if let Some(data) = list["data"].as_array_mut() {
            data.extend(aliases.iter().map(|a| {
                serde_json::json!({"id": a, "object": "model", "created": 0, "owned_by": "llm-gateway"})
            }));
        }
        return list;
    }
    let mut model = model(v);
    if let Some(alias) = alias {
        model["id"] = alias.into();
        model["owned_by"] = "llm-gateway".into();
    }
    model
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_near_u64_max_saturate_instead_of_overflowing() {
        // Regression (fuzz): the upstream's counts were summed unchecked, a panic in debug.
        let u = usage(&json!({
            "input_tokens": u64::MAX,
            "cache_read_input_tokens": u64::MAX,
            "output_tokens": u64::MAX,
        }));
        assert_eq!(u["prompt_tokens"], u64::MAX);
        assert_eq!(u["total_tokens"], u64::MAX);
    }
}
