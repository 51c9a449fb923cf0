//! `palisade-runc`: a runc wrapper for runtimes without hook configuration
//! (Docker). Registered under `runtimes` in daemon.json, it:
//!
//! - on `create`/`run`, adds palisade's hooks to the bundle's config.json,
//!   and (with `--palisade-docker-root`) the container's Docker labels and
//!   name as palisade annotations, then runs runc;
//! - on `start`, enforces before the process starts: Docker 28 and newer
//!   attach networking after `create`, so the createRuntime hook found no
//!   veth; if enforcement fails, the container does not start;
//! - passes everything else to runc unchanged.
//!
//! Its own options come first and all start with `--palisade-`:
//! `--palisade-runc PATH` (default /usr/sbin/runc), `--palisade-hook PATH`
//! (default: palisade-hook next to this binary), `--palisade-docker-root DIR`,
//! `--palisade-state-dir DIR`, `--palisade-bpf-root DIR`,
//! `--palisade-fail-open`.

use std::{
    collections::BTreeMap,
    io::Write,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};
use palisade::{
    daemon::{Control, Paths},
    dataplane::{AttachMode, DEFAULT_BPF_ROOT},
    oci,
    policy::selector,
    store::DEFAULT_STATE_DIR,
};
use serde_json::Value;

#[derive(Debug)]
struct Wrapper {
    runc: PathBuf,
    hook: PathBuf,
    docker_root: Option<PathBuf>,
    state_dir: PathBuf,
    bpf_root: PathBuf,
    fail_open: bool,
    /// runc's arguments, unchanged.
    args: Vec<String>,
}

/// runc's global options that take a value.
const RUNC_VALUE_FLAGS: &[&str] = &["--root", "--log", "--log-format", "--criu", "--rootless"];

fn parse(raw: Vec<String>) -> Result<Wrapper> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let default_runc = [
        "/usr/sbin/runc",
        "/usr/bin/runc",
        "/usr/local/sbin/runc",
        "/usr/local/bin/runc",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .unwrap_or_else(|| PathBuf::from("runc"));
    let own_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let mut w = Wrapper {
        runc: env("PALISADE_RUNC")
            .map(PathBuf::from)
            .unwrap_or(default_runc),
        hook: own_dir
            .map(|d| d.join("palisade-hook"))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("/usr/bin/palisade-hook")),
        docker_root: env("PALISADE_DOCKER_ROOT").map(PathBuf::from),
        state_dir: env("PALISADE_STATE_DIR")
            .map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), PathBuf::from),
        bpf_root: env("PALISADE_BPF_ROOT")
            .map_or_else(|| PathBuf::from(DEFAULT_BPF_ROOT), PathBuf::from),
        fail_open: env("PALISADE_FAIL_OPEN").is_some_and(|v| v == "1" || v == "true"),
        args: Vec::new(),
    };
    let mut it = raw.into_iter();
    while let Some(a) = it.next() {
        let Some(rest) = a.strip_prefix("--palisade-") else {
            w.args.push(a);
            continue;
        };
        let (name, inline) = match rest.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (rest.to_owned(), None),
        };
        if name == "fail-open" {
            w.fail_open = true;
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .with_context(|| format!("--palisade-{name} needs a value"))?,
        };
        match name.as_str() {
            "runc" => w.runc = value.into(),
            "hook" => w.hook = value.into(),
            "docker-root" => w.docker_root = Some(value.into()),
            "state-dir" => w.state_dir = value.into(),
            "bpf-root" => w.bpf_root = value.into(),
            other => bail!("unknown option --palisade-{other}"),
        }
    }
    Ok(w)
}

/// Index of runc's command among its arguments, skipping global options.
fn command_index(args: &[String]) -> Option<usize> {
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if !a.starts_with('-') {
            return Some(i);
        }
        if RUNC_VALUE_FLAGS.contains(&a.as_str()) {
            i += 1;
        }
        i += 1;
    }
    None
}

