//! The Anthropic Messages format, as far as the gateway edits it: prepending a system text
//! block, merging `anthropic-beta` values, and recognising a ban in an error answer. Pure
//! functions: bytes and strings in, values out.

use std::borrow::Cow;
use std::ops::Range;

use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// An edit of a body: the bytes in `at` replaced by `with`. Sent as the three pieces it names,
/// so the body itself is never copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Splice {
    pub at: Range<usize>,
    pub with: Vec<u8>,
}

impl Splice {
    /// The length of `body` with this edit made.
    pub fn len(&self, body: &[u8]) -> usize {
        body.len() - self.at.len() + self.with.len()
    }

    /// `body` with this edit made, in pieces: before, replacement, after.
    pub fn pieces<'a>(&'a self, body: &'a [u8]) -> [&'a [u8]; 3] {
        [&body[..self.at.start], &self.with, &body[self.at.end..]]
    }

    /// `body` with this edit made, as one buffer.
    pub fn apply(&self, body: &[u8]) -> Vec<u8> {
        self.pieces(body).concat()
    }
}

#[derive(Serialize)]
struct TextBlock<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

/// The request's top-level `system`, as raw text of the body (`None` when absent), and how
/// many keys the object has (an insertion needs a comma unless it has none).
struct Top<'a> {
    system: Option<&'a RawValue>,
    keys: usize,
}

impl<'de> Deserialize<'de> for Top<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Top<'de>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Top<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top<'de>, A::Error> {
                let mut top = Top {
                    system: None,
                    keys: 0,
                };
                while let Some(key) = map.next_key::<Key>()? {
                    top.keys += 1;
                    if key.0 == "system" {
                        // The upstream would read one of two: which one is ours to fill is
                        // not a guess to make.
                        if top.system.is_some() {
                            return Err(de::Error::custom("`system` is given twice"));
                        }
                        top.system = Some(map.next_value()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(top)
            }
        }
        d.deserialize_map(V)
    }
}

/// A key, borrowed when it has no escapes (`"sys\u0074em"` is `system` too).
#[derive(Deserialize)]
struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

/// The first block of a `system` array: whether it is a text block with this text.
fn first_block_is(blocks: &RawValue, text: &str) -> Result<bool, serde_json::Error> {
    #[derive(Deserialize)]
    struct Block<'a> {
        #[serde(rename = "type", borrow, default)]
        kind: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        text: Option<Cow<'a, str>>,
    }
    struct First<'t>(&'t str);
    impl<'de> Visitor<'de> for First<'_> {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array of content blocks")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
            let first = seq.next_element::<&'de RawValue>()?;
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            let block = first.and_then(|raw| crate::json::from_str::<Block>(raw.get()).ok());
            Ok(block.is_some_and(|b| {
                b.kind.as_deref() == Some("text") && b.text.as_deref() == Some(self.0)
            }))
        }
    }
    crate::json::seq(blocks.get(), First(text))
}

/// Puts `text` first in the request's `system`, as a text block, without touching the rest:
/// a string `system` becomes blocks with the client's text following unchanged, an array keeps
/// every block (and its `cache_control`) after ours, and nothing is added when the first block
/// already is `text`. No `cache_control` of our own (Anthropic allows four breakpoints).
///
/// The body is read once and never rebuilt: the answer is the one edit to make (`None` when
/// none is needed), so a body of any size costs only the bytes of our block.
pub fn system_splice(body: &[u8], text: &str) -> Result<Option<Splice>, String> {
    let not_object =
        |e: &dyn std::fmt::Display| format!("the request body is not a JSON object: {e}");
    let whole = std::str::from_utf8(body).map_err(|e| not_object(&e))?;
    let top: Top = crate::json::from_str(whole).map_err(|e| not_object(&e))?;
    let offset = |raw: &RawValue| raw.get().as_ptr() as usize - whole.as_ptr() as usize;
    let mut ours = Vec::new();
    // Our own string in our own struct: serializing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut ours, &TextBlock { kind: "text", text });
    let replace = |raw: &RawValue, with: Vec<u8>| {
        let start = offset(raw);
        Splice {
            at: start..start + raw.get().len(),
            with,
        }
    };
    let only_ours = || [b"[", &ours[..], b"]"].concat();
    let splice = match top.system {
        None => {
            // Before the object's closing brace: the last byte that is not whitespace.
            let end = whole.trim_end().len().saturating_sub(1);
            let comma: &[u8] = if top.keys > 0 { b"," } else { b"" };
            Splice {
                at: end..end,
                with: [comma, b"\"system\":", &only_ours()].concat(),
            }
        }
        Some(raw) if raw.get() == "null" => replace(raw, only_ours()),
        Some(raw) if raw.get().starts_with('"') => {
            let client: Cow<'_, str> = crate::json::from_str::<Key>(raw.get())
                .map_err(|e| e.to_string())?
                .0;
            if client.is_empty() || client == text {
                replace(raw, only_ours())
            } else {
                // The client's string goes on as written, into a block after ours.
                let with = [
                    b"[",
                    &ours[..],
                    b",{\"type\":\"text\",\"text\":",
                    raw.get().as_bytes(),
                    b"}]",
                ]
                .concat();
                replace(raw, with)
            }
        }
        Some(raw) if raw.get().starts_with('[') => {
            if first_block_is(raw, text).map_err(|e| e.to_string())? {
                return Ok(None);
            }
            let empty = raw.get()[1..].trim_start().starts_with(']');
            let at = offset(raw) + 1;
            let comma: &[u8] = if empty { b"" } else { b"," };
            Splice {
                at: at..at,
                with: [&ours[..], comma].concat(),
            }
        }
        Some(_) => return Err("system must be a string or an array of content blocks".into()),
    };
    Ok(Some(splice))
}

