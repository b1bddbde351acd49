//! A real Kubernetes API server: `kube-apiserver` on `etcd`, both built from Go modules
//! (testkit/kube/go.mod) into the tools directory, started on loopback ports the way
//! controller-runtime's envtest starts them.
//!
//! What it proves: CRD structural schemas, defaults and CEL validation rules evaluated at
//! apply time, server-side apply and field managers, subresources, watches, conflicts,
//! finalizers, and RBAC enforced by the real authorizer. What it cannot do: run pods (there
//! is no kubelet) or anything a controller of kube-controller-manager does (garbage
//! collection, namespace deletion, Deployment→ReplicaSet, service-account tokens).
//!
//! Sharing: [`KubeApiServer::shared`] is one server per test process (under nextest, that is
//! one per test); each test works in its own namespace ([`KubeApiServer::create_namespace`]).
//! Installing the CRDs from `crds/` is idempotent, so every test may do it. A test that
//! changes CRDs or other cluster-scoped state, or needs identities with tokens of their own,
//! starts a dedicated server with [`KubeApiServer::start`]. Start to ready takes a few
//! seconds.
//!
//! Identities: the admin (group `system:masters`) always has a token; identities passed to
//! [`KubeApiServer::start`] get one each (the static token file is read once, at start).
//! On any server, [`KubeApiServer::impersonating_config`] acts as any user and groups
//! through the admin's impersonation right; authorization is then evaluated for that user.
//!
//! The binaries are built the first time a test needs them (several minutes, once; a lock
//! file keeps parallel test processes from building twice) unless
//! scripts/install-test-deps.sh built them already.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ::kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use ::kube::config::{
    AuthInfo, Cluster, Context, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext,
};
use ::kube::core::GroupVersionKind;
use ::kube::discovery::Scope;
use ::kube::{Client, Config};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::json;

use crate::process::{NotReady, Supervised, run, which};
use crate::{HarnessError, KUBERNETES_VERSION, Result, free_port, tools_dir, unique_name};

const PART: &str = "kube-apiserver";
const ETCD: &str = "etcd";

/// The user whose token every server accepts; it is in group `system:masters`.
pub const ADMIN: &str = "admin";

/// The field manager the harness applies CRDs with.
pub const FIELD_MANAGER: &str = "weir-testkit";

const READY_DEADLINE: Duration = Duration::from_secs(90);
const CRD_DEADLINE: Duration = Duration::from_secs(30);

/// A user the API server authenticates by a bearer token, with the groups it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The user name RBAC subjects refer to (`kind: User`).
    pub user: String,
    /// The groups RBAC subjects may refer to (`kind: Group`).
    pub groups: Vec<String>,
}

impl Identity {
    /// A user in no group (beyond `system:authenticated`, which every user gets).
    pub fn new(user: impl Into<String>) -> Identity {
        Identity {
            user: user.into(),
            groups: Vec::new(),
        }
    }

    /// The same user, also in `group`.
    #[must_use]
    pub fn in_group(mut self, group: impl Into<String>) -> Identity {
        self.groups.push(group.into());
        self
    }
}

/// A running kube-apiserver with its own etcd. Dropping it stops both and deletes their data.
#[derive(Debug)]
pub struct KubeApiServer {
    url: String,
    ca_path: PathBuf,
    ca_pem: String,
    ca_der: Vec<Vec<u8>>,
    dir: PathBuf,
    admin_kubeconfig: PathBuf,
    /// User name → token, the admin included.
    tokens: BTreeMap<String, String>,
    // Field order is drop order: the API server stops before its etcd. etcd's watchdog
    // deletes the whole directory.
    apiserver: Supervised,
    _etcd: Supervised,
}

