//! Routing of one downstream request: match the path, authenticate the client, check the body,
//! pick an account, forward upstream, relay the answer, write the access log line.

use std::time::Instant;

use crate::accounts::Entry;
use crate::anthropic;
use crate::config::Credential;
use crate::error::ApiError;
use crate::http::{Conn, Head, Request, Responder};
use crate::processor::{ApiKey, OAuth};
use crate::refresh::Need;
use crate::secret::Secret;
use crate::server::Gateway;
use crate::store;
use crate::upstream::{self, Answer, Outcome};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Health,
    /// Forwarded upstream; `json_body` when the body must be a JSON object.
    Forward {
        json_body: bool,
    },
}

fn route(method: &str, path: &str) -> Result<Route, ApiError> {
    let (allow, route) = match path {
        "/health" => ("GET", Route::Health),
        "/v1/messages" | "/v1/messages/count_tokens" => {
            ("POST", Route::Forward { json_body: true })
        }
        "/v1/models" => ("GET", Route::Forward { json_body: false }),
        p if p
            .strip_prefix("/v1/models/")
            .is_some_and(|id| !id.is_empty() && !id.contains('/')) =>
        {
            ("GET", Route::Forward { json_body: false })
        }
        _ => {
            return Err(ApiError::NotFound(format!(
                "no route for {method} {path}; this gateway serves POST /v1/messages, POST /v1/messages/count_tokens, GET /v1/models and GET /health"
            )));
        }
    };
    if allow.split(", ").any(|m| m == method) {
        Ok(route)
    } else {
        Err(ApiError::MethodNotAllowed { allow })
    }
}

