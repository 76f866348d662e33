//! An in-tree mutation fuzzer, run as integration tests against the library: no nightly, no
//! coverage, no crate. Each
//! target starts from its corpus in `fuzz/corpus/<target>/`, then feeds the code random
//! mutations of it (byte-level for the wire parsers, JSON-aware as well for the converters)
//! on a thread with the workers' stack size, as in production. A panic saves the input to
//! `fuzz/crashes/<target>-<hash>` and fails with that path and the seed that replays it.
//!
//! A plain `cargo test` (`make test`) replays each corpus deterministically, no mutation.
//! `make faults` (which sets `FAULTS_LONG`) mutates for about four seconds per target with a
//! clock seed; `FAULTS_LONG=1` runs a million inputs per target. `FUZZ_SEED` fixes the seed
//! and `FUZZ_RUNS` the number of inputs, either of which also turns mutation on.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use llm_gateway::http::{self, Conn, Limits};
use llm_gateway::openai::{self, request::Options, stream::ChunkStream};
use llm_gateway::sse::{self, Framer};

/// The largest input a mutation may grow to.
const MAX_INPUT: usize = 256 * 1024;

/// splitmix64: tiny, fast, and good enough to choose mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    /// True one time in `n`.
    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// A length skewed towards small values, sometimes large.
    fn len(&mut self) -> usize {
        match self.below(10) {
            0 => self.below(4096),
            1 | 2 => self.below(64),
            _ => 1 + self.below(8),
        }
    }
}

/// A deterministic Rng from an input, so a saved crash replays the same splits.
fn rng_of(input: &[u8]) -> Rng {
    Rng(hash(input))
}

fn hash(input: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    input.hash(&mut h);
    h.finish()
}

fn seed() -> u64 {
    if let Some(seed) = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok()) {
        return seed;
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

/// How long each target runs.
enum Budget {
    Runs(u64),
    Time(Duration),
}

fn budget() -> Budget {
    if let Some(n) = std::env::var("FUZZ_RUNS").ok().and_then(|s| s.parse().ok()) {
        return Budget::Runs(n);
    }
    match std::env::var("FAULTS_LONG").as_deref() {
        Ok("1") => Budget::Runs(1_000_000),
        Ok(_) => Budget::Time(Duration::from_secs(4)),
        // The corpus only, in order: the same inputs every run.
        Err(_) if std::env::var_os("FUZZ_SEED").is_some() => Budget::Time(Duration::from_secs(4)),
        Err(_) => Budget::Runs(0),
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = root().join("corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    let entries: Vec<Vec<u8>> = files
        .iter()
        .map(|p| std::fs::read(p).expect("read corpus file"))
        .collect();
    assert!(!entries.is_empty(), "empty corpus {}", dir.display());
    entries
}

/// Byte strings that parsers tend to treat specially.
const INTERESTING: &[&[u8]] = &[
    b"0",
    b"-1",
    b"4294967295",
    b"18446744073709551615",
    b"18446744073709551616",
    b"99999999999999999999999999",
    b"ffffffffffffffff",
    b"\r",
    b"\n",
    b"\r\n",
    b"\r\n\r\n",
    b"\n\n",
    b"\r\r",
    b"\0",
    b"\xff",
    b"\xc3",
    b"\xed\xa0\x80",
    b"\xf0\x9f\x8c",
    b";",
    b",",
    b":",
    b" ",
    b"\t",
    b"\"",
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b"chunked",
    b"Content-Length: ",
    b"Transfer-Encoding: chunked\r\n",
    b"Expect: 100-continue\r\n",
    b"Connection: close\r\n",
    b"data: ",
    b"event: ",
    b"[DONE]",
    b"\\ud800",
    b"\\udc00\\ud800",
    b"\\u0000",
];

/// 1 to 4 byte-level mutations of `data`; `other` is another input to splice from.
fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(9) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = rng.next() as u8;
            }
            2 => {
                let v = INTERESTING[rng.below(INTERESTING.len())];
                data.splice(at..at, v.iter().copied());
            }
            3 => {
                let end = (at + rng.len()).min(data.len());
                data.drain(at..end);
            }
            4 => {
                let end = (at + rng.len()).min(data.len());
                let copy = data[at..end].to_vec();
                let to = rng.below(data.len() + 1);
                for _ in 0..1 + rng.below(3) {
                    data.splice(to..to, copy.iter().copied());
                }
            }
            5 if !other.is_empty() => {
                let from = rng.below(other.len());
                let end = (from + rng.len()).min(other.len());
                let cut = (at + rng.len()).min(data.len());
                data.splice(at..cut, other[from..end].iter().copied());
            }
            6 => data.truncate(at),
            7 if !data.is_empty() => {
                // Overwrite a digit run with an interesting number.
                let v = INTERESTING[rng.below(7)];
                let i = rng.below(data.len());
                let end = data[i..]
                    .iter()
                    .position(|b| !b.is_ascii_alphanumeric())
                    .map_or(data.len(), |n| i + n);
                data.splice(i..end, v.iter().copied());
            }
            _ => {
                let v = INTERESTING[rng.below(INTERESTING.len())];
                data.extend_from_slice(v);
            }
        }
    }
    data.truncate(MAX_INPUT);
}

