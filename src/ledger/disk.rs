//! The ledger's directory: the summary and the one before it, the numbered journals, the side
//! journals of followers, and the fold that turns them into a new summary. Nothing here keeps
//! state between calls: the running `Ledger` holds the files open.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::usage::{Book, Record, Totals};

/// Past this size the journal is folded into the summary.
pub(super) const COMPACT_AT: u64 = 8 * 1024 * 1024;

#[derive(Serialize, Deserialize)]
pub(super) struct Summary {
    /// The last journal generation folded in.
    folded: u64,
    /// Side journals folded in (their files may remain until the next fold).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    sides: Vec<String>,
    rows: Vec<SummaryRow>,
    /// The hourly rows of the last 48 hours; `day` holds the hour (since 1970).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    hours: Vec<SummaryRow>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct SummaryRow {
    day: u64,
    key: String,
    account: String,
    model: String,
    #[serde(flatten)]
    totals: Totals,
}

pub(super) fn journal_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("journal-{generation:08}.jsonl"))
}

/// The side journal of a server that serves beside the ledger's writer (`Ledger::follow`).
pub(super) fn side_path(dir: &Path, instance: &str) -> PathBuf {
    dir.join(format!("side-{instance}.jsonl"))
}

/// Side journals present in `dir`, by file name.
pub(super) fn sides(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = (std::fs::read_dir(dir).into_iter().flatten().flatten())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_side_name(n))
        .collect();
    out.sort_unstable();
    out
}

/// `side-<hex>.jsonl` and nothing else: a name read from a summary is removed only if it is
/// one (never a path elsewhere).
pub(super) fn is_side_name(name: &str) -> bool {
    name.strip_prefix("side-")
        .and_then(|n| n.strip_suffix(".jsonl"))
        .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Journal generations present in `dir`, ascending.
pub(super) fn generations(dir: &Path) -> Vec<u64> {
    let mut out: Vec<u64> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_prefix("journal-")?
                .strip_suffix(".jsonl")?
                .parse()
                .ok()
        })
        .collect();
    out.sort_unstable();
    out
}

pub(super) const SUMMARY: &str = "summary.json";
/// The summary before the last fold: with the journals kept since, it stands in for a
/// summary that cannot be read.
pub(super) const PREVIOUS: &str = "summary.prev.json";
/// Where a summary that could not be read is moved, for a person to look at.
pub(super) const UNREADABLE: &str = "summary.unreadable.json";
/// A journal line is one record (~200 bytes); a longer one is skipped unread.
pub(super) const MAX_LINE: usize = 64 * 1024;
/// A record dated further ahead than this is not believed (clocks differ a little).
pub(super) const MAX_CLOCK_SKEW: u64 = 300;

/// A summary file: `Ok(None)` when it does not exist, `Err` saying why when it cannot be read.
pub(super) fn read_summary(path: &Path) -> Result<Option<Summary>, String> {
    match std::fs::read(path) {
        Ok(bytes) => crate::json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{} cannot be read: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The summary to start from: `summary.json`, else (cut or unreadable) the previous one, whose
/// journals are still there. A ledger that cannot be recovered is an error, never "no usage":
/// budgets are counted from it.
pub(super) fn starting_summary(dir: &Path) -> std::io::Result<Option<Summary>> {
    let previous = || read_summary(&dir.join(PREVIOUS));
    match read_summary(&dir.join(SUMMARY)) {
        Ok(Some(summary)) => Ok(Some(summary)),
        // A fold cut between moving the summary aside and writing the new one.
        Ok(None) => previous().map_err(|why| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("there is no {SUMMARY}, and {why}: the usage history cannot be recovered; restore it from a backup, or move it aside to start an empty ledger"),
            )
        }),
        Err(why) => match previous() {
            Ok(Some(summary)) => {
                warn!(
                    "usage ledger: {why}; recovered from {PREVIOUS} and the journals kept since it"
                );
                Ok(Some(summary))
            }
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{why}, and no {PREVIOUS} can stand in for it: the usage history (and the budgets counted from it) cannot be recovered. Restore it from a backup, or move it aside to start an empty ledger (its history is then lost)"
                ),
            )),
        },
    }
}

