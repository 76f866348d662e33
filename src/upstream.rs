//! The upstream side: one ureq agent whose connection pool is sized to the workers, the
//! forwarding of a downstream request with the account's credential, and the relay of the
//! response back downstream (byte for byte; SSE event by event, flushed after every read).

use std::io::Read;
use std::time::Instant;

use ureq::http::{self, HeaderMap};
use ureq::unversioned::resolver::DefaultResolver;
use ureq::unversioned::transport::{Connector, RustlsConnector, TcpConnector};
use ureq::{Agent, Body, SendBody};

use crate::config::UpstreamSettings;
use crate::error::ApiError;
use crate::http::{BodyWriter, Head, Request, Responder};
use crate::json;
use crate::ledger::{Reported, Usage};
use crate::openai::{self, stream::ChunkStream};
use crate::processor::{Outgoing, Processor};
use crate::scrub::{self, Scrub};
use crate::sse;
use crate::watch::{self, ClientWatch};

/// Bodies up to this size are read whole and sent with the head in one write.
const BUFFER_WHOLE: u64 = 256 * 1024;
const COPY_CHUNK: usize = 8 * 1024;
/// SSE events are small (Anthropic's deltas are a few hundred bytes) and each read is relayed at
/// once, so a stream's read buffer is small too.
const SSE_CHUNK: usize = 2 * 1024;
/// Error bodies read for inspection are capped here.
const MAX_INSPECTED: u64 = 1024 * 1024;
/// A `usage` object found in a streamed body is kept up to this size (real ones are ~200 B).
const MAX_USAGE: usize = 16 * 1024;
/// A whole message read for conversion is capped here (far above any real answer).
const MAX_MESSAGE: u64 = 64 * 1024 * 1024;
/// A model list (or one model) read for conversion: Anthropic's 1000-model page is about 200
/// KiB, and the list is parsed into values, so its bound is far below a message's.
const MAX_MODELS: u64 = 1024 * 1024;

pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Two agents, so that a request's connection buffers fit its head: ureq writes a request head
/// into the connection's output buffer in one piece, and each pooled connection keeps its
/// buffers. Nearly every head fits the small agent's 8 KiB; the rare large one (up to the 32
/// KiB a client may send) goes through the large agent, so streams do not all pay for it.
pub struct Upstream {
    small: Agent,
    large: Agent,
    base_url: String,
    max_event: usize,
}

/// The small agent's output buffer.
const SMALL_OUTPUT: usize = 8 * 1024;
/// What ureq adds to a forwarded head (host, user-agent, content-length) and the request line's
/// fixed part, generously.
const HEAD_OVERHEAD: usize = 512;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the ones the
/// gateway sets itself.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
    )
}

/// Request headers never forwarded: hop-by-hop, the client's credentials, and what the
/// gateway sets for the upstream itself.
fn withheld_from_upstream(name: &str) -> bool {
    hop_by_hop(name) || is_credential(name) || matches!(name, "host" | "expect" | "accept-encoding")
}

/// A client credential header (names arrive lowercased), in any spelling a proxy or server
/// may take for it: `x_api_key` is `x-api-key` to nginx with `underscores_in_headers`.
fn is_credential(name: &str) -> bool {
    [
        "x-api-key",
        "authorization",
        "proxy-authorization",
        "cookie",
    ]
    .iter()
    .any(|credential| {
        name.len() == credential.len()
            && (name.bytes().zip(credential.bytes()))
                .all(|(n, c)| n == c || (n == b'_' && c == b'-'))
    })
}

