//! Part 2: change events applied into micro-DBs. A `grpc_push` client sends
//! the events (inserts into `events`, spread over the entities, 100 per
//! transaction, acks pipelined) and the clock stops when the fabric's
//! `fabric_changes_applied_total` reaches them all: through the embedded
//! bus, and through the Kafka bus with and without the entities and state
//! topics. The Kafka figures stand next to the broker's own rate, measured
//! in the same run: as many records of the same size and keys produced
//! (idempotent, `acks=all`, as the bus does) and consumed at once.

use super::harness::FabricChild;
use super::{Bench, Table};
use crate::bus::kafka::{
    BaseConsumer, client_config, create, durable_producer, ensure_topic, send_in_order,
};
use crate::event::{BusRecord, EntityChangeSet, EntityKey, Op, Position, TableChange, Value};
use crate::proto;
use crate::proto::catalog_service_client::CatalogServiceClient;
use crate::proto::ingest_service_client::IngestServiceClient;
use anyhow::{Context, bail};
use rdkafka::consumer::Consumer;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const PER_TXN: u64 = 100;
const ENTITIES: u64 = 100_000;

/// Entities of the run that grows them: 100 rows each after 100,000 events.
const FEW_ENTITIES: u64 = 1_000;

/// Which bus, and for Kafka whether the entities and state topics are on.
#[derive(Clone, Copy)]
enum Mode {
    Embedded,
    Kafka { topics: bool },
}

/// What a Kafka run wrote to one of the fabric's topics.
#[derive(Clone, Copy, Default)]
struct Written {
    records: u64,
    bytes: u64,
}

fn config(b: &Bench, mode: Mode, grpc: &str, admin: &str, prefix: &str) -> String {
    let bus = match mode {
        Mode::Embedded => "[bus]\npartitions = 8\n".to_string(),
        Mode::Kafka { topics } => format!(
            "[bus]\nkind = \"kafka\"\npartitions = 8\n\n[bus.kafka]\nbrokers = \"{}\"\n\
             topic_prefix = \"{prefix}\"\nentities_topic = {topics}\nstate_topic = {topics}\n",
            b.kafka.as_deref().unwrap_or_default()
        ),
    };
    format!(
        "[server]\ngrpc_addr = \"{grpc}\"\nadmin_addr = \"{admin}\"\n\n{bus}\n\
         [snapshot]\ndir = \"{dir}/{prefix}-snapshots\"\n\n\
         [dlq]\nfile = \"{dir}/{prefix}-dlq.jsonl\"\n\n\
         [log]\nlevel = \"warn\"\n\n\
         [[sources]]\nname = \"events\"\nkind = \"grpc_push\"\n\n\
         [[entities]]\nname = \"account\"\n{history}\n\
         [[entities.tables]]\nname = \"events\"\nsource = \"events\"\nfrom = \"events\"\n\
         id_column = \"account_id\"\nprimary_key = [\"id\"]\n",
        dir = b.dir.display(),
        history = b.history_line(),
    )
}

/// The `i`-th event (from 0): an insert into `events` of one of
/// `entities` accounts.
fn event(i: u64, entities: u64) -> (i64, i64, i64, String, String) {
    let account = (i % entities) as i64;
    (
        i as i64,
        account,
        (i % 10_000) as i64,
        ["deposit", "withdrawal", "fee", "refund"][(i % 4) as usize].to_string(),
        format!("transfer reference {i:012}"),
    )
}

fn push_request(seq: u64, events: u64, entities: u64) -> proto::PushRequest {
    let from = (seq - 1) * PER_TXN;
    let changes = (from..(from + PER_TXN).min(events))
        .map(|i| {
            let (id, account, amount, kind, note) = event(i, entities);
            let v = |k: proto::value::Kind| proto::Value { kind: Some(k) };
            use proto::value::Kind;
            proto::RowChange {
                table: "events".into(),
                operation: proto::row_change::Operation::Insert as i32,
                before: HashMap::new(),
                after: HashMap::from([
                    ("id".to_string(), v(Kind::Int(id))),
                    ("account_id".to_string(), v(Kind::Int(account))),
                    ("amount".to_string(), v(Kind::Int(amount))),
                    ("kind".to_string(), v(Kind::Text(kind))),
                    ("note".to_string(), v(Kind::Text(note))),
                ]),
            }
        })
        .collect();
    proto::PushRequest {
        source: "events".into(),
        sequence: seq,
        changes,
        commit_time_micros: 0,
    }
}

