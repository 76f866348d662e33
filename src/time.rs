//! Wall-clock helpers: Unix seconds now, and RFC 3339 timestamps (written in UTC, read with any
//! offset, by the `time` crate) for logs, the config file and the upstream's reset headers.

use std::time::{SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Seconds and milliseconds since the Unix epoch.
pub fn now_unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn now_unix() -> u64 {
    now_unix_millis() / 1000
}

/// `2026-11-26T07:04:00Z`. A time past year 9999 (an expiry of `u64::MAX`) is shown as the last
/// second RFC 3339 can write.
pub fn rfc3339(unix: u64) -> String {
    let t = i64::try_from(unix)
        .ok()
        .and_then(|u| OffsetDateTime::from_unix_timestamp(u).ok())
        .filter(|t| t.year() <= 9999)
        .unwrap_or(LAST);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// The last second RFC 3339 (four-digit years) can write.
const LAST: OffsetDateTime = match OffsetDateTime::from_unix_timestamp(253_402_300_799) {
    Ok(t) => t,
    Err(_) => OffsetDateTime::UNIX_EPOCH,
};

/// `2026-11-26T07:04:00.123Z`, for log lines.
pub fn rfc3339_millis(unix_millis: u64) -> String {
    let base = rfc3339(unix_millis / 1000);
    format!("{}.{:03}Z", &base[..base.len() - 1], unix_millis % 1000)
}

/// `7h59m`, `12m`, `40s`: a duration for people.
pub fn human_duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h{:02}m", secs / 3600, secs / 60 % 60),
        _ => format!("{}d{}h", secs / 86_400, secs / 3600 % 24),
    }
}

/// Unix seconds of an RFC 3339 time, its offset applied (`2025-02-19T00:00:00Z`,
/// `2026-12-31T00:00:00+05:00`; fractions dropped); `None` for anything else or a time before
/// 1970.
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let t = OffsetDateTime::parse(text.trim(), &Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_676_640), "2026-11-26T07:04:00Z");
        assert_eq!(
            rfc3339_millis(1_795_676_640_123),
            "2026-11-26T07:04:00.123Z"
        );
        assert_eq!(rfc3339(u64::MAX), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn parses_offsets_fractions_and_refuses_the_rest() {
        assert_eq!(parse_rfc3339("2026-11-26T07:04:00Z"), Some(1_795_676_640));
        assert_eq!(
            parse_rfc3339("2026-11-26T07:04:00.999Z"),
            Some(1_795_676_640)
        );
        // Five hours ahead of UTC: the same instant is five hours earlier in UTC.
        assert_eq!(
            parse_rfc3339("2026-11-26T12:04:00+05:00"),
            Some(1_795_676_640)
        );
        assert_eq!(
            parse_rfc3339("2026-11-26T02:04:00-05:00"),
            Some(1_795_676_640)
        );
        for bad in [
            "",
            "2026-11-26",
            "2026-11-26T07:04:00",
            "2026-13-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "soon",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
        for unix in [0, 951_782_400, 1_795_676_640] {
            assert_eq!(parse_rfc3339(&rfc3339(unix)), Some(unix));
        }
    }
}
