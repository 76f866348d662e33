//! The usage ledger and the `usage` command: every request counted exactly once across a
//! `kill -9` under load (a torn last line skipped, a second server on the same config not
//! writing), readable files, and `usage` grouped by key, account, model and day, filtered by
//! date, as JSON and as an aligned table.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{
    ALIAS_SECTION, GPT, HAIKU, SONNET, Tokens, add_key, answer, anthropic_body, cli_ok,
    failing_body, first_user_text, openai_body, post_anthropic, post_openai, row_tokens,
    served_tokens, usage, usage_once_counted, utc_date,
};
use crate::support::accounts::{KEY_A, KEY_B, poll_until};
use crate::support::{
    Config, FakeUpstream, Gateway, Recorded, Response, assert_error, assert_exit, now_unix,
};

/// One request a test sends, and what it should be counted as.
#[derive(Debug, Clone)]
struct Planned {
    /// Which of the test's gateway keys sends it.
    key: usize,
    openai: bool,
    stream: bool,
    model: &'static str,
    tokens: Tokens,
    /// Unique, so the upstream's copy can be found (and with it the account that served it).
    tag: String,
}

impl Planned {
    /// The `i`th request of a mixed load: three keys, JSON and streams, both formats.
    fn mixed(i: usize, phase: &str) -> Planned {
        let openai = i % 5 == 4;
        let model = if openai {
            GPT
        } else if i.is_multiple_of(3) {
            HAIKU
        } else {
            SONNET
        };
        let n = i as u64;
        Planned {
            key: i % 3,
            openai,
            stream: i.is_multiple_of(2),
            model,
            tokens: Tokens::new(100 + n, 1 + n % 9, n % 4 * 3, n % 5 * 2),
            tag: format!("{phase}-{i}"),
        }
    }

    fn send(&self, addr: SocketAddr, key: &str) -> Response {
        let resp = if self.openai {
            post_openai(
                addr,
                key,
                &openai_body(self.model, self.tokens, self.stream, &self.tag),
                &[],
            )
        } else {
            post_anthropic(
                addr,
                key,
                &anthropic_body(self.model, self.tokens, self.stream, &self.tag),
                &[],
            )
        };
        assert_eq!(resp.status, 200, "{}: {}", self.tag, resp.text());
        let text = resp.text();
        let ended = match (self.openai, self.stream) {
            (false, true) => text.contains("event: message_stop"),
            (true, true) => text.contains("data: [DONE]"),
            _ => true,
        };
        assert!(ended, "{}: the stream ended properly: {text}", self.tag);
        resp
    }
}

/// The upstream request that carried `tag`.
fn upstream_copy<'a>(requests: &'a [Recorded], tag: &str) -> &'a Recorded {
    let suffix = format!(" {tag}");
    requests
        .iter()
        .find(|r| first_user_text(r).ends_with(&suffix))
        .unwrap_or_else(|| panic!("the upstream never saw {tag}"))
}

/// Expected (requests, tokens) per label.
type Expected = BTreeMap<String, (u64, Tokens)>;

fn expect(map: &mut Expected, label: &str, tokens: Tokens) {
    let entry = map.entry(label.to_string()).or_default();
    entry.0 += 1;
    entry.1.add(tokens);
}