/// Refuses a ledger directory that is a symlink (it could lead anywhere) or not a directory.
pub(super) fn check_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "the usage directory {} is a symlink; give its real path as usage.dir",
                dir.display()
            ),
        )),
        Ok(m) if !m.is_dir() => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("the usage directory {} is not a directory", dir.display()),
        )),
        _ => Ok(()),
    }
}

/// What a ledger directory holds.
pub(super) struct Loaded {
    /// The summary, the journals since, and the side journals nobody writes any more: what a
    /// fold may write into the next summary.
    pub(super) book: Book,
    /// The last generation seen.
    pub(super) last: u64,
    /// The side journals in `book`, each locked (its server is gone, or it is `own`).
    pub(super) absorbed: Vec<(String, Option<File>)>,
    /// Side journals servers still write: counted for budgets, never folded.
    pub(super) live: Book,
}

/// Reads the summary and every journal not folded into it. A line a crash cut short (the
/// last) is skipped; any other line that is not a record, is over `MAX_LINE`, or is dated in
/// the future is skipped and reported. `own` is this server's own side journal, absorbed
/// whatever its lock says.
pub(super) fn load(dir: &Path, own: Option<&str>) -> std::io::Result<Loaded> {
    check_dir(dir)?;
    let mut book = Book::default();
    let mut folded = 0;
    let mut listed: Vec<String> = Vec::new();
    if let Some(summary) = starting_summary(dir)? {
        folded = summary.folded;
        listed = summary.sides;
        for r in summary.rows {
            book.insert((r.day, r.key, r.account, r.model), r.totals);
        }
        for r in summary.hours {
            book.insert_hour((r.day, r.key, r.account, r.model), r.totals);
        }
    }
    let mut last = folded;
    let now = crate::time::now_unix();
    for generation in generations(dir) {
        last = last.max(generation);
        if generation > folded {
            read_journal(&journal_path(dir, generation), &mut book, now)?;
        }
    }
    let mut absorbed = Vec::new();
    let mut live = Book::default();
    for name in sides(dir).into_iter().filter(|n| !listed.contains(n)) {
        let path = dir.join(&name);
        if own == Some(name.as_str()) {
            read_journal(&path, &mut book, now)?;
            absorbed.push((name, None));
            continue;
        }
        let Ok(file) = File::open(&path) else {
            continue;
        };
        match file.try_lock() {
            Ok(()) => {
                read_journal(&path, &mut book, now)?;
                absorbed.push((name, Some(file)));
            }
            Err(_) => read_journal(&path, &mut live, now)?,
        }
    }
    Ok(Loaded {
        book,
        last,
        absorbed,
        live,
    })
}

/// Everything the ledger in `dir` counts, side journals being written included (for `usage`),
/// and the last generation seen.
pub fn read(dir: &Path) -> std::io::Result<(Book, u64)> {
    let mut loaded = load(dir, None)?;
    loaded.book.absorb(&loaded.live);
    Ok((loaded.book, loaded.last))
}

/// What reading a journal skipped, for one warning per file.
#[derive(Default)]
pub(super) struct Skipped {
    long: Vec<usize>,
    invalid: Vec<(usize, String)>,
    future: Vec<usize>,
}

/// Adds a journal's records to `book`, reading lines of at most `MAX_LINE` bytes.
pub(super) fn read_journal(path: &Path, book: &mut Book, now: u64) -> std::io::Result<()> {
    let mut reader = BufReader::new(File::open(path)?);
    let mut skipped = Skipped::default();
    let mut line: Vec<u8> = Vec::new();
    let mut too_long = false;
    let mut number = 0;
    let mut take = |line: &[u8], too_long: bool, number: usize, last: bool, s: &mut Skipped| {
        if too_long {
            s.long.push(number);
            return;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        match crate::json::from_slice::<Record>(line) {
            Ok(r) if r.t > now.saturating_add(MAX_CLOCK_SKEW) => s.future.push(number),
            Ok(r) => book.add(&r),
            // The last line, without its newline: a write a crash cut short.
            Err(_) if last => {}
            Err(e) => s.invalid.push((number, e.to_string())),
        }
    };
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            if !line.is_empty() || too_long {
                take(&line, too_long, number + 1, true, &mut skipped);
            }
            break;
        }
        let (piece, ends) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if !too_long && line.len() + piece.len() <= MAX_LINE {
            line.extend_from_slice(piece);
        } else {
            too_long = true;
            line = Vec::new();
        }
        let used = ends.unwrap_or(piece.len());
        reader.consume(used);
        if ends.is_some() {
            number += 1;
            take(&line, too_long, number, false, &mut skipped);
            line.clear();
            too_long = false;
        }
    }
    report(path, &skipped);
    Ok(())
}

