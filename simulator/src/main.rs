//! `vmswarm-sim` command line: run one scenario, compare several, or check scenario files.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant as WallClock;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use vmswarm_sim::record::RunResult;
use vmswarm_sim::report::{self, Summary};
use vmswarm_sim::scenario::{Scenario, Strategy};
use vmswarm_sim::world::{self, Progress};

/// Discrete-event simulator of vmswarm image distribution.
#[derive(Debug, Parser)]
#[command(name = "vmswarm-sim", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one scenario and write its reports and plots into --out.
    Run {
        /// The scenario file (TOML).
        scenario: PathBuf,
        /// Seed of every random choice.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Override the scenario's strategy.
        #[arg(long)]
        strategy: Option<String>,
        /// Override a scenario field: KEY=VALUE with a dotted key (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Do not draw plots.
        #[arg(long)]
        no_plots: bool,
    },
    /// Run several scenarios (times strategies, times sweep values) and compare them.
    Compare {
        /// Scenario files (TOML).
        #[arg(required = true)]
        scenarios: Vec<PathBuf>,
        /// Seed of every random choice.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Output directory (one subdirectory per run, plus the comparison).
        #[arg(long)]
        out: PathBuf,
        /// Run each scenario with each of these strategies (comma-separated) instead of its own.
        #[arg(long, value_delimiter = ',')]
        strategies: Vec<String>,
        /// Run each with each value of one field: KEY=V1,V2,... (values are TOML or plain text).
        #[arg(long, value_name = "KEY=V1,V2,...")]
        sweep: Option<String>,
        /// Override a scenario field in every run: KEY=VALUE (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Do not draw plots.
        #[arg(long)]
        no_plots: bool,
    },
    /// Check scenario files without running them.
    Check {
        /// Scenario files (TOML).
        #[arg(required = true)]
        scenarios: Vec<PathBuf>,
    },
}

fn parse_strategy(s: &str) -> Result<Strategy> {
    Strategy::from_name(s.trim()).with_context(|| {
        let names: Vec<&str> = Strategy::ALL.iter().map(|s| s.name()).collect();
        format!("unknown strategy {s:?} (strategies: {})", names.join(", "))
    })
}

/// One run to do.
struct Job {
    path: PathBuf,
    strategy: Option<Strategy>,
    overrides: Vec<String>,
    label_extra: Option<String>,
}

fn load(job: &Job) -> Result<Scenario> {
    let mut sc = Scenario::load(&job.path, &job.overrides)?;
    if let Some(s) = job.strategy {
        sc.strategy = s;
    }
    Ok(sc)
}

fn label(sc: &Scenario, extra: &Option<String>) -> String {
    match extra {
        Some(e) => format!("{} {} {e}", sc.name, sc.strategy.name()),
        None => format!("{} {}", sc.name, sc.strategy.name()),
    }
}

fn dir_name(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn simulate(sc: Scenario, seed: u64, label: String) -> Result<RunResult> {
    let tty = std::io::stderr().is_terminal();
    let wall = WallClock::now();
    let mut calls = 0u64;
    let name = label.clone();
    let mut progress = |p: &Progress| {
        calls += 1;
        let line = format!(
            "[{name}] t={:.1}s events={} booted {}/{} targets {}/{} flows {}",
            p.now_s, p.events, p.vms_booted, p.vms, p.hosts_done, p.hosts_with_target, p.flows
        );
        if tty {
            eprint!("\r{line}\x1b[K");
        } else if calls % 32 == 0 {
            eprintln!("{line}");
        }
    };
    let result = world::run(sc, seed, label, &mut progress)?;
    let secs = wall.elapsed().as_secs_f64();
    if tty {
        eprintln!();
    }
    eprintln!(
        "[{name}] done: {} events in {:.2} s of wall time ({:.0} events/s), {:.1} s simulated",
        result.counters.events,
        secs,
        result.counters.events as f64 / secs.max(1e-9),
        result.counters.end_s
    );
    Ok(result)
}

/// Exit code 3 if a built-in check failed (the reports are written anyway).
fn exit_for(summaries: &[Summary]) -> ExitCode {
    let mut ok = true;
    for s in summaries {
        for p in &s.checks.problems {
            eprintln!("vmswarm-sim: check failed in {}: {p}", s.label);
            ok = false;
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmswarm-sim: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn real_main() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { scenarios } => {
            for path in scenarios {
                let sc = Scenario::load(&path, &[])?;
                println!(
                    "{}: ok ({} {}, {} sites, {} hosts, {} VMs, {} chunks of {} bytes)",
                    path.display(),
                    sc.name,
                    sc.strategy.name(),
                    sc.sites.len(),
                    sc.host_count(),
                    sc.vm_count(),
                    sc.chunk_count(),
                    sc.chunk_size
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            scenario,
            seed,
            out,
            strategy,
            set,
            no_plots,
        } => {
            let job = Job {
                path: scenario,
                strategy: strategy.as_deref().map(parse_strategy).transpose()?,
                overrides: set,
                label_extra: None,
            };
            let sc = load(&job)?;
            let name = label(&sc, &job.label_extra);
            let result = simulate(sc, seed, name)?;
            let summary = report::write_run(&out, &result, !no_plots)?;
            print!("{}", report::summary_text(&summary));
            println!("reports written to {}", out.display());
            Ok(exit_for(&[summary]))
        }
        Command::Compare {
            scenarios,
            seed,
            out,
            strategies,
            sweep,
            set,
            no_plots,
        } => {
            let strategies: Vec<Option<Strategy>> = if strategies.is_empty() {
                vec![None]
            } else {
                strategies
                    .iter()
                    .map(|s| parse_strategy(s).map(Some))
                    .collect::<Result<_>>()?
            };
            let sweep: Vec<Option<String>> = match &sweep {
                None => vec![None],
                Some(spec) => {
                    let Some((key, values)) = spec.split_once('=') else {
                        bail!("--sweep {spec:?}: expected KEY=V1,V2,...");
                    };
                    values
                        .split(',')
                        .map(|v| Some(format!("{}={}", key.trim(), v.trim())))
                        .collect()
                }
            };
            let mut jobs = Vec::new();
            for path in &scenarios {
                for st in &strategies {
                    for sw in &sweep {
                        let mut overrides = set.clone();
                        overrides.extend(sw.clone());
                        jobs.push(Job {
                            path: path.clone(),
                            strategy: *st,
                            overrides,
                            label_extra: sw.clone(),
                        });
                    }
                }
            }
            // Check every scenario before running any.
            let loaded: Vec<Scenario> = jobs.iter().map(load).collect::<Result<_>>()?;
            let mut results = Vec::new();
            let mut summaries = Vec::new();
            for (job, sc) in jobs.iter().zip(loaded) {
                let name = label(&sc, &job.label_extra);
                let result = simulate(sc, seed, name.clone())?;
                let s = report::write_run(&out.join(dir_name(&name)), &result, !no_plots)?;
                print!("{}", report::summary_text(&s));
                summaries.push(s);
                results.push(result);
            }
            let refs: Vec<&RunResult> = results.iter().collect();
            report::write_compare(&out, &refs, &summaries, !no_plots)?;
            println!();
            print!("{}", report::compare_table(&summaries));
            println!("reports written to {}", out.display());
            Ok(exit_for(&summaries))
        }
    }
}
