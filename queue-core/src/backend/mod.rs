//! The queue contract: what the gateway and the workers need from a queue, and its two
//! implementations.
//!
//! - [`jetstream::JetStreamQueue`]: NATS JetStream, the production and distributed backend.
//! - [`embedded::EmbeddedQueue`]: a crash-safe queue on local disk (sled) for a single node.
//!
//! Both keep the same semantics, checked by one conformance suite
//! (`queue-worker/tests/conformance.rs`) that runs every case against each backend:
//! - a publish is durable before it returns, and is deduplicated by call id within a window;
//! - a delivery carries its attempt number (1 for the first delivery);
//! - ack removes a call; a nak offers it again, after an optional delay; an in-progress signal
//!   restarts the ack clock; terminate drops it without redelivery;
//! - a delivery neither acked nor nakked is offered again once the ack wait has passed;
//! - dead letters keep the original message with what is known about the failure, and can be
//!   listed, replayed onto the queue and purged;
//! - a call published with a not-before time (`CallMeta::not_before_unix_nanos`) is
//!   *scheduled*: durable at once, never delivered by `pull` before its time, delivered as a
//!   first attempt after it. A backend either schedules it itself (embedded) or holds it apart
//!   ([`CallQueue::holds_scheduled_apart`], JetStream's delayed stream) for a worker's
//!   scheduler to take ([`CallQueue::pull_scheduled`]) and move onto the queue when due
//!   ([`CallQueue::release_scheduled`]).

#[cfg(feature = "embedded")]
pub mod embedded;
pub mod jetstream;
mod lanes;
pub mod nats;
mod owned;
pub mod status;

pub use status::{FunctionConcurrency, FunctionScheduled, LaneStats, WorkerStatus};

pub use lanes::{Lane, NO_ID_TOKEN, announce_prefix};

pub use owned::{OwnedRecord, apply_event};

pub use nats::HEADER_ALLOWANCE;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use serde::Serialize;

use crate::message::{EnvelopeSummary, QueuedCall};
use crate::records::{CallRecord, OutcomeEvent, StoredResult};

/// Errors of queue operations other than publishing.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Setting up NATS, the streams or the consumer failed.
    #[error(transparent)]
    JetStream(#[from] QueueError),
    /// A request to the queue failed or timed out.
    #[error("queue request failed: {0}")]
    Request(String),
    /// The embedded queue's storage failed.
    #[error("embedded queue storage: {0}")]
    Storage(String),
    /// A record could not be encoded.
    #[error("cannot encode a record: {0}")]
    Encode(#[from] serde_json::Error),
    /// A stored record could not be read back.
    #[error("corrupt queue record {key}: {detail}")]
    Corrupt {
        /// Which record.
        key: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A stored value is encrypted and does not open here (no or other keys, altered).
    #[error("cannot decrypt a stored value: {0}")]
    Sealed(#[from] crate::sealing::OpenError),
    /// A dead letter has no subject to replay to.
    #[error("dead letter {0} has no Dead-Letter-Subject; it cannot be replayed")]
    NoSubject(u64),
}

/// Errors talking to NATS.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Could not connect.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// URL used.
        url: String,
        /// Cause.
        #[source]
        source: async_nats::ConnectError,
    },
    /// Stream create/update/lookup failed.
    #[error("stream {name}: {message}")]
    Stream {
        /// Stream name.
        name: String,
        /// What went wrong.
        message: String,
    },
    /// Consumer create/lookup failed.
    #[error("consumer {name}: {message}")]
    Consumer {
        /// Consumer name.
        name: String,
        /// What went wrong.
        message: String,
    },
    /// The server is older than the oldest this system runs on.
    #[error("NATS at {url}: {message}")]
    UnsupportedServer {
        /// URL used.
        url: String,
        /// The server's version and the minimum.
        message: String,
    },
}

/// The version of a stored call record that a writer last saw (a key-value revision in
/// JetStream, a counter in the embedded queue). [`NOT_STORED`] is the revision of a record
/// nobody wrote yet.
pub type Revision = u64;

/// The revision of a call's record that is not stored yet: the record of a call the gateway
/// queued without writing one ([`CallQueue::finds_queued_calls`]), as [`CallRecords::record_entry`]
/// rebuilds it from the queued message. Writing at it creates the record, as `None` does.
pub const NOT_STORED: Revision = 0;

/// A stored record as [`CallRecords::record_entry`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordEntry {
    /// The record.
    pub record: CallRecord,
    /// Its revision.
    pub revision: Revision,
    /// The kept result the record's value carries (encoded as by
    /// [`StoredResult::encode_parts`], opened), where the backend keeps small results inside
    /// the record; `None` otherwise.
    pub inline_result: Option<Bytes>,
}

