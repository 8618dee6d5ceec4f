//! Zero's query hashes (protocol §5.1–5.2).
//!
//! Query ids are `h64(text)` printed in base 36, where `h64` concatenates two xxHash32 values
//! (seeds 0 and 1) of the UTF-8 text. The text is `JSON.stringify` of the normalized AST for
//! legacy queries and `name + ":" + JSON.stringify(args)` for custom queries. The server only
//! echoes the client's hash, but it needs the same function for its own transformation hash and
//! to check fixtures; so `JSON.stringify`'s number and string formatting are reproduced here
//! exactly ([`js_stringify`]).

use std::fmt::Write as _;

use crate::ast::Ast;
use crate::normalize::{NormalizeError, normalize, normalize_json};

const PRIME32_1: u32 = 0x9E37_79B1;
const PRIME32_2: u32 = 0x85EB_CA77;
const PRIME32_3: u32 = 0xC2B2_AE3D;
const PRIME32_4: u32 = 0x27D4_EB2F;
const PRIME32_5: u32 = 0x1656_67B1;

fn read_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

fn round(acc: u32, lane: u32) -> u32 {
    acc.wrapping_add(lane.wrapping_mul(PRIME32_2))
        .rotate_left(13)
        .wrapping_mul(PRIME32_1)
}

/// xxHash32 of `input` with `seed` (the function `js-xxhash` implements).
pub fn xxhash32(input: &[u8], seed: u32) -> u32 {
    let len = input.len();
    let mut rest = input;
    let mut h = if len >= 16 {
        let mut v1 = seed.wrapping_add(PRIME32_1).wrapping_add(PRIME32_2);
        let mut v2 = seed.wrapping_add(PRIME32_2);
        let mut v3 = seed;
        let mut v4 = seed.wrapping_sub(PRIME32_1);
        while rest.len() >= 16 {
            v1 = round(v1, read_u32(&rest[0..4]));
            v2 = round(v2, read_u32(&rest[4..8]));
            v3 = round(v3, read_u32(&rest[8..12]));
            v4 = round(v4, read_u32(&rest[12..16]));
            rest = &rest[16..];
        }
        v1.rotate_left(1)
            .wrapping_add(v2.rotate_left(7))
            .wrapping_add(v3.rotate_left(12))
            .wrapping_add(v4.rotate_left(18))
    } else {
        seed.wrapping_add(PRIME32_5)
    };
    // xxHash32 adds the length modulo 2^32 by definition.
    h = h.wrapping_add(len as u32);
    while rest.len() >= 4 {
        h = h
            .wrapping_add(read_u32(&rest[0..4]).wrapping_mul(PRIME32_3))
            .rotate_left(17)
            .wrapping_mul(PRIME32_4);
        rest = &rest[4..];
    }
    for &b in rest {
        h = h
            .wrapping_add(u32::from(b).wrapping_mul(PRIME32_5))
            .rotate_left(11)
            .wrapping_mul(PRIME32_1);
    }
    h ^= h >> 15;
    h = h.wrapping_mul(PRIME32_2);
    h ^= h >> 13;
    h = h.wrapping_mul(PRIME32_3);
    h ^= h >> 16;
    h
}

/// Zero's `h32`: xxHash32 with seed 0 of the UTF-8 bytes.
pub fn h32(s: &str) -> u32 {
    xxhash32(s.as_bytes(), 0)
}

/// Zero's `h64`: `(xxHash32(s, 0) << 32) + xxHash32(s, 1)`.
pub fn h64(s: &str) -> u64 {
    (u64::from(xxhash32(s.as_bytes(), 0)) << 32) | u64::from(xxhash32(s.as_bytes(), 1))
}

/// Zero's `h128`: seeds 0..=3 concatenated, most significant first.
pub fn h128(s: &str) -> u128 {
    (0..4u32).fold(0u128, |acc, seed| {
        (acc << 32) | u128::from(xxhash32(s.as_bytes(), seed))
    })
}

/// Lower-case base-36 without padding, like JavaScript's `BigInt.prototype.toString(36)`.
pub fn to_base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    if n == 0 {
        return "0".to_owned();
    }
    let mut out = Vec::new();
    while n > 0 {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
    }
    out.reverse();
    out.into_iter().map(char::from).collect()
}

/// `h64(s).toString(36)`: the form every query id takes.
pub fn h64_base36(s: &str) -> String {
    to_base36(h64(s))
}

/// Id of a custom (named) query: `h64(name + ":" + JSON.stringify(args))` in base 36.
pub fn hash_of_name_and_args(name: &str, args: &serde_json::Value) -> String {
    h64_base36(&format!("{name}:{}", js_stringify(args)))
}

