//! Stored rows: a row's values packed into one buffer, its column names
//! shared by every stored row of the same shape.
//!
//! A change event carries a [`Row`] (a `BTreeMap` of column name to
//! [`Value`]): convenient to build and route, but in memory it is a B-tree
//! node of eleven 24-byte keys and eleven 32-byte values per row, a heap
//! string per column name and per text value. Kept that way, 100,000
//! customers of 8 rows held 1,305 bytes per row for 85 raw bytes
//! (BENCHMARKS.md, run 1). A [`StoredRow`] is what the micro-DB keeps instead:
//!
//! - the column names, sorted, in one [`Columns`] interned per shape (every
//!   `orders` row of a source points at the same one);
//! - the values in column order, each a tag byte and its payload (varints
//!   for integers, a length and the bytes for text), in one `Arc<[u8]>`.
//!
//! Versions share rows: cloning a `StoredRow` is two reference counts. Rows
//! are read back as [`ValueRef`]s borrowing the buffer, so encoding a
//! response copies each value once, into the response.
//!
//! Serialized (snapshots, the state topic) a stored row is the same map of
//! column name to value a `Row` is, byte for byte: the snapshot format does
//! not depend on the in-memory one.

use crate::event::{Row, Value};
use prost::encoding::{decode_varint, encode_varint};
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, LazyLock, Mutex};

thread_local! {
    /// The buffer rows are packed in before they get their own allocation.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A scratch buffer grown past this by one huge row is not kept.
const SCRATCH_KEEP: usize = 64 << 10;

/// A row's primary key: its key columns' values, in key order.
///
/// Most keys are one value, kept inline (no allocation, and copying an
/// integer key for a new version copies 24 bytes); longer keys are boxed.
/// Compares and serializes as the slice of its values, so a table's
/// order and its serialized form are those of `Box<[Value]>` keys.
#[derive(Clone)]
pub struct Pk(PkRepr);

#[derive(Clone)]
enum PkRepr {
    One(Value),
    Many(Box<[Value]>),
}

impl Pk {
    pub fn as_slice(&self) -> &[Value] {
        match &self.0 {
            PkRepr::One(v) => std::slice::from_ref(v),
            PkRepr::Many(vs) => vs,
        }
    }
}

impl From<&[Value]> for Pk {
    fn from(values: &[Value]) -> Self {
        match values {
            [one] => Pk(PkRepr::One(one.clone())),
            many => Pk(PkRepr::Many(many.into())),
        }
    }
}

impl From<Vec<Value>> for Pk {
    fn from(mut values: Vec<Value>) -> Self {
        if values.len() == 1
            && let Some(one) = values.pop()
        {
            return Pk(PkRepr::One(one));
        }
        Pk(PkRepr::Many(values.into_boxed_slice()))
    }
}

impl std::borrow::Borrow<[Value]> for Pk {
    fn borrow(&self) -> &[Value] {
        self.as_slice()
    }
}

impl std::ops::Deref for Pk {
    type Target = [Value];
    fn deref(&self) -> &[Value] {
        self.as_slice()
    }
}

impl PartialEq for Pk {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Pk {}

impl PartialOrd for Pk {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pk {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_slice().cmp(other.as_slice())
    }
}

impl std::fmt::Debug for Pk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_slice().fmt(f)
    }
}

impl Serialize for Pk {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.as_slice().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Pk {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<Value>::deserialize(d).map(Pk::from)
    }
}

/// The sorted column names of one row shape.
#[derive(PartialEq, Eq)]
pub struct Columns {
    names: Box<[Box<str>]>,
}

impl Columns {
    fn names(&self) -> impl ExactSizeIterator<Item = &str> {
        self.names.iter().map(|n| &**n)
    }

    fn same_as<'a>(&self, names: impl ExactSizeIterator<Item = &'a str>) -> bool {
        names.len() == self.names.len() && names.zip(self.names.iter()).all(|(a, b)| a == &**b)
    }
}

/// Distinct shapes interned process-wide at most; rows of further shapes get
/// column names of their own (correct, only larger). A source whose rows
/// have ever-new column sets (a JSON file source, say) cannot grow the
/// interner without bound.
const MAX_SHAPES: usize = 4096;
/// Shapes remembered per thread in front of the shared interner.
const THREAD_SHAPES: usize = 32;

