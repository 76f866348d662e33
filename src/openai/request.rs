//! OpenAI Chat Completions request → Anthropic Messages request, written straight into the
//! bytes that go upstream. The body is read through borrowed views (`RawValue`): each message,
//! part and tool is parsed when its turn comes and written out at once, and values copied
//! unchanged (schemas, arguments, `cache_control`) are copied as text. No tree of the request
//! is ever built, so a 32 MiB body of a million tiny messages costs about its converted size
//! more, not fifty times its own. Every rule follows shared/spec/openai-conversion.md §1;
//! where the spec lists options, the choice and its reason are written next to the code.

use std::borrow::Cow;

use serde::de::{self, Deserializer as _, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

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
    /// The Anthropic request body, as JSON text.
    pub body: Vec<u8>,
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

type Raw<'a> = Option<&'a RawValue>;

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

/// A JSON string, borrowed from the body when it has no escapes.
#[derive(Deserialize)]
struct Str<'a>(#[serde(borrow)] Cow<'a, str>);

/// `raw` as a string, if it is one.
fn text(raw: Raw<'_>) -> Option<Cow<'_, str>> {
    serde_json::from_str::<Str>(raw?.get()).ok().map(|s| s.0)
}

fn parse<'a, T: Deserialize<'a>>(raw: Raw<'a>) -> Option<T> {
    serde_json::from_str(raw?.get()).ok()
}

/// `raw` read as the struct `T` when it is an object, else `None` (a derived struct would also
/// take an array, field by position).
fn parse_object<'a, T: Deserialize<'a>>(raw: Raw<'a>) -> Option<T> {
    parse(raw.filter(|r| is_object(r)))
}

/// `raw` read as the struct `T`, or a 400 naming `param`: `what` must be an object.
fn object<'a, T: Deserialize<'a>>(
    raw: &'a RawValue,
    what: &str,
    param: &str,
) -> Result<T, Invalid> {
    if !is_object(raw) {
        return Err(Invalid::new(
            format!("{what} must be an object"),
            Some(param),
        ));
    }
    serde_json::from_str(raw.get())
        .map_err(|e| Invalid::new(format!("{what} is not valid: {e}"), Some(param)))
}

fn is_object(raw: &RawValue) -> bool {
    raw.get().starts_with('{')
}

/// Calls `f` with each element of the JSON array `raw`, in order, as raw text: the array is
/// walked, never collected. `Ok(false)` when `raw` is not an array.
fn each<'a>(
    raw: &'a RawValue,
    mut f: impl FnMut(usize, &'a RawValue) -> Result<(), Invalid>,
) -> Result<bool, Invalid> {
    struct Walk<'f, F> {
        f: &'f mut F,
        failed: &'f mut Option<Invalid>,
    }
    impl<'de, F: FnMut(usize, &'de RawValue) -> Result<(), Invalid>> Visitor<'de> for Walk<'_, F> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut i = 0;
            while let Some(item) = seq.next_element::<&'de RawValue>()? {
                if let Err(e) = (self.f)(i, item) {
                    *self.failed = Some(e);
                    return Err(de::Error::custom("stopped"));
                }
                i += 1;
            }
            Ok(())
        }
    }
    if !raw.get().starts_with('[') {
        return Ok(false);
    }
    let mut failed = None;
    let walked = serde_json::Deserializer::from_str(raw.get()).deserialize_seq(Walk {
        f: &mut f,
        failed: &mut failed,
    });
    match (failed, walked) {
        (Some(invalid), _) => Err(invalid),
        // The body parsed once already: an element cannot fail to parse as raw text.
        (None, walked) => Ok(walked.is_ok()),
    }
}

/// JSON values written one after another, comma-separated.
#[derive(Default)]
struct List {
    bytes: Vec<u8>,
    n: usize,
}

