//! What the workers announce about themselves and what the admin views read besides the queue
//! figures: each worker's status ([`WorkerStatus`], announced every `--status-interval` through
//! [`super::CallRecords::announce_worker_status`]), the lanes of fair workers
//! ([`LaneStats`]) and the scheduled calls per function ([`FunctionScheduled`]).
//!
//! A status is kept for a short while only: a worker that stops announcing (stopped, crashed,
//! cut off) drops out of [`super::CallRecords::worker_statuses`] after three of its intervals,
//! and JetStream forgets its key after [`STATUS_TTL`] (the bucket's `max_age`).

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::{BackendError, Lane};
use crate::message::Priority;

/// How long JetStream keeps a worker's status without a newer one (the status bucket's
/// `max_age`); a worker announces at most every [`MAX_STATUS_INTERVAL`], well within it.
pub const STATUS_TTL: Duration = Duration::from_secs(60);

/// The longest interval between two announcements of a worker.
pub const MAX_STATUS_INTERVAL: Duration = Duration::from_secs(20);

/// Functions a status lists at most (the busiest first); the others are counted in
/// [`WorkerStatus::functions_omitted`].
pub const MAX_STATUS_FUNCTIONS: usize = 256;

/// One worker as it announces itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// This worker's id, unique among the running workers: `<hostname>-<pid>-<n>` (letters,
    /// digits, `-` and `_`: a key in a key-value bucket).
    pub worker: String,
    /// The host it runs on.
    pub hostname: String,
    /// Its consumer group (`--consumer`).
    pub consumer: String,
    /// `--max-inflight`.
    pub max_inflight: u32,
    /// Calls it holds now: running, waiting for their function's slot, or delivering their
    /// callback.
    pub in_flight: u32,
    /// Whether it pulls lane by lane (`--fair-scheduling`).
    pub fair_scheduling: bool,
    /// Whether its limits adapt (`--adaptive-concurrency`).
    pub adaptive_concurrency: bool,
    /// How often it announces, seconds.
    pub interval_seconds: f64,
    /// When it announced this, Unix nanoseconds.
    pub announced_at_unix_nanos: u64,
    /// The functions it tracks a limit for, the busiest first.
    pub functions: Vec<FunctionConcurrency>,
    /// Functions tracked and left out of `functions` (beyond [`MAX_STATUS_FUNCTIONS`]).
    #[serde(default)]
    pub functions_omitted: u32,
}

impl WorkerStatus {
    /// Whether the status is recent enough to stand for a running worker at `now` (Unix
    /// nanoseconds): announced within three of its intervals (at least one second), and
    /// within [`STATUS_TTL`].
    pub fn is_fresh(&self, now: u64) -> bool {
        let interval = Duration::try_from_secs_f64(self.interval_seconds)
            .unwrap_or(MAX_STATUS_INTERVAL)
            .min(MAX_STATUS_INTERVAL);
        let window = (interval * 3).max(Duration::from_secs(1)).min(STATUS_TTL);
        let age = Duration::from_nanos(now.saturating_sub(self.announced_at_unix_nanos));
        age <= window
    }

    /// Whether `worker` can be a key of the status bucket.
    pub fn valid_id(worker: &str) -> bool {
        !worker.is_empty()
            && worker.len() <= 200
            && worker
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }
}

/// One function's concurrency on one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionConcurrency {
    /// `name` or `name.namespace`.
    pub function: String,
    /// Calls of it the worker runs at once now: the adaptive limit, or the cap.
    pub limit: u32,
    /// The most it may run at once (`max_concurrency` within `--max-inflight`).
    pub cap: u32,
    /// Of those, running now.
    pub in_flight: u32,
    /// Calls waiting for one of its slots.
    pub waiting: u32,
}

/// One lane of a fair worker group: a function at one priority, with its consumer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LaneStats {
    /// `name` or `name.namespace`.
    pub function: String,
    /// The priority.
    pub priority: Priority,
    /// The worker group (consumer) that pulls it.
    pub consumer: String,
    /// Calls waiting in the lane (not delivered).
    pub pending: u64,
    /// Calls delivered from it and not acknowledged.
    pub unacked: u64,
}

impl LaneStats {
    /// The figures of `lane` as its consumer in `group` counts them.
    pub fn of(lane: &Lane, group: &str, pending: u64, unacked: u64) -> Self {
        Self {
            function: lane.qualified_function(),
            priority: lane.priority,
            consumer: group.to_owned(),
            pending,
            unacked,
        }
    }
}

/// Scheduled calls of one function whose time has not come.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FunctionScheduled {
    /// `name` or `name.namespace`.
    pub function: String,
    /// How many.
    pub scheduled: u64,
}

