//! Access control for the gRPC façade: who a call comes from (a bearer
//! token, a client certificate, or nobody) and whether that principal may
//! do what it asks (`[access]` in the config; see docs/security.md).
//!
//! - A call with `authorization: Bearer <token>` is the principal whose
//!   `token_sha256` holds the token's SHA-256; an unknown token is
//!   UNAUTHENTICATED, whatever else the call carries.
//! - Otherwise a call over mutual TLS is the principal whose `cert_names`
//!   holds the certificate's subject CN or one of its DNS names; a verified
//!   certificate that names no principal is PERMISSION_DENIED.
//! - Otherwise the call is anonymous: allowed what `anonymous` grants,
//!   else UNAUTHENTICATED.
//!
//! Every refusal is an audit log line (target `fabric::audit`: principal,
//! method, what was asked, the peer, why) and `fabric_grpc_denied_total`.
//! Tokens are never logged; the config holds only their hashes.
//! Health checks and server reflection are open to every client (probes
//! and tools need them; they reveal no entity).

use crate::config::AccessConfig;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use tonic::{Request, Status};

/// What a call asks to do.
#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    /// Read entities of a type, through a view (`""`: the whole entity).
    Read { ty: &'a str, view: &'a str },
    /// List the ids of a type (any read permission on the type allows it).
    List { ty: &'a str },
    /// Push transactions to a `grpc_push` source.
    Push { source: &'a str },
    /// Read the catalog (types, sources, partitions).
    Catalog,
    /// Forget (or unblock) entities of a type.
    Forget { ty: &'a str },
    /// Plan or reload the config on the admin endpoint.
    Admin,
}

impl std::fmt::Display for Action<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Read { ty, view: "" } => write!(f, "read:{ty}"),
            Action::Read { ty, view } => write!(f, "read:{ty}.{view}"),
            Action::List { ty } => write!(f, "list ids of {ty}"),
            Action::Push { source } => write!(f, "push:{source}"),
            Action::Catalog => f.write_str("catalog"),
            Action::Forget { ty } => write!(f, "forget:{ty}"),
            Action::Admin => f.write_str("admin"),
        }
    }
}

/// Which views of a type a read grant covers.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Views {
    /// The whole entity and every view.
    All,
    /// Every named view, not the whole entity.
    AnyView,
    /// This view only.
    One(String),
}

/// One permission.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Grant {
    Everything,
    Catalog,
    /// The admin endpoint's config routes, and what `catalog` allows (an
    /// operator reads the status page).
    Admin,
    /// `ty`: None for every type.
    Read {
        ty: Option<String>,
        views: Views,
    },
    /// `source`: None for every source.
    Push {
        source: Option<String>,
    },
    /// `ty`: None for every type.
    Forget {
        ty: Option<String>,
    },
}

impl Grant {
    /// Parses a permission, or says what is wrong with it.
    fn parse(s: &str) -> Result<Grant, String> {
        let any = |x: &str| (x != "*").then(|| x.to_string());
        match s {
            "*" => return Ok(Grant::Everything),
            "catalog" => return Ok(Grant::Catalog),
            "admin" => return Ok(Grant::Admin),
            _ => {}
        }
        if let Some(rest) = s.strip_prefix("read:") {
            let (ty, views) = match rest.split_once('.') {
                None => (rest, Views::All),
                Some((ty, "*")) => (ty, Views::AnyView),
                Some((ty, v)) if !v.is_empty() => (ty, Views::One(v.to_string())),
                Some(_) => return Err(format!("{s:?}: an empty view name")),
            };
            if ty.is_empty() {
                return Err(format!("{s:?}: no entity type"));
            }
            if ty == "*" && views != Views::All {
                return Err(format!("{s:?}: views are per type; use read:* for all"));
            }
            return Ok(Grant::Read { ty: any(ty), views });
        }
        if let Some(source) = s.strip_prefix("push:")
            && !source.is_empty()
        {
            return Ok(Grant::Push {
                source: any(source),
            });
        }
        if let Some(ty) = s.strip_prefix("forget:")
            && !ty.is_empty()
        {
            return Ok(Grant::Forget { ty: any(ty) });
        }
        Err(format!(
            "{s:?} is not a permission: read:TYPE, read:TYPE.VIEW, read:TYPE.*, read:*, \
             push:SOURCE, push:*, forget:TYPE, forget:*, catalog, admin or *"
        ))
    }

