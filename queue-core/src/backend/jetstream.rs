//! The JetStream backend: calls are messages on a work-queue stream, workers share one durable
//! pull consumer, dead letters go to a second stream. The plumbing (stream and consumer
//! definitions, publish with `Nats-Msg-Id`) is in [`crate::backend::nats`].
//!
//! A queue that manages the streams (the gateway's) creates or updates them in a background
//! task whenever they are not known to be in place: at start, after a publish failed, and after
//! NATS comes back. Publishes never wait for it; until it succeeds they fail and `check_ready`
//! says why.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, kv, message::StreamMessage};
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

use super::DeadLetterSelector;
use super::nats::{self as queue, HEADER_ALLOWANCE};
use super::{
    BackendError, CallQueue, CallRecords, DeadLetter, DeadLetterEntry, Lane, LaneCensus,
    NOT_STORED, OwnedRecord, PublishError, Published, QueueDelivery, QueueError, RecordEntry,
    RecordWriteError, Revision,
};
use crate::message::QueuedCall;
use crate::records::{self, CallRecord, OutcomeEvent, StoredResult};
use crate::sealing::{Purpose, Sealing};
use crate::settings::{NatsArgs, RecordArgs, StreamArgs};

/// The durable consumer a worker pulls from.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// Durable name shared by all workers.
    pub name: String,
    /// Redelivery after this long without an ack or progress signal.
    pub ack_wait: Duration,
    /// Most unacknowledged messages across all workers (per lane when pulling by lanes).
    pub max_ack_pending: i64,
    /// A lane's consumer ([`CallQueue::pull_lane`]) not pulled from for this long is deleted
    /// by the server (its calls stay in the stream; the next pull creates it again).
    pub lane_idle: Duration,
}

/// How to use JetStream.
#[derive(Debug, Clone)]
pub struct JetStreamOptions {
    /// Connection and names.
    pub nats: NatsArgs,
    /// With stream settings: create and update the streams, and check them before publishing
    /// (the gateway does). Without: use the streams as found (workers, admin commands).
    pub manage_streams: Option<StreamArgs>,
    /// The consumer to pull from; `None` for a publish-only queue.
    pub consumer: Option<ConsumerOptions>,
    /// The call-record bucket (created with the streams by the queue that manages them).
    pub records: RecordArgs,
    /// Encryption at rest of queued calls and kept results.
    pub sealing: Sealing,
}

/// The JetStream backend. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct JetStreamQueue {
    client: async_nats::Client,
    js: jetstream::Context,
    options: JetStreamOptions,
    /// The streams and the records bucket were found in place at the last check.
    streams_ready: AtomicBool,
    /// They have been set up at least once since start. Until then publishes are refused
    /// without a round trip; afterwards a failed re-check (a cluster electing a leader) does
    /// not refuse them: each publish's own acknowledgement says whether the call was stored,
    /// so the gateway accepts again the moment the stream does, not at the next re-check.
    streams_seen: AtomicBool,
    /// The server's `max_payload`, read once and refreshed with the streams (0: not known
    /// yet). Requests read this instead of cloning the whole server info each time.
    max_payload: AtomicUsize,
    recheck: Notify,
    consumer: Mutex<Option<PullConsumer>>,
    /// The lanes' consumers bound so far (a lock held for a lookup or an insert only).
    lanes: Arc<std::sync::Mutex<HashMap<Lane, PullConsumer>>>,
    /// The schedulers' consumer on the scheduled calls' stream, bound on first use.
    scheduler: Mutex<Option<PullConsumer>>,
    /// Shared, not cloned per use (a `kv::Store` clone copies the stream's whole info), and set
    /// once: every record operation reads it without taking a lock.
    records: tokio::sync::OnceCell<Arc<kv::Store>>,
}

