//! The command line: adding and managing accounts and client keys, config and secret-key errors, exit codes.

use std::net::TcpListener;
use std::thread;

use serde_json::Value;

use crate::support::{
    Config, FakeUpstream, Gateway, TempDir, assert_exit, base64, call, in_parallel, masked,
    post_message, printed, run,
};

/// A base URL for tests that never start the server.
const NO_UPSTREAM: &str = "http://127.0.0.1:9";

fn stdout_json(out: &std::process::Output, what: &str) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `list-accounts --json`, checked for exit 0 and an array.
fn list_accounts(gw: &Gateway) -> Vec<Value> {
    let out = gw.run_cli(&["list-accounts", "--json"]);
    assert_exit(&out, 0, "list-accounts");
    stdout_json(&out, "list-accounts --json")
        .as_array()
        .expect("list-accounts --json prints an array")
        .clone()
}

fn find<'a>(accounts: &'a [Value], id: &str) -> Option<&'a Value> {
    accounts.iter().find(|a| a["id"] == id)
}

#[test]
fn add_api_key_four_ways_stores_only_sealed_secrets() {
    let gw = Gateway::new(&Config::new(NO_UPSTREAM));
    let keys = [
        "sk-ant-api03-EqualsFormSecretAAAA-k1a1",
        "sk-ant-api03-SpacedFormSecretBBBB-k2b2",
        "sk-ant-api03-KeyFileSecretCCCCCC-k3c3",
        "sk-ant-api03-StdinFormSecretDDDDD-k4d4",
    ];
    let key_file = gw.dir().join("upstream.key");
    std::fs::write(&key_file, format!("{}\n", keys[2])).expect("write key file");
    let key_file = key_file.to_str().expect("utf-8 temp path").to_string();
    let equals = format!("--key={}", keys[0]);

    let outputs = [
        gw.run_cli(&["add-api-key", "--name", "one", &equals, "--json"]),
        gw.run_cli(&["add-api-key", "--name=two", "--key", keys[1], "--json"]),
        gw.run_cli(&[
            "add-api-key",
            "--name",
            "three",
            "--key-file",
            &key_file,
            "--json",
        ]),
        gw.run_cli_stdin(
            &["add-api-key", "--name", "four", "--json"],
            format!("  {}  \r\nnot part of the key\n", keys[3]).as_bytes(),
        ),
    ];
    let names = ["one", "two", "three", "four"];
    let mut ids = Vec::new();
    for ((out, name), key) in outputs.iter().zip(names).zip(keys) {
        assert_exit(out, 0, name);
        let v = stdout_json(out, name);
        let id = v["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: id in {v}"));
        assert!(id.starts_with("acc_"), "{name}: id {id}");
        assert_eq!(v["name"], name);
        assert_eq!(v["kind"], "api_key", "{name}");
        assert_eq!(v["key"], masked(key).as_str(), "{name}: masked key");
        ids.push(id.to_string());
    }

    let list = gw.run_cli(&["list-accounts", "--json"]);
    assert_exit(&list, 0, "list-accounts");
    let accounts = stdout_json(&list, "list-accounts");
    let accounts = accounts.as_array().expect("array");
    assert_eq!(accounts.len(), 4);
    for ((id, name), key) in ids.iter().zip(names).zip(keys) {
        let a = find(accounts, id).unwrap_or_else(|| panic!("{name} ({id}) listed"));
        assert_eq!(a["name"], name);
        assert_eq!(a["kind"], "api_key");
        assert_eq!(a["enabled"], true);
        assert_eq!(a["key"], masked(key).as_str());
    }

    let config = gw.config_text();
    assert!(
        config.matches("enc:v1:").count() >= 4,
        "each key sealed as enc:v1:\n{config}"
    );
    assert!(
        gw.dir().join("gateway.key").is_file(),
        "gateway.key created beside the config"
    );
    for key in keys {
        let secret_part = &key["sk-ant-api03-".len()..];
        assert!(
            !config.contains(secret_part),
            "config.yaml holds {key} in clear"
        );
        for out in outputs.iter().chain([&list]) {
            let text = printed(out);
            assert!(
                !text.contains(secret_part),
                "CLI output shows {key} in clear: {text}"
            );
        }
    }
}

