//! An SSE load client for `make bench` (bench/run.sh): opens C concurrent streams to one URL,
//! each a thread with a small stack on a raw `TcpStream` (HTTP/1.1, chunked or close-delimited
//! SSE), and measures what a streaming client sees:
//!
//! - per event, `arrival - send time`, where the send time is the `t=<Unix nanoseconds>` the
//!   mock upstream (examples/mock_upstream.rs) writes into each delta's text; it survives the
//!   conversion to OpenAI chunks as `delta.content`, so both formats are measured alike;
//! - time to first byte of the response, after the request was written;
//! - whether the stream completed: `message_stop` (Anthropic) or `data: [DONE]` (OpenAI) seen;
//! - with `--watch-pid`, the peak RSS and thread count of that process during the run.
//!
//! Stream starts are spread evenly over `--ramp-ms` (default 100, one event interval of the
//! harness workload) so events arrive as a steady flow rather than in lock-step bursts.
//!
//! ```text
//! ssebench --url http://127.0.0.1:8080/v1/messages --streams 1000 --body '{"stream":true,…}'
//!          [--header 'x-api-key: lgw_…']… [--session-header] [--ramp-ms 100]
//!          [--timeout-s 120] [--watch-pid PID]
//! ```
//!
//! Prints one JSON object: `{streams, completed, errors, events, ttfb_ms_p50, ttfb_ms_p99,
//! delay_ms_p50, delay_ms_p99, delay_ms_max, elapsed_s, peak_rss_kb, peak_threads, first_error}`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Per stream: a buffered reader and a few small vectors.
const STACK: usize = 128 * 1024;

struct Options {
    host: String,
    port: u16,
    path: String,
    streams: usize,
    body: String,
    headers: Vec<String>,
    session_header: bool,
    ramp: Duration,
    timeout: Duration,
    watch_pid: Option<u32>,
}

/// What one stream saw.
#[derive(Default)]
struct Outcome {
    completed: bool,
    ttfb: Option<Duration>,
    /// Nanoseconds, arrival minus embedded send time (may be slightly negative: clock reads
    /// on two cores).
    delays: Vec<i64>,
    error: Option<String>,
}

fn usage(message: &str) -> ! {
    eprintln!("ssebench: {message}");
    eprintln!(
        "usage: ssebench --url URL --streams N --body JSON [--header 'name: value']... \
         [--session-header] [--ramp-ms MS] [--timeout-s S] [--watch-pid PID]"
    );
    std::process::exit(2);
}

fn parse_args() -> Options {
    let mut args = std::env::args().skip(1);
    let mut url = None;
    let mut o = Options {
        host: String::new(),
        port: 80,
        path: String::new(),
        streams: 10,
        body: String::new(),
        headers: Vec::new(),
        session_header: false,
        ramp: Duration::from_millis(100),
        timeout: Duration::from_secs(120),
        watch_pid: None,
    };
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if name == "--session-header" {
            o.session_header = true;
            continue;
        }
        let value = inline
            .or_else(|| args.next())
            .unwrap_or_else(|| usage(&format!("{name} needs a value")));
        let number = |v: &str| -> u64 {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("{name}: not a number: {v}")))
        };
        match name.as_str() {
            "--url" => url = Some(value),
            "--streams" => o.streams = number(&value) as usize,
            "--body" => o.body = value,
            "--body-file" => {
                o.body = std::fs::read_to_string(&value)
                    .unwrap_or_else(|e| usage(&format!("cannot read {value}: {e}")))
            }
            "--header" => o.headers.push(value),
            "--ramp-ms" => o.ramp = Duration::from_millis(number(&value)),
            "--timeout-s" => o.timeout = Duration::from_secs(number(&value)),
            "--watch-pid" => o.watch_pid = Some(number(&value) as u32),
            _ => usage(&format!("unknown option {name}")),
        }
    }
    let url = url.unwrap_or_else(|| usage("--url is required"));
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| usage("only http:// URLs"));
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().unwrap_or_else(|_| usage("bad port"))),
        None => (authority, 80),
    };
    o.host = host.to_string();
    o.port = port;
    o.path = path.to_string();
    if o.streams == 0 {
        usage("--streams must be at least 1");
    }
    o
}

