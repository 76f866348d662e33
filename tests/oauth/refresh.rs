//! Tokens in a running server: refreshed ahead of expiry, on demand, and after a 401; once per
//! account across threads and processes; rotated refresh tokens persisted across a restart; and
//! `invalid_grant` turning the account to `needs_login` while other accounts serve.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::rig::{self, Rig, bearer};
use super::{OK_BODY, RELOAD, SERVER_ACTS, answering_upstream, sorted, unix_f64};
use crate::support::{
    Config, FakeUpstream, MESSAGE_BODY, Reply, Response, Script, access_token, assert_error,
    assert_exit, in_parallel, now_unix, refresh_token, sorted_keys, wait_until,
};

/// A rig on the answering upstream with `config`'s settings, `name` logged in through
/// `script`, and its server started: the rig, the account's id and the server's address.
fn started_rig(
    script: Script,
    config: impl FnOnce(Config) -> Config,
    name: &str,
) -> (Rig, String, SocketAddr) {
    let mut rig = Rig::new(script, answering_upstream(), config);
    let id = rig.login(name);
    let addr = rig.gw.start();
    (rig, id, addr)
}

/// Stops the server, expires the token config.yaml holds, and has a new server serve one
/// request: to do that it must refresh with the refresh token config.yaml kept.
fn restart_with_the_token_expired(rig: &mut Rig) {
    rig.gw.stop();
    rig.set_config_ints("expires_at", now_unix() - 120);
    rig.gw.start();
    let resp = rig.post(rig.gw.addr(), MESSAGE_BODY);
    assert_eq!(resp.status, 200, "after restart: {}", resp.text());
}

/// The refresh token each refresh call presented, in order.
fn presented_refresh_tokens(rig: &Rig) -> Vec<Value> {
    rig.tokens
        .refreshes()
        .iter()
        .map(|r| r["refresh_token"].clone())
        .collect()
}

/// Every response is a 200 and they share one refresh: the token endpoint was called once,
/// and each of their upstream requests carried the refreshed token.
fn assert_served_after_one_refresh(rig: &Rig, responses: &[Response], what: &str) {
    for (i, resp) in responses.iter().enumerate() {
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
    }
    assert_eq!(
        rig.tokens.refreshes().len(),
        1,
        "{what}: exactly one refresh"
    );
    let reqs = rig.up.requests();
    assert_eq!(reqs.len(), responses.len());
    for req in &reqs {
        assert_eq!(bearer(req), Some(access_token(2).as_str()));
    }
}

#[test]
fn refresher_renews_a_token_before_it_expires() {
    // Lead 10m, capped at half of a 6 s lifetime: due 3 s in. (6 s rather than 4 s leaves the
    // refresher's 1 s tick a margin of two seconds on a loaded machine.)
    const LIFETIME: u64 = 6;
    let script = Script {
        exchange_expires_in: LIFETIME,
        ..Script::default()
    };
    let mut rig = Rig::new(script, answering_upstream(), |c| {
        c.oauth("refresh_lead", "10m")
    });
    let before_login = unix_f64(SystemTime::now());
    let id = rig.login("soon");
    let first_expiry = rig.account(&id)["expires_at"].as_u64().expect("expires_at");
    rig.gw.start();

    wait_until(
        "the refresher calls the token endpoint",
        SERVER_ACTS,
        || !rig.tokens.refreshes().is_empty(),
    );
    let refreshed_at = rig
        .tokens
        .answers()
        .iter()
        .find(|a| a.grant_type == "refresh_token")
        .map(|a| unix_f64(a.at))
        .expect("refresh answered");
    assert!(
        refreshed_at < first_expiry as f64,
        "refreshed at {refreshed_at:.2}, not before the expiry {first_expiry}"
    );
    assert!(
        refreshed_at > before_login + (LIFETIME / 2 - 1) as f64,
        "refreshed {:.2}s after login: the lead should be capped at half the lifetime",
        refreshed_at - before_login
    );
    let refresh = &rig.tokens.refreshes()[0];
    assert_eq!(
        sorted_keys(refresh),
        sorted(&["grant_type", "refresh_token", "client_id"]),
        "{refresh}"
    );
    assert_eq!(refresh["refresh_token"], refresh_token(1).as_str());
    assert_eq!(refresh["client_id"], rig::CLIENT_ID);

    let resp = rig.post(rig.gw.addr(), MESSAGE_BODY);
    assert_eq!(resp.status, 200, "{}", resp.text());
    let reqs = rig.up.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(bearer(&reqs[0]), Some(access_token(2).as_str()));
    // Persisted before use: by the time a request carried the new token, the file has it.
    let expiry = rig.account(&id)["expires_at"].as_u64().expect("expires_at");
    assert!(
        expiry >= now_unix() + 3600 - 30,
        "config.yaml still has the old expiry ({expiry}, was {first_expiry})"
    );
    assert_eq!(rig.tokens.refreshes().len(), 1, "one refresh only");
    rig.assert_no_leaks(&[]);
}

