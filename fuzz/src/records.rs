//! Call records and kept results as they are stored: JSON in the JetStream KV bucket (or
//! `0x01` + length + JSON + a small kept result in the same value), `r` +
//! revision + JSON (or legacy bare JSON) in the embedded queue's sled tree, the kept result as
//! a length-prefixed JSON head and the raw body, and the embedded queue's message values. Bytes
//! read back from a store another process (or another version) wrote.
//!
//! Properties:
//! - arbitrary bytes decode or are refused, never panic; what decodes re-encodes to bytes that
//!   decode to the same value (record, revision, result, message);
//! - any record encodes and decodes to itself, in the revisioned and in the legacy form, at any
//!   revision; any kept result and any message value likewise;
//! - applying events to a record keeps one entry per attempt started, and keeps a cancelled
//!   call cancelled unless it is given up; every intermediate record round-trips.

use arbitrary::{Result, Unstructured};
use queue_core::backend::embedded::{decode_message, decode_record, encode_message, encode_record};
use queue_core::blobs::BlobRef;
use queue_core::records::{
    AttemptEntry, CallLimits, CallRecord, CallState, CallbackEntry, Event, ResultAvailability,
    StoredResult, apply, split_stored_record, stored_record_value,
};

use crate::generate::{HEADER_PIECES, bytes, list, maybe_text, text};
use crate::{must, some};

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    stored_bytes(data);
    let mut u = Unstructured::new(data);
    if let Ok((record, revision)) = record(&mut u).and_then(|r| Ok((r, u.arbitrary()?))) {
        record_round_trip(&record, revision);
    }
    if let Ok(result) = stored_result(&mut u) {
        let encoded = must(result.encode(), "a result encodes");
        assert_eq!(StoredResult::decode(&encoded), Some(result.clone()));
        if let Ok(record) = record(&mut u) {
            // The JetStream form: the record's JSON with the kept result in one value.
            let json = must(serde_json::to_vec(&record), "a record encodes as JSON");
            let value = stored_record_value(&json, Some(&encoded));
            let (j, r) = some(split_stored_record(&value), "a record value splits");
            assert_eq!(
                must(serde_json::from_slice::<CallRecord>(j), "JSON"),
                record
            );
            assert_eq!(r.and_then(StoredResult::decode), Some(result));
        }
    }
    if let Ok((at, subject, payload)) = message(&mut u) {
        let encoded = encode_message(at, &subject, &payload);
        let (s, p) = some(decode_message(&encoded), "a message value decodes");
        assert_eq!(
            (s.as_str(), p.as_ref()),
            (subject.as_str(), payload.as_slice())
        );
    }
    if let Ok(events) = list(&mut u, 8, event) {
        apply_all(&events);
    }
}

fn stored_bytes(data: &[u8]) {
    if let Some((record, revision)) = decode_record(data) {
        match data.first() {
            Some(b'{') => assert_eq!(revision, 0, "a legacy record is revision 0"),
            Some(b'r') => assert_eq!(data.get(1..9), Some(&revision.to_be_bytes()[..])),
            other => panic!("a record decoded from a value starting with {other:?}"),
        }
        let encoded = must(encode_record(&record, revision), "a record encodes");
        assert_eq!(decode_record(&encoded), Some((record, revision)));
    }
    if let Ok(record) = serde_json::from_slice::<CallRecord>(data) {
        let json = must(serde_json::to_vec(&record), "a record encodes");
        assert_eq!(
            must(
                serde_json::from_slice::<CallRecord>(&json),
                "JSON round trip"
            ),
            record
        );
        if data.first() == Some(&b'{') {
            assert_eq!(decode_record(data), Some((record, 0)));
        }
    }
    if let Some((json, result)) = split_stored_record(data) {
        assert!(json.len() + result.map_or(0, <[u8]>::len) <= data.len());
        let again = stored_record_value(json, result);
        assert_eq!(split_stored_record(&again), Some((json, result)));
        if result.is_none() {
            assert_eq!(again, data, "a plain record value is its JSON");
        }
    }
    if let Some(result) = StoredResult::decode(data) {
        assert!(result.body.len() + 4 <= data.len());
        assert!(data.ends_with(&result.body));
        let encoded = must(result.encode(), "a decoded result encodes");
        assert_eq!(StoredResult::decode(&encoded), Some(result));
    }
    if let Some((subject, payload)) = decode_message(data) {
        assert!(data.ends_with(&payload));
        let published_at = u64::from_be_bytes(some(
            data.get(1..9).and_then(|b| b.try_into().ok()),
            "a decoded message has its time",
        ));
        let encoded = encode_message(published_at, &subject, &payload);
        assert_eq!(encoded, data, "a message value re-encodes to itself");
    }
}

