//! Any process answers any read: a read of an entity whose partition
//! another process holds is forwarded to that process (Kafka mode, several
//! processes; the holders and their addresses come from the members topic,
//! see [`crate::bus::members`]).
//!
//! - One hop at most: a forwarded request carries [`FORWARDED`], and a
//!   process that does not serve the partition answers it `UNAVAILABLE`
//!   instead of forwarding again (views of the members may disagree for a
//!   heartbeat).
//! - While a partition moves (nobody serves it yet: its new holder is
//!   rebuilding it, or the old one's lease has not run out), a request that
//!   carries a deadline waits and retries until shortly before it; one
//!   without a deadline gets `UNAVAILABLE` with a `retry-after-ms` hint at
//!   once. Never an old version presented as current.

use crate::app::Fabric;
use crate::proto::entity_service_client::EntityServiceClient;
use dashmap::DashMap;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Request, Status};

/// Metadata key marking a request forwarded by another process.
pub const FORWARDED: &str = "x-fabric-forwarded";

/// Where a partition's reads go now.
pub enum Route {
    /// Served here.
    Local,
    /// Served by the process at this gRPC address.
    Remote(String),
    /// Served nowhere right now.
    Moving,
}

/// The route of partition `p` as this process sees it.
pub fn route(f: &Fabric, p: u32) -> Route {
    if f.partitions[p as usize].serving() {
        return Route::Local;
    }
    let Some(view) = f.members.get() else {
        return Route::Moving;
    };
    let view = view.borrow();
    match view.owner_of(p) {
        Some(m) if m.member != f.member_id => Route::Remote(m.grpc.clone()),
        _ => Route::Moving,
    }
}

/// Connections to the other processes, by address.
pub struct Peers {
    clients: DashMap<String, Channel>,
    /// With `[server.tls]`: how this process connects to the others (they
    /// serve TLS too), presenting its own certificate.
    tls: Option<tonic::transport::ClientTlsConfig>,
    /// The largest message a peer sends (`server.max_response_bytes`, the
    /// same config on every process): a forwarded answer or watch message
    /// is accepted up to the size a client asking here directly would get,
    /// not tonic's default of 4 MiB.
    max_message: usize,
}

impl Default for Peers {
    fn default() -> Self {
        Peers {
            clients: DashMap::new(),
            tls: None,
            max_message: crate::config::ServerConfig::default().max_response_bytes,
        }
    }
}