/// Sums `(function, 1 or more)` pairs into sorted [`FunctionScheduled`] rows.
pub fn scheduled_rows(counts: impl IntoIterator<Item = (String, u64)>) -> Vec<FunctionScheduled> {
    let mut by_function = std::collections::BTreeMap::<String, u64>::new();
    for (function, n) in counts {
        *by_function.entry(function).or_default() += n;
    }
    by_function
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(function, scheduled)| FunctionScheduled {
            function,
            scheduled,
        })
        .collect()
}

/// The status bucket of a records bucket: `<records bucket>-workers`.
pub fn status_bucket_name(records_bucket: &str) -> String {
    format!("{records_bucket}-workers")
}

/// The stream behind the status bucket: one value per key, in memory (a status is worth
/// nothing after a restart), forgotten after [`STATUS_TTL`].
pub fn status_bucket_config(bucket: &str, replicas: usize) -> stream::Config {
    stream::Config {
        name: format!("KV_{bucket}"),
        description: Some("worker status announcements, each kept for a minute".into()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age: STATUS_TTL,
        storage: stream::StorageType::Memory,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: replicas.max(1),
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    }
}

fn request_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Request(e.to_string())
}

/// JetStream: puts `status` under its worker's key in the status bucket of `records_bucket`,
/// creating the bucket on first use (with the records bucket's replicas).
pub(super) async fn put_status(
    js: &jetstream::Context,
    records_bucket: &str,
    status: &WorkerStatus,
) -> Result<(), BackendError> {
    if !WorkerStatus::valid_id(&status.worker) {
        return Err(BackendError::Request(format!(
            "the worker id {:?} cannot be a key",
            status.worker
        )));
    }
    let bucket = status_bucket_name(records_bucket);
    let subject = format!("$KV.{bucket}.{}", status.worker);
    let payload = Bytes::from(serde_json::to_vec(status)?);
    let publish = async |payload: Bytes| match js.publish(subject.clone(), payload).await {
        Ok(ack) => ack.await.map(drop),
        Err(e) => Err(e),
    };
    match publish(payload.clone()).await {
        Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
            let replicas = match js.get_stream(format!("KV_{records_bucket}")).await {
                Ok(records) => records.cached_info().config.num_replicas,
                Err(_) => 1,
            };
            js.get_or_create_stream(status_bucket_config(&bucket, replicas))
                .await
                .map_err(|e| BackendError::Request(format!("status bucket {bucket}: {e}")))?;
            publish(payload).await.map_err(request_err)
        }
        other => other.map_err(request_err),
    }
}

/// JetStream: removes `worker`'s status (a delete marker, gone with the bucket's `max_age`).
pub(super) async fn delete_status(
    js: &jetstream::Context,
    records_bucket: &str,
    worker: &str,
) -> Result<(), BackendError> {
    if !WorkerStatus::valid_id(worker) {
        return Ok(());
    }
    let subject = format!("$KV.{}.{worker}", status_bucket_name(records_bucket));
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("KV-Operation", "DEL");
    match js
        .publish_with_headers(subject, headers, Bytes::new())
        .await
    {
        Ok(ack) => ack.await.map(drop),
        Err(e) => Err(e),
    }
    .or_else(|e| {
        if e.kind() == PublishErrorKind::StreamNotFound {
            Ok(())
        } else {
            Err(request_err(e))
        }
    })
}

/// JetStream: the fresh statuses of the status bucket of `records_bucket` (none while the
/// bucket does not exist: no worker announced yet).
pub(super) async fn read_statuses(
    js: &jetstream::Context,
    records_bucket: &str,
) -> Result<Vec<WorkerStatus>, BackendError> {
    use async_nats::jetstream::context::GetStreamErrorKind;
    let bucket = status_bucket_name(records_bucket);
    let stream = match js.get_stream(format!("KV_{bucket}")).await {
        Ok(stream) => stream,
        Err(e) => {
            return match e.kind() {
                GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    Ok(Vec::new())
                }
                _ => Err(request_err(e)),
            };
        }
    };
    let mut subjects = stream
        .info_with_subjects(format!("$KV.{bucket}.>"))
        .await
        .map_err(request_err)?;
    let mut keys = Vec::new();
    while let Some(item) = subjects.next().await {
        keys.push(item.map_err(request_err)?.0);
    }
    let now = crate::clock::unix_nanos_now();
    let mut out = Vec::new();
    for subject in keys {
        // A key deleted or aged out in between is simply not there.
        let Ok(message) = stream.get_last_raw_message_by_subject(&subject).await else {
            continue;
        };
        // A delete marker has no payload; a value that does not parse is not a status.
        if let Ok(status) = serde_json::from_slice::<WorkerStatus>(&message.payload)
            && status.is_fresh(now)
        {
            out.push(status);
        }
    }
    out.sort_by(|a, b| a.worker.cmp(&b.worker));
    Ok(out)
}

