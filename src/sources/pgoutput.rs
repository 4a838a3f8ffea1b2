//! Decoding of PostgreSQL's `pgoutput` logical replication messages
//! (protocol version 1) and of PostgreSQL's text output of values.
//!
//! The same value decoder serves the stream (pgoutput sends values as text)
//! and the initial snapshot (which selects every column `::text`), so a row
//! reads the same whichever way it arrives. Sessions pin `TimeZone=UTC`,
//! `DateStyle=ISO` and `bytea_output=hex`, so the text forms are fixed.
//!
//! Nothing here panics on input: a malformed message is an error naming
//! what is wrong.

use crate::event::value::parse_date;
use crate::event::{Row, Value};
use std::collections::HashMap;

/// One column of a relation.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    /// `atttypmod`: a `numeric`'s precision and scale, a `varchar`'s length.
    pub type_modifier: i32,
    /// Part of the replica identity key.
    pub key: bool,
}

/// A relation (table) as pgoutput describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub id: u32,
    pub schema: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

impl Relation {
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq)]
pub enum Datum {
    Null,
    /// A TOASTed value that did not change (not sent).
    Unchanged,
    Text(String),
}

/// A decoded pgoutput message (the ones inside a transaction).
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Relation(Relation),
    Insert {
        relation: u32,
        new: Vec<Datum>,
    },
    Update {
        relation: u32,
        old: Option<Vec<Datum>>,
        new: Vec<Datum>,
    },
    Delete {
        relation: u32,
        old: Vec<Datum>,
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// Begin, commit, type, origin and other messages the connector does not need.
    Other(u8),
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| format!("message ends early (wanted {n} bytes at {})", self.at))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn i16(&mut self) -> Result<i16, String> {
        Ok(i16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn i32(&mut self) -> Result<i32, String> {
        Ok(i32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn cstr(&mut self) -> Result<String, String> {
        let rest = &self.buf[self.at..];
        let n = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or("unterminated string")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.at += n + 1;
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<Datum>, String> {
        let n = self.i16()?;
        if n < 0 {
            return Err(format!("negative column count {n}"));
        }
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => Datum::Null,
                b'u' => Datum::Unchanged,
                b't' => {
                    let len = self.i32()?;
                    if len < 0 {
                        return Err(format!("negative value length {len}"));
                    }
                    Datum::Text(String::from_utf8_lossy(self.take(len as usize)?).into_owned())
                }
                b'b' => return Err("binary values are not requested".into()),
                k => return Err(format!("unknown tuple value kind {:?}", k as char)),
            });
        }
        Ok(out)
    }
}

/// Decodes one pgoutput message.
pub fn decode(buf: &[u8]) -> Result<Message, String> {
    let mut r = Reader { buf, at: 0 };
    let tag = r.u8()?;
    Ok(match tag {
        b'R' => {
            let id = r.u32()?;
            let schema = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.u8()?;
            let n = r.i16()?;
            if n < 0 {
                return Err(format!("negative column count {n}"));
            }
            let mut columns = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let flags = r.u8()?;
                let name = r.cstr()?;
                let type_oid = r.u32()?;
                let type_modifier = r.i32()?;
                columns.push(Column {
                    name,
                    type_oid,
                    type_modifier,
                    key: flags & 1 == 1,
                });
            }
            Message::Relation(Relation {
                id,
                schema,
                name,
                replica_identity,
                columns,
            })
        }
        b'I' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'N' => Message::Insert {
                    relation,
                    new: r.tuple()?,
                },
                k => return Err(format!("insert: expected 'N', got {:?}", k as char)),
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let mut old = None;
            let mut kind = r.u8()?;
            if kind == b'K' || kind == b'O' {
                old = Some(r.tuple()?);
                kind = r.u8()?;
            }
            if kind != b'N' {
                return Err(format!("update: expected 'N', got {:?}", kind as char));
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'K' | b'O' => Message::Delete {
                    relation,
                    old: r.tuple()?,
                },
                k => return Err(format!("delete: expected 'K' or 'O', got {:?}", k as char)),
            }
        }
        b'T' => {
            let n = r.u32()?;
            let _options = r.u8()?;
            let mut relations = Vec::with_capacity((n as usize).min(4096));
            for _ in 0..n {
                relations.push(r.u32()?);
            }
            Message::Truncate { relations }
        }
        other => Message::Other(other),
    })
}

