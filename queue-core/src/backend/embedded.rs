//! The embedded backend: a crash-safe queue in a local sled database, for one process on one
//! node (sled locks its directory). It keeps JetStream's semantics (see [`super`]).
//!
//! On disk (trees of one sled database):
//! - `messages`: sequence → subject and message, written with its dedup entry in one
//!   transaction and flushed before `publish` returns;
//! - `deliveries`: sequence → delivery count and "not before" time, so attempts and delayed
//!   naks survive a restart (written without a flush: a crash may forget the last few); a
//!   scheduled call's (count 0, its time) is written with its message and flushed with it;
//! - `dedup`: dedup id → publish time and sequence, swept after the duplicate window;
//! - `dead`, `dead_ids`: dead letters and their idempotency keys.
//!
//! In memory: the schedule (which sequence is due when) and the leases of deliveries in
//! progress. Both are rebuilt from disk at open: every message not acked is due again then,
//! unless a nak delayed it, just as JetStream redelivers what a crashed worker held. Acks are
//! not flushed one by one (sled flushes every 200 ms): a crash may redeliver a message acked
//! just before it, which the worker's dedup state recognises.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use tokio::sync::Notify;

use super::DeadLetterSelector;
use super::{
    BackendError, CallQueue, CallRecords, DeadLetter, DeadLetterEntry, PublishError, Published,
    QueueDelivery, RecordEntry, RecordWriteError, Revision, call_subject,
};
use crate::clock::unix_nanos_now;
use crate::message::QueuedCall;
use crate::records::{self, CallRecord, OutcomeEvent, StoredResult};
use crate::sealing::{Purpose, Sealing};
use crate::sled_flush::GroupFlush;

impl From<sled::Error> for BackendError {
    fn from(e: sled::Error) -> Self {
        Self::Storage(e.to_string())
    }
}

/// Format version of the records this module writes.
const RECORD_VERSION: u8 = 1;
/// Key of the paused-functions list in the `records` tree (not a call id: call ids have no `!`).
const PAUSED_KEY: &[u8] = b"!paused-functions";
/// How often dedup entries and records past their time are removed.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Settings of an embedded queue.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Directory of the sled database (created if missing).
    pub dir: PathBuf,
    /// Subjects are `<prefix>.<namespace>.<function>`, as in JetStream.
    pub subject_prefix: String,
    /// Redelivery after this long without an ack or progress signal.
    pub ack_wait: Duration,
    /// A call id published again within this window is not stored again.
    pub duplicate_window: Duration,
    /// Largest message (envelope) accepted.
    pub max_message_bytes: usize,
    /// Most bytes of queued messages; further publishes fail until some are acked (0: no limit).
    pub max_bytes: u64,
    /// sled's page cache size.
    pub cache_bytes: u64,
    /// How long call records and kept results live after their last change.
    pub records_retention: Duration,
    /// Largest encoded function response kept for the result endpoint.
    pub max_result_bytes: usize,
    /// Encryption at rest of queued calls and kept results.
    pub sealing: Sealing,
}

/// The embedded queue. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct EmbeddedQueue {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    options: EmbeddedOptions,
    db: sled::Db,
    messages: sled::Tree,
    deliveries: sled::Tree,
    dedup: sled::Tree,
    dead: sled::Tree,
    dead_ids: sled::Tree,
    records: sled::Tree,
    results: sled::Tree,
    idempotency: sled::Tree,
    /// Cancel announcements to the worker of this process.
    cancels: tokio::sync::broadcast::Sender<String>,
    /// Outcome announcements to the gateway of this process.
    outcomes: tokio::sync::broadcast::Sender<OutcomeEvent>,
    /// The paused functions, for [`CallRecords::paused_updates`].
    paused: tokio::sync::watch::Sender<Vec<String>>,
    /// Serialises read-modify-write of records (one process owns the database).
    records_lock: Mutex<()>,
    flusher: Arc<GroupFlush>,
    schedule: Mutex<Schedule>,
    /// Wakes pullers when something may have become due.
    wake: Notify,
    /// The workers' statuses, by worker id (in memory: the workers of this process).
    statuses: Mutex<HashMap<String, super::WorkerStatus>>,
}

/// Which queued message is due when; leases of deliveries in progress.
#[derive(Debug, Default)]
struct Schedule {
    /// (due at, Unix nanoseconds; sequence). A leased message is due again at its lease's end.
    due: BTreeSet<(u64, u64)>,
    entries: HashMap<u64, Entry>,
    /// Bytes of queued messages (for `max_bytes`), including publishes in progress.
    bytes: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    due: u64,
    delivered: u32,
    leased: bool,
    size: u64,
    subject: Arc<str>,
    published_at: u64,
}

impl Entry {
    /// A scheduled call whose time has not come: never delivered, due later. (A nak with a
    /// delay leaves a delivered message, which is pending, not scheduled.)
    fn is_scheduled(&self, now: u64) -> bool {
        self.delivered == 0 && !self.leased && self.due > now
    }
}

impl Schedule {
    fn set_due(&mut self, seq: u64, due: u64) {
        if let Some(entry) = self.entries.get_mut(&seq) {
            self.due.remove(&(entry.due, seq));
            entry.due = due;
            self.due.insert((due, seq));
        }
    }

