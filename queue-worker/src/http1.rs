//! A small HTTP/1.1 client for invoking functions over plain `http://`.
//!
//! Why not the general client: a long-running call holds one connection for as long as the
//! function runs (minutes, hours), so with 10,000 calls in flight the per-connection state is
//! what the worker's memory is made of. A general-purpose client keeps a connection task, a
//! dispatch channel and 8 KiB read and write buffers per connection (about 40 KB measured with
//! massif); this one keeps a socket and a buffer sized to what is actually read, owned by the
//! call's own task. Connections are reused through a small idle pool per origin.
//!
//! What it speaks: one request per connection at a time (no pipelining), `Content-Length` and
//! `chunked` response bodies, bodies delimited by the connection's end, 1xx answers skipped,
//! no body for `HEAD`, 204 and 304. What it refuses (an error, never a guess): malformed
//! status lines or headers, more than [`MAX_HEADERS`] headers or [`MAX_HEAD_BYTES`] of them,
//! conflicting lengths, bad chunk framing, bodies above the caller's limit.
//!
//! Where it connects: [`Http1Client::send_checked`] checks every address the host name resolves
//! to against an [`EgressPolicy`] before connecting, and connects only to those addresses (no
//! second lookup, so DNS rebinding between check and connect is impossible); a pooled
//! connection is reused only if the address it is connected to passes the policy too.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use queue_core::egress::{EgressPolicy, Refusal};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most response headers accepted.
pub const MAX_HEADERS: usize = 128;
/// Largest response head (status line and headers).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Longest chunk-size line of a chunked body.
const MAX_CHUNK_LINE: usize = 1024;
/// First read buffer: most function answers fit.
const INITIAL_READ: usize = 1024;
/// Idle longer than this, a pooled connection is checked before it is reused.
const PROBE_AFTER: Duration = Duration::from_millis(500);
/// Largest single read once a body of known length is being read.
const MAX_READ: usize = 64 * 1024;

/// Why a request got no usable response.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Http1Error {
    /// The connection could not be opened.
    #[error("connect")]
    Connect,
    /// Writing the request or reading the response failed, or the peer closed early.
    #[error("request")]
    Io,
    /// The response is not valid HTTP/1.1.
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    /// The body is larger than the caller's limit.
    #[error("response too large")]
    TooLarge,
    /// The policy refused the destination (nothing was sent).
    #[error("refused: {0}")]
    Refused(Refusal),
}

/// Where a connection goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

/// One request.
#[derive(Debug)]
pub struct Request<'a> {
    /// Method, as the client sent it.
    pub method: &'a str,
    /// Where to connect.
    pub origin: &'a Origin,
    /// The `Host` header value.
    pub host_header: &'a str,
    /// Path and query (`/function/f?x=1`).
    pub target: &'a str,
    /// Headers to send, besides `Host` and `Content-Length`, which this client sets.
    pub headers: &'a [(&'a str, &'a str)],
    /// The body.
    pub body: &'a Bytes,
}

/// A response.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers in arrival order, names lower-case, values that are not UTF-8 dropped.
    pub headers: Vec<(String, String)>,
    /// Body (de-chunked); with [`Response::rest`], only its first part.
    pub body: Bytes,
    /// The rest of a body larger than the caller's spill limit, still on the connection
    /// ([`Http1Client::send_spilling`]); the connection is not reused after it.
    pub rest: Option<BodyRest>,
}

/// The part of a response body not read yet: pulled piece by piece from the connection with
/// [`BodyRest::into_stream`], never held whole.
pub struct BodyRest {
    stream: TcpStream,
    reader: BodyReader,
}

impl std::fmt::Debug for BodyRest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyRest").finish_non_exhaustive()
    }
}

impl BodyRest {
    /// The length the response announced (`Content-Length`) when it did.
    pub fn announced_len(&self) -> Option<u64> {
        self.reader.announced
    }

    /// The remaining pieces, in order; after an `Err` the stream ends.
    pub fn into_stream(self) -> futures::stream::BoxStream<'static, Result<Bytes, Http1Error>> {
        Box::pin(futures::stream::unfold(self, |mut rest| async move {
            match rest.reader.next(&mut rest.stream).await {
                Ok(Some(piece)) => Some((Ok(piece), rest)),
                Ok(None) => None,
                Err(e) => {
                    rest.reader.left = Left::Done;
                    Some((Err(e.into_error()), rest))
                }
            }
        }))
    }
}

/// Idle connections per origin, and when the whole pool was last pruned.
#[derive(Debug)]
struct Pool {
    by_origin: HashMap<Origin, Vec<Idle>>,
    pruned: Instant,
}

#[derive(Debug)]
struct Idle {
    stream: TcpStream,
    since: Instant,
    /// The address it is connected to (checked against a policy before reuse).
    peer: IpAddr,
}

/// Drops the connections of `idle` that have been idle longer than `timeout`. `idle` is in
/// the order the connections were put back (`take_idle` pops from the end), so the expired
/// ones are a prefix: one clock reading and a binary search, not one per connection.
fn drop_expired(idle: &mut Vec<Idle>, now: Instant, timeout: Duration) {
    let expired = idle.partition_point(|c| now.saturating_duration_since(c.since) > timeout);
    idle.drain(..expired);
}

/// The client: connection settings and the idle pool.
#[derive(Debug)]
pub struct Http1Client {
    idle: Mutex<Pool>,
    max_idle_per_origin: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
}

