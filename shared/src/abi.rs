//! Rust mirror of `bpf/include/palisade_abi.h`: every map key and value,
//! event, verdict and reason code. Each struct names its C twin. The header
//! is the one definition: build.rs reads it with bindgen, and every struct
//! (size, each field's offset and size) and constant here is checked
//! against what it declares at compile time. The `unsafe impl Pod` lines
//! live only here.

use std::{
    fmt,
    mem::{offset_of, size_of},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// `PAL_ABI_VERSION`.
pub const ABI_VERSION: u32 = 1;

/// `PAL_DIR_*`: direction from the container's point of view.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Direction {
    /// Entering the container (host veth tc egress).
    Ingress = 0,
    /// Leaving the container (host veth tc ingress).
    Egress = 1,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Ingress),
            1 => Some(Self::Egress),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `PAL_SIZE_*`: every sized map's default capacity (max_entries; bytes for
/// the event ring), with the name of its setting (conflist `mapSizes`,
/// `palisadectl daemon --map-size`).
pub const MAP_SIZE_DEFAULTS: [(&str, &str, u32); 11] = [
    ("pal_endpoints", "endpoints", 4096),
    ("pal_srcguard", "sourceAddresses", 16384),
    ("pal_ipcache", "cidrs", 65536),
    ("pal_ipcache_host", "addresses", 65536),
    ("pal_policy", "policy", 65536),
    // Not a pinned map: every endpoint's two conntrack tables (its budget).
    ("pal_ct_table", "conntrack", 8192),
    // Not a pinned map: every endpoint's two fragment tables.
    ("pal_frag_table", "fragments", 64),
    ("pal_counters", "counters", 4096),
    ("pal_events", "eventBytes", 256 * 1024),
    ("pal_svc", "services", 4096),
    ("pal_svc_flows", "serviceFlows", 16384),
];

/// `PAL_ID_ANY`: policy-key wildcard for "any peer".
pub const ID_ANY: u32 = 0;
/// `PAL_ID_HOST`: the node itself.
pub const ID_HOST: u32 = 1;
/// `PAL_ID_WORLD`: any address palisade knows nothing about.
pub const ID_WORLD: u32 = 2;
/// `PAL_ID_LOCAL_MIN`: first endpoint identity.
pub const ID_LOCAL_MIN: u32 = 256;
/// `PAL_ID_CIDR_MIN`: first identity of an ipBlock CIDR.
pub const ID_CIDR_MIN: u32 = 0x0100_0000;

/// `PAL_TIER_*`, in the order the datapath evaluates them.
pub const TIER_ADMIN: u8 = 0;
pub const TIER_NETPOL: u8 = 1;
pub const TIER_BASELINE: u8 = 2;

/// `PAL_VERDICT_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Verdict {
    None = 0,
    Allow = 1,
    Deny = 2,
    Audit = 3,
    Pass = 4,
    Redirect = 5,
}

impl Verdict {
    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Allow,
            2 => Self::Deny,
            3 => Self::Audit,
            4 => Self::Pass,
            5 => Self::Redirect,
            _ => Self::None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Allow => "allowed",
            Self::Deny => "denied",
            Self::Audit => "audit",
            Self::Pass => "pass",
            Self::Redirect => "redirect",
        }
    }

    /// The verdict a word of [`Verdict::as_str`] names.
    pub fn from_word(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == word)
    }

    /// How bad the outcome is, for merging what the two ends of a
    /// connection saw: denied, then audit, then everything else.
    pub fn severity(self) -> u8 {
        match self {
            Self::Deny => 2,
            Self::Audit => 1,
            Self::None | Self::Allow | Self::Pass | Self::Redirect => 0,
        }
    }

    const ALL: [Self; 6] = [
        Self::None,
        Self::Allow,
        Self::Deny,
        Self::Audit,
        Self::Pass,
        Self::Redirect,
    ];
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Flow logs and `palisadectl flows -o json` carry the word ("denied").
impl serde::Serialize for Verdict {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A word this build does not know (a log written by another version) reads
/// as [`Verdict::None`], as an unknown code does in [`Verdict::from_u8`],
/// rather than losing the record.
impl<'de> serde::Deserialize<'de> for Verdict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let word = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(Self::from_word(&word).unwrap_or(Self::None))
    }
}

