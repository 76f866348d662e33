//! Live reload: the config watcher applies config.yaml changes without a restart (checked
//! every half second, or at once on SIGHUP), refuses a file that does not load, and names the
//! settings that need a restart.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

use crate::config::{self, Config};
use crate::gateway::{Gateway, known_models};
use crate::logger;
use crate::upstream::Upstream;

/// The watcher's memory, kept across its restarts: the config in force and the file version
/// it came from (recorded only once applied, so a version whose apply panicked is tried again).
pub(crate) struct Watched {
    pub(crate) running: Config,
    pub(crate) last: Stamp,
    /// The version being applied; still set after a restart when applying it panicked.
    pub(crate) applying: Stamp,
}

/// Applies config.yaml changes: checked every half second, and at once when `reload` says so
/// (SIGHUP, which also reloads an unchanged file). A file that does not load is refused with a
/// logged error and the running config stays; it is tried again at its next change. Settings
/// that need a restart are logged as such and keep their running value.
pub(crate) fn watch_config(gw: &Gateway, watched: &mut Watched, reload: &Receiver<()>) {
    let path = watched.running.path.clone();
    loop {
        crate::supervise::inject("config-watch");
        let forced = match reload.recv_timeout(Duration::from_millis(500)) {
            Ok(()) => true,
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(500));
                false
            }
        };
        let now = stamp(&path);
        if now == watched.last && !forced {
            continue;
        }
        if watched.applying.take().is_some_and(|v| Some(v) == now) {
            // Applying this very version panicked: tried again it would only panic again and
            // keep the watcher dying. The running config stays until the file changes.
            error!(
                "config.yaml could not be applied (the watcher failed on it); keeping the running config until the file changes"
            );
            watched.last = now;
            continue;
        }
        // An editor writing in place (truncate, then write) is read only once the file has
        // held still for a moment, so a half-written file is not taken for the new config.
        let now = settle(&path, now);
        if now.is_none() {
            // Loading would fall back to the embedded default: never apply that.
            error!(
                "config.yaml is gone ({}); keeping the running config",
                path.display()
            );
            gw.set_reload_error(Some(format!(
                "{}: config.yaml is gone; the running config stays",
                crate::time::rfc3339(crate::time::now_unix())
            )));
        } else {
            watched.applying = now;
            match config::load(&path) {
                Ok(fresh) => {
                    apply(gw, &watched.running, &fresh);
                    crate::applied::record(&path, &fresh.digest);
                    watched.running = fresh;
                    gw.set_reload_error(None);
                }
                Err(e) => {
                    error!("config changed but cannot be loaded, keeping the previous one: {e}");
                    gw.set_reload_error(Some(format!(
                        "{}: {e}; the running config stays",
                        crate::time::rfc3339(crate::time::now_unix())
                    )));
                }
            }
        }
        watched.applying = None;
        watched.last = now;
    }
}

/// What identifies a version of the file: writers that replace it by rename change the inode
/// even within one mtime tick, and one that writes in place changes the length or the mtime.
pub(crate) type Stamp = Option<(SystemTime, u64, u64)>;

pub(crate) fn stamp(path: &std::path::Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Waits (up to a second) until the file's stamp stops changing for 100 ms.
fn settle(path: &std::path::Path, mut seen: Stamp) -> Stamp {
    let give_up = Instant::now() + Duration::from_secs(1);
    while Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(100));
        let again = stamp(path);
        if again == seen {
            break;
        }
        seen = again;
    }
    seen
}

/// Applies what can change live and names what needs a restart.
fn apply(gw: &Gateway, old: &Config, fresh: &Config) {
    logger::set_level(fresh.log_level);
    gw.accounts.replace(fresh.accounts.clone());
    gw.accounts.set_settings(&fresh.balance);
    gw.clients.replace(fresh.client_keys.clone());
    gw.metrics.set_known_models(known_models(fresh));
    gw.replace_settings(fresh);
    if old.upstream != fresh.upstream {
        gw.replace_upstream(Upstream::new(&fresh.upstream, fresh.server.workers));
    }
    let mut oauth = old.oauth.clone();
    oauth.system_prompt.clone_from(&fresh.oauth.system_prompt);
    let restart = [
        ("server.listen", old.server.listen != fresh.server.listen),
        ("server.workers", old.server.workers != fresh.server.workers),
        (
            "server.accept_queue",
            old.server.accept_queue != fresh.server.accept_queue,
        ),
        (
            "server.shutdown_grace",
            old.server.shutdown_grace != fresh.server.shutdown_grace,
        ),
        (
            "server.worker_idle",
            old.server.worker_idle != fresh.server.worker_idle,
        ),
        (
            "server.reuse_port",
            old.server.reuse_port != fresh.server.reuse_port,
        ),
        ("admin.listen", old.admin_listen != fresh.admin_listen),
        ("auth.open", old.auth_open != fresh.auth_open),
        ("log.access_file", old.access_file != fresh.access_file),
        ("sticky", old.sticky != fresh.sticky),
        ("usage", old.usage != fresh.usage),
        ("state", old.state != fresh.state),
        ("oauth (other than system_prompt)", oauth != fresh.oauth),
    ];
    for (name, _) in restart.iter().filter(|(_, changed)| *changed) {
        warn!("config: {name} changed; this needs a restart, the running value stays");
    }
    info!(
        "config reloaded: {} accounts, {} client keys",
        fresh.accounts.len(),
        fresh.client_keys.len()
    );
}
