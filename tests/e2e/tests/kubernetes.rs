//! The Kubernetes manifests (`packaging/kubernetes`), checked without a cluster but with
//! the real tools: every kustomization renders (`kubectl kustomize`), every object it
//! renders passes the Kubernetes schemas (`kubernetes-validate --strict`, from PyPI, for
//! the oldest and the newest version the manifests are for), and the objects fit
//! together where a schema cannot see it: probe and Service ports, volumes and mounts,
//! ConfigMaps and Secrets, selectors, the StatefulSet's Service. The relay and agent
//! configs inside the rendered ConfigMaps are loaded by the real binaries
//! (`--check-config`), and their ports, paths and limits must be the pod's.
//!
//! `--check-config` reads no file a config names (TLS files, `data_dir`), so the configs
//! run as rendered; the one rewrite is the relay's `@POD_NAME@`, which the StatefulSet's
//! init container replaces with the pod's name (this test does what its `sed` does).
//!
//! Needs `kubectl` on PATH (kustomize 5) and `SLUICE_TEST_PYTHON`, the python of the venv
//! scripts/test makes (tests/py/requirements.txt: kubernetes-validate, PyYAML).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use sluice_agent::config::AgentConfig;
use sluice_e2e::{files_under, run_check_config};
use sluice_relay::config::RelayConfig;

/// The oldest Kubernetes the manifests are for, and the newest kubernetes-validate knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];

/// Secrets the operator creates (docs/kubernetes.md says how), with the keys a pod may
/// read from each as a file. Every other object a pod refers to must be rendered.
const USER_SECRETS: [(&str, &[&str]); 3] = [
    ("sluice-relay-tls", &["tls.crt", "tls.key", "ca.crt"]),
    ("sluice-relay-ca", &["ca.crt"]),
    ("sluice-relay-credentials", &[]),
];

/// The relay's own allowance for open connections after `shutdown_timeout`
/// (docs/relay.md: "exit 0 within shutdown_timeout plus 5 s for connections"), and room
/// beyond it to save cursors, ledger and lease before the kubelet's SIGKILL.
const RELAY_STOP_BEYOND_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5 + 10);

fn root() -> PathBuf {
    sluice_core::configdoc::manifest_dir(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// One kustomization, rendered.
struct Render {
    /// Its folder under packaging/kubernetes, e.g. `overlays/example`.
    name: String,
    /// `kubectl kustomize`'s output, as written.
    yaml: String,
    objects: Vec<Value>,
}

impl fmt::Display for Render {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "packaging/kubernetes/{}", self.name)
    }
}

impl Render {
    fn kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects.iter().filter(move |o| o["kind"] == kind)
    }

    fn named(&self, kind: &str, name: &str) -> Option<&Value> {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
    }

    fn workloads(&self) -> impl Iterator<Item = &Value> {
        self.objects.iter().filter(|o| {
            matches!(
                o["kind"].as_str(),
                Some("StatefulSet" | "DaemonSet" | "Deployment")
            )
        })
    }
}

fn python() -> PathBuf {
    std::env::var_os("SLUICE_TEST_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "SLUICE_TEST_PYTHON is not set: scripts/test sets it to the venv's python; by hand: \
             source scripts/lib/deps.sh && deps_venv && SLUICE_TEST_PYTHON=$HOME/.cache/sluice/venv/bin/python cargo test -p sluice-e2e --test kubernetes"
        )
    })
}

/// `kubernetes-validate` beside the venv's python (not resolved through the symlink:
/// that would leave the venv).
fn kubernetes_validate() -> PathBuf {
    let python = python();
    let tool = python
        .parent()
        .expect("SLUICE_TEST_PYTHON is a file in the venv's bin folder")
        .join("kubernetes-validate");
    assert!(
        tool.exists(),
        "{} is missing: kubernetes-validate is in tests/py/requirements.txt; rebuild the venv (source scripts/lib/deps.sh && deps_venv)",
        tool.display()
    );
    tool
}

