//! Conversion of upstream values (pgoutput and COPY text, and binary COPY) into replica values,
//! following Zero's type mapping: numbers as INTEGER/REAL, booleans as 0/1, timestamps as epoch
//! milliseconds, json and arrays as JSON text.
//!
//! All connections we open pin `DateStyle=ISO` and `TimeZone=UTC`, so the text forms parsed
//! here are the ISO ones.

use rusqlite::types::Value;

use crate::schema::{ElemKind, ValueKind};

/// A value that cannot be converted; the message names the value's problem.
#[derive(Debug, thiserror::Error)]
#[error("cannot convert {kind:?} value {text:?}: {reason}")]
pub struct ValueError {
    kind: ValueKind,
    text: String,
    reason: &'static str,
}

fn err(kind: ValueKind, text: &str, reason: &'static str) -> ValueError {
    let mut t = text.to_string();
    t.truncate(100);
    ValueError {
        kind,
        text: t,
        reason,
    }
}

/// Converts a value in Postgres' text output format.
pub fn from_text(kind: ValueKind, text: &str) -> Result<Value, ValueError> {
    Ok(match kind {
        ValueKind::Int => Value::Integer(
            text.parse::<i64>()
                .map_err(|_| err(kind, text, "not an integer"))?,
        ),
        ValueKind::Float => {
            float_value(parse_number(text).ok_or_else(|| err(kind, text, "not a number"))?)
        }
        ValueKind::Bool => Value::Integer(match text {
            "t" | "true" => 1,
            "f" | "false" => 0,
            _ => return Err(err(kind, text, "not a boolean")),
        }),
        ValueKind::Text | ValueKind::Uuid | ValueKind::Json | ValueKind::Jsonb => {
            Value::Text(text.to_string())
        }
        ValueKind::Timestamp | ValueKind::TimestampTz => {
            float_value(parse_timestamp(text).ok_or_else(|| err(kind, text, "not a timestamp"))?)
        }
        ValueKind::Date => {
            float_value(parse_date_ms(text).ok_or_else(|| err(kind, text, "not a date"))?)
        }
        ValueKind::Time | ValueKind::TimeTz => {
            float_value(parse_time_ms(text).ok_or_else(|| err(kind, text, "not a time"))?)
        }
        ValueKind::Array(elem) => {
            let json = parse_array(text, elem).ok_or_else(|| err(kind, text, "not an array"))?;
            Value::Text(json.to_string())
        }
    })
}

fn float_value(f: f64) -> Value {
    Value::Real(f)
}

/// Parses a number the way JavaScript's `Number()` reads Postgres output (`NaN`, `Infinity`).
fn parse_number(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => text.parse::<f64>().ok(),
    }
}

/// Days from 1970-01-01 to the given proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

const MS_PER_DAY: f64 = 86_400_000.0;

/// Parses `YYYY-MM-DD[ BC]` into (days since epoch, rest of the string after the date).
fn parse_date_part(text: &str) -> Option<(i64, &str)> {
    let bytes = text.as_bytes();
    let dash = text.find('-')?;
    if dash < 4 {
        return None;
    }
    let y: i64 = text[..dash].parse().ok()?;
    if bytes.len() < dash + 6 {
        return None;
    }
    let m: i64 = text[dash + 1..dash + 3].parse().ok()?;
    if bytes[dash + 3] != b'-' {
        return None;
    }
    let d: i64 = text[dash + 4..dash + 6].parse().ok()?;
    let rest = &text[dash + 6..];
    let bc = text.ends_with(" BC");
    // Year 1 BC is astronomical year 0.
    let y = if bc { 1 - y } else { y };
    Some((days_from_civil(y, m, d), rest))
}

