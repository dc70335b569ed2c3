//! A training run's per-epoch log, and the picture of it.
//!
//! The log is a CSV file with one row per finished epoch. Plain text because
//! the first thing anyone does with a training log is look at it, diff it, or
//! load it into a notebook, and none of that should need genfeed. One row per
//! epoch, appended and synced as the epoch finishes, because training dies
//! (preemption, OOM, a bad batch) and the epochs finished before the crash are
//! exactly the ones worth keeping.
//!
//! Resuming from a checkpoint is the subtle part. The log may run ahead of the
//! checkpoint: epoch 7 was logged, then the process died before (or while)
//! writing checkpoint 7, and training resumes from checkpoint 6. Epoch 7 will
//! be trained again, so its old row describes a model that no longer exists.
//! [`TrainLog::resume`] therefore drops every row past the checkpoint before
//! training appends more, keeping the log a faithful history of the model
//! being trained.
//!
//! [`plot`] draws the curves with `plotters` in pure Rust, encoding the PNG
//! itself. Training runs on fresh cloud machines and in minimal containers,
//! where the usual system libraries for text (fontconfig, freetype) are
//! absent, and a plot is not worth failing a build or a run over. Text is
//! rendered from a TrueType file found at run time (see [`FONT_ENV`]); with
//! none, the curves are drawn anyway, unlabelled.

use std::error::Error as StdError;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use plotters::backend::BitMapBackend;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::register_font;
use thiserror::Error;

/// The header line, and the column names that errors refer to.
const COLUMNS: [&str; 8] = [
    "epoch",
    "step",
    "lr",
    "train_loss",
    "valid_recall10",
    "valid_ndcg10",
    "examples_per_sec",
    "elapsed_secs",
];

/// One row per finished epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochRecord {
    /// 1-based, so that the row for epoch `n` is written once `n` epochs are
    /// done and `resume(path, n)` keeps it.
    pub epoch: usize,
    /// Optimizer steps so far; unlike epochs, comparable across runs with
    /// different batch sizes or dataset sizes.
    pub step: u64,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    /// Mean training loss over the epoch.
    pub train_loss: f64,
    /// Validation Recall@10; NaN in epochs without a validation pass.
    pub valid_recall10: f64,
    /// Validation NDCG@10; NaN in epochs without a validation pass.
    pub valid_ndcg10: f64,
    pub examples_per_sec: f64,
    /// Wall time since training started, cumulative over resumes, so the
    /// last row tells what the whole run cost.
    pub elapsed_secs: f64,
}

/// An error while writing, reading or plotting a training log.
///
/// Every variant names the file, and parse errors name the 1-based line and
/// the column, so the message alone finds the bad byte.
#[derive(Debug, Error)]
pub enum CurvesError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{}:1: expected the header {:?}, found {found:?}",
        .path.display(),
        COLUMNS.join(",")
    )]
    Header { path: PathBuf, found: String },
    #[error(
        "{}:{line}: expected {} comma-separated fields, found {found}",
        .path.display(),
        COLUMNS.len()
    )]
    FieldCount {
        path: PathBuf,
        line: u64,
        found: usize,
    },
    #[error(
        "{}:{line}: column {} ({name}): expected {expected}, found {found:?}",
        .path.display(),
        .index + 1
    )]
    Field {
        path: PathBuf,
        line: u64,
        /// 0-based position of the column; the message shows it 1-based.
        index: usize,
        name: &'static str,
        expected: &'static str,
        found: String,
    },
    /// Drawing failed. Boxed so that no plotters type is part of this API.
    #[error("{}: drawing the plot: {source}", .path.display())]
    Draw {
        path: PathBuf,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    #[error("{}: encoding the PNG: {source}", .path.display())]
    Png {
        path: PathBuf,
        #[source]
        source: png::EncodingError,
    },
}

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

/// Environment variable naming a TrueType or OpenType font file for the
/// plot's text. It is tried before the well-known system paths, so a machine
/// without any of them can still get labelled plots.
pub const FONT_ENV: &str = "GENFEED_PLOT_FONT";

/// Where common systems keep a plain sans-serif font: Debian/Ubuntu
/// (fonts-dejavu-core, fonts-liberation, fonts-freefont-ttf), Fedora, Arch,
/// Alpine, macOS and Windows.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// The family every text style here asks for, and the name the found font is
/// registered under.
const FONT_FAMILY: &str = "sans-serif";

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 500;

const LOSS_COLOR: RGBColor = RGBColor(31, 119, 180);
const RECALL_COLOR: RGBColor = RGBColor(255, 127, 14);
const NDCG_COLOR: RGBColor = RGBColor(44, 160, 44);

