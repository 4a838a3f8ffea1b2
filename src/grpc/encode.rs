//! `fabric.v1.Entity` written straight from a micro-DB, through a view.
//!
//! The same bytes a `proto::Entity` built by [`crate::view::to_proto`] would
//! decode from, without building it: no per-value `String` copies, no
//! per-row `HashMap`. Lengths of nested messages are computed before each is
//! written (protobuf prefixes every message with its length), so the output
//! is written once into a buffer of the right size. This is the cost of a
//! version's first read (later reads send the cached bytes).

use crate::store::{Entity, StoredRow, ValueRef};
use crate::view::{Shown, View};
use bytes::BufMut;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

/// Length of a length-delimited field `tag` whose payload is `len` bytes.
fn ld_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn put_ld(buf: &mut Vec<u8>, tag: u32, len: usize) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
}

fn put_str(buf: &mut Vec<u8>, tag: u32, s: &[u8]) {
    put_ld(buf, tag, s.len());
    buf.put_slice(s);
}

/// The body of a `fabric.v1.Value` (its one `kind` field).
fn value_len(v: ValueRef<'_>) -> usize {
    match v {
        ValueRef::Null | ValueRef::Bool(_) => key_len(1) + 1,
        ValueRef::Int(i) => key_len(3) + encoded_len_varint(zigzag(i)),
        ValueRef::Float(_) => key_len(4) + 8,
        ValueRef::Decimal(s) => ld_len(5, s.len()),
        ValueRef::Text(s) => ld_len(6, s.len()),
        ValueRef::Json(s) => ld_len(11, s.len()),
        ValueRef::Bytes(b) => ld_len(7, b.len()),
        ValueRef::Timestamp(t) => key_len(8) + encoded_len_varint(t as u64),
        ValueRef::Date(d) => key_len(9) + encoded_len_varint(d as i64 as u64),
        ValueRef::Uuid(_) => ld_len(10, 36),
    }
}

fn zigzag(i: i64) -> u64 {
    ((i << 1) ^ (i >> 63)) as u64
}

fn put_value(buf: &mut Vec<u8>, v: ValueRef<'_>) {
    match v {
        ValueRef::Null => {
            encode_key(1, WireType::Varint, buf);
            buf.put_u8(1);
        }
        ValueRef::Bool(b) => {
            encode_key(2, WireType::Varint, buf);
            buf.put_u8(b as u8);
        }
        ValueRef::Int(i) => {
            encode_key(3, WireType::Varint, buf);
            encode_varint(zigzag(i), buf);
        }
        ValueRef::Float(f) => {
            encode_key(4, WireType::SixtyFourBit, buf);
            buf.put_f64_le(f);
        }
        ValueRef::Decimal(s) => put_str(buf, 5, s.as_bytes()),
        ValueRef::Text(s) => put_str(buf, 6, s.as_bytes()),
        ValueRef::Bytes(b) => put_str(buf, 7, b),
        ValueRef::Timestamp(t) => {
            encode_key(8, WireType::Varint, buf);
            encode_varint(t as u64, buf);
        }
        ValueRef::Date(d) => {
            encode_key(9, WireType::Varint, buf);
            encode_varint(d as i64 as u64, buf);
        }
        ValueRef::Uuid(u) => {
            let mut text = [0u8; 36];
            uuid::Uuid::from_bytes(u)
                .hyphenated()
                .encode_lower(&mut text);
            put_str(buf, 10, &text);
        }
        ValueRef::Json(s) => put_str(buf, 11, s.as_bytes()),
    }
}

/// The columns of `row` a view shows, masked as it says.
fn columns<'a>(
    view: &'a View,
    table: &'a str,
    row: &'a StoredRow,
) -> impl Iterator<Item = (&'a str, Shown<'a>)> + 'a {
    row.iter()
        .filter(move |(c, _)| view.shows_column(table, c))
        .map(move |(c, v)| (c, view.masked(table, c, v)))
}

/// One `columns` map entry: key (1) and value (2).
fn entry_len(c: &str, v: ValueRef<'_>) -> usize {
    ld_len(1, c.len()) + ld_len(2, value_len(v))
}

fn row_len(view: &View, table: &str, row: &StoredRow) -> usize {
    columns(view, table, row)
        .map(|(c, v)| ld_len(1, entry_len(c, v.get())))
        .sum()
}

