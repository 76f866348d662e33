//! What an account's answers say of its quota, read from the rate-limit headers Anthropic
//! sends on every answer (200s and 429s alike; see shared/spec, "Rate-limit headers"): the
//! unified windows of subscription accounts (5 h, 7 d and the model-scoped `7d_oi`, each with
//! status, utilization and a reset in Unix seconds; the representative claim; fallback and
//! overage) and the classic per-key limits of API keys (limit, remaining, reset in RFC 3339).
//! Pure: headers in, a `Reading` out; nothing an upstream sends is kept unbounded or unchecked.

use serde::Serialize;

/// A reading counts this long after the answer it came from, at most.
pub const STALE_AFTER_SECS: u64 = 3600;

/// A window's or the account's overall status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Window {
    pub status: Option<Status>,
    /// Used, as a fraction (above 1 past the limit).
    pub utilization: Option<f64>,
    /// Unix seconds.
    pub reset: Option<u64>,
}

/// One classic per-key limit (`requests`, `tokens`, `input_tokens`, `output_tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limit {
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    /// Unix seconds.
    pub reset: Option<u64>,
}

/// Everything one answer said of the account's quota.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Reading {
    /// Unix seconds of the answer it came from.
    pub seen_at: u64,
    pub status: Option<Status>,
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

/// The model family a model-scoped window (`7d_oi`) belongs to, from the model's name.
pub fn family(model: &str) -> &'static str {
    let model = model.to_ascii_lowercase();
    ["opus", "sonnet", "haiku"]
        .into_iter()
        .find(|f| model.contains(f))
        .unwrap_or("other")
}

impl Reading {
    /// Reads the headers of one answer (`header(name)` gives a header's value); `None` when it
    /// carried no rate-limit header at all.
    pub fn from_headers<'a>(header: impl Fn(&str) -> Option<&'a str>, now: u64) -> Option<Reading> {
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
                        .and_then(unix),
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
                        .and_then(crate::time::parse_rfc3339),
                };
                (l.limit.is_some() || l.remaining.is_some() || l.reset.is_some()).then_some(l)
            }};
        }
        let reading = Reading {
            seen_at: now,
            status: unified!("status").and_then(Status::parse),
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
        Some(Reading {
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
                ("anthropic-ratelimit-requests-reset", "2026-12-02T18:00:00Z"),
                ("anthropic-ratelimit-tokens-remaining", "78000"),
            ],
            1_000,
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
            crate::time::parse_rfc3339("2026-12-02T18:00:00Z")
        );
        assert_eq!(r.tokens.and_then(|t| t.remaining), Some(78_000));
        assert!(r.input_tokens.is_none());
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
        assert_eq!(family("claude-opus-4-6"), "opus");
        assert_eq!(family("claude-sonnet-4-5-20250929"), "sonnet");
        assert_eq!(family("Claude-Haiku-4-5"), "haiku");
        assert_eq!(family("gpt-4o"), "other");
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
}
