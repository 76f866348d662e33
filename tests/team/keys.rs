//! Gateway keys managed from the CLI: `add-client-key` with every limit flag, `list-client-keys`
//! (JSON and text, never the key), `update-client-key` (including `none`), `revoke-client-key`,
//! expiry, and a running server that follows each change within about a second.

use std::cell::Cell;

use serde_json::Value;

use super::{
    HAIKU, RELOAD_LIMIT, SONNET, Tokens, add_key, answer, anthropic_body, cli_ok, post_anthropic,
};
use crate::support::accounts::{poll_until, stdout_json, unix_from_rfc3339, unix_now};
use crate::support::{
    ACCOUNT_KEY, Config, FakeUpstream, Gateway, Response, assert_error, assert_exit, sorted_keys,
};

/// Every field of a `list-client-keys --json` row, as the contract lists them.
const ROW_FIELDS: [&str; 19] = [
    "id",
    "name",
    "prefix",
    "enabled",
    "state",
    "admin",
    "models",
    "rpm",
    "max_concurrent",
    "queue",
    "daily_tokens",
    "monthly_tokens",
    "daily_usd",
    "weekly_usd",
    "monthly_usd",
    "total_usd",
    "expires",
    "revoked_at",
    "created_at",
];

/// `list-client-keys --json`, with its raw stdout for leak checks.
fn list(gw: &Gateway) -> (Vec<Value>, String) {
    let out = cli_ok(gw, &["list-client-keys", "--json"]);
    let rows = stdout_json(&out, "list-client-keys --json")
        .as_array()
        .unwrap_or_else(|| panic!("list-client-keys --json is not an array"))
        .clone();
    (rows, String::from_utf8_lossy(&out.stdout).into_owned())
}

fn row<'a>(rows: &'a [Value], id: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("key {id} missing from {rows:?}"))
}

/// The Unix time an `--expires` value as listed denotes (`2026-12-31` is midnight UTC).
fn expiry(value: &Value) -> f64 {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("expires is not a string: {value}"));
    if text.len() == 10 {
        unix_from_rfc3339(&format!("{text}T00:00:00Z"))
    } else {
        unix_from_rfc3339(text)
    }
}

/// One Messages request with `key`.
fn send(gw: &Gateway, key: &str, model: &str) -> Response {
    post_anthropic(
        gw.addr(),
        key,
        &anthropic_body(model, Tokens::new(1, 1, 0, 0), false, "keys"),
        &[],
    )
}

