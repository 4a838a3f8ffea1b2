//! Views: the named projections readers ask for, applied on the way out.
//!
//! A view picks tables and columns of an entity and masks some columns
//! (`hash`: HMAC-SHA256 hex of the value's text under the fabric's masking
//! key, joinable but unreadable; `redact`: `"***"`; `null`; `keep_last:N`:
//! `"***"` and the last N characters). The same code serves gRPC, the
//! entities topic and the CLI's JSON, so a masked column leaves the
//! process masked whichever way it goes.

use crate::config::{Config, EntityConfig, Mask};
use crate::event::Value;
use crate::proto;
use crate::store::{Entity, ValueRef};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// The secret key of the `hash` mask.
#[derive(Clone)]
pub struct MaskKey(Arc<Hmac<Sha256>>);

impl std::fmt::Debug for MaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MaskKey(…)")
    }
}

/// A key shorter than this is refused.
const MIN_KEY_BYTES: usize = 16;

impl MaskKey {
    pub fn new(secret: &[u8]) -> MaskKey {
        MaskKey(Arc::new(
            Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length"),
        ))
    }

    /// The hex HMAC-SHA256 of `text`.
    pub fn hash(&self, text: &[u8]) -> String {
        let mut mac = (*self.0).clone();
        mac.update(text);
        hex::encode(mac.finalize().into_bytes())
    }

    /// The key `config` names (`[masking]`), or `None` when no view of it
    /// hashes. The default key file is created on first use.
    pub fn load(config: &Config) -> anyhow::Result<Option<MaskKey>> {
        if !config.hashes() {
            return Ok(None);
        }
        let m = &config.masking;
        let secret = config.secret(
            "masking",
            m.key_env.as_deref(),
            m.key_file.as_deref(),
            &config.resolve(&config.snapshot.dir).join("mask.key"),
        )?;
        anyhow::ensure!(
            secret.len() >= MIN_KEY_BYTES,
            "the masking key has {} bytes; it needs at least {MIN_KEY_BYTES}",
            secret.len()
        );
        Ok(Some(MaskKey::new(&secret)))
    }
}

/// A value as a view shows it: the stored one, or what its mask made.
pub(crate) enum Shown<'a> {
    As(ValueRef<'a>),
    Masked(Value),
}

impl Shown<'_> {
    pub(crate) fn get(&self) -> ValueRef<'_> {
        match self {
            Shown::As(v) => *v,
            Shown::Masked(v) => v.as_value_ref(),
        }
    }
}

/// A compiled view.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub name: String,
    /// This view's slot in an entity's encoding cache (0 is the full entity).
    pub slot: usize,
    /// The slots of its entity type's cache (its views and the full entity),
    /// and the epoch of the [`Views`] it was compiled in: an encoding made
    /// through this view is cached under that epoch only, so a call that
    /// began before a reload never fills the new views' cache.
    pub slots: usize,
    pub epoch: u64,
    /// Tables shown (None: all).
    tables: Option<HashSet<String>>,
    /// Per table, the columns shown (a table absent here shows all).
    columns: HashMap<String, HashSet<String>>,
    masks: HashMap<(String, String), Mask>,
    /// The key of `hash` masks (present whenever a mask hashes).
    key: Option<MaskKey>,
}

impl View {
    /// Every view of an entity type, by name.
    pub fn compile_all(e: &EntityConfig, key: Option<&MaskKey>) -> HashMap<String, View> {
        Self::compile_epoch(e, key, 0)
    }

    fn compile_epoch(e: &EntityConfig, key: Option<&MaskKey>, epoch: u64) -> HashMap<String, View> {
        let slots = e.views.len() + 1;
        e.views
            .iter()
            .enumerate()
            .map(|(i, (name, v))| {
                let mut columns: HashMap<String, HashSet<String>> = HashMap::new();
                for c in &v.columns {
                    if let Some((t, col)) = c.split_once('.') {
                        columns.entry(t.into()).or_default().insert(col.into());
                    }
                }
                let masks = v
                    .mask
                    .iter()
                    .filter_map(|(c, m)| {
                        c.split_once('.')
                            .map(|(t, col)| ((t.to_string(), col.to_string()), *m))
                    })
                    .collect();
                (
                    name.clone(),
                    View {
                        name: name.clone(),
                        slot: i + 1,
                        slots,
                        epoch,
                        tables: Some(v.tables.iter().cloned().collect()),
                        columns,
                        masks,
                        key: key.cloned(),
                    },
                )
            })
            .collect()
    }

