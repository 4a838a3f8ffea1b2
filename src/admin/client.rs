//! The CLI's client of the admin endpoint (`fabric plan`, `fabric reload`):
//! HTTP/1.1 over TCP, or TLS when the endpoint serves it, with the same
//! credentials as the gRPC commands (a bearer token, a client certificate).

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::path::PathBuf;
use std::sync::Arc;
use tokio_rustls::rustls;

/// How the CLI proves who it is and checks whom it talks to.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// A bearer token.
    pub token: Option<String>,
    /// PEM CA the server's certificate is verified against.
    pub ca: Option<PathBuf>,
    /// PEM client certificate and key (mutual TLS).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name the server's certificate must carry (default: the host).
    pub tls_name: Option<String>,
}

/// Where the admin endpoint of the fabric that runs `config` is, and
/// whether it serves TLS: `admin` (from `--admin`) or the file's
/// `server.admin_addr` (an unspecified IP reached on loopback), and TLS
/// as the file says. The file may be invalid (a plan then shows why): its
/// `[server]` table is still read when it parses as TOML.
pub fn target(config: &std::path::Path, admin: Option<&str>) -> (String, bool) {
    let (file_addr, tls) = match crate::config::Config::load(config) {
        Ok(c) => (Some(c.server.admin_addr.clone()), c.admin_tls()),
        Err(_) => {
            let t: Option<toml::Table> = std::fs::read_to_string(config)
                .ok()
                .and_then(|text| toml::from_str(&text).ok());
            let server = t.as_ref().and_then(|t| t.get("server"));
            let addr = server
                .and_then(|s| s.get("admin_addr"))
                .and_then(|a| a.as_str())
                .map(String::from);
            let tls = server.is_some_and(|s| {
                s.get("tls").is_some()
                    && s.get("admin_tls").and_then(|v| v.as_bool()) != Some(false)
            });
            (addr, tls)
        }
    };
    let addr = admin
        .map(String::from)
        .or(file_addr)
        .unwrap_or_else(|| "127.0.0.1:9464".into());
    let addr = match addr.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => {
            let lo: std::net::IpAddr = if a.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            std::net::SocketAddr::new(lo, a.port()).to_string()
        }
        _ => addr,
    };
    (addr, tls)
}

/// One request: what to send where.
pub struct Call<'a> {
    pub method: hyper::Method,
    /// `https://host:port`, `http://host:port`, or `host:port` (then TLS
    /// when `tls`).
    pub addr: &'a str,
    pub tls: bool,
    pub path: &'a str,
    pub content_type: Option<&'static str>,
    pub body: String,
    /// Further headers (they replace those of the same name, `Host`
    /// included).
    pub headers: Vec<(&'static str, String)>,
}

impl<'a> Call<'a> {
    /// A `POST` of `body` as `content_type`.
    pub fn post(addr: &'a str, path: &'a str, content_type: &'static str, body: String) -> Self {
        Call {
            method: hyper::Method::POST,
            addr,
            tls: false,
            path,
            content_type: Some(content_type),
            body,
            headers: Vec::new(),
        }
    }

    /// A `GET`.
    pub fn get(addr: &'a str, path: &'a str) -> Self {
        Call {
            method: hyper::Method::GET,
            content_type: None,
            ..Call::post(addr, path, "", String::new())
        }
    }
}

/// Sends `call`; the answer's status code and body.
pub async fn call(call: Call<'_>, creds: &Credentials) -> anyhow::Result<(u16, String)> {
    let (tls, host_port) = match call.addr {
        a if a.starts_with("https://") => (true, &a["https://".len()..]),
        a if a.starts_with("http://") => (false, &a["http://".len()..]),
        a => (call.tls, a),
    };
    let host_port = host_port.trim_end_matches('/');
    let mut request = hyper::Request::builder()
        .method(call.method)
        .uri(call.path)
        .header(hyper::header::HOST, host_port);
    if let Some(c) = call.content_type {
        request = request.header(hyper::header::CONTENT_TYPE, c);
    }
    if let Some(t) = &creds.token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let mut request = request
        .body(Full::new(Bytes::from(call.body)))
        .context("the token is not a valid header value")?;
    for (name, value) in call.headers {
        request.headers_mut().insert(
            name,
            value
                .parse()
                .with_context(|| format!("{value:?} is not a valid {name} header"))?,
        );
    }
    let tcp = tokio::net::TcpStream::connect(host_port)
        .await
        .with_context(|| {
            format!("cannot reach the admin endpoint at {host_port} (is the fabric running?)")
        })?;
    if !tls {
        if creds.ca.is_some() || creds.cert.is_some() {
            anyhow::bail!("TLS files given for {host_port}: use an https:// address");
        }
        if creds.token.is_some() && !loopback(host_port) {
            anyhow::bail!(
                "a bearer token is not sent in clear to {host_port}: use an https:// address \
                 (or reach the admin endpoint on loopback)"
            );
        }
        return exchange(tcp, request).await;
    }
    let host = match host_port.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => host_port,
    };
    let name = creds.tls_name.as_deref().unwrap_or(host).to_string();
    let server_name = rustls::pki_types::ServerName::try_from(name.clone())
        .with_context(|| format!("{name:?} is not a TLS server name"))?;
    let connector = tokio_rustls::TlsConnector::from(client_tls(creds)?);
    let stream = connector
        .connect(server_name, tcp)
        .await
        .with_context(|| format!("TLS with the admin endpoint at {host_port} failed"))?;
    exchange(stream, request).await
}

/// Whether `host:port` names this machine (a token may cross it in clear).
fn loopback(host_port: &str) -> bool {
    let host = match host_port.rsplit_once(':') {
        Some((h, _)) => h,
        None => host_port,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

async fn exchange<S>(
    stream: S,
    request: hyper::Request<Full<Bytes>>,
) -> anyhow::Result<(u16, String)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .context("the admin endpoint did not answer HTTP")?;
    let driver = tokio::spawn(connection);
    let answer = sender
        .send_request(request)
        .await
        .context("the admin endpoint did not answer")?;
    let status = answer.status().as_u16();
    let body = answer
        .into_body()
        .collect()
        .await
        .context("the admin endpoint's answer was cut")?
        .to_bytes();
    driver.abort();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn client_tls(creds: &Credentials) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let read =
        |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let ca = creds.ca.as_ref().context(
        "--ca (FABRIC_CA) is needed to verify the admin endpoint's certificate over https",
    )?;
    let roots =
        super::pem_roots(&read(ca)?).map_err(|e| anyhow::anyhow!("{}: {e}", ca.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match (&creds.cert, &creds.key) {
        (Some(c), Some(k)) => {
            let chain =
                super::pem_certs(&read(c)?).map_err(|e| anyhow::anyhow!("{}: {e}", c.display()))?;
            let key = PrivateKeyDer::from_pem_slice(&read(k)?)
                .with_context(|| format!("{} holds no PEM private key", k.display()))?;
            builder.with_client_auth_cert(chain, key)?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => anyhow::bail!("--cert and --key (FABRIC_CERT, FABRIC_KEY) go together"),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
