//! The embedded blob store: one file per blob in a directory.
//!
//! A file is named after its key ([`BlobKey`]: only `[A-Za-z0-9_.-]`, never starting with
//! `.`, so it stays in the directory) and holds a header of [`HEADER_LEN`] bytes, then the
//! records ([`super`]):
//!
//! ```text
//! 0       4     magic b"FAQB"
//! 4       1     format version 1
//! 5       2     JSON length J, big-endian
//! 7       J     JSON: encoding, chunk, overhead, len, sha256 (sealed with encryption), created,
//!               the namespace (if the put named one)
//! 7+J     ...   zeros up to HEADER_LEN
//! HEADER_LEN    the records, every one but the last of chunk + overhead bytes
//! ```
//!
//! A put writes `.tmp-<uuid>` in the same directory (header zeroed), the records, then the
//! header, fsyncs the file, renames it to the key and fsyncs the directory: after a crash a
//! blob is either whole or absent, and a temporary file is left for
//! [`BlobStore::remove_leftovers`]. A read checks the file's size against its header before
//! it yields anything.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{
    BlobEntry, BlobError, BlobInfo, BlobKey, BlobRead, BlobStore, ByteRange, Chunker, Codec,
    Encoding, Layout, PutOptions, RecordSource, read_stream, to_hex,
};
use crate::sealing::Sealing;

/// Bytes of a blob file's header.
pub const HEADER_LEN: usize = 512;
const MAGIC: [u8; 4] = *b"FAQB";
const VERSION: u8 = 1;
const TEMP_PREFIX: &str = ".tmp-";

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    encoding: String,
    chunk: u64,
    overhead: u64,
    len: u64,
    sha256: String,
    created: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
}

/// Blobs as files in one directory.
#[derive(Debug, Clone)]
pub struct FileBlobs {
    dir: PathBuf,
    sealing: Sealing,
}

impl FileBlobs {
    /// The store in `dir` (created if missing), sealing new blobs with `sealing`.
    pub async fn open(dir: impl Into<PathBuf>, sealing: Sealing) -> Result<Self, BlobError> {
        let dir = dir.into();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|err| io_error("cannot create the blob directory", &err))?;
        Ok(Self { dir, sealing })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of `key` (for tests and operators; a blob file is never edited in place).
    pub fn path_of(&self, key: &BlobKey) -> PathBuf {
        self.dir.join(key.as_str())
    }

    async fn sync_dir(&self) -> Result<(), BlobError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
            .await
            .map_err(|err| BlobError::Backend(format!("directory sync task: {err}")))?
            .map_err(|err| io_error("cannot sync the blob directory", &err))
    }
}

fn io_error(what: &str, err: &std::io::Error) -> BlobError {
    BlobError::Backend(format!("{what}: {err}"))
}

/// Removes a temporary file unless the put finished.
struct TempFile {
    path: Option<PathBuf>,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            // Best effort: what remains is removed by remove_leftovers.
            let _ = std::fs::remove_file(path);
        }
    }
}

fn encode_header(header: &Header) -> Result<Vec<u8>, BlobError> {
    let json = serde_json::to_vec(header)
        .map_err(|err| BlobError::Backend(format!("cannot encode a blob header: {err}")))?;
    let json_len = u16::try_from(json.len())
        .ok()
        .filter(|_| 7 + json.len() <= HEADER_LEN)
        .ok_or_else(|| BlobError::Backend("blob header too long".to_owned()))?;
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&json_len.to_be_bytes());
    out.extend_from_slice(&json);
    out.resize(HEADER_LEN, 0);
    Ok(out)
}

fn decode_header(bytes: &[u8]) -> Option<Header> {
    if bytes.len() < 7 || bytes[..4] != MAGIC || bytes[4] != VERSION {
        return None;
    }
    let json_len = usize::from(u16::from_be_bytes([bytes[5], bytes[6]]));
    let json = bytes.get(7..7 + json_len)?;
    serde_json::from_slice(json).ok()
}

fn layout_of(header: &Header) -> Option<Layout> {
    let layout = Layout {
        encoding: Encoding::parse(&header.encoding)?,
        chunk: header.chunk,
        overhead: header.overhead,
        len: header.len,
    };
    layout.valid().then_some(layout)
}

async fn read_header(file: &mut tokio::fs::File) -> std::io::Result<Option<Header>> {
    let mut bytes = vec![0; HEADER_LEN];
    match file.read_exact(&mut bytes).await {
        Ok(_) => Ok(decode_header(&bytes)),
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(err) => Err(err),
    }
}

struct FileRecords {
    file: tokio::fs::File,
}

impl RecordSource for FileRecords {
    async fn record(&mut self, _index: u64, len: u64) -> Result<Bytes, BlobError> {
        let len = usize::try_from(len)
            .map_err(|_| BlobError::Backend("record too long for this machine".to_owned()))?;
        let mut buf = BytesMut::zeroed(len);
        self.file
            .read_exact(&mut buf)
            .await
            .map_err(|err| io_error("cannot read a blob", &err))?;
        Ok(buf.freeze())
    }
}

