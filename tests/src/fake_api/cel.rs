//! A documented subset of CEL (https://github.com/google/cel-spec), enough to evaluate the
//! ValidatingAdmissionPolicy that `manifests/base` ships (docs/fake-api-server.md section 14).
//! Values are JSON values. Supported:
//! - literals: `'single'` / `"double"` quoted strings, integers, `true`, `false`, `null`;
//! - identifiers bound by the caller (`object`, `oldObject`, `request`, `variables`) and by
//!   macros; field selection `a.b`, indexing `a['k']` / `a[0]`;
//! - `!`, `==`, `!=`, `in` (key of a map, element of a list), `&&`, `||`, `c ? a : b`;
//! - `has(a.b)` (presence of the last field), `e.size()`, `s.startsWith(p)`,
//!   `l.all(x, p)`, `l.exists(x, p)`.
//!
//! Differences from CEL: `&&` and `||` evaluate left to right and stop early (CEL also absorbs
//! errors on the right of a deciding left side, and on the left of a deciding right side; the
//! shipped policy never relies on that); no types beyond JSON, no arithmetic, no other
//! functions or macros. A missing field or a wrong type is an error, which the admission
//! check treats as a denial (the shipped policy's `failurePolicy: Fail`).

use std::collections::BTreeMap;

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Str(String),
    Int(i64),
    Ident(String),
    Sym(&'static str),
}

fn tokenize(src: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c == '\'' || c == '"' {
            let mut s = String::new();
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    i += 1;
                }
                s.push(chars[i]);
                i += 1;
            }
            if i >= chars.len() {
                return Err(format!("unterminated string in {src:?}"));
            }
            i += 1;
            out.push(Tok::Str(s));
            continue;
        }
        if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            let n: String = chars[start..i].iter().collect();
            out.push(Tok::Int(n.parse().map_err(|e| format!("{n}: {e}"))?));
            continue;
        }
        if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Tok::Ident(chars[start..i].iter().collect()));
            continue;
        }
        let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
        let sym = match two.as_str() {
            "==" => Some("=="),
            "!=" => Some("!="),
            "&&" => Some("&&"),
            "||" => Some("||"),
            _ => None,
        };
        if let Some(s) = sym {
            out.push(Tok::Sym(s));
            i += 2;
            continue;
        }
        let one = match c {
            '!' => "!",
            '.' => ".",
            '(' => "(",
            ')' => ")",
            '[' => "[",
            ']' => "]",
            ',' => ",",
            '?' => "?",
            ':' => ":",
            _ => return Err(format!("unsupported character {c:?} in {src:?}")),
        };
        out.push(Tok::Sym(one));
        i += 1;
    }
    Ok(out)
}

#[derive(Debug, Clone)]
enum Expr {
    Lit(Value),
    Ident(String),
    Field(Box<Expr>, String),
    Index(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Eq(Box<Expr>, Box<Expr>, bool),
    In(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Cond(Box<Expr>, Box<Expr>, Box<Expr>),
    Has(Box<Expr>, String),
    Method(Box<Expr>, String, Vec<Expr>),
    /// `list.all(var, pred)` / `list.exists(var, pred)`.
    Macro(Box<Expr>, String, String, Box<Expr>),
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn eat(&mut self, sym: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Sym(s)) if *s == sym) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, sym: &str) -> Result<(), String> {
        if self.eat(sym) {
            Ok(())
        } else {
            Err(format!("expected {sym:?} at token {}", self.pos))
        }
    }
    fn ident(&mut self) -> Result<String, String> {
        match self.toks.get(self.pos) {
            Some(Tok::Ident(s)) => {
                self.pos += 1;
                Ok(s.clone())
            }
            other => Err(format!("expected a name, got {other:?}")),
        }
    }

