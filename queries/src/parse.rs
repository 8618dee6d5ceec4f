//! A parser for ZQL as people write it in TypeScript, producing the AST the 1.9 client would
//! send for the same query.
//!
//! ```text
//! issue.where('open', true)
//!      .whereExists('labels', l => l.where('name', 'bug'))
//!      .related('creator')
//!      .related('comments', c => c.orderBy('created', 'desc').limit(10))
//!      .orderBy('modified', 'desc')
//!      .limit(100)
//! ```
//!
//! Supported: `where(field, value)`, `where(field, op, value)`, `where(eb => expr)` with
//! `cmp`, `cmpLit`, `and`, `or`, `not` and `exists` (destructured `({cmp, or}) => ...` or
//! prefixed `eb => eb.cmp(...)`), `whereExists(rel, cb?, {flip?, scalar?}?)`,
//! `related(rel, cb?)`, `orderBy(field, 'asc'|'desc')`, `limit(n)`, `one()`,
//! `start(row, {inclusive}?)`. A leading `z.query.` (any dotted prefix) is ignored. Callbacks
//! are arrow functions with an expression body or a `{ return ...; }` block.
//!
//! The AST is built as `query-impl.ts` builds it: relationship hops come from the schema
//! (a junction relationship becomes a hidden junction hop), subqueries get their primary key
//! appended to `orderBy`, EXISTS subqueries are aliased `zsubq_<rel>` (and
//! `zsubq_zhidden_<rel>` behind a junction), conditions go through Zero's `and` / `or` /
//! `simplifyCondition`, and the root gets its completed ordering. `flip` and `scalar` are set
//! on EXISTS conditions only when the options give them.
//!
//! Errors carry the byte offset of the offending text.

use thiserror::Error;

use crate::ast::{
    Ast, Bound, Condition, CorrelatedSubquery, CorrelatedSubqueryCondition, Correlation, Direction,
    ExistsOp, LiteralValue, Operand, OrderPart, RowObject, SUBQ_PREFIX, SimpleCondition, SimpleOp,
    System, ValuePosition,
};
use crate::schema::{Hop, Schema, TableSchema};
use crate::validate::simplify_condition;
use crate::value::Value;

/// A parse failure: where it happened and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("at byte {offset}: {message}")]
pub struct ParseError {
    /// Byte offset into the source text.
    pub offset: usize,
    /// What was wrong.
    pub message: String,
}

/// Parses a ZQL query written in TypeScript syntax against `schema`.
pub fn parse_query(src: &str, schema: &Schema) -> Result<Ast, ParseError> {
    let tokens = lex(src)?;
    let mut p = Parser {
        src,
        tokens,
        pos: 0,
        schema,
    };
    let q = p.root()?;
    p.expect_end()?;
    Ok(q)
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(f64),
    Punct(&'static str),
    End,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    offset: usize,
}

fn err(offset: usize, message: impl Into<String>) -> ParseError {
    ParseError {
        offset,
        message: message.into(),
    }
}

fn lex(src: &str) -> Result<Vec<Token>, ParseError> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if src[i..].starts_with("//") {
            i = src[i..].find('\n').map_or(bytes.len(), |n| i + n);
            continue;
        }
        if src[i..].starts_with("/*") {
            let end = src[i + 2..]
                .find("*/")
                .ok_or_else(|| err(i, "unterminated comment"))?;
            i += end + 4;
            continue;
        }
        let start = i;
        if c.is_ascii_alphabetic() || c == b'_' || c == b'$' {
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b'$')
            {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Ident(src[start..i].to_owned()),
                offset: start,
            });
            continue;
        }
        if c.is_ascii_digit() || (c == b'.' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric()
                    || bytes[i] == b'.'
                    || bytes[i] == b'_'
                    || ((bytes[i] == b'+' || bytes[i] == b'-')
                        && matches!(bytes[i - 1], b'e' | b'E')))
            {
                i += 1;
            }
            let text: String = src[start..i].chars().filter(|c| *c != '_').collect();
            let n = parse_number(&text).ok_or_else(|| err(start, format!("bad number {text}")))?;
            out.push(Token {
                tok: Tok::Num(n),
                offset: start,
            });
            continue;
        }
        if c == b'\'' || c == b'"' || c == b'`' {
            let (s, next) = lex_string(src, i)?;
            out.push(Token {
                tok: Tok::Str(s),
                offset: start,
            });
            i = next;
            continue;
        }
        const PUNCT: [&str; 13] = [
            "=>", "(", ")", "[", "]", "{", "}", ",", ".", ":", ";", "-", "!",
        ];
        match PUNCT.iter().find(|p| src[i..].starts_with(**p)) {
            Some(p) => {
                out.push(Token {
                    tok: Tok::Punct(p),
                    offset: start,
                });
                i += p.len();
            }
            None => {
                let ch = src[i..].chars().next().unwrap_or('?');
                return Err(err(i, format!("unexpected character '{ch}'")));
            }
        }
    }
    out.push(Token {
        tok: Tok::End,
        offset: src.len(),
    });
    Ok(out)
}

fn parse_number(text: &str) -> Option<f64> {
    let lower = text.to_ascii_lowercase();
    if let Some(hex) = lower.strip_prefix("0x") {
        return u64::from_str_radix(hex, 16).ok().map(|n| n as f64);
    }
    if let Some(bin) = lower.strip_prefix("0b") {
        return u64::from_str_radix(bin, 2).ok().map(|n| n as f64);
    }
    if let Some(oct) = lower.strip_prefix("0o") {
        return u64::from_str_radix(oct, 8).ok().map(|n| n as f64);
    }
    lower.parse().ok()
}