/// Checks `usage --json --by BY` rows against the expected (requests, tokens) per label.
fn assert_rows(view: &Value, by: &str, expected: &Expected) {
    let rows = view["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("no rows in {view}"));
    let got: Expected = rows
        .iter()
        .map(|r| {
            let label = r[by]
                .as_str()
                .unwrap_or_else(|| panic!("row without a {by}: {r}"))
                .to_string();
            let requests = r["requests"].as_u64().expect("requests");
            let tokens = row_tokens(r);
            assert_eq!(
                r["total_tokens"].as_u64(),
                Some(tokens.total()),
                "total_tokens is the sum of the four: {r}"
            );
            (label, (requests, tokens))
        })
        .collect();
    assert_eq!(&got, expected, "usage --by {by}: {view}");
}

#[test]
fn the_ledger_counts_every_request_exactly_once_across_a_kill_9_under_load() {
    let up = FakeUpstream::start(answer);
    let mut gw = Gateway::new(&Config::new(up.base_url()).section(ALIAS_SECTION));
    let alpha = gw.add_api_key("alpha", KEY_A);
    let bravo = gw.add_api_key("bravo", KEY_B);
    let keys: Vec<(String, String)> = ["alice", "bob", "carol"]
        .iter()
        .map(|name| add_key(&gw, name, &[]))
        .collect();
    gw.start();

    // 50 requests from 5 clients at once.
    let first: Vec<Planned> = (0..50).map(|i| Planned::mixed(i, "load")).collect();
    thread::scope(|s| {
        for chunk in first.chunks(10) {
            let (gw, keys) = (&gw, &keys);
            s.spawn(move || {
                for p in chunk {
                    p.send(gw.addr(), &keys[p.key].1);
                }
            });
        }
    });

    // A second server on the same config serves, and records its requests in a side journal
    // of its own (counted at once, folded in when it takes the ledger over).
    let second = gw.spawn_server(&[]);
    let extra: Vec<Planned> = (0..2).map(|i| Planned::mixed(i, "second")).collect();
    for p in &extra {
        p.send(second.addr(), &keys[p.key].1);
    }
    let second_done = Instant::now();
    assert!(
        second.stderr().contains("takes the ledger over"),
        "the second server says how it records usage:\n{}",
        second.stderr()
    );

    let view = usage_once_counted(&gw, &[], 52);
    assert_eq!(view["total"]["requests"], 52, "before the kill: {view}");

    // kill -9, with a line torn as a crash in the middle of an append would leave it.
    gw.stop();
    let dir = gw.dir().join("usage");
    let journals = journal_files(&dir);
    let last = journals.last().expect("a journal file before the restart");
    std::fs::OpenOptions::new()
        .append(true)
        .open(last)
        .and_then(|mut f| f.write_all(br#"{"t":1,"key":"ck_torn","account":"acc_torn","mod"#))
        .expect("tear the journal's last line");
    gw.start();

    let after: Vec<Planned> = (50..56).map(|i| Planned::mixed(i, "after")).collect();
    for p in &after {
        p.send(gw.addr(), &keys[p.key].1);
    }
    let sent: Vec<&Planned> = first.iter().chain(&extra).chain(&after).collect();
    let total_requests = sent.len() as u64;
    usage_once_counted(&gw, &[], total_requests);

    // Exactly what was sent through the recording server, by every grouping.
    let requests = up.requests();
    assert_eq!(
        requests.len(),
        sent.len(),
        "one upstream request per client request"
    );
    let account_id = |req: &Recorded| match req.api_key() {
        k if k == KEY_A => alpha.clone(),
        k if k == KEY_B => bravo.clone(),
        other => panic!("unknown upstream key {other:?}"),
    };
    let (mut by_key, mut by_account, mut by_model) =
        (Expected::new(), Expected::new(), Expected::new());
    let mut total = Tokens::default();
    for p in &sent {
        let copy = upstream_copy(&requests, &p.tag);
        assert_eq!(served_tokens(copy), p.tokens, "{}", p.tag);
        expect(&mut by_key, &keys[p.key].0, p.tokens);
        expect(&mut by_account, &account_id(copy), p.tokens);
        expect(&mut by_model, p.model, p.tokens);
        total.add(p.tokens);
    }
    let view = usage(&gw, &[]);
    let t = &view["total"];
    assert_eq!(
        (t["requests"].as_u64(), t["errors"].as_u64(), row_tokens(t)),
        (Some(total_requests), Some(0), total),
        "usage totals after the restart: {view}"
    );
    assert_eq!(t["total_tokens"].as_u64(), Some(total.total()));
    assert_rows(&usage(&gw, &["--by", "key"]), "key", &by_key);
    assert_rows(&usage(&gw, &["--by", "account"]), "account", &by_account);
    assert_rows(&usage(&gw, &["--by", "model"]), "model", &by_model);

    // The files: a summary that parses, and journals whose every line is a record, but for
    // the torn one (kept, with the journal it ends, beside the previous summary until the
    // next fold).
    let summary = std::fs::read(dir.join("summary.json")).expect("usage/summary.json");
    serde_json::from_slice::<Value>(&summary).expect("summary.json is JSON");
    let journals = journal_files(&dir);
    assert!(!journals.is_empty(), "no journal-N.jsonl in {dir:?}");
    let mut lines = 0;
    for path in &journals {
        let text = std::fs::read_to_string(path).expect("read journal");
        for line in text.lines() {
            if line.contains("ck_torn") && text.ends_with(line) {
                continue;
            }
            let record: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{path:?}: a line that does not parse ({e}): {line}"));
            let values: Vec<&Value> = record
                .as_object()
                .unwrap_or_else(|| panic!("{path:?}: not an object: {line}"))
                .values()
                .collect();
            assert!(
                keys.iter()
                    .any(|(id, _)| values.contains(&&Value::from(id.as_str()))),
                "{path:?}: the record names no key id: {line}"
            );
            lines += 1;
        }
    }
    assert!(
        lines >= after.len(),
        "the requests after the restart are journaled ({lines} lines)"
    );
    // Had a request been counted twice (a side journal folded and still read), it would show
    // within a flush interval: watch the totals until well past one.
    poll_until(
        Duration::from_secs(5),
        "a flush interval after the second server's requests",
        || {
            let v = usage(&gw, &[]);
            assert_eq!(
                v["total"]["requests"].as_u64(),
                Some(total_requests),
                "every request counted once: {v}"
            );
            second_done.elapsed() >= Duration::from_millis(1500)
        },
    );
    drop(second);
}

/// `journal-N.jsonl` files in `dir`, by name.
fn journal_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {dir:?}: {e}"))
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("journal-") && n.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    files
}

#[test]
fn usage_groups_by_key_account_model_and_day_and_filters_by_date() {
    let up = FakeUpstream::start(answer);
    let mut gw = Gateway::new(&Config::new(up.base_url()));
    let alpha = gw.add_api_key("alpha", KEY_A);
    let bravo = gw.add_api_key("bravo", KEY_B);
    let (alice, alice_key) = add_key(&gw, "alice", &[]);
    let (bob, bob_key) = add_key(&gw, "bob", &["--models", HAIKU]);
    gw.start();

    let t1 = Tokens::new(11, 4, 2, 1);
    let t2 = Tokens::new(20, 6, 0, 3);
    let t3 = Tokens::new(5, 5, 5, 5);
    let send = |key: &str, body: String| post_anthropic(gw.addr(), key, &body, &[]);
    assert_eq!(
        send(&alice_key, anthropic_body(SONNET, t1, false, "u1")).status,
        200
    );
    assert_eq!(
        send(&alice_key, anthropic_body(HAIKU, t2, true, "u2")).status,
        200
    );
    assert_eq!(
        send(&bob_key, anthropic_body(HAIKU, t3, false, "u3")).status,
        200
    );
    assert_error(
        &send(&bob_key, anthropic_body(SONNET, t3, false, "u4")),
        403,
        None,
    );
    assert_eq!(
        send(&alice_key, failing_body(SONNET, 400, "u5")).status,
        400
    );
    let today = now_unix();
    let all = usage_once_counted(&gw, &[], 5);

    // (requests, errors, tokens) per label.
    let sum = |t: &[Tokens]| {
        let mut s = Tokens::default();
        t.iter().for_each(|x| s.add(*x));
        s
    };
    let total = (5, 2, sum(&[t1, t2, t3]));
    let row_of = |view: &Value, by: &str, label: &str| -> (u64, u64, Tokens) {
        let r = view["rows"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r[by] == label))
            .unwrap_or_else(|| panic!("no {by} row {label} in {view}"));
        (
            r["requests"].as_u64().expect("requests"),
            r["errors"].as_u64().expect("errors"),
            row_tokens(r),
        )
    };
    let total_of = |view: &Value| {
        let t = &view["total"];
        (
            t["requests"].as_u64().expect("total requests"),
            t["errors"].as_u64().expect("total errors"),
            row_tokens(t),
        )
    };
    assert_eq!(total_of(&all), total, "{all}");

    let by_key = usage(&gw, &["--by", "key"]);
    assert_eq!(by_key["by"], "key");
    assert_eq!(by_key["rows"].as_array().map(Vec::len), Some(2), "{by_key}");
    assert_eq!(row_of(&by_key, "key", &alice), (3, 1, sum(&[t1, t2])));
    assert_eq!(row_of(&by_key, "key", &bob), (2, 1, t3));
    for (id, name) in [(&alice, "alice"), (&bob, "bob")] {
        let row = by_key["rows"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["key"] == id.as_str()));
        assert_eq!(
            row.map(|r| &r["name"]),
            Some(&Value::from(name)),
            "key rows carry the key's name: {by_key}"
        );
    }
    assert_eq!(total_of(&by_key), total);

    let by_model = usage(&gw, &["--by", "model"]);
    assert_eq!(
        by_model["rows"].as_array().map(Vec::len),
        Some(2),
        "{by_model}"
    );
    assert_eq!(row_of(&by_model, "model", SONNET), (3, 2, t1));
    assert_eq!(row_of(&by_model, "model", HAIKU), (2, 0, sum(&[t2, t3])));

    // By account: what each account served, plus the refused request, which had none.
    let requests = up.requests();
    let mut served: BTreeMap<String, (u64, u64, Tokens)> = BTreeMap::new();
    for (tag, tokens, error) in [
        ("u1", t1, 0),
        ("u2", t2, 0),
        ("u3", t3, 0),
        ("u5", Tokens::default(), 1),
    ] {
        let copy = upstream_copy(&requests, tag);
        let id = if copy.api_key() == KEY_A {
            &alpha
        } else {
            &bravo
        };
        let e = served.entry(id.clone()).or_default();
        e.0 += 1;
        e.1 += error;
        e.2.add(tokens);
    }
    let by_account = usage(&gw, &["--by", "account"]);
    let mut unattributed = (0, 0, Tokens::default());
    for r in by_account["rows"].as_array().expect("rows") {
        let label = r["account"].as_str().unwrap_or_default();
        let got = row_of(&by_account, "account", label);
        match served.get(label) {
            Some(want) => {
                assert_eq!(&got, want, "account {label}: {by_account}");
                let name = if label == alpha { "alpha" } else { "bravo" };
                assert_eq!(r["name"], name, "account rows carry the account's name");
            }
            None => {
                unattributed.0 += got.0;
                unattributed.1 += got.1;
                unattributed.2.add(got.2);
            }
        }
    }
    for id in served.keys() {
        row_of(&by_account, "account", id);
    }
    assert_eq!(
        unattributed,
        (1, 1, Tokens::default()),
        "the refused request, on no account: {by_account}"
    );

    let by_day = usage(&gw, &["--by", "day"]);
    assert_eq!(by_day["rows"].as_array().map(Vec::len), Some(1), "{by_day}");
    assert_eq!(row_of(&by_day, "day", &utc_date(today)), total);

    // Date filters: a day with nothing, and ranges that hold today.
    let (yesterday, tomorrow) = (utc_date(today - 86_400), utc_date(today + 86_400));
    let today = utc_date(today);
    let midnight = format!("{today}T00:00:00Z");
    for (args, want) in [
        (vec!["--since", tomorrow.as_str()], None),
        (vec!["--until", yesterday.as_str()], None),
        (vec!["--since", yesterday.as_str()], Some(total)),
        (
            vec!["--since", today.as_str(), "--until", today.as_str()],
            Some(total),
        ),
        (vec!["--since", midnight.as_str()], Some(total)),
    ] {
        let view = usage(&gw, &args);
        match want {
            None => {
                assert_eq!(view["rows"], serde_json::json!([]), "{args:?}: {view}");
                assert_eq!(total_of(&view), (0, 0, Tokens::default()), "{args:?}");
            }
            Some(want) => assert_eq!(total_of(&view), want, "{args:?}: {view}"),
        }
    }
    assert_exit(
        &gw.run_cli(&["usage", "--by", "colour"]),
        2,
        "usage --by colour",
    );
    assert_exit(
        &gw.run_cli(&["usage", "--since", "last tuesday"]),
        2,
        "usage --since with no date",
    );

    // The text form: a header, one row per group, a TOTAL row, columns aligned.
    for (by, view) in [
        ("key", &by_key),
        ("account", &by_account),
        ("model", &by_model),
        ("day", &by_day),
    ] {
        let out = cli_ok(&gw, &["usage", "--by", by]);
        check_table(&String::from_utf8_lossy(&out.stdout), by, view);
    }
}

