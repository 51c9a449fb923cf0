//! palisade's benchmark suite: datapath cost per packet, throughput and
//! latency between containers against iptables, control-plane latency,
//! memory. Writes a Markdown report (`docs/BENCHMARKS.md` by default).
//! Run it through `bench/run`, which builds release binaries first.

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark that cannot measure stops with the reason"
)]

mod change;
mod cluster;
mod console;
mod control;
mod datapath;
mod dns;
mod etcd;
mod l7;
mod stats;
mod traffic;

use std::{fmt::Write, path::PathBuf, process::Command, time::Instant};

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Datapath,
    Traffic,
    Control,
    /// Service traffic: through a ClusterIP vs direct, and pal_service's cost.
    Services,
    /// Only the cost of one change (part of control).
    Change,
    /// Kubernetes cluster mode at cluster scale.
    Cluster,
    /// DNS-aware egress: the DNS proxy's latency, answer to datapath.
    Dns,
    /// Hosts without Kubernetes sharing etcd: apply to every host's verdict.
    Etcd,
    /// L7: HTTP and gRPC through the node's proxy vs direct.
    L7,
    /// The web console: connection to edge, page load, CPU per client.
    Console,
}

/// Measure palisade and write the report.
#[derive(Debug, Parser)]
#[command(name = "palisade-bench")]
struct Opts {
    /// Small sizes and few repetitions, for CI: checks that every
    /// measurement yields a number (the figures themselves mean little).
    #[arg(long)]
    short: bool,
    /// Where to write the Markdown report.
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    out: PathBuf,
    /// Repetitions of every measurement (default: 5, or 1 with --short).
    #[arg(long)]
    reps: Option<usize>,
    /// Run only these parts (repeatable; default: all).
    #[arg(long, value_enum)]
    only: Vec<Part>,
    /// Sizes for the cost of one change, as POLICIESxENDPOINTS (repeatable;
    /// default: 100, 1000 and 10000 of each).
    #[arg(long, value_parser = parse_size)]
    size: Vec<(usize, usize)>,
    /// The command line to print in the report as the way to reproduce it.
    #[arg(long, default_value = "bench/run")]
    command: String,
}

/// Settings every part reads.
#[derive(Debug)]
pub struct Config {
    pub short: bool,
    pub reps: usize,
    /// Sizes for the cost of one change (empty: the defaults).
    pub sizes: Vec<(usize, usize)>,
}

fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let (p, e) = s
        .split_once('x')
        .ok_or_else(|| format!("{s:?} is not POLICIESxENDPOINTS (e.g. 10000x1000)"))?;
    Ok((
        p.parse().map_err(|e| format!("{p:?}: {e}"))?,
        e.parse().map_err(|e| format!("{e:?}: {e}"))?,
    ))
}

#[derive(Debug)]
struct Target {
    name: String,
    measured: String,
    met: bool,
    /// What keeps the figure from the target (said when it is missed).
    limit: String,
}

/// What the parts found.
#[derive(Debug, Default)]
pub struct Report {
    sections: Vec<(String, String)>,
    measured: Vec<(String, Option<f64>)>,
    targets: Vec<Target>,
}

impl Report {
    pub fn section(&mut self, title: &str, body: String) {
        self.sections.push((title.to_owned(), body));
    }

    /// Record one headline figure (`None`: the measurement produced none).
    pub fn measured(&mut self, what: &str, value: Option<f64>) {
        self.measured.push((what.to_owned(), value));
    }

    pub fn target(&mut self, name: &str, measured: &str, met: bool, limit: &str) {
        self.targets.push(Target {
            name: name.to_owned(),
            measured: measured.to_owned(),
            met,
            limit: limit.to_owned(),
        });
    }
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".into(), |(_, m)| m.trim().to_owned());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mem_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map_or("unknown".into(), |v| v.trim_matches('"').to_owned());
    let iperf = sh("iperf3", &["--version"]);
    let iperf = iperf.lines().next().unwrap_or("unknown");
    let ipt = sh("iptables-nft", &["--version"]);
    let commit = sh("git", &["rev-parse", "--short", "HEAD"]);
    format!(
        "| | |\n|---|---|\n\
         | CPU | {model}, {cores} logical cores |\n\
         | memory | {:.1} GiB |\n\
         | OS | {os} |\n\
         | kernel | {} |\n\
         | iperf3 | {iperf} |\n\
         | iptables | {ipt} |\n\
         | palisade | commit {commit}, {} build |\n\
         | date | {} |\n",
        mem_kb as f64 / 1048576.0,
        sh("uname", &["-r"]),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
    )
}