fn record_round_trip(record: &CallRecord, revision: u64) {
    let encoded = must(encode_record(record, revision), "a record encodes");
    assert_eq!(decode_record(&encoded), Some((record.clone(), revision)));
    let legacy = must(serde_json::to_vec(record), "a record encodes as JSON");
    assert_eq!(decode_record(&legacy), Some((record.clone(), 0)));
    assert_eq!(
        must(
            serde_json::from_slice::<CallRecord>(&legacy),
            "JSON round trip"
        ),
        *record
    );
}

fn apply_all(events: &[Event]) {
    let mut current: Option<CallRecord> = None;
    for (now, event) in (1..).zip(events) {
        let before = current.as_ref().map(|r| r.state);
        let next = apply("call-1", current.take(), event, now);
        assert_eq!(next.call_id, "call-1");
        let mut attempts: Vec<u32> = next
            .attempts
            .iter()
            .map(|a: &AttemptEntry| a.attempt)
            .collect();
        attempts.sort_unstable();
        attempts.dedup();
        assert_eq!(attempts.len(), next.attempts.len(), "one entry per attempt");
        if before == Some(CallState::Cancelled) && !matches!(event, Event::GaveUp { .. }) {
            assert_eq!(next.state, CallState::Cancelled, "{event:?}");
        }
        if before.is_some_and(|s| s.is_final()) && matches!(event, Event::Cancel) {
            assert_eq!(Some(next.state), before, "a final call is not cancelled");
        }
        record_round_trip(&next, now);
        current = Some(next);
    }
}

const STATES: [CallState; 9] = [
    CallState::Scheduled,
    CallState::Queued,
    CallState::Running,
    CallState::Retrying,
    CallState::Succeeded,
    CallState::Failed,
    CallState::DeadLettered,
    CallState::Cancelled,
    CallState::Expired,
];
const TEXT_PIECES: &[&str] = &[
    "f", ".ns", "\"", "\\", "\u{0}", "é", "\u{ffff}", "timeout", " ",
];

fn availability(u: &mut Unstructured<'_>) -> Result<Option<ResultAvailability>> {
    Ok(*u.choose(&[
        None,
        Some(ResultAvailability::Stored),
        Some(ResultAvailability::TooLarge),
    ])?)
}

fn callback_entry(u: &mut Unstructured<'_>) -> Result<CallbackEntry> {
    Ok(CallbackEntry {
        at: u.arbitrary()?,
        status: u.arbitrary()?,
        attempts: u.arbitrary()?,
        delivered: u.arbitrary()?,
        error: maybe_text(u, TEXT_PIECES, 3)?,
    })
}

fn record(u: &mut Unstructured<'_>) -> Result<CallRecord> {
    Ok(CallRecord {
        call_id: text(u, TEXT_PIECES, 6)?,
        function: text(u, TEXT_PIECES, 4)?,
        state: *u.choose(&STATES)?,
        accepted_at: u.arbitrary()?,
        updated_at: u.arbitrary()?,
        has_callback: u.arbitrary()?,
        attempts: list(u, 4, |u| {
            Ok(AttemptEntry {
                attempt: u.arbitrary()?,
                started_at: u.arbitrary()?,
                duration_ms: u.arbitrary()?,
                status: u.arbitrary()?,
                error: maybe_text(u, TEXT_PIECES, 3)?,
            })
        })?,
        callbacks: list(u, 3, callback_entry)?,
        dead_letter_reason: maybe_text(u, TEXT_PIECES, 3)?,
        result: availability(u)?,
        limits: if u.arbitrary()? {
            Some(CallLimits {
                max_attempts: u.arbitrary()?,
                timeout_ms: u.arbitrary()?,
                max_age_ms: u.arbitrary()?,
            })
        } else {
            None
        },
        request_digest: maybe_text(u, TEXT_PIECES, 2)?,
        scheduled_for: u.arbitrary()?,
        queued_at: u.arbitrary()?,
    })
}

fn stored_result(u: &mut Unstructured<'_>) -> Result<StoredResult> {
    let status = u.arbitrary()?;
    let headers = list(u, 4, |u| {
        Ok((text(u, HEADER_PIECES, 3)?, text(u, HEADER_PIECES, 3)?))
    })?;
    let body = bytes(u, 64)?;
    // A result in the blob store has no body beside its reference.
    let stored = if body.is_empty() && u.arbitrary()? {
        Some(BlobRef {
            key: text(u, &["call-1", ".result", "é", "/"], 3)?,
            len: u.arbitrary()?,
            sha256: text(u, &["0f", "ab", "Z"], 32)?,
        })
    } else {
        None
    };
    Ok(StoredResult {
        status,
        headers,
        body,
        stored,
    })
}

