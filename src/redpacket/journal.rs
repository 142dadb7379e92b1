//! The embedded store's durability: an append-only journal of red-packet records,
//! fsynced before a grab is acknowledged, and a settlement log for billing.
//!
//! One writer thread owns both files. Appenders hand it a record and a [`Commit`]; it
//! takes everything queued, writes it, fsyncs once, and then commits all of it (group
//! commit): a storm of 10,000 grabs costs a handful of fsyncs, not 10,000.
//!
//! The journal fsync is the commit point, and the file holds exactly the committed
//! records. A batch whose write or fsync fails is refused and cut off again (the file
//! truncated back to its last good length and fsynced): otherwise its complete lines
//! would come back at replay although their grabs were refused and their shares handed
//! to others, and a partial line would swallow the next batch's first record. If even
//! the cut fails, the journal is poisoned and refuses every later append until a
//! restart: a refused grab can be tried again, a refused grab that replay revives could
//! be paid twice.
//!
//! The journal is JSON lines, replayed at start. Only the final line may be unreadable:
//! that is the torn tail of a crash mid-write (never acknowledged), and it is cut off.
//! An unreadable line with records after it is corruption, and the open fails naming it
//! rather than dropping acknowledged grabs without a word.
//!
//! Every committed grab also goes to `settlement.jsonl`, one JSON object per line, for a
//! downstream billing consumer (which reads it by offset and never truncates it). A
//! settlement write that fails after the journal committed does not undo the grab: it
//! is logged, counted, and retried with the next batch; and at every open the settlement
//! log's torn tail is cut off and each journaled grab missing from it (by packet and
//! user) is written again, so a crash between the two fsyncs loses no billing record.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::protocol::User;

pub const JOURNAL_FILE: &str = "redpackets.journal";
pub const SETTLEMENT_FILE: &str = "settlement.jsonl";
/// Where a compacted journal is written before it is renamed over [`JOURNAL_FILE`].
const COMPACT_FILE: &str = "redpackets.journal.compact";
/// Settlement writes that failed after their grabs were committed (the lines are retried
/// with the next batch, and re-created from the journal at the next open).
pub use crate::metrics::SETTLEMENT_FAILURES;

/// Records queued at most; appenders wait beyond it (backpressure, bounded memory).
const QUEUE: usize = 65_536;
/// Records written per fsync at most, so one batch's commits do not wait for ever more.
const MAX_BATCH: usize = 4096;
/// Settlement bytes held for a retry while the settlement log fails; beyond that they are
/// left to the next open's reconciliation, so a disk that stays broken costs no memory.
const MAX_UNSETTLED: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{path} line {line}: unreadable, and records follow it (corruption, not a torn write): {source}"
    )]
    Corrupt {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
    #[error(
        "journal {path} refuses appends until a restart: a failed batch could not be cut off ({reason})"
    )]
    Poisoned { path: PathBuf, reason: String },
    #[error("journal writer has stopped")]
    Stopped,
}

impl JournalError {
    /// The same error for another waiter of the batch (`io::Error` is not `Clone`).
    fn duplicate(&self) -> JournalError {
        match self {
            JournalError::Io { path, source } => JournalError::Io {
                path: path.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            JournalError::Corrupt { path, line, source } => JournalError::Io {
                path: path.clone(),
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("line {line}: {source}"),
                ),
            },
            JournalError::Poisoned { path, reason } => JournalError::Poisoned {
                path: path.clone(),
                reason: reason.clone(),
            },
            JournalError::Stopped => JournalError::Stopped,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> JournalError + use<> {
    let path = path.to_path_buf();
    move |source| JournalError::Io { path, source }
}

/// One journal line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
pub enum Record {
    Create {
        packet: String,
        room: String,
        sender: User,
        total: u64,
        shares: u32,
        /// The pre-split amounts, so a replay hands out exactly the same shares.
        amounts: Vec<u64>,
        created_at: u64,
        expires_at: u64,
    },
    Grab {
        packet: String,
        room: String,
        user: User,
        amount: u64,
        ts: u64,
    },
    /// The packet's expiry ran, so its `redpacket_done` was announced (by the expiry, or
    /// by the grab still in flight then): a replay must not take it for a packet that
    /// expired while the gateway was down, whose end nobody announced.
    Expired { packet: String, ts: u64 },
}

impl Record {
    /// The packet the record is about.
    pub fn packet(&self) -> &str {
        match self {
            Record::Create { packet, .. }
            | Record::Grab { packet, .. }
            | Record::Expired { packet, .. } => packet,
        }
    }
}

/// What the settlement log carries per grab.
#[derive(Serialize)]
struct Settlement<'a> {
    packet: &'a str,
    room: &'a str,
    user: &'a User,
    amount: u64,
    ts: u64,
}

impl<'a> Settlement<'a> {
    fn of(record: &'a Record) -> Option<Self> {
        match record {
            Record::Grab {
                packet,
                room,
                user,
                amount,
                ts,
            } => Some(Settlement {
                packet,
                room,
                user,
                amount: *amount,
                ts: *ts,
            }),
            Record::Create { .. } | Record::Expired { .. } => None,
        }
    }
}

/// A settlement line as far as reconciliation reads it: which grab it bills.
#[derive(Deserialize)]
struct Settled {
    packet: String,
    user: SettledUser,
}

#[derive(Deserialize)]
struct SettledUser {
    id: String,
}

/// What becomes of a record once the writer has dealt with it.
///
/// `commit` is called exactly once, on the writer thread, after the record's batch was
/// fsynced (`Ok`: the record is committed) or refused (`Err`: it is not in the journal).
/// A record the writer never took (its appender gave up before it was queued, or the
/// writer is gone) is dropped without a call and was never written: an implementation
/// that reserved something for it releases it in `Drop`. (Should the writer thread
/// panic, the batch's commits are dropped while unwinding, written or not: `Drop` must
/// then release nothing.) Commits run on the writer thread, so they must be quick and
/// must not wait for the journal.
pub trait Commit: Send + 'static {
    fn commit(self: Box<Self>, result: Result<(), JournalError>);
}

/// [`Journal::append`]'s commit: hands the result to the waiting appender.
struct Reply(oneshot::Sender<Result<(), JournalError>>);

impl Commit for Reply {
    fn commit(self: Box<Self>, result: Result<(), JournalError>) {
        let _ = self.0.send(result);
    }
}

type Queued = (Record, Box<dyn Commit>);

/// Handle to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct Journal {
    tx: flume::Sender<Queued>,
}

