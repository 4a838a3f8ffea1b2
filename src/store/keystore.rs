//! Per-entity keys for snapshot files at rest (`[snapshot.encryption]`).
//!
//! Every entity's record in a snapshot file is sealed (AES-256-GCM) under a
//! key of its own, made the first time the entity is snapshotted. Forgetting
//! an entity deletes its key, durably, before the forget is answered: every
//! snapshot file written before — the kept rounds, a backup, a copy — can no
//! longer be read for that entity (crypto-shredding), while its other
//! entities read as before.
//!
//! The keys live in their own directory (`keys_dir`), one file per bus
//! partition (`p0007.keys`), each sealed as a whole under a key-encryption
//! key derived from the operator's master key (`key_env` / `key_file`).
//! `keystore.meta` names the keystore (a random id every sealed snapshot
//! file records, so a snapshot is never read against a keystore it was not
//! written with) and proves the master key (a wrong key is refused at
//! start, instead of every entity reading as erased).
//!
//! A key is kept while its entity is in the partition's newest snapshot; a
//! key whose entity left (deleted at its sources) goes at the next round.
//! An older file's record for such an entity is then unreadable, which is
//! what replay expects: falling back to that older file replays the delete.
//! Keys carry a random id, so a record sealed under an older key of the same
//! entity (deleted, then made again) is told apart from a corrupt one.
//!
//! Files are written to a `.tmp`, fsynced, renamed, and the directory
//! fsynced (DESIGN.md invariant 4). A key file is durable before any
//! snapshot file sealed with its keys is renamed into place.

use crate::event::EntityKey;
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use sha2::Sha256;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const META_MAGIC: &[u8; 8] = b"EFKEYS01";
const PART_MAGIC: &[u8; 8] = b"EFKEYP01";
const META_FILE: &str = "keystore.meta";
/// Every key, while a new partition count is being written.
const RESHARD_FILE: &str = "reshard.keys";
/// The partition number `reshard.keys` carries.
const RESHARD_PARTITION: u32 = u32::MAX;
/// What `keystore.meta` seals, to prove the master key.
const CHECK: &[u8] = b"entity-fabric keystore";
/// A master key shorter than this is refused.
pub const MIN_MASTER_BYTES: usize = 16;
/// Bytes a sealed record adds to the entity it holds: key id, nonce, tag.
pub const SEAL_OVERHEAD: usize = 8 + NONCE_LEN + 16;

/// The id every file of one keystore carries.
pub type KeystoreId = [u8; 16];

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("keystore {path}: i/o error: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("keystore {path}: {reason}")]
    Bad { path: PathBuf, reason: String },
    #[error(
        "keystore {path} does not open with this master key (snapshot.encryption.key_env / key_file): \
         a wrong key, or a keystore of another fabric"
    )]
    WrongKey { path: PathBuf },
    #[error("no random bytes: {0}")]
    Random(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn random(buf: &mut [u8]) -> Result<(), KeyError> {
    getrandom::fill(buf).map_err(|e| KeyError::Random(e.to_string()))
}

/// One entity's key.
#[derive(Clone, Copy)]
struct Material {
    /// Random: tells this key from an earlier one of the same entity.
    id: u64,
    key: [u8; 32],
    /// The last snapshot round that sealed the entity with it.
    seen: u64,
}

#[derive(Default)]
struct PartKeys {
    /// Grows by one each time the partition's key file is written: a
    /// sealed snapshot records the generation it was sealed at, so a key
    /// file older than it (restored from an old backup, or lost) is told
    /// apart from keys deleted by forgets.
    generation: u64,
    keys: HashMap<EntityKey, Material>,
    /// Entities forgotten here, with the bus offset of the forget: a
    /// capture taken below that offset (written after the forget) leaves
    /// them out instead of sealing them under a new key.
    erased: HashMap<EntityKey, u64>,
}

/// What a key file holds.
struct KeyFile {
    partitions: u32,
    generation: u64,
    keys: Vec<(EntityKey, u64, [u8; 32])>,
}

/// The per-entity keys of one snapshot directory.
pub struct KeyStore {
    dir: PathBuf,
    kek: LessSafeKey,
    id: KeystoreId,
    partitions: u32,
    parts: Vec<Mutex<PartKeys>>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("dir", &self.dir)
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

/// HKDF-SHA256 (RFC 5869) of the master key: the key-encryption key.
fn derive_kek(master: &[u8]) -> LessSafeKey {
    let mut extract =
        <Hmac<Sha256> as Mac>::new_from_slice(b"entity-fabric/keystore").expect("any length");
    extract.update(master);
    let prk = extract.finalize().into_bytes();
    let mut expand = <Hmac<Sha256> as Mac>::new_from_slice(&prk).expect("any length");
    expand.update(b"key-encryption key v1");
    expand.update(&[1]);
    let okm = expand.finalize().into_bytes();
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &okm).expect("a 32-byte key"))
}

