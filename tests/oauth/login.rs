//! The login flow through the CLI: `add-oauth`, `oauth-start` (the authorize URL and its PKCE
//! values) and `oauth-callback` in its three input forms, and the ways a login must fail.

use serde_json::Value;

use super::rig::{self, Rig};
use super::{
    DEFAULT_REDIRECT, DEFAULT_SCOPES, answering_upstream, assert_base64url, sha256_base64url,
    sorted,
};
use crate::support::{
    ACCOUNT_EMAIL, ACCOUNT_KEY, GRANTED_SCOPE, ORG_NAME, Script, TOKEN_PATH, assert_exit, now_unix,
    sorted_keys,
};

#[test]
fn authorize_url_carries_pkce_that_the_exchange_completes() {
    let mut rig = Rig::new(Script::default(), answering_upstream(), |c| c);
    let id = rig.add_oauth("pkce", None);
    let before = now_unix();
    let login = rig.start_login(&id);
    let after = now_unix();

    let (base, query) = login
        .url
        .split_once('?')
        .unwrap_or_else(|| panic!("no query in {}", login.url));
    assert_eq!(base, rig.tokens.authorize_url(), "configured authorize_url");
    let names: Vec<&str> = login.params.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "code",
            "client_id",
            "response_type",
            "redirect_uri",
            "scope",
            "code_challenge",
            "code_challenge_method",
            "state"
        ],
        "query parameters, in the documented order: {query}"
    );
    for (name, raw, _) in &login.params {
        assert!(
            raw.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)),
            "{name} is not percent-encoded: {raw:?}"
        );
    }
    assert_eq!(login.param("code"), "true");
    assert_eq!(login.param("client_id"), rig::CLIENT_ID);
    assert_eq!(login.param("response_type"), "code");
    assert_eq!(login.param("redirect_uri"), DEFAULT_REDIRECT);
    assert_eq!(login.param("scope"), DEFAULT_SCOPES);
    assert!(
        login.raw("scope").contains("%20"),
        "scope spaces encoded as %20: {}",
        login.raw("scope")
    );
    assert_eq!(login.param("code_challenge_method"), "S256");
    assert_base64url("code_challenge", &login.challenge, 43);
    assert_base64url("state", &login.state, 43);
    assert!(
        (before + 600..=after + 600).contains(&login.expires_at),
        "oauth-start expires_at {} is not now + 600",
        login.expires_at
    );

    let config = rig.gw.config_text();
    for field in ["login_state: enc:v1:", "login_verifier: enc:v1:"] {
        assert!(
            config.contains(field),
            "config.yaml lacks {field}\n{config}"
        );
    }
    assert_eq!(
        rig::yaml_ints(&config, "login_expires_at"),
        [login.expires_at],
        "login_expires_at in config.yaml"
    );
    assert!(
        !config.contains(&login.state),
        "config.yaml holds the state in clear"
    );
    assert_eq!(rig.account(&id)["state"], "not_logged_in");

    let code = rig.next_code();
    let out = rig.callback(&id, &format!("{code}#{}", login.state));
    assert_exit(&out, 0, "oauth-callback");
    let exchanges = rig.tokens.exchanges();
    assert_eq!(exchanges.len(), 1, "one code exchange");
    let verifier = exchanges[0]["code_verifier"]
        .as_str()
        .unwrap_or_else(|| panic!("no code_verifier in {}", exchanges[0]));
    assert_base64url("code_verifier", verifier, 43);
    assert_eq!(
        sha256_base64url(verifier),
        login.challenge,
        "code_challenge is not base64url(SHA-256(code_verifier))"
    );
    assert_eq!(
        exchanges[0]["state"],
        login.state.as_str(),
        "exchange state"
    );
    assert_eq!(exchanges[0]["code"], code.as_str(), "exchange code");

    let config = rig.gw.config_text();
    for field in ["access_token: enc:v1:", "refresh_token: enc:v1:"] {
        assert!(
            config.contains(field),
            "config.yaml lacks {field}\n{config}"
        );
    }
    for (what, value) in [("verifier", verifier), ("state", &login.state)] {
        assert!(
            !config.contains(value),
            "config.yaml holds the {what} in clear"
        );
    }
    rig.assert_no_leaks(&[]);
}