/// `system_splice` made: the whole edited body (tests and the fuzzer).
pub fn prepend_system_text(body: &[u8], text: &str) -> Result<Vec<u8>, String> {
    Ok(match system_splice(body, text)? {
        Some(splice) => splice.apply(body),
        None => body.to_vec(),
    })
}

/// Merges comma-separated `anthropic-beta` values and `add`, in order, without duplicates.
pub fn merge_beta<'a>(values: impl IntoIterator<Item = &'a str>, add: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for v in values
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .chain(std::iter::once(add))
    {
        if !v.is_empty() && !out.contains(&v) {
            out.push(v);
        }
    }
    out.join(",")
}

/// The status Anthropic answers with for an `error.type` (for an error that came inside a
/// stream, after its 200): what the ledger and metrics count it as.
pub fn status_of_error_type(kind: &str) -> u16 {
    match kind {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "billing_error" => 402,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "timeout_error" => 504,
        "overloaded_error" => 529,
        _ => 500,
    }
}

/// A ban the upstream announced for an account: the sentence (the account's disabled reason),
/// and the `error.type` it came with, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    pub reason: &'static str,
    pub error_type: Option<String>,
}

/// The ban sentences: the status each comes with, and whether it concerns OAuth accounts only.
const BANS: [(u16, &str, bool); 2] = [
    (
        403,
        "OAuth authentication is currently not allowed for this organization.",
        true,
    ),
    (400, "This organization has been disabled.", false),
];

/// The ban an error answer announces, decided only on what the request cannot put there: the
/// status, and the whole `error.message` (trimmed) equal to a ban sentence. Anthropic's 400s
/// quote the request back (an unknown beta header, a bad tag), so a sentence merely contained
/// in the message, or anywhere else in the body, is the client's words and never a ban.
pub fn ban(status: u16, body: &[u8], oauth: bool) -> Option<Ban> {
    let (message, kind) = error_of(body)?;
    let message = message.trim();
    BANS.iter()
        .find(|(s, sentence, oauth_only)| {
            *s == status && *sentence == message && (oauth || !oauth_only)
        })
        .map(|(_, sentence, _)| Ban {
            reason: sentence,
            error_type: kind,
        })
}

/// Whether a 400 is the upstream refusing a thinking block's signature (`messages.N.content.M:
/// Invalid `signature` in `thinking` block`, with or without the backticks): what a
/// conversation moved from the account that signed its thinking gets. The block's path comes
/// first, so no text of the request quoted later in a message can pass for it.
pub fn invalid_signature(status: u16, body: &[u8]) -> bool {
    let Some(message) = (status == 400).then(|| error_message(body)).flatten() else {
        return false;
    };
    let Some((path, rest)) = message.split_once(": ") else {
        return false;
    };
    let path_ok = path.starts_with("messages.")
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_');
    let rest = rest.replace('`', "");
    path_ok
        && (rest.starts_with("Invalid signature in thinking block")
            || rest.starts_with("Invalid signature in redacted_thinking block"))
}

