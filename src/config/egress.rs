//! An account's egress: the proxy everything done for it goes through, and the CA its TLS
//! trusts (a TLS-intercepting proxy's), each checked once at load.

use std::path::{Path, PathBuf};

use crate::secret::Secret;

/// A proxy everything done for an account goes through. The URL (it may hold a password) is
/// a `Secret`: never shown but masked.
#[derive(Clone)]
pub struct Egress {
    pub url: Secret,
    pub proxy: ureq::Proxy,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Egress({})", self.url.mask())
    }
}

impl PartialEq for Egress {
    fn eq(&self, other: &Egress) -> bool {
        self.url == other.url
    }
}

impl Egress {
    /// A proxy URL, or `None` for `direct`.
    pub fn parse(url: &Secret) -> Result<Option<Egress>, String> {
        let text = url.expose().trim();
        if text == "direct" {
            return Ok(None);
        }
        let scheme = text.split_once("://").map(|(s, _)| s);
        if !matches!(scheme, Some("http" | "https" | "socks5" | "socks5h")) {
            return Err(format!(
                "proxy {} is not http://, https://, socks5:// or socks5h:// (or direct)",
                url.mask()
            ));
        }
        // ureq's message can quote the URL: only ours is shown.
        let proxy = ureq::Proxy::new(text)
            .map_err(|_| format!("proxy {} is not a proxy URL ureq can use", url.mask()))?;
        Ok(Some(Egress {
            url: url.clone(),
            proxy,
        }))
    }
}

/// A CA bundle TLS trusts instead of the public roots: a corporate proxy's that intercepts
/// TLS, or a private upstream's.
#[derive(Clone)]
pub struct Trust {
    pub path: PathBuf,
    pub tls: ureq::tls::TlsConfig,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Trust({})", self.path.display())
    }
}

impl PartialEq for Trust {
    fn eq(&self, other: &Trust) -> bool {
        self.path == other.path
    }
}

impl Trust {
    /// Reads the PEM certificates of `file` (relative to `dir`, the config's folder).
    pub fn load(dir: &Path, file: &str) -> Result<Trust, String> {
        let path = dir.join(file);
        let pem = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(cert)) => Some(cert),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(format!("{}: no PEM certificate in it", path.display()));
        }
        let roots = ureq::tls::RootCerts::new_with_certs(&certs);
        Ok(Trust {
            path,
            tls: ureq::tls::TlsConfig::builder().root_certs(roots).build(),
        })
    }
}
