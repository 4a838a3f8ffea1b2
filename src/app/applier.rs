//! The applier of one bus partition: the single writer of its store shard.
//!
//! It applies records in offset order and answers snapshot requests between
//! records: a request names the bus offset the snapshot must reach; the
//! applier answers, once it has applied at least that far, with the shard's
//! entities (cheap `Arc` clones) and the offset they reflect.

use crate::bus::{Bus, BusError, Offset};
use crate::event::BusRecord;
use crate::publish::EntityPublisher;
use crate::store::{Entity, EntityChange, Outcome, Store};
use crate::telemetry::Metrics;
use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// What a snapshot of one partition captures.
pub struct Capture {
    /// The offset of the next record not reflected.
    pub offset: Offset,
    pub entities: Vec<Arc<Entity>>,
}

/// "Capture the shard once you have applied everything below `until`."
pub struct CaptureRequest {
    pub until: Offset,
    pub reply: oneshot::Sender<Capture>,
}

/// Live numbers of one partition.
#[derive(Debug, Default)]
pub struct PartitionState {
    /// The offset of the next record to apply.
    pub applied: AtomicU64,
    /// The offset the last snapshot reflects.
    pub snapshot: AtomicU64,
    /// This process owns the partition (always, on the embedded bus; on
    /// Kafka, while the group assigns it here).
    pub owned: AtomicBool,
    /// Reads are served once `applied` reaches this: the end of the log
    /// when the partition was assigned, so a partition being rebuilt never
    /// answers with old versions as if they were current.
    pub ready_at: AtomicU64,
    /// Told after each batch applied (reads waiting for positions).
    pub advanced: tokio::sync::Notify,
}

impl PartitionState {
    /// Owned and caught up with the log as it was when assigned.
    pub fn serving(&self) -> bool {
        self.owned.load(Ordering::Acquire)
            && self.applied.load(Ordering::Acquire) >= self.ready_at.load(Ordering::Acquire)
    }
}

const BATCH: usize = 1024;

/// What one partition's applier works with.
pub struct Applier {
    pub partition: u32,
    /// The first offset to apply.
    pub from: Offset,
    pub bus: Arc<dyn Bus>,
    pub store: Arc<Store>,
    pub state: Arc<PartitionState>,
    pub metrics: Arc<Metrics>,
    /// In Kafka mode, the entities topic.
    pub publisher: Option<Arc<EntityPublisher>>,
    /// In Kafka mode, the state topic.
    pub state_topic: Option<Arc<super::state::StateTopic>>,
    /// Changes of records below this offset are not published: a previous
    /// holder of the partition published them (replays after a move).
    pub publish_from: Offset,
    /// Likewise for the state topic: it holds the partition up to here.
    pub state_from: Offset,
    /// Stops the applier between batches (its partition is handed over).
    pub stop: CancellationToken,
}

/// Applies the partition until the bus closes or `stop` fires; returns the
/// offset of the next record not applied.
#[tracing::instrument(skip_all, fields(partition = a.partition))]
pub async fn run(
    a: Applier,
    mut requests: mpsc::Receiver<CaptureRequest>,
) -> Result<Offset, BusError> {
    let Applier {
        partition,
        from,
        bus,
        store,
        state,
        metrics,
        publisher,
        state_topic,
        publish_from,
        state_from,
        stop,
    } = a;
    let mut consumer = bus.consume(partition, from).await?;
    let result: Result<Offset, BusError> = async {
        let mut next = from;
        state.applied.store(next.0, Ordering::Release);
        let mut waiting: Vec<CaptureRequest> = Vec::new();
        let mut requests_open = true;
        let mut counters = AppliedCounters::new();
        let mut changes: Vec<Arc<EntityChange>> = Vec::new();
        loop {
            // Answer every request already satisfied.
            let (ready, still): (Vec<_>, Vec<_>) = waiting
                .drain(..)
                .partition(|r: &CaptureRequest| r.until <= next);
            waiting = still;
            if !ready.is_empty() {
                let entities = store.shard_entities(partition);
                for r in ready {
                    let _ = r.reply.send(Capture {
                        offset: next,
                        entities: entities.clone(),
                    });
                }
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(next),
                req = requests.recv(), if requests_open => match req {
                    Some(r) => waiting.push(r),
                    None => requests_open = false,
                },
                batch = consumer.next_batch(BATCH) => {
                    let batch = batch?;
                    if batch.is_empty() {
                        // The bus is closed: answer what can be answered and stop.
                        return Ok(next);
                    }
                    // The changes of records below `publish_from` (`state_from`)
                    // are a prefix of the batch's: a previous holder of the
                    // partition published them (wrote them to the state topic).
                    let (mut published, mut stated) = (0, 0);
                    for d in batch {
                        debug_assert_eq!(d.offset, next, "bus offsets must be dense");
                        apply(&store, partition, &d.record, &metrics, &mut counters, &mut changes);
                        if d.offset < publish_from {
                            published = changes.len();
                        }
                        if d.offset < state_from {
                            stated = changes.len();
                        }
                        next = Offset(d.offset.0 + 1);
                    }
                    // Published before counted applied: a snapshot (taken between
                    // batches) never reflects a version the topic has not got.
                    if let Some(p) = &publisher
                        && changes.len() > published
                    {
                        p.publish(&changes[published..]).await?;
                    }
                    if let Some(st) = &state_topic
                        && next > state_from
                    {
                        st.write(partition, &changes[stated..], next.0).await?;
                    }
                    changes.clear();
                    state.applied.store(next.0, Ordering::Release);
                    state.advanced.notify_waiters();
                }
            }
        }
    }
    .await;
    // librdkafka's destructor may wait for the broker: not on a runtime thread.
    tokio::task::spawn_blocking(move || drop(consumer));
    result
}

/// Each source's `changes_applied` counter, looked up once per source
/// rather than once per record (the lookup builds a label and takes a lock).
type AppliedCounters = HashMap<Arc<str>, Counter>;

fn apply(
    store: &Store,
    partition: u32,
    record: &BusRecord,
    metrics: &Metrics,
    counters: &mut AppliedCounters,
    changes: &mut Vec<Arc<EntityChange>>,
) {
    match record {
        BusRecord::Changes(set) => {
            let applied = store.apply_into(set, changes);
            if applied != Outcome::Stale {
                counters
                    .entry(set.source.clone())
                    .or_insert_with(|| {
                        metrics
                            .changes_applied
                            .get_or_create(&Metrics::source(&set.source))
                            .clone()
                    })
                    .inc_by(set.changes.len() as u64);
            }
            tracing::trace!(key = %set.key, position = %set.position, "applied");
        }
        BusRecord::Fetched(set) => {
            store.apply_fetched_into(set, changes);
            tracing::trace!(key = %set.key, "applied a fetch");
        }
        BusRecord::Truncate(t) => {
            let n = store.truncate_into(partition, t, changes);
            tracing::debug!(table = %t.table, entities = n, "truncated");
        }
        BusRecord::Unreadable => {}
    }
}
