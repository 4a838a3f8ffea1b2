//! Wiring: restore, tasks, snapshot rounds, acknowledgement, shutdown.
//!
//! Start-up (embedded bus): load snapshots into the store, rebuild the
//! router's link index from them, start one applier per partition, the
//! router, the sources (each resuming from its restored checkpoint), the
//! snapshot timer and the servers. On Kafka, partitions and sources start
//! as the members topic assigns them to this process ([`cluster`]).
//!
//! Shutdown (SIGINT/SIGTERM or the caller's token): stop the sources, let
//! the router drain what they sent, take a final snapshot round (embedded:
//! it waits until the appliers applied everything routed; Kafka: it takes
//! what is applied, and the sources' last checkpoints are written first),
//! close the bus, say on the members topic that this process leaves, stop
//! the servers. A crash instead of a shutdown loses nothing: the sources
//! resume from the last acknowledged checkpoint and apply is idempotent.

pub mod applier;
pub mod checkpoints;
pub mod cluster;
pub mod reload;
pub mod snapshots;
pub mod state;

use crate::bus::embedded::EmbeddedBus;
use crate::bus::kafka::{KafkaBus, KafkaBusConfig};
use crate::bus::members::{self, Membership, Ownership};
use crate::bus::{Bus, Offset};
use crate::config::{BusKind, Config, SourceKind};
use crate::event::Position;
use crate::publish::EntityPublisher;
use crate::router::Router;
use crate::sources::grpc_push::PushRegistry;
use crate::sources::{SourceContext, SourceStatus, TxnEnvelope};
use crate::store::Store;
use crate::telemetry::{DeadLetters, Metrics};
use crate::view::Views;
use anyhow::Context;
use applier::PartitionState;
use parking_lot::Mutex;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// One configured source at run time.
pub struct SourceRuntime {
    pub name: Arc<str>,
    pub kind: SourceKind,
    pub status: Arc<SourceStatus>,
    /// The position acknowledged to the source.
    pub durable: watch::Sender<Option<Position>>,
}

impl SourceRuntime {
    pub fn new(s: &crate::config::SourceConfig) -> SourceRuntime {
        SourceRuntime {
            name: s.name.as_str().into(),
            kind: s.kind,
            status: Arc::new(SourceStatus::default()),
            // Nothing is acknowledged until this process wrote `keep` rounds:
            // the restored checkpoint may sit in the newest file only.
            durable: watch::channel(None).0,
        }
    }
}

/// What the servers see of the running fabric.
pub struct Fabric {
    /// The running config; a live reload swaps it (see [`reload`]).
    config: arc_swap::ArcSwap<Config>,
    pub store: Arc<Store>,
    pub bus: Arc<dyn Bus>,
    pub metrics: Arc<Metrics>,
    pub dead_letters: Arc<DeadLetters>,
    /// Where snapshots are written and read.
    pub snapshot_dir: std::path::PathBuf,
    /// On Kafka: this process's member id, and the members it sees (set
    /// once it has joined).
    pub member_id: String,
    pub members: std::sync::OnceLock<watch::Receiver<members::MemberView>>,
    /// The configured sources; a live reload swaps the list.
    sources: arc_swap::ArcSwap<Vec<Arc<SourceRuntime>>>,
    pub partitions: Vec<Arc<PartitionState>>,
    /// Every entity type's compiled views; a live reload swaps them.
    views: arc_swap::ArcSwap<Views>,
    /// The key of `hash` masks, for views compiled by a reload.
    pub mask_key: Option<crate::view::MaskKey>,
    pub push: PushRegistry,
    /// Per source, the routed checkpoint (see [`Router::checkpoints`]).
    pub routed: Mutex<BTreeMap<Arc<str>, Option<Position>>>,
    /// How far each source is on the bus, per partition, for reads with
    /// minimum positions (see [`crate::freshness`]).
    pub frontiers: crate::freshness::Frontiers,
    /// Reads of entities straight from their sources (see [`crate::fetch`]).
    pub fetcher: crate::fetch::Fetcher,
    /// The store may hold rows of a source that starts over: entities were
    /// restored from snapshots, or (Kafka) the appliers replay the changes
    /// topic from the snapshot offsets, which may bring back rows of runs
    /// whose snapshots never held a checkpoint of that source.
    pub store_may_hold_rows: bool,
    /// False until restore is done and every task runs.
    pub ready: std::sync::atomic::AtomicBool,
    /// Fires when the servers stop: long-lived streams end with it.
    pub streams_stop: CancellationToken,
    /// Who may call what (`[access]`); None: everyone, everything.
    pub access: Option<crate::access::Access>,
    /// With `[snapshot.encryption]`: the per-entity keys of snapshot files.
    pub keystore: Option<Arc<crate::store::keystore::KeyStore>>,
    /// Erasures applied (for the calls that asked) and snapshot rounds
    /// they ask for (see [`crate::erase`]).
    pub erasures: Arc<crate::erase::Erasures>,
    /// Embedded bus: the blocked ids' own file (see [`crate::store::blocked`]).
    pub blocked_file: Option<Arc<crate::store::blocked::BlockedFile>>,
    /// Asks the main task to reload the config file (see [`reload`]).
    pub reloads: mpsc::UnboundedSender<reload::Request>,
}

impl Fabric {
    /// The running config.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The running config's views.
    pub fn views(&self) -> Arc<Views> {
        self.views.load_full()
    }

    /// The running config's sources.
    pub fn sources(&self) -> Arc<Vec<Arc<SourceRuntime>>> {
        self.sources.load_full()
    }

    /// The source named `name`.
    pub fn source(&self, name: &str) -> Option<Arc<SourceRuntime>> {
        self.sources
            .load()
            .iter()
            .find(|s| *s.name == *name)
            .cloned()
    }

    /// Allows a gRPC call to do `action`, or refuses it (see
    /// [`crate::access`]). Calls forwarded by another process of the fabric
    /// carry their caller's credentials and are checked the same way.
    pub fn allow<T>(
        &self,
        request: &tonic::Request<T>,
        method: &'static str,
        action: crate::access::Action<'_>,
    ) -> Result<(), tonic::Status> {
        match &self.access {
            None => Ok(()),
            Some(a) => a.check(request, method, action),
        }
    }
}

impl Fabric {
    /// As [`Fabric::allow`], for calls that are audited even when allowed:
    /// returns who the caller is (`anonymous` without an `[access]` section).
    pub fn allow_named<T>(
        &self,
        request: &tonic::Request<T>,
        method: &'static str,
        action: crate::access::Action<'_>,
    ) -> Result<String, tonic::Status> {
        match &self.access {
            None => Ok("anonymous".into()),
            Some(a) => a.check_named(request, method, action).map(str::to_string),
        }
    }

    /// A partition being rebuilt here starts from the state topic, which
    /// holds its blocked ids as of every forget answered: reads may then be
    /// answered from the sources meanwhile (a staleness bound, on-access
    /// types) without serving an entity whose forget the replay has not
    /// reached yet. Without the state topic, they wait for the rebuild.
    pub fn rebuilt_from_state(&self) -> bool {
        let config = self.config();
        config.bus.kind == BusKind::Kafka
            && config.bus.kafka.as_ref().is_some_and(|k| k.state_topic)
    }

