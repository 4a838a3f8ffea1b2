//! TLS, mutual TLS, bearer tokens and per-type, per-view permissions,
//! against the real binary over loopback with real certificates (made for
//! the test by rcgen): who may read what, what everyone else gets
//! (UNAUTHENTICATED or PERMISSION_DENIED), the audit line of every refusal,
//! and no secret in the log or in `fabric check`.

mod common;

use common::*;
use entity_fabric::proto::catalog_service_client::CatalogServiceClient;
use entity_fabric::proto::entity_service_client::EntityServiceClient;
use entity_fabric::proto::{
    BatchGetEntitiesRequest, GetEntityRequest, ListEntitiesRequest, ListEntityTypesRequest,
    WatchEntitiesRequest,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const BILLING_TOKEN: &str = "billing-token-7f3a9c2e51d84b06";
const OPS_TOKEN: &str = "ops-token-c0ffee11deadbeef2222";

struct Pki {
    ca: String,
    server: (String, String),
    support: (String, String),
    stranger: (String, String),
    /// Signed by another CA: not trusted.
    forged: (String, String),
}

fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    (p.self_signed(&key).unwrap(), key)
}

fn leaf(cn: &str, sans: &[&str], issuer: &(rcgen::Certificate, KeyPair)) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    let cert = p.signed_by(&key, &issuer.0, &issuer.1).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn pki() -> Pki {
    let root = ca("fabric test CA");
    let other = ca("someone else's CA");
    Pki {
        ca: root.0.pem(),
        server: leaf("fabric", &["localhost", "127.0.0.1"], &root),
        support: leaf("support-app", &[], &root),
        stranger: leaf("stranger", &[], &root),
        forged: leaf("support-app", &[], &other),
    }
}