impl JetStreamQueue {
    /// Connects (waiting for NATS if it is not up yet) and, when managing the streams, starts
    /// keeping them in place until `stop` fires.
    pub async fn connect(
        options: JetStreamOptions,
        client_name: &str,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, BackendError> {
        let client = queue::connect(&options.nats, client_name).await?;
        Ok(Self::with_client(client, options, stop))
    }

    /// Uses an existing connection.
    pub fn with_client(
        client: async_nats::Client,
        options: JetStreamOptions,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let js = queue::jetstream(client.clone(), &options.nats);
        let manage = options.manage_streams.is_some();
        let queue = Arc::new(Self {
            client,
            js,
            options,
            streams_ready: AtomicBool::new(false),
            streams_seen: AtomicBool::new(false),
            max_payload: AtomicUsize::new(0),
            recheck: Notify::new(),
            consumer: Mutex::new(None),
            lanes: Arc::default(),
            scheduler: Mutex::new(None),
            records: tokio::sync::OnceCell::new(),
        });
        if manage {
            tokio::spawn(queue.clone().keep_streams(stop));
        }
        queue
    }

    /// The NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context.
    pub fn context(&self) -> &jetstream::Context {
        &self.js
    }

    /// The server's `max_payload` (cached; looked up while not known yet).
    fn max_payload(&self) -> usize {
        match self.max_payload.load(Ordering::Relaxed) {
            0 => {
                let live = self.client.server_info().max_payload;
                self.max_payload.store(live, Ordering::Relaxed);
                live
            }
            known => known,
        }
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    async fn keep_streams(self: Arc<Self>, stop: CancellationToken) {
        let mut wait = Duration::from_millis(200);
        loop {
            if stop.is_cancelled() {
                return;
            }
            let ok = if self.is_connected() {
                let max_payload = self.client.server_info().max_payload;
                self.max_payload.store(max_payload, Ordering::Relaxed);
                let ensured = match &self.options.manage_streams {
                    Some(settings) => {
                        match queue::ensure_streams(
                            &self.js,
                            &self.options.nats,
                            settings,
                            max_payload,
                        )
                        .await
                        {
                            Ok(()) => self.ensure_records_bucket(settings).await,
                            Err(e) => Err(e),
                        }
                    }
                    None => Ok(()),
                };
                match ensured {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?wait, "cannot set up the streams");
                        false
                    }
                }
            } else {
                false
            };
            let was_ready = self.streams_ready.swap(ok, Ordering::Relaxed);
            if ok {
                self.streams_seen.store(true, Ordering::Relaxed);
            }
            if ok && !was_ready {
                tracing::info!(stream = %self.options.nats.stream, "streams ready");
            }
            let sleep = if ok {
                wait = Duration::from_millis(200);
                // Re-check now and then, and whenever a publish failed.
                Duration::from_secs(30)
            } else {
                let w = wait;
                wait = (wait * 2).min(Duration::from_secs(5));
                w
            };
            tokio::select! {
                () = tokio::time::sleep(sleep) => {}
                () = self.recheck.notified() => {
                    // Debounce a burst of failed publishes.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                () = stop.cancelled() => return,
            }
        }
    }

    async fn bound_consumer(&self) -> Result<PullConsumer, BackendError> {
        let mut slot = self.consumer.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let Some(options) = self.options.consumer.as_ref() else {
            return Err(BackendError::Request(
                "this queue was opened without a consumer".into(),
            ));
        };
        let config = queue::consumer_config(
            &options.name,
            &self.options.nats.subject_prefix,
            options.ack_wait,
            options.max_ack_pending,
        );
        let stream = self
            .js
            .get_stream(&self.options.nats.stream)
            .await
            .map_err(|e| QueueError::Stream {
                name: self.options.nats.stream.clone(),
                message: e.to_string(),
            })?;
        let consumer = match stream.create_consumer(config.clone()).await {
            Err(e) if queue::is_overlapping_consumer(&e) => {
                // Fair workers' lane consumers hold the subjects: go back to the one shared
                // consumer (the lanes' calls stay in the stream and come to it).
                self.delete_lane_consumers(&stream, &options.name).await?;
                stream.create_consumer(config).await
            }
            other => other,
        }
        .map_err(|e| QueueError::Consumer {
            name: options.name.clone(),
            message: e.to_string(),
        })?;
        tracing::info!(consumer = %options.name, "bound to consumer");
        *slot = Some(consumer.clone());
        Ok(consumer)
    }

    fn lane_handles(&self) -> std::sync::MutexGuard<'_, HashMap<Lane, PullConsumer>> {
        // Lookups and inserts only, never held across an await.
        self.lanes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The lane's consumer, created (or updated) on its first pull. Where the shared consumer
    /// of the other layout holds the stream's subjects, it is deleted first: its calls stay in
    /// the stream, and those it had delivered and not seen acked come again to the lanes.
    async fn lane_consumer(&self, lane: &Lane) -> Result<PullConsumer, BackendError> {
        if let Some(consumer) = self.lane_handles().get(lane) {
            return Ok(consumer.clone());
        }
        let Some(options) = self.options.consumer.as_ref() else {
            return Err(BackendError::Request(
                "this queue was opened without a consumer".into(),
            ));
        };
        let version = self.client.server_info().version;
        if !queue::server_has(&version, (2, 10)) {
            return Err(BackendError::Request(format!(
                "fair scheduling needs nats-server 2.10 or later (consumers with several \
                 filter subjects); this one is {version}"
            )));
        }
        let config = queue::lane_consumer_config(
            &options.name,
            &self.options.nats.subject_prefix,
            lane,
            options.ack_wait,
            options.max_ack_pending,
            options.lane_idle,
        );
        let name = lane.consumer_name(&options.name);
        let stream = self
            .js
            .get_stream_no_info(&self.options.nats.stream)
            .await
            .map_err(request_err)?;
        let created = match stream.create_consumer(config.clone()).await {
            Err(e) if queue::is_overlapping_consumer(&e) => {
                tracing::warn!(
                    consumer = %options.name,
                    "the shared consumer holds the stream's subjects; deleting it to pull by \
                     lanes (its calls stay queued)"
                );
                self.unbind().await;
                if let Err(e) = stream.delete_consumer(&options.name).await {
                    tracing::debug!(error = %e, "shared consumer not deleted");
                }
                stream.create_consumer(config).await
            }
            other => other,
        };
        let consumer = created.map_err(|e| QueueError::Consumer {
            name,
            message: e.to_string(),
        })?;
        self.lane_handles().insert(lane.clone(), consumer.clone());
        Ok(consumer)
    }

    /// Deletes the lane consumers of the worker group `group` (`<group>_...`), so that its
    /// shared consumer can filter on every subject again.
    async fn delete_lane_consumers(
        &self,
        stream: &jetstream::stream::Stream,
        group: &str,
    ) -> Result<(), BackendError> {
        let prefix = format!("{group}_");
        let mut names = stream.consumer_names();
        let mut ours = Vec::new();
        while let Some(name) = names.next().await {
            let name = name.map_err(request_err)?;
            if name.starts_with(&prefix) {
                ours.push(name);
            }
        }
        tracing::warn!(
            consumer = %group,
            lanes = ours.len(),
            "lane consumers hold the stream's subjects; deleting them to pull through the \
             shared consumer (their calls stay queued)"
        );
        for name in ours {
            if let Err(e) = stream.delete_consumer(&name).await {
                tracing::debug!(error = %e, "lane consumer not deleted");
            }
        }
        self.lane_handles().clear();
        Ok(())
    }

    /// Tells fair workers that `subject`'s lane has a call (best effort: core NATS, not
    /// waited for; a missed one is found by a census).
    async fn announce_lane(&self, subject: &str) {
        let prefix = &self.options.nats.subject_prefix;
        if let Some(lane) = Lane::of_subject(prefix, subject)
            && let Err(e) = self
                .client
                .publish(lane.announce_subject(prefix), Bytes::new())
                .await
        {
            tracing::debug!(error = %e, "lane announcement not sent");
        }
    }

    async fn bound_scheduler(&self) -> Result<PullConsumer, BackendError> {
        let mut slot = self.scheduler.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let Some(options) = self.options.consumer.as_ref() else {
            return Err(BackendError::Request(
                "this queue was opened without a consumer".into(),
            ));
        };
        let config = queue::scheduler_consumer_config(
            &options.name,
            &self.options.nats.subject_prefix,
            options.ack_wait,
        );
        let stream = queue::delayed_stream_name(&self.options.nats.stream);
        let consumer = queue::bind_consumer(&self.js, &stream, config).await?;
        tracing::info!(consumer = %options.name, "bound to the scheduled calls' consumer");
        *slot = Some(consumer.clone());
        Ok(consumer)
    }

    async fn ensure_records_bucket(&self, settings: &StreamArgs) -> Result<(), QueueError> {
        let bucket = &self.options.records.records_bucket;
        let failed = |message: String| QueueError::Stream {
            name: bucket.clone(),
            message,
        };
        // The bucket's stream is created as a plain stream, not with the client's
        // `create_or_update_key_value`: that one first reads the account's JetStream info,
        // which the client cannot parse from a 2.9 server (README, "NATS servers").
        self.js
            .create_or_update_stream(queue::records_bucket_config(
                &self.options.records,
                settings,
            ))
            .await
            .map_err(|e| failed(e.to_string()))?;
        let store = self
            .js
            .get_key_value(bucket)
            .await
            .map_err(|e| failed(e.to_string()))?;
        // A bucket re-created under the same name is reached through the same handle.
        let _ = self.records.set(Arc::new(store));
        Ok(())
    }

    /// The record bucket, looked up once (the gateway creates it).
    async fn records_bucket(&self) -> Result<Arc<kv::Store>, BackendError> {
        self.records
            .get_or_try_init(|| async {
                self.js
                    .get_key_value(&self.options.records.records_bucket)
                    .await
                    .map(Arc::new)
                    .map_err(request_err)
            })
            .await
            .map(Arc::clone)
    }

    /// Core NATS subject of cancel announcements (outside the calls stream's subjects).
    fn cancel_subject(&self) -> String {
        format!("{}-control.cancel", self.options.nats.subject_prefix)
    }

    /// Core NATS subject of outcome announcements.
    fn outcome_subject(&self) -> String {
        format!("{}-control.outcomes", self.options.nats.subject_prefix)
    }

    /// Forget the consumer so the next pull binds again (after a failed pull).
    /// The stored record of `call_id` with its revision, if there is one.
    async fn stored_entry(
        &self,
        kv: &kv::Store,
        call_id: &str,
    ) -> Result<Option<RecordEntry>, BackendError> {
        match kv.entry(record_key(call_id)).await.map_err(request_err)? {
            Some(e) if e.operation == kv::Operation::Put => {
                let (record, sealed) = decode_record(call_id, &e.value)?;
                let inline_result = match sealed {
                    Some(sealed) => Some(Bytes::from(
                        self.options
                            .sealing
                            .open(Purpose::Result, call_id.as_bytes(), sealed)?
                            .into_owned(),
                    )),
                    None => None,
                };
                Ok(Some(RecordEntry {
                    record,
                    revision: e.revision,
                    inline_result,
                }))
            }
            _ => Ok(None),
        }
    }

    /// The record of a call with none stored: a call queued without one
    /// ([`CallQueue::finds_queued_calls`]) and not started yet is `queued`, at [`NOT_STORED`],
    /// as its queued message says. A call that left the queue between the caller's read of
    /// the records and this one had its record written first (a worker writes it before it
    /// acknowledges), so the records are read once more before answering that there is none.
    async fn unstored_record(
        &self,
        kv: &kv::Store,
        call_id: &str,
    ) -> Result<Option<RecordEntry>, BackendError> {
        let prefix = &self.options.nats.subject_prefix;
        let Some(filters) = super::queued_call_filters(prefix, call_id) else {
            return Ok(None);
        };
        let stream = self
            .js
            .get_stream_no_info(&self.options.nats.stream)
            .await
            .map_err(request_err)?;
        // A call of normal priority is found by the first filter, one of high or low by the
        // second (its level is a token after the id).
        let mut found = None;
        for filter in &filters {
            match stream.get_first_raw_message_by_subject(filter, 0).await {
                Ok(message) => {
                    found = Some(message);
                    break;
                }
                Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(request_err(e)),
            }
        }
        if let Some(message) = found {
            let call = QueuedCall::open(&message.payload, &self.options.sealing).map_err(|e| {
                BackendError::Corrupt {
                    key: format!("queued call {call_id}"),
                    detail: e.to_string(),
                }
            })?;
            let meta = &call.meta;
            let owned = OwnedRecord::accepted(
                &meta.call_id,
                &meta.qualified_function(),
                meta.received_at_unix_nanos,
                meta.callback_url.is_some(),
                meta.not_before_unix_nanos,
                NOT_STORED,
            );
            return Ok(Some(RecordEntry {
                record: owned.record,
                revision: NOT_STORED,
                inline_result: None,
            }));
        }
        self.stored_entry(kv, call_id).await
    }

    async fn unbind(&self) {
        *self.consumer.lock().await = None;
    }

    async fn dead_letter_stream(&self) -> Result<jetstream::stream::Stream, BackendError> {
        self.js
            .get_stream(&self.options.nats.dead_letter_stream)
            .await
            .map_err(request_err)
    }
}

/// One pull of up to `max` deliveries from `consumer`, waiting up to `expires`. A pull that
/// fails clears `bound` (the consumer or its stream may be gone: bind again next time).
async fn pull_batch(
    consumer: &PullConsumer,
    bound: &Mutex<Option<PullConsumer>>,
    max: usize,
    expires: Duration,
) -> Result<BoxStream<'static, Result<JetStreamDelivery, BackendError>>, BackendError> {
    match consumer
        .batch()
        .max_messages(max)
        .expires(expires)
        .messages()
        .await
    {
        Ok(batch) => Ok(batch
            .map(|m| m.map(JetStreamDelivery::new).map_err(request_err))
            .boxed()),
        Err(e) => {
            *bound.lock().await = None;
            Err(request_err(e))
        }
    }
}

