//! Commands for OAuth accounts: add one, start a login (prints the authorize URL), and finish
//! it with what the callback page showed. The login holds the account's lock, so it never
//! races a refresh of the same account by a running server.

use std::path::Path;

use argh::FromArgs;
use serde_json::json;

use super::{CliError, Exit, check_name, new_id, print_json, read_secret};
use crate::config::{self, AccountKind, Config, OAuth, RawAccount, Tokens};
use crate::oauth::{self, Client, Login, TokenEndpoint};
use crate::secret;
use crate::store::{self, ChangeError};
use crate::time;

#[derive(FromArgs)]
/// Add an OAuth account (a Claude login). Then run oauth-start and oauth-callback.
#[argh(subcommand, name = "add-oauth")]
pub struct AddOAuth {
    /// a name for people, e.g. "Claude Code Team"
    #[argh(option)]
    pub name: String,
    /// the OAuth client id to log in with (yours; none is built in)
    #[argh(option)]
    pub client_id: String,
    /// the client secret, if the client has one
    #[argh(option)]
    pub client_secret: Option<String>,
    /// read the client secret from this file
    #[argh(option)]
    pub client_secret_file: Option<String>,
    /// priority tier: lower is preferred (default 0)
    #[argh(option, default = "0")]
    pub priority: u32,
    /// share of traffic within its tier (default 1)
    #[argh(option, default = "1")]
    pub weight: u32,
    /// share of quota used (0–1] past which the account is passed over (default: balance's)
    #[argh(option)]
    pub quota_threshold: Option<f64>,
    /// how far under its threshold a passed-over account must fall to serve again
    #[argh(option)]
    pub quota_hysteresis: Option<f64>,
    /// true: over its threshold, the account never serves, even when nothing else can
    #[argh(option)]
    pub quota_hard_stop: Option<bool>,
    /// plan_only (rest when an answer comes from extra usage) or allow
    #[argh(option)]
    pub overage: Option<crate::quota::Overage>,
    /// requests sent with the account at once, at most; more wait in its queue
    #[argh(option)]
    pub max_concurrent: Option<u32>,
    /// its egress: http://user:pass@host:port, https://…, socks5h://… or direct (stored sealed)
    #[argh(option)]
    pub proxy: Option<String>,
    /// a PEM CA bundle its TLS trusts instead of the public roots (a TLS-intercepting proxy's)
    #[argh(option)]
    pub ca_file: Option<String>,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs)]
/// Start a login: prints the URL to open in a browser. It stays valid for 10 minutes; starting
/// again replaces it.
#[argh(subcommand, name = "oauth-start")]
pub struct OAuthStart {
    /// the OAuth account's id
    #[argh(option)]
    pub account_id: String,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs)]
/// Finish a login with what the callback page showed (CODE#STATE), a bare code, or the full
/// callback URL.
#[argh(subcommand, name = "oauth-callback")]
pub struct OAuthCallback {
    /// the OAuth account's id
    #[argh(option)]
    pub account_id: String,
    /// CODE#STATE, a bare code, or the callback URL
    #[argh(option)]
    pub code: String,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

fn login_error(message: impl Into<String>) -> CliError {
    CliError {
        exit: Exit::Login,
        message: message.into(),
    }
}

fn change_error(e: ChangeError<String>) -> CliError {
    match e {
        ChangeError::Config(e) => e.into(),
        ChangeError::Change(message) => CliError {
            exit: Exit::Failure,
            message,
        },
    }
}

/// The OAuth account `id` in `config`, or a not-found / wrong-kind error.
fn oauth_account<'a>(config: &'a Config, id: &str) -> Result<(&'a str, &'a OAuth), CliError> {
    let account = config
        .accounts
        .iter()
        .find(|a| a.id == id)
        .ok_or_else(|| CliError {
            exit: Exit::NotFound,
            message: format!("no account with id {id}; see `llm-gateway list-accounts`"),
        })?;
    let oauth = account.oauth().ok_or_else(|| {
        CliError::usage(format!(
            "account {id} is an {} account; logins are for oauth accounts (add-oauth)",
            account.kind.as_str()
        ))
    })?;
    Ok((&account.name, oauth))
}

pub fn add_oauth(path: &Path, cmd: AddOAuth) -> Result<(), CliError> {
    let name = check_name(&cmd.name)?;
    let weight = super::accounts::check_weight(cmd.weight)?;
    let steering = super::accounts::Steering::checked(
        cmd.quota_threshold,
        cmd.quota_hysteresis,
        cmd.quota_hard_stop,
        cmd.overage,
        cmd.max_concurrent,
    )?;
    let proxy = super::accounts::check_proxy(cmd.proxy.as_deref())?;
    let ca_file = super::accounts::check_ca_file(cmd.ca_file.as_deref())?;
    let client_id = cmd.client_id.trim().to_string();
    if client_id.is_empty() || !client_id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(CliError::usage(
            "--client-id must be non-empty and printable",
        ));
    }
    let secret = match (&cmd.client_secret, &cmd.client_secret_file) {
        (None, None) => None,
        (flag, file) => Some(read_secret(
            "client secret",
            flag.as_deref(),
            file.as_deref(),
            false,
        )?),
    };
    let id = store::update(path, |m| {
        super::accounts::unique_account_name(m, &name, None)?;
        let id = new_id("acc_", |id| {
            m.accounts.iter().any(|a| a.id.as_deref() == Some(id))
        });
        let mut account = RawAccount::new(id.clone(), name.clone(), AccountKind::Oauth);
        account.client_id = Some(client_id.clone());
        account.priority = cmd.priority;
        account.weight = weight;
        steering.apply(&mut account);
        if let Some(proxy) = &proxy {
            account.proxy = Some(m.seal(&id, "proxy", proxy)?);
        }
        account.ca_file.clone_from(&ca_file);
        if let Some(s) = &secret {
            account.client_secret = Some(m.seal(&id, "client_secret", s)?);
        }
        m.accounts.push(account);
        Ok::<_, ChangeError<CliError>>(id)
    })?;
    if cmd.json {
        print_json(&json!({"id": id, "name": name, "kind": "oauth", "state": "not_logged_in"}));
    } else {
        println!("added OAuth account {id} \"{name}\"; log it in with:");
        println!("    llm-gateway oauth-start --account-id={id}");
    }
    Ok(())
}

