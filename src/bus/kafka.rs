//! The Kafka bus: one topic (`<prefix>.changes`) whose partitions are the
//! bus partitions, written by an idempotent producer (`acks=all`) and read
//! per partition from a given offset.
//!
//! Records are keyed by `<type>/<id>` and placed in the partition the router
//! chose (Kafka's own partitioner would agree: both are murmur2). A value is
//! a format byte followed by the record's postcard encoding; the topic is the
//! fabric's internal log, readers outside the fabric use the entities topic.
//!
//! End offsets are those this process saw acknowledged (and the topic's
//! high watermarks at connect): what the snapshot barrier needs, since a
//! process checkpoints only what it routed itself.
//!
//! Faults: the producer never gives up on a record (`message.timeout.ms=0`):
//! while the broker is away the pipeline waits (sources feel backpressure),
//! and librdkafka reconnects by itself. A consumer error is logged and the
//! read retried; only an offset the broker no longer holds is fatal, since
//! going on would skip changes. A record that cannot be decoded goes to the
//! dead-letter output and is replaced by [`BusRecord::Unreadable`], so the
//! pipeline keeps going and offsets stay dense.
//!
//! Which process reads which partition is not the bus's business: see
//! [`super::members`]. A process reads the partitions it owns with
//! [`Bus::consume`] from its own snapshots' offsets, and commits those
//! offsets to the group `group_id` for monitoring tools (the group has no
//! members, so these are plain offset commits).

use super::{Acked, Bus, BusError, Delivered, Offset, PartitionConsumer};
use crate::config::KafkaConfig;
use crate::event::BusRecord;
use crate::telemetry::{DeadInput, DeadLetters};
use async_trait::async_trait;
use futures::FutureExt;
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::TopicPartitionList;
use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext};
use rdkafka::producer::FutureRecord;
use rdkafka::types::RDKafkaErrorCode;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The first byte of every value: the encoding, so it can change.
const FORMAT_POSTCARD: u8 = 1;

/// How to reach the broker and which topic to use.
#[derive(Debug, Clone)]
pub struct KafkaBusConfig {
    /// `host:port[,host:port]`.
    pub brokers: String,
    /// The changes topic.
    pub topic: String,
    pub partitions: u32,
    pub replication: i32,
    /// The consumer group whose offsets are committed (for monitoring tools).
    pub group_id: String,
    /// Handed to librdkafka as they are (`security.protocol`, `sasl.*`, …).
    pub properties: BTreeMap<String, String>,
}

impl KafkaBusConfig {
    /// The bus settings of `[bus.kafka]` for a bus of `partitions`.
    pub fn from_config(k: &KafkaConfig, partitions: u32) -> Self {
        KafkaBusConfig {
            brokers: k.brokers.clone(),
            topic: k.topic("changes"),
            partitions,
            replication: k.replication,
            group_id: k.group_id(),
            properties: k.properties.clone(),
        }
    }

    fn client(&self) -> ClientConfig {
        client_config(&self.brokers, &self.properties)
    }
}

/// Every client's context: librdkafka's logs and errors go to `tracing`,
/// each kind at most once per [`QUIET_FOR`] per client with a count of the
/// repeats left out. (A broker that is away makes every client report the
/// same error several times a second.)
#[derive(Default)]
pub struct Quiet {
    seen: parking_lot::Mutex<std::collections::HashMap<String, (std::time::Instant, u64)>>,
}

/// How long a repeated librdkafka message stays quiet.
const QUIET_FOR: Duration = Duration::from_secs(10);

impl Quiet {
    /// Whether to log `key` now, and how many were left out since the last one.
    fn allow(&self, key: &str) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut seen = self.seen.lock();
        match seen.get_mut(key) {
            Some((at, skipped)) if now.duration_since(*at) < QUIET_FOR => {
                *skipped += 1;
                None
            }
            Some((at, skipped)) => {
                let n = *skipped;
                *at = now;
                *skipped = 0;
                Some(n)
            }
            None => {
                seen.insert(key.to_string(), (now, 0));
                Some(0)
            }
        }
    }
}