/// Parses `HH:MM:SS[.ffffff]` and returns (microseconds, rest). Integer microseconds keep the
/// result bit-identical to the binary format's.
fn parse_clock(text: &str) -> Option<(i64, &str)> {
    let b = text.as_bytes();
    if b.len() < 8 || b[2] != b':' || b[5] != b':' {
        return None;
    }
    let h: i64 = text[0..2].parse().ok()?;
    let mi: i64 = text[3..5].parse().ok()?;
    let s: i64 = text[6..8].parse().ok()?;
    let mut rest = &text[8..];
    let mut frac_us = 0i64;
    if let Some(r) = rest.strip_prefix('.') {
        let n = r.bytes().take_while(u8::is_ascii_digit).count();
        let digits = &r[..n.min(6)];
        frac_us = format!("{digits:0<6}").parse::<i64>().ok()?;
        rest = &r[n..];
    }
    Some(((h * 3600 + mi * 60 + s) * 1_000_000 + frac_us, rest))
}

/// Parses a zone offset `+HH[:MM[:SS]]` into microseconds east of UTC.
fn parse_offset(text: &str) -> Option<(i64, &str)> {
    let sign = match text.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let t = &text[1..];
    let n = t
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b':')
        .count();
    let mut parts = t[..n].split(':');
    let h: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next().map(str::parse).transpose().ok()?.unwrap_or(0);
    let s: i64 = parts.next().map(str::parse).transpose().ok()?.unwrap_or(0);
    Some((sign * ((h * 3600 + m * 60 + s) * 1_000_000), &t[n..]))
}

/// Parses an ISO timestamp (with or without zone) into epoch milliseconds.
pub fn parse_timestamp(text: &str) -> Option<f64> {
    match text {
        "infinity" => return Some(f64::INFINITY),
        "-infinity" => return Some(f64::NEG_INFINITY),
        _ => {}
    }
    let (days, rest) = parse_date_part(text)?;
    let rest = rest.strip_prefix(' ').or_else(|| rest.strip_prefix('T'))?;
    let (us, rest) = parse_clock(rest)?;
    let mut total = days.checked_mul(86_400_000_000)?.checked_add(us)?;
    if let Some((off, _)) = parse_offset(rest) {
        total -= off;
    }
    Some(total as f64 / 1000.0)
}

fn parse_date_ms(text: &str) -> Option<f64> {
    match text {
        "infinity" => return Some(f64::INFINITY),
        "-infinity" => return Some(f64::NEG_INFINITY),
        _ => {}
    }
    let (days, _) = parse_date_part(text)?;
    Some(days as f64 * MS_PER_DAY)
}

fn parse_time_ms(text: &str) -> Option<f64> {
    let (us, _) = parse_clock(text)?;
    Some(us as f64 / 1000.0)
}

/// Parses a Postgres array literal into a JSON array, converting elements by `elem`.
pub fn parse_array(text: &str, elem: ElemKind) -> Option<serde_json::Value> {
    // Arrays with non-default bounds print as `[0:2]={...}`.
    let text = match text.strip_prefix('[') {
        Some(_) => &text[text.find('=')? + 1..],
        None => text,
    };
    let mut p = ArrayParser {
        s: text.as_bytes(),
        i: 0,
        elem,
    };
    let v = p.array()?;
    (p.i == p.s.len()).then_some(v)
}

struct ArrayParser<'a> {
    s: &'a [u8],
    i: usize,
    elem: ElemKind,
}

impl ArrayParser<'_> {
    fn array(&mut self) -> Option<serde_json::Value> {
        if self.s.get(self.i) != Some(&b'{') {
            return None;
        }
        self.i += 1;
        let mut out = Vec::new();
        if self.s.get(self.i) == Some(&b'}') {
            self.i += 1;
            return Some(serde_json::Value::Array(out));
        }
        loop {
            match self.s.get(self.i)? {
                b'{' => out.push(self.array()?),
                b'"' => {
                    let s = self.quoted()?;
                    out.push(self.element(&s)?);
                }
                _ => {
                    let start = self.i;
                    while !matches!(self.s.get(self.i)?, b',' | b'}') {
                        self.i += 1;
                    }
                    let raw = std::str::from_utf8(&self.s[start..self.i]).ok()?.trim();
                    if raw == "NULL" {
                        out.push(serde_json::Value::Null);
                    } else {
                        out.push(self.element(raw)?);
                    }
                }
            }
            match self.s.get(self.i)? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(serde_json::Value::Array(out));
                }
                _ => return None,
            }
        }
    }

    fn quoted(&mut self) -> Option<String> {
        self.i += 1;
        let mut buf = Vec::new();
        loop {
            match *self.s.get(self.i)? {
                b'\\' => {
                    buf.push(*self.s.get(self.i + 1)?);
                    self.i += 2;
                }
                b'"' => {
                    self.i += 1;
                    return String::from_utf8(buf).ok();
                }
                c => {
                    buf.push(c);
                    self.i += 1;
                }
            }
        }
    }

    fn element(&self, s: &str) -> Option<serde_json::Value> {
        use serde_json::Value as J;
        Some(match self.elem {
            ElemKind::Text => J::String(s.to_string()),
            ElemKind::Number => number_json(parse_number(s)?),
            ElemKind::Bool => J::Bool(match s {
                "t" | "true" => true,
                "f" | "false" => false,
                _ => return None,
            }),
            ElemKind::Json => serde_json::from_str(s).ok()?,
            ElemKind::Timestamp => number_json(parse_timestamp(s)?),
            ElemKind::Date => number_json(parse_date_ms(s)?),
            ElemKind::Time => number_json(parse_time_ms(s)?),
        })
    }
}

