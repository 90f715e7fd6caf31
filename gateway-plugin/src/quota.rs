//! Quotas and rate limits on the async path, from one TOML file (`--quotas-file`):
//!
//! - a request rate with a burst per namespace and per subject: a token bucket in this process;
//!   an empty bucket is `429` `rate_limited` with `Retry-After` and the limit in the body;
//! - a cap on the calls pending per namespace, from the queue's own figures
//!   ([`CallQueue::function_stats`], so it holds across gateway replicas), read in the
//!   background every `pending_refresh` and never on the request's path: at the cap,
//!   `429` `quota_exceeded`, nothing queued.
//!
//! - a cap on the bytes a namespace holds in the blob store (large request bodies and kept
//!   results, [`queue_core::blobs::stored_bytes_by_namespace`]), from a listing of the store
//!   read in the background every `stored_refresh`: a namespace at its cap gets `429`
//!   `quota_exceeded` for every call (its result may be stored too), one whose announced large
//!   body would take it past the cap as well, and a body larger than the whole cap `413`.
//!
//! Figures that are missing or too old (the queue or the store did not answer) never refuse a
//! call: the cap is then not enforced (fail open), with a warning, until the next good read.
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
//! max_stored_bytes = "50GiB"
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
use queue_core::blobs::{BlobStore, SharedBlobs};
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
/// Bounds of `stored_refresh` (a listing of the whole store: not as often as the queue's figures).
const STORED_REFRESH_BOUNDS: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(600));
/// Default `stored_refresh`.
const DEFAULT_STORED_REFRESH: Duration = Duration::from_secs(10);
/// Buckets kept before the full (idle) ones are dropped: clients may name any namespace.
const MAX_BUCKETS: usize = 10_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    pending_refresh: Option<String>,
    #[serde(default)]
    stored_refresh: Option<String>,
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
    max_stored_bytes: Option<Size>,
}