/// Id of a legacy AST query, computed from the typed AST (normalized first).
///
/// Simple and EXISTS conditions are written in the key order the 1.9 client's `cmp()` and
/// `exists()` produce; when the AST was received as JSON and the exact client hash is needed,
/// use [`hash_of_ast_json`].
pub fn hash_of_ast(ast: &Ast) -> Result<String, NormalizeError> {
    let normalized = normalize(ast)?;
    let json =
        serde_json::to_value(&normalized).map_err(|e| NormalizeError::Json(e.to_string()))?;
    Ok(h64_base36(&js_stringify(&json)))
}

/// Id of a legacy AST query from its JSON, keeping the key order it arrived with exactly as
/// Zero's `hashOfAST(normalizeAST(ast))` does.
pub fn hash_of_ast_json(ast: &serde_json::Value) -> Result<String, NormalizeError> {
    Ok(h64_base36(&js_stringify(&normalize_json(ast)?)))
}

/// `JSON.stringify` of a JSON value: compact, keys in map order, JavaScript number formatting.
pub fn js_stringify(v: &serde_json::Value) -> String {
    let mut out = String::new();
    write_json(&mut out, v);
    out
}

fn write_json(out: &mut String, v: &serde_json::Value) {
    match v {
        serde_json::Value::Null => out.push_str("null"),
        serde_json::Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        serde_json::Value::Number(n) => out.push_str(&js_number_of_json(n)),
        serde_json::Value::String(s) => write_json_string(out, s),
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(out, item);
            }
            out.push(']');
        }
        serde_json::Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_string(out, k);
                out.push(':');
                write_json(out, item);
            }
            out.push('}');
        }
    }
}

/// Writes a string literal the way `JSON.stringify` does: only `"`, `\` and control characters
/// are escaped; non-ASCII text stays as is.
fn write_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn js_number_of_json(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64()
        && i.unsigned_abs() <= (1u64 << 53)
    {
        return i.to_string();
    }
    js_number_to_string(n.as_f64().unwrap_or(f64::NAN))
}