/// The row of a tuple by the relation's column names. Unchanged TOAST values
/// are taken from `fallback` (the old row) when it has them, else left out.
pub fn row(rel: &Relation, tuple: &[Datum], fallback: Option<&Row>) -> Result<Row, String> {
    if tuple.len() != rel.columns.len() {
        return Err(format!(
            "{} has {} columns, the change has {}",
            rel.qualified(),
            rel.columns.len(),
            tuple.len()
        ));
    }
    let mut out = Row::new();
    for (c, d) in rel.columns.iter().zip(tuple) {
        let v = match d {
            Datum::Null => Value::Null,
            Datum::Text(t) => {
                value(c.type_oid, t).map_err(|e| format!("{}.{}: {e}", rel.qualified(), c.name))?
            }
            Datum::Unchanged => match fallback.and_then(|f| f.get(&c.name)) {
                Some(v) => v.clone(),
                None => continue,
            },
        };
        out.insert(c.name.clone(), v);
    }
    Ok(out)
}

/// Type OIDs with a mapping of their own; any other type is kept as its text.
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
    /// Arrays of the types above and of text types.
    pub const ARRAYS: &[u32] = &[
        1000, 1001, 1005, 1007, 1016, 1009, 1015, 1014, 1021, 1022, 1182, 1115, 1185, 1231, 2951,
        199, 3807,
    ];
}

/// Whether values of a type decode into something better than opaque text:
/// a type with a mapping of its own, an enum, or a string type
/// (`typtype`, `typcategory` from `pg_type`).
pub fn maps(type_oid: u32, typtype: &str, category: &str) -> bool {
    use oid::*;
    matches!(
        type_oid,
        BOOL | BYTEA
            | INT8
            | INT2
            | INT4
            | OID
            | JSON
            | FLOAT4
            | FLOAT8
            | DATE
            | TIMESTAMP
            | TIMESTAMPTZ
            | NUMERIC
            | UUID
            | JSONB
    ) || ARRAYS.contains(&type_oid)
        || typtype == "e"
        || category == "S"
}

/// Decodes PostgreSQL's text output of one value of type `type_oid`.
pub fn value(type_oid: u32, t: &str) -> Result<Value, String> {
    use oid::*;
    Ok(match type_oid {
        BOOL => match t {
            "t" | "true" => Value::Bool(true),
            "f" | "false" => Value::Bool(false),
            _ => return Err(format!("{t:?} is not a boolean")),
        },
        INT2 | INT4 | INT8 | OID => {
            Value::Int(t.parse().map_err(|_| format!("{t:?} is not an integer"))?)
        }
        FLOAT4 | FLOAT8 => Value::Float(match t {
            "NaN" => f64::NAN,
            "Infinity" => f64::INFINITY,
            "-Infinity" => f64::NEG_INFINITY,
            _ => t.parse().map_err(|_| format!("{t:?} is not a number"))?,
        }),
        NUMERIC => Value::Decimal(t.to_string()),
        BYTEA => {
            let hex = t
                .strip_prefix("\\x")
                .ok_or_else(|| "bytea is not in hex output".to_string())?;
            Value::Bytes(::hex::decode(hex).map_err(|e| format!("bad bytea hex: {e}"))?)
        }
        DATE => match parse_date(t) {
            Some(d) => Value::Date(d),
            None => Value::Text(t.to_string()),
        },
        TIMESTAMP => match chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f") {
            Ok(ts) => Value::Timestamp(ts.and_utc().timestamp_micros()),
            Err(_) => Value::Text(t.to_string()),
        },
        TIMESTAMPTZ => match chrono::DateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f%#z") {
            Ok(ts) => Value::Timestamp(ts.timestamp_micros()),
            Err(_) => Value::Text(t.to_string()),
        },
        UUID => Value::Uuid(
            *uuid::Uuid::parse_str(t)
                .map_err(|_| format!("{t:?} is not a uuid"))?
                .as_bytes(),
        ),
        JSON | JSONB => Value::Json(t.to_string()),
        o if ARRAYS.contains(&o) => Value::Json(array_to_json(t)?.to_string()),
        _ => Value::Text(t.to_string()),
    })
}

