//! Quotas and rate limits on the async path, from one TOML file (`--quotas-file`):
//!
//! - a request rate with a burst per namespace and per subject: a token bucket in this process;
//!   an empty bucket is `429` `rate_limited` with `Retry-After` and the limit in the body;
//! - a cap on the calls pending per namespace, from the queue's own figures
//!   ([`CallQueue::function_stats`], so it holds across gateway replicas), read in the
//!   background every `pending_refresh` and never on the request's path: at the cap,
//!   `429` `quota_exceeded`, nothing queued.
//!
//! Figures that are missing or too old (the queue did not answer) never refuse a call: the cap
//! is then not enforced (fail open), with a warning, until the next good read.
//!
//! The file is a [`crate::reload::Reloadable`], read again every second and on SIGHUP: a change
//! applies from the next call (the buckets keep their tokens); a file that no longer parses
//! keeps the limits in force.
//!
//! ```toml
//! pending_refresh = "500ms"
//! [namespaces.team-a]
//! rate = 5          # calls per second, refilled continuously
//! burst = 10        # calls at once from a full bucket (default: the rate, at least 1)
//! max_pending = 1000
//! [namespaces."*"]  # every namespace without its own entry, each with its own bucket
//! rate = 50
//! [subjects.ci-bot] # a caller (token name, JWT subject, basic-auth user), in any namespace
//! rate = 2
//! burst = 4
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use queue_core::backend::CallQueue;
use queue_core::message::canonical_function;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::audit::log::Limited;
use crate::auth::Principal;
use crate::reload::{LoadError, Reloadable, Watched};

/// The quotas file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    /// It cannot be read.
    #[error("quotas file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It does not parse, or a value is out of range (the message names the line).
    #[error("quotas file {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        message: String,
    },
}

/// Bounds of `pending_refresh`.
const REFRESH_BOUNDS: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(10));
/// Default `pending_refresh`.
const DEFAULT_REFRESH: Duration = Duration::from_millis(500);
/// Buckets kept before the full (idle) ones are dropped: clients may name any namespace.
const MAX_BUCKETS: usize = 10_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    pending_refresh: Option<String>,
    #[serde(default)]
    namespaces: BTreeMap<String, NamespaceLimit>,
    #[serde(default)]
    subjects: BTreeMap<String, SubjectLimit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    rate: Option<f64>,
    burst: Option<u32>,
    max_pending: Option<u64>,
}

/// A rate with a burst.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Calls per second.
    pub per_second: f64,
    /// Calls at once from a full bucket.
    pub burst: u32,
}

/// The limits of one namespace.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "RawLimit")]
struct NamespaceLimit {
    rate: Option<Rate>,
    max_pending: Option<u64>,
}

/// The limit of one subject.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "RawLimit")]
struct SubjectLimit {
    rate: Rate,
}

fn rate_of(raw: &RawLimit) -> Result<Option<Rate>, String> {
    match (raw.rate, raw.burst) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err("burst without rate".into()),
        (Some(rate), burst) => {
            if !(rate.is_finite() && rate > 0.0 && rate <= 1e9) {
                return Err(format!(
                    "rate must be a number of calls per second above 0, not {rate}"
                ));
            }
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "rate is within 0..=1e9"
            )]
            let default_burst = (rate.ceil() as u32).max(1);
            let burst = burst.unwrap_or(default_burst);
            if burst == 0 {
                return Err("burst must be at least 1".into());
            }
            Ok(Some(Rate {
                per_second: rate,
                burst,
            }))
        }
    }
}

impl TryFrom<RawLimit> for NamespaceLimit {
    type Error = String;

    fn try_from(raw: RawLimit) -> Result<Self, String> {
        let rate = rate_of(&raw)?;
        if raw.max_pending == Some(0) {
            return Err("max_pending must be at least 1".into());
        }
        if rate.is_none() && raw.max_pending.is_none() {
            return Err("a namespace entry needs rate and/or max_pending".into());
        }
        Ok(Self {
            rate,
            max_pending: raw.max_pending,
        })
    }
}

impl TryFrom<RawLimit> for SubjectLimit {
    type Error = String;

