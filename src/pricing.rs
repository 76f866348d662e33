//! What tokens cost: a price table of rows (a model id or a prefix of one, its five rates and
//! an optional long-context tier), the embedded list prices with the `pricing:` rows of the
//! config over them, and the cost of one request in whole nano-USD.
//!
//! Money is integers: a price of $X per million tokens is `X × 1000` nano-USD per token, a
//! whole number for every list price (the smallest step a row may use is $0.001 per million),
//! so a cost is a sum of products and nothing rounds.

use serde::Serialize;

use crate::usage::Usage;

/// Nano-USD in a dollar.
pub const NANO: u64 = 1_000_000_000;

/// When the embedded prices were taken, and from where.
pub const DATE: &str = "2026-07";
pub const SOURCE: &str = "Anthropic list prices, as mirrored by peers in 2026-07 \
     (shared/spec/anthropic-upstream.md); long-context tier from Anthropic's pricing page";

/// The pattern of a row that prices every model no other row matches.
pub const FALLBACK: &str = "*";

/// Nano-USD per token of each kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rates {
    pub input: u64,
    pub cache_write_5m: u64,
    pub cache_write_1h: u64,
    pub cache_read: u64,
    pub output: u64,
}

impl Rates {
    /// From thousandths of a dollar per million tokens, which are nano-USD per token.
    pub const fn new(input: u64, w5: u64, w1: u64, read: u64, output: u64) -> Rates {
        Rates {
            input,
            cache_write_5m: w5,
            cache_write_1h: w1,
            cache_read: read,
            output,
        }
    }

    /// What `usage` costs at these rates, held at u64::MAX (18 billion dollars): an upstream's
    /// absurd counts cost the most, never nothing.
    fn cost(&self, u: &Usage) -> u64 {
        let write_1h = u.cache_1h.min(u.cache_creation);
        let write_5m = u.cache_creation - write_1h;
        [
            (u.input, self.input),
            (write_5m, self.cache_write_5m),
            (write_1h, self.cache_write_1h),
            (u.cache_read, self.cache_read),
            (u.output, self.output),
        ]
        .iter()
        .fold(0u64, |sum, (tokens, rate)| {
            sum.saturating_add(tokens.saturating_mul(*rate))
        })
    }
}

/// Higher rates for a request whose input (input, cache writes and cache reads) passes
/// `above` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Tier {
    pub above: u64,
    pub rates: Rates,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    /// A model id, or a prefix of one (`claude-sonnet-4-5` matches `claude-sonnet-4-5-20250929`);
    /// `*` matches every model.
    pub model: String,
    #[serde(flatten)]
    pub rates: Rates,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub long_context: Option<Tier>,
}

/// What one request cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cost {
    /// Nano-USD; `estimated` when the answer did not say which cache writes were 1-hour ones
    /// (all are priced at the 5-minute rate).
    Priced { nano: u64, estimated: bool },
    /// No row matches the model: never counted as $0.
    Unpriced,
}