/// Serves one request on `conn`. Returns whether the connection may serve another.
pub fn handle(gw: &Gateway, req: Request, conn: &mut Conn) -> bool {
    let started = Instant::now();
    let out = conn.respond(req.minor_version, req.keep_alive);
    let mut account_name = "-".to_string();
    let mut client_name = "-".to_string();
    let (status, outcome, keep) = match serve(gw, &req, &mut account_name, &mut client_name) {
        Ok(Served::Health) => {
            let mut head = Head::new(200);
            head.header("content-type", b"application/json");
            let keep = out.send(head, br#"{"status":"ok"}"#);
            (200, Outcome::Complete, keep)
        }
        Ok(Served::Upstream(answer)) => {
            let status = answer.status();
            match upstream::relay(answer, out) {
                Ok((outcome, keep)) => (status, outcome, keep),
                Err((error, out)) => {
                    let status = error.status();
                    let keep = send_error(out, &error);
                    (status, Outcome::UpstreamBroke(error.to_string()), keep)
                }
            }
        }
        Err(error) => {
            let status = error.status();
            let keep = send_error(out, &error);
            (status, Outcome::Complete, keep)
        }
    };
    if gw.access_log {
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let note = match &outcome {
            Outcome::Complete => String::new(),
            Outcome::UpstreamBroke(why) => format!(" upstream_broke=\"{why}\""),
            Outcome::ClientGone => " client_gone".to_string(),
        };
        info!(
            "{} {} {status} {ms:.1}ms client={client_name} account={account_name}{note}",
            req.method,
            req.path()
        );
    } else if let Outcome::UpstreamBroke(why) = &outcome {
        warn!("{} {}: upstream broke: {why}", req.method, req.path());
    }
    keep
}

enum Served {
    Health,
    Upstream(Answer),
}

fn serve(
    gw: &Gateway,
    req: &Request,
    account_name: &mut String,
    client_name: &mut String,
) -> Result<Served, ApiError> {
    let json_body = match route(&req.method, req.path())? {
        Route::Health => return Ok(Served::Health),
        Route::Forward { json_body } => json_body,
    };
    let client = gw.clients.authenticate(req)?;
    *client_name = client.name;
    if json_body {
        check_json_object(&req.body)?;
    }
    // Accounts that failed this request before anything reached the client are skipped; if
    // none is left, the client gets the last account's answer (or why none could be used).
    let mut tried = Vec::new();
    let mut fallback: Option<Result<Answer, ApiError>> = None;
    loop {
        let entry = match gw.accounts.pick(&tried) {
            Ok(entry) => entry,
            Err(none) => {
                return match fallback {
                    Some(Ok(answer)) => Ok(Served::Upstream(answer)),
                    Some(Err(error)) => Err(error),
                    None => Err(none),
                };
            }
        };
        account_name.clone_from(&entry.account.name);
        match attempt(gw, req, &entry)? {
            Step::Done(answer) => return Ok(Served::Upstream(answer)),
            Step::Next(why) => {
                tried.push(entry.id().to_string());
                fallback = Some(why);
            }
        }
    }
}

/// What one account made of the request.
enum Step {
    /// An answer to relay.
    Done(Answer),
    /// This account cannot serve it; try another. Carries what the client gets if none can.
    Next(Result<Answer, ApiError>),
}

fn attempt(gw: &Gateway, req: &Request, entry: &Entry) -> Result<Step, ApiError> {
    let answer = match &entry.account.credential {
        Credential::ApiKey(key) => Answer::Streaming(gw.upstream.forward(req, &ApiKey(key))?),
        Credential::OAuth(_) => {
            let tokens = match gw.refresher.ensure(entry, Need::Expired) {
                Ok(tokens) => tokens,
                Err(e) => {
                    let why = format!("account {} ({}): {e}", entry.id(), entry.account.name);
                    return Ok(Step::Next(Err(ApiError::NoAccount(why))));
                }
            };
            let answer = Answer::Streaming(gw.upstream.forward(req, &oauth(gw, &tokens.access))?);
            if answer.status() != 401 {
                answer
            } else {
                // A token we believed valid was refused: refresh once and retry once.
                let refused = answer.buffer()?;
                match gw
                    .refresher
                    .ensure(entry, Need::Rejected(tokens.access.clone()))
                {
                    Ok(fresh) => {
                        Answer::Streaming(gw.upstream.forward(req, &oauth(gw, &fresh.access))?)
                    }
                    Err(e) => {
                        warn!("account {}: 401 and no fresh token: {e}", entry.id());
                        return Ok(Step::Next(Ok(refused)));
                    }
                }
            }
        }
        Credential::Unusable(why) => return Ok(Step::Next(Err(ApiError::NoAccount(why.clone())))),
    };
    if matches!(answer.status(), 400 | 403) {
        let answer = answer.buffer()?;
        if let Some(reason) = anthropic::permanent_failure(answer.status(), answer.body()) {
            disable(gw, entry, reason);
            return Ok(Step::Next(Ok(answer)));
        }
        return Ok(Step::Done(answer));
    }
    Ok(Step::Done(answer))
}

fn oauth<'a>(gw: &'a Gateway, token: &'a Secret) -> OAuth<'a> {
    OAuth {
        token,
        system_prompt: &gw.system_prompt,
    }
}

/// Takes an account out of service for good: in memory at once, and in config.yaml.
fn disable(gw: &Gateway, entry: &Entry, reason: &str) {
    error!(
        "account {} ({}) disabled: upstream says \"{reason}\"",
        entry.id(),
        entry.account.name
    );
    entry.live().disabled_reason = Some(reason.to_string());
    if let Err(e) = store::disable_account(&gw.config_path, entry.id(), reason) {
        error!(
            "could not record that account {} is disabled: {e}",
            entry.id()
        );
    }
}

/// The body must be one JSON object. Checked without building a tree.
fn check_json_object(body: &[u8]) -> Result<(), ApiError> {
    struct Object;
    impl<'de> serde::Deserialize<'de> for Object {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Object, D::Error> {
            struct Visitor;
            impl<'de> serde::de::Visitor<'de> for Visitor {
                type Value = Object;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Object, A::Error> {
                    while map
                        .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                        .is_some()
                    {}
                    Ok(Object)
                }
            }
            d.deserialize_map(Visitor)
        }
    }
    if body.is_empty() {
        return Err(ApiError::BadRequest(
            "the request body is empty; expected a JSON object".into(),
        ));
    }
    serde_json::from_slice::<Object>(body)
        .map(|_| ())
        .map_err(|e| ApiError::BadRequest(format!("the request body is not valid JSON: {e}")))
}

/// Sends `error` in Anthropic's shape. Returns whether the connection may be reused.
pub fn send_error(out: Responder<'_>, error: &ApiError) -> bool {
    let mut head = Head::new(error.status());
    head.header("content-type", b"application/json");
    if let ApiError::MethodNotAllowed { allow } = error {
        head.header("allow", allow.as_bytes());
    }
    out.send(head, &error.anthropic_body())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_paths_and_methods() {
        assert_eq!(route("GET", "/health").ok(), Some(Route::Health));
        assert_eq!(
            route("POST", "/v1/messages").ok(),
            Some(Route::Forward { json_body: true })
        );
        assert_eq!(
            route("GET", "/v1/models/claude-x").ok(),
            Some(Route::Forward { json_body: false })
        );
        assert_eq!(route("GET", "/v1/messages").expect_err("405").status(), 405);
        assert_eq!(
            route("GET", "/v1/models/a/b").expect_err("404").status(),
            404
        );
        assert_eq!(route("POST", "/nope").expect_err("404").status(), 404);
    }

    #[test]
    fn bodies_must_be_json_objects() {
        assert!(check_json_object(br#"{"model":"x","messages":[]}"#).is_ok());
        for bad in [&b""[..], b"[1]", b"{", b"\"s\"", b"{\"a\":\xff}", b"{} x"] {
            assert_eq!(check_json_object(bad).expect_err("bad").status(), 400);
        }
        let deep = "[".repeat(100_000);
        assert!(check_json_object(format!("{{\"a\":{deep}").as_bytes()).is_err());
    }
}
