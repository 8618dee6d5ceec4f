//! Row predicates with Zero's exact filter semantics (`builder/filter.ts`, `like.ts`, protocol
//! §7.2), for engines that evaluate conditions in memory (the dataflow `filter` closures, test
//! oracles).
//!
//! * `IS` / `IS NOT` are strict identity, so they are the only null-safe operators.
//! * Every other operator is false when either side is null (`NOT IN` and `NOT LIKE` too).
//! * `<`, `<=`, `>`, `>=` compare values of the same kind; mixed kinds are false.
//!   (Zero uses JavaScript's `<`, which orders strings by UTF-16 code units; this crate uses
//!   UTF-8 byte order everywhere, which differs only between U+E000–U+FFFF and astral
//!   characters.)
//! * `LIKE` is anchored; `%` matches any run of characters (newlines included), `_` one
//!   character, `\` escapes the next character and a trailing `\` is an error. `ILIKE` compares
//!   lower-cased text.

use std::cmp::Ordering;

use thiserror::Error;

use crate::ast::{Condition, LiteralValue, Operand, SimpleCondition, SimpleOp, ValuePosition};
use crate::value::Value;

/// A LIKE pattern that Zero rejects.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("LIKE pattern must not end with escape character")]
pub struct LikePatternError;

/// Why a condition cannot be evaluated in memory.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EvalError {
    /// Static parameters must be bound first.
    #[error("static parameters must be bound before evaluation")]
    UnboundStatic,
    /// EXISTS needs the related rows; evaluate it with a join.
    #[error("EXISTS conditions cannot be evaluated on a single row")]
    Subquery,
    /// A bad LIKE pattern.
    #[error(transparent)]
    Like(#[from] LikePatternError),
}

/// One element of a compiled LIKE pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LikeToken {
    /// `%`.
    AnyRun,
    /// `_`.
    AnyChar,
    /// A literal character (after escapes and, for ILIKE, lower-casing).
    Char(char),
}

/// A compiled LIKE / ILIKE pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LikePattern {
    tokens: Vec<LikeToken>,
    case_insensitive: bool,
}

impl LikePattern {
    /// Compiles `pattern`; `case_insensitive` for ILIKE.
    pub fn new(pattern: &str, case_insensitive: bool) -> Result<LikePattern, LikePatternError> {
        let source: String = if case_insensitive {
            pattern.to_lowercase()
        } else {
            pattern.to_owned()
        };
        let mut tokens = Vec::new();
        let mut chars = source.chars();
        while let Some(c) = chars.next() {
            match c {
                '%' => {
                    // Consecutive `%` are equivalent to one.
                    if tokens.last() != Some(&LikeToken::AnyRun) {
                        tokens.push(LikeToken::AnyRun);
                    }
                }
                '_' => tokens.push(LikeToken::AnyChar),
                '\\' => tokens.push(LikeToken::Char(chars.next().ok_or(LikePatternError)?)),
                c => tokens.push(LikeToken::Char(c)),
            }
        }
        Ok(LikePattern {
            tokens,
            case_insensitive,
        })
    }

    /// Whether `text` matches the whole pattern.
    pub fn matches(&self, text: &str) -> bool {
        let text: Vec<char> = if self.case_insensitive {
            text.to_lowercase().chars().collect()
        } else {
            text.chars().collect()
        };
        // Iterative wildcard matching with backtracking to the last `%`.
        let (mut t, mut p) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            match self.tokens.get(p) {
                Some(LikeToken::AnyChar) => {
                    t += 1;
                    p += 1;
                }
                Some(LikeToken::Char(c)) if *c == text[t] => {
                    t += 1;
                    p += 1;
                }
                Some(LikeToken::AnyRun) => {
                    star = Some((p, t));
                    p += 1;
                }
                _ => match star {
                    Some((sp, st)) => {
                        p = sp + 1;
                        t = st + 1;
                        star = Some((sp, st + 1));
                    }
                    None => return false,
                },
            }
        }
        self.tokens[p..].iter().all(|tok| *tok == LikeToken::AnyRun)
    }
}

