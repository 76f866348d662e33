//! State shared by several gateway instances through Redis (`state.backend: redis`): OAuth
//! tokens (sealed) under a fenced refresh lease, cooldowns and bans, sticky pins, usage
//! counters and per-key limits. Every operation is one round trip (a pipeline or a Lua script,
//! so each is atomic); every call has a short timeout. When Redis fails, `Shared` says `Down`
//! at once until a background probe finds it back, and callers fall back to local state.
//!
//! Keys, all under `prefix:`: `tok:<account>` (hash), `lease:<account>` and
//! `fence:<account>`, `cool:<account>`, `ban:<account>` and `quota:<account>` (its
//! readings, JSON), `pin:<sticky key>` and `was:<sticky key>` (where it was before it moved),
//! `usage:<day>` and `keytok:<day>` (hashes), `batch:<instance>:<n>`, `rpm:<client key>`
//! and `conc:<client key>` (sorted sets). One Redis node; Redis Cluster is not supported.

mod limits;
mod tokens;
mod usage;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::{Connection, RedisError, RedisResult};

use crate::config::{RedisSettings, Tokens};
use crate::secret::SecretKey;
use crate::usage::{RowKey, Spend, Totals, Usage};

/// Connections kept open between calls; more concurrent callers open and close their own.
const IDLE_CONNECTIONS: usize = 64;
/// How long a concurrency slot lives unless renewed: its instance renews it every few
/// seconds while the request runs, so a dead instance's slots free themselves this soon.
pub const SLOT_HOLD: Duration = Duration::from_secs(30);

/// Redis could not be used now: the caller falls back to local state.
#[derive(Debug, Clone)]
pub struct Down(pub String);

impl fmt::Display for Down {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shared state (Redis) unavailable: {}", self.0)
    }
}

pub struct Shared {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    key: Arc<SecretKey>,
    idle: Mutex<Vec<Connection>>,
    /// Set by a failed call, cleared only by `probe`: while set, calls fail at once.
    down: AtomicBool,
    outage: Mutex<Option<String>>,
    /// Names this process in batch ids and slot members.
    instance: String,
    counter: AtomicU64,
}

/// An account's tokens as Redis holds them.
#[derive(Debug, Clone)]
pub struct Stored {
    pub tokens: Tokens,
    pub needs_login: bool,
}

/// What a pick needs to know from Redis: per account (in the order asked) its cooldown
/// (`until` in Unix ms, and why), ban and quota readings; and the sticky key's pinned account.
#[derive(Debug, Default)]
pub struct View {
    pub cools: Vec<Option<(u64, String)>>,
    pub bans: Vec<Option<String>>,
    pub quotas: Vec<Option<crate::quota::Readings>>,
    pub pin: Option<String>,
}

/// The refresh lease on one account: held until dropped, then released if still ours.
pub struct Lease<'a> {
    shared: &'a Shared,
    lease: String,
    tok: String,
    fence: i64,
}

const VIEW: &str = r"
local n = tonumber(ARGV[1])
local out = {}
if n > 0 then out = redis.call('MGET', unpack(KEYS, 1, 3 * n)) end
if #KEYS > 3 * n then
  local pin = redis.call('GET', KEYS[#KEYS])
  if pin then redis.call('PEXPIRE', KEYS[#KEYS], ARGV[2]) end
  out[3 * n + 1] = pin
end
return out";

/// Extends a cooldown, never shortens one.
const COOL: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local until_ms = tonumber(string.match(cur, '^(%d+)'))
  if until_ms and until_ms >= tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1";

const LEASE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local f = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], f, 'PX', ARGV[1])
return f";

/// Writes the token hash only while the caller's fence still holds the lease.
const STORE_FENCED: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
return 1";

/// Marks the tokens the caller refreshed with (by issue time) as needing a login.
const NEEDS_LOGIN: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[2], 'issued_at') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], 'needs_login', '1')
return 1";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

/// Newer wins: tokens issued later than the stored ones replace them (a login, a seed).
const OFFER: &str = r"
local cur = tonumber(redis.call('HGET', KEYS[1], 'issued_at') or '-1')
if tonumber(ARGV[1]) <= cur then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1";

