//! Crashes during config writes (fault suite): `kill -9` at random moments while 20 CLI
//! processes and the server's token refresher write `config.yaml`. After every round the file
//! parses, every write a CLI reported done is there, and the refresh token the server saved is
//! at least the last one it acknowledged (it logs a refresh only after saving it); only a grant
//! still in flight at the kill may be lost, and then the account says `needs_login`.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::support::{
    Config, FakeTokenEndpoint, FakeUpstream, Gateway, Reply, Script, Server, assert_exit,
    wait_until,
};

/// CLI processes writing at once.
const WRITERS: usize = 20;

/// A small xorshift generator: the test's randomness, reproducible from the printed seed.
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (xorshift needs it nonzero).
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn seeded() -> Rng {
        let seed = std::env::var("FAULTS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .expect("clock after 1970")
                    .as_nanos() as u64
                    | 1
            });
        println!("FAULTS_SEED={seed}");
        Rng(seed)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// What the CLI writers managed, across rounds: what must be in the file.
#[derive(Default)]
struct Written {
    accounts: BTreeSet<String>,
    client_keys: BTreeSet<String>,
    /// An account's `enabled` when its last toggle exited 0; `None` while a later toggle was
    /// killed (it may or may not have landed).
    enabled: BTreeMap<String, Option<bool>>,
    done: usize,
    killed: usize,
}

/// Runs one CLI command; with `kill_after`, SIGKILLs it after that long. Returns the parsed
/// stdout if it exited 0, `None` if it died by the signal; any other ending fails the test.
fn cli(gw: &Gateway, args: &[&str], kill_after: Option<Duration>) -> Option<Value> {
    let mut child: Child = gw
        .cli(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the CLI");
    if let Some(delay) = kill_after {
        thread::sleep(delay); // the fault: a kill at a random moment
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("wait for the CLI");
    if out.status.success() {
        return Some(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null));
    }
    assert_eq!(
        out.status.signal(),
        Some(9),
        "{args:?} failed without being killed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    None
}

/// One writer's share of a round: add accounts and client keys, toggle its own accounts,
/// and kill a quarter of its own processes at random moments.
fn writer(gw: &Gateway, w: usize, seed: u64, stop: &AtomicBool, written: &Mutex<Written>) {
    let mut rng = Rng::new(seed);
    let mut mine: Vec<(String, bool)> = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let kill = (rng.below(4) == 0).then(|| Duration::from_millis(rng.below(40)));
        let name = format!("w{w}-{seed:x}-{n}");
        match rng.below(3) {
            0 if !mine.is_empty() => {
                let i = rng.below(mine.len() as u64) as usize;
                let (id, enabled) = mine[i].clone();
                let op = if enabled {
                    "disable-account"
                } else {
                    "enable-account"
                };
                let result = cli(gw, &[op, "--account-id", &id], kill);
                let mut w = written.lock().expect("written");
                if result.is_some() {
                    mine[i].1 = !enabled;
                    w.enabled.insert(id, Some(!enabled));
                    w.done += 1;
                } else {
                    // Landed or not: the next toggle that exits 0 settles it.
                    mine[i].1 = !enabled;
                    w.enabled.insert(id, None);
                    w.killed += 1;
                }
            }
            1 => {
                let result = cli(gw, &["add-client-key", "--name", &name, "--json"], kill);
                let mut w = written.lock().expect("written");
                match result {
                    Some(v) => {
                        let id = v["id"].as_str().expect("add-client-key id").to_string();
                        w.client_keys.insert(id);
                        w.done += 1;
                    }
                    None => w.killed += 1,
                }
            }
            _ => {
                // Unique like the name: an upstream key is held by one account only.
                let key = format!("sk-ant-api03-StateFault-{name}");
                let args = ["add-api-key", "--name", &name, "--key", &key, "--json"];
                let result = cli(gw, &args, kill);
                let mut w = written.lock().expect("written");
                match result {
                    Some(v) => {
                        let id = v["id"].as_str().expect("add-api-key id").to_string();
                        w.accounts.insert(id.clone());
                        w.enabled.insert(id.clone(), Some(true));
                        mine.push((id, true));
                        w.done += 1;
                    }
                    None => w.killed += 1,
                }
            }
        }
    }
}

fn list(gw: &Gateway, command: &str) -> Vec<Value> {
    let out = gw.run_cli(&[command, "--json"]);
    assert_exit(&out, 0, command);
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap_or_else(|e| panic!("{command} --json is not JSON ({e})"))
        .as_array()
        .expect("an array")
        .clone()
}

/// Checks that config.yaml parses and holds every write a CLI reported done.
fn assert_writes_kept(gw: &Gateway, written: &Written, round: usize) {
    let accounts = list(gw, "list-accounts");
    let by_id: BTreeMap<&str, &Value> = accounts
        .iter()
        .map(|a| (a["id"].as_str().expect("id"), a))
        .collect();
    for id in &written.accounts {
        let row = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("round {round}: account {id} was added (exit 0) but lost"));
        if let Some(Some(enabled)) = written.enabled.get(id) {
            assert_eq!(
                row["enabled"], *enabled,
                "round {round}: account {id}'s last toggle (exit 0) was lost: {row}"
            );
        }
    }
    let keys: BTreeSet<String> = list(gw, "list-client-keys")
        .iter()
        .map(|k| k["id"].as_str().expect("id").to_string())
        .collect();
    for id in &written.client_keys {
        assert!(
            keys.contains(id),
            "round {round}: client key {id} was added (exit 0) but lost"
        );
    }
}

