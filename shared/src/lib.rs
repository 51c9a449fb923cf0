//! The palisade library: everything the CNI plugin, the OCI hook and
//! `palisadectl` share. Pure parts (policy model, identities, compiler) are
//! separate from the one module that touches the kernel (`dataplane`).

pub mod abi;
pub mod cluster;
pub mod cni;
pub mod cniconf;
pub mod compile;
pub mod console;
pub mod daemon;
pub mod dataplane;
pub mod dnsproxy;
pub mod engine;
pub mod explain;
pub mod fault;
pub mod flows;
pub mod fqdn;
pub mod graph;
pub mod identity;
pub mod l7;
pub mod learn;
pub mod netlink;
pub mod netns;
pub mod node;
pub mod oci;
pub mod policy;
pub mod store;
pub mod tiers;
