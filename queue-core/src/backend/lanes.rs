//! Lanes: the calls of one function at one priority, the unit a fair worker pulls by
//! ([`super::CallQueue::pull_lane`]).
//!
//! A call's subject says its lane ([`super::call_subject_with_id`]):
//!
//! | subject | lane |
//! |---|---|
//! | `<prefix>.<ns>.<fn>` (a client's id that cannot be a subject token) | `<ns>.<fn>`, normal |
//! | `<prefix>.<ns>.<fn>.<id>` | `<ns>.<fn>`, normal |
//! | `<prefix>.<ns>.<fn>.<id or _>.high` / `.low` | `<ns>.<fn>`, high / low |
//!
//! `*` matches exactly one token, so the three lanes of a function have filters that never
//! overlap (a work-queue stream allows one consumer per subject). A publisher announces a lane
//! on `<prefix>-lanes.<ns>.<fn>.<priority>` (core NATS, no payload, not stored) after each call
//! it stored there, so that fair workers pull from a lane that was empty at once.

use crate::message::Priority;

/// One function's calls at one priority.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lane {
    /// The namespace token (`_` for calls queued without a namespace).
    pub namespace: String,
    /// The function's name.
    pub function: String,
    /// The priority.
    pub priority: Priority,
}

/// The token of a subject that stands for "no call id here" in a priority lane's subject.
pub const NO_ID_TOKEN: &str = "_";

impl Lane {
    /// The lane of a call subject under `prefix`, if it is one.
    pub fn of_subject(prefix: &str, subject: &str) -> Option<Self> {
        let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
        let mut tokens = rest.split('.');
        let namespace = tokens.next().filter(|t| !t.is_empty())?;
        let function = tokens.next().filter(|t| !t.is_empty())?;
        let priority = match (tokens.next(), tokens.next(), tokens.next()) {
            (None, None, None) | (Some(_), None, None) => Priority::Normal,
            (Some(_), Some(level), None) => match Priority::of_token(level)? {
                Priority::Normal => return None,
                other => other,
            },
            _ => return None,
        };
        Some(Self {
            namespace: namespace.to_owned(),
            function: function.to_owned(),
            priority,
        })
    }

    /// The subject filters of the lane's calls.
    pub fn filters(&self, prefix: &str) -> Vec<String> {
        let base = format!("{prefix}.{}.{}", self.namespace, self.function);
        match self.priority {
            Priority::Normal => vec![base.clone(), format!("{base}.*")],
            other => vec![format!("{base}.*.{}", other.as_str())],
        }
    }

    /// Where a publisher announces the lane: `<prefix>-lanes.<ns>.<fn>.<priority>`.
    pub fn announce_subject(&self, prefix: &str) -> String {
        format!(
            "{}.{}.{}.{}",
            announce_prefix(prefix),
            self.namespace,
            self.function,
            self.priority.as_str()
        )
    }

    /// The lane an announcement (a subject of [`Lane::announce_subject`]) names.
    pub fn of_announcement(prefix: &str, subject: &str) -> Option<Self> {
        let rest = subject
            .strip_prefix(announce_prefix(prefix).as_str())?
            .strip_prefix('.')?;
        let mut tokens = rest.split('.');
        let (Some(namespace), Some(function), Some(level), None) =
            (tokens.next(), tokens.next(), tokens.next(), tokens.next())
        else {
            return None;
        };
        if namespace.is_empty() || function.is_empty() {
            return None;
        }
        Some(Self {
            namespace: namespace.to_owned(),
            function: function.to_owned(),
            priority: Priority::of_token(level)?,
        })
    }

    /// The durable name of the lane's consumer in the worker group `group`: the group's name,
    /// namespace, function and priority joined by `_` (consumer names may hold no `.`).
    pub fn consumer_name(&self, group: &str) -> String {
        format!(
            "{group}_{}_{}_{}",
            self.namespace,
            self.function,
            self.priority.as_str()
        )
    }

    /// The namespace, `None` for the default one (`_`).
    pub fn namespace(&self) -> Option<&str> {
        (self.namespace != "_").then_some(self.namespace.as_str())
    }

    /// `name` or `name.namespace`, as the status API and metrics name the function.
    pub fn qualified_function(&self) -> String {
        match self.namespace() {
            None => self.function.clone(),
            Some(ns) => format!("{}.{ns}", self.function),
        }
    }
}

/// The subject prefix of lane announcements: `<prefix>-lanes` (outside the calls stream).
pub fn announce_prefix(prefix: &str) -> String {
    format!("{prefix}-lanes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_map_to_lanes_whose_filters_do_not_overlap() {
        let normal = Lane::of_subject("faas.a", "faas.a.team.stats.0b5c").expect("normal");
        assert_eq!(
            (normal.namespace.as_str(), normal.function.as_str()),
            ("team", "stats")
        );
        assert_eq!(normal.priority, Priority::Normal);
        assert_eq!(
            Lane::of_subject("faas.a", "faas.a.team.stats"),
            Some(normal.clone())
        );
        let high = Lane::of_subject("faas.a", "faas.a.team.stats.0b5c.high").expect("high");
        assert_eq!(high.priority, Priority::High);
        let low = Lane::of_subject("faas.a", "faas.a.team.stats._.low").expect("low");
        assert_eq!(low.priority, Priority::Low);
        assert_eq!(
            normal.filters("faas.a"),
            ["faas.a.team.stats", "faas.a.team.stats.*"]
        );
        assert_eq!(high.filters("faas.a"), ["faas.a.team.stats.*.high"]);
        assert_eq!(normal.qualified_function(), "stats.team");
        assert_eq!(normal.consumer_name("w"), "w_team_stats_normal");
        for bad in [
            "faas.a",
            "faas.a.team",
            "faas.a.team.stats.id.normal",
            "faas.a.team.stats.id.urgent",
            "faas.a.team.stats.id.high.x",
            "other.team.stats",
            "faas.a..stats",
        ] {
            assert_eq!(Lane::of_subject("faas.a", bad), None, "{bad}");
        }
    }

    #[test]
    fn announcements_round_trip_and_reject_strangers() {
        let lane = Lane::of_subject("faas", "faas._.stats.x.high").expect("a lane");
        let subject = lane.announce_subject("faas");
        assert_eq!(subject, "faas-lanes._.stats.high");
        assert_eq!(Lane::of_announcement("faas", &subject), Some(lane.clone()));
        assert_eq!(lane.namespace(), None);
        assert_eq!(lane.qualified_function(), "stats");
        for bad in [
            "faas-lanes._.stats",
            "faas-lanes._.stats.urgent",
            "faas-lanes._.stats.high.x",
            "faas._.stats.high",
        ] {
            assert_eq!(Lane::of_announcement("faas", bad), None, "{bad}");
        }
    }
}
