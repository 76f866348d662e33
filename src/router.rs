//! Routing of one downstream request: match the path, authenticate the client and admit it
//! under its limits from the head, read and check the body, shape it for the upstream, hand it
//! to `failover` (which tries accounts until one answers), relay the answer, and account for
//! it (ledger, metrics, access log).

use std::time::Instant;

use crate::access::{AccessLine, Names, request_id, request_id_from};
use crate::accounts::Pick;
use crate::accounts::cooldown::Signal;
use crate::accounts::sticky;
use crate::auth::Client;
use crate::error::ApiError;
use crate::failover;
use crate::gateway::Gateway;
use crate::http::{Conn, Request};
use crate::limits::{Estimate, Limiter, Permit};
use crate::openai::{self, Format};
use crate::pricing::Cost;
use crate::relay::{self, Meter, Outcome, Shape};
use crate::respond::{Head, Responder};
use crate::route::{Route, check_query, route};
use crate::status;
use crate::upstream::Answer;

const JSON: &str = "application/json";

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Main,
    /// The admin listener on a loopback address: status and metrics without a key.
    AdminLoopback,
    /// The admin listener on any other address: status and metrics need an admin key, as on
    /// the main listener (anyone who can reach the address could read them otherwise).
    AdminKeyed,
}

/// Serves one request on `conn`. Nothing is forwarded from an admin listener. Returns whether
/// the connection may serve another.
pub fn handle(gw: &Gateway, mut req: Request, conn: &mut Conn, listener: Listener) -> bool {
    let started = Instant::now();
    let request_id = request_id(&req);
    let mut names = Names::default();
    learn_client(gw, &req, conn.peer, &mut names);
    // A wait for a slot (a key's or an account's queue) notices a client that leaves.
    let _serving = crate::watch::serving(&conn.socket());
    let _in_flight = gw.metrics.in_flight();
    let mut meter = Meter::default();
    // The head decides first (route, key, limits); only an admitted request's body is read.
    let served = match admit(gw, &req, listener, &mut names) {
        Ok(Admitted::Local(served)) => Ok(served),
        Ok(Admitted::Forward(admitted)) => {
            let limits = gw.live().limits;
            match conn.read_body(&mut req, &limits) {
                Ok(()) => serve(gw, &req, admitted, &mut names),
                Err(e) => match e.answer(limits.max_body) {
                    Some((status, message)) => Err(ApiError::Http { status, message }),
                    // The client went away: nobody to answer.
                    None => return false,
                },
            }
        }
        Err(error) => Err(error),
    };
    // An answer given without reading the whole body leaves the rest on the wire, unless it
    // is all here already.
    conn.skip_arrived_body();
    let unread = conn.body_unread();
    let out = conn
        .respond(req.minor_version, req.keep_alive && !unread)
        .with_request_id(&request_id);
    // The key's concurrency slot and budget reservation, given back once the answer is
    // relayed and metered (or settled just before its end).
    let mut permit = None;
    let mut settled = false;
    let (status, outcome, keep) = match served {
        Ok(Served::Local(status, body, content_type)) => {
            let mut head = Head::new(status);
            head.header("content-type", content_type.as_bytes());
            let keep = out.send(head, body.as_bytes());
            (status, Outcome::Complete, keep)
        }
        Ok(Served::Page(page)) => {
            let mut head = Head::new(page.status);
            head.header("content-type", page.content_type.as_bytes());
            for (name, value) in crate::dashboard::HEADERS {
                head.header(name, value.as_bytes());
            }
            if let Some(cookie) = &page.cookie {
                head.header("set-cookie", cookie.as_bytes());
            }
            let keep = out.send(head, &page.body);
            (page.status, Outcome::Complete, keep)
        }
        Ok(Served::Upstream(answer, pick, shape, held)) => {
            permit = Some(held);
            // A stream can last minutes; the request body (often hundreds of KiB) is not
            // needed for it.
            req.body = Vec::new();
            let status = answer.status();
            let max_event = gw.upstream().max_event();
            // A whole answer is charged, and its reservation and slot given back, just before
            // its last bytes go out: a client that sends its next request the moment it has
            // read this answer finds the tokens spent and nothing held.
            let mut settle = |m: &Meter| {
                crate::records::record_usage(gw, &names, status, m, None);
                permit = None;
                settled = true;
            };
            let relayed = relay::relay(answer, out, &shape, &mut meter, max_event, &mut settle);
            let (outcome, keep) = match relayed {
                Ok(relayed) => relayed,
                Err((error, out)) => {
                    let keep = send_error(out, &ApiError::from(error.clone()), names.format);
                    (Outcome::UpstreamBroke(error.to_string()), keep)
                }
            };
            // An answer cut short (the client hung up, the upstream broke) may have cost more
            // than was seen of it: a budgeted key is charged at least what it reserved, so
            // hanging up before the end is no way around a budget.
            if !settled
                && !matches!(outcome, Outcome::Complete)
                && status < 300
                && let Some(estimated) = permit.as_ref().and_then(Permit::estimated)
            {
                crate::records::charge_at_least(gw, &names, &mut meter, estimated);
            }
            // After the first byte nothing is retried, but the account's failure counts.
            if let Some(pick) = &pick
                && let Some(signal) = stream_signal(&outcome)
            {
                gw.accounts.record(&pick.entry, signal);
            }
            (status, outcome, keep)
        }
        Err(error) => {
            let status = error.status();
            names.error = Some(error.to_string());
            let keep = send_error(out, &error, names.format);
            (status, Outcome::Complete, keep)
        }
    };
    if unread {
        conn.linger();
    }
    crate::records::account_for(
        gw,
        &req,
        &request_id,
        started,
        status,
        &outcome,
        &meter,
        &names,
        settled,
    );
    // Recorded in the ledger first, so a budget check never sees neither the reservation nor
    // the tokens.
    drop(permit);
    keep && !unread
}