/// `PAL_REASON_*` and `PAL_DROP_*`: why a packet was allowed or dropped.
/// Counters store the absolute value together with the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    Policy,
    NotIsolated,
    Host,
    Established,
    Related,
    Infra,
    /// To a Service frontend: judged on its backend after the node's DNAT.
    Service,
    DropPolicy,
    DropUnknownEndpoint,
    DropMalformed,
    DropFragNoHead,
    DropUnsupportedL3,
    DropRevoked,
    DropSpoofed,
    /// Redirected to a proxy that does not run (fail closed).
    DropNoProxy,
    /// A new flow beyond the endpoint's conntrack budget.
    DropBudget,
    /// A unicast frame for another MAC, about to be delivered to the
    /// container.
    DropMisaddressed,
    /// To a Service, on a backend only HTTP rules allow the client to
    /// reach: the L7 proxy cannot judge it there (fail closed).
    DropL7Service,
    /// A code this build has no name for; its text keeps the code.
    Unknown(i8),
    /// Text this build cannot read back (a flow log written by another
    /// version); shown as "unknown reason".
    Unrecognised,
}

impl Reason {
    /// Decode the signed code of an event.
    pub const fn from_code(code: i8) -> Self {
        match code {
            0 => Self::Policy,
            1 => Self::NotIsolated,
            2 => Self::Host,
            3 => Self::Established,
            4 => Self::Related,
            5 => Self::Infra,
            6 => Self::Service,
            -1 => Self::DropPolicy,
            -2 => Self::DropUnknownEndpoint,
            -3 => Self::DropMalformed,
            -4 => Self::DropFragNoHead,
            -5 => Self::DropUnsupportedL3,
            -6 => Self::DropRevoked,
            -7 => Self::DropSpoofed,
            -8 => Self::DropNoProxy,
            -9 => Self::DropBudget,
            -10 => Self::DropMisaddressed,
            -11 => Self::DropL7Service,
            other => Self::Unknown(other),
        }
    }

    /// Decode a counter key: the absolute code, made negative for drops.
    pub fn from_counter(verdict: Verdict, code: u8) -> Self {
        let code = code as i8;
        if verdict == Verdict::Deny {
            Self::from_code(-code)
        } else {
            Self::from_code(code)
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Policy => "decided by policy",
            Self::NotIsolated => "no policy isolates the endpoint in this direction",
            Self::Host => "traffic to or from the node itself",
            Self::Established => "part of an established flow",
            Self::Related => "ICMP error about an established flow",
            Self::Infra => "ARP, neighbour discovery or DHCP (never governed)",
            Self::Service => "to a Service: judged on the backend after DNAT",
            Self::DropPolicy => "no policy rule allows it",
            Self::DropUnknownEndpoint => "the veth has no registered endpoint (fail closed)",
            Self::DropMalformed => "truncated or malformed headers",
            Self::DropFragNoHead => "fragment whose first fragment was not seen",
            Self::DropUnsupportedL3 => "unsupported layer-3 protocol or IPv6 header chain",
            Self::DropRevoked => "flow no longer allowed after a policy change",
            Self::DropSpoofed => "sent from an address the container does not own",
            Self::DropNoProxy => "for a proxy (DNS or L7) that does not run (fail closed)",
            Self::DropL7Service => {
                "through a Service to a backend only HTTP rules allow: the L7 proxy cannot judge it (fail closed)"
            }
            Self::DropMisaddressed => "a unicast frame addressed to another MAC (not delivered)",
            Self::DropBudget => {
                "budget exceeded: the endpoint's conntrack table for this direction is full"
            }
            Self::Unknown(_) | Self::Unrecognised => "unknown reason",
        }
    }

    /// Every reason with a code, for reading text back.
    const KNOWN: [Self; 18] = [
        Self::Policy,
        Self::NotIsolated,
        Self::Host,
        Self::Established,
        Self::Related,
        Self::Infra,
        Self::Service,
        Self::DropPolicy,
        Self::DropUnknownEndpoint,
        Self::DropMalformed,
        Self::DropFragNoHead,
        Self::DropUnsupportedL3,
        Self::DropRevoked,
        Self::DropSpoofed,
        Self::DropNoProxy,
        Self::DropBudget,
        Self::DropMisaddressed,
        Self::DropL7Service,
    ];

    /// The reason a text of [`Reason`]'s `Display` stands for; text this
    /// build does not know is [`Reason::Unrecognised`].
    pub fn from_text(text: &str) -> Self {
        if let Some(code) = text
            .strip_prefix(UNKNOWN_CODE_PREFIX)
            .and_then(|t| t.strip_suffix(')'))
            .and_then(|c| c.parse().ok())
        {
            return Self::Unknown(code);
        }
        // Written by builds before the L7 proxy shared this reason.
        if text == "for the DNS proxy, which does not run (fail closed)" {
            return Self::DropNoProxy;
        }
        Self::KNOWN
            .into_iter()
            .find(|r| r.describe() == text)
            .unwrap_or(Self::Unrecognised)
    }
}

