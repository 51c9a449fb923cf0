//! Real container runtimes inside a hermetic node: runc, Podman (CNI and
//! netavark backends), containerd (`ctr`) and dockerd, each with private
//! state, run inside the node's network namespace, from a busybox-static
//! root filesystem (no registry images). Every helper removes its
//! containers and stops its daemon when dropped.

use std::{
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    chain::{Call, Chain},
    node::Node,
    sys::{Netns, describe},
};

/// The Debian docker.io client (the machine may have a newer one first on
/// PATH that does not match the 20.10 daemon).
pub const DOCKER: &str = "/usr/bin/docker";

fn must(out: Output, what: &str) -> Output {
    assert!(out.status.success(), "{what} failed:\n{}", describe(&out));
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A busybox-static root filesystem at `dir/rootfs` (built once).
pub fn rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    if root.join("bin/busybox").exists() {
        return root;
    }
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "www"] {
        std::fs::create_dir_all(root.join(d)).expect("create rootfs dirs");
    }
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox is missing: install busybox-static (the test command does)"
    );
    std::fs::copy(busybox, root.join("bin/busybox")).expect("copy busybox");
    for applet in ["sh", "httpd", "sleep", "cat", "ip"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))
            .expect("symlink applet");
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\n").expect("group");
    root
}

/// The rootfs as a tarball (for `podman import`, `docker import`).
pub fn rootfs_tar(dir: &Path) -> PathBuf {
    let tar = dir.join("rootfs.tar");
    if !tar.exists() {
        let root = rootfs(dir);
        must(
            Command::new("tar")
                .arg("-C")
                .arg(&root)
                .arg("-cf")
                .arg(&tar)
                .arg(".")
                .output()
                .expect("tar"),
            "tar the rootfs",
        );
    }
    tar
}

/// The server every test container runs.
pub const SERVER: &[&str] = &["/bin/httpd", "-f", "-p", "80"];

/// Median of some durations.
pub fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s.get(s.len() / 2).copied().unwrap_or_default()
}

/// Start-time measurements with and without palisade.
#[derive(Debug, Default, Clone)]
pub struct StartTimes {
    pub with: Vec<Duration>,
    pub without: Vec<Duration>,
}

impl StartTimes {
    pub fn report(&self, runtime: &str) -> String {
        let (w, wo) = (median(&self.with), median(&self.without));
        format!(
            "{runtime}: median container start {} ms with palisade, {} ms without ({} starts each): overhead {} ms",
            w.as_millis(),
            wo.as_millis(),
            self.with.len(),
            w.as_millis() as i128 - wo.as_millis() as i128
        )
    }
}

/// Wait until `f` holds (polling), or panic with `what`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A file shipped in `conf/`.
pub fn conf_file(rel: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../conf")
        .join(rel);
    serde_json::from_slice(
        &std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())),
    )
    .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// conf/oci-hooks.d/palisade.json as shipped, pointing at this node's
/// binary and directories.
pub fn hooks_json(node: &Node) -> Value {
    let mut v = conf_file("oci-hooks.d/palisade.json");
    v["hook"]["path"] = json!(node.bin_dir.join("palisade-hook"));
    let args = v["hook"]["args"].as_array_mut().expect("hook args");
    args.push(json!(format!("--state-dir={}", node.state_dir.display())));
    args.push(json!(format!("--bpf-root={}", node.bpf_root.display())));
    v
}

/// Podman's network backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// CNI with the node's conflist (bridge + palisade).
    Cni,
    /// netavark; palisade comes in through the hook.
    Netavark,
}

/// A private Podman (its own storage, config, network and hooks).
#[derive(Debug)]
pub struct Podman<'n> {
    node: &'n Node,
    dir: PathBuf,
    pub backend: Backend,
}

