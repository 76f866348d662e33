//! Prometheus metrics for `GET /metrics`: requests by status class, account and model; tokens
//! by kind; in-flight requests; upstream latency and time-to-first-token histograms; account
//! states; OAuth refreshes. Label values come from the config (account names, configured model
//! names and aliases) or are `other`, so cardinality stays bounded whatever clients send.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::accounts::Accounts;
use crate::usage::Usage;

const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A fixed-bucket histogram of seconds.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        self.render_series(out, name, "");
    }

    /// The series of one histogram; `labels` (`account="x",`) go before `le`.
    fn render_series(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = match labels.trim_end_matches(',') {
            "" => String::new(),
            labels => format!("{{{labels}}}"),
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {sum}\n{name}_count{braces} {count}"
        );
    }
}

/// One histogram per account name (names come from the config, so the set is bounded).
#[derive(Default)]
pub struct PerAccount(Mutex<BTreeMap<String, Histogram>>);

impl PerAccount {
    pub fn observe(&self, account: &str, d: Duration) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(account.to_string()).or_default().observe(d);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (account, h) in self.0.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            h.render_series(out, name, &format!("account=\"{}\",", escape(account)));
        }
    }
}

/// One finished request, as metrics see it.
pub struct Observation<'a> {
    pub status: u16,
    /// Account name, or `-` when none was used.
    pub account: &'a str,
    pub model: Option<&'a str>,
    pub usage: Usage,
    /// Nano-USD; `None` when no price row matched the model.
    pub cost: Option<u64>,
}

#[derive(Default)]
pub struct Metrics {
    /// Model names that get their own label value; replaced when the config changes.
    known_models: RwLock<HashSet<String>>,
    /// (status class, account, model) → requests.
    requests: Mutex<BTreeMap<(&'static str, String, String), u64>>,
    /// (kind, account, model) → tokens.
    tokens: Mutex<BTreeMap<(&'static str, String, String), u64>>,
    /// (account, model) → nano-USD, and requests no price row matched.
    cost: Mutex<BTreeMap<(String, String), (u64, u64)>>,
    in_flight: AtomicI64,
    pub upstream_latency: Histogram,
    pub time_to_first_token: Histogram,
    pub account_upstream_latency: PerAccount,
    pub account_time_to_first_token: PerAccount,
    /// (account, outcome) → upstream attempts.
    attempts: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// account → times a request moved on from it to another account.
    failovers: Mutex<BTreeMap<String, u64>>,
    started: Option<Instant>,
}

/// Counts a request in flight while it lives.
pub struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// A Prometheus label value, escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn new(known_models: impl IntoIterator<Item = String>) -> Metrics {
        Metrics {
            known_models: RwLock::new(known_models.into_iter().collect()),
            started: Some(Instant::now()),
            ..Metrics::default()
        }
    }

    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    /// After a config reload: the model names now configured.
    pub fn set_known_models(&self, names: impl IntoIterator<Item = String>) {
        let fresh = names.into_iter().collect();
        *self.known_models.write().unwrap_or_else(|p| p.into_inner()) = fresh;
    }

    fn model_label(&self, model: Option<&str>) -> String {
        let known = self.known_models.read().unwrap_or_else(|p| p.into_inner());
        match model {
            Some(m) if known.contains(m) => m.to_string(),
            _ => "other".to_string(),
        }
    }

    pub fn observe(&self, o: &Observation<'_>) {
        let model = self.model_label(o.model);
        let account = o.account.to_string();
        *self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((class(o.status), account.clone(), model.clone()))
            .or_default() += 1;
        if o.usage.total() > 0 {
            let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
            for (kind, n) in [
                ("input", o.usage.input),
                ("output", o.usage.output),
                ("cache_creation", o.usage.cache_creation),
                ("cache_read", o.usage.cache_read),
            ] {
                *tokens
                    .entry((kind, account.clone(), model.clone()))
                    .or_default() += n;
            }
            let mut cost = self.cost.lock().unwrap_or_else(|p| p.into_inner());
            let (nano, unpriced) = cost.entry((account, model)).or_default();
            match o.cost {
                Some(n) => *nano = nano.saturating_add(n),
                None => *unpriced += 1,
            }
        }
    }