fn main() {
    let o = Arc::new(parse_args());
    let addr = (o.host.as_str(), o.port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or_else(|| usage("cannot resolve the host"));

    let done = Arc::new(AtomicBool::new(false));
    let watcher = o.watch_pid.map(|pid| {
        let done = done.clone();
        thread::spawn(move || watch(pid, &done))
    });

    let started = Instant::now();
    let mut handles = Vec::with_capacity(o.streams);
    for i in 0..o.streams {
        let o = o.clone();
        let at = started + o.ramp.mul_f64(i as f64 / o.streams as f64);
        let spawned = thread::Builder::new().stack_size(STACK).spawn(move || {
            let now = Instant::now();
            if at > now {
                thread::sleep(at - now);
            }
            let mut outcome = Outcome::default();
            if let Err(e) = run_stream(&o, addr, i, &mut outcome) {
                outcome.error = Some(e);
            }
            outcome
        });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => usage(&format!("cannot start thread {i}: {e}")),
        }
    }
    let outcomes: Vec<Outcome> = handles
        .into_iter()
        .map(|h| {
            h.join().unwrap_or_else(|_| Outcome {
                error: Some("stream thread panicked".into()),
                ..Outcome::default()
            })
        })
        .collect();
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let (peak_rss_kb, peak_threads) = watcher
        .and_then(|w| w.join().ok())
        .map_or((None, None), |(r, t)| (Some(r), Some(t)));

    let completed = outcomes.iter().filter(|o| o.completed).count();
    let errors = outcomes.iter().filter(|o| o.error.is_some()).count();
    let first_error = outcomes.iter().find_map(|o| o.error.clone());
    let mut ttfb: Vec<i64> = outcomes
        .iter()
        .filter_map(|o| o.ttfb.map(|d| d.as_nanos() as i64))
        .collect();
    let mut delays: Vec<i64> = outcomes.iter().flat_map(|o| o.delays.clone()).collect();
    ttfb.sort_unstable();
    delays.sort_unstable();
    let ms = |v: Option<i64>| v.map(|n| (n as f64 / 1e6 * 1000.0).round() / 1000.0);
    let report = serde_json::json!({
        "streams": o.streams,
        "completed": completed,
        "errors": errors,
        "events": delays.len(),
        "ttfb_ms_p50": ms(percentile(&ttfb, 50.0)),
        "ttfb_ms_p99": ms(percentile(&ttfb, 99.0)),
        "delay_ms_p50": ms(percentile(&delays, 50.0)),
        "delay_ms_p99": ms(percentile(&delays, 99.0)),
        "delay_ms_max": ms(delays.last().copied()),
        "elapsed_s": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        "peak_rss_kb": peak_rss_kb,
        "peak_threads": peak_threads,
        "first_error": first_error,
    });
    println!("{report}");
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Samples VmRSS and Threads of `pid` every 20 ms until `done`; returns the peaks.
fn watch(pid: u32, done: &AtomicBool) -> (u64, u64) {
    let path = format!("/proc/{pid}/status");
    let (mut rss, mut threads) = (0, 0);
    loop {
        if let Ok(status) = std::fs::read_to_string(&path) {
            for line in status.lines() {
                let field = |prefix: &str| -> Option<u64> {
                    line.strip_prefix(prefix)?
                        .split_whitespace()
                        .next()?
                        .parse()
                        .ok()
                };
                if let Some(v) = field("VmRSS:") {
                    rss = rss.max(v);
                }
                if let Some(v) = field("Threads:") {
                    threads = threads.max(v);
                }
            }
        }
        if done.load(Ordering::Relaxed) {
            return (rss, threads);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn run_stream(
    o: &Options,
    addr: std::net::SocketAddr,
    i: usize,
    out: &mut Outcome,
) -> Result<(), String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect: {e}"))?;
    stream.set_nodelay(true).ok();
    stream
        .set_read_timeout(Some(o.timeout))
        .map_err(|e| e.to_string())?;
    let mut request = format!(
        "POST {} HTTP/1.1\r\nhost: {}:{}\r\ncontent-type: application/json\r\naccept: text/event-stream\r\ncontent-length: {}\r\n",
        o.path,
        o.host,
        o.port,
        o.body.len()
    );
    for h in &o.headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    if o.session_header {
        request.push_str(&format!("x-session-id: ssebench-{i}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(&o.body);
    let sent = Instant::now();
    (&stream)
        .write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;

    let mut reader = BufReader::with_capacity(8 * 1024, &stream);
    let mut line = Vec::new();
    // Status line and headers.
    reader
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("read status: {e}"))?;
    out.ttfb = Some(sent.elapsed());
    let status_line = String::from_utf8_lossy(&line).trim().to_string();
    if !status_line.starts_with("HTTP/1.1 200") && !status_line.starts_with("HTTP/1.0 200") {
        let mut rest = String::new();
        let _ = reader.take(600).read_to_string(&mut rest);
        return Err(format!(
            "{status_line}: {}",
            rest.split("\r\n\r\n").nth(1).unwrap_or(&rest)
        ));
    }
    let mut chunked = false;
    let mut length = None;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("read headers: {e}"))?;
        if n == 0 {
            return Err("closed inside the headers".into());
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            break;
        }
        if let Some((name, value)) = text.split_once(':') {
            let name = name.trim().to_ascii_lowercase();
            let value = value.trim();
            if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if name == "content-length" {
                length = value.parse::<u64>().ok();
            }
        }
    }
    let mut sse = Sse::default();
    if chunked {
        loop {
            line.clear();
            reader
                .read_until(b'\n', &mut line)
                .map_err(|e| format!("read chunk size: {e}"))?;
            let size = String::from_utf8_lossy(&line);
            let size = size.trim().split(';').next().unwrap_or_default();
            let size =
                usize::from_str_radix(size, 16).map_err(|_| format!("bad chunk size {size:?}"))?;
            if size == 0 {
                break;
            }
            let mut left = size;
            while left > 0 {
                let buf = reader.fill_buf().map_err(|e| format!("read chunk: {e}"))?;
                if buf.is_empty() {
                    return Err("closed inside a chunk".into());
                }
                let take = buf.len().min(left);
                let arrived = now_nanos();
                sse.push(&buf[..take], arrived, out);
                reader.consume(take);
                left -= take;
            }
            line.clear();
            reader
                .read_until(b'\n', &mut line)
                .map_err(|e| format!("read chunk end: {e}"))?;
        }
    } else {
        let mut left = length.unwrap_or(u64::MAX);
        while left > 0 {
            let buf = reader.fill_buf().map_err(|e| format!("read body: {e}"))?;
            if buf.is_empty() {
                break;
            }
            let take = (buf.len() as u64).min(left) as usize;
            sse.push(&buf[..take], now_nanos(), out);
            reader.consume(take);
            left -= take as u64;
        }
    }
    if !out.completed {
        let tail = String::from_utf8_lossy(&sse.last_data);
        return Err(format!(
            "stream ended without message_stop or [DONE]; last data: {}",
            tail.chars().take(300).collect::<String>()
        ));
    }
    Ok(())
}

/// SSE lines from body bytes as they arrive.
#[derive(Default)]
struct Sse {
    partial: Vec<u8>,
    last_data: Vec<u8>,
}

impl Sse {
    fn push(&mut self, bytes: &[u8], arrived: i64, out: &mut Outcome) {
        self.partial.extend_from_slice(bytes);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let line = line.trim_ascii();
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            let data = data.trim_ascii();
            if data == b"[DONE]" || contains(data, b"\"type\":\"message_stop\"") {
                out.completed = true;
            }
            if let Some(sent) = embedded_time(data) {
                out.delays.push(arrived - sent);
            }
            self.last_data.clear();
            self.last_data.extend_from_slice(data);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The `t=<digits>` inside a delta's text, if any.
fn embedded_time(data: &[u8]) -> Option<i64> {
    let at = data.windows(3).position(|w| w == b"\"t=")?;
    let digits = &data[at + 3..];
    let end = digits.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}
