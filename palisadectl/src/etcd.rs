//! The etcd datastore: one set of objects for many hosts without
//! Kubernetes (`--etcd-endpoints`, or `/etc/palisade/datastore.yaml`).
//!
//! With it, `palisadectl apply`, `delete` and `get` read and write the
//! objects in etcd instead of this host's store, and every host's daemon
//! lists and watches them and applies each change to its own engine, as
//! cluster mode does with the Kubernetes API.
//!
//! Each host's daemon also publishes the containers it enforces on, as Pod
//! objects under `PREFIX/endpoints/HOST/NAMESPACE/NAME`, attached to a lease
//! of the host's that it keeps alive: the other hosts give their addresses
//! the identity of their namespace and labels, so selectors match
//! containers on every host. A host that stops (or loses etcd for longer
//! than the lease) has its containers expire on the others. Identities are
//! not shared: each host numbers them itself from the shared labels (they
//! never leave the host; packets carry none).
//!
//! Keys: `PREFIX/objects/KIND/NAME` for cluster-scoped kinds (Namespace and
//! the tiers) and `PREFIX/objects/KIND/NAMESPACE/NAME` for the others. A
//! value is the object as written, JSON, without
//! `metadata.resourceVersion`: an object's resourceVersion is the mod
//! revision of its key. An apply that names a resourceVersion is refused
//! unless the object is still at that revision (a stale update is refused,
//! not lost); an apply without one replaces what is there, as `kubectl
//! apply` does.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    path::PathBuf,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions,
    Identity, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use k8s_openapi::api::core::v1::Pod;
use palisade::{
    cluster::{ApiChanges, ApiObject, Placement},
    daemon::Server,
    node::Change,
    policy::{self, Kind, Object, ObjectRef},
    store::{State, Store, StoredPalisadePolicy, StoredPolicy, StoredTierPolicy},
};
use serde::Deserialize;

/// Read when no `--datastore-config` is given, if it exists.
pub const DEFAULT_CONFIG: &str = "/etc/palisade/datastore.yaml";
/// Where palisade's keys live unless the settings say otherwise.
pub const DEFAULT_PREFIX: &str = "/palisade";
/// etcd's default `--max-txn-ops`: the most compares, or writes, one
/// transaction may hold.
const TXN_OPS: usize = 128;
/// Every kind the datastore holds.
pub const KINDS: &[Kind] = &[
    Kind::Namespace,
    Kind::Pod,
    Kind::NetworkPolicy,
    Kind::AdminNetworkPolicy,
    Kind::BaselineAdminNetworkPolicy,
    Kind::ClusterNetworkPolicy,
    Kind::PalisadeNetworkPolicy,
];
/// Kinds that live in a namespace (deleted with it).
const NAMESPACED: &[Kind] = &[Kind::Pod, Kind::NetworkPolicy, Kind::PalisadeNetworkPolicy];

/// The datastore options every command takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Flags {
    /// Datastore settings (YAML: `etcd:` with endpoints, caFile, certFile,
    /// keyFile, prefix). Default: /etc/palisade/datastore.yaml when it
    /// exists; without settings, objects stay on this host.
    #[arg(long, global = true, env = "PALISADE_DATASTORE_CONFIG")]
    pub datastore_config: Option<PathBuf>,
    /// etcd members, comma-separated (https://10.0.0.1:2379,...): objects
    /// are read and written there, for every host.
    #[arg(
        long,
        global = true,
        env = "PALISADE_ETCD_ENDPOINTS",
        value_delimiter = ','
    )]
    pub etcd_endpoints: Vec<String>,
    /// CA certificate (PEM) that signed the etcd members' certificates.
    #[arg(long, global = true, env = "PALISADE_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) to present to etcd.
    #[arg(long, global = true, env = "PALISADE_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, global = true, env = "PALISADE_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
    /// Key prefix of palisade's objects in etcd (default /palisade).
    #[arg(long, global = true, env = "PALISADE_ETCD_PREFIX")]
    pub etcd_prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConfigFile {
    etcd: EtcdFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EtcdFile {
    #[serde(default)]
    endpoints: Vec<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    prefix: Option<String>,
}

/// Where the datastore is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub endpoints: Vec<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub prefix: String,
}