    fn allows(&self, a: Action<'_>) -> bool {
        match (self, a) {
            (Grant::Everything, _) => true,
            (Grant::Catalog, Action::Catalog) => true,
            (Grant::Admin, Action::Admin | Action::Catalog) => true,
            (Grant::Read { ty, views }, Action::Read { ty: t, view }) => {
                ty.as_deref().is_none_or(|ty| ty == t)
                    && match views {
                        Views::All => true,
                        Views::AnyView => !view.is_empty(),
                        Views::One(v) => v == view,
                    }
            }
            (Grant::Read { ty, .. }, Action::List { ty: t }) => {
                ty.as_deref().is_none_or(|ty| ty == t)
            }
            (Grant::Push { source }, Action::Push { source: s }) => {
                source.as_deref().is_none_or(|x| x == s)
            }
            (Grant::Forget { ty }, Action::Forget { ty: t }) => {
                ty.as_deref().is_none_or(|x| x == t)
            }
            _ => false,
        }
    }
}

/// The permissions a config string list stands for; the first bad one is
/// an error.
fn grants(list: &[String]) -> Result<Vec<Grant>, (usize, String)> {
    list.iter()
        .enumerate()
        .map(|(i, s)| Grant::parse(s).map_err(|e| (i, e)))
        .collect()
}

/// Says whether an entity type (and a view of it) exists, or why not.
pub type KnownType<'a> = &'a dyn Fn(&str, Option<&str>) -> Result<(), String>;

/// Checks a permission list for the config validator: the type, view or
/// source a permission names must exist.
pub fn check_permission(
    s: &str,
    known: KnownType<'_>,
    sources: &dyn Fn(&str) -> bool,
) -> Result<(), String> {
    match Grant::parse(s)? {
        Grant::Read {
            ty: Some(ty),
            views,
        } => {
            let view = match &views {
                Views::One(v) => Some(v.as_str()),
                _ => None,
            };
            known(&ty, view)
        }
        Grant::Push {
            source: Some(source),
        } if !sources(&source) => Err(format!("{s:?}: no grpc_push source named {source:?}")),
        Grant::Forget { ty: Some(ty) } => known(&ty, None),
        _ => Ok(()),
    }
}

/// Whether `s` looks like a SHA-256 in hex (without saying what it is: a
/// token pasted there by mistake must not end up in an error message).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

struct Principal {
    name: String,
    grants: Vec<Grant>,
}

/// The compiled `[access]` section.
pub struct Access {
    principals: Vec<Principal>,
    by_token: HashMap<[u8; 32], usize>,
    by_cert: HashMap<String, usize>,
    anonymous: Vec<Grant>,
    denied: prometheus_client::metrics::family::Family<
        crate::telemetry::MethodLabel,
        prometheus_client::metrics::counter::Counter,
    >,
}

/// Who a call is from.
#[derive(Debug, Clone, Copy)]
pub enum Who {
    Principal(usize),
    Anonymous,
}

/// The peer address of a call, for audit lines (formatted only when a
/// line is written).
#[derive(Debug, Clone, Copy)]
pub struct Peer(Option<std::net::SocketAddr>);

impl Peer {
    pub fn of<T>(request: &Request<T>) -> Peer {
        Peer(request.remote_addr())
    }

    pub fn addr(addr: Option<std::net::SocketAddr>) -> Peer {
        Peer(addr)
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("unknown"),
        }
    }
}