impl Http1Client {
    /// A client keeping at most `max_idle_per_origin` idle connections per origin, each for
    /// at most `idle_timeout`.
    pub fn new(
        max_idle_per_origin: usize,
        idle_timeout: Duration,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            idle: Mutex::new(Pool {
                by_origin: HashMap::new(),
                pruned: Instant::now(),
            }),
            max_idle_per_origin,
            idle_timeout,
            connect_timeout,
        }
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        // Short critical sections, never held across an await.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An idle connection that the peer has not closed, if any, and its peer address.
    fn take_idle(&self, origin: &Origin) -> Option<(TcpStream, IpAddr)> {
        let mut pool = self.pool();
        let idle = pool.by_origin.get_mut(origin)?;
        while let Some(conn) = idle.pop() {
            let idle_for = conn.since.elapsed();
            if idle_for > self.idle_timeout {
                continue;
            }
            if idle_for < PROBE_AFTER {
                // Reused at once (the common case under load): a peer that closed it in this
                // instant is caught by the retry in `send`, without a syscall per call.
                return Some((conn.stream, conn.peer));
            }
            // Readable while idle means closed (EOF) or garbage: either way unusable.
            let mut probe = [0u8; 1];
            match conn.stream.try_read(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Some((conn.stream, conn.peer));
                }
                _ => continue,
            }
        }
        None
    }

    fn put_idle(&self, origin: &Origin, stream: TcpStream, peer: IpAddr) {
        let now = Instant::now();
        let timeout = self.idle_timeout;
        let mut pool = self.pool();
        if now.saturating_duration_since(pool.pruned) > timeout {
            // Origins called once (a caller's callback host) must not keep sockets open forever.
            pool.by_origin.retain(|_, idle| {
                drop_expired(idle, now, timeout);
                !idle.is_empty()
            });
            pool.pruned = now;
        }
        let idle = match pool.by_origin.get_mut(origin) {
            Some(idle) => idle,
            None => pool.by_origin.entry(origin.clone()).or_default(),
        };
        drop_expired(idle, now, timeout);
        if idle.len() < self.max_idle_per_origin {
            idle.push(Idle {
                stream,
                since: now,
                peer,
            });
        }
    }

    /// Resolves `origin` once, checks every address against `policy` (any refused address
    /// refuses the origin), then connects to those same addresses.
    async fn connect(
        &self,
        origin: &Origin,
        policy: Option<&EgressPolicy>,
    ) -> Result<(TcpStream, IpAddr), Http1Error> {
        let connect = async {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((origin.host.as_str(), origin.port))
                    .await
                    .map_err(|_| Http1Error::Connect)?
                    .collect();
            if let Some(policy) = policy {
                for addr in &addrs {
                    policy
                        .check_endpoint(&origin.host, origin.port, addr.ip())
                        .map_err(Http1Error::Refused)?;
                }
            }
            let mut last = Http1Error::Connect;
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(stream) => {
                        let _ = stream.set_nodelay(true);
                        return Ok((stream, addr.ip()));
                    }
                    Err(_) => last = Http1Error::Connect,
                }
            }
            Err(last)
        };
        tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| Http1Error::Connect)?
    }

    /// Sends `request` and reads the response, refusing bodies above `max_body` bytes. A
    /// reused connection the peer closed before answering is replaced once by a new one
    /// (nothing was answered on it; the request is sent again, as any HTTP client does).
    pub async fn send(&self, request: &Request<'_>, max_body: u64) -> Result<Response, Http1Error> {
        self.send_checked(request, max_body, None).await
    }

    /// [`Http1Client::send`] to a destination `policy` allows: every address the origin
    /// resolves to is checked before the connection is opened ([`Http1Error::Refused`] if any
    /// is refused), and a pooled connection is used only if its address passes.
    pub async fn send_checked(
        &self,
        request: &Request<'_>,
        max_body: u64,
        policy: Option<&EgressPolicy>,
    ) -> Result<Response, Http1Error> {
        self.send_spilling(request, max_body, None, policy).await
    }

    /// [`Http1Client::send_checked`] that reads at most `spill_above` bytes of the body into
    /// memory: a larger body comes back as its first part and a [`BodyRest`] to stream the
    /// rest from (`None`: the whole body is read, up to `max_body`).
    pub async fn send_spilling(
        &self,
        request: &Request<'_>,
        max_body: u64,
        spill_above: Option<u64>,
        policy: Option<&EgressPolicy>,
    ) -> Result<Response, Http1Error> {
        if let Some((stream, peer)) = self.take_idle(request.origin) {
            let allowed = policy.is_none_or(|p| {
                p.check_endpoint(&request.origin.host, request.origin.port, peer)
                    .is_ok()
            });
            if allowed {
                match exchange(stream, request, max_body, spill_above).await {
                    Ok((response, reusable)) => {
                        if let Some(stream) = reusable {
                            self.put_idle(request.origin, stream, peer);
                        }
                        return Ok(response);
                    }
                    Err(Attempt::ClosedBeforeAnswer) => {}
                    Err(Attempt::Failed(e)) => return Err(e),
                }
            } else {
                // Opened for a caller with another policy: keep it for them; this request
                // resolves afresh and is checked.
                self.put_idle(request.origin, stream, peer);
            }
        }
        let (stream, peer) = self.connect(request.origin, policy).await?;
        match exchange(stream, request, max_body, spill_above).await {
            Ok((response, reusable)) => {
                if let Some(stream) = reusable {
                    self.put_idle(request.origin, stream, peer);
                }
                Ok(response)
            }
            Err(Attempt::ClosedBeforeAnswer) => Err(Http1Error::Io),
            Err(Attempt::Failed(e)) => Err(e),
        }
    }
}

enum Attempt {
    /// The connection ended before a single byte of answer (a stale pooled connection).
    ClosedBeforeAnswer,
    Failed(Http1Error),
}

