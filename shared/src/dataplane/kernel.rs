//! The real dataplane: aya loads the clang-built objects, pins maps and
//! programs under the bpf root, attaches programs with TCX links (pinned)
//! or clsact filters, and diff-syncs the maps.
//!
//! Layout under the root (default `/sys/fs/bpf/palisade`):
//! `maps-v<ABI version>/<name>`, `progs/<object hash>/{from_container,to_container}`,
//! `links/ep<id>-{from,to}-container`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{
        Array, HashMap, HashOfMaps, LpmTrie, Map, MapData, MapError, MapInfo, MapType, PerCpuArray,
        PerCpuHashMap, SockMap, lpm_trie::Key as LpmKey,
    },
    programs::{
        LinkOrder, ProgramError, SchedClassifier, SkLookup, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
    },
    util::KernelVersion,
};
use nix::sys::statfs;
use sha2::{Digest, Sha256};

use super::{
    AttachMode, Attachment, CounterRow, Dataplane, DataplaneError, DataplaneStatus, Lookup,
    LookupAnswer, MapFill, MapSizes, NlFilter, ProgramStatus, SyncReport,
};
use crate::{
    abi::{
        self, ConfigValue, CounterKey, CounterValue, CtKey, CtValue, Direction, EndpointValue,
        ID_ANY, ID_WORLD, IpcacheAddr, IpcacheValue, POLICY_PREFIX_FULL, PolicyKey, PolicyKeyData,
        PolicyValue, Reason, SrcguardKey, TIER_NETPOL, Verdict,
    },
    compile::{Desired, Prefix},
    engine::Delta,
    netlink,
};

static FROM_CONTAINER_OBJ: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/from_container.o"));
static TO_CONTAINER_OBJ: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/to_container.o"));

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// One of the two programs.
#[derive(Debug, Clone, Copy)]
pub struct ProgramSpec {
    /// Pin name under `progs/<hash>/`.
    pub pin: &'static str,
    /// Function name in the object.
    pub function: &'static str,
    pub object: &'static [u8],
    pub hook: TcAttachType,
    pub hook_name: &'static str,
}

pub const FROM_CONTAINER: ProgramSpec = ProgramSpec {
    pin: "from_container",
    function: "pal_from_container",
    object: FROM_CONTAINER_OBJ,
    hook: TcAttachType::Ingress,
    hook_name: "ingress",
};

pub const TO_CONTAINER: ProgramSpec = ProgramSpec {
    pin: "to_container",
    function: "pal_to_container",
    object: TO_CONTAINER_OBJ,
    hook: TcAttachType::Egress,
    hook_name: "egress",
};

const PROGRAMS: [ProgramSpec; 2] = [FROM_CONTAINER, TO_CONTAINER];

/// Every map: name, type, key size, value size (checked against pinned
/// maps, so a map left by an incompatible build is refused, not misread).
const MAPS: &[(&str, MapType, usize, usize)] = &[
    (
        "pal_endpoints",
        MapType::Hash,
        4,
        size_of::<EndpointValue>(),
    ),
    (
        "pal_ipcache",
        MapType::LpmTrie,
        4 + size_of::<IpcacheAddr>(),
        size_of::<IpcacheValue>(),
    ),
    (
        "pal_ipcache_host",
        MapType::Hash,
        size_of::<IpcacheAddr>(),
        size_of::<IpcacheValue>(),
    ),
    ("pal_srcguard", MapType::Hash, size_of::<SrcguardKey>(), 4),
    (
        "pal_policy",
        MapType::Hash,
        size_of::<PolicyKey>(),
        size_of::<PolicyValue>(),
    ),
    ("pal_ct_tables", MapType::HashOfMaps, 4, 4),
    (
        "pal_budget",
        MapType::Hash,
        4,
        size_of::<abi::BudgetValue>(),
    ),
    ("pal_frag_tables", MapType::HashOfMaps, 4, 4),
    ("pal_config", MapType::Array, 4, size_of::<ConfigValue>()),
    (
        "pal_proxy",
        MapType::Array,
        4,
        size_of::<abi::ProxyConfig>(),
    ),
    (
        "pal_counters",
        MapType::PerCpuHash,
        size_of::<CounterKey>(),
        size_of::<CounterValue>(),
    ),
    ("pal_svc", MapType::Hash, size_of::<abi::SvcKey>(), 4),
    (
        "pal_svc_flows",
        MapType::LruHash,
        size_of::<abi::SvcFlowKey>(),
        size_of::<abi::SvcFlowValue>(),
    ),
    (
        "pal_svc_backends",
        MapType::LruHash,
        size_of::<abi::SvcFlowKey>(),
        size_of::<abi::SvcBackend>(),
    ),
    (
        "pal_svc_frontends",
        MapType::LruHash,
        size_of::<abi::SvcFlowKey>(),
        size_of::<abi::SvcFlowKey>(),
    ),
    ("pal_events", MapType::RingBuf, 0, 0),
    ("pal_evstats", MapType::PerCpuArray, 4, 8),
    ("pal_ratelimit_ep", MapType::PerCpuHash, 4, 16),
    ("pal_ep_mac", MapType::Hash, 4, size_of::<abi::MacValue>()),
];

/// Flow events per second per CPU, and the burst, until configured.
const DEFAULT_EVENTS_PER_SEC: u32 = 5000;
const DEFAULT_EVENTS_BURST: u32 = 5000;

/// Hash of both objects: programs are pinned per build.
pub fn objects_hash() -> String {
    hash_objects(FROM_CONTAINER_OBJ, TO_CONTAINER_OBJ)
}

fn hash_objects(from: &[u8], to: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(from);
    h.update(to);
    h.update(super::service::object());
    h.update(L7_STEER_OBJ);
    let digest = h.finalize();
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Objects to load instead of the ones built into this binary.
#[derive(Debug, Clone)]
struct Objects {
    from_container: Vec<u8>,
    to_container: Vec<u8>,
    hash: String,
}

type Endpoints = HashMap<MapData, u32, EndpointValue>;
type Ipcache = LpmTrie<MapData, IpcacheAddr, IpcacheValue>;
type IpcacheHost = HashMap<MapData, IpcacheAddr, IpcacheValue>;
type PolicyMap = HashMap<MapData, PolicyKey, PolicyValue>;
type Srcguard = HashMap<MapData, SrcguardKey, u32>;
/// One endpoint's flows opened in one direction (`struct pal_ct_table`).
type CtTable = HashMap<MapData, CtKey, CtValue>;
type CtTables = HashOfMaps<MapData, u32, CtTable>;

/// `BPF_F_NO_PREALLOC`, as `struct pal_ct_table` has it (an inner map
/// must match its template).
const NO_PREALLOC: u32 = 1;

/// One endpoint's fragment table for one direction (`struct
/// pal_frag_table`).
type FragTable = HashMap<MapData, abi::FragKey, abi::FragValue>;
type FragTables = HashOfMaps<MapData, u32, FragTable>;

/// The per-endpoint tables there are: keys of `pal_ct_tables` and
/// `pal_frag_tables`.
struct Have {
    ct: BTreeSet<u32>,
    frag: BTreeSet<u32>,
}

fn tables_have(maps: &Maps) -> Result<Have, DataplaneError> {
    Ok(Have {
        ct: maps
            .ct_tables
            .keys()
            .collect::<Result<_, _>>()
            .map_err(DataplaneError::map("pal_ct_tables"))?,
        frag: maps
            .frag_tables
            .keys()
            .collect::<Result<_, _>>()
            .map_err(DataplaneError::map("pal_frag_tables"))?,
    })
}

/// A map of `kind` made with BPF_MAP_CREATE (aya creates only plain
/// hashes standalone; a fragment table is an LRU).
fn create_map(
    kind: u32,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
    flags: u32,
    name: &str,
) -> Result<MapData, DataplaneError> {
    #[repr(C)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    let mut map_name = [0u8; 16];
    for (d, s) in map_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let attr = CreateAttr {
        map_type: kind,
        key_size: key_size as u32,
        value_size: value_size as u32,
        max_entries,
        map_flags: flags,
        inner_map_fd: 0,
        numa_node: 0,
        map_name,
    };
    // SAFETY: `attr` is the leading part of bpf_attr for BPF_MAP_CREATE,
    // passed with its exact size (the kernel zero-extends the rest); the
    // returned descriptor is new and owned here.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const CreateAttr,
            size_of::<CreateAttr>(),
        )
    };
    if fd < 0 {
        return Err(DataplaneError::Other(format!(
            "create map {name}: {}",
            io::Error::last_os_error()
        )));
    }
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    MapData::from_fd(fd).map_err(DataplaneError::map(""))
}

/// `BPF_MAP_TYPE_LRU_HASH`.
const LRU_HASH: u32 = 9;

/// `BPF_MAP_TYPE_HASH`.
const HASH: u32 = 1;

/// Endpoints whose tables are added to (or removed from) the outer maps in
/// one batch. Every change of a map of maps made from user space waits for
/// an RCU grace period (about 9 ms here); a batch waits once. A batch also
/// bounds the descriptors open at once (four tables an endpoint).
const TABLE_BATCH: usize = 256;

/// `BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH` on an outer map (aya
/// 0.14 has no batch calls). `fds`: the inner maps, for an update.
fn outer_batch(outer: &MapData, keys: &[u32], fds: Option<&[u32]>) -> io::Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: fds.map_or(0, |f| f.as_ptr() as u64),
        count: keys.len() as u32,
        map_fd: outer.fd().as_fd().as_raw_fd() as u32,
        // A batch takes no BPF_NOEXIST (only BPF_F_LOCK): it replaces. The
        // callers hold the state lock and add only tables that were
        // missing under it.
        elem_flags: 0,
        flags: 0,
    };
    let cmd = if fds.is_some() {
        BPF_MAP_UPDATE_BATCH
    } else {
        BPF_MAP_DELETE_BATCH
    };
    // SAFETY: `attr` is the batch part of bpf_attr, passed with its exact
    // size; `keys` (and `fds`, as long as `keys`) outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &attr as *const BatchAttr,
            size_of::<BatchAttr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Put `tables` into outer map `outer` under `ids`, in one batch.
fn insert_tables(
    outer: &MapData,
    ids: &[u32],
    tables: &[MapData],
    map: &'static str,
) -> Result<(), DataplaneError> {
    let fds: Vec<u32> = tables
        .iter()
        .map(|t| t.fd().as_fd().as_raw_fd() as u32)
        .collect();
    let failed = |e: io::Error| DataplaneError::Other(format!("add tables to {map}: {e}"));
    outer_batch(outer, ids, Some(&fds)).map_err(failed)
}

