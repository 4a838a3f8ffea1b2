//! What this process owns — bus partitions and sources — and the hand-over
//! when that changes.
//!
//! On the embedded bus a process owns everything from the start. On Kafka
//! the processes of a fabric share the work by leases on the members topic
//! (see [`crate::bus::members`]):
//!
//! - Bus partitions: a process applies the partitions it is assigned. An
//!   assigned partition is rebuilt before it is
//!   served: from the newest local snapshot of it (or, with none, from the
//!   start of the topic), replayed up to the end the log had when it was
//!   assigned; until then reads of its entities get UNAVAILABLE. A revoked
//!   partition is handed over: its applier stops, its shard is snapshotted
//!   and stops being served, and its entities leave memory.
//! - Sources: a process runs the sources it is assigned, each from its
//!   checkpoint on the checkpoints topic (see [`super::checkpoints`]). A
//!   revoked source is stopped and its last checkpoint written before the
//!   process says it let it go.

use super::applier::{self, Applier};
use super::checkpoints::CheckpointTopic;
use super::snapshots::{self, Snapshotter};
use super::{Fabric, RouterControl};
use crate::bus::Offset;
use crate::event::Position;
use crate::publish::EntityPublisher;
use crate::sources::TxnEnvelope;
use crate::sources::grpc_push::PushRegistry;
use futures::FutureExt;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct RunningApplier {
    stop: CancellationToken,
    handle: JoinHandle<Option<Offset>>,
}

/// The bus partitions this process applies.
pub struct Partitions {
    pub fabric: Arc<Fabric>,
    pub publisher: Option<Arc<EntityPublisher>>,
    /// On Kafka, the state topic (restores, and written as entities change).
    pub state_topic: Option<Arc<super::state::StateTopic>>,
    running: Vec<Option<RunningApplier>>,
    failed: mpsc::UnboundedSender<(u32, String)>,
    router: mpsc::UnboundedSender<RouterControl>,
}

impl Partitions {
    /// A failed applier is reported on the returned receiver.
    pub fn new(
        fabric: Arc<Fabric>,
        publisher: Option<Arc<EntityPublisher>>,
        router: mpsc::UnboundedSender<RouterControl>,
    ) -> (Self, mpsc::UnboundedReceiver<(u32, String)>) {
        let (failed, failures) = mpsc::unbounded_channel();
        let n = fabric.partitions.len();
        (
            Partitions {
                fabric,
                publisher,
                state_topic: None,
                running: (0..n).map(|_| None).collect(),
                failed,
                router,
            },
            failures,
        )
    }

    /// Starts applying `partition` from `from`, publishing entity changes
    /// from `publish_from` on and writing the state topic from `state_from`.
    pub fn start(
        &mut self,
        snap: &mut Snapshotter,
        partition: u32,
        from: Offset,
        publish_from: Offset,
        state_from: Offset,
    ) {
        let f = &self.fabric;
        let p = partition as usize;
        let (tx, rx) = mpsc::channel(4);
        snap.requests[p] = Some(tx);
        let stop = CancellationToken::new();
        let state = f.partitions[p].clone();
        state.applied.store(from.0, Ordering::Release);
        state.snapshot.store(from.0, Ordering::Release);
        let a = Applier {
            partition,
            from,
            bus: f.bus.clone(),
            store: f.store.clone(),
            state: state.clone(),
            metrics: f.metrics.clone(),
            publisher: self.publisher.clone(),
            state_topic: self.state_topic.clone(),
            publish_from,
            state_from,
            stop: stop.clone(),
            keystore: f.keystore.clone(),
            erasures: f.erasures.clone(),
            blocked_file: f.blocked_file.clone(),
            sweep_every: f.config().sweep_every(),
        };
        let failed = self.failed.clone();
        let handle = tokio::spawn(async move {
            let r = std::panic::AssertUnwindSafe(applier::run(a, rx))
                .catch_unwind()
                .await;
            match r {
                Ok(Ok(o)) => Some(o),
                Ok(Err(e)) => {
                    let _ = failed.send((partition, e.to_string()));
                    None
                }
                Err(_) => {
                    let _ = failed.send((partition, "panicked".into()));
                    None
                }
            }
        });
        state.owned.store(true, Ordering::Release);
        self.running[p] = Some(RunningApplier { stop, handle });
    }