/// Interned shapes by a hash of their names, and how many there are.
#[derive(Default)]
struct Shapes {
    by_hash: HashMap<u64, Vec<Arc<Columns>>>,
    count: usize,
}

static SHAPES: LazyLock<Mutex<Shapes>> = LazyLock::new(Default::default);

thread_local! {
    static RECENT: RefCell<Vec<Arc<Columns>>> = const { RefCell::new(Vec::new()) };
}

/// The shared `Columns` for these sorted names.
fn intern<'a>(names: impl ExactSizeIterator<Item = &'a str> + Clone) -> Arc<Columns> {
    let hit =
        RECENT.with_borrow(|recent| recent.iter().find(|c| c.same_as(names.clone())).cloned());
    if let Some(c) = hit {
        return c;
    }
    let mut h = DefaultHasher::new();
    for n in names.clone() {
        n.hash(&mut h);
    }
    let hash = h.finish();
    let make = || {
        Arc::new(Columns {
            names: names.clone().map(Box::from).collect(),
        })
    };
    let columns = {
        let mut shapes = SHAPES.lock().unwrap_or_else(|p| p.into_inner());
        let Shapes { by_hash, count } = &mut *shapes;
        let bucket = by_hash.entry(hash).or_default();
        match bucket.iter().find(|c| c.same_as(names.clone())) {
            Some(c) => c.clone(),
            None if *count >= MAX_SHAPES => return make(),
            None => {
                *count += 1;
                let c = make();
                bucket.push(c.clone());
                c
            }
        }
    };
    RECENT.with_borrow_mut(|recent| {
        if recent.len() == THREAD_SHAPES {
            recent.remove(0);
        }
        recent.push(columns.clone());
    });
    columns
}

/// A value borrowed from a stored row (or from a [`Value`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueRef<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Decimal(&'a str),
    Text(&'a str),
    Bytes(&'a [u8]),
    Timestamp(i64),
    Date(i32),
    Uuid([u8; 16]),
    Json(&'a str),
}

impl ValueRef<'_> {
    pub fn to_owned(self) -> Value {
        match self {
            ValueRef::Null => Value::Null,
            ValueRef::Bool(b) => Value::Bool(b),
            ValueRef::Int(i) => Value::Int(i),
            ValueRef::Float(f) => Value::Float(f),
            ValueRef::Decimal(s) => Value::Decimal(s.to_string()),
            ValueRef::Text(s) => Value::Text(s.to_string()),
            ValueRef::Bytes(b) => Value::Bytes(b.to_vec()),
            ValueRef::Timestamp(t) => Value::Timestamp(t),
            ValueRef::Date(d) => Value::Date(d),
            ValueRef::Uuid(u) => Value::Uuid(u),
            ValueRef::Json(s) => Value::Json(s.to_string()),
        }
    }
}

impl Value {
    pub fn as_value_ref(&self) -> ValueRef<'_> {
        match self {
            Value::Null => ValueRef::Null,
            Value::Bool(b) => ValueRef::Bool(*b),
            Value::Int(i) => ValueRef::Int(*i),
            Value::Float(f) => ValueRef::Float(*f),
            Value::Decimal(s) => ValueRef::Decimal(s),
            Value::Text(s) => ValueRef::Text(s),
            Value::Bytes(b) => ValueRef::Bytes(b),
            Value::Timestamp(t) => ValueRef::Timestamp(*t),
            Value::Date(d) => ValueRef::Date(*d),
            Value::Uuid(u) => ValueRef::Uuid(*u),
            Value::Json(s) => ValueRef::Json(s),
        }
    }
}

