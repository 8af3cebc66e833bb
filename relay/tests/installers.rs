//! The deployment files in installers/relay and installers/worker, checked by the tools operators trust and then
//! for what a schema cannot see: every Compose file against the Compose specification (check-jsonschema), every
//! Kubernetes manifest in strict mode against the API's own schemas (kubernetes-validate); then the cluster's
//! shape (three distinct nodes, 7443 over UDP and TCP, probes), that every CT_* variable named is one `ct-relay`
//! reads, and the pool workers' lock-down (`worker` below): read-only roots, no capabilities, one claim per
//! worker, a NetworkPolicy reaching only the relay, DNS and the API, the tested Claude Code, and an entrypoint
//! that hands the operator's key to the agent's metering proxy only.
//!
//! The tools are pinned in scripts/test-tools.txt and installed by scripts/test into a venv, found through
//! CT_TEST_TOOLS (or at scripts/test's default place). A missing tool fails the test; it never skips.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// Kubernetes versions the manifests are validated against: the newest kubernetes-validate bundles, and an
/// older one still common on managed clusters.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn installers() -> PathBuf {
    repo().join("installers/relay")
}

/// The venv scripts/test installs the pinned tools into.
struct Tools(PathBuf);

impl Tools {
    fn find() -> Tools {
        let dir = std::env::var_os("CT_TEST_TOOLS")
            .map(PathBuf::from)
            .or_else(|| {
                let cache = std::env::var_os("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
                Some(cache.join("codetogether/test-tools"))
            })
            .expect("neither CT_TEST_TOOLS nor HOME is set");
        for tool in ["check-jsonschema", "kubernetes-validate", "python"] {
            assert!(
                dir.join("bin").join(tool).is_file(),
                "{tool} is missing from {}: run scripts/test, which installs check-jsonschema and \
                 kubernetes-validate (pinned in scripts/test-tools.txt) into that venv and sets CT_TEST_TOOLS",
                dir.display()
            );
        }
        Tools(dir)
    }

    fn cmd(&self, tool: &str) -> Command {
        Command::new(self.0.join("bin").join(tool))
    }

    /// Every YAML document in `path`, as JSON, read by PyYAML (a dependency of kubernetes-validate) so that the
    /// relay needs no YAML crate. Anchors and merge keys are resolved, as Compose resolves them.
    fn load(&self, path: &Path) -> Vec<Value> {
        let out = self
            .cmd("python")
            .args([
                "-c",
                "import json, sys, yaml\n\
                 docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
                 print(json.dumps(docs, default=str))",
            ])
            .arg(path)
            .output()
            .unwrap();
        serde_json::from_slice(&succeeded(&out, &format!("reading {}", path.display()))).unwrap()
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn succeeded(out: &Output, what: &str) -> Vec<u8> {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        text(out)
    );
    out.stdout.clone()
}

/// Every YAML file under installers/relay, sorted into the two kinds there are; a YAML file of neither kind
/// fails the test, so that no deployment file escapes validation.
struct Files {
    compose: Vec<PathBuf>,
    kubernetes: Vec<PathBuf>,
}

fn files() -> Files {
    files_in(&installers())
}

/// Every YAML file under `root`, sorted as [`files`] sorts installers/relay's.
fn files_in(root: &Path) -> Files {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                found.push(path);
            }
        }
    }
    let mut all = Vec::new();
    walk(root, &mut all);
    all.sort();
    let mut files = Files {
        compose: Vec::new(),
        kubernetes: Vec::new(),
    };
    for path in all {
        let rel = path.strip_prefix(root).unwrap();
        if rel.components().any(|c| c.as_os_str() == "k8s") {
            files.kubernetes.push(path);
        } else if rel
            .file_name()
            .unwrap()
            .to_string_lossy()
            .contains("compose")
        {
            files.compose.push(path);
        } else {
            panic!(
                "{} is neither a Compose file (name containing `compose`) nor under k8s/: nothing validates it",
                path.display()
            );
        }
    }
    files
}

fn rel(path: &Path) -> String {
    path.strip_prefix(installers())
        .unwrap_or(path)
        .display()
        .to_string()
}

#[test]
fn the_tools_are_the_pinned_versions() {
    let tools = Tools::find();
    let pins = std::fs::read_to_string(repo().join("scripts/test-tools.txt")).unwrap();
    for tool in ["check-jsonschema", "kubernetes-validate"] {
        let pin = pins
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{tool}==")))
            .unwrap_or_else(|| panic!("scripts/test-tools.txt pins no {tool}"));
        let out = tools.cmd(tool).arg("--version").output().unwrap();
        let version = String::from_utf8_lossy(&succeeded(&out, tool)).into_owned();
        assert!(
            version.split_whitespace().any(|w| w == pin),
            "{tool} is {version:?}, scripts/test-tools.txt pins {pin}: run scripts/test to reinstall"
        );
    }
}

#[test]
fn compose_files_pass_the_compose_specification() {
    let tools = Tools::find();
    let files = files();
    let names: Vec<_> = files.compose.iter().map(|p| rel(p)).collect();
    assert_eq!(names, ["cluster/compose.yaml", "compose.yaml"]);
    let out = tools
        .cmd("check-jsonschema")
        .args(["--builtin-schema", "vendor.compose-spec"])
        .args(&files.compose)
        .output()
        .unwrap();
    succeeded(
        &out,
        "check-jsonschema --builtin-schema vendor.compose-spec",
    );

    // The same call rejects a service with a key Compose does not know, so the pass above means something.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("compose.yaml");
    std::fs::write(
        &bad,
        "services:\n  relay:\n    image: ct-relay\n    restrat: always\n",
    )
    .unwrap();
    let out = tools
        .cmd("check-jsonschema")
        .args(["--builtin-schema", "vendor.compose-spec"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a misspelt key passed:\n{}",
        text(&out)
    );
    assert!(text(&out).contains("restrat"), "{}", text(&out));
}

#[test]
fn kubernetes_manifests_pass_strict_validation() {
    let tools = Tools::find();
    let files = files();
    let names: Vec<_> = files.kubernetes.iter().map(|p| rel(p)).collect();
    assert_eq!(
        names,
        [
            "k8s/cluster/nats.yaml",
            "k8s/cluster/relay.yaml",
            "k8s/cluster/template/secret.yaml",
            "k8s/relay.yaml"
        ]
    );
    let documents: usize = files.kubernetes.iter().map(|p| tools.load(p).len()).sum();
    for version in KUBERNETES_VERSIONS {
        let out = tools
            .cmd("kubernetes-validate")
            .args(["--strict", "--kubernetes-version", version])
            .args(&files.kubernetes)
            .output()
            .unwrap();
        succeeded(&out, &format!("kubernetes-validate --strict -k {version}"));
        // One "passed" line per document: none was skipped (an unknown kind, say) without failing.
        let passed = text(&out).matches(" passed for resource ").count();
        assert_eq!(
            passed,
            documents,
            "kubernetes-validate -k {version}:\n{}",
            text(&out)
        );
    }

    // Strict mode rejects a field the API does not have, so the pass above means something.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("service.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec:\n  type: LoadBalancer\n  \
         ports:\n    - {port: 7443, protocol: UDP, targetPorts: quic}\n",
    )
    .unwrap();
    let out = tools
        .cmd("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSIONS[0]])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "an unknown field passed:\n{}",
        text(&out)
    );
    assert!(text(&out).contains("targetPorts"), "{}", text(&out));
}

