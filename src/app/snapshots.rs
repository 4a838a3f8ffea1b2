//! Snapshot rounds and restore.
//!
//! A round snapshots every partition together:
//! 1. read each source's routed checkpoint `C` (everything before it is on the bus),
//! 2. then read each partition's end offset `E[p]` (so `E` covers `C`),
//! 3. ask each applier for its shard once it has applied up to `E[p]`,
//! 4. write one file per partition holding the shard, its offset and `C`.
//!
//! Acknowledgement (invariant 3): a source position is acknowledged only once
//! it is inside the *oldest* round still kept on disk. If the newest file of
//! a partition turns out corrupt at restart, the previous one is used and the
//! source still holds every change after that older file's checkpoint.
//!
//! Restore: per partition, the newest file that reads back whole; resume
//! each source from the lowest checkpoint of the files used. A partition with
//! no readable file makes the fabric start empty and every source start over
//! from its beginning (initial snapshot).

use super::Fabric;
use super::applier::{Capture, CaptureRequest, PartitionState};
use crate::bus::Offset;
use crate::event::{Checkpoints, Position};
use crate::store::Store;
use crate::store::keystore::KeyStore;
use crate::store::snapshot::{self, SnapshotError, SnapshotMeta};
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// What restore found.
pub struct Restored {
    pub checkpoints: Checkpoints,
    /// Per partition (of the current count), the bus offset to start from.
    pub offsets: Vec<u64>,
    /// True when `offsets` come from snapshots of the current partition
    /// count; false when nothing was restored or entities were re-sharded
    /// (the offsets are then zeros, which only an empty bus agrees with).
    pub offsets_restored: bool,
    pub next_round: u64,
    pub entities: usize,
}

/// What a process that restores partitions one by one (on Kafka, as the
/// group assigns them) starts with: nothing restored yet, and the next
/// round number after the files present. Blocking.
pub fn next_round(dir: &Path, partitions: u32) -> anyhow::Result<Restored> {
    let files = snapshot::list(dir)?;
    Ok(Restored {
        checkpoints: Checkpoints::default(),
        offsets: vec![0; partitions as usize],
        offsets_restored: false,
        next_round: files.iter().map(|f| f.round).max().map_or(1, |r| r + 1),
        entities: 0,
    })
}