fn request_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Request(e.to_string())
}

/// Every message of a stream, oldest first (a dead-letter stream is small).
async fn stream_messages(
    stream: &mut jetstream::stream::Stream,
) -> Result<Vec<StreamMessage>, BackendError> {
    let (first, last, count) = {
        let state = &stream.info().await.map_err(request_err)?.state;
        (state.first_sequence, state.last_sequence, state.messages)
    };
    let mut out = Vec::new();
    if count == 0 {
        return Ok(out);
    }
    for seq in first..=last {
        // Gaps (deleted messages) answer "not found": skip them.
        if let Ok(msg) = stream.get_raw_message(seq).await {
            out.push(msg);
        }
    }
    Ok(out)
}

fn entry_of(msg: &StreamMessage) -> DeadLetterEntry {
    DeadLetterEntry::from_stored(
        msg.sequence,
        |name| msg.headers.get(name).map(HeaderValue::as_str),
        &msg.payload,
    )
}

fn record_key(call_id: &str) -> String {
    format!("call.{}", records::store_key(call_id))
}

fn result_key(call_id: &str) -> String {
    format!("result.{}", records::store_key(call_id))
}

/// Largest encoded result kept inside the record's value rather than under its own key: one
/// store per finished call instead of two. Every later write of the record carries it again, so
/// it stays small.
pub const INLINE_RESULT_BYTES: usize = 4096;

