//! nfbpf: libbpf-rs loader for the BPF_PROG_TYPE_NETFILTER egress program.
//!
//!   nfbpf attach --obj nf_egress.bpf.o --prog nf_egress_dynptr \
//!                --maps-dir /sys/fs/bpf/palisade --pin-dir /sys/fs/bpf/nfbpf \
//!                [--netns /var/run/netns/X] [--priority -99] [--families 4,6] [--defrag] [-v]
//!   nfbpf update --obj ... --prog ... --maps-dir ... --pin-dir ...   (try bpf_link_update)
//!   nfbpf detach --pin-dir /sys/fs/bpf/nfbpf
//!   nfbpf stats  --pin-dir /sys/fs/bpf/nfbpf
//!   nfbpf info   --pin-dir /sys/fs/bpf/nfbpf
use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::{
    query::LinkTypeInfo, Link, MapCore, MapFlags, MapHandle, MapType, NetfilterOpts, Object,
    ObjectBuilder, NFPROTO_IPV4, NFPROTO_IPV6, NF_INET_FORWARD,
};
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

mod addr;

/// maps that are owned by the other loader and must be reused by pinned path
const FOREIGN_MAPS: &[(&str, MapType)] = &[("deny_addr", MapType::Hash), ("deny_cidr", MapType::LpmTrie)];
/// maps owned by this object that we pin so `stats` works after we exit
const OWN_PINNED_MAPS: &[&str] = &["stats", "last_drop"];
const STAT_NAMES: &[&str] =
    &["seen", "not_new", "no_ct", "new_no_dnat", "new_dnat_ok", "new_dnat_drop", "parse_err"];
const BPF_F_NETFILTER_IP_DEFRAG: u32 = 1;

struct Args {
    cmd: String,
    kv: HashMap<String, String>,
    verbose: bool,
}

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let cmd = it.next().ok_or_else(|| anyhow!("missing command (see source header)"))?;
    let mut kv = HashMap::new();
    let mut verbose = false;
    while let Some(a) = it.next() {
        match a.as_str() {
            "-v" => verbose = true,
            "--defrag" => {
                kv.insert("defrag".into(), "1".into());
            }
            s if s.starts_with("--") => {
                let v = it.next().ok_or_else(|| anyhow!("{s} needs a value"))?;
                kv.insert(s[2..].to_string(), v);
            }
            s => bail!("unexpected argument {s}"),
        }
    }
    Ok(Args { cmd, kv, verbose })
}

impl Args {
    fn get(&self, k: &str) -> Result<&str> {
        self.kv.get(k).map(|s| s.as_str()).ok_or_else(|| anyhow!("--{k} is required"))
    }
    fn opt(&self, k: &str, d: &str) -> String {
        self.kv.get(k).cloned().unwrap_or_else(|| d.to_string())
    }
}

fn enter_netns(path: &str) -> Result<()> {
    // BPF_LINK_CREATE for netfilter registers the hook in the *caller's*
    // network namespace (current->nsproxy->net_ns). We setns() instead of
    // using `ip netns exec`, because the latter remounts /sys and thereby
    // hides the host's /sys/fs/bpf.
    let f = File::open(path).with_context(|| format!("open netns {path}"))?;
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
    }
    Ok(())
}

/// open + reuse foreign pinned maps + load, keeping only `prog` autoloaded
fn open_and_load(a: &Args) -> Result<Object> {
    let obj_path = a.get("obj")?;
    let prog_name = a.get("prog")?;
    let maps_dir = PathBuf::from(a.get("maps-dir")?);

    let mut builder = ObjectBuilder::default();
    // NB: ObjectBuilder::debug(false) calls set_print(None), which silences
    // libbpf completely, including the verifier log on load failure. Only
    // touch it when asked for debug output.
    if a.verbose {
        builder.debug(true);
    }
    let mut open = builder.open_file(obj_path).with_context(|| format!("open {obj_path}"))?;

    for mut m in open.maps_mut() {
        let name = m.name().to_string_lossy().into_owned();
        let Some((_, want_type)) = FOREIGN_MAPS.iter().find(|(n, _)| *n == name) else { continue };
        let path = maps_dir.join(&name);
        // Inspect the foreign map first: key/value layout must match what the
        // BPF C code was compiled against.
        let h = MapHandle::from_pinned_path(&path)
            .with_context(|| format!("{} not pinned by the map owner?", path.display()))?;
        let info = h.info()?;
        let (ty, ks, vs, fl) = (h.map_type(), h.key_size(), h.value_size(), info.info.map_flags);
        let skip = std::env::var_os("NFBPF_SKIP_COMPAT_CHECK").is_some(); // for the pitfall experiment only
        if !skip && (ty != *want_type || ks != m.key_size() || vs != m.value_size() || fl != m.map_flags()) {
            bail!(
                "pinned map {} incompatible: type {:?}/{:?} key {}/{} value {}/{} flags {:#x}/{:#x} (pinned/ours)",
                path.display(), ty, want_type, ks, m.key_size(), vs, m.value_size(), fl, m.map_flags()
            );
        }
        // (bpf_map__reuse_fd copies type/key/value/max_entries/flags from the
        // fd into the object's map definition - verified: a pinned map with a
        // different max_entries is adopted as-is. It does NOT reject a
        // different key/value size (verified: a 20-byte-key pinned hash was
        // accepted by libbpf AND the verifier -> silently wrong lookups), hence
        // the explicit check above.)
        m.reuse_pinned_map(&path).with_context(|| format!("reuse_pinned_map {}", path.display()))?;
        eprintln!(
            "reusing pinned map {} (id {}, max_entries {})",
            path.display(), info.info.id, h.max_entries()
        );
    }

    let mut found = false;
    for mut p in open.progs_mut() {
        if p.name() == prog_name {
            found = true;
        } else {
            p.set_autoload(false);
        }
    }
    if !found {
        bail!("program {prog_name} not in {obj_path}");
    }
    let obj = open.load().context("load (verifier log is printed above by libbpf)")?;
    Ok(obj)
}