/// The encoded `fabric.v1.Entity` of `e` through `view` (None: all of it).
pub fn entity(e: &Entity, view: Option<&View>) -> Vec<u8> {
    let full = View::default();
    let v = view.unwrap_or(&full);
    let tables: Vec<_> = e
        .tables
        .iter()
        .filter(|(t, _)| v.shows_table(t))
        .map(|(t, rows)| {
            let lens: Vec<usize> = rows.values().map(|r| row_len(v, t, r)).collect();
            let body = ld_len(1, t.len()) + lens.iter().map(|l| ld_len(2, *l)).sum::<usize>();
            (t, rows, lens, body)
        })
        .collect();
    let positions: Vec<(&str, String)> = e
        .positions
        .iter()
        .map(|(s, p)| (&**s, p.to_string()))
        .collect();
    let position_len = |s: &str, p: &str| ld_len(1, s.len()) + ld_len(2, p.len());
    let view_name = view.map_or("", |v| v.name.as_str());
    let mut size = ld_len(1, e.key.entity_type.len()) + ld_len(2, e.key.id.len());
    if e.version != 0 {
        size += key_len(3) + encoded_len_varint(e.version);
    }
    size += tables.iter().map(|t| ld_len(4, t.3)).sum::<usize>();
    size += positions
        .iter()
        .map(|(s, p)| ld_len(5, position_len(s, p)))
        .sum::<usize>();
    if e.updated_micros != 0 {
        size += key_len(6) + encoded_len_varint(e.updated_micros as u64);
    }
    if !view_name.is_empty() {
        size += ld_len(7, view_name.len());
    }

    let mut buf = Vec::with_capacity(size);
    put_str(&mut buf, 1, e.key.entity_type.as_bytes());
    put_str(&mut buf, 2, e.key.id.as_bytes());
    if e.version != 0 {
        encode_key(3, WireType::Varint, &mut buf);
        encode_varint(e.version, &mut buf);
    }
    for (t, rows, lens, body) in &tables {
        put_ld(&mut buf, 4, *body);
        put_str(&mut buf, 1, t.as_bytes());
        for (row, len) in rows.values().zip(lens) {
            put_ld(&mut buf, 2, *len);
            for (c, val) in columns(v, t, row) {
                let val = val.get();
                put_ld(&mut buf, 1, entry_len(c, val));
                put_str(&mut buf, 1, c.as_bytes());
                put_ld(&mut buf, 2, value_len(val));
                put_value(&mut buf, val);
            }
        }
    }
    for (s, p) in &positions {
        put_ld(&mut buf, 5, position_len(s, p));
        put_str(&mut buf, 1, s.as_bytes());
        put_str(&mut buf, 2, p.as_bytes());
    }
    if e.updated_micros != 0 {
        encode_key(6, WireType::Varint, &mut buf);
        encode_varint(e.updated_micros as u64, &mut buf);
    }
    if !view_name.is_empty() {
        put_str(&mut buf, 7, view_name.as_bytes());
    }
    debug_assert_eq!(buf.len(), size, "encoded length computed before writing");
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::event::{EntityKey, Position, Value};
    use crate::proto;
    use crate::store::row::every_value;
    use prost::Message;

    fn entity() -> Entity {
        let mut e = Entity::new(EntityKey::new("customer", "42"));
        e.version = 7;
        e.updated_micros = 1_700_000_000_123_456;
        e.positions.insert("crm".into(), Position::Seq(9));
        e.positions
            .insert("billing".into(), Position::Lsn(0x1234_5678));
        for (t, n) in [("customer", 1), ("notes", 3)] {
            let rows = std::sync::Arc::make_mut(e.tables.entry(t.into()).or_default());
            for i in 0..n {
                let mut r = every_value();
                r.insert("id".into(), Value::Int(i));
                rows.insert(vec![Value::Int(i)].into(), StoredRow::pack(&r));
            }
        }
        e
    }

    #[test]
    fn the_bytes_decode_to_the_message_to_proto_builds() {
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
  columns = ["customer.id", "customer.text", "customer.uuid", "customer.null"]
  mask = { "customer.text" = "hash", "customer.uuid" = "redact", "customer.null" = "hash" }
"#,
        )
        .unwrap();
        let key = crate::view::MaskKey::new(b"a test key of 32 bytes, or about");
        let views = View::compile_all(&cfg.entities[0], Some(&key));
        let e = entity();
        for view in [None, views.get("support")] {
            let bytes = super::entity(&e, view);
            let decoded = proto::Entity::decode(&*bytes).unwrap();
            assert_eq!(decoded, crate::view::to_proto(&e, view), "view {view:?}");
        }
        let support = proto::Entity::decode(&*super::entity(&e, views.get("support"))).unwrap();
        assert_eq!(support.tables.len(), 1);
        assert_eq!(support.tables[0].rows[0].columns.len(), 4);
        assert_eq!(support.view, "support");

        // Defaults of the top-level fields are left out, as prost does.
        let bare = Entity::new(EntityKey::new("customer", "1"));
        assert_eq!(
            super::entity(&bare, None),
            crate::view::to_proto(&bare, None).encode_to_vec()
        );
    }
}
