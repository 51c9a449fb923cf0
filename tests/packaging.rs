//! Installing like a node component: `palisadectl install-cni` and
//! `uninstall-cni` on real-world network configurations (the real binary),
//! and the DEB and RPM packages (`packaging/build.sh` builds them first):
//! their file lists, `dpkg -i`, the demo from the installed binaries, man
//! pages and completions, the refusal to remove while a network still lists
//! palisade, `dpkg -r` and `dpkg -P`.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns; a panic fails the test with its location"
)]

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;
use testbed::{
    node::bin_dir,
    sys::{self, describe},
};

const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/cni");

/// A scratch CNI configuration directory, removed on drop.
struct ConfDir(PathBuf);

impl ConfDir {
    fn with(files: &[(&str, &[u8])]) -> Self {
        let dir = PathBuf::from(testbed::TEST_ROOT).join(format!("{}cni", sys::unique_prefix()));
        fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in files {
            fs::write(dir.join(name), bytes).unwrap();
        }
        Self(dir)
    }

    fn from_testdata(name: &str) -> (Self, Vec<u8>) {
        let bytes = fs::read(Path::new(TESTDATA).join(name)).unwrap();
        (Self::with(&[(name, &bytes)]), bytes)
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(bin_dir().join("palisadectl"))
            .args(args)
            .arg("--cni-conf-dir")
            .arg(&self.0)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "palisadectl {args:?}: {}",
            describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every file in the directory with its bytes.
    fn snapshot(&self) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<(String, Vec<u8>)> = fs::read_dir(&self.0)
            .unwrap()
            .flatten()
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }
}

impl Drop for ConfDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

#[test]
fn install_cni_appends_palisade_to_real_conflists_and_uninstall_restores_every_byte() {
    for name in [
        "10-flannel.conflist",
        "10-calico.conflist",
        "87-podman-bridge.conflist",
    ] {
        let (dir, original) = ConfDir::from_testdata(name);
        let file = dir.0.join(name);
        let said = dir.ok(&["install-cni"]);
        assert!(said.contains("added palisade as the last plugin"), "{said}");
        let installed = fs::read(&file).unwrap();
        let (before, after) = (json(&original), json(&installed));
        let plugins = after["plugins"].as_array().unwrap();
        assert_eq!(
            plugins.last().unwrap(),
            &serde_json::json!({"type": "palisade"}),
            "{name}"
        );
        assert_eq!(
            &plugins[..plugins.len() - 1],
            before["plugins"].as_array().unwrap().as_slice(),
            "{name}: the other plugins are unchanged"
        );
        for key in ["name", "cniVersion"] {
            assert_eq!(after[key], before[key], "{name}: {key}");
        }
        // Only text was inserted: what precedes and follows the insertion
        // is the original, byte for byte.
        let prefix = original
            .iter()
            .zip(&installed)
            .take_while(|(a, b)| a == b)
            .count();
        let suffix = original
            .iter()
            .rev()
            .zip(installed.iter().rev())
            .take_while(|(a, b)| a == b)
            .count();
        assert!(
            prefix + suffix >= original.len(),
            "{name}: more than an insertion changed"
        );
        assert_eq!(
            fs::read(dir.0.join(format!("{name}.palisade-bak"))).unwrap(),
            original,
            "{name}: backup"
        );

        // Idempotent.
        let said = dir.ok(&["install-cni"]);
        assert!(said.contains("already"), "{said}");
        assert_eq!(fs::read(&file).unwrap(), installed);

        let said = dir.ok(&["uninstall-cni"]);
        assert!(said.contains("removed palisade from"), "{said}");
        assert_eq!(
            fs::read(&file).unwrap(),
            original,
            "{name}: byte-exact round trip"
        );
        assert_eq!(dir.snapshot(), vec![(name.to_owned(), original.clone())]);
        let said = dir.ok(&["uninstall-cni"]);
        assert!(said.contains("nothing to do"), "{said}");
    }
}

