//! The usage ledger: every request's client key, account, model, status and tokens, kept so a
//! `kill -9` loses no record and nothing ever corrupts what was written.
//!
//! Design: an append-only journal of JSON lines plus a compacted summary of daily totals.
//! Requests update the in-memory totals at once (budgets read them) and write their line to
//! the journal (the page cache, which a killed process cannot lose); a flusher thread fsyncs
//! it every `usage.flush_interval` (1 s). A crash can only cut the journal's last line short,
//! and a reader skips it. When the journal passes 8 MiB (and at every start) it is folded into
//! `summary.json`, written to a temp file, fsynced and renamed; the summary names the last
//! journal generation it contains, so nothing is counted twice. The summary it replaces stays
//! as `summary.prev.json`, with the journals since, to recover from. Why not a database: one
//! writer, append-only data and daily totals need none, and the files stay readable with
//! `cat` and `jq`.
//!
//! One server writes a directory (it holds `.lock`); another on the same config follows:
//! counts it for budgets, writes its records to a side journal of its own, and takes the
//! ledger over once the lock is free, folding the side journal in.
//!
//! With shared state each flush also adds the rows gathered since the last one to Redis, as
//! one numbered batch applied at most once, so the totals there are every instance's, exact;
//! budgets read them (plus this instance's rows not yet sent).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::shared::Shared;
use crate::usage::{Book, Record, RowKey, Spend, Totals};

mod disk;
mod outbox;

use disk::*;
pub use disk::{Journal, read};
use outbox::{Outbox, outbox_path};

struct Pending {
    book: Book,
    /// The journal (or side journal) each record is written to as it is made: in the page
    /// cache at once, which a killed process cannot lose; the flush fsyncs it.
    file: Option<File>,
    /// Bytes in the current journal, for the fold.
    written: u64,
    /// Lines a write failed for (a full disk), appended at the next flush.
    queue: Vec<u8>,
    outbox: Outbox,
}

impl Pending {
    /// Writes a record's line to the journal, or queues it when that fails (or lines queued
    /// before it are still waiting).
    fn write(&mut self, line: &[u8]) {
        let written = match (&mut self.file, self.queue.is_empty()) {
            (Some(file), true) => {
                let ok = file.write_all(line).is_ok();
                if !ok {
                    // A write cut short (a full disk) leaves no torn line to glue the next to.
                    let _ = file.set_len(self.written);
                }
                ok
            }
            _ => false,
        };
        if written {
            self.written += line.len() as u64;
        } else {
            self.queue.extend_from_slice(line);
        }
    }

    /// Writes from now on to `journal` (a new generation, or the ledger taken over).
    fn write_to(&mut self, journal: &Journal) {
        self.file = journal.file.try_clone().ok();
        self.written = 0;
    }

    /// Adds the records of the lines still queued to `book` (they are in no file yet).
    fn queued_into(&self, book: &mut Book) {
        for line in self.queue.split(|&b| b == b'\n') {
            if let Ok(record) = crate::json::from_slice::<Record>(line) {
                book.add(&record);
            }
        }
    }
}

/// The running ledger, shared by all workers.
pub struct Ledger {
    dir: PathBuf,
    pending: Mutex<Pending>,
    shared: Option<Arc<Shared>>,
    /// Names this process's batches (with a counter), so a batch resent after a restart is
    /// still recognised; and its side journal, while it follows.
    instance: String,
    /// Where rows not yet in Redis are kept: `outbox.json` for the writer, one of its own for
    /// a server that started as a follower.
    outbox_file: PathBuf,
}