/// Why a compare-and-set write of a record did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RecordWriteError {
    /// The record changed since it was read (or exists where none was expected).
    #[error("the call record changed since it was read")]
    Conflict,
    /// The backend failed or did not answer; not a conflict, so not worth re-reading.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Why a publish did not store the call.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Not connected to the queue right now.
    #[error("not connected to NATS")]
    Disconnected,
    /// The envelope is larger than the queue accepts.
    #[error("message of {size} bytes exceeds the queue's limit of {max} bytes")]
    TooLarge {
        /// Envelope size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The queue refused it or did not answer: full, missing, timed out, disk error.
    #[error("the queue did not store the call: {0}")]
    NotStored(String),
    /// Could not encode the envelope.
    #[error("cannot encode the call: {0}")]
    Encode(#[from] serde_json::Error),
}

/// A stored publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The call id was published before, within the duplicate window: nothing new was stored.
    pub duplicate: bool,
}

/// Call records and kept results (see [`crate::records`]), stored beside the queue: in a
/// JetStream key-value bucket, or in the embedded queue's database.
pub trait CallRecords: Send + Sync + 'static {
    /// The record of a call, if it is known (and not expired).
    fn record(
        &self,
        call_id: &str,
    ) -> impl Future<Output = Result<Option<CallRecord>, BackendError>> + Send;

    /// The record of a call with its revision, for a compare-and-set write, and the kept
    /// result it carries when the backend keeps small results inside the record
    /// ([`CallRecords::inline_result_bytes`]): a writer writes that result back with the record.
    fn record_entry(
        &self,
        call_id: &str,
    ) -> impl Future<Output = Result<Option<RecordEntry>, BackendError>> + Send;

    /// Writes `record` if the stored record is still at `expected` (`None` or [`NOT_STORED`]:
    /// only if there is none), and returns its new revision. With `result` (as encoded by
    /// [`StoredResult::encode_parts`], measured against [`CallRecords::max_result_bytes`] by
    /// the caller), the result is kept first, in the same round trip where the backend can:
    /// a reader that sees the record say `stored` finds the result.
    ///
    /// [`RecordWriteError::Conflict`] means another writer was first (read again, re-apply);
    /// any other failure is [`RecordWriteError::Backend`], never retried as a conflict.
    fn write_record(
        &self,
        call_id: &str,
        expected: Option<Revision>,
        record: &CallRecord,
        result: Option<Bytes>,
    ) -> impl Future<Output = Result<Revision, RecordWriteError>> + Send;

    /// Removes a call's record (its call could not be queued after all).
    fn delete_record(&self, call_id: &str)
    -> impl Future<Output = Result<(), BackendError>> + Send;

    /// A kept final response.
    fn result(
        &self,
        call_id: &str,
    ) -> impl Future<Output = Result<Option<StoredResult>, BackendError>> + Send;

    /// Largest encoded response kept; larger ones are reported as too large.
    fn max_result_bytes(&self) -> usize;

    /// Largest response body kept in the blob store (`--max-result-bytes` as configured, not
    /// lowered to the message limit: the record holds only the blob's reference).
    fn max_stored_result_bytes(&self) -> u64;

    /// Largest encoded result this backend keeps inside the record's own value (one store for
    /// both; `0`: results are always kept beside the record). A record that carries its result
    /// must be written back with it: [`apply_event`] does so.
    fn inline_result_bytes(&self) -> usize {
        0
    }

    /// This queue's encryption at rest: it seals what it publishes and the results it keeps,
    /// and opens them when read; deliveries are opened by their reader with it
    /// ([`QueuedCall::open`]).
    fn sealing(&self) -> &crate::sealing::Sealing;

    /// Claims `key` (from [`crate::records::idempotency_key`]) for `call_id`, for the records
    /// retention. Returns the call id that already holds it, if another call claimed it first.
    fn claim_idempotency_key(
        &self,
        key: &str,
        call_id: &str,
    ) -> impl Future<Output = Result<Option<String>, BackendError>> + Send;

    /// Gives up a claim (the call it was for could not be queued).
    fn release_idempotency_key(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Tells every worker that `call_id` was cancelled (best effort; workers also see it in
    /// the record before and after each attempt).
    fn announce_cancel(
        &self,
        call_id: &str,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Tells the gateways a call finished (best effort, for live statistics).
    fn announce_outcome(&self, event: &OutcomeEvent) -> impl Future<Output = ()> + Send;

    /// Outcomes announced from now on.
    fn outcomes(
        &self,
    ) -> impl Future<Output = Result<BoxStream<'static, OutcomeEvent>, BackendError>> + Send;

    /// Functions whose calls are held (paused).
    fn paused_functions(&self) -> impl Future<Output = Result<Vec<String>, BackendError>> + Send;

    /// The paused functions now and after every change, for a cache that saves a read per
    /// call. The stream ends if the backend loses track (the caller subscribes again).
    fn paused_updates(
        &self,
    ) -> impl Future<Output = Result<BoxStream<'static, Vec<String>>, BackendError>> + Send;

    /// Pauses or resumes a function's calls; returns the paused functions.
    fn set_paused(
        &self,
        function: &str,
        paused: bool,
    ) -> impl Future<Output = Result<Vec<String>, BackendError>> + Send;

    /// Call ids announced as cancelled from now on.
    fn cancellations(
        &self,
    ) -> impl Future<Output = Result<BoxStream<'static, String>, BackendError>> + Send;

    /// Announces one worker's status, replacing the one it announced before (a worker calls
    /// it every `--status-interval`, off the path of any call). Kept a short while only
    /// ([`status`]): a worker that stops announcing drops out of
    /// [`CallRecords::worker_statuses`].
    fn announce_worker_status(
        &self,
        status: &WorkerStatus,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        let _ = status;
        async { Ok(()) }
    }

    /// Forgets the status of `worker` (it stops).
    fn withdraw_worker_status(
        &self,
        worker: &str,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        let _ = worker;
        async { Ok(()) }
    }

    /// The statuses of the workers that announced one recently
    /// ([`WorkerStatus::is_fresh`]), by worker id.
    fn worker_statuses(
        &self,
    ) -> impl Future<Output = Result<Vec<WorkerStatus>, BackendError>> + Send {
        async { Ok(Vec::new()) }
    }
}

/// A queue the gateway publishes into and workers pull from, with its call records.
///
/// Methods return `Send` futures so that the gateway and the worker can run them on any tokio
/// worker thread.
pub trait CallQueue: CallRecords {
    /// One delivery of one queued message.
    type Delivery: QueueDelivery;

    /// Stores a call; `Ok` means it is durable. A call id seen within the duplicate window is
    /// not stored again (`duplicate: true`).
    fn publish(
        &self,
        call: &QueuedCall,
    ) -> impl Future<Output = Result<Published, PublishError>> + Send;

    /// Largest envelope (metadata and body) the queue takes now.
    fn max_message_bytes(&self) -> usize;

    /// How long a publish with the same call id is stored once.
    fn duplicate_window(&self) -> Duration;

    /// Whether this queue finds a queued call by its id (a generated one, see
    /// [`is_subject_token`]) until a worker takes it, so that the gateway need not write a
    /// record when it accepts such a call: [`CallRecords::record_entry`] then answers the
    /// call's `queued` record, rebuilt from the queued message, at [`NOT_STORED`], and the
    /// first writer (the worker starting it, or a cancel) creates it. A worker writes the
    /// record before it acknowledges the message, so a reader that looks in the records,
    /// then in the queue, then in the records again never misses a call that exists.
    fn finds_queued_calls(&self) -> bool {
        false
    }

    /// Whether publishes can succeed now (for `/readyz`); the error says why not.
    fn check_ready(&self) -> impl Future<Output = Result<(), String>> + Send;

    /// Asks for at most `max` deliveries. The stream yields each as soon as it is available and
    /// ends after `max` deliveries or when `expires` has passed.
    fn pull(
        &self,
        max: usize,
        expires: Duration,
    ) -> impl Future<
        Output = Result<BoxStream<'static, Result<Self::Delivery, BackendError>>, BackendError>,
    > + Send;

    /// Stores a message, untouched, as a dead letter with what is known about it. Storing the
    /// same delivery's message twice (a crash in between) keeps one dead letter.
    fn dead_letter(
        &self,
        payload: Bytes,
        letter: &DeadLetter<'_>,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;

    /// The dead letters, oldest first.
    fn dead_letters(
        &self,
    ) -> impl Future<Output = Result<Vec<DeadLetterEntry>, BackendError>> + Send;

    /// Puts the selected dead letters (every one with `all`) back on the queue with their call
    /// ids, and removes them from the dead letters. Returns the replayed entries.
    fn replay_dead_letters(
        &self,
        selectors: &[DeadLetterSelector],
        all: bool,
    ) -> impl Future<Output = Result<Vec<DeadLetterEntry>, BackendError>> + Send;

    /// Deletes the selected dead letters (every one with `all`: those there when the purge
    /// began). Returns the deleted entries (their calls' stored bodies are the caller's to
    /// delete, [`crate::blobs::delete_call_blobs`]).
    fn purge_dead_letters(
        &self,
        selectors: &[DeadLetterSelector],
        all: bool,
    ) -> impl Future<Output = Result<Vec<DeadLetterEntry>, BackendError>> + Send;

    /// Calls queued per function, with the age of the oldest.
    fn function_stats(
        &self,
    ) -> impl Future<Output = Result<Vec<FunctionQueueStats>, BackendError>> + Send;

    /// How many calls are queued, delivered and unacknowledged, and dead-lettered now.
    fn stats(&self) -> impl Future<Output = Result<QueueStats, BackendError>> + Send;

    /// Makes what the process buffered (acks, writes) durable before it exits. Bounded in time.
    fn flush_before_exit(&self) -> impl Future<Output = ()> + Send;

    /// Whether scheduled calls are held apart from the queue until a scheduler moves them
    /// ([`CallQueue::pull_scheduled`], [`CallQueue::release_scheduled`]). `false`: the queue
    /// schedules them itself and `pull` offers them at their time.
    fn holds_scheduled_apart(&self) -> bool {
        false
    }

    /// Asks for at most `max` of the scheduled calls held apart, as [`CallQueue::pull`] does
    /// for the queue: each delivery is a scheduled call, early or due. The scheduler naks an
    /// early one with the time left (such redeliveries are not attempts of the call) and
    /// releases a due one. A queue that holds none apart yields nothing until `expires`.
    fn pull_scheduled(
        &self,
        max: usize,
        expires: Duration,
    ) -> impl Future<
        Output = Result<BoxStream<'static, Result<Self::Delivery, BackendError>>, BackendError>,
    > + Send {
        let _ = max;
        async move {
            tokio::time::sleep(expires).await;
            Ok(futures::stream::empty().boxed())
        }
    }

    /// Puts a due scheduled call (a delivery of [`CallQueue::pull_scheduled`], whose call id is
    /// `call_id`) on the queue, as published, deduplicated by its call id so a release repeated
    /// after a crash stores it once. The caller acks the scheduled delivery afterwards.
    fn release_scheduled(
        &self,
        delivery: &Self::Delivery,
        call_id: &str,
    ) -> impl Future<Output = Result<Published, PublishError>> + Send {
        let _ = (delivery, call_id);
        async {
            Err(PublishError::NotStored(
                "this queue holds no scheduled calls apart".into(),
            ))
        }
    }

    /// Whether this queue can be pulled lane by lane ([`CallQueue::pull_lane`]), for fair
    /// scheduling. A worker that pulls by lane never uses [`CallQueue::pull`] (and the other
    /// way round): the two consumer layouts exclude each other, and the first pull of one
    /// removes the other's consumers (their calls stay queued).
    fn pulls_by_lane(&self) -> bool {
        false
    }

    /// Lanes that just got a call, announced by the publishers. Best effort: an announcement
    /// can be missed (a reconnect), so a worker also takes a [`CallQueue::lane_census`] now
    /// and then.
    fn lane_announcements(
        &self,
    ) -> impl Future<Output = Result<BoxStream<'static, Lane>, BackendError>> + Send {
        async { Ok(futures::stream::pending().boxed()) }
    }

    /// Every lane that holds queued calls, with how many, read off the queue itself: costly
    /// (it lists the queue's subjects), so taken at start and when a census finds calls that
    /// no known lane accounts for.
    fn waiting_lanes(&self) -> impl Future<Output = Result<Vec<(Lane, u64)>, BackendError>> + Send {
        async { Ok(Vec::new()) }
    }

    /// The lanes the workers' consumers know, and how many queued calls none of them accounts
    /// for (a lane no worker has heard of yet). Cheap: one listing of the consumers.
    fn lane_census(&self) -> impl Future<Output = Result<LaneCensus, BackendError>> + Send {
        async { Ok(LaneCensus::default()) }
    }

    /// The lanes the worker group `group` pulls by ([`CallQueue::pulls_by_lane`]) with the
    /// calls each holds, as the lanes' consumers count them (one listing of the consumers; a
    /// lane no worker pulled yet has none and is not listed). Empty for a queue not pulled by
    /// lanes.
    fn lane_stats(
        &self,
        group: &str,
    ) -> impl Future<Output = Result<Vec<LaneStats>, BackendError>> + Send {
        let _ = group;
        async { Ok(Vec::new()) }
    }

    /// Scheduled calls whose time has not come, per function (those [`QueueStats::scheduled`]
    /// counts).
    fn scheduled_stats(
        &self,
    ) -> impl Future<Output = Result<Vec<FunctionScheduled>, BackendError>> + Send {
        async { Ok(Vec::new()) }
    }

    /// Asks one lane for at most `max` deliveries and answers with those available now (an
    /// empty stream when the lane has none). Only for a queue that [`CallQueue::pulls_by_lane`].
    fn pull_lane(
        &self,
        lane: &Lane,
        max: usize,
    ) -> impl Future<
        Output = Result<BoxStream<'static, Result<Self::Delivery, BackendError>>, BackendError>,
    > + Send {
        let _ = (lane, max);
        async {
            Err(BackendError::Request(
                "this queue is not pulled by lanes (fair scheduling needs JetStream)".into(),
            ))
        }
    }
}

/// What [`CallQueue::lane_census`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaneCensus {
    /// The lanes with a consumer, with their calls.
    pub lanes: Vec<LaneCount>,
    /// Queued calls that no lane's consumer accounts for (waiting, or delivered and not acked).
    pub unaccounted: u64,
}

/// One lane of a [`LaneCensus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneCount {
    /// The lane.
    pub lane: Lane,
    /// Calls not delivered yet.
    pub waiting: u64,
    /// Calls delivered and not acknowledged (running, or to be delivered again).
    pub delivered: u64,
}

