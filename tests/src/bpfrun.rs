//! The real tc programs run through BPF_PROG_TEST_RUN on crafted packets,
//! with their maps programmed by the real compiler: no veth, no traffic
//! leaves the test. The kernel runs test packets as if they arrived on the
//! test process's loopback device, so the endpoint under test is keyed by
//! ifindex 1.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use palisade::{
    abi::Direction,
    compile::{self, Desired, EndpointView},
    dataplane::{
        AttachMode, CounterRow, Dataplane,
        kernel::{FROM_CONTAINER, KernelDataplane, TO_CONTAINER},
    },
    identity::IdentityTable,
    policy::{NamespaceMap, Object, Policy, parse_documents},
};

use crate::sys;

/// What a program returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// TC_ACT_UNSPEC / TCX_NEXT: no objection.
    Pass,
    /// TC_ACT_SHOT.
    Drop,
    Other(u32),
}

/// The ifindex the kernel reports for test-run packets (loopback).
pub const TEST_IFINDEX: u32 = 1;

/// The datapath loaded into a private bpffs.
#[derive(Debug)]
pub struct Datapath {
    dir: PathBuf,
    mount: PathBuf,
    pub dp: KernelDataplane,
    from: SchedClassifier,
    to: SchedClassifier,
    ids: IdentityTable,
}

impl Datapath {
    pub fn new() -> Self {
        Self::with_sizes(None)
    }

    /// Like [`Datapath::new`], creating the maps with these capacities.
    pub fn with_sizes(sizes: Option<palisade::dataplane::MapSizes>) -> Self {
        sys::require_root();
        sys::sweep_stale();
        let dir = PathBuf::from(crate::TEST_ROOT).join(sys::unique_prefix());
        let mount = dir.join("bpf");
        std::fs::create_dir_all(&mount).expect("create test dir");
        nix::mount::mount(
            Some("bpf"),
            &mount,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mount bpffs at {}: {e}", mount.display()));
        let mut dp =
            KernelDataplane::new(mount.join("palisade"), AttachMode::Auto).with_sizes(sizes);
        dp.prepare()
            .unwrap_or_else(|e| panic!("load the datapath: {e:#?}"));
        let from = SchedClassifier::from_pin(dp.program_pin(&FROM_CONTAINER))
            .expect("open from_container");
        let to =
            SchedClassifier::from_pin(dp.program_pin(&TO_CONTAINER)).expect("open to_container");
        Self {
            dir,
            mount,
            dp,
            from,
            to,
            ids: IdentityTable::default(),
        }
    }

    /// Compile `yaml` (NetworkPolicies, AdminNetworkPolicies,
    /// BaselineAdminNetworkPolicies, ClusterNetworkPolicies; ids in document
    /// order from 1) for `endpoints` and load the maps.
    pub fn program(&mut self, yaml: &str, endpoints: &[EndpointView], host: &[IpAddr]) -> Desired {
        let mut policies: Vec<(u32, Policy)> = Vec::new();
        let mut tier_policies = Vec::new();
        if !yaml.trim().is_empty() {
            let objects = parse_documents(yaml, "test").expect("policy YAML");
            for (i, o) in objects.into_iter().enumerate() {
                let id = i as u32 + 1;
                match o {
                    Object::NetworkPolicy(np) => policies.push((id, np.value)),
                    Object::TierPolicy(t) => {
                        let mut p = t.value;
                        p.mode = Some(p.mode.unwrap_or_default());
                        tier_policies.push((id, p));
                    }
                    other => panic!("not a policy: {other:?}"),
                }
            }
        }
        let ns = NamespaceMap::new();
        let compiled = compile::compile(
            &compile::Input {
                namespaces: &ns,
                policies: &policies,
                endpoints,
                host_addresses: host,
                node_addresses: &[],
                tier_policies: &tier_policies,
            },
            &mut self.ids,
        );
        self.dp.sync(&compiled.desired).expect("sync maps");
        compiled.desired
    }

    /// Load exactly these map contents.
    pub fn load(&mut self, desired: &Desired) {
        self.dp.sync(desired).expect("sync maps");
    }

    fn prog(&self, dir: Direction) -> &SchedClassifier {
        match dir {
            Direction::Egress => &self.from,
            Direction::Ingress => &self.to,
        }
    }

    /// Run one frame through the program for `dir`.
    pub fn run(&self, dir: Direction, frame: &[u8]) -> Verdict {
        let r = self
            .prog(dir)
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat: 1,
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"));
        match r.return_value {
            u32::MAX => Verdict::Pass,
            2 => Verdict::Drop,
            other => Verdict::Other(other),
        }
    }

    /// Run a frame `repeat` times in the kernel; the mean time per run.
    pub fn time(&self, dir: Direction, frame: &[u8], repeat: u32) -> Duration {
        let r = self
            .prog(dir)
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat,
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"));
        r.duration
    }

    pub fn counters(&self) -> Vec<CounterRow> {
        self.dp.counters().expect("read counters")
    }
}

impl Default for Datapath {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.mount, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An endpoint view for tests.
pub fn endpoint(
    ep_id: u32,
    ifindex: u32,
    ns: &str,
    labels: &[(&str, &str)],
    addrs: &[&str],
) -> EndpointView {
    EndpointView {
        ep_id,
        ifindex,
        namespace: ns.into(),
        name: format!("ep{ep_id}"),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ports: Vec::new(),
        addresses: addrs.iter().map(|a| a.parse().expect("address")).collect(),
        extra_flags: 0,
        remote: false,
    }
}