impl List {
    /// Appends `value`, serialized.
    fn push(&mut self, value: &impl Serialize) {
        if self.n > 0 {
            self.bytes.push(b',');
        }
        self.n += 1;
        // Writing our own structs of strings and raw values into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.bytes, value);
    }

    /// Appends every value of `other`.
    fn append(&mut self, other: &mut List) {
        if other.n == 0 {
            return;
        }
        if self.n > 0 {
            self.bytes.push(b',');
        }
        self.n += other.n;
        self.bytes.append(&mut other.bytes);
        other.n = 0;
    }

    fn write_array(&self, out: &mut Vec<u8>) {
        out.push(b'[');
        out.extend_from_slice(&self.bytes);
        out.push(b']');
    }
}

pub fn convert(body: &[u8], options: &Options<'_>) -> Result<Converted, Invalid> {
    if !body.trim_ascii_start().starts_with(b"{") {
        return Err(Invalid::new("the request body must be a JSON object", None));
    }
    // Checked whole once, strings and all, so that what is copied as raw text below is valid
    // JSON; then read through borrowed views.
    let invalid = |e: serde_json::Error| {
        Invalid::new(format!("the request body is not valid JSON: {e}"), None)
    };
    crate::json::from_slice::<crate::json::Valid>(body).map_err(invalid)?;
    let f: Fields = serde_json::from_slice(body).map_err(invalid)?;
    let requested_model = text(f.model)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| Invalid::new("`model` is required and must be a string", Some("model")))?
        .into_owned();
    let model = (options.aliases.get(&requested_model)).unwrap_or(&requested_model);

    let mut out = Vec::with_capacity(body.len() + body.len() / 2);
    out.extend_from_slice(b"{\"model\":");
    put(&mut out, model);

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
    let (mut system, turns) = convert_messages(messages, &mut out)?;
    out.push(b']');
    if turns == 0 {
        return Err(Invalid::new(
            "`messages` must contain at least one user or assistant message",
            Some("messages"),
        ));
    }

    // max_completion_tokens is the newer field: it wins when both are given.
    let max_tokens = match (f.max_completion_tokens, f.max_tokens) {
        (Some(v), _) => positive(v, "max_completion_tokens")?,
        (_, Some(v)) => positive(v, "max_tokens")?,
        _ => options.default_max_tokens,
    };

    if let Some(n) = f.n
        && parse::<u64>(Some(n)) != Some(1)
    {
        return Err(Invalid::new(
            "`n` must be 1: Claude returns exactly one choice",
            Some("n"),
        ));
    }

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
    let thinking_budget = thinking
        .as_deref()
        .and_then(|t| parse_object::<Thinking>(Some(t)))
        .filter(|t| t.kind.as_deref() == Some("enabled"))
        .and_then(|t| t.budget_tokens)
        .and_then(|b| b.as_u64());
    // Anthropic requires max_tokens > budget_tokens; the client's max_tokens is what it wants
    // to *see*, so the budget goes on top rather than eating into the answer.
    let max_tokens = match thinking_budget {
        // Saturating: both numbers are the client's, and u64::MAX of each must not overflow.
        Some(budget) if max_tokens <= budget => max_tokens.saturating_add(budget),
        _ => max_tokens,
    };
    out.extend_from_slice(b",\"max_tokens\":");
    put(&mut out, &max_tokens);
    if let Some(t) = &thinking {
        out.extend_from_slice(b",\"thinking\":");
        out.extend_from_slice(t.get().as_bytes());
    }

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
        if thinking_budget.is_none() {
            out.extend_from_slice(b",\"temperature\":");
            put(&mut out, &t.min(1.0));
            has_temperature = true;
        }
    }
    if let Some(p) = f.top_p {
        let p = parse::<f64>(Some(p))
            .filter(|p| (0.0..=1.0).contains(p))
            .ok_or_else(|| Invalid::new("`top_p` must be a number from 0 to 1", Some("top_p")))?;
        // Newer models reject temperature and top_p together; temperature is the one clients
        // set deliberately far more often, so top_p goes when both are present.
        if !has_temperature && thinking_budget.is_none() {
            out.extend_from_slice(b",\"top_p\":");
            put(&mut out, &p);
        }
    }
    if let Some(k) = f.top_k
        && thinking_budget.is_none()
    {
        out.extend_from_slice(b",\"top_k\":");
        out.extend_from_slice(k.get().as_bytes());
    }

    if let Some(stops) = stop_sequences(f.stop)? {
        out.extend_from_slice(b",\"stop_sequences\":");
        stops.write_array(&mut out);
    }

    let tools = convert_tools(f.tools, f.functions)?;
    let has_tools = tools.n > 0;
    if has_tools {
        out.extend_from_slice(b",\"tools\":");
        tools.write_array(&mut out);
    }
    drop(tools);
    if let Some(choice) = tool_choice(&f, has_tools)? {
        out.extend_from_slice(b",\"tool_choice\":");
        put(&mut out, &choice);
    }

    if let Some(user) = text(f.user) {
        // Only opaque ids: an email or phone number is personal data Anthropic asks not to get.
        let personal = user.contains('@') || user.chars().filter(char::is_ascii_digit).count() >= 7;
        if !user.is_empty() && !personal {
            out.extend_from_slice(b",\"metadata\":{\"user_id\":");
            put(&mut out, &user);
            out.push(b'}');
        }
    }
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