/// Take the tables under `ids` out of outer map `outer`, in one batch;
/// those already gone are fine.
fn remove_tables(outer: &MapData, ids: &[u32], map: &'static str) -> Result<(), DataplaneError> {
    let failed = |e: io::Error| DataplaneError::Other(format!("remove tables from {map}: {e}"));
    match outer_batch(outer, ids, None) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            for id in ids {
                match outer_batch(outer, &[*id], None) {
                    Err(e) if e.raw_os_error() != Some(libc::ENOENT) => return Err(failed(e)),
                    _ => {}
                }
            }
            Ok(())
        }
        Err(e) => Err(failed(e)),
    }
}

/// Give endpoints `ep_ids` their conntrack tables (`conntrack` flows each)
/// and fragment tables (`fragments` datagrams each), one per direction,
/// unless they have them.
fn ensure_tables(
    maps: &mut Maps,
    have: &Have,
    ep_ids: &BTreeSet<u32>,
    sizes: &MapSizes,
) -> Result<(), DataplaneError> {
    let ids: Vec<u32> = ep_ids
        .iter()
        .flat_map(|ep| {
            [Direction::Ingress, Direction::Egress].map(|dir| abi::ct_table(*ep, dir as u8))
        })
        .collect();
    let budget = sizes.conntrack_budget();
    for chunk in ids.chunks(TABLE_BATCH * 2) {
        let new_ct: Vec<u32> = chunk
            .iter()
            .copied()
            .filter(|id| !have.ct.contains(id))
            .collect();
        let mut tables = Vec::with_capacity(new_ct.len());
        for id in &new_ct {
            tables.push(create_map(
                HASH,
                size_of::<CtKey>(),
                size_of::<CtValue>(),
                budget,
                NO_PREALLOC,
                "pal_ct_table",
            )?);
            let record = abi::BudgetValue {
                capacity: budget,
                ..Default::default()
            };
            maps.budget
                .insert(*id, record, 0)
                .map_err(DataplaneError::map("pal_budget"))?;
        }
        insert_tables(&maps.ct_outer, &new_ct, &tables, "pal_ct_tables")?;
        drop(tables);

        let new_frag: Vec<u32> = chunk
            .iter()
            .copied()
            .filter(|id| !have.frag.contains(id))
            .collect();
        let mut tables = Vec::with_capacity(new_frag.len());
        for _ in &new_frag {
            tables.push(create_map(
                LRU_HASH,
                size_of::<abi::FragKey>(),
                size_of::<abi::FragValue>(),
                sizes.fragment_budget(),
                0,
                "pal_frag_table",
            )?);
        }
        insert_tables(&maps.frag_outer, &new_frag, &tables, "pal_frag_tables")?;
    }
    Ok(())
}

/// Drop what the datapath keeps for endpoints `ep_ids` alone: their
/// conntrack and fragment tables (their flows go with them), budget
/// records and event token buckets.
fn remove_endpoint_state(maps: &mut Maps, ep_ids: &BTreeSet<u32>) -> Result<(), DataplaneError> {
    if ep_ids.is_empty() {
        return Ok(());
    }
    let have = tables_have(maps)?;
    let ids: Vec<u32> = ep_ids
        .iter()
        .flat_map(|ep| {
            [Direction::Ingress, Direction::Egress].map(|dir| abi::ct_table(*ep, dir as u8))
        })
        .collect();
    for ep in ep_ids {
        absent_ok(maps.ratelimit.remove(ep), "pal_ratelimit_ep")?;
    }
    for id in &ids {
        absent_ok(maps.budget.remove(id), "pal_budget")?;
    }
    for chunk in ids.chunks(TABLE_BATCH * 2) {
        let ct: Vec<u32> = chunk
            .iter()
            .copied()
            .filter(|i| have.ct.contains(i))
            .collect();
        remove_tables(&maps.ct_outer, &ct, "pal_ct_tables")?;
        let frag: Vec<u32> = chunk
            .iter()
            .copied()
            .filter(|i| have.frag.contains(i))
            .collect();
        remove_tables(&maps.frag_outer, &frag, "pal_frag_tables")?;
    }
    Ok(())
}

/// A removal of what is not there (any more) is done.
fn absent_ok(r: Result<(), MapError>, map: &'static str) -> Result<(), DataplaneError> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(DataplaneError::map(map)(e)),
    }
}

/// The maps user space writes or reads.
struct Maps {
    endpoints: Endpoints,
    /// Prefixes shorter than a whole address.
    ipcache: Ipcache,
    /// Whole addresses (/128, IPv4 /32).
    ipcache_host: IpcacheHost,
    policy: PolicyMap,
    srcguard: Srcguard,
    config: Array<MapData, ConfigValue>,
    counters: PerCpuHashMap<MapData, CounterKey, CounterValue>,
    evstats: PerCpuArray<MapData, u64>,
    ct_tables: CtTables,
    frag_tables: FragTables,
    /// The same two outer maps, for batch calls.
    ct_outer: MapData,
    frag_outer: MapData,
    budget: HashMap<MapData, u32, abi::BudgetValue>,
    /// `pal_ep_mac`: host veth ifindex → the container's MAC.
    ep_mac: HashMap<MapData, u32, abi::MacValue>,
    /// `pal_ratelimit_ep`: each endpoint's event token bucket (last_ns,
    /// tokens), per CPU.
    ratelimit: PerCpuHashMap<MapData, u32, [u64; 2]>,
    /// The kernel's id of `pal_config` when these were opened: a pin that
    /// names another map means the datapath was removed and created again.
    config_id: u32,
}

impl std::fmt::Debug for Maps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maps").finish_non_exhaustive()
    }
}

/// The kernel dataplane rooted at one bpffs directory.
#[derive(Debug)]
pub struct KernelDataplane {
    root: PathBuf,
    mode: AttachMode,
    maps: Option<Maps>,
    objects: Option<Objects>,
    /// Capacities for maps this creates; checked against pinned maps when
    /// they were given explicitly.
    sizes: MapSizes,
    sizes_explicit: bool,
}

fn fs_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DataplaneError {
    let path = path.to_owned();
    move |source| DataplaneError::Fs { op, path, source }
}

fn boxed<E: std::error::Error + Send + Sync + 'static>(
    e: E,
) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

impl KernelDataplane {
    pub fn new(root: impl Into<PathBuf>, mode: AttachMode) -> Self {
        Self {
            root: root.into(),
            mode,
            maps: None,
            objects: None,
            sizes: MapSizes::default(),
            sizes_explicit: false,
        }
    }

    /// Create maps with these capacities, and refuse pinned maps created
    /// with others (a capacity is fixed when a map is created). Without
    /// this, the defaults are used to create and pinned maps are taken as
    /// they are.
    pub fn with_sizes(mut self, sizes: Option<MapSizes>) -> Self {
        if let Some(sizes) = sizes {
            self.sizes = sizes;
            self.sizes_explicit = true;
        }
        self
    }

    /// Load the programs from these clang-built objects instead of the ones
    /// built in (the same sources rebuilt, for live upgrades).
    pub fn with_objects(mut self, from_container: Vec<u8>, to_container: Vec<u8>) -> Self {
        let hash = hash_objects(&from_container, &to_container);
        self.objects = Some(Objects {
            from_container,
            to_container,
            hash,
        });
        self
    }

    /// The hash of the objects this dataplane loads.
    pub fn hash(&self) -> String {
        self.objects
            .as_ref()
            .map_or_else(objects_hash, |o| o.hash.clone())
    }

    fn object(&self, spec: &ProgramSpec) -> &[u8] {
        match &self.objects {
            None => spec.object,
            Some(o) if spec.pin == FROM_CONTAINER.pin => &o.from_container,
            Some(o) => &o.to_container,
        }
    }

    /// Whether ADDs can be served: an existing datapath is compatible, or
    /// there is a bpffs to load one into. Loads nothing.
    pub fn ready(&mut self) -> Result<(), DataplaneError> {
        if self.open_existing()? {
            return Ok(());
        }
        let mut existing = self.root.as_path();
        while !existing.exists() {
            existing = existing.parent().unwrap_or(Path::new("/"));
        }
        let on_bpffs =
            statfs::statfs(existing).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
        let mountable = self.root.starts_with("/sys/fs/bpf") && Path::new("/sys/fs/bpf").is_dir();
        if on_bpffs || mountable {
            Ok(())
        } else {
            Err(DataplaneError::NotBpffs {
                path: self.root.clone(),
            })
        }
    }

    /// The attach mode it was created with.
    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn maps_dir(&self) -> PathBuf {
        super::maps_dir(&self.root)
    }

