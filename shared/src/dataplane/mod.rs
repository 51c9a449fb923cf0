//! The only code that touches the kernel: loading and pinning the tc
//! programs and maps, attaching them to veths (TCX, or clsact/cls_bpf where
//! TCX is missing), and making the maps equal to the compiler's output.
//! Everything sits behind [`Dataplane`]; [`fake::RecordingDataplane`]
//! stands in for the kernel in unit tests.

pub mod events;
pub mod fake;
pub mod kernel;
pub mod service;

use std::{
    collections::BTreeSet,
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    abi::{self, Direction, PolicyValue, Reason, Verdict},
    compile::Desired,
    engine::Delta,
};

/// Default root of palisade's pins.
pub const DEFAULT_BPF_ROOT: &str = "/sys/fs/bpf/palisade";

/// The pinned maps under a bpf root: a directory named after the ABI
/// version (`maps-v1`), so that a build with another map layout never
/// opens maps it would misread; it creates its own beside them.
pub fn maps_dir(root: &Path) -> PathBuf {
    let dir = root.join(format!("maps-v{}", abi::ABI_VERSION));
    if abi::ABI_VERSION == 1 && !dir.exists() {
        adopt_legacy_maps(root, &dir);
    }
    dir
}

/// Releases before the ABI version was in the path pinned ABI 1's maps in
/// `maps`: the same layout, so the directory is renamed (bpffs renames
/// pins in place; programs hold their maps by reference, so nothing that
/// runs notices, and conntrack and every entry are kept).
fn adopt_legacy_maps(root: &Path, dir: &Path) {
    let legacy = root.join("maps");
    if !legacy.is_dir() {
        return;
    }
    match std::fs::rename(&legacy, dir) {
        Ok(()) => tracing::info!(
            "pinned maps moved from {} to {} (the ABI version is in the path now)",
            legacy.display(),
            dir.display()
        ),
        // Another process moved them first.
        Err(_) if dir.exists() => {}
        Err(e) => tracing::warn!(
            "could not move the pinned maps from {} to {}: {e}",
            legacy.display(),
            dir.display()
        ),
    }
}

/// The capacities of the sized maps (max_entries; bytes for the event
/// ring), fixed when the maps are created. Defaults: [`abi::MAP_SIZE_DEFAULTS`]
/// (a small node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapSizes {
    entries: Vec<(&'static str, &'static str, u32)>,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            entries: abi::MAP_SIZE_DEFAULTS.to_vec(),
        }
    }
}

/// The largest capacity palisade accepts for one map.
const MAX_MAP_SIZE: u64 = 1 << 26;

