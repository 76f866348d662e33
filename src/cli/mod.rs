//! The command line: flags parsed by argh into plain structs (after `--flag=value` is split,
//! since argh only takes `--flag value`), then each command run against the validated config.
//! Every command can print `--json`; every failure maps to one documented exit code.

use std::fmt;
use std::io::Read;
use std::process::ExitCode;

use argh::FromArgs;

mod accounts;
mod init;
mod keys;
mod oauth;
mod ops;
mod usage;

use accounts::{
    AddApiKey, Change, DisableAccount, EnableAccount, ListAccounts, RemoveAccount, SetAccount,
    add_api_key, change_account, list_accounts, set_account,
};
use keys::{AddClientKey, ListClientKeys, RevokeClientKey, UpdateClientKey};
use oauth::{AddOAuth, OAuthCallback, OAuthStart};
use ops::{HealthCheck, Status};
use usage::Usage;

use crate::config::{self, ConfigError};
use crate::encoding;
use crate::secret::{self, Secret};
use crate::server;
use crate::store::ChangeError;

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
    /// The running server could not be reached (status).
    Unreachable = 5,
    /// No account or key with that id.
    NotFound = 6,
    /// An OAuth login could not be completed (no pending login, expired, state mismatch, the
    /// token endpoint refused).
    Login = 7,
    /// status: a server answered, but refused the admin key (401 or 403).
    Refused = 8,
    /// health-check: some accounts failed the probe.
    SomeUnhealthy = 10,
    /// health-check: no account passed (or there is none).
    NoneHealthy = 11,
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
    Init(init::Init),
    AddApiKey(AddApiKey),
    AddOAuth(AddOAuth),
    OAuthStart(OAuthStart),
    OAuthCallback(OAuthCallback),
    ListAccounts(ListAccounts),
    RemoveAccount(RemoveAccount),
    EnableAccount(EnableAccount),
    DisableAccount(DisableAccount),
    SetAccount(SetAccount),
    AddClientKey(AddClientKey),
    ListClientKeys(ListClientKeys),
    UpdateClientKey(UpdateClientKey),
    RevokeClientKey(RevokeClientKey),
    Usage(Usage),
    Status(Status),
    HealthCheck(HealthCheck),
}

#[derive(FromArgs)]
/// Serve HTTP on the configured address.
#[argh(subcommand, name = "server")]
struct ServerCmd {
    /// listen address, overriding server.listen (e.g. 127.0.0.1:8080, or port 0 for any)
    #[argh(option)]
    listen: Option<String>,
}

/// Parses the process arguments, runs the command, and returns its exit code.
pub fn main() -> ExitCode {
    // Every command logs at `info` until a server sets the configured level.
    crate::logger::set_level(crate::logger::Level::Info);
    let args = match text_args(std::env::args_os()) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(Exit::Usage as u8);
        }
    };
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

/// The arguments as text. One that is not UTF-8 is a usage error that names its position (and
/// its `--option=`, if it has one) but never shows its value: it may be a key.
fn text_args(args: impl Iterator<Item = std::ffi::OsString>) -> Result<Vec<String>, String> {
    args.enumerate()
        .map(|(i, arg)| {
            if i == 0 {
                return Ok(arg.to_string_lossy().into_owned());
            }
            arg.into_string().map_err(|arg| {
                let bytes = arg.as_encoded_bytes();
                let option = (bytes.starts_with(b"--"))
                    .then(|| bytes.split(|&b| b == b'=').next())
                    .flatten()
                    .filter(|_| bytes.contains(&b'='))
                    .and_then(|name| std::str::from_utf8(name).ok());
                match option {
                    Some(name) => format!(
                        "the value of {name} (argument {i}) is not valid UTF-8; it is not shown here, since it may be a secret"
                    ),
                    None => format!(
                        "argument {i} is not valid UTF-8; it is not shown here, since it may be a secret"
                    ),
                }
            })
        })
        .collect()
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
    // The server logs this among the config's warnings; other commands say it here.
    if !matches!(cli.command, Command::Server(_)) {
        let text = std::fs::read_to_string(&path).ok();
        if let Some(warning) = config::exposure_warning(&path, text.as_deref()) {
            eprintln!("warning: {warning}");
        }
    }
    let writes = matches!(
        cli.command,
        Command::AddApiKey(_)
            | Command::AddOAuth(_)
            | Command::OAuthCallback(_)
            | Command::RemoveAccount(_)
            | Command::EnableAccount(_)
            | Command::DisableAccount(_)
            | Command::SetAccount(_)
            | Command::AddClientKey(_)
            | Command::UpdateClientKey(_)
            | Command::RevokeClientKey(_)
    );
    let result = dispatch(&path, cli.command);
    if writes && result.is_ok() {
        // The change is in config.yaml; a running server honours it before we return.
        for pid in crate::applied::await_servers(&path) {
            eprintln!(
                "warning: the server running as pid {pid} has not applied this change yet (it will at its next check of {})",
                path.display()
            );
        }
    }
    result
}

