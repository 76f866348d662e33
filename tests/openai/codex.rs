//! Codex CLI end to end (`@openai/codex`, installed by `make test` from the npm registry into
//! tests/clients): `codex exec` with a custom provider pointed at the gateway's Responses
//! route. The fake upstream asks, in Anthropic's words, for a shell tool call; Codex runs it in
//! its default sandbox, and its next request carries the command's output back.

use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use super::{
    anthropic_message, block_delta, block_start, block_stop, body_json, message_start, sse,
};
use crate::support::{Config, FakeUpstream, Gateway, Reply, TempDir, printed, run};

const CODEX: &str = "tests/clients/node_modules/.bin/codex";

/// What the shell command prints, so the next request can be recognised by it.
const PROOF: &str = "codex-ran-this-through-the-gateway";

fn usage() -> Value {
    json!({"input_tokens": 100, "output_tokens": 20})
}

/// A streamed answer of one tool call with these arguments.
fn tool_call(name: &str, arguments: &Value) -> Reply {
    let args = arguments.to_string();
    let (a, b) = args.split_at(args.len() / 2);
    sse(vec![
        message_start("msg_01CodexTool", usage()),
        block_start(0, json!({"type": "text", "text": ""})),
        block_delta(0, json!({"type": "text_delta", "text": "Running it."})),
        block_stop(0),
        block_start(
            1,
            json!({"type": "tool_use", "id": "toolu_01Codex", "name": name, "input": {}}),
        ),
        block_delta(1, json!({"type": "input_json_delta", "partial_json": a})),
        block_delta(1, json!({"type": "input_json_delta", "partial_json": b})),
        block_stop(1),
        json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 20}}),
        json!({"type": "message_stop"}),
    ])
}

fn text(id: &str, text: &str) -> Reply {
    sse(vec![
        message_start(id, usage()),
        block_start(0, json!({"type": "text", "text": ""})),
        block_delta(0, json!({"type": "text_delta", "text": text})),
        block_stop(0),
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 5}}),
        json!({"type": "message_stop"}),
    ])
}

/// The shell tool Codex offers, and the arguments that run `command` with it.
fn shell_call(tools: &[Value], command: &str) -> Option<(String, Value)> {
    let names: Vec<&str> = tools.iter().filter_map(|t| t["name"].as_str()).collect();
    if names.contains(&"exec_command") {
        return Some(("exec_command".into(), json!({"cmd": command})));
    }
    if names.contains(&"shell") {
        return Some(("shell".into(), json!({"command": ["bash", "-lc", command]})));
    }
    None
}

fn tool_results(body: &Value) -> Vec<String> {
    (body["messages"].as_array().into_iter().flatten())
        .flat_map(|m| m["content"].as_array().into_iter().flatten())
        .filter(|b| b["type"] == "tool_result")
        .map(|b| b["content"].to_string())
        .collect()
}

#[test]
fn codex_exec_completes_a_turn_with_a_shell_tool_call_through_the_gateway() {
    let codex = Path::new(env!("CARGO_MANIFEST_DIR")).join(CODEX);
    assert!(
        codex.exists(),
        "Codex CLI is not installed: run `npm install --prefix tests/clients` (make test does)"
    );
    let tools_seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = Arc::clone(&tools_seen);
    let up = FakeUpstream::start(move |req| {
        let body = body_json(&req.body);
        let tools = body["tools"].as_array().cloned().unwrap_or_default();
        *seen.lock().expect("tools") = tools
            .iter()
            .filter_map(|t| t["name"].as_str().map(String::from))
            .collect();
        if body["stream"] != true || body["messages"].as_array().is_none() {
            // Anything else Codex asks for (a title, a summary): a short text.
            return Reply::json(
                200,
                &anthropic_message(
                    "msg_01Other",
                    json!([{"type": "text", "text": "ok"}]),
                    "end_turn",
                    usage(),
                ),
            );
        }
        let results = tool_results(&body);
        if results.iter().any(|r| r.contains(PROOF)) {
            return text("msg_01CodexDone", "The command printed the proof.");
        }
        match shell_call(&tools, &format!("echo {PROOF}")) {
            Some((name, args)) if results.is_empty() => tool_call(&name, &args),
            _ => text("msg_01CodexNoTool", "No shell tool was offered."),
        }
    });
    let gw = Gateway::started(&Config::new(up.base_url()));
    let home = TempDir::new();
    let work = home.path().join("work");
    std::fs::create_dir_all(&work).expect("work dir");
    let config = format!(
        "model = \"claude-sonnet-4-5\"\nmodel_provider = \"gw\"\n\n[model_providers.gw]\nname = \"gw\"\nbase_url = \"http://{}/v1\"\nenv_key = \"GW_KEY\"\nwire_api = \"responses\"\n",
        gw.addr()
    );
    std::fs::write(home.path().join("config.toml"), config).expect("config.toml");
    let mut cmd = std::process::Command::new(&codex);
    cmd.args([
        "exec",
        "--skip-git-repo-check",
        "Run the proof command and tell me what it printed.",
    ])
    .current_dir(&work)
    .env("HOME", home.path())
    .env("CODEX_HOME", home.path())
    .env("GW_KEY", gw.client_key())
    .env("NO_PROXY", "*")
    .env("RUST_LOG", "error");
    for var in [
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "HTTPS_PROXY",
        "HTTP_PROXY",
        "ALL_PROXY",
        "https_proxy",
        "http_proxy",
    ] {
        cmd.env_remove(var);
    }
    let out = run(cmd, Some(b""));
    let said = printed(&out);
    let reqs: Vec<Value> = up.requests().iter().map(|r| body_json(&r.body)).collect();
    let log = gw.stderr();
    assert!(
        out.status.success(),
        "codex exec failed: {said}\ntools offered: {:?}\ngateway:\n{log}",
        tools_seen.lock().expect("tools")
    );
    // The turn: a tool call asked for, run by Codex, and its output in the next request.
    let with_output = reqs
        .iter()
        .position(|b| tool_results(b).iter().any(|r| r.contains(PROOF)));
    assert!(
        with_output.is_some(),
        "no request carried the command's output; tools {:?}; bodies: {reqs:#?}\n{said}",
        tools_seen.lock().expect("tools")
    );
    let b = &reqs[with_output.unwrap_or_default()];
    let assistant_call = (b["messages"].as_array().into_iter().flatten())
        .flat_map(|m| m["content"].as_array().into_iter().flatten())
        .any(|c| c["type"] == "tool_use" && c["id"] == "toolu_01Codex");
    assert!(
        assistant_call,
        "the call went back as the assistant's tool_use: {b}"
    );
    eprintln!(
        "codex said: {said}\ntools offered: {:?}",
        tools_seen.lock().expect("tools")
    );
    assert!(said.contains("The command printed the proof."), "{said}");
    // Every request went through the Responses route and was logged as OpenAI's.
    assert!(log.contains("\"path\":\"/v1/responses\""), "{log}");
}
