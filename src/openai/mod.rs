//! The OpenAI Chat Completions format: requests converted to Anthropic Messages, responses and
//! streams converted back, and the detection of which format a body is in. Pure functions, no
//! I/O; tested table-style from fixtures in tests/data/openai/.

mod messages;
pub mod request;
pub mod response;
pub mod responses;
pub mod stream;
mod views;

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::IgnoredAny;

/// A request the converter refuses: OpenAI's 400, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub message: String,
    pub param: Option<String>,
}

impl Invalid {
    pub fn new(message: impl Into<String>, param: Option<&str>) -> Invalid {
        Invalid {
            message: message.into(),
            param: param.map(String::from),
        }
    }
}

/// The API a request body is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Anthropic,
    OpenAI,
}

/// What the body says about its format, if anything clear (spec §4): OpenAI-only fields and
/// roles mean OpenAI; a top-level `system`, `anthropic_version`, or Anthropic-only content
/// blocks mean Anthropic. `max_tokens` and string content say nothing. Reads the body through
/// a probe that skips every value it does not look at, so it costs little on the hot path.
///
/// A body that is not one JSON object, or that names a field with a type neither API accepts
/// (`messages` that is not an array, a non-string `role`), is an error: the caller's 400.
pub fn detect(body: &[u8]) -> Result<Option<Format>, serde_json::Error> {
    let ObjectProbe(probe) = crate::json::from_slice(body)?;
    Ok(detect_probe(probe))
}

fn detect_probe(probe: Probe<'_>) -> Option<Format> {
    if probe.system.is_some() || probe.anthropic_version.is_some() {
        return Some(Format::Anthropic);
    }
    let openai_fields = [
        &probe.stream_options,
        &probe.response_format,
        &probe.logprobs,
        &probe.top_logprobs,
        &probe.n,
        &probe.presence_penalty,
        &probe.frequency_penalty,
        &probe.logit_bias,
        &probe.max_completion_tokens,
        &probe.reasoning_effort,
        &probe.parallel_tool_calls,
        &probe.functions,
    ];
    if openai_fields.iter().any(|f| f.is_some()) {
        return Some(Format::OpenAI);
    }
    probe.messages.and_then(|m| m.0)
}

/// What one message says: its role and tool fields first, then its parts in order.
fn message_signal(m: MessageProbe<'_>) -> Option<Format> {
    if matches!(
        m.role.as_deref(),
        Some("system" | "developer" | "tool" | "function")
    ) || m.tool_calls.is_some()
        || m.tool_call_id.is_some()
    {
        return Some(Format::OpenAI);
    }
    m.content.0
}

/// What one content part says.
fn part_signal(part: &PartProbe<'_>) -> Option<Format> {
    match part.kind.as_deref() {
        Some("image_url" | "input_audio" | "file") => Some(Format::OpenAI),
        Some("tool_use" | "tool_result" | "thinking" | "document") => Some(Format::Anthropic),
        Some("image") if part.source.is_some() => Some(Format::Anthropic),
        _ => None,
    }
}

type Skip = Option<IgnoredAny>;

/// A `Probe` read from a JSON object only (a derived struct would also accept an array).
struct ObjectProbe<'a>(Probe<'a>);

impl<'de: 'a, 'a> Deserialize<'de> for ObjectProbe<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ObjectProbe<'a>, D::Error> {
        struct Visitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visitor<'a> {
            type Value = ObjectProbe<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ObjectProbe<'a>, A::Error> {
                Probe::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(ObjectProbe)
            }
        }
        d.deserialize_map(Visitor(std::marker::PhantomData))
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Probe<'a> {
    system: Skip,
    anthropic_version: Skip,
    stream_options: Skip,
    response_format: Skip,
    logprobs: Skip,
    top_logprobs: Skip,
    n: Skip,
    presence_penalty: Skip,
    frequency_penalty: Skip,
    logit_bias: Skip,
    max_completion_tokens: Skip,
    reasoning_effort: Skip,
    parallel_tool_calls: Skip,
    functions: Skip,
    messages: Option<Messages>,
    #[serde(skip)]
    _borrowed: std::marker::PhantomData<&'a ()>,
}

/// The first clear signal of the messages, in order, folded as they are read: a million
/// messages cost one at a time, not a list of them.
#[derive(Default)]
struct Messages(Option<Format>);

