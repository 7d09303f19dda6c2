//! Kubernetes label selectors in their string form (`app=web,tier in (a,b),!canary`), as
//! `kubectl get -l` and the API server's `labelSelector` parameter take them.
//!
//! Owns parsing and matching only. Semantics follow the API server: terms are ANDed, `!=` and
//! `notin` also match objects without the key, `key` requires it and `!key` forbids it. Never
//! treats an empty selector as "everything": the caller decides whether that is allowed.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Requirement {
    /// `key=value` or `key==value`.
    Equals(String, String),
    /// `key!=value` (also true without the key).
    NotEquals(String, String),
    /// `key in (a,b)`.
    In(String, BTreeSet<String>),
    /// `key notin (a,b)` (also true without the key).
    NotIn(String, BTreeSet<String>),
    /// `key`.
    Exists(String),
    /// `!key`.
    DoesNotExist(String),
}

/// A parsed selector: every requirement must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

/// Longest label value (and name part of a key) Kubernetes allows.
const MAX_NAME: usize = 63;
/// Longest key prefix (a DNS subdomain).
const MAX_PREFIX: usize = 253;

impl Selector {
    /// Parses the string form. An empty string is an error: selecting every pod by accident is
    /// never what a scaler means.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for term in split_terms(s)? {
            requirements.push(parse_term(&term)?);
        }
        if requirements.is_empty() {
            return Err("must not be empty (it would select every pod)".into());
        }
        requirements.sort();
        requirements.dedup();
        Ok(Self { requirements })
    }

    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// True when every requirement holds for `labels`.
    pub fn matches(&self, labels: &HashMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

/// The canonical string form: requirements sorted, one spelling per operator. Two selectors
/// that select the same way by construction (same terms in another order) print the same.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |vs: &BTreeSet<String>| vs.iter().cloned().collect::<Vec<_>>().join(",");
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match r {
                Requirement::Equals(k, v) => write!(f, "{k}={v}")?,
                Requirement::NotEquals(k, v) => write!(f, "{k}!={v}")?,
                Requirement::In(k, vs) => write!(f, "{k} in ({})", set(vs))?,
                Requirement::NotIn(k, vs) => write!(f, "{k} notin ({})", set(vs))?,
                Requirement::Exists(k) => write!(f, "{k}")?,
                Requirement::DoesNotExist(k) => write!(f, "!{k}")?,
            }
        }
        Ok(())
    }
}

/// Splits on the commas that separate terms (not those inside a set's parentheses).
fn split_terms(s: &str) -> Result<Vec<String>, String> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => {
                depth += 1;
                if depth > 1 {
                    return Err(format!("{s:?}: nested parentheses"));
                }
                cur.push(c);
            }
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("{s:?}: unbalanced ')'"))?;
                cur.push(c);
            }
            ',' if depth == 0 => terms.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    if depth != 0 {
        return Err(format!("{s:?}: unclosed '('"));
    }
    terms.push(cur);
    let terms: Vec<String> = terms.into_iter().map(|t| t.trim().to_string()).collect();
    if terms.len() > 1 && terms.iter().any(String::is_empty) {
        return Err(format!("{s:?}: empty term between commas"));
    }
    Ok(terms.into_iter().filter(|t| !t.is_empty()).collect())
}

fn parse_term(term: &str) -> Result<Requirement, String> {
    if let Some(key) = term.strip_prefix('!') {
        let key = key.trim();
        check_key(key, term)?;
        return Ok(Requirement::DoesNotExist(key.to_string()));
    }
    if let Some((k, v)) = term.split_once("!=") {
        return equality(k, v, term, false);
    }
    if let Some((k, v)) = term.split_once("==") {
        return equality(k, v, term, true);
    }
    if let Some((k, v)) = term.split_once('=') {
        return equality(k, v, term, true);
    }
    if let Some(open) = term.find('(') {
        let head = term[..open].trim();
        let body = term[open + 1..]
            .strip_suffix(')')
            .ok_or_else(|| format!("{term:?}: text after ')'"))?;
        let (key, op) = head
            .rsplit_once(char::is_whitespace)
            .map(|(k, op)| (k.trim(), op))
            .ok_or_else(|| format!("{term:?}: want `key in (a,b)` or `key notin (a,b)`"))?;
        check_key(key, term)?;
        let mut values = BTreeSet::new();
        for v in body.split(',').map(str::trim) {
            check_value(v, term)?;
            if v.is_empty() {
                return Err(format!("{term:?}: empty value in the set"));
            }
            values.insert(v.to_string());
        }
        return match op {
            "in" => Ok(Requirement::In(key.to_string(), values)),
            "notin" => Ok(Requirement::NotIn(key.to_string(), values)),
            other => Err(format!(
                "{term:?}: unknown operator {other:?} (want in or notin)"
            )),
        };
    }
    check_key(term, term)?;
    Ok(Requirement::Exists(term.to_string()))
}