const UNKNOWN_CODE_PREFIX: &str = "unknown reason (code ";

/// The words users see: [`Reason::describe`], with the code of an unknown
/// reason.
impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(code) => write!(f, "{UNKNOWN_CODE_PREFIX}{code})"),
            other => f.write_str(other.describe()),
        }
    }
}

/// Flow logs and `palisadectl flows -o json` carry the text.
impl serde::Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Never fails on a string: unknown text is [`Reason::Unrecognised`], so a
/// log written by another version still reads.
impl<'de> serde::Deserialize<'de> for Reason {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(Self::from_text(&text))
    }
}

/// `PAL_EP_*` endpoint flags.
pub const EP_ISOLATE_INGRESS: u32 = 1 << 0;
pub const EP_ISOLATE_EGRESS: u32 = 1 << 1;
pub const EP_AUDIT_INGRESS: u32 = 1 << 2;
pub const EP_AUDIT_EGRESS: u32 = 1 << 3;
pub const EP_HAS_ANY_PORT_INGRESS: u32 = 1 << 4;
pub const EP_HAS_ANY_PROTO_INGRESS: u32 = 1 << 5;
pub const EP_HAS_ANY_PORT_EGRESS: u32 = 1 << 6;
pub const EP_HAS_ANY_PROTO_EGRESS: u32 = 1 << 7;
pub const EP_ADMIN_INGRESS: u32 = 1 << 8;
pub const EP_ADMIN_EGRESS: u32 = 1 << 9;
pub const EP_BASELINE_INGRESS: u32 = 1 << 10;
pub const EP_BASELINE_EGRESS: u32 = 1 << 11;
/// `PAL_EP_DNS_PROXY`: the endpoint's DNS goes to the node's DNS proxy.
pub const EP_DNS_PROXY: u32 = 1 << 12;
/// `PAL_EP_L7_EGRESS`: the endpoint has egress entries only HTTP rules
/// allow; its TCP connections to Service frontends go to the L7 proxy.
pub const EP_L7_EGRESS: u32 = 1 << 13;

/// What an endpoint needs set for the datapath to look up a policy entry of
/// this direction (`DIR_*`) and prefix length: (`PAL_EP_HAS_*` flags,
/// `range_lens` bits). One-port entries are always looked up.
pub fn ep_shape(direction: u8, prefixlen: u32) -> (u32, u32) {
    let egress = direction == Direction::Egress as u8;
    match prefixlen {
        POLICY_PREFIX_ANY_PORT if egress => (EP_HAS_ANY_PORT_EGRESS, 0),
        POLICY_PREFIX_ANY_PORT => (EP_HAS_ANY_PORT_INGRESS, 0),
        POLICY_PREFIX_ANY_PROTO if egress => (EP_HAS_ANY_PROTO_EGRESS, 0),
        POLICY_PREFIX_ANY_PROTO => (EP_HAS_ANY_PROTO_INGRESS, 0),
        n if n > POLICY_PREFIX_ANY_PORT && n < POLICY_PREFIX_FULL => {
            let bit = n - POLICY_PREFIX_ANY_PORT - 1;
            (0, 1 << if egress { 16 + bit } else { bit })
        }
        _ => (0, 0),
    }
}

/// `PAL_CFG_*` global flags.
pub const CFG_ALLOW_HOST: u32 = 1 << 0;
pub const CFG_EVENTS: u32 = 1 << 1;

/// `PAL_POLICY_PREFIX_*`.
pub const POLICY_PREFIX_ANY_PROTO: u32 = 104;
pub const POLICY_PREFIX_ANY_PORT: u32 = 112;
pub const POLICY_PREFIX_FULL: u32 = 128;

/// `PAL_EVENT_*`.
pub const EVENT_FLOW: u8 = 1;
pub const EVENT_DROP: u8 = 2;

/// `PAL_EVSTAT_*`.
pub const EVSTAT_SENT: u32 = 0;
pub const EVSTAT_RATE_LIMITED: u32 = 1;
pub const EVSTAT_RINGBUF_FULL: u32 = 2;

/// IP protocol numbers used by policy.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

/// Name of an IP protocol number.
pub fn proto_name(p: u8) -> String {
    match p {
        PROTO_ICMP => "ICMP".into(),
        2 => "IGMP".into(),
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        PROTO_ICMPV6 => "ICMPv6".into(),
        PROTO_SCTP => "SCTP".into(),
        other => format!("proto-{other}"),
    }
}

