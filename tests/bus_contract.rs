//! The bus contract: what every `Bus` implementation must do. Each case is a
//! function over a freshly made bus; every implementation runs all of them.

use entity_fabric::bus::embedded::EmbeddedBus;
use entity_fabric::bus::{Bus, BusError, Offset};
use entity_fabric::event::{BusRecord, EntityChangeSet, EntityKey, Position};
use std::sync::Arc;
use std::time::Duration;

fn record(id: u64) -> BusRecord {
    BusRecord::Changes(EntityChangeSet {
        key: EntityKey::new("customer", id.to_string()),
        source: "s".into(),
        position: Position::Seq(id),
        commit_micros: 0,
        changes: Vec::new(),
        delete_entity: false,
    })
}

fn id_of(r: &BusRecord) -> u64 {
    match r {
        BusRecord::Changes(s) => s.key.id.parse().unwrap(),
        other => panic!("unexpected record {other:?}"),
    }
}

async fn read_n(bus: &dyn Bus, partition: u32, from: u64, n: usize) -> Vec<(u64, u64)> {
    let mut c = bus.consume(partition, Offset(from)).await.unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let batch = tokio::time::timeout(Duration::from_secs(10), c.next_batch(7))
            .await
            .expect("records did not arrive within 10s")
            .unwrap();
        assert!(!batch.is_empty(), "bus closed early");
        for d in batch {
            assert_eq!(d.partition, partition);
            out.push((d.offset.0, id_of(&d.record)));
        }
    }
    out
}

/// Offsets are dense per partition and returned by produce in order.
async fn offsets_are_dense_and_returned(bus: Arc<dyn Bus>) {
    let recs: Vec<(u32, BusRecord)> = (0..10).map(|i| ((i % 2) as u32, record(i))).collect();
    let offsets = bus.produce(recs).await.unwrap();
    let even: Vec<u64> = offsets.iter().step_by(2).map(|o| o.0).collect();
    let odd: Vec<u64> = offsets.iter().skip(1).step_by(2).map(|o| o.0).collect();
    assert_eq!(even, vec![0, 1, 2, 3, 4]);
    assert_eq!(odd, vec![0, 1, 2, 3, 4]);
    assert_eq!(bus.end_offset(0), Offset(5));
    assert_eq!(bus.end_offset(1), Offset(5));
}

/// A consumer sees its partition's records in append order, with their offsets.
async fn order_is_kept_per_partition(bus: Arc<dyn Bus>) {
    for chunk in (0..100u64).collect::<Vec<_>>().chunks(13) {
        bus.produce(chunk.iter().map(|i| (1, record(*i))).collect())
            .await
            .unwrap();
    }
    let got = read_n(&*bus, 1, 0, 100).await;
    let expected: Vec<(u64, u64)> = (0..100).map(|i| (i, i)).collect();
    assert_eq!(got, expected);
}

/// A consumer started at an offset sees exactly the records from it on.
async fn consume_from_offset(bus: Arc<dyn Bus>) {
    bus.produce((0..20).map(|i| (0, record(i))).collect())
        .await
        .unwrap();
    let got = read_n(&*bus, 0, 15, 5).await;
    assert_eq!(got, (15..20).map(|i| (i, i)).collect::<Vec<_>>());
}

