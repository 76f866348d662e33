//! Security guarantees: no secret the suite hands the gateway reaches a log line, an error, the
//! access log, `/metrics`, `/admin/status` or CLI output; status and metrics need no key only
//! on a loopback admin listener.

use crate::oauth::rig::Rig;
use crate::support::post_message;
use crate::support::*;

const KEY_LIMITED: &str = "sk-ant-api03-SecurityLimitedKEY-0x9QpLm2-AA";
const KEY_SERVING: &str = "sk-ant-api03-SecurityServingKEY-7rT4vB8n-AA";
const WRONG_CLIENT_KEY: &str = "lgw_WrongPresentedKeyThatIsNotValid0000000001";

const HELLO: &str = r#"{"id":"msg_01","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"hello"}],"stop_reason":"end_turn","usage":{"input_tokens":3,"output_tokens":1}}"#;

fn message(stream: bool) -> String {
    format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":16,"stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
    )
}

/// Every secret (upstream API keys, OAuth tokens and codes, client keys in clear, a wrong key a
/// client presented) stays out of the server's debug log, the access log, error bodies,
/// `/metrics`, `/admin/status` and every CLI command's output, through success, failover, a
/// 429, auth failures, streams and both API formats.
#[test]
fn no_secret_reaches_logs_errors_metrics_status_or_cli_output() {
    let up = FakeUpstream::start(|req| {
        if req.header("x-api-key") == Some(KEY_LIMITED) {
            return Reply::json_with(
                429,
                &[("retry-after", "30")],
                r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
            );
        }
        if String::from_utf8_lossy(&req.body).contains(r#""stream":true"#) {
            return Reply::Sse {
                events: sse_events(2),
                gate: None,
                framing: Framing::Chunked,
            };
        }
        Reply::json(200, HELLO)
    });
    // Access lines go to stderr (the default), which the leak check reads with the debug log.
    let mut rig = Rig::new(Script::default(), up, |c| c.admin_listen("127.0.0.1:0"));
    for key in [KEY_LIMITED, KEY_SERVING, WRONG_CLIENT_KEY] {
        rig.remember(key);
    }
    rig.login("team");
    rig.gw.add_api_key("limited", KEY_LIMITED);
    rig.gw.add_api_key("serving", KEY_SERVING);
    let admin_key = rig.gw.add_admin_key("ops");
    rig.remember(&admin_key);
    let client_key = rig.gw.client_key().to_string();
    rig.remember(&client_key);
    let addr = rig.gw.start();
    let admin = rig.gw.admin_addr();

    let mut seen: Vec<String> = Vec::new();
    let mut keep = |what: &str, resp: &Response| seen.push(format!("{what}: {}", resp.text()));
    for stream in [false, true] {
        for _ in 0..4 {
            let body = message(stream);
            let resp = rig.post(addr, &body);
            assert_eq!(resp.status, 200, "{}", resp.text());
            keep("message", &resp);
            let chat = format!(
                r#"{{"model":"claude-sonnet-4-5","stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
            );
            let resp = call(
                addr,
                "POST",
                "/v1/chat/completions",
                &[("authorization", &format!("Bearer {client_key}"))],
                chat.as_bytes(),
            );
            assert_eq!(resp.status, 200, "{}", resp.text());
            keep("chat", &resp);
        }
    }
    // Refused credentials, both formats, both headers.
    for (path, header, value) in [
        ("/v1/messages", "x-api-key", WRONG_CLIENT_KEY.to_string()),
        (
            "/v1/chat/completions",
            "authorization",
            format!("Bearer {WRONG_CLIENT_KEY}"),
        ),
    ] {
        let resp = call(
            addr,
            "POST",
            path,
            &[(header, &value)],
            message(false).as_bytes(),
        );
        assert_eq!(resp.status, 401, "{}", resp.text());
        keep("refused", &resp);
    }
    // A client key asking for status is forbidden, and says so without echoing it.
    let resp = call(addr, "GET", "/admin/status", &[rig.gw.auth()], b"");
    assert_eq!(resp.status, 403, "{}", resp.text());
    keep("forbidden status", &resp);
    for path in ["/admin/status", "/metrics"] {
        let resp = call(admin, "GET", path, &[], b"");
        assert_eq!(resp.status, 200, "{path}: {}", resp.text());
        keep(path, &resp);
        let resp = call(addr, "GET", path, &[("x-api-key", &admin_key)], b"");
        assert_eq!(
            resp.status,
            200,
            "{path} with the admin key: {}",
            resp.text()
        );
        keep(path, &resp);
    }
    let status_url = format!("--url=http://{admin}");
    for args in [
        vec!["list-accounts"],
        vec!["list-accounts", "--json"],
        vec!["list-client-keys"],
        vec!["list-client-keys", "--json"],
        vec!["status", status_url.as_str()],
        vec!["status", status_url.as_str(), "--json"],
        vec!["usage"],
        vec!["usage", "--json"],
        vec!["health-check", "--json"],
    ] {
        let out = rig.cli(&args);
        assert!(
            out.status.code().is_some(),
            "{args:?} ended by a signal: {out:?}"
        );
    }
    rig.gw.stop();
    let access = rig.gw.all_stderr();
    let lines = access
        .lines()
        .filter(|l| l.contains(r#""request_id""#))
        .count();
    assert!(lines >= 16, "an access line per request:\n{access}");
    seen.push(format!("config.yaml: {}", rig.gw.config_text()));
    rig.assert_no_leaks(&seen);
}

/// On a non-loopback admin address, status and metrics need an admin key like on the main
/// listener; health and readiness stay open (load balancers probe them).
#[test]
fn admin_listener_off_loopback_needs_an_admin_key() {
    let up = FakeUpstream::start(|_| Reply::json(200, HELLO));
    let mut gw = Gateway::new(&Config::new(up.base_url()).admin_listen("0.0.0.0:0"));
    let admin_key = gw.add_admin_key("ops");
    gw.add_client_key("tests");
    gw.start();
    let port = gw.admin_addr().port();
    let admin: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    for path in ["/admin/status", "/metrics"] {
        let resp = call(admin, "GET", path, &[], b"");
        assert_eq!(resp.status, 401, "{path} without a key: {}", resp.text());
        let resp = call(admin, "GET", path, &[gw.auth()], b"");
        assert_eq!(
            resp.status,
            403,
            "{path} with a client key: {}",
            resp.text()
        );
        let resp = call(admin, "GET", path, &[("x-api-key", &admin_key)], b"");
        assert_eq!(
            resp.status,
            200,
            "{path} with the admin key: {}",
            resp.text()
        );
    }
    // Open to probes: /ready says 503 here only because no account is configured.
    for (path, status) in [("/health", 200), ("/ready", 503)] {
        let resp = call(admin, "GET", path, &[], b"");
        assert_eq!(resp.status, status, "{path}: {}", resp.text());
    }
    let resp = post_message(admin, &[gw.auth()]);
    assert_eq!(
        resp.status, 404,
        "nothing is forwarded from the admin listener"
    );
    assert!(
        gw.stderr().contains("is not loopback"),
        "the log says why: {}",
        gw.stderr()
    );
}
