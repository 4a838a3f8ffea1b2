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

/// Clients of the other processes, by address.
#[derive(Default)]
pub struct Peers {
    clients: DashMap<String, EntityServiceClient<Channel>>,
}

impl Peers {
    pub fn client(&self, addr: &str) -> Result<EntityServiceClient<Channel>, Status> {
        if let Some(c) = self.clients.get(addr) {
            return Ok(c.clone());
        }
        let channel = Channel::from_shared(format!("http://{addr}"))
            .map_err(|e| Status::internal(format!("bad peer address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            // Forwarded batch answers run to megabytes: a default 64 KiB
            // window would cost them round trips for window updates.
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .connect_lazy();
        let c = EntityServiceClient::new(channel);
        self.clients.insert(addr.to_string(), c.clone());
        Ok(c)
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

/// A request to forward, marked and bounded by what is left of `until`.
pub fn outgoing<T>(msg: T, until: Option<Instant>) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    if let Some(u) = until {
        r.set_timeout(u.saturating_duration_since(Instant::now()));
    } else {
        r.set_timeout(Duration::from_secs(5));
    }
    r
}

/// A forwarded watch: marked, and without a deadline (it lasts as long as
/// the watcher).
pub fn outgoing_stream<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
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