fn dispatch(path: &std::path::Path, command: Command) -> Result<(), CliError> {
    let path = path.to_path_buf();
    match command {
        Command::Server(cmd) => {
            crate::memory::tune_allocator();
            let config = config::load(&path)?;
            server::run(config, cmd.listen).map_err(|e| CliError {
                exit: Exit::Failure,
                message: e.to_string(),
            })
        }
        Command::Init(cmd) => init::init(&path, cmd),
        Command::AddApiKey(cmd) => add_api_key(&path, cmd),
        Command::AddOAuth(cmd) => oauth::add_oauth(&path, cmd),
        Command::OAuthStart(cmd) => oauth::oauth_start(&path, cmd),
        Command::OAuthCallback(cmd) => oauth::oauth_callback(&path, cmd),
        Command::AddClientKey(cmd) => keys::add_client_key(&path, cmd),
        Command::ListAccounts(cmd) => list_accounts(&path, cmd.json),
        Command::ListClientKeys(cmd) => keys::list_client_keys(&path, cmd.json),
        Command::UpdateClientKey(cmd) => keys::update_client_key(&path, cmd),
        Command::RevokeClientKey(cmd) => keys::revoke_client_key(&path, cmd),
        Command::Usage(cmd) => usage::usage(&path, cmd),
        Command::SetAccount(cmd) => set_account(&path, cmd),
        Command::Status(cmd) => ops::status(&path, cmd),
        Command::HealthCheck(cmd) => ops::health_check(&path, cmd),
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

pub fn check_name(name: &str) -> Result<String, CliError> {
    let name = name.trim();
    if name.is_empty() || name.chars().any(char::is_control) {
        return Err(CliError::usage("--name must be non-empty and printable"));
    }
    Ok(name.to_string())
}

/// `prefix` + 8 random hex digits, not already in `taken`.
pub fn new_id(prefix: &str, taken: impl Fn(&str) -> bool) -> String {
    loop {
        let id = format!("{prefix}{}", encoding::hex(&secret::random_bytes::<4>()));
        if !taken(&id) {
            return id;
        }
    }
}

/// Prints rows under headers, columns aligned to their widest cell.
pub fn print_table<const N: usize>(headers: &[&str; N], rows: &[[String; N]]) {
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

/// A secret from exactly one of a flag, a file, or stdin (first non-empty line, trimmed).
/// Flags are accepted but the file or stdin keep it out of /proc and shell history.
pub fn read_secret(
    what: &str,
    flag: Option<&str>,
    file: Option<&str>,
    stdin_allowed: bool,
) -> Result<Secret, CliError> {
    let text = match (flag, file) {
        (Some(_), Some(_)) => {
            return Err(CliError::usage(format!(
                "give the {what} on the command line or in a file, not both"
            )));
        }
        (Some(value), None) => value.to_string(),
        (None, Some(file)) => std::fs::read_to_string(file)
            .map_err(|e| CliError::usage(format!("cannot read {file}: {e}")))?,
        (None, None) if stdin_allowed => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| CliError::usage(format!("cannot read the {what} from stdin: {e}")))?;
            text
        }
        (None, None) => String::new(),
    };
    let value = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    if value.is_empty() {
        return Err(CliError::usage(format!(
            "no {what} given: use the --…-file option, the flag, or pipe it on stdin"
        )));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(CliError::usage(format!(
            "the {what} contains spaces or non-printable characters"
        )));
    }
    Ok(Secret::new(value))
}

pub fn print_json(value: &serde_json::Value) {
    println!("{value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_utf8_arguments_are_refused_without_their_value() {
        use std::os::unix::ffi::OsStringExt;
        let args = |last: &[u8]| {
            vec![
                std::ffi::OsString::from("llm-gateway"),
                "add-api-key".into(),
                std::ffi::OsString::from_vec(last.to_vec()),
            ]
        };
        let err = text_args(args(b"--key=sk-ant-secret\xff").into_iter()).expect_err("refused");
        assert!(err.contains("--key") && err.contains("argument 2"), "{err}");
        assert!(!err.contains("sk-ant"), "{err}");
        let err = text_args(args(b"sk-ant-secret\xff").into_iter()).expect_err("refused");
        assert!(
            !err.contains("sk-ant") && err.contains("argument 2"),
            "{err}"
        );
        assert!(text_args(args(b"--json").into_iter()).is_ok());
    }

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
