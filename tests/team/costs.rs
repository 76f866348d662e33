//! What requests cost: every token kind priced from the table (1-hour cache writes at their
//! own rate), unpriced models shown as such, price edits that change only later requests,
//! USD budgets that refuse at the right moment under parallel load, and the key holder's
//! usage endpoint, which returns what `usage` prints.
//!
//! The fake upstream here answers `cost IN OUT WRITE_5M WRITE_1H READ tag` with exactly those
//! tokens, the cache writes split by lifetime in `usage.cache_creation` as Anthropic reports
//! them (`nosplit` in the tag leaves the split out).

use std::collections::HashMap;

use serde_json::{Value, json};

use super::{FLUSH_LIMIT, add_key, cli_ok, first_user_text, post_anthropic, post_openai, usage};
use crate::support::accounts::poll_until;
use crate::support::{
    ACCOUNT_KEY, Config, FakeUpstream, Gateway, Recorded, Reply, Response, call, in_parallel,
    wait_until,
};

const OPUS: &str = "claude-opus-4-6";
const SONNET: &str = "claude-sonnet-4-5-20250929";
const HAIKU: &str = "claude-haiku-4-5-20251001";

/// Tokens of one answer: input, output, 5-minute and 1-hour cache writes, cache reads.
#[derive(Debug, Clone, Copy)]
struct Kinds(u64, u64, u64, u64, u64);

/// The list prices by hand, in nano-USD per token (USD per million × 1000): input, 5-minute
/// write, 1-hour write, read, output.
fn hand_priced(model: &str, k: Kinds) -> u64 {
    let rates: [u64; 5] = match model {
        OPUS => [5_000, 6_250, 10_000, 500, 25_000],
        SONNET => [3_000, 3_750, 6_000, 300, 15_000],
        HAIKU => [1_000, 1_250, 2_000, 100, 5_000],
        other => panic!("no hand price for {other}"),
    };
    k.0 * rates[0] + k.2 * rates[1] + k.3 * rates[2] + k.4 * rates[3] + k.1 * rates[4]
}

fn body(model: &str, k: Kinds, tag: &str, stream: bool) -> String {
    json!({
        "model": model, "max_tokens": 100, "stream": stream,
        "messages": [{"role": "user", "content": format!("cost {} {} {} {} {} {tag}", k.0, k.1, k.2, k.3, k.4)}],
    })
    .to_string()
}

fn usage_of(k: Kinds, split: bool) -> Value {
    let mut usage = json!({
        "input_tokens": k.0, "output_tokens": k.1,
        "cache_creation_input_tokens": k.2 + k.3, "cache_read_input_tokens": k.4,
    });
    if split {
        usage["cache_creation"] =
            json!({"ephemeral_5m_input_tokens": k.2, "ephemeral_1h_input_tokens": k.3});
    }
    usage
}

