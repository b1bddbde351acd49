//! A stand-in for the kubelet and the Deployment controller, which this machine does not
//! have: it follows one Deployment through the real API server and keeps `spec.replicas`
//! local processes running what its pod template says, then writes the Deployment's
//! status as the controllers would, so the operator sees ready replicas.
//!
//! What the pod template says is what runs: the first container's command and args (the
//! image's entrypoint replaced by the binary given, e.g. `target/debug/weir-worker`), its
//! environment with `valueFrom`/`envFrom` resolved from the Secrets and ConfigMaps as the
//! kubelet resolves them (a pod name for `metadata.name`), and its volumes as local
//! directories (a ConfigMap's or Secret's keys as files, an emptyDir empty) whose paths
//! replace the mount paths in args and env. Two things differ, and are said here: a pod has
//! a network namespace of its own, local processes share one, so each declared
//! `containerPort` gets a free local port and `0.0.0.0:<port>` in env and args becomes
//! `127.0.0.1:<local port>`; and the readiness probe (`httpGet`) is sent to that port. A
//! replica count going down is a SIGTERM to the newest processes, then SIGKILL after the
//! pod's `terminationGracePeriodSeconds`; a template change replaces every process; a
//! process that exits by itself is restarted (restartPolicy Always) and counted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Secret};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// How often the Deployment is read and the processes checked.
const PERIOD: Duration = Duration::from_millis(200);

/// What the stand-in saw and did, for the test to assert on.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Every distinct `spec.replicas` read, with when (since the start).
    pub replicas: Vec<(Duration, i32)>,
    /// Processes that exited without being asked (restarted), with their exit.
    pub crashes: Vec<(String, String)>,
    /// Processes stopped by SIGTERM, and how they exited (`None`: killed after the grace
    /// period).
    pub stopped: Vec<(String, Option<ExitStatus>)>,
    /// Processes running now (not terminating), and how many of them answer the probe.
    pub running: usize,
    pub ready: usize,
    /// Processes sent SIGTERM that have not exited yet.
    pub terminating: usize,
    /// The most processes ready at once.
    pub peak_ready: usize,
    /// The last error of a round (the round is retried), if any.
    pub error: Option<String>,
}

/// The running stand-in; stops every process when stopped or dropped.
pub struct Kubelet {
    /// What [`Observed`]'s times count from.
    pub since: Instant,
    observed: Arc<Mutex<Observed>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    logs: PathBuf,
    _dir: tempfile::TempDir,
}

impl Kubelet {
    /// Follows Deployment `namespace/name`, running `binary` in place of the container
    /// image's entrypoint. `client` needs to read Deployments, Secrets and ConfigMaps and
    /// write the Deployment's status (the test's admin client).
    pub fn start(
        client: Client,
        namespace: &str,
        name: &str,
        binary: PathBuf,
    ) -> anyhow::Result<Kubelet> {
        let dir = tempfile::tempdir()?;
        let logs = dir.path().join("logs");
        std::fs::create_dir_all(&logs)?;
        let observed = Arc::new(Mutex::new(Observed::default()));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let since = Instant::now();
        let mut node = Node {
            client,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            binary,
            root: dir.path().to_path_buf(),
            logs: logs.clone(),
            pods: Vec::new(),
            started: 0,
            since,
            observed: observed.clone(),
            last_status: None,
        };
        let task = tokio::spawn(async move {
            loop {
                if let Err(e) = node.round().await {
                    node.note(|o| o.error = Some(format!("{e:#}")));
                }
                tokio::select! {
                    _ = &mut stopped => break,
                    () = tokio::time::sleep(PERIOD) => {}
                }
            }
            node.stop_all().await;
        });
        Ok(Kubelet {
            since,
            observed,
            stop: Some(stop),
            task: Some(task),
            logs,
            _dir: dir,
        })
    }

