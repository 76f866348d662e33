//! The OAuth 2.0 authorization-code flow with PKCE, as Anthropic runs it: the login material
//! (verifier, challenge, state), the authorize URL, reading what the user pastes back, and the
//! token endpoint (code exchange and refresh). Every URL comes from `config.oauth`.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::config::OAuthSettings;
use crate::encoding;
use crate::scrub::Scrub;
use crate::secret::{self, Secret};

/// How long an `oauth-start` stays valid.
pub const LOGIN_TTL_SECS: u64 = 600;

/// The PKCE verifier and the state of one login attempt.
pub struct Login {
    pub verifier: Secret,
    pub state: Secret,
}

impl Login {
    /// A new attempt: 32 OS-random bytes each, base64url without padding (43 characters).
    pub fn start() -> Login {
        Login {
            verifier: Secret::new(encoding::base64url(&secret::random_bytes::<32>())),
            state: Secret::new(encoding::base64url(&secret::random_bytes::<32>())),
        }
    }
}

/// S256: base64url(SHA-256(verifier)).
pub fn challenge(verifier: &Secret) -> String {
    encoding::base64url(&secret::sha256(verifier.expose().as_bytes()))
}

/// The URL the user opens to log in.
pub fn authorize_url(settings: &OAuthSettings, client_id: &str, login: &Login) -> String {
    let params = [
        ("code", "true"),
        ("client_id", client_id),
        ("response_type", "code"),
        ("redirect_uri", &settings.redirect_uri),
        ("scope", &settings.scopes),
        ("code_challenge", &challenge(&login.verifier)),
        ("code_challenge_method", "S256"),
        ("state", login.state.expose()),
    ];
    let query: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{k}={}", percent_encode(v)))
        .collect();
    let sep = if settings.authorize_url.contains('?') {
        '&'
    } else {
        '?'
    };
    format!("{}{sep}{}", settings.authorize_url, query.join("&"))
}

/// What the user pasted: `CODE#STATE` (the callback page), a full callback URL with
/// `?code=…&state=…`, or a bare code. Returns the code and the state, if one came with it.
pub fn parse_callback(input: &str) -> Option<(String, Option<String>)> {
    let input = input.trim();
    if input.is_empty() {
        return None;
    }
    if input.starts_with("http://") || input.starts_with("https://") {
        let query = input.split_once('?')?.1;
        let query = query.split('#').next().unwrap_or(query);
        let mut code = None;
        let mut state = None;
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "code" => code = Some(percent_decode(v)),
                "state" => state = Some(percent_decode(v)),
                _ => {}
            }
        }
        return code.filter(|c| !c.is_empty()).map(|c| (c, state));
    }
    match input.split_once('#') {
        Some((code, state)) if !code.is_empty() => Some((
            code.to_string(),
            Some(state.to_string()).filter(|s| !s.is_empty()),
        )),
        Some(_) => None,
        None => Some((input.to_string(), None)),
    }
}

/// RFC 3986 unreserved characters stay; everything else is %XX.
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match value.get(i + 1..i + 3).and_then(encoding::hex_decode) {
                    Some(b) => {
                        out.extend_from_slice(&b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the token endpoint gave us.
#[derive(Debug, Clone)]
pub struct Grant {
    pub access_token: Secret,
    /// `None` when the endpoint did not rotate it: keep the old one.
    pub refresh_token: Option<Secret>,
    /// Unix seconds.
    pub expires_at: u64,
    pub scope: Option<String>,
    pub organization_uuid: Option<String>,
    pub organization_name: Option<String>,
    pub account_uuid: Option<String>,
    pub account_email: Option<String>,
}

#[derive(Debug, Clone)]
pub enum TokenError {
    /// The code or refresh token is dead (invalid_grant): a person must log in again.
    InvalidGrant(String),
    /// The endpoint refused for another reason; status and what it said.
    Rejected { status: u16, message: String },
    /// The endpoint could not be reached or timed out: worth retrying later.
    Network(String),
    /// 200, but not a token response.
    BadResponse(String),
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::InvalidGrant(m) => write!(f, "the token endpoint says invalid_grant: {m}"),
            TokenError::Rejected { status, message } => {
                write!(f, "the token endpoint refused with {status}: {message}")
            }
            TokenError::Network(m) => write!(f, "the token endpoint could not be reached: {m}"),
            TokenError::BadResponse(m) => {
                write!(f, "the token endpoint answered something unexpected: {m}")
            }
        }
    }
}

impl TokenError {
    /// The error with every secret of `scrub` masked in what it quotes of the endpoint.
    fn scrubbed(self, scrub: &Scrub) -> TokenError {
        let clean = |m: String| scrub.text(&m).into_owned();
        match self {
            TokenError::InvalidGrant(m) => TokenError::InvalidGrant(clean(m)),
            TokenError::Rejected { status, message } => TokenError::Rejected {
                status,
                message: clean(message),
            },
            TokenError::Network(m) => TokenError::Network(clean(m)),
            TokenError::BadResponse(m) => TokenError::BadResponse(clean(m)),
        }
    }
}

/// The client identity sent with token requests.
pub struct Client<'a> {
    pub id: &'a str,
    pub secret: Option<&'a Secret>,
    /// The account's egress: its logins and refreshes leave from where it serves.
    pub via: crate::upstream::Via<'a>,
}

