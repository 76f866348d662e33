//! Commands for operators: `status` asks the running server for its view (admin listener, or
//! the main listener with an admin key); `health-check` probes every account upstream with the
//! cheapest real call (`GET /v1/models`, which generates no tokens). Both have exit codes cron
//! can alert on.

use std::path::Path;
use std::time::{Duration, Instant};

use argh::FromArgs;
use serde_json::{Value, json};

use super::{CliError, Exit, print_json, print_table};
use crate::accounts::{Accounts, State};
use crate::config;
use crate::probe;
use crate::refresh::Refresher;
use crate::upstream::Upstream;

/// Where `status` finds the admin key for the main listener.
pub const ADMIN_KEY_ENV: &str = "LLM_GATEWAY_ADMIN_KEY";

#[derive(FromArgs)]
/// Show the running server's view: accounts (active, cooling until when and why, invalid,
/// needs_login, disabled), load, counts, uptime and workers.
#[argh(subcommand, name = "status")]
pub struct Status {
    /// the server's base URL (default: http:// + admin.listen from the config)
    #[argh(option)]
    pub url: Option<String>,
    /// a file holding an admin gateway key, needed on the main listener (or set
    /// LLM_GATEWAY_ADMIN_KEY)
    #[argh(option)]
    pub admin_key_file: Option<String>,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs)]