impl Flags {
    /// The datastore settings: the file, then the flags over it. None
    /// when there are none (objects stay on this host).
    pub fn settings(&self) -> Result<Option<Settings>> {
        let (path, explicit) = match &self.datastore_config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        let mut file = EtcdFile::default();
        let mut from_file = false;
        match fs::read_to_string(&path) {
            Ok(text) => {
                let parsed: ConfigFile = serde_yaml::from_str(&text).with_context(|| {
                    format!(
                        "{}: not valid datastore settings (expected `etcd:` with endpoints, \
                         caFile, certFile, keyFile and prefix)",
                        path.display()
                    )
                })?;
                file = parsed.etcd;
                from_file = true;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && !explicit => {}
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        }
        if !self.etcd_endpoints.is_empty() {
            file.endpoints = self.etcd_endpoints.clone();
        }
        let ca = self.etcd_ca.clone().or(file.ca_file);
        let cert = self.etcd_cert.clone().or(file.cert_file);
        let key = self.etcd_key.clone().or(file.key_file);
        let prefix = self.etcd_prefix.clone().or(file.prefix);
        let endpoints: Vec<String> = file
            .endpoints
            .iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            if from_file {
                bail!(
                    "{}: etcd.endpoints is empty; list the etcd members (https://HOST:2379)",
                    path.display()
                );
            }
            if ca.is_some() || cert.is_some() || key.is_some() || prefix.is_some() {
                bail!(
                    "--etcd-ca, --etcd-cert, --etcd-key and --etcd-prefix need the members too \
                     (--etcd-endpoints or a datastore settings file)"
                );
            }
            return Ok(None);
        }
        let settings = Settings {
            endpoints,
            ca,
            cert,
            key,
            prefix: prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_owned()),
        };
        settings.validate()?;
        Ok(Some(settings))
    }
}

impl Settings {
    fn validate(&self) -> Result<()> {
        for e in &self.endpoints {
            let rest = e
                .strip_prefix("https://")
                .or_else(|| e.strip_prefix("http://"))
                .ok_or_else(|| {
                    anyhow!("etcd endpoint {e:?}: write it as https://HOST:PORT (or http://)")
                })?;
            let port = rest.rsplit_once(':').map(|(_, p)| p.trim_end_matches('/'));
            if rest.is_empty() || port.is_none_or(|p| p.parse::<u16>().is_err()) {
                bail!("etcd endpoint {e:?}: write it as https://HOST:PORT");
            }
        }
        let tls = self.endpoints.iter().any(|e| e.starts_with("https://"));
        let plain = self.endpoints.iter().any(|e| e.starts_with("http://"));
        if tls && plain {
            bail!("etcd endpoints mix https:// and http://: use one scheme for every member");
        }
        if tls && self.ca.is_none() {
            bail!(
                "https etcd endpoints need the CA that signed the members' certificates \
                 (--etcd-ca or etcd.caFile)"
            );
        }
        if self.cert.is_some() != self.key.is_some() {
            bail!(
                "a client certificate needs its key and a key its certificate \
                 (--etcd-cert and --etcd-key, or etcd.certFile and etcd.keyFile)"
            );
        }
        if !tls && (self.ca.is_some() || self.cert.is_some()) {
            bail!("TLS files are given but the etcd endpoints are http://: use https://");
        }
        if !self.prefix.starts_with('/') || self.prefix.len() < 2 || self.prefix.ends_with('/') {
            bail!(
                "etcd prefix {:?}: write it as /NAME (a leading slash, none at the end)",
                self.prefix
            );
        }
        Ok(())
    }

    /// Where this is, for messages.
    pub fn describe(&self) -> String {
        format!("etcd at {}", self.endpoints.join(","))
    }
}

fn read_pem(path: &PathBuf, what: &str) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("read the {what} {}", path.display()))
}

/// A connection to the datastore.
#[derive(Clone)]
pub struct Datastore {
    client: Client,
    prefix: String,
    what: String,
}

impl std::fmt::Debug for Datastore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datastore")
            .field("prefix", &self.prefix)
            .field("what", &self.what)
            .finish()
    }
}

/// What a list found: the objects (their resourceVersion set), and keys
/// whose value is not a valid object (skipped, with why).
#[derive(Debug, Default)]
pub struct Listing {
    pub objects: Vec<Object>,
    pub invalid: Vec<String>,
}

/// One object to write.
struct Write {
    reference: ObjectRef,
    key: String,
    value: Vec<u8>,
    /// The resourceVersion the writer read, if it named one.
    expect: Option<i64>,
}