/// Seals `plain` under `key`: nonce, then ciphertext and tag.
fn seal(key: &LessSafeKey, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, KeyError> {
    let mut nonce = [0u8; NONCE_LEN];
    random(&mut nonce)?;
    let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + 16);
    seal_into(key, nonce, aad, plain, &mut out)?;
    Ok(out)
}

/// Appends `plain` sealed under `key` with `nonce` to `out`: nonce, then
/// ciphertext and tag.
fn seal_into(
    key: &LessSafeKey,
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    plain: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), KeyError> {
    out.extend_from_slice(&nonce);
    let at = out.len();
    out.extend_from_slice(plain);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[at..],
        )
        .map_err(|_| KeyError::Random("sealing failed".into()))?;
    out.extend_from_slice(tag.as_ref());
    Ok(())
}

/// Opens what [`seal`] made; `None` when it does not open (wrong key,
/// other associated data, or altered bytes).
fn open(key: &LessSafeKey, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < NONCE_LEN + 16 {
        return None;
    }
    let nonce = Nonce::try_assume_unique_for_key(&sealed[..NONCE_LEN]).ok()?;
    let mut body = sealed[NONCE_LEN..].to_vec();
    let n = key
        .open_in_place(nonce, Aad::from(aad), &mut body)
        .ok()?
        .len();
    body.truncate(n);
    Some(body)
}

