//! The worker's dedup state in sled: what it must remember of each call so that a redelivered
//! message whose function already ran is not invoked again.
//!
//! Per call, keyed by function *and* call id (a reused id for another function is another
//! call), at most one small entry:
//! - `completed` (attempts, the outcome with its body): written and flushed to disk (group
//!   commit) before the callback is sent and before the ack, so a crash after that point never
//!   re-invokes the function; the redelivery only sends the callback;
//! - `done` (attempts; 5 bytes): replaces `completed` in place once the callback is delivered,
//!   dropping the body. Not waited for on disk: a crash within sled's flush interval (200 ms)
//!   after a callback and before its ack repeats that callback, never the invocation.
//!
//! A call being handled is not written at all: this process knows what it is running
//! (in memory), and a delivery that died with its worker is invoked again, counted by the
//! queue's delivery count.
//!
//! Expiry without an index: entries go into one tree per *generation* (a quarter of the
//! retention); a lookup reads the live generations newest first, and the sweep drops whole
//! trees once they are older than the retention. An entry is kept between the retention and
//! 1.25 × the retention.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use queue_core::Outcome;
use queue_core::sealing::{Purpose, Sealing};
use queue_core::sled_flush::GroupFlush;
use serde::{Deserialize, Serialize};

/// Generations per retention period.
const GENERATIONS: u64 = 4;
/// Prefix of generation tree names (followed by the generation, zero-padded).
const GENERATION_TREE: &str = "dedup-gen-";
/// The tree of the format before generations (call id → JSON), read until it expires.
const LEGACY_TREE: &str = "calls";

const TAG_COMPLETED: u8 = 1;
const TAG_DONE: u8 = 2;
/// A `completed` entry sealed for encryption at rest: the tag, then the sealed entry, bound
/// to its key (function and call id).
const TAG_SEALED: u8 = 3;

