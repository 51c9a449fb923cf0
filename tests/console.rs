//! The web console in a real browser: Debian's chromium, headless, driven
//! through its chromedriver (WebDriver) against a node daemon that serves
//! the console, with real pods and real traffic. Screenshots of each main
//! view go to `target/console-screenshots/`.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns; a panic fails the test with its location"
)]

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use fantoccini::{
    Client, Locator,
    actions::{InputSource, KeyAction, KeyActions},
    key::Key,
};
use serde_json::{Value, json};
use testbed::{
    browser::Driver,
    cluster::{Cluster, Topology},
    node::{Node, NodeOptions, Pod, pods_yaml},
    probe::{PROBE_TIMEOUT, Proto, probe},
    runtimes::wait_for,
    sys::{describe, in_netns},
};

const CONSOLE_PORT: u16 = 19971;
const DRIVER_PORT: u16 = 19515;
/// Generous for a loaded 2-core machine: tests wait for outcomes.
const DEADLINE: Duration = Duration::from_secs(30);

fn connect(from: &Pod, to: &Pod, port: u16) -> bool {
    probe(&from.netns, to.addr(false), Proto::Tcp, port, PROBE_TIMEOUT)
}

fn screenshots() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(c: &Client, name: &str) {
    c.execute("window.scrollTo(0, 0);", vec![]).await.unwrap();
    let png = c.screenshot().await.unwrap();
    let path = screenshots().join(format!("{name}.png"));
    std::fs::write(&path, png).unwrap();
    eprintln!("screenshot: {}", path.display());
}

/// Wait until `script` (a JS expression) is true on the page.
async fn until(c: &Client, what: &str, script: &str) {
    let start = Instant::now();
    loop {
        let v = c
            .execute(&format!("return !!({script});"), vec![])
            .await
            .unwrap_or(Value::Bool(false));
        if v == Value::Bool(true) {
            return;
        }
        if start.elapsed() > DEADLINE {
            let page = c
                .execute(
                    "return document.getElementById('counts').textContent + '\\n' + \
                     [...document.querySelectorAll('g.edge')].map(e => e.dataset.id).join('\\n') + \
                     '\\n--- details:\\n' + document.getElementById('details').innerText + \
                     '\\n--- learn:\\n' + document.getElementById('l-result').innerText",
                    vec![],
                )
                .await
                .unwrap_or_default();
            panic!("the console never showed {what} ({script}); it shows:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Click the element `css` selects, as a user would.
async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

fn edge_sel(from: &str, to: &str) -> String {
    format!("g.edge[data-from=\"pod:{from}\"][data-to=\"pod:{to}\"]")
}

async fn edge_verdicts(c: &Client) -> BTreeSet<(String, String, String)> {
    let v = c
        .execute(
            "return [...document.querySelectorAll('g.edge')].map(e => [e.dataset.from, e.dataset.to, e.dataset.verdict]);",
            vec![],
        )
        .await
        .unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t[0].as_str().unwrap().to_owned(),
                t[1].as_str().unwrap().to_owned(),
                t[2].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn http_status(n: &Node, request: &str) -> String {
    let request = request.to_owned();
    in_netns(&n.netns.path, move || {
        let mut s = TcpStream::connect(("127.0.0.1", CONSOLE_PORT)).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.lines().next().unwrap_or_default().to_owned()
    })
}

#[test]
fn the_console_shows_live_traffic_explains_denials_and_learns_audits_and_enforces() {
    let n = Node::new(NodeOptions {
        daemon: true,
        daemon_args: vec![
            "--console-listen".into(),
            format!("127.0.0.1:{CONSOLE_PORT}"),
        ],
        ..Default::default()
    });
    n.apply(&pods_yaml(&[
        ("x", "db", "role: db"),
        ("x", "api", "role: api"),
        ("x", "web", "role: web"),
        ("shop", "front", "app: front"),
        ("shop", "cart", "app: cart"),
        ("shop", "stock", "app: stock"),
    ]));
    let pod = |ns: &str, name: &str| n.add_pod(ns, name, &[80]);
    let (db, api, web) = (pod("x", "db"), pod("x", "api"), pod("x", "web"));
    let (front, cart, stock) = (
        pod("shop", "front"),
        pod("shop", "cart"),
        pod("shop", "stock"),
    );
    n.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db, namespace: x}\nspec:\n  podSelector: {matchLabels: {role: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {role: api}}}]}]\n",
    );

    // Without the token no data is served; the URL palisadectl prints
    // carries it.
    assert!(
        http_status(&n, "GET /api/map HTTP/1.0\r\n\r\n").contains("401"),
        "no token"
    );
    assert!(
        http_status(
            &n,
            "GET /api/map HTTP/1.0\r\nAuthorization: Bearer 0123456789abcdef0123456789abcdef\r\n\r\n"
        )
        .contains("401"),
        "a wrong token"
    );
    assert!(
        http_status(&n, "GET / HTTP/1.0\r\n\r\n").contains("200"),
        "the page itself holds no data"
    );
    let out = n.ctl(&["console"], None);
    assert!(
        out.status.success(),
        "palisadectl console: {}",
        describe(&out)
    );
    let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        url.starts_with(&format!("http://127.0.0.1:{CONSOLE_PORT}/#token=")),
        "{url}"
    );

    assert!(connect(&api, &db, 80), "api -> db is allowed");
    assert!(!connect(&web, &db, 80), "web -> db is denied");
    assert!(connect(&db, &api, 80), "db -> api is allowed");

    let driver = Driver::start(&n.netns.path, DRIVER_PORT);
    let netns = n.netns.path.clone();
    let n = Arc::new(n);
    let n2 = Arc::clone(&n);
    in_netns(&netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let c = driver.browser().await;
            run(&c, &n2, &url, [&db, &api, &web], [&front, &cart, &stock]).await;
            c.close().await.unwrap();
        });
    });
}