fn lex_string(src: &str, start: usize) -> Result<(String, usize), ParseError> {
    let quote = src.as_bytes()[start] as char;
    let mut out = String::new();
    let mut chars = src[start + 1..].char_indices();
    while let Some((off, c)) = chars.next() {
        let at = start + 1 + off;
        match c {
            c if c == quote => return Ok((out, at + 1)),
            '$' if quote == '`' && src[at..].starts_with("${") => {
                return Err(err(at, "template substitutions are not supported"));
            }
            '\\' => {
                let (_, e) = chars.next().ok_or_else(|| err(at, "unterminated string"))?;
                match e {
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    'r' => out.push('\r'),
                    'b' => out.push('\u{8}'),
                    'f' => out.push('\u{c}'),
                    'v' => out.push('\u{b}'),
                    '0' => out.push('\0'),
                    '\n' => {}
                    'u' => {
                        let rest = &src[at + 2..];
                        let (code, len) = if let Some(braced) = rest.strip_prefix('{') {
                            let close = braced
                                .find('}')
                                .ok_or_else(|| err(at, "bad unicode escape"))?;
                            (u32::from_str_radix(&braced[..close], 16).ok(), close + 2)
                        } else {
                            (
                                rest.get(..4).and_then(|h| u32::from_str_radix(h, 16).ok()),
                                4,
                            )
                        };
                        let ch = code
                            .and_then(char::from_u32)
                            .ok_or_else(|| err(at, "bad unicode escape"))?;
                        out.push(ch);
                        for _ in 0..len {
                            chars.next();
                        }
                    }
                    other => out.push(other),
                }
            }
            '\n' if quote != '`' => return Err(err(at, "unterminated string")),
            c => out.push(c),
        }
    }
    Err(err(start, "unterminated string"))
}

/// A query under construction, like the client's `QueryImpl`.
struct Builder {
    ast: Ast,
    /// Set inside the callback of a junction relationship, where limit/orderBy are refused.
    junction: Option<String>,
}

/// A parsed literal argument.
#[derive(Debug, Clone)]
enum Lit {
    Value(Value),
    Array(Vec<Value>),
    Object(Vec<(String, Lit)>),
}

struct Parser<'s> {
    src: &'s str,
    tokens: Vec<Token>,
    pos: usize,
    schema: &'s Schema,
}