#[test]
fn rotated_refresh_token_survives_a_restart() {
    let script = Script {
        exchange_expires_in: 0,
        rotate: true,
        ..Script::default()
    };
    let (mut rig, id, addr) = started_rig(script, |c| c, "rotating");
    let resp = rig.post(addr, MESSAGE_BODY);
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        bearer(&rig.up.requests()[0]),
        Some(access_token(2).as_str())
    );
    assert_eq!(rig.tokens.refreshes().len(), 1);

    // Expire the rotated token, so the next server must refresh with the rotated refresh token.
    restart_with_the_token_expired(&mut rig);
    let reqs = rig.up.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(bearer(&reqs[1]), Some(access_token(3).as_str()));

    assert_eq!(
        presented_refresh_tokens(&rig),
        [json!(refresh_token(1)), json!(refresh_token(2))],
        "the second server must use the rotated refresh token"
    );
    let statuses: Vec<u16> = rig.tokens.answers().iter().map(|a| a.status).collect();
    assert!(
        statuses.iter().all(|s| *s == 200),
        "token endpoint answers {statuses:?}"
    );
    assert_eq!(rig.account(&id)["state"], "enabled");
    rig.assert_no_leaks(&[]);
}

#[test]
fn refresh_answer_without_refresh_token_keeps_the_old_one() {
    // Without `rotate`, the endpoint's refresh answers carry no refresh_token, and rt-1 stays
    // the only one it accepts.
    let script = Script {
        exchange_expires_in: 0,
        ..Script::default()
    };
    let (mut rig, id, addr) = started_rig(script, |c| c, "kept");
    let resp = rig.post(addr, MESSAGE_BODY);
    assert_eq!(resp.status, 200, "{}", resp.text());

    restart_with_the_token_expired(&mut rig);
    let bearers: Vec<Option<String>> = rig
        .up
        .requests()
        .iter()
        .map(|r| bearer(r).map(String::from))
        .collect();
    assert_eq!(bearers, [Some(access_token(2)), Some(access_token(3))]);
    assert_eq!(
        presented_refresh_tokens(&rig),
        [json!(refresh_token(1)), json!(refresh_token(1))],
        "a refresh answer without refresh_token keeps the old one"
    );
    assert_eq!(rig.account(&id)["state"], "enabled");
    rig.assert_no_leaks(&[]);
}

#[test]
fn token_within_a_minute_of_expiry_is_refreshed_when_selected() {
    // 30 s left: inside the 60 s margin at selection, far outside the refresher's 1 s lead.
    let script = Script {
        exchange_expires_in: 30,
        ..Script::default()
    };
    let (mut rig, _, addr) = started_rig(script, |c| c.oauth("refresh_lead", "1s"), "nearly");

    let resp = rig.post(addr, MESSAGE_BODY);
    assert_eq!(resp.status, 200, "{}", resp.text());
    let reqs = rig.up.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(bearer(&reqs[0]), Some(access_token(2).as_str()));
    assert_eq!(rig.tokens.refreshes().len(), 1);
    rig.assert_no_leaks(&[]);
}

#[test]
fn twenty_concurrent_requests_share_one_refresh() {
    let script = Script {
        exchange_expires_in: 0,
        refresh_delay: Duration::from_millis(300),
        ..Script::default()
    };
    let (mut rig, _, addr) = started_rig(script, |c| c, "busy");

    let responses = in_parallel(20, |_| rig.post(addr, MESSAGE_BODY));
    assert_served_after_one_refresh(&rig, &responses, "20 requests with an expired token");
    rig.assert_no_leaks(&[]);
}

