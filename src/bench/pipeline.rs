//! Part 5: freshness end to end through Kafka, both pipelines at once on the
//! same commits. A writer makes single-row transactions in PostgreSQL at
//! 200/s, each setting `ts_ns` to the wall clock just before its commit.
//! Two plain Kafka consumers (librdkafka, none of the fabric's code) read:
//!
//! - Debezium's change topic: Debezium's PostgreSQL connector in Kafka
//!   Connect (`scripts/debezium_connect.sh`, JSON without schemas,
//!   `poll.interval.ms=1` rather than its default 500), the event's
//!   `after.ts_ns`;
//! - the fabric's entities topic: the fabric capturing the same table with
//!   `postgres_cdc` on the Kafka bus (entities and state topics on, its
//!   default), the newest `ts_ns` among the entity's rows.
//!
//! The latency of a change is the wall clock when its message is read
//! minus its `ts_ns`. Both capture from the same server through slots of
//! their own and publish to the same broker; on a Debezium → Kafka → cache
//! pipeline the Debezium row is where a cache's updater would start, so it
//! is a lower bound for that pipeline. Needs `--kafka`.

use super::harness::{self, FabricChild, now_ns};
use super::{Bench, Table, pg_exec};
use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use sqlx::Connection;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const ROWS: u64 = 10_000;
const ROWS_PER_ENTITY: u64 = 10;
const TXNS_PER_SECOND: u64 = 200;

fn config(b: &Bench, brokers: &str, prefix: &str, grpc: &str, admin: &str) -> String {
    format!(
        "[server]\ngrpc_addr = \"{grpc}\"\nadmin_addr = \"{admin}\"\n\n\
         [bus]\nkind = \"kafka\"\npartitions = 8\n\n\
         [bus.kafka]\nbrokers = \"{brokers}\"\ntopic_prefix = \"{prefix}\"\n\n\
         [snapshot]\ndir = \"{dir}/{prefix}-snapshots\"\n\n\
         [dlq]\nfile = \"{dir}/{prefix}-dlq.jsonl\"\n\n\
         [log]\nlevel = \"warn\"\n\n\
         [[sources]]\nname = \"pg\"\nkind = \"postgres_cdc\"\nurl = \"{url}\"\n\
         tables = [\"public.fresh_orders\"]\nslot = \"{slot}\"\npublication = \"{slot}\"\n\n\
         [[entities]]\nname = \"account\"\n\n\
         [[entities.tables]]\nname = \"orders\"\nsource = \"pg\"\nfrom = \"public.fresh_orders\"\n\
         id_column = \"customer_id\"\nprimary_key = [\"id\"]\n",
        dir = b.dir.display(),
        url = b.pg_url,
        slot = b.slot("pipeline"),
    )
}

/// Kafka Connect with Debezium's connector, stopped (SIGTERM) on drop.
struct Connect(std::process::Child);

