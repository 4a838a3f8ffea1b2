//! `debezium_kafka`: reads the topics an existing Debezium deployment writes,
//! so teams that already run Debezium point the fabric at its topics.
//!
//! Each message value is decoded by [`debezium::decode`] (JSON converter,
//! with or without schemas); the event's `schema.table` / `db.table` is the
//! table entity tables name in `from`. Every row change is one source
//! transaction: Debezium spreads one database transaction over one topic per
//! table, so its boundaries cannot be rebuilt from the row topics.
//!
//! Positions are Kafka offsets ([`Position::Kafka`]): per `topic/partition`,
//! the next offset to read, plus the partition of the message itself. One
//! row's changes are in one partition (Debezium keys by primary key), so
//! a change is a replay exactly when its own partition's offset is behind
//! what the entity reflects; offsets of different partitions are not
//! compared. The source resumes from its checkpoint (every partition from
//! its offset; a partition not in it from the beginning), and commits the
//! acknowledged offsets to its consumer group (`group_id`, default
//! `<prefix>.source.<name>`) for monitoring tools.
//!
//! Invariants:
//! - Partitions are assigned by the source itself (no group rebalancing):
//!   every partition of every listed topic, as they are at start. A topic
//!   that does not exist yet is waited for (retry with backoff).
//! - A message that cannot be decoded goes to the dead-letter output (and
//!   the `<prefix>.dlq` topic) with its key and origin, and is skipped.
//!   Tombstones, heartbeats and schema changes are skipped silently.
//! - A stored offset the topic no longer holds (retention) is an error that
//!   names the partition: skipping ahead would lose changes.

use super::debezium;
use super::{Source, SourceContext, SourceError};
use crate::bus::kafka::client_config;
use crate::bus::kafka::{BaseConsumer, Quiet, StreamConsumer, create};
use crate::config::{Config, SourceConfig};
use crate::event::{Position, SourceTxn};
use crate::telemetry::DeadInput;
use async_trait::async_trait;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Message, TopicPartitionList};
use std::collections::BTreeMap;
use std::time::Duration;

pub struct DebeziumKafkaSource {
    name: String,
    topics: Vec<String>,
    client: ClientConfig,
    group_id: String,
}

impl DebeziumKafkaSource {
    pub fn new(cfg: &SourceConfig, config: &Config) -> Result<Self, SourceError> {
        let bus = config.bus.kafka.as_ref();
        let brokers = cfg
            .brokers
            .clone()
            .or_else(|| bus.map(|k| k.brokers.clone()))
            .ok_or_else(|| SourceError::Config {
                source_name: cfg.name.clone(),
                reason: "a debezium_kafka source needs brokers".into(),
            })?;
        let properties = bus.map(|k| k.properties.clone()).unwrap_or_default();
        let prefix = bus.map_or("fabric", |k| k.topic_prefix.as_str());
        Ok(DebeziumKafkaSource {
            name: cfg.name.clone(),
            topics: cfg.topics.clone(),
            client: client_config(&brokers, &properties),
            group_id: cfg
                .group_id
                .clone()
                .unwrap_or_else(|| format!("{prefix}.source.{}", cfg.name)),
        })
    }

    fn external(&self, operation: &str, e: impl std::fmt::Display) -> SourceError {
        SourceError::external(&self.name, operation, e)
    }

    /// Every partition of every topic, or an error naming a missing topic.
    async fn partitions(&self) -> Result<Vec<(String, i32)>, SourceError> {
        let client = self.client.clone();
        let topics = self.topics.clone();
        let found = tokio::task::spawn_blocking(move || -> Result<Vec<(String, i32)>, String> {
            let c: BaseConsumer = create(&client).map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            for t in &topics {
                let md = c
                    .fetch_metadata(Some(t), Duration::from_secs(10))
                    .map_err(|e| e.to_string())?;
                let parts = md
                    .topics()
                    .first()
                    .filter(|m| m.error().is_none())
                    .map_or(0, |m| m.partitions().len());
                if parts == 0 {
                    return Err(format!("topic {t} does not exist (yet)"));
                }
                out.extend((0..parts as i32).map(|p| (t.clone(), p)));
            }
            Ok(out)
        })
        .await
        .map_err(|e| self.external("read topic metadata", e))?;
        found.map_err(|e| self.external("read topic metadata", e))
    }

    fn commit(&self, consumer: &StreamConsumer, durable: &Position) {
        let Position::Kafka { next, .. } = durable else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        for (tp, o) in next {
            if let Some((t, p)) = split_tp(tp) {
                let _ = tpl.add_partition_offset(t, p, rdkafka::Offset::Offset(*o as i64));
            }
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::warn!(error = %e, "cannot commit the acknowledged offsets");
        }
    }
}

