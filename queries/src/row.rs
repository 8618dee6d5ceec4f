//! Rows as one compact byte buffer.
//!
//! The view engine keeps every replica row in memory for as long as it runs, and a row of
//! [`Value`]s costs 24 bytes per column plus a separate allocation per string longer than 23
//! bytes: three times the replica file for a typical dataset. A [`Row`] instead encodes its
//! columns back to back in one shared allocation (a tag byte per value; strings, integers and
//! JSON text inline), so a row costs about what SQLite stores for it. Columns are decoded on
//! access ([`Row::get`]); comparisons and hashing read the bytes without decoding strings.
//!
//! The encoding is canonical (integral numbers as integers, `-0` as `0`, every NaN alike,
//! JSON scalars as the scalar), so rows that compare equal column by column are equal bytes,
//! except JSON objects whose keys are in a different order, which compare by value.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use triomphe::ThinArc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::value::{MAX_SAFE_INTEGER, Value, View, cmp_f64, cmp_json};

const NULL: u8 = 0;
const FALSE: u8 = 1;
const TRUE: u8 = 2;
const FLOAT: u8 = 3;
const INT: u8 = 4;
const JSON: u8 = 5;
const LONG_STRING: u8 = 6;
/// Strings up to 127 bytes: the tag is this bit plus the length.
const SHORT_STRING: u8 = 0x80;

/// A row: column values in the table's column order, in one shared, immutable buffer. Cheap
/// to clone (a reference count), so every index of a table holds the same allocation. The
/// handle is one pointer (the length lives in the allocation, beside the count): every index
/// entry holds one, and a fat `Arc<[u8]>` cost 8 more bytes per row per index.
#[derive(Clone)]
pub struct Row(ThinArc<(), u8>);

/// A column value as stored, borrowed from the row's buffer.
#[derive(Debug, Clone, Copy)]
enum Raw<'a> {
    Null,
    Bool(bool),
    Number(f64),
    /// Valid UTF-8 (rows are only built from `str`).
    String(&'a [u8]),
    /// JSON text of an array or object.
    Json(&'a [u8]),
}

impl Raw<'_> {
    fn rank(&self) -> u8 {
        match self {
            Raw::Null => 0,
            Raw::Bool(_) => 1,
            Raw::Number(_) => 2,
            Raw::String(_) => 3,
            Raw::Json(_) => 4,
        }
    }

    fn json(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).unwrap_or(serde_json::Value::Null)
    }

    fn to_value(self) -> Value {
        match self {
            Raw::Null => Value::Null,
            Raw::Bool(b) => Value::Bool(b),
            Raw::Number(n) => Value::Number(n),
            Raw::String(s) => Value::String(utf8(s).into()),
            Raw::Json(j) => Value::Json(Arc::new(Raw::json(j))),
        }
    }

    fn cmp(self, other: Raw<'_>) -> Ordering {
        match (self, other) {
            (Raw::Null, Raw::Null) => Ordering::Equal,
            (Raw::Bool(a), Raw::Bool(b)) => a.cmp(&b),
            (Raw::Number(a), Raw::Number(b)) => cmp_f64(a, b),
            // UTF-8 byte order is `str` order.
            (Raw::String(a), Raw::String(b)) => a.cmp(b),
            (Raw::Json(a), Raw::Json(b)) => {
                if a == b {
                    Ordering::Equal
                } else {
                    cmp_json(&Raw::json(a), &Raw::json(b))
                }
            }
            (a, b) => a.rank().cmp(&b.rank()),
        }
    }

    fn cmp_value(self, v: &Value) -> Ordering {
        match (self, v.view()) {
            (Raw::Null, View::Null) => Ordering::Equal,
            (Raw::Bool(a), View::Bool(b)) => a.cmp(&b),
            (Raw::Number(a), View::Number(b)) => cmp_f64(a, b),
            (Raw::String(a), View::String(b)) => a.cmp(b.as_bytes()),
            (Raw::Json(a), View::Json(b)) => cmp_json(&Raw::json(a), b),
            (a, b) => a.rank().cmp(&b.rank()),
        }
    }

    /// 64 bits that order like the value (`a < b` gives `prefix(a) <= prefix(b)`): the rank in
    /// the top three bits, then a number's order-preserving bits or a string's first bytes.
    fn prefix(self) -> u64 {
        const RANK: u32 = 61;
        let rank = u64::from(self.rank()) << RANK;
        match self {
            Raw::Null | Raw::Json(_) => rank,
            Raw::Bool(b) => rank | u64::from(b),
            Raw::Number(n) => {
                // Sign-flipped IEEE bits order like the numbers; NaN is greatest (`cmp_f64`).
                let bits = if n.is_nan() {
                    u64::MAX
                } else if n == 0.0 {
                    1 << 63
                } else if n.is_sign_negative() {
                    !n.to_bits()
                } else {
                    n.to_bits() | (1 << 63)
                };
                rank | (bits >> (64 - RANK))
            }
            Raw::String(s) => {
                let mut b = [0u8; 8];
                let n = s.len().min(8);
                b[..n].copy_from_slice(&s[..n]);
                rank | (u64::from_be_bytes(b) >> (64 - RANK))
            }
        }
    }

    fn hash<H: Hasher>(self, state: &mut H) {
        match self {
            Raw::Json(j) => Raw::Json(j).to_value().hash(state),
            Raw::Null => 0u8.hash(state),
            Raw::Bool(b) => (1u8, b).hash(state),
            Raw::Number(n) => Value::Number(n).hash(state),
            Raw::String(s) => (3u8, s).hash(state),
        }
    }
}

