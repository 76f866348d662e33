//! JSON from clients, the upstream, the token endpoint, Redis and our own files, parsed under
//! one nesting limit that fits the workers' small stacks. serde_json builds values
//! recursively and stops only at 128 levels, which a debug build cannot reach on a
//! `WORKER_STACK` stack: a deeply nested body would overflow it and abort the whole process.
//! A flat scan refuses such input first, as an ordinary parse error. Every parse in `src/`
//! goes through here: clippy's `disallowed-methods` (clippy.toml) refuses a direct
//! `serde_json::from_slice` or `from_str`.

use serde::Deserialize;

/// The deepest nesting of arrays and objects parsed anywhere. Measured on a 256 KiB
/// (`WORKER_STACK`) thread in a debug build, with the limit lifted: the readers that build
/// values recursively overflow at 77 levels (a `Value`, the chat stream converter, the
/// upstream error converter; about 3.4 KiB a level) and 102 (the completion converter);
/// pass-through, the system-prompt splice, sticky facts and metering skip values without
/// recursion and take any depth. 48 levels need 163 KiB there, leaving a third of the stack
/// for the frames above a converter (the fuzz test `the_deepest_accepted_json_fits_three_
/// quarters_of_a_worker_stack` keeps that true); a release build needs far less. Real
/// requests nest a dozen levels at most (a tool's JSON Schema is the deepest part).
pub const MAX_DEPTH: usize = 48;

/// A parse error for input nested past `MAX_DEPTH`, or `None`.
fn too_deep(bytes: &[u8]) -> Option<serde_json::Error> {
    nested_deeper_than(bytes, MAX_DEPTH)
        .then(|| serde::de::Error::custom(format!("JSON nested deeper than {MAX_DEPTH} levels")))
}

/// `serde_json::from_slice`, refusing input nested deeper than `MAX_DEPTH`.
#[allow(clippy::disallowed_methods)]
pub fn from_slice<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> serde_json::Result<T> {
    match too_deep(bytes) {
        Some(error) => Err(error),
        None => serde_json::from_slice(bytes),
    }
}

/// Whether `bytes` is well-formed JSON, at any depth: serde_json skips values without
/// recursion, so no limit is needed (an upstream answer that nests deeply is still an
/// answer, not garbage).
#[allow(clippy::disallowed_methods)]
pub fn well_formed(bytes: &[u8]) -> serde_json::Result<()> {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map(|_| ())
}

/// Walks the JSON array `text` with `visitor` (one element at a time, nothing kept), under
/// the same limit.
#[allow(clippy::disallowed_methods)]
pub fn seq<'de, V: serde::de::Visitor<'de>>(
    text: &'de str,
    visitor: V,
) -> serde_json::Result<V::Value> {
    if let Some(error) = too_deep(text.as_bytes()) {
        return Err(error);
    }
    serde::Deserializer::deserialize_seq(&mut serde_json::Deserializer::from_str(text), visitor)
}

/// `serde_json::from_str`, refusing input nested deeper than `MAX_DEPTH`.
pub fn from_str<'a, T: Deserialize<'a>>(text: &'a str) -> serde_json::Result<T> {
    from_slice(text.as_bytes())
}

/// Whether a JSON body is text the upstream can take: valid UTF-8, and no `\u` escape that
/// leaves a surrogate unpaired (a high one not followed by a low one, or a low one alone), in
/// any string of any field. A flat byte scan, no parse: pass-through bodies stay unparsed.
/// Outside strings a valid body holds no backslash, so every one is an escape in a string.
pub fn check_text(bytes: &[u8]) -> Result<(), String> {
    if let Err(e) = std::str::from_utf8(bytes) {
        return Err(format!(
            "the request body is not valid UTF-8 (at byte {})",
            e.valid_up_to()
        ));
    }
    let hex4 = |at: usize| -> Option<u16> {
        let digits = bytes.get(at..at + 4)?;
        digits.iter().try_fold(0u16, |n, &d| {
            let v = match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                b'A'..=b'F' => d - b'A' + 10,
                _ => return None,
            };
            Some(n << 4 | u16::from(v))
        })
    };
    let lone = |at: usize| {
        Err(format!(
            "the request body has an unpaired surrogate escape (\\u{:04x}) at byte {at}; JSON strings must be valid Unicode",
            hex4(at + 2).unwrap_or(0)
        ))
    };
    let mut i = 0;
    while let Some(at) = find_backslash(bytes, i) {
        if bytes.get(at + 1) != Some(&b'u') {
            // Any other escape is two bytes (`\\` included, so its second byte is skipped).
            i = at + 2;
            continue;
        }
        match hex4(at + 2) {
            Some(0xD800..=0xDBFF) => {
                let paired = bytes.get(at + 6..at + 8) == Some(&b"\\u"[..])
                    && matches!(hex4(at + 8), Some(0xDC00..=0xDFFF));
                if !paired {
                    return lone(at);
                }
                i = at + 12;
            }
            Some(0xDC00..=0xDFFF) => return lone(at),
            // Other escapes, and malformed ones (the parser's to refuse).
            _ => i = at + 6,
        }
    }
    Ok(())
}