/// A byte size in the file: a number of bytes or a text such as `"50GiB"`.
#[derive(Debug)]
enum Size {
    Bytes(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size: a number of bytes or a text such as \"50GiB\"")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Size, E> {
                Ok(Size::Bytes(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Size, E> {
                u64::try_from(n)
                    .map(Size::Bytes)
                    .map_err(|_| E::custom(format!("a size is not negative, not {n}")))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Size, E> {
                Ok(Size::Text(text.to_owned()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl Size {
    fn bytes(&self) -> Result<u64, String> {
        match self {
            Self::Bytes(n) => Ok(*n),
            Self::Text(text) => queue_core::settings::parse_bytes(text),
        }
    }
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
    max_stored_bytes: Option<u64>,
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
        let max_stored_bytes = match &raw.max_stored_bytes {
            None => None,
            Some(size) => match size.bytes() {
                Ok(0) => return Err("max_stored_bytes must be at least 1 byte".into()),
                Ok(n) => Some(n),
                Err(e) => return Err(format!("max_stored_bytes: {e}")),
            },
        };
        if rate.is_none() && raw.max_pending.is_none() && max_stored_bytes.is_none() {
            return Err("a namespace entry needs rate, max_pending and/or max_stored_bytes".into());
        }
        Ok(Self {
            rate,
            max_pending: raw.max_pending,
            max_stored_bytes,
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
        if raw.max_stored_bytes.is_some() {
            return Err(
                "max_stored_bytes is per namespace (stored bodies and results are kept by namespace), not per subject"
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

/// Figures per namespace read in the background (the pending calls, the stored bytes), and
/// whether their being unknown has been logged.
#[derive(Debug)]
struct Figures {
    /// What they are, for the log.
    what: &'static str,
    /// The figures per namespace (lower case) and when they were read.
    view: RwLock<Option<(HashMap<String, u64>, Instant)>>,
    warned: AtomicBool,
}

impl Figures {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            view: RwLock::new(None),
            warned: AtomicBool::new(false),
        }
    }

    fn note(&self, by_namespace: HashMap<String, u64>, at: Instant) {
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = Some((by_namespace, at));
        if self.warned.swap(false, Ordering::Relaxed) {
            tracing::info!(
                figures = self.what,
                "figures read again: their caps are enforced"
            );
        }
    }

    /// The namespace's figure (0 when it has none), or `None` when the figures are unknown
    /// or older than `stale_after` (logged once until they are read again).
    fn of(&self, namespace: &str, now: Instant, stale_after: Duration) -> Option<u64> {
        let view = self.view.read().unwrap_or_else(|p| p.into_inner());
        match view.as_ref() {
            Some((by_namespace, at)) if now.saturating_duration_since(*at) <= stale_after => {
                Some(by_namespace.get(namespace).copied().unwrap_or(0))
            }
            _ => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        figures = self.what,
                        "figures unknown or too old: their caps are not enforced until they are read again"
                    );
                }
                None
            }
        }
    }
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
    /// The namespace's stored bytes are at the cap, or this call's body would take them past.
    Stored {
        /// The namespace.
        namespace: String,
        /// The cap, bytes.
        max_stored_bytes: u64,
        /// Stored now (as last listed), bytes.
        stored: u64,
        /// The announced length of this call's body when it is stored apart, else 0.
        incoming: u64,
    },
}

impl Refusal {
    /// The reason, as the audit log and the metrics name it.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Rate { .. } => "rate_limited",
            Self::Pending { .. } | Self::Stored { .. } => "quota_exceeded",
        }
    }
}

/// The limits the file sets.
#[derive(Debug)]
struct Limits {
    namespaces: HashMap<String, NamespaceLimit>,
    any_namespace: Option<NamespaceLimit>,
    subjects: HashMap<String, SubjectLimit>,
    any_subject: Option<SubjectLimit>,
    refresh: Duration,
    stored_refresh: Duration,
}

/// The quotas and the state of their buckets.
#[derive(Debug)]
pub struct Quotas {
    /// The limits, from the file.
    limits: Arc<Reloadable<Limits>>,
    namespace_buckets: Buckets,
    subject_buckets: Buckets,
    pending: Figures,
    stored: Figures,
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
        let stored_refresh = match &file.stored_refresh {
            None => DEFAULT_STORED_REFRESH,
            Some(text) => queue_core::settings::parse_duration(text)
                .map_err(|e| format!("stored_refresh: {e}"))?,
        };
        if !(STORED_REFRESH_BOUNDS.0..=STORED_REFRESH_BOUNDS.1).contains(&stored_refresh) {
            return Err(format!(
                "stored_refresh must be between {} and {}",
                humantime::format_duration(STORED_REFRESH_BOUNDS.0),
                humantime::format_duration(STORED_REFRESH_BOUNDS.1)
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
            stored_refresh,
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

    fn caps_stored(&self) -> bool {
        self.namespaces
            .values()
            .chain(self.any_namespace.as_ref())
            .any(|l| l.max_stored_bytes.is_some())
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
            pending: Figures::new("pending calls"),
            stored: Figures::new("stored bytes"),
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

    /// Whether any namespace has a stored-bytes cap (else the store is never listed).
    pub fn caps_stored(&self) -> bool {
        self.limits().caps_stored()
    }

    /// How often the blob store is listed for the stored-bytes caps.
    pub fn stored_refresh(&self) -> Duration {
        self.limits().stored_refresh
    }

    /// Stored-bytes figures older than this are not believed.
    fn stored_stale_after(&self) -> Duration {
        (self.stored_refresh() * 4).max(Duration::from_secs(10))
    }

    /// Notes the bytes stored per namespace (lower case), listed at `at`.
    pub fn note_stored(&self, by_namespace: HashMap<String, u64>, at: Instant) {
        self.stored.note(by_namespace, at);
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
        self.pending.note(by_namespace, at);
    }

    /// Whether a call of `namespace` from `subject`, whose body adds `incoming` bytes to the
    /// blob store (0 for a body kept inline or of unknown length), may be queued now; takes a
    /// token from each bucket that applies when it may.
    pub fn admit(
        &self,
        namespace: &str,
        subject: Option<&str>,
        incoming: u64,
        now: Instant,
    ) -> Result<(), Refusal> {
        let limits = self.limits();
        let limit = limits.namespace_limit(namespace);
        if let Some(max_pending) = limit.and_then(|l| l.max_pending) {
            self.check_pending(namespace, max_pending, now)?;
        }
        if let Some(max_stored_bytes) = limit.and_then(|l| l.max_stored_bytes) {
            self.check_stored(namespace, max_stored_bytes, incoming, now)?;
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
        let Some(pending) = self.pending.of(namespace, now, self.stale_after()) else {
            return Ok(());
        };
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

impl Quotas {
    fn check_stored(
        &self,
        namespace: &str,
        max_stored_bytes: u64,
        incoming: u64,
        now: Instant,
    ) -> Result<(), Refusal> {
        let refusal = |stored| Refusal::Stored {
            namespace: namespace.to_owned(),
            max_stored_bytes,
            stored,
            incoming,
        };
        // Never fits, whatever is stored: no figures needed.
        if incoming > max_stored_bytes {
            return Err(refusal(0));
        }
        let Some(stored) = self.stored.of(namespace, now, self.stored_stale_after()) else {
            return Ok(());
        };
        if stored >= max_stored_bytes || stored.saturating_add(incoming) > max_stored_bytes {
            return Err(refusal(stored));
        }
        Ok(())
    }
}

/// Every `refresh(quotas)` until `stop`, while `enabled(quotas)`: `read` within
/// `stale_after(quotas)`, its figures given to `note` with the time the read began. A failing
/// read is logged once until one succeeds (the figures go stale meanwhile: fail open).
#[allow(
    clippy::too_many_arguments,
    reason = "one loop for both kinds of figures, each argument a different accessor"
)]
async fn follow_figures<T, E, Fut>(
    quotas: &Quotas,
    stop: &CancellationToken,
    what: &str,
    refresh: fn(&Quotas) -> Duration,
    enabled: fn(&Quotas) -> bool,
    stale_after: fn(&Quotas) -> Duration,
    mut read: impl FnMut() -> Fut,
    mut note: impl FnMut(T, Instant),
) where
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut failing = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(refresh(quotas)) => {}
        }
        if !enabled(quotas) {
            continue;
        }
        let started = Instant::now();
        let read = tokio::select! {
            () = stop.cancelled() => return,
            read = tokio::time::timeout(stale_after(quotas), read()) => read,
        };
        match read {
            Ok(Ok(figures)) => {
                failing = false;
                note(figures, started);
            }
            Ok(Err(e)) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "{what} for the quotas not read");
            }
            Err(_) if !failing => {
                failing = true;
                tracing::warn!("{what} for the quotas not read in time");
            }
            _ => {}
        }
    }
}

/// Lists the blob store every `stored_refresh` until `stop` (only while a stored-bytes cap is
/// set), for the stored-bytes caps.
pub async fn follow_stored(blobs: SharedBlobs, quotas: Arc<Quotas>, stop: CancellationToken) {
    let list = || async {
        let store = blobs.store().await?;
        store.list().await
    };
    follow_figures(
        &quotas,
        &stop,
        "blob store listing",
        Quotas::stored_refresh,
        Quotas::caps_stored,
        Quotas::stored_stale_after,
        list,
        |entries: Vec<queue_core::blobs::BlobEntry>, at| {
            quotas.note_stored(queue_core::blobs::stored_bytes_by_namespace(&entries), at);
        },
    )
    .await;
}

/// Reads the pending figures every `pending_refresh` until `stop` (only while a cap is set).
pub async fn follow_pending<Q: CallQueue>(
    queue: Arc<Q>,
    quotas: Arc<Quotas>,
    default_namespace: String,
    stop: CancellationToken,
) {
    follow_figures(
        &quotas,
        &stop,
        "queue figures",
        Quotas::refresh,
        Quotas::caps_pending,
        Quotas::stale_after,
        || queue.function_stats(),
        |functions: Vec<queue_core::backend::FunctionQueueStats>, at| {
            quotas.note_pending(
                functions.iter().map(|f| (f.function.as_str(), f.pending)),
                &default_namespace,
                at,
            );
        },
    )
    .await;
}

/// The `429` of a refusal (`413` for a body larger than its namespace's whole stored-bytes cap,
/// which waiting never helps).
pub fn refused(refusal: &Refusal, retry_after_pending: Duration) -> Response {
    let mut status = StatusCode::TOO_MANY_REQUESTS;
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
        Refusal::Stored {
            namespace,
            max_stored_bytes,
            stored,
            incoming,
        } => {
            let message = if incoming > max_stored_bytes {
                status = StatusCode::PAYLOAD_TOO_LARGE;
                format!(
                    "the body of {incoming} bytes is more than namespace {namespace} may store ({max_stored_bytes} bytes); nothing was queued"
                )
            } else if stored >= max_stored_bytes {
                format!(
                    "namespace {namespace} stores {stored} bytes of bodies and results, its quota is {max_stored_bytes}; nothing was queued"
                )
            } else {
                format!(
                    "namespace {namespace} stores {stored} bytes of bodies and results, and this body of {incoming} bytes would take it past its quota of {max_stored_bytes}; nothing was queued"
                )
            };
            let mut limit = json!({
                "kind": "namespace",
                "namespace": namespace,
                "max_stored_bytes": max_stored_bytes,
                "stored_bytes": stored,
            });
            if *incoming > 0 {
                limit["body_bytes"] = json!(incoming);
            }
            ("quota_exceeded", message, limit, retry_after_pending)
        }
    };
    metrics::counter!(queue_core::metrics::REFUSED, "reason" => code).increment(1);
    let mut response = (
        status,
        axum::Json(json!({ "error": code, "message": message, "limit": limit })),
    )
        .into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        // Whole seconds, rounded up: a client that waits as long finds a token.
        let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    response
}

/// The layer of the async routes: the call's namespace (from the path) and subject (from the
/// authorization layer, when there is one) must be within their quotas; a `Content-Length`
/// above `inline` (the body is stored apart) counts against the stored-bytes cap.
pub async fn layer(
    quotas: Arc<Quotas>,
    default_namespace: Arc<str>,
    retry_after: Duration,
    inline: u64,
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
    let incoming = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|len| *len > inline)
        .unwrap_or(0);
    if let Err(refusal) = quotas.admit(&namespace, subject.as_deref(), incoming, Instant::now()) {
        let reason = refusal.reason();
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
                max_pending: Some(1000),
                max_stored_bytes: Some(50 << 30),
            })
        );
        assert_eq!(q.stored_refresh(), Duration::from_secs(10));
        assert!(q.caps_stored());
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
            q.admit("team-b", None, 0, t0).unwrap();
        }
        let mut refused = 0;
        for _ in 0..5 {
            match q.admit("team-a", None, 0, t0) {
                Ok(()) => {}
                Err(r) => panic!("{r:?}"),
            }
        }
        match q.admit("team-a", None, 0, t0) {
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
        q.admit("team-a", None, 0, t0 + Duration::from_millis(200))
            .unwrap();
        assert!(
            q.admit("team-a", None, 0, t0 + Duration::from_millis(200))
                .is_err()
        );
    }

    #[test]
    fn a_subject_refusal_does_not_spend_the_namespace_token() {
        let q = Quotas::parse(FILE).unwrap();
        let t0 = Instant::now();
        q.admit("team-a", Some("ci-bot"), 0, t0).unwrap();
        q.admit("team-a", Some("ci-bot"), 0, t0).unwrap();
        assert!(matches!(
            q.admit("team-a", Some("ci-bot"), 0, t0),
            Err(Refusal::Rate {
                kind: "subject",
                ..
            })
        ));
        // Three tokens of team-a's five are left.
        for _ in 0..3 {
            q.admit("team-a", Some("someone"), 0, t0).unwrap();
        }
        assert!(q.admit("team-a", Some("someone"), 0, t0).is_err());
    }

    #[test]
    fn the_pending_cap_holds_on_fresh_figures_and_fails_open_without() {
        let q = Quotas::parse("[namespaces.team-a]\nmax_pending = 3\n").unwrap();
        let t0 = Instant::now();
        // Unknown: not enforced.
        q.admit("team-a", None, 0, t0).unwrap();
        q.note_pending(
            [("fn.team-a", 2), ("other.team-a", 1), ("fn", 50)].into_iter(),
            "openfaas-fn",
            t0,
        );
        assert_eq!(
            q.admit("team-a", None, 0, t0),
            Err(Refusal::Pending {
                namespace: "team-a".into(),
                max_pending: 3,
                pending: 3
            })
        );
        q.admit("openfaas-fn", None, 0, t0).unwrap();
        // Too old (the queue stopped answering): not enforced.
        q.admit("team-a", None, 0, t0 + Duration::from_secs(30))
            .unwrap();
    }

    #[test]
    fn stored_bytes_caps_parse_as_numbers_or_sizes_and_bad_ones_name_the_line() {
        let q = Quotas::parse(
            "stored_refresh = \"2s\"\n[namespaces.a]\nmax_stored_bytes = 1000\n[namespaces.b]\nmax_stored_bytes = \"2MiB\"\n",
        )
        .unwrap();
        assert_eq!(q.namespace_limit("a").unwrap().max_stored_bytes, Some(1000));
        assert_eq!(
            q.namespace_limit("b").unwrap().max_stored_bytes,
            Some(2 << 20)
        );
        assert_eq!(q.stored_refresh(), Duration::from_secs(2));
        assert!(q.caps_stored());
        assert!(!q.caps_pending());
        assert!(
            !Quotas::parse("[namespaces.a]\nrate = 1\n")
                .unwrap()
                .caps_stored()
        );
        for (text, what) in [
            ("[namespaces.a]\nmax_stored_bytes = 0\n", "at least 1 byte"),
            (
                "[namespaces.a]\nmax_stored_bytes = \"5XB\"\n",
                "unknown size unit",
            ),
            (
                "[namespaces.a]\nmax_stored_bytes = -5\n",
                "not negative, not -5",
            ),
            (
                "[namespaces.a]\nmax_stored_bytes = 1.5\n",
                "a number of bytes",
            ),
            (
                "[subjects.bot]\nrate = 1\nmax_stored_bytes = 10\n",
                "per namespace",
            ),
            ("stored_refresh = \"100ms\"\n", "between 1s and 10m"),
            ("stored_refresh = \"soon\"\n", "stored_refresh"),
        ] {
            let e = Quotas::parse(text).unwrap_err();
            assert!(e.contains(what), "{text:?}: {e}");
        }
    }

    #[test]
    fn the_stored_bytes_cap_holds_on_fresh_figures_and_fails_open_without() {
        let q =
            Quotas::parse("[namespaces.team-a]\nmax_stored_bytes = 1000\nrate = 1\nburst = 4\n")
                .unwrap();
        let t0 = Instant::now();
        // Unknown figures: not enforced, except for a body larger than the whole cap.
        q.admit("team-a", None, 900, t0).unwrap();
        let too_big = q.admit("team-a", None, 1001, t0).unwrap_err();
        assert_eq!(
            too_big,
            Refusal::Stored {
                namespace: "team-a".into(),
                max_stored_bytes: 1000,
                stored: 0,
                incoming: 1001
            }
        );
        let response = refused(&too_big, Duration::from_secs(5));
        assert_eq!(response.status(), 413);
        assert!(!response.headers().contains_key(header::RETRY_AFTER));

        q.note_stored(HashMap::from([("team-a".to_owned(), 600)]), t0);
        q.admit("team-a", None, 0, t0).unwrap();
        q.admit("team-a", None, 400, t0).unwrap();
        assert_eq!(
            q.admit("team-a", None, 401, t0),
            Err(Refusal::Stored {
                namespace: "team-a".into(),
                max_stored_bytes: 1000,
                stored: 600,
                incoming: 401
            })
        );
        q.admit("team-b", None, 5000, t0).unwrap();

        // At the cap, every call is refused (its result may be stored too), and the refusals
        // spend no token: one of the four is left.
        q.note_stored(HashMap::from([("team-a".to_owned(), 1000)]), t0);
        let at_cap = q.admit("team-a", None, 0, t0).unwrap_err();
        assert_eq!(at_cap.reason(), "quota_exceeded");
        let response = refused(&at_cap, Duration::from_secs(5));
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[header::RETRY_AFTER], "5");
        for _ in 0..100 {
            assert!(q.admit("team-a", None, 0, t0).is_err());
        }
        q.note_stored(HashMap::new(), t0);
        q.admit("team-a", None, 0, t0).unwrap();
        assert!(matches!(
            q.admit("team-a", None, 0, t0),
            Err(Refusal::Rate { .. })
        ));

        // Figures older than 4 x stored_refresh (at least 10 s) are not believed.
        q.note_stored(HashMap::from([("team-a".to_owned(), 5000)]), t0);
        assert!(
            q.admit("team-a", None, 0, t0 + Duration::from_secs(5))
                .is_err()
        );
        q.admit("team-a", None, 0, t0 + Duration::from_secs(60))
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
