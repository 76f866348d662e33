//! The dashboard's routes: the bundle (no key: it holds no data), the sign-in and sign-out,
//! and the JSON, under the status rules: keyless on the loopback admin listener for this
//! machine's names, elsewhere an admin key or a session cookie of one.

use crate::access::Names;
use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::http::Request;
use crate::route::Route;
use crate::router::Listener;

const JSON: &str = "application/json";

/// A dashboard answer: sent under `HEADERS`, maybe setting the session cookie.
pub struct Page {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub cookie: Option<String>,
}

impl Page {
    fn json(value: &serde_json::Value) -> Page {
        Page {
            status: 200,
            content_type: JSON,
            body: value.to_string().into_bytes(),
            cookie: None,
        }
    }
}

/// The dashboard's routes: the bundle (no key: it holds no data), the sign-in, and the JSON
/// (no key on the loopback admin listener; elsewhere an admin key or a session cookie).
pub fn serve(
    gw: &Gateway,
    req: &Request,
    route: Route,
    listener: Listener,
    names: &Names,
) -> Result<Page, ApiError> {
    let path = req.path();
    let now = crate::time::now_unix();
    match route {
        Route::Dashboard if path == "/dashboard/session" => {
            // Whether the page may read the data, so it asks for it only then (a 401 in the
            // browser's console is an error there).
            let signed_in = access(gw, req, listener, now).is_ok();
            Ok(Page::json(&serde_json::json!({"signed_in": signed_in})))
        }
        Route::Dashboard => {
            let path = if path == "/dashboard/" {
                "/dashboard"
            } else {
                path
            };
            let (_, content_type, body) = (super::ASSETS.iter())
                .find(|(p, _, _)| *p == path)
                .ok_or_else(|| ApiError::NotFound("no such dashboard file".into()))?;
            Ok(Page {
                status: 200,
                content_type,
                body: body.as_bytes().to_vec(),
                cookie: None,
            })
        }
        Route::DashboardLogin => {
            let client = gw.clients.authenticate(req)?;
            if !client.admin {
                return Err(ApiError::Forbidden(
                    "the dashboard needs an admin key (add-client-key --admin)".into(),
                ));
            }
            let value = gw.sessions.issue(&client.id, now).ok_or_else(|| {
                ApiError::NoAccount(
                    "dashboard sessions need gateway.key beside config.yaml (llm-gateway init makes it); send the admin key as x-api-key instead".into(),
                )
            })?;
            // Secure unless the page is served over plain HTTP to a browser on this machine
            // (the client as `server.trusted_proxies` name it; a TLS proxy's
            // `x-forwarded-proto: https` makes it Secure whoever sent it, which can only keep
            // the cookie off plain HTTP).
            let forwarded: Vec<&str> = (req.headers.iter())
                .filter(|(n, _)| n == "x-forwarded-for")
                .filter_map(|(_, v)| std::str::from_utf8(v).ok())
                .collect();
            let client_ip =
                crate::access::client_address(names.peer, &forwarded, &gw.live().trusted_proxies);
            let https = req
                .header("x-forwarded-proto")
                .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"));
            let secure = https || !client_ip.is_some_and(|ip| ip.is_loopback());
            let cookie = format!(
                "{}={value}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict{}",
                super::COOKIE,
                super::SESSION_SECS,
                if secure { "; Secure" } else { "" }
            );
            // A Secure cookie over plain HTTP is dropped by the browser: the page says so.
            let body = serde_json::json!({"signed_in": true, "secure_cookie": secure});
            Ok(Page {
                status: 200,
                content_type: JSON,
                body: body.to_string().into_bytes(),
                cookie: Some(cookie),
            })
        }
        Route::DashboardLogout => {
            let cookie = format!(
                "{}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict",
                super::COOKIE
            );
            Ok(Page {
                status: 200,
                content_type: JSON,
                body: br#"{"signed_in":false}"#.to_vec(),
                cookie: Some(cookie),
            })
        }
        _ => {
            access(gw, req, listener, now)?;
            let name = path.strip_prefix("/admin/api/").unwrap_or("");
            let value = super::api::answer(gw, name)
                .ok_or_else(|| ApiError::NotFound(format!("no dashboard endpoint {name:?}")))?;
            Ok(Page::json(&value))
        }
    }
}

/// Whether `req` may read the dashboard's data: keyless on the loopback admin listener, with a
/// valid session cookie of an admin key still in force, or with an admin key.
fn access(gw: &Gateway, req: &Request, listener: Listener, now: u64) -> Result<(), ApiError> {
    let session = (req.header("cookie"))
        .and_then(|c| super::cookie(c, super::COOKIE))
        .and_then(|v| gw.sessions.valid(v, now))
        .is_some_and(|id| gw.clients.is_active_admin(id));
    if keyless(listener, req) || session {
        return Ok(());
    }
    let client = gw.clients.authenticate(req)?;
    if !client.admin {
        return Err(ApiError::Forbidden(
            "the dashboard's data needs an admin key or a dashboard session".into(),
        ));
    }
    Ok(())
}

/// Whether `req` needs no key: on the loopback admin listener, addressed by this machine's
/// name (a page elsewhere that rebinds its name to 127.0.0.1 sends its own, and needs a key).
pub fn keyless(listener: Listener, req: &Request) -> bool {
    listener == Listener::AdminLoopback && super::loopback_host(req.header("host"))
}
