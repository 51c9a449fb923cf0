//! System plumbing for privileged tests: root check, commands that must
//! succeed, network namespaces that delete themselves, running code and
//! processes inside a namespace.

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

use nix::sched::{CloneFlags, setns};

/// Fail loudly unless running as root: privileged tests never skip.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "this privileged test needs root (network namespaces, bpffs, eBPF programs); \
             run the README's test command, which runs the suite as root"
        );
    }
}

/// Run a command; panic with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} {args:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run `ip` with these arguments; panic on failure.
pub fn ip(args: &[&str]) -> String {
    run("ip", args)
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name prefix unique to this process and call: `pt<pid>x<n>`.
pub fn unique_prefix() -> String {
    format!(
        "pt{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// Delete namespaces and mounts left by test processes that died without
/// cleaning up (names carry the pid of the process that made them).
pub fn sweep_stale() {
    let list = run("ip", &["netns", "list"]);
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if let Some(pid) = stale_pid(name)
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
    if let Ok(entries) = std::fs::read_dir(crate::TEST_ROOT) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = stale_pid(&name)
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let bpf = e.path().join("bpf");
                let _ = nix::mount::umount2(&bpf, nix::mount::MntFlags::MNT_DETACH);
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn stale_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("pt")?;
    let (pid, _) = rest.split_once('x')?;
    pid.parse().ok()
}

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    pub path: PathBuf,
}

impl Netns {
    pub fn new(name: &str) -> Self {
        ip(&["netns", "add", name]);
        let ns = Self {
            name: name.to_owned(),
            path: PathBuf::from(format!("/run/netns/{name}")),
        };
        ip(&["-n", name, "link", "set", "lo", "up"]);
        ns
    }

    /// Run `f` on a thread inside this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.path, f)
    }

    /// Set a sysctl under /proc/sys/net inside this namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run(|| {
            std::fs::write(&path, value)
                .unwrap_or_else(|e| panic!("sysctl {key}={value} in {}: {e}", self.name))
        });
    }

    /// A command that will run inside this namespace (setns before exec;
    /// unlike `ip netns exec`, mounts such as bpffs stay visible).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        command_in(&self.path, program)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Run `f` on a fresh thread that entered the namespace at `path`.
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> T {
    let file = File::open(path).unwrap_or_else(|e| panic!("open netns {}: {e}", path.display()));
    thread::scope(|s| {
        s.spawn(|| {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// A command whose child enters the namespace at `path` before exec.
pub fn command_in(path: &Path, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let file = File::open(path).unwrap_or_else(|e| panic!("open netns {}: {e}", path.display()));
    let mut cmd = Command::new(program);
    // SAFETY: the closure only calls setns(2), which is async-signal-safe,
    // on an fd opened before the fork; `file` is moved into the closure and
    // stays open until the Command is dropped.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Spawn `cmd` inside the network namespace at `path` without forking this
/// process: a short-lived thread enters the namespace and spawns from there
/// (the child inherits the thread's namespace), so std can use
/// posix_spawn, whose cost does not grow with this process's memory. A
/// fork (which `command_in`'s pre_exec forces) copies the page tables, a
/// cost a large benchmark process would add to every plugin it times; a
/// container runtime does not pay it.
pub fn spawn_in(path: &Path, cmd: &mut Command) -> std::io::Result<std::process::Child> {
    let file = File::open(path)?;
    thread::scope(|s| {
        s.spawn(|| {
            // Changes only this thread, which ends right after the spawn.
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            cmd.spawn()
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("spawn thread panicked")))
    })
}

/// Output of a finished command, for assertions.
pub fn describe(out: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
