//! What a request used, as the ledger, the budgets, the metrics and the shared state count
//! it: `Usage` (tokens by kind), `Reported` (Anthropic's `usage` object), `Record` (one
//! request, as the journal holds it), `Totals` and `Book` (the totals by day, key, account and
//! model, and each key's tokens by day).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Tokens of one request, as Anthropic counts them (`input` excludes both cache counts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub cache_creation: u64,
    pub cache_read: u64,
}

/// A `usage` object as Anthropic reports it: a field it does not carry (or carries as null) is
/// `None`, and fields the gateway does not count are skipped without being built.
#[derive(Debug, Default, Deserialize)]
pub struct Reported {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

impl Usage {
    /// Takes what an Anthropic `usage` object says (message_start, message_delta or a whole
    /// message); fields it does not carry keep their value. Output is cumulative in streams.
    pub fn merge(&mut self, usage: &Value) {
        if let Ok(reported) = Reported::deserialize(usage) {
            self.take(&reported);
        }
    }

    /// As `merge`, from a typed report.
    pub fn take(&mut self, r: &Reported) {
        let set = |field: &mut u64, value: Option<u64>| {
            if let Some(n) = value {
                *field = n;
            }
        };
        set(&mut self.input, r.input_tokens);
        set(&mut self.output, r.output_tokens);
        set(&mut self.cache_creation, r.cache_creation_input_tokens);
        set(&mut self.cache_read, r.cache_read_input_tokens);
    }

    /// Adds `other`, saturating: the counts are the upstream's, and nothing bounds them.
    pub(crate) fn add(&mut self, other: &Usage) {
        self.input = self.input.saturating_add(other.input);
        self.output = self.output.saturating_add(other.output);
        self.cache_creation = self.cache_creation.saturating_add(other.cache_creation);
        self.cache_read = self.cache_read.saturating_add(other.cache_read);
    }

    pub fn total(&self) -> u64 {
        // Saturating: the counts are the upstream's, and nothing bounds them.
        self.input
            .saturating_add(self.output)
            .saturating_add(self.cache_creation)
            .saturating_add(self.cache_read)
    }
}

/// One request, as written to the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Unix seconds.
    pub t: u64,
    /// Client key id (`-` when auth is open).
    pub key: String,
    /// Account id (`-` when none was used).
    pub account: String,
    pub model: String,
    pub status: u16,
    #[serde(flatten)]
    pub usage: Usage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The totals of one (day, key, account, model).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub requests: u64,
    pub errors: u64,
    #[serde(flatten)]
    pub usage: Usage,
}

impl Totals {
    pub(crate) fn add(&mut self, r: &Record) {
        self.requests = self.requests.saturating_add(1);
        if r.status >= 400 || r.error.is_some() {
            self.errors = self.errors.saturating_add(1);
        }
        self.usage.add(&r.usage);
    }

    pub fn absorb(&mut self, other: &Totals) {
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
        self.usage.add(&other.usage);
    }
}

/// (day number since 1970-01-01, key, account, model).
pub type RowKey = (u64, String, String, String);

/// Everything the ledger knows, by row, and each key's tokens by day (what budgets read: a
/// range over one key's days, however many rows there are).
#[derive(Debug, Default, Clone)]
pub struct Book {
    pub rows: BTreeMap<RowKey, Totals>,
    tokens_by_key: HashMap<String, BTreeMap<u64, u64>>,
}

impl Book {
    /// A book of rows read elsewhere (Redis's totals).
    pub fn from_rows(rows: Vec<(RowKey, Totals)>) -> Book {
        let mut book = Book::default();
        for (key, totals) in rows {
            book.insert(key, totals);
        }
        book
    }

    pub(crate) fn add(&mut self, r: &Record) {
        let day = r.t / 86_400;
        self.count_tokens(day, &r.key, r.usage.total());
        let key = (day, r.key.clone(), r.account.clone(), r.model.clone());
        self.rows.entry(key).or_default().add(r);
    }

    pub(crate) fn insert(&mut self, key: RowKey, totals: Totals) {
        self.count_tokens(key.0, &key.1, totals.usage.total());
        self.rows.insert(key, totals);
    }

    /// Adds every row of `other`.
    pub(crate) fn absorb(&mut self, other: &Book) {
        for (key, totals) in &other.rows {
            self.count_tokens(key.0, &key.1, totals.usage.total());
            self.rows.entry(key.clone()).or_default().absorb(totals);
        }
    }

    pub(crate) fn count_tokens(&mut self, day: u64, key: &str, tokens: u64) {
        let days = match self.tokens_by_key.get_mut(key) {
            Some(days) => days,
            None => self.tokens_by_key.entry(key.to_string()).or_default(),
        };
        let day = days.entry(day).or_default();
        *day = day.saturating_add(tokens);
    }

    /// Tokens used by client key `key` from day `from` on.
    pub(crate) fn tokens_since(&self, key: &str, from: u64) -> u64 {
        // Up to tomorrow (clocks differ): a row dated later counts against no budget.
        let tomorrow = crate::time::now_unix() / 86_400 + 1;
        self.tokens_by_key.get(key).map_or(0, |days| {
            days.range(from..=tomorrow.max(from))
                .fold(0u64, |sum, (_, n)| sum.saturating_add(*n))
        })
    }
}

/// Rows grouped by one dimension, for `llm-gateway usage`.
pub fn group(book: &Book, by: &str, from_day: u64, to_day: u64) -> Vec<(String, Totals)> {
    let mut groups: HashMap<String, Totals> = HashMap::new();
    for ((day, key, account, model), totals) in &book.rows {
        if *day < from_day || *day > to_day {
            continue;
        }
        let label = match by {
            "account" => account.clone(),
            "model" => model.clone(),
            "day" => crate::time::rfc3339(day * 86_400)[..10].to_string(),
            _ => key.clone(),
        };
        groups.entry(label).or_default().absorb(totals);
    }
    let mut out: Vec<(String, Totals)> = groups.into_iter().collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}