#[test]
fn a_single_plugin_conf_is_converted_and_restored() {
    let (dir, original) = ConfDir::from_testdata("10-mynet.conf");
    dir.ok(&["install-cni"]);
    let list = dir.0.join("10-mynet.conflist");
    let v = json(&fs::read(&list).unwrap());
    let conf = json(&original);
    assert_eq!(v["name"], conf["name"]);
    assert_eq!(v["cniVersion"], conf["cniVersion"]);
    assert_eq!(v["plugins"][0]["type"], "bridge");
    assert_eq!(v["plugins"][0]["ipam"], conf["ipam"]);
    assert_eq!(v["plugins"][1]["type"], "palisade");
    // The runtime now reads the conflist: the .conf is out of its way.
    let names: Vec<String> = dir.snapshot().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["10-mynet.conf.palisade-bak", "10-mynet.conflist"]);
    assert!(dir.ok(&["install-cni"]).contains("already"));

    dir.ok(&["uninstall-cni"]);
    assert_eq!(dir.snapshot(), vec![("10-mynet.conf".to_owned(), original)]);
}

#[test]
fn install_cni_picks_the_file_the_runtime_reads_or_the_one_named() {
    let flannel = fs::read(Path::new(TESTDATA).join("10-flannel.conflist")).unwrap();
    let podman = fs::read(Path::new(TESTDATA).join("87-podman-bridge.conflist")).unwrap();
    let dir = ConfDir::with(&[
        ("87-podman-bridge.conflist", &podman),
        ("10-flannel.conflist", &flannel),
        ("README", b"notes"),
    ]);
    dir.ok(&["install-cni"]);
    assert!(
        json(&fs::read(dir.0.join("10-flannel.conflist")).unwrap())["plugins"][2]["type"]
            == "palisade"
    );
    assert_eq!(
        fs::read(dir.0.join("87-podman-bridge.conflist")).unwrap(),
        podman
    );

    let named = dir.0.join("87-podman-bridge.conflist");
    dir.ok(&[
        "install-cni",
        "--conflist",
        named.to_str().unwrap(),
        "--plugin-config",
        r#"{"failOpen": true}"#,
    ]);
    let v = json(&fs::read(&named).unwrap());
    assert_eq!(
        v["plugins"][4],
        serde_json::json!({"type": "palisade", "failOpen": true})
    );
    dir.ok(&["uninstall-cni", "--conflist", named.to_str().unwrap()]);
    assert_eq!(fs::read(&named).unwrap(), podman);
    // The first file listing palisade.
    dir.ok(&["uninstall-cni"]);
    assert_eq!(
        fs::read(dir.0.join("10-flannel.conflist")).unwrap(),
        flannel
    );
}

