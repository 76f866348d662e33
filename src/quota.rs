//! What an account's answers say of its quota, read from the rate-limit headers Anthropic
//! sends on every answer (200s and 429s alike; see shared/spec, "Rate-limit headers"): the
//! unified windows of subscription accounts (5 h, 7 d and the model-scoped `7d_oi`, each with
//! status, utilization and a reset in Unix seconds; the representative claim; fallback and
//! overage) and the classic per-key limits of API keys (limit, remaining, reset in RFC 3339).
//! Pure: headers in, a `Reading` out; nothing an upstream sends is kept unbounded or unchecked.

use serde::{Deserialize, Serialize};

/// A reading counts this long after the answer it came from, at most.
pub const STALE_AFTER_SECS: u64 = 3600;

/// A window's or the account's overall status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Allowed,
    AllowedWarning,
    Rejected,
}

impl Status {
    fn parse(text: &str) -> Option<Status> {
        match text.trim() {
            "allowed" => Some(Status::Allowed),
            "allowed_warning" => Some(Status::AllowedWarning),
            "rejected" => Some(Status::Rejected),
            _ => None,
        }
    }
}

/// One unified window (`5h`, `7d`, `7d_oi`, `overage`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub status: Option<Status>,
    /// Used, as a fraction (above 1 past the limit).
    pub utilization: Option<f64>,
    /// Unix seconds.
    pub reset: Option<u64>,
}

/// One classic per-key limit (`requests`, `tokens`, `input_tokens`, `output_tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit {
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    /// Unix seconds.
    pub reset: Option<u64>,
}

/// Everything one answer said of the account's quota.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// Unix seconds of the answer it came from.
    pub seen_at: u64,
    pub status: Option<Status>,
    /// The binding window's reset (Unix seconds).
    pub reset: Option<u64>,
    pub five_hour: Option<Window>,
    pub seven_day: Option<Window>,
    /// The model-scoped weekly window (one model family only).
    pub seven_day_oi: Option<Window>,
    pub overage: Option<Window>,
    pub overage_disabled_reason: Option<String>,
    pub representative_claim: Option<String>,
    pub fallback: Option<String>,
    pub fallback_percentage: Option<f64>,
    pub requests: Option<Limit>,
    pub tokens: Option<Limit>,
    pub input_tokens: Option<Limit>,
    pub output_tokens: Option<Limit>,
}

/// A word an upstream header may carry (`five_hour`, `org_spend_cap_reached`): letters, digits
/// and `_-`, 64 bytes at most; anything else is dropped, never stored or shown.
fn word(text: &str) -> Option<String> {
    let text = text.trim();
    let ok = (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    ok.then(|| text.to_string())
}

/// A fraction: finite and not negative; absurd values are held to 100.
fn fraction(text: &str) -> Option<f64> {
    let v: f64 = text.trim().parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some(v.min(100.0))
}

fn unix(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// No window Anthropic reports lasts longer than a week; a reset further than this is a lie
/// and is held to it, so that no clock arithmetic downstream can overflow.
pub const MAX_RESET_AHEAD: u64 = 31 * 86_400;

/// A reset in Unix seconds, held to [`MAX_RESET_AHEAD`] past `now`.
pub fn reset_at(unix_secs: u64, now: u64) -> u64 {
    unix_secs.min(now.saturating_add(MAX_RESET_AHEAD))
}

/// The model family a model-scoped window (`7d_oi`) and a model-scoped rest belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Opus,
    Sonnet,
    Haiku,
    Other,
}

impl Family {
    /// The family of a model, by its name.
    pub fn of(model: &str) -> Family {
        let model = model.to_ascii_lowercase();
        [
            ("opus", Family::Opus),
            ("sonnet", Family::Sonnet),
            ("haiku", Family::Haiku),
        ]
        .into_iter()
        .find(|(name, _)| model.contains(name))
        .map_or(Family::Other, |(_, f)| f)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Family::Opus => "opus",
            Family::Sonnet => "sonnet",
            Family::Haiku => "haiku",
            Family::Other => "other",
        }
    }
}

