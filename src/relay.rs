//! The relay: an upstream answer copied downstream in the shape the client wants, byte for
//! byte (small bodies in one write, large ones in pieces, SSE event by event, flushed after
//! every read) or converted to OpenAI's format; every buffer bounded, every byte scrubbed of
//! the request's credentials, the tokens metered on the way.

use std::io::Read;
use std::time::Instant;

use crate::json;
use crate::openai::responses::Reply;
use crate::openai::responses::{self, stream::ResponseStream};
use crate::openai::{self, Converter, response::model_list, stream::ChunkStream};
use crate::respond::{BodyWriter, Head, Responder};
use crate::scrub::{self, Scrub};
use crate::sse;
use crate::upstream::{
    Answer, BUFFER_WHOLE, Held, MAX_INSPECTED, UpstreamError, header_str, hop_by_hop, io_error,
    is_event_stream, no_body,
};
use crate::usage::{Reported, Usage};
use crate::watch;

const COPY_CHUNK: usize = 8 * 1024;
/// SSE events are small (Anthropic's deltas are a few hundred bytes) and each read is relayed at
/// once, so a stream's read buffer is small too.
const SSE_CHUNK: usize = 2 * 1024;
/// A `usage` object found in a streamed body is kept up to this size (real ones are ~200 B).
const MAX_USAGE: usize = 16 * 1024;
/// A whole message read for conversion is capped here (far above any real answer).
const MAX_MESSAGE: u64 = 64 * 1024 * 1024;
/// A model list (or one model) read for conversion: Anthropic's 1000-model page is about 200
/// KiB, and the list is parsed into values, so its bound is far below a message's.
const MAX_MODELS: u64 = 1024 * 1024;

/// How a relayed response ended, for the access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Complete,
    /// The upstream broke or ended early; the client was told (SSE error event) or saw a
    /// truncated body.
    UpstreamBroke(String),
    /// The client went away mid-response.
    ClientGone,
    /// The upstream's stream carried an `event: error` (relayed to the client as it came):
    /// its `error.type` and (the start of) its message.
    UpstreamError {
        kind: String,
        message: String,
    },
}

/// The form the client wants the answer in.
#[derive(Debug, Clone)]
pub enum Shape {
    /// As Anthropic sent it.
    Anthropic,
    /// An OpenAI chat completion (or chunk stream), reporting the model the client named.
    Chat { include_usage: bool, model: String },
    /// An OpenAI `response` object (or Responses event stream); boxed: it is rare and large.
    Responses(Box<Reply>),
    /// OpenAI's model list (or one model), with the configured aliases listed too; `alias`
    /// names a single model fetched for an alias.
    Models {
        aliases: Vec<String>,
        alias: Option<String>,
    },
}

impl Shape {
    /// Whether the request is a message (sticky sessions apply).
    pub fn is_message(&self) -> bool {
        !matches!(self, Shape::Models { .. })
    }
}

/// The `usage` of a message, or of an SSE event's data (`message_start` nests it in `message`);
/// everything else in the body is skipped, not built.
#[derive(serde::Deserialize)]
struct UsageProbe {
    usage: Option<Reported>,
    message: Option<Box<UsageProbe>>,
}

/// What a relay learned on the way, for the ledger, metrics and the access log.
#[derive(Debug, Default)]
pub struct Meter {
    pub usage: Usage,
    /// When the first byte of the answer's body went to the client.
    pub first_byte: Option<Instant>,
    /// The `error` event a stream carried, if it did: (type, message).
    stream_error: Option<(String, String)>,
    /// Nano-USD charged instead of the usage's price: what an answer cut short before its
    /// usage passed had reserved.
    pub charged: Option<u64>,
}

/// An error event's message is kept this far for the logs: it may quote the request.
const MAX_ERROR_MESSAGE: usize = 300;

impl Meter {
    fn sent(&mut self) {
        self.first_byte.get_or_insert_with(Instant::now);
    }

    /// Takes the usage of an Anthropic message body, if it has one.
    pub fn message(&mut self, body: &[u8]) {
        if let Ok(p) = crate::json::from_slice::<UsageProbe>(body) {
            self.usage.take(&p.usage.unwrap_or_default());
        }
    }

