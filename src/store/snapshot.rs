//! Snapshot files: every micro-DB of one bus partition, durable and checked.
//!
//! File name: `r<round>-p<partition>.snap`. Layout (format version 3):
//!
//! ```text
//! magic "EFSNAP01" | format version u32 | partition u32 | partitions u32 | round u64
//! lz4 frame { meta (postcard, length-prefixed) | entity count u64 | entities (each length-prefixed)
//!             | blocked count u64 | blocked ids (postcard (key, forgotten at), each length-prefixed)
//!             | floor u64 }
//! trailer: crc32 of every byte before it u32 | length of every byte before it u64 | "EFSNAPOK"
//! ```
//!
//! An entity record is the entity in postcard encoding, or, when the meta
//! names a keystore (`[snapshot.encryption]`), the entity sealed under its
//! own key (see [`super::keystore`]): its key in postcard, its key id (u64),
//! then nonce, ciphertext and tag of the entity's postcard bytes compressed
//! on their own (lz4 block, size first: sealed bytes do not compress, so
//! the file's lz4 frame gains nothing on them); the key and key id are the
//! associated data, so a record cannot pass for another entity's. A record whose key
//! was deleted (the entity was forgotten) is skipped on reading and
//! counted; a sealed file read without its keystore is refused whole.
//! Blocked ids (forgotten entities whose later changes are dropped) are
//! kept in clear: they are ids, which are not secret (docs/security.md).
//!
//! The floor is the highest version of a retired entity the partition
//! dropped (a new entity starts above it). Entities carry when they retired
//! (`gone_micros`). Version 2 files (no floor, entities without retirement)
//! and version 1 files (no blocked ids, never sealed, entities without row
//! lineage) are still read.
//!
//! Written to a `.tmp` file, fsynced, renamed, and the directory fsynced
//! (DESIGN.md invariant 4). A reader checks magic, version, length and
//! checksum before decoding a byte, so a torn or corrupt file is refused
//! whole, never half-loaded.

use super::keystore::{KeyError, KeyStore, KeystoreId, Unsealed};
use super::microdb::Entity;
use crate::event::{Checkpoints, EntityKey};
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"EFSNAP01";
const TRAILER_MAGIC: &[u8; 8] = b"EFSNAPOK";
/// Bumped when the encoding changes; older versions this build still
/// reads are listed in [`READS`].
pub const FORMAT_VERSION: u32 = 3;
const READS: [u32; 3] = [1, 2, 3];
const HEADER_LEN: usize = 8 + 4 + 4 + 4 + 8;
const TRAILER_LEN: usize = 4 + 8 + 8;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}: i/o error: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("snapshot {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("snapshot {path} has format version {found}, this build reads 1 to 3")]
    Version { path: PathBuf, found: u32 },
    /// The file is sealed and cannot be opened with the keystore at hand:
    /// a setup error, not a damaged file (restore refuses to start rather
    /// than throw the file away).
    #[error("snapshot {path}: {reason}")]
    Keystore { path: PathBuf, reason: String },
    #[error(transparent)]
    Keys(#[from] KeyError),
}

/// What a snapshot file says besides its entities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub partition: u32,
    pub partitions: u32,
    /// Snapshot round: all partitions snapshotted together share it.
    pub round: u64,
    /// The bus offset of the next record of this partition not reflected.
    pub bus_offset: u64,
    /// Per source, the position from which replay restores everything this
    /// partition lacks.
    pub checkpoints: Checkpoints,
    pub created_micros: i64,
    /// Set when the entity records are sealed: the keystore that holds
    /// their keys.
    pub keystore: Option<KeystoreId>,
    /// Sealed files: the names (entity type, tables, columns, sources) the
    /// records are compressed against, each as postcard writes a string.
    /// Names only, never values.
    pub dictionary: Vec<u8>,
    /// Sealed files: the generation of the partition's key file when the
    /// file was sealed; a key file older than that is refused (a backup of
    /// it restored, or one lost), rather than its missing keys taken for
    /// forgotten entities.
    pub key_generation: u64,
}