impl Parser<'_> {
    fn peek(&self) -> &Tok {
        &self.tokens[self.pos].tok
    }

    fn peek_at(&self, n: usize) -> &Tok {
        let i = (self.pos + n).min(self.tokens.len() - 1);
        &self.tokens[i].tok
    }

    fn offset(&self) -> usize {
        self.tokens[self.pos].offset
    }

    fn bump(&mut self) -> Token {
        let t = self.tokens[self.pos].clone();
        if self.pos < self.tokens.len() - 1 {
            self.pos += 1;
        }
        t
    }

    fn describe(&self) -> String {
        match self.peek() {
            Tok::End => "end of input".to_owned(),
            _ => {
                let start = self.offset();
                let end = self
                    .tokens
                    .get(self.pos + 1)
                    .map_or(self.src.len(), |t| t.offset);
                format!("'{}'", self.src[start..end].trim())
            }
        }
    }

    fn is_punct(&self, p: &str) -> bool {
        matches!(self.peek(), Tok::Punct(q) if *q == p)
    }

    fn eat_punct(&mut self, p: &str) -> bool {
        if self.is_punct(p) {
            self.bump();
            true
        } else {
            false
        }
    }

    fn expect_punct(&mut self, p: &str) -> Result<(), ParseError> {
        if self.eat_punct(p) {
            Ok(())
        } else {
            Err(err(
                self.offset(),
                format!("expected '{p}', found {}", self.describe()),
            ))
        }
    }

    fn expect_end(&mut self) -> Result<(), ParseError> {
        self.eat_punct(";");
        if matches!(self.peek(), Tok::End) {
            Ok(())
        } else {
            Err(err(
                self.offset(),
                format!("unexpected {} after the query", self.describe()),
            ))
        }
    }

    fn ident(&mut self) -> Result<(String, usize), ParseError> {
        let off = self.offset();
        match self.peek().clone() {
            Tok::Ident(s) => {
                self.bump();
                Ok((s, off))
            }
            _ => Err(err(
                off,
                format!("expected a name, found {}", self.describe()),
            )),
        }
    }

    fn string(&mut self, what: &str) -> Result<(String, usize), ParseError> {
        let off = self.offset();
        match self.peek().clone() {
            Tok::Str(s) => {
                self.bump();
                Ok((s, off))
            }
            _ => Err(err(
                off,
                format!("expected {what} (a string), found {}", self.describe()),
            )),
        }
    }

    fn table(&self, name: &str, off: usize) -> Result<&TableSchema, ParseError> {
        self.schema
            .table(name)
            .ok_or_else(|| err(off, format!("unknown table \"{name}\"")))
    }

    fn check_column(&self, table: &str, col: &str, off: usize) -> Result<(), ParseError> {
        let t = self.table(table, off)?;
        if t.column(col).is_none() {
            return Err(err(
                off,
                format!("table \"{table}\" has no column \"{col}\""),
            ));
        }
        Ok(())
    }

    /// `[prefix.]table(.method(...))*`, then the completed root ordering.
    fn root(&mut self) -> Result<Ast, ParseError> {
        let (mut name, mut off) = self.ident()?;
        while self.is_punct(".")
            && matches!(self.peek_at(1), Tok::Ident(_))
            && !matches!(self.peek_at(2), Tok::Punct("("))
        {
            self.bump();
            (name, off) = self.ident()?;
        }
        self.table(&name, off)?;
        let b = Builder {
            ast: Ast::new(name),
            junction: None,
        };
        let b = self.chain(b)?;
        self.complete_root(b.ast, off)
    }

    fn complete_root(&self, mut ast: Ast, off: usize) -> Result<Ast, ParseError> {
        let t = self.table(&ast.table, off)?;
        let order = add_primary_keys(t, ast.order_by.take());
        if let Some(start) = &mut ast.start {
            // The client keeps only the ordering columns of the start row.
            let row = order
                .iter()
                .filter_map(|p| start.row.get(&p.0).map(|v| (p.0.clone(), v.clone())))
                .collect();
            start.row = RowObject(row);
        }
        ast.order_by = Some(order);
        Ok(ast)
    }

    /// Method calls applied to `b` until no `.name(` follows.
    fn chain(&mut self, mut b: Builder) -> Result<Builder, ParseError> {
        while self.is_punct(".") {
            self.bump();
            let (method, off) = self.ident()?;
            self.expect_punct("(")?;
            b = match method.as_str() {
                "where" => self.m_where(b)?,
                "whereExists" => self.m_where_exists(b)?,
                "related" => self.m_related(b)?,
                "orderBy" => self.m_order_by(b, off)?,
                "limit" => self.m_limit(b, off)?,
                "one" => {
                    b.ast.limit = Some(1);
                    b
                }
                "start" => self.m_start(b)?,
                other => {
                    return Err(err(off, format!("unknown query method \"{other}\"")));
                }
            };
            self.eat_punct(",");
            self.expect_punct(")")?;
        }
        Ok(b)
    }

    fn m_where(&mut self, mut b: Builder) -> Result<Builder, ParseError> {
        let cond = if self.at_arrow() {
            self.expr_callback(&b.ast.table)?
        } else {
            let (field, off) = self.string("a column name")?;
            self.check_column(&b.ast.table, &field, off)?;
            self.expect_punct(",")?;
            let (first, first_off) = self.literal()?;
            if self.eat_punct(",") && !self.is_punct(")") {
                let op = op_of(&first, first_off)?;
                let (value, voff) = self.literal()?;
                simple(ValuePosition::column(field), op, value, voff)?
            } else {
                simple(ValuePosition::column(field), SimpleOp::Eq, first, first_off)?
            }
        };
        add_where(&mut b.ast, cond);
        Ok(b)
    }

    fn m_where_exists(&mut self, mut b: Builder) -> Result<Builder, ParseError> {
        let cond = self.exists_args(&b.ast.table)?;
        add_where(&mut b.ast, cond);
        Ok(b)
    }

    /// `rel, cb?, opts?` of `whereExists` / `exists`.
    fn exists_args(&mut self, table: &str) -> Result<Condition, ParseError> {
        let (rel_name, off) = self.string("a relationship name")?;
        let rel = self
            .schema
            .relationship(table, &rel_name)
            .ok_or_else(|| {
                err(
                    off,
                    format!("table \"{table}\" has no relationship \"{rel_name}\""),
                )
            })?
            .clone();
        let mut cb = None;
        let mut flip = None;
        let mut scalar = None;
        if self.eat_punct(",") && !self.is_punct(")") {
            if self.at_arrow() {
                cb = Some(self.pos);
                self.skip_callback()?;
                if self.eat_punct(",") && !self.is_punct(")") {
                    (flip, scalar) = self.exists_options()?;
                }
            } else {
                (flip, scalar) = self.exists_options()?;
            }
        }
        let end = self.pos;
        let dest = rel.dest_table().to_owned();
        let junction = rel.junction().map(str::to_owned);
        let alias = match &junction {
            Some(_) => format!("{SUBQ_PREFIX}zhidden_{rel_name}"),
            None => format!("{SUBQ_PREFIX}{rel_name}"),
        };
        let dest_ast = self.run_callback(
            cb,
            &dest,
            alias,
            junction.as_ref().map(|_| rel_name.clone()),
        )?;
        self.pos = end;
        let dest_ast = self.with_pk_order(dest_ast, off)?;
        let exists = |hop: &Hop, subquery: Ast| {
            Condition::CorrelatedSubquery(CorrelatedSubqueryCondition {
                related: CorrelatedSubquery {
                    correlation: correlation(hop),
                    hidden: None,
                    subquery: Box::new(subquery),
                    system: Some(System::Client),
                },
                op: ExistsOp::Exists,
                flip,
                scalar,
            })
        };
        match rel.hops.as_slice() {
            [hop] => Ok(exists(hop, dest_ast)),
            [first, second] => {
                let junction_table = self.table(&first.dest_table, off)?;
                let mut j = Ast::new(first.dest_table.clone());
                j.alias = Some(format!("{SUBQ_PREFIX}{rel_name}"));
                j.order_by = Some(add_primary_keys(junction_table, None));
                j.where_ = Some(exists(second, dest_ast));
                Ok(exists(first, j))
            }
            _ => Err(err(off, format!("relationship \"{rel_name}\" has no hops"))),
        }
    }

    fn exists_options(&mut self) -> Result<(Option<bool>, Option<bool>), ParseError> {
        let (lit, off) = self.literal()?;
        let Lit::Object(fields) = lit else {
            return Err(err(off, "expected an options object like {flip: true}"));
        };
        let mut flip = None;
        let mut scalar = None;
        for (k, v) in fields {
            let b = match v {
                Lit::Value(Value::Bool(b)) => Some(b),
                Lit::Value(Value::Null) => None,
                _ => return Err(err(off, format!("option \"{k}\" must be a boolean"))),
            };
            match k.as_str() {
                "flip" => flip = b,
                "scalar" => scalar = b,
                other => return Err(err(off, format!("unknown exists option \"{other}\""))),
            }
        }
        Ok((flip, scalar))
    }

    fn m_related(&mut self, mut b: Builder) -> Result<Builder, ParseError> {
        let table = b.ast.table.clone();
        let (rel_name, off) = self.string("a relationship name")?;
        if rel_name.starts_with(SUBQ_PREFIX) {
            return Err(err(
                off,
                format!("relationship names may not start with \"{SUBQ_PREFIX}\""),
            ));
        }
        let rel = self
            .schema
            .relationship(&table, &rel_name)
            .ok_or_else(|| {
                err(
                    off,
                    format!("table \"{table}\" has no relationship \"{rel_name}\""),
                )
            })?
            .clone();
        let mut cb = None;
        if self.eat_punct(",") && !self.is_punct(")") {
            cb = Some(self.pos);
            self.skip_callback()?;
        }
        let end = self.pos;
        let junction = rel.junction().map(|_| rel_name.clone());
        let dest = rel.dest_table().to_owned();
        let sub = self.run_callback(cb, &dest, rel_name.clone(), junction)?;
        self.pos = end;
        let sub = self.with_pk_order(sub, off)?;
        let entry = match rel.hops.as_slice() {
            [hop] => CorrelatedSubquery {
                correlation: correlation(hop),
                hidden: None,
                subquery: Box::new(sub),
                system: Some(System::Client),
            },
            [first, second] => {
                let junction_table = self.table(&first.dest_table, off)?;
                let mut j = Ast::new(first.dest_table.clone());
                j.alias = Some(rel_name.clone());
                j.order_by = Some(add_primary_keys(junction_table, None));
                j.related = Some(vec![CorrelatedSubquery {
                    correlation: correlation(second),
                    hidden: None,
                    subquery: Box::new(sub),
                    system: Some(System::Client),
                }]);
                CorrelatedSubquery {
                    correlation: correlation(first),
                    hidden: Some(true),
                    subquery: Box::new(j),
                    system: Some(System::Client),
                }
            }
            _ => return Err(err(off, format!("relationship \"{rel_name}\" has no hops"))),
        };
        b.ast.related.get_or_insert_with(Vec::new).push(entry);
        Ok(b)
    }

    fn m_order_by(&mut self, mut b: Builder, method_off: usize) -> Result<Builder, ParseError> {
        if let Some(j) = &b.junction {
            return Err(err(
                method_off,
                format!("orderBy is not supported in junction relationships (\"{j}\")"),
            ));
        }
        let (field, off) = self.string("a column name")?;
        self.check_column(&b.ast.table, &field, off)?;
        self.expect_punct(",")?;
        let (dir, doff) = self.string("'asc' or 'desc'")?;
        let dir = match dir.as_str() {
            "asc" => Direction::Asc,
            "desc" => Direction::Desc,
            other => {
                return Err(err(
                    doff,
                    format!("direction must be 'asc' or 'desc', not '{other}'"),
                ));
            }
        };
        b.ast
            .order_by
            .get_or_insert_with(Vec::new)
            .push(OrderPart::new(field, dir));
        Ok(b)
    }

    fn m_limit(&mut self, mut b: Builder, method_off: usize) -> Result<Builder, ParseError> {
        if let Some(j) = &b.junction {
            return Err(err(
                method_off,
                format!("limit is not supported in junction relationships (\"{j}\")"),
            ));
        }
        let (lit, off) = self.literal()?;
        let n = match lit {
            Lit::Value(Value::Number(n)) => n,
            _ => return Err(err(off, "limit must be a number")),
        };
        if n < 0.0 {
            return Err(err(off, "limit must be non-negative"));
        }
        if n.fract() != 0.0 || n > 2f64.powi(31) - 1.0 {
            return Err(err(off, "limit must be an integer"));
        }
        // Checked above: a non-negative integer below 2^31.
        b.ast.limit = Some(n as u64);
        Ok(b)
    }

    fn m_start(&mut self, mut b: Builder) -> Result<Builder, ParseError> {
        let (row, off) = self.literal()?;
        let Lit::Object(fields) = row else {
            return Err(err(off, "start expects a row object"));
        };
        let mut out = Vec::new();
        for (k, v) in fields {
            self.check_column(&b.ast.table, &k, off)?;
            match v {
                Lit::Value(v) => out.push((k, v)),
                _ => {
                    return Err(err(
                        off,
                        format!("start value for \"{k}\" must be a scalar"),
                    ));
                }
            }
        }
        let mut inclusive = false;
        if self.eat_punct(",") && !self.is_punct(")") {
            let (opts, ooff) = self.literal()?;
            let Lit::Object(opts) = opts else {
                return Err(err(ooff, "expected {inclusive: boolean}"));
            };
            for (k, v) in opts {
                match (k.as_str(), v) {
                    ("inclusive", Lit::Value(Value::Bool(x))) => inclusive = x,
                    _ => return Err(err(ooff, format!("unknown start option \"{k}\""))),
                }
            }
        }
        b.ast.start = Some(Bound {
            row: RowObject(out),
            exclusive: !inclusive,
        });
        Ok(b)
    }

    fn with_pk_order(&self, mut ast: Ast, off: usize) -> Result<Ast, ParseError> {
        let t = self.table(&ast.table, off)?;
        ast.order_by = Some(add_primary_keys(t, ast.order_by.take()));
        Ok(ast)
    }

    /// True when an arrow function starts here: `x =>`, `(x) =>`, `({a, b}) =>`, `() =>`.
    fn at_arrow(&self) -> bool {
        match self.peek() {
            Tok::Ident(_) => matches!(self.peek_at(1), Tok::Punct("=>")),
            Tok::Punct("(") => {
                let mut depth = 0usize;
                let mut i = self.pos;
                while i < self.tokens.len() {
                    match &self.tokens[i].tok {
                        Tok::Punct("(") => depth += 1,
                        Tok::Punct(")") => {
                            depth -= 1;
                            if depth == 0 {
                                return matches!(
                                    self.tokens.get(i + 1).map(|t| &t.tok),
                                    Some(Tok::Punct("=>"))
                                );
                            }
                        }
                        Tok::End => return false,
                        _ => {}
                    }
                    i += 1;
                }
                false
            }
            _ => false,
        }
    }

    /// Parameters of an arrow function: one name, or destructured names.
    fn arrow_params(&mut self) -> Result<Params, ParseError> {
        let params = if self.eat_punct("(") {
            let p = if self.eat_punct("{") {
                let mut names = Vec::new();
                while !self.eat_punct("}") {
                    let (n, _) = self.ident()?;
                    let local = if self.eat_punct(":") {
                        self.ident()?.0
                    } else {
                        n.clone()
                    };
                    names.push((n, local));
                    if !self.eat_punct(",") {
                        self.expect_punct("}")?;
                        break;
                    }
                }
                Params::Destructured(names)
            } else if self.is_punct(")") {
                Params::Destructured(vec![])
            } else {
                Params::Name(self.ident()?.0)
            };
            // Type annotations such as `(q: Query)` are skipped.
            if self.eat_punct(":") {
                while !self.is_punct(")") && !matches!(self.peek(), Tok::End) {
                    self.bump();
                }
            }
            self.expect_punct(")")?;
            p
        } else {
            Params::Name(self.ident()?.0)
        };
        self.expect_punct("=>")?;
        Ok(params)
    }

    /// Skips a callback (to come back to it once its table is known).
    fn skip_callback(&mut self) -> Result<(), ParseError> {
        let mut depth = 0i32;
        loop {
            match self.peek() {
                Tok::Punct("(" | "[" | "{") => depth += 1,
                Tok::Punct(")" | "]" | "}") => {
                    if depth == 0 {
                        return Ok(());
                    }
                    depth -= 1;
                }
                Tok::Punct(",") if depth == 0 => return Ok(()),
                Tok::End => return Err(err(self.offset(), "unexpected end of input")),
                _ => {}
            }
            self.bump();
        }
    }

    /// Runs a query callback (at token `at`) on a fresh builder for `table` with `alias`.
    fn run_callback(
        &mut self,
        at: Option<usize>,
        table: &str,
        alias: String,
        junction: Option<String>,
    ) -> Result<Ast, ParseError> {
        let mut ast = Ast::new(table);
        ast.alias = Some(alias);
        let b = Builder { ast, junction };
        let Some(at) = at else {
            return Ok(b.ast);
        };
        self.pos = at;
        let params = self.arrow_params()?;
        let Params::Name(param) = params else {
            return Err(err(self.offset(), "a query callback takes one parameter"));
        };
        let block = self.eat_punct("{");
        if block {
            let (kw, off) = self.ident()?;
            if kw != "return" {
                return Err(err(off, "expected 'return'"));
            }
        }
        let (name, off) = self.ident()?;
        if name != param {
            return Err(err(
                off,
                format!("the callback must start from its parameter \"{param}\""),
            ));
        }
        let b = self.chain(b)?;
        if block {
            self.eat_punct(";");
            self.expect_punct("}")?;
        }
        Ok(b.ast)
    }

    /// `where(eb => expr)`.
    fn expr_callback(&mut self, table: &str) -> Result<Condition, ParseError> {
        let params = self.arrow_params()?;
        let block = self.eat_punct("{");
        if block {
            let (kw, off) = self.ident()?;
            if kw != "return" {
                return Err(err(off, "expected 'return'"));
            }
        }
        let c = self.expr(table, &params)?;
        if block {
            self.eat_punct(";");
            self.expect_punct("}")?;
        }
        Ok(c)
    }

    fn expr(&mut self, table: &str, params: &Params) -> Result<Condition, ParseError> {
        let (mut name, mut off) = self.ident()?;
        if let Params::Name(eb) = params
            && &name == eb
            && self.eat_punct(".")
        {
            (name, off) = self.ident()?;
        }
        let func = match params {
            Params::Name(_) => name.clone(),
            Params::Destructured(names) => names
                .iter()
                .find(|(_, local)| *local == name)
                .map(|(orig, _)| orig.clone())
                .ok_or_else(|| {
                    err(
                        off,
                        format!("\"{name}\" is not a parameter of the callback"),
                    )
                })?,
        };
        self.expect_punct("(")?;
        let cond = match func.as_str() {
            "cmp" => {
                let (field, foff) = self.string("a column name")?;
                self.check_column(table, &field, foff)?;
                self.expect_punct(",")?;
                let (first, first_off) = self.literal()?;
                if self.eat_punct(",") && !self.is_punct(")") {
                    let op = op_of(&first, first_off)?;
                    let (value, voff) = self.literal()?;
                    simple(ValuePosition::column(field), op, value, voff)?
                } else {
                    simple(ValuePosition::column(field), SimpleOp::Eq, first, first_off)?
                }
            }
            "cmpLit" => {
                let (left, loff) = self.literal()?;
                self.expect_punct(",")?;
                let (op, ooff) = self.literal()?;
                let op = op_of(&op, ooff)?;
                self.expect_punct(",")?;
                let (right, roff) = self.literal()?;
                let left = match left {
                    Lit::Value(v) => ValuePosition::Literal {
                        value: LiteralValue::Scalar(v),
                    },
                    Lit::Array(a) => ValuePosition::Literal {
                        value: LiteralValue::Array(a),
                    },
                    Lit::Object(_) => return Err(err(loff, "a literal cannot be an object")),
                };
                simple(left, op, right, roff)?
            }
            "and" | "or" => {
                let mut items = Vec::new();
                while !self.is_punct(")") {
                    items.push(self.expr(table, params)?);
                    if !self.eat_punct(",") {
                        break;
                    }
                }
                if func == "and" {
                    zero_and(items)
                } else {
                    zero_or(items)
                }
            }
            "not" => {
                let inner = self.expr(table, params)?;
                self.eat_punct(",");
                zero_not(inner)
            }
            "exists" => self.exists_args(table)?,
            other => {
                return Err(err(off, format!("unknown expression function \"{other}\"")));
            }
        };
        self.eat_punct(",");
        self.expect_punct(")")?;
        Ok(cond)
    }

    /// A literal argument: string, number, boolean, null/undefined, array or object.
    fn literal(&mut self) -> Result<(Lit, usize), ParseError> {
        let off = self.offset();
        let lit = match self.peek().clone() {
            Tok::Str(s) => {
                self.bump();
                Lit::Value(Value::String(s.into()))
            }
            Tok::Num(n) => {
                self.bump();
                Lit::Value(Value::Number(n))
            }
            Tok::Punct("-") => {
                self.bump();
                match self.peek().clone() {
                    Tok::Num(n) => {
                        self.bump();
                        Lit::Value(Value::Number(-n))
                    }
                    _ => return Err(err(self.offset(), "expected a number after '-'")),
                }
            }
            Tok::Ident(id) => {
                self.bump();
                match id.as_str() {
                    "true" => Lit::Value(Value::Bool(true)),
                    "false" => Lit::Value(Value::Bool(false)),
                    "null" | "undefined" => Lit::Value(Value::Null),
                    other => {
                        return Err(err(
                            off,
                            format!("expected a literal value, found name \"{other}\""),
                        ));
                    }
                }
            }
            Tok::Punct("[") => {
                self.bump();
                let mut items = Vec::new();
                while !self.eat_punct("]") {
                    let (item, ioff) = self.literal()?;
                    match item {
                        Lit::Value(v) if !v.is_null() => items.push(v),
                        _ => {
                            return Err(err(
                                ioff,
                                "array literals may hold only strings, numbers and booleans",
                            ));
                        }
                    }
                    if !self.eat_punct(",") {
                        self.expect_punct("]")?;
                        break;
                    }
                }
                Lit::Array(items)
            }
            Tok::Punct("{") => {
                self.bump();
                let mut fields = Vec::new();
                while !self.eat_punct("}") {
                    let key = match self.peek().clone() {
                        Tok::Ident(k) | Tok::Str(k) => {
                            self.bump();
                            k
                        }
                        _ => {
                            return Err(err(
                                self.offset(),
                                format!("expected a property name, found {}", self.describe()),
                            ));
                        }
                    };
                    self.expect_punct(":")?;
                    let (v, _) = self.literal()?;
                    fields.push((key, v));
                    if !self.eat_punct(",") {
                        self.expect_punct("}")?;
                        break;
                    }
                }
                Lit::Object(fields)
            }
            _ => {
                return Err(err(
                    off,
                    format!("expected a literal value, found {}", self.describe()),
                ));
            }
        };
        Ok((lit, off))
    }
}

