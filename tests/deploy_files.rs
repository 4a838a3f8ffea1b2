//! deploy/ cannot run here (no Docker engine, no Kubernetes): every file is
//! parsed, what ties the files together is checked (paths, ports, mounts,
//! health checks, CDC settings), and every fabric config they carry passes
//! the real `fabric check`.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
}

/// The real `fabric` binary run with `args` and `env`.
fn fabric(args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// `fabric check` on `config`, as run by [`fabric`].
fn check(config: &Path, env: &[(&str, &str)]) -> std::process::Output {
    fabric(
        &["check".as_ref(), "--config".as_ref(), config.as_ref()],
        env,
    )
}

/// `fabric check` on `config`, with `env`; returns stdout, panics on failure.
fn fabric_check(config: &Path, env: &[(&str, &str)]) -> String {
    let out = check(config, env);
    assert!(
        out.status.success(),
        "fabric check {} failed:\n{}",
        config.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Secrets as `fabric init-secrets` makes them, in a new directory.
fn made_secrets() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = fabric(&["init-secrets".as_ref(), dir.path().as_ref()], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// `config` with `[server.tls]` and `[access]` (TLS and tokens), whose
/// files are at `prefix`; written to a new file with `prefix` replaced by
/// the directory `files`, so that `fabric check` can read them.
fn secure_config_here(config: &str, prefix: &str, files: &Path, dir: &Path) -> PathBuf {
    assert!(config.contains("[server.tls]"), "no TLS:\n{config}");
    assert!(config.contains("[access]"), "no access control:\n{config}");
    assert!(
        config.contains(&format!("${{file:{prefix}")),
        "token hashes come from files under {prefix}"
    );
    let path = dir.join("fabric.toml");
    std::fs::write(&path, config.replace(prefix, &files.display().to_string())).unwrap();
    path
}

/// `fabric check` fails on `config` without its `[access]` section: the
/// fabric refuses to listen beyond loopback open.
fn refused_without_access(config: &str, env: &[(&str, &str)]) {
    let open = match config.find("[access]") {
        // Everything from [access] to the next non-access table goes.
        Some(i) => {
            let rest = &config[i..];
            let end = rest
                .match_indices("\n[")
                .map(|(j, _)| j)
                .find(|&j| {
                    !rest[j + 1..].starts_with("[[access") && !rest[j + 1..].starts_with("[access")
                })
                .map_or(config.len(), |j| i + j);
            format!("{}{}", &config[..i], &config[end..])
        }
        None => panic!("no [access] section"),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("open.toml");
    std::fs::write(&path, open).unwrap();
    let out = check(&path, env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an open config beyond loopback passed"
    );
    assert!(stderr.contains("no [access] section"), "{stderr}");
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| match x {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn compose_file_wires_kafka_databases_and_the_fabric() {
    let path = deploy().join("compose.yaml");
    let docs = yaml_docs(&path);
    assert_eq!(docs.len(), 1);
    let services = &docs[0]["services"];
    for s in ["kafka", "postgres", "mariadb", "fabric"] {
        assert!(services[s].is_object(), "service {s} missing");
    }
    // KRaft, no ZooKeeper.
    let kafka = &services["kafka"]["environment"];
    assert!(
        kafka["KAFKA_PROCESS_ROLES"]
            .as_str()
            .unwrap()
            .contains("controller")
    );
    assert!(services["zookeeper"].is_null());
    // CDC settings the sources need.
    let pg = strings(&services["postgres"]["command"]).join(" ");
    assert!(pg.contains("wal_level=logical"), "{pg}");
    let my = strings(&services["mariadb"]["command"]).join(" ");
    assert!(
        my.contains("--binlog-format=ROW") && my.contains("--binlog-row-image=FULL"),
        "{my}"
    );
    // The fabric waits for healthy dependencies, each of which has a health check.
    let fabric = &services["fabric"];
    for dep in ["kafka", "postgres", "mariadb"] {
        assert_eq!(
            fabric["depends_on"][dep]["condition"], "service_healthy",
            "fabric must wait for {dep}"
        );
        assert!(services[dep]["healthcheck"]["test"].is_array());
    }
    // Every file mounted from the repository exists.
    let mut config_mount = None;
    for (name, svc) in services.as_object().unwrap() {
        for v in strings(&svc["volumes"]) {
            let src = v.split(':').next().unwrap();
            if src.starts_with('.') {
                let local = deploy().join(src);
                assert!(local.exists(), "{name} mounts {src}, which is missing");
                if v.contains("/etc/fabric/fabric.toml") {
                    config_mount = Some(local);
                }
            }
        }
    }
    let command = strings(&fabric["command"]);
    assert!(
        command
            .windows(2)
            .any(|w| w == ["--config", "/etc/fabric/fabric.toml"]),
        "{command:?}"
    );
    // Secrets are made at the first start, on the fabric's volume.
    assert!(
        command
            .windows(2)
            .any(|w| w == ["--init-secrets", "/var/lib/fabric/secrets"]),
        "{command:?}"
    );
    assert!(
        strings(&fabric["volumes"])
            .iter()
            .any(|v| v.ends_with(":/var/lib/fabric")),
        "the secrets' directory is on a volume"
    );
    let build = &fabric["build"];
    assert!(
        deploy()
            .join(build["context"].as_str().unwrap())
            .join(build["dockerfile"].as_str().unwrap())
            .exists()
    );
    let ports = strings(&fabric["ports"]).join(" ");
    assert!(ports.contains("50051") && ports.contains("9464"), "{ports}");

    // The config it mounts serves TLS with tokens, and passes `fabric
    // check` with the compose defaults and the secrets a first start makes.
    let config = config_mount.expect("the fabric mounts its config");
    let text = std::fs::read_to_string(&config).unwrap();
    let secrets = made_secrets();
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("POSTGRES_PASSWORD", "fabric"),
        ("MARIADB_ROOT_PASSWORD", "fabric"),
    ];
    let here = secure_config_here(&text, "/var/lib/fabric/secrets", secrets.path(), dir.path());
    let out = fabric_check(&here, &env);
    assert!(out.contains("bus: kafka at kafka:9092"), "{out}");
    refused_without_access(&text, &env);
}

#[test]
fn kubernetes_manifests_carry_a_valid_config_and_a_volume_for_snapshots() {
    let docs = yaml_docs(&deploy().join("k8s/fabric.yaml"));
    let find = |kind: &str, name: &str| -> &Value {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    let cm = find("ConfigMap", "fabric-config");
    let toml = cm["data"]["fabric.toml"].as_str().unwrap();
    // TLS from the Secret fabric-tls, token hashes from fabric-tokens,
    // made here as deploy/README.md says.
    let secrets = made_secrets();
    let tls = tempfile::tempdir().unwrap();
    let tokens = tempfile::tempdir().unwrap();
    for (from, to) in [
        ("server.pem", tls.path().join("tls.crt")),
        ("server.key", tls.path().join("tls.key")),
        ("ca.pem", tls.path().join("ca.crt")),
        ("admin.token.sha256", tokens.path().join("admin.sha256")),
        ("reader.token.sha256", tokens.path().join("reader.sha256")),
    ] {
        std::fs::copy(secrets.path().join(from), to).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let with_tls = toml.replace("/etc/fabric-tls", &tls.path().display().to_string());
    let path = secure_config_here(&with_tls, "/etc/fabric-tokens", tokens.path(), dir.path());
    let env = [
        (
            "FABRIC_PG_URL",
            "postgres://fabric:secret@postgres:5432/crm",
        ),
        (
            "FABRIC_BILLING_URL",
            "mysql://fabric:secret@mariadb:3306/billing",
        ),
        ("POD_NAME", "fabric-1"),
        ("POD_NAMESPACE", "fabric"),
    ];
    let out = fabric_check(&path, &env);
    assert!(out.contains("bus: kafka"), "{out}");
    assert!(toml.contains("peer_ca_file = \"/etc/fabric-tls/ca.crt\""));
    refused_without_access(toml, &env);
    assert!(
        !toml.contains("secret"),
        "credentials belong in the Secret, not the ConfigMap"
    );

    let sts = find("StatefulSet", "fabric");
    let spec = &sts["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    // Several replicas, each reachable by the others at a stable name (reads
    // are forwarded there), also before it is ready.
    assert_eq!(sts["spec"]["replicas"], 3);
    assert_eq!(sts["spec"]["serviceName"], "fabric-headless");
    assert_eq!(
        find("Service", "fabric-headless")["spec"]["publishNotReadyAddresses"],
        true
    );
    assert!(
        toml.contains(
            "advertise_addr = \"${POD_NAME}.fabric-headless.${POD_NAMESPACE}.svc:50051\""
        ),
        "each replica advertises its pod's stable name, one a wildcard certificate covers"
    );
    // Pod name and namespace from the downward API.
    for (var, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let env = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == var)
            .unwrap_or_else(|| panic!("{var} in the environment"));
        assert_eq!(env["valueFrom"]["fieldRef"]["fieldPath"], field);
    }
    // The certificate names deploy/README.md makes cover the advertised
    // names (checked by a TLS handshake in src/secrets.rs's tests).
    let readme = std::fs::read_to_string(deploy().join("README.md")).unwrap();
    assert!(
        readme.contains("--name '*.fabric-headless.fabric.svc'"),
        "{readme}"
    );
    let args = strings(&container["args"]);
    assert!(
        args.windows(2)
            .any(|w| w == ["--config", "/etc/fabric/fabric.toml"]),
        "{args:?}"
    );
    let mounts = container["volumeMounts"].as_array().unwrap();
    let mount_of = |name: &str| {
        mounts
            .iter()
            .find(|m| m["name"] == name)
            .and_then(|m| m["mountPath"].as_str())
            .unwrap_or_else(|| panic!("no volume mount {name}"))
            .to_string()
    };
    assert_eq!(mount_of("config"), "/etc/fabric");
    // The Secrets are mounted where the config reads them.
    assert_eq!(mount_of("tls"), "/etc/fabric-tls");
    assert_eq!(mount_of("tokens"), "/etc/fabric-tokens");
    let secret_of = |volume: &str| {
        spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == volume)
            .and_then(|v| v["secret"]["secretName"].as_str())
            .unwrap_or_else(|| panic!("volume {volume} is no Secret"))
            .to_string()
    };
    assert_eq!(secret_of("tls"), "fabric-tls");
    assert_eq!(secret_of("tokens"), "fabric-tokens");
    let config_volume = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "config")
        .unwrap();
    assert_eq!(config_volume["configMap"]["name"], "fabric-config");
    // Snapshots live on a persistent volume claimed per replica.
    let claim = &sts["spec"]["volumeClaimTemplates"][0];
    let data_mount = mount_of(claim["metadata"]["name"].as_str().unwrap());
    assert!(
        toml.contains(&format!("\"{data_mount}/snapshots\"")),
        "the snapshot dir must be on the claimed volume {data_mount}"
    );
    // Probes on the admin endpoint, over TLS (it serves the certificate).
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(container[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(container[probe]["httpGet"]["scheme"], "HTTPS", "{probe}");
    }
    assert!(toml.contains("0.0.0.0:50051") && toml.contains("0.0.0.0:9464"));
    for svc in ["fabric", "fabric-headless"] {
        let ports: Vec<i64> = find("Service", svc)["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["port"].as_i64().unwrap())
            .collect();
        assert!(
            ports.contains(&50051) && ports.contains(&9464),
            "{svc}: {ports:?}"
        );
    }
    assert_eq!(sts["spec"]["serviceName"], "fabric-headless");
}

#[test]
fn dockerfile_is_multi_stage_with_a_slim_runtime() {
    let text = std::fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    let froms: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("FROM "))
        .collect();
    assert!(froms.len() >= 2, "{froms:?}");
    assert!(froms.last().unwrap().contains("slim"), "{froms:?}");
    // Every COPY from the build context names something that exists.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for l in text.lines().map(str::trim) {
        if let Some(rest) = l.strip_prefix("COPY ")
            && !rest.starts_with("--from")
        {
            let parts: Vec<&str> = rest.split_whitespace().collect();
            for src in &parts[..parts.len() - 1] {
                assert!(root.join(src).exists(), "COPY {src}: missing");
            }
        }
    }
    assert!(text.contains("HEALTHCHECK"));
    assert!(text.contains("USER "));

    // The image's config is the demo's, listening on every interface, with
    // TLS and tokens appended; its first start makes the secrets, and the
    // CLI inside (the health check) talks TLS.
    assert!(text.contains(r#"CMD ["run", "--init-secrets", "/var/lib/fabric/secrets"]"#));
    assert!(text.contains("FABRIC_ADDR=https://127.0.0.1:50051"));
    assert!(text.contains("FABRIC_CA=/var/lib/fabric/secrets/ca.pem"));
    assert!(text.contains("cat /etc/fabric/image-security.toml >> /etc/fabric/fabric.toml"));
    let demo = std::fs::read_to_string(root.join("config/demo.toml"))
        .unwrap()
        .replace("\"../data", "\"/var/lib/fabric")
        .replace("127.0.0.1:", "0.0.0.0:");
    let image = format!(
        "{demo}\n{}",
        std::fs::read_to_string(deploy().join("image-security.toml")).unwrap()
    );
    let secrets = made_secrets();
    let dir = tempfile::tempdir().unwrap();
    let path = secure_config_here(
        &image,
        "/var/lib/fabric/secrets",
        secrets.path(),
        dir.path(),
    );
    fabric_check(&path, &[]);
    refused_without_access(&image, &[]);
}