/// A stored record value: the record and, when it carries one, the kept result (still sealed).
fn decode_record<'a>(
    call_id: &str,
    raw: &'a [u8],
) -> Result<(CallRecord, Option<&'a [u8]>), BackendError> {
    let corrupt = |detail: String| BackendError::Corrupt {
        key: record_key(call_id),
        detail,
    };
    let (json, result) = records::split_stored_record(raw)
        .ok_or_else(|| corrupt("not a record value".to_owned()))?;
    let record = serde_json::from_slice(json).map_err(|e| corrupt(e.to_string()))?;
    Ok((record, result))
}

/// Key of the paused-functions list. Note: the bucket's TTL applies to it too; a pause older
/// than `--records-retention` lapses.
const PAUSED_KEY: &str = "paused-functions";

/// JetStream's own default duplicate window, assumed where this process does not manage the
/// stream.
const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Attempts of a compare-and-set before giving up (only concurrent writers make it retry).
const CAS_ATTEMPTS: usize = 16;

impl CallRecords for JetStreamQueue {
    async fn record(&self, call_id: &str) -> Result<Option<CallRecord>, BackendError> {
        let kv = self.records_bucket().await?;
        if let Some(raw) = kv.get(record_key(call_id)).await.map_err(request_err)? {
            return Ok(Some(decode_record(call_id, &raw)?.0));
        }
        Ok(self.unstored_record(&kv, call_id).await?.map(|e| e.record))
    }

    async fn record_entry(&self, call_id: &str) -> Result<Option<RecordEntry>, BackendError> {
        let kv = self.records_bucket().await?;
        match self.stored_entry(&kv, call_id).await? {
            Some(entry) => Ok(Some(entry)),
            None => self.unstored_record(&kv, call_id).await,
        }
    }