impl Reading {
    /// Reads the headers of one answer (`header(name)` gives a header's value); `None` when it
    /// carried no rate-limit header at all.
    pub fn from_headers<'a>(header: impl Fn(&str) -> Option<&'a str>, now: u64) -> Option<Reading> {
        let held = |reset| reset_at(reset, now);
        // Static names: this runs on every answer, so no name is built at run time.
        macro_rules! unified {
            ($suffix:literal) => {
                header(concat!("anthropic-ratelimit-unified-", $suffix))
            };
        }
        macro_rules! window {
            ($name:literal) => {{
                let w = Window {
                    status: header(concat!("anthropic-ratelimit-unified-", $name, "-status"))
                        .and_then(Status::parse),
                    utilization: header(concat!(
                        "anthropic-ratelimit-unified-",
                        $name,
                        "-utilization"
                    ))
                    .and_then(fraction),
                    reset: header(concat!("anthropic-ratelimit-unified-", $name, "-reset"))
                        .and_then(unix)
                        .map(held),
                };
                (w.status.is_some() || w.utilization.is_some() || w.reset.is_some()).then_some(w)
            }};
        }
        macro_rules! limit {
            ($name:literal) => {{
                let l = Limit {
                    limit: header(concat!("anthropic-ratelimit-", $name, "-limit")).and_then(unix),
                    remaining: header(concat!("anthropic-ratelimit-", $name, "-remaining"))
                        .and_then(unix),
                    reset: header(concat!("anthropic-ratelimit-", $name, "-reset"))
                        .and_then(crate::time::parse_rfc3339)
                        .map(held),
                };
                (l.limit.is_some() || l.remaining.is_some() || l.reset.is_some()).then_some(l)
            }};
        }
        let reading = Reading {
            seen_at: now,
            status: unified!("status").and_then(Status::parse),
            reset: unified!("reset").and_then(unix).map(held),
            five_hour: window!("5h"),
            seven_day: window!("7d"),
            seven_day_oi: window!("7d_oi"),
            overage: window!("overage"),
            overage_disabled_reason: unified!("overage-disabled-reason").and_then(word),
            representative_claim: unified!("representative-claim").and_then(word),
            fallback: unified!("fallback").and_then(word),
            fallback_percentage: unified!("fallback-percentage").and_then(fraction),
            requests: limit!("requests"),
            tokens: limit!("tokens"),
            input_tokens: limit!("input-tokens"),
            output_tokens: limit!("output-tokens"),
        };
        (reading
            != Reading {
                seen_at: now,
                ..Reading::default()
            })
        .then_some(reading)
    }

    /// What still counts at `now`: nothing after an hour without a fresh reading, and no
    /// window past its reset.
    pub fn current(&self, now: u64) -> Option<Reading> {
        if now > self.seen_at.saturating_add(STALE_AFTER_SECS) {
            return None;
        }
        let live = |w: Option<Window>| w.filter(|w| w.reset.is_none_or(|r| r > now));
        let live_limit = |l: Option<Limit>| l.filter(|l| l.reset.is_none_or(|r| r > now));
        let bound = self.reset.is_none_or(|r| r > now);
        Some(Reading {
            reset: self.reset.filter(|_| bound),
            status: self.status.filter(|_| bound),
            five_hour: live(self.five_hour),
            seven_day: live(self.seven_day),
            seven_day_oi: live(self.seven_day_oi),
            overage: live(self.overage),
            requests: live_limit(self.requests),
            tokens: live_limit(self.tokens),
            input_tokens: live_limit(self.input_tokens),
            output_tokens: live_limit(self.output_tokens),
            ..self.clone()
        })
    }

    /// Whether only the model-scoped window (`7d_oi`) was rejected: the 5 h and 7 d windows
    /// still allow.
    pub fn only_scoped_rejected(&self) -> bool {
        let rejected = |w: Option<Window>| w.is_some_and(|w| w.status == Some(Status::Rejected));
        rejected(self.seven_day_oi) && !rejected(self.five_hour) && !rejected(self.seven_day)
    }

    /// When the limit this reading shows ends (Unix seconds): the binding window's reset,
    /// else the latest reset of a rejected window.
    pub fn limit_reset(&self) -> Option<u64> {
        let rejected = [
            self.five_hour,
            self.seven_day,
            self.seven_day_oi,
            self.overage,
        ]
        .into_iter()
        .flatten()
        .filter(|w| w.status == Some(Status::Rejected))
        .filter_map(|w| w.reset)
        .max();
        self.reset.or(rejected)
    }

    /// The windows by name, for metrics: (`5h`, `7d`, `7d_oi`, `overage`).
    pub fn windows(&self) -> [(&'static str, Option<Window>); 4] {
        [
            ("5h", self.five_hour),
            ("7d", self.seven_day),
            ("7d_oi", self.seven_day_oi),
            ("overage", self.overage),
        ]
    }
}

