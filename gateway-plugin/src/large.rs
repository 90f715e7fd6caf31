//! Request bodies above the inline size (issue 16): streamed into the blob store under the
//! call's request key, never held whole in memory; the call is queued with a
//! [`BodyLocation::Blob`] reference. A failed or interrupted upload leaves nothing stored (the
//! store's put guarantees it); once stored, the blob is deleted if the call is not queued
//! ([`StoredBody`], also when the request's future is dropped).

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use queue_core::backend::CallQueue;
use queue_core::blobs::{
    BlobError, BlobKey, BlobRef, BlobRole, BlobStore, PutOptions, SharedBlobs,
};
use queue_core::message::{BodyLocation, QueuedCall};

use crate::error::ApiError;
use crate::error::unreadable_body;
use crate::state::AppState;

/// Reads `source` up to `inline` bytes: the bytes read, and whether the body ended there (a
/// body announced larger than `inline` is not read at all: it goes to the store whole).
pub(crate) async fn read_head<S>(
    source: &mut S,
    inline: u64,
    declared: Option<u64>,
) -> Result<(Bytes, bool), ApiError>
where
    S: Stream<Item = Result<Bytes, axum::Error>> + Unpin,
{
    if declared.is_some_and(|len| len > inline) {
        return Ok((Bytes::new(), false));
    }
    let mut head = BytesMut::new();
    while (head.len() as u64) <= inline {
        match source.next().await {
            None => return Ok((head.freeze(), true)),
            Some(Ok(frame)) => head.extend_from_slice(&frame),
            Some(Err(_)) => return Err(unreadable_body()),
        }
    }
    Ok((head.freeze(), false))
}

/// One upload into the blob store.
pub(crate) struct Upload<'a, S> {
    pub blobs: &'a SharedBlobs,
    pub call: &'a QueuedCall,
    /// What was read before the body was known to be large.
    pub head: Bytes,
    /// The rest of the body.
    pub rest: S,
    /// `--max-body-bytes`.
    pub limit: u64,
    /// The `Content-Length`, if any.
    pub declared: Option<u64>,
    /// The call id is the client's.
    pub client_id: bool,
}

impl<S> Upload<'_, S>
where
    S: Stream<Item = Result<Bytes, axum::Error>> + Send + Unpin,
{
    /// Stores the body; its reference, and the guard that deletes it unless the call is
    /// queued. A client's own id whose call already has a record (a retry of that call, or
    /// another call that will be refused `409`) stores nothing: the body is only hashed, and
    /// the record's call keeps its blob.
    pub async fn store<Q: CallQueue>(
        self,
        state: &AppState<Q>,
    ) -> Result<(BodyLocation, Option<StoredBody>), ApiError> {
        let call_id = self.call.meta.call_id.as_str();
        let key = BlobKey::for_call(call_id, BlobRole::Request).map_err(|_| {
            ApiError::too_large(
                "body_too_large",
                format!(
                    "a body above {} bytes is stored apart, which this X-Call-Id is too long for (at most 64 characters, or 128 letters, digits and '-')",
                    state.inline_limit()
                ),
                state.inline_limit(),
            )
        })?;
        let limit = self.limit;
        let too_large = || {
            ApiError::too_large(
                "body_too_large",
                format!("request body exceeds the limit of {limit} bytes"),
                limit,
            )
        };
        let body = futures::stream::iter((!self.head.is_empty()).then_some(Ok(self.head)))
            .chain(self.rest);
        let namespace = self
            .call
            .meta
            .namespace
            .as_deref()
            .unwrap_or(&state.default_namespace)
            .to_ascii_lowercase();
        let put_limit = PutOptions {
            max_bytes: limit,
            expected_len: self.declared,
            namespace: Some(namespace),
        };
        if self.client_id {
            match state.queue.record_entry(call_id).await {
                Ok(None) => {}
                Ok(Some(_)) => {
                    let (len, sha256) = hash_only(body, &put_limit)
                        .await
                        .map_err(|e| if e { too_large() } else { unreadable_body() })?;
                    let location = BodyLocation::Blob(BlobRef {
                        key: key.as_str().to_owned(),
                        len,
                        sha256,
                    });
                    return Ok((location, None));
                }
                Err(e) => {
                    tracing::warn!(call_id, error = %e, "cannot read the call's record");
                    return Err(ApiError::unavailable(
                        "the call records cannot be read now; retry with the same X-Call-Id",
                        state.retry_after,
                    ));
                }
            }
        }
        let unavailable = |e: &BlobError| {
            tracing::warn!(call_id, error = %e, "body not stored");
            ApiError::unavailable(
                "the body store cannot take the body now; retry with the same X-Call-Id",
                state.retry_after,
            )
        };
        let store = self.blobs.store().await.map_err(|e| unavailable(&e))?;
        let info = match store.put(&key, body, put_limit).await {
            Ok(info) => info,
            Err(BlobError::TooLarge { .. }) => return Err(too_large()),
            Err(BlobError::Interrupted(_)) => return Err(unreadable_body()),
            Err(e) => return Err(unavailable(&e)),
        };
        let location = BodyLocation::Blob(BlobRef {
            key: key.as_str().to_owned(),
            len: info.len,
            sha256: info.sha256,
        });
        Ok((
            location,
            Some(StoredBody {
                blobs: self.blobs.clone(),
                key: Some(key),
            }),
        ))
    }
}

