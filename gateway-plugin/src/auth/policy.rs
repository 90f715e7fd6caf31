//! The policy file (`--auth-policy-file`, TOML): scopes granted to JWTs by their claims, as
//! OpenFaaS Pro's IAM maps an issuer's groups and roles to permissions.
//!
//! ```toml
//! [[rule]]
//! claim = "groups"                 # a claim of the token; `a.b` reaches into an object
//! contains = "team-a-admins"       # the claim is a list holding it (or a string of words)
//! scopes = ["invoke:team-a", "read:team-a", "cancel:team-a", "admin:team-a"]
//!
//! [[rule]]
//! issuer = "https://login.example.org/realms/research"   # optional: only this issuer's tokens
//! claim = "department"
//! equals = "genomics"              # the claim is this string (or number, or boolean)
//! scopes = ["invoke:genomics", "read:genomics"]
//! ```
//!
//! Every rule whose condition holds adds its scopes to those of the token's `scope`/`scp`
//! claims; no rule takes any away. A mistake (TOML, an unknown key, a scope that is not ours, a
//! rule without a condition or with two) stops the gateway at start, naming the line. The file
//! is a [`crate::reload::Reloadable`]: reread when it changes and on SIGHUP; a new version
//! that does not parse leaves the rules in force, with an error in the log.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use super::AuthError;
use super::scope::Scopes;
use crate::reload::{LoadError, Reloadable};

/// The policy file, reloadable.
pub type PolicyFile = Reloadable<Policy, AuthError>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    rule: Vec<toml::Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    issuer: Option<String>,
    claim: String,
    contains: Option<String>,
    equals: Option<String>,
    scopes: toml::Spanned<Vec<String>>,
}

/// What a rule asks of its claim.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Test {
    /// The claim is this value (a string, or a number or boolean written so).
    Equals(String),
    /// The claim is a list holding this value, or a string of space-separated words one of
    /// which is it.
    Contains(String),
}

/// One rule: an optional issuer, one claim condition, the scopes it grants.
#[derive(Debug, Clone)]
struct Rule {
    line: usize,
    issuer: Option<String>,
    claim: String,
    test: Test,
    scopes: Scopes,
}

/// The rules of a policy file.
#[derive(Debug, Clone)]
pub struct Policy {
    path: PathBuf,
    rules: Vec<Rule>,
}

/// The line (from 1) of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset)
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The claim `name` of `claims`: the top-level claim of that name if there is one (names with
/// dots, as namespaced claims `https://example.org/groups` are, work as they are), else the
/// dotted path into nested objects (`realm_access.roles`).
fn claim<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    if let Some(value) = claims.get(name) {
        return Some(value);
    }
    let mut parts = name.split('.');
    let mut value = claims.get(parts.next()?)?;
    for part in parts {
        value = value.as_object()?.get(part)?;
    }
    Some(value)
}

/// A claim value as the text a rule compares with: strings, numbers and booleans.
fn scalar(value: &Value) -> Option<std::borrow::Cow<'_, str>> {
    match value {
        Value::String(s) => Some(s.as_str().into()),
        Value::Number(n) => Some(n.to_string().into()),
        Value::Bool(b) => Some(if *b { "true" } else { "false" }.into()),
        _ => None,
    }
}

impl Test {
    fn holds(&self, value: &Value) -> bool {
        match self {
            Self::Equals(wanted) => scalar(value).is_some_and(|v| v == wanted.as_str()),
            Self::Contains(wanted) => match value {
                Value::Array(items) => items
                    .iter()
                    .any(|item| scalar(item).is_some_and(|v| v == wanted.as_str())),
                Value::String(words) => words.split_whitespace().any(|w| w == wanted),
                _ => false,
            },
        }
    }
}