/// The first `\\` in `bytes` from `from`.
fn find_backslash(bytes: &[u8], from: usize) -> Option<usize> {
    find_any2(bytes, from, b'\\', b'\\')
}

/// The first `a` or `b` in `bytes` from `from`, eight bytes at a time (a word holds `a` when
/// `word ^ aaaa…` has a zero byte; the lowest such flag is always a true one).
fn find_any2(bytes: &[u8], from: usize, a: u8, b: u8) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let mut i = from;
    while i + 8 <= bytes.len() {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[i..i + 8]);
        let w = u64::from_le_bytes(word);
        let hits = zero_byte(w ^ (ONES * u64::from(a))) | zero_byte(w ^ (ONES * u64::from(b)));
        if hits != 0 {
            return Some(i + (hits.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    (bytes.get(i..)?.iter().position(|&c| c == a || c == b)).map(|p| i + p)
}

/// Finds the value of one top-level field of a JSON object (`usage` in a message) as the
/// object streams through in pieces of any size, keeping only that value, and only up to
/// `limit` bytes (a larger one is dropped). The last occurrence wins. Needs no valid JSON:
/// what it finds is parsed afterwards.
pub struct FieldScan {
    name: &'static [u8],
    limit: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// At depth 1, the next string is a key (after `{` or `,`), not a value (after `:`).
    expect_key: bool,
    reading_key: bool,
    key: Vec<u8>,
    key_matches: bool,
    capturing: bool,
    overflow: bool,
    value: Vec<u8>,
    found: Option<Vec<u8>>,
}

impl FieldScan {
    pub fn new(name: &'static str, limit: usize) -> FieldScan {
        FieldScan {
            name: name.as_bytes(),
            limit,
            depth: 0,
            in_string: false,
            escaped: false,
            expect_key: false,
            reading_key: false,
            key: Vec::new(),
            key_matches: false,
            capturing: false,
            overflow: false,
            value: Vec::new(),
            found: None,
        }
    }

    /// The field's value (its JSON text), once it has been seen whole.
    pub fn value(&self) -> Option<&[u8]> {
        self.found.as_deref()
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        let mut i = 0;
        while i < bytes.len() {
            // Inside a string nothing matters but its end and its escapes: skip to them, a
            // word at a time (most of an answer is text).
            if self.in_string && !self.escaped && !self.reading_key && !self.capturing {
                match find_any2(bytes, i, b'"', b'\\') {
                    Some(at) => i = at,
                    None => return,
                }
            }
            self.step(bytes[i]);
            i += 1;
        }
    }

    fn step(&mut self, b: u8) {
        let outside = !self.in_string;
        if self.capturing {
            if outside && self.depth == 1 && (b == b',' || b == b'}') {
                self.finish();
            } else if self.value.len() < self.limit {
                self.value.push(b);
            } else {
                self.overflow = true;
            }
        }
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.reading_key {
                    self.reading_key = false;
                    self.key_matches = self.key == self.name;
                }
                return;
            }
            if self.reading_key && self.key.len() <= self.name.len() {
                self.key.push(b);
            }
            return;
        }
        match b {
            b'"' => {
                self.in_string = true;
                self.reading_key = self.depth == 1 && self.expect_key;
                if self.reading_key {
                    self.key.clear();
                }
            }
            b'{' | b'[' => {
                self.depth += 1;
                if self.depth == 1 {
                    self.expect_key = b == b'{';
                }
            }
            b'}' | b']' => self.depth = self.depth.saturating_sub(1),
            b':' if self.depth == 1 => {
                self.expect_key = false;
                if self.key_matches {
                    self.key_matches = false;
                    self.capturing = true;
                    self.value.clear();
                }
            }
            b',' if self.depth == 1 => self.expect_key = true,
            _ => {}
        }
    }

    fn finish(&mut self) {
        self.capturing = false;
        let value = std::mem::take(&mut self.value);
        if !std::mem::take(&mut self.overflow) {
            self.found = Some(value);
        }
    }
}

