//! Part 3: PostgreSQL change capture, the fabric's `postgres_cdc` side by
//! side with Debezium's PostgreSQL connector (embedded, `--debezium`), on
//! the same server, table and workload, one after the other:
//!
//! 1. initial snapshot of `cdc_orders` (rows/s from process start until the
//!    last row is applied to a micro-DB / handed to Debezium's handler);
//! 2. catch-up: as many row updates as the table has rows (transactions of
//!    1,000), written while both are stopped; events/s from process start
//!    until the last is applied / handed over;
//! 3. freshness: single-row transactions at 200/s, each setting `ts_ns` to
//!    the wall clock just before its commit; the latency is the wall clock
//!    when the change arrives (the fabric: through `WatchEntities`, which
//!    sends a version once readers of GetEntity see it; Debezium: when its
//!    handler gets the batch) minus `ts_ns`;
//! 4. the highest resident memory of each process in each phase.

use super::debezium::{self, Peer, Target};
use super::harness::{self, FabricChild, now_ns};
use super::{Bench, Table, pg_exec};
use crate::proto;
use crate::proto::entity_service_client::EntityServiceClient;
use anyhow::bail;
use hdrhistogram::Histogram;
use sqlx::Connection;
use std::time::{Duration, Instant};

const ROWS_PER_ENTITY: u64 = 10;
const TXNS_PER_SECOND: u64 = 200;

fn config(b: &Bench, grpc: &str, admin: &str) -> String {
    format!(
        "[server]\ngrpc_addr = \"{grpc}\"\nadmin_addr = \"{admin}\"\n\n\
         [bus]\npartitions = 8\n\n\
         [snapshot]\ndir = \"{dir}/cdc-snapshots\"\n\n\
         [dlq]\nfile = \"{dir}/cdc-dlq.jsonl\"\n\n\
         [log]\nlevel = \"warn\"\n\n\
         [[sources]]\nname = \"pg\"\nkind = \"postgres_cdc\"\nurl = \"{url}\"\n\
         tables = [\"public.cdc_orders\"]\nslot = \"{slot}\"\npublication = \"{slot}\"\n\n\
         [[entities]]\nname = \"account\"\n{history}\n\
         [[entities.tables]]\nname = \"orders\"\nsource = \"pg\"\nfrom = \"public.cdc_orders\"\n\
         id_column = \"customer_id\"\nprimary_key = [\"id\"]\n",
        dir = b.dir.display(),
        history = b.history_line(),
        url = b.pg_url,
        slot = b.slot("cdc"),
    )
}

/// One phase's figures for one system.
#[derive(Default, Clone)]
struct Phase {
    seconds: Option<f64>,
    peak: Option<u64>,
}

/// Starts the fabric and times it until it has applied `rows` changes.
async fn fabric_until_applied(
    b: &Bench,
    name: &str,
    rows: u64,
) -> anyhow::Result<(FabricChild, Phase)> {
    let mut f = FabricChild::launch(&b.dir, name, |grpc, admin| config(b, grpc, admin)).await?;
    let done = f
        .wait_metric(
            "fabric_changes_applied_total",
            "",
            rows as f64,
            Duration::from_secs(3600),
        )
        .await?;
    let phase = Phase {
        seconds: Some(done.duration_since(f.started).as_secs_f64()),
        peak: Some(f.memory().peak),
    };
    Ok((f, phase))
}

/// Runs Debezium (`snapshot.mode` `mode`) until its handler got `rows` records.
async fn debezium_until_handed(
    b: &Bench,
    python: &std::path::Path,
    target: &Target<'_>,
    mode: &str,
    rows: u64,
) -> anyhow::Result<Phase> {
    let extra = ["--snapshot-mode", mode, "--count-until", &rows.to_string()].map(String::from);
    let log = b.dir.join(format!("debezium-{mode}.log"));
    let mut peer = Peer::start(python, target, &extra, &log)?;
    let (_, at) = peer.done(Duration::from_secs(3600)).await?;
    let seconds = at.duration_since(peer.started).as_secs_f64();
    Ok(Phase {
        seconds: Some(seconds),
        peak: Some(peer.stop().await?),
    })
}