/// What a stream's end says of its account: a break or an overload is its failure, a rate
/// limit its 429 (with no reset, so the backoff applies); the rest is the request's.
fn stream_signal(outcome: &Outcome) -> Option<Signal> {
    match outcome {
        Outcome::UpstreamBroke(why) => Some(Signal::Failure(format!("stream broke: {why}"))),
        Outcome::UpstreamError { kind, .. } => match kind.as_str() {
            "overloaded_error" | "api_error" => {
                Some(Signal::Failure(format!("{kind} event in the stream")))
            }
            "rate_limit_error" => Some(Signal::RateLimited {
                retry_after: None,
                unified_reset: None,
            }),
            _ => None,
        },
        Outcome::Complete | Outcome::ClientGone => None,
    }
}

/// Answers a request that could not be read whole (too large, too slow, malformed) and logs
/// it: its id and line come from what of its head was read, if anything.
pub fn refuse_unread(gw: &Gateway, conn: &mut Conn, error: &ApiError) {
    let started = Instant::now();
    let head = conn.last_head().cloned();
    let request_id = request_id_from(head.as_ref().and_then(|h| h.request_id.as_deref()));
    // The head was read, so its path says which API's error shape the client understands.
    // Only the peer is known here: the headers were not kept.
    let address = crate::access::client_address(conn.peer, &[], &gw.live().trusted_proxies);
    let mut names = Names {
        address: address.map(|a| a.to_string()),
        ..Names::default()
    };
    if head.as_ref().is_some_and(|h| is_chat_path(&h.path)) {
        names.format = Format::OpenAI;
    }
    send_error(
        conn.respond(1, false).with_request_id(&request_id),
        error,
        names.format,
    );
    if gw.live().access_log {
        let (method, path) = head.map_or((None, None), |h| (Some(h.method), Some(h.path)));
        let line = AccessLine {
            request_id: &request_id,
            method: method.as_deref(),
            path: path.as_deref(),
            started,
            status: error.status(),
            error: Some(&error.to_string()),
            cost: Cost::Priced {
                nano: 0,
                estimated: false,
            },
        };
        gw.access.write(&line.render(&names, &Meter::default()));
    }
}

