//! `palisadectl`: manage palisade on a node. Thin over the library: parse
//! arguments, call `palisade::node` / `palisade::explain`, print tables,
//! JSON or YAML.

mod agent;
mod cluster;
mod console;
mod dns;
mod etcd;
mod l7;
mod observe;
mod output;
mod serve;

use std::{
    fs,
    io::{self, Read},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::{Context, Result, bail};
use clap::{
    CommandFactory, Parser, Subcommand, ValueEnum,
    builder::{PossibleValuesParser, TypedValueParser},
};
use palisade::{
    abi::{Direction, Verdict},
    cniconf,
    daemon::{Control, NodeOps, Paths},
    dataplane::{AttachMode, DEFAULT_BPF_ROOT, Dataplane, Lookup, kernel::KernelDataplane},
    explain::{self, PartyRef},
    node::{Change, Node, ObjectsReport, stale_refs},
    policy::{self, tier::TierKind},
    store::{DEFAULT_STATE_DIR, Store},
};
use palisade::{flows::Filter, learn, policy::Mode};

use crate::output::Format;

#[derive(Debug, Parser)]
#[command(
    name = "palisadectl",
    version,
    about = "Per-container network isolation with Kubernetes NetworkPolicy, enforced by eBPF",
    long_about = "palisadectl manages palisade on this node: apply and delete Kubernetes objects \
                  (Namespace, Pod, NetworkPolicy), list what is enforced, and explain verdicts."
)]
struct Cli {
    /// Where palisade keeps objects, endpoints and identities.
    #[arg(long, global = true, env = "PALISADE_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Where palisade pins its eBPF maps, programs and links (on bpffs).
    #[arg(long, global = true, env = "PALISADE_BPF_ROOT", default_value = DEFAULT_BPF_ROOT)]
    bpf_root: PathBuf,
    /// The node daemon's socket (default: palisade.sock in the state
    /// directory). Without a daemon there, commands do the work themselves.
    #[arg(long, global = true, env = "PALISADE_SOCKET")]
    socket: Option<PathBuf>,
    #[command(flatten)]
    datastore: etcd::Flags,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or update objects from YAML or JSON (multi-document; `-` reads stdin).
    Apply {
        /// File with Namespace, Pod and NetworkPolicy objects, or `-`.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
    },
    /// Delete the objects named in YAML or JSON files.
    Delete {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
        /// Do not fail when an object does not exist.
        #[arg(long)]
        ignore_not_found: bool,
    },
    /// List endpoints, policies, identities, namespaces, pods, or the
    /// cluster-wide tiers (adminnetworkpolicies, baselineadminnetworkpolicies,
    /// clusternetworkpolicies).
    Get {
        resource: Resource,
        /// Only this namespace.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Show loaded programs, map fill levels and attached endpoints.
    Status {
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Explain whether a connection is allowed and which policies decide.
    Explain {
        /// Sender: NAMESPACE/POD, POD (namespace default) or an address.
        #[arg(long)]
        from: String,
        /// Receiver: NAMESPACE/POD, POD or an address.
        #[arg(long)]
        to: String,
        /// Destination port and protocol: 80/TCP, 53/UDP, 9000/SCTP, or icmp.
        #[arg(long)]
        port: String,
        /// Also judge one HTTP request against the HTTP rules
        /// (PalisadeNetworkPolicy `rules.http`): METHOD PATH, e.g.
        /// `--http DELETE /books/1`.
        #[arg(long, num_args = 2, value_names = ["METHOD", "PATH"])]
        http: Option<Vec<String>>,
        /// With --http: a request header, NAME:VALUE (repeat it).
        #[arg(long = "header", value_name = "NAME:VALUE", requires = "http")]
        headers: Vec<String>,
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Recompile everything and make the kernel maps match (repair).
    Sync,
    /// Remove endpoints whose host veth no longer exists (run on the node).
    Gc,
    /// Print the web console's URL, with its token (the daemon serves the
    /// console when started with --console-listen).
    Console,
    /// Show flows: new connections and drops, with who and which policy.
    Flows {
        /// Keep printing new flows.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only this verdict: allowed, denied or audit.
        #[arg(
            long,
            value_parser = PossibleValuesParser::new(["allowed", "denied", "audit"]).try_map(verdict_word)
        )]
        verdict: Option<Verdict>,
        /// Only flows of this pod (NAMESPACE/NAME), on either side.
        #[arg(long)]
        pod: Option<String>,
        /// Only flows with a side in this namespace.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Only flows to this destination port.
        #[arg(long)]
        port: Option<u16>,
        /// Only the last N records.
        #[arg(long)]
        tail: Option<usize>,
        /// table, or json (one object a line).
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Run the node daemon: the policy engine behind a local socket, flow log and metrics.
    #[command(
        visible_alias = "agent",
        long_about = "Run the node daemon. It keeps the policy engine in memory and serves it \
                      on a root-only socket (palisade.sock in the state directory, or --socket); \
                      the CNI plugin, the OCI hook and palisadectl send their changes there when \
                      it runs, and do the same work themselves when it does not. At start it \
                      rebuilds the engine from the store and reconciles the kernel maps (no \
                      verdict changes when they match). It also drains flow events into the \
                      flow log and serves Prometheus metrics. Enforcement never depends on it: \
                      killing it changes no verdict."
    )]
    Daemon {
        /// Where to serve /metrics.
        #[arg(long, default_value = "127.0.0.1:9970")]
        listen: String,
        /// Flow log directory (default: STATE_DIR/flows).
        #[arg(long)]
        log_dir: Option<PathBuf>,
        /// Cap on all flow log files together, in bytes.
        #[arg(long, default_value_t = 64 << 20)]
        log_max_bytes: u64,
        /// How many files the log rotates through.
        #[arg(long, default_value_t = 4)]
        log_files: u32,
        /// Kubernetes cluster mode: take Namespaces, Pods and NetworkPolicies
        /// from the API server (in-cluster service account, else --kubeconfig,
        /// KUBECONFIG or ~/.kube/config).
        #[arg(long)]
        kubernetes: bool,
        /// The kubeconfig to use in cluster mode.
        #[arg(long, requires = "kubernetes")]
        kubeconfig: Option<PathBuf>,
        /// This node's name in the cluster, or this host's among the hosts
        /// sharing an etcd datastore (default: $NODE_NAME, else the
        /// hostname).
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// Port of the DNS proxy (UDP and TCP, every address), where
        /// the datapath sends the DNS of pods whose PalisadeNetworkPolicies
        /// name domains or limit lookups; 0 runs no proxy (their DNS then
        /// fails, closed).
        #[arg(long, default_value_t = 15053)]
        dns_proxy_port: u16,
        /// Port of the L7 proxy (TCP, every address), where the datapath
        /// steers the connections that only PalisadeNetworkPolicy HTTP
        /// rules allow; 0 runs no proxy (those connections then fail,
        /// closed).
        #[arg(long, default_value_t = 15080)]
        l7_proxy_port: u16,
        /// The packet mark (one bit) that routes redirected packets to the
        /// local table; pick a bit no other component uses (kube-proxy
        /// uses 0x4000 and 0x8000, Calico 0xffff0000, Cilium 0x0f00, the
        /// CNI portmap plugin 0x2000).
        #[arg(long, default_value = "0x1000", value_parser = parse_mark)]
        proxy_mark: u32,
        /// The routing table for marked packets (`local 0.0.0.0/0 dev lo`).
        #[arg(long, default_value_t = 1053)]
        proxy_table: u32,
        /// Learned addresses are kept at least this many seconds, whatever
        /// the answer's TTL ...
        #[arg(long, default_value_t = 60)]
        dns_min_ttl: u32,
        /// ... plus this grace period (seconds); an address stays allowed
        /// past it while a connection uses it.
        #[arg(long, default_value_t = 30)]
        dns_grace: u32,
        /// At most this many learned addresses per name.
        #[arg(long, default_value_t = 50)]
        dns_max_addresses: usize,
        /// A map's capacity, NAME=ENTRIES (repeat it): endpoints,
        /// sourceAddresses, cidrs, addresses, policy, conntrack, fragments,
        /// counters, eventBytes, services, serviceFlows. Used when the maps
        /// are created; the daemon refuses to start on maps created with
        /// other capacities.
        #[arg(long = "map-size", value_name = "NAME=ENTRIES")]
        map_sizes: Vec<String>,
        /// With an etcd datastore: seconds this host's containers stay
        /// known to the other hosts after its daemon last reached etcd.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(i64).range(2..=3600))]
        etcd_lease_ttl: i64,
        /// Serve the web console (off unless given), on 127.0.0.1:9971 or
        /// the address and port given. Every request needs the console's
        /// token: `palisadectl console` prints the URL that carries it.
        #[arg(
            long,
            value_name = "ADDR:PORT",
            num_args = 0..=1,
            default_missing_value = "127.0.0.1:9971",
            require_equals = false
        )]
        console_listen: Option<String>,
        /// The console's token, from this file (at least 16 printable
        /// characters); without it the daemon makes one and keeps it in
        /// the state directory (root only).
        #[arg(long, requires = "console_listen")]
        console_token_file: Option<PathBuf>,
        /// Flow records the console keeps in memory for its map.
        #[arg(long, default_value_t = 100_000, requires = "console_listen")]
        console_records: usize,
        /// Cluster mode: the console also shows what the other nodes saw,
        /// fetched from their consoles (the same port and token on every
        /// node, listening on an address the nodes reach).
        #[arg(long, requires = "console_listen")]
        console_cluster: bool,
    },
    /// Generate NetworkPolicy YAML from observed flows.
    Learn {
        /// Read this flow log directory (default: the agent's).
        #[arg(long)]
        log: Option<PathBuf>,
        /// Watch live traffic for this long instead (e.g. 30s, 5m).
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
        /// Only workloads in this namespace.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Also allow connections that were denied.
        #[arg(long)]
        include_denied: bool,
        /// Annotate the policies with this mode (audit to stage them).
        #[arg(long, value_parser = ["audit", "enforce"])]
        mode: Option<String>,
        /// Write the report (what each rule covers) here instead of stderr.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Also emit a BaselineAdminNetworkPolicy that denies what the
        /// learned NetworkPolicies do not decide (pods never seen talking).
        #[arg(long)]
        baseline: bool,
    },
    /// Draw observed traffic (pods by namespace, edges by verdict).
    Graph {
        #[arg(long)]
        log: Option<PathBuf>,
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
        /// html (self-contained), svg, dot or png.
        #[arg(short = 'o', long, default_value = "html", value_parser = ["html", "svg", "dot", "png"])]
        output: String,
        /// Write here instead of stdout.
        #[arg(long = "file")]
        file: Option<PathBuf>,
    },
    /// Set audit or enforce mode: node-wide, or for a namespace (-n).
    Mode {
        /// audit, enforce, or inherit (a namespace follows the node).
        #[arg(value_parser = ["audit", "enforce", "inherit"])]
        mode: String,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// Add palisade as the last plugin of this node's CNI network.
    #[command(
        name = "install-cni",
        long_about = "Add palisade as the last plugin of this node's CNI network configuration: \
                      the file the runtime reads (the first .conf, .conflist or .json in \
                      --cni-conf-dir, by name, as flannel's, calico's or bridge's), or the one \
                      named with --conflist. A single-plugin .conf becomes a .conflist beside \
                      it. Every other byte of the file stays as it was; the original is kept \
                      as FILE.palisade-bak; the file is replaced atomically. Running it again \
                      changes nothing. A file that is not a valid CNI configuration is refused \
                      and left untouched."
    )]
    InstallCni {
        #[command(flatten)]
        target: CniTarget,
        /// Settings for the palisade entry, as a JSON object
        /// (e.g. '{"failOpen": true}').
        #[arg(long, value_name = "JSON")]
        plugin_config: Option<String>,
    },
    /// Take palisade out of this node's CNI network again.
    #[command(
        name = "uninstall-cni",
        long_about = "Take palisade out of the CNI network configuration that lists it (or the \
                      one named with --conflist), exactly reversing install-cni: the file gets \
                      back its original bytes, and a .conf that install-cni converted comes \
                      back in place of the .conflist. If the file was edited since, only the \
                      palisade entry is removed."
    )]
    UninstallCni {
        #[command(flatten)]
        target: CniTarget,
    },
    /// Replace the eBPF programs of every attached container with this build's.
    #[command(
        long_about = "Load this build's eBPF programs and swap them in on every \
                      attached container, each atomically (TCX link update, or the cls_bpf \
                      filter replaced under its handle): no packet passes unfiltered and open \
                      connections keep their state. Package upgrades run this."
    )]
    Upgrade {
        /// Load the programs from from_container.o and to_container.o in
        /// this directory instead of the built-in ones.
        #[arg(long, value_name = "DIR")]
        objects: Option<PathBuf>,
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Detach palisade from every container and remove its pinned datapath.
    #[command(
        long_about = "Detach palisade from every container and remove its pinned \
                      datapath (maps, programs, links). The containers keep running without \
                      isolation. Policies and other objects stay in the state directory. For \
                      taking palisade off a node; needs --yes."
    )]
    Reset {
        /// Yes, detach everything.
        #[arg(long)]
        yes: bool,
    },
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write man pages for palisadectl and its commands into DIR.
    #[command(hide = true)]
    Manpages { dir: PathBuf },
}

