//! Decoding of Debezium change events (the JSON value of one message).
//!
//! Used by the `jsonl` connector and meant for a Kafka topic connector. A
//! message may carry the JSON converter's schema wrapper
//! (`{"schema": …, "payload": …}`) or be the payload itself. With a schema,
//! the field schemas of `before`/`after` drive the conversion of each column
//! (exact decimals, timestamps, dates, UUIDs, bytes); without one, columns are
//! taken as plain JSON ([`Value::from_json`]).
//!
//! Invariants:
//! - Decimals are converted from their unscaled two's complement bytes to
//!   text exactly, never through a float.
//! - Timestamps become microseconds since the epoch, UTC.
//! - Messages that are not row changes (tombstones, heartbeats, schema
//!   changes, transaction boundaries, logical decoding messages) decode to
//!   `change: None`, never to an error.

use crate::event::value::{parse_date, parse_timestamp};
use crate::event::{Op, Row, RowChange, Value};
use base64::Engine;
use serde_json::{Map, Value as Json};
use std::collections::HashMap;

/// One decoded Debezium message.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedEvent {
    /// The row change; `None` for messages we skip (tombstones, heartbeats,
    /// schema changes, transaction boundaries, `m` messages).
    pub change: Option<RowChange>,
    /// `schema.table` or `db.table` from the source block, `""` when absent.
    pub table: String,
    /// The source transaction, from the `transaction.id` block.
    pub txn_id: Option<String>,
    /// Commit time at the source in microseconds since the epoch, 0 if unknown.
    pub commit_micros: i64,
}

/// Why a message cannot be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not valid json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0} is not a json object")]
    NotObject(&'static str),
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("unknown op {0:?}")]
    UnknownOp(String),
    #[error("field {field}: {reason}")]
    Field { field: String, reason: String },
}

/// Decodes one Debezium message value.
pub fn decode(value: &[u8]) -> Result<DecodedEvent, DecodeError> {
    if value.iter().all(u8::is_ascii_whitespace) {
        return Ok(skipped(String::new(), None, 0));
    }
    let doc: Json = serde_json::from_slice(value)?;
    let Envelope { schema, payload } = split_envelope(&doc)?;
    let Some(payload) = payload else {
        return Ok(skipped(String::new(), None, 0));
    };

    let source = match payload.get("source") {
        None | Some(Json::Null) => None,
        Some(Json::Object(o)) => Some(o),
        Some(_) => return Err(DecodeError::NotObject("payload.source")),
    };
    let table = source.map(table_of).unwrap_or_default();
    let txn_id = txn_id_of(payload);
    let commit_micros = commit_micros_of(source, payload);

    let op = match payload.get("op") {
        Some(Json::String(op)) => op.as_str(),
        None | Some(Json::Null) => {
            // Heartbeats, schema changes and transaction boundaries carry no
            // op and no row images; a row image without an op is broken.
            if payload.contains_key("before") || payload.contains_key("after") {
                return Err(DecodeError::Missing("payload.op"));
            }
            return Ok(skipped(table, txn_id, commit_micros));
        }
        Some(_) => {
            return Err(DecodeError::Field {
                field: "payload.op".into(),
                reason: "not a string".into(),
            });
        }
    };
    let op = match op {
        "c" => Op::Insert,
        "u" => Op::Update,
        "d" => Op::Delete,
        "r" => Op::Read,
        "t" => Op::Truncate,
        "m" => return Ok(skipped(table, txn_id, commit_micros)),
        other => return Err(DecodeError::UnknownOp(other.to_string())),
    };
    if table.is_empty() {
        return Err(DecodeError::Missing("payload.source.table"));
    }

    let (before, after) = if op == Op::Truncate {
        (None, None)
    } else {
        (
            row_of(payload, schema, "before")?,
            row_of(payload, schema, "after")?,
        )
    };
    match op {
        Op::Delete if before.is_none() => return Err(DecodeError::Missing("payload.before")),
        Op::Insert | Op::Update | Op::Read if after.is_none() => {
            return Err(DecodeError::Missing("payload.after"));
        }
        _ => {}
    }
    Ok(DecodedEvent {
        change: Some(RowChange {
            table: table.clone(),
            op,
            before,
            after,
        }),
        table,
        txn_id,
        commit_micros,
    })
}

