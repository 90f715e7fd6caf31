//! Call records: where every call is, kept by the gateway and the workers in a store every
//! gateway replica can read (JetStream: a key-value bucket with a TTL; embedded: a sled tree),
//! keyed by call id. A record holds the call's state, its timestamps and a timeline: one entry
//! per attempt and one per callback delivery. The function's final response is kept with it
//! (up to a size; a small one inside the record's stored value, see [`stored_record_value`]) so
//! callers can fetch the result without a callback server.
//!
//! Writers only ever apply one [`Event`] with a compare-and-set loop, so the gateway and a
//! worker (or two workers after a redelivery) never overwrite each other's entries.

use serde::{Deserialize, Serialize};

/// Where a call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallState {
    /// Stored with a time not to run before (`X-Delay`, `X-Not-Before`), which has not come
    /// yet (`scheduled_for`). Then `queued`.
    Scheduled,
    /// Stored, waiting for a worker.
    Queued,
    /// A worker is invoking the function.
    Running,
    /// An attempt failed with a retryable error; the next one is scheduled.
    Retrying,
    /// The function's final answer was a success (2xx).
    Succeeded,
    /// The function's final answer was a failure that is not retried.
    Failed,
    /// Given up (attempts used up, callback undeliverable, undecodable): in the dead letters.
    DeadLettered,
    /// Cancelled before it finished.
    Cancelled,
    /// Older than its maximum age before it could run.
    Expired,
}

impl CallState {
    /// The call will not change state any more (a dead-letter replay starts it again).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::DeadLettered | Self::Cancelled | Self::Expired
        )
    }
}

/// One attempt at invoking the function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptEntry {
    /// 1 for the first.
    pub attempt: u32,
    /// When it started, Unix nanoseconds.
    pub started_at: u64,
    /// How long the function took, when it returned.
    pub duration_ms: Option<u64>,
    /// The function's status (503 for a refused connection or a timeout).
    pub status: Option<u16>,
    /// Why it failed, data-free.
    pub error: Option<String>,
}

/// One callback delivery (all its HTTP attempts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackEntry {
    /// When it ended, Unix nanoseconds.
    pub at: u64,
    /// The receiver's last status, if it answered.
    pub status: Option<u16>,
    /// HTTP attempts made.
    pub attempts: u32,
    /// Delivered (2xx).
    pub delivered: bool,
    /// Why it failed, data-free.
    pub error: Option<String>,
}

/// Where one call is, as `GET /async-calls/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    /// The call id.
    pub call_id: String,
    /// `name` or `name.namespace`.
    pub function: String,
    /// Current state.
    pub state: CallState,
    /// When the gateway accepted it, Unix nanoseconds.
    pub accepted_at: u64,
    /// Last change, Unix nanoseconds.
    pub updated_at: u64,
    /// Whether a callback URL was given (the URL itself is not kept here).
    pub has_callback: bool,
    /// One entry per attempt.
    pub attempts: Vec<AttemptEntry>,
    /// One entry per callback delivery.
    pub callbacks: Vec<CallbackEntry>,
    /// Why it was dead-lettered.
    pub dead_letter_reason: Option<String>,
    /// What the result endpoint can return: `stored`, `too_large`, or none yet.
    pub result: Option<ResultAvailability>,
    /// The limits the worker applies (its settings for the function, with the call's own
    /// `X-Max-Retries`, `X-Timeout`, `X-Max-Age`), from the first attempt on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<CallLimits>,
    /// SHA-256 (hex) of the request the gateway accepted (method, path, query, callback URL,
    /// body), written with the queued record of a call whose id the client chose: a request
    /// that reuses the call id is the same call retried only if it is the same request. Workers do not carry it on (it only
    /// matters while the call is queued); the API does not show it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_digest: Option<String>,
    /// A scheduled call's time (`X-Delay`, `X-Not-Before`), Unix nanoseconds: not run before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_for: Option<u64>,
    /// When a scheduled call joined the queue (left `scheduled` for `queued`), Unix
    /// nanoseconds: its timeline is `accepted_at`, `queued_at`, then the attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_at: Option<u64>,
}

/// The limits a call runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallLimits {
    /// Attempts at most (retries + 1).
    pub max_attempts: u32,
    /// Longest single invocation, milliseconds.
    pub timeout_ms: u64,
    /// Oldest the call may be when an attempt starts, milliseconds.
    pub max_age_ms: u64,
}