#[test]
fn config_path_can_come_from_the_environment() {
    let gw = Gateway::new(&Config::new(NO_UPSTREAM));
    let id = gw.add_api_key("from-env", "sk-ant-api03-EnvironmentConfig-e5e5");
    let elsewhere = TempDir::new();

    let mut cmd = gw.command();
    cmd.current_dir(elsewhere.path())
        .env("LLM_GATEWAY_CONFIG", gw.config_path())
        .args(["list-accounts", "--json"]);
    let out = run(cmd, None);

    assert_exit(&out, 0, "list-accounts via LLM_GATEWAY_CONFIG");
    let accounts = stdout_json(&out, "list-accounts");
    let accounts = accounts.as_array().expect("array");
    assert!(
        find(accounts, &id).is_some(),
        "account listed: {accounts:?}"
    );
}

#[test]
fn config_errors_are_exit_3_with_a_line_number() {
    let full = Config::new(NO_UPSTREAM).yaml();
    let typo_line = full.lines().count() + 1;
    let cases = [
        (
            "typo in server",
            "server:\n  lisen: x\n".to_string(),
            Some(2),
            "lisen",
        ),
        (
            "unknown top-level key",
            format!("serverr:\n  listen: x\n{full}"),
            Some(1),
            "serverr",
        ),
        (
            "typo in upstream",
            format!("{full}  read_timout: 3s\n"),
            Some(typo_line),
            "read_timout",
        ),
        (
            "broken YAML",
            "server:\n  listen: [unclosed\n".to_string(),
            None,
            "",
        ),
        (
            "bad duration",
            full.replace("read_timeout: 3s", "read_timeout: 3 parsecs"),
            None,
            "",
        ),
    ];
    // Every case runs before anything fails, so one report shows all the gaps.
    let mut failures = Vec::new();
    for (what, yaml, line, word) in cases {
        let gw = Gateway::with_yaml(&yaml);
        for args in [&["list-accounts"][..], &["server"][..]] {
            let out = gw.run_cli(args);
            let err = String::from_utf8_lossy(&out.stderr);
            if out.status.code() != Some(3) {
                failures.push(format!(
                    "{what}, {args:?}: exit {:?}, not 3: {err}",
                    out.status
                ));
            }
            if let Some(n) = line
                && !err.contains(&format!("line {n}"))
            {
                failures.push(format!("{what}, {args:?}: stderr lacks `line {n}`: {err}"));
            }
            if !err.contains(word) {
                failures.push(format!(
                    "{what}, {args:?}: stderr should name `{word}`: {err}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn wrong_secret_key_is_exit_4() {
    let gw = Gateway::new(&Config::new(NO_UPSTREAM));
    let key_a = base64(&[0x11; 32]);
    let key_b = base64(&(0u8..32).collect::<Vec<u8>>());
    let upstream_key = "sk-ant-api03-SealedWithKeyA-a4a4";

    let mut add = gw.cli(&[
        "add-api-key",
        "--name",
        "vault-account",
        "--key",
        upstream_key,
        "--json",
    ]);
    add.env("LLM_GATEWAY_SECRET_KEY", &key_a);
    let out = run(add, None);
    assert_exit(&out, 0, "add-api-key with key A");
    let id = stdout_json(&out, "add-api-key")["id"]
        .as_str()
        .expect("id")
        .to_string();

    let mut list = gw.cli(&["list-accounts", "--json"]);
    list.env("LLM_GATEWAY_SECRET_KEY", &key_a);
    assert_exit(&run(list, None), 0, "list-accounts with key A");

    let mut list = gw.cli(&["list-accounts", "--json"]);
    list.env("LLM_GATEWAY_SECRET_KEY", &key_b);
    let out = run(list, None);
    assert_exit(&out, 4, "list-accounts with key B");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&id) || err.contains("vault-account"),
        "stderr should say which secret did not open: {err}"
    );
    for secret in [key_a.as_str(), key_b.as_str(), upstream_key] {
        assert!(!err.contains(secret), "stderr prints a secret: {err}");
    }
}

#[test]
fn lost_or_malformed_secret_key_is_exit_4() {
    let gw = Gateway::new(&Config::new(NO_UPSTREAM));
    gw.add_api_key("sealed", "sk-ant-api03-SealedWithFileKey-f1f1");

    for bad in ["not base64 at all!", &base64(&[7u8; 16])] {
        let mut list = gw.cli(&["list-accounts"]);
        list.env("LLM_GATEWAY_SECRET_KEY", bad);
        let out = run(list, None);
        assert_exit(&out, 4, &format!("LLM_GATEWAY_SECRET_KEY={bad:?}"));
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains(bad),
            "stderr echoes the malformed key"
        );
    }

    std::fs::remove_file(gw.dir().join("gateway.key")).expect("remove gateway.key");
    let out = gw.run_cli(&["list-accounts"]);
    assert_exit(&out, 4, "list-accounts after gateway.key was lost");
}

#[test]
fn usage_errors_are_exit_2() {
    let gw = Gateway::new(&Config::new(NO_UPSTREAM));
    let before = gw.config_text();
    let cases: [&[&str]; 8] = [
        &[],
        &["frobnicate"],
        &["list-accounts", "--bogus"],
        &["add-api-key", "--key", "sk-ant-api03-NoNameGiven-n0n0"],
        &["add-api-key", "--name"],
        &["add-client-key"],
        &["remove-account"],
        &["enable-account", "--account-id"],
    ];
    for args in cases {
        let out = gw.run_cli(args);
        assert_exit(&out, 2, &format!("{args:?}"));
        assert!(
            !out.stderr.is_empty(),
            "{args:?}: usage errors explain themselves on stderr"
        );
    }
    let mut no_value = gw.command();
    no_value.arg("--config");
    assert_exit(&run(no_value, None), 2, "--config without a value");
    assert_eq!(
        gw.config_text(),
        before,
        "usage errors leave config.yaml alone"
    );
}

#[test]
fn accounts_can_be_disabled_enabled_and_removed() {
    let gw = Gateway::new(&Config::new(NO_UPSTREAM));
    let a = gw.add_api_key("alpha", "sk-ant-api03-AlphaAccount-aaaa");
    let b = gw.add_api_key("beta", "sk-ant-api03-BetaAccount-bbbb");

    assert_exit(
        &gw.run_cli(&["disable-account", "--account-id", &a]),
        0,
        "disable",
    );
    let accounts = list_accounts(&gw);
    assert_eq!(find(&accounts, &a).expect("alpha")["enabled"], false);
    assert_eq!(find(&accounts, &b).expect("beta")["enabled"], true);

    let flag = format!("--account-id={a}");
    assert_exit(&gw.run_cli(&["enable-account", &flag]), 0, "enable");
    assert_eq!(
        find(&list_accounts(&gw), &a).expect("alpha")["enabled"],
        true
    );

    assert_exit(
        &gw.run_cli(&["remove-account", "--account-id", &a]),
        0,
        "remove",
    );
    let accounts = list_accounts(&gw);
    assert_eq!(accounts.len(), 1);
    assert!(find(&accounts, &a).is_none(), "alpha removed");
    assert_eq!(find(&accounts, &b).expect("beta")["key"], "sk-ant-…bbbb");

    for command in ["remove-account", "enable-account", "disable-account"] {
        for id in [a.as_str(), "acc_doesnotexist"] {
            let out = gw.run_cli(&[command, "--account-id", id]);
            assert_exit(&out, 6, &format!("{command} {id}"));
        }
    }
    assert_eq!(
        list_accounts(&gw).len(),
        1,
        "failed commands change nothing"
    );
}

#[test]
fn operator_comments_survive_cli_writes() {
    let yaml = format!(
        "# keep me: notes from the operator\n{}",
        Config::new(NO_UPSTREAM)
            .yaml()
            .replace(
                "  workers: 32\n",
                "  workers: 32 # inline: sized for the test box\n"
            )
            .replace("upstream:\n", "# upstream block comment\nupstream:\n")
    );
    let mut gw = Gateway::with_yaml(&yaml);
    let comments = [
        "# keep me: notes from the operator",
        "# inline: sized for the test box",
        "# upstream block comment",
    ];
    let check = |gw: &Gateway, after: &str| {
        let text = gw.config_text();
        for comment in comments {
            assert!(
                text.contains(comment),
                "after {after}, {comment:?} is gone:\n{text}"
            );
        }
        assert!(
            text.contains("workers: 32 # inline: sized for the test box"),
            "inline comment stays on its line after {after}:\n{text}"
        );
    };

    let id = gw.add_api_key("first", "sk-ant-api03-CommentsTestOne-c1c1");
    check(&gw, "add-api-key");
    gw.add_api_key("second", "sk-ant-api03-CommentsTestTwo-c2c2");
    check(&gw, "a second add-api-key");
    gw.add_client_key("client");
    check(&gw, "add-client-key");
    assert_exit(
        &gw.run_cli(&["disable-account", "--account-id", &id]),
        0,
        "disable",
    );
    check(&gw, "disable-account");
    assert_exit(
        &gw.run_cli(&["remove-account", "--account-id", &id]),
        0,
        "remove",
    );
    check(&gw, "remove-account");
    assert_eq!(list_accounts(&gw).len(), 1, "config still loads");
}

#[test]
fn concurrent_add_api_key_processes_all_land() {
    let gw = Gateway::new(&Config::new(NO_UPSTREAM));
    // Create gateway.key first, so the race under test is the config write alone.
    let seed = gw.add_api_key("seed", "sk-ant-api03-SeedAccount-seed");
    let out = gw.run_cli(&["remove-account", "--account-id", &seed]);
    assert_exit(&out, 0, "remove seed");

    let outputs = in_parallel(20, |i| {
        let cmd = gw.cli(&[
            "add-api-key",
            "--name",
            &format!("parallel-{i:02}"),
            "--key",
            &format!("sk-ant-api03-Parallel{i:02}-p{i:03}"),
        ]);
        run(cmd, None)
    });
    for (i, out) in outputs.iter().enumerate() {
        assert_exit(out, 0, &format!("add-api-key #{i}"));
    }

    let accounts = list_accounts(&gw);
    assert_eq!(accounts.len(), 20, "every concurrent add landed");
    let sorted = |field: &str| {
        let mut values: Vec<&str> = accounts
            .iter()
            .map(|a| a[field].as_str().expect(field))
            .collect();
        values.sort();
        values
    };
    let mut ids = sorted("id");
    ids.dedup();
    assert_eq!(ids.len(), 20, "ids are distinct");
    let names = sorted("name");
    let expected: Vec<String> = (0..20).map(|i| format!("parallel-{i:02}")).collect();
    assert_eq!(names, expected);
}

#[test]
fn client_key_clear_text_is_printed_once_and_stored_hashed() {
    let up = FakeUpstream::json(200, r#"{"ok":true}"#);
    let mut gw = Gateway::new(&Config::new(up.base_url()));
    gw.add_api_key("primary", "sk-ant-api03-ClientKeyTest-ck01");

    let out = gw.run_cli(&["add-client-key", "--name", "laptop", "--json"]);
    assert_exit(&out, 0, "add-client-key --json");
    let v = stdout_json(&out, "add-client-key");
    let json_key = v["key"].as_str().expect("key").to_string();
    let json_id = v["id"].as_str().expect("id").to_string();
    assert!(json_key.starts_with("lgw_"), "{json_key}");
    assert!(json_id.starts_with("ck_"), "{json_id}");
    assert_eq!(v["name"], "laptop");

    let out = gw.run_cli(&["add-client-key", "--name", "desktop"]);
    assert_exit(&out, 0, "add-client-key");
    let plain = String::from_utf8_lossy(&out.stdout);
    let plain_key = plain
        .split_whitespace()
        .find(|w| w.starts_with("lgw_"))
        .unwrap_or_else(|| panic!("add-client-key prints the key: {plain}"))
        .trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '_' && c != '-')
        .to_string();
    assert_ne!(plain_key, json_key);

    let config = gw.config_text();
    assert!(
        config.contains(&json_id),
        "client key recorded by id:\n{config}"
    );
    let list = gw.run_cli(&["list-accounts", "--json"]);
    assert_exit(&list, 0, "list-accounts");
    // Not part of the contract, but if it exists it must not reveal keys either.
    let list_keys = gw.run_cli(&["list-client-keys", "--json"]);
    for key in [&json_key, &plain_key] {
        let secret = &key["lgw_".len()..];
        assert!(
            !config.contains(secret),
            "config.yaml holds client key {key}"
        );
        for (what, out) in [("list-accounts", &list), ("list-client-keys", &list_keys)] {
            let text = printed(out);
            assert!(
                !text.contains(secret),
                "{what} shows client key {key}: {text}"
            );
        }
    }

    // Both stored hashes authenticate, and the server does not log the keys.
    gw.start();
    for key in [&json_key, &plain_key] {
        let resp = post_message(gw.addr(), &[("x-api-key", key)]);
        assert_eq!(resp.status, 200, "key {key}: {}", resp.text());
        assert!(
            !gw.stderr().contains(&key["lgw_".len()..]),
            "server log shows a client key"
        );
    }
}

#[test]
fn server_listen_flag_overrides_config() {
    let occupied = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = occupied.local_addr().expect("addr");
    let yaml = Config::new(NO_UPSTREAM)
        .yaml()
        .replace("listen: 127.0.0.1:0", &format!("listen: {taken}"));

    let gw = Gateway::with_yaml(&yaml);
    let out = gw.run_cli(&["server"]);
    assert_exit(&out, 1, "server on a port already in use");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&taken.port().to_string()),
        "the bind error names the address"
    );

    for flag in [
        &["--listen=127.0.0.1:0"][..],
        &["--listen", "127.0.0.1:0"][..],
    ] {
        let mut gw = Gateway::with_yaml(&yaml);
        let addr = gw.start_with(flag);
        assert_ne!(addr, taken);
        assert_eq!(
            call(addr, "GET", "/health", &[], b"").status,
            200,
            "{flag:?}"
        );
    }
    drop(occupied);
}