    /// Refreshes the gauges computed from live state, then renders `/metrics`.
    pub fn render_metrics(&self) -> String {
        let m = &self.metrics;
        for e in &self.config().entities {
            let label = crate::telemetry::TypeLabel {
                entity_type: e.name.clone(),
            };
            m.entities
                .get_or_create(&label)
                .set(self.store.entity_count(&e.name) as i64);
            m.blocked
                .get_or_create(&label)
                .set(self.store.blocked_count(&e.name) as i64);
        }
        for s in self.sources().iter() {
            m.source_lag
                .get_or_create(&Metrics::source(&s.name))
                .set(s.status.lag_millis() as f64 / 1000.0);
            m.source_caught_up
                .get_or_create(&Metrics::source(&s.name))
                .set(i64::from(s.status.caught_up()));
            let txns = s
                .status
                .transactions
                .load(std::sync::atomic::Ordering::Relaxed);
            let c = m
                .source_transactions
                .get_or_create(&Metrics::source(&s.name));
            let have = c.get();
            if txns > have {
                c.inc_by(txns - have);
            }
        }
        for (p, st) in self.partitions.iter().enumerate() {
            let applied = st.applied.load(std::sync::atomic::Ordering::Acquire);
            // A partition another process holds is no lag of this one.
            let end = if st.owned.load(std::sync::atomic::Ordering::Acquire) {
                self.bus.end_offset(p as u32).0
            } else {
                applied
            };
            m.bus_lag
                .get_or_create(&crate::telemetry::PartitionLabel {
                    partition: p.to_string(),
                })
                .set(end.saturating_sub(applied) as i64);
        }
        m.render()
    }
}

