//! The applier of one bus partition: the single writer of its store shard.
//!
//! It applies records in offset order and answers snapshot requests between
//! records: a request names the bus offset the snapshot must reach; the
//! applier answers, once it has applied at least that far, with the shard's
//! entities (cheap `Arc` clones) and the offset they reflect.

use crate::bus::{Bus, BusError, Offset};
use crate::erase::{Done, Erasures};
use crate::event::{BusRecord, EntityKey, EraseAction};
use crate::publish::EntityPublisher;
use crate::store::keystore::KeyStore;
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
    /// Forgotten ids whose changes are blocked, with when.
    pub blocked: Vec<(crate::event::EntityKey, i64)>,
    /// The highest version of a retired entity the shard dropped.
    pub floor: u64,
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
    /// Its rebuild here (Kafka: replaying up to `ready_at`), while it runs.
    pub rebuild: crate::progress::Progress,
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
    /// With `[snapshot.encryption]`: forgotten entities' keys are deleted here.
    pub keystore: Option<Arc<KeyStore>>,
    /// Where applied erasures are reported to the calls waiting for them.
    pub erasures: Arc<Erasures>,
    /// Embedded bus: the file of blocked ids, rewritten after a batch that
    /// forgot or unblocked (see [`crate::store::blocked`]).
    pub blocked_file: Option<Arc<crate::store::blocked::BlockedFile>>,
    /// How often the shard's retired entities kept longer than their
    /// type's `keep_deleted` are dropped.
    pub sweep_every: std::time::Duration,
}

/// A blocked id set (`Some(when)`) or lifted (`None`), for the state topic.
pub type Mark = (EntityKey, Option<i64>);

/// Erasures of one batch, done after its records are applied.
#[derive(Default)]
struct Erasing {
    /// Forgotten entities whose snapshot keys go, at their record's offset,
    /// with the index of their result in `done`.
    keys: Vec<(EntityKey, u64, usize)>,
    /// The batch's erasure results, by offset, reported once done.
    done: Vec<(u64, Done)>,
    marks: Vec<Mark>,
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
        keystore,
        erasures,
        blocked_file,
        sweep_every,
    } = a;
    let mut sweep = tokio::time::interval(sweep_every);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                let blocked = store.blocked_in(partition);
                let floor = store.floor(partition);
                for r in ready {
                    let _ = r.reply.send(Capture {
                        offset: next,
                        entities: entities.clone(),
                        blocked: blocked.clone(),
                        floor,
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
                _ = sweep.tick() => {
                    // Retired entities kept long enough leave memory; the
                    // state topic drops them too (a snapshot simply no
                    // longer holds them).
                    let n = store.sweep_into(partition, crate::sources::now_micros(), &mut changes);
                    if n > 0 {
                        tracing::debug!(entities = n, "retired entities dropped");
                        if let Some(st) = &state_topic
                            && next > state_from
                        {
                            write_state(st, &store, partition, &changes, &[], &[], next.0).await?;
                        }
                        changes.clear();
                    }
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
                    let (mut published, mut stated, mut stated_marks) = (0, 0, 0);
                    let mut erasing = Erasing::default();
                    // Entities whose source positions moved with no change.
                    let mut unchanged: Vec<EntityKey> = Vec::new();
                    for d in batch {
                        debug_assert_eq!(d.offset, next, "bus offsets must be dense");
                        if let BusRecord::Erase(e) = &*d.record {
                            erase(&store, e, d.offset.0, &metrics, &mut changes, &mut erasing);
                        } else {
                            let u = apply(&store, partition, &d.record, &metrics, &mut counters, &mut changes);
                            if let Some(key) = u
                                && d.offset >= state_from
                                && state_topic.is_some()
                            {
                                unchanged.push(key);
                            }
                        }
                        if d.offset < publish_from {
                            published = changes.len();
                        }
                        if d.offset < state_from {
                            stated = changes.len();
                            stated_marks = erasing.marks.len();
                        }
                        next = Offset(d.offset.0 + 1);
                    }
                    // Keys go before the batch counts applied: a caller that
                    // sees its forget applied sees its key gone.
                    if let Some(ks) = &keystore
                        && !erasing.keys.is_empty()
                    {
                        let ks = ks.clone();
                        let keys = std::mem::take(&mut erasing.keys);
                        let deleted = tokio::task::spawn_blocking(move || {
                            keys.iter()
                                .map(|(k, at, i)| ks.erase(k, *at).map(|gone| (*i, gone)))
                                .collect::<Result<Vec<(usize, bool)>, _>>()
                        })
                        .await
                        .map_err(|e| BusError::Keystore(e.to_string()))?
                        .map_err(|e| BusError::Keystore(e.to_string()))?;
                        for (i, gone) in deleted {
                            erasing.done[i].1.key_deleted = gone;
                        }
                    }
                    // Published before counted applied: a snapshot (taken between
                    // batches) never reflects a version the topic has not got.
                    if let Some(p) = &publisher
                        && changes.len() > published
                    {
                        p.publish(&changes[published..]).await?;
                    }
                    if let Some(file) = &blocked_file
                        && !erasing.marks.is_empty()
                    {
                        let (file, store) = (file.clone(), store.clone());
                        tokio::task::spawn_blocking(move || file.save(|| store.blocked_all()))
                            .await
                            .map_err(|e| BusError::Keystore(e.to_string()))?
                            .map_err(|e| BusError::Keystore(e.to_string()))?;
                    }
                    if let Some(st) = &state_topic
                        && next > state_from
                    {
                        // As they are after the batch (this task is their
                        // shard's only writer).
                        let unchanged: Vec<Arc<crate::store::Entity>> =
                            unchanged.iter().filter_map(|k| store.held(k)).collect();
                        write_state(
                            st,
                            &store,
                            partition,
                            &changes[stated..],
                            &unchanged,
                            &erasing.marks[stated_marks..],
                            next.0,
                        )
                        .await?;
                    }
                    for (offset, done) in erasing.done {
                        erasures.record(partition, offset, done);
                    }
                    changes.clear();
                    let before = state.applied.swap(next.0, Ordering::AcqRel);
                    state.advanced.notify_waiters();
                    if state.rebuild.active() {
                        state.rebuild.advance(next.0.saturating_sub(before));
                        if next.0 >= state.ready_at.load(Ordering::Acquire) {
                            state.rebuild.finish();
                        }
                    }
                }
            }
        }
    }
    .await;
    // librdkafka's destructor may wait for the broker: not on a runtime thread.
    tokio::task::spawn_blocking(move || drop(consumer));
    result
}