fn utf8(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("row strings are built from str")
}

fn put_varint(buf: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        buf.push((n as u8) | 0x80);
        n >>= 7;
    }
    buf.push(n as u8);
}

fn get_varint(buf: &[u8], pos: &mut usize) -> u64 {
    let mut n = 0u64;
    let mut shift = 0;
    loop {
        let b = buf[*pos];
        *pos += 1;
        n |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return n;
        }
        shift += 7;
    }
}

fn put_value(buf: &mut Vec<u8>, v: &Value) {
    match v.view() {
        View::Null => buf.push(NULL),
        View::Bool(false) => buf.push(FALSE),
        View::Bool(true) => buf.push(TRUE),
        View::Number(n) => {
            if n == 0.0 {
                // -0 == 0, and both print as 0.
                buf.push(INT);
                buf.push(0);
            } else if n.fract() == 0.0 && n.abs() <= MAX_SAFE_INTEGER {
                // The range check makes the conversion exact; zigzag keeps small negatives short.
                let i = n as i64;
                buf.push(INT);
                put_varint(buf, ((i << 1) ^ (i >> 63)) as u64);
            } else {
                let n = if n.is_nan() { f64::NAN } else { n };
                buf.push(FLOAT);
                buf.extend_from_slice(&n.to_le_bytes());
            }
        }
        View::String(s) => {
            if s.len() < 0x80 {
                buf.push(SHORT_STRING | s.len() as u8);
            } else {
                buf.push(LONG_STRING);
                put_varint(buf, s.len() as u64);
            }
            buf.extend_from_slice(s.as_bytes());
        }
        View::Json(j) => {
            let text = j.to_string();
            buf.push(JSON);
            put_varint(buf, text.len() as u64);
            buf.extend_from_slice(text.as_bytes());
        }
    }
}

