//! The bus: the ordered, partitioned log between the router and the appliers.
//!
//! One trait, [`Bus`], and its implementations: [`embedded`] (in-process,
//! the default) and, in Kafka mode, a Kafka topic. Every implementation
//! passes the same contract suite (`tests/bus_contract.rs`):
//!
//! - records of one partition are read in the order they were appended,
//!   each with its offset; offsets of a partition are dense and increasing;
//! - `produce` returns only once the records are appended (on Kafka: acknowledged);
//! - a consumer started at offset `o` sees exactly the records from `o` on;
//! - a consumer waits for records that are not there yet.
//!
//! Partitioning is not the bus's choice: the router picks the partition of an
//! entity key with [`crate::event::EntityKey::partition`], so the store's shards
//! and the bus agree.

pub mod embedded;
pub mod kafka;
pub mod members;

use crate::event::BusRecord;
use async_trait::async_trait;
use std::fmt;
use std::sync::Arc;

/// An offset in one bus partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Offset(pub u64);

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus partition {partition} does not exist (the bus has {partitions})")]
    NoSuchPartition { partition: u32, partitions: u32 },
    #[error(
        "bus partition {partition}: offset {requested} is no longer held (earliest is {earliest})"
    )]
    OffsetOutOfRange {
        partition: u32,
        requested: u64,
        earliest: u64,
    },
    #[error("bus partition {partition} already has a consumer")]
    ConsumerExists { partition: u32 },
    #[error("the bus is closed")]
    Closed,
    /// The broker refused or failed an operation; retrying may help.
    #[error("kafka: {operation}: {reason}")]
    Kafka { operation: String, reason: String },
    /// The topics do not fit the config; retrying cannot help.
    #[error("kafka: {0}")]
    Mismatch(String),
    /// The broker no longer knows the topic or one of its partitions (it
    /// was deleted, or made again with fewer partitions) and failed the
    /// records queued for it: what the fabric holds stays served, nothing
    /// more can be written until an operator acts (docs/kafka.md, Faults).
    #[error("kafka: {topic} partition {partition} is gone ({reason})")]
    TopicGone {
        topic: String,
        partition: u32,
        reason: String,
    },
    /// An applier could not make a forget durable (delete the entity's
    /// snapshot key, write the blocked ids): it stops rather than report
    /// the forget done.
    #[error("cannot make a forget durable: {0}")]
    Keystore(String),
}

/// The acknowledgement of records handed to [`Bus::enqueue`].
pub type Acked =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Offset>, BusError>> + Send>>;

/// A record read from the bus.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub partition: u32,
    pub offset: Offset,
    pub record: Arc<BusRecord>,
}

/// The reading end of one partition.
#[async_trait]
pub trait PartitionConsumer: Send {
    /// Waits for at least one record, then returns up to `max` in order.
    /// Returns an empty batch only when the bus is closed.
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivered>, BusError>;
}

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    fn partitions(&self) -> u32;

    /// Appends each record to its partition, in the order given; returns
    /// their offsets once appended. May wait (backpressure).
    async fn produce(&self, records: Vec<(u32, BusRecord)>) -> Result<Vec<Offset>, BusError>;

    /// Starts appending `records` (in order, after every record of earlier
    /// calls) and returns once they are handed on, with a future that
    /// resolves to their offsets once appended. Lets a producer keep many
    /// batches in flight while their order holds.
    async fn enqueue(&self, records: Vec<(u32, BusRecord)>) -> Result<Acked, BusError> {
        let result = self.produce(records).await;
        Ok(Box::pin(async move { result }))
    }

    /// Reads `partition` from offset `from` on.
    async fn consume(
        &self,
        partition: u32,
        from: Offset,
    ) -> Result<Box<dyn PartitionConsumer>, BusError>;

    /// The offset the next record appended to `partition` will get.
    fn end_offset(&self, partition: u32) -> Offset;

    /// The oldest offset `partition` still holds: where a reader with no
    /// snapshot of it starts to rebuild it from its whole history.
    async fn start_offset(&self, partition: u32) -> Result<Offset, BusError> {
        let _ = partition;
        Ok(Offset(0))
    }

    /// The newest end of `partition` as the log itself knows it (records
    /// other processes appended included): what a reader must reach to be
    /// current. The embedded bus has no other writers.
    async fn log_end(&self, partition: u32) -> Result<Offset, BusError> {
        Ok(self.end_offset(partition))
    }

    /// The offset last committed for `partition` (by any process of the
    /// fabric), if any.
    async fn committed(&self, partition: u32) -> Result<Option<Offset>, BusError> {
        let _ = partition;
        Ok(None)
    }

    /// Everything below `offset` in `partition` is durable elsewhere (a
    /// snapshot): the bus may drop it, and Kafka commits it.
    async fn commit(&self, partition: u32, offset: Offset) -> Result<(), BusError>;

    /// Wakes every consumer with an empty batch and refuses further produces.
    fn close(&self);
}
