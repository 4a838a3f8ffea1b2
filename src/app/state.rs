//! The state topic, `<prefix>.state`: every micro-DB as it is now, so that a
//! process given a partition restores it from the broker instead of needing
//! the disk of the process that held it before, or the whole history of the
//! changes topic.
//!
//! Partition `p` of the topic mirrors bus partition `p`: one message per
//! entity (key `<type>/<id>`, value a format byte (2; 1, without row
//! lineage, is still read) and the entity in postcard encoding, the same
//! encoding as snapshot files; a tombstone when the
//! entity is deleted), compacted, so the topic holds the newest state of
//! every entity. After each applied batch the applier also writes the key
//! [`OFFSET_KEY`] with the bus offset the partition's state now reflects.
//! Both go before the batch counts as applied (as the entities topic does),
//! through one idempotent producer, in order: so when the newest offset
//! record says `o`, every entity message of the records below `o` is on the
//! topic before it.
//!
//! A forgotten entity is a tombstone like a deleted one; when its later
//! changes are blocked, the key `!blocked/<type>/<id>` holds when it was
//! forgotten (decimal microseconds), written with the batch that forgot it
//! and removed (tombstone) when it is unblocked: a process restoring the
//! partition from the topic keeps it blocked.
//!
//! Restore of partition `p`: read the partition from its start to its end
//! now; the entities are the state at the last offset record's `o`; the
//! changes topic is replayed from `o` (a record applied twice is applied
//! once). A process prefers its local snapshot when that is newer.

use crate::bus::BusError;
use crate::bus::kafka::{
    self, Producer, client_config, durable_producer, ensure_topic, send_in_order,
};
use crate::config::KafkaConfig;
use crate::store::{Entity, EntityChange};
use rdkafka::Message;
use rdkafka::producer::FutureRecord;
use std::collections::HashMap;
use std::sync::Arc;

/// The key of the per-partition offset record.
pub const OFFSET_KEY: &str = "!offset";
/// The prefix of a blocked id's key.
pub const BLOCKED_PREFIX: &str = "!blocked/";
/// The entity in postcard encoding, as snapshot files of format 1 hold it
/// (no row lineage): still read.
const FORMAT_POSTCARD_V1: u8 = 1;
/// The entity in postcard encoding, with row lineage.
const FORMAT_POSTCARD: u8 = 2;

pub struct StateTopic {
    topic: String,
    client: rdkafka::ClientConfig,
    producer: Producer,
}

/// What a partition of the state topic holds.
pub struct Restored {
    /// The bus offset the entities reflect.
    pub offset: u64,
    pub entities: Vec<Entity>,
    /// Forgotten ids whose changes are blocked, and when each was forgotten.
    pub blocked: Vec<(crate::event::EntityKey, i64)>,
}

impl StateTopic {
    /// Connects, creating the topic (compacted, `partitions` partitions)
    /// when it is missing.
    pub async fn connect(k: &KafkaConfig, partitions: u32) -> Result<Self, BusError> {
        let client = client_config(&k.brokers, &k.properties);
        let topic = k.topic("state");
        ensure_topic(
            &client,
            &topic,
            partitions,
            k.replication,
            &[("cleanup.policy", "compact")],
        )
        .await?;
        Ok(StateTopic {
            producer: durable_producer(&client)?,
            topic,
            client,
        })
    }

    /// Writes the entities `changes` left in `partition` (the newest state
    /// of each) and then the offset the partition reflects; resolves once
    /// the broker has them all.
    pub async fn write(
        &self,
        partition: u32,
        changes: &[Arc<EntityChange>],
        marks: &[super::applier::Mark],
        offset: u64,
    ) -> Result<(), BusError> {
        // The newest change of each entity in the batch.
        let mut newest: HashMap<&crate::event::EntityKey, &EntityChange> = HashMap::new();
        for c in changes {
            newest.insert(&c.key, c);
        }
        let mut deliveries = Vec::with_capacity(newest.len() + 1);
        for c in changes {
            if !newest.get(&c.key).is_some_and(|n| std::ptr::eq(*n, &**c)) {
                continue;
            }
            let key = c.key.bus_key();
            let value = match &c.entity {
                Some(e) => Some(encode_entity(e)?),
                None => None,
            };
            let mut record = FutureRecord::to(&self.topic)
                .partition(partition as i32)
                .key(key.as_str());
            if let Some(v) = &value {
                record = record.payload(v.as_slice());
            }
            deliveries.push(
                send_in_order(&self.producer, record)
                    .await
                    .map_err(kafka::kafka("write an entity's state"))?,
            );
        }
        for (key, at) in marks {
            let k = format!("{BLOCKED_PREFIX}{key}");
            let v = at.map(|t| t.to_string());
            let mut record = FutureRecord::to(&self.topic)
                .partition(partition as i32)
                .key(k.as_str());
            if let Some(v) = &v {
                record = record.payload(v.as_bytes());
            }
            deliveries.push(
                send_in_order(&self.producer, record)
                    .await
                    .map_err(kafka::kafka("write a blocked id"))?,
            );
        }
        for d in deliveries {
            d.await
                .map_err(|_| BusError::Closed)?
                .map_err(|(e, _)| kafka::kafka("write an entity's state")(e))?;
        }
        // Only once the entities are there does the offset say so.
        let o = offset.to_string();
        let record = FutureRecord::to(&self.topic)
            .partition(partition as i32)
            .key(OFFSET_KEY)
            .payload(o.as_bytes());
        send_in_order(&self.producer, record)
            .await
            .map_err(kafka::kafka("write the state offset"))?
            .await
            .map_err(|_| BusError::Closed)?
            .map_err(|(e, _)| kafka::kafka("write the state offset")(e))?;
        Ok(())
    }