#[test]
fn callback_accepts_code_and_state_a_bare_code_and_the_callback_url() {
    const REDIRECT: &str = "https://gateway.example.test/oauth/code/callback";
    const SCOPES: &str = "user:profile user:inference";
    let mut rig = Rig::new(Script::default(), answering_upstream(), |c| {
        c.oauth("redirect_uri", REDIRECT)
            .oauth("scopes", format!("\"{SCOPES}\""))
    });
    let from_file = "cs-FromFileSecret-5kQ2";
    let from_flag = "cs-FromFlagSecret-8mW4";
    let secret_file = rig.gw.dir().join("client.secret");
    std::fs::write(&secret_file, format!("{from_file}\n")).expect("write secret file");
    let secret_file = secret_file.to_str().expect("utf-8 path").to_string();

    let cases = [
        ("code#state", Some(("file", from_file))),
        ("bare code", None),
        ("callback url", Some(("flag", from_flag))),
    ];
    for (form, secret) in cases {
        let id = match secret {
            Some(("file", s)) => {
                rig.add_oauth(form, Some(("--client-secret-file", &secret_file, s)))
            }
            Some((_, s)) => rig.add_oauth(form, Some(("--client-secret", s, s))),
            None => rig.add_oauth(form, None),
        };
        let login = rig.start_login(&id);
        assert_eq!(login.param("redirect_uri"), REDIRECT, "{form}");
        assert_eq!(login.param("scope"), SCOPES, "{form}");
        let code = rig.next_code();
        let pasted = match form {
            "code#state" => format!("{code}#{}", login.state),
            "bare code" => code.clone(),
            _ => format!("{REDIRECT}?code={code}&state={}", login.state),
        };
        let before = now_unix();
        let out = rig.callback(&id, &pasted);
        let after = now_unix();
        assert_exit(&out, 0, form);
        let v = rig::stdout_json(&out, form);
        assert_eq!(v["id"], id.as_str(), "{form}: {v}");
        assert_eq!(v["name"], form, "{form}: {v}");
        assert_eq!(v["state"], "enabled", "{form}: {v}");
        assert_eq!(v["email"], ACCOUNT_EMAIL, "{form}: {v}");
        assert_eq!(v["organization"], ORG_NAME, "{form}: {v}");
        assert_eq!(v["scopes"], GRANTED_SCOPE, "{form}: {v}");
        let expires_at = v["expires_at"].as_u64().expect("expires_at");
        assert!(
            (before + 3600..=after + 3600).contains(&expires_at),
            "{form}: expires_at {expires_at} is not now + expires_in"
        );

        let request = rig.tokens.requests().last().cloned().expect("a token call");
        assert_eq!(request.method, "POST", "{form}");
        assert_eq!(request.target, TOKEN_PATH, "{form}");
        assert!(
            request
                .header("content-type")
                .is_some_and(|v| v.starts_with("application/json")),
            "{form}: token call content-type {:?}",
            request.header("content-type")
        );
        let exchange = rig.tokens.exchanges().last().cloned().expect("exchange");
        let mut expected = vec![
            "grant_type",
            "client_id",
            "code",
            "redirect_uri",
            "code_verifier",
            "state",
        ];
        if secret.is_some() {
            expected.push("client_secret");
        }
        assert_eq!(
            sorted_keys(&exchange),
            sorted(&expected),
            "{form}: {exchange}"
        );
        assert_eq!(exchange["grant_type"], "authorization_code");
        assert_eq!(exchange["client_id"], rig::CLIENT_ID);
        assert_eq!(exchange["code"], code.as_str(), "{form}");
        assert_eq!(exchange["redirect_uri"], REDIRECT, "{form}");
        assert_eq!(exchange["state"], login.state.as_str(), "{form}");
        let verifier = exchange["code_verifier"].as_str().expect("verifier");
        assert_eq!(sha256_base64url(verifier), login.challenge, "{form}");
        if let Some((_, s)) = secret {
            assert_eq!(exchange["client_secret"], s, "{form}");
        }

        let row = rig.account(&id);
        assert_eq!(
            sorted_keys(&row),
            sorted(&[
                "id",
                "name",
                "kind",
                "enabled",
                "priority",
                "weight",
                "quota",
                "max_concurrent",
                "proxy",
                "ca_file",
                "state",
                "key",
                "disabled_reason",
                "expires_at",
                "email",
                "organization",
                "scopes",
                "created_at"
            ]),
            "list-accounts row: {row}"
        );
        assert_eq!(row["kind"], "oauth", "{row}");
        assert_eq!(row["enabled"], true, "{row}");
        assert_eq!(row["state"], "enabled", "{row}");
        assert_eq!(row["disabled_reason"], Value::Null, "{row}");
        assert_eq!(row["expires_at"], expires_at, "{row}");
        assert_eq!(row["email"], ACCOUNT_EMAIL, "{row}");
        assert_eq!(row["organization"], ORG_NAME, "{row}");
        assert_eq!(row["scopes"], GRANTED_SCOPE, "{row}");
    }
    assert_eq!(rig.tokens.exchanges().len(), 3);
    rig.assert_no_leaks(&[]);
}

