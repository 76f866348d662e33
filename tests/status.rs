//! The operators' views: `status` (admin listener, or the main listener with an admin key, or
//! the config alone when no server answers), `health-check` and its exit codes, and
//! `/ready` and `/health`.

use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use crate::support::accounts::{
    KEY_A, KEY_B, account, admin_status, assert_rested, assert_served_by, first_request_limited,
    poll_until, post, rate_limited, served_by, started, stdout_json, unix_from_rfc3339, unix_now,
};
use crate::support::{
    Config, FakeUpstream, Gateway, MESSAGE_BODY, Reply, assert_error, assert_exit, call,
    post_message, printed, refused_base_url,
};

/// A whole Messages answer, for upstreams that answer as Anthropic does.
const ANSWER: &str = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","usage":{"input_tokens":3,"output_tokens":1}}"#;

/// Every status field of one account, as `status --json` and `GET /admin/status` give it.
const ACCOUNT_FIELDS: [&str; 14] = [
    "id",
    "name",
    "kind",
    "priority",
    "weight",
    "state",
    "reason",
    "cooldown_until",
    "in_flight",
    "requests",
    "failures",
    "token_expires_at",
    "refresh_error",
    "persist_error",
];

#[test]
fn status_shows_cooling_accounts_on_the_admin_and_main_listeners() {
    let up = FakeUpstream::start(|req| {
        let key = req.api_key();
        if key == KEY_A {
            rate_limited("30", key)
        } else {
            Reply::json(200, &served_by(key))
        }
    });
    let mut gw = Gateway::new(&Config::new(up.base_url()).admin_listen("127.0.0.1:0"));
    let (alpha, bravo) = (
        gw.add_api_key("alpha", KEY_A),
        gw.add_api_key("bravo", KEY_B),
    );
    let (alpha, bravo) = (&alpha, &bravo);
    let admin_key = gw.add_admin_key("operator");
    gw.add_client_key("tests");
    gw.start();
    let admin_url = format!("http://{}", gw.admin_addr());
    let main_url = format!("http://{}", gw.addr());

    // Until alpha has been tried once (it may come second), requests go round.
    let before = unix_now();
    for _ in 0..4 {
        if up.keys().iter().any(|k| k == KEY_A) {
            break;
        }
        assert_served_by(&gw, KEY_B, "alpha limited, bravo serves");
    }
    assert!(up.keys().iter().any(|k| k == KEY_A), "alpha never tried");
    let after = unix_now();

    let check = |view: &Value, what: &str| {
        for field in ["version", "uptime_secs", "sticky_pins"] {
            assert!(!view[field].is_null(), "{what}: no {field} in {view}");
        }
        for field in ["busy", "alive", "max"] {
            assert!(
                view["workers"][field].is_u64(),
                "{what}: workers.{field} in {view}"
            );
        }
        assert_eq!(view["workers"]["max"], 32, "{what}: server.workers");
        for id in [alpha, bravo] {
            let a = account(view, id);
            for field in ACCOUNT_FIELDS {
                assert!(a.get(field).is_some(), "{what}: {id} has no {field}: {a}");
            }
            assert_eq!(a["kind"], "api_key", "{what}");
        }
        let a = account(view, alpha);
        assert_eq!(a["name"], "alpha");
        assert_eq!(a["state"], "cooling", "{what}: {a}");
        let reason = a["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("429"),
            "{what}: reason should name the 429: {a}"
        );
        let until = unix_from_rfc3339(
            a["cooldown_until"]
                .as_str()
                .unwrap_or_else(|| panic!("{what}: cooldown_until while cooling: {a}")),
        );
        assert!(
            until >= before + 29.0 && until <= after + 32.0,
            "{what}: cooldown_until {until} is not 30 s after {before}..{after}"
        );
        assert!(
            a["failures"].as_u64().is_some_and(|n| n >= 1),
            "{what}: {a}"
        );
        let b = account(view, bravo);
        assert_eq!(b["state"], "active", "{what}: {b}");
        assert!(b["cooldown_until"].is_null(), "{what}: {b}");
        assert!(
            b["requests"].as_u64().is_some_and(|n| n >= 1),
            "{what}: {b}"
        );
    };

    // The admin listener: no key needed, and nothing is proxied there.
    check(
        &admin_status(&gw),
        "GET /admin/status on the admin listener",
    );
    let out = gw.run_cli(&["status", "--json", "--url", &admin_url]);
    assert_exit(&out, 0, "status --json via the admin listener");
    check(&stdout_json(&out, "status --json"), "status --json (admin)");
    let out = gw.run_cli(&["status", "--url", &admin_url]);
    assert_exit(&out, 0, "status via the admin listener");
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [alpha.as_str(), bravo.as_str(), "cooling"] {
        assert!(
            text.contains(needle),
            "status output lacks {needle}:\n{text}"
        );
    }
    for (method, path) in [("POST", "/v1/messages"), ("GET", "/v1/models")] {
        let resp = call(
            gw.admin_addr(),
            method,
            path,
            &[gw.auth()],
            MESSAGE_BODY.as_bytes(),
        );
        assert_eq!(
            resp.status,
            404,
            "{method} {path} on the admin listener: {}",
            resp.text()
        );
    }

    // The main listener: an admin key is needed.
    let on_main = |key: Option<&str>| {
        let headers: Vec<(&str, &str)> = key.map(|k| ("x-api-key", k)).into_iter().collect();
        call(gw.addr(), "GET", "/admin/status", &headers, b"")
    };
    assert_eq!(on_main(None).status, 401, "no key");
    let resp = on_main(Some(gw.client_key()));
    assert_error(&resp, 403, None);
    let resp = on_main(Some(&admin_key));
    assert_eq!(resp.status, 200, "{}", resp.text());
    check(&resp.json(), "GET /admin/status on the main listener");

    let mut cmd = gw.cli(&["status", "--json", "--url", &main_url]);
    cmd.env("LLM_GATEWAY_ADMIN_KEY", &admin_key);
    let out = crate::support::run(cmd, None);
    assert_exit(&out, 0, "status with LLM_GATEWAY_ADMIN_KEY");
    check(
        &stdout_json(&out, "status --json"),
        "status --json (main, env key)",
    );
    let key_file = gw.dir().join("admin.key");
    std::fs::write(&key_file, format!("{admin_key}\n")).expect("write key file");
    let key_file = key_file.to_str().expect("utf-8 path").to_string();
    let out = gw.run_cli(&[
        "status",
        "--json",
        "--url",
        &main_url,
        "--admin-key-file",
        &key_file,
    ]);
    assert_exit(&out, 0, "status --admin-key-file");
    check(
        &stdout_json(&out, "status --json"),
        "status --json (main, key file)",
    );
    let out = gw.run_cli(&["status", "--json", "--url", &main_url]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "status on the main listener without a key"
    );
}

