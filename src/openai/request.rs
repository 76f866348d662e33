//! OpenAI Chat Completions request → Anthropic Messages request. Pure: a JSON value in, a JSON
//! value out, or a 400 naming the offending field. Every rule follows
//! shared/spec/openai-conversion.md §1; where the spec lists options, the choice and its reason
//! are written next to the code.

use serde_json::{Map, Value, json};

use super::Invalid;

/// What the converter needs from the configuration.
pub struct Options<'a> {
    /// `max_tokens` when the client gives none.
    pub default_max_tokens: u64,
    /// Client model name → upstream model name.
    pub aliases: &'a std::collections::HashMap<String, String>,
}

/// The converted request and what the response side needs to know about it.
#[derive(Debug)]
pub struct Converted {
    pub body: Value,
    pub include_usage: bool,
    /// The model the client asked for, reported back in responses.
    pub requested_model: String,
}

/// Thinking budgets per `reasoning_effort`. LiteLLM's values (low 1024 / medium 2048 / high
/// 4096), with `minimal` at Anthropic's floor of 1024: the smallest budgets that still think,
/// so a client asking for "low" does not pay for a long think.
fn thinking_budget(effort: &str) -> Option<Option<u64>> {
    match effort {
        "none" => Some(None),
        "minimal" | "low" => Some(Some(1024)),
        "medium" => Some(Some(2048)),
        "high" => Some(Some(4096)),
        _ => None,
    }
}

pub fn convert(body: &Value, options: &Options<'_>) -> Result<Converted, Invalid> {
    let obj = body
        .as_object()
        .ok_or_else(|| Invalid::new("the request body must be a JSON object", None))?;
    let requested_model = obj
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| Invalid::new("`model` is required and must be a string", Some("model")))?
        .to_string();
    let model = options
        .aliases
        .get(&requested_model)
        .cloned()
        .unwrap_or_else(|| requested_model.clone());

    let mut out = Map::new();
    out.insert("model".into(), model.into());

    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            Invalid::new(
                "`messages` is required and must be an array",
                Some("messages"),
            )
        })?;
    let (system, turns) = convert_messages(messages)?;
    if turns.is_empty() {
        return Err(Invalid::new(
            "`messages` must contain at least one user or assistant message",
            Some("messages"),
        ));
    }

    // max_completion_tokens is the newer field: it wins when both are given.
    let max_tokens = match (obj.get("max_completion_tokens"), obj.get("max_tokens")) {
        (Some(v), _) if !v.is_null() => positive(v, "max_completion_tokens")?,
        (_, Some(v)) if !v.is_null() => positive(v, "max_tokens")?,
        _ => options.default_max_tokens,
    };

    match obj.get("n") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64() == Some(1) => {}
        Some(_) => {
            return Err(Invalid::new(
                "`n` must be 1: Claude returns exactly one choice",
                Some("n"),
            ));
        }
    }

    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(Invalid::new("`stream` must be a boolean", Some("stream"))),
    };
    let include_usage = stream
        && obj
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);

    let mut system = system;
    if let Some(format) = obj.get("response_format")
        && let Some(instruction) = json_instruction(format)?
    {
        system.push(json!({"type": "text", "text": instruction}));
    }
    if !system.is_empty() {
        out.insert("system".into(), Value::Array(system));
    }
    out.insert("messages".into(), Value::Array(turns));

    // Thinking first: it constrains max_tokens and the sampling fields.
    let mut thinking = obj.get("thinking").cloned();
    if let Some(effort) = obj.get("reasoning_effort").filter(|v| !v.is_null()) {
        let effort = effort.as_str().unwrap_or("");
        match thinking_budget(effort) {
            None => {
                return Err(Invalid::new(
                    format!(
                        "unknown reasoning_effort {effort:?}: use none, minimal, low, medium or high"
                    ),
                    Some("reasoning_effort"),
                ));
            }
            Some(None) => thinking = None,
            Some(Some(budget)) => {
                thinking = Some(json!({"type": "enabled", "budget_tokens": budget}))
            }
        }
    }
    let thinking_budget = thinking
        .as_ref()
        .filter(|t| t.get("type").and_then(Value::as_str) == Some("enabled"))
        .and_then(|t| t.get("budget_tokens"))
        .and_then(Value::as_u64);
    // Anthropic requires max_tokens > budget_tokens; the client's max_tokens is what it wants
    // to *see*, so the budget goes on top rather than eating into the answer.
    let max_tokens = match thinking_budget {
        // Saturating: both numbers are the client's, and u64::MAX of each must not overflow.
        Some(budget) if max_tokens <= budget => max_tokens.saturating_add(budget),
        _ => max_tokens,
    };
    out.insert("max_tokens".into(), max_tokens.into());
    if let Some(t) = thinking {
        out.insert("thinking".into(), t);
    }

    if let Some(t) = obj.get("temperature").filter(|v| !v.is_null()) {
        let t = t
            .as_f64()
            .filter(|t| (0.0..=2.0).contains(t))
            .ok_or_else(|| {
                Invalid::new(
                    "`temperature` must be a number from 0 to 2",
                    Some("temperature"),
                )
            })?;
        // Thinking allows no temperature change; otherwise OpenAI's 0–2 is capped to
        // Anthropic's 0–1 (as Anthropic's own compatibility layer does).
        if thinking_budget.is_none() {
            out.insert("temperature".into(), json!(t.min(1.0)));
        }
    }
    if let Some(p) = obj.get("top_p").filter(|v| !v.is_null()) {
        let p = p
            .as_f64()
            .filter(|p| (0.0..=1.0).contains(p))
            .ok_or_else(|| Invalid::new("`top_p` must be a number from 0 to 1", Some("top_p")))?;
        // Newer models reject temperature and top_p together; temperature is the one clients
        // set deliberately far more often, so top_p goes when both are present.
        if !out.contains_key("temperature") && thinking_budget.is_none() {
            out.insert("top_p".into(), json!(p));
        }
    }
    if let Some(k) = obj.get("top_k").filter(|v| !v.is_null())
        && thinking_budget.is_none()
    {
        out.insert("top_k".into(), k.clone());
    }

    if let Some(stops) = stop_sequences(obj.get("stop"))? {
        out.insert("stop_sequences".into(), stops);
    }

    let tools = convert_tools(obj)?;
    let has_tools = !tools.is_empty();
    if has_tools {
        out.insert("tools".into(), Value::Array(tools));
    }
    if let Some(choice) = tool_choice(obj, has_tools)? {
        out.insert("tool_choice".into(), choice);
    }

    if let Some(user) = obj.get("user").and_then(Value::as_str) {
        // Only opaque ids: an email or phone number is personal data Anthropic asks not to get.
        let personal = user.contains('@') || user.chars().filter(char::is_ascii_digit).count() >= 7;
        if !user.is_empty() && !personal {
            out.insert("metadata".into(), json!({"user_id": user}));
        }
    }
    out.insert("stream".into(), stream.into());
    // Everything else is dropped silently, as Anthropic's own compatibility layer does: seed,
    // logprobs, top_logprobs, logit_bias, presence_penalty, frequency_penalty, metadata,
    // service_tier, store, prediction, modalities, audio, web_search_options and fields newer
    // than this code. Passing unknowns on would make Anthropic answer 400 for them.

    Ok(Converted {
        body: Value::Object(out),
        include_usage,
        requested_model,
    })
}