impl Journal {
    /// Opens (creating) the journal and settlement log under `dir`, repairs and
    /// reconciles them, returns the journal's records for replay, and starts the writer
    /// thread. The thread ends when the last handle is dropped.
    ///
    /// # Errors
    /// The directory or files cannot be created, read, repaired or opened for append; or
    /// a line before the last one is unreadable ([`JournalError::Corrupt`]).
    pub fn open(dir: &Path) -> Result<(Journal, Vec<Record>), JournalError> {
        let (files, records) = Files::open(dir)?;
        let journal = files.spawn(|f| Box::new(f), |f| Box::new(f))?;
        Ok((journal, records))
    }

    /// [`Journal::open`], having first rewritten the journal without the records of
    /// packets past retention (`expires_at + retain_ms <= now_ms`): they are long
    /// finished, their settlement lines were reconciled by the open, and replaying them
    /// at every start would make starts slower for the node's whole life. The rewrite
    /// goes to a new file, fsynced, then renamed over the journal (and the directory
    /// fsynced), so a crash at any point leaves the old journal or the new one whole.
    ///
    /// # Errors
    /// As [`Journal::open`], or the rewrite failed (the old journal is then untouched).
    pub fn open_compacted(
        dir: &Path,
        retain_ms: u64,
        now_ms: u64,
    ) -> Result<(Journal, Vec<Record>), JournalError> {
        let (mut files, records) = Files::open(dir)?;
        let records = files.compact(records, retain_ms, now_ms)?;
        let journal = files.spawn(|f| Box::new(f), |f| Box::new(f))?;
        Ok((journal, records))
    }

    /// Appends `record` and returns once it is on disk (fsynced).
    ///
    /// # Errors
    /// The write or fsync failed, the journal is poisoned, or the writer is gone; the
    /// record is then not in the journal.
    pub async fn append(&self, record: Record) -> Result<(), JournalError> {
        let (tx, rx) = oneshot::channel();
        self.submit(record, Box::new(Reply(tx))).await?;
        rx.await.unwrap_or(Err(JournalError::Stopped))
    }

    /// Queues `record`; the writer calls `commit` once the record is committed or
    /// refused. Returns once it is queued, and an appender that stops waiting does not
    /// stop the record: whatever was queued is committed (or refused) all the same.
    ///
    /// # Errors
    /// The writer is gone: `commit` was dropped without a call.
    pub async fn submit(
        &self,
        record: Record,
        commit: Box<dyn Commit>,
    ) -> Result<(), JournalError> {
        self.tx
            .send_async((record, commit))
            .await
            .map_err(|_| JournalError::Stopped)
    }
}

/// What the writer does to a file; a trait so tests can make writes and fsyncs fail.
pub(crate) trait LogFile: Send + 'static {
    fn write_bytes(&mut self, buf: &[u8]) -> io::Result<()>;
    fn sync(&mut self) -> io::Result<()>;
    fn truncate(&mut self, len: u64) -> io::Result<()>;
}

impl LogFile for File {
    fn write_bytes(&mut self, buf: &[u8]) -> io::Result<()> {
        Write::write_all(self, buf)
    }

    fn sync(&mut self) -> io::Result<()> {
        // Enough for appends and truncation: the length is data needed to read them back.
        self.sync_data()
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }
}

/// Both files, opened, repaired and reconciled, with their good lengths.
struct Files {
    dir: PathBuf,
    journal: File,
    journal_len: u64,
    settlement: File,
    settlement_len: u64,
}