/// Best effort: the `schema.table` a message names, even when it does not
/// decode (for dead letters).
pub fn peek_table(value: &[u8]) -> Option<String> {
    let doc: Json = serde_json::from_slice(value).ok()?;
    let source = split_envelope(&doc)
        .ok()?
        .payload?
        .get("source")?
        .as_object()?;
    Some(table_of(source)).filter(|t| !t.is_empty())
}

fn skipped(table: String, txn_id: Option<String>, commit_micros: i64) -> DecodedEvent {
    DecodedEvent {
        change: None,
        table,
        txn_id,
        commit_micros,
    }
}

/// The parts of a message: the schema (if any) and the payload (`None` for
/// a tombstone).
struct Envelope<'a> {
    schema: Option<&'a Json>,
    payload: Option<&'a Map<String, Json>>,
}

fn split_envelope(doc: &Json) -> Result<Envelope<'_>, DecodeError> {
    let obj = match doc {
        Json::Null => {
            return Ok(Envelope {
                schema: None,
                payload: None,
            });
        }
        Json::Object(o) => o,
        _ => return Err(DecodeError::NotObject("the message")),
    };
    // A bare payload has `op`; the wrapper has `payload` and no `op`.
    if !obj.contains_key("payload") || obj.contains_key("op") {
        return Ok(Envelope {
            schema: None,
            payload: Some(obj),
        });
    }
    let schema = obj.get("schema").filter(|s| !s.is_null());
    let payload = match obj.get("payload") {
        Some(Json::Null) | None => None,
        Some(Json::Object(p)) => Some(p),
        Some(_) => return Err(DecodeError::NotObject("payload")),
    };
    Ok(Envelope { schema, payload })
}

/// `schema.table` (PostgreSQL, SQL Server) or `db.table` (MySQL); MongoDB's
/// `collection` stands in for a table.
fn table_of(source: &Map<String, Json>) -> String {
    let name = source
        .get("table")
        .or_else(|| source.get("collection"))
        .and_then(Json::as_str)
        .unwrap_or("");
    if name.is_empty() {
        return String::new();
    }
    let prefix = ["schema", "db"]
        .iter()
        .filter_map(|k| source.get(*k).and_then(Json::as_str))
        .find(|s| !s.is_empty());
    match prefix {
        Some(p) => format!("{p}.{name}"),
        None => name.to_string(),
    }
}