fn equality(k: &str, v: &str, term: &str, equal: bool) -> Result<Requirement, String> {
    let (k, v) = (k.trim(), v.trim());
    check_key(k, term)?;
    check_value(v, term)?;
    Ok(if equal {
        Requirement::Equals(k.into(), v.into())
    } else {
        Requirement::NotEquals(k.into(), v.into())
    })
}

/// A label key: `[prefix/]name`, name 1..=63 of `[A-Za-z0-9._-]` starting and ending
/// alphanumeric, prefix a DNS subdomain.
fn check_key(key: &str, term: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= MAX_PREFIX
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !ok {
            return Err(format!("{term:?}: key prefix {p:?} is not a DNS subdomain"));
        }
    }
    if name.is_empty() || !is_name(name) {
        return Err(format!("{term:?}: {key:?} is not a valid label key"));
    }
    Ok(())
}

/// A label value: empty, or a name as in `check_key`.
fn check_value(v: &str, term: &str) -> Result<(), String> {
    if v.is_empty() || is_name(v) {
        Ok(())
    } else {
        Err(format!("{term:?}: {v:?} is not a valid label value"))
    }
}

fn is_name(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    s.len() <= MAX_NAME
        && s.chars().all(|c| alnum(c) || matches!(c, '-' | '_' | '.'))
        && s.chars().next().is_some_and(alnum)
        && s.chars().last().is_some_and(alnum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn equality_terms_are_anded() {
        let s = Selector::parse("app=web, tier==front").unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "front"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "api"), ("tier", "front")])));
    }

    #[test]
    fn not_equals_and_notin_match_objects_without_the_key() {
        let ne = Selector::parse("track!=canary").unwrap();
        assert!(ne.matches(&labels(&[])));
        assert!(ne.matches(&labels(&[("track", "stable")])));
        assert!(!ne.matches(&labels(&[("track", "canary")])));
        let notin = Selector::parse("env notin (dev, qa)").unwrap();
        assert!(notin.matches(&labels(&[])));
        assert!(notin.matches(&labels(&[("env", "prod")])));
        assert!(!notin.matches(&labels(&[("env", "qa")])));
    }

    #[test]
    fn set_and_existence_terms() {
        let s = Selector::parse("app in (web,api),app.kubernetes.io/part-of,!canary").unwrap();
        assert!(s.matches(&labels(&[
            ("app", "api"),
            ("app.kubernetes.io/part-of", "shop")
        ])));
        assert!(!s.matches(&labels(&[
            ("app", "db"),
            ("app.kubernetes.io/part-of", "shop")
        ])));
        assert!(!s.matches(&labels(&[("app", "web")])), "part-of missing");
        assert!(!s.matches(&labels(&[
            ("app", "web"),
            ("app.kubernetes.io/part-of", "shop"),
            ("canary", "")
        ])));
    }

    #[test]
    fn canonical_form_ignores_term_order_and_spelling() {
        let a = Selector::parse("b==2,a=1, c in (y,x)").unwrap();
        let b = Selector::parse("c in (x, y),a=1,b=2").unwrap();
        assert_eq!(a.to_string(), b.to_string());
        assert_eq!(a.to_string(), "a=1,b=2,c in (x,y)");
    }

    #[test]
    fn bad_selectors_are_refused_with_the_reason() {
        for (s, want) in [
            ("", "must not be empty"),
            ("  ", "must not be empty"),
            ("app=web,,tier=x", "empty term"),
            ("app in (a,b", "unclosed"),
            ("app in a,b)", "unbalanced"),
            ("app within (a)", "unknown operator"),
            ("app=we b", "not a valid label value"),
            ("-app=web", "not a valid label key"),
            ("Bad_Prefix/app=web", "not a DNS subdomain"),
            ("app in ()", "empty value"),
        ] {
            let e = Selector::parse(s).expect_err(s);
            assert!(e.contains(want), "{s:?}: {e}");
        }
    }
}