    fn expr(&mut self) -> Result<Expr, String> {
        let c = self.or()?;
        if self.eat("?") {
            let a = self.expr()?;
            self.expect(":")?;
            let b = self.expr()?;
            return Ok(Expr::Cond(Box::new(c), Box::new(a), Box::new(b)));
        }
        Ok(c)
    }
    fn or(&mut self) -> Result<Expr, String> {
        let mut l = self.and()?;
        while self.eat("||") {
            l = Expr::Or(Box::new(l), Box::new(self.and()?));
        }
        Ok(l)
    }
    fn and(&mut self) -> Result<Expr, String> {
        let mut l = self.rel()?;
        while self.eat("&&") {
            l = Expr::And(Box::new(l), Box::new(self.rel()?));
        }
        Ok(l)
    }
    fn rel(&mut self) -> Result<Expr, String> {
        let l = self.unary()?;
        if self.eat("==") {
            return Ok(Expr::Eq(Box::new(l), Box::new(self.unary()?), true));
        }
        if self.eat("!=") {
            return Ok(Expr::Eq(Box::new(l), Box::new(self.unary()?), false));
        }
        if matches!(self.peek(), Some(Tok::Ident(s)) if s == "in") {
            self.pos += 1;
            return Ok(Expr::In(Box::new(l), Box::new(self.unary()?)));
        }
        Ok(l)
    }
    fn unary(&mut self) -> Result<Expr, String> {
        if self.eat("!") {
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        self.member()
    }
    fn member(&mut self) -> Result<Expr, String> {
        let mut e = self.primary()?;
        loop {
            if self.eat(".") {
                let name = self.ident()?;
                if self.eat("(") {
                    if name == "all" || name == "exists" {
                        let var = self.ident()?;
                        self.expect(",")?;
                        let pred = self.expr()?;
                        self.expect(")")?;
                        e = Expr::Macro(Box::new(e), name, var, Box::new(pred));
                    } else {
                        let args = self.args()?;
                        e = Expr::Method(Box::new(e), name, args);
                    }
                } else {
                    e = Expr::Field(Box::new(e), name);
                }
            } else if self.eat("[") {
                let i = self.expr()?;
                self.expect("]")?;
                e = Expr::Index(Box::new(e), Box::new(i));
            } else {
                return Ok(e);
            }
        }
    }
    fn args(&mut self) -> Result<Vec<Expr>, String> {
        let mut args = Vec::new();
        if self.eat(")") {
            return Ok(args);
        }
        loop {
            args.push(self.expr()?);
            if self.eat(")") {
                return Ok(args);
            }
            self.expect(",")?;
        }
    }
    fn primary(&mut self) -> Result<Expr, String> {
        let tok = self
            .toks
            .get(self.pos)
            .cloned()
            .ok_or("unexpected end of expression")?;
        self.pos += 1;
        match tok {
            Tok::Str(s) => Ok(Expr::Lit(Value::String(s))),
            Tok::Int(n) => Ok(Expr::Lit(Value::from(n))),
            Tok::Sym("(") => {
                let e = self.expr()?;
                self.expect(")")?;
                Ok(e)
            }
            Tok::Ident(id) => match id.as_str() {
                "true" => Ok(Expr::Lit(Value::Bool(true))),
                "false" => Ok(Expr::Lit(Value::Bool(false))),
                "null" => Ok(Expr::Lit(Value::Null)),
                "has" => {
                    self.expect("(")?;
                    let arg = self.member()?;
                    self.expect(")")?;
                    match arg {
                        Expr::Field(recv, name) => Ok(Expr::Has(recv, name)),
                        other => Err(format!("has() needs a field selection, got {other:?}")),
                    }
                }
                _ => Ok(Expr::Ident(id)),
            },
            other => Err(format!("unexpected {other:?}")),
        }
    }
}

/// A parsed expression.
#[derive(Debug, Clone)]
pub struct Program(Expr);

/// Parses `src`; an error names what is outside the subset.
pub fn parse(src: &str) -> Result<Program, String> {
    let mut p = Parser {
        toks: tokenize(src)?,
        pos: 0,
    };
    let e = p.expr()?;
    if p.pos != p.toks.len() {
        return Err(format!("trailing tokens in {src:?} at {}", p.pos));
    }
    Ok(Program(e))
}

/// The names an expression can see.
pub type Env = BTreeMap<String, Value>;

fn truth(v: &Value) -> Result<bool, String> {
    v.as_bool().ok_or_else(|| format!("{v} is not a bool"))
}

fn eval(e: &Expr, env: &Env) -> Result<Value, String> {
    Ok(match e {
        Expr::Lit(v) => v.clone(),
        Expr::Ident(id) => env
            .get(id)
            .cloned()
            .ok_or_else(|| format!("undeclared reference to {id:?}"))?,
        Expr::Field(recv, name) => {
            let r = eval(recv, env)?;
            r.as_object()
                .ok_or_else(|| format!("no field {name:?} on {r}"))?
                .get(name)
                .cloned()
                .ok_or_else(|| format!("no such key: {name}"))?
        }
        Expr::Index(recv, idx) => {
            let r = eval(recv, env)?;
            let i = eval(idx, env)?;
            match (&r, &i) {
                (Value::Object(m), Value::String(k)) => m
                    .get(k)
                    .cloned()
                    .ok_or_else(|| format!("no such key: {k}"))?,
                (Value::Array(a), Value::Number(n)) => n
                    .as_u64()
                    .and_then(|n| a.get(n as usize))
                    .cloned()
                    .ok_or_else(|| format!("index {n} out of range"))?,
                _ => return Err(format!("cannot index {r} with {i}")),
            }
        }
        Expr::Not(x) => Value::Bool(!truth(&eval(x, env)?)?),
        Expr::Eq(a, b, want) => Value::Bool((eval(a, env)? == eval(b, env)?) == *want),
        Expr::In(a, b) => {
            let x = eval(a, env)?;
            match eval(b, env)? {
                Value::Object(m) => Value::Bool(x.as_str().is_some_and(|k| m.contains_key(k))),
                Value::Array(l) => Value::Bool(l.contains(&x)),
                other => return Err(format!("'in' needs a map or list, got {other}")),
            }
        }
        Expr::And(a, b) => Value::Bool(truth(&eval(a, env)?)? && truth(&eval(b, env)?)?),
        Expr::Or(a, b) => Value::Bool(truth(&eval(a, env)?)? || truth(&eval(b, env)?)?),
        Expr::Cond(c, a, b) => {
            if truth(&eval(c, env)?)? {
                eval(a, env)?
            } else {
                eval(b, env)?
            }
        }
        Expr::Has(recv, name) => {
            let r = eval(recv, env)?;
            Value::Bool(r.as_object().is_some_and(|m| m.contains_key(name)))
        }
        Expr::Method(recv, name, args) => {
            let r = eval(recv, env)?;
            let args: Vec<Value> = args
                .iter()
                .map(|a| eval(a, env))
                .collect::<Result<_, _>>()?;
            match (name.as_str(), &r, args.as_slice()) {
                ("size", Value::Array(a), []) => Value::from(a.len()),
                ("size", Value::Object(m), []) => Value::from(m.len()),
                ("size", Value::String(s), []) => Value::from(s.chars().count()),
                ("startsWith", Value::String(s), [Value::String(p)]) => {
                    Value::Bool(s.starts_with(p.as_str()))
                }
                _ => return Err(format!("unsupported call {name} on {r}")),
            }
        }
        Expr::Macro(recv, name, var, pred) => {
            let r = eval(recv, env)?;
            let items: Vec<Value> = match r {
                Value::Array(a) => a,
                Value::Object(m) => m.keys().map(|k| Value::String(k.clone())).collect(),
                other => return Err(format!("{name}() needs a list or map, got {other}")),
            };
            let mut inner = env.clone();
            let mut results = Vec::with_capacity(items.len());
            for it in items {
                inner.insert(var.clone(), it);
                results.push(truth(&eval(pred, &inner)?)?);
            }
            Value::Bool(if name == "all" {
                results.iter().all(|b| *b)
            } else {
                results.iter().any(|b| *b)
            })
        }
    })
}

impl Program {
    pub fn eval(&self, env: &Env) -> Result<Value, String> {
        eval(&self.0, env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(src: &str, env: &Env) -> Result<Value, String> {
        parse(src)?.eval(env)
    }

    #[test]
    fn the_subset_evaluates_as_cel_does() {
        let mut env = Env::new();
        env.insert(
            "object".into(),
            json!({"metadata": {"name": "n-a", "labels": {"k": "v"}},
                   "spec": {"terms": [{"values": ["n-a"]}, {"values": ["n-a", "n-b"]}]}}),
        );
        let cases = [
            ("object.metadata.name == 'n-a'", json!(true)),
            ("object.metadata.name != \"n-a\"", json!(false)),
            (
                "has(object.metadata.labels) && 'k' in object.metadata.labels",
                json!(true),
            ),
            ("has(object.metadata.annotations)", json!(false)),
            ("object.metadata.labels['k'] == 'v' ? 1 : 2", json!(1)),
            (
                "object.spec.terms.all(t, t.values.all(v, v == 'n-a'))",
                json!(false),
            ),
            (
                "object.spec.terms.exists(t, t.values.size() == 1)",
                json!(true),
            ),
            ("!(object.metadata.name.startsWith('n-'))", json!(false)),
            ("false && object.nope", json!(false)),
            ("true || object.nope", json!(true)),
            ("'n-b' in object.spec.terms[1].values", json!(true)),
        ];
        for (src, want) in cases {
            assert_eq!(run(src, &env), Ok(want), "{src}");
        }
        assert!(
            run("object.metadata.nope == 'x'", &env)
                .unwrap_err()
                .contains("no such key")
        );
        assert!(
            run("object.metadata.name + 'x'", &env).is_err(),
            "no arithmetic"
        );
        assert!(run("nobody.x", &env).is_err());
    }
}
