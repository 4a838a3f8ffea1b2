//! Entry points of the fuzz targets (`fuzz/`, run by `scripts/fuzz.sh`):
//! every decoder of bytes from outside the process, driven the way the
//! product drives it. Each takes any bytes and must return without a
//! panic, without unbounded allocation and in time linear in its input.
//! `tests/fuzz_regressions.rs` runs the seeds and every input a fuzzer
//! ever found a crash with (`fuzz/regressions/<target>/`) through the same
//! functions in the ordinary test build.

use crate::sources::pgoutput::{self, Message, Relation};
use std::collections::HashMap;
use std::path::Path;

/// A fuzz target's entry point.
pub type Target = fn(&[u8]);

/// The targets by name (the names of the `fuzz/` binaries and of the
/// seed and regression directories).
pub const TARGETS: [(&str, Target); 5] = [
    ("pgoutput", pgoutput_stream),
    ("binlog", binlog_events),
    ("debezium", debezium_event),
    ("snapshot", snapshot_file),
    ("config", config_text),
];

/// Run once by each fuzz target before any input: a panic is a crash only
/// when it escapes the product. libfuzzer-sys aborts on every panic, even
/// one the product catches where it must (the MySQL driver's row parsing
/// panics on hostile bytes; `mysql_binlog` dead-letters that row event);
/// with this hook a caught panic is a line on stderr and an escaping one
/// still aborts the fuzzer (its harness aborts on a panic it catches).
pub fn init() {
    std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));
}

/// A stream of pgoutput messages (each a big-endian u16 length and its
/// bytes) as the PostgreSQL source reads them: relations remembered, every
/// tuple of a known relation turned into a row by its columns' types, an
/// update's new tuple filled in from its old one.
pub fn pgoutput_stream(data: &[u8]) {
    let mut relations: HashMap<u32, Relation> = HashMap::new();
    let mut rest = data;
    while rest.len() >= 2 {
        let n = (u16::from_be_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        let (msg, tail) = rest[2..].split_at(n);
        rest = tail;
        let Ok(m) = pgoutput::decode(msg) else {
            continue;
        };
        let (relation, tuples) = match m {
            Message::Relation(r) => {
                relations.insert(r.id, r);
                continue;
            }
            Message::Insert { relation, new } => (relation, vec![new]),
            Message::Update { relation, old, new } => {
                (relation, old.into_iter().chain([new]).collect())
            }
            Message::Delete { relation, old } => (relation, vec![old]),
            Message::Truncate { .. } | Message::Other(_) => continue,
        };
        if let Some(rel) = relations.get(&relation) {
            let mut previous = None;
            for t in &tuples {
                if let Ok(row) = pgoutput::row(rel, t, previous.as_ref()) {
                    previous = Some(row);
                }
            }
        }
    }
}

/// Binlog events (a binlog file without its magic, or what a server sends)
/// through the MariaDB/MySQL source's table maps and row decoding.
pub fn binlog_events(data: &[u8]) {
    let _ = crate::sources::mysql_binlog::decode_events(data);
}

/// One Debezium change event (JSON, with or without the schema envelope)
/// as the Debezium sources read it.
pub fn debezium_event(data: &[u8]) {
    let _ = crate::sources::debezium::peek_table(data);
    let _ = crate::sources::debezium::decode(data);
}

/// Snapshot files. The first byte picks the layer: odd, the rest is a
/// whole file (magic, checksum, lz4 frame: all checked before decoding);
/// even, the rest is an uncompressed body sealed into a file with a good
/// checksum, so the fuzzer reaches the records and entities behind it, in
/// format version 1 (bits 1 and 3 clear), 2 (bit 1 set) or 3 (bit 3 set).
/// Bit 2 reads with a keystore, so sealed records are opened (or refused)
/// too.
pub fn snapshot_file(data: &[u8]) {
    use crate::store::snapshot;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let path = Path::new("fuzz.snap");
    let keys = if mode & 4 == 4 { fuzz_keystore() } else { None };
    if mode & 1 == 1 {
        let _ = snapshot::decode(path, rest, keys);
    } else {
        let version = match (mode & 8 == 8, mode & 2 == 2) {
            (true, _) => 3,
            (false, true) => 2,
            (false, false) => 1,
        };
        let _ = snapshot::decode(path, &snapshot::seal_version(version, 0, 1, 1, rest), keys);
    }
}

/// The id of the snapshot target's keystore: inputs that name it reach the
/// sealed records.
pub const FUZZ_KEYSTORE: crate::store::keystore::KeystoreId = *b"fabric-fuzz-keys";

/// One keystore for every snapshot input (it holds no key: records read as
/// erased, which is as far as a fuzzer that cannot know a key gets).
fn fuzz_keystore() -> Option<&'static crate::store::keystore::KeyStore> {
    static KEYS: std::sync::OnceLock<Option<crate::store::keystore::KeyStore>> =
        std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        // One directory for every run: it only ever holds the keystore's
        // meta file, the same for every process that makes it.
        let dir = std::env::temp_dir().join("fabric-fuzz-keys");
        crate::store::keystore::KeyStore::open_with_id(
            &dir,
            b"fuzzing master key",
            1,
            FUZZ_KEYSTORE,
        )
        .ok()
    })
    .as_ref()
}

/// A snapshot target input that reaches the sealed records: mode 6 (a
/// format 2 body, read with the target's keystore), a meta naming that
/// keystore, one sealed record (of a key the keystore does not hold, so it
/// reads as erased) and one blocked id. The seed `sealed-body.bin`.
pub fn sealed_snapshot_seed() -> Vec<u8> {
    use crate::event::EntityKey;
    use crate::store::snapshot::SnapshotMeta;
    let meta = SnapshotMeta {
        partition: 0,
        partitions: 1,
        round: 1,
        bus_offset: 9,
        checkpoints: Default::default(),
        created_micros: 1,
        keystore: Some(FUZZ_KEYSTORE),
        dictionary: b"\x08customer\x02id".to_vec(),
        key_generation: 0,
    };
    let prefixed = |out: &mut Vec<u8>, bytes: &[u8]| {
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(bytes);
    };
    let mut out = vec![6u8];
    prefixed(&mut out, &postcard::to_stdvec(&meta).expect("encodes"));
    out.extend_from_slice(&1u64.to_le_bytes());
    let key = EntityKey::new("customer", "42");
    let mut record = postcard::to_stdvec(&key).expect("encodes");
    record.extend_from_slice(&7u64.to_le_bytes());
    record.extend_from_slice(&[0x5a; 12 + 40]);
    prefixed(&mut out, &record);
    out.extend_from_slice(&1u64.to_le_bytes());
    prefixed(
        &mut out,
        &postcard::to_stdvec(&(key, 5i64)).expect("encodes"),
    );
    out
}

/// A config file: TOML parsing, `${VAR}` expansion and every validation
/// rule. Files it names are looked up relative to a directory that does
/// not exist.
pub fn config_text(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::config::Config::from_toml(Path::new("/nonexistent/fuzz.toml"), text);
    }
}