fn txn_id_of(payload: &Map<String, Json>) -> Option<String> {
    match payload.get("transaction")?.get("id")? {
        Json::String(s) => Some(s.clone()),
        Json::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The most precise commit time the source block has, else the time
/// Debezium processed the event, else 0.
fn commit_micros_of(source: Option<&Map<String, Json>>, payload: &Map<String, Json>) -> i64 {
    let from = |o: &Map<String, Json>| -> Option<i64> {
        let get = |k: &str| o.get(k).and_then(Json::as_i64);
        get("ts_us")
            .or_else(|| get("ts_ns").map(|ns| ns.div_euclid(1000)))
            .or_else(|| get("ts_ms").map(|ms| ms.saturating_mul(1000)))
    };
    source.and_then(from).or_else(|| from(payload)).unwrap_or(0)
}

/// The row image `which` (`before`/`after`), converted with its field
/// schemas when the envelope has a schema.
fn row_of(
    payload: &Map<String, Json>,
    schema: Option<&Json>,
    which: &'static str,
) -> Result<Option<Row>, DecodeError> {
    let obj = match payload.get(which) {
        None | Some(Json::Null) => return Ok(None),
        Some(Json::Object(o)) => o,
        Some(_) => {
            return Err(DecodeError::NotObject(if which == "before" {
                "payload.before"
            } else {
                "payload.after"
            }));
        }
    };
    let fields = field_schemas(schema, which);
    let mut row = Row::new();
    for (name, v) in obj {
        let value = match fields.get(name.as_str()) {
            Some(fs) => convert(fs, v).map_err(|reason| DecodeError::Field {
                field: format!("{which}.{name}"),
                reason,
            })?,
            None => Value::from_json(v),
        };
        row.insert(name.clone(), value);
    }
    Ok(Some(row))
}

/// Column name to field schema, from the envelope field `which`.
fn field_schemas<'a>(schema: Option<&'a Json>, which: &str) -> HashMap<&'a str, &'a Json> {
    let image = schema
        .and_then(|s| s.get("fields"))
        .and_then(Json::as_array)
        .and_then(|fs| {
            fs.iter()
                .find(|f| f.get("field").and_then(Json::as_str) == Some(which))
        });
    image
        .and_then(|i| i.get("fields"))
        .and_then(Json::as_array)
        .map(|fs| {
            fs.iter()
                .filter_map(|f| Some((f.get("field")?.as_str()?, f)))
                .collect()
        })
        .unwrap_or_default()
}

/// Converts one column value by its Connect field schema.
fn convert(schema: &Json, v: &Json) -> Result<Value, String> {
    if v.is_null() {
        return Ok(Value::Null);
    }
    let name = schema.get("name").and_then(Json::as_str).unwrap_or("");
    match name {
        "org.apache.kafka.connect.data.Decimal" => {
            let scale = decimal_scale(schema)?;
            return match v {
                Json::String(s) => decimal_from_base64(s, scale).map(Value::Decimal),
                // Some converters write the number itself.
                Json::Number(n) => Ok(Value::Decimal(n.to_string())),
                _ => Err("a decimal is neither base64 text nor a number".into()),
            };
        }
        "io.debezium.data.VariableScaleDecimal" => {
            let scale = v
                .get("scale")
                .and_then(Json::as_i64)
                .ok_or("a variable scale decimal has no integer scale")?;
            let digits = v
                .get("value")
                .and_then(Json::as_str)
                .ok_or("a variable scale decimal has no base64 value")?;
            let scale = i32::try_from(scale).map_err(|_| "decimal scale out of range")?;
            return decimal_from_base64(digits, scale).map(Value::Decimal);
        }
        "io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp" => {
            return int(v).map(|ms| Value::Timestamp(ms.saturating_mul(1000)));
        }
        "io.debezium.time.MicroTimestamp" => return int(v).map(Value::Timestamp),
        "io.debezium.time.NanoTimestamp" => {
            return int(v).map(|ns| Value::Timestamp(ns.div_euclid(1000)));
        }
        "io.debezium.time.ZonedTimestamp" | "io.debezium.time.IsoTimestamp" => {
            let s = v.as_str().ok_or("a zoned timestamp is not text")?;
            return parse_timestamp(s)
                .map(Value::Timestamp)
                .ok_or_else(|| format!("bad timestamp {s:?}"));
        }
        "io.debezium.time.Date" | "org.apache.kafka.connect.data.Date" => {
            return match v {
                Json::String(s) => parse_date(s)
                    .map(Value::Date)
                    .ok_or_else(|| format!("bad date {s:?}")),
                _ => {
                    let d = int(v)?;
                    i32::try_from(d)
                        .map(Value::Date)
                        .map_err(|_| format!("date {d} out of range"))
                }
            };
        }
        "io.debezium.data.Uuid" => {
            let s = v.as_str().ok_or("a uuid is not text")?;
            return uuid::Uuid::parse_str(s)
                .map(|u| Value::Uuid(*u.as_bytes()))
                .map_err(|_| format!("bad uuid {s:?}"));
        }
        "io.debezium.data.Json" => {
            return Ok(Value::Json(match v {
                Json::String(s) => s.clone(),
                other => other.to_string(),
            }));
        }
        _ => {}
    }
    let ty = schema.get("type").and_then(Json::as_str).unwrap_or("");
    match ty {
        "boolean" => v
            .as_bool()
            .map(Value::Bool)
            .ok_or_else(|| "not a boolean".into()),
        "int8" | "int16" | "int32" | "int64" => int(v).map(Value::Int),
        "float" | "float32" | "double" | "float64" => match v {
            Json::Number(n) => n.as_f64().map(Value::Float).ok_or("bad float".into()),
            // NaN and infinities are written as text by Jackson.
            Json::String(s) => s
                .parse::<f64>()
                .map(Value::Float)
                .map_err(|_| format!("bad float {s:?}")),
            _ => Err("not a number".into()),
        },
        "string" => match v {
            Json::String(s) => Ok(Value::Text(s.clone())),
            other => Ok(Value::Text(other.to_string())),
        },
        "bytes" => {
            let s = v.as_str().ok_or("bytes are not base64 text")?;
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map(Value::Bytes)
                .map_err(|e| format!("bad base64: {e}"))
        }
        "array" | "map" | "struct" => Ok(Value::Json(v.to_string())),
        _ => Ok(Value::from_json(v)),
    }
}

fn int(v: &Json) -> Result<i64, String> {
    v.as_i64().ok_or_else(|| format!("{v} is not an integer"))
}

/// `parameters.scale` of a Connect decimal (text in the JSON schema).
fn decimal_scale(schema: &Json) -> Result<i32, String> {
    let s = schema
        .get("parameters")
        .and_then(|p| p.get("scale"))
        .ok_or("a decimal schema has no parameters.scale")?;
    let scale = match s {
        Json::String(t) => t.trim().parse::<i32>().ok(),
        Json::Number(n) => n.as_i64().and_then(|n| i32::try_from(n).ok()),
        _ => None,
    };
    scale.ok_or_else(|| format!("bad decimal scale {s}"))
}

/// Largest decimal scale accepted: beyond it one value could make a string
/// of gigabytes (PostgreSQL's own limit is 16383 digits after the point).
const MAX_DECIMAL_SCALE: i32 = 16_383;

/// Longest unscaled decimal accepted, in bytes (about 9,860 digits; a
/// PostgreSQL `numeric` with a declared precision has at most 1,000, a
/// MySQL `DECIMAL` 65). Turning the bytes into digits costs the square of
/// their length: checked before decoding, so one message cannot hold a
/// connector for seconds.
const MAX_DECIMAL_BYTES: usize = 4096;

fn decimal_from_base64(s: &str, scale: i32) -> Result<String, String> {
    if !(-MAX_DECIMAL_SCALE..=MAX_DECIMAL_SCALE).contains(&scale) {
        return Err(format!(
            "decimal scale {scale} is outside -{MAX_DECIMAL_SCALE}..={MAX_DECIMAL_SCALE}"
        ));
    }
    if s.len() > MAX_DECIMAL_BYTES.div_ceil(3) * 4 {
        return Err(format!(
            "a decimal of {} base64 characters is longer than the {MAX_DECIMAL_BYTES} bytes accepted",
            s.len()
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| format!("bad base64 decimal: {e}"))?;
    if bytes.len() > MAX_DECIMAL_BYTES {
        return Err(format!(
            "a decimal of {} bytes is longer than the {MAX_DECIMAL_BYTES} bytes accepted",
            bytes.len()
        ));
    }
    Ok(decimal_text(&bytes, scale))
}

/// The exact text of `unscaled * 10^-scale`, `unscaled` being big-endian two's
/// complement of any length (Java's `BigInteger.toByteArray`).
pub fn decimal_text(unscaled: &[u8], scale: i32) -> String {
    let negative = unscaled.first().is_some_and(|b| b & 0x80 != 0);
    let mut magnitude = unscaled.to_vec();
    if negative {
        // Two's complement negation: invert, then add one.
        for b in &mut magnitude {
            *b = !*b;
        }
        for b in magnitude.iter_mut().rev() {
            let (sum, carry) = b.overflowing_add(1);
            *b = sum;
            if !carry {
                break;
            }
        }
    }
    let mut digits = magnitude_digits(&magnitude);
    let zero = digits == "0";
    if scale < 0 {
        if !zero {
            digits.extend(std::iter::repeat_n('0', scale.unsigned_abs() as usize));
        }
    } else if scale > 0 {
        let scale = scale as usize;
        if digits.len() <= scale {
            let pad = scale + 1 - digits.len();
            digits.insert_str(0, &"0".repeat(pad));
        }
        digits.insert(digits.len() - scale, '.');
    }
    if negative && !zero {
        digits.insert(0, '-');
    }
    digits
}

/// Decimal digits of an unsigned big-endian integer: repeated division by
/// 10^9 over base-256 digits.
fn magnitude_digits(bytes: &[u8]) -> String {
    const CHUNK: u64 = 1_000_000_000;
    let mut n: Vec<u8> = bytes.iter().copied().skip_while(|b| *b == 0).collect();
    if n.is_empty() {
        return "0".into();
    }
    let mut chunks = Vec::new();
    while !n.is_empty() {
        let mut rem: u64 = 0;
        let mut quotient = Vec::with_capacity(n.len());
        for &b in &n {
            let cur = (rem << 8) | u64::from(b);
            let q = cur / CHUNK;
            rem = cur % CHUNK;
            if !(quotient.is_empty() && q == 0) {
                // q < 256 because rem < CHUNK before the shift.
                quotient.push(q as u8);
            }
        }
        chunks.push(rem as u32);
        n = quotient;
    }
    let mut out = chunks.pop().map(|c| c.to_string()).unwrap_or_default();
    for c in chunks.iter().rev() {
        out.push_str(&format!("{c:09}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pairs: &[(&str, Value)]) -> Row {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    /// A PostgreSQL connector insert with the JSON converter's schema.
    const PG_INSERT_WITH_SCHEMA: &str = r#"{
      "schema": {
        "type": "struct",
        "fields": [
          {"type": "struct", "fields": [
            {"type": "int32", "optional": false, "default": 0, "field": "id"},
            {"type": "string", "optional": false, "field": "email"},
            {"type": "bytes", "optional": true, "name": "org.apache.kafka.connect.data.Decimal", "version": 1, "parameters": {"scale": "2", "connect.decimal.precision": "10"}, "field": "balance"},
            {"type": "int64", "optional": true, "name": "io.debezium.time.MicroTimestamp", "version": 1, "field": "created_at"},
            {"type": "string", "optional": true, "name": "io.debezium.time.ZonedTimestamp", "version": 1, "field": "updated_at"},
            {"type": "int32", "optional": true, "name": "io.debezium.time.Date", "version": 1, "field": "birthday"},
            {"type": "string", "optional": true, "name": "io.debezium.data.Uuid", "version": 1, "field": "external_id"},
            {"type": "string", "optional": true, "name": "io.debezium.data.Json", "version": 1, "field": "prefs"},
            {"type": "boolean", "optional": true, "field": "active"},
            {"type": "double", "optional": true, "field": "score"},
            {"type": "bytes", "optional": true, "field": "avatar"},
            {"type": "array", "optional": true, "items": {"type": "string"}, "field": "tags"},
            {"type": "struct", "optional": true, "name": "io.debezium.data.VariableScaleDecimal", "fields": [{"type": "int32", "field": "scale"}, {"type": "bytes", "field": "value"}], "field": "ratio"}
          ], "optional": true, "name": "dbserver1.public.customers.Value", "field": "before"},
          {"type": "struct", "fields": [
            {"type": "int32", "optional": false, "default": 0, "field": "id"},
            {"type": "string", "optional": false, "field": "email"},
            {"type": "bytes", "optional": true, "name": "org.apache.kafka.connect.data.Decimal", "version": 1, "parameters": {"scale": "2", "connect.decimal.precision": "10"}, "field": "balance"},
            {"type": "int64", "optional": true, "name": "io.debezium.time.MicroTimestamp", "version": 1, "field": "created_at"},
            {"type": "string", "optional": true, "name": "io.debezium.time.ZonedTimestamp", "version": 1, "field": "updated_at"},
            {"type": "int32", "optional": true, "name": "io.debezium.time.Date", "version": 1, "field": "birthday"},
            {"type": "string", "optional": true, "name": "io.debezium.data.Uuid", "version": 1, "field": "external_id"},
            {"type": "string", "optional": true, "name": "io.debezium.data.Json", "version": 1, "field": "prefs"},
            {"type": "boolean", "optional": true, "field": "active"},
            {"type": "double", "optional": true, "field": "score"},
            {"type": "bytes", "optional": true, "field": "avatar"},
            {"type": "array", "optional": true, "items": {"type": "string"}, "field": "tags"},
            {"type": "struct", "optional": true, "name": "io.debezium.data.VariableScaleDecimal", "fields": [{"type": "int32", "field": "scale"}, {"type": "bytes", "field": "value"}], "field": "ratio"}
          ], "optional": true, "name": "dbserver1.public.customers.Value", "field": "after"},
          {"type": "struct", "fields": [
            {"type": "string", "optional": false, "field": "version"},
            {"type": "string", "optional": false, "field": "connector"},
            {"type": "string", "optional": false, "field": "name"},
            {"type": "int64", "optional": false, "field": "ts_ms"},
            {"type": "string", "optional": true, "name": "io.debezium.data.Enum", "version": 1, "parameters": {"allowed": "true,last,false,incremental"}, "default": "false", "field": "snapshot"},
            {"type": "string", "optional": false, "field": "db"},
            {"type": "string", "optional": false, "field": "schema"},
            {"type": "string", "optional": false, "field": "table"},
            {"type": "int64", "optional": true, "field": "txId"},
            {"type": "int64", "optional": true, "field": "lsn"}
          ], "optional": false, "name": "io.debezium.connector.postgresql.Source", "field": "source"},
          {"type": "string", "optional": false, "field": "op"},
          {"type": "int64", "optional": true, "field": "ts_ms"},
          {"type": "struct", "fields": [
            {"type": "string", "optional": false, "field": "id"},
            {"type": "int64", "optional": false, "field": "total_order"},
            {"type": "int64", "optional": false, "field": "data_collection_order"}
          ], "optional": true, "name": "event.block", "version": 1, "field": "transaction"}
        ],
        "optional": false,
        "name": "dbserver1.public.customers.Envelope",
        "version": 1
      },
      "payload": {
        "before": null,
        "after": {
          "id": 1004,
          "email": "annek@noanswer.org",
          "balance": "AOU=",
          "created_at": 1709287872123456,
          "updated_at": "2024-03-01T10:11:12.5Z",
          "birthday": 19783,
          "external_id": "67e55044-10b1-426f-9247-bb680e5fe0c8",
          "prefs": "{\"theme\":\"dark\"}",
          "active": true,
          "score": 4.5,
          "avatar": "AQID",
          "tags": ["a", "b"],
          "ratio": {"scale": 3, "value": "/w=="}
        },
        "source": {
          "version": "2.5.0.Final",
          "connector": "postgresql",
          "name": "dbserver1",
          "ts_ms": 1709287872000,
          "snapshot": "false",
          "db": "shop",
          "sequence": "[\"24023119\",\"24023128\"]",
          "schema": "public",
          "table": "customers",
          "txId": 555,
          "lsn": 24023128,
          "xmin": null
        },
        "op": "c",
        "ts_ms": 1709287872300,
        "transaction": {"id": "555:24023128", "total_order": 1, "data_collection_order": 1}
      }
    }"#;

    #[test]
    fn postgres_insert_with_schema() {
        let ev = decode(PG_INSERT_WITH_SCHEMA.as_bytes()).unwrap();
        assert_eq!(ev.table, "public.customers");
        assert_eq!(ev.txn_id.as_deref(), Some("555:24023128"));
        assert_eq!(ev.commit_micros, 1_709_287_872_000_000);
        let change = ev.change.unwrap();
        assert_eq!(change.op, Op::Insert);
        assert_eq!(change.table, "public.customers");
        assert!(change.before.is_none());
        let after = change.after.unwrap();
        let uuid = uuid::Uuid::parse_str("67e55044-10b1-426f-9247-bb680e5fe0c8").unwrap();
        assert_eq!(
            after,
            row(&[
                ("id", Value::Int(1004)),
                ("email", Value::Text("annek@noanswer.org".into())),
                ("balance", Value::Decimal("2.29".into())),
                ("created_at", Value::Timestamp(1_709_287_872_123_456)),
                (
                    "updated_at",
                    Value::Timestamp(parse_timestamp("2024-03-01T10:11:12.5Z").unwrap())
                ),
                ("birthday", Value::Date(parse_date("2024-03-01").unwrap())),
                ("external_id", Value::Uuid(*uuid.as_bytes())),
                ("prefs", Value::Json("{\"theme\":\"dark\"}".into())),
                ("active", Value::Bool(true)),
                ("score", Value::Float(4.5)),
                ("avatar", Value::Bytes(vec![1, 2, 3])),
                ("tags", Value::Json("[\"a\",\"b\"]".into())),
                ("ratio", Value::Decimal("-0.001".into())),
            ])
        );
    }

    #[test]
    fn mysql_update_without_schema() {
        let msg = r#"{
          "before": {"id": 1004, "first_name": "Anne", "email": "annek@noanswer.org"},
          "after": {"id": 1004, "first_name": "Anne Marie", "email": "annek@noanswer.org"},
          "source": {
            "version": "2.5.0.Final", "connector": "mysql", "name": "mysqlserver1",
            "ts_ms": 1465581029000, "snapshot": "false", "db": "inventory",
            "table": "customers", "server_id": 223344, "gtid": null,
            "file": "mysql-bin.000003", "pos": 484, "row": 0, "thread": 7, "query": null
          },
          "op": "u",
          "ts_ms": 1465581029523,
          "transaction": null
        }"#;
        let ev = decode(msg.as_bytes()).unwrap();
        assert_eq!(ev.table, "inventory.customers");
        assert_eq!(ev.txn_id, None);
        assert_eq!(ev.commit_micros, 1_465_581_029_000_000);
        let change = ev.change.unwrap();
        assert_eq!(change.op, Op::Update);
        assert_eq!(
            change.before.unwrap().get("first_name"),
            Some(&Value::Text("Anne".into()))
        );
        assert_eq!(
            change.after.unwrap().get("first_name"),
            Some(&Value::Text("Anne Marie".into()))
        );
    }

    #[test]
    fn delete_keeps_before_image() {
        let msg = r#"{"schema": null, "payload": {
          "before": {"id": 7, "name": "x"}, "after": null,
          "source": {"connector": "postgresql", "db": "shop", "schema": "public", "table": "orders", "ts_us": 1700000000123456},
          "op": "d", "ts_ms": 1700000000200,
          "transaction": {"id": "771:99", "total_order": 2, "data_collection_order": 1}
        }}"#;
        let ev = decode(msg.as_bytes()).unwrap();
        assert_eq!(ev.commit_micros, 1_700_000_000_123_456);
        assert_eq!(ev.txn_id.as_deref(), Some("771:99"));
        let change = ev.change.unwrap();
        assert_eq!(change.op, Op::Delete);
        assert_eq!(change.table, "public.orders");
        assert!(change.after.is_none());
        assert_eq!(change.before.unwrap().get("id"), Some(&Value::Int(7)));
    }

    #[test]
    fn tombstones_and_non_row_events_are_skipped() {
        for msg in [
            "",
            "  \n",
            "null",
            r#"{"schema": null, "payload": null}"#,
            // heartbeat
            r#"{"ts_ms": 1700000000000}"#,
            // transaction boundary
            r#"{"status": "END", "id": "571:53195832", "ts_ms": 1700000000000, "event_count": 2, "data_collections": []}"#,
            // schema change
            r#"{"source": {"db": "inventory", "table": "customers", "ts_ms": 1}, "databaseName": "inventory", "ddl": "ALTER TABLE customers ADD COLUMN x INT", "tableChanges": []}"#,
            // logical decoding message
            r#"{"op": "m", "ts_ms": 1, "source": {"db": "shop", "schema": "", "table": ""}, "message": {"prefix": "p", "content": "aGk="}}"#,
        ] {
            let ev = decode(msg.as_bytes()).unwrap_or_else(|e| panic!("{msg}: {e}"));
            assert!(ev.change.is_none(), "{msg}");
        }
    }

    #[test]
    fn truncate_has_table_and_no_rows() {
        let msg = r#"{"before": null, "after": null,
          "source": {"connector": "postgresql", "db": "shop", "schema": "public", "table": "orders", "ts_ms": 1700000000000},
          "op": "t", "ts_ms": 1700000000100}"#;
        let ev = decode(msg.as_bytes()).unwrap();
        let change = ev.change.unwrap();
        assert_eq!(change.op, Op::Truncate);
        assert_eq!(change.table, "public.orders");
        assert!(change.before.is_none() && change.after.is_none());
    }

    #[test]
    fn snapshot_read_is_read() {
        let msg = r#"{"before": null, "after": {"id": 1},
          "source": {"db": "inventory", "table": "customers", "ts_ms": 5, "snapshot": "true"},
          "op": "r"}"#;
        let ev = decode(msg.as_bytes()).unwrap();
        assert_eq!(ev.change.unwrap().op, Op::Read);
        assert_eq!(ev.commit_micros, 5000);
    }

    #[test]
    fn decimals_are_exact() {
        // 229 with scale 2.
        assert_eq!(decimal_from_base64("AOU=", 2).unwrap(), "2.29");
        // 0xff1b = -229.
        assert_eq!(decimal_text(&[0xff, 0x1b], 2), "-2.29");
        assert_eq!(decimal_text(&[0xff], 0), "-1");
        assert_eq!(decimal_text(&[0x80], 0), "-128");
        assert_eq!(decimal_text(&[0xff, 0xfb], 3), "-0.005");
        assert_eq!(decimal_text(&[0x05], 2), "0.05");
        assert_eq!(decimal_text(&[0x00], 2), "0.00");
        assert_eq!(decimal_text(&[], 0), "0");
        assert_eq!(decimal_text(&[0x01, 0x00], 0), "256");
        assert_eq!(decimal_text(&[0x0c], -2), "1200");
        // 2^64 and -(2^64): longer than any machine integer.
        let mut big = vec![0x01];
        big.extend([0u8; 8]);
        assert_eq!(decimal_text(&big, 0), "18446744073709551616");
        assert_eq!(decimal_text(&big, 4), "1844674407370955.1616");
        let mut neg = vec![0xff];
        neg.extend([0u8; 8]);
        assert_eq!(decimal_text(&neg, 0), "-18446744073709551616");
        // 10^30: crosses several 10^9 chunks with inner zeros.
        let mut ten30 = vec![0u8; 13];
        let mut v: u128 = 10u128.pow(30);
        for b in ten30.iter_mut().rev() {
            *b = (v & 0xff) as u8;
            v >>= 8;
        }
        assert_eq!(decimal_text(&ten30, 0), format!("1{}", "0".repeat(30)));
        assert!(decimal_from_base64("not base64!", 2).is_err());
        // Longer than accepted: refused before decoding (a 1 MB one would
        // take minutes to turn into digits).
        use base64::Engine;
        let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![0x7f; n]);
        assert!(decimal_from_base64(&b64(MAX_DECIMAL_BYTES), 0).is_ok());
        let err = decimal_from_base64(&b64(1 << 20), 0).unwrap_err();
        assert!(err.contains("longer than the 4096 bytes"), "{err}");
    }

    #[test]
    fn timestamps_by_semantic_type() {
        let ts = |name: &str, v: Json| {
            convert(&serde_json::json!({"type": "int64", "name": name}), &v).unwrap()
        };
        assert_eq!(
            ts("io.debezium.time.Timestamp", 1_700_000_000_123u64.into()),
            Value::Timestamp(1_700_000_000_123_000)
        );
        assert_eq!(
            ts(
                "org.apache.kafka.connect.data.Timestamp",
                1_700_000_000_123u64.into()
            ),
            Value::Timestamp(1_700_000_000_123_000)
        );
        assert_eq!(
            ts(
                "io.debezium.time.MicroTimestamp",
                1_700_000_000_123_456u64.into()
            ),
            Value::Timestamp(1_700_000_000_123_456)
        );
        assert_eq!(
            ts(
                "io.debezium.time.NanoTimestamp",
                1_700_000_000_123_456_789u64.into()
            ),
            Value::Timestamp(1_700_000_000_123_456)
        );
        assert_eq!(
            ts("io.debezium.time.NanoTimestamp", (-1i64).into()),
            Value::Timestamp(-1)
        );
        assert_eq!(
            ts(
                "io.debezium.time.ZonedTimestamp",
                "2024-03-01T10:00:00+01:00".into()
            ),
            Value::Timestamp(parse_timestamp("2024-03-01T09:00:00Z").unwrap())
        );
        assert_eq!(
            ts("org.apache.kafka.connect.data.Date", 19783.into()),
            Value::Date(19783)
        );
        // An unknown semantic name falls back to the Connect type.
        assert_eq!(ts("io.debezium.time.MicroTime", 5.into()), Value::Int(5));
        assert!(
            convert(
                &serde_json::json!({"type": "string", "name": "io.debezium.time.ZonedTimestamp"}),
                &"yesterday".into()
            )
            .is_err()
        );
    }

    #[test]
    fn a_hostile_decimal_scale_is_refused() {
        assert!(decimal_from_base64("AOU=", i32::MAX).is_err());
        assert!(decimal_from_base64("AOU=", -2_000_000_000).is_err());
        assert_eq!(decimal_from_base64("AOU=", 2).unwrap(), "2.29");
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(matches!(decode(b"{not json"), Err(DecodeError::Json(_))));
        assert!(matches!(decode(b"[1,2]"), Err(DecodeError::NotObject(_))));
        let unknown = r#"{"op": "x", "after": {"id": 1}, "source": {"db": "d", "table": "t"}}"#;
        let err = decode(unknown.as_bytes()).unwrap_err();
        assert_eq!(err.to_string(), "unknown op \"x\"");
        let no_op = r#"{"after": {"id": 1}, "source": {"db": "d", "table": "t"}}"#;
        let err = decode(no_op.as_bytes()).unwrap_err();
        assert_eq!(err.to_string(), "missing field payload.op");
        let no_table = r#"{"op": "c", "after": {"id": 1}, "source": {"db": "d"}}"#;
        assert!(decode(no_table.as_bytes()).is_err());
        let no_after = r#"{"op": "c", "after": null, "source": {"db": "d", "table": "t"}}"#;
        assert_eq!(
            decode(no_after.as_bytes()).unwrap_err().to_string(),
            "missing field payload.after"
        );
        // A value that contradicts its schema names the column.
        let bad_value = PG_INSERT_WITH_SCHEMA.replace("\"AOU=\"", "\"@@\"");
        let err = decode(bad_value.as_bytes()).unwrap_err().to_string();
        assert!(err.starts_with("field after.balance: bad base64"), "{err}");
        assert_eq!(
            peek_table(bad_value.as_bytes()).as_deref(),
            Some("public.customers")
        );
    }
}
