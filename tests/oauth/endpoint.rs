//! The token endpoint is an upstream too (README: Reliability): what it answers is checked
//! before it is kept (a lifetime past any real token's is bounded, never wrapped; a token no
//! header can carry is a failed refresh, never a 400 for the client), and what it echoes of our
//! request never reaches the CLI's output or the server's log.

use super::SERVER_ACTS;
use super::answering_upstream;
use super::rig::{Rig, bearer};
use crate::support::{MESSAGE_BODY, Script, access_token, assert_exit, now_unix, wait_until};

/// The most a grant's lifetime is believed (the gateway's bound: 30 days).
const MAX_LIFETIME: u64 = 30 * 24 * 3600;

#[test]
fn a_lifetime_past_any_real_token_is_bounded_and_no_refresh_follows() {
    let script = Script {
        exchange_expires_in: u64::MAX,
        ..Script::default()
    };
    let mut rig = Rig::new(script, answering_upstream(), |c| c);
    let before = now_unix();
    let id = rig.login("forever");
    let expires_at = rig.account(&id)["expires_at"].as_u64().expect("expires_at");
    assert!(
        expires_at > before + 3600 && expires_at <= now_unix() + MAX_LIFETIME,
        "a lifetime of u64::MAX seconds must be held to 30 days, not wrap: expires_at {expires_at}, now {before}"
    );
    let addr = rig.gw.start();
    let resp = rig.post(addr, MESSAGE_BODY);
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        bearer(&rig.up.requests()[0]),
        Some(access_token(1).as_str()),
        "the granted token serves: it is not taken for expired"
    );
    assert!(
        rig.tokens.refreshes().is_empty(),
        "no refresh of a fresh token"
    );
    rig.assert_no_leaks(&[]);
}

#[test]
fn a_token_no_header_can_carry_is_a_failed_refresh_and_requests_fail_over() {
    const INJECTING: &str = "at-bad\r\nx-injected: 1";
    // At login: refused, nothing stored.
    let mut rig = Rig::new(
        Script {
            access_token: Some(INJECTING.into()),
            ..Script::default()
        },
        answering_upstream(),
        |c| c.section("sticky:\n  enabled: false\n"),
    );
    let refused = rig.add_oauth("lied-to", None);
    let login = rig.start_login(&refused);
    let code = rig.next_code();
    let out = rig.callback(&refused, &format!("{code}#{}", login.state));
    assert_exit(&out, 7, "a grant whose token cannot be sent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("header"), "says why: {err}");
    assert_eq!(rig.account(&refused)["state"], "not_logged_in");
    assert!(!rig.gw.config_text().contains("x-injected"));

    // At refresh: a failed refresh (the account fails over), never a 400 for the client.
    rig.tokens.script(|s| {
        s.access_token = None;
        s.exchange_expires_in = 0;
    });
    let id = rig.login("expired");
    rig.tokens
        .script(|s| s.access_token = Some(INJECTING.into()));
    let addr = rig.start_with_steady_key();
    rig.assert_steady_serves(addr, 4);
    for req in rig.up.requests() {
        assert!(req.header("x-injected").is_none());
    }
    wait_until("the refresh was tried", SERVER_ACTS, || {
        !rig.tokens.refreshes().is_empty()
    });
    assert!(!rig.gw.config_text().contains("x-injected"));
    assert_ne!(
        rig.account(&id)["state"],
        "needs_login",
        "a bad answer is no invalid_grant"
    );
    rig.assert_no_leaks(&[]);
}

#[test]
fn an_echoing_token_endpoint_shows_none_of_our_secrets() {
    const CLIENT_SECRET: &str = "client-secret-Zr8uQm2xVb";
    let mut rig = Rig::new(Script::default(), answering_upstream(), |c| c);
    // A login whose exchange is echoed back: code, verifier, state and client secret.
    let id = rig.add_oauth(
        "echoed",
        Some(("--client-secret", CLIENT_SECRET, CLIENT_SECRET)),
    );
    rig.tokens.script(|s| s.echo = true);
    let login = rig.start_login(&id);
    let code = rig.next_code();
    let out = rig.callback(&id, &format!("{code}#{}", login.state));
    assert_exit(&out, 7, "an exchange the endpoint refuses");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("malformed request"),
        "what the endpoint said is still shown: {err}"
    );
    assert!(!err.contains(CLIENT_SECRET) && !err.contains(&code) && !err.contains(&login.state));

    // A refresh whose request is echoed back: the refresh token and client secret.
    rig.tokens.script(|s| {
        s.echo = false;
        s.exchange_expires_in = 0;
    });
    let login = rig.start_login(&id);
    let code = rig.next_code();
    assert_exit(
        &rig.callback(&id, &format!("{code}#{}", login.state)),
        0,
        "login",
    );
    rig.tokens.script(|s| s.echo = true);
    let addr = rig.gw.start();
    let resp = rig.post(addr, MESSAGE_BODY);
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert!(!resp.text().contains(CLIENT_SECRET));
    wait_until("the echoed refresh is logged", SERVER_ACTS, || {
        rig.gw.stderr().contains("malformed request")
    });
    rig.assert_no_leaks(&[]);
}

#[test]
fn a_refresh_token_sent_back_unchanged_is_kept_as_it_is() {
    // Scrubbing masks what an endpoint echoes in its errors, never a grant: a refresh answer
    // that carries the refresh token it was sent keeps it usable for the next refresh.
    let script = Script {
        exchange_expires_in: 0,
        refresh_expires_in: 0,
        echo_refresh_token: true,
        ..Script::default()
    };
    let mut rig = Rig::new(script, answering_upstream(), |c| c);
    rig.login("steady");
    let addr = rig.gw.start();
    // Every token is born expired: each request asks for a refresh, granted at most once a
    // second (`refresh_min_interval`); a second grant needs the first's refresh token intact.
    wait_until("a second refresh is granted", SERVER_ACTS, || {
        rig.post(addr, MESSAGE_BODY);
        rig.tokens.granted_refreshes() >= 2
    });
    for refresh in rig.tokens.refreshes() {
        assert_eq!(
            refresh["refresh_token"],
            crate::support::refresh_token(1).as_str(),
            "{refresh}"
        );
    }
    rig.assert_no_leaks(&[]);
}
