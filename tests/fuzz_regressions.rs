//! Every seed of the fuzz targets and every input a fuzzer found a crash
//! with, through the targets' entry points (`entity_fabric::fuzzing`) in
//! the ordinary test build: a crash found once stays fixed. The fuzzing
//! itself is `scripts/fuzz.sh` (docs/testing.md).

use entity_fabric::fuzzing::TARGETS;
use std::path::Path;

fn inputs(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = match std::fs::read_dir(dir) {
        Ok(d) => d
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    out.sort();
    out
}

#[test]
fn seeds_and_found_crashes_decode_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (name, target) in TARGETS {
        let seeds = inputs(&root.join("seeds").join(name));
        assert!(
            !seeds.is_empty(),
            "fuzz/seeds/{name} has no seed: the target would start blind"
        );
        let found = inputs(&root.join("regressions").join(name));
        for path in seeds.iter().chain(&found) {
            let bytes = std::fs::read(path).unwrap();
            let run = std::panic::catch_unwind(|| target(&bytes));
            assert!(run.is_ok(), "{} panicked {name}", path.display());
        }
        eprintln!("{name}: {} seeds, {} regressions", seeds.len(), found.len());
    }
}

fn seed(target: &str, name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target)
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The seeds reach what they are there to reach: a seed the decoders
/// refuse at its first byte would leave the fuzzer to find the format alone.
#[test]
fn seeds_decode_to_what_they_hold() {
    use entity_fabric::event::Op;
    use entity_fabric::sources::{debezium, mysql_binlog, pgoutput};
    for name in ["mariadb-dml-all-types.bin", "mariadb-no-checksum.bin"] {
        let (changes, dead) = mysql_binlog::decode_events(&seed("binlog", name)).unwrap();
        let ops: Vec<Op> = changes.iter().map(|c| c.op).collect();
        assert!(dead.is_empty(), "{name}: {dead:?}");
        assert!(
            ops.contains(&Op::Insert) && ops.contains(&Op::Update) && ops.contains(&Op::Delete),
            "{name}: {ops:?}"
        );
        let first = changes[0].after.as_ref().unwrap();
        assert!(first.len() >= 10, "{name}: {first:?}");
    }
    let pg = seed("pgoutput", "dml-all-types.bin");
    let (mut rest, mut kinds) = (&pg[..], Vec::new());
    while rest.len() >= 2 {
        let n = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        let m = pgoutput::decode(&rest[2..2 + n]).unwrap();
        kinds.push(match m {
            pgoutput::Message::Relation(_) => 'R',
            pgoutput::Message::Insert { .. } => 'I',
            pgoutput::Message::Update { .. } => 'U',
            pgoutput::Message::Delete { .. } => 'D',
            pgoutput::Message::Truncate { .. } => 'T',
            pgoutput::Message::Other(k) => k as char,
        });
        rest = &rest[2 + n..];
    }
    assert_eq!(String::from_iter(kinds), "BRICBICBUCBDCBRTC");
    for name in [
        "pg-insert-with-schema.json",
        "mysql-update-without-schema.json",
    ] {
        let ev = debezium::decode(&seed("debezium", name)).unwrap();
        assert!(ev.change.is_some(), "{name}");
    }
    for (name, skip) in [("file-4-customers.bin", 1), ("body-4-customers.bin", 1)] {
        let bytes = seed("snapshot", name);
        let body = &bytes[skip..];
        let file = if bytes[0] & 1 == 1 {
            body.to_vec()
        } else {
            entity_fabric::store::snapshot::seal_version(1, 0, 1, 1, body)
        };
        let back = entity_fabric::store::snapshot::decode(Path::new(name), &file, None).unwrap();
        assert_eq!(back.entities.len(), 4, "{name}");
    }
    // The sealed-records seed: one record whose key is not held, one blocked
    // id. FABRIC_UPDATE_SEEDS=1 writes it anew (after a format change).
    let name = "sealed-body.bin";
    if std::env::var("FABRIC_UPDATE_SEEDS").is_ok_and(|v| v == "1") {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/seeds/snapshot")
            .join(name);
        std::fs::write(p, entity_fabric::fuzzing::sealed_snapshot_seed()).unwrap();
    }
    let bytes = seed("snapshot", name);
    assert_eq!(
        bytes,
        entity_fabric::fuzzing::sealed_snapshot_seed(),
        "{name} is not what sealed_snapshot_seed() makes"
    );
    let dir = tempfile::tempdir().unwrap();
    let keys = entity_fabric::store::keystore::KeyStore::open_with_id(
        dir.path(),
        b"fuzzing master key",
        1,
        entity_fabric::fuzzing::FUZZ_KEYSTORE,
    )
    .unwrap();
    let file = entity_fabric::store::snapshot::seal_version(2, 0, 1, 1, &bytes[1..]);
    let back = entity_fabric::store::snapshot::decode(Path::new(name), &file, Some(&keys)).unwrap();
    assert_eq!(
        (back.entities.len(), back.erased, back.blocked.len()),
        (0, 1, 1)
    );
    let name = "kafka-masking-access.toml";
    let text = String::from_utf8(seed("config", name)).unwrap();
    if let Err(e) =
        entity_fabric::config::Config::from_toml(Path::new("/nonexistent/fuzz.toml"), &text)
    {
        panic!("{name}: {e}");
    }
}
