//! Keeping our credentials out of what we pass on. An upstream or a token endpoint may echo
//! what it was sent (a 401 quoting the key, a proxy's debug page, a token endpoint's error
//! that repeats the request), and what it answers goes to a client, a log or the CLI. Every
//! answer carries a `Scrub` of the secrets its request carried; each secret found in its bytes
//! is masked, byte for byte, so a framed body keeps its length.

use std::borrow::Cow;

use memchr::memmem::Finder;

/// Shorter values are not looked for: a secret is long (Anthropic's keys and tokens are over 90
/// characters), and masking every "abc" in an answer would garble it.
pub const MIN_LEN: usize = 8;
const MASK: u8 = b'*';

/// The secrets one answer must not echo.
#[derive(Clone, Default)]
pub struct Scrub {
    finders: Vec<Finder<'static>>,
}

impl std::fmt::Debug for Scrub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scrub({} secrets)", self.finders.len())
    }
}

impl Scrub {
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Scrub {
        let mut finders: Vec<Finder<'static>> = Vec::new();
        for secret in secrets {
            let needle = secret.as_bytes();
            if needle.len() >= MIN_LEN && !finders.iter().any(|f| f.needle() == needle) {
                finders.push(Finder::new(needle).into_owned());
            }
        }
        // Longest first: a secret that contains another is masked whole.
        finders.sort_by_key(|f| std::cmp::Reverse(f.needle().len()));
        Scrub { finders }
    }

    pub fn is_empty(&self) -> bool {
        self.finders.is_empty()
    }

    /// The longest secret's length: a piece of a stream may end inside one this long.
    fn longest(&self) -> usize {
        self.finders.first().map_or(0, |f| f.needle().len())
    }

    /// Whether any secret is in `data`.
    pub fn found_in(&self, data: &[u8]) -> bool {
        self.finders.iter().any(|f| f.find(data).is_some())
    }

    /// Masks every secret in `data`, in place; true if one was found. Every secret is looked
    /// for in the bytes as they came, so two that overlap are both masked whole.
    pub fn bytes(&self, data: &mut [u8]) -> bool {
        let mut found: Vec<std::ops::Range<usize>> = Vec::new();
        for finder in &self.finders {
            let n = finder.needle().len();
            found.extend(finder.find_iter(data).map(|i| i..i + n));
        }
        for range in &found {
            data[range.clone()].fill(MASK);
        }
        !found.is_empty()
    }

    /// `text` with every secret masked.
    pub fn text<'t>(&self, text: &'t str) -> Cow<'t, str> {
        if !self
            .finders
            .iter()
            .any(|f| f.find(text.as_bytes()).is_some())
        {
            return Cow::Borrowed(text);
        }
        let mut bytes = text.as_bytes().to_vec();
        self.bytes(&mut bytes);
        // Whole secrets were replaced by ASCII; a secret is valid UTF-8, so the rest is too.
        Cow::Owned(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// Scrubs a body copied piece by piece: a secret may straddle two pieces, so the tail of each
/// piece that could begin one is held back until the next arrives (or the body ends).
pub struct Stream<'a> {
    scrub: &'a Scrub,
    held: Vec<u8>,
}

impl<'a> Stream<'a> {
    pub fn new(scrub: &'a Scrub) -> Stream<'a> {
        Stream {
            scrub,
            held: Vec::new(),
        }
    }

    /// Takes `piece`; returns what may go on now, scrubbed. Holds at most the longest secret's
    /// length less one byte between calls.
    pub fn feed<'p>(&mut self, piece: &'p [u8]) -> Cow<'p, [u8]> {
        if self.scrub.is_empty() {
            return Cow::Borrowed(piece);
        }
        self.held.extend_from_slice(piece);
        self.scrub.bytes(&mut self.held);
        let keep = (self.scrub.longest() - 1).min(self.held.len());
        let tail = self.held.split_off(self.held.len() - keep);
        Cow::Owned(std::mem::replace(&mut self.held, tail))
    }

    /// The held tail, at the body's end (already scrubbed: no whole secret fits in it).
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-ant-api03-secret-key";

    #[test]
    fn secrets_are_masked_in_place_and_short_values_are_left() {
        let scrub = Scrub::new([KEY, "short", KEY]);
        let mut body = format!(r#"{{"error":"bad key {KEY}, really {KEY}"}}"#).into_bytes();
        let len = body.len();
        assert!(scrub.bytes(&mut body));
        let text = String::from_utf8(body).expect("utf8");
        assert_eq!(text.len(), len);
        assert!(!text.contains(KEY) && text.contains("*****"), "{text}");
        assert_eq!(scrub.text("a short word"), "a short word");
        assert!(!scrub.text(&format!("x{KEY}y")).contains(KEY));
    }

    #[test]
    fn overlapping_secrets_are_both_masked_whole() {
        let scrub = Scrub::new(["abcdefgh-XYZ", "XYZ-ijklmnop"]);
        let masked = scrub.text("[abcdefgh-XYZ-ijklmnop]");
        assert_eq!(masked, format!("[{}]", "*".repeat(21)));
    }

    #[test]
    fn a_secret_inside_a_longer_one_is_masked_whole() {
        let long = format!("{KEY}-and-more");
        let scrub = Scrub::new([KEY, long.as_str()]);
        let out = scrub.text(&long);
        assert!(out.bytes().all(|b| b == MASK), "{out}");
    }

    #[test]
    fn a_secret_split_across_pieces_is_masked() {
        let scrub = Scrub::new([KEY]);
        let body = format!("before {KEY} middle {KEY} after");
        for size in [1, 2, 5, 7, 100] {
            let mut stream = Stream::new(&scrub);
            let mut out = Vec::new();
            for piece in body.as_bytes().chunks(size) {
                out.extend_from_slice(&stream.feed(piece));
            }
            out.extend(stream.finish());
            let out = String::from_utf8(out).expect("utf8");
            assert_eq!(out.len(), body.len(), "piece size {size}");
            assert!(!out.contains(KEY), "piece size {size}: {out}");
            assert!(out.starts_with("before ") && out.ends_with(" after"));
        }
    }

    #[test]
    fn nothing_to_scrub_passes_through() {
        let scrub = Scrub::default();
        let mut stream = Stream::new(&scrub);
        assert_eq!(&*stream.feed(b"abc"), b"abc");
        assert!(stream.finish().is_empty());
    }
}