/// A snapshot of the queue.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct QueueStats {
    /// Calls stored and not acknowledged (waiting or being handled).
    pub pending: u64,
    /// Of those, delivered to a worker and not yet acknowledged.
    pub unacked: u64,
    /// Consumers (worker groups) reading the queue.
    pub consumers: u64,
    /// Dead letters kept.
    pub dead_letters: u64,
    /// Scheduled calls whose time has not come (not in `pending`).
    pub scheduled: u64,
    /// Age of the oldest call stored and not acknowledged, in seconds (0 when none is).
    pub oldest_age_seconds: f64,
}

/// Calls queued for one function.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionQueueStats {
    /// `name` or `name.namespace`.
    pub function: String,
    /// Calls stored and not acknowledged.
    pub pending: u64,
    /// Age of the oldest of them.
    pub oldest_age_seconds: f64,
}

/// The function (`name` or `name.namespace`) a subject `<prefix>.<namespace or _>.<name>`,
/// or `<prefix>.<namespace or _>.<name>.<call id>` ([`call_subject_with_id`]), is for.
pub fn function_of_subject(prefix: &str, subject: &str) -> Option<String> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let (namespace, rest) = rest.split_once('.')?;
    // Names are DNS labels (no dots): what follows the name's token is the call's id.
    let name = rest.split_once('.').map_or(rest, |(name, _)| name);
    Some(if namespace == "_" {
        name.to_owned()
    } else {
        format!("{name}.{namespace}")
    })
}