    fn progs_dir(&self) -> PathBuf {
        self.root.join("progs").join(self.hash())
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// Where this build's netfilter program for Services is pinned.
    pub fn service_program_pin(&self) -> PathBuf {
        self.progs_dir().join("service")
    }

    /// Where a program of this build is pinned.
    pub fn program_pin(&self, spec: &ProgramSpec) -> PathBuf {
        self.progs_dir().join(spec.pin)
    }

    fn maps(&self) -> Result<&Maps, DataplaneError> {
        self.maps
            .as_ref()
            .ok_or_else(|| DataplaneError::Other("dataplane used before prepare()".into()))
    }

    fn maps_mut(&mut self) -> Result<&mut Maps, DataplaneError> {
        self.maps
            .as_mut()
            .ok_or_else(|| DataplaneError::Other("dataplane used before prepare()".into()))
    }

    /// Make sure `root` can hold pins: it (or its nearest existing
    /// ancestor) must be on bpffs. The conventional `/sys/fs/bpf` is
    /// mounted when nothing is mounted there yet.
    fn ensure_bpffs(&self) -> Result<(), DataplaneError> {
        let mut existing = self.root.as_path();
        while !existing.exists() {
            existing = existing.parent().unwrap_or(Path::new("/"));
        }
        let on_bpffs = |p: &Path| {
            statfs::statfs(p)
                .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
                .unwrap_or(false)
        };
        if !on_bpffs(existing) {
            let sys = Path::new("/sys/fs/bpf");
            if self.root.starts_with(sys) && sys.is_dir() && !on_bpffs(sys) {
                nix::mount::mount(
                    Some("bpf"),
                    sys,
                    Some("bpf"),
                    nix::mount::MsFlags::empty(),
                    None::<&str>,
                )
                .map_err(|source| DataplaneError::Mount {
                    path: sys.to_owned(),
                    source,
                })?;
            } else {
                return Err(DataplaneError::NotBpffs {
                    path: self.root.clone(),
                });
            }
        }
        for dir in [self.maps_dir(), self.links_dir(), self.progs_dir()] {
            fs::create_dir_all(&dir).map_err(fs_err("create directory", &dir))?;
        }
        Ok(())
    }

    fn check_pinned_maps(&self) -> Result<(), DataplaneError> {
        if self.sizes_explicit
            && let Err(e) = super::check_map_sizes(&self.root, &self.sizes)
        {
            if !datapath_unused(&self.root) {
                return Err(e);
            }
            // Created by a process that had no size setting (`palisadectl
            // apply` before the first container), holding no endpoint and
            // no hook: created again with this configuration's capacities;
            // the store fills them (a fresh map's sync token is 0).
            tracing::info!(
                "the pinned maps hold no endpoint and have other capacities than configured \
                 ({e}); creating them again"
            );
            for dir in [self.maps_dir(), self.progs_dir()] {
                if dir.exists() {
                    fs::remove_dir_all(&dir).map_err(fs_err("remove", &dir))?;
                }
            }
            fs::create_dir_all(self.maps_dir())
                .map_err(fs_err("create directory", &self.maps_dir()))?;
            fs::create_dir_all(self.progs_dir())
                .map_err(fs_err("create directory", &self.progs_dir()))?;
        }
        for (name, kind, key, value) in MAPS {
            let path = self.maps_dir().join(name);
            if !path.exists() {
                continue;
            }
            let info = MapInfo::from_pin(&path).map_err(|e| DataplaneError::OpenPin {
                what: format!("map {name}"),
                path: path.clone(),
                source: boxed(e),
            })?;
            let pinned_kind = info.map_type().ok();
            if pinned_kind != Some(*kind) {
                return Err(DataplaneError::Incompatible {
                    path,
                    detail: format!("map type {pinned_kind:?}, expected {kind:?}"),
                });
            }
            if *key != 0
                && (info.key_size() as usize != *key || info.value_size() as usize != *value)
            {
                return Err(DataplaneError::Incompatible {
                    path,
                    detail: format!(
                        "key/value sizes {}/{}, expected {key}/{value}",
                        info.key_size(),
                        info.value_size()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Load both objects (creating or reusing pinned maps) and pin their
    /// programs under this build's hash.
    fn load_programs(&self) -> Result<(), DataplaneError> {
        let dir = self.progs_dir();
        for spec in PROGRAMS {
            let pin = dir.join(spec.pin);
            if pin.exists() {
                continue;
            }
            let mut loader = EbpfLoader::new();
            loader.default_map_pin_directory(self.maps_dir());
            for (map, _, entries) in self.sizes.iter() {
                loader.map_max_entries(map, entries);
            }
            let mut bpf = loader
                .load(self.object(&spec))
                .map_err(|e| DataplaneError::Load {
                    object: spec.pin,
                    source: Box::new(e),
                })?;
            let prog: &mut SchedClassifier = bpf
                .program_mut(spec.function)
                .ok_or_else(|| {
                    DataplaneError::Other(format!("program {} missing from object", spec.function))
                })?
                .try_into()
                .map_err(|e: ProgramError| DataplaneError::Verify {
                    program: spec.function,
                    source: Box::new(e),
                })?;
            prog.load().map_err(|e| DataplaneError::Verify {
                program: spec.function,
                source: Box::new(e),
            })?;
            prog.pin(&pin).map_err(|e| DataplaneError::Pin {
                what: format!("program {}", spec.function),
                path: pin.clone(),
                source: boxed(e),
            })?;
        }
        // Older builds' program pins: their programs stay loaded while a
        // link still uses them.
        let parent = self.root.join("progs");
        if let Ok(entries) = fs::read_dir(&parent) {
            for e in entries.flatten() {
                if e.path() != dir {
                    let _removed = fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }

    fn open_map_data(&self, name: &str) -> Result<MapData, DataplaneError> {
        let path = self.maps_dir().join(name);
        MapData::from_pin(&path).map_err(|e| DataplaneError::OpenPin {
            what: format!("map {name}"),
            path,
            source: boxed(e),
        })
    }

    fn open_map(&self, name: &str) -> Result<Map, DataplaneError> {
        let path = self.maps_dir().join(name);
        let data = self.open_map_data(name)?;
        Map::from_map_data(data).map_err(|e| DataplaneError::OpenPin {
            what: format!("map {name}"),
            path,
            source: boxed(e),
        })
    }

    fn open_maps(&self) -> Result<Maps, DataplaneError> {
        macro_rules! typed {
            ($name:literal) => {
                self.open_map($name)?
                    .try_into()
                    .map_err(|e| DataplaneError::OpenPin {
                        what: format!("map {}", $name),
                        path: self.maps_dir().join($name),
                        source: boxed(e),
                    })?
            };
        }
        Ok(Maps {
            endpoints: typed!("pal_endpoints"),
            ipcache: typed!("pal_ipcache"),
            ipcache_host: typed!("pal_ipcache_host"),
            policy: typed!("pal_policy"),
            srcguard: typed!("pal_srcguard"),
            config: typed!("pal_config"),
            counters: typed!("pal_counters"),
            evstats: typed!("pal_evstats"),
            ct_tables: typed!("pal_ct_tables"),
            frag_tables: typed!("pal_frag_tables"),
            ct_outer: self.open_map_data("pal_ct_tables")?,
            frag_outer: self.open_map_data("pal_frag_tables")?,
            budget: typed!("pal_budget"),
            ratelimit: typed!("pal_ratelimit_ep"),
            ep_mac: typed!("pal_ep_mac"),
            config_id: self.pinned_config_id().unwrap_or(0),
        })
    }

    /// The id of the map pinned as `pal_config` now.
    fn pinned_config_id(&self) -> Option<u32> {
        MapInfo::from_pin(self.maps_dir().join("pal_config"))
            .ok()
            .map(|i| i.id())
    }

    /// Forget opened maps whose pins are gone or name other maps (the
    /// datapath was removed, or created again by another process, while
    /// this one kept them open: writing to them would change nothing any
    /// program reads).
    fn forget_stale_maps(&mut self) {
        if let Some(m) = &self.maps
            && self.pinned_config_id() != Some(m.config_id)
        {
            tracing::info!(
                "the pinned datapath under {} changed; opening it again",
                self.root.display()
            );
            self.maps = None;
        }
    }

    fn effective_mode(&self) -> AttachMode {
        match self.mode {
            AttachMode::Auto => {
                let tcx = KernelVersion::current()
                    .map(|v| v >= KernelVersion::new(6, 6, 0))
                    .unwrap_or(false);
                if tcx {
                    AttachMode::Tcx
                } else {
                    AttachMode::Netlink
                }
            }
            m => m,
        }
    }

    fn link_pin(&self, ep_id: u32, spec: &ProgramSpec) -> PathBuf {
        self.links_dir()
            .join(format!("ep{ep_id}-{}", spec.pin.replace('_', "-")))
    }

    fn open_program(&self, spec: &ProgramSpec) -> Result<SchedClassifier, DataplaneError> {
        let pin = self.program_pin(spec);
        SchedClassifier::from_pin(&pin).map_err(|e| DataplaneError::OpenPin {
            what: format!("program {}", spec.function),
            path: pin,
            source: boxed(e),
        })
    }

    fn attach_tcx(
        &self,
        ep_id: u32,
        spec: &ProgramSpec,
        ifname: &str,
        ifindex: u32,
    ) -> Result<PathBuf, DataplaneError> {
        let attach_err = |e: Box<dyn std::error::Error + Send + Sync>| DataplaneError::Attach {
            hook: spec.hook_name,
            ifname: ifname.to_owned(),
            ifindex,
            source: e,
        };
        let mut prog = self.open_program(spec)?;
        let id = prog
            .attach_with_options(
                ifname,
                spec.hook,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .map_err(|e| attach_err(boxed(e)))?;
        let link = prog.take_link(id).map_err(|e| attach_err(boxed(e)))?;
        let fd: FdLink = link.try_into().map_err(|e| attach_err(boxed(e)))?;
        let pin = self.link_pin(ep_id, spec);
        if pin.exists() {
            fs::remove_file(&pin).map_err(fs_err("remove stale link pin", &pin))?;
        }
        fd.pin(&pin).map_err(|e| DataplaneError::Pin {
            what: format!("tc {} link of {ifname}", spec.hook_name),
            path: pin.clone(),
            source: boxed(e),
        })?;
        Ok(pin)
    }

    fn attach_netlink(
        &self,
        spec: &ProgramSpec,
        ifname: &str,
        ifindex: u32,
    ) -> Result<NlFilter, DataplaneError> {
        let attach_err = |e: Box<dyn std::error::Error + Send + Sync>| DataplaneError::Attach {
            hook: spec.hook_name,
            ifname: ifname.to_owned(),
            ifindex,
            source: e,
        };
        match tc::qdisc_add_clsact(ifname) {
            Ok(()) => {}
            // Another program (or our other hook) added it already.
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(attach_err(boxed(e))),
        }
        let mut prog = self.open_program(spec)?;
        let id = prog
            .attach_with_options(
                ifname,
                spec.hook,
                TcAttachOptions::Netlink(NlOptions {
                    priority: 1,
                    handle: TcHandle::AUTO_ASSIGN,
                    classid: None,
                }),
            )
            .map_err(|e| attach_err(boxed(e)))?;
        let link: SchedClassifierLink = prog.take_link(id).map_err(|e| attach_err(boxed(e)))?;
        let filter = NlFilter {
            priority: link.priority().map_err(|e| attach_err(boxed(e)))?,
            handle: link.handle().map_err(|e| attach_err(boxed(e)))?.into(),
        };
        // Dropping the link object would delete the filter; the filter must
        // outlive this process, and detach() removes it by priority/handle.
        std::mem::forget(link);
        Ok(filter)
    }

    fn detach_netlink(
        &self,
        spec: &ProgramSpec,
        ifname: &str,
        ifindex: u32,
        f: NlFilter,
    ) -> Result<(), DataplaneError> {
        // The veth may be gone already (container deleted): nothing to do.
        // A different interface that reused the name is not ours.
        match current_ifindex(ifname) {
            Some(i) if i == ifindex => {}
            _ => return Ok(()),
        }
        let link =
            SchedClassifierLink::attached(ifname, spec.hook, f.priority, f.handle.into(), None)
                .map_err(|e| DataplaneError::Detach {
                    hook: spec.hook_name,
                    ifname: ifname.to_owned(),
                    source: boxed(e),
                })?;
        match aya::programs::Link::detach(link) {
            Ok(()) => Ok(()),
            Err(ProgramError::NetlinkError(e)) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(DataplaneError::Detach {
                hook: spec.hook_name,
                ifname: ifname.to_owned(),
                source: boxed(e),
            }),
        }
    }

    /// Ids of the programs of this build.
    fn program_ids(&self) -> Result<BTreeMap<&'static str, u32>, DataplaneError> {
        let mut out = BTreeMap::new();
        for spec in PROGRAMS {
            let info =
                aya::programs::ProgramInfo::from_pin(self.program_pin(&spec)).map_err(|e| {
                    DataplaneError::OpenPin {
                        what: format!("program {}", spec.function),
                        path: self.program_pin(&spec),
                        source: boxed(e),
                    }
                })?;
            out.insert(spec.pin, info.id());
        }
        Ok(out)
    }
}

fn current_ifindex(ifname: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(ifname).ok()
}

/// Read a whole hash map.
/// Read a whole hash map. Batched (`BPF_MAP_LOOKUP_BATCH`, thousands of
/// entries a system call) where the kernel has it, else entry by entry
/// (two system calls each: reading 150,000 policy entries one by one takes
/// most of half a second).
fn read_hash<K: aya::Pod + Ord, V: aya::Pod>(
    hash: &HashMap<MapData, K, V>,
    map: &'static str,
) -> Result<BTreeMap<K, V>, DataplaneError> {
    if let Some(all) = read_hash_batched(hash, map)? {
        return Ok(all);
    }
    let mut out = BTreeMap::new();
    for item in hash.iter() {
        let (k, v) = item.map_err(DataplaneError::map(map))?;
        out.insert(k, v);
    }
    Ok(out)
}

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH` and
/// `BPF_MAP_DELETE_BATCH` from `enum bpf_cmd`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `None`: the kernel cannot read this map in batches.
fn read_hash_batched<K: aya::Pod + Ord, V: aya::Pod>(
    hash: &HashMap<MapData, K, V>,
    map: &'static str,
) -> Result<Option<BTreeMap<K, V>>, DataplaneError> {
    use aya::maps::IterableMap;

    const CHUNK: usize = 4096;
    let fd = hash.map().fd().as_fd().as_raw_fd();
    let mut keys: Vec<std::mem::MaybeUninit<K>> = Vec::with_capacity(CHUNK);
    let mut values: Vec<std::mem::MaybeUninit<V>> = Vec::with_capacity(CHUNK);
    // A hash map's batch token is a bucket number (u32); room for more.
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut first = true;
    let mut out = BTreeMap::new();
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::addr_of!(token_in) as u64
            },
            out_batch: std::ptr::addr_of_mut!(token_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` is the batch member of bpf_attr, passed with its
        // exact size; the kernel writes at most `count` keys and values
        // into buffers with room for CHUNK of each (K and V are the map's
        // key and value types, checked against the pinned map when it was
        // opened), and the token into `token_out`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>(),
            )
        };
        let errno = (r < 0).then(|| io::Error::last_os_error().raw_os_error().unwrap_or(0));
        if let Some(e) = errno
            && e != libc::ENOENT
        {
            // ENOTSUPP (524) is the kernel's own "not supported".
            if first && matches!(e, libc::EINVAL | libc::EOPNOTSUPP | 524) {
                return Ok(None);
            }
            return Err(DataplaneError::Map {
                map,
                source: Box::new(MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_lookup_batch",
                    io_error: io::Error::from_raw_os_error(e),
                })),
            });
        }
        let n = (attr.count as usize).min(CHUNK);
        for i in 0..n {
            // SAFETY: the kernel filled the first `n` slots.
            let (k, v) = unsafe {
                (
                    keys.as_ptr().add(i).read().assume_init(),
                    values.as_ptr().add(i).read().assume_init(),
                )
            };
            out.insert(k, v);
        }
        if errno.is_some() {
            return Ok(Some(out)); // ENOENT: that was the last batch
        }
        token_in = token_out;
        first = false;
    }
}

/// Read a whole LPM trie into a map keyed like the compiler's output.
fn read_trie<K: aya::Pod + Ord, V: aya::Pod>(
    trie: &LpmTrie<MapData, K, V>,
    map: &'static str,
) -> Result<BTreeMap<(u32, K), V>, DataplaneError> {
    let mut out = BTreeMap::new();
    for item in trie.iter() {
        let (k, v) = item.map_err(DataplaneError::map(map))?;
        out.insert((k.prefix_len(), k.data()), v);
    }
    Ok(out)
}

impl Dataplane for KernelDataplane {
    /// Open the pinned maps if a datapath exists, without loading or
    /// creating anything (for read-only commands). `false`: nothing is
    /// loaded under this root yet.
    fn open_existing(&mut self) -> Result<bool, DataplaneError> {
        self.forget_stale_maps();
        if self.maps.is_some() {
            return Ok(true);
        }
        let complete = MAPS
            .iter()
            .all(|(name, _, _, _)| self.maps_dir().join(name).exists())
            && PROGRAMS.iter().all(|p| self.program_pin(p).exists());
        if !complete {
            return Ok(false);
        }
        self.check_pinned_maps()?;
        self.maps = Some(self.open_maps()?);
        Ok(true)
    }

    fn prepare(&mut self) -> Result<(), DataplaneError> {
        self.forget_stale_maps();
        if self.maps.is_some() {
            return Ok(());
        }
        self.ensure_bpffs()?;
        self.check_pinned_maps()?;
        // Programs pinned without their maps would write to maps nobody
        // can reach: reload them together.
        let maps_missing = MAPS
            .iter()
            .any(|(name, _, _, _)| !self.maps_dir().join(name).exists());
        if maps_missing && self.progs_dir().exists() {
            fs::remove_dir_all(self.progs_dir())
                .map_err(fs_err("remove program pins", &self.progs_dir()))?;
            fs::create_dir_all(self.progs_dir())
                .map_err(fs_err("create directory", &self.progs_dir()))?;
        }
        self.load_programs()?;
        let mut maps = self.open_maps()?;
        let cfg = maps
            .config
            .get(&0, 0)
            .map_err(DataplaneError::map("pal_config"))?;
        if cfg == ConfigValue::default() {
            let init = ConfigValue {
                epoch: 1,
                flags: abi::CFG_ALLOW_HOST | abi::CFG_EVENTS,
                events_per_sec: DEFAULT_EVENTS_PER_SEC,
                events_burst: DEFAULT_EVENTS_BURST,
                sync_token: 0,
            };
            maps.config
                .set(0, init, 0)
                .map_err(DataplaneError::map("pal_config"))?;
        }
        self.maps = Some(maps);
        Ok(())
    }

    fn attach(
        &mut self,
        ep_id: u32,
        ifname: &str,
        ifindex: u32,
    ) -> Result<Attachment, DataplaneError> {
        self.prepare()?;
        let mode = self.effective_mode();
        if mode == AttachMode::Tcx {
            match self.attach_tcx(ep_id, &FROM_CONTAINER, ifname, ifindex) {
                Ok(from) => {
                    crate::fault::point("attach:first-link");
                    let to = match self.attach_tcx(ep_id, &TO_CONTAINER, ifname, ifindex) {
                        Ok(p) => p,
                        Err(e) => {
                            let _best_effort = fs::remove_file(&from);
                            return Err(e);
                        }
                    };
                    return Ok(Attachment::Tcx {
                        from_container: from,
                        to_container: to,
                    });
                }
                Err(e) if self.mode == AttachMode::Auto && tcx_unsupported(&e) => {
                    tracing::info!("TCX is not available here ({e}); falling back to clsact");
                }
                Err(e) => return Err(e),
            }
        }
        let from = self.attach_netlink(&FROM_CONTAINER, ifname, ifindex)?;
        let to = match self.attach_netlink(&TO_CONTAINER, ifname, ifindex) {
            Ok(f) => f,
            Err(e) => {
                let _best_effort = self.detach_netlink(&FROM_CONTAINER, ifname, ifindex, from);
                return Err(e);
            }
        };
        Ok(Attachment::Netlink {
            ifindex,
            from_container: from,
            to_container: to,
        })
    }

    fn detach(&mut self, att: &Attachment, ifname: &str) -> Result<(), DataplaneError> {
        match att {
            Attachment::Tcx {
                from_container,
                to_container,
            } => {
                // Removing the pin drops the last reference to the link,
                // which detaches it.
                for pin in [from_container, to_container] {
                    crate::fault::point("detach:link");
                    match fs::remove_file(pin) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(fs_err("remove link pin", pin)(e)),
                    }
                }
                Ok(())
            }
            Attachment::Netlink {
                ifindex,
                from_container,
                to_container,
            } => {
                self.detach_netlink(&FROM_CONTAINER, ifname, *ifindex, *from_container)?;
                self.detach_netlink(&TO_CONTAINER, ifname, *ifindex, *to_container)
            }
            Attachment::Pending => Ok(()),
        }
    }

    fn set_endpoint_mac(
        &mut self,
        ifindex: u32,
        mac: Option<[u8; 6]>,
    ) -> Result<(), DataplaneError> {
        self.prepare()?;
        let maps = self.maps_mut()?;
        match mac {
            Some(addr) => maps
                .ep_mac
                .insert(ifindex, abi::MacValue { addr, pad: 0 }, 0)
                .map_err(DataplaneError::map("pal_ep_mac")),
            None => absent_ok(maps.ep_mac.remove(&ifindex), "pal_ep_mac"),
        }
    }

    fn adopt_legacy_conntrack(&mut self, finished: bool) -> Result<u64, DataplaneError> {
        self.prepare()?;
        let legacy = self.maps_dir().join("pal_ct");
        if !legacy.exists() {
            return Ok(0);
        }
        let sizes = self.sizes.clone();
        let old: HashMap<MapData, CtKey, CtValue> = {
            let data = MapData::from_pin(&legacy).map_err(|e| DataplaneError::OpenPin {
                what: "map pal_ct (an earlier build's conntrack)".into(),
                path: legacy.clone(),
                source: boxed(e),
            })?;
            HashMap::try_from(Map::LruHashMap(data)).map_err(DataplaneError::map("pal_ct"))?
        };
        let maps = self.maps_mut()?;
        let have = tables_have(maps)?;
        let eps = read_hash(&maps.endpoints, "pal_endpoints")?;
        let ids = eps.values().map(|v| v.ep_id).collect();
        ensure_tables(maps, &have, &ids, &sizes)?;
        // By table, each opened once and closed before the next (a node
        // may have more tables than a process may have descriptors).
        let mut by_table: BTreeMap<u32, Vec<(CtKey, CtValue)>> = BTreeMap::new();
        for (k, v) in old.iter().filter_map(Result::ok) {
            by_table
                .entry(abi::ct_table(k.ep_id, k.direction))
                .or_default()
                .push((k, v));
        }
        let mut copied = 0;
        for (id, flows) in by_table {
            // Only for endpoints that are still there; a flow the new
            // programs track already is newer than the copy.
            let Ok(mut table) = maps.ct_tables.get(&id, 0) else {
                continue;
            };
            for (k, v) in flows {
                if table.insert(k, v, 1).is_ok() {
                    copied += 1;
                }
            }
        }
        if finished {
            for name in ["pal_ct", "pal_ratelimit"] {
                let pin = self.maps_dir().join(name);
                if pin.exists() {
                    fs::remove_file(&pin).map_err(fs_err("remove", &pin))?;
                }
            }
        }
        Ok(copied)
    }

    fn upgrade(&mut self, att: &Attachment, ifname: &str) -> Result<bool, DataplaneError> {
        self.prepare()?;
        let ids = self.program_ids()?;
        let upgrade_err = |spec: &ProgramSpec, e: Box<dyn std::error::Error + Send + Sync>| {
            DataplaneError::Attach {
                hook: spec.hook_name,
                ifname: ifname.to_owned(),
                ifindex: current_ifindex(ifname).unwrap_or(0),
                source: e,
            }
        };
        let mut changed = false;
        match att {
            Attachment::Tcx {
                from_container,
                to_container,
            } => {
                for (spec, pin) in [
                    (FROM_CONTAINER, from_container),
                    (TO_CONTAINER, to_container),
                ] {
                    let link = PinnedLink::from_pin(pin).map_err(|e| DataplaneError::OpenPin {
                        what: format!("tc {} link of {ifname}", spec.hook_name),
                        path: pin.clone(),
                        source: boxed(e),
                    })?;
                    let fd: FdLink = link.into();
                    let info = fd.info().map_err(|e| upgrade_err(&spec, boxed(e)))?;
                    if Some(&info.program_id()) == ids.get(spec.pin) {
                        continue;
                    }
                    let link = SchedClassifierLink::try_from(fd)
                        .map_err(|e| upgrade_err(&spec, boxed(e)))?;
                    let mut prog = self.open_program(&spec)?;
                    // BPF_LINK_UPDATE: the link (still pinned) swaps programs
                    // atomically.
                    let id = prog
                        .attach_to_link(link)
                        .map_err(|e| upgrade_err(&spec, boxed(e)))?;
                    // Our handle on the link only holds a descriptor; the pin
                    // keeps the link.
                    drop(prog.take_link(id));
                    changed = true;
                    crate::fault::point("upgrade:program-swapped");
                }
            }
            Attachment::Netlink {
                ifindex,
                from_container,
                to_container,
            } => {
                if current_ifindex(ifname) != Some(*ifindex) {
                    return Err(DataplaneError::NotAttached {
                        ifname: ifname.to_owned(),
                        problem: "the host veth no longer exists".into(),
                    });
                }
                for (spec, f) in [
                    (FROM_CONTAINER, from_container),
                    (TO_CONTAINER, to_container),
                ] {
                    let link = SchedClassifierLink::attached(
                        ifname,
                        spec.hook,
                        f.priority,
                        f.handle.into(),
                        None,
                    )
                    .map_err(|e| upgrade_err(&spec, boxed(e)))?;
                    let mut prog = self.open_program(&spec)?;
                    // RTM_NEWTFILTER for the existing priority and handle:
                    // cls_bpf replaces the program in place.
                    let id = prog
                        .attach_to_link(link)
                        .map_err(|e| upgrade_err(&spec, boxed(e)))?;
                    let link = prog
                        .take_link(id)
                        .map_err(|e| upgrade_err(&spec, boxed(e)))?;
                    // Dropping it would delete the filter.
                    std::mem::forget(link);
                    changed = true;
                }
            }
            Attachment::Pending => {
                return Err(DataplaneError::NotAttached {
                    ifname: ifname.to_owned(),
                    problem: "its programs are still being attached".into(),
                });
            }
        }
        Ok(changed)
    }

    fn destroy(&mut self) -> Result<(), DataplaneError> {
        self.maps = None;
        match fs::remove_dir_all(&self.root) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(fs_err("remove the pinned datapath", &self.root)(e)),
        }
    }

    fn verify(&self, att: &Attachment, ifname: &str) -> Result<(), DataplaneError> {
        let not_attached = |problem: String| DataplaneError::NotAttached {
            ifname: ifname.to_owned(),
            problem,
        };
        let Some(ifindex) = current_ifindex(ifname) else {
            return Err(not_attached("the host veth no longer exists".into()));
        };
        match att {
            Attachment::Tcx {
                from_container,
                to_container,
            } => {
                for (spec, pin) in [
                    (FROM_CONTAINER, from_container),
                    (TO_CONTAINER, to_container),
                ] {
                    let link = PinnedLink::from_pin(pin).map_err(|_| {
                        not_attached(format!(
                            "the tc {} link pin {} is missing: the program was detached",
                            spec.hook_name,
                            pin.display()
                        ))
                    })?;
                    let fd: FdLink = link.into();
                    let info = fd
                        .info()
                        .map_err(|e| not_attached(format!("read link {}: {e}", pin.display())))?;
                    let (_, attached) =
                        SchedClassifier::query_tcx(ifname, spec.hook).map_err(|e| {
                            not_attached(format!("query tc {} programs: {e}", spec.hook_name))
                        })?;
                    if !attached.iter().any(|p| p.id() == info.program_id()) {
                        return Err(not_attached(format!(
                            "program {} is not attached at tc {}",
                            info.program_id(),
                            spec.hook_name
                        )));
                    }
                }
                Ok(())
            }
            Attachment::Netlink {
                ifindex: recorded,
                from_container,
                to_container,
            } => {
                if *recorded != ifindex {
                    return Err(not_attached(format!(
                        "the veth was recreated (ifindex {recorded} is now {ifindex})"
                    )));
                }
                for (spec, f) in [
                    (FROM_CONTAINER, from_container),
                    (TO_CONTAINER, to_container),
                ] {
                    let filters =
                        netlink::list_tc_filters(ifindex, spec.hook == TcAttachType::Ingress)
                            .map_err(|e| {
                                not_attached(format!("list tc {} filters: {e}", spec.hook_name))
                            })?;
                    if !filters.iter().any(|x| {
                        x.priority == f.priority && x.handle == f.handle && x.kind == "bpf"
                    }) {
                        return Err(not_attached(format!(
                            "the tc {} filter (priority {}, handle {:#x}) is gone: the program was detached",
                            spec.hook_name, f.priority, f.handle
                        )));
                    }
                }
                Ok(())
            }
            Attachment::Pending => Err(not_attached(
                "its programs are still being attached (or the attach was interrupted)".into(),
            )),
        }
    }

    fn sync(&mut self, desired: &Desired) -> Result<SyncReport, DataplaneError> {
        self.prepare()?;
        let sizes = self.sizes.clone();
        let maps = self.maps_mut()?;
        let mut report = SyncReport::default();

        // Whole addresses live in the hash, shorter prefixes in the trie;
        // each map is diffed against its own share.
        let cur_policy = read_hash(&maps.policy, "pal_policy")?;
        let cur_ipcache: BTreeMap<Prefix, IpcacheValue> = read_trie(&maps.ipcache, "pal_ipcache")?
            .into_iter()
            .map(|((len, a), v)| (Prefix { len, addr: a.addr }, v))
            .collect();
        let cur_ipcache_host = read_hash(&maps.ipcache_host, "pal_ipcache_host")?;
        let (want_ipcache_host, want_ipcache): (BTreeMap<_, _>, BTreeMap<_, _>) = desired
            .ipcache
            .iter()
            .map(|(p, v)| (*p, *v))
            .partition(|(p, _)| p.len == 128);
        let want_ipcache_host: BTreeMap<IpcacheAddr, IpcacheValue> = want_ipcache_host
            .into_iter()
            .map(|(p, v)| (IpcacheAddr { addr: p.addr }, v))
            .collect();
        let cur_eps = read_hash(&maps.endpoints, "pal_endpoints")?;
        let cur_src: BTreeSet<SrcguardKey> = read_hash(&maps.srcguard, "pal_srcguard")?
            .into_keys()
            .collect();

        // Order matters for packets in flight: allow entries and new
        // identities first, endpoints (isolation flags) next, removals last.
        for (k, v) in &desired.policy {
            if cur_policy.get(k) != Some(v) {
                tracing::debug!("sync: policy {k:?} was {:?}", cur_policy.get(k));
                maps.policy
                    .insert(k, v, 0)
                    .map_err(DataplaneError::map("pal_policy"))?;
                report.upserted += 1;
            }
        }
        for (a, v) in &want_ipcache_host {
            if cur_ipcache_host.get(a) != Some(v) {
                tracing::debug!(
                    "sync: address {a:?} {v:?} was {:?}",
                    cur_ipcache_host.get(a)
                );
                maps.ipcache_host
                    .insert(a, v, 0)
                    .map_err(DataplaneError::map("pal_ipcache_host"))?;
                report.upserted += 1;
            }
        }
        for (p, v) in &want_ipcache {
            if cur_ipcache.get(p) != Some(v) {
                tracing::debug!("sync: prefix {p} {v:?} was {:?}", cur_ipcache.get(p));
                maps.ipcache
                    .insert(&LpmKey::new(p.len, IpcacheAddr { addr: p.addr }), *v, 0)
                    .map_err(DataplaneError::map("pal_ipcache"))?;
                report.upserted += 1;
            }
        }
        for k in desired.srcguard.difference(&cur_src) {
            maps.srcguard
                .insert(*k, 0, 0)
                .map_err(DataplaneError::map("pal_srcguard"))?;
            report.upserted += 1;
        }
        // Every endpoint has its tables before it is registered.
        let have = tables_have(maps)?;
        let ids = desired.endpoints.values().map(|v| v.ep_id).collect();
        ensure_tables(maps, &have, &ids, &sizes)?;
        for (k, v) in &desired.endpoints {
            if cur_eps.get(k) != Some(v) {
                tracing::debug!("sync: endpoint {k} {v:?} was {:?}", cur_eps.get(k));
                maps.endpoints
                    .insert(*k, *v, 0)
                    .map_err(DataplaneError::map("pal_endpoints"))?;
                report.upserted += 1;
            }
        }
        for k in cur_eps
            .keys()
            .filter(|k| !desired.endpoints.contains_key(k))
        {
            maps.endpoints
                .remove(k)
                .map_err(DataplaneError::map("pal_endpoints"))?;
            absent_ok(maps.ep_mac.remove(k), "pal_ep_mac")?;
            report.deleted += 1;
        }
        for k in cur_src.difference(&desired.srcguard) {
            maps.srcguard
                .remove(k)
                .map_err(DataplaneError::map("pal_srcguard"))?;
            report.deleted += 1;
        }
        let live: BTreeSet<u32> = desired.endpoints.values().map(|v| v.ep_id).collect();
        let stale: BTreeSet<u32> = have
            .ct
            .iter()
            .chain(&have.frag)
            .map(|id| id >> 1)
            .filter(|ep| !live.contains(ep))
            .collect();
        // What an endpoint that is gone left behind (a process killed
        // before it finished removing it): its tables, budget records,
        // event bucket and MAC check.
        report.deleted += stale.len();
        remove_endpoint_state(maps, &stale)?;
        let orphan_macs: Vec<u32> = maps
            .ep_mac
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !desired.endpoints.contains_key(k))
            .collect();
        for k in orphan_macs {
            absent_ok(maps.ep_mac.remove(&k), "pal_ep_mac")?;
            report.deleted += 1;
        }
        let orphan_buckets: Vec<u32> = maps
            .ratelimit
            .keys()
            .filter_map(Result::ok)
            .filter(|k| *k != 0 && !live.contains(k))
            .collect();
        for k in orphan_buckets {
            absent_ok(maps.ratelimit.remove(&k), "pal_ratelimit_ep")?;
            report.deleted += 1;
        }
        for p in cur_ipcache.keys().filter(|p| !want_ipcache.contains_key(p)) {
            maps.ipcache
                .remove(&LpmKey::new(p.len, IpcacheAddr { addr: p.addr }))
                .map_err(DataplaneError::map("pal_ipcache"))?;
            report.deleted += 1;
        }
        for a in cur_ipcache_host
            .keys()
            .filter(|a| !want_ipcache_host.contains_key(a))
        {
            maps.ipcache_host
                .remove(a)
                .map_err(DataplaneError::map("pal_ipcache_host"))?;
            report.deleted += 1;
        }
        for k in cur_policy
            .keys()
            .filter(|k| !desired.policy.contains_key(k))
        {
            maps.policy
                .remove(k)
                .map_err(DataplaneError::map("pal_policy"))?;
            report.deleted += 1;
        }

        let mut cfg = maps
            .config
            .get(&0, 0)
            .map_err(DataplaneError::map("pal_config"))?;
        if report.changed() {
            // Established flows revalidate against the new state.
            cfg.epoch = cfg.epoch.wrapping_add(1).max(1);
            maps.config
                .set(0, cfg, 0)
                .map_err(DataplaneError::map("pal_config"))?;
        }
        report.epoch = cfg.epoch;
        Ok(report)
    }

    fn apply(&mut self, delta: &Delta) -> Result<SyncReport, DataplaneError> {
        self.prepare()?;
        let sizes = self.sizes.clone();
        let maps = self.maps_mut()?;
        let mut report = SyncReport::default();
        let ipcache_key = |p: &Prefix| LpmKey::new(p.len, IpcacheAddr { addr: p.addr });
        // Order matters for packets in flight, as in `sync`: allow entries
        // and new identities first, endpoints next, removals last.
        for (k, v) in &delta.policy {
            if let Some(v) = v {
                maps.policy
                    .insert(k, v, 0)
                    .map_err(DataplaneError::map("pal_policy"))?;
                report.upserted += 1;
            }
        }
        for (p, v) in &delta.ipcache {
            let Some(v) = v else { continue };
            if p.len == 128 {
                maps.ipcache_host
                    .insert(IpcacheAddr { addr: p.addr }, v, 0)
                    .map_err(DataplaneError::map("pal_ipcache_host"))?;
            } else {
                maps.ipcache
                    .insert(&ipcache_key(p), *v, 0)
                    .map_err(DataplaneError::map("pal_ipcache"))?;
            }
            report.upserted += 1;
        }
        for (k, add) in &delta.srcguard {
            if *add {
                maps.srcguard
                    .insert(*k, 0, 0)
                    .map_err(DataplaneError::map("pal_srcguard"))?;
                report.upserted += 1;
            }
        }
        let added: BTreeSet<u32> = delta
            .endpoints
            .iter()
            .filter_map(|(_, v)| v.map(|v| v.ep_id))
            .collect();
        if !added.is_empty() {
            let have = tables_have(maps)?;
            ensure_tables(maps, &have, &added, &sizes)?;
        }
        for (k, v) in &delta.endpoints {
            if let Some(v) = v {
                maps.endpoints
                    .insert(*k, *v, 0)
                    .map_err(DataplaneError::map("pal_endpoints"))?;
                report.upserted += 1;
            }
        }
        crate::fault::point("maps:upserted");
        // Removing what is already gone is fine (a repaired map, a retry).
        let gone = |r: Result<(), MapError>, map| match r {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(DataplaneError::map(map)(e)),
        };
        let kept = added;
        let mut removed = BTreeSet::new();
        for (k, v) in &delta.endpoints {
            if v.is_none() {
                let old = match maps.endpoints.get(k, 0) {
                    Ok(old) => Some(old.ep_id),
                    Err(MapError::KeyNotFound) => None,
                    Err(e) => return Err(DataplaneError::map("pal_endpoints")(e)),
                };
                gone(maps.endpoints.remove(k), "pal_endpoints")?;
                absent_ok(maps.ep_mac.remove(k), "pal_ep_mac")?;
                removed.extend(old.filter(|ep| !kept.contains(ep)));
                report.deleted += 1;
            }
        }
        remove_endpoint_state(maps, &removed)?;
        for (k, add) in &delta.srcguard {
            if !*add {
                gone(maps.srcguard.remove(k), "pal_srcguard")?;
                report.deleted += 1;
            }
        }
        for (p, v) in &delta.ipcache {
            if v.is_some() {
                continue;
            }
            if p.len == 128 {
                gone(
                    maps.ipcache_host.remove(&IpcacheAddr { addr: p.addr }),
                    "pal_ipcache_host",
                )?;
            } else {
                gone(maps.ipcache.remove(&ipcache_key(p)), "pal_ipcache")?;
            }
            report.deleted += 1;
        }
        for (k, v) in &delta.policy {
            if v.is_none() {
                gone(maps.policy.remove(k), "pal_policy")?;
                report.deleted += 1;
            }
        }
        let mut cfg = maps
            .config
            .get(&0, 0)
            .map_err(DataplaneError::map("pal_config"))?;
        if delta.revokes {
            // Established flows revalidate against the new state.
            cfg.epoch = cfg.epoch.wrapping_add(1).max(1);
            maps.config
                .set(0, cfg, 0)
                .map_err(DataplaneError::map("pal_config"))?;
        }
        report.epoch = cfg.epoch;
        Ok(report)
    }

    fn sync_token(&self) -> Result<u64, DataplaneError> {
        let cfg = self
            .maps()?
            .config
            .get(&0, 0)
            .map_err(DataplaneError::map("pal_config"))?;
        Ok(cfg.sync_token)
    }

    fn set_sync_token(&mut self, token: u64) -> Result<(), DataplaneError> {
        let maps = self.maps_mut()?;
        let mut cfg = maps
            .config
            .get(&0, 0)
            .map_err(DataplaneError::map("pal_config"))?;
        cfg.sync_token = token;
        maps.config
            .set(0, cfg, 0)
            .map_err(DataplaneError::map("pal_config"))
    }

    fn forget_endpoint(&mut self, ep_id: u32) -> Result<(), DataplaneError> {
        self.prepare()?;
        let maps = self.maps_mut()?;
        let keys: Vec<CounterKey> = maps
            .counters
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.ep_id == ep_id)
            .collect();
        for k in keys {
            match maps.counters.remove(&k) {
                Ok(()) => {}
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(DataplaneError::map("pal_counters")(e)),
            }
        }
        Ok(())
    }