/// Runs the fabric until `shutdown` fires; returns after a clean shutdown.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let exposed = config.beyond_loopback();
    if config.access.is_none() && !exposed.is_empty() {
        // Validation refuses this unless the config says so: say it again at every start.
        tracing::warn!(
            addresses = ?exposed,
            "server.insecure = true: listening beyond loopback with no [access] section; every \
             client may read every entity and reload the config"
        );
    }
    let metrics = Arc::new(Metrics::new());
    let partitions = config.bus.partitions;
    let kafka_mode = config.bus.kind == BusKind::Kafka;
    let entity_types: Vec<&str> = config.entities.iter().map(|e| e.name.as_str()).collect();
    let store = Arc::new(
        Store::new(partitions, &entity_types, config.server.watch_buffer)
            .with_history(config.entities.iter().map(|e| (e.name.as_str(), e.history)))
            .with_lineage(
                config
                    .entities
                    .iter()
                    .filter(|e| e.lineage)
                    .map(|e| e.name.as_str()),
            ),
    );
    store.set_retention(config.retention());
    let dead_letters = Arc::new(
        DeadLetters::new(
            &config.resolve(&config.dlq.file),
            config.dlq.keep_last,
            metrics.clone(),
        )
        .rotating(config.dlq.max_file_bytes, config.dlq.keep_files),
    );

    // Before anything slow: a missing key is a start-up error.
    let mask_key = crate::view::MaskKey::load(&config)?;

    if let Some(demo) = &config.demo {
        let dir = config.resolve(&demo.dir);
        if crate::demo::ensure(&dir, demo.customers)
            .await
            .with_context(|| format!("cannot create the demo databases in {}", dir.display()))?
        {
            tracing::info!(dir = %dir.display(), customers = demo.customers, "demo databases created");
        }
    }

    // Restore. On Kafka, partitions are restored one by one as the group
    // assigns them, and sources resume from the checkpoints topic.
    // On Kafka, snapshots live in a directory per changes topic: their
    // offsets mean nothing on another topic (another prefix, or the
    // embedded bus), so they must never be restored against one.
    let snap_dir = match (&config.bus.kafka, kafka_mode) {
        (Some(k), true) => config
            .resolve(&config.snapshot.dir)
            .join(k.topic("changes")),
        _ => config.resolve(&config.snapshot.dir),
    };
    let keystore = match &config.snapshot.encryption {
        Some(enc) => Some(Arc::new(open_keystore(&config, enc, partitions).await?)),
        None => None,
    };
    let restored = {
        let store = store.clone();
        let dir = snap_dir.clone();
        let keys = keystore.clone();
        if kafka_mode {
            tokio::task::spawn_blocking(move || snapshots::next_round(&dir, partitions)).await??
        } else {
            tokio::task::spawn_blocking(move || {
                snapshots::restore(&dir, &store, partitions, keys.as_deref())
            })
            .await??
        }
    };
    // Embedded bus: the blocked ids' own file wins over what the snapshots
    // restored said (they may be older than a forget, or unreadable).
    let blocked_file =
        (!kafka_mode).then(|| Arc::new(crate::store::blocked::BlockedFile::new(&snap_dir)));
    if let Some(file) = &blocked_file {
        let (file, store, keys) = (file.clone(), store.clone(), keystore.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let Some(ids) = file.load().map_err(|e| {
                anyhow::anyhow!(
                    "{e}: the ids of forgotten entities cannot be read; restore the file, or \
                     remove it to rely on the blocked ids in the snapshot files"
                )
            })?
            else {
                return Ok(());
            };
            let n = ids.len();
            if let Some(ks) = &keys {
                ks.drop_keys(ids.iter().map(|(k, _)| k))?;
            }
            let evicted = store.set_blocked(ids);
            tracing::info!(
                blocked = n,
                evicted,
                "blocked ids of forgotten entities restored"
            );
            Ok(())
        })
        .await??;
    }
    // Embedded bus: rows of tables and types the config no longer has
    // (removed while stopped, or by a reload whose truncates no snapshot
    // held yet) are not served.
    if !kafka_mode && restored.entities > 0 {
        let (store, cfg) = (store.clone(), config.clone());
        let (changed, dropped) = tokio::task::spawn_blocking(move || {
            store.drop_unconfigured(|ty, table| {
                cfg.entity(ty).is_some_and(|e| e.table(table).is_some())
            })
        })
        .await?;
        if changed + dropped > 0 {
            tracing::warn!(
                changed,
                dropped,
                "restored entities held tables the config no longer has: those rows were dropped"
            );
        }
    }
    // Embedded bus: a source whose reading changed while the fabric was
    // stopped (a table added, another database) cannot resume a checkpoint
    // that never covered it: it starts over.
    let mut restored = restored;
    if !kafka_mode {
        let dir = snap_dir.clone();
        let readings = tokio::task::spawn_blocking(move || snapshots::read_readings(&dir)).await?;
        for (name, was) in &readings {
            let Some(now) = crate::config::plan::Reading::of(&config, name) else {
                continue;
            };
            let snapshots = config
                .source(name)
                .is_none_or(|s| s.initial_snapshot != Some(false));
            if !was.covers(&now) && !snapshots {
                tracing::warn!(
                    source = %name,
                    "the source reads other tables, or from another place, than when its checkpoint \
                     was taken, and initial_snapshot = false: it resumes, and the rows its new tables \
                     held before are not read"
                );
            } else if !was.covers(&now) && restored.checkpoints.0.remove(name).is_some() {
                tracing::warn!(
                    source = %name,
                    "the source reads other tables, or from another place, than when its checkpoint \
                     was taken: it starts over (an initial snapshot replacing its rows)"
                );
            }
        }
    }
    let mut router = Router::new(&config, partitions, &restored.checkpoints);
    router.learn_links_from(&store);

    let views = Views::compile(&config, mask_key.as_ref(), 0);
    let (bus, kafka): (Arc<dyn Bus>, Option<KafkaParts>) =
        match (config.bus.kind, &config.bus.kafka) {
            (BusKind::Kafka, Some(k)) => {
                // The broker may come up after the fabric (or be restarting):
                // wait for it, saying so, until it answers or shutdown comes.
                // A broker that answers but slowly (overloaded, recovering)
                // gets longer for each attempt: a fixed bound would start
                // over, from nothing, every time it is just missed.
                let mut backoff = Duration::from_secs(1);
                let mut patience = Duration::from_secs(10);
                loop {
                    let attempt = tokio::time::timeout(
                        patience,
                        connect_kafka(k, &config, &views, &dead_letters),
                    );
                    let failure = tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        r = attempt => match r {
                            Ok(Ok(parts)) => break (parts.bus.clone() as Arc<dyn Bus>, Some(parts)),
                            Ok(Err(crate::bus::BusError::Mismatch(m))) => anyhow::bail!("{m}"),
                            Ok(Err(e)) => e.to_string(),
                            Err(_) => format!("no answer within {}s", patience.as_secs()),
                        },
                    };
                    tracing::warn!(
                        brokers = %k.brokers,
                        error = %failure,
                        retry_in_ms = backoff.as_millis() as u64,
                        "cannot reach kafka; retrying"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    patience = (patience * 2).min(Duration::from_secs(60));
                }
            }
            _ => (
                Arc::new(EmbeddedBus::new(
                    partitions,
                    config.bus.embedded.max_buffered,
                    &restored.offsets,
                )),
                None,
            ),
        };
    let publisher = kafka.as_ref().and_then(|k| k.publisher.clone());
    // librdkafka's destructors wait for the broker (a commit in flight, a
    // consumer leaving, undelivered messages): with the broker away, the
    // process would hang after `run` returns. They are never destroyed: the
    // process is ending, its OS reclaims them.
    let _never_destroyed = NeverDestroyed(vec![
        Box::new(bus.clone()),
        Box::new(publisher.clone()),
        Box::new(dead_letters.clone()),
        Box::new(
            kafka
                .as_ref()
                .map(|k| (k.checkpoints.clone(), k.state.clone())),
        ),
    ]);

    let push = PushRegistry::default();
    let sources: Vec<Arc<SourceRuntime>> = config
        .sources
        .iter()
        .map(|s| Arc::new(SourceRuntime::new(s)))
        .collect();
    let routed: BTreeMap<Arc<str>, Option<Position>> = sources
        .iter()
        .map(|s| (s.name.clone(), restored.checkpoints.get(&s.name).cloned()))
        .collect();
    let fetcher = crate::fetch::Fetcher::new(&config).map_err(|e| anyhow::anyhow!(e))?;
    if config.entities.iter().any(|e| e.on_access()) {
        store.for_each(|e| fetcher.restored(e));
    }
    // What the restored entities reflect is reached already, at the offsets
    // the partitions resume from.
    let frontiers = crate::freshness::Frontiers::default();
    frontiers.reached(routed.iter(), &restored.offsets);
    let (erasures, mut round_requests) = crate::erase::Erasures::new();
    let (reloads, mut reload_requests) = mpsc::unbounded_channel::<reload::Request>();
    let fabric = Arc::new(Fabric {
        reloads,
        blocked_file,
        keystore,
        erasures: Arc::new(erasures),
        access: config
            .access
            .as_ref()
            .map(|a| crate::access::Access::new(a, &metrics)),
        config: arc_swap::ArcSwap::new(config.clone()),
        store: store.clone(),
        bus: bus.clone(),
        metrics: metrics.clone(),
        dead_letters: dead_letters.clone(),
        snapshot_dir: snap_dir.clone(),
        member_id: config
            .bus
            .kafka
            .as_ref()
            .map(|k| k.instance_id(&snap_dir))
            .unwrap_or_default(),
        members: std::sync::OnceLock::new(),
        sources: arc_swap::ArcSwap::from_pointee(sources),
        partitions: (0..partitions)
            .map(|p| {
                Arc::new(PartitionState {
                    applied: restored.offsets[p as usize].into(),
                    snapshot: restored.offsets[p as usize].into(),
                    owned: false.into(),
                    ready_at: 0.into(),
                    advanced: tokio::sync::Notify::new(),
                    rebuild: Default::default(),
                })
            })
            .collect(),
        views: arc_swap::ArcSwap::from_pointee(views),
        mask_key,
        push: push.clone(),
        routed: Mutex::new(routed),
        frontiers,
        fetcher,
        store_may_hold_rows: restored.entities > 0 || kafka_mode,
        ready: false.into(),
        streams_stop: CancellationToken::new(),
    });

    // Freed memory back to the system once the appliers go quiet.
    {
        let f = fabric.clone();
        tokio::spawn(crate::memory::watch(Duration::from_secs(2), move || {
            f.partitions
                .iter()
                .map(|p| p.applied.load(std::sync::atomic::Ordering::Relaxed))
                .sum()
        }));
    }

    // Router.
    let (txn_tx, txn_rx) = mpsc::channel::<TxnEnvelope>(1024);
    let (router_ctl, router_ctl_rx) = mpsc::unbounded_channel();
    let mut router_task = tokio::spawn(route_loop(router, txn_rx, router_ctl_rx, fabric.clone()));
    let mut router_done = false;

    // Appliers and snapshots.
    let mut snapshotter = snapshots::Snapshotter {
        fabric: fabric.clone(),
        requests: (0..partitions).map(|_| None).collect(),
        next_round: restored.next_round,
        written: VecDeque::new(),
        acknowledges: !kafka_mode,
        router: (!kafka_mode).then(|| router_ctl.clone()),
    };
    let (mut owned_partitions, mut applier_failures) =
        cluster::Partitions::new(fabric.clone(), publisher.clone(), router_ctl.clone());
    let router_ctl_for_reload = router_ctl.clone();
    let mut owned_sources = cluster::Sources::new(fabric.clone(), push.clone(), txn_tx, router_ctl);
    let mut side = JoinSet::new();
    let mut membership: Option<Membership> = None;
    let (mut partition_events, mut source_events) = match &kafka {
        None => {
            for p in 0..partitions {
                let from = Offset(restored.offsets[p as usize]);
                owned_partitions.start(&mut snapshotter, p, from, Offset(0), Offset(0));
            }
            for s in &config.sources {
                let resume = restored.checkpoints.get(&s.name).cloned();
                owned_sources.start(&s.name, resume, false);
            }
            (None, None)
        }
        Some(k) => {
            let kc = config.bus.kafka.as_ref().expect("kafka mode");
            owned_partitions.state_topic = k.state.clone();
            owned_sources.state_topic = k.state.clone();
            let (flush_tx, flush_rx) = mpsc::unbounded_channel();
            owned_sources.checkpoints = Some(k.checkpoints.clone());
            owned_sources.writer = Some(flush_tx);
            side.spawn(cluster::checkpoint_writer(
                fabric.clone(),
                k.checkpoints.clone(),
                owned_sources.owned.clone(),
                flush_rx,
                fabric.streams_stop.clone(),
            ));
            for s in fabric.sources().iter() {
                s.status.set_state("elsewhere"); // Until this process is given it.
            }
            let member = fabric.member_id.clone();
            let (m, (partition_events, source_events)) = Membership::join(
                &crate::bus::kafka::client_config(&kc.brokers, &kc.properties),
                kc.replication,
                members::MemberSettings {
                    member: member.clone(),
                    grpc: config.advertise_addr(),
                    topic: kc.topic("members"),
                    partitions,
                    sources: config.sources.iter().map(|s| s.name.clone()).collect(),
                    session_timeout: kc.session_timeout(),
                },
            )
            .await?;
            tracing::info!(member, topic = %kc.topic("members"), "joined the fabric's members; waiting for assignments");
            let _ = fabric.members.set(m.view.clone());
            membership = Some(m);
            (Some(partition_events), Some(source_events))
        }
    };

    // Demo mutator.
    let sources_stop = owned_sources.stop.clone();
    if let Some(demo) = config.demo.clone()
        && demo.mutations_per_second > 0.0
    {
        let dir = config.resolve(&demo.dir);
        let stop = sources_stop.clone();
        side.spawn(async move {
            match crate::demo::mutate(&dir, demo.mutations_per_second, stop).await {
                Ok(n) => tracing::info!(transactions = n, "demo mutator stopped"),
                Err(e) => tracing::error!(error = %e, "demo mutator failed"),
            }
        });
    }

    // Sync-on-access entities dropped from memory when idle or over bound.
    side.spawn(crate::fetch::evict_loop(
        fabric.clone(),
        sources_stop.clone(),
    ));

    // Servers.
    let servers_stop = fabric.streams_stop.clone();
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let grpc = crate::grpc::serve(
        fabric.clone(),
        config.grpc_addr(),
        health_service,
        servers_stop.clone(),
    )
    .await?;
    side.spawn(async move {
        if let Err(e) = grpc.await {
            tracing::error!(error = %e, "grpc server failed");
        }
    });
    let admin =
        crate::admin::serve(fabric.clone(), config.admin_addr(), servers_stop.clone()).await?;
    side.spawn(async move {
        if let Err(e) = admin.await {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    crate::grpc::set_serving(&health_reporter, true).await;
    fabric
        .ready
        .store(true, std::sync::atomic::Ordering::Release);
    tracing::info!(
        grpc = %config.grpc_addr(),
        admin = %config.admin_addr(),
        partitions,
        entities = restored.entities,
        "fabric running"
    );

    // SIGHUP reloads the config file.
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                let tx = fabric.reloads.clone();
                let stop = fabric.streams_stop.clone();
                side.spawn(async move {
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            s = hup.recv() => {
                                if s.is_none() || tx.send(None).is_err() {
                                    return;
                                }
                                tracing::info!("SIGHUP: reloading the config file");
                            }
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with POST /config/reload")
            }
        }
    }

    // Snapshot timer and ownership changes.
    let mut tick = tokio::time::interval(config.snapshot_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    // Sources that wait for this process's partitions to catch up.
    let mut deferred_tick = tokio::time::interval(Duration::from_millis(50));
    deferred_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = deferred_tick.tick(), if owned_sources.deferred() => {
                tokio::select! {
                    r = owned_sources.retry_deferred() => r?,
                    _ = shutdown.cancelled() => break,
                }
            }
            Some(ev) = recv_event(&mut partition_events) => match ev {
                Ownership::Assigned(owned) => {
                    // Restoring waits for the broker: shutdown must not wait behind it.
                    tokio::select! {
                        r = owned_partitions.assigned(&mut snapshotter, &owned) => r?,
                        _ = shutdown.cancelled() => break,
                    }
                }
                Ownership::Revoked { items, done } => {
                    // Handing over may wait for a broker that is away.
                    tokio::select! {
                        _ = owned_partitions.revoked(&mut snapshotter, &items) => {
                            let _ = done.send(());
                        }
                        _ = shutdown.cancelled() => break,
                    }
                }
            },
            Some(ev) = recv_event(&mut source_events) => match ev {
                Ownership::Assigned(owned) => {
                    tokio::select! {
                        r = owned_sources.assigned(&owned) => r?,
                        _ = shutdown.cancelled() => break,
                    }
                }
                Ownership::Revoked { items, done } => {
                    tokio::select! {
                        _ = owned_sources.revoked(&items) => {
                            let _ = done.send(());
                        }
                        _ = shutdown.cancelled() => break,
                    }
                }
            },
            _ = tick.tick() => {
                // A round waits for the appliers, which may wait for a broker
                // that is away: shutdown must not wait behind it.
                tokio::select! {
                    r = snapshotter.round() => if let Err(e) = r {
                        tracing::error!(error = %e, "snapshot round failed; the next one retries");
                    },
                    _ = shutdown.cancelled() => break,
                }
            }
            Some(reply) = reload_requests.recv() => {
                let answer = tokio::select! {
                    a = reload::apply(&fabric, &mut owned_sources, &router_ctl_for_reload, &mut snapshotter) => a,
                    _ = shutdown.cancelled() => break,
                };
                if let Some(reply) = reply {
                    let _ = reply.send(answer);
                }
            }
            Some(first) = round_requests.recv() => {
                // Forgets asking for a round (see crate::erase): every one
                // waiting now is answered by one round.
                let mut waiting = vec![first];
                while let Ok(more) = round_requests.try_recv() {
                    waiting.push(more);
                }
                let written = tokio::select! {
                    r = snapshotter.round() => match r {
                        Ok(_) => true,
                        Err(e) => {
                            tracing::error!(error = %e, "snapshot round asked for by a forget failed");
                            false
                        }
                    },
                    _ = shutdown.cancelled() => break,
                };
                for w in waiting {
                    let _ = w.send(written);
                }
            }
            res = &mut router_task, if !router_done => {
                router_done = true;
                match res {
                    // Every source stopped: nothing more to route, reads go on.
                    Ok(Ok(())) => tracing::warn!("every source has stopped; serving what is held"),
                    Ok(Err(e)) => anyhow::bail!("the router failed: {e}"),
                    Err(e) => anyhow::bail!("the router panicked: {e}"),
                }
            }
            Some((p, e)) = applier_failures.recv() => {
                anyhow::bail!("the applier of partition {p} failed: {e}");
            }
        }
    }

    tracing::info!("shutting down: stopping sources");
    crate::grpc::set_serving(&health_reporter, false).await;
    // No more hand-overs: a revoke from now on is answered by leaving.
    drop(partition_events.take());
    drop(source_events.take());
    // Drain and take the final snapshot, within `server.shutdown_timeout`:
    // with the broker away this could wait for ever, and stopping without
    // a final snapshot loses nothing (the next start replays from the last one).
    let grace = config.shutdown_timeout();
    let drained = tokio::time::timeout(grace, async {
        let ran = owned_sources.running();
        owned_sources.stop_all().await;
        if !router_done {
            match (&mut router_task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "the router failed while draining"),
                Err(e) => tracing::error!(error = %e, "the router panicked while draining"),
            }
        }
        // On Kafka, the sources' last checkpoints, for whoever runs them next.
        owned_sources.flush_checkpoints(ran).await;
        tracing::info!("taking the final snapshot");
        if let Err(e) = snapshotter.round().await {
            tracing::error!(error = %e, "final snapshot failed; the next start replays from the previous one");
        }
    })
    .await;
    if drained.is_err() {
        tracing::error!(
            timeout = ?grace,
            "could not drain and snapshot within server.shutdown_timeout (is the broker away?); \
             stopping without a final snapshot: the next start resumes from the previous one"
        );
        router_task.abort();
    }
    bus.close();
    owned_partitions.stop_all(Duration::from_secs(5)).await;
    if let Some(m) = membership {
        // Saying so lets the others take over at once instead of when this
        // process's lease runs out; the checkpoint writer had its last word.
        m.leave().await;
    }
    servers_stop.cancel();
    // The servers end once their streams have (every watch ends with the
    // stop); bounded all the same: a stop must stop.
    let ended = tokio::time::timeout(SERVERS_END_MAX, async {
        while side.join_next().await.is_some() {}
    })
    .await;
    if ended.is_err() {
        tracing::warn!(
            left = side.len(),
            waited = ?SERVERS_END_MAX,
            "servers or side tasks did not end after the stop (a client holding a stream open?); stopping anyway"
        );
        side.abort_all();
    }
    tracing::info!("stopped");
    Ok(())
}

