//! `palisadectl daemon`: the node daemon. It takes the daemon lock of the
//! state directory (one daemon per node), rebuilds the engine from the
//! store and reconciles the kernel maps, serves the engine on the socket,
//! and runs the agent (flow log, metrics) in the same process.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::fcntl::{Flock, FlockArg};
use palisade::daemon::{self, Server};

use crate::agent;

/// How often orphaned link pins are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(300);

/// Hold the daemon lock of a state directory, or say who holds it.
fn lock(state_dir: &Path) -> Result<Flock<File>> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("create {}", state_dir.display()))?;
    let path = state_dir.join("daemon.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    let mut held = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((mut f, nix::Error::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _unknown = f.read_to_string(&mut pid);
            bail!(
                "another palisade daemon (pid {}) serves {} already",
                pid.trim(),
                state_dir.display()
            );
        }
        Err((_, e)) => return Err(e).with_context(|| format!("lock {}", path.display())),
    };
    held.set_len(0)?;
    held.rewind()?;
    write!(held, "{}", std::process::id())?;
    Ok(held)
}

/// Run until killed.
pub fn run(
    mut opts: agent::Options,
    socket: PathBuf,
    cluster: Option<crate::cluster::Options>,
    etcd: Option<crate::etcd::DaemonOptions>,
    dns: Option<palisade::dnsproxy::Options>,
    l7: Option<crate::l7::Options>,
    console: Option<crate::console::Options>,
) -> Result<()> {
    let _lock = lock(&opts.state_dir)?;
    let start = Instant::now();
    let (server, report) =
        Server::start(&opts.state_dir, &opts.bpf_root, opts.map_sizes.clone())
            .context("start: build the engine from the store and reconcile the maps")?;
    eprintln!(
        "palisade daemon: engine built and maps reconciled in {} ms ({} entries written, {} removed, epoch {})",
        start.elapsed().as_millis(),
        report.upserted,
        report.deleted,
        report.epoch
    );
    let listener =
        daemon::bind(&socket).with_context(|| format!("listen on {}", socket.display()))?;
    eprintln!("palisade daemon: serving {}", socket.display());
    {
        let server = Arc::clone(&server);
        thread::spawn(move || {
            if let Err(e) = server.serve(listener) {
                eprintln!("palisade daemon: the socket failed: {e}");
                std::process::exit(1);
            }
        });
    }
    {
        let server = Arc::clone(&server);
        thread::spawn(move || {
            loop {
                thread::sleep(SWEEP_EVERY);
                server.sweep();
            }
        });
    }
    match (cluster, etcd) {
        (Some(c), _) => {
            opts.cluster = Some(
                crate::cluster::start(Arc::clone(&server), c)
                    .context("start Kubernetes cluster mode")?,
            );
        }
        (None, Some(e)) => {
            eprintln!(
                "palisade daemon: objects from {} (host {})",
                e.settings.describe(),
                e.node_name
            );
            crate::etcd::start(Arc::clone(&server), e).context("start the etcd datastore")?;
        }
        (None, None) => server
            .leave_cluster()
            .context("record that this node is not in cluster mode")?,
    }
    if let Some(o) = l7 {
        let records = crate::l7::Records::default();
        // Without the proxy, L7 connections are dropped (fail closed).
        match crate::l7::start(Arc::clone(&server), o, Arc::clone(&records)) {
            Ok(()) => opts.http_records = Some(records),
            Err(e) => eprintln!("palisade daemon: no L7 proxy: {e:#}"),
        }
    }
    if let Some(d) = dns {
        let records = crate::dns::Records::default();
        // Without the proxy, redirected DNS is dropped (fail closed) and
        // everything else works: the daemon carries on.
        match crate::dns::start(Arc::clone(&server), d, Arc::clone(&records)) {
            Ok(()) => opts.dns_records = Some(records),
            Err(e) => eprintln!("palisade daemon: no DNS proxy: {e:#}"),
        }
    }
    match console {
        Some(c) => {
            let feed = Arc::new(crate::console::Feed::new(c.max_records));
            crate::console::start(c, Arc::clone(&feed)).context("start the web console")?;
            opts.console = Some(feed);
        }
        None => crate::console::forget(&opts.state_dir),
    }
    opts.server = Some(server);
    agent::run(opts)
}