/// Whether the final response was kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultAvailability {
    /// Kept; `GET /async-calls/{id}/result` returns it.
    Stored,
    /// Larger than the configured limit: not kept (never truncated).
    TooLarge,
}

/// A change to a record. Applying the same event twice (a redelivery) is harmless.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The gateway stored the call.
    Accepted {
        /// `name` or `name.namespace`.
        function: String,
        /// Unix nanoseconds.
        at: u64,
        /// A callback URL was given.
        has_callback: bool,
        /// Not to be run before this time (a scheduled call), Unix nanoseconds.
        not_before: Option<u64>,
    },
    /// A scheduled call's time came: it was moved onto the queue.
    Released {
        /// Unix nanoseconds.
        at: u64,
    },
    /// A worker started an attempt.
    AttemptStarted {
        /// `name` or `name.namespace`.
        function: String,
        /// Which attempt.
        attempt: u32,
        /// Unix nanoseconds.
        at: u64,
        /// When the gateway accepted it.
        accepted_at: u64,
        /// The limits it runs under.
        limits: Option<CallLimits>,
    },
    /// The attempt ended; `next` is the state it leaves the call in.
    AttemptEnded {
        /// Which attempt.
        attempt: u32,
        /// Function status.
        status: u16,
        /// Duration.
        duration_ms: u64,
        /// Why it failed.
        error: Option<String>,
        /// `Retrying`, `Succeeded` or `Failed`.
        next: CallState,
        /// Whether the response was kept for the result endpoint.
        result: Option<ResultAvailability>,
    },
    /// A callback delivery ended.
    Callback(CallbackEntry),
    /// A client asked to cancel the call; ignored once the call is final.
    Cancel,
    /// The call ended without a normal final answer.
    GaveUp {
        /// `DeadLettered`, `Expired` or `Cancelled`.
        state: CallState,
        /// Dead-letter reason, if any.
        reason: Option<String>,
        /// `name` or `name.namespace`.
        function: String,
        /// When the gateway accepted it.
        accepted_at: u64,
    },
}

impl CallRecord {
    fn new(call_id: &str, function: &str, accepted_at: u64) -> Self {
        Self {
            call_id: call_id.to_owned(),
            function: function.to_owned(),
            state: CallState::Queued,
            accepted_at,
            updated_at: accepted_at,
            has_callback: false,
            attempts: Vec::new(),
            callbacks: Vec::new(),
            dead_letter_reason: None,
            result: None,
            limits: None,
            request_digest: None,
            scheduled_for: None,
            queued_at: None,
        }
    }

    /// The record as the API shows it at `now` (without what is kept for the gateway's own
    /// checks). A scheduled call whose time has passed is queued, whether or not a scheduler
    /// wrote so yet (the embedded queue offers it to the workers at that time by itself).
    pub fn for_api(mut self, now: u64) -> Self {
        self.request_digest = None;
        if self.state == CallState::Scheduled
            && let Some(due) = self.scheduled_for.filter(|due| *due <= now)
        {
            self.state = CallState::Queued;
            self.queued_at.get_or_insert(due);
        }
        self
    }

    /// Notes that a scheduled call left the schedule at `at` (the first time only).
    fn queued_now(&mut self, at: u64) {
        if self.scheduled_for.is_some() && self.queued_at.is_none() {
            self.queued_at = Some(at);
        }
    }
}

