//! Which process owns which bus partitions and sources: membership by
//! leases on the topic `<prefix>.members`.
//!
//! Every process of a fabric writes a heartbeat record to the topic (one
//! partition, compacted, keyed by member id) every `session_timeout / 5`:
//! its member id and incarnation, its gRPC address, and the partitions
//! and sources it holds now. Every process reads every record. A member is
//! live while its newest record is less than `session_timeout` older than
//! the newest heartbeat this process read back of its own (record
//! timestamps: clocks must agree to well within the lease; measured in the
//! log rather than against the local clock, so a reader that lags sees
//! everyone equally late), and does not say it is leaving.
//!
//! From the live members, sorted by id, each process computes the same
//! assignment: bus partitions in contiguous ranges (as Kafka's range
//! assignor), sources round-robin. Then:
//!
//! - what it holds and is no longer assigned, it hands over at once
//!   ([`Ownership::Revoked`]; snapshot written, appliers or sources
//!   stopped) and says so in its next heartbeat, written right away;
//! - what it is assigned and does not hold, it takes ([`Ownership::Assigned`])
//!   only once no other live member holds it: a partition or source moves
//!   after its previous holder let it go, or after that holder's lease ran
//!   out. Two processes hold the same thing only while their views of the
//!   members disagree (a heartbeat or so), which idempotent apply makes
//!   harmless.
//!
//! A member id is stable across restarts of one process (host name plus
//! snapshot directory, or `bus.kafka.instance_id`); a new incarnation of it
//! ignores what the previous one claimed, so a process that was killed
//! gets its partitions back at once on restart, with its local snapshots.
//! A process that stops cleanly writes a last record saying it is leaving,
//! so the others take over without waiting for its lease to run out.
//!
//! Why not Kafka's consumer-group protocol: the fabric needs to know more
//! than its own assignment (the owner of every partition, and its address,
//! to route requests), it must hand over sources as well as partitions,
//! and its restarts should not cost a rebalance. The group protocol offers
//! none of these directly, and the stand-in broker the tests ran against
//! when this was written (tansu 0.6) did not keep a group stable when its
//! leader died or its members were static. Leases on a topic need nothing
//! from the broker but produce and fetch.

use super::BusError;
use super::kafka::{self, BaseConsumer, Producer, kafka as err};
use rdkafka::Message;
use rdkafka::consumer::Consumer;
use rdkafka::producer::FutureRecord;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// A change of what this process holds, in one of the two domains.
#[derive(Debug)]
pub enum Ownership<T> {
    /// Everything this process holds now, after taking more.
    Assigned(Vec<T>),
    /// Hand these over, then answer `done`.
    Revoked {
        items: Vec<T>,
        done: oneshot::Sender<()>,
    },
}

/// One heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MemberRecord {
    pub member: String,
    /// Start time of this incarnation (microseconds): a restarted process
    /// has a newer one and disowns what the previous one claimed.
    pub incarnation: i64,
    /// Where this member serves gRPC.
    pub grpc: String,
    pub partitions: Vec<u32>,
    pub sources: Vec<String>,
    pub leaving: bool,
}

/// What this process knows of the members: who holds what, and where they
/// serve gRPC (reads are forwarded there).
#[derive(Debug, Clone, Default)]
pub struct MemberView {
    /// Live members (this one included) by id.
    pub live: BTreeMap<String, MemberRecord>,
}

impl MemberView {
    /// The live member holding bus partition `p`, if any.
    pub fn owner_of(&self, p: u32) -> Option<&MemberRecord> {
        self.live.values().find(|m| m.partitions.contains(&p))
    }
}

/// How this process takes part.
#[derive(Debug, Clone)]
pub struct MemberSettings {
    pub member: String,
    pub grpc: String,
    pub topic: String,
    pub partitions: u32,
    pub sources: Vec<String>,
    pub session_timeout: Duration,
}

/// The range of `partitions` member `k` of `n` gets.
fn range(partitions: u32, k: usize, n: usize) -> impl Iterator<Item = u32> {
    let (p, n, k) = (partitions as usize, n.max(1), k);
    let (per, extra) = (p / n, p % n);
    let start = k * per + k.min(extra);
    let len = per + usize::from(k < extra);
    (start..start + len).map(|x| x as u32)
}

/// The assignment every member computes alike: for `me` among `live`
/// (sorted ids), its partitions and sources.
pub fn assignment(
    me: &str,
    live: &BTreeSet<String>,
    partitions: u32,
    sources: &[String],
) -> (BTreeSet<u32>, BTreeSet<String>) {
    let Some(k) = live.iter().position(|m| m == me) else {
        return Default::default();
    };
    let n = live.len();
    let parts = range(partitions, k, n).collect();
    let mut names: Vec<&String> = sources.iter().collect();
    names.sort();
    let srcs = names
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % n == k)
        .map(|(_, s)| s.clone())
        .collect();
    (parts, srcs)
}

