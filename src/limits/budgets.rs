//! A key's budgets, tokens and dollars: each is one `Budget` of a `Period` (day, week from
//! Monday, month, all time, UTC), what the ledger says was spent in each (`Spent`), the
//! refusal that names the budget, its spend and its reset, and what is left of each.

use super::Refusal;
use crate::config::KeyLimits;
use crate::ledger::Ledger;
use crate::usage::Spend;

/// The periods a budget counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Period {
    Day,
    Week,
    Month,
    Total,
}

/// One budget of a key: its period, whether it counts dollars (else tokens), its limit.
#[derive(Debug, Clone, Copy)]
pub(super) struct Budget {
    period: Period,
    usd: bool,
    limit: u64,
}

impl KeyLimits {
    /// Its budgets, tokens first.
    pub(super) fn budgets(&self) -> impl Iterator<Item = Budget> {
        let b = |period, usd, limit: Option<u64>| limit.map(|limit| Budget { period, usd, limit });
        [
            b(Period::Day, false, self.daily_tokens),
            b(Period::Month, false, self.monthly_tokens),
            b(Period::Day, true, self.daily_usd),
            b(Period::Week, true, self.weekly_usd),
            b(Period::Month, true, self.monthly_usd),
            b(Period::Total, true, self.total_usd),
        ]
        .into_iter()
        .flatten()
    }

    pub fn has_usd_budget(&self) -> bool {
        self.budgets().any(|b| b.usd)
    }
}

/// What a key has spent in each period, as the ledger says, at one moment.
pub(super) struct Spent {
    now: u64,
    day: Spend,
    week: Spend,
    month: Spend,
    total: Spend,
}

/// The first day (since 1970) of each period at `now`, and when it ends (Unix seconds; none
/// for all time).
fn period(p: Period, now: u64) -> (u64, Option<u64>) {
    let today = now / 86_400;
    match p {
        Period::Day => (today, Some((today + 1) * 86_400)),
        Period::Week => {
            let monday = crate::usage::monday_of(today);
            (monday, Some((monday + 7) * 86_400))
        }
        Period::Month => {
            let (first, next) = crate::usage::first_day_of_month(now);
            (first, Some(next * 86_400))
        }
        Period::Total => (0, None),
    }
}

impl Spent {
    pub(super) fn read(limits: &KeyLimits, key: &str, ledger: &Ledger) -> Spent {
        let now = crate::time::now_unix();
        let mut spent = Spent {
            now,
            day: Spend::default(),
            week: Spend::default(),
            month: Spend::default(),
            total: Spend::default(),
        };
        let mut read: Vec<Period> = Vec::new();
        for b in limits.budgets() {
            if !read.contains(&b.period) {
                read.push(b.period);
                *spent.of(b.period) = ledger.spent_since(key, period(b.period, now).0);
            }
        }
        spent
    }

    fn of(&mut self, p: Period) -> &mut Spend {
        match p {
            Period::Day => &mut self.day,
            Period::Week => &mut self.week,
            Period::Month => &mut self.month,
            Period::Total => &mut self.total,
        }
    }

    fn used(&self, b: &Budget) -> u64 {
        let spend = match b.period {
            Period::Day => self.day,
            Period::Week => self.week,
            Period::Month => self.month,
            Period::Total => self.total,
        };
        if b.usd { spend.nano } else { spend.tokens }
    }

    /// What is left of the tightest budget of each unit (u64::MAX without one).
    pub(super) fn left(&self, limits: &KeyLimits) -> Spend {
        let mut left = Spend {
            tokens: u64::MAX,
            nano: u64::MAX,
        };
        for b in limits.budgets() {
            let rest = b.limit.saturating_sub(self.used(&b));
            let slot = if b.usd {
                &mut left.nano
            } else {
                &mut left.tokens
            };
            *slot = (*slot).min(rest);
        }
        left
    }

    /// What is left of each budget, for the key holder's usage endpoint.
    pub(super) fn report(&self, limits: &KeyLimits) -> Vec<Left> {
        (limits.budgets())
            .map(|b| Left {
                name: b.name(),
                limit: b.limit,
                used: self.used(&b),
                resets_at: period(b.period, self.now).1,
            })
            .collect()
    }

    /// Refuses when what is spent, plus what requests in flight have reserved, reaches a
    /// budget.
    pub(super) fn check(&self, limits: &KeyLimits, reserved: Spend) -> Result<(), Refusal> {
        for b in limits.budgets() {
            let used = self.used(&b);
            let held = if b.usd {
                reserved.nano
            } else {
                reserved.tokens
            };
            if used.saturating_add(held) < b.limit {
                continue;
            }
            let amount = |n: u64| b.amount(n);
            let spent = if held == 0 {
                format!("{} used", amount(used))
            } else {
                format!(
                    "{} used, {} reserved by requests in flight",
                    amount(used),
                    amount(held)
                )
            };
            let ends = period(b.period, self.now).1;
            let when = match ends {
                Some(at) => format!("it resets at {}", crate::time::rfc3339(at)),
                None => "it does not reset; an admin can raise it (update-client-key --total-usd)"
                    .to_string(),
            };
            return Err(Refusal::Budget {
                message: format!(
                    "this gateway key used its {} of {} ({spent}); {when}",
                    b.described(),
                    amount(b.limit)
                ),
                retry_after: ends.map(|at| at.saturating_sub(self.now).max(1)),
            });
        }
        Ok(())
    }
}

impl Budget {
    /// `daily_usd`, `monthly_tokens`, …: its name in config and in the usage endpoint.
    fn name(&self) -> &'static str {
        match (self.period, self.usd) {
            (Period::Day, false) => "daily_tokens",
            (Period::Month, false) => "monthly_tokens",
            (Period::Week, false) => "weekly_tokens",
            (Period::Total, false) => "total_tokens",
            (Period::Day, true) => "daily_usd",
            (Period::Week, true) => "weekly_usd",
            (Period::Month, true) => "monthly_usd",
            (Period::Total, true) => "total_usd",
        }
    }

    /// `daily USD budget`, `monthly token budget`, … as a refusal names it.
    fn described(&self) -> String {
        let period = match self.period {
            Period::Day => "daily",
            Period::Week => "weekly",
            Period::Month => "monthly",
            Period::Total => "total",
        };
        let unit = if self.usd { "USD" } else { "token" };
        format!("{period} {unit} budget")
    }

    fn amount(&self, n: u64) -> String {
        if self.usd {
            format!("${}", crate::pricing::usd(n, 6))
        } else {
            format!("{n} tokens")
        }
    }
}

/// One budget's standing, as the key holder's endpoint reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Left {
    pub name: &'static str,
    /// Tokens, or nano-USD for a `_usd` budget.
    pub limit: u64,
    pub used: u64,
    /// Unix seconds; none for a total budget.
    pub resets_at: Option<u64>,
}

/// What a request may cost, reserved against its key's budgets until it is metered.
#[derive(Debug, Clone, Copy)]
pub struct Estimate<'a> {
    pub model: Option<&'a str>,
    pub tokens: u64,
    /// `None`: no price row matches the model.
    pub nano: Option<u64>,
}
