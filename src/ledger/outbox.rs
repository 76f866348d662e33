//! Rows on their way to Redis: gathered at each record, sent at each flush as one named batch
//! (applied once, however often it is resent), and kept in `outbox.json` until they arrive.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::usage::{RowKey, Spend, Totals};

/// Rows not yet added to Redis: a named batch whose outcome is unknown (retried under the same
/// name, which Redis applies once), and the rows gathered since. While it is not empty after a
/// flush it is also kept in `outbox.json`, so a restart sends it (under the same name).
#[derive(Default, Serialize, Deserialize)]
pub(super) struct Outbox {
    pub(super) unsent: Option<(String, Vec<(RowKey, Totals)>)>,
    #[serde(with = "rows")]
    pub(super) fresh: BTreeMap<RowKey, Totals>,
    #[serde(skip)]
    pub(super) next: u64,
}

/// A map with tuple keys, as a list of pairs (JSON keys are strings).
mod rows {
    use super::{BTreeMap, RowKey, Totals};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<RowKey, Totals>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<RowKey, Totals>, D::Error> {
        Ok(Vec::<(RowKey, Totals)>::deserialize(d)?
            .into_iter()
            .collect())
    }
}

pub(super) fn outbox_path(dir: &Path) -> PathBuf {
    dir.join("outbox.json")
}

impl Outbox {
    pub(super) fn spent_since(&self, key: &str, from: u64) -> Spend {
        let unsent = self
            .unsent
            .iter()
            .flat_map(|(_, rows)| rows.iter().map(|(k, t)| (k, t)));
        let mut sum = Spend::default();
        for (_, t) in unsent
            .chain(self.fresh.iter())
            .filter(|(k, _)| k.0 >= from && k.1 == key)
        {
            sum.add(t.spend());
        }
        sum
    }
}

impl super::Ledger {
    /// Adds the rows gathered since the last flush to Redis; what fails waits for the next.
    pub(super) fn send_shared(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        loop {
            let batch = {
                let mut pending = self.lock();
                let outbox = &mut pending.outbox;
                if outbox.unsent.is_none() && !outbox.fresh.is_empty() {
                    let rows = std::mem::take(&mut outbox.fresh).into_iter().collect();
                    outbox.unsent = Some((format!("{}:{}", self.instance, outbox.next), rows));
                    outbox.next += 1;
                }
                outbox.unsent.clone()
            };
            let Some((name, rows)) = batch else {
                break;
            };
            if shared.add_usage(&name, &rows).is_err() {
                // Said where it failed; kept, and sent under the same name later.
                break;
            }
            self.lock().outbox.unsent = None;
        }
        self.keep_outbox();
    }

    /// Writes what Redis has not got yet to `outbox.json`, or removes the file once it all
    /// arrived.
    fn keep_outbox(&self) {
        let path = self.outbox_file.clone();
        let saved = {
            let pending = self.lock();
            let outbox = &pending.outbox;
            if outbox.unsent.is_none() && outbox.fresh.is_empty() {
                None
            } else {
                Some(serde_json::to_vec(outbox).unwrap_or_default())
            }
        };
        let result = match saved {
            Some(bytes) => crate::store::write_atomically(&path, &bytes),
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            },
        };
        if let Err(e) = result {
            warn!("usage ledger: {}: {e}", path.display());
        }
    }
}
