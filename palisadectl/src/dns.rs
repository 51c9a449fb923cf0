//! The DNS proxy inside `palisadectl daemon`: its link to the node (which
//! pods it serves and what they may look up, writing learned addresses),
//! its thread, and the sweep that forgets expired addresses.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use palisade::{
    abi::ProxyConfig,
    daemon::Server,
    dnsproxy::{self, Control, DnsRecord, DnsView, NamePolicy, Options, Proxy},
    fqdn::Learned,
};

/// How often the store's generation is checked (a change makes the view be
/// computed again; a pod the view does not know makes it so at once).
const VIEW_POLL: Duration = Duration::from_millis(100);
/// Computed again at least this often anyway.
const VIEW_MAX_AGE: Duration = Duration::from_secs(10);
/// How often expired addresses are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Queries answered, for the agent to write into the flow log.
pub type Records = Arc<Mutex<Vec<DnsRecord>>>;

#[derive(Debug)]
struct NodeControl {
    server: Arc<Server>,
    view: Mutex<(Instant, Arc<DnsView>)>,
    max_per_name: usize,
    records: Records,
    /// What was last written for each (name, address): its expiry.
    written: Mutex<HashMap<(String, IpAddr), u64>>,
    /// An expiry this much earlier than asked still stands (half the
    /// grace period): a hot name is written again only now and then, not
    /// at every answer.
    slack: u64,
}

impl NodeControl {
    /// The view as last computed (the refresher keeps it current).
    fn view(&self) -> Arc<DnsView> {
        Arc::clone(&self.view.lock().unwrap_or_else(|p| p.into_inner()).1)
    }

    /// Compute the view again now.
    fn refresh(&self) -> Arc<DnsView> {
        match self.server.dns_view() {
            Ok(view) => {
                let view = Arc::new(view);
                *self.view.lock().unwrap_or_else(|p| p.into_inner()) =
                    (Instant::now(), Arc::clone(&view));
                view
            }
            Err(e) => {
                tracing::warn!("DNS proxy: cannot read the node's policies: {e}");
                self.view()
            }
        }
    }
}

impl Control for NodeControl {
    fn names_for(&self, client: IpAddr) -> Option<(NamePolicy, String)> {
        if let Some(c) = self.view().clients.get(&client) {
            return Some(c.clone());
        }
        // A pod the view does not know yet (just started): read again.
        self.refresh().clients.get(&client).cloned()
    }

    fn fresh(&self, learned: &[Learned]) -> Vec<Learned> {
        let w = self.written.lock().unwrap_or_else(|p| p.into_inner());
        learned
            .iter()
            .filter(|l| {
                w.get(&(l.name.clone(), l.address))
                    .is_none_or(|e| e.saturating_add(self.slack) < l.expires)
            })
            .cloned()
            .collect()
    }

    fn learn(&self, learned: &[Learned]) -> Result<(), String> {
        let fresh = self.fresh(learned);
        if fresh.is_empty() {
            return Ok(());
        }
        self.server
            .learn_fqdns(&fresh, self.max_per_name)
            .map_err(|e| e.to_string())?;
        let mut w = self.written.lock().unwrap_or_else(|p| p.into_inner());
        if w.len() > 100_000 {
            w.clear();
        }
        // Writing a name may have made room (the cap) by dropping others of
        // its addresses: forget what was known of the names written.
        let names: std::collections::BTreeSet<&str> =
            fresh.iter().map(|l| l.name.as_str()).collect();
        w.retain(|(n, _), _| !names.contains(n.as_str()));
        drop(names);
        for l in fresh {
            w.insert((l.name, l.address), l.expires);
        }
        Ok(())
    }

    fn record(&self, record: DnsRecord) {
        let mut r = self.records.lock().unwrap_or_else(|p| p.into_inner());
        // The agent drains it; a stalled agent must not grow it forever.
        if r.len() < 100_000 {
            r.push(record);
        }
    }
}

/// Start the proxy (its own thread) and the expiry sweep. Fails when the
/// sockets cannot be bound or the routing cannot be set up; the datapath
/// then keeps dropping redirected DNS (fail closed).
pub fn start(server: Arc<Server>, opts: Options, records: Records) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the DNS proxy's runtime")?;
    rt.block_on(dnsproxy::ensure_routing(opts.mark, opts.table))
        .context("route marked packets to the local table")?;
    let control = Arc::new(NodeControl {
        server: Arc::clone(&server),
        view: Mutex::new((Instant::now(), Arc::default())),
        max_per_name: opts.max_per_name,
        records,
        written: Mutex::default(),
        slack: u64::from(opts.grace / 2),
    });
    let proxy = Proxy::new(Arc::clone(&control), opts.clone());
    let sockets = {
        let _guard = rt.enter();
        proxy
            .bind()
            .with_context(|| format!("bind the DNS proxy on port {}", opts.port))?
    };
    server
        .update_proxy(|cfg| ProxyConfig {
            mark: opts.mark,
            dns_port: opts.port,
            ..cfg
        })
        .context("tell the datapath where the DNS proxy listens")?;
    eprintln!(
        "palisade daemon: DNS proxy on port {0} (UDP and TCP; mark {1:#x}, table {2})",
        opts.port, opts.mark, opts.table
    );
    thread::Builder::new()
        .name("dns-proxy".into())
        .spawn(move || {
            if let Err(e) = rt.block_on(proxy.serve(sockets)) {
                eprintln!("palisade daemon: the DNS proxy stopped: {e}");
            }
        })
        .context("start the DNS proxy's thread")?;
    {
        // Policies, pods and labels change: compute the view again when
        // the store's generation moves.
        let control = Arc::clone(&control);
        thread::Builder::new()
            .name("dns-view".into())
            .spawn(move || {
                let mut seen = None;
                loop {
                    let g = control.server.store_generation();
                    if seen != Some(g)
                        || control
                            .view
                            .lock()
                            .map_or(true, |v| v.0.elapsed() > VIEW_MAX_AGE)
                    {
                        seen = Some(g);
                        control.refresh();
                    }
                    thread::sleep(VIEW_POLL);
                }
            })
            .context("start the DNS view thread")?;
    }
    thread::Builder::new()
        .name("dns-expiry".into())
        .spawn(move || {
            loop {
                thread::sleep(SWEEP_EVERY);
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or_default();
                match server.expire_fqdns(now) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!("forgot {n} expired DNS address(es)"),
                    Err(e) => tracing::warn!("expiring DNS addresses: {e}"),
                }
            }
        })
        .context("start the DNS expiry thread")?;
    Ok(())
}