/// A consumer waits for records that are not there yet.
async fn consumer_waits_for_new_records(bus: Arc<dyn Bus>) {
    let reader = {
        let bus = bus.clone();
        tokio::spawn(async move { read_n(&*bus, 0, 0, 3).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !reader.is_finished(),
        "a consumer returned with nothing to read"
    );
    for i in 0..3 {
        bus.produce(vec![(0, record(i))]).await.unwrap();
    }
    let got = reader.await.unwrap();
    assert_eq!(got, vec![(0, 0), (1, 1), (2, 2)]);
}

/// Records of concurrent producers are all delivered, each producer's in its order.
async fn concurrent_producers_keep_their_order(bus: Arc<dyn Bus>) {
    let mut tasks = Vec::new();
    for p in 0..4u64 {
        let bus = bus.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50u64 {
                bus.produce(vec![(0, record(p * 1000 + i))]).await.unwrap();
            }
        }));
    }
    let got = read_n(&*bus, 0, 0, 200).await;
    for t in tasks {
        t.await.unwrap();
    }
    for p in 0..4u64 {
        let mine: Vec<u64> = got
            .iter()
            .map(|(_, id)| *id)
            .filter(|id| id / 1000 == p)
            .collect();
        assert_eq!(mine, (0..50).map(|i| p * 1000 + i).collect::<Vec<_>>());
    }
    let offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, (0..200).collect::<Vec<_>>());
}

/// A partition that does not exist is an error, not a panic.
async fn unknown_partition_is_an_error(bus: Arc<dyn Bus>) {
    let n = bus.partitions();
    assert!(matches!(
        bus.produce(vec![(n, record(1))]).await,
        Err(BusError::NoSuchPartition { .. })
    ));
    assert!(bus.consume(n, Offset(0)).await.is_err());
}

macro_rules! contract {
    ($make:expr, $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let bus: Arc<dyn Bus> = $make;
                super::$case(bus).await;
            }
        )*
    };
}

mod embedded {
    use super::*;

    contract!(
        Arc::new(EmbeddedBus::new(4, 1_000, &[])),
        offsets_are_dense_and_returned,
        order_is_kept_per_partition,
        consume_from_offset,
        consumer_waits_for_new_records,
        concurrent_producers_keep_their_order,
        unknown_partition_is_an_error,
    );

    /// Specific to the embedded bus: a full partition makes producers wait
    /// until the consumer reads (backpressure), and nothing is lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_partition_applies_backpressure() {
        let bus: Arc<dyn Bus> = Arc::new(EmbeddedBus::new(1, 5, &[]));
        let producer = {
            let bus = bus.clone();
            tokio::spawn(async move {
                bus.produce((0..20).map(|i| (0, record(i))).collect())
                    .await
                    .unwrap()
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !producer.is_finished(),
            "producer did not wait on a full partition"
        );
        assert_eq!(bus.end_offset(0), Offset(5));
        let got = read_n(&*bus, 0, 0, 20).await;
        assert_eq!(got.len(), 20);
        assert_eq!(producer.await.unwrap().len(), 20);
    }

    /// Offsets continue from where restored snapshots left off.
    #[tokio::test]
    async fn offsets_start_where_told() {
        let bus = EmbeddedBus::new(2, 10, &[40, 7]);
        let o = bus
            .produce(vec![(0, record(1)), (1, record(2))])
            .await
            .unwrap();
        assert_eq!(o, vec![Offset(40), Offset(7)]);
    }
}

/// The same contract on the Kafka bus, against the broker the test command
/// started (`scripts/services.sh`: Apache Kafka), one fresh topic per test.
mod kafka {
    use super::*;
    use entity_fabric::bus::kafka::{KafkaBus, KafkaBusConfig};

    async fn bus() -> KafkaBus {
        let brokers = std::env::var("FABRIC_TEST_KAFKA").expect(
            "FABRIC_TEST_KAFKA is not set: run the tests with ./scripts/test.sh, or eval \"$(scripts/services.sh start)\" first",
        );
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let topic = format!("contract-{}-{n}.changes", std::process::id());
        KafkaBus::connect(
            KafkaBusConfig {
                brokers,
                group_id: format!("{topic}-group"),
                topic,
                partitions: 4,
                replication: 1,
                properties: Default::default(),
            },
            None,
        )
        .await
        .expect("connect to the test broker")
    }

    contract!(
        Arc::new(bus().await),
        offsets_are_dense_and_returned,
        order_is_kept_per_partition,
        consume_from_offset,
        consumer_waits_for_new_records,
        concurrent_producers_keep_their_order,
        unknown_partition_is_an_error,
    );
}