/// Reads the value at `*pos` and moves past it.
fn read_raw<'a>(buf: &'a [u8], pos: &mut usize) -> Raw<'a> {
    let tag = buf[*pos];
    *pos += 1;
    match tag {
        NULL => Raw::Null,
        FALSE => Raw::Bool(false),
        TRUE => Raw::Bool(true),
        INT => {
            let z = get_varint(buf, pos);
            let i = ((z >> 1) as i64) ^ -((z & 1) as i64);
            Raw::Number(i as f64)
        }
        FLOAT => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[*pos..*pos + 8]);
            *pos += 8;
            Raw::Number(f64::from_le_bytes(b))
        }
        JSON | LONG_STRING => {
            let len = get_varint(buf, pos) as usize;
            let bytes = &buf[*pos..*pos + len];
            *pos += len;
            if tag == JSON {
                Raw::Json(bytes)
            } else {
                Raw::String(bytes)
            }
        }
        t => {
            let len = usize::from(t & !SHORT_STRING);
            let bytes = &buf[*pos..*pos + len];
            *pos += len;
            Raw::String(bytes)
        }
    }
}

/// Moves past the value at `*pos` without decoding it.
fn skip(buf: &[u8], pos: &mut usize) {
    let tag = buf[*pos];
    *pos += 1;
    match tag {
        NULL | FALSE | TRUE => {}
        INT => {
            while buf[*pos] >= 0x80 {
                *pos += 1;
            }
            *pos += 1;
        }
        FLOAT => *pos += 8,
        JSON | LONG_STRING => {
            let len = get_varint(buf, pos) as usize;
            *pos += len;
        }
        t => *pos += usize::from(t & !SHORT_STRING),
    }
}

/// Encodes `values` as a row buffer: the column count, then each value.
fn encode<'a>(values: impl IntoIterator<Item = &'a Value>) -> Vec<u8> {
    let values = values.into_iter();
    let mut buf = Vec::with_capacity(16 + 8 * values.size_hint().0);
    buf.push(0);
    let mut n = 0u64;
    for v in values {
        put_value(&mut buf, v);
        n += 1;
    }
    if n < 0x80 {
        buf[0] = n as u8;
    } else {
        let mut head = Vec::new();
        put_varint(&mut head, n);
        buf.splice(0..1, head);
    }
    buf
}

/// Length of the encoding at the start of `buf`.
fn encoded_len(buf: &[u8]) -> usize {
    let mut pos = 0;
    let n = get_varint(buf, &mut pos);
    for _ in 0..n {
        skip(buf, &mut pos);
    }
    pos
}

/// The values of a row buffer, undecoded.
fn raws_of(buf: &[u8]) -> impl Iterator<Item = Raw<'_>> + '_ {
    let mut pos = 0;
    let n = get_varint(buf, &mut pos) as usize;
    (0..n).map(move |_| read_raw(buf, &mut pos))
}

/// Column by column in [`Value`]'s order, then the shorter buffer first.
fn cmp_bytes(a: &[u8], b: &[u8]) -> Ordering {
    let mut a = raws_of(a);
    let mut b = raws_of(b);
    loop {
        match (a.next(), b.next()) {
            (Some(x), Some(y)) => {
                let o = x.cmp(y);
                if o != Ordering::Equal {
                    return o;
                }
            }
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
        }
    }
}

fn eq_bytes(a: &[u8], b: &[u8]) -> bool {
    // Canonical encoding: equal bytes are equal rows; only JSON objects with keys in
    // another order need the comparison.
    a == b || (a.contains(&JSON) && cmp_bytes(a, b) == Ordering::Equal)
}

fn hash_bytes<H: Hasher>(buf: &[u8], state: &mut H) {
    (get_varint(buf, &mut 0) as usize).hash(state);
    for r in raws_of(buf) {
        r.hash(state);
    }
}

