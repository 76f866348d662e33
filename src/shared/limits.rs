//! Per-key limits in Redis: requests per minute, concurrency slots and budget reservations,
//! each every instance's, held with a TTL and renewed while in use.

use super::*;

impl Shared {
    /// Counts a request against `key`'s requests per minute on every instance: `None` when
    /// admitted, else how long until the oldest of the minute leaves the window.
    pub fn rpm(&self, key: &str, rpm: u32) -> Result<Option<Duration>, Down> {
        let name = self.name("rpm", key);
        let mut cmd = eval(RPM, &[&name]);
        cmd.arg(rpm).arg(self.unique());
        let wait: i64 = self.call(|c| cmd.query(c))?;
        Ok((wait >= 0).then(|| Duration::from_millis(wait as u64)))
    }

    /// Takes one of `key`'s `max` concurrent slots; returns the slot's name, or `None` when all
    /// are taken.
    pub fn acquire(&self, key: &str, max: u32) -> Result<Option<String>, Down> {
        let name = self.name("conc", key);
        let member = self.unique();
        let mut cmd = eval(ACQUIRE, &[&name]);
        cmd.arg(max).arg(&member).arg(SLOT_HOLD.as_millis() as u64);
        let taken: i64 = self.call(|c| cmd.query(c))?;
        Ok((taken == 1).then_some(member))
    }

    /// Renews slots still held: `(client key, slot)` pairs.
    pub fn renew(&self, slots: &[(String, String)]) -> Result<(), Down> {
        self.renew_members("conc", slots)
    }

    /// Pushes back the expiry of members still held in `kind` sets: `(client key, member)`.
    fn renew_members(&self, kind: &str, held: &[(String, String)]) -> Result<(), Down> {
        let names: Vec<String> = held.iter().map(|(key, _)| self.name(kind, key)).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut cmd = eval(RENEW, &names);
        cmd.arg(SLOT_HOLD.as_millis() as u64);
        for (_, member) in held {
            cmd.arg(member);
        }
        self.call(|c| cmd.query::<i64>(c)).map(|_| ())
    }

    pub fn release(&self, key: &str, slot: &str) {
        let name = self.name("conc", key);
        let _ = self.call(|c| redis::cmd("ZREM").arg(&name).arg(slot).query::<()>(c));
    }

    /// Reserves `amount` (tokens and nano-USD) against `key`'s budgets while a request is in
    /// flight, when what every instance reserved for it is under `left` in both units (its
    /// budgets not yet spent). `Ok(Ok(member))` names the reservation (renewed like a slot,
    /// gone by itself 30 s after its instance); `Ok(Err(reserved))` refuses, with what is
    /// reserved.
    pub fn reserve(
        &self,
        key: &str,
        left: Spend,
        amount: Spend,
    ) -> Result<Result<String, Spend>, Down> {
        let name = self.name("resv", key);
        let member = format!("{}/{}:{}", self.unique(), amount.nano, amount.tokens);
        let mut cmd = eval(RESERVE, &[&name]);
        cmd.arg(left.tokens)
            .arg(left.nano)
            .arg(&member)
            .arg(SLOT_HOLD.as_millis() as u64);
        let (taken, tokens, nano): (i64, f64, f64) = self.call(|c| cmd.query(c))?;
        let reserved = Spend {
            tokens: tokens as u64,
            nano: nano as u64,
        };
        Ok(if taken == 1 {
            Ok(member)
        } else {
            Err(reserved)
        })
    }

    /// Renews reservations still held: `(client key, member)` pairs.
    pub fn renew_reservations(&self, held: &[(String, String)]) -> Result<(), Down> {
        self.renew_members("resv", held)
    }

    /// Gives a reservation back (the answer is metered; this instance counts its usage at
    /// once, the others once its next flush has sent it).
    pub fn unreserve(&self, key: &str, member: &str) {
        let name = self.name("resv", key);
        let _ = self.call(|c| redis::cmd("ZREM").arg(&name).arg(member).query::<()>(c));
    }
}
