//! A real etcd (Debian's etcd-server) for the datastore tests, with its own
//! certificate authority made with openssl: TLS and client certificates
//! as the documented setup has them. Members run inside network namespaces
//! the tests created: one on a host namespace's loopback address, or three
//! in the fabric that joins several hosts.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{
    cluster::{Topology, route, subnet_v4, subnet_v6, wire},
    node::{Node, NodeOptions, Primary},
    sys::{self, Netns, describe},
};

/// A certificate authority and the certificates the tests use.
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// CA `ca`, a server certificate for 127.0.0.1 and the fabric's member
    /// addresses (`server`), client certificates it signed (`client`, and
    /// the users of etcd's auth: `root`, `palisade-admin`, `host-0`…`host-2`),
    /// and a client certificate from another CA (`stranger`).
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let pki = Pki {
            dir: dir.to_owned(),
        };
        pki.ca("ca");
        pki.ca("other-ca");
        let sans: Vec<String> = std::iter::once("127.0.0.1")
            .chain(FABRIC_MEMBERS)
            .map(|a| format!("IP:{a}"))
            .collect();
        pki.leaf(
            "ca",
            "server",
            &format!(
                "subjectAltName={}\nextendedKeyUsage=serverAuth",
                sans.join(",")
            ),
        );
        // With etcd's auth on, a client certificate's CN is its etcd user.
        for user in [
            "client",
            "root",
            "palisade-admin",
            "host-0",
            "host-1",
            "host-2",
        ] {
            pki.leaf("ca", user, "extendedKeyUsage=clientAuth");
        }
        pki.leaf("other-ca", "stranger", "extendedKeyUsage=clientAuth");
        pki
    }

    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-key.pem"))
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", describe(&out));
    }

    fn ca(&self, name: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=palisade test {name}"),
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.pem"),
        ]);
    }

    fn leaf(&self, ca: &str, name: &str, ext: &str) {
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.csr"),
        ]);
        let ext_file = self.dir.join(format!("{name}.ext"));
        std::fs::write(&ext_file, format!("{ext}\n")).expect("write extensions");
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ]);
    }
}

/// The etcd members' addresses in a multi-host test bed's fabric.
pub const FABRIC_MEMBERS: [&str; 3] = ["192.168.250.251", "192.168.250.252", "192.168.250.253"];

/// An etcd cluster (one member per address, all in one network
/// namespace), serving clients on https://ADDRESS:2379 and requiring
/// client certificates signed by the test CA. Dropping it kills every
/// member.
#[derive(Debug)]
pub struct Etcd {
    netns: PathBuf,
    dir: PathBuf,
    addresses: Vec<String>,
    pki: Pki,
    members: Vec<Option<Child>>,
}

impl Etcd {
    /// Start one member per address in `netns`, keeping data and logs
    /// under `dir`; waits until every member answers.
    pub fn start(netns: &Path, dir: &Path, pki: &Pki, addresses: &[&str]) -> Self {
        let mut e = Etcd {
            netns: netns.to_owned(),
            dir: dir.to_owned(),
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            pki: pki.clone(),
            members: addresses.iter().map(|_| None).collect(),
        };
        // Members join each other: start them all, then wait.
        for i in 0..addresses.len() {
            e.spawn(i);
        }
        for i in 0..addresses.len() {
            e.wait_healthy(i);
        }
        e
    }

    fn member_url(&self, i: usize, port: u16) -> String {
        let scheme = if port == 2379 { "https" } else { "http" };
        format!("{scheme}://{}:{port}", self.addresses[i])
    }

