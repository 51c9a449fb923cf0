//! Fault points, for the crash-consistency tests: a named place in a
//! multi-step change (between the maps and the store, between two links,
//! between detaching and forgetting) where a test can make the process die
//! with SIGKILL, as a power cut or an OOM kill would.
//!
//! Compiled in only with the `fault-injection` feature (the test suite's
//! builds; release packages are built without it), and even then inert
//! unless the environment asks:
//!
//! - `PALISADE_FAULT=NAME` kills the process at the first pass through
//!   point NAME; `PALISADE_FAULT=NAME#N` at the N-th.
//! - `PALISADE_FAULT_TRACE=FILE` appends `NAME#N` to FILE at every pass, so
//!   a test learns the steps of an operation and then kills it at each.

/// Pass fault point `name` (a no-op unless the feature and the environment
/// ask for a fault or a trace).
#[inline]
pub fn point(name: &'static str) {
    #[cfg(feature = "fault-injection")]
    imp::point(name);
    #[cfg(not(feature = "fault-injection"))]
    let _ = name;
}

#[cfg(feature = "fault-injection")]
mod imp {
    use std::{
        collections::HashMap,
        io::Write,
        path::PathBuf,
        sync::{Mutex, OnceLock},
    };

    pub const FAULT_ENV: &str = "PALISADE_FAULT";
    pub const TRACE_ENV: &str = "PALISADE_FAULT_TRACE";

    #[derive(Debug)]
    struct Plan {
        kill: Option<(String, u32)>,
        trace: Option<PathBuf>,
        passes: Mutex<HashMap<&'static str, u32>>,
    }

    fn plan() -> &'static Plan {
        static PLAN: OnceLock<Plan> = OnceLock::new();
        PLAN.get_or_init(|| Plan {
            kill: std::env::var(FAULT_ENV)
                .ok()
                .filter(|s| !s.is_empty())
                .map(|s| match s.split_once('#') {
                    Some((name, n)) => (name.to_owned(), n.parse().unwrap_or(1)),
                    None => (s, 1),
                }),
            trace: std::env::var_os(TRACE_ENV).map(PathBuf::from),
            passes: Mutex::new(HashMap::new()),
        })
    }

    pub fn point(name: &'static str) {
        let plan = plan();
        if plan.kill.is_none() && plan.trace.is_none() {
            return;
        }
        let pass = {
            let mut passes = plan.passes.lock().unwrap_or_else(|p| p.into_inner());
            let n = passes.entry(name).or_insert(0);
            *n += 1;
            *n
        };
        if let Some(path) = &plan.trace {
            // One write per line with O_APPEND: lines of concurrent
            // processes do not interleave.
            let line = format!("{name}#{pass}\n");
            let _ = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(line.as_bytes()));
        }
        if plan
            .kill
            .as_ref()
            .is_some_and(|(k, n)| k == name && *n == pass)
        {
            // SIGKILL cannot be caught: no destructor, no unwinding, no
            // flush; the process stops here as if the power went.
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }
}
