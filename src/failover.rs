//! The failover loop: pick an account, get it a usable credential, forward through its
//! processor (an OAuth 401 refreshes and retries once), classify the answer (a success, the
//! client's own error, the account's failure with its cooldown signal, or a ban, which a probe
//! must confirm before the account is disabled), and move on to the next while attempts and
//! time allow. Nothing here runs once the first byte has gone downstream.

use std::time::{Duration, Instant};

use crate::accounts::cooldown::Signal;
use crate::accounts::sticky;
use crate::accounts::{Ask, Entry, Pick, Queued, Unavailable};
use crate::anthropic;
use crate::config::Credential;
use crate::error::ApiError;
use crate::gateway::{Gateway, Settings};
use crate::http::Request;
use crate::probe::{self, Verdict};
use crate::processor::{ApiKey, OAuth};
use crate::quota::{self, Family, Overage, Reading};
use crate::refresh::Need;
use crate::scrub::Scrub;
use crate::secret::Secret;
use crate::store;
use crate::upstream::{Answer, UpstreamError};

/// What the loop did, for the access log: how many attempts, and the last account tried (id,
/// name).
#[derive(Default)]
pub struct Attempts {
    pub count: u32,
    pub last: Option<(String, String)>,
    /// The attempts that did not serve, in order.
    pub tried: Vec<crate::access::Tried>,
    /// The model asked for, which a model-scoped quota window belongs to.
    pub model: Option<String>,
}

/// Tries accounts for `req` until one answers; returns the answer and the account it came
/// from (none for the buffered answer of an account that already failed over).
pub fn run(
    gw: &Gateway,
    req: &Request,
    sticky_key: Option<sticky::Key<'_>>,
    attempts: &mut Attempts,
) -> Result<(Answer, Option<Pick>), ApiError> {
    // Until the first byte goes downstream, an account's failure moves the request to the
    // next; attempts and time are bounded. If none is left, the client gets the last
    // account's answer, or why no account could be used.
    let settings = gw.accounts.settings();
    let started = Instant::now();
    let mut tried: Vec<String> = Vec::new();
    let mut fallback: Option<Result<Answer, ApiError>> = None;
    // A refused thinking signature is retried once (`resign`): on this pick, with `request`
    // changed.
    let mut changed: Option<Request> = None;
    let mut again: Option<Pick> = None;
    let mut resigned = false;
    // A place in an account's queue while every account's slots are taken.
    let mut queued: Option<Queued> = None;
    loop {
        let request = changed.as_ref().unwrap_or(req);
        let out_of_budget = tried.len() as u32 >= settings.max_attempts
            || (!tried.is_empty() && started.elapsed() >= settings.failover_timeout);
        // Read before the pick: a slot freed after it wakes the wait below.
        let seen = gw.accounts.ended();
        let picked = match again.take() {
            Some(pick) => Ok(pick),
            None if out_of_budget => Err(Unavailable::None("attempts exhausted".into())),
            None => gw.accounts.pick(&Ask {
                tried: &tried,
                sticky: sticky_key,
                model: attempts.model.as_deref(),
                body_len: request.body.len(),
                only: None,
                ticket: queued.as_ref().map(Queued::number),
            }),
        };
        let pick = match (picked, fallback.take()) {
            (Err(Unavailable::Full(entry)), fallback_) => {
                fallback = fallback_;
                gw.accounts
                    .wait(&entry, &mut queued, seen, crate::watch::client_left)?;
                continue;
            }
            (Ok(pick), _) => {
                // Served: its place in a queue goes at once, not when the answer comes.
                queued = None;
                pick
            }
            (Err(resting @ Unavailable::Resting { .. }), _) => return Err(resting.into()),
            (Err(_), Some(Ok(answer))) => return Ok((answer, None)),
            (Err(_), Some(Err(error))) => return Err(error),
            (Err(none), None) => return Err(none.into()),
        };
        if let Some((id, left)) = &attempts.last
            && id != pick.entry.id()
        {
            // Another account takes over from the one that could not serve.
            gw.metrics.failover(left);
        }
        attempts.last = Some((pick.entry.id().to_string(), pick.entry.account.name.clone()));
        attempts.count += 1;
        debug!(
            "attempt {} on account {} ({})",
            attempts.count,
            pick.entry.id(),
            pick.entry.account.name
        );
        let attempt_started = Instant::now();
        let step = attempt(gw, request, &pick.entry, attempts.model.as_deref());
        gw.metrics.attempt(&pick.entry.account.name, outcome(&step));
        let tried_now = |why: String, status: Option<u16>| crate::access::Tried {
            account: pick.entry.id().to_string(),
            status,
            ms: (attempt_started.elapsed().as_secs_f64() * 1e4).round() / 10.0,
            why,
        };
        match step? {
            Step::Done(answer) => {
                debug!("account {} answers {}", pick.entry.id(), answer.status());
                return Ok((answer, Some(pick)));
            }
            Step::Resign(answer) if !resigned => {
                resigned = true;
                attempts
                    .tried
                    .push(tried_now("a thinking signature refused".into(), Some(400)));
                match resign(gw, request, sticky_key, &pick, attempts.model.as_deref()) {
                    Resign::Home(home) => again = Some(home),
                    Resign::Stripped(body) => {
                        changed = Some(with_body(req, body));
                        again = Some(pick);
                    }
                    Resign::Cannot => return Ok((answer, Some(pick))),
                }
            }
            Step::Resign(answer) => return Ok((answer, Some(pick))),
            Step::Next(why) => {
                let what = match &why {
                    Ok(answer) => format!("its {}", answer.status()),
                    Err(error) => error.to_string(),
                };
                debug!(
                    "account {} cannot serve it ({what}); trying the next",
                    pick.entry.id()
                );
                let status = why.as_ref().ok().map(Answer::status);
                attempts.tried.push(tried_now(what, status));
                tried.push(pick.entry.id().to_string());
                fallback = Some(why);
            }
        }
    }
}