/// The config of a gateway on `up` whose OAuth accounts get their tokens from `tokens`, with
/// the OAuth rig's timings (`oauth::rig`).
fn oauth_config(up: &FakeUpstream, tokens: &FakeTokenEndpoint) -> Config {
    Config::new(up.base_url())
        .oauth("authorize_url", tokens.authorize_url())
        .oauth("token_url", tokens.token_url())
        .oauth("refresh_min_interval", "1s")
        .oauth("token_timeout", "5s")
}

/// Adds an OAuth account through the CLI and logs it in (a code exchange: one grant); its id.
fn add_logged_in_oauth(gw: &Gateway, name: &str, client_id: &str) -> String {
    let out = gw.run_cli(&[
        "add-oauth",
        "--name",
        name,
        "--client-id",
        client_id,
        "--json",
    ]);
    assert_exit(&out, 0, "add-oauth");
    let v: Value = serde_json::from_slice(&out.stdout).expect("add-oauth JSON");
    let id = v["id"].as_str().expect("id").to_string();
    gw.oauth_login(&id, "code-state-fault");
    id
}

/// The grant number in a token the fake endpoint issued (`rt-7-…` → 7).
fn grant_number(token: &str) -> u32 {
    token
        .split('-')
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not an issued token: {token:?}"))
}

/// Grants the endpoint has issued (200 answers to exchanges and refreshes).
fn issued(tokens: &FakeTokenEndpoint) -> u32 {
    tokens.answers().iter().filter(|a| a.status == 200).count() as u32
}

/// Starts a server and checks the refresh token it finds in config.yaml: its first refresh
/// presents grant `n`, and `n` must be at least `acked` (the last grant a server saved). If
/// `n` is older than the last grant issued, the one in flight at the kill was lost: the
/// endpoint refuses `n` and the account must say `needs_login`; it is logged in again.
/// Returns the running server and the grant it holds (acknowledged).
fn check_tokens(
    gw: &Gateway,
    tokens: &FakeTokenEndpoint,
    id: &str,
    acked: u32,
    lost: &mut usize,
) -> (Server, u32) {
    let before = tokens.refreshes().len();
    let server = gw.spawn_server(&[]);
    wait_until(
        "the restarted server refreshes",
        Duration::from_secs(10),
        || {
            tokens
                .answers()
                .iter()
                .filter(|a| a.grant_type == "refresh_token")
                .count()
                > before
        },
    );
    let presented = tokens.refreshes()[before]["refresh_token"]
        .as_str()
        .expect("refresh_token presented")
        .to_string();
    let n = grant_number(&presented);
    let answer = tokens
        .answers()
        .into_iter()
        .filter(|a| a.grant_type == "refresh_token")
        .nth(before)
        .expect("the answer");
    assert!(
        n >= acked,
        "the saved refresh token is grant {n}, but grant {acked} had been saved and acknowledged"
    );
    if answer.status == 200 {
        return (server, issued(tokens));
    }
    // Only the grant in flight at the kill may be lost.
    assert_eq!(
        n + 1,
        issued(tokens),
        "refused grant {n}: more than the in-flight grant was lost"
    );
    *lost += 1;
    let mut server = server;
    wait_until(
        "the account says needs_login",
        Duration::from_secs(5),
        || {
            list(gw, "list-accounts")
                .iter()
                .any(|a| a["id"] == id && a["state"] == "needs_login")
        },
    );
    server.kill();
    gw.oauth_login(id, "code-state-fault");
    check_tokens(gw, tokens, id, issued(tokens), lost)
}

