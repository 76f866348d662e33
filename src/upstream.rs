//! The upstream client: one ureq agent whose connection pool is sized to the workers, the
//! forwarding of a downstream request with the account's credential, and `Answer`, what came
//! back (checked before anything goes downstream; `relay` copies it on).

use std::io::Read;

use ureq::http::{self, HeaderMap};
use ureq::unversioned::resolver::DefaultResolver;
use ureq::unversioned::transport::{
    ConnectProxyConnector, Connector, RustlsConnector, SocksConnector, TcpConnector,
};
use ureq::{Agent, Body, SendBody};

use crate::config::UpstreamSettings;
use crate::http::Request;
use crate::processor::{Outgoing, Processor};
use crate::scrub::Scrub;
use crate::watch::ClientWatch;

/// Bodies up to this size are read whole and sent with the head in one write.
pub(crate) const BUFFER_WHOLE: u64 = 256 * 1024;
/// Error bodies read for inspection are capped here.
pub(crate) const MAX_INSPECTED: u64 = 1024 * 1024;

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
pub(crate) fn hop_by_hop(name: &str) -> bool {
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
            // An account's proxy (SOCKS, or an HTTP CONNECT tunnel), else TCP; then the
            // client watch (under TLS, so TLS never sees its slices), then TLS for https. The
            // agent itself has no proxy (nor one from the environment): a request sets its
            // account's.
            let connector =
                ().chain(SocksConnector::default())
                    .chain(ConnectProxyConnector::default())
                    .chain(TcpConnector::default())
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

    /// Sends `req` upstream, shaped by the account's processor, the way `via` says (a probe
    /// bounds the whole exchange up to the response head: it must not wait out the read
    /// timeout meant for long generations). Errors here happened before any byte of a
    /// response: the caller may answer or try another account.
    pub fn forward(
        &self,
        req: &Request,
        processor: &dyn Processor,
        via: Via<'_>,
    ) -> Result<http::Response<Body>, UpstreamError> {
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
        processor
            .prepare(&mut out)
            .map_err(|e| UpstreamError::Unsendable(e.to_string()))?;

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
        let invalid =
            |e: http::Error| UpstreamError::Unsendable(format!("invalid request header: {e}"));
        let result = match (&out.splice, req.method.as_str()) {
            (_, "GET") => run(agent, builder.body(()).map_err(invalid)?, via),
            (None, _) => run(agent, builder.body(out.body).map_err(invalid)?, via),
            (Some(splice), _) => {
                // The edited body in its three pieces, with its length declared so ureq
                // sends it length-delimited, as it would a slice.
                let [before, with, after] = splice.pieces(out.body);
                let mut pieces = before.chain(with).chain(after);
                let builder = builder.header("content-length", splice.len(out.body));
                let body = SendBody::from_reader(&mut pieces);
                run(agent, builder.body(body).map_err(invalid)?, via)
            }
        };
        result.map_err(|e| upstream_error(&e))
    }
}

/// How one request goes out: through the account's proxy, if it has one (ureq pools
/// connections per proxy), trusting its CA, if it has one, and within a bound in all, if
/// given (else under the agent's per-read timeouts only).
#[derive(Clone, Copy, Default)]
pub struct Via<'a> {
    pub proxy: Option<&'a ureq::Proxy>,
    pub tls: Option<&'a ureq::tls::TlsConfig>,
    pub within: Option<std::time::Duration>,
}

fn run<S: ureq::AsSendBody>(
    agent: &Agent,
    request: http::Request<S>,
    via: Via<'_>,
) -> Result<http::Response<Body>, ureq::Error> {
    if via.proxy.is_none() && via.tls.is_none() && via.within.is_none() {
        return agent.run(request);
    }
    let mut config = agent.configure_request(request);
    if let Some(proxy) = via.proxy {
        config = config.proxy(Some(proxy.clone()));
    }
    if let Some(tls) = via.tls {
        config = config.tls_config(tls.clone());
    }
    if let Some(limit) = via.within {
        config = config.timeout_global(Some(limit));
    }
    agent.run(config.build())
}

/// An upstream answer, and the secrets its request carried, which nothing of it may echo.
pub struct Answer {
    pub(crate) body: Held,
    pub(crate) scrub: Scrub,
}