/// Issue 2: a running server applies accounts and keys changed by the CLI, without a restart.
#[test]
fn running_server_applies_cli_changes() {
    let up = FakeUpstream::json(200, r#"{"ok":true}"#);
    let mut gw = Gateway::new(&Config::new(up.base_url()));
    let account = gw.add_api_key("only", "sk-ant-api03-ReloadedAccount-rrrr");
    assert_exit(
        &gw.run_cli(&["disable-account", "--account-id", &account]),
        0,
        "disable",
    );
    gw.add_client_key("first");
    gw.start();
    let post = |key: &str| post_message(gw.addr(), &[("x-api-key", key)]).status;
    let first = gw.client_key().to_string();
    assert_eq!(post(&first), 503, "the only account is disabled");

    assert_exit(
        &gw.run_cli(&["enable-account", "--account-id", &account]),
        0,
        "enable",
    );
    let out = gw.run_cli(&["add-client-key", "--name", "second", "--json"]);
    assert_exit(&out, 0, "add-client-key");
    let second = stdout_json(&out, "add-client-key")["key"]
        .as_str()
        .expect("key")
        .to_string();

    // The server polls the file; wait for the change to show, within a bound.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while post(&second) != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the server did not apply the CLI's changes within 5 s"
        );
        thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(post(&first), 200, "the first key still works");
    assert_eq!(up.requests().len(), 2);
}

