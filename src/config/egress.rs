//! An account's egress: the proxy everything done for it goes through, checked once at load.

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
