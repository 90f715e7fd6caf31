//! Per-function settings: a TOML file (`--functions-config`) overriding the worker's defaults for
//! retries, timeout and maximum age, keyed by `name` or `name.namespace`:
//!
//! ```toml
//! [functions."train-model"]      # any namespace
//! max_attempts = 2
//! timeout = "2h"
//!
//! [functions."figlet.team-a"]    # this namespace only; wins over "figlet"
//! retry_codes = [429, 503]
//! initial_wait = "5s"
//! max_wait = "10m"
//! max_age = "48h"
//! max_concurrency = 4            # calls at once per worker, at most
//! queue = "batch"                # served by the workers of `--queues batch` (fair scheduling)
//! ```
//!
//! Unknown keys are errors, so a typo is caught at start rather than silently ignored.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::config::WorkerConfig;
use crate::retry::RetryPolicy;
use queue_core::message::CallMeta;

/// Settings from the gateway's function annotations ([`crate::annotations`]), keyed by
/// lower-case `name.namespace`, shared with the function settings that read them per call.
pub type Annotated = Arc<std::sync::RwLock<Arc<HashMap<String, FunctionOverride>>>>;

/// Why the file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FunctionsConfigError {
    /// Could not read it.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML of the expected shape.
    #[error("invalid {path}: {message}")]
    Parse {
        /// File.
        path: String,
        /// What is wrong, with the line.
        message: String,
    },
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let raw: Option<String> = Option::deserialize(d)?;
    raw.map(|s| crate::config::parse_duration(&s).map_err(serde::de::Error::custom))
        .transpose()
}

/// Overrides for one function; unset fields keep the worker's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionOverride {
    /// Invocations at most.
    pub max_attempts: Option<u32>,
    /// Statuses retried.
    pub retry_codes: Option<Vec<u16>>,
    /// Base wait before the first retry.
    #[serde(default, deserialize_with = "duration")]
    pub initial_wait: Option<Duration>,
    /// Longest wait between attempts.
    #[serde(default, deserialize_with = "duration")]
    pub max_wait: Option<Duration>,
    /// Longest single call.
    #[serde(default, deserialize_with = "duration")]
    pub timeout: Option<Duration>,
    /// Oldest a call may be when it starts.
    #[serde(default, deserialize_with = "duration")]
    pub max_age: Option<Duration>,
    /// Calls of the function one worker runs at once, at most ([`crate::concurrency`]).
    pub max_concurrency: Option<u32>,
    /// The named queue whose workers (`--queues`) serve the function; none: the default one.
    pub queue: Option<String>,
}

impl FunctionOverride {
    /// These overrides, with `under`'s where these leave a field unset.
    pub fn over(&self, under: &Self) -> Self {
        Self {
            max_attempts: self.max_attempts.or(under.max_attempts),
            retry_codes: self
                .retry_codes
                .clone()
                .or_else(|| under.retry_codes.clone()),
            initial_wait: self.initial_wait.or(under.initial_wait),
            max_wait: self.max_wait.or(under.max_wait),
            timeout: self.timeout.or(under.timeout),
            max_age: self.max_age.or(under.max_age),
            max_concurrency: self.max_concurrency.or(under.max_concurrency),
            queue: self.queue.clone().or_else(|| under.queue.clone()),
        }
    }
}

pub use crate::config::{DEFAULT_QUEUE, is_queue_name};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    functions: HashMap<String, FunctionOverride>,
}

/// What applies to one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallSettings {
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Longest single invocation.
    pub timeout: Duration,
    /// Oldest the call may be when it starts.
    pub max_age: Duration,
    /// The function's concurrency cap per worker, if it has one (else `--max-inflight`).
    pub max_concurrency: Option<u32>,
}

/// Defaults from the command line plus per-function overrides.
#[derive(Debug, Clone)]
pub struct FunctionSettings {
    defaults: CallSettings,
    /// Keyed by the lower-cased `name` (any namespace) or `name.namespace` (the default
    /// namespace written out).
    overrides: HashMap<String, FunctionOverride>,
    /// From the OpenFaaS gateway's function list ([`crate::annotations`]), keyed by lower-case
    /// `name.namespace`; under the file's entries, over the defaults.
    annotated: Annotated,
    default_namespace: String,
}