/// Writes `bytes` to `path` durably (tmp, fsync, rename, fsync dir), mode 0600.
fn write_durably(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn part_file(partition: u32) -> String {
    format!("p{partition:04}.keys")
}

impl KeyStore {
    /// Opens the keystore in `dir` under `master`, creating it when the
    /// directory holds none; every partition file is read and checked.
    /// Blocking.
    pub fn open(dir: &Path, master: &[u8], partitions: u32) -> Result<KeyStore, KeyError> {
        Self::open_or_create(dir, master, partitions, None)
    }

    /// As [`KeyStore::open`], a keystore made here getting `id` instead of
    /// a random one: for tools and the fuzz target, whose inputs must name
    /// a keystore they can know.
    pub fn open_with_id(
        dir: &Path,
        master: &[u8],
        partitions: u32,
        id: KeystoreId,
    ) -> Result<KeyStore, KeyError> {
        Self::open_or_create(dir, master, partitions, Some(id))
    }

    fn open_or_create(
        dir: &Path,
        master: &[u8],
        partitions: u32,
        new_id: Option<KeystoreId>,
    ) -> Result<KeyStore, KeyError> {
        if master.len() < MIN_MASTER_BYTES {
            return Err(KeyError::Bad {
                path: dir.to_path_buf(),
                reason: format!(
                    "the master key has {} bytes; it needs at least {MIN_MASTER_BYTES}",
                    master.len()
                ),
            });
        }
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let kek = derive_kek(master);
        let meta_path = dir.join(META_FILE);
        let files = Self::part_files(dir)?;
        let id = match fs::read(&meta_path) {
            Ok(bytes) => Self::read_meta(&meta_path, &kek, &bytes)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !files.is_empty() {
                    return Err(KeyError::Bad {
                        path: meta_path,
                        reason: "is missing while key files are there: restore it from where the \
                                 key files came from"
                            .into(),
                    });
                }
                let id = match new_id {
                    Some(id) => id,
                    None => {
                        let mut id = [0u8; 16];
                        random(&mut id)?;
                        id
                    }
                };
                let mut bytes = META_MAGIC.to_vec();
                bytes.extend_from_slice(&id);
                let aad = bytes.clone();
                bytes.extend_from_slice(&seal(&kek, &aad, CHECK)?);
                write_durably(dir, &meta_path, &bytes)?;
                tracing::info!(dir = %dir.display(), "snapshot keystore created");
                id
            }
            Err(e) => return Err(io_err(&meta_path)(e)),
        };
        let ks = KeyStore {
            dir: dir.to_path_buf(),
            kek,
            id,
            partitions: partitions.max(1),
            parts: (0..partitions.max(1))
                .map(|_| Mutex::new(PartKeys::default()))
                .collect(),
        };
        // A new partition count: the keys are written again under it. The
        // whole set goes to `reshard.keys` first, so a crash while the
        // partition files are rewritten (each losing keys another gains)
        // loses none: the next open reads it too and finishes the job.
        let reshard_path = dir.join(RESHARD_FILE);
        let mut resharded = false;
        let mut newest = 0;
        let mut read = |path: &Path, partition: u32| -> Result<(), KeyError> {
            let bytes = fs::read(path).map_err(io_err(path))?;
            let f = ks.read_part(path, partition, &bytes)?;
            resharded |= f.partitions != ks.partitions || partition == RESHARD_PARTITION;
            newest = newest.max(f.generation);
            if f.partitions == ks.partitions && partition != RESHARD_PARTITION {
                ks.parts[partition as usize].lock().generation = f.generation;
            }
            for (key, id, k) in f.keys {
                let m = Material {
                    id,
                    key: k,
                    seen: 0,
                };
                ks.parts[key.partition(ks.partitions) as usize]
                    .lock()
                    .keys
                    .insert(key, m);
            }
            Ok(())
        };
        for (p, path) in &files {
            read(path, *p)?;
        }
        if reshard_path.exists() {
            read(&reshard_path, RESHARD_PARTITION)?;
        }
        if resharded {
            let mut all = PartKeys {
                generation: newest,
                ..PartKeys::default()
            };
            for part in &ks.parts {
                all.keys
                    .extend(part.lock().keys.iter().map(|(k, m)| (k.clone(), *m)));
            }
            ks.save_as(&reshard_path, RESHARD_PARTITION, &mut all)?;
            for p in 0..ks.partitions {
                let mut part = ks.parts[p as usize].lock();
                part.generation = newest;
                ks.save(p, &mut part)?;
            }
            for (p, path) in files {
                if p >= ks.partitions {
                    fs::remove_file(&path).map_err(io_err(&path))?;
                }
            }
            fs::remove_file(&reshard_path).map_err(io_err(&reshard_path))?;
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(dir))?;
        }
        Ok(ks)
    }

    /// The generation of partition `p`'s key file (0: never written).
    pub fn generation(&self, p: u32) -> u64 {
        self.parts
            .get(p as usize)
            .map_or(0, |part| part.lock().generation)
    }

    /// The partition count the keys are kept under.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The id sealed snapshot files of this keystore record.
    pub fn id(&self) -> KeystoreId {
        self.id
    }

    /// Keys held, all partitions.
    pub fn len(&self) -> usize {
        self.parts.iter().map(|p| p.lock().keys.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn part_files(dir: &Path) -> Result<Vec<(u32, PathBuf)>, KeyError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
                continue;
            }
            if let Some(p) = name
                .strip_prefix('p')
                .and_then(|r| r.strip_suffix(".keys"))
                .and_then(|n| n.parse().ok())
            {
                out.push((p, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    fn read_meta(path: &Path, kek: &LessSafeKey, bytes: &[u8]) -> Result<KeystoreId, KeyError> {
        let bad = |reason: &str| KeyError::Bad {
            path: path.to_path_buf(),
            reason: reason.into(),
        };
        if bytes.len() < 24 || &bytes[..8] != META_MAGIC {
            return Err(bad("is not a keystore file"));
        }
        let id: KeystoreId = bytes[8..24].try_into().expect("16 bytes");
        match open(kek, &bytes[..24], &bytes[24..]) {
            Some(check) if check == CHECK => Ok(id),
            _ => Err(KeyError::WrongKey {
                path: path.to_path_buf(),
            }),
        }
    }

    /// A key file: its partition count, generation and keys.
    fn read_part(&self, path: &Path, partition: u32, bytes: &[u8]) -> Result<KeyFile, KeyError> {
        let bad = |reason: String| KeyError::Bad {
            path: path.to_path_buf(),
            reason,
        };
        const HEADER: usize = 8 + 16 + 4 + 4 + 8;
        if bytes.len() < HEADER || &bytes[..8] != PART_MAGIC {
            return Err(bad("is not a key file".into()));
        }
        if bytes[8..24] != self.id {
            return Err(bad("belongs to another keystore".into()));
        }
        let p = u32::from_le_bytes(bytes[24..28].try_into().expect("4 bytes"));
        let partitions = u32::from_le_bytes(bytes[28..32].try_into().expect("4 bytes"));
        let generation = u64::from_le_bytes(bytes[32..40].try_into().expect("8 bytes"));
        if p != partition {
            return Err(bad(format!("holds partition {p}, not {partition}")));
        }
        let plain = open(&self.kek, &bytes[..HEADER], &bytes[HEADER..]).ok_or_else(|| {
            bad("does not open: altered, or written under another master key".into())
        })?;
        let keys: Vec<(EntityKey, u64, [u8; 32])> =
            postcard::from_bytes(&plain).map_err(|e| bad(format!("keys do not decode: {e}")))?;
        Ok(KeyFile {
            partitions,
            generation,
            keys,
        })
    }

    /// Writes partition `p`'s keys durably, as its next generation.
    fn save(&self, p: u32, part: &mut PartKeys) -> Result<(), KeyError> {
        self.save_as(&self.dir.join(part_file(p)), p, part)
    }

    fn save_as(&self, path: &Path, p: u32, part: &mut PartKeys) -> Result<(), KeyError> {
        part.generation += 1;
        let entries: Vec<(&EntityKey, u64, &[u8; 32])> =
            part.keys.iter().map(|(k, m)| (k, m.id, &m.key)).collect();
        let plain = postcard::to_stdvec(&entries).map_err(|e| KeyError::Bad {
            path: path.to_path_buf(),
            reason: format!("cannot encode: {e}"),
        })?;
        let mut bytes = PART_MAGIC.to_vec();
        bytes.extend_from_slice(&self.id);
        bytes.extend_from_slice(&p.to_le_bytes());
        bytes.extend_from_slice(&self.partitions.to_le_bytes());
        bytes.extend_from_slice(&part.generation.to_le_bytes());
        let aad = bytes.clone();
        bytes.extend_from_slice(&seal(&self.kek, &aad, &plain)?);
        write_durably(&self.dir, path, &bytes)
    }

    fn part(&self, key: &EntityKey) -> (u32, &Mutex<PartKeys>) {
        let p = key.partition(self.partitions);
        (p, &self.parts[p as usize])
    }

    /// Deletes `key`'s key durably (its entity was forgotten by the record
    /// at bus `offset`); true when there was one. Blocking.
    pub fn erase(&self, key: &EntityKey, offset: u64) -> Result<bool, KeyError> {
        let (p, part) = self.part(key);
        let mut part = part.lock();
        part.erased.insert(key.clone(), offset);
        let had = part.keys.remove(key).is_some();
        if had {
            self.save(p, &mut part)?;
        }
        Ok(had)
    }

    /// Deletes the keys of `keys` that are held (blocked ids met at a
    /// restore: their forget may have been applied by another process, or
    /// before a crash that came before its key went). Blocking.
    pub fn drop_keys<'a>(
        &self,
        keys: impl Iterator<Item = &'a EntityKey>,
    ) -> Result<usize, KeyError> {
        let mut by_part: HashMap<u32, Vec<&EntityKey>> = HashMap::new();
        for k in keys {
            by_part
                .entry(k.partition(self.partitions))
                .or_default()
                .push(k);
        }
        let mut n = 0;
        for (p, keys) in by_part {
            let mut part = self.parts[p as usize].lock();
            let before = part.keys.len();
            for k in keys {
                part.keys.remove(k);
            }
            if part.keys.len() != before {
                n += before - part.keys.len();
                self.save(p, &mut part)?;
            }
        }
        Ok(n)
    }

    /// Makes ready to seal the entities `keys` of one partition's capture
    /// (taken at bus `offset`, for snapshot `round`): each gets its key,
    /// made now when new, or `None` when it was forgotten after the capture
    /// (left out of the file). Keys of entities no longer captured go. The
    /// partition's key file is durable when this returns. Blocking.
    pub fn prepare<'a>(
        &self,
        partition: u32,
        keys: impl Iterator<Item = &'a EntityKey>,
        offset: u64,
        round: u64,
    ) -> Result<Prepared, KeyError> {
        let mut part = self.parts[(partition % self.partitions) as usize].lock();
        let mut dirty = false;
        let mut fresh = Vec::new();
        let mut out = Vec::new();
        for key in keys {
            if let Some(m) = part.keys.get_mut(key) {
                m.seen = round;
                out.push(Some((m.id, m.key)));
                continue;
            }
            if part.erased.get(key).is_some_and(|at| *at >= offset) {
                out.push(None);
                continue;
            }
            if fresh.is_empty() {
                // Random bytes for up to 1024 keys at a time.
                fresh = vec![0u8; 40 * 1024];
                random(&mut fresh)?;
            }
            let bytes = fresh.split_off(fresh.len() - 40);
            let m = Material {
                id: u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")),
                key: bytes[8..].try_into().expect("32 bytes"),
                seen: round,
            };
            part.keys.insert(key.clone(), m);
            out.push(Some((m.id, m.key)));
            dirty = true;
        }
        let before = part.keys.len();
        part.keys.retain(|_, m| m.seen == round);
        dirty |= part.keys.len() != before;
        // Captures from here on are at or past these forgets.
        part.erased.retain(|_, at| *at >= offset);
        if dirty {
            self.save(partition % self.partitions, &mut part)?;
        }
        Ok(Prepared {
            keys: out,
            nonces: Vec::new(),
            generation: part.generation,
        })
    }

    /// Opens one sealed record of entity `key`; `aad` ends with the key id
    /// the record was sealed under.
    pub fn unseal(&self, key: &EntityKey, aad: &[u8], sealed: &[u8]) -> Unsealed {
        let Some(key_id) = aad
            .len()
            .checked_sub(8)
            .map(|at| u64::from_le_bytes(aad[at..].try_into().expect("8 bytes")))
        else {
            return Unsealed::Altered;
        };
        let material = self.part(key).1.lock().keys.get(key).copied();
        let Some(m) = material.filter(|m| m.id == key_id) else {
            return Unsealed::KeyGone;
        };
        let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &m.key).expect("a 32-byte key"));
        match open(&k, aad, sealed) {
            Some(plain) => Unsealed::Open(plain),
            None => Unsealed::Altered,
        }
    }
}