/// Opens (or creates) the keystore of `[snapshot.encryption]`: keys in
/// `keys_dir` (on Kafka, per changes topic, as snapshots are), sealed under
/// the master key.
async fn open_keystore(
    config: &Config,
    enc: &crate::config::SnapshotEncryption,
    partitions: u32,
) -> anyhow::Result<crate::store::keystore::KeyStore> {
    // Default: `keys` beside the snapshot directory, not in it, so that a
    // copy of the snapshot directory does not carry the keys.
    let base = match &enc.keys_dir {
        Some(d) => config.resolve(d),
        None => {
            let snaps = config.resolve(&config.snapshot.dir);
            snaps
                .parent()
                .map_or_else(|| std::path::PathBuf::from("keys"), |p| p.join("keys"))
        }
    };
    let dir = match &config.bus.kafka {
        Some(k) if config.bus.kind == BusKind::Kafka => base.join(k.topic("changes")),
        _ => base,
    };
    let master = config.secret(
        "snapshot.encryption",
        enc.key_env.as_deref(),
        enc.key_file.as_deref(),
        &dir.join("master.key"),
    )?;
    let ks = tokio::task::spawn_blocking(move || {
        crate::store::keystore::KeyStore::open(&dir, &master, partitions).map(|ks| (ks, dir))
    })
    .await??;
    tracing::info!(dir = %ks.1.display(), keys = ks.0.len(), "snapshot keystore open");
    Ok(ks.0)
}