fn sha(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn config(dir: &Path, pki: &Pki) -> std::path::PathBuf {
    let path = demo_config(dir, &DemoSettings::default());
    for (name, text) in [
        ("ca.pem", &pki.ca),
        ("server.pem", &pki.server.0),
        ("server.key", &pki.server.1),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let text = std::fs::read_to_string(&path).unwrap()
        + &format!(
            r#"
[server.tls]
cert_file = "{d}/server.pem"
key_file = "{d}/server.key"
client_ca_file = "{d}/ca.pem"
client_cert = "optional"

[access]
anonymous = []

[[access.principals]]
name = "support-app"
cert_names = ["support-app"]
allow = ["read:customer.support"]

[[access.principals]]
name = "billing"
token_sha256 = ["{billing}"]
allow = ["read:customer.billing", "catalog"]

[[access.principals]]
name = "ops"
token_sha256 = ["{ops}"]
allow = ["*"]
"#,
            d = dir.display(),
            billing = sha(BILLING_TOKEN),
            ops = sha(OPS_TOKEN),
        );
    std::fs::write(&path, text).unwrap();
    path
}

/// A TLS channel to the fabric, with a client certificate or none.
async fn tls_channel(
    fabric: &FabricProcess,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(fabric.grpc.replace("http://", "https://"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

fn with_token<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn get(view: &str) -> GetEntityRequest {
    GetEntityRequest {
        r#type: "customer".into(),
        id: "1".into(),
        view: view.into(),
        ..Default::default()
    }
}

/// The status of a GetEntity through `view` on `ch` with `token`.
async fn read(ch: &Channel, view: &str, token: Option<&str>) -> Code {
    match EntityServiceClient::new(ch.clone())
        .get_entity(with_token(get(view), token))
        .await
    {
        Ok(_) => Code::Ok,
        Err(e) => e.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_who_may_reads_what_it_may() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let cfg = config(dir.path(), &pki);
    let fabric = FabricProcess::start(&cfg, &dir.path().join("fabric.log"));

    // Serving, as a client with no credentials sees through health checks
    // (open to every client, for probes).
    let anon = {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(ch) = tls_channel(&fabric, &pki.ca, None).await {
                let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
                if let Ok(r) = h
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    && r.into_inner().status == 1
                {
                    break ch;
                }
            }
            assert!(
                Instant::now() < deadline,
                "not serving: {}",
                fabric.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let ops = Some(OPS_TOKEN);
    eventually(Duration::from_secs(60), "customer 1 loaded", || async {
        (read(&anon, "", ops).await == Code::Ok).then_some(())
    })
    .await;
    let mut denials = 0;

    // Plaintext to the TLS port gets nothing.
    let plain = Channel::from_shared(fabric.grpc.clone())
        .unwrap()
        .connect()
        .await;
    if let Ok(plain) = plain {
        assert_ne!(read(&plain, "", ops).await, Code::Ok);
    }

    // No credentials: UNAUTHENTICATED, for entities and the catalog alike.
    assert_eq!(read(&anon, "support", None).await, Code::Unauthenticated);
    let e = CatalogServiceClient::new(anon.clone())
        .list_entity_types(ListEntityTypesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    denials += 2;

    // A token: its views only, and nothing that is not granted.
    let billing = Some(BILLING_TOKEN);
    assert_eq!(read(&anon, "billing", billing).await, Code::Ok);
    assert_eq!(
        read(&anon, "support", billing).await,
        Code::PermissionDenied
    );
    assert_eq!(read(&anon, "", billing).await, Code::PermissionDenied);
    denials += 2;
    let mut client = EntityServiceClient::new(anon.clone());
    let batch = client
        .batch_get_entities(with_token(
            BatchGetEntitiesRequest {
                r#type: "customer".into(),
                ids: vec!["1".into(), "2".into()],
                view: "billing".into(),
                ..Default::default()
            },
            billing,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.entities.len(), 2);
    let listed = client
        .list_entities(with_token(
            ListEntitiesRequest {
                r#type: "customer".into(),
                page_size: 5,
                ..Default::default()
            },
            billing,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.ids.len(), 5);
    client
        .watch_entities(with_token(
            WatchEntitiesRequest {
                r#type: "customer".into(),
                view: "billing".into(),
                ..Default::default()
            },
            billing,
        ))
        .await
        .unwrap();
    let e = client
        .watch_entities(with_token(
            WatchEntitiesRequest {
                r#type: "customer".into(),
                ..Default::default()
            },
            billing,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    denials += 1;
    let types = CatalogServiceClient::new(anon.clone())
        .list_entity_types(with_token(ListEntityTypesRequest::default(), billing))
        .await
        .unwrap()
        .into_inner();
    // The catalog carries the types' metadata from the config.
    assert_eq!(
        types.entity_types[0].owner,
        "customer-data team <customer-data@example.com>"
    );
    assert!(types.entity_types[0].description.starts_with("A customer"));
    // An unknown type is refused, not described: the caller may not learn
    // which types exist.
    let e = client
        .get_entity(with_token(
            GetEntityRequest {
                r#type: "secret_type".into(),
                ..get("billing")
            },
            billing,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(!e.message().contains("known"), "{e:?}");
    denials += 1;

    // Tokens nobody has, or not bearer tokens at all.
    assert_eq!(
        read(&anon, "billing", Some("billing-token-guess")).await,
        Code::Unauthenticated
    );
    let mut basic = tonic::Request::new(get("billing"));
    basic
        .metadata_mut()
        .insert("authorization", "Basic dXNlcjpwYXNz".parse().unwrap());
    let e = client.get_entity(basic).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    denials += 2;

    // Client certificates: the support app's view only.
    let support = tls_channel(&fabric, &pki.ca, Some(&pki.support))
        .await
        .unwrap();
    assert_eq!(read(&support, "support", None).await, Code::Ok);
    assert_eq!(
        read(&support, "billing", None).await,
        Code::PermissionDenied
    );
    assert_eq!(read(&support, "", None).await, Code::PermissionDenied);
    denials += 2;
    let e = CatalogServiceClient::new(support.clone())
        .list_entity_types(ListEntityTypesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    denials += 1;
    // A certificate from the right CA that is nobody's.
    let stranger = tls_channel(&fabric, &pki.ca, Some(&pki.stranger))
        .await
        .unwrap();
    assert_eq!(
        read(&stranger, "support", None).await,
        Code::PermissionDenied
    );
    denials += 1;
    // A certificate with the right name from another CA: no connection.
    if let Ok(forged) = tls_channel(&fabric, &pki.ca, Some(&pki.forged)).await {
        assert_ne!(read(&forged, "support", None).await, Code::Ok);
    }
    // A token wins over a certificate: the support app with ops's token.
    assert_eq!(read(&support, "", ops).await, Code::Ok);
    assert_eq!(read(&anon, "", ops).await, Code::Ok);

    // The CLI: TLS with the CA, the token from the environment.
    let cli = |token: Option<&str>, view: &str| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_fabric"));
        c.args(["get", "customer", "1", "--json", "--view", view])
            .env("FABRIC_ADDR", fabric.grpc.replace("http://", "https://"))
            .env("FABRIC_CA", dir.path().join("ca.pem"))
            .env("FABRIC_TLS_NAME", "localhost")
            .env_remove("FABRIC_TOKEN");
        if let Some(t) = token {
            c.env("FABRIC_TOKEN", t);
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = cli(billing, "billing");
    assert!(ok && out.contains("\"invoices\""), "{out}");
    let (ok, out) = cli(None, "billing");
    assert!(!ok && out.contains("needs credentials"), "{out}");
    let (ok, out) = cli(billing, "support");
    assert!(!ok && out.contains("may not"), "{out}");
    assert!(!out.contains(BILLING_TOKEN), "{out}");
    denials += 2;

    // Every refusal counted and logged as an audit line; no token logged.
    // The admin endpoint serves TLS too, with the same certificate.
    let admin = format!("https://{}", fabric.admin);
    let creds = entity_fabric::admin::client::Credentials {
        ca: Some(dir.path().join("ca.pem")),
        ..Default::default()
    };
    let (code, metrics) = entity_fabric::admin::client::call(
        entity_fabric::admin::client::Call::get(&admin, "/metrics"),
        &creds,
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{metrics}");
    let counted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("fabric_grpc_denied_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(counted, denials as f64, "{metrics}");
    let mut fabric = fabric;
    assert!(fabric.terminate());
    let log = fabric.log_text();
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("fabric::audit") && l.contains("call denied"))
        .collect();
    assert_eq!(audit.len(), denials, "audit lines:\n{}", audit.join("\n"));
    for who in ["anonymous", "billing", "support-app", "cert:stranger"] {
        assert!(
            audit
                .iter()
                .any(|l| l.contains(&format!("principal=\"{who}\""))),
            "no audit line for {who}:\n{}",
            audit.join("\n")
        );
    }
    for secret in [
        BILLING_TOKEN,
        OPS_TOKEN,
        "billing-token-guess",
        &pki.server.1,
    ] {
        assert!(!log.contains(secret), "the log holds a secret");
    }
}

#[test]
fn fabric_check_never_prints_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let cfg = config(dir.path(), &pki);
    let check = |path: &Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fabric"))
            .args(["check", "--config"])
            .arg(path)
            .output()
            .unwrap();
        let mut text = String::from_utf8_lossy(&out.stdout).to_string();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    };
    let (ok, text) = check(&cfg);
    assert!(ok, "{text}");
    // A token pasted where its hash belongs: refused, and not echoed.
    let pasted = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&sha(BILLING_TOKEN), BILLING_TOKEN);
    std::fs::write(&cfg, pasted).unwrap();
    let (ok, text) = check(&cfg);
    assert!(!ok, "a raw token was accepted");
    assert!(
        text.contains("access.principals[1].token_sha256[0]"),
        "{text}"
    );
    assert!(text.contains("never the token"), "{text}");
    assert!(
        !text.contains(BILLING_TOKEN),
        "fabric check printed the token: {text}"
    );
}
