//! Reading flow events from the pinned ring buffer, and the clocks that
//! turn their monotonic timestamps into wall-clock time.

use std::{
    os::fd::AsFd,
    path::Path,
    time::{Duration, SystemTime},
};

use aya::maps::{Map, MapData, RingBuf};
use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    time::{ClockId, clock_gettime},
};

use super::DataplaneError;
use crate::abi::Event;

/// The ring buffer the programs write flow events to.
pub struct EventReader {
    ring: RingBuf<MapData>,
    /// Wall clock minus monotonic clock, to date events.
    offset_ns: i128,
}

impl std::fmt::Debug for EventReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventReader").finish_non_exhaustive()
    }
}

impl EventReader {
    /// Open `<bpf root>/maps-v1/pal_events`. Only one reader should drain it
    /// (the agent, or `palisadectl flows` when no agent runs).
    pub fn open(bpf_root: &Path) -> Result<Self, DataplaneError> {
        let path = super::map_pin(bpf_root, "pal_events");
        let data = MapData::from_pin(&path).map_err(|e| DataplaneError::OpenPin {
            what: "flow event ring buffer".into(),
            path: path.clone(),
            source: Box::new(e),
        })?;
        let map = Map::from_map_data(data).map_err(|e| DataplaneError::OpenPin {
            what: "flow event ring buffer".into(),
            path: path.clone(),
            source: Box::new(e),
        })?;
        let ring = RingBuf::try_from(map).map_err(|e| DataplaneError::OpenPin {
            what: "flow event ring buffer".into(),
            path,
            source: Box::new(e),
        })?;
        Ok(Self {
            ring,
            offset_ns: clock_offset_ns(),
        })
    }

    /// Every event waiting now.
    pub fn drain(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if let Some(e) = Event::from_bytes(&item) {
                out.push(e);
            }
        }
        out
    }

    /// Wait until events arrive or `timeout` passes.
    pub fn wait(&self, timeout: Duration) {
        let mut fds = [PollFd::new(self.ring.as_fd(), PollFlags::POLLIN)];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let _ = poll(&mut fds, PollTimeout::from(ms));
    }

    /// When an event happened.
    pub fn wall_time(&self, ts_ns: u64) -> SystemTime {
        let ns = i128::from(ts_ns) + self.offset_ns;
        SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns.max(0)).unwrap_or(0))
    }
}

/// CLOCK_REALTIME - CLOCK_MONOTONIC (bpf_ktime_get_ns is monotonic).
fn clock_offset_ns() -> i128 {
    let ns = |id| {
        clock_gettime(id)
            .map(|t| i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()))
            .unwrap_or(0)
    };
    ns(ClockId::CLOCK_REALTIME) - ns(ClockId::CLOCK_MONOTONIC)
}
