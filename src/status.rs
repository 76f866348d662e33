//! The running server's view of itself, as JSON for `GET /admin/status` and
//! `llm-gateway status`: uptime, worker use, the shared state's health, and per account its state, cooldown, load and
//! counts. Reads state; changes nothing.

use std::time::Instant;

use serde_json::{Value, json};

use crate::gateway::Gateway;
use crate::time;

/// The shared state's health: local, or Redis up or down (and why).
pub fn shared_state(gw: &Gateway) -> Value {
    match gw.accounts.shared() {
        None => json!({"backend": "local"}),
        Some(shared) => match shared.outage() {
            None => json!({"backend": "redis", "redis": "up"}),
            Some(why) => json!({"backend": "redis", "redis": "down", "error": why}),
        },
    }
}

pub fn render(gw: &Gateway) -> Value {
    let now = Instant::now();
    let accounts: Vec<Value> = gw
        .accounts
        .snapshot()
        .iter()
        .map(|e| {
            let (state, reason) = e.status(now);
            let (requests, failures) = e.counts();
            let live = e.view();
            let policy = gw.accounts.settings().policy(&e.account);
            let standing = e.quota_standing(&policy);
            let cooldown_until = (live.cooldown.as_ref())
                .filter(|c| now < c.until && state == "cooling")
                .map(|c| time::rfc3339(c.until_unix_ms.div_ceil(1000)));
            json!({
                "id": e.id(),
                "name": e.account.name,
                "kind": e.account.kind.as_str(),
                "priority": e.account.priority,
                "weight": e.account.weight,
                "state": state,
                "reason": reason,
                "cooldown_until": cooldown_until,
                "in_flight": e.in_flight(),
                "queued": e.queued(),
                "max_concurrent": e.account.max_concurrent,
                "requests": requests,
                "failures": failures,
                "token_expires_at": live.tokens.as_ref().map(|t| t.expires_at),
                "refresh_error": live.last_refresh_error,
                "persist_error": live.persist_error,
                "quota": live.quota,
                "quota_by_family": live.quota_scoped,
                "quota_standing": {
                    "used": standing.used,
                    "threshold": policy.threshold,
                    "over_threshold": standing.over,
                    "reset": standing.reset,
                    "hard_stop": policy.hard_stop,
                    "overage": policy.overage,
                },
            })
        })
        .collect();
    let (busy, alive) = gw.workers.counts();
    let state = shared_state(gw);
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": gw.started.elapsed().as_secs(),
        "workers": {"busy": busy, "alive": alive, "max": gw.max_workers},
        "sticky_pins": gw.accounts.sticky_pins(),
        "state": state,
        "config": {"path": gw.config_path.display().to_string(), "reload_error": gw.reload_error()},
        "supervised": gw.threads.view(),
        "accounts": accounts,
    })
}