#[test]
fn a_missing_config_is_never_silently_a_new_one_and_init_creates_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new();
    let path = dir.path().join("typo").join("config.yaml");
    let path_text = path.to_str().expect("utf-8 temp path");
    let cli = |args: &[&str]| {
        let mut cmd = std::process::Command::new(crate::support::BIN);
        cmd.arg("--config")
            .arg(&path)
            .args(args)
            .current_dir(dir.path());
        run(cmd, None)
    };
    // Every command that writes refuses, naming the path and how to create a config; nothing
    // is created and no key is printed.
    for args in [
        &["add-client-key", "--name", "ci"][..],
        &[
            "add-api-key",
            "--name",
            "a",
            "--key",
            "sk-ant-api03-MissingConfigKey-0000",
        ],
        &["add-oauth", "--name", "o", "--client-id", "c"],
        &["enable-account", "--account-id", "acc_1"],
        &["revoke-client-key", "--key-id", "key_1"],
        &["oauth-start", "--account-id", "acc_1"],
    ] {
        let out = cli(args);
        assert_exit(&out, 3, args[0]);
        let text = printed(&out);
        assert!(
            text.contains(path_text) && text.contains("init"),
            "{}: {text}",
            args[0]
        );
        assert!(!text.contains("lgw_"), "{}: printed a key: {text}", args[0]);
        assert!(!path.exists(), "{} created the config", args[0]);
    }
    // Reading commands say there is no config instead of listing nothing.
    for args in [
        &["list-accounts"][..],
        &["list-client-keys"],
        &["health-check"],
        &["usage"],
    ] {
        let out = cli(args);
        assert_exit(&out, 3, args[0]);
        assert!(
            printed(&out).contains("no config file"),
            "{}",
            printed(&out)
        );
    }
    // init writes the commented default config, owner-only, and the key file.
    let out = cli(&["init", "--json"]);
    assert_exit(&out, 0, "init");
    let made = stdout_json(&out, "init --json");
    assert_eq!(made["secret_key_created"], true, "{made}");
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("exists").permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    let key_file = path.parent().expect("dir").join("gateway.key");
    assert_eq!(mode(&key_file), 0o600);
    let written = std::fs::read_to_string(&path).expect("read config");
    assert!(written.contains("# llm-gateway configuration") && written.contains("server:"));
    let key = std::fs::read(&key_file).expect("key");
    // An existing config is refused, unless --force (which keeps the key).
    assert_exit(&cli(&["init"]), 3, "init again");
    assert_exit(&cli(&["init", "--force"]), 0, "init --force");
    assert_eq!(
        std::fs::read(&key_file).expect("key"),
        key,
        "the key was replaced"
    );
    // Now the writing commands work.
    let out = cli(&["add-client-key", "--name", "ci", "--json"]);
    assert_exit(&out, 0, "add-client-key after init");
    assert_exit(&cli(&["list-client-keys"]), 0, "list-client-keys");
}

