//! The cluster-mode deployment files in `deploy/`, checked offline:
//!
//! - every Kubernetes object in `deploy/kubernetes/*.yaml` (all but `nats-values.yaml`,
//!   which is Helm values) validates against the Kubernetes OpenAPI schemas in strict
//!   mode, unknown fields refused, with `kubernetes-validate` (PyPI), for the oldest
//!   Kubernetes the manifests support and a current one; and a StatefulSet with a
//!   misspelt field is refused, so the check can fail;
//! - the objects fit together: the StatefulSet's Service, selectors, the ConfigMap and
//!   Secret it mounts, the ports and paths its `daemon.toml` names, the server id from
//!   the pod ordinal, and a `[cluster]` table that names the NATS the chart makes with
//!   `nats-values.yaml`, which asks the servers to fsync before they acknowledge;
//! - on VMs, `nats-server.service` passes `systemd-analyze` (verify, and security at
//!   most 2.0 like the shipped units), `nats.conf.example` passes `nats-server -t` when
//!   a nats-server is installed, and `daemon.cluster.toml.example` names its nodes.
//!
//! The YAML checks need `python3 -m kubernetes_validate` (its PyYAML parses the files
//! too). Without it they are skipped with the reason printed, unless
//! `UPDRAFT_MANIFEST_TEST=require` (set by .ci/run), which makes that a failure.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The version .ci/run installs; only named in messages.
const VALIDATOR: &str = "kubernetes-validate==1.37.0";

/// Kubernetes versions the manifests are validated against: 1.28 is the first whose
/// StatefulSet controller sets the `apps.kubernetes.io/pod-index` label the server id
/// comes from, 1.37 the newest schema the pinned validator ships.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.28", "1.37"];

/// The most exposure `systemd-analyze security` may report, as for the shipped units.
const MAX_EXPOSURE: f64 = 2.0;

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(rel)
}

/// The Kubernetes manifests: `deploy/kubernetes/*.yaml` but the Helm values.
fn manifests() -> Vec<PathBuf> {
    let dir = deploy("kubernetes");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "nats-values.yaml"))
        .collect();
    out.sort();
    assert!(
        out.len() >= 2,
        "expected the updraftd manifests in {}, found {out:?}",
        dir.display()
    );
    out
}

/// Whether `python3 -m kubernetes_validate` runs. When it does not, says so and returns
/// false, or fails the test under `UPDRAFT_MANIFEST_TEST=require`.
fn have_validator() -> bool {
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--version"])
        .output();
    let why = match out {
        Ok(o) if o.status.success() => return true,
        Ok(o) => format!(
            "python3 -m kubernetes_validate failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("python3 did not run: {e}"),
    };
    assert_ne!(
        std::env::var("UPDRAFT_MANIFEST_TEST").as_deref(),
        Ok("require"),
        "kubernetes-validate is required here (UPDRAFT_MANIFEST_TEST=require): {why}; \
         install it as .ci/run does (python3 -m pip install --no-deps {VALIDATOR} and its pinned dependencies)"
    );
    eprintln!(
        "skipped: kubernetes-validate is not installed ({why}); python3 -m pip install {VALIDATOR}"
    );
    false
}

/// The YAML documents of `path` (empty ones left out) as JSON, parsed by PyYAML with
/// duplicate keys refused: PyYAML, like kubectl, would otherwise keep the last of two
/// and the validator would never see the first.
fn yaml_docs(path: &Path) -> Vec<Value> {
    const SCRIPT: &str = r#"
import json, sys, yaml

class Loader(yaml.SafeLoader):
    pass

def mapping(loader, node):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, "duplicate key %r" % (key,), key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=True)

Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
with open(sys.argv[1]) as f:
    docs = [d for d in yaml.load_all(f, Loader=Loader) if d is not None]
json.dump(docs, sys.stdout)
"#;
    let out = Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(path)
        .output()
        .expect("running python3");
    assert!(
        out.status.success(),
        "{} is not valid YAML: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).unwrap() {
        Value::Array(docs) => docs,
        other => panic!(
            "{}: expected a list of documents, got {other}",
            path.display()
        ),
    }
}