/// Applies `event` to the current record (none if the call is not known yet).
pub fn apply(call_id: &str, current: Option<CallRecord>, event: &Event, now: u64) -> CallRecord {
    match event {
        Event::Accepted {
            function,
            at,
            has_callback,
            not_before,
        } => {
            // A worker may have been faster than the gateway's record write: keep its news.
            let mut record = current.unwrap_or_else(|| {
                let mut new = CallRecord::new(call_id, function, *at);
                if not_before.is_some() {
                    new.state = CallState::Scheduled;
                }
                new
            });
            record.has_callback = *has_callback;
            record.accepted_at = *at;
            if not_before.is_some() {
                record.scheduled_for = *not_before;
            }
            record
        }
        Event::Released { at } => {
            let mut record = current.unwrap_or_else(|| CallRecord::new(call_id, "", *at));
            // Only a call still scheduled becomes queued: a cancel, or a worker that already
            // started it, stays as it is.
            if record.state == CallState::Scheduled {
                record.state = CallState::Queued;
            }
            record.queued_now(*at);
            record.updated_at = now;
            record
        }
        Event::AttemptStarted {
            function,
            attempt,
            at,
            accepted_at,
            limits,
        } => {
            let mut record =
                current.unwrap_or_else(|| CallRecord::new(call_id, function, *accepted_at));
            if record.state == CallState::Cancelled {
                // Not started: the worker sees the state and does not invoke.
                return record;
            }
            if limits.is_some() {
                record.limits = *limits;
            }
            // A scheduled call offered at its time (no scheduler wrote `queued`): it was queued
            // then.
            if let Some(due) = record.scheduled_for {
                record.queued_now(due.min(*at));
            }
            if !record.attempts.iter().any(|a| a.attempt == *attempt) {
                record.attempts.push(AttemptEntry {
                    attempt: *attempt,
                    started_at: *at,
                    duration_ms: None,
                    status: None,
                    error: None,
                });
            }
            if !record.state.is_final() || record.state == CallState::DeadLettered {
                // A dead letter that was replayed runs again.
                record.state = CallState::Running;
                record.dead_letter_reason = None;
            }
            record.updated_at = now;
            record
        }
        Event::AttemptEnded {
            attempt,
            status,
            duration_ms,
            error,
            next,
            result,
        } => {
            let mut record = current.unwrap_or_else(|| CallRecord::new(call_id, "", now));
            match record.attempts.iter_mut().find(|a| a.attempt == *attempt) {
                Some(entry) => {
                    entry.status = Some(*status);
                    entry.duration_ms = Some(*duration_ms);
                    entry.error.clone_from(error);
                }
                None => record.attempts.push(AttemptEntry {
                    attempt: *attempt,
                    started_at: now.saturating_sub(duration_ms.saturating_mul(1_000_000)),
                    duration_ms: Some(*duration_ms),
                    status: Some(*status),
                    error: error.clone(),
                }),
            }
            if record.state != CallState::Cancelled {
                record.state = *next;
            }
            if result.is_some() {
                record.result = *result;
            }
            record.updated_at = now;
            record
        }
        Event::Callback(entry) => {
            let mut record = current.unwrap_or_else(|| CallRecord::new(call_id, "", now));
            record.callbacks.push(entry.clone());
            record.updated_at = now;
            record
        }
        Event::Cancel => {
            let mut record = current.unwrap_or_else(|| CallRecord::new(call_id, "", now));
            if !record.state.is_final() {
                record.state = CallState::Cancelled;
                record.updated_at = now;
            }
            record
        }
        Event::GaveUp {
            state,
            reason,
            function,
            accepted_at,
        } => {
            let mut record =
                current.unwrap_or_else(|| CallRecord::new(call_id, function, *accepted_at));
            record.state = *state;
            record.dead_letter_reason.clone_from(reason);
            record.updated_at = now;
            record
        }
    }
}

/// A finished call, announced by the workers for live statistics (the dashboard). Best effort:
/// a missed announcement only makes the live figures less complete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeEvent {
    /// The call id.
    pub call_id: String,
    /// `name` or `name.namespace`.
    pub function: String,
    /// `succeeded`, `failed`, `dead_lettered`, `expired` or `cancelled`.
    pub outcome: String,
    /// When it finished, Unix nanoseconds.
    pub at: u64,
    /// Acceptance to the final outcome.
    pub end_to_end_seconds: f64,
    /// The function's final status, if it answered.
    pub status: Option<u16>,
    /// Dead-letter reason, if any.
    pub reason: Option<String>,
}

/// `list` (of paused functions) with `function` paused or not; sorted, without duplicates.
pub fn with_paused(mut list: Vec<String>, function: &str, paused: bool) -> Vec<String> {
    list.retain(|f| f != function);
    if paused {
        list.push(function.to_owned());
        list.sort();
    }
    list
}

