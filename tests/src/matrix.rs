//! Connectivity matrices: probe every ordered pair of peers in parallel,
//! compare with the expectation, and print both whole on a mismatch.

use std::{collections::BTreeMap, fmt, net::IpAddr, path::PathBuf, thread};

use crate::probe::{PROBE_TIMEOUT, Proto, probe};

/// Something that sends and receives probes.
#[derive(Debug, Clone)]
pub struct Peer {
    pub name: String,
    pub netns: PathBuf,
    pub addr: IpAddr,
}

/// Reachability between named peers: `cells[(from, to)]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Matrix {
    pub names: Vec<String>,
    pub cells: BTreeMap<(String, String), bool>,
}

impl Matrix {
    pub fn new(names: &[String]) -> Self {
        Self {
            names: names.to_vec(),
            cells: BTreeMap::new(),
        }
    }

    pub fn set(&mut self, from: &str, to: &str, allowed: bool) {
        self.cells.insert((from.to_owned(), to.to_owned()), allowed);
    }

    pub fn get(&self, from: &str, to: &str) -> Option<bool> {
        self.cells.get(&(from.to_owned(), to.to_owned())).copied()
    }

    /// Cells where `self` (observed) differs from `expected`.
    pub fn diff(&self, expected: &Matrix) -> Vec<(String, String, bool, bool)> {
        expected
            .cells
            .iter()
            .filter_map(|((f, t), want)| {
                let got = self.get(f, t)?;
                (got != *want).then(|| (f.clone(), t.clone(), *want, got))
            })
            .collect()
    }
}

impl fmt::Display for Matrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = self.names.iter().map(String::len).max().unwrap_or(4).max(4);
        write!(f, "{:w$}", "from\\to")?;
        for n in &self.names {
            write!(f, " {n:>w$}")?;
        }
        writeln!(f)?;
        for from in &self.names {
            write!(f, "{from:w$}")?;
            for to in &self.names {
                let c = match self.get(from, to) {
                    Some(true) => ".",
                    Some(false) => "X",
                    None => "-",
                };
                write!(f, " {c:>w$}")?;
            }
            writeln!(f)?;
        }
        write!(f, "(. reachable, X blocked, - not probed)")
    }
}

/// Probe every ordered pair (from != to) in parallel.
pub fn probe_all(peers: &[Peer], proto: Proto, port: u16) -> Matrix {
    let names: Vec<String> = peers.iter().map(|p| p.name.clone()).collect();
    let pairs: Vec<(&Peer, &Peer)> = peers
        .iter()
        .flat_map(|a| peers.iter().map(move |b| (a, b)))
        .filter(|(a, b)| a.name != b.name && !(a.name == "world" && b.name == "world"))
        .collect();
    probe_pairs(&names, &pairs, proto, port)
}

/// Probe the given pairs in parallel.
pub fn probe_pairs(names: &[String], pairs: &[(&Peer, &Peer)], proto: Proto, port: u16) -> Matrix {
    let mut m = Matrix::new(names);
    let results: Vec<(String, String, bool)> = thread::scope(|s| {
        let handles: Vec<_> = pairs
            .iter()
            .map(|(a, b)| {
                s.spawn(move || {
                    let ok = probe(&a.netns, b.addr, proto, port, PROBE_TIMEOUT);
                    (a.name.clone(), b.name.clone(), ok)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("probe thread"))
            .collect()
    });
    for (f, t, ok) in results {
        m.set(&f, &t, ok);
    }
    m
}

/// Probe, and where an expected-reachable pair looks blocked, probe it
/// again (twice at most) before believing it: the Kubernetes e2e suite
/// retries the same way. A pair expected blocked that answers even once is
/// a failure.
pub fn probe_against(peers: &[Peer], proto: Proto, port: u16, expected: &Matrix) -> Matrix {
    let mut observed = probe_all(peers, proto, port);
    for _ in 0..2 {
        let retry: Vec<(&Peer, &Peer)> = observed
            .diff(expected)
            .iter()
            .filter(|(_, _, want, _)| *want)
            .filter_map(|(f, t, _, _)| {
                let a = peers.iter().find(|p| &p.name == f)?;
                let b = peers.iter().find(|p| &p.name == t)?;
                Some((a, b))
            })
            .collect();
        if retry.is_empty() {
            break;
        }
        let again = probe_pairs(&observed.names, &retry, proto, port);
        for (k, v) in again.cells {
            if v {
                observed.cells.insert(k, true);
            }
        }
    }
    observed
}