fn run(cmd: &mut Command, stdin: Option<&str>) -> String {
    use std::io::Write;
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {what}: {e} (kubectl 1.27 or later must be on PATH, with kustomize 5)"
            )
        });
    let mut input = child.stdin.take().expect("piped stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write to stdin");
    }
    drop(input);
    let out = child.wait_with_output().expect("wait for the child");
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Every kustomization under packaging/kubernetes, rendered once for all the tests.
fn renders() -> &'static [Render] {
    static RENDERS: OnceLock<Vec<Render>> = OnceLock::new();
    RENDERS.get_or_init(|| {
        let base = root().join("packaging/kubernetes");
        let dirs: Vec<PathBuf> = files_under(&base, &|p| p.ends_with("kustomization.yaml"))
            .iter()
            .map(|p| p.parent().unwrap().to_path_buf())
            .collect();
        // YAML to JSON with the venv's PyYAML: no YAML crate in the workspace for this.
        let to_json = "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)";
        let renders: Vec<Render> = dirs
            .iter()
            .map(|dir| {
                let yaml = run(Command::new("kubectl").arg("kustomize").arg(dir), None);
                let json = run(Command::new(python()).args(["-c", to_json]), Some(&yaml));
                let name = dir
                    .strip_prefix(&base)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                Render {
                    name,
                    yaml,
                    objects: serde_json::from_str(&json).expect("a JSON list of objects"),
                }
            })
            .collect();
        let names: Vec<&str> = renders.iter().map(|r| r.name.as_str()).collect();
        for want in ["agent", "relay", "overlays/example"] {
            assert!(names.contains(&want), "no kustomization {want} in {names:?}");
        }
        renders
    })
}

fn name(o: &Value) -> &str {
    o["metadata"]["name"].as_str().expect("metadata.name")
}

fn what(o: &Value) -> String {
    format!("{} {}", o["kind"].as_str().unwrap_or("?"), name(o))
}

fn namespace(o: &Value) -> &str {
    o["metadata"]["namespace"].as_str().unwrap_or("default")
}

fn pod(w: &Value) -> &Value {
    &w["spec"]["template"]["spec"]
}

fn pod_labels(w: &Value) -> &serde_json::Map<String, Value> {
    w["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap_or_else(|| panic!("{}: the pod template has no labels", what(w)))
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// A label selector (a plain map, or `matchLabels`) picks pods with `labels`. Set-based
/// `matchExpressions` are refused rather than evaluated.
fn selects(selector: &Value, labels: &serde_json::Map<String, Value>) -> bool {
    assert!(
        selector.get("matchExpressions").is_none(),
        "matchExpressions are not checked by this test: {selector}"
    );
    let map = selector.get("matchLabels").unwrap_or(selector);
    let map = map.as_object().expect("a selector is a map of labels");
    !map.is_empty() && map.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    list(&pod["initContainers"])
        .iter()
        .chain(list(&pod["containers"]))
}

fn container<'a>(w: &'a Value, name: &str) -> &'a Value {
    list(&pod(w)["containers"])
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("{} has no container {name}", what(w)))
}

/// The container port `port` (a number or a port name) stands for in `c`, if it has it.
fn container_port(c: &Value, port: &Value) -> Option<u64> {
    list(&c["ports"])
        .iter()
        .find(|p| match port {
            Value::String(name) => p["name"] == name.as_str(),
            number => p["containerPort"] == *number,
        })
        .and_then(|p| p["containerPort"].as_u64())
}

fn named_port(c: &Value, name: &str) -> u64 {
    container_port(c, &Value::from(name))
        .unwrap_or_else(|| panic!("container {} has no port named {name}", c["name"]))
}

/// The mount of `c` that holds `path` (the longest mountPath that is `path` or one of its
/// folders), and the path inside the volume.
fn mount_of<'a>(c: &'a Value, path: &Path) -> Option<(&'a Value, PathBuf)> {
    list(&c["volumeMounts"])
        .iter()
        .filter_map(|m| {
            let at = Path::new(m["mountPath"].as_str()?);
            Some((m, path.strip_prefix(at).ok()?.to_path_buf()))
        })
        .max_by_key(|(m, _)| m["mountPath"].as_str().map_or(0, str::len))
}