/// The key of a call id in a store whose keys are restricted (a JetStream key-value bucket:
/// letters, digits, `-`, `_`, `/`, `=`, `.` as a separator): the id itself when it is made of
/// letters, digits, `-` and `_` only (every generated id), else `=` and the id's bytes in hex
/// (`=` never starts a plain id, so the two never meet).
pub fn store_key(call_id: &str) -> std::borrow::Cow<'_, str> {
    if call_id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return std::borrow::Cow::Borrowed(call_id);
    }
    let mut out = String::with_capacity(1 + 2 * call_id.len());
    out.push('=');
    for byte in call_id.bytes() {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    std::borrow::Cow::Owned(out)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The storage key of an `Idempotency-Key` for a function: both hex-encoded, so any visible
/// ASCII key is a valid key-value store key.
pub fn idempotency_key(function: &str, client_key: &str) -> String {
    let mut out = String::with_capacity(5 + 2 * (function.len() + client_key.len() + 1));
    out.push_str("idem.");
    for byte in function.bytes().chain([b'\n']).chain(client_key.bytes()) {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// The function's final response, as kept for `GET /async-calls/{id}/result`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResult {
    /// Function status.
    pub status: u16,
    /// Response headers.
    pub headers: Vec<(String, String)>,
    /// Response body (empty when it is `stored`).
    pub body: Vec<u8>,
    /// The response body in the blob store, when it was above the inline threshold.
    pub stored: Option<crate::blobs::BlobRef>,
}

/// The metadata of a kept result: status, headers and, for a body in the blob store, where
/// it is (a third element older writers never wrote).
#[derive(serde::Deserialize)]
struct ResultMeta(
    u16,
    Vec<(String, String)>,
    #[serde(default)] Option<crate::blobs::BlobRef>,
);

impl StoredResult {
    /// Encodes for storage: the metadata as length-prefixed JSON, then the raw body.
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        Self::encode_parts(self.status, &self.headers, &self.body, self.stored.as_ref())
    }

    /// [`StoredResult::encode`] of a response still in its parts, without copying them into a
    /// `StoredResult` first.
    pub fn encode_parts(
        status: u16,
        headers: &[(String, String)],
        body: &[u8],
        stored: Option<&crate::blobs::BlobRef>,
    ) -> Result<Vec<u8>, serde_json::Error> {
        let meta = match stored {
            None => serde_json::to_vec(&(status, headers))?,
            Some(stored) => serde_json::to_vec(&(status, headers, stored))?,
        };
        let len = u32::try_from(meta.len()).unwrap_or(u32::MAX).to_be_bytes();
        let mut out = Vec::with_capacity(4 + meta.len() + body.len());
        out.extend_from_slice(&len);
        out.extend_from_slice(&meta);
        out.extend_from_slice(body);
        Ok(out)
    }

    /// Decodes what [`StoredResult::encode`] wrote.
    pub fn decode(raw: &[u8]) -> Option<Self> {
        let len = usize::try_from(u32::from_be_bytes(raw.get(..4)?.try_into().ok()?)).ok()?;
        let end = 4usize.checked_add(len)?;
        let ResultMeta(status, headers, stored) = serde_json::from_slice(raw.get(4..end)?).ok()?;
        let body = raw.get(end..)?;
        if stored.is_some() && !body.is_empty() {
            return None;
        }
        Some(Self {
            status,
            headers,
            body: body.to_vec(),
            stored,
        })
    }
}

/// First byte of a stored record value that carries a kept result after the record (a plain
/// record is its JSON, whose first byte is `{`).
const WITH_RESULT: u8 = 0x01;

/// A record as a backend stores it in one value: the record's JSON, or, with a small kept
/// result (already sealed when encryption is on), `0x01`, the JSON's length (u32, big-endian),
/// the JSON, then the result. One write keeps both, and a reader that sees the record say
/// `stored` has the result in the same value.
pub fn stored_record_value(record_json: &[u8], result: Option<&[u8]>) -> Vec<u8> {
    let Some(result) = result else {
        return record_json.to_vec();
    };
    let len = u32::try_from(record_json.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(5 + record_json.len() + result.len());
    out.push(WITH_RESULT);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(record_json);
    out.extend_from_slice(result);
    out
}

/// Takes apart what [`stored_record_value`] wrote: the record's JSON and the kept result, if
/// the value carries one. `None` for a value that is neither form (a short or lying frame).
pub fn split_stored_record(raw: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
    match raw.first() {
        Some(&WITH_RESULT) => {
            let len = usize::try_from(u32::from_be_bytes(raw.get(1..5)?.try_into().ok()?)).ok()?;
            let end = 5usize.checked_add(len)?;
            Some((raw.get(5..end)?, Some(raw.get(end..)?)))
        }
        Some(_) => Some((raw, None)),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(attempt: u32) -> Event {
        Event::AttemptStarted {
            function: "f".into(),
            attempt,
            at: 10,
            accepted_at: 1,
            limits: None,
        }
    }

    fn ended(attempt: u32, status: u16, next: CallState) -> Event {
        Event::AttemptEnded {
            attempt,
            status,
            duration_ms: 5,
            error: None,
            next,
            result: None,
        }
    }

    #[test]
    fn a_call_moves_through_its_states_with_one_entry_per_attempt() {
        let accepted = Event::Accepted {
            function: "f".into(),
            at: 1,
            has_callback: true,
            not_before: None,
        };
        let r = apply("id", None, &accepted, 1);
        assert_eq!(r.state, CallState::Queued);
        let r = apply("id", Some(r), &started(1), 2);
        assert_eq!(r.state, CallState::Running);
        let r = apply("id", Some(r), &ended(1, 503, CallState::Retrying), 3);
        assert_eq!(r.state, CallState::Retrying);
        // A redelivered start of the same attempt adds nothing.
        let r = apply("id", Some(r), &started(2), 4);
        let r = apply("id", Some(r), &started(2), 4);
        let r = apply("id", Some(r), &ended(2, 200, CallState::Succeeded), 5);
        assert_eq!(r.state, CallState::Succeeded);
        assert_eq!(r.attempts.len(), 2);
        assert_eq!(r.attempts[0].status, Some(503));
        assert_eq!(r.attempts[1].status, Some(200));
        assert!(r.has_callback);
    }

    #[test]
    fn the_gateway_writing_late_keeps_the_workers_progress() {
        let r = apply("id", None, &started(1), 2);
        let r = apply(
            "id",
            Some(r),
            &Event::Accepted {
                function: "f".into(),
                at: 1,
                has_callback: false,
                not_before: None,
            },
            3,
        );
        assert_eq!(r.state, CallState::Running);
        assert_eq!(r.attempts.len(), 1);
    }

    #[test]
    fn a_cancelled_call_stays_cancelled_and_a_finished_one_cannot_be_cancelled() {
        let r = apply("id", None, &started(1), 1);
        let r = apply("id", Some(r), &Event::Cancel, 2);
        assert_eq!(r.state, CallState::Cancelled);
        // The running attempt ends: the call stays cancelled, the attempt is recorded.
        let r = apply("id", Some(r), &ended(1, 200, CallState::Succeeded), 3);
        assert_eq!(r.state, CallState::Cancelled);
        assert_eq!(r.attempts[0].status, Some(200));
        // A redelivery does not start a new attempt.
        let r = apply("id", Some(r), &started(2), 4);
        assert_eq!((r.state, r.attempts.len()), (CallState::Cancelled, 1));

        let done = apply("id", None, &ended(1, 200, CallState::Succeeded), 1);
        assert_eq!(
            apply("id", Some(done), &Event::Cancel, 2).state,
            CallState::Succeeded
        );
    }

    #[test]
    fn a_scheduled_call_goes_scheduled_queued_running_and_a_cancel_holds() {
        let accepted = Event::Accepted {
            function: "f".into(),
            at: 1,
            has_callback: false,
            not_before: Some(100),
        };
        let r = apply("id", None, &accepted, 1);
        assert_eq!(
            (r.state, r.scheduled_for, r.queued_at),
            (CallState::Scheduled, Some(100), None)
        );
        // Before its time the API shows it scheduled; after, queued (from its time).
        assert_eq!(r.clone().for_api(99).state, CallState::Scheduled);
        let shown = r.clone().for_api(100);
        assert_eq!(
            (shown.state, shown.queued_at),
            (CallState::Queued, Some(100))
        );
        let released = apply("id", Some(r.clone()), &Event::Released { at: 101 }, 101);
        assert_eq!(
            (released.state, released.queued_at),
            (CallState::Queued, Some(101))
        );
        let running = apply("id", Some(released), &started(1), 102);
        assert_eq!(
            (running.state, running.queued_at),
            (CallState::Running, Some(101))
        );
        // Started without a scheduler's word (the embedded queue): queued at its time.
        let late_start = Event::AttemptStarted {
            function: "f".into(),
            attempt: 1,
            at: 150,
            accepted_at: 1,
            limits: None,
        };
        let direct = apply("id", Some(r.clone()), &late_start, 150);
        assert_eq!(
            (direct.state, direct.queued_at),
            (CallState::Running, Some(100))
        );
        // A release never moves a call back, and a cancelled scheduled call stays cancelled.
        let again = apply("id", Some(direct), &Event::Released { at: 160 }, 160);
        assert_eq!(
            (again.state, again.queued_at),
            (CallState::Running, Some(100))
        );
        let cancelled = apply("id", Some(r), &Event::Cancel, 50);
        assert_eq!(cancelled.state, CallState::Cancelled);
        let cancelled = apply("id", Some(cancelled), &Event::Released { at: 100 }, 100);
        assert_eq!(cancelled.state, CallState::Cancelled);
        let cancelled = apply("id", Some(cancelled), &started(1), 101);
        assert_eq!(
            (cancelled.state, cancelled.attempts.len()),
            (CallState::Cancelled, 0)
        );
    }

    #[test]
    fn idempotency_keys_are_store_safe_and_scoped_by_function() {
        let k = idempotency_key("f.ns", "order 42/ä?");
        assert!(k.starts_with("idem."));
        assert!(k[5..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(k, idempotency_key("g.ns", "order 42/ä?"));
    }

    #[test]
    fn results_round_trip() {
        let result = StoredResult {
            status: 201,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: b"\x00binary\xff".to_vec(),
            stored: None,
        };
        let encoded = result.encode().unwrap();
        assert_eq!(StoredResult::decode(&encoded), Some(result.clone()));
        assert_eq!(StoredResult::decode(b"\x00\x00"), None);
        // What a writer before body references wrote reads the same.
        let meta = serde_json::to_vec(&(201, &result.headers)).unwrap();
        let mut old = u32::try_from(meta.len()).unwrap().to_be_bytes().to_vec();
        old.extend_from_slice(&meta);
        old.extend_from_slice(&result.body);
        assert_eq!(encoded, old);
        // A body in the blob store: the reference comes back, and a reference with a body
        // beside it is refused (one of the two is wrong).
        let by_ref = StoredResult {
            status: 200,
            headers: vec![],
            body: vec![],
            stored: Some(crate::blobs::BlobRef {
                key: "c1.result".into(),
                len: 1 << 30,
                sha256: "ab".repeat(32),
            }),
        };
        let mut encoded = by_ref.encode().unwrap();
        assert_eq!(StoredResult::decode(&encoded), Some(by_ref));
        encoded.push(b'x');
        assert_eq!(StoredResult::decode(&encoded), None);
    }

    #[test]
    fn store_keys_keep_plain_ids_and_encode_the_others_apart() {
        assert_eq!(store_key("0192a7c4-1b2c_x"), "0192a7c4-1b2c_x");
        assert_eq!(store_key("a.b"), "=612e62");
        assert_eq!(store_key("a/b"), "=612f62");
        // An id that looks like an encoded one is itself encoded: no two ids share a key.
        assert_eq!(store_key("=612e62"), "=3d363132653632");
        assert!(
            store_key("order#42@team:a ~")
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'=')
        );
    }

    #[test]
    fn a_stored_record_value_carries_a_result_or_is_plain_json() {
        let json = br#"{"call_id":"a"}"#;
        assert_eq!(
            split_stored_record(&stored_record_value(json, None)),
            Some((&json[..], None))
        );
        let both = stored_record_value(json, Some(b"\x00result"));
        assert_eq!(
            split_stored_record(&both),
            Some((&json[..], Some(&b"\x00result"[..])))
        );
        // An empty result is still a result.
        let empty = stored_record_value(json, Some(b""));
        assert_eq!(
            split_stored_record(&empty),
            Some((&json[..], Some(&b""[..])))
        );
        // Frames that lie about their length, or nothing at all.
        assert_eq!(split_stored_record(b""), None);
        assert_eq!(split_stored_record(b"\x01\x00\x00"), None);
        assert_eq!(split_stored_record(b"\x01\x00\x00\x00\x09{}"), None);
        assert_eq!(split_stored_record(b"\x01\xff\xff\xff\xff{}"), None);
    }
}