/// Calls the token endpoint. Holds its own small agent: these calls are rare and must not
/// queue behind streams.
pub struct TokenEndpoint {
    agent: ureq::Agent,
    url: String,
    redirect_uri: String,
}

impl TokenEndpoint {
    pub fn new(settings: &OAuthSettings) -> TokenEndpoint {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .timeout_global(Some(settings.token_timeout))
            .timeout_connect(Some(settings.token_timeout.min(Duration::from_secs(10))))
            .build();
        TokenEndpoint {
            agent: config.into(),
            url: settings.token_url.clone(),
            redirect_uri: settings.redirect_uri.clone(),
        }
    }

    /// Exchanges an authorization code.
    pub fn exchange(
        &self,
        client: &Client<'_>,
        code: &str,
        verifier: &Secret,
        state: &Secret,
    ) -> Result<Grant, TokenError> {
        let mut body = serde_json::json!({
            "grant_type": "authorization_code",
            "client_id": client.id,
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": verifier.expose(),
            "state": state.expose(),
        });
        if let Some(s) = client.secret {
            body["client_secret"] = s.expose().into();
        }
        let secret = client.secret.map(Secret::expose);
        let sent = [code, verifier.expose(), state.expose()];
        self.call(client, &body, Scrub::new(sent.into_iter().chain(secret)))
    }

    /// Refreshes with `refresh_token`.
    pub fn refresh(
        &self,
        client: &Client<'_>,
        refresh_token: &Secret,
    ) -> Result<Grant, TokenError> {
        let mut body = serde_json::json!({
            "grant_type": "refresh_token",
            "refresh_token": refresh_token.expose(),
            "client_id": client.id,
        });
        if let Some(s) = client.secret {
            body["client_secret"] = s.expose().into();
        }
        let secret = client.secret.map(Secret::expose);
        self.call(
            client,
            &body,
            Scrub::new(std::iter::once(refresh_token.expose()).chain(secret)),
        )
    }

    /// Posts `body`; what the endpoint answers is checked, and what an error quotes of it is
    /// scrubbed of what `body` carried (`sent`) before a log or the CLI shows it.
    fn call(
        &self,
        client: &Client<'_>,
        body: &serde_json::Value,
        sent: Scrub,
    ) -> Result<Grant, TokenError> {
        let response = self
            .agent
            .post(&self.url)
            .config()
            .proxy(client.via.proxy.cloned())
            .tls_config(client.via.tls.cloned().unwrap_or_default())
            .build()
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .send(body.to_string().as_bytes())
            .map_err(|e| TokenError::Network(e.to_string()))?;
        let status = response.status().as_u16();
        let text = response
            .into_body()
            .with_config()
            .limit(1024 * 1024)
            .read_to_string()
            .map_err(|e| TokenError::Network(e.to_string()))?;
        // Only what is shown is scrubbed: a grant may rightly carry the refresh token we sent
        // (one that does not rotate), and masking it would store asterisks.
        parse_token_response(status, &text, crate::time::now_unix()).map_err(|e| e.scrubbed(&sent))
    }
}

#[derive(Deserialize)]
struct Wire {
    access_token: Option<String>,
    refresh_token: Option<String>,
    expires_in: Option<u64>,
    scope: Option<String>,
    organization: Option<WireOrg>,
    account: Option<WireAccount>,
}

