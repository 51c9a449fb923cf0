//! `palisadectl daemon --console-listen ADDR`: the web console. A small
//! HTTP server in the daemon: the page and its script (built into the
//! binary), the traffic map as JSON and as a live stream (server-sent
//! events), the explanation of an edge, learned policies, and writes that
//! go through the same engine and validation as `palisadectl apply`.
//!
//! Every API request needs the console's token (`Authorization: Bearer`;
//! the page takes it from the fragment of the URL `palisadectl console`
//! prints and keeps it in the tab's session storage, which no other port
//! or site can read): the console shows every flow of the node and changes
//! its policies, so it asks what the root-only socket asks, whatever
//! address it listens on. The page itself holds no data.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    fs,
    io::{Read, Write},
    net::SocketAddr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use palisade::{
    abi::Verdict,
    console::{self, Level, Map, PodMeta, View},
    daemon::{Control, NodeOps, Paths},
    dataplane::AttachMode,
    explain::{self, PartyRef},
    flows::{FlowParty, FlowRecord},
    learn,
    policy::{MODE_ANNOTATION, Mode, Source},
    store::{Source as EpSource, State, Store},
};
use serde_json::{Value, json};

const INDEX_HTML: &str = include_str!("console/index.html");
const CONSOLE_JS: &str = include_str!("console/console.js");
const CONSOLE_CSS: &str = include_str!("console/console.css");

/// At most this many live streams at once (each holds a thread).
const MAX_STREAMS: usize = 64;
/// The file in the state directory with the console's URL (root only).
pub const URL_FILE: &str = "console.url";
/// The token the daemon makes when none is given (root only).
const TOKEN_FILE: &str = "console.token";
/// A stream sends a map change at most this often.
const STREAM_EVERY: Duration = Duration::from_millis(200);
/// ... and a comment this often, to find browsers that left.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(15);
/// Records shown behind an edge.
const EDGE_RECORDS: usize = 50;
/// Connections of an edge explained.
const EDGE_EXPLAINED: usize = 3;

/// Console settings.
#[derive(Debug, Clone)]
pub struct Options {
    pub listen: String,
    /// A file holding the token; without it the daemon makes one.
    pub token_file: Option<PathBuf>,
    /// Flow records kept in memory for the map.
    pub max_records: usize,
    pub state_dir: PathBuf,
    pub bpf_root: PathBuf,
    pub socket: Option<PathBuf>,
    pub log_dir: PathBuf,
    /// This node's name (shown on its pods).
    pub node_name: String,
    /// Where the policies live when not on this node: the console then
    /// offers YAML to download instead of applying it.
    pub external: Option<String>,
    /// Also show the other nodes' records: fetch them from their consoles
    /// (same port, same token) at the addresses of their Node objects.
    pub cluster: bool,
}

/// Flow records for the console, newest last, with their times: this
/// node's (numbered, for the other nodes' consoles to fetch) and, in
/// cluster mode, those fetched from the other nodes.
#[derive(Debug, Default)]
pub struct Feed {
    inner: Mutex<Records>,
    changed: Condvar,
    /// Changes at every start, so that the other nodes know to read this
    /// node's records from the beginning again.
    epoch: u64,
}

#[derive(Debug, Default)]
struct Records {
    items: VecDeque<Item>,
    generation: u64,
    cap: usize,
    /// The number of the last record of this node.
    last_seq: u64,
}

#[derive(Debug)]
struct Item {
    /// Milliseconds since the epoch.
    time: u64,
    /// This node's live records count from 1; 0 for another node's, and
    /// for the history read from the log at start (the other nodes do not
    /// fetch that: they may have it from before a restart).
    seq: u64,
    record: Arc<FlowRecord>,
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn record_time(r: &FlowRecord) -> u64 {
    humantime::parse_rfc3339_weak(&r.time)
        .map(millis)
        .unwrap_or_else(|_| millis(SystemTime::now()))
}

/// Records another node's console hands out at once.
const RELAY_BATCH: usize = 5000;

impl Feed {
    pub fn new(cap: usize) -> Self {
        Self {
            inner: Mutex::new(Records {
                cap: cap.max(1),
                ..Default::default()
            }),
            changed: Condvar::new(),
            epoch: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                .unwrap_or(1),
        }
    }

    /// Add this node's records (the agent calls this as it logs them).
    pub fn push(&self, records: Vec<FlowRecord>) {
        self.add(records, true);
    }

    /// Add records read from the log at start.
    fn history(&self, records: Vec<FlowRecord>) {
        self.add(records, false);
    }