fn message(u: &mut Unstructured<'_>) -> Result<(u64, String, Vec<u8>)> {
    Ok((
        u.arbitrary()?,
        text(u, &["faas-async", ".", "ns", "fn", "_", "é"], 8)?,
        bytes(u, 64)?,
    ))
}

fn event(u: &mut Unstructured<'_>) -> Result<Event> {
    let function = || "f".to_owned();
    Ok(match u.int_in_range(0..=6)? {
        0 => Event::Accepted {
            function: function(),
            at: u.int_in_range(0..=100)?,
            has_callback: u.arbitrary()?,
            not_before: u.arbitrary()?,
        },
        1 => Event::AttemptStarted {
            function: function(),
            attempt: u.int_in_range(1..=4)?,
            at: u.int_in_range(0..=100)?,
            accepted_at: u.int_in_range(0..=100)?,
            limits: if u.arbitrary()? {
                Some(CallLimits {
                    max_attempts: u.int_in_range(1..=5)?,
                    timeout_ms: u.arbitrary()?,
                    max_age_ms: u.arbitrary()?,
                })
            } else {
                None
            },
        },
        2 => Event::AttemptEnded {
            attempt: u.int_in_range(1..=4)?,
            status: u.arbitrary()?,
            duration_ms: u.arbitrary()?,
            error: maybe_text(u, TEXT_PIECES, 2)?,
            next: *u.choose(&[CallState::Retrying, CallState::Succeeded, CallState::Failed])?,
            result: availability(u)?,
        },
        3 => Event::Callback(callback_entry(u)?),
        4 => Event::Cancel,
        5 => Event::Released {
            at: u.int_in_range(0..=100)?,
        },
        _ => Event::GaveUp {
            state: *u.choose(&[
                CallState::DeadLettered,
                CallState::Expired,
                CallState::Cancelled,
            ])?,
            reason: maybe_text(u, TEXT_PIECES, 2)?,
            function: function(),
            accepted_at: u.int_in_range(0..=100)?,
        },
    })
}

/// Stored values as each store writes them: revisioned and legacy records, JetStream's JSON,
/// kept results, an embedded message value.
pub fn seeds() -> Vec<Vec<u8>> {
    let record = CallRecord {
        call_id: "0192a7c4-1b2c-7d3e-8f40-123456789abc".into(),
        function: "figlet.team-a".into(),
        state: CallState::Succeeded,
        accepted_at: 1_700_000_000_000_000_000,
        updated_at: 1_700_000_000_500_000_000,
        has_callback: true,
        attempts: vec![
            AttemptEntry {
                attempt: 1,
                started_at: 1_700_000_000_100_000_000,
                duration_ms: Some(12),
                status: Some(503),
                error: Some("function unavailable".into()),
            },
            AttemptEntry {
                attempt: 2,
                started_at: 1_700_000_000_300_000_000,
                duration_ms: Some(4),
                status: Some(200),
                error: None,
            },
        ],
        callbacks: vec![CallbackEntry {
            at: 1_700_000_000_400_000_000,
            status: Some(204),
            attempts: 1,
            delivered: true,
            error: None,
        }],
        dead_letter_reason: None,
        result: Some(ResultAvailability::Stored),
        limits: Some(CallLimits {
            max_attempts: 3,
            timeout_ms: 30_000,
            max_age_ms: 86_400_000,
        }),
        request_digest: None,
        scheduled_for: None,
        queued_at: None,
    };
    let queued = apply(
        "job_42",
        None,
        &Event::Accepted {
            function: "f".into(),
            at: 1,
            has_callback: false,
            not_before: None,
        },
        1,
    );
    let result = StoredResult {
        status: 201,
        headers: vec![("content-type".into(), "application/json".into())],
        body: b"{\"ok\":true}".to_vec(),
        stored: None,
    };
    let stored = StoredResult {
        status: 200,
        headers: vec![("content-type".into(), "application/octet-stream".into())],
        body: Vec::new(),
        stored: Some(BlobRef {
            key: "job_42.result".into(),
            len: 256 << 20,
            sha256: "ab".repeat(32),
        }),
    };
    vec![
        must(encode_record(&record, 7), "seed"),
        must(encode_record(&queued, u64::MAX), "seed"),
        must(serde_json::to_vec(&record), "seed"),
        must(serde_json::to_vec(&queued), "seed"),
        must(result.encode(), "seed"),
        must(stored.encode(), "seed"),
        encode_message(
            1_700_000_000_000_000_000,
            "faas-async.team-a.figlet",
            b"FAQC\x01",
        ),
    ]
}
