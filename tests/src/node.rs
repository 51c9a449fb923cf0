//! A hermetic node: a network namespace standing in for the host, its own
//! bpffs and state directories, the real bridge + host-local plugins
//! followed by palisade, containers (namespaces) hanging off it, and
//! optionally an outside host ("world") routed through the node. Dropping
//! the node removes all of it, pass or fail.

use std::{
    io::{BufRead, BufReader},
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use palisade::daemon::REQUIRE_DAEMON_ENV;

use crate::{
    chain::{Call, Chain},
    sys::{self, Netns, describe},
};

/// IPv4 pod subnet of every test node (nodes are isolated namespaces, so
/// they may all use the same one).
pub const POD_SUBNET_V4: &str = "10.100.0.0/24";
pub const POD_SUBNET_V6: &str = "fd00:100::/120";
pub const GATEWAY_V4: &str = "10.100.0.1";
pub const WORLD_V4: &str = "203.0.113.10";
pub const WORLD_V6: &str = "2001:db8:cafe::10";
const WORLD_NODE_V4: &str = "203.0.113.1";
const WORLD_NODE_V6: &str = "2001:db8:cafe::1";

/// How to build a node.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Give pods IPv6 addresses too.
    pub ipv6: bool,
    /// Add an outside host routed through the node.
    pub world: bool,
    /// cniVersion of the conflist.
    pub cni_version: String,
    /// Extra settings for the palisade plugin entry.
    pub palisade: serde_json::Map<String, Value>,
    /// Ports the world host serves.
    pub world_ports: Vec<u16>,
    /// Run the node daemon, and make every palisade command and plugin
    /// fail unless it answers (default: `PALISADE_TEST_DAEMON=1`).
    pub daemon: bool,
    /// The pods' subnets (nodes of one cluster need different ones).
    pub pod_subnet_v4: String,
    pub pod_subnet_v6: String,
    /// The primary CNI plugin.
    pub primary: Primary,
    /// Cluster mode: the daemon watches this API server as this node.
    pub kube: Option<KubeNode>,
    /// Do not start the daemon in [`Node::new`]: the caller finishes the
    /// node's network first (a cluster wires it to the fabric, so that the
    /// agent's first connection to the API server already has a route),
    /// then calls [`Node::start_daemon`].
    pub defer_daemon: bool,
    /// More arguments for `palisadectl daemon`.
    pub daemon_args: Vec<String>,
}

/// The plugin palisade chains after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Primary {
    /// One bridge, pods on it (bridge; Flannel's setup).
    Bridge,
    /// A veth per pod routed by the host (ptp; Calico's setup).
    Ptp,
}

/// A node of a cluster: what its daemon is told.
#[derive(Debug, Clone)]
pub struct KubeNode {
    pub kubeconfig: PathBuf,
    pub node_name: String,
}

/// Map capacities for a large node (those of releases before the defaults
/// became a small node's), as a conflist's `mapSizes`: for benchmarks that
/// fill a node with tens of thousands of endpoints or rules.
pub fn large_map_sizes() -> Value {
    serde_json::json!({
        "endpoints": 65536,
        "sourceAddresses": 131072,
        "cidrs": 262144,
        "addresses": 262144,
        "policy": 1048576,
        // Per endpoint and direction (memory: 16 bytes a flow of budget
        // for the table's buckets, whatever it holds).
        "conntrack": 2048,
        "fragments": 64,
        "counters": 16384,
        "eventBytes": 1048576,
        "services": 65536,
        "serviceFlows": 65536
    })
}

/// The same as [`large_map_sizes`], for a dataplane created directly.
pub fn large_map_sizes_typed() -> palisade::dataplane::MapSizes {
    let v = large_map_sizes();
    palisade::dataplane::MapSizes::with(
        v.as_object()
            .expect("object")
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_u64().expect("number"))),
    )
    .expect("valid sizes")
}