impl Files {
    fn open(dir: &Path) -> Result<(Files, Vec<Record>), JournalError> {
        let dir_is_new = !dir.try_exists().map_err(io_err(dir))?;
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        if dir_is_new {
            let parent = dir
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            sync_dir(parent).map_err(io_err(parent))?;
        }
        let path = dir.join(JOURNAL_FILE);
        let (mut journal, journal_is_new) = open_append(&path).map_err(io_err(&path))?;
        let (records, journal_len) = load::<Record>(&path, &mut journal)?;
        let spath = dir.join(SETTLEMENT_FILE);
        let (mut settlement, settlement_is_new) = open_append(&spath).map_err(io_err(&spath))?;
        let (settled, settlement_len) = load::<Settled>(&spath, &mut settlement)?;
        let settlement_len =
            reconcile(&spath, &mut settlement, settlement_len, &settled, &records)?;
        if journal_is_new || settlement_is_new {
            // A new file's name is durable only once its directory is.
            sync_dir(dir).map_err(io_err(dir))?;
        }
        let files = Files {
            dir: dir.to_path_buf(),
            journal,
            journal_len,
            settlement,
            settlement_len,
        };
        Ok((files, records))
    }

    /// Rewrites the journal without the records of packets past retention; see
    /// [`Journal::open_compacted`]. Returns the records kept.
    fn compact(
        &mut self,
        records: Vec<Record>,
        retain_ms: u64,
        now_ms: u64,
    ) -> Result<Vec<Record>, JournalError> {
        let gone: std::collections::HashSet<String> = records
            .iter()
            .filter_map(|r| match r {
                Record::Create {
                    packet, expires_at, ..
                } if expires_at.saturating_add(retain_ms) <= now_ms => Some(packet.clone()),
                _ => None,
            })
            .collect();
        if gone.is_empty() {
            return Ok(records);
        }
        let before = records.len();
        let kept: Vec<Record> = records
            .into_iter()
            .filter(|r| !gone.contains(r.packet()))
            .collect();
        let path = self.dir.join(JOURNAL_FILE);
        let tmp = self.dir.join(COMPACT_FILE);
        let err = |p: &Path| io_err(p);
        let mut out = Vec::new();
        for r in &kept {
            serde_json::to_writer(&mut out, r).map_err(|e| JournalError::Io {
                path: tmp.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            })?;
            out.push(b'\n');
        }
        let mut file = File::create(&tmp).map_err(err(&tmp))?;
        file.write_all(&out).map_err(err(&tmp))?;
        file.sync_all().map_err(err(&tmp))?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(err(&path))?;
        sync_dir(&self.dir).map_err(err(&self.dir))?;
        let (journal, _) = open_append(&path).map_err(err(&path))?;
        self.journal = journal;
        self.journal_len = out.len() as u64;
        tracing::info!(
            packets = gone.len(),
            records = before - kept.len(),
            kept = kept.len(),
            "red-packet journal compacted: packets past retention dropped"
        );
        Ok(kept)
    }

    /// Starts the writer thread over the files (wrapped, so tests can inject failures).
    fn spawn(
        self,
        journal: impl FnOnce(File) -> Box<dyn LogFile>,
        settlement: impl FnOnce(File) -> Box<dyn LogFile>,
    ) -> Result<Journal, JournalError> {
        let writer = Writer {
            journal: Log {
                file: journal(self.journal),
                path: self.dir.join(JOURNAL_FILE),
                len: self.journal_len,
            },
            settlement: Log {
                file: settlement(self.settlement),
                path: self.dir.join(SETTLEMENT_FILE),
                len: self.settlement_len,
            },
            poisoned: None,
            unsettled: Vec::new(),
            settlement_stopped: false,
        };
        let (tx, rx) = flume::bounded(QUEUE);
        std::thread::Builder::new()
            .name("redpacket-journal".into())
            .spawn(move || {
                let _fail_stop = AbortOnUnwind;
                writer.run(rx)
            })
            .map_err(io_err(&self.dir))?;
        Ok(Journal { tx })
    }
}

/// Ends the process if the writer thread unwinds. Its callers would otherwise wait for
/// ever on answers that never come, their reservations never settle, and the store's
/// lock may be poisoned; a restart rebuilds a consistent state from the journal.
struct AbortOnUnwind;

impl Drop for AbortOnUnwind {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(
                "the red-packet journal writer panicked; aborting so a restart replays the journal"
            );
            std::process::abort();
        }
    }
}

/// Opens `path` for appending, creating it; says whether it was created.
fn open_append(path: &Path) -> io::Result<(File, bool)> {
    match OpenOptions::new().append(true).create_new(true).open(path) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            Ok((OpenOptions::new().append(true).open(path)?, false))
        }
        Err(e) => Err(e),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// An unreadable line, kept aside until it is known whether another line follows.
struct Torn {
    line: usize,
    start: u64,
    error: serde_json::Error,
}

/// A file's readable lines, its length, and its unreadable final line if any.
struct Scan<T> {
    items: Vec<T>,
    len: u64,
    torn: Option<Torn>,
    /// Whether the last line ends with a newline (or there is none).
    terminated: bool,
}

/// Reads JSON lines as bytes (a torn line may end inside a multi-byte character, which
/// is no reason to refuse the rest). Blank lines are skipped; an unreadable line is
/// tolerated only if no record follows it.
fn scan<T: DeserializeOwned>(
    path: &Path,
    mut reader: impl BufRead,
) -> Result<Scan<T>, JournalError> {
    let mut items = Vec::new();
    let mut buf = Vec::new();
    let mut len = 0u64;
    let mut line = 0usize;
    let mut torn: Option<Torn> = None;
    let mut terminated = true;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| io_err(path)(e))?;
        if n == 0 {
            break;
        }
        line += 1;
        let start = len;
        len += n as u64;
        terminated = buf.last() == Some(&b'\n');
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if let Some(t) = torn.take() {
            return Err(JournalError::Corrupt {
                path: path.to_path_buf(),
                line: t.line,
                source: t.error,
            });
        }
        match serde_json::from_slice(&buf) {
            Ok(item) => items.push(item),
            Err(error) => torn = Some(Torn { line, start, error }),
        }
    }
    Ok(Scan {
        items,
        len,
        torn,
        terminated,
    })
}