/// A Compose service's environment as a map, from either of Compose's two forms.
fn environment(service: &Value) -> BTreeMap<String, String> {
    match &service["environment"] {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                )
            })
            .collect(),
        Value::Array(list) => list
            .iter()
            .map(|kv| {
                let kv = kv.as_str().unwrap();
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// A Compose service's published ports as (host port, container port, protocol).
fn published(service: &Value) -> Vec<(u16, u16, String)> {
    let ports = service["ports"].as_array().cloned().unwrap_or_default();
    ports
        .iter()
        .map(|p| match p {
            Value::String(s) => {
                let (mapping, protocol) = s.split_once('/').unwrap_or((s, "tcp"));
                let parts: Vec<&str> = mapping.split(':').collect();
                assert!(parts.len() >= 2, "port {s:?} publishes nothing on the host");
                let host = parts[parts.len() - 2].parse().unwrap();
                let container = parts[parts.len() - 1].parse().unwrap();
                (host, container, protocol.to_owned())
            }
            long => (
                long["published"].as_str().map_or_else(
                    || long["published"].as_u64().unwrap() as u16,
                    |s| s.parse().unwrap(),
                ),
                long["target"].as_u64().unwrap() as u16,
                long["protocol"].as_str().unwrap_or("tcp").to_owned(),
            ),
        })
        .collect()
}

/// The host of a `scheme://[user[:password]@]host[:port][/path]` URL.
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    host_port.split(':').next().unwrap()
}

#[test]
fn the_compose_cluster_runs_three_distinct_nodes_on_postgres_and_nats() {
    let tools = Tools::find();
    let doc = tools
        .load(&installers().join("cluster/compose.yaml"))
        .remove(0);
    let services = doc["services"].as_object().unwrap();
    let relays: Vec<_> = services
        .iter()
        .filter(|(_, s)| environment(s).contains_key("CT_NODE_ID"))
        .collect();
    assert_eq!(
        relays.len(),
        3,
        "relay services: {:?}",
        relays.iter().map(|r| r.0).collect::<Vec<_>>()
    );

    let mut node_ids = BTreeSet::new();
    let mut host_ports = BTreeSet::new();
    for (name, relay) in &relays {
        let env = environment(relay);
        assert!(
            node_ids.insert(env["CT_NODE_ID"].clone()),
            "{name}: CT_NODE_ID repeats another node's"
        );
        assert_eq!(
            relay["build"]["dockerfile"], "installers/relay/Dockerfile",
            "{name} is built from the relay's Dockerfile"
        );

        // 7443 inside over UDP (QUIC) and TCP (HTTPS), on one host port of the node's own.
        let ports = published(relay);
        let host: BTreeSet<u16> = ports.iter().map(|p| p.0).collect();
        assert_eq!(
            host.len(),
            1,
            "{name} publishes one host port for both protocols: {ports:?}"
        );
        let host = *host.first().unwrap();
        let protocols: BTreeSet<(u16, &str)> = ports.iter().map(|p| (p.1, p.2.as_str())).collect();
        assert_eq!(
            protocols,
            BTreeSet::from([(7443, "tcp"), (7443, "udp")]),
            "{name}: {ports:?}"
        );
        assert!(
            host_ports.insert(host),
            "{name} publishes {host}, as another node does"
        );
        let public = &env["CT_RELAY_PUBLIC_ADDR"];
        assert!(
            public.ends_with(&format!(":{host}")),
            "{name} announces {public:?}, not the port it publishes ({host})"
        );

        // The database and NATS are services of this file, and the node waits for the database to be healthy.
        let database = &env["CT_DATABASE_URL"];
        assert!(database.starts_with("postgres://"), "{name}: {database}");
        let pg = url_host(database);
        assert!(
            services.contains_key(pg),
            "{name}: CT_DATABASE_URL names {pg:?}, no service here"
        );
        assert_eq!(
            relay["depends_on"][pg]["condition"], "service_healthy",
            "{name}"
        );
        let nats = &env["CT_NATS_URL"];
        assert!(nats.starts_with("nats://"), "{name}: {nats}");
        let nats_host = url_host(nats);
        assert!(
            services.contains_key(nats_host),
            "{name}: CT_NATS_URL names {nats_host:?}, no service here"
        );
        assert!(
            relay["depends_on"][nats_host].is_object(),
            "{name} depends on NATS"
        );

        assert_eq!(relay["read_only"], true, "{name}");
        assert_eq!(relay["cap_drop"], serde_json::json!(["ALL"]), "{name}");
        assert!(
            relay["security_opt"]
                .as_array()
                .unwrap()
                .iter()
                .any(|o| o == "no-new-privileges:true"),
            "{name}"
        );
        assert_eq!(
            relay["stop_grace_period"], "30s",
            "{name}: SIGTERM needs time to drain"
        );
    }
    assert_eq!(host_ports, BTreeSet::from([7443, 7444, 7445]));

    let postgres = &services["postgres"];
    assert_eq!(postgres["image"], "postgres:16");
    assert!(
        postgres["healthcheck"]["test"].is_array(),
        "postgres has a healthcheck"
    );
    assert!(
        environment(postgres)["POSTGRES_PASSWORD"].contains(":?"),
        "POSTGRES_PASSWORD must be required (`:?`), never defaulted"
    );
    assert!(
        postgres["volumes"]
            .as_array()
            .is_some_and(|v| !v.is_empty()),
        "postgres keeps its data in a volume"
    );
    assert_eq!(services["nats"]["image"], "nats:2");
}

/// The objects of every manifest under `dir`, by (kind, name).
fn manifests(tools: &Tools, dir: &Path) -> BTreeMap<(String, String), Value> {
    let mut objects = BTreeMap::new();
    let all = if dir.starts_with(installers()) {
        files()
    } else {
        files_in(&worker::dir())
    };
    for path in all.kubernetes.iter().filter(|p| p.starts_with(dir)) {
        for doc in tools.load(path) {
            let key = (
                doc["kind"].as_str().unwrap().to_owned(),
                doc["metadata"]["name"].as_str().unwrap().to_owned(),
            );
            assert!(
                doc["metadata"]["namespace"].is_null(),
                "{key:?} in {} names a namespace",
                rel(path)
            );
            assert!(objects.insert(key.clone(), doc).is_none(), "{key:?} twice");
        }
    }
    objects
}

/// Whether every label `selector` asks for is on `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().unwrap();
    !selector.is_empty() && selector.iter().all(|(k, v)| &labels[k] == v)
}