#[test]
fn a_server_without_a_config_file_says_it_runs_on_defaults() {
    let dir = TempDir::new();
    let path = dir.path().join("absent.yaml");
    let mut cmd = std::process::Command::new(crate::support::BIN);
    cmd.arg("--config")
        .arg(&path)
        .args(["server", "--listen", "127.0.0.1:0"])
        .env("LLM_GATEWAY_SECRET_KEY", base64(&[7u8; 32]))
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut said = String::new();
    let mut line = String::new();
    while std::io::BufRead::read_line(&mut stderr, &mut line).unwrap_or(0) > 0 {
        said.push_str(&line);
        if line.contains("serving") {
            break;
        }
        line.clear();
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        said.contains("no config file at") && said.contains("built-in defaults"),
        "{said}"
    );
}

#[test]
fn usage_and_list_client_keys_open_no_secret() {
    let mut gw = Gateway::new(&Config::new(NO_UPSTREAM));
    gw.add_api_key("sealed", "sk-ant-api03-NeedsTheKeyToOpen-000000");
    gw.add_client_key("ci");
    std::fs::remove_file(gw.dir().join("gateway.key")).expect("remove the key file");
    for args in [
        &["list-client-keys", "--json"][..],
        &["usage", "--json"],
        &["usage", "--by", "account"],
    ] {
        assert_exit(&gw.run_cli(args), 0, args[0]);
    }
    // What does open secrets still needs the key.
    assert_exit(
        &gw.run_cli(&["list-accounts"]),
        4,
        "list-accounts without the key",
    );
}

