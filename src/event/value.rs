//! Typed cell values and rows.

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

/// A row: column name to value.
pub type Row = BTreeMap<String, Value>;

/// One typed cell value. The set is the fabric's wire type system: every
/// source maps its column types onto it, and gRPC carries it unchanged.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// An exact decimal in plain text (`"-12.50"`): never rounded through a float.
    Decimal(String),
    Text(String),
    Bytes(Vec<u8>),
    /// Microseconds since the Unix epoch, UTC.
    Timestamp(i64),
    /// Days since 1970-01-01.
    Date(i32),
    Uuid([u8; 16]),
    /// A JSON document, kept as its text.
    Json(String),
}

impl Value {
    fn rank(&self) -> u8 {
        match self {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Int(_) => 2,
            Value::Float(_) => 3,
            Value::Decimal(_) => 4,
            Value::Text(_) => 5,
            Value::Bytes(_) => 6,
            Value::Timestamp(_) => 7,
            Value::Date(_) => 8,
            Value::Uuid(_) => 9,
            Value::Json(_) => 10,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The canonical text of a value used as an entity id or in a link:
    /// integers in decimal, UUIDs hyphenated, text as is. `None` for values
    /// that cannot identify anything (null, floats, JSON).
    pub fn id_text(&self) -> Option<String> {
        match self {
            Value::Int(i) => Some(i.to_string()),
            Value::Text(s) | Value::Decimal(s) => Some(s.clone()),
            Value::Uuid(u) => Some(uuid::Uuid::from_bytes(*u).hyphenated().to_string()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Date(d) => Some(d.to_string()),
            Value::Timestamp(t) => Some(t.to_string()),
            Value::Bytes(_) | Value::Null | Value::Float(_) | Value::Json(_) => None,
        }
    }

    /// Converts a JSON value without schema: numbers become int or float,
    /// strings text, objects and arrays JSON.
    pub fn from_json(v: &serde_json::Value) -> Value {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::Text(s.clone()),
            other => Value::Json(other.to_string()),
        }
    }

    /// The value as JSON, for the CLI and JSON outputs: timestamps RFC 3339,
    /// dates ISO, bytes base64, decimals as strings (exactness first).
    pub fn to_json(&self) -> serde_json::Value {
        use base64::Engine;
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => (*b).into(),
            Value::Int(i) => (*i).into(),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Decimal(s) | Value::Text(s) => s.clone().into(),
            Value::Bytes(b) => base64::engine::general_purpose::STANDARD.encode(b).into(),
            Value::Timestamp(t) => format_timestamp(*t).into(),
            Value::Date(d) => format_date(*d).into(),
            Value::Uuid(u) => uuid::Uuid::from_bytes(*u).hyphenated().to_string().into(),
            Value::Json(s) => serde_json::from_str(s).unwrap_or_else(|_| s.clone().into()),
        }
    }
}

/// RFC 3339 text of microseconds since the epoch.
pub fn format_timestamp(micros: i64) -> String {
    match chrono::DateTime::from_timestamp_micros(micros) {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        None => micros.to_string(),
    }
}

/// ISO 8601 text of days since 1970-01-01.
pub fn format_date(days: i32) -> String {
    chrono::NaiveDate::from_ymd_opt(1970, 1, 1)
        .and_then(|d| d.checked_add_signed(chrono::TimeDelta::days(days as i64)))
        .map(|d| d.to_string())
        .unwrap_or_else(|| days.to_string())
}

/// Days since 1970-01-01 of an ISO date (`2024-03-01`).
pub fn parse_date(s: &str) -> Option<i32> {
    let d = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?;
    i32::try_from((d - epoch).num_days()).ok()
}

/// Microseconds since the epoch of an RFC 3339 or `YYYY-MM-DD HH:MM:SS[.f]`
/// (taken as UTC) timestamp.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_micros());
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, fmt) {
            return Some(t.and_utc().timestamp_micros());
        }
    }
    None
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Value {}

impl PartialOrd for Value {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Value {
    /// A total order (floats by `total_cmp`), so values can key rows.
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Value::Bool(a), Value::Bool(b)) => a.cmp(b),
            (Value::Int(a), Value::Int(b)) => a.cmp(b),
            (Value::Float(a), Value::Float(b)) => a.total_cmp(b),
            (Value::Decimal(a), Value::Decimal(b))
            | (Value::Text(a), Value::Text(b))
            | (Value::Json(a), Value::Json(b)) => a.cmp(b),
            (Value::Bytes(a), Value::Bytes(b)) => a.cmp(b),
            (Value::Timestamp(a), Value::Timestamp(b)) => a.cmp(b),
            (Value::Date(a), Value::Date(b)) => a.cmp(b),
            (Value::Uuid(a), Value::Uuid(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Text(s) | Value::Decimal(s) | Value::Json(s) => f.write_str(s),
            other => match other.to_json() {
                serde_json::Value::String(s) => f.write_str(&s),
                j => write!(f, "{j}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_timestamps_round_trip() {
        let d = parse_date("2024-02-29").unwrap();
        assert_eq!(format_date(d), "2024-02-29");
        let t = parse_timestamp("2024-02-29T10:11:12.5Z").unwrap();
        assert_eq!(format_timestamp(t), "2024-02-29T10:11:12.500Z");
        assert_eq!(
            parse_timestamp("2024-02-29 10:11:12").unwrap(),
            parse_timestamp("2024-02-29T10:11:12Z").unwrap()
        );
    }

    #[test]
    fn ids_are_canonical() {
        assert_eq!(Value::Int(42).id_text().as_deref(), Some("42"));
        assert_eq!(Value::Null.id_text(), None);
        assert_eq!(Value::Float(1.0).id_text(), None);
    }

    #[test]
    fn json_numbers_keep_integers() {
        assert_eq!(Value::from_json(&serde_json::json!(7)), Value::Int(7));
        assert_eq!(Value::from_json(&serde_json::json!(7.5)), Value::Float(7.5));
    }
}