    fn add(&self, records: Vec<FlowRecord>, local: bool) {
        if records.is_empty() {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for record in records {
            let seq = if local {
                g.last_seq += 1;
                g.last_seq
            } else {
                0
            };
            let time = record_time(&record);
            g.items.push_back(Item {
                time,
                seq,
                record: Arc::new(record),
            });
        }
        while g.items.len() > g.cap {
            g.items.pop_front();
        }
        g.generation += 1;
        drop(g);
        self.changed.notify_all();
    }

    /// This node's records numbered after `after` (at most
    /// [`RELAY_BATCH`]), and the number to ask after next time.
    fn local_after(&self, after: u64) -> (u64, Vec<FlowRecord>) {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let after = if after > g.last_seq { 0 } else { after };
        let mut out: Vec<&Item> = g
            .items
            .iter()
            .rev()
            .filter(|i| i.seq != 0)
            .take_while(|i| i.seq > after)
            .collect();
        out.reverse();
        out.truncate(RELAY_BATCH);
        let next = out.last().map_or(g.last_seq.max(after), |i| i.seq);
        (next, out.into_iter().map(|i| (*i.record).clone()).collect())
    }

    /// Wait up to `timeout` for records newer than `seen`; the generation
    /// now.
    fn wait(&self, seen: u64, timeout: Duration) -> u64 {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self
            .changed
            .wait_timeout_while(g, timeout, |r| r.generation == seen)
            .unwrap_or_else(|p| p.into_inner());
        g.generation
    }

    /// Run `f` on the records of the last `window` (all without one). The
    /// lock is held only to take the records, not while `f` runs, so the
    /// agent is never kept waiting by a map being built. (Other nodes'
    /// records arrive late, so the records are not in time order.)
    fn with<T>(
        &self,
        window: Option<Duration>,
        f: impl FnOnce(&mut dyn Iterator<Item = &FlowRecord>) -> T,
    ) -> T {
        let from = window.map_or(0, |w| {
            millis(SystemTime::now())
                .saturating_sub(u64::try_from(w.as_millis()).unwrap_or(u64::MAX))
        });
        let taken: Vec<Arc<FlowRecord>> = {
            let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            g.items
                .iter()
                .filter(|i| i.time >= from)
                .map(|i| Arc::clone(&i.record))
                .collect()
        };
        let mut it = taken.iter().map(|r| &**r);
        f(&mut it)
    }

    fn len(&self) -> usize {
        self.inner.lock().map(|g| g.items.len()).unwrap_or(0)
    }
}

/// Pod facts by `ns/name`, the store generation they were read at, and
/// when.
type MetaCache = (Option<u64>, Instant, Arc<BTreeMap<String, PodMeta>>);

/// The last map built for one view: the feed generation it reflects,
/// when it was built, the map.
type Built = Option<(u64, Instant, Arc<Map>)>;
/// The builds by view, with when each view was last asked for.
type Builds = BTreeMap<(View, Option<Duration>), (Instant, Arc<Mutex<Built>>)>;

/// What the request handlers share.
struct Ctx {
    opts: Options,
    token: String,
    feed: Arc<Feed>,
    /// Pod facts by `ns/name`, with the store generation they were read at.
    meta: Mutex<MetaCache>,
    /// Maps by view: browsers watching the same view share each build.
    maps: Mutex<Builds>,
    /// Live streams now.
    streams: std::sync::atomic::AtomicUsize,
}

impl Ctx {
    fn store(&self) -> Store {
        Store::new(&self.opts.state_dir)
    }

    fn state(&self) -> Result<State> {
        self.store().read().context("read palisade's state")
    }

    fn meta(&self) -> Arc<BTreeMap<String, PodMeta>> {
        let generation = self.store().generation().ok();
        let mut g = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        // A busy cluster changes the store many times a second: read it
        // again at most every 2 s.
        if g.0.is_some() && (g.0 == generation || g.1.elapsed() < Duration::from_secs(2)) {
            return Arc::clone(&g.2);
        }
        let Ok(state) = self.store().read_names() else {
            return Arc::clone(&g.2);
        };
        let mut m = BTreeMap::new();
        for e in state.endpoints.values() {
            let runtime = match e.source {
                EpSource::Cni => format!("CNI ({})", e.network),
                EpSource::Oci => "OCI hook".to_owned(),
            };
            m.insert(
                format!("{}/{}", e.namespace, e.name),
                PodMeta {
                    runtime,
                    node: self.opts.node_name.clone(),
                },
            );
        }
        for r in state.remote.values() {
            m.insert(
                format!("{}/{}", r.namespace, r.name),
                PodMeta {
                    runtime: String::new(),
                    node: r.node.clone(),
                },
            );
        }
        *g = (generation, Instant::now(), Arc::new(m));
        Arc::clone(&g.2)
    }

    fn map(&self, view: &View, window: Option<Duration>) -> Map {
        let meta = self.meta();
        self.feed
            .with(window, |records| console::build(records, view, &meta))
    }

