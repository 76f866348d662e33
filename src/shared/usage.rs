//! Usage in Redis: each flush's rows added as one named batch applied at most once, and the
//! totals read back for `usage` and for budgets.

use super::*;

impl Shared {
    pub(super) fn usage_field(key: &RowKey, metric: &str) -> String {
        let row = serde_json::json!([key.1, key.2, key.3]);
        format!("{row}|{metric}")
    }

    /// Adds a batch of usage rows, exactly once per `batch` name even when retried.
    pub fn add_usage(&self, batch: &str, rows: &[(RowKey, Totals)]) -> Result<(), Down> {
        let marker = self.name("batch", batch);
        let mut cmd = eval(USAGE, &[&marker]);
        for (key, t) in rows {
            let hash = self.name("usage", &key.0.to_string());
            let values = [
                t.requests,
                t.errors,
                t.usage.input,
                t.usage.output,
                t.usage.cache_creation,
                t.usage.cache_read,
                t.usage.cache_1h,
                t.cost,
                t.unpriced,
                t.estimated,
            ];
            for (metric, value) in METRICS.iter().zip(values) {
                if value > 0 {
                    let value = value.min(i64::MAX as u64);
                    cmd.arg(&hash)
                        .arg(Self::usage_field(key, metric))
                        .arg(value);
                }
            }
            let tokens = t.usage.total().min(i64::MAX as u64);
            if tokens > 0 {
                cmd.arg(self.name("keytok", &key.0.to_string()))
                    .arg(&key.1)
                    .arg(tokens);
            }
            let nano = t.cost.min(i64::MAX as u64);
            if nano > 0 {
                // By day, and in all (what a total budget reads in one look).
                cmd.arg(self.name("keycost", &key.0.to_string()))
                    .arg(&key.1)
                    .arg(nano);
                cmd.arg(self.name("keycost", "all")).arg(&key.1).arg(nano);
            }
        }
        self.call(|c| cmd.query::<i64>(c)).map(|_| ())
    }

    /// What client key `key` spent on days `from..=to`, as every instance reported it. From
    /// day 0 it is the cost of all time alone (one look; no budget counts tokens of all time).
    pub fn key_spend(&self, key: &str, from: u64, to: u64) -> Result<Spend, Down> {
        let mut pipe = redis::pipe();
        if from == 0 {
            pipe.cmd("HGET").arg(self.name("keycost", "all")).arg(key);
            let nano: Option<u64> = self.call(|c| pipe.query::<(Option<u64>,)>(c))?.0;
            return Ok(Spend {
                tokens: 0,
                nano: nano.unwrap_or(0),
            });
        }
        for day in from..=to {
            let day = day.to_string();
            pipe.cmd("HGET").arg(self.name("keytok", &day)).arg(key);
            pipe.cmd("HGET").arg(self.name("keycost", &day)).arg(key);
        }
        let values: Vec<Option<u64>> = self.call(|c| pipe.query(c))?;
        let mut spend = Spend::default();
        for pair in values.chunks(2) {
            spend.add(Spend {
                tokens: pair[0].unwrap_or(0),
                nano: pair.get(1).copied().flatten().unwrap_or(0),
            });
        }
        Ok(spend)
    }

    /// Every usage row of days `from..=to`, for `llm-gateway usage`.
    pub fn usage_rows(&self, from: u64, to: u64) -> Result<Vec<(RowKey, Totals)>, Down> {
        let pattern = self.name("usage", "*");
        let names: Vec<String> = self.call(|c| {
            let mut names = Vec::new();
            let mut cursor = 0u64;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query(c)?;
                names.extend(batch);
                if next == 0 {
                    return Ok(names);
                }
                cursor = next;
            }
        })?;
        let days: Vec<u64> = names
            .iter()
            .filter_map(|n| n.rsplit(':').next()?.parse().ok())
            .filter(|d| (from..=to).contains(d))
            .collect();
        if days.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for day in &days {
            pipe.cmd("HGETALL")
                .arg(self.name("usage", &day.to_string()));
        }
        let hashes: Vec<std::collections::HashMap<String, u64>> = self.call(|c| pipe.query(c))?;
        let mut rows: std::collections::BTreeMap<RowKey, Totals> = Default::default();
        for (day, hash) in days.iter().zip(hashes) {
            for (field, value) in hash {
                let Some(((key, account, model), metric)) = parse_usage_field(&field) else {
                    continue;
                };
                let t = rows.entry((*day, key, account, model)).or_default();
                let u: &mut Usage = &mut t.usage;
                let slot = match metric {
                    "requests" => &mut t.requests,
                    "errors" => &mut t.errors,
                    "input" => &mut u.input,
                    "output" => &mut u.output,
                    "cache_creation" => &mut u.cache_creation,
                    "cache_read" => &mut u.cache_read,
                    "cache_1h" => &mut u.cache_1h,
                    "cost" => &mut t.cost,
                    "unpriced" => &mut t.unpriced,
                    "estimated" => &mut t.estimated,
                    _ => continue,
                };
                *slot = slot.saturating_add(value);
            }
        }
        Ok(rows.into_iter().collect())
    }
}