    async fn write_record(
        &self,
        call_id: &str,
        expected: Option<Revision>,
        record: &CallRecord,
        result: Option<Bytes>,
    ) -> Result<Revision, RecordWriteError> {
        let kv = self.records_bucket().await?;
        let key = record_key(call_id);
        let json = serde_json::to_vec(record).map_err(BackendError::from)?;
        let sealed = result.map(|encoded| {
            let inline = encoded.len() <= self.inline_result_bytes();
            let sealed = self
                .options
                .sealing
                .seal(Purpose::Result, call_id.as_bytes(), encoded);
            (inline, sealed)
        });
        let (value, beside) = match sealed {
            // A small result rides in the record's own value: one store for both.
            Some((true, sealed)) => (records::stored_record_value(&json, Some(&sealed)), None),
            Some((false, sealed)) => (json, Some(sealed)),
            None => (json, None),
        };
        let value = Bytes::from(value);
        let write = async {
            match expected.filter(|&r| r != NOT_STORED) {
                Some(revision) => kv.update(&key, value, revision).await.map_err(|e| {
                    if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                        RecordWriteError::Conflict
                    } else {
                        RecordWriteError::Backend(request_err(e))
                    }
                }),
                None => kv.create(&key, value).await.map_err(|e| {
                    if e.kind() == kv::CreateErrorKind::AlreadyExists {
                        RecordWriteError::Conflict
                    } else {
                        RecordWriteError::Backend(request_err(e))
                    }
                }),
            }
        };
        match beside {
            None => write.await,
            Some(sealed) => {
                // Both publishes leave on this one connection in this order, so the stream
                // stores the result before the record that points to it; their
                // acknowledgements are awaited together (one round trip, not two).
                let keep = kv.put(result_key(call_id), sealed);
                let (kept, written) = tokio::join!(keep, write);
                kept.map_err(|e| RecordWriteError::Backend(request_err(e)))?;
                written
            }
        }
    }

    async fn delete_record(&self, call_id: &str) -> Result<(), BackendError> {
        let kv = self.records_bucket().await?;
        kv.delete(record_key(call_id)).await.map_err(request_err)
    }

    async fn result(&self, call_id: &str) -> Result<Option<StoredResult>, BackendError> {
        let kv = self.records_bucket().await?;
        // A small result is inside the record's value; a larger one beside it.
        let inline = match kv.get(record_key(call_id)).await.map_err(request_err)? {
            Some(raw) => decode_record(call_id, &raw)?.1.map(Bytes::copy_from_slice),
            None => None,
        };
        let (key, raw) = match inline {
            Some(sealed) => (record_key(call_id), Some(sealed)),
            None => (
                result_key(call_id),
                kv.get(result_key(call_id)).await.map_err(request_err)?,
            ),
        };
        match raw {
            Some(raw) => {
                let opened =
                    self.options
                        .sealing
                        .open(Purpose::Result, call_id.as_bytes(), &raw)?;
                StoredResult::decode(&opened)
                    .map(Some)
                    .ok_or_else(|| BackendError::Corrupt {
                        key,
                        detail: "unreadable result".into(),
                    })
            }
            None => Ok(None),
        }
    }

    async fn claim_idempotency_key(
        &self,
        key: &str,
        call_id: &str,
    ) -> Result<Option<String>, BackendError> {
        let kv = self.records_bucket().await?;
        for _ in 0..CAS_ATTEMPTS {
            match kv.create(key, bytes::Bytes::from(call_id.to_owned())).await {
                Ok(_) => return Ok(None),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    // Deleted between the two requests: try to claim again.
                    if let Some(holder) = kv.get(key).await.map_err(request_err)? {
                        return Ok(Some(String::from_utf8_lossy(&holder).into_owned()));
                    }
                }
                Err(e) => return Err(request_err(e)),
            }
        }
        Err(BackendError::Request(format!(
            "idempotency key {key}: contended"
        )))
    }

    async fn release_idempotency_key(&self, key: &str) -> Result<(), BackendError> {
        let kv = self.records_bucket().await?;
        kv.delete(key).await.map_err(request_err)
    }

    async fn announce_outcome(&self, event: &OutcomeEvent) {
        let Ok(payload) = serde_json::to_vec(event) else {
            return;
        };
        if let Err(e) = self
            .client
            .publish(self.outcome_subject(), payload.into())
            .await
        {
            tracing::debug!(error = %e, "outcome announcement not sent");
        }
    }

    async fn outcomes(&self) -> Result<BoxStream<'static, OutcomeEvent>, BackendError> {
        let subscriber = self
            .client
            .subscribe(self.outcome_subject())
            .await
            .map_err(request_err)?;
        Ok(subscriber
            .filter_map(|m| async move { serde_json::from_slice(&m.payload).ok() })
            .boxed())
    }

    async fn paused_functions(&self) -> Result<Vec<String>, BackendError> {
        let kv = self.records_bucket().await?;
        Ok(match kv.get(PAUSED_KEY).await.map_err(request_err)? {
            Some(raw) => serde_json::from_slice(&raw).unwrap_or_default(),
            None => Vec::new(),
        })
    }

    async fn paused_updates(&self) -> Result<BoxStream<'static, Vec<String>>, BackendError> {
        let kv = self.records_bucket().await?;
        // Watch first, then read: a change in between is in the read or comes from the
        // watch, never lost. (A watch with history says nothing for a key never written.)
        let watch = kv.watch(PAUSED_KEY).await.map_err(request_err)?;
        let now: Vec<String> = match kv.get(PAUSED_KEY).await.map_err(request_err)? {
            Some(raw) => serde_json::from_slice(&raw).unwrap_or_default(),
            None => Vec::new(),
        };
        let changes = watch
            .take_while(|entry| futures::future::ready(entry.is_ok()))
            .filter_map(|entry| {
                futures::future::ready(entry.ok().map(|e| match e.operation {
                    kv::Operation::Put => serde_json::from_slice(&e.value).unwrap_or_default(),
                    kv::Operation::Delete | kv::Operation::Purge => Vec::new(),
                }))
            });
        Ok(futures::stream::once(futures::future::ready(now))
            .chain(changes)
            .boxed())
    }

    async fn set_paused(&self, function: &str, paused: bool) -> Result<Vec<String>, BackendError> {
        let kv = self.records_bucket().await?;
        for _ in 0..CAS_ATTEMPTS {
            let entry = kv.entry(PAUSED_KEY).await.map_err(request_err)?;
            let (current, revision): (Vec<String>, _) = match entry {
                Some(e) if e.operation == kv::Operation::Put => (
                    serde_json::from_slice(&e.value).unwrap_or_default(),
                    Some(e.revision),
                ),
                Some(e) => (Vec::new(), Some(e.revision)),
                None => (Vec::new(), None),
            };
            let list = records::with_paused(current, function, paused);
            let value = bytes::Bytes::from(serde_json::to_vec(&list)?);
            let written = match revision {
                Some(revision) => kv.update(PAUSED_KEY, value, revision).await.is_ok(),
                None => kv.create(PAUSED_KEY, value).await.is_ok(),
            };
            if written {
                return Ok(list);
            }
        }
        Err(BackendError::Request("paused functions: contended".into()))
    }

    async fn announce_cancel(&self, call_id: &str) -> Result<(), BackendError> {
        self.client
            .publish(
                self.cancel_subject(),
                bytes::Bytes::from(call_id.to_owned()),
            )
            .await
            .map_err(request_err)?;
        self.client.flush().await.map_err(request_err)
    }

    async fn cancellations(&self) -> Result<BoxStream<'static, String>, BackendError> {
        let subscriber = self
            .client
            .subscribe(self.cancel_subject())
            .await
            .map_err(request_err)?;
        Ok(subscriber
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .boxed())
    }

    fn sealing(&self) -> &Sealing {
        &self.options.sealing
    }

    fn inline_result_bytes(&self) -> usize {
        INLINE_RESULT_BYTES.min(self.max_result_bytes())
    }

    fn max_stored_result_bytes(&self) -> u64 {
        self.options.records.max_result_bytes
    }

    fn max_result_bytes(&self) -> usize {
        let configured =
            usize::try_from(self.options.records.max_result_bytes).unwrap_or(usize::MAX);
        configured.min(
            self.max_payload()
                .saturating_sub(HEADER_ALLOWANCE + self.options.sealing.overhead()),
        )
    }

    async fn announce_worker_status(
        &self,
        status: &super::WorkerStatus,
    ) -> Result<(), BackendError> {
        super::status::put_status(&self.js, &self.options.records.records_bucket, status).await
    }

    async fn withdraw_worker_status(&self, worker: &str) -> Result<(), BackendError> {
        super::status::delete_status(&self.js, &self.options.records.records_bucket, worker).await
    }

    async fn worker_statuses(&self) -> Result<Vec<super::WorkerStatus>, BackendError> {
        super::status::read_statuses(&self.js, &self.options.records.records_bucket).await
    }
}