    /// One upstream attempt with `account` and how it ended (`answered`, `rate_limited`,
    /// `auth_failed`, `banned`, `upstream_error`, `unreachable`).
    pub fn attempt(&self, account: &str, outcome: &'static str) {
        let mut map = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((account.to_string(), outcome)).or_default() += 1;
    }

    /// A request moved on from `account` to try another.
    pub fn failover(&self, account: &str) {
        let mut map = self.failovers.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(account.to_string()).or_default() += 1;
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self, accounts: &Accounts) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP llm_gateway_requests_total Requests served, by status class, account and model.\n# TYPE llm_gateway_requests_total counter\n");
        for ((class, account, model), n) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "llm_gateway_requests_total{{status_class=\"{class}\",account=\"{}\",model=\"{}\"}} {n}",
                escape(account),
                escape(model)
            );
        }
        out.push_str("# HELP llm_gateway_tokens_total Tokens used, by kind, account and model.\n# TYPE llm_gateway_tokens_total counter\n");
        for ((kind, account, model), n) in
            self.tokens.lock().unwrap_or_else(|p| p.into_inner()).iter()
        {
            let _ = writeln!(
                out,
                "llm_gateway_tokens_total{{kind=\"{kind}\",account=\"{}\",model=\"{}\"}} {n}",
                escape(account),
                escape(model)
            );
        }
        out.push_str("# HELP llm_gateway_cost_usd_total What requests cost, in USD, by account and model (as priced when served).\n# TYPE llm_gateway_cost_usd_total counter\n");
        let cost = self.cost.lock().unwrap_or_else(|p| p.into_inner());
        for ((account, model), (nano, _)) in cost.iter() {
            let _ = writeln!(
                out,
                "llm_gateway_cost_usd_total{{account=\"{}\",model=\"{}\"}} {}",
                escape(account),
                escape(model),
                crate::pricing::usd(*nano, 9)
            );
        }
        out.push_str("# HELP llm_gateway_unpriced_requests_total Requests that used tokens of a model no price row matches (their cost is unknown).\n# TYPE llm_gateway_unpriced_requests_total counter\n");
        for ((account, model), (_, unpriced)) in cost.iter().filter(|(_, (_, u))| *u > 0) {
            let _ = writeln!(
                out,
                "llm_gateway_unpriced_requests_total{{account=\"{}\",model=\"{}\"}} {unpriced}",
                escape(account),
                escape(model)
            );
        }
        drop(cost);
        let _ = writeln!(
            out,
            "# HELP llm_gateway_in_flight_requests Requests being served now.\n# TYPE llm_gateway_in_flight_requests gauge\nllm_gateway_in_flight_requests {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        self.upstream_latency.render(
            &mut out,
            "llm_gateway_upstream_latency_seconds",
            "Time from sending a request upstream to its response head.",
        );
        self.time_to_first_token.render(
            &mut out,
            "llm_gateway_time_to_first_token_seconds",
            "Time from a request's arrival to the first byte of its answer reaching the client.",
        );
        self.account_upstream_latency.render(
            &mut out,
            "llm_gateway_account_upstream_latency_seconds",
            "Time from sending a request upstream to its response head, by account.",
        );
        self.account_time_to_first_token.render(
            &mut out,
            "llm_gateway_account_time_to_first_token_seconds",
            "Time from a request's arrival to the first byte of its answer, by the account that served it.",
        );
        out.push_str("# HELP llm_gateway_upstream_attempts_total Upstream attempts, by account and outcome.\n# TYPE llm_gateway_upstream_attempts_total counter\n");
        for ((account, outcome), n) in self
            .attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "llm_gateway_upstream_attempts_total{{account=\"{}\",outcome=\"{outcome}\"}} {n}",
                escape(account)
            );
        }
        out.push_str("# HELP llm_gateway_failovers_total Requests that moved on from an account to another, by the account left.\n# TYPE llm_gateway_failovers_total counter\n");
        for (account, n) in self
            .failovers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "llm_gateway_failovers_total{{account=\"{}\"}} {n}",
                escape(account)
            );
        }
        out.push_str("# HELP llm_gateway_account_state 1 for each account's current state.\n# TYPE llm_gateway_account_state gauge\n");
        let now = Instant::now();
        let entries = accounts.snapshot();
        for e in entries.iter() {
            let (state, _) = e.status(now);
            let _ = writeln!(
                out,
                "llm_gateway_account_state{{account=\"{}\",state=\"{state}\"}} 1",
                escape(&e.account.name)
            );
        }
        let quotas: Vec<_> = (entries.iter())
            .filter_map(|e| Some((escape(&e.account.name), e.view().quota?)))
            .collect();
        out.push_str("# HELP llm_gateway_account_quota_utilization The latest share of each quota window used, as the account's answers report it (1 is the limit).\n# TYPE llm_gateway_account_quota_utilization gauge\n");
        for (account, quota) in &quotas {
            for (window, w) in quota.windows() {
                if let Some(used) = w.and_then(|w| w.utilization) {
                    let _ = writeln!(
                        out,
                        "llm_gateway_account_quota_utilization{{account=\"{account}\",window=\"{window}\"}} {used}"
                    );
                }
            }
        }
        out.push_str("# HELP llm_gateway_account_quota_reset_timestamp_seconds When each quota window resets (Unix seconds).\n# TYPE llm_gateway_account_quota_reset_timestamp_seconds gauge\n");
        for (account, quota) in &quotas {
            for (window, w) in quota.windows() {
                if let Some(reset) = w.and_then(|w| w.reset) {
                    let _ = writeln!(
                        out,
                        "llm_gateway_account_quota_reset_timestamp_seconds{{account=\"{account}\",window=\"{window}\"}} {reset}"
                    );
                }
            }
        }
        out.push_str("# HELP llm_gateway_account_quota_over_threshold 1 while the account is passed over for being at its quota threshold.\n# TYPE llm_gateway_account_quota_over_threshold gauge\n");
        let settings = accounts.settings();
        for e in entries.iter() {
            let standing = e.quota_standing(&settings.policy(&e.account));
            let _ = writeln!(
                out,
                "llm_gateway_account_quota_over_threshold{{account=\"{}\"}} {}",
                escape(&e.account.name),
                u8::from(standing.over)
            );
        }
        out.push_str("# HELP llm_gateway_oauth_refreshes_total OAuth token refreshes, by account and result.\n# TYPE llm_gateway_oauth_refreshes_total counter\n");
        for e in entries.iter().filter(|e| e.account.oauth().is_some()) {
            let live = e.view();
            for (result, n) in [
                ("success", live.refreshes_ok),
                ("failure", live.refreshes_failed),
            ] {
                let _ = writeln!(
                    out,
                    "llm_gateway_oauth_refreshes_total{{account=\"{}\",result=\"{result}\"}} {n}",
                    escape(&e.account.name)
                );
            }
        }
        let uptime = self.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        let _ = writeln!(
            out,
            "# HELP llm_gateway_uptime_seconds Seconds since the server started.\n# TYPE llm_gateway_uptime_seconds gauge\nllm_gateway_uptime_seconds {uptime:.3}"
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_models_are_other_and_labels_are_escaped() {
        let m = Metrics::new(["claude-x".to_string()]);
        for model in ["claude-x", "made-up-by-a-client", "another"] {
            m.observe(&Observation {
                status: 200,
                account: "Team \"A\"",
                model: Some(model),
                usage: Usage {
                    input: 3,
                    ..Usage::default()
                },
                cost: Some(15_000),
            });
        }
        let text = m.render(&Accounts::new(
            vec![],
            &test_settings(),
            &test_sticky(),
            None,
        ));
        assert!(text.contains(r#"llm_gateway_requests_total{status_class="2xx",account="Team \"A\"",model="claude-x"} 1"#), "{text}");
        assert!(text.contains(r#"model="other"} 2"#), "{text}");
        assert!(!text.contains("made-up"));
        assert!(text.contains(
            r#"llm_gateway_tokens_total{kind="input",account="Team \"A\"",model="other"} 6"#
        ));
    }

    #[test]
    fn histograms_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(300));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.005\"} 1"));
        assert!(out.contains("x_bucket{le=\"0.5\"} 2"));
        assert!(out.contains("x_bucket{le=\"+Inf\"} 2"));
        assert!(out.contains("x_count 2"));
    }

    fn test_settings() -> crate::config::BalanceSettings {
        crate::config::BalanceSettings::test()
    }

    fn test_sticky() -> crate::config::StickySettings {
        crate::config::StickySettings {
            enabled: false,
            ttl: Duration::from_secs(1),
            max_entries: 1,
            max_per_key: 1,
        }
    }
}
