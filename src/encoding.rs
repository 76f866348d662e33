//! Byte encodings the gateway needs and nothing more: base64 (standard, padded) for sealed
//! secrets and key files, base64url without padding for tokens (both by the `base64` crate),
//! and lowercase hex for hashes.

use base64::Engine;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{
    GeneralPurpose, GeneralPurposeConfig, STANDARD, URL_SAFE_NO_PAD,
};

/// What is read: padded or not, trailing bits ignored, as any encoder writes it.
const LENIENT: GeneralPurposeConfig = GeneralPurposeConfig::new()
    .with_decode_padding_mode(DecodePaddingMode::Indifferent)
    .with_decode_allow_trailing_bits(true);
const READ_STANDARD: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, LENIENT);
const READ_URL_SAFE: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, LENIENT);

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// URL-safe base64 without padding (RFC 4648 §5), as PKCE and our key format use.
pub fn base64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The alphabet `text` is written in: URL-safe once it holds `-` or `_`.
fn reader(text: &str) -> &'static GeneralPurpose {
    if text.contains(['-', '_']) {
        &READ_URL_SAFE
    } else {
        &READ_STANDARD
    }
}

/// Decodes standard or URL-safe base64, padded or not. `None` on any invalid character or length.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    reader(text).decode(text).ok()
}

/// Whether `text` is base64 that `base64_decode` takes, decoding it in pieces into a small
/// buffer rather than into memory of its size (a data URL can be tens of MB).
pub fn is_base64(text: &str) -> bool {
    let engine = reader(text);
    let digits = text.trim_end_matches('=');
    let mut buf = [0u8; 3 * 1024];
    // Whole groups of four, so only the last piece may end part way through one.
    (digits.as_bytes().chunks(4 * 1024)).all(|piece| engine.decode_slice(piece, &mut buf).is_ok())
}

/// `text` with every character outside `[A-Za-z0-9_-]` replaced by `_` (never empty): the
/// form Anthropic requires of tool ids, and a safe file-name part.
pub fn word_chars(text: &str) -> String {
    let clean: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() { "_".into() } else { clean }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// Decodes lowercase or uppercase hex; `None` on odd length or a non-hex character.
pub fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16);
    text.as_bytes()
        .chunks(2)
        .map(|p| Some((digit(p[0])? << 4 | digit(p[1])?) as u8))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(base64(plain.as_bytes()), encoded);
            assert_eq!(base64_decode(encoded).as_deref(), Some(plain.as_bytes()));
        }
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(base64_decode("-_8"), Some(vec![0xfb, 0xff]));
    }

    #[test]
    fn base64_rejects_garbage() {
        assert_eq!(base64_decode("ab$d"), None);
        assert_eq!(base64_decode("a"), None);
        assert!(!is_base64("ab$d") && !is_base64("a"));
        assert!(is_base64("Zm9vYg==") && is_base64("-_8"));
        let long = base64(&vec![7u8; 10_000]);
        assert!(is_base64(&long));
        assert!(!is_base64(&format!("{long}$")));
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(hex(&[0, 15, 255]), "000fff");
        assert_eq!(hex_decode("000fff"), Some(vec![0, 15, 255]));
        assert_eq!(hex_decode("0g"), None);
        assert_eq!(hex_decode("abc"), None);
    }
}