#[test]
fn the_kubernetes_cluster_runs_three_probed_replicas_behind_udp_and_tcp() {
    let tools = Tools::find();
    let objects = manifests(&tools, &installers().join("k8s/cluster"));
    let get = |kind: &str, name: &str| {
        objects
            .get(&(kind.to_owned(), name.to_owned()))
            .unwrap_or_else(|| panic!("no {kind} {name}: {:?}", objects.keys()))
    };

    let deployment = get("Deployment", "ct-relay");
    assert_eq!(deployment["spec"]["replicas"], 3, "relay replicas");
    let pod = &deployment["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    assert!(selects(
        &deployment["spec"]["selector"]["matchLabels"],
        labels
    ));
    let spec = &pod["spec"];
    let containers = spec["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let relay = &containers[0];

    // Probes over HTTPS on the container's TCP port 7443 (named or by number).
    let tcp_port = |port: &Value| -> (u64, String) {
        let found = relay["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| match port {
                Value::String(name) => p["name"] == name.as_str(),
                number => {
                    &p["containerPort"] == number
                        && p["protocol"].as_str().unwrap_or("TCP") == "TCP"
                }
            });
        let found = found.unwrap_or_else(|| panic!("no container port {port}"));
        (
            found["containerPort"].as_u64().unwrap(),
            found["protocol"].as_str().unwrap_or("TCP").to_owned(),
        )
    };
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &relay[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["scheme"], "HTTPS", "{probe}");
        assert_eq!(tcp_port(&get["port"]), (7443, "TCP".to_owned()), "{probe}");
    }

    let env: BTreeMap<&str, &Value> = relay["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e))
        .collect();
    assert_eq!(
        env["CT_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name",
        "the node id is the pod's name"
    );
    // Everything that may carry a password comes from the Secret, whose template has each key.
    let from_secret = |var: &str| {
        let reference = &env[var]["valueFrom"]["secretKeyRef"];
        let secret = get("Secret", reference["name"].as_str().unwrap());
        secret["stringData"][reference["key"].as_str().unwrap()]
            .as_str()
            .unwrap_or_else(|| panic!("{var}: the Secret template has no such key"))
            .to_string()
    };
    for secret_var in ["CT_DATABASE_URL", "DISCORD_TOKEN"] {
        from_secret(secret_var);
    }
    let nats = &from_secret("CT_NATS_URL");
    let nats_service = get("Service", url_host(nats));
    assert!(
        nats_service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"] == 4222),
        "{nats}: the NATS Service has no port 4222"
    );
    assert!(
        objects.iter().any(|((kind, _), o)| kind == "Deployment"
            && selects(
                &nats_service["spec"]["selector"],
                &o["spec"]["template"]["metadata"]["labels"]
            )),
        "the NATS Service selects no Deployment"
    );
    // NATS admits the relay pods and nobody else.
    let nats_pods = &nats_service["spec"]["selector"];
    let policy = objects
        .iter()
        .find(|((kind, _), o)| {
            kind == "NetworkPolicy" && selects(&o["spec"]["podSelector"]["matchLabels"], nats_pods)
        })
        .expect("a NetworkPolicy for the NATS pods")
        .1;
    assert_eq!(
        policy["spec"]["policyTypes"],
        serde_json::json!(["Ingress"])
    );
    let rules = policy["spec"]["ingress"].as_array().unwrap();
    assert!(
        !rules.is_empty(),
        "an empty ingress list admits nobody at all"
    );
    for rule in rules {
        let from = rule["from"]
            .as_array()
            .expect("every rule names who may connect");
        assert!(
            !from.is_empty()
                && from.iter().all(|peer| {
                    peer.as_object().is_some_and(|p| p.len() == 1)
                        && selects(&peer["podSelector"]["matchLabels"], labels)
                }),
            "only the relay pods may reach NATS: {rule}"
        );
    }

    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        spec["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(relay["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(relay["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(
        relay["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    assert!(relay["resources"]["requests"].is_object(), "resources");
    assert!(
        spec["terminationGracePeriodSeconds"].as_u64().unwrap() >= 30,
        "time to drain"
    );
    let spread = spec["topologySpreadConstraints"]
        .as_array()
        .is_some_and(|c| {
            c.iter()
                .any(|c| c["topologyKey"] == "kubernetes.io/hostname")
        });
    let anti = spec["affinity"]["podAntiAffinity"].is_object();
    assert!(spread || anti, "replicas are spread across machines");

    let budget = objects
        .iter()
        .find(|((kind, _), o)| {
            kind == "PodDisruptionBudget" && selects(&o["spec"]["selector"]["matchLabels"], labels)
        })
        .expect("a PodDisruptionBudget for the relay pods");
    assert!(budget.1["spec"]["maxUnavailable"] == 1 || budget.1["spec"]["minAvailable"] == 2);

    // One LoadBalancer Service carries 7443 over both UDP and TCP, each to the container port of its protocol.
    let service = objects
        .iter()
        .find(|((kind, _), o)| kind == "Service" && selects(&o["spec"]["selector"], labels))
        .expect("a Service for the relay pods")
        .1;
    assert_eq!(service["spec"]["type"], "LoadBalancer");
    let mut carried = BTreeSet::new();
    for port in service["spec"]["ports"].as_array().unwrap() {
        let protocol = port["protocol"].as_str().unwrap_or("TCP");
        let target = relay["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| match &port["targetPort"] {
                Value::String(name) => p["name"] == name.as_str(),
                Value::Null => {
                    p["containerPort"] == port["port"]
                        && p["protocol"].as_str().unwrap_or("TCP") == protocol
                }
                number => {
                    &p["containerPort"] == number
                        && p["protocol"].as_str().unwrap_or("TCP") == protocol
                }
            })
            .unwrap_or_else(|| panic!("Service port {port} reaches no container port"));
        assert_eq!(
            target["protocol"].as_str().unwrap_or("TCP"),
            protocol,
            "{port}"
        );
        assert_eq!(target["containerPort"], 7443, "{port}");
        carried.insert((port["port"].as_u64().unwrap(), protocol.to_owned()));
    }
    assert_eq!(
        carried,
        BTreeSet::from([(7443, "TCP".to_owned()), (7443, "UDP".to_owned())])
    );
}

/// The environment variables `ct-relay --help` documents (`[env: NAME=...]`).
fn documented_variables() -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_ct-relay"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(succeeded(&out, "ct-relay --help")).unwrap();
    help.split("[env: ")
        .skip(1)
        .map(|rest| rest.split(['=', ']']).next().unwrap().to_owned())
        .collect()
}

#[test]
fn every_ct_variable_in_the_installers_is_one_the_relay_reads() {
    let documented = documented_variables();
    assert!(
        documented.contains("CT_RELAY_DATA_DIR") && documented.contains("CT_RELAY_PUBLIC_ADDR"),
        "ct-relay --help lists no env vars the way this test reads them: {documented:?}"
    );

    // Every CT_ word in every file (comments included: a command shown to operators must work too).
    fn walk(dir: &Path, used: &mut BTreeMap<String, BTreeSet<String>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, used);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("CT_") {
                    used.entry(word.to_owned()).or_default().insert(rel(&path));
                }
            }
        }
    }
    let mut used = BTreeMap::new();
    walk(&installers(), &mut used);
    for cluster in ["CT_DATABASE_URL", "CT_NATS_URL", "CT_NODE_ID"] {
        assert!(
            used.contains_key(cluster),
            "the installers never set {cluster}"
        );
    }
    let unknown: Vec<_> = used
        .iter()
        .filter(|(name, _)| !documented.contains(*name))
        .collect();
    assert!(
        unknown.is_empty(),
        "the installers use variables `ct-relay --help` does not mention (name: files): {unknown:?}\n\
         documented: {documented:?}"
    );
}

