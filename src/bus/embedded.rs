//! The embedded bus: an in-process log per partition.
//!
//! Each partition is a queue of `Arc<BusRecord>` with a base offset. A
//! partition has one consumer; records are dropped once that consumer has
//! read them (a crash loses the whole process anyway, and the snapshots plus
//! the sources' checkpoints are what restart from). Producers wait while a
//! partition holds `max_buffered` unread records: backpressure reaches the
//! sources instead of memory growing without bound.

use super::{Bus, BusError, Delivered, Offset, PartitionConsumer};
use crate::event::BusRecord;
use async_trait::async_trait;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::Notify;

struct Log {
    /// Offset of `records[0]`.
    base: u64,
    records: VecDeque<Arc<BusRecord>>,
    has_consumer: bool,
}

struct Partition {
    log: Mutex<Log>,
    /// Signalled on append and on close.
    appended: Notify,
    /// Signalled when the consumer makes room.
    drained: Notify,
}

pub struct EmbeddedBus {
    parts: Vec<Arc<Partition>>,
    max_buffered: usize,
    closed: Arc<AtomicBool>,
}

impl EmbeddedBus {
    /// A bus of `partitions` partitions whose offsets start at `start[p]`
    /// (e.g. the offsets restored snapshots reflect), or 0.
    pub fn new(partitions: u32, max_buffered: usize, start: &[u64]) -> Self {
        EmbeddedBus {
            parts: (0..partitions.max(1))
                .map(|p| {
                    Arc::new(Partition {
                        log: Mutex::new(Log {
                            base: start.get(p as usize).copied().unwrap_or(0),
                            records: VecDeque::new(),
                            has_consumer: false,
                        }),
                        appended: Notify::new(),
                        drained: Notify::new(),
                    })
                })
                .collect(),
            max_buffered: max_buffered.max(1),
            closed: Arc::new(AtomicBool::new(false)),
        }
    }

    fn part(&self, p: u32) -> Result<&Arc<Partition>, BusError> {
        self.parts.get(p as usize).ok_or(BusError::NoSuchPartition {
            partition: p,
            partitions: self.parts.len() as u32,
        })
    }
}

#[async_trait]
impl Bus for EmbeddedBus {
    fn partitions(&self) -> u32 {
        self.parts.len() as u32
    }

    async fn produce(&self, records: Vec<(u32, BusRecord)>) -> Result<Vec<Offset>, BusError> {
        let mut offsets = Vec::with_capacity(records.len());
        for (p, record) in records {
            let part = self.part(p)?;
            let record = Arc::new(record);
            loop {
                if self.closed.load(Ordering::Acquire) {
                    return Err(BusError::Closed);
                }
                // Register for the wake-up before checking, so none is missed.
                let drained = part.drained.notified();
                {
                    let mut log = part.log.lock();
                    if log.records.len() < self.max_buffered {
                        let offset = log.base + log.records.len() as u64;
                        log.records.push_back(record.clone());
                        offsets.push(Offset(offset));
                        break;
                    }
                }
                drained.await;
            }
            part.appended.notify_waiters();
        }
        Ok(offsets)
    }

    async fn consume(
        &self,
        partition: u32,
        from: Offset,
    ) -> Result<Box<dyn PartitionConsumer>, BusError> {
        let part = self.part(partition)?.clone();
        {
            let mut log = part.log.lock();
            if log.has_consumer {
                return Err(BusError::ConsumerExists { partition });
            }
            let end = log.base + log.records.len() as u64;
            if from.0 < log.base || from.0 > end {
                return Err(BusError::OffsetOutOfRange {
                    partition,
                    requested: from.0,
                    earliest: log.base,
                });
            }
            let skip = (from.0 - log.base) as usize;
            log.records.drain(..skip);
            log.base = from.0;
            log.has_consumer = true;
        }
        part.drained.notify_waiters();
        Ok(Box::new(EmbeddedConsumer {
            partition,
            part,
            closed: self.closed.clone(),
        }))
    }

    fn end_offset(&self, partition: u32) -> Offset {
        self.part(partition)
            .map(|p| {
                let log = p.log.lock();
                Offset(log.base + log.records.len() as u64)
            })
            .unwrap_or_default()
    }

    async fn commit(&self, partition: u32, _offset: Offset) -> Result<(), BusError> {
        // Read records are already gone; nothing else to release.
        self.part(partition).map(|_| ())
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for p in &self.parts {
            p.appended.notify_waiters();
            p.drained.notify_waiters();
        }
    }
}

struct EmbeddedConsumer {
    partition: u32,
    part: Arc<Partition>,
    closed: Arc<AtomicBool>,
}

impl Drop for EmbeddedConsumer {
    fn drop(&mut self) {
        self.part.log.lock().has_consumer = false;
    }
}

#[async_trait]
impl PartitionConsumer for EmbeddedConsumer {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivered>, BusError> {
        loop {
            let appended = self.part.appended.notified();
            {
                let mut log = self.part.log.lock();
                if !log.records.is_empty() {
                    let n = log.records.len().min(max.max(1));
                    let base = log.base;
                    let batch: Vec<Delivered> = log
                        .records
                        .drain(..n)
                        .enumerate()
                        .map(|(i, record)| Delivered {
                            partition: self.partition,
                            offset: Offset(base + i as u64),
                            record,
                        })
                        .collect();
                    log.base += n as u64;
                    drop(log);
                    self.part.drained.notify_waiters();
                    return Ok(batch);
                }
            }
            if self.closed.load(Ordering::Acquire) {
                return Ok(Vec::new());
            }
            appended.await;
        }
    }
}