/// Evaluates `lhs op rhs` with Zero's semantics.
pub fn eval_op(op: SimpleOp, lhs: &Value, rhs: &LiteralValue) -> Result<bool, LikePatternError> {
    match op {
        SimpleOp::Is => return Ok(is_identical(lhs, rhs)),
        SimpleOp::IsNot => return Ok(!is_identical(lhs, rhs)),
        _ => {}
    }
    if lhs.is_null() {
        return Ok(false);
    }
    let scalar = match rhs {
        LiteralValue::Scalar(v) if v.is_null() => return Ok(false),
        LiteralValue::Scalar(v) => Some(v),
        LiteralValue::Array(_) => None,
    };
    let cmp = |want: &[Ordering]| {
        scalar
            .and_then(|r| lhs.compare_non_null(r))
            .is_some_and(|o| want.contains(&o))
    };
    let like = |ci: bool| -> Result<bool, LikePatternError> {
        match (scalar, lhs.as_str()) {
            (Some(p), Some(text)) => {
                let pattern = match p.as_str() {
                    Some(s) => s.to_owned(),
                    None => p.to_string(),
                };
                Ok(LikePattern::new(&pattern, ci)?.matches(text))
            }
            _ => Ok(false),
        }
    };
    let member = || match rhs {
        LiteralValue::Array(items) => items.iter().any(|i| i == lhs && i.kind() == lhs.kind()),
        LiteralValue::Scalar(_) => false,
    };
    Ok(match op {
        SimpleOp::Eq => scalar.is_some_and(|r| strict_eq(lhs, r)),
        SimpleOp::Ne => scalar.is_some_and(|r| !strict_eq(lhs, r)),
        SimpleOp::Lt => cmp(&[Ordering::Less]),
        SimpleOp::Le => cmp(&[Ordering::Less, Ordering::Equal]),
        SimpleOp::Gt => cmp(&[Ordering::Greater]),
        SimpleOp::Ge => cmp(&[Ordering::Greater, Ordering::Equal]),
        SimpleOp::Like => like(false)?,
        SimpleOp::NotLike => !like(false)? && lhs.as_str().is_some(),
        SimpleOp::ILike => like(true)?,
        SimpleOp::NotILike => !like(true)? && lhs.as_str().is_some(),
        SimpleOp::In => member(),
        SimpleOp::NotIn => matches!(rhs, LiteralValue::Array(_)) && !member(),
        SimpleOp::Is | SimpleOp::IsNot => false,
    })
}

/// JavaScript `===` on wire values: scalars by value; JSON arrays/objects are never identical.
fn strict_eq(a: &Value, b: &Value) -> bool {
    a.kind() == b.kind() && a.kind() != crate::value::ValueKind::Json && a == b
}

fn is_identical(lhs: &Value, rhs: &LiteralValue) -> bool {
    match rhs {
        LiteralValue::Scalar(r) => (lhs.is_null() && r.is_null()) || strict_eq(lhs, r),
        LiteralValue::Array(_) => false,
    }
}