/// Loads the newest readable snapshot of every partition into `store`.
/// Blocking: call from `spawn_blocking`.
///
/// The partition count is the one of the newest readable file. Every
/// partition of that count must have a readable file of that count;
/// otherwise nothing is loaded and every source starts over from its
/// beginning into an empty store (never a mix of old entities and a partial
/// replay).
pub fn restore(
    dir: &Path,
    store: &Store,
    partitions: u32,
    keys: Option<&KeyStore>,
) -> anyhow::Result<Restored> {
    let files = snapshot::list(dir)?;
    let next_round = files.iter().map(|f| f.round).max().map_or(1, |r| r + 1);
    let mut out = Restored {
        checkpoints: Checkpoints::default(),
        offsets: vec![0; partitions as usize],
        offsets_restored: false,
        next_round,
        entities: 0,
    };
    if files.is_empty() {
        tracing::info!(dir = %dir.display(), "no snapshot: starting empty");
        return Ok(out);
    }
    let mut loaded: BTreeMap<u32, snapshot::LoadedSnapshot> = BTreeMap::new();
    let mut count: Option<u32> = None;
    // The newest file of every partition is what restore uses unless one
    // is unreadable: they are read (checked, decompressed, decoded) on
    // parallel threads first; the walk below takes those results in its
    // order and reads any older file it falls back to itself.
    let progress = crate::progress::Progress::default();
    let mut newest_read = read_newest_in_parallel(&files, keys, &progress);
    if let Some(w) = whole_round(&files, &mut newest_read, keys)? {
        tracing::info!(
            round = w.round,
            partitions = w.partitions,
            "restoring the newest whole snapshot round"
        );
        count = Some(w.partitions);
        loaded = w.files;
    } else {
        tracing::warn!(
            "no snapshot round reads back whole: each partition is restored from its newest readable file, \
             rows moved between partitions by transactions in one file and not another may be misplaced"
        );
    }
    // Newest first: the first readable file fixes the partition count.
    let walk = count.is_none();
    for f in files.iter().filter(|_| walk) {
        if count.is_some_and(|n| f.partition >= n) || loaded.contains_key(&f.partition) {
            continue;
        }
        let read = newest_read
            .remove(&f.path)
            .unwrap_or_else(|| snapshot::read(&f.path, keys));
        match read {
            Ok(s) if count.is_none_or(|n| n == s.meta.partitions) => {
                log_read(&f.path, &s);
                count.get_or_insert(s.meta.partitions);
                loaded.insert(f.partition, s);
            }
            Ok(s) => tracing::info!(
                path = %f.path.display(),
                partitions = s.meta.partitions,
                "snapshot of an older partition count skipped"
            ),
            Err(e) => skip_unreadable(e)?,
        }
    }
    let n = count.unwrap_or(partitions);
    let missing: Vec<u32> = (0..n).filter(|p| !loaded.contains_key(p)).collect();
    if !missing.is_empty() {
        tracing::warn!(
            ?missing,
            "no readable snapshot for some partitions: starting empty, every source starts over from its beginning"
        );
        return Ok(out);
    }
    out.checkpoints = Checkpoints::lowest(loaded.values().map(|s| &s.meta.checkpoints));
    if n != partitions {
        tracing::info!(from = n, to = partitions, "re-sharding restored entities");
    }
    out.offsets_restored = n == partitions;
    for (p, s) in &loaded {
        if n == partitions {
            out.offsets[*p as usize] = s.meta.bus_offset;
        }
        out.entities += s.entities.len();
    }
    // Loaded on parallel threads too: the store's shards are DashMaps, and
    // a file's entities go to one shard (or, re-sharded, to several).
    let loaded: Vec<snapshot::LoadedSnapshot> = loaded.into_values().collect();
    // Re-sharded, an entity of any old partition may land in any shard:
    // every shard starts above every old floor.
    let top = loaded.iter().map(|s| s.floor).max().unwrap_or(0);
    for s in &loaded {
        match n == partitions {
            true => store.raise_floor(s.meta.partition, s.floor),
            false => (0..partitions).for_each(|p| store.raise_floor(p, top)),
        }
    }
    on_threads(loaded, |s| {
        // Blocked ids first: a copy of a blocked entity is left out.
        for (key, at) in s.blocked {
            store.restore_blocked(key, at);
        }
        for e in s.entities {
            store.restore(e);
        }
    });
    tracing::info!(
        entities = out.entities,
        checkpoints = ?out.checkpoints.0,
        "restored"
    );
    Ok(out)
}

/// Snapshot files read, by path.
type Reads =
    std::collections::HashMap<std::path::PathBuf, Result<snapshot::LoadedSnapshot, SnapshotError>>;

/// A snapshot round all of whose files read back.
struct WholeRound {
    round: u64,
    partitions: u32,
    files: BTreeMap<u32, snapshot::LoadedSnapshot>,
}

/// The newest round whose files are there and read back whole for every
/// partition of its count: its round number, partition count and files.
/// A round is one cut of the router's output (see [`Snapshotter::round`]):
/// files of different rounds are not, so a row a transaction moved between
/// two partitions could be restored in both entities or in neither. A round
/// a crash interrupted (some partitions written) is passed over for the
/// previous one, as is a round with a corrupt file.
fn whole_round(
    files: &[snapshot::SnapshotFile],
    newest_read: &mut Reads,
    keys: Option<&KeyStore>,
) -> anyhow::Result<Option<WholeRound>> {
    let mut rounds: BTreeMap<u64, Vec<&snapshot::SnapshotFile>> = BTreeMap::new();
    for f in files {
        rounds.entry(f.round).or_default().push(f);
    }
    'rounds: for (round, in_round) in rounds.into_iter().rev() {
        let mut read = BTreeMap::new();
        let mut paths = Vec::new();
        for f in in_round {
            let r = newest_read
                .remove(&f.path)
                .unwrap_or_else(|| snapshot::read(&f.path, keys));
            match r {
                Ok(s) => {
                    read.insert(f.partition, s);
                    paths.push((f.partition, &f.path));
                }
                Err(e) => {
                    skip_unreadable(e)?;
                    continue 'rounds;
                }
            }
        }
        let Some(n) = read.values().next().map(|s| s.meta.partitions) else {
            continue;
        };
        let whole = read.len() == n as usize
            && read
                .iter()
                .all(|(p, s)| *p < n && s.meta.partitions == n && s.meta.round == round);
        if whole {
            for (p, path) in paths {
                log_read(path, &read[&p]);
            }
            return Ok(Some(WholeRound {
                round,
                partitions: n,
                files: read,
            }));
        }
        tracing::info!(
            round,
            files = read.len(),
            partitions = n,
            "snapshot round not whole (interrupted?): trying the previous one"
        );
    }
    Ok(None)
}