/// An account's readings: the latest answer's, and the model-scoped window per family as last
/// read for a request of that family. Instances share it through Redis (newer parts win).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Readings {
    pub latest: Option<Reading>,
    /// Per family: the Unix seconds it was read at, and the window.
    pub scoped: std::collections::BTreeMap<Family, (u64, Window)>,
}

impl Readings {
    /// Keeps what an answer to a request of `family` said.
    pub fn observe(&mut self, reading: Reading, family: Family) {
        if let Some(window) = reading.seven_day_oi {
            self.scoped.insert(family, (reading.seen_at, window));
        }
        self.latest = Some(reading);
    }

    /// Takes what another instance read, part by part where it is newer; says whether
    /// anything changed.
    pub fn merge(&mut self, other: Readings) -> bool {
        let mut changed = false;
        if let Some(theirs) = other.latest
            && self
                .latest
                .as_ref()
                .is_none_or(|ours| ours.seen_at < theirs.seen_at)
        {
            self.latest = Some(theirs);
            changed = true;
        }
        for (family, (seen, window)) in other.scoped {
            if self
                .scoped
                .get(&family)
                .is_none_or(|(ours, _)| *ours < seen)
            {
                self.scoped.insert(family, (seen, window));
                changed = true;
            }
        }
        changed
    }

    /// What still counts at `now`: the latest reading (`Reading::current`) and each family's
    /// window until its reset or an hour after it was read.
    pub fn current(
        &self,
        now: u64,
    ) -> (Option<Reading>, std::collections::BTreeMap<Family, Window>) {
        let scoped = (self.scoped.keys())
            .filter_map(|f| Some((*f, self.scoped_window(*f, now)?)))
            .collect();
        (self.latest.as_ref().and_then(|r| r.current(now)), scoped)
    }

    fn scoped_window(&self, family: Family, now: u64) -> Option<Window> {
        let (seen, window) = self.scoped.get(&family)?;
        let fresh = now <= seen.saturating_add(STALE_AFTER_SECS);
        (fresh && window.reset.is_none_or(|r| r > now)).then_some(*window)
    }

    /// Where the account stands for a request of `family` at `now`.
    pub fn standing(&self, policy: &Policy, family: Family, was_over: bool, now: u64) -> Standing {
        let latest = self.latest.as_ref().and_then(|r| r.current(now));
        let scoped = self.scoped_window(family, now);
        policy.standing(latest.as_ref(), scoped.as_ref(), was_over)
    }

    /// Until when (Unix seconds) `family` may not use the account: its model-scoped window
    /// was rejected and has not reset.
    pub fn family_rest(&self, family: Family, now: u64) -> Option<u64> {
        let (seen, window) = self.scoped.get(&family)?;
        let until = window
            .reset
            .unwrap_or(seen.saturating_add(STALE_AFTER_SECS));
        (window.status == Some(Status::Rejected) && until > now).then_some(until)
    }

    /// Whether this differs from `told` (what other instances were told last) in what is
    /// worth a round trip: a status, a reset, a utilization by a point or more.
    pub fn news_since(&self, told: &Readings) -> bool {
        self.gist() != told.gist()
    }