impl<'n> Podman<'n> {
    /// `palisade: false` gives the same setup without palisade (for timing).
    pub fn new(node: &'n Node, backend: Backend, palisade: bool, tag: &str) -> Self {
        let dir = node.dir.join(format!("podman-{tag}"));
        for d in ["cni", "hooks.d", "storage", "run", "tmp", "networks"] {
            std::fs::create_dir_all(dir.join(d)).expect("podman dirs");
        }
        // The CNI network: the node's chain, with or without palisade.
        let mut conflist = node.chain.conflist.clone();
        conflist["name"] = json!("palisade-podman");
        conflist["plugins"][0]["bridge"] = json!("cni-podman-t");
        conflist["plugins"][0]["ipam"]["ranges"] = json!([[{"subnet": "10.101.0.0/24"}]]);
        if !palisade {
            let plugins = conflist["plugins"].as_array_mut().expect("plugins");
            plugins.retain(|p| p["type"] != "palisade");
        }
        std::fs::write(
            dir.join("cni/palisade-podman.conflist"),
            conflist.to_string(),
        )
        .expect("write conflist");
        if palisade {
            std::fs::write(
                dir.join("hooks.d/palisade.json"),
                hooks_json(node).to_string(),
            )
            .expect("hooks.d");
        }
        let (backend_name, network_dir, default_network) = match backend {
            Backend::Cni => ("cni", dir.join("cni"), "palisade-podman"),
            Backend::Netavark => ("netavark", dir.join("networks"), "podman"),
        };
        let conf = format!(
            r#"[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[network]
network_backend = "{backend_name}"
cni_plugin_dirs = ["{bin}", "/usr/lib/cni"]
network_config_dir = "{network_dir}"
default_network = "{default_network}"
default_subnet = "10.102.0.0/24"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{events}"
hooks_dir = ["{hooks}"]
tmp_dir = "{tmp}"
"#,
            bin = node.bin_dir.display(),
            network_dir = network_dir.display(),
            events = dir.join("events.log").display(),
            hooks = dir.join("hooks.d").display(),
            tmp = dir.join("tmp").display(),
        );
        std::fs::write(dir.join("containers.conf"), conf).expect("containers.conf");
        std::fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                dir.join("run").display(),
                dir.join("storage").display()
            ),
        )
        .expect("storage.conf");
        let p = Self { node, dir, backend };
        let tar = rootfs_tar(&node.dir);
        must(
            p.cmd()
                .args([
                    "import",
                    &tar.display().to_string(),
                    "localhost/palisade-busybox",
                ])
                .output()
                .expect("podman import"),
            "podman import",
        );
        p
    }

    pub fn cmd(&self) -> Command {
        let mut c = self.node.netns.command("podman");
        c.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .stdin(Stdio::null());
        c
    }

    /// `podman run -d` the server; returns how long the command took.
    pub fn run(&self, name: &str, annotations: &[(&str, &str)]) -> Duration {
        let mut c = self.cmd();
        c.args(["run", "-d", "--name", name]);
        for (k, v) in annotations {
            c.arg("--annotation").arg(format!("{k}={v}"));
        }
        c.arg("localhost/palisade-busybox").args(SERVER);
        let start = Instant::now();
        let out = c.output().expect("podman run");
        let took = start.elapsed();
        must(out, &format!("podman run {name}"));
        took
    }

    pub fn pid(&self, name: &str) -> u32 {
        let out = must(
            self.cmd()
                .args(["inspect", "-f", "{{.State.Pid}}", name])
                .output()
                .expect("podman inspect"),
            "podman inspect",
        );
        stdout(&out).parse().expect("pid")
    }

    pub fn rm(&self, name: &str) {
        must(
            self.cmd()
                .args(["rm", "-f", "-t", "0", name])
                .output()
                .expect("podman rm"),
            &format!("podman rm {name}"),
        );
    }
}