#[test]
fn keys_are_added_listed_updated_and_revoked_and_a_running_server_follows() {
    let up = FakeUpstream::start(answer);
    let mut gw = Gateway::new(&Config::new(up.base_url()));
    gw.add_api_key("primary", ACCOUNT_KEY);

    // add-client-key with every flag prints exactly id, name and the key.
    let before = unix_now();
    let out = cli_ok(
        &gw,
        &[
            "add-client-key",
            "--name",
            "full",
            "--admin",
            "--models",
            "claude-haiku-4-5,gpt-4o",
            "--rpm",
            "5",
            "--max-concurrent",
            "2",
            "--daily-tokens",
            "1000",
            "--monthly-tokens",
            "20000",
            "--expires",
            "2099-12-31",
            "--json",
        ],
    );
    let added = stdout_json(&out, "add-client-key --json");
    assert_eq!(sorted_keys(&added), ["id", "key", "name"], "{added}");
    let full_id = added["id"].as_str().expect("id").to_string();
    let full_key = added["key"].as_str().expect("key").to_string();
    assert_eq!(added["name"], "full");
    assert!(full_key.starts_with("lgw_"), "{full_key}");
    let (plain_id, plain_key) = add_key(&gw, "plain", &[]);
    let (rfc_id, _) = add_key(&gw, "until-rfc3339", &["--expires", "2099-06-30T12:30:00Z"]);
    let (old_id, old_key) = add_key(&gw, "expired", &[]);
    gw.expire_client_key(&old_id, "2020-01-01");
    let (victim_id, victim_key) = add_key(&gw, "victim", &[]);
    let after = unix_now();
    let all_keys = [&full_key, &plain_key, &old_key, &victim_key];

    for (args, what) in [
        (
            vec!["add-client-key", "--name", "x", "--expires", "31/12/2026"],
            "--expires in no known form",
        ),
        (
            vec!["add-client-key", "--name", "x", "--rpm", "many"],
            "--rpm not a number",
        ),
    ] {
        assert_exit(&gw.run_cli(&args), 2, what);
    }

    // list-client-keys --json: every field, the limits as given, and no key.
    let (rows, raw) = list(&gw);
    assert_eq!(rows.len(), 5, "{raw}");
    for r in &rows {
        let mut want = ROW_FIELDS.to_vec();
        want.sort_unstable();
        assert_eq!(sorted_keys(r), want, "fields of {r}");
    }
    for key in all_keys {
        assert!(!raw.contains(key.as_str()), "list-client-keys shows a key");
    }
    let full = row(&rows, &full_id);
    assert_eq!(full["name"], "full");
    assert_eq!(full["enabled"], true);
    assert_eq!(full["state"], "enabled");
    assert_eq!(full["admin"], true);
    assert_eq!(full["models"], serde_json::json!([HAIKU, "gpt-4o"]));
    assert_eq!(full["rpm"], 5);
    assert_eq!(full["max_concurrent"], 2);
    assert_eq!(full["daily_tokens"], 1000);
    assert_eq!(full["monthly_tokens"], 20000);
    assert_eq!(
        expiry(&full["expires"]),
        unix_from_rfc3339("2099-12-31T00:00:00Z")
    );
    assert!(full["revoked_at"].is_null(), "{full}");
    let created = unix_from_rfc3339(full["created_at"].as_str().expect("created_at"));
    assert!(
        created >= before.floor() - 1.0 && created <= after + 1.0,
        "created_at {created} outside {before}..{after}"
    );
    let prefix = full["prefix"].as_str().expect("prefix");
    assert!(
        prefix.starts_with("lgw_")
            && full_key.starts_with(prefix)
            && prefix.len() < full_key.len() / 2,
        "the prefix is the key's first few characters only: {prefix}"
    );
    let plain = row(&rows, &plain_id);
    for field in [
        "rpm",
        "max_concurrent",
        "daily_tokens",
        "monthly_tokens",
        "expires",
    ] {
        assert!(plain[field].is_null(), "plain key: {field} in {plain}");
    }
    assert_eq!(plain["models"], serde_json::json!([]), "{plain}");
    assert_eq!(plain["admin"], false);
    assert_eq!(
        expiry(&row(&rows, &rfc_id)["expires"]),
        unix_from_rfc3339("2099-06-30T12:30:00Z")
    );
    assert_eq!(row(&rows, &old_id)["state"], "expired");

    // The text form shows the same, still without a key.
    let out = cli_ok(&gw, &["list-client-keys"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for key in all_keys {
        assert!(!text.contains(key.as_str()), "list-client-keys shows a key");
    }
    let line_of = |id: &str| -> String {
        text.lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("no line for {id}:\n{text}"))
            .to_string()
    };
    let full_line = line_of(&full_id);
    let words: Vec<&str> = full_line
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.'))
        .collect();
    for word in ["full", "enabled", HAIKU, "5", "2", "1000", "20000"] {
        assert!(
            words.contains(&word),
            "the text row of the full key lacks {word:?}:\n{text}"
        );
    }
    assert!(full_line.contains("2099-12-31"), "the expiry: {text}");
    assert!(line_of(&old_id).contains("expired"), "{text}");

    // update-client-key: `none` removes a limit, the rest is changed, state follows.
    cli_ok(
        &gw,
        &[
            "update-client-key",
            "--key-id",
            &full_id,
            "--name",
            "renamed",
            "--models",
            "none",
            "--rpm",
            "none",
            "--max-concurrent",
            "none",
            "--daily-tokens",
            "50",
            "--monthly-tokens",
            "none",
            "--expires",
            "none",
            "--admin",
            "false",
            "--disable",
            "--json",
        ],
    );
    let (rows, _) = list(&gw);
    let full = row(&rows, &full_id);
    assert_eq!(full["name"], "renamed");
    assert_eq!(full["models"], serde_json::json!([]), "{full}");
    for field in ["rpm", "max_concurrent", "monthly_tokens", "expires"] {
        assert!(full[field].is_null(), "{field} should be removed: {full}");
    }
    assert_eq!(full["daily_tokens"], 50);
    assert_eq!(full["admin"], false);
    assert_eq!(full["enabled"], false);
    assert_eq!(full["state"], "disabled");
    cli_ok(
        &gw,
        &[
            "update-client-key",
            "--key-id",
            &full_id,
            "--enable",
            "--rpm",
            "7",
        ],
    );
    let (rows, _) = list(&gw);
    let full = row(&rows, &full_id);
    assert_eq!(
        (&full["state"], &full["rpm"], &full["daily_tokens"]),
        (&"enabled".into(), &7.into(), &50.into()),
        "{full}"
    );

    for args in [
        vec![
            "update-client-key",
            "--key-id",
            "ck_doesnotexist",
            "--rpm",
            "1",
        ],
        vec!["revoke-client-key", "--key-id", "ck_doesnotexist"],
    ] {
        assert_exit(&gw.run_cli(&args), 6, &format!("{args:?}"));
    }

    // A running server follows every change.
    gw.start();
    let served = Cell::new(0);
    let status_of = |key: &str, model: &str| {
        let resp = send(&gw, key, model);
        if resp.status == 200 {
            served.set(served.get() + 1);
        }
        resp
    };
    // A change through the CLI, then the running server's answer to `key` once it follows.
    let changed = |args: &[&str], what: &str, key: &str, status: u16| {
        cli_ok(&gw, args);
        poll_until(RELOAD_LIMIT, what, || {
            status_of(key, SONNET).status == status
        });
    };
    assert_eq!(status_of(&plain_key, SONNET).status, 200);
    assert_eq!(status_of(&victim_key, SONNET).status, 200);
    assert_error(
        &status_of(&old_key, SONNET),
        401,
        Some("authentication_error"),
    );

    changed(
        &["revoke-client-key", "--key-id", &victim_id, "--json"],
        "a revoked key gets 401",
        &victim_key,
        401,
    );
    assert_error(
        &status_of(&victim_key, SONNET),
        401,
        Some("authentication_error"),
    );
    let (rows, _) = list(&gw);
    let victim = row(&rows, &victim_id);
    assert_eq!(victim["state"], "revoked", "{victim}");
    unix_from_rfc3339(victim["revoked_at"].as_str().expect("revoked_at is a time"));
    let out = gw.run_cli(&["update-client-key", "--key-id", &victim_id, "--enable"]);
    assert_exit(&out, 2, "updating a revoked key");
    assert_eq!(row(&list(&gw).0, &victim_id)["state"], "revoked");

    changed(
        &["update-client-key", "--key-id", &plain_id, "--disable"],
        "a disabled key gets 401",
        &plain_key,
        401,
    );
    changed(
        &["update-client-key", "--key-id", &plain_id, "--enable"],
        "an enabled key works again",
        &plain_key,
        200,
    );

    // Expiry set while running, as an RFC 3339 time a second ahead (the CLI refuses one
    // already past): the key gets 401 once it passes; then the expiry is removed.
    let past = crate::support::now_unix() + 1;
    let past = format!(
        "{}T{:02}:{:02}:{:02}Z",
        super::utc_date(past),
        past % 86_400 / 3600,
        past % 3600 / 60,
        past % 60
    );
    changed(
        &[
            "update-client-key",
            "--key-id",
            &plain_id,
            "--expires",
            &past,
        ],
        "a key expired while running gets 401",
        &plain_key,
        401,
    );
    assert_eq!(row(&list(&gw).0, &plain_id)["state"], "expired");
    changed(
        &[
            "update-client-key",
            "--key-id",
            &plain_id,
            "--expires",
            "none",
        ],
        "expiry removed",
        &plain_key,
        200,
    );

    // Limits too: an allow-list set while running refuses other models.
    changed(
        &[
            "update-client-key",
            "--key-id",
            &plain_id,
            "--models",
            HAIKU,
        ],
        "an allow-list set while running",
        &plain_key,
        403,
    );
    assert_eq!(status_of(&plain_key, HAIKU).status, 200);

    assert_eq!(
        up.requests().len(),
        served.get(),
        "every refused request stayed at the gateway"
    );
}

#[test]
fn an_expiry_with_an_offset_is_the_instant_it_names() {
    // An hour ago, written five hours ahead of UTC: read as UTC (the offset ignored), it would
    // still be hours away and the key would serve.
    let up = FakeUpstream::start(answer);
    let mut gw = Gateway::new(&Config::new(up.base_url()));
    gw.add_api_key("primary", ACCOUNT_KEY);
    let local = llm_gateway::time::rfc3339(unix_now() as u64 - 3600 + 5 * 3600);
    let expired_at = local.replace('Z', "+05:00");
    let (expired_id, expired) = add_key(&gw, "expired-east", &[]);
    // Written by hand: the CLI refuses an expiry already past.
    gw.expire_client_key(&expired_id, &expired_at);
    let soon =
        llm_gateway::time::rfc3339(unix_now() as u64 + 3600 - 5 * 3600).replace('Z', "-05:00");
    let (_, live) = add_key(&gw, "live-west", &["--expires", &soon]);
    gw.start();
    let body = anthropic_body(SONNET, Tokens::new(1, 1, 0, 0), false, "offset");
    let resp = post_anthropic(gw.addr(), &expired, &body, &[]);
    assert_error(&resp, 401, Some("authentication_error"));
    assert!(resp.text().contains("expired"), "{}", resp.text());
    let resp = post_anthropic(gw.addr(), &live, &body, &[]);
    assert_eq!(resp.status, 200, "{}", resp.text());
}

/// Claude Code as `make test` installs it from the npm registry (tests/clients/package.json).
const CLAUDE: &str = "tests/clients/node_modules/.bin/claude";

#[test]
fn claude_code_gives_up_on_a_wrong_key_after_one_request() {
    let claude = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(CLAUDE);
    assert!(
        claude.exists(),
        "Claude Code is not installed: run `npm install --prefix tests/clients` (make test does)"
    );
    let up = FakeUpstream::start(|_| crate::support::Reply::json(500, "{}"));
    let gw = Gateway::started(&Config::new(up.base_url()));
    let home = crate::support::TempDir::new();
    let mut cmd = std::process::Command::new(&claude);
    cmd.args(["-p", "hello"])
        .current_dir(home.path())
        .env("HOME", home.path())
        .env("ANTHROPIC_BASE_URL", format!("http://{}", gw.addr()))
        .env("ANTHROPIC_API_KEY", "lgw_not-a-key-of-this-gateway")
        .env("DISABLE_AUTOUPDATER", "1")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("NO_PROXY", "*");
    for var in [
        "ANTHROPIC_AUTH_TOKEN",
        "CLAUDE_CODE_OAUTH_TOKEN",
        "HTTPS_PROXY",
        "HTTP_PROXY",
    ] {
        cmd.env_remove(var);
    }
    let started = std::time::Instant::now();
    let out = crate::support::run(cmd, None);
    let took = started.elapsed();
    let said = crate::support::printed(&out);
    assert!(
        !out.status.success(),
        "Claude Code succeeded with a wrong key: {said}"
    );
    assert!(
        said.contains("401") && said.contains("invalid gateway key"),
        "{said}"
    );
    // One request, not the seven over 45 s it makes without `x-should-retry: false`.
    let tried = (gw.stderr().lines())
        .filter(|l| l.contains("\"path\":\"/v1/messages\"") && l.contains("\"status\":401"))
        .count();
    assert_eq!(
        tried,
        1,
        "Claude Code retried a hopeless 401 ({took:?}):\n{}",
        gw.stderr()
    );
    assert!(
        up.requests().is_empty(),
        "a refused request reached the upstream"
    );
}