/// Field names the converters look at, for inserting keys they will read.
const KEYS: &[&str] = &[
    "model",
    "messages",
    "role",
    "content",
    "type",
    "text",
    "system",
    "max_tokens",
    "max_completion_tokens",
    "thinking",
    "budget_tokens",
    "reasoning_effort",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "n",
    "stream",
    "stream_options",
    "include_usage",
    "tools",
    "tool_choice",
    "tool_calls",
    "tool_call_id",
    "function",
    "functions",
    "function_call",
    "name",
    "arguments",
    "parameters",
    "id",
    "index",
    "image_url",
    "url",
    "file",
    "file_data",
    "file_id",
    "response_format",
    "json_schema",
    "schema",
    "parallel_tool_calls",
    "user",
    "metadata",
    "user_id",
    "session_id",
    "usage",
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "stop_reason",
    "delta",
    "content_block",
    "partial_json",
    "message",
    "error",
    "data",
    "created_at",
    "cache_control",
    "source",
];

fn random_value(rng: &mut Rng) -> Value {
    match rng.below(16) {
        0 => Value::Null,
        1 => Value::Bool(rng.one_in(2)),
        2 => json!(0),
        3 => json!(-1),
        4 => json!(u64::MAX),
        5 => json!(i64::MIN),
        6 => json!(1e308),
        7 => json!(0.5),
        8 => json!(""),
        9 => json!([]),
        10 => json!({}),
        11 => {
            // A long string of mixed scripts.
            let unit = [
                "a", " ", "é", "你", "🌍", "\u{0}", "\"", "\\", "\n", "data:",
            ];
            let n = 1 + rng.below(20_000);
            Value::String((0..n).map(|_| unit[rng.below(unit.len())]).collect())
        }
        12 => json!(KEYS[rng.below(KEYS.len())]),
        13 => json!(rng.next()),
        14 => json!(
            [
                "none", "low", "high", "auto", "required", "text", "tool_use"
            ][rng.below(7)]
        ),
        _ => json!(format!(
            "data:image/png;base64,{}",
            "QUJD".repeat(rng.below(5))
        )),
    }
}

