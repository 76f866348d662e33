//! OpenAI Chat Completions request → Anthropic Messages request, written straight into the
//! bytes that go upstream. The body is read through borrowed views (`RawValue`): each message,
//! part and tool is parsed when its turn comes and written out at once, and values copied
//! unchanged (schemas, arguments, `cache_control`) are copied as text. No tree of the request
//! is ever built, so a 32 MiB body of a million tiny messages costs about its converted size
//! more, not fifty times its own. Every rule follows shared/spec/openai-conversion.md §1;
//! where the spec lists options, the choice and its reason are written next to the code.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::Invalid;
use super::messages::{TextBlock, convert_messages};
use super::views::{List, Raw, constant, each, is_object, object, parse, parse_object, text};

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
    /// The Anthropic request body, as JSON text.
    pub body: Vec<u8>,
    pub include_usage: bool,
    /// The model the client asked for, reported back in responses.
    pub requested_model: String,
}

/// Thinking budgets per reasoning effort, for both OpenAI routes (`reasoning_effort` on chat,
/// `reasoning.effort` on responses). LiteLLM's values (low 1024 / medium 2048 / high 4096),
/// with `minimal` at Anthropic's floor of 1024: the smallest budgets that still think, so a
/// client asking for "low" does not pay for a long think; `xhigh` (Codex's highest) doubles
/// `high`.
pub(crate) fn thinking_budget(effort: &str) -> Option<Option<u64>> {
    match effort {
        "none" => Some(None),
        "minimal" | "low" => Some(Some(1024)),
        "medium" => Some(Some(2048)),
        "high" => Some(Some(4096)),
        "xhigh" => Some(Some(8192)),
        _ => None,
    }
}

/// The fields the converter reads; every other one is dropped. Values stay raw text until
/// their rule looks at them.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    model: Raw<'a>,
    #[serde(borrow, default)]
    messages: Raw<'a>,
    #[serde(borrow, default)]
    max_completion_tokens: Raw<'a>,
    #[serde(borrow, default)]
    max_tokens: Raw<'a>,
    #[serde(borrow, default)]
    n: Raw<'a>,
    #[serde(borrow, default)]
    stream: Raw<'a>,
    #[serde(borrow, default)]
    stream_options: Raw<'a>,
    #[serde(borrow, default)]
    response_format: Raw<'a>,
    #[serde(borrow, default)]
    thinking: Raw<'a>,
    #[serde(borrow, default)]
    reasoning_effort: Raw<'a>,
    #[serde(borrow, default)]
    temperature: Raw<'a>,
    #[serde(borrow, default)]
    top_p: Raw<'a>,
    #[serde(borrow, default)]
    top_k: Raw<'a>,
    #[serde(borrow, default)]
    stop: Raw<'a>,
    #[serde(borrow, default)]
    tools: Raw<'a>,
    #[serde(borrow, default)]
    functions: Raw<'a>,
    #[serde(borrow, default)]
    tool_choice: Raw<'a>,
    #[serde(borrow, default)]
    function_call: Raw<'a>,
    #[serde(borrow, default)]
    parallel_tool_calls: Raw<'a>,
    #[serde(borrow, default)]
    user: Raw<'a>,
}

