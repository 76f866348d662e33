//! How a request is shaped for one kind of account. Each kind is one processor behind this
//! small trait: a future provider is a new file here, not edits across the code.

mod api_key;
mod oauth;

pub use api_key::ApiKey;
pub use oauth::OAuth;

use crate::anthropic::Splice;

/// The upstream request under construction: headers already filtered of the client's
/// credentials and hop-by-hop fields, and the body as the client sent it.
pub struct Outgoing<'a> {
    pub path: String,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The client's request body, never copied.
    pub body: &'a [u8],
    /// The one edit a processor made to the body, sent in place of the bytes it names.
    pub splice: Option<Splice>,
}

impl Outgoing<'_> {
    /// Removes every `name` header and returns their values.
    pub fn take_header(&mut self, name: &str) -> Vec<Vec<u8>> {
        let mut taken = Vec::new();
        self.headers.retain(|(n, v)| {
            if n == name {
                taken.push(v.clone());
                false
            } else {
                true
            }
        });
        taken
    }

    pub fn set_header(&mut self, name: &str, value: impl Into<Vec<u8>>) {
        self.take_header(name);
        self.headers.push((name.to_string(), value.into()));
    }
}

pub trait Processor {
    /// Adds the credential and whatever the account kind requires.
    fn prepare(&self, out: &mut Outgoing<'_>) -> Result<(), Unfit>;
}

/// The processors' error: the request cannot carry what this kind of account must add to it
/// (a `system` that is neither text nor blocks). The client's to fix; no account would do
/// better.
#[derive(Debug, Clone)]
pub struct Unfit(pub String);

impl std::fmt::Display for Unfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