/// The value of `--name VALUE` / `--name=VALUE` / short form after `from`.
fn option_value(args: &[String], names: &[&str]) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        for n in names {
            if a == n {
                return it.next().cloned();
            }
            if let Some(v) = a.strip_prefix(&format!("{n}=")) {
                return Some(v.to_owned());
            }
        }
    }
    None
}

/// runc's `--log` file, to report errors where the caller looks.
fn log_error(global: &[String], msg: &str) {
    eprintln!("palisade: {msg}");
    if let Some(log) = option_value(global, &["--log"])
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(log)
    {
        let line = serde_json::json!({"level": "error", "msg": format!("palisade: {msg}")});
        let _ = writeln!(f, "{line}");
    }
}

/// Docker's labels and name for a container, as palisade annotations.
/// Labels that are not valid Kubernetes labels are skipped (Docker allows
/// more than Kubernetes does).
fn docker_annotations(docker_root: &Path, id: &str) -> Result<BTreeMap<String, String>> {
    let path = docker_root
        .join("containers")
        .join(id)
        .join("config.v2.json");
    let mut out = BTreeMap::new();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    if let Some(labels) = v["Config"]["Labels"].as_object() {
        for (k, val) in labels {
            let Some(val) = val.as_str() else { continue };
            if k == oci::ANNOTATION_NAMESPACE
                || k == oci::ANNOTATION_NAME
                || k == oci::ANNOTATION_LABELS
            {
                out.insert(k.clone(), val.to_owned());
            } else if selector::validate_label_key(k, "label").is_ok()
                && selector::validate_label_value(val, "label").is_ok()
            {
                out.insert(
                    format!("{}{k}", oci::ANNOTATION_LABEL_PREFIX),
                    val.to_owned(),
                );
            }
        }
    }
    if let Some(name) = v["Name"]
        .as_str()
        .map(|n| n.trim_start_matches('/'))
        .filter(|n| !n.is_empty())
    {
        out.entry(oci::ANNOTATION_NAME.to_owned())
            .or_insert_with(|| name.to_owned());
    }
    Ok(out)
}

/// Add hooks (and Docker's identity) to the bundle's config.json.
fn prepare_bundle(w: &Wrapper, cmd_args: &[String]) -> Result<()> {
    let bundle = option_value(cmd_args, &["--bundle", "-b"])
        .map_or_else(|| PathBuf::from("."), PathBuf::from);
    let id = cmd_args.last().cloned().unwrap_or_default();
    let path = bundle.join("config.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let mut spec: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let mut hook_args = vec![
        format!("--state-dir={}", w.state_dir.display()),
        format!("--bpf-root={}", w.bpf_root.display()),
    ];
    if w.fail_open {
        hook_args.push("--fail-open".into());
    }
    let mut changed = oci::inject_hooks(&mut spec, &w.hook.display().to_string(), &hook_args);
    if let Some(root) = &w.docker_root {
        let extra = docker_annotations(root, &id)?;
        if !extra.is_empty() {
            let ann = spec
                .as_object_mut()
                .context("config.json is not an object")?
                .entry("annotations")
                .or_insert_with(|| serde_json::json!({}));
            if let Some(ann) = ann.as_object_mut() {
                for (k, v) in extra {
                    ann.entry(k).or_insert(Value::String(v));
                }
                changed = true;
            }
        }
    }
    if changed {
        let tmp = path.with_extension("json.palisade-tmp");
        std::fs::write(&tmp, serde_json::to_vec(&spec)?)
            .with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("replace {}", path.display()))?;
    }
    Ok(())
}

