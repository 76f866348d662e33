//! OpenAI Responses request → Anthropic Messages request. The top-level fields are read
//! through borrowed views; `input` is walked one item at a time (never collected), each item
//! parsed alone and turned into blocks of the turn it belongs to, consecutive turns of one
//! role merged. Rules from shared/spec/openai-responses.md; where it leaves a choice, the
//! choice and its reason are written beside the code.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::input::{Turns, read_input, str_field};
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
