//! `flows`, `learn` and `graph`: reading flow records from the agent's log,
//! or straight from the kernel's ring buffer when no agent runs.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use palisade::{
    dataplane::events::EventReader,
    flows::{self, Filter, FlowRecord, Resolver, Tail},
    graph,
    store::Store,
};

use crate::output::emit;

/// The agent's pid file in the state directory.
pub fn pid_file(state_dir: &Path) -> PathBuf {
    state_dir.join("agent.pid")
}

/// The flow log directory in the state directory.
pub fn log_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("flows")
}

/// Whether a palisade agent is running (and so owns the ring buffer).
pub fn agent_running(state_dir: &Path) -> bool {
    let Ok(pid) = std::fs::read_to_string(pid_file(state_dir)) else {
        return false;
    };
    let pid = pid.trim();
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        let c = String::from_utf8_lossy(&c);
        c.contains("agent") || c.contains("daemon")
    })
}

/// Where flow records come from.
pub enum Source {
    Log(PathBuf),
    Kernel {
        reader: Box<EventReader>,
        store: Store,
    },
}

impl Source {
    /// The agent's log when an agent runs, else the ring buffer.
    pub fn open(state_dir: &Path, bpf_root: &Path, quiet: bool) -> Result<Self> {
        if agent_running(state_dir) {
            return Ok(Self::Log(log_dir(state_dir)));
        }
        let reader = EventReader::open(bpf_root).context(
            "no agent is running and the datapath's event ring buffer cannot be opened \
             (no container has been added yet?)",
        )?;
        if !quiet {
            eprintln!(
                "note: no palisade agent is running: showing events buffered in the kernel since they were last read; \
                 run `palisadectl agent` to keep a flow log"
            );
        }
        Ok(Self::Kernel {
            reader: Box::new(reader),
            store: Store::new(state_dir),
        })
    }

    /// What is there now.
    pub fn read_now(&mut self) -> Result<Vec<FlowRecord>> {
        match self {
            Self::Log(dir) => Ok(flows::read_log(dir)),
            Self::Kernel { reader, store } => {
                let resolver = Resolver::new(&store.read_names()?);
                Ok(reader
                    .drain()
                    .iter()
                    .map(|e| resolver.resolve(e, reader.wall_time(e.ts_ns)))
                    .collect())
            }
        }
    }
}

/// Follow new records until `until` (or forever), calling `f` for each.
pub fn follow(
    src: &mut Source,
    until: Option<Instant>,
    mut f: impl FnMut(&FlowRecord) -> Result<()>,
) -> Result<()> {
    let mut tail = match src {
        Source::Log(dir) => Some(Tail::at_end(dir)),
        Source::Kernel { .. } => None,
    };
    loop {
        if until.is_some_and(|u| Instant::now() >= u) {
            return Ok(());
        }
        let batch = match (&mut tail, &mut *src) {
            (Some(t), _) => {
                std::thread::sleep(Duration::from_millis(200));
                t.poll()
            }
            (None, Source::Kernel { reader, .. }) => {
                reader.wait(Duration::from_millis(200));
                src.read_now()?
            }
            (None, Source::Log(_)) => Vec::new(),
        };
        for r in &batch {
            f(r)?;
        }
    }
}

fn row(r: &FlowRecord) -> String {
    let time = r.time.get(11..23).unwrap_or(&r.time);
    let port = if r.dport == 0 {
        "-".to_owned()
    } else {
        r.dport.to_string()
    };
    format!(
        "{time}\t{}\t{}\t{}\t{}\t{port}\t{} {}\t{}\n",
        r.verdict,
        r.client().display(),
        r.server().display(),
        r.protocol,
        r.direction,
        r.endpoint.display(),
        r.decided_by()
    )
}

const HEADER: &str = "TIME\tVERDICT\tFROM\tTO\tPROTO\tPORT\tSEEN AT\tDECIDED BY\n";

fn print_batch(records: &[&FlowRecord], json: bool, header: bool) -> Result<()> {
    if json {
        let mut out = String::new();
        for r in records {
            out.push_str(&serde_json::to_string(r)?);
            out.push('\n');
        }
        return emit(&out);
    }
    let mut tw = tabwriter::TabWriter::new(Vec::new()).padding(2);
    if header {
        tw.write_all(HEADER.as_bytes())?;
    }
    for r in records {
        tw.write_all(row(r).as_bytes())?;
    }
    tw.flush()?;
    emit(&String::from_utf8_lossy(
        &tw.into_inner().context("format table")?,
    ))
}

/// `palisadectl flows`.
pub fn flows(
    state_dir: &Path,
    bpf_root: &Path,
    filter: &Filter,
    follow_: bool,
    tail: Option<usize>,
    json: bool,
) -> Result<()> {
    let mut src = Source::open(state_dir, bpf_root, json)?;
    let now = src.read_now()?;
    let mut shown: Vec<&FlowRecord> = now.iter().filter(|r| filter.matches(r)).collect();
    if let Some(n) = tail {
        let skip = shown.len().saturating_sub(n);
        shown.drain(..skip);
    }
    print_batch(&shown, json, true)?;
    if follow_ {
        follow(&mut src, None, |r| {
            if filter.matches(r) {
                print_batch(&[r], json, false)?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// Records to learn from or draw: a log directory, live for a while, or
/// the agent's log.
pub fn collect(
    state_dir: &Path,
    bpf_root: &Path,
    log: Option<&Path>,
    duration: Option<Duration>,
) -> Result<Vec<FlowRecord>> {
    if let Some(d) = duration {
        let mut src = Source::open(state_dir, bpf_root, false)?;
        let mut all = Vec::new();
        eprintln!("collecting flows for {}...", humantime::format_duration(d));
        follow(&mut src, Some(Instant::now() + d), |r| {
            all.push(r.clone());
            Ok(())
        })?;
        return Ok(all);
    }
    let dir = log.map_or_else(|| log_dir(state_dir), Path::to_path_buf);
    let records = flows::read_log(&dir);
    if records.is_empty() {
        bail!(
            "no flow records in {}: run `palisadectl agent` while traffic flows, or use --duration to watch live",
            dir.display()
        );
    }
    Ok(records)
}

/// Render DOT with Graphviz into `format` (svg, png, ...).
fn render_bytes(dot: &str, format: &str) -> Result<Vec<u8>> {
    let mut child = Command::new("dot")
        .arg(format!("-T{format}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run Graphviz `dot` (Debian: apt-get install graphviz)")?;
    child
        .stdin
        .take()
        .context("dot's stdin")?
        .write_all(dot.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("dot failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

/// Render DOT with Graphviz into a text format (svg).
pub fn render(dot: &str, format: &str) -> Result<String> {
    Ok(String::from_utf8_lossy(&render_bytes(dot, format)?).into_owned())
}

/// `palisadectl graph`.
pub fn graph(records: &[FlowRecord], format: &str) -> Result<Vec<u8>> {
    let (dot, summary) = graph::dot(records);
    Ok(match format {
        "dot" => dot.into_bytes(),
        "svg" => render(&dot, "svg")?.into_bytes(),
        "png" => render_bytes(&dot, "png")?,
        _ => graph::html(&render(&dot, "svg")?, "palisade traffic map", &summary).into_bytes(),
    })
}