fn families(a: &Args) -> Result<Vec<(i32, &'static str)>> {
    a.opt("families", "4,6")
        .split(',')
        .map(|f| match f {
            "4" => Ok((NFPROTO_IPV4, "link_v4")),
            "6" => Ok((NFPROTO_IPV6, "link_v6")),
            _ => bail!("bad family {f}"),
        })
        .collect()
}

fn attach(a: &Args) -> Result<()> {
    let pin_dir = PathBuf::from(a.get("pin-dir")?);
    let prog_name = a.get("prog")?.to_string();
    let priority: i32 = a.opt("priority", "-99").parse()?;
    let flags = if a.kv.contains_key("defrag") { BPF_F_NETFILTER_IP_DEFRAG } else { 0 };

    let mut obj = open_and_load(a)?;
    if let Some(ns) = a.kv.get("netns") {
        enter_netns(ns)?;
    }
    let prog = obj
        .progs_mut()
        .find(|p| p.name() == prog_name.as_str())
        .ok_or_else(|| anyhow!("prog vanished"))?;
    // attach every family first; only pin once all succeeded (a failed attach
    // drops the earlier links -> nothing is left behind)
    let mut links = Vec::new();
    for (pf, pin_name) in families(a)? {
        let link = prog
            .attach_netfilter_with_opts(NetfilterOpts {
                protocol_family: pf,
                hooknum: NF_INET_FORWARD,
                priority,
                flags,
                ..Default::default()
            })
            .with_context(|| {
                format!("attach_netfilter pf={pf} prio={priority} (EEXIST: another BPF nf link has this priority; EBUSY: some other hook, e.g. iptables filter at 0, has it)")
            })?;
        links.push((pf, pin_name, link));
    }
    std::fs::create_dir_all(&pin_dir)?;
    for mut m in obj.maps_mut() {
        let name = m.name().to_string_lossy().into_owned();
        if OWN_PINNED_MAPS.contains(&name.as_str()) {
            m.pin(pin_dir.join(&name)).with_context(|| format!("pin map {name}"))?;
        }
    }
    for (pf, pin_name, mut link) in links {
        let p = pin_dir.join(pin_name);
        link.pin(&p).with_context(|| format!("pin link {}", p.display()))?;
        let info = link.info()?;
        println!(
            "attached {prog_name} pf={pf} hook=FORWARD prio={priority} flags={flags} link_id={} prog_id={} pinned at {}",
            info.id, info.prog_id, p.display()
        );
        // `link` is dropped here: bpf_link__destroy closes our fd, but the
        // bpffs pin keeps the link (and the hook registration) alive.
    }
    Ok(())
}

/// Try to atomically replace the program behind the pinned links.
fn update(a: &Args) -> Result<()> {
    let pin_dir = PathBuf::from(a.get("pin-dir")?);
    let prog_name = a.get("prog")?.to_string();
    let obj = open_and_load(a)?;
    let prog = obj.progs().find(|p| p.name() == prog_name.as_str()).unwrap();
    for (_, pin_name) in families(a)? {
        let p = pin_dir.join(pin_name);
        let mut link = Link::open(&p).with_context(|| format!("open {}", p.display()))?;
        match link.update_prog(&prog) {
            Ok(()) => println!("{}: bpf_link_update OK -> {prog_name}", p.display()),
            Err(e) => println!("{}: bpf_link_update failed: {e}", p.display()),
        }
    }
    Ok(())
}

