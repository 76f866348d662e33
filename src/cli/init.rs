//! `llm-gateway init`: the one command that creates a config. It writes the commented default
//! config (the shipped `config.yaml`, every setting at its default) owner-only, and the secret
//! key beside it, and refuses a file that is already there unless `--force`.

use std::path::Path;

use argh::FromArgs;
use serde_json::json;

use super::{CliError, Exit, print_json};
use crate::config::{self, ConfigError};

/// The shipped config.yaml: commented, every default shown, no accounts and no keys.
const DEFAULT_CONFIG: &str = include_str!("../../config.yaml");

#[derive(FromArgs)]
/// Create config.yaml (commented, every default shown, mode 0600) and its secret key file.
#[argh(subcommand, name = "init")]
pub struct Init {
    /// replace a config that exists (the secret key file is kept)
    #[argh(switch)]
    pub force: bool,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
}

pub fn init(path: &Path, cmd: Init) -> Result<(), CliError> {
    let failed = |message: String| CliError {
        exit: Exit::Failure,
        message,
    };
    if path.exists() && !cmd.force {
        return Err(CliError {
            exit: Exit::Config,
            message: format!(
                "{} exists; init does not replace a config (give --force to, the secret key file is kept)",
                path.display()
            ),
        });
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| failed(format!("cannot create {}: {e}", dir.display())))?;
    }
    let raw = config::parse_raw(path, DEFAULT_CONFIG)?;
    let keys = config::key_source(path, &raw);
    let had_key = keys.load().map_err(ConfigError::from)?.is_some();
    keys.load_or_create().map_err(ConfigError::from)?;
    crate::store::write_atomically(path, DEFAULT_CONFIG.as_bytes())
        .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))?;
    let key = if keys.env.is_some() {
        "$LLM_GATEWAY_SECRET_KEY".to_string()
    } else {
        keys.file.display().to_string()
    };
    if cmd.json {
        print_json(&json!({
            "config": path.display().to_string(),
            "secret_key": key,
            "secret_key_created": !had_key,
        }));
    } else {
        println!("wrote {} (mode 0600)", path.display());
        if had_key {
            println!("secret key: {key} (kept)");
        } else {
            println!("secret key: created {key} (mode 0600); back it up: sealed values need it");
        }
    }
    Ok(())
}