/// `Value`'s serialized form (its derived `Serialize`: the variant index and
/// name, then the payload), written from a borrowed value.
impl Serialize for ValueRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        /// `Vec<u8>` serializes as a sequence of bytes, not as bytes.
        struct Seq<'a>(&'a [u8]);
        impl Serialize for Seq<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0)
            }
        }
        const N: &str = "Value";
        match *self {
            ValueRef::Null => s.serialize_unit_variant(N, 0, "Null"),
            ValueRef::Bool(b) => s.serialize_newtype_variant(N, 1, "Bool", &b),
            ValueRef::Int(i) => s.serialize_newtype_variant(N, 2, "Int", &i),
            ValueRef::Float(f) => s.serialize_newtype_variant(N, 3, "Float", &f),
            ValueRef::Decimal(d) => s.serialize_newtype_variant(N, 4, "Decimal", d),
            ValueRef::Text(t) => s.serialize_newtype_variant(N, 5, "Text", t),
            ValueRef::Bytes(b) => s.serialize_newtype_variant(N, 6, "Bytes", &Seq(b)),
            ValueRef::Timestamp(t) => s.serialize_newtype_variant(N, 7, "Timestamp", &t),
            ValueRef::Date(d) => s.serialize_newtype_variant(N, 8, "Date", &d),
            ValueRef::Uuid(u) => s.serialize_newtype_variant(N, 9, "Uuid", &u),
            ValueRef::Json(j) => s.serialize_newtype_variant(N, 10, "Json", j),
        }
    }
}

// Tags of the packed encoding. Not `Value`'s serde indices on purpose:
// booleans take no payload byte, and the two are free to change apart.
const NULL: u8 = 0;
const FALSE: u8 = 1;
const TRUE: u8 = 2;
const INT: u8 = 3;
const FLOAT: u8 = 4;
const DECIMAL: u8 = 5;
const TEXT: u8 = 6;
const BYTES: u8 = 7;
const TIMESTAMP: u8 = 8;
const DATE: u8 = 9;
const UUID: u8 = 10;
const JSON: u8 = 11;

fn zigzag(i: i64) -> u64 {
    ((i << 1) ^ (i >> 63)) as u64
}

fn unzigzag(u: u64) -> i64 {
    ((u >> 1) as i64) ^ -((u & 1) as i64)
}

fn pack_value(buf: &mut Vec<u8>, v: ValueRef<'_>) {
    let with_bytes = |tag: u8, b: &[u8], buf: &mut Vec<u8>| {
        buf.push(tag);
        encode_varint(b.len() as u64, buf);
        buf.extend_from_slice(b);
    };
    match v {
        ValueRef::Null => buf.push(NULL),
        ValueRef::Bool(false) => buf.push(FALSE),
        ValueRef::Bool(true) => buf.push(TRUE),
        ValueRef::Int(i) => {
            buf.push(INT);
            encode_varint(zigzag(i), buf);
        }
        ValueRef::Float(f) => {
            buf.push(FLOAT);
            buf.extend_from_slice(&f.to_le_bytes());
        }
        ValueRef::Decimal(s) => with_bytes(DECIMAL, s.as_bytes(), buf),
        ValueRef::Text(s) => with_bytes(TEXT, s.as_bytes(), buf),
        ValueRef::Bytes(b) => with_bytes(BYTES, b, buf),
        ValueRef::Timestamp(t) => {
            buf.push(TIMESTAMP);
            encode_varint(zigzag(t), buf);
        }
        ValueRef::Date(d) => {
            buf.push(DATE);
            encode_varint(zigzag(d as i64), buf);
        }
        ValueRef::Uuid(u) => {
            buf.push(UUID);
            buf.extend_from_slice(&u);
        }
        ValueRef::Json(s) => with_bytes(JSON, s.as_bytes(), buf),
    }
}