/// Runs the validator in strict mode on `files` for every version in
/// [`KUBERNETES_VERSIONS`]; `Err` carries its output when any document failed, was
/// not checked (the validator only warns, and exits 0, for a kind or apiVersion it has
/// no schema for), or was not reported as passed.
fn validate(files: &[PathBuf]) -> Result<String, String> {
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "kubernetes_validate", "--strict"]);
    for v in KUBERNETES_VERSIONS {
        cmd.args(["-k", v]);
    }
    // The validator takes everything after the first file name as file names, so the
    // options come first.
    cmd.args(files);
    let out = cmd
        .output()
        .expect("running python3 -m kubernetes_validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("INFO ") && !l.trim().is_empty())
        .collect();
    let documents: usize = files.iter().map(|f| yaml_docs(f).len()).sum();
    let passed = text
        .lines()
        .filter(|l| l.starts_with("INFO ") && l.contains(" passed for resource "))
        .count();
    if !out.status.success() || !bad.is_empty() || passed != documents * KUBERNETES_VERSIONS.len() {
        return Err(format!(
            "exit {}, {passed} of {} checks passed:\n{text}",
            out.status,
            documents * KUBERNETES_VERSIONS.len()
        ));
    }
    Ok(text)
}

/// `v` at JSON pointer `ptr`, or a panic naming what is missing where.
fn at<'a>(v: &'a Value, ptr: &str, what: &str) -> &'a Value {
    v.pointer(ptr)
        .unwrap_or_else(|| panic!("{what}: no {ptr} in {v}"))
}

/// Every Kubernetes object in the manifests.
fn objects() -> Vec<Value> {
    manifests().iter().flat_map(|p| yaml_docs(p)).collect()
}

/// The one object of `kind` named `name`.
fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} named {name} in deploy/kubernetes"
    );
    found[0]
}

/// Whether `selector` (a matchLabels map or a Service selector) selects `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let sel = selector.as_object().expect("a selector is a map");
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn every_kubernetes_manifest_validates_strictly() {
    if !have_validator() {
        return;
    }
    let files = manifests();
    match validate(&files) {
        Ok(report) => eprint!("{report}"),
        Err(e) => panic!("deploy/kubernetes did not validate: {e}"),
    }
}

#[test]
fn a_misspelt_field_or_an_unknown_kind_is_refused() {
    if !have_validator() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(deploy("kubernetes/updraftd.yaml")).unwrap();
    // The real manifest with one mistake each, so the mistake is what is refused.
    let cases = [
        (
            "statefulset-field.yaml",
            "  podManagementPolicy: Parallel\n",
            "  podManagementPolicy: Parallel\n  podManagmentPolicy: Parallel\n",
            "'podManagmentPolicy' was unexpected",
        ),
        (
            "container-field.yaml",
            "            readOnlyRootFilesystem: true\n",
            "            readOnlyRootFilesystem: true\n            readOnlyRootFileSystem: true\n",
            "'readOnlyRootFileSystem' was unexpected",
        ),
        (
            "unknown-kind.yaml",
            "kind: StatefulSet\n",
            "kind: StatefulSett\n",
            "Couldn't find schema for kind StatefulSett",
        ),
    ];
    for (name, from, to, why) in cases {
        assert!(good.contains(from), "updraftd.yaml no longer has {from:?}");
        let path = dir.path().join(name);
        std::fs::write(&path, good.replacen(from, to, 1)).unwrap();
        match validate(&[path]) {
            Ok(report) => panic!("{name} passed validation:\n{report}"),
            Err(e) => assert!(e.contains(why), "{name}: refused, but not for {why:?}: {e}"),
        }
    }
}

#[test]
fn nats_values_fsync_every_write_where_the_chart_reads_it() {
    if !have_validator() {
        return;
    }
    let path = deploy("kubernetes/nats-values.yaml");
    let docs = yaml_docs(&path);
    assert_eq!(docs.len(), 1, "{}: one document of values", path.display());
    let v = &docs[0];
    let what = "nats-values.yaml";
    // The chart merges config.jetstream.merge into the server's `jetstream {}` block,
    // where sync_interval belongs; config.merge would put it at the top level.
    assert_eq!(
        at(v, "/config/jetstream/merge/sync_interval", what),
        "always",
        "{what}: JetStream must fsync every write before acknowledging it"
    );
    assert!(
        v.pointer("/config/merge/sync_interval").is_none(),
        "{what}: sync_interval under config.merge lands outside the jetstream block"
    );
    assert_eq!(at(v, "/config/jetstream/enabled", what), true, "{what}");
    assert_ne!(
        v.pointer("/config/jetstream/fileStore/enabled"),
        Some(&Value::Bool(false)),
        "{what}: JetStream file storage must stay on"
    );
    assert_eq!(at(v, "/config/cluster/enabled", what), true, "{what}");
    assert_eq!(at(v, "/config/cluster/replicas", what), 3, "{what}");
}