/// Logs a snapshot file restore uses.
fn log_read(path: &Path, s: &snapshot::LoadedSnapshot) {
    tracing::info!(
        path = %path.display(),
        entities = s.entities.len(),
        erased = s.erased,
        blocked = s.blocked.len(),
        bytes = s.bytes,
        "snapshot read"
    );
}

/// Logs an unreadable snapshot file that restore skips (a previous one, or
/// the sources, make up for it), or refuses to go on when the file is fine
/// but the keystore does not fit it: skipping every file for that would
/// throw the snapshots away and re-read every source.
fn skip_unreadable(e: SnapshotError) -> anyhow::Result<()> {
    if let SnapshotError::Keystore { .. } | SnapshotError::Keys(_) = e {
        anyhow::bail!("{e}");
    }
    tracing::warn!(error = %e, "corrupt snapshot skipped; trying the previous one");
    Ok(())
}

/// Runs `f` on every item, spread over the machine's cores.
fn on_threads<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len())
        .max(1);
    let mut chunks: Vec<Vec<T>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        chunks[i % threads].push(item);
    }
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| scope.spawn(move || chunk.into_iter().map(f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a restore thread panicked"))
            .collect()
    })
}

/// Reads the newest file of each partition in `files` (newest first), in
/// parallel; by path.
/// The bytes read go to `progress`, logged as they go for a long restore.
fn read_newest_in_parallel(
    files: &[snapshot::SnapshotFile],
    keys: Option<&KeyStore>,
    progress: &crate::progress::Progress,
) -> Reads {
    let mut seen = std::collections::HashSet::new();
    let newest: Vec<&snapshot::SnapshotFile> =
        files.iter().filter(|f| seen.insert(f.partition)).collect();
    let total = newest
        .iter()
        .filter_map(|f| std::fs::metadata(&f.path).ok())
        .map(|m| m.len())
        .sum();
    progress.start("restore from snapshot files", "bytes", Some(total));
    let out = on_threads(newest, |f| {
        let read = snapshot::read(&f.path, keys);
        progress.advance(read.as_ref().map_or(0, |s| s.bytes));
        (f.path.clone(), read)
    })
    .into_iter()
    .collect();
    progress.finish();
    out
}

/// Loads the newest readable snapshot of `partition` (of a bus of
/// `partitions`) into `store`, whose shard must be empty; returns the bus
/// offset it reflects and its entity count, or `None` when there is none.
/// Blocking: call from `spawn_blocking`.
pub fn restore_partition(
    dir: &Path,
    store: &Store,
    partition: u32,
    partitions: u32,
    keys: Option<&KeyStore>,
) -> anyhow::Result<Option<(u64, usize)>> {
    for f in snapshot::list(dir)?
        .iter()
        .filter(|f| f.partition == partition)
    {
        let started = Instant::now();
        match snapshot::read(&f.path, keys) {
            Ok(s) if s.meta.partitions == partitions => {
                let n = s.entities.len();
                tracing::info!(
                    path = %f.path.display(),
                    entities = n,
                    erased = s.erased,
                    blocked = s.blocked.len(),
                    bytes = s.bytes,
                    offset = s.meta.bus_offset,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "partition restored from its snapshot"
                );
                for (key, at) in s.blocked {
                    store.restore_blocked(key, at);
                }
                store.raise_floor(partition, s.floor);
                for e in s.entities {
                    store.restore(e);
                }
                return Ok(Some((s.meta.bus_offset, n)));
            }
            Ok(_) => {}
            Err(e) => skip_unreadable(e)?,
        }
    }
    Ok(None)
}