    fn forget_unknown_endpoints(&mut self, live: &BTreeSet<u32>) -> Result<usize, DataplaneError> {
        self.prepare()?;
        let maps = self.maps_mut()?;
        // Endpoint 0 is no endpoint: packets on a veth palisade does not
        // know (any more) are counted, and their events paced, there.
        let counters: Vec<CounterKey> = maps
            .counters
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.ep_id != 0 && !live.contains(&k.ep_id))
            .collect();
        let buckets: Vec<u32> = maps
            .ratelimit
            .keys()
            .filter_map(Result::ok)
            .filter(|k| *k != 0 && !live.contains(k))
            .collect();
        let n = counters.len() + buckets.len();
        for k in counters {
            absent_ok(maps.counters.remove(&k), "pal_counters")?;
        }
        for k in buckets {
            absent_ok(maps.ratelimit.remove(&k), "pal_ratelimit_ep")?;
        }
        Ok(n)
    }

    fn link_pins(&self, ep_id: u32) -> Vec<PathBuf> {
        PROGRAMS.iter().map(|p| self.link_pin(ep_id, p)).collect()
    }

    fn sweep_links(&mut self, keep: &[PathBuf]) -> Result<Vec<PathBuf>, DataplaneError> {
        let dir = self.links_dir();
        let mut removed = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
            Err(e) => return Err(fs_err("list", &dir)(e)),
        };
        for e in entries.flatten() {
            let p = e.path();
            // The Service hooks (service::ServiceHook) are not endpoints'.
            if e.file_name().to_string_lossy().starts_with("service-") {
                continue;
            }
            if !keep.contains(&p) {
                fs::remove_file(&p).map_err(fs_err("remove orphaned link pin", &p))?;
                removed.push(p);
            }
        }
        Ok(removed)
    }

    fn status(&self) -> Result<DataplaneStatus, DataplaneError> {
        let maps = self.maps()?;
        let mut st = DataplaneStatus {
            bpf_root: self.root.clone(),
            ..Default::default()
        };
        let ids = self.program_ids()?;
        for spec in PROGRAMS {
            let info =
                aya::programs::ProgramInfo::from_pin(self.program_pin(&spec)).map_err(|e| {
                    DataplaneError::OpenPin {
                        what: format!("program {}", spec.function),
                        path: self.program_pin(&spec),
                        source: boxed(e),
                    }
                })?;
            st.programs.push(ProgramStatus {
                name: spec.function.to_owned(),
                id: ids.get(spec.pin).copied().unwrap_or_default(),
                tag: format!("{:016x}", info.tag()),
            });
        }
        let max_entries = |n: &str| -> Result<u32, DataplaneError> {
            let path = self.maps_dir().join(n);
            let info = MapInfo::from_pin(&path).map_err(|e| DataplaneError::OpenPin {
                what: format!("map {n}"),
                path,
                source: boxed(e),
            })?;
            Ok(info.max_entries())
        };
        let (mut flows, mut capacity) = (0u64, 0u64);
        let (budget_map, budgets) = (&maps.budget, &mut st.budgets);
        for_each_ct_table(&maps.ct_tables, |id, table| {
            let n = table.keys().count() as u64;
            let spent = match budget_map.get(&id, 0) {
                Ok(b) => b,
                Err(MapError::KeyNotFound) => abi::BudgetValue::default(),
                Err(e) => return Err(DataplaneError::map("pal_budget")(e)),
            };
            let budget = spent.capacity;
            flows += n;
            capacity += u64::from(budget);
            budgets.push(super::BudgetFill {
                ep_id: id >> 1,
                direction: Direction::from_u8((id & 1) as u8).unwrap_or(Direction::Ingress),
                flows: n,
                budget,
                refused: spent.refused,
                last_refused_ns: spent.last_refused_ns,
            });
            Ok(())
        })?;
        st.maps.push(MapFill {
            name: "pal_ct_tables (flows)".into(),
            entries: flows,
            max_entries: u32::try_from(capacity).unwrap_or(u32::MAX),
        });
        for (name, entries) in [
            ("pal_endpoints", maps.endpoints.keys().count()),
            ("pal_ipcache", maps.ipcache.keys().count()),
            ("pal_ipcache_host", maps.ipcache_host.keys().count()),
            ("pal_policy", maps.policy.keys().count()),
            ("pal_ct_tables", maps.ct_tables.keys().count()),
            ("pal_frag_tables", maps.frag_tables.keys().count()),
            ("pal_counters", maps.counters.keys().count()),
        ] {
            st.maps.push(MapFill {
                name: name.into(),
                entries: entries as u64,
                max_entries: max_entries(name)?,
            });
        }
        st.epoch = maps
            .config
            .get(&0, 0)
            .map_err(DataplaneError::map("pal_config"))?
            .epoch;
        let sum = |idx: u32| -> Result<u64, DataplaneError> {
            let v = maps
                .evstats
                .get(&idx, 0)
                .map_err(DataplaneError::map("pal_evstats"))?;
            Ok(v.iter().sum())
        };
        st.events_sent = sum(abi::EVSTAT_SENT)?;
        st.events_rate_limited = sum(abi::EVSTAT_RATE_LIMITED)?;
        st.events_ringbuf_full = sum(abi::EVSTAT_RINGBUF_FULL)?;
        if let Ok(data) = MapData::from_pin(super::map_pin(&self.root, "pal_proxy"))
            && let Ok(map) = Map::from_map_data(data)
            && let Ok(arr) = Array::<MapData, abi::ProxyConfig>::try_from(map)
            && let Ok(cfg) = arr.get(&0, 0)
        {
            st.proxies = super::ProxyStatus {
                mark: cfg.mark,
                dns_port: cfg.dns_port,
                http_port: cfg.http_port,
                l7_steering: self
                    .root
                    .join("node")
                    .join(format!("lo-l7-steer-{}", self.hash()))
                    .exists(),
            };
        }
        Ok(st)
    }

    fn counters(&self) -> Result<Vec<CounterRow>, DataplaneError> {
        let maps = self.maps()?;
        let mut rows = Vec::new();
        for item in maps.counters.iter() {
            let (k, values) = item.map_err(DataplaneError::map("pal_counters"))?;
            let verdict = Verdict::from_u8(k.verdict);
            rows.push(CounterRow {
                ep_id: k.ep_id,
                direction: Direction::from_u8(k.direction).unwrap_or(Direction::Ingress),
                verdict,
                reason: Reason::from_counter(verdict, k.reason),
                packets: values.iter().map(|v| v.packets).sum(),
                bytes: values.iter().map(|v| v.bytes).sum(),
            });
        }
        rows.sort_by_key(|r| (r.ep_id, r.direction, r.verdict, r.reason));
        Ok(rows)
    }

    fn lookup(&self, q: &Lookup) -> Result<LookupAnswer, DataplaneError> {
        let maps = self.maps()?;
        // The same lookups, in the same order, as bpf/lib/policy.h.
        let addr = IpcacheAddr {
            addr: abi::addr16(q.peer),
        };
        let host = match maps.ipcache_host.get(&addr, 0) {
            Ok(v) => Some(v.identity),
            Err(MapError::KeyNotFound) => None,
            Err(e) => return Err(DataplaneError::map("pal_ipcache_host")(e)),
        };
        let peer_identity = match host {
            Some(id) => id,
            None => match maps.ipcache.get(&LpmKey::new(128, addr), 0) {
                Ok(v) => v.identity,
                Err(MapError::KeyNotFound) => ID_WORLD,
                Err(e) => return Err(DataplaneError::map("pal_ipcache")(e)),
            },
        };
        let (mut ep_flags, mut ep_range_lens) = (0, 0);
        for item in maps.endpoints.iter() {
            let (_, v) = item.map_err(DataplaneError::map("pal_endpoints"))?;
            if v.ep_id == q.ep_id {
                (ep_flags, ep_range_lens) = (v.flags, v.range_lens);
            }
        }
        let (isolated, audit) = {
            let (iso_bit, audit_bit) = match q.direction {
                Direction::Ingress => (abi::EP_ISOLATE_INGRESS, abi::EP_AUDIT_INGRESS),
                Direction::Egress => (abi::EP_ISOLATE_EGRESS, abi::EP_AUDIT_EGRESS),
            };
            (ep_flags & iso_bit != 0, ep_flags & audit_bit != 0)
        };
        let ported = matches!(
            q.protocol,
            abi::PROTO_TCP | abi::PROTO_UDP | abi::PROTO_SCTP
        );
        let dir = q.direction as u8;
        let shift = if q.direction == Direction::Egress {
            16
        } else {
            0
        };
        let range_lens = (ep_range_lens >> shift) & 0x7fff;
        let (any_port_bit, any_proto_bit) = match q.direction {
            Direction::Ingress => (abi::EP_HAS_ANY_PORT_INGRESS, abi::EP_HAS_ANY_PROTO_INGRESS),
            Direction::Egress => (abi::EP_HAS_ANY_PORT_EGRESS, abi::EP_HAS_ANY_PROTO_EGRESS),
        };
        let port = if ported { q.port } else { 0 };
        let mut error = None;
        let mut find = |tier: u8| -> Option<PolicyValue> {
            let peers: &[u32] = if tier == TIER_NETPOL {
                &[peer_identity, ID_ANY]
            } else {
                &[peer_identity]
            };
            for &peer in peers {
                let key = PolicyKeyData {
                    ep_id: q.ep_id,
                    direction: dir,
                    tier,
                    pad1: 0,
                    peer_id: peer,
                    pad2: 0,
                    protocol: q.protocol,
                    dport_be: port.to_be(),
                };
                // Longest first, skipping what the endpoint has none of.
                let mut tries = vec![(POLICY_PREFIX_FULL, key)];
                for n in (1..=15u32)
                    .rev()
                    .filter(|n| range_lens & (1 << (n - 1)) != 0)
                {
                    let mask = (0xffffu32 << (16 - n)) as u16;
                    tries.push((
                        abi::POLICY_PREFIX_ANY_PORT + n,
                        PolicyKeyData {
                            dport_be: (port & mask).to_be(),
                            ..key
                        },
                    ));
                }
                if ep_flags & any_port_bit != 0 {
                    tries.push((
                        abi::POLICY_PREFIX_ANY_PORT,
                        PolicyKeyData { dport_be: 0, ..key },
                    ));
                }
                if ep_flags & any_proto_bit != 0 {
                    tries.push((
                        abi::POLICY_PREFIX_ANY_PROTO,
                        PolicyKeyData {
                            protocol: 0,
                            dport_be: 0,
                            ..key
                        },
                    ));
                }
                for (prefixlen, data) in tries {
                    match maps.policy.get(&PolicyKey { prefixlen, data }, 0) {
                        Ok(v) => return Some(v),
                        Err(MapError::KeyNotFound) => {}
                        Err(e) => {
                            error.get_or_insert(DataplaneError::map("pal_policy")(e));
                            return None;
                        }
                    }
                }
            }
            None
        };
        let (entry, tier, allowed) =
            super::decide_like_the_program(ep_flags, q.direction, &mut find);
        if let Some(e) = error {
            return Err(e);
        }
        Ok(LookupAnswer {
            peer_identity,
            isolated,
            audit,
            entry,
            tier,
            allowed,
        })
    }
}

