//! A dataplane that records what it is asked to do and keeps the maps in
//! memory, for unit tests of everything above the kernel.

use std::path::PathBuf;

use super::{
    Attachment, CounterRow, Dataplane, DataplaneError, DataplaneStatus, Lookup, LookupAnswer,
    SyncReport,
};
use crate::{
    abi::{self, Direction, ID_ANY, ID_WORLD},
    compile::{Desired, Prefix},
    engine::Delta,
};

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Prepare,
    Attach { ep_id: u32, ifname: String },
    Detach { ifname: String },
    Verify { ifname: String },
    Sync,
    Apply,
    Forget { ep_id: u32 },
}

/// The recording fake.
#[derive(Debug, Default)]
pub struct RecordingDataplane {
    pub calls: Vec<Call>,
    pub maps: Desired,
    pub epoch: u32,
    /// Interfaces whose programs are attached.
    pub attached: Vec<String>,
    /// Make the next attach fail (to test rollback).
    pub fail_attach: bool,
    /// Make the next delta write fail (to test rollback).
    pub fail_apply: bool,
    /// The sync token (`pal_config.sync_token`).
    pub token: u64,
}

impl Dataplane for RecordingDataplane {
    fn prepare(&mut self) -> Result<(), DataplaneError> {
        self.calls.push(Call::Prepare);
        Ok(())
    }

    fn open_existing(&mut self) -> Result<bool, DataplaneError> {
        Ok(true)
    }

    fn attach(
        &mut self,
        ep_id: u32,
        ifname: &str,
        ifindex: u32,
    ) -> Result<Attachment, DataplaneError> {
        self.calls.push(Call::Attach {
            ep_id,
            ifname: ifname.to_owned(),
        });
        if std::mem::take(&mut self.fail_attach) {
            return Err(DataplaneError::Other(format!(
                "injected attach failure on {ifname} ({ifindex})"
            )));
        }
        self.attached.push(ifname.to_owned());
        Ok(Attachment::Tcx {
            from_container: PathBuf::from(format!("/fake/ep{ep_id}-from-container")),
            to_container: PathBuf::from(format!("/fake/ep{ep_id}-to-container")),
        })
    }

    fn detach(&mut self, _att: &Attachment, ifname: &str) -> Result<(), DataplaneError> {
        self.calls.push(Call::Detach {
            ifname: ifname.to_owned(),
        });
        self.attached.retain(|i| i != ifname);
        Ok(())
    }

    fn verify(&self, att: &Attachment, ifname: &str) -> Result<(), DataplaneError> {
        if *att != Attachment::Pending && self.attached.iter().any(|i| i == ifname) {
            Ok(())
        } else {
            Err(DataplaneError::NotAttached {
                ifname: ifname.to_owned(),
                problem: "not attached (fake)".into(),
            })
        }
    }

    fn sync(&mut self, desired: &Desired) -> Result<SyncReport, DataplaneError> {
        self.calls.push(Call::Sync);
        let changed = self.maps != *desired;
        if changed {
            self.maps = desired.clone();
            self.epoch += 1;
        }
        Ok(SyncReport {
            upserted: usize::from(changed),
            deleted: 0,
            epoch: self.epoch,
        })
    }

    fn apply(&mut self, delta: &Delta) -> Result<SyncReport, DataplaneError> {
        self.calls.push(Call::Apply);
        if std::mem::take(&mut self.fail_apply) {
            return Err(DataplaneError::Other("injected map write failure".into()));
        }
        let m = &mut self.maps;
        for (k, v) in &delta.policy {
            match v {
                Some(v) => m.policy.insert(*k, *v),
                None => m.policy.remove(k),
            };
        }
        for (k, v) in &delta.ipcache {
            match v {
                Some(v) => m.ipcache.insert(*k, *v),
                None => m.ipcache.remove(k),
            };
        }
        for (k, v) in &delta.endpoints {
            match v {
                Some(v) => m.endpoints.insert(*k, *v),
                None => m.endpoints.remove(k),
            };
        }
        for (k, add) in &delta.srcguard {
            if *add {
                m.srcguard.insert(*k);
            } else {
                m.srcguard.remove(k);
            }
        }
        if delta.revokes {
            self.epoch += 1;
        }
        Ok(SyncReport {
            upserted: delta.len(),
            deleted: 0,
            epoch: self.epoch,
        })
    }