/// Errors from the state store. Any of them makes the worker hand the message back (nak).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// sled failed (disk full, I/O error, corruption).
    #[error("state store: {0}")]
    Sled(#[from] sled::Error),
    /// An entry could not be encoded.
    #[error("state entry encoding: {0}")]
    Encode(#[from] serde_json::Error),
    /// An encrypted entry does not open with this worker's keys. The call is handed back,
    /// not invoked again: re-running it would repeat its effect.
    #[error("state entry: {0}")]
    Sealed(#[from] queue_core::sealing::OpenError),
}

/// What the store remembers of a call.
#[derive(Debug)]
pub enum Seen {
    /// Nothing: invoke it.
    New,
    /// The function ran; only the callback is still owed.
    Completed {
        /// The stored outcome.
        outcome: Outcome,
        /// Invocations it took.
        attempts: u32,
        /// Where the entry is, so that [`CallStore::finish`] replaces it in place.
        generation: Generation,
    },
    /// Everything was done; ack the redelivery.
    Done,
}

/// The generation an entry was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u64);

#[cfg(test)]
impl Generation {
    pub(crate) fn for_test(generation: u64) -> Self {
        Self(generation)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredOutcome {
    status: u16,
    headers: Vec<(String, String)>,
    duration_secs: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// The response body is this blob (the body part of the entry is then empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stored: Option<queue_core::blobs::BlobRef>,
}

/// `completed`: tag, attempts (u32 BE), metadata length (u32 BE), metadata JSON, body raw.
fn encode_completed(attempts: u32, outcome: &Outcome) -> Result<Vec<u8>, StateError> {
    let meta = serde_json::to_vec(&StoredOutcome {
        status: outcome.status,
        headers: outcome.headers.clone(),
        duration_secs: outcome.duration.as_secs_f64(),
        error: outcome.error.clone(),
        stored: outcome.stored.clone(),
    })?;
    let len = u32::try_from(meta.len())
        .map_err(|_| serde_json::Error::io(std::io::Error::other("outcome too large")))?;
    let mut buf = BytesMut::with_capacity(9 + meta.len() + outcome.body.len());
    buf.put_u8(TAG_COMPLETED);
    buf.put_u32(attempts);
    buf.put_u32(len);
    buf.put_slice(&meta);
    buf.put_slice(&outcome.body);
    Ok(buf.to_vec())
}

fn encode_done(attempts: u32) -> [u8; 5] {
    let a = attempts.to_be_bytes();
    [TAG_DONE, a[0], a[1], a[2], a[3]]
}

fn decode(raw: &[u8]) -> Option<(u32, Option<Outcome>)> {
    let attempts = u32::from_be_bytes(raw.get(1..5)?.try_into().ok()?);
    match *raw.first()? {
        TAG_DONE => Some((attempts, None)),
        TAG_COMPLETED => {
            let len = usize::try_from(u32::from_be_bytes(raw.get(5..9)?.try_into().ok()?)).ok()?;
            let end = 9usize.checked_add(len)?;
            let meta: StoredOutcome = serde_json::from_slice(raw.get(9..end)?).ok()?;
            Some((
                attempts,
                Some(Outcome {
                    status: meta.status,
                    headers: meta.headers,
                    body: Bytes::copy_from_slice(raw.get(end..)?),
                    stored: meta.stored,
                    duration: Duration::try_from_secs_f64(meta.duration_secs).unwrap_or_default(),
                    error: meta.error,
                }),
            ))
        }
        _ => None,
    }
}

/// Entry key: function, a NUL (never in a function name), call id.
fn key(function: &str, call_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(function.len() + 1 + call_id.len());
    key.extend_from_slice(function.as_bytes());
    key.push(0);
    key.extend_from_slice(call_id.as_bytes());
    key
}

/// The worker's sled-backed dedup store. One process per directory (sled locks it).
#[derive(Debug, Clone)]
pub struct CallStore {
    db: sled::Db,
    flusher: Arc<GroupFlush>,
    /// Live generations, newest first.
    generations: Arc<Mutex<Vec<(u64, sled::Tree)>>>,
    generation_ms: u64,
    /// Entries migrated from the format before generations are keyed by call id alone.
    legacy: bool,
    /// Encryption at rest of `completed` entries (they hold the function's response).
    sealing: Sealing,
}

fn now_ms() -> u64 {
    queue_core::unix_nanos_now() / 1_000_000
}

fn tree_generation(name: &[u8]) -> Option<u64> {
    std::str::from_utf8(name)
        .ok()?
        .strip_prefix(GENERATION_TREE)?
        .parse()
        .ok()
}

impl CallStore {
    /// Opens (or creates) the store in `dir`; entries live at least `retention`.
    pub fn open(dir: &Path, cache_bytes: u64, retention: Duration) -> Result<Self, StateError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(200))
            .open()?;
        Self::in_database(db, Arc::new(GroupFlush::new()), retention)
    }

    /// The store in trees of an open database, sharing its group commit: the all-in-one
    /// server keeps it in the embedded queue's database, so a call's queue and dedup writes
    /// reach the disk with the same fsyncs.
    pub fn in_database(
        db: sled::Db,
        flusher: Arc<GroupFlush>,
        retention: Duration,
    ) -> Result<Self, StateError> {
        let generation_ms = u64::try_from(retention.as_millis())
            .unwrap_or(u64::MAX)
            .div_ceil(GENERATIONS)
            .max(1);
        let mut generations = Vec::new();
        for name in db.tree_names() {
            if let Some(generation) = tree_generation(&name) {
                generations.push((generation, db.open_tree(&name)?));
            }
        }
        generations.sort_by_key(|g| std::cmp::Reverse(g.0));
        let mut store = Self {
            db,
            flusher,
            generations: Arc::new(Mutex::new(generations)),
            generation_ms,
            legacy: false,
            sealing: Sealing::off(),
        };
        store.legacy = store.migrate_legacy()?;
        Ok(store)
    }

    /// Seals the `completed` entries written from now on with `sealing`'s keys (and opens
    /// sealed ones with them). The worker gives its store the queue's sealing.
    #[must_use]
    pub fn with_sealing(mut self, sealing: Sealing) -> Self {
        self.sealing = sealing;
        self
    }

    /// Moves what the format before generations remembered (call id → JSON state) into the
    /// current generation, keyed by call id alone; returns whether there was any.
    fn migrate_legacy(&self) -> Result<bool, StateError> {
        #[derive(Deserialize)]
        #[serde(tag = "state", rename_all = "snake_case")]
        enum Legacy {
            Claimed {},
            Completed {
                attempts: u32,
                outcome: StoredOutcome,
            },
            Done {
                attempts: u32,
            },
        }
        if !self
            .db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == LEGACY_TREE.as_bytes())
        {
            return Ok(self
                .live()
                .iter()
                .any(|(_, t)| t.contains_key(b"\0legacy").unwrap_or(false)));
        }
        let old = self.db.open_tree(LEGACY_TREE)?;
        let (_, tree) = self.current()?;
        let mut any = false;
        for item in old.iter() {
            let (id, raw) = item?;
            let Some(len) = raw
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_be_bytes)
            else {
                continue;
            };
            let Some(json) = raw.get(4..4 + len as usize) else {
                continue;
            };
            let body = raw.get(4 + len as usize..).unwrap_or_default();
            let value = match serde_json::from_slice::<Legacy>(json) {
                Ok(Legacy::Completed { attempts, outcome }) => encode_completed(
                    attempts,
                    &Outcome {
                        status: outcome.status,
                        headers: outcome.headers,
                        body: Bytes::copy_from_slice(body),
                        stored: outcome.stored,
                        duration: Duration::try_from_secs_f64(outcome.duration_secs)
                            .unwrap_or_default(),
                        error: outcome.error,
                    },
                )?,
                Ok(Legacy::Done { attempts }) => encode_done(attempts).to_vec(),
                Ok(Legacy::Claimed {}) | Err(_) => continue,
            };
            let mut new_key = vec![0];
            new_key.extend_from_slice(&id);
            tree.insert(new_key, value)?;
            any = true;
        }
        if any {
            tree.insert(b"\0legacy", &[])?;
        }
        tree.flush()?;
        self.db.drop_tree(LEGACY_TREE)?;
        let _ = self.db.drop_tree("expiry");
        Ok(any)
    }

    fn generation_now(&self) -> u64 {
        now_ms() / self.generation_ms
    }

    /// The generation entries are written to now, opened if new.
    fn current(&self) -> Result<(u64, sled::Tree), StateError> {
        let now = self.generation_now();
        let mut generations = self
            .generations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((g, tree)) = generations.first()
            && *g == now
        {
            return Ok((*g, tree.clone()));
        }
        let tree = self.db.open_tree(format!("{GENERATION_TREE}{now:020}"))?;
        generations.insert(0, (now, tree.clone()));
        generations.sort_by_key(|g| std::cmp::Reverse(g.0));
        Ok((now, tree))
    }

    fn live(&self) -> Vec<(u64, sled::Tree)> {
        self.generations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// What is remembered of `call_id` for `function`.
    pub fn lookup(&self, function: &str, call_id: &str) -> Result<Seen, StateError> {
        let keys = if self.legacy {
            vec![key(function, call_id), key("", call_id)]
        } else {
            vec![key(function, call_id)]
        };
        for (generation, tree) in self.live() {
            for k in &keys {
                let Some(raw) = tree.get(k)? else {
                    continue;
                };
                let opened;
                let raw = match raw.split_first() {
                    Some((&TAG_SEALED, sealed)) => {
                        opened = self.sealing.open(Purpose::WorkerState, k, sealed)?;
                        &opened[..]
                    }
                    _ => &raw[..],
                };
                return Ok(match decode(raw) {
                    Some((_, None)) => Seen::Done,
                    Some((attempts, Some(outcome))) => Seen::Completed {
                        outcome,
                        attempts,
                        generation: Generation(generation),
                    },
                    None => {
                        tracing::warn!(call_id, "unreadable dedup entry; treating the call as new");
                        Seen::New
                    }
                });
            }
        }
        Ok(Seen::New)
    }

    /// Stores the function's outcome and waits until it is on disk (group commit): after this,
    /// a redelivery only sends the callback. Returns where it went, for [`CallStore::finish`].
    pub async fn complete(
        &self,
        function: &str,
        call_id: &str,
        attempts: u32,
        outcome: &Outcome,
    ) -> Result<Generation, StateError> {
        let (generation, tree) = self.current()?;
        let key = key(function, call_id);
        let mut entry = encode_completed(attempts, outcome)?;
        if let Some(keys) = self.sealing.keyring() {
            let mut sealed = Vec::with_capacity(1 + keys.overhead() + entry.len());
            sealed.push(TAG_SEALED);
            keys.seal_append(Purpose::WorkerState, &key, &entry, &mut sealed);
            entry = sealed;
        }
        tree.insert(key, entry)?;
        self.flusher.flush(&self.db).await?;
        Ok(Generation(generation))
    }

    /// Marks the call as fully handled, in place of its `completed` entry when `at` says
    /// where that is (the body is dropped). Not waited for on disk (see the module docs).
    pub fn finish(
        &self,
        function: &str,
        call_id: &str,
        attempts: u32,
        at: Option<Generation>,
    ) -> Result<(), StateError> {
        let tree = at
            .and_then(|Generation(g)| {
                self.live()
                    .into_iter()
                    .find(|(live, _)| *live == g)
                    .map(|(_, t)| t)
            })
            .map_or_else(|| self.current().map(|(_, t)| t), Ok)?;
        tree.insert(key(function, call_id), &encode_done(attempts))?;
        Ok(())
    }

    /// Forgets a call (it was dead-lettered): a replay of it runs the function again.
    pub fn forget(&self, function: &str, call_id: &str) -> Result<(), StateError> {
        for (_, tree) in self.live() {
            tree.remove(key(function, call_id))?;
            if self.legacy {
                tree.remove(key("", call_id))?;
            }
        }
        Ok(())
    }

    /// Drops the generations older than the retention. Returns how many entries went.
    pub fn sweep_expired(&self) -> Result<usize, StateError> {
        let now = self.generation_now();
        let expired: Vec<(u64, sled::Tree)> = {
            let mut generations = self
                .generations
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let (keep, expired) = generations
                .drain(..)
                .partition(|(g, _)| now.saturating_sub(*g) <= GENERATIONS);
            *generations = keep;
            expired
        };
        let mut removed = 0;
        for (generation, tree) in expired {
            removed += tree.len();
            drop(tree);
            self.db
                .drop_tree(format!("{GENERATION_TREE}{generation:020}"))?;
        }
        Ok(removed)
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.live().iter().map(|(_, t)| t.len()).sum()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
            stored: None,
            duration: Duration::from_millis(1500),
            error: None,
        }
    }

    /// Opens the store, waiting while a dropped predecessor's background flusher still holds
    /// sled's file lock (it lets go within its flush interval; on a loaded machine, later).
    fn open(dir: &Path, retention: Duration) -> CallStore {
        let end = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match CallStore::open(dir, 1 << 20, retention) {
                Ok(store) => return store,
                Err(StateError::Sled(sled::Error::Io(e)))
                    if e.kind() == std::io::ErrorKind::Other
                        && e.to_string().contains("lock")
                        && std::time::Instant::now() < end =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("cannot open the state store: {e}"),
            }
        }
    }

    #[tokio::test]
    async fn moves_from_new_to_completed_to_done() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Duration::from_secs(60));
        assert!(matches!(store.lookup("f", "c1").unwrap(), Seen::New));
        let at = store.complete("f", "c1", 1, &outcome()).await.unwrap();
        match store.lookup("f", "c1").unwrap() {
            Seen::Completed {
                outcome: o,
                attempts: 1,
                generation,
            } => {
                assert_eq!(o, outcome());
                assert_eq!(generation, at);
            }
            other => panic!("expected Completed, got {other:?}"),
        }
        store.finish("f", "c1", 1, Some(at)).unwrap();
        assert!(matches!(store.lookup("f", "c1").unwrap(), Seen::Done));
        assert_eq!(store.len(), 1, "done replaces completed in place");
    }

    fn keys(line: &str) -> Sealing {
        Sealing::with_keys(queue_core::sealing::Keyring::parse(line, "keys").unwrap())
    }

    #[tokio::test]
    async fn completed_outcomes_are_sealed_and_a_missing_key_hands_back_never_reinvokes() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = "k1 AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let marked = Outcome {
            body: Bytes::from_static(b"STATE-MARKER-3b9e"),
            stored: None,
            ..outcome()
        };
        {
            let store = open(dir.path(), Duration::from_secs(60)).with_sealing(keys(k1));
            store.complete("f", "c1", 2, &marked).await.unwrap();
            match store.lookup("f", "c1").unwrap() {
                Seen::Completed {
                    outcome, attempts, ..
                } => {
                    assert_eq!(outcome, marked);
                    assert_eq!(attempts, 2);
                }
                other => panic!("expected Completed, got {other:?}"),
            }
            store.flush().await.unwrap();
        }
        let mut clear = Vec::new();
        for entry in std::fs::read_dir(dir.path()).unwrap().flatten() {
            if entry.path().is_file() {
                clear.extend(std::fs::read(entry.path()).unwrap());
            }
        }
        assert!(!clear.is_empty());
        assert!(
            !clear.windows(12).any(|w| w == b"STATE-MARKER"),
            "the outcome's body is on disk in clear"
        );
        // Without the key (or with another), the entry is an error: the call is handed back,
        // not treated as new (that would invoke the function again).
        let store = open(dir.path(), Duration::from_secs(60));
        assert!(matches!(
            store.lookup("f", "c1"),
            Err(StateError::Sealed(queue_core::sealing::OpenError::NoKeys(
                _
            )))
        ));
        let other = store.with_sealing(keys("k2 ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8="));
        assert!(matches!(
            other.lookup("f", "c1"),
            Err(StateError::Sealed(
                queue_core::sealing::OpenError::UnknownKey(_)
            ))
        ));
        // Bound to its key: the same bytes under another call id do not open.
        let (_, tree) = other.current().unwrap();
        let raw = tree.get(key("f", "c1")).unwrap().unwrap();
        tree.insert(key("f", "c2"), raw).unwrap();
        let right = other.with_sealing(keys(k1));
        assert!(matches!(
            right.lookup("f", "c1").unwrap(),
            Seen::Completed { .. }
        ));
        assert!(matches!(
            right.lookup("f", "c2"),
            Err(StateError::Sealed(
                queue_core::sealing::OpenError::Authentication(_)
            ))
        ));
    }

    #[tokio::test]
    async fn the_same_call_id_for_another_function_is_another_call() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Duration::from_secs(60));
        store
            .complete("billing", "id", 1, &outcome())
            .await
            .unwrap();
        assert!(matches!(store.lookup("attacker", "id").unwrap(), Seen::New));
        assert!(matches!(
            store.lookup("billing", "id").unwrap(),
            Seen::Completed { .. }
        ));
    }

    #[tokio::test]
    async fn survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path(), Duration::from_secs(60));
            store.complete("f", "ran", 2, &outcome()).await.unwrap();
            store
                .complete("f", "finished", 1, &outcome())
                .await
                .unwrap();
            store.finish("f", "finished", 1, None).unwrap();
            store.flush().await.unwrap();
        }
        let store = open(dir.path(), Duration::from_secs(60));
        assert!(matches!(
            store.lookup("f", "ran").unwrap(),
            Seen::Completed { attempts: 2, .. }
        ));
        assert!(matches!(store.lookup("f", "finished").unwrap(), Seen::Done));
        assert!(matches!(store.lookup("f", "other").unwrap(), Seen::New));
    }

    #[tokio::test]
    async fn forget_lets_a_replay_run_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Duration::from_secs(60));
        store.complete("f", "c", 1, &outcome()).await.unwrap();
        store.forget("f", "c").unwrap();
        assert!(matches!(store.lookup("f", "c").unwrap(), Seen::New));
    }

    #[tokio::test]
    async fn entries_expire_after_the_retention_and_not_before() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Duration::from_millis(200);
        let store = open(dir.path(), retention);
        let written = std::time::Instant::now();
        let at = store.complete("f", "old", 1, &outcome()).await.unwrap();
        store.finish("f", "old", 1, Some(at)).unwrap();
        assert_eq!(store.len(), 1);
        let deadline = written + Duration::from_secs(10);
        loop {
            let swept = store.sweep_expired().unwrap();
            if swept > 0 {
                // However slow the machine, never before the retention has passed.
                assert!(
                    written.elapsed() >= retention,
                    "swept after {:?}",
                    written.elapsed()
                );
                break;
            }
            assert!(std::time::Instant::now() < deadline, "entry never expired");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(store.is_empty());
        assert!(matches!(store.lookup("f", "old").unwrap(), Seen::New));
        // Long retention: nothing is swept.
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Duration::from_secs(3600));
        store.complete("f", "fresh", 1, &outcome()).await.unwrap();
        assert_eq!(store.sweep_expired().unwrap(), 0);
        assert_eq!(store.len(), 1);
    }

    #[tokio::test]
    async fn state_written_by_the_previous_format_is_still_honoured() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let calls = db.open_tree(LEGACY_TREE).unwrap();
            let entry = |json: &str, body: &[u8]| {
                let mut v = u32::try_from(json.len()).unwrap().to_be_bytes().to_vec();
                v.extend_from_slice(json.as_bytes());
                v.extend_from_slice(body);
                v
            };
            calls.insert("pending", entry(r#"{"expires_at_ms":1,"state":"completed","attempts":2,"outcome":{"status":200,"headers":[],"duration_secs":0.5}}"#, b"result")).unwrap();
            calls
                .insert(
                    "finished",
                    entry(r#"{"expires_at_ms":1,"state":"done","attempts":1}"#, b""),
                )
                .unwrap();
            calls
                .insert(
                    "crashed",
                    entry(
                        r#"{"expires_at_ms":1,"state":"claimed","incarnation":"x","attempts":1}"#,
                        b"",
                    ),
                )
                .unwrap();
            db.flush().unwrap();
        }
        let store = open(dir.path(), Duration::from_secs(60));
        match store.lookup("any", "pending").unwrap() {
            Seen::Completed {
                outcome, attempts, ..
            } => {
                assert_eq!((outcome.status, attempts), (200, 2));
                assert_eq!(outcome.body.as_ref(), b"result");
            }
            other => panic!("expected Completed, got {other:?}"),
        }
        assert!(matches!(
            store.lookup("any", "finished").unwrap(),
            Seen::Done
        ));
        assert!(matches!(store.lookup("any", "crashed").unwrap(), Seen::New));
        drop(store);
        // Reopened: the migrated entries are still found, and the old tree is gone.
        let store = open(dir.path(), Duration::from_secs(60));
        assert!(matches!(
            store.lookup("any", "finished").unwrap(),
            Seen::Done
        ));
    }
}