impl Upstream {
    pub fn new(settings: &UpstreamSettings, pool_size: usize) -> Upstream {
        let agent = |output_buffer: usize| -> Agent {
            let config = Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(0)
                .proxy(None)
                .user_agent(concat!("llm-gateway/", env!("CARGO_PKG_VERSION")))
                .accept(ureq::config::AutoHeaderValue::None)
                .timeout_connect(Some(settings.connect_timeout))
                .timeout_per_read(Some(settings.read_timeout))
                .timeout_per_write(Some(settings.write_timeout))
                .max_idle_connections(pool_size)
                .max_idle_connections_per_host(pool_size)
                // Buffers are per upstream connection, so per stream: keep them small. The
                // input buffer holds the response head (nginx's proxy_buffer_size is one page;
                // Anthropic's heads are 1 to 3 KiB); ureq grows it to 10 KiB while it sends a
                // body anyway, so that is its size.
                .input_buffer_size(10 * 1024)
                .max_response_header_size(10 * 1024)
                .output_buffer_size(output_buffer)
                .build();
            // TCP, then the client watch (under TLS, so TLS never sees its slices), then TLS
            // for https. No proxy connectors: the agent uses no proxy.
            let connector =
                ().chain(TcpConnector::default())
                    .chain(ClientWatch)
                    .chain(RustlsConnector::default());
            Agent::with_parts(config, connector, DefaultResolver::default())
        };
        Upstream {
            small: agent(SMALL_OUTPUT),
            large: agent(crate::http::MAX_HEAD + HEAD_OVERHEAD + 4 * 1024),
            base_url: settings.base_url.clone(),
            max_event: settings.max_event_bytes,
        }
    }

    /// The largest SSE event a relay holds (`upstream.max_event_bytes`).
    pub fn max_event(&self) -> usize {
        self.max_event
    }

    /// Sends `req` upstream, shaped by the account's processor. Errors here happened before
    /// any byte of a response: the caller may answer or try another account.
    pub fn forward(
        &self,
        req: &Request,
        processor: &dyn Processor,
    ) -> Result<http::Response<Body>, ApiError> {
        self.forward_within(req, processor, None)
    }

    /// `forward`, with the whole exchange up to the response head bounded by `within` (a
    /// probe must not wait out the read timeout meant for long generations).
    pub fn forward_within(
        &self,
        req: &Request,
        processor: &dyn Processor,
        within: Option<std::time::Duration>,
    ) -> Result<http::Response<Body>, ApiError> {
        // Names listed in `Connection:` are hop-by-hop too.
        let tokens = crate::http::list_values(&req.headers, "connection");
        let mut out = Outgoing {
            path: req.path().to_string(),
            headers: req
                .headers
                .iter()
                .filter(|(name, _)| !withheld_from_upstream(name) && !tokens.contains(name))
                .cloned()
                .collect(),
            body: &req.body,
            splice: None,
        };
        if req.header("anthropic-version").is_none() {
            out.headers
                .push(("anthropic-version".into(), ANTHROPIC_VERSION.into()));
        }
        out.headers
            .push(("accept-encoding".into(), b"identity".to_vec()));
        processor.prepare(&mut out)?;

        let mut builder = http::Request::builder()
            .method(req.method.as_str())
            .uri(format!("{}{}", self.base_url, req.target));
        for (name, value) in &out.headers {
            builder = builder.header(name.as_str(), value.as_slice());
        }
        let head_size = HEAD_OVERHEAD
            + self.base_url.len()
            + req.target.len()
            + (out.headers.iter())
                .map(|(name, value)| name.len() + value.len() + 4)
                .sum::<usize>();
        let agent = if head_size <= SMALL_OUTPUT {
            &self.small
        } else {
            &self.large
        };
        let invalid = |e: http::Error| ApiError::BadRequest(format!("invalid request header: {e}"));
        let result = match (&out.splice, req.method.as_str()) {
            (_, "GET") => run(agent, builder.body(()).map_err(invalid)?, within),
            (None, _) => run(agent, builder.body(out.body).map_err(invalid)?, within),
            (Some(splice), _) => {
                // The edited body in its three pieces, with its length declared so ureq
                // sends it length-delimited, as it would a slice.
                let [before, with, after] = splice.pieces(out.body);
                let mut pieces = before.chain(with).chain(after);
                let builder = builder.header("content-length", splice.len(out.body));
                let body = SendBody::from_reader(&mut pieces);
                run(agent, builder.body(body).map_err(invalid)?, within)
            }
        };
        result.map_err(|e| upstream_error(&e))
    }
}