fn positive(v: &Value, field: &str) -> Result<u64, Invalid> {
    v.as_u64()
        .filter(|n| *n > 0)
        .ok_or_else(|| Invalid::new(format!("`{field}` must be a positive integer"), Some(field)))
}

/// `stop` → `stop_sequences`: a string is wrapped; whitespace-only stops are dropped because
/// Anthropic rejects them; nothing left means no field.
fn stop_sequences(stop: Option<&Value>) -> Result<Option<Value>, Invalid> {
    let list: Vec<&str> = match stop {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| Invalid::new("`stop` must be a string or strings", Some("stop")))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(Invalid::new(
                "`stop` must be a string or strings",
                Some("stop"),
            ));
        }
    };
    let kept: Vec<Value> = list
        .into_iter()
        .filter(|s| !s.trim().is_empty())
        .map(Value::from)
        .collect();
    Ok((!kept.is_empty()).then_some(Value::Array(kept)))
}

/// `response_format` → an instruction in `system`. Of the spec's three options this one works
/// on every model and keeps the answer in `message.content` where the client looks: a forced
/// tool (LiteLLM) changes the response shape, and native structured output exists only on some
/// models.
fn json_instruction(format: &Value) -> Result<Option<String>, Invalid> {
    let kind = format.get("type").and_then(Value::as_str).unwrap_or("");
    match kind {
        "text" | "" if !format.is_null() => Ok(None),
        _ if format.is_null() => Ok(None),
        "json_object" => Ok(Some(
            "Respond with a single valid JSON object and nothing else.".into(),
        )),
        "json_schema" => {
            let schema = format
                .get("json_schema")
                .and_then(|s| s.get("schema"))
                .ok_or_else(|| {
                    Invalid::new(
                        "response_format json_schema needs json_schema.schema",
                        Some("response_format"),
                    )
                })?;
            Ok(Some(format!(
                "Respond with a single valid JSON value that conforms to this JSON Schema, and nothing else:\n{schema}"
            )))
        }
        other => Err(Invalid::new(
            format!("unsupported response_format type {other:?}"),
            Some("response_format"),
        )),
    }
}