/// One OpenAI message, its fields raw.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    role: Raw<'a>,
    #[serde(borrow, default)]
    content: Raw<'a>,
    #[serde(borrow, default)]
    tool_calls: Raw<'a>,
    #[serde(borrow, default)]
    function_call: Raw<'a>,
    #[serde(borrow, default)]
    tool_call_id: Raw<'a>,
}

/// The blocks of one message: those that go first in their turn (a user turn's tool results,
/// an assistant turn's text) and those that go last (the rest, and an assistant's tool calls).
#[derive(Default)]
struct Blocks {
    first: List,
    last: List,
}

/// The turn being built: consecutive messages of one role merge into it.
struct Turn {
    role: &'static str,
    blocks: Blocks,
}

/// Writes the turns of `messages` into `out` as they are converted, merging consecutive turns
/// of one role (tool results first in their user turn, tool calls last in their assistant
/// turn); system and developer messages are hoisted. Returns the system blocks and how many
/// turns were written.
fn convert_messages(messages: &RawValue, out: &mut Vec<u8>) -> Result<(List, usize), Invalid> {
    let mut system = List::default();
    let mut turns = 0usize;
    let mut open: Option<Turn> = None;
    let mut legacy_call_id: Option<String> = None;
    let mut close = |turn: Turn, out: &mut Vec<u8>| {
        if turns > 0 {
            out.push(b',');
        }
        turns += 1;
        out.extend_from_slice(b"{\"role\":\"");
        out.extend_from_slice(turn.role.as_bytes());
        out.extend_from_slice(b"\",\"content\":[");
        let Blocks {
            mut first,
            mut last,
        } = turn.blocks;
        first.append(&mut last);
        out.extend_from_slice(&first.bytes);
        out.extend_from_slice(b"]}");
    };
    each(messages, |i, m| {
        let at = |field: &str| format!("messages[{i}].{field}");
        let m: Message = object(m, "a message", &format!("messages[{i}]"))?;
        let role = text(m.role)
            .ok_or_else(|| Invalid::new("a message needs a role", Some(&at("role"))))?;
        let mut blocks = Blocks::default();
        let role = match &*role {
            "system" | "developer" => {
                text_blocks(m.content, &at("content"), &mut system)?;
                return Ok(());
            }
            "user" => {
                user_blocks(m.content, &at("content"), &mut blocks.last)?;
                "user"
            }
            "assistant" => {
                text_blocks(m.content, &at("content"), &mut blocks.first)?;
                if let Some(calls) = m.tool_calls {
                    let walked = each(calls, |j, call| {
                        tool_use(
                            call,
                            None,
                            &at(&format!("tool_calls[{j}]")),
                            &mut blocks.last,
                        )
                    })?;
                    if !walked {
                        return Err(Invalid::new(
                            "tool_calls must be an array",
                            Some(&at("tool_calls")),
                        ));
                    }
                }
                if let Some(call) = m.function_call {
                    let id = format!("call_function_{i}");
                    tool_use(call, Some(&id), &at("function_call"), &mut blocks.last)?;
                    legacy_call_id = Some(id);
                }
                "assistant"
            }
            "tool" | "function" => {
                let id = if &*role == "tool" {
                    text(m.tool_call_id)
                        .filter(|s| !s.is_empty())
                        .ok_or_else(|| {
                            Invalid::new(
                                "a tool message needs tool_call_id",
                                Some(&at("tool_call_id")),
                            )
                        })?
                        .into_owned()
                } else {
                    legacy_call_id.clone().ok_or_else(|| {
                        Invalid::new(
                            "a function message must follow an assistant function_call",
                            Some(&at("role")),
                        )
                    })?
                };
                tool_result(&id, m.content, &at("content"), &mut blocks.first)?;
                "user"
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
        if blocks.first.n + blocks.last.n == 0 {
            // An empty turn carries nothing, and Anthropic rejects empty content.
            return Ok(());
        }
        match &mut open {
            Some(turn) if turn.role == role => {
                turn.blocks.first.append(&mut blocks.first);
                turn.blocks.last.append(&mut blocks.last);
            }
            _ => {
                if let Some(done) = open.replace(Turn { role, blocks }) {
                    close(done, out);
                }
            }
        }
        Ok(())
    })?;
    if let Some(done) = open {
        close(done, out);
    }
    Ok((system, turns))
}

/// An Anthropic text block.
#[derive(Serialize)]
struct TextBlock<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_control: Option<&'a RawValue>,
}

impl<'a> TextBlock<'a> {
    fn new(text: &'a str, cache_control: Option<&'a RawValue>) -> TextBlock<'a> {
        TextBlock {
            kind: "text",
            text,
            cache_control,
        }
    }
}

