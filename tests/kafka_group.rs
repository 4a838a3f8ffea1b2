//! Several fabric processes in one consumer group on a real broker (tansu,
//! started by `scripts/services.sh`): they share the bus partitions and the
//! sources, hand them over when one joins, take over from one killed with
//! SIGKILL, and give partitions back when it returns. Checked as a user
//! sees it: every customer is served by exactly one process, equal to its
//! sources; a partition not served here answers UNAVAILABLE, never an old
//! version.

mod common;

use common::*;
use entity_fabric::proto::catalog_service_client::CatalogServiceClient;
use entity_fabric::proto::entity_service_client::EntityServiceClient;
use entity_fabric::proto::{BatchGetEntitiesRequest, ListPartitionsRequest, ListSourcesRequest};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

fn brokers() -> String {
    std::env::var("FABRIC_TEST_KAFKA").expect(
        "FABRIC_TEST_KAFKA is not set: run the tests with ./scripts/test.sh, or eval \"$(scripts/services.sh start)\" first",
    )
}

const PARTITIONS: u32 = 4;

/// The demo config on the Kafka bus, for the first process.
fn first_config(dir: &Path, prefix: &str) -> PathBuf {
    let path = demo_config(
        dir,
        &DemoSettings {
            customers: 300,
            snapshot_interval: "500ms",
            partitions: PARTITIONS,
            ..Default::default()
        },
    );
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("kind = \"embedded\""));
    let text = text.replace("kind = \"embedded\"", "kind = \"kafka\"")
        + &format!(
            "\n[bus.kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\nsession_timeout = \"6s\"\n",
            brokers()
        );
    std::fs::write(&path, text).unwrap();
    path
}