/// `req` with another body (method, target, headers and framing kept).
fn with_body(req: &Request, body: Vec<u8>) -> Request {
    Request {
        method: req.method.clone(),
        target: req.target.clone(),
        minor_version: req.minor_version,
        headers: req.headers.clone(),
        body,
        keep_alive: req.keep_alive,
    }
}

/// Where a request whose thinking signature was refused goes once more.
enum Resign {
    /// To the account its conversation was pinned to before it moved, which signed it.
    Home(Pick),
    /// To the same account, with this body: the thinking blocks of its history removed.
    Stripped(Vec<u8>),
    /// Nowhere: the refusal stands.
    Cannot,
}

/// A conversation that moved to another account carries thinking blocks the new account's
/// upstream cannot verify (400 "Invalid signature in thinking block"). It goes back to the
/// account it was pinned to before, when that one can serve it; else its history's thinking
/// blocks are removed (`anthropic::without_thinking`) and it is sent again where it is.
fn resign(
    gw: &Gateway,
    req: &Request,
    sticky_key: Option<sticky::Key<'_>>,
    pick: &Pick,
    model: Option<&str>,
) -> Resign {
    let home = sticky_key
        .and_then(|key| gw.accounts.previous_pin(key))
        .filter(|home| home != pick.entry.id());
    if let Some(home) = &home {
        let asked = gw.accounts.pick(&Ask {
            sticky: sticky_key,
            model,
            body_len: req.body.len(),
            only: Some(home),
            ticket: None,
            ..Ask::default()
        });
        if let Ok(home) = asked {
            info!(
                "account {}: a thinking signature refused; the conversation goes back to account {}, which signed it",
                pick.entry.id(),
                home.entry.id()
            );
            return Resign::Home(home);
        }
    }
    match crate::anthropic::without_thinking(&req.body) {
        Some(body) => {
            info!(
                "account {}: a thinking signature refused; sent again without the history's thinking blocks",
                pick.entry.id()
            );
            Resign::Stripped(body)
        }
        None => Resign::Cannot,
    }
}

/// How an attempt ended, as `llm_gateway_upstream_attempts_total` labels it.
fn outcome(step: &Result<Step, ApiError>) -> &'static str {
    match step {
        Ok(Step::Done(_)) => "answered",
        Ok(Step::Resign(_)) => "signature_refused",
        Ok(Step::Next(Ok(answer))) => match answer.status() {
            429 => "rate_limited",
            401 => "auth_failed",
            400 | 403 => "banned",
            _ => "upstream_error",
        },
        Ok(Step::Next(Err(_))) => "unreachable",
        Err(_) => "refused",
    }
}