/// The meta of a format version 1 file.
#[derive(Deserialize)]
struct MetaV1 {
    partition: u32,
    partitions: u32,
    round: u64,
    bus_offset: u64,
    checkpoints: Checkpoints,
    created_micros: i64,
}

/// A snapshot file read back.
#[derive(Debug)]
pub struct LoadedSnapshot {
    pub meta: SnapshotMeta,
    pub entities: Vec<Entity>,
    /// Forgotten ids whose later changes are dropped, and when each was
    /// forgotten.
    pub blocked: Vec<(EntityKey, i64)>,
    /// The highest version of a retired entity the partition dropped.
    pub floor: u64,
    /// Sealed records skipped because their key is gone (forgotten).
    pub erased: usize,
    pub path: PathBuf,
    pub bytes: u64,
}

/// One file on disk.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SnapshotFile {
    pub round: u64,
    pub partition: u32,
    pub path: PathBuf,
}

pub fn file_name(round: u64, partition: u32) -> String {
    format!("r{round:012}-p{partition:04}.snap")
}

fn parse_name(name: &str) -> Option<(u64, u32)> {
    let rest = name.strip_prefix('r')?.strip_suffix(".snap")?;
    let (r, p) = rest.split_once("-p")?;
    Some((r.parse().ok()?, p.parse().ok()?))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A writer that checksums and counts what passes through it.
struct Summing<W> {
    inner: W,
    crc: crc32fast::Hasher,
    len: u64,
}

impl<W: Write> Write for Summing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn write_prefixed(w: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    w.write_all(&(bytes.len() as u64).to_le_bytes())?;
    w.write_all(bytes)
}

/// Writes one partition's snapshot durably: its entities, sealed with
/// `keys` when given (its keystore id goes into `meta`), and its blocked
/// ids and floor; returns its path and size. Blocking: call from
/// `spawn_blocking`.
pub fn write(
    dir: &Path,
    meta: &SnapshotMeta,
    entities: &[Arc<Entity>],
    blocked: &[(EntityKey, i64)],
    floor: u64,
    keys: Option<&KeyStore>,
) -> Result<(PathBuf, u64), SnapshotError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let path = dir.join(file_name(meta.round, meta.partition));
    let encode = |e: postcard::Error| SnapshotError::Corrupt {
        path: path.clone(),
        reason: format!("cannot encode: {e}"),
    };
    // Keys first: the key file is durable before a file sealed with it is.
    let prepared = match keys {
        Some(ks) => Some(ks.prepare(
            meta.partition,
            entities.iter().map(|e| &e.key),
            meta.bus_offset,
            meta.round,
        )?),
        None => None,
    };
    let mut meta = meta.clone();
    meta.keystore = keys.map(KeyStore::id);
    meta.dictionary = match keys {
        Some(_) => names_dictionary(entities),
        None => Vec::new(),
    };
    meta.key_generation = prepared.as_ref().map_or(0, |p| p.generation);
    let tmp = path.with_extension("snap.tmp");
    let file = create_private(&tmp).map_err(io_err(&tmp))?;
    let mut out = Summing {
        inner: BufWriter::with_capacity(1 << 20, file),
        crc: crc32fast::Hasher::new(),
        len: 0,
    };
    out.write_all(&header(meta.partition, meta.partitions, meta.round))
        .map_err(io_err(&tmp))?;
    let mut lz = lz4_flex::frame::FrameEncoder::new(&mut out);
    let m = postcard::to_stdvec(&meta).map_err(encode)?;
    write_prefixed(&mut lz, &m).map_err(io_err(&tmp))?;
    let count = prepared.as_ref().map_or(entities.len(), |p| p.count());
    lz.write_all(&(count as u64).to_le_bytes())
        .map_err(io_err(&tmp))?;
    let mut buf = Vec::with_capacity(4096);
    let (mut record, mut aad) = (Vec::with_capacity(4096), Vec::with_capacity(64));
    let mut prepared = prepared;
    for (i, e) in entities.iter().enumerate() {
        buf.clear();
        buf = postcard::to_extend(&**e, buf).map_err(encode)?;
        match &mut prepared {
            None => write_prefixed(&mut lz, &buf).map_err(io_err(&tmp))?,
            Some(p) => {
                let Some(key_id) = p.key_id(i) else {
                    continue; // Forgotten after the capture.
                };
                aad.clear();
                aad = postcard::to_extend(&e.key, aad).map_err(encode)?;
                aad.extend_from_slice(&key_id.to_le_bytes());
                record.clear();
                record.extend_from_slice(&aad);
                let packed =
                    lz4_flex::block::compress_prepend_size_with_dict(&buf, &meta.dictionary);
                p.seal_into(i, &aad, &packed, &mut record)?;
                write_prefixed(&mut lz, &record).map_err(io_err(&tmp))?;
            }
        }
    }
    lz.write_all(&(blocked.len() as u64).to_le_bytes())
        .map_err(io_err(&tmp))?;
    for b in blocked {
        buf.clear();
        buf = postcard::to_extend(b, buf).map_err(encode)?;
        write_prefixed(&mut lz, &buf).map_err(io_err(&tmp))?;
    }
    lz.write_all(&floor.to_le_bytes()).map_err(io_err(&tmp))?;
    lz.finish().map_err(|e| SnapshotError::Io {
        path: tmp.clone(),
        source: io::Error::other(e),
    })?;
    let crc = out.crc.clone().finalize();
    let len = out.len;
    let mut inner = out.inner;
    (|| -> io::Result<()> {
        inner.write_all(&trailer(crc, len))?;
        let file = inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    })()
    .map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok((path, len + TRAILER_LEN as u64))
}

