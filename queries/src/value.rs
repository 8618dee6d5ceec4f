//! ZQL values as the client sees them, with Zero's comparator (`compareValues`, protocol §7.1).
//!
//! [`Value`] is what the dataflow engine stores in rows and keys on, so its `Ord`, `Eq` and
//! `Hash` are *total* and mutually consistent:
//!
//! * `Null < Bool < Number < String < Json` across kinds. Zero throws when it compares values
//!   of different kinds, so any fixed order is compatible with it; this one keeps `Null` first,
//!   which Zero requires.
//! * Numbers compare numerically; `-0 == 0` (as in JavaScript), and every NaN is one value that
//!   sorts after all other numbers. Zero never produces NaN (JSON cannot carry it), but a total
//!   order must place it somewhere.
//! * Strings compare in UTF-8 byte order, which is `str`'s `Ord` (and SQLite's BINARY).
//! * `Json` holds arrays and objects. A `Json` holding a scalar compares, hashes and serializes
//!   exactly like the corresponding scalar variant, because on the wire the two are
//!   indistinguishable; [`Value::from_json`] produces the canonical form.
//!
//! SQL-style comparisons, where a null never matches, are separate functions
//! ([`Value::sql_eq`], [`Value::compare_non_null`]) because they are not an order.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
pub use smol_str::SmolStr;

/// One column value of a row, as it appears on the wire and in ZQL literals.
///
/// Every variant is cheap to clone and the enum is 24 bytes: the engine stores each row once
/// but copies key and sort columns into several indexes, so strings are [`SmolStr`] (up to 23
/// bytes inline, longer ones shared by reference count) and JSON documents are shared.
#[derive(Debug, Clone)]
pub enum Value {
    /// SQL NULL / JavaScript `null` (and `undefined`, which Zero treats as null).
    Null,
    /// A `boolean` column; stored as 0/1 in the replica.
    Bool(bool),
    /// Every numeric column, timestamps included (epoch milliseconds), as JavaScript numbers.
    Number(f64),
    /// Text-like columns (text, uuid, enum, ...).
    String(SmolStr),
    /// `json`/`jsonb`/array columns. Holds arrays and objects in canonical form.
    Json(Arc<serde_json::Value>),
}

/// The largest integer that a JavaScript number represents exactly (2^53 - 1).
pub const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

impl Value {
    /// Converts a JSON value into its canonical ZQL value: scalars become the scalar variants,
    /// only arrays and objects stay `Json`.
    pub fn from_json(json: serde_json::Value) -> Value {
        match json {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::Number(n) => Value::Number(json_number_to_f64(&n)),
            serde_json::Value::String(s) => Value::String(s.into()),
            other => Value::Json(Arc::new(other)),
        }
    }