/// What one account made of the request.
enum Step {
    /// An answer to relay.
    Done(Answer),
    /// The upstream refused a thinking block's signature: the request is retried once
    /// (`resign`), else this answer is relayed.
    Resign(Answer),
    /// This account cannot serve it; try another. Carries what the client gets if none can.
    Next(Result<Answer, ApiError>),
}

fn attempt(
    gw: &Gateway,
    req: &Request,
    entry: &Entry,
    model: Option<&str>,
) -> Result<Step, ApiError> {
    // A ban left unsettled is settled before the account serves again.
    let suspected = entry.view().suspected_ban;
    if let Some(ban) = suspected
        && confirm_ban(gw, entry, &ban) != Verdict::Refuted
    {
        return Ok(Step::Next(Err(ApiError::NoAccount(format!(
            "account {} ({}): {}",
            entry.id(),
            entry.account.name,
            ban.reason
        )))));
    }
    let sent_at = Instant::now();
    let reading;
    let answer = match send(gw, req, entry) {
        Ok(answer) => {
            // Every answer says how much of the account's quota is used, 429s included.
            let now = crate::time::now_unix();
            reading = Reading::from_headers(|n| answer.header(n), now);
            if let Some(reading) = &reading {
                gw.accounts.observe_quota(entry, reading.clone(), model);
            }
            gw.metrics.upstream_latency.observe(sent_at.elapsed());
            (gw.metrics.account_upstream_latency).observe(&entry.account.name, sent_at.elapsed());
            answer
        }
        // The request itself cannot be sent (an invalid header): no account would do better.
        Err(Failed::Request(error)) => return Err(error),
        // The account has no usable credential now (login needed, refresh failing).
        Err(Failed::Account(error)) => return Ok(Step::Next(Err(error))),
        Err(Failed::Upstream(error)) => {
            gw.accounts
                .record(entry, Signal::Failure(error.to_string()));
            return Ok(Step::Next(Err(error)));
        }
    };
    let status = answer.status();
    if status < 400 {
        return Ok(match answer.settle() {
            Ok(answer) => {
                gw.accounts.record(entry, Signal::Success);
                overage(gw, entry, reading.as_ref());
                Step::Done(answer)
            }
            Err(error) => {
                gw.accounts
                    .record(entry, Signal::Failure(error.to_string()));
                Step::Next(Err(error.into()))
            }
        });
    }
    // Errors are small: read them, so they can be inspected and, if we move on, replayed.
    let answer = match answer.buffer() {
        Ok(answer) => answer,
        Err(error) => {
            gw.accounts
                .record(entry, Signal::Failure(error.to_string()));
            return Ok(Step::Next(Err(error.into())));
        }
    };
    let family = model.map_or(Family::Other, Family::of);
    if let Some(limit) = anthropic::plan_limit(status, answer.body(), family) {
        plan_limit(gw, entry, limit, reading.as_ref(), req.body.len());
        return Ok(Step::Next(Ok(answer)));
    }
    if status == 429 && reading.as_ref().is_some_and(Reading::only_scoped_rejected) {
        // Its readings (kept above) rest the account for this model family alone.
        info!(
            "account {}: its {} weekly limit is reached; other models go on using it",
            entry.id(),
            family.as_str()
        );
        return Ok(Step::Next(Ok(answer)));
    }
    let signal = match status {
        429 => Signal::RateLimited {
            retry_after: answer.header("retry-after").and_then(parse_retry_after),
            unified_reset: unified_reset(&answer),
        },
        401 => Signal::AuthFailed,
        500 | 502 | 503 | 504 | 529 => Signal::Failure(format!("{status} from upstream")),
        400 if anthropic::invalid_signature(status, answer.body()) => {
            return Ok(Step::Resign(answer));
        }
        400 | 403 => {
            return Ok(
                match anthropic::ban(status, answer.body(), entry.is_oauth()) {
                    // A ban the probe refutes was the request's doing: the client's own error.
                    Some(ban) if confirm_ban(gw, entry, &ban) != Verdict::Refuted => {
                        Step::Next(Ok(answer))
                    }
                    // The client's own mistake (invalid_request_error, …): never retried.
                    _ => Step::Done(answer),
                },
            );
        }
        // 404, 413 and the rest belong to the request, not the account.
        _ => return Ok(Step::Done(answer)),
    };
    gw.accounts.record(entry, signal);
    Ok(Step::Next(Ok(answer)))
}