    fn gist(&self) -> Readings {
        let window = |w: Window| Window {
            utilization: w.utilization.map(|u| (u * 100.0).round() / 100.0),
            ..w
        };
        let limit = |l: Limit| Limit {
            remaining: match (l.limit, l.remaining) {
                (Some(limit), Some(left)) if limit > 0 => Some(left.min(limit) * 100 / limit),
                (_, left) => left,
            },
            ..l
        };
        Readings {
            latest: self.latest.as_ref().map(|r| Reading {
                seen_at: 0,
                five_hour: r.five_hour.map(window),
                seven_day: r.seven_day.map(window),
                seven_day_oi: r.seven_day_oi.map(window),
                overage: r.overage.map(window),
                requests: r.requests.map(limit),
                tokens: r.tokens.map(limit),
                input_tokens: r.input_tokens.map(limit),
                output_tokens: r.output_tokens.map(limit),
                ..r.clone()
            }),
            scoped: (self.scoped.iter())
                .map(|(f, (_, w))| (*f, (0, window(*w))))
                .collect(),
        }
    }
}

/// Whether an account may bill beyond its plan (`overage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overage {
    /// No surprise bills: an answer served from extra usage rests the account until the
    /// window resets.
    #[default]
    PlanOnly,
    Allow,
}

impl std::str::FromStr for Overage {
    type Err = String;

    fn from_str(text: &str) -> Result<Overage, String> {
        match text {
            "plan_only" => Ok(Overage::PlanOnly),
            "allow" => Ok(Overage::Allow),
            other => Err(format!("overage is plan_only or allow, not {other:?}")),
        }
    }
}

/// An account's own quota settings (`None`: `balance`'s).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QuotaSettings {
    pub threshold: Option<f64>,
    pub hysteresis: Option<f64>,
    pub hard_stop: Option<bool>,
    pub overage: Option<Overage>,
}

/// How one account is steered by its quota: `balance`'s settings, overridden per account.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// At or above this share used in any window, the account is passed over while another
    /// has headroom.
    pub threshold: f64,
    /// Once passed over, an account serves again below `threshold - hysteresis`.
    pub hysteresis: f64,
    /// Over its threshold, the account never serves (not even when nothing else can).
    pub hard_stop: bool,
    /// A pinned conversation leaves its account at this much used (or when it is refused).
    pub sticky_limit: f64,
    pub overage: Overage,
}

impl crate::config::BalanceSettings {
    /// How `account` is steered by its quota: its own settings over these.
    pub fn policy(&self, account: &crate::config::Account) -> crate::quota::Policy {
        let q = &account.quota;
        let threshold = q.threshold.unwrap_or(self.quota.threshold);
        crate::quota::Policy {
            threshold,
            hysteresis: q.hysteresis.unwrap_or(self.quota.hysteresis).min(threshold),
            hard_stop: q.hard_stop.unwrap_or(self.quota.hard_stop),
            sticky_limit: self.quota.sticky_limit.max(threshold),
            overage: q.overage.unwrap_or(self.quota.overage),
        }
    }
}

/// Where an account stands for one request, by its latest reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Standing {
    /// The busiest window that counts, as a share used (`allowed_warning` counts as the
    /// threshold, `rejected` as 1); 0 with no reading.
    pub used: f64,
    /// At or over its threshold (hysteresis included).
    pub over: bool,
    /// When the busiest window resets (Unix seconds), when known.
    pub reset: Option<u64>,
}

impl Standing {
    pub fn headroom(&self) -> f64 {
        (1.0 - self.used).max(0.0)
    }
}

impl Policy {
    /// Where an account with `reading` (and `scoped`, the request family's `7d_oi` window)
    /// stands; `was_over` says it was passed over last time, for the hysteresis.
    pub fn standing(
        &self,
        reading: Option<&Reading>,
        scoped: Option<&Window>,
        was_over: bool,
    ) -> Standing {
        let (used, reset) = reading.map_or((0.0, None), |r| r.used(scoped, self.threshold));
        let over = used >= self.threshold || (was_over && used >= self.threshold - self.hysteresis);
        Standing { used, over, reset }
    }
}

