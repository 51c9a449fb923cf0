//! `palisade-hook`: palisade's OCI runtime hook, for containers whose
//! network no CNI chain with palisade set up (Podman with netavark, Docker,
//! plain runc or containerd).
//!
//! As a hook it reads the OCI state on stdin: at `createRuntime` (or
//! `prestart`) it registers every veth of the container and attaches the
//! programs before the container's process runs; at `poststop` it forgets
//! the container. `palisade-hook inject SPEC` adds these hooks to an OCI
//! spec (containerd's base_runtime_spec, `ctr run --config`).

use std::{
    io::{self, Read},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use palisade::{
    daemon::{Control, Paths},
    dataplane::{AttachMode, DEFAULT_BPF_ROOT},
    oci::{self, Stage},
    store::DEFAULT_STATE_DIR,
};

#[derive(Debug, Clone, Args)]
struct HookOptions {
    /// Where palisade keeps objects, endpoints and identities.
    #[arg(long, env = "PALISADE_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Where palisade pins maps, programs and links (on bpffs).
    #[arg(long, env = "PALISADE_BPF_ROOT", default_value = DEFAULT_BPF_ROOT)]
    bpf_root: PathBuf,
    /// auto, tcx or netlink.
    #[arg(long, env = "PALISADE_ATTACH_MODE", default_value = "auto")]
    attach_mode: String,
    /// The node daemon's socket (default: palisade.sock in the state
    /// directory); without a daemon there the hook does the work itself.
    #[arg(long, env = "PALISADE_SOCKET")]
    socket: Option<PathBuf>,
    /// Let the container start even when palisade cannot enforce (default:
    /// the hook fails and the runtime refuses to start the container).
    #[arg(long, env = "PALISADE_FAIL_OPEN")]
    fail_open: bool,
}

impl HookOptions {
    /// The same options as arguments, for hooks palisade injects.
    fn as_args(&self) -> Vec<String> {
        let mut v = vec![
            format!("--state-dir={}", self.state_dir.display()),
            format!("--bpf-root={}", self.bpf_root.display()),
            format!("--attach-mode={}", self.attach_mode),
        ];
        if let Some(s) = &self.socket {
            v.push(format!("--socket={}", s.display()));
        }
        if self.fail_open {
            v.push("--fail-open".into());
        }
        v
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "palisade-hook",
    version,
    about = "palisade's OCI runtime hook: enforce NetworkPolicy on containers outside CNI",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    options: HookOptions,
    /// Hook stage: createRuntime, prestart, poststop, or auto (from the
    /// state's status). The OCI state is read from stdin.
    stage: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Add palisade's createRuntime and poststop hooks to an OCI spec.
    Inject {
        #[command(flatten)]
        options: HookOptions,
        /// Path of this binary as the runtime will run it.
        #[arg(long, default_value = "/usr/bin/palisade-hook")]
        hook_path: String,
        /// The spec (config.json) to change in place; `-` reads stdin and
        /// writes stdout.
        spec: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PALISADE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .without_time()
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Inject {
            options,
            hook_path,
            spec,
        }) => match inject(&options, &hook_path, &spec) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("palisade-hook inject: {e:#}");
                ExitCode::FAILURE
            }
        },
        None => hook(&cli.options, cli.stage.as_deref()),
    }
}

fn inject(options: &HookOptions, hook_path: &str, spec: &PathBuf) -> Result<()> {
    let stdio = spec.as_os_str() == "-";
    let text = if stdio {
        let mut s = String::new();
        io::stdin()
            .read_to_string(&mut s)
            .context("read the spec from stdin")?;
        s
    } else {
        std::fs::read_to_string(spec).with_context(|| format!("read {}", spec.display()))?
    };
    let mut value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an OCI spec (JSON)", spec.display()))?;
    oci::inject_hooks(&mut value, hook_path, &options.as_args());
    let out = serde_json::to_string_pretty(&value)? + "\n";
    if stdio {
        print!("{out}");
    } else {
        let tmp = spec.with_extension("json.palisade-tmp");
        std::fs::write(&tmp, out).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, spec).with_context(|| format!("replace {}", spec.display()))?;
    }
    Ok(())
}

fn hook(options: &HookOptions, stage: Option<&str>) -> ExitCode {
    let mut input = String::new();
    if let Err(e) = io::stdin().read_to_string(&mut input) {
        eprintln!("palisade-hook: read the OCI state from stdin: {e}");
        return ExitCode::FAILURE;
    }
    let state = match oci::parse_state(&input) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "palisade-hook: {e}; palisade-hook must run as an OCI hook (the runtime writes the state to stdin)"
            );
            return ExitCode::FAILURE;
        }
    };
    let Some(mode) = AttachMode::parse(&options.attach_mode) else {
        eprintln!(
            "palisade-hook: --attach-mode {:?} is not one of auto, tcx, netlink",
            options.attach_mode
        );
        return ExitCode::FAILURE;
    };
    let id = state.id().to_owned();
    let mut node = match Control::open(&Paths {
        state_dir: options.state_dir.clone(),
        bpf_root: options.bpf_root.clone(),
        socket: options.socket.clone(),
        attach_mode: mode,
        map_sizes: None,
    }) {
        Ok(n) => n,
        Err(e) if options.fail_open => {
            eprintln!(
                "palisade: WARNING: container {id} runs WITHOUT network policy enforcement (fail-open): {e}"
            );
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("palisade: container {id}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match Stage::resolve(stage, &state) {
        Stage::Create => {
            let result = oci::load_spec(state.bundle())
                .map_err(anyhow::Error::from)
                .and_then(|spec| Ok(oci::on_create(&mut node, &state, spec.as_ref())?));
            match result {
                Ok(report) => {
                    eprintln!("palisade: {}", report.describe(&id));
                    ExitCode::SUCCESS
                }
                Err(e) if options.fail_open => {
                    eprintln!(
                        "palisade: WARNING: container {id} starts WITHOUT network policy enforcement (fail-open): {e:#}"
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!(
                        "palisade: refusing to start container {id}: its network policy cannot be enforced: {e:#}\n\
                         (fix the cause above; --fail-open / PALISADE_FAIL_OPEN=1 lets containers start unprotected)"
                    );
                    ExitCode::FAILURE
                }
            }
        }
        Stage::Poststop => match oci::on_poststop(&mut node, &state) {
            Ok(removed) => {
                for e in removed {
                    eprintln!(
                        "palisade: container {id}: endpoint {} on {} removed",
                        e.id, e.host_ifname
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "palisade: container {id}: cleanup failed: {e:#} (run `palisadectl gc` on the node)"
                );
                ExitCode::FAILURE
            }
        },
        Stage::Other => ExitCode::SUCCESS,
    }
}