/// Applies a usage batch once: a retried batch (its reply lost) is not counted twice.
const USAGE: &str = r"
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', 604800) then return 0 end
for i = 1, #ARGV, 3 do redis.pcall('HINCRBY', ARGV[i], ARGV[i + 1], ARGV[i + 2]) end
return 1";

/// A sliding minute on Redis's clock: -1 when admitted, else milliseconds to wait.
const RPM: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return 60000 - (now - tonumber(oldest[2]))
end
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('PEXPIRE', KEYS[1], 60000)
return -1";

/// Takes a concurrency slot (members expire, so a dead instance's slots come back).
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1";

/// Pushes back the expiry of slots still held (KEYS[i] holds member ARGV[i + 1]).
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + tonumber(ARGV[1]), ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
return #KEYS";

/// Reserves ARGV[3] tokens for a key's request in flight (member ARGV[2], which ends in
/// `:<tokens>`, held ARGV[4] ms) when the key's live reservations sum to less than ARGV[1]
/// (its budget left); returns {1, sum} when taken, {0, sum} when not.
/// Reserves a request's tokens and nano-USD (its member ends `/<nano>:<tokens>`, which older
/// instances, reading `:<tokens>$`, still read as its tokens) while both sums are under what
/// is left (ARGV 1 and 2); returns taken, and the sums as text.
const RESERVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local tokens, nano = 0, 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  tokens = tokens + tonumber(string.match(m, ':(%d+)$') or '0')
  nano = nano + tonumber(string.match(m, '/(%d+):%d+$') or '0')
end
local sums = {string.format('%.0f', tokens), string.format('%.0f', nano)}
if tokens >= tonumber(ARGV[1]) or nano >= tonumber(ARGV[2]) then return {0, sums[1], sums[2]} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1, sums[1], sums[2]}";

const METRICS: [&str; 10] = [
    "requests",
    "errors",
    "input",
    "output",
    "cache_creation",
    "cache_read",
    "cache_1h",
    "cost",
    "unpriced",
    "estimated",
];