/// installers/worker: the pool workers' image, Compose file and Kubernetes manifests (Model 3).
mod worker {
    use super::*;

    pub(super) fn dir() -> PathBuf {
        repo().join("installers/worker")
    }

    fn read(name: &str) -> String {
        std::fs::read_to_string(dir().join(name)).unwrap()
    }

    fn name_of(path: &Path) -> String {
        path.strip_prefix(dir())
            .unwrap_or(path)
            .display()
            .to_string()
    }

    #[test]
    fn the_compose_file_passes_the_compose_specification() {
        let tools = Tools::find();
        let files = files_in(&dir());
        let names: Vec<_> = files.compose.iter().map(|p| name_of(p)).collect();
        assert_eq!(names, ["compose.yaml"]);
        let out = tools
            .cmd("check-jsonschema")
            .args(["--builtin-schema", "vendor.compose-spec"])
            .args(&files.compose)
            .output()
            .unwrap();
        succeeded(
            &out,
            "check-jsonschema --builtin-schema vendor.compose-spec",
        );
    }

    #[test]
    fn the_manifests_pass_strict_validation() {
        let tools = Tools::find();
        let files = files_in(&dir());
        let names: Vec<_> = files.kubernetes.iter().map(|p| name_of(p)).collect();
        assert_eq!(names, ["k8s/template/secret.yaml", "k8s/worker.yaml"]);
        let documents: usize = files.kubernetes.iter().map(|p| tools.load(p).len()).sum();
        for version in KUBERNETES_VERSIONS {
            let out = tools
                .cmd("kubernetes-validate")
                .args(["--strict", "--kubernetes-version", version])
                .args(&files.kubernetes)
                .output()
                .unwrap();
            succeeded(&out, &format!("kubernetes-validate --strict -k {version}"));
            let passed = text(&out).matches(" passed for resource ").count();
            assert_eq!(
                passed,
                documents,
                "kubernetes-validate -k {version}:\n{}",
                text(&out)
            );
        }
    }

    /// The named volume a Compose service mounts at `target` (short `VOLUME:TARGET[:MODE]` or long syntax).
    fn named_volume(service: &Value, target: &str) -> Option<String> {
        service["volumes"].as_array()?.iter().find_map(|v| match v {
            Value::String(s) => {
                let mut parts = s.split(':');
                let (source, at) = (parts.next()?, parts.next()?);
                (at == target && !source.starts_with(['/', '.', '~'])).then(|| source.to_owned())
            }
            long => (long["type"] == "volume" && long["target"] == target)
                .then(|| long["source"].as_str().map(str::to_owned))
                .flatten(),
        })
    }

