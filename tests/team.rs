//! Team access end to end: managed gateway keys and their limits, the usage ledger and the
//! `usage` command, `GET /metrics`, and the JSON access log with its request ids.
//!
//! Every request these tests send names, in its first user message, the tokens the fake
//! upstream is to report for it (`tokens IN OUT CACHE_WRITE CACHE_READ`), so a test knows
//! exactly what the ledger, the budgets, the metrics and the access log should count without
//! asking the gateway. `keys` covers the key commands, `limits` the per-key limits, `ledger`
//! the ledger across a `kill -9` and the `usage` command, `metrics` the Prometheus endpoint,
//! `logs` the access log and request ids, and `secrets` the hunt for leaked keys.

use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

use serde_json::{Value, json};

pub use crate::support::accounts::retry_after;
use crate::support::accounts::{stdout_json, unix_from_rfc3339};
use crate::support::{Framing, Gateway, Recorded, Reply, Response, assert_exit, call, wait_until};

mod costs;
mod keys;
mod ledger;
mod limits;
mod logs;
mod metrics;
mod secrets;

pub const SONNET: &str = "claude-sonnet-4-5";
pub const HAIKU: &str = "claude-haiku-4-5";

/// The OpenAI model name most tests alias to `SONNET`.
pub const GPT: &str = "gpt-4o";

/// The `models:` section that lets OpenAI callers say `gpt-4o`.
pub const ALIAS_SECTION: &str = "models:\n  aliases:\n    gpt-4o: claude-sonnet-4-5\n";

/// How long a running server may take to apply a key change made by the CLI (the contract
/// says about a second; the watcher looks every half second), with room for a busy machine.
pub const RELOAD_LIMIT: Duration = Duration::from_millis(2500);

/// How long a flushed record may take to reach the ledger files (the flush interval is 1 s).
pub const FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// Tokens of one answer, as Anthropic's `usage` reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tokens {
    pub input: u64,
    pub output: u64,
    pub cache_creation: u64,
    pub cache_read: u64,
}

impl Tokens {
    pub const fn new(input: u64, output: u64, cache_creation: u64, cache_read: u64) -> Tokens {
        Tokens {
            input,
            output,
            cache_creation,
            cache_read,
        }
    }

    pub fn total(&self) -> u64 {
        self.input + self.output + self.cache_creation + self.cache_read
    }

    pub fn add(&mut self, other: Tokens) {
        self.input += other.input;
        self.output += other.output;
        self.cache_creation += other.cache_creation;
        self.cache_read += other.cache_read;
    }

    /// The four counts as (kind label, value), in the metrics' kind names.
    pub fn kinds(&self) -> [(&'static str, u64); 4] {
        [
            ("input", self.input),
            ("output", self.output),
            ("cache_creation", self.cache_creation),
            ("cache_read", self.cache_read),
        ]
    }

    /// The tokens a request's first user message asks the fake upstream to report.
    fn from_instruction(text: &str) -> Option<Tokens> {
        let rest = text.strip_prefix("tokens ")?;
        let n: Vec<u64> = rest
            .split_whitespace()
            .take(4)
            .map(|w| w.parse().ok())
            .collect::<Option<_>>()?;
        (n.len() == 4).then(|| Tokens::new(n[0], n[1], n[2], n[3]))
    }
}

/// The instruction for the fake upstream: report these tokens. `tag` makes the message unique
/// (and is ignored by the upstream).
pub fn instruction(tokens: Tokens, tag: &str) -> String {
    format!(
        "tokens {} {} {} {} {tag}",
        tokens.input, tokens.output, tokens.cache_creation, tokens.cache_read
    )
}

/// An Anthropic Messages body whose answer will report `tokens`.
pub fn anthropic_body(model: &str, tokens: Tokens, stream: bool, tag: &str) -> String {
    json!({
        "model": model, "max_tokens": 64, "stream": stream,
        "messages": [{"role": "user", "content": instruction(tokens, tag)}],
    })
    .to_string()
}

/// An Anthropic Messages body the fake upstream answers with this error status.
pub fn failing_body(model: &str, status: u16, tag: &str) -> String {
    json!({
        "model": model, "max_tokens": 64,
        "messages": [{"role": "user", "content": format!("fail {status} {tag}")}],
    })
    .to_string()
}

/// An OpenAI Chat Completions body whose answer will report `tokens`.
pub fn openai_body(model: &str, tokens: Tokens, stream: bool, tag: &str) -> String {
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": instruction(tokens, tag)}],
    });
    if stream {
        body["stream"] = true.into();
        body["stream_options"] = json!({"include_usage": true});
    }
    body.to_string()
}