/// Writes single-row transactions at 200/s for `run`; how many.
async fn write_fresh(pg_url: String, rows: u64, run: Duration) -> anyhow::Result<u64> {
    harness::write_timestamps(&pg_url, "cdc_orders", rows, TXNS_PER_SECOND, run).await
}

/// The newest `ts_ns` of a watched change's entity, if written since `from`.
fn written_at(change: &proto::EntityChange, from: i64) -> Option<i64> {
    change
        .entity
        .iter()
        .flat_map(|e| &e.tables)
        .flat_map(|t| &t.rows)
        .filter_map(
            |r| match r.columns.get("ts_ns").and_then(|v| v.kind.as_ref()) {
                Some(proto::value::Kind::Int(ts)) => Some(*ts),
                _ => None,
            },
        )
        .max()
        .filter(|ts| *ts >= from)
}

/// The fabric's freshness: a whole-type watch while the writer runs.
async fn fabric_freshness(b: &Bench, f: &FabricChild, rows: u64) -> anyhow::Result<Histogram<u64>> {
    let mut client = EntityServiceClient::connect(f.grpc.clone()).await?;
    let mut stream = client
        .watch_entities(proto::WatchEntitiesRequest {
            r#type: "account".into(),
            id: String::new(),
            from_version: 0,
            view: String::new(),
        })
        .await?
        .into_inner();
    let from = now_ns();
    let mut writer = tokio::spawn(write_fresh(b.pg_url.clone(), rows, b.freshness));
    let mut lat = Vec::new();
    let mut record = |change: Option<proto::EntityChange>| -> anyhow::Result<()> {
        let arrived = now_ns();
        let Some(change) = change else {
            bail!("the fabric ended the watch");
        };
        if let Some(ts) = written_at(&change, from) {
            lat.push((arrived - ts).max(0) as u64);
        }
        Ok(())
    };
    let written = loop {
        tokio::select! {
            w = &mut writer => break w??,
            m = stream.message() => record(m?)?,
        }
    };
    // The last changes still on their way.
    let until = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(m) = tokio::time::timeout_at(until, stream.message()).await {
        record(m?)?;
    }
    if (lat.len() as u64) < written * 9 / 10 {
        bail!("the fabric's watch saw {} of {written} changes", lat.len());
    }
    Ok(harness::summarize(&lat))
}

/// Debezium's freshness at `poll_ms` (None: its default).
async fn debezium_freshness(
    b: &Bench,
    python: &std::path::Path,
    target: &Target<'_>,
    rows: u64,
    poll_ms: Option<u64>,
) -> anyhow::Result<(Histogram<u64>, u64)> {
    let mut extra = vec![
        "--snapshot-mode".to_string(),
        "no_data".into(),
        "--latency-column".into(),
        "ts_ns".into(),
    ];
    if let Some(p) = poll_ms {
        extra.extend(["--poll-interval-ms".into(), p.to_string()]);
    }
    let name = poll_ms.map_or("default".into(), |p| p.to_string());
    let mut peer = Peer::start(
        python,
        target,
        &extra,
        &b.dir.join(format!("debezium-fresh-{name}.log")),
    )?;
    wait_slot_active(b, target.slot).await?;
    // Whatever the previous phases left in the slot goes by first.
    tokio::time::sleep(Duration::from_secs(3)).await;
    peer.drain();
    let from = now_ns();
    let written = write_fresh(b.pg_url.clone(), rows, b.freshness).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lat: Vec<u64> = peer
        .drain()
        .iter()
        .filter(|v| v["ts"].as_i64().is_some_and(|ts| ts >= from))
        .filter_map(|v| v["lat_ns"].as_i64().map(|l| l.max(0) as u64))
        .collect();
    let peak = peer.stop().await?;
    if (lat.len() as u64) < written * 9 / 10 {
        bail!(
            "Debezium (poll {name}) handed over {} of {written} changes",
            lat.len()
        );
    }
    Ok((harness::summarize(&lat), peak))
}