/// Evaluates a condition without subqueries on a row, where `column` looks up a column value.
pub fn eval_condition(cond: &Condition, column: &dyn Fn(&str) -> Value) -> Result<bool, EvalError> {
    match cond {
        Condition::And { conditions } => {
            for c in conditions {
                if !eval_condition(c, column)? {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        Condition::Or { conditions } => {
            for c in conditions {
                if eval_condition(c, column)? {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        Condition::CorrelatedSubquery(_) => Err(EvalError::Subquery),
        Condition::Simple(s) => eval_simple(s, column),
    }
}

/// Evaluates one simple condition on a row.
pub fn eval_simple(s: &SimpleCondition, column: &dyn Fn(&str) -> Value) -> Result<bool, EvalError> {
    let lhs = match &s.left {
        ValuePosition::Column { name } => column(name),
        ValuePosition::Literal { value } => match value {
            LiteralValue::Scalar(v) => v.clone(),
            // An array on the left never equals anything Zero compares it with.
            LiteralValue::Array(_) => value.to_value(),
        },
        ValuePosition::Static(_) => return Err(EvalError::UnboundStatic),
    };
    let rhs = match &s.right {
        Operand::Literal { value } => value,
        Operand::Static(_) => return Err(EvalError::UnboundStatic),
    };
    Ok(eval_op(s.op, &lhs, rhs)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn like(p: &str, t: &str) -> bool {
        LikePattern::new(p, false).expect("pattern").matches(t)
    }

    #[test]
    fn like_patterns() {
        assert!(like("abc", "abc"));
        assert!(!like("abc", "abcd"));
        assert!(like("a%", "abcd"));
        assert!(like("%d", "abcd"));
        assert!(like("%b%", "abcd"));
        assert!(!like("%x%", "abcd"));
        assert!(like("a_c", "abc"));
        assert!(!like("a_c", "ac"));
        assert!(like("a%%c", "ac"));
        assert!(like("%a%b%c%", "xxaxxbxxcxx"));
        assert!(like("a\\%", "a%"));
        assert!(!like("a\\%", "ab"));
        assert!(like("a\\_b", "a_b"));
        assert!(!like("a\\_b", "axb"));
        assert!(like("a\\\\b", "a\\b"));
        assert!(like("a%b", "a\nb"), "wildcards match newlines");
        assert!(!like("foo_", "fooa\nbar"), "anchored over the whole string");
        assert!(like("é_", "éé"));
        assert!(!like("ABC", "abc"));
        assert!(like("", ""));
        assert!(!like("", "a"));
        assert!(like("%", ""));
        assert_eq!(LikePattern::new("ab\\", false), Err(LikePatternError));
        assert!(LikePattern::new("AB%", true).expect("p").matches("abC"));
        assert!(LikePattern::new("É%", true).expect("p").matches("éa"));
    }

    #[test]
    fn null_rules() {
        let null = Value::Null;
        let one = LiteralValue::Scalar(Value::from(1));
        let lnull = LiteralValue::Scalar(Value::Null);
        for op in SimpleOp::ALL {
            let expect_is = matches!(op, SimpleOp::IsNot);
            if op == SimpleOp::Is || op == SimpleOp::IsNot {
                assert_eq!(eval_op(op, &null, &one), Ok(expect_is), "{op}");
                assert_eq!(eval_op(op, &null, &lnull), Ok(op == SimpleOp::Is), "{op}");
            } else {
                let rhs = if op.is_in() {
                    LiteralValue::Array(vec![Value::from(1)])
                } else {
                    one.clone()
                };
                assert_eq!(eval_op(op, &null, &rhs), Ok(false), "null {op}");
                assert_eq!(eval_op(op, &Value::from(1), &lnull), Ok(false), "{op} null");
            }
        }
    }

    #[test]
    fn comparisons_and_membership() {
        let n = |x: f64| Value::Number(x);
        let lit = |v: Value| LiteralValue::Scalar(v);
        assert_eq!(eval_op(SimpleOp::Lt, &n(1.0), &lit(n(2.0))), Ok(true));
        assert_eq!(eval_op(SimpleOp::Ge, &n(2.0), &lit(n(2.0))), Ok(true));
        assert_eq!(
            eval_op(SimpleOp::Gt, &Value::from("b"), &lit(Value::from("a"))),
            Ok(true)
        );
        assert_eq!(
            eval_op(SimpleOp::Lt, &Value::from("1"), &lit(n(2.0))),
            Ok(false)
        );
        assert_eq!(
            eval_op(SimpleOp::Lt, &Value::Bool(false), &lit(Value::Bool(true))),
            Ok(true)
        );
        assert_eq!(
            eval_op(SimpleOp::Eq, &Value::Bool(true), &lit(n(1.0))),
            Ok(false)
        );
        assert_eq!(
            eval_op(SimpleOp::Ne, &Value::Bool(true), &lit(n(1.0))),
            Ok(true)
        );
        let arr = LiteralValue::Array(vec![n(1.0), Value::from("a")]);
        assert_eq!(eval_op(SimpleOp::In, &n(1.0), &arr), Ok(true));
        assert_eq!(eval_op(SimpleOp::In, &Value::from("1"), &arr), Ok(false));
        assert_eq!(eval_op(SimpleOp::NotIn, &Value::from("b"), &arr), Ok(true));
        assert_eq!(eval_op(SimpleOp::NotIn, &Value::from("a"), &arr), Ok(false));
        assert_eq!(
            eval_op(SimpleOp::NotIn, &n(1.0), &LiteralValue::Array(vec![])),
            Ok(true)
        );
        assert_eq!(
            eval_op(SimpleOp::NotLike, &n(1.0), &lit(Value::from("%"))),
            Ok(false)
        );
        assert_eq!(
            eval_op(
                SimpleOp::NotILike,
                &Value::from("ABC"),
                &lit(Value::from("a%"))
            ),
            Ok(false)
        );
        assert_eq!(
            eval_op(SimpleOp::Like, &Value::from("x"), &lit(Value::from("x\\"))),
            Err(LikePatternError)
        );
    }

    #[test]
    fn conditions_on_rows() {
        let row = |c: &str| match c {
            "a" => Value::from(1),
            "b" => Value::from("x"),
            _ => Value::Null,
        };
        let c = Condition::Or {
            conditions: vec![
                Condition::cmp("a", SimpleOp::Eq, 2),
                Condition::And {
                    conditions: vec![
                        Condition::cmp("b", SimpleOp::Like, "x%"),
                        Condition::cmp("c", SimpleOp::Is, Value::Null),
                    ],
                },
            ],
        };
        assert_eq!(eval_condition(&c, &row), Ok(true));
        assert_eq!(eval_condition(&Condition::false_(), &row), Ok(false));
        assert_eq!(eval_condition(&Condition::true_(), &row), Ok(true));
    }
}
