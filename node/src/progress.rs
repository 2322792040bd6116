//! What `vmswarm pull` and `vmswarm stage` show on stderr while they run.
//!
//! On a terminal: a bar with the chunks done, the bytes moved, the rate and the estimated time
//! left. Anywhere else (a log file, a pipe, a test): plain lines with the same figures, at most one
//! every [`LINE_EVERY`] and none before it (a command that ends sooner prints nothing), so logs stay
//! readable and nothing parses a bar's escape codes.
//!
//! The rate is the command's bytes over its elapsed time. The estimate is the chunks still to go
//! at the chunk rate seen so far; chunks held before the first report (a resumed pull, targets that
//! already held part of the image) do not count towards that rate.

use std::cell::RefCell;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Least time between two plain progress lines (and before the first).
pub const LINE_EVERY: Duration = Duration::from_secs(2);

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// A redrawn bar (stderr is a terminal).
    Bar,
    /// Plain lines at most every [`LINE_EVERY`].
    Lines,
    /// Plain lines only when the caller prints one ([`Progress::println`]), with the figures
    /// appended: for commands whose daemon already sends periodic lines (`stage`).
    Annotate,
}

/// One command's progress display. Methods take `&self`, so both of a control call's callbacks
/// (progress and lines) can use it.
#[derive(Debug)]
pub struct Progress {
    /// Names the command in plain lines (`pull`, `stage`).
    what: &'static str,
    /// What the bytes are (`fetched`, `uploaded`).
    bytes_label: &'static str,
    style: Style,
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    state: RefCell<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Chunks done at the first report.
    first_done: Option<u64>,
    /// The latest report.
    last: Option<Sample>,
    /// When the last plain line was printed.
    last_line: Option<Instant>,
    /// A report arrived since the last line from the daemon ([`Style::Annotate`] appends the
    /// figures only to the line that follows a report: the daemon's periodic summary).
    fresh: bool,
}

/// One progress report from the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Chunks done (held).
    pub done: u64,
    /// Chunks in all.
    pub total: u64,
    /// Bytes this command moved so far.
    pub bytes: u64,
}

impl Progress {
    /// A display for command `what` whose bytes are `bytes_label` and whose chunks are `unit`
    /// (`chunks`, `chunks held`): a bar if stderr is a terminal, else `plain` ([`Style::Lines`] or
    /// [`Style::Annotate`]).
    pub fn new(
        what: &'static str,
        bytes_label: &'static str,
        unit: &str,
        plain: Style,
    ) -> Progress {
        let style = if std::io::stderr().is_terminal() {
            Style::Bar
        } else {
            plain
        };
        Progress::with_style(what, bytes_label, unit, style)
    }

    /// As [`Progress::new`] with the style given.
    pub fn with_style(
        what: &'static str,
        bytes_label: &'static str,
        unit: &str,
        style: Style,
    ) -> Progress {
        let bar = (style == Style::Bar).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            let template = format!(
                "{{spinner}} [{{elapsed_precise}}] {{bar:40}} {{pos}}/{{len}} {unit} {{msg}}"
            );
            bar.set_style(
                indicatif::ProgressStyle::with_template(&template)
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            what,
            bytes_label,
            style,
            bar,
            started: Instant::now(),
            state: RefCell::new(State::default()),
        }
    }

    /// Takes a report from the daemon.
    pub fn update(&self, done: u64, total: u64, bytes: u64) {
        let now = Instant::now();
        let sample = Sample { done, total, bytes };
        let mut st = self.state.borrow_mut();
        let first_done = *st.first_done.get_or_insert(done);
        st.last = Some(sample);
        st.fresh = true;
        let elapsed = now.saturating_duration_since(self.started);
        match self.style {
            Style::Bar => {
                if let Some(bar) = &self.bar {
                    bar.set_length(total);
                    bar.set_position(done);
                    bar.set_message(figures(sample, first_done, elapsed, self.bytes_label));
                }
            }
            Style::Lines => {
                let due = st.last_line.map_or(elapsed >= LINE_EVERY, |t| {
                    now.saturating_duration_since(t) >= LINE_EVERY
                });
                if due {
                    st.last_line = Some(now);
                    eprintln!(
                        "{}: {}",
                        self.what,
                        line(sample, first_done, elapsed, self.bytes_label)
                    );
                }
            }
            Style::Annotate => {}
        }
    }