/// Probe each account upstream (GET /v1/models: no tokens generated) and report ok or failed,
/// latency and reason. Exit 0 when all are healthy, 10 when some are not, 11 when none is.
#[argh(subcommand, name = "health-check")]
pub struct HealthCheck {
    /// probe only this account
    #[argh(option)]
    pub account_id: Option<String>,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

pub fn status(path: &Path, cmd: Status) -> Result<(), CliError> {
    if matches!(config::read_text(path), Ok(None)) {
        eprintln!(
            "warning: no config file at {}: the admin address and accounts are the defaults",
            path.display()
        );
    }
    // With --url the server is asked whatever the file says: a broken edit is exactly what
    // an operator runs status to see (the server keeps its running config).
    let config = match config::load(path) {
        Ok(config) => Some(config),
        Err(e) if cmd.url.is_some() => {
            eprintln!("warning: {e}");
            None
        }
        Err(e) => return Err(e.into()),
    };
    let admin_listen = config.as_ref().and_then(|c| c.admin_listen.clone());
    let url = match (&cmd.url, &admin_listen) {
        (Some(url), _) => url.trim_end_matches('/').to_string(),
        (None, Some(addr)) => format!("http://{addr}"),
        (None, None) => {
            return Err(CliError::usage(
                "admin.listen is off in the config: give --url and an admin key",
            ));
        }
    };
    let key = match &cmd.admin_key_file {
        Some(file) => Some(
            std::fs::read_to_string(file)
                .map_err(|e| CliError::usage(format!("cannot read {file}: {e}")))?
                .trim()
                .to_string(),
        ),
        None => std::env::var(ADMIN_KEY_ENV).ok().filter(|k| !k.is_empty()),
    };
    match fetch_status(&url, key.as_deref()) {
        Err(Fetched::Refused(status, message)) => Err(CliError {
            exit: Exit::Refused,
            message: format!(
                "the server at {url} is up but refused the admin key ({status}: {message}); give an admin key with --admin-key-file or ${ADMIN_KEY_ENV} (one made with `add-client-key --admin`)"
            ),
        }),
        Ok(view) => {
            if cmd.json {
                print_json(&view);
            } else {
                print_status(&url, &view);
            }
            Ok(())
        }
        Err(Fetched::Unreachable(why)) => {
            // Say so, show what the config alone knows, and exit with the unreachable code.
            if cmd.json {
                print_json(
                    &json!({"server": null, "error": why, "accounts": config_only(config.as_ref())}),
                );
            } else {
                eprintln!("the server is not reachable at {url}: {why}");
                eprintln!("what the config says:");
                let rows: Vec<[String; 4]> = config_only(config.as_ref())
                    .iter()
                    .map(|a| {
                        [
                            a["id"].as_str().unwrap_or("").into(),
                            a["name"].as_str().unwrap_or("").into(),
                            a["kind"].as_str().unwrap_or("").into(),
                            a["state"].as_str().unwrap_or("").into(),
                        ]
                    })
                    .collect();
                print_table(&["ID", "NAME", "KIND", "STATE"], &rows);
            }
            Err(CliError {
                exit: Exit::Unreachable,
                message: format!("no server answered at {url}"),
            })
        }
    }
}

fn config_only(config: Option<&config::Config>) -> Vec<Value> {
    let Some(config) = config else {
        return Vec::new();
    };
    let accounts = Accounts::load(config);
    accounts
        .snapshot()
        .iter()
        .map(|e| json!({"id": e.id(), "name": e.account.name, "kind": e.account.kind.as_str(), "state": e.state()}))
        .collect()
}

/// Why `fetch_status` has no view.
enum Fetched {
    /// Nothing (or nothing that speaks our status) answered.
    Unreachable(String),
    /// The server answered 401 or 403: it is up, the admin key is missing or wrong.
    Refused(u16, String),
}

fn fetch_status(url: &str, key: Option<&str>) -> Result<Value, Fetched> {
    let unreachable = Fetched::Unreachable;
    // No redirects: the admin key goes to the URL given and nowhere else.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let mut request = agent.get(format!("{url}/admin/status"));
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    let response = request.call().map_err(|e| unreachable(e.to_string()))?;
    let status = response.status().as_u16();
    if response.status().is_redirection() {
        let target = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("nowhere");
        return Err(unreachable(format!(
            "answered {status}, a redirect to {target}; redirects are not followed (the admin key goes only to the URL given): use --url with the server's own address"
        )));
    }
    let body = (response.into_body().into_with_config())
        .limit(16 * 1024 * 1024)
        .read_to_string()
        .map_err(|e| unreachable(e.to_string()))?;
    let value: Option<Value> = crate::json::from_str(&body).ok();
    let message = (value.as_ref())
        .and_then(|v| v["error"]["message"].as_str())
        .unwrap_or("")
        .to_string();
    // Up, whatever shape its refusal takes (a proxy's own page included).
    if matches!(status, 401 | 403) {
        return Err(Fetched::Refused(status, message));
    }
    let value = value.ok_or_else(|| {
        unreachable(format!(
            "answered {status} with something that is not a status"
        ))
    })?;
    if status != 200 {
        return Err(unreachable(format!("answered {status}: {message}")));
    }
    Ok(value)
}

fn print_status(url: &str, view: &Value) {
    let workers = &view["workers"];
    println!(
        "server {url}: up {}, workers {} busy / {} alive / {} max, {} sticky sessions",
        crate::time::human_duration(view["uptime_secs"].as_u64().unwrap_or(0)),
        workers["busy"],
        workers["alive"],
        workers["max"],
        view["sticky_pins"]
    );
    match view["state"]["backend"].as_str() {
        Some("redis") if view["state"]["redis"] == "down" => println!(
            "shared state: Redis DOWN ({}); each instance counts on its own",
            view["state"]["error"].as_str().unwrap_or("")
        ),
        Some("redis") => println!("shared state: Redis up"),
        _ => {}
    }
    if let Some(e) = view["config"]["reload_error"].as_str() {
        println!("config reload FAILING: {e}");
    }
    // Only trouble is worth a line: a thread that panicked, or connections that did.
    if let Some(threads) = view["supervised"]["threads"].as_object() {
        for (name, t) in threads
            .iter()
            .filter(|(_, t)| t["panics"].as_u64() > Some(0))
        {
            println!(
                "thread {name}: {}, {} panics, last: {}",
                t["state"].as_str().unwrap_or(""),
                t["panics"],
                t["last_panic"].as_str().unwrap_or("")
            );
        }
    }
    if let Some(n) = view["supervised"]["connection_panics"]
        .as_u64()
        .filter(|&n| n > 0)
    {
        println!("connections closed by a panic: {n}");
    }
    let rows: Vec<[String; 7]> = view["accounts"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|a| {
            let text = |k: &str| a[k].as_str().unwrap_or("").to_string();
            let mut detail = match (a["cooldown_until"].as_str(), a["reason"].as_str()) {
                (Some(until), Some(why)) => format!("until {until}: {why}"),
                (None, Some(why)) => why.to_string(),
                _ => String::new(),
            };
            if let Some(expires) = a["token_expires_at"].as_u64() {
                let left = expires.saturating_sub(crate::time::now_unix());
                detail = format!("token {} {detail}", crate::time::human_duration(left))
                    .trim_end()
                    .to_string();
            }
            if let Some(e) = a["persist_error"].as_str() {
                detail = format!("TOKENS NOT SAVED: {e} {detail}");
            }
            [
                text("id"),
                text("name"),
                text("state"),
                a["in_flight"].to_string(),
                a["requests"].to_string(),
                a["failures"].to_string(),
                detail,
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "NAME",
            "STATE",
            "IN-FLIGHT",
            "REQUESTS",
            "FAILURES",
            "DETAIL",
        ],
        &rows,
    );
}

pub fn health_check(path: &Path, cmd: HealthCheck) -> Result<(), CliError> {
    let config = config::load_existing(path)?;
    let accounts = Accounts::load(&config);
    let entries: Vec<_> = accounts
        .snapshot()
        .iter()
        .filter(|e| cmd.account_id.as_deref().is_none_or(|id| id == e.id()))
        .cloned()
        .collect();
    if let Some(id) = &cmd.account_id
        && entries.is_empty()
    {
        return Err(CliError {
            exit: Exit::NotFound,
            message: format!("no account with id {id}; see `llm-gateway list-accounts`"),
        });
    }
    let upstream = Upstream::new(&config.upstream, 1);
    let refresher = Refresher::new(
        config.path.clone(),
        &config.oauth,
        accounts.shared().cloned(),
    );
    let mut results = Vec::new();
    for e in &entries {
        let started = Instant::now();
        let outcome = match e.state() {
            // Out of service on purpose: reported, never probed, never a failure.
            State::Disabled => Checked::Disabled(
                (e.account.disabled_reason.clone()).or_else(|| e.status(Instant::now()).1),
            ),
            State::NeedsLogin => Checked::Failed(format!(
                "needs a new login: run `llm-gateway oauth-start --account-id {}`",
                e.id()
            )),
            State::NotLoggedIn => Checked::Failed(format!(
                "never logged in: run `llm-gateway oauth-start --account-id {}`",
                e.id()
            )),
            State::Unusable => Checked::Failed(
                e.status(Instant::now())
                    .1
                    .unwrap_or_else(|| "unusable".into()),
            ),
            State::Enabled => {
                match probe::account(&upstream, &refresher, e, &config.oauth.system_prompt) {
                    Ok(p) if (200..300).contains(&p.status) => Checked::Ok,
                    Ok(p) => {
                        let value: Value = crate::json::from_slice(&p.body).unwrap_or_default();
                        let message = value["error"]["message"].as_str().unwrap_or("");
                        Checked::Failed(format!("{} {message}", p.status).trim_end().to_string())
                    }
                    Err(e) => Checked::Failed(e.to_string()),
                }
            }
        };
        let ms = started.elapsed().as_millis() as u64;
        results.push((e, outcome, ms));
    }
    let count = |f: fn(&Checked) -> bool| results.iter().filter(|(_, o, _)| f(o)).count();
    let healthy = count(|o| matches!(o, Checked::Ok));
    let disabled = count(|o| matches!(o, Checked::Disabled(_)));
    let checked = results.len() - disabled;
    if cmd.json {
        let rows: Vec<Value> = results
            .iter()
            .map(|(e, o, ms)| {
                let (result, reason) = match o {
                    Checked::Ok => ("ok", None),
                    Checked::Failed(why) => ("failed", Some(why.clone())),
                    Checked::Disabled(why) => ("disabled", why.clone()),
                };
                json!({
                    "id": e.id(), "name": e.account.name, "result": result,
                    "ok": matches!(o, Checked::Ok), "latency_ms": ms, "reason": reason,
                })
            })
            .collect();
        print_json(&json!({
            "healthy": healthy, "total": checked, "disabled": disabled, "accounts": rows,
        }));
    } else {
        let rows: Vec<[String; 4]> = results
            .iter()
            .map(|(e, o, ms)| {
                let (result, detail) = match o {
                    Checked::Ok => ("ok", format!("{ms} ms")),
                    Checked::Failed(why) => ("failed", format!("{ms} ms  {why}")),
                    Checked::Disabled(why) => ("disabled", why.clone().unwrap_or_default()),
                };
                [
                    e.id().to_string(),
                    e.account.name.clone(),
                    result.to_string(),
                    detail,
                ]
            })
            .collect();
        print_table(&["ID", "NAME", "RESULT", "DETAIL"], &rows);
        let skipped = match disabled {
            0 => String::new(),
            n => format!(" ({n} disabled, not checked)"),
        };
        println!("{healthy} of {checked} healthy{skipped}");
    }
    if checked == 0 {
        return Err(CliError {
            exit: Exit::NoneHealthy,
            message: match disabled {
                0 => "no account to check: add one with `llm-gateway add-api-key`".into(),
                n => format!("no account to check: all {n} are disabled"),
            },
        });
    }
    let exit = match healthy {
        h if h == checked => return Ok(()),
        0 => Exit::NoneHealthy,
        _ => Exit::SomeUnhealthy,
    };
    Err(CliError {
        exit,
        message: format!(
            "{} of {checked} accounts failed the health check",
            checked - healthy,
        ),
    })
}

/// What `health-check` found of one account.
enum Checked {
    Ok,
    Failed(String),
    /// Disabled on purpose (the reason, if one was given): skipped.
    Disabled(Option<String>),
}