/// Whether tests run their nodes with the daemon (`PALISADE_TEST_DAEMON=1`).
pub fn daemon_mode() -> bool {
    std::env::var("PALISADE_TEST_DAEMON").is_ok_and(|v| v == "1")
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            ipv6: false,
            world: false,
            cni_version: "1.0.0".into(),
            palisade: serde_json::Map::new(),
            world_ports: vec![80, 81],
            daemon: daemon_mode(),
            pod_subnet_v4: POD_SUBNET_V4.into(),
            pod_subnet_v6: POD_SUBNET_V6.into(),
            primary: Primary::Bridge,
            kube: None,
            defer_daemon: false,
            daemon_args: Vec::new(),
        }
    }
}

/// A running container.
#[derive(Debug)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub container_id: String,
    pub netns: PathBuf,
    pub v4: Option<IpAddr>,
    pub v6: Option<IpAddr>,
    pub result: Value,
}

impl Pod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn addr(&self, v6: bool) -> IpAddr {
        let a = if v6 { self.v6 } else { self.v4 };
        a.unwrap_or_else(|| {
            panic!(
                "pod {} has no IPv{} address",
                self.key(),
                if v6 { 6 } else { 4 }
            )
        })
    }

    pub fn call(&self) -> Call {
        Call {
            container_id: self.container_id.clone(),
            netns: self.netns.display().to_string(),
            ifname: "eth0".into(),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                self.namespace, self.name
            ),
        }
    }
}

#[derive(Debug)]
struct Running {
    server: Option<Child>,
    netns: Netns,
}

/// The outside host.
#[derive(Debug)]
pub struct World {
    pub netns: Netns,
    server: Option<Child>,
}

#[derive(Debug)]
pub struct Node {
    pub prefix: String,
    pub netns: Netns,
    pub dir: PathBuf,
    pub bpf_mount: PathBuf,
    pub bpf_root: PathBuf,
    pub state_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub chain: Chain,
    pub options: NodeOptions,
    running: Mutex<Vec<Running>>,
    pub world: Option<World>,
    /// The node daemon, when the node runs one.
    daemon: Mutex<Option<Child>>,
    /// More environment for the daemon's next start (a test's fault points).
    pub daemon_env: Mutex<Vec<(String, String)>>,
}

/// Directory with the workspace's binaries (`palisade`, `palisadectl`, the
/// probe): `PALISADE_BIN_DIR`, else next to the test executable.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("PALISADE_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    for bin in ["palisade", "palisadectl", "palisade-probe"] {
        if !dir.join(bin).exists() {
            panic!(
                "{} is missing: build the workspace first (cargo build --workspace), or set PALISADE_BIN_DIR",
                dir.join(bin).display()
            );
        }
    }
    dir
}

fn start_server(netns: &Netns, ports: &[u16]) -> Child {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let mut child = netns
        .command(bin_dir().join("palisade-probe"))
        .args(["serve", "--ports", &ports.join(",")])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("start the probe server in {}: {e}", netns.name));
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("probe server in {} did not start: {e}", netns.name));
    assert_eq!(
        line.trim(),
        "ready",
        "probe server in {} did not report ready",
        netns.name
    );
    child
}

