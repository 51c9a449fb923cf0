//! A real etcd (Debian's etcd-server) for the datastore tests, with its own
//! certificate authority made with openssl: TLS and client certificates
//! as the documented setup has them. It runs inside a network namespace
//! the test created, on that namespace's loopback address.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::sys::{self, describe};

/// A certificate authority and the certificates the tests use.
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// CA `ca`, a server certificate for 127.0.0.1 (`server`), a client
    /// certificate it signed (`client`), and a client certificate from
    /// another CA (`stranger`).
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let pki = Pki {
            dir: dir.to_owned(),
        };
        pki.ca("ca");
        pki.ca("other-ca");
        pki.leaf(
            "ca",
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth",
        );
        pki.leaf("ca", "client", "extendedKeyUsage=clientAuth");
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

/// One etcd member serving clients on https://127.0.0.1:2379 in a network
/// namespace, requiring client certificates signed by the test CA.
#[derive(Debug)]
pub struct Etcd {
    netns: PathBuf,
    data: PathBuf,
    log: PathBuf,
    pki: Pki,
    child: Option<Child>,
}

pub const ENDPOINT: &str = "https://127.0.0.1:2379";

impl Etcd {
    /// Start etcd in `netns`, keeping its data and log under `dir`.
    pub fn start(netns: &Path, dir: &Path, pki: &Pki) -> Self {
        let mut e = Etcd {
            netns: netns.to_owned(),
            data: dir.join("etcd-data"),
            log: dir.join("etcd.log"),
            pki: pki.clone(),
            child: None,
        };
        e.restart();
        e
    }

    /// (Re)start the member on its data directory; waits until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "etcd runs already");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("etcd log");
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "m0", "--data-dir"])
            .arg(&self.data)
            .args([
                "--listen-client-urls",
                ENDPOINT,
                "--advertise-client-urls",
                ENDPOINT,
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "m0=http://127.0.0.1:2380",
                "--client-cert-auth",
                "--trusted-ca-file",
            ])
            .arg(self.pki.cert("ca"))
            .arg("--cert-file")
            .arg(self.pki.cert("server"))
            .arg("--key-file")
            .arg(self.pki.key("server"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = sys::spawn_in(&self.netns, &mut cmd).expect("spawn etcd");
        self.child = Some(child);
        let start = Instant::now();
        while !self.healthy() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "etcd did not answer within 60 s:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `etcdctl endpoint health` with the client certificate.
    pub fn healthy(&self) -> bool {
        let mut cmd = self.etcdctl(&["endpoint", "health"]);
        sys::spawn_in(&self.netns, cmd.stdout(Stdio::null()).stderr(Stdio::null()))
            .and_then(|c| c.wait_with_output())
            .is_ok_and(|o| o.status.success())
    }

    /// etcdctl against this member, as the trusted client.
    pub fn etcdctl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(ENDPOINT)
            .arg("--cacert")
            .arg(self.pki.cert("ca"))
            .arg("--cert")
            .arg(self.pki.cert("client"))
            .arg("--key")
            .arg(self.pki.key("client"))
            .args(args);
        cmd
    }

    /// Kill the member (SIGKILL); its data stays for a restart.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The environment that points palisadectl at this member as the
    /// trusted client.
    pub fn client_env(&self) -> Vec<(String, String)> {
        vec![
            ("PALISADE_ETCD_ENDPOINTS".into(), ENDPOINT.into()),
            (
                "PALISADE_ETCD_CA".into(),
                self.pki.cert("ca").display().to_string(),
            ),
            (
                "PALISADE_ETCD_CERT".into(),
                self.pki.cert("client").display().to_string(),
            ),
            (
                "PALISADE_ETCD_KEY".into(),
                self.pki.key("client").display().to_string(),
            ),
        ]
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