/// Draws training loss (left panel) and validation Recall@10 and NDCG@10
/// (right panel) against epoch into a PNG of about 1200x500 px, with axis
/// labels, a legend and a title line given by `title`.
///
/// Non-finite values are skipped, and the points on either side joined:
/// validation that runs every few epochs logs NaN in between, and its curve
/// should still be a line. Every point is also marked, so that a run with one
/// epoch shows something.
///
/// Without a font (see [`FONT_ENV`]) the curves, axes and grid are drawn with
/// no text at all, and a warning names the paths tried.
pub fn plot(records: &[EpochRecord], title: &str, png: &Path) -> Result<(), CurvesError> {
    let rgb = render(records, title, text_available()).map_err(|source| CurvesError::Draw {
        path: png.to_path_buf(),
        source,
    })?;
    write_png(&rgb, png)
}

/// Draws into an RGB buffer. The PNG is encoded separately, rather than by
/// plotters' image encoder, so that the file is PNG whatever its extension
/// and the `image` crate with its decoders stays out of the build.
fn render(
    records: &[EpochRecord],
    title: &str,
    text: bool,
) -> Result<Vec<u8>, Box<dyn StdError + Send + Sync>> {
    let mut rgb = vec![0u8; WIDTH as usize * HEIGHT as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, records, title, text)?;
        root.present()?;
    }
    Ok(rgb)
}

fn write_png(rgb: &[u8], path: &Path) -> Result<(), CurvesError> {
    let png_err = |source| CurvesError::Png {
        path: path.to_path_buf(),
        source,
    };
    let file = File::create(path).map_err(|source| CurvesError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(png_err)?;
    writer.write_image_data(rgb).map_err(png_err)?;
    writer.finish().map_err(png_err)
}

/// One curve of a panel.
struct Curve<'a> {
    name: &'a str,
    color: RGBColor,
    points: Vec<(usize, f64)>,
}