fn number_json(f: f64) -> serde_json::Value {
    if f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 {
        serde_json::Value::from(f as i64)
    } else {
        serde_json::Number::from_f64(f)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null)
    }
}

/// Microseconds between 1970-01-01 and 2000-01-01, Postgres' binary epoch.
const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// Converts a value in Postgres' binary send format. Only the kinds that binary COPY is asked
/// for (see [`binary_supported`]) arrive here.
pub fn from_binary(kind: ValueKind, b: &[u8]) -> Result<Value, ValueError> {
    let bad = |reason| err(kind, &format!("{b:02x?}"), reason);
    let int = |n: usize| -> Result<i64, ValueError> {
        Ok(match n {
            2 => i16::from_be_bytes(b.try_into().map_err(|_| bad("bad length"))?) as i64,
            4 => i32::from_be_bytes(b.try_into().map_err(|_| bad("bad length"))?) as i64,
            8 => i64::from_be_bytes(b.try_into().map_err(|_| bad("bad length"))?),
            _ => return Err(bad("bad length")),
        })
    };
    Ok(match kind {
        ValueKind::Int => Value::Integer(int(b.len())?),
        ValueKind::Float => match b.len() {
            4 => Value::Real(f32::from_be_bytes(b.try_into().expect("length checked")) as f64),
            8 => Value::Real(f64::from_be_bytes(b.try_into().expect("length checked"))),
            _ => return Err(bad("bad float length")),
        },
        ValueKind::Bool => Value::Integer(i64::from(*b.first().ok_or_else(|| bad("empty"))? != 0)),
        ValueKind::Text | ValueKind::Json => {
            Value::Text(String::from_utf8(b.to_vec()).map_err(|_| bad("invalid utf-8"))?)
        }
        ValueKind::Jsonb => {
            let (v, rest) = b.split_first().ok_or_else(|| bad("empty jsonb"))?;
            if *v != 1 {
                return Err(bad("unknown jsonb version"));
            }
            Value::Text(String::from_utf8(rest.to_vec()).map_err(|_| bad("invalid utf-8"))?)
        }
        ValueKind::Uuid => {
            if b.len() != 16 {
                return Err(bad("bad uuid length"));
            }
            let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
            Value::Text(format!(
                "{}-{}-{}-{}-{}",
                &h[0..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..32]
            ))
        }
        ValueKind::Timestamp | ValueKind::TimestampTz => {
            let us = int(8)?;
            Value::Real(match us {
                i64::MAX => f64::INFINITY,
                i64::MIN => f64::NEG_INFINITY,
                _ => us.saturating_add(PG_EPOCH_US) as f64 / 1000.0,
            })
        }
        ValueKind::Date => {
            let d = int(4)?;
            Value::Real(match d {
                d if d == i32::MAX as i64 => f64::INFINITY,
                d if d == i32::MIN as i64 => f64::NEG_INFINITY,
                d => (d * 86_400_000_000 + PG_EPOCH_US) as f64 / 1000.0,
            })
        }
        ValueKind::Time => Value::Real(int(8)? as f64 / 1000.0),
        ValueKind::TimeTz => {
            if b.len() != 12 {
                return Err(bad("bad timetz length"));
            }
            let us = i64::from_be_bytes(b[..8].try_into().expect("length checked"));
            Value::Real(us as f64 / 1000.0)
        }
        ValueKind::Array(_) => return Err(bad("arrays are copied as text")),
    })
}

