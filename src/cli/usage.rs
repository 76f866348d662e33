//! `usage`: requests, errors, tokens by kind and cost from the usage ledger (every instance's
//! in Redis with shared state), grouped by key, account, model, hour, day, week or month, as
//! a table, JSON or CSV.

use std::path::Path;

use argh::FromArgs;
use serde_json::{Value, json};

use super::{CliError, Exit, print_json};
use crate::config;

#[derive(FromArgs)]
/// Usage from the ledger: requests, errors, tokens and cost, grouped by key, account, model,
/// hour, day, week or month.
#[argh(subcommand, name = "usage")]
pub struct Usage {
    /// group by key (default), account, model, hour (the last 48), day, week or month
    #[argh(option, default = "String::from(\"key\")")]
    pub by: String,
    /// count only this gateway key (its name or id)
    #[argh(option)]
    pub key: Option<String>,
    /// first day to count (2026-11-01; default: everything)
    #[argh(option)]
    pub since: Option<String>,
    /// last day to count, inclusive (default: today)
    #[argh(option)]
    pub until: Option<String>,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
    /// print CSV, for spreadsheets
    #[argh(switch)]
    pub csv: bool,
}

fn day_of(flag: &str, text: &Option<String>, default: u64) -> Result<u64, CliError> {
    match text {
        None => Ok(default),
        Some(t) => config::parse_time(t).map(|s| s / 86_400).ok_or_else(|| {
            CliError::usage(format!("--{flag} {t:?}: use a date such as 2026-11-01"))
        }),
    }
}

pub fn usage(path: &Path, cmd: Usage) -> Result<(), CliError> {
    if !crate::usage::GROUPS.contains(&cmd.by.as_str()) {
        return Err(CliError::usage(format!(
            "--by takes {}",
            crate::usage::GROUPS.join(", ")
        )));
    }
    if cmd.json && cmd.csv {
        return Err(CliError::usage("give --json or --csv, not both"));
    }
    // Usage needs no secret: it opens none.
    let config = config::load_public(path)?;
    let key = match &cmd.key {
        None => None,
        Some(wanted) => Some(
            (config.client_keys.iter())
                .find(|k| k.id == *wanted || k.name == *wanted)
                .map(|k| k.id.clone())
                .ok_or_else(|| CliError {
                    exit: Exit::NotFound,
                    message: format!("no client key named or numbered {wanted:?}"),
                })?,
        ),
    };
    let from = day_of("since", &cmd.since, 0)?;
    let to = day_of("until", &cmd.until, u64::MAX)?;
    // Hourly rows are kept by each ledger, not in Redis: `--by hour` reads this machine's.
    let book = usage_book(&config, from, to, cmd.by == "hour")?;
    let accounts = match cmd.by.as_str() {
        "account" => config::account_names(path)?,
        _ => Vec::new(),
    };
    let names: std::collections::HashMap<&str, &str> = match cmd.by.as_str() {
        "key" => config
            .client_keys
            .iter()
            .map(|k| (k.id.as_str(), k.name.as_str()))
            .collect(),
        "account" => (accounts.iter())
            .map(|(id, name)| (id.as_str(), name.as_str()))
            .collect(),
        _ => Default::default(),
    };
    let rows = crate::usage::group(&book, &cmd.by, (from, to), key.as_deref());
    let mut total = crate::usage::Totals::default();
    for (_, t) in &rows {
        total.absorb(t);
    }
    if cmd.json {
        let list: Vec<Value> = rows
            .iter()
            .map(|(id, t)| {
                let mut r = crate::usage::totals_json(t);
                r[cmd.by.as_str()] = json!(id);
                if let Some(name) = names.get(id.as_str()) {
                    r["name"] = json!(name);
                }
                r
            })
            .collect();
        print_json(&json!({
            "by": cmd.by, "key": key, "rows": list, "total": crate::usage::totals_json(&total),
            "prices": prices_note(&config),
        }));
        return Ok(());
    }
    let label = |id: &str| match names.get(id) {
        Some(name) => format!("{name} ({id})"),
        None => id.to_string(),
    };
    let mut table: Vec<[String; COLUMNS]> =
        rows.iter().map(|(id, t)| numbers(label(id), t)).collect();
    let header = [
        cmd.by.to_uppercase(),
        "REQUESTS".into(),
        "ERRORS".into(),
        "INPUT".into(),
        "OUTPUT".into(),
        "CACHE WRITE 5M".into(),
        "CACHE WRITE 1H".into(),
        "CACHE READ".into(),
        "TOTAL TOKENS".into(),
        "COST USD".into(),
        "UNPRICED".into(),
    ];
    if cmd.csv {
        let csv = |cells: &[String]| {
            let quoted: Vec<String> = cells.iter().map(|c| csv_cell(c)).collect();
            println!("{}", quoted.join(","));
        };
        csv(&header);
        for (r, (id, _)) in table.iter_mut().zip(&rows) {
            // The id alone: a spreadsheet sorts and joins on it; the name is its own column.
            r[0] = id.clone();
        }
        table.push(numbers("TOTAL".into(), &total));
        for r in &table {
            csv(r);
        }
        return Ok(());
    }
    table.push(numbers("TOTAL".into(), &total));
    let mut widths = header.clone().map(|h| h.len());
    for r in &table {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String; COLUMNS]| {
        let mut out = format!("{:<w$}", cells[0], w = widths[0]);
        for (c, w) in cells.iter().zip(widths).skip(1) {
            out.push_str(&format!("  {c:>w$}"));
        }
        println!("{}", out.trim_end());
    };
    line(&header);
    for (i, r) in table.iter().enumerate() {
        if i + 1 == table.len() {
            println!(
                "{}",
                "-".repeat(widths.iter().sum::<usize>() + 2 * (COLUMNS - 1))
            );
        }
        line(r);
    }
    println!();
    if total.unpriced > 0 {
        println!(
            "{} requests used models without a price: their cost is not in COST USD (add a pricing: row to config.yaml)",
            total.unpriced
        );
    }
    if total.estimated > 0 {
        println!(
            "{} requests (marked ~) did not say which cache writes were 1-hour ones: priced at the 5-minute rate",
            total.estimated
        );
    }
    println!("{}", prices_note(&config));
    Ok(())
}