/// Reads `path` (open for append as `file`), cuts off an unreadable final line (the torn
/// tail of a crash mid-write, never acknowledged) and ends the file with a newline, so
/// the next append starts a line of its own; returns the records and the file's length.
fn load<T: DeserializeOwned>(path: &Path, file: &mut File) -> Result<(Vec<T>, u64), JournalError> {
    let reader = File::open(path).map_err(io_err(path))?;
    let scan = scan::<T>(path, BufReader::new(reader))?;
    let mut len = scan.len;
    let mut repaired = false;
    if let Some(torn) = &scan.torn {
        tracing::warn!(
            path = %path.display(),
            line = torn.line,
            bytes = scan.len - torn.start,
            error = %torn.error,
            "cutting off a torn last line (a crash mid-write; never acknowledged)"
        );
        file.set_len(torn.start).map_err(io_err(path))?;
        len = torn.start;
        repaired = true;
    } else if !scan.terminated {
        // A complete record whose newline did not make it: keep it, end its line.
        file.write_all(b"\n").map_err(io_err(path))?;
        len += 1;
        repaired = true;
    }
    if repaired {
        file.sync_data().map_err(io_err(path))?;
    }
    Ok((scan.items, len))
}

/// Writes the settlement line of every journaled grab the settlement log lacks (a crash
/// between the journal's fsync and the settlement log's, or a settlement write that
/// failed), keyed by packet and user; returns the log's new length.
fn reconcile(
    path: &Path,
    file: &mut File,
    len: u64,
    settled: &[Settled],
    records: &[Record],
) -> Result<u64, JournalError> {
    let mut seen: HashSet<(&str, &str)> = settled
        .iter()
        .map(|s| (s.packet.as_str(), s.user.id.as_str()))
        .collect();
    let mut missing = Vec::new();
    let mut count = 0usize;
    for s in records.iter().filter_map(Settlement::of) {
        if seen.insert((s.packet, s.user.id.as_str())) {
            serde_json::to_writer(&mut missing, &s)
                .map_err(|e| io_err(path)(io::Error::from(e)))?;
            missing.push(b'\n');
            count += 1;
        }
    }
    if count == 0 {
        return Ok(len);
    }
    file.write_all(&missing).map_err(io_err(path))?;
    file.sync_data().map_err(io_err(path))?;
    tracing::warn!(
        path = %path.display(),
        lines = count,
        "re-created settlement lines of journaled grabs that were missing"
    );
    Ok(len + missing.len() as u64)
}

/// One file the writer appends to, and its length up to the last committed batch.
struct Log {
    file: Box<dyn LogFile>,
    path: PathBuf,
    len: u64,
}

/// How an append failed, and whether cutting the batch off failed too.
struct Failure {
    error: io::Error,
    rollback: Option<io::Error>,
}

impl Log {
    /// Appends `buf` durably. On failure the file is cut back to its last good length
    /// (and fsynced), so nothing of `buf` remains; `rollback` says if that failed.
    fn append(&mut self, buf: &[u8]) -> Result<(), Failure> {
        match self.file.write_bytes(buf).and_then(|()| self.file.sync()) {
            Ok(()) => {
                self.len += buf.len() as u64;
                Ok(())
            }
            Err(error) => {
                let rollback = self
                    .file
                    .truncate(self.len)
                    .and_then(|()| self.file.sync())
                    .err();
                Err(Failure { error, rollback })
            }
        }
    }
}

struct Writer {
    journal: Log,
    settlement: Log,
    /// Why the journal refuses appends, once a failed batch could not be cut off.
    poisoned: Option<String>,
    /// Settlement lines of committed grabs whose write failed, retried with the next.
    unsettled: Vec<u8>,
    /// A failed settlement write could not be cut off: no more writes until a restart
    /// (whose reconciliation re-creates what is missing).
    settlement_stopped: bool,
}