impl From<Http1Error> for Attempt {
    fn from(e: Http1Error) -> Self {
        Self::Failed(e)
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_field_value(s: &str) -> bool {
    s.bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
}

fn head(request: &Request<'_>) -> Result<Vec<u8>, Http1Error> {
    if !is_token(request.method) {
        return Err(Http1Error::Malformed("invalid method"));
    }
    if request.target.is_empty() || request.target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(Http1Error::Malformed("invalid request target"));
    }
    let mut out = Vec::with_capacity(
        64 + request.target.len()
            + request
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + 4)
                .sum::<usize>(),
    );
    let mut line = |parts: &[&[u8]]| {
        for part in parts {
            out.extend_from_slice(part);
        }
        out.extend_from_slice(b"\r\n");
    };
    line(&[
        request.method.as_bytes(),
        b" ",
        request.target.as_bytes(),
        b" HTTP/1.1",
    ]);
    line(&[b"host: ", request.host_header.as_bytes()]);
    let bodyless = request.body.is_empty()
        && (request.method.eq_ignore_ascii_case("GET")
            || request.method.eq_ignore_ascii_case("HEAD"));
    if !bodyless {
        line(&[
            b"content-length: ",
            request.body.len().to_string().as_bytes(),
        ]);
    }
    for (name, value) in request.headers {
        // Values come from stored requests and function answers: never let one break framing.
        if !is_token(name) || !is_field_value(value) {
            continue;
        }
        line(&[name.as_bytes(), b": ", value.as_bytes()]);
    }
    out.extend_from_slice(b"\r\n");
    Ok(out)
}

/// One request and response on `stream`; returns the stream when it can carry another.
async fn exchange(
    mut stream: TcpStream,
    request: &Request<'_>,
    max_body: u64,
    spill_above: Option<u64>,
) -> Result<(Response, Option<TcpStream>), Attempt> {
    let head = head(request)?;
    let written = async {
        if request.body.len() <= 4096 {
            let mut all = head;
            all.extend_from_slice(request.body);
            stream.write_all(&all).await
        } else {
            stream.write_all(&head).await?;
            stream.write_all(request.body).await
        }
    }
    .await;
    if written.is_err() {
        return Err(Attempt::ClosedBeforeAnswer);
    }
    // No buffer while the function works (minutes, for long jobs): only once it answers.
    if stream.readable().await.is_err() {
        return Err(Attempt::ClosedBeforeAnswer);
    }
    let (mut response, reusable, rest) =
        read_response(&mut stream, request.method, max_body, spill_above).await?;
    if let Some(mut reader) = rest {
        // Whoever streams the rest applies the limit (a blob put's `max_bytes`), so that a
        // body too large is reported as such, not as a broken stream.
        reader.max = u64::MAX;
        response.rest = Some(BodyRest { stream, reader });
        return Ok((response, None));
    }
    Ok((response, reusable.then_some(stream)))
}

/// Reads one response to a `method` request from `stream`: skips informational answers, then
/// the head and the body as [`framing`] delimits it. Also says whether the connection is clean
/// for another request. Generic over the reader so the parser can be driven from memory.
async fn read_response<S: AsyncRead + Unpin>(
    stream: &mut S,
    method: &str,
    max_body: u64,
    spill_above: Option<u64>,
) -> Result<(Response, bool, Option<BodyReader>), Attempt> {
    let mut buf = BytesMut::with_capacity(INITIAL_READ);
    let mut received = false;
    let (status, headers) = loop {
        let mut answer = None;
        while !buf.is_empty() {
            match parse_head(&buf)? {
                None => break,
                // Informational answers (100 Continue, 103 Early Hints) precede the real one.
                Some((status, _, len)) if (100..200).contains(&status) && status != 101 => {
                    buf.advance(len);
                }
                Some((status, headers, len)) => {
                    buf.advance(len);
                    answer = Some((status, headers));
                    break;
                }
            }
        }
        if let Some(answer) = answer {
            break answer;
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(Http1Error::Malformed("response head too large").into());
        }
        if buf.capacity() == buf.len() {
            buf.reserve(buf.len().max(INITIAL_READ));
        }
        let n = stream.read_buf(&mut buf).await.map_err(|_| {
            if received {
                Attempt::Failed(Http1Error::Io)
            } else {
                Attempt::ClosedBeforeAnswer
            }
        })?;
        if n == 0 {
            return Err(if received {
                Attempt::Failed(Http1Error::Io)
            } else {
                Attempt::ClosedBeforeAnswer
            });
        }
        received = true;
    };
    if status == 101 {
        return Err(Http1Error::Malformed("protocol switch").into());
    }
    let framing = framing(method, status, &headers)?;
    let spill = spill_above.map_or(u64::MAX, |limit| limit.min(max_body));
    let (body, reusable, rest) = match framing {
        Framing::None => (Bytes::new(), true, None),
        Framing::Length(len) => {
            if len > max_body {
                return Err(Http1Error::TooLarge.into());
            }
            if len > spill {
                let reader = BodyReader::new(buf, Left::Length(len), max_body);
                (Bytes::new(), false, Some(reader))
            } else {
                let len = usize::try_from(len).map_err(|_| Http1Error::TooLarge)?;
                (read_exact_body(stream, buf, len).await?, true, None)
            }
        }
        Framing::Chunked => {
            let reader = BodyReader::new(buf, Left::ChunkSize, max_body);
            collect(stream, reader, spill).await?
        }
        Framing::UntilClose => {
            let reader = BodyReader::new(buf, Left::UntilClose, max_body);
            let (body, _, rest) = collect(stream, reader, spill).await?;
            (body, false, rest)
        }
    };
    let keep_alive = reusable
        && !headers
            .iter()
            .any(|(n, v)| n == "connection" && v.to_ascii_lowercase().contains("close"));
    Ok((
        Response {
            status,
            headers,
            body,
            rest: None,
        },
        keep_alive,
        rest,
    ))
}