    pub(crate) fn shows_table(&self, t: &str) -> bool {
        self.tables.as_ref().is_none_or(|s| s.contains(t))
    }

    pub(crate) fn shows_column(&self, t: &str, c: &str) -> bool {
        self.columns.get(t).is_none_or(|s| s.contains(c))
    }

    /// `v` as this view shows column `c` of table `t`: borrowed unless masked.
    pub(crate) fn masked<'a>(&self, t: &str, c: &str, v: ValueRef<'a>) -> Shown<'a> {
        if self.masks.is_empty() {
            return Shown::As(v);
        }
        Shown::Masked(match self.masks.get(&(t.to_string(), c.to_string())) {
            None => return Shown::As(v),
            Some(_) if v == ValueRef::Null => Value::Null,
            Some(Mask::Null) => Value::Null,
            Some(Mask::Redact) => Value::Text("***".into()),
            Some(Mask::Hash) => {
                let key = self.key.as_ref().expect("a view that hashes has a key");
                Value::Text(key.hash(text_of(v).as_bytes()))
            }
            Some(Mask::KeepLast(n)) => {
                let text = text_of(v);
                let n = *n as usize;
                let chars = text.chars().count();
                if chars <= n {
                    Value::Text("***".into())
                } else {
                    let tail: String = text.chars().skip(chars - n).collect();
                    Value::Text(format!("***{tail}"))
                }
            }
        })
    }
}