pub(super) fn report(path: &Path, s: &Skipped) {
    let lines = |ns: &[usize]| {
        let shown: Vec<String> = ns.iter().take(5).map(usize::to_string).collect();
        format!(
            "line{} {}",
            if ns.len() == 1 { "" } else { "s" },
            shown.join(", ")
        )
    };
    let mut parts = Vec::new();
    if !s.long.is_empty() {
        parts.push(format!(
            "{} longer than {} KiB ({})",
            s.long.len(),
            MAX_LINE / 1024,
            lines(&s.long)
        ));
    }
    if let Some((n, why)) = s.invalid.first() {
        parts.push(format!(
            "{} not a valid record (line {n}: {why})",
            s.invalid.len()
        ));
    }
    if !s.future.is_empty() {
        parts.push(format!(
            "{} dated in the future ({})",
            s.future.len(),
            lines(&s.future)
        ));
    }
    if !parts.is_empty() {
        warn!(
            "usage ledger: {}: skipped {}",
            path.display(),
            parts.join("; ")
        );
    }
}

/// Folds `book` into a new summary of everything up to `generation` and the side journals
/// `absorbed`: the summary it replaces becomes the previous one (an unreadable one is moved
/// aside instead, and the previous one stays), and only the journals and side journals the
/// previous summary holds are removed, so the previous summary and the files kept since it
/// always add up to the same book.
pub(super) fn fold(
    dir: &Path,
    book: &Book,
    generation: u64,
    absorbed: &[String],
) -> std::io::Result<()> {
    let summary = dir.join(SUMMARY);
    let mut sides: Vec<String> = absorbed.to_vec();
    match read_summary(&summary) {
        Ok(Some(current)) => {
            sides.extend(current.sides);
            std::fs::rename(&summary, dir.join(PREVIOUS))?;
        }
        Ok(None) => {}
        Err(_) => std::fs::rename(&summary, dir.join(UNREADABLE))?,
    }
    let present = self::sides(dir);
    sides.retain(|name| present.contains(name));
    sides.sort_unstable();
    sides.dedup();
    write_summary(dir, book, generation, sides)?;
    let (kept_from, counted) = match read_summary(&dir.join(PREVIOUS)) {
        Ok(Some(previous)) => (previous.folded, previous.sides),
        _ => (0, Vec::new()),
    };
    for old in generations(dir) {
        if old <= kept_from {
            let _ = std::fs::remove_file(journal_path(dir, old));
        }
    }
    for name in counted.iter().filter(|n| is_side_name(n)) {
        let _ = std::fs::remove_file(dir.join(name));
    }
    crate::secret::sync_parent(&summary)
}

/// Writes `book` as the summary of everything up to `generation`, atomically.
pub(super) fn write_summary(
    dir: &Path,
    book: &Book,
    generation: u64,
    sides: Vec<String>,
) -> std::io::Result<()> {
    let rows = |rows: &std::collections::BTreeMap<crate::usage::RowKey, Totals>| {
        rows.iter()
            .map(|((day, key, account, model), totals)| SummaryRow {
                day: *day,
                key: key.clone(),
                account: account.clone(),
                model: model.clone(),
                totals: *totals,
            })
            .collect()
    };
    let summary = Summary {
        folded: generation,
        sides,
        rows: rows(&book.rows),
        hours: rows(&book.hours),
    };
    let bytes = serde_json::to_vec(&summary).map_err(std::io::Error::other)?;
    crate::store::write_atomically(&dir.join(SUMMARY), &bytes)
}

