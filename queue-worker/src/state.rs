//! The worker's dedup state in sled: what it knows about each call it has seen, so that a
//! redelivered message whose function already ran is not invoked again.
//!
//! A call's record moves `claimed` → `completed` (result stored, callback pending) → `done`.
//! - `claimed` is written before invoking. Found again by *this* process: the call is running
//!   here (a redelivery raced us). Found after a restart: the previous run died mid-call, so the
//!   function is invoked again (at-least-once) and the attempt counter goes up.
//! - `completed` is flushed to disk before the callback is sent and before the ack: a crash after
//!   that point never re-invokes the function, the redelivery only sends the callback.
//! - `done` means nothing is left to do: a redelivery is acked at once.
//!
//! Records expire after the retention; a second tree indexes them by expiry time
//! (`expires_at_ms` big-endian ++ call id) so the sweep reads only what is due.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use queue_core::Outcome;
use queue_core::sled_flush::GroupFlush;

/// Errors from the state store. Any of them makes the worker hand the message back (nak).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// sled failed (disk full, I/O error, corruption).
    #[error("state store: {0}")]
    Sled(#[from] sled::Error),
    /// A record could not be encoded.
    #[error("state record encoding: {0}")]
    Encode(#[from] serde_json::Error),
}

/// What the worker should do with a delivery, given what it remembers of the call.
#[derive(Debug)]
pub enum Begin {
    /// Invoke the function; `attempt` counts invocations started for this call by this worker.
    Invoke {
        /// 1 for the first invocation.
        attempt: u32,
    },
    /// The function already ran; only the callback is still owed.
    CallbackPending {
        /// The stored result.
        outcome: Outcome,
        /// Invocations it took.
        attempts: u32,
    },
    /// Everything was done; ack the redelivery.
    Finished,
    /// This process is handling the call right now (a redelivery raced the running call).
    RunningHere,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredOutcome {
    status: u16,
    headers: Vec<(String, String)>,
    duration_secs: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum State {
    Claimed {
        incarnation: String,
        attempts: u32,
    },
    Completed {
        attempts: u32,
        outcome: StoredOutcome,
    },
    Done {
        attempts: u32,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct RecordMeta {
    expires_at_ms: u64,
    #[serde(flatten)]
    state: State,
}

/// Record bytes: `u32` big-endian metadata length, metadata JSON, then the response body raw.
fn encode(meta: &RecordMeta, body: &[u8]) -> Result<Vec<u8>, StateError> {
    let json = serde_json::to_vec(meta)?;
    let len = u32::try_from(json.len())
        .map_err(|_| serde_json::Error::io(std::io::Error::other("record too large")))?;
    let mut buf = BytesMut::with_capacity(4 + json.len() + body.len());
    buf.put_u32(len);
    buf.put_slice(&json);
    buf.put_slice(body);
    Ok(buf.to_vec())
}

fn decode(raw: &[u8]) -> Option<(RecordMeta, Bytes)> {
    let len = u32::from_be_bytes(raw.get(..4)?.try_into().ok()?) as usize;
    let json = raw.get(4..4usize.checked_add(len)?)?;
    let meta = serde_json::from_slice(json).ok()?;
    Some((meta, Bytes::copy_from_slice(&raw[4 + len..])))
}

fn expiry_key(expires_at_ms: u64, call_id: &str) -> Vec<u8> {
    let mut key = expires_at_ms.to_be_bytes().to_vec();
    key.extend_from_slice(call_id.as_bytes());
    key
}

/// The worker's sled-backed call store. One process per directory (sled locks it).
#[derive(Debug, Clone)]
pub struct CallStore {
    db: sled::Db,
    flusher: Arc<GroupFlush>,
    calls: sled::Tree,
    expiry: sled::Tree,
    retention: Duration,
    incarnation: String,
}

fn now_ms() -> u64 {
    queue_core::unix_nanos_now() / 1_000_000
}

impl CallStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, cache_bytes: u64, retention: Duration) -> Result<Self, StateError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(200))
            .open()?;
        Ok(Self {
            flusher: Arc::new(GroupFlush::new()),
            calls: db.open_tree("calls")?,
            expiry: db.open_tree("expiry")?,
            db,
            retention,
            incarnation: uuid::Uuid::new_v4().to_string(),
        })
    }

    fn expires_at(&self) -> u64 {
        now_ms().saturating_add(u64::try_from(self.retention.as_millis()).unwrap_or(u64::MAX))
    }

    /// Records that this process is about to handle `call_id` and says what to do.
    pub fn begin(&self, call_id: &str) -> Result<Begin, StateError> {
        loop {
            let current = self.calls.get(call_id)?;
            let decoded = current.as_deref().and_then(decode);
            if current.is_some() && decoded.is_none() {
                tracing::warn!(call_id, "unreadable state record; treating the call as new");
            }
            let attempt = match decoded {
                None => 1,
                Some((meta, body)) => match meta.state {
                    State::Claimed { incarnation, .. } if incarnation == self.incarnation => {
                        return Ok(Begin::RunningHere);
                    }
                    State::Claimed { attempts, .. } => attempts + 1,
                    State::Completed { outcome, attempts } => {
                        return Ok(Begin::CallbackPending {
                            attempts,
                            outcome: Outcome {
                                status: outcome.status,
                                headers: outcome.headers,
                                body,
                                duration: Duration::try_from_secs_f64(outcome.duration_secs)
                                    .unwrap_or_default(),
                                error: outcome.error,
                            },
                        });
                    }
                    State::Done { .. } => return Ok(Begin::Finished),
                },
            };
            let expires_at_ms = self.expires_at();
            let claimed = RecordMeta {
                expires_at_ms,
                state: State::Claimed {
                    incarnation: self.incarnation.clone(),
                    attempts: attempt,
                },
            };
            let swapped =
                self.calls
                    .compare_and_swap(call_id, current, Some(encode(&claimed, &[])?))?;
            if swapped.is_ok() {
                self.expiry
                    .insert(expiry_key(expires_at_ms, call_id), &[])?;
                return Ok(Begin::Invoke { attempt });
            }
        }
    }

    /// Stores the function's outcome and flushes it to disk: after this, a redelivery only
    /// sends the callback.
    pub async fn complete(
        &self,
        call_id: &str,
        attempts: u32,
        outcome: &Outcome,
    ) -> Result<(), StateError> {
        let meta = RecordMeta {
            expires_at_ms: self.expires_at(),
            state: State::Completed {
                attempts,
                outcome: StoredOutcome {
                    status: outcome.status,
                    headers: outcome.headers.clone(),
                    duration_secs: outcome.duration.as_secs_f64(),
                    error: outcome.error.clone(),
                },
            },
        };
        self.calls.insert(call_id, encode(&meta, &outcome.body)?)?;
        self.expiry
            .insert(expiry_key(meta.expires_at_ms, call_id), &[])?;
        self.flusher.flush(&self.db).await.map_err(StateError::from)
    }

    /// Marks the call as fully handled (the result body is dropped) and waits until that is on
    /// disk (group commit): a crash before the ack then costs no repeated callback either.
    pub async fn finish(&self, call_id: &str, attempts: u32) -> Result<(), StateError> {
        let meta = RecordMeta {
            expires_at_ms: self.expires_at(),
            state: State::Done { attempts },
        };
        self.calls.insert(call_id, encode(&meta, &[])?)?;
        self.expiry
            .insert(expiry_key(meta.expires_at_ms, call_id), &[])?;
        self.flusher.flush(&self.db).await.map_err(StateError::from)
    }

    /// Gives up this process's claim (the message is handed back to the queue), keeping the
    /// attempt count.
    pub fn release(&self, call_id: &str) -> Result<(), StateError> {
        if let Some((meta, _)) = self.calls.get(call_id)?.as_deref().and_then(decode)
            && let State::Claimed { attempts, .. } = meta.state
        {
            let released = RecordMeta {
                expires_at_ms: meta.expires_at_ms,
                state: State::Claimed {
                    incarnation: String::new(),
                    attempts,
                },
            };
            self.calls.insert(call_id, encode(&released, &[])?)?;
        }
        Ok(())
    }

    /// Forgets a call entirely (it was dead-lettered): a replay of it runs the function again.
    pub fn forget(&self, call_id: &str) -> Result<(), StateError> {
        self.calls.remove(call_id)?;
        Ok(())
    }

    /// Removes records whose retention has passed. Returns how many were removed.
    pub fn sweep_expired(&self) -> Result<usize, StateError> {
        let now = now_ms();
        let mut removed = 0;
        let end = expiry_key(now.saturating_add(1), "");
        for entry in self.expiry.range(..end) {
            let (key, _) = entry?;
            let call_id = String::from_utf8_lossy(&key[8..]).into_owned();
            if let Some(raw) = self.calls.get(&call_id)? {
                let due = decode(&raw).is_none_or(|(meta, _)| meta.expires_at_ms <= now);
                if due
                    && self
                        .calls
                        .compare_and_swap(&call_id, Some(raw), None::<&[u8]>)?
                        .is_ok()
                {
                    removed += 1;
                }
            }
            self.expiry.remove(key)?;
        }
        Ok(removed)
    }

    /// Number of call records held.
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    /// True when no call record is held.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// Flushes everything to disk (at shutdown).
    pub async fn flush(&self) -> Result<(), StateError> {
        self.flusher.flush(&self.db).await.map_err(StateError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome() -> Outcome {
        Outcome {
            status: 201,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from_static(b"{\"ok\":true}"),
            duration: Duration::from_millis(1500),
            error: None,
        }
    }

    #[tokio::test]
    async fn moves_through_claimed_completed_done() {
        let dir = tempfile::tempdir().unwrap();
        let store = CallStore::open(dir.path(), 1 << 20, Duration::from_secs(60)).unwrap();
        assert!(matches!(
            store.begin("c1").unwrap(),
            Begin::Invoke { attempt: 1 }
        ));
        assert!(matches!(store.begin("c1").unwrap(), Begin::RunningHere));
        store.complete("c1", 1, &outcome()).await.unwrap();
        match store.begin("c1").unwrap() {
            Begin::CallbackPending {
                outcome: o,
                attempts: 1,
            } => {
                assert_eq!(o.status, 201);
                assert_eq!(o.body, outcome().body);
                assert_eq!(o.headers, outcome().headers);
                assert_eq!(o.duration, Duration::from_millis(1500));
            }
            other => panic!("expected CallbackPending, got {other:?}"),
        }
        store.finish("c1", 1).await.unwrap();
        assert!(matches!(store.begin("c1").unwrap(), Begin::Finished));
    }

    #[tokio::test]
    async fn survives_a_restart_and_counts_attempts_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = CallStore::open(dir.path(), 1 << 20, Duration::from_secs(60)).unwrap();
            assert!(matches!(
                store.begin("crashed").unwrap(),
                Begin::Invoke { attempt: 1 }
            ));
            assert!(matches!(
                store.begin("ran").unwrap(),
                Begin::Invoke { attempt: 1 }
            ));
            store.complete("ran", 1, &outcome()).await.unwrap();
            store.flush().await.unwrap();
        }
        let store = CallStore::open(dir.path(), 1 << 20, Duration::from_secs(60)).unwrap();
        // A claim from the previous incarnation means the call died mid-flight: invoke again.
        assert!(matches!(
            store.begin("crashed").unwrap(),
            Begin::Invoke { attempt: 2 }
        ));
        // A stored result means the function already ran: only the callback is owed.
        assert!(matches!(
            store.begin("ran").unwrap(),
            Begin::CallbackPending { .. }
        ));
    }

    #[tokio::test]
    async fn release_hands_the_call_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = CallStore::open(dir.path(), 1 << 20, Duration::from_secs(60)).unwrap();
        assert!(matches!(
            store.begin("c").unwrap(),
            Begin::Invoke { attempt: 1 }
        ));
        store.release("c").unwrap();
        assert!(matches!(
            store.begin("c").unwrap(),
            Begin::Invoke { attempt: 2 }
        ));
    }

    #[tokio::test]
    async fn records_expire_after_the_retention() {
        let dir = tempfile::tempdir().unwrap();
        let store = CallStore::open(dir.path(), 1 << 20, Duration::from_millis(1)).unwrap();
        store.begin("old").unwrap();
        store.finish("old", 1).await.unwrap();
        assert_eq!(store.len(), 1);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while store.sweep_expired().unwrap() == 0 {
            assert!(std::time::Instant::now() < deadline, "record never expired");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(store.is_empty());
        assert!(matches!(
            store.begin("old").unwrap(),
            Begin::Invoke { attempt: 1 }
        ));
        // Long retention: nothing is swept.
        let dir = tempfile::tempdir().unwrap();
        let store = CallStore::open(dir.path(), 1 << 20, Duration::from_secs(3600)).unwrap();
        store.begin("new").unwrap();
        assert_eq!(store.sweep_expired().unwrap(), 0);
        assert_eq!(store.len(), 1);
    }
}