/// The subject filter that matches `subject`'s function's calls queued the same way: `subject`
/// itself for `<prefix>.<namespace>.<name>`, `<prefix>.<namespace>.<name>.>` for a subject with
/// a call id (and maybe a priority).
pub fn function_filter_of_subject(prefix: &str, subject: &str) -> Option<String> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let (namespace, rest) = rest.split_once('.')?;
    Some(match rest.split_once('.') {
        None => subject.to_owned(),
        Some((name, _)) => format!("{prefix}.{namespace}.{name}.>"),
    })
}

/// One delivery of a queued message to a worker.
pub trait QueueDelivery: Clone + Send + Sync + 'static {
    /// The message as published.
    fn payload(&self) -> &Bytes;
    /// Where it was queued (`<prefix>.<namespace>.<function>`); replays go back there.
    fn subject(&self) -> &str;
    /// How many calls the consumer still had waiting when it delivered this one, where the
    /// queue says (a fair worker learns from it that a lane is drained).
    fn pending(&self) -> Option<u64> {
        None
    }
    /// The message's position in the queue; unique while it is queued.
    fn sequence(&self) -> u64;
    /// Which delivery this is: 1 for the first, counting deliveries lost to crashed workers.
    fn attempt(&self) -> u32;
    /// Done: the message is removed.
    fn ack(&self) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Offer the message again, after `delay` (immediately with `None`).
    fn nak(&self, delay: Option<Duration>)
    -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Still working on it: restart the ack-wait clock.
    fn in_progress(&self) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Never deliver this message again.
    fn terminate(&self) -> impl Future<Output = Result<(), BackendError>> + Send;
}