    /// The map of a view for the feed as it is now, built once for every
    /// stream that watches it: a stream waits for a build under way
    /// instead of doing its own. A map with a time window is built again
    /// after a second even without new records (edges age out).
    fn shared_map(&self, view: &View, window: Option<Duration>) -> (u64, Arc<Map>) {
        let slot = {
            let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            // Views nobody asked for in a minute go.
            maps.retain(|_, (used, _)| used.elapsed() < Duration::from_secs(60));
            let entry = maps
                .entry((view.clone(), window))
                .or_insert_with(|| (Instant::now(), Arc::default()));
            entry.0 = Instant::now();
            Arc::clone(&entry.1)
        };
        let mut built = slot.lock().unwrap_or_else(|p| p.into_inner());
        let generation = self.feed.wait(u64::MAX, Duration::ZERO);
        if let Some((g, at, map)) = built.as_ref()
            && *g == generation
            && (window.is_none() || at.elapsed() < Duration::from_secs(1))
        {
            return (*g, Arc::clone(map));
        }
        let map = Arc::new(self.map(view, window));
        *built = Some((generation, Instant::now(), Arc::clone(&map)));
        (generation, map)
    }
}

/// Read or make the token.
fn token(opts: &Options) -> Result<String> {
    if let Some(f) = &opts.token_file {
        let t = fs::read_to_string(f)
            .with_context(|| format!("read the console token from {}", f.display()))?;
        let t = t.trim().to_owned();
        if t.len() < 16
            || !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._~-".contains(c))
        {
            bail!(
                "the console token in {} must be at least 16 characters of A-Z, a-z, 0-9 and \
                 . _ ~ - (it goes into a URL; e.g. `openssl rand -hex 16`)",
                f.display()
            );
        }
        return Ok(t);
    }
    let path = opts.state_dir.join(TOKEN_FILE);
    if let Ok(t) = fs::read_to_string(&path) {
        let t = t.trim();
        if t.len() >= 32 && t.chars().all(|c| c.is_ascii_hexdigit()) {
            return Ok(t.to_owned());
        }
    }
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("read /dev/urandom for the console token")?;
    let t: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&path, &t)?;
    Ok(t)
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("rename {}", tmp.display()))
}