#[test]
fn two_gateway_processes_share_one_refresh() {
    let script = Script {
        exchange_expires_in: 0,
        // Longer than a server start, so the second process comes up mid-refresh.
        refresh_delay: Duration::from_millis(800),
        ..Script::default()
    };
    let (mut rig, _, first) = started_rig(script, |c| c, "shared");
    let mut second = rig.gw.spawn_server(&["--listen", "127.0.0.1:0"]);
    let addrs = [first, second.addr()];

    let responses = in_parallel(20, |i| rig.post(addrs[i % 2], MESSAGE_BODY));
    assert_served_after_one_refresh(&rig, &responses, "two processes with an expired token");
    second.kill();
    rig.assert_no_leaks(&[second.stderr()]);
}

#[test]
fn upstream_401_refreshes_once_and_retries_the_request() {
    let up = FakeUpstream::start(|req| {
        if bearer(req) == Some(access_token(2).as_str()) {
            Reply::json(200, OK_BODY)
        } else {
            Reply::json(
                401,
                r#"{"type":"error","error":{"type":"authentication_error","message":"OAuth token has expired."}}"#,
            )
        }
    });
    let mut rig = Rig::new(Script::default(), up, |c| c);
    rig.login("revoked");
    let addr = rig.gw.start();

    let resp = rig.post(addr, MESSAGE_BODY);
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), OK_BODY);
    let reqs = rig.up.requests();
    assert_eq!(reqs.len(), 2, "the refused request and its one retry");
    assert_eq!(bearer(&reqs[0]), Some(access_token(1).as_str()));
    assert_eq!(bearer(&reqs[1]), Some(access_token(2).as_str()));
    assert_eq!(reqs[0].target, reqs[1].target);
    assert_eq!(reqs[0].body, reqs[1].body, "the same request is retried");
    let refreshes = rig.tokens.refreshes();
    assert_eq!(refreshes.len(), 1, "one refresh");
    assert_eq!(refreshes[0]["refresh_token"], refresh_token(1).as_str());

    let resp = rig.post(addr, MESSAGE_BODY);
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        rig.up.requests().len(),
        3,
        "the new token is used from then on"
    );
    assert_eq!(rig.tokens.refreshes().len(), 1);
    rig.assert_no_leaks(&[]);
}

#[test]
fn invalid_grant_marks_needs_login_while_api_keys_serve() {
    let script = Script {
        exchange_expires_in: 0,
        refresh_invalid_grant: true,
        ..Script::default()
    };
    // Identical bodies would share a sticky pin; rotate instead, so the OAuth account gets
    // asked again once it is back.
    let mut rig = Rig::new(script, answering_upstream(), |c| {
        c.section("balance:\n  strategy: round_robin\nsticky:\n  enabled: false\n")
    });
    let id = rig.login("doomed");
    let addr = rig.start_with_steady_key();

    rig.assert_steady_serves(addr, 6);
    for req in rig.up.requests() {
        assert!(
            req.header("authorization").is_none(),
            "an expired token that could not be refreshed went upstream"
        );
    }
    wait_until("list-accounts shows needs_login", SERVER_ACTS, || {
        rig.account(&id)["state"] == "needs_login"
    });
    assert!(
        rig.gw.config_text().contains("needs_login: true"),
        "config.yaml records needs_login"
    );
    assert_eq!(
        rig.tokens.refreshes().len(),
        1,
        "a dead refresh token is not tried again"
    );

    // A new login brings the account back without a restart.
    rig.tokens.script(|s| {
        s.exchange_expires_in = 3600;
        s.refresh_invalid_grant = false;
    });
    let login = rig.start_login(&id);
    let code = rig.next_code();
    assert_exit(
        &rig.callback(&id, &format!("{code}#{}", login.state)),
        0,
        "login again",
    );
    assert_eq!(rig.account(&id)["state"], "enabled");
    assert!(!rig.gw.config_text().contains("needs_login: true"));
    wait_until("the server uses the new login", RELOAD, || {
        let resp = rig.post(addr, MESSAGE_BODY);
        assert_eq!(resp.status, 200, "{}", resp.text());
        rig.up
            .requests()
            .iter()
            .any(|r| bearer(r) == Some(access_token(2).as_str()))
    });
    rig.assert_no_leaks(&[]);
}

#[test]
fn no_usable_account_gives_503() {
    let script = Script {
        exchange_expires_in: 0,
        refresh_invalid_grant: true,
        ..Script::default()
    };
    let (mut rig, _, addr) = started_rig(script, |c| c, "alone");

    let resp = rig.post(addr, MESSAGE_BODY);
    assert_error(&resp, 503, None);
    assert!(
        rig.up.requests().is_empty(),
        "an expired token that could not be refreshed went upstream"
    );
    rig.assert_no_leaks(&[]);
}