/// Whether a TCX attach failed because the kernel lacks TCX (as opposed to
/// a real problem such as a missing interface).
fn tcx_unsupported(e: &DataplaneError) -> bool {
    let DataplaneError::Attach { source, .. } = e else {
        return false;
    };
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && matches!(
                io.raw_os_error(),
                Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | 524)
            )
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Under bpf root `root`, no program is attached anywhere (no link pin:
/// neither an endpoint's nor the Service hook) and no endpoint is
/// registered: maps created with other capacities can be created again.
pub fn datapath_unused(root: &Path) -> bool {
    let no_links = fs::read_dir(root.join("links")).map_or(true, |mut d| d.next().is_none());
    let no_endpoints = MapData::from_pin(super::map_pin(root, "pal_endpoints"))
        .ok()
        .and_then(|d| Map::from_map_data(d).ok())
        .and_then(|m| Endpoints::try_from(m).ok())
        .is_some_and(|eps| eps.keys().next().is_none());
    no_links && no_endpoints
}

/// `f` on every conntrack table there is, with its key (`PAL_CT_TABLE`).
fn for_each_ct_table(
    tables: &CtTables,
    mut f: impl FnMut(u32, CtTable) -> Result<(), DataplaneError>,
) -> Result<(), DataplaneError> {
    let ids: Vec<u32> = tables
        .keys()
        .collect::<Result<_, _>>()
        .map_err(DataplaneError::map("pal_ct_tables"))?;
    // One table open at a time: a node with thousands of endpoints has
    // more tables than a process may have descriptors.
    for id in ids {
        match tables.get(&id, 0) {
            Ok(t) => f(id, t)?,
            // Removed since the keys were read: an endpoint deleted.
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(DataplaneError::map("pal_ct_tables")(e)),
        }
    }
    Ok(())
}

/// The pinned `pal_ct_tables` under a bpf root.
fn open_ct_tables(root: &Path) -> Result<CtTables, DataplaneError> {
    let path = super::map_pin(root, "pal_ct_tables");
    let open_err = |e: Box<dyn std::error::Error + Send + Sync>| DataplaneError::OpenPin {
        what: "map pal_ct_tables".into(),
        path: path.clone(),
        source: e,
    };
    let data = MapData::from_pin(&path).map_err(|e| open_err(boxed(e)))?;
    Map::from_map_data(data)
        .map_err(|e| open_err(boxed(e)))?
        .try_into()
        .map_err(DataplaneError::map("pal_ct_tables"))
}

/// Forget every tracked flow of every endpoint under a bpf root (each next
/// packet is decided afresh). Returns how many flows there were.
pub fn conntrack_flush(root: &Path) -> Result<u64, DataplaneError> {
    let tables = open_ct_tables(root)?;
    let mut n = 0;
    for_each_ct_table(&tables, |_, mut table| {
        let keys: Vec<CtKey> = table.keys().filter_map(Result::ok).collect();
        for k in keys {
            match table.remove(&k) {
                Ok(()) => n += 1,
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(DataplaneError::map("pal_ct_table")(e)),
            }
        }
        Ok(())
    })?;
    Ok(n)
}

/// Every address a tracked connection uses (either side), from every
/// endpoint's conntrack tables under a bpf root; empty when no datapath is
/// loaded there.
pub fn conntrack_addresses(root: &Path) -> Result<BTreeSet<IpAddr>, DataplaneError> {
    if !super::map_pin(root, "pal_ct_tables").exists() {
        return Ok(BTreeSet::new());
    }
    let tables = open_ct_tables(root)?;
    // Live as the datapath judges it (`pal_ct_expired`): a closed TCP
    // connection, or one idle past its timeout, uses nothing.
    const SEC: u64 = 1_000_000_000;
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * SEC + t.tv_nsec() as u64)
        .unwrap_or(u64::MAX);
    let mut out = BTreeSet::new();
    let mut flows: Vec<(CtKey, CtValue)> = Vec::new();
    for_each_ct_table(&tables, |_, t| {
        flows.extend(t.iter().filter_map(Result::ok));
        Ok(())
    })?;
    for (k, v) in flows {
        let (seen_reply, fin_fwd, rst, fin_rev) = (1u16, 2u16, 4u16, 8u16);
        let timeout = if k.protocol == abi::PROTO_TCP {
            let closed = v.flags & rst != 0 || v.flags & (fin_fwd | fin_rev) == (fin_fwd | fin_rev);
            if closed {
                continue;
            } else if v.flags & seen_reply != 0 {
                6 * 3600 * SEC
            } else {
                60 * SEC
            }
        } else {
            60 * SEC
        };
        if now.saturating_sub(v.last_seen_ns) > timeout {
            continue;
        }
        out.insert(abi::ip_from16(k.saddr));
        out.insert(abi::ip_from16(k.daddr));
    }
    Ok(out)
}