/// Takes snapshot rounds and acknowledges sources.
pub struct Snapshotter {
    pub fabric: Arc<Fabric>,
    /// Per partition, its applier's requests while it runs here.
    pub requests: Vec<Option<mpsc::Sender<CaptureRequest>>>,
    pub next_round: u64,
    /// Checkpoints of the rounds written by this process, oldest first.
    pub written: VecDeque<(u64, Checkpoints)>,
    /// Embedded bus: a round must cover the routed checkpoints, and
    /// acknowledges sources. Kafka: the changes topic is what is durable
    /// (sources are acknowledged through the checkpoints topic), so a round
    /// captures each partition as far as it is applied, without waiting.
    pub acknowledges: bool,
    /// Embedded bus: the router, which stands still for a round's cut.
    pub router: Option<mpsc::UnboundedSender<super::RouterControl>>,
}

impl Snapshotter {
    /// Sources that start over (a reload): the rounds written before hold
    /// their old checkpoints, which must not be acknowledged to the new run.
    pub fn forget_sources(&mut self, names: &[Arc<str>]) {
        for (_, checkpoints) in &mut self.written {
            for n in names {
                checkpoints.0.remove(&**n);
            }
        }
    }

    /// One round; returns the bytes written.
    #[tracing::instrument(skip_all, fields(round = self.next_round))]
    pub async fn round(&mut self) -> anyhow::Result<u64> {
        let started = Instant::now();
        let f = &self.fabric;
        let round = self.next_round;
        self.next_round += 1;
        // 1. Checkpoints first, 2. then end offsets: the offsets cover the
        // checkpoints. On the embedded bus the router stands still between
        // them (a cut), until every partition is captured.
        let cut = self.cut().await;
        let mut checkpoints = Checkpoints::default();
        let routed = match &cut {
            Some(c) => c.checkpoints.clone(),
            None => f.routed.lock().clone(),
        };
        for (source, pos) in routed.iter() {
            if let Some(p) = pos {
                checkpoints.0.insert(source.to_string(), p.clone());
            }
        }
        let mut replies = Vec::with_capacity(self.requests.len());
        for (p, requests) in self.requests.iter().enumerate() {
            let Some(requests) = requests else { continue };
            let until = if self.acknowledges {
                f.bus.end_offset(p as u32)
            } else {
                Offset(0)
            };
            let (tx, rx) = oneshot::channel();
            requests
                .send(CaptureRequest { until, reply: tx })
                .await
                .map_err(|_| anyhow::anyhow!("the applier of partition {p} is gone"))?;
            replies.push((p as u32, rx));
        }
        if replies.is_empty() {
            // Nothing owned here (on Kafka, before or between assignments).
            return Ok(0);
        }
        let mut captures = Vec::with_capacity(replies.len());
        for (p, rx) in replies {
            let capture = rx
                .await
                .map_err(|_| anyhow::anyhow!("the applier of partition {p} stopped"))?;
            captures.push((p, capture));
        }
        if let Some(c) = cut {
            let _ = c.resume.send(());
        }
        let mut bytes = 0;
        for (p, capture) in captures {
            bytes += self.write(round, p, &checkpoints, capture).await?;
        }
        let config = f.config();
        let keep = config.snapshot.keep;
        let dir = f.snapshot_dir.clone();
        let readings = self.acknowledges.then(|| {
            let all = crate::config::plan::readings(&config);
            all.into_iter()
                .filter(|(name, _)| checkpoints.0.contains_key(name))
                .collect::<BTreeMap<_, _>>()
        });
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            snapshot::prune(&dir, keep)?;
            if let Some(r) = readings {
                write_readings(&dir, &r)?;
            }
            Ok(())
        })
        .await??;
        self.written.push_back((round, checkpoints));
        while self.written.len() > keep {
            self.written.pop_front();
        }
        // Acknowledge what the oldest kept round holds, once this process wrote it.
        if self.acknowledges
            && self.written.len() == keep
            && let Some((_, oldest)) = self.written.front()
        {
            for s in f.sources().iter() {
                if let Some(p) = oldest.get(&s.name) {
                    s.durable.send_if_modified(|cur| {
                        if cur.as_ref().is_none_or(|c| p > c) {
                            *cur = Some(p.clone());
                            true
                        } else {
                            false
                        }
                    });
                }
            }
        }
        let elapsed = started.elapsed();
        f.metrics.snapshot_duration.observe(elapsed.as_secs_f64());
        f.metrics.snapshot_bytes.set(bytes as i64);
        f.metrics
            .snapshot_last_unix
            .set(crate::sources::now_micros() / 1_000_000);
        tracing::info!(
            bytes,
            elapsed_ms = elapsed.as_millis() as u64,
            "snapshot round written"
        );
        Ok(bytes)
    }
}