/// Checks `usage`'s text table (what comes before its notes, after a blank line) against its
/// JSON: one line per row, the TOTAL row's numbers, and numbers right-aligned in columns
/// (every row's numbers end at the same places).
/// The numbers of a row of `usage`'s table.
const COLUMNS: usize = 10;

fn check_table(text: &str, by: &str, view: &Value) {
    let table = text.split("\n\n").next().unwrap_or_default();
    let lines: Vec<&str> = table.lines().filter(|l| !l.trim().is_empty()).collect();
    let rules = |l: &&&str| l.trim().chars().all(|c| c == '-' || c == '─');
    let rows: Vec<&str> = lines
        .iter()
        .skip(1)
        .filter(|l| !rules(l))
        .copied()
        .collect();
    let what = format!("usage --by {by}:\n{text}");
    assert!(
        lines[0].to_uppercase().starts_with(&by.to_uppercase()),
        "the header names the grouping: {what}"
    );
    let json_rows = view["rows"].as_array().expect("rows").len();
    assert_eq!(
        rows.len(),
        json_rows + 1,
        "a line per row and a TOTAL: {what}"
    );
    let total = rows.last().expect("a TOTAL row");
    assert!(total.starts_with("TOTAL"), "the last row is TOTAL: {what}");
    // Counts, then the cost (USD, six decimals) and the unpriced requests.
    let numbers = |line: &str| -> Vec<String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        words[words.len() - COLUMNS..]
            .iter()
            .map(|w| w.trim_end_matches('~').to_string())
            .collect()
    };
    let t = &view["total"];
    let mut want: Vec<String> = [
        "requests",
        "errors",
        "input_tokens",
        "output_tokens",
        "cache_write_5m_tokens",
        "cache_write_1h_tokens",
        "cache_read_tokens",
        "total_tokens",
    ]
    .iter()
    .map(|f| t[*f].as_u64().expect("a count").to_string())
    .collect();
    let cost = t["cost_usd"].as_str().expect("cost_usd");
    want.push(cost[..cost.len() - 3].to_string());
    want.push(t["unpriced_requests"].to_string());
    assert_eq!(numbers(total), want, "the TOTAL row: {what}");
    // Where each of the numbers ends, in characters.
    let ends = |line: &str| -> Vec<usize> {
        let chars: Vec<char> = line.chars().collect();
        let mut ends = Vec::new();
        let mut i = chars.len();
        while ends.len() < COLUMNS && i > 0 {
            while i > 0 && chars[i - 1] == ' ' {
                i -= 1;
            }
            ends.push(i);
            while i > 0 && chars[i - 1] != ' ' {
                i -= 1;
            }
        }
        ends
    };
    let first = ends(rows[0]);
    for row in &rows {
        assert_eq!(ends(row), first, "columns out of line in {row:?}: {what}");
    }
    assert_eq!(
        lines[0].trim_end().chars().count(),
        rows[0].trim_end().chars().count(),
        "the header spans the table: {what}"
    );
}