impl ClientContext for Quiet {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let Some(repeats) = self.allow(fac) else {
            return;
        };
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", facility = fac, repeats, "{message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility = fac, repeats, "{message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", facility = fac, repeats, "{message}")
            }
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        let key = format!("{:?}", error.rdkafka_error_code());
        if let Some(repeats) = self.allow(&key) {
            tracing::warn!(target: "librdkafka", %error, repeats, "{reason}");
        }
    }
}

impl ConsumerContext for Quiet {}

/// The clients the fabric uses, all with the [`Quiet`] context.
pub type Producer = rdkafka::producer::FutureProducer<Quiet>;
pub type StreamConsumer = rdkafka::consumer::StreamConsumer<Quiet>;
pub type BaseConsumer = rdkafka::consumer::BaseConsumer<Quiet>;
type AdminClient = rdkafka::admin::AdminClient<Quiet>;

/// Creates a client of `config` with its own [`Quiet`] context.
pub fn create<T: FromClientConfigAndContext<Quiet>>(
    config: &ClientConfig,
) -> rdkafka::error::KafkaResult<T> {
    config.create_with_context(Quiet::default())
}

/// A librdkafka client config: the brokers plus the operator's properties.
pub fn client_config(brokers: &str, properties: &BTreeMap<String, String>) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    // The fabric makes its topics itself, with their partitions and
    // settings (ensure_topic). A topic deleted under it must not come back
    // made by a metadata request with the broker's defaults (one partition,
    // no compaction) and offsets from 0 again: writes to it wait instead
    // (send_in_order).
    c.set("allow.auto.create.topics", "false");
    // Metadata a client caches is refreshed every 10 s instead of 5 min: a
    // cluster node killed and restarted may answer, for a moment, without
    // partitions it leads again seconds later, and a client would otherwise
    // keep that answer (partition unknown) for minutes.
    c.set("topic.metadata.refresh.interval.ms", "10000");
    for (k, v) in properties {
        c.set(k, v);
    }
    c
}

/// The broker (or the client's metadata) does not know the topic or the
/// partition: it was deleted, made again with fewer partitions, or is
/// briefly unknown during a leader change.
pub fn unknown_partition(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::UnknownPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownTopicOrPartition
    )
}

/// A read failed for a moment's reason: the partition is unknown to the
/// client's metadata, or its leader is moving or not yet elected.
fn leader_moving(code: RDKafkaErrorCode) -> bool {
    unknown_partition(code)
        || matches!(
            code,
            RDKafkaErrorCode::NotLeaderForPartition | RDKafkaErrorCode::LeaderNotAvailable
        )
}

/// A delivery failed because its partition went away under it, so nothing
/// was written and the record may be sent again: the broker no longer knows
/// the topic or partition (the topic was deleted under the fabric), or
/// librdkafka dropped its partition object with the record still queued
/// there, before sending it (`BrokerDestroy`, "Local: Broker handle
/// destroyed": seen about once in six deletes of a topic being written; the
/// producer itself is alive, since the caller holds it).
pub fn lost_delivery(code: RDKafkaErrorCode) -> bool {
    unknown_partition(code) || code == RDKafkaErrorCode::BrokerDestroy
}

/// One record for [`write_in_order`]: a tombstone when `value` is `None`.
pub struct Outgoing<'a> {
    pub partition: u32,
    pub key: &'a [u8],
    pub value: Option<&'a [u8]>,
    pub headers: Option<&'a rdkafka::message::OwnedHeaders>,
}

