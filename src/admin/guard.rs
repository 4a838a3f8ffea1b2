//! What stands in front of the admin endpoint's guarded routes
//! (`/status.json`, `/config/plan`, `/config/reload`, `/sources/resync`),
//! in this order:
//!
//! 1. **Host.** The `Host` header must name an IP address, `localhost` or
//!    one of `server.admin_hosts`: a web page that points a name it
//!    controls at this machine (DNS rebinding) is refused.
//! 2. **Origin.** A request a browser sent from another origin (`Origin`
//!    not this host, or `Sec-Fetch-Site: cross-site`/`same-site`) is
//!    refused.
//! 3. **Content type.** A `POST` must carry a content type a plain HTML
//!    form cannot send (not `text/plain`, `application/x-www-form-urlencoded`
//!    or `multipart/form-data`): a browser asks the server before sending
//!    one cross-origin, and this server never says yes. No CSRF.
//! 4. **Who.** With an `[access]` section, the same principals as gRPC (a
//!    bearer token, or a client certificate verified by TLS): the config
//!    routes need `admin`, `/status.json` needs `catalog` (or `admin`).
//!    Without one (the fabric then listens on loopback only, or says
//!    `server.insecure`), everyone may.
//! 5. **Bounds.** At most two config requests at once (a third is 429),
//!    each answered within `server.admin_request_timeout` (else 503);
//!    bodies over `server.admin_max_body_bytes` are 413 (set on the
//!    router).
//!
//! Every refusal is an audit line (target `fabric::audit`).

use super::{AdminState, Conn};
use crate::access::{Action, Peer, Presented};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Config requests served at once.
pub const CONFIG_REQUESTS_AT_ONCE: usize = 2;

/// A refusal: its status and what it says.
fn refuse(code: StatusCode, why: String) -> Response {
    (code, with_newline(why)).into_response()
}

fn with_newline(mut s: String) -> String {
    if !s.ends_with('\n') {
        s.push('\n');
    }
    s
}

/// The middleware of the guarded routes (see the module docs).
pub async fn guard(State(s): AdminState, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let conn = request
        .extensions()
        .get::<Conn>()
        .cloned()
        .unwrap_or_default();
    let peer = Peer::addr(conn.peer);
    let config = s.fabric.config();
    let audit = |why: &str| {
        tracing::warn!(target: "fabric::audit", method = %request.method(), path, peer = %peer, reason = why, "admin request refused");
    };
    if let Err(why) = check_host(request.headers(), &config.server.admin_hosts) {
        audit(&why);
        return refuse(StatusCode::FORBIDDEN, why);
    }
    if let Err(why) = check_origin(request.headers()) {
        audit(&why);
        return refuse(StatusCode::FORBIDDEN, why);
    }
    if request.method() == Method::POST
        && let Err(why) = check_content_type(request.headers())
    {
        audit(&why);
        return refuse(StatusCode::UNSUPPORTED_MEDIA_TYPE, why);
    }
    let (method, action) = match path.as_str() {
        "/status.json" => ("GET /status.json", Action::Catalog),
        "/config/plan" => ("POST /config/plan", Action::Admin),
        "/sources/resync" => ("POST /sources/resync", Action::Admin),
        _ => ("POST /config/reload", Action::Admin),
    };
    if let Some(access) = &s.fabric.access {
        let presented = Presented {
            authorization: request
                .headers()
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
            certs: conn.certs.as_deref().map(Vec::as_slice),
        };
        if let Err(status) = access.check_presented(presented, peer, method, action) {
            let code = match status.code() {
                tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
                _ => StatusCode::FORBIDDEN,
            };
            let mut r = refuse(code, status.message().to_string());
            if code == StatusCode::UNAUTHORIZED {
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            return r;
        }
    }
    let _permit = if matches!(action, Action::Admin) {
        match s.config_requests.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                return refuse(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "{CONFIG_REQUESTS_AT_ONCE} config requests are being answered; try again when they are"
                    ),
                );
            }
        }
    } else {
        None
    };
    let limit = config.admin_request_timeout();
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(r) => r,
        Err(_) => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no answer within server.admin_request_timeout ({}); a reload under way goes on, \
                 and its outcome is logged",
                humantime::format_duration(limit)
            ),
        ),
    }
}