impl CallQueue for JetStreamQueue {
    type Delivery = JetStreamDelivery;

    fn finds_queued_calls(&self) -> bool {
        true
    }

    async fn publish(&self, call: &QueuedCall) -> Result<Published, PublishError> {
        if self.options.manage_streams.is_some() {
            if !self.streams_seen.load(Ordering::Relaxed) {
                self.recheck.notify_one();
                return Err(PublishError::NotStored(
                    "the stream is not set up yet".into(),
                ));
            }
            if !self.streams_ready.load(Ordering::Relaxed) {
                // Set up before, not found at the last check: try the publish, and have the
                // streams checked again soon.
                self.recheck.notify_one();
            }
        }
        // A call with a not-before time waits in the scheduled calls' stream, on the same
        // subject under the delayed prefix: the scheduler moves it to the calls' subject
        // (`release_scheduled` strips the prefix), id included.
        let prefix = &self.options.nats.subject_prefix;
        let subject = if call.meta.not_before_unix_nanos.is_some() {
            super::call_subject_with_id(&queue::delayed_subject_prefix(prefix), call)
        } else {
            super::call_subject_with_id(prefix, call)
        };
        let scheduled = call.meta.not_before_unix_nanos.is_some();
        let result = queue::publish_call(
            &self.client,
            &self.js,
            subject.clone(),
            call,
            &self.options.sealing,
            self.max_payload(),
        )
        .await;
        match &result {
            Ok(false) if !scheduled => self.announce_lane(&subject).await,
            Err(PublishError::NotStored(_)) => {
                // The stream may be gone (a NATS server that lost its store): check it again.
                self.recheck.notify_one();
            }
            _ => {}
        }
        result.map(|duplicate| Published { duplicate })
    }

    fn duplicate_window(&self) -> Duration {
        self.options
            .manage_streams
            .as_ref()
            .map_or(DEFAULT_DUPLICATE_WINDOW, |s| s.stream_duplicate_window)
    }

    fn max_message_bytes(&self) -> usize {
        self.max_payload()
    }

    async fn check_ready(&self) -> Result<(), String> {
        if !self.is_connected() {
            return Err("not connected to NATS".into());
        }
        // A server reached only after start (or after a move within a cluster) is checked here.
        queue::check_server_version(&self.client.server_info().version)?;
        if self.options.manage_streams.is_some() && !self.streams_ready.load(Ordering::Relaxed) {
            return Err("streams not set up yet".into());
        }
        match self.js.get_stream(&self.options.nats.stream).await {
            Ok(_) => Ok(()),
            Err(e) => {
                self.recheck.notify_one();
                Err(format!("stream {}: {e}", self.options.nats.stream))
            }
        }
    }