#[test]
fn names_are_unique_and_hopeless_limits_are_refused() {
    let mut gw = Gateway::new(&Config::new(NO_UPSTREAM));
    let key = "sk-ant-api03-OnlyOneAccountMayHoldMe-u1u1";
    let prod = gw.add_api_key("prod", key);
    let refused = |gw: &Gateway, args: &[&str], needle: &str| {
        let out = gw.run_cli(args);
        assert_exit(&out, 2, &args.join(" "));
        assert!(
            printed(&out).contains(needle),
            "{}: {}",
            args.join(" "),
            printed(&out)
        );
    };
    // The same name, the same upstream key, a rename onto a taken name.
    refused(
        &gw,
        &[
            "add-api-key",
            "--name",
            "prod",
            "--key",
            "sk-ant-api03-Another-u2u2",
        ],
        "already named",
    );
    refused(
        &gw,
        &["add-api-key", "--name", "other", "--key", key],
        "already uses the key",
    );
    refused(
        &gw,
        &["add-oauth", "--name", "prod", "--client-id", "c"],
        "already named",
    );
    let other = gw.add_api_key("other", "sk-ant-api03-Another-u2u2");
    refused(
        &gw,
        &["set-account", "--account-id", &other, "--name", "prod"],
        "already named",
    );
    assert_exit(
        &gw.run_cli(&["set-account", "--account-id", &prod, "--name", "prod"]),
        0,
        "keeping its own name",
    );
    gw.add_client_key("alice");
    refused(&gw, &["add-client-key", "--name", "alice"], "already named");
    // Limits no request could pass, and an expiry that has passed.
    for (flag, value) in [
        ("--rpm", "0"),
        ("--max-concurrent", "0"),
        ("--daily-tokens", "0"),
        ("--monthly-tokens", "0"),
    ] {
        refused(
            &gw,
            &["add-client-key", "--name", "z", flag, value],
            "would refuse every request",
        );
    }
    refused(
        &gw,
        &["add-client-key", "--name", "z", "--models", ""],
        "names no model",
    );
    refused(
        &gw,
        &["add-client-key", "--name", "z", "--models", " , "],
        "names no model",
    );
    refused(
        &gw,
        &["add-client-key", "--name", "z", "--expires", "2020-01-01"],
        "in the past",
    );
    let keys = stdout_json(
        &gw.run_cli(&["list-client-keys", "--json"]),
        "list-client-keys",
    );
    let id = keys[0]["id"].as_str().expect("id").to_string();
    refused(
        &gw,
        &["update-client-key", "--key-id", &id, "--rpm", "0"],
        "would refuse every request",
    );
    refused(
        &gw,
        &[
            "update-client-key",
            "--key-id",
            &id,
            "--expires",
            "2020-01-01T00:00:00+05:00",
        ],
        "in the past",
    );
    // A config written by hand with two accounts of one name loads, with a warning naming it;
    // so does one whose api_key_env is not set.
    let path = gw.config_path();
    let text = std::fs::read_to_string(&path).expect("read");
    std::fs::write(&path, text.replace("name: other", "name: prod")).expect("write");
    let out = gw.run_cli(&["list-accounts"]);
    assert_exit(&out, 0, "list-accounts with duplicate names");
    // A duration without a unit is refused, naming the fix.
    let bare = Gateway::with_yaml("server:\n  header_timeout: 30\n");
    let out = bare.run_cli(&["list-accounts"]);
    assert_exit(&out, 3, "a duration without a unit");
    assert!(printed(&out).contains("write 30s"), "{}", printed(&out));
}