fn main() {
    let opts = Opts::parse();
    let cfg = Config {
        short: opts.short,
        reps: opts.reps.unwrap_or(if opts.short { 1 } else { 5 }).max(1),
        sizes: opts.size.clone(),
    };
    let parts = if opts.only.is_empty() {
        vec![
            Part::Datapath,
            Part::Traffic,
            Part::Services,
            Part::Control,
            Part::Cluster,
            Part::Dns,
            Part::Etcd,
            Part::L7,
            Part::Console,
        ]
    } else {
        opts.only.clone()
    };
    let start = Instant::now();
    let mut report = Report::default();
    for part in &parts {
        eprintln!("==> {part:?}");
        match part {
            Part::Datapath => datapath::run(&cfg, &mut report),
            Part::Traffic => traffic::run(&cfg, &mut report),
            Part::Services => traffic::run_services(&cfg, &mut report),
            Part::Control => control::run(&cfg, &mut report),
            Part::Cluster => cluster::run(&cfg, &mut report),
            Part::Dns => dns::run(&cfg, &mut report),
            Part::Etcd => etcd::run(&cfg, &mut report),
            Part::L7 => l7::run(&cfg, &mut report),
            Part::Console => console::run(&cfg, &mut report),
            Part::Change => {
                let s = change::run(&cfg, &mut report);
                report.section("Control plane", s);
            }
        }
    }

    let mut doc = String::new();
    let _ = writeln!(doc, "# palisade benchmarks\n");
    let _ = writeln!(
        doc,
        "Written by `{}`{} in {:.0} s. Every comparison below was measured in this same run, \
         interleaved, and is stated as a ratio to its baseline: absolute figures drift between \
         machines and runs, ratios much less.\n",
        opts.command.trim(),
        if cfg.short {
            " (short mode: small sizes, one repetition; the figures only show that every \
             measurement works)"
        } else {
            ""
        },
        start.elapsed().as_secs_f64()
    );
    let _ = writeln!(doc, "## Machine\n\n{}", machine());
    if !report.targets.is_empty() {
        let _ = writeln!(doc, "## Targets\n");
        let mut t = stats::Table::new(&["target", "measured", "met"]);
        for tg in &report.targets {
            t.row(vec![
                tg.name.clone(),
                tg.measured.clone(),
                if tg.met {
                    "yes".into()
                } else {
                    "**missed**".into()
                },
            ]);
        }
        doc.push_str(&t.render());
        doc.push('\n');
        let mut seen = Vec::new();
        for tg in report
            .targets
            .iter()
            .filter(|t| !t.met && !t.limit.is_empty())
        {
            if seen.contains(&&tg.limit) {
                continue;
            }
            seen.push(&tg.limit);
            let _ = writeln!(doc, "- **Missed: {}.** {}", tg.name, tg.limit);
        }
        if !seen.is_empty() {
            doc.push('\n');
        }
    }
    for (title, body) in &report.sections {
        let _ = writeln!(doc, "## {title}\n\n{body}");
    }
    if let Some(dir) = opts.out.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&opts.out, &doc).unwrap();
    eprintln!("wrote {}", opts.out.display());

    let missing: Vec<&str> = report
        .measured
        .iter()
        .filter(|(_, v)| !v.is_some_and(f64::is_finite))
        .map(|(w, _)| w.as_str())
        .collect();
    if !missing.is_empty() {
        eprintln!("error: these measurements produced no number:");
        for m in &missing {
            eprintln!("  {m}");
        }
        std::process::exit(1);
    }
    eprintln!("{} measurements, all numbers", report.measured.len());
}