#[test]
fn failed_logins_exit_7_and_store_nothing() {
    const REFUSAL: &str = "Authorization code expired or already used (fake endpoint 7731)";
    let mut rig = Rig::new(Script::default(), answering_upstream(), |c| c);
    let id = rig.add_oauth("strict", None);
    let fails = |pasted: &str, what: &str| {
        let out = rig.callback(&id, pasted);
        assert_exit(&out, 7, what);
        out
    };
    let made_up_state = "S".repeat(43);

    let code = rig.next_code();
    fails(&format!("{code}#{made_up_state}"), "no pending login");
    fails(&code, "no pending login, bare code");

    let first = rig.start_login(&id);
    let second = rig.start_login(&id);
    assert_ne!(
        first.state, second.state,
        "each oauth-start has its own state"
    );
    assert_ne!(first.challenge, second.challenge, "and its own verifier");
    let code = rig.next_code();
    fails(
        &format!("{code}#{}", first.state),
        "the first URL's state after a second oauth-start",
    );
    fails(&format!("{code}#{made_up_state}"), "state mismatch");
    fails(
        &format!("{DEFAULT_REDIRECT}?code={code}&state={made_up_state}"),
        "state mismatch in a callback URL",
    );
    assert!(
        rig.tokens.requests().is_empty(),
        "a state mismatch must not reach the token endpoint"
    );

    rig.expire_pending_login();
    fails(&format!("{code}#{}", second.state), "expired pending login");
    fails(&code, "expired pending login, bare code");
    assert!(
        rig.tokens.requests().is_empty(),
        "an expired login must not reach the token endpoint"
    );

    let third = rig.start_login(&id);
    rig.tokens
        .script(|s| s.exchange_error = Some(REFUSAL.to_string()));
    let code = rig.next_code();
    let out = fails(
        &format!("{code}#{}", third.state),
        "endpoint refuses the code",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(REFUSAL),
        "stderr should say what the token endpoint said: {err}"
    );
    assert_eq!(rig.tokens.exchanges().len(), 1);
    assert_eq!(rig.account(&id)["state"], "not_logged_in");
    assert!(
        !rig.gw.config_text().contains("access_token:"),
        "a failed login stores no token"
    );

    // After all that, a fresh login still goes through.
    rig.tokens.script(|s| s.exchange_error = None);
    let fourth = rig.start_login(&id);
    let code = rig.next_code();
    assert_exit(
        &rig.callback(&id, &format!("{code}#{}", fourth.state)),
        0,
        "a login after the failures",
    );
    let exchanges = rig.tokens.exchanges();
    assert_eq!(exchanges.len(), 2);
    assert_eq!(exchanges[1]["state"], fourth.state.as_str());
    assert_eq!(rig.account(&id)["state"], "enabled");
    rig.assert_no_leaks(&[]);
}

#[test]
fn callback_usage_errors_have_their_own_exit_codes() {
    let mut rig = Rig::new(Script::default(), answering_upstream(), |c| c);
    let id = rig.add_oauth("target", None);
    let api = rig.gw.add_api_key("plain", ACCOUNT_KEY);
    let login = rig.start_login(&id);
    let code = rig.next_code();
    let pasted = format!("{code}#{}", login.state);

    assert_exit(
        &rig.callback("acc_doesnotexist", &pasted),
        6,
        "oauth-callback, unknown id",
    );
    assert_exit(
        &rig.cli(&["oauth-start", "--account-id", "acc_doesnotexist"]),
        6,
        "oauth-start, unknown id",
    );
    assert_exit(
        &rig.callback(&api, &pasted),
        2,
        "oauth-callback for an api_key account",
    );
    for empty in ["", "   "] {
        assert_exit(
            &rig.callback(&id, empty),
            2,
            &format!("oauth-callback --code {empty:?}"),
        );
    }
    assert!(rig.tokens.requests().is_empty(), "no token call");
    assert_exit(
        &rig.callback(&id, &pasted),
        0,
        "the pending login is intact",
    );
    rig.assert_no_leaks(&[]);
}