impl Cost {
    pub fn nano(&self) -> Option<u64> {
        match self {
            Cost::Priced { nano, .. } => Some(*nano),
            Cost::Unpriced => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Longest pattern first, the fallback last: the first row that matches wins.
    rows: Vec<Row>,
}

impl Default for Table {
    fn default() -> Table {
        Table::new(Vec::new())
    }
}

impl Table {
    /// The embedded rows with `rows` over them: a row whose pattern is an embedded row's
    /// replaces it whole.
    pub fn new(rows: Vec<Row>) -> Table {
        let mut all: Vec<Row> = embedded()
            .into_iter()
            .filter(|e| !rows.iter().any(|r| r.model == e.model))
            .collect();
        all.extend(rows);
        all.sort_by(|a, b| {
            let rank = |r: &Row| (r.model == FALLBACK, std::cmp::Reverse(r.model.len()));
            rank(a).cmp(&rank(b)).then_with(|| a.model.cmp(&b.model))
        });
        Table { rows: all }
    }

    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    /// The row that prices `model`: an exact id or the longest prefix, else the fallback.
    pub fn row(&self, model: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.model == FALLBACK || model.starts_with(r.model.as_str()))
    }

    /// What `usage` of `model` cost. A request that used no token cost nothing, priced or not.
    pub fn cost(&self, model: &str, usage: &Usage) -> Cost {
        if usage.total() == 0 {
            return Cost::Priced {
                nano: 0,
                estimated: false,
            };
        }
        let Some(row) = self.row(model) else {
            return Cost::Unpriced;
        };
        let rates = row.rates_for(
            usage
                .input
                .saturating_add(usage.cache_creation)
                .saturating_add(usage.cache_read),
        );
        Cost::Priced {
            nano: rates.cost(usage),
            estimated: usage.cache_creation > 0 && !usage.cache_split,
        }
    }

    /// What a request may cost at most before it is answered, to reserve against USD
    /// budgets: `input` tokens at the input rate, `output` at the output rate, each at the
    /// tier the input reaches. `None` when no row prices the model.
    pub fn estimate(&self, model: &str, input: u64, output: u64) -> Option<u64> {
        let rates = self.row(model)?.rates_for(input);
        Some(
            input
                .saturating_mul(rates.input)
                .saturating_add(output.saturating_mul(rates.output)),
        )
    }
}

impl Row {
    fn rates_for(&self, input: u64) -> &Rates {
        match &self.long_context {
            Some(tier) if input > tier.above => &tier.rates,
            _ => &self.rates,
        }
    }
}

/// Dollars as text with `places` decimals (`usd(1_234_500_000, 6)` is `1.234500`), exact.
pub fn usd(nano: u64, places: usize) -> String {
    let places = places.min(9);
    let whole = nano / NANO;
    let frac = format!("{:09}", nano % NANO);
    if places == 0 {
        return whole.to_string();
    }
    format!("{whole}.{}", &frac[..places])
}

/// Exact dollars from decimal text (`"12.50"`, `"0.000001"`): nano-USD; `None` for anything
/// else (a sign, an exponent, more than nine decimals, more than u64).
pub fn parse_usd(text: &str) -> Option<u64> {
    let text = text.trim().trim_start_matches('$');
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !digits(whole) || !digits(frac) || frac.len() > 9 {
        return None;
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let frac: u64 = format!("{frac:0<9}").parse().ok()?;
    whole.checked_mul(NANO)?.checked_add(frac)
}

/// A price in USD per million tokens, as a YAML number: nano-USD per token, when it is a whole
/// number of those (a multiple of $0.001 per million).
pub fn per_million(usd: f64) -> Option<u64> {
    // Rust prints the shortest text that reads back as the same f64: the number as written.
    let nano_per_million = parse_usd(&format!("{usd}"))?;
    (nano_per_million % 1_000_000 == 0).then_some(nano_per_million / 1_000_000)
}

/// The list prices (`shared/spec/anthropic-upstream.md`), in thousandths of a dollar per
/// million tokens: input, 5-minute cache write, 1-hour cache write, cache read, output.
fn embedded() -> Vec<Row> {
    let row = |model: &str, rates: Rates, long_context: Option<Tier>| Row {
        model: model.to_string(),
        rates,
        long_context,
    };
    // Opus 4.5 and later (4.6, 5, …): `claude-opus-4` and `claude-opus-5`; Opus 4 and 4.1 by
    // their own ids, which are longer and so win.
    let opus = Rates::new(5_000, 6_250, 10_000, 500, 25_000);
    let opus_4 = Rates::new(15_000, 18_750, 30_000, 1_500, 75_000);
    let sonnet_4 = Rates::new(3_000, 3_750, 6_000, 300, 15_000);
    let sonnet_4_long = Tier {
        above: 200_000,
        rates: Rates::new(6_000, 7_500, 12_000, 600, 22_500),
    };
    let sonnet_5 = Rates::new(2_000, 2_500, 4_000, 200, 10_000);
    let haiku = Rates::new(1_000, 1_250, 2_000, 100, 5_000);
    // Older models still served, at their list prices (the same ratios).
    let haiku_3_5 = Rates::new(800, 1_000, 1_600, 80, 4_000);
    let haiku_3 = Rates::new(250, 300, 500, 30, 1_250);
    vec![
        row("claude-3-opus", opus_4, None),
        row("claude-3-7-sonnet", sonnet_4, None),
        row("claude-3-5-sonnet", sonnet_4, None),
        row("claude-3-5-haiku", haiku_3_5, None),
        row("claude-3-haiku", haiku_3, None),
        row("claude-opus-5", opus, None),
        row("claude-opus-4", opus, None),
        row("claude-opus-4-20250514", opus_4, None),
        row("claude-opus-4-0", opus_4, None),
        row("claude-opus-4-1", opus_4, None),
        row("claude-sonnet-4", sonnet_4, Some(sonnet_4_long)),
        row("claude-sonnet-5", sonnet_5, None),
        row("claude-haiku-4-5", haiku, None),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(input: u64, w5: u64, w1: u64, read: u64, output: u64) -> Usage {
        Usage {
            input,
            output,
            cache_creation: w5 + w1,
            cache_read: read,
            cache_1h: w1,
            cache_split: true,
        }
    }

    #[test]
    fn each_kind_is_priced_at_its_rate_for_three_models() {
        let table = Table::default();
        // One million of each kind: the row's five prices, summed, in nano-USD.
        let m = 1_000_000;
        let each = usage(m, m, m, m, m);
        for (model, dollars) in [
            // 5 + 6.25 + 10 + 0.50 + 25
            ("claude-opus-4-6", 46_750_000_000u64),
            // 3 + 3.75 + 6 + 0.30 + 15, at the long-context tier: input is 3 M tokens
            ("claude-sonnet-4-5-20250929", 48_600_000_000),
            // 1 + 1.25 + 2 + 0.10 + 5
            ("claude-haiku-4-5-20251001", 9_350_000_000),
        ] {
            assert_eq!(table.cost(model, &each).nano(), Some(dollars), "{model}");
        }
        // Kind by kind, under the tier: 1,000 input tokens of Sonnet are $0.003.
        let sonnet = "claude-sonnet-4-5";
        let one = |u: Usage| table.cost(sonnet, &u).nano();
        assert_eq!(one(usage(1_000, 0, 0, 0, 0)), Some(3_000_000));
        assert_eq!(one(usage(0, 1_000, 0, 0, 0)), Some(3_750_000));
        assert_eq!(one(usage(0, 0, 1_000, 0, 0)), Some(6_000_000));
        assert_eq!(one(usage(0, 0, 0, 1_000, 0)), Some(300_000));
        assert_eq!(one(usage(0, 0, 0, 0, 1_000)), Some(15_000_000));
        // Opus 4.1 keeps its own, older price.
        assert_eq!(
            table
                .cost("claude-opus-4-1-20250805", &usage(0, 0, 0, 0, 1))
                .nano(),
            Some(75_000)
        );
    }

    #[test]
    fn the_long_context_tier_starts_past_its_threshold_counting_cache() {
        let table = Table::default();
        let at = |input, read| table.cost("claude-sonnet-4-5", &usage(input, 0, 0, read, 0));
        assert_eq!(at(200_000, 0).nano(), Some(600_000_000), "at 200k: base");
        // 100k input + 100,001 cache read passes 200k: both at the tier's rates.
        assert_eq!(
            at(100_000, 100_001).nano(),
            Some(100_000 * 6_000 + 100_001 * 600)
        );
    }

    #[test]
    fn writes_without_the_split_are_priced_at_five_minutes_and_estimated() {
        let table = Table::default();
        let mut u = usage(0, 1_000, 0, 0, 0);
        u.cache_split = false;
        assert_eq!(
            table.cost("claude-haiku-4-5", &u),
            Cost::Priced {
                nano: 1_250_000,
                estimated: true
            }
        );
    }

    #[test]
    fn unknown_models_are_unpriced_unless_a_fallback_row_prices_them() {
        let u = usage(10, 0, 0, 0, 10);
        assert_eq!(Table::default().cost("gpt-4o", &u), Cost::Unpriced);
        assert_eq!(
            Table::default().cost("gpt-4o", &Usage::default()).nano(),
            Some(0),
            "no tokens, no cost"
        );
        let fallback = Row {
            model: FALLBACK.into(),
            rates: Rates::new(1_000, 0, 0, 0, 1_000),
            long_context: None,
        };
        let table = Table::new(vec![fallback]);
        assert_eq!(table.cost("gpt-4o", &u).nano(), Some(20_000));
        assert_eq!(
            table.cost("claude-haiku-4-5", &u).nano(),
            Some(60_000),
            "the fallback is last"
        );
    }

    #[test]
    fn a_config_row_replaces_the_embedded_row_of_its_pattern_whole() {
        let cheap = Row {
            model: "claude-sonnet-4".into(),
            rates: Rates::new(1_000, 1_000, 1_000, 1_000, 1_000),
            long_context: None,
        };
        let table = Table::new(vec![cheap.clone()]);
        assert_eq!(table.row("claude-sonnet-4-5"), Some(&cheap));
        let big = usage(300_000, 0, 0, 0, 0);
        assert_eq!(
            table.cost("claude-sonnet-4-5", &big).nano(),
            Some(300_000_000),
            "no tier left"
        );
        // A longer pattern of its own wins over the embedded prefix.
        let exact = Row {
            model: "claude-sonnet-4-5-20250929".into(),
            ..cheap
        };
        let table = Table::new(vec![exact]);
        assert_eq!(
            table
                .row("claude-sonnet-4-5-20250929")
                .map(|r| r.rates.input),
            Some(1_000)
        );
        assert_eq!(
            table.row("claude-sonnet-4-6").map(|r| r.rates.input),
            Some(3_000)
        );
    }

    #[test]
    fn dollars_are_read_and_written_exactly() {
        assert_eq!(parse_usd("12.50"), Some(12_500_000_000));
        assert_eq!(parse_usd("$0.000000001"), Some(1));
        assert_eq!(parse_usd(".5"), Some(500_000_000));
        for bad in [
            "",
            ".",
            "-1",
            "1e3",
            "1.0000000001",
            "abc",
            "99999999999999999999",
        ] {
            assert_eq!(parse_usd(bad), None, "{bad:?}");
        }
        assert_eq!(usd(1_234_500_000, 6), "1.234500");
        assert_eq!(usd(7, 9), "0.000000007");
        assert_eq!(per_million(3.75), Some(3_750));
        assert_eq!(per_million(0.3), Some(300));
        assert_eq!(per_million(22.5), Some(22_500));
        assert_eq!(per_million(0.0001), None, "finer than $0.001 per million");
    }
}