enum Params {
    Name(String),
    /// `(original name, local name)` pairs.
    Destructured(Vec<(String, String)>),
}

fn op_of(lit: &Lit, off: usize) -> Result<SimpleOp, ParseError> {
    match lit {
        Lit::Value(Value::String(s)) => {
            SimpleOp::parse(s).ok_or_else(|| err(off, format!("unknown operator \"{s}\"")))
        }
        _ => Err(err(off, "expected an operator string such as '='")),
    }
}

fn simple(
    left: ValuePosition,
    op: SimpleOp,
    value: Lit,
    off: usize,
) -> Result<Condition, ParseError> {
    let value = match value {
        Lit::Value(v) => LiteralValue::Scalar(v),
        Lit::Array(a) => LiteralValue::Array(a),
        Lit::Object(_) => return Err(err(off, "a literal cannot be an object")),
    };
    Ok(Condition::Simple(SimpleCondition {
        left,
        right: Operand::Literal { value },
        op,
    }))
}

fn correlation(hop: &Hop) -> Correlation {
    Correlation {
        parent_field: hop.source_field.clone(),
        child_field: hop.dest_field.clone(),
    }
}

/// The client's `addPrimaryKeys`: append missing primary-key columns ascending.
fn add_primary_keys(table: &TableSchema, order: Option<Vec<OrderPart>>) -> Vec<OrderPart> {
    let mut order = order.unwrap_or_default();
    for pk in &table.primary_key {
        if !order.iter().any(|p| &p.0 == pk) {
            order.push(OrderPart::new(pk.clone(), Direction::Asc));
        }
    }
    order
}

