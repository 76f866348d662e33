//! OAuth tokens in Redis: sealed with the instance key, refreshed under a fenced lease,
//! offered by issue time (the newer wins), and `needs_login` marked for refused ones.

use super::*;

impl Shared {
    fn token_fields(&self, id: &str, tokens: &Tokens, needs_login: bool) -> Vec<String> {
        vec![
            "access".into(),
            self.key.seal(id, "redis_access", &tokens.access),
            "refresh".into(),
            self.key.seal(id, "redis_refresh", &tokens.refresh),
            "expires_at".into(),
            tokens.expires_at.to_string(),
            "issued_at".into(),
            tokens.issued_at.to_string(),
            "needs_login".into(),
            if needs_login { "1" } else { "0" }.into(),
        ]
    }

    fn open_stored(
        &self,
        id: &str,
        hash: &std::collections::HashMap<String, String>,
    ) -> Result<Option<Stored>, Down> {
        let field = |name: &str| hash.get(name).map(String::as_str);
        let (Some(access), Some(refresh)) = (field("access"), field("refresh")) else {
            return Ok(None);
        };
        let open = |name: &str, value: &str| {
            self.key.open(id, name, value).map_err(|e| {
                Down(format!(
                    "the tokens of account {id} in Redis do not open ({e}): every instance needs the same secret key"
                ))
            })
        };
        let number = |name: &str| field(name).and_then(|v| v.parse().ok()).unwrap_or(0);
        Ok(Some(Stored {
            tokens: Tokens {
                access: open("redis_access", access)?,
                refresh: open("redis_refresh", refresh)?,
                expires_at: number("expires_at"),
                issued_at: number("issued_at"),
            },
            needs_login: field("needs_login") == Some("1"),
        }))
    }

    /// The tokens Redis holds for each of `ids` (`None` where it holds none).
    pub fn tokens(&self, ids: &[&str]) -> Result<Vec<Option<Stored>>, Down> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HGETALL").arg(self.name("tok", id));
        }
        let hashes: Vec<std::collections::HashMap<String, String>> =
            self.call(|c| pipe.query(c))?;
        ids.iter()
            .zip(&hashes)
            .map(|(id, hash)| self.open_stored(id, hash))
            .collect()
    }

    /// Offers tokens found elsewhere (config.yaml after a login, tokens not saved before):
    /// stored only when issued later than what Redis holds. Returns whether they were.
    pub fn offer(&self, id: &str, tokens: &Tokens) -> Result<bool, Down> {
        let key = self.name("tok", id);
        let mut cmd = eval(OFFER, &[&key]);
        cmd.arg(tokens.issued_at)
            .arg(self.token_fields(id, tokens, false));
        self.call(|c| cmd.query::<i64>(c)).map(|n| n == 1)
    }

    /// Takes the refresh lease on `id` for `ttl`; `None` when another holder has it.
    pub fn lease(&self, id: &str, ttl: Duration) -> Result<Option<Lease<'_>>, Down> {
        let (lease, fence) = (self.name("lease", id), self.name("fence", id));
        let mut cmd = eval(LEASE, &[&lease, &fence]);
        cmd.arg(ttl.as_millis().max(1) as u64);
        let fence: i64 = self.call(|c| cmd.query(c))?;
        Ok((fence > 0).then(|| Lease {
            shared: self,
            lease,
            tok: self.name("tok", id),
            fence,
        }))
    }

    /// Whether someone holds the refresh lease on `id` now.
    pub fn leased(&self, id: &str) -> Result<bool, Down> {
        let lease = self.name("lease", id);
        self.call(|c| redis::cmd("EXISTS").arg(&lease).query::<bool>(c))
    }
}

impl Lease<'_> {
    /// Stores rotated tokens; false when the lease was lost (expired and taken) meanwhile.
    pub fn store(&self, id: &str, tokens: &Tokens) -> Result<bool, Down> {
        let mut cmd = eval(STORE_FENCED, &[&self.lease, &self.tok]);
        cmd.arg(self.fence)
            .arg(self.shared.token_fields(id, tokens, false));
        self.shared.call(|c| cmd.query::<i64>(c)).map(|n| n == 1)
    }

    /// Records that the tokens issued at `issued_at` were refused for good (`invalid_grant`).
    pub fn needs_login(&self, issued_at: u64) -> Result<bool, Down> {
        let mut cmd = eval(NEEDS_LOGIN, &[&self.lease, &self.tok]);
        cmd.arg(self.fence).arg(issued_at);
        self.shared.call(|c| cmd.query::<i64>(c)).map(|n| n == 1)
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut cmd = eval(RELEASE, &[&self.lease]);
        cmd.arg(self.fence);
        // A lease not released expires by itself.
        let _ = self.shared.call(|c| cmd.query::<i64>(c));
    }
}
