//! A Responses request's `input` (and its instructions) as Anthropic's system blocks and
//! turns: items walked one at a time, each parsed alone; messages, tool calls and their
//! outputs, reasoning with its signature; turns of one role merged in Anthropic's block order;
//! the prompt-cache breakpoints; whether thinking may be on for the conversation.

use serde_json::{Map, Value, json};

use super::request::REDACTED;
use crate::openai::Invalid;
use crate::openai::views::{Raw, each, text};

/// Anthropic's system blocks and turns, built item by item.
#[derive(Default)]
pub(super) struct Turns {
    pub(super) system: Vec<Value>,
    pub(super) messages: Vec<Value>,
}

impl Turns {
    pub(super) fn system_text(&mut self, text: &str) {
        if !text.is_empty() {
            self.system.push(json!({"type": "text", "text": text}));
        }
    }

    /// Puts each merged turn's blocks in the order Anthropic requires: a user turn's tool
    /// results first; an assistant turn's thinking first and its tool calls last.
    pub(super) fn order_blocks(&mut self) {
        for m in &mut self.messages {
            let user = m["role"] == "user";
            if let Some(content) = m["content"].as_array_mut() {
                content.sort_by_key(|b| match (user, b["type"].as_str()) {
                    (true, Some("tool_result")) => 0,
                    (true, _) => 1,
                    (false, Some("thinking" | "redacted_thinking")) => 0,
                    (false, Some("tool_use")) => 2,
                    (false, _) => 1,
                });
            }
        }
    }

    /// Whether thinking may be on for this conversation (`out` holds the tool choice).
    pub(super) fn thinking_allowed(&self, out: &Map<String, Value>) -> bool {
        let forced = out
            .get("tool_choice")
            .is_some_and(|c| c["type"] == "any" || c["type"] == "tool");
        let last_assistant_call = (self.messages.iter().rev())
            .find(|m| m["role"] == "assistant")
            .and_then(|m| m["content"].as_array())
            .filter(|c| c.iter().any(|b| b["type"] == "tool_use"));
        let unsigned_call = last_assistant_call.is_some_and(|c| {
            !c.first()
                .is_some_and(|b| b["type"] == "thinking" || b["type"] == "redacted_thinking")
        });
        let prefill = self
            .messages
            .last()
            .is_some_and(|m| m["role"] == "assistant");
        !forced && !unsigned_call && !prefill
    }

    /// Prompt-cache breakpoints, as Claude Code sets them and the Responses API has no word
    /// for: the last system block, the last tool, and the last block of the last turn (three
    /// of Anthropic's four). Codex replays the whole history each turn; without them every
    /// turn pays for it at the full input price.
    pub(super) fn mark_cache(&mut self, out: &mut Map<String, Value>) {
        let mark = |block: Option<&mut Value>| {
            if let Some(b) =
                block.filter(|b| b["type"] != "thinking" && b["type"] != "redacted_thinking")
            {
                b["cache_control"] = json!({"type": "ephemeral"});
            }
        };
        mark(self.system.last_mut());
        mark(
            out.get_mut("tools")
                .and_then(Value::as_array_mut)
                .and_then(|t| t.last_mut()),
        );
        mark(
            (self.messages.last_mut())
                .and_then(|m| m["content"].as_array_mut())
                .and_then(|c| c.last_mut()),
        );
    }

    /// Adds `blocks` to the conversation as `role`'s: to the last turn when it is `role`'s.
    pub(super) fn push(&mut self, role: &str, blocks: Vec<Value>) {
        if blocks.is_empty() {
            return;
        }
        if let Some(last) = self.messages.last_mut()
            && last["role"] == role
            && let Some(content) = last["content"].as_array_mut()
        {
            content.extend(blocks);
            return;
        }
        self.messages.push(json!({"role": role, "content": blocks}));
    }
}