impl Ledger {
    /// Opens the ledger in `dir`. Holding its lock, the server writes it: reads what is there
    /// (side journals of servers gone included), folds it into the summary, and starts a
    /// fresh journal generation (so a line a crash cut short is never continued). When another
    /// server holds the lock, this one follows: it counts what the directory holds (re-read
    /// at every flush, so budgets see the writer's records), records its own requests in a
    /// side journal, and takes the lock over at the first flush after it is free. The caller
    /// calls `flush` every flush interval on a thread of its own, and once more before a
    /// graceful exit.
    pub fn open(
        dir: &Path,
        shared: Option<Arc<Shared>>,
    ) -> std::io::Result<(Arc<Ledger>, Journal)> {
        check_dir(dir)?;
        create_private_dir(dir)?;
        let instance = crate::encoding::hex(&crate::secret::random_bytes::<6>());
        let (book, journal, outbox_file) = match crate::store::lock_dir(dir) {
            Ok(lock) => {
                let (book, journal) = take_over(dir, lock, None)?;
                (book, journal, outbox_path(dir))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut loaded = load(dir, None)?;
                loaded.book.absorb(&loaded.live);
                let journal = Journal::side(dir, &instance, loaded.last)?;
                warn!(
                    "usage ledger: {} is written by another llm-gateway process; this one counts it for budgets, records its own requests in {}, and takes the ledger over once the other stops",
                    dir.display(),
                    journal.path.display()
                );
                let outbox = dir.join(format!("outbox-{instance}.json"));
                (loaded.book, journal, outbox)
            }
            Err(e) => return Err(e),
        };
        let mut outbox = Outbox::default();
        if shared.is_some()
            && let Ok(text) = std::fs::read(&outbox_file)
        {
            match crate::json::from_slice::<Outbox>(&text) {
                Ok(saved) => outbox = saved,
                Err(e) => warn!(
                    "usage ledger: {} is unreadable ({e}); not sent",
                    outbox_file.display()
                ),
            }
        }
        let ledger = Arc::new(Ledger {
            dir: dir.to_path_buf(),
            pending: Mutex::new(Pending {
                book,
                file: journal.file.try_clone().ok(),
                written: 0,
                queue: Vec::new(),
                outbox,
            }),
            shared,
            instance,
            outbox_file,
        });
        Ok((ledger, journal))
    }