pub fn oauth_start(path: &Path, cmd: OAuthStart) -> Result<(), CliError> {
    let id = cmd.account_id.as_str();
    let _lock = store::account_lock(path, id)?;
    let config = config::load_existing(path)?;
    let (name, oauth) = oauth_account(&config, id)?;
    let login = Login::start();
    let url = oauth::authorize_url(&config.oauth, &oauth.client_id, &login);
    let expires_at = time::now_unix() + oauth::LOGIN_TTL_SECS;
    store::update(path, |m| {
        let state = m.seal(id, "login_state", &login.state)?;
        let verifier = m.seal(id, "login_verifier", &login.verifier)?;
        let account = m
            .accounts
            .iter_mut()
            .find(|a| a.id.as_deref() == Some(id))
            .ok_or_else(|| ChangeError::Change(format!("account {id} was removed meanwhile")))?;
        account.login_state = Some(state);
        account.login_verifier = Some(verifier);
        account.login_expires_at = Some(expires_at);
        Ok(())
    })
    .map_err(change_error)?;
    if cmd.json {
        print_json(&json!({"id": id, "authorize_url": url, "expires_at": expires_at}));
    } else {
        println!(
            "Log in account {id} \"{name}\": open this URL in a browser (valid for 10 minutes):\n"
        );
        println!("    {url}\n");
        println!("then paste what the page shows (CODE#STATE) into:\n");
        println!("    llm-gateway oauth-callback --account-id={id} --code='CODE#STATE'");
    }
    Ok(())
}

pub fn oauth_callback(path: &Path, cmd: OAuthCallback) -> Result<(), CliError> {
    let id = cmd.account_id.as_str();
    let (code, state) = oauth::parse_callback(&cmd.code).ok_or_else(|| {
        CliError::usage("--code holds no code: paste CODE#STATE, the code, or the callback URL")
    })?;
    let _lock = store::account_lock(path, id)?;
    let config = config::load_existing(path)?;
    let (name, oauth) = oauth_account(&config, id)?;
    let start_again = format!("run `llm-gateway oauth-start --account-id={id}` again");
    let pending = oauth
        .pending
        .as_ref()
        .ok_or_else(|| login_error(format!("account {id} has no pending login: {start_again}")))?;
    let now = time::now_unix();
    if now > pending.expires_at {
        return Err(login_error(format!(
            "the login started for account {id} expired at {} (logins last 10 minutes): {start_again}",
            time::rfc3339(pending.expires_at)
        )));
    }
    if let Some(state) = &state
        && !secret::constant_time_eq(state.as_bytes(), pending.state.expose().as_bytes())
    {
        return Err(login_error(format!(
            "state mismatch: this code belongs to a different login attempt than the one pending for account {id}; {start_again} and use the newest URL"
        )));
    }
    let account = config.accounts.iter().find(|a| a.id == id);
    let client = Client {
        id: &oauth.client_id,
        secret: oauth.client_secret.as_ref(),
        via: crate::upstream::Via {
            proxy: account.and_then(|a| a.proxy.as_ref()).map(|e| &e.proxy),
            tls: account.and_then(|a| a.ca.as_ref()).map(|t| &t.tls),
            within: None,
        },
    };
    let grant = TokenEndpoint::new(&config.oauth)
        .exchange(&client, &code, &pending.verifier, &pending.state)
        .map_err(|e| login_error(format!("the login was not completed: {e}")))?;
    let refresh = grant.refresh_token.clone().ok_or_else(|| {
        login_error(
            "the token endpoint returned no refresh_token; the account could not stay logged in",
        )
    })?;
    let tokens = Tokens {
        access: grant.access_token.clone(),
        refresh,
        expires_at: grant.expires_at,
        issued_at: now,
    };
    store::save_tokens(path, id, &tokens, Some(&grant)).map_err(change_error)?;
    let who = grant
        .account_email
        .clone()
        .unwrap_or_else(|| "(no email given)".into());
    let org = grant
        .organization_name
        .clone()
        .or(grant.organization_uuid.clone());
    if cmd.json {
        print_json(&json!({
            "id": id, "name": name, "state": "enabled", "email": grant.account_email,
            "organization": org, "scopes": grant.scope, "expires_at": tokens.expires_at,
        }));
    } else {
        let org = org.map(|o| format!(" of {o}")).unwrap_or_default();
        println!(
            "account {id} \"{name}\" is logged in as {who}{org}; the token expires in {} and is refreshed automatically",
            time::human_duration(tokens.expires_at.saturating_sub(now))
        );
    }
    Ok(())
}