/// The pod volume of a mount (`None` for a StatefulSet's claim template: see [`claim`]).
fn volume<'a>(w: &'a Value, mount: &Value) -> Option<&'a Value> {
    let name = mount["name"].as_str().expect("volumeMount.name");
    list(&pod(w)["volumes"]).iter().find(|v| v["name"] == name)
}

fn claim<'a>(w: &'a Value, mount: &Value) -> Option<&'a Value> {
    list(&w["spec"]["volumeClaimTemplates"])
        .iter()
        .find(|t| t["metadata"]["name"] == mount["name"])
}

fn read_only(mount: &Value) -> bool {
    mount["readOnly"].as_bool().unwrap_or(false)
}

/// A Kubernetes quantity ("50Gi", "1536Mi", "512M") in bytes.
fn quantity(text: &str) -> u64 {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("quantity {text:?}"));
    n * match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => panic!("quantity {text:?}: unit {unit:?} not handled here"),
    }
}

/// The `--config` argument of a container.
fn config_arg(c: &Value) -> &str {
    let args: Vec<&str> = list(&c["command"])
        .iter()
        .chain(list(&c["args"]))
        .filter_map(Value::as_str)
        .collect();
    let at = args
        .iter()
        .position(|a| *a == "--config")
        .unwrap_or_else(|| panic!("container {} runs without --config: {args:?}", c["name"]));
    args.get(at + 1).expect("a path after --config")
}

/// The text of the file at `path` as container `c` of workload `w` sees it: a key of a
/// ConfigMap volume, or a file an init container renders from one into a shared
/// emptyDir (`sed 's/@POD_NAME@/$(POD_NAME)/g' <template> > <file>`, done here for a pod
/// named `pod_name`).
fn config_text(r: &Render, w: &Value, c: &Value, path: &str, pod_name: &str) -> String {
    let (mount, inside) = mount_of(c, Path::new(path))
        .unwrap_or_else(|| panic!("{r}: {path} is in no volume of {}", what(w)));
    let vol = volume(w, mount).expect("a pod volume");
    if let Some(cm) = vol.get("configMap") {
        let cm_name = cm["name"].as_str().expect("configMap.name");
        let object = r
            .named("ConfigMap", cm_name)
            .unwrap_or_else(|| panic!("{r}: ConfigMap {cm_name} is not rendered"));
        let key = inside.to_str().expect("a key");
        return object["data"][key]
            .as_str()
            .unwrap_or_else(|| panic!("{r}: ConfigMap {cm_name} has no key {key} ({path})"))
            .to_string();
    }
    assert!(
        vol.get("emptyDir").is_some(),
        "{r}: {path} is in volume {}, neither a ConfigMap nor an emptyDir an init container fills",
        vol["name"]
    );
    let (init, script) = list(&pod(w)["initContainers"])
        .iter()
        .find_map(|i| {
            let script = list(&i["command"]).last()?.as_str()?;
            script
                .ends_with(&format!("> {path}"))
                .then_some((i, script))
        })
        .unwrap_or_else(|| panic!("{r}: no init container of {} writes {path}", what(w)));
    let words: Vec<&str> = script.split_whitespace().collect();
    let ["sed", "'s/@POD_NAME@/$(POD_NAME)/g'", template, ">", _] = words[..] else {
        panic!(
            "{r}: init container {}: the script is not the one this test reads: {script}",
            init["name"]
        );
    };
    let (init_mount, _) = mount_of(init, Path::new(path)).expect("the init container mounts it");
    assert!(
        init_mount["name"] == mount["name"] && init_mount["mountPath"] == mount["mountPath"],
        "{r}: the init container writes {path} into another volume than {} reads it from",
        c["name"]
    );
    let env = list(&init["env"])
        .iter()
        .find(|e| e["name"] == "POD_NAME")
        .unwrap_or_else(|| panic!("{r}: init container {} has no POD_NAME", init["name"]));
    assert_eq!(env["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
    config_text(r, w, init, template, pod_name).replace("@POD_NAME@", pod_name)
}

/// Runs `binary --config <file> --check-config` and requires its "ok".
fn check_config_ok(binary: &str, file: &Path, env: &[(&str, &str)]) -> String {
    let (ok, text) = run_check_config(binary, file, env);
    assert!(
        ok && text.contains(": ok"),
        "{binary} refuses the config of {}:\n{text}",
        file.display()
    );
    text
}

/// Every absolute path in a config: strings starting with `/` or `file://`, and for a
/// glob the folders before its first wildcard.
fn paths_in(value: &toml::Value, out: &mut Vec<PathBuf>) {
    match value {
        toml::Value::String(s) => {
            let s = s.strip_prefix("file://").unwrap_or(s);
            if s.starts_with('/') {
                let fixed: PathBuf = Path::new(s)
                    .components()
                    .take_while(|c| {
                        !c.as_os_str()
                            .to_string_lossy()
                            .contains(['*', '?', '[', '{'])
                    })
                    .collect();
                out.push(fixed);
            }
        }
        toml::Value::Array(a) => a.iter().for_each(|v| paths_in(v, out)),
        toml::Value::Table(t) => t.values().for_each(|v| paths_in(v, out)),
        _ => {}
    }
}

/// Every path the config names is in a volume of container `c`; a file in a Secret the
/// operator creates must be one of the keys docs/kubernetes.md tells them to create.
fn paths_are_mounted(r: &Render, w: &Value, c: &Value, text: &str) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    paths_in(&toml::from_str(text).expect("TOML"), &mut paths);
    for path in &paths {
        let (mount, inside) = mount_of(c, path).unwrap_or_else(|| {
            panic!(
                "{r}: {} names {}, which is in no volume of container {}",
                what(w),
                path.display(),
                c["name"]
            )
        });
        let Some(secret) = volume(w, mount).and_then(|v| v.get("secret")) else {
            continue;
        };
        let secret = secret["secretName"].as_str().expect("secretName");
        if let Some((_, keys)) = USER_SECRETS.iter().find(|(n, _)| *n == secret) {
            let key = inside.to_string_lossy();
            assert!(
                keys.contains(&key.as_ref()),
                "{r}: {} reads {} from Secret {secret}, whose keys are {keys:?}",
                what(w),
                path.display()
            );
        }
    }
    paths
}

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    file
}