/// With `overage: plan_only`, an answer served from extra usage rests the account until the
/// window it went past resets: traffic goes elsewhere, and no surprise bill follows.
fn overage(gw: &Gateway, entry: &Entry, reading: Option<&Reading>) {
    let settings = gw.accounts.settings();
    if settings.policy(&entry.account).overage != Overage::PlanOnly {
        return;
    }
    if let Some(until) = reading.and_then(Reading::in_overage) {
        let why = "served from extra usage, and its overage is plan_only".to_string();
        gw.accounts.record(entry, Signal::PlanLimit { until, why });
    }
}

/// A plan-limit refusal: the account's limit, with the cooldown it calls for.
fn plan_limit(
    gw: &Gateway,
    entry: &Entry,
    limit: anthropic::PlanLimit,
    reading: Option<&Reading>,
    body_len: usize,
) {
    let now = crate::time::now_unix();
    let until = reading.and_then(Reading::limit_reset).filter(|u| *u > now);
    let why = match limit {
        anthropic::PlanLimit::LongContext => {
            let until = until.unwrap_or(now + gw.accounts.settings().plan_limit_cooldown.as_secs());
            info!(
                "account {}: long context needs extra usage it lacks; requests of {body_len} bytes or more go elsewhere until {}",
                entry.id(),
                crate::time::rfc3339(until)
            );
            entry.rest_long_context(body_len, until);
            return;
        }
        anthropic::PlanLimit::FamilyWeekly(family) => {
            info!(
                "account {}: its {} weekly limit is reached; other models go on using it",
                entry.id(),
                family.as_str()
            );
            entry.rest_family(family, now, until);
            return;
        }
        anthropic::PlanLimit::OutOfExtraUsage => "out of extra usage (400)",
        anthropic::PlanLimit::SpendCap => "the monthly spend cap is reached (429)",
    };
    gw.accounts.record(
        entry,
        Signal::PlanLimit {
            until,
            why: format!("plan limit: {why}"),
        },
    );
}

/// Probes an account that announced `ban` (or was left suspected of one) and acts on the
/// verdict: confirmed, the account is disabled for good; inconclusive, it rests like an
/// ejection and stays suspected; refuted, it is back in service, untouched. One probe of an
/// account runs at a time; a request that finds one running moves on without it.
fn confirm_ban(gw: &Gateway, entry: &Entry, ban: &anthropic::Ban) -> Verdict {
    let Some(_probing) = entry.start_probe() else {
        return Verdict::Inconclusive("another request is probing the account".into());
    };
    let probed = probe::account(
        &gw.upstream(),
        &gw.refresher,
        entry,
        &gw.live().system_prompt,
    );
    let verdict = probe::verdict(&probed, ban, entry.is_oauth());
    let kind = ban.error_type.as_deref().unwrap_or("no error type");
    let account = format!("account {} ({})", entry.id(), entry.account.name);
    match &verdict {
        Verdict::Confirmed => {
            error!(
                "{account} disabled: the upstream says \"{}\" ({kind}), and its probe confirms it",
                ban.reason
            );
            entry.suspect_ban(None);
            disable(gw, entry, ban.reason);
        }
        Verdict::Inconclusive(why) => {
            warn!(
                "{account}: the upstream says \"{}\" ({kind}), unconfirmed: {why}",
                ban.reason
            );
            entry.suspect_ban(Some(ban.clone()));
            let reason = format!(
                "the upstream said \"{}\" and {why}; probed again when this rest ends",
                ban.reason
            );
            gw.accounts.record(entry, Signal::SuspectedBan(reason));
        }
        Verdict::Refuted => {
            info!(
                "{account}: the upstream said \"{}\" ({kind}), but the account answers: the request's error, not a ban",
                ban.reason
            );
            entry.suspect_ban(None);
        }
    }
    verdict
}

/// Why `send` produced no answer.
enum Failed {
    Request(ApiError),
    Account(ApiError),
    Upstream(ApiError),
}