/// Why a message is being dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// The payload is not a valid envelope.
    Undecodable,
    /// The function kept failing with retryable errors until no attempts were left.
    RetriesExhausted,
    /// The call was older than its maximum age before it could run.
    Expired,
    /// The function ran but its callback could not be delivered.
    CallbackFailed,
    /// The function ran but the callback policy refused its callback's destination.
    CallbackRefused,
    /// The call is encrypted and does not open with this worker's keys (missing, other,
    /// or altered); replay it once the keys are in place.
    Undecryptable,
}

impl DeadLetterReason {
    /// Stable name used in headers and subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Undecodable => "undecodable",
            Self::RetriesExhausted => "retries_exhausted",
            Self::Expired => "expired",
            Self::CallbackFailed => "callback_failed",
            Self::CallbackRefused => "callback_refused",
            Self::Undecryptable => "undecryptable",
        }
    }
}

/// Names of what a dead letter records (NATS headers in JetStream, fields in the embedded queue).
pub mod dead_letter_headers {
    /// Why (`undecodable`, `retries_exhausted`, `expired`, `callback_failed`,
    /// `callback_refused`, `undecryptable`).
    pub const REASON: &str = "Dead-Letter-Reason";
    /// Subject the call was queued on (replay publishes there again).
    pub const SUBJECT: &str = "Dead-Letter-Subject";
    /// Data-free explanation.
    pub const DETAIL: &str = "Dead-Letter-Detail";
    /// When it was dead-lettered, Unix nanoseconds.
    pub const TIME: &str = "Dead-Letter-Time";
    /// The function's last status, when there was an attempt.
    pub const LAST_STATUS: &str = "Dead-Letter-Last-Status";
    /// Function invocations made.
    pub const ATTEMPTS: &str = "Dead-Letter-Attempts";
    /// The call id, when the message could be decoded.
    pub const CALL_ID: &str = "Dead-Letter-Call-Id";
    /// When the gateway accepted the call, Unix nanoseconds.
    pub const RECEIVED: &str = "Dead-Letter-Received-Time";
}