impl Datastore {
    pub async fn connect(s: &Settings) -> Result<Self> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some(ca) = &s.ca {
            let mut tls =
                TlsOptions::new().ca_certificate(Certificate::from_pem(read_pem(ca, "etcd CA")?));
            if let (Some(cert), Some(key)) = (&s.cert, &s.key) {
                tls = tls.identity(Identity::from_pem(
                    read_pem(cert, "etcd client certificate")?,
                    read_pem(key, "etcd client key")?,
                ));
            }
            opts = opts.with_tls(tls);
        }
        // The first member that answers (a request to a balanced channel
        // fails when it lands on a member that is down).
        let mut failures = Vec::new();
        for endpoint in &s.endpoints {
            let answered = async {
                let mut client = Client::connect([endpoint], Some(opts.clone())).await?;
                client.status().await?;
                Ok::<_, etcd_client::Error>(client)
            };
            match tokio::time::timeout(Duration::from_secs(5), answered).await {
                Ok(Ok(client)) => {
                    return Ok(Datastore {
                        client,
                        prefix: s.prefix.clone(),
                        what: format!("etcd at {endpoint}"),
                    });
                }
                Ok(Err(e)) => failures.push(format!("{endpoint}: {e}")),
                Err(_) => failures.push(format!("{endpoint}: no answer within 5 s")),
            }
        }
        Err(anyhow!(Unreachable(failures.join("; "))))
    }

    fn objects_prefix(&self) -> String {
        format!("{}/objects/", self.prefix)
    }

    fn endpoints_prefix(&self) -> String {
        format!("{}/endpoints/", self.prefix)
    }

    /// The host, namespace and name an endpoint key names.
    fn endpoint_key<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str, &'k str)> {
        let rest = key.strip_prefix(&self.endpoints_prefix())?;
        let mut parts = rest.split('/');
        let (host, namespace, name) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || host.is_empty() || namespace.is_empty() || name.is_empty() {
            return None;
        }
        Some((host, namespace, name))
    }

    /// A container another host published, as the Pod it stands for there
    /// (None: not an endpoint key).
    fn decode_endpoint(&self, key: &str, value: &[u8]) -> Result<Option<(String, ApiObject)>> {
        let Some((host, namespace, name)) = self.endpoint_key(key) else {
            return Ok(None);
        };
        let pod: Pod = serde_json::from_slice(value).context("not a Pod object")?;
        if pod.metadata.namespace.as_deref() != Some(namespace)
            || pod.metadata.name.as_deref() != Some(remote_name(name, host).as_str())
            || pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(host)
        {
            bail!("holds a Pod whose namespace, name or node is not what its key names");
        }
        Ok(Some((host.to_owned(), ApiObject::pod(&pod)?)))
    }

    fn kind_prefix(&self, kind: Kind) -> String {
        format!("{}{}/", self.objects_prefix(), kind.as_str())
    }

    fn key(&self, r: &ObjectRef) -> String {
        if r.namespace.is_empty() {
            format!("{}{}", self.kind_prefix(r.kind), r.name)
        } else {
            format!("{}{}/{}", self.kind_prefix(r.kind), r.namespace, r.name)
        }
    }

    /// The object a key names (None: not one of palisade's object keys).
    fn reference(&self, key: &str) -> Option<ObjectRef> {
        let rest = key.strip_prefix(&self.objects_prefix())?;
        let (kind, rest) = rest.split_once('/')?;
        let kind = *KINDS.iter().find(|k| k.as_str() == kind)?;
        let (namespace, name) = if NAMESPACED.contains(&kind) {
            rest.split_once('/')?
        } else {
            ("", rest)
        };
        if name.is_empty() || name.contains('/') {
            return None;
        }
        Some(ObjectRef {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    fn failed(&self, what: &str) -> String {
        format!("{what} in {}", self.what)
    }

    /// Create or replace objects. Either every object is written or, when
    /// one names a resourceVersion that is no longer current, none is.
    pub async fn apply(&mut self, objects: Vec<Object>) -> Result<Vec<(ObjectRef, Change)>> {
        let mut writes = Vec::with_capacity(objects.len());
        let mut seen = BTreeSet::new();
        for o in objects {
            let reference = o.reference();
            if !seen.insert(reference.clone()) {
                bail!("{reference} appears twice; apply each object once");
            }
            let mut json = o.to_json().with_context(|| format!("encode {reference}"))?;
            let expect = take_resource_version(&mut json)
                .with_context(|| format!("{reference}: metadata.resourceVersion"))?;
            let value = serde_json::to_vec(&json).with_context(|| format!("encode {reference}"))?;
            writes.push(Write {
                key: self.key(&reference),
                reference,
                value,
                expect,
            });
        }
        // Another writer may change an object between the read and the
        // write; the write then fails as a whole and is planned again.
        for _attempt in 0..5 {
            let keys: Vec<String> = writes.iter().map(|w| w.key.clone()).collect();
            let current = self.values(&keys).await?;
            for w in &writes {
                let Some(expect) = w.expect else { continue };
                match current.get(&w.key) {
                    Some((rev, _)) if *rev == expect => {}
                    Some((rev, _)) => bail!(
                        "{} was changed after resourceVersion {expect} (it is at {rev} now): \
                         nothing was applied; get it again, or leave resourceVersion out to \
                         replace it",
                        w.reference
                    ),
                    None => bail!(
                        "{} does not exist any more (resourceVersion {expect} was given): \
                         nothing was applied; leave resourceVersion out to create it again",
                        w.reference
                    ),
                }
            }
            let mut changes = Vec::with_capacity(writes.len());
            let mut compares = Vec::new();
            let mut puts = Vec::new();
            for w in &writes {
                let (rev, change) = match current.get(&w.key) {
                    None => (0, Change::Created),
                    Some((rev, old)) if *old == w.value => (*rev, Change::Unchanged),
                    Some((rev, _)) => (*rev, Change::Configured),
                };
                changes.push((w.reference.clone(), change));
                compares.push(Compare::mod_revision(w.key.as_str(), CompareOp::Equal, rev));
                if change != Change::Unchanged {
                    puts.push(TxnOp::put(w.key.as_str(), w.value.clone(), None));
                }
            }
            if compares.len() > TXN_OPS {
                bail!(
                    "{} objects in one apply: the etcd datastore writes at most {TXN_OPS} \
                     objects in one transaction (etcd's --max-txn-ops); apply them in smaller \
                     files",
                    compares.len()
                );
            }
            if puts.is_empty() {
                return Ok(changes);
            }
            let resp = self
                .client
                .txn(Txn::new().when(compares).and_then(puts))
                .await
                .with_context(|| self.failed("write objects"))?;
            if resp.succeeded() {
                return Ok(changes);
            }
        }
        bail!(
            "the objects kept changing while they were applied (another writer?): nothing was \
             applied; try again"
        )
    }

    /// Each existing key's mod revision and value.
    async fn values(&mut self, keys: &[String]) -> Result<BTreeMap<String, (i64, Vec<u8>)>> {
        let mut out = BTreeMap::new();
        for chunk in keys.chunks(TXN_OPS) {
            let ops: Vec<TxnOp> = chunk.iter().map(|k| TxnOp::get(k.as_str(), None)).collect();
            let resp = self
                .client
                .txn(Txn::new().and_then(ops))
                .await
                .with_context(|| self.failed("read objects"))?;
            for op in resp.op_responses() {
                if let etcd_client::TxnOpResponse::Get(g) = op {
                    for kv in g.kvs() {
                        out.insert(
                            String::from_utf8_lossy(kv.key()).into_owned(),
                            (kv.mod_revision(), kv.value().to_vec()),
                        );
                    }
                }
            }
        }
        Ok(out)
    }

    /// Delete objects; deleting a Namespace deletes the objects in it, as
    /// Kubernetes does.
    pub async fn delete(&mut self, refs: Vec<ObjectRef>) -> Result<Vec<(ObjectRef, Change)>> {
        let keys: Vec<String> = refs.iter().map(|r| self.key(r)).collect();
        let exists = self.values(&keys).await?;
        let mut out = Vec::with_capacity(refs.len());
        for (r, key) in refs.into_iter().zip(keys) {
            if !exists.contains_key(&key) {
                out.push((r, Change::NotFound));
                continue;
            }
            let mut ops = vec![TxnOp::delete(key.as_str(), None)];
            if r.kind == Kind::Namespace {
                for kind in NAMESPACED {
                    let prefix = format!("{}{}/", self.kind_prefix(*kind), r.name);
                    ops.push(TxnOp::delete(
                        prefix.as_str(),
                        Some(DeleteOptions::new().with_prefix()),
                    ));
                }
            }
            self.client
                .txn(Txn::new().and_then(ops))
                .await
                .with_context(|| self.failed(&format!("delete {r}")))?;
            out.push((r, Change::Deleted));
        }
        Ok(out)
    }

    /// Every object of the datastore, at one revision.
    pub async fn list(&mut self) -> Result<Listing> {
        let prefix = self.objects_prefix();
        let resp = self
            .client
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .with_context(|| self.failed("list objects"))?;
        let mut listing = Listing::default();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            match self.decode(&key, kv.value(), kv.mod_revision()) {
                Ok(Some(o)) => listing.objects.push(o),
                Ok(None) => {}
                Err(e) => listing.invalid.push(format!("{key}: {e:#}")),
            }
        }
        Ok(listing)
    }

    /// Every object and every published endpoint of hosts other than
    /// `this_host`, at one revision, as the engine's inputs.
    async fn list_all(&mut self, this_host: &str) -> Result<(Vec<ApiObject>, i64, Vec<String>)> {
        let prefix = format!("{}/", self.prefix);
        let resp = self
            .client
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .with_context(|| self.failed("list objects"))?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let (mut objects, mut invalid) = (Vec::new(), Vec::new());
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            match self.entry(&key, kv.value(), kv.mod_revision(), this_host) {
                Ok(Some(o)) => objects.push(o),
                Ok(None) => {}
                Err(e) => invalid.push(format!("{key}: {e:#}")),
            }
        }
        Ok((objects, revision, invalid))
    }

    /// What a key holds for the engine: an object, another host's
    /// endpoint, or nothing (this host's own endpoints, other keys).
    fn entry(
        &self,
        key: &str,
        value: &[u8],
        revision: i64,
        this_host: &str,
    ) -> Result<Option<ApiObject>> {
        if key.starts_with(&self.endpoints_prefix()) {
            return Ok(self
                .decode_endpoint(key, value)?
                .and_then(|(host, o)| (host != this_host).then_some(o)));
        }
        Ok(self.decode(key, value, revision)?.map(api_object))
    }

    /// What a deleted key took away from the engine.
    fn gone(&self, key: &str, this_host: &str) -> Option<ObjectRef> {
        if let Some((host, namespace, name)) = self.endpoint_key(key) {
            return (host != this_host).then(|| ObjectRef {
                kind: Kind::Pod,
                namespace: namespace.to_owned(),
                name: remote_name(name, host),
            });
        }
        self.reference(key)
    }

    /// The object stored under key (None: not an object key of palisade's).
    fn decode(&self, key: &str, value: &[u8], revision: i64) -> Result<Option<Object>> {
        let Some(reference) = self.reference(key) else {
            return Ok(None);
        };
        let mut json: serde_json::Value =
            serde_json::from_slice(value).context("not a JSON object")?;
        let meta = json
            .get_mut("metadata")
            .and_then(|m| m.as_object_mut())
            .ok_or_else(|| anyhow!("no metadata"))?;
        meta.insert(
            "resourceVersion".into(),
            serde_json::Value::String(revision.to_string()),
        );
        let object = policy::decode_object(json)?;
        if object.reference() != reference {
            bail!("holds {}, not what its key names", object.reference());
        }
        Ok(Some(object))
    }
}

