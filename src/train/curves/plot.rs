//! [`plot`] draws the curves with `plotters` in pure Rust, encoding the PNG
//! itself. Training runs on fresh cloud machines and in minimal containers,
//! where the usual system libraries for text (fontconfig, freetype) are
//! absent, and a plot is not worth failing a build or a run over. Text is
//! rendered from a TrueType file found at run time (see [`FONT_ENV`]); with
//! none, the curves are drawn anyway, unlabelled.

use std::error::Error as StdError;
use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::{CurvesError, EpochRecord};
use plotters::backend::BitMapBackend;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::register_font;

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
    use super::super::record;
    use super::*;

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