/// Writes `records` to `topic` in order and waits for the broker's answer
/// to each: the offset it landed at, or the error that refused it for good
/// (at hand-over or at delivery). A record refused because its partition
/// went away ([`lost_delivery`]) is sent again, together with every record
/// after it in that partition, even those the lost partition had taken: so
/// each partition receives the records in the order given (some twice, none
/// reordered, which on a compacted topic would let an older value win), held
/// until the partition exists again. Says so at most every 30 s.
pub async fn write_in_order(
    producer: &Producer,
    topic: &str,
    records: &[Outgoing<'_>],
) -> Result<Vec<Result<i64, rdkafka::error::KafkaError>>, BusError> {
    let mut results: Vec<Result<i64, rdkafka::error::KafkaError>> =
        records.iter().map(|_| Ok(-1)).collect();
    let mut pending: Vec<usize> = (0..records.len()).collect();
    let mut said: Option<Instant> = None;
    while !pending.is_empty() {
        let mut handed = Vec::with_capacity(pending.len());
        for &i in &pending {
            let o = &records[i];
            let mut r = FutureRecord::<[u8], [u8]>::to(topic)
                .partition(o.partition as i32)
                .key(o.key);
            if let Some(v) = o.value {
                r = r.payload(v);
            }
            if let Some(h) = o.headers {
                r = r.headers(h.clone());
            }
            handed.push((i, send_in_order(producer, r).await));
        }
        // The first lost record of each partition: it and all after it in
        // that partition go again.
        let mut lost: BTreeMap<u32, usize> = BTreeMap::new();
        for (i, h) in handed {
            let r = match h {
                Ok(d) => d
                    .await
                    .map_err(|_| BusError::Closed)?
                    .map(|d| d.offset)
                    .map_err(|(e, _)| e),
                Err(e) => Err(e),
            };
            if let Err(e) = &r
                && e.rdkafka_error_code().is_some_and(lost_delivery)
            {
                lost.entry(records[i].partition).or_insert(i);
            }
            results[i] = r;
        }
        pending.retain(|&i| lost.get(&records[i].partition).is_some_and(|&f| i >= f));
        if let Some((&partition, _)) = lost.first_key_value()
            && said.is_none_or(|t| t.elapsed() >= Duration::from_secs(30))
        {
            said = Some(Instant::now());
            tracing::error!(
                topic,
                partition,
                records = pending.len(),
                "the broker lost this topic's partition (deleted?): the records it refused are sent again and held until it exists, and this partition's applier waits for them (nothing after them counts applied); reads go on"
            );
        }
    }
    Ok(results)
}

/// Writes held because the broker did not know their topic or partition
/// (deleted, or fewer partitions): counted since start, and held now.
/// Process-wide, registered as `fabric_kafka_writes_held` and
/// `fabric_kafka_writes_held_now`.
pub static WRITES_HELD: std::sync::LazyLock<prometheus_client::metrics::counter::Counter> =
    std::sync::LazyLock::new(Default::default);
pub static WRITES_HELD_NOW: std::sync::LazyLock<prometheus_client::metrics::gauge::Gauge> =
    std::sync::LazyLock::new(Default::default);

/// An idempotent producer (`acks=all`) that retries a record until the
/// broker takes it: nothing it was handed is dropped while the broker is away.
pub fn durable_producer(client: &ClientConfig) -> Result<Producer, BusError> {
    let mut c = client.clone();
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1");
    if c.get("message.max.bytes").is_none() {
        // A record of MAX_RECORD_BYTES, with its batch's framing.
        c.set(
            "message.max.bytes",
            (MAX_RECORD_BYTES + (64 << 10)).to_string(),
        );
    }
    if c.get("message.timeout.ms").is_none() && c.get("delivery.timeout.ms").is_none() {
        c.set("message.timeout.ms", "0");
    }
    // With a finite timeout set by the operator, a record that times out
    // must not leave a gap that later records pass: fail instead.
    if c.get("enable.gapless.guarantee").is_none() {
        c.set("enable.gapless.guarantee", "true");
    }
    create(&c).map_err(kafka("create a producer"))
}

/// The largest record the fabric writes to its topics, and the
/// `max.message.bytes` it creates them with (brokers default to about
/// 1 MB: a transaction writing a large row, or the state of an entity of
/// thousands of rows, is more). Consumers read records this large by
/// default (librdkafka and the Java client fetch a record over their fetch
/// sizes alone).
pub const MAX_RECORD_BYTES: usize = 16 << 20;

/// Creates `topic` with `partitions` when it does not exist. An existing
/// topic with fewer partitions than needed is refused: records would be
/// routed to partitions it lacks.
pub async fn ensure_topic(
    client: &ClientConfig,
    topic: &str,
    partitions: u32,
    replication: i32,
    configs: &[(&str, &str)],
) -> Result<(), BusError> {
    let admin: AdminClient = create(client).map_err(kafka("create an admin client"))?;
    let mut new = NewTopic::new(
        topic,
        partitions as i32,
        TopicReplication::Fixed(replication),
    );
    for (k, v) in configs {
        new = new.set(k, v);
    }
    let max = MAX_RECORD_BYTES.to_string();
    if !configs.iter().any(|(k, _)| *k == "max.message.bytes") {
        new = new.set("max.message.bytes", &max);
    }
    let results = admin
        .create_topics(
            [&new],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .map_err(kafka("create a topic"))?;
    for r in results {
        match r {
            Ok(_) => tracing::info!(topic, partitions, "created kafka topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => {
                return Err(BusError::Kafka {
                    operation: format!("create topic {t}"),
                    reason: code.to_string(),
                });
            }
        }
    }
    let client = client.clone();
    let name = topic.to_string();
    // A topic just created reaches the broker's metadata a moment later
    // (Apache Kafka's controller propagates it): until then it reads as
    // unknown, with no partitions. Only a topic that exists counts.
    let have = tokio::task::spawn_blocking(move || -> Result<usize, BusError> {
        let c: BaseConsumer = create(&client).map_err(kafka("create a client"))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let md = c
                .fetch_metadata(Some(&name), Duration::from_secs(30))
                .map_err(kafka("read topic metadata"))?;
            // Counted only once every partition has a leader: a topic just
            // created answers "not leader" to its first reads for a moment
            // (seen in CI: a watermark read right after creation failed with
            // NotLeaderForPartition).
            let have = md
                .topics()
                .first()
                .filter(|t| t.error().is_none())
                .filter(|t| {
                    t.partitions()
                        .iter()
                        .all(|p| p.leader() >= 0 && p.error().is_none())
                })
                .map_or(0, |t| t.partitions().len());
            if have > 0 || std::time::Instant::now() >= deadline {
                return Ok(have);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .map_err(|e| BusError::Kafka {
        operation: "read topic metadata".into(),
        reason: e.to_string(),
    })??;
    if have < partitions as usize {
        return Err(BusError::Mismatch(format!(
            "topic {topic} has {have} partitions and the fabric needs {partitions} \
             (bus.partitions): use another topic_prefix"
        )));
    }
    Ok(())
}

/// Hands `record` to `producer`, waiting while its queue is full. Records
/// handed on one after another keep their order (a full queue never lets a
/// later one in first, as concurrent sends could).
pub async fn send_in_order<'a, K: rdkafka::message::ToBytes + ?Sized>(
    producer: &Producer,
    mut record: FutureRecord<'a, K, [u8]>,
) -> Result<rdkafka::producer::DeliveryFuture, rdkafka::error::KafkaError> {
    let mut held: Option<(Instant, Instant)> = None;
    let result = loop {
        match producer.send_result(record) {
            Ok(d) => break Ok(d),
            Err((
                rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                back,
            )) => {
                record = back;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            // The broker does not know the topic or this partition (the topic
            // was deleted, or made again with fewer partitions; also for a
            // moment during a leader change). The record is not taken: hold
            // it, and every record after it, and say so. Nothing behind it is
            // acknowledged to its source, and reads go on.
            Err((rdkafka::error::KafkaError::MessageProduction(code), back))
                if unknown_partition(code) =>
            {
                let now = Instant::now();
                let (since, said) = held.get_or_insert_with(|| {
                    WRITES_HELD.inc();
                    WRITES_HELD_NOW.inc();
                    (now, now - Duration::from_secs(60))
                });
                if now.duration_since(*said) >= Duration::from_secs(30) {
                    *said = now;
                    tracing::error!(
                        topic = back.topic,
                        partition = ?back.partition,
                        error = %code,
                        held_s = now.duration_since(*since).as_secs(),
                        "the broker does not know this topic or partition (deleted, or made again with fewer partitions?): writes to it are held and retried, nothing after them is acknowledged to the sources; reads go on"
                    );
                }
                record = back;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err((e, _)) => break Err(e),
        }
    };
    if let Some((since, _)) = held {
        WRITES_HELD_NOW.dec();
        tracing::info!(
            held_s = since.elapsed().as_secs(),
            "writes held for an unknown topic or partition go on"
        );
    }
    result
}

/// A partition's high watermark, asked of the broker.
async fn high_watermark(
    c: &Arc<BaseConsumer>,
    topic: &str,
    partition: u32,
) -> Result<u64, BusError> {
    Ok(watermarks(c, topic, partition).await?.1)
}

/// A partition's low and high watermarks, asked of the broker.
pub async fn watermarks(
    c: &Arc<BaseConsumer>,
    topic: &str,
    partition: u32,
) -> Result<(u64, u64), BusError> {
    let c = c.clone();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let read = || c.fetch_watermarks(&topic, partition as i32, Duration::from_secs(30));
        // The client's cached metadata lacks the partition (seen on a
        // cluster after a node was killed and came back: its first answers
        // held no partitions, kept until the next periodic refresh), or the
        // partition's leader is moving or not yet elected (a topic just
        // created; a broker restarting). Ask the brokers again and read
        // again, for a bounded time.
        let deadline = Instant::now() + Duration::from_secs(30);
        let r = loop {
            match read() {
                Err(e)
                    if e.rdkafka_error_code().is_some_and(leader_moving)
                        && Instant::now() < deadline =>
                {
                    let _ = c.fetch_metadata(Some(&topic), Duration::from_secs(10));
                    std::thread::sleep(Duration::from_millis(100));
                }
                r => break r,
            }
        };
        r.map(|(low, high)| (low.max(0) as u64, high.max(0) as u64))
    })
    .await
    .map_err(|e| BusError::Kafka {
        operation: "read a watermark".into(),
        reason: e.to_string(),
    })?
    .map_err(kafka("read a watermark"))
}

/// Reads `partition` of `topic` from its start to its end as it is now,
/// handing each message to `each` (which may refuse it, ending the read).
/// Blocking: call from `spawn_blocking`. For the small compacted topics the
/// fabric reads whole (checkpoints, state).
pub fn read_whole_partition(
    client: &ClientConfig,
    topic: &str,
    partition: u32,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Result<(), BusError>,
) -> Result<(), BusError> {
    let mut c = client.clone();
    c.set("group.id", format!("{topic}.reader"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    let consumer: BaseConsumer = create(&c).map_err(kafka("create a reader"))?;
    let (low, high) = consumer
        .fetch_watermarks(topic, partition as i32, Duration::from_secs(30))
        .map_err(kafka("read a watermark"))?;
    if high <= low {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition as i32, rdkafka::Offset::Offset(low))
        .map_err(kafka("assign"))?;
    consumer.assign(&tpl).map_err(kafka("assign"))?;
    // Bounded by progress, not by size: a large partition may take long.
    let mut progress = std::time::Instant::now();
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                progress = std::time::Instant::now();
                each(&m)?;
                if m.offset() + 1 >= high {
                    return Ok(());
                }
            }
            Some(Err(e)) => {
                tracing::warn!(topic, partition, error = %e, "reading a partition; retrying")
            }
            None if progress.elapsed() > Duration::from_secs(60) => {
                return Err(BusError::Kafka {
                    operation: format!("read {topic}/{partition}"),
                    reason: format!("no progress towards offset {high} for 60s"),
                });
            }
            None => {}
        }
    }
}

/// A librdkafka error as a [`BusError`] of `operation`.
pub fn kafka(operation: &str) -> impl Fn(rdkafka::error::KafkaError) -> BusError + '_ {
    move |e| BusError::Kafka {
        operation: operation.to_string(),
        reason: e.to_string(),
    }
}

pub struct KafkaBus {
    cfg: KafkaBusConfig,
    dead_letters: Option<Arc<DeadLetters>>,
    producer: Producer,
    /// Commits offsets for monitoring; also reads watermarks.
    committer: Arc<BaseConsumer>,
    ends: Arc<Vec<AtomicU64>>,
    closed: Arc<AtomicBool>,
    close_tx: watch::Sender<bool>,
}

impl KafkaBus {
    /// Connects, creating the topic when it is missing. Records that
    /// cannot be decoded go to `dead_letters`.
    pub async fn connect(
        cfg: KafkaBusConfig,
        dead_letters: Option<Arc<DeadLetters>>,
    ) -> Result<Self, BusError> {
        // Kept for ever: a process given a partition it has no snapshot
        // of rebuilds it from the start of the topic.
        ensure_topic(
            &cfg.client(),
            &cfg.topic,
            cfg.partitions,
            cfg.replication,
            &[("retention.ms", "-1"), ("retention.bytes", "-1")],
        )
        .await?;
        let producer = durable_producer(&cfg.client())?;
        let committer: BaseConsumer = cfg
            .client()
            .set("group.id", &cfg.group_id)
            .set("enable.auto.commit", "false")
            .create_with_context(Quiet::default())
            .map_err(kafka("create the offset committer"))?;
        // Where each partition ends now, so offsets continue from there.
        let committer = Arc::new(committer);
        let mut highs = Vec::with_capacity(cfg.partitions as usize);
        for p in 0..cfg.partitions {
            highs.push(high_watermark(&committer, &cfg.topic, p).await?);
        }
        let ends = Arc::new(highs.into_iter().map(AtomicU64::new).collect());
        let (close_tx, _) = watch::channel(false);
        Ok(KafkaBus {
            cfg,
            dead_letters,
            producer,
            committer,
            ends,
            closed: Arc::new(AtomicBool::new(false)),
            close_tx,
        })
    }

    /// The changes topic's `partition` at `offset`, as librdkafka takes it.
    fn at(
        &self,
        partition: u32,
        offset: Offset,
    ) -> rdkafka::error::KafkaResult<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(
            &self.cfg.topic,
            partition as i32,
            rdkafka::Offset::Offset(offset.0 as i64),
        )?;
        Ok(tpl)
    }

    fn check(&self, partition: u32) -> Result<(), BusError> {
        if partition >= self.cfg.partitions {
            return Err(BusError::NoSuchPartition {
                partition,
                partitions: self.cfg.partitions,
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Bus for KafkaBus {
    fn partitions(&self) -> u32 {
        self.cfg.partitions
    }

    async fn produce(&self, records: Vec<(u32, BusRecord)>) -> Result<Vec<Offset>, BusError> {
        self.enqueue(records).await?.await
    }

    /// Hands every record to the producer, strictly in order (waiting while
    /// its queue is full), and returns the future of their acknowledgements.
    async fn enqueue(&self, records: Vec<(u32, BusRecord)>) -> Result<Acked, BusError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(BusError::Closed);
        }
        let mut deliveries = Vec::with_capacity(records.len());
        for (p, r) in &records {
            self.check(*p)?;
            let key = match r {
                BusRecord::Changes(s) => s.key.bus_key(),
                BusRecord::Fetched(f) => f.key.bus_key(),
                BusRecord::Erase(e) => e.key.bus_key(),
                BusRecord::Truncate(t) => format!("{}/*", t.entity_type),
                BusRecord::Unreadable => {
                    return Err(BusError::Kafka {
                        operation: "produce".into(),
                        reason: "an unreadable record is never written".into(),
                    });
                }
            };
            let mut value = vec![FORMAT_POSTCARD];
            value = postcard::to_extend(r, value).map_err(|e| BusError::Kafka {
                operation: "encode a record".into(),
                reason: e.to_string(),
            })?;
            if self.closed.load(Ordering::Acquire) {
                return Err(BusError::Closed);
            }
            let record = FutureRecord::to(&self.cfg.topic)
                .partition(*p as i32)
                .key(key.as_str())
                .payload(value.as_slice());
            let delivery = send_in_order(&self.producer, record)
                .await
                .map_err(kafka("produce"))?;
            deliveries.push((*p, delivery));
        }
        let ends = self.ends.clone();
        let committer = self.committer.clone();
        let topic = self.cfg.topic.clone();
        let closed = self.closed.clone();
        Ok(Box::pin(async move {
            let mut offsets = Vec::with_capacity(deliveries.len());
            let mut unknown = Vec::new();
            for (i, (p, d)) in deliveries.into_iter().enumerate() {
                let offset = d
                    .await
                    .map_err(|_| BusError::Closed)?
                    .map_err(|(e, _)| match e.rdkafka_error_code() {
                        // Queued records failed because their partition
                        // went away under them (the topic was deleted).
                        Some(code) if lost_delivery(code) => BusError::TopicGone {
                            topic: topic.clone(),
                            partition: p,
                            reason: code.to_string(),
                        },
                        _ => kafka("produce")(e),
                    })?
                    .offset;
                if offset < 0 {
                    // Delivered, but the answer was lost (the broker went
                    // away after writing it): the offset is not known.
                    unknown.push((i, p));
                    offsets.push(Offset(0));
                    continue;
                }
                ends[p as usize].fetch_max(offset as u64 + 1, Ordering::AcqRel);
                offsets.push(Offset(offset as u64));
            }
            // The partition's high watermark is past every record it took:
            // the end moves there, and the record is reported just below it.
            for (i, p) in unknown {
                let high = loop {
                    match high_watermark(&committer, &topic, p).await {
                        Ok(h) => break h,
                        Err(e) if !closed.load(Ordering::Acquire) => {
                            tracing::warn!(partition = p, error = %e, "cannot read the end of a partition; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        Err(e) => return Err(e),
                    }
                };
                ends[p as usize].fetch_max(high, Ordering::AcqRel);
                offsets[i] = Offset(high.saturating_sub(1));
            }
            Ok(offsets)
        }))
    }

    async fn consume(
        &self,
        partition: u32,
        from: Offset,
    ) -> Result<Box<dyn PartitionConsumer>, BusError> {
        self.check(partition)?;
        let consumer: StreamConsumer = self
            .cfg
            .client()
            .set("group.id", &self.cfg.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "10")
            // An offset the broker no longer holds is an error, never a jump.
            .set("auto.offset.reset", "error")
            .create_with_context(Quiet::default())
            .map_err(kafka("create a consumer"))?;
        let tpl = self.at(partition, from).map_err(kafka("assign"))?;
        consumer.assign(&tpl).map_err(kafka("assign"))?;
        Ok(Box::new(KafkaConsumer {
            partition,
            topic: self.cfg.topic.clone(),
            dead_letters: self.dead_letters.clone(),
            consumer,
            closed: self.close_tx.subscribe(),
            gone_said: None,
        }))
    }

    fn end_offset(&self, partition: u32) -> Offset {
        self.ends
            .get(partition as usize)
            .map(|e| Offset(e.load(Ordering::Acquire)))
            .unwrap_or_default()
    }

    async fn start_offset(&self, partition: u32) -> Result<Offset, BusError> {
        self.check(partition)?;
        Ok(Offset(
            watermarks(&self.committer, &self.cfg.topic, partition)
                .await?
                .0,
        ))
    }

    async fn log_end(&self, partition: u32) -> Result<Offset, BusError> {
        self.check(partition)?;
        let high = high_watermark(&self.committer, &self.cfg.topic, partition).await?;
        self.ends[partition as usize].fetch_max(high, Ordering::AcqRel);
        Ok(Offset(high))
    }

    async fn committed(&self, partition: u32) -> Result<Option<Offset>, BusError> {
        self.check(partition)?;
        let c = self.committer.clone();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.cfg.topic, partition as i32);
        let tpl =
            tokio::task::spawn_blocking(move || c.committed_offsets(tpl, Duration::from_secs(30)))
                .await
                .map_err(|e| BusError::Kafka {
                    operation: "read a committed offset".into(),
                    reason: e.to_string(),
                })?
                .map_err(kafka("read a committed offset"))?;
        Ok(tpl.elements().first().and_then(|e| match e.offset() {
            rdkafka::Offset::Offset(o) if o >= 0 => Some(Offset(o as u64)),
            _ => None,
        }))
    }

    async fn commit(&self, partition: u32, offset: Offset) -> Result<(), BusError> {
        self.check(partition)?;
        let tpl = self.at(partition, offset).map_err(kafka("commit"))?;
        self.committer
            .commit(&tpl, CommitMode::Async)
            .map_err(kafka("commit"))
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let _ = self.close_tx.send(true);
    }
}

struct KafkaConsumer {
    partition: u32,
    topic: String,
    dead_letters: Option<Arc<DeadLetters>>,
    consumer: StreamConsumer,
    closed: watch::Receiver<bool>,
    /// When the partition was last said to be unknown to the broker.
    gone_said: Option<Instant>,
}

impl KafkaConsumer {
    /// The record at `m`; one that cannot be decoded is dead-lettered and
    /// stands as [`BusRecord::Unreadable`].
    fn decode(&self, m: &rdkafka::message::BorrowedMessage<'_>) -> Delivered {
        let payload = m.payload().unwrap_or_default();
        let record = match payload.split_first() {
            Some((&FORMAT_POSTCARD, rest)) => {
                postcard::from_bytes::<BusRecord>(rest).map_err(|e| e.to_string())
            }
            Some((f, _)) => Err(format!("unknown format byte {f}")),
            None => Err("no value".into()),
        };
        let record = record.unwrap_or_else(|reason| {
            let origin = format!("{}/{}@{}", self.topic, self.partition, m.offset());
            match &self.dead_letters {
                Some(dl) => dl.record_input(DeadInput {
                    source: "bus",
                    table: "",
                    reason: &format!("cannot decode a bus record: {reason}"),
                    key: m.key(),
                    raw: payload,
                    origin: Some(&origin),
                }),
                None => tracing::warn!(origin, reason, "cannot decode a bus record; skipped"),
            }
            BusRecord::Unreadable
        });
        Delivered {
            partition: self.partition,
            offset: Offset(m.offset() as u64),
            record: Arc::new(record),
        }
    }

    /// Whether a consumer error ends the read: only an offset the broker no
    /// longer holds does; everything else (broker away, leader moving) is
    /// retried by librdkafka and by us.
    fn fatal(&mut self, e: rdkafka::error::KafkaError) -> Option<BusError> {
        use RDKafkaErrorCode::*;
        let operation = format!("read partition {} of {}", self.partition, self.topic);
        match e.rdkafka_error_code() {
            Some(AutoOffsetReset | OffsetOutOfRange) => {
                return Some(BusError::Kafka {
                    operation,
                    reason: format!(
                        "{e}: the offset the snapshots reflect is no longer held by the topic \
                         (retention shorter than the snapshot interval, or the topic was \
                         recreated). Move the snapshot directory away and restart: the \
                         sources then start over"
                    ),
                });
            }
            // The topic was deleted under the fabric (or briefly unknown to
            // a broker during a leader change): what the partition holds is
            // still served; reading waits for it, saying so every 30 s.
            Some(code) if unknown_partition(code) => {
                if self
                    .gone_said
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(30))
                {
                    self.gone_said = Some(Instant::now());
                    tracing::error!(
                        partition = self.partition,
                        topic = %self.topic,
                        error = %e,
                        "the broker does not know this partition (was the topic deleted?): \
                         what the fabric holds is still served; reading it is retried"
                    );
                }
                return None;
            }
            Some(TopicAuthorizationFailed | Fatal) => {
                return Some(BusError::Kafka {
                    operation,
                    reason: e.to_string(),
                });
            }
            _ => {}
        }
        tracing::warn!(partition = self.partition, error = %e, "kafka read failed; retrying");
        None
    }
}

#[async_trait]
impl PartitionConsumer for KafkaConsumer {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivered>, BusError> {
        loop {
            if *self.closed.borrow() {
                return Ok(Vec::new());
            }
            let first = tokio::select! {
                m = self.consumer.recv() => m,
                _ = self.closed.changed() => return Ok(Vec::new()),
            };
            let first = match first {
                Ok(m) => m,
                Err(e) => match self.fatal(e) {
                    Some(fatal) => return Err(fatal),
                    None => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let mut out = vec![self.decode(&first)];
            drop(first);
            while out.len() < max.max(1) {
                match self.consumer.recv().now_or_never() {
                    Some(Ok(m)) => {
                        let d = self.decode(&m);
                        out.push(d);
                    }
                    Some(Err(e)) => match self.fatal(e) {
                        Some(fatal) => return Err(fatal),
                        None => break,
                    },
                    None => break,
                }
            }
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TLS and SASL are built in (OpenSSL vendored): clients accept the
    /// properties operators pass through `[bus.kafka.properties]`.
    #[test]
    fn tls_and_sasl_properties_are_accepted() {
        let props: BTreeMap<String, String> = [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "fabric"),
            ("sasl.password", "secret"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let client = client_config("127.0.0.1:9", &props);
        if let Err(e) = durable_producer(&client) {
            panic!("a SASL_SSL producer could not be created: {e}");
        }
        let mut mtls = client_config("127.0.0.1:9", &BTreeMap::new());
        mtls.set("security.protocol", "SSL")
            .set("ssl.ca.location", "/nonexistent/ca.pem");
        // With TLS built in, the error is about the missing file.
        let err = match create::<BaseConsumer>(&mtls) {
            Ok(_) => panic!("a missing CA file was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("ca.pem") || err.contains("ssl.ca.location"),
            "{err}"
        );
    }
}
