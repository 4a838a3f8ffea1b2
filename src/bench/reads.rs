//! Part 1 (entity reads) and part 4 (memory): customers of about 1 KB as
//! JSON (a customer row, 5 orders, 2 tickets) in PostgreSQL, loaded into a
//! fabric by `postgres_cdc`'s initial snapshot and into Redis as prebuilt
//! JSON views; then GetEntity against Redis `GET` and PostgreSQL building
//! the view, at each concurrency, and BatchGetEntities of 100 ids against
//! `MGET` and `= ANY($1)`.

use super::clients::{self, FabricBatch, FabricGet, PgBatch, PgGet, RedisGet, RedisMget};
use super::harness::{self, Client, FabricChild, LoadResult};
use super::{Bench, Table, pg_exec};
use anyhow::{Context, bail};
use sqlx::Connection;
use std::time::{Duration, Instant};

const ENTITY: &str = "customer";
pub const BATCH: u64 = 100;

/// The customers, their orders (5 each) and tickets (2 each).
fn schema(n: u64) -> Vec<String> {
    vec![
        "DROP TABLE IF EXISTS customers, orders, tickets".into(),
        "CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL, \
         tier text NOT NULL, city text NOT NULL, country text NOT NULL, phone text NOT NULL, \
         created_at timestamptz NOT NULL, credit_limit numeric(12,2) NOT NULL)"
            .into(),
        "CREATE TABLE orders (id bigint PRIMARY KEY, customer_id bigint NOT NULL, \
         placed_at timestamptz NOT NULL, status text NOT NULL, sku text NOT NULL, \
         quantity int NOT NULL, amount numeric(12,2) NOT NULL, note text NOT NULL)"
            .into(),
        "CREATE TABLE tickets (id bigint PRIMARY KEY, customer_id bigint NOT NULL, \
         opened_at timestamptz NOT NULL, status text NOT NULL, priority text NOT NULL, \
         subject text NOT NULL)"
            .into(),
        format!(
            "INSERT INTO customers SELECT i, 'Customer ' || i, 'customer' || i || '@example.com', \
             (ARRAY['bronze','silver','gold','platinum'])[1 + i % 4], 'City ' || (i % 500), 'DE', \
             '+49 30 ' || lpad((i * 7919 % 10000000)::text, 7, '0'), \
             timestamptz '2020-01-01 00:00:00+00' + (i % 1000) * interval '1 day', (i % 100) * 100.00 \
             FROM generate_series(1, {n}) i"
        ),
        format!(
            "INSERT INTO orders SELECT o, (o - 1) / 5 + 1, \
             timestamptz '2024-01-01 00:00:00+00' + (o % 10000) * interval '1 hour', \
             (ARRAY['placed','paid','shipped','delivered','returned'])[1 + o % 5], \
             'SKU-' || lpad((o % 100000)::text, 6, '0'), 1 + o % 7, (o % 10000) / 100.0, \
             'deliver to the back door, ring twice' \
             FROM generate_series(1, {}) o",
            n * 5
        ),
        format!(
            "INSERT INTO tickets SELECT t, (t - 1) / 2 + 1, \
             timestamptz '2025-01-01 00:00:00+00' + (t % 5000) * interval '1 hour', \
             (ARRAY['open','pending','closed'])[1 + t % 3], (ARRAY['low','normal','high'])[1 + t % 3], \
             'Question about invoice ' || t \
             FROM generate_series(1, {}) t",
            n * 2
        ),
        "CREATE INDEX orders_customer ON orders (customer_id)".into(),
        "CREATE INDEX tickets_customer ON tickets (customer_id)".into(),
        "ALTER TABLE customers REPLICA IDENTITY FULL".into(),
        "ALTER TABLE orders REPLICA IDENTITY FULL".into(),
        "ALTER TABLE tickets REPLICA IDENTITY FULL".into(),
        "VACUUM ANALYZE customers".into(),
        "VACUUM ANALYZE orders".into(),
        "VACUUM ANALYZE tickets".into(),
    ]
}