/// POSTs an Anthropic request with gateway key `key` (as `x-api-key`) and extra headers.
pub fn post_anthropic(addr: SocketAddr, key: &str, body: &str, extra: &[(&str, &str)]) -> Response {
    let mut headers = vec![
        ("x-api-key", key),
        ("content-type", "application/json"),
        ("anthropic-version", "2023-06-01"),
    ];
    headers.extend_from_slice(extra);
    call(addr, "POST", "/v1/messages", &headers, body.as_bytes())
}

/// POSTs an OpenAI Chat Completions request with gateway key `key` (as a bearer token).
pub fn post_openai(addr: SocketAddr, key: &str, body: &str, extra: &[(&str, &str)]) -> Response {
    let bearer = format!("Bearer {key}");
    let mut headers = vec![
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    call(
        addr,
        "POST",
        "/v1/chat/completions",
        &headers,
        body.as_bytes(),
    )
}

/// The text of the first user message of an upstream request (a string or text blocks).
pub fn first_user_text(req: &Recorded) -> String {
    let body: Value = serde_json::from_slice(&req.body).unwrap_or_default();
    let content = &body["messages"][0]["content"];
    content
        .as_str()
        .or_else(|| content[0]["text"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// The tokens the fake upstream reported for this request (none for failures and non-messages).
pub fn served_tokens(req: &Recorded) -> Tokens {
    Tokens::from_instruction(&first_user_text(req)).unwrap_or_default()
}

/// The fake upstream's script: messages report the tokens they ask for, as one JSON message
/// or as an event stream with `message_start` and `message_delta` usage; `fail STATUS`
/// answers that error; anything else (a health probe) gets a model list.
pub fn answer(req: &Recorded) -> Reply {
    let text = first_user_text(req);
    if let Some(status) = text
        .strip_prefix("fail ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse::<u16>().ok())
    {
        let kind = if status >= 500 {
            "api_error"
        } else {
            "invalid_request_error"
        };
        return Reply::json(
            status,
            &json!({"type": "error", "error": {"type": kind, "message": "scripted failure"}})
                .to_string(),
        );
    }
    let Some(tokens) = Tokens::from_instruction(&text) else {
        return Reply::json(
            200,
            r#"{"data":[{"id":"claude-sonnet-4-5","type":"model"}],"has_more":false}"#,
        );
    };
    let body: Value = serde_json::from_slice(&req.body).unwrap_or_default();
    if body["stream"] == true {
        Reply::Sse {
            events: stream_events(tokens),
            gate: None,
            framing: Framing::Chunked,
        }
    } else {
        Reply::json(200, &message(tokens))
    }
}

/// A complete Anthropic message reporting `tokens`.
pub fn message(tokens: Tokens) -> String {
    json!({
        "id": "msg_01Team", "type": "message", "role": "assistant", "model": SONNET,
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {
            "input_tokens": tokens.input, "output_tokens": tokens.output,
            "cache_creation_input_tokens": tokens.cache_creation,
            "cache_read_input_tokens": tokens.cache_read,
        },
    })
    .to_string()
}

/// An Anthropic event stream reporting `tokens`: input and cache counts in `message_start`
/// (with one output token so far), the final output count in `message_delta`.
pub fn stream_events(tokens: Tokens) -> Vec<String> {
    let usage = json!({"input_tokens": tokens.input,
                       "cache_creation_input_tokens": tokens.cache_creation,
                       "cache_read_input_tokens": tokens.cache_read});
    stream_reporting(usage, tokens.output)
}

/// An Anthropic event stream of one text block whose `message_start` carries `usage` (and one
/// output token so far) and whose `message_delta` says `output` tokens in all.
pub fn stream_reporting(mut usage: Value, output: u64) -> Vec<String> {
    let event = |data: Value| {
        let name = data["type"].as_str().unwrap_or_default().to_string();
        format!("event: {name}\ndata: {data}\n\n")
    };
    usage["output_tokens"] = 1.into();
    vec![
        event(json!({"type": "message_start", "message": {
            "id": "msg_01TeamStream", "type": "message", "role": "assistant", "model": SONNET,
            "content": [], "stop_reason": null, "stop_sequence": null, "usage": usage}})),
        event(
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        event(
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ok"}}),
        ),
        event(json!({"type": "content_block_stop", "index": 0})),
        event(
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                     "usage": {"output_tokens": output}}),
        ),
        event(json!({"type": "message_stop"})),
    ]
}

/// Adds a gateway key with extra flags; returns its id and the key.
pub fn add_key(gw: &Gateway, name: &str, flags: &[&str]) -> (String, String) {
    let mut args = vec!["add-client-key", "--name", name, "--json"];
    args.extend_from_slice(flags);
    let out = gw.run_cli(&args);
    assert_exit(&out, 0, &format!("add-client-key {name} {flags:?}"));
    let v = stdout_json(&out, "add-client-key --json");
    let id = v["id"].as_str().expect("add-client-key id").to_string();
    let key = v["key"].as_str().expect("add-client-key key").to_string();
    (id, key)
}

/// Runs a CLI command that must succeed.
pub fn cli_ok(gw: &Gateway, args: &[&str]) -> Output {
    let out = gw.run_cli(args);
    assert_exit(&out, 0, &args.join(" "));
    out
}

/// `usage --json ARGS`.
pub fn usage(gw: &Gateway, args: &[&str]) -> Value {
    let mut all = vec!["usage", "--json"];
    all.extend_from_slice(args);
    let out = cli_ok(gw, &all);
    stdout_json(&out, &all.join(" "))
}

/// Waits until `usage --json ARGS` counts at least `requests` requests in total (the files
/// are read by a CLI run, so this waits for the server's flush), and returns that answer.
pub fn usage_once_counted(gw: &Gateway, args: &[&str], requests: u64) -> Value {
    let mut last = Value::Null;
    wait_until(
        &format!("usage --json showing {requests} requests"),
        FLUSH_LIMIT,
        || {
            last = usage(gw, args);
            last["total"]["requests"].as_u64().unwrap_or(0) >= requests
        },
    );
    last
}

/// The totals of a `usage --json` row as tokens.
pub fn row_tokens(row: &Value) -> Tokens {
    let n = |field: &str| {
        row[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field} is not a count in {row}"))
    };
    Tokens::new(
        n("input_tokens"),
        n("output_tokens"),
        n("cache_creation_tokens"),
        n("cache_read_tokens"),
    )
}

/// The access log lines in `text`: the lines that are JSON objects with a `request_id`.
pub fn access_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line.trim()).ok())
        .filter(|v| v.get("request_id").is_some())
        .collect()
}

/// The access log line of request `id` in `text`, if written.
pub fn access_line(text: &str, id: &str) -> Option<Value> {
    access_lines(text)
        .into_iter()
        .find(|line| line["request_id"] == id)
}

/// Checks an OpenAI-shaped error (`{"error":{"message","type","param","code"}}`) with `status`.
pub fn assert_openai_error(resp: &Response, status: u16) -> Value {
    assert_eq!(resp.status, status, "status; body: {}", resp.text());
    let v = resp.json();
    assert!(
        v.get("type").is_none(),
        "OpenAI's shape, not Anthropic's (top-level `type`): {v}"
    );
    let error = v
        .get("error")
        .filter(|e| e.is_object())
        .unwrap_or_else(|| panic!("no `error` object in {v}"));
    for field in ["message", "type", "param", "code"] {
        assert!(error.get(field).is_some(), "error.{field} missing in {v}");
    }
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error.message should say something: {v}"
    );
    error.clone()
}