    pub fn observed(&self) -> Observed {
        self.observed.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// The logs of every process so far (for a failure's message).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.logs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("--- {}\n", file.display()));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// SIGTERMs every process and waits for them (as a drained node would).
    pub async fn stop(mut self) -> Observed {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.observed()
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// One local "pod".
struct Pod {
    name: String,
    template: String,
    child: Child,
    /// The local port of the readiness probe, and its path.
    probe: Option<(u16, String)>,
    grace: Duration,
    terminating: Option<Instant>,
    ready: bool,
    _dir: tempfile::TempDir,
}

impl Drop for Pod {
    fn drop(&mut self) {
        // Never left running after the test: a no-op for a process that exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Node {
    client: Client,
    namespace: String,
    name: String,
    binary: PathBuf,
    root: PathBuf,
    logs: PathBuf,
    pods: Vec<Pod>,
    started: usize,
    since: Instant,
    observed: Arc<Mutex<Observed>>,
    last_status: Option<serde_json::Value>,
}

impl Node {
    fn note(&self, f: impl FnOnce(&mut Observed)) {
        if let Ok(mut o) = self.observed.lock() {
            f(&mut o);
        }
    }

    async fn round(&mut self) -> anyhow::Result<()> {
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
        let Some(deployment) = deployments.get_opt(&self.name).await? else {
            return Ok(());
        };
        let spec = deployment
            .spec
            .clone()
            .context("the Deployment has no spec")?;
        let desired = spec.replicas.unwrap_or(1).max(0);
        let at = self.since.elapsed();
        self.note(|o| {
            if o.replicas.last().map(|(_, r)| *r) != Some(desired) {
                o.replicas.push((at, desired));
            }
        });
        let template = serde_json::to_string(&spec.template)?;
        let pod_spec = spec
            .template
            .spec
            .clone()
            .context("the pod template has no spec")?;

        self.reap();
        // A new template replaces every process, as a rollout ends.
        for pod in self
            .pods
            .iter_mut()
            .filter(|p| p.terminating.is_none() && p.template != template)
        {
            terminate(pod);
        }
        let running = self.pods.iter().filter(|p| p.terminating.is_none()).count();
        let desired = usize::try_from(desired).unwrap_or(0);
        for _ in running..desired {
            let pod = self.start_pod(&template, &pod_spec).await?;
            self.pods.push(pod);
        }
        if running > desired {
            // The newest go first.
            for pod in self
                .pods
                .iter_mut()
                .rev()
                .filter(|p| p.terminating.is_none())
                .take(running - desired)
            {
                terminate(pod);
            }
        }
        for pod in self.pods.iter_mut().filter(|p| p.terminating.is_none()) {
            pod.ready = match &pod.probe {
                Some((port, path)) => probe(*port, path).await,
                None => true,
            };
        }
        let running = self.pods.iter().filter(|p| p.terminating.is_none()).count();
        let ready = self
            .pods
            .iter()
            .filter(|p| p.terminating.is_none() && p.ready)
            .count();
        let terminating = self.pods.len() - running;
        self.note(|o| {
            o.running = running;
            o.ready = ready;
            o.terminating = terminating;
            o.peak_ready = o.peak_ready.max(ready);
            o.error = None;
        });
        let status = serde_json::json!({
            "observedGeneration": deployment.metadata.generation,
            "replicas": running,
            "updatedReplicas": running,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "unavailableReplicas": running - ready,
        });
        if self.last_status.as_ref() != Some(&status) {
            deployments
                .patch_status(
                    &self.name,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({ "status": status })),
                )
                .await?;
            self.last_status = Some(status);
        }
        Ok(())
    }

    /// Removes the processes that exited: asked to (recorded with their exit), or not
    /// (a crash: recorded, and the count brings a new one).
    fn reap(&mut self) {
        let mut kept = Vec::new();
        for mut pod in std::mem::take(&mut self.pods) {
            match pod.child.try_wait() {
                Ok(Some(exit)) => match pod.terminating {
                    Some(_) => self.note(|o| o.stopped.push((pod.name.clone(), Some(exit)))),
                    None => self.note(|o| o.crashes.push((pod.name.clone(), exit.to_string()))),
                },
                _ => {
                    if pod.terminating.is_some_and(|t| t.elapsed() > pod.grace) {
                        let _ = pod.child.kill();
                        let _ = pod.child.wait();
                        self.note(|o| o.stopped.push((pod.name.clone(), None)));
                        continue;
                    }
                    kept.push(pod);
                }
            }
        }
        self.pods = kept;
    }

    async fn start_pod(&mut self, template: &str, spec: &PodSpec) -> anyhow::Result<Pod> {
        self.started += 1;
        let hash = format!("{:08x}", fnv(template.as_bytes()));
        let name = format!("{}-{}-{}", self.name, &hash[..8], self.started);
        let container = spec
            .containers
            .first()
            .context("the pod template has no container")?;
        let dir = tempfile::tempdir_in(&self.root)?;
        let mounts = self.volumes(spec, container, dir.path()).await?;
        let ports: BTreeMap<i32, u16> = container
            .ports
            .iter()
            .flatten()
            .map(|p| Ok((p.container_port, weir_testkit::free_port("pod port")?)))
            .collect::<anyhow::Result<_>>()?;
        let local = |text: &str| {
            let mut text = text.to_owned();
            for (from, to) in &mounts {
                if text.starts_with(from.as_str()) {
                    text = format!("{}{}", to.display(), &text[from.len()..]);
                    break;
                }
            }
            for (port, local) in &ports {
                text = text.replace(&format!("0.0.0.0:{port}"), &format!("127.0.0.1:{local}"));
            }
            text
        };
        let env = self.environment(container, &name).await?;
        let mut command = container.command.clone().unwrap_or_default();
        // The image's entrypoint, or the command's program, is the binary given.
        if !command.is_empty() {
            command.remove(0);
        }
        let args: Vec<String> = command
            .iter()
            .chain(container.args.iter().flatten())
            .map(|a| local(a))
            .collect();
        let log = self.logs.join(format!("{name}.log"));
        let child = Command::new(&self.binary)
            .args(&args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, local(v))))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        let probe = container
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .map(|get| -> anyhow::Result<(u16, String)> {
                let port = port_number(container, &get.port)?;
                let local = ports
                    .get(&port)
                    .copied()
                    .context("the probe's port is not declared")?;
                Ok((local, get.path.clone().unwrap_or_else(|| "/".to_owned())))
            })
            .transpose()?;
        Ok(Pod {
            name,
            template: template.to_owned(),
            child,
            probe,
            grace: Duration::from_secs(
                u64::try_from(spec.termination_grace_period_seconds.unwrap_or(30)).unwrap_or(30),
            ),
            terminating: None,
            ready: false,
            _dir: dir,
        })
    }

    /// The container's volume mounts as local directories: mount path → local path.
    async fn volumes(
        &self,
        spec: &PodSpec,
        container: &Container,
        dir: &Path,
    ) -> anyhow::Result<Vec<(String, PathBuf)>> {
        let mut mounts = Vec::new();
        for mount in container.volume_mounts.iter().flatten() {
            let volume = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == mount.name)
                .with_context(|| format!("no volume {}", mount.name))?;
            let local = dir.join(&mount.name);
            std::fs::create_dir_all(&local)?;
            let files: BTreeMap<String, Vec<u8>> = if let Some(source) = &volume.config_map {
                let maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
                let map = maps.get(&source.name).await?;
                map.data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect()
            } else if let Some(source) = &volume.secret {
                let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
                let name = source.secret_name.clone().unwrap_or_default();
                let secret = secrets.get(&name).await?;
                secret
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect()
            } else if volume.empty_dir.is_some() {
                BTreeMap::new()
            } else {
                anyhow::bail!(
                    "volume {}: only configMap, secret and emptyDir are run here",
                    volume.name
                );
            };
            for (key, bytes) in files {
                std::fs::write(local.join(key), bytes)?;
            }
            mounts.push((mount.mount_path.clone(), local));
        }
        // The longest mount path first, so that /etc/weir/x is not taken for /etc.
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        Ok(mounts)
    }

