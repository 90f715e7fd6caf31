//! Writing a call's record by compare-and-set from what the writer already knows.
//!
//! A worker running a call owns its record: it keeps the record and its revision between
//! writes and writes at the known revision without reading first. Only a conflict (a cancel,
//! another worker's redelivery) costs a read. Timeouts and other failures are errors, never
//! retried as conflicts.

use bytes::Bytes;

use super::{BackendError, CallRecords, RecordWriteError, Revision};
use crate::clock::unix_nanos_now;
use crate::records::{self, CallRecord, Event};

/// A call's record as its writer last wrote or read it, with the revision it is stored at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedRecord {
    /// The record.
    pub record: CallRecord,
    /// Its revision; `None` when no record is stored (yet).
    pub revision: Option<Revision>,
    /// The kept result stored inside the record's value (see
    /// [`CallRecords::inline_result_bytes`]), carried into the next write.
    pub inline_result: Option<Bytes>,
}

impl OwnedRecord {
    /// The record the gateway wrote when it accepted the call, rebuilt from what the envelope
    /// says (function, acceptance time, callback, not-before time) and the revision the gateway
    /// put in it: what a worker starts from without reading.
    pub fn accepted(
        call_id: &str,
        function: &str,
        accepted_at: u64,
        has_callback: bool,
        not_before: Option<u64>,
        revision: Revision,
    ) -> Self {
        let event = Event::Accepted {
            function: function.to_owned(),
            at: accepted_at,
            has_callback,
            not_before,
        };
        Self {
            record: records::apply(call_id, None, &event, accepted_at),
            revision: Some(revision),
            inline_result: None,
        }
    }
}

/// Compare-and-set attempts before giving up (only concurrent writers make it retry).
const CAS_ATTEMPTS: usize = 16;

/// Applies `events` in order to the call's record and writes it once. Starts from `known` when given (no
/// read), otherwise from what is stored; re-reads and re-applies only on a conflict. With
/// `result`, the kept result is written with the record (see [`CallRecords::write_record`]);
/// without, a result the stored record carries inside its value is written back with it (as long
/// as the record still says `stored`). Returns the record as written, to start the next write from.
pub async fn apply_event<R: CallRecords>(
    records: &R,
    call_id: &str,
    known: Option<OwnedRecord>,
    events: &[Event],
    result: Option<Bytes>,
) -> Result<OwnedRecord, BackendError> {
    let mut base = known;
    for _ in 0..CAS_ATTEMPTS {
        let (current, revision, carried) = match base.take() {
            Some(owned) => (Some(owned.record), owned.revision, owned.inline_result),
            None => match records.record_entry(call_id).await? {
                Some(entry) => (
                    Some(entry.record),
                    Some(entry.revision),
                    entry.inline_result,
                ),
                None => (None, None, None),
            },
        };
        let now = unix_nanos_now();
        let Some(record) = events.iter().fold(current, |record, event| {
            Some(records::apply(call_id, record, event, now))
        }) else {
            return Err(BackendError::Request(format!(
                "record {call_id}: nothing to write"
            )));
        };
        let kept = result.clone().or_else(|| {
            carried.filter(|_| record.result == Some(records::ResultAvailability::Stored))
        });
        match records
            .write_record(call_id, revision, &record, kept.clone())
            .await
        {
            Ok(revision) => {
                let inline_result = kept.filter(|r| r.len() <= records.inline_result_bytes());
                return Ok(OwnedRecord {
                    record,
                    revision: Some(revision),
                    inline_result,
                });
            }
            Err(RecordWriteError::Conflict) => {}
            Err(RecordWriteError::Backend(e)) => return Err(e),
        }
    }
    Err(BackendError::Request(format!(
        "record {call_id}: {CAS_ATTEMPTS} compare-and-set attempts all conflicted"
    )))
}
