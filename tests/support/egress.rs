//! An egress proxy for the tests: an HTTP CONNECT proxy on an ephemeral port that records,
//! for each tunnel, the target asked for, the `proxy-authorization` sent, and the request lines
//! that went through it (the tests' upstreams speak plain HTTP, so the tunnel is readable).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;

/// One tunnel as the proxy saw it.
#[derive(Clone, Debug, Default)]
pub struct Tunnel {
    pub target: String,
    pub authorization: Option<String>,
    /// `POST /v1/messages HTTP/1.1` and the like, in order.
    pub requests: Vec<String>,
}

pub struct EgressProxy {
    pub addr: SocketAddr,
    tunnels: Arc<Mutex<Vec<Tunnel>>>,
}

impl EgressProxy {
    pub fn start() -> EgressProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let tunnels: Arc<Mutex<Vec<Tunnel>>> = Arc::default();
        let seen = Arc::clone(&tunnels);
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let seen = Arc::clone(&seen);
                thread::spawn(move || tunnel(client, &seen));
            }
        });
        EgressProxy { addr, tunnels }
    }

    /// `http://user:password@127.0.0.1:port`.
    pub fn url(&self, user: &str, password: &str) -> String {
        format!("http://{user}:{password}@{}", self.addr)
    }

    pub fn tunnels(&self) -> Vec<Tunnel> {
        self.tunnels.lock().expect("tunnels").clone()
    }

    /// Every request line that went through any tunnel.
    pub fn requests(&self) -> Vec<String> {
        self.tunnels()
            .into_iter()
            .flat_map(|t| t.requests)
            .collect()
    }
}

fn tunnel(client: TcpStream, seen: &Arc<Mutex<Vec<Tunnel>>>) {
    let mut reader = BufReader::new(client.try_clone().expect("clone"));
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let target = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let mut authorization = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("proxy-authorization")
        {
            authorization = Some(value.trim().to_string());
        }
    }
    let index = {
        let mut all = seen.lock().expect("tunnels");
        all.push(Tunnel {
            target: target.clone(),
            authorization,
            requests: vec![],
        });
        all.len() - 1
    };
    let Ok(upstream) = TcpStream::connect(&target) else {
        let _ = (&client).write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n");
        return;
    };
    let _ = (&client).write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n");
    let mut back = upstream.try_clone().expect("clone");
    let mut to_client = client.try_clone().expect("clone");
    thread::spawn(move || {
        let _ = std::io::copy(&mut back, &mut to_client);
        let _ = to_client.shutdown(std::net::Shutdown::Write);
    });
    // Client to upstream, noting each request line on the way (bytes the reader buffered
    // first).
    let mut upstream = upstream;
    let mut buf = reader.buffer().to_vec();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        for line in String::from_utf8_lossy(&buf).split("\r\n") {
            let method = line.split(' ').next().unwrap_or("");
            if matches!(method, "GET" | "POST") && line.ends_with(" HTTP/1.1") {
                seen.lock().expect("tunnels")[index]
                    .requests
                    .push(line.to_string());
            }
        }
        if upstream.write_all(&buf).is_err() {
            return;
        }
        buf.clear();
        match reader.get_mut().read(&mut chunk) {
            Ok(0) | Err(_) => {
                let _ = upstream.shutdown(std::net::Shutdown::Write);
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