impl Snapshotter {
    /// Embedded bus: the router's cut, once every partition has applied
    /// what is on the bus now (so the router stands still only for the
    /// little routed meanwhile). `None` on Kafka, or when the router is
    /// gone (shutdown: everything it routed is on the bus).
    async fn cut(&self) -> Option<super::Cut> {
        let router = self.router.as_ref()?;
        let f = &self.fabric;
        let ends: Vec<(usize, u64)> = self
            .requests
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_some())
            .map(|(p, _)| (p, f.bus.end_offset(p as u32).0))
            .collect();
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while Instant::now() < deadline
            && ends
                .iter()
                .any(|(p, end)| f.partitions[*p].applied.load(Ordering::Acquire) < *end)
        {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        let (tx, rx) = oneshot::channel();
        router.send(super::RouterControl::Cut(tx)).ok()?;
        rx.await.ok()
    }

    /// Writes one partition's capture as part of `round`; returns its bytes.
    pub async fn write(
        &self,
        round: u64,
        partition: u32,
        checkpoints: &Checkpoints,
        capture: Capture,
    ) -> anyhow::Result<u64> {
        let f = &self.fabric;
        let meta = SnapshotMeta {
            partition,
            partitions: f.bus.partitions(),
            round,
            bus_offset: capture.offset.0,
            checkpoints: checkpoints.clone(),
            created_micros: crate::sources::now_micros(),
            keystore: None,
            dictionary: Vec::new(),
            key_generation: 0,
        };
        let dir = f.snapshot_dir.clone();
        let keys = f.keystore.clone();
        let (_, n) = tokio::task::spawn_blocking(move || {
            snapshot::write(
                &dir,
                &meta,
                &capture.entities,
                &capture.blocked,
                capture.floor,
                keys.as_deref(),
            )
        })
        .await??;
        let state: &PartitionState = &f.partitions[partition as usize];
        state.snapshot.store(capture.offset.0, Ordering::Release);
        // For monitoring tools only: a failure does not fail the round.
        if let Err(e) = f.bus.commit(partition, capture.offset).await {
            tracing::warn!(partition, error = %e, "cannot commit the snapshot offset to the group");
        }
        Ok(n)
    }

    /// Snapshots one partition whose applier has stopped at `offset`
    /// (handing it over), in a round of its own.
    pub async fn hand_over(&mut self, partition: u32, offset: Offset) -> anyhow::Result<u64> {
        let round = self.next_round;
        self.next_round += 1;
        let capture = Capture {
            offset,
            entities: self.fabric.store.shard_entities(partition),
            blocked: self.fabric.store.blocked_in(partition),
            floor: self.fabric.store.floor(partition),
        };
        let n = self
            .write(round, partition, &Checkpoints::default(), capture)
            .await?;
        let keep = self.fabric.config().snapshot.keep;
        let dir = self.fabric.snapshot_dir.clone();
        tokio::task::spawn_blocking(move || snapshot::prune(&dir, keep)).await??;
        Ok(n)
    }
}

/// The durable position of each source, for status output.
pub fn durable_positions(f: &Fabric) -> BTreeMap<String, Option<Position>> {
    f.sources()
        .iter()
        .map(|s| (s.name.to_string(), s.durable.borrow().clone()))
        .collect()
}

/// The file beside the snapshots that says what each source read when its
/// checkpoint in the newest round was taken (embedded bus).
const READINGS_FILE: &str = "source-readings.json";

/// Writes what the sources of the newest round's checkpoints read
/// (atomically: a temporary file renamed over the old one).
fn write_readings(
    dir: &Path,
    readings: &BTreeMap<String, crate::config::plan::Reading>,
) -> anyhow::Result<()> {
    let tmp = dir.join(format!("{READINGS_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(readings)?)?;
    std::fs::rename(&tmp, dir.join(READINGS_FILE))?;
    Ok(())
}

/// What each source read when its restored checkpoint was taken (empty
/// when no round wrote the file yet, or it cannot be read: then every
/// checkpoint is trusted, as before the file existed).
pub fn read_readings(dir: &Path) -> BTreeMap<String, crate::config::plan::Reading> {
    match std::fs::read(dir.join(READINGS_FILE)) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(file = READINGS_FILE, error = %e, "unreadable; every restored checkpoint is trusted");
            BTreeMap::new()
        }),
        Err(_) => BTreeMap::new(),
    }
}
