//! The dashboard's JSON, under `/admin/api/`, usable by scripts too: `overview` (the instance
//! and its accounts: `GET /admin/status`'s view), `usage` (cost, tokens and requests by key,
//! model and account: the last 24 hours by hour and the last 30 days by day, UTC), `keys` (the
//! top keys by cost this month beside their budgets), `trouble` (this instance's recent errors
//! and failovers, and its health). Reads state; changes nothing; no secret in any of it.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

use crate::gateway::Gateway;
use crate::usage::{RowKey, Totals, totals_json};

/// The endpoint at `path` (after `/admin/api/`), or `None` for an unknown one.
pub fn answer(gw: &Gateway, path: &str) -> Option<Value> {
    Some(match path {
        "overview" => crate::status::render(gw),
        "usage" => usage(gw),
        "keys" => keys(gw),
        "trouble" => trouble(gw),
        _ => return None,
    })
}

/// Days of history the daily charts show, and hours the hourly ones.
const DAYS: u64 = 30;
const HOURS: u64 = 24;

/// Names for ids: client keys' and accounts'.
fn names(gw: &Gateway) -> HashMap<String, String> {
    let mut names: HashMap<String, String> = (gw.clients.list().into_iter()).collect();
    for e in gw.accounts.snapshot().iter() {
        names.insert(e.id().to_string(), e.account.name.clone());
    }
    names
}

/// One chart's series: per label (a key, model or account), its cost, tokens and requests in
/// each of `count` slots from `first` on.
fn series(
    rows: &[(RowKey, Totals)],
    first: u64,
    count: u64,
    pick: impl Fn(&RowKey) -> &str,
    names: &HashMap<String, String>,
) -> Vec<Value> {
    let mut by: BTreeMap<&str, Vec<Totals>> = BTreeMap::new();
    for (key, totals) in rows {
        let Some(slot) = key.0.checked_sub(first).filter(|s| *s < count) else {
            continue;
        };
        let slots = by
            .entry(pick(key))
            .or_insert_with(|| vec![Totals::default(); count as usize]);
        slots[slot as usize].absorb(totals);
    }
    let mut out: Vec<(u64, Value)> = by
        .into_iter()
        .map(|(label, slots)| {
            let cost: u64 = slots.iter().map(|t| t.cost).sum();
            let value = json!({
                "id": label,
                "name": names.get(label).map_or(label, String::as_str),
                "cost_nano_usd": slots.iter().map(|t| t.cost).collect::<Vec<_>>(),
                "tokens": slots.iter().map(|t| t.usage.total()).collect::<Vec<_>>(),
                "requests": slots.iter().map(|t| t.requests).collect::<Vec<_>>(),
                "unpriced": slots.iter().map(|t| t.unpriced).sum::<u64>(),
            });
            (cost, value)
        })
        .collect();
    out.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then_with(|| a.1["name"].as_str().cmp(&b.1["name"].as_str()))
    });
    out.into_iter().map(|(_, v)| v).collect()
}

fn chart(
    rows: &[(RowKey, Totals)],
    first: u64,
    count: u64,
    names: &HashMap<String, String>,
) -> Value {
    json!({
        "first": first,
        "count": count,
        "by_key": series(rows, first, count, |k| &k.1, names),
        "by_model": series(rows, first, count, |k| &k.3, names),
        "by_account": series(rows, first, count, |k| &k.2, names),
    })
}

fn usage(gw: &Gateway) -> Value {
    let Some(ledger) = gw.ledger.as_deref() else {
        return json!({"enabled": false});
    };
    let now = crate::time::now_unix();
    let (today, hour) = (now / 86_400, now / 3600);
    let names = names(gw);
    let (days, shared) = ledger.day_rows(today + 1 - DAYS, today);
    let hours = ledger.hour_rows();
    json!({
        "enabled": true,
        "generated_at": crate::time::rfc3339(now),
        // Days as `usage` reads them (every instance's with Redis); hours are this ledger's.
        "daily_scope": if shared { "deployment" } else { "instance" },
        "hourly_scope": "instance",
        "hourly": chart(&hours, hour + 1 - HOURS, HOURS, &names),
        "daily": chart(&days, today + 1 - DAYS, DAYS, &names),
    })
}

fn keys(gw: &Gateway) -> Value {
    let Some(ledger) = gw.ledger.as_deref() else {
        return json!({"enabled": false, "keys": []});
    };
    let now = crate::time::now_unix();
    let (first, _) = crate::usage::first_day_of_month(now);
    let (rows, shared) = ledger.day_rows(first, now / 86_400);
    let mut month: HashMap<&str, Totals> = HashMap::new();
    for (key, totals) in &rows {
        month.entry(&key.1).or_default().absorb(totals);
    }
    let mut list: Vec<Value> = Vec::new();
    for client in gw.clients.clients() {
        let totals = month.get(client.id.as_str()).copied().unwrap_or_default();
        let budgets: Vec<Value> = crate::limits::Limiter::budgets_left(&client, ledger)
            .into_iter()
            .map(|b| {
                json!({"budget": b.name, "limit": b.limit, "used": b.used,
                       "usd": b.name.ends_with("_usd"),
                       "resets_at": b.resets_at.map(crate::time::rfc3339)})
            })
            .collect();
        list.push(json!({"id": client.id, "name": client.name, "month": totals_json(&totals), "budgets": budgets}));
    }
    // Nearest to a budget first (any budget, tokens or dollars), then by cost.
    let nearest = |k: &Value| -> u64 {
        (k["budgets"].as_array().into_iter().flatten())
            .map(|b| {
                let (used, limit) = (
                    b["used"].as_u64().unwrap_or(0),
                    b["limit"].as_u64().unwrap_or(1).max(1),
                );
                (used as u128 * 1_000_000 / limit as u128).min(u64::MAX as u128) as u64
            })
            .max()
            .unwrap_or(0)
    };
    list.sort_by_key(|k| {
        std::cmp::Reverse((
            nearest(k),
            k["month"]["cost_nano_usd"].as_u64().unwrap_or(0),
        ))
    });
    list.truncate(20);
    json!({
        "enabled": true,
        "scope": if shared { "deployment" } else { "instance" },
        "month_since": crate::time::rfc3339(first * 86_400)[..10],
        "keys": list,
    })
}

fn trouble(gw: &Gateway) -> Value {
    let failing = gw.threads.failing_for_ready();
    let state = crate::status::shared_state(gw);
    json!({
        "scope": "this instance",
        "health": {
            "ready": gw.accounts.any_available() && failing.is_empty(),
            "accounts_available": gw.accounts.any_available(),
            "threads_failing": failing,
            "reload_error": gw.reload_error(),
            "state": state,
        },
        "recent": gw.trouble.list(),
    })
}