/// One structural mutation somewhere in `v`; `donor` is another document to take parts from.
fn mutate_value(rng: &mut Rng, v: &mut Value, donor: &Value, depth: usize) {
    // Walk down to a random node.
    let descend = depth < 32 && rng.below(3) != 0;
    match v {
        Value::Object(map) if descend && !map.is_empty() => {
            let i = rng.below(map.len());
            if let Some((_, child)) = map.iter_mut().nth(i) {
                return mutate_value(rng, child, donor, depth + 1);
            }
        }
        Value::Array(items) if descend && !items.is_empty() => {
            let i = rng.below(items.len());
            return mutate_value(rng, &mut items[i], donor, depth + 1);
        }
        _ => {}
    }
    match rng.below(8) {
        0 | 1 => *v = random_value(rng),
        2 => match v {
            Value::Object(map) if !map.is_empty() => {
                let i = rng.below(map.len());
                if let Some(key) = map.keys().nth(i).cloned() {
                    map.shift_remove(&key);
                }
            }
            Value::Array(items) if !items.is_empty() => {
                items.remove(rng.below(items.len()));
            }
            _ => *v = Value::Null,
        },
        3 => match v {
            Value::Object(map) => {
                let key = KEYS[rng.below(KEYS.len())].to_string();
                let value = match map.values().nth(rng.below(map.len().max(1))) {
                    Some(sibling) if rng.one_in(2) => sibling.clone(),
                    _ => random_value(rng),
                };
                map.insert(key, value);
            }
            Value::Array(items) => {
                let copy = items.get(rng.below(items.len().max(1))).cloned();
                let copy = copy.unwrap_or_else(|| random_value(rng));
                let most = if rng.one_in(20) { 1000 } else { 3 };
                for _ in 0..1 + rng.below(most) {
                    items.push(copy.clone());
                }
            }
            other => *other = json!([other.clone(), other.clone()]),
        },
        4 => {
            // Nest a little (text mutations nest deeper, without building values that deep).
            let levels = if rng.one_in(4) {
                8 + rng.below(12)
            } else {
                1 + rng.below(4)
            };
            for _ in 0..levels {
                let inner = v.take();
                *v = if rng.one_in(2) {
                    json!([inner])
                } else {
                    json!({KEYS[rng.below(KEYS.len())]: inner})
                };
            }
        }
        5 => *v = pick(rng, donor, 0).clone(),
        6 => {
            if let Value::Object(map) = v {
                // The same node under a key the converters read.
                let mut wrapped = Map::new();
                wrapped.insert(
                    KEYS[rng.below(KEYS.len())].to_string(),
                    Value::Object(map.clone()),
                );
                map.extend(wrapped);
            } else {
                *v = json!({"type": v.take()});
            }
        }
        _ => *v = json!(v.to_string()),
    }
}

/// A random node of `v`.
fn pick<'a>(rng: &mut Rng, v: &'a Value, depth: usize) -> &'a Value {
    if depth > 32 || rng.one_in(3) {
        return v;
    }
    match v {
        Value::Object(map) if !map.is_empty() => {
            let i = rng.below(map.len());
            map.values().nth(i).map_or(v, |c| pick(rng, c, depth + 1))
        }
        Value::Array(items) if !items.is_empty() => {
            let i = rng.below(items.len());
            pick(rng, &items[i], depth + 1)
        }
        _ => v,
    }
}

/// Text-level JSON mutations that a `Value` cannot express: duplicate keys, lone surrogate
/// escapes, nesting far past the parser's limit.
fn mutate_json_text(rng: &mut Rng, data: &mut Vec<u8>) {
    match rng.below(4) {
        0 => {
            // A duplicate key at the start of a random object.
            let opens: Vec<usize> = positions(data, b'{');
            if let Some(&at) = opens.get(rng.below(opens.len().max(1))) {
                let key = KEYS[rng.below(KEYS.len())];
                let value = random_value(rng).to_string();
                let member = format!("\"{key}\":{value},");
                data.splice(at + 1..at + 1, member.bytes());
            }
        }
        1 => {
            // An escape inside a random string.
            let quotes = positions(data, b'"');
            if let Some(&at) = quotes.get(rng.below(quotes.len().max(1))) {
                let escape: &[u8] = [
                    &b"\\ud800"[..],
                    b"\\udfff",
                    b"\\udc00\\ud800",
                    b"\\u0000",
                    b"\\ud83c\\udf0d",
                    b"\\uffff",
                ][rng.below(6)];
                data.splice(at + 1..at + 1, escape.iter().copied());
            }
        }
        2 => {
            // Deep nesting around everything, now and then far past any limit.
            let levels = match rng.below(50) {
                0 => 100_000,
                1..=5 => 1_000 + rng.below(5_000),
                _ => 100 + rng.below(200),
            };
            let (open, close): (&[u8], &[u8]) = if rng.one_in(2) {
                (b"[", b"]")
            } else {
                (b"{\"a\":", b"}")
            };
            let mut out = Vec::with_capacity(data.len() + levels * (open.len() + close.len()));
            for _ in 0..levels {
                out.extend_from_slice(open);
            }
            out.extend_from_slice(data);
            if !rng.one_in(4) {
                for _ in 0..levels {
                    out.extend_from_slice(close);
                }
            }
            *data = out;
        }
        _ => {
            // A value replaced by a deeply nested one, unclosed now and then.
            let colons = positions(data, b':');
            if let Some(&at) = colons.get(rng.below(colons.len().max(1))) {
                let levels = 100 + rng.below(3_000);
                let nest = "[".repeat(levels) + &"]".repeat(if rng.one_in(3) { 0 } else { levels });
                data.splice(at + 1..at + 1, nest.bytes().chain(*b","));
            }
        }
    }
}