    /// The container's environment as the kubelet resolves it.
    async fn environment(
        &self,
        container: &Container,
        pod: &str,
    ) -> anyhow::Result<Vec<(String, String)>> {
        container_environment(&self.client, &self.namespace, container, pod).await
    }

    /// SIGTERM to every process, then waiting for each within its grace period.
    async fn stop_all(&mut self) {
        for pod in self.pods.iter_mut().filter(|p| p.terminating.is_none()) {
            terminate(pod);
        }
        while !self.pods.is_empty() {
            self.reap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// SIGTERM, as the kubelet sends it when a pod is deleted.
fn terminate(pod: &mut Pod) {
    let _ = Command::new("kill")
        .args(["-TERM", &pod.child.id().to_string()])
        .status();
    pod.terminating = Some(Instant::now());
}

/// The container port a probe's port (a number or a port's name) means.
fn port_number(
    container: &Container,
    port: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString,
) -> anyhow::Result<i32> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match port {
        IntOrString::Int(n) => Ok(*n),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port)
            .with_context(|| format!("no container port named {name}")),
    }
}

/// An HTTP GET answered 2xx or 3xx within a second, as the kubelet's probe counts success.
async fn probe(port: u16, path: &str) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        let line = String::from_utf8_lossy(&answer);
        let code: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some((200..400).contains(&code))
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// A short stable hash for pod names (FNV-1a).
fn fnv(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// `container`'s environment as the kubelet resolves it for pod `pod` in `namespace`: from
/// Secrets and ConfigMaps (`env` and `envFrom`) and the pod's own fields.
pub async fn container_environment(
    client: &Client,
    namespace: &str,
    container: &Container,
    pod: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let mut env: Vec<(String, String)> = Vec::new();
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(source) = &from.secret_ref {
            let secret = secrets.get(&source.name).await?;
            for (k, v) in secret.data.unwrap_or_default() {
                env.push((format!("{prefix}{k}"), String::from_utf8(v.0)?));
            }
        }
        if let Some(source) = &from.config_map_ref {
            let map = maps.get(&source.name).await?;
            for (k, v) in map.data.unwrap_or_default() {
                env.push((format!("{prefix}{k}"), v));
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), _) => Some(value.clone()),
            (None, None) => Some(String::new()),
            (None, Some(from)) => {
                if let Some(key) = &from.secret_key_ref {
                    match secrets.get_opt(&key.name).await? {
                        Some(secret) => match secret.data.unwrap_or_default().remove(&key.key) {
                            Some(bytes) => Some(String::from_utf8(bytes.0)?),
                            None if key.optional == Some(true) => None,
                            None => {
                                anyhow::bail!("Secret {} has no key {}", key.name, key.key)
                            }
                        },
                        None if key.optional == Some(true) => None,
                        None => anyhow::bail!("no Secret {} (for {})", key.name, var.name),
                    }
                } else if let Some(key) = &from.config_map_key_ref {
                    match maps.get_opt(&key.name).await? {
                        Some(map) => match map.data.unwrap_or_default().remove(&key.key) {
                            Some(value) => Some(value),
                            None if key.optional == Some(true) => None,
                            None => {
                                anyhow::bail!("ConfigMap {} has no key {}", key.name, key.key)
                            }
                        },
                        None if key.optional == Some(true) => None,
                        None => anyhow::bail!("no ConfigMap {} (for {})", key.name, var.name),
                    }
                } else if let Some(field) = &from.field_ref {
                    Some(match field.field_path.as_str() {
                        "metadata.name" => pod.to_owned(),
                        "metadata.namespace" => namespace.to_owned(),
                        "spec.nodeName" => "localhost".to_owned(),
                        "status.podIP" | "status.hostIP" => "127.0.0.1".to_owned(),
                        other => anyhow::bail!("fieldRef {other} is not run here"),
                    })
                } else {
                    anyhow::bail!("the source of {} is not run here", var.name);
                }
            }
        };
        if let Some(value) = value {
            env.retain(|(k, _)| *k != var.name);
            env.push((var.name.clone(), value));
        }
    }
    Ok(env)
}

/// The `weir-worker` binary cargo built beside the running test (`cargo build
/// --workspace`, or the tests run with `--workspace`, builds it).
pub fn worker_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("no target directory")?;
    let binary = dir.join("weir-worker");
    anyhow::ensure!(
        binary.exists(),
        "{} is missing: build it first (cargo build -p weir-worker, or run the tests with --workspace)",
        binary.display()
    );
    Ok(binary)
}
