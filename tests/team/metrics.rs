//! `GET /metrics`: who may read it (the admin listener, or an admin key on the main listener),
//! and what it says after a known set of requests, read back with the official Prometheus
//! parser (`tests/sdk/check_metrics.py`, `prometheus_client` from `tests/sdk/requirements.txt`):
//! requests by status class, account and model; tokens by kind; in-flight requests; the two
//! histograms; account states; and made-up model names folded into `other`.
//!
//! Like the openai SDK test, this fails (it does not skip) when the Python package is missing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use super::{
    GPT, HAIKU, SONNET, Tokens, add_key, answer, anthropic_body, failing_body, first_user_text,
    openai_body, post_anthropic, post_openai, stream_events,
};
use crate::support::accounts::{KEY_A, KEY_B, poll_until};
use crate::support::{
    Config, FakeUpstream, Framing, Gateway, PYTHON, Reply, Response, assert_error, assert_exit,
    call, open_sse, require_python, run,
};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/check_metrics.py");

const OPUS: &str = "claude-opus-4-1";

/// Model names for the metrics' labels: one by name, one alias (which adds its target).
const MODELS_SECTION: &str =
    "models:\n  names:\n    - claude-haiku-4-5\n  aliases:\n    gpt-4o: claude-sonnet-4-5\n";

/// Fails, saying how to install it, unless `prometheus_client` imports.
fn require_parser() {
    require_python(
        "import prometheus_client.parser",
        "prometheus_client",
        "the metrics test",
    );
}

/// `(label name, value)` pairs, sorted.
type Labels = BTreeMap<String, String>;

/// What the Prometheus parser read from one scrape.
struct Scrape {
    families: Vec<Value>,
    text: String,
}

impl Scrape {
    /// The type the parser gave family `name` (counters are named without `_total`).
    fn family_type(&self, name: &str) -> Option<&str> {
        self.families
            .iter()
            .find(|f| f["name"] == name)
            .and_then(|f| f["type"].as_str())
    }

    /// Every sample called `name`, with its labels and value.
    fn samples(&self, name: &str) -> Vec<(Labels, f64)> {
        self.families
            .iter()
            .flat_map(|f| f["samples"].as_array().cloned().unwrap_or_default())
            .filter(|s| s["name"] == name)
            .map(|s| {
                let labels = s["labels"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                let value = s["value"]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{name}: value {} is not a number", s["value"]));
                (labels, value)
            })
            .collect()
    }

    /// The one value of an unlabelled sample.
    fn single(&self, name: &str) -> f64 {
        let samples = self.samples(name);
        assert_eq!(samples.len(), 1, "one {name} sample:\n{}", self.text);
        samples[0].1
    }

    /// A three-label counter as a map from those labels' values to its count.
    fn counter(&self, name: &str, labels: [&str; 3]) -> BTreeMap<(String, String, String), u64> {
        self.samples(name)
            .into_iter()
            .map(|(l, v)| {
                let get = |k: &str| {
                    l.get(k)
                        .unwrap_or_else(|| panic!("{name} without label {k}: {l:?}"))
                        .clone()
                };
                assert_eq!(l.len(), 3, "{name} has exactly {labels:?}: {l:?}");
                assert!(v >= 0.0 && v.fract() == 0.0, "{name} is a count: {v}");
                ((get(labels[0]), get(labels[1]), get(labels[2])), v as u64)
            })
            .collect()
    }

    /// Checks a histogram: cumulative buckets ending in `+Inf` = `_count`; returns the count.
    fn histogram(&self, name: &str) -> u64 {
        assert_eq!(
            self.family_type(name),
            Some("histogram"),
            "{name} is a histogram:\n{}",
            self.text
        );
        let mut buckets: Vec<(f64, f64)> = self
            .samples(&format!("{name}_bucket"))
            .into_iter()
            .map(|(l, v)| {
                let le = l
                    .get("le")
                    .unwrap_or_else(|| panic!("{name}_bucket without le"));
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or_else(|_| panic!("{name}: le {le:?}"))
                };
                (le, v)
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(buckets.len() >= 2, "{name} has buckets");
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{name}: buckets are cumulative: {buckets:?}"
        );
        let count = self.single(&format!("{name}_count"));
        let last = buckets.last().expect("buckets");
        assert!(last.0.is_infinite(), "{name} ends with le=\"+Inf\"");
        assert_eq!(last.1, count, "{name}: +Inf bucket = _count");
        assert!(self.single(&format!("{name}_sum")) >= 0.0);
        count as u64
    }
}

/// Scrapes `/metrics` on the admin listener and parses it with `check_metrics.py`.
fn scrape(gw: &Gateway) -> Scrape {
    let resp = call(gw.admin_addr(), "GET", "/metrics", &[], b"");
    assert_eq!(
        resp.status,
        200,
        "/metrics on the admin listener: {}",
        resp.text()
    );
    assert_prometheus_type(&resp);
    let text = resp.text();
    let mut cmd = Command::new(PYTHON);
    cmd.arg(SCRIPT);
    let out = run(cmd, Some(text.as_bytes()));
    assert_exit(&out, 0, &format!("check_metrics.py on:\n{text}"));
    let parsed: Value = serde_json::from_slice(&out.stdout).expect("check_metrics.py prints JSON");
    Scrape {
        families: parsed["families"].as_array().cloned().unwrap_or_default(),
        text,
    }
}

fn assert_prometheus_type(resp: &Response) {
    let content_type = resp.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain") && content_type.contains("version=0.0.4"),
        "Prometheus text format 0.0.4, not {content_type:?}"
    );
}