    fn sync_token(&self) -> Result<u64, DataplaneError> {
        Ok(self.token)
    }

    fn set_sync_token(&mut self, token: u64) -> Result<(), DataplaneError> {
        self.token = token;
        Ok(())
    }

    fn forget_endpoint(&mut self, ep_id: u32) -> Result<(), DataplaneError> {
        self.calls.push(Call::Forget { ep_id });
        Ok(())
    }

    fn sweep_links(&mut self, _keep: &[PathBuf]) -> Result<Vec<PathBuf>, DataplaneError> {
        Ok(Vec::new())
    }

    fn status(&self) -> Result<DataplaneStatus, DataplaneError> {
        Ok(DataplaneStatus {
            epoch: self.epoch,
            ..Default::default()
        })
    }

    fn counters(&self) -> Result<Vec<CounterRow>, DataplaneError> {
        Ok(Vec::new())
    }

    fn lookup(&self, q: &Lookup) -> Result<LookupAnswer, DataplaneError> {
        let a = abi::addr16(q.peer);
        let peer_identity = self
            .maps
            .ipcache
            .iter()
            .filter(|(p, _)| prefix_contains(p, &a))
            .max_by_key(|(p, _)| p.len)
            .map(|(_, v)| v.identity)
            .unwrap_or(ID_WORLD);
        let isolated = self.maps.endpoints.values().any(|v| {
            v.ep_id == q.ep_id
                && v.flags
                    & match q.direction {
                        Direction::Ingress => abi::EP_ISOLATE_INGRESS,
                        Direction::Egress => abi::EP_ISOLATE_EGRESS,
                    }
                    != 0
        });
        let ported = matches!(
            q.protocol,
            abi::PROTO_TCP | abi::PROTO_UDP | abi::PROTO_SCTP
        );
        let port = if ported { q.port } else { 0 };
        let ep_flags = self
            .maps
            .endpoints
            .values()
            .filter(|v| v.ep_id == q.ep_id)
            .fold(0, |f, v| f | v.flags);
        let find = |tier: u8| -> Option<abi::PolicyValue> {
            let peers: &[u32] = if tier == abi::TIER_NETPOL {
                &[peer_identity, ID_ANY]
            } else {
                &[peer_identity]
            };
            peers.iter().find_map(|&peer| {
                self.maps
                    .policy
                    .iter()
                    .filter(|(k, _)| {
                        let d = &k.data;
                        d.ep_id == q.ep_id
                            && d.direction == q.direction as u8
                            && d.tier == tier
                            && d.peer_id == peer
                            && (k.prefixlen == abi::POLICY_PREFIX_ANY_PROTO
                                || (d.protocol == q.protocol && {
                                    let bits = k.prefixlen - abi::POLICY_PREFIX_ANY_PORT;
                                    let mask = if bits == 0 {
                                        0
                                    } else {
                                        u16::MAX << (16 - bits)
                                    };
                                    u16::from_be(d.dport_be) & mask == port & mask
                                }))
                    })
                    .max_by_key(|(k, _)| k.prefixlen)
                    .map(|(_, v)| *v)
            })
        };
        let (entry, tier, allowed) = super::decide_like_the_program(ep_flags, q.direction, find);
        let audit = self.maps.endpoints.values().any(|v| {
            v.ep_id == q.ep_id
                && v.flags
                    & match q.direction {
                        Direction::Ingress => abi::EP_AUDIT_INGRESS,
                        Direction::Egress => abi::EP_AUDIT_EGRESS,
                    }
                    != 0
        });
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

fn prefix_contains(p: &Prefix, a: &[u8; 16]) -> bool {
    (0..p.len as usize).all(|i| (a[i / 8] >> (7 - i % 8)) & 1 == (p.addr[i / 8] >> (7 - i % 8)) & 1)
}
