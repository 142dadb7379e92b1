//! The single-node sink: JSON lines in `data.dir/events/events-YYYY-MM-DD.jsonl` (UTC
//! date of each record), a day's file continued in `events-YYYY-MM-DD.N.jsonl` past
//! `stream.max_file_mb`. Each batch is one `write` with no user-space buffer, so what is
//! queued reaches the file within the writer's next turn (well under a second); a file is
//! fsynced when it is left (rotation) and on drain. A write that fails part-way is cut
//! back to the last whole line, so a full disk never leaves a torn record.

use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;

use super::{Record, Sink, StreamError};

/// The open file: its date, number, handle and length.
struct Open {
    date: String,
    index: u32,
    path: PathBuf,
    file: tokio::fs::File,
    len: u64,
}

pub struct FileSink {
    dir: PathBuf,
    node: String,
    max_bytes: u64,
    open: Option<Open>,
}

impl FileSink {
    /// Files go to `dir` (created when first written); `max_mb` per file.
    pub fn new(dir: PathBuf, node: &str, max_mb: u64) -> Self {
        Self {
            dir,
            node: node.to_owned(),
            max_bytes: max_mb.saturating_mul(1 << 20).max(1),
            open: None,
        }
    }

    fn io(path: &Path, source: std::io::Error) -> StreamError {
        StreamError::Io {
            path: path.to_owned(),
            source,
        }
    }

    /// The file's name for `date` and continuation `index`.
    pub fn file_name(date: &str, index: u32) -> String {
        if index == 0 {
            format!("events-{date}.jsonl")
        } else {
            format!("events-{date}.{index}.jsonl")
        }
    }

    /// Makes the file for `date` the open one, with room for `need` more bytes: the
    /// newest of that day if it has room, else the next.
    async fn ready(&mut self, date: &str, need: u64) -> Result<&mut Open, StreamError> {
        let fits = |o: &Open| o.date == date && (o.len == 0 || o.len + need <= self.max_bytes);
        if self.open.as_ref().is_some_and(|o| !fits(o)) {
            let old = self.open.take().expect("checked");
            old.file
                .sync_all()
                .await
                .map_err(|e| Self::io(&old.path, e))?;
            let index = if old.date == date { old.index + 1 } else { 0 };
            self.open = Some(self.open_file(date, index).await?);
        }
        if self.open.is_none() {
            tokio::fs::create_dir_all(&self.dir)
                .await
                .map_err(|e| Self::io(&self.dir, e))?;
            // Continue the day's newest file after a restart.
            let mut index = 0;
            while tokio::fs::try_exists(self.dir.join(Self::file_name(date, index + 1)))
                .await
                .unwrap_or(false)
            {
                index += 1;
            }
            let open = self.open_file(date, index).await?;
            let full = open.len > 0 && open.len + need > self.max_bytes;
            self.open = Some(open);
            if full {
                let old = self.open.take().expect("just set");
                self.open = Some(self.open_file(date, old.index + 1).await?);
            }
        }
        Ok(self.open.as_mut().expect("opened above"))
    }

    async fn open_file(&self, date: &str, index: u32) -> Result<Open, StreamError> {
        let path = self.dir.join(Self::file_name(date, index));
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await
            .map_err(|e| Self::io(&path, e))?;
        let len = file.metadata().await.map_err(|e| Self::io(&path, e))?.len();
        Ok(Open {
            date: date.to_owned(),
            index,
            path,
            file,
            len,
        })
    }

    async fn write_lines(&mut self, date: &str, lines: &[u8]) -> Result<(), StreamError> {
        let open = self.ready(date, lines.len() as u64).await?;
        if let Err(e) = open.file.write_all(lines).await {
            // Cut a partial write back to the last whole line.
            let _ = open.file.set_len(open.len).await;
            return Err(Self::io(&open.path, e));
        }
        open.len += lines.len() as u64;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Sink for FileSink {
    async fn write(&mut self, records: &[Record]) -> Result<(), StreamError> {
        // Records are in queue order; each run of one date goes to that date's file.
        let mut lines = Vec::new();
        let mut date = String::new();
        for r in records {
            let d = utc_date(r.ts());
            if d != date && !lines.is_empty() {
                self.write_lines(&date, &lines).await?;
                lines.clear();
            }
            date = d;
            lines.extend_from_slice(r.to_json(&self.node).as_bytes());
            lines.push(b'\n');
            // A batch larger than a file is split at the file bound.
            if lines.len() as u64 >= self.max_bytes {
                self.write_lines(&date, &lines).await?;
                lines.clear();
            }
        }
        if !lines.is_empty() {
            self.write_lines(&date, &lines).await?;
        }
        Ok(())
    }

    async fn sync(&mut self) -> Result<(), StreamError> {
        if let Some(o) = &self.open {
            o.file.sync_all().await.map_err(|e| Self::io(&o.path, e))?;
        }
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "file"
    }
}

/// `YYYY-MM-DD` (UTC) of unix ms `ms`.
pub fn utc_date(ms: u64) -> String {
    let (y, m, d) = civil_from_days((ms / 86_400_000) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_calendar_days() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(86_399_999), "1970-01-01");
        assert_eq!(utc_date(86_400_000), "1970-01-02");
        // 2024-02-29 (leap day), 2026-12-06, 2000-03-01.
        assert_eq!(utc_date(1_709_164_800_000), "2024-02-29");
        assert_eq!(utc_date(1_796_515_200_000), "2026-12-06");
        assert_eq!(utc_date(951_868_800_000), "2000-03-01");
    }

    #[test]
    fn continuation_files_are_numbered() {
        assert_eq!(
            FileSink::file_name("2026-12-06", 0),
            "events-2026-12-06.jsonl"
        );
        assert_eq!(
            FileSink::file_name("2026-12-06", 2),
            "events-2026-12-06.2.jsonl"
        );
    }
}