/// Reads `reader`'s body into memory while it stays within `spill` bytes: the whole body and
/// whether the connection is clean for reuse, or (above `spill`) what was read and the
/// reader to stream the rest from.
async fn collect<S: AsyncRead + Unpin>(
    stream: &mut S,
    mut reader: BodyReader,
    spill: u64,
) -> Result<(Bytes, bool, Option<BodyReader>), Attempt> {
    // The first piece is kept as it is: a body of one piece (the common small answer) is
    // not copied.
    let mut first: Option<Bytes> = None;
    let mut body = BytesMut::new();
    while let Some(piece) = reader.next(stream).await? {
        if first.is_none() && body.is_empty() {
            first = Some(piece);
        } else {
            if let Some(first) = first.take() {
                body.extend_from_slice(&first);
            }
            body.extend_from_slice(&piece);
        }
        let read = first.as_ref().map_or(body.len(), Bytes::len);
        if read as u64 > spill {
            let read = first.unwrap_or_else(|| body.freeze());
            return Ok((read, false, Some(reader)));
        }
    }
    let reusable = reader.buf.is_empty();
    Ok((first.unwrap_or_else(|| body.freeze()), reusable, None))
}

/// What is left of a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Left {
    /// This many bytes of a body with a `Content-Length`.
    Length(u64),
    /// A chunk-size line comes next.
    ChunkSize,
    /// This many bytes of the current chunk, then its CRLF.
    Chunk(u64),
    /// Everything until the connection closes.
    UntilClose,
    /// Nothing.
    Done,
}

/// Reads a body piece by piece, as its framing delimits it, refusing more than `max` bytes.
struct BodyReader {
    /// What was read from the connection and not handed out yet.
    buf: BytesMut,
    left: Left,
    /// Bytes handed out so far.
    total: u64,
    max: u64,
    /// The `Content-Length`, when the body has one.
    announced: Option<u64>,
}

impl BodyReader {
    fn new(buf: BytesMut, left: Left, max: u64) -> Self {
        let announced = match left {
            Left::Length(len) => Some(len),
            _ => None,
        };
        Self {
            buf,
            left,
            total: 0,
            max,
            announced,
        }
    }

    /// Reads more of the connection into `buf` (at least one byte, or an error).
    async fn fill<S: AsyncRead + Unpin>(&mut self, stream: &mut S) -> Result<usize, Attempt> {
        if self.buf.capacity() - self.buf.len() < INITIAL_READ {
            self.buf.reserve(MAX_READ);
        }
        match stream.read_buf(&mut self.buf).await {
            Ok(n) => Ok(n),
            Err(_) => Err(Http1Error::Io.into()),
        }
    }

    /// The next piece of the body; `None` at its end.
    async fn next<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
    ) -> Result<Option<Bytes>, Attempt> {
        loop {
            match self.left {
                Left::Done => return Ok(None),
                Left::Length(0) => {
                    // The last read may have brought more than the body.
                    if !self.buf.is_empty() {
                        return Err(Http1Error::Malformed("more data than content-length").into());
                    }
                    self.left = Left::Done;
                    return Ok(None);
                }
                Left::Length(n) => {
                    if self.buf.is_empty() && self.fill(stream).await? == 0 {
                        return Err(Http1Error::Io.into());
                    }
                    let take = self.buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                    let piece = self.buf.split_to(take).freeze();
                    self.left = Left::Length(n - take as u64);
                    if n == take as u64 {
                        if !self.buf.is_empty() {
                            return Err(
                                Http1Error::Malformed("more data than content-length").into()
                            );
                        }
                        self.left = Left::Done;
                    }
                    return Ok(Some(self.handed(piece)?));
                }
                Left::ChunkSize => {
                    let line = read_line(stream, &mut self.buf).await?;
                    let size_text = line
                        .split(|&b| b == b';')
                        .next()
                        .map(<[u8]>::trim_ascii)
                        .unwrap_or_default();
                    if size_text.is_empty()
                        || size_text.len() > 16
                        || !size_text.iter().all(u8::is_ascii_hexdigit)
                    {
                        return Err(Http1Error::Malformed("invalid chunk size").into());
                    }
                    let size = std::str::from_utf8(size_text)
                        .ok()
                        .and_then(|s| u64::from_str_radix(s, 16).ok())
                        .ok_or(Http1Error::Malformed("invalid chunk size"))?;
                    if size == 0 {
                        // Trailers, ignored, up to the empty line.
                        while !read_line(stream, &mut self.buf).await?.is_empty() {}
                        self.left = Left::Done;
                        return Ok(None);
                    }
                    // A chunk size is up to 16 hex digits: the sums must not wrap.
                    if self.total.saturating_add(size) > self.max {
                        return Err(Http1Error::TooLarge.into());
                    }
                    self.left = Left::Chunk(size);
                }
                Left::Chunk(0) => {
                    while self.buf.len() < 2 {
                        read_more(stream, &mut self.buf).await?;
                    }
                    if &self.buf[..2] != b"\r\n" {
                        return Err(Http1Error::Malformed("chunk not followed by CRLF").into());
                    }
                    self.buf.advance(2);
                    self.left = Left::ChunkSize;
                }
                Left::Chunk(n) => {
                    if self.buf.is_empty() && self.fill(stream).await? == 0 {
                        return Err(Http1Error::Io.into());
                    }
                    let take = self.buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                    let piece = self.buf.split_to(take).freeze();
                    self.left = Left::Chunk(n - take as u64);
                    return Ok(Some(self.handed(piece)?));
                }
                Left::UntilClose => {
                    if self.buf.is_empty() && self.fill(stream).await? == 0 {
                        self.left = Left::Done;
                        return Ok(None);
                    }
                    let piece = self.buf.split().freeze();
                    return Ok(Some(self.handed(piece)?));
                }
            }
        }
    }

    /// Counts `piece` against the limit.
    fn handed(&mut self, piece: Bytes) -> Result<Bytes, Attempt> {
        self.total += piece.len() as u64;
        if self.total > self.max {
            return Err(Http1Error::TooLarge.into());
        }
        Ok(piece)
    }
}

