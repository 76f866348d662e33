//! The dashboard in a real browser: headless Chromium (Debian's package, which `make test`
//! installs) driven by playwright-core (npm, in tests/clients) through
//! `tests/clients/dashboard.mjs`. The gateway serves fixture traffic (two accounts with quota
//! readings, keys with budgets, a failover and an error); the test signs in with the admin key
//! on the main listener (the session cookie), checks each panel shows the fixture's numbers
//! and the console has no error, and saves screenshots in target/dashboard/. A second gateway
//! with 30 days of a 50-key ledger measures the page's weight and render time.
//!
//! And the access rules on the wire: the data needs an admin key or a session; the cookie is
//! HttpOnly, SameSite=Strict, and Secure unless the browser is on this machine; every answer
//! carries the Content-Security-Policy; no secret reaches the page or the API.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::support::accounts::{KEY_A, KEY_B, served_by};
use crate::support::{
    Config, FakeUpstream, Gateway, Recorded, Reply, assert_exit, call, now_unix, run,
};

const SCRIPT: &str = "tests/clients/dashboard.mjs";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fake upstream: Sonnet answers with known usage and quota headers per account; a
/// message saying `fail` gets a 500 from account A (so it fails over to B) and a 400 from B.
fn answer(req: &Recorded) -> Reply {
    let body: Value = serde_json::from_slice(&req.body).unwrap_or_default();
    let text = body["messages"][0]["content"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let key = req.api_key().to_string();
    let reset = (now_unix() + 3 * 3600).to_string();
    let used = if key == KEY_A { "0.42" } else { "0.93" };
    let headers = [
        ("anthropic-ratelimit-unified-status", "allowed"),
        ("anthropic-ratelimit-unified-5h-status", "allowed"),
        ("anthropic-ratelimit-unified-5h-utilization", used),
        ("anthropic-ratelimit-unified-5h-reset", reset.as_str()),
        ("anthropic-ratelimit-unified-7d-status", "allowed"),
        ("anthropic-ratelimit-unified-7d-utilization", "0.10"),
        ("anthropic-ratelimit-unified-7d-reset", reset.as_str()),
    ];
    if text.contains("fail") {
        let status = if key == KEY_A { 500 } else { 400 };
        return Reply::json_with(status, &headers, &json!({"type": "error", "error": {"type": "api_error", "message": "scripted failure"}}).to_string());
    }
    let mut message: Value = serde_json::from_str(&served_by(&key)).unwrap_or_default();
    message["usage"] = json!({"input_tokens": 1000, "output_tokens": 200,
        "cache_creation_input_tokens": 700, "cache_read_input_tokens": 5000,
        "cache_creation": {"ephemeral_5m_input_tokens": 300, "ephemeral_1h_input_tokens": 400}});
    Reply::json_with(200, &headers, &message.to_string())
}

fn post(gw: &Gateway, key: &str, model: &str, text: &str) -> u16 {
    let body =
        json!({"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": text}]});
    let headers = [
        ("x-api-key", key),
        ("content-type", "application/json"),
        ("anthropic-version", "2023-06-01"),
    ];
    call(
        gw.addr(),
        "POST",
        "/v1/messages",
        &headers,
        body.to_string().as_bytes(),
    )
    .status
}

fn key(gw: &Gateway, name: &str, flags: &[&str]) -> String {
    let mut args = vec!["add-client-key", "--name", name, "--json"];
    args.extend_from_slice(flags);
    let out = gw.run_cli(&args);
    assert_exit(&out, 0, "add-client-key");
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    v["key"].as_str().expect("key").to_string()
}