impl Access {
    /// The access rules of a validated config.
    pub fn new(cfg: &AccessConfig, metrics: &crate::telemetry::Metrics) -> Access {
        let mut by_token = HashMap::new();
        let mut by_cert = HashMap::new();
        let principals = cfg
            .principals
            .iter()
            .enumerate()
            .map(|(i, p)| {
                for t in &p.token_sha256 {
                    let mut h = [0u8; 32];
                    if hex::decode_to_slice(t, &mut h).is_ok() {
                        by_token.insert(h, i);
                    }
                }
                for n in &p.cert_names {
                    by_cert.insert(n.clone(), i);
                }
                Principal {
                    name: p.name.clone(),
                    grants: grants(&p.allow).unwrap_or_default(),
                }
            })
            .collect();
        Access {
            principals,
            by_token,
            by_cert,
            anonymous: grants(&cfg.anonymous).unwrap_or_default(),
            denied: metrics.grpc_denied.clone(),
        }
    }

    /// As [`Access::check`]; returns the principal's name (for the audit
    /// line of a call that must be logged even when allowed).
    pub fn check_named<T>(
        &self,
        request: &Request<T>,
        method: &'static str,
        action: Action<'_>,
    ) -> Result<&str, Status> {
        let who = self.caller(request, method)?;
        self.permit(who, method, action, Peer::of(request))?;
        Ok(self.name(who))
    }

    /// Allows `request` to do `action`, or refuses it with
    /// UNAUTHENTICATED / PERMISSION_DENIED and an audit line.
    pub fn check<T>(
        &self,
        request: &Request<T>,
        method: &'static str,
        action: Action<'_>,
    ) -> Result<(), Status> {
        let who = self.caller(request, method)?;
        self.permit(who, method, action, Peer::of(request))
    }

    /// Who `request` comes from, or a refusal (an unknown token, a
    /// certificate that is nobody's) with its audit line.
    pub fn caller<T>(&self, request: &Request<T>, method: &'static str) -> Result<Who, Status> {
        self.identify(request)
            .map_err(|(who, status)| self.denied(&who, method, None, Peer::of(request), status))
    }

    /// Allows `who` to do `action`, or refuses it with its audit line.
    pub fn permit(
        &self,
        who: Who,
        method: &'static str,
        action: Action<'_>,
        peer: Peer,
    ) -> Result<(), Status> {
        let name = self.name(who);
        let grants = match who {
            Who::Principal(i) => &self.principals[i].grants,
            Who::Anonymous => &self.anonymous,
        };
        if grants.iter().any(|g| g.allows(action)) {
            tracing::debug!(target: "fabric::audit", principal = name, method, action = %action, peer = %peer, "call allowed");
            return Ok(());
        }
        let status = match who {
            Who::Anonymous => Status::unauthenticated(format!(
                "{method} needs credentials: a bearer token or a client certificate"
            )),
            Who::Principal(_) => {
                Status::permission_denied(format!("principal {name:?} may not {action} ({method})"))
            }
        };
        Err(self.denied(name, method, Some(action), peer, status))
    }

    fn name(&self, who: Who) -> &str {
        match who {
            Who::Principal(i) => &self.principals[i].name,
            Who::Anonymous => "anonymous",
        }
    }

    /// Counts and logs a refusal; returns its status.
    fn denied(
        &self,
        who: &str,
        method: &'static str,
        action: Option<Action<'_>>,
        peer: Peer,
        status: Status,
    ) -> Status {
        self.denied
            .get_or_create(&crate::telemetry::MethodLabel { method })
            .inc();
        tracing::warn!(
            target: "fabric::audit",
            principal = who,
            method,
            action = action.map(|a| a.to_string()),
            peer = %peer,
            code = ?status.code(),
            reason = status.message(),
            "call denied"
        );
        status
    }

    fn identify<T>(&self, request: &Request<T>) -> Result<Who, (String, Status)> {
        let certs = request.peer_certs();
        self.identify_presented(Presented {
            authorization: request
                .metadata()
                .get("authorization")
                .map(|v| v.as_bytes()),
            certs: certs.as_deref().map(Vec::as_slice),
        })
    }