/// Load the flow log's recent records, listen, and serve in the
/// background.
pub fn start(opts: Options, feed: Arc<Feed>) -> Result<()> {
    let addr: SocketAddr = opts.listen.parse().with_context(|| {
        format!(
            "--console-listen {:?}: give an address and port, e.g. 127.0.0.1:9971",
            opts.listen
        )
    })?;
    let token = token(&opts)?;
    let server = tiny_http::Server::http(addr)
        .map_err(|e| anyhow::anyhow!("listen on {addr} for the console: {e}"))?;
    // Where this node reaches the console itself.
    let reach = match addr.ip() {
        std::net::IpAddr::V4(a) if a.is_unspecified() => {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        std::net::IpAddr::V6(a) if a.is_unspecified() => {
            SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    };
    let url = format!("http://{reach}/#token={token}");
    write_private(&opts.state_dir.join(URL_FILE), &format!("{url}\n"))?;
    if !addr.ip().is_loopback() {
        eprintln!(
            "palisade daemon: warning: the console on {addr} speaks plain HTTP: its token \
             crosses the network in clear; reach it through an SSH tunnel or a TLS proxy"
        );
    }
    // The records already logged, so a fresh console shows history.
    let mut old = palisade::flows::read_log(&opts.log_dir);
    let skip = old.len().saturating_sub(opts.max_records);
    old.drain(..skip);
    feed.history(old);
    eprintln!(
        "palisade daemon: console on http://{addr}/ (`palisadectl console` prints the URL with its token)"
    );
    let ctx = Arc::new(Ctx {
        opts,
        token,
        feed,
        meta: Mutex::new((None, Instant::now(), Arc::new(BTreeMap::new()))),
        maps: Mutex::new(BTreeMap::new()),
        streams: std::sync::atomic::AtomicUsize::new(0),
    });
    if ctx.opts.cluster {
        let ctx = Arc::clone(&ctx);
        thread::spawn(move || relay(&ctx, addr.port()));
    }
    thread::spawn(move || {
        for req in server.incoming_requests() {
            let ctx = Arc::clone(&ctx);
            if let Err(e) = thread::Builder::new()
                .name("console".into())
                .spawn(move || handle(&ctx, req))
            {
                eprintln!("palisade daemon: console: no thread for a request: {e}");
            }
        }
    });
    Ok(())
}

/// Forget the URL of an earlier run (the daemon starts without a console).
pub fn forget(state_dir: &Path) {
    match fs::remove_file(state_dir.join(URL_FILE)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => eprintln!("palisade daemon: remove the old console URL: {e}"),
    }
}

/// The URL of a running console, for `palisadectl console`.
pub fn url(state_dir: &Path) -> Result<String> {
    let path = state_dir.join(URL_FILE);
    match fs::read_to_string(&path) {
        Ok(u) => Ok(u.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "the console is off: start the daemon with --console-listen ADDR (e.g. 127.0.0.1:9971)"
        ),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// Fetch the other nodes' records into this console, every second, from
/// where each left off, from all nodes at once. A node whose console does
/// not answer is tried again the next round (and said once).
fn relay(ctx: &Ctx, port: u16) {
    // By node: (its epoch, the number to ask after, whether it answered).
    let mut at: BTreeMap<String, (u64, u64, bool)> = BTreeMap::new();
    let mut nodes = BTreeMap::new();
    let mut read: Option<Instant> = None;
    loop {
        // The store holds the whole cluster: the Nodes are read again
        // every 10 s, not every round.
        if read.is_none_or(|r| r.elapsed() >= Duration::from_secs(10))
            && let Ok(s) = ctx.store().read_names()
        {
            nodes = s.nodes;
            read = Some(Instant::now());
        }
        // The node's InternalIP, else its first address.
        let targets: Vec<(String, SocketAddr, (u64, u64, bool))> = nodes
            .iter()
            .filter_map(|(name, node)| {
                let ip = node.internal.first().or(node.addresses.first())?;
                let state = at.get(name).copied().unwrap_or((0, 0, true));
                Some((name.clone(), SocketAddr::new(*ip, port), state))
            })
            .collect();
        let answers: Vec<Result<(u64, u64, Vec<FlowRecord>)>> = thread::scope(|sc| {
            let handles: Vec<_> = targets
                .iter()
                .map(|(_, addr, (_, after, _))| {
                    sc.spawn(move || fetch_records(*addr, &ctx.token, *after))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("the fetch panicked")))
                })
                .collect()
        });
        for ((name, addr, (epoch, after, ok)), answer) in targets.into_iter().zip(answers) {
            match answer {
                Ok((e, next, records)) => {
                    if e != epoch && epoch != 0 && after != 0 {
                        // It restarted: read it again from the start.
                        at.insert(name, (e, 0, true));
                        continue;
                    }
                    if !ok {
                        eprintln!("palisade daemon: console: node {name}'s records arrive again");
                    }
                    ctx.feed.add(records, false);
                    at.insert(name, (e, next, true));
                }
                Err(e) => {
                    if ok {
                        eprintln!(
                            "palisade daemon: console: no records from node {name} ({addr}): {e:#}"
                        );
                    }
                    at.insert(name, (epoch, after, false));
                }
            }
        }
        at.retain(|n, _| nodes.contains_key(n));
        thread::sleep(Duration::from_secs(1));
    }
}

/// One `GET /api/records` from another node's console.
fn fetch_records(addr: SocketAddr, token: &str, after: u64) -> Result<(u64, u64, Vec<FlowRecord>)> {
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).context("connect")?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /api/records?after={after} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n"
    )?;
    let mut body = Vec::new();
    s.take(256 << 20).read_to_end(&mut body)?;
    let split = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP header in the answer")?;
    let head = String::from_utf8_lossy(&body[..split]);
    let status = head.split_whitespace().nth(1).unwrap_or_default();
    if status != "200" {
        bail!(
            "answered {} (the same --console-token-file on every node?)",
            head.lines().next().unwrap_or_default()
        );
    }
    let v: Value = serde_json::from_slice(&body[split + 4..]).context("the answer is not JSON")?;
    let records = serde_json::from_value(v["records"].clone()).context("the records")?;
    Ok((
        v["epoch"].as_u64().unwrap_or(0),
        v["next"].as_u64().unwrap_or(after),
        records,
    ))
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| char::from(c).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(url: &str) -> (String, BTreeMap<String, String>) {
    let (path, q) = url.split_once('?').unwrap_or((url, ""));
    let params = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    (path.to_owned(), params)
}

fn header<'a>(req: &'a tiny_http::Request, name: &'static str) -> Option<&'a str> {
    req.headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str())
}

/// Compare without stopping at the first difference.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn authorised(ctx: &Ctx, req: &tiny_http::Request) -> bool {
    header(req, "Authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
        .is_some_and(|b| same(b.trim(), &ctx.token))
}

type Resp = tiny_http::Response<std::io::Cursor<Vec<u8>>>;

fn with_type(r: Resp, ctype: &str) -> Resp {
    let mut r = r;
    for (k, v) in [
        ("Content-Type", ctype),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        ("X-Frame-Options", "DENY"),
        (
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'",
        ),
    ] {
        if let Ok(h) = tiny_http::Header::from_bytes(k, v) {
            r = r.with_header(h);
        }
    }
    r
}

fn json_resp(status: u16, v: &Value) -> Resp {
    with_type(
        tiny_http::Response::from_string(v.to_string()).with_status_code(status),
        "application/json",
    )
}

fn error(status: u16, message: impl Into<String>) -> Resp {
    json_resp(status, &json!({"error": message.into()}))
}

