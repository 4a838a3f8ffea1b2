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
//! Not yet here: consumer-group assignment with rebalance handling (the
//! fabric assigns every partition to itself), which scale-out needs.

use super::{Bus, BusError, Delivered, Offset, PartitionConsumer};
use crate::event::BusRecord;
use async_trait::async_trait;
use futures::FutureExt;
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::TopicPartitionList;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
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
    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

fn kafka(operation: &str) -> impl Fn(rdkafka::error::KafkaError) -> BusError + '_ {
    move |e| BusError::Kafka {
        operation: operation.to_string(),
        reason: e.to_string(),
    }
}

pub struct KafkaBus {
    cfg: KafkaBusConfig,
    producer: FutureProducer,
    committer: BaseConsumer,
    ends: Vec<AtomicU64>,
    closed: Arc<AtomicBool>,
    close_tx: watch::Sender<bool>,
}

impl KafkaBus {
    /// Connects, creating the topic when it is missing.
    pub async fn connect(cfg: KafkaBusConfig) -> Result<Self, BusError> {
        let admin: AdminClient<DefaultClientContext> = cfg
            .client()
            .create()
            .map_err(kafka("create an admin client"))?;
        let topic = NewTopic::new(
            &cfg.topic,
            cfg.partitions as i32,
            TopicReplication::Fixed(cfg.replication),
        );
        let results = admin
            .create_topics(
                [&topic],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
            )
            .await
            .map_err(kafka("create the topic"))?;
        for r in results {
            match r {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => {
                    return Err(BusError::Kafka {
                        operation: format!("create topic {t}"),
                        reason: code.to_string(),
                    });
                }
            }
        }
        let producer: FutureProducer = cfg
            .client()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .create()
            .map_err(kafka("create the producer"))?;
        let committer: BaseConsumer = cfg
            .client()
            .set("group.id", &cfg.group_id)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(kafka("create the offset committer"))?;
        // Where each partition ends now, so offsets continue from there
        // (a blocking metadata call: on a blocking thread, with its own handle).
        let client = cfg.client();
        let topic = cfg.topic.clone();
        let n = cfg.partitions;
        let highs =
            tokio::task::spawn_blocking(move || -> rdkafka::error::KafkaResult<Vec<i64>> {
                let c: BaseConsumer = client.create()?;
                (0..n)
                    .map(|p| {
                        c.fetch_watermarks(&topic, p as i32, Duration::from_secs(30))
                            .map(|(_, high)| high)
                    })
                    .collect()
            })
            .await
            .map_err(|e| BusError::Kafka {
                operation: "read watermarks".into(),
                reason: e.to_string(),
            })?
            .map_err(kafka("read watermarks"))?;
        let ends = highs
            .into_iter()
            .map(|h| AtomicU64::new(h.max(0) as u64))
            .collect();
        let (close_tx, _) = watch::channel(false);
        Ok(KafkaBus {
            cfg,
            producer,
            committer,
            ends,
            closed: Arc::new(AtomicBool::new(false)),
            close_tx,
        })
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
        if self.closed.load(Ordering::Acquire) {
            return Err(BusError::Closed);
        }
        let mut encoded = Vec::with_capacity(records.len());
        for (p, r) in &records {
            self.check(*p)?;
            let key = match r {
                BusRecord::Changes(s) => s.key.bus_key(),
                BusRecord::Truncate(t) => format!("{}/*", t.entity_type),
            };
            let mut value = vec![FORMAT_POSTCARD];
            value = postcard::to_extend(r, value).map_err(|e| BusError::Kafka {
                operation: "encode a record".into(),
                reason: e.to_string(),
            })?;
            encoded.push((*p, key, value));
        }
        // Enqueued in order (join_all polls in order), so per-partition order holds.
        let sends = encoded.iter().map(|(p, key, value)| {
            self.producer.send(
                FutureRecord::to(&self.cfg.topic)
                    .partition(*p as i32)
                    .key(key.as_str())
                    .payload(value.as_slice()),
                Duration::from_secs(60),
            )
        });
        let results = futures::future::join_all(sends).await;
        let mut offsets = Vec::with_capacity(results.len());
        for ((p, _, _), r) in encoded.iter().zip(results) {
            let d = r.map_err(|(e, _)| kafka("produce")(e))?;
            let next = d.offset as u64 + 1;
            self.ends[*p as usize].fetch_max(next, Ordering::AcqRel);
            offsets.push(Offset(d.offset as u64));
        }
        Ok(offsets)
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
            .create()
            .map_err(kafka("create a consumer"))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(
            &self.cfg.topic,
            partition as i32,
            rdkafka::Offset::Offset(from.0 as i64),
        )
        .map_err(kafka("assign"))?;
        consumer.assign(&tpl).map_err(kafka("assign"))?;
        Ok(Box::new(KafkaConsumer {
            partition,
            consumer,
            closed: self.close_tx.subscribe(),
        }))
    }

    fn end_offset(&self, partition: u32) -> Offset {
        self.ends
            .get(partition as usize)
            .map(|e| Offset(e.load(Ordering::Acquire)))
            .unwrap_or_default()
    }

    async fn commit(&self, partition: u32, offset: Offset) -> Result<(), BusError> {
        self.check(partition)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(
            &self.cfg.topic,
            partition as i32,
            rdkafka::Offset::Offset(offset.0 as i64),
        )
        .map_err(kafka("commit"))?;
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
    consumer: StreamConsumer,
    closed: watch::Receiver<bool>,
}

impl KafkaConsumer {
    fn decode(&self, m: &rdkafka::message::BorrowedMessage<'_>) -> Result<Delivered, BusError> {
        let bad = |reason: String| BusError::Kafka {
            operation: format!(
                "decode offset {} of partition {}",
                m.offset(),
                self.partition
            ),
            reason,
        };
        let payload = m.payload().ok_or_else(|| bad("no value".into()))?;
        let record = match payload.split_first() {
            Some((&FORMAT_POSTCARD, rest)) => {
                postcard::from_bytes::<BusRecord>(rest).map_err(|e| bad(e.to_string()))?
            }
            Some((f, _)) => return Err(bad(format!("unknown format byte {f}"))),
            None => return Err(bad("empty value".into())),
        };
        Ok(Delivered {
            partition: self.partition,
            offset: Offset(m.offset() as u64),
            record: Arc::new(record),
        })
    }
}

#[async_trait]
impl PartitionConsumer for KafkaConsumer {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivered>, BusError> {
        if *self.closed.borrow() {
            return Ok(Vec::new());
        }
        let first = tokio::select! {
            m = self.consumer.recv() => m.map_err(kafka("consume"))?,
            _ = self.closed.changed() => return Ok(Vec::new()),
        };
        let mut out = vec![self.decode(&first)?];
        drop(first);
        while out.len() < max.max(1) {
            match self.consumer.recv().now_or_never() {
                Some(Ok(m)) => {
                    let d = self.decode(&m)?;
                    out.push(d);
                }
                Some(Err(e)) => return Err(kafka("consume")(e)),
                None => break,
            }
        }
        Ok(out)
    }
}
