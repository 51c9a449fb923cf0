//! Service traffic judged on its backend (cluster mode).
//!
//! Two parts, both beside the tc programs and sharing their pinned maps:
//! - [`Frontends`]: the `pal_svc` map, the Service frontends of this node
//!   (ClusterIPs, external and load-balancer addresses, this node's
//!   addresses with each NodePort). A new egress flow to one passes the
//!   veth program undecided, which records which endpoint opened it.
//! - [`ServiceHook`]: `pal_service` (bpf/service.c), a netfilter program
//!   at `NF_INET_FORWARD` and `NF_INET_LOCAL_IN` for IPv4 and IPv6, after
//!   every DNAT, which decides those flows on the backend the DNAT chose
//!   (LOCAL_IN: a backend that is the node itself, and the connections of
//!   clients with egress HTTP rules, steered to the L7 proxy). aya 0.14 cannot
//!   load netfilter programs, so libbpf (libbpf-rs) loads this one, reusing
//!   the maps aya created.
//!
//! Pins under the bpf root: `progs/<hash>/service` (the program) and
//! `links/service-v4`, `links/service-v6`, `links/service-in-v4`,
//! `links/service-in-v6` (the hooks). A hook lives as long
//! as its pin, so enforcement does not depend on the daemon.

use std::{
    collections::{BTreeSet, HashSet},
    fs,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, Map, MapData};
use libbpf_rs::{
    Link, MapCore, MapHandle, NF_INET_FORWARD, NF_INET_LOCAL_IN, NFPROTO_IPV4, NFPROTO_IPV6,
    NetfilterOpts, ObjectBuilder, ProgramHandle, query::LinkTypeInfo,
};

use super::DataplaneError;
use crate::abi::SvcKey;

static SERVICE_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/service.o"));

/// The object built into this binary (part of the dataplane's build hash).
pub fn object() -> &'static [u8] {
    SERVICE_OBJ
}

/// Priorities at each hook: the hook moves between the two on an upgrade (a
/// netfilter link cannot be updated in place, and two links cannot share a
/// priority), so the new program is in place before the old one leaves.
/// Both run before the filter table (priority 0), after PREROUTING's DNAT.
const PRIORITIES: [i32; 2] = [-120, -119];

/// The hooks: family, netfilter hook, its name, the link pin's name.
const HOOKS: [(i32, i32, &str, &str); 4] = [
    (NFPROTO_IPV4, NF_INET_FORWARD, "FORWARD", "service-v4"),
    (NFPROTO_IPV6, NF_INET_FORWARD, "FORWARD", "service-v6"),
    (NFPROTO_IPV4, NF_INET_LOCAL_IN, "LOCAL_IN", "service-in-v4"),
    (NFPROTO_IPV6, NF_INET_LOCAL_IN, "LOCAL_IN", "service-in-v6"),
];

fn boxed<E: std::error::Error + Send + Sync + 'static>(
    e: E,
) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

fn parent(p: &Path) -> PathBuf {
    p.parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_owned)
}

/// The netfilter hook of one bpf root, in the calling thread's network
/// namespace.
#[derive(Debug)]
pub struct ServiceHook {
    root: PathBuf,
    /// Where the program of this build is pinned.
    program_pin: PathBuf,
}

/// What [`ServiceHook::ensure`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookChange {
    /// The hooks were in place with this build's program.
    Unchanged,
    /// Attached (first time, or a new build's program replaced the old).
    Attached { priority: i32 },
}

/// A hook as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookInfo {
    /// The link pin's name (`service-v4`, ...).
    pub family: &'static str,
    /// `FORWARD` or `LOCAL_IN`.
    pub hook: &'static str,
    pub link_id: u32,
    pub program_id: u32,
    pub priority: i32,
}