    /// Stops the applier of `partition`; returns where it stopped.
    async fn stop(&mut self, snap: &mut Snapshotter, partition: u32) -> Option<Offset> {
        let p = partition as usize;
        self.fabric.partitions[p]
            .owned
            .store(false, Ordering::Release);
        self.fabric.partitions[p].rebuild.abandon();
        snap.requests[p] = None;
        let r = self.running[p].take()?;
        r.stop.cancel();
        r.handle.await.ok().flatten()
    }

    /// `partitions` were taken away: stop, snapshot and drop each.
    pub async fn revoked(&mut self, snap: &mut Snapshotter, partitions: &[u32]) {
        for &p in partitions {
            if let Some(offset) = self.stop(snap, p).await {
                match snap.hand_over(p, offset).await {
                    Ok(bytes) => tracing::info!(
                        partition = p,
                        offset = offset.0,
                        bytes,
                        "partition handed over"
                    ),
                    Err(e) => {
                        tracing::warn!(partition = p, error = %e, "cannot snapshot a partition being handed over; it replays more if it comes back")
                    }
                }
            }
            let n = self.fabric.store.drop_shard(p);
            tracing::info!(partition = p, entities = n, "partition dropped from memory");
        }
    }

    /// `owned` is everything this process holds now: rebuild and start the
    /// partitions new to it.
    pub async fn assigned(&mut self, snap: &mut Snapshotter, owned: &[u32]) -> anyhow::Result<()> {
        let keep: HashSet<u32> = owned.iter().copied().collect();
        let gone: Vec<u32> = (0..self.running.len() as u32)
            .filter(|p| !keep.contains(p) && self.running[*p as usize].is_some())
            .collect();
        if !gone.is_empty() {
            self.revoked(snap, &gone).await;
        }
        for &p in owned {
            if self.running.get(p as usize).is_none_or(|r| r.is_some()) {
                continue;
            }
            self.restore(snap, p).await?;
        }
        Ok(())
    }