/// Another process of the same fabric: same sources and topics, its own
/// ports, snapshot directory and dead-letter file.
fn other_config(first: &Path, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(first).unwrap();
    let cfg = entity_fabric::config::Config::load(first).unwrap();
    let text = text
        .replace(&cfg.server.grpc_addr, &format!("127.0.0.1:{}", free_port()))
        .replace(
            &cfg.server.admin_addr,
            &format!("127.0.0.1:{}", free_port()),
        )
        .replace("/snapshots\"", &format!("/snapshots-{name}\""))
        .replace("/dlq.jsonl\"", &format!("/dlq-{name}.jsonl\""));
    let path = first.with_file_name(format!("fabric-{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

async fn catalog(f: &FabricProcess) -> Option<CatalogServiceClient<Channel>> {
    CatalogServiceClient::connect(f.grpc.clone()).await.ok()
}

/// The partitions a process serves now.
async fn serving(f: &FabricProcess) -> BTreeSet<u32> {
    let Some(mut c) = catalog(f).await else {
        return BTreeSet::new();
    };
    match c.list_partitions(ListPartitionsRequest {}).await {
        Ok(r) => r
            .into_inner()
            .partitions
            .into_iter()
            .filter(|p| p.serving)
            .map(|p| p.partition)
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// Waits until `nodes` serve every partition between them, each one
/// exactly once, and every node serves at least one; returns the split.
async fn wait_split(nodes: &[&FabricProcess], within: Duration) -> Vec<BTreeSet<u32>> {
    eventually(
        within,
        "the partitions to be split between the processes",
        || async {
            let mut split = Vec::new();
            for n in nodes {
                split.push(serving(n).await);
            }
            let total: usize = split.iter().map(|s| s.len()).sum();
            let union: BTreeSet<u32> = split.iter().flatten().copied().collect();
            (total == PARTITIONS as usize
                && union.len() == PARTITIONS as usize
                && split.iter().all(|s| !s.is_empty()))
            .then_some(split)
        },
    )
    .await
}

/// Per source, its state on each node.
async fn source_states(nodes: &[&FabricProcess]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in nodes {
        let Some(mut c) = catalog(n).await else {
            continue;
        };
        if let Ok(r) = c.list_sources(ListSourcesRequest {}).await {
            for s in r.into_inner().sources {
                out.entry(s.name).or_default().push(s.state);
            }
        }
    }
    out
}

/// Every customer of the sources, read from the process that lists it:
/// each listed by exactly one process and equal to its sources.
async fn compare_cluster(nodes: &[&FabricProcess], data: &Path) -> (usize, Vec<String>) {
    let want = expected_customers(data).await;
    let mut mismatches = Vec::new();
    let mut owner: BTreeMap<i64, usize> = BTreeMap::new();
    let mut clients: Vec<EntityServiceClient<Channel>> = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let mut c = n.client().await;
        for id in all_ids(&mut c, "customer", 500).await {
            let id: i64 = id.parse().unwrap();
            if let Some(j) = owner.insert(id, i) {
                mismatches.push(format!("customer {id}: served by processes {j} and {i}"));
            }
        }
        clients.push(c);
    }
    for id in want.keys() {
        if !owner.contains_key(id) {
            mismatches.push(format!("customer {id}: served by no process"));
        }
    }
    for id in owner.keys() {
        if !want.contains_key(id) {
            mismatches.push(format!("customer {id}: served, not in the sources"));
        }
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let ids: Vec<String> = owner
            .iter()
            .filter(|(_, o)| **o == i)
            .map(|(id, _)| id.to_string())
            .collect();
        for chunk in ids.chunks(500) {
            let resp = match c
                .batch_get_entities(BatchGetEntitiesRequest {
                    r#type: "customer".into(),
                    ids: chunk.to_vec(),
                    view: String::new(),
                })
                .await
            {
                Ok(r) => r.into_inner(),
                Err(e) => {
                    // A partition moved between the listing and the read.
                    mismatches.push(format!("process {i}: {e}"));
                    continue;
                }
            };
            for e in resp.entities {
                let id: i64 = e.id.parse().unwrap();
                if let Some(w) = want.get(&id) {
                    mismatches.extend(diff_entity(id, w, &entity_tables(&e)));
                }
            }
        }
    }
    (want.len(), mismatches)
}

async fn converge_cluster(nodes: &[&FabricProcess], data: &Path, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let (n, mismatches) = compare_cluster(nodes, data).await;
        if mismatches.is_empty() {
            return n;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = nodes.iter().map(|n| n.log_text()).collect();
            panic!(
                "{} mismatches after {within:?}, first ones:\n{}\nlogs:\n{}",
                mismatches.len(),
                mismatches[..mismatches.len().min(20)].join("\n"),
                logs.join("\n-----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Reads one customer from every node: how many nodes answered it, and
/// whether a node that did not answered UNAVAILABLE (the only refusal
/// allowed for an entity that exists).
async fn read_everywhere(clients: &mut [EntityServiceClient<Channel>], id: i64) -> (usize, usize) {
    let (mut answered, mut other) = (0, 0);
    for c in clients.iter_mut() {
        let r = c
            .get_entity(entity_fabric::proto::GetEntityRequest {
                r#type: "customer".into(),
                id: id.to_string(),
                view: String::new(),
            })
            .await;
        match r {
            Ok(_) => answered += 1,
            Err(s) if s.code() == tonic::Code::Unavailable => {
                assert!(
                    s.metadata().get("retry-after-ms").is_some(),
                    "UNAVAILABLE without a retry hint: {s:?}"
                );
            }
            Err(_) => other += 1,
        }
    }
    (answered, other)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_share_partitions_and_take_over_from_a_killed_one() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("group");
    let config_a = first_config(dir.path(), &prefix);
    let config_b = other_config(&config_a, "b");
    let data = dir.path().join("data");

    // One process owns everything.
    let mut a = FabricProcess::start(&config_a, &dir.path().join("a.log"));
    a.wait_serving(Duration::from_secs(60)).await;
    let customers = converge_cluster(&[&a], &data, Duration::from_secs(120)).await;
    println!("process a alone: {customers} customers equal to the sources");

    // A second one joins under write load: the group splits the partitions.
    let w = Workload::start(&data, 40.0);
    let mut b = FabricProcess::start(&config_b, &dir.path().join("b.log"));
    b.wait_serving(Duration::from_secs(60)).await;
    let started = Instant::now();
    let split = wait_split(&[&a, &b], Duration::from_secs(90)).await;
    println!(
        "b joined: split {split:?} after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let written = w.stop().await;
    let n = converge_cluster(&[&a, &b], &data, Duration::from_secs(120)).await;
    println!("{written} transactions written; {n} customers equal, each served once");
    // Every customer is answered by exactly one process; the other says UNAVAILABLE.
    let mut clients = vec![a.client().await, b.client().await];
    for id in [1, 2, 3, 50, 99, 150, 299] {
        let (answered, other) = read_everywhere(&mut clients, id).await;
        assert_eq!(
            (answered, other),
            (1, 0),
            "customer {id}: answered by {answered} processes"
        );
    }
    // Each source runs on exactly one process.
    let states = source_states(&[&a, &b]).await;
    for (name, s) in &states {
        let running = s.iter().filter(|s| *s != "elsewhere").count();
        assert_eq!(running, 1, "source {name}: states {s:?}");
    }

    // SIGKILL one under write load: the other takes everything over.
    let w = Workload::start(&data, 40.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.kill9();
    let killed = Instant::now();
    eventually(
        Duration::from_secs(90),
        "the survivor to serve every partition",
        || async { (serving(&b).await.len() == PARTITIONS as usize).then_some(()) },
    )
    .await;
    let took_over = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let written = w.stop().await;
    let n = converge_cluster(&[&b], &data, Duration::from_secs(120)).await;
    println!(
        "a killed: b served every partition after {:.1}s; {written} transactions written; {n} customers equal",
        took_over.as_secs_f64()
    );
    let states = source_states(&[&b]).await;
    assert!(
        states.values().all(|s| s.iter().all(|s| s != "elsewhere")),
        "b runs every source after the kill: {states:?}"
    );

    // The killed process returns and takes partitions back (from its own
    // snapshots, then the log), under write load.
    let w = Workload::start(&data, 40.0);
    let mut a = FabricProcess::start(&config_a, &dir.path().join("a.log"));
    a.wait_serving(Duration::from_secs(60)).await;
    let split = wait_split(&[&a, &b], Duration::from_secs(90)).await;
    let written = w.stop().await;
    let n = converge_cluster(&[&a, &b], &data, Duration::from_secs(120)).await;
    println!("a back: split {split:?}; {written} transactions written; {n} customers equal");
    assert!(
        a.log_text()
            .contains("partition restored from its snapshot")
            || a.log_text().contains("rebuilding it from the log"),
        "a restored the partitions it was given"
    );

    // A clean stop says so: the other takes over without waiting for the
    // lease (6s here) to run out.
    let w = Workload::start(&data, 40.0);
    let stopping = Instant::now();
    assert!(b.terminate(), "b stops cleanly");
    eventually(
        Duration::from_secs(60),
        "a to serve every partition after b stopped",
        || async { (serving(&a).await.len() == PARTITIONS as usize).then_some(()) },
    )
    .await;
    let took_over = stopping.elapsed();
    let written = w.stop().await;
    let n = converge_cluster(&[&a], &data, Duration::from_secs(120)).await;
    println!(
        "b stopped: a served every partition {:.1}s after the SIGTERM; {written} transactions written; {n} customers equal",
        took_over.as_secs_f64()
    );
    assert!(
        a.log_text().contains("source assigned here")
            && source_states(&[&a])
                .await
                .values()
                .all(|s| s.iter().all(|s| s != "elsewhere")),
        "a runs every source after b stopped"
    );
    assert!(a.terminate(), "a stops cleanly");
}