impl Drop for Podman<'_> {
    fn drop(&mut self) {
        let _ = self
            .cmd()
            .args(["rm", "-a", "-f", "-t", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A private containerd (no CRI plugin) running in the node namespace.
#[derive(Debug)]
pub struct Containerd<'n> {
    node: &'n Node,
    dir: PathBuf,
    pub sock: PathBuf,
    daemon: Child,
    made_opt_cni: bool,
}

impl<'n> Containerd<'n> {
    pub fn new(node: &'n Node) -> Self {
        let dir = node.dir.join("containerd");
        for d in ["root", "state", "net.d", "cni-bin"] {
            std::fs::create_dir_all(dir.join(d)).expect("containerd dirs");
        }
        let sock = dir.join("containerd.sock");
        std::fs::write(
            dir.join("config.toml"),
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{}\"\n",
                dir.join("root").display(),
                dir.join("state").display(),
                sock.display()
            ),
        )
        .expect("config.toml");
        let log = std::fs::File::create(dir.join("containerd.log")).expect("log");
        let daemon = node
            .netns
            .command("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start containerd (install containerd)");
        // `ctr run --cni` reads /etc/cni/net.d and /opt/cni/bin; the test's
        // own directories are bind-mounted over them for ctr only.
        let made_opt_cni = !Path::new("/opt/cni/bin").exists();
        std::fs::create_dir_all("/opt/cni/bin").expect("/opt/cni/bin");
        std::fs::create_dir_all("/etc/cni/net.d").expect("/etc/cni/net.d");
        let c = Self {
            node,
            dir,
            sock,
            daemon,
            made_opt_cni,
        };
        wait_for("containerd to listen", Duration::from_secs(20), || {
            c.ctr()
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
        c
    }

    /// Write the conflist `ctr run --cni` will see, and its plugins.
    pub fn set_cni(&self, conflist: &Value) {
        std::fs::write(
            self.dir.join("net.d/10-palisade-test.conflist"),
            conflist.to_string(),
        )
        .expect("conflist");
        for p in ["bridge", "host-local", "loopback"] {
            let link = self.dir.join("cni-bin").join(p);
            if !link.exists() {
                std::os::unix::fs::symlink(Path::new("/usr/lib/cni").join(p), link)
                    .expect("symlink plugin");
            }
        }
        let link = self.dir.join("cni-bin/palisade");
        if !link.exists() {
            std::os::unix::fs::symlink(self.node.bin_dir.join("palisade"), link)
                .expect("symlink palisade");
        }
    }

    /// The containerd namespace this test uses (runc's state under
    /// /run/containerd/runc is per namespace, shared by every containerd).
    pub fn namespace(&self) -> &str {
        &self.node.prefix
    }

    pub fn ctr(&self) -> Command {
        let mut c = self.node.netns.command("ctr");
        c.arg("-a")
            .arg(&self.sock)
            .arg("-n")
            .arg(self.namespace())
            .stdin(Stdio::null());
        c
    }

    /// `ctr` in a private mount namespace where /etc/cni/net.d and
    /// /opt/cni/bin are this test's directories.
    pub fn ctr_with_cni(&self) -> Command {
        let script = format!(
            "mount --bind {} /etc/cni/net.d && mount --bind {} /opt/cni/bin && exec ctr -a {} -n {} \"$@\"",
            self.dir.join("net.d").display(),
            self.dir.join("cni-bin").display(),
            self.sock.display(),
            self.namespace()
        );
        let mut c = self.node.netns.command("unshare");
        c.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "ctr",
        ])
        .stdin(Stdio::null());
        c
    }

    /// A complete OCI spec for `ctr run --config`: containerd's default
    /// spec, palisade's hooks (through `palisade-hook inject`, as an
    /// operator would build a base_runtime_spec), the rootfs, the server,
    /// and optionally an existing network namespace.
    pub fn spec(
        &self,
        id: &str,
        hooks: bool,
        netns: Option<&Path>,
        annotations: &[(&str, &str)],
    ) -> PathBuf {
        let out = must(
            self.ctr()
                .args(["oci", "spec"])
                .output()
                .expect("ctr oci spec"),
            "ctr oci spec",
        );
        let path = self.dir.join(format!("{id}.json"));
        std::fs::write(&path, &out.stdout).expect("write spec");
        if hooks {
            let hook = self.node.bin_dir.join("palisade-hook");
            must(
                Command::new(&hook)
                    .arg("inject")
                    .arg(format!("--state-dir={}", self.node.state_dir.display()))
                    .arg(format!("--bpf-root={}", self.node.bpf_root.display()))
                    .arg(format!("--hook-path={}", hook.display()))
                    .arg(&path)
                    .output()
                    .expect("palisade-hook inject"),
                "palisade-hook inject",
            );
        }
        let mut spec: Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read spec")).expect("spec JSON");
        spec["root"] = json!({"path": rootfs(&self.node.dir), "readonly": true});
        spec["process"]["args"] = json!(SERVER);
        spec["linux"]["cgroupsPath"] = json!(format!("/palisade-test/{}/{id}", self.node.prefix));
        if let Some(ns) = netns {
            for n in spec["linux"]["namespaces"]
                .as_array_mut()
                .expect("namespaces")
            {
                if n["type"] == "network" {
                    n["path"] = json!(ns);
                }
            }
        }
        let ann: serde_json::Map<String, Value> = annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        spec["annotations"] = Value::Object(ann);
        std::fs::write(&path, spec.to_string()).expect("write spec");
        path
    }

    pub fn pid(&self, id: &str) -> u32 {
        let out = must(
            self.ctr()
                .args(["task", "ls"])
                .output()
                .expect("ctr task ls"),
            "ctr task ls",
        );
        stdout(&out)
            .lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(id)).then(|| f.next().and_then(|p| p.parse().ok()))?
            })
            .unwrap_or_else(|| panic!("no task {id} in ctr task ls"))
    }

    /// Kill and delete a container (and its task).
    pub fn rm(&self, id: &str, cni: bool) {
        let _ = self
            .ctr()
            .args(["task", "kill", "-s", "SIGKILL", id])
            .output();
        wait_for(
            &format!("task {id} to stop"),
            Duration::from_secs(10),
            || {
                self.ctr().args(["task", "ls"]).output().is_ok_and(|o| {
                    !String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .any(|l| l.starts_with(id) && l.contains("RUNNING"))
                })
            },
        );
        let mut del = if cni { self.ctr_with_cni() } else { self.ctr() };
        let _ = del.args(["task", "delete", id]).output();
        must(
            self.ctr()
                .args(["container", "delete", id])
                .output()
                .expect("ctr c rm"),
            &format!("ctr container delete {id}"),
        );
    }
}