#[test]
fn status_without_a_server_exits_5_with_what_the_config_knows() {
    let nobody = refused_base_url();
    let admin = nobody.trim_start_matches("http://").to_string();
    let gw = Gateway::new(&Config::new(nobody.clone()).admin_listen(&admin));
    let alpha = gw.add_api_key("alpha", KEY_A);
    let bravo = gw.add_api_key("bravo", KEY_B);

    // The default URL comes from admin.listen.
    let out = gw.run_cli(&["status", "--json"]);
    assert_exit(&out, 5, "status --json with no server");
    let view = stdout_json(&out, "status --json with no server");
    assert!(view["server"].is_null(), "server: {view}");
    assert!(
        view["error"].as_str().is_some_and(|e| !e.is_empty()),
        "error should say what failed: {view}"
    );
    assert_eq!(account(&view, &alpha)["name"], "alpha");
    assert_eq!(account(&view, &bravo)["name"], "bravo");

    let out = gw.run_cli(&["status", "--url", &nobody]);
    assert_exit(&out, 5, "status with no server");
    let text = printed(&out);
    for needle in [alpha.as_str(), bravo.as_str(), "alpha", "bravo"] {
        assert!(text.contains(needle), "output lacks {needle}:\n{text}");
    }
}

#[test]
fn health_check_probes_every_account_and_exits_by_the_result() {
    const GOOD_1: &str = "sk-ant-api03-HealthyAccountOne-g1g1";
    const GOOD_2: &str = "sk-ant-api03-HealthyAccountTwo-g2g2";
    const BAD_1: &str = "sk-ant-api03-RevokedAccountOne-b1b1";
    const BAD_2: &str = "sk-ant-api03-RevokedAccountTwo-b2b2";
    let up = FakeUpstream::start(|req| {
        if req.method != "GET" || req.target != "/v1/models?limit=1" {
            return Reply::json(
                404,
                r#"{"type":"error","error":{"type":"not_found_error","message":"unexpected probe"}}"#,
            );
        }
        if req.api_key().starts_with("sk-ant-api03-Healthy") {
            Reply::json(
                200,
                r#"{"data":[{"id":"claude-sonnet-4-5","type":"model"}],"has_more":true}"#,
            )
        } else {
            Reply::json(
                401,
                r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#,
            )
        }
    });
    let health = |gw: &Gateway, extra: &[&str]| -> Output {
        let mut args = vec!["health-check"];
        args.extend_from_slice(extra);
        gw.run_cli(&args)
    };

    // One good, one bad: 10, and the JSON says which and why.
    let mixed = Gateway::new(&Config::new(up.base_url()));
    let good = mixed.add_api_key("good", GOOD_1);
    let bad = mixed.add_api_key("bad", BAD_1);
    let out = health(&mixed, &["--json"]);
    assert_exit(&out, 10, "health-check, one bad key");
    let view = stdout_json(&out, "health-check --json");
    assert_eq!(view["healthy"], 1, "{view}");
    assert_eq!(view["total"], 2, "{view}");
    let g = account(&view, &good);
    assert_eq!(g["name"], "good");
    assert_eq!(g["ok"], true, "{g}");
    assert!(g["latency_ms"].is_u64(), "{g}");
    let b = account(&view, &bad);
    assert_eq!(b["ok"], false, "{b}");
    assert!(b["latency_ms"].is_u64(), "{b}");
    let reason = b["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("401"),
        "the reason should name the 401: {b}"
    );
    let mut probed: Vec<(String, String)> = up
        .requests()
        .iter()
        .map(|r| (r.target.clone(), r.api_key().to_string()))
        .collect();
    probed.sort();
    assert_eq!(
        probed,
        [
            ("/v1/models?limit=1".to_string(), GOOD_1.to_string()),
            ("/v1/models?limit=1".to_string(), BAD_1.to_string()),
        ],
        "one probe per account, with its own key"
    );
    let out = health(&mixed, &[]);
    assert_exit(&out, 10, "health-check (text), one bad key");
    let out = health(&mixed, &["--account-id", &good, "--json"]);
    assert_exit(&out, 0, "health-check of the good account only");
    assert_eq!(stdout_json(&out, "health-check --account-id")["total"], 1);
    assert_exit(
        &health(&mixed, &["--account-id", &bad]),
        11,
        "health-check of the bad account only",
    );
    assert_exit(
        &health(&mixed, &["--account-id", "acc_doesnotexist"]),
        6,
        "health-check of an unknown account",
    );

    let all_good = Gateway::new(&Config::new(up.base_url()));
    all_good.add_api_key("one", GOOD_1);
    all_good.add_api_key("two", GOOD_2);
    let out = health(&all_good, &["--json"]);
    assert_exit(&out, 0, "health-check, all good");
    let view = stdout_json(&out, "health-check --json");
    assert_eq!(
        (&view["healthy"], &view["total"]),
        (&2.into(), &2.into()),
        "{view}"
    );

    let all_bad = Gateway::new(&Config::new(up.base_url()));
    all_bad.add_api_key("one", BAD_1);
    all_bad.add_api_key("two", BAD_2);
    let out = health(&all_bad, &["--json"]);
    assert_exit(&out, 11, "health-check, all bad");
    assert_eq!(stdout_json(&out, "health-check --json")["healthy"], 0);

    let none = Gateway::new(&Config::new(up.base_url()));
    assert_exit(&health(&none, &[]), 11, "health-check with no account");
}

