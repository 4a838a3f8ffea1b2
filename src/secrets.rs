//! `fabric init-secrets DIR`: what a deployment needs to start secure on
//! its first run, made once — a private CA, a server certificate for the
//! given names signed by it, and two bearer tokens (`admin`, `reader`)
//! with their SHA-256 beside them, for a config's `token_sha256` to read as
//! `${file:DIR/admin.token.sha256}`.
//!
//! Idempotent: files that exist are kept (a restarted container keeps its
//! certificate and tokens); what is missing is made. Private keys and
//! tokens are written 0600; nothing secret is printed.

use anyhow::Context;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The names a certificate carries by default: this machine's.
pub const LOCAL_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// The tokens made, by principal name.
pub const TOKENS: [&str; 2] = ["admin", "reader"];

/// What [`init`] made and kept.
#[derive(Debug, Default)]
pub struct Made {
    pub created: Vec<PathBuf>,
    pub kept: Vec<PathBuf>,
}

/// Makes what is missing in `dir` (see the module docs); `names` are the
/// DNS names and IP addresses the server certificate carries.
pub fn init(dir: &Path, names: &[String]) -> anyhow::Result<Made> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut made = Made::default();
    let ca_cert = dir.join("ca.pem");
    let ca_key = dir.join("ca.key");
    let cert = dir.join("server.pem");
    let key = dir.join("server.key");
    if [&ca_cert, &ca_key, &cert, &key].iter().all(|p| p.exists()) {
        made.kept.extend([ca_cert, ca_key, cert, key]);
    } else {
        let (ca, ca_pair) = authority()?;
        let (leaf, leaf_key) = server(names, &ca, &ca_pair)?;
        write(&ca_key, ca_pair.serialize_pem().as_bytes(), 0o600)?;
        write(&key, leaf_key.as_bytes(), 0o600)?;
        write(&ca_cert, ca.pem().as_bytes(), 0o644)?;
        write(&cert, leaf.as_bytes(), 0o644)?;
        made.created.extend([ca_cert, ca_key, cert, key]);
    }
    for name in TOKENS {
        let token_file = dir.join(format!("{name}.token"));
        let hash_file = dir.join(format!("{name}.token.sha256"));
        let token = match std::fs::read_to_string(&token_file) {
            Ok(t) if !t.trim().is_empty() => {
                made.kept.push(token_file);
                t.trim().to_string()
            }
            _ => {
                let mut bytes = [0u8; 32];
                getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
                let t = hex::encode(bytes);
                write(&token_file, format!("{t}\n").as_bytes(), 0o600)?;
                made.created.push(token_file);
                t
            }
        };
        // Always written again: it follows the token.
        let hash = hex::encode(Sha256::digest(token.as_bytes()));
        write(&hash_file, format!("{hash}\n").as_bytes(), 0o644)?;
    }
    Ok(made)
}

fn authority() -> anyhow::Result<(rcgen::Certificate, rcgen::KeyPair)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.distinguished_name
        .push(DnType::CommonName, "Entity Fabric deployment CA");
    p.not_after = rcgen::date_time_ymd(2036, 1, 1);
    Ok((p.self_signed(&key)?, key))
}

fn server(
    names: &[String],
    ca: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
) -> anyhow::Result<(String, String)> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(names.to_vec())
        .context("the certificate's names (--name) must be DNS names or IP addresses")?;
    p.distinguished_name.push(
        DnType::CommonName,
        names.first().map_or("fabric", String::as_str),
    );
    // Each process presents it to the others when it forwards a read.
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let cert = p.signed_by(&key, ca, ca_key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes `bytes` to `path` (a temporary file of its own, new, renamed
/// into place), with `mode` from its creation on.
fn write(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    // One a crash left behind may have another mode: never reuse it.
    let _ = std::fs::remove_file(&tmp);
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        open.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = open
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio_rustls::rustls;

    /// Whether a client that trusts `dir/ca.pem` accepts `dir/server.pem`
    /// as `name`, by a TLS handshake in memory.
    async fn accepted_as(dir: &Path, name: &str) -> bool {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(dir.join("server.pem"))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap())
            .unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let server_side = tokio::spawn(async move { acceptor.accept(b).await.is_ok() });
        let name = ServerName::try_from(name.to_string()).unwrap();
        let ok = connector.connect(name, a).await.is_ok();
        server_side.abort();
        ok
    }

    /// The names deploy/README.md gives `fabric init-secrets` for
    /// Kubernetes cover what the replicas dial: `<pod>.fabric-headless.<ns>.svc`
    /// (a wildcard needs two labels after it: `*.fabric-headless` would not).
    #[tokio::test]
    async fn the_kubernetes_names_cover_the_advertised_ones() {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = [
            "fabric",
            "fabric.fabric.svc",
            "*.fabric-headless.fabric.svc",
            "localhost",
            "127.0.0.1",
        ]
        .map(String::from)
        .to_vec();
        init(dir.path(), &names).unwrap();
        for ok in [
            "fabric-0.fabric-headless.fabric.svc",
            "fabric-2.fabric-headless.fabric.svc",
            "fabric.fabric.svc",
            "127.0.0.1",
        ] {
            assert!(accepted_as(dir.path(), ok).await, "{ok}");
        }
        assert!(!accepted_as(dir.path(), "fabric-0.other.fabric.svc").await);
        let short = tempfile::tempdir().unwrap();
        init(short.path(), &["*.fabric-headless".to_string()]).unwrap();
        assert!(!accepted_as(short.path(), "fabric-0.fabric-headless").await);
    }

    #[test]
    fn made_once_then_kept() {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["fabric".to_string(), "127.0.0.1".to_string()];
        let first = init(dir.path(), &names).unwrap();
        assert_eq!(first.created.len(), 6, "{first:?}");
        let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
        let hash = std::fs::read_to_string(dir.path().join("admin.token.sha256")).unwrap();
        assert_eq!(
            hash.trim(),
            hex::encode(Sha256::digest(token.trim().as_bytes()))
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in ["admin.token", "reader.token", "server.key", "ca.key"] {
                let mode = std::fs::metadata(dir.path().join(f))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{f}");
            }
        }
        let again = init(dir.path(), &names).unwrap();
        assert!(again.created.is_empty(), "{again:?}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("admin.token")).unwrap(),
            token
        );
        assert!(
            crate::access::cert_names(
                &tonic::transport::CertificateDer::from_pem_slice(
                    &std::fs::read(dir.path().join("server.pem")).unwrap()
                )
                .unwrap()
            )
            .contains(&"fabric".to_string())
        );
    }
}
