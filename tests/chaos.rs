//! Chaos: while sessions keep writing to PostgreSQL and MariaDB, fabric
//! processes are SIGKILLed at random points and restarted, PostgreSQL
//! crashes and restarts, MariaDB restarts, and on the Kafka bus the broker
//! is SIGKILLed and restarted; then every customer entity must equal what
//! the two databases hold (nothing lost, nothing invented) and, on Kafka, a
//! stock consumer (Confluent's Python client) reads the entities topic from
//! its beginning: per entity no version missing, the last one what gRPC
//! serves, repeats counted.
//!
//! Three runs, one at a time (they restart the shared database servers):
//! - the embedded bus, one process;
//! - Apache Kafka (one node), two processes sharing the bus: at least 5
//!   fabric SIGKILLs, a broker SIGKILL and restart under the live
//!   processes, a restart of each database;
//! - a 3-node Kafka cluster (replication factor 3, `min.insync.replicas`
//!   2): the node leading the busiest partition SIGKILLed mid-stream and
//!   brought back, fabric SIGKILLs around it.
//!
//! A test binary of its own, because it restarts the shared database
//! servers. `FABRIC_CHAOS_ROUNDS` (default 9; 5 on the cluster) makes longer runs,
//! `FABRIC_CHAOS_SEED` repeats one; see docs/testing.md.

mod common;

use common::entities_topic::*;
use common::two_databases::*;
use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The runs restart the shared database servers: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL a fabric process (one at random) and start it again.
    KillFabric,
    /// SIGKILL the (single) broker, leave it down a moment, start it again.
    KillBroker,
    /// SIGKILL the cluster node leading the busiest partition, leave it
    /// down a moment, start it again.
    KillLeader,
    RestartPostgres,
    RestartMariadb,
}

/// What the run's bus is.
enum Bus {
    Embedded,
    Kafka(Broker),
    Cluster(Cluster),
}

impl Bus {
    fn brokers(&self) -> Option<String> {
        match self {
            Bus::Embedded => None,
            Bus::Kafka(b) => Some(b.address()),
            Bus::Cluster(c) => Some(c.bootstrap()),
        }
    }

