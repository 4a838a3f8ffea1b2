//! Durability through the real binary: SIGKILL while the sources change,
//! and a corrupt newest snapshot. After each, every entity must equal what
//! the SQLite sources hold — all of them, compared column by column.

mod common;

use common::*;
use std::time::Duration;

const CONVERGE: Duration = Duration::from_secs(90);

async fn converge(fabric: &FabricProcess, data: &std::path::Path) -> usize {
    converge_within(fabric, data, CONVERGE).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_sources_change_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = demo_config(
        dir.path(),
        &DemoSettings {
            customers: 400,
            snapshot_interval: "400ms",
            ..Default::default()
        },
    );
    let data = dir.path().join("data");
    let mut fabric = FabricProcess::start(&config, &dir.path().join("fabric-0.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;

    // The workload runs in this process, so killing the fabric does not stop it.
    let workload = Workload::start(&data, 150.0);
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let restarts = 5;
    for i in 1..=restarts {
        tokio::time::sleep(Duration::from_millis(rng.u64(300..2500))).await;
        fabric.kill9();
        fabric = FabricProcess::start(&config, &dir.path().join(format!("fabric-{i}.log")));
        fabric.wait_serving(Duration::from_secs(60)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let written = workload.stop().await;
    assert!(
        written > 100,
        "the workload wrote only {written} transactions"
    );

    let compared = converge(&fabric, &data).await;
    println!(
        "seed {seed}: {written} source transactions written, {restarts} SIGKILL restarts survived, {compared} entities compared, 0 mismatches"
    );
    assert!(compared >= 400);
    assert!(fabric.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_newest_snapshot_falls_back_to_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = demo_config(
        dir.path(),
        &DemoSettings {
            customers: 150,
            snapshot_interval: "300ms",
            ..Default::default()
        },
    );
    let data = dir.path().join("data");
    let snaps = data.join("snapshots");
    let mut fabric = FabricProcess::start(&config, &dir.path().join("first.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    converge(&fabric, &data).await;
    // Two rounds at least, so there is a previous one.
    eventually(Duration::from_secs(30), "two snapshot rounds", || {
        let snaps = snaps.clone();
        async move {
            let files = entity_fabric::store::snapshot::list(&snaps).ok()?;
            let rounds: std::collections::BTreeSet<u64> = files.iter().map(|f| f.round).collect();
            (rounds.len() >= 2).then_some(())
        }
    })
    .await;
    assert!(fabric.terminate(), "{}", fabric.log_text());

    // While it is down, a source changes; then the newest file of partition 0 rots.
    let mut db = demo_db(&data).await;
    sqlx::query("UPDATE customers SET tier = 'platinum', email = 'moved@example.org' WHERE id = 7")
        .execute(&mut db)
        .await
        .unwrap();
    let files = entity_fabric::store::snapshot::list(&snaps).unwrap();
    let newest = files[0].round;
    let victim = files
        .iter()
        .find(|f| f.round == newest && f.partition == 0)
        .unwrap()
        .path
        .clone();
    // The previous whole round (a round the stop interrupted, with some
    // partitions written, is passed over).
    let whole = |r: u64| (0..4).all(|p| files.iter().any(|f| f.round == r && f.partition == p));
    let previous = files
        .iter()
        .find(|f| f.round < newest && f.partition == 0 && whole(f.round))
        .expect("a previous snapshot of partition 0")
        .path
        .clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&victim, bytes).unwrap();

    let mut fabric = FabricProcess::start(&config, &dir.path().join("second.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let log = fabric.log_text();
    let warn = log
        .lines()
        .find(|l| l.contains("corrupt snapshot skipped"))
        .unwrap_or_else(|| panic!("no warning about the corrupt snapshot:\n{log}"));
    assert!(warn.contains("WARN"), "{warn}");
    assert!(warn.contains(&victim.display().to_string()), "{warn}");
    assert!(warn.contains("checksum mismatch"), "{warn}");
    assert!(
        log.lines()
            .any(|l| l.contains("snapshot read") && l.contains(&previous.display().to_string())),
        "the previous snapshot of partition 0 was not used:\n{log}"
    );
    // Every partition from that previous round (one cut of the router's
    // output), not partition 0 alone.
    let previous_round = files
        .iter()
        .find(|f| f.path == previous)
        .map(|f| entity_fabric::store::snapshot::file_name(f.round, 0))
        .unwrap();
    let previous_round = previous_round.split("-p").next().unwrap().to_string();
    let used: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("snapshot read"))
        .collect();
    assert_eq!(used.len(), 4, "{log}");
    assert!(
        used.iter().all(|l| l.contains(&previous_round)),
        "partitions restored from different rounds:\n{log}"
    );
    let n = converge(&fabric, &data).await;
    assert_eq!(n, 150);
    // Two whole rounds of this run at least, so that one older than its
    // newest is left below (in CI this run once stopped after one round).
    eventually(
        Duration::from_secs(30),
        "two whole rounds of this run",
        || {
            let (snaps, victim) = (snaps.clone(), victim.clone());
            async move {
                let files = entity_fabric::store::snapshot::list(&snaps).ok()?;
                let whole =
                    |r: u64| (0..4).all(|p| files.iter().any(|f| f.round == r && f.partition == p));
                let rounds: std::collections::BTreeSet<u64> = files
                    .iter()
                    .map(|f| f.round)
                    .filter(|r| {
                        whole(*r) && files.iter().all(|f| f.round != *r || f.path != victim)
                    })
                    .collect();
                (rounds.len() >= 2).then_some(())
            }
        },
    )
    .await;
    assert!(fabric.terminate());

    // A round a crash interrupted: partition 0's file of the newest round
    // is written, the others are not. Restore takes the round before it for
    // every partition: rows a transaction moved between partitions would
    // otherwise be restored in both entities or in neither.
    let files = entity_fabric::store::snapshot::list(&snaps).unwrap();
    let newest = files[0].round;
    for f in files
        .iter()
        .filter(|f| f.round == newest && f.partition != 0)
    {
        std::fs::remove_file(&f.path).unwrap();
    }
    // (The round whose partition 0 rotted above is passed over too.)
    let whole = |r: u64| (0..4).all(|p| files.iter().any(|f| f.round == r && f.partition == p));
    let before = files
        .iter()
        .map(|f| f.round)
        .filter(|r| {
            *r < newest && whole(*r) && files.iter().all(|f| f.round != *r || f.path != victim)
        })
        .max()
        .expect("an older round");
    let mut fabric = FabricProcess::start(&config, &dir.path().join("third.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let log = fabric.log_text();
    assert!(
        log.lines().any(|l| l.contains("snapshot round not whole")),
        "{log}"
    );
    let prefix = entity_fabric::store::snapshot::file_name(before, 0);
    let prefix = prefix.split("-p").next().unwrap();
    let used: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("snapshot read"))
        .collect();
    assert_eq!(used.len(), 4, "{log}");
    assert!(used.iter().all(|l| l.contains(prefix)), "{log}");
    assert_eq!(converge(&fabric, &data).await, 150);
    assert!(fabric.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_sources_keep_their_checkpoints_and_partitions_can_change() {
    let dir = tempfile::tempdir().unwrap();
    let config = demo_config(
        dir.path(),
        &DemoSettings {
            customers: 120,
            snapshot_interval: "300ms",
            ..Default::default()
        },
    );
    let data = dir.path().join("data");

    // First run: initial snapshots of the three sources.
    let mut fabric = FabricProcess::start(&config, &dir.path().join("a.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    converge(&fabric, &data).await;
    assert!(fabric.terminate());

    // Second run: nothing changes, several snapshot rounds are taken.
    let mut fabric = FabricProcess::start(&config, &dir.path().join("b.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(fabric.terminate());
    assert!(
        !fabric.log_text().contains("initial snapshot read"),
        "a restart re-read the sources:\n{}",
        fabric.log_text()
    );

    // While it is down, rows are deleted and changed; and the partitions change.
    let mut db = demo_db(&data).await;
    let deleted = sqlx::query(
        "DELETE FROM addresses WHERE id IN (SELECT id FROM addresses ORDER BY id LIMIT 5)",
    )
    .execute(&mut db)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(deleted, 5);
    sqlx::query("UPDATE support.tickets SET status = 'closed' WHERE id % 3 = 0")
        .execute(&mut db)
        .await
        .unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("partitions = 4", "partitions = 2")).unwrap();

    // Third run: resumes every source from its checkpoint (no re-read), re-shards.
    let mut fabric = FabricProcess::start(&config, &dir.path().join("c.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    converge(&fabric, &data).await;
    let log = fabric.log_text();
    assert!(log.contains("re-sharding restored entities"), "{log}");
    assert!(
        !log.contains("initial snapshot read"),
        "a source started over:\n{log}"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(fabric.terminate());

    // Fourth run, on the new partition count.
    let mut fabric = FabricProcess::start(&config, &dir.path().join("d.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let log = fabric.log_text();
    assert!(!log.contains("starting empty"), "{log}");
    assert!(!log.contains("initial snapshot read"), "{log}");
    assert_eq!(converge(&fabric, &data).await, 120);
    assert!(fabric.terminate());
}