impl ServiceHook {
    /// `program_pin`: where this build pins its programs (the dataplane's
    /// `progs/<hash>/service`).
    pub fn new(root: impl Into<PathBuf>, program_pin: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            program_pin: program_pin.into(),
        }
    }

    fn link_pin(&self, name: &str) -> PathBuf {
        self.root.join("links").join(name)
    }

    /// The hooks now in place (none when not attached).
    pub fn info(&self) -> Result<Vec<HookInfo>, DataplaneError> {
        let mut out = Vec::new();
        for (_, _, hook, name) in HOOKS {
            let pin = self.link_pin(name);
            if !pin.exists() {
                continue;
            }
            let link = Link::open(&pin).map_err(|e| DataplaneError::OpenPin {
                what: format!("link {name}"),
                path: pin.clone(),
                source: boxed(e),
            })?;
            let info = link.info().map_err(|e| DataplaneError::OpenPin {
                what: format!("link {name}"),
                path: pin.clone(),
                source: boxed(e),
            })?;
            let priority = match info.info {
                LinkTypeInfo::Netfilter(nf) => nf.priority,
                other => {
                    return Err(DataplaneError::Incompatible {
                        path: pin,
                        detail: format!("expected a netfilter link, found {other:?}"),
                    });
                }
            };
            out.push(HookInfo {
                family: name,
                hook,
                link_id: info.id,
                program_id: info.prog_id,
                priority,
            });
        }
        Ok(out)
    }

    /// Make sure both hooks run this build's program. When they do not
    /// (first start, a new build), the program is loaded and attached at
    /// the priority the current hooks do not use, then the link pins are
    /// swapped: the old links go with their pins, after the new ones are in
    /// place.
    pub fn ensure(&self) -> Result<HookChange, DataplaneError> {
        let current = self.info()?;
        if let Some(id) = self.pinned_program_id()
            && current.len() == HOOKS.len()
            && current.iter().all(|h| h.program_id == id)
        {
            return Ok(HookChange::Unchanged);
        }
        let object = self.load()?;
        let mut program = object
            .progs_mut()
            .find(|p| p.name() == "pal_service")
            .ok_or_else(|| DataplaneError::Other("pal_service missing from its object".into()))?;
        let used: BTreeSet<i32> = current.iter().map(|h| h.priority).collect();
        let priority = PRIORITIES
            .into_iter()
            .find(|p| !used.contains(p))
            .unwrap_or(PRIORITIES[0]);
        let mut attached = Vec::new();
        for (family, hooknum, hook, name) in HOOKS {
            let link = program
                .attach_netfilter_with_opts(NetfilterOpts {
                    protocol_family: family,
                    hooknum,
                    priority,
                    ..Default::default()
                })
                .map_err(|e| DataplaneError::Netfilter {
                    what: format!("attach it at {hook} ({name}, priority {priority})"),
                    source: boxed(e),
                })?;
            attached.push((name, link));
        }
        // Every family attached: only now replace the pins.
        for dir in [self.root.join("links"), parent(&self.program_pin)] {
            fs::create_dir_all(&dir).map_err(|source| DataplaneError::Fs {
                op: "create directory",
                path: dir.clone(),
                source,
            })?;
        }
        let _old = fs::remove_file(&self.program_pin);
        program
            .pin(&self.program_pin)
            .map_err(|e| DataplaneError::Pin {
                what: "program pal_service".into(),
                path: self.program_pin.clone(),
                source: boxed(e),
            })?;
        for (name, mut link) in attached {
            let pin = self.link_pin(name);
            // bpffs refuses names with a dot.
            let tmp = self.link_pin(&format!("{name}-new"));
            let _stale = fs::remove_file(&tmp);
            link.pin(&tmp).map_err(|e| DataplaneError::Pin {
                what: format!("link {name}"),
                path: tmp.clone(),
                source: boxed(e),
            })?;
            fs::rename(&tmp, &pin).map_err(|source| DataplaneError::Fs {
                op: "replace link pin",
                path: pin.clone(),
                source,
            })?;
        }
        Ok(HookChange::Attached { priority })
    }

    /// The program's accumulated run time and run count (counted while
    /// `kernel.bpf_stats_enabled` is 1): what it costs per packet.
    pub fn run_stats(&self) -> Result<(std::time::Duration, u64), DataplaneError> {
        let info = aya::programs::ProgramInfo::from_pin(&self.program_pin).map_err(|e| {
            DataplaneError::OpenPin {
                what: "program pal_service".into(),
                path: self.program_pin.clone(),
                source: boxed(e),
            }
        })?;
        Ok((info.run_time(), info.run_count()))
    }

    fn pinned_program_id(&self) -> Option<u32> {
        ProgramHandle::from_pinned_path(&self.program_pin)
            .ok()
            .map(|p| p.id())
    }

    /// Open the object and load it with the pinned maps of `maps-v1/`.
    fn load(&self) -> Result<libbpf_rs::Object, DataplaneError> {
        let maps_dir = super::maps_dir(&self.root);
        let mut open = ObjectBuilder::default()
            .open_memory(SERVICE_OBJ)
            .map_err(|e| DataplaneError::Netfilter {
                what: "open the object".into(),
                source: boxed(e),
            })?;
        for mut map in open.maps_mut() {
            let name = map.name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue; // .rodata and friends: the object's own
            }
            let pin = maps_dir.join(&name);
            if pin.exists() {
                // libbpf accepts a pinned map whose key or value size
                // differs from the object's: check it here.
                let handle =
                    MapHandle::from_pinned_path(&pin).map_err(|e| DataplaneError::OpenPin {
                        what: format!("map {name}"),
                        path: pin.clone(),
                        source: boxed(e),
                    })?;
                if handle.map_type() != map.map_type()
                    || handle.key_size() != map.key_size()
                    || handle.value_size() != map.value_size()
                {
                    return Err(DataplaneError::Incompatible {
                        path: pin,
                        detail: format!(
                            "{:?} {}/{} where pal_service expects {:?} {}/{}",
                            handle.map_type(),
                            handle.key_size(),
                            handle.value_size(),
                            map.map_type(),
                            map.key_size(),
                            map.value_size()
                        ),
                    });
                }
            }
            // Pinned by name in the C source: libbpf reuses the pin at this
            // path (and pins a map that is missing there). It reuses only a
            // map of the object's capacity: take the pinned one's (set by
            // whoever created the maps, see `MapSizes`). A map that maps
            // pinned by an earlier build lack (the Service flows' backends
            // and frontends) is sized like the map whose setting it shares.
            let sized_like = match name.as_str() {
                "pal_svc_backends" | "pal_svc_frontends" if !pin.exists() => {
                    maps_dir.join("pal_svc_flows")
                }
                _ => pin.clone(),
            };
            if let Ok(handle) = MapHandle::from_pinned_path(&sized_like) {
                map.set_max_entries(handle.max_entries()).map_err(|e| {
                    DataplaneError::Netfilter {
                        what: format!("size map {name} like its pin"),
                        source: boxed(e),
                    }
                })?;
            }
            map.set_pin_path(&pin).map_err(|e| DataplaneError::Pin {
                what: format!("map {name}"),
                path: pin.clone(),
                source: boxed(e),
            })?;
        }
        open.load().map_err(|e| DataplaneError::Netfilter {
            what: "load it into the kernel (verifier)".into(),
            source: boxed(e),
        })
    }

    /// Remove the hooks (their pins) and the program's pin.
    pub fn remove(&self) -> Result<(), DataplaneError> {
        for (_, _, _, name) in HOOKS {
            let pin = self.link_pin(name);
            match fs::remove_file(&pin) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(DataplaneError::Fs {
                        op: "remove link pin",
                        path: pin,
                        source,
                    });
                }
            }
        }
        Ok(())
    }
}