impl<'de> Deserialize<'de> for Messages {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Messages, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Messages;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array of messages")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Messages, A::Error> {
                let mut found = None;
                while let Some(m) = seq.next_element::<MessageProbe<'de>>()? {
                    found = found.or_else(|| message_signal(m));
                }
                Ok(Messages(found))
            }
        }
        d.deserialize_seq(Visitor)
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MessageProbe<'a> {
    #[serde(borrow)]
    role: Option<Cow<'a, str>>,
    tool_calls: Skip,
    tool_call_id: Skip,
    content: Parts,
}

/// What the parts of a message's content say, folded as they are read: nothing for string
/// content.
#[derive(Default)]
struct Parts(Option<Format>);

#[derive(Deserialize, Default)]
#[serde(default)]
struct PartProbe<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    source: Skip,
}

impl<'de> Deserialize<'de> for Parts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Parts, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Parts;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("message content")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Parts, A::Error> {
                let mut found = None;
                while let Some(part) = seq.next_element::<PartOrOther<'de>>()? {
                    if let PartOrOther::Part(p) = part {
                        found = found.or_else(|| part_signal(&p));
                    }
                }
                Ok(Parts(found))
            }
            fn visit_str<E>(self, _: &str) -> Result<Parts, E> {
                Ok(Parts::default())
            }
            fn visit_unit<E>(self) -> Result<Parts, E> {
                Ok(Parts::default())
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Parts, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Parts::default())
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A content part, or anything else in its place (skipped).
enum PartOrOther<'a> {
    Part(PartProbe<'a>),
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for PartOrOther<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<PartOrOther<'a>, D::Error> {
        struct Visitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visitor<'a> {
            type Value = PartOrOther<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a content part")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<PartOrOther<'a>, A::Error> {
                PartProbe::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(PartOrOther::Part)
            }
            fn visit_str<E>(self, _: &str) -> Result<PartOrOther<'a>, E> {
                Ok(PartOrOther::Other)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<PartOrOther<'a>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(PartOrOther::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<PartOrOther<'a>, E> {
                Ok(PartOrOther::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<PartOrOther<'a>, E> {
                Ok(PartOrOther::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<PartOrOther<'a>, E> {
                Ok(PartOrOther::Other)
            }
            fn visit_bool<E>(self, _: bool) -> Result<PartOrOther<'a>, E> {
                Ok(PartOrOther::Other)
            }
            fn visit_unit<E>(self) -> Result<PartOrOther<'a>, E> {
                Ok(PartOrOther::Other)
            }
        }
        d.deserialize_any(Visitor(std::marker::PhantomData))
    }
}

/// What an event stream is converted into for an OpenAI client.
pub enum Converter {
    Chat(stream::ChunkStream),
    Responses(responses::stream::ResponseStream),
}

impl Converter {
    pub fn event(&mut self, event: &[u8]) -> Vec<u8> {
        match self {
            Converter::Chat(c) => c.event(event),
            Converter::Responses(r) => r.event(event),
        }
    }

    pub fn closed(&self) -> bool {
        match self {
            Converter::Chat(c) => c.closed(),
            Converter::Responses(r) => r.closed(),
        }
    }

    pub fn end(&mut self, broke: Option<&str>) -> Vec<u8> {
        match self {
            Converter::Chat(c) => c.end(broke),
            Converter::Responses(r) => r.end(broke),
        }
    }