    /// The client URLs of every member, comma-separated.
    pub fn endpoints(&self) -> String {
        (0..self.addresses.len())
            .map(|i| self.member_url(i, 2379))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize) {
        assert!(self.members[i].is_none(), "etcd member {i} runs already");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("etcd-{i}.log")))
            .expect("etcd log");
        let initial: Vec<String> = (0..self.addresses.len())
            .map(|j| format!("m{j}={}", self.member_url(j, 2380)))
            .collect();
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg(format!("m{i}"))
            .arg("--data-dir")
            .arg(self.dir.join(format!("etcd-data-{i}")))
            .arg("--listen-client-urls")
            .arg(self.member_url(i, 2379))
            .arg("--advertise-client-urls")
            .arg(self.member_url(i, 2379))
            .arg("--listen-peer-urls")
            .arg(self.member_url(i, 2380))
            .arg("--initial-advertise-peer-urls")
            .arg(self.member_url(i, 2380))
            .arg("--initial-cluster")
            .arg(initial.join(","))
            .arg("--initial-cluster-token")
            .arg(self.dir.display().to_string())
            .arg("--client-cert-auth")
            .arg("--trusted-ca-file")
            .arg(self.pki.cert("ca"))
            .arg("--cert-file")
            .arg(self.pki.cert("server"))
            .arg("--key-file")
            .arg(self.pki.key("server"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.members[i] = Some(sys::spawn_in(&self.netns, &mut cmd).expect("spawn etcd"));
    }

    fn wait_healthy(&self, i: usize) {
        let start = Instant::now();
        while !self.healthy(i) {
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "etcd member {i} did not answer within 90 s:\n{}",
                std::fs::read_to_string(self.dir.join(format!("etcd-{i}.log"))).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// (Re)start member `i` on its data directory; waits until it answers
    /// (a member of a cluster answers once a quorum is up).
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_healthy(i);
    }

    /// Restart every member that is down; waits until all answer.
    pub fn restart_all(&mut self) {
        let down: Vec<usize> = (0..self.members.len())
            .filter(|i| self.members[*i].is_none())
            .collect();
        for &i in &down {
            self.spawn(i);
        }
        for &i in &down {
            self.wait_healthy(i);
        }
    }

    /// `etcdctl endpoint health` on member `i` (as root: with auth on, the
    /// health check reads a key).
    pub fn healthy(&self, i: usize) -> bool {
        let mut cmd = self.etcdctl(&self.member_url(i, 2379), &["endpoint", "health"]);
        sys::spawn_in(&self.netns, cmd.stdout(Stdio::null()).stderr(Stdio::null()))
            .and_then(|c| c.wait_with_output())
            .is_ok_and(|o| o.status.success())
    }

    /// etcdctl against `endpoints`, as root (with auth on, root may do
    /// anything; without it, any trusted certificate may).
    pub fn etcdctl(&self, endpoints: &str, args: &[&str]) -> Command {
        self.etcdctl_as("root", endpoints, args)
    }

    /// etcdctl against `endpoints` with `user`'s certificate.
    pub fn etcdctl_as(&self, user: &str, endpoints: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(endpoints)
            .arg("--cacert")
            .arg(self.pki.cert("ca"))
            .arg("--cert")
            .arg(self.pki.cert(user))
            .arg("--key")
            .arg(self.pki.key(user))
            .args(args);
        cmd
    }

    /// Kill member `i` (SIGKILL); its data stays for a restart.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kill every member.
    pub fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    /// The environment that points palisadectl at the cluster as the
    /// trusted client (user `client`, when auth is on).
    pub fn client_env(&self) -> Vec<(String, String)> {
        self.env_as("client")
    }

    /// The environment that points palisadectl at the cluster with
    /// `user`'s certificate.
    pub fn env_as(&self, user: &str) -> Vec<(String, String)> {
        vec![
            ("PALISADE_ETCD_ENDPOINTS".into(), self.endpoints()),
            (
                "PALISADE_ETCD_CA".into(),
                self.pki.cert("ca").display().to_string(),
            ),
            (
                "PALISADE_ETCD_CERT".into(),
                self.pki.cert(user).display().to_string(),
            ),
            (
                "PALISADE_ETCD_KEY".into(),
                self.pki.key(user).display().to_string(),
            ),
        ]
    }

    /// Turn etcd's auth on with the roles docs/ETCD.md describes: user
    /// `palisade-admin` may write the objects, each `host-i` (of `hosts`)
    /// only its own endpoints; every one of them reads everything.
    pub fn enable_auth(&self, hosts: usize) {
        let run = |args: &[&str]| {
            let mut cmd = Command::new("etcdctl");
            cmd.env("ETCDCTL_API", "3")
                .arg("--endpoints")
                .arg(self.endpoints())
                .arg("--cacert")
                .arg(self.pki.cert("ca"))
                .arg("--cert")
                .arg(self.pki.cert("root"))
                .arg("--key")
                .arg(self.pki.key("root"))
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let out = sys::spawn_in(&self.netns, &mut cmd)
                .and_then(|c| c.wait_with_output())
                .expect("run etcdctl");
            assert!(out.status.success(), "etcdctl {args:?}: {}", describe(&out));
        };
        run(&["user", "add", "root", "--no-password"]);
        run(&["user", "grant-role", "root", "root"]);
        let mut users = vec![(
            "palisade-admin".to_owned(),
            "palisade-admin".to_owned(),
            "/palisade/objects/".to_owned(),
        )];
        for i in 0..hosts {
            users.push((
                format!("host-{i}"),
                format!("palisade-host-host-{i}"),
                format!("/palisade/endpoints/host-{i}/"),
            ));
        }
        for (user, role, writes) in &users {
            run(&["role", "add", role]);
            run(&[
                "role",
                "grant-permission",
                role,
                "--prefix=true",
                "read",
                "/palisade/",
            ]);
            run(&[
                "role",
                "grant-permission",
                role,
                "--prefix=true",
                "readwrite",
                writes,
            ]);
            run(&["user", "add", user, "--no-password"]);
            run(&["user", "grant-role", user, role]);
        }
        run(&["auth", "enable"]);
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Hosts without Kubernetes sharing an etcd cluster: host namespaces
/// (each a test [`Node`] with its own pod subnet and daemon) joined like
/// Flannel's VXLAN backend through a fabric namespace, where the three
/// etcd members listen. Nothing touches the machine's own interfaces.
/// Dropping it stops the daemons, then etcd, then removes the fabric.
#[derive(Debug)]
pub struct Hosts {
    pub nodes: Vec<Node>,
    pub etcd: Etcd,
    pub fabric: Netns,
    pub pki: Pki,
}

impl Hosts {
    /// `n` hosts named `host-0`…; every daemon gets `daemon_args` too.
    pub fn new(n: usize, daemon_args: &[&str]) -> Self {
        sys::require_root();
        sys::sweep_stale();
        let prefix = sys::unique_prefix();
        let fabric = Netns::new(&format!("{prefix}f"));
        let f = fabric.name.as_str();
        sys::ip(&["-n", f, "link", "add", "br0", "type", "bridge"]);
        sys::ip(&["-n", f, "link", "set", "br0", "up"]);
        for a in FABRIC_MEMBERS {
            sys::ip(&["-n", f, "addr", "add", &format!("{a}/24"), "dev", "br0"]);
        }
        let mut nodes = Vec::new();
        for i in 0..n {
            let node = Node::new(NodeOptions {
                pod_subnet_v4: subnet_v4(i),
                pod_subnet_v6: subnet_v6(i),
                primary: Primary::Bridge,
                daemon: true,
                defer_daemon: true,
                daemon_args: daemon_args
                    .iter()
                    .map(|a| a.to_string())
                    .chain(["--node-name".to_owned(), format!("host-{i}")])
                    .collect(),
                ..Default::default()
            });
            wire(&fabric, &node, i);
            nodes.push(node);
        }
        for (i, node) in nodes.iter().enumerate() {
            route(node, i, n, Topology::Vxlan, false);
        }
        let pki = Pki::new(&nodes[0].dir.join("pki"));
        let etcd = Etcd::start(&fabric.path, &nodes[0].dir, &pki, &FABRIC_MEMBERS);
        // Each host's daemon as its own etcd user: it may write its own
        // endpoints and nothing else.
        etcd.enable_auth(n);
        for (i, node) in nodes.iter().enumerate() {
            *node.daemon_env.lock().expect("lock") = etcd.env_as(&format!("host-{i}"));
            node.start_daemon();
        }
        Hosts {
            nodes,
            etcd,
            fabric,
            pki,
        }
    }
}

/// palisadectl in `node`'s namespace with `env`, as a user on that host
/// (its own empty state directory: what it shows comes from etcd).
pub fn ctl(node: &Node, env: &[(String, String)], args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(node.bin_dir.join("palisadectl"));
    cmd.args(args)
        .env("PALISADE_STATE_DIR", node.dir.join("user-state"))
        .env("PALISADE_BPF_ROOT", node.dir.join("user-bpf"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = sys::spawn_in(&node.netns.path, &mut cmd).expect("spawn palisadectl");
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