/// What [`Membership::join`] reports on: bus partitions and sources.
pub type Events = (
    mpsc::UnboundedReceiver<Ownership<u32>>,
    mpsc::UnboundedReceiver<Ownership<String>>,
);

/// The running membership: the view of the members, and how to leave.
pub struct Membership {
    pub view: watch::Receiver<MemberView>,
    leave: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Membership {
    /// Creates the topic when missing and starts taking part; ownership
    /// changes arrive on the returned receivers.
    pub async fn join(
        client: &rdkafka::ClientConfig,
        replication: i32,
        s: MemberSettings,
    ) -> Result<(Membership, Events), BusError> {
        kafka::ensure_topic(
            client,
            &s.topic,
            1,
            replication,
            &[("cleanup.policy", "compact")],
        )
        .await?;
        // Back promptly after a broker outage (librdkafka's default backs off
        // to 10 s, longer than a lease).
        let mut client = client.clone();
        if client.get("reconnect.backoff.max.ms").is_none() {
            client.set("reconnect.backoff.max.ms", "1000");
        }
        let client = &client;
        let mut c = client.clone();
        c.set("linger.ms", "0").set(
            "message.timeout.ms",
            s.session_timeout.as_millis().max(1000).to_string(),
        );
        let producer: Producer = kafka::create(&c).map_err(err("create a producer"))?;
        let mut c = client.clone();
        c.set("group.id", format!("{}.reader", s.topic))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "100");
        let reader: kafka::StreamConsumer = kafka::create(&c).map_err(err("create a reader"))?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(&s.topic, 0, rdkafka::Offset::Beginning)
            .map_err(err("assign"))?;
        reader.assign(&tpl).map_err(err("assign"))?;
        let high = {
            let probe: BaseConsumer = kafka::create(client).map_err(err("create a client"))?;
            let probe = Arc::new(probe);
            kafka::watermarks(&probe, &s.topic, 0).await?.1
        };
        let (ptx, prx) = mpsc::unbounded_channel();
        let (stx, srx) = mpsc::unbounded_channel();
        let (vtx, vrx) = watch::channel(MemberView::default());
        let leave = CancellationToken::new();
        let me = Member {
            incarnation: crate::sources::now_micros(),
            s,
            producer,
            reader,
            // An empty topic is read up to its end already.
            caught_up_at: high,
            seen: BTreeMap::new(),
            partitions: BTreeSet::new(),
            sources: BTreeSet::new(),
            partition_events: ptx,
            source_events: stx,
            view: vtx,
            superseded: false,
            own_seen: 0,
            own_ts: 0,
            fresh_since: 0,
        };
        let task = tokio::spawn(me.run(leave.clone()));
        Ok((
            Membership {
                view: vrx,
                leave,
                task,
            },
            (prx, srx),
        ))
    }

