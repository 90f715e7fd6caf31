//! One blob store handle for the gateway and the worker, whichever the backend: [`AnyBlobs`]
//! (either implementation behind one type) and [`SharedBlobs`] (opened on first use, so a
//! worker that starts before the gateway created the JetStream bucket, or a gateway whose NATS
//! is not up yet, still starts; a body that needs the store meanwhile gets
//! [`BlobError::Unavailable`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;

use super::files::FileBlobs;
use super::jetstream::{BucketSettings, JetStreamBlobs};
use super::{BlobEntry, BlobError, BlobInfo, BlobKey, BlobRead, BlobStore, ByteRange, PutOptions};
use crate::sealing::Sealing;

/// Either blob store.
#[derive(Debug, Clone)]
pub enum AnyBlobs {
    /// The JetStream object-store bucket.
    JetStream(Box<JetStreamBlobs>),
    /// Files in a directory (the embedded backend).
    Files(FileBlobs),
}

impl BlobStore for AnyBlobs {
    async fn put<S, E>(
        &self,
        key: &BlobKey,
        body: S,
        limit: PutOptions,
    ) -> Result<BlobInfo, BlobError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display + Send,
    {
        match self {
            Self::JetStream(store) => store.put(key, body, limit).await,
            Self::Files(store) => store.put(key, body, limit).await,
        }
    }

    async fn get(&self, key: &BlobKey, range: Option<ByteRange>) -> Result<BlobRead, BlobError> {
        match self {
            Self::JetStream(store) => store.get(key, range).await,
            Self::Files(store) => store.get(key, range).await,
        }
    }

    async fn delete(&self, key: &BlobKey) -> Result<(), BlobError> {
        match self {
            Self::JetStream(store) => store.delete(key).await,
            Self::Files(store) => store.delete(key).await,
        }
    }

    async fn list(&self) -> Result<Vec<BlobEntry>, BlobError> {
        match self {
            Self::JetStream(store) => store.list().await,
            Self::Files(store) => store.list().await,
        }
    }

    async fn remove_leftovers(&self, older_than: Duration) -> Result<u64, BlobError> {
        match self {
            Self::JetStream(store) => store.remove_leftovers(older_than).await,
            Self::Files(store) => store.remove_leftovers(older_than).await,
        }
    }
}

/// The bucket of a calls stream: created when `settings` are given (the gateway), else
/// opened as found (the worker).
struct Opener {
    js: async_nats::jetstream::Context,
    stream: String,
    settings: Option<BucketSettings>,
    sealing: Sealing,
}

struct Inner {
    store: tokio::sync::OnceCell<AnyBlobs>,
    /// `None`: given open.
    opener: Option<Opener>,
}

/// A blob store opened on first use and shared (cheap to clone).
#[derive(Clone)]
pub struct SharedBlobs(Arc<Inner>);

impl std::fmt::Debug for SharedBlobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBlobs")
            .field("store", &self.0.store.get())
            .finish_non_exhaustive()
    }
}

impl SharedBlobs {
    /// A store already open.
    pub fn ready(store: AnyBlobs) -> Self {
        Self(Arc::new(Inner {
            store: tokio::sync::OnceCell::new_with(Some(store)),
            opener: None,
        }))
    }

    /// The files of `dir` (created if missing).
    pub async fn files(
        dir: impl Into<std::path::PathBuf>,
        sealing: Sealing,
    ) -> Result<Self, BlobError> {
        Ok(Self::ready(AnyBlobs::Files(
            FileBlobs::open(dir, sealing).await?,
        )))
    }

    /// The bucket of the calls stream `stream`: created on first use when `settings` are
    /// given (the gateway's side), else opened as found (the worker's).
    pub fn jetstream(
        js: async_nats::jetstream::Context,
        stream: &str,
        settings: Option<BucketSettings>,
        sealing: Sealing,
    ) -> Self {
        Self(Arc::new(Inner {
            store: tokio::sync::OnceCell::new(),
            opener: Some(Opener {
                js,
                stream: stream.to_owned(),
                settings,
                sealing,
            }),
        }))
    }

    /// The store, opened (or created) now if it is not yet; an error leaves it to the next
    /// use to try again.
    pub async fn store(&self) -> Result<&AnyBlobs, BlobError> {
        self.0
            .store
            .get_or_try_init(|| async {
                // Given open (`new_with(Some(..))`): never reached without an opener.
                let Some(Opener {
                    js,
                    stream,
                    settings,
                    sealing,
                }) = &self.0.opener
                else {
                    return Err(BlobError::Unavailable("no blob store".to_owned()));
                };
                let store = match settings {
                    Some(settings) => {
                        JetStreamBlobs::ensure(js, stream, *settings, sealing.clone()).await?
                    }
                    None => JetStreamBlobs::open(js, stream, sealing.clone()).await?,
                };
                Ok(AnyBlobs::JetStream(Box::new(store)))
            })
            .await
    }

    /// The store if it is open already (no attempt to open it).
    pub fn opened(&self) -> Option<&AnyBlobs> {
        self.0.store.get()
    }
}