/// What is known about a message being dead-lettered.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    /// Why.
    pub reason: DeadLetterReason,
    /// Data-free explanation.
    pub detail: &'a str,
    /// Subject the message came from.
    pub original_subject: &'a str,
    /// Its queue sequence (makes dead-lettering idempotent).
    pub stream_sequence: u64,
    /// Call id, if decoded.
    pub call_id: Option<&'a str>,
    /// Accepted at, if decoded.
    pub received_at_unix_nanos: Option<u64>,
    /// The function's last status, if it ran.
    pub last_status: Option<u16>,
    /// Invocations made.
    pub attempts: u32,
}

impl DeadLetter<'_> {
    /// The record as name/value pairs (see [`dead_letter_headers`]), the form both backends
    /// store. Values are single-line.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        use dead_letter_headers as h;
        // Header values cannot hold newlines; the detail is an error message we produced.
        let detail: String = self
            .detail
            .chars()
            .filter(|c| !c.is_control())
            .take(512)
            .collect();
        let mut fields = vec![
            (h::REASON, self.reason.as_str().to_owned()),
            (h::SUBJECT, self.original_subject.to_owned()),
            (h::DETAIL, detail),
            (h::TIME, crate::clock::unix_nanos_now().to_string()),
            (h::ATTEMPTS, self.attempts.to_string()),
        ];
        if let Some(status) = self.last_status {
            fields.push((h::LAST_STATUS, status.to_string()));
        }
        if let Some(id) = self.call_id {
            fields.push((h::CALL_ID, id.to_owned()));
        }
        if let Some(at) = self.received_at_unix_nanos {
            fields.push((h::RECEIVED, at.to_string()));
        }
        fields
    }
}

/// One dead letter, as listed. Never holds the call's body or header values, which may be
/// confidential.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeadLetterEntry {
    /// Its sequence among the dead letters (what `show`, `replay` and `purge` take).
    pub sequence: u64,
    /// The call's id, if the message could be decoded.
    pub call_id: Option<String>,
    /// `name` or `name.namespace`, if decoded.
    pub function: Option<String>,
    /// Why it was dead-lettered.
    pub reason: String,
    /// Data-free explanation.
    pub detail: String,
    /// The function's last status, if it ran.
    pub last_status: Option<u16>,
    /// Function invocations made.
    pub attempts: u32,
    /// Subject the call was queued on.
    pub subject: String,
    /// When it was dead-lettered (Unix nanoseconds).
    pub dead_lettered_at_unix_nanos: Option<u64>,
    /// When the gateway accepted the call (Unix nanoseconds), if decoded.
    pub received_at_unix_nanos: Option<u64>,
    /// Request body size, if decoded.
    pub body_bytes: Option<usize>,
}

