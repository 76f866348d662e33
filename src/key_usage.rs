//! `GET /gateway/usage`: a key holder's own usage and cost for the current day, week (from
//! Monday) and month, UTC, and what is left of each of its budgets; the numbers
//! `llm-gateway usage --key NAME --since <that day>` prints. A key reads only its own; an
//! admin key (or the admin listener) may name any with `?key=NAME_OR_ID`.

use serde_json::{Value, json};

use crate::auth::Client;
use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::http::Request;
use crate::limits::Limiter;
use crate::pricing::usd;
use crate::usage::{first_day_of_month, monday_of, totals_json};

/// Whose usage `req` may read: its own key's, or (admin) the one it names.
pub fn whose(gw: &Gateway, req: &Request, caller: Option<Client>) -> Result<Client, ApiError> {
    let wanted = crate::route::query_value(&req.target, "key");
    match (caller, wanted) {
        (Some(c), None) if c.is_open() => Err(ApiError::Forbidden(
            "auth is open, so no key is asking: name one with ?key= on the admin listener".into(),
        )),
        (Some(c), None) => Ok(c),
        (Some(c), Some(w)) if !c.admin && w != c.id && w != c.name => Err(ApiError::Forbidden(
            "a gateway key reads only its own usage; an admin key may name another".into(),
        )),
        (_, Some(w)) => gw
            .clients
            .named(&w)
            .ok_or_else(|| ApiError::NotFound(format!("no gateway key named or numbered {w:?}"))),
        (None, None) => Err(ApiError::BadRequest(
            "name the key: /gateway/usage?key=NAME_OR_ID".into(),
        )),
    }
}

/// The report for `client`.
pub fn render(gw: &Gateway, client: &Client) -> Value {
    let Some(ledger) = gw.ledger.as_deref() else {
        return json!({
            "key": {"id": client.id, "name": client.name},
            "error": "the usage ledger is off (usage.enabled: false)",
        });
    };
    let now = crate::time::now_unix();
    let today = now / 86_400;
    let date = |day: u64| crate::time::rfc3339(day * 86_400)[..10].to_string();
    let periods_from = [
        ("day", today),
        ("week", monday_of(today)),
        ("month", first_day_of_month(now).0),
    ];
    // One read of the rows (a scan of Redis with shared state) for all three periods.
    let earliest = periods_from
        .iter()
        .map(|(_, from)| *from)
        .min()
        .unwrap_or(today);
    let (rows, shared) = ledger.day_rows(earliest, today);
    let mut periods = serde_json::Map::new();
    for (name, from) in periods_from {
        let mut totals = crate::usage::Totals::default();
        for (_, t) in rows.iter().filter(|(k, _)| k.1 == client.id && k.0 >= from) {
            totals.absorb(t);
        }
        let mut row = totals_json(&totals);
        row["since"] = json!(date(from));
        periods.insert(name.into(), row);
    }
    let budgets: Vec<Value> = Limiter::budgets_left(client, ledger)
        .into_iter()
        .map(|b| {
            let left = b.limit.saturating_sub(b.used);
            let resets = b.resets_at.map(crate::time::rfc3339);
            if b.name.ends_with("_usd") {
                json!({
                    "budget": b.name, "limit_usd": usd(b.limit, 9), "used_usd": usd(b.used, 9),
                    "left_usd": usd(left, 9), "resets_at": resets,
                })
            } else {
                json!({
                    "budget": b.name, "limit_tokens": b.limit, "used_tokens": b.used,
                    "left_tokens": left, "resets_at": resets,
                })
            }
        })
        .collect();
    json!({
        "key": {"id": client.id, "name": client.name},
        "usage": periods,
        "budgets": budgets,
        "counted_by": if shared { "every instance (shared state)" } else { "this instance's ledger" },
        "prices": format!("list prices of {} with this gateway's pricing: rows", crate::pricing::DATE),
    })
}