    /// Takes what an `error` event says: `{"type":"error","error":{"type","message"}}`.
    fn error_event(&mut self, event: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Data {
            error: Inner,
        }
        #[derive(serde::Deserialize)]
        struct Inner {
            #[serde(rename = "type")]
            kind: String,
            #[serde(default)]
            message: String,
        }
        let parsed = sse::data(event).and_then(|d| crate::json::from_slice::<Data>(&d).ok());
        let (kind, message) = match parsed {
            Some(Data { error }) => (error.kind, error.message),
            None => (
                "api_error".to_string(),
                "an error event without an error".into(),
            ),
        };
        let message = message.chars().take(MAX_ERROR_MESSAGE).collect();
        self.stream_error = Some((kind, message));
    }

    /// How a stream that ended as `ended` ended, given the error event it may have carried.
    fn outcome(&mut self, ended: Outcome) -> Outcome {
        match (ended, self.stream_error.take()) {
            (Outcome::Complete, Some((kind, message))) => Outcome::UpstreamError { kind, message },
            (ended, _) => ended,
        }
    }

    /// Takes a `usage` object's JSON text.
    fn usage_value(&mut self, value: &[u8]) {
        if let Ok(reported) = crate::json::from_slice::<Reported>(value) {
            self.usage.take(&reported);
        }
    }

    /// Takes the usage of complete SSE events (message_start and message_delta carry it), and
    /// the error an `error` event reports.
    pub fn events(&mut self, events: &[u8]) {
        for event in sse::split_events(events) {
            let Some(name) = sse::event_names(event).next() else {
                continue;
            };
            if name == b"error" {
                self.error_event(event);
                continue;
            }
            if name != b"message_start" && name != b"message_delta" {
                continue;
            }
            let Some(data) = sse::data(event) else {
                continue;
            };
            if let Ok(p) = crate::json::from_slice::<UsageProbe>(&data) {
                let in_message = p.message.and_then(|m| m.usage);
                self.usage.take(&in_message.unwrap_or_default());
                self.usage.take(&p.usage.unwrap_or_default());
            }
        }
    }
}

/// What a relay calls with the answer's usage just before its last bytes go out, so the
/// request is charged (and its reservation given back) before the client can see its answer
/// end and send the next one.
pub type Settle<'s> = &'s mut dyn FnMut(&Meter);