impl Row {
    /// Encodes `values` as a row.
    pub fn new<'a>(values: impl IntoIterator<Item = &'a Value>) -> Row {
        Row(ThinArc::from_header_and_slice((), &encode(values)))
    }

    /// Number of columns.
    pub fn len(&self) -> usize {
        get_varint(self.bytes(), &mut 0) as usize
    }

    /// True for a row without columns.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn first(&self) -> usize {
        let mut pos = 0;
        get_varint(self.bytes(), &mut pos);
        pos
    }

    fn raw(&self, i: usize) -> Raw<'_> {
        assert!(
            i < self.len(),
            "column {i} out of range for a row of {}",
            self.len()
        );
        let mut pos = self.first();
        for _ in 0..i {
            skip(self.bytes(), &mut pos);
        }
        read_raw(self.bytes(), &mut pos)
    }

    fn raws(&self) -> impl Iterator<Item = Raw<'_>> + '_ {
        let mut pos = self.first();
        (0..self.len()).map(move |_| read_raw(self.bytes(), &mut pos))
    }

    /// The value of column `i` (panics if out of range, like indexing a slice).
    pub fn get(&self, i: usize) -> Value {
        self.raw(i).to_value()
    }

    /// Whether column `i` is null.
    pub fn is_null(&self, i: usize) -> bool {
        matches!(self.raw(i), Raw::Null)
    }

    /// Column `i` compared with `v` in [`Value`]'s order, without decoding the column.
    pub fn cmp_col(&self, i: usize, v: &Value) -> Ordering {
        self.raw(i).cmp_value(v)
    }

    /// 64 bits that order like column `i` (a smaller value never has a greater prefix), so a
    /// sort can compare numbers instead of reading rows, and read the rows only on a tie.
    pub fn sort_prefix(&self, i: usize) -> u64 {
        self.raw(i).prefix()
    }

    /// Column `i` of this row compared with column `j` of `other`, in [`Value`]'s order.
    pub fn cmp_cols(&self, i: usize, other: &Row, j: usize) -> Ordering {
        self.raw(i).cmp(other.raw(j))
    }

    /// Every column's value, in order.
    pub fn iter(&self) -> impl Iterator<Item = Value> + '_ {
        self.raws().map(Raw::to_value)
    }

    /// The values as a vector (to build a changed row from).
    pub fn to_vec(&self) -> Vec<Value> {
        self.iter().collect()
    }

    /// Whether both handles share one allocation (a row kept is the same allocation; an
    /// equal row made elsewhere is not).
    pub fn same(&self, other: &Row) -> bool {
        self.0.ptr() == other.0.ptr()
    }

    /// The allocation's address: an identity to sort or hash rows by allocation.
    pub fn addr(&self) -> usize {
        self.0.ptr() as usize
    }

    /// Bytes of the row's buffer (without the allocation's reference count and length).
    pub fn encoded_len(&self) -> usize {
        self.bytes().len()
    }

    fn bytes(&self) -> &[u8] {
        &self.0.slice
    }
}

impl From<Vec<Value>> for Row {
    fn from(values: Vec<Value>) -> Row {
        Row::new(&values)
    }
}

impl From<&[Value]> for Row {
    fn from(values: &[Value]) -> Row {
        Row::new(values)
    }
}

impl<const N: usize> From<[Value; N]> for Row {
    fn from(values: [Value; N]) -> Row {
        Row::new(&values)
    }
}

impl FromIterator<Value> for Row {
    fn from_iter<I: IntoIterator<Item = Value>>(iter: I) -> Row {
        let values: Vec<Value> = iter.into_iter().collect();
        Row::new(&values)
    }
}

impl Ord for Row {
    /// Column by column in [`Value`]'s order, then the shorter row first.
    fn cmp(&self, other: &Self) -> Ordering {
        if self.same(other) {
            return Ordering::Equal;
        }
        cmp_bytes(self.bytes(), other.bytes())
    }
}

impl PartialOrd for Row {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Row {
    fn eq(&self, other: &Self) -> bool {
        eq_bytes(self.bytes(), other.bytes())
    }
}

impl Eq for Row {}

impl Hash for Row {
    fn hash<H: Hasher>(&self, state: &mut H) {
        hash_bytes(self.bytes(), state);
    }
}

impl fmt::Debug for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Serialize for Row {
    /// As the sequence of its values.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for Row {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Vec::<Value>::deserialize(deserializer).map(Row::from)
    }
}

