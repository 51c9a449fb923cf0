//! `palisade`: the chained CNI plugin. Reads the CNI environment and the
//! network configuration, calls the library, and prints either the previous
//! result (ADD), nothing (DEL, CHECK, GC, STATUS), the VERSION answer, or a
//! CNI error object with the spec's code.

use std::{
    env,
    io::{self, Read, Write},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use palisade::{
    cni::{self, CniError, NetConf, PrevResult, code},
    daemon::{Control, NodeOps, Paths},
    dataplane::{AttachMode, DEFAULT_BPF_ROOT, MapSizes, check_map_sizes},
    netlink, netns,
    node::{AddOutcome, NewEndpoint, NodeError, stale_refs},
    policy::DEFAULT_NAMESPACE,
    store::{DEFAULT_STATE_DIR, Endpoint, Source},
};
use serde_json::Value;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PALISADE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .without_time()
        .init();

    let (out, ok) = match run() {
        Ok(Some(v)) => (Some(v), true),
        Ok(None) => (None, true),
        Err(e) => (serde_json::to_value(&e).ok(), false),
    };
    if let Some(v) = out {
        let mut stdout = io::stdout().lock();
        let written = serde_json::to_writer(&mut stdout, &v)
            .map_err(io::Error::from)
            .and_then(|()| stdout.write_all(b"\n"));
        if written.is_err() {
            return ExitCode::FAILURE;
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn env_var(name: &str) -> Option<String> {
    env::var(name).ok().filter(|v| !v.is_empty())
}

fn require_env(name: &str, what: &str) -> Result<String, CniError> {
    env_var(name).ok_or_else(|| {
        CniError::new(
            code::INVALID_ENV,
            format!("{name} is not set; the runtime must pass {what}"),
        )
    })
}

/// Map a node error to the CNI code a runtime can act on.
fn node_error(e: NodeError, doing: &str) -> CniError {
    let code = if e.is_busy() {
        code::TRY_AGAIN_LATER
    } else {
        code::IO_FAILURE
    };
    CniError::new(code, format!("{doing}: {e}"))
        .with_details(format!("{:#}", anyhow::Error::from(e)))
}

fn run() -> Result<Option<Value>, CniError> {
    let command = env_var("CNI_COMMAND").ok_or_else(|| {
        CniError::new(
            code::INVALID_ENV,
            "CNI_COMMAND is not set: palisade is a CNI plugin, run by a container runtime \
             (try CNI_COMMAND=VERSION palisade)",
        )
    })?;
    if command == "VERSION" {
        return Ok(Some(cni::version_json()));
    }

    let mut input = Vec::new();
    io::stdin().read_to_end(&mut input).map_err(|e| {
        CniError::new(
            code::IO_FAILURE,
            format!("read the network configuration from stdin: {e}"),
        )
    })?;
    // Stdin that is not UTF-8 is a decode error, even where the bad bytes
    // are in a field palisade does not read (JSON is UTF-8, RFC 8259).
    let input = std::str::from_utf8(&input).map_err(|e| {
        CniError::new(
            code::DECODE_FAILURE,
            format!("the network configuration on stdin is not UTF-8: {e}"),
        )
    })?;
    let conf: NetConf = serde_json::from_str(input).map_err(|e| {
        CniError::new(
            code::DECODE_FAILURE,
            format!("the network configuration on stdin is not valid JSON: {e}"),
        )
    })?;
    if !cni::SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {:?} is not supported; use one of {}",
                conf.cni_version,
                cni::SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    if conf.name.is_empty() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "the network configuration has no \"name\"",
        ));
    }
    let mode = match conf.attach_mode.as_deref() {
        None => AttachMode::Auto,
        Some(m) => AttachMode::parse(m).ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("attachMode {m:?} is not one of auto, tcx, netlink"),
            )
        })?,
    };
    let state_dir = conf
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let bpf_root = conf
        .bpf_root
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BPF_ROOT));
    let map_sizes = conf
        .map_sizes
        .as_ref()
        .map(|m| MapSizes::with(m.iter().map(|(k, v)| (k.as_str(), *v))))
        .transpose()
        .map_err(|e| CniError::new(code::INVALID_CONFIG, e))?;
    if let (Some(sizes), "ADD" | "CHECK") = (&map_sizes, command.as_str()) {
        // Also when a daemon does the work: the maps must be what this
        // network's configuration says.
        // (Maps that hold nothing yet are created again with these.)
        if let Err(e) = check_map_sizes(&bpf_root, sizes)
            && !palisade::dataplane::kernel::datapath_unused(&bpf_root)
        {
            return Err(CniError::new(code::INVALID_CONFIG, e.to_string()));
        }
    }
    let mut node = Control::open(&Paths {
        state_dir,
        bpf_root,
        socket: conf.socket.clone(),
        attach_mode: mode,
        map_sizes,
    })
    .map_err(|e| node_error(e, "reach the palisade daemon"))?;

    match command.as_str() {
        "ADD" => add(&conf, &mut node).map(Some),
        "DEL" => del(&conf, &mut node).map(|()| None),
        "CHECK" => check(&conf, &mut node).map(|()| None),
        "GC" => gc(&conf, &mut node).map(|()| None),
        "STATUS" => status(&mut node).map(|()| None),
        other => Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_COMMAND={other} is not one of ADD, DEL, CHECK, GC, STATUS, VERSION"),
        )),
    }
}

