//! The access log: one JSON line per request (time, request id, client key name, account,
//! model, format, status, latency, time to first byte, tokens, attempts) to stderr or to a file
//! named in the config. Lines carry names and ids only, never a credential.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

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