/// Sends the request with `entry`'s credential. An OAuth token refused with 401 is refreshed
/// once and the request sent once more.
fn send(gw: &Gateway, req: &Request, entry: &Entry) -> Result<Answer, Failed> {
    let upstream = gw.upstream();
    let forward = |processor: &dyn crate::processor::Processor, scrub: Scrub| {
        upstream
            .forward(req, processor, entry.egress())
            .map(|response| Answer::new(response, scrub))
            .map_err(|e| match e {
                UpstreamError::Unreachable(_)
                | UpstreamError::Timeout(_)
                | UpstreamError::Garbled(_) => Failed::Upstream(e.into()),
                // Every account shares the upstream's address: another would be refused the
                // same way, and the account is not at fault.
                UpstreamError::Untrusted(_) | UpstreamError::Unsendable(_) => {
                    Failed::Request(e.into())
                }
            })
    };
    match &entry.account.credential {
        Credential::ApiKey(key) => forward(&ApiKey(key), Scrub::new([key.expose()])),
        Credential::OAuth(oauth) => {
            // What an answer must not echo: the token it carried, the refresh token and the
            // client secret (the upstream never sees the last two, but nothing of ours goes
            // out that the gateway could have kept in).
            let scrub = |tokens: &crate::config::Tokens| {
                let secret = oauth.client_secret.as_ref().map(Secret::expose);
                Scrub::new(
                    [tokens.access.expose(), tokens.refresh.expose()]
                        .into_iter()
                        .chain(secret),
                )
            };
            let tokens = gw.refresher.ensure(entry, Need::Expired).map_err(|e| {
                let why = format!("account {} ({}): {e}", entry.id(), entry.account.name);
                Failed::Account(ApiError::NoAccount(why))
            })?;
            // A token stored before tokens were checked (or by another instance) that no
            // header can carry is the account's problem, never a 400 for the client.
            if let Some(why) = crate::oauth::unsendable(tokens.access.expose()) {
                let why = format!(
                    "account {} ({}): its access token {why}",
                    entry.id(),
                    entry.account.name
                );
                return Err(Failed::Account(ApiError::NoAccount(why)));
            }
            let live = gw.live();
            let answer = forward(&oauth_processor(&live, &tokens.access), scrub(&tokens))?;
            if answer.status() != 401 {
                return Ok(answer);
            }
            // A token we believed valid was refused: refresh once and retry once.
            match gw
                .refresher
                .ensure(entry, Need::Rejected(tokens.access.clone()))
            {
                Ok(fresh) => forward(&oauth_processor(&live, &fresh.access), scrub(&fresh)),
                // Not an API key refused: the token could not be renewed now. The account
                // counts a failure (ejected by the usual rules), and a login needed shows as
                // such on the account.
                Err(e) => {
                    warn!("account {}: 401 and no fresh token: {e}", entry.id());
                    Err(Failed::Upstream(ApiError::NoAccount(format!(
                        "account {} ({}): its token was refused and {e}",
                        entry.id(),
                        entry.account.name
                    ))))
                }
            }
        }
        Credential::Unusable(why) => Err(Failed::Account(ApiError::NoAccount(why.clone()))),
    }
}

/// `retry-after` in seconds (Anthropic sends whole or fractional seconds).
fn parse_retry_after(value: &str) -> Option<Duration> {
    let secs: f64 = value.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
}

/// The unified rate-limit reset (Unix seconds), counted only when the unified status is
/// `rejected`: an `allowed_warning` reset is not a limit.
fn unified_reset(answer: &Answer) -> Option<u64> {
    let rejected = answer
        .header("anthropic-ratelimit-unified-status")
        .is_some_and(|s| s.trim() == "rejected");
    rejected
        .then(|| answer.header("anthropic-ratelimit-unified-reset"))
        .flatten()
        .and_then(|v| v.trim().parse().ok())
        .map(|reset| quota::reset_at(reset, crate::time::now_unix()))
}

fn oauth_processor<'a>(live: &'a Settings, token: &'a Secret) -> OAuth<'a> {
    OAuth {
        token,
        system_prompt: &live.system_prompt,
    }
}

/// Takes an account out of service for good: in memory at once, and in config.yaml.
fn disable(gw: &Gateway, entry: &Entry, reason: &str) {
    entry.disable(reason);
    gw.accounts.share_ban(entry, reason);
    if let Err(e) = store::disable_account(&gw.config_path, entry.id(), reason) {
        error!(
            "could not record that account {} is disabled: {e}",
            entry.id()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_values_parse() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after(" 1.5 "),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }
}