fn convert_tools(obj: &Map<String, Value>) -> Result<Vec<Value>, Invalid> {
    let mut tools = Vec::new();
    if let Some(list) = obj.get("tools").filter(|v| !v.is_null()) {
        let list = list
            .as_array()
            .ok_or_else(|| Invalid::new("`tools` must be an array", Some("tools")))?;
        for (i, tool) in list.iter().enumerate() {
            let kind = tool
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("function");
            if kind != "function" {
                return Err(Invalid::new(
                    format!("unsupported tool type {kind:?}: only function tools are supported"),
                    Some(&format!("tools[{i}].type")),
                ));
            }
            let function = tool.get("function").ok_or_else(|| {
                Invalid::new(
                    "a tool needs `function`",
                    Some(&format!("tools[{i}].function")),
                )
            })?;
            tools.push(tool_definition(function, &format!("tools[{i}].function"))?);
        }
    }
    // The deprecated `functions` field means the same.
    if let Some(list) = obj.get("functions").and_then(Value::as_array) {
        for (i, function) in list.iter().enumerate() {
            tools.push(tool_definition(function, &format!("functions[{i}]"))?);
        }
    }
    Ok(tools)
}

fn tool_definition(function: &Value, param: &str) -> Result<Value, Invalid> {
    let name = function
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| valid_tool_name(n))
        .ok_or_else(|| {
            Invalid::new(
                "a function name must be 1 to 128 letters, digits, _ or -",
                Some(&format!("{param}.name")),
            )
        })?;
    let mut tool = Map::new();
    tool.insert("name".into(), name.into());
    if let Some(d) = function.get("description").and_then(Value::as_str) {
        tool.insert("description".into(), d.into());
    }
    let schema = match function.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p) if p.is_object() => p.clone(),
        Some(_) => {
            return Err(Invalid::new(
                "`parameters` must be a JSON Schema object",
                Some(&format!("{param}.parameters")),
            ));
        }
    };
    tool.insert("input_schema".into(), schema);
    Ok(Value::Object(tool))
}

pub fn valid_tool_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Anthropic requires tool ids to match `^[a-zA-Z0-9_-]+$`; the same mapping is applied to
/// `tool_use.id` and `tool_result.tool_use_id`, so pairs still match.
pub fn sanitize_id(id: &str) -> String {
    crate::encoding::word_chars(id)
}

fn tool_choice(obj: &Map<String, Value>, has_tools: bool) -> Result<Option<Value>, Invalid> {
    let parallel_off = obj.get("parallel_tool_calls").and_then(Value::as_bool) == Some(false);
    let choice = obj
        .get("tool_choice")
        .or_else(|| obj.get("function_call"))
        .filter(|v| !v.is_null());
    // Sent only with tools: Anthropic rejects a tool_choice without them.
    if !has_tools {
        return Ok(None);
    }
    let mut mapped = match choice {
        None => {
            if !parallel_off {
                return Ok(None);
            }
            json!({"type": "auto"})
        }
        Some(Value::String(s)) => match s.as_str() {
            "auto" => json!({"type": "auto"}),
            "required" => json!({"type": "any"}),
            "none" => json!({"type": "none"}),
            other => {
                return Err(Invalid::new(
                    format!("unknown tool_choice {other:?}"),
                    Some("tool_choice"),
                ));
            }
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .or_else(|| o.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    Invalid::new("tool_choice needs function.name", Some("tool_choice"))
                })?;
            json!({"type": "tool", "name": name})
        }
        Some(_) => {
            return Err(Invalid::new(
                "tool_choice must be a string or an object",
                Some("tool_choice"),
            ));
        }
    };
    if parallel_off && mapped["type"] != "none" {
        mapped["disable_parallel_tool_use"] = true.into();
    }
    Ok(Some(mapped))
}

/// A turn under construction: Anthropic role and content blocks.
struct Turn {
    role: &'static str,
    blocks: Vec<Value>,
}