#[test]
fn ready_follows_account_availability_and_health_is_always_200() {
    let up = first_request_limited(&[("retry-after", "2")]);
    let (gw, _) = started(
        &Config::new(up.base_url()).admin_listen("127.0.0.1:0"),
        &[("only", KEY_A, &[])],
    );
    let get = |addr, path: &str| call(addr, "GET", path, &[], b"").status;

    for addr in [gw.addr(), gw.admin_addr()] {
        assert_eq!(
            get(addr, "/ready"),
            200,
            "{addr}: ready with an available account"
        );
        assert_eq!(get(addr, "/health"), 200, "{addr}");
    }
    assert_eq!(post(&gw).status, 429);
    for addr in [gw.addr(), gw.admin_addr()] {
        assert_eq!(
            get(addr, "/ready"),
            503,
            "{addr}: the only account is resting"
        );
        assert_eq!(get(addr, "/health"), 200, "{addr}: alive while not ready");
    }
    let ready_at = poll_until(
        Duration::from_secs(5),
        "/ready once the rest is over",
        || get(gw.addr(), "/ready") == 200,
    );
    assert_rested(
        ready_at - up.requests()[0].at,
        Duration::from_secs(2),
        "/ready",
    );
    assert_eq!(post(&gw).status, 200);

    // All disabled, or none at all: not ready, still alive.
    let mut disabled = Gateway::new(&Config::new(up.base_url()));
    let id = disabled.add_api_key("off", KEY_B);
    assert_exit(
        &disabled.run_cli(&["disable-account", "--account-id", &id]),
        0,
        "disable-account",
    );
    disabled.start();
    let mut empty = Gateway::new(&Config::new(up.base_url()));
    empty.start();
    for gw in [&disabled, &empty] {
        assert_eq!(get(gw.addr(), "/ready"), 503);
        assert_eq!(get(gw.addr(), "/health"), 200);
    }
}