#[test]
fn every_kustomization_renders_and_passes_the_kubernetes_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for r in renders() {
        assert!(!r.objects.is_empty(), "{r} renders nothing");
        let file = dir
            .path()
            .join(format!("{}.yaml", r.name.replace('/', "_")));
        std::fs::write(&file, &r.yaml).unwrap();
        files.push(file);
        // One namespace per render, so that names meant to resolve inside it do.
        let namespaces: BTreeSet<&str> = r
            .objects
            .iter()
            .filter(|o| o["kind"] != "Namespace")
            .map(namespace)
            .collect();
        assert_eq!(namespaces.len(), 1, "{r}: objects in {namespaces:?}");
    }
    for version in KUBERNETES_VERSIONS {
        // --strict: a misspelt or misplaced field is an error, not ignored.
        let out = run(
            Command::new(kubernetes_validate())
                .args(["--strict", "--kubernetes-version", version])
                .args(&files),
            None,
        );
        let passed = out.lines().filter(|l| l.contains(" passed ")).count();
        let objects: usize = renders().iter().map(|r| r.objects.len()).sum();
        assert_eq!(passed, objects, "not every object was validated:\n{out}");
    }
}

#[test]
fn references_inside_every_render_resolve() {
    for r in renders() {
        for w in r.workloads() {
            let labels = pod_labels(w);
            assert!(
                selects(&w["spec"]["selector"], labels),
                "{r}: {} does not select its own pods",
                what(w)
            );
            let pod = pod(w);
            let volumes: BTreeMap<&str, &Value> = list(&pod["volumes"])
                .iter()
                .map(|v| (v["name"].as_str().expect("volume name"), v))
                .collect();
            let claims: BTreeSet<&str> = list(&w["spec"]["volumeClaimTemplates"])
                .iter()
                .map(name)
                .collect();
            let mut mounted = BTreeSet::new();
            for c in containers(pod) {
                let at = format!("{r}: {} container {}", what(w), c["name"]);
                for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
                    let Some(p) = c.get(probe) else { continue };
                    let port = ["httpGet", "tcpSocket", "grpc"]
                        .iter()
                        .find_map(|k| p.get(*k))
                        .map(|h| &h["port"])
                        .unwrap_or_else(|| panic!("{at}: {probe} has no port"));
                    assert!(
                        container_port(c, port).is_some(),
                        "{at}: {probe} probes port {port}, which the container does not declare"
                    );
                }
                for m in list(&c["volumeMounts"]) {
                    let v = m["name"].as_str().expect("volumeMount.name");
                    assert!(
                        volumes.contains_key(v) || claims.contains(v),
                        "{at}: mounts {v}, which is neither a volume nor a claim template"
                    );
                    mounted.insert(v);
                }
                for e in list(&c["envFrom"]) {
                    for (kind, key) in [("Secret", "secretRef"), ("ConfigMap", "configMapRef")] {
                        if let Some(reference) = e.get(key) {
                            exists(r, kind, &reference["name"], &at);
                        }
                    }
                }
                for e in list(&c["env"]) {
                    for (kind, key) in
                        [("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")]
                    {
                        if let Some(reference) = e["valueFrom"].get(key) {
                            exists(r, kind, &reference["name"], &at);
                        }
                    }
                }
            }
            for (v, volume) in &volumes {
                let at = format!("{r}: {} volume {v}", what(w));
                assert!(mounted.contains(v), "{at} is mounted by no container");
                if let Some(cm) = volume.get("configMap") {
                    exists(r, "ConfigMap", &cm["name"], &at);
                }
                if let Some(secret) = volume.get("secret") {
                    exists(r, "Secret", &secret["secretName"], &at);
                }
                assert!(
                    volume.get("projected").is_none(),
                    "{at}: projected volumes are not checked here"
                );
            }
            for c in &claims {
                assert!(
                    mounted.contains(c),
                    "{r}: {} claim {c} is mounted by no container",
                    what(w)
                );
            }
        }
        for svc in r.kind("Service") {
            let at = format!("{r}: {}", what(svc));
            let selected: Vec<&Value> = r
                .workloads()
                .filter(|w| selects(&svc["spec"]["selector"], pod_labels(w)))
                .collect();
            assert!(!selected.is_empty(), "{at} selects no pods");
            for p in list(&svc["spec"]["ports"]) {
                let target = p.get("targetPort").unwrap_or(&p["port"]);
                for w in &selected {
                    assert!(
                        containers(pod(w)).any(|c| container_port(c, target).is_some()),
                        "{at}: targetPort {target} is no container port of {}",
                        what(w)
                    );
                }
            }
        }
        for sts in r.kind("StatefulSet") {
            let service = sts["spec"]["serviceName"].as_str().expect("serviceName");
            let svc = r.named("Service", service).unwrap_or_else(|| {
                panic!("{r}: {}: serviceName {service} is not rendered", what(sts))
            });
            assert_eq!(
                svc["spec"]["clusterIP"],
                "None",
                "{r}: {} must be headless: it gives the relay pods their DNS names",
                what(svc)
            );
            assert!(
                selects(&svc["spec"]["selector"], pod_labels(sts)),
                "{r}: {} does not select {}",
                what(svc),
                what(sts)
            );
        }
        for pdb in r.kind("PodDisruptionBudget") {
            assert!(
                r.workloads()
                    .any(|w| selects(&pdb["spec"]["selector"], pod_labels(w))),
                "{r}: {} selects no pods",
                what(pdb)
            );
        }
    }
}

