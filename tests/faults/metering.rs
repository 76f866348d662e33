//! Trust boundaries, part 2 (README: Reliability): every token an answer costs is metered,
//! whatever its framing and size, so budgets count it.

use std::time::Duration;

use serde_json::Value;

use crate::support::{
    ACCOUNT_KEY, Config, FakeUpstream, Framing, Gateway, MESSAGE_BODY, Reply, assert_exit, call,
};

/// A message of `input` + `output` tokens, padded to `pad` bytes of text, with its `usage`
/// last (where a streaming scan meets it only at the very end).
fn message(input: u64, output: u64, pad: usize) -> Vec<u8> {
    format!(
        r#"{{"id":"msg_big","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{{"type":"text","text":"{}"}}],"stop_reason":"end_turn","usage":{{"input_tokens":{input},"output_tokens":{output},"cache_read_input_tokens":0}}}}"#,
        "x".repeat(pad)
    )
    .into_bytes()
}

/// Non-streaming answers sent chunked, close-delimited, or larger than the gateway reads
/// whole (300 KiB) are metered as they pass: the ledger holds their tokens and a 100-token
/// daily budget trips after the first.
#[test]
fn answers_of_every_framing_and_size_are_metered() {
    let up = FakeUpstream::start(|req| {
        let body = String::from_utf8_lossy(&req.body).into_owned();
        if body.contains("chunked") {
            Reply::Framed {
                status: 200,
                body: message(4_000, 6_000, 2_000),
                framing: Framing::Chunked,
                piece: 7,
            }
        } else if body.contains("close") {
            Reply::Framed {
                status: 200,
                body: message(4_000, 6_000, 2_000),
                framing: Framing::CloseDelimited,
                piece: 1000,
            }
        } else {
            Reply::Json {
                status: 200,
                headers: Vec::new(),
                body: message(4_000, 6_000, 300 * 1024),
            }
        }
    });
    let mut gw = Gateway::new(&Config::new(up.base_url()));
    gw.add_api_key("primary", ACCOUNT_KEY);
    let mut keys = Vec::new();
    for framing in ["chunked", "close", "large"] {
        let key = gw.add_client_key(framing);
        let out = gw.run_cli(&["list-client-keys", "--json"]);
        let list: Value = serde_json::from_slice(&out.stdout).expect("json");
        let id = list
            .as_array()
            .and_then(|l| l.iter().find(|k| k["name"] == framing))
            .and_then(|k| k["id"].as_str())
            .expect("id")
            .to_string();
        let out = gw.run_cli(&[
            "update-client-key",
            "--key-id",
            &id,
            "--daily-tokens",
            "100",
        ]);
        assert_exit(&out, 0, "daily budget");
        keys.push((framing, key));
    }
    gw.start();
    for (framing, key) in &keys {
        let body = MESSAGE_BODY.replace("\"hi\"", &format!("\"{framing}\""));
        let first = call(
            gw.addr(),
            "POST",
            "/v1/messages",
            &[("x-api-key", key)],
            body.as_bytes(),
        );
        assert_eq!(first.status, 200, "{framing}: {}", first.text());
        let v: Value = first.json();
        assert_eq!(
            v["usage"]["output_tokens"], 6_000,
            "{framing}: relayed whole"
        );
        let second = call(
            gw.addr(),
            "POST",
            "/v1/messages",
            &[("x-api-key", key)],
            body.as_bytes(),
        );
        assert_eq!(
            second.status,
            429,
            "{framing}: the budget counted the first: {}",
            second.text()
        );
    }
    // The ledger on disk (flushed every second) holds them too: three answers of 10,000
    // tokens each.
    let mut last = String::new();
    crate::support::accounts::poll_until(Duration::from_secs(10), "usage on disk", || {
        let out = gw.run_cli(&["usage", "--json"]);
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        let usage: Value = serde_json::from_str(&last).unwrap_or_default();
        usage["total"]["input_tokens"] == 12_000 && usage["total"]["output_tokens"] == 18_000
    });
}