/// The `pal_svc` map: the frontends this node DNATs.
pub struct Frontends {
    map: HashMap<MapData, SvcKey, u32>,
    path: PathBuf,
    /// What the map holds (read once, then kept).
    current: Option<HashSet<SvcKey>>,
}

impl std::fmt::Debug for Frontends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frontends")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Frontends {
    /// Open the pinned map of a bpf root.
    pub fn open(root: &Path) -> Result<Self, DataplaneError> {
        let path = super::map_pin(root, "pal_svc");
        let open_err = |e: Box<dyn std::error::Error + Send + Sync>| DataplaneError::OpenPin {
            what: "map pal_svc".into(),
            path: path.clone(),
            source: e,
        };
        let data = MapData::from_pin(&path).map_err(|e| open_err(boxed(e)))?;
        let map = Map::from_map_data(data).map_err(|e| open_err(boxed(e)))?;
        let map = map.try_into().map_err(|e| open_err(boxed(e)))?;
        Ok(Self {
            map,
            path,
            current: None,
        })
    }

    /// Make the map hold exactly `desired`; returns (added, removed).
    pub fn set(&mut self, desired: &BTreeSet<SvcKey>) -> Result<(usize, usize), DataplaneError> {
        let current = match self.current.take() {
            Some(c) => c,
            None => self
                .map
                .keys()
                .collect::<Result<HashSet<_>, _>>()
                .map_err(DataplaneError::map("pal_svc"))?,
        };
        let mut now = current.clone();
        let mut added = 0;
        let mut removed = 0;
        let result = (|| {
            for k in desired {
                if !now.contains(k) {
                    self.map
                        .insert(k, 0, 0)
                        .map_err(DataplaneError::map("pal_svc"))?;
                    now.insert(*k);
                    added += 1;
                }
            }
            let gone: Vec<SvcKey> = now
                .iter()
                .filter(|k| !desired.contains(k))
                .copied()
                .collect();
            for k in gone {
                self.map
                    .remove(&k)
                    .map_err(DataplaneError::map("pal_svc"))?;
                now.remove(&k);
                removed += 1;
            }
            Ok(())
        })();
        // What was written stays known, even after a failure.
        self.current = Some(now);
        result.map(|()| (added, removed))
    }

    /// How many frontends the map holds.
    pub fn len(&self) -> usize {
        self.current
            .as_ref()
            .map_or_else(|| self.map.keys().count(), HashSet::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
