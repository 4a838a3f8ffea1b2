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
//! `fabric.operation` (`upsert`, `delete`, or `forget` for an entity erased
//! on request: erase every copy of it), `fabric.changed_tables`
//! (comma-separated). The JSON document is described in docs/kafka.md.
//!
//! Delivery is at least once: the applier waits for the broker to take a
//! batch's messages before it counts the batch applied, so a snapshot never
//! reflects a version that was not published. After a crash, the versions
//! applied since the last snapshot are applied and published again with the
//! same version numbers: consumers keep the highest version per key (a
//! re-created entity goes on from the version of its delete). Quiet
//! changes (a deleted entity's hidden rows changing) are not published.

use crate::bus::BusError;
use crate::bus::kafka::{Outgoing, client_config, durable_producer, ensure_topic, write_in_order};
use crate::config::{Config, EntitiesFormat, KafkaConfig};
use crate::store::EntityChange;
use crate::telemetry::{DeadInput, DeadLetters};
use crate::view::View;
use rdkafka::message::{Header, OwnedHeaders};
use std::collections::HashMap;
use std::sync::Arc;

/// Produces entity changes to the entities topic.
pub struct EntityPublisher {
    producer: crate::bus::kafka::Producer,
    topic: String,
    format: EntitiesFormat,
    /// Per entity type, the view published (None: the whole entity).
    views: HashMap<String, Option<Arc<View>>>,
    partitions: u32,
    dead_letters: Arc<DeadLetters>,
}

impl EntityPublisher {
    /// Connects and creates the topic (compacted) when it is missing.
    pub async fn connect(
        k: &KafkaConfig,
        config: &Config,
        views: &crate::view::Views,
        dead_letters: Arc<DeadLetters>,
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
                    .and_then(|name| views.get(&e.name, name));
                (e.name.clone(), v)
            })
            .collect();
        Ok(EntityPublisher {
            producer,
            topic,
            format: k.entities_format,
            views,
            partitions,
            dead_letters,
        })
    }

    /// Produces one message per change, in order, and returns once the broker
    /// took all of them. The producer retries by itself for as long as it
    /// takes (the broker away, a leader moving), so an error here is final
    /// for that message: one the broker refuses for its content (too large)
    /// goes to the dead-letter output and the pipeline goes on; any other
    /// (not authorised, a fatal producer state) is returned and stops the
    /// fabric, rather than leaving a hole in the topic or resending versions
    /// out of order.
    pub async fn publish(&self, changes: &[Arc<EntityChange>]) -> Result<(), BusError> {
        // Quiet changes (a retired entity's hidden rows) are not for readers.
        let changes: Vec<&Arc<EntityChange>> = changes.iter().filter(|c| !c.quiet).collect();
        let encoded: Vec<Encoded> = changes.iter().map(|c| self.encode(c)).collect();
        // In order; records refused because the partition is gone (the topic
        // was deleted) are sent again, in order, and held until it exists.
        // A refusal at hand-over (too large) is judged like one at delivery.
        let outgoing: Vec<Outgoing> = encoded
            .iter()
            .map(|m| Outgoing {
                partition: m.partition,
                key: m.key.as_bytes(),
                value: m.value.as_deref(),
                headers: Some(&m.headers),
            })
            .collect();
        let results = write_in_order(&self.producer, &self.topic, &outgoing).await?;
        for ((c, m), r) in changes.iter().zip(&encoded).zip(results) {
            let Err(e) = r else { continue };
            use rdkafka::types::RDKafkaErrorCode::*;
            match e.rdkafka_error_code() {
                Some(MessageSizeTooLarge | InvalidMessageSize | InvalidRecord | InvalidMessage) => {
                    let reason = format!(
                        "cannot publish version {} on {}: {e}",
                        c.version, self.topic
                    );
                    self.dead_letters.record_input(DeadInput {
                        source: "entities",
                        table: &c.key.entity_type,
                        reason: &reason,
                        key: Some(m.key.as_bytes()),
                        raw: m.value.as_deref().unwrap_or_default(),
                        origin: None,
                    });
                }
                _ => {
                    return Err(BusError::Kafka {
                        operation: format!(
                            "publish version {} of {} on {}",
                            c.version, c.key, self.topic
                        ),
                        reason: e.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    fn encode(&self, c: &EntityChange) -> Encoded {
        let view = self
            .views
            .get(&*c.key.entity_type)
            .and_then(|v| v.as_deref());
        let version = c.version.to_string();
        let tables = c
            .changed_tables
            .iter()
            .map(|t| &**t)
            .collect::<Vec<_>>()
            .join(",");
        let operation = match (&c.entity, c.forgotten) {
            (Some(_), _) => "upsert",
            (None, false) => "delete",
            (None, true) => "forget",
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
            EntitiesFormat::Protobuf => crate::grpc::encode::entity(e, view),
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
