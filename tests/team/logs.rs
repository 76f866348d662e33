//! The access log and request ids: one JSON line per request with the contract's keys, the
//! client's `x-request-id` echoed when sane and a generated one otherwise (on errors too), and
//! the lines going to `log.access_file` instead of stderr when it is set.

use std::collections::BTreeSet;

use serde_json::Value;

use super::{
    ALIAS_SECTION, GPT, HAIKU, SONNET, Tokens, access_line, access_lines, add_key, answer,
    anthropic_body, failing_body, openai_body, post_anthropic, post_openai,
};
use crate::support::accounts::{unix_from_rfc3339, unix_now};
use crate::support::{
    ACCOUNT_KEY, Config, Conn, FakeUpstream, Gateway, Response, assert_error, call, sorted_keys,
    wait_until,
};

/// The keys of an access log line, as the contract lists them.
/// Every key of a line without failover (`failover` joins them when there was).
const LINE_KEYS: [&str; 18] = [
    "time",
    "request_id",
    "cost_usd",
    "method",
    "path",
    "client",
    "client_id",
    "address",
    "user_agent",
    "account",
    "model",
    "format",
    "status",
    "latency_ms",
    "ttfb_ms",
    "tokens",
    "attempts",
    "error",
];

/// One request of the access log test and what its line should say.
struct Case {
    what: &'static str,
    /// The `x-request-id` the client sent, if any.
    sent: Option<String>,
    /// Whether the gateway must echo it (it is sane) or make its own.
    echoed: bool,
    resp: Response,
    /// Fields the line must have with exactly these values.
    fields: Value,
    /// Whether the line's `error` is set (a refusal) or null (served), or unchecked.
    error: Option<bool>,
}

