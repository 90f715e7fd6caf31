//! Scopes: `invoke:<namespace>`, `read:<namespace>`, `cancel:<namespace>`,
//! `admin:<namespace>`, `<action>:*` for every namespace, and `*` for everything.

use std::fmt;

/// What a caller does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Submit calls (`/async-function/...`).
    Invoke,
    /// Read a call's record and result.
    Read,
    /// Cancel a call.
    Cancel,
    /// The admin API, the dashboard, `/metrics`.
    Admin,
}

impl Action {
    /// The word of the scope (`invoke`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invoke => "invoke",
            Self::Read => "read",
            Self::Cancel => "cancel",
            Self::Admin => "admin",
        }
    }

    fn parse(word: &str) -> Option<Self> {
        match word {
            "invoke" => Some(Self::Invoke),
            "read" => Some(Self::Read),
            "cancel" => Some(Self::Cancel),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// One scope a caller holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// `*`: every action in every namespace.
    Everything,
    /// `<action>:*`.
    EveryNamespace(Action),
    /// `<action>:<namespace>`.
    Namespace(Action, String),
}

/// A scope string that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope {0:?}: expected invoke|read|cancel|admin:<namespace>, <action>:* or *")]
pub struct UnknownScope(pub String);

impl Grant {
    /// Parses one scope word.
    pub fn parse(word: &str) -> Result<Self, UnknownScope> {
        if word == "*" {
            return Ok(Self::Everything);
        }
        let unknown = || UnknownScope(word.to_owned());
        let (action, namespace) = word.split_once(':').ok_or_else(unknown)?;
        let action = Action::parse(action).ok_or_else(unknown)?;
        match namespace {
            "*" => Ok(Self::EveryNamespace(action)),
            ns if queue_core::message::valid_namespace(ns) => {
                Ok(Self::Namespace(action, ns.to_ascii_lowercase()))
            }
            _ => Err(unknown()),
        }
    }
}

/// What is needed: an action in a namespace, or in every namespace (queue-wide views).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Needed {
    /// `<action>:<namespace>` (or a grant covering it).
    In(Action, String),
    /// `<action>:*` (or `*`).
    Everywhere(Action),
}

impl fmt::Display for Needed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::In(action, ns) => write!(f, "{}:{ns}", action.as_str()),
            Self::Everywhere(action) => write!(f, "{}:*", action.as_str()),
        }
    }
}

/// The scopes a caller holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes(Vec<Grant>);

impl Scopes {
    /// Everything (`*`): the OpenFaaS basic-auth administrator.
    pub fn everything() -> Self {
        Self(vec![Grant::Everything])
    }

    /// From configured scope words: an unknown word is an error (a typo in a tokens file must
    /// not silently grant less or more than meant).
    pub fn parse_strict<'a>(
        words: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, UnknownScope> {
        words
            .into_iter()
            .map(Grant::parse)
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// From a token's claims: words that are not ours (`openid`, `profile`, ...) are ignored.
    pub fn parse_lenient<'a>(words: impl IntoIterator<Item = &'a str>) -> Self {
        Self(
            words
                .into_iter()
                .filter_map(|w| Grant::parse(w).ok())
                .collect(),
        )
    }

    /// Adds `more` to these.
    pub fn extend(&mut self, more: &Scopes) {
        for grant in &more.0 {
            if !self.0.contains(grant) {
                self.0.push(grant.clone());
            }
        }
    }

    /// Whether these scopes grant `needed`.
    pub fn grants(&self, needed: &Needed) -> bool {
        self.0.iter().any(|grant| match (grant, needed) {
            (Grant::Everything, _) => true,
            (Grant::EveryNamespace(a), Needed::In(b, _) | Needed::Everywhere(b)) => a == b,
            (Grant::Namespace(a, ns), Needed::In(b, wanted)) => a == b && ns == wanted,
            (Grant::Namespace(..), Needed::Everywhere(_)) => false,
        })
    }

    /// Whether these scopes grant `action` in at least one namespace.
    pub fn any(&self, action: Action) -> bool {
        self.0.iter().any(|grant| match grant {
            Grant::Everything => true,
            Grant::EveryNamespace(a) | Grant::Namespace(a, _) => *a == action,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_grants() {
        let s = Scopes::parse_strict(["invoke:team-a", "read:*", "admin:Team-B"]).unwrap();
        assert!(s.grants(&Needed::In(Action::Invoke, "team-a".into())));
        assert!(!s.grants(&Needed::In(Action::Invoke, "team-b".into())));
        assert!(s.grants(&Needed::In(Action::Read, "anything".into())));
        assert!(s.grants(&Needed::Everywhere(Action::Read)));
        assert!(s.grants(&Needed::In(Action::Admin, "team-b".into())));
        assert!(!s.grants(&Needed::Everywhere(Action::Admin)));
        assert!(!s.grants(&Needed::In(Action::Cancel, "team-a".into())));
        assert!(s.any(Action::Admin) && !s.any(Action::Cancel));
        assert!(Scopes::everything().grants(&Needed::Everywhere(Action::Admin)));
    }

    #[test]
    fn strict_refuses_what_lenient_ignores() {
        for bad in [
            "invoke",
            "write:a",
            "invoke:",
            "invoke:a b",
            "admin:a.b",
            "**",
        ] {
            assert!(Scopes::parse_strict([bad]).is_err(), "{bad}");
        }
        let s = Scopes::parse_lenient(["openid", "profile", "cancel:x"]);
        assert_eq!(
            s,
            Scopes(vec![Grant::Namespace(Action::Cancel, "x".into())])
        );
    }
}