    /// Says this process is leaving (call once everything is handed over)
    /// and stops taking part.
    pub async fn leave(self) {
        self.leave.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

struct Member {
    s: MemberSettings,
    incarnation: i64,
    producer: Producer,
    reader: kafka::StreamConsumer,
    /// The topic's end when this process started: nothing is decided
    /// before everything up to it is read.
    caught_up_at: u64,
    /// Newest record of each member, with its timestamp (ms).
    seen: BTreeMap<String, (MemberRecord, i64)>,
    partitions: BTreeSet<u32>,
    sources: BTreeSet<String>,
    partition_events: mpsc::UnboundedSender<Ownership<u32>>,
    source_events: mpsc::UnboundedSender<Ownership<String>>,
    view: watch::Sender<MemberView>,
    /// Another process took this member id: hold nothing.
    superseded: bool,
    /// When this process last read its own heartbeat back (local clock,
    /// ms): the topic works for it. Without that, it decides nothing.
    own_seen: i64,
    /// The timestamp of its newest own heartbeat read back (ms): the
    /// others' ages are measured against it, not against the local clock,
    /// so a reader that lags (a loaded machine, a slow broker) sees every
    /// record equally late and declares no one dead for that.
    own_ts: i64,
    /// The timestamp of its first own heartbeat after a gap longer than a
    /// lease (an outage): for two leases from there nobody is declared
    /// dead, since every client reconnects in its own time.
    fresh_since: i64,
}

fn now_ms() -> i64 {
    crate::sources::now_micros() / 1000
}

/// Writes `record` every `beat` and whenever it changes, until it says the
/// member is leaving (written once more, then the task ends).
async fn heartbeats(
    producer: Producer,
    topic: String,
    mut record: watch::Receiver<MemberRecord>,
    beat: Duration,
) {
    loop {
        let r = record.borrow_and_update().clone();
        let value = serde_json::to_vec(&r).expect("a record encodes");
        let m = FutureRecord::to(&topic)
            .partition(0)
            .key(r.member.as_str())
            .payload(value.as_slice());
        if let Err((e, _)) = producer.send(m, Duration::from_secs(1)).await {
            tracing::warn!(error = %e, "cannot write the membership heartbeat; retrying");
        }
        if r.leaving {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(beat) => {}
            c = record.changed() => if c.is_err() { return },
        }
    }
}

impl Member {
    fn record(&self, leaving: bool) -> MemberRecord {
        MemberRecord {
            member: self.s.member.clone(),
            incarnation: self.incarnation,
            grpc: self.s.grpc.clone(),
            partitions: self.partitions.iter().copied().collect(),
            sources: self.sources.iter().cloned().collect(),
            leaving,
        }
    }

    fn read(&mut self, m: rdkafka::message::OwnedMessage) {
        if (m.offset() + 1) as u64 >= self.caught_up_at {
            self.caught_up_at = 0;
        }
        let (Some(key), Some(value)) = (m.key(), m.payload()) else {
            return;
        };
        match serde_json::from_slice::<MemberRecord>(value) {
            Ok(r) if r.member.as_bytes() == key => {
                if r.member == self.s.member && r.incarnation == self.incarnation {
                    let ts = m.timestamp().to_millis().unwrap_or_else(now_ms);
                    let lease = self.s.session_timeout.as_millis() as i64;
                    if ts - self.own_ts > lease {
                        self.fresh_since = ts;
                    }
                    self.own_ts = self.own_ts.max(ts);
                    self.own_seen = now_ms();
                }
                if r.member == self.s.member && r.incarnation < self.incarnation {
                    return; // An earlier life of this process: disowned.
                }
                if let Some((old, _)) = self.seen.get(&r.member)
                    && old.incarnation > r.incarnation
                {
                    return; // An older process under a reused id.
                }
                if r.member == self.s.member && r.incarnation > self.incarnation {
                    // Another process runs under this id: two would own alike.
                    if !self.superseded {
                        tracing::error!(
                            member = %r.member,
                            "another process joined with this member id (same host and \
                             snapshot directory, or the same bus.kafka.instance_id): this \
                             process gives up everything it holds"
                        );
                    }
                    self.superseded = true;
                    return;
                }
                let ts = m.timestamp().to_millis().unwrap_or_else(now_ms);
                self.seen.insert(r.member.clone(), (r, ts));
            }
            Ok(_) | Err(_) => {
                tracing::debug!(offset = m.offset(), "unreadable membership record skipped")
            }
        }
    }

    /// Live members other than this one, by id. A member whose lease ran
    /// out still counts until this process has itself seen the topic work
    /// for two leases: after a broker outage every record is late, and
    /// nobody is declared dead for that.
    fn others(&self) -> BTreeMap<String, MemberRecord> {
        let now = self.own_ts;
        let lease = self.s.session_timeout.as_millis() as i64;
        // Two leases: the others' clients reconnect after an outage in their
        // own time (librdkafka backs off), not at the same moment as this one.
        let trust_expiry = self.fresh_since > 0 && now - self.fresh_since >= 2 * lease;
        self.seen
            .iter()
            .filter(|(id, (r, ts))| {
                **id != self.s.member && !r.leaving && (now - *ts < lease || !trust_expiry)
            })
            .map(|(id, (r, _))| (id.clone(), r.clone()))
            .collect()
    }

    /// Whether this process's own heartbeats come back: if not (broker
    /// away, or this process cut off), it keeps what it holds and takes or
    /// gives nothing until they do.
    fn connected(&self) -> bool {
        now_ms() - self.own_seen < self.s.session_timeout.as_millis() as i64
    }

    async fn run(mut self, leave: CancellationToken) {
        let beat = (self.s.session_timeout / 5).max(Duration::from_millis(200));
        let (record_tx, record_rx) = watch::channel(self.record(false));
        let writer = tokio::spawn(heartbeats(
            self.producer.clone(),
            self.s.topic.clone(),
            record_rx,
            beat,
        ));
        let mut tick = tokio::time::interval(beat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let message = tokio::select! {
                _ = leave.cancelled() => {
                    self.partitions.clear();
                    self.sources.clear();
                    record_tx.send_replace(self.record(true));
                    let _ = writer.await;
                    return;
                }
                m = self.reader.recv() => Some(m.map(|m| m.detach())),
                _ = tick.tick() => None,
            };
            match message {
                Some(Ok(m)) => {
                    self.read(m);
                    continue;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "reading the membership topic; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                None => {}
            }
            if self.caught_up_at > 0 || !self.connected() {
                continue; // The view is not complete, or not current.
            }
            if self.decide(&record_tx).await {
                record_tx.send_replace(self.record(false));
            }
        }
    }

    /// Compares what this process holds with what it is assigned; hands
    /// over and takes. Returns whether what it holds changed.
    async fn decide(&mut self, record: &watch::Sender<MemberRecord>) -> bool {
        let others = self.others();
        let mut live: BTreeSet<String> = others.keys().cloned().collect();
        if !self.superseded {
            live.insert(self.s.member.clone());
        }
        let (want_p, want_s) =
            assignment(&self.s.member, &live, self.s.partitions, &self.s.sources);
        let mut view = MemberView {
            live: others.clone(),
        };
        view.live.insert(self.s.member.clone(), self.record(false));
        self.view.send_replace(view);
        let mut changed = false;

        // Hand over first.
        let give_p: Vec<u32> = self.partitions.difference(&want_p).copied().collect();
        if !give_p.is_empty() && revoke(&self.partition_events, give_p.clone()).await {
            for p in give_p {
                self.partitions.remove(&p);
            }
            changed = true;
        }
        let give_s: Vec<String> = self.sources.difference(&want_s).cloned().collect();
        if !give_s.is_empty() && revoke(&self.source_events, give_s.clone()).await {
            for s in give_s {
                self.sources.remove(&s);
            }
            changed = true;
        }

        if changed {
            // Others may take what was handed over as soon as they read this.
            record.send_replace(self.record(false));
        }

        // Then take what nobody else holds.
        let held_p: BTreeSet<u32> = others
            .values()
            .flat_map(|r| r.partitions.iter().copied())
            .collect();
        let held_s: BTreeSet<&String> = others.values().flat_map(|r| r.sources.iter()).collect();
        let take_p: Vec<u32> = want_p
            .iter()
            .filter(|p| !self.partitions.contains(p) && !held_p.contains(p))
            .copied()
            .collect();
        let take_s: Vec<String> = want_s
            .iter()
            .filter(|s| !self.sources.contains(*s) && !held_s.contains(s))
            .cloned()
            .collect();
        self.partitions.extend(take_p.iter().copied());
        self.sources.extend(take_s.iter().cloned());
        if !take_p.is_empty() || !take_s.is_empty() {
            // The view names what this process takes before anything acts
            // on the takes: sources taken here wait until the partitions the
            // view gives this process are caught up (their `id_via` links),
            // and a view still naming the old holdings let them start at
            // once, routing child rows with the links of an older state.
            let mut view = MemberView {
                live: others.clone(),
            };
            view.live.insert(self.s.member.clone(), self.record(false));
            self.view.send_replace(view);
        }
        if !take_p.is_empty() {
            let _ = self.partition_events.send(Ownership::Assigned(
                self.partitions.iter().copied().collect(),
            ));
            changed = true;
        }
        if !take_s.is_empty() {
            let _ = self
                .source_events
                .send(Ownership::Assigned(self.sources.iter().cloned().collect()));
            changed = true;
        }
        if changed {
            tracing::info!(
                members = live.len(),
                partitions = ?self.partitions,
                sources = ?self.sources,
                "ownership changed"
            );
        }
        changed
    }
}

/// Sends a revoke and waits until it is handed over; false when it was
/// not (the process is stopping: it still holds them until it leaves).
async fn revoke<T>(events: &mpsc::UnboundedSender<Ownership<T>>, items: Vec<T>) -> bool {
    let (done, wait) = oneshot::channel();
    events.send(Ownership::Revoked { items, done }).is_ok() && wait.await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_partition_and_source_has_exactly_one_owner() {
        let sources: Vec<String> = ["crm", "billing", "support"].map(String::from).to_vec();
        for n in 1..=6 {
            let ids: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
            let set: BTreeSet<String> = ids.iter().cloned().collect();
            let mut parts = Vec::new();
            let mut srcs = Vec::new();
            for id in &ids {
                let (p, s) = assignment(id, &set, 8, &sources);
                parts.extend(p);
                srcs.extend(s);
            }
            parts.sort();
            srcs.sort();
            assert_eq!(parts, (0..8).collect::<Vec<_>>(), "{n} members");
            assert_eq!(srcs, vec!["billing", "crm", "support"], "{n} members");
        }
        // Balanced: 8 partitions over 3 members is 3, 3, 2.
        let set = live(&["a", "b", "c"]);
        let sizes: Vec<usize> = ["a", "b", "c"]
            .iter()
            .map(|m| assignment(m, &set, 8, &[]).0.len())
            .collect();
        assert_eq!(sizes, vec![3, 3, 2]);
        // A member that is not live gets nothing.
        assert!(assignment("z", &set, 8, &sources).0.is_empty());
    }
}