/// The value at the start of `buf`, which moves past it. The buffer was
/// written by [`pack_value`] and never changes, so anything else is a bug.
fn unpack_value<'a>(buf: &mut &'a [u8]) -> ValueRef<'a> {
    const BUG: &str = "a stored row holds only what pack_value wrote";
    let (&tag, rest) = buf.split_first().expect(BUG);
    *buf = rest;
    let varint = |buf: &mut &'a [u8]| decode_varint(buf).expect(BUG);
    let take = |buf: &mut &'a [u8], n: usize| {
        let (head, rest) = buf.split_at(n);
        *buf = rest;
        head
    };
    let text = |b: &'a [u8]| std::str::from_utf8(b).expect(BUG);
    match tag {
        NULL => ValueRef::Null,
        FALSE => ValueRef::Bool(false),
        TRUE => ValueRef::Bool(true),
        INT => ValueRef::Int(unzigzag(varint(buf))),
        FLOAT => ValueRef::Float(f64::from_le_bytes(take(buf, 8).try_into().expect(BUG))),
        TIMESTAMP => ValueRef::Timestamp(unzigzag(varint(buf))),
        DATE => ValueRef::Date(unzigzag(varint(buf)) as i32),
        UUID => ValueRef::Uuid(take(buf, 16).try_into().expect(BUG)),
        DECIMAL | TEXT | BYTES | JSON => {
            let n = varint(buf) as usize;
            let b = take(buf, n);
            match tag {
                DECIMAL => ValueRef::Decimal(text(b)),
                TEXT => ValueRef::Text(text(b)),
                JSON => ValueRef::Json(text(b)),
                _ => ValueRef::Bytes(b),
            }
        }
        _ => panic!("{BUG}"),
    }
}

/// One row as the micro-DB keeps it.
#[derive(Clone)]
pub struct StoredRow {
    columns: Arc<Columns>,
    data: Arc<[u8]>,
}

impl StoredRow {
    /// Packs `row`.
    pub fn pack(row: &Row) -> StoredRow {
        Self::from_sorted(row.iter().map(|(c, v)| (c.as_str(), v.as_value_ref())))
    }

    /// Packs columns given in ascending name order (a `Row`'s order).
    fn from_sorted<'a>(
        cols: impl ExactSizeIterator<Item = (&'a str, ValueRef<'a>)> + Clone,
    ) -> StoredRow {
        let columns = intern(cols.clone().map(|(c, _)| c));
        // Packed into a reused buffer, then copied once into the row's own
        // allocation (a fresh `Vec` would be a second allocation and a copy).
        let data = SCRATCH.with_borrow_mut(|buf| {
            buf.clear();
            for (_, v) in cols {
                pack_value(buf, v);
            }
            let data = Arc::<[u8]>::from(&buf[..]);
            if buf.capacity() > SCRATCH_KEEP {
                *buf = Vec::new();
            }
            data
        });
        StoredRow { columns, data }
    }

    /// Columns and values, in column name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, ValueRef<'_>)> {
        let mut buf = &self.data[..];
        self.columns
            .names()
            .map(move |c| (c, unpack_value(&mut buf)))
    }

    /// The value of `column`, if the row has it.
    pub fn get(&self, column: &str) -> Option<ValueRef<'_>> {
        self.iter().find(|(c, _)| *c == column).map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.columns.names.len()
    }

    /// About the memory this row holds of its own: its packed values and
    /// their allocation (the column names are shared by rows of one shape).
    pub fn own_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + 16 + self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.columns.names.is_empty()
    }

    /// The row as a change event carries it.
    pub fn to_row(&self) -> Row {
        self.iter()
            .map(|(c, v)| (c.to_string(), v.to_owned()))
            .collect()
    }
}

impl PartialEq for StoredRow {
    fn eq(&self, other: &Self) -> bool {
        (Arc::ptr_eq(&self.columns, &other.columns) || self.columns == other.columns)
            && self.data == other.data
    }
}

impl Eq for StoredRow {}

impl std::fmt::Debug for StoredRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for StoredRow {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.len()))?;
        for (c, v) in self.iter() {
            map.serialize_entry(c, &v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for StoredRow {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RowVisitor;
        impl<'de> Visitor<'de> for RowVisitor {
            type Value = StoredRow;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of column name to value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StoredRow, A::Error> {
                let mut cols: Vec<(String, Value)> =
                    Vec::with_capacity(map.size_hint().unwrap_or(0).min(1024));
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    cols.push(entry);
                }
                if !cols.is_sorted_by(|a, b| a.0 < b.0) {
                    cols.sort_by(|a, b| a.0.cmp(&b.0));
                    cols.dedup_by(|b, a| a.0 == b.0);
                }
                Ok(StoredRow::from_sorted(
                    cols.iter().map(|(c, v)| (c.as_str(), v.as_value_ref())),
                ))
            }
        }
        d.deserialize_map(RowVisitor)
    }
}