impl KubeApiServer {
    /// The server this test process shares: started on first use, stopped when the process
    /// exits.
    pub async fn shared() -> Result<&'static KubeApiServer> {
        static SHARED: tokio::sync::OnceCell<KubeApiServer> = tokio::sync::OnceCell::const_new();
        SHARED.get_or_try_init(|| Self::start(&[])).await
    }

    /// Starts a dedicated server (and its etcd) on free loopback ports, in a temporary
    /// directory, accepting a token for the admin and for each of `identities`. Builds the
    /// binaries first if the tools directory lacks them. Returns once `/readyz` answers 200.
    ///
    /// Call it inside a Tokio runtime; the blocking parts run on its blocking pool.
    pub async fn start(identities: &[Identity]) -> Result<KubeApiServer> {
        let identities = identities.to_vec();
        let mut server = blocking(move || spawn(&identities)).await??;
        let client = server.client(ADMIN)?;
        let apiserver = &mut server.apiserver;
        let ready = crate::wait_for("kube-apiserver /readyz", READY_DEADLINE, || {
            let exited = !apiserver.is_running();
            let client = client.clone();
            async move {
                if exited {
                    return Some(Err(NotReady::Exited));
                }
                readyz(&client).await.then_some(Ok(()))
            }
        })
        .await;
        match ready {
            Ok(Ok(())) => Ok(server),
            Ok(Err(_)) => Err(server.apiserver.start_error("kube-apiserver exited")),
            Err(_) => Err(server.apiserver.start_error(&format!(
                "/readyz did not answer 200 within {READY_DEADLINE:?}"
            ))),
        }
    }

    /// The server's URL, e.g. `https://127.0.0.1:41234`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The PEM file clients trust: the self-signed serving certificate (and its CA) the
    /// server generated in its cert dir.
    pub fn ca_cert_path(&self) -> &Path {
        &self.ca_path
    }

    /// The contents of [`ca_cert_path`](Self::ca_cert_path).
    pub fn ca_cert_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The bearer token of `user` (the admin or an identity given at start).
    pub fn token(&self, user: &str) -> Result<&str> {
        self.tokens
            .get(user)
            .map(String::as_str)
            .ok_or_else(|| HarnessError::Missing {
                part: PART,
                hint: format!(
                    "no token for user {user:?}: pass Identity::new({user:?}) to KubeApiServer::start, \
                     or use impersonating_config on a shared server"
                ),
            })
    }

    /// A kubeconfig file for the admin (e.g. `KUBECONFIG` for a subprocess).
    pub fn kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// Writes a kubeconfig file that authenticates as `user` by its token; returns its path
    /// (in the server's temporary directory).
    pub fn write_kubeconfig(&self, user: &str) -> Result<PathBuf> {
        let kubeconfig = self.kubeconfig_for(self.token(user)?, None);
        self.write_kubeconfig_file(&format!("kubeconfig-{}", file_safe(user)), &kubeconfig)
    }

    /// Writes a kubeconfig file that acts as `who` through the admin's impersonation right
    /// (`as`/`as-groups`); returns its path (in the server's temporary directory).
    pub fn write_impersonating_kubeconfig(&self, who: &Identity) -> Result<PathBuf> {
        let kubeconfig = self.kubeconfig_for(self.token(ADMIN)?, Some(who));
        let name = format!("kubeconfig-as-{}", file_safe(&who.user));
        self.write_kubeconfig_file(&name, &kubeconfig)
    }

    /// A client configuration that authenticates as `user` by its token.
    pub fn config(&self, user: &str) -> Result<Config> {
        let token = self.token(user)?;
        let mut config = self.base_config()?;
        config.auth_info.token = Some(token.to_owned().into());
        Ok(config)
    }

    /// A client configuration that acts as `who` (user and groups) through the admin's
    /// impersonation right. RBAC then authorizes every request as `who`, so this gives any
    /// identity on a server started without it, e.g. the shared one.
    pub fn impersonating_config(&self, who: &Identity) -> Result<Config> {
        let mut config = self.config(ADMIN)?;
        config.auth_info.impersonate = Some(who.user.clone());
        config.auth_info.impersonate_groups = Some(who.groups.clone());
        Ok(config)
    }

    /// A client authenticated as `user` by its token. Call it inside a Tokio runtime (the
    /// client runs a task on it).
    pub fn client(&self, user: &str) -> Result<Client> {
        client_from(self.config(user)?)
    }

    /// A client for the admin (group `system:masters`: every request is allowed).
    pub fn admin_client(&self) -> Result<Client> {
        self.client(ADMIN)
    }

    /// A client acting as `who`; see [`impersonating_config`](Self::impersonating_config).
    pub fn impersonating_client(&self, who: &Identity) -> Result<Client> {
        client_from(self.impersonating_config(who)?)
    }

    /// Creates a namespace named `<prefix>-<unique>` and returns its name. Namespaces are
    /// never deleted (no namespace controller runs): they go with the server.
    pub async fn create_namespace(&self, prefix: &str) -> Result<String> {
        let name = unique_name(prefix);
        let namespace: Namespace = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": name },
        }))
        .map_err(|e| HarnessError::Start {
            part: PART,
            detail: format!("building namespace {name}: {e}"),
        })?;
        Api::<Namespace>::all(self.admin_client()?)
            .create(&PostParams::default(), &namespace)
            .await
            .map_err(|e| kube_error(format!("creating namespace {name}"), e))?;
        Ok(name)
    }

    /// Installs every CRD in the `*.yaml` files of `dir` (e.g. [`crd_dir`]) by server-side
    /// apply (field manager [`FIELD_MANAGER`], forcing conflicts like
    /// `kubectl apply --server-side --force-conflicts`), then waits until each is
    /// Established and its kinds are served. Returns the CRD names. Idempotent.
    pub async fn install_crds(&self, dir: &Path) -> Result<Vec<String>> {
        let client = self.admin_client()?;
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        let mut installed = Vec::new();
        for path in yaml_files(dir)? {
            let text = std::fs::read_to_string(&path).map_err(|source| HarnessError::Io {
                part: PART,
                context: format!("reading {}", path.display()),
                source,
            })?;
            let what = path.display().to_string();
            for crd in yaml_documents::<CustomResourceDefinition>(&text, &what)? {
                let name = crd.metadata.name.clone().unwrap_or_default();
                crds.patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&crd),
                )
                .await
                .map_err(|e| kube_error(format!("applying CRD {name} from {what}"), e))?;
                installed.push(crd);
            }
        }
        for crd in &installed {
            wait_served(&crds, &client, crd).await?;
        }
        Ok(installed
            .into_iter()
            .filter_map(|crd| crd.metadata.name)
            .collect())
    }

    fn base_config(&self) -> Result<Config> {
        let url = self.url.parse().map_err(|e| HarnessError::Start {
            part: PART,
            detail: format!("server URL {}: {e}", self.url),
        })?;
        let mut config = Config::new(url);
        config.root_cert = Some(self.ca_der.clone());
        config.connect_timeout = Some(Duration::from_secs(5));
        config.read_timeout = Some(Duration::from_secs(60));
        Ok(config)
    }

    fn kubeconfig_for(&self, token: &str, impersonate: Option<&Identity>) -> Kubeconfig {
        let auth_info = AuthInfo {
            token: Some(token.to_owned().into()),
            impersonate: impersonate.map(|who| who.user.clone()),
            impersonate_groups: impersonate.map(|who| who.groups.clone()),
            ..AuthInfo::default()
        };
        Kubeconfig {
            clusters: vec![NamedCluster {
                name: "weir-test".into(),
                cluster: Some(Cluster {
                    server: Some(self.url.clone()),
                    certificate_authority: Some(self.ca_path.display().to_string()),
                    ..Cluster::default()
                }),
                ..NamedCluster::default()
            }],
            auth_infos: vec![NamedAuthInfo {
                name: "weir-test".into(),
                auth_info: Some(auth_info),
                ..NamedAuthInfo::default()
            }],
            contexts: vec![NamedContext {
                name: "weir-test".into(),
                context: Some(Context {
                    cluster: "weir-test".into(),
                    user: Some("weir-test".into()),
                    ..Context::default()
                }),
                ..NamedContext::default()
            }],
            current_context: Some("weir-test".into()),
            kind: Some("Config".into()),
            api_version: Some("v1".into()),
            ..Kubeconfig::default()
        }
    }

    fn write_kubeconfig_file(&self, name: &str, kubeconfig: &Kubeconfig) -> Result<PathBuf> {
        let text = serde_yaml_ng::to_string(kubeconfig).map_err(|e| HarnessError::Start {
            part: PART,
            detail: format!("serializing a kubeconfig: {e}"),
        })?;
        let path = self.dir.join(name);
        std::fs::write(&path, text).map_err(|source| HarnessError::Io {
            part: PART,
            context: format!("writing {}", path.display()),
            source,
        })?;
        Ok(path)
    }
}

