//! Lifecycle faults: SIGTERM/SIGINT drain in-flight streams then exit 0 (a second signal exits
//! at once), config.yaml changes apply live without dropping streams (invalid edits refused,
//! SIGHUP forces a reload), and a secret key file others can read is refused.

use std::net::TcpStream;
use std::sync::mpsc;
use std::time::Duration;

use crate::support::{
    ACCOUNT_KEY, Config, FakeUpstream, Gateway, MESSAGE_BODY, Reply, assert_exit, call, open_sse,
    sse_events, wait_until,
};

const DELTAS: usize = 3;

/// A gateway whose upstream holds the first request's stream at a gate (one event per send);
/// later requests get a small JSON answer.
fn gated() -> (Gateway, FakeUpstream, mpsc::Sender<()>) {
    gated_with(|yaml| yaml)
}

/// `gated`, with the config's YAML edited by `edit` first.
fn gated_with(edit: fn(String) -> String) -> (Gateway, FakeUpstream, mpsc::Sender<()>) {
    let (up, gate) = FakeUpstream::gated_first(sse_events(DELTAS), |_| {
        Reply::json(200, r#"{"id":"msg_1","type":"message","content":[]}"#)
    });
    let mut gw = Gateway::with_yaml(&edit(Config::new(up.base_url()).yaml()));
    gw.add_api_key("primary", ACCOUNT_KEY);
    gw.add_client_key("tests");
    gw.start();
    (gw, up, gate)
}

/// Opens a stream and reads its first event, so it is in flight at the gateway.
fn open_stream(gw: &Gateway) -> crate::support::SseStream {
    let mut sse = open_sse(
        gw.addr(),
        "/v1/messages",
        &[gw.auth(), ("connection", "close")],
        br#"{"model":"claude-sonnet-4-5","max_tokens":16,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    );
    let first = sse.next_event().expect("first event");
    assert_eq!(first.field("event"), Some("message_start"));
    sse
}

/// Releases the rest of the gated stream and reads it to its end; the last event's name.
fn finish(gate: &mpsc::Sender<()>, mut sse: crate::support::SseStream) -> Option<String> {
    for _ in 1..sse_events(DELTAS).len() {
        let _ = gate.send(());
    }
    let mut last = None;
    while let Some(event) = sse.next_event() {
        last = event.field("event").map(str::to_string);
    }
    last
}

/// SIGTERM while a stream is in flight: new connections are refused at once, the stream
/// still completes (message_stop), and the process then exits 0 saying nothing was cut.
#[test]
fn sigterm_drains_a_stream_in_flight_refuses_new_connections_and_exits_0() {
    let (mut gw, _up, gate) = gated();
    let addr = gw.addr();
    let sse = open_stream(&gw);
    gw.signal("TERM");
    wait_until("the listener closes", Duration::from_secs(5), || {
        TcpStream::connect(addr).is_err()
    });
    assert!(
        gw.wait_exit(Duration::from_millis(300)).is_none(),
        "the server waits for the stream in flight"
    );
    assert_eq!(finish(&gate, sse).as_deref(), Some("message_stop"));
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .expect("exits once nothing is in flight");
    assert_eq!(status.code(), Some(0), "stderr:\n{}", gw.stderr());
    let log = gw.stderr();
    assert!(log.contains("SIGTERM: shutting down"), "{log}");
    assert!(log.contains("shutdown: nothing in flight"), "{log}");
}

/// A second SIGINT during the drain exits at once with 130 (128 + SIGINT), cutting the stream.
#[test]
fn second_signal_exits_at_once_with_128_plus_the_signal() {
    let (mut gw, _up, _gate) = gated();
    let _sse = open_stream(&gw);
    gw.signal("INT");
    wait_until("the drain starts", Duration::from_secs(5), || {
        gw.stderr().contains("SIGINT: shutting down")
    });
    gw.signal("INT");
    let status = gw
        .wait_exit(Duration::from_secs(5))
        .expect("a second signal exits at once");
    assert_eq!(status.code(), Some(130), "stderr:\n{}", gw.stderr());
}

/// With a short grace, a stream that never finishes is cut when the grace ends: exit 0 and the
/// log counts what was cut.
#[test]
fn shutdown_grace_bounds_the_wait_and_logs_what_was_cut() {
    let (mut gw, _up, _gate) = gated_with(|yaml| {
        yaml.replace(
            "keepalive_timeout: 5s",
            "keepalive_timeout: 5s\n  shutdown_grace: 1s",
        )
    });
    let _sse = open_stream(&gw);
    gw.signal("TERM");
    let status = gw
        .wait_exit(Duration::from_secs(5))
        .expect("exits when the grace ends");
    assert_eq!(status.code(), Some(0));
    let log = gw.stderr();
    assert!(
        log.contains("grace of 1s over; cutting 1 requests still in flight"),
        "{log}"
    );
}

/// A body of 200 bytes: within the harness's 1 MiB limit, over a limit of 100.
fn mid_body() -> String {
    MESSAGE_BODY.replace("\"hi\"", &format!("\"{}\"", "h".repeat(120)))
}

fn post(gw: &Gateway, body: &str) -> u16 {
    call(
        gw.addr(),
        "POST",
        "/v1/messages",
        &[gw.auth()],
        body.as_bytes(),
    )
    .status
}

/// Live reload: a stream in flight while the config changes (a new account, a smaller body
/// limit) completes; the new limit applies to the next request; an invalid edit is logged and
/// the old config stays; a later valid edit applies; SIGHUP applies an edit the watcher cannot
/// see (same size, same inode, mtime restored).
#[test]
fn config_changes_apply_live_without_dropping_streams_and_invalid_edits_are_refused() {
    let (gw, _up, gate) = gated();
    let path = gw.config_path();
    let original = gw.config_text();
    let sse = open_stream(&gw);

    // A CLI change (rename) and an in-place edit while the stream is open.
    gw.add_api_key("second", "sk-ant-api03-SECONDaccountKEYforTESTS-Zq7x");
    let limited = gw
        .config_text()
        .replace("max_body_bytes: 1048576", "max_body_bytes:     100");
    std::fs::write(&path, &limited).expect("edit config.yaml");
    wait_until("the new limit applies", Duration::from_secs(5), || {
        post(&gw, &mid_body()) == 413
    });
    assert!(gw.stderr().contains("config reloaded: 2 accounts"));
    assert_eq!(finish(&gate, sse).as_deref(), Some("message_stop"));

    // An invalid edit: logged, and the running config (limit 100) stays.
    std::fs::write(&path, "server: [this is not\n").expect("write a broken config");
    wait_until("the refusal is logged", Duration::from_secs(5), || {
        gw.stderr()
            .contains("cannot be loaded, keeping the previous one")
    });
    assert_eq!(post(&gw, &mid_body()), 413, "the old config stays");
    assert_eq!(post(&gw, MESSAGE_BODY), 200, "requests are still served");

    // A later valid edit applies.
    std::fs::write(&path, &original).expect("restore config.yaml");
    wait_until("the valid edit applies", Duration::from_secs(5), || {
        post(&gw, &mid_body()) == 200
    });

    // Same size, same inode, mtime put back: only SIGHUP makes it apply.
    let reference = gw.dir().join("mtime-ref");
    std::fs::write(&reference, "").expect("reference file");
    let touch = |from: &std::path::Path, to: &std::path::Path| {
        let ok = std::process::Command::new("touch")
            .arg("-r")
            .arg(from)
            .arg(to)
            .status()
            .expect("run touch");
        assert!(ok.success());
    };
    touch(&path, &reference);
    let same_size = original.replace("max_body_bytes: 1048576", "max_body_bytes:     100");
    assert_eq!(same_size.len(), original.len());
    {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open config.yaml in place");
        f.seek(std::io::SeekFrom::Start(0)).expect("seek");
        f.write_all(same_size.as_bytes()).expect("write in place");
    }
    touch(&reference, &path);
    let reloads = gw.stderr().matches("config reloaded").count();
    gw.signal("HUP");
    wait_until("SIGHUP reloads", Duration::from_secs(5), || {
        gw.stderr().matches("config reloaded").count() > reloads
    });
    assert_eq!(post(&gw, &mid_body()), 413, "the SIGHUP reload applied");
}

/// A key file group or others can read: the server and CLI commands that open secrets refuse
/// with exit 4 and say `chmod 600 PATH`; a config.yaml with sealed secrets readable by others
/// only warns. Files the gateway creates are 0600.
#[test]
fn key_file_readable_by_others_is_refused_and_exposed_config_only_warns() {
    use std::os::unix::fs::PermissionsExt;
    let mut gw = Gateway::new(&Config::new("http://127.0.0.1:9"));
    gw.add_api_key("primary", ACCOUNT_KEY);
    gw.add_client_key("tests");
    let key = gw.dir().join("gateway.key");
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(&key), 0o600, "the key file is created 0600");
    assert_eq!(
        mode(&gw.config_path()),
        0o600,
        "config.yaml is rewritten 0600"
    );

    std::fs::set_permissions(gw.config_path(), std::fs::Permissions::from_mode(0o644))
        .expect("chmod config");
    let out = gw.run_cli(&["list-accounts"]);
    assert_exit(&out, 0, "an exposed config.yaml only warns");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning:") && err.contains("chmod 600"),
        "{err}"
    );

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).expect("chmod key");
    let expected = format!("chmod 600 {}", key.display());
    let out = gw.run_cli(&["list-accounts"]);
    assert_exit(&out, 4, "list-accounts with an exposed key file");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&expected));
    let out = gw.run_cli(&["server"]);
    assert_exit(&out, 4, "server with an exposed key file");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&expected));
}