/// The fabric's config for the customer entity over `tables` of one source.
fn config(b: &Bench, grpc: &str, admin: &str, slot: &str, with_source: bool) -> String {
    let source = if with_source {
        format!(
            "[[sources]]\nname = \"crm\"\nkind = \"postgres_cdc\"\nurl = \"{}\"\n\
             tables = [\"public.customers\", \"public.orders\", \"public.tickets\"]\n\
             slot = \"{slot}\"\npublication = \"{slot}\"\n",
            b.pg_url
        )
    } else {
        "[[sources]]\nname = \"crm\"\nkind = \"grpc_push\"\n".into()
    };
    format!(
        "[server]\ngrpc_addr = \"{grpc}\"\nadmin_addr = \"{admin}\"\n\n\
         [bus]\npartitions = 8\n\n\
         [snapshot]\ndir = \"{dir}/reads-snapshots-{slot}\"\n\n\
         [dlq]\nfile = \"{dir}/reads-dlq.jsonl\"\n\n\
         [log]\nlevel = \"warn\"\n\n\
         {source}\n\
         [[entities]]\nname = \"{ENTITY}\"\n{history}\n\
         [[entities.tables]]\nname = \"customer\"\nsource = \"crm\"\nfrom = \"public.customers\"\n\
         id_column = \"id\"\nprimary_key = [\"id\"]\n\n\
         [[entities.tables]]\nname = \"orders\"\nsource = \"crm\"\nfrom = \"public.orders\"\n\
         id_column = \"customer_id\"\nprimary_key = [\"id\"]\n\n\
         [[entities.tables]]\nname = \"tickets\"\nsource = \"crm\"\nfrom = \"public.tickets\"\n\
         id_column = \"customer_id\"\nprimary_key = [\"id\"]\n",
        dir = b.dir.display(),
        history = b.history_line(),
    )
}

/// Starts a fabric on the reads config; `with_source` false gives the same
/// process with nothing to load (its idle memory).
async fn start_fabric(b: &Bench, name: &str, with_source: bool) -> anyhow::Result<FabricChild> {
    let slot = b.slot(name);
    let _ = std::fs::remove_dir_all(b.dir.join(format!("reads-snapshots-{slot}")));
    FabricChild::launch(&b.dir, name, |grpc, admin| {
        config(b, grpc, admin, &slot, with_source)
    })
    .await
}

/// The bytes PostgreSQL stores for the values of every row of `table`
/// (`pg_column_size` of each column, no tuple headers).
async fn raw_bytes(conn: &mut sqlx::PgConnection, table: &str) -> anyhow::Result<u64> {
    let cols: Vec<(String,)> = sqlx::query_as(
        "SELECT column_name::text FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name = $1",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    let sum = cols
        .iter()
        .map(|(c,)| format!("coalesce(sum(pg_column_size(\"{c}\")), 0)"))
        .collect::<Vec<_>>()
        .join(" + ");
    let (v,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT ({sum})::bigint FROM {table}"
    )))
    .fetch_one(&mut *conn)
    .await?;
    Ok(v as u64)
}

/// Loads Redis with the view of every customer, as PostgreSQL builds it.
async fn load_redis(b: &Bench, n: u64) -> anyhow::Result<u64> {
    let mut pg = sqlx::PgConnection::connect(&b.pg_url).await?;
    let mut redis = b.redis().await?;
    redis::cmd("FLUSHALL").query_async::<()>(&mut redis).await?;
    let mut bytes = 0u64;
    let mut from = 1u64;
    while from <= n {
        let to = (from + 999).min(n);
        let ids: Vec<i64> = (from as i64..=to as i64).collect();
        let rows: Vec<(String,)> = sqlx::query_as(clients::PG_VIEWS)
            .bind(&ids)
            .fetch_all(&mut pg)
            .await?;
        let mut pipe = redis::pipe();
        for ((json,), id) in rows.iter().zip(from..) {
            bytes += json.len() as u64;
            pipe.cmd("SET")
                .arg(clients::redis_key(id))
                .arg(json)
                .ignore();
        }
        pipe.query_async::<()>(&mut redis).await?;
        from = to + 1;
    }
    Ok(bytes)
}