impl DeadLetterEntry {
    /// Builds the entry from a stored dead letter: its sequence, a lookup of its recorded
    /// fields, and the original message.
    pub fn from_stored<'a>(
        sequence: u64,
        field: impl Fn(&str) -> Option<&'a str>,
        payload: &Bytes,
    ) -> Self {
        use dead_letter_headers as h;
        let call = EnvelopeSummary::of(payload).ok();
        Self {
            sequence,
            call_id: call
                .as_ref()
                .map(|c| c.call_id.clone())
                .or_else(|| field(h::CALL_ID).map(str::to_owned)),
            function: call.as_ref().map(|c| c.function.clone()),
            reason: field(h::REASON).unwrap_or("unknown").to_owned(),
            detail: field(h::DETAIL).unwrap_or_default().to_owned(),
            last_status: field(h::LAST_STATUS).and_then(|v| v.parse().ok()),
            attempts: field(h::ATTEMPTS).and_then(|v| v.parse().ok()).unwrap_or(0),
            subject: field(h::SUBJECT).unwrap_or_default().to_owned(),
            dead_lettered_at_unix_nanos: field(h::TIME).and_then(|v| v.parse().ok()),
            received_at_unix_nanos: call.as_ref().map(|c| c.received_at_unix_nanos),
            body_bytes: call
                .as_ref()
                .and_then(|c| usize::try_from(c.body_bytes).ok()),
        }
    }

    /// Does `selector` name this entry? A sequence selects by sequence only, a call id by call
    /// id only: the call id `30` never selects dead letter 30.
    pub fn matches(&self, selector: &DeadLetterSelector) -> bool {
        match selector {
            DeadLetterSelector::Sequence(sequence) => *sequence == self.sequence,
            DeadLetterSelector::CallId(id) => self.call_id.as_deref() == Some(id.as_str()),
        }
    }

    /// Is this entry selected by `selectors`, or by `all`?
    pub fn selected(&self, selectors: &[DeadLetterSelector], all: bool) -> bool {
        all || selectors.iter().any(|s| self.matches(s))
    }
}

/// Names one dead letter, by one typed field: its sequence among the dead letters, or the id
/// of its call. The two are never guessed from one string (call ids may be digits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterSelector {
    /// The dead letter's sequence.
    Sequence(u64),
    /// The dead-lettered call's id.
    CallId(String),
}

/// The subject a call is queued on: `<prefix>.<namespace or _>.<function>`. One token per
/// namespace and function leaves room for per-function consumers (filter subjects).
pub fn call_subject(prefix: &str, call: &QueuedCall) -> String {
    let ns = call.meta.namespace.as_deref().unwrap_or("_");
    format!("{prefix}.{ns}.{}", call.meta.function)
}

