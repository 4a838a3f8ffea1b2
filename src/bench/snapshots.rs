//! Part 5: snapshot write and restore, through the code a snapshot round
//! and start-up run (`store::snapshot::write` per partition, then
//! `app::snapshots::restore` of the directory), in this process: entities
//! of a customer row and two order rows each.

use super::{Bench, Table};
use crate::event::{EntityKey, Position, Row, Value};
use crate::store::keystore::KeyStore;
use crate::store::snapshot::{self, SnapshotMeta};
use crate::store::{Entity, Store, StoredRow, TableRows};
use std::time::Instant;

const PARTITIONS: u32 = 8;

fn row(cols: &[(&str, Value)]) -> StoredRow {
    let row: Row = cols
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    StoredRow::pack(&row)
}

/// Customer `id` with two orders.
pub fn entity(id: u64) -> Entity {
    let i = id as i64;
    let mut e = Entity::new(EntityKey::new("customer", id.to_string()));
    e.version = 1;
    e.updated_micros = 1_700_000_000_000_000 + i;
    e.positions.insert("crm".into(), Position::Seq(id));
    let customer = row(&[
        ("id", Value::Int(i)),
        ("name", Value::Text(format!("Customer {id}"))),
        ("email", Value::Text(format!("customer{id}@example.com"))),
        ("tier", Value::Text("gold".into())),
        ("created_at", Value::Timestamp(1_600_000_000_000_000 + i)),
    ]);
    e.tables.insert(
        "customer".into(),
        TableRows::from_iter([(vec![Value::Int(i)].into(), customer)]).into(),
    );
    let orders = (0..2)
        .map(|k| {
            let oid = i * 2 + k;
            (
                vec![Value::Int(oid)].into(),
                row(&[
                    ("id", Value::Int(oid)),
                    ("customer_id", Value::Int(i)),
                    (
                        "amount",
                        Value::Decimal(format!("{}.{:02}", oid % 1000, oid % 100)),
                    ),
                    ("status", Value::Text("shipped".into())),
                ]),
            )
        })
        .collect::<TableRows>();
    e.tables.insert("orders".into(), orders.into());
    e
}

/// Writes `n` entities as one snapshot round and restores them, sealed
/// per entity when `sealed` (a keystore made in the directory); returns
/// file bytes, write seconds and restore seconds.
fn measure(dir: &std::path::Path, n: u64, sealed: bool) -> anyhow::Result<[f64; 3]> {
    let _ = std::fs::remove_dir_all(dir);
    let keys = if sealed {
        Some(KeyStore::open(
            &dir.join("keys"),
            b"benchmark master key",
            PARTITIONS,
        )?)
    } else {
        None
    };
    let store = Store::new(PARTITIONS, &["customer"], 16);
    for id in 1..=n {
        store.restore(entity(id));
    }
    let t0 = Instant::now();
    let mut bytes = 0;
    for p in 0..PARTITIONS {
        let meta = SnapshotMeta {
            partition: p,
            partitions: PARTITIONS,
            round: 1,
            bus_offset: 0,
            checkpoints: Default::default(),
            created_micros: 0,
            keystore: None,
            dictionary: Vec::new(),
            key_generation: 0,
        };
        bytes += snapshot::write(dir, &meta, &store.shard_entities(p), &[], 0, keys.as_ref())?.1;
    }
    let write = t0.elapsed().as_secs_f64();
    drop(store);
    let restored = Store::new(PARTITIONS, &["customer"], 16);
    let t0 = Instant::now();
    let r = crate::app::snapshots::restore(dir, &restored, PARTITIONS, keys.as_ref())?;
    let read = t0.elapsed().as_secs_f64();
    anyhow::ensure!(
        r.entities as u64 == n && restored.entity_count("customer") == n,
        "restored {} of {n} entities",
        r.entities
    );
    anyhow::ensure!(
        restored
            .get(&EntityKey::new("customer", n.to_string()))
            .as_deref()
            == Some(&entity(n)),
        "a restored entity differs from the one written"
    );
    let _ = std::fs::remove_dir_all(dir);
    Ok([bytes as f64, write, read])
}