/// One content part, its fields raw.
#[derive(Deserialize)]
struct Part<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Raw<'a>,
    #[serde(borrow, default)]
    text: Raw<'a>,
    #[serde(borrow, default)]
    cache_control: Raw<'a>,
    #[serde(borrow, default)]
    image_url: Raw<'a>,
    #[serde(borrow, default)]
    file: Raw<'a>,
}

fn part<'a>(raw: &'a RawValue, param: &str) -> Result<Part<'a>, Invalid> {
    object(raw, "a content part", param)
}

/// Text blocks from string or array content; empty and whitespace-only text is skipped.
fn text_blocks(content: Raw<'_>, param: &str, out: &mut List) -> Result<(), Invalid> {
    let Some(content) = content else {
        return Ok(());
    };
    if let Some(s) = text(Some(content)) {
        text_block(&s, None, out);
        return Ok(());
    }
    let walked = each(content, |k, raw| {
        let p = part(raw, &format!("{param}[{k}]"))?;
        text_part(&p, &format!("{param}[{k}]"), out)
    })?;
    if walked {
        Ok(())
    } else {
        Err(Invalid::new(
            "content must be a string or an array of parts",
            Some(param),
        ))
    }
}

/// A part where only text may be: text is kept, a refusal dropped, anything else refused.
fn text_part(p: &Part<'_>, at: &str, out: &mut List) -> Result<(), Invalid> {
    match text(p.kind).as_deref() {
        Some("text") => {
            let text = text(p.text).ok_or_else(|| {
                Invalid::new("a text part needs text", Some(&format!("{at}.text")))
            })?;
            text_block(&text, p.cache_control, out);
            Ok(())
        }
        Some("refusal") => Ok(()),
        _ => Err(Invalid::new(
            "only text parts are allowed here",
            Some(&format!("{at}.type")),
        )),
    }
}