/// The bus record the router makes of event `i`, encoded as the Kafka bus
/// encodes it (a format byte and postcard): the peer's message.
fn bus_record(i: u64) -> (String, Vec<u8>) {
    let (id, account, amount, kind, note) = event(i, ENTITIES);
    let key = EntityKey::new("account", account.to_string());
    let row = [
        ("id", Value::Int(id)),
        ("account_id", Value::Int(account)),
        ("amount", Value::Int(amount)),
        ("kind", Value::Text(kind)),
        ("note", Value::Text(note)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let rec = BusRecord::Changes(EntityChangeSet {
        key: key.clone(),
        source: "events".into(),
        position: Position::Seq(i / PER_TXN + 1),
        commit_micros: 1_700_000_000_000_000,
        changes: vec![TableChange {
            table: "events".into(),
            op: Op::Insert,
            pk: vec![Value::Int(id)],
            row: Some(row),
        }],
        delete_entity: false,
    });
    let mut value = vec![1u8];
    value.extend(postcard::to_allocvec(&rec).expect("a record encodes"));
    (key.bus_key(), value)
}

/// Waits until the push source runs here and every partition is served
/// (on Kafka, once this process took its leases).
async fn wait_assigned(f: &FabricChild) -> anyhow::Result<()> {
    let mut catalog = CatalogServiceClient::connect(f.grpc.clone()).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let parts = catalog
            .list_partitions(proto::ListPartitionsRequest {})
            .await?
            .into_inner();
        let sources = catalog
            .list_sources(proto::ListSourcesRequest {})
            .await?
            .into_inner();
        if parts.partitions.iter().all(|p| p.serving)
            && sources.sources.iter().all(|s| s.state == "streaming")
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the fabric did not take its partitions and sources within 120s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pushes `events` over `entities` and waits until they are applied;
/// events per second, and on Kafka what the state and entities topics got.
async fn fabric_rate(
    b: &Bench,
    mode: Mode,
    name: &str,
    events: u64,
    entities: u64,
) -> anyhow::Result<(f64, Written, Written)> {
    let prefix = format!(
        "bench-{name}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let mut f = FabricChild::launch(&b.dir, &prefix, |grpc, admin| {
        config(b, mode, grpc, admin, &prefix)
    })
    .await?;
    wait_assigned(&f).await?;
    let mut client = IngestServiceClient::connect(f.grpc.clone())
        .await?
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let txns = events.div_ceil(PER_TXN);
    let t0 = Instant::now();
    let requests =
        futures::stream::iter((1..=txns).map(move |s| push_request(s, events, entities)));
    let mut acks = client.push(requests).await?.into_inner();
    let mut acked = 0;
    while acked < txns {
        match acks.message().await? {
            Some(a) if a.error.is_empty() => acked += 1,
            Some(a) => bail!("push of transaction {} refused: {}", a.sequence, a.error),
            None => bail!("the push stream ended after {acked} of {txns} acks"),
        }
    }
    let done = f
        .wait_metric(
            "fabric_changes_applied_total",
            "",
            events as f64,
            Duration::from_secs(3600),
        )
        .await?;
    let rate = events as f64 / done.duration_since(t0).as_secs_f64();
    f.stop().await?;
    eprintln!("ingest: {name}: {rate:.0} events/s");
    let (mut state, mut published) = (Written::default(), Written::default());
    if let Mode::Kafka { topics: true } = mode {
        state = topic_written(b, &format!("{prefix}.state")).await?;
        published = topic_written(b, &format!("{prefix}.entities")).await?;
        eprintln!(
            "ingest: {name}: state topic {} records, {} bytes; entities topic {} records, {} bytes",
            state.records, state.bytes, published.records, published.bytes
        );
    }
    Ok((rate, state, published))
}

/// Every record on `topic` now (keys and values; before compaction, which
/// leaves the segment being written alone, this is what was written).
async fn topic_written(b: &Bench, topic: &str) -> anyhow::Result<Written> {
    let client = client_config(
        b.kafka.as_deref().context("no broker")?,
        &Default::default(),
    );
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Written> {
        let mut w = Written::default();
        for p in 0..8 {
            crate::bus::kafka::read_whole_partition(&client, &topic, p, |m| {
                w.records += 1;
                w.bytes += (m.key_len() + m.payload_len()) as u64;
                Ok(())
            })?;
        }
        Ok(w)
    })
    .await?
}

/// The broker's own rate for the same records: produced as the bus
/// produces them and consumed from every partition at once.
async fn broker_rate(b: &Bench) -> anyhow::Result<f64> {
    let brokers = b.kafka.as_deref().context("no broker")?;
    let client = client_config(brokers, &Default::default());
    let topic = format!(
        "bench-peer-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    ensure_topic(&client, &topic, 8, 1, &[]).await?;
    let n = b.kafka_events;
    let mut cc = client.clone();
    cc.set("group.id", format!("{topic}.reader"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10");
    let consumer: BaseConsumer = create(&cc)?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..8 {
        tpl.add_partition_offset(&topic, p, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let t0 = Instant::now();
    let consumed = tokio::task::spawn_blocking(move || -> anyhow::Result<Instant> {
        let mut got = 0;
        let mut progress = Instant::now();
        while got < n {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(_)) => {
                    got += 1;
                    progress = Instant::now();
                }
                Some(Err(e)) => tracing::warn!(error = %e, "peer consumer"),
                None if progress.elapsed() > Duration::from_secs(120) => {
                    bail!("the peer consumer got {got} of {n} records")
                }
                None => {}
            }
        }
        Ok(Instant::now())
    });
    let producer = durable_producer(&client)?;
    let mut inflight = std::collections::VecDeque::new();
    for i in 0..n {
        let (key, value) = bus_record(i);
        let rec = rdkafka::producer::FutureRecord::to(&topic)
            .key(key.as_str())
            .payload(value.as_slice())
            .partition(EntityKey::new("account", (i % ENTITIES).to_string()).partition(8) as i32);
        inflight.push_back(send_in_order(&producer, rec).await?);
        while inflight.len() > 10_000 {
            let d = inflight.pop_front().expect("not empty").await;
            d?.map_err(|(e, _)| e)?;
        }
    }
    for d in inflight {
        d.await?.map_err(|(e, _)| e)?;
    }
    let done = consumed.await??;
    std::mem::forget(producer); // librdkafka's destructor may wait: see app::run.
    let rate = n as f64 / done.duration_since(t0).as_secs_f64();
    eprintln!("ingest: broker produce+consume: {rate:.0} records/s");
    Ok(rate)
}

pub async fn run(b: &Bench, tables: &mut Vec<Table>) -> anyhow::Result<()> {
    let mut t = Table::new(
        &format!("Ingest: change events (pushed, {PER_TXN} per transaction) until applied"),
        &[
            "path",
            "entities",
            "events",
            "events/s",
            "vs broker produce+consume",
            "state topic bytes per event",
            "entities topic bytes per event",
        ],
    );
    let (embedded, ..) = fabric_rate(b, Mode::Embedded, "embedded", b.events, ENTITIES).await?;
    t.row(vec![
        "embedded bus".into(),
        ENTITIES.min(b.events).to_string(),
        b.events.to_string(),
        format!("{embedded:.0}"),
        String::new(),
        String::new(),
        String::new(),
    ]);
    if b.kafka.is_some() {
        let n = b.kafka_events;
        let peer = broker_rate(b).await?;
        let mut runs = vec![(
            "broker alone: the same records produced (idempotent, acks=all) and consumed",
            ENTITIES,
            (peer, None),
        )];
        let (bare, ..) =
            fabric_rate(b, Mode::Kafka { topics: false }, "kafka-bare", n, ENTITIES).await?;
        runs.push((
            "Kafka bus, entities and state topics off",
            ENTITIES,
            (bare, None),
        ));
        if b.kafka_topics {
            for (name, path, entities) in [
                (
                    "kafka",
                    "Kafka bus, entities and state topics on (default)",
                    ENTITIES,
                ),
                (
                    "kafka-grown",
                    "the same, entities growing to 100 rows each",
                    FEW_ENTITIES,
                ),
            ] {
                let (rate, state, published) =
                    fabric_rate(b, Mode::Kafka { topics: true }, name, n, entities).await?;
                runs.push((path, entities, (rate, Some((state, published)))));
            }
        }
        for (path, entities, (rate, written)) in runs {
            let per = |w: Written| format!("{:.0}", w.bytes as f64 / n as f64);
            t.row(vec![
                path.into(),
                entities.min(n).to_string(),
                n.to_string(),
                format!("{rate:.0}"),
                format!("{:.2}", rate / peer),
                written.map(|(s, _)| per(s)).unwrap_or_default(),
                written.map(|(_, p)| per(p)).unwrap_or_default(),
            ]);
        }
    } else {
        eprintln!("ingest: no broker given (--kafka): the Kafka bus is not measured");
    }
    tables.push(t);
    Ok(())
}
