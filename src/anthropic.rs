//! The Anthropic Messages format, as far as the gateway edits it: prepending a system text
//! block, merging `anthropic-beta` values, and recognising a ban in an error answer. Pure
//! functions: bytes and strings in, values out.

use serde_json::{Map, Value};

/// Puts `text` first in the request's `system`, as a text block, without touching the rest:
/// a string `system` becomes blocks with the client's text following unchanged, an array keeps
/// every block (and its `cache_control`) after ours, and nothing is added when the first block
/// already is `text`. No `cache_control` of our own (Anthropic allows four breakpoints).
pub fn prepend_system_text(body: &[u8], text: &str) -> Result<Vec<u8>, String> {
    let mut request: Map<String, Value> = crate::json::from_slice(body)
        .map_err(|e| format!("the request body is not a JSON object: {e}"))?;
    let ours = || serde_json::json!({"type": "text", "text": text});
    let system = match request.get_mut("system").map(Value::take) {
        None | Some(Value::Null) => vec![ours()],
        Some(Value::String(s)) if s == text => vec![ours()],
        Some(Value::String(s)) if s.is_empty() => vec![ours()],
        Some(Value::String(s)) => vec![ours(), serde_json::json!({"type": "text", "text": s})],
        Some(Value::Array(blocks)) => {
            let first_is_ours = blocks.first().is_some_and(|b| {
                b.get("type").and_then(Value::as_str) == Some("text")
                    && b.get("text").and_then(Value::as_str) == Some(text)
            });
            if first_is_ours {
                blocks
            } else {
                std::iter::once(ours()).chain(blocks).collect()
            }
        }
        Some(_) => return Err("system must be a string or an array of content blocks".into()),
    };
    // In place when the client sent one (key order kept), else at the end.
    request.insert("system".into(), Value::Array(system));
    serde_json::to_vec(&request).map_err(|e| e.to_string())
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
    let message = answer.error.message.trim();
    BANS.iter()
        .find(|(s, sentence, oauth_only)| {
            *s == status && *sentence == message && (oauth || !oauth_only)
        })
        .map(|(_, sentence, _)| Ban {
            reason: sentence,
            error_type: answer.error.kind,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn rejects_bodies_it_cannot_edit() {
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
}