#[test]
fn health_check_skips_disabled_accounts_and_fails_logins_with_their_reason() {
    let up = FakeUpstream::start(|_| {
        Reply::json(
            200,
            r#"{"data":[{"id":"claude-sonnet-4-5","type":"model"}]}"#,
        )
    });
    let gw = Gateway::new(&Config::new(up.base_url()));
    let good = gw.add_api_key("good", "sk-ant-api03-HealthyAccountOne-g1g1");
    let off = gw.add_api_key("off", "sk-ant-api03-DisabledOnPurpose-d1d1");
    assert_exit(
        &gw.run_cli(&["disable-account", "--account-id", &off]),
        0,
        "disable-account",
    );
    // Disabled on purpose and nothing else: cron stays quiet.
    let out = gw.run_cli(&["health-check", "--json"]);
    assert_exit(&out, 0, "health-check with a disabled account");
    let view = stdout_json(&out, "health-check --json");
    assert_eq!(
        (&view["healthy"], &view["total"], &view["disabled"]),
        (&1.into(), &1.into(), &1.into()),
        "{view}"
    );
    assert_eq!(account(&view, &off)["result"], "disabled", "{view}");
    assert_eq!(account(&view, &good)["result"], "ok", "{view}");
    let out = gw.run_cli(&["health-check"]);
    assert_exit(&out, 0, "health-check (text)");
    assert!(
        printed(&out).contains("1 disabled, not checked"),
        "{}",
        printed(&out)
    );
    assert_eq!(up.requests().len(), 2, "the disabled account was probed");

    // An OAuth account never logged in: a failure, saying what to do.
    let fresh = add_oauth_never_logged_in(&gw, "fresh");
    let out = gw.run_cli(&["health-check", "--json"]);
    assert_exit(&out, 10, "health-check with an account never logged in");
    let view = stdout_json(&out, "health-check --json");
    let f = account(&view, &fresh);
    assert_eq!(f["result"], "failed", "{view}");
    let reason = f["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("oauth-start") && reason.contains(&fresh),
        "{f}"
    );
}