/// Runs `request` on `agent`, within `within` in all when given (else under the agent's
/// per-read timeouts only).
fn run<S: ureq::AsSendBody>(
    agent: &Agent,
    request: http::Request<S>,
    within: Option<std::time::Duration>,
) -> Result<http::Response<Body>, ureq::Error> {
    match within {
        Some(limit) => agent.run(
            agent
                .configure_request(request)
                .timeout_global(Some(limit))
                .build(),
        ),
        None => agent.run(request),
    }
}

/// An upstream answer, and the secrets its request carried, which nothing of it may echo.
pub struct Answer {
    body: Held,
    scrub: Scrub,
}

/// An answer still streaming, or read whole because the router had to look at it (and
/// already scrubbed).
enum Held {
    Streaming(http::Response<Body>),
    Buffered(http::response::Parts, Vec<u8>),
}

impl Answer {
    pub fn new(response: http::Response<Body>, scrub: Scrub) -> Answer {
        Answer {
            body: Held::Streaming(response),
            scrub,
        }
    }

    fn buffered(parts: http::response::Parts, mut body: Vec<u8>, scrub: Scrub) -> Answer {
        scrub.bytes(&mut body);
        Answer {
            body: Held::Buffered(parts, body),
            scrub,
        }
    }

    pub fn status(&self) -> u16 {
        match &self.body {
            Held::Streaming(r) => r.status().as_u16(),
            Held::Buffered(parts, _) => parts.status.as_u16(),
        }
    }

    /// Reads the body (an error body: small, and capped) so it can be inspected.
    pub fn buffer(self) -> Result<Answer, ApiError> {
        match self.body {
            Held::Streaming(response) => {
                let (parts, body) = response.into_parts();
                let bytes = body
                    .into_with_config()
                    .limit(MAX_INSPECTED)
                    .read_to_vec()
                    .map_err(|e| upstream_error(&e))?;
                Ok(Answer::buffered(parts, bytes, self.scrub))
            }
            Held::Buffered(..) => Ok(self),
        }
    }

    /// Reads a small, non-streaming success whole and checks it is what it claims, so that a
    /// body that stalls, breaks or is garbage is still this account's failure and the request
    /// can move on: nothing has gone downstream yet. Streams and large bodies pass untouched
    /// (only their content type is checked).
    pub fn settle(self) -> Result<Answer, ApiError> {
        let Answer {
            body: Held::Streaming(response),
            scrub,
        } = self
        else {
            return Ok(self);
        };
        let status = response.status().as_u16();
        if status < 200 {
            // ureq consumes 100, 102 and 103 itself; what is left (101) would hand us the
            // upstream's raw connection, and nothing here asks to switch protocols.
            return Err(ApiError::UpstreamGarbled(format!(
                "a {status} answer to a request that asked for no protocol switch"
            )));
        }
        let content_type = header_str(response.headers(), "content-type");
        if content_type.is_some_and(is_event_stream) || no_body(status) {
            return Ok(Answer::new(response, scrub));
        }
        let length = header_str(response.headers(), "content-length")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&n| n <= BUFFER_WHOLE);
        let Some(n) = length else {
            return match garbled_success(content_type, None) {
                Some(why) => Err(ApiError::UpstreamGarbled(scrub.text(&why).into_owned())),
                None => Ok(Answer::new(response, scrub)),
            };
        };
        let (parts, body) = response.into_parts();
        let mut buf = Vec::with_capacity(n as usize);
        // Read to the reader's own end (one byte past `n` at most): only a body read to its
        // end lets ureq return the connection to its pool.
        let got = body
            .into_reader()
            .take(n + 1)
            .read_to_end(&mut buf)
            .map_err(|e| io_error(&e))?;
        if got as u64 != n {
            return Err(ApiError::UpstreamUnreachable(format!(
                "the upstream closed after {got} of {n} body bytes"
            )));
        }
        let content_type = header_str(&parts.headers, "content-type");
        match garbled_success(content_type, Some(&buf)) {
            Some(why) => Err(ApiError::UpstreamGarbled(scrub.text(&why).into_owned())),
            None => Ok(Answer::buffered(parts, buf, scrub)),
        }
    }

    /// A response header, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        let headers = match &self.body {
            Held::Streaming(r) => r.headers(),
            Held::Buffered(parts, _) => &parts.headers,
        };
        header_str(headers, name)
    }

    pub fn body(&self) -> &[u8] {
        match &self.body {
            Held::Streaming(_) => &[],
            Held::Buffered(_, body) => body,
        }
    }
}