    /// Rebuilds `partition` (from the newer of its local snapshot and the
    /// state topic, else from the start of the log) and starts applying it; reads wait for it to reach the end the
    /// log has now. Broker errors are retried (the caller races this with
    /// shutdown); only history missing from the log is fatal.
    async fn restore(&mut self, snap: &mut Snapshotter, p: u32) -> anyhow::Result<()> {
        let f = self.fabric.clone();
        let state = &f.partitions[p as usize];
        let ready_at = retrying("read the end of the log", || f.bus.log_end(p)).await;
        state.ready_at.store(ready_at.0, Ordering::Release);
        f.store.drop_shard(p);
        let dir = f.snapshot_dir.clone();
        let store = f.store.clone();
        let partitions = f.bus.partitions();
        let keys = f.keystore.clone();
        let restored = tokio::task::spawn_blocking(move || {
            snapshots::restore_partition(&dir, &store, p, partitions, keys.as_deref())
        })
        .await??;
        let local = restored.map(|(offset, _)| offset);
        // The state topic, when newer than what this process has on disk.
        let mut from_state = None;
        let mut state_offset = None;
        // Entities and blocked ids on the state topic, when it is not used (older).
        let mut stale: HashMap<crate::event::EntityKey, Arc<crate::store::Entity>> = HashMap::new();
        let mut stale_marks: Vec<crate::event::EntityKey> = Vec::new();
        if let Some(st) = self.state_topic.clone() {
            let state = retrying("read the state topic", || st.take_over(p)).await;
            state_offset = state.as_ref().map(|s| s.offset);
            let state = match state {
                Some(s) if local.is_some_and(|l| s.offset <= l) => {
                    // A floor only goes up: the higher of the two stands.
                    f.store.raise_floor(p, s.floor);
                    stale_marks = s.blocked.iter().map(|(k, _)| k.clone()).collect();
                    stale = s
                        .entities
                        .into_iter()
                        .map(|e| (e.key.clone(), Arc::new(e)))
                        .collect();
                    None
                }
                s => s,
            };
            if let Some(s) = state
                && local.is_none_or(|l| s.offset > l)
            {
                f.store.drop_shard(p);
                let n = s.entities.len();
                for (key, at) in s.blocked {
                    f.store.restore_blocked(key, at);
                }
                f.store.raise_floor(p, s.floor);
                for e in s.entities {
                    f.store.restore(e);
                }
                tracing::info!(
                    partition = p,
                    entities = n,
                    offset = s.offset,
                    local_snapshot = ?local,
                    "partition restored from the state topic"
                );
                from_state = Some(s.offset);
            }
        }
        let start = retrying("read the start of the log", || f.bus.start_offset(p)).await;
        let from = match from_state.or(local) {
            Some(offset) if offset >= start.0 => Offset(offset),
            Some(offset) => anyhow::bail!(
                "bus partition {p}: the changes topic no longer holds offset {offset} that its \
                 newest state reflects (its oldest offset is {start}): changes would be lost"
            ),
            None if start.0 > 0 => anyhow::bail!(
                "bus partition {p}: there is no snapshot or state of it and the changes topic \
                 no longer holds its start (its oldest offset is {start}): its history cannot \
                 be rebuilt. Start over with a new topic_prefix"
            ),
            None => {
                tracing::info!(
                    partition = p,
                    to = ready_at.0,
                    "no snapshot or state of this partition: rebuilding it from the log"
                );
                start
            }
        };
        // Versions below what a previous holder committed, or wrote to the
        // state topic, were published by it (an applier counts a batch
        // applied only once published).
        let committed = retrying("read the committed offset", || f.bus.committed(p))
            .await
            .unwrap_or_default();
        let published = Offset(committed.0.max(from_state.unwrap_or(0)));
        // The state topic must hold the whole partition as of `from`: when
        // it is behind (it was off, or a local snapshot is newer), write
        // the partition as it is now, then its offset, before going on.
        let mut state_from = Offset(state_offset.unwrap_or(0));
        if let Some(st) = self.state_topic.clone()
            && state_offset.is_none_or(|s| s < from.0)
            && from.0 > 0
        {
            // Each entity from what the topic holds of it.
            let mut all: Vec<Arc<crate::store::EntityChange>> = f
                .store
                .shard_entities(p)
                .into_iter()
                .map(|e| {
                    let was = stale.remove(&e.key);
                    Arc::new(crate::store::EntityChange::upsert(e, Vec::new()).after(was))
                })
                .collect();
            // What the topic holds and the partition no longer does: deleted.
            for (key, was) in stale {
                all.push(Arc::new(
                    crate::store::EntityChange::deleted(key, 0, Vec::new()).after(Some(was)),
                ));
            }
            let mut marks: Vec<super::applier::Mark> = f
                .store
                .blocked_in(p)
                .into_iter()
                .map(|(k, at)| (k, Some(at)))
                .collect();
            for key in stale_marks {
                if !f.store.is_blocked(&key) {
                    marks.push((key, None));
                }
            }
            let n = all.len();
            retrying("write the partition to the state topic", || {
                st.write(p, &all, &[], &marks, f.store.floor(p), from.0)
            })
            .await;
            tracing::info!(
                partition = p,
                entities = n,
                offset = from.0,
                "state topic brought up to date"
            );
            state_from = from;
        }
        if ready_at.0 > from.0 {
            state.rebuild.start(
                format!("rebuild of partition {p}"),
                "records",
                Some(ready_at.0 - from.0),
            );
        }
        // Keys of blocked ids held here (this process held the partition
        // before another applied their forget) go now.
        if let Some(ks) = f.keystore.clone() {
            let blocked = f.store.blocked_in(p);
            if !blocked.is_empty() {
                let n = tokio::task::spawn_blocking(move || {
                    ks.drop_keys(blocked.iter().map(|(k, _)| k))
                })
                .await??;
                if n > 0 {
                    tracing::info!(
                        partition = p,
                        keys = n,
                        "snapshot keys of forgotten entities deleted"
                    );
                }
            }
        }
        self.start(snap, p, from, published, state_from);
        // Its links once it has caught up with the log as assigned, not as
        // restored: a snapshot or the state topic may be from before a row
        // was deleted, and the router, routing live, would take the row
        // back into its index (and a later move of its link row would
        // bring it back into an entity).
        let (router, fabric) = (self.router.clone(), f.clone());
        tokio::spawn(async move {
            let state = &fabric.partitions[p as usize];
            while state.owned.load(Ordering::Acquire) {
                if state.serving() {
                    let _ = router.send(RouterControl::LearnLinks(fabric.store.shard_entities(p)));
                    return;
                }
                tokio::select! {
                    _ = state.advanced.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        });
        Ok(())
    }

    /// Stops every applier (shutdown), within `grace`.
    pub async fn stop_all(&mut self, grace: Duration) {
        let handles: Vec<RunningApplier> =
            self.running.iter_mut().filter_map(|r| r.take()).collect();
        for r in &handles {
            r.stop.cancel();
        }
        let all = futures::future::join_all(handles.into_iter().map(|r| r.handle));
        let _ = tokio::time::timeout(grace, all).await;
    }
}

/// Calls `f` until it succeeds, backing off and saying why.
async fn retrying<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::bus::BusError>>,
{
    let mut backoff = Duration::from_millis(200);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot {what}; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Partition `p` (held by another process) as of `end` of the changes
/// topic: its state topic, which is only as new as its holder has applied,
/// and the changes topic from there to `end`, applied to a scratch store.
/// The records up to `end` include every row the previous holder of a
/// source routed there: a link (`id_via`) in one of them, not yet in the
/// state topic, would otherwise be unknown to the router starting the
/// source here, and the child rows that need it dead-lettered.
async fn partition_as_of(
    f: &Fabric,
    st: &super::state::StateTopic,
    p: u32,
    end: Offset,
) -> Result<Vec<Arc<crate::store::Entity>>, crate::bus::BusError> {
    use crate::event::BusRecord;
    let config = f.config();
    let types: Vec<&str> = config.entities.iter().map(|e| e.name.as_str()).collect();
    let scratch = crate::store::Store::new(f.bus.partitions(), &types, 1);
    let mut next = 0;
    if let Some(state) = st.read(p).await? {
        next = state.offset;
        for e in state.entities {
            scratch.restore(e);
        }
    }
    if next < end.0 {
        let mut consumer = f.bus.consume(p, Offset(next)).await?;
        let mut changes = Vec::new();
        'read: while next < end.0 {
            let batch = consumer.next_batch(1024).await?;
            if batch.is_empty() {
                break;
            }
            for d in batch {
                if d.offset.0 >= end.0 {
                    break 'read;
                }
                match &*d.record {
                    BusRecord::Changes(set) => {
                        scratch.apply_into(set, &mut changes);
                    }
                    BusRecord::Fetched(set) => {
                        scratch.apply_fetched_into(set, &mut changes);
                    }
                    BusRecord::Truncate(t) => {
                        scratch.truncate_into(p, t, &mut changes);
                    }
                    BusRecord::Erase(_) | BusRecord::Unreadable => {}
                }
                changes.clear();
                next = d.offset.0 + 1;
            }
        }
    }
    Ok(scratch.shard_entities(p))
}

/// The sources this process runs.
pub struct Sources {
    pub fabric: Arc<Fabric>,
    pub push: PushRegistry,
    /// Dropped once no source can start any more, so the router ends when
    /// the last running source ends.
    pub out: Option<mpsc::Sender<TxnEnvelope>>,
    /// Parent of every source's stop token.
    pub stop: CancellationToken,
    pub router: mpsc::UnboundedSender<RouterControl>,
    /// On Kafka, the checkpoints topic and its writer.
    pub checkpoints: Option<Arc<CheckpointTopic>>,
    /// On Kafka, the state topic: where a process taking sources over
    /// learns the `id_via` links held by partitions other processes hold.
    pub state_topic: Option<Arc<super::state::StateTopic>>,
    pub writer: Option<mpsc::UnboundedSender<Flush>>,
    running: HashMap<Arc<str>, (CancellationToken, JoinHandle<()>)>,
    /// The names in `running`, shared with the checkpoint writer.
    pub owned: Arc<parking_lot::Mutex<HashSet<Arc<str>>>>,
    /// Sources assigned here that wait for this process's partitions to
    /// catch up before they start (see [`Sources::assigned`]).
    deferred: Option<Vec<String>>,
}

impl Sources {
    pub fn new(
        fabric: Arc<Fabric>,
        push: PushRegistry,
        out: mpsc::Sender<TxnEnvelope>,
        router: mpsc::UnboundedSender<RouterControl>,
    ) -> Self {
        Sources {
            fabric,
            push,
            out: Some(out),
            stop: CancellationToken::new(),
            router,
            checkpoints: None,
            state_topic: None,
            writer: None,
            running: HashMap::new(),
            owned: Default::default(),
            deferred: None,
        }
    }

    /// Starts source `name` of the running config from `resume`.
    /// `replaces`: the store may hold its rows although the source starts
    /// from nothing (a reload made it start over), so its initial snapshot
    /// replaces them.
    pub fn start(&mut self, name: &str, resume: Option<Position>, replaces: bool) {
        let f = &self.fabric;
        let config = f.config();
        let (Some(cfg), Some(src)) = (config.source(name).cloned(), f.source(name)) else {
            return;
        };
        if cfg.tables.is_empty() && crate::config::can_fetch(cfg.kind) {
            // Only read by query (sync-on-access types): nothing to capture.
            src.status.set_state("fetch only");
            return;
        }
        let Some(out) = self.out.clone() else { return };
        let _ = self
            .router
            .send(RouterControl::Resume(src.name.clone(), resume.clone()));
        let stop = self.stop.child_token();
        let handle = tokio::spawn(super::supervise(
            cfg,
            config,
            self.push.clone(),
            resume,
            out,
            src.durable.subscribe(),
            src.status.clone(),
            f.dead_letters.clone(),
            stop.clone(),
            f.clone(),
            replaces,
        ));
        self.owned.lock().insert(src.name.clone());
        self.running.insert(src.name.clone(), (stop, handle));
    }

    /// The membership assigned these sources (all this process holds
    /// now): start the new ones from their checkpoints.
    pub async fn assigned(&mut self, owned: &[String]) -> anyhow::Result<()> {
        let Some(topic) = self.checkpoints.clone() else {
            return Ok(());
        };
        let gone: Vec<Arc<str>> = self
            .running
            .keys()
            .filter(|n| !owned.iter().any(|o| o.as_str() == &***n))
            .cloned()
            .collect();
        self.stop_sources(&gone).await;
        let new: Vec<Arc<str>> = self
            .fabric
            .sources()
            .iter()
            .map(|s| s.name.clone())
            .filter(|name| {
                owned.iter().any(|o| o.as_str() == &**name) && !self.running.contains_key(name)
            })
            .collect();
        if !new.is_empty() && !self.partitions_caught_up() {
            // The router must know every `id_via` link before a source
            // routes a child row: the links in records a previous holder of
            // these partitions routed (replayed from the changes topic) are
            // known only once the replay is done. A child row routed
            // before would wait for a link no source sends again, and be
            // dead-lettered.
            if self.deferred.is_none() {
                tracing::info!(
                    "sources wait for this process's partitions to catch up with the changes topic (id_via links)"
                );
            }
            self.deferred = Some(owned.to_vec());
            return Ok(());
        }
        self.deferred = None;
        if !new.is_empty() {
            self.learn_links(&new).await;
            let checkpoints = retrying("read the checkpoints topic", || topic.read()).await;
            for name in new {
                let Some(src) = self.fabric.source(&name) else {
                    continue;
                };
                let resume = checkpoints.get(&*src.name).cloned();
                tracing::info!(source = %src.name, checkpoint = ?resume, "source assigned here; starting");
                src.durable.send_replace(resume.clone());
                self.start(&name, resume, false);
            }
        }
        for s in self.fabric.sources().iter() {
            if !self.running.contains_key(&s.name) {
                s.status.set_state("elsewhere");
            }
        }
        Ok(())
    }

    /// Whether sources waiting to start may: an entity type links rows
    /// (`id_via`), and every partition the membership gives this process is
    /// held and caught up with the changes topic as it was when assigned.
    fn partitions_caught_up(&self) -> bool {
        let f = &self.fabric;
        let Some(view) = f.members.get() else {
            return true;
        };
        if !f.config().links_rows() {
            return true;
        }
        let view = view.borrow();
        (0..f.bus.partitions()).all(|p| {
            let mine = view.owner_of(p).is_some_and(|m| m.member == f.member_id);
            !mine || f.partitions[p as usize].serving()
        })
    }

    /// Whether sources wait to start.
    pub fn deferred(&self) -> bool {
        self.deferred.is_some()
    }

    /// Starts the sources that waited, once they may.
    pub async fn retry_deferred(&mut self) -> anyhow::Result<()> {
        if let Some(owned) = self.deferred.clone()
            && self.partitions_caught_up()
        {
            self.assigned(&owned).await?;
        }
        Ok(())
    }

    /// Before sources start here, the router learns every `id_via` link:
    /// those of the partitions held here from the store (caught up with the
    /// changes topic, so links a previous holder routed are in), those of
    /// the partitions other processes hold from the state topic and the
    /// changes topic after it ([`partition_as_of`]: the rows of a link
    /// table may have been routed by another process, and their holder may
    /// not have applied them yet). A child row whose link is unknown would
    /// wait and be dead-lettered. What the index held of the tables of
    /// `starting` goes first: a process that routed them before and lost
    /// them kept an index that stood still, and a row deleted since would
    /// come back with the next move of its link row.
    async fn learn_links(&self, starting: &[Arc<str>]) {
        let f = &self.fabric;
        if !f.config().links_rows() {
            return;
        }
        // Everything first, then one step of the router: what the index
        // held of the starting sources' tables goes, and what the entities
        // hold comes in, with nothing routed in between.
        let mut entities = Vec::new();
        for p in 0..f.bus.partitions() {
            if f.partitions[p as usize].owned.load(Ordering::Acquire) {
                entities.extend(f.store.shard_entities(p));
                continue;
            }
            // With the state topic off, links held only by other processes'
            // partitions are not known here (docs/kafka.md).
            let Some(st) = self.state_topic.clone() else {
                continue;
            };
            let end = retrying("read the end of the log", || f.bus.log_end(p)).await;
            entities.extend(
                retrying("read a partition held elsewhere", || {
                    partition_as_of(f, &st, p, end)
                })
                .await,
            );
        }
        let n = entities.len();
        let _ = self.router.send(RouterControl::Relearn {
            sources: starting.to_vec(),
            entities,
        });
        tracing::info!(entities = n, "id_via links learned before sources start");
    }

    /// The membership takes these sources away.
    pub async fn revoked(&mut self, names: &[String]) {
        let gone: Vec<Arc<str>> = self
            .running
            .keys()
            .filter(|n| names.iter().any(|o| o.as_str() == &***n))
            .cloned()
            .collect();
        self.stop_sources(&gone).await;
        if let Some(d) = &mut self.deferred {
            d.retain(|n| !names.contains(n));
        }
        for s in self.fabric.sources().iter() {
            if !self.running.contains_key(&s.name) {
                s.status.set_state("elsewhere");
            }
        }
    }

    /// Stops `names`, then writes their last checkpoints.
    pub async fn stop_sources(&mut self, names: &[Arc<str>]) {
        if names.is_empty() {
            return;
        }
        let mut handles = Vec::new();
        for n in names {
            if let Some((stop, h)) = self.running.remove(n) {
                stop.cancel();
                handles.push((n.clone(), h));
            }
        }
        for (n, mut h) in handles {
            if tokio::time::timeout(Duration::from_secs(10), &mut h)
                .await
                .is_err()
            {
                tracing::warn!(source = %n, "source did not stop within 10s; aborted");
                h.abort();
            }
        }
        // Everything they sent reached the router …
        if let Some(out) = &self.out {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while out.capacity() < out.max_capacity() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        // … is on the bus, with their checkpoints published …
        let (tx, rx) = oneshot::channel();
        if self.router.send(RouterControl::Flush(tx)).is_ok()
            && tokio::time::timeout(HAND_OVER_WAIT, rx).await.is_err()
        {
            tracing::warn!(
                "the bus did not take what the stopped sources sent within 30s; handing them over anyway (their next holder repeats it)"
            );
        }
        {
            let mut owned = self.owned.lock();
            for n in names {
                owned.remove(n);
            }
        }
        // … and their checkpoints written.
        self.flush_checkpoints(names.to_vec()).await;
        for n in names {
            tracing::info!(source = %n, "source handed over");
        }
    }

    /// Writes the current checkpoints of `sources` (Kafka), waiting up to
    /// 30s for the broker.
    pub async fn flush_checkpoints(&self, sources: Vec<Arc<str>>) {
        let Some(w) = &self.writer else { return };
        let (tx, rx) = oneshot::channel();
        if w.send(Flush { sources, done: tx }).is_ok()
            && tokio::time::timeout(HAND_OVER_WAIT, rx).await.is_err()
        {
            tracing::warn!(
                "checkpoints not written within 30s; the next holder of these sources repeats more"
            );
        }
    }

    /// The sources running here.
    pub fn running(&self) -> Vec<Arc<str>> {
        self.running.keys().cloned().collect()
    }

    /// Stops every source (shutdown); the router ends once they have.
    pub async fn stop_all(&mut self) {
        self.stop.cancel();
        self.out = None;
        for (_, (_, h)) in self.running.drain() {
            let _ = h.await;
        }
    }
}

/// How long a hand-over waits for the broker before giving up on a step.
const HAND_OVER_WAIT: Duration = Duration::from_secs(30);

/// "Write the checkpoints of these sources now and answer."
pub struct Flush {
    pub sources: Vec<Arc<str>>,
    pub done: oneshot::Sender<()>,
}

/// Writes the routed checkpoint of every source running here to the
/// checkpoints topic when it moves, and acknowledges it to the source once
/// the broker has it.
pub async fn checkpoint_writer(
    f: Arc<Fabric>,
    topic: Arc<CheckpointTopic>,
    owned: Arc<parking_lot::Mutex<HashSet<Arc<str>>>>,
    mut flushes: mpsc::UnboundedReceiver<Flush>,
    stop: CancellationToken,
) {
    let mut written: HashMap<Arc<str>, Position> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (names, done) = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => (owned.lock().iter().cloned().collect::<Vec<_>>(), None),
            Some(fl) = flushes.recv() => (fl.sources, Some(fl.done)),
        };
        for name in names {
            let Some(pos) = f.routed.lock().get(&name).cloned().flatten() else {
                continue;
            };
            if written.get(&name) == Some(&pos) {
                continue;
            }
            let result = match topic.write(&name, &pos).await {
                Ok(ack) => tokio::select! {
                    r = ack => r,
                    _ = stop.cancelled() => return,
                },
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {
                    if let Some(s) = f.sources().iter().find(|s| s.name == name) {
                        s.durable.send_if_modified(|cur| {
                            if cur.as_ref().is_none_or(|c| pos > *c) {
                                *cur = Some(pos.clone());
                                true
                            } else {
                                false
                            }
                        });
                    }
                    written.insert(name, pos);
                }
                Err(e) => {
                    tracing::warn!(source = %name, error = %e, "cannot write a checkpoint; retrying")
                }
            }
        }
        if let Some(d) = done {
            let _ = d.send(());
        }
    }
}