fn positions(data: &[u8], byte: u8) -> Vec<usize> {
    data.iter()
        .enumerate()
        .filter(|(_, b)| **b == byte)
        .map(|(i, _)| i)
        .take(4096)
        .collect()
}

/// How inputs for a target are made.
#[derive(Clone, Copy)]
enum Kind {
    /// Byte mutations only.
    Bytes,
    /// JSON-aware mutations first, then bytes now and then.
    Json,
}

fn mutate(rng: &mut Rng, kind: Kind, base: &[u8], other: &[u8]) -> Vec<u8> {
    let mut data = base.to_vec();
    if let Kind::Json = kind {
        if !rng.one_in(4)
            && let Ok(mut v) = llm_gateway::json::from_slice::<Value>(&data)
        {
            let donor: Value = llm_gateway::json::from_slice(other).unwrap_or(Value::Null);
            for _ in 0..1 + rng.below(3) {
                mutate_value(rng, &mut v, &donor, 0);
            }
            data = serde_json::to_vec(&v).unwrap_or(data);
        }
        if rng.one_in(5) {
            mutate_json_text(rng, &mut data);
        }
        if rng.one_in(3) {
            mutate_bytes(rng, &mut data, other);
        }
        // Room for a 100,000-level nest.
        data.truncate(4 * MAX_INPUT);
        return data;
    }
    mutate_bytes(rng, &mut data, other);
    data
}

/// What one target did.
struct Report {
    runs: u64,
    elapsed: Duration,
}

/// Runs `target` over its corpus and then random mutations of it, on a thread with the
/// workers' stack. Panics (failing the test) with the saved input's path and the seed.
fn fuzz(target: &'static str, kind: Kind, run: fn(&[u8])) -> Report {
    let seed = seed();
    let budget = budget();
    let corpus = corpus(target);
    let worker = std::thread::Builder::new()
        .name(format!("fuzz-{target}"))
        .stack_size(llm_gateway::memory::WORKER_STACK)
        .spawn(move || fuzz_loop(target, kind, run, seed, &budget, &corpus))
        .expect("spawn the fuzz thread");
    let result = worker.join();
    match result {
        Ok(Ok(report)) => {
            let per_sec = report.runs as f64 / report.elapsed.as_secs_f64().max(1e-9);
            eprintln!(
                "fuzz {target}: {} inputs in {:.1?} ({per_sec:.0}/s), seed {seed}",
                report.runs, report.elapsed
            );
            report
        }
        Ok(Err(message)) => panic!("{message}"),
        Err(_) => panic!("fuzz {target}: the harness itself panicked (seed {seed})"),
    }
}

fn fuzz_loop(
    target: &str,
    kind: Kind,
    run: fn(&[u8]),
    seed: u64,
    budget: &Budget,
    corpus: &[Vec<u8>],
) -> Result<Report, String> {
    let mut rng = Rng(seed);
    // Recent mutants, so mutations stack up over several generations.
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let started = Instant::now();
    let mut runs = 0u64;
    loop {
        let done = match budget {
            Budget::Runs(n) => runs >= (*n).max(corpus.len() as u64),
            Budget::Time(t) => runs >= corpus.len() as u64 && started.elapsed() >= *t,
        };
        if done {
            break;
        }
        let input = match corpus.get(runs as usize) {
            Some(entry) => entry.clone(),
            None => {
                let base = if !pool.is_empty() && rng.one_in(2) {
                    &pool[rng.below(pool.len())]
                } else {
                    &corpus[rng.below(corpus.len())]
                };
                let other = &corpus[rng.below(corpus.len())];
                mutate(&mut rng, kind, base, other)
            }
        };
        if catch_unwind(AssertUnwindSafe(|| run(&input))).is_err() {
            return Err(save_crash(target, &input, seed, runs));
        }
        runs += 1;
        if input.len() <= 16 * 1024 {
            if pool.len() < 256 {
                pool.push(input);
            } else {
                let i = rng.below(pool.len());
                pool[i] = input;
            }
        }
    }
    Ok(Report {
        runs,
        elapsed: started.elapsed(),
    })
}