impl Attempt {
    fn into_error(self) -> Http1Error {
        match self {
            Self::ClosedBeforeAnswer => Http1Error::Io,
            Self::Failed(e) => e,
        }
    }
}

/// The response parser over any reader, for the fuzz targets (`fuzz`): an answer that
/// ends before its first byte is [`Http1Error::Io`] here. Not a stable interface.
#[doc(hidden)]
pub async fn read_response_from<S: AsyncRead + Unpin>(
    stream: &mut S,
    method: &str,
    max_body: u64,
) -> Result<(Response, bool), Http1Error> {
    read_response(stream, method, max_body, None)
        .await
        .map(|(response, reusable, _)| (response, reusable))
        .map_err(Attempt::into_error)
}

/// [`read_response_from`] with a spill limit of `spill_above` bytes, for the fuzz targets:
/// the first part read into memory and the rest through the streaming reader, joined (a
/// spilled answer is never reused). Not a stable interface.
#[doc(hidden)]
pub async fn read_response_spilling_from<S: AsyncRead + Unpin>(
    stream: &mut S,
    method: &str,
    max_body: u64,
    spill_above: u64,
) -> Result<(Response, bool), Http1Error> {
    let (mut response, reusable, rest) = read_response(stream, method, max_body, Some(spill_above))
        .await
        .map_err(Attempt::into_error)?;
    let Some(mut reader) = rest else {
        return Ok((response, reusable));
    };
    let mut body = BytesMut::from(&response.body[..]);
    while let Some(piece) = reader.next(stream).await.map_err(Attempt::into_error)? {
        body.extend_from_slice(&piece);
    }
    response.body = body.freeze();
    Ok((response, false))
}

/// The request head as it is written to the connection, for the fuzz targets. Not a stable
/// interface.
#[doc(hidden)]
pub fn request_head(request: &Request<'_>) -> Result<Vec<u8>, Http1Error> {
    head(request)
}

type Parsed = (u16, Vec<(String, String)>, usize);

/// Parses a complete response head at the start of `buf`: status, headers, head length.
fn parse_head(buf: &[u8]) -> Result<Option<Parsed>, Http1Error> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut slots);
    match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            if response.version != Some(1) && response.version != Some(0) {
                return Err(Http1Error::Malformed("not HTTP/1.x"));
            }
            let status = response.code.ok_or(Http1Error::Malformed("no status"))?;
            let mut headers = Vec::with_capacity(response.headers.len());
            for h in response.headers.iter() {
                if let Ok(value) = std::str::from_utf8(h.value) {
                    headers.push((h.name.to_ascii_lowercase(), value.to_owned()));
                }
            }
            if response.version == Some(0)
                && !headers
                    .iter()
                    .any(|(n, v)| n == "connection" && v.eq_ignore_ascii_case("keep-alive"))
            {
                headers.push(("connection".to_owned(), "close".to_owned()));
            }
            Ok(Some((status, headers, len)))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(Http1Error::Malformed("too many headers")),
        Err(_) => Err(Http1Error::Malformed("invalid response head")),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// How the body is delimited (RFC 9112 §6.3).
fn framing(method: &str, status: u16, headers: &[(String, String)]) -> Result<Framing, Http1Error> {
    if method.eq_ignore_ascii_case("HEAD") || status == 204 || status == 304 {
        return Ok(Framing::None);
    }
    let encodings: Vec<&str> = headers
        .iter()
        .filter(|(n, _)| n == "transfer-encoding")
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    if let Some(last) = encodings.last() {
        // A length beside an encoding is ignored (the encoding wins).
        return Ok(if last.eq_ignore_ascii_case("chunked") {
            Framing::Chunked
        } else {
            Framing::UntilClose
        });
    }
    let mut length: Option<u64> = None;
    for (_, value) in headers.iter().filter(|(n, _)| n == "content-length") {
        for part in value.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Http1Error::Malformed("invalid content-length"));
            }
            let n: u64 = part
                .parse()
                .map_err(|_| Http1Error::Malformed("invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Http1Error::Malformed("conflicting content-length"));
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::UntilClose, Framing::Length))
}

async fn read_exact_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    mut buf: BytesMut,
    len: usize,
) -> Result<Bytes, Attempt> {
    if buf.len() > len {
        return Err(Http1Error::Malformed("more data than content-length").into());
    }
    buf.reserve(len - buf.len());
    while buf.len() < len {
        let n = stream
            .read_buf(&mut buf)
            .await
            .map_err(|_| Http1Error::Io)?;
        if n == 0 {
            return Err(Http1Error::Io.into());
        }
    }
    // The last read may have brought more than the body (a buffer can hold more than asked).
    if buf.len() > len {
        return Err(Http1Error::Malformed("more data than content-length").into());
    }
    Ok(buf.freeze())
}

async fn read_more<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<(), Attempt> {
    if buf.capacity() == buf.len() {
        buf.reserve(buf.len().clamp(INITIAL_READ, MAX_READ));
    }
    match stream.read_buf(buf).await {
        Ok(0) | Err(_) => Err(Http1Error::Io.into()),
        Ok(_) => Ok(()),
    }
}