/// `struct pal_endpoint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct EndpointValue {
    pub ep_id: u32,
    pub identity: u32,
    pub flags: u32,
    /// Port-range prefix lengths in use: bit `n - 1` (ingress) or `16 + n - 1`
    /// (egress) for `POLICY_PREFIX_ANY_PORT + n`.
    pub range_lens: u32,
}

/// `struct pal_ipcache_key` (the LPM prefix length is kept by aya's `Key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(C)]
pub struct IpcacheAddr {
    pub addr: [u8; 16],
}

/// `struct pal_ipcache_value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct IpcacheValue {
    pub identity: u32,
    pub flags: u32,
}

/// `struct pal_policy_key`: the key of `pal_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(C)]
pub struct PolicyKey {
    pub prefixlen: u32,
    pub data: PolicyKeyData,
}

/// `struct pal_policy_match`: a policy key without its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(C)]
pub struct PolicyKeyData {
    pub ep_id: u32,
    pub direction: u8,
    pub tier: u8,
    pub pad1: u16,
    pub peer_id: u32,
    pub pad2: u8,
    pub protocol: u8,
    /// Network byte order.
    pub dport_be: u16,
}

/// `PAL_POLICY_F_AUDIT`: on an admin or baseline entry, an audited Deny of
/// the policy in `policy_id` matched before the rule that decided.
pub const POLICY_F_AUDIT: u8 = 1 << 0;
/// `PAL_POLICY_F_L7`: on a NetworkPolicy entry, every rule that allows the
/// traffic carries HTTP rules (its connections go through the L7 proxy).
pub const POLICY_F_L7: u8 = 1 << 1;

/// `struct pal_policy_value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct PolicyValue {
    pub policy_id: u32,
    pub verdict: u8,
    pub flags: u8,
    pub pad: u16,
}

/// `struct pal_ct_key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(C)]
pub struct CtKey {
    pub ep_id: u32,
    pub direction: u8,
    pub protocol: u8,
    pub pad: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
}

/// `struct pal_ct_value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct CtValue {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    pub epoch: u32,
    pub policy_id: u32,
    pub peer_id: u32,
    pub verdict: u8,
    pub pad: u8,
    pub flags: u16,
}

/// `struct pal_budget`: one endpoint's conntrack budget in one direction,
/// as the datapath spends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct BudgetValue {
    pub swept_ns: u64,
    pub refused: u64,
    pub last_refused_ns: u64,
    /// The table's max_entries, written with it by user space.
    pub capacity: u32,
    pub pad: u32,
}

/// `struct pal_mac`: a container interface's MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct MacValue {
    pub addr: [u8; 6],
    pub pad: u16,
}

/// `PAL_CT_TABLE`: the key of an endpoint's conntrack table for flows
/// opened in `direction`.
pub const fn ct_table(ep_id: u32, direction: u8) -> u32 {
    (ep_id << 1) | (direction as u32 & 1)
}

/// `struct pal_config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct ConfigValue {
    pub epoch: u32,
    pub flags: u32,
    pub events_per_sec: u32,
    pub events_burst: u32,
    pub sync_token: u64,
}

/// `struct pal_proxy_config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct ProxyConfig {
    pub mark: u32,
    pub dns_port: u16,
    /// The L7 proxy's listener port (0: none; L7 connections are dropped).
    pub http_port: u16,
}

/// `struct pal_counter_key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(C)]
pub struct CounterKey {
    pub ep_id: u32,
    pub direction: u8,
    pub verdict: u8,
    pub reason: u8,
    pub pad: u8,
}

/// `struct pal_counter_value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

/// `struct pal_event`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct Event {
    pub ts_ns: u64,
    pub ep_id: u32,
    pub ifindex: u32,
    pub identity: u32,
    pub peer_identity: u32,
    pub policy_id: u32,
    pub pkt_len: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub protocol: u8,
    pub direction: u8,
    pub verdict: u8,
    pub reason: i8,
    pub kind: u8,
    pub pad: [u8; 7],
}

/// `struct pal_srcguard_key`: an address an endpoint may send from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(C)]
pub struct SrcguardKey {
    pub ep_id: u32,
    pub addr: [u8; 16],
}

/// `struct pal_frag_key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct FragKey {
    pub ep_id: u32,
    pub direction: u8,
    pub protocol: u8,
    pub pad: u16,
    pub id: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// `struct pal_frag_value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct FragValue {
    pub sport_be: u16,
    pub dport_be: u16,
    pub pad: u32,
}

