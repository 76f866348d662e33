//! No secret anywhere: after a representative run (accounts added by flag, stdin and file;
//! keys of every kind; requests in both formats, refused ones with wrong keys, an upstream
//! refusing an account's key; the operator's CLI commands), no gateway key or upstream key the
//! test created appears in the server's stderr (at debug level), the access log file, the
//! ledger files, config.yaml, any CLI output, `/metrics` or any response. The one exception:
//! `add-client-key` printing the key it just made.

use std::process::Output;

use super::{
    ALIAS_SECTION, GPT, HAIKU, SONNET, Tokens, access_lines, answer, anthropic_body, cli_ok,
    first_user_text, openai_body, post_anthropic, post_openai, usage_once_counted,
};
use crate::support::{
    Config, FakeUpstream, Gateway, Reply, Response, assert_exit, call, run, wait_until,
};

/// The secrets the no-leak test hands out, as (what, text that must never show): each whole,
/// and the part beyond what may show by design (a gateway key's first characters in
/// `list-client-keys`, an upstream key's last four in its mask).
struct Secrets {
    needles: Vec<(String, String)>,
}

impl Secrets {
    fn gateway(&mut self, what: &str, key: &str) {
        self.needles
            .push((format!("{what} (whole)"), key.to_string()));
        self.needles
            .push((format!("{what} (after its prefix)"), key[12..].to_string()));
    }

    fn upstream(&mut self, what: &str, key: &str) {
        self.needles
            .push((format!("{what} (whole)"), key.to_string()));
        self.needles.push((
            format!("{what} (before its last four)"),
            key[..key.len() - 4].to_string(),
        ));
    }

    /// Fails naming every secret found in `text`, except `allowed` (the key `add-client-key`
    /// just printed).
    fn assert_absent(&self, place: &str, text: &str, allowed: Option<&str>) {
        let found: Vec<&str> = self
            .needles
            .iter()
            .filter(|(_, needle)| allowed.is_none_or(|a| !a.contains(needle.as_str())))
            .filter(|(_, needle)| text.contains(needle.as_str()))
            .map(|(what, _)| what.as_str())
            .collect();
        assert!(found.is_empty(), "{place} shows {found:?}");
    }
}