/// The next ownership change, or never when there is no membership.
async fn recv_event<T>(
    events: &mut Option<mpsc::UnboundedReceiver<Ownership<T>>>,
) -> Option<Ownership<T>> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// What Kafka mode adds: the bus itself, the entities publisher, the
/// checkpoints topic and the state topic.
#[derive(Clone)]
struct KafkaParts {
    bus: Arc<KafkaBus>,
    publisher: Option<Arc<EntityPublisher>>,
    checkpoints: Arc<checkpoints::CheckpointTopic>,
    state: Option<Arc<state::StateTopic>>,
}

/// Connects the Kafka bus, the entities topic, the dead-letter topic and
/// the checkpoints topic, creating the topics that are missing.
async fn connect_kafka(
    k: &crate::config::KafkaConfig,
    config: &Config,
    views: &Views,
    dead_letters: &Arc<DeadLetters>,
) -> Result<KafkaParts, crate::bus::BusError> {
    let bus = KafkaBus::connect(
        KafkaBusConfig::from_config(k, config.bus.partitions),
        Some(dead_letters.clone()),
    )
    .await?;
    tracing::info!(brokers = %k.brokers, topic = %k.topic("changes"), "kafka bus connected");
    let publisher = if k.entities_topic {
        Some(Arc::new(
            EntityPublisher::connect(k, config, views, dead_letters.clone()).await?,
        ))
    } else {
        None
    };
    if k.dlq_topic {
        let client = crate::bus::kafka::client_config(&k.brokers, &k.properties);
        crate::bus::kafka::ensure_topic(&client, &k.topic("dlq"), 1, k.replication, &[]).await?;
        dead_letters.attach_topic(crate::telemetry::DlqTopic {
            producer: crate::bus::kafka::durable_producer(&client)?,
            topic: k.topic("dlq"),
        });
    }
    let checkpoints = checkpoints::CheckpointTopic::connect(k).await?;
    let state = if k.state_topic {
        Some(Arc::new(
            state::StateTopic::connect(
                k,
                config.bus.partitions,
                config
                    .entities
                    .iter()
                    .filter(|e| e.on_access())
                    .map(|e| Arc::from(e.name.as_str()))
                    .collect(),
            )
            .await?,
        ))
    } else {
        None
    };
    Ok(KafkaParts {
        bus: Arc::new(bus),
        publisher,
        checkpoints: Arc::new(checkpoints),
        state,
    })
}

/// What the rest of the fabric asks of the router task.
pub enum RouterControl {
    /// Learn the links these entities hold (a partition was restored here).
    LearnLinks(Vec<Arc<crate::store::Entity>>),
    /// These sources start here (again): forget what the index holds of
    /// their tables ([`Router::forget_links_of`]) and learn the links these
    /// entities hold, in one step of the router (the sources still running
    /// here are never routed by an index between the two).
    Relearn {
        sources: Vec<Arc<str>>,
        entities: Vec<Arc<crate::store::Entity>>,
    },
    /// A source starts here from this checkpoint (the group gave it to
    /// this process): the router's checkpoint of it starts there too.
    Resume(Arc<str>, Option<Position>),
    /// Answer once everything routed so far is on the bus and the
    /// checkpoints after it are published.
    Flush(tokio::sync::oneshot::Sender<()>),
    /// Answer once everything routed so far is on the bus, with the
    /// checkpoints after it, then route nothing more until the answer's
    /// `resume` is sent or dropped: a snapshot round's cut (embedded bus).
    Cut(tokio::sync::oneshot::Sender<Cut>),
    /// A live reload: route by `config` from now on, forget the
    /// checkpoints of `forget`, put truncates of `drop` on the bus, and
    /// answer once they are there.
    Reconfigure {
        config: Arc<Config>,
        forget: Vec<Arc<str>>,
        drop: Vec<crate::config::plan::DroppedTable>,
        done: tokio::sync::oneshot::Sender<()>,
    },
}