/// Copies an answer downstream in `shape`. Returns how it ended and whether the connection
/// may be reused; an error means nothing was sent yet and the caller should answer it.
pub fn relay<'a>(
    answer: Answer,
    out: Responder<'a>,
    shape: &Shape,
    meter: &mut Meter,
    max_event: usize,
    settle: Settle<'_>,
) -> Result<(Outcome, bool), (UpstreamError, Responder<'a>)> {
    let Answer { body, scrub } = answer;
    let (parts, mut reader): (_, Box<dyn Read>) = match body {
        Held::Streaming(response) => {
            let (parts, body) = response.into_parts();
            (parts, Box::new(body.into_reader()))
        }
        Held::Buffered(parts, bytes) => (parts, Box::new(std::io::Cursor::new(bytes))),
    };
    let status = parts.status.as_u16();
    let converted = !matches!(shape, Shape::Anthropic);
    if status < 200 || (converted && no_body(status)) {
        return Err((
            UpstreamError::Garbled(format!("a {status} answer, which carries no message")),
            out,
        ));
    }
    let mut head = relayed_head(&parts, converted, &scrub);
    if no_body(status) {
        meter.sent();
        settle(meter);
        return Ok((Outcome::Complete, out.send_bodiless(head)));
    }
    let guard = Guard {
        scrub: &scrub,
        max_event,
    };
    let is_sse = header_str(&parts.headers, "content-type").is_some_and(is_event_stream);
    let length =
        header_str(&parts.headers, "content-length").and_then(|v| v.trim().parse::<u64>().ok());
    // Streams are relayed as they come; every other answer is read whole, then sent in one
    // write (so a short or garbled one is still an error we can report: nothing went yet).
    let whole = match shape {
        Shape::Anthropic if is_sse => {
            return Ok(relay_sse(reader, out, head, None, meter, &guard, settle));
        }
        Shape::Anthropic => match length {
            Some(n) if n <= BUFFER_WHOLE => read_exactly(&mut reader, n, &scrub).map(|body| {
                if status < 300 {
                    meter.message(&body);
                }
                Whole { json: false, body }
            }),
            // Large or unframed: copied through, its usage found on the way.
            _ => {
                let usage = (status < 300).then(|| json::FieldScan::new("usage", MAX_USAGE));
                let started = match length {
                    Some(n) => out.stream_with_length(head, n),
                    None => out.stream(head),
                };
                return Ok(relay_stream(reader, started, usage, meter, &scrub, settle));
            }
        },
        _ if status >= 400 => read_all(&mut reader, MAX_INSPECTED, &scrub).map(|body| {
            Whole::json(openai::response::error_from_anthropic(status, &body).to_string())
        }),
        Shape::Chat {
            include_usage,
            model,
            ..
        } if is_sse => {
            head.header("content-type", b"text/event-stream")
                .header("cache-control", b"no-cache");
            let chat = ChunkStream::new(model, *include_usage, crate::time::now_unix());
            return Ok(relay_sse(
                reader,
                out,
                head,
                Some(Converter::Chat(chat)),
                meter,
                &guard,
                settle,
            ));
        }
        Shape::Responses(reply) if is_sse => {
            head.header("content-type", b"text/event-stream")
                .header("cache-control", b"no-cache");
            let stream = ResponseStream::new((**reply).clone(), crate::time::now_unix());
            return Ok(relay_sse(
                reader,
                out,
                head,
                Some(Converter::Responses(stream)),
                meter,
                &guard,
                settle,
            ));
        }
        Shape::Responses(reply) => read_all(&mut reader, MAX_MESSAGE, &scrub)
            .and_then(|b| {
                responses::response(&b, reply, crate::time::now_unix()).map_err(|e| not_json(&e))
            })
            .map(|c| {
                meter.usage.merge(&c.usage);
                Whole {
                    json: true,
                    body: c.body,
                }
            }),
        Shape::Chat { model, .. } => read_all(&mut reader, MAX_MESSAGE, &scrub)
            .and_then(|b| {
                openai::response::completion(&b, model, crate::time::now_unix())
                    .map_err(|e| not_json(&e))
            })
            .map(|c| {
                meter.usage.merge(&c.usage);
                Whole {
                    json: true,
                    body: c.body,
                }
            }),
        Shape::Models { aliases, alias } => read_all(&mut reader, MAX_MODELS, &scrub)
            .and_then(|b| parse_json(&b))
            .map(|v| Whole::json(model_list(&v, aliases, alias.as_deref()).to_string())),
    };
    match whole {
        Ok(whole) => {
            if whole.json {
                head.header("content-type", b"application/json");
            }
            meter.sent();
            settle(meter);
            Ok((Outcome::Complete, out.send(head, &whole.body)))
        }
        Err(e) => Err((e, out)),
    }
}

/// An answer read whole, to be sent in one write.
struct Whole {
    /// Converted: it gets our `content-type`.
    json: bool,
    body: Vec<u8>,
}

impl Whole {
    fn json(text: String) -> Whole {
        Whole {
            json: true,
            body: text.into_bytes(),
        }
    }
}

/// The upstream's response head as the client gets it: hop-by-hop headers (and those that
/// `Connection` names) dropped, a converted body's `content-type` ours, `x-request-id` (the
/// gateway's own name) passed as Anthropic's `request-id`, every value scrubbed.
fn relayed_head(parts: &ureq::http::response::Parts, converted: bool, scrub: &Scrub) -> Head {
    let mut head = Head::new(parts.status.as_u16());
    let tokens: Vec<String> = parts
        .headers
        .get_all("connection")
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|t| String::from_utf8_lossy(t).trim().to_ascii_lowercase())
        .collect();
    let has_request_id = parts.headers.contains_key("request-id");
    for (name, value) in &parts.headers {
        let mut name = name.as_str();
        let skip = hop_by_hop(name)
            || tokens.iter().any(|t| t == name)
            || (converted && name == "content-type");
        if skip {
            continue;
        }
        if name == "x-request-id" {
            if has_request_id {
                continue;
            }
            name = "request-id";
        }
        let mut value = value.as_bytes().to_vec();
        scrub.bytes(&mut value);
        head.header(name, &value);
    }
    head
}