/// The request with the thinking blocks of its assistant turns removed (their signatures are
/// another account's), for one retry; `None` when it has none. When the final assistant
/// turn is a tool call in progress, the API requires it to start with a thinking block while
/// thinking is on: thinking is then turned off for this request. An assistant turn left with
/// nothing is dropped (consecutive user turns are merged by the API).
pub fn without_thinking(body: &[u8]) -> Option<Vec<u8>> {
    use serde_json::Value;
    let is_thinking =
        |b: &Value| matches!(b["type"].as_str(), Some("thinking" | "redacted_thinking"));
    let mut request: Value = crate::json::from_slice(body).ok()?;
    let messages = request.get_mut("messages")?.as_array_mut()?;
    let last = messages.iter().rposition(|m| m["role"] == "assistant");
    let (mut stripped, mut last_lost) = (false, false);
    for (i, m) in messages.iter_mut().enumerate() {
        let Some(content) = (m["role"] == "assistant")
            .then(|| m.get_mut("content").and_then(Value::as_array_mut))
            .flatten()
        else {
            continue;
        };
        let before = content.len();
        content.retain(|b| !is_thinking(b));
        if content.len() != before {
            stripped = true;
            let in_tool_call = content.iter().any(|b| b["type"] == "tool_use");
            last_lost |= Some(i) == last && in_tool_call;
        }
    }
    if !stripped {
        return None;
    }
    messages.retain(|m| {
        !(m["role"] == "assistant" && m["content"].as_array().is_some_and(Vec::is_empty))
    });
    if last_lost && let Some(fields) = request.as_object_mut() {
        fields.remove("thinking");
    }
    serde_json::to_vec(&request).ok()
}

/// A refusal that means the account's plan is used up, not that the request is wrong: the
/// account's limit, never the client's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanLimit {
    /// 429 "Extra usage is required for long context requests": requests as long as this one
    /// need extra usage the account lacks; shorter ones still pass.
    LongContext,
    /// 400 "You're out of extra usage…": the plan and its extra usage are spent.
    OutOfExtraUsage,
    /// 429 naming a spend cap or limit: the month's extra usage is capped.
    SpendCap,
    /// 429 naming one model family's weekly limit: that family rests, others go on.
    FamilyWeekly(crate::quota::Family),
}

/// An error answer's `error.message` and `error.type`.
fn error_of(body: &[u8]) -> Option<(String, Option<String>)> {
    #[derive(serde::Deserialize)]
    struct Answer {
        error: Error,
    }
    #[derive(serde::Deserialize)]
    struct Error {
        message: String,
        #[serde(rename = "type", default)]
        kind: Option<String>,
    }
    let answer: Answer = crate::json::from_slice(body).ok()?;
    Some((answer.error.message, answer.error.kind))
}

/// The upstream's own words in an error answer: `error.message`, trimmed.
fn error_message(body: &[u8]) -> Option<String> {
    error_of(body).map(|(message, _)| message.trim().to_string())
}