fn prev_result(conf: &NetConf, command: &str) -> Result<(Value, PrevResult), CniError> {
    let raw = conf.prev_result.clone().filter(|v| !v.is_null()).ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            format!(
                "{command} got no prevResult: palisade is a chained plugin; list it after the plugin that \
                 creates the container's interface (bridge, flannel, calico, ...) in a conflist"
            ),
        )
    })?;
    let parsed: PrevResult = serde_json::from_value(raw.clone()).map_err(|e| {
        CniError::new(
            code::DECODE_FAILURE,
            format!("prevResult is not a CNI result: {e}"),
        )
    })?;
    Ok((raw, parsed))
}

/// In cluster mode, wait (bounded) until the agent has stored the pod's
/// object from the API server: its labels decide the pod's identity. The
/// plugin never asks the API server itself.
fn wait_for_pod(
    conf: &NetConf,
    state_dir: &Path,
    namespace: &str,
    name: &str,
) -> Result<(), CniError> {
    let store = palisade::store::Store::new(state_dir);
    let io = |e: palisade::store::StoreError| {
        CniError::new(code::IO_FAILURE, format!("read the palisade store: {e}"))
    };
    let node = match store
        .setting(palisade::cluster::CLUSTER_NODE_SETTING)
        .map_err(io)?
    {
        Some(node) => node,
        None if conf.kubernetes == Some(true) => "(its agent has not started yet)".to_owned(),
        None => return Ok(()),
    };
    let limit = match conf.pod_wait_seconds {
        Some(s) if s.is_finite() && s >= 0.0 => Duration::from_secs_f64(s),
        Some(s) => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("podWaitSeconds {s} is not a number of seconds >= 0"),
            ));
        }
        None => cni::DEFAULT_POD_WAIT,
    };
    let start = Instant::now();
    let mut pause = Duration::from_millis(10);
    loop {
        if store.has_pod(namespace, name).map_err(io)? {
            if !start.elapsed().is_zero() {
                tracing::info!(
                    "waited {} ms for the agent to learn Pod {namespace}/{name}",
                    start.elapsed().as_millis()
                );
            }
            return Ok(());
        }
        if start.elapsed() >= limit {
            return Err(CniError::new(
                code::NOT_ENFORCING,
                format!(
                    "Pod {namespace}/{name} is not known to the palisade agent of node {node} after \
                     {limit:?}: its labels decide its policy, so it does not start unprotected. Is \
                     the agent running and connected to the API server (`palisadectl status`), and \
                     does the pod exist (`kubectl -n {namespace} get pod {name}`)? The wait is the \
                     plugin setting podWaitSeconds."
                ),
            ));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Namespace and name from CNI_ARGS, and whether Kubernetes gave both.
fn pod_identity(container_id: &str) -> Result<(String, String, bool), CniError> {
    let args = env_var("CNI_ARGS").unwrap_or_default();
    let args = cni::parse_cni_args(&args).map_err(|e| CniError::new(code::INVALID_ENV, e))?;
    let namespace = args
        .get("K8S_POD_NAMESPACE")
        .filter(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
    let name = args
        .get("K8S_POD_NAME")
        .filter(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| container_id.to_owned());
    let k8s = ["K8S_POD_NAMESPACE", "K8S_POD_NAME"]
        .iter()
        .all(|k| args.get(*k).is_some_and(|v| !v.is_empty()));
    Ok((namespace, name, k8s))
}

fn add(conf: &NetConf, node: &mut Control) -> Result<Value, CniError> {
    let container_id = require_env("CNI_CONTAINERID", "the container id")?;
    let ifname = require_env("CNI_IFNAME", "the container's interface name")?;
    let netns = require_env("CNI_NETNS", "the container's network namespace")?;
    let (mut raw, prev) = prev_result(conf, "ADD")?;
    let (namespace, name, k8s) = pod_identity(&container_id)?;
    let state_dir = conf
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));

    let mut enforce = || -> Result<AddOutcome, CniError> {
        if k8s {
            wait_for_pod(conf, &state_dir, &namespace, &name)?;
        }
        let links = netlink::list_links().map_err(|e| {
            CniError::new(code::IO_FAILURE, format!("list the host's interfaces: {e}"))
        })?;
        let veth = netns::find_host_veth(&prev, Some(Path::new(&netns)), &ifname, &links)
            .map_err(|e| CniError::new(code::INVALID_CONFIG, e.to_string()))?;
        let mut addresses = prev
            .container_addresses(&ifname)
            .map_err(|e| CniError::new(code::DECODE_FAILURE, e))?;
        if addresses.is_empty() {
            addresses = netns::container_addresses(Path::new(&netns), &ifname)
                .map_err(|e| CniError::new(code::IO_FAILURE, e.to_string()))?;
        }
        let host_addresses = netns::host_addresses().map_err(|e| {
            CniError::new(code::IO_FAILURE, format!("list the node's addresses: {e}"))
        })?;
        node.add_endpoint(NewEndpoint {
            source: Source::Cni,
            network: conf.name.clone(),
            container_id: container_id.clone(),
            ifname: ifname.clone(),
            namespace: namespace.clone(),
            name: name.clone(),
            labels: conf.arg_labels(),
            netns: netns.clone(),
            host_ifname: veth.ifname,
            host_ifindex: veth.ifindex,
            addresses,
            host_addresses: Some(host_addresses),
            netns_inode: std::fs::metadata(&netns)
                .ok()
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m)),
            k8s,
            mac: netns::container_mac(Path::new(&netns), &ifname)
                .map_err(|e| CniError::new(code::IO_FAILURE, e.to_string()))?,
        })
        .map_err(|e| node_error(e, &format!("enforce policy on {namespace}/{name}")))
    };
    match enforce() {
        Ok(AddOutcome::Added(ep)) => tracing::info!(
            "endpoint {} ({}/{}) enforced on {} ({})",
            ep.id,
            ep.namespace,
            ep.name,
            ep.host_ifname,
            ep.attachment.mode_name()
        ),
        Ok(AddOutcome::AlreadyManaged(ep)) => tracing::info!(
            "{} is already enforced as endpoint {} (registered by the OCI hook); leaving it alone",
            ep.host_ifname,
            ep.id
        ),
        Err(e) if conf.fail_open == Some(true) && e.code != code::TRY_AGAIN_LATER => {
            tracing::warn!(
                "failOpen is set: {namespace}/{name} starts WITHOUT palisade enforcement: {e}"
            );
        }
        Err(e) => return Err(e),
    }
    // The previous result, unchanged, in the version the runtime asked for.
    if let Some(obj) = raw.as_object_mut() {
        obj.insert("cniVersion".into(), Value::String(conf.cni_version.clone()));
    }
    Ok(raw)
}