/// Hoists system and developer messages, converts the rest, and merges consecutive turns of
/// one role (tool results first in their user turn, tool calls last in their assistant turn).
fn convert_messages(messages: &[Value]) -> Result<(Vec<Value>, Vec<Value>), Invalid> {
    let mut system = Vec::new();
    let mut turns: Vec<Turn> = Vec::new();
    let mut legacy_call_id: Option<String> = None;
    for (i, m) in messages.iter().enumerate() {
        let at = |field: &str| format!("messages[{i}].{field}");
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| Invalid::new("a message needs a role", Some(&at("role"))))?;
        let content = m.get("content").unwrap_or(&Value::Null);
        let (role, blocks) = match role {
            "system" | "developer" => {
                system.extend(text_blocks(content, &at("content"))?);
                continue;
            }
            "user" => ("user", user_blocks(content, &at("content"))?),
            "assistant" => {
                let mut blocks = text_blocks(content, &at("content"))?;
                if let Some(calls) = m.get("tool_calls").filter(|v| !v.is_null()) {
                    let calls = calls.as_array().ok_or_else(|| {
                        Invalid::new("tool_calls must be an array", Some(&at("tool_calls")))
                    })?;
                    for (j, call) in calls.iter().enumerate() {
                        blocks.push(tool_use(call, &at(&format!("tool_calls[{j}]")))?);
                    }
                }
                if let Some(call) = m.get("function_call").filter(|v| !v.is_null()) {
                    let id = format!("call_function_{i}");
                    let mut block =
                        tool_use(&json!({"id": id, "function": call}), &at("function_call"))?;
                    block["id"] = id.clone().into();
                    legacy_call_id = Some(id);
                    blocks.push(block);
                }
                ("assistant", blocks)
            }
            "tool" | "function" => {
                let id = if role == "tool" {
                    m.get("tool_call_id")
                        .and_then(Value::as_str)
                        .filter(|s| !s.is_empty())
                        .ok_or_else(|| {
                            Invalid::new(
                                "a tool message needs tool_call_id",
                                Some(&at("tool_call_id")),
                            )
                        })?
                        .to_string()
                } else {
                    legacy_call_id.clone().ok_or_else(|| {
                        Invalid::new(
                            "a function message must follow an assistant function_call",
                            Some(&at("role")),
                        )
                    })?
                };
                let result = tool_result_content(content, &at("content"))?;
                let block = json!({"type": "tool_result", "tool_use_id": sanitize_id(&id), "content": result});
                ("user", vec![block])
            }
            other => {
                return Err(Invalid::new(
                    format!(
                        "unknown role {other:?}: use system, developer, user, assistant or tool"
                    ),
                    Some(&at("role")),
                ));
            }
        };
        if blocks.is_empty() {
            // An empty turn carries nothing, and Anthropic rejects empty content.
            continue;
        }
        match turns.last_mut() {
            Some(last) if last.role == role => last.blocks.extend(blocks),
            _ => turns.push(Turn { role, blocks }),
        }
    }
    let turns = turns
        .into_iter()
        .map(|mut t| {
            // Stable: tool results first (Anthropic requires it), tool calls last.
            if t.role == "user" {
                t.blocks.sort_by_key(|b| b["type"] != "tool_result");
            } else {
                t.blocks.sort_by_key(|b| b["type"] == "tool_use");
            }
            json!({"role": t.role, "content": t.blocks})
        })
        .collect();
    Ok((system, turns))
}

/// Text blocks from string or array content; empty and whitespace-only text is skipped.
fn text_blocks(content: &Value, param: &str) -> Result<Vec<Value>, Invalid> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => Ok(text_block(s, None).into_iter().collect()),
        Value::Array(parts) => {
            let mut out = Vec::new();
            for (k, part) in parts.iter().enumerate() {
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        let text = part.get("text").and_then(Value::as_str).ok_or_else(|| {
                            Invalid::new(
                                "a text part needs text",
                                Some(&format!("{param}[{k}].text")),
                            )
                        })?;
                        out.extend(text_block(text, part.get("cache_control")));
                    }
                    Some("refusal") => {}
                    _ => {
                        return Err(Invalid::new(
                            "only text parts are allowed here",
                            Some(&format!("{param}[{k}].type")),
                        ));
                    }
                }
            }
            Ok(out)
        }
        _ => Err(Invalid::new(
            "content must be a string or an array of parts",
            Some(param),
        )),
    }
}

fn text_block(text: &str, cache_control: Option<&Value>) -> Option<Value> {
    if text.trim().is_empty() {
        return None;
    }
    let mut block = json!({"type": "text", "text": text});
    if let Some(cc) = cache_control.filter(|v| !v.is_null()) {
        block["cache_control"] = cc.clone();
    }
    Some(block)
}