fn upstream_error(e: &ureq::Error) -> ApiError {
    let message = e.to_string();
    if untrusted_certificate(&message) {
        return ApiError::UpstreamUntrusted(message);
    }
    match e {
        ureq::Error::Timeout(_) => ApiError::UpstreamTimeout(e.to_string()),
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            ApiError::UpstreamTimeout(e.to_string())
        }
        ureq::Error::Http(_) | ureq::Error::BadUri(_) => {
            ApiError::BadRequest(format!("the request cannot be forwarded: {e}"))
        }
        _ => ApiError::UpstreamUnreachable(e.to_string()),
    }
}

/// Whether a connection error is rustls refusing the upstream's certificate. ureq does not
/// expose rustls' error type to us (we do not depend on rustls directly), so its stable
/// `Display` is matched: "invalid peer certificate: UnknownIssuer" and the like.
fn untrusted_certificate(message: &str) -> bool {
    message.contains("invalid peer certificate")
}

/// Statuses whose answer has no body by definition (RFC 9110 §6.4.1): relayed without one.
fn no_body(status: u16) -> bool {
    matches!(status, 204 | 304)
}

/// Whether a content type is an event stream.
fn is_event_stream(content_type: &str) -> bool {
    content_type.trim_start().starts_with("text/event-stream")
}