#[derive(Deserialize)]
struct WireOrg {
    uuid: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
struct WireAccount {
    uuid: Option<String>,
    email_address: Option<String>,
}

/// Turns a token endpoint answer into a grant or a classified error. Pure, so it is tested
/// against every shape seen in the wild.
pub fn parse_token_response(status: u16, text: &str, now: u64) -> Result<Grant, TokenError> {
    if !(200..300).contains(&status) {
        let (code, message) = error_of(text);
        if code.as_deref() == Some("invalid_grant") || text.contains("invalid_grant") {
            return Err(TokenError::InvalidGrant(message));
        }
        let message = match code {
            Some(code) if !message.contains(&code) => format!("{code}: {message}"),
            _ => message,
        };
        return Err(TokenError::Rejected { status, message });
    }
    let wire: Wire = crate::json::from_str(text)
        .map_err(|e| TokenError::BadResponse(format!("not a token response ({e})")))?;
    let access = wire
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| TokenError::BadResponse("no access_token in the response".into()))?;
    // Kept only if it can be sent: a token a header cannot carry would fail every request
    // as the client's fault, with no refresh and no failover.
    for (name, token) in [
        ("access_token", Some(&access)),
        ("refresh_token", wire.refresh_token.as_ref()),
    ] {
        if let Some(token) = token
            && let Some(why) = unsendable(token)
        {
            return Err(TokenError::BadResponse(format!("its {name} {why}")));
        }
    }
    // No lifetime given: assume an hour rather than forever; a longer one than any real
    // token's is held to `MAX_LIFETIME_SECS`, so no claim can overflow the expiry.
    let lifetime = wire.expires_in.unwrap_or(3600).min(MAX_LIFETIME_SECS);
    Ok(Grant {
        access_token: Secret::new(access),
        refresh_token: wire
            .refresh_token
            .filter(|t| !t.is_empty())
            .map(Secret::new),
        expires_at: now.saturating_add(lifetime),
        scope: wire.scope,
        organization_uuid: wire.organization.as_ref().and_then(|o| o.uuid.clone()),
        organization_name: wire.organization.and_then(|o| o.name),
        account_uuid: wire.account.as_ref().and_then(|a| a.uuid.clone()),
        account_email: wire.account.and_then(|a| a.email_address),
    })
}

/// The longest token lifetime believed (30 days; Anthropic's access tokens last 8 hours).
pub const MAX_LIFETIME_SECS: u64 = 30 * 24 * 3600;
/// The longest token kept (Anthropic's are about 100 characters).
const MAX_TOKEN_LEN: usize = 4096;

/// Why a token cannot go in an HTTP header as `Bearer <token>`, if it cannot: only visible
/// ASCII (RFC 6750's token68 and then some), and a sane length.
pub fn unsendable(token: &str) -> Option<String> {
    if token.len() > MAX_TOKEN_LEN {
        return Some(format!(
            "is {} bytes long (at most {MAX_TOKEN_LEN} are kept)",
            token.len()
        ));
    }
    let bad = token.bytes().find(|b| !(0x21..=0x7e).contains(b))?;
    Some(format!(
        "holds byte 0x{bad:02x}, which a header cannot carry"
    ))
}

