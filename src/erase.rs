//! Forgetting entities on request: the right to erasure (`ForgetEntity`,
//! `UnblockEntity`; docs/security.md, "Forgetting an entity").
//!
//! A forget is a record on the bus ([`BusRecord::Erase`]), keyed by the
//! entity, so it is ordered with the entity's changes: the applier of its
//! partition applies what came before, then drops the entity from memory
//! (history included), marks it blocked (unless the caller allows a
//! rebuild), deletes its snapshot key (with `[snapshot.encryption]`), and
//! publishes a tombstone to the entities and state topics, all before it
//! counts the record applied. Replays (a restart, a partition rebuilt
//! elsewhere) meet the same record at the same place and come to the same
//! end.
//!
//! What makes it durable: on Kafka, the record on the changes topic (and
//! the mark on the state topic); on the embedded bus, whose log lives in
//! memory, a snapshot round taken before the call is answered.

use crate::app::Fabric;
use crate::bus::Offset;
use crate::event::{BusRecord, EntityKey, EraseAction, Erasure};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

/// How long a forget waits for its record to be applied when the call
/// has no deadline of its own.
const APPLY_WAIT: Duration = Duration::from_secs(30);
/// Results kept for callers to pick up (older ones are replays nobody
/// waits for).
const KEPT: usize = 1024;

/// What applying one erasure record did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Done {
    /// The entity was held and is gone.
    pub was_held: bool,
    /// Its later changes are dropped now.
    pub blocked: bool,
    /// It was blocked before the record.
    pub was_blocked: bool,
    /// Its snapshot key was deleted.
    pub key_deleted: bool,
}

/// A snapshot round asked for; answered with whether it was written.
pub type RoundRequest = oneshot::Sender<bool>;

/// Results of applied erasures, and the way to ask for a snapshot round.
pub struct Erasures {
    done: Mutex<VecDeque<((u32, u64), Done)>>,
    rounds: mpsc::UnboundedSender<RoundRequest>,
}

impl Erasures {
    /// The receiver gets the snapshot rounds forgets ask for.
    pub fn new() -> (Self, mpsc::UnboundedReceiver<RoundRequest>) {
        let (rounds, rx) = mpsc::unbounded_channel();
        (
            Erasures {
                done: Mutex::new(VecDeque::new()),
                rounds,
            },
            rx,
        )
    }

    /// The applier of `partition` applied the erasure at `offset`.
    pub fn record(&self, partition: u32, offset: u64, done: Done) {
        let mut d = self.done.lock();
        d.push_back(((partition, offset), done));
        while d.len() > KEPT {
            d.pop_front();
        }
    }

    fn take(&self, partition: u32, offset: u64) -> Option<Done> {
        let mut d = self.done.lock();
        let i = d.iter().position(|(at, _)| *at == (partition, offset))?;
        d.remove(i).map(|(_, done)| done)
    }

    /// Asks for a snapshot round and waits for it; false when it failed or
    /// the fabric is stopping.
    async fn round(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.rounds.send(tx).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }
}

/// What one erasure came to.
#[derive(Debug, Clone, Copy)]
pub struct Erased {
    pub partition: u32,
    pub offset: u64,
    pub done: Done,
    pub snapshot_written: bool,
}

/// Puts an erasure of `key` on the bus, waits until its partition (served
/// here) has applied it, then for a snapshot round; `until` is the call's
/// deadline.
pub async fn erase(
    fabric: &Fabric,
    key: &EntityKey,
    action: EraseAction,
    until: Option<Instant>,
) -> Result<Erased, Status> {
    let p = key.partition(fabric.bus.partitions());
    let state = &fabric.partitions[p as usize];
    let record = BusRecord::Erase(Erasure {
        key: key.clone(),
        action,
        at_micros: crate::sources::now_micros(),
    });
    let offsets = fabric.bus.produce(vec![(p, record)]).await.map_err(|e| {
        Status::unavailable(format!("cannot put the erasure of {key} on the bus: {e}"))
    })?;
    let at = offsets.first().copied().unwrap_or(Offset(0));
    let until = until.unwrap_or_else(|| Instant::now() + APPLY_WAIT);
    loop {
        let applied = state.advanced.notified();
        tokio::pin!(applied);
        applied.as_mut().enable();
        if state.applied.load(Ordering::Acquire) > at.0 {
            break;
        }
        tokio::select! {
            _ = &mut applied => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = tokio::time::sleep_until(until.into()) => {
                return Err(Status::deadline_exceeded(format!(
                    "the erasure of {key} is on the bus (partition {p}, offset {at}) but was not \
                     applied in time; it will be: call again to see it done"
                )));
            }
        }
    }
    // Applied by another holder meanwhile (the partition moved away and
    // back): what it did is not known here; the state after it is.
    let done = fabric.erasures.take(p, at.0).unwrap_or(Done {
        was_held: false,
        blocked: matches!(action, EraseAction::Forget { block: true }),
        was_blocked: false,
        key_deleted: false,
    });
    fabric.fetcher.forgotten(key);
    let snapshot_written = fabric.erasures.round().await;
    let embedded = fabric.config().bus.kind != crate::config::BusKind::Kafka;
    if embedded && !snapshot_written {
        return Err(Status::unavailable(format!(
            "{key}: the erasure is applied in memory, but the snapshot round that makes it \
             durable failed (the fabric logged why); call again"
        )));
    }
    Ok(Erased {
        partition: p,
        offset: at.0,
        done,
        snapshot_written,
    })
}