#[test]
fn the_server_warns_about_duplicate_names_and_unset_key_variables() {
    let mut gw = Gateway::new(&Config::new(NO_UPSTREAM));
    gw.add_api_key("prod", "sk-ant-api03-FirstOfTwoNamedProd-w1w1");
    gw.add_api_key("other", "sk-ant-api03-SecondOfTwoNamedProd-w2w2");
    gw.add_client_key("tests");
    let path = gw.config_path();
    let text = std::fs::read_to_string(&path).expect("read");
    let text = text.replace("name: other", "name: prod").replacen(
        "  - id: acc_",
        "  - name: from-env\n    kind: api_key\n    api_key_env: LLM_GATEWAY_TEST_UNSET_KEY\n  - id: acc_",
        1,
    );
    std::fs::write(&path, text).expect("write");
    gw.start();
    let said = gw.stderr();
    assert!(
        said.contains("several accounts share a name (prod)"),
        "{said}"
    );
    assert!(
        said.contains("from-env") && said.contains("LLM_GATEWAY_TEST_UNSET_KEY, which is not set"),
        "{said}"
    );
}

#[test]
fn the_shipped_config_gives_no_false_warning() {
    use std::os::unix::fs::PermissionsExt;
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml"))
        .expect("the shipped config.yaml");
    assert!(
        shipped.contains("enc:v1:"),
        "the shipped config names the sealed prefix in a comment"
    );
    let gw = Gateway::with_yaml(&shipped);
    std::fs::set_permissions(gw.config_path(), std::fs::Permissions::from_mode(0o644))
        .expect("chmod 644");
    for args in [&["list-accounts"][..], &["list-client-keys"]] {
        let out = gw.run_cli(args);
        assert_exit(&out, 0, args[0]);
        let said = printed(&out);
        assert!(!said.contains("warning"), "{}: {said}", args[0]);
    }
}