#[test]
fn malformed_configurations_are_refused_and_left_untouched() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "10-a.conflist",
            "{\"name\": \"x\", \"cniVersion\": \"1.0.0\", \"plugins\": [",
            "not valid JSON",
        ),
        (
            "10-a.conflist",
            "{\"name\": \"x\", \"cniVersion\": \"1.0.0\"}",
            "no \"plugins\" list",
        ),
        (
            "10-a.conflist",
            "{\"name\": \"x\", \"cniVersion\": \"1.0.0\", \"plugins\": []}",
            "\"plugins\" is empty",
        ),
        (
            "10-a.conflist",
            "{\"name\": \"x\", \"cniVersion\": \"1.0.0\", \"plugins\": [{\"ipam\": {}}]}",
            "has no \"type\"",
        ),
        (
            "10-a.conflist",
            "{\"cniVersion\": \"1.0.0\", \"plugins\": [{\"type\": \"bridge\"}]}",
            "no network \"name\"",
        ),
        (
            "10-a.conflist",
            "{\"name\": \"x\", \"cniVersion\": \"2.0.0\", \"plugins\": [{\"type\": \"bridge\"}]}",
            "does not speak",
        ),
        (
            "10-a.conf",
            "{\"name\": \"x\", \"cniVersion\": \"1.0.0\"}",
            "has no \"type\"",
        ),
        ("10-a.conf", "not json at all", "not valid JSON"),
    ];
    for (name, text, want) in cases {
        let dir = ConfDir::with(&[(name, text.as_bytes())]);
        let before = dir.snapshot();
        let out = dir.ctl(&["install-cni"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: {text} was accepted");
        assert!(err.contains(want), "{name} {text}: {err}");
        assert!(
            err.contains("left untouched") || err.contains("does not speak"),
            "{err}"
        );
        assert_eq!(dir.snapshot(), before, "{name}: nothing written");
    }
    let empty = ConfDir::with(&[]);
    let out = empty.ctl(&["install-cni"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no CNI network configuration"));

    let (dir, original) = ConfDir::from_testdata("10-flannel.conflist");
    let out = dir.ctl(&["install-cni", "--plugin-config", "{\"type\": \"bridge\"}"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be \"palisade\""));
    assert_eq!(
        dir.snapshot(),
        vec![("10-flannel.conflist".to_owned(), original.clone())]
    );

    // A dry run prints the result and writes nothing.
    let printed = dir.ok(&["install-cni", "--dry-run"]);
    assert!(json(printed.as_bytes())["plugins"][2]["type"] == "palisade");
    assert_eq!(
        dir.snapshot(),
        vec![("10-flannel.conflist".to_owned(), original)]
    );
}

// ---------------------------------------------------------------------------
// Packages.

const PACKAGE: &str = "palisade";

fn packages_dir() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("packages")
}

fn package_file(ext: &str) -> PathBuf {
    let dir = packages_dir();
    fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().and_then(|e| e.to_str()) == Some(ext))
        .unwrap_or_else(|| {
            panic!(
                "no .{ext} package in {}: build them first with `packaging/build.sh --debug` \
                 (scripts/test.sh does)",
                dir.display()
            )
        })
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"))
}

fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(out.status.success(), "{cmd} {args:?}: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every file the packages install (directories aside).
fn expected_files(cni_link: &str) -> BTreeSet<String> {
    let mut files: BTreeSet<String> = [
        "/opt/cni/bin/palisade",
        cni_link,
        "/usr/bin/palisadectl",
        "/usr/bin/palisade-hook",
        "/usr/bin/palisade-runc",
        "/usr/share/palisade/oci/hooks.d/palisade.json",
        "/usr/share/palisade/conf/bridge.conflist",
        "/usr/share/palisade/conf/flannel.conflist",
        "/usr/share/palisade/conf/calico.conflist",
        "/usr/share/palisade/containerd/config.toml",
        "/usr/share/palisade/containerd/palisade-ctr.conflist",
        "/usr/share/palisade/docker/daemon.json",
        "/usr/share/palisade/examples/api-allow.yaml",
        "/usr/share/palisade/examples/bookstore.yaml",
        "/usr/share/bash-completion/completions/palisadectl",
        "/usr/share/fish/vendor_completions.d/palisadectl.fish",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = run_ok(
        &bin_dir().join("palisadectl").display().to_string(),
        &["--help"],
    );
    // One man page for palisadectl and one per (visible) command.
    files.insert("/usr/share/man/man8/palisadectl.8.gz".into());
    let commands = out
        .split("Commands:")
        .nth(1)
        .unwrap_or_default()
        .split("Options:")
        .next()
        .unwrap_or_default()
        .lines()
        // A command's line; its wrapped description is indented further.
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect::<Vec<_>>();
    assert!(commands.contains(&"install-cni".to_string()), "{out}");
    for c in commands {
        files.insert(format!("/usr/share/man/man8/palisadectl-{c}.8.gz"));
    }
    files
}

#[test]
fn deb_and_rpm_contain_exactly_the_expected_files() {
    let deb = package_file("deb");
    let listing = run_ok("dpkg", &["-c", deb.to_str().unwrap()]);
    let mut files = BTreeSet::new();
    for line in listing.lines() {
        // perms owner size date time path [-> target]
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first().is_some_and(|p| p.starts_with('d')) {
            continue;
        }
        let path = fields[5].trim_start_matches('.').to_owned();
        files.insert(path);
    }
    let mut want = expected_files("/usr/lib/cni/palisade");
    want.insert("/lib/systemd/system/sys-fs-bpf.mount".into());
    want.insert("/lib/systemd/system/palisade.service".into());
    want.insert("/usr/share/zsh/vendor-completions/_palisadectl".into());
    want.insert("/usr/share/doc/palisade/README.packaging.md".into());
    want.insert("/usr/share/doc/palisade/copyright".into());
    assert_eq!(files, want, "dpkg -c {}", deb.display());
    assert!(
        listing.contains("./usr/lib/cni/palisade -> /opt/cni/bin/palisade"),
        "/usr/lib/cni/palisade links to the plugin:\n{listing}"
    );

    let rpm = package_file("rpm");
    let listing = run_ok("rpm", &["-qpl", rpm.to_str().unwrap()]);
    let files: BTreeSet<String> = listing.lines().map(str::to_owned).collect();
    let mut want = expected_files("/usr/libexec/cni/palisade");
    want.insert("/usr/lib/systemd/system/sys-fs-bpf.mount".into());
    want.insert("/usr/lib/systemd/system/palisade.service".into());
    want.insert("/usr/share/zsh/site-functions/_palisadectl".into());
    // rpm -qpl lists the directories the package owns too.
    let files: BTreeSet<String> = files
        .into_iter()
        .filter(|f| want.contains(f) || !want.iter().any(|w| w.starts_with(&format!("{f}/"))))
        .collect();
    assert_eq!(files, want, "rpm -qpl {}", rpm.display());
    let scripts = run_ok("rpm", &["-qp", "--scripts", rpm.to_str().unwrap()]);
    for part in [
        "postinstall",
        "preuninstall",
        "postuninstall",
        "palisadectl upgrade",
    ] {
        assert!(
            scripts.contains(part),
            "rpm scripts lack {part}:\n{scripts}"
        );
    }
}

/// Removes the package and the test's CNI file whatever happens.
struct Installed {
    blocker: PathBuf,
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.blocker);
        let _ = Command::new("dpkg").args(["-P", PACKAGE]).output();
    }
}

/// Whether the package is installed (dpkg's status, whatever the wish:
/// a refused `dpkg -r` leaves "deinstall ok installed").
fn installed() -> bool {
    let out = run("dpkg-query", &["-W", "-f=${Status}", PACKAGE]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(2)
        == Some("installed")
}

fn snapshot_cni_dir() -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = fs::read_dir("/etc/cni/net.d")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| (e.path(), fs::read(e.path()).unwrap_or_default()))
        .collect();
    v.sort();
    v
}

