//! `fabric bench`: the fabric side by side with its peers, in one run on
//! one machine, over loopback.
//!
//! Parts, each a module:
//! - [`reads`] — GetEntity and BatchGetEntities against Redis `GET`/`MGET` of
//!   prebuilt JSON views and PostgreSQL building the view in one query, at
//!   several concurrencies; and the fabric's resident memory against the raw
//!   bytes of the rows it holds.
//! - [`ingest`] — change events pushed into micro-DBs through the embedded
//!   bus and through the Kafka bus, against the broker's own produce+consume
//!   rate.
//! - [`cdc`] — PostgreSQL change capture against Debezium's embedded engine:
//!   initial snapshot, catch-up, freshness, memory.
//! - [`snapshots`] — write and restore of snapshot files.
//!
//! The fabric under test is this binary run as `fabric run` in a child
//! process, on a generated config; the peers are the services the caller
//! points at (`scripts/bench.sh` starts private ones). Every figure is
//! printed next to its peer's from the same run, as a ratio: the machines
//! this runs on are shared and noisy, so absolute numbers mean little.

mod cdc;
mod clients;
mod debezium;
mod harness;
mod ingest;
mod pipeline;
mod reads;
mod snapshots;

use anyhow::Context;
use sqlx::Connection;
use std::path::PathBuf;
use std::time::Duration;

/// The parts of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Entity reads and the memory they take.
    Reads,
    /// Change events applied through the embedded and the Kafka bus.
    Ingest,
    /// PostgreSQL change capture (against Debezium with `--debezium`).
    Cdc,
    /// Snapshot write and restore.
    Snapshots,
    /// Freshness end to end through Kafka: Debezium's change topic against
    /// the fabric's entities topic (needs `--kafka`).
    Pipeline,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Which parts to run.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Part::Reads, Part::Ingest, Part::Cdc, Part::Snapshots, Part::Pipeline])]
    pub only: Vec<Part>,
    /// Tiny sizes and short runs: checks that every part works (the test
    /// suite runs this), measures nothing worth reporting.
    #[arg(long)]
    pub smoke: bool,
    /// Customers in the read set.
    #[arg(long, default_value_t = 100_000)]
    pub entities: u64,
    /// Concurrent requests of the read runs.
    #[arg(long, value_delimiter = ',', default_values_t = [2, 8, 32, 128])]
    pub concurrency: Vec<usize>,
    /// Length of each read run (after a warm-up of a fifth of it, at least 1s).
    #[arg(long, default_value = "10s")]
    pub duration: humantime::Duration,
    /// Change events of the ingest part on the embedded bus.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Change events of the ingest part on the Kafka bus (and of the
    /// broker's own run): the figure that matters is the ratio to the
    /// broker's own rate, which this many events measures.
    #[arg(long, default_value_t = 100_000)]
    pub kafka_events: u64,
    /// Also measure the Kafka bus with the entities and state topics on
    /// (the default config). Each applied change then writes its entity's
    /// whole document and micro-DB too: more than the test broker takes
    /// (BENCHMARKS.md).
    #[arg(long)]
    pub kafka_topics: bool,
    /// Rows of the change-capture table (snapshot and catch-up).
    #[arg(long, default_value_t = 1_000_000)]
    pub cdc_rows: u64,
    /// Length of each freshness run (at 200 transactions/s).
    #[arg(long, default_value = "20s")]
    pub freshness: humantime::Duration,
    /// Entities written and restored by the snapshot part.
    #[arg(long, default_value_t = 1_000_000)]
    pub snapshot_entities: u64,
    /// Also run Debezium's PostgreSQL connector (installed on first use by
    /// scripts/debezium_setup.sh, which needs Java 17 and PyPI).
    #[arg(long)]
    pub debezium: bool,
    /// PostgreSQL with wal_level=logical.
    #[arg(long, env = "FABRIC_TEST_PG_URL")]
    pub postgres: String,
    /// The database created anew on it for the run; also the prefix of the
    /// replication slots the run creates (and drops).
    #[arg(long, default_value = "fabric_bench")]
    pub database: String,
    /// Redis.
    #[arg(long, env = "FABRIC_TEST_REDIS_URL")]
    pub redis: Option<String>,
    /// A Kafka-protocol broker, `host:port` (ingest on the Kafka bus).
    #[arg(long, env = "FABRIC_TEST_KAFKA")]
    pub kafka: Option<String>,
    /// Where configs, logs, snapshots and the fabric's data go.
    #[arg(long, default_value = "target/bench")]
    pub dir: PathBuf,
    /// Earlier versions each entity keeps (the entity types' `history`);
    /// unset: the config's default.
    #[arg(long)]
    pub history: Option<usize>,
}

/// What every part works with.
pub struct Bench {
    /// The run's database.
    pub pg_url: String,
    /// Its name: slots are named after it.
    pub db: String,
    /// The server's own database, for creating and dropping `fabric_bench`.
    pub pg_admin_url: String,
    pub redis_url: Option<String>,
    pub kafka: Option<String>,
    pub dir: PathBuf,
    pub entities: u64,
    pub concurrency: Vec<usize>,
    pub warmup: Duration,
    pub duration: Duration,
    pub events: u64,
    pub kafka_events: u64,
    pub kafka_topics: bool,
    pub cdc_rows: u64,
    pub freshness: Duration,
    pub snapshot_entities: u64,
    pub debezium: bool,
    pub history: Option<usize>,
}

impl Bench {
    /// The `history = N` line of the configs' entity types, when asked for.
    fn history_line(&self) -> String {
        self.history
            .map(|n| format!("history = {n}\n"))
            .unwrap_or_default()
    }

