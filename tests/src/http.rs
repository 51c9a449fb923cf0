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
            // The address as the host, unless the request names one.
            let mut msg = if q
                .headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("host"))
            {
                format!("{} {} HTTP/1.1\r\n", q.method, q.path)
            } else {
                format!("{} {} HTTP/1.1\r\nhost: {host}\r\n", q.method, q.path)
            };
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

/// Read one HTTP/1.1 answer (with a content-length body).
pub fn read_reply(r: &mut impl BufRead) -> std::io::Result<Reply> {
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

/// A gRPC call's outcome: the `grpc-status` (from the trailers, or the
/// headers of a trailers-only answer) and the message echoed back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcReply {
    pub status: u32,
    pub message: Option<String>,
    pub policy: Option<String>,
    pub body: Vec<u8>,
}

/// Send requests over one HTTP/2 connection (prior knowledge, as gRPC
/// does). `grpc`: each request is a gRPC call of `path` with a small
/// message (HTTP/2 POST, `content-type: application/grpc`); otherwise a
/// plain GET of `path`. Answers in order: the HTTP status and body for
/// plain requests, the gRPC outcome for calls.
pub fn h2_exchange(
    netns: &Path,
    addr: IpAddr,
    port: u16,
    paths: &[(&str, bool)],
    timeout: Duration,
) -> std::io::Result<Vec<(u16, GrpcReply)>> {
    let paths: Vec<(String, bool)> = paths.iter().map(|(p, g)| ((*p).to_owned(), *g)).collect();
    in_netns(netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            tokio::time::timeout(timeout, h2_calls(addr, port, &paths))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "HTTP/2 exchange timed out")
                })?
        })
    })
}

async fn h2_calls(
    addr: IpAddr,
    port: u16,
    paths: &[(String, bool)],
) -> std::io::Result<Vec<(u16, GrpcReply)>> {
    use http_body_util::BodyExt;
    let err = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
    let stream = tokio::net::TcpStream::connect(SocketAddr::new(addr, port)).await?;
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .map_err(|e| err(&e))?;
    tokio::spawn(async move {
        let _ended = connection.await;
    });
    let authority = SocketAddr::new(addr, port).to_string();
    let mut out = Vec::new();
    for (path, grpc) in paths {
        let uri = format!("http://{authority}{path}");
        let req = if *grpc {
            // One length-prefixed message: not compressed, 3 bytes.
            let msg = hyper::body::Bytes::from_static(&[0, 0, 0, 0, 3, 0x0a, 0x01, 0x78]);
            hyper::Request::post(uri)
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(http_body_util::Full::new(msg))
        } else {
            hyper::Request::get(uri).body(http_body_util::Full::new(hyper::body::Bytes::new()))
        }
        .map_err(|e| err(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| err(&e))?;
        let status = resp.status().as_u16();
        let header = |h: &hyper::HeaderMap, n: &str| {
            h.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned)
        };
        let mut grpc_status = header(resp.headers(), "grpc-status");
        let mut message = header(resp.headers(), "grpc-message");
        let policy = header(resp.headers(), "x-palisade-policy");
        let collected = resp.into_body().collect().await.map_err(|e| err(&e))?;
        if let Some(t) = collected.trailers() {
            grpc_status = grpc_status.or_else(|| header(t, "grpc-status"));
            message = message.or_else(|| header(t, "grpc-message"));
        }
        out.push((
            status,
            GrpcReply {
                status: grpc_status.and_then(|s| s.parse().ok()).unwrap_or(u32::MAX),
                message,
                policy,
                body: collected.to_bytes().to_vec(),
            },
        ));
    }
    Ok(out)
}

/// Send `bytes` and read until the other end closes; an error when it
/// does not close within `timeout`.
pub fn raw_exchange(
    netns: &Path,
    addr: IpAddr,
    port: u16,
    bytes: &[u8],
    timeout: Duration,
) -> std::io::Result<Vec<u8>> {
    let bytes = bytes.to_vec();
    in_netns(netns, move || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::new(addr, port), timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(&bytes)?;
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut s, &mut out)?;
        Ok(out)
    })
}

/// Ask for a WebSocket upgrade of `path`; when the answer is `101`, send a
/// line over the upgraded connection and read it back. The status, and
/// the line that came back.
pub fn upgrade_echo(
    netns: &Path,
    addr: IpAddr,
    port: u16,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, Option<String>)> {
    let path = path.to_owned();
    in_netns(netns, move || {
        let s = TcpStream::connect_timeout(&SocketAddr::new(addr, port), timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let mut out = s.try_clone()?;
        let mut r = BufReader::new(s);
        out.write_all(
            format!(
                "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
                 sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
            .as_bytes(),
        )?;
        let mut line = String::new();
        r.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h)? == 0 {
                break;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((n, v)) = h.split_once(':')
                && n.trim().eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        if status != 101 {
            let mut body = vec![0u8; length];
            std::io::Read::read_exact(&mut r, &mut body)?;
            return Ok((status, None));
        }
        out.write_all(b"ping over the upgraded connection\n")?;
        let mut echoed = String::new();
        r.read_line(&mut echoed)?;
        Ok((status, Some(echoed)))
    })
}
