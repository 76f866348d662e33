//! Server-Sent Events framing, for copying a stream event by event: bytes go in as the upstream
//! sends them, complete events come out at once, and a partial event is held until its end
//! arrives (so an error we inject after a break never lands inside half an event).

/// Splits a byte stream at event boundaries (a blank line: `\n\n`, `\r\n\r\n` or `\r\r`).
#[derive(Default)]
pub struct Framer {
    /// Bytes of an event whose end has not arrived yet.
    pending: Vec<u8>,
}

impl Framer {
    /// Feeds `data`; calls `emit` with the complete events it finishes (possibly several at
    /// once, always whole). Copies nothing in the common case where reads end on boundaries.
    pub fn push<E>(
        &mut self,
        data: &[u8],
        mut emit: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.pending.is_empty() {
            let cut = last_boundary(data);
            if cut > 0 {
                emit(&data[..cut])?;
            }
            self.pending.extend_from_slice(&data[cut..]);
            return Ok(());
        }
        // Only the tail of `pending` can combine with `data` into a boundary.
        let from = self.pending.len().saturating_sub(3);
        self.pending.extend_from_slice(data);
        let cut = last_boundary(&self.pending[from..]);
        if cut > 0 {
            let done: Vec<u8> = self.pending.drain(..from + cut).collect();
            emit(&done)?;
        }
        Ok(())
    }

    /// How many bytes of an unfinished event are held.
    pub fn held(&self) -> usize {
        self.pending.len()
    }

    /// Whether a partial event is being held.
    pub fn has_partial(&self) -> bool {
        self.pending.iter().any(|b| !matches!(b, b'\r' | b'\n'))
    }
}

/// The index just past the last event boundary in `data`, or 0.
fn last_boundary(data: &[u8]) -> usize {
    let mut i = data.len();
    while i >= 2 {
        let tail = &data[..i];
        if tail.ends_with(b"\n\n") || tail.ends_with(b"\r\r") || tail.ends_with(b"\r\n\r\n") {
            return i;
        }
        i -= 1;
    }
    0
}

/// The `event:` names of the complete events in `events`, in order (events without one are
/// `message`, per the SSE spec).
pub fn event_names(events: &[u8]) -> impl Iterator<Item = &[u8]> {
    split_events(events).map(|event| {
        lines(event)
            .find_map(|l| l.strip_prefix(b"event:"))
            .map(trim_space)
            .unwrap_or(b"message")
    })
}

/// The complete events in `data`, without their terminating blank lines.
pub fn split_events(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = data;
    std::iter::from_fn(move || {
        while !rest.is_empty() {
            let mut end = rest.len();
            let mut next = rest.len();
            let mut i = 0;
            while i + 1 < rest.len() {
                if rest[i..].starts_with(b"\r\n\r\n") {
                    (end, next) = (i, i + 4);
                    break;
                }
                if rest[i..].starts_with(b"\n\n") || rest[i..].starts_with(b"\r\r") {
                    (end, next) = (i, i + 2);
                    break;
                }
                i += 1;
            }
            let event = &rest[..end];
            rest = &rest[next..];
            if event.iter().any(|b| !matches!(b, b'\r' | b'\n')) {
                return Some(event);
            }
        }
        None
    })
}

/// The joined `data:` lines of one event (with or without a space after the colon).
pub fn data(event: &[u8]) -> Option<Vec<u8>> {
    let mut data: Option<Vec<u8>> = None;
    for line in lines(event) {
        if let Some(rest) = line.strip_prefix(b"data:") {
            let rest = trim_space(rest);
            let d = data.get_or_insert_with(Vec::new);
            if !d.is_empty() {
                d.push(b'\n');
            }
            d.extend_from_slice(rest);
        }
    }
    data
}

fn lines(event: &[u8]) -> impl Iterator<Item = &[u8]> {
    event
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
}

fn trim_space(v: &[u8]) -> &[u8] {
    v.strip_prefix(b" ").unwrap_or(v)
}

/// An Anthropic `event: error` carrying `error_type` and `message`.
pub fn error_event(error_type: &str, message: &str) -> Vec<u8> {
    let data = crate::error::anthropic_error_json(error_type, message);
    format!("event: error\ndata: {data}\n\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(pieces: &[&str]) -> Vec<String> {
        let mut framer = Framer::default();
        let mut out = Vec::new();
        for p in pieces {
            framer
                .push::<()>(p.as_bytes(), |e| {
                    out.push(String::from_utf8_lossy(e).into_owned());
                    Ok(())
                })
                .expect("no error");
        }
        out
    }

    #[test]
    fn whole_events_pass_straight_through() {
        assert_eq!(
            frame(&["event: a\ndata: 1\n\nevent: b\ndata: 2\n\n"]),
            ["event: a\ndata: 1\n\nevent: b\ndata: 2\n\n"]
        );
    }

    #[test]
    fn partial_events_wait_for_their_end() {
        assert_eq!(
            frame(&["event: a\nda", "ta: 1\n", "\nevent: b\n"]),
            ["event: a\ndata: 1\n\n"]
        );
        // A boundary split across reads, byte by byte.
        let text = "data: x\r\n\r\ndata: y\n\n";
        let bytes: Vec<String> = text.chars().map(String::from).collect();
        let pieces: Vec<&str> = bytes.iter().map(String::as_str).collect();
        assert_eq!(frame(&pieces).concat(), text);
    }

    #[test]
    fn partial_is_reported() {
        let mut f = Framer::default();
        f.push::<()>(b"data: 1\n\ndata: 2", |_| Ok(())).expect("ok");
        assert!(f.has_partial());
        f.push::<()>(b"\n\n", |_| Ok(())).expect("ok");
        assert!(!f.has_partial());
    }

    #[test]
    fn event_names_are_found() {
        let names: Vec<&[u8]> = event_names(
            b"event: message_start\ndata: {}\n\nevent:ping\ndata: {}\r\n\r\ndata: x\n\n",
        )
        .collect();
        assert_eq!(names, [&b"message_start"[..], b"ping", b"message"]);
    }

    #[test]
    fn error_events_are_anthropic_shaped() {
        let e = String::from_utf8(error_event("api_error", "broke \"here\"")).expect("utf8");
        assert!(e.starts_with("event: error\ndata: {"));
        assert!(e.ends_with("}\n\n"));
        let data: serde_json::Value =
            serde_json::from_str(e.trim_start_matches("event: error\ndata: ").trim())
                .expect("json");
        assert_eq!(data["error"]["message"], "broke \"here\"");
    }
}