#[derive(Debug, clap::Args)]
struct CniTarget {
    /// The configuration file to change (default: the one the runtime
    /// reads from --cni-conf-dir).
    #[arg(long, value_name = "FILE")]
    conflist: Option<PathBuf>,
    /// The runtime's CNI configuration directory.
    #[arg(long, value_name = "DIR", env = "PALISADE_CNI_CONF_DIR", default_value = palisade::cniconf::DEFAULT_CNI_CONF_DIR)]
    cni_conf_dir: PathBuf,
    /// Print the resulting file instead of writing anything.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Resource {
    #[value(alias = "endpoint", alias = "ep")]
    Endpoints,
    #[value(
        alias = "policy",
        alias = "networkpolicies",
        alias = "networkpolicy",
        alias = "netpol"
    )]
    Policies,
    #[value(alias = "identity", alias = "id")]
    Identities,
    #[value(alias = "namespace", alias = "ns")]
    Namespaces,
    #[value(alias = "pod", alias = "po")]
    Pods,
    #[value(alias = "adminnetworkpolicy", alias = "anp")]
    Adminnetworkpolicies,
    #[value(alias = "baselineadminnetworkpolicy", alias = "banp")]
    Baselineadminnetworkpolicies,
    #[value(alias = "clusternetworkpolicy", alias = "cnp")]
    Clusternetworkpolicies,
    #[value(alias = "palisadenetworkpolicy", alias = "pnp")]
    Palisadenetworkpolicies,
    /// Addresses the DNS proxy learned for `toFQDNs` rules.
    #[value(alias = "fqdn")]
    Fqdns,
}

