//! The access log: one JSON line per request (time, request id, client key name, account,
//! model, format, status, latency, time to first byte, tokens, attempts) to stderr or to a file
//! named in the config, what is learned about a request on its way (`Names`), and its id.
//! Lines carry names and ids only, never a credential.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use crate::http::Request;
use crate::openai::Format;
use crate::relay::Meter;

pub struct AccessLog {
    /// `None`: stderr.
    file: Option<Mutex<File>>,
}

impl AccessLog {
    pub fn stderr() -> AccessLog {
        AccessLog { file: None }
    }

    /// Appends to `path` (created 0600 if missing).
    pub fn file(path: &Path) -> std::io::Result<AccessLog> {
        let mut options = std::fs::OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        Ok(AccessLog {
            file: Some(Mutex::new(options.open(path)?)),
        })
    }

    /// Writes one newline-terminated line with a single write call, so lines never
    /// interleave.
    pub fn write(&self, line: &[u8]) {
        // A full disk or a closed stderr must not fail the request.
        let _ = match &self.file {
            Some(file) => file
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write_all(line),
            None => std::io::stderr().lock().write_all(line),
        };
    }
}

/// What is learned about a request while serving it, for the ledger, metrics and access log.
pub struct Names {
    /// Client key name and id (`None` until authenticated).
    pub client: String,
    pub client_id: Option<String>,
    /// Account name and id of the last attempt.
    pub account: String,
    pub account_id: Option<String>,
    /// The model the client asked for.
    pub model: Option<String>,
    pub attempts: u32,
    /// Errors go out in this format.
    pub format: Format,
    pub error: Option<String>,
}

impl Default for Names {
    fn default() -> Names {
        Names {
            client: "-".into(),
            client_id: None,
            account: "-".into(),
            account_id: None,
            model: None,
            attempts: 0,
            format: Format::Anthropic,
            error: None,
        }
    }
}

/// The fields of an access log line that are not in `Names` or `Meter`.
pub struct AccessLine<'a> {
    pub request_id: &'a str,
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    pub started: Instant,
    pub status: u16,
    pub error: Option<&'a str>,
}

impl AccessLine<'_> {
    /// One access log line, newline-terminated; its keys are documented in README.
    pub fn render(&self, names: &Names, meter: &Meter) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct Line<'a> {
            time: String,
            request_id: &'a str,
            method: Option<&'a str>,
            path: Option<&'a str>,
            client: &'a str,
            account: Option<&'a str>,
            model: Option<&'a str>,
            format: &'static str,
            status: u16,
            latency_ms: f64,
            ttfb_ms: Option<f64>,
            tokens: Tokens,
            attempts: u32,
            error: Option<&'a str>,
        }
        #[derive(serde::Serialize)]
        struct Tokens {
            input: u64,
            output: u64,
            cache_creation: u64,
            cache_read: u64,
        }
        let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
        let line = Line {
            time: crate::time::rfc3339_millis(crate::time::now_unix_millis()),
            request_id: self.request_id,
            method: self.method,
            path: self.path,
            client: &names.client,
            account: names.account_id.as_deref(),
            model: names.model.as_deref(),
            format: match names.format {
                Format::Anthropic => "anthropic",
                Format::OpenAI => "openai",
            },
            status: self.status,
            latency_ms: ms(self.started.elapsed()),
            ttfb_ms: meter.first_byte.map(|t| ms(t - self.started)),
            tokens: Tokens {
                input: meter.usage.input,
                output: meter.usage.output,
                cache_creation: meter.usage.cache_creation,
                cache_read: meter.usage.cache_read,
            },
            attempts: names.attempts,
            error: self.error,
        };
        let mut out = Vec::with_capacity(512);
        // Serializing plain fields into memory cannot fail.
        let _ = serde_json::to_writer(&mut out, &line);
        out.push(b'\n');
        out
    }
}

/// The request's id: the client's `x-request-id` when it is sane, else a new one.
pub fn request_id(req: &Request) -> String {
    request_id_from(req.header("x-request-id"))
}

pub fn request_id_from(header: Option<&str>) -> String {
    match header {
        Some(id)
            if (1..=128).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)) =>
        {
            id.to_string()
        }
        _ => new_request_id(),
    }
}

/// A request id needs to be unique, not secret: a random prefix drawn once per process, then a
/// counter (no system call per request).
fn new_request_id() -> String {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let prefix = PREFIX.get_or_init(|| crate::encoding::hex(&crate::secret::random_bytes::<8>()));
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("req_{prefix}{n:08x}")
}