/// How many grants a server acknowledged: each `refreshed the token` line comes after the save.
fn acknowledged(stderr: &str) -> u32 {
    stderr
        .lines()
        .filter(|l| l.contains("refreshed the token of account") && !l.contains("could NOT"))
        .count() as u32
}

/// Rounds on one config.yaml: the CLI writers only add, so a file past a few hundred accounts
/// would make later rounds measure the file's size; the long form starts afresh every so often.
const ROUNDS_PER_FILE: usize = 25;

#[test]
fn kill_9_during_cli_and_refresher_writes_never_loses_a_completed_write() {
    // With 20 CLI writers and the token refresher racing on config.yaml and SIGKILLs landing at
    // random moments (CLIs and the server), the file always parses, every write that exited 0
    // is kept, and no refresh token the server saved is lost.
    let rounds = if super::long() { 300 } else { 10 };
    let mut rng = Rng::seeded();
    let mut total = Tally::default();
    let mut left = rounds;
    while left > 0 {
        let n = left.min(ROUNDS_PER_FILE);
        let tally = kill_rounds(n, &mut rng);
        total.done += tally.done;
        total.killed += tally.killed;
        total.server_kills += tally.server_kills;
        total.issued += tally.issued;
        total.lost += tally.lost;
        left -= n;
    }
    println!(
        "{rounds} rounds: {} CLI writes done, {} CLI processes killed, {} server kills, {} \
         grants issued, {} in-flight grants lost (needs_login, logged in again)",
        total.done, total.killed, total.server_kills, total.issued, total.lost
    );
}

#[derive(Default)]
struct Tally {
    done: usize,
    killed: usize,
    server_kills: usize,
    issued: u32,
    lost: usize,
}

/// `rounds` kill rounds on a fresh config.yaml, with every check made after each.
fn kill_rounds(rounds: usize, rng: &mut Rng) -> Tally {
    let up = FakeUpstream::json(200, "{}");
    let tokens = FakeTokenEndpoint::start(Script {
        exchange_expires_in: 2,
        refresh_expires_in: 2,
        rotate: true,
        ..Script::default()
    });
    let gw = Gateway::new(&oauth_config(&up, &tokens));
    let id = add_logged_in_oauth(&gw, "refreshed", "client-state-fault");
    let mut acked = issued(&tokens);

    let written = Mutex::new(Written::default());
    let (mut server_kills, mut lost) = (0, 0);
    for round in 0..rounds {
        let (mut server, held) = check_tokens(&gw, &tokens, &id, acked, &mut lost);
        let stop = AtomicBool::new(false);
        let seeds: Vec<u64> = (0..WRITERS).map(|_| rng.below(u64::MAX)).collect();
        thread::scope(|s| {
            for (w, &seed) in seeds.iter().enumerate() {
                let (gw, stop, written) = (&gw, &stop, &written);
                s.spawn(move || writer(gw, w, seed, stop, written));
            }
            // The server dies at a random moment while the writers run.
            thread::sleep(Duration::from_millis(200 + rng.below(1000)));
            server.kill();
            server_kills += 1;
            stop.store(true, Ordering::SeqCst);
        });
        // Grants to this server are numbered from `held` on; the last one it logged is the
        // last it saved.
        let logged = acknowledged(&server.stderr());
        if logged > 0 {
            acked = held + logged - 1;
        }
        let written = written.lock().expect("written");
        assert_writes_kept(&gw, &written, round);
    }
    let (_server, _) = check_tokens(&gw, &tokens, &id, acked, &mut lost);
    let written = written.lock().expect("written");
    Tally {
        done: written.done,
        killed: written.killed,
        server_kills,
        issued: issued(&tokens),
        lost,
    }
}

