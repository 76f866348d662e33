//! The command line: flags parsed by argh into plain structs (after `--flag=value` is split,
//! since argh only takes `--flag value`), then each command run against the validated config.
//! Every command can print `--json`; every failure maps to one documented exit code.

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use argh::FromArgs;
use serde_json::json;

use crate::auth;
use crate::config::{self, AccountKind, ConfigError, RawAccount, RawClientKey};
use crate::encoding;
use crate::secret::{self, Secret};
use crate::server;
use crate::store::{self, ChangeError};
use crate::time;

/// Exit codes, one table for every command (README.md lists them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    /// The command was valid but failed at run time (I/O, bind, write).
    Failure = 1,
    /// Unknown command or flag, missing or invalid argument.
    Usage = 2,
    /// config.yaml does not parse or is invalid.
    Config = 3,
    /// The secret key is missing or wrong, or a sealed value does not open.
    SecretKey = 4,
    /// The running server could not be reached (status, health-check).
    #[allow(dead_code)]
    Unreachable = 5,
    /// No account or key with that id.
    NotFound = 6,
}

#[derive(Debug)]
pub struct CliError {
    exit: Exit,
    message: String,
}

impl CliError {
    fn usage(message: impl Into<String>) -> CliError {
        CliError {
            exit: Exit::Usage,
            message: message.into(),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<ConfigError> for CliError {
    fn from(e: ConfigError) -> CliError {
        let exit = match &e {
            ConfigError::Secret(_) => Exit::SecretKey,
            ConfigError::Write { .. } => Exit::Failure,
            _ => Exit::Config,
        };
        CliError {
            exit,
            message: e.to_string(),
        }
    }
}

impl From<ChangeError<CliError>> for CliError {
    fn from(e: ChangeError<CliError>) -> CliError {
        match e {
            ChangeError::Config(e) => e.into(),
            ChangeError::Change(e) => e,
        }
    }
}

#[derive(FromArgs)]
/// One static binary in front of Anthropic's API: pools accounts, fails over, and speaks the
/// Anthropic and OpenAI formats. Options take `--name value` or `--name=value`.
struct Cli {
    /// path of config.yaml (default: $LLM_GATEWAY_CONFIG, else ./config.yaml)
    #[argh(option)]
    config: Option<String>,
    #[argh(subcommand)]
    command: Command,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Server(ServerCmd),
    AddApiKey(AddApiKey),
    AddClientKey(AddClientKey),
    ListAccounts(ListAccounts),
    ListClientKeys(ListClientKeys),
    RemoveAccount(RemoveAccount),
    EnableAccount(EnableAccount),
    DisableAccount(DisableAccount),
}

#[derive(FromArgs)]
/// Serve HTTP on the configured address.
#[argh(subcommand, name = "server")]
struct ServerCmd {
    /// listen address, overriding server.listen (e.g. 127.0.0.1:8080, or port 0 for any)
    #[argh(option)]
    listen: Option<String>,
}

#[derive(FromArgs)]
/// Add an Anthropic API-key account. The key comes from --key-file, --key, or standard input
/// (prefer the file or stdin: a key on the command line shows in /proc and shell history).
#[argh(subcommand, name = "add-api-key")]
struct AddApiKey {
    /// a name for people, e.g. "Production Account"
    #[argh(option)]
    name: String,
    /// the API key (sk-ant-…)
    #[argh(option)]
    key: Option<String>,
    /// read the API key from this file
    #[argh(option)]
    key_file: Option<String>,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// Create a gateway key for a client. It is printed once; only its hash is stored.
#[argh(subcommand, name = "add-client-key")]
struct AddClientKey {
    /// who the key is for, e.g. alice
    #[argh(option)]
    name: String,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// List upstream accounts (keys masked).
#[argh(subcommand, name = "list-accounts")]
struct ListAccounts {
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// List gateway keys (their ids, names and first characters; the keys themselves are not stored).
#[argh(subcommand, name = "list-client-keys")]
struct ListClientKeys {
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// Remove an account.
#[argh(subcommand, name = "remove-account")]
struct RemoveAccount {
    /// the account id (see list-accounts)
    #[argh(option)]
    account_id: String,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// Enable an account.
#[argh(subcommand, name = "enable-account")]
struct EnableAccount {
    /// the account id (see list-accounts)
    #[argh(option)]
    account_id: String,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// Disable an account without removing it.
#[argh(subcommand, name = "disable-account")]
struct DisableAccount {
    /// the account id (see list-accounts)
    #[argh(option)]
    account_id: String,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

/// Parses the process arguments, runs the command, and returns its exit code.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let program = args.first().map_or("llm-gateway", String::as_str);
    let rest = normalize_args(&args[1.min(args.len())..]);
    if rest.len() == 1 && (rest[0] == "--version" || rest[0] == "-V") {
        println!("llm-gateway {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let refs: Vec<&str> = rest.iter().map(String::as_str).collect();
    let cli = match Cli::from_args(&[program], &refs) {
        Ok(cli) => cli,
        Err(early) => {
            return if early.status.is_ok() {
                println!("{}", early.output);
                ExitCode::SUCCESS
            } else {
                eprintln!("{}", early.output);
                ExitCode::from(Exit::Usage as u8)
            };
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::from(Exit::Ok as u8),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit as u8)
        }
    }
}

/// `--flag=value` becomes `--flag value` (argh takes only the latter), and a `--config` given
/// after the command moves before it, where argh expects it. Nothing after `--` is touched.
fn normalize_args(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len() + 2);
    let mut literal = false;
    for arg in args {
        if literal || arg == "--" {
            literal = true;
            out.push(arg.clone());
        } else if let Some((flag, value)) = arg.split_once('=').filter(|_| arg.starts_with("--")) {
            out.push(flag.to_string());
            out.push(value.to_string());
        } else {
            out.push(arg.clone());
        }
    }
    let command_at = out.iter().position(|a| !a.starts_with('-'));
    let late_config = out
        .iter()
        .enumerate()
        .skip(command_at.map_or(usize::MAX, |c| c + 1))
        .take_while(|(_, a)| *a != "--")
        .find(|(_, a)| *a == "--config")
        .map(|(i, _)| i);
    if let (Some(i), Some(c)) = (late_config, command_at)
        && i + 1 < out.len()
    {
        let value = out.remove(i + 1);
        let flag = out.remove(i);
        out.insert(c, value);
        out.insert(c, flag);
    }
    out
}

fn run(cli: Cli) -> Result<(), CliError> {
    let path = config::resolve_path(cli.config.as_deref());
    match cli.command {
        Command::Server(cmd) => {
            let config = config::load(&path)?;
            server::run(config, cmd.listen).map_err(|e| CliError {
                exit: Exit::Failure,
                message: e.to_string(),
            })
        }
        Command::AddApiKey(cmd) => add_api_key(&path, cmd),
        Command::AddClientKey(cmd) => add_client_key(&path, cmd),
        Command::ListAccounts(cmd) => list_accounts(&path, cmd.json),
        Command::ListClientKeys(cmd) => list_client_keys(&path, cmd.json),
        Command::RemoveAccount(cmd) => {
            change_account(&path, &cmd.account_id, cmd.json, Change::Remove)
        }
        Command::EnableAccount(cmd) => {
            change_account(&path, &cmd.account_id, cmd.json, Change::Enable(true))
        }
        Command::DisableAccount(cmd) => {
            change_account(&path, &cmd.account_id, cmd.json, Change::Enable(false))
        }
    }
}

/// The API key from exactly one of --key, --key-file, or stdin.
fn read_key(cmd: &AddApiKey) -> Result<Secret, CliError> {
    let text = match (&cmd.key, &cmd.key_file) {
        (Some(_), Some(_)) => return Err(CliError::usage("give --key or --key-file, not both")),
        (Some(key), None) => key.clone(),
        (None, Some(file)) => std::fs::read_to_string(file)
            .map_err(|e| CliError::usage(format!("cannot read --key-file {file}: {e}")))?,
        (None, None) => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| CliError::usage(format!("cannot read the key from stdin: {e}")))?;
            text
        }
    };
    let key = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    if key.is_empty() {
        return Err(CliError::usage(
            "no API key given: use --key-file PATH, --key KEY, or pipe it on stdin",
        ));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(CliError::usage(
            "the API key contains spaces or non-printable characters",
        ));
    }
    if !key.starts_with("sk-ant-") {
        eprintln!("warning: the key does not start with sk-ant-; adding it anyway");
    }
    Ok(Secret::new(key))
}

fn check_name(name: &str) -> Result<String, CliError> {
    let name = name.trim();
    if name.is_empty() || name.chars().any(char::is_control) {
        return Err(CliError::usage("--name must be non-empty and printable"));
    }
    Ok(name.to_string())
}

/// `prefix` + 8 random hex digits, not already in `taken`.
fn new_id(prefix: &str, taken: impl Fn(&str) -> bool) -> String {
    loop {
        let id = format!("{prefix}{}", encoding::hex(&secret::random_bytes::<4>()));
        if !taken(&id) {
            return id;
        }
    }
}

fn add_api_key(path: &Path, cmd: AddApiKey) -> Result<(), CliError> {
    let name = check_name(&cmd.name)?;
    let key = read_key(&cmd)?;
    let id = store::update(path, |m| {
        let id = new_id("acc_", |id| {
            m.accounts.iter().any(|a| a.id.as_deref() == Some(id))
        });
        let sealed = m.seal(&id, "api_key", &key)?;
        m.accounts.push(RawAccount {
            id: Some(id.clone()),
            name: name.clone(),
            kind: AccountKind::ApiKey,
            api_key: Some(sealed),
            api_key_env: None,
            enabled: true,
            created_at: Some(time::rfc3339(time::now_unix())),
        });
        Ok::<_, ChangeError<CliError>>(id)
    })?;
    if cmd.json {
        print_json(&json!({
            "id": id, "name": name, "kind": "api_key", "key": key.mask(), "enabled": true,
        }));
    } else {
        println!("added account {id} \"{name}\" ({})", key.mask());
    }
    Ok(())
}

fn add_client_key(path: &Path, cmd: AddClientKey) -> Result<(), CliError> {
    let name = check_name(&cmd.name)?;
    let key = auth::generate_key();
    let id = store::update(path, |m| {
        let id = new_id("ck_", |id| m.client_keys.iter().any(|k| k.id == id));
        m.client_keys.push(RawClientKey {
            id: id.clone(),
            name: name.clone(),
            hash: auth::hash_for_storage(&key),
            prefix: Some(key.expose()[..12].to_string()),
            enabled: true,
            created_at: Some(time::rfc3339(time::now_unix())),
        });
        Ok::<_, ChangeError<CliError>>(id)
    })?;
    // The one place a gateway key is ever shown in clear.
    if cmd.json {
        print_json(&json!({"id": id, "name": name, "key": key.expose()}));
    } else {
        println!("gateway key {id} for \"{name}\":\n\n    {}\n", key.expose());
        println!(
            "It is shown only this once; only its hash is stored. Send it as x-api-key or Authorization: Bearer."
        );
    }
    Ok(())
}

fn list_accounts(path: &Path, as_json: bool) -> Result<(), CliError> {
    let config = config::load(path)?;
    if as_json {
        let rows: Vec<_> = config
            .accounts
            .iter()
            .map(|a| {
                json!({
                    "id": a.id, "name": a.name, "kind": a.kind.as_str(), "enabled": a.enabled,
                    "key": a.key_display(), "created_at": a.created_at,
                })
            })
            .collect();
        print_json(&serde_json::Value::Array(rows));
        return Ok(());
    }
    if config.accounts.is_empty() {
        println!("no accounts; add one with `llm-gateway add-api-key --name NAME --key-file PATH`");
        return Ok(());
    }
    let rows: Vec<[String; 5]> = config
        .accounts
        .iter()
        .map(|a| {
            [
                a.id.clone(),
                a.name.clone(),
                a.kind.as_str().to_string(),
                if a.enabled { "enabled" } else { "disabled" }.to_string(),
                a.key_display(),
            ]
        })
        .collect();
    print_table(&["ID", "NAME", "KIND", "STATE", "KEY"], &rows);
    Ok(())
}

fn list_client_keys(path: &Path, as_json: bool) -> Result<(), CliError> {
    let config = config::load(path)?;
    let keys = &config.client_keys;
    if as_json {
        let rows: Vec<_> = keys
            .iter()
            .map(|k| {
                json!({
                    "id": k.id, "name": k.name, "prefix": k.prefix, "enabled": k.enabled,
                    "created_at": k.created_at,
                })
            })
            .collect();
        print_json(&serde_json::Value::Array(rows));
        return Ok(());
    }
    if keys.is_empty() {
        println!("no client keys; create one with `llm-gateway add-client-key --name NAME`");
        return Ok(());
    }
    let rows: Vec<[String; 5]> = keys
        .iter()
        .map(|k| {
            [
                k.id.clone(),
                k.name.clone(),
                format!("{}…", k.prefix),
                if k.enabled { "enabled" } else { "disabled" }.to_string(),
                k.created_at.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(&["ID", "NAME", "KEY", "STATE", "CREATED"], &rows);
    Ok(())
}

/// Prints rows under headers, columns aligned to their widest cell.
fn print_table<const N: usize>(headers: &[&str; N], rows: &[[String; N]]) {
    let mut widths = headers.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

enum Change {
    Remove,
    Enable(bool),
}

fn change_account(path: &Path, id: &str, as_json: bool, change: Change) -> Result<(), CliError> {
    let name = store::update(path, |m| {
        let index = m
            .accounts
            .iter()
            .position(|a| {
                a.id.as_deref() == Some(id)
                    || config::derived_account_id(&a.name) == id && a.id.is_none()
            })
            .ok_or_else(|| {
                ChangeError::Change(CliError {
                    exit: Exit::NotFound,
                    message: format!("no account with id {id}; see `llm-gateway list-accounts`"),
                })
            })?;
        let name = m.accounts[index].name.clone();
        match change {
            Change::Remove => {
                m.accounts.remove(index);
            }
            Change::Enable(on) => m.accounts[index].enabled = on,
        }
        Ok(name)
    })?;
    let (verb, enabled) = match change {
        Change::Remove => ("removed", None),
        Change::Enable(true) => ("enabled", Some(true)),
        Change::Enable(false) => ("disabled", Some(false)),
    };
    if as_json {
        print_json(&json!({"id": id, "name": name, "result": verb, "enabled": enabled}));
    } else {
        println!("{verb} account {id} \"{name}\"");
    }
    Ok(())
}

fn print_json(value: &serde_json::Value) {
    println!("{value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(args: &[&str]) -> Vec<String> {
        normalize_args(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn equals_forms_are_split() {
        assert_eq!(
            norm(&["add-api-key", "--name=Prod Team", "--key=sk-ant-a=b"]),
            ["add-api-key", "--name", "Prod Team", "--key", "sk-ant-a=b"]
        );
        assert_eq!(norm(&["x", "--", "--a=b"]), ["x", "--", "--a=b"]);
        assert_eq!(norm(&["x", "-v=1"]), ["x", "-v=1"]);
    }

    #[test]
    fn late_config_moves_before_the_command() {
        assert_eq!(
            norm(&["list-accounts", "--json", "--config=/c.yaml"]),
            ["--config", "/c.yaml", "list-accounts", "--json"]
        );
        assert_eq!(
            norm(&["--config", "/c.yaml", "list-accounts"]),
            ["--config", "/c.yaml", "list-accounts"]
        );
    }

    #[test]
    fn argh_parses_normalized_arguments() {
        let args = norm(&["add-api-key", "--name=x", "--key=sk-ant-1", "--json"]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let cli = Cli::from_args(&["llm-gateway"], &refs).expect("parses");
        assert!(matches!(
            cli.command,
            Command::AddApiKey(AddApiKey { json: true, .. })
        ));
        let missing = Cli::from_args(&["llm-gateway"], &["add-api-key"]);
        assert!(matches!(missing, Err(e) if e.status.is_err()));
    }
}
