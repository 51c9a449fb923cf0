//! Simulates the *other* loader (palisade, aya 0.14): it creates the policy
//! maps with aya and pins them on bpffs, and edits them by pinned path.
//! The nfbpf loader (libbpf-rs) then reuses these pinned maps.
use anyhow::{bail, Context, Result};
use aya::maps::{lpm_trie::Key, HashMap, LpmTrie, MapData};
use std::path::PathBuf;

#[path = "../addr.rs"]
mod addr;

const BPF_F_NO_PREALLOC: u32 = 1;
const MAX_ENTRIES: u32 = 1024;

fn usage() -> ! {
    eprintln!(
        "usage: palisade-sim <dir> create\n\
         \x20      palisade-sim <dir> deny-add|deny-del <ip>\n\
         \x20      palisade-sim <dir> cidr-add|cidr-del <cidr>\n\
         \x20      palisade-sim <dir> list\n\
         \x20      palisade-sim <dir> destroy"
    );
    std::process::exit(2)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        usage()
    }
    let dir = PathBuf::from(&args[1]);
    let p_addr = dir.join("deny_addr");
    let p_cidr = dir.join("deny_cidr");
    let arg = |i: usize| args.get(i).cloned().unwrap_or_else(|| usage());
    match args[2].as_str() {
        "create" => {
            std::fs::create_dir_all(&dir)?;
            // aya 0.14 standalone map creation (no ELF needed)
            let h = HashMap::<MapData, [u8; 16], u32>::create(MAX_ENTRIES, 0)
                .context("create hash")?;
            h.pin(&p_addr).context("pin deny_addr")?;
            let l = LpmTrie::<MapData, [u8; 16], u32>::create(MAX_ENTRIES, BPF_F_NO_PREALLOC)
                .context("create lpm")?;
            l.pin(&p_cidr).context("pin deny_cidr")?;
            println!("created+pinned {} and {}", p_addr.display(), p_cidr.display());
        }
        "destroy" => {
            let _ = std::fs::remove_file(&p_addr);
            let _ = std::fs::remove_file(&p_cidr);
            let _ = std::fs::remove_dir(&dir);
        }
        "deny-add" | "deny-del" => {
            let ip = arg(3).parse()?;
            let md = MapData::from_pin(&p_addr)?;
            let mut h: HashMap<MapData, [u8; 16], u32> =
                HashMap::try_from(aya::maps::Map::from_map_data(md)?)?;
            if args[2] == "deny-add" {
                h.insert(addr::addr16(ip), 1, 0)?;
            } else {
                h.remove(&addr::addr16(ip))?;
            }
        }
        "cidr-add" | "cidr-del" => {
            let (plen, a) = addr::cidr16(&arg(3))?;
            let md = MapData::from_pin(&p_cidr)?;
            let mut l: LpmTrie<MapData, [u8; 16], u32> =
                LpmTrie::try_from(aya::maps::Map::from_map_data(md)?)?;
            if args[2] == "cidr-add" {
                l.insert(&Key::new(plen, a), 1, 0)?;
            } else {
                l.remove(&Key::new(plen, a))?;
            }
        }
        "list" => {
            let h: HashMap<MapData, [u8; 16], u32> =
                HashMap::try_from(aya::maps::Map::from_map_data(MapData::from_pin(&p_addr)?)?)?;
            for k in h.keys() {
                println!("deny_addr {}", addr::fmt16(&k?));
            }
            let l: LpmTrie<MapData, [u8; 16], u32> =
                LpmTrie::try_from(aya::maps::Map::from_map_data(MapData::from_pin(&p_cidr)?)?)?;
            for k in l.keys() {
                let k = k?;
                let d = k.data();
                let plen = k.prefix_len();
                let shown = if d[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] { plen - 96 } else { plen };
                println!("deny_cidr {}/{}", addr::fmt16(&d), shown);
            }
        }
        "inproc-attach" => inproc_attach(&dir, &arg(3), &arg(4), &arg(5), &arg(6))?,
        _ => bail!("unknown command"),
    }
    Ok(())
}

/// aya and libbpf-rs in ONE process: aya creates the maps (unpinned), libbpf-rs
/// adopts them by fd (bpf_map__reuse_fd), loads + attaches the netfilter
/// program, pins only the link at <dir>/link_v4, then aya fills the map.
fn inproc_attach(dir: &std::path::Path, obj: &str, prog: &str, netns: &str, deny: &str) -> Result<()> {
    use aya::maps::IterableMap;
    use libbpf_rs::{NetfilterOpts, ObjectBuilder, NFPROTO_IPV4, NF_INET_FORWARD};
    use std::os::fd::{AsFd, AsRawFd};

    let mut h = HashMap::<MapData, [u8; 16], u32>::create(MAX_ENTRIES, 0)?;
    let l = LpmTrie::<MapData, [u8; 16], u32>::create(MAX_ENTRIES, BPF_F_NO_PREALLOC)?;
    let mut open = ObjectBuilder::default().open_file(obj)?;
    for mut m in open.maps_mut() {
        match m.name().to_str() {
            Some("deny_addr") => m.reuse_fd(h.map().fd().as_fd())?,
            Some("deny_cidr") => m.reuse_fd(l.map().fd().as_fd())?,
            _ => {}
        }
    }
    for mut p in open.progs_mut() {
        if p.name() != prog {
            p.set_autoload(false);
        }
    }
    let loaded = open.load()?;
    let f = std::fs::File::open(netns)?;
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    let p = loaded.progs_mut().find(|p| p.name() == prog).context("prog")?;
    let mut link = p.attach_netfilter_with_opts(NetfilterOpts {
        protocol_family: NFPROTO_IPV4,
        hooknum: NF_INET_FORWARD,
        priority: -99,
        ..Default::default()
    })?;
    std::fs::create_dir_all(dir)?;
    link.pin(dir.join("link_v4"))?;
    h.insert(addr::addr16(deny.parse()?), 1, 0)?;
    println!(
        "in-process: aya maps (hash id {:?}, lpm id {:?}) adopted by libbpf-rs; link {} pinned; denied {deny}",
        h.map().info().map(|i| i.id()).ok(),
        l.map().info().map(|i| i.id()).ok(),
        link.info()?.id
    );
    Ok(())
}