/// Create the bridge the bridge plugin will find, with an address set by
/// hand. A Linux bridge whose address was never set takes the lowest
/// address of its ports, so it changes as veths come and go; the reference
/// plugin's CHECK compares the bridge address in prevResult with the
/// current one and would fail at random (seen with 50 concurrent ADDs). An
/// address set by hand is kept by the kernel, as on a real node whose
/// bridge has lived for a while.
fn make_bridge_with_fixed_mac(netns: &Netns, prefix: &str) {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(prefix, &mut h);
    let b = std::hash::Hasher::finish(&h).to_be_bytes();
    let mac = format!("02:70:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3]);
    let ns = netns.name.as_str();
    sys::ip(&["-n", ns, "link", "add", "cni0", "type", "bridge"]);
    sys::ip(&["-n", ns, "link", "set", "cni0", "address", &mac]);
    sys::ip(&["-n", ns, "link", "set", "cni0", "up"]);
}

impl Node {
    pub fn new(options: NodeOptions) -> Self {
        sys::require_root();
        sys::sweep_stale();
        let prefix = sys::unique_prefix();
        let dir = PathBuf::from(crate::TEST_ROOT).join(&prefix);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let bpf_mount = dir.join("bpf");
        std::fs::create_dir_all(&bpf_mount).expect("create bpf dir");
        nix::mount::mount(
            Some("bpf"),
            &bpf_mount,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mount bpffs at {}: {e}", bpf_mount.display()));
        let bpf_root = bpf_mount.join("palisade");
        let state_dir = dir.join("state");
        let netns = Netns::new(&format!("{prefix}n"));
        netns.sysctl("net.ipv4.ip_forward", "1");
        netns.sysctl("net.ipv6.conf.all.forwarding", "1");
        netns.sysctl("net.ipv6.conf.default.accept_dad", "0");
        netns.sysctl("net.ipv6.conf.all.accept_dad", "0");
        if options.primary == Primary::Bridge {
            make_bridge_with_fixed_mac(&netns, &prefix);
        }

        let mut ranges = vec![json!([{ "subnet": options.pod_subnet_v4 }])];
        if options.ipv6 {
            ranges.push(json!([{ "subnet": options.pod_subnet_v6 }]));
        }
        let ipam = json!({"type": "host-local", "ranges": ranges, "dataDir": dir.join("ipam")});
        let primary = match options.primary {
            Primary::Bridge => json!({
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "isDefaultGateway": true,
                "ipMasq": false,
                "hairpinMode": false,
                "ipam": ipam
            }),
            Primary::Ptp => {
                // ptp gives pods only what IPAM says: default routes here.
                let mut ipam = ipam;
                let mut routes = vec![json!({"dst": "0.0.0.0/0"})];
                if options.ipv6 {
                    routes.push(json!({"dst": "::/0"}));
                }
                ipam["routes"] = json!(routes);
                json!({"type": "ptp", "ipMasq": false, "ipam": ipam})
            }
        };
        let mut palisade = options.palisade.clone();
        palisade.insert("type".into(), json!("palisade"));
        palisade.insert("stateDir".into(), json!(state_dir));
        palisade.insert("bpfRoot".into(), json!(bpf_root));
        let conflist = json!({
            "cniVersion": options.cni_version,
            "name": "palisade-test",
            "plugins": [primary, Value::Object(palisade)]
        });
        let bin = bin_dir();
        let mut chain = Chain::new(conflist, &netns.path, &bin);
        if options.daemon {
            chain.env.push((REQUIRE_DAEMON_ENV.into(), "1".into()));
        }
        let mut node = Self {
            prefix,
            netns,
            dir,
            bpf_mount,
            bpf_root,
            state_dir,
            bin_dir: bin,
            chain,
            options: options.clone(),
            running: Mutex::new(Vec::new()),
            world: None,
            daemon: Mutex::new(None),
            daemon_env: Mutex::new(Vec::new()),
        };
        if options.world {
            node.world = Some(node.make_world());
        }
        if (options.daemon || options.kube.is_some()) && !options.defer_daemon {
            node.start_daemon();
        }
        node
    }

    pub fn daemon_log(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    /// Start `palisadectl daemon` in the node namespace and wait until it
    /// answers on its socket.
    pub fn start_daemon(&self) {
        let mut slot = self.daemon.lock().expect("lock");
        assert!(slot.is_none(), "the node's daemon runs already");
        // The last line of the daemon's start (its agent): counted before,
        // waited for after, so that a test's next step never overlaps the
        // start (the proxies' setup, the first commits).
        const STARTED: &str = "palisade agent: flow log in";
        let starts_before = self.daemon_output().matches(STARTED).count();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.daemon_log())
            .expect("daemon log");
        let mut cmd = std::process::Command::new(self.bin_dir.join("palisadectl"));
        cmd.arg("daemon");
        if let Some(k) = &self.options.kube {
            cmd.arg("--kubernetes")
                .arg("--kubeconfig")
                .arg(&k.kubeconfig)
                .arg("--node-name")
                .arg(&k.node_name);
        }
        // The daemon creates the maps with the capacities the conflist
        // asks for, as an operator configures both alike.
        if let Some(sizes) = self
            .options
            .palisade
            .get("mapSizes")
            .and_then(Value::as_object)
        {
            for (k, v) in sizes {
                cmd.arg("--map-size").arg(format!("{k}={v}"));
            }
        }
        cmd.args(&self.options.daemon_args);
        cmd.envs(self.daemon_env.lock().expect("lock").clone());
        cmd.env("PALISADE_STATE_DIR", &self.state_dir)
            .env("PALISADE_LOG", "info")
            .env("PALISADE_BPF_ROOT", &self.bpf_root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let mut child =
            sys::spawn_in(&self.netns.path, &mut cmd).expect("spawn palisadectl daemon");
        let socket = palisade::daemon::default_socket(&self.state_dir);
        let start = Instant::now();
        while palisade::daemon::Client::connect(&socket, &self.bpf_root).is_none() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "palisadectl daemon exited ({status}) before it served:\n{}",
                    self.daemon_output()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "palisadectl daemon did not answer on {} within 60 s:\n{}",
                socket.display(),
                self.daemon_output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        while self.daemon_output().matches(STARTED).count() <= starts_before {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "palisadectl daemon exited ({status}) before it finished starting:\n{}",
                    self.daemon_output()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "palisadectl daemon did not finish starting within 60 s:\n{}",
                self.daemon_output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        *slot = Some(child);
    }

    /// Kill the daemon with SIGKILL (enforcement must not notice).
    pub fn kill_daemon(&self) {
        if let Some(mut child) = self.daemon.lock().expect("lock").take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Wait up to `timeout` for the daemon to exit by itself; its exit
    /// status, or `None` if it still runs (or never ran).
    pub fn wait_daemon_exit(&self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            let mut slot = self.daemon.lock().expect("lock");
            let status = slot.as_mut()?.try_wait().ok().flatten();
            if let Some(status) = status {
                *slot = None;
                return Some(status);
            }
            drop(slot);
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the daemon printed so far.
    pub fn daemon_output(&self) -> String {
        std::fs::read_to_string(self.daemon_log()).unwrap_or_default()
    }

    /// The daemon's process id, when it runs.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.lock().expect("lock").as_ref().map(Child::id)
    }

    /// Whether the node's daemon process is alive.
    pub fn daemon_alive(&self) -> bool {
        self.daemon
            .lock()
            .expect("lock")
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn make_world(&self) -> World {
        let ns = Netns::new(&format!("{}w", self.prefix));
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0");
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0");
        let node = &self.netns.name;
        sys::ip(&[
            "-n", node, "link", "add", "pwrld", "type", "veth", "peer", "name", "eth0", "netns",
            &ns.name,
        ]);
        sys::ip(&[
            "-n",
            node,
            "addr",
            "add",
            &format!("{WORLD_NODE_V4}/24"),
            "dev",
            "pwrld",
        ]);
        sys::ip(&[
            "-n",
            node,
            "addr",
            "add",
            &format!("{WORLD_NODE_V6}/64"),
            "dev",
            "pwrld",
            "nodad",
        ]);
        sys::ip(&["-n", node, "link", "set", "pwrld", "up"]);
        sys::ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{WORLD_V4}/24"),
            "dev",
            "eth0",
        ]);
        sys::ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{WORLD_V6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        sys::ip(&["-n", &ns.name, "link", "set", "eth0", "up"]);
        sys::ip(&[
            "-n",
            &ns.name,
            "route",
            "add",
            "default",
            "via",
            WORLD_NODE_V4,
        ]);
        sys::ip(&[
            "-n",
            &ns.name,
            "-6",
            "route",
            "add",
            "default",
            "via",
            WORLD_NODE_V6,
        ]);
        let server = start_server(&ns, &self.options.world_ports);
        World {
            netns: ns,
            server: Some(server),
        }
    }

    pub fn world_addr(&self, v6: bool) -> IpAddr {
        if v6 { WORLD_V6 } else { WORLD_V4 }.parse().expect("addr")
    }

    /// Create a container (namespace), run the CNI chain for it, start its
    /// probe server on `serve` ports. Panics on failure.
    pub fn add_pod(&self, namespace: &str, name: &str, serve: &[u16]) -> Arc<Pod> {
        self.try_add_pod(namespace, name, serve)
            .unwrap_or_else(|e| panic!("CNI ADD for {namespace}/{name} failed: {e}"))
    }

    /// Like [`Node::add_pod`] but returns the CNI failure.
    pub fn try_add_pod(
        &self,
        namespace: &str,
        name: &str,
        serve: &[u16],
    ) -> Result<Arc<Pod>, Box<crate::chain::Failure>> {
        let idx = self.running.lock().expect("lock").len();
        let netns = Netns::new(&format!("{}c{idx}", self.prefix));
        if self.options.ipv6 {
            netns.sysctl("net.ipv6.conf.all.accept_dad", "0");
            netns.sysctl("net.ipv6.conf.default.accept_dad", "0");
        }
        let mut pod = Pod {
            namespace: namespace.into(),
            name: name.into(),
            container_id: format!("{}-{namespace}-{name}", self.prefix),
            netns: netns.path.clone(),
            v4: None,
            v6: None,
            result: Value::Null,
        };
        let result = match self.chain.add(&pod.call()) {
            Ok(r) => r,
            Err(e) => {
                self.running.lock().expect("lock").push(Running {
                    server: None,
                    netns,
                });
                return Err(e);
            }
        };
        for ip in result["ips"].as_array().into_iter().flatten() {
            let addr: IpAddr = ip["address"]
                .as_str()
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse().ok())
                .expect("address in result");
            if addr.is_ipv4() {
                pod.v4 = Some(addr);
            } else {
                pod.v6 = Some(addr);
            }
        }
        pod.result = result;
        let server = if serve.is_empty() {
            None
        } else {
            Some(start_server(&netns, serve))
        };
        self.running
            .lock()
            .expect("lock")
            .push(Running { server, netns });
        Ok(Arc::new(pod))
    }

    /// Run palisadectl against this node (inside the node namespace).
    pub fn ctl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = std::process::Command::new(self.bin_dir.join("palisadectl"));
        cmd.args(args)
            .env("PALISADE_STATE_DIR", &self.state_dir)
            .env("PALISADE_BPF_ROOT", &self.bpf_root)
            .envs(self.chain.env.iter().map(|(k, v)| (k, v)))
            .envs(self.chain.call_env.lock().expect("lock").clone())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = sys::spawn_in(&self.netns.path, &mut cmd).expect("spawn palisadectl");
        if let Some(s) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(s.as_bytes())
                .expect("write stdin");
        }
        child.wait_with_output().expect("wait palisadectl")
    }

    /// `palisadectl apply -f -`; panics on failure; returns how long it took.
    pub fn apply(&self, yaml: &str) -> Duration {
        let start = Instant::now();
        let out = self.ctl(&["apply", "-f", "-"], Some(yaml));
        let took = start.elapsed();
        assert!(
            out.status.success(),
            "palisadectl apply failed:\n{}\ninput:\n{yaml}",
            describe(&out)
        );
        took
    }

    /// `palisadectl delete -f -`; panics on failure.
    pub fn delete(&self, yaml: &str) {
        let out = self.ctl(&["delete", "-f", "-"], Some(yaml));
        assert!(
            out.status.success(),
            "palisadectl delete failed:\n{}\ninput:\n{yaml}",
            describe(&out)
        );
    }

    /// Compile the tc programs with `-DPALISADE_BUILD_TAG=tag` (otherwise
    /// as the build script does) into a directory of this node's: a build
    /// whose code differs, for `palisadectl upgrade --objects`.
    pub fn build_objects(&self, tag: u32) -> PathBuf {
        const BPF_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../bpf");
        let dir = self.dir.join(format!("objects-{tag}"));
        std::fs::create_dir_all(&dir).expect("objects dir");
        for prog in ["from_container", "to_container"] {
            let out = std::process::Command::new("clang")
                .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
                .arg("-I/usr/include/x86_64-linux-gnu")
                .arg(format!("-I{BPF_DIR}/include"))
                .arg(format!("-I{BPF_DIR}"))
                .arg(format!("-DPALISADE_BUILD_TAG={tag}"))
                .arg("-c")
                .arg(format!("{BPF_DIR}/{prog}.c"))
                .arg("-o")
                .arg(dir.join(format!("{prog}.o")))
                .output()
                .expect("run clang");
            assert!(out.status.success(), "clang: {}", describe(&out));
        }
        dir
    }

    /// Files (recursively) under the pin root.
    pub fn pins(&self) -> Vec<PathBuf> {
        fn walk(p: &Path, out: &mut Vec<PathBuf>) {
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    let path = e.path();
                    if path.is_dir() {
                        walk(&path, out);
                    } else {
                        out.push(path);
                    }
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.bpf_root.join("links"), &mut out);
        out.sort();
        out
    }

    /// Endpoints in the store, as `palisadectl get endpoints -o json` says.
    pub fn endpoints(&self) -> Vec<Value> {
        let out = self.ctl(&["get", "endpoints", "-o", "json"], None);
        assert!(out.status.success(), "get endpoints: {}", describe(&out));
        serde_json::from_slice(&out.stdout).expect("endpoints JSON")
    }

    /// Host-side veth names in the node namespace.
    pub fn host_veths(&self) -> Vec<String> {
        let out = sys::ip(&["-n", &self.netns.name, "-o", "link", "show", "type", "veth"]);
        out.lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|s| s.trim().split('@').next().unwrap_or_default().to_owned())
            .collect()
    }

    /// Kill a pod's probe server and delete its namespace (the veth goes
    /// with it), as a runtime does when a container dies.
    pub fn kill_pod(&self, pod: &Pod) {
        let mut running = self.running.lock().expect("lock");
        if let Some(pos) = running.iter().position(|r| r.netns.path == pod.netns) {
            let mut r = running.remove(pos);
            if let Some(mut s) = r.server.take() {
                let _ = s.kill();
                let _ = s.wait();
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Checked now, reported after the cleanup below.
        let daemon_died = ((self.options.daemon || self.options.kube.is_some())
            && !self.daemon_alive()
            && !std::thread::panicking())
        .then(|| self.daemon_output());
        self.kill_daemon();
        if let Ok(mut running) = self.running.lock() {
            for r in running.iter_mut() {
                if let Some(mut s) = r.server.take() {
                    let _ = s.kill();
                    let _ = s.wait();
                }
            }
            running.clear();
        }
        if let Some(w) = &mut self.world
            && let Some(mut s) = w.server.take()
        {
            let _ = s.kill();
            let _ = s.wait();
        }
        self.world = None;
        // Anything still running in the node namespace (a runtime daemon
        // or shim a failed test left behind) goes too.
        if let Ok(out) = std::process::Command::new("ip")
            .args(["netns", "pids", &self.netns.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::SIGKILL,
                    );
                }
            }
        }
        // Mounts under the node's directory (runtime state, the bpffs
        // instance with every pin, link and map), deepest first. The node
        // namespace itself goes when `netns` drops, after this.
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
            .filter(|m| Path::new(m).starts_with(&self.dir))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        // Runtime state outside the node's directory, named after it: runc
        // state of the containerd namespace the tests use, and results
        // libcni cached for `ctr run --cni` (ctr never calls DEL for them).
        let _ = std::fs::remove_dir_all(Path::new("/run/containerd/runc").join(&self.prefix));
        if let Ok(entries) = std::fs::read_dir("/var/lib/cni/results") {
            for e in entries.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .contains(&format!("-{}-", self.prefix))
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        if let Some(output) = daemon_died {
            panic!("the node's daemon died during the test:\n{output}");
        }
    }
}

/// Pod objects for `palisadectl apply`: (namespace, name, labels as YAML
/// flow-map entries, e.g. `app: web`).
pub fn pods_yaml(pods: &[(&str, &str, &str)]) -> String {
    pods.iter()
        .map(|(ns, name, labels)| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec: {{containers: [{{name: c}}]}}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}