fn save_crash(target: &str, input: &[u8], seed: u64, runs: u64) -> String {
    let dir = root().join("crashes");
    let path = dir.join(format!("{target}-{:016x}", hash(input)));
    let saved = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, input));
    let place = match saved {
        Ok(()) => path.display().to_string(),
        Err(e) => format!("(not saved: {e})"),
    };
    format!(
        "fuzz {target}: panic on input {place} after {runs} inputs; replay with FUZZ_SEED={seed}"
    )
}

// ---- The targets: each calls what the server calls on client (or upstream) bytes. ----

/// The request head parser and the chunk-size line parser.
fn http_head(input: &[u8]) {
    if let Ok(Some((request, _, len))) = http::parse_head(input) {
        assert!(len <= input.len(), "head longer than the input");
        let _ = request.path();
        let _ = http::list_values(&request.headers, "connection");
    }
    for line in input.split(|&b| b == b'\n') {
        let _ = http::parse_chunk_size(line);
    }
}

/// A loopback listener for the whole-connection target, shared by its inputs.
fn loopback() -> &'static TcpListener {
    static LISTENER: std::sync::OnceLock<TcpListener> = std::sync::OnceLock::new();
    LISTENER.get_or_init(|| TcpListener::bind("127.0.0.1:0").expect("bind loopback"))
}

/// The whole request reader (head, Content-Length and chunked bodies, trailers, pipelining,
/// 100-continue) over a real socket: the client sends the input and half-closes.
fn http_conn(input: &[u8]) {
    let input = &input[..input.len().min(64 * 1024)];
    let listener = loopback();
    let addr = listener.local_addr().expect("loopback address");
    let mut client = TcpStream::connect(addr).expect("connect loopback");
    let (server, _) = listener.accept().expect("accept loopback");
    client.write_all(input).expect("send the input");
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let limits = Limits {
        max_body: 16 * 1024,
        header_timeout: Duration::from_secs(5),
        body_timeout: Duration::from_secs(5),
        keepalive_timeout: Duration::from_secs(5),
        body_min_rate: 0,
        body_rate_grace: Duration::from_secs(5),
    };
    let mut conn = Conn::new(server);
    let mut body_bytes = 0;
    for _ in 0..64 {
        match conn.read_request(&limits) {
            Ok(request) => {
                assert!(request.body.len() as u64 <= limits.max_body);
                body_bytes += request.body.len();
            }
            Err(e) => {
                let _ = e.answer(limits.max_body);
                break;
            }
        }
    }
    assert!(body_bytes <= input.len(), "more body than bytes sent");
}

/// Input split into reads at points chosen from the input itself.
fn reads<'a>(input: &'a [u8], rng: &mut Rng) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        let n = match rng.below(4) {
            0 => 1,
            1 => rest.len(),
            _ => 1 + rng.below(64),
        }
        .min(rest.len());
        out.push(&rest[..n]);
        rest = &rest[n..];
    }
    out
}

/// SSE framing and the event readers. What the framer emits is the input, in order, whole.
fn sse(input: &[u8]) {
    let mut rng = rng_of(input);
    let mut framer = Framer::default();
    let mut emitted = Vec::new();
    for piece in reads(input, &mut rng) {
        framer
            .push::<()>(piece, |events| {
                emitted.extend_from_slice(events);
                let names = sse::event_names(events).count();
                let mut count = 0;
                for event in sse::split_events(events) {
                    count += 1;
                    let _ = sse::data(event);
                }
                assert_eq!(names, count, "one name per event");
                Ok(())
            })
            .expect("the callback does not fail");
        let _ = framer.has_partial();
    }
    assert!(input.starts_with(&emitted), "the framer altered the stream");
}