    async fn redis(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        let url = self
            .redis_url
            .as_deref()
            .context("the reads part needs Redis: --redis or FABRIC_TEST_REDIS_URL")?;
        redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("cannot reach Redis at {url}"))
    }

    /// The name of the run's replication slot for `what`.
    pub fn slot(&self, what: &str) -> String {
        format!("{}_{what}", self.db)
    }

    /// Drops a replication slot if it exists.
    pub async fn drop_slot(&self, slot: &str) -> anyhow::Result<()> {
        let mut pg = sqlx::PgConnection::connect(&self.pg_url).await?;
        sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1",
        )
        .bind(slot)
        .execute(&mut pg)
        .await?;
        Ok(())
    }
}

pub async fn pg_exec(conn: &mut sqlx::PgConnection, sql: &str) -> anyhow::Result<()> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(conn)
        .await
        .with_context(|| format!("postgres: {sql}"))?;
    Ok(())
}

/// One result table, printed as Markdown.
pub struct Table {
    title: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: &str, header: &[&str]) -> Self {
        Table {
            title: title.to_string(),
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut out = format!("### {}\n\n", self.title);
        out += &format!("| {} |\n", self.header.join(" | "));
        out += &format!("|{}\n", "---|".repeat(self.header.len()));
        for r in &self.rows {
            out += &format!("| {} |\n", r.join(" | "));
        }
        out
    }
}

/// Creates the run's database anew (dropping the slots on it).
async fn fresh_database(admin_url: &str, db: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !db.is_empty()
            && db
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
        "--database {db:?}: use lower-case letters, digits and _"
    );
    let mut pg = sqlx::PgConnection::connect(admin_url)
        .await
        .with_context(|| format!("cannot reach PostgreSQL at {admin_url}"))?;
    let (level,): (String,) = sqlx::query_as("SHOW wal_level").fetch_one(&mut pg).await?;
    anyhow::ensure!(
        level == "logical",
        "PostgreSQL at {admin_url} has wal_level={level}; change capture needs logical"
    );
    sqlx::query(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
         WHERE database = $1 AND NOT active",
    )
    .bind(db)
    .execute(&mut pg)
    .await?;
    pg_exec(
        &mut pg,
        &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
    )
    .await?;
    pg_exec(&mut pg, &format!("CREATE DATABASE {db}")).await?;
    Ok(())
}

fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let mut u = url::Url::parse(url).with_context(|| format!("not a URL: {url}"))?;
    u.set_path(&format!("/{db}"));
    Ok(u.to_string())
}

/// Runs the parts asked for and prints their tables; returns the Markdown.
pub async fn run(args: BenchArgs) -> anyhow::Result<String> {
    // A measurement that needs a process of its own (see snapshots.rs).
    if let Ok(probe) = std::env::var(snapshots::LINEAGE_PROBE) {
        return snapshots::lineage_probe(&probe);
    }
    let smoke = args.smoke;
    let duration: Duration = if smoke {
        Duration::from_millis(300)
    } else {
        args.duration.into()
    };
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let dir = std::fs::canonicalize(&args.dir)?;
    let b = Bench {
        pg_url: with_database(&args.postgres, &args.database)?,
        db: args.database.clone(),
        pg_admin_url: args.postgres.clone(),
        redis_url: args.redis.clone(),
        kafka: args.kafka.clone(),
        dir,
        entities: if smoke { 300 } else { args.entities },
        concurrency: if smoke {
            vec![2, 8]
        } else {
            args.concurrency.clone()
        },
        warmup: if smoke {
            Duration::from_millis(100)
        } else {
            (duration / 5).max(Duration::from_secs(1))
        },
        duration,
        events: if smoke { 5_000 } else { args.events },
        kafka_events: if smoke { 2_000 } else { args.kafka_events },
        kafka_topics: smoke || args.kafka_topics,
        cdc_rows: if smoke { 2_000 } else { args.cdc_rows },
        freshness: if smoke {
            Duration::from_secs(2)
        } else {
            args.freshness.into()
        },
        snapshot_entities: if smoke { 2_000 } else { args.snapshot_entities },
        debezium: args.debezium,
        history: args.history,
    };
    fresh_database(&b.pg_admin_url, &b.db).await?;
    let started = std::time::Instant::now();
    let mut tables = Vec::new();
    for part in [
        Part::Reads,
        Part::Ingest,
        Part::Cdc,
        Part::Snapshots,
        Part::Pipeline,
    ] {
        if !args.only.contains(&part) {
            continue;
        }
        let before = tables.len();
        match part {
            Part::Reads => reads::run(&b, &mut tables).await,
            Part::Ingest => ingest::run(&b, &mut tables).await,
            Part::Cdc => cdc::run(&b, &mut tables).await,
            Part::Snapshots => snapshots::run(&b, &mut tables).await,
            Part::Pipeline => pipeline::run(&b, &mut tables).await,
        }
        .with_context(|| format!("bench part {part:?}"))?;
        for t in &tables[before..] {
            eprintln!("\n{}", t.render());
        }
    }
    let mut out = format!(
        "Machine: {} cores, {:.1} GiB; fabric {} (this binary); {:.0} s in all.\n\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        total_memory() as f64 / (1u64 << 30) as f64,
        env!("CARGO_PKG_VERSION"),
        started.elapsed().as_secs_f64()
    );
    for t in &tables {
        out += &t.render();
        out += "\n";
    }
    Ok(out)
}

fn total_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
