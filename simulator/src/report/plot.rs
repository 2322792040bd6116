//! Plots, written as SVG and PNG with plotters: the CDF of VM boot completion (one line per run)
//! and the bytes per second over time per link class. Text needs a TrueType font, loaded at run time
//! (Debian's `fonts-dejavu-core` by default, or `$VMSWARM_SIM_FONT`). This module decides only how
//! results look.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::record::RunResult;

/// Default font file (Debian package `fonts-dejavu-core`).
pub const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Errors from drawing plots.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PlotError {
    /// The font could not be read or parsed.
    #[error(
        "cannot load the plot font {path}: {reason} (install Debian's fonts-dejavu-core, or set VMSWARM_SIM_FONT to a .ttf file)"
    )]
    Font {
        /// The font file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Drawing or writing a plot failed.
    #[error("plot {path}: {reason}")]
    Draw {
        /// The output file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

static FONT: OnceLock<Result<(), PlotError>> = OnceLock::new();

/// Loads and registers the font once per process.
pub fn ensure_font() -> Result<(), PlotError> {
    FONT.get_or_init(|| {
        let path = std::env::var_os("VMSWARM_SIM_FONT")
            .map_or_else(|| PathBuf::from(DEFAULT_FONT), PathBuf::from);
        let bytes = std::fs::read(&path).map_err(|e| PlotError::Font {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        // The font table of plotters wants `'static` bytes: the font is loaded once per process and
        // kept for its lifetime.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| {
            PlotError::Font {
                path: path.clone(),
                reason: "not a TrueType/OpenType font".into(),
            }
        })
    })
    .clone()
}

const SIZE: (u32, u32) = (1000, 620);

fn palette(i: usize) -> RGBColor {
    const C: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    C[i % C.len()]
}

/// Writes `<stem>.svg` and `<stem>.png` with `draw`.
fn both<F>(dir: &Path, stem: &str, draw: F) -> Result<(), PlotError>
where
    F: Fn(Backend<'_>) -> Result<(), String>,
{
    ensure_font()?;
    let svg = dir.join(format!("{stem}.svg"));
    let png = dir.join(format!("{stem}.png"));
    let err = |path: &Path| {
        let path = path.to_owned();
        move |reason: String| PlotError::Draw { path, reason }
    };
    {
        let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
        draw(Backend::Svg(root)).map_err(err(&svg))?;
    }
    {
        let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
        draw(Backend::Png(root)).map_err(err(&png))?;
    }
    Ok(())
}

/// A drawing area of either backend.
enum Backend<'a> {
    Svg(DrawingArea<SVGBackend<'a>, Shift>),
    Png(DrawingArea<BitMapBackend<'a>, Shift>),
}

/// One line of a plot.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

fn draw_lines<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    y_max: f64,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let x_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.03;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(e)?;
    for (i, s) in series.iter().enumerate() {
        let color = palette(i);
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(e)?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

fn render(
    b: Backend<'_>,
    title: &str,
    xl: &str,
    yl: &str,
    s: &[Series],
    ymax: f64,
) -> Result<(), String> {
    match b {
        Backend::Svg(root) => draw_lines(&root, title, xl, yl, s, ymax),
        Backend::Png(root) => draw_lines(&root, title, xl, yl, s, ymax),
    }
}

/// Boot completion CDF of each run (x: seconds since the VM started; y: fraction booted).
pub fn boot_cdf(dir: &Path, stem: &str, title: &str, runs: &[&RunResult]) -> Result<(), PlotError> {
    let series: Vec<Series> = runs
        .iter()
        .map(|r| {
            let mut t: Vec<f64> = r.vms.iter().filter_map(|v| v.boot_s()).collect();
            t.sort_by(f64::total_cmp);
            let n = r.vms.len().max(1) as f64;
            let mut points = vec![(0.0, 0.0)];
            for (i, x) in t.iter().enumerate() {
                points.push((*x, i as f64 / n));
                points.push((*x, (i + 1) as f64 / n));
            }
            Series {
                name: r.label.clone(),
                points,
            }
        })
        .collect();
    both(dir, stem, |b| {
        render(
            b,
            title,
            "boot time (s, from VM start)",
            "fraction of VMs booted",
            &series,
            1.02,
        )
    })
}

/// Gbit/s over time per link class of one run.
pub fn bytes_over_time(dir: &Path, stem: &str, r: &RunResult) -> Result<(), PlotError> {
    const MAX_POINTS: usize = 400;
    let classes = ["source_up", "host_up", "wan_up"];
    let mut series = Vec::new();
    let mut y_max = 0.0f64;
    for (name, bins) in &r.series {
        if !classes.contains(&name.as_str()) || bins.iter().all(|b| *b == 0.0) {
            continue;
        }
        let group = bins.len().div_ceil(MAX_POINTS).max(1);
        let width = r.series_bin_s * group as f64;
        let mut points = Vec::new();
        for (i, chunk) in bins.chunks(group).enumerate() {
            let gbps = chunk.iter().sum::<f64>() * 8.0 / 1e9 / width;
            y_max = y_max.max(gbps);
            points.push((i as f64 * width, gbps));
            points.push(((i + 1) as f64 * width, gbps));
        }
        series.push(Series {
            name: name.clone(),
            points,
        });
    }
    let title = format!("{}: throughput per link class", r.label);
    both(dir, stem, |b| {
        render(
            b,
            &title,
            "simulated time (s)",
            "Gbit/s (sum over links of the class)",
            &series,
            (y_max * 1.1).max(1e-3),
        )
    })
}