/// The router stands still at a point every partition is captured at:
/// each source transaction is then wholly in a snapshot round or wholly
/// after it (a row moved from one entity to another is never in neither or
/// both of the files), and the router's index rebuilt from the files is the
/// one it had at `checkpoints`.
pub struct Cut {
    pub checkpoints: BTreeMap<Arc<str>, Option<Position>>,
    pub resume: tokio::sync::oneshot::Sender<()>,
}

/// The longest the router stands still for a snapshot round's cut; past it,
/// routing goes on (the round's files may then not be one cut).
const CUT_PAUSE_MAX: Duration = Duration::from_secs(10);

/// Transactions the router may have on their way to the bus at once.
const MAX_IN_FLIGHT: usize = 4096;

/// How long a stop waits for the servers and side tasks to end once told.
const SERVERS_END_MAX: Duration = Duration::from_secs(10);

/// What becomes true once a transaction's records are on the bus: the
/// router's checkpoints after it, and the sender's notice.
type Landed = (
    Result<Vec<Offset>, crate::bus::BusError>,
    Vec<u32>,
    BTreeMap<Arc<str>, Option<Position>>,
    Option<tokio::sync::oneshot::Sender<()>>,
);

/// Publishes the checkpoints after records have landed, with where they
/// end per partition (`ends`, kept by the router task) for reads that wait
/// for positions.
fn landed(f: &Fabric, checkpoints: BTreeMap<Arc<str>, Option<Position>>, ends: &[u64]) {
    // Dead letters of what these checkpoints pass are on disk first.
    f.dead_letters.sync();
    f.frontiers.reached(checkpoints.iter(), ends);
    publish_checkpoints(f, checkpoints);
}

/// The router task: routes each transaction, hands its records to the bus,
/// and publishes the checkpoints after it once the bus has them (never
/// before). Up to [`MAX_IN_FLIGHT`] transactions are in flight at once, so
/// a bus that acknowledges over the network (Kafka) is not waited for one
/// transaction at a time; their acknowledgements are taken in order, so a
/// published checkpoint never passes a record the bus has not acknowledged.
#[tracing::instrument(skip_all)]
async fn route_loop(
    mut router: Router,
    mut rx: mpsc::Receiver<TxnEnvelope>,
    mut control: mpsc::UnboundedReceiver<RouterControl>,
    f: Arc<Fabric>,
) -> Result<(), crate::bus::BusError> {
    use futures::StreamExt;
    let mut sweep = tokio::time::interval(Duration::from_millis(500));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut in_flight: futures::stream::FuturesOrdered<
        futures::future::BoxFuture<'static, Landed>,
    > = futures::stream::FuturesOrdered::new();
    let mut open = true;
    let mut marker_last = false;
    // Per partition, the offset after the last record acknowledged.
    let mut ends: Vec<u64> = (0..f.bus.partitions())
        .map(|p| f.bus.end_offset(p).0)
        .collect();
    // A snapshot round waiting for its cut.
    let mut cut: Option<tokio::sync::oneshot::Sender<Cut>> = None;
    let kafka = f.config().bus.kind == BusKind::Kafka;
    loop {
        if in_flight.is_empty() {
            marker_last = false;
            if let Some(tx) = cut.take() {
                let checkpoints = router.checkpoints();
                landed(&f, checkpoints.clone(), &ends);
                let (resume, resumed) = tokio::sync::oneshot::channel();
                if tx
                    .send(Cut {
                        checkpoints,
                        resume,
                    })
                    .is_ok()
                    && tokio::time::timeout(CUT_PAUSE_MAX, resumed).await.is_err()
                {
                    tracing::warn!(
                        waited = ?CUT_PAUSE_MAX,
                        "a snapshot round's cut held the router too long; routing goes on"
                    );
                }
            }
        }
        if !open && in_flight.is_empty() {
            return Ok(());
        }
        let env = tokio::select! {
            biased;
            Some((acked, parts, checkpoints, on_routed)) = in_flight.next(), if !in_flight.is_empty() => {
                let acked = match acked {
                    Err(e @ crate::bus::BusError::TopicGone { .. }) => {
                        return held_for_a_lost_topic(e, rx, control, &f, &ends).await;
                    }
                    other => other?,
                };
                advance(&mut ends, parts, acked);
                landed(&f, checkpoints, &ends);
                if let Some(tx) = on_routed {
                    let _ = tx.send(());
                }
                continue;
            }
            Some(c) = control.recv() => {
                match c {
                    RouterControl::LearnLinks(entities) => router.learn_links(&entities),
                    RouterControl::Relearn { sources, entities } => {
                        router.forget_links_of(&sources);
                        router.learn_links(&entities);
                    }
                    RouterControl::Resume(source, position) => {
                        router.resume(&source, position.clone());
                        f.routed.lock().insert(source, position);
                    }
                    RouterControl::Reconfigure { config, forget, drop, done } => {
                        let mut records = Vec::new();
                        let now = crate::sources::now_micros();
                        for d in &drop {
                            let source: Arc<str> = d.source.as_str().into();
                            // The rows go at the position the source is at:
                            // no change of it is older than that.
                            let position = router
                                .checkpoints()
                                .get(&source)
                                .cloned()
                                .flatten()
                                .unwrap_or(Position::Snapshot(0));
                            for p in 0..f.bus.partitions() {
                                records.push((p, crate::event::BusRecord::Truncate(crate::event::TruncateTable {
                                    entity_type: d.entity_type.as_str().into(),
                                    table: d.table.as_str().into(),
                                    source: source.clone(),
                                    position: position.clone(),
                                    commit_micros: now,
                                })));
                            }
                        }
                        router.reconfigure(&config, &forget);
                        let checkpoints = router.checkpoints();
                        let parts: Vec<u32> = records.iter().map(|(p, _)| *p).collect();
                        let acked = if records.is_empty() { None } else { Some(f.bus.enqueue(records).await?) };
                        in_flight.push_back(Box::pin(async move {
                            let result = match acked {
                                Some(a) => a.await,
                                None => Ok(Vec::new()),
                            };
                            (result, parts, checkpoints, Some(done))
                        }));
                    }
                    RouterControl::Cut(tx) => cut = Some(tx),
                    RouterControl::Flush(done) => {
                        let checkpoints = router.checkpoints();
                        if in_flight.is_empty() {
                            landed(&f, checkpoints, &ends);
                            let _ = done.send(());
                        } else {
                            in_flight.push_back(Box::pin(async move { (Ok(Vec::new()), Vec::new(), checkpoints, Some(done)) }));
                        }
                    }
                }
                continue;
            }
            // Before new transactions, or a steady stream of them would
            // starve it (and links would never time out).
            _ = sweep.tick() => {
                // Deleted rows' positions go once nothing that old is read
                // again: on the embedded bus. On Kafka they stay, since a
                // partition restored here from an older point may hold a
                // row deleted since (docs/architecture.md, "Bounded").
                if !kafka {
                    let durable: std::collections::HashMap<Arc<str>, Position> = f
                        .sources()
                        .iter()
                        .filter_map(|s| s.durable.borrow().clone().map(|p| (s.name.clone(), p)))
                        .collect();
                    router.prune(|s| durable.get(s).cloned());
                }
                let dead = router.expire(std::time::Instant::now());
                f.metrics.router_pending_expired.inc_by(dead.len() as u64);
                for d in dead {
                    f.dead_letters.record(&d.source, &d.table, &d.reason, &d.raw);
                }
                f.metrics.router_pending.set(router.pending_len() as i64);
                let checkpoints = router.checkpoints();
                if in_flight.is_empty() {
                    landed(&f, checkpoints, &ends);
                } else if !marker_last {
                    // Queued behind what is in flight; one marker at a time
                    // (the next transaction or tick brings newer ones).
                    in_flight.push_back(Box::pin(async move { (Ok(Vec::new()), Vec::new(), checkpoints, None) }));
                    marker_last = true;
                }
                continue;
            }
            env = rx.recv(), if open && in_flight.len() < MAX_IN_FLIGHT && cut.is_none() => match env {
                Some(e) => e,
                None => {
                    open = false;
                    continue;
                }
            },
        };
        let routed = router.route(env.txn);
        for d in &routed.dead {
            f.dead_letters
                .record(&d.source, &d.table, &d.reason, &d.raw);
        }
        f.metrics.router_pending.set(router.pending_len() as i64);
        let checkpoints = router.checkpoints();
        let on_routed = env.on_routed;
        if routed.records.is_empty() && in_flight.is_empty() {
            landed(&f, checkpoints, &ends);
            if let Some(tx) = on_routed {
                let _ = tx.send(());
            }
            continue;
        }
        let parts: Vec<u32> = routed.records.iter().map(|(p, _)| *p).collect();
        let acked = if routed.records.is_empty() {
            None
        } else {
            match f.bus.enqueue(routed.records).await {
                Err(e @ crate::bus::BusError::TopicGone { .. }) => {
                    return held_for_a_lost_topic(e, rx, control, &f, &ends).await;
                }
                other => Some(other?),
            }
        };
        marker_last = false;
        in_flight.push_back(Box::pin(async move {
            let result = match acked {
                Some(a) => a.await,
                None => Ok(Vec::new()),
            };
            (result, parts, checkpoints, on_routed)
        }));
    }
}