impl Writer {
    fn run(mut self, rx: flume::Receiver<Queued>) {
        let syncs = ::metrics::counter!(crate::metrics::JOURNAL_SYNCS);
        let mut commits: Vec<Box<dyn Commit>> = Vec::new();
        let mut jbuf = Vec::new();
        let mut sbuf = Vec::new();
        while let Ok(first) = rx.recv() {
            let mut next = Some(first);
            while let Some((record, commit)) = next.take().or_else(|| rx.try_recv().ok()) {
                match encode(&record, &mut jbuf, &mut sbuf) {
                    Ok(()) => commits.push(commit),
                    Err(e) => commit.commit(Err(JournalError::Io {
                        path: self.journal.path.clone(),
                        source: io::Error::new(io::ErrorKind::InvalidData, e),
                    })),
                }
                if commits.len() >= MAX_BATCH {
                    break;
                }
            }
            if commits.is_empty() {
                continue;
            }
            if self.poisoned.is_none() {
                syncs.increment(1);
            }
            let result = self.write(&jbuf, &sbuf);
            jbuf.clear();
            sbuf.clear();
            for commit in commits.drain(..) {
                commit.commit(match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(e.duplicate()),
                });
            }
        }
    }

    /// Commits one batch: the journal (the commit point), then its settlement lines.
    fn write(&mut self, jbuf: &[u8], sbuf: &[u8]) -> Result<(), JournalError> {
        if let Some(reason) = &self.poisoned {
            return Err(JournalError::Poisoned {
                path: self.journal.path.clone(),
                reason: reason.clone(),
            });
        }
        if let Err(f) = self.journal.append(jbuf) {
            let path = self.journal.path.display();
            tracing::error!(path = %path, error = %f.error, "journal write failed; the batch is refused and cut off");
            if let Some(r) = f.rollback {
                tracing::error!(
                    path = %path,
                    error = %r,
                    "cutting the failed batch off failed too; the journal refuses every append until a restart"
                );
                self.poisoned = Some(format!("{}; cutting it off: {r}", f.error));
            }
            return Err(JournalError::Io {
                path: self.journal.path.clone(),
                source: f.error,
            });
        }
        self.settle(sbuf);
        Ok(())
    }

    /// Writes the settlement lines of a committed batch (and any left over from failed
    /// writes). A failure here does not make the batch fail: its grabs are committed.
    fn settle(&mut self, sbuf: &[u8]) {
        if self.settlement_stopped {
            return;
        }
        self.unsettled.extend_from_slice(sbuf);
        if self.unsettled.is_empty() {
            return;
        }
        let Err(f) = self.settlement.append(&self.unsettled) else {
            self.unsettled.clear();
            return;
        };
        ::metrics::counter!(SETTLEMENT_FAILURES).increment(1);
        let path = self.settlement.path.display();
        tracing::error!(
            path = %path,
            error = %f.error,
            "settlement write failed; the grabs stand, their lines are retried"
        );
        if let Some(r) = f.rollback {
            tracing::error!(
                path = %path,
                error = %r,
                "cutting the failed settlement write off failed too; settlement lines stop \
                 until a restart, which re-creates them from the journal"
            );
            self.settlement_stopped = true;
            self.unsettled = Vec::new();
        } else if self.unsettled.len() > MAX_UNSETTLED {
            tracing::error!(
                path = %path,
                "too many settlement lines waiting; the next restart re-creates them from the journal"
            );
            self.unsettled = Vec::new();
        }
    }
}

/// Appends `record`'s journal line (and settlement line, for a grab); on an error
/// neither buffer keeps a partial line.
fn encode(
    record: &Record,
    jbuf: &mut Vec<u8>,
    sbuf: &mut Vec<u8>,
) -> Result<(), serde_json::Error> {
    let (jmark, smark) = (jbuf.len(), sbuf.len());
    let mut lines = || {
        serde_json::to_writer(&mut *jbuf, record)?;
        jbuf.push(b'\n');
        if let Some(s) = Settlement::of(record) {
            serde_json::to_writer(&mut *sbuf, &s)?;
            sbuf.push(b'\n');
        }
        Ok(())
    };
    let result = lines();
    if result.is_err() {
        jbuf.truncate(jmark);
        sbuf.truncate(smark);
    }
    result
}

#[cfg(test)]
impl Journal {
    /// [`Journal::open`] over files that fail as `faults` says.
    pub(crate) fn open_faulty(
        dir: &Path,
        faults: &std::sync::Arc<faults::Faults>,
    ) -> Result<(Journal, Vec<Record>), JournalError> {
        let (files, records) = Files::open(dir)?;
        let (j, s) = (faults.clone(), faults.clone());
        let journal = files.spawn(
            move |file| Box::new(faults::Faulty::new(file, j, false)),
            move |file| Box::new(faults::Faulty::new(file, s, true)),
        )?;
        Ok((journal, records))
    }
}

/// Failure injection for the writer's files, and scratch directories, for tests here and
/// in the store.
#[cfg(test)]
pub(crate) mod faults {
    use std::fs::File;
    use std::io::{self, Write};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

    use super::LogFile;

    /// What one file does wrong next.
    #[derive(Debug, Default, Clone, Copy)]
    pub(crate) struct Flags {
        /// The next write stores only this many bytes, then fails.
        pub short_write: Option<usize>,
        /// The next fsync fails.
        pub fail_sync: bool,
        /// Every truncation fails while set.
        pub fail_truncate: bool,
    }

    #[derive(Default)]
    pub(crate) struct Faults {
        pub journal: Mutex<Flags>,
        pub settlement: Mutex<Flags>,
        /// While closed, every fsync waits.
        gate: Mutex<bool>,
        opened: Condvar,
    }

