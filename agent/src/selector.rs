//! Kubernetes label selectors, the one implementation every capability uses: the string form
//! (`app=web,tier in (a,b),!canary`, as `kubectl get -l` takes it: KEDA's `podSelector`, drain's
//! `leader_selector`) and the object form (`matchLabels` + `matchExpressions`, as in a
//! `metav1.LabelSelector`: sysctl's `nodeSelector` / `podSelector`). Both become the same
//! [`Requirement`]s and are matched by one function.
//!
//! Owns parsing, validation and matching only. Semantics follow the API server: terms are ANDed,
//! `!=` and `notin` also match objects without the key, `key` requires it and `!key` forbids it.
//! The string form never treats an empty selector as "everything" (the caller decides whether
//! that is allowed); an empty object form selects everything, as in Kubernetes.
//!
//! Why not `kube::core::Selector`: it matches and prints but does not parse the string form.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

/// A set of labels a selector can be matched against (pods and nodes carry a `BTreeMap`, the
/// KEDA census a `HashMap`).
pub trait Labels {
    fn label(&self, key: &str) -> Option<&str>;
}

impl Labels for HashMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

impl Labels for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

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
    pub fn matches(&self, labels: &impl Labels) -> bool {
        self.requirements.iter().all(|r| r.holds(labels))
    }
}

impl Requirement {
    /// The one matching rule, for both forms.
    pub fn holds(&self, labels: &impl Labels) -> bool {
        match self {
            Requirement::Equals(k, v) => labels.label(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => labels.label(k) != Some(v.as_str()),
            Requirement::In(k, vs) => labels.label(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.label(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.label(k).is_some(),
            Requirement::DoesNotExist(k) => labels.label(k).is_none(),
        }
    }
}

// === the object form ===

/// A `metav1.LabelSelector`: all `matchLabels` and all `matchExpressions` must hold; an empty one
/// selects everything.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelExpression>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelExpression {
    pub key: String,
    pub operator: LabelOperator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum LabelOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    /// The requirements this object stands for, in the string form's terms.
    pub fn requirements(&self) -> impl Iterator<Item = Requirement> + '_ {
        let labels = self
            .match_labels
            .iter()
            .map(|(k, v)| Requirement::Equals(k.clone(), v.clone()));
        let expressions = self.match_expressions.iter().map(|e| {
            let key = e.key.clone();
            let values = || e.values.iter().cloned().collect();
            match e.operator {
                LabelOperator::In => Requirement::In(key, values()),
                LabelOperator::NotIn => Requirement::NotIn(key, values()),
                LabelOperator::Exists => Requirement::Exists(key),
                LabelOperator::DoesNotExist => Requirement::DoesNotExist(key),
            }
        });
        labels.chain(expressions)
    }

    pub fn matches(&self, labels: &impl Labels) -> bool {
        self.requirements().all(|r| r.holds(labels))
    }

    /// Problems with the selector itself (In/NotIn need values, Exists must have none); the
    /// caller prefixes the config field.
    pub fn problems(&self) -> Vec<String> {
        self.match_expressions
            .iter()
            .filter_map(|e| match (e.operator, e.values.is_empty()) {
                (LabelOperator::In | LabelOperator::NotIn, true) => Some(format!(
                    "matchExpressions key {:?}: operator {:?} needs values",
                    e.key, e.operator
                )),
                (LabelOperator::Exists | LabelOperator::DoesNotExist, false) => Some(format!(
                    "matchExpressions key {:?}: operator {:?} takes no values",
                    e.key, e.operator
                )),
                _ => None,
            })
            .collect()
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

    fn btree(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn object(op: LabelOperator, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![LabelExpression {
                key: "pool".into(),
                operator: op,
                values: values.iter().map(|s| s.to_string()).collect(),
            }],
        }
    }

    #[test]
    fn object_form_operators() {
        let l = btree(&[("pool", "trino"), ("zone", "a")]);
        assert!(object(LabelOperator::In, &["trino", "hbase"]).matches(&l));
        assert!(!object(LabelOperator::In, &["hbase"]).matches(&l));
        assert!(!object(LabelOperator::NotIn, &["trino"]).matches(&l));
        assert!(object(LabelOperator::Exists, &[]).matches(&l));
        assert!(!object(LabelOperator::DoesNotExist, &[]).matches(&l));
        assert!(object(LabelOperator::NotIn, &["x"]).matches(&btree(&[])));
        assert!(!object(LabelOperator::In, &["trino"]).matches(&btree(&[])));
        let ml = LabelSelector {
            match_labels: btree(&[("zone", "b")]),
            match_expressions: vec![],
        };
        assert!(!ml.matches(&l));
        assert!(ml.matches(&btree(&[("zone", "b")])));
        assert!(
            LabelSelector::default().matches(&btree(&[])),
            "{{}} selects all"
        );
        assert_eq!(object(LabelOperator::In, &[]).problems().len(), 1);
        assert_eq!(object(LabelOperator::Exists, &["x"]).problems().len(), 1);
        assert!(object(LabelOperator::In, &["x"]).problems().is_empty());
    }

    #[test]
    fn both_forms_select_alike() {
        let yaml = "matchLabels: {zone: a}\nmatchExpressions:\n- {key: pool, operator: NotIn, values: [x, y]}\n- {key: canary, operator: DoesNotExist}\n";
        let object: LabelSelector = serde_saphyr::from_str(yaml).unwrap();
        let string = Selector::parse("zone=a,pool notin (x,y),!canary").unwrap();
        for l in [
            btree(&[("zone", "a")]),
            btree(&[("zone", "a"), ("pool", "x")]),
            btree(&[("zone", "a"), ("pool", "z")]),
            btree(&[("zone", "a"), ("canary", "")]),
            btree(&[("zone", "b")]),
        ] {
            let hashed: HashMap<_, _> = l.clone().into_iter().collect();
            assert_eq!(object.matches(&l), string.matches(&l), "{l:?}");
            assert_eq!(string.matches(&hashed), string.matches(&l), "{l:?}");
        }
    }

    #[test]
    fn object_form_refuses_unknown_fields_and_operators() {
        assert!(serde_saphyr::from_str::<LabelSelector>("matchLabel: {a: b}").is_err());
        assert!(
            serde_saphyr::from_str::<LabelSelector>(
                "matchExpressions: [{key: a, operator: Equals, values: [b]}]"
            )
            .is_err()
        );
    }
}