impl FunctionSettings {
    /// Reads `--functions-config` if given.
    pub fn load(config: &WorkerConfig) -> Result<Self, FunctionsConfigError> {
        let defaults = CallSettings {
            retry: config.retry_policy(),
            timeout: config.upstream_timeout,
            max_age: config.call_max_age,
            max_concurrency: None,
        };
        let overrides = match &config.functions_config {
            None => HashMap::new(),
            Some(path) => Self::parse_file(path)?,
        };
        Ok(Self {
            defaults,
            overrides,
            annotated: Annotated::default(),
            default_namespace: config.default_namespace.to_ascii_lowercase(),
        })
    }

    /// Where the function list's annotations go ([`crate::annotations::follow`] fills it).
    pub fn annotated(&self) -> Annotated {
        Arc::clone(&self.annotated)
    }

    fn parse_file(path: &Path) -> Result<HashMap<String, FunctionOverride>, FunctionsConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| FunctionsConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let file: File = toml::from_str(&text).map_err(|e| FunctionsConfigError::Parse {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        let mut canonical = HashMap::with_capacity(file.functions.len());
        for (name, o) in &file.functions {
            let parsed = queue_core::message::parse_function(name);
            let problem = if parsed.is_err() {
                Some("is not a function name (name or name.namespace)".to_owned())
            } else if o.max_attempts == Some(0) {
                Some("max_attempts must be at least 1".to_owned())
            } else if o.max_concurrency == Some(0) {
                Some("max_concurrency must be at least 1".to_owned())
            } else if let Some(queue) = o.queue.as_deref().filter(|q| !is_queue_name(q)) {
                Some(format!(
                    "queue {queue:?} is not a queue name (1 to 64 lower-case letters, digits and -)"
                ))
            } else {
                o.retry_codes
                    .iter()
                    .flatten()
                    .find(|c| !(100..=599).contains(*c))
                    .map(|bad| format!("retry code {bad} is not an HTTP status"))
            };
            let key = match parsed {
                Ok((function, Some(ns))) => format!("{function}.{ns}"),
                Ok((function, None)) => function,
                Err(_) => String::new(),
            };
            let problem = problem.or_else(|| {
                canonical.insert(key, o.clone()).map(|_| {
                    "names a function another entry names too (names are not case-sensitive)"
                        .to_owned()
                })
            });
            if let Some(problem) = problem {
                return Err(FunctionsConfigError::Parse {
                    path: shown,
                    message: format!("[functions.\"{name}\"]: {problem}"),
                });
            }
        }
        Ok(canonical)
    }

    /// The settings for a call: those of its function ([`FunctionSettings::for_function`]),
    /// with the limits the call set for itself (`X-Max-Retries`, `X-Timeout`, `X-Max-Age`,
    /// capped by the gateway) in their place.
    pub fn for_call(&self, meta: &CallMeta) -> CallSettings {
        let mut settings = self.for_function(meta);
        let own = &meta.overrides;
        if let Some(retries) = own.max_retries {
            settings.retry.max_attempts = retries.saturating_add(1);
        }
        if let Some(ms) = own.timeout_ms {
            settings.timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = own.max_age_ms {
            settings.max_age = Duration::from_millis(ms);
        }
        settings
    }

    /// The named queue of a function (`name`, in `namespace` or the default one): the file's
    /// `queue`, else the function's `com.openfaas.queue` annotation, else [`DEFAULT_QUEUE`].
    pub fn queue_of(&self, function: &str, namespace: Option<&str>) -> String {
        let function = function.to_ascii_lowercase();
        let namespace =
            namespace.map_or_else(|| self.default_namespace.clone(), str::to_ascii_lowercase);
        let qualified = format!("{function}.{namespace}");
        let file = self
            .overrides
            .get(&qualified)
            .or_else(|| self.overrides.get(&function))
            .and_then(|o| o.queue.clone());
        file.or_else(|| {
            self.annotated
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&qualified)
                .and_then(|o| o.queue.clone())
        })
        .unwrap_or_else(|| DEFAULT_QUEUE.to_owned())
    }

    /// The settings for a call's function: `name.namespace` entry of the file (the default
    /// namespace when the call names none), else its `name` entry, field by field over the
    /// function's annotations, over the defaults. Names are compared in lower case.
    pub fn for_function(&self, meta: &CallMeta) -> CallSettings {
        let function = meta.function.to_ascii_lowercase();
        let namespace = meta
            .namespace
            .as_deref()
            .map_or_else(|| self.default_namespace.clone(), str::to_ascii_lowercase);
        let qualified = format!("{function}.{namespace}");
        let found = self
            .overrides
            .get(&qualified)
            .or_else(|| self.overrides.get(&function));
        let all = self
            .annotated
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let o = match (found, all.get(&qualified)) {
            (None, None) => return self.defaults.clone(),
            (Some(o), None) | (None, Some(o)) => o.clone(),
            (Some(o), Some(a)) => o.over(a),
        };
        drop(all);
        let d = &self.defaults;
        CallSettings {
            retry: RetryPolicy {
                max_attempts: o.max_attempts.unwrap_or(d.retry.max_attempts),
                initial_wait: o.initial_wait.unwrap_or(d.retry.initial_wait),
                max_wait: o.max_wait.unwrap_or(d.retry.max_wait),
                codes: o
                    .retry_codes
                    .clone()
                    .unwrap_or_else(|| d.retry.codes.clone()),
                backoff: d.retry.backoff,
            },
            timeout: o.timeout.unwrap_or(d.timeout),
            max_age: o.max_age.unwrap_or(d.max_age),
            max_concurrency: o.max_concurrency,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use queue_core::message::BodyLocation;

    fn meta(function: &str, namespace: Option<&str>) -> CallMeta {
        CallMeta {
            call_id: "c".into(),
            function: function.into(),
            namespace: namespace.map(Into::into),
            method: "POST".into(),
            path: String::new(),
            query: None,
            headers: vec![],
            callback_url: None,
            received_at_unix_nanos: 0,
            body: BodyLocation::Inline { len: 0 },
            record_revision: None,
            overrides: Default::default(),
            not_before_unix_nanos: None,
        }
    }

    fn load(toml_text: &str) -> Result<FunctionSettings, FunctionsConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("functions.toml");
        std::fs::write(&path, toml_text).unwrap();
        let config = WorkerConfig::try_parse_from([
            "queue-worker",
            "--functions-config",
            path.to_str().unwrap(),
        ])
        .unwrap();
        FunctionSettings::load(&config)
    }

    #[test]
    fn a_queue_from_the_file_by_namespace_then_name_else_default() {
        let s = load(
            r#"
            [functions.report]
            queue = "batch"
            [functions."report.team-b"]
            queue = "team-b-batch"
            "#,
        )
        .unwrap();
        assert_eq!(s.queue_of("report", None), "batch");
        assert_eq!(s.queue_of("Report", Some("team-a")), "batch");
        assert_eq!(s.queue_of("report", Some("team-b")), "team-b-batch");
        assert_eq!(s.queue_of("other", None), DEFAULT_QUEUE);
        let e = load("[functions.report]\nqueue = \"Not OK\"\n").unwrap_err();
        assert!(e.to_string().contains("is not a queue name"), "{e}");
    }

    #[test]
    fn overrides_apply_by_namespace_then_name() {
        let s = load(
            r#"
            [functions."figlet"]
            max_attempts = 2
            timeout = "2h"
            [functions."figlet.team-a"]
            retry_codes = [429]
            max_age = "48h"
            max_concurrency = 4
            "#,
        )
        .unwrap();
        let plain = s.for_call(&meta("figlet", None));
        assert_eq!(plain.retry.max_attempts, 2);
        assert_eq!(plain.timeout, Duration::from_secs(7200));
        assert_eq!(plain.retry.codes, vec![408, 429, 500, 502, 503, 504]);
        let team = s.for_call(&meta("figlet", Some("team-a")));
        assert_eq!(team.retry.codes, vec![429]);
        assert_eq!(team.max_age, Duration::from_secs(48 * 3600));
        assert_eq!(team.max_concurrency, Some(4));
        assert_eq!(plain.max_concurrency, None, "no cap: --max-inflight");
        assert_eq!(
            team.retry.max_attempts, 5,
            "the namespaced entry does not inherit"
        );
        let shouting = s.for_call(&meta("FIGLET", Some("Team-A")));
        assert_eq!(
            shouting.retry.codes,
            vec![429],
            "names are not case-sensitive"
        );
        let other = s.for_call(&meta("other", None));
        assert_eq!(other.retry.max_attempts, 5);
        assert_eq!(other.timeout, Duration::from_secs(300));
    }

    #[test]
    fn the_default_namespace_entry_applies_to_calls_without_namespace() {
        let s = load(
            r#"
            [functions."billing.openfaas-fn"]
            max_attempts = 1
            "#,
        )
        .unwrap();
        assert_eq!(s.for_call(&meta("billing", None)).retry.max_attempts, 1);
        assert_eq!(s.for_call(&meta("Billing", None)).retry.max_attempts, 1);
        assert_eq!(
            s.for_call(&meta("billing", Some("team-a")))
                .retry
                .max_attempts,
            5
        );
    }

    #[test]
    fn annotations_apply_under_the_file_and_over_the_defaults() {
        let s = load(
            r#"
            [functions."billing"]
            max_attempts = 7
            "#,
        )
        .unwrap();
        let annotated = HashMap::from([
            (
                "billing.openfaas-fn".to_owned(),
                FunctionOverride {
                    max_attempts: Some(2),
                    retry_codes: Some(vec![429]),
                    ..FunctionOverride::default()
                },
            ),
            (
                "report.team-a".to_owned(),
                FunctionOverride {
                    max_attempts: Some(3),
                    initial_wait: Some(Duration::from_secs(1)),
                    ..FunctionOverride::default()
                },
            ),
        ]);
        *s.annotated().write().unwrap() = Arc::new(annotated);
        let billing = s.for_call(&meta("billing", None));
        assert_eq!(billing.retry.max_attempts, 7, "the file wins");
        assert_eq!(
            billing.retry.codes,
            vec![429],
            "the annotation fills the rest"
        );
        let report = s.for_call(&meta("Report", Some("team-a")));
        assert_eq!(report.retry.max_attempts, 3);
        assert_eq!(report.retry.initial_wait, Duration::from_secs(1));
        assert_eq!(
            report.timeout,
            Duration::from_secs(300),
            "defaults under both"
        );
        assert_eq!(
            s.for_call(&meta("report", None)).retry.max_attempts,
            5,
            "another namespace's annotation does not apply"
        );
    }

    #[test]
    fn mistakes_are_clear_errors() {
        for (text, expect) in [
            ("[functions.f]\nmax_atempts = 3\n", "unknown field"),
            (
                "[functions.f]\ntimeout = \"forever\"\n",
                "expected e.g. 30s",
            ),
            ("[functions.f]\nmax_attempts = 0\n", "at least 1"),
            (
                "[functions.f]\nmax_concurrency = 0\n",
                "max_concurrency must be",
            ),
            ("[functions.f]\nretry_codes = [999]\n", "not an HTTP status"),
            (
                "[functions.\"a/b\"]\nmax_attempts = 1\n",
                "not a function name",
            ),
            ("not toml", "invalid"),
            (
                "[functions.f]\nmax_attempts = 1\n[functions.F]\nmax_attempts = 2\n",
                "another entry",
            ),
        ] {
            let err = load(text).unwrap_err().to_string();
            assert!(err.contains(expect), "{text:?}: {err}");
        }
    }
}