    /// Fsyncs wait while this lives ([`Faults::hold`]).
    pub(crate) struct Held<'a>(&'a Faults);

    impl Drop for Held<'_> {
        fn drop(&mut self) {
            *self.0.gate.lock().unwrap_or_else(PoisonError::into_inner) = false;
            self.0.opened.notify_all();
        }
    }

    impl Faults {
        pub(crate) fn journal(&self) -> MutexGuard<'_, Flags> {
            self.journal.lock().unwrap_or_else(PoisonError::into_inner)
        }

        pub(crate) fn settlement(&self) -> MutexGuard<'_, Flags> {
            self.settlement
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        }

        /// Stops every fsync until the returned value is dropped.
        pub(crate) fn hold(&self) -> Held<'_> {
            *self.gate.lock().unwrap_or_else(PoisonError::into_inner) = true;
            Held(self)
        }

        fn pass_gate(&self) {
            let mut closed = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
            while *closed {
                closed = self
                    .opened
                    .wait(closed)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
    }

    pub(crate) struct Faulty {
        file: File,
        faults: Arc<Faults>,
        settlement: bool,
    }

    impl Faulty {
        pub(crate) fn new(file: File, faults: Arc<Faults>, settlement: bool) -> Self {
            Self {
                file,
                faults,
                settlement,
            }
        }

        fn flags(&self) -> MutexGuard<'_, Flags> {
            if self.settlement {
                self.faults.settlement()
            } else {
                self.faults.journal()
            }
        }
    }

    impl LogFile for Faulty {
        fn write_bytes(&mut self, buf: &[u8]) -> io::Result<()> {
            let short = self.flags().short_write.take();
            match short {
                Some(n) => {
                    self.file.write_all(&buf[..n.min(buf.len())])?;
                    Err(io::Error::other("injected: short write"))
                }
                None => self.file.write_all(buf),
            }
        }

        fn sync(&mut self) -> io::Result<()> {
            self.faults.pass_gate();
            if std::mem::take(&mut self.flags().fail_sync) {
                return Err(io::Error::other("injected: fsync failed"));
            }
            self.file.sync_data()
        }

        fn truncate(&mut self, len: u64) -> io::Result<()> {
            if self.flags().fail_truncate {
                return Err(io::Error::other("injected: truncate failed"));
            }
            self.file.set_len(len)
        }
    }

    /// A fresh, empty scratch directory.
    pub(crate) fn scratch(tag: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "danmaku-journal-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::faults::{Faults, scratch};
    use super::*;

    fn user(id: &str) -> User {
        User {
            id: id.into(),
            name: format!("用户{id}"),
        }
    }

    fn create() -> Record {
        Record::Create {
            packet: "p".into(),
            room: "r".into(),
            sender: user("s"),
            total: 3,
            shares: 2,
            amounts: vec![1, 2],
            created_at: 1,
            expires_at: 2,
        }
    }

    fn grab(id: &str) -> Record {
        Record::Grab {
            packet: "p".into(),
            room: "r".into(),
            user: user(id),
            amount: 1,
            ts: 3,
        }
    }

    fn line(r: &Record) -> Vec<u8> {
        let mut v = serde_json::to_vec(r).unwrap();
        v.push(b'\n');
        v
    }

    fn bytes(dir: &Path, file: &str) -> Vec<u8> {
        std::fs::read(dir.join(file)).unwrap()
    }

    fn append_raw(dir: &Path, file: &str, data: &[u8]) {
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.join(file))
            .unwrap();
        f.write_all(data).unwrap();
    }

    /// The settlement log's (packet, user) pairs, in order.
    fn settled(dir: &Path) -> Vec<(String, String)> {
        let text = String::from_utf8(bytes(dir, SETTLEMENT_FILE)).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'), "{text:?}");
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["packet"].as_str().unwrap().to_string(),
                    v["user"]["id"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Packets past retention leave the journal at open; the rest, and the settlement
    /// log, stay as they were, and appends go on after the rewrite.
    #[tokio::test]
    async fn open_compacted_drops_packets_past_retention_only() {
        let dir = scratch("compact");
        let (j, _) = Journal::open(&dir).unwrap();
        let with_packet = |r: Record, p: &str, expires_at: u64| match r {
            Record::Create {
                room,
                sender,
                total,
                shares,
                amounts,
                created_at,
                ..
            } => Record::Create {
                packet: p.into(),
                room,
                sender,
                total,
                shares,
                amounts,
                created_at,
                expires_at,
            },
            Record::Grab {
                room,
                user,
                amount,
                ts,
                ..
            } => Record::Grab {
                packet: p.into(),
                room,
                user,
                amount,
                ts,
            },
            other => other,
        };
        // "old" expired at 1_000, "new" at 50_000; retention 10_000, now 20_000.
        j.append(with_packet(create(), "old", 1_000)).await.unwrap();
        j.append(with_packet(create(), "new", 50_000))
            .await
            .unwrap();
        j.append(with_packet(grab("a"), "old", 0)).await.unwrap();
        j.append(with_packet(grab("b"), "new", 0)).await.unwrap();
        j.append(Record::Expired {
            packet: "old".into(),
            ts: 1_000,
        })
        .await
        .unwrap();
        drop(j);
        let settled_before = settled(&dir);

        let (j, records) = Journal::open_compacted(&dir, 10_000, 20_000).unwrap();
        assert!(records.iter().all(|r| r.packet() == "new"), "{records:?}");
        assert_eq!(records.len(), 2);
        assert!(!dir.join(COMPACT_FILE).exists());
        // Appends continue after the rewritten records.
        j.append(with_packet(grab("c"), "new", 0)).await.unwrap();
        drop(j);
        let (_j, records) = Journal::open(&dir).unwrap();
        let users: Vec<String> = records
            .iter()
            .filter_map(|r| match r {
                Record::Grab { user, .. } => Some(user.id.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(users, ["b", "c"]);
        // Billing keeps everything it had, plus the new grab.
        let mut expected = settled_before;
        expected.push(("new".into(), "c".into()));
        assert_eq!(settled(&dir), expected);
        // Nothing past retention: nothing rewritten.
        let before = bytes(&dir, JOURNAL_FILE);
        let (_j, records) = Journal::open_compacted(&dir, 10_000, 20_000).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(bytes(&dir, JOURNAL_FILE), before);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn appends_replays_and_cuts_off_a_torn_tail() {
        let dir = scratch("torn");
        let (j, records) = Journal::open(&dir).unwrap();
        assert!(records.is_empty());
        j.append(create()).await.unwrap();
        let grabs: Vec<_> = (0..50).map(|i| grab(&format!("u{i}"))).collect();
        futures_util::future::join_all(grabs.iter().cloned().map(|g| j.append(g))).await;
        drop(j);
        let good = bytes(&dir, JOURNAL_FILE);
        // A crash mid-line leaves a torn tail, here ending inside a multi-byte character
        // of a Chinese name (invalid UTF-8).
        let whole = line(&grab("红包"));
        let cut = whole.iter().position(|&b| b >= 0x80).unwrap() + 1;
        append_raw(&dir, JOURNAL_FILE, &whole[..cut]);
        let (j, records) = Journal::open(&dir).unwrap();
        assert_eq!(records.len(), 51);
        assert_eq!(bytes(&dir, JOURNAL_FILE), good, "the torn tail is cut off");
        // A record appended after the repair is intact on the next replay.
        j.append(create()).await.unwrap();
        drop(j);
        let (_j, records) = Journal::open(&dir).unwrap();
        assert_eq!(records.len(), 52);
        assert_eq!(records[0], create());
        assert_eq!(records[51], create());
        assert_eq!(settled(&dir).len(), 50);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_complete_last_record_without_its_newline_is_kept() {
        let dir = scratch("newline");
        let (j, _) = Journal::open(&dir).unwrap();
        j.append(create()).await.unwrap();
        drop(j);
        let mut g = line(&grab("a"));
        g.pop();
        append_raw(&dir, JOURNAL_FILE, &g);
        let (j, records) = Journal::open(&dir).unwrap();
        assert_eq!(records, vec![create(), grab("a")]);
        j.append(grab("b")).await.unwrap();
        drop(j);
        let (_j, records) = Journal::open(&dir).unwrap();
        assert_eq!(records, vec![create(), grab("a"), grab("b")]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn an_unreadable_line_before_others_fails_the_open_naming_it() {
        let dir = scratch("corrupt");
        let (j, _) = Journal::open(&dir).unwrap();
        j.append(create()).await.unwrap();
        drop(j);
        append_raw(&dir, JOURNAL_FILE, b"{\"t\":\"grab\",\"pa\xe7\xba\n");
        append_raw(&dir, JOURNAL_FILE, &line(&grab("a")));
        match Journal::open(&dir) {
            Err(JournalError::Corrupt { line, path, .. }) => {
                assert_eq!(line, 2);
                assert_eq!(path, dir.join(JOURNAL_FILE));
            }
            Err(e) => panic!("expected corruption, got {e}"),
            Ok(_) => panic!("a corrupt journal was opened"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// With fsyncs held, appends `first` and waits until the writer has written it (and
    /// waits in its fsync), so that records appended next queue behind it as one batch.
    async fn stall_after(
        j: &Journal,
        dir: &Path,
        first: Record,
    ) -> tokio::task::JoinHandle<Result<(), JournalError>> {
        let before = bytes(dir, JOURNAL_FILE).len();
        let j2 = j.clone();
        let task = tokio::spawn(async move { j2.append(first).await });
        while bytes(dir, JOURNAL_FILE).len() == before {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        task
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_batch_is_cut_off_whole_and_the_next_record_survives() {
        let dir = scratch("cut");
        let faults = Arc::new(Faults::default());
        let (j, _) = Journal::open_faulty(&dir, &faults).unwrap();
        j.append(create()).await.unwrap();
        let gate = faults.hold();
        let a = stall_after(&j, &dir, grab("a")).await;
        // b and c queue up behind a: one batch, of which the write stores b whole and
        // half of c before failing.
        let (jb, jc) = (j.clone(), j.clone());
        let b = tokio::spawn(async move { jb.append(grab("b")).await });
        let c = tokio::spawn(async move { jc.append(grab("c")).await });
        while j.tx.len() < 2 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        faults.journal().short_write = Some(line(&grab("b")).len() + 10);
        drop(gate);
        a.await.unwrap().unwrap();
        assert!(b.await.unwrap().is_err(), "b's batch failed");
        assert!(c.await.unwrap().is_err(), "c's batch failed");
        // The next batch starts on a clean line.
        j.append(grab("d")).await.unwrap();
        drop(j);
        let (_j, records) = Journal::open(&dir).unwrap();
        assert_eq!(records, vec![create(), grab("a"), grab("d")]);
        assert_eq!(
            settled(&dir),
            vec![("p".into(), "a".into()), ("p".into(), "d".into())]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_failed_fsync_refuses_and_cuts_off_the_record() {
        let dir = scratch("fsync");
        let faults = Arc::new(Faults::default());
        let (j, _) = Journal::open_faulty(&dir, &faults).unwrap();
        j.append(create()).await.unwrap();
        let good = bytes(&dir, JOURNAL_FILE);
        faults.journal().fail_sync = true;
        assert!(j.append(grab("a")).await.is_err());
        assert_eq!(
            bytes(&dir, JOURNAL_FILE),
            good,
            "the written line is cut off"
        );
        j.append(grab("b")).await.unwrap();
        drop(j);
        let (_j, records) = Journal::open(&dir).unwrap();
        assert_eq!(records, vec![create(), grab("b")]);
        assert_eq!(settled(&dir), vec![("p".into(), "b".into())]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_batch_that_cannot_be_cut_off_poisons_the_journal() {
        let dir = scratch("poison");
        let faults = Arc::new(Faults::default());
        let (j, _) = Journal::open_faulty(&dir, &faults).unwrap();
        j.append(create()).await.unwrap();
        {
            let mut f = faults.journal();
            f.short_write = Some(7);
            f.fail_truncate = true;
        }
        assert!(j.append(grab("a")).await.is_err());
        // The disk recovers, but the journal holds a partial line nobody cut off: it
        // must refuse every append rather than glue records onto it.
        *faults.journal() = Default::default();
        for id in ["b", "c"] {
            match j.append(grab(id)).await {
                Err(JournalError::Poisoned { .. }) => {}
                other => panic!("expected a poisoned journal, got {other:?}"),
            }
        }
        drop(j);
        // A restart cuts the partial line off (it is the torn tail) and works again.
        let (j, records) = Journal::open(&dir).unwrap();
        assert_eq!(records, vec![create()]);
        j.append(grab("d")).await.unwrap();
        drop(j);
        let (_j, records) = Journal::open(&dir).unwrap();
        assert_eq!(records, vec![create(), grab("d")]);
        assert_eq!(settled(&dir), vec![("p".into(), "d".into())]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_failed_settlement_write_does_not_fail_the_committed_record() {
        let dir = scratch("settle");
        let faults = Arc::new(Faults::default());
        let (j, _) = Journal::open_faulty(&dir, &faults).unwrap();
        j.append(create()).await.unwrap();
        j.append(grab("a")).await.unwrap();
        let before = bytes(&dir, SETTLEMENT_FILE);
        faults.settlement().short_write = Some(9);
        j.append(grab("b"))
            .await
            .expect("the journal committed b; the settlement log is not the commit point");
        assert_eq!(
            bytes(&dir, SETTLEMENT_FILE),
            before,
            "the partial settlement line is cut off"
        );
        // The line is retried with the next batch.
        j.append(grab("c")).await.unwrap();
        assert_eq!(
            settled(&dir),
            vec![
                ("p".into(), "a".into()),
                ("p".into(), "b".into()),
                ("p".into(), "c".into())
            ]
        );
        // A settlement log that cannot even be cut back stops (the grabs still commit)
        // until a restart re-creates what it lacks.
        {
            let mut f = faults.settlement();
            f.short_write = Some(9);
            f.fail_truncate = true;
        }
        j.append(grab("d")).await.unwrap();
        *faults.settlement() = Default::default();
        j.append(grab("e")).await.unwrap();
        drop(j);
        let (_j, records) = Journal::open(&dir).unwrap();
        assert_eq!(records.len(), 6);
        let ids: Vec<String> = settled(&dir).into_iter().map(|(_, u)| u).collect();
        assert_eq!(ids, ["a", "b", "c", "d", "e"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_settlement_log_is_repaired_and_reconciled_at_open() {
        let dir = scratch("reconcile");
        let (j, _) = Journal::open(&dir).unwrap();
        j.append(create()).await.unwrap();
        for id in ["a", "b", "c"] {
            j.append(grab(id)).await.unwrap();
        }
        drop(j);
        // A crash after the journal's fsync: c's settlement line never made it whole,
        // and b's is torn mid-way.
        let text = bytes(&dir, SETTLEMENT_FILE);
        let first = text.iter().position(|&b| b == b'\n').unwrap() + 1;
        std::fs::write(dir.join(SETTLEMENT_FILE), &text[..first + 20]).unwrap();
        let (j, _) = Journal::open(&dir).unwrap();
        let ids: Vec<String> = settled(&dir).into_iter().map(|(_, u)| u).collect();
        assert_eq!(ids, ["a", "b", "c"], "one line per grab, none twice");
        // Nothing more on a clean open.
        drop(j);
        let _j = Journal::open(&dir).unwrap();
        assert_eq!(settled(&dir).len(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn opens_in_a_directory_it_creates() {
        let dir = scratch("new").join("nested").join("data");
        let (j, records) = Journal::open(&dir).unwrap();
        assert!(records.is_empty());
        j.append(create()).await.unwrap();
        assert!(dir.join(JOURNAL_FILE).is_file());
        assert!(dir.join(SETTLEMENT_FILE).is_file());
        let _ = std::fs::remove_dir_all(dir.parent().unwrap().parent().unwrap());
    }
}