fn text_block(text: &str, cache_control: Raw<'_>, out: &mut List) {
    if !text.trim().is_empty() {
        out.push(&TextBlock::new(text, cache_control));
    }
}

fn user_blocks(content: Raw<'_>, param: &str, out: &mut List) -> Result<(), Invalid> {
    let Some(parts) = content.filter(|c| c.get().starts_with('[')) else {
        return text_blocks(content, param, out);
    };
    each(parts, |k, raw| {
        let at = format!("{param}[{k}]");
        let p = part(raw, &at)?;
        match text(p.kind).as_deref() {
            Some("text") => text_part(&p, &at, out),
            Some("image_url") => {
                #[derive(Deserialize)]
                struct Url<'a> {
                    #[serde(borrow, default)]
                    url: Raw<'a>,
                }
                let url = text(p.image_url)
                    .or_else(|| text(parse_object::<Url>(p.image_url).and_then(|u| u.url)))
                    .unwrap_or_default();
                media_block(&url, "image", &format!("{at}.image_url"), out)
            }
            Some("file") => {
                #[derive(Deserialize)]
                struct File<'a> {
                    #[serde(borrow, default)]
                    file_id: Raw<'a>,
                    #[serde(borrow, default)]
                    file_data: Raw<'a>,
                }
                let file: Option<File> = parse_object(p.file);
                let (id, data) = file.map_or((None, None), |f| (f.file_id, f.file_data));
                if id.is_some() && data.is_none() {
                    return Err(Invalid::new(
                        "file_id has no Anthropic equivalent: send file_data as a data URL",
                        Some(&format!("{at}.file.file_id")),
                    ));
                }
                let data = text(data).unwrap_or_default();
                media_block(&data, "document", &format!("{at}.file.file_data"), out)
            }
            // Anthropic takes no audio; dropped as Anthropic's own compatibility layer does.
            Some("input_audio") => Ok(()),
            _ => Err(Invalid::new(
                "unsupported content part type",
                Some(&format!("{at}.type")),
            )),
        }
    })?;
    Ok(())
}

/// An Anthropic image or document block.
#[derive(Serialize)]
struct MediaBlock<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    source: Source<'a>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Source<'a> {
    Base64 { media_type: &'a str, data: &'a str },
    Url { url: &'a str },
}

/// A data URL → base64 source (a PDF becomes a document); an https URL → url source.
fn media_block(url: &str, default_kind: &str, param: &str, out: &mut List) -> Result<(), Invalid> {
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
        if data.is_empty() || !crate::encoding::is_base64(data) {
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
        out.push(&MediaBlock {
            kind,
            source: Source::Base64 { media_type, data },
        });
        return Ok(());
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        // Anthropic fetches http(s) URLs itself; the gateway downloads nothing.
        out.push(&MediaBlock {
            kind: default_kind,
            source: Source::Url { url },
        });
        return Ok(());
    }
    Err(Invalid::new(
        "expected a data: URL or an http(s) URL",
        Some(param),
    ))
}

/// An Anthropic tool_use block.
#[derive(Serialize)]
struct ToolUse<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    name: &'a str,
    input: &'a RawValue,
}

