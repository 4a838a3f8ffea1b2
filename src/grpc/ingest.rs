//! `IngestService`: the `grpc_push` source's front door.

use crate::app::Fabric;
use crate::event::{Op, Position, Row, RowChange, SourceTxn};
use crate::proto::ingest_service_server::IngestService;
use crate::proto::row_change::Operation;
use crate::proto::{PushAck, PushRequest};
use crate::sources::grpc_push::PushedTxn;
use crate::view::value_of_proto;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

pub struct IngestApi {
    pub fabric: Arc<Fabric>,
}

fn row(m: HashMap<String, crate::proto::Value>) -> Result<Option<Row>, String> {
    if m.is_empty() {
        return Ok(None);
    }
    let mut r = Row::new();
    for (k, v) in m {
        let v = value_of_proto(v).map_err(|e| format!("column {k:?}: {e}"))?;
        r.insert(k, v);
    }
    Ok(Some(r))
}

fn to_txn(req: PushRequest) -> Result<SourceTxn, String> {
    let mut changes = Vec::with_capacity(req.changes.len());
    for (i, c) in req.changes.into_iter().enumerate() {
        let op = match Operation::try_from(c.operation) {
            Ok(Operation::Insert) => Op::Insert,
            Ok(Operation::Update) => Op::Update,
            Ok(Operation::Delete) => Op::Delete,
            Ok(Operation::Truncate) => Op::Truncate,
            _ => return Err(format!("changes[{i}]: operation is not set")),
        };
        if c.table.is_empty() {
            return Err(format!("changes[{i}]: table is empty"));
        }
        let before = row(c.before).map_err(|e| format!("changes[{i}].before: {e}"))?;
        let after = row(c.after).map_err(|e| format!("changes[{i}].after: {e}"))?;
        match op {
            Op::Insert | Op::Update if after.is_none() => {
                return Err(format!("changes[{i}]: {} needs `after`", op.as_str()));
            }
            Op::Delete if before.is_none() => {
                return Err(format!(
                    "changes[{i}]: delete needs `before` (at least the key)"
                ));
            }
            _ => {}
        }
        changes.push(RowChange {
            table: c.table,
            op,
            before,
            after,
        });
    }
    Ok(SourceTxn {
        source: req.source.as_str().into(),
        position: Position::Seq(req.sequence),
        commit_micros: if req.commit_time_micros > 0 {
            req.commit_time_micros
        } else {
            crate::sources::now_micros()
        },
        changes,
    })
}

type AckStream = Pin<Box<dyn Stream<Item = Result<PushAck, Status>> + Send>>;

#[tonic::async_trait]
impl IngestService for IngestApi {
    type PushStream = AckStream;

    async fn push(
        &self,
        request: Request<Streaming<PushRequest>>,
    ) -> Result<Response<Self::PushStream>, Status> {
        // Who pushes is known from the call; what it may push to, from each
        // transaction's source.
        let who = match &self.fabric.access {
            Some(a) => Some(a.caller(&request, "Push")?),
            None => None,
        };
        let peer = crate::access::Peer::of(&request);
        let mut input = request.into_inner();
        let fabric = self.fabric.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            // Transactions are handed on as they come; their acks follow in
            // the same order, each once its transaction is on the bus, so a
            // client keeps up to `IN_FLIGHT` transactions moving instead of
            // one bus round trip each.
            let (pending_tx, mut pending_rx) = tokio::sync::mpsc::channel::<Pending>(IN_FLIGHT);
            let reader = async move {
                loop {
                    let req = tokio::select! {
                        _ = fabric.streams_stop.cancelled() => return,
                        r = input.next() => match r { Some(r) => r, None => return },
                    };
                    let req = match req {
                        Ok(r) => r,
                        Err(_) => return,
                    };
                    if let (Some(a), Some(who)) = (&fabric.access, who) {
                        let push = crate::access::Action::Push {
                            source: &req.source,
                        };
                        if let Err(denied) = a.permit(who, "Push", push, peer) {
                            let _ = pending_tx.send(Pending::Now(Err(denied))).await;
                            return;
                        }
                    }
                    let pending = submit(&fabric, req).await;
                    if pending_tx.send(pending).await.is_err() {
                        return;
                    }
                }
            };
            let acker = async move {
                while let Some(p) = pending_rx.recv().await {
                    if tx.send(p.answer().await).await.is_err() {
                        return;
                    }
                }
            };
            tokio::join!(reader, acker);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Pushed transactions of one stream handed on whose acks are not sent yet.
const IN_FLIGHT: usize = 1024;

/// A pushed transaction's ack: known at once (refused, or a resend), or
/// once the transaction is on the bus.
enum Pending {
    Now(Result<PushAck, Status>),
    Routed {
        answer: tokio::sync::oneshot::Receiver<Result<u64, String>>,
        durable: tokio::sync::watch::Receiver<u64>,
    },
}

impl Pending {
    async fn answer(self) -> Result<PushAck, Status> {
        let (answer, durable) = match self {
            Pending::Now(r) => return r,
            Pending::Routed { answer, durable } => (answer, durable),
        };
        match answer.await {
            Ok(Ok(seq)) => Ok(PushAck {
                sequence: seq,
                durable_sequence: *durable.borrow(),
                error: String::new(),
            }),
            Ok(Err(e)) => Err(Status::unavailable(e)),
            Err(_) => Err(Status::unavailable("the fabric is shutting down")),
        }
    }
}

async fn submit(fabric: &Fabric, req: PushRequest) -> Pending {
    match hand_on(fabric, req).await {
        Ok(p) => p,
        Err(s) => Pending::Now(Err(s)),
    }
}

async fn hand_on(fabric: &Fabric, req: PushRequest) -> Result<Pending, Status> {
    if let Some(s) = fabric.sources().iter().find(|s| *s.name == *req.source)
        && *s.status.state.lock() == "elsewhere"
    {
        // Kafka mode: another process of the fabric runs it.
        return Err(Status::unavailable(format!(
            "grpc_push source {:?} runs on another process of this fabric \
             (CatalogService.ListSources says which); push to that one",
            req.source
        )));
    }
    let Some(handle) = fabric.push.get(&req.source) else {
        if let Some(s) = fabric.sources().iter().find(|s| *s.name == *req.source)
            && s.kind == crate::config::SourceKind::GrpcPush
        {
            return Err(Status::unavailable(format!(
                "grpc_push source {:?} is not running here yet (state {:?}); retry",
                req.source,
                s.status.state.lock().as_str()
            )));
        }
        let mut known = fabric.push.names();
        known.sort();
        return Err(Status::not_found(format!(
            "no grpc_push source named {} (known: {})",
            super::guard::shown(&req.source),
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        )));
    };
    let durable = *handle.durable.borrow();
    let sequence = req.sequence;
    let txn = match to_txn(req) {
        Ok(t) => t,
        Err(e) => {
            return Ok(Pending::Now(Ok(PushAck {
                sequence,
                durable_sequence: durable,
                error: e,
            })));
        }
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    handle
        .tx
        .send(PushedTxn {
            sequence,
            txn,
            reply,
        })
        .await
        .map_err(|_| Status::unavailable("the push source is not running"))?;
    Ok(Pending::Routed {
        answer,
        durable: handle.durable.clone(),
    })
}