impl Drop for Containerd<'_> {
    fn drop(&mut self) {
        if let Ok(out) = self.ctr().args(["task", "ls", "-q"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self
                    .ctr()
                    .args(["task", "kill", "-s", "SIGKILL", id])
                    .output();
                thread::sleep(Duration::from_millis(100));
                let _ = self.ctr().args(["task", "delete", "-f", id]).output();
            }
        }
        if let Ok(out) = self.ctr().args(["container", "ls", "-q"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self.ctr().args(["container", "delete", id]).output();
            }
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        if self.made_opt_cni {
            let _ = std::fs::remove_dir("/opt/cni/bin");
            let _ = std::fs::remove_dir("/opt/cni");
        }
    }
}

/// A private dockerd 20.10 (`--iptables=false --bridge=none`, its own data
/// and exec roots) running in the node namespace.
#[derive(Debug)]
pub struct Docker<'n> {
    node: &'n Node,
    pub dir: PathBuf,
    pub sock: PathBuf,
    daemon: Option<Child>,
    /// Docker's containerd runs on its own, as under systemd, so dockerd
    /// can be restarted (even killed) while containers keep running.
    containerd: Option<Child>,
    palisade: bool,
}

impl<'n> Docker<'n> {
    /// With `palisade`, the default runtime is palisade-runc.
    pub fn new(node: &'n Node, palisade: bool, tag: &str, subnet: &str) -> Self {
        let dir = node.dir.join(format!("docker-{tag}"));
        for d in ["data", "exec", "containerd/root", "containerd/state"] {
            std::fs::create_dir_all(dir.join(d)).expect("docker dirs");
        }
        let sock = dir.join("docker.sock");
        let ctrd_conf = dir.join("containerd/config.toml");
        std::fs::write(
            &ctrd_conf,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{}\"\n",
                dir.join("containerd/root").display(),
                dir.join("containerd/state").display(),
                dir.join("containerd/containerd.sock").display()
            ),
        )
        .expect("containerd config");
        let log = std::fs::File::create(dir.join("containerd.log")).expect("log");
        let containerd = node
            .netns
            .command("containerd")
            .arg("--config")
            .arg(&ctrd_conf)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start containerd for dockerd");
        let csock = dir.join("containerd/containerd.sock");
        wait_for(
            "docker's containerd socket",
            Duration::from_secs(20),
            || csock.exists(),
        );
        let mut d = Self {
            node,
            dir,
            sock,
            daemon: None,
            containerd: Some(containerd),
            palisade,
        };
        d.start();
        let tar = rootfs_tar(&node.dir);
        must(
            d.docker()
                .arg("import")
                .arg(&tar)
                .arg("palisade-busybox:latest")
                .output()
                .expect("docker import"),
            "docker import",
        );
        must(
            d.docker()
                .args([
                    "network", "create", "-d", "bridge", "--subnet", subnet, "palnet",
                ])
                .output()
                .expect("docker network create"),
            "docker network create",
        );
        d
    }

    /// daemon.json as an operator would write it (conf/docker/daemon.json),
    /// with this test's directories.
    pub fn daemon_json(&self) -> Value {
        let mut v = if self.palisade {
            let mut v = conf_file("docker/daemon.json");
            let rt = &mut v["runtimes"]["palisade"];
            rt["path"] = json!(self.node.bin_dir.join("palisade-runc"));
            rt["runtimeArgs"] = json!([
                format!("--palisade-docker-root={}", self.dir.join("data").display()),
                format!("--palisade-state-dir={}", self.node.state_dir.display()),
                format!("--palisade-bpf-root={}", self.node.bpf_root.display())
            ]);
            v
        } else {
            json!({"live-restore": true})
        };
        // The test's private daemon, hermetic in the node namespace.
        for (k, val) in [
            ("iptables", json!(false)),
            ("ip6tables", json!(false)),
            ("bridge", json!("none")),
            ("storage-driver", json!("vfs")),
            ("data-root", json!(self.dir.join("data"))),
            ("exec-root", json!(self.dir.join("exec"))),
            ("pidfile", json!(self.dir.join("docker.pid"))),
            (
                "containerd",
                json!(self.dir.join("containerd/containerd.sock")),
            ),
            ("hosts", json!([format!("unix://{}", self.sock.display())])),
        ] {
            v[k] = val;
        }
        v
    }

    /// Start (or restart) dockerd.
    pub fn start(&mut self) {
        let conf = self.dir.join("daemon.json");
        std::fs::write(&conf, self.daemon_json().to_string()).expect("daemon.json");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))
            .expect("log");
        let child = self
            .node
            .netns
            .command("dockerd")
            .arg("--config-file")
            .arg(&conf)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start dockerd (install docker.io)");
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self
            .docker()
            .args(["version"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                panic!(
                    "dockerd did not answer within 60 s; its log ends with:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stop dockerd (SIGTERM, then SIGKILL); containers keep running.
    pub fn stop(&mut self, hard: bool) {
        if let Some(mut d) = self.daemon.take() {
            let sig = if hard {
                nix::sys::signal::SIGKILL
            } else {
                nix::sys::signal::SIGTERM
            };
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(d.id() as i32), sig);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = d.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(50));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
    }

    pub fn docker(&self) -> Command {
        let mut c = Command::new(DOCKER);
        c.arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .stdin(Stdio::null());
        c
    }

    /// `docker run -d` the server on the palnet network.
    pub fn run(&self, name: &str, labels: &[(&str, &str)]) -> Duration {
        let mut c = self.docker();
        c.args(["run", "-d", "--name", name, "--network", "palnet"]);
        for (k, v) in labels {
            c.arg("--label").arg(format!("{k}={v}"));
        }
        c.arg("palisade-busybox:latest").args(SERVER);
        let start = Instant::now();
        let out = c.output().expect("docker run");
        let took = start.elapsed();
        must(out, &format!("docker run {name}"));
        took
    }

    pub fn pid(&self, name: &str) -> u32 {
        let out = must(
            self.docker()
                .args(["inspect", "-f", "{{.State.Pid}}", name])
                .output()
                .expect("docker inspect"),
            "docker inspect",
        );
        stdout(&out).parse().expect("pid")
    }

    pub fn rm(&self, name: &str) {
        must(
            self.docker()
                .args(["rm", "-f", name])
                .output()
                .expect("docker rm"),
            &format!("docker rm {name}"),
        );
    }
}

impl Drop for Docker<'_> {
    fn drop(&mut self) {
        if self.daemon.is_some()
            && let Ok(out) = self.docker().args(["ps", "-aq"]).output()
        {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self.docker().args(["rm", "-f", id]).output();
            }
        }
        self.stop(false);
        if let Some(mut c) = self.containerd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A bare runc container: its own network namespace wired to the node's
/// bridge by the reference bridge plugin (no palisade in that chain), and
/// palisade only through the hook in config.json.
#[derive(Debug)]
pub struct RuncContainer {
    pub id: String,
    pub netns: Netns,
    pub addr: IpAddr,
    root: PathBuf,
    bundle: PathBuf,
    chain: Chain,
    call: Call,
}

/// A chain with only the node's bridge plugin (same IPAM as the node).
pub fn bridge_only_chain(node: &Node) -> Chain {
    let mut conflist = node.chain.conflist.clone();
    conflist["plugins"]
        .as_array_mut()
        .expect("plugins")
        .retain(|p| p["type"] != "palisade");
    Chain::new(conflist, &node.netns.path, &node.bin_dir)
}

impl RuncContainer {
    pub fn start(
        node: &Node,
        id: &str,
        hook: bool,
        annotations: &[(&str, &str)],
    ) -> (Self, Duration) {
        let netns = Netns::new(&format!("{}r{id}", node.prefix));
        let chain = bridge_only_chain(node);
        let call = Call {
            container_id: format!("runc-{id}"),
            netns: netns.path.display().to_string(),
            ifname: "eth0".into(),
            args: String::new(),
        };
        let result = chain
            .add(&call)
            .unwrap_or_else(|e| panic!("bridge ADD for runc container {id}: {e}"));
        let addr: IpAddr = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .expect("address");
        let bundle = node.dir.join(format!("runc-bundle-{id}"));
        std::fs::create_dir_all(&bundle).expect("bundle dir");
        must(
            Command::new("runc")
                .args(["spec", "--bundle"])
                .arg(&bundle)
                .output()
                .expect("runc spec"),
            "runc spec",
        );
        let mut spec: Value = serde_json::from_slice(
            &std::fs::read(bundle.join("config.json")).expect("config.json"),
        )
        .expect("json");
        spec["root"] = json!({"path": rootfs(&node.dir), "readonly": true});
        spec["process"]["args"] = json!(SERVER);
        spec["process"]["terminal"] = json!(false);
        for n in spec["linux"]["namespaces"]
            .as_array_mut()
            .expect("namespaces")
        {
            if n["type"] == "network" {
                n["path"] = json!(netns.path);
            }
        }
        let ann: serde_json::Map<String, Value> = annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        spec["annotations"] = Value::Object(ann);
        if hook {
            let hook = node.bin_dir.join("palisade-hook");
            let args = json!([
                "palisade-hook",
                format!("--state-dir={}", node.state_dir.display()),
                format!("--bpf-root={}", node.bpf_root.display())
            ]);
            spec["hooks"] = json!({
                "createRuntime": [{"path": hook, "args": args}],
                "poststop": [{"path": hook, "args": args}],
            });
        }
        std::fs::write(bundle.join("config.json"), spec.to_string()).expect("write config.json");
        let root = node.dir.join("runc-root");
        let start = Instant::now();
        let out = run_detached(
            node.netns
                .command("runc")
                .arg("--root")
                .arg(&root)
                .args(["run", "-d", "--bundle"])
                .arg(&bundle)
                .arg(id),
            &node.dir.join(format!("runc-{id}.log")),
        );
        let took = start.elapsed();
        must(out, &format!("runc run {id}"));
        (
            Self {
                id: id.to_owned(),
                netns,
                addr,
                root,
                bundle,
                chain,
                call,
            },
            took,
        )
    }

    /// `runc kill KILL` then `runc delete` (poststop hooks run there).
    pub fn delete(&self, node: &Node) -> Output {
        let runc = |args: &[&str]| {
            let mut c = node.netns.command("runc");
            c.arg("--root")
                .arg(&self.root)
                .args(args)
                .stdin(Stdio::null());
            c.output().expect("runc")
        };
        let _ = runc(&["kill", &self.id, "KILL"]);
        wait_for(
            &format!("runc container {} to stop", self.id),
            Duration::from_secs(10),
            || {
                let out = runc(&["state", &self.id]);
                !out.status.success()
                    || String::from_utf8_lossy(&out.stdout).contains("\"stopped\"")
            },
        );
        runc(&["delete", "--force", &self.id])
    }
}

impl Drop for RuncContainer {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&self.root)
            .args(["delete", "--force", &self.id])
            .stderr(Stdio::null())
            .status();
        let _ = self.chain.del(&self.call);
        let _ = std::fs::remove_dir_all(&self.bundle);
    }
}

/// Run a command that starts a detached container: the container inherits
/// the command's stdio, so it goes to a log file (a pipe would never close)
/// and the log becomes the output's stderr.
pub fn run_detached(cmd: &mut Command, log: &Path) -> Output {
    let file =
        std::fs::File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .status()
        .expect("run command");
    Output {
        status,
        stdout: Vec::new(),
        stderr: std::fs::read(log).unwrap_or_default(),
    }
}

/// Write a file atomically-enough for test fixtures.
pub fn write(path: &Path, text: &str) {
    let mut f =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(text.as_bytes()).expect("write");
}