/// JavaScript's `Number.prototype.toString()` (what `JSON.stringify` and `String()` print),
/// except that non-finite numbers print as `null`, as `JSON.stringify` does.
pub fn js_number_to_string(x: f64) -> String {
    if !x.is_finite() {
        return "null".to_owned();
    }
    if x == 0.0 {
        return "0".to_owned();
    }
    if x < 0.0 {
        return format!("-{}", js_number_to_string(-x));
    }
    // Rust's `{:e}` prints the shortest round-tripping digits, as ECMAScript requires.
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let exp: i64 = exp.parse().unwrap_or(0);
    let k = digits.len() as i64;
    let n = exp + 1;
    if k <= n && n <= 21 {
        let zeros = usize::try_from(n - k).unwrap_or(0);
        format!("{digits}{}", "0".repeat(zeros))
    } else if 0 < n && n <= 21 {
        let split = usize::try_from(n).unwrap_or(0);
        format!("{}.{}", &digits[..split], &digits[split..])
    } else if -6 < n && n <= 0 {
        let zeros = usize::try_from(-n).unwrap_or(0);
        format!("0.{}{digits}", "0".repeat(zeros))
    } else {
        let e = n - 1;
        let sign = if e >= 0 { '+' } else { '-' };
        if k == 1 {
            format!("{digits}e{sign}{}", e.abs())
        } else {
            format!("{}.{}e{sign}{}", &digits[..1], &digits[1..], e.abs())
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn protocol_test_vectors() {
        assert_eq!(
            h64_base36(r#"{"table":"issue","orderBy":[["id","asc"]]}"#),
            "12hwg3ihkijhm"
        );
        assert_eq!(h64_base36("customQuery:[1]"), "2l1ig6e3tnu0a");
        assert_eq!(h64_base36(r#"issuesByProject:["p1"]"#), "14m4q81n073w8");
        assert_eq!(h64_base36(""), "1j5etzlexqqa");
    }

    #[test]
    fn custom_query_ids_from_the_recorded_trace() {
        assert_eq!(
            hash_of_name_and_args("customQuery", &json!([1])),
            "2l1ig6e3tnu0a"
        );
        assert_eq!(
            hash_of_name_and_args("issuesByProject", &json!(["p1"])),
            "14m4q81n073w8"
        );
        // Ids the 1.9 client sent in fixtures/zero-1.9/trace.jsonl.
        assert_eq!(
            hash_of_name_and_args("openIssues", &json!([{"limit": 10}])),
            "3re8590kr6tsx"
        );
        assert_eq!(
            hash_of_name_and_args("issueDetail", &json!([{"id": "zddfabskzg"}])),
            "2e18olvjqmsge"
        );
    }

    #[test]
    fn ast_hash_matches_the_query_manager_vector() {
        let ast = Ast::from_json_str(r#"{"orderBy":[["id","asc"]],"table":"issue"}"#).expect("ast");
        assert_eq!(hash_of_ast(&ast).expect("hash"), "12hwg3ihkijhm");
        let json: serde_json::Value =
            serde_json::from_str(r#"{"orderBy":[["id","asc"]],"table":"issue"}"#).expect("json");
        assert_eq!(hash_of_ast_json(&json).expect("hash"), "12hwg3ihkijhm");
    }

    #[test]
    fn client_query_manager_vectors() {
        // Hashes the client sent for these (client-name) ASTs in Zero's query-manager and
        // zero-client tests.
        let cases = [
            (
                r#"{"table":"issue","orderBy":[["id","desc"]]}"#,
                "1hydj1t7t5yv4",
            ),
            (
                r#"{"table":"user","orderBy":[["id","asc"]]}"#,
                "3c5d3uiyypuxu",
            ),
            (
                r#"{"table":"user","orderBy":[["id","desc"]]}"#,
                "2q7cds8pild5w",
            ),
            (
                r#"{"table":"issue","limit":1,"orderBy":[["id","asc"]]}"#,
                "1vsd9vcx6ynd4",
            ),
            // Simple condition written {type, left, op, right}; related without alias.
            (
                r#"{"table":"issue","where":{"type":"and","conditions":[
                    {"type":"simple","left":{"type":"column","name":"ownerId"},"op":"IS NOT","right":{"type":"literal","value":"null"}},
                    {"type":"correlatedSubquery","related":{"correlation":{"parentField":["id"],"childField":["issueId"]},"subquery":{"table":"comment"}},"op":"EXISTS"}]},
                  "related":[{"correlation":{"parentField":["ownerId"],"childField":["id"]},"subquery":{"table":"user"}}],
                  "orderBy":[["ownerId","desc"],["id","asc"]],
                  "start":{"row":{"id":"123","ownerId":"foobar"},"exclusive":false}}"#,
                "2courpv3kf7et",
            ),
        ];
        for (text, want) in cases {
            let json: serde_json::Value = serde_json::from_str(text).expect("json");
            assert_eq!(hash_of_ast_json(&json).expect("hash"), want, "{text}");
        }
        // The typed path agrees when the input uses the builder's key order.
        let ast = Ast::from_json_str(cases[3].0).expect("ast");
        assert_eq!(hash_of_ast(&ast).expect("hash"), "1vsd9vcx6ynd4");
    }

    #[test]
    fn xxhash32_reference_values() {
        // Published xxHash32 values.
        assert_eq!(xxhash32(b"", 0), 0x02CC_5D05);
        assert_eq!(xxhash32(b"", 1), 0x0B2C_B792);
        assert_eq!(xxhash32(b"a", 0), 0x550D_7456);
        assert_eq!(xxhash32(b"abc", 0), 0x32D1_53FF);
        assert_eq!(
            xxhash32(b"Nobody inspects the spammish repetition", 0),
            0xE229_3B2F
        );
        let _ = h128("x");
    }

    #[test]
    fn numbers_print_like_javascript() {
        let cases = [
            (0.0, "0"),
            (-0.0, "0"),
            (1.0, "1"),
            (-1.5, "-1.5"),
            (0.1, "0.1"),
            (100.0, "100"),
            (1e21, "1e+21"),
            (1e20, "100000000000000000000"),
            (123456789012345680000.0, "123456789012345680000"),
            (1.5e-7, "1.5e-7"),
            (0.000001, "0.000001"),
            (1e-7, "1e-7"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (1735689600000.0, "1735689600000"),
            (0.30000000000000004, "0.30000000000000004"),
        ];
        for (x, want) in cases {
            assert_eq!(js_number_to_string(x), want, "{x}");
        }
        assert_eq!(js_stringify(&json!(1e21)), "1e+21");
        assert_eq!(
            js_stringify(&json!(12345678901234567890u64)),
            "12345678901234567000"
        );
    }

    #[test]
    fn strings_escape_like_json_stringify() {
        assert_eq!(
            js_stringify(&json!({"a\"b": "x\\y\n\u{1}é\u{2028}/"})),
            "{\"a\\\"b\":\"x\\\\y\\n\\u0001é\u{2028}/\"}"
        );
    }

    #[test]
    fn base36() {
        assert_eq!(to_base36(0), "0");
        assert_eq!(to_base36(35), "z");
        assert_eq!(to_base36(36), "10");
        assert_eq!(to_base36(u64::MAX), "3w5e11264sgsf");
    }
}