/// Recognises a plan-limit refusal of a request for `family`. Only where the sentence is
/// the upstream's own: at the start of the message of a 400 (whose text can otherwise quote
/// the request), anywhere in a 429's (a rate limiter echoes nothing of the request).
pub fn plan_limit(status: u16, body: &[u8], family: crate::quota::Family) -> Option<PlanLimit> {
    let message = error_message(body)?;
    let lower = message.to_ascii_lowercase();
    match status {
        400 if message.starts_with("You're out of extra usage") => Some(PlanLimit::OutOfExtraUsage),
        429 if lower.starts_with("extra usage is required for long context") => {
            Some(PlanLimit::LongContext)
        }
        429 if lower.contains("spend") && (lower.contains("cap") || lower.contains("limit")) => {
            Some(PlanLimit::SpendCap)
        }
        429 if family != crate::quota::Family::Other
            && lower.contains("weekly")
            && lower.contains(family.as_str()) =>
        {
            Some(PlanLimit::FamilyWeekly(family))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const P: &str = "你是 Claude Code，Anthropic的官方CLI工具";

    fn system_of(body: &[u8]) -> Value {
        let v: Value = serde_json::from_slice(body).expect("json");
        v["system"].clone()
    }

    #[test]
    fn injects_into_absent_string_and_array_systems() {
        let none = prepend_system_text(br#"{"model":"m","messages":[]}"#, P).expect("ok");
        assert_eq!(
            system_of(&none),
            serde_json::json!([{"type":"text","text":P}])
        );

        let s = prepend_system_text(br#"{"system":"Be brief.","model":"m"}"#, P).expect("ok");
        assert_eq!(
            system_of(&s),
            serde_json::json!([{"type":"text","text":P},{"type":"text","text":"Be brief."}])
        );

        let blocks =
            br#"{"system":[{"type":"text","text":"A","cache_control":{"type":"ephemeral"}}]}"#;
        let a = prepend_system_text(blocks, P).expect("ok");
        assert_eq!(
            system_of(&a),
            serde_json::json!([{"type":"text","text":P},{"type":"text","text":"A","cache_control":{"type":"ephemeral"}}])
        );
    }

    #[test]
    fn never_injects_twice_and_keeps_other_fields_in_order() {
        let once = prepend_system_text(br#"{"model":"m","system":"x"}"#, P).expect("ok");
        let twice = prepend_system_text(&once, P).expect("ok");
        assert_eq!(system_of(&once), system_of(&twice));
        let same = prepend_system_text(format!(r#"{{"system":"{P}"}}"#).as_bytes(), P).expect("ok");
        assert_eq!(
            system_of(&same),
            serde_json::json!([{"type":"text","text":P}])
        );
        let text = String::from_utf8(once).expect("utf8");
        assert!(text.starts_with(r#"{"model":"m","#), "{text}");
        assert!(!text.contains("cache_control"));
    }

    #[test]
    fn edits_are_made_in_the_raw_bytes_whatever_their_spacing() {
        let cases: [(&str, Value); 7] = [
            ("{}", serde_json::json!([{"type":"text","text":P}])),
            (" { } \n", serde_json::json!([{"type":"text","text":P}])),
            (
                r#"{"system":null}"#,
                serde_json::json!([{"type":"text","text":P}]),
            ),
            (
                r#"{"system": [ ] }"#,
                serde_json::json!([{"type":"text","text":P}]),
            ),
            (
                r#"{"system":""}"#,
                serde_json::json!([{"type":"text","text":P}]),
            ),
            (
                r#"{"sys\u0074em":"x\ny"}"#,
                serde_json::json!([{"type":"text","text":P},{"type":"text","text":"x\ny"}]),
            ),
            (
                r#"{ "model" : "m" ,"system" : [ {"type":"image"} ] }"#,
                serde_json::json!([{"type":"text","text":P},{"type":"image"}]),
            ),
        ];
        for (body, system) in cases {
            let edited = prepend_system_text(body.as_bytes(), P).expect(body);
            assert_eq!(system_of(&edited), system, "{body}");
        }
        let blocks = format!(r#"{{"system":[{{"type":"text","text":"{P}"}}],"model":"m"}}"#);
        assert_eq!(
            system_splice(blocks.as_bytes(), P),
            Ok(None),
            "already first"
        );
        let splice = system_splice(br#"{"system":"S","messages":[]}"#, P)
            .expect("ok")
            .expect("an edit");
        assert_eq!(splice.at, 10..13, "only the string is replaced");
    }

    #[test]
    fn rejects_bodies_it_cannot_edit() {
        assert!(prepend_system_text(br#"{"system":"a","system":"b"}"#, P).is_err());
        assert!(prepend_system_text(b"[1]", P).is_err());
        assert!(prepend_system_text(br#"{"system":5}"#, P).is_err());
    }

    #[test]
    fn betas_merge_without_duplicates() {
        assert_eq!(merge_beta([], "oauth-2025-04-20"), "oauth-2025-04-20");
        assert_eq!(
            merge_beta(["a, b", "b,oauth-2025-04-20"], "oauth-2025-04-20"),
            "a,b,oauth-2025-04-20"
        );
    }

    #[test]
    fn bans_are_the_whole_message_with_its_status() {
        let body = br#"{"type":"error","error":{"type":"permission_error","message":"OAuth authentication is currently not allowed for this organization."}}"#;
        let ban403 = ban(403, body, true).expect("a ban");
        assert_eq!(ban403.error_type.as_deref(), Some("permission_error"));
        assert!(ban(401, body, true).is_none(), "wrong status");
        assert!(ban(403, body, false).is_none(), "OAuth-only sentence");
        let disabled = br#"{"error":{"message":"  This organization has been disabled.\n"}}"#;
        assert!(
            ban(400, disabled, false).is_some(),
            "trimmed, type optional"
        );
        assert!(ban(400, br#"{"error":{"message":"max_tokens too big"}}"#, false).is_none());
        // Quoted back from the request: contained, not equal.
        let quoted = br#"{"type":"error","error":{"type":"invalid_request_error","message":"Unexpected value(s) `This organization has been disabled.` for the `anthropic-beta` header."}}"#;
        assert!(ban(400, quoted, true).is_none());
        let elsewhere =
            br#"{"error":{"message":"bad"},"note":"This organization has been disabled."}"#;
        assert!(ban(400, elsewhere, true).is_none());
        assert!(ban(400, b"This organization has been disabled.", true).is_none());
    }

    #[test]
    fn plan_limits_are_the_upstreams_own_sentences() {
        use crate::quota::Family;
        let body =
            |m: &str| format!(r#"{{"type":"error","error":{{"type":"x","message":"{m}"}}}}"#);
        let extra =
            body("You're out of extra usage. Add more at claude.ai/settings/usage and keep going.");
        assert_eq!(
            plan_limit(400, extra.as_bytes(), Family::Opus),
            Some(PlanLimit::OutOfExtraUsage)
        );
        let quoted = body("messages.0.content: unexpected `You're out of extra usage`");
        assert_eq!(plan_limit(400, quoted.as_bytes(), Family::Opus), None);
        let long = body("Extra usage is required for long context requests.");
        assert_eq!(
            plan_limit(429, long.as_bytes(), Family::Sonnet),
            Some(PlanLimit::LongContext)
        );
        assert_eq!(plan_limit(400, long.as_bytes(), Family::Sonnet), None);
        let cap = body("You have reached your monthly spend limit.");
        assert_eq!(
            plan_limit(429, cap.as_bytes(), Family::Other),
            Some(PlanLimit::SpendCap)
        );
        let weekly = body("You've reached your Opus weekly limit.");
        assert_eq!(
            plan_limit(429, weekly.as_bytes(), Family::Opus),
            Some(PlanLimit::FamilyWeekly(Family::Opus))
        );
        assert_eq!(plan_limit(429, weekly.as_bytes(), Family::Sonnet), None);
        assert_eq!(
            plan_limit(429, body("Rate limited").as_bytes(), Family::Opus),
            None
        );
    }

    #[test]
    fn a_refused_signature_is_recognised_by_its_path() {
        let body = |m: &str| {
            format!(
                r#"{{"type":"error","error":{{"type":"invalid_request_error","message":"{m}"}}}}"#
            )
        };
        for m in [
            "messages.1.content.0: Invalid `signature` in `thinking` block",
            "messages.3.content.13: Invalid signature in thinking block",
        ] {
            assert!(invalid_signature(400, body(m).as_bytes()), "{m}");
        }
        assert!(!invalid_signature(
            429,
            body("messages.1.content.0: Invalid signature in thinking block").as_bytes()
        ));
        let quoted = body("system.0.text: unexpected Invalid signature in thinking block: x");
        assert!(!invalid_signature(400, quoted.as_bytes()));
    }

    #[test]
    fn thinking_is_stripped_and_turned_off_only_when_a_tool_call_needs_it() {
        let history = br#"{"model":"m","thinking":{"type":"enabled","budget_tokens":1024},"messages":[
            {"role":"user","content":"q"},
            {"role":"assistant","content":[{"type":"thinking","thinking":"t","signature":"s"},{"type":"text","text":"a"}]},
            {"role":"user","content":"next"}]}"#;
        let out: serde_json::Value =
            serde_json::from_slice(&without_thinking(history).expect("stripped")).expect("json");
        assert_eq!(
            out["messages"][1]["content"],
            serde_json::json!([{"type":"text","text":"a"}])
        );
        assert_eq!(
            out["thinking"]["type"], "enabled",
            "a new user turn needs no block"
        );
        let tool_loop = br#"{"model":"m","thinking":{"type":"enabled","budget_tokens":1024},"messages":[
            {"role":"user","content":"q"},
            {"role":"assistant","content":[{"type":"redacted_thinking","data":"x"},{"type":"tool_use","id":"t1","name":"f","input":{}}]},
            {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"ok"}]}]}"#;
        let out: serde_json::Value =
            serde_json::from_slice(&without_thinking(tool_loop).expect("stripped")).expect("json");
        assert!(out.get("thinking").is_none(), "{out}");
        assert_eq!(out["messages"][1]["content"][0]["type"], "tool_use");
        assert_eq!(
            without_thinking(br#"{"messages":[{"role":"user","content":"q"}]}"#),
            None
        );
    }
}