fn view_of(params: &BTreeMap<String, String>) -> Result<(View, Option<Duration>), String> {
    let get = |k: &str| params.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let verdict = match get("verdict") {
        None => None,
        Some("allowed") => Some(Verdict::Allow),
        Some("denied") => Some(Verdict::Deny),
        Some("audit") => Some(Verdict::Audit),
        Some(v) => return Err(format!("verdict {v:?}: use allowed, denied or audit")),
    };
    let port = match get("port") {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .map_err(|_| format!("port {p:?}: give a number from 1 to 65535"))?,
        ),
    };
    let window = match get("window") {
        None | Some("all") => None,
        Some(w) => Some(
            humantime::parse_duration(w)
                .map_err(|e| format!("window {w:?}: {e} (e.g. 30s, 5m, 1h)"))?,
        ),
    };
    Ok((
        View {
            level: Level::parse(get("level").unwrap_or(""))?,
            namespace: get("namespace").map(str::to_owned),
            pod: get("pod").map(str::to_owned),
            verdict,
            port,
        },
        window,
    ))
}

fn handle(ctx: &Ctx, mut req: tiny_http::Request) {
    let (path, params) = query(req.url());
    let method = req.method().clone();
    // The page, its script and style hold no data: served to anyone. The
    // API needs the token.
    let page = match (&method, path.as_str()) {
        (tiny_http::Method::Get, "/") => Some((INDEX_HTML, "text/html; charset=utf-8")),
        (tiny_http::Method::Get, "/console.js") => {
            Some((CONSOLE_JS, "text/javascript; charset=utf-8"))
        }
        (tiny_http::Method::Get, "/console.css") => Some((CONSOLE_CSS, "text/css; charset=utf-8")),
        _ => None,
    };
    if let Some((body, ctype)) = page {
        let _ = req.respond(with_type(tiny_http::Response::from_string(body), ctype));
        return;
    }
    if !authorised(ctx, &req) {
        let _ = req.respond(error(
            401,
            "no console token: open the URL that `palisadectl console` prints on the node \
             (it carries the token), or send Authorization: Bearer TOKEN",
        ));
        return;
    }
    if method == tiny_http::Method::Post {
        // A write must come from the console's own page (whatever scheme a
        // TLS proxy in front adds).
        let host = header(&req, "Host").unwrap_or_default().to_owned();
        if let Some(origin) = header(&req, "Origin").map(str::to_owned)
            && origin.split_once("://").map(|(_, h)| h) != Some(host.as_str())
        {
            let _ = req.respond(error(403, format!("a write from {origin} is refused")));
            return;
        }
    }
    let resp = match (method, path.as_str()) {
        (tiny_http::Method::Get, "/api/status") => json_resp(
            200,
            &json!({
                "node": ctx.opts.node_name,
                "external": ctx.opts.external,
                "records": ctx.feed.len(),
            }),
        ),
        (tiny_http::Method::Get, "/api/records") => {
            // This node's own records, for the other nodes' consoles.
            let after = params
                .get("after")
                .and_then(|a| a.parse().ok())
                .unwrap_or(0);
            let (next, records) = ctx.feed.local_after(after);
            json_resp(
                200,
                &json!({"epoch": ctx.feed.epoch, "next": next, "records": records}),
            )
        }
        (tiny_http::Method::Get, "/api/map") => match view_of(&params) {
            Ok((view, window)) => {
                let map = ctx.map(&view, window);
                json_resp(
                    200,
                    &json!({
                        "level": map.level,
                        "nodes": map.nodes.values().collect::<Vec<_>>(),
                        "edges": map.edges.values().collect::<Vec<_>>(),
                    }),
                )
            }
            Err(e) => error(400, e),
        },
        (tiny_http::Method::Get, "/api/stream") => match view_of(&params) {
            Ok((view, window)) => {
                use std::sync::atomic::Ordering;
                if ctx.streams.fetch_add(1, Ordering::SeqCst) >= MAX_STREAMS {
                    ctx.streams.fetch_sub(1, Ordering::SeqCst);
                    error(503, format!("{MAX_STREAMS} live maps are open already"))
                } else {
                    stream(ctx, req, &view, window);
                    ctx.streams.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
            }
            Err(e) => error(400, e),
        },
        (tiny_http::Method::Get, "/api/edge") => match edge(ctx, &params) {
            Ok(v) => json_resp(200, &v),
            Err(e) => error(400, format!("{e:#}")),
        },
        (tiny_http::Method::Get, "/api/learn") => match learned(ctx, &params) {
            Ok(v) => json_resp(200, &v),
            Err(e) => error(400, format!("{e:#}")),
        },
        (tiny_http::Method::Get, "/api/policies") => match policies(ctx, &params) {
            Ok(v) => json_resp(200, &v),
            Err(e) => error(500, format!("{e:#}")),
        },
        (tiny_http::Method::Post, "/api/apply") => {
            let mut body = String::new();
            match req.as_reader().take(4 << 20).read_to_string(&mut body) {
                Ok(_) => apply(ctx, &body),
                Err(e) => error(400, format!("read the request: {e}")),
            }
        }
        _ => error(404, format!("no {path} here")),
    };
    let _ = req.respond(resp);
}

/// A live map: a full map first, then what changed, as server-sent events.
fn stream(ctx: &Ctx, req: tiny_http::Request, view: &View, window: Option<Duration>) {
    let mut w = req.into_writer();
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\nConnection: close\r\nX-Accel-Buffering: no\r\n\r\n";
    if w.write_all(head.as_bytes())
        .and_then(|()| w.flush())
        .is_err()
    {
        return;
    }
    let mut last: Option<Arc<Map>> = None;
    let mut seen = u64::MAX;
    let mut sent = Instant::now();
    let mut built: Option<Instant> = None;
    loop {
        let generation = ctx.feed.wait(seen, Duration::from_secs(1));
        // With a time window, edges age out without new records.
        let due = generation != seen
            || (window.is_some() && built.is_none_or(|b| b.elapsed() >= Duration::from_secs(1)));
        if due {
            if let Some(rest) = built.and_then(|b| STREAM_EVERY.checked_sub(b.elapsed())) {
                thread::sleep(rest);
            }
            let (generation, map) = ctx.shared_map(view, window);
            built = Some(Instant::now());
            seen = generation;
            if let Some(d) = console::diff(last.as_deref(), &map) {
                let Ok(data) = serde_json::to_string(&d) else {
                    return;
                };
                if write!(w, "event: map\ndata: {data}\n\n")
                    .and_then(|()| w.flush())
                    .is_err()
                {
                    return;
                }
                sent = Instant::now();
            }
            last = Some(map);
        }
        if sent.elapsed() >= KEEPALIVE_EVERY {
            if w.write_all(b": keepalive\n\n")
                .and_then(|()| w.flush())
                .is_err()
            {
                return;
            }
            sent = Instant::now();
        }
    }
}

/// How explain names a side of a flow.
fn party_ref(p: &FlowParty) -> String {
    match (&p.namespace, &p.name) {
        (Some(ns), Some(n)) => format!("{ns}/{n}"),
        _ => p.address.to_string(),
    }
}

fn port_arg(protocol: &str, dport: u16) -> String {
    if dport == 0 {
        protocol.to_ascii_lowercase()
    } else {
        format!("{dport}/{protocol}")
    }
}

/// An edge: its records, and the explanation of its latest connections.
fn edge(ctx: &Ctx, params: &BTreeMap<String, String>) -> Result<Value> {
    let (view, window) = view_of(params).map_err(anyhow::Error::msg)?;
    let id = params.get("id").context("give the edge's id (id=...)")?;
    let map = ctx.map(&view, window);
    let Some(e) = map.edges.get(id) else {
        bail!("no edge {id} on the map with these filters (it may have left the time window)");
    };
    let level = map.level.unwrap_or(Level::Pod);
    let records: Vec<FlowRecord> = ctx.feed.with(window, |rs| {
        console::edge_records(rs, &view, level, e, EDGE_RECORDS)
            .into_iter()
            .cloned()
            .collect()
    });
    let state = ctx.state()?;
    let mut seen = BTreeSet::new();
    let mut explained = Vec::new();
    let mut isolated: BTreeSet<String> = BTreeSet::new();
    for r in records.iter().rev() {
        isolated.extend(r.isolated_by.iter().cloned());
        let (from, to) = (party_ref(r.client()), party_ref(r.server()));
        let port = port_arg(&r.protocol, r.dport);
        if explained.len() >= EDGE_EXPLAINED
            || !seen.insert((from.clone(), to.clone(), port.clone()))
        {
            continue;
        }
        let one = || -> Result<Value> {
            let (proto, p) = explain::parse_port(&port)?;
            let x = explain::explain(
                &state,
                &PartyRef::parse(&from)?,
                &PartyRef::parse(&to)?,
                proto,
                p,
            )?;
            Ok(json!({
                "from": from,
                "to": to,
                "port": port,
                "verdict": if x.allowed { "allowed" } else { "denied" },
                "text": x.to_string(),
                "explanation": x,
            }))
        };
        explained.push(one().unwrap_or_else(
            |e| json!({"from": from, "to": to, "port": port, "error": format!("{e:#}")}),
        ));
    }
    Ok(json!({
        "edge": e,
        "records": records,
        "explanations": explained,
        "isolatedBy": isolated,
    }))
}

/// Policies learned from the records of the map's window, for a
/// namespace or one workload (a map node id).
fn learned(ctx: &Ctx, params: &BTreeMap<String, String>) -> Result<Value> {
    let (_, window) = view_of(params).map_err(anyhow::Error::msg)?;
    let get = |k: &str| params.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let mode = match get("mode") {
        None => None,
        Some(m) => Some(Mode::parse(m, "mode").map_err(|e| anyhow::anyhow!("{e}"))?),
    };
    // A workload: its namespace and selector, from its map node id.
    let workload: Option<(String, BTreeMap<String, String>)> = match get("workload") {
        None => None,
        Some(id) => {
            // The id of a workload node, or of one of its pods.
            let meta = BTreeMap::new();
            let node = ctx
                .feed
                .with(window, |rs| {
                    rs.flat_map(|r| [&r.endpoint, &r.peer]).find_map(|p| {
                        let w = console::node_of(p, Level::Workload, &meta);
                        (w.id == id || console::node_of(p, Level::Pod, &meta).id == id).then_some(w)
                    })
                })
                .with_context(|| format!("no workload {id} in the records of this window"))?;
            if node.kind != "workload" {
                bail!(
                    "{id} has no labels: no policy can select it by label (label it and learn again)"
                );
            }
            Some((node.group.clone(), node.labels.clone()))
        }
    };
    let records: Vec<FlowRecord> = ctx.feed.with(window, |rs| rs.cloned().collect());
    let namespace = workload
        .as_ref()
        .map(|(ns, _)| ns.clone())
        .or_else(|| get("namespace").map(str::to_owned));
    let l = learn::learn(
        &records,
        &learn::Options {
            include_denied: false,
            mode,
            namespace,
            baseline: false,
        },
    );
    let (yaml, report, count) = match &workload {
        None => (l.yaml, l.report, l.policies),
        Some((ns, selector)) => {
            let mut docs = Vec::new();
            let mut names = Vec::new();
            for d in serde_yaml::Deserializer::from_str(&l.yaml) {
                let v = serde_yaml::Value::deserialize(d).context("read the learned YAML")?;
                let sel: BTreeMap<String, String> =
                    serde_yaml::from_value(v["spec"]["podSelector"]["matchLabels"].clone())
                        .unwrap_or_default();
                if &sel == selector {
                    if let Some(n) = v["metadata"]["name"].as_str() {
                        names.push(format!("{ns}/{n} "));
                    }
                    docs.push(serde_yaml::to_string(&v).context("write YAML")?);
                }
            }
            let report = l
                .report
                .into_iter()
                .filter(|line| names.iter().any(|n| line.starts_with(n.as_str())))
                .collect();
            let count = docs.len();
            (docs.join("---\n"), report, count)
        }
    };
    Ok(json!({
        "yaml": yaml,
        "report": report,
        "policies": count,
        "records": records.len(),
        "external": ctx.opts.external,
    }))
}

use serde::Deserialize as _;

/// Set every policy's mode annotation in YAML documents.
fn with_mode(yaml: &str, mode: Mode) -> Result<String> {
    let mut docs = Vec::new();
    for d in serde_yaml::Deserializer::from_str(yaml) {
        let mut v = serde_yaml::Value::deserialize(d).context("the YAML does not parse")?;
        if v.is_null() {
            continue;
        }
        let Some(meta) = v.get_mut("metadata").and_then(|m| m.as_mapping_mut()) else {
            bail!("a document has no metadata: every policy needs a name");
        };
        let annotations = meta
            .entry("annotations".into())
            .or_insert_with(|| serde_yaml::Value::Mapping(Default::default()));
        if annotations.is_null() {
            *annotations = serde_yaml::Value::Mapping(Default::default());
        }
        let Some(a) = annotations.as_mapping_mut() else {
            bail!("metadata.annotations is not a map");
        };
        a.insert(MODE_ANNOTATION.into(), mode.as_str().into());
        docs.push(serde_yaml::to_string(&v).context("write YAML")?);
    }
    if docs.is_empty() {
        bail!("no policies in the YAML");
    }
    Ok(docs.join("---\n"))
}

/// Apply policies in a mode, as `palisadectl apply` would.
fn apply(ctx: &Ctx, body: &str) -> Resp {
    if let Some(ext) = &ctx.opts.external {
        return error(
            409,
            format!(
                "the policies of this node come from {ext}: download the YAML and apply it there"
            ),
        );
    }
    let req: Value = match serde_json::from_str(body) {
        Ok(v) => v,
        Err(e) => return error(400, format!("the request is not JSON: {e}")),
    };
    let Some(yaml) = req["yaml"].as_str() else {
        return error(
            400,
            "give the policies as {\"yaml\": \"...\", \"mode\": \"audit\"}",
        );
    };
    let mode = match req["mode"].as_str() {
        Some("audit") => Mode::Audit,
        Some("enforce") => Mode::Enforce,
        other => return error(400, format!("mode {other:?}: use audit or enforce")),
    };
    let text = match with_mode(yaml, mode) {
        Ok(t) => t,
        Err(e) => return error(400, format!("{e:#}")),
    };
    let paths = Paths {
        state_dir: ctx.opts.state_dir.clone(),
        bpf_root: ctx.opts.bpf_root.clone(),
        socket: ctx.opts.socket.clone(),
        attach_mode: AttachMode::Auto,
        map_sizes: None,
    };
    let report = Control::open(&paths).and_then(|mut c| {
        c.apply_sources(vec![Source {
            name: "console".into(),
            text,
        }])
    });
    match report {
        Ok(r) => json_resp(
            200,
            &json!({
                "mode": mode.as_str(),
                "changes": r.changes.iter().map(|(o, c)| json!({"object": o.to_string(), "change": c.as_str()})).collect::<Vec<_>>(),
                "warnings": r.warnings,
            }),
        ),
        Err(e) => error(400, e.to_string()),
    }
}

fn describe_rule(rule: &palisade::policy::Rule, own_ns: &str) -> String {
    use palisade::policy::{NamespaceScope, Peer};
    let peers = if rule.peers.is_empty() {
        "any peer".to_owned()
    } else {
        rule.peers
            .iter()
            .map(|p| match p {
                Peer::Pods {
                    namespaces: NamespaceScope::Own,
                    pods,
                } => format!("pods {} in {own_ns}", pods.describe()),
                Peer::Pods {
                    namespaces: NamespaceScope::Matching(ns),
                    pods,
                } => format!("pods {} in namespaces {}", pods.describe(), ns.describe()),
                Peer::IpBlock(b) => b.to_string(),
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let ports = if rule.ports.is_empty() {
        "any port".to_owned()
    } else {
        rule.ports
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!("{peers} on {ports}")
}

/// The policies in force on each pod of this node, and the pods each
/// policy selects.
fn policies(ctx: &Ctx, params: &BTreeMap<String, String>) -> Result<Value> {
    let state = ctx.state()?;
    let only = params.get("namespace").filter(|n| !n.is_empty());
    let namespaces = state.namespace_map();
    let mut pods = Vec::new();
    let mut selects: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in state.endpoints.values() {
        if only.is_some_and(|n| *n != e.namespace) {
            continue;
        }
        let labels = state.effective_labels(e);
        let pod = format!("{}/{}", e.namespace, e.name);
        let mut in_force = Vec::new();
        let (mut ingress, mut egress) = (Vec::new(), Vec::new());
        for sp in state.policies.values() {
            let p = &sp.policy;
            if !p.selects(&e.namespace, &labels) {
                continue;
            }
            let name = format!("{}/{}", p.namespace, p.name);
            selects.entry(name.clone()).or_default().push(pod.clone());
            let mode = state.effective_mode(p, &namespaces);
            if p.ingress_isolation {
                ingress.extend(
                    p.ingress
                        .iter()
                        .map(|r| json!({"policy": name, "allows": describe_rule(r, &p.namespace)})),
                );
            }
            if p.egress_isolation {
                egress.extend(
                    p.egress
                        .iter()
                        .map(|r| json!({"policy": name, "allows": describe_rule(r, &p.namespace)})),
                );
            }
            in_force.push(json!({
                "name": name,
                "kind": "NetworkPolicy",
                "mode": mode.as_str(),
                "ingress": p.ingress_isolation,
                "egress": p.egress_isolation,
            }));
        }
        let ns_labels = namespaces
            .get(&e.namespace)
            .map(|n| n.labels.clone())
            .unwrap_or_default();
        for t in state.tier_policies.values() {
            if palisade::tiers::selects(&t.policy, &ns_labels, &labels) {
                let name = format!("{:?}/{}", t.policy.kind, t.policy.name);
                selects.entry(name.clone()).or_default().push(pod.clone());
                in_force.push(json!({
                    "name": name,
                    "kind": format!("{:?}", t.policy.kind),
                    "priority": t.policy.priority,
                    "mode": t.policy.mode.unwrap_or(state.mode).as_str(),
                }));
            }
        }
        pods.push(json!({
            "pod": pod,
            "labels": labels,
            "policies": in_force,
            // Isolated in a direction: only what these rules allow passes.
            "ingressIsolated": !ingress.is_empty() || in_force.iter().any(|p| p["ingress"] == true),
            "egressIsolated": !egress.is_empty() || in_force.iter().any(|p| p["egress"] == true),
            "ingressAllows": ingress,
            "egressAllows": egress,
        }));
    }
    Ok(json!({
        "pods": pods,
        "selects": selects,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_decoded() {
        let (path, q) = query("/api/edge?id=pod%3Ax%2Fa%3Epod%3Ax%2Fb%3Edenied&port=&w=a+b");
        assert_eq!(path, "/api/edge");
        assert_eq!(q["id"], "pod:x/a>pod:x/b>denied");
        assert_eq!(q["port"], "");
        assert_eq!(q["w"], "a b");
        assert_eq!(decode("%zz%4"), "%zz%4");
        assert_eq!(decode("%C3%A9%"), "é%");
    }

    #[test]
    fn the_mode_is_set_on_every_policy_and_bad_yaml_is_refused() {
        let y = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a, namespace: x}\nspec: {podSelector: {}}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b, namespace: x, annotations: {palisade.io/mode: audit, keep: me}}\nspec: {podSelector: {}}\n";
        let out = with_mode(y, Mode::Enforce).unwrap();
        assert_eq!(out.matches("palisade.io/mode: enforce").count(), 2, "{out}");
        assert!(out.contains("keep: me"), "{out}");
        assert!(with_mode("", Mode::Audit).is_err());
        assert!(with_mode("kind: [", Mode::Audit).is_err());
        assert!(
            with_mode("kind: NetworkPolicy\n", Mode::Audit)
                .unwrap_err()
                .to_string()
                .contains("no metadata")
        );
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
    }
}