    /// Converts to a JSON value, as the client receives it.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Number(n) => number_to_json(*n),
            Value::String(s) => serde_json::Value::String(s.as_str().to_owned()),
            Value::Json(j) => serde_json::Value::clone(j),
        }
    }

    /// True for `Null` (including a `Json` that holds null).
    pub fn is_null(&self) -> bool {
        matches!(self.view(), View::Null)
    }

    /// The kind of the value, with `Json` scalars resolved to their scalar kind.
    pub fn kind(&self) -> ValueKind {
        match self.view() {
            View::Null => ValueKind::Null,
            View::Bool(_) => ValueKind::Bool,
            View::Number(_) => ValueKind::Number,
            View::String(_) => ValueKind::String,
            View::Json(_) => ValueKind::Json,
        }
    }

    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self.view() {
            View::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a number, if it is one.
    pub fn as_f64(&self) -> Option<f64> {
        match self.view() {
            View::Number(n) => Some(n),
            _ => None,
        }
    }

    /// The value as a boolean, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self.view() {
            View::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// SQL/Zero equality used by `=`, `IN` and correlation joins: false when either side is
    /// null (`null != null`), otherwise value equality.
    pub fn sql_eq(&self, other: &Value) -> bool {
        !self.is_null() && !other.is_null() && self == other
    }

    /// Zero's `compareValues` for `<`, `<=`, `>`, `>=`: `None` when either side is null or the
    /// kinds differ (Zero throws or yields false there), otherwise the ordering.
    pub fn compare_non_null(&self, other: &Value) -> Option<Ordering> {
        if self.is_null() || other.is_null() || self.kind() != other.kind() {
            return None;
        }
        Some(self.cmp(other))
    }

    /// A borrowed view with `Json` scalars resolved, so that every trait impl sees one form.
    pub(crate) fn view(&self) -> View<'_> {
        match self {
            Value::Null => View::Null,
            Value::Bool(b) => View::Bool(*b),
            Value::Number(n) => View::Number(*n),
            Value::String(s) => View::String(s),
            Value::Json(j) => match &**j {
                serde_json::Value::Null => View::Null,
                serde_json::Value::Bool(b) => View::Bool(*b),
                serde_json::Value::Number(n) => View::Number(json_number_to_f64(n)),
                serde_json::Value::String(s) => View::String(s),
                other => View::Json(other),
            },
        }
    }
}

/// The kind of a [`Value`]; the order of the variants is the cross-kind sort order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ValueKind {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool,
    /// A number.
    Number,
    /// A string.
    String,
    /// A JSON array or object.
    Json,
}

pub(crate) enum View<'a> {
    Null,
    Bool(bool),
    Number(f64),
    String(&'a str),
    Json(&'a serde_json::Value),
}

impl View<'_> {
    pub(crate) fn rank(&self) -> u8 {
        match self {
            View::Null => 0,
            View::Bool(_) => 1,
            View::Number(_) => 2,
            View::String(_) => 3,
            View::Json(_) => 4,
        }
    }
}

/// Total numeric order: `-0 == 0`, NaN equal to itself and above every number.
pub fn cmp_f64(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

fn hash_f64<H: Hasher>(n: f64, state: &mut H) {
    // Canonicalize so that equal numbers hash equally: all NaNs alike, -0 as 0.
    let bits = if n.is_nan() {
        f64::NAN.to_bits()
    } else if n == 0.0 {
        0u64
    } else {
        n.to_bits()
    };
    bits.hash(state);
}

fn json_number_to_f64(n: &serde_json::Number) -> f64 {
    // Every JSON number that Zero sends fits an f64 (JavaScript numbers); larger integers
    // lose precision exactly as they would in the client.
    n.as_f64().unwrap_or(f64::NAN)
}

/// Converts a number to JSON the way `JSON.stringify` would read it back: integral values in
/// the safe range become integers (so they print without `.0`), NaN and infinities become null.
pub fn number_to_json(n: f64) -> serde_json::Value {
    if !n.is_finite() {
        return serde_json::Value::Null;
    }
    if n.fract() == 0.0 && n.abs() <= MAX_SAFE_INTEGER {
        // The range check makes the conversion exact.
        let i = n as i64;
        return serde_json::Value::Number(i.into());
    }
    serde_json::Number::from_f64(n)
        .map(serde_json::Value::Number)
        .unwrap_or(serde_json::Value::Null)
}

/// Total order over JSON values: null < bool < number < string < array < object; arrays
/// element-wise (shorter first on a tie), objects by their entries sorted by key.
pub fn cmp_json(a: &serde_json::Value, b: &serde_json::Value) -> Ordering {
    use serde_json::Value as J;
    fn rank(v: &J) -> u8 {
        match v {
            J::Null => 0,
            J::Bool(_) => 1,
            J::Number(_) => 2,
            J::String(_) => 3,
            J::Array(_) => 4,
            J::Object(_) => 5,
        }
    }
    match (a, b) {
        (J::Null, J::Null) => Ordering::Equal,
        (J::Bool(x), J::Bool(y)) => x.cmp(y),
        (J::Number(x), J::Number(y)) => cmp_f64(json_number_to_f64(x), json_number_to_f64(y)),
        (J::String(x), J::String(y)) => x.cmp(y),
        (J::Array(x), J::Array(y)) => {
            for (l, r) in x.iter().zip(y.iter()) {
                let o = cmp_json(l, r);
                if o != Ordering::Equal {
                    return o;
                }
            }
            x.len().cmp(&y.len())
        }
        (J::Object(x), J::Object(y)) => {
            let mut xs: Vec<_> = x.iter().collect();
            let mut ys: Vec<_> = y.iter().collect();
            xs.sort_by(|l, r| l.0.cmp(r.0));
            ys.sort_by(|l, r| l.0.cmp(r.0));
            for ((lk, lv), (rk, rv)) in xs.iter().zip(ys.iter()) {
                let o = lk.cmp(rk).then_with(|| cmp_json(lv, rv));
                if o != Ordering::Equal {
                    return o;
                }
            }
            xs.len().cmp(&ys.len())
        }
        _ => rank(a).cmp(&rank(b)),
    }
}

fn hash_json<H: Hasher>(v: &serde_json::Value, state: &mut H) {
    use serde_json::Value as J;
    match v {
        J::Null => 0u8.hash(state),
        J::Bool(b) => {
            1u8.hash(state);
            b.hash(state);
        }
        J::Number(n) => {
            2u8.hash(state);
            hash_f64(json_number_to_f64(n), state);
        }
        J::String(s) => {
            3u8.hash(state);
            s.hash(state);
        }
        J::Array(items) => {
            4u8.hash(state);
            items.len().hash(state);
            for i in items {
                hash_json(i, state);
            }
        }
        J::Object(map) => {
            5u8.hash(state);
            map.len().hash(state);
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|l, r| l.0.cmp(r.0));
            for (k, v) in entries {
                k.hash(state);
                hash_json(v, state);
            }
        }
    }
}