/// Reads a body of exactly `n` bytes and scrubs it. Read to the reader's own end (one byte
/// past `n` at most): only a body read to its end lets ureq return the connection to its
/// pool.
fn read_exactly(reader: &mut dyn Read, n: u64, scrub: &Scrub) -> Result<Vec<u8>, UpstreamError> {
    let mut buf = Vec::with_capacity(n as usize);
    match reader.take(n + 1).read_to_end(&mut buf) {
        Ok(got) if got as u64 == n => {
            scrub.bytes(&mut buf);
            Ok(buf)
        }
        Ok(got) => Err(UpstreamError::Unreachable(format!(
            "the upstream closed after {got} of {n} body bytes"
        ))),
        Err(e) => Err(io_error(&e)),
    }
}

/// Reads a whole body, refusing more than `limit` bytes, and scrubs it.
fn read_all(reader: &mut dyn Read, limit: u64, scrub: &Scrub) -> Result<Vec<u8>, UpstreamError> {
    let mut buf = Vec::new();
    reader
        .take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| io_error(&e))?;
    if buf.len() as u64 > limit {
        return Err(UpstreamError::Garbled(format!(
            "the upstream answer is larger than {limit} bytes"
        )));
    }
    scrub.bytes(&mut buf);
    Ok(buf)
}

fn parse_json(body: &[u8]) -> Result<serde_json::Value, UpstreamError> {
    crate::json::from_slice(body).map_err(|e| not_json(&e))
}

/// An answer that is not what it claims is garbage, not a connection failure.
fn not_json(e: &serde_json::Error) -> UpstreamError {
    UpstreamError::Garbled(format!(
        "the upstream answered something that is not JSON: {e}"
    ))
}

/// What an event stream's relay holds it to.
struct Guard<'a> {
    scrub: &'a Scrub,
    /// The largest event held before it is relayed.
    max_event: usize,
}

/// A body of unknown or large length, copied as it arrives (less the tail that may begin a
/// secret, held until the next piece).
fn relay_stream(
    mut reader: impl Read,
    started: std::io::Result<BodyWriter<'_>>,
    mut usage: Option<json::FieldScan>,
    meter: &mut Meter,
    scrub: &Scrub,
    settle: Settle<'_>,
) -> (Outcome, bool) {
    let Ok(mut writer) = started else {
        return (Outcome::ClientGone, false);
    };
    let watching = watch::watch(writer.socket());
    let mut scrubbing = scrub::Stream::new(scrub);
    let mut buf = vec![0u8; COPY_CHUNK];
    let ended = loop {
        match reader.read(&mut buf) {
            Ok(0) => {
                if let Some(value) = usage.take().as_ref().and_then(json::FieldScan::value) {
                    meter.usage_value(value);
                }
                settle(meter);
                if writer.write(&scrubbing.finish()).is_err() {
                    break (Outcome::ClientGone, false);
                }
                let keep = writer.finish();
                break (Outcome::Complete, keep);
            }
            Ok(n) => {
                meter.sent();
                if let Some(scan) = &mut usage {
                    scan.feed(&buf[..n]);
                }
                if writer.write(&scrubbing.feed(&buf[..n])).is_err() {
                    break (Outcome::ClientGone, false);
                }
            }
            Err(_) if watch::went_away() => {
                drop(watching);
                break (Outcome::ClientGone, writer.abort());
            }
            Err(e) => {
                // Headers are gone: the only honest signal left is a truncated body.
                break (Outcome::UpstreamBroke(e.to_string()), writer.abort());
            }
        }
    };
    // What the answer cost, however it ended: the tokens were spent upstream.
    if let Some(value) = usage.as_ref().and_then(json::FieldScan::value) {
        meter.usage_value(value);
    }
    ended
}