    fn logs(&self) -> String {
        let dirs: Vec<PathBuf> = match self {
            Bus::Embedded => vec![],
            Bus::Kafka(b) => vec![b.dir.clone()],
            Bus::Cluster(c) => c.nodes.iter().map(|n| n.dir.clone()).collect(),
        };
        dirs.iter()
            .map(|d| {
                let log = std::fs::read_to_string(d.join("broker.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {} ---\n{}", d.display(), tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn run(cmd: &str, what: &str, fabrics: &[FabricProcess], bus: &Bus) {
    let status = std::process::Command::new("sh")
        .args(["-c", cmd])
        .status()
        .unwrap();
    if !status.success() {
        let logs: Vec<String> = fabrics
            .iter()
            .map(|f| {
                let log = f.log_text();
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            })
            .collect();
        panic!(
            "{what} failed; the fabrics' logs end:\n{}\nthe brokers' logs end:\n{}",
            logs.join("\n-----\n"),
            bus.logs()
        );
    }
}

/// `FABRIC_CHAOS_FAULTS` (e.g. `kill,broker,postgres`): this sequence
/// instead of a random one, for the runs whose bus has those faults.
fn fixed_faults() -> Option<Vec<Fault>> {
    let list = std::env::var("FABRIC_CHAOS_FAULTS").ok()?;
    Some(
        list.split(',')
            .map(|f| match f.trim() {
                "kill" => Fault::KillFabric,
                "broker" => Fault::KillBroker,
                "leader" => Fault::KillLeader,
                "postgres" => Fault::RestartPostgres,
                "mariadb" => Fault::RestartMariadb,
                other => panic!("FABRIC_CHAOS_FAULTS: unknown fault {other:?}"),
            })
            .collect(),
    )
}

/// `required` in random order, padded with picks from `any` to
/// `FABRIC_CHAOS_ROUNDS` (default `rounds`) faults.
fn faults(rng: &mut fastrand::Rng, rounds: usize, required: &[Fault], any: &[Fault]) -> Vec<Fault> {
    let rounds: usize = std::env::var("FABRIC_CHAOS_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(rounds)
        .max(required.len());
    let mut faults = required.to_vec();
    while faults.len() < rounds {
        faults.push(any[rng.usize(..any.len())]);
    }
    rng.shuffle(&mut faults);
    faults
}

/// The partition of `<prefix>.changes` with the most records, and the
/// broker id leading it.
fn busiest_partition_leader(brokers: &str, prefix: &str) -> (i32, i32) {
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let topic = format!("{prefix}.changes");
    let md = c
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .unwrap();
    md.topics()[0]
        .partitions()
        .iter()
        .map(|p| {
            let (_, high) = c
                .fetch_watermarks(&topic, p.id(), Duration::from_secs(10))
                .unwrap();
            (high, p.id(), p.leader())
        })
        .max()
        .map(|(_, id, leader)| (id, leader))
        .expect("the changes topic has partitions")
}

/// One run; the caller holds [`ONE_AT_A_TIME`].
async fn chaos(
    name: &str,
    mut bus: Bus,
    processes: usize,
    rounds: usize,
    required: &[Fault],
    any: &[Fault],
) {
    // PostgreSQL crashes and restarts (immediate mode): a fast shutdown
    // waits for the fabric's walsender to have its WAL confirmed, which it
    // may not be while the fabric is away.
    let pg_restart = std::env::var("FABRIC_TEST_PG_CRASH").unwrap_or_default();
    let my_restart = std::env::var("FABRIC_TEST_MYSQL_RESTART").unwrap_or_default();
    assert!(
        !pg_restart.is_empty() && !my_restart.is_empty(),
        "FABRIC_TEST_PG_CRASH / FABRIC_TEST_MYSQL_RESTART are not set: run the tests with ./scripts/test.sh"
    );
    let seed: u64 = std::env::var("FABRIC_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut faults = faults(&mut rng, rounds, required, any);
    if let Some(fixed) = fixed_faults() {
        let allowed = |f: &Fault| required.contains(f) || any.contains(f);
        faults = fixed.into_iter().filter(allowed).collect();
    }
    println!("chaos {name}: seed {seed} (FABRIC_CHAOS_SEED={seed} repeats it): {faults:?}");

    let dbs = TwoDatabases::create("fab_chaos").await;
    // FABRIC_CHAOS_KEEP=1 keeps the run's directory (logs, snapshots).
    let tmp = tempfile::tempdir().unwrap();
    let (_guard, dir) = if std::env::var("FABRIC_CHAOS_KEEP").is_ok_and(|v| v == "1") {
        let kept = tmp.keep();
        println!("chaos {name}: keeping {}", kept.display());
        (None, kept)
    } else {
        let path = tmp.path().to_path_buf();
        (Some(tmp), path)
    };
    let prefix = unique("chaos");
    let bus_config = match (&bus, bus.brokers()) {
        (Bus::Embedded, _) => "partitions = 4\n".to_string(),
        (b, Some(brokers)) => format!(
            "kind = \"kafka\"\npartitions = 4\n[bus.kafka]\nbrokers = \"{brokers}\"\n\
             topic_prefix = \"{prefix}\"\nsession_timeout = \"6s\"\nreplication = {}\n",
            if matches!(b, Bus::Cluster(_)) { 3 } else { 1 }
        ),
        _ => unreachable!(),
    };
    // Each process: its own ports, snapshots and dead-letter file; the same
    // sources and topics.
    let configs: Vec<PathBuf> = (0..processes)
        .map(|i| {
            let d = dir.as_path().join(format!("p{i}"));
            std::fs::create_dir_all(&d).unwrap();
            dbs.config(&d, &bus_config)
        })
        .collect();
    let log = |i: usize, n: usize| dir.as_path().join(format!("fabric-p{i}-{n}.log"));
    let started = Instant::now();
    let mut fabrics: Vec<FabricProcess> = (0..processes)
        .map(|i| FabricProcess::start(&configs[i], &log(i, 0)))
        .collect();
    for f in &mut fabrics {
        f.wait_serving(Duration::from_secs(90)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for s in 0..2 {
        load.push(tokio::spawn(pg_workload(
            dbs.pg.clone(),
            s,
            Until::Stopped(stop.clone()),
        )));
    }
    load.push(tokio::spawn(my_workload(
        dbs.my_db(),
        0,
        Until::Stopped(stop.clone()),
    )));

    let mut survived = 0;
    for (n, fault) in faults.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(rng.u64(300..2500))).await;
        match fault {
            Fault::KillFabric => {
                let i = rng.usize(..processes);
                fabrics[i].kill9();
                fabrics[i] = FabricProcess::start(&configs[i], &log(i, n + 1));
                fabrics[i].wait_serving(Duration::from_secs(90)).await;
            }
            // Under the live processes and the write load: their producers
            // and consumers reconnect by themselves.
            Fault::KillBroker => {
                let Bus::Kafka(b) = &mut bus else {
                    panic!("a broker fault needs the Kafka bus")
                };
                b.kill9();
                tokio::time::sleep(Duration::from_millis(rng.u64(1000..5000))).await;
                b.restart();
            }
            Fault::KillLeader => {
                let Bus::Cluster(c) = &mut bus else {
                    panic!("a leader fault needs the cluster")
                };
                let (partition, leader) = busiest_partition_leader(&c.bootstrap(), &prefix);
                println!(
                    "chaos {name}: SIGKILL node {leader}, leader of {prefix}.changes/{partition}"
                );
                c.node(leader).kill9();
                tokio::time::sleep(Duration::from_millis(rng.u64(3000..8000))).await;
                c.node(leader).restart();
            }
            Fault::RestartPostgres => run(&pg_restart, "restarting PostgreSQL", &fabrics, &bus),
            Fault::RestartMariadb => run(&my_restart, "restarting MariaDB", &fabrics, &bus),
        }
        survived += 1;
    }
    // A little more load after the last fault, then stop writing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut written = 0;
    for l in load {
        written += l.await.unwrap();
    }

    // Every process answers for every customer (forwarding what it does
    // not hold).
    let want = dbs.expected().await;
    for f in &fabrics {
        converge_to(f, &want, Duration::from_secs(180)).await;
    }
    let count = |f: Fault| faults.iter().filter(|x| **x == f).count();
    let mut summary = format!(
        "chaos {name}: {written} source transactions written, {survived} faults survived \
         ({} fabric SIGKILLs, {} broker SIGKILLs, {} leader SIGKILLs, {} PostgreSQL restarts, \
         {} MariaDB restarts), {} entities compared with the sources, 0 mismatches",
        count(Fault::KillFabric),
        count(Fault::KillBroker),
        count(Fault::KillLeader),
        count(Fault::RestartPostgres),
        count(Fault::RestartMariadb),
        want.len(),
    );
    if let Some(brokers) = bus.brokers() {
        let grpc = grpc_customers(&fabrics[0], "").await;
        let topic =
            stock_read_until_current(&brokers, &prefix, &grpc, Duration::from_secs(120)).await;
        let repeats = assert_no_version_missing(&topic);
        // Repeats may follow the newest version (a replay after a restart),
        // so the newest version is compared, and where it is not the last
        // message, that is counted too: a consumer keeping the last message
        // per key saw an older version for a while.
        let stale_last = topic
            .values()
            .filter(|m| m.last().unwrap().version < m.iter().map(|m| m.version).max().unwrap())
            .count();
        let compared = topic_matches_grpc(&newest_per_key(&topic), &grpc);
        let messages: usize = topic.values().map(Vec::len).sum();
        summary += &format!(
            "; the entities topic read by a stock consumer: {messages} messages, \
             {compared} entities with no version missing and the newest equal to GetEntity, \
             {repeats} repeated messages, {stale_last} keys ending on a repeat"
        );
    }
    println!("{summary}; in {:.0} s", started.elapsed().as_secs_f64());
    assert!(written > 0, "the workload wrote nothing");
    for f in &mut fabrics {
        assert!(f.terminate(), "{}", f.log_text());
    }
    drop(bus);
    dbs.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_the_embedded_bus_loses_nothing_and_invents_nothing() {
    use Fault::*;
    let _serial = ONE_AT_A_TIME.lock().await;
    chaos(
        "embedded",
        Bus::Embedded,
        1,
        9,
        &[
            KillFabric,
            KillFabric,
            KillFabric,
            KillFabric,
            KillFabric,
            RestartPostgres,
            RestartMariadb,
        ],
        &[KillFabric, KillFabric, RestartPostgres, RestartMariadb],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_kafka_with_two_processes_and_a_broker_kill() {
    use Fault::*;
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&dir.path().join("broker"), free_port());
    chaos(
        "kafka",
        Bus::Kafka(broker),
        2,
        9,
        &[
            KillFabric,
            KillFabric,
            KillFabric,
            KillFabric,
            KillFabric,
            KillBroker,
            RestartPostgres,
            RestartMariadb,
        ],
        &[KillFabric, KillBroker, RestartPostgres, RestartMariadb],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_a_kafka_cluster_when_the_busiest_leader_dies() {
    use Fault::*;
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path());
    chaos(
        "kafka-cluster",
        Bus::Cluster(cluster),
        2,
        5,
        &[KillLeader, KillLeader, KillFabric, KillFabric],
        &[KillFabric, KillLeader],
    )
    .await;
}
