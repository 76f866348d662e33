//! Redis going away and coming back: requests keep flowing on local state, `/ready` tells the
//! shared state is down (and up again), a warning is logged, and sharing resumes.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::accounts::until_it_meets;
use super::{
    PREFIX, SHARED, account_state, admin_status, ready, rotating, shared_rig, start_instances,
    state_section, warned_about_redis,
};
use crate::oauth::rig::bearer;
use crate::support::accounts::{
    KEY_A, KEY_B, limiting_upstream, new_conversation, post_body, served_by,
};
use crate::support::redis::{RedisServer, tls_dir};
use crate::support::{Config, FakeUpstream, Gateway, Script, access_token, wait_until};

/// Polls `/ready` on every instance until each answers 200 with `shared_state` = `want`.
fn wait_shared_state(gws: &[Gateway], want: &str, limit: Duration) {
    for (i, gw) in gws.iter().enumerate() {
        let deadline = Instant::now() + limit;
        loop {
            let (status, view) = ready(gw.addr());
            assert_eq!(status, 200, "instance {i}: /ready {view}");
            if view["shared_state"] == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "instance {i}: /ready does not say shared_state {want} within {limit:?}: {view}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn stopping_redis_keeps_requests_flowing() {
    // While Redis is down every request is still served from local state and /ready says
    // so; when it is back, /ready says so within about a second and sharing works again.
    let mut redis = RedisServer::start();
    let limited: Arc<Mutex<Option<String>>> = Arc::default();
    let up = limiting_upstream(&limited);
    let script = Script {
        exchange_expires_in: 3600,
        ..Script::default()
    };
    let rig = shared_rig(&redis, script, up, |c| c);
    let oauth = rig.login("oauth");
    let admin = rig.gw.add_admin_key("ops");
    rig.gw.add_api_key("x", KEY_A);
    rig.gw.add_api_key("y", KEY_B);
    let gws = start_instances(rig.gw.sibling(), 2);
    wait_shared_state(&gws, "up", SHARED);

    // Steady load on both instances from two clients, each request a new conversation.
    let stop = AtomicBool::new(false);
    let served = AtomicUsize::new(0);
    let failures: Mutex<Vec<String>> = Mutex::default();
    let wait_served = |more: usize, what: &str| {
        let target = served.load(Ordering::SeqCst) + more;
        wait_until(what, Duration::from_secs(20), || {
            served.load(Ordering::SeqCst) >= target
        });
    };
    thread::scope(|s| {
        for client in 0..2 {
            let (gws, stop, served, failures) = (&gws, &stop, &served, &failures);
            s.spawn(move || {
                let mut i = client;
                while !stop.load(Ordering::SeqCst) {
                    let resp = post_body(&gws[i % 2], &new_conversation());
                    if resp.status != 200 {
                        failures.lock().expect("failures").push(format!(
                            "instance {}: {} {}",
                            i % 2,
                            resp.status,
                            resp.text()
                        ));
                    }
                    served.fetch_add(1, Ordering::SeqCst);
                    i += 1;
                }
            });
        }
        wait_served(10, "10 requests before the outage");
        redis.stop();
        wait_shared_state(&gws, "down", SHARED);
        wait_served(20, "20 requests during the outage");
        for (i, gw) in gws.iter().enumerate() {
            let log = gw.stderr();
            assert!(
                warned_about_redis(&log),
                "instance {i} logged no warning about Redis:\n{log}"
            );
        }
        redis.restart();
        // The background probe notices within about a second; 2.5 s leaves room for load.
        wait_shared_state(&gws, "up", Duration::from_millis(2500));
        wait_served(10, "10 requests after the outage");
        stop.store(true, Ordering::SeqCst);
    });
    let failures = failures.into_inner().expect("failures");
    assert!(
        failures.is_empty(),
        "{} of {} requests failed around the outage:\n{}",
        failures.len(),
        served.load(Ordering::SeqCst),
        failures.join("\n")
    );

    // The OAuth account came through it logged in (Redis came back empty).
    for (i, gw) in gws.iter().enumerate() {
        let state = account_state(&admin_status(gw.addr(), &admin), &oauth);
        assert_eq!(
            state, "active",
            "instance {i}: the OAuth account after the outage"
        );
    }

    // Sharing works again: a 429 one instance sees benches the account for the other.
    *limited.lock().expect("limited lock") = Some(KEY_A.to_string());
    until_it_meets(&gws[0], &rig.up, KEY_A, "instance 0 after the outage");
    let benched_at = rig.up.keys().len();
    for round in 0..12 {
        let resp = post_body(&gws[1], &new_conversation());
        assert_eq!(resp.status, 200, "round {round}: {}", resp.text());
        assert_ne!(resp.text(), served_by(KEY_A), "round {round}");
    }
    let after = rig.up.keys()[benched_at..].to_vec();
    assert!(
        after.iter().all(|k| k != KEY_A),
        "the other instance used the benched account after the outage: {after:?}"
    );
}

#[test]
fn no_refresh_without_the_lease_while_redis_is_down() {
    // With Redis down an expired token is not refreshed (no lease, no refresh): requests fail
    // over to the API key; once Redis is back, one instance refreshes, once.
    let mut redis = RedisServer::start();
    let rig = shared_rig(
        &redis,
        rotating(0),
        limiting_upstream(&Arc::default()),
        |c| c.section("balance:\n  strategy: round_robin\nsticky:\n  enabled: false\n"),
    );
    rig.login("expired");
    rig.gw.add_api_key("x", KEY_A);
    redis.stop();
    let gws = start_instances(rig.gw.sibling(), 2);
    wait_shared_state(&gws, "down", SHARED);

    for i in 0..12 {
        let resp = post_body(&gws[i % 2], &new_conversation());
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
        assert_eq!(resp.text(), served_by(KEY_A), "request {i}");
    }
    for req in rig.up.requests() {
        assert_eq!(req.api_key(), KEY_A, "the expired token went upstream");
    }
    assert!(
        rig.tokens.refreshes().is_empty(),
        "refreshed without the lease: {:?}",
        rig.tokens.refreshes()
    );

    redis.restart();
    wait_shared_state(&gws, "up", Duration::from_millis(2500));
    wait_until("the OAuth account serves again", SHARED, || {
        let resp = post_body(&gws[0], &new_conversation());
        assert_eq!(resp.status, 200, "{}", resp.text());
        resp.text() == served_by("oauth")
    });
    for i in 0..6 {
        let resp = post_body(&gws[i % 2], &new_conversation());
        assert_eq!(resp.status, 200, "request {i} after: {}", resp.text());
    }
    let oauth_requests: Vec<_> = rig
        .up
        .requests()
        .iter()
        .filter(|r| r.api_key().is_empty())
        .map(|r| bearer(r).unwrap_or_default().to_string())
        .collect();
    assert!(
        oauth_requests.iter().all(|b| *b == access_token(2)),
        "the OAuth requests carried {oauth_requests:?}"
    );
    assert_eq!(
        rig.tokens.refreshes().len(),
        1,
        "one refresh for both instances once Redis is back"
    );
}

#[test]
fn ready_has_no_shared_state_with_the_local_backend() {
    // `shared_state` is a fact of the redis backend only: absent by default and with `local`.
    let up = FakeUpstream::json(200, "{}");
    for section in ["", "state:\n  backend: local\n"] {
        let gw = Gateway::started(&Config::new(up.base_url()).section(section));
        let (status, view) = ready(gw.addr());
        assert_eq!(status, 200, "{section:?}: {view}");
        assert!(
            view.get("shared_state").is_none(),
            "{section:?}: /ready says {view}"
        );
    }
}

#[test]
fn a_password_from_the_environment_opens_a_protected_redis() {
    // The password named by `redis_password_env` opens Redis and never shows in a log; with a
    // wrong one the instance says shared state is down and serves on local state.
    const PASSWORD: &str = "redis-pw-Vq3nT8xL";
    const WRONG: &str = "not-the-password-Hk2w";
    const ENV: &str = "LGW_TEST_REDIS_PASSWORD";
    let redis = RedisServer::with_password(PASSWORD);
    let up = limiting_upstream(&Arc::default());
    let mut gw = Gateway::new(&Config::new(up.base_url()).section(&format!(
        "{}  redis_password_env: {ENV}\n",
        state_section(&redis)
    )));
    gw.env(ENV, PASSWORD);
    gw.add_api_key("x", KEY_A);
    gw.add_client_key("tests");
    let mut wrong = gw.sibling();
    wrong.env(ENV, WRONG);
    let gws = start_instances(gw, 2);
    assert_sharing(&gws, &redis);

    assert_serves_unshared(&mut wrong, "wrong password");
    let log = wrong.stderr();
    assert!(
        warned_about_redis(&log),
        "no warning about Redis with a wrong password:\n{log}"
    );
    for (what, log) in [
        ("instance 0", gws[0].stderr()),
        ("instance 1", gws[1].stderr()),
        ("the wrong one", log),
    ] {
        for secret in [PASSWORD, WRONG] {
            assert!(!log.contains(secret), "{what} logged a password:\n{log}");
        }
    }
}

#[test]
fn rediss_with_the_configured_ca_is_shared_state_and_an_unknown_ca_is_not() {
    // Over rediss:// the CA in `redis_ca_file` is trusted and the instances share state; an
    // instance without it does not trust the server, says shared state is down, and serves.
    let redis = RedisServer::with_tls();
    let up = limiting_upstream(&Arc::default());
    let state = |ca: &str| {
        format!(
            "state:\n  backend: redis\n  redis_url: {}\n  prefix: {PREFIX}\n{ca}",
            redis.tls_url()
        )
    };
    let ca = format!("  redis_ca_file: {}\n", tls_dir().join("ca.pem").display());
    let mut gw = Gateway::new(&Config::new(up.base_url()).section(&state(&ca)));
    gw.add_api_key("x", KEY_A);
    gw.add_client_key("tests");
    let mut untrusting = gw.sibling();
    let yaml = untrusting.config_text().replace(&ca, "");
    std::fs::write(untrusting.config_path(), yaml).expect("write config.yaml");
    let gws = start_instances(gw, 2);
    assert_sharing(&gws, &redis);

    assert_serves_unshared(&mut untrusting, "unknown CA");
}

/// Starts `gw`, which cannot use Redis, and checks that it says shared state is down and
/// serves all the same.
fn assert_serves_unshared(gw: &mut Gateway, what: &str) {
    gw.start();
    wait_shared_state(std::slice::from_ref(gw), "down", SHARED);
    let resp = post_body(gw, &new_conversation());
    assert_eq!(resp.status, 200, "{what}: {}", resp.text());
}

/// The instances say Redis is up, serve, and write their state under the prefix.
fn assert_sharing(gws: &[Gateway], redis: &RedisServer) {
    wait_shared_state(gws, "up", SHARED);
    for (i, gw) in gws.iter().enumerate() {
        let resp = post_body(gw, &new_conversation());
        assert_eq!(resp.status, 200, "instance {i}: {}", resp.text());
    }
    wait_until("the instances write under the prefix", SHARED, || {
        !redis.keys(&format!("{PREFIX}:*")).is_empty()
    });
}
