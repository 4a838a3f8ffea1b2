//! `grpc_push`: transactions pushed by clients through `IngestService`.
//!
//! The gRPC handler finds the source by name in the [`PushRegistry`] and
//! hands it each transaction with a reply channel; the source task orders
//! them, drops resends at or below the last accepted sequence, and passes
//! them to the router. The reply says the transaction is on the bus;
//! durability (a snapshot holding it) is reported by `durable_sequence`.

use super::{Source, SourceContext, SourceError};
use crate::event::{Position, SourceTxn};
use async_trait::async_trait;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

/// A pushed transaction and where to say what became of it.
pub struct PushedTxn {
    /// The client's sequence, 0 to let the source assign the next one.
    pub sequence: u64,
    pub txn: SourceTxn,
    /// Answered with the accepted sequence once on the bus, or an error.
    pub reply: oneshot::Sender<Result<u64, String>>,
}

/// A handle to one push source, held by the gRPC ingest service.
#[derive(Clone)]
pub struct PushHandle {
    pub tx: mpsc::Sender<PushedTxn>,
    /// Highest durable sequence.
    pub durable: watch::Receiver<u64>,
}

/// What a push source task receives on and reports durability with.
type SourceEnd = (mpsc::Receiver<PushedTxn>, watch::Sender<u64>);

/// Push sources by name.
#[derive(Clone, Default)]
pub struct PushRegistry {
    inner: Arc<Mutex<HashMap<String, PushHandle>>>,
    /// The source-task ends of registered sources, taken when each starts.
    pending: Arc<Mutex<HashMap<String, SourceEnd>>>,
}

impl PushRegistry {
    /// Creates the source `name` and makes it reachable by the gRPC service.
    pub fn register(&self, name: &str) -> GrpcPushSource {
        let (tx, rx) = mpsc::channel(1024);
        let (dtx, drx) = watch::channel(0);
        self.inner
            .lock()
            .insert(name.to_string(), PushHandle { tx, durable: drx });
        self.pending.lock().insert(name.to_string(), (rx, dtx));
        GrpcPushSource {
            name: name.to_string(),
            registry: self.clone(),
        }
    }

    pub fn get(&self, name: &str) -> Option<PushHandle> {
        self.inner.lock().get(name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.inner.lock().keys().cloned().collect()
    }
}

/// The source task's side of a push source.
pub struct GrpcPushSource {
    name: String,
    registry: PushRegistry,
}

#[async_trait]
impl Source for GrpcPushSource {
    async fn run(self: Box<Self>, mut ctx: SourceContext) -> Result<(), SourceError> {
        let Some((mut rx, durable_tx)) = self.registry.pending.lock().remove(&self.name) else {
            return Err(SourceError::Config {
                source_name: self.name.clone(),
                reason: "push source started twice".into(),
            });
        };
        let mut last = match &ctx.resume {
            Some(Position::Seq(s)) => *s,
            _ => 0,
        };
        ctx.status.set_state("streaming");
        ctx.status.set_caught_up(true);
        loop {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return Ok(()),
                changed = ctx.durable.changed() => {
                    if changed.is_err() { return Ok(()); }
                    if let Some(Position::Seq(s)) = ctx.durable.borrow_and_update().clone() {
                        let _ = durable_tx.send(s);
                    }
                }
                msg = rx.recv() => {
                    let Some(PushedTxn { sequence, mut txn, reply }) = msg else { return Ok(()) };
                    if sequence != 0 && sequence <= last {
                        // A resend of something already accepted.
                        let _ = reply.send(Ok(sequence));
                        continue;
                    }
                    let seq = if sequence == 0 { last + 1 } else { sequence };
                    txn.position = Position::Seq(seq);
                    txn.source = ctx.name.clone();
                    let routed = ctx.send_acked(txn).await?;
                    last = seq;
                    // Answer once routed, without holding up the next transaction.
                    tokio::spawn(async move {
                        let r = routed.await.map(|_| seq).map_err(|_| "the fabric is shutting down".to_string());
                        let _ = reply.send(r);
                    });
                }
            }
        }
    }
}
