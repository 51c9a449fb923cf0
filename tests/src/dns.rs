//! A real DNS server (unbound, from Debian) serving a test zone inside a
//! test namespace, and a small DNS client that asks from a pod.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Edns, Message, Query},
    rr::{Name, RData, RecordType},
};

use crate::sys::{self, Netns, in_netns};

/// unbound running in a namespace, stopped on drop.
#[derive(Debug)]
pub struct Unbound {
    child: Option<Child>,
    pub dir: PathBuf,
    netns: PathBuf,
    listen: Vec<IpAddr>,
    ready_name: String,
}

impl Unbound {
    /// Serve `records` (zone-file lines such as `a.example.test. 60 IN A
    /// 192.0.2.1`) for the `zones` on port 53 of `listen`, in `netns`.
    /// Returns once it answers.
    pub fn start(
        netns: &Netns,
        dir: &Path,
        listen: &[IpAddr],
        zones: &[&str],
        records: &[String],
    ) -> Self {
        std::fs::create_dir_all(dir).expect("unbound dir");
        let mut conf = String::from("server:\n");
        conf += &format!(
            "  directory: \"{0}\"\n  chroot: \"\"\n  username: \"\"\n  pidfile: \"{0}/unbound.pid\"\n",
            dir.display()
        );
        conf += "  do-daemonize: no\n  use-syslog: no\n  logfile: \"\"\n  verbosity: 1\n";
        conf += "  port: 53\n  do-ip4: yes\n  do-ip6: yes\n  do-udp: yes\n  do-tcp: yes\n";
        conf += "  access-control: 0.0.0.0/0 allow\n  access-control: ::/0 allow\n";
        // Answers bigger than 512 bytes are truncated for clients without
        // EDNS, so those retry over TCP.
        conf += "  edns-buffer-size: 1232\n  rrset-roundrobin: no\n  minimal-responses: yes\n";
        for a in listen {
            conf += &format!("  interface: {a}\n");
        }
        // Authoritative zones that the resolver part also answers from, so
        // that CNAMEs into another of them are followed (local-data does
        // not follow them), with no validator (no trust anchors here).
        conf += "  module-config: \"iterator\"\n  qname-minimisation: no\n";
        // unbound answers NXDOMAIN for the special-use top-level names
        // (RFC 6761: test., invalid., ...) unless told not to.
        let mut tlds: Vec<&str> = zones
            .iter()
            .filter_map(|z| z.trim_end_matches('.').rsplit('.').next())
            .collect();
        tlds.sort_unstable();
        tlds.dedup();
        for t in tlds {
            conf += &format!("  local-zone: \"{t}.\" nodefault\n");
        }
        let mut zones_conf = String::new();
        for z in zones {
            let file = dir.join(format!("{}zone", z.replace('.', "_")));
            let mut text = format!(
                "$ORIGIN {z}\n@ 3600 IN SOA ns.{z} admin.{z} 1 3600 600 86400 60\n@ 3600 IN NS ns.{z}\nns.{z} 3600 IN A 192.0.2.53\n"
            );
            for r in records {
                let owner = r.split_whitespace().next().unwrap_or_default();
                if owner == *z || owner.ends_with(&format!(".{z}")) {
                    text += r;
                    text.push('\n');
                }
            }
            std::fs::write(&file, text).expect("write a zone file");
            zones_conf += &format!(
                "auth-zone:\n  name: \"{z}\"\n  zonefile: \"{}\"\n  for-downstream: no\n  for-upstream: yes\n  fallback-enabled: no\n",
                file.display()
            );
        }
        conf += &zones_conf;
        let path = dir.join("unbound.conf");
        std::fs::write(&path, conf).expect("write unbound.conf");
        let check = Command::new("unbound-checkconf")
            .arg(&path)
            .output()
            .expect("run unbound-checkconf (install unbound)");
        assert!(
            check.status.success(),
            "unbound.conf: {}",
            sys::describe(&check)
        );
        let log = std::fs::File::create(dir.join("unbound.log")).expect("unbound log");
        let mut cmd = Command::new("unbound");
        cmd.args(["-d", "-c"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = sys::spawn_in(&netns.path, &mut cmd).expect("start unbound");
        let u = Self {
            child: Some(child),
            dir: dir.to_owned(),
            netns: netns.path.clone(),
            listen: listen.to_vec(),
            ready_name: zones.first().map_or(".", |z| z).to_owned(),
        };
        u.wait_ready();
        u
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let server = SocketAddr::new(self.listen[0], 53);
        while Instant::now() < deadline {
            if query(
                &self.netns,
                server,
                &self.ready_name,
                RecordType::SOA,
                false,
            )
            .is_ok_and(|a| a.rcode == "No Error")
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "unbound did not answer within 20 s; its log:\n{}",
            std::fs::read_to_string(self.dir.join("unbound.log")).unwrap_or_default()
        );
    }

    /// Stop it (and start it again with [`Unbound::start`]).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Unbound {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The small zone of the runtime and cluster DNS cases: api.example.test
/// ([`SMALL_API_V4`]) and other.example.test ([`SMALL_OTHER_V4`]) in
/// example.test, x.blocked.test in blocked.test; served by unbound on
/// `server` in `world`, whose `eth0` gets the addresses (its probe server
/// answers on them).
pub const SMALL_API_V4: &str = "203.0.113.21";
pub const SMALL_OTHER_V4: &str = "203.0.113.23";

pub fn small_zone(world: &Netns, dir: &Path, server: IpAddr) -> Unbound {
    for a in [SMALL_API_V4, SMALL_OTHER_V4] {
        sys::ip(&[
            "-n",
            &world.name,
            "addr",
            "add",
            &format!("{a}/32"),
            "dev",
            "eth0",
        ]);
    }
    Unbound::start(
        world,
        dir,
        &[server],
        &["example.test.", "blocked.test."],
        &[
            format!("api.example.test. 60 IN A {SMALL_API_V4}"),
            format!("other.example.test. 60 IN A {SMALL_OTHER_V4}"),
            "x.blocked.test. 60 IN A 203.0.113.25".to_owned(),
        ],
    )
}

/// The answer to one query.
#[derive(Debug, Clone)]
pub struct Answer {
    pub rcode: String,
    pub truncated: bool,
    pub addresses: Vec<IpAddr>,
    pub message: Message,
}

/// Ask `server` for `name` from inside `netns`, over UDP or TCP (no EDNS,
/// as a plain stub resolver asks). Err: no answer within 3 s.
pub fn query(
    netns: &Path,
    server: SocketAddr,
    name: &str,
    qtype: RecordType,
    tcp: bool,
) -> Result<Answer, String> {
    query_with(netns, server, name, qtype, tcp, None)
}

/// Like [`query`], with an EDNS OPT record that offers `edns` bytes for
/// answers over UDP (as resolvers since 2020 ask).
pub fn query_with(
    netns: &Path,
    server: SocketAddr,
    name: &str,
    qtype: RecordType,
    tcp: bool,
    edns: Option<u16>,
) -> Result<Answer, String> {
    let mut m = Message::new();
    m.set_id(rand_id())
        .set_recursion_desired(true)
        .add_query(Query::query(
            Name::from_ascii(name).map_err(|e| e.to_string())?,
            qtype,
        ));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    let bytes = m.to_vec().map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(3);
    let raw = in_netns(netns, || -> Result<Vec<u8>, String> {
        if tcp {
            let mut s = TcpStream::connect_timeout(&server, timeout).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(timeout))
                .map_err(|e| e.to_string())?;
            let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&bytes);
            s.write_all(&framed).map_err(|e| e.to_string())?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len).map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
            s.read_exact(&mut buf).map_err(|e| e.to_string())?;
            Ok(buf)
        } else {
            let local: SocketAddr = if server.is_ipv4() {
                "0.0.0.0:0".parse().expect("addr")
            } else {
                "[::]:0".parse().expect("addr")
            };
            let s = UdpSocket::bind(local).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(timeout))
                .map_err(|e| e.to_string())?;
            s.send_to(&bytes, server).map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 65535];
            let (n, from) = s.recv_from(&mut buf).map_err(|e| e.to_string())?;
            if from != server {
                return Err(format!("answer from {from}, asked {server}"));
            }
            buf.truncate(n);
            Ok(buf)
        }
    })?;
    let msg = Message::from_vec(&raw).map_err(|e| e.to_string())?;
    if msg.id() != m.id() {
        return Err("answer with another id".into());
    }
    let addresses = msg
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    Ok(Answer {
        rcode: msg.response_code().to_string(),
        truncated: msg.truncated(),
        addresses,
        message: msg,
    })
}

fn rand_id() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(7);
    (t ^ (t >> 16)) as u16
}