/// Bytes of a [`RowKey`] kept inside the key itself.
const KEY_INLINE: usize = 23;

/// The values of an index key, encoded like a [`Row`]: 24 bytes, with no allocation for keys
/// of up to 23 encoded bytes (a 21-character id such as a nanoid, or a pair of short ones). Every index entry holds one, and
/// a vector of [`Value`]s cost 32 bytes plus, for a two-column key, a 48-byte allocation.
/// Orders, compares and hashes like the row of the same values.
#[derive(Clone)]
pub struct RowKey(KeyRepr);

#[derive(Clone)]
enum KeyRepr {
    /// Zero-padded: the encoding says where it ends.
    Inline([u8; KEY_INLINE]),
    Heap(Row),
}

impl RowKey {
    /// The key without columns (the whole-table index's).
    pub fn new() -> RowKey {
        RowKey::from_encoded(&[0])
    }

    fn from_encoded(bytes: &[u8]) -> RowKey {
        if bytes.len() <= KEY_INLINE {
            let mut buf = [0u8; KEY_INLINE];
            buf[..bytes.len()].copy_from_slice(bytes);
            RowKey(KeyRepr::Inline(buf))
        } else {
            RowKey(KeyRepr::Heap(Row(ThinArc::from_header_and_slice(
                (),
                bytes,
            ))))
        }
    }

    fn bytes(&self) -> &[u8] {
        match &self.0 {
            KeyRepr::Inline(buf) => &buf[..encoded_len(buf)],
            KeyRepr::Heap(row) => row.bytes(),
        }
    }

    /// Number of columns.
    pub fn len(&self) -> usize {
        get_varint(self.bytes(), &mut 0) as usize
    }

    /// True for the key without columns.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value of column `i`.
    pub fn get(&self, i: usize) -> Value {
        self.iter()
            .nth(i)
            .unwrap_or_else(|| panic!("column {i} out of range for a key of {}", self.len()))
    }

    /// Every column's value, in order.
    pub fn iter(&self) -> impl Iterator<Item = Value> + '_ {
        raws_of(self.bytes()).map(Raw::to_value)
    }

    /// [`Row::sort_prefix`] of the key's first column (0 for the key without columns): keys
    /// with different prefixes order like their prefixes.
    pub fn sort_prefix(&self) -> u64 {
        raws_of(self.bytes()).next().map_or(0, Raw::prefix)
    }

    /// Bytes the key keeps in an allocation of its own (0 when inline), for memory reports.
    pub fn heap_bytes(&self) -> usize {
        match &self.0 {
            KeyRepr::Inline(_) => 0,
            KeyRepr::Heap(row) => 16 + row.encoded_len(),
        }
    }
    /// The key borrowed as its encoding, which an index stores back to back with its other
    /// keys instead of 24 bytes each.
    pub fn as_key_ref(&self) -> RowKeyRef<'_> {
        RowKeyRef(self.bytes())
    }
}

/// A [`RowKey`] read where its encoding is stored: an index keeps its keys' encodings back to
/// back (most keys are a short id of 8–12 encoded bytes, a third of a `RowKey`) and hands out
/// these. Orders, compares and hashes like the owned key.
#[derive(Clone, Copy)]
pub struct RowKeyRef<'a>(&'a [u8]);

impl<'a> RowKeyRef<'a> {
    /// The key whose encoding ([`RowKeyRef::encoded`]) is `bytes`.
    ///
    /// # Panics
    /// Reading a key built from bytes that are not such an encoding may panic.
    pub fn from_encoded(bytes: &'a [u8]) -> RowKeyRef<'a> {
        RowKeyRef(bytes)
    }

    /// The encoding: what an index stores for the key.
    pub fn encoded(self) -> &'a [u8] {
        self.0
    }

