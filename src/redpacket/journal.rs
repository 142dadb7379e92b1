//! The embedded store's durability: an append-only journal of red-packet records,
//! fsynced before a grab is acknowledged, and a settlement log for billing.
//!
//! One writer thread owns both files. Appenders hand it a record and wait for its
//! answer; it takes everything queued, writes it, fsyncs once, and answers all of them
//! (group commit): a storm of 10,000 grabs costs a handful of fsyncs, not 10,000. The
//! journal is JSON lines, replayed at start; a torn last line (a crash mid-write, never
//! acknowledged) is skipped. Every grab also goes to `settlement.jsonl`, one JSON object
//! per line, for a downstream billing consumer.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::protocol::User;

pub const JOURNAL_FILE: &str = "redpackets.journal";
pub const SETTLEMENT_FILE: &str = "settlement.jsonl";

/// Records queued at most; appenders wait beyond it (backpressure, bounded memory).
const QUEUE: usize = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("journal writer has stopped")]
    Stopped,
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

type Ack = oneshot::Sender<Result<(), String>>;

/// Handle to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct Journal {
    tx: flume::Sender<(Record, Ack)>,
    path: PathBuf,
}

impl Journal {
    /// Opens (creating) the journal under `dir`, returns its records for replay, and
    /// starts the writer thread. The thread ends when the last handle is dropped.
    ///
    /// # Errors
    /// The directory or files cannot be created, read or opened for append.
    pub fn open(dir: &Path) -> Result<(Journal, Vec<Record>), JournalError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JournalError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join(JOURNAL_FILE);
        let records = replay(&path).map_err(io_err(&path))?;
        let mut journal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        end_with_newline(&path, &mut journal).map_err(io_err(&path))?;
        let spath = dir.join(SETTLEMENT_FILE);
        let settlement = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spath)
            .map_err(io_err(&spath))?;
        let (tx, rx) = flume::bounded(QUEUE);
        std::thread::Builder::new()
            .name("redpacket-journal".into())
            .spawn(move || writer(rx, journal, settlement))
            .map_err(io_err(dir))?;
        Ok((Journal { tx, path }, records))
    }

    /// Appends `record` and returns once it is on disk (fsynced).
    ///
    /// # Errors
    /// The write or fsync failed, or the writer is gone; the record is then not durable.
    pub async fn append(&self, record: Record) -> Result<(), JournalError> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send_async((record, ack))
            .await
            .map_err(|_| JournalError::Stopped)?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(msg)) => Err(JournalError::Io {
                path: self.path.clone(),
                source: io::Error::other(msg),
            }),
            Err(_) => Err(JournalError::Stopped),
        }
    }
}

/// A torn last line must not swallow the next record: terminate it so it stays one
/// unreadable (skipped) line on its own.
fn end_with_newline(path: &Path, journal: &mut File) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let len = journal.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8; 1];
    f.read_exact(&mut last)?;
    if last[0] != b'\n' {
        journal.write_all(b"\n")?;
        journal.sync_data()?;
    }
    Ok(())
}

/// Reads every complete record; a line that does not parse is the torn tail of a crash
/// (never acknowledged) and is skipped with a warning.
fn replay(path: &Path) -> io::Result<Vec<Record>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(&line) {
            Ok(r) => out.push(r),
            Err(e) => tracing::warn!(line = n + 1, error = %e, "skipping unreadable journal line"),
        }
    }
    Ok(out)
}

fn writer(rx: flume::Receiver<(Record, Ack)>, mut journal: File, mut settlement: File) {
    let syncs = ::metrics::counter!(crate::metrics::JOURNAL_SYNCS);
    let mut acks = Vec::new();
    let mut jbuf = Vec::new();
    let mut sbuf = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some((record, ack)) = next.take().or_else(|| rx.try_recv().ok()) {
            serde_json::to_writer(&mut jbuf, &record).expect("records serialize");
            jbuf.push(b'\n');
            if let Record::Grab {
                packet,
                room,
                user,
                amount,
                ts,
            } = &record
            {
                let s = Settlement {
                    packet,
                    room,
                    user,
                    amount: *amount,
                    ts: *ts,
                };
                serde_json::to_writer(&mut sbuf, &s).expect("settlements serialize");
                sbuf.push(b'\n');
            }
            acks.push(ack);
            if acks.len() >= 4096 {
                break;
            }
        }
        let result = (|| {
            journal.write_all(&jbuf)?;
            journal.sync_data()?;
            if !sbuf.is_empty() {
                settlement.write_all(&sbuf)?;
                settlement.sync_data()?;
            }
            Ok::<(), io::Error>(())
        })()
        .map_err(|e| {
            tracing::error!(error = %e, "journal write failed");
            e.to_string()
        });
        syncs.increment(1);
        jbuf.clear();
        sbuf.clear();
        for ack in acks.drain(..) {
            let _ = ack.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str) -> User {
        User {
            id: id.into(),
            name: id.into(),
        }
    }

    #[tokio::test]
    async fn appends_replays_and_skips_torn_tail() {
        let dir = std::env::temp_dir().join(format!("journal-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (j, records) = Journal::open(&dir).unwrap();
        assert!(records.is_empty());
        let create = Record::Create {
            packet: "p".into(),
            room: "r".into(),
            sender: user("s"),
            total: 3,
            shares: 2,
            amounts: vec![1, 2],
            created_at: 1,
            expires_at: 2,
        };
        j.append(create.clone()).await.unwrap();
        let grabs: Vec<_> = (0..50)
            .map(|i| Record::Grab {
                packet: "p".into(),
                room: "r".into(),
                user: user(&format!("u{i}")),
                amount: 1,
                ts: 3,
            })
            .collect();
        futures_util::future::join_all(grabs.iter().cloned().map(|g| j.append(g))).await;
        drop(j);
        // A crash mid-line leaves a torn tail.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.join(JOURNAL_FILE))
            .unwrap();
        f.write_all(b"{\"t\":\"grab\",\"packet\":\"p\",\"ro")
            .unwrap();
        let (j, records) = Journal::open(&dir).unwrap();
        assert_eq!(records.len(), 51);
        // A record appended after the torn tail is intact on the next replay.
        j.append(create.clone()).await.unwrap();
        drop(j);
        let (_j, records) = Journal::open(&dir).unwrap();
        assert_eq!(records.len(), 52);
        assert_eq!(records[0], create);
        let settled = std::fs::read_to_string(dir.join(SETTLEMENT_FILE)).unwrap();
        assert_eq!(settled.lines().count(), 50);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
