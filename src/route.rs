//! The routing table: which method and path is which route, and the checks that keep what a
//! client writes in a URL from reaching the upstream's path (a model id of model-name
//! characters only, a query of plain URL text).

use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Alive: always 200.
    Health,
    /// At least one account could take a request now.
    Ready,
    /// The running state, for `llm-gateway status`: admin only.
    Status,
    /// Prometheus metrics: admin only.
    Metrics,
    /// Anthropic Messages (`count_tokens` too): passed through, unless the body is clearly
    /// OpenAI's.
    Messages { count_tokens: bool },
    /// OpenAI Chat Completions: converted, unless the body is clearly Anthropic's.
    Chat,
    /// The OpenAI Responses API: converted.
    Responses,
    /// The model list or one model, in the caller's format.
    Models,
    /// A key's own usage, cost and budgets left (`key_usage`).
    KeyUsage,
    /// The dashboard's page, script and style sheet: no data, so no key.
    Dashboard,
    /// The dashboard's sign-in: an admin key in, a session cookie out.
    DashboardLogin,
    /// The dashboard's sign-out: the cookie cleared.
    DashboardLogout,
    /// The dashboard's JSON (`dashboard::api`): admin only.
    AdminApi,
}

pub fn route(method: &str, path: &str) -> Result<Route, ApiError> {
    let (allow, route) = match path {
        "/health" => ("GET", Route::Health),
        "/ready" => ("GET", Route::Ready),
        "/admin/status" => ("GET", Route::Status),
        "/metrics" => ("GET", Route::Metrics),
        "/gateway/usage" => ("GET", Route::KeyUsage),
        "/dashboard" | "/dashboard/" | "/dashboard/app.js" | "/dashboard/app.css" => {
            ("GET", Route::Dashboard)
        }
        "/dashboard/login" => ("POST", Route::DashboardLogin),
        "/dashboard/logout" => ("POST", Route::DashboardLogout),
        "/dashboard/session" => ("GET", Route::Dashboard),
        "/admin/api/overview" | "/admin/api/usage" | "/admin/api/keys" | "/admin/api/trouble" => {
            ("GET", Route::AdminApi)
        }
        "/v1/messages" => (
            "POST",
            Route::Messages {
                count_tokens: false,
            },
        ),
        "/v1/messages/count_tokens" => ("POST", Route::Messages { count_tokens: true }),
        "/v1/chat/completions" | "/chat/completions" => ("POST", Route::Chat),
        "/v1/responses" | "/responses" => ("POST", Route::Responses),
        p if p.starts_with("/v1/responses/") || p.starts_with("/responses/") => {
            return Err(ApiError::NotFound(format!(
                "no route for {method} {path}: this gateway stores no responses (and compacts none); send the whole history to POST /v1/responses"
            )));
        }
        "/v1/models" => ("GET", Route::Models),
        p if p.starts_with("/v1/models/") => {
            let id = &p["/v1/models/".len()..];
            if !is_model_id(id) {
                return Err(ApiError::BadRequest(
                    "the path does not end in a model id: ids are letters, digits, '-', '_', '.', ':' and '@', up to 128 of them, without '..'".into(),
                ));
            }
            ("GET", Route::Models)
        }
        _ => {
            return Err(ApiError::NotFound(format!(
                "no route for {method} {path}; this gateway serves POST /v1/messages, POST /v1/messages/count_tokens, POST /v1/chat/completions, POST /v1/responses, GET /v1/models, GET /gateway/usage, GET /health and GET /ready"
            )));
        }
    };
    if allow == method {
        Ok(route)
    } else {
        Err(ApiError::MethodNotAllowed { allow })
    }
}

/// A model id as a piece of an upstream path: model-name characters only, so that nothing a
/// client writes there (`..`, an encoded `/` or `\\`, a control byte) can lead the upstream
/// request anywhere but to one model.
pub fn is_model_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b))
        && !id.starts_with(['.', '-'])
        && !id.contains("..")
}

/// The query string a client sent, checked before it is passed on (`?beta=true`, the model
/// list's paging): `key=value` pairs of URL characters whose percent-decoding is text without
/// control characters.
pub fn check_query(target: &str) -> Result<(), ApiError> {
    let Some((_, query)) = target.split_once('?') else {
        return Ok(());
    };
    percent_decode(query)
        .map(drop)
        .map_err(|why| ApiError::BadRequest(format!("the query string {why}")))
}

/// The value of `name` in the query of `target`, percent-decoded (`+` is a space), if the
/// query has it.
pub fn query_value(target: &str, name: &str) -> Option<String> {
    let (_, query) = target.split_once('?')?;
    let raw = query
        .split('&')
        .find_map(|pair| pair.split_once('=').filter(|(n, _)| *n == name))?
        .1
        .replace('+', " ");
    percent_decode(&raw).ok()
}

/// Percent-decoded query text of RFC 3986 query characters, without control characters.
fn percent_decode(query: &str) -> Result<String, &'static str> {
    let bytes = query.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = (bytes.get(i + 1..i + 3))
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(v) => decoded.push(v),
                None => return Err("has a '%' not followed by two hex digits"),
            }
            i += 3;
            continue;
        }
        // RFC 3986's query characters: unreserved, sub-delims, ':', '@', '/' and '?'.
        if !(b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?".contains(&b)) {
            return Err("has a character a query may not hold");
        }
        decoded.push(b);
        i += 1;
    }
    match String::from_utf8(decoded) {
        Ok(text) if !text.chars().any(char::is_control) => Ok(text),
        Ok(_) => Err("decodes to control characters"),
        Err(_) => Err("does not decode to UTF-8 text"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_paths_and_methods() {
        assert_eq!(route("GET", "/health").ok(), Some(Route::Health));
        assert_eq!(route("GET", "/ready").ok(), Some(Route::Ready));
        assert_eq!(
            route("POST", "/v1/messages").ok(),
            Some(Route::Messages {
                count_tokens: false
            })
        );
        assert_eq!(route("POST", "/chat/completions").ok(), Some(Route::Chat));
        assert_eq!(
            route("GET", "/v1/models/claude-x").ok(),
            Some(Route::Models)
        );
        assert_eq!(route("GET", "/v1/messages").expect_err("405").status(), 405);
        for bad in ["a/b", "..", "a%2Fb", "a\\b", ".x", "-x", "a..b", "a%00", ""] {
            let path = format!("/v1/models/{bad}");
            assert_eq!(route("GET", &path).expect_err(bad).status(), 400, "{bad}");
        }
        for good in [
            "claude-sonnet-4-5",
            "claude-3-5-sonnet@20240620",
            "anthropic.claude-v2:1",
        ] {
            assert!(
                route("GET", &format!("/v1/models/{good}")).is_ok(),
                "{good}"
            );
        }
        assert_eq!(route("POST", "/nope").expect_err("404").status(), 404);
    }

    #[test]
    fn queries_are_url_text() {
        for good in [
            "/v1/messages",
            "/v1/messages?beta=true",
            "/m?limit=5&after_id=x%20y",
            "/m?q=%C3%A9",
        ] {
            assert!(check_query(good).is_ok(), "{good}");
        }
        for bad in [
            "/m?a=%+f",
            "/m?a=%zz",
            "/m?a=%f",
            "/m?a=%ff",
            "/m?a=%0d%0a",
            "/m?a=\"",
            "/m?a=#x",
            "/m?a b",
        ] {
            assert_eq!(check_query(bad).expect_err(bad).status(), 400, "{bad}");
        }
    }
}