fn output_text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn no_secret_reaches_a_log_an_output_or_a_file() {
    const UP_1: &str = "sk-ant-api03-LeakHuntAccountOne-7f3a9c21e8b4-q1w2";
    const UP_2: &str = "sk-ant-api03-LeakHuntAccountTwo-4d6e8f0a2c1b-e3r4";
    const UP_3: &str = "sk-ant-api03-LeakHuntAccountThree-9b8a7c6d5e4f-t5y6";
    const WRONG: &str = "lgw_ThisWrongGatewayKeyMustNeverBeLoggedAnywhere0123";
    let up = FakeUpstream::start(|req| {
        if first_user_text(req).contains("upstream-refuses") {
            Reply::json(
                401,
                r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#,
            )
        } else {
            answer(req)
        }
    });
    let mut gw = Gateway::new(
        &Config::new(up.base_url())
            .admin_listen("127.0.0.1:0")
            .section("log:\n  level: debug\n  access_file: access.log\n")
            .section(ALIAS_SECTION),
    );
    let mut secrets = Secrets {
        needles: Vec::new(),
    };
    let mut outputs: Vec<(String, String)> = Vec::new();
    let mut keep = |what: &str, out: &Output| outputs.push((what.to_string(), output_text(out)));

    // Upstream keys, by flag, stdin and file.
    secrets.upstream("upstream key 1", UP_1);
    secrets.upstream("upstream key 2", UP_2);
    secrets.upstream("upstream key 3", UP_3);
    let out = gw.run_cli(&["add-api-key", "--name", "one", "--key", UP_1, "--json"]);
    assert_exit(&out, 0, "add-api-key --key");
    keep("add-api-key --key", &out);
    let out = gw.run_cli_stdin(
        &["add-api-key", "--name", "two"],
        format!("{UP_2}\n").as_bytes(),
    );
    assert_exit(&out, 0, "add-api-key from stdin");
    keep("add-api-key (stdin)", &out);
    let key_file = gw.dir().join("upstream.key");
    std::fs::write(&key_file, UP_3).expect("write key file");
    let out = gw.run_cli(&[
        "add-api-key",
        "--name",
        "three",
        "--key-file",
        key_file.to_str().expect("utf-8 path"),
    ]);
    assert_exit(&out, 0, "add-api-key --key-file");
    keep("add-api-key --key-file", &out);
    std::fs::remove_file(&key_file).expect("remove key file");

    // Gateway keys: add-client-key may print its own key, nothing else secret.
    let mut added: Vec<(String, String, String)> = Vec::new();
    let mut add = |name: &str, flags: &[&str], json: bool| -> (String, String) {
        let mut args = vec!["add-client-key", "--name", name];
        args.extend_from_slice(flags);
        if json {
            args.push("--json");
        }
        let out = gw.run_cli(&args);
        assert_exit(&out, 0, "add-client-key");
        let text = output_text(&out);
        let key = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            .find(|w| w.starts_with("lgw_"))
            .unwrap_or_else(|| panic!("add-client-key printed no key: {text}"))
            .to_string();
        let id = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .find(|w| w.starts_with("ck_"))
            .unwrap_or_else(|| panic!("add-client-key printed no id: {text}"))
            .to_string();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(stdout.contains(&key), "the key is printed on stdout");
        added.push((
            format!("add-client-key {name} (stdout)"),
            stdout,
            key.clone(),
        ));
        added.push((
            format!("add-client-key {name} (stderr)"),
            stderr,
            String::new(),
        ));
        (id, key)
    };
    let (_, user) = add("user", &[], true);
    let (_, operator) = add("operator", &["--admin"], false);
    let (limited_id, limited) = add(
        "limited",
        &[
            "--models",
            HAIKU,
            "--rpm",
            "100",
            "--daily-tokens",
            "1000000",
        ],
        true,
    );
    let (doomed_id, doomed) = add("doomed", &[], false);
    for (what, key) in [
        ("user key", &user),
        ("operator key", &operator),
        ("limited key", &limited),
        ("doomed key", &doomed),
    ] {
        secrets.gateway(what, key);
    }
    secrets.gateway("wrong gateway key", WRONG);
    gw.start();
    let addr = gw.addr();

    // Requests of every kind, as clients send them.
    let mut responses: Vec<Response> = Vec::new();
    let t = Tokens::new(5, 4, 3, 2);
    responses.push(post_anthropic(
        addr,
        &user,
        &anthropic_body(SONNET, t, false, "l1"),
        &[],
    ));
    responses.push(post_anthropic(
        addr,
        &user,
        &anthropic_body(SONNET, t, true, "l2"),
        &[],
    ));
    responses.push(post_openai(
        addr,
        &user,
        &openai_body(GPT, t, false, "l3"),
        &[],
    ));
    responses.push(post_openai(
        addr,
        &user,
        &openai_body(GPT, t, true, "l4"),
        &[],
    ));
    responses.push(call(
        addr,
        "GET",
        "/v1/models",
        &[("x-api-key", &user), ("anthropic-version", "2023-06-01")],
        b"",
    ));
    responses.push(post_anthropic(
        addr,
        &limited,
        &anthropic_body(SONNET, t, false, "l5"),
        &[],
    ));
    responses.push(post_anthropic(
        addr,
        &limited,
        &anthropic_body(HAIKU, t, false, "l6"),
        &[],
    ));
    responses.push(post_anthropic(
        addr,
        WRONG,
        &anthropic_body(SONNET, t, false, "l7"),
        &[],
    ));
    responses.push(post_openai(
        addr,
        WRONG,
        &openai_body(GPT, t, false, "l8"),
        &[],
    ));
    responses.push(post_anthropic(
        addr,
        &doomed,
        &anthropic_body(SONNET, t, false, "l9"),
        &[],
    ));
    responses.push(call(
        addr,
        "GET",
        "/metrics",
        &[("x-api-key", &operator)],
        b"",
    ));
    responses.push(call(
        addr,
        "GET",
        "/admin/status",
        &[("authorization", &format!("Bearer {operator}"))],
        b"",
    ));
    responses.push(call(addr, "GET", "/metrics", &[("x-api-key", &user)], b""));
    assert!(
        responses.iter().filter(|r| r.status == 200).count() >= 8,
        "the requests were served: {:?}",
        responses.iter().map(|r| r.status).collect::<Vec<_>>()
    );

    // The CLI, as an operator uses it.
    let admin_url = format!("http://{}", gw.admin_addr());
    let main_url = format!("http://{addr}");
    for args in [
        vec!["list-client-keys"],
        vec!["list-client-keys", "--json"],
        vec!["list-accounts"],
        vec!["list-accounts", "--json"],
        vec!["update-client-key", "--key-id", &limited_id, "--rpm", "200"],
        vec![
            "update-client-key",
            "--key-id",
            &limited_id,
            "--rpm",
            "none",
            "--json",
        ],
        vec!["revoke-client-key", "--key-id", &doomed_id],
        vec!["status", "--url", &admin_url],
        vec!["status", "--json", "--url", &admin_url],
        vec!["health-check"],
        vec!["health-check", "--json"],
    ] {
        let out = cli_ok(&gw, &args);
        keep(&args.join(" "), &out);
    }
    let mut cmd = gw.cli(&["status", "--json", "--url", &main_url]);
    cmd.env("LLM_GATEWAY_ADMIN_KEY", &operator);
    let out = run(cmd, None);
    assert_exit(&out, 0, "status with LLM_GATEWAY_ADMIN_KEY");
    keep("status (admin key from the environment)", &out);
    wait_until("the revoked key refused", super::RELOAD_LIMIT, || {
        post_anthropic(
            addr,
            &doomed,
            &anthropic_body(SONNET, t, false, "poll"),
            &[],
        )
        .status
            == 401
    });
    // Last, as it rests every account: the upstream refusing the account's key.
    responses.push(post_anthropic(
        addr,
        &user,
        &anthropic_body(SONNET, t, false, "upstream-refuses"),
        &[],
    ));

    usage_once_counted(&gw, &[], 1);
    for args in [
        vec!["usage"],
        vec!["usage", "--json"],
        vec!["usage", "--by", "account"],
        vec!["usage", "--by", "key", "--json"],
    ] {
        let out = cli_ok(&gw, &args);
        keep(&args.join(" "), &out);
    }
    let metrics = call(gw.admin_addr(), "GET", "/metrics", &[], b"").text();
    gw.stop();

    // Nowhere: stderr, the access log, the ledger, config.yaml, CLI output, metrics, responses.
    secrets.assert_absent("the server's stderr", &gw.all_stderr(), None);
    let access = std::fs::read_to_string(gw.dir().join("access.log")).expect("access.log");
    assert!(!access_lines(&access).is_empty(), "access.log has lines");
    secrets.assert_absent("access.log", &access, None);
    for entry in std::fs::read_dir(gw.dir().join("usage"))
        .expect("usage dir")
        .flatten()
    {
        let bytes = std::fs::read(entry.path()).unwrap_or_default();
        secrets.assert_absent(
            &format!("{:?}", entry.path()),
            &String::from_utf8_lossy(&bytes),
            None,
        );
    }
    secrets.assert_absent("config.yaml", &gw.config_text(), None);
    for (what, text) in &outputs {
        secrets.assert_absent(what, text, None);
    }
    for (what, text, own) in &added {
        let own = (!own.is_empty()).then_some(own.as_str());
        secrets.assert_absent(what, text, own);
    }
    secrets.assert_absent("/metrics", &metrics, None);
    for resp in &responses {
        let mut text = resp.text();
        for (name, value) in &resp.headers {
            text.push_str(&format!("\n{name}: {value}"));
        }
        secrets.assert_absent(&format!("a {} response", resp.status), &text, None);
    }
}