    fn remove(&mut self, seq: u64) -> bool {
        match self.entries.remove(&seq) {
            Some(entry) => {
                self.due.remove(&(entry.due, seq));
                self.bytes = self.bytes.saturating_sub(entry.size);
                true
            }
            None => false,
        }
    }
}

fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn key_seq(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn corrupt(key: impl std::fmt::Display, detail: &str) -> BackendError {
    BackendError::Corrupt {
        key: key.to_string(),
        detail: detail.to_owned(),
    }
}

/// `messages` value: version, publish time, subject length, subject, message.
#[doc(hidden)] // pub for the fuzz targets (`fuzz`); not a stable interface.
pub fn encode_message(published_at: u64, subject: &str, payload: &[u8]) -> Vec<u8> {
    let subject_len = u16::try_from(subject.len()).unwrap_or(u16::MAX);
    let mut buf = BytesMut::with_capacity(11 + subject.len() + payload.len());
    buf.put_u8(RECORD_VERSION);
    buf.put_u64(published_at);
    buf.put_u16(subject_len);
    buf.put_slice(&subject.as_bytes()[..usize::from(subject_len)]);
    buf.put_slice(payload);
    buf.to_vec()
}

/// The header of a `messages` value: publish time, subject, and where the message starts.
fn decode_message_header(raw: &[u8]) -> Option<(u64, &str, usize)> {
    if *raw.first()? != RECORD_VERSION {
        return None;
    }
    let published_at = u64::from_be_bytes(raw.get(1..9)?.try_into().ok()?);
    let len = usize::from(u16::from_be_bytes(raw.get(9..11)?.try_into().ok()?));
    let subject = std::str::from_utf8(raw.get(11..11 + len)?).ok()?;
    Some((published_at, subject, 11 + len))
}

#[doc(hidden)] // pub for the fuzz targets (`fuzz`); not a stable interface.
pub fn decode_message(raw: &[u8]) -> Option<(String, Bytes)> {
    let (_, subject, start) = decode_message_header(raw)?;
    Some((
        subject.to_owned(),
        Bytes::copy_from_slice(raw.get(start..)?),
    ))
}

/// `deliveries` value: delivery count, not-before time.
fn encode_delivery(delivered: u32, not_before: u64) -> [u8; 12] {
    let mut out = [0; 12];
    out[..4].copy_from_slice(&delivered.to_be_bytes());
    out[4..].copy_from_slice(&not_before.to_be_bytes());
    out
}

fn decode_delivery(raw: &[u8]) -> Option<(u32, u64)> {
    Some((
        u32::from_be_bytes(raw.get(..4)?.try_into().ok()?),
        u64::from_be_bytes(raw.get(4..12)?.try_into().ok()?),
    ))
}

/// `dedup` value: publish time, sequence.
fn encode_dedup(published_at: u64, seq: u64) -> [u8; 16] {
    let mut out = [0; 16];
    out[..8].copy_from_slice(&published_at.to_be_bytes());
    out[8..].copy_from_slice(&seq.to_be_bytes());
    out
}

fn dedup_time(raw: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(raw.get(..8)?.try_into().ok()?))
}

/// `idempotency` value: claim time, then the call id.
fn encode_claim(at: u64, call_id: &str) -> Vec<u8> {
    let mut out = at.to_be_bytes().to_vec();
    out.extend_from_slice(call_id.as_bytes());
    out
}

fn decode_claim(raw: &[u8]) -> Option<(u64, String)> {
    let at = u64::from_be_bytes(raw.get(..8)?.try_into().ok()?);
    Some((at, String::from_utf8(raw.get(8..)?.to_vec()).ok()?))
}

/// A dead letter as stored: its fields, then the original message.
#[derive(Debug, Serialize, Deserialize)]
struct DeadRecord {
    fields: Vec<(String, String)>,
}