/// `struct pal_svc_key`: a Service frontend (address, port, protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(C)]
pub struct SvcKey {
    pub addr: [u8; 16],
    pub port_be: u16,
    pub protocol: u8,
    pub pad: u8,
}

impl SvcKey {
    pub fn new(addr: IpAddr, protocol: u8, port: u16) -> Self {
        Self {
            addr: addr16(addr),
            port_be: port.to_be(),
            protocol,
            pad: 0,
        }
    }

    pub fn addr(&self) -> IpAddr {
        ip_from16(self.addr)
    }

    pub fn port(&self) -> u16 {
        u16::from_be(self.port_be)
    }
}

/// `struct pal_svc_flow_key`: a flow to a frontend, as the client sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct SvcFlowKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub protocol: u8,
    pub pad: [u8; 3],
}

/// `struct pal_svc_flow_value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct SvcFlowValue {
    pub ifindex: u32,
    pub ep_id: u32,
}

/// `struct pal_svc_backend`: the backend pal_service allowed a flow to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct SvcBackend {
    pub addr: [u8; 16],
    pub port_be: u16,
    pub pad: u16,
}

// Layouts must match the C structs byte for byte.
/// The C declarations of `bpf/include/palisade_abi.h` as bindgen reads
/// them (build.rs): the one definition everything here is checked against.
#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    dead_code,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    reason = "generated by bindgen"
)]
mod c {
    include!(concat!(env!("OUT_DIR"), "/abi_c.rs"));
}