/// The fake upstream's script (see the module's comment).
fn answer(req: &Recorded) -> Reply {
    let text = first_user_text(req);
    let n: Vec<u64> = (text.split_whitespace().skip(1).take(5))
        .filter_map(|w| w.parse().ok())
        .collect();
    if !text.starts_with("cost ") || n.len() != 5 {
        return Reply::json(200, r#"{"data":[],"has_more":false}"#);
    }
    let k = Kinds(n[0], n[1], n[2], n[3], n[4]);
    let usage = usage_of(k, !text.contains("nosplit"));
    let body: Value = serde_json::from_slice(&req.body).unwrap_or_default();
    if body["stream"] == true {
        return Reply::Sse {
            events: super::stream_reporting(usage, k.1),
            gate: None,
            framing: crate::support::Framing::Chunked,
        };
    }
    Reply::json(
        200,
        &json!({"id": "msg_c", "type": "message", "role": "assistant", "model": body["model"],
            "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn", "usage": usage})
        .to_string(),
    )
}

fn gateway(up: &FakeUpstream, section: &str) -> Gateway {
    let gw = Gateway::new(&Config::new(up.base_url()).section(section));
    gw.add_api_key("primary", ACCOUNT_KEY);
    gw
}

fn ask(gw: &Gateway, key: &str, model: &str, k: Kinds, tag: &str) -> Response {
    post_anthropic(gw.addr(), key, &body(model, k, tag, false), &[])
}

/// `usage --json ARGS` once it counts `requests` requests.
fn counted(gw: &Gateway, args: &[&str], requests: u64) -> Value {
    let mut last = Value::Null;
    wait_until(
        &format!("usage {args:?} counting {requests}"),
        FLUSH_LIMIT,
        || {
            last = usage(gw, args);
            last["total"]["requests"].as_u64() == Some(requests)
        },
    );
    last
}

fn rows_by(v: &Value, by: &str) -> HashMap<String, Value> {
    (v["rows"].as_array().expect("rows").iter())
        .map(|r| (r[by].as_str().expect("label").to_string(), r.clone()))
        .collect()
}

fn nano(v: &Value) -> u64 {
    v["cost_nano_usd"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cost_nano_usd in {v}"))
}

#[test]
fn each_token_kind_is_priced_for_three_models_one_hour_cache_writes_included() {
    let up = FakeUpstream::start(answer);
    let mut gw = gateway(&up, "");
    let (_, key) = add_key(&gw, "alice", &[]);
    let admin = gw.add_admin_key("ops");
    gw.start();
    let k = Kinds(1_000, 200, 300, 400, 5_000);
    for (i, model) in [OPUS, SONNET, HAIKU].into_iter().enumerate() {
        let resp = ask(&gw, &key, model, k, &format!("m{i}"));
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    // A stream reports its split in message_start, as Anthropic's do.
    let streamed = post_anthropic(gw.addr(), &key, &body(HAIKU, k, "s", true), &[]);
    assert_eq!(streamed.status, 200);
    // Without the split, every write is priced as a 5-minute one, and marked.
    let estimated = ask(&gw, &key, HAIKU, Kinds(0, 0, 0, 1_000, 0), "nosplit");
    assert_eq!(estimated.status, 200);

    let by_model = counted(&gw, &["--by", "model"], 5);
    let rows = rows_by(&by_model, "model");
    assert_eq!(nano(&rows[OPUS]), 18_375_000, "{}", rows[OPUS]);
    assert_eq!(nano(&rows[OPUS]), hand_priced(OPUS, k));
    assert_eq!(nano(&rows[SONNET]), 11_025_000, "{}", rows[SONNET]);
    assert_eq!(nano(&rows[SONNET]), hand_priced(SONNET, k));
    let haiku = 2 * hand_priced(HAIKU, k) + 1_000 * 1_250;
    assert_eq!(nano(&rows[HAIKU]), haiku, "{}", rows[HAIKU]);
    assert_eq!(haiku, 2 * 3_675_000 + 1_250_000);
    assert_eq!(rows[HAIKU]["cache_write_1h_tokens"], 800, "{}", rows[HAIKU]);
    assert_eq!(
        rows[HAIKU]["cache_write_5m_tokens"], 1_600,
        "{}",
        rows[HAIKU]
    );
    assert_eq!(rows[HAIKU]["estimated_requests"], 1);
    assert_eq!(rows[OPUS]["cost_usd"], "0.018375000");
    let total = 18_375_000 + 11_025_000 + haiku;
    assert_eq!(nano(&by_model["total"]), total);

    // The same cost in the metrics (by account and model) and on each access log line.
    let metrics = call(gw.addr(), "GET", "/metrics", &[("x-api-key", &admin)], b"").text();
    let sum: f64 = (metrics.lines())
        .filter(|l| l.starts_with("llm_gateway_cost_usd_total{account=\"primary\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        (sum - total as f64 / 1e9).abs() < 1e-9,
        "{sum} in:\n{metrics}"
    );
    let logged: Vec<String> = super::access_lines(&gw.stderr())
        .iter()
        .filter_map(|l| l["cost_usd"].as_str().map(String::from))
        .collect();
    assert!(logged.contains(&"0.018375000".to_string()), "{logged:?}");

    // The table and CSV agree with the JSON.
    let out = cli_ok(&gw, &["usage", "--by", "model"]);
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("usage --by model, for this workload:\n{text}");
    assert!(
        text.contains("COST USD") && text.contains("0.018375"),
        "{text}"
    );
    assert!(text.contains("2026-07"), "names the table's date: {text}");
    let out = cli_ok(&gw, &["usage", "--by", "model", "--csv"]);
    let csv = String::from_utf8_lossy(&out.stdout);
    let opus_line = csv.lines().find(|l| l.starts_with(OPUS)).expect("opus row");
    assert_eq!(
        opus_line,
        format!("{OPUS},1,0,1000,200,300,400,5000,6900,0.018375,0")
    );
}

#[test]
fn unpriced_models_show_as_unpriced_and_a_usd_budget_refuses_them_unless_a_row_prices_them() {
    let up = FakeUpstream::start(answer);
    let mut gw = gateway(&up, "");
    let (_, open) = add_key(&gw, "open", &[]);
    let (_, capped) = add_key(&gw, "capped", &["--daily-usd", "5"]);
    gw.start();
    let k = Kinds(10, 10, 0, 0, 0);
    assert_eq!(ask(&gw, &open, "mystery-1", k, "a").status, 200);
    let v = counted(&gw, &["--by", "model"], 1);
    let row = &rows_by(&v, "model")["mystery-1"];
    assert_eq!(
        (row["unpriced_requests"].as_u64(), nano(row)),
        (Some(1), 0),
        "{row}"
    );
    let text =
        String::from_utf8_lossy(&cli_ok(&gw, &["usage", "--by", "model"]).stdout).to_string();
    assert!(text.contains("without a price"), "{text}");

    let refused = ask(&gw, &capped, "mystery-1", k, "b");
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert!(refused.text().contains("mystery-1"), "{}", refused.text());
    assert_eq!(up.requests().len(), 1, "the refused request went nowhere");

    // A fallback row prices every model: the same key may then use it.
    let up = FakeUpstream::start(answer);
    let section = "pricing:\n  - model: \"*\"\n    input: 2\n    output: 8\n";
    let mut gw = gateway(&up, section);
    let (_, capped) = add_key(&gw, "capped", &["--daily-usd", "5"]);
    gw.start();
    assert_eq!(ask(&gw, &capped, "mystery-1", k, "c").status, 200);
    let v = counted(&gw, &["--by", "model"], 1);
    assert_eq!(
        nano(&rows_by(&v, "model")["mystery-1"]),
        10 * 2_000 + 10 * 8_000
    );
}

#[test]
fn a_price_edit_changes_only_later_requests() {
    let up = FakeUpstream::start(answer);
    let mut gw = gateway(&up, "");
    let (_, key) = add_key(&gw, "alice", &[]);
    gw.start();
    let k = Kinds(1_000_000, 0, 0, 0, 0);
    assert_eq!(ask(&gw, &key, HAIKU, k, "before").status, 200);
    // The row replaces the embedded Haiku row whole: $4 per million input tokens from now on.
    let text =
        gw.config_text() + "pricing:\n  - model: claude-haiku-4-5\n    input: 4\n    output: 20\n";
    std::fs::write(gw.config_path(), text).expect("config written");
    let mut n = 1;
    poll_until(super::RELOAD_LIMIT, "the new price", || {
        n += 1;
        assert_eq!(ask(&gw, &key, HAIKU, k, &format!("after{n}")).status, 200);
        let v = counted(&gw, &["--by", "day"], n);
        nano(&v["total"]) > n * 1_000_000_000
    });
    let v = usage(&gw, &["--by", "day"]);
    let old = (n - 1) * 1_000_000_000;
    assert_eq!(
        nano(&v["total"]),
        old + 4_000_000_000,
        "{n} requests: the earlier ones keep the price they were served at"
    );
}

#[test]
fn a_usd_budget_refuses_at_the_right_moment_under_parallel_load() {
    let up = FakeUpstream::start(answer);
    let mut gw = gateway(&up, "");
    // Each request costs 100 output tokens of Haiku: $0.0005. The budget is 15 of them.
    let (_, key) = add_key(&gw, "capped", &["--daily-usd", "0.0075"]);
    gw.start();
    let k = Kinds(0, 100, 0, 0, 0);
    let statuses = in_parallel(40, |i| ask(&gw, &key, HAIKU, k, &format!("p{i}")).status);
    let served = statuses.iter().filter(|s| **s == 200).count() as u64;
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    // Reservations price each request's max_tokens (100) and its body's bytes: the budget is
    // never passed, and not refused much before it is spent.
    assert!(served <= 15, "{served} served: over the budget");
    assert!(
        served >= 13,
        "{served} served: refused before the budget was spent"
    );
    // Once spent, every request is refused, before it goes upstream, saying why.
    let upstream_before = up.requests().len();
    let v = counted(&gw, &["--key", "capped"], 40);
    assert!(nano(&v["total"]) <= 7_500_000, "{}", v["total"]);
    let more = (15 - served) as usize;
    for i in 0..more {
        ask(&gw, &key, HAIKU, k, &format!("top{i}"));
    }
    let refused = ask(&gw, &key, HAIKU, k, "last");
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.header("x-should-retry"), Some("false"));
    let message = refused.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    for part in ["daily USD budget of $0.007500", "used", "resets at"] {
        assert!(message.contains(part), "{part:?} in {message}");
    }
    assert!(up.requests().len() <= upstream_before + more);
    // OpenAI's clients get OpenAI's own code for it.
    let openai = post_openai(
        gw.addr(),
        &key,
        &json!({"model": HAIKU, "max_tokens": 10, "messages": [{"role": "user", "content": "cost 0 1 0 0 0 o"}]}).to_string(),
        &[],
    );
    assert_eq!(openai.status, 429);
    assert_eq!(
        openai.json()["error"]["code"],
        "insufficient_quota",
        "{}",
        openai.text()
    );
    assert_eq!(openai.json()["error"]["type"], "insufficient_quota");
}

#[test]
fn the_key_holders_endpoint_returns_what_usage_shows_for_that_key() {
    let up = FakeUpstream::start(answer);
    let mut gw = gateway(&up, "");
    let (alice_id, alice) = add_key(
        &gw,
        "alice",
        &["--monthly-usd", "20", "--daily-tokens", "1000000"],
    );
    let (_, bob) = add_key(&gw, "bob", &[]);
    let admin = gw.add_admin_key("ops");
    gw.start();
    for (i, model) in [OPUS, SONNET, HAIKU].into_iter().enumerate() {
        assert_eq!(
            ask(
                &gw,
                &alice,
                model,
                Kinds(100, 50, 10, 20, 30),
                &format!("a{i}")
            )
            .status,
            200
        );
    }
    assert_eq!(ask(&gw, &bob, HAIKU, Kinds(7, 7, 0, 0, 0), "b").status, 200);
    counted(&gw, &[], 4);

    let mine = call(
        gw.addr(),
        "GET",
        "/gateway/usage",
        &[("x-api-key", &alice)],
        b"",
    );
    assert_eq!(mine.status, 200, "{}", mine.text());
    let mine = mine.json();
    assert_eq!(mine["key"]["name"], "alice");
    for period in ["day", "week", "month"] {
        let since = mine["usage"][period]["since"]
            .as_str()
            .expect("since")
            .to_string();
        let cli = usage(&gw, &["--key", "alice", "--since", &since]);
        let mut endpoint = mine["usage"][period].clone();
        endpoint.as_object_mut().expect("object").remove("since");
        let mut total = cli["total"].clone();
        total.as_object_mut().expect("object").remove("total");
        assert_eq!(endpoint, total, "{period}");
    }
    assert_eq!(mine["usage"]["day"]["requests"], 3);
    let budgets: HashMap<String, Value> = (mine["budgets"].as_array().expect("budgets").iter())
        .map(|b| (b["budget"].as_str().expect("name").to_string(), b.clone()))
        .collect();
    let spent = nano(&mine["usage"]["month"]);
    assert_eq!(budgets["monthly_usd"]["limit_usd"], "20.000000000");
    let left = 20_000_000_000 - spent;
    assert_eq!(
        budgets["monthly_usd"]["left_usd"],
        format!("{}.{:09}", left / 1_000_000_000, left % 1_000_000_000)
    );
    assert_eq!(budgets["daily_tokens"]["used_tokens"], 3 * 210);
    assert!(
        budgets["daily_tokens"]["resets_at"]
            .as_str()
            .is_some_and(|t| t.ends_with("T00:00:00Z"))
    );

    // Only one's own; an admin key may name any key, by name or id.
    let peek = call(
        gw.addr(),
        "GET",
        "/gateway/usage?key=alice",
        &[("x-api-key", &bob)],
        b"",
    );
    assert_eq!(peek.status, 403, "{}", peek.text());
    let named = call(
        gw.addr(),
        "GET",
        &format!("/gateway/usage?key={alice_id}"),
        &[("x-api-key", &admin)],
        b"",
    );
    assert_eq!(named.status, 200, "{}", named.text());
    assert_eq!(named.json()["usage"], mine["usage"]);
    let nobody = call(gw.addr(), "GET", "/gateway/usage", &[], b"");
    assert_eq!(nobody.status, 401);
}

#[test]
fn usage_groups_by_week_and_month_and_filters_by_key() {
    let up = FakeUpstream::start(answer);
    let mut gw = gateway(&up, "");
    let (_, alice) = add_key(&gw, "alice", &[]);
    let (_, bob) = add_key(&gw, "bob", &[]);
    gw.start();
    assert_eq!(
        ask(&gw, &alice, HAIKU, Kinds(1, 1, 0, 0, 0), "a").status,
        200
    );
    assert_eq!(ask(&gw, &bob, HAIKU, Kinds(2, 2, 0, 0, 0), "b").status, 200);
    counted(&gw, &[], 2);
    for by in ["week", "month", "hour"] {
        let v = usage(&gw, &["--by", by]);
        // One row each, unless the two requests straddled a boundary.
        let rows = v["rows"].as_array().map_or(0, Vec::len);
        assert!((1..=2).contains(&rows), "{by}: {v}");
        assert_eq!(v["total"]["requests"], 2, "{by}");
    }
    let v = usage(&gw, &["--by", "week"]);
    let monday = v["rows"][0]["week"].as_str().expect("week").to_string();
    let day =
        crate::support::accounts::unix_from_rfc3339(&format!("{monday}T00:00:00Z")) as u64 / 86_400;
    assert_eq!(
        (day + 3) % 7,
        0,
        "a week is labelled by its Monday: {monday}"
    );
    let out = gw.run_cli(&["usage", "--key", "nobody"]);
    assert_eq!(out.status.code(), Some(6), "an unknown key is not found");
    let v = usage(&gw, &["--key", "bob", "--since", &monday]);
    assert_eq!(v["total"]["requests"], 1);
    assert_eq!(nano(&v["total"]), 2 * 1_000 + 2 * 5_000);
}

#[test]
fn a_body_whose_model_cannot_be_read_is_refused_not_served_free() {
    let up = FakeUpstream::start(answer);
    let mut gw = gateway(&up, "");
    let (_, key) = add_key(&gw, "capped", &["--daily-usd", "1"]);
    gw.start();
    // A repeated field hides the model from the gateway's reading (serde refuses duplicates)
    // while an upstream might take the last one: it would go unpriced, past the budget.
    let body = r#"{"model":"claude-opus-4-6","model":"claude-opus-4-6","max_tokens":32000,"messages":[{"role":"user","content":"cost 0 10 0 0 0 dup"}]}"#;
    let resp = post_anthropic(gw.addr(), &key, body, &[]);
    assert_eq!(resp.status, 400, "{}", resp.text());
    assert!(resp.text().contains("model"), "{}", resp.text());
    let long = format!(
        r#"{{"model":"{}","max_tokens":1,"messages":[{{"role":"user","content":"q"}}]}}"#,
        "m".repeat(300)
    );
    assert_eq!(post_anthropic(gw.addr(), &key, &long, &[]).status, 400);
    assert!(up.requests().is_empty(), "nothing went upstream");
}

#[test]
fn a_stream_cut_after_its_start_is_charged_at_least_what_it_reserved() {
    // The upstream sends message_start (input counted, one output token) and breaks: what the
    // answer really cost is unknown, and the key is charged at least its reservation.
    let up = FakeUpstream::start(|_| {
        Reply::Sse {
        events: vec![
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_cut\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n".into(),
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n".into(),
        ],
        gate: None,
        framing: crate::support::Framing::Chunked,
    }
    });
    let mut gw = gateway(&up, "");
    let (_, key) = add_key(&gw, "capped", &["--daily-usd", "5"]);
    gw.start();
    let body = json!({"model": HAIKU, "max_tokens": 1000, "stream": true,
        "messages": [{"role": "user", "content": "hello"}]})
    .to_string();
    let resp = post_anthropic(gw.addr(), &key, &body, &[]);
    assert_eq!(resp.status, 200);
    let reserved = (body.len() as u64 / 4) * 1_000 + 1_000 * 5_000;
    let v = counted(&gw, &["--key", "capped"], 1);
    assert!(
        nano(&v["total"]) >= reserved,
        "charged {} for a reservation of {reserved}: {}",
        nano(&v["total"]),
        v["total"]
    );
}