fn is_generated_id(id: &str) -> bool {
    id.len() > 4
        && id.starts_with("req_")
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

fn tokens_json(t: Tokens) -> Value {
    serde_json::json!({"input": t.input, "output": t.output,
                       "cache_creation": t.cache_creation, "cache_1h": 0, "cache_read": t.cache_read})
}

#[test]
fn every_request_gets_one_access_line_and_a_request_id() {
    let up = FakeUpstream::start(answer);
    let mut gw = Gateway::new(&Config::new(up.base_url()).section(ALIAS_SECTION));
    let account = gw.add_api_key("primary", ACCOUNT_KEY);
    let key = gw.add_client_key("tests");
    let (_, limited) = add_key(&gw, "haiku-only", &["--models", HAIKU]);
    gw.start();
    let addr = gw.addr();
    let started = unix_now();

    let (ta, tb, tc, td) = (
        Tokens::new(21, 8, 2, 1),
        Tokens::new(13, 9, 0, 4),
        Tokens::new(7, 3, 0, 0),
        Tokens::new(9, 6, 1, 1),
    );
    let long_id = "a".repeat(129);
    let mut cases = vec![
        Case {
            what: "anthropic message",
            sent: Some("client-id.1:A_b-c".into()),
            echoed: true,
            resp: post_anthropic(
                addr,
                &key,
                &anthropic_body(SONNET, ta, false, "a"),
                &[("x-request-id", "client-id.1:A_b-c")],
            ),
            fields: serde_json::json!({"method": "POST", "path": "/v1/messages", "client": "tests",
                "model": SONNET, "format": "anthropic", "status": 200, "tokens": tokens_json(ta),
                "attempts": 1}),
            error: Some(false),
        },
        Case {
            what: "anthropic stream, no id",
            sent: None,
            echoed: false,
            resp: post_anthropic(addr, &key, &anthropic_body(HAIKU, tb, true, "b"), &[]),
            fields: serde_json::json!({"method": "POST", "path": "/v1/messages", "client": "tests",
                "model": HAIKU, "format": "anthropic", "status": 200, "tokens": tokens_json(tb),
                "attempts": 1}),
            error: Some(false),
        },
        Case {
            what: "openai completion",
            sent: Some("openai-call-7".into()),
            echoed: true,
            resp: post_openai(
                addr,
                &key,
                &openai_body(GPT, tc, false, "c"),
                &[("x-request-id", "openai-call-7")],
            ),
            fields: serde_json::json!({"method": "POST", "path": "/v1/chat/completions",
                "client": "tests", "model": GPT, "format": "openai", "status": 200,
                "tokens": tokens_json(tc), "attempts": 1}),
            error: Some(false),
        },
        Case {
            what: "openai stream, id too long",
            sent: Some(long_id.clone()),
            echoed: false,
            resp: post_openai(
                addr,
                &key,
                &openai_body(GPT, td, true, "d"),
                &[("x-request-id", &long_id)],
            ),
            fields: serde_json::json!({"path": "/v1/chat/completions", "model": GPT,
                "format": "openai", "status": 200, "tokens": tokens_json(td)}),
            error: Some(false),
        },
        Case {
            what: "no gateway key",
            sent: Some("unauth-1".into()),
            echoed: true,
            resp: post_anthropic(
                addr,
                "",
                &anthropic_body(SONNET, ta, false, "e"),
                &[("x-request-id", "unauth-1")],
            ),
            fields: serde_json::json!({"method": "POST", "path": "/v1/messages", "status": 401,
                "tokens": tokens_json(Tokens::default()), "attempts": 0}),
            error: Some(true),
        },
        Case {
            what: "unknown route, id with a slash",
            sent: Some("bad/id".into()),
            echoed: false,
            resp: call(
                addr,
                "GET",
                "/v1/nope",
                &[("x-api-key", &key), ("x-request-id", "bad/id")],
                b"",
            ),
            fields: serde_json::json!({"method": "GET", "path": "/v1/nope", "status": 404, "attempts": 0}),
            error: Some(true),
        },
        Case {
            what: "model not allowed",
            sent: Some("refused-403".into()),
            echoed: true,
            resp: post_anthropic(
                addr,
                &limited,
                &anthropic_body(SONNET, ta, false, "g"),
                &[("x-request-id", "refused-403")],
            ),
            fields: serde_json::json!({"client": "haiku-only", "model": SONNET, "status": 403,
                "attempts": 0, "tokens": tokens_json(Tokens::default())}),
            error: Some(true),
        },
        Case {
            what: "upstream 500",
            sent: Some("upstream-500".into()),
            echoed: true,
            resp: post_anthropic(
                addr,
                &key,
                &failing_body(SONNET, 500, "h"),
                &[("x-request-id", "upstream-500")],
            ),
            fields: serde_json::json!({"client": "tests", "model": SONNET, "status": 500,
                "attempts": 1, "tokens": tokens_json(Tokens::default())}),
            error: None,
        },
    ];
    let finished = unix_now();

    // Every response carries an id: the client's when sane, else a fresh one.
    let mut generated = BTreeSet::new();
    for case in &mut cases {
        let id = case
            .resp
            .header("x-request-id")
            .unwrap_or_else(|| panic!("{}: no x-request-id on the {}", case.what, case.resp.status))
            .to_string();
        if case.echoed {
            assert_eq!(
                Some(&id),
                case.sent.as_ref(),
                "{}: the client's id",
                case.what
            );
        } else {
            assert!(
                is_generated_id(&id),
                "{}: a generated id, not {id:?}",
                case.what
            );
            assert!(
                generated.insert(id.clone()),
                "{}: {id} used twice",
                case.what
            );
        }
        case.fields["request_id"] = id.into();
    }

    // One line per request, with every key.
    let ids: Vec<String> = cases
        .iter()
        .map(|c| c.fields["request_id"].as_str().expect("id").to_string())
        .collect();
    wait_until(
        "an access line for every request",
        std::time::Duration::from_secs(5),
        || {
            let text = gw.stderr();
            ids.iter().all(|id| access_line(&text, id).is_some())
        },
    );
    let lines = access_lines(&gw.stderr());
    assert_eq!(
        lines.len(),
        cases.len(),
        "one line per request, no more: {lines:#?}"
    );
    for case in &cases {
        let id = &case.fields["request_id"];
        let mine: Vec<&Value> = lines.iter().filter(|l| &l["request_id"] == id).collect();
        assert_eq!(mine.len(), 1, "{}: one line for {id}", case.what);
        let line = mine[0];
        let mut want = LINE_KEYS.to_vec();
        want.sort_unstable();
        assert_eq!(
            sorted_keys(line),
            want,
            "{}: the line's keys: {line}",
            case.what
        );
        for (field, value) in case.fields.as_object().expect("fields") {
            assert_eq!(&line[field], value, "{}: {field} in {line}", case.what);
        }
        let time = unix_from_rfc3339(line["time"].as_str().expect("time is a string"));
        assert!(
            time >= started.floor() - 1.0 && time <= finished + 1.0,
            "{}: time {time} outside the test's {started}..{finished}",
            case.what
        );
        let latency = line["latency_ms"]
            .as_f64()
            .unwrap_or_else(|| panic!("{}: latency_ms in {line}", case.what));
        assert!(latency >= 0.0);
        match &line["ttfb_ms"] {
            Value::Null => assert_ne!(
                case.resp.status, 200,
                "{}: a served request has a ttfb",
                case.what
            ),
            v => {
                let ttfb = v
                    .as_f64()
                    .unwrap_or_else(|| panic!("{}: ttfb_ms {v}", case.what));
                assert!(
                    (0.0..=latency + 1.0).contains(&ttfb),
                    "{}: ttfb {ttfb} vs latency {latency}",
                    case.what
                );
            }
        }
        if line["attempts"] == 0 {
            assert!(
                line["account"].is_null() || line["account"] == "-",
                "{}: no account was used: {line}",
                case.what
            );
        } else {
            assert!(
                line["account"] == account.as_str() || line["account"] == "primary",
                "{}: the account that served it: {line}",
                case.what
            );
        }
        match case.error {
            Some(true) => assert!(
                line["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{}: the refusal says why: {line}",
                case.what
            ),
            Some(false) => assert!(line["error"].is_null(), "{}: no error: {line}", case.what),
            None => {}
        }
    }
}

#[test]
fn log_access_file_takes_the_lines_instead_of_stderr() {
    let up = FakeUpstream::start(answer);
    let mut gw =
        Gateway::new(&Config::new(up.base_url()).section("log:\n  access_file: access.log\n"));
    gw.add_api_key("primary", ACCOUNT_KEY);
    let key = gw.add_client_key("tests");
    gw.start();

    let ok = post_anthropic(
        gw.addr(),
        &key,
        &anthropic_body(SONNET, Tokens::new(1, 1, 0, 0), false, "f"),
        &[("x-request-id", "file-1")],
    );
    assert_eq!(ok.status, 200);
    let refused = post_anthropic(
        gw.addr(),
        "lgw_not-a-key",
        "{}",
        &[("x-request-id", "file-2")],
    );
    assert_eq!(refused.status, 401);

    // Relative to the config file, not to the working directory.
    let path = gw.dir().join("access.log");
    let read = || std::fs::read_to_string(&path).unwrap_or_default();
    wait_until(
        "both lines in access.log",
        std::time::Duration::from_secs(5),
        || {
            let text = read();
            access_line(&text, "file-1").is_some() && access_line(&text, "file-2").is_some()
        },
    );
    let lines = access_lines(&read());
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert_eq!(
        lines
            .iter()
            .find(|l| l["request_id"] == "file-1")
            .map(|l| &l["status"]),
        Some(&200.into())
    );
    assert!(
        access_lines(&gw.stderr()).is_empty(),
        "no access line on stderr when a file is set:\n{}",
        gw.stderr()
    );
}

/// Stricter reading of "returned as x-request-id on every response (including errors)" and
/// "every request produces one line": a request refused while it is read (too large) too.
#[test]
fn a_request_refused_while_read_still_gets_its_id_and_its_line() {
    let up = FakeUpstream::start(answer);
    let gw = Gateway::started(&Config::new(up.base_url()));

    let mut conn = Conn::open(gw.addr());
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: gateway.test\r\nx-api-key: {}\r\n\
         x-request-id: too-big-1\r\ncontent-type: application/json\r\n\
         content-length: 2000000\r\n\r\n",
        gw.client_key()
    );
    conn.send(head.as_bytes());
    let resp = conn.read_response();
    assert_error(&resp, 413, Some("request_too_large"));
    assert_eq!(
        resp.header("x-request-id"),
        Some("too-big-1"),
        "the 413 carries the client's request id"
    );
    wait_until(
        "an access line for the 413",
        std::time::Duration::from_secs(5),
        || access_line(&gw.stderr(), "too-big-1").is_some(),
    );
}

#[test]
fn log_level_debug_shows_each_attempt_each_skip_and_each_rest() {
    // `log.level: debug` says what the gateway decided: the attempt on the account that is
    // rate limited, why it cannot serve, the attempt on the next, and, on the next request,
    // that the resting account was skipped; ureq's own diagnostics show too, its headers
    // redacted (no key in the log).
    use crate::support::accounts::{KEY_A, KEY_B, post, rests_key_a_once, started};
    let (up, _switch) = rests_key_a_once(true);
    let config = Config::new(up.base_url())
        .log_level("debug")
        .section("balance:\n  strategy: fill_first\n");
    let (gw, ids) = started(&config, &[("alpha", KEY_A, &[]), ("bravo", KEY_B, &[])]);
    assert_eq!(post(&gw).status, 200, "failed over to bravo");
    assert_eq!(post(&gw).status, 200, "bravo again while alpha rests");
    let (alpha, bravo) = (&ids[0], &ids[1]);
    let expected = [
        format!("attempt 1 on account {alpha} (alpha)"),
        format!("account {alpha} cannot serve it (its 429); trying the next"),
        format!("attempt 2 on account {bravo} (bravo)"),
        format!("account {bravo} answers 200"),
        format!("account {alpha}: skipped, resting"),
        "[ureq]".to_string(),
    ];
    wait_until(
        "the debug lines are written",
        std::time::Duration::from_secs(5),
        || {
            let log = gw.stderr();
            expected.iter().all(|line| log.contains(line.as_str()))
        },
    );
    let log = gw.stderr();
    for key in [KEY_A, KEY_B, gw.client_key()] {
        assert!(!log.contains(key), "a key in the debug log:\n{log}");
    }
}