    fn try_from(raw: RawLimit) -> Result<Self, String> {
        if raw.max_pending.is_some() {
            return Err(
                "max_pending is per namespace (the queue counts calls by function), not per subject"
                    .into(),
            );
        }
        match rate_of(&raw)? {
            Some(rate) => Ok(Self { rate }),
            None => Err("a subject entry needs a rate".into()),
        }
    }
}

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// The rate it was last taken at (for pruning the idle ones).
    rate: Rate,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Self {
        Self {
            tokens: f64::from(rate.burst),
            at: now,
            rate,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(f64::from(rate.burst));
        self.at = now;
        self.rate = rate;
    }

    /// Takes one token, or says how long until there is one.
    fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / rate.per_second,
            ))
        }
    }
}

/// Buckets by key (a namespace or a subject).
#[derive(Debug, Default)]
struct Buckets(Mutex<HashMap<String, Bucket>>);

impl Buckets {
    fn take(&self, key: &str, rate: Rate, now: Instant) -> Result<(), Duration> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_BUCKETS && !map.contains_key(key) {
            map.retain(|_, b| {
                let mut b = *b;
                b.refill(b.rate, now);
                b.tokens < f64::from(b.rate.burst)
            });
        }
        match map.get_mut(key) {
            Some(bucket) => bucket.take(rate, now),
            None => {
                let mut bucket = Bucket::full(rate, now);
                let taken = bucket.take(rate, now);
                map.insert(key.to_owned(), bucket);
                taken
            }
        }
    }

    fn give_back(&self, key: &str, rate: Rate) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bucket) = map.get_mut(key) {
            bucket.tokens = (bucket.tokens + 1.0).min(f64::from(rate.burst));
        }
    }
}

/// The pending calls per namespace, as last read from the queue.
#[derive(Debug)]
struct PendingView {
    by_namespace: HashMap<String, u64>,
    at: Instant,
}

/// Why a call is refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// A rate limit: the bucket is empty.
    Rate {
        /// `namespace` or `subject`.
        kind: &'static str,
        /// The namespace or subject.
        name: String,
        /// The limit.
        rate: Rate,
        /// When a token is back.
        retry_after: Duration,
    },
    /// The namespace's pending calls are at the cap.
    Pending {
        /// The namespace.
        namespace: String,
        /// The cap.
        max_pending: u64,
        /// Pending now (as last read).
        pending: u64,
    },
}

/// The limits the file sets.
#[derive(Debug)]
struct Limits {
    namespaces: HashMap<String, NamespaceLimit>,
    any_namespace: Option<NamespaceLimit>,
    subjects: HashMap<String, SubjectLimit>,
    any_subject: Option<SubjectLimit>,
    refresh: Duration,
}

/// The quotas and the state of their buckets.
#[derive(Debug)]
pub struct Quotas {
    /// The limits, from the file.
    limits: Arc<Reloadable<Limits>>,
    namespace_buckets: Buckets,
    subject_buckets: Buckets,
    pending: RwLock<Option<PendingView>>,
    warned_unknown: AtomicBool,
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

impl Limits {
    /// Parses the file's text; the error names the line.
    fn parse(text: &str) -> Result<Self, String> {
        let file: File = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|span| format!("line {}: ", line_of(text, span.start)))
                .unwrap_or_default();
            format!("{at}{}", e.message())
        })?;
        let refresh = match &file.pending_refresh {
            None => DEFAULT_REFRESH,
            Some(text) => queue_core::settings::parse_duration(text)
                .map_err(|e| format!("pending_refresh: {e}"))?,
        };
        if !(REFRESH_BOUNDS.0..=REFRESH_BOUNDS.1).contains(&refresh) {
            return Err(format!(
                "pending_refresh must be between {} and {}",
                humantime::format_duration(REFRESH_BOUNDS.0),
                humantime::format_duration(REFRESH_BOUNDS.1)
            ));
        }
        let mut namespaces: HashMap<String, NamespaceLimit> = HashMap::new();
        let mut any_namespace = None;
        for (name, limit) in file.namespaces {
            if name == "*" {
                any_namespace = Some(limit);
            } else if namespaces
                .insert(name.to_ascii_lowercase(), limit)
                .is_some()
            {
                return Err(format!("namespace {name:?} is given twice"));
            }
        }
        let mut subjects = HashMap::new();
        let mut any_subject = None;
        for (name, limit) in file.subjects {
            if name == "*" {
                any_subject = Some(limit);
            } else {
                subjects.insert(name, limit);
            }
        }
        Ok(Self {
            namespaces,
            any_namespace,
            subjects,
            any_subject,
            refresh,
        })
    }

    fn namespace_limit(&self, namespace: &str) -> Option<NamespaceLimit> {
        self.namespaces
            .get(namespace)
            .copied()
            .or(self.any_namespace)
    }

    fn subject_limit(&self, subject: &str) -> Option<SubjectLimit> {
        self.subjects.get(subject).copied().or(self.any_subject)
    }

    fn caps_pending(&self) -> bool {
        self.namespaces
            .values()
            .chain(self.any_namespace.as_ref())
            .any(|l| l.max_pending.is_some())
    }
}