async fn run(c: &Client, n: &Node, url: &str, x: [&Arc<Pod>; 3], shop: [&Arc<Pod>; 3]) {
    let [db, api, web] = x;
    let [front, cart, stock] = shop;
    c.goto(url).await.unwrap();
    // The token moved to the tab's session storage and left the address
    // bar.
    let now = c.current_url().await.unwrap();
    assert!(!now.as_str().contains("token"), "{now}");

    // The map: pods in their namespaces, edges coloured by verdict.
    until(
        c,
        "the denied edge web -> db",
        &format!(
            "document.querySelector('{}')",
            edge_sel("x/web", "x/db").replace('\'', "\\'")
        ),
    )
    .await;
    until(
        c,
        "the allowed edge api -> db",
        &format!(
            "document.querySelector('{}')",
            edge_sel("x/api", "x/db").replace('\'', "\\'")
        ),
    )
    .await;
    let edges = edge_verdicts(c).await;
    for want in [
        ("pod:x/api", "pod:x/db", "allowed"),
        ("pod:x/web", "pod:x/db", "denied"),
        ("pod:x/db", "pod:x/api", "allowed"),
    ] {
        assert!(
            edges.contains(&(want.0.into(), want.1.into(), want.2.into())),
            "edge {want:?} missing from {edges:?}"
        );
    }
    let colours = c
        .execute(
            "const s = (v) => getComputedStyle(document.querySelector(`g.edge[data-verdict=${v}] path.line`)).stroke; return [s('allowed'), s('denied')];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        colours,
        json!(["rgb(46, 125, 50)", "rgb(198, 40, 40)"]),
        "allowed edges green, denied red"
    );
    for (id, group) in [("pod:x/db", "x"), ("pod:x/web", "x")] {
        let label = c
            .find(Locator::Css(&format!("g.node[data-id=\"{id}\"]")))
            .await
            .unwrap_or_else(|e| panic!("node {id}: {e}"))
            .attr("aria-label")
            .await
            .unwrap()
            .unwrap_or_default();
        assert!(label.contains(&format!("pod {group}/")), "{id}: {label}");
    }
    shot(c, "map").await;

    // A new connection appears live.
    let start = Instant::now();
    assert!(connect(web, api, 80), "web -> api is allowed");
    until(
        c,
        "the new edge web -> api",
        &format!(
            "document.querySelector('{}')",
            edge_sel("x/web", "x/api").replace('\'', "\\'")
        ),
    )
    .await;
    eprintln!(
        "new connection to its edge on the map: {:?}",
        start.elapsed()
    );

    // Clicking the denied edge explains it: the isolating policy.
    c.find(Locator::Css(&format!(
        "{} .edge-handle",
        edge_sel("x/web", "x/db")
    )))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    until(c, "the isolating policy of web -> db", "document.getElementById('isolated-by') && document.getElementById('isolated-by').textContent.includes('x/db')").await;
    until(
        c,
        "the explanation of web -> db",
        "[...document.querySelectorAll('pre.explain')].some(p => p.textContent.includes('x/db'))",
    )
    .await;
    until(
        c,
        "the records of web -> db",
        "document.querySelectorAll('#edge-records tbody tr').length >= 1",
    )
    .await;
    shot(c, "denied-edge").await;

    // The keyboard reaches an edge too: focus it, press Enter.
    c.execute(
        &format!(
            "document.querySelector('{}').focus();",
            edge_sel("x/api", "x/db").replace('\'', "\\'")
        ),
        vec![],
    )
    .await
    .unwrap();
    let enter = KeyActions::new("keyboard".into())
        .then(KeyAction::Down {
            value: Key::Enter.into(),
        })
        .then(KeyAction::Up {
            value: Key::Enter.into(),
        });
    c.perform_actions(enter).await.unwrap();
    until(c, "the details of api -> db, opened with the keyboard", "document.getElementById('edge-title') && document.getElementById('edge-title').textContent.includes('allowed')").await;

    // Filters: only denied edges.
    c.find(Locator::Id("f-verdict"))
        .await
        .unwrap()
        .select_by_value("denied")
        .await
        .unwrap();
    click(c, "#filters button[type=submit]").await;
    until(c, "only denied edges", "document.querySelectorAll('g.edge').length > 0 && [...document.querySelectorAll('g.edge')].every(e => e.dataset.verdict === 'denied')").await;
    c.find(Locator::Id("f-verdict"))
        .await
        .unwrap()
        .select_by_value("")
        .await
        .unwrap();
    // Only one pod's edges, then only one port's.
    c.find(Locator::Id("f-pod"))
        .await
        .unwrap()
        .send_keys("x/web")
        .await
        .unwrap();
    click(c, "#filters button[type=submit]").await;
    until(c, "only x/web's edges", "document.querySelectorAll('g.edge').length >= 2 && [...document.querySelectorAll('g.edge')].every(e => e.dataset.from === 'pod:x/web' || e.dataset.to === 'pod:x/web')").await;
    c.find(Locator::Id("f-pod"))
        .await
        .unwrap()
        .clear()
        .await
        .unwrap();
    c.find(Locator::Id("f-port"))
        .await
        .unwrap()
        .send_keys("80")
        .await
        .unwrap();
    click(c, "#filters button[type=submit]").await;
    until(c, "only port 80's edges", "document.querySelectorAll('g.edge').length >= 4 && [...document.querySelectorAll('g.edge')].every(e => e.dataset.ports === '80/TCP')").await;
    c.find(Locator::Id("f-port"))
        .await
        .unwrap()
        .clear()
        .await
        .unwrap();
    // Text is readable: WCAG AA contrast (4.5:1) for body text, the
    // verdict words and the table headers.
    let low = c
        .execute(
            "const lum = (c) => { const [r, g, b] = c.match(/\\d+/g).slice(0, 3).map(v => { v = v / 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); }); return 0.2126 * r + 0.7152 * g + 0.0722 * b; }; \
             const ratio = (e) => { const a = lum(getComputedStyle(e).color), b = 1; return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05); }; \
             return [...document.querySelectorAll('body, th, td.allowed, td.denied, td.audit, #counts, label, .hint')].filter(e => ratio(e) < 4.5).map(e => e.tagName + '.' + e.className + ' ' + getComputedStyle(e).color);",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(low, json!([]), "text below 4.5:1 contrast on white");
    c.find(Locator::Id("f-namespace"))
        .await
        .unwrap()
        .send_keys("shop")
        .await
        .unwrap();
    click(c, "#filters button[type=submit]").await;

    // Learn -> audit -> enforce, for namespace shop.
    assert!(connect(front, cart, 80));
    assert!(connect(cart, stock, 80));
    until(c, "shop's traffic", &format!("document.querySelector('{}') && document.querySelector('{}') && ![...document.querySelectorAll('g.edge')].some(e => e.dataset.from.startsWith('pod:x/'))", edge_sel("shop/front", "shop/cart").replace('\'', "\\'"), edge_sel("shop/cart", "shop/stock").replace('\'', "\\'"))).await;
    c.find(Locator::Id("l-namespace"))
        .await
        .unwrap()
        .send_keys("shop")
        .await
        .unwrap();
    click(c, "#l-learn").await;
    until(
        c,
        "learned policies",
        "document.getElementById('l-yaml').value.includes('kind: NetworkPolicy')",
    )
    .await;
    let yaml = c
        .execute("return document.getElementById('l-yaml').value;", vec![])
        .await
        .unwrap();
    let yaml = yaml.as_str().unwrap().to_owned();
    assert!(
        yaml.contains("namespace: shop") && !yaml.contains("namespace: x"),
        "{yaml}"
    );
    shot(c, "learn").await;
    click(c, "#l-audit").await;
    until(
        c,
        "the policies applied in audit mode",
        "document.getElementById('l-result').dataset.mode === 'audit'",
    )
    .await;
    let got = n.ctl(&["get", "policies", "-n", "shop", "-o", "json"], None);
    assert!(got.status.success(), "{}", describe(&got));
    let listed: Value = serde_json::from_slice(&got.stdout).unwrap();
    let items = listed["items"].as_array().unwrap();
    assert!(
        !items.is_empty(),
        "palisadectl get shows the console's policies"
    );
    assert!(
        items
            .iter()
            .all(|p| p["metadata"]["annotations"]["palisade.io/mode"] == "audit"),
        "{listed}"
    );
    // Traffic never observed: audit lets it through and shows it.
    assert!(connect(stock, front, 80), "audit drops nothing");
    until(
        c,
        "the audit edge stock -> front",
        &format!(
            "document.querySelector('{}[data-verdict=audit]')",
            edge_sel("shop/stock", "shop/front").replace('\'', "\\'")
        ),
    )
    .await;
    shot(c, "audit").await;
    click(c, "#l-enforce").await;
    until(
        c,
        "the policies enforced",
        "document.getElementById('l-result').dataset.mode === 'enforce'",
    )
    .await;
    assert!(
        !connect(stock, front, 80),
        "enforced: what audit reported is dropped"
    );
    assert!(
        connect(front, cart, 80),
        "enforced: observed traffic still flows"
    );
    assert!(
        connect(cart, stock, 80),
        "enforced: observed traffic still flows"
    );
    // The CLI gives the same verdicts as the traffic.
    for (from, to, allowed) in [
        ("shop/front", "shop/cart", true),
        ("shop/cart", "shop/stock", true),
        ("shop/stock", "shop/front", false),
    ] {
        let out = n.ctl(
            &[
                "explain", "--from", from, "--to", to, "--port", "80/TCP", "-o", "json",
            ],
            None,
        );
        assert!(out.status.success(), "{}", describe(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            v["verdict"],
            if allowed { "allowed" } else { "denied" },
            "explain {from} -> {to}: {v}"
        );
    }
    until(
        c,
        "the denied edge stock -> front",
        &format!(
            "document.querySelector('{}[data-verdict=denied]')",
            edge_sel("shop/stock", "shop/front").replace('\'', "\\'")
        ),
    )
    .await;

    // The policies view: what is in force on each pod.
    click(c, "#tab-policies").await;
    until(c, "shop/front's policies", "[...document.querySelectorAll('#policies tr')].some(r => r.dataset.pod === 'shop/front' && r.textContent.includes('(enforce)'))").await;
    until(c, "x/db's policy", "[...document.querySelectorAll('#policies tr')].some(r => r.dataset.pod === 'x/db' && r.textContent.includes('x/db (enforce)') && r.textContent.includes('role=api'))").await;
    until(c, "the pods x/db selects", "[...document.querySelectorAll('#policy-pods tr')].some(r => r.dataset.policy === 'x/db' && r.cells[1].textContent === 'x/db')").await;
    shot(c, "policies").await;
    let _ = (db, api, web);
}

/// `GET` or `POST` on a console in a namespace, with the token; (status
/// line, body).
fn call(netns: &std::path::Path, port: u16, token: &str, request: &str) -> (String, String) {
    let request = request.replace("TOKEN", token);
    in_netns(netns, move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        (
            head.lines().next().unwrap_or_default().to_owned(),
            body.to_owned(),
        )
    })
}

#[test]
fn in_cluster_mode_each_console_shows_what_every_node_saw() {
    const PORT: u16 = 19972;
    let token = "cluster-console-token-0123456789";
    let dir = std::env::temp_dir().join(format!("palisade-console-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, token).unwrap();
    let c = Cluster::with_daemon_args(
        2,
        Topology::Vxlan,
        false,
        serde_json::Map::new(),
        None,
        vec![
            "--console-listen".into(),
            format!("0.0.0.0:{PORT}"),
            "--console-token-file".into(),
            token_file.display().to_string(),
            "--console-cluster".into(),
        ],
    );
    c.namespace("x", &[]);
    let web = c.add_pod(0, "x", "web", &[("role", "web")], &[]);
    let db = c.add_pod(1, "x", "db", &[("role", "db")], &[80]);
    c.apply_policy(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db, namespace: x}\nspec:\n  podSelector: {matchLabels: {role: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {role: api}}}]}]\n",
    );
    c.settle();
    // node-0 lets web's SYN out (no egress policy); node-1 drops it.
    wait_for("the policy on node-1 to drop web -> db", DEADLINE, || {
        !probe(&web.netns, db.addr(false), Proto::Tcp, 80, PROBE_TIMEOUT)
    });
    let denied = "pod:x/web>pod:x/db>denied";
    for (i, other) in [(0, "node-1"), (1, "node-0")] {
        let netns = &c.nodes[i].netns.path;
        let start = Instant::now();
        let map = loop {
            let (status, body) = call(
                netns,
                PORT,
                token,
                "GET /api/map HTTP/1.0\r\nAuthorization: Bearer TOKEN\r\n\r\n",
            );
            assert!(status.contains("200"), "node-{i}: {status} {body}");
            let map: Value = serde_json::from_str(&body).unwrap();
            let ids: BTreeSet<&str> = map["edges"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|e| e["id"].as_str())
                .collect();
            if ids.contains(denied) {
                break map;
            }
            if start.elapsed() > DEADLINE {
                let records = |j: usize| {
                    call(
                        &c.nodes[j].netns.path,
                        PORT,
                        token,
                        "GET /api/records HTTP/1.0\r\nAuthorization: Bearer TOKEN\r\n\r\n",
                    )
                    .1
                };
                panic!(
                    "node-{i}'s console never showed {denied} (the connection as both nodes saw it); it has {ids:?}\nnode-0's records: {}\nnode-1's records: {}\n{}",
                    records(0),
                    records(1),
                    c.nodes[i].daemon_output()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        // The pod on the other node is named with its node.
        let remote = if i == 0 { "pod:x/db" } else { "pod:x/web" };
        let node = map["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == remote)
            .unwrap_or_else(|| panic!("node-{i}: no {remote} in {map}"));
        assert_eq!(node["meta"]["node"], other, "node-{i}: {node}");
        // Nothing but the denied connection: its allowed egress record
        // from node-0 does not make a second, allowed edge.
        assert!(
            !map["edges"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["id"] == "pod:x/web>pod:x/db>allowed"),
            "node-{i}: {map}"
        );
    }
    // Policies belong to the API server: the console does not write them.
    let body = r#"{"yaml": "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a, namespace: x}\nspec: {podSelector: {}}\n", "mode": "audit"}"#;
    let (status, answer) = call(
        &c.nodes[0].netns.path,
        PORT,
        token,
        &format!(
            "POST /api/apply HTTP/1.0\r\nAuthorization: Bearer TOKEN\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(
        status.contains("409") && answer.contains("Kubernetes API server"),
        "{status} {answer}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