/// Remove `metadata.resourceVersion` from an object; its value, if any.
fn take_resource_version(json: &mut serde_json::Value) -> Result<Option<i64>> {
    let Some(meta) = json.get_mut("metadata").and_then(|m| m.as_object_mut()) else {
        return Ok(None);
    };
    match meta.remove("resourceVersion") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) if s.is_empty() => Ok(None),
        Some(serde_json::Value::String(s)) => match s.parse::<i64>() {
            Ok(v) if v > 0 => Ok(Some(v)),
            _ => bail!(
                "{s:?} is not a resourceVersion of this datastore (a positive number, as \
                 `palisadectl get -o yaml` shows it)"
            ),
        },
        Some(other) => bail!("{other} is not a resourceVersion (a string such as \"42\")"),
    }
}

/// No member of the datastore answered.
#[derive(Debug)]
struct Unreachable(String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no etcd member answers (is etcd up and reachable?): {}",
            self.0
        )
    }
}

impl std::error::Error for Unreachable {}

/// Whether an error may pass by itself: no member answered, a member went
/// away, or the cluster was electing a leader.
fn transient(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        if c.is::<Unreachable>() {
            return true;
        }
        match c.downcast_ref::<etcd_client::Error>() {
            Some(etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_)) => true,
            // UNAVAILABLE (14), DEADLINE_EXCEEDED (4).
            Some(etcd_client::Error::GRpcStatus(s)) => matches!(i32::from(s.code()), 4 | 14),
            _ => false,
        }
    })
}