/// Converts one request, field group by field group, each written out as it is read.
pub fn convert(body: &[u8], options: &Options<'_>) -> Result<Converted, Invalid> {
    let f: Fields = read(body)?;
    let requested_model = text(f.model)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| Invalid::new("`model` is required and must be a string", Some("model")))?
        .into_owned();
    let model = (options.aliases.get(&requested_model)).unwrap_or(&requested_model);

    let mut out = Vec::with_capacity(body.len() + body.len() / 2);
    out.extend_from_slice(b"{\"model\":");
    put(&mut out, model);
    let mut system = write_messages(&f, &mut out)?;
    let max_tokens = max_tokens(&f, options)?;
    let (stream, include_usage) = streaming(&f)?;
    if let Some(format) = f.response_format
        && let Some(instruction) = json_instruction(format)?
    {
        system.push(&TextBlock::new(&instruction, None));
    }
    if system.n > 0 {
        out.extend_from_slice(b",\"system\":");
        system.write_array(&mut out);
    }
    // Thinking first: it constrains max_tokens and the sampling fields.
    let thinking = write_thinking(&f, max_tokens, &mut out)?;
    write_sampling(&f, thinking.is_some(), &mut out)?;
    if let Some(stops) = stop_sequences(f.stop)? {
        out.extend_from_slice(b",\"stop_sequences\":");
        stops.write_array(&mut out);
    }
    write_tools(&f, &mut out)?;
    write_user(&f, &mut out);
    out.extend_from_slice(b",\"stream\":");
    put(&mut out, &stream);
    out.push(b'}');
    // Everything else is dropped silently, as Anthropic's own compatibility layer does: seed,
    // logprobs, top_logprobs, logit_bias, presence_penalty, frequency_penalty, metadata,
    // service_tier, store, prediction, modalities, audio, web_search_options and fields newer
    // than this code. Passing unknowns on would make Anthropic answer 400 for them.
    Ok(Converted {
        body: out,
        include_usage,
        requested_model,
    })
}

/// The body, checked whole once (strings and all, so that what is copied as raw text below
/// is valid JSON), then read through borrowed views as `T`.
pub(crate) fn read<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Invalid> {
    if !body.trim_ascii_start().starts_with(b"{") {
        return Err(Invalid::new("the request body must be a JSON object", None));
    }
    let invalid = |e: serde_json::Error| {
        Invalid::new(format!("the request body is not valid JSON: {e}"), None)
    };
    crate::json::from_slice::<crate::json::Valid>(body).map_err(invalid)?;
    crate::json::from_slice(body).map_err(invalid)
}

/// Writes `messages` as Anthropic's turns; returns the system blocks they held.
fn write_messages<'a>(f: &Fields<'a>, out: &mut Vec<u8>) -> Result<List, Invalid> {
    let messages = f
        .messages
        .filter(|m| m.get().starts_with('['))
        .ok_or_else(|| {
            Invalid::new(
                "`messages` is required and must be an array",
                Some("messages"),
            )
        })?;
    out.extend_from_slice(b",\"messages\":[");
    let (system, turns) = convert_messages(messages, out)?;
    out.push(b']');
    if turns == 0 {
        return Err(Invalid::new(
            "`messages` must contain at least one user or assistant message",
            Some("messages"),
        ));
    }
    Ok(system)
}

/// The answer's length: `max_completion_tokens` (the newer field wins), `max_tokens`, or the
/// configured default. `n` must be 1.
fn max_tokens(f: &Fields<'_>, options: &Options<'_>) -> Result<u64, Invalid> {
    if let Some(n) = f.n
        && parse::<u64>(Some(n)) != Some(1)
    {
        return Err(Invalid::new(
            "`n` must be 1: Claude returns exactly one choice",
            Some("n"),
        ));
    }
    match (f.max_completion_tokens, f.max_tokens) {
        (Some(v), _) => positive(v, "max_completion_tokens"),
        (_, Some(v)) => positive(v, "max_tokens"),
        _ => Ok(options.default_max_tokens),
    }
}

/// `stream`, and whether its last chunk carries usage (`stream_options.include_usage`).
fn streaming(f: &Fields<'_>) -> Result<(bool, bool), Invalid> {
    let stream = match f.stream {
        None => false,
        Some(v) => parse::<bool>(Some(v))
            .ok_or_else(|| Invalid::new("`stream` must be a boolean", Some("stream")))?,
    };
    #[derive(Deserialize)]
    struct StreamOptions {
        include_usage: Option<serde_json::Value>,
    }
    let include_usage = stream
        && parse_object::<StreamOptions>(f.stream_options)
            .and_then(|o| o.include_usage)
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
    Ok((stream, include_usage))
}