impl<'a> Curve<'a> {
    fn new(
        name: &'a str,
        color: RGBColor,
        records: &[EpochRecord],
        value: fn(&EpochRecord) -> f64,
    ) -> Curve<'a> {
        let points = records
            .iter()
            .map(|r| (r.epoch, value(r)))
            .filter(|(_, v)| v.is_finite())
            .collect();
        Curve {
            name,
            color,
            points,
        }
    }
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    records: &[EpochRecord],
    title: &str,
    text: bool,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let body = if text {
        root.titled(title, (FONT_FAMILY, 22))?
    } else {
        root.clone()
    };
    let panels = body.split_evenly((1, 2));
    let epochs = epoch_range(records);

    let loss = [Curve::new("train loss", LOSS_COLOR, records, |r| {
        r.train_loss
    })];
    panel(
        &panels[0],
        text,
        ("training loss", "mean loss"),
        epochs.clone(),
        value_range(&loss, false),
        &loss,
        SeriesLabelPosition::UpperRight,
    )?;

    let metrics = [
        Curve::new("Recall@10", RECALL_COLOR, records, |r| r.valid_recall10),
        Curve::new("NDCG@10", NDCG_COLOR, records, |r| r.valid_ndcg10),
    ];
    panel(
        &panels[1],
        text,
        ("validation", "metric @10"),
        epochs,
        value_range(&metrics, true),
        &metrics,
        SeriesLabelPosition::LowerRight,
    )
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    text: bool,
    (caption, y_desc): (&str, &str),
    x: Range<usize>,
    y: Range<f64>,
    curves: &[Curve<'_>],
    legend_at: SeriesLabelPosition,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let mut builder = ChartBuilder::on(area);
    builder.margin(12);
    if text {
        builder
            .caption(caption, (FONT_FAMILY, 18))
            .x_label_area_size(45)
            .y_label_area_size(65);
    }
    let mut chart = builder.build_cartesian_2d(x.clone(), y.clone())?;

    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("epoch")
            .y_desc(y_desc)
            .label_style((FONT_FAMILY, 14))
            .axis_desc_style((FONT_FAMILY, 15));
    }
    mesh.draw()?;
    if !text {
        // Without label areas plotters draws no axes; frame the plot instead.
        chart.plotting_area().draw(&Rectangle::new(
            [(x.start, y.start), (x.end, y.end)],
            BLACK.stroke_width(1),
        ))?;
    }

    for curve in curves {
        let color = curve.color;
        let series =
            LineSeries::new(curve.points.iter().copied(), color.stroke_width(2)).point_size(3);
        let drawn = chart.draw_series(series)?;
        if text {
            drawn.label(curve.name).legend(move |(lx, ly)| {
                PathElement::new(vec![(lx, ly), (lx + 20, ly)], color.stroke_width(2))
            });
        }
    }
    if text {
        chart
            .configure_series_labels()
            .position(legend_at)
            .label_font((FONT_FAMILY, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    Ok(())
}

/// The x axis: one epoch of room on either side, so the first and last
/// points are not drawn on the frame, and a single epoch still has a width.
fn epoch_range(records: &[EpochRecord]) -> Range<usize> {
    let lo = records.iter().map(|r| r.epoch).min().unwrap_or(0);
    let hi = records.iter().map(|r| r.epoch).max().unwrap_or(0);
    lo.saturating_sub(1)..hi.saturating_add(1)
}

/// The y axis over the finite points, padded by 5%. Metrics start at zero so
/// that their curves show how far they are from nothing, not just how they
/// wiggle; losses get the tight range that shows convergence.
fn value_range(curves: &[Curve<'_>], from_zero: bool) -> Range<f64> {
    let values = curves.iter().flat_map(|c| c.points.iter().map(|&(_, v)| v));
    let (mut lo, mut hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo > hi {
        // No finite points: any range will do, and 0..1 suits both panels.
        return 0.0..1.0;
    }
    if from_zero {
        lo = lo.min(0.0);
    }
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * 0.05
    } else if hi != 0.0 {
        hi.abs() * 0.1
    } else {
        1.0
    };
    if !(from_zero && lo == 0.0) {
        lo -= pad;
    }
    hi += pad;
    if lo.is_finite() && hi.is_finite() {
        lo..hi
    } else {
        // Values near f64::MAX: a plot of them says nothing anyway, and
        // plotters cannot lay out an infinite axis.
        0.0..1.0
    }
}

/// Registers a font for plot text once per process, and says whether there
/// is one.
fn text_available() -> bool {
    static FONT: OnceLock<Option<PathBuf>> = OnceLock::new();
    FONT.get_or_init(find_font).is_some()
}

fn find_font() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(FONT_ENV).map(PathBuf::from) {
        match register(&path) {
            Ok(()) => return Some(path),
            Err(error) => tracing::warn!(
                path = %path.display(),
                %error,
                "{FONT_ENV} names no usable font; trying system fonts",
            ),
        }
    }
    match register_first(FONT_PATHS.iter().map(PathBuf::from)) {
        Ok(path) => {
            tracing::debug!(path = %path.display(), "plot font registered");
            Some(path)
        }
        Err(tried) => {
            let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
            tracing::warn!(
                tried = %tried.join(", "),
                "no TrueType font found; plots will have curves but no text \
                 (set {FONT_ENV} to a .ttf file)",
            );
            None
        }
    }
}

/// Registers the first usable font among `candidates`, or returns all of
/// them.
fn register_first(candidates: impl IntoIterator<Item = PathBuf>) -> Result<PathBuf, Vec<PathBuf>> {
    let mut tried = vec![];
    for path in candidates {
        if register(&path).is_ok() {
            return Ok(path);
        }
        tried.push(path);
    }
    Err(tried)
}

fn register(path: &Path) -> io::Result<()> {
    let bytes = fs::read(path)?;
    // Check the magic number first: plotters keeps the font bytes for the
    // life of the process, so they are leaked below, and a file that is
    // plainly not a font should not be.
    let magic = bytes.get(..4).unwrap_or(&[]);
    let looks_like_font = [b"\0\x01\0\0", b"OTTO", b"true", b"ttcf"]
        .iter()
        .any(|m| magic == *m);
    let not_a_font = || io::Error::new(io::ErrorKind::InvalidData, "not a TrueType/OpenType font");
    if !looks_like_font {
        return Err(not_a_font());
    }
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font(FONT_FAMILY, FontStyle::Normal, bytes).map_err(|_| not_a_font())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(epoch: usize) -> EpochRecord {
        let e = epoch as f64;
        EpochRecord {
            epoch,
            step: 1000 * epoch as u64,
            lr: 1e-3 / e,
            train_loss: 5.0 / e + 0.1,
            valid_recall10: 0.05 + 0.01 * e,
            valid_ndcg10: 0.03 + 0.005 * e,
            examples_per_sec: 12345.678,
            elapsed_secs: 60.5 * e,
        }
    }

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

    /// Pixels of exactly `color` in an RGB buffer.
    fn count(rgb: &[u8], color: RGBColor) -> usize {
        rgb.chunks_exact(3)
            .filter(|p| p == &[color.0, color.1, color.2])
            .count()
    }

    #[test]
    fn curves_are_drawn_without_a_font() {
        let records: Vec<_> = (1..=8).map(record).collect();
        let rgb = render(&records, "t", false).unwrap();
        assert!(count(&rgb, LOSS_COLOR) > 500);
        assert!(count(&rgb, RECALL_COLOR) > 500);
        assert!(count(&rgb, NDCG_COLOR) > 500);
        // The frame and grid.
        assert!(count(&rgb, BLACK) > 1000);

        let empty = render(&[], "t", false).unwrap();
        assert_eq!(count(&empty, LOSS_COLOR), 0);
    }

    #[test]
    fn nan_and_single_epochs_are_drawn() {
        let mut one = record(1);
        one.valid_recall10 = f64::NAN;
        one.valid_ndcg10 = f64::NAN;
        let rgb = render(&[one.clone()], "t", false).unwrap();
        assert!(count(&rgb, LOSS_COLOR) > 10, "a single epoch shows a point");
        assert_eq!(count(&rgb, RECALL_COLOR), 0);

        // Validation every other epoch: the validated points are joined.
        let records: Vec<_> = (1..=6)
            .map(|e| {
                let mut r = record(e);
                if e % 2 == 1 {
                    r.valid_ndcg10 = f64::NAN;
                    r.train_loss = f64::INFINITY;
                }
                r
            })
            .collect();
        let rgb = render(&records, "t", false).unwrap();
        assert!(count(&rgb, NDCG_COLOR) > 500);
        assert!(count(&rgb, LOSS_COLOR) > 500);
    }

    /// The right half of an RGB buffer: the validation panel.
    fn right_panel(rgb: &[u8]) -> Vec<u8> {
        let row = WIDTH as usize * 3;
        rgb.chunks_exact(row)
            .flat_map(|r| r[row / 2..].iter().copied())
            .collect()
    }

    #[test]
    fn nan_epochs_draw_as_if_absent() {
        // Validation on odd epochs only; the even epochs' NaNs must leave
        // the validation panel exactly as if those epochs were not there.
        let with_nan: Vec<_> = (1..=5)
            .map(|e| {
                let mut r = record(e);
                if e % 2 == 0 {
                    r.valid_recall10 = f64::NAN;
                    r.valid_ndcg10 = f64::NAN;
                }
                r
            })
            .collect();
        let without: Vec<_> = [1, 3, 5].map(record).to_vec();
        let a = render(&with_nan, "t", false).unwrap();
        let b = render(&without, "t", false).unwrap();
        assert!(count(&right_panel(&a), NDCG_COLOR) > 500);
        assert!(right_panel(&a) == right_panel(&b));
    }

    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&bytes[12..16], b"IHDR");
        let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
        (be(&bytes[16..20]), be(&bytes[20..24]))
    }

    #[test]
    fn plot_writes_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<_> = (1..=20).map(record).collect();
        // No `.png` extension: the format must not follow the name.
        let full = dir.path().join("curves.out");
        plot(&records, "TIGER on Beauty, run 7", &full).unwrap();
        let empty = dir.path().join("empty.png");
        plot(&[], "TIGER on Beauty, run 7", &empty).unwrap();

        let full = fs::read(full).unwrap();
        let empty = fs::read(empty).unwrap();
        assert_eq!(png_size(&full), (WIDTH, HEIGHT));
        assert_eq!(png_size(&empty), (WIDTH, HEIGHT));
        assert!(
            full.len() > empty.len() + 2000,
            "curves add detail: {} vs {} bytes",
            full.len(),
            empty.len()
        );
    }

    #[test]
    fn plot_with_nan_validation_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nan.png");
        let mut records: Vec<_> = (1..=3).map(record).collect();
        records[1].valid_recall10 = f64::NAN;
        records[2].valid_ndcg10 = f64::NAN;
        plot(&records, "nan", &path).unwrap();
        assert_eq!(png_size(&fs::read(&path).unwrap()), (WIDTH, HEIGHT));

        let all_nan: Vec<_> = records
            .iter()
            .cloned()
            .map(|mut r| {
                r.valid_recall10 = f64::NAN;
                r.valid_ndcg10 = f64::NAN;
                r
            })
            .collect();
        plot(&all_nan, "no validation yet", &path).unwrap();
    }

    #[test]
    fn plot_into_a_missing_directory_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no/such/dir/curves.png");
        let err = plot(&[record(1)], "t", &path).unwrap_err();
        assert!(err.to_string().contains("no/such/dir/curves.png"), "{err}");
    }

    #[test]
    fn font_lookup_skips_missing_and_non_fonts() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.ttf");
        fs::write(&junk, b"this is not a font file").unwrap();
        let missing = dir.path().join("missing.ttf");
        let err = register(&junk).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let tried = register_first([junk.clone(), missing.clone()]).unwrap_err();
        assert_eq!(tried, vec![junk, missing]);
    }
}
