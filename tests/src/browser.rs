//! A real browser for the web console's tests and benchmark: Debian's
//! chromium, headless, through its chromedriver (WebDriver), both in a
//! node's network namespace, where the console listens on loopback.

use std::{
    net::TcpStream,
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Stdio},
    time::Duration,
};

use fantoccini::{Client, ClientBuilder};
use serde_json::{Value, json};

use crate::{
    runtimes::wait_for,
    sys::{in_netns, spawn_in},
};

/// chromedriver, running in a namespace until dropped.
#[derive(Debug)]
pub struct Driver {
    child: Child,
    pub port: u16,
}

impl Driver {
    pub fn start(netns: &Path, port: u16) -> Self {
        let mut cmd = std::process::Command::new("chromedriver");
        // A process group of its own, which its browsers join: dropping
        // the driver ends them all, even when a test fails mid-session.
        cmd.arg(format!("--port={port}"))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = spawn_in(netns, &mut cmd)
            .unwrap_or_else(|e| panic!("start chromedriver (Debian package chromium-driver): {e}"));
        wait_for("chromedriver to listen", Duration::from_secs(30), || {
            in_netns(netns, || TcpStream::connect(("127.0.0.1", port)).is_ok())
        });
        Self { child, port }
    }

    /// A new headless chromium session. Call it from a thread in the
    /// driver's namespace (the connection is made there).
    pub async fn browser(&self) -> Client {
        let caps = json!({
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--window-size=1600,1100",
                    "--enable-precise-memory-info",
                ],
            }
        });
        let Value::Object(caps) = caps else {
            unreachable!("a JSON object")
        };
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .unwrap_or_else(|e| panic!("a chromium session through chromedriver: {e}"))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: killpg(2) on the group this driver leads.
            unsafe {
                libc::killpg(pid, libc::SIGKILL);
            }
        }
        let _ = self.child.wait();
    }
}