fn encode_dead(fields: &[(&'static str, String)], payload: &[u8]) -> Result<Vec<u8>, PublishError> {
    let record = DeadRecord {
        fields: fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
    };
    let json = serde_json::to_vec(&record)?;
    let len = u32::try_from(json.len()).unwrap_or(u32::MAX);
    let mut buf = BytesMut::with_capacity(5 + json.len() + payload.len());
    buf.put_u8(RECORD_VERSION);
    buf.put_u32(len);
    buf.put_slice(&json);
    buf.put_slice(payload);
    Ok(buf.to_vec())
}

fn decode_dead(raw: &[u8]) -> Option<(DeadRecord, Bytes)> {
    if *raw.first()? != RECORD_VERSION {
        return None;
    }
    let len = usize::try_from(u32::from_be_bytes(raw.get(1..5)?.try_into().ok()?)).ok()?;
    let end = 5usize.checked_add(len)?;
    let record = serde_json::from_slice(raw.get(5..end)?).ok()?;
    Some((record, Bytes::copy_from_slice(raw.get(end..)?)))
}

/// Why the publish transaction stopped.
#[derive(Debug)]
enum Refused {
    Duplicate,
}

impl EmbeddedQueue {
    /// Opens (or creates) the queue in `options.dir` and rebuilds its schedule. Blocking: call
    /// it from a blocking context or at start-up.
    /// The queue's database and its group commit, for a worker in the same process to keep
    /// its dedup state in (one database, one fsync shared by the queue and the worker).
    pub fn database(&self) -> (sled::Db, Arc<GroupFlush>) {
        (self.inner.db.clone(), Arc::clone(&self.inner.flusher))
    }

    pub fn open(options: EmbeddedOptions) -> Result<Self, BackendError> {
        let db = sled::Config::new()
            .path(&options.dir)
            .cache_capacity(options.cache_bytes)
            .flush_every_ms(Some(200))
            .open()?;
        let records = db.open_tree("records")?;
        let paused: Vec<String> = match records.get(PAUSED_KEY)? {
            Some(raw) => serde_json::from_slice(&raw).unwrap_or_default(),
            None => Vec::new(),
        };
        let inner = Inner {
            paused: tokio::sync::watch::channel(paused).0,
            messages: db.open_tree("messages")?,
            deliveries: db.open_tree("deliveries")?,
            dedup: db.open_tree("dedup")?,
            dead: db.open_tree("dead")?,
            dead_ids: db.open_tree("dead_ids")?,
            records,
            results: db.open_tree("results")?,
            idempotency: db.open_tree("idempotency")?,
            cancels: tokio::sync::broadcast::channel(1024).0,
            outcomes: tokio::sync::broadcast::channel(4096).0,
            records_lock: Mutex::new(()),
            db,
            options,
            flusher: Arc::new(GroupFlush::new()),
            schedule: Mutex::new(Schedule::default()),
            wake: Notify::new(),
            statuses: Mutex::default(),
        };
        inner.rebuild_schedule()?;
        let inner = Arc::new(inner);
        tokio::spawn(sweep(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    /// Where the queue keeps its data.
    pub fn dir(&self) -> &Path {
        &self.inner.options.dir
    }

    /// Messages queued (delivered or not, not yet acked).
    pub fn len(&self) -> usize {
        self.inner.schedule().entries.len()
    }

    /// No message is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn worker_statuses(&self) -> MutexGuard<'_, HashMap<String, super::WorkerStatus>> {
        // Whole values replaced under the lock: a panic elsewhere leaves it usable.
        self.statuses.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn schedule(&self) -> MutexGuard<'_, Schedule> {
        // The schedule stays consistent between statements; a panic elsewhere leaves it usable.
        self.schedule.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn rebuild_schedule(&self) -> Result<(), BackendError> {
        let now = unix_nanos_now();
        let mut schedule = self.schedule();
        for item in self.messages.iter() {
            let (key, value) = item?;
            let seq = key_seq(&key).ok_or_else(|| corrupt("messages", "key is not a sequence"))?;
            let (delivered, not_before) = match self.deliveries.get(key)? {
                Some(raw) => decode_delivery(&raw)
                    .ok_or_else(|| corrupt(format!("deliveries/{seq}"), "short record"))?,
                None => (0, 0),
            };
            let due = not_before.max(now);
            let (published_at, subject, _) = decode_message_header(&value)
                .ok_or_else(|| corrupt(format!("messages/{seq}"), "unreadable record"))?;
            schedule.entries.insert(
                seq,
                Entry {
                    due,
                    delivered,
                    leased: false,
                    size: value.len() as u64,
                    subject: subject.into(),
                    published_at,
                },
            );
            schedule.due.insert((due, seq));
            schedule.bytes += value.len() as u64;
        }
        Ok(())
    }

    /// Stores a message durably and schedules it. `dedup_id` is the call id (or a replay id).
    async fn publish_raw(
        &self,
        subject: &str,
        payload: &[u8],
        dedup_id: &str,
        not_before: Option<u64>,
    ) -> Result<Published, PublishError> {
        if payload.len() > self.options.max_message_bytes {
            return Err(PublishError::TooLarge {
                size: payload.len(),
                max: self.options.max_message_bytes,
            });
        }
        let published_at = unix_nanos_now();
        let record = encode_message(published_at, subject, payload);
        let size = record.len() as u64;
        {
            let mut schedule = self.schedule();
            if self.options.max_bytes > 0 && schedule.bytes + size > self.options.max_bytes {
                return Err(PublishError::NotStored(format!(
                    "the queue is full ({} of {} bytes)",
                    schedule.bytes, self.options.max_bytes
                )));
            }
            // Reserved now so concurrent publishes cannot overshoot the limit together.
            schedule.bytes += size;
        }
        let result = self.store(&record, dedup_id, not_before).await;
        let mut schedule = self.schedule();
        match result {
            Ok(Some(seq)) => {
                // A scheduled call is due at its time; its first delivery is its first attempt.
                let due = not_before.unwrap_or(0).max(unix_nanos_now());
                schedule.entries.insert(
                    seq,
                    Entry {
                        due,
                        delivered: 0,
                        leased: false,
                        size,
                        subject: subject.into(),
                        published_at,
                    },
                );
                schedule.due.insert((due, seq));
                drop(schedule);
                self.wake.notify_waiters();
                Ok(Published { duplicate: false })
            }
            Ok(None) => {
                schedule.bytes = schedule.bytes.saturating_sub(size);
                Ok(Published { duplicate: true })
            }
            Err(e) => {
                schedule.bytes = schedule.bytes.saturating_sub(size);
                Err(e)
            }
        }
    }

    /// Writes message and dedup entry (and a scheduled call's not-before time, as a delivery
    /// record with no delivery yet, which a restart and older builds honour) in one
    /// transaction and flushes. `None`: a duplicate.
    async fn store(
        &self,
        record: &[u8],
        dedup_id: &str,
        not_before: Option<u64>,
    ) -> Result<Option<u64>, PublishError> {
        let not_stored = |e: &dyn std::fmt::Display| PublishError::NotStored(e.to_string());
        let seq = self.db.generate_id().map_err(|e| not_stored(&e))?;
        let now = unix_nanos_now();
        let window = nanos(self.options.duplicate_window);
        let outcome = (&self.messages, &self.dedup, &self.deliveries).transaction(
            |(messages, dedup, deliveries)| {
                if let Some(previous) = dedup.get(dedup_id.as_bytes())?
                    && dedup_time(&previous).is_some_and(|at| now.saturating_sub(at) < window)
                {
                    return Err(ConflictableTransactionError::Abort(Refused::Duplicate));
                }
                dedup.insert(dedup_id.as_bytes(), &encode_dedup(now, seq))?;
                messages.insert(&seq_key(seq), record)?;
                if let Some(at) = not_before {
                    deliveries.insert(&seq_key(seq), &encode_delivery(0, at))?;
                }
                Ok(())
            },
        );
        match outcome {
            Ok(()) => {}
            Err(TransactionError::Abort(Refused::Duplicate)) => return Ok(None),
            Err(TransactionError::Storage(e)) => return Err(not_stored(&e)),
        }
        self.flusher
            .flush(&self.db)
            .await
            .map_err(|e| not_stored(&e))?;
        Ok(Some(seq))
    }

    /// Leases the first due message, if any.
    fn take_due(self: &Arc<Self>) -> Result<Option<EmbeddedDelivery>, BackendError> {
        loop {
            let now = unix_nanos_now();
            let (seq, delivered) = {
                let mut schedule = self.schedule();
                let Some(&(due, seq)) = schedule.due.first() else {
                    return Ok(None);
                };
                if due > now {
                    return Ok(None);
                }
                let lease_end = now.saturating_add(nanos(self.options.ack_wait));
                let Some(entry) = schedule.entries.get_mut(&seq) else {
                    schedule.due.remove(&(due, seq));
                    continue;
                };
                entry.delivered = entry.delivered.saturating_add(1);
                entry.leased = true;
                let delivered = entry.delivered;
                schedule.set_due(seq, lease_end);
                (seq, delivered)
            };
            let Some(raw) = self.messages.get(seq_key(seq))? else {
                // Acked meanwhile.
                self.schedule().remove(seq);
                continue;
            };
            self.deliveries
                .insert(seq_key(seq), &encode_delivery(delivered, 0))?;
            let Some((subject, payload)) = decode_message(&raw) else {
                return Err(corrupt(format!("messages/{seq}"), "unreadable record"));
            };
            return Ok(Some(EmbeddedDelivery {
                queue: self.clone(),
                sequence: seq,
                attempt: delivered,
                subject: subject.into(),
                payload,
            }));
        }
    }

    /// Time until the next message is due, if one is scheduled.
    fn next_due_in(&self) -> Option<Duration> {
        let (due, _) = *self.schedule().due.first()?;
        Some(Duration::from_nanos(due.saturating_sub(unix_nanos_now())))
    }

    fn remove(&self, seq: u64) -> Result<(), BackendError> {
        if self.schedule().remove(seq) {
            self.messages.remove(seq_key(seq))?;
            self.deliveries.remove(seq_key(seq))?;
        }
        Ok(())
    }

    /// Applies `f` to the entry if `attempt` is still its current, leased delivery (a stale
    /// delivery's nak or progress signal is ignored, as JetStream ignores it).
    fn with_current_lease(
        &self,
        seq: u64,
        attempt: u32,
        f: impl FnOnce(&mut Schedule, &Entry),
    ) -> bool {
        let mut schedule = self.schedule();
        let Some(entry) = schedule.entries.get(&seq).cloned() else {
            return false;
        };
        if !entry.leased || entry.delivered != attempt {
            return false;
        }
        f(&mut schedule, &entry);
        true
    }

    fn nak(&self, seq: u64, attempt: u32, delay: Option<Duration>) -> Result<(), BackendError> {
        let delay = delay.map(nanos).unwrap_or(0);
        let due = unix_nanos_now().saturating_add(delay);
        let mut delivered = 0;
        let current = self.with_current_lease(seq, attempt, |schedule, entry| {
            delivered = entry.delivered;
            if let Some(e) = schedule.entries.get_mut(&seq) {
                e.leased = false;
            }
            schedule.set_due(seq, due);
        });
        if current {
            if delay > 0 {
                // So a restart keeps the backoff.
                self.deliveries
                    .insert(seq_key(seq), &encode_delivery(delivered, due))?;
            }
            self.wake.notify_waiters();
        }
        Ok(())
    }

    fn in_progress(&self, seq: u64, attempt: u32) {
        let lease_end = unix_nanos_now().saturating_add(nanos(self.options.ack_wait));
        self.with_current_lease(seq, attempt, |schedule, _| {
            schedule.set_due(seq, lease_end);
        });
    }

    fn sweep_dedup(&self) -> Result<usize, BackendError> {
        let now = unix_nanos_now();
        let window = nanos(self.options.duplicate_window);
        let mut removed = 0;
        for item in self.dedup.iter() {
            let (key, value) = item?;
            if dedup_time(&value).is_none_or(|at| now.saturating_sub(at) >= window) {
                self.dedup.remove(key)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn sweep_records(&self) -> Result<usize, BackendError> {
        let oldest = unix_nanos_now().saturating_sub(nanos(self.options.records_retention));
        let mut removed = 0;
        for item in self.records.iter() {
            let (key, value) = item?;
            if key.as_ref() == PAUSED_KEY {
                continue;
            }
            let expired = decode_record(&value).is_none_or(|(r, _)| r.updated_at < oldest);
            if expired {
                self.records.remove(&key)?;
                self.results.remove(&key)?;
                removed += 1;
            }
        }
        for item in self.idempotency.iter() {
            let (key, value) = item?;
            if decode_claim(&value).is_none_or(|(at, _)| at < oldest) {
                self.idempotency.remove(&key)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn dead_letter_entries(&self) -> Result<Vec<(DeadLetterEntry, String, Bytes)>, BackendError> {
        let mut out = Vec::new();
        for item in self.dead.iter() {
            let (key, value) = item?;
            let seq = key_seq(&key).ok_or_else(|| corrupt("dead", "key is not a sequence"))?;
            let (record, payload) =
                decode_dead(&value).ok_or_else(|| corrupt(format!("dead/{seq}"), "unreadable"))?;
            let field = |name: &str| {
                record
                    .fields
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.as_str())
            };
            let entry = DeadLetterEntry::from_stored(seq, field, &payload);
            let subject = entry.subject.clone();
            out.push((entry, subject, payload));
        }
        Ok(out)
    }
}

/// Removes dedup entries older than the window and records past their retention.
async fn sweep(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let swept = tokio::task::spawn_blocking(move || {
            Ok::<_, BackendError>(inner.sweep_dedup()? + inner.sweep_records()?)
        });
        match swept.await {
            Ok(Ok(n)) if n > 0 => tracing::debug!(removed = n, "expired entries swept"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "sweeping dedup entries failed"),
            Err(e) => tracing::warn!(error = %e, "dedup sweep task failed"),
        }
    }
}

/// A broadcast receiver as a stream; messages missed by a slow reader are skipped (callers
/// treat announcements as best effort).
fn announcements<T: Clone + Send + 'static>(
    receiver: tokio::sync::broadcast::Receiver<T>,
) -> BoxStream<'static, T> {
    futures::stream::unfold(receiver, |mut receiver| async move {
        loop {
            match receiver.recv().await {
                Ok(item) => return Some((item, receiver)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .boxed()
}

/// A stored record: `r`, its revision (big-endian), its JSON. A value that starts with `{` is
/// a record written before revisions existed (revision 0).
#[doc(hidden)] // pub for the fuzz targets (`fuzz`); not a stable interface.
pub fn encode_record(record: &CallRecord, revision: Revision) -> Result<Vec<u8>, BackendError> {
    let mut out = Vec::with_capacity(256);
    out.push(b'r');
    out.extend_from_slice(&revision.to_be_bytes());
    serde_json::to_writer(&mut out, record)?;
    Ok(out)
}

#[doc(hidden)] // pub for the fuzz targets (`fuzz`); not a stable interface.
pub fn decode_record(raw: &[u8]) -> Option<(CallRecord, Revision)> {
    if raw.first() == Some(&b'{') {
        return serde_json::from_slice(raw).ok().map(|r| (r, 0));
    }
    let revision = u64::from_be_bytes(raw.get(1..9)?.try_into().ok()?);
    (raw.first() == Some(&b'r'))
        .then(|| serde_json::from_slice(raw.get(9..)?).ok())
        .flatten()
        .map(|r| (r, revision))
}

/// State of one pull request.
struct Pull {
    inner: Arc<Inner>,
    remaining: usize,
    deadline: Instant,
}

impl CallRecords for EmbeddedQueue {
    async fn record(&self, call_id: &str) -> Result<Option<CallRecord>, BackendError> {
        Ok(self.record_entry(call_id).await?.map(|entry| entry.record))
    }

    async fn record_entry(&self, call_id: &str) -> Result<Option<RecordEntry>, BackendError> {
        let Some(raw) = self.inner.records.get(call_id.as_bytes())? else {
            return Ok(None);
        };
        let (record, revision) = decode_record(&raw)
            .ok_or_else(|| corrupt(format!("records/{call_id}"), "unreadable call record"))?;
        let oldest = unix_nanos_now().saturating_sub(nanos(self.inner.options.records_retention));
        // Results are kept in their own tree here (one batch writes both): none inline.
        Ok((record.updated_at >= oldest).then_some(RecordEntry {
            record,
            revision,
            inline_result: None,
        }))
    }

    async fn write_record(
        &self,
        call_id: &str,
        expected: Option<Revision>,
        record: &CallRecord,
        result: Option<Bytes>,
    ) -> Result<Revision, RecordWriteError> {
        let inner = &self.inner;
        let result = result.map(|encoded| {
            inner
                .options
                .sealing
                .seal(Purpose::Result, call_id.as_bytes(), encoded)
        });
        let _guard = inner
            .records_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let oldest = unix_nanos_now().saturating_sub(nanos(inner.options.records_retention));
        let current = inner
            .records
            .get(call_id.as_bytes())
            .map_err(BackendError::from)?
            .and_then(|raw| decode_record(&raw))
            .filter(|(r, _)| r.updated_at >= oldest)
            .map(|(_, revision)| revision);
        if current != expected.filter(|&r| r != super::NOT_STORED) {
            return Err(RecordWriteError::Conflict);
        }
        let revision = current.map_or(1, |r| r.saturating_add(1));
        if let Some(sealed) = result {
            inner
                .results
                .insert(call_id.as_bytes(), sealed.as_ref())
                .map_err(BackendError::from)?;
        }
        inner
            .records
            .insert(call_id.as_bytes(), encode_record(record, revision)?)
            .map_err(BackendError::from)?;
        Ok(revision)
    }

    async fn delete_record(&self, call_id: &str) -> Result<(), BackendError> {
        let _guard = self
            .inner
            .records_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.inner.records.remove(call_id.as_bytes())?;
        Ok(())
    }

    async fn result(&self, call_id: &str) -> Result<Option<StoredResult>, BackendError> {
        match self.inner.results.get(call_id.as_bytes())? {
            Some(raw) => {
                let opened =
                    self.inner
                        .options
                        .sealing
                        .open(Purpose::Result, call_id.as_bytes(), &raw)?;
                StoredResult::decode(&opened)
                    .map(Some)
                    .ok_or_else(|| corrupt(format!("results/{call_id}"), "unreadable result"))
            }
            None => Ok(None),
        }
    }

    fn max_result_bytes(&self) -> usize {
        self.inner.options.max_result_bytes
    }

    fn max_stored_result_bytes(&self) -> u64 {
        self.inner.options.max_result_bytes as u64
    }

    fn sealing(&self) -> &Sealing {
        &self.inner.options.sealing
    }

    async fn claim_idempotency_key(
        &self,
        key: &str,
        call_id: &str,
    ) -> Result<Option<String>, BackendError> {
        let inner = &self.inner;
        let _guard = inner
            .records_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let oldest = unix_nanos_now().saturating_sub(nanos(inner.options.records_retention));
        if let Some(raw) = inner.idempotency.get(key.as_bytes())?
            && let Some((at, holder)) = decode_claim(&raw)
            && at >= oldest
        {
            return Ok(Some(holder));
        }
        inner
            .idempotency
            .insert(key.as_bytes(), encode_claim(unix_nanos_now(), call_id))?;
        Ok(None)
    }

    async fn release_idempotency_key(&self, key: &str) -> Result<(), BackendError> {
        self.inner.idempotency.remove(key.as_bytes())?;
        Ok(())
    }

    async fn announce_outcome(&self, event: &OutcomeEvent) {
        // No receiver (no gateway in this process) is fine.
        let _ = self.inner.outcomes.send(event.clone());
    }

    async fn outcomes(&self) -> Result<BoxStream<'static, OutcomeEvent>, BackendError> {
        Ok(announcements(self.inner.outcomes.subscribe()))
    }

    async fn paused_functions(&self) -> Result<Vec<String>, BackendError> {
        Ok(match self.inner.records.get(PAUSED_KEY)? {
            Some(raw) => serde_json::from_slice(&raw).unwrap_or_default(),
            None => Vec::new(),
        })
    }

    async fn paused_updates(&self) -> Result<BoxStream<'static, Vec<String>>, BackendError> {
        let mut receiver = self.inner.paused.subscribe();
        receiver.mark_changed();
        Ok(
            futures::stream::unfold(receiver, |mut receiver| async move {
                receiver.changed().await.ok()?;
                let list = receiver.borrow_and_update().clone();
                Some((list, receiver))
            })
            .boxed(),
        )
    }

    async fn set_paused(&self, function: &str, paused: bool) -> Result<Vec<String>, BackendError> {
        let inner = &self.inner;
        let list = {
            let _guard = inner
                .records_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let current: Vec<String> = match inner.records.get(PAUSED_KEY)? {
                Some(raw) => serde_json::from_slice(&raw).unwrap_or_default(),
                None => Vec::new(),
            };
            let list = records::with_paused(current, function, paused);
            inner
                .records
                .insert(PAUSED_KEY, serde_json::to_vec(&list)?)?;
            inner.paused.send_replace(list.clone());
            list
        };
        inner.flusher.flush(&inner.db).await?;
        Ok(list)
    }

    async fn announce_cancel(&self, call_id: &str) -> Result<(), BackendError> {
        // No receiver (no worker running) is fine: the record says cancelled.
        let _ = self.inner.cancels.send(call_id.to_owned());
        Ok(())
    }

    async fn cancellations(&self) -> Result<BoxStream<'static, String>, BackendError> {
        // Missed announcements: the record check before and after each attempt covers them.
        Ok(announcements(self.inner.cancels.subscribe()))
    }

    async fn announce_worker_status(
        &self,
        status: &super::WorkerStatus,
    ) -> Result<(), BackendError> {
        let mut statuses = self.inner.worker_statuses();
        let now = unix_nanos_now();
        statuses.retain(|_, s| s.is_fresh(now));
        statuses.insert(status.worker.clone(), status.clone());
        Ok(())
    }

    async fn withdraw_worker_status(&self, worker: &str) -> Result<(), BackendError> {
        self.inner.worker_statuses().remove(worker);
        Ok(())
    }

    async fn worker_statuses(&self) -> Result<Vec<super::WorkerStatus>, BackendError> {
        let now = unix_nanos_now();
        let mut out: Vec<_> = (self.inner.worker_statuses().values())
            .filter(|s| s.is_fresh(now))
            .cloned()
            .collect();
        out.sort_by(|a, b| a.worker.cmp(&b.worker));
        Ok(out)
    }
}

impl CallQueue for EmbeddedQueue {
    type Delivery = EmbeddedDelivery;

    async fn publish(&self, call: &QueuedCall) -> Result<Published, PublishError> {
        let payload = call.encode_with(&self.inner.options.sealing)?;
        let subject = call_subject(&self.inner.options.subject_prefix, call);
        self.inner
            .publish_raw(
                &subject,
                &payload,
                &call.meta.call_id,
                call.meta.not_before_unix_nanos,
            )
            .await
    }

    fn duplicate_window(&self) -> Duration {
        self.inner.options.duplicate_window
    }

    fn max_message_bytes(&self) -> usize {
        self.inner.options.max_message_bytes
    }

    async fn check_ready(&self) -> Result<(), String> {
        if self.inner.options.max_bytes > 0 {
            let bytes = self.inner.schedule().bytes;
            if bytes >= self.inner.options.max_bytes {
                return Err(format!("the queue is full ({bytes} bytes)"));
            }
        }
        Ok(())
    }

    async fn pull(
        &self,
        max: usize,
        expires: Duration,
    ) -> Result<BoxStream<'static, Result<EmbeddedDelivery, BackendError>>, BackendError> {
        let state = Pull {
            inner: self.inner.clone(),
            remaining: max,
            deadline: Instant::now() + expires,
        };
        Ok(futures::stream::unfold(state, |mut state| async move {
            loop {
                if state.remaining == 0 {
                    return None;
                }
                // Registered before looking, so a publish in between is not missed.
                let inner = state.inner.clone();
                let mut woken = pin!(inner.wake.notified());
                woken.as_mut().enable();
                match state.inner.take_due() {
                    Ok(Some(delivery)) => {
                        state.remaining -= 1;
                        return Some((Ok(delivery), state));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        state.remaining = 0;
                        return Some((Err(e), state));
                    }
                }
                let now = Instant::now();
                if now >= state.deadline {
                    return None;
                }
                let mut wait = state.deadline - now;
                if let Some(due_in) = state.inner.next_due_in() {
                    wait = wait.min(due_in.max(Duration::from_millis(1)));
                }
                tokio::select! {
                    () = woken => {}
                    () = tokio::time::sleep(wait) => {}
                }
            }
        })
        .boxed())
    }

    async fn dead_letter(
        &self,
        payload: Bytes,
        letter: &DeadLetter<'_>,
    ) -> Result<(), PublishError> {
        let inner = &self.inner;
        let id_key = format!("{}-{}", letter.original_subject, letter.stream_sequence);
        let not_stored = |e: &dyn std::fmt::Display| PublishError::NotStored(e.to_string());
        let record = encode_dead(&letter.fields(), &payload)?;
        let seq = inner.db.generate_id().map_err(|e| not_stored(&e))?;
        let outcome = (&inner.dead, &inner.dead_ids).transaction(|(dead, ids)| {
            if ids.get(id_key.as_bytes())?.is_some() {
                return Ok(());
            }
            ids.insert(id_key.as_bytes(), &seq_key(seq))?;
            dead.insert(&seq_key(seq), record.as_slice())?;
            Ok(())
        });
        outcome.map_err(|e: TransactionError<()>| not_stored(&format!("{e:?}")))?;
        inner
            .flusher
            .flush(&inner.db)
            .await
            .map_err(|e| not_stored(&e))
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetterEntry>, BackendError> {
        Ok(self
            .inner
            .dead_letter_entries()?
            .into_iter()
            .map(|(entry, ..)| entry)
            .collect())
    }

    async fn replay_dead_letters(
        &self,
        selectors: &[DeadLetterSelector],
        all: bool,
    ) -> Result<Vec<DeadLetterEntry>, BackendError> {
        let mut replayed = Vec::new();
        for (entry, subject, payload) in self.inner.dead_letter_entries()? {
            if !entry.selected(selectors, all) {
                continue;
            }
            if subject.is_empty() {
                return Err(BackendError::NoSubject(entry.sequence));
            }
            // A fresh dedup id: the call id may still be inside the duplicate window.
            self.inner
                .publish_raw(
                    &subject,
                    &payload,
                    &format!("replay-dead-{}", entry.sequence),
                    None,
                )
                .await
                .map_err(|e| BackendError::Request(e.to_string()))?;
            self.inner.dead.remove(seq_key(entry.sequence))?;
            replayed.push(entry);
        }
        self.inner.flusher.flush(&self.inner.db).await?;
        Ok(replayed)
    }

    async fn purge_dead_letters(
        &self,
        selectors: &[DeadLetterSelector],
        all: bool,
    ) -> Result<Vec<DeadLetterEntry>, BackendError> {
        let mut deleted = Vec::new();
        for (entry, ..) in self.inner.dead_letter_entries()? {
            if entry.selected(selectors, all)
                && self.inner.dead.remove(seq_key(entry.sequence))?.is_some()
            {
                deleted.push(entry);
            }
        }
        self.inner.flusher.flush(&self.inner.db).await?;
        Ok(deleted)
    }

    async fn function_stats(&self) -> Result<Vec<super::FunctionQueueStats>, BackendError> {
        let now = unix_nanos_now();
        let mut by_subject: HashMap<Arc<str>, (u64, u64)> = HashMap::new();
        for entry in self.inner.schedule().entries.values() {
            if entry.is_scheduled(now) {
                continue;
            }
            let slot = by_subject
                .entry(entry.subject.clone())
                .or_insert((0, entry.published_at));
            slot.0 += 1;
            slot.1 = slot.1.min(entry.published_at);
        }
        let prefix = &self.inner.options.subject_prefix;
        let mut out: Vec<_> = by_subject
            .into_iter()
            .filter_map(|(subject, (pending, oldest))| {
                Some(super::FunctionQueueStats {
                    function: super::function_of_subject(prefix, &subject)?,
                    pending,
                    oldest_age_seconds: Duration::from_nanos(now.saturating_sub(oldest))
                        .as_secs_f64(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.function.cmp(&b.function));
        Ok(out)
    }

    async fn scheduled_stats(&self) -> Result<Vec<super::FunctionScheduled>, BackendError> {
        let now = unix_nanos_now();
        let prefix = &self.inner.options.subject_prefix;
        let counts: Vec<(String, u64)> = (self.inner.schedule().entries.values())
            .filter(|e| e.is_scheduled(now))
            .filter_map(|e| Some((super::function_of_subject(prefix, &e.subject)?, 1)))
            .collect();
        Ok(super::status::scheduled_rows(counts))
    }

    async fn stats(&self) -> Result<super::QueueStats, BackendError> {
        let now = unix_nanos_now();
        let (pending, unacked, oldest, scheduled) = {
            let schedule = self.inner.schedule();
            let scheduled = schedule
                .entries
                .values()
                .filter(|e| e.is_scheduled(now))
                .count() as u64;
            (
                schedule.entries.len() as u64 - scheduled,
                schedule.entries.values().filter(|e| e.leased).count() as u64,
                schedule
                    .entries
                    .values()
                    .filter(|e| !e.is_scheduled(now))
                    .map(|e| e.published_at)
                    .min(),
                scheduled,
            )
        };
        let oldest_age_seconds = oldest.map_or(0.0, |at| {
            Duration::from_nanos(unix_nanos_now().saturating_sub(at)).as_secs_f64()
        });
        Ok(super::QueueStats {
            pending,
            unacked,
            consumers: 1,
            dead_letters: self.inner.dead.len() as u64,
            scheduled,
            oldest_age_seconds,
        })
    }

    async fn flush_before_exit(&self) {
        if let Err(e) = self.inner.flusher.flush(&self.inner.db).await {
            tracing::warn!(error = %e, "could not flush the embedded queue at exit");
        }
    }
}

/// A message of the embedded queue delivered to this worker.
#[derive(Clone)]
pub struct EmbeddedDelivery {
    queue: Arc<Inner>,
    sequence: u64,
    attempt: u32,
    subject: Arc<str>,
    payload: Bytes,
}

impl std::fmt::Debug for EmbeddedDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the payload: it may be confidential.
        f.debug_struct("EmbeddedDelivery")
            .field("sequence", &self.sequence)
            .field("attempt", &self.attempt)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

impl QueueDelivery for EmbeddedDelivery {
    fn payload(&self) -> &Bytes {
        &self.payload
    }

    fn subject(&self) -> &str {
        &self.subject
    }

    fn sequence(&self) -> u64 {
        self.sequence
    }

    fn attempt(&self) -> u32 {
        self.attempt
    }

    async fn ack(&self) -> Result<(), BackendError> {
        self.queue.remove(self.sequence)
    }

    async fn nak(&self, delay: Option<Duration>) -> Result<(), BackendError> {
        self.queue.nak(self.sequence, self.attempt, delay)
    }

    async fn in_progress(&self) -> Result<(), BackendError> {
        self.queue.in_progress(self.sequence, self.attempt);
        Ok(())
    }

    async fn terminate(&self) -> Result<(), BackendError> {
        self.queue.remove(self.sequence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let raw = encode_message(5, "faas-async._.echo", b"payload");
        assert_eq!(
            decode_message_header(&raw).map(|(at, s, _)| (at, s)),
            Some((5, "faas-async._.echo"))
        );
        assert_eq!(
            decode_message(&raw),
            Some((
                "faas-async._.echo".to_owned(),
                Bytes::from_static(b"payload")
            ))
        );
        assert_eq!(decode_delivery(&encode_delivery(3, 99)), Some((3, 99)));
        assert_eq!(dedup_time(&encode_dedup(7, 8)), Some(7));
        let dead = encode_dead(&[("Dead-Letter-Reason", "expired".into())], b"m").unwrap();
        let (record, payload) = decode_dead(&dead).unwrap();
        assert_eq!(
            record.fields,
            vec![("Dead-Letter-Reason".into(), "expired".into())]
        );
        assert_eq!(payload, Bytes::from_static(b"m"));
    }

    #[test]
    fn unknown_versions_and_short_records_are_rejected() {
        let mut raw = encode_message(1, "s", b"p");
        raw[0] = 99;
        assert_eq!(decode_message(&raw), None);
        assert_eq!(decode_message(&[RECORD_VERSION, 0]), None);
        assert_eq!(decode_delivery(&[0; 5]), None);
        assert!(decode_dead(&[RECORD_VERSION, 0, 0, 0, 9, b'{']).is_none());
    }
}