/// The `Host` header names an IP address, `localhost` or an allowed name.
fn check_host(headers: &HeaderMap, allowed: &[String]) -> Result<(), String> {
    let Some(value) = headers.get(header::HOST) else {
        return Err("a Host header is required".into());
    };
    let host = value
        .to_str()
        .map_err(|_| "the Host header is not text".to_string())?;
    let name = host_name(host);
    let ip = name
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .is_ok();
    if ip
        || name.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
    {
        return Ok(());
    }
    Err(format!(
        "the Host header names {}, which is not this fabric's admin endpoint: list the name \
         in server.admin_hosts if it is",
        crate::grpc::guard::shown(name)
    ))
}

/// `host[:port]` without its port (`[v6]:port` keeps its brackets).
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            // `[v6]` or `[v6]:port`, nothing else.
            Some(end)
                if host[end + 1..].is_empty()
                    || host[end + 1..].strip_prefix(':').is_some_and(|p| {
                        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())
                    }) =>
            {
                &host[..=end]
            }
            _ => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// A request a browser sent from another origin is refused.
fn check_origin(headers: &HeaderMap) -> Result<(), String> {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && matches!(site, "cross-site" | "same-site")
    {
        return Err(format!(
            "a request a browser sent from another site ({site}) is refused"
        ));
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let same = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|o| o.eq_ignore_ascii_case(host));
    if same {
        Ok(())
    } else {
        Err(format!(
            "a request from the origin {} is refused (cross-origin)",
            crate::grpc::guard::shown(origin)
        ))
    }
}

/// A `POST` carries a content type a plain form cannot send.
fn check_content_type(headers: &HeaderMap) -> Result<(), String> {
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    const SIMPLE: [&str; 3] = [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ];
    if media.is_empty() || SIMPLE.contains(&media.as_str()) {
        return Err(format!(
            "send Content-Type: application/toml (a config) or application/json, not {}: \
             content types a web page's form can send are refused",
            if media.is_empty() {
                "none".to_string()
            } else {
                crate::grpc::guard::shown(&media)
            }
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn hosts_are_addresses_localhost_or_listed() {
        let allowed = vec!["fabric.internal".to_string()];
        for ok in [
            "127.0.0.1:9464",
            "127.0.0.1",
            "[::1]:9464",
            "localhost:9464",
            "LOCALHOST",
            "10.1.2.3:9464",
            "Fabric.Internal:9464",
        ] {
            assert!(
                check_host(&headers(&[("host", ok)]), &allowed).is_ok(),
                "{ok}"
            );
        }
        for bad in [
            "evil.example:9464",
            "localhost.evil.example",
            "127.0.0.1.nip.io:9464",
        ] {
            assert!(
                check_host(&headers(&[("host", bad)]), &allowed).is_err(),
                "{bad}"
            );
        }
        assert!(check_host(&HeaderMap::new(), &allowed).is_err());
    }

    #[test]
    fn other_origins_are_refused() {
        let host = ("host", "127.0.0.1:9464");
        assert!(check_origin(&headers(&[host])).is_ok());
        assert!(check_origin(&headers(&[host, ("origin", "http://127.0.0.1:9464")])).is_ok());
        assert!(check_origin(&headers(&[host, ("origin", "https://127.0.0.1:9464")])).is_ok());
        assert!(check_origin(&headers(&[host, ("origin", "http://evil.example")])).is_err());
        assert!(check_origin(&headers(&[host, ("origin", "null")])).is_err());
        assert!(check_origin(&headers(&[host, ("sec-fetch-site", "cross-site")])).is_err());
        assert!(check_origin(&headers(&[host, ("sec-fetch-site", "same-origin")])).is_ok());
    }

    #[test]
    fn posts_need_a_content_type_no_form_can_send() {
        for bad in [
            None,
            Some("text/plain"),
            Some("Text/Plain; charset=utf-8"),
            Some("application/x-www-form-urlencoded"),
            Some("multipart/form-data; boundary=x"),
        ] {
            let h = match bad {
                Some(v) => headers(&[("content-type", v)]),
                None => HeaderMap::new(),
            };
            assert!(check_content_type(&h).is_err(), "{bad:?}");
        }
        for ok in ["application/toml", "application/json; charset=utf-8"] {
            assert!(check_content_type(&headers(&[("content-type", ok)])).is_ok());
        }
    }
}