/// The text a mask works on: a text as it is, anything else as printed.
fn text_of(v: ValueRef<'_>) -> Cow<'_, str> {
    match v {
        ValueRef::Text(s) => Cow::Borrowed(s),
        other => Cow::Owned(other.to_owned().to_string()),
    }
}

/// The encoded `fabric.v1.Entity` through `view`, made once per entity
/// version and view when `cache` is on. `views` is how many views the type
/// has, `epoch` the [`Views`] they belong to.
pub fn encoded(
    e: &Entity,
    view: Option<&View>,
    views: usize,
    epoch: u64,
    cache: bool,
) -> bytes::Bytes {
    let encode = || bytes::Bytes::from(crate::grpc::encode::entity(e, view));
    if !cache {
        return encode();
    }
    let (slot, slots, epoch) = view.map_or((0, views + 1, epoch), |v| (v.slot, v.slots, v.epoch));
    e.encoded.get_or_init(epoch, slot, slots, encode)
}

/// Every entity type's compiled views, as one config made them. A reload
/// that changes views swaps in a new `Views` with the next `epoch`, so that
/// encodings cached under the old views are never served again.
#[derive(Debug, Default)]
pub struct Views {
    pub epoch: u64,
    types: HashMap<String, HashMap<String, Arc<View>>>,
}

impl Views {
    /// The views of every entity type of `config`.
    pub fn compile(config: &crate::config::Config, key: Option<&MaskKey>, epoch: u64) -> Views {
        Views {
            epoch,
            types: config
                .entities
                .iter()
                .map(|e| {
                    let views = View::compile_epoch(e, key, epoch)
                        .into_iter()
                        .map(|(n, v)| (n, Arc::new(v)))
                        .collect();
                    (e.name.clone(), views)
                })
                .collect(),
        }
    }

    /// The views of `entity_type`.
    pub fn of(&self, entity_type: &str) -> Option<&HashMap<String, Arc<View>>> {
        self.types.get(entity_type)
    }

    /// View `name` of `entity_type`.
    pub fn get(&self, entity_type: &str, name: &str) -> Option<Arc<View>> {
        self.types.get(entity_type)?.get(name).cloned()
    }

    /// How many views `entity_type` has.
    pub fn count(&self, entity_type: &str) -> usize {
        self.types.get(entity_type).map_or(0, |v| v.len())
    }
}

/// The entity as protobuf, through `view` (None: everything).
pub fn to_proto(e: &Entity, view: Option<&View>) -> proto::Entity {
    let full = View::default();
    let v = view.unwrap_or(&full);
    proto::Entity {
        r#type: e.key.entity_type.to_string(),
        id: e.key.id.to_string(),
        version: e.version,
        tables: e
            .tables
            .iter()
            .filter(|(t, _)| v.shows_table(t))
            .map(|(t, rows)| proto::Table {
                name: t.to_string(),
                rows: rows
                    .values()
                    .map(|row| proto::Row {
                        columns: row
                            .iter()
                            .filter(|(c, _)| v.shows_column(t, c))
                            .map(|(c, val)| {
                                (c.to_string(), value_to_proto(v.masked(t, c, val).get()))
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect(),
        positions: e
            .positions
            .iter()
            .map(|(s, p)| proto::SourcePosition {
                source: s.to_string(),
                position: p.to_string(),
            })
            .collect(),
        updated_at_micros: e.updated_micros,
        view: view.map(|v| v.name.clone()).unwrap_or_default(),
    }
}

/// The entity as a JSON document, through `view`.
pub fn to_json(e: &Entity, view: Option<&View>) -> serde_json::Value {
    let full = View::default();
    let v = view.unwrap_or(&full);
    let tables: serde_json::Map<String, serde_json::Value> = e
        .tables
        .iter()
        .filter(|(t, _)| v.shows_table(t))
        .map(|(t, rows)| {
            let rows: Vec<serde_json::Value> = rows
                .values()
                .map(|row| {
                    serde_json::Value::Object(
                        row.iter()
                            .filter(|(c, _)| v.shows_column(t, c))
                            .map(|(c, val)| {
                                (
                                    c.to_string(),
                                    v.masked(t, c, val).get().to_owned().to_json(),
                                )
                            })
                            .collect(),
                    )
                })
                .collect();
            (t.to_string(), serde_json::Value::Array(rows))
        })
        .collect();
    serde_json::json!({
        "type": &*e.key.entity_type,
        "id": &*e.key.id,
        "version": e.version,
        "updated_at": crate::event::value::format_timestamp(e.updated_micros),
        "positions": e.positions.iter().map(|(s, p)| (s.to_string(), serde_json::Value::String(p.to_string()))).collect::<serde_json::Map<_, _>>(),
        "tables": tables,
    })
}

pub fn value_to_proto(v: ValueRef<'_>) -> proto::Value {
    use proto::value::Kind;
    let kind = match v {
        ValueRef::Null => Kind::Null(true),
        ValueRef::Bool(b) => Kind::Bool(b),
        ValueRef::Int(i) => Kind::Int(i),
        ValueRef::Float(f) => Kind::Float(f),
        ValueRef::Decimal(s) => Kind::Decimal(s.to_string()),
        ValueRef::Text(s) => Kind::Text(s.to_string()),
        ValueRef::Bytes(b) => Kind::Bytes(b.to_vec()),
        ValueRef::Timestamp(t) => Kind::TimestampMicros(t),
        ValueRef::Date(d) => Kind::DateDays(d),
        ValueRef::Uuid(u) => Kind::Uuid(uuid::Uuid::from_bytes(u).hyphenated().to_string()),
        ValueRef::Json(s) => Kind::Json(s.to_string()),
    };
    proto::Value { kind: Some(kind) }
}

/// A protobuf value as a fabric value; a bad UUID is an error naming it.
pub fn value_from_proto(v: &proto::Value) -> Result<Value, String> {
    value_of_proto(v.clone())
}

/// As [`value_from_proto`], taking the value (its text moves, not copied).
pub fn value_of_proto(v: proto::Value) -> Result<Value, String> {
    use proto::value::Kind;
    Ok(match v.kind {
        None | Some(Kind::Null(_)) => Value::Null,
        Some(Kind::Bool(b)) => Value::Bool(b),
        Some(Kind::Int(i)) => Value::Int(i),
        Some(Kind::Float(f)) => Value::Float(f),
        Some(Kind::Decimal(s)) => Value::Decimal(s),
        Some(Kind::Text(s)) => Value::Text(s),
        Some(Kind::Bytes(b)) => Value::Bytes(b),
        Some(Kind::TimestampMicros(t)) => Value::Timestamp(t),
        Some(Kind::DateDays(d)) => Value::Date(d),
        Some(Kind::Uuid(s)) => Value::Uuid(
            *uuid::Uuid::parse_str(&s)
                .map_err(|_| format!("{s:?} is not a uuid"))?
                .as_bytes(),
        ),
        Some(Kind::Json(s)) => Value::Json(s),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::event::EntityKey;

    #[test]
    fn view_projects_and_masks() {
        let cfg = Config::from_toml(
            std::path::Path::new("t.toml"),
            r#"
[[sources]]
name = "s"
kind = "grpc_push"
[[entities]]
name = "customer"
  [[entities.tables]]
  name = "customer"
  source = "s"
  from = "c"
  id_column = "id"
  primary_key = ["id"]
  [[entities.tables]]
  name = "notes"
  source = "s"
  from = "n"
  id_column = "cid"
  primary_key = ["id"]
  [entities.views.support]
  tables = ["customer"]
  columns = ["customer.id", "customer.email", "customer.card", "customer.pin"]
  mask = { "customer.email" = "hash", "customer.card" = "keep_last:4", "customer.pin" = "keep_last:4" }
"#,
        )
        .unwrap();
        let key = MaskKey::new(b"0123456789abcdef");
        let views = View::compile_all(&cfg.entities[0], Some(&key));
        let mut e = Entity::new(EntityKey::new("customer", "1"));
        let row: crate::event::Row = [
            ("id".to_string(), Value::Int(1)),
            ("email".to_string(), Value::Text("a@b.c".into())),
            ("secret".to_string(), Value::Text("x".into())),
            ("card".to_string(), Value::Int(4111111111111111)),
            ("pin".to_string(), Value::Text("1234".into())),
        ]
        .into_iter()
        .collect();
        std::sync::Arc::make_mut(e.tables.entry("customer".into()).or_default()).insert(
            vec![Value::Int(1)].into(),
            crate::store::StoredRow::pack(&row),
        );
        std::sync::Arc::make_mut(e.tables.entry("notes".into()).or_default()).insert(
            vec![Value::Int(1)].into(),
            crate::store::StoredRow::pack(&row),
        );
        let j = to_json(&e, views.get("support"));
        let c = &j["tables"]["customer"][0];
        assert_eq!(c["id"], 1);
        assert!(c.get("secret").is_none());
        assert_eq!(c["email"].as_str().unwrap(), key.hash(b"a@b.c"));
        assert_eq!(c["email"].as_str().unwrap().len(), 64);
        // Keyed: not what a dictionary of plain SHA-256 digests would hold.
        use sha2::Digest;
        assert_ne!(c["email"], hex::encode(Sha256::digest(b"a@b.c")));
        assert_ne!(
            c["email"],
            MaskKey::new(b"another key, same length").hash(b"a@b.c")
        );
        assert_eq!(c["card"], "***1111");
        // No more characters than it keeps: nothing shown.
        assert_eq!(c["pin"], "***");
        assert_ne!(c["email"], "a@b.c");
        assert!(j["tables"].get("notes").is_none());
    }

    #[test]
    fn hash_is_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            MaskKey::new(b"Jefe").hash(b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn masks_parse() {
        let m = |s: &str| Mask::try_from(s.to_string());
        assert_eq!(m("keep_last:4"), Ok(Mask::KeepLast(4)));
        assert_eq!(m("hash"), Ok(Mask::Hash));
        for bad in ["keep_last:0", "keep_last:33", "keep_last", "sha1"] {
            assert!(m(bad).unwrap_err().contains("unknown mask"), "{bad}");
        }
    }

    #[test]
    fn the_default_key_is_made_once_and_kept_private() {
        use crate::config::read_or_create_key;
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap").join("mask.key");
        let a = read_or_create_key(&path).unwrap();
        assert_eq!(a.len(), 32);
        assert_eq!(read_or_create_key(&path).unwrap(), a);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let other = tempfile::tempdir().unwrap();
        let b = read_or_create_key(&other.path().join("mask.key")).unwrap();
        assert_ne!(a, b, "two keys made alike");
    }
}