/// Deserializes any JSON value and keeps nothing, checking every part of it: strings are
/// parsed (escapes and surrogates included), which `IgnoredAny` and `RawValue` skip unchecked.
/// A value read through it once may then be copied as raw text safely.
pub struct Valid;

impl<'de> Deserialize<'de> for Valid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Valid, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Valid;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Valid, E> {
                Ok(Valid)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Valid, E> {
                Ok(Valid)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Valid, E> {
                Ok(Valid)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Valid, E> {
                Ok(Valid)
            }
            fn visit_str<E>(self, _: &str) -> Result<Valid, E> {
                Ok(Valid)
            }
            fn visit_unit<E>(self) -> Result<Valid, E> {
                Ok(Valid)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Valid, A::Error> {
                while seq.next_element::<Valid>()?.is_some() {}
                Ok(Valid)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Valid, A::Error> {
                while map.next_entry::<Valid, Valid>()?.is_some() {}
                Ok(Valid)
            }
        }
        d.deserialize_any(V)
    }
}

/// Valid JSON `text` without the whitespace between its tokens (strings kept as written).
pub fn compact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in text.chars() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else if c.is_ascii_whitespace() {
            continue;
        }
        out.push(c);
    }
    out
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

    #[test]
    fn json_depth_counts_brackets_outside_strings() {
        assert!(!nested_deeper_than(br#"{"a":[[1]]}"#, 3));
        assert!(nested_deeper_than(br#"{"a":[[[1]]]}"#, 3));
        assert!(!nested_deeper_than(br#"{"a":"[[[[\"{{{{"}"#, 1));
        assert!(!nested_deeper_than(br#"{"a":"\\"}"#, 1));
        assert!(nested_deeper_than(&[b'['; 200], MAX_DEPTH));
    }

    /// The cost of the text check per MiB, on a realistic body (prose with escapes, a few
    /// emoji as surrogate pairs) and on one made of escapes only, its worst case
    /// (`cargo test --release measure_text -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn measure_text_check_cost() {
        let prose = r#"{"role":"user","content":"Line one,\n\"quoted\" \ud83d\ude00 text \u00e9 and plain words to fill the line."},"#;
        let plain = r#"{"role":"user","content":"A line of plain words, as code and prose mostly are, no escapes at all here."},"#;
        let escapes = r#"\n\t\u00e9\ud83d\ude00\\"#;
        for (what, piece) in [
            ("plain", plain),
            ("prose", prose),
            ("escapes only", escapes),
        ] {
            let mut body = String::from(r#"{"messages":["#);
            if what == "escapes only" {
                body.push('"');
            }
            while body.len() < 32 * 1024 * 1024 {
                body.push_str(piece);
            }
            body.push_str(if what == "escapes only" {
                "\"]}"
            } else {
                "{}]}"
            });
            let mib = body.len() as f64 / (1024.0 * 1024.0);
            let rounds = 5;
            let started = std::time::Instant::now();
            for _ in 0..rounds {
                assert!(check_text(std::hint::black_box(body.as_bytes())).is_ok());
            }
            let per_mib = started.elapsed().as_secs_f64() * 1e6 / (mib * rounds as f64);
            eprintln!("check_text, {what}: {per_mib:.0} µs per MiB ({mib:.0} MiB bodies)");
        }
    }

    fn scan_in_pieces(body: &[u8], piece: usize) -> Option<Vec<u8>> {
        let mut scan = FieldScan::new("usage", 1024);
        for chunk in body.chunks(piece.max(1)) {
            scan.feed(chunk);
        }
        scan.value().map(<[u8]>::to_vec)
    }

    #[test]
    fn a_top_level_field_is_found_however_the_body_is_cut() {
        let body = br#"{"id":"m","content":[{"type":"text","text":"a \"usage\": {\"x\":1}, } {"},{"usage":{"input_tokens":99}}],"meta":{"usage":{"input_tokens":98}},"usage" : {"input_tokens":3,"output_tokens":4,"nested":{"a":[1,2]}},"stop_reason":"end_turn"}"#;
        for piece in [1, 2, 3, 7, 64, body.len()] {
            let found = scan_in_pieces(body, piece).expect("found");
            let v: Value = serde_json::from_slice(&found).expect("the value parses");
            assert_eq!(v["input_tokens"], 3, "piece {piece}");
            assert_eq!(v["output_tokens"], 4);
        }
        let last = br#"{"usage":{"output_tokens":1},"x":1,"usage":{"output_tokens":2}}"#;
        let v: Value =
            serde_json::from_slice(&scan_in_pieces(last, 5).expect("found")).expect("json");
        assert_eq!(v["output_tokens"], 2, "the last occurrence wins");
        assert!(scan_in_pieces(br#"{"usages":{"a":1},"xusage":2}"#, 3).is_none());
        assert!(scan_in_pieces(br#"["usage",{"usage":1}]"#, 3).is_none());
        let big = format!(r#"{{"usage":{{"pad":"{}"}}}}"#, "x".repeat(2000));
        assert!(
            scan_in_pieces(big.as_bytes(), 100).is_none(),
            "over the limit"
        );
        assert!(scan_in_pieces(b"\xff\x00{{{{\"usage\"", 2).is_none());
    }

    #[test]
    fn backslashes_are_found_at_every_offset() {
        for len in 0..40 {
            for at in 0..len {
                let mut bytes = vec![b'a'; len];
                bytes[at] = b'\\';
                for from in 0..=at {
                    assert_eq!(find_backslash(&bytes, from), Some(at), "{len} {at} {from}");
                }
                assert_eq!(find_backslash(&bytes, at + 1), None);
            }
            assert_eq!(find_backslash(&vec![0x5d; len], 0), None);
        }
    }

    /// The cost of finding `usage` in a streamed answer, per MiB, fed in 8 KiB reads as the
    /// relay does (`cargo test --release measure_usage_scan -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn measure_usage_scan_cost() {
        let block = r#"{"type":"text","text":"Some answer text with \"quotes\" and\nlines, as models write it."},"#;
        let mut body = String::from(r#"{"id":"m","content":["#);
        while body.len() < 32 * 1024 * 1024 {
            body.push_str(block);
        }
        body.push_str(r#"{}],"usage":{"input_tokens":1,"output_tokens":2}}"#);
        let mib = body.len() as f64 / (1024.0 * 1024.0);
        let rounds = 3;
        let started = std::time::Instant::now();
        for _ in 0..rounds {
            let mut scan = FieldScan::new("usage", 16 * 1024);
            for chunk in body.as_bytes().chunks(8 * 1024) {
                scan.feed(std::hint::black_box(chunk));
            }
            assert!(scan.value().is_some());
        }
        let per_mib = started.elapsed().as_secs_f64() * 1e6 / (mib * rounds as f64);
        eprintln!("usage scan: {per_mib:.0} µs per MiB");
    }

    #[test]
    fn text_checks_find_bad_utf8_and_lone_surrogates_anywhere() {
        for ok in [
            &br#"{"a":"plain"}"#[..],
            br#"{"a":"\ud83d\ude00"}"#,
            br#"{"a":"\\ud800 is text"}"#,
            br#"{"a":"\\\ud83d\ude00"}"#,
            br#"{"a":"\u00e9\n\"\\"}"#,
            "{\"a\":\"é 中\"}".as_bytes(),
        ] {
            assert!(check_text(ok).is_ok(), "{}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b"{\"a\":\"caf\xc3\"}"[..],
            b"{\"a\":\"\xff\"}",
            br#"{"a":"\ud800"}"#,
            br#"{"a":"\uDBFFx"}"#,
            br#"{"a":"\udc00"}"#,
            br#"{"a":"\ud83d\ud83d"}"#,
            br#"{"deep":[{"x":["\ud83d"]}]}"#,
            br#"{"a":"\\\ud800"}"#,
        ] {
            assert!(check_text(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

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