/// The ledger's book for days `from..=to`: every instance's totals with shared state (unless
/// `local`), else this machine's ledger.
fn usage_book(
    config: &config::Config,
    from: u64,
    to: u64,
    local: bool,
) -> Result<crate::usage::Book, CliError> {
    let shared = crate::shared::open(config).filter(|_| !local);
    match shared.map(|shared| shared.usage_rows(from, to)) {
        Some(Ok(rows)) => Ok(crate::usage::Book::from_rows(rows)),
        Some(Err(e)) => Err(CliError {
            exit: Exit::Unreachable,
            message: format!(
                "{e}; this instance's own ledger is in {}",
                config.usage.dir.display()
            ),
        }),
        None => Ok(crate::ledger::read(&config.usage.dir)
            .map_err(|e| CliError {
                exit: Exit::Failure,
                message: format!(
                    "cannot read the usage ledger in {}: {e}",
                    config.usage.dir.display()
                ),
            })?
            .0),
    }
}

/// Which prices the costs were counted with.
fn prices_note(config: &config::Config) -> String {
    format!(
        "costs as priced when served; current table: the list prices of {} ({} rows in all, pricing: in {} adds or replaces rows)",
        crate::pricing::DATE,
        config.pricing.rows().len(),
        config.path.display()
    )
}

/// A CSV cell, quoted when it holds a comma, a quote or a line break (RFC 4180). A cell a
/// spreadsheet would run as a formula (model names are the clients') starts with `'`.
fn csv_cell(text: &str) -> String {
    let numeric = text.parse::<f64>().is_ok();
    let text = &if !numeric && text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text.to_string()
    };
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

const COLUMNS: usize = 11;

fn numbers(label: String, t: &crate::usage::Totals) -> [String; COLUMNS] {
    let u = &t.usage;
    let hour = u.cache_1h.min(u.cache_creation);
    let mut cost = crate::pricing::usd(t.cost, 6);
    if t.estimated > 0 {
        cost.push('~');
    }
    [
        label,
        t.requests.to_string(),
        t.errors.to_string(),
        u.input.to_string(),
        u.output.to_string(),
        (u.cache_creation - hour).to_string(),
        hour.to_string(),
        u.cache_read.to_string(),
        u.total().to_string(),
        cost,
        t.unpriced.to_string(),
    ]
}
