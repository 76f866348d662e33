//! One content-free probe of an account: `GET /v1/models?limit=1` with the account's own
//! credential, through its processor, generating no tokens. `health-check` reports it; the
//! router asks it to confirm a ban before an account is disabled for good.

use std::time::Duration;

use crate::accounts::Entry;
use crate::anthropic;
use crate::config::Credential;
use crate::http::Request;
use crate::processor::{ApiKey, OAuth, Processor};
use crate::refresh::{Need, Refresher};
use crate::scrub::Scrub;
use crate::secret::Secret;
use crate::upstream::{Upstream, UpstreamError, Via};

/// What of a probe's answer is kept: its status and (a bounded start of) its body.
#[derive(Debug)]
pub struct Probed {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Why a probe got no answer.
#[derive(Debug)]
pub enum ProbeError {
    /// The account has no credential to probe with now (a login needed, a refresh failing,
    /// an unset environment variable).
    Account(String),
    /// The upstream could not be asked.
    Upstream(UpstreamError),
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeError::Account(why) => f.write_str(why),
            ProbeError::Upstream(e) => e.fmt(f),
        }
    }
}

/// An error body is read this far, no more.
const MAX_BODY: u64 = 64 * 1024;
/// A probe's whole exchange, body included: an upstream that hangs is inconclusive soon,
/// rather than after the read timeout meant for long generations.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// Probes `entry` upstream. An OAuth account's token is refreshed first when it has expired,
/// and once more when the probe's answer is a 401 (as a request's would be).
pub fn account(
    upstream: &Upstream,
    refresher: &Refresher,
    entry: &Entry,
    system_prompt: &str,
) -> Result<Probed, ProbeError> {
    let request = Request {
        method: "GET".into(),
        target: "/v1/models?limit=1".into(),
        minor_version: 1,
        headers: Vec::new(),
        body: Vec::new(),
        keep_alive: true,
    };
    // The body is shown by health-check: nothing of the credential it was sent with stays.
    let send = |processor: &dyn Processor, secret: &Secret| {
        let response = (upstream.forward(
            &request,
            processor,
            Via {
                within: Some(PROBE_TIMEOUT),
                ..entry.egress()
            },
        ))
        .map_err(ProbeError::Upstream)?;
        let status = response.status().as_u16();
        let mut body = (response.into_body().into_with_config())
            .limit(MAX_BODY)
            .read_to_vec()
            .unwrap_or_default();
        Scrub::new([secret.expose()]).bytes(&mut body);
        Ok(Probed { status, body })
    };
    let fresh = |need: Need| {
        refresher
            .ensure(entry, need)
            .map_err(|e| ProbeError::Account(e.to_string()))
    };
    match &entry.account.credential {
        Credential::ApiKey(key) => send(&ApiKey(key), key),
        Credential::OAuth(_) => {
            let tokens = fresh(Need::Expired)?;
            let oauth = |token| OAuth {
                token,
                system_prompt,
            };
            let probed = send(&oauth(&tokens.access), &tokens.access)?;
            if probed.status != 401 {
                return Ok(probed);
            }
            let fresh = fresh(Need::Rejected(tokens.access.clone()))?;
            send(&oauth(&fresh.access), &fresh.access)
        }
        Credential::Unusable(why) => Err(ProbeError::Account(why.clone())),
    }
}

/// What a probe says of a ban the upstream announced.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The account answers: the ban answer was the request's doing.
    Refuted,
    /// The same ban, or the credential refused (401/403).
    Confirmed,
    /// Nothing either way (429, 5xx, no connection): what was seen, for the rest's reason.
    Inconclusive(String),
}

/// Judges a probe of an account that answered with `ban`.
pub fn verdict(probed: &Result<Probed, ProbeError>, ban: &anthropic::Ban, oauth: bool) -> Verdict {
    match probed {
        Ok(p) if (200..300).contains(&p.status) => Verdict::Refuted,
        Ok(p) if matches!(p.status, 401 | 403) => Verdict::Confirmed,
        Ok(p)
            if anthropic::ban(p.status, &p.body, oauth).is_some_and(|b| b.reason == ban.reason) =>
        {
            Verdict::Confirmed
        }
        Ok(p) => Verdict::Inconclusive(format!("the probe answered {}", p.status)),
        Err(e) => Verdict::Inconclusive(format!("the probe failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probed(status: u16, body: &str) -> Result<Probed, ProbeError> {
        Ok(Probed {
            status,
            body: body.as_bytes().to_vec(),
        })
    }

    #[test]
    fn verdicts_follow_the_probes_answer() {
        let disabled = r#"{"error":{"type":"invalid_request_error","message":"This organization has been disabled."}}"#;
        let ban = anthropic::ban(400, disabled.as_bytes(), false).expect("a ban");
        assert_eq!(verdict(&probed(200, "{}"), &ban, false), Verdict::Refuted);
        assert_eq!(verdict(&probed(401, "{}"), &ban, false), Verdict::Confirmed);
        assert_eq!(verdict(&probed(403, ""), &ban, false), Verdict::Confirmed);
        assert_eq!(
            verdict(&probed(400, disabled), &ban, false),
            Verdict::Confirmed
        );
        for status in [400, 429, 500, 529] {
            assert!(matches!(
                verdict(&probed(status, "{}"), &ban, false),
                Verdict::Inconclusive(_)
            ));
        }
        let timeout = Err(ProbeError::Upstream(UpstreamError::Timeout(
            "no answer".into(),
        )));
        assert!(matches!(
            verdict(&timeout, &ban, false),
            Verdict::Inconclusive(_)
        ));
    }
}