/// A failure of the connection itself (not an error Redis answered).
fn connection_failed(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

/// A usage hash field, `["key","account","model"]|metric`, read back.
fn parse_usage_field(field: &str) -> Option<((String, String, String), &str)> {
    let (row, metric) = field.rsplit_once('|')?;
    Some((crate::json::from_str(row).ok()?, metric))
}

fn eval(script: &str, keys: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(keys.len()).arg(keys);
    cmd
}

/// The shared state `config` names, if any (a client that does not build is reported).
pub fn open(config: &crate::config::Config) -> Option<Arc<Shared>> {
    let settings = config.state.as_ref()?;
    match Shared::new(settings) {
        Ok(shared) => Some(Arc::new(shared)),
        Err(e) => {
            error!("shared state: {e}; using this instance's own state only");
            None
        }
    }
}

impl Shared {
    /// Prepares the client; connects on first use (a Redis down at start is an outage like
    /// any other, not a reason to refuse to serve).
    pub fn new(settings: &RedisSettings) -> Result<Shared, String> {
        use redis::IntoConnectionInfo;
        let mut info = settings
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("state.redis_url: {e}"))?;
        if let Some(password) = &settings.password {
            let redis = info
                .redis_settings()
                .clone()
                .set_password(password.expose());
            info = info.set_redis_settings(redis);
        }
        let client = match &settings.ca {
            None => redis::Client::open(info),
            Some(ca) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            ),
        }
        .map_err(|e| format!("state.redis_url: {e}"))?;
        let id = crate::secret::random_bytes::<6>();
        Ok(Shared {
            client,
            prefix: settings.prefix.clone(),
            timeout: settings.timeout,
            key: Arc::clone(&settings.key),
            idle: Mutex::new(Vec::new()),
            down: AtomicBool::new(false),
            outage: Mutex::new(None),
            instance: crate::encoding::hex(&id),
            counter: AtomicU64::new(0),
        })
    }

    fn name(&self, kind: &str, id: &str) -> String {
        format!("{}:{kind}:{id}", self.prefix)
    }

    fn connect(&self) -> RedisResult<Connection> {
        let conn = self.client.get_connection_with_timeout(self.timeout)?;
        conn.set_read_timeout(Some(self.timeout))?;
        conn.set_write_timeout(Some(self.timeout))?;
        Ok(conn)
    }

    /// Runs `f` on a connection. A connection that failed is dropped; if it was a pooled one
    /// (Redis may have closed it), `f` gets one fresh connection before Redis counts as down.
    fn call<T>(&self, f: impl Fn(&mut Connection) -> RedisResult<T>) -> Result<T, Down> {
        if self.down.load(Ordering::Relaxed) {
            return Err(Down(self.outage().unwrap_or_default()));
        }
        self.attempt(f)
    }

    fn attempt<T>(&self, f: impl Fn(&mut Connection) -> RedisResult<T>) -> Result<T, Down> {
        let pooled = self.lock_idle().pop();
        let fresh = pooled.is_none();
        let mut conn = match pooled {
            Some(conn) => conn,
            None => self.connect().map_err(|e| self.went_down(&e))?,
        };
        let mut result = f(&mut conn);
        if !fresh && result.as_ref().is_err_and(connection_failed) {
            conn = self.connect().map_err(|e| self.went_down(&e))?;
            result = f(&mut conn);
        }
        match result {
            Ok(value) => {
                self.put_back(conn);
                Ok(value)
            }
            Err(e) if connection_failed(&e) => Err(self.went_down(&e)),
            // Redis answered with an error: the connection is fine, the call is not.
            Err(e) => {
                self.put_back(conn);
                Err(Down(format!("Redis refused a call: {e}")))
            }
        }
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn put_back(&self, conn: Connection) {
        let mut idle = self.lock_idle();
        if idle.len() < IDLE_CONNECTIONS {
            idle.push(conn);
        }
    }

    fn went_down(&self, e: &RedisError) -> Down {
        let why = e.to_string();
        if !self.down.swap(true, Ordering::Relaxed) {
            warn!(
                "shared state: Redis is unreachable ({why}); serving from this instance's own \
                 state (no OAuth refresh without the lease) until it is back"
            );
        }
        *self.outage.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
        self.lock_idle().clear();
        Down(why)
    }

    /// Why Redis is down, or `None` when it is up.
    pub fn outage(&self) -> Option<String> {
        if !self.down.load(Ordering::Relaxed) {
            return None;
        }
        self.outage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The background probe (every half second or so): while Redis is down, tries it; says
    /// when it is back.
    pub fn probe(&self) {
        if !self.down.load(Ordering::Relaxed) {
            return;
        }
        let ping = |c: &mut Connection| redis::cmd("PING").query::<String>(c);
        if self.attempt(ping).is_ok() {
            self.down.store(false, Ordering::Relaxed);
            *self.outage.lock().unwrap_or_else(|p| p.into_inner()) = None;
            info!("shared state: Redis is back; sharing state again");
        }
    }

    /// A connection check for start-up and the CLI.
    pub fn ping(&self) -> Result<(), Down> {
        self.attempt(|c| redis::cmd("PING").query::<String>(c))
            .map(|_| ())
    }

    fn unique(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{}:{n}", self.instance)
    }

    // -----------------------------------------------------------------------------------------
    // Accounts: cooldowns, bans, sticky pins.

    /// Cooldowns and bans of `ids`, and the account the sticky key in `pin` is pinned to
    /// (that pin's TTL renewed to the one given).
    pub fn view(&self, ids: &[&str], pin: Option<(u64, Duration)>) -> Result<View, Down> {
        let mut keys: Vec<String> = ids.iter().map(|id| self.name("cool", id)).collect();
        keys.extend(ids.iter().map(|id| self.name("ban", id)));
        keys.extend(ids.iter().map(|id| self.name("quota", id)));
        if let Some((pin, _)) = pin {
            keys.push(self.name("pin", &format!("{pin:016x}")));
        }
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let mut cmd = eval(VIEW, &keys);
        let ttl = pin.map_or(0, |(_, ttl)| ttl.as_millis() as u64);
        cmd.arg(ids.len()).arg(ttl);
        let mut out: Vec<Option<String>> = self.call(|c| cmd.query(c))?;
        let pin = if out.len() > 3 * ids.len() {
            out.pop().flatten()
        } else {
            None
        };
        out.resize(3 * ids.len(), None);
        // Another instance's readings, checked like any JSON that crossed a boundary.
        let quotas = (out.split_off(2 * ids.len()).into_iter())
            .map(|v| crate::json::from_str(&v?).ok())
            .collect();
        let bans = out.split_off(ids.len());
        let cools = out
            .into_iter()
            .map(|v| {
                let v = v?;
                let (until, reason) = v.split_once('\t')?;
                Some((until.parse().ok()?, reason.to_string()))
            })
            .collect();
        Ok(View {
            cools,
            bans,
            quotas,
            pin,
        })
    }

    /// Tells every instance what `id`'s answers said of its quota (kept as long as a reading
    /// counts).
    pub fn quota(&self, id: &str, readings: &crate::quota::Readings) -> Result<(), Down> {
        let key = self.name("quota", id);
        let text = serde_json::to_string(readings).map_err(|e| Down(e.to_string()))?;
        self.call(|c| {
            redis::cmd("SET")
                .arg(&key)
                .arg(&text)
                .arg("EX")
                .arg(crate::quota::STALE_AFTER_SECS)
                .query::<()>(c)
        })
    }

    /// Tells every instance that `id` cools down until `until_unix_ms` (never shortening a
    /// longer cooldown already shared).
    pub fn cool(&self, id: &str, until_unix_ms: u64, reason: &str) -> Result<(), Down> {
        let left = until_unix_ms.saturating_sub(crate::time::now_unix_millis());
        if left == 0 {
            return Ok(());
        }
        let key = self.name("cool", id);
        let mut cmd = eval(COOL, &[&key]);
        cmd.arg(until_unix_ms)
            .arg(format!("{until_unix_ms}\t{reason}"))
            .arg(left);
        self.call(|c| cmd.query::<i64>(c)).map(|_| ())
    }

    /// Takes `id` out of service on every instance (a ban the upstream announced).
    pub fn ban(&self, id: &str, reason: &str) -> Result<(), Down> {
        let key = self.name("ban", id);
        self.call(|c| redis::cmd("SET").arg(&key).arg(reason).query::<()>(c))
    }

    /// Puts `id` back in service everywhere: no ban, no cooldown (`enable-account`). Its
    /// quota readings stay: they are the upstream's word, not a rest.
    pub fn clear(&self, id: &str) -> Result<(), Down> {
        let (ban, cool) = (self.name("ban", id), self.name("cool", id));
        self.call(|c| redis::cmd("DEL").arg(&ban).arg(&cool).query::<()>(c))
    }

    /// Pins sticky key `pin` to account `id` for `ttl`; a pin that moves from `previous`
    /// remembers it as long (`was:<sticky key>`), for a conversation's thinking signatures.
    pub fn pin(
        &self,
        pin: u64,
        id: &str,
        previous: Option<&str>,
        ttl: Duration,
    ) -> Result<(), Down> {
        let key = self.name("pin", &format!("{pin:016x}"));
        let was = self.name("was", &format!("{pin:016x}"));
        let ms = ttl.as_millis().max(1) as u64;
        self.call(|c| {
            let mut pipe = redis::pipe();
            pipe.cmd("SET").arg(&key).arg(id).arg("PX").arg(ms).ignore();
            if let Some(previous) = previous {
                pipe.cmd("SET")
                    .arg(&was)
                    .arg(previous)
                    .arg("PX")
                    .arg(ms)
                    .ignore();
            }
            pipe.query::<()>(c)
        })
    }

    /// The account sticky key `pin` was pinned to before it last moved.
    pub fn previous_pin(&self, pin: u64) -> Result<Option<String>, Down> {
        let was = self.name("was", &format!("{pin:016x}"));
        self.call(|c| redis::cmd("GET").arg(&was).query::<Option<String>>(c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_fields_survive_any_names() {
        for (key, account, model) in [
            ("ck_1", "acc_1", "claude-sonnet-4-5"),
            ("-", "-", ""),
            ("k|ey", "a\"cc", "m|o\\del|requests"),
        ] {
            let row = (7, key.to_string(), account.to_string(), model.to_string());
            let field = Shared::usage_field(&row, "output");
            let ((k, a, m), metric) = parse_usage_field(&field).expect("parses");
            assert_eq!(
                (k.as_str(), a.as_str(), m.as_str(), metric),
                (key, account, model, "output")
            );
        }
        assert!(parse_usage_field("no separator").is_none());
        assert!(parse_usage_field("[1,2]|input").is_none());
    }
}