impl Quotas {
    /// Reads the file.
    pub fn load(path: &Path) -> Result<Self, QuotaError> {
        let limits = Reloadable::load("quotas file", path, Limits::parse).map_err(|e| match e {
            LoadError::Io(source) => QuotaError::Io {
                path: path.to_owned(),
                source,
            },
            LoadError::Invalid(message) => QuotaError::Invalid {
                path: path.to_owned(),
                message,
            },
        })?;
        Ok(Self::with(limits))
    }

    /// Parses the file's text; the error names the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        Ok(Self::with(Reloadable::fixed(
            "quotas file",
            Limits::parse(text)?,
        )))
    }

    fn with(limits: Reloadable<Limits>) -> Self {
        Self {
            limits: Arc::new(limits),
            namespace_buckets: Buckets::default(),
            subject_buckets: Buckets::default(),
            pending: RwLock::new(None),
            warned_unknown: AtomicBool::new(false),
        }
    }

    fn limits(&self) -> Arc<Limits> {
        self.limits.current()
    }

    /// The file, for [`crate::reload::watch`] (`None` for limits from no file): a new version
    /// applies from the next call, the buckets keep their tokens (up to the new burst).
    pub fn watched(&self) -> Option<Arc<dyn Watched>> {
        self.limits
            .path()
            .is_some()
            .then(|| self.limits.clone() as Arc<dyn Watched>)
    }

    #[cfg(test)]
    fn namespace_limit(&self, namespace: &str) -> Option<NamespaceLimit> {
        self.limits().namespace_limit(namespace)
    }

    /// Whether any namespace has a pending-calls cap (else the queue is never read).
    pub fn caps_pending(&self) -> bool {
        self.limits().caps_pending()
    }

    /// How often the pending figures are read.
    pub fn refresh(&self) -> Duration {
        self.limits().refresh
    }

    /// Figures older than this are not believed (the cap is then not enforced).
    fn stale_after(&self) -> Duration {
        (self.refresh() * 4).max(Duration::from_secs(2))
    }

    /// Notes the pending calls per function (`name` or `name.namespace`) read at `at`.
    pub fn note_pending<'a>(
        &self,
        functions: impl Iterator<Item = (&'a str, u64)>,
        default_namespace: &str,
        at: Instant,
    ) {
        let mut by_namespace: HashMap<String, u64> = HashMap::new();
        for (function, pending) in functions {
            let namespace = match canonical_function(function, default_namespace) {
                Ok((_, Some(ns))) => ns,
                Ok((_, None)) => default_namespace.to_ascii_lowercase(),
                Err(_) => continue,
            };
            *by_namespace.entry(namespace).or_default() += pending;
        }
        *self.pending.write().unwrap_or_else(|p| p.into_inner()) =
            Some(PendingView { by_namespace, at });
        if self.warned_unknown.swap(false, Ordering::Relaxed) {
            tracing::info!("queue figures read again: the pending-calls caps are enforced");
        }
    }

    /// Whether a call of `namespace` from `subject` may be queued now; takes a token from each
    /// bucket that applies when it may.
    pub fn admit(
        &self,
        namespace: &str,
        subject: Option<&str>,
        now: Instant,
    ) -> Result<(), Refusal> {
        let limits = self.limits();
        let limit = limits.namespace_limit(namespace);
        if let Some(max_pending) = limit.and_then(|l| l.max_pending) {
            self.check_pending(namespace, max_pending, now)?;
        }
        let namespace_rate = limit.and_then(|l| l.rate);
        if let Some(rate) = namespace_rate {
            self.namespace_buckets
                .take(namespace, rate, now)
                .map_err(|retry_after| Refusal::Rate {
                    kind: "namespace",
                    name: namespace.to_owned(),
                    rate,
                    retry_after,
                })?;
        }
        let subject_limit = subject.and_then(|s| limits.subject_limit(s));
        if let (Some(subject), Some(limit)) = (subject, subject_limit)
            && let Err(retry_after) = self.subject_buckets.take(subject, limit.rate, now)
        {
            if let Some(rate) = namespace_rate {
                // Not queued: the namespace's token is not spent.
                self.namespace_buckets.give_back(namespace, rate);
            }
            return Err(Refusal::Rate {
                kind: "subject",
                name: subject.to_owned(),
                rate: limit.rate,
                retry_after,
            });
        }
        Ok(())
    }

    fn check_pending(
        &self,
        namespace: &str,
        max_pending: u64,
        now: Instant,
    ) -> Result<(), Refusal> {
        let view = self.pending.read().unwrap_or_else(|p| p.into_inner());
        let fresh = view
            .as_ref()
            .filter(|v| now.saturating_duration_since(v.at) <= self.stale_after());
        let Some(view) = fresh else {
            if !self.warned_unknown.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "the queue's pending figures are unknown or too old: pending-calls caps are not enforced until they are read again"
                );
            }
            return Ok(());
        };
        let pending = view.by_namespace.get(namespace).copied().unwrap_or(0);
        if pending >= max_pending {
            return Err(Refusal::Pending {
                namespace: namespace.to_owned(),
                max_pending,
                pending,
            });
        }
        Ok(())
    }
}