/// Position of the first CRLF in `buf`.
fn crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

async fn read_line<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<Bytes, Attempt> {
    loop {
        if let Some(end) = crlf(buf) {
            let line = buf.split_to(end).freeze();
            buf.advance(2);
            return Ok(line);
        }
        if buf.len() > MAX_CHUNK_LINE {
            return Err(Http1Error::Malformed("chunk line too long").into());
        }
        read_more(stream, buf).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    /// The expired prefix goes, the rest stays in order.
    #[tokio::test]
    async fn drop_expired_removes_only_the_connections_idle_too_long() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let now = Instant::now();
        let ages = [30, 20, 9, 1];
        let mut idle = Vec::new();
        for age in ages {
            idle.push(Idle {
                stream: TcpStream::connect(addr).await.unwrap(),
                since: now.checked_sub(Duration::from_secs(age)).unwrap(),
                peer: addr.ip(),
            });
        }
        drop_expired(&mut idle, now, Duration::from_secs(10));
        let left: Vec<u64> = idle
            .iter()
            .map(|c| now.duration_since(c.since).as_secs())
            .collect();
        assert_eq!(left, [9, 1]);
        drop_expired(&mut idle, now, Duration::from_secs(10));
        assert_eq!(idle.len(), 2, "nothing more is expired");
        drop_expired(
            &mut idle,
            now + Duration::from_secs(60),
            Duration::from_secs(10),
        );
        assert!(idle.is_empty());
    }

    /// A real TCP server on 127.0.0.1 that answers every request on a connection with the
    /// next of `answers` (raw bytes, so malformed answers can be sent), and counts the
    /// connections it accepted. After the last answer it closes the connection.
    async fn raw_server(
        answers: Vec<Vec<u8>>,
    ) -> (Origin, Arc<AtomicUsize>, Arc<Mutex<Vec<Vec<u8>>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (count, seen) = (accepted.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let answers = answers.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    for answer in answers {
                        // Read one request head and its content-length body.
                        let mut buf = Vec::new();
                        let mut chunk = [0u8; 4096];
                        let body_len = loop {
                            let Ok(n) = stream.read(&mut chunk).await else {
                                return;
                            };
                            if n == 0 {
                                return;
                            }
                            buf.extend_from_slice(&chunk[..n]);
                            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                                let len = head
                                    .lines()
                                    .find_map(|l| l.strip_prefix("content-length: "))
                                    .and_then(|v| v.trim().parse::<usize>().ok())
                                    .unwrap_or(0);
                                break end + 4 + len;
                            }
                        };
                        while buf.len() < body_len {
                            let Ok(n) = stream.read(&mut chunk).await else {
                                return;
                            };
                            if n == 0 {
                                return;
                            }
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        seen.lock().unwrap().push(buf);
                        if stream.write_all(&answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (
            Origin {
                host: "127.0.0.1".into(),
                port,
            },
            accepted,
            requests,
        )
    }

    #[tokio::test]
    async fn idle_connections_of_origins_not_called_again_are_closed() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec();
        let (once, _, _) = raw_server(vec![ok.clone()]).await;
        let (often, _, _) = raw_server(vec![ok.clone(); 1000]).await;
        let c = Http1Client::new(8, Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!(post(&c, &once, b"1", 64).await.unwrap().status, 200);
        assert_eq!(c.pool().by_origin.get(&once).map(Vec::len), Some(1));
        // Calls to another origin go on; past the idle timeout the first origin's connection
        // is dropped by the next prune, without a call to it.
        let deadline = Instant::now() + Duration::from_secs(20);
        while c.pool().by_origin.contains_key(&once) {
            assert!(
                Instant::now() < deadline,
                "the idle connection was never pruned"
            );
            assert_eq!(post(&c, &often, b"2", 64).await.unwrap().status, 200);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn client() -> Http1Client {
        Http1Client::new(8, Duration::from_secs(30), Duration::from_secs(5))
    }

    async fn post(
        client: &Http1Client,
        origin: &Origin,
        body: &'static [u8],
        max: u64,
    ) -> Result<Response, Http1Error> {
        let body = Bytes::from_static(body);
        let request = Request {
            method: "POST",
            origin,
            host_header: "fn.example",
            target: "/function/f?x=1",
            headers: &[
                ("x-custom", "v"),
                ("bad header", "dropped"),
                ("x-evil", "a\r\nInjected: 1"),
            ],
            body: &body,
        };
        tokio::time::timeout(Duration::from_secs(20), client.send(&request, max))
            .await
            .expect("no answer within 20 s")
    }

    #[tokio::test]
    async fn a_body_above_the_spill_limit_is_a_first_part_and_a_stream_of_the_rest() {
        use futures::StreamExt;
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut length =
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", big.len()).into_bytes();
        length.extend_from_slice(&big);
        let mut chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for piece in big.chunks(70_000) {
            chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            chunked.extend_from_slice(piece);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        let mut close = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_vec();
        close.extend_from_slice(&big);
        let mut short =
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", big.len()).into_bytes();
        short.extend_from_slice(&big[..200_000]);
        let body = Bytes::new();
        let cases = [
            ("length", length, Some(big.len() as u64), true),
            ("chunked", chunked, None, true),
            ("until close", close, None, true),
            ("short", short, Some(big.len() as u64), false),
        ];
        for (what, answer, announced, complete) in cases {
            let (origin, _, _) = raw_server(vec![answer.clone()]).await;
            let request = Request {
                method: "POST",
                origin: &origin,
                host_header: "fn.example",
                target: "/",
                headers: &[],
                body: &body,
            };
            let client = client();
            // Within the spill limit: read whole, as without one.
            let whole = client
                .send_spilling(&request, 1 << 20, Some(1 << 20), None)
                .await;
            if complete {
                let whole = whole.unwrap();
                assert!(whole.rest.is_none(), "{what}");
                assert_eq!(&whole.body[..], &big[..], "{what}");
            } else {
                assert_eq!(whole.unwrap_err(), Http1Error::Io, "{what}");
            }
            let (origin, _, _) = raw_server(vec![answer]).await;
            let request = Request {
                origin: &origin,
                ..request
            };
            let response = client
                .send_spilling(&request, 1 << 20, Some(100_000), None)
                .await
                .unwrap();
            let rest = response.rest.expect("spilled");
            assert_eq!(rest.announced_len(), announced, "{what}");
            assert!(
                response.body.len() < 100_000 + 70_000,
                "{what}: first part held"
            );
            let mut all = response.body.to_vec();
            let mut pieces = rest.into_stream();
            let mut failed = None;
            while let Some(piece) = pieces.next().await {
                match piece {
                    Ok(piece) => {
                        assert!(piece.len() <= MAX_READ + INITIAL_READ, "{what}: one read");
                        all.extend_from_slice(&piece);
                    }
                    Err(e) => failed = Some(e),
                }
            }
            if complete {
                assert_eq!(failed, None, "{what}");
                assert_eq!(all, big, "{what}");
            } else {
                assert_eq!(failed, Some(Http1Error::Io), "{what}: cut short");
                assert_eq!(&all[..], &big[..200_000], "{what}");
            }
        }
    }

    #[tokio::test]
    async fn a_length_delimited_answer_is_read_and_the_connection_reused() {
        let ok = b"HTTP/1.1 201 Created\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello".to_vec();
        let (origin, accepted, requests) = raw_server(vec![ok.clone(), ok.clone(), ok]).await;
        let c = client();
        for _ in 0..3 {
            let r = post(&c, &origin, b"ping", 1024).await.unwrap();
            assert_eq!(r.status, 201);
            assert_eq!(r.body.as_ref(), b"hello");
            assert!(
                r.headers
                    .contains(&("content-type".into(), "text/plain".into()))
            );
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection for three calls"
        );
        let sent = String::from_utf8(requests.lock().unwrap()[0].clone()).unwrap();
        assert!(
            sent.starts_with("POST /function/f?x=1 HTTP/1.1\r\nhost: fn.example\r\n"),
            "{sent}"
        );
        assert!(
            sent.contains("content-length: 4\r\n") && sent.ends_with("\r\n\r\nping"),
            "{sent}"
        );
        assert!(sent.contains("x-custom: v\r\n"));
        // Header names and values that would break the framing are never sent.
        assert!(
            !sent.contains("bad header") && !sent.contains("Injected"),
            "{sent}"
        );
    }

    #[tokio::test]
    async fn chunked_answers_and_informational_heads_are_understood() {
        let answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n".to_vec();
        let (origin, accepted, _) = raw_server(vec![answer.clone(), answer]).await;
        let c = client();
        for _ in 0..2 {
            let r = post(&c, &origin, b"", 1024).await.unwrap();
            assert_eq!((r.status, r.body.as_ref()), (200, b"hello world".as_ref()));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_until_close_is_read_and_the_connection_not_reused() {
        let answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it".to_vec();
        let (origin, accepted, _) = raw_server(vec![answer]).await;
        let c = client();
        for _ in 0..2 {
            let r = post(&c, &origin, b"x", 1024).await.unwrap();
            assert_eq!(r.body.as_ref(), b"all of it");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_pooled_connection_the_server_closed_is_replaced() {
        // One answer per connection, then the server closes it: the second call finds the
        // pooled connection closed and must open a new one, not fail.
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec();
        let (origin, accepted, requests) = raw_server(vec![ok]).await;
        let c = client();
        assert_eq!(post(&c, &origin, b"1", 64).await.unwrap().status, 200);
        // Whether the close has reached us yet (the idle probe sees it) or not (the request
        // meets a closed connection and is sent again on a new one), the call must succeed.
        assert_eq!(post(&c, &origin, b"2", 64).await.unwrap().status, 200);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(
            requests.lock().unwrap().len(),
            2,
            "each request reached the server once"
        );
    }

    #[tokio::test]
    async fn hostile_answers_are_errors_not_guesses() {
        let many_headers = {
            let mut a = b"HTTP/1.1 200 OK\r\n".to_vec();
            for i in 0..(MAX_HEADERS + 1) {
                a.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
            }
            a.extend_from_slice(b"Content-Length: 0\r\n\r\n");
            a
        };
        let huge_head = {
            let mut a = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
            a.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES + 10));
            a
        };
        let cases: Vec<(Vec<u8>, Http1Error)> = vec![
            (
                b"garbage\r\n\r\n".to_vec(),
                Http1Error::Malformed("invalid response head"),
            ),
            (many_headers, Http1Error::Malformed("too many headers")),
            (huge_head, Http1Error::Malformed("response head too large")),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".to_vec(),
                Http1Error::Malformed("conflicting content-length"),
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n".to_vec(),
                Http1Error::Malformed("invalid content-length"),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
                Http1Error::Malformed("invalid chunk size"),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n".to_vec(),
                Http1Error::Malformed("chunk not followed by CRLF"),
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort".to_vec(),
                Http1Error::Io,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n".to_vec(),
                Http1Error::TooLarge,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n".to_vec(),
                Http1Error::TooLarge,
            ),
            (
                b"HTTP/1.1 101 Switching\r\n\r\n".to_vec(),
                Http1Error::Malformed("protocol switch"),
            ),
        ];
        for (answer, expected) in cases {
            let (origin, _, _) = raw_server(vec![answer.clone()]).await;
            let got = post(&client(), &origin, b"x", 1024).await;
            assert_eq!(
                got.err(),
                Some(expected),
                "answer {:?}",
                String::from_utf8_lossy(&answer[..answer.len().min(60)])
            );
        }
    }

    #[tokio::test]
    async fn a_policy_refusing_the_address_means_no_connection_and_no_reuse() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec();
        let (origin, accepted, requests) = raw_server(vec![ok.clone(), ok.clone(), ok]).await;
        let no_loopback = EgressPolicy::new(&["127.0.0.0/8".parse().unwrap()], &[]);
        let c = client();
        let body = Bytes::from_static(b"x");
        let send = |policy: Option<&'static EgressPolicy>, origin: Origin| {
            let c = &c;
            let body = body.clone();
            async move {
                let request = Request {
                    method: "POST",
                    origin: &origin,
                    host_header: "h",
                    target: "/",
                    headers: &[],
                    body: &body,
                };
                c.send_checked(&request, 64, policy).await
            }
        };
        let no_loopback: &'static EgressPolicy = Box::leak(Box::new(no_loopback));
        let refused = || {
            Some(Http1Error::Refused(
                queue_core::egress::Refusal::DeniedAddress,
            ))
        };
        assert_eq!(
            send(Some(no_loopback), origin.clone()).await.err(),
            refused()
        );
        // The name is resolved and every address checked before connecting.
        let by_name = Origin {
            host: "localhost".into(),
            port: origin.port,
        };
        assert_eq!(send(Some(no_loopback), by_name).await.err(), refused());
        assert_eq!(accepted.load(Ordering::SeqCst), 0, "nothing was connected");
        // A connection pooled without a policy is not reused under one that refuses it.
        assert_eq!(send(None, origin.clone()).await.unwrap().status, 200);
        assert_eq!(c.pool().by_origin.get(&origin).map(Vec::len), Some(1));
        assert_eq!(
            send(Some(no_loopback), origin.clone()).await.err(),
            refused()
        );
        assert_eq!(
            requests.lock().unwrap().len(),
            1,
            "the refused request was never sent"
        );
        // ... and stays pooled for callers it is allowed for.
        assert_eq!(send(None, origin.clone()).await.unwrap().status, 200);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let origin = Origin {
            host: "127.0.0.1".into(),
            port,
        };
        assert_eq!(
            post(&client(), &origin, b"x", 64).await.err(),
            Some(Http1Error::Connect)
        );
    }

    #[tokio::test]
    async fn head_204_and_304_answers_have_no_body() {
        for status in ["204 No Content", "304 Not Modified"] {
            let answer = format!("HTTP/1.1 {status}\r\nContent-Length: 10\r\n\r\n").into_bytes();
            let (origin, _, _) = raw_server(vec![answer.clone(), answer]).await;
            let c = client();
            for _ in 0..2 {
                let r = post(&c, &origin, b"x", 64).await.unwrap();
                assert!(r.body.is_empty());
            }
        }
    }

    /// Found by the `headers` fuzz target: an empty target wrote `POST  HTTP/1.1`, a request
    /// line no server parses.
    #[test]
    fn fuzz_regression_an_empty_request_target_is_refused() {
        let origin = Origin {
            host: "gateway".into(),
            port: 8080,
        };
        let body = Bytes::new();
        let request = Request {
            method: "POST",
            origin: &origin,
            host_header: "gateway:8080",
            target: "",
            headers: &[],
            body: &body,
        };
        assert_eq!(
            head(&request),
            Err(Http1Error::Malformed("invalid request target"))
        );
    }

    /// Found by the `http1_response` fuzz target: a chunk of 2^64 - 1 bytes after a first chunk
    /// wrapped the body-size sum (a panic with overflow checks, an out-of-bounds slice without).
    #[tokio::test]
    async fn fuzz_regression_a_huge_chunk_size_is_too_large_not_a_panic() {
        for size in ["ffffffffffffffff", "fffffffffffffffe", "fffffffffffffffd"] {
            let answer = format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n{size}\r\nde\r\n"
            );
            let mut peer = answer.as_bytes();
            let parsed = read_response(&mut peer, "POST", 16, None).await;
            assert!(
                matches!(parsed, Err(Attempt::Failed(Http1Error::TooLarge))),
                "{size}"
            );
            // Without a limit: too large to address, or a body that never comes.
            let mut peer = answer.as_bytes();
            let parsed = read_response(&mut peer, "POST", u64::MAX, None).await;
            assert!(
                matches!(
                    parsed,
                    Err(Attempt::Failed(Http1Error::TooLarge | Http1Error::Io))
                ),
                "{size} without a limit"
            );
        }
    }

    /// Found by the `http1_response` fuzz target: bytes past the content length that came in
    /// the same read as the end of the body were returned as part of it (and the connection
    /// kept for reuse).
    #[tokio::test]
    async fn fuzz_regression_a_body_longer_than_its_content_length_is_refused() {
        let head: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n";
        // The head in one read, the body (and what follows it) in the next.
        let mut peer = AsyncReadExt::chain(head, &b"ok, and more"[..]);
        assert!(matches!(
            read_response(&mut peer, "POST", 1024, None).await,
            Err(Attempt::Failed(Http1Error::Malformed(
                "more data than content-length"
            )))
        ));
        let mut peer = AsyncReadExt::chain(head, &b"ok"[..]);
        let (response, reusable, _) = match read_response(&mut peer, "POST", 1024, None).await {
            Ok(answer) => answer,
            Err(_) => panic!("a body of its content length is refused"),
        };
        assert_eq!((&response.body[..], reusable), (&b"ok"[..], true));
    }
}
