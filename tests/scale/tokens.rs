//! OAuth tokens shared through Redis: one refresh serves every instance, and an instance killed
//! at any point of a refresh neither loses the token nor leaves the others refreshing in a loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{
    OK_BODY, PREFIX, SHARED, account_state, admin_status, answering_upstream, dump, promptly,
    rotating, shared_rig, start_instances, try_post,
};
use crate::oauth::rig::bearer;
use crate::support::redis::RedisServer;
use crate::support::{
    Conn, FakeUpstream, MESSAGE_BODY, Release, Reply, Script, access_token, assert_error,
    in_parallel, message_request, now_unix, refresh_token, wait_until,
};

#[test]
fn one_refresh_for_thirty_requests_over_three_instances() {
    // Three instances, an expired token, 30 requests at once: one refresh for all of them, and
    // no request goes upstream with the dead token.
    let redis = RedisServer::start();
    let script = Script {
        // Long enough that the requests arrive while the refresh is under way.
        refresh_delay: Duration::from_millis(800),
        ..rotating(0)
    };
    let rig = shared_rig(&redis, script, answering_upstream(), |c| c);
    let id = rig.login("shared");
    let key = rig.gw.client_key().to_string();
    let gws = start_instances(rig.gw.sibling(), 3);
    let addrs: Vec<_> = gws.iter().map(|g| g.addr()).collect();

    let responses = in_parallel(30, |i| super::try_post(addrs[i % 3], &key, MESSAGE_BODY));
    for (i, resp) in responses.iter().enumerate() {
        let resp = resp
            .as_ref()
            .unwrap_or_else(|| panic!("request {i}: no answer"));
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
    }
    let refreshes = rig.tokens.refreshes();
    assert_eq!(
        refreshes.len(),
        1,
        "three instances, 30 requests: exactly one refresh; calls: {refreshes:?}"
    );
    let reqs = rig.up.requests();
    assert_eq!(reqs.len(), 30, "one upstream request per client request");
    for (i, req) in reqs.iter().enumerate() {
        assert_eq!(
            bearer(req),
            Some(access_token(2).as_str()),
            "upstream request {i} did not carry the refreshed token"
        );
    }

    // The token is in Redis under the prefix, sealed: no token in clear there.
    let stored = dump(&redis);
    assert!(
        redis.keys(&format!("{PREFIX}:tok:{id}")).len() == 1,
        "no {PREFIX}:tok:{id} in Redis:\n{stored}"
    );
    for secret in rig.tokens.issued() {
        assert!(
            !stored.contains(&secret),
            "Redis holds a token in clear ({secret}):\n{stored}"
        );
    }
    // And the instances stay on it: more requests, no more refreshes.
    for (i, addr) in addrs.iter().enumerate() {
        let resp = rig.post(*addr, MESSAGE_BODY);
        assert_eq!(resp.status, 200, "instance {i} afterwards: {}", resp.text());
    }
    assert_eq!(rig.tokens.refreshes().len(), 1, "no refresh afterwards");
}