/// The error code and a readable message from an OAuth or Anthropic error body. Bounded, and
/// never the request's own secrets (the endpoint does not echo them).
fn error_of(text: &str) -> (Option<String>, String) {
    let value: serde_json::Value = crate::json::from_str(text).unwrap_or_default();
    let code = match &value["error"] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("type").and_then(|t| t.as_str()).map(String::from),
        _ => None,
    };
    let message = value["error_description"]
        .as_str()
        .or_else(|| value["error"]["message"].as_str())
        .or_else(|| value["message"].as_str())
        .map(String::from)
        .unwrap_or_else(|| text.chars().take(300).collect());
    (code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> OAuthSettings {
        OAuthSettings {
            authorize_url: "https://auth.test/oauth/authorize".into(),
            token_url: "https://auth.test/token".into(),
            redirect_uri: "https://auth.test/callback".into(),
            scopes: "org:create_api_key user:profile user:inference".into(),
            system_prompt: String::new(),
            refresh_lead: Duration::from_secs(600),
            refresh_min_interval: Duration::from_secs(30),
            token_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn pkce_values_have_the_specified_shape() {
        let login = Login::start();
        assert_eq!(login.verifier.expose().len(), 43);
        assert_eq!(login.state.expose().len(), 43);
        assert!(
            login
                .verifier
                .expose()
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        // RFC 7636 appendix B.
        let v = Secret::new("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk");
        assert_eq!(challenge(&v), "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
    }

    #[test]
    fn authorize_url_carries_every_parameter() {
        let login = Login::start();
        let url = authorize_url(&settings(), "client-1", &login);
        assert!(url.starts_with("https://auth.test/oauth/authorize?code=true&"));
        for part in [
            "client_id=client-1",
            "response_type=code",
            "redirect_uri=https%3A%2F%2Fauth.test%2Fcallback",
            "scope=org%3Acreate_api_key%20user%3Aprofile%20user%3Ainference",
            "code_challenge_method=S256",
        ] {
            assert!(url.contains(part), "{part} in {url}");
        }
        assert!(url.contains(&format!("code_challenge={}", challenge(&login.verifier))));
        assert!(url.contains(&format!("state={}", login.state.expose())));
    }

    #[test]
    fn callback_input_in_all_three_forms() {
        assert_eq!(
            parse_callback("abc#xyz"),
            Some(("abc".into(), Some("xyz".into())))
        );
        assert_eq!(parse_callback(" abc \n"), Some(("abc".into(), None)));
        assert_eq!(
            parse_callback("https://x.test/cb?code=a%2Bb&state=s1&other=1"),
            Some(("a+b".into(), Some("s1".into())))
        );
        assert_eq!(parse_callback("https://x.test/cb?state=s1"), None);
        assert_eq!(parse_callback("#state"), None);
        assert_eq!(parse_callback(""), None);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn token_responses_are_classified() {
        let ok = parse_token_response(
            200,
            r#"{"access_token":"at","refresh_token":"rt","expires_in":28800,"scope":"user:inference","organization":{"uuid":"o1","name":"Org"},"account":{"uuid":"a1","email_address":"x@y.z"}}"#,
            1000,
        )
        .expect("grant");
        assert_eq!(ok.access_token.expose(), "at");
        assert_eq!(ok.refresh_token.as_ref().map(Secret::expose), Some("rt"));
        assert_eq!(ok.expires_at, 29_800);
        assert_eq!(ok.organization_name.as_deref(), Some("Org"));
        assert_eq!(ok.account_email.as_deref(), Some("x@y.z"));

        let kept = parse_token_response(200, r#"{"access_token":"at2","expires_in":60}"#, 0)
            .expect("grant");
        assert!(kept.refresh_token.is_none());

        let dead = parse_token_response(
            400,
            r#"{"error":"invalid_grant","error_description":"Refresh token not found or invalid"}"#,
            0,
        );
        assert!(matches!(dead, Err(TokenError::InvalidGrant(m)) if m.contains("not found")));
        let anthropic = parse_token_response(
            400,
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"Invalid code"}}"#,
            0,
        );
        assert!(
            matches!(anthropic, Err(TokenError::Rejected { status: 400, message }) if message.contains("Invalid code"))
        );
        assert!(matches!(
            parse_token_response(200, "<html>", 0),
            Err(TokenError::BadResponse(_))
        ));
        assert!(matches!(
            parse_token_response(200, "{}", 0),
            Err(TokenError::BadResponse(_))
        ));
    }

    #[test]
    fn a_lifetime_past_any_real_one_is_held_and_never_wraps() {
        let huge = format!(r#"{{"access_token":"at","expires_in":{}}}"#, u64::MAX);
        let grant = parse_token_response(200, &huge, 1_800_000_000).expect("grant");
        assert_eq!(grant.expires_at, 1_800_000_000 + MAX_LIFETIME_SECS);
        let at_the_end =
            parse_token_response(200, r#"{"access_token":"at","expires_in":10}"#, u64::MAX)
                .expect("grant");
        assert_eq!(at_the_end.expires_at, u64::MAX);
    }

    #[test]
    fn tokens_a_header_cannot_carry_are_refused() {
        for token in [r"a\r\nx-injected: 1", "a b", r"tab\there", r"caf\u00e9"] {
            for field in ["access_token", "refresh_token"] {
                let body =
                    format!(r#"{{"access_token":"ok","{field}":"{token}","expires_in":60}}"#);
                let refused = parse_token_response(200, &body, 0);
                assert!(
                    matches!(&refused, Err(TokenError::BadResponse(m)) if m.contains(field)),
                    "{field} {token:?}: {refused:?}"
                );
            }
        }
        let long = format!(r#"{{"access_token":"{}"}}"#, "a".repeat(MAX_TOKEN_LEN + 1));
        assert!(matches!(
            parse_token_response(200, &long, 0),
            Err(TokenError::BadResponse(_))
        ));
    }
}
