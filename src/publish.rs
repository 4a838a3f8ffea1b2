//! The entities topic, `<prefix>.entities`: every entity change, for any
//! Kafka consumer.
//!
//! One message per entity version, keyed `<type>/<id>`, in the partition of
//! the entity's bus partition (so the topic needs at least `bus.partitions`
//! partitions, and one entity's versions are in order in one partition). The
//! value is the entity after the change through the type's `publish_view`
//! (the same views and masks as gRPC), as a JSON document or as a
//! `fabric.v1.Entity` protobuf message; a deleted entity is a tombstone (no
//! value), so the topic is fit for log compaction and is created compacted
//! (unless `entities_compacted = false`).
//! Headers on every message: `fabric.type`, `fabric.id`, `fabric.version`,
//! `fabric.operation` (`upsert` or `delete`), `fabric.changed_tables`
//! (comma-separated). The JSON document is described in docs/kafka.md.
//!
//! Delivery is at least once: the applier waits for the broker to take a
//! batch's messages before it counts the batch applied, so a snapshot never
//! reflects a version that was not published. After a crash, the versions
//! applied since the last snapshot are applied and published again with the
//! same version numbers: consumers keep the highest version per key.

use crate::bus::BusError;
use crate::bus::kafka::{client_config, durable_producer, ensure_topic};
use crate::config::{Config, EntitiesFormat, KafkaConfig};
use crate::store::EntityChange;
use crate::view::View;
use prost::Message as _;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Produces entity changes to the entities topic.
pub struct EntityPublisher {
    producer: FutureProducer,
    topic: String,
    format: EntitiesFormat,
    /// Per entity type, the view published (None: the whole entity).
    views: HashMap<String, Option<View>>,
    partitions: u32,
}

impl EntityPublisher {
    /// Connects and creates the topic (compacted) when it is missing.
    pub async fn connect(
        k: &KafkaConfig,
        config: &Config,
        views: &HashMap<String, HashMap<String, View>>,
    ) -> Result<Self, BusError> {
        let client = client_config(&k.brokers, &k.properties);
        let topic = k.topic("entities");
        let partitions = config.bus.partitions;
        let compact: &[(&str, &str)] = if k.entities_compacted {
            &[("cleanup.policy", "compact")]
        } else {
            &[]
        };
        ensure_topic(&client, &topic, partitions, k.replication, compact).await?;
        let producer = durable_producer(&client)?;
        let views = config
            .entities
            .iter()
            .map(|e| {
                let v = e
                    .publish_view
                    .as_ref()
                    .and_then(|name| views.get(&e.name).and_then(|vs| vs.get(name)).cloned());
                (e.name.clone(), v)
            })
            .collect();
        Ok(EntityPublisher {
            producer,
            topic,
            format: k.entities_format,
            views,
            partitions,
        })
    }

    /// Produces one message per change, in order, and returns once the broker
    /// took all of them. A message the broker refuses for good (too large,
    /// not authorised) is logged and retried with backoff: entity changes are
    /// never dropped silently, the pipeline waits instead.
    pub async fn publish(&self, changes: &[Arc<EntityChange>]) {
        let mut pending: Vec<&Arc<EntityChange>> = changes.iter().collect();
        let mut backoff = Duration::from_millis(200);
        while !pending.is_empty() {
            let encoded: Vec<Encoded> = pending.iter().map(|c| self.encode(c)).collect();
            let sends = encoded.iter().map(|m| {
                let mut r = FutureRecord::to(&self.topic)
                    .partition(m.partition as i32)
                    .key(m.key.as_str())
                    .headers(m.headers.clone());
                if let Some(v) = &m.value {
                    r = r.payload(v.as_slice());
                }
                self.producer.send(r, Timeout::Never)
            });
            let results = futures::future::join_all(sends).await;
            let mut failed = Vec::new();
            for (c, r) in pending.iter().zip(results) {
                if let Err((e, _)) = r {
                    tracing::error!(key = %c.key, version = c.version, error = %e,
                        "cannot publish an entity change; retrying");
                    failed.push(*c);
                }
            }
            if failed.is_empty() {
                return;
            }
            // Retry the failed ones, in order (a consumer keeps the highest
            // version per key, so a later version arriving first is harmless
            // only if the older one is also re-sent: it is).
            pending = failed;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    fn encode(&self, c: &EntityChange) -> Encoded {
        let view = self.views.get(&*c.key.entity_type).and_then(|v| v.as_ref());
        let version = c.version.to_string();
        let tables = c
            .changed_tables
            .iter()
            .map(|t| &**t)
            .collect::<Vec<_>>()
            .join(",");
        let operation = if c.entity.is_some() {
            "upsert"
        } else {
            "delete"
        };
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "fabric.type",
                value: Some(&*c.key.entity_type),
            })
            .insert(Header {
                key: "fabric.id",
                value: Some(&*c.key.id),
            })
            .insert(Header {
                key: "fabric.version",
                value: Some(&version),
            })
            .insert(Header {
                key: "fabric.operation",
                value: Some(operation),
            })
            .insert(Header {
                key: "fabric.changed_tables",
                value: Some(&tables),
            });
        let value = c.entity.as_ref().map(|e| match self.format {
            EntitiesFormat::Json => {
                serde_json::to_vec(&document(c, e, view)).expect("a json value serialises")
            }
            EntitiesFormat::Protobuf => crate::view::to_proto(e, view).encode_to_vec(),
        });
        Encoded {
            key: c.key.bus_key(),
            partition: c.key.partition(self.partitions),
            headers,
            value,
        }
    }
}

struct Encoded {
    key: String,
    partition: u32,
    headers: OwnedHeaders,
    value: Option<Vec<u8>>,
}

/// The JSON document of one entity version (see docs/kafka.md).
pub fn document(
    c: &EntityChange,
    e: &crate::store::Entity,
    view: Option<&View>,
) -> serde_json::Value {
    let mut doc = crate::view::to_json(e, view);
    if let serde_json::Value::Object(m) = &mut doc {
        m.insert("operation".into(), "upsert".into());
        m.insert(
            "changed_tables".into(),
            c.changed_tables
                .iter()
                .map(|t| serde_json::Value::String(t.to_string()))
                .collect(),
        );
        m.insert(
            "view".into(),
            view.map_or(serde_json::Value::Null, |v| v.name.clone().into()),
        );
    }
    doc
}
