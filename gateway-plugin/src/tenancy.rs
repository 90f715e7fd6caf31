//! Admin views by namespace: what an admin request may see and touch.
//!
//! The queue-wide admin routes (`/system/async/queue`, `/stats`, `/dead-letters...`, the
//! dashboard) need `admin:<namespace>` for at least one namespace ([`crate::authorize`]); each
//! handler then shows and changes only what lies in the caller's admin namespaces: functions,
//! paused functions, live figures, dead letters. `admin:*` (or `*`, the basic-auth
//! administrator) sees everything, as does everyone when no authenticator is configured.
//!
//! Something of another namespace is treated as if it did not exist: left out of lists, `404`
//! when shown, untouched (and not counted) by a replay or purge that names it. A dead letter
//! whose function could not be decoded belongs to no namespace: only `admin:*` sees it.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use queue_core::backend::{DeadLetterEntry, DeadLetterSelector};

use crate::auth::{Action, Needed, Principal, Scopes};
use crate::error::ApiError;
use crate::state::AppState;

/// What one admin request may see: everything, or the namespaces its scopes grant `admin` in.
#[derive(Debug, Clone)]
pub struct AdminView {
    /// `None`: everything.
    scopes: Option<Scopes>,
    default_namespace: String,
}

impl AdminView {
    /// Everything (no authenticator configured, or `admin:*`).
    pub fn everything(default_namespace: &str) -> Self {
        Self {
            scopes: None,
            default_namespace: default_namespace.to_ascii_lowercase(),
        }
    }

    /// The view of a caller holding `scopes`.
    pub fn of(scopes: &Scopes, default_namespace: &str) -> Self {
        if scopes.grants(&Needed::Everywhere(Action::Admin)) {
            return Self::everything(default_namespace);
        }
        Self {
            scopes: Some(scopes.clone()),
            default_namespace: default_namespace.to_ascii_lowercase(),
        }
    }

    /// Whether the view holds every namespace (queue-wide figures may be shown).
    pub fn is_everything(&self) -> bool {
        self.scopes.is_none()
    }

    /// Whether the view holds `namespace`.
    pub fn sees_namespace(&self, namespace: &str) -> bool {
        match &self.scopes {
            None => true,
            Some(scopes) => {
                scopes.grants(&Needed::In(Action::Admin, namespace.to_ascii_lowercase()))
            }
        }
    }

    /// Whether the view holds `function` (`name` or `name.namespace`). A name that does not
    /// parse is in no namespace.
    pub fn sees_function(&self, function: &str) -> bool {
        if self.is_everything() {
            return true;
        }
        match queue_core::message::canonical_function(function, &self.default_namespace) {
            Ok((_, namespace)) => {
                self.sees_namespace(namespace.as_deref().unwrap_or(&self.default_namespace))
            }
            Err(_) => false,
        }
    }

    /// Whether the view holds a dead letter (one without a decoded function: `admin:*` only).
    pub fn sees_dead_letter(&self, entry: &DeadLetterEntry) -> bool {
        self.is_everything()
            || entry
                .function
                .as_deref()
                .is_some_and(|f| self.sees_function(f))
    }

    /// What a replay or purge of `selectors` (or `all`) of a view short of everything may
    /// touch, given the dead letters now: the sequences of the selected letters the view holds
    /// (those of other namespaces are left out, as unknown ones are; `all` is all of the view).
    pub fn narrow(
        &self,
        letters: &[DeadLetterEntry],
        selectors: &[DeadLetterSelector],
        all: bool,
    ) -> Vec<DeadLetterSelector> {
        letters
            .iter()
            .filter(|e| self.sees_dead_letter(e) && e.selected(selectors, all))
            .map(|e| DeadLetterSelector::Sequence(e.sequence))
            .collect()
    }
}

impl<Q: Send + Sync> FromRequestParts<Arc<AppState<Q>>> for AdminView {
    type Rejection = ApiError;

    /// No authenticator: everything. Otherwise the caller the authorization layer let through;
    /// a request without one (which that layer never lets pass) sees nothing.
    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState<Q>>,
    ) -> Result<Self, ApiError> {
        if state.auth.is_none() {
            return Ok(Self::everything(&state.default_namespace));
        }
        Ok(match parts.extensions.get::<Arc<Principal>>() {
            Some(principal) => Self::of(&principal.scopes, &state.default_namespace),
            None => Self::of(&Scopes::default(), &state.default_namespace),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(sequence: u64, function: Option<&str>) -> DeadLetterEntry {
        DeadLetterEntry {
            sequence,
            call_id: Some(format!("call-{sequence}")),
            function: function.map(str::to_owned),
            reason: "retries_exhausted".into(),
            detail: String::new(),
            last_status: Some(500),
            attempts: 1,
            subject: String::new(),
            dead_lettered_at_unix_nanos: None,
            received_at_unix_nanos: None,
            body_bytes: None,
        }
    }

    #[test]
    fn a_namespace_admin_sees_its_namespaces_only() {
        let scopes = Scopes::parse_strict(["admin:team-a", "read:*", "admin:openfaas-fn"]).unwrap();
        let view = AdminView::of(&scopes, "openfaas-fn");
        assert!(!view.is_everything());
        assert!(view.sees_function("fn.team-a"));
        assert!(view.sees_function("fn.Team-A"));
        assert!(view.sees_function("fn"), "the default namespace");
        assert!(!view.sees_function("fn.team-b"));
        assert!(!view.sees_function("not a name"));
        assert!(!view.sees_dead_letter(&letter(1, None)));

        let only_a = AdminView::of(&Scopes::parse_strict(["admin:team-a"]).unwrap(), "x");
        assert!(!only_a.sees_function("fn"));

        let all = AdminView::of(&Scopes::parse_strict(["admin:*"]).unwrap(), "x");
        assert!(all.is_everything() && all.sees_dead_letter(&letter(1, None)));
        assert!(AdminView::of(&Scopes::everything(), "x").is_everything());
        assert!(!AdminView::of(&Scopes::default(), "x").sees_function("fn.x"));
    }

    #[test]
    fn narrowing_keeps_the_selected_letters_of_the_view() {
        let letters = [
            letter(1, Some("fn.team-a")),
            letter(2, Some("fn.team-b")),
            letter(3, None),
            letter(4, Some("other.team-a")),
        ];
        let view = AdminView::of(&Scopes::parse_strict(["admin:team-a"]).unwrap(), "x");
        let seq =
            |s: &[u64]| -> Vec<_> { s.iter().map(|s| DeadLetterSelector::Sequence(*s)).collect() };
        assert_eq!(view.narrow(&letters, &[], true), seq(&[1, 4]));
        let picked = [
            DeadLetterSelector::Sequence(2),
            DeadLetterSelector::CallId("call-4".into()),
            DeadLetterSelector::Sequence(3),
            DeadLetterSelector::Sequence(99),
        ];
        assert_eq!(view.narrow(&letters, &picked, false), seq(&[4]));
        assert_eq!(view.narrow(&letters, &picked[..1], false), seq(&[]));
    }
}
