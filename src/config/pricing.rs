//! The `pricing:` section: config rows over the embedded price table, each price checked to be
//! a whole number of nano-USD a token, the cache prices left out derived from Anthropic's
//! ratios.

use super::RawPrice;

/// The `pricing:` rows over the embedded table. A price is USD per million tokens, in steps
/// of $0.001 (whole nano-USD per token).
pub(super) fn table(rows: &[RawPrice]) -> Result<crate::pricing::Table, String> {
    use crate::pricing::{Rates, Row, Tier};
    let mut out: Vec<Row> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let at = format!("pricing[{i}] ({})", r.model);
        if r.model.is_empty() || r.model.len() > 128 || r.model.chars().any(char::is_control) {
            return Err(format!(
                "pricing[{i}]: model must be a model id, a prefix of one, or *"
            ));
        }
        if out.iter().any(|o| o.model == r.model) {
            return Err(format!("{at}: a second row for the same model"));
        }
        let price = |what: &str, v: f64| {
            crate::pricing::per_million(v).ok_or_else(|| {
                format!("{at}: {what} {v} is not a price in USD per million tokens (0 or more, in steps of 0.001)")
            })
        };
        // The cache prices left out follow Anthropic's ratios, in whole nano-dollars a token
        // (rounded to the nearest).
        let rates =
            |input: f64, output: f64, w5: Option<f64>, w1: Option<f64>, read: Option<f64>| {
                let base = price("input", input)?;
                let or = |given: Option<f64>, what: &str, (times, per): (u64, u64)| match given {
                    Some(v) => price(what, v),
                    None => Ok((base.saturating_mul(times) + per / 2) / per),
                };
                Ok::<_, String>(Rates {
                    input: base,
                    output: price("output", output)?,
                    cache_write_5m: or(w5, "cache_write_5m", (5, 4))?,
                    cache_write_1h: or(w1, "cache_write_1h", (2, 1))?,
                    cache_read: or(read, "cache_read", (1, 10))?,
                })
            };
        let long_context = match &r.long_context {
            None => None,
            Some(t) => Some(Tier {
                above: t.above,
                rates: rates(
                    t.input,
                    t.output,
                    t.cache_write_5m,
                    t.cache_write_1h,
                    t.cache_read,
                )?,
            }),
        };
        out.push(Row {
            model: r.model.clone(),
            rates: rates(
                r.input,
                r.output,
                r.cache_write_5m,
                r.cache_write_1h,
                r.cache_read,
            )?,
            long_context,
        });
    }
    Ok(crate::pricing::Table::new(out))
}