impl Ord for Value {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self.view(), other.view()) {
            (View::Null, View::Null) => Ordering::Equal,
            (View::Bool(a), View::Bool(b)) => a.cmp(&b),
            (View::Number(a), View::Number(b)) => cmp_f64(a, b),
            (View::String(a), View::String(b)) => a.cmp(b),
            (View::Json(a), View::Json(b)) => cmp_json(a, b),
            (a, b) => a.rank().cmp(&b.rank()),
        }
    }
}

impl PartialOrd for Value {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Value {}

impl Hash for Value {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let view = self.view();
        view.rank().hash(state);
        match view {
            View::Null => {}
            View::Bool(b) => b.hash(state),
            View::Number(n) => hash_f64(n, state),
            View::String(s) => s.hash(state),
            View::Json(j) => hash_json(j, state),
        }
    }
}

/// The form of a [`Value`] in binary formats (timely/differential exchange between processes),
/// which cannot carry self-describing JSON. JSON arrays/objects travel as JSON text.
#[derive(Serialize, Deserialize)]
enum Compact {
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    Json(String),
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if !serializer.is_human_readable() {
            let compact = match self.view() {
                View::Null => Compact::Null,
                View::Bool(b) => Compact::Bool(b),
                View::Number(n) => Compact::Number(n),
                View::String(s) => Compact::String(s.to_owned()),
                View::Json(j) => Compact::Json(j.to_string()),
            };
            return compact.serialize(serializer);
        }
        match self.view() {
            View::Null => serializer.serialize_unit(),
            View::Bool(b) => serializer.serialize_bool(b),
            View::Number(n) => number_to_json(n).serialize(serializer),
            View::String(s) => serializer.serialize_str(s),
            View::Json(j) => j.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if !deserializer.is_human_readable() {
            return Ok(match Compact::deserialize(deserializer)? {
                Compact::Null => Value::Null,
                Compact::Bool(b) => Value::Bool(b),
                Compact::Number(n) => Value::Number(n),
                Compact::String(s) => Value::String(s.into()),
                Compact::Json(text) => serde_json::from_str(&text)
                    .map(Value::from_json)
                    .map_err(serde::de::Error::custom)?,
            });
        }
        serde_json::Value::deserialize(deserializer).map(Value::from_json)
    }
}