fn split_tp(tp: &str) -> Option<(&str, i32)> {
    let (t, p) = tp.rsplit_once('/')?;
    Some((t, p.parse().ok()?))
}

#[async_trait]
impl Source for DebeziumKafkaSource {
    async fn run(self: Box<Self>, mut ctx: SourceContext) -> Result<(), SourceError> {
        ctx.status.set_state("connecting");
        let parts = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            p = self.partitions() => p?,
        };
        let mut next: BTreeMap<String, u64> = match &ctx.resume {
            Some(Position::Kafka { next, .. }) => next.clone(),
            Some(other) => {
                return Err(SourceError::Config {
                    source_name: self.name.clone(),
                    reason: format!(
                        "the checkpoint {other} is not a Kafka position: the source changed kind; give it a new name to read from the start"
                    ),
                });
            }
            None => BTreeMap::new(),
        };
        let consumer: StreamConsumer = self
            .client
            .clone()
            .set("group.id", &self.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "error")
            .create_with_context(Quiet::default())
            .map_err(|e| self.external("create a consumer", e))?;
        let mut tpl = TopicPartitionList::new();
        for (t, p) in &parts {
            let offset = match next.get(&format!("{t}/{p}")) {
                Some(o) => rdkafka::Offset::Offset(*o as i64),
                None => rdkafka::Offset::Beginning,
            };
            tpl.add_partition_offset(t, *p, offset)
                .map_err(|e| self.external("assign", e))?;
        }
        consumer
            .assign(&tpl)
            .map_err(|e| self.external("assign", e))?;
        tracing::info!(topics = ?self.topics, partitions = parts.len(), "reading debezium topics");
        ctx.status.set_state("streaming");
        let idle = Duration::from_millis(500);
        loop {
            let msg = tokio::select! {
                biased;
                _ = ctx.shutdown.cancelled() => return Ok(()),
                changed = ctx.durable.changed() => {
                    if changed.is_ok()
                        && let Some(p) = ctx.durable.borrow_and_update().clone()
                    {
                        self.commit(&consumer, &p);
                    }
                    continue;
                }
                m = tokio::time::timeout(idle, consumer.recv()) => m,
            };
            let m = match msg {
                Err(_) => {
                    ctx.status.set_caught_up(true);
                    continue;
                }
                Ok(Err(e)) => {
                    if let Some(fatal) = fatal(&self.name, e) {
                        return Err(fatal);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Ok(Ok(m)) => m,
            };
            ctx.status.set_caught_up(false);
            let tp = format!("{}/{}", m.topic(), m.partition());
            next.insert(tp.clone(), m.offset() as u64 + 1);
            let Some(payload) = m.payload() else {
                continue; // a tombstone
            };
            match debezium::decode(payload) {
                Ok(ev) => {
                    let Some(change) = ev.change else { continue };
                    let txn = SourceTxn {
                        source: ctx.name.clone(),
                        position: Position::Kafka {
                            next: next.clone(),
                            at: tp,
                        },
                        commit_micros: ev.commit_micros,
                        changes: vec![change],
                    };
                    drop(m);
                    tokio::select! {
                        biased;
                        _ = ctx.shutdown.cancelled() => return Ok(()),
                        r = ctx.send(txn) => r?,
                    }
                }
                Err(e) => {
                    let origin = format!("{tp}@{}", m.offset());
                    let table = debezium::peek_table(payload).unwrap_or_default();
                    ctx.dead_letters.record_input(DeadInput {
                        source: &ctx.name,
                        table: &table,
                        reason: &format!("cannot decode a Debezium message: {e}"),
                        key: m.key(),
                        raw: payload,
                        origin: Some(&origin),
                    });
                }
            }
        }
    }
}

/// An error that ends the source: an offset the topic no longer holds.
/// Anything else is logged and the read retried (librdkafka reconnects).
fn fatal(source: &str, e: KafkaError) -> Option<SourceError> {
    if let Some(
        RDKafkaErrorCode::UnknownTopicOrPartition
        | RDKafkaErrorCode::UnknownTopic
        | RDKafkaErrorCode::TopicAuthorizationFailed,
    ) = e.rdkafka_error_code()
    {
        // The source restarts with backoff, the error shown in its status.
        return Some(SourceError::external(source, "read the topics", e));
    }
    if let Some(RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange) =
        e.rdkafka_error_code()
    {
        return Some(SourceError::Config {
            source_name: source.to_string(),
            reason: format!(
                "{e}: the checkpoint's offset is no longer held by the topic (retention); \
                 the changes in between are gone. Re-snapshot the Debezium connector and \
                 give this source a new name to read its topics from the start"
            ),
        });
    }
    tracing::warn!(source, error = %e, "kafka read failed; retrying");
    None
}
