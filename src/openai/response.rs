//! Anthropic Messages response → OpenAI `chat.completion`, and Anthropic error bodies →
//! OpenAI error bodies. Pure. Rules from shared/spec/openai-conversion.md §2.

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

/// A complete Anthropic message → a `chat.completion` reporting `model` (the name the client
/// asked for) and created at `created`.
pub fn completion(message: &Value, model: &str, created: u64) -> Value {
    let blocks = message
        .get("content")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut tool_calls = Vec::new();
    for block in blocks {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("thinking") => {
                reasoning.push_str(block.get("thinking").and_then(Value::as_str).unwrap_or(""))
            }
            Some("tool_use") => tool_calls.push(json!({
                "id": block.get("id").cloned().unwrap_or_default(),
                "type": "function",
                "function": {
                    "name": block.get("name").cloned().unwrap_or_default(),
                    "arguments": block.get("input").map_or_else(|| "{}".to_string(), Value::to_string),
                },
            })),
            _ => {}
        }
    }
    let mut msg = json!({"role": "assistant", "content": text, "refusal": null});
    if !tool_calls.is_empty() {
        if text.is_empty() {
            msg["content"] = Value::Null;
        }
        msg["tool_calls"] = Value::Array(tool_calls);
    }
    if !reasoning.is_empty() {
        msg["reasoning_content"] = reasoning.into();
    }
    let id = message.get("id").and_then(Value::as_str).unwrap_or("");
    json!({
        "id": completion_id(id),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": msg,
            "logprobs": null,
            "finish_reason": finish_reason(message.get("stop_reason").and_then(Value::as_str)),
        }],
        "usage": usage(message.get("usage").unwrap_or(&Value::Null)),
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