/// The object a pod refers to is rendered, or is a Secret the operator creates.
fn exists(r: &Render, kind: &str, object: &Value, at: &str) {
    let object = object.as_str().expect("a referenced object's name");
    if r.named(kind, object).is_some() {
        return;
    }
    assert!(
        kind == "Secret" && USER_SECRETS.iter().any(|(n, _)| *n == object),
        "{at}: refers to {kind} {object}, which is neither rendered nor a Secret docs/kubernetes.md tells the operator to create"
    );
}

#[test]
fn every_secret_the_operator_creates_is_documented() {
    let docs = std::fs::read_to_string(root().join("docs/kubernetes.md")).unwrap();
    for (secret, keys) in USER_SECRETS {
        let line = docs
            .lines()
            .find(|l| l.contains("kubectl") && l.contains("create secret") && l.contains(secret))
            .unwrap_or_else(|| {
                panic!("docs/kubernetes.md has no `kubectl ... create secret ... {secret}` line")
            });
        // `create secret tls` makes tls.crt and tls.key; a generic Secret gets the keys
        // its --from-file=<key>=... options name.
        if !line.contains("create secret tls") {
            for key in keys {
                assert!(
                    line.contains(&format!("{key}=")),
                    "docs/kubernetes.md creates the Secret {secret} without its key {key}: {line}"
                );
            }
        }
    }
}