impl Peers {
    /// Clients for the fabric of `config`; its TLS files are read now.
    pub fn new(config: &crate::config::Config) -> anyhow::Result<Peers> {
        let max_message = config.server.max_response_bytes;
        let Some(tls) = &config.server.tls else {
            return Ok(Peers {
                max_message,
                ..Peers::default()
            });
        };
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let ca = tls
            .peer_ca_file
            .as_ref()
            .or(tls.client_ca_file.as_ref())
            .unwrap_or(&tls.cert_file);
        let client = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(
                config.read_file("server.tls (the peers' CA)", ca)?,
            ))
            .identity(Identity::from_pem(
                config.read_file("server.tls.cert_file", &tls.cert_file)?,
                config.read_file("server.tls.key_file", &tls.key_file)?,
            ));
        Ok(Peers {
            clients: DashMap::new(),
            tls: Some(client),
            max_message,
        })
    }

    /// An `EntityService` client on connection `c` to a peer.
    pub fn entity_client(&self, c: Channel) -> EntityServiceClient<Channel> {
        EntityServiceClient::new(c).max_decoding_message_size(self.max_message)
    }

    /// A `CatalogService` client on connection `c` to a peer.
    pub fn catalog_client(
        &self,
        c: Channel,
    ) -> crate::proto::catalog_service_client::CatalogServiceClient<Channel> {
        crate::proto::catalog_service_client::CatalogServiceClient::new(c)
            .max_decoding_message_size(self.max_message)
    }

    /// An `EntityService` client of the process at `addr`.
    pub fn client(&self, addr: &str) -> Result<EntityServiceClient<Channel>, Status> {
        self.channel(addr).map(|c| self.entity_client(c))
    }

    /// The connection to the process at `addr` (made on first use).
    pub fn channel(&self, addr: &str) -> Result<Channel, Status> {
        if let Some(c) = self.clients.get(addr) {
            return Ok(c.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Channel::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| Status::internal(format!("bad peer address {addr:?}: {e}")))?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| Status::internal(format!("TLS to peer {addr}: {e}")))?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            // Forwarded batch answers run to megabytes: a default 64 KiB
            // window would cost them round trips for window updates.
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .connect_lazy();
        self.clients.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

/// Runs `local` where `key`'s partition is served: here, or (Kafka, several
/// processes) on its holder through `remote` (given the connection to it
/// and the request to send), waiting while it moves, as reads do.
pub async fn on_holder<M, R, L, LF, F, FF>(
    fabric: &Fabric,
    peers: &Peers,
    request: &Request<M>,
    key: &crate::event::EntityKey,
    local: L,
    remote: F,
) -> Result<R, Status>
where
    M: Clone,
    L: Fn() -> LF,
    LF: std::future::Future<Output = Result<R, Status>>,
    F: Fn(Channel, Request<M>) -> FF,
    FF: std::future::Future<Output = Result<R, Status>>,
{
    let auth = credentials(request);
    let until = deadline(request);
    let hop = forwarded(request);
    let p = key.partition(fabric.bus.partitions());
    loop {
        let refused = match route(fabric, p) {
            Route::Local => return local().await,
            Route::Remote(addr) if !hop => {
                let c = peers.channel(&addr)?;
                let ask = outgoing(request.get_ref().clone(), until, &auth);
                match remote(c, ask).await {
                    Ok(out) => return Ok(out),
                    // Asking again comes to the same: retried.
                    Err(s) if super::entity::retryable(&s) => s,
                    Err(s) => return Err(s),
                }
            }
            Route::Remote(_) | Route::Moving => match super::entity::serving(fabric, key) {
                Ok(()) => continue,
                Err(s) => s,
            },
        };
        if !pause(until).await {
            return Err(refused);
        }
    }
}

/// How long a request may wait for a partition that is moving: until
/// shortly before its deadline (`grpc-timeout`), or not at all.
pub fn deadline<T>(r: &Request<T>) -> Option<Instant> {
    let v = r.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    // Leave time for the answer to travel back.
    Some(Instant::now() + d.mul_f64(0.9))
}

/// Whether `r` was forwarded by another process.
pub fn forwarded<T>(r: &Request<T>) -> bool {
    r.metadata().contains_key(FORWARDED)
}

/// The caller's credentials, passed on with what is forwarded for it: the
/// process that serves the entity checks them again.
pub type Credentials = Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>;

/// The credentials `r` carries.
pub fn credentials<T>(r: &Request<T>) -> Credentials {
    r.metadata().get("authorization").cloned()
}

fn mark<T>(r: &mut Request<T>, auth: &Credentials) {
    r.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    if let Some(a) = auth {
        r.metadata_mut().insert("authorization", a.clone());
    }
    carry_trace(r);
}

/// With span export on (`[log.otlp]`), the call's trace goes with it (W3C
/// `traceparent`), so the holder's span joins the caller's trace; without,
/// there is no span and nothing is added.
fn carry_trace<T>(r: &mut Request<T>) {
    use opentelemetry::propagation::{Injector, TextMapPropagator};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    struct Metadata<'a>(&'a mut tonic::metadata::MetadataMap);
    impl Injector for Metadata<'_> {
        fn set(&mut self, key: &str, value: String) {
            if let (Ok(k), Ok(v)) = (
                tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
                value.parse(),
            ) {
                self.0.insert(k, v);
            }
        }
    }
    let span = tracing::Span::current();
    if span.is_none() {
        return;
    }
    opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .inject_context(&span.context(), &mut Metadata(r.metadata_mut()));
}

/// A request to forward for a caller with `auth`, marked and bounded by
/// what is left of `until`.
pub fn outgoing<T>(msg: T, until: Option<Instant>, auth: &Credentials) -> Request<T> {
    let mut r = Request::new(msg);
    mark(&mut r, auth);
    if let Some(u) = until {
        r.set_timeout(u.saturating_duration_since(Instant::now()));
    } else {
        r.set_timeout(Duration::from_secs(5));
    }
    r
}

/// A forwarded watch: marked, and without a deadline (it lasts as long as
/// the watcher).
pub fn outgoing_stream<T>(msg: T, auth: &Credentials) -> Request<T> {
    let mut r = Request::new(msg);
    mark(&mut r, auth);
    r
}

/// Waits a little before the next try, if `until` leaves time for one.
pub async fn pause(until: Option<Instant>) -> bool {
    const STEP: Duration = Duration::from_millis(50);
    match until {
        Some(u) if Instant::now() + STEP < u => {
            tokio::time::sleep(STEP).await;
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_read() {
        let mut r = Request::new(());
        assert!(deadline(&r).is_none());
        r.metadata_mut()
            .insert("grpc-timeout", "2000m".parse().unwrap());
        let d = deadline(&r).unwrap();
        let left = d.saturating_duration_since(Instant::now());
        assert!(left > Duration::from_millis(1500) && left <= Duration::from_millis(1800));
        r.metadata_mut()
            .insert("grpc-timeout", "x".parse().unwrap());
        assert!(deadline(&r).is_none());
    }
}
