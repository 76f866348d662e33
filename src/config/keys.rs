//! A gateway (client) key as the server uses it: its stored hash, its state and what it may
//! do (`KeyLimits`: models, rate, concurrency, token and USD budgets), and the dates its
//! expiry is written in.

#[derive(Debug, Clone)]
pub struct ClientKey {
    pub id: String,
    pub name: String,
    pub hash: [u8; 32],
    pub enabled: bool,
    pub admin: bool,
    pub limits: KeyLimits,
    /// Unix seconds after which the key is refused.
    pub expires_at: Option<u64>,
    pub revoked: bool,
}

/// What one gateway key may do. `None` is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyLimits {
    /// Empty: every model.
    pub models: Vec<String>,
    pub rpm: Option<u32>,
    pub max_concurrent: Option<u32>,
    /// Requests that may wait for a `max_concurrent` slot, in arrival order.
    pub queue: Option<u32>,
    pub daily_tokens: Option<u64>,
    pub monthly_tokens: Option<u64>,
    /// Nano-USD budgets: per UTC day, per week from Monday (UTC), per UTC month, in all.
    pub daily_usd: Option<u64>,
    pub weekly_usd: Option<u64>,
    pub monthly_usd: Option<u64>,
    pub total_usd: Option<u64>,
}

/// `2026-12-31` (midnight UTC) or an RFC 3339 UTC time, as Unix seconds.
pub fn parse_time(text: &str) -> Option<u64> {
    let text = text.trim();
    if text.len() == 10 {
        return crate::time::parse_rfc3339(&format!("{text}T00:00:00Z"));
    }
    crate::time::parse_rfc3339(text)
}