impl Connect {
    /// Starts it and waits until it streams (its log says "Processing
    /// messages"); the jars are resolved by the script on first use.
    async fn start(b: &Bench, brokers: &str, prefix: &str, slot: &str) -> anyhow::Result<Self> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/debezium_connect.sh");
        let dir = b.dir.join(format!("{prefix}-connect"));
        std::fs::create_dir_all(&dir)?;
        let url = url::Url::parse(&b.pg_url)?;
        let log = dir.join("connect.log");
        let out = std::fs::File::create(&log)?;
        let child = std::process::Command::new("bash")
            .arg(&script)
            .arg("run")
            .arg(&dir)
            .args([
                brokers,
                url.host_str().unwrap_or("127.0.0.1"),
                &url.port().unwrap_or(5432).to_string(),
                &b.db,
                prefix,
                slot,
                "false",
                "false",
            ])
            .env("FABRIC_DBZ_TABLES", "public.fresh_orders")
            // Its freshest setting (default 500 ms between polls of the
            // queue its streaming thread fills).
            .env("FABRIC_DBZ_EXTRA", "poll.interval.ms=1")
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot run {}", script.display()))?;
        let c = Connect(child);
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Processing messages") {
                return Ok(c);
            }
            if Instant::now() > deadline {
                bail!(
                    "Kafka Connect did not stream within 600s: see {}",
                    log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Connect {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads `topic` from its end in a thread until `stop`; the latency of each
/// message `written_at` finds a `ts_ns` of at least `from` in.
fn read_latencies(
    brokers: &str,
    topic: &str,
    from: i64,
    stop: Arc<AtomicBool>,
    written_at: fn(&serde_json::Value) -> Option<i64>,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<Vec<u64>>>> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}.bench"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let parts = md.topics().first().map_or(0, |t| t.partitions().len());
    if parts == 0 {
        bail!("topic {topic} has no partitions");
    }
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..parts as i32 {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::End)?;
    }
    consumer.assign(&tpl)?;
    Ok(std::thread::spawn(move || {
        let mut lat = Vec::new();
        while !stop.load(Ordering::Acquire) {
            match consumer.poll(Duration::from_millis(50)) {
                Some(Ok(m)) => {
                    let arrived = now_ns();
                    let Some(p) = m.payload() else { continue };
                    let v: serde_json::Value = serde_json::from_slice(p)?;
                    if let Some(ts) = written_at(&v).filter(|ts| *ts >= from) {
                        lat.push((arrived - ts).max(0) as u64);
                    }
                }
                Some(Err(e)) => tracing::warn!(error = %e, "bench consumer"),
                None => {}
            }
        }
        Ok(lat)
    }))
}

/// Debezium's event (JSON without schemas): `after.ts_ns`.
fn debezium_ts(v: &serde_json::Value) -> Option<i64> {
    v["after"]["ts_ns"].as_i64()
}

/// The fabric's entity document: the newest `ts_ns` of its rows.
fn entity_ts(v: &serde_json::Value) -> Option<i64> {
    v["tables"]["orders"]
        .as_array()?
        .iter()
        .filter_map(|r| r["ts_ns"].as_i64())
        .max()
}

/// Waits until `topic` exists.
async fn wait_topic(brokers: &str, topic: &str) -> anyhow::Result<()> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("allow.auto.create.topics", "false")
        .create()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        if md
            .topics()
            .first()
            .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty())
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("topic {topic} did not appear within 120s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn run(b: &Bench, tables: &mut Vec<Table>) -> anyhow::Result<()> {
    let Some(brokers) = b.kafka.as_deref() else {
        eprintln!("pipeline: no broker given (--kafka): not measured");
        return Ok(());
    };
    let (slot, dbz_slot) = (b.slot("pipeline"), b.slot("pipeline_dbz"));
    let mut pg = sqlx::PgConnection::connect(&b.pg_url).await?;
    for s in [
        "DROP TABLE IF EXISTS fresh_orders".to_string(),
        "CREATE TABLE fresh_orders (id bigint PRIMARY KEY, customer_id bigint NOT NULL, \
         amount numeric(12,2) NOT NULL, status text NOT NULL, ts_ns bigint NOT NULL)"
            .into(),
        format!(
            "INSERT INTO fresh_orders SELECT i, (i - 1) / {ROWS_PER_ENTITY} + 1, (i % 10000) / 100.0, \
             (ARRAY['placed','paid','shipped'])[1 + i % 3], 0 FROM generate_series(1, {ROWS}) i"
        ),
        // The fabric's postgres_cdc needs whole rows in updates.
        "ALTER TABLE fresh_orders REPLICA IDENTITY FULL".into(),
        format!("DROP PUBLICATION IF EXISTS {slot}"),
        format!("CREATE PUBLICATION {slot} FOR TABLE fresh_orders"),
        format!("DROP PUBLICATION IF EXISTS {dbz_slot}_pub"),
    ] {
        pg_exec(&mut pg, &s).await?;
    }
    b.drop_slot(&slot).await?;
    b.drop_slot(&dbz_slot).await?;
    let prefix = format!(
        "bench-pipeline-{}",
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis()
    );
    eprintln!("pipeline: starting Kafka Connect with Debezium's PostgreSQL connector");
    let connect = Connect::start(b, brokers, &format!("{prefix}-dbz"), &dbz_slot).await?;
    eprintln!("pipeline: starting the fabric on the Kafka bus");
    let mut f = FabricChild::launch(&b.dir, &prefix, |grpc, admin| {
        config(b, brokers, &prefix, grpc, admin)
    })
    .await?;
    // Both have read the table's initial snapshot.
    f.wait_metric(
        "fabric_changes_applied_total",
        "",
        ROWS as f64,
        Duration::from_secs(600),
    )
    .await?;
    let (dbz_topic, fab_topic) = (
        format!("{prefix}-dbz.public.fresh_orders"),
        format!("{prefix}.entities"),
    );
    wait_topic(brokers, &dbz_topic).await?;
    wait_topic(brokers, &fab_topic).await?;
    // What the snapshots put on the topics goes by first.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let from = now_ns();
    let stop = Arc::new(AtomicBool::new(false));
    let dbz = read_latencies(brokers, &dbz_topic, from, stop.clone(), debezium_ts)?;
    let fab = read_latencies(brokers, &fab_topic, from, stop.clone(), entity_ts)?;
    eprintln!(
        "pipeline: {TXNS_PER_SECOND} transactions/s for {:?}",
        b.freshness
    );
    let written = harness::write_timestamps(
        &b.pg_url,
        "fresh_orders",
        ROWS,
        TXNS_PER_SECOND,
        b.freshness,
    )
    .await?;
    // The last changes still on their way.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Release);
    let join = |h: std::thread::JoinHandle<anyhow::Result<Vec<u64>>>| {
        h.join()
            .map_err(|_| anyhow::anyhow!("a bench consumer panicked"))?
    };
    let (dbz, fab) = (join(dbz)?, join(fab)?);
    f.stop().await?;
    drop(connect);
    b.drop_slot(&slot).await?;
    b.drop_slot(&dbz_slot).await?;
    for (who, lat) in [("Debezium's topic", &dbz), ("the entities topic", &fab)] {
        if (lat.len() as u64) < written * 9 / 10 {
            bail!("{who} showed {} of {written} changes", lat.len());
        }
    }
    let (dbz, fab) = (harness::summarize(&dbz), harness::summarize(&fab));
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e6;
    let mut t = Table::new(
        &format!(
            "Freshness end to end through Kafka at {TXNS_PER_SECOND} single-row transactions/s: \
             commit in PostgreSQL to a Kafka consumer's read (ms; {ROWS} rows, {} entities)",
            ROWS / ROWS_PER_ENTITY
        ),
        &[
            "pipeline",
            "changes",
            "p50",
            "p99",
            "max",
            "p50 ÷ Debezium's",
            "p99 ÷ Debezium's",
        ],
    );
    for (what, h) in [
        (
            "PostgreSQL → Debezium 3.6 (Kafka Connect, poll.interval.ms=1) → its change topic",
            &dbz,
        ),
        (
            "PostgreSQL → fabric (postgres_cdc, Kafka bus) → entities topic",
            &fab,
        ),
    ] {
        t.row(vec![
            what.into(),
            h.len().to_string(),
            format!("{:.2}", ms(h, 0.5)),
            format!("{:.2}", ms(h, 0.99)),
            format!("{:.2}", h.max() as f64 / 1e6),
            format!("{:.2}", ms(h, 0.5) / ms(&dbz, 0.5)),
            format!("{:.2}", ms(h, 0.99) / ms(&dbz, 0.99)),
        ]);
    }
    tables.push(t);
    Ok(())
}
