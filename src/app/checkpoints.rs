//! Source checkpoints on Kafka: the topic `<prefix>.checkpoints`.
//!
//! On the Kafka bus the changes topic is what is durable: once a source's
//! changes up to a position are acknowledged by the broker, that position
//! is safe to resume from (invariant 3), whichever process resumes it. The
//! router's checkpoint of each source running here is written to this
//! compacted topic (key: the source's name, value: the position as JSON)
//! and, once the broker has it, acknowledged to the source.
//!
//! One partition: a process that takes a source over reads the whole
//! (compacted, hence small) topic for its checkpoint.

use crate::bus::BusError;
use crate::bus::kafka::{self, Producer, client_config, durable_producer, ensure_topic};
use crate::config::KafkaConfig;
use crate::event::Position;
use rdkafka::Message;
use rdkafka::producer::FutureRecord;
use std::collections::HashMap;

pub struct CheckpointTopic {
    pub topic: String,
    client: rdkafka::ClientConfig,
    producer: Producer,
}

impl CheckpointTopic {
    /// Connects, creating the topic (compacted) when it is missing.
    pub async fn connect(k: &KafkaConfig) -> Result<Self, BusError> {
        let client = client_config(&k.brokers, &k.properties);
        let topic = k.topic("checkpoints");
        ensure_topic(
            &client,
            &topic,
            1,
            k.replication,
            &[("cleanup.policy", "compact")],
        )
        .await?;
        Ok(CheckpointTopic {
            producer: durable_producer(&client)?,
            topic,
            client,
        })
    }

    /// The newest checkpoint of every source.
    pub async fn read(&self) -> Result<HashMap<String, Position>, BusError> {
        let client = self.client.clone();
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || read_partition(&client, &topic, 0))
            .await
            .map_err(|e| BusError::Kafka {
                operation: "read checkpoints".into(),
                reason: e.to_string(),
            })?
    }

    /// Writes `position` as the checkpoint of `source`; resolves once the
    /// broker has it. Calls made one after another land in that order.
    pub async fn write(
        &self,
        source: &str,
        position: &Position,
    ) -> Result<impl std::future::Future<Output = Result<(), BusError>> + use<>, BusError> {
        let value = serde_json::to_vec(position).map_err(|e| BusError::Kafka {
            operation: "encode a checkpoint".into(),
            reason: e.to_string(),
        })?;
        let record = FutureRecord::to(&self.topic)
            .partition(0)
            .key(source)
            .payload(value.as_slice());
        let delivery = kafka::send_in_order(&self.producer, record)
            .await
            .map_err(kafka::kafka("write a checkpoint"))?;
        Ok(async move {
            delivery
                .await
                .map_err(|_| BusError::Closed)?
                .map(|_| ())
                .map_err(|(e, _)| kafka::kafka("write a checkpoint")(e))
        })
    }
}

/// Reads `partition` of `topic` from its start to its end now; the last
/// value of each key wins. Blocking.
fn read_partition(
    client: &rdkafka::ClientConfig,
    topic: &str,
    partition: u32,
) -> Result<HashMap<String, Position>, BusError> {
    let mut out = HashMap::new();
    kafka::read_whole_partition(client, topic, partition, |m| {
        let Some(k) = m.key() else { return Ok(()) };
        let key = String::from_utf8_lossy(k).to_string();
        match m.payload().map(serde_json::from_slice::<Position>) {
            Some(Ok(p)) => {
                out.insert(key, p);
            }
            Some(Err(e)) => tracing::warn!(
                topic,
                partition,
                offset = m.offset(),
                error = %e,
                "unreadable checkpoint skipped"
            ),
            // A tombstone: the checkpoint was removed.
            None => {
                out.remove(&key);
            }
        }
        Ok(())
    })?;
    Ok(out)
}