    /// Whether the conversion gave up on an answer too large to keep: the rest is not read.
    pub fn gave_up(&self) -> bool {
        matches!(self, Converter::Responses(r) if r.gave_up())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! Table tests from the fixtures in tests/data/openai/: one file per case of the spec.

    use std::collections::HashMap;
    use std::path::PathBuf;

    use serde_json::{Value, json};

    use super::request::{Options, convert};
    use super::response::completion;
    use super::stream::ChunkStream;
    use super::{Format, detect};
    use crate::sse::Framer;

    fn fixtures(kind: &str) -> Vec<(String, Value)> {
        fixtures_in(&format!("tests/data/openai/{kind}"))
    }

    /// The JSON fixtures in `dir` (from the crate's root), by file name, in order.
    pub(crate) fn fixtures_in(dir: &str) -> Vec<(String, Value)> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .expect("fixture dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no fixtures in {}", dir.display());
        files
            .into_iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p).expect("read fixture");
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (name, serde_json::from_str(&text).expect("fixture is JSON"))
            })
            .collect()
    }

    #[test]
    fn request_fixtures() {
        let aliases = HashMap::from([("gpt-4o".to_string(), "claude-sonnet-4-5".to_string())]);
        let options = Options {
            default_max_tokens: 8192,
            aliases: &aliases,
        };
        for (name, case) in fixtures("request") {
            let result = convert(case["input"].to_string().as_bytes(), &options);
            match case.get("error_param").and_then(Value::as_str) {
                Some(param) => {
                    let err = result.expect_err(&name);
                    assert_eq!(err.param.as_deref(), Some(param), "{name}: {}", err.message);
                }
                None => {
                    let converted = result.unwrap_or_else(|e| panic!("{name}: {e:?}"));
                    let body: Value = serde_json::from_slice(&converted.body).expect("JSON");
                    assert_eq!(body, case["expected"], "{name}");
                    if let Some(u) = case.get("include_usage") {
                        assert_eq!(Some(converted.include_usage), u.as_bool(), "{name}");
                    }
                    if let Some(m) = case.get("requested_model").and_then(Value::as_str) {
                        assert_eq!(converted.requested_model, m, "{name}");
                    }
                }
            }
        }
    }

    #[test]
    fn huge_max_tokens_with_a_huge_thinking_budget_saturates() {
        // Regression (fuzz): max_tokens + budget_tokens, both the client's, overflowed.
        let aliases = HashMap::new();
        let options = Options {
            default_max_tokens: 8192,
            aliases: &aliases,
        };
        let body = json!({
            "model": "m",
            "messages": [{"role": "user", "content": "q"}],
            "max_tokens": u64::MAX - 1,
            "thinking": {"type": "enabled", "budget_tokens": u64::MAX},
        });
        let converted = convert(body.to_string().as_bytes(), &options).expect("converts");
        let body: Value = serde_json::from_slice(&converted.body).expect("JSON");
        assert_eq!(body["max_tokens"], u64::MAX);
    }

    #[test]
    fn arguments_nested_past_the_limit_are_a_400_not_a_stack_overflow() {
        // Regression (fuzz): tool-call arguments are JSON inside a string, parsed again.
        let aliases = HashMap::new();
        let options = Options {
            default_max_tokens: 8192,
            aliases: &aliases,
        };
        let deep = "{\"a\":".repeat(10_000);
        let body = json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                    "function": {"name": "f", "arguments": deep}}]},
            ],
        });
        let err = convert(body.to_string().as_bytes(), &options).expect_err("too deep");
        assert_eq!(
            err.param.as_deref(),
            Some("messages[1].tool_calls[0].function.arguments")
        );
    }

    #[test]
    fn response_fixtures() {
        for (name, case) in fixtures("response") {
            let model = case["model"].as_str().expect("model");
            let made = completion(case["input"].to_string().as_bytes(), model, 1_700_000_000)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let body: Value = serde_json::from_slice(&made.body).expect("JSON");
            assert_eq!(body, case["expected"], "{name}");
        }
    }

    /// The `data:` payloads of a converted stream, parsed (`[DONE]` as a string).
    fn payloads(out: &[u8]) -> Vec<Value> {
        let text = String::from_utf8(out.to_vec()).expect("utf8");
        assert!(!text.contains("event:"), "no named events: {text}");
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let data = e.strip_prefix("data: ").expect("data line");
                if data == "[DONE]" {
                    json!("[DONE]")
                } else {
                    serde_json::from_str(data).expect("chunk JSON")
                }
            })
            .collect()
    }

    /// Reduces a chunk to what a fixture states: delta and finish_reason, or usage, or error.
    fn essence(chunk: &Value, expected: &Value) -> Value {
        if chunk.is_string() || chunk.get("error").is_some() {
            return chunk.clone();
        }
        assert_eq!(chunk["object"], "chat.completion.chunk");
        let mut out = serde_json::Map::new();
        match chunk["choices"].as_array().and_then(|c| c.first()) {
            Some(choice) => {
                out.insert("delta".into(), choice["delta"].clone());
                if !choice["finish_reason"].is_null() {
                    out.insert("finish_reason".into(), choice["finish_reason"].clone());
                }
            }
            None => assert_eq!(chunk["choices"], json!([])),
        }
        if expected.get("usage").is_some() {
            out.insert("usage".into(), chunk["usage"].clone());
        }
        Value::Object(out)
    }

    fn run_stream(case: &Value, split_every: Option<usize>) -> Vec<u8> {
        let include_usage = case["include_usage"].as_bool().unwrap_or(false);
        let mut stream = ChunkStream::new("client-model", include_usage, 1);
        let bytes: Vec<u8> = case["events"]
            .as_array()
            .expect("events")
            .iter()
            .flat_map(|e| e.as_str().expect("event text").bytes())
            .collect();
        let mut framer = Framer::default();
        let mut out = Vec::new();
        let step = split_every.unwrap_or(bytes.len());
        for piece in bytes.chunks(step) {
            framer
                .push::<()>(piece, |events| {
                    for event in crate::sse::split_events(events) {
                        out.extend(stream.event(event));
                    }
                    Ok(())
                })
                .expect("no error");
        }
        out.extend(stream.end(None));
        out
    }

    #[test]
    fn stream_fixtures() {
        for (name, case) in fixtures("stream") {
            let out = run_stream(&case, None);
            let got = payloads(&out);
            let expected = case["expected"].as_array().expect("expected");
            assert_eq!(got.len(), expected.len(), "{name}: {got:#?}");
            for (g, e) in got.iter().zip(expected) {
                assert_eq!(essence(g, e), *e, "{name}");
            }
            // Reads split at every byte give exactly the same output.
            assert_eq!(run_stream(&case, Some(1)), out, "{name}: byte by byte");
        }
    }

    #[test]
    fn multibyte_text_split_anywhere_comes_out_exact() {
        let text = "héllo 你好 🌍";
        let case = json!({"events": [
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_u\",\"usage\":{\"input_tokens\":1}}}\n\n",
            format!("event: content_block_delta\ndata: {}\n\n", json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":text}})),
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        ]});
        for split in [1, 2, 3, 5, 7] {
            let got = payloads(&run_stream(&case, Some(split)));
            assert_eq!(
                got[1]["choices"][0]["delta"]["content"], text,
                "split {split}"
            );
        }
    }

    #[test]
    fn truncated_streams_end_with_an_error_not_a_finish() {
        let mut stream = ChunkStream::new("m", false, 1);
        stream.event(b"data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_t\"}}");
        let end = payloads(&stream.end(Some("connection reset")));
        assert_eq!(end.len(), 1);
        assert!(
            end[0]["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("connection reset")
        );
        assert!(stream.closed());
        assert!(stream.end(None).is_empty(), "only one ending");
    }

    #[test]
    fn detection_follows_the_clear_signals() {
        let openai = [
            json!({"model":"m","messages":[{"role":"system","content":"s"}]}),
            json!({"model":"m","messages":[{"role":"user","content":"q"}],"stream_options":{"include_usage":true}}),
            json!({"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":"https://x"}]}]}),
            json!({"model":"m","messages":[{"role":"tool","tool_call_id":"a","content":"r"}]}),
        ];
        for body in openai {
            assert_eq!(
                detect(body.to_string().as_bytes()).ok().flatten(),
                Some(Format::OpenAI),
                "{body}"
            );
        }
        let anthropic = [
            json!({"model":"m","system":"s","messages":[]}),
            json!({"model":"m","messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"a","content":"r"}]}]}),
            json!({"model":"m","messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64"}}]}]}),
        ];
        for body in anthropic {
            assert_eq!(
                detect(body.to_string().as_bytes()).ok().flatten(),
                Some(Format::Anthropic),
                "{body}"
            );
        }
        let neutral = json!({"model":"m","max_tokens":5,"messages":[{"role":"user","content":"q"},{"role":"assistant","content":[{"type":"text","text":"a"}]}]});
        assert_eq!(detect(neutral.to_string().as_bytes()).ok().flatten(), None);
        assert_eq!(detect(b"[1,2]").ok().flatten(), None);
        assert!(detect(b"[1,2]").is_err(), "only an object is a request");
        assert_eq!(
            detect(br#"{"messages":[{"role":"user","content":[1,"x",{"type":"image_url"}]}]}"#)
                .ok()
                .flatten(),
            Some(Format::OpenAI)
        );
    }
}