/// Reads and checks one snapshot file, opening sealed records with `keys`.
/// Blocking.
pub fn read(path: &Path, keys: Option<&KeyStore>) -> Result<LoadedSnapshot, SnapshotError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    decode(path, &bytes, keys)
}

/// Checks and decodes the bytes of a snapshot file read from `path` (named
/// in errors only). Hostile bytes get an error, never a panic, and nothing
/// is allocated for a record before its bytes have been decompressed.
pub fn decode(
    path: &Path,
    bytes: &[u8],
    keys: Option<&KeyStore>,
) -> Result<LoadedSnapshot, SnapshotError> {
    let corrupt = |reason: String| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < HEADER_LEN + TRAILER_LEN {
        return Err(corrupt(format!("only {} bytes", bytes.len())));
    }
    if &bytes[..8] != MAGIC {
        return Err(corrupt("not a snapshot file (bad magic)".into()));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if !READS.contains(&version) {
        return Err(SnapshotError::Version {
            path: path.to_path_buf(),
            found: version,
        });
    }
    let body_len = bytes.len() - TRAILER_LEN;
    let trailer = &bytes[body_len..];
    if &trailer[12..20] != TRAILER_MAGIC {
        return Err(corrupt("no trailer: the file is torn".into()));
    }
    let crc = u32::from_le_bytes(trailer[..4].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(trailer[4..12].try_into().expect("8 bytes"));
    if len != body_len as u64 {
        return Err(corrupt(format!(
            "length {len} in trailer, {body_len} bytes in file"
        )));
    }
    let actual = crc32fast::hash(&bytes[..body_len]);
    if actual != crc {
        return Err(corrupt(format!(
            "checksum mismatch (stored {crc:08x}, computed {actual:08x})"
        )));
    }
    let mut lz = lz4_flex::frame::FrameDecoder::new(&bytes[HEADER_LEN..body_len]);
    let read_u64 = |lz: &mut lz4_flex::frame::FrameDecoder<&[u8]>| -> Result<u64, SnapshotError> {
        let mut n = [0u8; 8];
        lz.read_exact(&mut n)
            .map_err(|e| corrupt(format!("cannot decompress: {e}")))?;
        Ok(u64::from_le_bytes(n))
    };
    let read_prefixed =
        |lz: &mut lz4_flex::frame::FrameDecoder<&[u8]>, n: u64| -> Result<Vec<u8>, SnapshotError> {
            // Grown as the bytes arrive: a length in a hostile file asks
            // for nothing until the data is there.
            let mut buf = Vec::new();
            lz.take(n)
                .read_to_end(&mut buf)
                .map_err(|e| corrupt(format!("cannot decompress: {e}")))?;
            if buf.len() as u64 != n {
                return Err(corrupt(format!(
                    "a record of {n} bytes ends after {}",
                    buf.len()
                )));
            }
            Ok(buf)
        };
    let n = read_u64(&mut lz)?;
    let meta_bytes = read_prefixed(&mut lz, n)?;
    let meta: SnapshotMeta = if version == 1 {
        let m: MetaV1 =
            postcard::from_bytes(&meta_bytes).map_err(|e| corrupt(format!("bad metadata: {e}")))?;
        SnapshotMeta {
            partition: m.partition,
            partitions: m.partitions,
            round: m.round,
            bus_offset: m.bus_offset,
            checkpoints: m.checkpoints,
            created_micros: m.created_micros,
            keystore: None,
            dictionary: Vec::new(),
            key_generation: 0,
        }
    } else {
        postcard::from_bytes(&meta_bytes).map_err(|e| corrupt(format!("bad metadata: {e}")))?
    };
    let keys = match (meta.keystore, keys) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(SnapshotError::Keystore {
                path: path.to_path_buf(),
                reason: "its entities are encrypted and [snapshot.encryption] is not configured"
                    .into(),
            });
        }
        (Some(id), Some(ks)) if id != ks.id() => {
            return Err(SnapshotError::Keystore {
                path: path.to_path_buf(),
                reason: "it was sealed with another keystore than the one in \
                         snapshot.encryption.keys_dir (moved or replaced keys directory?)"
                    .into(),
            });
        }
        (Some(_), Some(ks))
            if meta.partitions == ks.partitions()
                && ks.generation(meta.partition) < meta.key_generation =>
        {
            return Err(SnapshotError::Keystore {
                path: path.to_path_buf(),
                reason: format!(
                    "it was sealed with generation {} of the key file of partition {}, and \
                     snapshot.encryption.keys_dir holds generation {}: an older copy of the \
                     keys (restored from a backup?) or a lost key file",
                    meta.key_generation,
                    meta.partition,
                    ks.generation(meta.partition)
                ),
            });
        }
        (Some(_), Some(ks)) => Some(ks),
    };
    let count = read_u64(&mut lz)?;
    // Every entity takes at least its 8-byte length: no more can be there.
    let mut entities = Vec::with_capacity(count.min(body_len as u64 / 8).min(1 << 20) as usize);
    let mut erased = 0;
    for i in 0..count {
        let n = read_u64(&mut lz)?;
        let buf = read_prefixed(&mut lz, n)?;
        let plain = match keys {
            None => buf,
            Some(ks) => {
                let (key, rest): (EntityKey, &[u8]) = postcard::take_from_bytes(&buf)
                    .map_err(|e| corrupt(format!("bad sealed entity #{i}: {e}")))?;
                if rest.len() < 8 {
                    return Err(corrupt(format!("sealed entity #{i} is cut short")));
                }
                let aad_len = buf.len() - rest.len() + 8;
                match ks.unseal(&key, &buf[..aad_len], &buf[aad_len..]) {
                    Unsealed::Open(packed) => unpack(&packed, &meta.dictionary)
                        .map_err(|e| corrupt(format!("sealed entity #{i} ({key}): {e}")))?,
                    Unsealed::KeyGone => {
                        erased += 1;
                        continue;
                    }
                    Unsealed::Altered => {
                        return Err(corrupt(format!(
                            "sealed entity #{i} ({key}) does not open: altered bytes"
                        )));
                    }
                }
            }
        };
        let e: Result<Entity, _> = match version {
            1 => postcard::from_bytes::<super::EntityV1>(&plain).map(Entity::from),
            2 => postcard::from_bytes::<super::microdb::EntityV2>(&plain).map(Entity::from),
            _ => postcard::from_bytes(&plain),
        };
        let e = e.map_err(|e| corrupt(format!("bad entity #{i}: {e}")))?;
        entities.push(e);
    }
    let mut blocked = Vec::new();
    if version >= 2 {
        let count = read_u64(&mut lz)?;
        for i in 0..count {
            let n = read_u64(&mut lz)?;
            let b: (EntityKey, i64) = postcard::from_bytes(&read_prefixed(&mut lz, n)?)
                .map_err(|e| corrupt(format!("bad blocked id #{i}: {e}")))?;
            blocked.push(b);
        }
    }
    let floor = if version >= 3 { read_u64(&mut lz)? } else { 0 };
    Ok(LoadedSnapshot {
        meta,
        entities,
        blocked,
        floor,
        erased,
        path: path.to_path_buf(),
        bytes: bytes.len() as u64,
    })
}