    /// An owned copy.
    pub fn to_key(self) -> RowKey {
        RowKey::from_encoded(self.0)
    }

    /// Number of columns.
    pub fn len(self) -> usize {
        get_varint(self.0, &mut 0) as usize
    }

    /// True for the key without columns.
    pub fn is_empty(self) -> bool {
        self.len() == 0
    }

    /// Every column's value, in order.
    pub fn iter(self) -> impl Iterator<Item = Value> + 'a {
        raws_of(self.0).map(Raw::to_value)
    }
}

impl Ord for RowKeyRef<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        cmp_bytes(self.0, other.0)
    }
}

impl PartialOrd for RowKeyRef<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for RowKeyRef<'_> {
    fn eq(&self, other: &Self) -> bool {
        eq_bytes(self.0, other.0)
    }
}

impl Eq for RowKeyRef<'_> {}

impl PartialEq<&RowKey> for RowKeyRef<'_> {
    fn eq(&self, other: &&RowKey) -> bool {
        eq_bytes(self.0, other.bytes())
    }
}

impl Hash for RowKeyRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        hash_bytes(self.0, state);
    }
}

impl fmt::Debug for RowKeyRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Default for RowKey {
    fn default() -> RowKey {
        RowKey::new()
    }
}

impl From<Vec<Value>> for RowKey {
    fn from(values: Vec<Value>) -> RowKey {
        RowKey::from_encoded(&encode(&values))
    }
}

impl From<Value> for RowKey {
    fn from(value: Value) -> RowKey {
        RowKey::from_encoded(&encode([&value]))
    }
}

impl FromIterator<Value> for RowKey {
    fn from_iter<I: IntoIterator<Item = Value>>(iter: I) -> RowKey {
        let values: Vec<Value> = iter.into_iter().collect();
        RowKey::from(values)
    }
}

impl Ord for RowKey {
    fn cmp(&self, other: &Self) -> Ordering {
        cmp_bytes(self.bytes(), other.bytes())
    }
}

impl PartialOrd for RowKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for RowKey {
    fn eq(&self, other: &Self) -> bool {
        eq_bytes(self.bytes(), other.bytes())
    }
}

impl Eq for RowKey {}

impl Hash for RowKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        hash_bytes(self.bytes(), state);
    }
}

impl fmt::Debug for RowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Serialize for RowKey {
    /// As the sequence of its values.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for RowKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Vec::<Value>::deserialize(deserializer).map(RowKey::from)
    }
}

/// Rows as column values, for code that reads both [`Row`]s and plain value slices.
pub trait Cols {
    /// Number of columns.
    fn col_count(&self) -> usize;
    /// The value of column `i`, borrowed where the row holds [`Value`]s.
    fn col(&self, i: usize) -> Cow<'_, Value>;
}

impl Cols for [Value] {
    fn col_count(&self) -> usize {
        self.len()
    }
    fn col(&self, i: usize) -> Cow<'_, Value> {
        Cow::Borrowed(&self[i])
    }
}

impl Cols for Vec<Value> {
    fn col_count(&self) -> usize {
        self.len()
    }
    fn col(&self, i: usize) -> Cow<'_, Value> {
        Cow::Borrowed(&self[i])
    }
}

impl Cols for Row {
    fn col_count(&self) -> usize {
        self.len()
    }
    fn col(&self, i: usize) -> Cow<'_, Value> {
        Cow::Owned(self.get(i))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::hash_map::DefaultHasher;

    use serde_json::json;

    use super::*;

    fn hash(r: &Row) -> u64 {
        let mut h = DefaultHasher::new();
        r.hash(&mut h);
        h.finish()
    }