/// Reads the body to its end within `limit`: its length and SHA-256 (hex); `Err(true)` when
/// too large, `Err(false)` when interrupted.
async fn hash_only<S>(mut body: S, limit: &PutOptions) -> Result<(u64, String), bool>
where
    S: Stream<Item = Result<Bytes, axum::Error>> + Unpin,
{
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut len = 0u64;
    while let Some(frame) = body.next().await {
        let frame = frame.map_err(|_| false)?;
        len += frame.len() as u64;
        if len > limit.max_bytes {
            return Err(true);
        }
        digest.update(&frame);
    }
    if limit.expected_len.is_some_and(|want| want != len) {
        return Err(false);
    }
    let mut hex = String::with_capacity(64);
    for byte in digest.finish().as_ref() {
        hex.push_str(&format!("{byte:02x}"));
    }
    Ok((len, hex))
}

/// A stored request body whose call is not queued yet: deleted unless [`StoredBody::keep`]
/// is called (dropped: deleted from a spawned task).
pub(crate) struct StoredBody {
    blobs: SharedBlobs,
    key: Option<BlobKey>,
}

impl StoredBody {
    /// The call is queued: the blob stays.
    pub fn keep(mut self) {
        self.key = None;
    }

    /// The call is not queued: the blob goes now.
    pub async fn delete(mut self) {
        if let Some(key) = self.key.take() {
            delete_blob(&self.blobs, &key).await;
        }
    }
}

impl Drop for StoredBody {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let blobs = self.blobs.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { delete_blob(&blobs, &key).await });
            }
        }
    }
}

async fn delete_blob(blobs: &SharedBlobs, key: &BlobKey) {
    let deleted = match blobs.store().await {
        Ok(store) => store.delete(key).await,
        Err(e) => Err(e),
    };
    if let Err(e) = deleted {
        // The sweep removes it later (no record names it).
        tracing::warn!(key = %key, error = %e, "could not delete the body of a call not queued");
    }
}

/// Deletes the blobs of `call_id` (its request body and result), if there is a blob store;
/// failures are logged (the sweep removes what is left once the record is gone).
pub(crate) async fn delete_call_blobs<Q>(state: &AppState<Q>, call_id: &str) {
    if let Some(blobs) = &state.blobs {
        queue_core::blobs::delete_call_blobs(blobs, call_id).await;
    }
}

/// How often the gateway sweeps the blob store.
pub const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(10 * 60);
/// A blob is an orphan once it is this old and no record names its call: far longer than an
/// upload's record and publish take, so a call being accepted is never swept.
pub const ORPHAN_AGE: std::time::Duration = std::time::Duration::from_secs(60 * 60);

/// One sweep of the blob store: blobs older than `older_than` whose call has no record (it
/// expired, or the call was never queued) and what crashed puts left.
pub async fn sweep_blobs<Q: CallQueue>(
    queue: &Q,
    blobs: &SharedBlobs,
    older_than: std::time::Duration,
) -> Result<queue_core::blobs::SweepReport, BlobError> {
    let store = blobs.store().await?;
    queue_core::blobs::sweep(store, older_than, |key| async move {
        // A record that cannot be read now is not taken for a missing one.
        match queue.record_entry(key.call_id()).await {
            Ok(None) => true,
            Ok(Some(entry)) if key.tag().is_some() => {
                stray_answer(queue, &key, &entry.record, older_than).await
            }
            _ => false,
        }
    })
    .await
}

/// Whether `key`, one answer of a call whose record is `record`, is one that nobody needs:
/// the call is done, has been quiet for `older_than`, and its record does not keep this
/// answer (a worker crashed after storing it, or lost the call to another). A result that
/// cannot be read now is taken for a kept one.
async fn stray_answer<Q: CallQueue>(
    queue: &Q,
    key: &BlobKey,
    record: &queue_core::records::CallRecord,
    older_than: std::time::Duration,
) -> bool {
    let quiet = queue_core::unix_nanos_now().saturating_sub(record.updated_at)
        >= u64::try_from(older_than.as_nanos()).unwrap_or(u64::MAX);
    if !record.state.is_final() || !quiet {
        return false;
    }
    match queue.result(key.call_id()).await {
        Ok(kept) => kept
            .as_ref()
            .and_then(|r| r.stored.as_ref())
            .is_none_or(|stored| stored.key != key.as_str()),
        Err(_) => false,
    }
}

/// Sweeps the blob store every [`SWEEP_EVERY`] until `stop` fires.
pub(crate) async fn follow_sweeps<Q: CallQueue>(
    queue: std::sync::Arc<Q>,
    blobs: SharedBlobs,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(SWEEP_EVERY) => {}
            () = stop.cancelled() => return,
        }
        match sweep_blobs(queue.as_ref(), &blobs, ORPHAN_AGE).await {
            Ok(report) if report.orphans + report.leftovers > 0 => {
                tracing::info!(
                    orphans = report.orphans,
                    leftovers = report.leftovers,
                    "blob store swept"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "blob store sweep failed; tried again later"),
        }
    }
}
