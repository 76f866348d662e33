//! A raw TCP fake upstream: the handler owns the socket, so it can stall, trickle, reset, or
//! answer what no HTTP library would write (an endless event, a 204 with a body).

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// One request as the raw fake upstream read it.
pub struct Seen {
    /// Its `x-api-key`.
    pub api_key: String,
    /// Whether its body asks for a stream.
    pub stream: bool,
    /// Every header, names lowercased.
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        (self.headers.iter())
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A raw TCP fake upstream: the handler owns the socket, so it can stall, trickle and reset.
pub struct RawUpstream {
    pub addr: SocketAddr,
}

impl RawUpstream {
    pub fn start(handler: impl Fn(Seen, TcpStream) + Send + Sync + 'static) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind raw upstream");
        let addr = listener.local_addr().expect("raw upstream addr");
        let handler = Arc::new(handler);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let handler = Arc::clone(&handler);
                thread::spawn(move || {
                    if let Some(seen) = read_request(&stream) {
                        handler(seen, stream);
                    }
                });
            }
        });
        RawUpstream { addr }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Reads one request, leaving the body's last byte unread: closing a socket with unread data
/// makes the kernel send a reset instead of a FIN, which is how `HalfAndReset` resets.
fn read_request(stream: &TcpStream) -> Option<Seen> {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::with_capacity(1, stream.try_clone().ok()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    let (mut headers, mut length) = (Vec::new(), 0usize);
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim().to_ascii_lowercase();
            if name == "content-length" {
                length = value.trim().parse().ok()?;
            }
            headers.push((name, value.trim().to_string()));
        }
    }
    let api_key = (headers.iter())
        .find(|(n, _)| n == "x-api-key")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let mut body = vec![0u8; length.saturating_sub(1)];
    reader.read_exact(&mut body).ok()?;
    let stream = String::from_utf8_lossy(&body).contains(r#""stream":true"#);
    Some(Seen {
        api_key,
        stream,
        headers,
    })
}