/// Whether etcd refused the request (PERMISSION_DENIED, UNAUTHENTICATED).
fn denied(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<etcd_client::Error>(),
            Some(etcd_client::Error::GRpcStatus(s)) if matches!(i32::from(s.code()), 7 | 16)
        )
    })
}

/// Connect and run `op`, again while it fails in a way that passes by
/// itself (a member down, a leader election), for up to 15 s.
pub async fn with_retry<T, F, Fut>(settings: &Settings, mut op: F) -> Result<T>
where
    F: FnMut(Datastore) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let result = match Datastore::connect(settings).await {
            Ok(ds) => op(ds).await,
            Err(e) => Err(e),
        };
        match result {
            Err(e) if transient(&e) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) if denied(&e) => {
                return Err(e.context(
                    "etcd refused this client: the user its certificate names lacks a role \
                     that allows this (docs/ETCD.md, \"Roles\")",
                ));
            }
            Err(e) if transient(&e) => {
                return Err(e.context("etcd did not answer (is etcd up and reachable?)"));
            }
            other => return other,
        }
    }
}

/// A current-thread runtime for one command.
pub fn block_on<F: Future>(f: F) -> Result<F::Output> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the etcd client")?
        .block_on(f))
}

/// This host's state for display, with the objects replaced by the
/// datastore's (numbers taken from this host's store where it has the
/// object, else 0: not enforced here yet).
pub fn state_with(mut state: State, listing: Listing) -> State {
    let mut namespaces = BTreeMap::new();
    let mut pods = BTreeMap::new();
    let mut policies = BTreeMap::new();
    let mut tiers = BTreeMap::new();
    let mut pnps = BTreeMap::new();
    for object in listing.objects {
        match object {
            Object::Namespace(n) => {
                namespaces.insert(n.value.name.clone(), *n);
            }
            Object::Pod(p) => {
                pods.insert(format!("{}/{}", p.value.namespace, p.value.name), *p);
            }
            Object::NetworkPolicy(p) => {
                let key = format!("{}/{}", p.value.namespace, p.value.name);
                let id = state.policies.get(&key).map_or(0, |o| o.id);
                policies.insert(
                    key,
                    StoredPolicy {
                        id,
                        object: p.object,
                        policy: p.value,
                    },
                );
            }
            Object::TierPolicy(t) => {
                let key = format!("{}/{}", Kind::from(t.value.kind).as_str(), t.value.name);
                let id = state.tier_policies.get(&key).map_or(0, |o| o.id);
                tiers.insert(
                    key,
                    StoredTierPolicy {
                        id,
                        object: t.object,
                        policy: t.value,
                    },
                );
            }
            Object::PalisadePolicy(p) => {
                let key = format!("{}/{}", p.value.base.namespace, p.value.base.name);
                let id = state.palisade_policies.get(&key).map_or(0, |o| o.id);
                pnps.insert(
                    key,
                    StoredPalisadePolicy {
                        id,
                        object: p.object,
                        policy: p.value,
                    },
                );
            }
        }
    }
    state.namespaces = namespaces;
    state.pods = pods;
    state.policies = policies;
    state.tier_policies = tiers;
    state.palisade_policies = pnps;
    state
}