    /// A follower's flush: its records are in its side journal; now it takes the ledger over
    /// if the lock is free, or else re-reads what the writer recorded meanwhile.
    fn follow(&self, journal: &mut Journal) {
        let own = journal
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .map(String::from);
        if let Ok(lock) = crate::store::lock_dir(&self.dir) {
            // No record may land in the side journal while it is folded in.
            let mut pending = self.lock();
            match take_over(&self.dir, lock, own.as_deref()) {
                Ok((mut book, writer)) => {
                    pending.queued_into(&mut book);
                    pending.book = book;
                    pending.write_to(&writer);
                    // The side journal is in the new summary now (its file goes at the
                    // next fold).
                    *journal = writer;
                    info!(
                        "usage ledger: took {} over; this server records the usage now",
                        self.dir.display()
                    );
                }
                Err(e) => {
                    warn!(
                        "usage ledger: could not take {} over: {e}",
                        self.dir.display()
                    );
                    // The fold may have listed the side journal already: write a new one.
                    let fresh = crate::encoding::hex(&crate::secret::random_bytes::<6>());
                    if let Ok(side) = Journal::side(&self.dir, &fresh, journal.generation) {
                        pending.write_to(&side);
                        *journal = side;
                    }
                }
            }
            return;
        }
        match load(&self.dir, None) {
            Ok(mut loaded) => {
                loaded.book.absorb(&loaded.live);
                let mut pending = self.lock();
                pending.queued_into(&mut loaded.book);
                pending.book = loaded.book;
            }
            Err(e) => warn!("usage ledger: cannot re-read {}: {e}", self.dir.display()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records one request: counted at once, and written to the journal (fsynced at the next
    /// flush).
    pub fn record(&self, record: &Record) {
        let mut line = serde_json::to_vec(record).unwrap_or_default();
        line.push(b'\n');
        let mut pending = self.lock();
        pending.book.add(record);
        pending.write(&line);
        if self.shared.is_some() {
            let row = (
                record.t / 86_400,
                record.key.clone(),
                record.account.clone(),
                record.model.clone(),
            );
            pending.outbox.fresh.entry(row).or_default().add(record);
        }
    }

    /// What client key `key` spent since the start of day `from` (days since 1970; 0 for
    /// all time): by every instance when state is shared and Redis answers, else by this one.
    pub fn spent_since(&self, key: &str, from: u64) -> Spend {
        if let Some(shared) = &self.shared {
            let today = crate::time::now_unix() / 86_400;
            if let Ok(mut sent) = shared.key_spend(key, from, today) {
                sent.add(self.lock().outbox.spent_since(key, from));
                return sent;
            }
        }
        self.lock().book.spent_since(key, from)
    }

    /// Every daily row of days `from..=to`, from where `llm-gateway usage` reads them: Redis
    /// with shared state (`true`), else this ledger (also while Redis does not answer).
    pub fn day_rows(&self, from: u64, to: u64) -> (Vec<(RowKey, Totals)>, bool) {
        if let Some(Ok(rows)) = self.shared.as_ref().map(|s| s.usage_rows(from, to)) {
            return (rows, true);
        }
        let pending = self.lock();
        let rows = (pending
            .book
            .rows
            .range((from, String::new(), String::new(), String::new())..))
        .take_while(|(k, _)| k.0 <= to)
        .map(|(k, t)| (k.clone(), *t))
        .collect();
        (rows, false)
    }

    /// The hourly rows this ledger keeps (the last 48 hours; Redis holds none).
    pub fn hour_rows(&self) -> Vec<(RowKey, Totals)> {
        let pending = self.lock();
        (pending.book.hours.iter())
            .map(|(k, t)| (k.clone(), *t))
            .collect()
    }

    /// Appends what is queued; folds the journal into the summary when it grew large; sends
    /// the rows to Redis with shared state. The server calls it every
    /// `usage.flush_interval`, and once more before a graceful exit.
    pub fn flush(&self, journal: &mut Journal) {
        self.send_shared();
        // Lines a write failed for go first, through the same file and under the same lock as
        // new records, so a failure cuts nothing half-written and counts nothing twice.
        {
            let mut pending = self.lock();
            if !pending.queue.is_empty() {
                let queue = std::mem::take(&mut pending.queue);
                let written = pending.written;
                let appended = match &mut pending.file {
                    Some(file) => file.write_all(&queue).inspect_err(|_| {
                        let _ = file.set_len(written);
                    }),
                    None => Err(std::io::Error::other("the journal is not open")),
                };
                match appended {
                    Ok(()) => pending.written += queue.len() as u64,
                    Err(e) => {
                        error!(
                            "usage ledger: cannot write {}: {e}; records kept in memory",
                            journal.path.display()
                        );
                        pending.queue = queue;
                        return;
                    }
                }
            }
        }
        if let Err(e) = journal.file.sync_data() {
            error!("usage ledger: cannot sync {}: {e}", journal.path.display());
        }
        if journal.lock.is_none() {
            self.follow(journal);
            return;
        }
        // Fold: the book of everything so far and the generation it ends are taken together,
        // with every line of the book in that generation's journal, so the summary holds
        // exactly what the journals it folds do.
        let folding = {
            let mut pending = self.lock();
            if pending.written < COMPACT_AT || !pending.queue.is_empty() || pending.file.is_none() {
                return;
            }
            let rotated = journal.rotate(&self.dir);
            if rotated.is_ok() {
                pending.write_to(journal);
            }
            rotated.map(|ended| (pending.book.clone(), ended))
        };
        if let Err(e) = folding.and_then(|(book, ended)| fold(&self.dir, &book, ended, &[])) {
            warn!(
                "usage ledger: compaction failed (the journals are kept; the next start folds them): {e}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::{Totals, Usage, group};

    #[test]
    fn tokens_not_yet_sent_count_for_their_key_from_their_day() {
        let row = |day: u64, key: &str, tokens: u64| {
            let totals = Totals {
                requests: 1,
                errors: 0,
                usage: Usage {
                    input: tokens,
                    ..Usage::default()
                },
                cost: tokens * 10,
                ..Totals::default()
            };
            (
                (day, key.to_string(), "acc".to_string(), "m".to_string()),
                totals,
            )
        };
        let mut outbox = Outbox {
            unsent: Some(("i:0".into(), vec![row(10, "a", 5), row(9, "a", 100)])),
            ..Outbox::default()
        };
        let (k, t) = row(10, "a", 7);
        outbox.fresh.insert(k, t);
        let (k, t) = row(10, "b", 1000);
        outbox.fresh.insert(k, t);
        let spend = |tokens| Spend {
            tokens,
            nano: tokens * 10,
        };
        assert_eq!(outbox.spent_since("a", 10), spend(12));
        assert_eq!(outbox.spent_since("a", 9), spend(112));
        assert_eq!(outbox.spent_since("b", 11), spend(0));
    }

    fn record(t: u64, key: &str, input: u64, status: u16) -> Record {
        Record {
            t,
            key: key.into(),
            account: "acc_1".into(),
            model: "claude-x".into(),
            status,
            usage: Usage {
                input,
                output: 10,
                cache_creation: 1,
                cache_read: 2,
                ..Usage::default()
            },
            cost: Some(input.saturating_mul(3)),
            estimated: false,
            error: None,
        }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "llm-gateway-ledger-{tag}-{}-{}",
            std::process::id(),
            crate::encoding::hex(&crate::secret::random_bytes::<4>())
        ));
        create_private_dir(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn upstream_token_counts_near_u64_max_saturate_instead_of_overflowing() {
        // Regression (fuzz): usage counts are the upstream's; summing them overflowed.
        let mut book = Book::default();
        let mut huge = record(86_400, "ck_a", u64::MAX, 200);
        huge.usage.output = u64::MAX;
        assert_eq!(huge.usage.total(), u64::MAX);
        book.add(&huge);
        book.add(&huge);
        let mut later = huge.clone();
        later.t += 86_400;
        book.add(&later);
        assert_eq!(book.spent_since("ck_a", 0).tokens, u64::MAX);
        assert_eq!(book.spent_since("ck_a", 0).nano, u64::MAX);
        let mut totals = Totals::default();
        totals.add(&huge);
        totals.absorb(&totals.clone());
        assert_eq!(totals.usage.input, u64::MAX);
        assert_eq!(totals.requests, 2);
    }

    #[test]
    fn usage_merges_stream_events() {
        let mut u = Usage::default();
        u.merge(&serde_json::json!({"input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": 5}));
        u.merge(&serde_json::json!({"output_tokens": 42}));
        assert_eq!(
            u,
            Usage {
                input: 10,
                output: 42,
                cache_creation: 0,
                cache_read: 5,
                ..Usage::default()
            }
        );
        assert_eq!(u.total(), 57);
    }

    #[test]
    fn records_survive_restart_and_a_torn_last_line() {
        let dir = temp_dir("restart");
        {
            let (ledger, mut journal) = Ledger::open(&dir, None).expect("open");
            ledger.record(&record(86_400 * 3 + 5, "ck_a", 100, 200));
            ledger.record(&record(86_400 * 3 + 6, "ck_a", 50, 429));
            ledger.flush(&mut journal);
            // A crash in the middle of the next append.
            journal
                .file
                .write_all(b"{\"t\":1,\"key\":\"ck_a\",\"acc")
                .expect("write");
        }
        let (ledger, _journal) = Ledger::open(&dir, None).expect("reopen");
        assert_eq!(ledger.spent_since("ck_a", 3).tokens, 100 + 50 + 2 * 13);
        let (book, _) = read(&dir).expect("read");
        let rows = group(&book, "key", (0, u64::MAX), None);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].1.requests, 2);
        assert_eq!(rows[0].1.errors, 1);
        // The journal folded last is kept beside the previous summary (for recovery); the
        // one before it, held by that previous summary, is gone.
        assert_eq!(generations(&dir).len(), 2, "{:?}", generations(&dir));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unreadable_summary_is_recovered_from_the_previous_one_and_the_journals() {
        let dir = temp_dir("recover");
        for round in 0..3u64 {
            let (ledger, mut journal) = Ledger::open(&dir, None).expect("open");
            ledger.record(&record(86_400 * 3 + round, "ck_a", 100, 200));
            ledger.flush(&mut journal);
        }
        let expected = 3 * (100 + 13);
        // Truncated, as a full disk or a hand edit might leave it.
        let summary = dir.join(SUMMARY);
        let bytes = std::fs::read(&summary).expect("summary");
        std::fs::write(&summary, &bytes[..bytes.len() / 2]).expect("truncate");
        let (book, _) = read(&dir).expect("recovered");
        assert_eq!(book.spent_since("ck_a", 0).tokens, expected);
        let (ledger, _journal) = Ledger::open(&dir, None).expect("reopen");
        assert_eq!(
            ledger.spent_since("ck_a", 0).tokens,
            expected,
            "opened once recovered"
        );
        assert!(
            dir.join(UNREADABLE).exists(),
            "the bad summary is kept aside"
        );
        drop(ledger);
        drop(_journal);
        // Nothing to recover from: an error naming the file, never an empty ledger.
        std::fs::write(dir.join(SUMMARY), b"{").expect("corrupt");
        std::fs::write(dir.join(PREVIOUS), b"garbage").expect("corrupt");
        let err = Ledger::open(&dir, None).err().expect("refused");
        assert!(err.to_string().contains("summary.json"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn journal_lines_are_not_trusted() {
        let dir = temp_dir("untrusted");
        let now = crate::time::now_unix();
        let good = |t: u64| {
            let mut line = serde_json::to_vec(&record(t, "ck_a", 1, 200)).expect("json");
            line.push(b'\n');
            line
        };
        let mut text = good(now);
        text.extend(good(now + 365 * 86_400)); // a year ahead
        text.extend(br#"{"t":1,"key":"ck_a","account":"a","model":"m","status":200,"input":-5,"output":1,"cache_creation":0,"cache_read":0}"#);
        text.push(b'\n');
        text.extend(vec![b'x'; 3 * MAX_LINE]);
        text.push(b'\n');
        text.extend(good(now));
        std::fs::write(journal_path(&dir, 1), &text).expect("journal");
        let (book, last) = read(&dir).expect("read");
        assert_eq!(last, 1);
        assert_eq!(
            book.spent_since("ck_a", 0).tokens,
            2 * 14,
            "only the two good records"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn generations_never_wrap() {
        let dir = temp_dir("wrap");
        std::fs::write(journal_path(&dir, u64::MAX), b"").expect("journal");
        std::fs::write(journal_path(&dir, 0), b"").expect("journal");
        let err = Ledger::open(&dir, None).err().expect("refused");
        assert!(err.to_string().contains("last there is"), "{err}");
        assert!(journal_path(&dir, 0).exists(), "nothing removed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn counters_saturate() {
        let mut t = Totals {
            requests: u64::MAX,
            errors: u64::MAX,
            cost: u64::MAX - 1,
            ..Totals::default()
        };
        t.add(&record(1, "ck_a", u64::MAX, 500));
        assert_eq!(t.cost, u64::MAX);
        assert_eq!((t.requests, t.errors), (u64::MAX, u64::MAX));
        assert_eq!(t.usage.input, u64::MAX);
        t.absorb(&t.clone());
        assert_eq!(t.requests, u64::MAX);
    }

    #[test]
    fn a_symlinked_usage_directory_is_refused() {
        let real = temp_dir("real");
        let link = real.with_extension("link");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let err = Ledger::open(&link, None).err().expect("refused");
        assert!(err.to_string().contains("symlink"), "{err}");
        let _ = std::fs::remove_file(&link);
        let _ = std::fs::remove_dir_all(&real);
    }

    #[test]
    fn compaction_keeps_every_count_once() {
        let dir = temp_dir("compact");
        let (ledger, mut journal) = Ledger::open(&dir, None).expect("open");
        for i in 0..10 {
            ledger.record(&record(i, "ck_b", 1, 200));
        }
        ledger.flush(&mut journal);
        // A fold, as the flusher makes one past COMPACT_AT.
        let (book, ended) = {
            let mut pending = ledger.lock();
            let ended = journal.rotate(&dir).expect("rotate");
            pending.write_to(&journal);
            (pending.book.clone(), ended)
        };
        fold(&dir, &book, ended, &[]).expect("fold");
        ledger.record(&record(11, "ck_b", 1, 200));
        ledger.flush(&mut journal);
        drop((ledger, journal));
        let (book, _) = read(&dir).expect("read");
        assert_eq!(group(&book, "key", (0, u64::MAX), None)[0].1.requests, 11);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Not a check: prints what recording one request costs on the request path, and what a
    /// flush costs the flusher (`cargo test --release measure_ledger -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn measure_ledger_cost() {
        let dir = temp_dir("measure");
        let (ledger, mut journal) = Ledger::open(&dir, None).expect("open");
        let n = 200_000u64;
        let started = std::time::Instant::now();
        for i in 0..n {
            ledger.record(&record(
                1_795_676_640 + i / 1000,
                &format!("ck_{}", i % 8),
                100,
                200,
            ));
        }
        let per_record = started.elapsed().as_nanos() as f64 / n as f64;
        let started = std::time::Instant::now();
        ledger.flush(&mut journal);
        let per_flushed = started.elapsed().as_nanos() as f64 / n as f64;
        let started = std::time::Instant::now();
        let budget_reads = 10_000;
        for _ in 0..budget_reads {
            std::hint::black_box(ledger.spent_since("ck_1", 20_783));
        }
        let per_budget = started.elapsed().as_nanos() as f64 / budget_reads as f64;
        eprintln!(
            "ledger: record {per_record:.0} ns on the request path, flush {per_flushed:.0} ns per record on the flusher, budget check {per_budget:.0} ns ({} rows)",
            ledger.lock().book.rows.len()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn one_writer_per_directory_and_a_follower_takes_over() {
        let dir = temp_dir("lock");
        let (first, mut first_journal) = Ledger::open(&dir, None).expect("open");
        first.record(&record(86_400 * 3, "ck_a", 1, 200));
        let (second, mut journal) = Ledger::open(&dir, None).expect("follows");
        assert!(journal.lock.is_none(), "a second writer follows");
        assert_eq!(
            second.spent_since("ck_a", 0).tokens,
            14,
            "it counts the writer's records"
        );
        second.record(&record(86_400 * 3, "ck_a", 2, 200));
        first.record(&record(86_400 * 3, "ck_a", 3, 200));
        second.flush(&mut journal);
        assert!(journal.lock.is_none(), "the writer still holds the ledger");
        assert_eq!(
            second.spent_since("ck_a", 0).tokens,
            14 + 15 + 16,
            "re-read at the flush"
        );
        first.flush(&mut first_journal);
        drop((first, first_journal));
        second.record(&record(86_400 * 3, "ck_a", 4, 200));
        second.flush(&mut journal);
        assert!(journal.lock.is_some(), "taken over once free");
        second.record(&record(86_400 * 3, "ck_a", 5, 200));
        second.flush(&mut journal);
        let expected = 14 + 15 + 16 + 17 + 18;
        assert_eq!(second.spent_since("ck_a", 0).tokens, expected);
        drop((second, journal));
        let (book, _) = read(&dir).expect("read");
        assert_eq!(
            book.spent_since("ck_a", 0).tokens,
            expected,
            "every record once"
        );
        let (reopened, _journal) = Ledger::open(&dir, None).expect("reopen");
        assert_eq!(
            reopened.spent_since("ck_a", 0).tokens,
            expected,
            "and after a fold"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