/// `input`: a string (one user message) or items, walked one at a time.
pub(super) fn read_input(input: Raw<'_>, turns: &mut Turns) -> Result<(), Invalid> {
    let Some(input) = input else {
        return Err(Invalid::new("`input` is required", Some("input")));
    };
    if let Some(text) = text(Some(input)) {
        // Anthropic refuses empty text blocks.
        if !text.is_empty() {
            turns.push("user", vec![json!({"type": "text", "text": text})]);
        }
        return Ok(());
    }
    let walked = each(input, |i, raw| {
        let at = format!("input[{i}]");
        let item: Value = crate::json::from_str(raw.get())
            .map_err(|e| Invalid::new(format!("{at} is not valid: {e}"), Some(&at)))?;
        read_item(&item, &at, turns)
    })?;
    if walked {
        Ok(())
    } else {
        Err(Invalid::new(
            "`input` must be a string or an array of items",
            Some("input"),
        ))
    }
}

pub(super) fn str_field<'v>(item: &'v Value, field: &str, at: &str) -> Result<&'v str, Invalid> {
    item.get(field).and_then(Value::as_str).ok_or_else(|| {
        let param = format!("{at}.{field}");
        Invalid::new(format!("`{param}` must be a string"), Some(&param))
    })
}

/// One input item into the turns.
fn read_item(item: &Value, at: &str, turns: &mut Turns) -> Result<(), Invalid> {
    if !item.is_object() {
        return Err(Invalid::new(format!("{at} must be an object"), Some(at)));
    }
    let kind = item.get("type").and_then(Value::as_str);
    match kind {
        // A bare `{role, content}` is a message too.
        Some("message") | None => {
            let role = str_field(item, "role", at)?;
            let blocks = content(item.get("content"), &format!("{at}.content"))?;
            match role {
                "user" | "assistant" => turns.push(role, blocks),
                "system" | "developer" => {
                    for b in blocks {
                        if b["type"] != "text" {
                            return Err(Invalid::new(
                                format!("{at}: a {role} message holds text only"),
                                Some(at),
                            ));
                        }
                        turns.system.push(b);
                    }
                }
                other => {
                    return Err(Invalid::new(
                        format!("{at}: unknown role {other:?}"),
                        Some(&format!("{at}.role")),
                    ));
                }
            }
        }
        Some("function_call") => {
            let arguments = str_field(item, "arguments", at)?;
            let input: Value = if arguments.trim().is_empty() {
                json!({})
            } else {
                crate::json::from_str(arguments).map_err(|e| {
                    let param = format!("{at}.arguments");
                    Invalid::new(format!("`{param}` is not JSON: {e}"), Some(&param))
                })?
            };
            if !input.is_object() {
                let param = format!("{at}.arguments");
                return Err(Invalid::new(
                    format!("`{param}` must be a JSON object"),
                    Some(&param),
                ));
            }
            let block = tool_use(item, at, input)?;
            turns.push("assistant", vec![block]);
        }
        Some("custom_tool_call") => {
            let input = json!({"input": str_field(item, "input", at)?});
            let block = tool_use(item, at, input)?;
            turns.push("assistant", vec![block]);
        }
        Some("function_call_output" | "custom_tool_call_output") => {
            let id = call_id(item, at)?;
            let output = match item.get("output") {
                Some(Value::String(s)) => json!(s),
                Some(parts @ Value::Array(_)) => {
                    Value::Array(content(Some(parts), &format!("{at}.output"))?)
                }
                _ => {
                    let param = format!("{at}.output");
                    return Err(Invalid::new(
                        format!("`{param}` must be a string or content parts"),
                        Some(&param),
                    ));
                }
            };
            let block = json!({"type": "tool_result", "tool_use_id": id, "content": output});
            turns.push("user", vec![block]);
        }
        Some("reasoning") => {
            // Without a signature Anthropic cannot take the block back: it is dropped.
            let Some(signature) = item
                .get("encrypted_content")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
            else {
                return Ok(());
            };
            let block = match signature.strip_prefix(REDACTED) {
                Some(data) => json!({"type": "redacted_thinking", "data": data}),
                None => {
                    let summary: Vec<&str> = (item.get("summary").and_then(Value::as_array))
                        .into_iter()
                        .flatten()
                        .filter_map(|s| s.get("text").and_then(Value::as_str))
                        .collect();
                    json!({"type": "thinking", "thinking": summary.join("\n\n"), "signature": signature})
                }
            };
            turns.push("assistant", vec![block]);
        }
        // Items of built-in tools this gateway does not offer (web_search_call, …) and
        // references to stored items carry nothing Anthropic could take: dropped.
        Some(_) => {}
    }
    Ok(())
}