#[test]
fn the_relay_config_fits_its_pod() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked = Vec::new();
    for r in renders() {
        for sts in r.kind("StatefulSet") {
            let c = container(sts, "relay");
            let pod_name = format!("{}-0", name(sts));
            let text = config_text(r, sts, c, config_arg(c), &pod_name);
            let file = write_config(
                dir.path(),
                &format!("{}-relay.toml", r.name.replace('/', "_")),
                &text,
            );
            check_config_ok("sluice-relay", &file, &[]);
            let config = RelayConfig::parse(&file, &text).unwrap();
            assert_eq!(config.relay.id, pod_name, "{r}: relay.id is the pod's name");

            let forward = named_port(c, "forward");
            let metrics_port = named_port(c, "metrics");
            assert_eq!(
                config.server.listen.port() as u64,
                forward,
                "{r}: server.listen"
            );
            assert!(
                config.server.listen.ip().is_unspecified(),
                "{r}: server.listen must take connections on the pod's address"
            );
            let metrics = config
                .metrics
                .listen
                .unwrap_or_else(|| panic!("{r}: the probes need metrics.listen"));
            assert_eq!(metrics.port() as u64, metrics_port, "{r}: metrics.listen");
            assert!(
                metrics.ip().is_unspecified(),
                "{r}: the kubelet probes the pod's address, not loopback"
            );
            for (probe, path) in [
                ("startupProbe", "/health"),
                ("livenessProbe", "/health"),
                ("readinessProbe", "/ready"),
            ] {
                let get = &c[probe]["httpGet"];
                assert_eq!(get["path"], path, "{r}: {probe}");
                assert_eq!(
                    container_port(c, &get["port"]),
                    Some(metrics_port),
                    "{r}: {probe}"
                );
            }
            // Agents connect to each pod's own address (headless), with the port in
            // their output.relays: keep the Service's port the container's.
            let svc = r
                .named("Service", sts["spec"]["serviceName"].as_str().unwrap())
                .unwrap();
            assert!(
                list(&svc["spec"]["ports"])
                    .iter()
                    .any(|p| p["port"] == forward
                        && container_port(c, p.get("targetPort").unwrap_or(&p["port"]))
                            == Some(forward)),
                "{r}: {} has no port {forward} to the relay's Forward port",
                what(svc)
            );

            let grace = pod(sts)["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap_or(30);
            let needed = config.relay.shutdown_timeout.get() + RELAY_STOP_BEYOND_SHUTDOWN_TIMEOUT;
            assert!(
                Duration::from_secs(grace) >= needed,
                "{r}: terminationGracePeriodSeconds {grace} is shorter than relay.shutdown_timeout plus {RELAY_STOP_BEYOND_SHUTDOWN_TIMEOUT:?}"
            );

            for (key, path) in [
                ("relay.data_dir", config.relay.data_dir.clone()),
                ("the spool", config.spool_dir()),
            ] {
                let (mount, _) = mount_of(c, &path).unwrap_or_else(|| {
                    panic!(
                        "{r}: {key} ({}) is in no volume of the relay",
                        path.display()
                    )
                });
                let template = claim(sts, mount).unwrap_or_else(|| {
                    panic!(
                        "{r}: {key} ({}) is not on the pod's PersistentVolumeClaim",
                        path.display()
                    )
                });
                assert!(!read_only(mount), "{r}: {key} is mounted read-only");
                let size = quantity(
                    template["spec"]["resources"]["requests"]["storage"]
                        .as_str()
                        .expect("a storage request"),
                );
                // The sinks' stage files, state and dead letters share the volume.
                assert!(
                    config.spool.max_size.as_u64() <= size / 5 * 4,
                    "{r}: spool.max_size {} leaves less than a fifth of the {size}-byte volume",
                    config.spool.max_size
                );
            }
            let paths = paths_are_mounted(r, sts, c, &text);
            assert!(
                paths.len() >= 3,
                "{r}: data_dir and the TLS files, at least: {paths:?}"
            );

            // docs/relay.md, "Memory": the ingest worst case, plus room for the sinks'
            // deliveries and the idle relay.
            let server = &config.server;
            let threads = server
                .decode_threads
                .unwrap_or_else(|| panic!("{r}: set server.decode_threads: without it the relay counts the node's CPUs, not the pod's"));
            let ingest = server.max_inflight_bytes.as_u64()
                + server.max_connections as u64 * 128 * 1024
                + (threads as u64 + 1) * server.max_decompressed.as_u64();
            let limit = quantity(
                c["resources"]["limits"]["memory"]
                    .as_str()
                    .expect("a memory limit"),
            );
            assert!(
                ingest + (512 << 20) <= limit,
                "{r}: memory limit {limit} does not hold the ingest worst case {ingest} plus 512 MiB"
            );
            eprintln!(
                "{r}: relay ports {forward}/{metrics_port}, grace {grace} s for shutdown_timeout {:?}, ingest worst case {} MiB of {} MiB, paths {paths:?}",
                config.relay.shutdown_timeout.get(),
                ingest >> 20,
                limit >> 20
            );
            checked.push(r.name.clone());
        }
    }
    assert!(
        checked.len() >= 2,
        "the relay base and the example overlay: {checked:?}"
    );
}