fn del(conf: &NetConf, node: &mut Control) -> Result<(), CniError> {
    let container_id = require_env("CNI_CONTAINERID", "the container id")?;
    let ifname = require_env("CNI_IFNAME", "the container's interface name")?;
    let key = Endpoint::key_for(&conf.name, &container_id, &ifname);
    match node.remove_endpoint(&key) {
        Ok(Some(ep)) => tracing::info!("endpoint {} removed", ep.id),
        Ok(None) => tracing::info!("DEL of {key}: nothing to remove"),
        Err(e) => return Err(node_error(e, &format!("remove endpoint {key}"))),
    }
    Ok(())
}

fn check(conf: &NetConf, node: &mut Control) -> Result<(), CniError> {
    if !cni::version_at_least(&conf.cni_version, (0, 4, 0)) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "CHECK needs cniVersion 0.4.0 or later, got {}",
                conf.cni_version
            ),
        ));
    }
    let container_id = require_env("CNI_CONTAINERID", "the container id")?;
    let ifname = require_env("CNI_IFNAME", "the container's interface name")?;
    prev_result(conf, "CHECK")?;
    let key = Endpoint::key_for(&conf.name, &container_id, &ifname);
    node.node.check_endpoint(&key).map_err(|e| match e {
        NodeError::NotFound(m) => CniError::new(code::NOT_ENFORCING, m),
        NodeError::Dataplane(d) => CniError::new(
            code::NOT_ENFORCING,
            format!("endpoint {key} is not protected: {d}; delete and re-create the container"),
        ),
        other => node_error(other, &format!("check endpoint {key}")),
    })?;
    Ok(())
}