/// Runs the browser script; its JSON report.
fn browse(spec: &Value) -> Value {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "Chromium is not installed: apt-get install chromium (make test does)"
    );
    assert!(
        root()
            .join("tests/clients/node_modules/playwright-core")
            .exists(),
        "playwright-core is not installed: run `npm install --prefix tests/clients` (make test does)"
    );
    let mut cmd = Command::new("node");
    cmd.arg(root().join(SCRIPT))
        .arg(spec.to_string())
        .current_dir(root().join("tests/clients"))
        .env("CHROMIUM", &chromium)
        .env("NO_PROXY", "*");
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "ALL_PROXY",
    ] {
        cmd.env_remove(var);
    }
    let out = run(cmd, None);
    let said = crate::support::printed(&out);
    assert_exit(&out, 0, &format!("node {SCRIPT}: {said}"));
    let line = String::from_utf8_lossy(&out.stdout);
    let last = line.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {said}"))
}

fn shots() -> PathBuf {
    let dir = root().join("target/dashboard");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

#[test]
fn the_dashboard_shows_each_panels_numbers_in_a_real_browser() {
    let up = FakeUpstream::start(answer);
    let mut gw = Gateway::new(&Config::new(up.base_url()).admin_listen("127.0.0.1:0"));
    gw.add_api_key("alpha", KEY_A);
    gw.add_api_key("beta", KEY_B);
    let alice = key(&gw, "alice", &["--monthly-usd", "10"]);
    let bob = key(&gw, "bob", &["--daily-tokens", "100000"]);
    let admin = gw.add_admin_key("ops");
    let marked = key(&gw, "<img src=x onerror=\"window.__xss=1\">", &[]);
    gw.start();
    // A client's model name and a key's name that are HTML: the page shows them as text.
    assert_eq!(post(&gw, &marked, "<b>bold</b>", "html"), 200);
    // alice: one Opus request (18,375,000 nano-USD: see team::costs), bob: two Haiku.
    assert_eq!(post(&gw, &alice, "claude-opus-4-6", "first"), 200);
    assert_eq!(post(&gw, &bob, "claude-haiku-4-5", "one"), 200);
    assert_eq!(post(&gw, &bob, "claude-haiku-4-5", "two"), 200);
    // A request that fails over from one account and is refused by the other.
    assert_eq!(post(&gw, &bob, "claude-haiku-4-5", "please fail"), 400);

    let shot = shots().join("dashboard.png");
    let report = browse(&json!({
        "url": format!("http://{}/dashboard", gw.addr()),
        "admin_key": admin,
        "screenshot": shot,
    }));
    eprintln!("{report:#}");
    assert_eq!(report["errors"], json!([]), "the console stays clean");
    assert_eq!(report["signed_in"], true);
    let p = &report["panels"];
    let text = |k: &str| p[k].as_str().unwrap_or_default().to_string();
    let accounts = text("accounts");
    for want in ["alpha", "beta", "42%", "93%", "10%", "active"] {
        assert!(accounts.contains(want), "{want:?} in accounts: {accounts}");
    }
    let keys = text("keys");
    for want in [
        "alice",
        "$0.018375",
        "monthly: $0.02 of $10.00",
        "bob",
        "daily: 13,800 of 100,000 tokens",
    ] {
        assert!(keys.contains(want), "{want:?} in keys: {keys}");
    }
    let trouble = text("trouble");
    for want in ["400", "bob", "failed over", "alpha (500)"] {
        assert!(trouble.contains(want), "{want:?} in trouble: {trouble}");
    }
    // The HTML-named model is unpriced: it adds nothing to the cost charts.
    let total = 18_375_000 + 2 * 3_675_000;
    assert_eq!(
        p["daily_total"],
        total.to_string(),
        "the 30-day chart's cost"
    );
    assert_eq!(
        p["hourly_total"],
        total.to_string(),
        "the 24-hour chart's cost"
    );
    assert_eq!(p["injected"], false, "names are text, not HTML");
    assert!(keys.contains("<img src=x"), "{keys}");
    let legend = text("legend_by_model");
    assert!(
        legend.contains("claude-opus-4-6") && legend.contains("claude-haiku-4-5"),
        "{legend}"
    );
    assert!(text("header").contains("ready"), "{}", text("header"));
    // The session cookie, as the browser holds it.
    let cookie = &report["cookies"][0];
    assert_eq!(cookie["name"], "lgw_session");
    assert_eq!(
        (cookie["httpOnly"].as_bool(), cookie["sameSite"].as_str()),
        (Some(true), Some("Strict"))
    );
    assert!(shot.exists());

    // On the loopback admin listener no key is needed.
    let report = browse(&json!({
        "url": format!("http://{}/dashboard", gw.admin_addr()),
        "admin_key": null,
        "screenshot": shots().join("dashboard-admin-listener.png"),
    }));
    assert_eq!(report["errors"], json!([]));
    assert!(
        report["panels"]["keys"]
            .as_str()
            .unwrap_or("")
            .contains("alice")
    );
}

#[test]
fn the_dashboards_data_needs_an_admin_key_or_a_session_and_holds_no_secret() {
    let up = FakeUpstream::start(answer);
    let config = Config::new(up.base_url())
        .admin_listen("127.0.0.1:0")
        .server("trusted_proxies", "[\"127.0.0.1\"]");
    let mut gw = Gateway::new(&config);
    gw.add_api_key("alpha", KEY_A);
    let user = key(&gw, "user", &[]);
    let admin = gw.add_admin_key("ops");
    gw.start();
    assert_eq!(post(&gw, &user, "claude-haiku-4-5", "hi"), 200);
    let get = |path: &str, headers: &[(&str, &str)]| call(gw.addr(), "GET", path, headers, b"");

    // The page itself holds no data: it loads for anyone, under its headers.
    let page = get("/dashboard", &[]);
    assert_eq!(page.status, 200);
    let csp = page
        .header("content-security-policy")
        .unwrap_or_default()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("default-src 'none'"),
        "{csp}"
    );
    assert!(
        !page.text().contains("<script>"),
        "no inline script for the CSP to allow"
    );
    assert_eq!(get("/dashboard/app.js", &[]).status, 200);

    for path in [
        "/admin/api/overview",
        "/admin/api/usage",
        "/admin/api/keys",
        "/admin/api/trouble",
    ] {
        assert_eq!(get(path, &[]).status, 401, "{path} without a key");
        assert_eq!(
            get(path, &[("x-api-key", &user)]).status,
            403,
            "{path} with a plain key"
        );
        let ok = get(path, &[("x-api-key", &admin)]);
        assert_eq!(ok.status, 200, "{path}: {}", ok.text());
        for secret in [KEY_A, user.as_str(), admin.as_str()] {
            assert!(!ok.text().contains(secret), "{path} shows a secret");
        }
        // A cookie of the right shape and a live expiry whose tag this gateway did not sign.
        let forged = format!(
            "lgw_session=ck_00000000.{}.{}",
            now_unix() + 3600,
            "ab".repeat(32)
        );
        let forged = get(path, &[("cookie", forged.as_str())]);
        assert_eq!(forged.status, 401, "{path} with a forged session");
        // A page elsewhere that rebinds its name to 127.0.0.1 gets nothing without a key.
        let rebound = call(
            gw.admin_addr(),
            "GET",
            path,
            &[("host", "evil.example:8081")],
            b"",
        );
        assert_eq!(rebound.status, 401, "{path} through a rebound name");
        assert_eq!(
            call(gw.admin_addr(), "GET", path, &[], b"").status,
            200,
            "admin listener"
        );
    }

    let status = call(
        gw.admin_addr(),
        "GET",
        "/admin/status",
        &[("host", "evil.example")],
        b"",
    );
    assert_eq!(status.status, 401, "status through a rebound name");
    // Sign-in: an admin key in, a session cookie out; a plain key gets nothing.
    let login = |key: &str| {
        call(
            gw.addr(),
            "POST",
            "/dashboard/login",
            &[("x-api-key", key)],
            b"",
        )
    };
    assert_eq!(login(&user).status, 403);
    let signed = login(&admin);
    assert_eq!(signed.status, 200, "{}", signed.text());
    let cookie = signed.header("set-cookie").expect("a cookie").to_string();
    for part in ["lgw_session=", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(part), "{part} in {cookie}");
    }
    assert!(
        !cookie.contains("Secure"),
        "plain HTTP on loopback: {cookie}"
    );
    assert!(!cookie.contains(&admin), "the cookie is not the key");
    let value = cookie.split(';').next().unwrap_or_default().to_string();
    assert_eq!(get("/admin/api/usage", &[("cookie", &value)]).status, 200);
    // Any instance with the same gateway.key accepts it.
    let mut other = gw.sibling();
    other.start();
    let elsewhere = call(
        other.addr(),
        "GET",
        "/admin/api/keys",
        &[("cookie", &value)],
        b"",
    );
    assert_eq!(elsewhere.status, 200, "{}", elsewhere.text());
    // Through a proxy for a remote browser, the cookie is Secure.
    let remote = call(
        gw.addr(),
        "POST",
        "/dashboard/login",
        &[("x-api-key", &admin), ("x-forwarded-for", "203.0.113.9")],
        b"",
    );
    let cookie = remote.header("set-cookie").unwrap_or_default();
    assert!(cookie.contains("; Secure"), "{cookie}");
    // A session ends with its admin key.
    let out = gw.run_cli(&["list-client-keys", "--json"]);
    let keys: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let ops = (keys.as_array().expect("keys").iter())
        .find(|k| k["name"] == "ops")
        .and_then(|k| k["id"].as_str())
        .expect("the admin key's id")
        .to_string();
    assert_exit(
        &gw.run_cli(&["revoke-client-key", "--key-id", &ops]),
        0,
        "revoke",
    );
    crate::support::wait_until(
        "the revoked key's session ends",
        std::time::Duration::from_secs(5),
        || get("/admin/api/usage", &[("cookie", &value)]).status == 401,
    );
}