/// Writes `max_tokens` and `thinking` (the client's, or one `reasoning_effort` names);
/// returns the thinking budget, if thinking is on.
fn write_thinking(
    f: &Fields<'_>,
    max_tokens: u64,
    out: &mut Vec<u8>,
) -> Result<Option<u64>, Invalid> {
    let mut thinking: Option<Cow<'_, RawValue>> = f.thinking.map(Cow::Borrowed);
    if let Some(effort) = f.reasoning_effort {
        let effort = text(Some(effort)).unwrap_or_default();
        match thinking_budget(&effort) {
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
                let raw = format!(r#"{{"type":"enabled","budget_tokens":{budget}}}"#);
                thinking = RawValue::from_string(raw).ok().map(Cow::Owned);
            }
        }
    }
    #[derive(Deserialize)]
    struct Thinking<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<Cow<'a, str>>,
        budget_tokens: Option<serde_json::Value>,
    }
    let budget = thinking
        .as_deref()
        .and_then(|t| parse_object::<Thinking>(Some(t)))
        .filter(|t| t.kind.as_deref() == Some("enabled"))
        .and_then(|t| t.budget_tokens)
        .and_then(|b| b.as_u64());
    // Anthropic requires max_tokens > budget_tokens; the client's max_tokens is what it wants
    // to *see*, so the budget goes on top rather than eating into the answer.
    let max_tokens = match budget {
        // Saturating: both numbers are the client's, and u64::MAX of each must not overflow.
        Some(budget) if max_tokens <= budget => max_tokens.saturating_add(budget),
        _ => max_tokens,
    };
    out.extend_from_slice(b",\"max_tokens\":");
    put(out, &max_tokens);
    if let Some(t) = &thinking {
        out.extend_from_slice(b",\"thinking\":");
        out.extend_from_slice(t.get().as_bytes());
    }
    Ok(budget)
}

/// Writes `temperature`, `top_p` and `top_k`, as far as thinking and each other allow.
fn write_sampling(f: &Fields<'_>, thinking: bool, out: &mut Vec<u8>) -> Result<(), Invalid> {
    let mut has_temperature = false;
    if let Some(t) = f.temperature {
        let t = parse::<f64>(Some(t))
            .filter(|t| (0.0..=2.0).contains(t))
            .ok_or_else(|| {
                Invalid::new(
                    "`temperature` must be a number from 0 to 2",
                    Some("temperature"),
                )
            })?;
        // Thinking allows no temperature change; otherwise OpenAI's 0–2 is capped to
        // Anthropic's 0–1 (as Anthropic's own compatibility layer does).
        if !thinking {
            out.extend_from_slice(b",\"temperature\":");
            put(out, &t.min(1.0));
            has_temperature = true;
        }
    }
    if let Some(p) = f.top_p {
        let p = parse::<f64>(Some(p))
            .filter(|p| (0.0..=1.0).contains(p))
            .ok_or_else(|| Invalid::new("`top_p` must be a number from 0 to 1", Some("top_p")))?;
        // Newer models reject temperature and top_p together; temperature is the one clients
        // set deliberately far more often, so top_p goes when both are present.
        if !has_temperature && !thinking {
            out.extend_from_slice(b",\"top_p\":");
            put(out, &p);
        }
    }
    if let Some(k) = f.top_k
        && !thinking
    {
        out.extend_from_slice(b",\"top_k\":");
        out.extend_from_slice(k.get().as_bytes());
    }
    Ok(())
}

/// Writes `tools` (and legacy `functions`) and the tool choice.
fn write_tools(f: &Fields<'_>, out: &mut Vec<u8>) -> Result<(), Invalid> {
    let tools = convert_tools(f.tools, f.functions)?;
    let has_tools = tools.n > 0;
    if has_tools {
        out.extend_from_slice(b",\"tools\":");
        tools.write_array(out);
    }
    drop(tools);
    if let Some(choice) = tool_choice(f, has_tools)? {
        out.extend_from_slice(b",\"tool_choice\":");
        put(out, &choice);
    }
    Ok(())
}

/// Writes `user` as `metadata.user_id`, when it is an opaque id (`opaque_user`).
fn write_user(f: &Fields<'_>, out: &mut Vec<u8>) {
    if let Some(user) = text(f.user)
        && let Some(user) = opaque_user(&user)
    {
        out.extend_from_slice(b",\"metadata\":{\"user_id\":");
        put(out, &user);
        out.push(b'}');
    }
}