impl Reading {
    /// The busiest window's share used and its reset: the 5 h and 7 d windows, `scoped` (the
    /// request family's `7d_oi`) and, for API keys, each classic limit's share spent.
    fn used(&self, scoped: Option<&Window>, threshold: f64) -> (f64, Option<u64>) {
        let window = |w: &Window| {
            let u = w.utilization.unwrap_or(0.0);
            let u = match w.status {
                Some(Status::AllowedWarning) => u.max(threshold),
                Some(Status::Rejected) => u.max(1.0),
                _ => u,
            };
            (u, w.reset)
        };
        let limit = |l: &Limit| match (l.limit, l.remaining) {
            (Some(limit), Some(remaining)) if limit > 0 => {
                (1.0 - (remaining.min(limit) as f64 / limit as f64), l.reset)
            }
            _ => (0.0, None),
        };
        let windows = [self.five_hour.as_ref(), self.seven_day.as_ref(), scoped];
        let any_status = windows.iter().flatten().any(|w| w.status.is_some());
        // The overall status speaks for the windows only when none of them says its own.
        let overall = match self.status.filter(|_| !any_status) {
            Some(Status::AllowedWarning) => (threshold, self.reset),
            Some(Status::Rejected) => (1.0, self.reset),
            _ => (0.0, None),
        };
        windows
            .into_iter()
            .flatten()
            .map(window)
            .chain(
                [
                    self.requests,
                    self.tokens,
                    self.input_tokens,
                    self.output_tokens,
                ]
                .iter()
                .flatten()
                .map(limit),
            )
            .fold(
                overall,
                |busiest, next| if next.0 > busiest.0 { next } else { busiest },
            )
    }