/// A tool call's id: `call_id`, which must be a valid Anthropic tool id.
fn call_id<'v>(item: &'v Value, at: &str) -> Result<&'v str, Invalid> {
    let id = str_field(item, "call_id", at)?;
    let valid = (1..=256).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        let param = format!("{at}.call_id");
        return Err(Invalid::new(
            format!("`{param}` must be letters, digits, '_' and '-'"),
            Some(&param),
        ));
    }
    Ok(id)
}

fn tool_use(item: &Value, at: &str, input: Value) -> Result<Value, Invalid> {
    Ok(json!({
        "type": "tool_use",
        "id": call_id(item, at)?,
        "name": str_field(item, "name", at)?,
        "input": input,
    }))
}

/// A message's `content`: a string, or parts (`input_text`, `output_text`, `refusal`,
/// `input_image`, `input_file`).
fn content(content: Option<&Value>, at: &str) -> Result<Vec<Value>, Invalid> {
    let parts = match content {
        Some(Value::String(s)) if s.is_empty() => return Ok(Vec::new()),
        Some(Value::String(s)) => return Ok(vec![json!({"type": "text", "text": s})]),
        Some(Value::Array(parts)) => parts,
        _ => {
            return Err(Invalid::new(
                format!("`{at}` must be a string or an array of parts"),
                Some(at),
            ));
        }
    };
    let mut blocks = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let at = format!("{at}[{i}]");
        match part.get("type").and_then(Value::as_str) {
            Some("input_text" | "output_text" | "text") => {
                let text = str_field(part, "text", &at)?;
                // Anthropic refuses empty text blocks.
                if !text.is_empty() {
                    blocks.push(json!({"type": "text", "text": text}));
                }
            }
            Some("refusal") => {
                let text = str_field(part, "refusal", &at)?;
                if !text.is_empty() {
                    blocks.push(json!({"type": "text", "text": text}));
                }
            }
            Some("input_image") => {
                let url = (part.get("image_url").and_then(Value::as_str)).ok_or_else(|| {
                    Invalid::new(
                        format!("{at}: an image needs image_url (a data: or http(s) URL); file ids are not supported"),
                        Some(&at),
                    )
                })?;
                blocks.push(media(url, "image", &at)?);
            }
            Some("input_file") => {
                let data = (part.get("file_data").and_then(Value::as_str)).ok_or_else(|| {
                    Invalid::new(
                        format!(
                            "{at}: a file needs file_data (a data: URL); file ids are not supported"
                        ),
                        Some(&at),
                    )
                })?;
                blocks.push(media(data, "document", &at)?);
            }
            other => {
                return Err(Invalid::new(
                    format!("{at}: unsupported content part type {other:?}"),
                    Some(&at),
                ));
            }
        }
    }
    Ok(blocks)
}

/// An image or document block from a data URL (base64) or an http(s) URL, which Anthropic
/// fetches itself.
fn media(url: &str, kind: &str, at: &str) -> Result<Value, Invalid> {
    if let Some(rest) = url.strip_prefix("data:") {
        let bad = || {
            Invalid::new(
                format!("{at}: a data URL must be data:<type>;base64,<data>"),
                Some(at),
            )
        };
        let (meta, data) = rest.split_once(',').ok_or_else(bad)?;
        let media_type = meta
            .strip_suffix(";base64")
            .filter(|m| m.contains('/'))
            .ok_or_else(bad)?;
        if data.is_empty() || !crate::encoding::is_base64(data) {
            return Err(Invalid::new(
                format!("{at}: the data URL's base64 does not decode"),
                Some(at),
            ));
        }
        let kind = if media_type == "application/pdf" {
            "document"
        } else {
            kind
        };
        return Ok(
            json!({"type": kind, "source": {"type": "base64", "media_type": media_type, "data": data}}),
        );
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(json!({"type": kind, "source": {"type": "url", "url": url}}));
    }
    Err(Invalid::new(
        format!("{at}: expected a data: URL or an http(s) URL"),
        Some(at),
    ))
}