#[test]
fn status_tells_a_refused_admin_key_from_a_dead_server() {
    let up = FakeUpstream::start(|_| Reply::json(200, "{}"));
    let gw = Gateway::started(&Config::new(up.base_url()));
    let url = format!("--url=http://{}", gw.addr());
    // The main listener wants an admin key: without one, 401; with a plain key, 403. Both are
    // exit 8 and say the server is up, never "no server answered" (exit 5).
    let out = gw.run_cli(&["status", &url]);
    assert_exit(&out, 8, "status without an admin key");
    let said = printed(&out);
    assert!(
        said.contains("is up but refused the admin key") && said.contains("401"),
        "{said}"
    );
    assert!(!said.contains("no server answered"), "{said}");
    let key_file = gw.dir().join("plain.key");
    std::fs::write(&key_file, gw.client_key()).expect("write key file");
    let out = gw.run_cli(&[
        "status",
        &url,
        "--admin-key-file",
        key_file.to_str().expect("utf-8"),
    ]);
    assert_exit(&out, 8, "status with a key that is not an admin key");
    assert!(printed(&out).contains("403"), "{}", printed(&out));
    // Nothing listening is still exit 5.
    let out = gw.run_cli(&["status", &format!("--url={}", refused_base_url())]);
    assert_exit(&out, 5, "status with no server");
}

#[test]
fn human_status_shows_a_failing_reload_and_why_each_account_is_out() {
    let up = FakeUpstream::start(|_| Reply::json(200, "{}"));
    let mut gw = Gateway::new(&Config::new(up.base_url()).admin_listen("127.0.0.1:0"));
    gw.add_api_key("primary", "sk-ant-api03-StatusShowsReasons-s1s1");
    add_oauth_never_logged_in(&gw, "fresh");
    gw.add_client_key("tests");
    gw.start();
    let url = format!("--url=http://{}", gw.admin_addr());
    let view = |gw: &Gateway| {
        let out = gw.run_cli(&["status", &url, "--json"]);
        assert_exit(&out, 0, "status --json");
        stdout_json(&out, "status --json")
    };
    let fresh = view(&gw)["accounts"]
        .as_array()
        .expect("accounts")
        .iter()
        .find(|a| a["name"] == "fresh")
        .cloned()
        .expect("the OAuth account");
    assert_eq!(fresh["state"], "not_logged_in", "{fresh}");
    assert!(
        fresh["reason"]
            .as_str()
            .unwrap_or("")
            .contains("oauth-start"),
        "{fresh}"
    );
    assert!(view(&gw)["config"]["reload_error"].is_null());

    // A broken edit: the running config stays, and status says the reload is failing.
    let path = gw.config_path();
    let mut text = std::fs::read_to_string(&path).expect("read config");
    text.push_str("\nnot_a_setting: 1\n");
    std::fs::write(&path, text).expect("break config");
    poll_until(
        Duration::from_secs(5),
        "status showing the failed reload",
        || {
            view(&gw)["config"]["reload_error"]
                .as_str()
                .is_some_and(|e| e.contains("not_a_setting"))
        },
    );
    let out = gw.run_cli(&["status", &url]);
    assert_exit(&out, 0, "status");
    let said = printed(&out);
    assert!(
        said.contains("config reload FAILING") && said.contains("not_a_setting"),
        "{said}"
    );
    assert!(said.contains("never logged in: run oauth-start"), "{said}");
}