pub async fn run(b: &Bench, tables: &mut Vec<Table>) -> anyhow::Result<()> {
    let n = b.entities;
    eprintln!("reads: creating {n} customers (5 orders, 2 tickets each) in PostgreSQL");
    let mut pg = sqlx::PgConnection::connect(&b.pg_url).await?;
    for s in schema(n) {
        pg_exec(&mut pg, &s).await?;
    }
    let rows = n * 8;
    let mut raw = 0;
    for t in ["customers", "orders", "tickets"] {
        raw += raw_bytes(&mut pg, t).await?;
    }
    let json_bytes = load_redis(b, n).await?;
    eprintln!(
        "reads: redis loaded ({:.0} bytes per view)",
        json_bytes as f64 / n as f64
    );

    let idle = start_fabric(b, "idle", false).await?;
    let idle_rss = idle.memory().rss;
    idle.stop().await?;

    eprintln!("reads: fabric loading by initial snapshot");
    b.drop_slot(&b.slot("reads")).await?;
    let mut fabric = start_fabric(b, "reads", true).await?;
    let loaded = fabric
        .wait_metric(
            "fabric_changes_applied_total",
            "",
            rows as f64,
            Duration::from_secs(1800),
        )
        .await?;
    let load_secs = loaded.duration_since(fabric.started).as_secs_f64();
    // Let the first snapshot round and allocator settle before reading
    // memory: the fabric gives freed pages back once its appliers have been
    // quiet for a few seconds (src/memory.rs).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let loaded_rss = fabric.memory().rss;
    // Redis holds prebuilt views; the fabric encodes a version on its first
    // read and keeps the bytes. Reading every entity once first compares
    // the steady state of both (the first reads are timed on their own).
    let t0 = Instant::now();
    warm(&fabric, n).await?;
    let warm_secs = t0.elapsed().as_secs_f64();

    let mut t = Table::new(
        "Entity reads: GetEntity vs Redis GET vs PostgreSQL (one query)",
        &[
            "concurrency",
            "system",
            "req/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "vs Redis",
            "vs PostgreSQL",
        ],
    );
    for &c in &b.concurrency {
        let conns = (c / 16).max(1);
        let f = run_one(
            b,
            "fabric",
            fabric_clients(&fabric, c, conns, None, n).await?,
        )
        .await?;
        let r = run_one(b, "redis", redis_clients(b, c, conns, None).await?).await?;
        let p = run_one(b, "postgres", pg_clients(b, c, None).await?).await?;
        for (name, res) in [
            ("fabric GetEntity", &f),
            ("Redis GET", &r),
            ("PostgreSQL", &p),
        ] {
            t.row(vec![
                c.to_string(),
                name.into(),
                format!("{:.0}", res.per_second()),
                format!("{:.3}", res.ms(0.5)),
                format!("{:.3}", res.ms(0.99)),
                format!("{:.3}", res.ms(0.999)),
                format!("{:.2}", res.per_second() / r.per_second()),
                format!("{:.2}", res.per_second() / p.per_second()),
            ]);
        }
    }
    tables.push(t);

    let mut t = Table::new(
        &format!(
            "Batch reads of {BATCH} ids: BatchGetEntities vs Redis MGET vs PostgreSQL (= ANY)"
        ),
        &[
            "concurrency",
            "system",
            "batches/s",
            "entities/s",
            "p50 ms",
            "p99 ms",
            "vs Redis",
            "vs PostgreSQL",
        ],
    );
    for &c in b.concurrency.iter().filter(|c| **c <= 8) {
        let f = run_one(
            b,
            "fabric batch",
            fabric_clients(&fabric, c, 1, Some(BATCH), n).await?,
        )
        .await?;
        let r = run_one(b, "redis mget", redis_clients(b, c, 1, Some(BATCH)).await?).await?;
        let p = run_one(b, "postgres batch", pg_clients(b, c, Some(BATCH)).await?).await?;
        for (name, res) in [
            ("fabric BatchGet", &f),
            ("Redis MGET", &r),
            ("PostgreSQL", &p),
        ] {
            t.row(vec![
                c.to_string(),
                name.into(),
                format!("{:.0}", res.per_second()),
                format!("{:.0}", res.items_per_second()),
                format!("{:.3}", res.ms(0.5)),
                format!("{:.3}", res.ms(0.99)),
                format!("{:.2}", res.items_per_second() / r.items_per_second()),
                format!("{:.2}", res.items_per_second() / p.items_per_second()),
            ]);
        }
    }
    tables.push(t);
    let read_rss = fabric.memory().rss;

    let mut t = Table::new(
        "Memory of the fabric holding the read set (resident, against the rows' raw bytes)",
        &["measure", "value"],
    );
    // The same data after a restart: restored from the snapshot the stop
    // wrote, without what the load left behind (change events, snapshot
    // reader batches, the source's buffers) that the allocator still holds.
    fabric.stop().await?;
    let mut restarted = restart_fabric(b, "reads").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restored_rss = restarted.memory().rss;
    let restored_entities = restarted.metric("fabric_entities", ENTITY).await? as u64;
    restarted.stop().await?;
    if restored_entities != n {
        bail!("the restarted fabric restored {restored_entities} of {n} entities");
    }
    let held = loaded_rss.saturating_sub(idle_rss);
    let with_cache = read_rss.saturating_sub(idle_rss);
    let restored = restored_rss.saturating_sub(idle_rss);
    for (k, v) in [
        ("entities / rows".to_string(), format!("{n} / {rows}")),
        (
            "raw row bytes (pg_column_size of every value)".into(),
            mb(raw),
        ),
        ("JSON view bytes (Redis values)".into(), mb(json_bytes)),
        (
            "fabric resident, idle (same config, no rows)".into(),
            mb(idle_rss),
        ),
        ("fabric resident after load".into(), mb(loaded_rss)),
        (
            "held (after load − idle): per entity / per row".into(),
            format!("{} B / {} B", held / n.max(1), held / rows.max(1)),
        ),
        (
            "held ÷ raw row bytes".into(),
            format!("{:.2}", held as f64 / raw.max(1) as f64),
        ),
        (
            "held after the read runs (encoded responses cached) ÷ raw".into(),
            format!("{:.2}", with_cache as f64 / raw.max(1) as f64),
        ),
        (
            "held after a restart (restored from its snapshot): per row, ÷ raw".into(),
            format!(
                "{} B, {:.2}",
                restored / rows.max(1),
                restored as f64 / raw.max(1) as f64
            ),
        ),
        (
            "first read of every entity (BatchGet of 1,000, encodes each)".into(),
            format!("{warm_secs:.2} s, {:.0} entities/s", n as f64 / warm_secs),
        ),
        (
            "initial snapshot load (from process start)".into(),
            format!("{load_secs:.1} s, {:.0} rows/s", rows as f64 / load_secs),
        ),
    ] {
        t.row(vec![k, v]);
    }
    tables.push(t);
    b.drop_slot(&b.slot("reads")).await?;
    Ok(())
}