#[test]
fn the_agent_config_fits_its_pod() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked = Vec::new();
    for r in renders() {
        for ds in r.kind("DaemonSet") {
            let c = container(ds, "agent");
            let text = config_text(r, ds, c, config_arg(c), "");
            let file = write_config(
                dir.path(),
                &format!("{}-agent.toml", r.name.replace('/', "_")),
                &text,
            );
            // The DaemonSet sets HOSTNAME to the node's name (below).
            check_config_ok("sluice-agent", &file, &[("HOSTNAME", "node-1")]);
            let config = agent_config(&text);
            let raw: toml::Value = toml::from_str(&text).unwrap();

            // agent.id (part of every source id) must outlive the pod: the node's name.
            assert!(
                raw["agent"].get("id").is_none(),
                "{r}: agent.id is set in the ConfigMap: every node would get the same source ids"
            );
            let hostname = list(&c["env"])
                .iter()
                .find(|e| e["name"] == "HOSTNAME")
                .unwrap_or_else(|| panic!("{r}: the agent's HOSTNAME (its agent.id) is the pod's name, which changes with every pod"));
            assert_eq!(
                hostname["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName",
                "{r}"
            );

            let metrics_port = named_port(c, "metrics");
            let metrics = config
                .metrics
                .listen
                .unwrap_or_else(|| panic!("{r}: the probes need metrics.listen"));
            assert_eq!(metrics.port() as u64, metrics_port, "{r}: metrics.listen");
            assert!(
                metrics.ip().is_unspecified(),
                "{r}: the kubelet probes the pod's address, not loopback"
            );
            for (probe, path) in [("livenessProbe", "/health"), ("readinessProbe", "/ready")] {
                let get = &c[probe]["httpGet"];
                assert_eq!(get["path"], path, "{r}: {probe}");
                assert_eq!(
                    container_port(c, &get["port"]),
                    Some(metrics_port),
                    "{r}: {probe}"
                );
            }

            let (mount, _) = mount_of(c, &config.agent.data_dir)
                .unwrap_or_else(|| panic!("{r}: agent.data_dir is in no volume of the agent"));
            assert!(
                volume(ds, mount).is_some_and(|v| v.get("hostPath").is_some()) && !read_only(mount),
                "{r}: agent.data_dir must be a writable hostPath, so that checkpoints outlive the pod"
            );
            let paths = paths_are_mounted(r, ds, c, &text);
            for input in raw["input"].as_array().expect("inputs") {
                let globs = input["include"].as_array().expect("include");
                if globs.iter().any(|g| {
                    g.as_str()
                        .is_some_and(|g| g.starts_with("/var/log/containers/"))
                }) {
                    assert_eq!(
                        input["parser"].as_str(),
                        Some("cri"),
                        "{r}: container logs are in CRI format"
                    );
                    // The files there are links into /var/log/pods.
                    let (logs, _) = mount_of(c, Path::new("/var/log/pods"))
                        .unwrap_or_else(|| panic!("{r}: /var/log/containers/*.log link into /var/log/pods, which is not mounted"));
                    assert!(read_only(logs), "{r}: the node's logs are mounted writable");
                }
            }
            eprintln!("{r}: agent metrics port {metrics_port}, paths {paths:?}");
            checked.push(r.name.clone());
        }
    }
    assert!(
        checked.len() >= 2,
        "the agent base and the example overlay: {checked:?}"
    );
}