    fn identify_presented(&self, p: Presented<'_>) -> Result<Who, (String, Status)> {
        if let Some(v) = p.authorization {
            let unauth = |why: &str| ("unknown".to_string(), Status::unauthenticated(why));
            let text = std::str::from_utf8(v)
                .map_err(|_| unauth("the authorization header is not text"))?;
            let token = text
                .strip_prefix("Bearer ")
                .or_else(|| text.strip_prefix("bearer "))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| unauth("the authorization header is not `Bearer <token>`"))?;
            let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            return self
                .by_token
                .get(&hash)
                .map(|i| Who::Principal(*i))
                .ok_or_else(|| unauth("the bearer token is not known"));
        }
        if let Some(certs) = p.certs
            && let Some(leaf) = certs.first()
        {
            let names = cert_names(leaf.as_ref());
            if let Some(i) = names.iter().find_map(|n| self.by_cert.get(n)) {
                return Ok(Who::Principal(*i));
            }
            let shown = names.first().map_or("(no name)", String::as_str);
            let who = format!("cert:{shown}");
            return Err((
                who,
                Status::permission_denied(format!(
                    "the client certificate {} is no principal's",
                    crate::grpc::guard::shown(shown)
                )),
            ));
        }
        Ok(Who::Anonymous)
    }

    /// Allows a request of another protocol (the admin endpoint's HTTP) to
    /// do `action`, with what it presents: the same principals, the same
    /// refusals and audit lines as a gRPC call. Returns the principal's name.
    pub fn check_presented(
        &self,
        presented: Presented<'_>,
        peer: Peer,
        method: &'static str,
        action: Action<'_>,
    ) -> Result<&str, Status> {
        let who = self
            .identify_presented(presented)
            .map_err(|(who, status)| self.denied(&who, method, Some(action), peer, status))?;
        self.permit(who, method, action, peer)?;
        Ok(self.name(who))
    }
}

/// What a caller presents: its `authorization` header, and the certificate
/// chain TLS verified (leaf first).
#[derive(Debug, Clone, Copy, Default)]
pub struct Presented<'a> {
    pub authorization: Option<&'a [u8]>,
    pub certs: Option<&'a [tonic::transport::CertificateDer<'static>]>,
}

/// A certificate's subject CNs and DNS subject alternative names.
pub fn cert_names(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let mut out: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                out.push(d.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(grant: &str, a: Action<'_>) -> bool {
        Grant::parse(grant).unwrap().allows(a)
    }

    #[test]
    fn permissions_cover_what_they_say() {
        let whole = Action::Read {
            ty: "customer",
            view: "",
        };
        let support = Action::Read {
            ty: "customer",
            view: "support",
        };
        let billing = Action::Read {
            ty: "customer",
            view: "billing",
        };
        let other = Action::Read {
            ty: "order",
            view: "",
        };
        assert!(allows("read:customer", whole) && allows("read:customer", support));
        assert!(!allows("read:customer", other));
        assert!(allows("read:customer.support", support));
        assert!(!allows("read:customer.support", billing));
        assert!(!allows("read:customer.support", whole));
        assert!(allows("read:customer.*", billing) && !allows("read:customer.*", whole));
        assert!(allows("read:*", other) && allows("read:*", whole));
        assert!(!allows("read:*", Action::Catalog));
        let list = Action::List { ty: "customer" };
        assert!(allows("read:customer.support", list) && !allows("read:order", list));
        assert!(allows("push:orders", Action::Push { source: "orders" }));
        assert!(!allows("push:orders", Action::Push { source: "crm" }));
        assert!(allows("push:*", Action::Push { source: "crm" }));
        assert!(!allows("push:*", whole));
        assert!(allows("catalog", Action::Catalog) && !allows("catalog", whole));
        let forget = Action::Forget { ty: "customer" };
        assert!(allows("forget:customer", forget) && allows("forget:*", forget));
        assert!(!allows("forget:order", forget) && !allows("read:*", forget));
        assert!(!allows("forget:customer", whole) && allows("*", forget));
        assert!(allows("*", Action::Catalog) && allows("*", other));
        for bad in [
            "read",
            "read:",
            "read:customer.",
            "read:*.support",
            "write:x",
            "push:",
            "forget:",
        ] {
            assert!(Grant::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn token_hashes_are_recognised_without_echo() {
        assert!(is_sha256_hex(&hex::encode(Sha256::digest(b"t"))));
        assert!(!is_sha256_hex("s3cr3t-token"));
    }
}