/// Converts a PostgreSQL array literal (`{1,2,NULL}`, `{"a b",c}`,
/// `{{1,2},{3,4}}`) to a JSON array of strings, numbers-as-text kept as
/// strings only when quoted, and nulls.
pub fn array_to_json(t: &str) -> Result<serde_json::Value, String> {
    let chars: Vec<char> = t.chars().collect();
    // A dimension decoration (`[0:1]={...}`) comes first when bounds are not 1.
    let start = chars
        .iter()
        .position(|c| *c == '{')
        .ok_or("not an array literal")?;
    let (v, end) = parse_array(&chars, start)?;
    if chars[end..].iter().any(|c| !c.is_whitespace()) {
        return Err("text after the array literal".into());
    }
    Ok(v)
}

fn parse_array(c: &[char], mut i: usize) -> Result<(serde_json::Value, usize), String> {
    debug_assert_eq!(c.get(i), Some(&'{'));
    i += 1;
    let mut items = Vec::new();
    loop {
        match c.get(i) {
            None => return Err("unterminated array".into()),
            Some('}') => return Ok((serde_json::Value::Array(items), i + 1)),
            Some(',') => i += 1,
            Some('{') => {
                let (v, next) = parse_array(c, i)?;
                items.push(v);
                i = next;
            }
            Some('"') => {
                let mut s = String::new();
                i += 1;
                loop {
                    match c.get(i) {
                        None => return Err("unterminated quoted element".into()),
                        Some('\\') => {
                            if let Some(x) = c.get(i + 1) {
                                s.push(*x);
                            }
                            i += 2;
                        }
                        Some('"') => {
                            i += 1;
                            break;
                        }
                        Some(x) => {
                            s.push(*x);
                            i += 1;
                        }
                    }
                }
                items.push(serde_json::Value::String(s));
            }
            Some(_) => {
                let begin = i;
                while let Some(x) = c.get(i) {
                    if *x == ',' || *x == '}' {
                        break;
                    }
                    i += 1;
                }
                let raw: String = c[begin..i].iter().collect();
                let raw = raw.trim();
                items.push(if raw.eq_ignore_ascii_case("null") {
                    serde_json::Value::Null
                } else if let Ok(n) = raw.parse::<i64>() {
                    n.into()
                } else if raw == "t" || raw == "f" {
                    (raw == "t").into()
                } else {
                    serde_json::Value::String(raw.to_string())
                });
            }
        }
    }
}

/// Relations seen in a stream, by id.
pub type Relations = HashMap<u32, Relation>;

#[cfg(test)]
mod tests {
    use super::*;

    fn cstr(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    fn relation_msg() -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend(16384u32.to_be_bytes());
        m.extend(cstr("public"));
        m.extend(cstr("customers"));
        m.push(b'f');
        m.extend(2i16.to_be_bytes());
        m.push(1);
        m.extend(cstr("id"));
        m.extend(20u32.to_be_bytes());
        m.extend((-1i32).to_be_bytes());
        m.push(0);
        m.extend(cstr("balance"));
        m.extend(1700u32.to_be_bytes());
        m.extend((-1i32).to_be_bytes());
        m
    }

    fn tuple(vals: &[Option<&str>]) -> Vec<u8> {
        let mut m = (vals.len() as i16).to_be_bytes().to_vec();
        for v in vals {
            match v {
                None => m.push(b'n'),
                Some(s) => {
                    m.push(b't');
                    m.extend((s.len() as i32).to_be_bytes());
                    m.extend(s.as_bytes());
                }
            }
        }
        m
    }

