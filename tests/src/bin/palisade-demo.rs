//! The README's demo on a built-in sandbox: a node namespace with a bridge
//! network (the real bridge + host-local plugins, then palisade), three
//! containers labelled like a small shop, the connectivity matrix before
//! and after the `api-allow` NetworkPolicy, and an explanation of a denied
//! connection. Everything is removed at the end.

use std::{path::Path, process::ExitCode};

use testbed::{
    http::{HttpServer, Req, exchange},
    matrix::{Peer, probe_all},
    node::{Node, NodeOptions},
    probe::Proto,
    sys::describe,
};

fn section(title: &str) {
    println!("\n=== {title} ===");
}

fn ctl(node: &Node, args: &[&str], stdin: Option<&str>) -> String {
    let out = node.ctl(args, stdin);
    if !out.status.success() {
        eprintln!("palisadectl {} failed:\n{}", args.join(" "), describe(&out));
        std::process::exit(1);
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn main() -> ExitCode {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/examples");
    let pods_yaml =
        std::fs::read_to_string(conf.join("bookstore.yaml")).expect("conf/examples/bookstore.yaml");
    let policy_yaml =
        std::fs::read_to_string(conf.join("api-allow.yaml")).expect("conf/examples/api-allow.yaml");
    let http_yaml =
        std::fs::read_to_string(conf.join("api-http.yaml")).expect("conf/examples/api-http.yaml");

    section("sandbox");
    // The node daemon runs too: its L7 proxy judges HTTP requests.
    let node = Node::new(NodeOptions {
        daemon: true,
        ..NodeOptions::default()
    });
    println!(
        "node namespace {} with bridge cni0 (10.100.0.0/24); CNI chain: bridge + host-local, then palisade",
        node.netns.name
    );
    println!(
        "palisade state in {}, pins in {}",
        node.state_dir.display(),
        node.bpf_root.display()
    );

    section("labels (palisadectl apply -f conf/examples/bookstore.yaml)");
    print!("{}", ctl(&node, &["apply", "-f", "-"], Some(&pods_yaml)));

    let names = ["bookstore-api", "bookstore-frontend", "coffeeshop"];
    let pods: Vec<_> = names
        .iter()
        .map(|n| node.add_pod("default", n, &[80]))
        .collect();
    section("containers (CNI ADD through the chain)");
    print!("{}", ctl(&node, &["get", "endpoints"], None));

    let peers: Vec<Peer> = pods
        .iter()
        .map(|p| Peer {
            name: p.name.clone(),
            netns: p.netns.clone(),
            addr: p.addr(false),
        })
        .collect();

    section("connectivity on TCP 80, no policy");
    let before = probe_all(&peers, Proto::Tcp, 80);
    println!("{before}");

    section("palisadectl apply -f conf/examples/api-allow.yaml");
    print!("{policy_yaml}");
    print!("{}", ctl(&node, &["apply", "-f", "-"], Some(&policy_yaml)));

    section("connectivity on TCP 80, with api-allow");
    let after = probe_all(&peers, Proto::Tcp, 80);
    println!("{after}");

    section("palisadectl explain --from coffeeshop --to bookstore-api --port 80/TCP");
    print!(
        "{}",
        ctl(
            &node,
            &[
                "explain",
                "--from",
                "coffeeshop",
                "--to",
                "bookstore-api",
                "--port",
                "80/TCP"
            ],
            None
        )
    );

    section(
        "L7: palisadectl delete -f conf/examples/api-allow.yaml; palisadectl apply -f conf/examples/api-http.yaml",
    );
    let http_server = HttpServer::start(&pods[0].netns, &[8080]);
    ctl(&node, &["delete", "-f", "-"], Some(&policy_yaml));
    print!("{http_yaml}");
    print!("{}", ctl(&node, &["apply", "-f", "-"], Some(&http_yaml)));
    let api = pods[0].addr(false);
    let mut l7_ok = true;
    for (method, path, want) in [("GET", "/books/1", 200), ("DELETE", "/books/1", 403)] {
        let got = exchange(
            &pods[1].netns,
            api,
            8080,
            &[Req::new(method, path)],
            std::time::Duration::from_secs(5),
        );
        match got {
            Ok(r) => {
                println!(
                    "bookstore-frontend: {method} http://bookstore-api:8080{path} -> {} {}{}",
                    r[0].status,
                    r[0].body.trim(),
                    r[0].header("x-palisade-policy")
                        .map(|p| format!(" [x-palisade-policy: {p}]"))
                        .unwrap_or_default()
                );
                l7_ok &= r[0].status == want;
            }
            Err(e) => {
                println!("bookstore-frontend: {method} {path} -> {e}");
                l7_ok = false;
            }
        }
    }
    section(
        "palisadectl explain --from bookstore-frontend --to bookstore-api --port 8080/TCP --http DELETE /books/1",
    );
    print!(
        "{}",
        ctl(
            &node,
            &[
                "explain",
                "--from",
                "bookstore-frontend",
                "--to",
                "bookstore-api",
                "--port",
                "8080/TCP",
                "--http",
                "DELETE",
                "/books/1"
            ],
            None
        )
    );

    let ok = l7_ok
        && after.get("coffeeshop", "bookstore-api") == Some(false)
        && after.get("bookstore-frontend", "bookstore-api") == Some(true)
        && after.get("bookstore-api", "coffeeshop") == Some(true)
        && before.cells.values().all(|v| *v);
    section("cleanup");
    drop(http_server);
    drop(pods);
    drop(node);
    println!("sandbox removed (namespaces, veths, pins, state)");
    if ok {
        println!(
            "\ndemo OK: only the bookstore reaches its API once api-allow is applied, and with api-http the frontend may GET books but not DELETE them"
        );
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "\ndemo FAILED: the matrices or the HTTP answers above are not what api-allow and api-http mean"
        );
        ExitCode::FAILURE
    }
}