/// Writes what `changes` changed, the headers of `unchanged` and the blocked
/// ids `marks` set or lift to the state topic, as of `offset`; the whole
/// partition after them when the topic's partition turns out made again.
async fn write_state(
    st: &super::state::StateTopic,
    store: &Store,
    partition: u32,
    changes: &[Arc<EntityChange>],
    unchanged: &[Arc<Entity>],
    marks: &[Mark],
    offset: u64,
) -> Result<(), BusError> {
    let floor = store.floor(partition);
    if !st
        .write(partition, changes, unchanged, marks, floor, offset)
        .await?
    {
        st.write_whole(
            partition,
            &store.shard_entities(partition),
            &store.blocked_in(partition),
            floor,
            offset,
        )
        .await?;
    }
    Ok(())
}

/// Applies one erasure record; its snapshot key is deleted after the batch.
fn erase(
    store: &Store,
    e: &crate::event::Erasure,
    offset: u64,
    metrics: &Metrics,
    changes: &mut Vec<Arc<EntityChange>>,
    erasing: &mut Erasing,
) {
    let was_blocked = store.is_blocked(&e.key);
    let label = crate::telemetry::TypeLabel {
        entity_type: e.key.entity_type.to_string(),
    };
    let done = match e.action {
        EraseAction::Forget { block } => {
            let forgot = store.forget_into(&e.key, block, e.at_micros, changes);
            if block {
                erasing.marks.push((e.key.clone(), Some(e.at_micros)));
            } else if was_blocked {
                store.unblock(&e.key);
                erasing.marks.push((e.key.clone(), None));
            }
            erasing
                .keys
                .push((e.key.clone(), offset, erasing.done.len()));
            metrics.forgotten.get_or_create(&label).inc();
            tracing::info!(key = %e.key, held = forgot.was_held, block, offset, "entity forgotten");
            Done {
                was_held: forgot.was_held,
                blocked: block,
                was_blocked,
                key_deleted: false,
            }
        }
        EraseAction::Unblock => {
            if store.unblock(&e.key) {
                erasing.marks.push((e.key.clone(), None));
            }
            tracing::info!(key = %e.key, was_blocked, offset, "entity unblocked");
            Done {
                was_blocked,
                ..Done::default()
            }
        }
    };
    erasing.done.push((offset, done));
}

/// Each source's `changes_applied` counter, looked up once per source
/// rather than once per record (the lookup builds a label and takes a lock).
type AppliedCounters = HashMap<Arc<str>, Counter>;

/// Applies one record; returns the entity's key when it applied with no
/// change (its source position moved).
fn apply(
    store: &Store,
    partition: u32,
    record: &BusRecord,
    metrics: &Metrics,
    counters: &mut AppliedCounters,
    changes: &mut Vec<Arc<EntityChange>>,
) -> Option<EntityKey> {
    match record {
        BusRecord::Changes(set) => {
            let applied = store.apply_into(set, changes);
            if applied == Outcome::Blocked {
                blocked(metrics, &set.key);
            } else if applied != Outcome::Stale {
                counters
                    .entry(set.source.clone())
                    .or_insert_with(|| {
                        metrics
                            .changes_applied
                            .get_or_create(&Metrics::source(&set.source))
                            .clone()
                    })
                    .inc_by(set.changes.len() as u64);
                metrics.applied_all.fetch_add(
                    set.changes.len() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            tracing::trace!(key = %set.key, position = %set.position, "applied");
            (applied == Outcome::Unchanged).then(|| set.key.clone())
        }
        BusRecord::Fetched(set) => {
            let applied = store.apply_fetched_into(set, changes);
            if applied == Outcome::Blocked {
                blocked(metrics, &set.key);
            }
            tracing::trace!(key = %set.key, "applied a fetch");
            (applied == Outcome::Unchanged).then(|| set.key.clone())
        }
        BusRecord::Truncate(t) => {
            let n = store.truncate_into(partition, t, changes);
            tracing::debug!(table = %t.table, entities = n, "truncated");
            None
        }
        // Applied by the caller (`erase`): it needs the record's offset.
        BusRecord::Erase(_) | BusRecord::Unreadable => None,
    }
}

/// A change of a forgotten, blocked entity was dropped.
fn blocked(metrics: &Metrics, key: &EntityKey) {
    metrics
        .blocked_changes
        .get_or_create(&crate::telemetry::TypeLabel {
            entity_type: key.entity_type.to_string(),
        })
        .inc();
    tracing::trace!(%key, "change of a forgotten entity dropped");
}
