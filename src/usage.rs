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
    /// Cache writes of both lifetimes.
    pub cache_creation: u64,
    pub cache_read: u64,
    /// Of `cache_creation`, the 1-hour writes (the rest are 5-minute ones).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_1h: u64,
    /// Whether the answer split its cache writes by lifetime (`usage.cache_creation`); without
    /// the split all are priced as 5-minute writes, and the cost is an estimate.
    #[serde(skip)]
    pub cache_split: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A `usage` object as Anthropic reports it: a field it does not carry (or carries as null) is
/// `None`, and fields the gateway does not count are skipped without being built.
#[derive(Debug, Default, Deserialize)]
pub struct Reported {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation: Option<CacheCreation>,
}

/// `usage.cache_creation`: the cache writes by lifetime.
#[derive(Debug, Default, Deserialize)]
struct CacheCreation {
    ephemeral_5m_input_tokens: Option<u64>,
    ephemeral_1h_input_tokens: Option<u64>,
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
        if let Some(split) = &r.cache_creation {
            let (five, hour) = (
                split.ephemeral_5m_input_tokens,
                split.ephemeral_1h_input_tokens,
            );
            if five.is_some() || hour.is_some() {
                self.cache_1h = hour.unwrap_or(0);
                self.cache_split = true;
                if r.cache_creation_input_tokens.is_none() {
                    self.cache_creation = five.unwrap_or(0).saturating_add(self.cache_1h);
                }
            }
        }
    }

    /// Adds `other`, saturating: the counts are the upstream's, and nothing bounds them.
    pub(crate) fn add(&mut self, other: &Usage) {
        self.input = self.input.saturating_add(other.input);
        self.output = self.output.saturating_add(other.output);
        self.cache_creation = self.cache_creation.saturating_add(other.cache_creation);
        self.cache_read = self.cache_read.saturating_add(other.cache_read);
        self.cache_1h = self.cache_1h.saturating_add(other.cache_1h);
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
    /// Nano-USD, priced when it was served (a later price edit does not change it); absent
    /// when no price row matched its model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<u64>,
    /// Its cache writes were not split by lifetime: all priced at the 5-minute rate.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub estimated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Record {
    /// Its cost as the budgets count it: nothing for a request the table could not price.
    pub fn spend(&self) -> Spend {
        Spend {
            tokens: self.usage.total(),
            nano: self.cost.unwrap_or(0),
        }
    }
}

/// What a key spent: tokens of all kinds, and nano-USD.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spend {
    pub tokens: u64,
    pub nano: u64,
}

impl Spend {
    pub fn add(&mut self, other: Spend) {
        self.tokens = self.tokens.saturating_add(other.tokens);
        self.nano = self.nano.saturating_add(other.nano);
    }
}

/// The totals of one (day, key, account, model).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub requests: u64,
    pub errors: u64,
    #[serde(flatten)]
    pub usage: Usage,
    /// Nano-USD of the priced requests.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cost: u64,
    /// Requests that used tokens of a model no price row matched: their cost is unknown,
    /// not zero.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unpriced: u64,
    /// Requests whose cache writes were priced without the split by lifetime.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub estimated: u64,
}

impl Totals {
    pub(crate) fn add(&mut self, r: &Record) {
        self.requests = self.requests.saturating_add(1);
        if r.status >= 400 || r.error.is_some() {
            self.errors = self.errors.saturating_add(1);
        }
        self.usage.add(&r.usage);
        match r.cost {
            Some(nano) => self.cost = self.cost.saturating_add(nano),
            None if r.usage.total() > 0 => self.unpriced = self.unpriced.saturating_add(1),
            None => {}
        }
        self.estimated = self.estimated.saturating_add(u64::from(r.estimated));
    }

    pub fn absorb(&mut self, other: &Totals) {
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
        self.usage.add(&other.usage);
        self.cost = self.cost.saturating_add(other.cost);
        self.unpriced = self.unpriced.saturating_add(other.unpriced);
        self.estimated = self.estimated.saturating_add(other.estimated);
    }

    pub fn spend(&self) -> Spend {
        Spend {
            tokens: self.usage.total(),
            nano: self.cost,
        }
    }
}

/// (day number since 1970-01-01, key, account, model); in `Book::hours`, the hour number.
pub type RowKey = (u64, String, String, String);

/// Hourly rows are kept this long.
pub const HOURS_KEPT: u64 = 48;