/// An answer still streaming, or read whole because the router had to look at it (and
/// already scrubbed).
pub(crate) enum Held {
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
    pub fn buffer(self) -> Result<Answer, UpstreamError> {
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
    pub fn settle(self) -> Result<Answer, UpstreamError> {
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
            return Err(UpstreamError::Garbled(format!(
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
                Some(why) => Err(UpstreamError::Garbled(scrub.text(&why).into_owned())),
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
            return Err(UpstreamError::Unreachable(format!(
                "the upstream closed after {got} of {n} body bytes"
            )));
        }
        let content_type = header_str(&parts.headers, "content-type");
        match garbled_success(content_type, Some(&buf)) {
            Some(why) => Err(UpstreamError::Garbled(scrub.text(&why).into_owned())),
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

/// What went wrong between the gateway and the upstream: the upstream boundary's errors.
/// `ApiError::from` says what each one is to the client, in one place.
#[derive(Debug, Clone)]
pub enum UpstreamError {
    /// The request itself cannot be sent (an invalid header, a body an account's processor
    /// cannot edit): no account would do better.
    Unsendable(String),
    /// The upstream could not be reached, or broke before answering whole.
    Unreachable(String),
    /// The upstream did not answer within the configured timeout.
    Timeout(String),
    /// A success whose body is not what it claims (not JSON, too large, no message).
    Garbled(String),
    /// The upstream's TLS certificate is not trusted: no account would do better.
    Untrusted(String),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (UpstreamError::Unsendable(m)
        | UpstreamError::Unreachable(m)
        | UpstreamError::Timeout(m)
        | UpstreamError::Garbled(m)
        | UpstreamError::Untrusted(m)) = self;
        f.write_str(m)
    }
}

pub(crate) fn upstream_error(e: &ureq::Error) -> UpstreamError {
    let message = e.to_string();
    if untrusted_certificate(&message) {
        return UpstreamError::Untrusted(message);
    }
    match e {
        ureq::Error::Timeout(_) => UpstreamError::Timeout(e.to_string()),
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            UpstreamError::Timeout(e.to_string())
        }
        ureq::Error::Http(_) | ureq::Error::BadUri(_) => {
            UpstreamError::Unsendable(format!("the request cannot be forwarded: {e}"))
        }
        _ => UpstreamError::Unreachable(e.to_string()),
    }
}

/// Whether a connection error is rustls refusing the upstream's certificate. ureq does not
/// expose rustls' error type to us (we do not depend on rustls directly), so its stable
/// `Display` is matched: "invalid peer certificate: UnknownIssuer" and the like.
fn untrusted_certificate(message: &str) -> bool {
    message.contains("invalid peer certificate")
}

/// Statuses whose answer has no body by definition (RFC 9110 §6.4.1): relayed without one.
pub(crate) fn no_body(status: u16) -> bool {
    matches!(status, 204 | 304)
}

/// Whether a content type is an event stream.
pub(crate) fn is_event_stream(content_type: &str) -> bool {
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
            let error = crate::json::well_formed(body).err()?;
            Some(format!("a success whose body is not JSON ({error})"))
        }
    }
}

pub(crate) fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

pub(crate) fn io_error(e: &std::io::Error) -> UpstreamError {
    // ureq's body reader wraps its own errors (a read timeout is `Timeout(Reason::Read)` with
    // kind `Other`): classify those as ureq errors, so a stalled body is a 504, not a 502.
    if let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<ureq::Error>()) {
        return upstream_error(inner);
    }
    if matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    ) {
        UpstreamError::Timeout(e.to_string())
    } else {
        UpstreamError::Unreachable(e.to_string())
    }
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
        // An answer nested past the client-input limit (a tool input a client asked for) is
        // still an answer: not garbage, not the account's failure.
        let deep = format!(
            r#"{{"content":[{{"type":"tool_use","input":{}1{}}}]}}"#,
            "[".repeat(500),
            "]".repeat(500)
        );
        assert_eq!(garbled_success(json, Some(deep.as_bytes())), None);
    }

    #[test]
    fn wrapped_ureq_timeouts_are_timeouts() {
        let wrapped = std::io::Error::other(ureq::Error::Timeout(ureq::Timeout::PerRead));
        assert!(
            matches!(io_error(&wrapped), UpstreamError::Timeout(_)),
            "{wrapped}"
        );
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(matches!(io_error(&reset), UpstreamError::Unreachable(_)));
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
