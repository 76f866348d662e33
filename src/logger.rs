//! The logger behind the `log` facade: one line per record to stderr, written with a single
//! call so lines from different threads never interleave. Nothing secret is ever passed to it;
//! secrets are `Secret` values whose `Display` is a mask.

use std::io::Write;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

impl Level {
    pub fn parse(text: &str) -> Option<Level> {
        match text {
            "error" => Some(Level::Error),
            "warn" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" => Some(Level::Debug),
            _ => None,
        }
    }

    fn filter(self) -> ::log::LevelFilter {
        match self {
            Level::Error => ::log::LevelFilter::Error,
            Level::Warn => ::log::LevelFilter::Warn,
            Level::Info => ::log::LevelFilter::Info,
            Level::Debug => ::log::LevelFilter::Debug,
        }
    }
}

/// The backend of the `log` facade: the gateway's own records and those of its crates (ureq
/// and rustls at `debug`; ureq redacts every header but a few harmless ones).
struct Stderr;

static LOGGER: Stderr = Stderr;

impl ::log::Log for Stderr {
    fn enabled(&self, metadata: &::log::Metadata<'_>) -> bool {
        metadata.level() <= ::log::max_level()
    }

    fn log(&self, record: &::log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let label = match record.level() {
            ::log::Level::Error => "ERROR",
            ::log::Level::Warn => "WARN",
            ::log::Level::Info => "INFO",
            ::log::Level::Debug | ::log::Level::Trace => "DEBUG",
        };
        // Another crate's record says whose it is.
        let target = record.target();
        let from = if target.starts_with("llm_gateway") {
            String::new()
        } else {
            format!("[{}] ", target.split("::").next().unwrap_or(target))
        };
        let line = format!(
            "{} {label:5} {from}{}\n",
            crate::time::rfc3339_millis(crate::time::now_unix_millis()),
            record.args()
        );
        // One write per line, so lines from different threads never interleave; a closed
        // stderr must not take the gateway down.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Sets the level, installing the backend the first time (later calls only change the level).
pub fn set_level(level: Level) {
    let _ = ::log::set_logger(&LOGGER);
    ::log::set_max_level(level.filter());
}