impl fmt::Display for Value {
    /// Prints the value as JSON text (`null`, `true`, `1.5`, `"a"`, `[1]`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_json())
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl From<f64> for Value {
    fn from(n: f64) -> Self {
        Value::Number(n)
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        // ZQL numbers are JavaScript numbers; beyond 2^53 precision is lost as in the client.
        Value::Number(n as f64)
    }
}

impl From<i32> for Value {
    fn from(n: i32) -> Self {
        Value::Number(f64::from(n))
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.into())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::String(s.into())
    }
}

impl From<SmolStr> for Value {
    fn from(s: SmolStr) -> Self {
        Value::String(s)
    }
}

impl From<serde_json::Value> for Value {
    fn from(j: serde_json::Value) -> Self {
        Value::from_json(j)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(o: Option<T>) -> Self {
        o.map_or(Value::Null, Into::into)
    }
}

/// Compares two rows column by column with [`Value`]'s order; used for sort keys.
pub fn cmp_rows(a: &[Value], b: &[Value]) -> Ordering {
    a.cmp(b)
}

#[cfg(test)]
mod tests {
    use std::collections::hash_map::DefaultHasher;

    use serde_json::json;

    use super::*;

    /// A `Json` value as given, not in canonical form.
    fn j(v: serde_json::Value) -> Value {
        Value::Json(Arc::new(v))
    }

    fn h(v: &Value) -> u64 {
        let mut s = DefaultHasher::new();
        v.hash(&mut s);
        s.finish()
    }

    #[test]
    fn values_are_24_bytes() {
        // Rows are slices of values: every byte here is paid once per column per row.
        assert_eq!(std::mem::size_of::<Value>(), 24);
    }

    #[test]
    fn null_sorts_first_and_kinds_are_ordered() {
        let mut vals = vec![
            j(json!([1])),
            Value::String("a".into()),
            Value::Number(-5.0),
            Value::Bool(true),
            Value::Null,
            Value::Bool(false),
        ];
        vals.sort();
        assert_eq!(
            vals,
            vec![
                Value::Null,
                Value::Bool(false),
                Value::Bool(true),
                Value::Number(-5.0),
                Value::String("a".into()),
                j(json!([1])),
            ]
        );
    }

    #[test]
    fn strings_compare_in_utf8_byte_order() {
        // U+FF21 (fullwidth A, 3 bytes EF BC A1) vs U+1F600 (4 bytes F0 ...): UTF-16 order
        // would put the emoji (surrogate D83D) first; UTF-8 order puts it last.
        let a = Value::from("\u{FF21}");
        let b = Value::from("\u{1F600}");
        assert!(a < b);
        assert!(Value::from("Z") < Value::from("a"));
        assert!(Value::from("a") < Value::from("ab"));
    }

    #[test]
    fn numbers_are_total_with_nan_last_and_signed_zero_equal() {
        let nan = Value::Number(f64::NAN);
        assert_eq!(nan, Value::Number(-f64::NAN));
        assert!(Value::Number(f64::INFINITY) < nan);
        assert!(Value::Number(f64::NEG_INFINITY) < Value::Number(-1e300));
        assert_eq!(Value::Number(0.0), Value::Number(-0.0));
        assert_eq!(h(&Value::Number(0.0)), h(&Value::Number(-0.0)));
        assert_eq!(h(&nan), h(&Value::Number(f64::NAN)));
        assert!(Value::Number(1.5) < Value::Number(2.0));
    }