/// Resident memory a keystore holding keys for `n` entities adds to this
/// process (keys made as a snapshot round makes them), per entity.
fn keystore_bytes_per_entity(dir: &std::path::Path, n: u64) -> anyhow::Result<f64> {
    let _ = std::fs::remove_dir_all(dir);
    let keys: Vec<Vec<EntityKey>> = {
        let mut by_part: Vec<Vec<EntityKey>> = (0..PARTITIONS).map(|_| Vec::new()).collect();
        for id in 1..=n {
            let k = EntityKey::new("customer", id.to_string());
            by_part[k.partition(PARTITIONS) as usize].push(k);
        }
        by_part
    };
    let before = super::harness::memory_of(std::process::id()).rss;
    let ks = KeyStore::open(dir, b"benchmark master key", PARTITIONS)?;
    for (p, part) in keys.iter().enumerate() {
        ks.prepare(p as u32, part.iter(), 0, 1)?;
    }
    let after = super::harness::memory_of(std::process::id()).rss;
    anyhow::ensure!(ks.len() as u64 == n, "{} keys for {n} entities", ks.len());
    drop(ks);
    let _ = std::fs::remove_dir_all(dir);
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

/// The environment variable that makes `fabric bench` measure one lineage
/// case (`plain:N` or `kept:N`) in its own process and print it.
pub const LINEAGE_PROBE: &str = "FABRIC_BENCH_LINEAGE_PROBE";

/// Runs the measurement [`LINEAGE_PROBE`] names; its output is the number.
pub fn lineage_probe(probe: &str) -> anyhow::Result<String> {
    let (kind, n) = probe
        .split_once(':')
        .ok_or_else(|| anyhow::anyhow!("{LINEAGE_PROBE}={probe:?}: plain:N or kept:N"))?;
    let n: u64 = n.parse()?;
    Ok(format!(
        "{:.1}",
        match kind {
            "links" | "no-links" => linked_bytes_per_invoice(n, kind == "links")?,
            _ => applied_bytes_per_entity(n, kind == "kept"),
        }
    ))
}

/// Resident memory per invoice of `n` invoices with two payments each
/// (`payments` find their customer through `id_via` their invoice), in
/// micro-DBs: routed through the router, which keeps its link index (link
/// rows, linked rows with their images and holders, positions), or, with
/// `routed = false`, the same change sets built by hand and applied with no
/// router: the difference is the index.
fn linked_bytes_per_invoice(n: u64, routed: bool) -> anyhow::Result<f64> {
    use crate::event::{EntityChangeSet, Op, RowChange, SourceTxn, TableChange};
    const CONFIG: &str = r#"
[[sources]]
name = "billing"
kind = "grpc_push"

[[entities]]
name = "customer"
  [[entities.tables]]
  name = "invoices"
  source = "billing"
  from = "invoices"
  id_column = "customer_id"
  primary_key = ["id"]
  [[entities.tables]]
  name = "payments"
  source = "billing"
  from = "payments"
  id_via = { table = "invoices", column = "invoice_id" }
  primary_key = ["id"]
"#;
    let config = crate::config::Config::from_toml(std::path::Path::new("bench.toml"), CONFIG)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = Store::new(PARTITIONS, &["customer"], 16);
    let mut router =
        crate::router::Router::new(&config, PARTITIONS, &crate::event::Checkpoints::default());
    let rows = |i: i64| -> Vec<(&'static str, Row)> {
        let customer = i / 4 + 1;
        let r = |cols: Vec<(&str, Value)>| -> Row {
            cols.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
        };
        let invoice = r(vec![
            ("id", Value::Int(i)),
            ("customer_id", Value::Int(customer)),
            ("amount", Value::Text(format!("{}.99", i % 500))),
            ("status", Value::Text("open".into())),
            ("issued_at", Value::Timestamp(1_600_000_000_000_000 + i)),
        ]);
        let payment = |k: i64| {
            r(vec![
                ("id", Value::Int(i * 2 + k)),
                ("invoice_id", Value::Int(i)),
                ("amount", Value::Text(format!("{}.50", i % 300))),
                ("method", Value::Text("card".into())),
            ])
        };
        vec![
            ("invoices", invoice),
            ("payments", payment(0)),
            ("payments", payment(1)),
        ]
    };
    let before = super::harness::memory_of(std::process::id()).rss;
    for i in 1..=n as i64 {
        let position = Position::Seq(i as u64);
        if routed {
            let changes = rows(i)
                .into_iter()
                .map(|(table, row)| RowChange {
                    table: table.into(),
                    op: Op::Insert,
                    before: None,
                    after: Some(row),
                })
                .collect();
            let out = router.route(SourceTxn {
                source: "billing".into(),
                position,
                commit_micros: 1_700_000_000_000_000,
                changes,
            });
            for (_, record) in out.records {
                if let crate::event::BusRecord::Changes(set) = record {
                    store.apply(&set);
                }
            }
        } else {
            let changes = rows(i)
                .into_iter()
                .map(|(table, row)| TableChange {
                    table: table.into(),
                    op: Op::Insert,
                    pk: vec![row["id"].clone()],
                    row: Some(row),
                })
                .collect();
            store.apply(&EntityChangeSet {
                key: EntityKey::new("customer", (i / 4 + 1).to_string()),
                source: "billing".into(),
                position,
                commit_micros: 1_700_000_000_000_000,
                changes,
                delete_entity: false,
            });
        }
    }
    crate::memory::collect_now();
    let after = super::harness::memory_of(std::process::id()).rss;
    drop(router);
    drop(store);
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

/// Resident memory per entity of `n` entities applied as change sets (a
/// customer row and two order rows each), with the row lineage of
/// `lineage = true` kept or not.
fn applied_bytes_per_entity(n: u64, lineage: bool) -> f64 {
    use crate::event::{EntityChangeSet, Op, TableChange};
    let store = Store::new(PARTITIONS, &["customer"], 16);
    let store = if lineage {
        store.with_lineage(["customer"])
    } else {
        store
    };
    let before = super::harness::memory_of(std::process::id()).rss;
    for id in 1..=n {
        let e = entity(id);
        let changes = e
            .tables
            .iter()
            .flat_map(|(t, rows)| {
                rows.iter().map(move |(pk, row)| TableChange {
                    table: t.clone(),
                    op: Op::Insert,
                    pk: pk.to_vec(),
                    row: Some(row.to_row()),
                })
            })
            .collect();
        store.apply(&EntityChangeSet {
            key: e.key.clone(),
            source: "crm".into(),
            position: Position::Lsn(0x16B_3748 + id),
            commit_micros: 1_700_000_000_000_000,
            changes,
            delete_entity: false,
        });
    }
    crate::memory::collect_now();
    let after = super::harness::memory_of(std::process::id()).rss;
    drop(store);
    after.saturating_sub(before) as f64 / n as f64
}

pub async fn run(b: &Bench, tables: &mut Vec<Table>) -> anyhow::Result<()> {
    let n = b.snapshot_entities;
    let dir = b.dir.join("snapshot-part");
    eprintln!("snapshots: {n} entities, plain then sealed per entity");
    let (plain, sealed, key_bytes) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        Ok((
            measure(&dir, n, false)?,
            measure(&dir, n, true)?,
            keystore_bytes_per_entity(&dir, n)?,
        ))
    })
    .await??;
    let mut t = Table::new(
        &format!("Snapshots of {n} entities ({PARTITIONS} partition files, lz4, fsync)"),
        &[
            "step",
            "seconds",
            "entities/s",
            "MB/s (file bytes)",
            "sealed / plain",
        ],
    );
    for (name, [bytes, write, read], base) in [
        ("", plain, None),
        (" [snapshot.encryption]", sealed, Some(plain)),
    ] {
        for (step, secs, i) in [
            ("write", write, 1),
            ("restore (read, verify, load)", read, 2),
        ] {
            t.row(vec![
                format!("{step}{name}"),
                format!("{secs:.2}"),
                format!("{:.0}", n as f64 / secs),
                format!("{:.0}", bytes / 1e6 / secs),
                base.map_or(String::new(), |b| format!("{:.2}x time", secs / b[i])),
            ]);
        }
        t.row(vec![
            format!("file bytes{name}"),
            super::reads::mb(bytes as u64),
            String::new(),
            String::new(),
            base.map_or(String::new(), |b| format!("{:.2}x bytes", bytes / b[0])),
        ]);
    }
    t.row(vec![
        "keystore memory (resident growth), per entity".into(),
        format!("{key_bytes:.0} B"),
        String::new(),
        String::new(),
        String::new(),
    ]);
    tables.push(t);
    // Row lineage: the memory it adds, the same entities applied both ways,
    // each in a process of its own (in this one, what the parts before freed
    // would be reused and hide the growth).
    let m = n.min(200_000);
    let probe = |kept: &'static str| {
        let exe = std::env::current_exe();
        async move {
            let out = tokio::process::Command::new(exe?)
                .arg("bench")
                .env(LINEAGE_PROBE, format!("{kept}:{m}"))
                .output()
                .await?;
            anyhow::ensure!(out.status.success(), "the lineage probe failed");
            Ok::<f64, anyhow::Error>(String::from_utf8_lossy(&out.stdout).trim().parse()?)
        }
    };
    let (plain, kept) = (probe("plain").await?, probe("kept").await?);
    let mut t = Table::new(
        &format!("Row lineage: resident memory of {m} entities of 3 rows, applied as changes"),
        &["lineage", "bytes per entity", "with / without"],
    );
    t.row(vec![
        "not kept".into(),
        format!("{plain:.0}"),
        String::new(),
    ]);
    t.row(vec![
        "kept (`lineage = true`)".into(),
        format!("{kept:.0}"),
        format!("{:.2}x", kept / plain.max(1.0)),
    ]);
    tables.push(t);
    // The router's link index (`id_via`): invoices with two payments each,
    // in micro-DBs alone and routed (with the index), each in a process of
    // its own.
    let (alone, routed) = (probe("no-links").await?, probe("links").await?);
    let mut t = Table::new(
        &format!(
            "Link index: resident memory of {m} invoices with 2 payments each (`id_via`), 4 invoices per customer"
        ),
        &["", "bytes per invoice", "with / without"],
    );
    t.row(vec![
        "micro-DBs alone (change sets applied, no router)".into(),
        format!("{alone:.0}"),
        String::new(),
    ]);
    t.row(vec![
        "micro-DBs and the router's link index".into(),
        format!("{routed:.0}"),
        format!("{:.2}x", routed / alone.max(1.0)),
    ]);
    t.row(vec![
        "the index, per row it keeps (1 link row, 2 linked rows)".into(),
        format!("{:.0}", (routed - alone) / 3.0),
        String::new(),
    ]);
    tables.push(t);
    Ok(())
}
