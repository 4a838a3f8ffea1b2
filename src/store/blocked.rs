//! The blocked ids of a fabric on the embedded bus, in a file of their own:
//! `blocked.ids` in the snapshot directory.
//!
//! Snapshot files carry the blocked ids of their partition too, but they
//! rotate: when restore has to fall back to an older file (the newest is
//! corrupt), or finds none it can read and the sources start over, the
//! forgets those files do not hold would be undone by the sources'
//! changes. This file is rewritten (temporary file, fsync, rename,
//! directory fsync) by the applier of every forget and unblock before it is
//! counted applied, and read at start after the snapshots: what it says
//! wins. On the Kafka bus the state topic and the changes topic carry the
//! same, for every process; there is no such file.
//!
//! Layout: magic `EFBLOCK1` | crc32 of the rest u32 | postcard list of
//! (entity key, forgotten at, microseconds).

use crate::event::EntityKey;
use parking_lot::Mutex;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"EFBLOCK1";
pub const FILE: &str = "blocked.ids";

#[derive(Debug, thiserror::Error)]
pub enum BlockedError {
    #[error("blocked ids {path}: i/o error: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("blocked ids {path} are corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// The file, and the lock that orders its writers (every partition's
/// applier writes the whole set).
#[derive(Debug)]
pub struct BlockedFile {
    dir: PathBuf,
    lock: Mutex<()>,
}

impl BlockedFile {
    pub fn new(dir: &Path) -> Self {
        BlockedFile {
            dir: dir.to_path_buf(),
            lock: Mutex::new(()),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// The blocked ids, or `None` when the file does not exist. Blocking.
    pub fn load(&self) -> Result<Option<Vec<(EntityKey, i64)>>, BlockedError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(BlockedError::Io { path, source }),
        };
        let corrupt = |reason: String| BlockedError::Corrupt {
            path: path.clone(),
            reason,
        };
        if bytes.len() < 12 || &bytes[..8] != MAGIC {
            return Err(corrupt("not a blocked-ids file".into()));
        }
        let crc = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if crc32fast::hash(&bytes[12..]) != crc {
            return Err(corrupt("checksum mismatch".into()));
        }
        postcard::from_bytes(&bytes[12..])
            .map(Some)
            .map_err(|e| corrupt(format!("cannot decode: {e}")))
    }

    /// Writes the set `ids()` gives, durably; `ids` is called under the
    /// file's lock, so the last writer writes what every earlier one saw.
    /// Blocking.
    pub fn save(&self, ids: impl FnOnce() -> Vec<(EntityKey, i64)>) -> Result<(), BlockedError> {
        let _guard = self.lock.lock();
        let path = self.path();
        let io = |source| BlockedError::Io {
            path: path.clone(),
            source,
        };
        let body = postcard::to_stdvec(&ids()).map_err(|e| BlockedError::Corrupt {
            path: path.clone(),
            reason: format!("cannot encode: {e}"),
        })?;
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        fs::create_dir_all(&self.dir).map_err(io)?;
        let tmp = path.with_extension("ids.tmp");
        let mut f = super::snapshot::create_private(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, &path).map_err(io)?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_ids_read_back_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = BlockedFile::new(dir.path());
        assert_eq!(f.load().unwrap(), None);
        let ids = vec![(EntityKey::new("customer", "7"), 5)];
        f.save(|| ids.clone()).unwrap();
        assert_eq!(f.load().unwrap(), Some(ids));
        f.save(Vec::new).unwrap();
        assert_eq!(f.load().unwrap(), Some(Vec::new()));
        let mut bytes = fs::read(dir.path().join(FILE)).unwrap();
        bytes.push(1);
        fs::write(dir.path().join(FILE), bytes).unwrap();
        assert!(f.load().is_err());
    }
}
