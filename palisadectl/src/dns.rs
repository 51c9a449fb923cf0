//! The DNS proxy inside `palisadectl daemon`: its link to the node (which
//! pods it serves and what they may look up, writing learned addresses),
//! its thread, and the sweep that forgets expired addresses.

use std::{
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

/// How long a computed view serves before the node is read again (a pod
/// the view does not know makes it read again at once).
const VIEW_FRESH: Duration = Duration::from_millis(500);
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
}

impl NodeControl {
    fn view(&self, fresh: bool) -> Arc<DnsView> {
        let mut v = self.view.lock().unwrap_or_else(|p| p.into_inner());
        if fresh || v.0.elapsed() > VIEW_FRESH {
            match self.server.dns_view() {
                Ok(view) => *v = (Instant::now(), Arc::new(view)),
                Err(e) => tracing::warn!("DNS proxy: cannot read the node's policies: {e}"),
            }
        }
        Arc::clone(&v.1)
    }
}

impl Control for NodeControl {
    fn names_for(&self, client: IpAddr) -> Option<(NamePolicy, String)> {
        if let Some(c) = self.view(false).clients.get(&client) {
            return Some(c.clone());
        }
        self.view(true).clients.get(&client).cloned()
    }

    fn learn(&self, learned: &[Learned]) -> Result<(), String> {
        self.server
            .learn_fqdns(learned, self.max_per_name)
            .map_err(|e| e.to_string())
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
        view: Mutex::new((Instant::now() - VIEW_FRESH * 2, Arc::default())),
        max_per_name: opts.max_per_name,
        records,
    });
    let proxy = Proxy::new(control, opts.clone());
    let sockets = {
        let _guard = rt.enter();
        proxy
            .bind()
            .with_context(|| format!("bind the DNS proxy on port {}", opts.port))?
    };
    server
        .set_proxy(ProxyConfig {
            mark: opts.mark,
            dns_port: opts.port,
            pad: 0,
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