/// Whether a call id can be a subject token (letters, digits, `-` and `_`): a generated id
/// always can; a client's own id may hold `.`, `*` or `>`.
pub fn is_subject_token(call_id: &str) -> bool {
    !call_id.is_empty()
        && call_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The subject a call is queued on where the queue finds queued calls by id
/// ([`CallQueue::finds_queued_calls`]): `<prefix>.<namespace or _>.<name>.<call id>`, or
/// [`call_subject`]'s when the id cannot be a subject token. A call of high or low priority
/// gets the level as one more token (`<prefix>.<ns>.<name>.<call id or _>.high`): its own
/// lane ([`Lane`]).
pub fn call_subject_with_id(prefix: &str, call: &QueuedCall) -> String {
    let mut subject = call_subject(prefix, call);
    let id_token = is_subject_token(&call.meta.call_id);
    let level = call
        .meta
        .overrides
        .priority
        .and_then(crate::message::Priority::subject_token);
    if id_token || level.is_some() {
        subject.push('.');
        subject.push_str(if id_token {
            &call.meta.call_id
        } else {
            NO_ID_TOKEN
        });
    }
    if let Some(level) = level {
        subject.push('.');
        subject.push_str(level);
    }
    subject
}

/// The subject filters that find the queued call `call_id` whatever its function and priority
/// (`<prefix>.*.*.<call id>`, then `<prefix>.*.*.<call id>.*`), if the id can be a subject
/// token.
pub fn queued_call_filters(prefix: &str, call_id: &str) -> Option<[String; 2]> {
    is_subject_token(call_id).then(|| {
        [
            format!("{prefix}.*.*.{call_id}"),
            format!("{prefix}.*.*.{call_id}.*"),
        ]
    })
}

/// Renders the metrics in Prometheus text format, after refreshing the queue gauges from
/// `queue` (an unavailable queue leaves them as they were).
pub async fn render_metrics<Q: CallQueue>(
    handle: &metrics_exporter_prometheus::PrometheusHandle,
    queue: &Q,
) -> String {
    match queue.stats().await {
        Ok(stats) => {
            crate::metrics::set_queue_gauges(
                stats.pending,
                stats.unacked,
                stats.dead_letters,
                stats.oldest_age_seconds,
            );
        }
        Err(e) => tracing::debug!(error = %e, "queue stats unavailable for /metrics"),
    }
    match queue.function_stats().await {
        Ok(functions) => {
            let pending: Vec<(String, u64)> = functions
                .into_iter()
                .map(|f| (f.function, f.pending))
                .collect();
            crate::metrics::set_pending_per_function(&pending);
        }
        Err(e) => tracing::debug!(error = %e, "function stats unavailable for /metrics"),
    }
    handle.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(call_id: &str, namespace: Option<&str>) -> QueuedCall {
        QueuedCall {
            meta: crate::message::CallMeta {
                call_id: call_id.into(),
                function: "stats".into(),
                namespace: namespace.map(str::to_owned),
                method: "POST".into(),
                path: String::new(),
                query: None,
                headers: Vec::new(),
                callback_url: None,
                received_at_unix_nanos: 1,
                body: crate::message::BodyLocation::Inline { len: 0 },
                record_revision: None,
                overrides: Default::default(),
                not_before_unix_nanos: None,
            },
            body: Bytes::new(),
        }
    }

    #[test]
    fn a_subject_token_id_is_in_the_subject_and_found_by_the_filter() {
        let id = "0b5c6a3e-4f0d-4c8e-9a51-3f1f0c2d7e11";
        let subject = call_subject_with_id("faas.a", &call(id, Some("team")));
        assert_eq!(subject, format!("faas.a.team.stats.{id}"));
        assert_eq!(
            function_of_subject("faas.a", &subject).as_deref(),
            Some("stats.team")
        );
        assert_eq!(
            function_filter_of_subject("faas.a", &subject).as_deref(),
            Some("faas.a.team.stats.>")
        );
        assert_eq!(
            queued_call_filters("faas.a", id),
            Some([format!("faas.a.*.*.{id}"), format!("faas.a.*.*.{id}.*")])
        );
    }

    #[test]
    fn an_id_that_cannot_be_a_token_keeps_the_function_subject() {
        for id in ["a.b", "a*", ">", "x y", "ü"] {
            assert!(!is_subject_token(id), "{id}");
            assert_eq!(queued_call_filters("faas", id), None, "{id}");
        }
        let subject = call_subject_with_id("faas", &call("order.42", None));
        assert_eq!(subject, "faas._.stats");
        assert_eq!(
            function_of_subject("faas", &subject).as_deref(),
            Some("stats")
        );
        assert_eq!(
            function_filter_of_subject("faas", &subject).as_deref(),
            Some("faas._.stats")
        );
        assert_eq!(function_of_subject("other", &subject), None);
        assert_eq!(function_of_subject("faas", "faas._"), None);
    }

    #[test]
    fn a_priority_is_a_token_after_the_id_and_its_lane_is_found_again() {
        use crate::message::Priority;
        let id = "0b5c6a3e";
        for (priority, subject) in [
            (None, format!("faas._.stats.{id}")),
            (Some(Priority::Normal), format!("faas._.stats.{id}")),
            (Some(Priority::High), format!("faas._.stats.{id}.high")),
            (Some(Priority::Low), format!("faas._.stats.{id}.low")),
        ] {
            let mut c = call(id, None);
            c.meta.overrides.priority = priority;
            let got = call_subject_with_id("faas", &c);
            assert_eq!(got, subject);
            let lane = Lane::of_subject("faas", &got).expect("a lane");
            assert_eq!(lane.priority, priority.unwrap_or_default());
            assert_eq!(function_of_subject("faas", &got).as_deref(), Some("stats"));
            assert_eq!(
                function_filter_of_subject("faas", &got).as_deref(),
                Some("faas._.stats.>")
            );
        }
        // An id that cannot be a token leaves a placeholder, so the level stays the 5th token.
        let mut c = call("order.42", Some("team"));
        c.meta.overrides.priority = Some(Priority::High);
        let got = call_subject_with_id("faas", &c);
        assert_eq!(got, "faas.team.stats._.high");
        assert_eq!(
            Lane::of_subject("faas", &got).map(|l| l.priority),
            Some(Priority::High)
        );
    }
}
