//! How the CLI knows a running server has taken its change. A server leaves beside
//! config.yaml a small file per process, `.config.yaml.applied-<pid>`, holding the digest of
//! the config text it runs on, rewritten at every reload and removed at exit. After a write,
//! the CLI asks each live server to reload now (SIGHUP) and waits, briefly, until each file
//! holds the digest of what is in config.yaml: so a key just added is accepted, and an account
//! just enabled serves, before the command returns. No network and no admin key are involved;
//! a server the CLI may not signal (another user's) still picks the change up within a second.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a command waits for the running servers to apply its change.
const WAIT: Duration = Duration::from_secs(3);

/// The digest a server records, of the config text exactly as it read it.
pub fn digest(text: &str) -> String {
    crate::encoding::hex(&crate::secret::sha256(text.as_bytes()))
}

/// `dir` and the name prefix of the acknowledgement files for `config`.
fn prefix(config: &Path) -> (PathBuf, String) {
    let dir = config.parent().unwrap_or(Path::new(".")).to_path_buf();
    let dir = if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir
    };
    let name = config.file_name().map_or_else(
        || "config.yaml".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    (dir, format!(".{name}.applied-"))
}

fn own_file(config: &Path) -> PathBuf {
    let (dir, prefix) = prefix(config);
    dir.join(format!("{prefix}{}", std::process::id()))
}

/// Who wrote an acknowledgement: the boot it ran in and its start time, so a file left by a
/// server that died (its pid reused since) or by another host sharing the directory is never
/// taken for a live server.
fn identity(pid: &str) -> Option<(String, String)> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state …`: the command may hold spaces and parentheses; field 22 is the
    // start time, the 20th after the closing parenthesis.
    let started = stat.rsplit_once(')')?.1.split_whitespace().nth(19)?;
    Some((boot.trim().to_string(), started.to_string()))
}

/// The server: records that this process now runs on the config whose text had `digest`.
pub fn record(config: &Path, digest: &str) {
    let Some((boot, started)) = identity("self") else {
        return;
    };
    let text = format!("{digest}\n{boot}\n{started}\n");
    if let Err(e) = crate::store::write_atomically(&own_file(config), text.as_bytes()) {
        debug!(
            "cannot record the applied config beside {}: {e}",
            config.display()
        );
    }
}

/// The digest an acknowledgement file holds.
fn acknowledged(file: &Path) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().next().map(String::from)
}

/// The server, at exit.
pub fn forget(config: &Path) {
    let _ = std::fs::remove_file(own_file(config));
}

/// The CLI, after writing `config`: nudges every live server on it and waits until each
/// runs on what the file holds now. Returns the pids that had not within the wait.
pub fn await_servers(config: &Path) -> Vec<u32> {
    let servers = live_servers(config);
    if servers.is_empty() {
        return Vec::new();
    }
    for (pid, _) in &servers {
        crate::sys::hang_up(*pid);
    }
    let give_up = Instant::now() + WAIT;
    loop {
        let want = std::fs::read_to_string(config).map(|t| digest(&t)).ok();
        let behind: Vec<u32> = (servers.iter())
            .filter(|(_, file)| acknowledged(file) != want)
            .filter(|(pid, _)| crate::sys::is_alive(*pid))
            .map(|(pid, _)| *pid)
            .collect();
        if behind.is_empty() || Instant::now() >= give_up {
            return behind;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The servers with an acknowledgement file for `config` that are still running this very
/// program: written in this boot (another host's files are left alone) by the process that
/// holds the pid now (same start time). A file whose writer is gone is removed.
fn live_servers(config: &Path) -> Vec<(u32, PathBuf)> {
    let (dir, prefix) = prefix(config);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let Some((our_boot, _)) = identity("self") else {
        return Vec::new();
    };
    let mut servers = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = (name.to_str())
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let mut lines = text.lines().skip(1);
        let (boot, started) = (lines.next(), lines.next());
        if boot != Some(our_boot.as_str()) {
            continue;
        }
        let holder = identity(&pid.to_string());
        if holder.as_ref().map(|(_, s)| s.as_str()) != started {
            // The writer is gone (its pid free, or reused by another process since).
            let _ = std::fs::remove_file(entry.path());
            continue;
        }
        // A pid reused by some other program is never signalled.
        if crate::sys::runs_this_program(pid) {
            servers.push((pid, entry.path()));
        }
    }
    servers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_sit_beside_the_config_and_name_the_process() {
        let (dir, prefix) = prefix(Path::new("/etc/gw/config.yaml"));
        assert_eq!(dir, PathBuf::from("/etc/gw"));
        assert_eq!(prefix, ".config.yaml.applied-");
        assert_eq!(
            prefix_of_bare(),
            (PathBuf::from("."), ".c.yaml.applied-".into())
        );
        assert_ne!(digest("a"), digest("b"));
    }

    fn prefix_of_bare() -> (PathBuf, String) {
        prefix(Path::new("c.yaml"))
    }
}
