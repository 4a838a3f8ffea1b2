//! Kafka consumer-group membership: which partitions of a topic this
//! process owns, and the hand-over when the group moves them.
//!
//! A [`Membership`] joins a group on one topic and reports every change of
//! ownership as a [`GroupEvent`]. It reads no records: it pauses every
//! partition it is given, and the fabric reads those partitions with
//! consumers of its own, from offsets it chooses (its snapshots'), which the
//! group's committed offsets cannot express. Membership only answers "who
//! owns what", and carries the group's offset commits (a group accepts
//! commits only from its members).
//!
//! Hand-over: when the group takes partitions away, librdkafka calls back
//! before it gives them up; the callback sends [`GroupEvent::Revoked`] and
//! waits (up to the hand-over timeout) until the fabric has handed them
//! over (snapshot written, appliers or sources stopped). Only then may
//! another member be given them, so two processes never apply or run the
//! same thing at once, barring a process the group has already declared
//! dead (it took longer than the session timeout to answer), which its
//! idempotent apply makes harmless.
//!
//! The callbacks run on a thread of the membership's own that polls the
//! consumer, so a hand-over that takes seconds blocks nothing else.

use super::BusError;
use super::kafka::Quiet;
use rdkafka::ClientConfig;
use rdkafka::TopicPartitionList;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// A change of what this process owns.
#[derive(Debug)]
pub enum GroupEvent {
    /// Every partition this process owns now (after an assignment, whole or
    /// incremental), in order. Partitions it owned before and are not in the
    /// list were revoked first.
    Assigned(Vec<u32>),
    /// Partitions the group takes away: hand them over, then answer `done`.
    Revoked {
        partitions: Vec<u32>,
        done: std::sync::mpsc::SyncSender<()>,
    },
}

/// The consumer's context: logs like every client, reports rebalances.
struct Rebalancer {
    quiet: Quiet,
    topic: String,
    events: mpsc::UnboundedSender<GroupEvent>,
    hand_over: Duration,
    /// Set once the process has handed everything over and leaves.
    leaving: Arc<AtomicBool>,
}

impl ClientContext for Rebalancer {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.quiet.log(level, fac, message)
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.quiet.error(error, reason)
    }
}

impl Rebalancer {
    fn partitions(&self, tpl: &TopicPartitionList) -> Vec<u32> {
        let mut v: Vec<u32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition() as u32)
            .collect();
        v.sort_unstable();
        v
    }
}

impl ConsumerContext for Rebalancer {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let partitions = self.partitions(tpl);
        if partitions.is_empty() || self.leaving.load(Ordering::Acquire) {
            return;
        }
        tracing::info!(topic = %self.topic, ?partitions, "the group takes partitions away; handing them over");
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        if self
            .events
            .send(GroupEvent::Revoked { partitions, done })
            .is_err()
        {
            return; // Nobody listens any more: the process is stopping.
        }
        if wait.recv_timeout(self.hand_over).is_err() {
            tracing::warn!(
                topic = %self.topic,
                timeout = ?self.hand_over,
                "hand-over not finished within bus.kafka.hand_over_timeout; the group goes on"
            );
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                // Records are read elsewhere: this consumer fetches nothing.
                if let Err(e) = consumer.pause(tpl) {
                    tracing::warn!(error = %e, "cannot pause the membership consumer");
                }
                let owned = match consumer.assignment() {
                    Ok(all) => self.partitions(&all),
                    Err(_) => self.partitions(tpl),
                };
                tracing::info!(topic = %self.topic, partitions = ?owned, "the group assigned partitions");
                let _ = self.events.send(GroupEvent::Assigned(owned));
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(topic = %self.topic, error = %e, "rebalance failed"),
        }
    }
}

type GroupConsumer = BaseConsumer<Rebalancer>;

/// Membership of one group on one topic (see the module docs).
pub struct Membership {
    consumer: Arc<GroupConsumer>,
    topic: String,
    stop: Arc<AtomicBool>,
    leaving: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How a group member is set up.
pub struct GroupSettings<'a> {
    pub client: &'a ClientConfig,
    pub group_id: &'a str,
    pub topic: &'a str,
    pub session_timeout: Duration,
    pub hand_over_timeout: Duration,
}

impl Membership {
    /// Joins `group_id` on `topic`; ownership changes arrive on the returned
    /// receiver from the first assignment on.
    pub fn join(
        s: GroupSettings<'_>,
    ) -> Result<(Self, mpsc::UnboundedReceiver<GroupEvent>), BusError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut c = s.client.clone();
        c.set("group.id", s.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set(
                "session.timeout.ms",
                s.session_timeout.as_millis().to_string(),
            )
            .set(
                "heartbeat.interval.ms",
                (s.session_timeout.as_millis() / 4).max(100).to_string(),
            )
            // The poll thread is blocked only while handing over.
            .set(
                "max.poll.interval.ms",
                (s.hand_over_timeout.as_millis() * 2)
                    .max(s.session_timeout.as_millis() + 1)
                    .max(60_000)
                    .to_string(),
            );
        let leaving = Arc::new(AtomicBool::new(false));
        let consumer: GroupConsumer = c
            .create_with_context(Rebalancer {
                quiet: Quiet::default(),
                topic: s.topic.to_string(),
                events: tx,
                hand_over: s.hand_over_timeout,
                leaving: leaving.clone(),
            })
            .map_err(|e| BusError::Kafka {
                operation: "create the group member".into(),
                reason: e.to_string(),
            })?;
        consumer.subscribe(&[s.topic]).map_err(|e| BusError::Kafka {
            operation: format!("join group {} on {}", s.group_id, s.topic),
            reason: e.to_string(),
        })?;
        let consumer = Arc::new(consumer);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let consumer = consumer.clone();
            let stop = stop.clone();
            let topic = s.topic.to_string();
            std::thread::Builder::new()
                .name("fabric-group".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        // Paused partitions yield no records: polling
                        // serves heartbeats and rebalance callbacks.
                        if let Some(Err(e)) = consumer.poll(Duration::from_millis(100)) {
                            tracing::debug!(topic, error = %e, "group member poll");
                        }
                    }
                })
                .map_err(|e| BusError::Kafka {
                    operation: "start the group member's thread".into(),
                    reason: e.to_string(),
                })?
        };
        Ok((
            Membership {
                consumer,
                topic: s.topic.to_string(),
                stop,
                leaving,
                thread: Some(thread),
            },
            rx,
        ))
    }

    /// Commits `offset` of `partition` to the group, for monitoring tools.
    pub fn commit(&self, partition: u32, offset: u64) -> Result<(), BusError> {
        let mut tpl = TopicPartitionList::new();
        let kafka = |e: rdkafka::error::KafkaError| BusError::Kafka {
            operation: "commit".into(),
            reason: e.to_string(),
        };
        tpl.add_partition_offset(
            &self.topic,
            partition as i32,
            rdkafka::Offset::Offset(offset as i64),
        )
        .map_err(kafka)?;
        self.consumer.commit(&tpl, CommitMode::Async).map_err(kafka)
    }

    /// Stops taking part: the poll thread ends, so the group sees this
    /// member leave once its session times out (or at once if `leave`
    /// reaches the broker). Call after handing everything over.
    /// Blocking: call from `spawn_blocking`.
    pub fn leave(&mut self) {
        self.leaving.store(true, Ordering::Release);
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.consumer.unsubscribe();
        // A few polls let the leave request go out (its revoke callback
        // returns at once: everything was handed over already).
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_millis(500) {
            let _ = self.consumer.poll(Duration::from_millis(50));
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}