// ----- the daemon: list, watch, apply; publish this host's endpoints ---------

/// The daemon's datastore settings.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub settings: Settings,
    /// This host's name (its endpoints are published under it).
    pub node_name: String,
    /// This host's state directory (its endpoints).
    pub state_dir: PathBuf,
    /// Seconds this host's published endpoints outlive its last keepalive.
    pub lease_ttl: i64,
}

/// Keep this host's engine equal to the datastore's objects and the other
/// hosts' endpoints, and publish this host's endpoints, in a thread of its
/// own, for as long as the process runs. While etcd cannot be reached,
/// the host keeps enforcing what it last applied.
pub fn start(server: Arc<Server>, opts: DaemonOptions) -> Result<()> {
    thread::Builder::new()
        .name("etcd".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("palisade daemon: cannot start the etcd client: {e}");
                    std::process::exit(1);
                }
            };
            rt.block_on(async {
                tokio::join!(sync_forever(&server, &opts), publish_forever(&opts));
            });
        })
        .context("start the etcd thread")?;
    Ok(())
}

/// The wait before the next attempt: short again once an attempt got
/// going, else doubled up to 10 s.
fn next_backoff(backoff: Duration, got_going: bool) -> Duration {
    if got_going {
        Duration::from_millis(500)
    } else {
        (backoff * 2).min(Duration::from_secs(10))
    }
}

async fn sync_forever(server: &Server, opts: &DaemonOptions) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let mut listed = false;
        if let Err(e) = sync(server, opts, &mut listed).await {
            tracing::warn!(
                "etcd datastore: {e:#}; this host keeps enforcing what it last applied, \
                 trying again in {} ms",
                backoff.as_millis()
            );
        }
        backoff = next_backoff(backoff, listed);
        tokio::time::sleep(backoff).await;
    }
}

/// List everything and apply it as the whole truth, then apply each watch
/// event, until the connection or the watch fails.
async fn sync(server: &Server, opts: &DaemonOptions, listed: &mut bool) -> Result<()> {
    let mut ds = Datastore::connect(&opts.settings).await?;
    let host = opts.node_name.as_str();
    let (upserts, revision, invalid) = ds.list_all(host).await?;
    for bad in &invalid {
        tracing::warn!("etcd datastore: skipped {bad}");
    }
    let changes = ApiChanges {
        upserts,
        complete: KINDS.to_vec(),
        ..Default::default()
    };
    let report = server
        .apply_api(host, &changes)
        .context("apply the datastore's objects")?;
    tracing::info!(
        "etcd datastore: listed {} objects and endpoints at revision {revision} ({} created, \
         {} changed, {} deleted here)",
        changes.upserts.len(),
        report.created,
        report.changed,
        report.deleted
    );
    *listed = true;
    let prefix = format!("{}/", ds.prefix);
    let (_watcher, mut stream) = ds
        .client
        .watch(
            prefix.as_str(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await
        .with_context(|| ds.failed("watch objects"))?
        .split();
    loop {
        let Some(resp) = stream
            .message()
            .await
            .with_context(|| ds.failed("watch objects"))?
        else {
            bail!("the watch ended; listing again");
        };
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                bail!(
                    "the watch fell behind a compaction (revision {}); listing again",
                    resp.compact_revision()
                );
            }
            bail!(
                "the watch was canceled ({}); listing again",
                resp.cancel_reason()
            );
        }
        let mut changes = ApiChanges::default();
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            match ev.event_type() {
                EventType::Put => match ds.entry(&key, kv.value(), kv.mod_revision(), host) {
                    Ok(Some(o)) => changes.upserts.push(o),
                    Ok(None) => {}
                    Err(e) => {
                        // What cannot be enforced is not half-enforced: the
                        // object is taken away here, as if deleted.
                        tracing::warn!("etcd datastore: skipped {key}: {e:#}");
                        changes.deletes.extend(ds.gone(&key, host));
                    }
                },
                EventType::Delete => changes.deletes.extend(ds.gone(&key, host)),
            }
        }
        if changes.is_empty() {
            continue;
        }
        server
            .apply_api(host, &changes)
            .context("apply a datastore change")?;
    }
}