    /// Reads partition `p` whole; `None` when it holds no offset record
    /// (nothing was ever applied into it).
    pub async fn read(&self, partition: u32) -> Result<Option<Restored>, BusError> {
        let client = self.client.clone();
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || read_partition(&client, &topic, partition))
            .await
            .map_err(|e| BusError::Kafka {
                operation: "read the state topic".into(),
                reason: e.to_string(),
            })?
    }
}

/// An entity's value on the topic. Without row lineage, in the format
/// builds before lineage read (1: the same bytes without the trailing
/// `None` of the lineage), so a process of an older build that takes a
/// partition over during a rolling upgrade can still restore it.
fn encode_entity(e: &Entity) -> Result<Vec<u8>, BusError> {
    let bad = |e: postcard::Error| BusError::Kafka {
        operation: "encode an entity's state".into(),
        reason: e.to_string(),
    };
    let mut v = postcard::to_extend(e, vec![FORMAT_POSTCARD]).map_err(bad)?;
    if e.lineage.is_none() {
        debug_assert_eq!(v.last(), Some(&0), "lineage is the last field");
        v.pop();
        v[0] = FORMAT_POSTCARD_V1;
    }
    Ok(v)
}

fn read_partition(
    client: &rdkafka::ClientConfig,
    topic: &str,
    partition: u32,
) -> Result<Option<Restored>, BusError> {
    let mut entities: HashMap<Vec<u8>, Entity> = HashMap::new();
    let mut blocked: HashMap<Vec<u8>, i64> = HashMap::new();
    let mut offset = None;
    kafka::read_whole_partition(client, topic, partition, |m| {
        let key = m.key().unwrap_or_default();
        let bad = |reason: String| BusError::Kafka {
            operation: format!("read {topic}/{partition}@{}", m.offset()),
            reason,
        };
        if key == OFFSET_KEY.as_bytes() {
            offset = m
                .payload()
                .and_then(|p| std::str::from_utf8(p).ok())
                .and_then(|s| s.parse::<u64>().ok())
                .or(offset);
            return Ok(());
        }
        if key.starts_with(BLOCKED_PREFIX.as_bytes()) {
            match m.payload() {
                None => {
                    blocked.remove(key);
                }
                Some(p) => {
                    let at = std::str::from_utf8(p)
                        .ok()
                        .and_then(|s| s.parse::<i64>().ok())
                        .ok_or_else(|| bad("a blocked id's time is not a number".into()))?;
                    blocked.insert(key.to_vec(), at);
                }
            }
            return Ok(());
        }
        match m.payload() {
            None => {
                entities.remove(key);
            }
            Some([FORMAT_POSTCARD, rest @ ..]) => {
                let e = postcard::from_bytes::<Entity>(rest)
                    .map_err(|e| bad(format!("an entity's state does not decode: {e}")))?;
                entities.insert(key.to_vec(), e);
            }
            Some([FORMAT_POSTCARD_V1, rest @ ..]) => {
                let e = postcard::from_bytes::<crate::store::EntityV1>(rest)
                    .map_err(|e| bad(format!("an entity's state does not decode: {e}")))?;
                entities.insert(key.to_vec(), e.into());
            }
            Some(_) => return Err(bad("unknown state format".into())),
        }
        Ok(())
    })?;
    let blocked = blocked
        .into_iter()
        .filter_map(|(k, at)| {
            let k = std::str::from_utf8(&k[BLOCKED_PREFIX.len()..]).ok()?;
            let (ty, id) = k.split_once('/')?;
            Some((crate::event::EntityKey::new(ty, id), at))
        })
        .collect();
    Ok(offset.map(|offset| Restored {
        offset,
        entities: entities.into_values().collect(),
        blocked,
    }))
}