/// An OpenAI `user` as Anthropic's `metadata.user_id`, when it is an opaque id: an email or
/// phone number is personal data Anthropic asks not to get.
pub(crate) fn opaque_user(user: &str) -> Option<&str> {
    let personal = user.contains('@') || user.chars().filter(char::is_ascii_digit).count() >= 7;
    (!user.is_empty() && !personal).then_some(user)
}

/// Writes `value` as JSON (our own strings and numbers: it cannot fail).
fn put(out: &mut Vec<u8>, value: &(impl Serialize + ?Sized)) {
    let _ = serde_json::to_writer(out, value);
}

fn positive(v: &RawValue, field: &str) -> Result<u64, Invalid> {
    parse::<u64>(Some(v))
        .filter(|n| *n > 0)
        .ok_or_else(|| Invalid::new(format!("`{field}` must be a positive integer"), Some(field)))
}

/// `stop` → `stop_sequences`: a string is wrapped; whitespace-only stops are dropped because
/// Anthropic rejects them; nothing left means no field.
fn stop_sequences(stop: Raw<'_>) -> Result<Option<List>, Invalid> {
    let Some(stop) = stop else {
        return Ok(None);
    };
    let wrong = || Invalid::new("`stop` must be a string or strings", Some("stop"));
    let mut kept = List::default();
    let mut keep = |s: &str| {
        if !s.trim().is_empty() {
            kept.push(&s);
        }
    };
    if let Some(s) = text(Some(stop)) {
        keep(&s);
    } else if !each(stop, |_, item| {
        keep(&text(Some(item)).ok_or_else(wrong)?);
        Ok(())
    })? {
        return Err(wrong());
    }
    Ok((kept.n > 0).then_some(kept))
}

/// `response_format` → an instruction in `system`. Of the spec's three options this one works
/// on every model and keeps the answer in `message.content` where the client looks: a forced
/// tool (LiteLLM) changes the response shape, and native structured output exists only on some
/// models.
fn json_instruction(format: &RawValue) -> Result<Option<String>, Invalid> {
    #[derive(Deserialize)]
    struct Format<'a> {
        #[serde(rename = "type", borrow, default)]
        kind: Raw<'a>,
        #[serde(borrow, default)]
        json_schema: Option<Schema<'a>>,
    }
    #[derive(Deserialize)]
    struct Schema<'a> {
        #[serde(borrow, default)]
        schema: Raw<'a>,
    }
    // Anything but an object with a known `type` string says nothing, as before: ignored.
    let Some(format) = parse_object::<Format>(Some(format)) else {
        return Ok(None);
    };
    match text(format.kind).as_deref().unwrap_or("") {
        "text" | "" => Ok(None),
        "json_object" => Ok(Some(
            "Respond with a single valid JSON object and nothing else.".into(),
        )),
        "json_schema" => {
            let schema = (format.json_schema).and_then(|s| s.schema).ok_or_else(|| {
                Invalid::new(
                    "response_format json_schema needs json_schema.schema",
                    Some("response_format"),
                )
            })?;
            Ok(Some(format!(
                "Respond with a single valid JSON value that conforms to this JSON Schema, and nothing else:\n{}",
                crate::json::compact(schema.get())
            )))
        }
        other => Err(Invalid::new(
            format!("unsupported response_format type {other:?}"),
            Some("response_format"),
        )),
    }
}

/// An Anthropic tool definition.
#[derive(Serialize)]
struct ToolDefinition<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    input_schema: &'a RawValue,
}

#[derive(Deserialize)]
struct Function<'a> {
    #[serde(borrow, default)]
    name: Raw<'a>,
    #[serde(borrow, default)]
    description: Raw<'a>,
    #[serde(borrow, default)]
    parameters: Raw<'a>,
}