/// The OpenAI paths (Chat Completions, Responses): their clients get OpenAI's error shape.
fn is_chat_path(path: &str) -> bool {
    matches!(path, "/v1/chat/completions" | "/chat/completions")
        || ["/v1/responses", "/responses"].iter().any(|p| {
            path.strip_prefix(p)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
}

enum Served {
    /// A small answer made here, with its content type.
    Local(u16, String, &'static str),
    /// A dashboard answer: under its security headers, maybe setting the session cookie.
    Page(crate::dashboard::routes::Page),
    /// An upstream answer, with the account it came from (held in flight while relayed;
    /// none for the buffered answer of an account that already failed over), and the shape
    /// the client wants it in.
    Upstream(Answer, Option<Box<Pick>>, Shape, Permit),
}

/// What the head alone decided.
enum Admitted {
    /// Answered here (health, readiness, status, metrics).
    Local(Served),
    /// An authenticated client, admitted under its limits, for a route that is forwarded.
    Forward(Forward),
}

struct Forward {
    route: Route,
    client: Client,
    /// The key's concurrency slot, held until the answer has been relayed.
    permit: Permit,
}

/// Decides from the head alone: the route, the client's key, and the key's budgets, rate and
/// concurrency. Nothing here needs the body, so a refusal never waits for one.
fn admit(
    gw: &Gateway,
    req: &Request,
    listener: Listener,
    names: &mut Names,
) -> Result<Admitted, ApiError> {
    // The caller's format, as far as the path and headers tell, before anything can fail.
    let path = req.path();
    if is_chat_path(path)
        || (path.starts_with("/v1/models") && req.header("anthropic-version").is_none())
    {
        names.format = Format::OpenAI;
    }
    let route = route(&req.method, path)?;
    check_query(&req.target)?;
    match route {
        Route::Health => {
            return Ok(Admitted::Local(Served::Local(
                200,
                r#"{"status":"ok"}"#.into(),
                JSON,
            )));
        }
        Route::Ready => return Ok(Admitted::Local(ready(gw))),
        Route::Status | Route::Metrics => {
            if !crate::dashboard::routes::keyless(listener, req) {
                let client = gw.clients.authenticate(req)?;
                if !client.admin {
                    return Err(ApiError::Forbidden(
                        "status and metrics need an admin key (add-client-key --admin) or the admin listener"
                            .into(),
                    ));
                }
            }
            return Ok(Admitted::Local(if route == Route::Metrics {
                let mut text = gw.metrics.render(&gw.accounts);
                gw.threads.render(&mut text);
                Served::Local(200, text, "text/plain; version=0.0.4; charset=utf-8")
            } else {
                Served::Local(200, status::render(gw).to_string(), JSON)
            }));
        }
        Route::Dashboard | Route::DashboardLogin | Route::DashboardLogout | Route::AdminApi => {
            let page = crate::dashboard::routes::serve(gw, req, route, listener, names)?;
            return Ok(Admitted::Local(Served::Page(page)));
        }
        Route::KeyUsage => {
            let caller = match crate::dashboard::routes::keyless(listener, req) {
                true => None,
                false => Some(gw.clients.authenticate(req)?),
            };
            let client = crate::key_usage::whose(gw, req, caller)?;
            names.client = client.name.clone();
            let report = crate::key_usage::render(gw, &client);
            return Ok(Admitted::Local(Served::Local(
                200,
                report.to_string(),
                JSON,
            )));
        }
        _ if listener != Listener::Main => {
            return Err(ApiError::NotFound(
                "the admin listener serves /health, /ready, /metrics, /admin/status and /gateway/usage only".into(),
            ));
        }
        _ => {}
    }
    let client = gw.clients.authenticate(req)?;
    names.client.clone_from(&client.name);
    names.client_id = Some(client.id.clone());
    let wait = gw.accounts.settings().queue_timeout;
    let permit = gw.limiter.admit(&client, gw.ledger.as_deref(), wait)?;
    Ok(Admitted::Forward(Forward {
        route,
        client,
        permit,
    }))
}

/// Serves an admitted request once its body is read: checks the body, shapes it for the
/// upstream, applies the key's model list, and runs the failover loop.
fn serve(
    gw: &Gateway,
    req: &Request,
    admitted: Forward,
    names: &mut Names,
) -> Result<Served, ApiError> {
    crate::supervise::inject("request");
    let Forward {
        route,
        client,
        mut permit,
    } = admitted;
    if !req.body.is_empty() {
        crate::shape::check_encoding(req)?;
        crate::json::check_text(&req.body).map_err(ApiError::BadRequest)?;
    }
    let (converted, shape) = crate::shape::shape_request(gw, req, route, &mut names.format)?;
    let req = converted.as_ref().unwrap_or(req);
    let session = match &shape {
        Shape::Responses(reply) => reply.session.as_deref(),
        _ => None,
    };
    let facts = sticky::facts(&req.body, session.or(req.header("x-session-id")));
    names.model = match &shape {
        Shape::Chat { model, .. } => Some(model.clone()),
        Shape::Responses(reply) => Some(reply.model.clone()),
        _ => facts.model,
    };
    let sticky_key = (facts.key)
        .filter(|_| shape.is_message())
        .map(|conversation| {
            sticky::Key::new(conversation, (!client.is_open()).then_some(&*client.id))
        });
    // A pass-through body the gateway cannot read its model from (none, a repeated field, a
    // field of the wrong type) would go unpriced and past every budget: refused.
    match names.model.as_deref() {
        None if matches!(route, Route::Messages { .. }) => {
            return Err(ApiError::BadRequest(
                "the request body must name its `model` once, as a string".into(),
            ));
        }
        Some(m) if m.len() > crate::shape::MAX_MODEL_NAME => {
            return Err(ApiError::BadRequest(format!(
                "`model` is longer than {} bytes",
                crate::shape::MAX_MODEL_NAME
            )));
        }
        _ => {}
    }
    Limiter::allow_model(&client, names.model.as_deref())?;
    let live = gw.live();
    names.priced_with = Some(std::sync::Arc::clone(&live));
    // What the request may cost, held against the key's budgets until it is metered: input
    // estimated at four bytes a token of its body, output up to its max_tokens, priced from
    // the table (counting tokens costs nothing).
    let (input, output) = (req.body.len() as u64 / 4, facts.max_tokens.unwrap_or(0));
    let estimate = Estimate {
        model: names.model.as_deref(),
        tokens: input.saturating_add(output),
        nano: match route {
            Route::Messages { count_tokens: true } => Some(0),
            _ => live.estimate(names.model.as_deref(), input, output),
        },
    };
    gw.limiter
        .reserve(&mut permit, &client, estimate, gw.ledger.as_deref())?;

    let mut attempts = failover::Attempts {
        model: names.model.clone(),
        ..Default::default()
    };
    let answered = failover::run(gw, req, sticky_key, &mut attempts);
    if let Some((id, name)) = attempts.last {
        names.account = name;
        names.account_id = Some(id);
    }
    names.attempts = attempts.count;
    // The attempts that failed, when there was failover (one attempt is its own story).
    if attempts.count > 1 {
        names.tried = attempts.tried;
    }
    let (answer, pick) = answered?;
    Ok(Served::Upstream(answer, pick.map(Box::new), shape, permit))
}

/// `/ready`: 503 when no account could serve now. With shared state it also says whether
/// Redis is reachable; an outage does not make the instance unready (it serves on its own
/// state, and a load balancer pulling every instance at once would be the larger outage).
fn ready(gw: &Gateway) -> Served {
    let failing = gw.threads.failing_for_ready();
    let available = gw.accounts.any_available();
    let ready = available && failing.is_empty();
    let mut body = if !failing.is_empty() {
        let reason = format!("threads keep dying: {}", failing.join(", "));
        serde_json::json!({"status": "not_ready", "reason": reason})
    } else if available {
        serde_json::json!({"status": "ready"})
    } else {
        serde_json::json!({"status": "not_ready", "reason": "no upstream account is available now"})
    };
    if let Some(shared) = gw.accounts.shared() {
        match shared.outage() {
            None => body["shared_state"] = "up".into(),
            Some(why) => {
                body["shared_state"] = "down".into();
                body["shared_state_error"] = why.into();
            }
        }
    }
    Served::Local(if ready { 200 } else { 503 }, body.to_string(), JSON)
}

/// The body must be one JSON object; returns the format it clearly belongs to, if any. One
/// pass over the body, without building a tree (see `openai::detect`).
pub fn body_format(body: &[u8]) -> Result<Option<Format>, ApiError> {
    if body.is_empty() {
        return Err(ApiError::BadRequest(
            "the request body is empty; expected a JSON object".into(),
        ));
    }
    let format = openai::detect(body)
        .map_err(|e| ApiError::BadRequest(format!("the request body is not valid JSON: {e}")))?;
    // The probe skips the values it does not look at without a depth limit; every later parse
    // stops at the same one, so every route refuses the same bodies, at once.
    if crate::json::nested_deeper_than(body, crate::json::MAX_DEPTH) {
        return Err(ApiError::BadRequest(format!(
            "the request body nests JSON deeper than {} levels",
            crate::json::MAX_DEPTH
        )));
    }
    Ok(format)
}

/// Who is asking, for the access line: the address (behind `server.trusted_proxies`, the
/// client they name) and the user agent, cut to 256 bytes at a character boundary.
fn learn_client(gw: &Gateway, req: &Request, peer: Option<std::net::IpAddr>, names: &mut Names) {
    names.peer = peer;
    let live = gw.live();
    // Only the access line reads them: no work on the request path when it is off.
    if !live.access_log {
        return;
    }
    let forwarded: Vec<&str> = (req.headers.iter())
        .filter(|(n, _)| n == "x-forwarded-for")
        .filter_map(|(_, v)| std::str::from_utf8(v).ok())
        .collect();
    names.address = crate::access::client_address(peer, &forwarded, &live.trusted_proxies)
        .map(|a| a.to_string());
    names.user_agent = req.header("user-agent").map(|ua| {
        let mut end = ua.len().min(256);
        while !ua.is_char_boundary(end) {
            end -= 1;
        }
        ua[..end].to_string()
    });
}

/// Sends `error` in the client's format. Returns whether the connection may be reused.
pub fn send_error(out: Responder<'_>, error: &ApiError, format: Format) -> bool {
    let mut head = Head::new(error.status());
    head.header("content-type", b"application/json");
    if let ApiError::MethodNotAllowed { allow } = error {
        head.header("allow", allow.as_bytes());
    }
    if let Some(secs) = error.retry_after() {
        head.header("retry-after", secs.to_string().as_bytes());
    }
    if error.hopeless() {
        head.header("x-should-retry", b"false");
    }
    let body = match format {
        Format::Anthropic => error.anthropic_body(),
        Format::OpenAI => error.openai_body(),
    };
    out.send(head, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_must_be_json_objects() {
        assert!(body_format(br#"{"model":"x","messages":[]}"#).is_ok());
        for bad in [&b""[..], b"[1]", b"{", b"\"s\"", b"{\"a\":\xff}", b"{} x"] {
            assert_eq!(body_format(bad).expect_err("bad").status(), 400);
        }
        let deep = "[".repeat(100_000);
        assert!(body_format(format!("{{\"a\":{deep}").as_bytes()).is_err());
    }
}