/// The size of the field `f` selects (its type, in a const context).
const fn field_size<T, F>(_: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// Every struct the datapath shares with user space has the C layout:
/// same size, and each C field at the same offset with the same size in
/// its Rust twin (fields listed Rust = C). A difference fails the build.
macro_rules! same_layout {
    ($rust:ty = $c:ty { $($rf:ident = $cf:ident),* $(,)? }) => {
        const _: () = assert!(
            size_of::<$rust>() == size_of::<$c>(),
            concat!("size of ", stringify!($rust), " differs from struct ", stringify!($c))
        );
        $(
            const _: () = assert!(
                offset_of!($rust, $rf) == offset_of!($c, $cf)
                    && field_size::<$rust, _>(|s| &s.$rf) == field_size::<$c, _>(|s| &s.$cf),
                concat!(
                    stringify!($rust), ".", stringify!($rf), " does not match ",
                    stringify!($c), ".", stringify!($cf), " (offset or size)"
                )
            );
        )*
    };
}

same_layout!(EndpointValue = c::pal_endpoint {
    ep_id = ep_id, identity = identity, flags = flags, range_lens = range_lens,
});
same_layout!(aya::maps::lpm_trie::Key<IpcacheAddr> = c::pal_ipcache_key {});
same_layout!(IpcacheAddr = c::pal_ipcache_host_key { addr = addr });
same_layout!(IpcacheValue = c::pal_ipcache_value { identity = identity, flags = flags });
same_layout!(PolicyKey = c::pal_policy_key { prefixlen = prefixlen, data = m });
same_layout!(PolicyKeyData = c::pal_policy_match {
    ep_id = ep_id, direction = direction, tier = tier, pad1 = pad1, peer_id = peer_id,
    pad2 = pad2, protocol = protocol, dport_be = dport,
});
same_layout!(PolicyValue = c::pal_policy_value {
    policy_id = policy_id, verdict = verdict, flags = flags, pad = pad,
});
same_layout!(CtKey = c::pal_ct_key {
    ep_id = ep_id, direction = direction, protocol = protocol, pad = pad, saddr = saddr,
    daddr = daddr, sport_be = sport, dport_be = dport,
});
same_layout!(MacValue = c::pal_mac { addr = addr, pad = pad });
same_layout!(BudgetValue = c::pal_budget {
    swept_ns = swept_ns, refused = refused, last_refused_ns = last_refused_ns,
    capacity = capacity, pad = pad,
});
same_layout!(CtValue = c::pal_ct_value {
    created_ns = created_ns, last_seen_ns = last_seen_ns, packets = packets, bytes = bytes,
    epoch = epoch, policy_id = policy_id, peer_id = peer_id, verdict = verdict, pad = pad,
    flags = flags,
});
same_layout!(ConfigValue = c::pal_config {
    epoch = epoch, flags = flags, events_per_sec = events_per_sec,
    events_burst = events_burst, sync_token = sync_token,
});
same_layout!(ProxyConfig = c::pal_proxy_config { mark = mark, dns_port = dns_port, http_port = http_port });
same_layout!(CounterKey = c::pal_counter_key {
    ep_id = ep_id, direction = direction, verdict = verdict, reason = reason, pad = pad,
});
same_layout!(CounterValue = c::pal_counter_value { packets = packets, bytes = bytes });
same_layout!(Event = c::pal_event {
    ts_ns = ts_ns, ep_id = ep_id, ifindex = ifindex, identity = identity,
    peer_identity = peer_identity, policy_id = policy_id, pkt_len = pkt_len, saddr = saddr,
    daddr = daddr, sport_be = sport, dport_be = dport, protocol = protocol,
    direction = direction, verdict = verdict, reason = reason, kind = type_, pad = pad,
});
same_layout!(SrcguardKey = c::pal_srcguard_key { ep_id = ep_id, addr = addr });
same_layout!(FragKey = c::pal_frag_key {
    ep_id = ep_id, direction = direction, protocol = protocol, pad = pad, id = id,
    saddr = saddr, daddr = daddr,
});
same_layout!(FragValue = c::pal_frag_value { sport_be = sport, dport_be = dport, pad = pad });
same_layout!(SvcKey = c::pal_svc_key { addr = addr, port_be = port, protocol = protocol, pad = pad });
same_layout!(SvcFlowKey = c::pal_svc_flow_key {
    saddr = saddr, daddr = daddr, sport_be = sport, dport_be = dport, protocol = protocol,
    pad = pad,
});
same_layout!(SvcFlowValue = c::pal_svc_flow_value { ifindex = ifindex, ep_id = ep_id });
same_layout!(SvcBackend = c::pal_svc_backend { addr = addr, port_be = port, pad = pad });

/// Every constant has the header's value (a difference fails the build).
macro_rules! same_value {
    ($($rust:expr => $c:expr),* $(,)?) => {
        $(
            #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap, clippy::cast_sign_loss, reason = "both sides are small constants; equality is checked after the cast")]
            const _: () = assert!(
                $rust as i64 == $c as i64,
                concat!(stringify!($rust), " differs from ", stringify!($c))
            );
        )*
    };
}

same_value! {
    ABI_VERSION => c::PAL_ABI_VERSION,
    MAP_SIZE_DEFAULTS[0].2 => c::PAL_SIZE_ENDPOINTS,
    MAP_SIZE_DEFAULTS[1].2 => c::PAL_SIZE_SRCGUARD,
    MAP_SIZE_DEFAULTS[2].2 => c::PAL_SIZE_IPCACHE,
    MAP_SIZE_DEFAULTS[3].2 => c::PAL_SIZE_IPCACHE_HOST,
    MAP_SIZE_DEFAULTS[4].2 => c::PAL_SIZE_POLICY,
    MAP_SIZE_DEFAULTS[5].2 => c::PAL_SIZE_CT,
    MAP_SIZE_DEFAULTS[6].2 => c::PAL_SIZE_FRAG,
    MAP_SIZE_DEFAULTS[7].2 => c::PAL_SIZE_COUNTERS,
    MAP_SIZE_DEFAULTS[8].2 => c::PAL_SIZE_EVENTS,
    MAP_SIZE_DEFAULTS[9].2 => c::PAL_SIZE_SVC,
    MAP_SIZE_DEFAULTS[10].2 => c::PAL_SIZE_SVC_FLOWS,
    Direction::Ingress => c::PAL_DIR_INGRESS,
    Direction::Egress => c::PAL_DIR_EGRESS,
    ID_ANY => c::PAL_ID_ANY,
    ID_HOST => c::PAL_ID_HOST,
    ID_WORLD => c::PAL_ID_WORLD,
    ID_LOCAL_MIN => c::PAL_ID_LOCAL_MIN,
    ID_CIDR_MIN => c::PAL_ID_CIDR_MIN,
    TIER_ADMIN => c::PAL_TIER_ADMIN,
    TIER_NETPOL => c::PAL_TIER_NETPOL,
    TIER_BASELINE => c::PAL_TIER_BASELINE,
    Verdict::None => c::PAL_VERDICT_NONE,
    Verdict::Allow => c::PAL_VERDICT_ALLOW,
    Verdict::Deny => c::PAL_VERDICT_DENY,
    Verdict::Audit => c::PAL_VERDICT_AUDIT,
    Verdict::Pass => c::PAL_VERDICT_PASS,
    Verdict::Redirect => c::PAL_VERDICT_REDIRECT,
    EP_ISOLATE_INGRESS => c::PAL_EP_ISOLATE_INGRESS,
    EP_ISOLATE_EGRESS => c::PAL_EP_ISOLATE_EGRESS,
    EP_AUDIT_INGRESS => c::PAL_EP_AUDIT_INGRESS,
    EP_AUDIT_EGRESS => c::PAL_EP_AUDIT_EGRESS,
    EP_HAS_ANY_PORT_INGRESS => c::PAL_EP_HAS_ANY_PORT_INGRESS,
    EP_HAS_ANY_PROTO_INGRESS => c::PAL_EP_HAS_ANY_PROTO_INGRESS,
    EP_HAS_ANY_PORT_EGRESS => c::PAL_EP_HAS_ANY_PORT_EGRESS,
    EP_HAS_ANY_PROTO_EGRESS => c::PAL_EP_HAS_ANY_PROTO_EGRESS,
    EP_ADMIN_INGRESS => c::PAL_EP_ADMIN_INGRESS,
    EP_ADMIN_EGRESS => c::PAL_EP_ADMIN_EGRESS,
    EP_BASELINE_INGRESS => c::PAL_EP_BASELINE_INGRESS,
    EP_BASELINE_EGRESS => c::PAL_EP_BASELINE_EGRESS,
    EP_DNS_PROXY => c::PAL_EP_DNS_PROXY,
    EP_L7_EGRESS => c::PAL_EP_L7_EGRESS,
    CFG_ALLOW_HOST => c::PAL_CFG_ALLOW_HOST,
    CFG_EVENTS => c::PAL_CFG_EVENTS,
    POLICY_PREFIX_ANY_PROTO => c::PAL_POLICY_PREFIX_ANY_PROTO,
    POLICY_PREFIX_ANY_PORT => c::PAL_POLICY_PREFIX_ANY_PORT,
    POLICY_PREFIX_FULL => c::PAL_POLICY_PREFIX_FULL,
    POLICY_F_AUDIT => c::PAL_POLICY_F_AUDIT,
    POLICY_F_L7 => c::PAL_POLICY_F_L7,
    EVENT_FLOW => c::PAL_EVENT_FLOW,
    EVENT_DROP => c::PAL_EVENT_DROP,
    EVSTAT_SENT => c::PAL_EVSTAT_SENT,
    EVSTAT_RATE_LIMITED => c::PAL_EVSTAT_RATE_LIMITED,
    EVSTAT_RINGBUF_FULL => c::PAL_EVSTAT_RINGBUF_FULL,
}

/// Every reason code decodes to the reason the header names.
macro_rules! same_reason {
    ($($v:ident => $c:expr),* $(,)?) => {
        $(
            #[allow(clippy::cast_possible_truncation, reason = "the codes are small")]
            const _: () = assert!(
                matches!(Reason::from_code($c as i8), Reason::$v),
                concat!(stringify!($c), " does not decode to Reason::", stringify!($v))
            );
        )*
    };
}

same_reason! {
    Policy => c::PAL_REASON_POLICY,
    NotIsolated => c::PAL_REASON_NOT_ISOLATED,
    Host => c::PAL_REASON_HOST,
    Established => c::PAL_REASON_ESTABLISHED,
    Related => c::PAL_REASON_RELATED,
    Infra => c::PAL_REASON_INFRA,
    Service => c::PAL_REASON_SERVICE,
    DropPolicy => c::PAL_DROP_POLICY,
    DropUnknownEndpoint => c::PAL_DROP_UNKNOWN_ENDPOINT,
    DropMalformed => c::PAL_DROP_MALFORMED,
    DropFragNoHead => c::PAL_DROP_FRAG_NO_HEAD,
    DropUnsupportedL3 => c::PAL_DROP_UNSUPPORTED_L3,
    DropRevoked => c::PAL_DROP_REVOKED,
    DropSpoofed => c::PAL_DROP_SPOOFED,
    DropNoProxy => c::PAL_DROP_NO_PROXY,
    DropBudget => c::PAL_DROP_BUDGET,
    DropMisaddressed => c::PAL_DROP_MISADDRESSED,
    DropL7Service => c::PAL_DROP_L7_SERVICE,
}

// SAFETY: all of these are `repr(C)` structs of integers and byte arrays
// with explicit padding fields, so every bit pattern is valid and no byte is
// uninitialised padding.
unsafe impl aya::Pod for EndpointValue {}
unsafe impl aya::Pod for ProxyConfig {}
unsafe impl aya::Pod for IpcacheAddr {}
unsafe impl aya::Pod for IpcacheValue {}
unsafe impl aya::Pod for PolicyKeyData {}
unsafe impl aya::Pod for PolicyKey {}
unsafe impl aya::Pod for PolicyValue {}
unsafe impl aya::Pod for CtKey {}
unsafe impl aya::Pod for CtValue {}
unsafe impl aya::Pod for BudgetValue {}
unsafe impl aya::Pod for MacValue {}
unsafe impl aya::Pod for ConfigValue {}
unsafe impl aya::Pod for CounterKey {}
unsafe impl aya::Pod for CounterValue {}
unsafe impl aya::Pod for Event {}
unsafe impl aya::Pod for FragKey {}
unsafe impl aya::Pod for SrcguardKey {}
unsafe impl aya::Pod for FragValue {}
unsafe impl aya::Pod for SvcKey {}
unsafe impl aya::Pod for SvcFlowKey {}
unsafe impl aya::Pod for SvcFlowValue {}
unsafe impl aya::Pod for SvcBackend {}

impl Event {
    /// Decode an event from the ring buffer's bytes.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < size_of::<Self>() {
            return None;
        }
        // SAFETY: Event is Pod (every bit pattern valid) and the length was
        // checked; read_unaligned copes with any alignment of the buffer.
        Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<Self>()) })
    }
}