/// The OpenAI → Anthropic request converter, as the router runs it.
fn openai_request(input: &[u8]) {
    let _ = llm_gateway::router::body_format(input);
    let aliases = HashMap::from([("gpt-4o".to_string(), "claude-sonnet-4-5".to_string())]);
    let options = Options {
        default_max_tokens: 8192,
        aliases: &aliases,
    };
    if let Ok(converted) = openai::request::convert(input, &options) {
        let bytes = converted.body;
        // Values are copied as the client wrote them: valid JSON in, valid JSON out.
        if serde_json::from_slice::<Value>(input).is_ok() {
            serde_json::from_slice::<Value>(&bytes).expect("a converted body is JSON");
        }
        // The converted body goes on through the Anthropic-side readers.
        let _ = llm_gateway::accounts::sticky::facts(&bytes, None);
        let _ = llm_gateway::anthropic::prepend_system_text(&bytes, "system");
    }
}

/// The Anthropic → OpenAI response converters: message, error and model list.
fn openai_response(input: &[u8]) {
    let value: Value = llm_gateway::json::from_slice(input).unwrap_or(Value::Null);
    if let Ok(c) = openai::response::completion(input, "gpt-4o", 1_700_000_000) {
        serde_json::from_slice::<Value>(&c.body).expect("a completion is JSON");
    }
    let _ = openai::response::models(&value).to_string();
    let status = [200, 400, 401, 404, 429, 500, 529][(hash(input) % 7) as usize];
    let _ = openai::response::error_from_anthropic(status, input).to_string();
    let mut meter = llm_gateway::relay::Meter::default();
    meter.message(input);
    let _ = meter.usage.total();
}

/// The SSE stream converter, fed events as the relay frames them. Everything it sends is a
/// `data:` line holding JSON or `[DONE]`.
fn openai_stream(input: &[u8]) {
    let mut rng = rng_of(input);
    let mut chat = ChunkStream::new("gpt-4o", rng.one_in(2), 1_700_000_000);
    let mut meter = llm_gateway::relay::Meter::default();
    let mut framer = Framer::default();
    let mut out = Vec::new();
    for piece in reads(input, &mut rng) {
        framer
            .push::<()>(piece, |events| {
                meter.events(events);
                for event in sse::split_events(events) {
                    out.extend(chat.event(event));
                }
                Ok(())
            })
            .expect("the callback does not fail");
    }
    out.extend(chat.end(if rng.one_in(2) { Some("reset") } else { None }));
    let _ = meter.usage.total();
    let _ = chat.usage();
    for event in sse::split_events(&out) {
        let data = event.strip_prefix(b"data: ").expect("a data line");
        assert!(
            data == b"[DONE]" || serde_json::from_slice::<Value>(data).is_ok(),
            "not JSON: {}",
            String::from_utf8_lossy(data)
        );
    }
}

/// The Responses request converter (and, on the same bytes, the response converter).
fn responses_request(input: &[u8]) {
    let aliases = HashMap::from([("gpt-4o".to_string(), "claude-sonnet-4-5".to_string())]);
    let options = Options {
        default_max_tokens: 8192,
        aliases: &aliases,
    };
    if let Ok(converted) = openai::responses::request::convert(input, &options) {
        let bytes = converted.body;
        serde_json::from_slice::<Value>(&bytes).expect("a converted body is JSON");
        let _ = llm_gateway::accounts::sticky::facts(&bytes, converted.session.as_deref());
        let _ = llm_gateway::anthropic::prepend_system_text(&bytes, "system");
    }
    let reply = openai::responses::Reply {
        model: "gpt-4o".into(),
        custom_tools: vec!["apply_patch".into()],
        session: None,
    };
    if let Ok(c) = openai::responses::response(input, &reply, 1_700_000_000) {
        serde_json::from_slice::<Value>(&c.body).expect("a response is JSON");
    }
}