fn convert_tools(tools: Raw<'_>, functions: Raw<'_>) -> Result<List, Invalid> {
    #[derive(Deserialize)]
    struct Tool<'a> {
        #[serde(rename = "type", borrow, default)]
        kind: Raw<'a>,
        #[serde(borrow, default)]
        function: Raw<'a>,
    }
    let mut out = List::default();
    if let Some(list) = tools {
        let walked = each(list, |i, tool| {
            let tool: Tool = object(tool, "a tool", &format!("tools[{i}]"))?;
            let kind = text(tool.kind);
            let kind = kind.as_deref().unwrap_or("function");
            if kind != "function" {
                return Err(Invalid::new(
                    format!("unsupported tool type {kind:?}: only function tools are supported"),
                    Some(&format!("tools[{i}].type")),
                ));
            }
            let function = tool.function.ok_or_else(|| {
                Invalid::new(
                    "a tool needs `function`",
                    Some(&format!("tools[{i}].function")),
                )
            })?;
            tool_definition(function, &format!("tools[{i}].function"), &mut out)
        })?;
        if !walked {
            return Err(Invalid::new("`tools` must be an array", Some("tools")));
        }
    }
    // The deprecated `functions` field means the same.
    if let Some(list) = functions {
        each(list, |i, function| {
            tool_definition(function, &format!("functions[{i}]"), &mut out)
        })?;
    }
    Ok(out)
}

fn tool_definition(function: &RawValue, param: &str, out: &mut List) -> Result<(), Invalid> {
    let f: Function = object(function, "a function", param)?;
    let name = text(f.name).filter(|n| valid_tool_name(n)).ok_or_else(|| {
        Invalid::new(
            "a function name must be 1 to 128 letters, digits, _ or -",
            Some(&format!("{param}.name")),
        )
    })?;
    let description = text(f.description);
    let schema = match f.parameters {
        None => constant(r#"{"type":"object","properties":{}}"#),
        Some(p) if is_object(p) => Cow::Borrowed(p),
        Some(_) => {
            return Err(Invalid::new(
                "`parameters` must be a JSON Schema object",
                Some(&format!("{param}.parameters")),
            ));
        }
    };
    out.push(&ToolDefinition {
        name: &name,
        description: description.as_deref(),
        input_schema: &schema,
    });
    Ok(())
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

/// An Anthropic `tool_choice`.
#[derive(Serialize)]
struct ToolChoice {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disable_parallel_tool_use: Option<bool>,
}

fn tool_choice(f: &Fields<'_>, has_tools: bool) -> Result<Option<ToolChoice>, Invalid> {
    let parallel_off = parse::<bool>(f.parallel_tool_calls) == Some(false);
    let choice = f.tool_choice.or(f.function_call);
    // Sent only with tools: Anthropic rejects a tool_choice without them.
    if !has_tools {
        return Ok(None);
    }
    let choose = |kind| ToolChoice {
        kind,
        name: None,
        disable_parallel_tool_use: None,
    };
    let mut mapped = match choice {
        None => {
            if !parallel_off {
                return Ok(None);
            }
            choose("auto")
        }
        Some(raw) if raw.get().starts_with('"') => match text(Some(raw)).as_deref() {
            Some("auto") => choose("auto"),
            Some("required") => choose("any"),
            Some("none") => choose("none"),
            other => {
                return Err(Invalid::new(
                    format!("unknown tool_choice {:?}", other.unwrap_or_default()),
                    Some("tool_choice"),
                ));
            }
        },
        Some(raw) if is_object(raw) => {
            #[derive(Deserialize)]
            struct Named<'a> {
                #[serde(borrow, default)]
                function: Option<Function<'a>>,
                #[serde(borrow, default)]
                name: Raw<'a>,
            }
            let named: Option<Named> = parse_object(Some(raw));
            let name = named
                .and_then(|n| text(n.function.and_then(|f| f.name)).or_else(|| text(n.name)))
                .ok_or_else(|| {
                    Invalid::new("tool_choice needs function.name", Some("tool_choice"))
                })?;
            ToolChoice {
                kind: "tool",
                name: Some(name.into_owned()),
                disable_parallel_tool_use: None,
            }
        }
        Some(_) => {
            return Err(Invalid::new(
                "tool_choice must be a string or an object",
                Some("tool_choice"),
            ));
        }
    };
    if parallel_off && mapped.kind != "none" {
        mapped.disable_parallel_tool_use = Some(true);
    }
    Ok(Some(mapped))
}