/// 30 days of 50 keys on three models: the page's weight and its render time.
#[test]
fn thirty_days_of_fifty_keys_render_in_the_browser() {
    let up = FakeUpstream::start(answer);
    let gw_config = Config::new(up.base_url()).admin_listen("127.0.0.1:0");
    let mut gw = Gateway::new(&gw_config);
    gw.add_api_key("alpha", KEY_A);
    let usage = gw.dir().join("usage");
    std::fs::create_dir_all(&usage).expect("usage dir");
    let now = now_unix();
    let mut journal = String::new();
    for day in 0..30u64 {
        for k in 0..50u64 {
            for (m, model) in ["claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-6"]
                .iter()
                .enumerate()
            {
                let t = now - day * 86_400 - (k * 97 + m as u64 * 13) % 3600;
                let record = json!({"t": t, "key": format!("ck_{k:08x}"), "account": "acc_fixture", "model": model,
                    "status": 200, "input": 100 + k, "output": 50, "cache_creation": 0, "cache_read": 0,
                    "cost": (100 + k) * 3_000 + 50 * 15_000});
                journal.push_str(&record.to_string());
                journal.push('\n');
            }
        }
    }
    std::fs::write(usage.join("journal-00000001.jsonl"), journal).expect("journal");
    gw.start();
    let report = browse(&json!({
        "url": format!("http://{}/dashboard", gw.admin_addr()),
        "admin_key": null,
        "screenshot": shots().join("dashboard-50-keys.png"),
    }));
    assert_eq!(report["errors"], json!([]));
    let bars = report["panels"]["bars"].as_u64().unwrap_or(0);
    assert!(
        bars >= 30 * 8 - 8,
        "30 days of 8 stacked series: {bars} bars"
    );
    let bundle: usize = ["/dashboard", "/dashboard/app.js", "/dashboard/app.css"]
        .iter()
        .map(|p| call(gw.addr(), "GET", p, &[], b"").body.len())
        .sum();
    eprintln!(
        "dashboard: page, script and style {bundle} bytes; the API's answers {} bytes; 30 days x 50 keys rendered in {:.1} ms",
        report["bytes"]["api"],
        report["render_ms"].as_f64().unwrap_or(0.0)
    );
}