/// Before `runc start`: enforce on veths that appeared after create.
fn enforce_at_start(w: &Wrapper, global: &[String], id: &str) -> Result<String> {
    let out = Command::new(&w.runc)
        .args(global)
        .args(["state", id])
        .output()
        .with_context(|| format!("run {} state {id}", w.runc.display()))?;
    if !out.status.success() {
        bail!(
            "runc state {id} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // `runc state` prints the OCI state (plus a few runc fields).
    let state = oci::parse_state(&String::from_utf8_lossy(&out.stdout))?;
    let spec = oci::load_spec(state.bundle())?;
    let mut node = Control::open(&Paths {
        state_dir: w.state_dir.clone(),
        bpf_root: w.bpf_root.clone(),
        socket: std::env::var_os("PALISADE_SOCKET").map(PathBuf::from),
        attach_mode: AttachMode::Auto,
        map_sizes: None,
    })?;
    let report = oci::on_create(&mut node, &state, spec.as_ref())?;
    Ok(report.describe(id))
}

fn main() -> ExitCode {
    let w = match parse(std::env::args().skip(1).collect()) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("palisade-runc: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(ci) = command_index(&w.args) {
        let (global, rest) = w.args.split_at(ci);
        let (cmd, cmd_args) = (rest[0].as_str(), &rest[1..]);
        match cmd {
            "create" | "run" => {
                if let Err(e) = prepare_bundle(&w, cmd_args) {
                    let msg =
                        format!("cannot add palisade's hooks to the container's bundle: {e:#}");
                    if !w.fail_open {
                        log_error(global, &msg);
                        return ExitCode::FAILURE;
                    }
                    eprintln!("palisade: WARNING (fail-open): {msg}");
                }
            }
            "start" => {
                let id = cmd_args
                    .iter()
                    .rfind(|a| !a.starts_with('-'))
                    .cloned()
                    .unwrap_or_default();
                match enforce_at_start(&w, global, &id) {
                    Ok(report) => eprintln!("palisade: {report}"),
                    Err(e) if w.fail_open => {
                        eprintln!(
                            "palisade: WARNING: container {id} starts WITHOUT network policy enforcement (fail-open): {e:#}"
                        )
                    }
                    Err(e) => {
                        log_error(
                            global,
                            &format!(
                                "refusing to start container {id}: its network policy cannot be enforced: {e:#}"
                            ),
                        );
                        return ExitCode::FAILURE;
                    }
                }
            }
            _ => {}
        }
    }
    let err = Command::new(&w.runc).args(&w.args).exec();
    eprintln!("palisade-runc: cannot run {}: {err}", w.runc.display());
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn wrapper_options_are_stripped_and_runc_arguments_kept() {
        let w = parse(s(&[
            "--palisade-docker-root=/var/lib/docker",
            "--palisade-state-dir",
            "/s",
            "--palisade-fail-open",
            "--root",
            "/run/docker/runtime-runc/moby",
            "--log",
            "/x/log.json",
            "create",
            "--bundle",
            "/b",
            "abc",
        ]))
        .unwrap();
        assert_eq!(w.docker_root.as_deref(), Some(Path::new("/var/lib/docker")));
        assert_eq!(w.state_dir, PathBuf::from("/s"));
        assert!(w.fail_open);
        assert_eq!(w.args[0], "--root");
        let ci = command_index(&w.args).unwrap();
        assert_eq!(w.args[ci], "create");
        assert_eq!(
            option_value(&w.args[ci + 1..], &["--bundle", "-b"]).as_deref(),
            Some("/b")
        );
        assert!(parse(s(&["--palisade-bogus=1"])).is_err());
    }

    #[test]
    fn docker_labels_become_annotations_and_invalid_ones_are_skipped() {
        let dir = std::env::temp_dir().join(format!("palisade-runc-test-{}", std::process::id()));
        let cdir = dir.join("containers").join("abc");
        std::fs::create_dir_all(&cdir).unwrap();
        std::fs::write(
            cdir.join("config.v2.json"),
            r#"{"Name":"/web","Config":{"Labels":{"app":"web","palisade.io/namespace":"shop",
                "com.docker.compose.config-hash":"0123456789012345678901234567890123456789012345678901234567890123456789"}}}"#,
        )
        .unwrap();
        let a = docker_annotations(&dir, "abc").unwrap();
        assert_eq!(
            a.get("palisade.io/label.app").map(String::as_str),
            Some("web")
        );
        assert_eq!(
            a.get("palisade.io/namespace").map(String::as_str),
            Some("shop")
        );
        assert_eq!(a.get("palisade.io/name").map(String::as_str), Some("web"));
        assert!(!a.keys().any(|k| k.contains("config-hash")), "{a:?}");
        assert!(docker_annotations(&dir, "missing").unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