/// The entity bytes of an opened record: lz4 block with its size first.
/// The size is checked against what lz4 can expand to before anything is
/// allocated for it.
fn unpack(packed: &[u8], dictionary: &[u8]) -> Result<Vec<u8>, String> {
    let Some(size) = packed.get(..4) else {
        return Err("cut short".into());
    };
    let size = u32::from_le_bytes(size.try_into().expect("4 bytes")) as usize;
    // lz4 expands at most 255 times (plus a little); no entity is near
    // 256 MiB.
    if size > packed.len().saturating_mul(255) + 16 || size > 256 << 20 {
        return Err(format!("claims {size} bytes from {}", packed.len()));
    }
    lz4_flex::block::decompress_size_prepended_with_dict(packed, dictionary)
        .map_err(|e| e.to_string())
}

/// The names of the first entities of a capture (entity type, tables,
/// columns, sources), each as postcard writes a string: sealed records
/// are compressed one by one, and without what they share with each other
/// (the names) they would compress to little (`fabric bench --only
/// snapshots`). Names only: no value of any entity goes into the file in
/// clear.
fn names_dictionary(entities: &[Arc<Entity>]) -> Vec<u8> {
    const MAX: usize = 16 << 10;
    let mut seen = std::collections::HashSet::new();
    let mut dict = Vec::new();
    let mut add = |name: &str| {
        if dict.len() < MAX && seen.insert(name.to_string()) {
            dict = postcard::to_extend(name, std::mem::take(&mut dict)).expect("to memory");
        }
    };
    for e in entities.iter().take(256) {
        add(&e.key.entity_type);
        for (table, rows) in e.tables.iter() {
            add(table);
            for (_, row) in rows.iter() {
                for (column, _) in row.iter() {
                    add(column);
                }
            }
        }
        for (source, _) in e.positions.iter() {
            add(source);
        }
    }
    dict
}