fn gc(conf: &NetConf, node: &mut Control) -> Result<(), CniError> {
    let valid = conf.valid_attachments.clone().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "GC needs \"cni.dev/valid-attachments\" in the configuration",
        )
    })?;
    let network = conf.name.clone();
    let state = node
        .node
        .store
        .read()
        .map_err(|e| node_error(e.into(), "read palisade's state"))?;
    let stale = stale_refs(&state, |e| {
        e.source == Source::Cni
            && e.network == network
            && !valid
                .iter()
                .any(|v| v.container_id == e.container_id && v.ifname == e.ifname)
    });
    let removed = node
        .remove_endpoints(&stale)
        .map_err(|e| node_error(e, "garbage-collect endpoints"))?;
    node.node.sweep();
    for ep in removed {
        tracing::info!(
            "GC removed stale endpoint {} ({}/{})",
            ep.key(),
            ep.namespace,
            ep.name
        );
    }
    Ok(())
}

fn status(node: &mut Control) -> Result<(), CniError> {
    node.node.store.read().map_err(|e| {
        CniError::new(
            code::NOT_AVAILABLE,
            format!("palisade cannot read its state: {e}"),
        )
    })?;
    node.node.dataplane.ready().map_err(|e| {
        CniError::new(
            code::NOT_AVAILABLE,
            format!("palisade cannot enforce on new containers: {e}"),
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Duration};

    use palisade::{node::NodeError, store::StoreError};

    use super::*;

    #[test]
    fn a_busy_store_maps_to_try_again_later_and_kernel_failures_to_io() {
        let busy = NodeError::Store(StoreError::LockTimeout {
            path: PathBuf::from("/var/lib/palisade/lock"),
            waited: Duration::from_secs(30),
        });
        let e = node_error(busy, "enforce policy on default/web");
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
        assert!(e.msg.contains("try again later"), "{}", e.msg);
        let kernel = NodeError::Dataplane(palisade::dataplane::DataplaneError::Other(
            "attach failed".into(),
        ));
        assert_eq!(node_error(kernel, "x").code, code::IO_FAILURE);
    }
}
