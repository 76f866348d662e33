//! OpenAI Responses request → Anthropic Messages request. The top-level fields are read
//! through borrowed views; `input` is walked one item at a time (never collected), each item
//! parsed alone and turned into blocks of the turn it belongs to, consecutive turns of one
//! role merged. Rules from shared/spec/openai-responses.md; where it leaves a choice, the
//! choice and its reason are written beside the code.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::openai::Invalid;
use crate::openai::request::{Options, opaque_user, read, thinking_budget};
use crate::openai::views::{Raw, each, text};

/// The converted request and what the answer's conversion needs to know about it.
#[derive(Debug)]
pub struct Converted {
    /// The Anthropic request body, as JSON text.
    pub body: Vec<u8>,
    /// The model the client asked for, reported back.
    pub requested_model: String,
    /// `prompt_cache_key`: the conversation, for sticky sessions.
    pub session: Option<String>,
    /// Names of `custom` (free-form) tools: their calls go back as `custom_tool_call`.
    pub custom_tools: Vec<String>,
}

/// A `reasoning` item's `encrypted_content` that stands for a `redacted_thinking` block.
pub const REDACTED: &str = "redacted_thinking:";

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    model: Raw<'a>,
    #[serde(borrow, default)]
    instructions: Raw<'a>,
    #[serde(borrow, default)]
    input: Raw<'a>,
    #[serde(borrow, default)]
    tools: Raw<'a>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<Value>,
    max_output_tokens: Option<Value>,
    temperature: Option<Value>,
    top_p: Option<Value>,
    stop: Option<Value>,
    reasoning: Option<Value>,
    text: Option<Value>,
    stream: Option<Value>,
    prompt_cache_key: Option<Value>,
    previous_response_id: Option<Value>,
    user: Option<Value>,
}

/// Converts one request.
pub fn convert(body: &[u8], options: &Options<'_>) -> Result<Converted, Invalid> {
    let f: Fields = read(body)?;
    if f.previous_response_id
        .as_ref()
        .is_some_and(|v| !v.is_null())
    {
        return Err(Invalid::new(
            "previous_response_id is not supported: this gateway keeps no conversation state; send the whole history in `input` (as Codex does with store: false)",
            Some("previous_response_id"),
        ));
    }
    let requested_model = text(f.model)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| Invalid::new("`model` is required and must be a string", Some("model")))?
        .into_owned();
    let model = (options.aliases.get(&requested_model)).unwrap_or(&requested_model);

    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    let mut turns = Turns::default();
    if let Some(instructions) = f.instructions {
        let instructions = text(Some(instructions))
            .ok_or_else(|| Invalid::new("`instructions` must be a string", Some("instructions")))?;
        turns.system_text(&instructions);
    }
    read_input(f.input, &mut turns)?;
    if let Some(instruction) = text_format(f.text.as_ref())? {
        turns.system_text(&instruction);
    }
    if turns.messages.is_empty() {
        return Err(Invalid::new(
            "`input` must hold at least one user or assistant message",
            Some("input"),
        ));
    }
    turns.order_blocks();
    let asked = write_thinking(&f, options.default_max_tokens, &mut out)?;
    let mut thinking = asked.is_some();
    let custom_tools = write_tools(&f, &mut out)?;
    if thinking && !turns.thinking_allowed(&out) {
        // Anthropic refuses thinking with a forced tool, after an assistant turn whose tool
        // call carries no thinking block (a history replayed without its signatures), and
        // before an assistant prefill: the answer goes without it rather than a 400.
        out.remove("thinking");
        out.insert(
            "max_tokens".into(),
            json!(asked.unwrap_or(options.default_max_tokens)),
        );
        thinking = false;
    }
    write_sampling(&f, thinking, &mut out)?;
    if let Some(stops) = stop_sequences(f.stop.as_ref())? {
        out.insert("stop_sequences".into(), stops);
    }
    turns.mark_cache(&mut out);
    out.insert("messages".into(), Value::Array(turns.messages));
    if !turns.system.is_empty() {
        out.insert("system".into(), Value::Array(turns.system));
    }
    if let Some(user) = f
        .user
        .as_ref()
        .and_then(Value::as_str)
        .and_then(opaque_user)
    {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    let stream = match &f.stream {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(Invalid::new("`stream` must be a boolean", Some("stream"))),
    };
    out.insert("stream".into(), json!(stream));
    let session = (f.prompt_cache_key.as_ref())
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(String::from);
    // Dropped, as on the chat route: store, metadata, client_metadata, service_tier,
    // truncation, background, safety_identifier and fields newer than this code.
    Ok(Converted {
        body: serde_json::to_vec(&Value::Object(out)).unwrap_or_default(),
        requested_model,
        session,
        custom_tools,
    })
}