fn user_blocks(content: &Value, param: &str) -> Result<Vec<Value>, Invalid> {
    let Value::Array(parts) = content else {
        return text_blocks(content, param);
    };
    let mut out = Vec::new();
    for (k, part) in parts.iter().enumerate() {
        let at = format!("{param}[{k}]");
        match part.get("type").and_then(Value::as_str) {
            Some("text") => out.extend(text_blocks(&Value::Array(vec![part.clone()]), param)?),
            Some("image_url") => {
                let url = match part.get("image_url") {
                    Some(Value::String(u)) => u.as_str(),
                    Some(o) => o.get("url").and_then(Value::as_str).unwrap_or(""),
                    None => "",
                };
                out.push(media_block(url, "image", &format!("{at}.image_url"))?);
            }
            Some("file") => {
                let file = part.get("file").unwrap_or(&Value::Null);
                if file.get("file_id").is_some() && file.get("file_data").is_none() {
                    return Err(Invalid::new(
                        "file_id has no Anthropic equivalent: send file_data as a data URL",
                        Some(&format!("{at}.file.file_id")),
                    ));
                }
                let data = file.get("file_data").and_then(Value::as_str).unwrap_or("");
                out.push(media_block(
                    data,
                    "document",
                    &format!("{at}.file.file_data"),
                )?);
            }
            // Anthropic takes no audio; dropped as Anthropic's own compatibility layer does.
            Some("input_audio") => {}
            _ => {
                return Err(Invalid::new(
                    "unsupported content part type",
                    Some(&format!("{at}.type")),
                ));
            }
        }
    }
    Ok(out)
}

/// A data URL → base64 source (a PDF becomes a document); an https URL → url source.
fn media_block(url: &str, default_kind: &str, param: &str) -> Result<Value, Invalid> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| Invalid::new("malformed data URL", Some(param)))?;
        let media_type = meta
            .strip_suffix(";base64")
            .filter(|m| m.contains('/'))
            .ok_or_else(|| {
                Invalid::new(
                    "a data URL must be base64: data:<type>;base64,<data>",
                    Some(param),
                )
            })?;
        if data.is_empty() || crate::encoding::base64_decode(data).is_none() {
            return Err(Invalid::new(
                "the data URL's base64 does not decode",
                Some(param),
            ));
        }
        let kind = if media_type == "application/pdf" {
            "document"
        } else {
            default_kind
        };
        return Ok(
            json!({"type": kind, "source": {"type": "base64", "media_type": media_type, "data": data}}),
        );
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        // Anthropic fetches http(s) URLs itself; the gateway downloads nothing.
        return Ok(json!({"type": default_kind, "source": {"type": "url", "url": url}}));
    }
    Err(Invalid::new(
        "expected a data: URL or an http(s) URL",
        Some(param),
    ))
}

fn tool_use(call: &Value, param: &str) -> Result<Value, Invalid> {
    let function = call.get("function").ok_or_else(|| {
        Invalid::new(
            "a tool call needs function",
            Some(&format!("{param}.function")),
        )
    })?;
    let name = function
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            Invalid::new(
                "a tool call needs function.name",
                Some(&format!("{param}.function.name")),
            )
        })?;
    let id = call
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Invalid::new("a tool call needs an id", Some(&format!("{param}.id"))))?;
    // Empty arguments mean no arguments; anything else must be a JSON object. A bad value is
    // a 400 naming it, never a silently dropped or emptied call.
    let input = match function.get("arguments") {
        None | Some(Value::Null) => json!({}),
        Some(Value::String(s)) if s.trim().is_empty() => json!({}),
        Some(Value::String(s)) => crate::json::from_str::<Value>(s)
            .ok()
            .filter(Value::is_object)
            .ok_or_else(|| {
                Invalid::new(
                    "function.arguments must be a JSON object encoded as a string",
                    Some(&format!("{param}.function.arguments")),
                )
            })?,
        Some(v) if v.is_object() => v.clone(),
        Some(_) => {
            return Err(Invalid::new(
                "function.arguments must be a JSON object encoded as a string",
                Some(&format!("{param}.function.arguments")),
            ));
        }
    };
    Ok(json!({"type": "tool_use", "id": sanitize_id(id), "name": name, "input": input}))
}

/// A tool result's content: a string, or text and image parts.
fn tool_result_content(content: &Value, param: &str) -> Result<Value, Invalid> {
    match content {
        Value::Null => Ok(Value::String(String::new())),
        Value::String(s) => Ok(Value::String(s.clone())),
        Value::Array(_) => Ok(Value::Array(user_blocks(content, param)?)),
        _ => Err(Invalid::new(
            "content must be a string or an array of parts",
            Some(param),
        )),
    }
}
