//! The test bed of palisade's privileged tests and demo: hermetic nodes in
//! network namespaces, a libcni-like chain runner over the real reference
//! plugins, real-traffic probes and connectivity matrices.

pub mod browser;
pub mod case;
pub mod chain;
pub mod cluster;
pub mod dns;
pub mod etcd;
pub mod http;
pub mod kubeapi;
pub mod matrix;
pub mod node;
pub mod probe;
pub mod sys;

/// Where test nodes keep their directories and bpffs mounts.
pub const TEST_ROOT: &str = "/tmp/palisade-tests";
pub mod bpfrun;
pub mod pkt;
pub mod runtimes;
