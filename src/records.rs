//! After a request: its ledger record (priced with the settings it was admitted under), its
//! metrics, its access line, its place in the dashboard's recent trouble, and what a request
//! cut short is charged.

use std::time::Instant;

use crate::access::{AccessLine, Names};
use crate::anthropic;
use crate::gateway::Gateway;
use crate::http::Request;
use crate::limits::Charge;
use crate::metrics::Observation;
use crate::pricing::Cost;
use crate::relay::{Meter, Outcome};
use crate::usage::Record;

/// After a request: the ledger record, the metrics, the access log line.
#[allow(clippy::too_many_arguments)]
pub(crate) fn account_for(
    gw: &Gateway,
    req: &Request,
    request_id: &str,
    started: Instant,
    status: u16,
    outcome: &Outcome,
    meter: &Meter,
    names: &Names,
    settled: bool,
) {
    let error = match outcome {
        Outcome::Complete => names.error.clone(),
        Outcome::UpstreamBroke(why) => Some(format!("upstream broke: {why}")),
        Outcome::ClientGone => Some("client went away".into()),
        Outcome::UpstreamError { kind, message } => Some(format!(
            "upstream error event in the stream: {kind}: {message}"
        )),
    };
    // The ledger and metrics count an error that came inside a 200 stream as its status.
    let counted = match outcome {
        Outcome::UpstreamError { kind, .. } => anthropic::status_of_error_type(kind),
        _ => status,
    };
    if !settled {
        record_usage(gw, names, counted, meter, error.clone());
    }
    // Forwarded requests only: probes, scrapes, scanners and the dashboard itself would
    // crowd out the failures that matter; a client that hung up is not trouble.
    let forwarded = names.client_id.is_some() && !matches!(outcome, Outcome::ClientGone);
    let skip = !forwarded
        || ["/dashboard", "/admin/api/"]
            .iter()
            .any(|p| req.path().starts_with(p));
    if !skip && (counted >= 400 || error.is_some() || !names.tried.is_empty()) {
        note_trouble(gw, request_id, req.path(), counted, error.as_deref(), names);
    }
    let cost = priced_with(gw, names).cost(names.model.as_deref(), &meter.usage, meter.charged);
    if names.client_id.is_some() {
        gw.metrics.observe(&Observation {
            status: counted,
            account: &names.account,
            model: names.model.as_deref(),
            usage: meter.usage,
            cost: cost.nano(),
        });
        if let Some(first) = meter.first_byte {
            gw.metrics.time_to_first_token.observe(first - started);
            if names.account_id.is_some() {
                (gw.metrics.account_time_to_first_token).observe(&names.account, first - started);
            }
        }
    }
    if gw.live().access_log {
        let line = AccessLine {
            request_id,
            method: Some(&req.method),
            path: Some(req.path()),
            started,
            status,
            error: error.as_deref(),
            cost,
        };
        gw.access.write(&line.render(names, meter));
    }
}

/// Charges a request cut short at least `estimated`: the tokens it reserved (the missing ones
/// counted as output, which is what a cut stream loses), and at least the dollars.
pub(crate) fn charge_at_least(gw: &Gateway, names: &Names, meter: &mut Meter, estimated: Charge) {
    let seen = meter.usage.total();
    if seen < estimated.tokens {
        if seen == 0 {
            meter.usage.input = estimated.tokens;
        } else {
            meter.usage.output = meter.usage.output.saturating_add(estimated.tokens - seen);
        }
    }
    let measured = priced_with(gw, names).cost(names.model.as_deref(), &meter.usage, None);
    meter.charged = match (measured.nano(), estimated.nano) {
        (Some(m), Some(r)) => Some(m.max(r)),
        (m, r) => m.or(r),
    };
}

/// The settings a request is priced with: those in force when it was admitted.
fn priced_with(gw: &Gateway, names: &Names) -> std::sync::Arc<crate::gateway::Settings> {
    names.priced_with.clone().unwrap_or_else(|| gw.live())
}

/// Keeps a request that failed or failed over for the dashboard's recent trouble.
fn note_trouble(
    gw: &Gateway,
    request_id: &str,
    path: &str,
    status: u16,
    error: Option<&str>,
    names: &Names,
) {
    use crate::dashboard::cut;
    let accounts = gw.accounts.snapshot();
    let name = |id: &str| {
        (accounts.iter().find(|e| e.id() == id))
            .map_or_else(|| id.to_string(), |e| e.account.name.clone())
    };
    let failover = (names.tried.iter())
        .map(|t| {
            let status = t
                .status
                .map_or_else(|| "no answer".to_string(), |s| s.to_string());
            cut(&format!("{} ({status}): {}", name(&t.account), t.why), 200)
        })
        .collect();
    gw.trouble.note(crate::dashboard::Trouble {
        time: crate::time::rfc3339(crate::time::now_unix()),
        request_id: request_id.to_string(),
        path: cut(path, 100),
        client: names.client.clone(),
        account: names.account.clone(),
        model: names.model.clone(),
        status,
        error: error.map(|e| cut(e, 300)),
        failover,
    });
}

/// Records a request in the ledger; only what an authenticated client asked for goes there.
pub(crate) fn record_usage(
    gw: &Gateway,
    names: &Names,
    status: u16,
    meter: &Meter,
    error: Option<String>,
) {
    if let (Some(ledger), Some(key)) = (&gw.ledger, &names.client_id) {
        let cost = priced_with(gw, names).cost(names.model.as_deref(), &meter.usage, meter.charged);
        ledger.record(&Record {
            t: crate::time::now_unix(),
            key: key.clone(),
            account: names.account_id.clone().unwrap_or_else(|| "-".into()),
            model: names.model.clone().unwrap_or_else(|| "-".into()),
            status,
            usage: meter.usage,
            cost: cost.nano(),
            estimated: matches!(
                cost,
                Cost::Priced {
                    estimated: true,
                    ..
                }
            ),
            error,
        });
    }
}
