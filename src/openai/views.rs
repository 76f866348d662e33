//! Borrowed views of a JSON body for the request converter: values stay raw text (`Raw`)
//! until a rule reads them, arrays are walked one element at a time (`each`), and output is
//! written as comma-separated JSON values (`List`), so no tree of a request is ever built.

use std::borrow::Cow;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::Invalid;

pub(super) type Raw<'a> = Option<&'a RawValue>;

/// A JSON string, borrowed from the body when it has no escapes.
#[derive(Deserialize)]
pub(super) struct Str<'a>(#[serde(borrow)] Cow<'a, str>);

/// `raw` as a string, if it is one.
pub(super) fn text(raw: Raw<'_>) -> Option<Cow<'_, str>> {
    crate::json::from_str::<Str>(raw?.get()).ok().map(|s| s.0)
}

pub(super) fn parse<'a, T: Deserialize<'a>>(raw: Raw<'a>) -> Option<T> {
    crate::json::from_str(raw?.get()).ok()
}

/// `raw` read as the struct `T` when it is an object, else `None` (a derived struct would also
/// take an array, field by position).
pub(super) fn parse_object<'a, T: Deserialize<'a>>(raw: Raw<'a>) -> Option<T> {
    parse(raw.filter(|r| is_object(r)))
}

/// `raw` read as the struct `T`, or a 400 naming `param`: `what` must be an object.
pub(super) fn object<'a, T: Deserialize<'a>>(
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
    crate::json::from_str(raw.get())
        .map_err(|e| Invalid::new(format!("{what} is not valid: {e}"), Some(param)))
}

pub(super) fn is_object(raw: &RawValue) -> bool {
    raw.get().starts_with('{')
}

/// Calls `f` with each element of the JSON array `raw`, in order, as raw text: the array is
/// walked, never collected. `Ok(false)` when `raw` is not an array.
pub(super) fn each<'a>(
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
    let walked = crate::json::seq(
        raw.get(),
        Walk {
            f: &mut f,
            failed: &mut failed,
        },
    );
    match (failed, walked) {
        (Some(invalid), _) => Err(invalid),
        // The body parsed once already: an element cannot fail to parse as raw text.
        (None, walked) => Ok(walked.is_ok()),
    }
}

/// JSON values written one after another, comma-separated.
#[derive(Default)]
pub(super) struct List {
    pub(super) bytes: Vec<u8>,
    pub(super) n: usize,
}

impl List {
    /// Appends `value`, serialized.
    pub(super) fn push(&mut self, value: &impl Serialize) {
        if self.n > 0 {
            self.bytes.push(b',');
        }
        self.n += 1;
        // Writing our own structs of strings and raw values into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.bytes, value);
    }

    /// Appends every value of `other`.
    pub(super) fn append(&mut self, other: &mut List) {
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

    pub(super) fn write_array(&self, out: &mut Vec<u8>) {
        out.push(b'[');
        out.extend_from_slice(&self.bytes);
        out.push(b']');
    }
}

pub(super) fn empty_object() -> Cow<'static, RawValue> {
    constant("{}")
}

/// A JSON constant of ours as a raw value.
pub(super) fn constant(json: &'static str) -> Cow<'static, RawValue> {
    Cow::Owned(RawValue::from_string(json.into()).expect("a JSON constant"))
}