impl MapSizes {
    /// The defaults with `settings` (setting name → capacity) applied.
    /// Err: what to fix, naming the setting.
    pub fn with<'a>(settings: impl IntoIterator<Item = (&'a str, u64)>) -> Result<Self, String> {
        let mut sizes = Self::default();
        for (name, value) in settings {
            let Some(slot) = sizes.entries.iter_mut().find(|e| e.1 == name) else {
                return Err(format!(
                    "mapSizes: {name:?} is not a map size; the sizes are {}",
                    abi::MAP_SIZE_DEFAULTS
                        .iter()
                        .map(|e| e.1)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            };
            if value == 0 || value > MAX_MAP_SIZE {
                return Err(format!(
                    "mapSizes.{name}: {value} is not between 1 and {MAX_MAP_SIZE}"
                ));
            }
            if slot.0 == "pal_events" && (!value.is_power_of_two() || value < 4096) {
                return Err(format!(
                    "mapSizes.{name}: {value} bytes: the event ring's size must be a power of two \
                     of at least 4096 (a page), e.g. 262144"
                ));
            }
            slot.2 = u32::try_from(value)
                .map_err(|_| format!("mapSizes.{name}: {value} is too large"))?;
        }
        Ok(sizes)
    }

    /// From `NAME=ENTRIES` items (`palisadectl daemon --map-size`).
    pub fn parse_items(items: &[String]) -> Result<Self, String> {
        let mut settings = Vec::new();
        for item in items {
            let (k, v) = item.split_once('=').ok_or_else(|| {
                format!("--map-size {item:?}: write NAME=ENTRIES, e.g. conntrack=262144")
            })?;
            let v: u64 = v
                .trim()
                .parse()
                .map_err(|_| format!("--map-size {item:?}: {v:?} is not a number"))?;
            settings.push((k.trim().to_owned(), v));
        }
        Self::with(settings.iter().map(|(k, v)| (k.as_str(), *v)))
    }

    /// (map name, setting name, capacity) for every sized map.
    /// Maps whose capacity follows the number of endpoints (one or two
    /// entries for each) come with the `endpoints` setting; the Service
    /// flows' backends and frontends with `serviceFlows`.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &'static str, u32)> + '_ {
        let endpoints = self.of("pal_endpoints").unwrap_or(1);
        let service_flows = self.of("pal_svc_flows").unwrap_or(1);
        self.entries.iter().copied().chain([
            ("pal_svc_backends", "serviceFlows", service_flows),
            ("pal_svc_frontends", "serviceFlows", service_flows),
            ("pal_ct_tables", "endpoints", endpoints.saturating_mul(2)),
            ("pal_frag_tables", "endpoints", endpoints.saturating_mul(2)),
            ("pal_budget", "endpoints", endpoints.saturating_mul(2)),
            ("pal_ratelimit_ep", "endpoints", endpoints),
            ("pal_ep_mac", "endpoints", endpoints),
        ])
    }

    /// The capacity of map `map`, when it is sized.
    pub fn of(&self, map: &str) -> Option<u32> {
        self.entries.iter().find(|e| e.0 == map).map(|e| e.2)
    }

    /// Fragmented datagrams each endpoint may have in flight per direction
    /// (`fragments`): the capacity of its fragment LRUs.
    pub fn fragment_budget(&self) -> u32 {
        self.of("pal_frag_table")
            .unwrap_or(abi::MAP_SIZE_DEFAULTS[6].2)
    }

    /// Flows each endpoint may track per direction (`conntrack`).
    pub fn conntrack_budget(&self) -> u32 {
        self.of("pal_ct_table")
            .unwrap_or(abi::MAP_SIZE_DEFAULTS[5].2)
    }
}

/// Check that the maps pinned under `root` (if any) have the capacities
/// `sizes` asks for: a capacity is fixed once the maps exist.
pub fn check_map_sizes(root: &Path, sizes: &MapSizes) -> Result<(), DataplaneError> {
    for (map, setting, wanted) in sizes.iter() {
        let path = map_pin(root, map);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(|e| DataplaneError::OpenPin {
            what: format!("map {map}"),
            path: path.clone(),
            source: Box::new(e),
        })?;
        if info.max_entries() != wanted {
            return Err(DataplaneError::Capacity {
                path,
                setting,
                pinned: info.max_entries(),
                wanted,
            });
        }
    }
    Ok(())
}

/// Where map `name` is pinned under a bpf root.
pub fn map_pin(root: &Path, name: &str) -> PathBuf {
    maps_dir(root).join(name)
}

/// How programs are attached to a veth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// TCX links when the kernel has them (6.6+), else clsact filters.
    #[default]
    Auto,
    /// TCX links only.
    Tcx,
    /// clsact qdisc with cls_bpf filters (direct action) only.
    Netlink,
}

impl AttachMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "tcx" => Some(Self::Tcx),
            "netlink" | "clsact" => Some(Self::Netlink),
            _ => None,
        }
    }
}

/// A cls_bpf filter palisade added, identified the way tc identifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NlFilter {
    pub priority: u16,
    pub handle: u32,
}

/// How an endpoint's two programs are attached; enough to detach them and
/// to check them later, from any process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "camelCase")]
pub enum Attachment {
    /// TCX links, pinned under `<bpf root>/links`.
    #[serde(rename_all = "camelCase")]
    Tcx {
        from_container: PathBuf,
        to_container: PathBuf,
    },
    /// cls_bpf filters on the clsact qdisc of the host veth.
    #[serde(rename_all = "camelCase")]
    Netlink {
        ifindex: u32,
        from_container: NlFilter,
        to_container: NlFilter,
    },
    /// Registered, programs being attached (outside the state lock).
    Pending,
}

