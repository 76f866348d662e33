//! JSON from clients and the upstream, parsed under a nesting limit that fits the workers'
//! small stacks. serde_json builds values recursively and stops only at 128 levels, which a
//! debug build cannot reach on a `WORKER_STACK` stack (about 3.5 KiB a level): a client's
//! deeply nested body would overflow it and abort the whole process. A flat scan refuses
//! such input first, as an ordinary parse error.

use serde::Deserialize;

/// The deepest nesting of arrays and objects parsed into values. Real requests nest a dozen
/// levels at most (a tool's JSON Schema is the deepest part); 48 levels need under 192 KiB of
/// stack in a debug build, and far less in a release one.
pub const MAX_DEPTH: usize = 48;

/// `serde_json::from_slice`, refusing input nested deeper than `MAX_DEPTH`.
pub fn from_slice<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> serde_json::Result<T> {
    if nested_deeper_than(bytes, MAX_DEPTH) {
        return Err(serde::de::Error::custom(format!(
            "JSON nested deeper than {MAX_DEPTH} levels"
        )));
    }
    serde_json::from_slice(bytes)
}

/// `serde_json::from_str`, refusing input nested deeper than `MAX_DEPTH`.
pub fn from_str<'a, T: Deserialize<'a>>(text: &'a str) -> serde_json::Result<T> {
    from_slice(text.as_bytes())
}

/// Whether `bytes` opens more than `limit` arrays or objects at once, outside strings.
/// Needs no valid JSON: whatever it passes, the parser still checks.
pub fn nested_deeper_than(bytes: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn nest(levels: usize) -> String {
        "[".repeat(levels) + &"]".repeat(levels)
    }

    #[test]
    fn nesting_up_to_the_limit_parses() {
        let v: Value = from_str(&nest(MAX_DEPTH)).expect("at the limit");
        assert!(v.is_array());
        let obj = "{\"a\":".repeat(MAX_DEPTH) + "1" + &"}".repeat(MAX_DEPTH);
        assert!(from_str::<Value>(&obj).is_ok());
    }

    #[test]
    fn deeper_nesting_is_a_parse_error_not_a_stack_overflow() {
        // Regression (fuzz): 60 levels overflowed a debug worker's 256 KiB stack.
        let err = from_str::<Value>(&nest(MAX_DEPTH + 1)).expect_err("too deep");
        assert!(err.to_string().contains("nested deeper"), "{err}");
        let huge = "{\"a\":[".repeat(100_000);
        assert!(from_str::<Value>(&huge).is_err());
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        let text = format!(
            r#"{{"s":"{}\"{}","t":[1]}}"#,
            "[".repeat(500),
            "{".repeat(500)
        );
        let v: Value = from_str(&text).expect("brackets in strings are text");
        assert_eq!(v["t"][0], 1);
    }
}