/// JetStream: the lanes of the worker group `group` (consumers named
/// [`Lane::consumer_name`]) with each one's calls waiting and delivered, from one listing of
/// `stream`'s consumers.
pub(super) async fn group_lanes<I>(
    stream: &jetstream::stream::Stream<I>,
    prefix: &str,
    group: &str,
) -> Result<Vec<(Lane, u64, u64)>, BackendError> {
    let name_prefix = format!("{group}_");
    let mut out = Vec::new();
    let mut list = stream.consumers();
    while let Some(info) = list.next().await {
        let info = info.map_err(request_err)?;
        if !info.name.starts_with(&name_prefix) {
            continue;
        }
        let lane = info
            .config
            .filter_subjects
            .first()
            .or(Some(&info.config.filter_subject))
            .and_then(|f| Lane::of_subject(prefix, f));
        if let Some(lane) = lane
            && lane.consumer_name(group) == info.name
        {
            out.push((lane, info.num_pending, info.num_ack_pending as u64));
        }
    }
    Ok(out)
}

/// JetStream: the lanes of the worker group `group` with their consumers' counts, from one
/// listing of the calls stream's consumers.
pub(super) async fn lane_consumers(
    js: &jetstream::Context,
    stream_name: &str,
    prefix: &str,
    group: &str,
) -> Result<Vec<LaneStats>, BackendError> {
    let stream = js
        .get_stream_no_info(stream_name)
        .await
        .map_err(request_err)?;
    let mut out: Vec<LaneStats> = group_lanes(&stream, prefix, group)
        .await?
        .into_iter()
        .map(|(lane, waiting, delivered)| LaneStats::of(&lane, group, waiting, delivered))
        .collect();
    out.sort_by(|a, b| (&a.function, a.priority).cmp(&(&b.function, b.priority)));
    Ok(out)
}

/// JetStream: the scheduled calls per function, from the subjects of the delayed stream.
pub(super) async fn scheduled_subjects(
    js: &jetstream::Context,
    stream_name: &str,
    prefix: &str,
) -> Result<Vec<FunctionScheduled>, BackendError> {
    let delayed = super::nats::delayed_stream_name(stream_name);
    let delayed_prefix = super::nats::delayed_subject_prefix(prefix);
    // A stream set up by an older gateway has no scheduled calls' stream: none scheduled.
    let Ok(stream) = js.get_stream(&delayed).await else {
        return Ok(Vec::new());
    };
    let mut subjects = stream
        .info_with_subjects(format!("{delayed_prefix}.>"))
        .await
        .map_err(request_err)?;
    let mut counts = Vec::new();
    while let Some(item) = subjects.next().await {
        let (subject, count) = item.map_err(request_err)?;
        if let Some(function) = super::function_of_subject(&delayed_prefix, &subject) {
            counts.push((function, count as u64));
        }
    }
    Ok(scheduled_rows(counts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(at: u64, interval: f64) -> WorkerStatus {
        WorkerStatus {
            worker: "host-1-0".into(),
            hostname: "host".into(),
            consumer: "w".into(),
            max_inflight: 10,
            in_flight: 0,
            fair_scheduling: false,
            adaptive_concurrency: true,
            interval_seconds: interval,
            announced_at_unix_nanos: at,
            functions: Vec::new(),
            functions_omitted: 0,
        }
    }

    #[test]
    fn a_status_is_fresh_for_three_intervals_within_the_ttl() {
        let s = 1_000_000_000_000;
        let fresh = status(s, 5.0);
        assert!(fresh.is_fresh(s));
        assert!(fresh.is_fresh(s + 15 * 1_000_000_000));
        assert!(!fresh.is_fresh(s + 16 * 1_000_000_000));
        let short = status(s, 0.1);
        assert!(short.is_fresh(s + 900_000_000), "at least a second");
        assert!(!short.is_fresh(s + 1_100_000_000));
        let odd = status(s, f64::NAN);
        assert!(odd.is_fresh(s + 59 * 1_000_000_000));
        assert!(!odd.is_fresh(s + 61 * 1_000_000_000));
        assert!(status(s + 10, 5.0).is_fresh(s), "a clock a little ahead");
    }

    #[test]
    fn ids_are_bucket_keys() {
        assert!(WorkerStatus::valid_id("worker-0_a"));
        for bad in ["", "a.b", "a b", "a*", ">", "ü"] {
            assert!(!WorkerStatus::valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn scheduled_rows_sum_per_function() {
        let rows = scheduled_rows([
            ("b".to_owned(), 1),
            ("a.team".to_owned(), 2),
            ("b".to_owned(), 1),
            ("c".to_owned(), 0),
        ]);
        assert_eq!(
            rows,
            vec![
                FunctionScheduled {
                    function: "a.team".into(),
                    scheduled: 2
                },
                FunctionScheduled {
                    function: "b".into(),
                    scheduled: 2
                },
            ]
        );
    }
}