fn nanos_of(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl BlobStore for FileBlobs {
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
        let namespace = limit.checked_namespace()?.map(str::to_owned);
        let mut chunker = Chunker::new(body, &limit)?;
        let codec = Codec::new(key, &self.sealing);
        let mut layout = codec.layout();
        let temp_path = self
            .dir
            .join(format!("{TEMP_PREFIX}{}", uuid::Uuid::new_v4().simple()));
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp_path)
            .await
            .map_err(|err| io_error("cannot create a blob file", &err))?;
        let mut temp = TempFile {
            path: Some(temp_path.clone()),
        };
        let write_error = |err: std::io::Error| io_error("cannot write a blob", &err);
        file.write_all(&[0; HEADER_LEN])
            .await
            .map_err(write_error)?;
        while let Some(chunk) = chunker.next().await? {
            let record = codec.encode(&layout, chunk.index, chunk.last, &chunk.data);
            file.write_all(&record).await.map_err(write_error)?;
        }
        layout.len = chunker.total();
        let digest = chunker.digest();
        let header = encode_header(&Header {
            encoding: layout.encoding.as_str().to_owned(),
            chunk: layout.chunk,
            overhead: layout.overhead,
            len: layout.len,
            sha256: codec.seal_digest(&layout, &digest),
            created: crate::clock::unix_nanos_now(),
            namespace,
        })?;
        file.seek(SeekFrom::Start(0)).await.map_err(write_error)?;
        file.write_all(&header).await.map_err(write_error)?;
        file.flush().await.map_err(write_error)?;
        file.sync_all().await.map_err(write_error)?;
        drop(file);
        tokio::fs::rename(&temp_path, self.path_of(key))
            .await
            .map_err(|err| io_error("cannot rename a blob file", &err))?;
        temp.path = None;
        self.sync_dir().await?;
        Ok(BlobInfo {
            key: key.clone(),
            len: layout.len,
            sha256: to_hex(&digest),
        })
    }

    async fn get(&self, key: &BlobKey, range: Option<ByteRange>) -> Result<BlobRead, BlobError> {
        let codec = Codec::new(key, &self.sealing);
        let mut file = match tokio::fs::File::open(self.path_of(key)).await {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(BlobError::NotFound);
            }
            Err(err) => return Err(io_error("cannot open a blob", &err)),
        };
        let header = read_header(&mut file)
            .await
            .map_err(|err| io_error("cannot read a blob", &err))?
            .ok_or_else(|| codec.integrity("unreadable header".to_owned()))?;
        let layout =
            layout_of(&header).ok_or_else(|| codec.integrity("unknown layout".to_owned()))?;
        let size = file
            .metadata()
            .await
            .map_err(|err| io_error("cannot read a blob", &err))?
            .len();
        let want = HEADER_LEN as u64 + layout.stored_len();
        if size != want {
            return Err(codec.integrity(format!("the file has {size} bytes, {want} expected")));
        }
        let digest = codec.open_digest(&layout, &header.sha256)?;
        let info = BlobInfo {
            key: key.clone(),
            len: layout.len,
            sha256: to_hex(&digest),
        };
        let (span, whole) = match range {
            None => (0..layout.len, Some(digest)),
            Some(range) => (range.resolve(layout.len)?, None),
        };
        let first = if span.is_empty() {
            0
        } else {
            span.start / layout.chunk
        };
        let offset = HEADER_LEN as u64 + first * (layout.chunk + layout.overhead);
        file.seek(SeekFrom::Start(offset))
            .await
            .map_err(|err| io_error("cannot read a blob", &err))?;
        let body = read_stream(FileRecords { file }, codec, layout, span.clone(), whole);
        Ok(BlobRead {
            info,
            range: span,
            body,
        })
    }

    async fn delete(&self, key: &BlobKey) -> Result<(), BlobError> {
        match tokio::fs::remove_file(self.path_of(key)).await {
            Ok(()) => self.sync_dir().await,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(io_error("cannot delete a blob", &err)),
        }
    }

    async fn list(&self) -> Result<Vec<BlobEntry>, BlobError> {
        let list_error = |err: std::io::Error| io_error("cannot list blobs", &err);
        let mut entries = Vec::new();
        let mut dir = tokio::fs::read_dir(&self.dir).await.map_err(list_error)?;
        while let Some(entry) = dir.next_entry().await.map_err(list_error)? {
            let name = entry.file_name();
            let Some(key) = name.to_str().and_then(|name| BlobKey::parse(name).ok()) else {
                continue;
            };
            let mut file = match tokio::fs::File::open(entry.path()).await {
                Ok(file) => file,
                // Deleted since the directory was read.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(list_error(err)),
            };
            // A file whose header does not read is listed with its file time, so a sweep
            // can remove it.
            let (len, created, namespace) =
                match read_header(&mut file).await.map_err(list_error)? {
                    Some(header) => (header.len, header.created, header.namespace),
                    None => {
                        let modified = file
                            .metadata()
                            .await
                            .and_then(|meta| meta.modified())
                            .map_err(list_error)?;
                        (0, nanos_of(modified), None)
                    }
                };
            entries.push(BlobEntry {
                key,
                len,
                created_unix_nanos: created,
                namespace,
            });
        }
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(entries)
    }

    async fn remove_leftovers(&self, older_than: Duration) -> Result<u64, BlobError> {
        let list_error = |err: std::io::Error| io_error("cannot list blobs", &err);
        let cutoff = SystemTime::now()
            .checked_sub(older_than)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut removed = 0;
        let mut dir = tokio::fs::read_dir(&self.dir).await.map_err(list_error)?;
        while let Some(entry) = dir.next_entry().await.map_err(list_error)? {
            if !entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.starts_with(TEMP_PREFIX))
            {
                continue;
            }
            let modified = match entry.metadata().await.and_then(|meta| meta.modified()) {
                Ok(modified) => modified,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(list_error(err)),
            };
            if modified > cutoff {
                continue;
            }
            match tokio::fs::remove_file(entry.path()).await {
                Ok(()) => removed += 1,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(io_error("cannot remove a leftover", &err)),
            }
        }
        Ok(removed)
    }
}