/// A whole, checked snapshot file around an uncompressed body (meta,
/// entity count, entities, each as [`write`] lays them out): what a file
/// would hold if it were written with that body. For tools and the
/// snapshot fuzz target, which reach past the checksum this way.
pub fn seal(partition: u32, partitions: u32, round: u64, body: &[u8]) -> Vec<u8> {
    seal_version(FORMAT_VERSION, partition, partitions, round, body)
}

/// As [`seal`], stamped with format `version` (older files' bodies).
pub fn seal_version(
    version: u32,
    partition: u32,
    partitions: u32,
    round: u64,
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() / 2 + TRAILER_LEN);
    let mut h = header(partition, partitions, round);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&h);
    let mut lz = lz4_flex::frame::FrameEncoder::new(out);
    lz.write_all(body).expect("writing to memory");
    let mut out = lz.finish().expect("writing to memory");
    let t = trailer(crc32fast::hash(&out), out.len() as u64);
    out.extend_from_slice(&t);
    out
}

/// The first bytes of a file: magic, format version, partition, partitions, round.
fn header(partition: u32, partitions: u32, round: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&partition.to_le_bytes());
    h[16..20].copy_from_slice(&partitions.to_le_bytes());
    h[20..].copy_from_slice(&round.to_le_bytes());
    h
}