impl Attachment {
    pub fn mode_name(&self) -> &'static str {
        match self {
            Self::Tcx { .. } => "tcx",
            Self::Netlink { .. } => "clsact",
            Self::Pending => "attaching",
        }
    }

    pub fn pins(&self) -> Vec<PathBuf> {
        match self {
            Self::Tcx {
                from_container,
                to_container,
            } => vec![from_container.clone(), to_container.clone()],
            Self::Netlink { .. } | Self::Pending => Vec::new(),
        }
    }
}

#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error(
        "{path} is not on a BPF filesystem; mount one (`mount -t bpf bpf /sys/fs/bpf`) or set bpfRoot to a directory on bpffs"
    )]
    NotBpffs { path: PathBuf },
    #[error("mount bpffs at {path}")]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{op} {path}")]
    Fs {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("load eBPF object {object}")]
    Load {
        object: &'static str,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("load program {program} into the kernel (verifier)")]
    Verify {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("pin {what} at {path}")]
    Pin {
        what: String,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("open pinned {what} at {path}")]
    OpenPin {
        what: String,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "pinned map {path} does not match this palisade build ({detail}); it was created by another version: \
         detach all endpoints and remove {path} to recreate it (`palisadectl reset --yes` does both; \
         policies are kept)"
    )]
    Incompatible { path: PathBuf, detail: String },
    #[error(
        "map {path} was created with {pinned} entries and this configuration asks for {wanted} \
         (mapSizes.{setting}): a map's capacity is fixed when it is created. Set {setting} back to \
         {pinned}, or, to resize, run `palisadectl reset --yes` (detaches every endpoint and \
         removes the maps; policies are kept) and start the containers again, or reboot"
    )]
    Capacity {
        path: PathBuf,
        setting: &'static str,
        pinned: u32,
        wanted: u32,
    },
    #[error("attach tc {hook} to {ifname} (ifindex {ifindex})")]
    Attach {
        hook: &'static str,
        ifname: String,
        ifindex: u32,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("detach tc {hook} from {ifname}")]
    Detach {
        hook: &'static str,
        ifname: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{ifname}: {problem}")]
    NotAttached { ifname: String, problem: String },
    #[error("update map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// Loading or attaching the netfilter program for Services.
    #[error("{what} (the netfilter program pal_service, for Service traffic)")]
    Netfilter {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{0}")]
    Other(String),
}

impl DataplaneError {
    pub fn map(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> Self {
        move |e| Self::Map {
            map,
            source: Box::new(e),
        }
    }
}

/// What a sync changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReport {
    pub upserted: usize,
    pub deleted: usize,
    pub epoch: u32,
}

impl SyncReport {
    pub fn changed(&self) -> bool {
        self.upserted + self.deleted > 0
    }
}

/// Fill level of one map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapFill {
    pub name: String,
    pub entries: u64,
    pub max_entries: u32,
}

/// A loaded program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProgramStatus {
    pub name: String,
    pub id: u32,
    pub tag: String,
}

/// Packets seen by one endpoint, by direction, verdict and reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CounterRow {
    pub ep_id: u32,
    pub direction: Direction,
    pub verdict: Verdict,
    pub reason: Reason,
    pub packets: u64,
    pub bytes: u64,
}

/// The datapath as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct DataplaneStatus {
    pub bpf_root: PathBuf,
    pub programs: Vec<ProgramStatus>,
    pub maps: Vec<MapFill>,
    pub epoch: u32,
    pub events_sent: u64,
    pub events_rate_limited: u64,
    pub events_ringbuf_full: u64,
    /// Every endpoint's conntrack tables: how full, how much refused.
    pub budgets: Vec<BudgetFill>,
    /// Where the datapath sends what goes to the node's proxies.
    pub proxies: ProxyStatus,
}

/// The node's proxies as the datapath knows them (`pal_proxy`; 0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    pub mark: u32,
    pub dns_port: u16,
    pub http_port: u16,
    /// The L7 steering program is attached to `lo` (a link of this build
    /// is pinned).
    pub l7_steering: bool,
}

/// One endpoint's conntrack table for the flows opened in one direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetFill {
    pub ep_id: u32,
    pub direction: Direction,
    /// Flows in the table (expired ones included until they are swept).
    pub flows: u64,
    /// The table's capacity: the endpoint's budget.
    pub budget: u32,
    /// New flows refused because the table was full.
    pub refused: u64,
    /// CLOCK_MONOTONIC nanoseconds of the last refusal (0: never).
    pub last_refused_ns: u64,
}