/// The name under which other hosts know a container of `host`: its own
/// name and the host's, as a DNS subdomain (a Pod name), so that
/// containers of the same name on two hosts stay apart.
fn remote_name(name: &str, host: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                let c = c.to_ascii_lowercase();
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect::<String>()
            .trim_matches(|c: char| !c.is_ascii_alphanumeric())
            .to_owned()
    };
    let mut out = format!("{}.{}", clean(name), clean(host));
    out.truncate(253);
    out.trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

/// What this host publishes: one Pod per (namespace, name) of its
/// endpoints, with their addresses, effective labels and named ports, by
/// key.
fn records(state: &State, ds: &Datastore, host: &str) -> BTreeMap<String, Vec<u8>> {
    let mut pods: BTreeMap<(String, String), (BTreeSet<std::net::IpAddr>, policy::Labels)> =
        BTreeMap::new();
    for ep in state.endpoints.values() {
        if ep.namespace.is_empty() || ep.name.is_empty() || ep.name.contains('/') {
            continue;
        }
        let e = pods
            .entry((ep.namespace.clone(), ep.name.clone()))
            .or_insert_with(|| (BTreeSet::new(), state.effective_labels(ep)));
        e.0.extend(ep.addresses.iter().copied());
    }
    let mut out = BTreeMap::new();
    for ((namespace, name), (addresses, labels)) in pods {
        let containers = state
            .pods
            .get(&format!("{namespace}/{name}"))
            .and_then(|p| p.object.spec.as_ref())
            .map(|s| {
                s.containers
                    .iter()
                    .map(|c| serde_json::json!({"name": c.name, "ports": c.ports}))
                    .collect::<Vec<_>>()
            })
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| vec![serde_json::json!({"name": "c"})]);
        let pod = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": remote_name(&name, host),
                "namespace": namespace,
                "labels": labels,
            },
            "spec": {"nodeName": host, "containers": containers},
            "status": {
                "phase": "Running",
                "podIPs": addresses.iter().map(|a| serde_json::json!({"ip": a.to_string()})).collect::<Vec<_>>(),
            },
        });
        let key = format!("{}{host}/{namespace}/{name}", ds.endpoints_prefix());
        out.insert(key, serde_json::to_vec(&pod).unwrap_or_default());
    }
    out
}

async fn publish_forever(opts: &DaemonOptions) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let mut published = false;
        if let Err(e) = publish(opts, &mut published).await {
            tracing::warn!(
                "etcd datastore: publishing this host's endpoints: {e:#}; trying again in {} ms",
                backoff.as_millis()
            );
        }
        backoff = next_backoff(backoff, published);
        tokio::time::sleep(backoff).await;
    }
}