/// The repository's generated CRD manifests (`crds/*.yaml`).
pub fn crd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds")
}

/// Parses a multi-document YAML manifest (e.g. one of `examples/`) into objects; empty
/// documents are skipped. `what` names the source in errors.
pub fn yaml_documents<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<Vec<T>> {
    use serde::Deserialize as _;
    let mut objects = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let manifest_error = |detail: String| HarnessError::Manifest {
            what: format!("{what}, document {}", index + 1),
            detail,
        };
        let value = serde_yaml_ng::Value::deserialize(document)
            .map_err(|e| manifest_error(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        objects.push(serde_yaml_ng::from_value(value).map_err(|e| manifest_error(e.to_string()))?);
    }
    Ok(objects)
}

/// Server-side applies `object` as `field_manager` with strict field validation (unknown or
/// duplicate fields are refused, as `kubectl apply --server-side` does), into `namespace`
/// when its kind is namespaced. The kind is resolved through discovery. Returns the object
/// as stored, or the API server's answer: a refusal is `kube::Error::Api` whose message is
/// what a user would see.
pub async fn apply(
    client: &Client,
    namespace: &str,
    object: &DynamicObject,
    field_manager: &str,
) -> std::result::Result<DynamicObject, ::kube::Error> {
    let types = object.types.clone().unwrap_or_default();
    let gvk = GroupVersionKind::try_from(&types).map_err(|e| {
        ::kube::Error::Discovery(::kube::error::DiscoveryError::InvalidGroupVersion(e.0))
    })?;
    let (resource, capabilities) = ::kube::discovery::pinned_kind(client, &gvk).await?;
    let api: Api<DynamicObject> = match capabilities.scope {
        Scope::Namespaced => Api::namespaced_with(client.clone(), namespace, &resource),
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    let name = object.metadata.name.clone().unwrap_or_default();
    let params = PatchParams::apply(field_manager).validation_strict();
    api.patch(&name, &params, &Patch::Apply(object)).await
}

/// Starts etcd, waits until it is healthy, and starts the API server (not yet ready).
fn spawn(identities: &[Identity]) -> Result<KubeApiServer> {
    let bin = binaries()?;
    let (dir, etcd, etcd_url) = start_etcd_in_new_dir(&bin)?;

    let tokens = tokens(identities)?;
    let token_file = dir.join("tokens.csv");
    std::fs::write(&token_file, token_csv(identities, &tokens))
        .map_err(|source| HarnessError::io(PART, "writing the token file", source))?;
    let key = service_account_key(&dir)?;
    let cert_dir = dir.join("certs");
    let port = free_port(PART)?;
    let args = apiserver_args(&etcd_url, port, &cert_dir, &key, &token_file);
    let mut apiserver = Supervised::spawn(
        PART,
        "KILL",
        None,
        &dir.join("kube-apiserver.log"),
        &bin.join("kube-apiserver"),
        &args,
    )?;
    // The server writes its self-signed certificate before it listens.
    let ca_path = cert_dir.join("apiserver.crt");
    let written = apiserver.wait_ready("the serving certificate", Duration::from_secs(30), || {
        ca_path.is_file() && pem_certificates(&ca_path).is_ok_and(|c| !c.is_empty())
    });
    match written {
        Ok(()) => {}
        Err(NotReady::Exited) => return Err(apiserver.start_error("kube-apiserver exited")),
        Err(NotReady::TimedOut) => {
            return Err(apiserver.start_error("no serving certificate within 30 s"));
        }
    }
    let ca_pem = std::fs::read_to_string(&ca_path)
        .map_err(|source| HarnessError::io(PART, "reading the serving certificate", source))?;
    let ca_der = pem_certificates(&ca_path)?;

    let mut server = KubeApiServer {
        url: format!("https://127.0.0.1:{port}"),
        ca_path,
        ca_pem,
        ca_der,
        admin_kubeconfig: dir.join("kubeconfig"),
        dir,
        tokens,
        apiserver,
        _etcd: etcd,
    };
    let admin = server.kubeconfig_for(server.token(ADMIN)?, None);
    server.admin_kubeconfig = server.write_kubeconfig_file("kubeconfig", &admin)?;
    Ok(server)
}

/// How many times etcd is started before giving up. Its two ports are found free and then
/// bound by etcd, and another test's server can take one in between: etcd then exits at
/// once (and its log goes with the data directory its watchdog deletes), so a start that
/// exits is tried again on new ports in a new directory.
const ETCD_ATTEMPTS: usize = 3;

/// A new data directory with a healthy etcd in it, and etcd's client URL.
fn start_etcd_in_new_dir(bin: &Path) -> Result<(PathBuf, Supervised, String)> {
    let mut attempt = 1;
    loop {
        let dir = tempfile::Builder::new()
            .prefix("weir-kube-")
            .tempdir()
            .map_err(|source| HarnessError::io(PART, "creating the data directory", source))?
            .keep();
        // The last attempt returns etcd or the error, never None.
        if let Some((etcd, url)) = start_etcd(bin, &dir, attempt == ETCD_ATTEMPTS)? {
            return Ok((dir, etcd, url));
        }
        eprintln!(
            "weir-testkit: etcd exited while starting (attempt {attempt} of {ETCD_ATTEMPTS}), starting it again on new ports"
        );
        attempt += 1;
    }
}

/// Starts etcd in `dir`; `None` when it exited before it was healthy and `last` is false.
fn start_etcd(bin: &Path, dir: &Path, last: bool) -> Result<Option<(Supervised, String)>> {
    let client_port = free_port(ETCD)?;
    let peer_port = free_port(ETCD)?;
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let args = [
        "--name=weir".to_owned(),
        format!("--data-dir={}", dir.join("etcd").display()),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=weir={peer_url}"),
        "--initial-cluster-state=new".to_owned(),
        // Test data: durability buys nothing and fsync costs seconds on slow disks.
        "--unsafe-no-fsync".to_owned(),
        "--log-level=warn".to_owned(),
    ];
    let mut etcd = Supervised::spawn(
        ETCD,
        "KILL",
        Some(dir),
        &dir.join("etcd.log"),
        &bin.join("etcd"),
        &args,
    )?;
    let ready = etcd.wait_ready("etcd /health", Duration::from_secs(30), || {
        etcd_healthy(client_port)
    });
    match ready {
        Ok(()) => Ok(Some((etcd, client_url))),
        Err(NotReady::Exited) if !last => Ok(None),
        Err(NotReady::Exited) => Err(etcd.start_error("etcd exited")),
        Err(NotReady::TimedOut) => Err(etcd.start_error("etcd was not healthy within 30 s")),
    }
}

fn apiserver_args(
    etcd_url: &str,
    port: u16,
    cert_dir: &Path,
    key: &Path,
    token_file: &Path,
) -> Vec<String> {
    vec![
        format!("--etcd-servers={etcd_url}"),
        "--bind-address=127.0.0.1".to_owned(),
        "--advertise-address=127.0.0.1".to_owned(),
        format!("--secure-port={port}"),
        format!("--cert-dir={}", cert_dir.display()),
        "--service-account-issuer=https://kubernetes.default.svc".to_owned(),
        format!("--service-account-key-file={}", key.display()),
        format!("--service-account-signing-key-file={}", key.display()),
        "--service-cluster-ip-range=10.0.0.0/24".to_owned(),
        "--authorization-mode=RBAC".to_owned(),
        format!("--token-auth-file={}", token_file.display()),
        // No controller-manager mints service-account tokens here.
        "--disable-admission-plugins=ServiceAccount".to_owned(),
    ]
}

/// One random token per user: the admin and each identity.
fn tokens(identities: &[Identity]) -> Result<BTreeMap<String, String>> {
    let mut tokens = BTreeMap::new();
    let users = std::iter::once(ADMIN).chain(identities.iter().map(|i| i.user.as_str()));
    for user in users {
        let bad = |c: char| c == ',' || c == '"' || c.is_control();
        if user.is_empty() || user.contains(bad) {
            return Err(HarnessError::Start {
                part: PART,
                detail: format!("user name {user:?} cannot go into the token file"),
            });
        }
        let token = uuid::Uuid::new_v4().simple().to_string();
        if tokens.insert(user.to_owned(), token).is_some() {
            return Err(HarnessError::Start {
                part: PART,
                detail: format!("identity {user:?} given twice"),
            });
        }
    }
    for group in identities.iter().flat_map(|i| &i.groups) {
        if group.is_empty() || group.contains([',', '"']) {
            return Err(HarnessError::Start {
                part: PART,
                detail: format!("group name {group:?} cannot go into the token file"),
            });
        }
    }
    Ok(tokens)
}

/// The static token file: `token,user,uid,"group1,group2"` per line.
fn token_csv(identities: &[Identity], tokens: &BTreeMap<String, String>) -> String {
    let admin = Identity::new(ADMIN).in_group("system:masters");
    std::iter::once(&admin)
        .chain(identities)
        .filter_map(|identity| {
            let token = tokens.get(&identity.user)?;
            let user = &identity.user;
            Some(format!(
                "{token},{user},{user},\"{}\"\n",
                identity.groups.join(",")
            ))
        })
        .collect()
}

/// An RSA key the server signs and verifies service-account tokens with (it accepts the
/// private key in both flags).
fn service_account_key(dir: &Path) -> Result<PathBuf> {
    let openssl = which("openssl").ok_or_else(|| HarnessError::Missing {
        part: PART,
        hint: "no `openssl` on PATH (it makes the service-account key): apt-get install openssl"
            .into(),
    })?;
    let key = dir.join("service-account.key");
    run(
        PART,
        Command::new(openssl)
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048"),
    )?;
    Ok(key)
}

/// The DER certificates of a PEM file.
fn pem_certificates(path: &Path) -> Result<Vec<Vec<u8>>> {
    let text = std::fs::read(path)
        .map_err(|source| HarnessError::io(PART, "reading the serving certificate", source))?;
    let blocks = pem::parse_many(text).map_err(|e| HarnessError::Start {
        part: PART,
        detail: format!("{}: {e}", path.display()),
    })?;
    Ok(blocks
        .into_iter()
        .filter(|block| block.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .collect())
}

/// Whether etcd answers `GET /health` with `"health":"true"` (plain HTTP on loopback).
fn etcd_healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let timeout = Some(Duration::from_secs(2));
    if stream.set_read_timeout(timeout).is_err() || stream.set_write_timeout(timeout).is_err() {
        return false;
    }
    let request = "GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    let mut response = String::new();
    stream.write_all(request.as_bytes()).is_ok()
        && stream.read_to_string(&mut response).is_ok()
        && response.starts_with("HTTP/1.0 200")
        && response.contains(r#""health":"true""#)
}

/// Whether `GET /readyz` answers 200 (every check passed: etcd, post-start hooks such as
/// the bootstrap RBAC roles, CRD informers).
async fn readyz(client: &Client) -> bool {
    let Ok(request) = http::Request::get("/readyz").body(Vec::new()) else {
        return false;
    };
    client
        .request_text(request)
        .await
        .is_ok_and(|body| body.trim() == "ok")
}

/// Waits until `crd` is Established and every served version's kind is in discovery.
async fn wait_served(
    crds: &Api<CustomResourceDefinition>,
    client: &Client,
    crd: &CustomResourceDefinition,
) -> Result<()> {
    let name = crd.metadata.name.clone().unwrap_or_default();
    crate::wait_for(
        &format!("kube-apiserver: CRD {name} Established"),
        CRD_DEADLINE,
        || async {
            let current = crds.get(&name).await.ok()?;
            let conditions = current.status?.conditions?;
            conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        },
    )
    .await?;
    for version in crd.spec.versions.iter().filter(|v| v.served) {
        let gvk = GroupVersionKind::gvk(&crd.spec.group, &version.name, &crd.spec.names.kind);
        crate::wait_for(
            &format!(
                "kube-apiserver: {}/{} {} in discovery",
                gvk.group, gvk.version, gvk.kind
            ),
            CRD_DEADLINE,
            || async { ::kube::discovery::pinned_kind(client, &gvk).await.ok() },
        )
        .await?;
    }
    Ok(())
}

/// The `*.yaml` files of `dir`, sorted.
fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .map_err(|source| HarnessError::io(PART, &format!("listing {}", dir.display()), source))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

/// The installed kube-apiserver and etcd, built first when missing (see
/// testkit/kube/build.sh: it takes a lock, so concurrent callers build once).
fn binaries() -> Result<PathBuf> {
    let home = tools_dir().join(format!("kube-{KUBERNETES_VERSION}"));
    let bin = home.join("bin");
    if home.join(".complete").is_file() {
        return Ok(bin);
    }
    if which("go").is_none() {
        return Err(HarnessError::Missing {
            part: PART,
            hint: format!(
                "no kube-apiserver {KUBERNETES_VERSION} in {} and no `go` on PATH to build it: \
                 install Go 1.26 and run scripts/install-test-deps.sh",
                bin.display()
            ),
        });
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kube/build.sh");
    eprintln!(
        "weir-testkit: building kube-apiserver {KUBERNETES_VERSION} and etcd into {} \
         (several minutes, once)",
        bin.display()
    );
    run(
        PART,
        Command::new("bash")
            .arg(&script)
            .env(crate::env::TOOLS_DIR, tools_dir()),
    )?;
    if home.join(".complete").is_file() {
        Ok(bin)
    } else {
        Err(HarnessError::Start {
            part: PART,
            detail: format!(
                "{} finished but {} has no .complete marker: does testkit/kube/go.mod pin \
                 k8s.io/kubernetes v{KUBERNETES_VERSION}?",
                script.display(),
                home.display()
            ),
        })
    }
}

fn client_from(config: Config) -> Result<Client> {
    Client::try_from(config).map_err(|e| kube_error("building a client".into(), e))
}

/// A user name as a file-name fragment.
fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| HarnessError::Start {
            part: PART,
            detail: format!("the start task failed: {e}"),
        })
}

fn kube_error(context: String, source: ::kube::Error) -> HarnessError {
    HarnessError::Kube {
        context,
        source: Box::new(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_lists_the_admin_and_each_identity_with_groups() {
        let identities = [
            Identity::new("weir-operator"),
            Identity::new("alice").in_group("dev").in_group("ops"),
        ];
        let tokens = tokens(&identities).unwrap();
        let csv = token_csv(&identities, &tokens);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines,
            [
                format!("{},admin,admin,\"system:masters\"", tokens["admin"]),
                format!(
                    "{},weir-operator,weir-operator,\"\"",
                    tokens["weir-operator"]
                ),
                format!("{},alice,alice,\"dev,ops\"", tokens["alice"]),
            ]
        );
    }

    #[test]
    fn token_file_refuses_names_it_cannot_hold() {
        assert!(tokens(&[Identity::new("a,b")]).is_err());
        assert!(tokens(&[Identity::new("x").in_group("g\"")]).is_err());
        assert!(tokens(&[Identity::new(ADMIN)]).is_err());
    }

    #[test]
    fn build_script_pins_the_version_the_harness_expects() {
        let go_mod = include_str!("../kube/go.mod");
        let pin = format!("k8s.io/kubernetes v{KUBERNETES_VERSION}");
        assert!(go_mod.lines().any(|l| l.trim().starts_with(&pin)), "{pin}");
    }
}