    async fn pull(
        &self,
        max: usize,
        expires: Duration,
    ) -> Result<BoxStream<'static, Result<JetStreamDelivery, BackendError>>, BackendError> {
        let consumer = self.bound_consumer().await?;
        pull_batch(&consumer, &self.consumer, max, expires).await
    }

    fn pulls_by_lane(&self) -> bool {
        true
    }

    async fn lane_announcements(&self) -> Result<BoxStream<'static, Lane>, BackendError> {
        let prefix = self.options.nats.subject_prefix.clone();
        let subscription = self
            .client
            .subscribe(format!("{}.>", super::announce_prefix(&prefix)))
            .await
            .map_err(request_err)?;
        Ok(subscription
            .filter_map(move |m| {
                let lane = Lane::of_announcement(&prefix, m.subject.as_str());
                async move { lane }
            })
            .boxed())
    }

    async fn waiting_lanes(&self) -> Result<Vec<(Lane, u64)>, BackendError> {
        let stream = self
            .js
            .get_stream_no_info(&self.options.nats.stream)
            .await
            .map_err(request_err)?;
        let prefix = &self.options.nats.subject_prefix;
        let mut subjects = stream
            .info_with_subjects(format!("{prefix}.>"))
            .await
            .map_err(request_err)?;
        let mut lanes = std::collections::BTreeMap::new();
        while let Some(item) = subjects.next().await {
            let (subject, count) = item.map_err(request_err)?;
            if count > 0
                && let Some(lane) = Lane::of_subject(prefix, &subject)
            {
                *lanes.entry(lane).or_insert(0) += count as u64;
            }
        }
        Ok(lanes.into_iter().collect())
    }

    async fn lane_census(&self) -> Result<LaneCensus, BackendError> {
        let Some(options) = self.options.consumer.as_ref() else {
            return Ok(LaneCensus::default());
        };
        let prefix = &self.options.nats.subject_prefix;
        let mut stream = self
            .js
            .get_stream(&self.options.nats.stream)
            .await
            .map_err(request_err)?;
        // The consumers first, then the stream: a call published in between is counted by
        // the stream only (a census that errs towards a rescan, never towards a missed lane).
        let mut lanes = Vec::new();
        let mut accounted = 0u64;
        for (lane, waiting, delivered) in
            super::status::group_lanes(&stream, prefix, &options.name).await?
        {
            accounted += waiting + delivered;
            lanes.push(super::LaneCount {
                lane,
                waiting,
                delivered,
            });
        }
        let messages = stream.info().await.map_err(request_err)?.state.messages;
        Ok(LaneCensus {
            lanes,
            unaccounted: messages.saturating_sub(accounted),
        })
    }

    async fn pull_lane(
        &self,
        lane: &Lane,
        max: usize,
    ) -> Result<BoxStream<'static, Result<JetStreamDelivery, BackendError>>, BackendError> {
        let consumer = self.lane_consumer(lane).await?;
        match consumer.fetch().max_messages(max).messages().await {
            Ok(batch) => {
                let (handles, lane) = (self.lanes.clone(), lane.clone());
                Ok(batch
                    .map(move |m| {
                        m.map(JetStreamDelivery::new).map_err(|e| {
                            // No consumer answers (deleted when idle, or by the other
                            // layout): create it again next time.
                            handles
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .remove(&lane);
                            request_err(e)
                        })
                    })
                    .boxed())
            }
            Err(e) => {
                self.lane_handles().remove(lane);
                Err(request_err(e))
            }
        }
    }

    async fn dead_letter(
        &self,
        payload: Bytes,
        letter: &DeadLetter<'_>,
    ) -> Result<(), PublishError> {
        let mut headers = HeaderMap::new();
        for (name, value) in letter.fields() {
            headers.insert(name, HeaderValue::from(value.as_str()));
        }
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            HeaderValue::from(
                format!("{}-{}", letter.original_subject, letter.stream_sequence).as_str(),
            ),
        );
        let subject = format!(
            "{}.{}",
            self.options.nats.dead_letter_stream,
            letter.reason.as_str()
        );
        self.js
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(|e| PublishError::NotStored(e.to_string()))?
            .await
            .map_err(|e| PublishError::NotStored(e.to_string()))?;
        Ok(())
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetterEntry>, BackendError> {
        let mut stream = self.dead_letter_stream().await?;
        Ok(stream_messages(&mut stream)
            .await?
            .iter()
            .map(entry_of)
            .collect())
    }

    async fn replay_dead_letters(
        &self,
        selectors: &[DeadLetterSelector],
        all: bool,
    ) -> Result<Vec<DeadLetterEntry>, BackendError> {
        let dlq = self.options.nats.dead_letter_stream.as_str();
        let mut stream = self.dead_letter_stream().await?;
        let mut replayed = Vec::new();
        for msg in stream_messages(&mut stream).await? {
            let entry = entry_of(&msg);
            if !entry.selected(selectors, all) {
                continue;
            }
            if entry.subject.is_empty() {
                return Err(BackendError::NoSubject(entry.sequence));
            }
            // A fresh message id: the original one may still be inside the duplicate window.
            let mut headers = HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                HeaderValue::from(format!("replay-{dlq}-{}", entry.sequence).as_str()),
            );
            self.js
                .publish_with_headers(entry.subject.clone(), headers, msg.payload.clone())
                .await
                .map_err(request_err)?
                .await
                .map_err(request_err)?;
            self.announce_lane(&entry.subject).await;
            stream
                .delete_message(entry.sequence)
                .await
                .map_err(request_err)?;
            replayed.push(entry);
        }
        Ok(replayed)
    }

    async fn purge_dead_letters(
        &self,
        selectors: &[DeadLetterSelector],
        all: bool,
    ) -> Result<Vec<DeadLetterEntry>, BackendError> {
        let mut stream = self.dead_letter_stream().await?;
        let entries: Vec<DeadLetterEntry> = stream_messages(&mut stream)
            .await?
            .iter()
            .map(entry_of)
            .filter(|entry| entry.selected(selectors, all))
            .collect();
        if all {
            // Up to the last one read: a dead letter arriving meanwhile stays (and is not
            // reported as deleted).
            if let Some(last) = entries.last() {
                stream
                    .purge()
                    .sequence(last.sequence + 1)
                    .await
                    .map_err(request_err)?;
            }
            return Ok(entries);
        }
        let mut deleted = Vec::new();
        for entry in entries {
            if stream
                .delete_message(entry.sequence)
                .await
                .map_err(request_err)?
            {
                deleted.push(entry);
            }
        }
        Ok(deleted)
    }

    async fn function_stats(&self) -> Result<Vec<super::FunctionQueueStats>, BackendError> {
        let stream = self
            .js
            .get_stream(&self.options.nats.stream)
            .await
            .map_err(request_err)?;
        let prefix = &self.options.nats.subject_prefix;
        let mut subjects = stream
            .info_with_subjects(format!("{prefix}.>"))
            .await
            .map_err(request_err)?;
        // A call queued with its id in the subject has a subject of its own: the counts are
        // summed per function, and the oldest is looked up once per form of subject found
        // (`<prefix>.<ns>.<name>` and `<prefix>.<ns>.<name>.<id>`).
        let mut by_function: std::collections::BTreeMap<String, (u64, Vec<String>)> =
            std::collections::BTreeMap::new();
        while let Some(item) = subjects.next().await {
            let (subject, pending) = item.map_err(request_err)?;
            let (Some(function), Some(filter)) = (
                super::function_of_subject(prefix, &subject),
                super::function_filter_of_subject(prefix, &subject),
            ) else {
                continue;
            };
            let entry = by_function.entry(function).or_default();
            entry.0 += pending as u64;
            if !entry.1.contains(&filter) {
                entry.1.push(filter);
            }
        }
        let now = i128::from(crate::clock::unix_nanos_now());
        let mut out = Vec::new();
        for (function, (pending, filters)) in by_function {
            let mut oldest = now;
            for filter in filters {
                if let Ok(m) = stream.get_first_raw_message_by_subject(&filter, 0).await {
                    oldest = oldest.min(m.time.unix_timestamp_nanos());
                }
            }
            let age_nanos = u64::try_from((now - oldest).max(0)).unwrap_or(u64::MAX);
            out.push(super::FunctionQueueStats {
                function,
                pending,
                oldest_age_seconds: Duration::from_nanos(age_nanos).as_secs_f64(),
            });
        }
        out.sort_by(|a, b| a.function.cmp(&b.function));
        Ok(out)
    }

    async fn stats(&self) -> Result<super::QueueStats, BackendError> {
        let mut stream = self
            .js
            .get_stream(&self.options.nats.stream)
            .await
            .map_err(request_err)?;
        let (pending, consumers, oldest_age_seconds) = {
            let state = &stream.info().await.map_err(request_err)?.state;
            // A work-queue stream keeps a call until it is acked: its first message is the
            // oldest pending call.
            let oldest = if state.messages == 0 {
                0.0
            } else {
                let now = i128::from(crate::clock::unix_nanos_now());
                let age = (now - state.first_timestamp.unix_timestamp_nanos()).max(0);
                Duration::from_nanos(u64::try_from(age).unwrap_or(u64::MAX)).as_secs_f64()
            };
            (state.messages, state.consumer_count as u64, oldest)
        };
        let mut unacked = 0;
        let mut list = stream.consumers();
        while let Some(info) = list.next().await {
            unacked += info.map_err(request_err)?.num_ack_pending as u64;
        }
        let dead_letters = self
            .dead_letter_stream()
            .await?
            .info()
            .await
            .map_err(request_err)?
            .state
            .messages;
        // A stream set up by an older gateway has no scheduled calls' stream: none scheduled.
        let scheduled = match self
            .js
            .get_stream(queue::delayed_stream_name(&self.options.nats.stream))
            .await
        {
            Ok(mut delayed) => delayed.info().await.map_err(request_err)?.state.messages,
            Err(_) => 0,
        };
        Ok(super::QueueStats {
            pending,
            unacked,
            consumers,
            dead_letters,
            scheduled,
            oldest_age_seconds,
        })
    }

    fn holds_scheduled_apart(&self) -> bool {
        true
    }

    async fn pull_scheduled(
        &self,
        max: usize,
        expires: Duration,
    ) -> Result<BoxStream<'static, Result<JetStreamDelivery, BackendError>>, BackendError> {
        let consumer = self.bound_scheduler().await?;
        pull_batch(&consumer, &self.scheduler, max, expires).await
    }

    async fn release_scheduled(
        &self,
        delivery: &JetStreamDelivery,
        call_id: &str,
    ) -> Result<Published, PublishError> {
        let prefix = &self.options.nats.subject_prefix;
        let delayed = queue::delayed_subject_prefix(prefix);
        let Some(rest) = delivery
            .subject()
            .strip_prefix(delayed.as_str())
            .filter(|rest| rest.starts_with('.'))
        else {
            return Err(PublishError::NotStored(format!(
                "{} is not a scheduled call's subject",
                delivery.subject()
            )));
        };
        // The call id as message id: a release repeated after a crash, within the duplicate
        // window, is stored once (the calls stream never saw this id: the gateway published the
        // call to the scheduled calls' stream only).
        let publish = jetstream::message::PublishMessage::build()
            .payload(delivery.payload().clone())
            .message_id(call_id);
        let subject = format!("{prefix}{rest}");
        let ack = self
            .js
            .send_publish(subject.clone(), publish)
            .await
            .map_err(|e| PublishError::NotStored(e.to_string()))?
            .await
            .map_err(|e| PublishError::NotStored(e.to_string()))?;
        if !ack.duplicate {
            self.announce_lane(&subject).await;
        }
        Ok(Published {
            duplicate: ack.duplicate,
        })
    }

    async fn flush_before_exit(&self) {
        queue::flush_before_exit(&self.client).await;
    }

    async fn lane_stats(&self, group: &str) -> Result<Vec<super::LaneStats>, BackendError> {
        super::status::lane_consumers(
            &self.js,
            &self.options.nats.stream,
            &self.options.nats.subject_prefix,
            group,
        )
        .await
    }

    async fn scheduled_stats(&self) -> Result<Vec<super::FunctionScheduled>, BackendError> {
        super::status::scheduled_subjects(
            &self.js,
            &self.options.nats.stream,
            &self.options.nats.subject_prefix,
        )
        .await
    }
}