/// The last bytes of a file: the checksum and length of every byte before
/// them, and the trailer magic.
fn trailer(crc: u32, len: u64) -> [u8; TRAILER_LEN] {
    let mut t = [0u8; TRAILER_LEN];
    t[..4].copy_from_slice(&crc.to_le_bytes());
    t[4..12].copy_from_slice(&len.to_le_bytes());
    t[12..].copy_from_slice(TRAILER_MAGIC);
    t
}

/// Snapshot files in `dir`, newest round first. Leftover `.tmp` files of an
/// interrupted write are removed.
pub fn list(dir: &Path) -> Result<Vec<SnapshotFile>, SnapshotError> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name.ends_with(".snap.tmp") {
            let _ = fs::remove_file(entry.path());
            continue;
        }
        if let Some((round, partition)) = parse_name(&name) {
            out.push(SnapshotFile {
                round,
                partition,
                path: entry.path(),
            });
        }
    }
    out.sort_by(|a, b| b.cmp(a));
    Ok(out)
}

/// Keeps the newest `keep` files of every partition and deletes the rest;
/// returns the rounds still present, newest first. Per partition, not per
/// round: on Kafka a process snapshots only the partitions it owns, and
/// the newest file of a partition it owned long ago still saves replaying
/// that partition's whole history if the group gives it back.
pub fn prune(dir: &Path, keep: usize) -> Result<Vec<u64>, SnapshotError> {
    let files = list(dir)?;
    let mut seen: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    let mut rounds: Vec<u64> = Vec::new();
    for f in &files {
        let n = seen.entry(f.partition).or_default();
        *n += 1;
        if *n > keep {
            fs::remove_file(&f.path).map_err(io_err(&f.path))?;
        } else if rounds.last() != Some(&f.round) {
            rounds.push(f.round);
        }
    }
    Ok(rounds)
}

