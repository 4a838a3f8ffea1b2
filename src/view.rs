//! Views: the named projections readers ask for, applied on the way out.
//!
//! A view picks tables and columns of an entity and masks some columns
//! (`hash`: SHA-256 hex of the value's text, joinable but unreadable;
//! `redact`: `"***"`; `null`). The same code serves gRPC and the CLI's JSON.

use crate::config::{EntityConfig, Mask};
use crate::event::Value;
use crate::proto;
use crate::store::{Entity, ValueRef};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

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
    /// Tables shown (None: all).
    tables: Option<HashSet<String>>,
    /// Per table, the columns shown (a table absent here shows all).
    columns: HashMap<String, HashSet<String>>,
    masks: HashMap<(String, String), Mask>,
}

impl View {
    /// Every view of an entity type, by name.
    pub fn compile_all(e: &EntityConfig) -> HashMap<String, View> {
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
                        tables: Some(v.tables.iter().cloned().collect()),
                        columns,
                        masks,
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
                let text = match v {
                    ValueRef::Text(s) => Cow::Borrowed(s),
                    other => Cow::Owned(other.to_owned().to_string()),
                };
                Value::Text(hex::encode(Sha256::digest(text.as_bytes())))
            }
        })
    }
}

/// The encoded `fabric.v1.Entity` through `view`, made once per entity
/// version and view when `cache` is on. `views` is how many views the type has.
pub fn encoded(e: &Entity, view: Option<&View>, views: usize, cache: bool) -> bytes::Bytes {
    let encode = || bytes::Bytes::from(crate::grpc::encode::entity(e, view));
    if !cache {
        return encode();
    }
    e.encoded
        .get_or_init(view.map_or(0, |v| v.slot), views + 1, encode)
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
  columns = ["customer.id", "customer.email"]
  mask = { "customer.email" = "hash" }
"#,
        )
        .unwrap();
        let views = View::compile_all(&cfg.entities[0]);
        let mut e = Entity::new(EntityKey::new("customer", "1"));
        let row: crate::event::Row = [
            ("id".to_string(), Value::Int(1)),
            ("email".to_string(), Value::Text("a@b.c".into())),
            ("secret".to_string(), Value::Text("x".into())),
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
        assert_eq!(
            c["email"].as_str().unwrap(),
            hex::encode(Sha256::digest(b"a@b.c"))
        );
        assert_eq!(c["email"].as_str().unwrap().len(), 64);
        assert_ne!(c["email"], "a@b.c");
        assert!(j["tables"].get("notes").is_none());
    }
}
