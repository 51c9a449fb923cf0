//! NetworkPolicy conformance: every case under `testdata/netpol` (the
//! Kubernetes e2e suite's cases and the recipes collection), each on a
//! fresh hermetic node with real traffic, once per address family it lists.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns; a panic fails the test with its location"
)]

use std::path::Path;

use libtest_mimic::{Arguments, Failed, Trial};
use testbed::case::{Case, Run};

fn main() {
    let args = Arguments::from_args();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/netpol");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut trials = Vec::new();
    for path in files {
        let case = match Case::load(&path) {
            Ok(c) => c,
            Err(e) => {
                let name = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                trials.push(Trial::test(format!("{name}::load"), move || {
                    Err(Failed::from(e))
                }));
                continue;
            }
        };
        for v6 in case.families() {
            let case = case.clone();
            let name = format!("{}::ipv{}", case.name, if v6 { 6 } else { 4 });
            trials.push(Trial::test(name, move || {
                let run = Run::start(&case, v6);
                let report = run.run_steps();
                if report.is_empty() {
                    Ok(())
                } else {
                    Err(Failed::from(format!(
                        "{} ({})\n{}\n{report}",
                        case.name, case.source, case.description
                    )))
                }
            }));
        }
    }
    libtest_mimic::run(&args, trials).exit();
}
