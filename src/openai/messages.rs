//! OpenAI messages → Anthropic turns, written as they are read: each message's content
//! parts, tool calls and tool results become blocks; consecutive messages of one role merge
//! into one turn (tool results first in a user turn, tool calls last in an assistant turn);
//! system and developer messages are hoisted into the system blocks.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::Invalid;
use super::request::sanitize_id;
use super::views::{
    List, Raw, constant, each, empty_object, is_object, object, parse_object, text,
};

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
pub(super) fn convert_messages(
    messages: &RawValue,
    out: &mut Vec<u8>,
) -> Result<(List, usize), Invalid> {
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
pub(super) struct TextBlock<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_control: Option<&'a RawValue>,
}

impl<'a> TextBlock<'a> {
    pub(super) fn new(text: &'a str, cache_control: Option<&'a RawValue>) -> TextBlock<'a> {
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