/// Creates (truncates) `path` readable and writable by the fabric's user
/// only: snapshots hold every row of every entity (encrypted or not).
pub fn create_private(path: &Path) -> std::io::Result<File> {
    let mut open = std::fs::OpenOptions::new();
    open.create(true).write(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        open.mode(0o600);
    }
    open.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EntityKey, Position, Value};

    fn entity(id: i64) -> Arc<Entity> {
        let mut e = Entity::new(EntityKey::new("customer", id.to_string()));
        let mut row = crate::event::Row::new();
        row.insert("id".into(), Value::Int(id));
        row.insert("name".into(), Value::Text(format!("c{id}")));
        std::sync::Arc::make_mut(e.tables.entry("customer".into()).or_default()).insert(
            vec![Value::Int(id)].into(),
            crate::store::StoredRow::pack(&row),
        );
        e.version = 3;
        e.positions.insert("crm".into(), Position::Seq(9));
        Arc::new(e)
    }

    fn meta(round: u64) -> SnapshotMeta {
        let mut checkpoints = Checkpoints::default();
        checkpoints.advance("crm", Position::Seq(9)).unwrap();
        SnapshotMeta {
            partition: 1,
            partitions: 4,
            round,
            bus_offset: 77,
            checkpoints,
            created_micros: 1,
            keystore: None,
            dictionary: Vec::new(),
            key_generation: 0,
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let ents: Vec<_> = (0..100).map(entity).collect();
        let (path, _) = write(dir.path(), &meta(5), &ents, &[], 0, None).unwrap();
        let back = read(&path, None).unwrap();
        assert_eq!(back.meta, meta(5));
        assert_eq!(back.entities.len(), 100);
        assert_eq!(back.entities[7], *ents[7]);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "a snapshot is readable by its owner only");
    }

    #[test]
    fn any_flipped_byte_or_truncation_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let ents: Vec<_> = (0..10).map(entity).collect();
        let (path, _) = write(dir.path(), &meta(1), &ents, &[], 0, None).unwrap();
        let good = fs::read(&path).unwrap();
        for i in (0..good.len()).step_by(7) {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            fs::write(&path, &bad).unwrap();
            assert!(read(&path, None).is_err(), "flip at {i} not detected");
        }
        for cut in [1, 10, good.len() / 2] {
            fs::write(&path, &good[..good.len() - cut]).unwrap();
            assert!(
                read(&path, None).is_err(),
                "truncation by {cut} not detected"
            );
        }
    }

    /// A body with a valid checksum but hostile lengths is refused without
    /// allocating what the lengths ask for.
    #[test]
    fn hostile_lengths_behind_a_good_checksum_are_refused() {
        let p = Path::new("hostile.snap");
        let m = postcard::to_stdvec(&meta(1)).unwrap();
        let mut body = Vec::new();
        body.extend_from_slice(&(m.len() as u64).to_le_bytes());
        body.extend_from_slice(&m);
        let good_meta = body.clone();
        // An entity count of 2^64-1 with one short entity after it.
        body.extend_from_slice(&u64::MAX.to_le_bytes());
        body.extend_from_slice(&u64::MAX.to_le_bytes());
        body.extend_from_slice(b"short");
        let err = decode(p, &seal(1, 4, 1, &body), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ends after 5"), "{err}");
        // A meta length of 2^64-1.
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&m);
        assert!(decode(p, &seal(1, 4, 1, &huge), None).is_err());
        // The good meta and no entities: a sealed body reads back; in
        // format 2, with no floor after the blocked ids.
        let mut empty = good_meta;
        empty.extend_from_slice(&0u64.to_le_bytes());
        empty.extend_from_slice(&0u64.to_le_bytes());
        let v2 = decode(p, &seal_version(2, 1, 4, 1, &empty), None).unwrap();
        assert_eq!((v2.meta, v2.entities.len(), v2.floor), (meta(1), 0, 0));
        empty.extend_from_slice(&5u64.to_le_bytes());
        let back = decode(p, &seal(1, 4, 1, &empty), None).unwrap();
        assert_eq!(back.meta, meta(1));
        assert!(back.entities.is_empty());
        assert_eq!(back.floor, 5);
    }

    fn entity_with(id: i64, secret: &str) -> Arc<Entity> {
        let mut e = (*entity(id)).clone();
        let mut row = crate::event::Row::new();
        row.insert("id".into(), Value::Int(id));
        row.insert("email".into(), Value::Text(secret.into()));
        e.tables.insert(
            "customer".into(),
            Arc::new(crate::store::TableRows::from_iter([(
                vec![Value::Int(id)].into(),
                crate::store::StoredRow::pack(&row),
            )])),
        );
        Arc::new(e)
    }

    #[test]
    fn sealed_files_read_back_keep_no_clear_value_and_lose_an_erased_entity() {
        let dir = tempfile::tempdir().unwrap();
        let keys = KeyStore::open(&dir.path().join("keys"), b"a master key of 16+", 1).unwrap();
        let secret = |i: i64| format!("person-{i}-private@example.com");
        let ents: Vec<_> = (0..20).map(|i| entity_with(i, &secret(i))).collect();
        let mut m = meta(1);
        m.partition = 0;
        let blocked = vec![(EntityKey::new("customer", "99"), 1234)];
        let (path, _) = write(dir.path(), &m, &ents, &blocked, 0, Some(&keys)).unwrap();
        let bytes = fs::read(&path).unwrap();
        assert!(!bytes.windows(14).any(|w| w == &secret(7).as_bytes()[..14]));
        let back = read(&path, Some(&keys)).unwrap();
        assert_eq!(back.meta.keystore, Some(keys.id()));
        assert_eq!(back.entities.len(), 20);
        assert_eq!(back.entities[7], *ents[7]);
        assert_eq!(back.blocked, blocked);
        // Forgotten: its key goes, and this older file no longer yields it.
        assert!(keys.erase(&ents[7].key, 10).unwrap());
        let back = read(&path, Some(&keys)).unwrap();
        assert_eq!((back.entities.len(), back.erased), (19, 1));
        assert!(back.entities.iter().all(|e| e.key != ents[7].key));
        // A key file older than the snapshot (a backup of it put back):
        // refused, not read as if every newer key were forgotten.
        let keys_dir = dir.path().join("keys");
        let back_then = tempfile::tempdir().unwrap();
        for f in fs::read_dir(&keys_dir).unwrap() {
            let f = f.unwrap();
            fs::copy(f.path(), back_then.path().join(f.file_name())).unwrap();
        }
        let mut m2 = meta(2);
        (m2.partition, m2.partitions) = (0, 1);
        let (newer, _) = write(dir.path(), &m2, &ents[..3], &[], 0, Some(&keys)).unwrap();
        assert_eq!(read(&newer, Some(&keys)).unwrap().entities.len(), 3);
        let old_keys = KeyStore::open(back_then.path(), b"a master key of 16+", 1).unwrap();
        let err = read(&newer, Some(&old_keys)).unwrap_err();
        assert!(err.to_string().contains("older copy of the keys"), "{err}");
        // Without the keystore, or with another one: refused whole.
        let err = read(&path, None).unwrap_err();
        assert!(matches!(err, SnapshotError::Keystore { .. }), "{err}");
        let other = KeyStore::open(&dir.path().join("other"), b"a master key of 16+", 4).unwrap();
        let err = read(&path, Some(&other)).unwrap_err();
        assert!(matches!(err, SnapshotError::Keystore { .. }), "{err}");
    }

    #[test]
    fn a_plain_file_keeps_blocked_ids_and_reads_without_a_keystore() {
        let dir = tempfile::tempdir().unwrap();
        let blocked = vec![
            (EntityKey::new("customer", "5"), 1),
            (EntityKey::new("customer", "a/b"), 2),
        ];
        let (path, _) = write(dir.path(), &meta(3), &[entity(1)], &blocked, 7, None).unwrap();
        let back = read(&path, None).unwrap();
        assert_eq!(back.blocked, blocked);
        assert_eq!(back.floor, 7);
        assert_eq!(back.meta.keystore, None);
        assert_eq!(back.entities.len(), 1);
    }

    #[test]
    fn prune_keeps_newest_rounds() {
        let dir = tempfile::tempdir().unwrap();
        for r in 1..=5 {
            write(dir.path(), &meta(r), &[entity(1)], &[], 0, None).unwrap();
        }
        assert_eq!(prune(dir.path(), 2).unwrap(), vec![5, 4]);
        let left: Vec<u64> = list(dir.path()).unwrap().iter().map(|f| f.round).collect();
        assert_eq!(left, vec![5, 4]);
    }

    #[test]
    fn prune_keeps_newest_files_of_each_partition() {
        let dir = tempfile::tempdir().unwrap();
        // Partition 1 in rounds 1..=4, partition 2 (owned earlier) in 1..=2 only.
        for r in 1..=4 {
            write(dir.path(), &meta(r), &[entity(1)], &[], 0, None).unwrap();
        }
        for r in 1..=2 {
            let mut m = meta(r);
            m.partition = 2;
            write(dir.path(), &m, &[entity(2)], &[], 0, None).unwrap();
        }
        prune(dir.path(), 2).unwrap();
        let mut left: Vec<(u32, u64)> = list(dir.path())
            .unwrap()
            .iter()
            .map(|f| (f.partition, f.round))
            .collect();
        left.sort();
        assert_eq!(left, vec![(1, 3), (1, 4), (2, 1), (2, 2)]);
    }
}