    #[test]
    fn compose_runs_a_relay_and_two_workers_each_with_volumes_of_its_own_and_no_port() {
        let tools = Tools::find();
        let doc = tools.load(&dir().join("compose.yaml")).remove(0);
        let services = doc["services"].as_object().unwrap();
        let declared: BTreeSet<&String> = doc["volumes"].as_object().unwrap().keys().collect();

        let relay = &services["relay"];
        assert_eq!(relay["build"]["dockerfile"], "installers/relay/Dockerfile");
        let ports: BTreeSet<(u16, String)> =
            published(relay).into_iter().map(|p| (p.1, p.2)).collect();
        assert_eq!(
            ports,
            BTreeSet::from([(7443, "tcp".to_owned()), (7443, "udp".to_owned())])
        );
        // Users' agents dial the public address first; the workers can fall back on the Compose network's name.
        let public = &environment(relay)["CT_RELAY_PUBLIC_ADDR"];
        assert!(
            public.contains(":?") && public.ends_with(",relay:7443"),
            "{public}"
        );

        let workers: Vec<_> = services
            .iter()
            .filter(|(_, s)| s["build"]["dockerfile"] == "installers/worker/Dockerfile")
            .collect();
        assert_eq!(
            workers.iter().map(|w| w.0.as_str()).collect::<Vec<_>>(),
            ["worker-1", "worker-2"]
        );
        let mut volumes = BTreeSet::new();
        let mut tokens = BTreeSet::new();
        let mut hostnames = BTreeSet::new();
        for (name, worker) in &workers {
            assert!(
                worker["ports"].is_null() && worker["expose"].is_null(),
                "{name}: a worker dials the relay and listens on nothing"
            );
            assert!(
                worker["privileged"].is_null() || worker["privileged"] == false,
                "{name} is privileged"
            );
            assert!(worker["cap_add"].is_null(), "{name} adds capabilities");
            assert_eq!(worker["read_only"], true, "{name}");
            assert_eq!(worker["cap_drop"], serde_json::json!(["ALL"]), "{name}");
            let options: Vec<&str> = worker["security_opt"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o.as_str().unwrap())
                .collect();
            assert!(options.contains(&"no-new-privileges:true"), "{name}");
            assert!(
                worker["tmpfs"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|t| t == "/tmp")),
                "{name}: /tmp must be writable under a read-only root"
            );
            for target in ["/data", "/config"] {
                let volume = named_volume(worker, target)
                    .unwrap_or_else(|| panic!("{name} keeps {target} in no named volume"));
                assert!(
                    declared.contains(&volume),
                    "{name}: {volume} is not declared"
                );
                assert!(
                    volumes.insert(volume.clone()),
                    "{name}: {volume} is mounted twice"
                );
            }
            let env = environment(worker);
            assert!(
                env["ANTHROPIC_API_KEY"].starts_with("${ANTHROPIC_API_KEY:?"),
                "{name}: the key must be required from the env file, never defaulted: {}",
                env["ANTHROPIC_API_KEY"]
            );
            assert!(
                env.keys()
                    .all(|k| ["ANTHROPIC_API_KEY", "CT_PAIR_TOKEN"].contains(&k.as_str())),
                "{name}: the key goes in under one name, which the entrypoint moves: {env:?}"
            );
            assert!(tokens.insert(env["CT_PAIR_TOKEN"].clone()), "{name}");
            assert!(hostnames.insert(worker["hostname"].to_string()), "{name}");
        }
        assert_eq!(volumes.len(), 4);
    }

    /// Every container of a pod spec, init containers first.
    fn containers(spec: &Value) -> Vec<&Value> {
        ["initContainers", "containers"]
            .iter()
            .filter_map(|k| spec[*k].as_array())
            .flatten()
            .collect()
    }

    #[test]
    fn the_statefulset_runs_locked_down_workers_with_one_claim_each() {
        let tools = Tools::find();
        let objects = manifests(&tools, &dir().join("k8s"));
        let get = |kind: &str, name: &str| {
            objects
                .get(&(kind.to_owned(), name.to_owned()))
                .unwrap_or_else(|| panic!("no {kind} {name}: {:?}", objects.keys()))
        };
        let set = get("StatefulSet", "ct-worker");
        assert_eq!(set["spec"]["replicas"], 2);
        let service = get("Service", set["spec"]["serviceName"].as_str().unwrap());
        assert_eq!(service["spec"]["clusterIP"], "None", "headless");
        assert!(
            service["spec"]["ports"].is_null(),
            "workers listen on nothing"
        );
        let claims = set["spec"]["volumeClaimTemplates"].as_array().unwrap();
        assert_eq!(claims.len(), 1, "one volume claim per worker");
        let claim = claims[0]["metadata"]["name"].as_str().unwrap();

        let pod = &set["spec"]["template"];
        assert!(selects(
            &set["spec"]["selector"]["matchLabels"],
            &pod["metadata"]["labels"]
        ));
        let spec = &pod["spec"];
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
        assert_ne!(spec["securityContext"]["runAsUser"], 0);
        assert_eq!(spec["automountServiceAccountToken"], false);
        assert_eq!(spec["hostUsers"], false);
        for host in ["hostNetwork", "hostPID", "hostIPC"] {
            assert!(spec[host].is_null() || spec[host] == false, "{host}");
        }
        let pod_seccomp = &spec["securityContext"]["seccompProfile"]["type"];

        // The pod's volumes: the claim, emptyDirs, and Secrets; nothing from the node.
        let volumes: BTreeMap<&str, &Value> = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["name"].as_str().unwrap(), v))
            .collect();
        for (name, volume) in &volumes {
            assert!(
                volume["emptyDir"].is_object() || volume["secret"].is_object(),
                "volume {name}: {volume}"
            );
        }

        let all = containers(spec);
        assert_eq!(all.len(), 2, "the folders init container and the worker");
        for container in &all {
            let name = container["name"].as_str().unwrap();
            let sc = &container["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(
                sc["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{name}"
            );
            assert!(
                sc["capabilities"]["add"].is_null(),
                "{name} adds capabilities"
            );
            assert!(
                sc["privileged"].is_null() || sc["privileged"] == false,
                "{name} is privileged"
            );
            assert!(
                sc["runAsUser"].is_null() && sc["runAsNonRoot"].is_null(),
                "{name} keeps the pod's non-root user"
            );
            // A seccomp profile is chosen for every container, by the pod or (with its reason) the container.
            assert!(
                sc["seccompProfile"]["type"].is_string() || pod_seccomp.is_string(),
                "{name}: no seccomp profile named"
            );
            for mount in container["volumeMounts"].as_array().unwrap() {
                let volume = mount["name"].as_str().unwrap();
                assert!(
                    volume == claim || volumes.contains_key(volume),
                    "{name} mounts {volume}, which is no volume"
                );
            }
        }

        let worker = all.iter().find(|c| c["name"] == "worker").unwrap();
        let mounts: BTreeMap<&str, &Value> = worker["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["mountPath"].as_str().unwrap(), m))
            .collect();
        // Workspaces and config on the claim, apart; /tmp and the home writable, and nothing else.
        assert_eq!(mounts["/data"]["name"], claim);
        assert_eq!(mounts["/config"]["name"], claim);
        assert_ne!(mounts["/data"]["subPath"], mounts["/config"]["subPath"]);
        assert!(mounts["/data"]["subPath"].is_string());
        for writable in ["/tmp", "/home/ct-worker"] {
            let volume = mounts[writable]["name"].as_str().unwrap();
            assert!(volumes[volume]["emptyDir"].is_object(), "{writable}");
        }
        for (path, mount) in &mounts {
            let volume = mount["name"].as_str().unwrap();
            if volume != claim && volumes[volume]["secret"].is_object() {
                assert_eq!(mount["readOnly"], true, "{path}");
            }
        }
        // The init container makes the claim's two folders by the names the worker mounts.
        let init = all.iter().find(|c| c["name"] != "worker").unwrap();
        let command = init["command"].to_string();
        for sub in ["/data", "/config"] {
            let sub = mounts[sub]["subPath"].as_str().unwrap();
            assert!(command.contains(&format!("/{sub}\"")), "{command}");
        }

        // The key comes from a Secret of the template as ANTHROPIC_API_KEY, which the entrypoint moves; the
        // pairing tokens from another one, mounted read-only, never the key's.
        let env: BTreeMap<&str, &Value> = worker["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["name"].as_str().unwrap(), e))
            .collect();
        let key = &env["ANTHROPIC_API_KEY"]["valueFrom"]["secretKeyRef"];
        let key_secret = key["name"].as_str().unwrap();
        assert!(get("Secret", key_secret)["stringData"][key["key"].as_str().unwrap()].is_string());
        assert!(
            !env.contains_key("CT_AGENT_SHARED_API_KEY"),
            "the entrypoint sets the agent's key setting from ANTHROPIC_API_KEY"
        );
        let token_file = env["CT_PAIR_TOKEN_FILE"]["value"].as_str().unwrap();
        let (token_dir, token_name) = token_file.rsplit_once('/').unwrap();
        let tokens_volume = volumes[mounts[token_dir]["name"].as_str().unwrap()];
        let tokens_secret = tokens_volume["secret"]["secretName"].as_str().unwrap();
        assert_ne!(
            tokens_secret, key_secret,
            "the key is never a file beside the tokens"
        );
        let template = get("Secret", tokens_secret)["stringData"]
            .as_object()
            .unwrap();
        for replica in 0..2 {
            let file = token_name.replace("$(POD_NAME)", &format!("ct-worker-{replica}"));
            assert!(
                template.contains_key(&file),
                "no token {file} in the template"
            );
        }
    }

    /// The pod labels of the relay's Deployment in each of the relay's manifests.
    fn relay_pod_labels(tools: &Tools) -> Vec<Value> {
        files()
            .kubernetes
            .iter()
            .flat_map(|p| tools.load(p))
            .filter(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "ct-relay")
            .map(|o| o["spec"]["template"]["metadata"]["labels"].clone())
            .collect()
    }

    fn ports(rule: &Value) -> BTreeSet<(u64, String)> {
        let ports = rule["ports"]
            .as_array()
            .expect("a rule without ports allows them all");
        ports
            .iter()
            .map(|p| {
                (
                    p["port"].as_u64().unwrap(),
                    p["protocol"].as_str().unwrap_or("TCP").to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn the_network_policy_admits_nothing_and_reaches_only_the_relay_dns_and_the_api() {
        let tools = Tools::find();
        let objects = manifests(&tools, &dir().join("k8s"));
        let set = &objects[&("StatefulSet".to_owned(), "ct-worker".to_owned())];
        let labels = &set["spec"]["template"]["metadata"]["labels"];
        let policies: Vec<_> = objects
            .iter()
            .filter(|((kind, _), o)| {
                kind == "NetworkPolicy" && selects(&o["spec"]["podSelector"]["matchLabels"], labels)
            })
            .collect();
        assert_eq!(policies.len(), 1, "one NetworkPolicy for the workers");
        let spec = &policies[0].1["spec"];
        let types: BTreeSet<&str> = spec["policyTypes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(types, BTreeSet::from(["Egress", "Ingress"]));
        assert!(
            spec["ingress"].is_null() || spec["ingress"] == serde_json::json!([]),
            "nothing may connect to a worker: {}",
            spec["ingress"]
        );

        let relays = relay_pod_labels(&tools);
        assert_eq!(
            relays.len(),
            2,
            "the relay's two Deployments (single and cluster)"
        );
        let (mut relay, mut dns, mut api) = (0, 0, 0);
        for rule in spec["egress"].as_array().unwrap() {
            let to = rule["to"]
                .as_array()
                .expect("every egress rule names where to");
            assert!(!to.is_empty(), "an empty `to` reaches everywhere: {rule}");
            let ports = ports(rule);
            let pods_only = to.iter().all(|p| {
                p.as_object().is_some_and(|p| p.len() == 1) && p["podSelector"].is_object()
            });
            if pods_only {
                // The relay, in this namespace: each peer selects one of the relay's Deployments, and each of
                // those is selected.
                for peer in to {
                    let selector = &peer["podSelector"]["matchLabels"];
                    assert!(
                        relays.iter().any(|l| selects(selector, l)),
                        "{peer} selects no relay pod"
                    );
                }
                for l in &relays {
                    assert!(
                        to.iter()
                            .any(|p| selects(&p["podSelector"]["matchLabels"], l)),
                        "the relay pods labelled {l} are not reachable"
                    );
                }
                assert_eq!(
                    ports,
                    BTreeSet::from([(7443, "TCP".to_owned()), (7443, "UDP".to_owned())])
                );
                relay += 1;
            } else if to
                .iter()
                .all(|p| p["ipBlock"].is_object() && p.as_object().unwrap().len() == 1)
            {
                // The API: HTTPS only, to addresses outside the cluster's private ranges and the metadata service.
                assert_eq!(ports, BTreeSet::from([(443, "TCP".to_owned())]));
                for peer in to {
                    let block = &peer["ipBlock"];
                    let except: BTreeSet<&str> = block["except"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|e| e.as_str().unwrap())
                        .collect();
                    let needed: &[&str] = match block["cidr"].as_str().unwrap() {
                        "0.0.0.0/0" => &[
                            "10.0.0.0/8",
                            "172.16.0.0/12",
                            "192.168.0.0/16",
                            "169.254.0.0/16",
                            "100.64.0.0/10",
                        ],
                        "::/0" => &["fc00::/7", "fe80::/10"],
                        other => panic!("unexpected ipBlock {other}"),
                    };
                    for range in needed {
                        assert!(except.contains(range), "{range} is not excepted: {block}");
                    }
                }
                api += 1;
            } else {
                // DNS: the cluster's resolver pods in kube-system, port 53.
                for peer in to {
                    assert_eq!(
                        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
                        "kube-system",
                        "{peer}"
                    );
                    assert!(peer["podSelector"]["matchLabels"].is_object(), "{peer}");
                }
                assert_eq!(
                    ports,
                    BTreeSet::from([(53, "TCP".to_owned()), (53, "UDP".to_owned())])
                );
                dns += 1;
            }
        }
        assert_eq!(
            (relay, dns, api),
            (1, 1, 1),
            "egress: relay, DNS and the API only"
        );
    }

    #[test]
    fn the_image_pins_the_tested_claude_code_and_runs_unprivileged() {
        let package: Value = serde_json::from_str(
            &std::fs::read_to_string(repo().join("testkit/claude/package.json")).unwrap(),
        )
        .unwrap();
        let tested = package["dependencies"]["@anthropic-ai/claude-code"]
            .as_str()
            .unwrap();
        let dockerfile = read("Dockerfile");
        let instructions: Vec<&str> = dockerfile
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let pinned = instructions
            .iter()
            .find_map(|l| l.strip_prefix("ARG CLAUDE_CODE_VERSION="))
            .expect("ARG CLAUDE_CODE_VERSION=... with the tested version as default");
        assert_eq!(
            pinned, tested,
            "the image installs Claude Code {pinned}, the tests run {tested}"
        );
        assert!(
            dockerfile.contains("\"@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION}\""),
            "npm installs the pinned version"
        );

        // Base images named by tag, never `latest`.
        let froms: Vec<&str> = instructions
            .iter()
            .filter_map(|l| l.strip_prefix("FROM "))
            .collect();
        assert_eq!(froms.len(), 2, "a build stage and a runtime stage");
        for from in &froms {
            let image = from.split_whitespace().next().unwrap();
            assert!(
                image.contains(':') && !image.ends_with(":latest"),
                "{image}"
            );
        }
        // The build stage's Rust can build every locked dependency (`rust-version`), or `--locked` fails.
        let rust = froms[0]
            .split_whitespace()
            .next()
            .unwrap()
            .strip_prefix("rust:")
            .expect("the build stage is a Rust image");
        let version = |v: &str| -> Vec<u64> {
            v.split(['.', '-'])
                .map_while(|p| p.parse().ok())
                .chain([0, 0])
                .take(3)
                .collect()
        };
        let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "metadata",
                "--format-version",
                "1",
                "--locked",
                "--manifest-path",
            ])
            .arg(repo().join("Cargo.toml"))
            .output()
            .unwrap();
        let metadata: Value =
            serde_json::from_slice(&succeeded(&out, "cargo metadata --locked")).unwrap();
        let (newest, package) = metadata["packages"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| Some((version(p["rust_version"].as_str()?), p["name"].to_string())))
            .max()
            .unwrap();
        assert!(
            version(rust) >= newest,
            "the image builds with Rust {rust}, but {package} needs {newest:?}"
        );

        let runtime: Vec<&str> = instructions
            .iter()
            .skip_while(|l| !l.starts_with(&format!("FROM {}", froms[1])))
            .copied()
            .collect();
        let runtime = runtime.join("\n");
        // The runtime stage redeclares the build argument, or npm would get an empty version.
        assert!(runtime.contains("\nARG CLAUDE_CODE_VERSION\n"), "{runtime}");
        // Node.js from the runtime's base image, at a major version the CLI's package accepts (`engines`).
        let lock: Value = serde_json::from_str(
            &std::fs::read_to_string(repo().join("testkit/claude/package-lock.json")).unwrap(),
        )
        .unwrap();
        let engines = lock["packages"]["node_modules/@anthropic-ai/claude-code"]["engines"]["node"]
            .as_str()
            .expect("the lock file names the CLI's Node.js requirement");
        let needed: u64 = engines
            .trim_start_matches(">=")
            .split('.')
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("a Node.js requirement this test does not read: {engines}"));
        let node = froms[1]
            .strip_prefix("node:")
            .expect("the runtime stage is a Node.js image");
        let major: u64 = node.split(['-', '.']).next().unwrap().parse().unwrap();
        assert!(
            major >= needed && node.contains("-slim"),
            "runtime {node}: Claude Code needs Node.js {engines}, on a slim Debian"
        );
        for package in ["bubblewrap", "git", "util-linux", "ca-certificates"] {
            assert!(
                runtime.split_whitespace().any(|w| w == package),
                "the runtime stage does not install {package}"
            );
        }
        assert!(
            !runtime.contains("cargo"),
            "no toolchain in the runtime image"
        );
        let user = runtime
            .lines()
            .filter_map(|l| l.strip_prefix("USER "))
            .next_back()
            .expect("a USER in the runtime stage");
        let uid = user.split(':').next().unwrap();
        assert!(uid != "0" && uid != "root", "runs as {user}");
        assert!(runtime.contains("--from=build /ct-agent /usr/local/bin/ct-agent"));
        assert!(
            runtime.contains("installers/worker/entrypoint.sh /usr/local/bin/ct-worker-entrypoint")
        );
        assert!(runtime.contains("ENTRYPOINT [\"/usr/local/bin/ct-worker-entrypoint\"]"));
        assert!(runtime.contains("CT_AGENT_CONFIG_DIR=/config"));
        assert!(runtime.contains("VOLUME [\"/data\", \"/config\"]"));
        assert!(!instructions.join("\n").contains("--privileged"));
    }

    /// One run of the entrypoint with a fake `ct-agent` and `bwrap` on PATH that record how they were called.
    struct Run {
        status: std::process::ExitStatus,
        stderr: String,
        /// Per call of `ct-agent`: its arguments, its environment, and what it read on standard input.
        calls: Vec<Call>,
    }

    #[derive(Debug)]
    struct Call {
        args: Vec<String>,
        env: BTreeMap<String, String>,
        stdin: String,
    }

    fn entrypoint(config: &Path, env: &[(&str, &str)], args: &[&str], bwrap_works: bool) -> Run {
        let scratch = tempfile::tempdir().unwrap();
        let bin = scratch.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let log = scratch.path().join("calls");
        std::fs::create_dir(&log).unwrap();
        // Each call writes a directory: args (NUL-separated), env (`env -0`), stdin for `pair`.
        let agent = format!(
            "#!/bin/sh\nn=$(ls {log} | wc -l); d={log}/$n; mkdir $d\n\
             for a in \"$@\"; do printf '%s\\0' \"$a\"; done > $d/args\n\
             env -0 > $d/env\n\
             if [ \"$1\" = pair ]; then cat > $d/stdin; fi\n",
            log = log.display()
        );
        let bwrap = if bwrap_works {
            "#!/bin/sh\nexit 0\n"
        } else {
            "#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n"
        };
        for (name, script) in [("ct-agent", agent.as_str()), ("bwrap", bwrap)] {
            let path = bin.join(name);
            std::fs::write(&path, script).unwrap();
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let out = Command::new("/bin/sh")
            .arg(dir().join("entrypoint.sh"))
            .args(args)
            .env_clear()
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .env("CT_AGENT_CONFIG_DIR", config)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let mut calls = Vec::new();
        for n in 0.. {
            let d = log.join(n.to_string());
            if !d.exists() {
                break;
            }
            let split = |bytes: Vec<u8>| -> Vec<String> {
                bytes
                    .split(|b| *b == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect()
            };
            calls.push(Call {
                args: split(std::fs::read(d.join("args")).unwrap()),
                env: split(std::fs::read(d.join("env")).unwrap())
                    .into_iter()
                    .filter_map(|kv| {
                        kv.split_once('=')
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    })
                    .collect(),
                stdin: std::fs::read_to_string(d.join("stdin")).unwrap_or_default(),
            });
        }
        Run {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            calls,
        }
    }

    const KEY: &str = "sk-ant-operator-key-0123456789";
    const TOKEN: &str = "ctpair1_pooltokenpooltoken";

    /// Where the key and the token may appear in a call: the key only as the agent's shared key setting, the
    /// token only on `pair`'s standard input; never in arguments.
    fn assert_no_leak(call: &Call) {
        for arg in &call.args {
            assert!(
                !arg.contains(KEY) && !arg.contains(TOKEN),
                "{:?}",
                call.args
            );
        }
        for (name, value) in &call.env {
            if value.contains(KEY) {
                assert_eq!(name, "CT_AGENT_SHARED_API_KEY", "the key is in {name}");
            }
            assert!(!value.contains(TOKEN), "the token is in {name}");
        }
        assert!(!call.env.contains_key("ANTHROPIC_API_KEY"));
    }

    #[test]
    fn the_entrypoint_pairs_once_and_gives_the_key_only_to_the_agents_key_setting() {
        let config = tempfile::tempdir().unwrap();
        let env = [
            ("ANTHROPIC_API_KEY", KEY),
            ("CT_PAIR_TOKEN", TOKEN),
            ("CT_WORKER_NAME", "worker-7"),
        ];
        let run = entrypoint(
            config.path(),
            &env,
            &["--budget-per-user", "1usd/day"],
            true,
        );
        assert!(run.status.success(), "{}", run.stderr);
        assert_eq!(run.calls.len(), 2, "{:?}", run.calls);
        let (pair, serve) = (&run.calls[0], &run.calls[1]);
        assert_eq!(pair.args, ["pair", "--name", "worker-7", "-"]);
        assert_eq!(
            pair.stdin.trim(),
            TOKEN,
            "the token goes in on standard input"
        );
        assert_eq!(
            serve.args,
            [
                "run",
                "--pool",
                "--workspaces",
                "/data",
                "--budget-per-user",
                "1usd/day"
            ]
        );
        assert_eq!(serve.env["CT_AGENT_SHARED_API_KEY"], KEY);
        assert_eq!(
            serve.env["CT_AGENT_CONFIG_DIR"],
            config.path().to_str().unwrap()
        );
        for call in &run.calls {
            assert_no_leak(call);
        }

        // Paired (the agent wrote its pairing): a restart never pairs again and needs no token.
        std::fs::write(config.path().join("pairing.json"), "{}").unwrap();
        let run = entrypoint(config.path(), &[("ANTHROPIC_API_KEY", KEY)], &[], true);
        assert!(run.status.success(), "{}", run.stderr);
        assert_eq!(run.calls.len(), 1, "{:?}", run.calls);
        assert_eq!(
            run.calls[0].args,
            ["run", "--pool", "--workspaces", "/data"]
        );
        assert_no_leak(&run.calls[0]);
    }

    #[test]
    fn the_entrypoint_reads_the_token_from_a_file() {
        let config = tempfile::tempdir().unwrap();
        let secret = tempfile::tempdir().unwrap();
        let file = secret.path().join("pair-ct-worker-0");
        std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
        let env = [
            ("ANTHROPIC_API_KEY", KEY),
            ("CT_PAIR_TOKEN_FILE", file.to_str().unwrap()),
        ];
        let run = entrypoint(config.path(), &env, &[], true);
        assert!(run.status.success(), "{}", run.stderr);
        assert_eq!(run.calls[0].args[0], "pair");
        assert_eq!(run.calls[0].stdin.trim(), TOKEN);
        assert!(!run.calls[1].env.contains_key("CT_PAIR_TOKEN_FILE"));
        for call in &run.calls {
            assert_no_leak(call);
        }
    }

    #[test]
    fn the_entrypoint_stops_with_what_to_do_when_it_cannot_serve() {
        let config = tempfile::tempdir().unwrap();
        // Unpaired and no token: nothing runs, the operator is told where tokens come from.
        let run = entrypoint(config.path(), &[("ANTHROPIC_API_KEY", KEY)], &[], true);
        assert!(!run.status.success());
        assert!(run.calls.is_empty(), "{:?}", run.calls);
        assert!(
            run.stderr.contains("ct-relay admin pool-code --pool"),
            "{}",
            run.stderr
        );

        // No key: nothing runs.
        let run = entrypoint(config.path(), &[("CT_PAIR_TOKEN", TOKEN)], &[], true);
        assert!(!run.status.success());
        assert!(run.calls.is_empty(), "{:?}", run.calls);
        assert!(
            run.stderr.contains("ANTHROPIC_API_KEY is not set"),
            "{}",
            run.stderr
        );

        // Bubblewrap cannot sandbox here: nothing runs, and the message says what the container needs.
        let env = [("ANTHROPIC_API_KEY", KEY), ("CT_PAIR_TOKEN", TOKEN)];
        let run = entrypoint(config.path(), &env, &[], false);
        assert!(!run.status.success());
        assert!(run.calls.is_empty(), "{:?}", run.calls);
        for needed in ["seccomp", "apparmor", "systempaths", "procMount"] {
            assert!(run.stderr.contains(needed), "{needed}: {}", run.stderr);
        }
    }

    #[test]
    fn the_entrypoint_passes_shellcheck() {
        let out = Command::new("shellcheck")
            .args(["--shell=sh", "--severity=style"])
            .arg(dir().join("entrypoint.sh"))
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "shellcheck could not run ({e}): scripts/test installs it (package shellcheck)"
                )
            });
        succeeded(&out, "shellcheck installers/worker/entrypoint.sh");
    }

    /// Every `CT_*` word in installers/worker names a variable someone reads: `ct-relay` (documented in its
    /// --help), `ct-agent` (named in its source), or the entrypoint itself.
    #[test]
    fn every_ct_variable_is_one_the_relay_the_agent_or_the_entrypoint_reads() {
        let relay = documented_variables();
        let mut agent_source = String::new();
        let mut stack = vec![repo().join("agent/src")];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    agent_source.push_str(&std::fs::read_to_string(&path).unwrap());
                }
            }
        }
        let entrypoint = read("entrypoint.sh");
        let mut unknown = BTreeMap::new();
        let mut stack = vec![dir()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    let known = relay.contains(word)
                        || agent_source.contains(&format!("\"{word}\""))
                        || entrypoint.contains(&format!("${{{word}"));
                    if word.starts_with("CT_") && !known {
                        unknown
                            .entry(word.to_owned())
                            .or_insert_with(BTreeSet::new)
                            .insert(name_of(&path));
                    }
                }
            }
        }
        assert!(
            unknown.is_empty(),
            "variables nobody reads (name: files): {unknown:?}"
        );
    }
}