/// Everything the ledger knows, by row, each key's spend by day (what budgets read: a range
/// over one key's days, however many rows there are), and hourly rows for the last
/// `HOURS_KEPT` hours.
#[derive(Debug, Default, Clone)]
pub struct Book {
    pub rows: BTreeMap<RowKey, Totals>,
    pub hours: BTreeMap<RowKey, Totals>,
    spend_by_key: HashMap<String, BTreeMap<u64, Spend>>,
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
        self.count(day, &r.key, r.spend());
        let key = (day, r.key.clone(), r.account.clone(), r.model.clone());
        self.rows.entry(key).or_default().add(r);
        let hour = r.t / 3600;
        if hour >= first_hour_kept() {
            let key = (hour, r.key.clone(), r.account.clone(), r.model.clone());
            self.hours.entry(key).or_default().add(r);
            self.forget_old_hours();
        }
    }

    pub(crate) fn insert(&mut self, key: RowKey, totals: Totals) {
        self.count(key.0, &key.1, totals.spend());
        self.rows.insert(key, totals);
    }

    /// An hourly row read back (the summary's), if it is recent enough to keep.
    pub(crate) fn insert_hour(&mut self, key: RowKey, totals: Totals) {
        if key.0 >= first_hour_kept() {
            self.hours.entry(key).or_default().absorb(&totals);
        }
    }

    /// Adds every row of `other`.
    pub(crate) fn absorb(&mut self, other: &Book) {
        for (key, totals) in &other.rows {
            self.count(key.0, &key.1, totals.spend());
            self.rows.entry(key.clone()).or_default().absorb(totals);
        }
        for (key, totals) in &other.hours {
            self.insert_hour(key.clone(), *totals);
        }
        self.forget_old_hours();
    }

    fn forget_old_hours(&mut self) {
        let first = first_hour_kept();
        while self
            .hours
            .first_key_value()
            .is_some_and(|(k, _)| k.0 < first)
        {
            self.hours.pop_first();
        }
    }

    pub(crate) fn count(&mut self, day: u64, key: &str, spend: Spend) {
        let days = match self.spend_by_key.get_mut(key) {
            Some(days) => days,
            None => self.spend_by_key.entry(key.to_string()).or_default(),
        };
        days.entry(day).or_default().add(spend);
    }

    /// What client key `key` spent from day `from` on.
    pub(crate) fn spent_since(&self, key: &str, from: u64) -> Spend {
        // Up to tomorrow (clocks differ): a row dated later counts against no budget.
        let tomorrow = crate::time::now_unix() / 86_400 + 1;
        let mut sum = Spend::default();
        if let Some(days) = self.spend_by_key.get(key) {
            for (_, spend) in days.range(from..=tomorrow.max(from)) {
                sum.add(*spend);
            }
        }
        sum
    }
}

/// The oldest hour `Book::hours` keeps.
fn first_hour_kept() -> u64 {
    (crate::time::now_unix() / 3600).saturating_sub(HOURS_KEPT - 1)
}

/// A row of totals as `usage --json` and the key holder's endpoint print it: tokens by kind,
/// the cost in nano-USD (exact) and in USD, and the requests the cost leaves out.
pub fn totals_json(t: &Totals) -> Value {
    let u = &t.usage;
    let hour = u.cache_1h.min(u.cache_creation);
    serde_json::json!({
        "requests": t.requests, "errors": t.errors,
        "input_tokens": u.input, "output_tokens": u.output,
        "cache_creation_tokens": u.cache_creation,
        "cache_write_5m_tokens": u.cache_creation - hour, "cache_write_1h_tokens": hour,
        "cache_read_tokens": u.cache_read, "total_tokens": u.total(),
        "cost_nano_usd": t.cost, "cost_usd": crate::pricing::usd(t.cost, 9),
        "unpriced_requests": t.unpriced, "estimated_requests": t.estimated,
    })
}

/// The day (since 1970-01-01) of the Monday that starts `day`'s week (weeks start on
/// Monday, UTC; day 0 was a Thursday).
pub fn monday_of(day: u64) -> u64 {
    day.saturating_sub((day + 3) % 7)
}

/// The first day of `now`'s month, and of the next (days since 1970).
pub fn first_day_of_month(now: u64) -> (u64, u64) {
    let today = now / 86_400;
    let date = crate::time::rfc3339(now);
    let day_of_month: u64 = date[8..10].parse().unwrap_or(1);
    let first = today + 1 - day_of_month;
    // The first of next month: 28 days on, then forward to the next day numbered 1.
    let mut next = first + 28;
    while crate::time::rfc3339(next * 86_400)[8..10] != *"01" {
        next += 1;
    }
    (first, next)
}

/// What `group` groups by.
pub const GROUPS: [&str; 7] = ["key", "account", "model", "hour", "day", "week", "month"];

/// Rows grouped by one of `GROUPS`, for `llm-gateway usage`: days `from_day..=to_day` (by
/// hour: the hours kept of those days), of client key `key` alone when given.
pub fn group(
    book: &Book,
    by: &str,
    (from_day, to_day): (u64, u64),
    key: Option<&str>,
) -> Vec<(String, Totals)> {
    let mut groups: BTreeMap<String, Totals> = BTreeMap::new();
    let (rows, per_day) = match by {
        "hour" => (&book.hours, 24),
        _ => (&book.rows, 1),
    };
    let date = |day: u64| crate::time::rfc3339(day * 86_400);
    for ((n, k, account, model), totals) in rows {
        let day = n / per_day;
        if day < from_day || day > to_day || key.is_some_and(|key| key != k) {
            continue;
        }
        let label = match by {
            "account" => account.clone(),
            "model" => model.clone(),
            "hour" => crate::time::rfc3339(n * 3600)[..13].to_string() + ":00Z",
            "day" => date(day)[..10].to_string(),
            "week" => date(monday_of(day))[..10].to_string(),
            "month" => date(day)[..7].to_string(),
            _ => k.clone(),
        };
        groups.entry(label).or_default().absorb(totals);
    }
    groups.into_iter().collect()
}