#[test]
fn what_the_cli_writes_is_in_force_before_it_returns() {
    let up = first_request_limited(&[("retry-after", "300")]);
    let (gw, ids) = started(&Config::new(up.base_url()), &[("only", KEY_A, &[])]);
    // The one account rests for five minutes after its 429.
    let limited = post(&gw);
    assert_eq!(limited.status, 429, "{}", limited.text());
    let resting = post(&gw);
    assert_eq!(
        resting.status,
        529,
        "the account should rest: {}",
        resting.text()
    );

    // enable-account puts it back now: no poll, the very next request is served.
    let out = gw.run_cli(&["enable-account", "--account-id", &ids[0]]);
    assert_exit(&out, 0, "enable-account");
    assert!(
        !printed(&out).contains("has not applied"),
        "{}",
        printed(&out)
    );
    let back = post(&gw);
    assert_eq!(
        back.status,
        200,
        "served right after enable-account: {}",
        back.text()
    );

    // A key the CLI has just added is accepted by its first request.
    let out = gw.run_cli(&["add-client-key", "--name", "fresh", "--json"]);
    assert_exit(&out, 0, "add-client-key");
    let key = stdout_json(&out, "add-client-key")["key"]
        .as_str()
        .expect("key")
        .to_string();
    let first = post_message(
        gw.addr(),
        &[
            ("x-api-key", key.as_str()),
            ("content-type", "application/json"),
        ],
    );
    assert_eq!(
        first.status,
        200,
        "the new key's first request: {}",
        first.text()
    );
}