    #[test]
    fn values_round_trip() {
        let long = "x".repeat(300);
        let values = vec![
            Value::Null,
            Value::Bool(true),
            Value::Bool(false),
            Value::Number(0.0),
            Value::Number(-1.0),
            Value::Number(1.5),
            Value::Number(1_690_000_000_000.0),
            Value::Number(MAX_SAFE_INTEGER),
            Value::Number(-MAX_SAFE_INTEGER),
            Value::Number(1e300),
            Value::Number(f64::INFINITY),
            Value::String("".into()),
            Value::String("é short".into()),
            Value::String(long.as_str().into()),
            Value::from_json(json!({"a": [1, 2], "b": null})),
            Value::from_json(json!([])),
        ];
        let row = Row::from(values.clone());
        assert_eq!(row.len(), values.len());
        assert_eq!(row.to_vec(), values);
        for (i, v) in values.iter().enumerate() {
            assert_eq!(&row.get(i), v, "column {i}");
            assert_eq!(row.cmp_col(i, v), Ordering::Equal);
        }
        assert!(row.get(9).as_f64() == Some(1e300));
        // Inline: a 300-byte string costs its bytes plus a 3-byte header.
        assert!(row.encoded_len() < 300 + 120, "{}", row.encoded_len());
    }

    #[test]
    fn equal_values_make_equal_rows() {
        let a = Row::from(vec![Value::Number(-0.0), Value::Number(f64::NAN)]);
        let b = Row::from(vec![Value::Number(0.0), Value::Number(-f64::NAN)]);
        assert_eq!(a, b);
        assert_eq!(hash(&a), hash(&b));
        // A JSON scalar is the scalar.
        let c = Row::from(vec![Value::Json(Arc::new(json!("s")))]);
        assert_eq!(c, Row::from(vec![Value::from("s")]));
        // Objects compare by entries, whatever their key order.
        let d = Row::from(vec![Value::Json(Arc::new(json!({"a": 1, "b": 2})))]);
        let mut m = serde_json::Map::new();
        m.insert("b".into(), json!(2));
        m.insert("a".into(), json!(1));
        let e = Row::from(vec![Value::Json(Arc::new(serde_json::Value::Object(m)))]);
        assert_eq!(d, e);
        assert_eq!(hash(&d), hash(&e));
    }

    #[test]
    fn rows_order_like_their_values() {
        let rows: Vec<Vec<Value>> = vec![
            vec![Value::Null],
            vec![Value::Bool(false)],
            vec![Value::Number(-2.5)],
            vec![Value::Number(-1.0)],
            vec![Value::Number(3.0), Value::from("a")],
            vec![Value::Number(3.0), Value::from("b")],
            vec![Value::Number(1e20)],
            vec![Value::from("a")],
            vec![Value::from("a"), Value::Null],
            vec![Value::from("b".repeat(200))],
            vec![Value::from_json(json!([1]))],
        ];
        for a in &rows {
            for b in &rows {
                let (ra, rb) = (Row::from(a.clone()), Row::from(b.clone()));
                assert_eq!(ra.cmp(&rb), a.cmp(b), "{a:?} vs {b:?}");
                assert_eq!(ra.cmp_cols(0, &rb, 0), a[0].cmp(&b[0]));
            }
        }
    }