/// Whether binary COPY can send this kind directly; other kinds are cast to text in the COPY
/// query and parsed with [`from_text`].
pub fn binary_supported(kind: ValueKind) -> bool {
    !matches!(kind, ValueKind::Array(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real(v: Value) -> f64 {
        match v {
            Value::Real(f) => f,
            other => panic!("expected real, got {other:?}"),
        }
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp("1970-01-01 00:00:00"), Some(0.0));
        assert_eq!(
            parse_timestamp("2024-02-29 12:34:56.789+00"),
            Some(1_709_210_096_789.0)
        );
        assert_eq!(
            parse_timestamp("2024-02-29 14:34:56.789+02"),
            Some(1_709_210_096_789.0)
        );
        assert_eq!(
            parse_timestamp("2024-02-29 07:04:56.789-05:30"),
            Some(1_709_210_096_789.0)
        );
        let us = parse_timestamp("2000-01-01 00:00:00.000123").unwrap();
        assert!((us - 946_684_800_000.123).abs() < 1e-6);
        assert_eq!(parse_timestamp("infinity"), Some(f64::INFINITY));
        assert_eq!(
            parse_timestamp("0001-01-01 00:00:00 BC"),
            Some(days_from_civil(0, 1, 1) as f64 * MS_PER_DAY)
        );
        assert_eq!(parse_timestamp("garbage"), None);
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(
            real(from_text(ValueKind::Date, "1970-01-02").unwrap()),
            MS_PER_DAY
        );
        assert_eq!(
            real(from_text(ValueKind::Time, "01:00:00.5").unwrap()),
            3_600_500.0
        );
        assert_eq!(
            real(from_text(ValueKind::TimeTz, "01:00:00+02").unwrap()),
            3_600_000.0
        );
    }

    #[test]
    fn binary_matches_text() {
        let us: i64 = 1_709_210_096_789_123 - PG_EPOCH_US;
        let b = from_binary(ValueKind::TimestampTz, &us.to_be_bytes()).unwrap();
        assert!((real(b) - 1_709_210_096_789.123).abs() < 1e-3);
        let d = from_binary(ValueKind::Date, &1i32.to_be_bytes()).unwrap();
        assert_eq!(
            real(d),
            real(from_text(ValueKind::Date, "2000-01-02").unwrap())
        );
        let u = from_binary(ValueKind::Uuid, &[0x12; 16]).unwrap();
        assert_eq!(
            u,
            Value::Text("12121212-1212-1212-1212-121212121212".into())
        );
    }

    #[test]
    fn arrays() {
        assert_eq!(
            parse_array("{1,2,NULL}", ElemKind::Number)
                .unwrap()
                .to_string(),
            "[1,2,null]"
        );
        assert_eq!(
            parse_array(r#"{"a b","c\"d",e,"NULL"}"#, ElemKind::Text)
                .unwrap()
                .to_string(),
            r#"["a b","c\"d","e","NULL"]"#
        );
        assert_eq!(
            parse_array("{{1,2},{3,4}}", ElemKind::Number)
                .unwrap()
                .to_string(),
            "[[1,2],[3,4]]"
        );
        assert_eq!(
            parse_array("{t,f}", ElemKind::Bool).unwrap().to_string(),
            "[true,false]"
        );
        assert_eq!(
            parse_array("[0:1]={1,2}", ElemKind::Number)
                .unwrap()
                .to_string(),
            "[1,2]"
        );
        assert_eq!(parse_array("{}", ElemKind::Text).unwrap().to_string(), "[]");
        assert!(parse_array("{1,2", ElemKind::Number).is_none());
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(from_text(ValueKind::Int, "x").is_err());
        assert!(from_text(ValueKind::Bool, "maybe").is_err());
    }
}