#[test]
fn quota_steering_is_set_per_account_and_checked_like_the_file() {
    let gw = Gateway::with_yaml("balance:\n  quota_threshold: 0.8\n  quota_hard_stop: true\n");
    let id = gw.add_api_key_with(
        "steered",
        "sk-ant-api03-SteeredAccountKey-s1s1",
        &["--quota-threshold", "0.7", "--overage", "allow"],
    );
    let plain = gw.add_api_key("plain", "sk-ant-api03-PlainAccountKey-p1p1");
    let accounts = list_accounts(&gw);
    let quota = |id: &str| find(&accounts, id).expect("listed")["quota"].clone();
    assert_eq!(
        quota(&id),
        serde_json::json!({"threshold": 0.7, "hysteresis": 0.05, "hard_stop": true, "overage": "allow"})
    );
    assert_eq!(quota(&plain)["threshold"], 0.8, "balance's");
    assert_eq!(quota(&plain)["overage"], "plan_only", "the default");
    let set = gw.run_cli(&[
        "set-account",
        "--account-id",
        &plain,
        "--quota-hard-stop",
        "false",
    ]);
    assert_exit(&set, 0, "set-account --quota-hard-stop");
    let accounts = list_accounts(&gw);
    assert_eq!(
        find(&accounts, &plain).expect("listed")["quota"]["hard_stop"],
        false
    );
    for (flag, value) in [
        ("--quota-threshold", "1.5"),
        ("--quota-threshold", "0"),
        ("--quota-hysteresis", "-0.1"),
    ] {
        let out = gw.run_cli(&["set-account", "--account-id", &plain, flag, value]);
        assert_exit(&out, 2, flag);
        assert!(printed(&out).contains(flag), "{}", printed(&out));
    }
    let out = gw.run_cli(&[
        "set-account",
        "--account-id",
        &plain,
        "--overage",
        "sometimes",
    ]);
    assert_exit(&out, 2, "--overage sometimes");
    let bad = Gateway::with_yaml("balance:\n  quota_threshold: 2\n");
    let out = bad.run_cli(&["list-accounts"]);
    assert_exit(&out, 3, "a threshold above 1");
    assert!(
        printed(&out).contains("balance.quota_threshold"),
        "{}",
        printed(&out)
    );
}
