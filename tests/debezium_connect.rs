//! Debezium for real: Kafka Connect running Debezium's PostgreSQL connector
//! (`scripts/debezium_connect.sh`, jars from Maven Central) writes its change
//! topics to Apache Kafka, and the fabric's `debezium_kafka` source reads
//! them. Customers and addresses come through Debezium, invoices and
//! payments from MariaDB's binlog; under a random workload (addresses
//! moving between customers through Debezium's old images, invoices with
//! their payments and payments between invoices through the binlog) every
//! customer must equal what the two databases hold, and nothing may be
//! dead-lettered: the decoder sees Debezium's own output (with and without
//! schemas, its tombstones, its transaction metadata), not envelopes written
//! by hand.

mod common;

use common::two_databases::*;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Kafka Connect with Debezium, a process of this test's own.
struct Connect {
    child: Option<std::process::Child>,
    log: std::path::PathBuf,
}

impl Connect {
    /// Starts it on `db` of the test PostgreSQL (its replication slot named
    /// `db` too), writing topics `<prefix>.public.<table>`; returns once it
    /// streams.
    fn start(
        dir: &Path,
        brokers: &str,
        db: &str,
        prefix: &str,
        schemas: bool,
        transactions: bool,
        extra: &str,
    ) -> Self {
        let script = std::env::var("FABRIC_TEST_DEBEZIUM_CONNECT").expect(
            "FABRIC_TEST_DEBEZIUM_CONNECT is not set: run the tests with ./scripts/test.sh, or eval \"$(scripts/services.sh start)\" first",
        );
        // postgres://postgres@127.0.0.1:55432/postgres
        let url = pg_url();
        let hostport = url.split_once('@').unwrap().1.split_once('/').unwrap().0;
        let (host, port) = hostport.split_once(':').unwrap();
        std::fs::create_dir_all(dir).unwrap();
        let log = dir.join("connect.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(script)
            .arg("run")
            .arg(dir)
            .args([brokers, host, port, db, prefix, db])
            .arg(schemas.to_string())
            .arg(transactions.to_string())
            .env("FABRIC_DBZ_TABLES", "public.customers,public.addresses")
            .env("FABRIC_DBZ_EXTRA", extra)
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut c = Connect {
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let text = std::fs::read_to_string(&c.log).unwrap_or_default();
            if text.contains("Processing messages") {
                return c;
            }
            if let Some(status) = c.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("Kafka Connect exited ({status}) before streaming; its log:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "Kafka Connect did not stream within 180 s; its log:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM: Connect flushes its offsets and stops.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Connect {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!(
                "--- last lines of {} ---\n{}",
                self.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The two-database fabric with `crm` read from Debezium's topics instead
/// of PostgreSQL's replication stream.
fn debezium_config(
    dbs: &TwoDatabases,
    dir: &Path,
    brokers: &str,
    topics: &[String],
) -> std::path::PathBuf {
    let path = dbs.config(dir, "partitions = 4\n");
    let text = std::fs::read_to_string(&path).unwrap();
    let cdc = format!(
        "kind = \"postgres_cdc\"\nurl = \"{pg}\"\ntables = [\"public.customers\", \"public.addresses\"]\nslot = \"{db}\"\npublication = \"{db}\"\n",
        pg = dbs.pg,
        db = dbs.db
    );
    assert!(
        text.contains(&cdc),
        "the two-database config changed:\n{text}"
    );
    let topics = topics
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let text = text.replace(
        &cdc,
        &format!("kind = \"debezium_kafka\"\nbrokers = \"{brokers}\"\ntopics = [{topics}]\n"),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// One run: Connect with these converter settings, a random workload on
/// both databases, every customer compared, no dead letters.
async fn debezium_run(name: &str, schemas: bool, transactions: bool, extra: &str) {
    let brokers = std::env::var("FABRIC_TEST_KAFKA").expect(
        "FABRIC_TEST_KAFKA is not set: run the tests with ./scripts/test.sh, or eval \"$(scripts/services.sh start)\" first",
    );
    let dbs = TwoDatabases::create("fab_dbz").await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique(&format!("dbz_{name}"));
    // The slot is named as the database, so that drop_all drops it.
    let mut connect = Connect::start(
        &dir.path().join("connect"),
        &brokers,
        &dbs.db,
        &prefix,
        schemas,
        transactions,
        extra,
    );
    let mut topics = vec![
        format!("{prefix}.public.customers"),
        format!("{prefix}.public.addresses"),
    ];
    if transactions {
        // BEGIN/END records: read, understood as no row change, skipped.
        topics.push(format!("{prefix}.transaction"));
    }
    let config = debezium_config(&dbs, dir.path(), &brokers, &topics);
    let mut fabric = FabricProcess::start(&config, &dir.path().join("fabric.log"));
    fabric.wait_serving(Duration::from_secs(120)).await;

    let mut load = Vec::new();
    for s in 0..2 {
        load.push(tokio::spawn(pg_workload(
            dbs.pg.clone(),
            s,
            Until::Count(400),
        )));
    }
    load.push(tokio::spawn(my_workload(dbs.my_db(), 0, Until::Count(200))));
    let mut written = 0;
    for l in load {
        written += l.await.unwrap();
    }
    let want = dbs.expected().await;
    converge_to(&fabric, &want, Duration::from_secs(180)).await;

    let dlq = std::fs::read_to_string(dir.path().join("dlq.jsonl")).unwrap_or_default();
    assert!(
        dlq.trim().is_empty(),
        "Debezium's output was dead-lettered:\n{}",
        dlq.lines().take(5).collect::<Vec<_>>().join("\n")
    );
    println!(
        "debezium {name} (schemas {schemas}, transaction metadata {transactions}): {written} source transactions, {} customers equal to the sources, 0 dead letters",
        want.len()
    );
    assert!(fabric.terminate(), "{}", fabric.log_text());
    connect.stop();
    dbs.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_with_schemas_and_transaction_metadata_feeds_entities_equal_to_the_sources() {
    debezium_run("schemas", true, true, "").await;
}

/// Without schemas a precise decimal is bytes with no scale to read them
/// by: Debezium's documented choice is to send decimals as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_without_schemas_feeds_entities_equal_to_the_sources() {
    debezium_run("plain", false, false, "decimal.handling.mode=string").await;
}