/// An SSE body, forwarded event by event, or converted event by event into an OpenAI stream
/// when `chat` is given. If the upstream ends without `message_stop` (or an `error` event of
/// its own), or an event grows past `guard.max_event`, the client is told with an error in
/// its format rather than a silent cut.
fn relay_sse(
    mut reader: impl Read,
    out: Responder<'_>,
    head: Head,
    mut chat: Option<Converter>,
    meter: &mut Meter,
    guard: &Guard<'_>,
    settle: Settle<'_>,
) -> (Outcome, bool) {
    let Ok(mut writer) = out.stream(head) else {
        return (Outcome::ClientGone, false);
    };
    // The stream may last minutes on a shallow stack: return the pages the request's sending
    // touched.
    crate::memory::release_unused();
    let watching = watch::watch(writer.socket());
    let mut framer = sse::Framer::default();
    let mut finished = false;
    let mut buf = vec![0u8; SSE_CHUNK];
    let mut scrubbed = Vec::new();
    let broke = loop {
        match reader.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => {
                let sent = framer.push(&buf[..n], |events| {
                    // Events are whole here, so a secret inside one is too; they are copied
                    // only when one is there.
                    let events = if !guard.scrub.found_in(events) {
                        events
                    } else {
                        scrubbed.clear();
                        scrubbed.extend_from_slice(events);
                        guard.scrub.bytes(&mut scrubbed);
                        &scrubbed[..]
                    };
                    meter.sent();
                    match &mut chat {
                        None => {
                            finished |= sse::event_names(events)
                                .any(|name| name == b"message_stop" || name == b"error");
                            // Written first: counting tokens never delays an event.
                            let written = writer.write(events);
                            meter.events(events);
                            written
                        }
                        Some(chat) => {
                            meter.events(events);
                            let mut chunks = Vec::new();
                            for event in sse::split_events(events) {
                                chunks.extend(chat.event(event));
                            }
                            finished = chat.closed();
                            writer.write(&chunks)
                        }
                    }
                });
                if sent.is_err() {
                    return (Outcome::ClientGone, false);
                }
                if chat.as_ref().is_some_and(Converter::gave_up) {
                    break Some("the answer outgrew what the conversion keeps".to_string());
                }
                crate::supervise::inject("relay");
                if framer.held() > guard.max_event {
                    // Never ended: the rest is not read (dropping the reader closes the
                    // upstream connection), and our memory holds at most this event.
                    break Some(format!(
                        "an event grew past upstream.max_event_bytes ({} bytes) without ending",
                        guard.max_event
                    ));
                }
            }
            Err(_) if watch::went_away() => return (Outcome::ClientGone, false),
            Err(e) => break Some(e.to_string()),
        }
    };
    drop(reader);
    drop(watching);
    if finished && broke.is_none() {
        let outcome = meter.outcome(Outcome::Complete);
        if outcome == Outcome::Complete {
            settle(meter);
        }
        return (outcome, writer.finish());
    }
    let why = match &broke {
        Some(e) => format!("the upstream stream broke before message_stop: {e}"),
        None if framer.has_partial() => {
            "the upstream ended the stream in the middle of an event".to_string()
        }
        None => "the upstream ended the stream before message_stop".to_string(),
    };
    if finished && !chat.as_ref().is_some_and(Converter::gave_up) {
        // The message was complete (or its error said); a break after it loses nothing.
        return (meter.outcome(Outcome::Complete), writer.finish());
    }
    let notice = match &mut chat {
        None => sse::error_event("api_error", &why),
        Some(chat) => chat.end(broke.as_deref()),
    };
    if writer.write(&notice).is_err() {
        return (Outcome::ClientGone, false);
    }
    writer.finish();
    // The response is complete as HTTP, but the connection saw a failure: do not reuse it.
    (Outcome::UpstreamBroke(why), false)
}