/// Anthropic's system blocks and turns, built item by item.
#[derive(Default)]
struct Turns {
    system: Vec<Value>,
    messages: Vec<Value>,
}

impl Turns {
    fn system_text(&mut self, text: &str) {
        if !text.is_empty() {
            self.system.push(json!({"type": "text", "text": text}));
        }
    }

    /// Puts each merged turn's blocks in the order Anthropic requires: a user turn's tool
    /// results first; an assistant turn's thinking first and its tool calls last.
    fn order_blocks(&mut self) {
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
    fn thinking_allowed(&self, out: &Map<String, Value>) -> bool {
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
    fn mark_cache(&mut self, out: &mut Map<String, Value>) {
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
    fn push(&mut self, role: &str, blocks: Vec<Value>) {
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
fn read_input(input: Raw<'_>, turns: &mut Turns) -> Result<(), Invalid> {
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

fn str_field<'v>(item: &'v Value, field: &str, at: &str) -> Result<&'v str, Invalid> {
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

/// `text.format`: a JSON schema or JSON object asked for becomes a system instruction, as on
/// the chat route (it works on every model and keeps the answer in the message's text).
fn text_format(text: Option<&Value>) -> Result<Option<String>, Invalid> {
    let Some(format) = text.and_then(|t| t.get("format")).filter(|f| f.is_object()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str).unwrap_or("text") {
        "text" => Ok(None),
        "json_object" => Ok(Some(
            "Respond with a single valid JSON object and nothing else.".into(),
        )),
        "json_schema" => {
            let schema = format.get("schema").ok_or_else(|| {
                Invalid::new(
                    "text.format json_schema needs a schema",
                    Some("text.format"),
                )
            })?;
            Ok(Some(format!(
                "Respond with a single valid JSON value that conforms to this JSON Schema, and nothing else:\n{schema}"
            )))
        }
        other => Err(Invalid::new(
            format!("unsupported text.format type {other:?}"),
            Some("text.format"),
        )),
    }
}

/// `max_output_tokens` and `reasoning.effort` → `max_tokens` and `thinking`, by the chat
/// route's table. Without an effort thinking stays off: `{"summary": "auto"}` alone, as Codex
/// sends it, asks for summaries of thinking that is on, not for thinking. With thinking on,
/// returns the `max_tokens` asked for (before the budget went on top of it).
fn write_thinking(
    f: &Fields<'_>,
    default_max_tokens: u64,
    out: &mut Map<String, Value>,
) -> Result<Option<u64>, Invalid> {
    let max_tokens = match &f.max_output_tokens {
        None | Some(Value::Null) => default_max_tokens,
        Some(v) => v.as_u64().filter(|n| *n > 0).ok_or_else(|| {
            Invalid::new(
                "`max_output_tokens` must be a positive integer",
                Some("max_output_tokens"),
            )
        })?,
    };
    let effort = f
        .reasoning
        .as_ref()
        .and_then(|r| r.get("effort"))
        .filter(|e| !e.is_null());
    let budget = match effort {
        None => None,
        Some(e) => {
            let effort = e.as_str().unwrap_or("");
            thinking_budget(effort).ok_or_else(|| {
                Invalid::new(
                    format!("unknown reasoning.effort {effort:?}: use none, minimal, low, medium, high or xhigh"),
                    Some("reasoning.effort"),
                )
            })?
        }
    };
    // As on the chat route: the budget goes on top of what the client wants to see.
    let asked = max_tokens;
    let max_tokens = match budget {
        Some(budget) if max_tokens <= budget => max_tokens.saturating_add(budget),
        _ => max_tokens,
    };
    out.insert("max_tokens".into(), json!(max_tokens));
    if let Some(budget) = budget {
        out.insert(
            "thinking".into(),
            json!({"type": "enabled", "budget_tokens": budget}),
        );
    }
    Ok(budget.map(|_| asked))
}

/// `temperature` (OpenAI's 0–2 held to Anthropic's 0–1) and `top_p`, as far as thinking and
/// each other allow (newer models refuse both at once; temperature is kept).
fn write_sampling(
    f: &Fields<'_>,
    thinking: bool,
    out: &mut Map<String, Value>,
) -> Result<(), Invalid> {
    let number = |v: &Option<Value>, field: &str, max: f64| match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|x| (0.0..=max).contains(x))
            .map(Some)
            .ok_or_else(|| {
                Invalid::new(
                    format!("`{field}` must be a number from 0 to {max}"),
                    Some(field),
                )
            }),
    };
    let temperature = number(&f.temperature, "temperature", 2.0)?;
    let top_p = number(&f.top_p, "top_p", 1.0)?;
    if thinking {
        return Ok(());
    }
    if let Some(t) = temperature {
        out.insert("temperature".into(), json!(t.min(1.0)));
    } else if let Some(p) = top_p {
        out.insert("top_p".into(), json!(p));
    }
    Ok(())
}

/// `stop`: a string or strings; whitespace-only ones are dropped (Anthropic refuses them).
fn stop_sequences(stop: Option<&Value>) -> Result<Option<Value>, Invalid> {
    let wrong = || Invalid::new("`stop` must be a string or strings", Some("stop"));
    let list: Vec<&str> = match stop {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().ok_or_else(wrong))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(wrong()),
    };
    let kept: Vec<&str> = list.into_iter().filter(|s| !s.trim().is_empty()).collect();
    Ok((!kept.is_empty()).then(|| json!(kept)))
}

/// `tools` and `tool_choice`. Function tools become Anthropic tools; `custom` (free-form)
/// tools become tools taking one string, `input`; built-in tools (`web_search`,
/// `file_search`, `computer_use_preview`, `local_shell`, …) are dropped: Anthropic's own
/// server tools answer in blocks no Responses client reads back, and bill per use. Returns the
/// names of the custom tools.
fn write_tools(f: &Fields<'_>, out: &mut Map<String, Value>) -> Result<Vec<String>, Invalid> {
    let mut tools: Vec<Value> = Vec::new();
    let mut custom = Vec::new();
    if let Some(raw) = f.tools {
        let walked = each(raw, |i, raw| {
            let at = format!("tools[{i}]");
            let tool: Value = crate::json::from_str(raw.get())
                .map_err(|e| Invalid::new(format!("{at} is not valid: {e}"), Some(&at)))?;
            let kind = tool
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("function");
            if kind != "function" && kind != "custom" {
                return Ok(());
            }
            let name = str_field(&tool, "name", &at)?;
            let mut t = Map::new();
            t.insert("name".into(), json!(name));
            if let Some(d) = tool.get("description").and_then(Value::as_str) {
                t.insert("description".into(), json!(d));
            }
            let schema = if kind == "custom" {
                custom.push(name.to_string());
                json!({"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]})
            } else {
                match tool.get("parameters") {
                    Some(p) if p.is_object() => p.clone(),
                    _ => json!({"type": "object", "properties": {}}),
                }
            };
            t.insert("input_schema".into(), schema);
            tools.push(Value::Object(t));
            Ok(())
        })?;
        if !walked {
            return Err(Invalid::new("`tools` must be an array", Some("tools")));
        }
    }
    let has_tools = !tools.is_empty();
    let parallel = f.parallel_tool_calls.as_ref().and_then(Value::as_bool);
    let mut choice = match &f.tool_choice {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Some(json!({"type": "auto"})),
            "required" => Some(json!({"type": "any"})),
            "none" => Some(json!({"type": "none"})),
            other => {
                return Err(Invalid::new(
                    format!(
                        "unknown tool_choice {other:?}: use auto, required, none or a named tool"
                    ),
                    Some("tool_choice"),
                ));
            }
        },
        // A built-in tool's choice (`{"type":"web_search"}`) names no tool offered: none.
        Some(named) => (named.get("name").and_then(Value::as_str))
            .map(|name| json!({"type": "tool", "name": name})),
    };
    if has_tools {
        out.insert("tools".into(), Value::Array(tools));
        if parallel == Some(false) {
            let c = choice.get_or_insert_with(|| json!({"type": "auto"}));
            if c["type"] != "none" {
                c["disable_parallel_tool_use"] = true.into();
            }
        }
        if let Some(c) = choice {
            out.insert("tool_choice".into(), c);
        }
    }
    Ok(custom)
}