impl BudgetFill {
    /// At its limit: full now.
    pub fn full(&self) -> bool {
        self.flows >= u64::from(self.budget)
    }
}

/// A policy question asked of the live maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lookup {
    pub ep_id: u32,
    pub direction: Direction,
    pub peer: IpAddr,
    pub protocol: u8,
    pub port: u16,
}

/// The live maps' answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupAnswer {
    pub peer_identity: u32,
    pub isolated: bool,
    /// Isolated only by audit-mode policies: allowed and reported.
    pub audit: bool,
    /// The NetworkPolicy entry found (when the direction is isolated and no
    /// tier decided first).
    pub entry: Option<PolicyValue>,
    /// The admin or baseline entry that decided (allow or deny), as
    /// (`TIER_*`, value).
    pub tier: Option<(u8, PolicyValue)>,
    /// What the program does with a new flow: pass it (allowed or audit).
    pub allowed: bool,
}

/// The decision `pal_decide` makes (bpf/lib/policy.h), from the endpoint's
/// flags and `find`, which searches one tier's entries the way the program
/// does (exact peer, and for NetworkPolicy then "any peer").
pub fn decide_like_the_program(
    flags: u32,
    direction: Direction,
    mut find: impl FnMut(u8) -> Option<PolicyValue>,
) -> (Option<PolicyValue>, Option<(u8, PolicyValue)>, bool) {
    let egress = direction == Direction::Egress;
    let pick = |i: u32, e: u32| if egress { e } else { i };
    // Allow and deny are final; pass and "none" go on. (An entry marked
    // audit changes only how an allowed flow is reported.)
    let tier_final = |tier: u8, find: &mut dyn FnMut(u8) -> Option<PolicyValue>| {
        let v = find(tier)?;
        matches!(v.verdict, 1 | 2).then_some((tier, v))
    };
    if flags & pick(abi::EP_ADMIN_INGRESS, abi::EP_ADMIN_EGRESS) != 0
        && let Some(t) = tier_final(abi::TIER_ADMIN, &mut find)
    {
        return (None, Some(t), t.1.verdict == Verdict::Allow as u8);
    }
    if flags & pick(abi::EP_ISOLATE_INGRESS, abi::EP_ISOLATE_EGRESS) == 0 {
        if flags & pick(abi::EP_BASELINE_INGRESS, abi::EP_BASELINE_EGRESS) != 0
            && let Some(t) = tier_final(abi::TIER_BASELINE, &mut find)
        {
            return (None, Some(t), t.1.verdict == Verdict::Allow as u8);
        }
        return (None, None, true);
    }
    let entry = find(abi::TIER_NETPOL).filter(|v| v.verdict == Verdict::Allow as u8);
    let audit = flags & pick(abi::EP_AUDIT_INGRESS, abi::EP_AUDIT_EGRESS) != 0;
    (entry, None, entry.is_some() || audit)
}