async fn wait_slot_active(b: &Bench, slot: &str) -> anyhow::Result<()> {
    let mut pg = sqlx::PgConnection::connect(&b.pg_url).await?;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let active: Option<(bool,)> =
            sqlx::query_as("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
                .bind(slot)
                .fetch_optional(&mut pg)
                .await?;
        if active.is_some_and(|(a,)| a) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("slot {slot} not streaming within 180s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run(b: &Bench, tables: &mut Vec<Table>) -> anyhow::Result<()> {
    let rows = b.cdc_rows;
    let (slot, dbz_slot) = (b.slot("cdc"), b.slot("debezium"));
    // The fabric's and Debezium's slots share one publication.
    let publication = slot.as_str();
    let python = if b.debezium {
        Some(debezium::setup().await?)
    } else {
        None
    };
    eprintln!("cdc: creating cdc_orders with {rows} rows");
    let mut pg = sqlx::PgConnection::connect(&b.pg_url).await?;
    for s in [
        "DROP TABLE IF EXISTS cdc_orders".to_string(),
        "CREATE TABLE cdc_orders (id bigint PRIMARY KEY, customer_id bigint NOT NULL, \
         amount numeric(12,2) NOT NULL, status text NOT NULL, note text NOT NULL, ts_ns bigint NOT NULL)"
            .into(),
        format!(
            "INSERT INTO cdc_orders SELECT i, (i - 1) / {ROWS_PER_ENTITY} + 1, (i % 10000) / 100.0, \
             (ARRAY['placed','paid','shipped'])[1 + i % 3], 'order note ' || i, 0 \
             FROM generate_series(1, {rows}) i"
        ),
        "ALTER TABLE cdc_orders REPLICA IDENTITY FULL".into(),
        format!("DROP PUBLICATION IF EXISTS {publication}"),
        format!("CREATE PUBLICATION {publication} FOR TABLE cdc_orders"),
        "VACUUM ANALYZE cdc_orders".into(),
    ] {
        pg_exec(&mut pg, &s).await?;
    }
    b.drop_slot(&slot).await?;
    b.drop_slot(&dbz_slot).await?;
    let _ = std::fs::remove_dir_all(b.dir.join("cdc-snapshots"));
    let offsets = b.dir.join("debezium-offsets.dat");
    let _ = std::fs::remove_file(&offsets);
    let pg_url = url::Url::parse(&b.pg_url)?;
    let target = Target {
        host: pg_url.host_str().unwrap_or("127.0.0.1"),
        port: pg_url.port().unwrap_or(5432),
        user: if pg_url.username().is_empty() {
            "postgres"
        } else {
            pg_url.username()
        },
        database: &b.db,
        slot: &dbz_slot,
        publication,
        tables: "public.cdc_orders",
        offsets: &offsets,
    };

    // 1. Initial snapshot.
    eprintln!("cdc: fabric initial snapshot");
    let (f, fab_snap) = fabric_until_applied(b, "cdc-snapshot", rows).await?;
    f.stop().await?;
    let mut dbz_snap = Phase::default();
    if let Some(py) = &python {
        eprintln!("cdc: Debezium initial snapshot");
        dbz_snap = debezium_until_handed(b, py, &target, "initial", rows).await?;
    }

    // 2. Catch-up.
    eprintln!("cdc: writing {rows} updates while both are stopped");
    let mut from = 1;
    while from <= rows {
        let to = (from + 999).min(rows);
        sqlx::query("UPDATE cdc_orders SET amount = amount + 1 WHERE id BETWEEN $1 AND $2")
            .bind(from as i64)
            .bind(to as i64)
            .execute(&mut pg)
            .await?;
        from = to + 1;
    }
    eprintln!("cdc: fabric catch-up");
    let (f, fab_catch) = fabric_until_applied(b, "cdc-catchup", rows).await?;
    let mut dbz_catch = Phase::default();

    // 3. Freshness (the fabric first, still running from its catch-up).
    eprintln!("cdc: fabric freshness");
    let fab_fresh = fabric_freshness(b, &f, rows).await?;
    let fab_fresh_peak = f.memory().peak;
    f.stop().await?;
    let mut dbz_fresh = Vec::new();
    if let Some(py) = &python {
        eprintln!("cdc: Debezium catch-up");
        dbz_catch = debezium_until_handed(b, py, &target, "no_data", rows).await?;
        for poll in [Some(1), None] {
            eprintln!("cdc: Debezium freshness (poll {poll:?} ms)");
            dbz_fresh.push((poll, debezium_freshness(b, py, &target, rows, poll).await?));
        }
    }
    b.drop_slot(&slot).await?;
    b.drop_slot(&dbz_slot).await?;

    let rate = |p: &Phase| p.seconds.map(|s| rows as f64 / s);
    let cell = |v: Option<f64>| v.map_or("not run (--debezium)".to_string(), |v| format!("{v:.0}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}", a / b),
        _ => String::new(),
    };
    let mut t = Table::new(
        &format!(
            "Change capture from PostgreSQL: fabric vs Debezium 3.6 embedded ({rows} rows, {} entities)",
            rows / ROWS_PER_ENTITY
        ),
        &["measure", "fabric", "Debezium", "fabric ÷ Debezium"],
    );
    for (what, fab, dbz) in [
        (
            "initial snapshot, rows/s (from process start)",
            &fab_snap,
            &dbz_snap,
        ),
        (
            "catch-up, events/s (from process start)",
            &fab_catch,
            &dbz_catch,
        ),
    ] {
        t.row(vec![
            what.into(),
            cell(rate(fab)),
            cell(rate(dbz)),
            ratio(rate(fab), rate(dbz)),
        ]);
    }
    let mb = |v: Option<u64>| v.map(|v| v as f64 / 1e6);
    for (what, fab, dbz) in [
        ("peak resident MB, snapshot", fab_snap.peak, dbz_snap.peak),
        ("peak resident MB, catch-up", fab_catch.peak, dbz_catch.peak),
    ] {
        t.row(vec![
            what.into(),
            cell(mb(fab)),
            cell(mb(dbz)),
            ratio(mb(fab), mb(dbz)),
        ]);
    }
    tables.push(t);

    let mut t = Table::new(
        &format!(
            "Freshness at {TXNS_PER_SECOND} single-row transactions/s: commit to change visible (ms)"
        ),
        &["system", "changes", "p50", "p99", "max", "peak resident MB"],
    );
    let ms = |h: &Histogram<u64>, q: f64| format!("{:.2}", h.value_at_quantile(q) as f64 / 1e6);
    t.row(vec![
        "fabric (WatchEntities)".into(),
        fab_fresh.len().to_string(),
        ms(&fab_fresh, 0.5),
        ms(&fab_fresh, 0.99),
        format!("{:.2}", fab_fresh.max() as f64 / 1e6),
        format!("{:.0}", fab_fresh_peak as f64 / 1e6),
    ]);
    for (poll, (h, peak)) in &dbz_fresh {
        t.row(vec![
            format!(
                "Debezium, poll.interval.ms={}",
                poll.map_or("500 (default)".into(), |p| p.to_string())
            ),
            h.len().to_string(),
            ms(h, 0.5),
            ms(h, 0.99),
            format!("{:.2}", h.max() as f64 / 1e6),
            format!("{:.0}", *peak as f64 / 1e6),
        ]);
    }
    tables.push(t);
    Ok(())
}