/// What [`KeyStore::unseal`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Unsealed {
    /// The record's plain bytes.
    Open(Vec<u8>),
    /// Its key is gone: the entity was forgotten (or deleted, and its key
    /// let go).
    KeyGone,
    /// It does not open under its key: altered bytes.
    Altered,
}

/// The keys one snapshot file is sealed with, in capture order.
pub struct Prepared {
    keys: Vec<Option<(u64, [u8; 32])>>,
    /// Random nonces not used yet, drawn from the OS 1024 at a time (one
    /// system call per record cost a tenth of a sealed round).
    nonces: Vec<u8>,
    /// The generation of the partition's key file these keys are in.
    pub generation: u64,
}

impl Prepared {
    /// Entities that go into the file.
    pub fn count(&self) -> usize {
        self.keys.iter().filter(|k| k.is_some()).count()
    }

    /// The key id of capture entry `i`, or `None` when it is left out.
    pub fn key_id(&self, i: usize) -> Option<u64> {
        self.keys.get(i).copied().flatten().map(|(id, _)| id)
    }

    /// Seals entry `i`'s `plain` bytes with `aad` (which ends with its key
    /// id), appending nonce, ciphertext and tag to `out`. Every nonce is
    /// random (96 bits): a key seals its entity once per round, far from
    /// the 2^32 messages a random-nonce key may seal.
    pub fn seal_into(
        &mut self,
        i: usize,
        aad: &[u8],
        plain: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), KeyError> {
        let (_, key) = self.keys[i].expect("a sealed entry has a key");
        if self.nonces.len() < NONCE_LEN {
            self.nonces = vec![0u8; NONCE_LEN * 1024];
            random(&mut self.nonces)?;
        }
        let at = self.nonces.len() - NONCE_LEN;
        let nonce: [u8; NONCE_LEN] = self.nonces[at..].try_into().expect("a nonce");
        self.nonces.truncate(at);
        let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).expect("a 32-byte key"));
        seal_into(&k, nonce, aad, plain, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(id: &str) -> EntityKey {
        EntityKey::new("customer", id)
    }

    #[test]
    fn keys_survive_reopening_and_a_wrong_master_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let master = b"0123456789abcdef0123";
        let ks = KeyStore::open(dir.path(), master, 4).unwrap();
        let keys = [k("1"), k("2")];
        let prep = ks
            .prepare(keys[0].partition(4), keys[..1].iter(), 10, 1)
            .unwrap();
        let aad = [b"x".as_slice(), &prep.key_id(0).unwrap().to_le_bytes()].concat();
        let mut prep = prep;
        let mut sealed = Vec::new();
        prep.seal_into(0, &aad, b"secret", &mut sealed).unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        let again = KeyStore::open(dir.path(), master, 4).unwrap();
        assert_eq!(again.id(), ks.id());
        assert_eq!(
            again.unseal(&keys[0], &aad, &sealed),
            Unsealed::Open(b"secret".to_vec())
        );
        // Altered bytes do not open; a key that is not there reads as gone.
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(again.unseal(&keys[0], &aad, &bad), Unsealed::Altered);
        assert_eq!(again.unseal(&keys[1], &aad, &sealed), Unsealed::KeyGone);
        let err = KeyStore::open(dir.path(), b"another key, long enough", 4).unwrap_err();
        assert!(matches!(err, KeyError::WrongKey { .. }), "{err}");
    }

    #[test]
    fn an_erased_key_is_gone_from_disk_and_later_captures_leave_the_entity_out() {
        let dir = tempfile::tempdir().unwrap();
        let master = b"0123456789abcdef";
        let ks = KeyStore::open(dir.path(), master, 1).unwrap();
        let keys = [k("1"), k("2")];
        let prep = ks.prepare(0, keys.iter(), 5, 1).unwrap();
        let aad = [b"a".as_slice(), &prep.key_id(0).unwrap().to_le_bytes()].concat();
        let mut prep = prep;
        let mut sealed = Vec::new();
        prep.seal_into(0, &aad, b"one", &mut sealed).unwrap();
        assert!(ks.erase(&keys[0], 9).unwrap());
        // Reopened from disk: the key is not there.
        let again = KeyStore::open(dir.path(), master, 1).unwrap();
        assert_eq!(again.unseal(&keys[0], &aad, &sealed), Unsealed::KeyGone);
        assert_eq!(again.len(), 1);
        // A capture taken before the forget (written after it) leaves it out.
        let prep = ks.prepare(0, keys.iter(), 8, 2).unwrap();
        assert_eq!(prep.count(), 1);
        assert_eq!(prep.key_id(0), None);
        // So does one taken at its offset (it reflects what is below it).
        let prep = ks.prepare(0, keys.iter(), 9, 3).unwrap();
        assert_eq!(prep.count(), 1);
        // One after it (the entity built again since): a new key.
        let prep = ks.prepare(0, keys.iter(), 10, 4).unwrap();
        assert_eq!(prep.count(), 2);
    }

    #[test]
    fn keys_of_entities_no_longer_captured_go_and_a_new_key_is_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let ks = KeyStore::open(dir.path(), b"0123456789abcdef", 1).unwrap();
        let one = [k("1")];
        let prep = ks.prepare(0, one.iter(), 1, 1).unwrap();
        let old_id = prep.key_id(0).unwrap();
        let aad = [b"a".as_slice(), &old_id.to_le_bytes()].concat();
        let mut prep = prep;
        let mut sealed = Vec::new();
        prep.seal_into(0, &aad, b"v1", &mut sealed).unwrap();
        ks.prepare(0, [].iter(), 2, 2).unwrap();
        assert!(ks.is_empty());
        let prep = ks.prepare(0, one.iter(), 3, 3).unwrap();
        assert_ne!(prep.key_id(0), Some(old_id));
        // The old record reads as gone, not as corrupt.
        assert_eq!(ks.unseal(&one[0], &aad, &sealed), Unsealed::KeyGone);
    }

    #[test]
    fn a_new_partition_count_redistributes_the_keys() {
        let dir = tempfile::tempdir().unwrap();
        let master = b"0123456789abcdef";
        let ks = KeyStore::open(dir.path(), master, 1).unwrap();
        let keys: Vec<EntityKey> = (0..50).map(|i| k(&i.to_string())).collect();
        let prep = ks.prepare(0, keys.iter(), 1, 1).unwrap();
        let ids: Vec<u64> = (0..50).map(|i| prep.key_id(i).unwrap()).collect();
        let ks = KeyStore::open(dir.path(), master, 4).unwrap();
        assert_eq!(ks.len(), 50);
        for (key, id) in keys.iter().zip(ids) {
            let aad = [b"a".as_slice(), &id.to_le_bytes()].concat();
            // The right key id is found (it opens nothing, but is not "gone").
            assert_eq!(ks.unseal(key, &aad, &[0u8; 40]), Unsealed::Altered);
        }
        let files = KeyStore::part_files(dir.path()).unwrap();
        assert_eq!(files.len(), 4);
    }

    #[test]
    fn a_crash_while_resharding_loses_no_key() {
        let dir = tempfile::tempdir().unwrap();
        let master = b"0123456789abcdef";
        let ks = KeyStore::open(dir.path(), master, 1).unwrap();
        let keys: Vec<EntityKey> = (0..50).map(|i| k(&i.to_string())).collect();
        ks.prepare(0, keys.iter(), 1, 1).unwrap();
        let generation = ks.generation(0);
        assert!(generation >= 1);
        // As a reshard leaves things when it stops after `reshard.keys` and
        // a partition file that lost keys to partitions not yet written.
        let mut all = PartKeys {
            keys: ks.parts[0].lock().keys.clone(),
            ..PartKeys::default()
        };
        ks.save_as(&dir.path().join(RESHARD_FILE), RESHARD_PARTITION, &mut all)
            .unwrap();
        ks.parts[0].lock().keys.retain(|k, _| k.id.len() > 1);
        ks.save(0, &mut ks.parts[0].lock()).unwrap();
        drop(ks);
        let ks = KeyStore::open(dir.path(), master, 4).unwrap();
        assert_eq!(ks.len(), 50);
        assert!(!dir.path().join(RESHARD_FILE).exists());
        assert!((0..4).all(|p| ks.generation(p) > generation));
        let again = KeyStore::open(dir.path(), master, 4).unwrap();
        assert_eq!(again.len(), 50);
    }

    #[test]
    fn a_short_master_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = KeyStore::open(dir.path(), b"short", 1).unwrap_err();
        assert!(err.to_string().contains("at least 16"), "{err}");
    }
}
