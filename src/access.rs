//! The access log: one JSON line per request (time, request id, client key name and id, the
//! client's address and user agent, account, model, format, status, latency, time to first
//! byte, tokens, attempts, and each failed attempt when there was failover) to stderr or to a
//! file named in the config, what is learned about a request on its way (`Names`), its id,
//! and who the client is behind trusted proxies (`client_address`). Lines carry names and ids
//! only, never a credential.

use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
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
    /// The client's address (`client_address`) and user agent (bounded).
    pub address: Option<String>,
    pub user_agent: Option<String>,
    /// The attempts that failed before the answer, when there was failover.
    pub tried: Vec<Tried>,
    /// The connection's peer.
    pub peer: Option<std::net::IpAddr>,
    /// The live settings the request was admitted under: what it is priced with.
    pub priced_with: Option<std::sync::Arc<crate::gateway::Settings>>,
}

/// One attempt that did not serve the request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Tried {
    pub account: String,
    /// The upstream's status, when it answered.
    pub status: Option<u16>,
    pub ms: f64,
    pub why: String,
}

/// A network and its prefix length (`10.0.0.0/8`, `::1/128`; a bare address is one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Option<Cidr> {
        let (addr, bits) = match text.trim().split_once('/') {
            Some((a, b)) => (a, Some(b.parse::<u8>().ok()?)),
            None => (text.trim(), None),
        };
        let net: IpAddr = addr.parse().ok()?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = bits.unwrap_or(max);
        (bits <= max).then_some(Cidr { net, bits })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let (net, ip, width) = match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                (u128::from(n.to_bits()), u128::from(i.to_bits()), 32)
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => (n.to_bits(), i.to_bits(), 128),
            _ => return false,
        };
        let shift = width - u32::from(self.bits);
        shift >= width || (net >> shift) == (ip >> shift)
    }
}

/// Who the client is: the peer, unless the peer is a trusted proxy; then the rightmost
/// address of `X-Forwarded-For` that is not one (every address before it could be forged by
/// the client), or the leftmost when all are.
pub fn client_address(
    peer: Option<IpAddr>,
    forwarded: &[&str],
    trusted: &[Cidr],
) -> Option<IpAddr> {
    let peer = peer?;
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return Some(peer);
    }
    let hops: Vec<IpAddr> = (forwarded.iter())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    let client = hops
        .iter()
        .rev()
        .find(|ip| !is_trusted(**ip))
        .or(hops.first());
    Some(client.copied().unwrap_or(peer))
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
            address: None,
            user_agent: None,
            tried: Vec::new(),
            peer: None,
            priced_with: None,
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
    /// What the request cost, as the ledger recorded it.
    pub cost: crate::pricing::Cost,
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
            client_id: Option<&'a str>,
            address: Option<&'a str>,
            user_agent: Option<&'a str>,
            account: Option<&'a str>,
            model: Option<&'a str>,
            format: &'static str,
            status: u16,
            latency_ms: f64,
            ttfb_ms: Option<f64>,
            tokens: Tokens,
            /// USD, exact to the nano-dollar; `unpriced` when no price row matched.
            cost_usd: String,
            attempts: u32,
            #[serde(skip_serializing_if = "<[_]>::is_empty")]
            failover: &'a [Tried],
            error: Option<&'a str>,
        }
        #[derive(serde::Serialize)]
        struct Tokens {
            input: u64,
            output: u64,
            cache_creation: u64,
            cache_1h: u64,
            cache_read: u64,
        }
        let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
        let line = Line {
            time: crate::time::rfc3339_millis(crate::time::now_unix_millis()),
            request_id: self.request_id,
            method: self.method,
            path: self.path,
            client: &names.client,
            client_id: names.client_id.as_deref(),
            address: names.address.as_deref(),
            user_agent: names.user_agent.as_deref(),
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
                cache_1h: meter.usage.cache_1h,
                cache_read: meter.usage.cache_read,
            },
            cost_usd: match self.cost.nano() {
                Some(nano) => crate::pricing::usd(nano, 9),
                None => "unpriced".into(),
            },
            attempts: names.attempts,
            failover: &names.tried,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn cidrs_match_their_networks_only() {
        let lan = Cidr::parse("10.0.0.0/8").expect("cidr");
        assert!(lan.contains(ip("10.200.1.2")) && !lan.contains(ip("11.0.0.1")));
        assert!(
            lan.contains(ip("::ffff:10.1.2.3")),
            "an IPv4-mapped IPv6 address"
        );
        let host = Cidr::parse("127.0.0.1").expect("a bare address is one host");
        assert!(host.contains(ip("127.0.0.1")) && !host.contains(ip("127.0.0.2")));
        let v6 = Cidr::parse("fd00::/8").expect("cidr");
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .expect("all")
                .contains(ip("8.8.8.8"))
        );
        for bad in ["10.0.0.0/33", "10.0.0/8", "x", "::/129", ""] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop() {
        let trusted = [Cidr::parse("10.0.0.0/8").expect("cidr")];
        let peer = Some(ip("10.0.0.5"));
        // The client may forge what it puts first; the proxy appends the real peer.
        let xff = ["6.6.6.6, 203.0.113.7", "10.0.0.9"];
        assert_eq!(
            client_address(peer, &xff, &trusted),
            Some(ip("203.0.113.7"))
        );
        // A peer that is no trusted proxy is the client, whatever it claims.
        assert_eq!(
            client_address(Some(ip("198.51.100.1")), &xff, &trusted),
            Some(ip("198.51.100.1"))
        );
        assert_eq!(client_address(peer, &[], &trusted), peer);
        assert_eq!(client_address(peer, &["garbage"], &trusted), peer);
        assert_eq!(
            client_address(peer, &["10.1.1.1"], &trusted),
            Some(ip("10.1.1.1"))
        );
        assert_eq!(
            client_address(peer, &xff, &[]),
            peer,
            "nothing trusted by default"
        );
    }
}