fn class(status: u16) -> String {
    format!("{}xx", status / 100)
}

/// The requests a test sent, as the metrics should count them.
struct Tally<'a> {
    up: &'a FakeUpstream,
    addr: SocketAddr,
    requests: BTreeMap<(String, String, String), u64>,
    tokens: BTreeMap<(String, String, String), u64>,
    /// Client requests answered from the upstream, and of them those that succeeded.
    relayed: u64,
    succeeded: u64,
}

impl<'a> Tally<'a> {
    fn new(up: &'a FakeUpstream, addr: SocketAddr) -> Tally<'a> {
        Tally {
            up,
            addr,
            requests: BTreeMap::new(),
            tokens: BTreeMap::new(),
            relayed: 0,
            succeeded: 0,
        }
    }

    /// An Anthropic request that should be labelled `label` and count `tokens` if served.
    fn anthropic(&mut self, key: &str, body: &str, label: &str, tokens: Tokens) -> Response {
        self.send(|addr| post_anthropic(addr, key, body, &[]), label, tokens)
    }

    /// The same for an OpenAI request.
    fn openai(&mut self, key: &str, body: &str, label: &str, tokens: Tokens) -> Response {
        self.send(|addr| post_openai(addr, key, body, &[]), label, tokens)
    }

    /// Sends one request and counts it under its status class, the account that answered last
    /// (`-` if none did) and `label`.
    fn send(
        &mut self,
        send: impl FnOnce(SocketAddr) -> Response,
        label: &str,
        tokens: Tokens,
    ) -> Response {
        let before = self.up.requests().len();
        let resp = send(self.addr);
        let after = self.up.requests();
        let account = if after.len() > before {
            self.relayed += 1;
            match after.last().map(|r| r.api_key()) {
                Some(KEY_A) => "alpha",
                Some(KEY_B) => "bravo",
                other => panic!("unknown upstream key {other:?}"),
            }
        } else {
            "-"
        };
        if resp.status == 200 {
            self.succeeded += 1;
        }
        *self
            .requests
            .entry((class(resp.status), account.into(), label.into()))
            .or_default() += 1;
        for (kind, n) in tokens.kinds() {
            if resp.status == 200 && n > 0 {
                *self
                    .tokens
                    .entry((kind.into(), account.into(), label.into()))
                    .or_default() += n;
            }
        }
        resp
    }
}

#[test]
fn metrics_count_requests_and_tokens_by_label_and_parse_as_prometheus_text() {
    require_parser();
    let (release, gate) = mpsc::channel::<()>();
    let mut gate = Some(gate);
    let small = Tokens::new(3, 2, 0, 0);
    let up = FakeUpstream::start(move |req| {
        if first_user_text(req).ends_with(" hold")
            && let Some(gate) = gate.take()
        {
            return Reply::Sse {
                events: stream_events(small),
                gate: Some(gate),
                framing: Framing::Chunked,
            };
        }
        answer(req)
    });
    let mut gw = Gateway::new(
        &Config::new(up.base_url())
            .admin_listen("127.0.0.1:0")
            .section(MODELS_SECTION),
    );
    gw.add_api_key("alpha", KEY_A);
    gw.add_api_key("bravo", KEY_B);
    let plain = gw.add_client_key("tests");
    let (_, limited) = add_key(&gw, "opus-only", &["--models", OPUS]);
    let admin = gw.add_admin_key("operator");
    gw.start();
    let idle = scrape(&gw);

    let addr = gw.addr();
    let mut tally = Tally::new(&up, addr);
    let json_t = Tokens::new(11, 7, 3, 5);
    let sse_t = Tokens::new(13, 9, 2, 4);
    let openai_t = Tokens::new(6, 4, 0, 0);
    let opus_t = Tokens::new(5, 5, 5, 5);
    let other_t = Tokens::new(1, 1, 0, 0);
    let none = Tokens::default();
    for i in 0..3 {
        let body = anthropic_body(SONNET, json_t, false, &format!("m{i}"));
        assert_eq!(tally.anthropic(&plain, &body, SONNET, json_t).status, 200);
    }
    for i in 0..2 {
        let body = anthropic_body(HAIKU, sse_t, true, &format!("s{i}"));
        assert_eq!(tally.anthropic(&plain, &body, HAIKU, sse_t).status, 200);
    }
    for i in 0..2 {
        let body = openai_body(GPT, openai_t, false, &format!("o{i}"));
        assert_eq!(tally.openai(&plain, &body, GPT, openai_t).status, 200);
    }
    let body = anthropic_body(OPUS, opus_t, false, "opus");
    let resp = tally.anthropic(&limited, &body, OPUS, opus_t);
    assert_eq!(resp.status, 200, "a model from a key's allow-list");
    // Twenty model names nobody configured: one `other` label for all of them.
    let made_up: Vec<String> = (0..20)
        .map(|i| format!("made-up-model-{i}-x{}", i * 37))
        .collect();
    for model in &made_up {
        let body = anthropic_body(model, other_t, false, model);
        assert_eq!(tally.anthropic(&plain, &body, "other", other_t).status, 200);
    }
    let body = failing_body(SONNET, 400, "bad");
    assert_eq!(tally.anthropic(&plain, &body, SONNET, none).status, 400);
    let body = failing_body(HAIKU, 500, "broken");
    assert_eq!(tally.anthropic(&plain, &body, HAIKU, none).status, 500);
    let body = anthropic_body(SONNET, json_t, false, "refused");
    assert_error(&tally.anthropic(&limited, &body, SONNET, none), 403, None);

    let m = scrape(&gw);
    let what = format!("metrics:\n{}", m.text);
    for (family, kind) in [
        ("llm_gateway_requests", "counter"),
        ("llm_gateway_tokens", "counter"),
        ("llm_gateway_in_flight_requests", "gauge"),
        ("llm_gateway_account_state", "gauge"),
        ("llm_gateway_oauth_refreshes", "counter"),
        ("llm_gateway_uptime_seconds", "gauge"),
    ] {
        assert_eq!(m.family_type(family), Some(kind), "{family}: {what}");
    }

    // Requests by class, account and model: exactly what was sent, on the accounts that served.
    let requests = m.counter(
        "llm_gateway_requests_total",
        ["status_class", "account", "model"],
    );
    let served: BTreeMap<_, _> = requests
        .iter()
        .filter(|((_, account, _), _)| account != "-")
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    let want: BTreeMap<_, _> = tally
        .requests
        .iter()
        .filter(|((_, account, _), _)| account != "-")
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    assert_eq!(served, want, "{what}");
    assert_eq!(
        requests.get(&("4xx".into(), "-".into(), SONNET.into())),
        Some(&1),
        "the refused request, on no account: {what}"
    );
    let other: u64 = requests
        .iter()
        .filter(|((class, _, model), _)| class == "2xx" && model == "other")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(other, 20, "the made-up models all count as other: {what}");
    let other_series = requests
        .keys()
        .filter(|(_, _, model)| model == "other")
        .count();
    assert!(
        other_series <= 2,
        "one other series per account at most, not one per name: {what}"
    );
    for model in &made_up {
        assert!(
            !m.text.contains(model.as_str()),
            "{model} became a label: {what}"
        );
    }

    // Tokens by kind: every expected count, and nothing else that is not zero.
    let tokens = m.counter("llm_gateway_tokens_total", ["kind", "account", "model"]);
    for (key, n) in &tally.tokens {
        assert_eq!(tokens.get(key), Some(n), "tokens {key:?}: {what}");
    }
    for (key, n) in &tokens {
        assert!(
            *n == 0 || tally.tokens.contains_key(key),
            "unexpected tokens {key:?} = {n}: {what}"
        );
    }

    // Histograms: one latency per upstream answer, a first token per relayed answer at most.
    assert_eq!(
        m.histogram("llm_gateway_upstream_latency_seconds"),
        up.requests().len() as u64,
        "one upstream latency per upstream request: {what}"
    );
    let ttft = m.histogram("llm_gateway_time_to_first_token_seconds");
    assert!(
        (tally.succeeded..=tally.relayed).contains(&ttft),
        "time to first token counted {ttft}, sent {} answered / {} relayed: {what}",
        tally.succeeded,
        tally.relayed
    );

    // One state per account, the uptime, and no refresh counts without OAuth accounts.
    let states = m.samples("llm_gateway_account_state");
    for name in ["alpha", "bravo"] {
        let mine: Vec<_> = states
            .iter()
            .filter(|(l, _)| l.get("account").map(String::as_str) == Some(name))
            .collect();
        assert_eq!(mine.len(), 1, "one state for {name}: {what}");
        assert_eq!(mine[0].1, 1.0);
        assert!(
            mine[0].0.get("state").is_some_and(|s| !s.is_empty()),
            "{what}"
        );
    }
    assert!(m.single("llm_gateway_uptime_seconds") > 0.0, "{what}");
    assert!(
        m.samples("llm_gateway_oauth_refreshes_total").is_empty(),
        "{what}"
    );

    // In flight: a held stream shows as one more than idle.
    let idle_in_flight = idle.single("llm_gateway_in_flight_requests");
    let mut sse = open_sse(
        addr,
        "/v1/messages",
        &[("x-api-key", &plain), ("connection", "close")],
        anthropic_body(SONNET, small, true, "hold").as_bytes(),
    );
    assert!(sse.next_event().is_some(), "the held stream's first event");
    let held = scrape(&gw).single("llm_gateway_in_flight_requests");
    for _ in 1..stream_events(small).len() {
        let _ = release.send(());
    }
    while sse.next_event().is_some() {}
    assert_eq!(held - idle_in_flight, 1.0, "one held stream in flight");

    // Who may read it: the admin listener (above) or an admin key on the main listener.
    let get = |headers: &[(&str, &str)]| call(addr, "GET", "/metrics", headers, b"");
    assert_error(&get(&[]), 401, Some("authentication_error"));
    assert_error(
        &get(&[("x-api-key", &plain)]),
        403,
        Some("permission_error"),
    );
    for resp in [
        get(&[("x-api-key", &admin)]),
        get(&[("authorization", &format!("Bearer {admin}"))]),
    ] {
        assert_eq!(resp.status, 200, "an admin key: {}", resp.text());
        assert_prometheus_type(&resp);
        assert!(resp.text().contains("llm_gateway_requests_total{"));
    }
}

/// Stricter reading of "keys' allow-lists" with "a running server applies key changes within
/// about a second": a key added while the server runs gets its models labelled too.
#[test]
fn a_key_added_while_running_gets_its_allowed_models_as_labels() {
    require_parser();
    let up = FakeUpstream::start(answer);
    let mut gw = Gateway::new(&Config::new(up.base_url()).admin_listen("127.0.0.1:0"));
    gw.add_api_key("alpha", KEY_A);
    gw.add_client_key("tests");
    gw.start();
    let (_, key) = add_key(&gw, "late", &["--models", OPUS]);
    let body = anthropic_body(OPUS, Tokens::new(2, 2, 0, 0), false, "late");
    poll_until(
        Duration::from_millis(2500),
        "the new key is accepted",
        || post_anthropic(gw.addr(), &key, &body, &[]).status == 200,
    );
    // A request is counted just after its answer has gone: scrape until it is.
    let mut text = String::new();
    poll_until(Duration::from_secs(5), "the request in the metrics", || {
        let m = scrape(&gw);
        text = m.text.clone();
        let requests = m.counter(
            "llm_gateway_requests_total",
            ["status_class", "account", "model"],
        );
        requests.get(&("2xx".into(), "alpha".into(), OPUS.into())) == Some(&1)
    });
    assert!(
        text.contains(OPUS),
        "{OPUS}, allowed to a key added while running, is a label"
    );
}