fn is_true(c: &Condition) -> bool {
    matches!(c, Condition::And { conditions } if conditions.is_empty())
}

fn is_false(c: &Condition) -> bool {
    matches!(c, Condition::Or { conditions } if conditions.is_empty())
}

/// The client's `and(...)`.
fn zero_and(items: Vec<Condition>) -> Condition {
    let mut items: Vec<_> = items.into_iter().filter(|c| !is_true(c)).collect();
    if items.len() == 1 {
        return items.remove(0);
    }
    if items.iter().any(is_false) {
        return Condition::false_();
    }
    Condition::And { conditions: items }
}

/// The client's `or(...)`.
fn zero_or(items: Vec<Condition>) -> Condition {
    let mut items: Vec<_> = items.into_iter().filter(|c| !is_false(c)).collect();
    if items.len() == 1 {
        return items.remove(0);
    }
    if items.iter().any(is_true) {
        return Condition::true_();
    }
    Condition::Or { conditions: items }
}

/// The client's `not(...)`.
fn zero_not(c: Condition) -> Condition {
    match c {
        Condition::And { conditions } => Condition::Or {
            conditions: conditions.into_iter().map(zero_not).collect(),
        },
        Condition::Or { conditions } => Condition::And {
            conditions: conditions.into_iter().map(zero_not).collect(),
        },
        Condition::CorrelatedSubquery(mut c) => {
            c.op = c.op.negate();
            Condition::CorrelatedSubquery(c)
        }
        Condition::Simple(mut s) => {
            s.op = s.op.negate();
            Condition::Simple(s)
        }
    }
}