/// The Responses stream converter, fed events as the relay frames them: every event it sends
/// is named as its data's `type`, and numbered in order.
fn responses_stream(input: &[u8]) {
    let mut rng = rng_of(input);
    let reply = openai::responses::Reply {
        model: "gpt-4o".into(),
        custom_tools: vec!["exec_command".into()],
        session: None,
    };
    let mut stream = openai::responses::stream::ResponseStream::new(reply, 1_700_000_000);
    let mut framer = Framer::default();
    let mut out = Vec::new();
    for piece in reads(input, &mut rng) {
        framer
            .push::<()>(piece, |events| {
                for event in sse::split_events(events) {
                    out.extend(stream.event(event));
                }
                Ok(())
            })
            .expect("the callback does not fail");
    }
    out.extend(stream.end(if rng.one_in(2) { Some("reset") } else { None }));
    assert!(stream.closed(), "the stream ends, one way or another");
    for (n, event) in sse::split_events(&out).enumerate() {
        let text = String::from_utf8_lossy(event);
        let (name, data) = text.split_once('\n').expect("an event and its data");
        let data: Value = serde_json::from_str(data.strip_prefix("data: ").expect("data"))
            .unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        assert_eq!(
            name.strip_prefix("event: "),
            data["type"].as_str(),
            "{text}"
        );
        assert_eq!(data["sequence_number"], json!(n), "{text}");
    }
}

/// What reads every client body before any conversion: format detection, the sticky facts,
/// and the OAuth system-prompt edit.
fn body_probe(input: &[u8]) {
    let _ = llm_gateway::router::body_format(input);
    let _ = openai::detect(input);
    let _ = llm_gateway::accounts::sticky::facts(input, None);
    let _ = llm_gateway::accounts::sticky::facts(input, Some("session"));
    if let Ok(edited) = llm_gateway::anthropic::prepend_system_text(input, "You are Claude Code")
        && serde_json::from_slice::<Value>(input).is_ok()
    {
        // The edit is made in the raw bytes: whatever a valid body's spacing and escapes,
        // it gives valid JSON whose first system block is ours.
        let v: Value = serde_json::from_slice(&edited).expect("an edited body is JSON");
        assert_eq!(v["system"][0]["text"], "You are Claude Code", "{v}");
    }
    if let Ok(v) = llm_gateway::json::from_slice::<Value>(input)
        && let Some(user_id) = v["metadata"]["user_id"].as_str()
    {
        let _ = llm_gateway::accounts::sticky::session_of_user_id(user_id);
    }
}