/// Per partition, the offset after the last record acknowledged, moved on
/// by records acknowledged at `acked` in `parts`.
fn advance(ends: &mut [u64], parts: Vec<u32>, acked: Vec<Offset>) {
    for (p, o) in parts.into_iter().zip(acked) {
        let e = &mut ends[p as usize];
        *e = (*e).max(o.0 + 1);
    }
}

/// The changes topic lost a partition under the router (it was deleted,
/// or made again with fewer partitions): nothing more can be written, so
/// nothing more is routed or acknowledged to the sources (they wait on the
/// full channel and resume from their checkpoints after a restart), and
/// reads go on from what the partitions hold. Answers flushes, says so
/// every 10 s, and returns once the sources are gone (shutdown). If every
/// partition turns out to be there after all, at least as long as the
/// router wrote it (a broker's passing answer without them, not a
/// deletion), it returns the error: the process stops and its restart
/// resumes from its snapshots and the sources' checkpoints.
async fn held_for_a_lost_topic(
    e: crate::bus::BusError,
    rx: mpsc::Receiver<TxnEnvelope>,
    mut control: mpsc::UnboundedReceiver<RouterControl>,
    f: &Fabric,
    ends: &[u64],
) -> Result<(), crate::bus::BusError> {
    crate::bus::kafka::WRITES_HELD.inc();
    crate::bus::kafka::WRITES_HELD_NOW.inc();
    let said = || {
        tracing::error!(
            error = %e,
            "ingest stopped: the bus lost a topic or partition under the fabric; what is held is still served, nothing more is acknowledged to the sources. Stop the fabric and start it on a new topic_prefix (a rebuild from the sources), or restore the topic (docs/kafka.md, Faults)"
        )
    };
    said();
    let mut check = tokio::time::interval(Duration::from_millis(200));
    let mut last = std::time::Instant::now();
    loop {
        tokio::select! {
            Some(c) = control.recv() => {
                if let RouterControl::Flush(done) = c {
                    let _ = done.send(());
                }
            }
            _ = check.tick() => {
                if rx.is_closed() {
                    crate::bus::kafka::WRITES_HELD_NOW.dec();
                    return Ok(());
                }
                if last.elapsed() >= Duration::from_secs(10) {
                    last = std::time::Instant::now();
                    let mut whole = true;
                    for (p, end) in ends.iter().enumerate() {
                        match f.bus.log_end(p as u32).await {
                            Ok(o) if o.0 >= *end => {}
                            _ => {
                                whole = false;
                                break;
                            }
                        }
                    }
                    if whole {
                        crate::bus::kafka::WRITES_HELD_NOW.dec();
                        return Err(e);
                    }
                    said();
                }
            }
        }
    }
}

/// Values forgotten instead of dropped when this guard goes (see its use).
struct NeverDestroyed(Vec<Box<dyn std::any::Any + Send>>);

impl Drop for NeverDestroyed {
    fn drop(&mut self) {
        for v in self.0.drain(..) {
            std::mem::forget(v);
        }
    }
}

/// Makes `checkpoints` the routed checkpoints, never moving a source back:
/// a source that restarted re-sends from an older position, and the
/// checkpoints of those re-sent transactions are not news.
fn publish_checkpoints(f: &Fabric, checkpoints: BTreeMap<Arc<str>, Option<Position>>) {
    let mut routed = f.routed.lock();
    for (source, new) in checkpoints {
        let keep_old = match (routed.get(&source), &new) {
            (Some(Some(old)), Some(new)) => new < old,
            (Some(Some(_)), None) => true,
            _ => false,
        };
        if !keep_old {
            routed.insert(source, new);
        }
    }
}

/// When a failed source is started again: `first` after the first failure
/// (`reconnect_first`, 0.2 s), doubling to `max` (`reconnect_max`, 30 s)
/// while it keeps failing, and from `first` again once a run streamed (read
/// a transaction, or held for [`Reconnect::STREAMED`]), so an outage after
/// a good hour does not start at the longest wait.
#[derive(Debug)]
struct Reconnect {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Reconnect {
    /// A run this long held its connection: it streamed.
    const STREAMED: Duration = Duration::from_secs(10);

