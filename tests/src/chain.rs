//! A CNI chain runner that behaves like libcni for a conflist: ADD runs the
//! plugins in order, each getting the previous one's result as
//! `prevResult`; the final result is cached; CHECK passes the cached result
//! to every plugin; DEL runs in reverse order with the cached result.
//! Plugins are executed inside the node namespace (the "host").

use std::{
    collections::HashMap,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use serde_json::{Map, Value, json};

use crate::sys::spawn_in;

/// Where the reference plugins live on Debian (and the usual place).
pub const REFERENCE_PLUGIN_DIRS: &[&str] = &["/usr/lib/cni", "/opt/cni/bin"];

/// One invocation's parameters.
#[derive(Debug, Clone, Default)]
pub struct Call {
    pub container_id: String,
    /// Empty for DEL without a namespace.
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS`.
    pub args: String,
}

/// A plugin that failed: which, with what CNI error.
#[derive(Debug, Clone)]
pub struct Failure {
    pub plugin: String,
    pub command: String,
    pub code: Option<u64>,
    pub msg: String,
    pub stdout: String,
    pub stderr: String,
    /// The signal that ended the plugin, if one did.
    pub signal: Option<i32>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} failed: code {:?}: {}\nstdout: {}\nstderr: {}",
            self.plugin, self.command, self.code, self.msg, self.stdout, self.stderr
        )
    }
}

/// The runner.
#[derive(Debug)]
pub struct Chain {
    pub conflist: Value,
    /// Extra environment for every plugin.
    pub env: Vec<(String, String)>,
    /// More environment, changeable between calls (a test's fault points).
    pub call_env: Mutex<Vec<(String, String)>>,
    host_netns: PathBuf,
    cni_path: Vec<PathBuf>,
    cache: Mutex<HashMap<(String, String), Value>>,
    /// Wall time of every palisade ADD, for the record.
    pub add_times: Mutex<Vec<Duration>>,
}

impl Chain {
    pub fn new(conflist: Value, host_netns: &Path, palisade_bin_dir: &Path) -> Self {
        let mut cni_path: Vec<PathBuf> = vec![palisade_bin_dir.to_owned()];
        cni_path.extend(REFERENCE_PLUGIN_DIRS.iter().map(PathBuf::from));
        Self {
            conflist,
            env: Vec::new(),
            call_env: Mutex::new(Vec::new()),
            host_netns: host_netns.to_owned(),
            cni_path,
            cache: Mutex::new(HashMap::new()),
            add_times: Mutex::new(Vec::new()),
        }
    }

    pub fn name(&self) -> &str {
        self.conflist["name"].as_str().unwrap_or_default()
    }

    pub fn version(&self) -> &str {
        self.conflist["cniVersion"].as_str().unwrap_or_default()
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The configuration one plugin receives.
    pub fn plugin_conf(&self, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut conf: Map<String, Value> = plugin.as_object().cloned().unwrap_or_default();
        conf.insert("name".into(), json!(self.name()));
        conf.insert("cniVersion".into(), json!(self.version()));
        if let Some(p) = prev {
            conf.insert("prevResult".into(), p.clone());
        }
        Value::Object(conf)
    }

    fn find(&self, plugin_type: &str) -> PathBuf {
        self.cni_path
            .iter()
            .map(|d| d.join(plugin_type))
            .find(|p| p.exists())
            .unwrap_or_else(|| {
                panic!(
                    "CNI plugin {plugin_type:?} not found in {:?}; install containernetworking-plugins \
                     and build the workspace",
                    self.cni_path
                )
            })
    }

    /// Run one plugin binary with `conf` on stdin.
    pub fn exec(&self, command: &str, conf: &Value, call: &Call) -> Output {
        let plugin_type = conf["type"].as_str().unwrap_or_default().to_owned();
        let path = self.find(&plugin_type);
        let cni_path = self
            .cni_path
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let mut cmd = Command::new(&path);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &call.container_id)
            .env("CNI_NETNS", &call.netns)
            .env("CNI_IFNAME", &call.ifname)
            .env("CNI_ARGS", &call.args)
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Ok(level) = std::env::var("PALISADE_LOG") {
            cmd.env("PALISADE_LOG", level);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.envs(self.call_env.lock().expect("lock").clone());
        let mut child = spawn_in(&self.host_netns, &mut cmd)
            .unwrap_or_else(|e| panic!("spawn {}: {e}", path.display()));
        let input = serde_json::to_vec(conf).expect("serialise conf");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&input)
            .unwrap_or_else(|e| panic!("write conf to {}: {e}", path.display()));
        child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("wait for {}: {e}", path.display()))
    }

    fn check_output(command: &str, plugin: &str, out: &Output) -> Result<Value, Box<Failure>> {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let parsed: Option<Value> = serde_json::from_str(stdout.trim()).ok();
        if out.status.success() {
            return Ok(parsed.unwrap_or(Value::Null));
        }
        let (code, msg) = match &parsed {
            Some(v) => (
                v["code"].as_u64(),
                v["msg"].as_str().unwrap_or_default().to_owned(),
            ),
            None => (None, String::new()),
        };
        Err(Box::new(Failure {
            plugin: plugin.to_owned(),
            command: command.to_owned(),
            code,
            msg,
            stdout,
            stderr,
            signal: std::os::unix::process::ExitStatusExt::signal(&out.status),
        }))
    }

    /// ADD through the whole chain; caches and returns the final result.
    pub fn add(&self, call: &Call) -> Result<Value, Box<Failure>> {
        let mut prev: Option<Value> = None;
        for plugin in self.plugins() {
            let conf = self.plugin_conf(&plugin, prev.as_ref());
            let ty = plugin["type"].as_str().unwrap_or_default().to_owned();
            let start = Instant::now();
            let out = self.exec("ADD", &conf, call);
            if ty == "palisade" {
                self.add_times.lock().expect("lock").push(start.elapsed());
            }
            prev = Some(Self::check_output("ADD", &ty, &out)?);
        }
        let result = prev.unwrap_or(Value::Null);
        self.cache.lock().expect("lock").insert(
            (call.container_id.clone(), call.ifname.clone()),
            result.clone(),
        );
        Ok(result)
    }

    /// CHECK through the chain with the cached result.
    pub fn check(&self, call: &Call) -> Result<(), Box<Failure>> {
        let cached = self.cached(call);
        for plugin in self.plugins() {
            let conf = self.plugin_conf(&plugin, cached.as_ref());
            let ty = plugin["type"].as_str().unwrap_or_default().to_owned();
            Self::check_output("CHECK", &ty, &self.exec("CHECK", &conf, call))?;
        }
        Ok(())
    }

    /// DEL in reverse order with the cached result (if any); forgets it.
    pub fn del(&self, call: &Call) -> Result<(), Box<Failure>> {
        let cached = self.cached(call);
        for plugin in self.plugins().iter().rev() {
            let conf = self.plugin_conf(plugin, cached.as_ref());
            let ty = plugin["type"].as_str().unwrap_or_default().to_owned();
            Self::check_output("DEL", &ty, &self.exec("DEL", &conf, call))?;
        }
        self.cache
            .lock()
            .expect("lock")
            .remove(&(call.container_id.clone(), call.ifname.clone()));
        Ok(())
    }

    pub fn cached(&self, call: &Call) -> Option<Value> {
        self.cache
            .lock()
            .expect("lock")
            .get(&(call.container_id.clone(), call.ifname.clone()))
            .cloned()
    }

    /// The palisade entry of the conflist.
    pub fn palisade_plugin(&self) -> Value {
        self.plugins()
            .into_iter()
            .find(|p| p["type"] == "palisade")
            .expect("conflist has a palisade plugin")
    }

    /// Run only the palisade plugin with a given command and extra config.
    pub fn exec_palisade(
        &self,
        command: &str,
        extra: &[(&str, Value)],
        prev: Option<&Value>,
        call: &Call,
    ) -> Result<Value, Box<Failure>> {
        let mut conf = self.plugin_conf(&self.palisade_plugin(), prev);
        for (k, v) in extra {
            conf[*k] = v.clone();
        }
        let out = self.exec(command, &conf, call);
        Self::check_output(command, "palisade", &out)
    }
}