    /// Prints a line from the daemon: above the bar, or as a plain line (in [`Style::Annotate`]
    /// with the figures of a report that came just before it appended).
    pub fn println(&self, text: &str) {
        match (&self.bar, self.style) {
            (Some(bar), _) => bar.println(text),
            (None, Style::Annotate) => {
                let mut st = self.state.borrow_mut();
                let fresh = std::mem::take(&mut st.fresh);
                match (st.last, st.first_done) {
                    (Some(sample), Some(first_done)) if fresh => eprintln!(
                        "{text}; {}",
                        figures(sample, first_done, self.started.elapsed(), self.bytes_label)
                    ),
                    _ => eprintln!("{text}"),
                }
            }
            (None, _) => eprintln!("{text}"),
        }
    }

    /// Removes the bar (plain lines stay as printed).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `30.0 MiB fetched, 12.3 MiB/s, ETA 2m 35s` (no ETA until a chunk rate is known; `done` when
/// every chunk is there).
pub fn figures(sample: Sample, first_done: u64, elapsed: Duration, bytes_label: &str) -> String {
    let mib = sample.bytes as f64 / 1_048_576.0;
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { mib / secs } else { 0.0 };
    let eta = if sample.total > 0 && sample.done >= sample.total {
        "done".to_owned()
    } else {
        match eta(sample, first_done, elapsed) {
            Some(d) => format!("ETA {}", format_duration(d)),
            None => "ETA ?".to_owned(),
        }
    };
    format!("{mib:.1} MiB {bytes_label}, {rate:.1} MiB/s, {eta}")
}

/// A plain line: `1200/6144 chunks (19.5%), 30.0 MiB fetched, 12.3 MiB/s, ETA 2m 35s`.
pub fn line(sample: Sample, first_done: u64, elapsed: Duration, bytes_label: &str) -> String {
    let pct = if sample.total > 0 {
        sample.done as f64 * 100.0 / sample.total as f64
    } else {
        0.0
    };
    format!(
        "{}/{} chunks ({pct:.1}%), {}",
        sample.done,
        sample.total,
        figures(sample, first_done, elapsed, bytes_label)
    )
}

/// Time left: the chunks to go at the chunk rate since the first report; `None` before any chunk
/// arrived.
pub fn eta(sample: Sample, first_done: u64, elapsed: Duration) -> Option<Duration> {
    let moved = sample.done.checked_sub(first_done).filter(|&n| n > 0)?;
    let left = sample.total.saturating_sub(sample.done);
    let secs = elapsed.as_secs_f64() * left as f64 / moved as f64;
    Duration::try_from_secs_f64(secs).ok()
}

/// `45s`, `2m 05s`, `1h 02m`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs() + u64::from(d.subsec_millis() >= 500);
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{}h {:02}m", s / 3600, (s % 3600) / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(format_duration(Duration::from_millis(400)), "0s");
        assert_eq!(format_duration(Duration::from_secs(45)), "45s");
        assert_eq!(format_duration(Duration::from_secs(125)), "2m 05s");
        assert_eq!(format_duration(Duration::from_secs(3720)), "1h 02m");
    }

    #[test]
    fn eta_counts_only_chunks_moved_by_this_command() {
        let s = Sample {
            done: 600,
            total: 1000,
            bytes: 0,
        };
        // 100 chunks held at the start, 500 moved in 10 s: 400 left take 8 s.
        assert_eq!(
            eta(s, 100, Duration::from_secs(10)),
            Some(Duration::from_secs(8))
        );
        assert_eq!(eta(s, 600, Duration::from_secs(10)), None);
    }

    #[test]
    fn lines_carry_rate_and_eta() {
        let s = Sample {
            done: 500,
            total: 1000,
            bytes: 100 << 20,
        };
        assert_eq!(
            line(s, 0, Duration::from_secs(10), "fetched"),
            "500/1000 chunks (50.0%), 100.0 MiB fetched, 10.0 MiB/s, ETA 10s"
        );
        let done = Sample { done: 1000, ..s };
        assert!(figures(done, 0, Duration::from_secs(20), "uploaded").ends_with("done"));
        let start = Sample { done: 0, ..s };
        assert!(figures(start, 0, Duration::ZERO, "fetched").ends_with("ETA ?"));
    }
}