/// The generation after `generation`: the numbering never wraps (a wrapped one would name a
/// journal that exists and have it removed unread).
pub(super) fn next_generation(dir: &Path, generation: u64) -> std::io::Result<u64> {
    generation.checked_add(1).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{}: journal generation {generation} is the last there is (a hand-edited summary.json or journal name?); fix the number, or move the usage directory aside",
                dir.display()
            ),
        )
    })
}

/// Journals are created owner-only, as every file the gateway creates.
pub(super) fn journal_options() -> std::fs::OpenOptions {
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

/// Creates `dir` with mode 0700 (who used what is the team's business only). An existing one
/// keeps its mode, since a volume may be shared with a group on purpose; one open to others
/// is reported.
pub(super) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Ok(meta) = std::fs::metadata(dir) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            warn!(
                "usage directory {} is open to others (mode {mode:03o}); fix it with: chmod o-rwx {}",
                dir.display(),
                dir.display()
            );
        }
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Takes the ledger in `dir` (its `lock` held): reads it, `own` side journal included, folds
/// it into a new summary, and opens the next journal generation.
pub(super) fn take_over(
    dir: &Path,
    lock: crate::store::FileLock,
    own: Option<&str>,
) -> std::io::Result<(Book, Journal)> {
    let loaded = load(dir, own)?;
    let generation = next_generation(dir, loaded.last)?;
    let absorbed: Vec<String> = loaded.absorbed.iter().map(|(n, _)| n.clone()).collect();
    // The new journal first: once the fold lists `own`, nothing may be written there again.
    let journal = Journal::create(dir, generation, lock)?;
    fold(dir, &loaded.book, loaded.last, &absorbed)?;
    Ok((loaded.book, journal))
}

/// The journal file the flusher appends to, and the ledger directory's lock; or, for a server
/// that follows another, its side journal (locked while it lives) and no lock.
pub struct Journal {
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) generation: u64,
    /// Held for the life of the ledger: one writer per directory. `None` while following.
    pub(super) lock: Option<crate::store::FileLock>,
}

impl Journal {
    pub(super) fn create(
        dir: &Path,
        generation: u64,
        lock: crate::store::FileLock,
    ) -> std::io::Result<Journal> {
        Journal::open(journal_path(dir, generation), generation, Some(lock))
    }

    /// A follower's side journal, locked so the writer knows it is alive.
    pub(super) fn side(dir: &Path, instance: &str, generation: u64) -> std::io::Result<Journal> {
        // Locked under a name no reader takes, then renamed into place (the lock goes with
        // it): a side journal is never seen unlocked while its server lives.
        let path = side_path(dir, instance);
        let making = path.with_extension("jsonl.new");
        let mut journal = Journal::open(making.clone(), generation, None)?;
        journal.file.try_lock().map_err(|e| {
            std::io::Error::other(format!("{}: cannot lock it: {e}", making.display()))
        })?;
        std::fs::rename(&making, &path)?;
        crate::secret::sync_parent(&path)?;
        journal.path = path;
        Ok(journal)
    }

    pub(super) fn open(
        path: PathBuf,
        generation: u64,
        lock: Option<crate::store::FileLock>,
    ) -> std::io::Result<Journal> {
        let file = journal_options().open(&path)?;
        crate::secret::sync_parent(&path)?;
        Ok(Journal {
            file,
            path,
            generation,
            lock,
        })
    }

    /// Starts the next generation; returns the one just ended, to be folded (its file stays
    /// until the fold after next: see `fold`).
    pub(super) fn rotate(&mut self, dir: &Path) -> std::io::Result<u64> {
        let ended = self.generation;
        let next = next_generation(dir, ended)?;
        let path = journal_path(dir, next);
        self.file = journal_options().open(&path)?;
        self.path = path;
        self.generation = next;
        crate::secret::sync_parent(&self.path)?;
        Ok(ended)
    }
}