    #[test]
    fn json_scalars_are_their_scalar_values() {
        assert_eq!(j(json!(5)), Value::Number(5.0));
        assert_eq!(h(&j(json!("x"))), h(&Value::from("x")));
        assert_eq!(Value::from_json(json!(true)), Value::Bool(true));
        assert!(matches!(Value::from_json(json!([1, 2])), Value::Json(_)));
        assert!(j(json!(null)).is_null());
    }

    #[test]
    fn json_objects_compare_independently_of_key_order() {
        let a: serde_json::Value = serde_json::from_str(r#"{"a":1,"b":2}"#).expect("json");
        let b: serde_json::Value = serde_json::from_str(r#"{"b":2,"a":1}"#).expect("json");
        assert_eq!(j(a.clone()), j(b.clone()));
        assert_eq!(h(&j(a)), h(&j(b)));
        assert!(j(json!([1, 2])) < j(json!([1, 3])));
        assert!(j(json!([1])) < j(json!([1, 0])));
        assert!(j(json!([9])) < j(json!({})));
    }

    #[test]
    fn sql_semantics_never_match_null() {
        assert!(!Value::Null.sql_eq(&Value::Null));
        assert!(Value::from(1).sql_eq(&Value::Number(1.0)));
        assert_eq!(Value::Null.compare_non_null(&Value::from(1)), None);
        assert_eq!(Value::from("a").compare_non_null(&Value::from(1)), None);
        assert_eq!(
            Value::from(1).compare_non_null(&Value::from(2)),
            Some(Ordering::Less)
        );
    }

    #[test]
    fn serde_round_trips_as_plain_json() {
        let vals = vec![
            Value::Null,
            Value::Bool(true),
            Value::Number(3.0),
            Value::Number(2.5),
            Value::from("hi"),
            j(json!({"k": [1, "x"]})),
        ];
        let text = serde_json::to_string(&vals).expect("serialize");
        assert_eq!(text, r#"[null,true,3,2.5,"hi",{"k":[1,"x"]}]"#);
        let back: Vec<Value> = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, vals);
        assert_eq!(
            serde_json::to_string(&Value::Number(f64::NAN)).expect("nan"),
            "null"
        );
        assert_eq!(
            serde_json::to_string(&Value::Number(1e300)).expect("big"),
            "1e+300"
        );
    }

    #[test]
    fn binary_formats_round_trip() {
        let vals: Vec<Value> = vec![
            Value::Null,
            Value::Bool(false),
            Value::Number(-2.5),
            Value::from("héllo"),
            j(json!({"a": [1, null, "x"]})),
        ];
        let bytes = bincode::serialize(&vals).expect("bincode");
        let back: Vec<Value> = bincode::deserialize(&bytes).expect("bincode back");
        assert_eq!(back, vals);
        let row: crate::Row = vals.clone().into();
        let back: crate::Row =
            bincode::deserialize(&bincode::serialize(&row).expect("ser")).expect("de");
        assert_eq!(back, row);
    }

    #[test]
    fn ord_eq_and_hash_agree_on_random_values() {
        let pool = vec![
            Value::Null,
            j(json!(null)),
            Value::Bool(false),
            j(json!(false)),
            Value::Number(0.0),
            Value::Number(-0.0),
            j(json!(0)),
            Value::Number(f64::NAN),
            Value::Number(1.0),
            Value::from("a"),
            j(json!("a")),
            j(json!([0])),
            j(json!([0.0])),
        ];
        for a in &pool {
            for b in &pool {
                assert_eq!(a == b, a.cmp(b) == Ordering::Equal);
                assert_eq!(a.cmp(b), b.cmp(a).reverse());
                if a == b {
                    assert_eq!(h(a), h(b), "{a:?} vs {b:?}");
                }
                for c in &pool {
                    if a <= b && b <= c {
                        assert!(a <= c);
                    }
                }
            }
        }
    }
}
