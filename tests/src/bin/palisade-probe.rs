//! `palisade-probe serve`: the server side of the test bed's probes. Echoes
//! TCP lines and UDP datagrams on the given ports (IPv4 and IPv6), and
//! answers SCTP INIT chunks with INIT ACK on raw sockets (the test kernel
//! has no SCTP stack). Prints `ready` once every socket is bound.

use std::{
    io::{Read, Write},
    mem::MaybeUninit,
    net::{SocketAddr, TcpListener, UdpSocket},
    thread,
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use testbed::probe::{raw_sctp_socket, sctp_packet, sctp_parse, sctp_payload};

fn dual_stack(ty: Type, proto: Protocol, port: u16) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::IPV6, ty, Some(proto))?;
    s.set_only_v6(false)?;
    s.set_reuse_address(true)?;
    s.bind(&SockAddr::from(SocketAddr::new(
        "::".parse().expect("addr"),
        port,
    )))?;
    Ok(s)
}

fn ports(arg: Option<&String>) -> Vec<u16> {
    arg.map(|s| {
        s.split(',')
            .filter(|p| !p.is_empty())
            .map(|p| p.parse().unwrap_or_else(|_| panic!("bad port {p}")))
            .collect()
    })
    .unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some("serve") {
        eprintln!("usage: palisade-probe serve --ports 80,81");
        std::process::exit(2);
    }
    let list = ports(
        args.iter()
            .position(|a| a == "--ports")
            .and_then(|i| args.get(i + 1)),
    );
    let mut handles = Vec::new();
    for &port in &list {
        let tcp = dual_stack(Type::STREAM, Protocol::TCP, port)
            .unwrap_or_else(|e| panic!("tcp {port}: {e}"));
        tcp.listen(128)
            .unwrap_or_else(|e| panic!("listen {port}: {e}"));
        let listener: TcpListener = tcp.into();
        handles.push(thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                // Echo until the client closes, so tests can hold a
                // connection open across policy changes.
                thread::spawn(move || {
                    let mut conn = conn;
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 || conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        }));
        let udp: UdpSocket = dual_stack(Type::DGRAM, Protocol::UDP, port)
            .unwrap_or_else(|e| panic!("udp {port}: {e}"))
            .into();
        handles.push(thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(&buf[..n], from);
            }
        }));
    }
    for v6 in [false, true] {
        let sock = raw_sctp_socket(v6).unwrap_or_else(|e| panic!("raw sctp socket: {e}"));
        let served = list.clone();
        handles.push(thread::spawn(move || {
            loop {
                let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                // SAFETY: recv_from initialised the first n bytes.
                let bytes: Vec<u8> = buf[..n]
                    .iter()
                    .map(|b| unsafe { b.assume_init() })
                    .collect();
                let Some((sport, dport, 1, tag)) = sctp_parse(sctp_payload(&bytes)) else {
                    continue;
                };
                if !served.contains(&dport) {
                    continue;
                }
                let reply = sctp_packet(dport, sport, tag, 2, tag);
                let _ = sock.send_to(&reply, &from);
            }
        }));
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    for h in handles {
        let _ = h.join();
    }
}