/// The agent config, parsed here with the id the DaemonSet's HOSTNAME gives it (this
/// process's own HOSTNAME may be unset).
fn agent_config(text: &str) -> AgentConfig {
    let with_id = text.replacen("[agent]\n", "[agent]\nid = \"node-1\"\n", 1);
    assert_ne!(with_id, text, "agent.toml has an [agent] table");
    AgentConfig::parse(Path::new("agent.toml"), &with_id).unwrap()
}

/// The relays of a render: (StatefulSet, its headless Service, Forward port, replicas,
/// namespace).
fn relays_of(r: &Render) -> Option<(String, String, u64, u64, String)> {
    let sts = r.kind("StatefulSet").next()?;
    Some((
        name(sts).to_string(),
        sts["spec"]["serviceName"].as_str()?.to_string(),
        named_port(container(sts, "relay"), "forward"),
        sts["spec"]["replicas"].as_u64().unwrap_or(1),
        namespace(sts).to_string(),
    ))
}

#[test]
fn agents_list_every_relay_pod_by_its_stable_name() {
    let base = renders()
        .iter()
        .find(|r| r.name == "relay")
        .and_then(relays_of)
        .expect("the relay base renders a StatefulSet");
    for r in renders() {
        for ds in r.kind("DaemonSet") {
            let c = container(ds, "agent");
            let text = config_text(r, ds, c, config_arg(c), "");
            let config = agent_config(&text);
            let listed: BTreeSet<&str> = config.output.relays.iter().map(|r| r.address()).collect();
            assert_eq!(
                listed.len(),
                config.output.relays.len(),
                "{r}: a relay listed twice"
            );
            match relays_of(r) {
                // With the relays in the same render: exactly its pods, in its namespace.
                Some((sts, service, port, replicas, ns)) => {
                    let pods: Vec<String> = (0..replicas)
                        .map(|i| format!("{sts}-{i}.{service}.{ns}.svc:{port}"))
                        .collect();
                    let pods: BTreeSet<&str> = pods.iter().map(String::as_str).collect();
                    assert_eq!(listed, pods, "{r}: output.relays must name every relay pod");
                }
                // The agent alone: the relay base's pods, in whatever namespace.
                None => {
                    let (sts, service, port, _, _) = &base;
                    let mut namespaces = BTreeSet::new();
                    for relay in &listed {
                        let rest = relay
                            .strip_prefix(&format!("{sts}-"))
                            .and_then(|r| r.strip_suffix(&format!(".svc:{port}")))
                            .unwrap_or_else(|| panic!("{r}: relay {relay} is not <{sts}-n>.{service}.<namespace>.svc:{port}"));
                        let (ordinal, rest) = rest.split_once('.').unwrap();
                        assert!(ordinal.parse::<u32>().is_ok(), "{r}: {relay}: ordinal");
                        let ns = rest
                            .strip_prefix(&format!("{service}."))
                            .unwrap_or_else(|| {
                                panic!("{r}: {relay}: not under the Service {service}")
                            });
                        namespaces.insert(ns);
                    }
                    assert_eq!(
                        namespaces.len(),
                        1,
                        "{r}: relays in several namespaces: {listed:?}"
                    );
                }
            }
        }
    }
}