/// A tool call → a tool_use block; `id` overrides the call's own (legacy `function_call`s
/// have none).
fn tool_use(call: &RawValue, id: Option<&str>, param: &str, out: &mut List) -> Result<(), Invalid> {
    #[derive(Deserialize)]
    struct Call<'a> {
        #[serde(borrow, default)]
        id: Raw<'a>,
        #[serde(borrow, default)]
        function: Raw<'a>,
        #[serde(borrow, default)]
        name: Raw<'a>,
        #[serde(borrow, default)]
        arguments: Raw<'a>,
    }
    #[derive(Deserialize)]
    struct CallFunction<'a> {
        #[serde(borrow, default)]
        name: Raw<'a>,
        #[serde(borrow, default)]
        arguments: Raw<'a>,
    }
    let call: Call = object(call, "a tool call", param)?;
    // A legacy `function_call` is the function itself; a tool call holds one.
    let function = match (id, call.function) {
        (Some(_), _) => CallFunction {
            name: call.name,
            arguments: call.arguments,
        },
        (None, Some(f)) => object(f, "a tool call's function", &format!("{param}.function"))?,
        (None, None) => {
            return Err(Invalid::new(
                "a tool call needs function",
                Some(&format!("{param}.function")),
            ));
        }
    };
    let name = text(function.name)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            Invalid::new(
                "a tool call needs function.name",
                Some(&format!("{param}.function.name")),
            )
        })?;
    let own_id = text(call.id);
    let id = match id {
        Some(id) => Cow::Borrowed(id),
        None => own_id
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Invalid::new("a tool call needs an id", Some(&format!("{param}.id"))))?,
    };
    // Empty arguments mean no arguments; anything else must be a JSON object. A bad value is
    // a 400 naming it, never a silently dropped or emptied call. The object goes on as the
    // client wrote it.
    let bad = || {
        Invalid::new(
            "function.arguments must be a JSON object encoded as a string",
            Some(&format!("{param}.function.arguments")),
        )
    };
    let encoded = text(function.arguments);
    let input: Cow<'_, RawValue> = match (function.arguments, encoded) {
        (None, _) => empty_object(),
        (Some(_), Some(s)) if s.trim().is_empty() => empty_object(),
        (Some(_), Some(s)) => {
            let s = s.trim();
            if !s.starts_with('{') || crate::json::from_str::<crate::json::Valid>(s).is_err() {
                return Err(bad());
            }
            RawValue::from_string(s.to_string())
                .map(Cow::Owned)
                .map_err(|_| bad())?
        }
        (Some(v), None) if is_object(v) => Cow::Borrowed(v),
        (Some(_), None) => return Err(bad()),
    };
    out.push(&ToolUse {
        kind: "tool_use",
        id: &sanitize_id(&id),
        name: &name,
        input: &input,
    });
    Ok(())
}

fn empty_object() -> Cow<'static, RawValue> {
    constant("{}")
}

/// A JSON constant of ours as a raw value.
fn constant(json: &'static str) -> Cow<'static, RawValue> {
    Cow::Owned(RawValue::from_string(json.into()).expect("a JSON constant"))
}

/// An Anthropic tool_result block.
#[derive(Serialize)]
struct ToolResult<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    tool_use_id: &'a str,
    content: &'a RawValue,
}

/// A tool message → a tool_result block: its content a string, or text and image parts.
fn tool_result(id: &str, content: Raw<'_>, param: &str, out: &mut List) -> Result<(), Invalid> {
    let converted = match content {
        None => constant("\"\""),
        Some(c) if c.get().starts_with('"') => Cow::Borrowed(c),
        Some(c) if c.get().starts_with('[') => {
            let mut blocks = List::default();
            user_blocks(Some(c), param, &mut blocks)?;
            let mut bytes = Vec::with_capacity(blocks.bytes.len() + 2);
            blocks.write_array(&mut bytes);
            // Our own output of valid blocks: valid JSON.
            let text = String::from_utf8(bytes).unwrap_or_default();
            Cow::Owned(RawValue::from_string(text).map_err(|_| {
                Invalid::new("content must be a string or an array of parts", Some(param))
            })?)
        }
        Some(_) => {
            return Err(Invalid::new(
                "content must be a string or an array of parts",
                Some(param),
            ));
        }
    };
    out.push(&ToolResult {
        kind: "tool_result",
        tool_use_id: &sanitize_id(id),
        content: &converted,
    });
    Ok(())
}