/// Kernel side effects palisade needs.
pub trait Dataplane {
    /// Make sure bpffs, maps and programs exist (loading and pinning them
    /// the first time).
    fn prepare(&mut self) -> Result<(), DataplaneError>;
    /// Open the maps if a datapath exists, loading nothing. `false`: none.
    fn open_existing(&mut self) -> Result<bool, DataplaneError>;
    /// Attach both programs to a host veth.
    fn attach(
        &mut self,
        ep_id: u32,
        ifname: &str,
        ifindex: u32,
    ) -> Result<Attachment, DataplaneError>;
    /// Detach; succeeds when already detached or the veth is gone.
    fn detach(&mut self, att: &Attachment, ifname: &str) -> Result<(), DataplaneError>;
    /// Fail unless both programs are attached as recorded.
    fn verify(&self, att: &Attachment, ifname: &str) -> Result<(), DataplaneError>;
    /// Make the maps equal to `desired` by reading them all and writing
    /// the difference; bump the epoch if anything changed (repair, start).
    fn sync(&mut self, desired: &Desired) -> Result<SyncReport, DataplaneError>;
    /// Write the entries of a delta (additions before removals); bump the
    /// epoch when it takes something away.
    fn apply(&mut self, delta: &Delta) -> Result<SyncReport, DataplaneError>;
    /// The store generation the maps were last made to match (0: unknown,
    /// or a change is being written).
    fn sync_token(&self) -> Result<u64, DataplaneError>;
    fn set_sync_token(&mut self, token: u64) -> Result<(), DataplaneError>;
    /// Drop per-endpoint state (counters) of a removed endpoint.
    fn forget_endpoint(&mut self, ep_id: u32) -> Result<(), DataplaneError>;
    /// Drop the counters and event token buckets of endpoints not in
    /// `live` (left by a process killed between taking an endpoint out and
    /// forgetting it). Returns how many entries went.
    fn forget_unknown_endpoints(&mut self, live: &BTreeSet<u32>) -> Result<usize, DataplaneError> {
        let _ = live;
        Ok(0)
    }
    /// Remove link pins that no endpoint owns (left by a crash).
    fn sweep_links(&mut self, keep: &[PathBuf]) -> Result<Vec<PathBuf>, DataplaneError>;
    /// Where an endpoint's links are pinned when attached with TCX.
    fn link_pins(&self, ep_id: u32) -> Vec<PathBuf> {
        let _ = ep_id;
        Vec::new()
    }
    /// Put this build's programs on an attachment in place (a TCX link
    /// update, or a cls_bpf filter replaced under its handle), so that no
    /// packet passes without a program. `Ok(false)`: it runs them already.
    fn upgrade(&mut self, att: &Attachment, ifname: &str) -> Result<bool, DataplaneError> {
        let _ = (att, ifname);
        Ok(false)
    }
    /// Record (or forget) the MAC address of the container behind host
    /// veth `ifindex`: the datapath then drops frames it sends from
    /// another MAC and unicast frames to another MAC delivered to it.
    fn set_endpoint_mac(
        &mut self,
        ifindex: u32,
        mac: Option<[u8; 6]>,
    ) -> Result<(), DataplaneError> {
        let _ = (ifindex, mac);
        Ok(())
    }
    /// Copy the flows an earlier build tracked in its one shared conntrack
    /// table (`pal_ct`) into the endpoints' own tables, around an upgrade:
    /// before the programs are swapped, and again after. `finished`: every
    /// endpoint runs this build's programs now, so the earlier build's
    /// shared maps are unpinned. Returns how many flows were copied.
    fn adopt_legacy_conntrack(&mut self, finished: bool) -> Result<u64, DataplaneError> {
        let _ = finished;
        Ok(0)
    }
    /// Remove the whole pinned datapath (once nothing is attached).
    fn destroy(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
    /// Programs, map fill levels, epoch and event counters.
    fn status(&self) -> Result<DataplaneStatus, DataplaneError>;
    /// Per-endpoint counters.
    fn counters(&self) -> Result<Vec<CounterRow>, DataplaneError>;
    /// Ask the live maps what they decide for a new flow.
    fn lookup(&self, q: &Lookup) -> Result<LookupAnswer, DataplaneError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_sizes_take_known_names_and_refuse_the_rest_naming_the_setting() {
        let s =
            MapSizes::parse_items(&["conntrack=4096".into(), " policy = 8192 ".into()]).unwrap();
        assert_eq!(s.conntrack_budget(), 4096);
        assert_eq!(s.of("pal_policy"), Some(8192));
        assert_eq!(
            s.of("pal_endpoints"),
            Some(4096),
            "the default for the rest"
        );
        assert_eq!(
            MapSizes::default().of("pal_config"),
            None,
            "not a sized map"
        );
        for (bad, words) in [
            (
                "conntrak=1",
                "not a map size; the sizes are endpoints, sourceAddresses",
            ),
            ("conntrack", "write NAME=ENTRIES"),
            ("conntrack=x", "is not a number"),
            ("policy=0", "not between 1 and"),
            ("eventBytes=5000", "power of two"),
            ("eventBytes=2048", "power of two"),
        ] {
            let e = MapSizes::parse_items(&[bad.into()]).unwrap_err();
            assert!(e.contains(words), "{bad}: {e}");
        }
        assert!(MapSizes::parse_items(&["eventBytes=65536".into()]).is_ok());
    }
}