/// A packet mark: one bit, in hex (0x1000) or decimal.
fn parse_mark(s: &str) -> Result<u32, String> {
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("{s:?} is not a number; write a mark like 0x1000"))?;
    if v.count_ones() != 1 {
        return Err(format!(
            "{s} is not a single bit; palisade needs one mark bit of its own, e.g. 0x1000"
        ));
    }
    Ok(v)
}

/// `flows --verdict`: the word flow records show, as the verdict to match.
fn verdict_word(word: String) -> Result<Verdict, String> {
    match Verdict::from_word(&word) {
        Some(v @ (Verdict::Allow | Verdict::Deny | Verdict::Audit)) => Ok(v),
        _ => Err(format!(
            "unknown verdict {word:?}: use allowed, denied or audit"
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // What the library reports (repairs, warnings) goes to stderr; the
    // daemon says more by default.
    let default = if matches!(cli.command, Command::Daemon { .. }) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PALISADE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .without_time()
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // A closed pipe (`palisadectl get endpoints | head`) is success.
            if e.chain().any(|c| {
                c.downcast_ref::<io::Error>()
                    .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn report_cni(outcome: &cniconf::Outcome, dry_run: bool) -> Result<ExitCode> {
    if dry_run {
        match outcome {
            cniconf::Outcome::Installed { contents, .. }
            | cniconf::Outcome::Uninstalled { contents, .. } => output::emit(contents)?,
            _ => {}
        }
        eprintln!("{}", outcome.describe(true));
    } else {
        output::emit(&format!("{}\n", outcome.describe(false)))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// palisadectl(8) and one page per command (palisadectl-apply(8), ...).
fn write_manpages(dir: &std::path::Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let cmd = Cli::command();
    let mut pages = vec![("palisadectl".to_owned(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("palisadectl-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    for (name, page) in pages {
        let path = dir.join(format!("{name}.8"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(page.version(env!("CARGO_PKG_VERSION")))
            .section("8")
            .manual("palisade")
            .render(&mut buf)
            .with_context(|| format!("render {name}.8"))?;
        fs::write(&path, buf).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

fn paths(cli: &Cli) -> Paths {
    Paths {
        state_dir: cli.state_dir.clone(),
        bpf_root: cli.bpf_root.clone(),
        socket: cli.socket.clone(),
        attach_mode: AttachMode::Auto,
        map_sizes: None,
    }
}

/// The node: through the daemon when it runs, else in-process.
fn control(cli: &Cli) -> Result<Control> {
    Ok(Control::open(&paths(cli))?)
}

/// The node in-process (for commands that must not go through a daemon).
fn node(cli: &Cli) -> Node<KernelDataplane> {
    Node::new(
        Store::new(&cli.state_dir),
        KernelDataplane::new(&cli.bpf_root, AttachMode::Auto),
    )
}

fn read_input(name: &str) -> Result<String> {
    if name == "-" {
        let mut s = String::new();
        io::stdin()
            .read_to_string(&mut s)
            .context("read objects from stdin")?;
        Ok(s)
    } else {
        fs::read_to_string(name).with_context(|| format!("read {name}"))
    }
}

fn read_sources(files: &[String]) -> Result<Vec<policy::Source>> {
    files
        .iter()
        .map(|f| {
            Ok(policy::Source {
                name: if f == "-" {
                    "<stdin>".into()
                } else {
                    f.clone()
                },
                text: read_input(f)?,
            })
        })
        .collect()
}

/// What the files name (kind, namespace, name), for `delete`.
fn read_references(files: &[String]) -> Result<Vec<policy::ObjectRef>> {
    let mut all = Vec::new();
    for f in files {
        let text = read_input(f)?;
        let source = if f == "-" { "<stdin>" } else { f.as_str() };
        all.extend(policy::parse_references(&text, source)?);
    }
    if all.is_empty() {
        bail!("no objects found in {}", files.join(", "));
    }
    Ok(all)
}

fn print_changes(report: &ObjectsReport) -> Result<()> {
    let mut out = String::new();
    for (r, change) in &report.changes {
        let kind = match r.kind {
            policy::Kind::Namespace => "namespace",
            policy::Kind::Pod => "pod",
            policy::Kind::NetworkPolicy => "networkpolicy.networking.k8s.io",
            policy::Kind::Node => "node",
            policy::Kind::AdminNetworkPolicy => "adminnetworkpolicy.policy.networking.k8s.io",
            policy::Kind::BaselineAdminNetworkPolicy => {
                "baselineadminnetworkpolicy.policy.networking.k8s.io"
            }
            policy::Kind::ClusterNetworkPolicy => "clusternetworkpolicy.policy.networking.k8s.io",
            policy::Kind::PalisadeNetworkPolicy => "palisadenetworkpolicy.palisade.io",
        };
        let name = if r.namespace.is_empty() {
            r.name.clone()
        } else {
            format!("{}/{}", r.namespace, r.name)
        };
        out.push_str(&format!("{kind}/{name} {}\n", change.as_str()));
    }
    output::emit(&out)?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    Ok(())
}

fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Apply { files } => {
            // Parsed and validated where the work is done (by the daemon
            // when it runs).
            let sources = read_sources(files)?;
            let report = match cli.datastore.settings()? {
                Some(settings) => {
                    let objects = policy::parse_sources(&sources)?;
                    ObjectsReport {
                        changes: etcd::block_on(etcd::with_retry(&settings, |mut ds| {
                            let objects = objects.clone();
                            async move { ds.apply(objects).await }
                        }))?
                        .context("apply")?,
                        ..Default::default()
                    }
                }
                None => control(&cli)?.apply_sources(sources).context("apply")?,
            };
            if report.changes.is_empty() {
                bail!("no objects found in {}", files.join(", "));
            }
            print_changes(&report)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Delete {
            files,
            ignore_not_found,
        } => {
            let refs = read_references(files)?;
            let mut report = match cli.datastore.settings()? {
                Some(settings) => ObjectsReport {
                    changes: etcd::block_on(etcd::with_retry(&settings, |mut ds| {
                        let refs = refs.clone();
                        async move { ds.delete(refs).await }
                    }))?
                    .context("delete")?,
                    ..Default::default()
                },
                None => control(&cli)?.delete(refs).context("delete")?,
            };
            let missing: Vec<String> = report
                .changes
                .iter()
                .filter(|(_, c)| *c == Change::NotFound)
                .map(|(r, _)| r.to_string())
                .collect();
            report.changes.retain(|(_, c)| *c != Change::NotFound);
            print_changes(&report)?;
            if !missing.is_empty() && !ignore_not_found {
                for m in &missing {
                    eprintln!("error: {m} not found");
                }
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Get {
            resource,
            namespace,
            output,
        } => {
            let mut state = Store::new(&cli.state_dir)
                .read()
                .context("read palisade's state")?;
            // Objects come from the datastore when there is one; endpoints,
            // identities and learned names are this host's.
            let objects = !matches!(
                resource,
                Resource::Endpoints | Resource::Identities | Resource::Fqdns
            );
            if objects && let Some(settings) = cli.datastore.settings()? {
                let listing = etcd::block_on(etcd::with_retry(&settings, |mut ds| async move {
                    ds.list().await
                }))?
                .context("get")?;
                for bad in &listing.invalid {
                    eprintln!("warning: skipped {bad}");
                }
                state = etcd::state_with(state, listing);
            }
            let ns = namespace.as_deref();
            match resource {
                Resource::Endpoints => output::endpoints(&state, ns, *output)?,
                Resource::Policies => output::policies(&state, ns, *output)?,
                Resource::Identities => output::identities(&state, ns, *output)?,
                Resource::Namespaces => output::namespaces(&state, *output)?,
                Resource::Pods => output::pods(&state, ns, *output)?,
                Resource::Adminnetworkpolicies => {
                    output::tier_policies(&state, TierKind::AdminNetworkPolicy, *output)?
                }
                Resource::Baselineadminnetworkpolicies => {
                    output::tier_policies(&state, TierKind::BaselineAdminNetworkPolicy, *output)?
                }
                Resource::Clusternetworkpolicies => {
                    output::tier_policies(&state, TierKind::ClusterNetworkPolicy, *output)?
                }
                Resource::Palisadenetworkpolicies => {
                    output::palisade_policies(&state, ns, *output)?
                }
                Resource::Fqdns => output::fqdns(&state, *output)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { output } => {
            let mut n = node(&cli);
            let state = n.store.read().context("read palisade's state")?;
            let loaded = n
                .dataplane
                .open_existing()
                .context("open the pinned maps")?;
            let socket = cli
                .socket
                .clone()
                .unwrap_or_else(|| palisade::daemon::default_socket(&cli.state_dir));
            let daemon = palisade::daemon::Client::connect(&socket, &cli.bpf_root)
                .and_then(|c| c.call(palisade::daemon::Request::Status).ok());
            output::status(&state, &n.dataplane, loaded, daemon, *output)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain {
            from,
            to,
            port,
            http,
            headers,
            output,
        } => {
            let state = Store::new(&cli.state_dir)
                .read()
                .context("read palisade's state")?;
            let (proto, port) = explain::parse_port(port)?;
            let e = explain::explain(
                &state,
                &PartyRef::parse(from)?,
                &PartyRef::parse(to)?,
                proto,
                port,
            )?;
            let mut dp = KernelDataplane::new(&cli.bpf_root, AttachMode::Auto);
            let loaded = dp.open_existing().unwrap_or(false);
            let mut datapath = Vec::new();
            if loaded {
                for (side, peer) in [(&e.egress, e.to.address), (&e.ingress, e.from.address)] {
                    let Some(side) = side else { continue };
                    let party = if side.direction == Direction::Egress {
                        &e.from
                    } else {
                        &e.to
                    };
                    let (Some(ep_id), Some(peer)) = (party.endpoint_id, peer) else {
                        continue;
                    };
                    let proto_num = if e.protocol == "ICMPv6" {
                        palisade::abi::PROTO_ICMPV6
                    } else {
                        proto
                    };
                    let a = dp.lookup(&Lookup {
                        ep_id,
                        direction: side.direction,
                        peer,
                        protocol: proto_num,
                        port,
                    })?;
                    let allowed = a.allowed || e.from.is_host || e.to.is_host;
                    datapath.push(output::DatapathAnswer {
                        direction: side.direction,
                        endpoint: ep_id,
                        peer_identity: a.peer_identity,
                        allowed,
                        policy_id: a.tier.map(|t| t.1).or(a.entry).map(|v| v.policy_id),
                        agrees: allowed == side.allowed,
                    });
                }
            }
            let http = match http.as_deref() {
                Some([method, path]) => {
                    let mut hs = Vec::new();
                    for h in headers {
                        let Some((n, v)) = h.split_once(':') else {
                            bail!("--header {h:?}: write NAME:VALUE (e.g. X-Team:blue)");
                        };
                        hs.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
                    }
                    let conn = palisade::l7::from_explanation(&e, false);
                    let header = |name: &str| -> Vec<&str> {
                        hs.iter()
                            .filter(|(n, _)| n == name)
                            .map(|(_, v)| v.as_str())
                            .collect()
                    };
                    let verdict = conn.judge(
                        &palisade::l7::Request {
                            method,
                            path,
                            host: None,
                        },
                        &header,
                    );
                    Some(output::HttpAnswer {
                        method: method.clone(),
                        path: path.clone(),
                        governed: !conn.sides.is_empty(),
                        verdict,
                    })
                }
                _ => None,
            };
            output::explanation(&e, &datapath, http.as_ref(), &state, *output)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::InstallCni {
            target,
            plugin_config,
        } => {
            let entry = cniconf::plugin_entry(plugin_config.as_deref())?;
            let outcome = cniconf::install(
                &target.cni_conf_dir,
                target.conflist.as_deref(),
                &entry,
                target.dry_run,
            )?;
            report_cni(&outcome, target.dry_run)
        }
        Command::UninstallCni { target } => {
            let outcome = cniconf::uninstall(
                &target.cni_conf_dir,
                target.conflist.as_deref(),
                target.dry_run,
            )?;
            report_cni(&outcome, target.dry_run)
        }
        Command::Upgrade { objects, output } => {
            let mut dp = KernelDataplane::new(&cli.bpf_root, AttachMode::Auto);
            if let Some(dir) = objects {
                let read = |name: &str| {
                    let path = dir.join(name);
                    fs::read(&path).with_context(|| format!("read {}", path.display()))
                };
                dp = dp.with_objects(read("from_container.o")?, read("to_container.o")?);
            }
            let hash = dp.hash();
            let mut n = Node::new(Store::new(&cli.state_dir), dp);
            let report = n.upgrade().context("upgrade the datapath")?;
            output::upgrade(&report, &hash, *output)?;
            Ok(if report.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Reset { yes } => {
            if !yes {
                bail!(
                    "reset detaches palisade from every container (they lose their isolation) \
                     and removes its pinned datapath; run it again with --yes to do that"
                );
            }
            if let Some(d) = control(&cli)?.daemon() {
                bail!(
                    "the palisade daemon is running (socket {}); stop it first (`systemctl stop palisade`), then reset",
                    d.socket().display()
                );
            }
            let gone = node(&cli).reset().context("reset")?;
            output::emit(&format!(
                "detached {} endpoint(s) and removed the datapath under {}\n",
                gone.len(),
                cli.bpf_root.display()
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(*shell, &mut cmd, "palisadectl", &mut io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Manpages { dir } => {
            write_manpages(dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sync => {
            let (report, warnings) = control(&cli)?.resync().context("sync")?;
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            output::emit(&format!(
                "maps in sync: {} entries written, {} removed, epoch {}\n",
                report.upserted, report.deleted, report.epoch
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Flows {
            follow,
            verdict,
            pod,
            namespace,
            port,
            tail,
            output,
        } => {
            let filter = Filter {
                verdict: *verdict,
                pod: pod.clone(),
                namespace: namespace.clone(),
                port: *port,
            };
            observe::flows(
                &cli.state_dir,
                &cli.bpf_root,
                &filter,
                *follow,
                *tail,
                *output == Format::Json,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Daemon {
            listen,
            log_dir,
            log_max_bytes,
            log_files,
            kubernetes,
            kubeconfig,
            node_name,
            dns_proxy_port,
            l7_proxy_port,
            proxy_mark,
            proxy_table,
            dns_min_ttl,
            dns_grace,
            dns_max_addresses,
            map_sizes,
            etcd_lease_ttl,
            console_listen,
            console_token_file,
            console_records,
            console_cluster,
        } => {
            let map_sizes = if map_sizes.is_empty() {
                None
            } else {
                Some(
                    palisade::dataplane::MapSizes::parse_items(map_sizes)
                        .map_err(anyhow::Error::msg)?,
                )
            };
            let dns = (*dns_proxy_port != 0).then(|| palisade::dnsproxy::Options {
                port: *dns_proxy_port,
                mark: *proxy_mark,
                table: *proxy_table,
                min_ttl: *dns_min_ttl,
                grace: *dns_grace,
                max_per_name: (*dns_max_addresses).max(1),
                ..Default::default()
            });
            let l7 = (*l7_proxy_port != 0).then_some(l7::Options {
                port: *l7_proxy_port,
                mark: *proxy_mark,
                table: *proxy_table,
            });
            let datastore = cli.datastore.settings()?;
            if *kubernetes && datastore.is_some() {
                bail!(
                    "--kubernetes and an etcd datastore exclude each other: in a Kubernetes \
                     cluster the objects come from the API server"
                );
            }
            let this_node = || -> Result<String> {
                Ok(match node_name {
                    Some(n) => n.clone(),
                    None => nix::unistd::gethostname()
                        .context("find this node's name (set --node-name or NODE_NAME)")?
                        .to_string_lossy()
                        .into_owned(),
                })
            };
            let cluster = if *kubernetes {
                Some(cluster::Options {
                    kubeconfig: kubeconfig.clone(),
                    node_name: this_node()?,
                })
            } else {
                None
            };
            let etcd = match datastore {
                Some(settings) => Some(etcd::DaemonOptions {
                    settings,
                    node_name: this_node()?,
                    state_dir: cli.state_dir.clone(),
                    lease_ttl: *etcd_lease_ttl,
                }),
                None => None,
            };
            let console = match console_listen {
                Some(listen) => Some(console::Options {
                    listen: listen.clone(),
                    token_file: console_token_file.clone(),
                    max_records: *console_records,
                    state_dir: cli.state_dir.clone(),
                    bpf_root: cli.bpf_root.clone(),
                    socket: cli.socket.clone(),
                    log_dir: log_dir
                        .clone()
                        .unwrap_or_else(|| observe::log_dir(&cli.state_dir)),
                    node_name: match (&cluster, &etcd) {
                        (Some(c), _) => c.node_name.clone(),
                        (None, Some(e)) => e.node_name.clone(),
                        (None, None) => this_node()?,
                    },
                    external: match (&cluster, &etcd) {
                        (Some(_), _) => Some("the Kubernetes API server".to_owned()),
                        (None, Some(e)) => {
                            Some(format!("the etcd datastore ({})", e.settings.describe()))
                        }
                        (None, None) => None,
                    },
                    cluster: *console_cluster,
                }),
                None => None,
            };
            serve::run(
                agent::Options {
                    state_dir: cli.state_dir.clone(),
                    bpf_root: cli.bpf_root.clone(),
                    listen: listen.clone(),
                    log_dir: log_dir.clone(),
                    log_max_bytes: *log_max_bytes,
                    log_files: *log_files,
                    server: None,
                    cluster: None,
                    dns_records: None,
                    http_records: None,
                    map_sizes,
                    console: None,
                },
                cli.socket
                    .clone()
                    .unwrap_or_else(|| palisade::daemon::default_socket(&cli.state_dir)),
                cluster,
                etcd,
                dns,
                l7,
                console,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Learn {
            log,
            duration,
            namespace,
            include_denied,
            mode,
            report,
            baseline,
        } => {
            let records =
                observe::collect(&cli.state_dir, &cli.bpf_root, log.as_deref(), *duration)?;
            let learned = learn::learn(
                &records,
                &learn::Options {
                    include_denied: *include_denied,
                    mode: mode.as_deref().map(|m| {
                        if m == "audit" {
                            Mode::Audit
                        } else {
                            Mode::Enforce
                        }
                    }),
                    namespace: namespace.clone(),
                    baseline: *baseline,
                },
            );
            let text = format!(
                "learned {} policies from {} flow records\n{}\n",
                learned.policies,
                records.len(),
                learned.report.join("\n")
            );
            match report {
                Some(f) => fs::write(f, text).with_context(|| format!("write {}", f.display()))?,
                None => eprint!("{text}"),
            }
            output::emit(&learned.yaml)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Graph {
            log,
            duration,
            output,
            file,
        } => {
            let records =
                observe::collect(&cli.state_dir, &cli.bpf_root, log.as_deref(), *duration)?;
            let bytes = observe::graph(&records, output)?;
            match file {
                Some(f) => fs::write(f, bytes).with_context(|| format!("write {}", f.display()))?,
                None => {
                    use std::io::Write;
                    io::stdout().write_all(&bytes)?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Mode { mode, namespace } => {
            let m = match mode.as_str() {
                "audit" => Some(Mode::Audit),
                "enforce" => Some(Mode::Enforce),
                _ => None,
            };
            if namespace.is_none() && m.is_none() {
                anyhow::bail!("the node has no parent to inherit from: use audit or enforce");
            }
            let report = control(&cli)?
                .set_mode(namespace.as_deref(), m)
                .context("set mode")?;
            let scope = namespace
                .as_deref()
                .map_or_else(|| "node default".to_owned(), |n| format!("namespace {n}"));
            output::emit(&format!(
                "{scope}: {mode} (policy epoch {})\n",
                report.epoch
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Console => {
            output::emit(&format!("{}\n", console::url(&cli.state_dir)?))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Gc => {
            // Stale: the host veth is gone *and* so is the container's
            // namespace. A veth missing while its namespace still exists means
            // this is not the node's network namespace: touch nothing.
            let veth_gone = |e: &palisade::store::Endpoint| {
                nix::net::if_::if_nametoindex(e.host_ifname.as_str()).ok() != Some(e.host_ifindex)
            };
            let netns_gone = |e: &palisade::store::Endpoint| {
                e.netns.is_empty() || !std::path::Path::new(&e.netns).exists()
            };
            let state = Store::new(&cli.state_dir)
                .read()
                .context("read palisade's state")?;
            for e in state
                .endpoints
                .values()
                .filter(|e| veth_gone(e) && !netns_gone(e))
            {
                eprintln!(
                    "warning: endpoint {} ({}/{}): veth {} is not in this network namespace but {} exists; \
                     run `palisadectl gc` in the host's network namespace",
                    e.id, e.namespace, e.name, e.host_ifname, e.netns
                );
            }
            let mut ctl = control(&cli)?;
            let removed = ctl
                .remove_endpoints(&stale_refs(&state, |e| veth_gone(e) && netns_gone(e)))
                .context("garbage-collect endpoints")?;
            ctl.node.sweep();
            let mut out = String::new();
            for ep in &removed {
                out.push_str(&format!(
                    "removed endpoint {} ({}/{}): its veth {} is gone\n",
                    ep.id, ep.namespace, ep.name, ep.host_ifname
                ));
            }
            if removed.is_empty() {
                out.push_str("nothing to remove\n");
            }
            output::emit(&out)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict_flag(word: &str) -> Result<Option<Verdict>, clap::Error> {
        let cli = Cli::try_parse_from(["palisadectl", "flows", "--verdict", word])?;
        match cli.command {
            Command::Flows { verdict, .. } => Ok(verdict),
            other => panic!("parsed as {other:?}, not flows"),
        }
    }

    #[test]
    fn the_verdict_flag_takes_the_words_flows_show() {
        for (word, v) in [
            ("allowed", Verdict::Allow),
            ("denied", Verdict::Deny),
            ("audit", Verdict::Audit),
        ] {
            assert_eq!(verdict_flag(word).unwrap(), Some(v), "{word}");
        }
        let err = verdict_flag("deny").unwrap_err().to_string();
        assert!(err.contains("allowed, denied, audit"), "{err}");
        assert_eq!(
            verdict_word("pass".into()).unwrap_err(),
            "unknown verdict \"pass\": use allowed, denied or audit"
        );
    }
}
