//! Writing, reading and resuming the per-epoch CSV log.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::{CurvesError, EpochRecord, COLUMNS};

/// An open training log, appending one row per epoch.
#[derive(Debug)]
pub struct TrainLog {
    path: PathBuf,
    file: File,
}

impl TrainLog {
    /// Starts a new log, overwriting any existing file, writing the header.
    pub fn create(path: &Path) -> Result<TrainLog, CurvesError> {
        let io_err = |source| CurvesError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::create(path).map_err(io_err)?;
        file.write_all(header().as_bytes()).map_err(io_err)?;
        Ok(TrainLog {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Re-opens a log when training resumes after `epochs_done` epochs: reads
    /// the rows, drops rows with `epoch > epochs_done` (written after the
    /// checkpoint being resumed from), rewrites the file and returns the kept
    /// rows.
    ///
    /// Every row is parsed, dropped ones included: a malformed row means the
    /// file is not what this module wrote, and guessing which parts of it to
    /// trust would be worse than stopping.
    ///
    /// The rewrite goes through a temporary file renamed over the log, so a
    /// crash while resuming leaves either the old log or the new one, never
    /// half of either.
    pub fn resume(
        path: &Path,
        epochs_done: usize,
    ) -> Result<(TrainLog, Vec<EpochRecord>), CurvesError> {
        let io_err = |source| CurvesError::Io {
            path: path.to_path_buf(),
            source,
        };
        let text = fs::read_to_string(path).map_err(io_err)?;
        let mut rows = parse_log(path, &text)?;
        rows.retain(|r| r.epoch <= epochs_done);

        let mut tmp = OsString::from(path.as_os_str());
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let tmp_err = |source| CurvesError::Io {
            path: tmp.clone(),
            source,
        };
        let mut out = String::with_capacity(text.len());
        out.push_str(&header());
        for row in &rows {
            out.push_str(&format_row(row));
        }
        let mut file = File::create(&tmp).map_err(tmp_err)?;
        file.write_all(out.as_bytes()).map_err(tmp_err)?;
        file.sync_all().map_err(tmp_err)?;
        drop(file);
        fs::rename(&tmp, path).map_err(io_err)?;

        let file = OpenOptions::new().append(true).open(path).map_err(io_err)?;
        let log = TrainLog {
            path: path.to_path_buf(),
            file,
        };
        Ok((log, rows))
    }

    /// Appends one row and flushes it (a crash must not lose finished
    /// epochs).
    ///
    /// "Flushes" means synced to disk, not just handed to the OS: an epoch
    /// takes minutes, an fsync milliseconds, and a machine that loses power
    /// loses its page cache too.
    pub fn append(&mut self, record: &EpochRecord) -> Result<(), CurvesError> {
        // The row goes out in one write, so a crash can tear at most this
        // row, which `resume` then reports by line rather than misreading.
        self.file
            .write_all(format_row(record).as_bytes())
            .and_then(|()| self.file.sync_data())
            .map_err(|source| CurvesError::Io {
                path: self.path.clone(),
                source,
            })
    }
}

fn header() -> String {
    let mut line = COLUMNS.join(",");
    line.push('\n');
    line
}

/// Formats a row. `{}` on an `f64` prints the shortest text that parses back
/// to the same value (NaN and infinities included), so a resumed log plots
/// exactly like the original.
fn format_row(r: &EpochRecord) -> String {
    format!(
        "{},{},{},{},{},{},{},{}\n",
        r.epoch,
        r.step,
        r.lr,
        r.train_loss,
        r.valid_recall10,
        r.valid_ndcg10,
        r.examples_per_sec,
        r.elapsed_secs,
    )
}

/// Parses a whole log. Logs hold one row per epoch, so reading it whole is
/// cheap and keeps the line counting in one place.
fn parse_log(path: &Path, text: &str) -> Result<Vec<EpochRecord>, CurvesError> {
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("");
    if first != COLUMNS.join(",") {
        return Err(CurvesError::Header {
            path: path.to_path_buf(),
            found: first.to_owned(),
        });
    }
    lines
        .enumerate()
        .map(|(i, line)| parse_row(path, i as u64 + 2, line))
        .collect()
}

fn parse_row(path: &Path, line: u64, text: &str) -> Result<EpochRecord, CurvesError> {
    let fields: Vec<&str> = text.split(',').collect();
    if fields.len() != COLUMNS.len() {
        return Err(CurvesError::FieldCount {
            path: path.to_path_buf(),
            line,
            found: fields.len(),
        });
    }
    let field = |index: usize, expected| Field {
        path,
        line,
        index,
        text: fields[index],
        expected,
    };
    let int = "an unsigned integer";
    let float = "a number";
    Ok(EpochRecord {
        epoch: field(0, int).parse()?,
        step: field(1, int).parse()?,
        lr: field(2, float).parse()?,
        train_loss: field(3, float).parse()?,
        valid_recall10: field(4, float).parse()?,
        valid_ndcg10: field(5, float).parse()?,
        examples_per_sec: field(6, float).parse()?,
        elapsed_secs: field(7, float).parse()?,
    })
}

/// One field of one row, with what an error about it needs to say.
struct Field<'a> {
    path: &'a Path,
    line: u64,
    index: usize,
    text: &'a str,
    expected: &'static str,
}

impl Field<'_> {
    fn parse<T: FromStr>(&self) -> Result<T, CurvesError> {
        self.text.parse().map_err(|_| CurvesError::Field {
            path: self.path.to_path_buf(),
            line: self.line,
            index: self.index,
            name: COLUMNS[self.index],
            expected: self.expected,
            found: self.text.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::super::record;
    use super::*;

    fn lines(path: &Path) -> Vec<String> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn resume_drops_rows_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.csv");
        let mut log = TrainLog::create(&path).unwrap();
        for epoch in 1..=3 {
            log.append(&record(epoch)).unwrap();
        }
        drop(log);
        assert_eq!(lines(&path).len(), 4);

        let (mut log, kept) = TrainLog::resume(&path, 2).unwrap();
        assert_eq!(kept, vec![record(1), record(2)]);
        let after = lines(&path);
        assert_eq!(after.len(), 3);
        assert_eq!(after[0], COLUMNS.join(","));
        assert!(after[2].starts_with("2,2000,"), "{}", after[2]);
        assert!(!dir.path().join("train.csv.tmp").exists());

        // Training goes on appending after the kept rows.
        let mut redo = record(3);
        redo.train_loss = 0.25;
        log.append(&redo).unwrap();
        let (_, all) = TrainLog::resume(&path, 10).unwrap();
        assert_eq!(all, vec![record(1), record(2), redo]);
    }

    #[test]
    fn values_round_trip_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.csv");
        let mut r = record(1);
        r.lr = 0.1 + 0.2;
        r.train_loss = f64::INFINITY;
        r.valid_recall10 = f64::NAN;
        r.elapsed_secs = 1e-300;
        TrainLog::create(&path).unwrap().append(&r).unwrap();
        let (_, back) = TrainLog::resume(&path, 1).unwrap();
        let b = &back[0];
        assert_eq!(b.lr.to_bits(), r.lr.to_bits());
        assert_eq!(b.train_loss, f64::INFINITY);
        assert!(b.valid_recall10.is_nan());
        assert_eq!(b.elapsed_secs.to_bits(), r.elapsed_secs.to_bits());
    }

    #[test]
    fn resume_of_a_missing_file_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.csv");
        let err = TrainLog::resume(&path, 1).unwrap_err();
        assert!(matches!(&err, CurvesError::Io { source, .. }
            if source.kind() == io::ErrorKind::NotFound));
        assert!(err.to_string().contains("nope.csv"), "{err}");
    }

    #[test]
    fn malformed_row_names_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.csv");
        let good = format_row(&record(1));
        fs::write(&path, format!("{}{good}2,2000,fast,1,1,1,1,1\n", header())).unwrap();
        let err = TrainLog::resume(&path, 5).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("train.csv:3:"), "{msg}");
        assert!(msg.contains("column 3 (lr)"), "{msg}");
        assert!(msg.contains("\"fast\""), "{msg}");
        // The file is left as it was.
        assert_eq!(lines(&path).len(), 3);

        fs::write(&path, format!("{}{good}\n", header())).unwrap();
        let msg = TrainLog::resume(&path, 5).unwrap_err().to_string();
        assert!(msg.contains("train.csv:3: expected 8"), "{msg}");

        fs::write(&path, format!("epoch,step\n{good}")).unwrap();
        let msg = TrainLog::resume(&path, 5).unwrap_err().to_string();
        assert!(msg.contains("train.csv:1: expected the header"), "{msg}");
    }
}