    #[test]
    fn sort_prefixes_never_order_against_their_values() {
        let values = vec![
            Value::Null,
            Value::Bool(false),
            Value::Bool(true),
            Value::Number(f64::NEG_INFINITY),
            Value::Number(-1e300),
            Value::Number(-2.5),
            Value::Number(-1.0),
            Value::Number(-1e-300),
            Value::Number(0.0),
            Value::Number(1e-300),
            Value::Number(0.5),
            Value::Number(1.0),
            Value::Number(1_690_000_000_000.0),
            Value::Number(1_690_000_000_001.0),
            Value::Number(1e20),
            Value::Number(f64::INFINITY),
            Value::Number(f64::NAN),
            Value::from(""),
            Value::from("\u{0}"),
            Value::from("a"),
            Value::from("abcdefgh"),
            Value::from("abcdefgh1"),
            Value::from("abcdefgi"),
            Value::from("é"),
            Value::from("\u{10FFFF}"),
            Value::from_json(json!([1])),
            Value::from_json(json!({"a": 1})),
        ];
        for a in &values {
            for b in &values {
                let (ra, rb) = (Row::from(vec![a.clone()]), Row::from(vec![b.clone()]));
                let (pa, pb) = (ra.sort_prefix(0), rb.sort_prefix(0));
                match a.cmp(b) {
                    Ordering::Less => assert!(pa <= pb, "{a:?} < {b:?}"),
                    Ordering::Equal => assert_eq!(pa, pb, "{a:?} = {b:?}"),
                    Ordering::Greater => assert!(pa >= pb, "{a:?} > {b:?}"),
                }
                let (ka, kb) = (RowKey::from(a.clone()), RowKey::from(b.clone()));
                assert_eq!((ka.sort_prefix(), kb.sort_prefix()), (pa, pb));
            }
        }
        // Distinct numbers and short strings get distinct prefixes, so ties are rare.
        assert_ne!(
            Row::from(vec![Value::Number(1_690_000_000_000.0)]).sort_prefix(0),
            Row::from(vec![Value::Number(1_690_000_000_001.0)]).sort_prefix(0)
        );
        assert_ne!(
            Row::from(vec![Value::from("abcdefg")]).sort_prefix(0),
            Row::from(vec![Value::from("abcdefh")]).sort_prefix(0)
        );
        assert_eq!(RowKey::new().sort_prefix(), 0);
    }

    #[test]
    fn many_columns_and_serde() {
        let values: Vec<Value> = (0..200).map(|i| Value::Number(f64::from(i))).collect();
        let row = Row::from(values.clone());
        assert_eq!(row.len(), 200);
        assert_eq!(row.get(199), Value::Number(199.0));
        let text = serde_json::to_string(&row).expect("serialize");
        let back: Row = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, row);
    }

    #[test]
    fn keys_are_small_and_order_like_their_values() {
        assert_eq!(std::mem::size_of::<RowKey>(), 24);
        assert_eq!(std::mem::size_of::<Row>(), 8);
        let keys: Vec<Vec<Value>> = vec![
            vec![],
            vec![Value::Null],
            vec![Value::Number(-1.0)],
            vec![Value::Number(0.5)],
            vec![Value::from("i12345")],
            vec![Value::from("l1"), Value::from("i12345")],
            vec![Value::from("l1"), Value::from("i2")],
            vec![Value::from("n".repeat(21))],
            vec![Value::from("n".repeat(22))],
            vec![Value::from("x".repeat(40))],
            vec![Value::from("x".repeat(40)), Value::Bool(true)],
        ];
        for a in &keys {
            let ka: RowKey = a.iter().cloned().collect();
            assert_eq!(ka.len(), a.len());
            assert_eq!(ka.iter().collect::<Vec<_>>(), *a);
            let long = a.contains(&Value::from("x".repeat(40)))
                || a.contains(&Value::from("n".repeat(22)));
            assert_eq!(ka.heap_bytes() > 0, long, "{a:?}");
            for b in &keys {
                let kb = RowKey::from(b.clone());
                assert_eq!(ka.cmp(&kb), a.cmp(b), "{a:?} vs {b:?}");
                assert_eq!(ka == kb, a == b);
            }
            let text = serde_json::to_string(&ka).expect("serialize");
            assert_eq!(
                serde_json::from_str::<RowKey>(&text).expect("deserialize"),
                ka
            );
        }
        // Equal values make equal keys with equal hashes, as for rows.
        let mut h1 = DefaultHasher::new();
        RowKey::from(Value::Number(-0.0)).hash(&mut h1);
        let mut h2 = DefaultHasher::new();
        RowKey::from(vec![Value::Number(0.0)]).hash(&mut h2);
        assert_eq!(h1.finish(), h2.finish());
        assert_eq!(RowKey::new(), RowKey::default());
        assert!(RowKey::new().is_empty());
    }
}