/// Change `pal_proxy` under a bpf root (the datapath must be loaded): `f`
/// gets the current configuration and returns the new one.
pub fn update_proxy_config(
    root: &Path,
    f: impl FnOnce(abi::ProxyConfig) -> abi::ProxyConfig,
) -> Result<(), DataplaneError> {
    let path = super::map_pin(root, "pal_proxy");
    let open_err = |e: Box<dyn std::error::Error + Send + Sync>| DataplaneError::OpenPin {
        what: "map pal_proxy".into(),
        path: path.clone(),
        source: e,
    };
    let data = MapData::from_pin(&path).map_err(|e| open_err(boxed(e)))?;
    let mut arr: Array<MapData, abi::ProxyConfig> = Map::from_map_data(data)
        .map_err(|e| open_err(boxed(e)))?
        .try_into()
        .map_err(DataplaneError::map("pal_proxy"))?;
    let now = arr.get(&0, 0).map_err(DataplaneError::map("pal_proxy"))?;
    arr.set(0, f(now), 0)
        .map_err(DataplaneError::map("pal_proxy"))
}

/// The L7 steering programs: their object and functions.
static L7_STEER_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/l7_steer.o"));
const L7_STEER_FUNCTION: &str = "pal_l7_steer";
const L7_LOOKUP_FUNCTION: &str = "pal_l7_lookup";