/// The 16-byte form of an address: IPv4 is IPv4-mapped.
pub fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address a 16-byte key field stands for.
pub fn ip_from16(b: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(b);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The LPM prefix length of an address prefix in the 16-byte space.
pub fn prefix16(ip: IpAddr, len: u8) -> u32 {
    match ip {
        IpAddr::V4(_) => 96 + u32::from(len),
        IpAddr::V6(_) => u32::from(len),
    }
}

/// `0.0.0.0` as a convenience for tests.
pub const V4_UNSPECIFIED: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_addresses_round_trip_through_the_mapped_form() {
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let b = addr16(ip);
        assert_eq!(&b[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(ip_from16(b), ip);
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(ip_from16(addr16(v6)), v6);
        assert_eq!(prefix16(ip, 24), 120);
        assert_eq!(prefix16(v6, 64), 64);
    }

    #[test]
    fn drop_reasons_decode_from_counters_and_events() {
        assert_eq!(Reason::from_code(-1), Reason::DropPolicy);
        assert_eq!(Reason::from_counter(Verdict::Deny, 1), Reason::DropPolicy);
        assert_eq!(Reason::from_counter(Verdict::Allow, 1), Reason::NotIsolated);
        assert_eq!(Reason::from_counter(Verdict::Allow, 3), Reason::Established);
    }

    #[test]
    fn verdicts_and_reasons_serialise_as_the_words_users_see() {
        for (v, word) in [
            (Verdict::Allow, "\"allowed\""),
            (Verdict::Deny, "\"denied\""),
            (Verdict::Audit, "\"audit\""),
        ] {
            assert_eq!(serde_json::to_string(&v).unwrap(), word);
            assert_eq!(serde_json::from_str::<Verdict>(word).unwrap(), v);
        }
        for code in i8::MIN..=i8::MAX {
            let r = Reason::from_code(code);
            let text = serde_json::to_string(&r).unwrap();
            assert_eq!(
                serde_json::from_str::<Reason>(&text).unwrap(),
                r,
                "code {code} wrote {text}"
            );
        }
        assert_eq!(
            serde_json::to_string(&Reason::DropPolicy).unwrap(),
            "\"no policy rule allows it\""
        );
        assert_eq!(
            Reason::from_code(-12).to_string(),
            "unknown reason (code -12)"
        );
        // The text builds before the L7 proxy wrote for its reason.
        assert_eq!(
            Reason::from_text("for the DNS proxy, which does not run (fail closed)"),
            Reason::DropNoProxy
        );
    }

    #[test]
    fn words_from_another_version_read_without_failing() {
        assert_eq!(
            serde_json::from_str::<Verdict>("\"rerouted\"").unwrap(),
            Verdict::None
        );
        for text in ["\"unknown reason\"", "\"dropped by a future rule\""] {
            let r: Reason = serde_json::from_str(text).unwrap();
            assert_eq!(r, Reason::Unrecognised, "{text}");
            assert_eq!(serde_json::to_string(&r).unwrap(), "\"unknown reason\"");
        }
        assert_eq!(Verdict::from_word("denied"), Some(Verdict::Deny));
        assert_eq!(Verdict::from_word("deny"), None);
    }

    #[test]
    fn denied_is_worse_than_audit_is_worse_than_allowed() {
        assert!(Verdict::Deny.severity() > Verdict::Audit.severity());
        assert!(Verdict::Audit.severity() > Verdict::Allow.severity());
        assert_eq!(Verdict::Allow.severity(), Verdict::None.severity());
    }
}