#[test]
fn the_access_line_and_metrics_show_who_asked_and_every_failed_attempt() {
    let up = FakeUpstream::start(|req| {
        if req.api_key() == KEY_A {
            Reply::json(
                500,
                r#"{"type":"error","error":{"type":"api_error","message":"boom"}}"#,
            )
        } else {
            Reply::json(200, ANSWER)
        }
    });
    let config = Config::new(up.base_url())
        .admin_listen("127.0.0.1:0")
        .server("trusted_proxies", "[127.0.0.0/8]")
        .section("balance:\n  strategy: fill_first\n");
    let (gw, ids) = started(
        &config,
        &[("a", KEY_A, &[]), ("b", KEY_B, &["--priority", "1"])],
    );
    let resp = post_message(
        gw.addr(),
        &[
            ("x-api-key", gw.client_key()),
            ("content-type", "application/json"),
            ("user-agent", "claude-cli/2.1.197 (external, cli)"),
            // A trusted proxy (the loopback peer) says who its client is; what the client
            // wrote before it is not believed.
            ("x-forwarded-for", "6.6.6.6, 203.0.113.9"),
        ],
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let access_line = || {
        (gw.stderr().lines())
            .find(|l| l.contains("\"path\":\"/v1/messages\""))
            .map(String::from)
    };
    poll_until(Duration::from_secs(2), "the access line", || {
        access_line().is_some()
    });
    let line = access_line().expect("the access line");
    let line: Value = serde_json::from_str(&line).expect("an access line is JSON");
    assert_eq!(line["client"], "tests", "{line}");
    assert!(
        line["client_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("ck_")),
        "{line}"
    );
    assert_eq!(line["address"], "203.0.113.9", "{line}");
    assert_eq!(
        line["user_agent"], "claude-cli/2.1.197 (external, cli)",
        "{line}"
    );
    assert_eq!(line["attempts"], 2, "{line}");
    let failed = line["failover"].as_array().expect("the failed attempts");
    assert_eq!(failed.len(), 1, "{line}");
    assert_eq!(failed[0]["account"], ids[0].as_str(), "{line}");
    assert_eq!(failed[0]["status"], 500, "{line}");
    assert!(
        failed[0]["ms"].is_number() && failed[0]["why"].as_str().is_some_and(|w| w.contains("500")),
        "{line}"
    );

    let metrics = call(gw.admin_addr(), "GET", "/metrics", &[], b"").text();
    for sample in [
        "llm_gateway_upstream_attempts_total{account=\"a\",outcome=\"upstream_error\"} 1",
        "llm_gateway_upstream_attempts_total{account=\"b\",outcome=\"answered\"} 1",
        "llm_gateway_failovers_total{account=\"a\"} 1",
        "llm_gateway_account_upstream_latency_seconds_count{account=\"b\"} 1",
        "llm_gateway_account_time_to_first_token_seconds_count{account=\"b\"} 1",
    ] {
        assert!(metrics.contains(sample), "no {sample} in:\n{metrics}");
    }
}

/// Adds an OAuth account that never logged in; returns its id.
fn add_oauth_never_logged_in(gw: &Gateway, name: &str) -> String {
    let out = gw.run_cli(&["add-oauth", "--name", name, "--client-id", "cid", "--json"]);
    assert_exit(&out, 0, "add-oauth");
    stdout_json(&out, "add-oauth")["id"]
        .as_str()
        .expect("id")
        .to_string()
}

#[test]
fn each_answers_quota_reading_shows_in_status_and_metrics() {
    let reset = (crate::support::now_unix() + 3 * 86_400).to_string();
    let reset_header = reset.clone();
    let up = FakeUpstream::start(move |_| {
        let reset = reset_header.as_str();
        Reply::json_with(
            200,
            &[
                ("anthropic-ratelimit-unified-status", "allowed_warning"),
                ("anthropic-ratelimit-unified-5h-status", "allowed"),
                ("anthropic-ratelimit-unified-5h-utilization", "0.42"),
                ("anthropic-ratelimit-unified-5h-reset", reset),
                ("anthropic-ratelimit-unified-7d-status", "allowed_warning"),
                ("anthropic-ratelimit-unified-7d-utilization", "0.93"),
                ("anthropic-ratelimit-unified-7d-reset", reset),
                (
                    "anthropic-ratelimit-unified-representative-claim",
                    "seven_day",
                ),
                ("anthropic-ratelimit-unified-7d_oi-status", "rejected"),
                ("anthropic-ratelimit-unified-7d_oi-utilization", "1.0"),
            ],
            ANSWER,
        )
    });
    let (gw, ids) = started(
        &Config::new(up.base_url()).admin_listen("127.0.0.1:0"),
        &[("quota", KEY_A, &[])],
    );
    assert_eq!(post(&gw).status, 200);
    let status = admin_status(&gw);
    let account = account(&status, &ids[0]);
    let quota = &account["quota"];
    assert_eq!(quota["status"], "allowed_warning", "{account}");
    assert_eq!(quota["five_hour"]["utilization"], 0.42, "{account}");
    assert_eq!(quota["seven_day"]["utilization"], 0.93, "{account}");
    let reset: u64 = reset.parse().expect("reset");
    assert_eq!(quota["seven_day"]["reset"], reset, "{account}");
    assert_eq!(quota["representative_claim"], "seven_day", "{account}");
    // The model-scoped window belongs to the family of the model asked for.
    assert_eq!(
        account["quota_by_family"]["sonnet"]["status"], "rejected",
        "{account}"
    );
    assert!(account["quota_by_family"]["opus"].is_null(), "{account}");
    let metrics = call(gw.admin_addr(), "GET", "/metrics", &[], b"").text();
    for sample in [
        "llm_gateway_account_quota_utilization{account=\"quota\",window=\"5h\"} 0.42",
        "llm_gateway_account_quota_utilization{account=\"quota\",window=\"7d\"} 0.93",
    ] {
        assert!(metrics.contains(sample), "no {sample} in:\n{metrics}");
    }
}