/// Reads the pending figures every `quotas.refresh()` until `stop` (only while a cap is set).
pub async fn follow_pending<Q: CallQueue>(
    queue: Arc<Q>,
    quotas: Arc<Quotas>,
    default_namespace: String,
    stop: CancellationToken,
) {
    let mut failing = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(quotas.refresh()) => {}
        }
        if !quotas.caps_pending() {
            continue;
        }
        let started = Instant::now();
        let read = tokio::select! {
            () = stop.cancelled() => return,
            read = tokio::time::timeout(quotas.stale_after(), queue.function_stats()) => read,
        };
        match read {
            Ok(Ok(functions)) => {
                failing = false;
                quotas.note_pending(
                    functions.iter().map(|f| (f.function.as_str(), f.pending)),
                    &default_namespace,
                    started,
                );
            }
            Ok(Err(e)) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "queue figures for the pending-calls caps not read");
            }
            Err(_) if !failing => {
                failing = true;
                tracing::warn!("queue figures for the pending-calls caps not read in time");
            }
            _ => {}
        }
    }
}

/// The `429` of a refusal.
pub fn refused(refusal: &Refusal, retry_after_pending: Duration) -> Response {
    let (code, message, limit, retry_after) = match refusal {
        Refusal::Rate {
            kind,
            name,
            rate,
            retry_after,
        } => (
            "rate_limited",
            format!(
                "{kind} {name} is limited to {} calls per second (burst {})",
                rate.per_second, rate.burst
            ),
            {
                let mut limit = serde_json::Map::new();
                limit.insert("kind".into(), json!(kind));
                limit.insert((*kind).into(), json!(name));
                limit.insert("rate".into(), json!(rate.per_second));
                limit.insert("burst".into(), json!(rate.burst));
                serde_json::Value::Object(limit)
            },
            *retry_after,
        ),
        Refusal::Pending {
            namespace,
            max_pending,
            pending,
        } => (
            "quota_exceeded",
            format!(
                "namespace {namespace} has {pending} calls pending, its quota is {max_pending}; nothing was queued"
            ),
            json!({ "kind": "namespace", "namespace": namespace, "max_pending": max_pending, "pending": pending }),
            retry_after_pending,
        ),
    };
    metrics::counter!(queue_core::metrics::REFUSED, "reason" => code).increment(1);
    let mut response = (
        StatusCode::TOO_MANY_REQUESTS,
        axum::Json(json!({ "error": code, "message": message, "limit": limit })),
    )
        .into_response();
    // Whole seconds, rounded up: a client that waits as long finds a token.
    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    response
}