/// Seconds from Unix time `now` to the next UTC midnight.
pub fn secs_to_midnight(now: u64) -> u64 {
    86_400 - now % 86_400
}

/// Seconds from Unix time `now` to the first of next month, 00:00 UTC.
pub fn secs_to_next_month(now: u64) -> u64 {
    let (y, m, _) = civil(now / 86_400);
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let next = unix_from_rfc3339(&format!("{y:04}-{m:02}-01T00:00:00Z")) as u64;
    next - now
}

/// The UTC date `YYYY-MM-DD` of Unix time `secs`.
pub fn utc_date(secs: u64) -> String {
    let (y, m, d) = civil(secs / 86_400);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The civil date of a day number since 1970-01-01 (Howard Hinnant's algorithm).
fn civil(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[test]
fn calendar_helpers_agree_with_known_dates() {
    // 2026-11-26 07:04 UTC, the example the gateway's own unit tests use.
    let t = 1_795_676_640;
    assert_eq!(utc_date(t), "2026-11-26");
    assert_eq!(secs_to_midnight(t), 86_400 - (7 * 3600 + 4 * 60));
    assert_eq!(
        t + secs_to_next_month(t),
        unix_from_rfc3339("2026-12-01T00:00:00Z") as u64
    );
    let dec = unix_from_rfc3339("2026-12-31T23:00:00Z") as u64;
    assert_eq!(secs_to_next_month(dec), 3600);
    assert_eq!(utc_date(0), "1970-01-01");
}