#[test]
fn the_deb_installs_runs_the_demo_and_removes_cleanly() {
    sys::require_root();
    let deb = package_file("deb");
    assert!(
        !installed(),
        "{PACKAGE} is installed on this machine already; this test installs and removes it"
    );
    let blocker = PathBuf::from(format!(
        "/etc/cni/net.d/99-{}.conflist",
        sys::unique_prefix()
    ));
    let guard = Installed {
        blocker: blocker.clone(),
    };
    let cni_before = snapshot_cni_dir();
    let out = run("dpkg", &["-i", deb.to_str().unwrap()]);
    assert!(out.status.success(), "dpkg -i: {}", describe(&out));
    assert!(installed());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("palisadectl install-cni"),
        "postinst says how to add palisade to a network: {}",
        describe(&out)
    );
    assert_eq!(
        snapshot_cni_dir(),
        cni_before,
        "installing changed no CNI configuration"
    );

    for f in expected_files("/usr/lib/cni/palisade") {
        assert!(Path::new(&f).exists(), "{f} is not installed");
    }
    assert_eq!(
        fs::canonicalize("/usr/lib/cni/palisade").unwrap(),
        PathBuf::from("/opt/cni/bin/palisade")
    );
    assert!(
        fs::read_to_string("/proc/mounts")
            .unwrap()
            .contains(" /sys/fs/bpf bpf "),
        "bpffs is mounted after installing"
    );
    let version = run_ok("/usr/bin/palisadectl", &["--version"]);
    assert!(version.starts_with("palisadectl "), "{version}");

    // man palisadectl and tab completion.
    let page = run_ok("man", &["-w", "palisadectl"]);
    assert_eq!(page.trim(), "/usr/share/man/man8/palisadectl.8.gz");
    let text = run_ok("man", &["-P", "cat", "palisadectl-install-cni"]);
    assert!(text.contains("--conflist"), "{text}");
    let words = run_ok(
        "bash",
        &[
            "-c",
            "source /usr/share/bash-completion/completions/palisadectl && \
             COMP_WORDS=(palisadectl install) COMP_CWORD=1 COMP_LINE='palisadectl install' \
             COMP_POINT=19 && _palisadectl palisadectl install palisadectl && \
             printf '%s\\n' \"${COMPREPLY[@]}\"",
        ],
    );
    assert!(
        words.lines().any(|w| w == "install-cni"),
        "bash completes install-cni: {words}"
    );

    // The demo, from the installed binaries.
    let bins = PathBuf::from(testbed::TEST_ROOT).join(format!("{}bin", sys::unique_prefix()));
    fs::create_dir_all(&bins).unwrap();
    for (name, target) in [
        ("palisade", PathBuf::from("/opt/cni/bin/palisade")),
        ("palisadectl", PathBuf::from("/usr/bin/palisadectl")),
        ("palisade-probe", bin_dir().join("palisade-probe")),
    ] {
        std::os::unix::fs::symlink(target, bins.join(name)).unwrap();
    }
    let demo = Command::new(bin_dir().join("palisade-demo"))
        .env("PALISADE_BIN_DIR", &bins)
        .output()
        .unwrap();
    let _ = fs::remove_dir_all(&bins);
    assert!(demo.status.success(), "the demo: {}", describe(&demo));
    let said = String::from_utf8_lossy(&demo.stdout);
    assert!(said.contains("DENIED"), "{said}");

    // Removal is refused while a network lists palisade.
    fs::write(
        &blocker,
        r#"{"cniVersion": "1.0.0", "name": "t", "plugins": [{"type": "bridge"}, {"type": "palisade"}]}"#,
    )
    .unwrap();
    let out = run("dpkg", &["-r", PACKAGE]);
    assert!(
        !out.status.success(),
        "dpkg -r went ahead: {}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("uninstall-cni"),
        "says what to do: {}",
        describe(&out)
    );
    assert!(installed(), "still installed after the refusal");
    fs::remove_file(&blocker).unwrap();

    let out = run("dpkg", &["-r", PACKAGE]);
    assert!(out.status.success(), "dpkg -r: {}", describe(&out));
    for f in expected_files("/usr/lib/cni/palisade") {
        assert!(
            fs::symlink_metadata(&f).is_err(),
            "{f} is left after dpkg -r"
        );
    }
    for f in [
        "/lib/systemd/system/sys-fs-bpf.mount",
        "/lib/systemd/system/palisade.service",
    ] {
        assert!(!Path::new(f).exists(), "{f} is left after dpkg -r");
    }
    let out = run("dpkg", &["-P", PACKAGE]);
    assert!(out.status.success(), "dpkg -P: {}", describe(&out));
    assert!(
        !Path::new("/var/lib/palisade").exists(),
        "purge removes the state"
    );
    assert!(!Path::new("/usr/share/palisade").exists());
    assert!(
        !Path::new("/etc/systemd/system/sys-fs-bpf.mount").exists(),
        "no mask left after purge"
    );
    assert_eq!(snapshot_cni_dir(), cni_before);
    drop(guard);
}
