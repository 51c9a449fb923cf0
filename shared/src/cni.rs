//! Wire types of the CNI contract (spec 1.1.0, accepting configurations of
//! 0.3.0 to 1.1.0): the network configuration palisade receives on stdin,
//! the parts of a previous result it reads, error output and VERSION.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::policy::Labels;

/// The spec version palisade speaks.
pub const SPEC_VERSION: &str = "1.1.0";
/// Every configuration version palisade accepts.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Well-known error codes (CNI spec, "Error" section).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const NOT_AVAILABLE_DEGRADED: u32 = 51;
    /// palisade's own (100+ are plugin-specific): enforcement is not in
    /// place (programs detached, endpoint unknown to CHECK).
    pub const NOT_ENFORCING: u32 = 100;
}

/// A CNI error, printed as JSON on stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            cni_version: SPEC_VERSION.to_owned(),
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

/// A `key`/`value` pair of the `args.cni.labels` convention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelArg {
    pub key: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniArgs {
    #[serde(default)]
    pub labels: Vec<LabelArg>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Args {
    #[serde(default)]
    pub cni: Option<CniArgs>,
}

/// One entry of `cni.dev/valid-attachments` (GC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The network configuration palisade receives. Unknown fields are kept
/// out of the way: other plugins' settings share the document.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    #[serde(default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(default)]
    pub args: Option<Args>,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<ValidAttachment>>,

    // palisade's own settings (all optional).
    /// Where objects, endpoints and identities are stored.
    pub state_dir: Option<PathBuf>,
    /// Where maps, programs and links are pinned (on bpffs).
    pub bpf_root: Option<PathBuf>,
    /// Let containers start unprotected when enforcement fails (default
    /// false: ADD fails, the container does not start).
    pub fail_open: Option<bool>,
    /// `auto` (default), `tcx` or `netlink`.
    pub attach_mode: Option<String>,
    /// The node daemon's socket (default: `palisade.sock` in the state
    /// directory); without a daemon there, the plugin does the work itself.
    pub socket: Option<PathBuf>,
    /// Labels every endpoint of this network gets (before args and Pod
    /// objects).
    pub labels: Option<BTreeMap<String, String>>,
    /// Cluster mode: how long ADD waits for the agent to have the pod's
    /// object from the API server before it fails (default 5).
    pub pod_wait_seconds: Option<f64>,
    /// Capacities of the datapath's maps (setting name → entries; see
    /// `MapSizes`), used when the maps are created; ADD refuses maps that
    /// were created with others.
    pub map_sizes: Option<BTreeMap<String, u64>>,
    /// This network belongs to a Kubernetes cluster whose agent runs
    /// palisade in cluster mode: ADD waits for Pod objects even before
    /// the agent has started (the DaemonSet installs the plugin with it).
    pub kubernetes: Option<bool>,
}

/// How long ADD waits for a Pod object in cluster mode by default.
pub const DEFAULT_POD_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl NetConf {
    pub fn arg_labels(&self) -> Labels {
        let mut out = self.labels.clone().unwrap_or_default();
        if let Some(cni) = self.args.as_ref().and_then(|a| a.cni.as_ref()) {
            for l in &cni.labels {
                out.insert(l.key.clone(), l.value.clone());
            }
        }
        out
    }
}

/// An interface of a result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ResultInterface {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub mac: String,
    #[serde(default)]
    pub sandbox: String,
}

/// An address of a result; `interface` indexes `interfaces`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ResultIp {
    pub address: String,
    #[serde(default)]
    pub interface: Option<usize>,
}

/// The parts of a previous result palisade reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct PrevResult {
    #[serde(default)]
    pub interfaces: Vec<ResultInterface>,
    #[serde(default)]
    pub ips: Vec<ResultIp>,
}

impl PrevResult {
    /// Names of host-side interfaces (those without a sandbox).
    pub fn host_interfaces(&self) -> Vec<&str> {
        self.interfaces
            .iter()
            .filter(|i| i.sandbox.is_empty() && !i.name.is_empty())
            .map(|i| i.name.as_str())
            .collect()
    }

    /// Addresses of the container interface `ifname`; when the result does
    /// not say which interface an address is on, every address.
    pub fn container_addresses(&self, ifname: &str) -> Result<Vec<IpAddr>, String> {
        let mut out = Vec::new();
        for ip in &self.ips {
            let on_it = match ip.interface.and_then(|i| self.interfaces.get(i)) {
                Some(iface) => iface.name == ifname && !iface.sandbox.is_empty(),
                None => true,
            };
            if !on_it {
                continue;
            }
            let addr = ip.address.split('/').next().unwrap_or_default();
            let parsed: IpAddr = addr.parse().map_err(|_| {
                format!(
                    "prevResult.ips: {:?} is not an address in CIDR form",
                    ip.address
                )
            })?;
            out.push(parsed);
        }
        Ok(out)
    }
}

/// The VERSION answer.
pub fn version_json() -> Value {
    serde_json::json!({
        "cniVersion": SPEC_VERSION,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

/// Whether a configuration version is at least `major.minor.patch`.
pub fn version_at_least(v: &str, min: (u32, u32, u32)) -> bool {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let got = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    got >= min
}

/// `CNI_ARGS`: `K=V;K2=V2`.
pub fn parse_cni_args(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("CNI_ARGS: {pair:?} is not KEY=VALUE"))?;
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_results_name_the_host_veth_and_the_container_addresses() {
        // As printed by the reference bridge plugin (1.0.0).
        let prev: PrevResult = serde_json::from_value(serde_json::json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"},
                {"name": "veth1234", "mac": "aa:bb:cc:dd:ee:00"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:01", "sandbox": "/run/netns/c1"}
            ],
            "ips": [
                {"interface": 2, "address": "10.22.0.5/16", "gateway": "10.22.0.1"},
                {"interface": 2, "address": "fd00::5/64", "gateway": "fd00::1"}
            ],
            "dns": {}
        }))
        .unwrap();
        assert_eq!(prev.host_interfaces(), vec!["cni0", "veth1234"]);
        assert_eq!(
            prev.container_addresses("eth0").unwrap(),
            vec![
                "10.22.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert!(prev.container_addresses("eth1").unwrap().is_empty());
    }

    #[test]
    fn netconf_reads_labels_and_settings_and_ignores_other_plugins_fields() {
        let conf: NetConf = serde_json::from_value(serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "net",
            "type": "palisade",
            "stateDir": "/tmp/s",
            "failOpen": true,
            "ipam": {"type": "host-local"},
            "labels": {"tier": "base", "app": "x"},
            "args": {"cni": {"labels": [{"key": "app", "value": "web"}]}}
        }))
        .unwrap();
        assert_eq!(conf.fail_open, Some(true));
        let labels = conf.arg_labels();
        assert_eq!(labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(labels.get("tier").map(String::as_str), Some("base"));
    }

    #[test]
    fn cni_args_and_versions_parse() {
        let a =
            parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1").unwrap();
        assert_eq!(a["K8S_POD_NAME"], "web-1");
        assert!(parse_cni_args("oops").is_err());
        assert!(version_at_least("1.1.0", (0, 4, 0)));
        assert!(!version_at_least("0.3.1", (0, 4, 0)));
    }
}