/// Publish this host's endpoints under a new lease and keep them equal to
/// the store's, until the connection fails or the lease is lost.
async fn publish(opts: &DaemonOptions, published: &mut bool) -> Result<()> {
    let mut ds = Datastore::connect(&opts.settings).await?;
    let host = opts.node_name.as_str();
    let store = Store::new(&opts.state_dir);
    let lease = ds
        .client
        .lease_grant(opts.lease_ttl, None)
        .await
        .with_context(|| ds.failed("grant this host's lease"))?
        .id();
    let (mut keeper, mut alive) = ds
        .client
        .lease_keep_alive(lease)
        .await
        .with_context(|| ds.failed("keep this host's lease alive"))?;
    // What an earlier run of this host left: replaced (same key, new
    // lease) or deleted, never deleted first (no flapping elsewhere).
    let mine = format!("{}{host}/", ds.endpoints_prefix());
    let left = ds
        .client
        .get(
            mine.as_str(),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .with_context(|| ds.failed("list this host's endpoints"))?;
    let mut stale: BTreeSet<String> = left
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect();
    let mut current: Option<BTreeMap<String, Vec<u8>>> = None;
    let mut seen = None;
    let every = Duration::from_secs((opts.lease_ttl.max(3) / 3) as u64);
    let mut last_alive = Instant::now();
    loop {
        let generation = store.generation().context("read this host's store")?;
        if seen != Some(generation) {
            let state = store.read().context("read this host's endpoints")?;
            let desired = records(&state, &ds, host);
            drop(state);
            for (key, value) in &desired {
                if current.as_ref().and_then(|c| c.get(key)) != Some(value) {
                    ds.client
                        .put(
                            key.as_str(),
                            value.clone(),
                            Some(PutOptions::new().with_lease(lease)),
                        )
                        .await
                        .with_context(|| ds.failed("publish an endpoint"))?;
                }
            }
            let old: Vec<String> = current
                .iter()
                .flat_map(|c| c.keys().cloned())
                .chain(stale.iter().cloned())
                .filter(|k| !desired.contains_key(k))
                .collect();
            for key in old {
                ds.client
                    .delete(key.as_str(), None)
                    .await
                    .with_context(|| ds.failed("withdraw an endpoint"))?;
            }
            stale.clear();
            current = Some(desired);
            seen = Some(generation);
            *published = true;
        }
        if last_alive.elapsed() >= every {
            keeper
                .keep_alive()
                .await
                .with_context(|| ds.failed("keep this host's lease alive"))?;
            match alive
                .message()
                .await
                .with_context(|| ds.failed("keep this host's lease alive"))?
            {
                Some(r) if r.ttl() > 0 => {}
                _ => bail!("this host's lease expired; publishing its endpoints again"),
            }
            last_alive = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn api_object(o: Object) -> ApiObject {
    match o {
        Object::Namespace(n) => ApiObject::Namespace(n),
        Object::Pod(p) => {
            let placement = Placement::of(&p.object);
            ApiObject::Pod(p, placement)
        }
        Object::NetworkPolicy(p) => ApiObject::NetworkPolicy(p),
        Object::TierPolicy(t) => ApiObject::TierPolicy(t),
        Object::PalisadePolicy(p) => ApiObject::PalisadePolicy(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(endpoints: &[&str]) -> Flags {
        Flags {
            datastore_config: Some(PathBuf::from("/nonexistent/palisade-datastore.yaml")),
            etcd_endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let e = flags(&[]).settings().unwrap_err();
        assert!(
            format!("{e:#}").contains("palisade-datastore.yaml"),
            "{e:#}"
        );
    }

    #[test]
    fn settings_are_checked() {
        let base = Flags {
            datastore_config: None,
            ..Default::default()
        };
        let with = |f: &dyn Fn(&mut Flags)| {
            let mut b = base.clone();
            f(&mut b);
            b.settings().map_err(|e| format!("{e:#}"))
        };
        // No endpoints, nothing else: no datastore (unless the default
        // file exists on this machine, which the tests do not create).
        if !std::path::Path::new(DEFAULT_CONFIG).exists() {
            assert_eq!(with(&|_| {}), Ok(None));
        }
        let e = with(&|f| f.etcd_endpoints = vec!["10.0.0.1:2379".into()]).unwrap_err();
        assert!(e.contains("https://HOST:PORT"), "{e}");
        let e = with(&|f| f.etcd_endpoints = vec!["https://10.0.0.1:2379".into()]).unwrap_err();
        assert!(e.contains("--etcd-ca"), "{e}");
        let e = with(&|f| {
            f.etcd_endpoints = vec!["https://10.0.0.1:2379".into()];
            f.etcd_ca = Some("ca.pem".into());
            f.etcd_cert = Some("c.pem".into());
        })
        .unwrap_err();
        assert!(e.contains("--etcd-key"), "{e}");
        let e = with(&|f| {
            f.etcd_endpoints = vec!["http://10.0.0.1:2379".into()];
            f.etcd_prefix = Some("palisade/".into());
        })
        .unwrap_err();
        assert!(e.contains("prefix"), "{e}");
        let ok = with(&|f| {
            f.etcd_endpoints = vec!["https://10.0.0.1:2379".into(), "https://h2:2379".into()];
            f.etcd_ca = Some("ca.pem".into());
        })
        .unwrap()
        .unwrap();
        assert_eq!(ok.prefix, DEFAULT_PREFIX);
        assert_eq!(ok.endpoints.len(), 2);
    }

    #[test]
    fn remote_names_are_pod_names_apart_per_host() {
        assert_eq!(remote_name("web", "host-1"), "web.host-1");
        assert_eq!(remote_name("my_app", "Host_A"), "my-app.host-a");
        assert_ne!(remote_name("web", "a"), remote_name("web", "b"));
        assert!(remote_name(&"x".repeat(300), "h").len() <= 253);
    }

    #[test]
    fn resource_versions() {
        let mut v = serde_json::json!({"metadata": {"name": "a", "resourceVersion": "42"}});
        assert_eq!(take_resource_version(&mut v).unwrap(), Some(42));
        assert!(v["metadata"].get("resourceVersion").is_none());
        let mut v = serde_json::json!({"metadata": {"name": "a"}});
        assert_eq!(take_resource_version(&mut v).unwrap(), None);
        let mut v = serde_json::json!({"metadata": {"resourceVersion": "abc"}});
        assert!(take_resource_version(&mut v).is_err());
    }
}