/// The layer of the async routes: the call's namespace (from the path) and subject (from the
/// authorization layer, when there is one) must be within their quotas.
pub async fn layer(
    quotas: Arc<Quotas>,
    default_namespace: Arc<str>,
    retry_after: Duration,
    request: Request,
    next: Next,
) -> Response {
    // OpenFaaS Pro's cancel (`DELETE /async-function/{call_id}`) queues nothing.
    if (request.extensions().get::<crate::paths::DeleteTarget>())
        .is_some_and(crate::paths::DeleteTarget::is_call)
    {
        return next.run(request).await;
    }
    let (addressed, _) = crate::paths::split_path(request.uri().path());
    let Ok((_, namespace)) = canonical_function(addressed, &default_namespace) else {
        // The handler refuses it (400).
        return next.run(request).await;
    };
    let namespace = namespace.unwrap_or_else(|| default_namespace.to_ascii_lowercase());
    let subject = request
        .extensions()
        .get::<Arc<Principal>>()
        .map(|p| p.subject.clone());
    if let Err(refusal) = quotas.admit(&namespace, subject.as_deref(), Instant::now()) {
        let reason = match refusal {
            Refusal::Rate { .. } => "rate_limited",
            Refusal::Pending { .. } => "quota_exceeded",
        };
        tracing::info!(
            namespace,
            subject = subject.as_deref(),
            reason,
            "call refused"
        );
        let mut response = refused(&refusal, retry_after);
        // For the audit line (the audit layer is outside this one).
        response.extensions_mut().insert(Limited(reason));
        return response;
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
pending_refresh = "250ms"
[namespaces.team-a]
rate = 5
burst = 5
max_pending = 3
[namespaces."*"]
rate = 100
[subjects.ci-bot]
rate = 1
burst = 2
"#;

    #[test]
    fn the_file_parses_with_defaults() {
        let q = Quotas::parse(FILE).unwrap();
        assert_eq!(q.refresh(), Duration::from_millis(250));
        let a = q.namespace_limit("team-a").unwrap();
        assert_eq!(
            a.rate,
            Some(Rate {
                per_second: 5.0,
                burst: 5
            })
        );
        assert_eq!(a.max_pending, Some(3));
        let other = q.namespace_limit("team-z").unwrap();
        assert_eq!(other.rate.unwrap().burst, 100, "burst defaults to the rate");
        assert!(q.caps_pending());
        assert!(!Quotas::parse("").unwrap().caps_pending());
        assert!(q.watched().is_none(), "no file to reread");
    }

    /// The worked example of the README parses, and means what the README says.
    #[test]
    fn the_readme_example_parses() {
        let readme = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"),
        )
        .unwrap();
        let start = readme.find("# /etc/faas-async/quotas.toml").unwrap();
        let text = &readme[start..start + readme[start..].find("```").unwrap()];
        let q = Quotas::parse(text).unwrap();
        assert_eq!(
            q.namespace_limit("team-a"),
            Some(NamespaceLimit {
                rate: Some(Rate {
                    per_second: 5.0,
                    burst: 10
                }),
                max_pending: Some(1000)
            })
        );
        assert_eq!(q.namespace_limit("openfaas-fn").unwrap().rate, None);
        assert_eq!(
            q.namespace_limit("team-z").unwrap().rate.unwrap().burst,
            100
        );
        assert_eq!(q.limits().subjects["ci-bot"].rate.burst, 4);
    }

    #[test]
    fn a_changed_file_applies_and_a_broken_one_keeps_the_limits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quotas.toml");
        std::fs::write(&path, "[namespaces.a]\nrate = 1\n").unwrap();
        let q = Quotas::load(&path).unwrap();
        let file = q.watched().unwrap();
        assert!(!file.reload(false).unwrap(), "unchanged");
        std::fs::write(&path, "[namespaces.a]\nrate = 7\nmax_pending = 9\n").unwrap();
        assert!(file.reload(false).unwrap());
        assert_eq!(q.namespace_limit("a").unwrap().rate.unwrap().burst, 7);
        assert!(q.caps_pending());
        std::fs::write(&path, "[namespaces.a]\nrate = -1\n").unwrap();
        let e = file.reload(false).unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        assert_eq!(q.namespace_limit("a").unwrap().max_pending, Some(9));
    }

    #[test]
    fn errors_name_the_line() {
        for (text, line, what) in [
            (
                "[namespaces.a]\nrate = 5\nrat = 3\n",
                "line 3",
                "unknown field",
            ),
            ("[namespaces.a]\nrate = 0\n", "line 1", "above 0"),
            (
                "[namespaces.a]\n\nburst = 3\n",
                "line 1",
                "burst without rate",
            ),
            (
                "\n[subjects.bot]\nrate = 1\nmax_pending = 3\n",
                "line 2",
                "per namespace",
            ),
            ("[namespaces.a]\nrate = = 5\n", "line 2", ""),
            ("pending_refresh = \"1h\"\n", "", "between"),
        ] {
            let e = Quotas::parse(text).unwrap_err();
            assert!(e.contains(line) && e.contains(what), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let q = Quotas::parse(FILE).unwrap();
        let t0 = Instant::now();
        for _ in 0..5 {
            q.admit("team-b", None, t0).unwrap();
        }
        let mut refused = 0;
        for _ in 0..5 {
            match q.admit("team-a", None, t0) {
                Ok(()) => {}
                Err(r) => panic!("{r:?}"),
            }
        }
        match q.admit("team-a", None, t0) {
            Err(Refusal::Rate {
                kind, retry_after, ..
            }) => {
                assert_eq!(kind, "namespace");
                assert!(retry_after <= Duration::from_millis(200), "{retry_after:?}");
                refused += 1;
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(refused, 1);
        // 200 ms later, one more token (5 per second).
        q.admit("team-a", None, t0 + Duration::from_millis(200))
            .unwrap();
        assert!(
            q.admit("team-a", None, t0 + Duration::from_millis(200))
                .is_err()
        );
    }

    #[test]
    fn a_subject_refusal_does_not_spend_the_namespace_token() {
        let q = Quotas::parse(FILE).unwrap();
        let t0 = Instant::now();
        q.admit("team-a", Some("ci-bot"), t0).unwrap();
        q.admit("team-a", Some("ci-bot"), t0).unwrap();
        assert!(matches!(
            q.admit("team-a", Some("ci-bot"), t0),
            Err(Refusal::Rate {
                kind: "subject",
                ..
            })
        ));
        // Three tokens of team-a's five are left.
        for _ in 0..3 {
            q.admit("team-a", Some("someone"), t0).unwrap();
        }
        assert!(q.admit("team-a", Some("someone"), t0).is_err());
    }

    #[test]
    fn the_pending_cap_holds_on_fresh_figures_and_fails_open_without() {
        let q = Quotas::parse("[namespaces.team-a]\nmax_pending = 3\n").unwrap();
        let t0 = Instant::now();
        // Unknown: not enforced.
        q.admit("team-a", None, t0).unwrap();
        q.note_pending(
            [("fn.team-a", 2), ("other.team-a", 1), ("fn", 50)].into_iter(),
            "openfaas-fn",
            t0,
        );
        assert_eq!(
            q.admit("team-a", None, t0),
            Err(Refusal::Pending {
                namespace: "team-a".into(),
                max_pending: 3,
                pending: 3
            })
        );
        q.admit("openfaas-fn", None, t0).unwrap();
        // Too old (the queue stopped answering): not enforced.
        q.admit("team-a", None, t0 + Duration::from_secs(30))
            .unwrap();
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        let refusal = Refusal::Rate {
            kind: "namespace",
            name: "team-a".into(),
            rate: Rate {
                per_second: 0.5,
                burst: 1,
            },
            retry_after: Duration::from_millis(1200),
        };
        let response = refused(&refusal, Duration::from_secs(5));
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
    }
}