/// Attach this build's L7 steering programs in the calling thread's network
/// namespace (the node's): `pal_l7_steer` to tc ingress of `lo`, and
/// `pal_l7_lookup` to the namespace's socket lookups (it hands the SYN of a
/// connection whose tuple is still in TIME_WAIT at the proxy to the proxy's
/// listener). Both are pinned so that they stay while no daemon runs:
/// packets the datapath steers to a proxy that is gone are then dropped.
/// Links of another build are replaced, the new ones attached first.
/// Returns whether anything changed.
pub fn ensure_l7_steer(root: &Path) -> Result<bool, DataplaneError> {
    let dp = KernelDataplane::new(root, AttachMode::Auto);
    let steer_pin = dp.progs_dir().join("l7_steer");
    let lookup_pin = dp.progs_dir().join("l7_lookup");
    // One link pin per build and hook, `node/lo-l7-steer-<build>` and
    // `node/l7-lookup-<build>` (not among the endpoints' links).
    let prefixes = ["lo-l7-steer-", "l7-lookup-"];
    let node_dir = dp.root.join("node");
    let steer_link = node_dir.join(format!("{}{}", prefixes[0], dp.hash()));
    let lookup_link = node_dir.join(format!("{}{}", prefixes[1], dp.hash()));
    if steer_link.exists() && lookup_link.exists() {
        return Ok(false);
    }
    fs::create_dir_all(&node_dir).map_err(fs_err("create", &node_dir))?;
    if !steer_pin.exists() || !lookup_pin.exists() {
        fs::create_dir_all(dp.progs_dir()).map_err(fs_err("create", &dp.progs_dir()))?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(dp.maps_dir());
        let mut bpf = loader
            .load(L7_STEER_OBJ)
            .map_err(|e| DataplaneError::Load {
                object: "l7_steer",
                source: Box::new(e),
            })?;
        let verify = |program: &'static str| {
            move |e: ProgramError| DataplaneError::Verify {
                program,
                source: Box::new(e),
            }
        };
        let missing = |f: &str| DataplaneError::Other(format!("program {f} missing from object"));
        let pin_err = |f: &str, path: &Path| {
            let (what, path) = (format!("program {f}"), path.to_path_buf());
            move |e| DataplaneError::Pin {
                what,
                path,
                source: boxed(e),
            }
        };
        {
            let prog: &mut SchedClassifier = bpf
                .program_mut(L7_STEER_FUNCTION)
                .ok_or_else(|| missing(L7_STEER_FUNCTION))?
                .try_into()
                .map_err(verify(L7_STEER_FUNCTION))?;
            prog.load().map_err(verify(L7_STEER_FUNCTION))?;
            if steer_pin.exists() {
                fs::remove_file(&steer_pin).map_err(fs_err("remove", &steer_pin))?;
            }
            prog.pin(&steer_pin)
                .map_err(pin_err(L7_STEER_FUNCTION, &steer_pin))?;
        }
        let prog: &mut SkLookup = bpf
            .program_mut(L7_LOOKUP_FUNCTION)
            .ok_or_else(|| missing(L7_LOOKUP_FUNCTION))?
            .try_into()
            .map_err(verify(L7_LOOKUP_FUNCTION))?;
        prog.load().map_err(verify(L7_LOOKUP_FUNCTION))?;
        if lookup_pin.exists() {
            fs::remove_file(&lookup_pin).map_err(fs_err("remove", &lookup_pin))?;
        }
        prog.pin(&lookup_pin)
            .map_err(pin_err(L7_LOOKUP_FUNCTION, &lookup_pin))?;
    }
    if !steer_link.exists() {
        let attach_err = |e: Box<dyn std::error::Error + Send + Sync>| DataplaneError::Attach {
            hook: "ingress",
            ifname: "lo".into(),
            ifindex: 1,
            source: e,
        };
        let mut prog =
            SchedClassifier::from_pin(&steer_pin).map_err(|e| DataplaneError::OpenPin {
                what: format!("program {L7_STEER_FUNCTION}"),
                path: steer_pin.clone(),
                source: boxed(e),
            })?;
        let id = prog
            .attach_with_options(
                "lo",
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .map_err(|e| attach_err(boxed(e)))?;
        let link = prog.take_link(id).map_err(|e| attach_err(boxed(e)))?;
        let fd: FdLink = link.try_into().map_err(|e| attach_err(boxed(e)))?;
        fd.pin(&steer_link).map_err(|e| DataplaneError::Pin {
            what: "tc ingress link of lo".into(),
            path: steer_link.clone(),
            source: boxed(e),
        })?;
    }
    if !lookup_link.exists() {
        let attach_err = |e: Box<dyn std::error::Error + Send + Sync>| DataplaneError::Attach {
            hook: "sk_lookup",
            ifname: "the node's network namespace".into(),
            ifindex: 0,
            source: e,
        };
        let mut prog = SkLookup::from_pin(&lookup_pin).map_err(|e| DataplaneError::OpenPin {
            what: format!("program {L7_LOOKUP_FUNCTION}"),
            path: lookup_pin.clone(),
            source: boxed(e),
        })?;
        let netns = fs::File::open("/proc/thread-self/ns/net")
            .map_err(fs_err("open", Path::new("/proc/thread-self/ns/net")))?;
        let id = prog.attach(&netns).map_err(|e| attach_err(boxed(e)))?;
        let link = prog.take_link(id).map_err(|e| attach_err(boxed(e)))?;
        let fd: FdLink = link.into();
        fd.pin(&lookup_link).map_err(|e| DataplaneError::Pin {
            what: "sk_lookup link of the node's network namespace".into(),
            path: lookup_link.clone(),
            source: boxed(e),
        })?;
    }
    // Other builds' links go once this one's are in place.
    if let Ok(entries) = fs::read_dir(&node_dir) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let ours = e.path() == steer_link || e.path() == lookup_link;
            if !ours && prefixes.iter().any(|p| name.starts_with(p)) {
                fs::remove_file(e.path()).map_err(fs_err("remove", &e.path()))?;
            }
        }
    }
    Ok(true)
}

/// Give the L7 steering programs the proxy's listener (`pal_l7_listener`;
/// the kernel drops it when the socket closes).
pub fn set_l7_listener(root: &Path, listener: &impl AsRawFd) -> Result<(), DataplaneError> {
    let path = super::map_pin(root, "pal_l7_listener");
    let open_err = |e: Box<dyn std::error::Error + Send + Sync>| DataplaneError::OpenPin {
        what: "map pal_l7_listener".into(),
        path: path.clone(),
        source: e,
    };
    let data = MapData::from_pin(&path).map_err(|e| open_err(boxed(e)))?;
    let mut map: SockMap<MapData> = Map::from_map_data(data)
        .map_err(|e| open_err(boxed(e)))?
        .try_into()
        .map_err(DataplaneError::map("pal_l7_listener"))?;
    map.set(0, listener, 0)
        .map_err(DataplaneError::map("pal_l7_listener"))
}