/// A row with every kind of value, the edges of the integer ranges among
/// them, for the tests of everything that reads stored rows.
#[cfg(test)]
pub(crate) fn every_value() -> Row {
    [
        ("null", Value::Null),
        ("yes", Value::Bool(true)),
        ("no", Value::Bool(false)),
        ("int", Value::Int(-42)),
        ("zero", Value::Int(0)),
        ("big", Value::Int(i64::MAX)),
        ("small", Value::Int(i64::MIN)),
        ("float", Value::Float(-1.5)),
        ("decimal", Value::Decimal("12.50".into())),
        ("text", Value::Text("grüße".into())),
        ("empty", Value::Text(String::new())),
        ("bytes", Value::Bytes(vec![0, 255, 7])),
        ("ts", Value::Timestamp(-1_000_000)),
        ("date", Value::Date(-3)),
        ("first_date", Value::Date(i32::MIN)),
        ("uuid", Value::Uuid([0xab; 16])),
        ("json", Value::Json("{\"a\":[1]}".into())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_order_and_serialize_as_value_slices() {
        let keys: Vec<Vec<Value>> = vec![
            vec![Value::Int(2)],
            vec![Value::Int(10)],
            vec![Value::Text("a".into())],
            vec![Value::Int(1), Value::Text("b".into())],
            vec![Value::Int(1), Value::Text("a".into())],
            vec![],
        ];
        let mut pks: Vec<Pk> = keys.iter().cloned().map(Pk::from).collect();
        let mut boxed: Vec<Box<[Value]>> =
            keys.iter().cloned().map(Vec::into_boxed_slice).collect();
        pks.sort();
        boxed.sort();
        for (p, b) in pks.iter().zip(&boxed) {
            assert_eq!(p.as_slice(), &b[..]);
            assert_eq!(
                postcard::to_allocvec(p).unwrap(),
                postcard::to_allocvec(b).unwrap()
            );
            let back: Pk = postcard::from_bytes(&postcard::to_allocvec(b).unwrap()).unwrap();
            assert_eq!(&back, p);
            assert_eq!(Pk::from(&b[..]), *p);
        }
    }

    #[test]
    fn every_value_comes_back_as_it_went_in() {
        let row = every_value();
        let stored = StoredRow::pack(&row);
        assert_eq!(stored.to_row(), row);
        assert_eq!(stored.len(), row.len());
        assert_eq!(stored.get("text"), Some(ValueRef::Text("grüße")));
        assert_eq!(stored.get("zz"), None);
        let nan: Row = [("x".to_string(), Value::Float(f64::NAN))].into();
        assert_eq!(StoredRow::pack(&nan).to_row(), nan);
    }

    #[test]
    fn rows_of_one_shape_share_their_column_names() {
        let mut a = every_value();
        let b = StoredRow::pack(&a);
        a.insert("int".into(), Value::Int(7));
        let c = StoredRow::pack(&a);
        assert!(Arc::ptr_eq(&b.columns, &c.columns));
        assert_ne!(b, c);
        a.insert("int".into(), Value::Int(-42));
        assert_eq!(StoredRow::pack(&a), b);
        a.insert("zz_more".into(), Value::Null);
        assert!(!Arc::ptr_eq(&StoredRow::pack(&a).columns, &b.columns));
    }

    #[test]
    fn serialized_exactly_as_the_row_it_holds() {
        let row = every_value();
        let stored = StoredRow::pack(&row);
        let bytes = postcard::to_stdvec(&stored).unwrap();
        assert_eq!(bytes, postcard::to_stdvec(&row).unwrap());
        let back: StoredRow = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, stored);
        assert_eq!(
            serde_json::to_value(&stored).unwrap(),
            serde_json::to_value(&row).unwrap()
        );
        let from_json: StoredRow =
            serde_json::from_value(serde_json::to_value(&row).unwrap()).unwrap();
        assert_eq!(from_json.to_row(), row);
    }

    #[test]
    fn a_map_out_of_order_is_sorted() {
        let json = serde_json::json!({"b": {"Int": 2}, "a": {"Int": 1}});
        let stored: StoredRow = serde_json::from_value(json).unwrap();
        let names: Vec<&str> = stored.iter().map(|(c, _)| c).collect();
        assert_eq!(names, ["a", "b"]);
    }
}