    /// Whether the answer was served beyond the plan (an `…_overage_included` claim, or a
    /// plan window past its limit yet not rejected), and until when that lasts: the claimed
    /// window's reset, else the binding one's.
    pub fn in_overage(&self) -> Option<Option<u64>> {
        let claim = self.representative_claim.as_deref().unwrap_or("");
        let past = |w: &Option<Window>| {
            w.filter(|w| {
                w.utilization.is_some_and(|u| u >= 1.0) && w.status != Some(Status::Rejected)
            })
        };
        let claimed = match claim {
            "five_hour_overage_included" => Some(self.five_hour),
            "seven_day_overage_included" => Some(self.seven_day),
            c if c.ends_with("_overage_included") => Some(None),
            _ => None,
        };
        let window = match claimed {
            Some(w) => w,
            None => Some(past(&self.five_hour).or(past(&self.seven_day))?),
        };
        Some(window.and_then(|w| w.reset).or(self.reset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(headers: &[(&str, &str)], now: u64) -> Option<Reading> {
        Reading::from_headers(
            |name| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| *v),
            now,
        )
    }

    #[test]
    fn unified_and_classic_headers_are_read() {
        let r = read(
            &[
                ("anthropic-ratelimit-unified-status", "allowed_warning"),
                ("anthropic-ratelimit-unified-5h-status", "allowed"),
                ("anthropic-ratelimit-unified-5h-utilization", "0.05"),
                ("anthropic-ratelimit-unified-5h-reset", "1784607600"),
                ("anthropic-ratelimit-unified-7d-status", "allowed_warning"),
                ("anthropic-ratelimit-unified-7d-utilization", "0.91"),
                ("anthropic-ratelimit-unified-7d_oi-status", "rejected"),
                (
                    "anthropic-ratelimit-unified-representative-claim",
                    "seven_day",
                ),
                ("anthropic-ratelimit-unified-fallback-percentage", "0.5"),
                (
                    "anthropic-ratelimit-unified-overage-disabled-reason",
                    "org_spend_cap_reached",
                ),
                ("anthropic-ratelimit-requests-limit", "4000"),
                ("anthropic-ratelimit-requests-remaining", "3999"),
                ("anthropic-ratelimit-requests-reset", "2026-07-14T18:00:00Z"),
                ("anthropic-ratelimit-tokens-remaining", "78000"),
                (
                    "anthropic-ratelimit-input-tokens-reset",
                    "9999-12-31T00:00:00Z",
                ),
            ],
            1_784_000_000,
        )
        .expect("a reading");
        assert_eq!(r.status, Some(Status::AllowedWarning));
        let five = r.five_hour.expect("5h");
        assert_eq!(
            (five.status, five.utilization, five.reset),
            (Some(Status::Allowed), Some(0.05), Some(1_784_607_600))
        );
        assert_eq!(r.seven_day.and_then(|w| w.utilization), Some(0.91));
        assert_eq!(
            r.seven_day_oi.and_then(|w| w.status),
            Some(Status::Rejected)
        );
        assert_eq!(r.representative_claim.as_deref(), Some("seven_day"));
        assert_eq!(r.fallback_percentage, Some(0.5));
        assert_eq!(
            r.overage_disabled_reason.as_deref(),
            Some("org_spend_cap_reached")
        );
        let requests = r.requests.expect("requests");
        assert_eq!(
            (requests.limit, requests.remaining),
            (Some(4000), Some(3999))
        );
        assert_eq!(
            requests.reset,
            crate::time::parse_rfc3339("2026-07-14T18:00:00Z")
        );
        assert_eq!(
            r.input_tokens.and_then(|l| l.reset),
            Some(1_784_000_000 + MAX_RESET_AHEAD),
            "a reset past any window is held to a month"
        );
        assert_eq!(r.tokens.and_then(|t| t.remaining), Some(78_000));
    }

    #[test]
    fn nothing_forged_or_absurd_is_kept() {
        assert_eq!(read(&[("content-type", "application/json")], 1), None);
        let r = read(
            &[
                ("anthropic-ratelimit-unified-status", "ALLOWED; drop table"),
                ("anthropic-ratelimit-unified-5h-utilization", "NaN"),
                ("anthropic-ratelimit-unified-7d-utilization", "-1"),
                ("anthropic-ratelimit-unified-7d_oi-utilization", "1e300"),
                (
                    "anthropic-ratelimit-unified-representative-claim",
                    "five hour <script>",
                ),
                ("anthropic-ratelimit-requests-remaining", "lots"),
                ("anthropic-ratelimit-unified-5h-reset", "soon"),
                (
                    "anthropic-ratelimit-unified-7d_oi-reset",
                    "99999999999999999999999",
                ),
            ],
            1,
        )
        .expect("one value still parses");
        assert_eq!(r.status, None);
        assert!(r.five_hour.is_none() && r.seven_day.is_none() && r.requests.is_none());
        assert_eq!(r.seven_day_oi.and_then(|w| w.utilization), Some(100.0));
        assert_eq!(r.representative_claim, None);
    }

    #[test]
    fn models_fall_into_their_family() {
        assert_eq!(Family::of("claude-opus-4-6"), Family::Opus);
        assert_eq!(Family::of("claude-sonnet-4-5-20250929"), Family::Sonnet);
        assert_eq!(Family::of("Claude-Haiku-4-5"), Family::Haiku);
        assert_eq!(Family::of("gpt-4o"), Family::Other);
    }

    #[test]
    fn a_reading_stops_counting_at_its_reset_or_after_an_hour() {
        let r = read(
            &[
                ("anthropic-ratelimit-unified-5h-utilization", "0.95"),
                ("anthropic-ratelimit-unified-5h-reset", "2000"),
                ("anthropic-ratelimit-unified-7d-utilization", "0.5"),
                ("anthropic-ratelimit-unified-7d-reset", "900000"),
            ],
            1_000,
        )
        .expect("a reading");
        let now = r.current(1_500).expect("fresh");
        assert!(now.five_hour.is_some() && now.seven_day.is_some());
        let later = r.current(2_500).expect("still within the hour");
        assert!(later.five_hour.is_none(), "past its reset");
        assert!(later.seven_day.is_some());
        assert_eq!(
            r.current(1_000 + STALE_AFTER_SECS + 1),
            None,
            "an hour without traffic"
        );
    }

    const POLICY: Policy = Policy {
        threshold: 0.9,
        hysteresis: 0.05,
        hard_stop: false,
        sticky_limit: 0.98,
        overage: Overage::PlanOnly,
    };

    #[test]
    fn the_busiest_window_decides_and_hysteresis_holds_an_account_out() {
        let r = read(
            &[
                ("anthropic-ratelimit-unified-5h-utilization", "0.3"),
                ("anthropic-ratelimit-unified-7d-utilization", "0.88"),
                ("anthropic-ratelimit-unified-7d-reset", "5000"),
            ],
            1,
        );
        let s = POLICY.standing(r.as_ref(), None, false);
        assert_eq!((s.used, s.over, s.reset), (0.88, false, Some(5000)));
        assert!(
            POLICY.standing(r.as_ref(), None, true).over,
            "passed over: back below 0.85"
        );
        let scoped = Window {
            status: Some(Status::Rejected),
            utilization: None,
            reset: Some(7000),
        };
        let s = POLICY.standing(r.as_ref(), Some(&scoped), false);
        assert_eq!((s.used, s.over, s.reset), (1.0, true, Some(7000)));
        assert_eq!(
            POLICY.standing(None, None, true).used,
            0.0,
            "no reading: full headroom"
        );
        // allowed_warning counts as the threshold.
        let warned = read(
            &[("anthropic-ratelimit-unified-5h-status", "allowed_warning")],
            1,
        );
        assert!(POLICY.standing(warned.as_ref(), None, false).over);
        let overall = read(
            &[("anthropic-ratelimit-unified-status", "allowed_warning")],
            1,
        );
        assert!(POLICY.standing(overall.as_ref(), None, false).over);
    }

    #[test]
    fn api_keys_near_their_remaining_zero_are_over() {
        let r = read(
            &[
                ("anthropic-ratelimit-requests-limit", "50"),
                ("anthropic-ratelimit-requests-remaining", "4"),
                ("anthropic-ratelimit-tokens-limit", "100000"),
                ("anthropic-ratelimit-tokens-remaining", "60000"),
            ],
            1,
        );
        let s = POLICY.standing(r.as_ref(), None, false);
        assert!(s.over && (s.used - 0.92).abs() < 1e-9, "{s:?}");
        let r = read(
            &[
                ("anthropic-ratelimit-requests-limit", "50"),
                ("anthropic-ratelimit-requests-remaining", "49"),
            ],
            1,
        );
        assert!(!POLICY.standing(r.as_ref(), None, false).over);
    }

    #[test]
    fn overage_is_the_claim_or_a_plan_window_past_its_limit() {
        let claimed = read(
            &[
                (
                    "anthropic-ratelimit-unified-representative-claim",
                    "five_hour_overage_included",
                ),
                ("anthropic-ratelimit-unified-5h-reset", "9000"),
                ("anthropic-ratelimit-unified-reset", "8000"),
            ],
            1,
        )
        .expect("reading");
        assert_eq!(claimed.in_overage(), Some(Some(9000)));
        let past = read(
            &[
                ("anthropic-ratelimit-unified-7d-utilization", "1.02"),
                ("anthropic-ratelimit-unified-7d-status", "allowed"),
                ("anthropic-ratelimit-unified-7d-reset", "6000"),
            ],
            1,
        )
        .expect("reading");
        assert_eq!(past.in_overage(), Some(Some(6000)));
        let plain = read(
            &[
                (
                    "anthropic-ratelimit-unified-representative-claim",
                    "five_hour",
                ),
                ("anthropic-ratelimit-unified-5h-utilization", "0.99"),
            ],
            1,
        )
        .expect("reading");
        assert_eq!(plain.in_overage(), None);
    }
}