/// One `#[test]` per target, each fuzzing it with `fuzz`: `name => target, kind, run;`, after
/// the doc comment that says what it checks.
macro_rules! fuzz_tests {
    ($($(#[doc = $doc:literal])* $name:ident => $target:literal, $kind:ident, $run:ident;)*) => {
        $(
            $(#[doc = $doc])*
            #[test]
            fn $name() {
                fuzz($target, Kind::$kind, $run);
            }
        )*
    };
}

fuzz_tests! {
    /// The head and chunk-size parsers answer every byte string with a value or an error.
    http_head_parser_never_panics => "http_head", Bytes, http_head;
    /// A whole connection's bytes (heads, bodies, chunks, trailers, pipelining) never panic
    /// the reader, and it never yields more body than the client sent.
    http_request_reader_never_panics_and_reads_no_more_than_sent => "http_conn", Bytes, http_conn;
    /// However the upstream bytes are split, the framer passes them on unaltered and whole.
    sse_framing_never_panics_nor_alters_the_stream => "sse", Bytes, sse;
    /// Any client body gets a converted request or a 400, never a panic.
    openai_request_converter_never_panics => "openai_request", Json, openai_request;
    /// Any upstream message, error or model list converts without a panic.
    openai_response_converters_never_panic => "openai_response", Json, openai_response;
    /// Any upstream event stream converts to data lines of JSON (or [DONE]), never a panic.
    openai_stream_converter_never_panics_and_sends_json => "openai_stream", Bytes, openai_stream;
    /// Format detection, sticky facts and the system-prompt edit take any client body.
    body_probes_never_panic => "body_probe", Json, body_probe;
    /// Any Responses body gets a converted request or a 400; any message a response object.
    responses_converters_never_panic => "responses_request", Json, responses_request;
    /// Any upstream event stream converts to named, numbered Responses events of JSON.
    responses_stream_converter_never_panics_and_numbers_its_events => "responses_stream", Bytes, responses_stream;
}

/// JSON nested `levels` deep, in several shapes, placed where each reader looks.
fn deep_bodies(levels: usize) -> Vec<Vec<u8>> {
    let arrays = "[".repeat(levels) + &"]".repeat(levels);
    let objects = "{\"a\":".repeat(levels) + "1" + &"}".repeat(levels);
    let unclosed = "[".repeat(levels);
    let mut out = Vec::new();
    for nest in [&arrays, &objects, &unclosed] {
        out.push(nest.clone().into_bytes());
        for field in ["system", "metadata", "tools", "response_format", "thinking"] {
            out.push(
                format!(r#"{{"model":"m","messages":[{{"role":"user","content":"q"}}],"{field}":{nest}}}"#)
                    .into_bytes(),
            );
        }
        out.push(
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":{nest}}}]}}"#)
                .into_bytes(),
        );
        out.push(format!(r#"{{"model":"m","messages":[{nest}]}}"#).into_bytes());
        out.push(format!(r#"{{"model":"m","messages":{nest}}}"#).into_bytes());
        out.push(
            format!(
                "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{nest}}}\n\n"
            )
            .into_bytes(),
        );
        out.push(
            format!("data: {{\"type\":\"content_block_delta\",\"delta\":{nest}}}\n\n").into_bytes(),
        );
    }
    out
}

/// Runs every reader over every body, in that order, on a thread with a stack of
/// `stack_size` bytes; whether they all returned (a panic says no; a stack overflow aborts
/// the test binary).
fn readers_on_stack(stack_size: usize, bodies: Vec<Vec<u8>>, readers: &[fn(&[u8])]) -> bool {
    let readers = readers.to_vec();
    let worker = std::thread::Builder::new()
        .stack_size(stack_size)
        .spawn(move || {
            for body in &bodies {
                for read in &readers {
                    read(body);
                }
            }
        })
        .expect("spawn");
    worker.join().is_ok()
}

#[test]
fn hundred_thousand_level_json_overflows_no_stack() {
    // A 100,000-level nested body (and the same nesting inside each field a reader looks at,
    // and in upstream events) is refused or passed by every target on a worker-sized stack.
    let read = readers_on_stack(
        llm_gateway::memory::WORKER_STACK,
        deep_bodies(100_000),
        &[
            body_probe,
            openai_request,
            openai_response,
            openai_stream,
            sse,
        ],
    );
    assert!(read, "a deep body panicked a reader");
}

#[test]
fn the_deepest_accepted_json_fits_three_quarters_of_a_worker_stack() {
    // Bodies nested up to the limit, in every field a reader looks at and in upstream
    // events, pass every reader on three quarters of a worker's stack: the rest is left for
    // the frames above a converter. (A reader over budget aborts this test binary.)
    let limit = llm_gateway::json::MAX_DEPTH;
    let mut bodies = Vec::new();
    for levels in limit - 3..=limit {
        bodies.extend(deep_bodies(levels));
    }
    let bare = "[".repeat(limit) + &"]".repeat(limit);
    let body = format!(
        r#"{{"model":"m","messages":[],"metadata":{}}}"#,
        &bare[1..bare.len() - 1]
    );
    assert!(
        llm_gateway::router::body_format(body.as_bytes()).is_ok(),
        "a body nested exactly {limit} levels is accepted"
    );
    let deeper = format!(r#"{{"model":"m","messages":[],"metadata":{bare}}}"#);
    assert!(
        llm_gateway::router::body_format(deeper.as_bytes()).is_err(),
        "one level more is refused"
    );
    let read = readers_on_stack(
        llm_gateway::memory::WORKER_STACK / 4 * 3,
        bodies,
        &[body_probe, openai_request, openai_response, openai_stream],
    );
    assert!(read, "a reader panicked on an accepted depth");
}