fn detach(a: &Args) -> Result<()> {
    let pin_dir = PathBuf::from(a.get("pin-dir")?);
    for pin_name in ["link_v4", "link_v6"] {
        let p = pin_dir.join(pin_name);
        if !p.exists() {
            continue;
        }
        let link = Link::open(&p)?;
        let id = link.info()?.id;
        // BPF_LINK_DETACH: unregisters the nf hook now, even if some other
        // process still holds an fd to the link. Removing the pin alone would
        // also detach once the last reference is gone.
        link.detach().with_context(|| format!("detach {}", p.display()))?;
        std::fs::remove_file(&p)?;
        println!("detached + unpinned link {id} ({})", p.display());
    }
    for m in OWN_PINNED_MAPS {
        let _ = std::fs::remove_file(pin_dir.join(m));
    }
    let _ = std::fs::remove_dir(&pin_dir);
    Ok(())
}

fn stats(a: &Args) -> Result<()> {
    let pin_dir = PathBuf::from(a.get("pin-dir")?);
    let h = MapHandle::from_pinned_path(pin_dir.join("stats"))?;
    let mut out = Vec::new();
    for (i, name) in STAT_NAMES.iter().enumerate() {
        let key = (i as u32).to_ne_bytes();
        let sum: u64 = h
            .lookup_percpu(&key, MapFlags::ANY)?
            .unwrap_or_default()
            .iter()
            .map(|v| u64::from_ne_bytes(v[..8].try_into().unwrap()))
            .sum();
        out.push(format!("{name}={sum}"));
    }
    println!("{}", out.join(" "));
    if a.kv.contains_key("last-drop") {
        last_drop(&pin_dir)?;
    }
    Ok(())
}

fn last_drop(pin_dir: &Path) -> Result<()> {
    let h = MapHandle::from_pinned_path(pin_dir.join("last_drop"))?;
    let v = h.lookup(&0u32.to_ne_bytes(), MapFlags::ANY)?.unwrap_or_default();
    if v.len() < 62 {
        return Ok(());
    }
    // struct flow layout (see nf_egress.bpf.c)
    let u16at = |o: usize| u16::from_ne_bytes([v[o], v[o + 1]]);
    let u32at = |o: usize| u32::from_ne_bytes(v[o..o + 4].try_into().unwrap());
    println!(
        "last_drop: proto={} {}:{} -> {}:{} (orig dst {}:{}) ctinfo={} ct_status={:#x}",
        v[54], addr::fmt16(&v[0..16]), u16at(48), addr::fmt16(&v[16..32]), u16at(50),
        addr::fmt16(&v[32..48]), u16at(52), u32at(56), u32at(60)
    );
    Ok(())
}

fn info(a: &Args) -> Result<()> {
    let pin_dir = PathBuf::from(a.get("pin-dir")?);
    for pin_name in ["link_v4", "link_v6"] {
        let p = pin_dir.join(pin_name);
        if !p.exists() {
            continue;
        }
        let li = Link::open(&p)?.info()?;
        println!("  prog {}", prog_info(li.prog_id).unwrap_or_else(|e| format!("? ({e})")));
        if let LinkTypeInfo::Netfilter(nf) = li.info {
            println!(
                "{}: link_id={} prog_id={} pf={} hooknum={} priority={} flags={}",
                p.display(), li.id, li.prog_id, nf.protocol_family, nf.hooknum, nf.priority, nf.flags
            );
        } else {
            println!("{}: link_id={} prog_id={} (non-netfilter?)", p.display(), li.id, li.prog_id);
        }
    }
    Ok(())
}

/// bpf_prog_info via libbpf-sys (libbpf-rs' ProgramInfo loader is private)
fn prog_info(id: u32) -> Result<String> {
    let fd = unsafe { libbpf_sys::bpf_prog_get_fd_by_id(id) };
    if fd < 0 {
        bail!("bpf_prog_get_fd_by_id: {}", std::io::Error::from_raw_os_error(-fd));
    }
    let mut info = libbpf_sys::bpf_prog_info::default();
    let mut len = std::mem::size_of_val(&info) as u32;
    let ret = unsafe { libbpf_sys::bpf_prog_get_info_by_fd(fd, &mut info, &mut len) };
    unsafe { libc::close(fd) };
    if ret != 0 {
        bail!("bpf_prog_get_info_by_fd: {}", std::io::Error::from_raw_os_error(-ret));
    }
    Ok(format!(
        "type={} verified_insns={} xlated={}B jited={}B run_cnt={} run_time_ns={} recursion_misses={}",
        info.type_, info.verified_insns, info.xlated_prog_len, info.jited_prog_len,
        info.run_cnt, info.run_time_ns, info.recursion_misses
    ))
}

fn main() -> Result<()> {
    let a = parse_args()?;
    match a.cmd.as_str() {
        "attach" => attach(&a),
        "update" => update(&a),
        "detach" => detach(&a),
        "stats" => stats(&a),
        "info" => info(&a),
        c => bail!("unknown command {c}"),
    }
}