    #[test]
    fn relation_insert_update_delete_truncate() {
        let Message::Relation(rel) = decode(&relation_msg()).unwrap() else {
            panic!()
        };
        assert_eq!(rel.qualified(), "public.customers");
        assert!(rel.columns[0].key && !rel.columns[1].key);

        let mut ins = vec![b'I'];
        ins.extend(16384u32.to_be_bytes());
        ins.push(b'N');
        ins.extend(tuple(&[Some("7"), Some("12.50")]));
        let Message::Insert { new, .. } = decode(&ins).unwrap() else {
            panic!()
        };
        let r = row(&rel, &new, None).unwrap();
        assert_eq!(r["id"], Value::Int(7));
        assert_eq!(r["balance"], Value::Decimal("12.50".into()));

        let mut upd = vec![b'U'];
        upd.extend(16384u32.to_be_bytes());
        upd.push(b'O');
        upd.extend(tuple(&[Some("7"), Some("12.50")]));
        upd.push(b'N');
        upd.extend(tuple(&[Some("7"), None]));
        let Message::Update { old, new, .. } = decode(&upd).unwrap() else {
            panic!()
        };
        assert!(old.is_some());
        assert_eq!(row(&rel, &new, None).unwrap()["balance"], Value::Null);

        let mut del = vec![b'D'];
        del.extend(16384u32.to_be_bytes());
        del.push(b'K');
        del.extend(tuple(&[Some("7"), None]));
        assert!(matches!(decode(&del).unwrap(), Message::Delete { .. }));

        let mut tr = vec![b'T'];
        tr.extend(1u32.to_be_bytes());
        tr.push(0);
        tr.extend(16384u32.to_be_bytes());
        assert_eq!(
            decode(&tr).unwrap(),
            Message::Truncate {
                relations: vec![16384]
            }
        );
    }

    #[test]
    fn unchanged_toast_comes_from_the_old_row() {
        let Message::Relation(rel) = decode(&relation_msg()).unwrap() else {
            panic!()
        };
        let mut old = Row::new();
        old.insert("balance".into(), Value::Decimal("1.00".into()));
        let r = row(
            &rel,
            &[Datum::Text("7".into()), Datum::Unchanged],
            Some(&old),
        )
        .unwrap();
        assert_eq!(r["balance"], Value::Decimal("1.00".into()));
    }

    #[test]
    fn truncated_or_hostile_messages_are_errors() {
        let full = relation_msg();
        for cut in 1..full.len() {
            assert!(decode(&full[..cut]).is_err(), "cut at {cut}");
        }
        let mut ins = vec![b'I'];
        ins.extend(1u32.to_be_bytes());
        ins.push(b'N');
        ins.extend(1i16.to_be_bytes());
        ins.push(b't');
        ins.extend(i32::MAX.to_be_bytes());
        assert!(decode(&ins).is_err());
    }

    #[test]
    fn text_values_by_type() {
        assert_eq!(value(oid::BOOL, "t").unwrap(), Value::Bool(true));
        assert_eq!(value(oid::INT8, "-9").unwrap(), Value::Int(-9));
        assert_eq!(
            value(oid::NUMERIC, "123456789012345678901234.5678").unwrap(),
            Value::Decimal("123456789012345678901234.5678".into())
        );
        assert_eq!(
            value(oid::BYTEA, "\\x00ff").unwrap(),
            Value::Bytes(vec![0, 255])
        );
        assert_eq!(
            value(oid::TIMESTAMPTZ, "2024-02-29 10:11:12.5+00").unwrap(),
            Value::Timestamp(
                crate::event::value::parse_timestamp("2024-02-29T10:11:12.5Z").unwrap()
            )
        );
        assert_eq!(
            value(oid::TIMESTAMPTZ, "2024-02-29 12:11:12.5+02").unwrap(),
            value(oid::TIMESTAMP, "2024-02-29 10:11:12.5").unwrap()
        );
        assert_eq!(
            value(oid::DATE, "2024-02-29").unwrap(),
            Value::Date(parse_date("2024-02-29").unwrap())
        );
        assert!(matches!(
            value(oid::UUID, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap(),
            Value::Uuid(_)
        ));
        assert_eq!(
            value(oid::JSONB, "{\"a\": 1}").unwrap(),
            Value::Json("{\"a\": 1}".into())
        );
        assert_eq!(
            value(1007, "{1,2,NULL}").unwrap(),
            Value::Json("[1,2,null]".into())
        );
        assert_eq!(
            array_to_json(r#"{{"a b","c\"d"},{e,NULL}}"#).unwrap(),
            serde_json::json!([["a b", "c\"d"], ["e", null]])
        );
        assert!(value(oid::INT4, "x").is_err());
    }
}
