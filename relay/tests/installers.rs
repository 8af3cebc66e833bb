//! The deployment files in installers/relay, checked by the tools operators trust and then for what a schema
//! cannot see: every Compose file against the Compose specification (check-jsonschema), every Kubernetes
//! manifest in strict mode against the API's own schemas (kubernetes-validate); then the cluster's shape (three
//! distinct nodes, 7443 over UDP and TCP, probes) and that every CT_* variable named is one `ct-relay` reads.
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
    let root = installers();
    let mut all = Vec::new();
    walk(&root, &mut all);
    all.sort();
    let mut files = Files {
        compose: Vec::new(),
        kubernetes: Vec::new(),
    };
    for path in all {
        let rel = path.strip_prefix(&root).unwrap();
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
    for path in files().kubernetes.iter().filter(|p| p.starts_with(dir)) {
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
    for secret_var in ["CT_DATABASE_URL", "DISCORD_TOKEN"] {
        let reference = &env[secret_var]["valueFrom"]["secretKeyRef"];
        let secret = get("Secret", reference["name"].as_str().unwrap());
        assert!(
            secret["stringData"][reference["key"].as_str().unwrap()].is_string(),
            "{secret_var}: the Secret template has no such key"
        );
    }
    let nats = env["CT_NATS_URL"]["value"].as_str().unwrap();
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