/// Starts the reads fabric again on its snapshots (kept, unlike
/// [`start_fabric`]); ready once restored.
async fn restart_fabric(b: &Bench, name: &str) -> anyhow::Result<FabricChild> {
    let slot = b.slot(name);
    FabricChild::launch(&b.dir, &format!("{name}-restart"), |grpc, admin| {
        config(b, grpc, admin, &slot, true)
    })
    .await
}

/// Reads every entity once, in batches of 1,000.
async fn warm(f: &FabricChild, n: u64) -> anyhow::Result<()> {
    let channel = clients::fabric_channels(&f.grpc, 1).await?.remove(0);
    let mut c = FabricBatch {
        grpc: tonic::client::Grpc::new(channel),
        entity_type: ENTITY.to_string(),
        size: 1000.min(n),
        ids: n,
    };
    let mut id = 1;
    while id <= n {
        let got = c.call(id).await?;
        anyhow::ensure!(got > 0, "no entity among ids {id}.. of {n}");
        id += 1000;
    }
    Ok(())
}

pub fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

async fn run_one(
    b: &Bench,
    what: &str,
    clients: Vec<Box<dyn Client>>,
) -> anyhow::Result<LoadResult> {
    let c = clients.len();
    let t0 = Instant::now();
    let r = harness::closed_loop(clients, b.entities, b.warmup, b.duration)
        .await
        .with_context(|| format!("{what} at concurrency {c}"))?;
    eprintln!(
        "reads: {what:>16} c={c:<4} {:>9.0}/s p99 {:.3} ms ({:.1}s)",
        r.per_second(),
        r.ms(0.99),
        t0.elapsed().as_secs_f64()
    );
    Ok(r)
}

async fn fabric_clients(
    f: &FabricChild,
    c: usize,
    conns: usize,
    batch: Option<u64>,
    ids: u64,
) -> anyhow::Result<Vec<Box<dyn Client>>> {
    let channels = clients::fabric_channels(&f.grpc, conns).await?;
    Ok((0..c)
        .map(|i| {
            let grpc = tonic::client::Grpc::new(channels[i % conns].clone());
            let entity_type = ENTITY.to_string();
            match batch {
                None => Box::new(FabricGet { grpc, entity_type }) as Box<dyn Client>,
                Some(size) => Box::new(FabricBatch {
                    grpc,
                    entity_type,
                    size,
                    ids,
                }),
            }
        })
        .collect())
}

async fn redis_clients(
    b: &Bench,
    c: usize,
    conns: usize,
    batch: Option<u64>,
) -> anyhow::Result<Vec<Box<dyn Client>>> {
    let mut connections = Vec::with_capacity(conns);
    for _ in 0..conns {
        connections.push(b.redis().await?);
    }
    Ok((0..c)
        .map(|i| {
            let conn = connections[i % conns].clone();
            match batch {
                None => Box::new(RedisGet { conn }) as Box<dyn Client>,
                Some(size) => Box::new(RedisMget {
                    conn,
                    size,
                    ids: b.entities,
                }),
            }
        })
        .collect())
}

async fn pg_clients(
    b: &Bench,
    c: usize,
    batch: Option<u64>,
) -> anyhow::Result<Vec<Box<dyn Client>>> {
    let mut out: Vec<Box<dyn Client>> = Vec::with_capacity(c);
    for _ in 0..c {
        let conn = sqlx::PgConnection::connect(&b.pg_url)
            .await
            .context("cannot connect to PostgreSQL (is max_connections high enough?)")?;
        out.push(match batch {
            None => Box::new(PgGet { conn }),
            Some(size) => Box::new(PgBatch {
                conn,
                size,
                ids: b.entities,
            }),
        });
    }
    Ok(out)
}