/// A JetStream message delivered to this worker.
#[derive(Debug, Clone)]
pub struct JetStreamDelivery {
    message: jetstream::Message,
    sequence: u64,
    attempt: u32,
    pending: u64,
}

impl JetStreamDelivery {
    fn new(message: jetstream::Message) -> Self {
        let (sequence, delivered, pending) = message
            .info()
            .map(|i| (i.stream_sequence, i.delivered, i.pending))
            .unwrap_or((0, 1, 0));
        Self {
            message,
            sequence,
            attempt: u32::try_from(delivered.max(1)).unwrap_or(u32::MAX),
            pending,
        }
    }

    async fn send(&self, kind: AckKind) -> Result<(), BackendError> {
        self.message.ack_with(kind).await.map_err(request_err)
    }
}

impl QueueDelivery for JetStreamDelivery {
    fn payload(&self) -> &Bytes {
        &self.message.payload
    }

    fn subject(&self) -> &str {
        self.message.subject.as_str()
    }

    fn sequence(&self) -> u64 {
        self.sequence
    }

    fn attempt(&self) -> u32 {
        self.attempt
    }

    fn pending(&self) -> Option<u64> {
        Some(self.pending)
    }

    async fn ack(&self) -> Result<(), BackendError> {
        self.send(AckKind::Ack).await
    }

    async fn nak(&self, delay: Option<Duration>) -> Result<(), BackendError> {
        self.send(AckKind::Nak(delay)).await
    }

    async fn in_progress(&self) -> Result<(), BackendError> {
        self.send(AckKind::Progress).await
    }

    async fn terminate(&self) -> Result<(), BackendError> {
        self.send(AckKind::Term).await
    }
}