impl Policy {
    /// Reads the file (an error names the file and the line); each version read later is
    /// parsed the same way.
    pub fn load(path: &Path, accepted_issuer: &str) -> Result<PolicyFile, AuthError> {
        let owned = path.to_owned();
        let accepted_issuer = accepted_issuer.to_owned();
        Reloadable::load("policy file", path, move |text| {
            Self::parse_checked(&owned, text, &accepted_issuer)
        })
        .map_err(|e| match e {
            LoadError::Io(e) => AuthError::io(path, e),
            LoadError::Invalid(e) => e,
        })
    }

    fn parse_checked(path: &Path, text: &str, accepted_issuer: &str) -> Result<Self, AuthError> {
        let policy = Self::parse(path, text).map_err(|message| AuthError::Policy {
            path: path.to_owned(),
            message,
        })?;
        for rule in &policy.rules {
            if let Some(issuer) = rule.issuer.as_deref().filter(|i| *i != accepted_issuer) {
                tracing::warn!(
                    path = %path.display(),
                    line = rule.line,
                    issuer,
                    "policy rule for another issuer than --jwt-issuer: it never applies"
                );
            }
        }
        Ok(policy)
    }

    /// Parses the file's text; the error names the line.
    pub fn parse(path: &Path, text: &str) -> Result<Self, String> {
        let file: File = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|span| format!("line {}: ", line_of(text, span.start)))
                .unwrap_or_default();
            format!("{at}{}", e.message().trim_end())
        })?;
        let mut rules = Vec::with_capacity(file.rule.len());
        for spanned in file.rule {
            let line = line_of(text, spanned.span().start);
            let raw = spanned.into_inner();
            let bad = |message: String| format!("line {line}: rule: {message}");
            let test = match (raw.equals, raw.contains) {
                (Some(v), None) => Test::Equals(v),
                (None, Some(v)) => Test::Contains(v),
                (None, None) => return Err(bad("needs `equals` or `contains`".into())),
                (Some(_), Some(_)) => {
                    return Err(bad(
                        "give `equals` or `contains`, not both (write two rules)".into(),
                    ));
                }
            };
            if raw.claim.trim().is_empty() {
                return Err(bad("`claim` is empty".into()));
            }
            let scopes_line = line_of(text, raw.scopes.span().start);
            let scopes = raw.scopes.into_inner();
            if scopes.is_empty() {
                return Err(bad("`scopes` is empty".into()));
            }
            let scopes = Scopes::parse_strict(scopes.iter().map(String::as_str))
                .map_err(|e| format!("line {scopes_line}: rule: {e}"))?;
            rules.push(Rule {
                line,
                issuer: raw.issuer,
                claim: raw.claim,
                test,
                scopes,
            });
        }
        Ok(Self {
            path: path.to_owned(),
            rules,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds to `scopes` those of every rule that holds for a token with `claims` from
    /// `issuer`.
    pub fn grant(&self, issuer: Option<&str>, claims: &Map<String, Value>, scopes: &mut Scopes) {
        for rule in &self.rules {
            if rule
                .issuer
                .as_deref()
                .is_some_and(|wanted| Some(wanted) != issuer)
            {
                continue;
            }
            if claim(claims, &rule.claim).is_some_and(|value| rule.test.holds(value)) {
                scopes.extend(&rule.scopes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Action, Needed};

    const ISS: &str = "https://login.example.org/realms/research";

    fn claims(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    fn granted(policy: &Policy, issuer: Option<&str>, value: Value) -> Scopes {
        let mut scopes = Scopes::default();
        policy.grant(issuer, &claims(value), &mut scopes);
        scopes
    }

    #[test]
    fn rules_grant_by_claims() {
        let text = format!(
            r#"
[[rule]]
claim = "groups"
contains = "team-a-admins"
scopes = ["invoke:team-a", "admin:team-a"]

[[rule]]
issuer = "{ISS}"
claim = "realm_access.roles"
contains = "auditor"
scopes = ["read:*"]

[[rule]]
issuer = "https://other.example"
claim = "groups"
contains = "team-a-admins"
scopes = ["*"]

[[rule]]
claim = "department"
equals = "genomics"
scopes = ["invoke:genomics"]

[[rule]]
claim = "https://example.org/claims/level"
equals = "3"
scopes = ["cancel:*"]
"#
        );
        let p = Policy::parse(Path::new("policy.toml"), &text).unwrap();
        let invoke_a = Needed::In(Action::Invoke, "team-a".into());
        let s = granted(
            &p,
            Some(ISS),
            serde_json::json!({"groups": ["staff", "team-a-admins"]}),
        );
        assert!(s.grants(&invoke_a) && s.grants(&Needed::In(Action::Admin, "team-a".into())));
        assert!(
            !s.grants(&Needed::Everywhere(Action::Admin)),
            "the other issuer's rule"
        );
        assert!(!s.grants(&Needed::In(Action::Read, "team-a".into())));
        for other in [
            serde_json::json!({"groups": ["team-b-admins"]}),
            serde_json::json!({"groups": "team-a-admins-x"}),
            serde_json::json!({"groups": {"team-a-admins": true}}),
            serde_json::json!({}),
        ] {
            assert!(
                !granted(&p, Some(ISS), other.clone()).grants(&invoke_a),
                "{other}"
            );
        }
        // A string of words counts as a list.
        assert!(
            granted(
                &p,
                Some(ISS),
                serde_json::json!({"groups": "x team-a-admins"})
            )
            .grants(&invoke_a)
        );
        let s = granted(
            &p,
            Some(ISS),
            serde_json::json!({"realm_access": {"roles": ["auditor"]}}),
        );
        assert!(s.grants(&Needed::Everywhere(Action::Read)));
        assert!(
            !granted(
                &p,
                None,
                serde_json::json!({"realm_access": {"roles": ["auditor"]}})
            )
            .grants(&Needed::Everywhere(Action::Read)),
            "a rule's issuer must be the token's"
        );
        let genomics = Needed::In(Action::Invoke, "genomics".into());
        assert!(
            granted(&p, Some(ISS), serde_json::json!({"department": "genomics"})).grants(&genomics)
        );
        assert!(
            !granted(
                &p,
                Some(ISS),
                serde_json::json!({"department": ["genomics"]})
            )
            .grants(&genomics)
        );
        let s = granted(
            &p,
            Some(ISS),
            serde_json::json!({"https://example.org/claims/level": 3}),
        );
        assert!(s.grants(&Needed::Everywhere(Action::Cancel)));
    }

    #[test]
    fn mistakes_name_the_line() {
        for (text, line, what) in [
            (
                "[[rule]]\nclaim = \"g\"\nscopes = [\"read:a\"]\n",
                "line 1",
                "equals",
            ),
            (
                "\n[[rule]]\nclaim = \"g\"\nequals = \"x\"\ncontains = \"y\"\nscopes = [\"read:a\"]\n",
                "line 2",
                "not both",
            ),
            (
                "[[rule]]\nclaim = \"g\"\nequals = \"x\"\nscopes = [\"read:a\"]\n\n[[rule]]\nclaim = \"g\"\nequals = \"x\"\nscopes = [\"write:a\"]\n",
                "line 9",
                "unknown scope",
            ),
            (
                "[[rule]]\nclaim = \"g\"\nequals = \"x\"\nscopes = []\n",
                "line 1",
                "empty",
            ),
            (
                "[[rule]]\nclaim = \"g\"\nequal = \"x\"\nscopes = [\"read:a\"]\n",
                "line 3",
                "equal",
            ),
            (
                "[[rule]]\nclaim = \"g\"\nequals = \"x\nscopes = [\"read:a\"]\n",
                "line 3",
                "",
            ),
            ("[[rules]]\nclaim = \"g\"\n", "line 1", "rules"),
        ] {
            let e = Policy::parse(Path::new("p"), text).unwrap_err();
            assert!(e.contains(line) && e.contains(what), "{text:?}: {e}");
        }
        assert!(
            Policy::parse(Path::new("p"), "# nothing yet\n")
                .unwrap()
                .rules
                .is_empty()
        );
    }
}
