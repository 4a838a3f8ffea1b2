//! `fabric bench --smoke`: every part of the benchmark runs end to end at
//! tiny sizes against the real services (PostgreSQL, Redis, a Kafka broker
//! of its own) and prints its tables with figures from each system.
//! Nothing is asserted about speed: that is what the benchmark reports.

mod common;

use std::process::Command;

#[test]
fn the_benchmark_runs_every_part_and_prints_its_tables() {
    let redis = std::env::var("FABRIC_TEST_REDIS_URL").expect(
        "FABRIC_TEST_REDIS_URL is not set: run the tests with ./scripts/test.sh, or eval \"$(scripts/services.sh start)\" first",
    );
    let dir = tempfile::tempdir().unwrap();
    // A broker of its own: the benchmark loads a broker as hard as it can,
    // and the shared one serves the other tests' timed reads.
    let broker = common::Broker::start(&dir.path().join("broker"), common::free_port());
    let kafka = format!("127.0.0.1:{}", broker.port);
    let db = common::unique("bench_smoke");
    let out = Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(["bench", "--smoke", "--database", &db, "--dir"])
        .arg(dir.path())
        .args([
            "--postgres",
            &common::pg_url(),
            "--redis",
            &redis,
            "--kafka",
            &kafka,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "fabric bench failed ({}):\n{stderr}\n{stdout}",
        out.status
    );

    // Each table, with a row per system and a positive figure in it.
    let rows = |title: &str| -> Vec<Vec<String>> {
        let start = stdout
            .find(title)
            .unwrap_or_else(|| panic!("no table {title:?} in:\n{stdout}"));
        stdout[start..]
            .lines()
            .skip(4)
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                l.trim_matches('|')
                    .split('|')
                    .map(|c| c.trim().to_string())
                    .collect()
            })
            .collect()
    };
    let positive = |cell: &str| cell.parse::<f64>().is_ok_and(|v| v > 0.0);

    let reads = rows("Entity reads");
    for (c, system) in [
        ("2", "fabric GetEntity"),
        ("2", "Redis GET"),
        ("2", "PostgreSQL"),
        ("8", "fabric GetEntity"),
        ("8", "Redis GET"),
        ("8", "PostgreSQL"),
    ] {
        let row = reads
            .iter()
            .find(|r| r[0] == c && r[1] == system)
            .unwrap_or_else(|| panic!("no row for {system} at {c} in {reads:?}"));
        assert!(positive(&row[2]), "req/s of {system}: {row:?}");
        assert!(positive(&row[4]), "p99 of {system}: {row:?}");
    }

    let batches = rows("Batch reads");
    for system in ["fabric BatchGet", "Redis MGET", "PostgreSQL"] {
        let row = batches
            .iter()
            .find(|r| r[1] == system)
            .unwrap_or_else(|| panic!("no batch row for {system}: {batches:?}"));
        assert!(positive(&row[3]), "entities/s of {system}: {row:?}");
    }
    // 300 customers, 8 rows each.
    let memory = rows("Memory of the fabric");
    assert!(
        memory
            .iter()
            .any(|r| r[0] == "entities / rows" && r[1] == "300 / 2400"),
        "{memory:?}"
    );

    let ingest = rows("Ingest");
    for path in [
        "embedded bus",
        "broker alone",
        "Kafka bus, entities and state topics off",
        "Kafka bus, entities and state topics on (default)",
        "the same, entities growing",
    ] {
        let row = ingest
            .iter()
            .find(|r| r[0].starts_with(path))
            .unwrap_or_else(|| panic!("no ingest row {path:?}: {ingest:?}"));
        assert!(positive(&row[3]), "events/s: {row:?}");
        if path.contains("on (default)") || path.contains("growing") {
            assert!(positive(&row[5]), "state topic bytes: {row:?}");
            assert!(positive(&row[6]), "entities topic bytes: {row:?}");
        }
    }

    // Both pipelines through the same broker saw nearly every change.
    let pipeline = rows("Freshness end to end through Kafka");
    for who in ["PostgreSQL → Debezium", "PostgreSQL → fabric"] {
        let row = pipeline
            .iter()
            .find(|r| r[0].starts_with(who))
            .unwrap_or_else(|| panic!("no pipeline row {who:?}: {pipeline:?}"));
        assert!(row[1].parse::<u64>().unwrap() >= 300, "{row:?}");
        assert!(positive(&row[3]), "p99: {row:?}");
    }

    let cdc = rows("Change capture from PostgreSQL");
    for measure in ["initial snapshot", "catch-up"] {
        let row = cdc
            .iter()
            .find(|r| r[0].starts_with(measure))
            .unwrap_or_else(|| panic!("no cdc row {measure:?}: {cdc:?}"));
        assert!(positive(&row[1]), "{row:?}");
        // Debezium is only run when asked for (never by the test suite).
        assert_eq!(row[2], "not run (--debezium)");
    }
    let fresh = rows("Freshness");
    let fabric = fresh
        .iter()
        .find(|r| r[0].starts_with("fabric"))
        .unwrap_or_else(|| panic!("{fresh:?}"));
    // 2 s at 200 transactions/s: nearly every change seen.
    assert!(fabric[1].parse::<u64>().unwrap() >= 300, "{fabric:?}");
    assert!(positive(&fabric[3]), "{fabric:?}");

    let snaps = rows("Snapshots of 2000 entities");
    for step in ["write", "restore"] {
        let row = snaps
            .iter()
            .find(|r| r[0].starts_with(step))
            .unwrap_or_else(|| panic!("{snaps:?}"));
        assert!(positive(&row[2]), "{row:?}");
    }
}