#[test]
fn the_objects_fit_together_and_the_config_names_the_chart_nats() {
    if !have_validator() {
        return;
    }
    let objects = objects();
    let sts = object(&objects, "StatefulSet", "updraftd");
    let what = "StatefulSet updraftd";
    assert_eq!(at(sts, "/spec/replicas", what), 3, "{what}");
    assert_eq!(
        at(sts, "/spec/podManagementPolicy", what),
        "Parallel",
        "{what}"
    );
    let pod_labels = at(sts, "/spec/template/metadata/labels", what);
    assert!(
        selects(at(sts, "/spec/selector/matchLabels", what), pod_labels),
        "{what}: its selector does not select its pods"
    );

    // The governing Service is headless and selects the pods.
    let governing = at(sts, "/spec/serviceName", what).as_str().unwrap();
    let headless = object(&objects, "Service", governing);
    assert_eq!(
        headless["spec"]["clusterIP"], "None",
        "Service {governing}, the StatefulSet's serviceName, should be headless"
    );
    assert!(
        selects(&headless["spec"]["selector"], pod_labels),
        "Service {governing} does not select the updraftd pods"
    );

    // Agents reach the pods' UDP port through a LoadBalancer that keeps their address.
    let lbs: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "Service" && o["spec"]["type"] == "LoadBalancer")
        .collect();
    assert_eq!(lbs.len(), 1, "one LoadBalancer Service");
    let lb = lbs[0];
    assert_eq!(
        lb["spec"]["externalTrafficPolicy"], "Local",
        "the LoadBalancer must keep agents' addresses and send to local replicas only"
    );
    assert!(
        selects(&lb["spec"]["selector"], pod_labels),
        "the LoadBalancer does not select the updraftd pods"
    );
    let lb_port = &lb["spec"]["ports"][0];
    assert_eq!(lb_port["protocol"], "UDP", "the LoadBalancer's port");
    assert_eq!(lb_port["port"], 4433, "the LoadBalancer's port");

    let pdb = object(&objects, "PodDisruptionBudget", "updraftd");
    assert!(
        selects(&pdb["spec"]["selector"]["matchLabels"], pod_labels),
        "the PodDisruptionBudget does not select the updraftd pods"
    );

    // The container: command, server id, hardening, probes.
    let containers = at(sts, "/spec/template/spec/containers", what)
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 1, "{what}: one container");
    let c = &containers[0];
    let command: Vec<&str> = c["command"]
        .as_array()
        .unwrap()
        .iter()
        .chain(c["args"].as_array().into_iter().flatten())
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        command,
        ["updraftd", "serve", "--config", "/etc/updraft/daemon.toml"],
        "{what}: the container's command"
    );
    let server_id = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "UPDRAFTD__CLUSTER__SERVER_ID")
        .unwrap_or_else(|| panic!("{what}: no UPDRAFTD__CLUSTER__SERVER_ID"));
    assert_eq!(
        server_id["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.labels['apps.kubernetes.io/pod-index']",
        "{what}: the server id is the pod's ordinal"
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
    assert_eq!(
        sc["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "{what}"
    );
    assert!(
        sc["runAsNonRoot"] == true
            || sts["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] == true,
        "{what}: runAsNonRoot"
    );
    for r in ["requests", "limits"] {
        for k in ["cpu", "memory"] {
            assert!(
                c["resources"][r][k].is_string(),
                "{what}: resources.{r}.{k}"
            );
        }
    }
    let port = |name: &str| -> &Value {
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{what}: no container port {name}"))
    };
    assert_eq!(
        port("quic")["protocol"],
        "UDP",
        "{what}: container port quic"
    );
    assert_eq!(
        lb_port["targetPort"], "quic",
        "the LoadBalancer targets the quic port"
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"], "/metrics",
        "{what}: readiness probe"
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["port"], "metrics",
        "{what}: readiness probe"
    );

    // Volumes: /etc/updraft holds the ConfigMap's daemon.toml and the Secret's TLS
    // files; STATE_DIR is a claim template.
    let mounts = c["volumeMounts"].as_array().unwrap();
    let mount = |path: &str| -> &str {
        mounts
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("{what}: nothing mounted at {path}"))["name"]
            .as_str()
            .unwrap()
    };
    let volumes = at(sts, "/spec/template/spec/volumes", what)
        .as_array()
        .unwrap();
    let config_volume = volumes
        .iter()
        .find(|v| v["name"] == mount("/etc/updraft"))
        .unwrap_or_else(|| panic!("{what}: no volume for /etc/updraft"));
    let sources = config_volume["projected"]["sources"].as_array().unwrap();
    let cm_name = sources
        .iter()
        .find_map(|s| s["configMap"]["name"].as_str())
        .unwrap_or_else(|| panic!("{what}: /etc/updraft has no ConfigMap"));
    assert!(
        sources
            .iter()
            .any(|s| s["secret"]["name"] == "updraftd-tls"),
        "{what}: /etc/updraft has no Secret updraftd-tls (the TLS files)"
    );
    let state_claim = mount("/var/lib/updraftd");
    assert!(
        at(sts, "/spec/volumeClaimTemplates", what)
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["metadata"]["name"] == state_claim),
        "{what}: /var/lib/updraftd is not a volumeClaimTemplate (reset.key must persist)"
    );

    // daemon.toml: paths and ports as mounted and exposed, and a [cluster] table.
    let cm = object(&objects, "ConfigMap", cm_name);
    let text = cm["data"]["daemon.toml"]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap {cm_name} has no daemon.toml"));
    let toml: toml::Table = toml::from_str(text)
        .unwrap_or_else(|e| panic!("ConfigMap {cm_name}: daemon.toml is not TOML: {e}"));
    let what = "the ConfigMap's daemon.toml";
    assert_eq!(
        toml["state_dir"].as_str(),
        Some("/var/lib/updraftd"),
        "{what}"
    );
    assert_eq!(toml["listen"].as_str(), Some("0.0.0.0:4433"), "{what}");
    assert_eq!(
        toml["metrics_listen"].as_str(),
        Some("0.0.0.0:9464"),
        "{what}: the probes read /metrics on 9464"
    );
    assert_eq!(
        port("metrics")["containerPort"],
        9464,
        "StatefulSet updraftd: container port metrics"
    );
    for key in ["ca", "cert", "key"] {
        assert!(
            toml["tls"][key].as_str().is_some_and(|p| !p.contains('/')),
            "{what}: tls.{key} should be a file beside daemon.toml (the Secret's key)"
        );
    }
    let cluster = toml
        .get("cluster")
        .and_then(|c| c.as_table())
        .unwrap_or_else(|| panic!("{what} has no [cluster] table"));
    assert!(
        !cluster.contains_key("server_id"),
        "{what}: server_id comes from UPDRAFTD__CLUSTER__SERVER_ID, one per pod"
    );
    assert_eq!(cluster["route_by_cid"].as_bool(), Some(false), "{what}");

    // The NATS servers are the pods the chart makes with nats-values.yaml.
    let values = &yaml_docs(&deploy("kubernetes/nats-values.yaml"))[0];
    let full = values["fullnameOverride"]
        .as_str()
        .expect("nats-values.yaml sets fullnameOverride, which fixes the NATS names");
    let nodes = values["config"]["cluster"]["replicas"].as_u64().unwrap();
    let want: Vec<String> = (0..nodes)
        .map(|i| format!("nats://{full}-{i}.{full}-headless:4222"))
        .collect();
    let nats: Vec<&str> = cluster["nats"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: cluster.nats is not a list"))
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    assert_eq!(
        nats, want,
        "{what}: cluster.nats should list every NATS pod"
    );
    assert!(
        cluster
            .get("replicas")
            .and_then(|r| r.as_integer())
            .unwrap_or(3) as u64
            <= nodes,
        "{what}: more stream replicas than NATS nodes"
    );
}

fn analyze(args: &[&str]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze runs (package systemd)")
}

#[test]
fn nats_server_unit_passes_systemd_analyze() {
    let unit = deploy("vms/nats-server.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    let installed = "ExecStart=/usr/bin/nats-server ";
    assert!(text.contains(installed), "{}: ExecStart", unit.display());
    // `verify` checks that the command exists: any executable stands in for it.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("nats-server.service");
    std::fs::write(&copy, text.replace(installed, "ExecStart=/bin/sh ")).unwrap();
    let o = analyze(&["verify", copy.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "nats-server.service: verify failed: {err}"
    );
    let own: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("nats-server.service"))
        .collect();
    assert!(
        own.is_empty(),
        "nats-server.service: verify complained: {own:?}"
    );

    let o = analyze(&["security", "--offline=true", unit.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    let marker = "Overall exposure level for nats-server.service: ";
    let line = out
        .lines()
        .find(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("nats-server.service: no exposure level in: {out}"));
    let score: f64 = line[line.find(marker).unwrap() + marker.len()..]
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("nats-server.service: unreadable exposure level: {line}"));
    assert!(
        score <= MAX_EXPOSURE,
        "nats-server.service: exposure {score} > {MAX_EXPOSURE}:\n{out}"
    );
}

#[test]
fn vm_examples_agree_and_nats_conf_passes_nats_server_t() {
    let conf_path = deploy("vms/nats.conf.example");
    let conf = std::fs::read_to_string(&conf_path).unwrap();
    assert!(
        conf.lines().any(|l| l.trim() == "sync_interval: always"),
        "nats.conf.example: JetStream must fsync every write before acknowledging it"
    );
    // The route hosts, from `nats-route://HOST:6222` lines.
    let hosts: Vec<&str> = conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nats-route://"))
        .map(|r| r.split(':').next().unwrap())
        .collect();
    assert_eq!(hosts.len(), 3, "nats.conf.example: three routes");

    let daemon_path = deploy("vms/daemon.cluster.toml.example");
    let daemon: toml::Table = toml::from_str(&std::fs::read_to_string(&daemon_path).unwrap())
        .unwrap_or_else(|e| panic!("daemon.cluster.toml.example is not TOML: {e}"));
    let cluster = daemon
        .get("cluster")
        .and_then(|c| c.as_table())
        .expect("daemon.cluster.toml.example has a [cluster] table");
    let nats: Vec<&str> = cluster["nats"]
        .as_array()
        .expect("cluster.nats is a list")
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    let want: Vec<String> = hosts.iter().map(|h| format!("nats://{h}:4222")).collect();
    assert_eq!(
        nats, want,
        "daemon.cluster.toml.example: cluster.nats should list the nodes of nats.conf.example"
    );

    // nats-server's own parser, which refuses unknown keys, when one is installed.
    let runs = Command::new("nats-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !runs {
        eprintln!("nats-server -t skipped: no nats-server runs here");
        return;
    }
    let o = Command::new("nats-server")
        .arg("-t")
        .arg("-c")
        .arg(&conf_path)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "nats-server -t refused nats.conf.example: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `updraftd check-config` of `text` in a directory that also holds the TLS files it
/// names, with `env` set: its stdout and stderr, and whether it passed.
fn check_config(text: &str, env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::ca_init(d, "pki");
    for f in ["ca.pem", "server.pem", "server.key"] {
        std::fs::copy(d.join("pki").join(f), d.join(f)).unwrap();
    }
    std::fs::write(d.join("daemon.toml"), text).unwrap();
    let out = Command::new(common::bin("updraftd"))
        .args(["check-config", "--config"])
        .arg(d.join("daemon.toml"))
        .env_remove("UPDRAFTD__CLUSTER__SERVER_ID")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// The shipped cluster configs pass `updraftd check-config` as deployed: the VM
/// example as it is, the ConfigMap's with the server id its pod gets from the
/// environment, and without it refused, naming the key.
#[test]
fn the_shipped_cluster_configs_pass_check_config() {
    let vm = std::fs::read_to_string(deploy("vms/daemon.cluster.toml.example")).unwrap();
    let (ok, said) = check_config(&vm, &[]);
    assert!(ok, "daemon.cluster.toml.example: {said}");
    if !have_validator() {
        return;
    }
    let objects = objects();
    let cm = object(&objects, "ConfigMap", "updraftd-config");
    let text = cm["data"]["daemon.toml"].as_str().expect("daemon.toml");
    let (ok, said) = check_config(text, &[("UPDRAFTD__CLUSTER__SERVER_ID", "2")]);
    assert!(ok, "the ConfigMap's daemon.toml: {said}");
    let (ok, said) = check_config(text, &[]);
    assert!(!ok, "passed without a server id: {said}");
    assert!(said.contains("cluster.server_id: is required"), "{said}");
}