/// What is wrong with a success answer, judged before anything went downstream: every API
/// the gateway forwards answers JSON or an event stream, so anything else (an HTML page from a
/// broken proxy, a truncated or garbled JSON body) is the upstream's failure, not an answer.
/// `body` is the whole body when it was read (small, non-streaming answers).
pub fn garbled_success(content_type: Option<&str>, body: Option<&[u8]>) -> Option<String> {
    let essence = content_type.map(|ct| {
        ct.split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
    });
    match essence.as_deref() {
        Some("text/event-stream") => None,
        Some(ct) if ct != "application/json" && !ct.ends_with("+json") => Some(format!(
            "a success with content-type {ct:?}, neither JSON nor an event stream"
        )),
        // JSON, or no content-type at all: a whole body must parse.
        _ => {
            let body = body?;
            let error = serde_json::from_slice::<serde::de::IgnoredAny>(body).err()?;
            Some(format!("a success whose body is not JSON ({error})"))
        }
    }
}

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
) -> Result<(Outcome, bool), (ApiError, Responder<'a>)> {
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
            ApiError::UpstreamGarbled(format!("a {status} answer, which carries no message")),
            out,
        ));
    }
    let mut head = Head::new(status);
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
        // A converted body gets its own content-type; retry-after, request-id and the
        // rate-limit headers still pass.
        let skip = hop_by_hop(name)
            || tokens.iter().any(|t| t == name)
            || (converted && name == "content-type");
        if skip {
            continue;
        }
        // `x-request-id` is ours (the gateway's id for the request); the upstream's id
        // travels under Anthropic's name for it.
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

    let json = |mut head: Head,
                value: serde_json::Value,
                out: Responder<'a>,
                meter: &mut Meter,
                settle: Settle<'_>| {
        head.header("content-type", b"application/json");
        meter.sent();
        settle(meter);
        let keep = out.send(head, value.to_string().as_bytes());
        Ok((Outcome::Complete, keep))
    };
    match shape {
        Shape::Anthropic if is_sse => Ok(relay_sse(reader, out, head, None, meter, &guard, settle)),
        Shape::Anthropic => match length {
            Some(n) if n <= BUFFER_WHOLE => {
                // Small bodies: read whole, then one write; a short body is still an error we
                // can report properly, since nothing has been sent yet. Read to the end (the
                // reader's own end, one byte past `n` at most): only a body read to its end
                // lets ureq return the connection to its pool.
                let mut buf = Vec::with_capacity(n as usize);
                match reader.by_ref().take(n + 1).read_to_end(&mut buf) {
                    Ok(got) if got as u64 == n => {
                        scrub.bytes(&mut buf);
                        meter.sent();
                        if status < 300 {
                            meter.message(&buf);
                        }
                        settle(meter);
                        Ok((Outcome::Complete, out.send(head, &buf)))
                    }
                    Ok(got) => Err((
                        ApiError::UpstreamUnreachable(format!(
                            "the upstream closed after {got} of {n} body bytes"
                        )),
                        out,
                    )),
                    Err(e) => Err((io_error(&e), out)),
                }
            }
            // Large or unframed: copied through, its usage found on the way.
            _ => {
                let usage = (status < 300).then(|| json::FieldScan::new("usage", MAX_USAGE));
                let started = match length {
                    Some(n) => out.stream_with_length(head, n),
                    None => out.stream(head),
                };
                Ok(relay_stream(reader, started, usage, meter, &scrub, settle))
            }
        },
        _ if status >= 400 => match read_all(&mut reader, MAX_INSPECTED, &scrub) {
            Ok(body) => json(
                head,
                openai::response::error_from_anthropic(status, &body),
                out,
                meter,
                settle,
            ),
            Err(e) => Err((e, out)),
        },
        Shape::Chat {
            include_usage,
            model,
            ..
        } if is_sse => {
            head.header("content-type", b"text/event-stream")
                .header("cache-control", b"no-cache");
            let chat = ChunkStream::new(model, *include_usage, crate::time::now_unix());
            Ok(relay_sse(
                reader,
                out,
                head,
                Some(chat),
                meter,
                &guard,
                settle,
            ))
        }
        Shape::Chat { model, .. } => {
            let completion = read_all(&mut reader, MAX_MESSAGE, &scrub).and_then(|b| {
                openai::response::completion(&b, model, crate::time::now_unix())
                    .map_err(|e| not_json(&e))
            });
            match completion {
                Ok(c) => {
                    meter.usage.merge(&c.usage);
                    head.header("content-type", b"application/json");
                    meter.sent();
                    settle(meter);
                    Ok((Outcome::Complete, out.send(head, &c.body)))
                }
                Err(e) => Err((e, out)),
            }
        }
        Shape::Models { aliases, alias } => {
            let listed = read_all(&mut reader, MAX_MODELS, &scrub).and_then(|b| parse_json(&b));
            match listed {
                Ok(v) if v.get("data").is_some() => {
                    let mut list = openai::response::models(&v);
                    if let Some(data) = list["data"].as_array_mut() {
                        data.extend(aliases.iter().map(|a| {
                            serde_json::json!({"id": a, "object": "model", "created": 0, "owned_by": "llm-gateway"})
                        }));
                    }
                    json(head, list, out, meter, settle)
                }
                Ok(v) => {
                    let mut model = openai::response::model(&v);
                    if let Some(alias) = alias {
                        model["id"] = alias.as_str().into();
                        model["owned_by"] = "llm-gateway".into();
                    }
                    json(head, model, out, meter, settle)
                }
                Err(e) => Err((e, out)),
            }
        }
    }
}