/// `where` on a query that may already have one: `simplify(and(existing, cond))`.
fn add_where(ast: &mut Ast, cond: Condition) {
    let cond = match ast.where_.take() {
        Some(existing) => zero_and(vec![existing, cond]),
        None => cond,
    };
    ast.where_ = Some(simplify_condition(&cond));
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::schema::tests::zbugs;

    fn parse(src: &str) -> Ast {
        parse_query(src, &zbugs()).unwrap_or_else(|e| panic!("{src}: {e}"))
    }

    fn parse_err(src: &str) -> ParseError {
        parse_query(src, &zbugs()).expect_err(src)
    }

    fn json_of(ast: &Ast) -> serde_json::Value {
        serde_json::to_value(ast).expect("json")
    }

    fn simple_json(col: &str, op: &str, v: serde_json::Value) -> serde_json::Value {
        json!({"type":"simple","left":{"type":"column","name":col},"right":{"type":"literal","value":v},"op":op})
    }

    #[test]
    fn reproduces_the_open_issues_ast_of_the_trace() {
        // The AST the API server returned for `openIssues` in api-trace.jsonl, minus the
        // primary-key ordering the client adds to subqueries.
        let ast = parse(
            "issue.where('open', true).related('creator').related('labels').orderBy('modified', 'desc').limit(10)",
        );
        assert_eq!(
            json_of(&ast),
            json!({"table":"issue","where":simple_json("open","=",json!(true)),
              "related":[
                {"correlation":{"parentField":["creatorID"],"childField":["id"]},"subquery":{"table":"user","alias":"creator","orderBy":[["id","asc"]]},"system":"client"},
                {"correlation":{"parentField":["id"],"childField":["issueID"]},"hidden":true,"subquery":{"table":"issueLabel","alias":"labels",
                  "related":[{"correlation":{"parentField":["labelID"],"childField":["id"]},"subquery":{"table":"label","alias":"labels","orderBy":[["id","asc"]]},"system":"client"}],
                  "orderBy":[["issueID","asc"],["labelID","asc"]]},"system":"client"}],
              "limit":10,"orderBy":[["modified","desc"],["id","asc"]]})
        );
    }

    #[test]
    fn where_exists_one_and_two_hops() {
        let ast = parse("issue.whereExists('comments', c => c.where('body', 'LIKE', '%x%'))");
        assert_eq!(
            json_of(&ast)["where"],
            json!({"type":"correlatedSubquery","related":{"correlation":{"parentField":["id"],"childField":["issueID"]},
                "subquery":{"table":"comment","alias":"zsubq_comments","where":simple_json("body","LIKE",json!("%x%")),"orderBy":[["id","asc"]]},"system":"client"},"op":"EXISTS"})
        );
        let ast = parse("issue.whereExists('labels', l => l.where('name', 'bug'), {flip: true})");
        assert_eq!(
            json_of(&ast)["where"],
            json!({"type":"correlatedSubquery","related":{"correlation":{"parentField":["id"],"childField":["issueID"]},
                "subquery":{"table":"issueLabel","alias":"zsubq_labels",
                  "where":{"type":"correlatedSubquery","related":{"correlation":{"parentField":["labelID"],"childField":["id"]},
                    "subquery":{"table":"label","alias":"zsubq_zhidden_labels","where":simple_json("name","=",json!("bug")),"orderBy":[["id","asc"]]},"system":"client"},"op":"EXISTS","flip":true},
                  "orderBy":[["issueID","asc"],["labelID","asc"]]},"system":"client"},"op":"EXISTS","flip":true})
        );
    }

    #[test]
    fn expression_callbacks() {
        let a = parse(
            "z.query.issue.where(({cmp, and, or, not, exists}) => and(cmp('open', true), or(cmp('modified', '>', 5), not(exists('comments'))), cmp('id', 'IN', ['a', 'b'])))",
        );
        let b = parse(
            "issue.where(eb => eb.and(eb.cmp('open', true), eb.or(eb.cmp('modified', '>', 5), eb.not(eb.exists('comments'))), eb.cmp('id', 'IN', ['a', 'b'])))",
        );
        assert_eq!(a, b);
        let w = json_of(&a)["where"].clone();
        assert_eq!(w["type"], "and");
        assert_eq!(w["conditions"][0], simple_json("open", "=", json!(true)));
        assert_eq!(w["conditions"][1]["type"], "or");
        assert_eq!(
            w["conditions"][1]["conditions"][1]["op"], "NOT EXISTS",
            "not(exists) negates the operator"
        );
        assert_eq!(
            w["conditions"][2],
            simple_json("id", "IN", json!(["a", "b"]))
        );
        // not() of a simple condition negates the operator the way the client does.
        let n = parse("issue.where(({not, cmp}) => not(cmp('modified', '<', 3)))");
        assert_eq!(json_of(&n)["where"]["op"], ">=");
    }

    #[test]
    fn successive_wheres_are_anded_and_simplified() {
        let ast =
            parse("issue.where('open', true).where('modified', '>', 1).where('title', '!=', 'x')");
        assert_eq!(
            json_of(&ast)["where"],
            json!({"type":"and","conditions":[
                simple_json("open","=",json!(true)),
                simple_json("modified",">",json!(1)),
                simple_json("title","!=",json!("x"))]})
        );
    }

    #[test]
    fn related_with_subquery_callbacks_one_and_start() {
        let ast = parse(
            r#"issue.related('comments', (c) => { return c.orderBy('created', 'desc').limit(10).related('creator'); })
                    .start({id: 'abc', modified: 5, title: 'ignored'}, {inclusive: true}).one()"#,
        );
        let j = json_of(&ast);
        assert_eq!(j["limit"], 1);
        assert_eq!(
            j["start"],
            json!({"row":{"id":"abc"},"exclusive":false}),
            "start row keeps only ordering columns"
        );
        let c = &j["related"][0]["subquery"];
        assert_eq!(c["alias"], "comments");
        assert_eq!(c["limit"], 10);
        assert_eq!(c["orderBy"], json!([["created", "desc"], ["id", "asc"]]));
        assert_eq!(c["related"][0]["subquery"]["alias"], "creator");
        let s = parse("issue.orderBy('modified','asc').start({modified: 5, id: 'x'})");
        assert_eq!(
            json_of(&s)["start"],
            json!({"row":{"modified":5,"id":"x"},"exclusive":true})
        );
    }

    #[test]
    fn literals() {
        let ast = parse(
            r#"issue.where('title', "it's \"q\" \u00e9").where('modified', -1.5e3).where('assigneeID', 'IS', null).where('id', 'NOT IN', [])"#,
        );
        let w = json_of(&ast)["where"].clone();
        assert_eq!(w["conditions"][0]["right"]["value"], "it's \"q\" é");
        assert_eq!(w["conditions"][1]["right"]["value"], -1500);
        assert_eq!(w["conditions"][2]["right"]["value"], json!(null));
        assert_eq!(w["conditions"][3]["right"]["value"], json!([]));
    }

    #[test]
    fn errors_point_at_the_offending_text() {
        let src = "issue.where('nope', 1)";
        let e = parse_err(src);
        assert_eq!(e.offset, src.find("'nope'").expect("pos"));
        assert_eq!(e.message, "table \"issue\" has no column \"nope\"");

        let src = "issue.related('bogus')";
        let e = parse_err(src);
        assert_eq!(e.offset, 14);
        assert!(e.message.contains("no relationship \"bogus\""));

        let src = "issues.where('id', 1)";
        assert_eq!(parse_err(src).message, "unknown table \"issues\"");

        let src = "issue.where('id', '~', 1)";
        let e = parse_err(src);
        assert_eq!(e.offset, src.find("'~'").expect("pos"));
        assert_eq!(e.message, "unknown operator \"~\"");

        let src = "issue.limit(1.5)";
        assert_eq!(parse_err(src).message, "limit must be an integer");
        let src = "issue.limit(-1)";
        assert_eq!(parse_err(src).message, "limit must be non-negative");

        let src = "issue.related('labels', l => l.limit(3))";
        let e = parse_err(src);
        assert_eq!(e.offset, src.find("limit(3)").expect("pos"));
        assert!(e.message.starts_with("limit is not supported in junction"));

        let src = "issue.where('id', 'a'";
        let e = parse_err(src);
        assert_eq!(e.offset, src.len());
        assert_eq!(e.message, "expected ')', found end of input");

        let src = "issue.frobnicate()";
        assert_eq!(parse_err(src).offset, 6);

        let src = "issue.where('title', 'a) ";
        assert_eq!(parse_err(src).message, "unterminated string");

        let src = "issue.related('comments', c => d.limit(1))";
        assert!(
            parse_err(src)
                .message
                .contains("must start from its parameter")
        );
        let src = "issue.where(({cmp}) => or(cmp('id', 1)))";
        assert_eq!(
            parse_err(src).message,
            "\"or\" is not a parameter of the callback"
        );
    }

    #[test]
    fn bare_table_query_hashes_like_the_client() {
        // query-manager.test.ts: `z.query.issue` is sent as {table, orderBy:[[id, asc]]} and
        // hashed to 12hwg3ihkijhm.
        let ast = parse("z.query.issue");
        assert_eq!(
            ast.to_json_string(),
            r#"{"table":"issue","orderBy":[["id","asc"]]}"#
        );
        assert_eq!(
            crate::hash::hash_of_ast(&ast).expect("hash"),
            "12hwg3ihkijhm"
        );
    }

    #[test]
    fn exists_queries_hash_like_the_client_builds_them() {
        // Hand-written in the key order of the client's `exists()` / `cmp()` builders.
        let client = r#"{"table":"issue","where":{"type":"correlatedSubquery","related":{"system":"client","correlation":{"parentField":["id"],"childField":["issueID"]},"subquery":{"table":"comment","alias":"zsubq_comments","where":{"type":"simple","left":{"type":"column","name":"body"},"right":{"type":"literal","value":"x"},"op":"="},"orderBy":[["id","asc"]]}},"op":"EXISTS","flip":true},"orderBy":[["id","asc"]]}"#;
        let ast = parse("issue.whereExists('comments', c => c.where('body', 'x'), {flip: true})");
        let json: serde_json::Value = serde_json::from_str(client).expect("json");
        assert_eq!(
            crate::hash::hash_of_ast(&ast).expect("typed"),
            crate::hash::hash_of_ast_json(&json).expect("json")
        );
    }

    #[test]
    fn parsed_queries_validate_and_hash() {
        let ast = parse(
            "issue.where('open', true).whereExists('labels', l => l.where('name', 'bug')).related('creator').orderBy('modified', 'desc').limit(100)",
        );
        crate::validate::validate(&ast, &zbugs()).expect("valid");
        let h = crate::hash::hash_of_ast(&ast).expect("hash");
        assert!(!h.is_empty());
        // The typed hash agrees with the JSON path for ASTs built like the client builds them.
        assert_eq!(
            crate::hash::hash_of_ast_json(&json_of(&ast)).expect("hash"),
            h
        );
    }
}
