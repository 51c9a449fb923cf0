//! HTTP in the test bed: the pods' HTTP server (`palisade-probe http`) and
//! a small HTTP/1.1 client that sends several requests over one
//! connection (keep-alive) from inside a namespace.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::Path,
    process::{Child, Stdio},
    time::Duration,
};

use crate::{node::bin_dir, sys::command_in, sys::in_netns};

/// The HTTP server of one pod; killed when dropped.
#[derive(Debug)]
pub struct HttpServer(Child);

impl HttpServer {
    /// Start `palisade-probe http` on `ports` inside the namespace.
    pub fn start(netns: &Path, ports: &[u16]) -> Self {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let mut child = command_in(netns, bin_dir().join("palisade-probe"))
            .args(["http", "--ports", &ports.join(",")])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start the HTTP server in {}: {e}", netns.display()));
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("HTTP server did not start: {e}"));
        assert_eq!(line.trim(), "ready", "HTTP server did not report ready");
        Self(child)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One request: method, path (with query) and extra headers.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Req {
    pub fn new(method: &str, path: &str) -> Self {
        Self {
            method: method.into(),
            path: path.into(),
            headers: Vec::new(),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// One answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// Lowercase names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Send `reqs` one after the other over one connection to `addr:port` from
/// inside the namespace; the replies in order. An error when the
/// connection cannot be made or breaks before every reply came.
pub fn exchange(
    netns: &Path,
    addr: IpAddr,
    port: u16,
    reqs: &[Req],
    timeout: Duration,
) -> std::io::Result<Vec<Reply>> {
    let reqs = reqs.to_vec();
    in_netns(netns, move || {
        let to = SocketAddr::new(addr, port);
        let stream = TcpStream::connect_timeout(&to, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut out = stream.try_clone()?;
        let mut r = BufReader::new(stream);
        let host = match addr {
            IpAddr::V4(a) => format!("{a}:{port}"),
            IpAddr::V6(a) => format!("[{a}]:{port}"),
        };
        let mut replies = Vec::new();
        for q in &reqs {
            let mut msg = format!("{} {} HTTP/1.1\r\nhost: {host}\r\n", q.method, q.path);
            for (n, v) in &q.headers {
                msg += &format!("{n}: {v}\r\n");
            }
            msg += "content-length: 0\r\n\r\n";
            out.write_all(msg.as_bytes())?;
            replies.push(read_reply(&mut r)?);
        }
        Ok(replies)
    })
}

fn read_reply(r: &mut impl BufRead) -> std::io::Result<Reply> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before a reply",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(&format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    let mut length = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Err(bad("connection closed in the headers"));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            let n = n.trim().to_ascii_lowercase();
            let v = v.trim().to_owned();
            if n == "content-length" {
                length = v.parse().ok();
            }
            headers.push((n, v));
        }
    }
    let mut body = vec![0u8; length.ok_or_else(|| bad("no content-length"))?];
    r.read_exact(&mut body)?;
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}