/// A server's log without its access lines (JSON objects), for failure messages.
fn log_lines(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|l| !l.starts_with('{'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Posts to `addrs` in turn, `pace` apart, until one answers 200. Past `limit`, gives the
/// answers it got instead (each once in a row), for the failure message.
fn serve_within(
    addrs: &[SocketAddr],
    key: &str,
    limit: Duration,
    pace: Duration,
) -> Result<(), Vec<String>> {
    let deadline = Instant::now() + limit;
    let mut seen: Vec<String> = Vec::new();
    let mut sent = 0;
    loop {
        let resp = try_post(addrs[sent % addrs.len()], key, MESSAGE_BODY);
        if resp.as_ref().is_some_and(|r| r.status == 200) {
            return Ok(());
        }
        let answer = resp.map_or("no answer".into(), |r| format!("{} {}", r.status, r.text()));
        if seen.last() != Some(&answer) {
            seen.push(answer);
        }
        if Instant::now() >= deadline {
            return Err(seen);
        }
        std::thread::sleep(pace);
        sent += 1;
    }
}

/// Where the refreshing instance is killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kill {
    /// Its call never got through: the endpoint never processes it.
    BeforeCall,
    /// The endpoint holds the call, then rotates the refresh token for a caller that is gone.
    WhileHeld,
    /// After the new tokens are in Redis.
    AfterStored,
}

#[test]
fn killing_an_instance_mid_refresh_loses_no_token_or_reports_needs_login() {
    // A kill -9 at any point of a refresh: the others serve on with no token lost, or, when the
    // dead instance took the only live refresh token with it, report needs_login and stop
    // calling the token endpoint.
    let only = std::env::var("SCALE_KILL").unwrap_or_default();
    for kill in [Kill::BeforeCall, Kill::AfterStored, Kill::WhileHeld] {
        if !only.is_empty() && format!("{kill:?}") != only {
            continue;
        }
        kill_mid_refresh(kill);
    }
}

fn kill_mid_refresh(kill: Kill) {
    let redis = RedisServer::start();
    // Expired at login: the first instance refreshes as soon as it starts. It runs alone until
    // it is killed, so the refreshing instance is known; the others start after.
    let rig = shared_rig(&redis, rotating(0), answering_upstream(), |c| {
        c.oauth("token_timeout", "1s")
    });
    let id = rig.login("fragile");
    let logged_in_at = now_unix();
    let admin = rig.gw.add_admin_key("ops");
    let key = rig.gw.client_key().to_string();
    let mut gws: Vec<_> = (0..3).map(|_| rig.gw.sibling()).collect();
    let tok_key = format!("{PREFIX}:tok:{id}");
    let issued_at = || -> u64 {
        redis
            .command(&["HGET", &tok_key, "issued_at"])
            .parse()
            .unwrap_or(0)
    };
    // So a refresh's issued_at is a later second than the login's.
    wait_until("a second passes after the login", SHARED, || {
        now_unix() > logged_in_at
    });

    let hold = rig.tokens.hold_next_refresh();
    gws[0].start();
    promptly(
        &format!("{kill:?}: instance 0 calls the token endpoint"),
        Duration::from_secs(5),
        || !rig.tokens.refreshes().is_empty(),
    );
    match kill {
        Kill::BeforeCall => {
            gws[0].stop();
            hold.release(Release::Drop);
        }
        Kill::WhileHeld => {
            gws[0].stop();
            hold.release(Release::Process);
            promptly("the held refresh is answered", SHARED, || {
                rig.tokens.granted_refreshes() == 1
            });
        }
        Kill::AfterStored => {
            hold.release(Release::Process);
            wait_until(
                &format!("{tok_key} issued_at moves past the login ({logged_in_at})"),
                SHARED,
                || issued_at() > logged_in_at,
            );
            gws[0].stop();
        }
    }
    gws[1].start();
    gws[2].start();
    let survivors = [gws[1].addr(), gws[2].addr()];

    if kill == Kill::WhileHeld {
        // Redis still has rt-1, which the endpoint rotated out: the survivors' refresh gets
        // invalid_grant, and the account needs a login, for every instance.
        let mut sent = 0;
        wait_until(
            "WhileHeld: a survivor reports needs_login",
            Duration::from_secs(20),
            || {
                let _ = try_post(survivors[sent % 2], &key, MESSAGE_BODY);
                sent += 1;
                account_state(&admin_status(survivors[0], &admin), &id) == "needs_login"
            },
        );
        wait_until("WhileHeld: the other survivor agrees", SHARED, || {
            account_state(&admin_status(survivors[1], &admin), &id) == "needs_login"
        });
        let calls = rig.tokens.refreshes();
        assert_eq!(
            calls.len(),
            2,
            "the held call and one refresh by a survivor: {calls:?}\n{}",
            dump(&redis)
        );
        assert_eq!(calls[1]["refresh_token"], refresh_token(1).as_str());
        let answers: Vec<u16> = rig
            .tokens
            .answers()
            .iter()
            .filter(|a| a.grant_type == "refresh_token")
            .map(|a| a.status)
            .collect();
        assert_eq!(answers, [200, 400], "rotated for the dead, refused after");
        // No loop: further requests are refused without a token call, and the refreshers
        // leave the account alone.
        for i in 0..6 {
            let resp = rig.post(survivors[i % 2], MESSAGE_BODY);
            assert_error(&resp, 503, None);
        }
        let quiet_until = Instant::now() + Duration::from_secs(3);
        wait_until("WhileHeld: three quiet seconds", SHARED, || {
            assert_eq!(
                rig.tokens.refreshes().len(),
                2,
                "the token endpoint is called again after invalid_grant"
            );
            Instant::now() >= quiet_until
        });
        assert!(
            !rig.up
                .requests()
                .iter()
                .any(|r| bearer(r) == Some(access_token(2).as_str())),
            "the dead instance's token was used, yet it was never stored"
        );

        // A new login on one survivor's config is newer than what Redis holds: it replaces
        // it, and the other survivor, never logged in again, serves with it.
        rig.tokens.script(|s| s.exchange_expires_in = 3600);
        gws[1].oauth_login(&id, "code-again-Zr8q");
        wait_until(
            "WhileHeld: the other survivor serves after the new login",
            SHARED,
            || rig.post(survivors[1], MESSAGE_BODY).status == 200,
        );
        let last = rig.up.requests();
        assert_eq!(
            bearer(last.last().expect("upstream requests")),
            Some(access_token(3).as_str()),
            "the new login's token"
        );
        assert_eq!(
            rig.tokens.refreshes().len(),
            2,
            "no refresh after the login"
        );
        return;
    }

    // The survivors serve: after a fresh refresh (BeforeCall, once the dead holder's lease is
    // over) or on the token the dead instance stored (AfterStored).
    let served_from = rig.up.requests().len();
    let pace = Duration::from_millis(50);
    if let Err(seen) = serve_within(&survivors, &key, Duration::from_secs(20), pace) {
        panic!(
            "{kill:?}: no survivor serves within 20 s; they answered:\n{}\n\
             refresh calls: {:?}\nredis:\n{}\nsurvivor logs:\n{}\n---\n{}",
            seen.join("\n"),
            rig.tokens.refreshes(),
            dump(&redis),
            log_lines(&gws[1].stderr()),
            log_lines(&gws[2].stderr())
        );
    }
    for (i, addr) in survivors.iter().enumerate() {
        let resp = rig.post(*addr, MESSAGE_BODY);
        assert_eq!(resp.status, 200, "{kill:?}: survivor {i}: {}", resp.text());
    }
    let reqs = rig.up.requests();
    let last = reqs.last().expect("upstream requests");
    assert_eq!(
        bearer(last),
        Some(access_token(2).as_str()),
        "{kill:?}: the survivors use the one new token"
    );
    assert!(
        reqs[served_from..]
            .iter()
            .all(|r| bearer(r) != Some(access_token(3).as_str())),
        "{kill:?}: a second token was minted"
    );
    let calls = rig.tokens.refreshes();
    let expected_calls = if kill == Kill::BeforeCall { 2 } else { 1 };
    assert_eq!(
        calls.len(),
        expected_calls,
        "{kill:?}: refresh calls {calls:?}\n{}",
        dump(&redis)
    );
    assert_eq!(rig.tokens.granted_refreshes(), 1, "{kill:?}: one grant");
    for addr in &survivors {
        let state = account_state(&admin_status(*addr, &admin), &id);
        assert!(
            state != "needs_login" && state != "not_logged_in",
            "{kill:?}: the account stays usable, yet status says {state}"
        );
    }
}

#[test]
fn a_401_while_a_dead_instance_holds_the_lease_does_not_bench_the_account() {
    // An instance killed holding the refresh lease before it called the endpoint leaves a
    // valid refresh token: once its lease is over, a 401 elsewhere leads to a refresh, not to
    // the account benched for every instance.
    let redis = RedisServer::start();
    let revoked = Arc::new(AtomicBool::new(false));
    let refuse = Arc::clone(&revoked);
    let up = FakeUpstream::start(move |req| {
        if refuse.load(Ordering::SeqCst) && bearer(req) == Some(access_token(1).as_str()) {
            Reply::json(
                401,
                r#"{"type":"error","error":{"type":"authentication_error","message":"OAuth token has expired."}}"#,
            )
        } else {
            Reply::json(200, OK_BODY)
        }
    });
    let script = Script {
        rotate: true,
        ..Script::default()
    };
    let rig = shared_rig(&redis, script, up, |c| c.oauth("token_timeout", "1s"));
    rig.login("revoked");
    let key = rig.gw.client_key().to_string();
    let mut gws = start_instances(rig.gw.sibling(), 2);
    for gw in &gws {
        let resp = rig.post(gw.addr(), MESSAGE_BODY);
        assert_eq!(resp.status, 200, "warm-up: {}", resp.text());
    }

    // Instance 0 gets a 401 and takes the lease; it dies before its call is processed.
    let hold = rig.tokens.hold_next_refresh();
    revoked.store(true, Ordering::SeqCst);
    let mut doomed = Conn::open(gws[0].addr());
    doomed.send(&message_request(&[
        ("x-api-key", &key),
        ("content-type", "application/json"),
    ]));
    promptly(
        "instance 0 calls the token endpoint",
        Duration::from_secs(5),
        || !rig.tokens.refreshes().is_empty(),
    );
    gws[0].stop();
    hold.release(Release::Drop);
    drop(doomed);

    // The lease lasts 2 × 1 s + 2 s; the survivor may refuse requests meanwhile, not after.
    let pace = Duration::from_millis(100);
    if let Err(seen) = serve_within(&[gws[1].addr()], &key, Duration::from_secs(15), pace) {
        panic!(
            "the survivor does not serve within 15 s of the kill; it answered:\n{}\n\
             refresh calls: {:?}\nredis:\n{}\nits log:\n{}",
            seen.join("\n"),
            rig.tokens.refreshes(),
            dump(&redis),
            log_lines(&gws[1].stderr())
        );
    }
    let last = rig.up.requests();
    assert_eq!(
        bearer(last.last().expect("upstream requests")),
        Some(access_token(2).as_str())
    );
    assert_eq!(
        rig.tokens.granted_refreshes(),
        1,
        "one refresh by the survivor"
    );
}

#[test]
fn a_token_refreshed_ahead_of_expiry_by_one_instance_is_adopted_by_all() {
    // The refreshers of three instances come due together: one refreshes, and every instance
    // then sends the new token, with no second refresh (which, rotated, would be refused).
    let redis = RedisServer::start();
    // Lead 10m, capped at half of 6 s: due 3 s after the login.
    let rig = shared_rig(&redis, rotating(6), answering_upstream(), |c| {
        c.oauth("refresh_lead", "10m")
    });
    rig.login("due");
    // No request before the refresh: a token under a minute from expiry is refreshed when
    // picked, and this is about the refreshers.
    let gws = start_instances(rig.gw.sibling(), 3);
    wait_until("a refresher refreshes", Duration::from_secs(8), || {
        rig.tokens.granted_refreshes() == 1
    });
    let from = rig.up.requests().len();
    wait_until("every instance sends the new token", SHARED, || {
        gws.iter().all(|gw| {
            let resp = rig.post(gw.addr(), MESSAGE_BODY);
            assert_eq!(resp.status, 200, "{}", resp.text());
            let reqs = rig.up.requests();
            bearer(reqs.last().expect("upstream request")) == Some(access_token(2).as_str())
        })
    });
    // Two refresher ticks more: still one refresh.
    let quiet_until = Instant::now() + Duration::from_secs(2);
    wait_until("two quiet seconds", SHARED, || {
        Instant::now() >= quiet_until
    });
    let calls = rig.tokens.refreshes();
    assert_eq!(calls.len(), 1, "refresh calls: {calls:?}");
    // The old token is still valid, so an instance may send it once or twice before it looks
    // at Redis again; not more.
    let old = rig.up.requests()[from..]
        .iter()
        .filter(|r| bearer(r) != Some(access_token(2).as_str()))
        .count();
    assert!(
        old <= 2,
        "{old} requests after the refresh still carried the old token"
    );
}

#[test]
fn an_oauth_ban_seen_by_one_instance_takes_the_account_out_everywhere() {
    // The upstream's ban of an OAuth account, met by one instance, takes the account out of
    // service on every instance: no other instance sends it anything.
    let redis = RedisServer::start();
    let ban = r#"{"type":"error","error":{"type":"permission_error","message":"OAuth authentication is currently not allowed for this organization."}}"#;
    let up = FakeUpstream::start(move |req| {
        if bearer(req).is_some() {
            Reply::json(403, ban)
        } else {
            Reply::json(200, OK_BODY)
        }
    });
    let rig = shared_rig(&redis, Script::default(), up, |c| {
        c.section("balance:\n  strategy: round_robin\nsticky:\n  enabled: false\n")
    });
    let id = rig.login("banned");
    rig.gw.add_api_key("steady", crate::support::ACCOUNT_KEY);
    let admin = rig.gw.add_admin_key("ops");
    let gws = start_instances(rig.gw.sibling(), 3);
    for i in 0..4 {
        let resp = rig.post(gws[0].addr(), &crate::support::accounts::new_conversation());
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
        if rig.oauth_requests() > 0 {
            break;
        }
    }
    assert_eq!(
        rig.oauth_requests(),
        1,
        "instance A tried the OAuth account once"
    );
    for round in 0..6 {
        for gw in &gws[1..] {
            let body = crate::support::accounts::new_conversation();
            let resp = rig.post(gw.addr(), &body);
            assert_eq!(resp.status, 200, "round {round}: {}", resp.text());
        }
    }
    assert_eq!(
        rig.oauth_requests(),
        1,
        "another instance sent the banned account a request"
    );
    for (i, gw) in gws.iter().enumerate() {
        let state = account_state(&admin_status(gw.addr(), &admin), &id);
        assert_eq!(state, "disabled", "instance {i}: the banned account");
    }
}

#[test]
fn a_stalled_holder_does_not_release_the_lease_another_instance_took_after_it() {
    // An instance frozen mid-refresh until its lease ran out, then thawed, leaves the lease the
    // next instance took alone: that refresh completes, and everyone uses its token.
    let redis = RedisServer::start();
    let rig = shared_rig(&redis, rotating(0), answering_upstream(), |c| {
        c.oauth("token_timeout", "1s")
    });
    let id = rig.login("contended");
    let mut gws: Vec<_> = (0..3).map(|_| rig.gw.sibling()).collect();
    let lease_key = format!("{PREFIX}:lease:{id}");

    // A refreshes and is frozen (SIGSTOP) while the endpoint holds its call, which is then
    // dropped unprocessed.
    let first = rig.tokens.hold_next_refresh();
    gws[0].start();
    promptly("A calls the token endpoint", Duration::from_secs(5), || {
        rig.tokens.refreshes().len() == 1
    });
    gws[0].signal("STOP");
    let a_fence = redis.command(&["GET", &lease_key]);
    assert_ne!(a_fence, "(nil)", "A holds no lease: {}", dump(&redis));
    first.release(Release::Drop);
    wait_until("A's lease runs out", Duration::from_secs(8), || {
        redis.command(&["EXISTS", &lease_key]) == "0"
    });

    // B takes the lease and calls; the endpoint holds it while A thaws and gives up.
    let second = rig.tokens.hold_next_refresh();
    gws[1].start();
    promptly("B calls the token endpoint", Duration::from_secs(5), || {
        rig.tokens.refreshes().len() == 2
    });
    let b_fence = redis.command(&["GET", &lease_key]);
    assert!(
        b_fence != "(nil)" && b_fence != a_fence,
        "B's lease: {b_fence} (A's was {a_fence})"
    );
    gws[0].signal("CONT");
    let failed = format!("refreshing account {id} failed");
    wait_until("A notices its refresh failed", SHARED, || {
        gws[0].stderr().contains(&failed)
    });
    assert_eq!(
        redis.command(&["GET", &lease_key]),
        b_fence,
        "A released (or replaced) B's lease"
    );
    second.release(Release::Process);

    gws[2].start();
    wait_until("every instance serves with B's token", SHARED, || {
        gws.iter().all(|gw| {
            let resp = rig.post(gw.addr(), MESSAGE_BODY);
            let reqs = rig.up.requests();
            resp.status == 200
                && bearer(reqs.last().expect("upstream request")) == Some(access_token(2).as_str())
        })
    });
    assert_eq!(rig.tokens.granted_refreshes(), 1, "B's refresh only");
    assert_eq!(rig.tokens.refreshes().len(), 2, "A's dropped call and B's");
}
