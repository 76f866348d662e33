//! An egress proxy per account: everything done for an account (inference, count_tokens,
//! models, probes, the OAuth login and refreshes) leaves through its proxy, whose URL is
//! sealed in config.yaml and masked in all output; other accounts go direct.

use crate::support::accounts::{KEY_A, KEY_B, post, served_by, started};
use crate::support::egress::EgressProxy;
use crate::support::{Config, FakeUpstream, Reply, assert_exit, base64, call, printed};

#[test]
fn every_call_of_a_proxied_account_goes_through_its_proxy_and_no_other_does() {
    let up = FakeUpstream::start(|req| match req.target.as_str() {
        t if t.starts_with("/v1/models") => Reply::json(200, r#"{"data":[],"has_more":false}"#),
        t if t.starts_with("/v1/messages/count_tokens") => {
            Reply::json(200, r#"{"input_tokens":3}"#)
        }
        _ => Reply::json(200, &served_by(req.api_key())),
    });
    let proxy = EgressProxy::start();
    let url = proxy.url("team", "pr0xy-pa55word");
    let (gw, ids) = started(
        &Config::new(up.base_url()),
        &[("via", KEY_A, &["--proxy", url.as_str()])],
    );
    assert_eq!(post(&gw).status, 200);
    let body = br#"{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"hi"}]}"#;
    let json = [gw.auth(), ("content-type", "application/json")];
    assert_eq!(
        call(gw.addr(), "POST", "/v1/messages/count_tokens", &json, body).status,
        200
    );
    assert_eq!(
        call(gw.addr(), "GET", "/v1/models", &[gw.auth()], b"").status,
        200
    );
    let probed = gw.run_cli(&["health-check", "--account-id", &ids[0], "--json"]);
    assert_exit(&probed, 0, "health-check");
    let lines = proxy.requests();
    for path in ["/v1/messages ", "/v1/messages/count_tokens", "/v1/models"] {
        assert!(
            lines.iter().any(|l| l.contains(path)),
            "{path} did not go through the proxy: {lines:?}"
        );
    }
    assert!(lines.len() >= 4, "the probe too: {lines:?}");
    let upstream = up.base_url().trim_start_matches("http://").to_string();
    for t in proxy.tunnels() {
        assert_eq!(t.target, upstream, "tunnels go to the upstream");
        assert_eq!(
            t.authorization.as_deref(),
            Some(format!("Basic {}", base64(b"team:pr0xy-pa55word")).as_str())
        );
    }
    // The URL is sealed in the file and masked in every output.
    let file = std::fs::read_to_string(gw.config_path()).expect("config");
    assert!(!file.contains("pr0xy-pa55word"), "{file}");
    for args in [vec!["list-accounts", "--json"], vec!["list-accounts"]] {
        let out = gw.run_cli(&args);
        assert!(
            !printed(&out).contains("pr0xy-pa55word"),
            "{}",
            printed(&out)
        );
    }
    assert!(!gw.stderr().contains("pr0xy-pa55word"));
}

#[test]
fn direct_accounts_and_direct_overrides_never_use_the_proxy() {
    let up = FakeUpstream::start(|req| Reply::json(200, &served_by(req.api_key())));
    let proxy = EgressProxy::start();
    let url = proxy.url("all", "global-pass");
    let (gw, _) = started(
        &Config::new(up.base_url()).upstream("proxy", &url),
        &[
            ("default", KEY_A, &[]),
            ("direct", KEY_B, &["--proxy", "direct"]),
        ],
    );
    for _ in 0..6 {
        assert_eq!(post(&gw).status, 200);
    }
    let via_proxy = proxy.requests().len();
    let keys = up.keys();
    let on_a = keys.iter().filter(|k| *k == KEY_A).count();
    assert!(on_a > 0 && on_a < 6, "both served: {keys:?}");
    assert_eq!(
        via_proxy, on_a,
        "only the default account's requests went through it"
    );
}

#[test]
fn an_oauth_accounts_login_and_refreshes_leave_through_its_proxy() {
    use crate::oauth::rig::Rig;
    use crate::support::{MESSAGE_BODY, Script};
    let up = FakeUpstream::json(200, r#"{"id":"msg_1","type":"message","content":[]}"#);
    let proxy = EgressProxy::start();
    let url = proxy.url("login", "oauth-proxy-pass");
    // Grants last 60 s, within the refresh lead: the server refreshes before it serves.
    let script = Script {
        exchange_expires_in: 60,
        ..Script::default()
    };
    let mut rig = Rig::new(script, up, |c| c.upstream("proxy", &url));
    rig.login("via-proxy");
    let token_path = crate::support::TOKEN_PATH;
    let after_login = proxy.requests();
    assert!(
        after_login
            .iter()
            .any(|l| l.starts_with(&format!("POST {token_path}"))),
        "the CLI's code exchange went through the proxy: {after_login:?}"
    );
    let addr = rig.gw.start();
    let resp = rig.post(addr, MESSAGE_BODY);
    assert_eq!(resp.status, 200, "{}", resp.text());
    let lines = proxy.requests();
    let token_calls = (lines.iter())
        .filter(|l| l.starts_with(&format!("POST {token_path}")))
        .count();
    assert!(
        token_calls >= 2,
        "the refresh went through the proxy too: {lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("POST /v1/messages")),
        "{lines:?}"
    );
    assert!(!rig.gw.stderr().contains("oauth-proxy-pass"));
}

/// An HTTPS upstream whose certificate (for 127.0.0.1) only the test CA vouches for, as a
/// TLS-intercepting proxy's would be; answers every request with `served_by`. Returns its
/// base URL and the CA's path.
fn privately_signed_upstream() -> (String, String) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::Arc;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tls/redis");
    let tls = crate::support::tls_server(
        &format!("{dir}/server.pem"),
        &format!("{dir}/server-key.pem"),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let tls = Arc::clone(&tls);
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(tls) else {
                    return;
                };
                let mut tls_stream = BufReader::new(rustls::StreamOwned::new(conn, stream));
                loop {
                    let (mut length, mut key) = (0usize, String::new());
                    loop {
                        let mut line = String::new();
                        if tls_stream.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                        if let Some(v) = lower.strip_prefix("x-api-key:") {
                            key = line[line.len() - v.len()..].trim().to_string();
                        }
                    }
                    let mut body = vec![0; length];
                    if tls_stream.read_exact(&mut body).is_err() {
                        return;
                    }
                    let answer = served_by(&key);
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        answer.len()
                    );
                    let out = tls_stream.get_mut();
                    if out.write_all(head.as_bytes()).is_err()
                        || out.write_all(answer.as_bytes()).is_err()
                        || out.flush().is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (format!("https://{addr}"), format!("{dir}/ca.pem"))
}

#[test]
fn a_ca_file_lets_tls_through_a_proxy_that_intercepts_it() {
    let (base_url, ca) = privately_signed_upstream();
    // Globally: every account trusts the CA.
    let (gw, _) = started(
        &Config::new(base_url.as_str()).upstream("ca_file", &ca),
        &[("trusting", KEY_A, &[])],
    );
    let resp = post(&gw);
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), served_by(KEY_A));
    // Per account: only the account that names the CA gets through.
    let (gw, ids) = started(
        &Config::new(base_url.as_str()),
        &[
            ("own-ca", KEY_A, &["--ca-file", ca.as_str()]),
            ("public-roots", KEY_B, &["--priority", "1"]),
        ],
    );
    let resp = post(&gw);
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), served_by(KEY_A));
    let out = gw.run_cli(&["health-check", "--account-id", &ids[1], "--json"]);
    assert!(
        printed(&out).contains("certificate"),
        "the other account's TLS trusts the public roots only: {}",
        printed(&out)
    );
    let bad = gw.run_cli(&[
        "set-account",
        "--account-id",
        &ids[1],
        "--ca-file",
        "/nonexistent.pem",
    ]);
    assert_exit(&bad, 2, "a CA file that cannot be read");
}