    fn new((first, max): (Duration, Duration)) -> Self {
        Reconnect {
            first,
            max,
            next: first,
        }
    }

    /// The wait before the next start, after a run that `streamed` or not.
    fn next(&mut self, streamed: bool) -> Duration {
        if streamed {
            self.next = self.first;
        }
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }
}

/// Runs one source, restarting it with backoff after retryable errors.
#[allow(clippy::too_many_arguments)]
#[tracing::instrument(skip_all, fields(source = %cfg.name))]
async fn supervise(
    cfg: crate::config::SourceConfig,
    config: Arc<Config>,
    push: PushRegistry,
    mut resume: Option<Position>,
    out: mpsc::Sender<TxnEnvelope>,
    durable: watch::Receiver<Option<Position>>,
    status: Arc<SourceStatus>,
    dead_letters: Arc<DeadLetters>,
    stop: CancellationToken,
    fabric: Arc<Fabric>,
    replaces: bool,
) {
    let name: Arc<str> = cfg.name.as_str().into();
    let mut backoff = Reconnect::new(cfg.reconnect());
    status.started();
    loop {
        status.set_state("starting");
        let (started, read_before) = (
            std::time::Instant::now(),
            status
                .transactions
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        let source = match crate::sources::build(&cfg, &config, &push) {
            Ok(s) => s,
            Err(e) => {
                status.set_state("failed");
                status.set_error(&e.to_string());
                tracing::error!(error = %e, "source cannot start");
                return;
            }
        };
        let mut ctx = SourceContext::new(
            name.clone(),
            resume.clone(),
            out.clone(),
            durable.clone(),
            status.clone(),
            dead_letters.clone(),
            stop.clone(),
        );
        ctx.store_may_hold_rows = fabric.store_may_hold_rows || replaces;
        let (result, panicked) = caught(&name, source.run(ctx)).await;
        // Not connected any more: not caught up until a new run says so,
        // and its lag grows from now (or from its last commit read).
        status.disconnected();
        // An initial snapshot cut short starts over on the next run.
        status.progress.abandon();
        if stop.is_cancelled() {
            status.set_state("stopped");
            return;
        }
        match result {
            Ok(()) => {
                status.set_state("stopped");
                return;
            }
            Err(e) if e.retryable() => {
                status.set_state("retrying");
                status.set_error(&e.to_string());
                // A run that read something, or held its connection a while,
                // streamed: this outage starts the schedule over.
                let read = status
                    .transactions
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > read_before;
                // A panic is no outage that ended: one that comes back on
                // the same input keeps backing off, up to the cap.
                let wait =
                    backoff.next(!panicked && (read || started.elapsed() >= Reconnect::STREAMED));
                tracing::warn!(error = %e, backoff_ms = wait.as_millis() as u64, "source failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => { status.set_state("stopped"); return; }
                    _ = tokio::time::sleep(wait) => {}
                }
                // Resume after what reached the router.
                if let Some(p) = fabric.routed.lock().get(&name).cloned().flatten() {
                    resume = Some(p);
                }
            }
            Err(e) => {
                status.set_state("failed");
                status.set_error(&e.to_string());
                tracing::error!(error = %e, "source failed");
                return;
            }
        }
    }
}

/// A source's run, with a panic in it (a bug, a decoder meeting input it
/// did not expect) made a retryable error: the source is restarted with
/// backoff from where the router has it, and its status and log say it
/// panicked, instead of the task ending while the status still says
/// streaming.
async fn caught(
    name: &str,
    run: impl std::future::Future<Output = Result<(), crate::sources::SourceError>>,
) -> (Result<(), crate::sources::SourceError>, bool) {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(run).catch_unwind().await {
        Ok(r) => (r, false),
        Err(p) => {
            let what = crate::grpc::guard::panic_message(&*p).to_string();
            tracing::error!(source = name, panic = %what, "the source's task panicked; restarting it");
            let e = crate::sources::SourceError::external(
                name,
                "its task panicked (a bug: please report it with the log); restarted",
                what,
            );
            (Err(e), true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source whose run panics gets a retryable error saying so.
    #[tokio::test]
    async fn a_panicking_source_is_a_retryable_error_that_says_it_panicked() {
        async fn boom() -> Result<(), crate::sources::SourceError> {
            panic!("unexpected column type 245")
        }
        let (e, panicked) = caught("crm", boom()).await;
        assert!(panicked);
        let e = e.unwrap_err();
        assert!(e.retryable());
        let text = e.to_string();
        assert!(text.contains("panicked"), "{text}");
        assert!(text.contains("unexpected column type 245"), "{text}");
        let (ok, panicked) = caught("crm", async { Ok(()) }).await;
        assert!(ok.is_ok() && !panicked);
    }

    /// The reconnect schedule doubles while a source keeps failing, caps at
    /// 30 s, and starts over after a run that streamed.
    #[test]
    fn reconnect_backoff_starts_over_once_a_source_streamed() {
        let defaults = (Duration::from_millis(200), Duration::from_secs(30));
        let mut r = Reconnect::new(defaults);
        let waits: Vec<u64> = (0..10).map(|_| r.next(false).as_millis() as u64).collect();
        assert_eq!(
            waits,
            [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]
        );
        assert_eq!(r.next(true), Duration::from_millis(200));
        assert_eq!(r.next(false), Duration::from_millis(400));
        // As configured.
        let mut r = Reconnect::new((Duration::from_secs(1), Duration::from_secs(3)));
        let waits: Vec<u64> = (0..4).map(|_| r.next(false).as_millis() as u64).collect();
        assert_eq!(waits, [1000, 2000, 3000, 3000]);
    }

    /// The schedule's defaults are the config's, and it is refused when
    /// the first wait is longer than the longest or a push source sets it.
    #[test]
    fn reconnect_settings_are_checked() {
        let cfg = |extra: &str| {
            format!(
                "[[sources]]\nname = \"crm\"\nkind = \"sqlite\"\npath = \"crm.db\"\ntables = [\"customers\"]\n{extra}\n\
                 [[entities]]\nname = \"customer\"\n  [[entities.tables]]\n  name = \"customer\"\n  source = \"crm\"\n  from = \"customers\"\n  id_column = \"id\"\n  primary_key = [\"id\"]\n"
            )
        };
        let path = std::path::Path::new("r.toml");
        let ok = Config::from_toml(
            path,
            &cfg("reconnect_first = \"1s\"\nreconnect_max = \"2m\""),
        )
        .unwrap();
        assert_eq!(
            ok.sources[0].reconnect(),
            (Duration::from_secs(1), Duration::from_secs(120))
        );
        let err = Config::from_toml(
            path,
            &cfg("reconnect_first = \"1m\"\nreconnect_max = \"10s\""),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("reconnect_first") && err.contains("longer than reconnect_max"),
            "{err}"
        );
    }
}