/// A small tmpfs mounted over a directory, unmounted (lazily, so a process still inside it
/// cannot keep it) when dropped, even if the test failed.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` over `dir`, keeping the directory's files; `Err` says why not.
    fn mount_over(dir: &std::path::Path, size: &str) -> Result<Tmpfs, String> {
        let aside = dir.with_extension("aside");
        let copy = |from: &std::path::Path, to: &std::path::Path| -> std::io::Result<()> {
            std::fs::create_dir_all(to)?;
            for entry in std::fs::read_dir(from)? {
                let entry = entry?;
                std::fs::copy(entry.path(), to.join(entry.file_name()))?;
            }
            Ok(())
        };
        copy(dir, &aside).map_err(|e| format!("copy aside: {e}"))?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&aside);
            return Err(format!(
                "mount refused: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let guard = Tmpfs(dir.to_path_buf());
        copy(&aside, dir).map_err(|e| format!("copy back: {e}"))?;
        let _ = std::fs::remove_dir_all(&aside);
        Ok(guard)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the filesystem holding `dir` to the last byte; returns the filler's path.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).expect("create the filler");
    let block = [0u8; 4096];
    while file.write_all(&block).is_ok() {}
    while file.write_all(&[0u8]).is_ok() {}
    let _ = file.sync_all();
    path
}

#[test]
fn a_full_disk_fails_writes_clearly_keeps_the_old_config_and_the_server_serving() {
    // On a full filesystem, CLI writes exit 1 saying the disk is full, a refreshed token that
    // cannot be saved is logged and kept in memory (the server keeps serving with it and saves
    // it once space returns), and config.yaml stays as it was and parses.
    // The upstream refuses the first access token, so the first request makes the server
    // refresh (and try to save) while the disk is full.
    let first = format!("Bearer {}", crate::support::access_token(1));
    let up = FakeUpstream::start(move |req| {
        if req.header("authorization") == Some(first.as_str()) {
            Reply::json(
                401,
                r#"{"type":"error","error":{"type":"authentication_error","message":"expired"}}"#,
            )
        } else {
            Reply::json(200, r#"{"id":"msg_disk","type":"message","content":[]}"#)
        }
    });
    let tokens = FakeTokenEndpoint::start(Script {
        rotate: true,
        ..Script::default()
    });
    let mut gw = Gateway::new(&oauth_config(&up, &tokens).admin_listen("127.0.0.1:0"));
    gw.add_client_key("tests");
    let id = add_logged_in_oauth(&gw, "disk", "client-disk-fault");

    let _tmpfs = match Tmpfs::mount_over(gw.dir(), "256k") {
        Ok(guard) => guard,
        Err(why) => {
            crate::support::skipped(
                "faults::state::a_full_disk_fails_writes_clearly_keeps_the_old_config_and_the_server_serving",
                &format!("a full disk needs a tmpfs mount ({why})"),
            );
            return;
        }
    };
    gw.start();
    let before = gw.config_text();
    let filler = fill(gw.dir());

    // CLI writes fail with the run-time exit code and say why.
    let cases: [&[&str]; 3] = [
        &[
            "add-api-key",
            "--name",
            "full",
            "--key",
            crate::support::ACCOUNT_KEY,
        ],
        &["add-client-key", "--name", "full"],
        &["disable-account", "--account-id", &id],
    ];
    for args in cases {
        let out = gw.run_cli(args);
        assert_exit(&out, 1, &format!("{args:?} on a full disk"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("No space left on device"),
            "{args:?}: the message should say the disk is full: {stderr}"
        );
        assert_eq!(gw.config_text(), before, "{args:?} changed config.yaml");
    }

    // A request makes the server refresh; the save fails, is logged, and the new token serves
    // from memory, now and for the next request.
    for n in 0..2 {
        let resp = crate::support::accounts::post(&gw);
        assert_eq!(resp.status, 200, "request {n}: {}", resp.text());
        let used = up
            .requests()
            .last()
            .expect("a request upstream")
            .header("authorization")
            .map(str::to_string);
        let latest = format!("Bearer {}", crate::support::access_token(issued(&tokens)));
        assert_eq!(
            used,
            Some(latest),
            "request {n}: the in-memory token serves"
        );
    }
    assert_eq!(issued(&tokens), 2, "one refresh");
    assert!(gw.stderr().contains("could NOT save it"), "{}", gw.stderr());
    let status = crate::support::accounts::admin_status(&gw);
    let row = crate::support::accounts::account(&status, &id);
    assert!(
        row["persist_error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left on device")),
        "{row}"
    );
    assert_eq!(
        gw.config_text(),
        before,
        "the failed save changed config.yaml"
    );
    assert_exit(
        &gw.run_cli(&["list-accounts", "--json"]),
        0,
        "config.yaml parses",
    );

    // Space returns: the refresher saves the tokens it holds.
    std::fs::remove_file(&filler).expect("remove the filler");
    wait_until(
        "the unsaved tokens are saved",
        Duration::from_secs(10),
        || {
            let status = crate::support::accounts::admin_status(&gw);
            crate::support::accounts::account(&status, &id)["persist_error"].is_null()
        },
    );
    assert!(
        gw.stderr().contains("saved the rotated tokens"),
        "{}",
        gw.stderr()
    );
    gw.stop();
}