/// Reads a whole body, refusing more than `limit` bytes, and scrubs it.
fn read_all(reader: &mut dyn Read, limit: u64, scrub: &Scrub) -> Result<Vec<u8>, ApiError> {
    let mut buf = Vec::new();
    reader
        .take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| io_error(&e))?;
    if buf.len() as u64 > limit {
        return Err(ApiError::UpstreamUnreachable(format!(
            "the upstream answer is larger than {limit} bytes"
        )));
    }
    scrub.bytes(&mut buf);
    Ok(buf)
}

fn parse_json(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    crate::json::from_slice(body).map_err(|e| not_json(&e))
}

fn not_json(e: &serde_json::Error) -> ApiError {
    ApiError::UpstreamUnreachable(format!(
        "the upstream answered something that is not JSON: {e}"
    ))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn io_error(e: &std::io::Error) -> ApiError {
    // ureq's body reader wraps its own errors (a read timeout is `Timeout(Reason::Read)` with
    // kind `Other`): classify those as ureq errors, so a stalled body is a 504, not a 502.
    if let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<ureq::Error>()) {
        return upstream_error(inner);
    }
    if matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    ) {
        ApiError::UpstreamTimeout(e.to_string())
    } else {
        ApiError::UpstreamUnreachable(e.to_string())
    }
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

/// An SSE body, forwarded event by event, or converted event by event into OpenAI chunks
/// when `chat` is given. If the upstream ends without `message_stop` (or an `error` event of
/// its own), or an event grows past `guard.max_event`, the client is told with an error in
/// its format rather than a silent cut.
fn relay_sse(
    mut reader: impl Read,
    out: Responder<'_>,
    head: Head,
    mut chat: Option<ChunkStream>,
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
    if let Some(chat) = &chat {
        meter.usage.merge(&chat.usage());
    }
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
    if finished {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_hop_by_hop_headers_are_withheld() {
        for name in [
            "x-api-key",
            "x_api_key",
            "x-api_key",
            "authorization",
            "proxy_authorization",
            "cookie",
            "connection",
            "transfer-encoding",
            "host",
            "content-length",
            "accept-encoding",
        ] {
            assert!(withheld_from_upstream(name), "{name}");
        }
        for name in [
            "anthropic-beta",
            "anthropic-version",
            "user-agent",
            "x-custom",
        ] {
            assert!(!withheld_from_upstream(name), "{name}");
        }
    }

    #[test]
    fn successes_that_are_not_json_or_events_are_garbled() {
        let json = Some("application/json");
        /// Content type, whole body if read, and whether it is garbled.
        type Case<'a> = (Option<&'a str>, Option<&'a [u8]>, bool);
        let cases: [Case; 10] = [
            (json, Some(br#"{"id":"msg"}"#), false),
            (Some("application/json; charset=utf-8"), Some(b"[]"), false),
            (Some("application/problem+json"), Some(b"{}"), false),
            (json, None, false),
            (Some("text/event-stream"), None, false),
            (None, Some(b"{}"), false),
            (json, Some(b"<html>bad gateway</html>"), true),
            (json, Some(br#"{"id":"ms"#), true),
            (Some("text/html"), None, true),
            (None, Some(b"garbage"), true),
        ];
        for (content_type, body, garbled) in cases {
            let verdict = garbled_success(content_type, body);
            assert_eq!(
                verdict.is_some(),
                garbled,
                "{content_type:?} {body:?}: {verdict:?}"
            );
        }
    }

    #[test]
    fn wrapped_ureq_timeouts_are_timeouts() {
        let wrapped = std::io::Error::other(ureq::Error::Timeout(ureq::Timeout::PerRead));
        assert_eq!(io_error(&wrapped).status(), 504, "{wrapped}");
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(io_error(&reset).status(), 502);
    }

    #[test]
    fn untrusted_certificates_are_recognised() {
        assert!(untrusted_certificate(
            "io: invalid peer certificate: UnknownIssuer"
        ));
        assert!(untrusted_certificate(
            "rustls: invalid peer certificate: Expired"
        ));
        assert!(!untrusted_certificate(
            "io: Connection refused (os error 111)"
        ));
    }
}
