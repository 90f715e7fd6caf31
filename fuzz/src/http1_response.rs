//! The worker's HTTP/1.1 response parser (`queue_worker::http1`): the answers of functions
//! and callback receivers, neither of which the worker trusts. Driven from memory: the first
//! input byte picks the request method, the body limit and the size of each read, the rest is
//! what the peer sends.
//!
//! Properties: the parser returns a response or an error, never a panic, never waits on a
//! reader that is always ready; a body is never larger than the limit, a `HEAD` answer has
//! none, names are lower case, no informational status is returned as the answer; how the
//! bytes are split into reads does not change an answer that parses both ways; and a body
//! read past a spill limit (its first part in memory, the rest streamed) is the same answer,
//! or the same error, as the body read whole.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use queue_worker::http1::{Http1Error, Response, read_response_from, read_response_spilling_from};
use tokio::io::{AsyncRead, ReadBuf};

use crate::some;

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    let Some((&control, peer)) = data.split_first() else {
        return;
    };
    let method = if control & 1 == 1 { "HEAD" } else { "POST" };
    let max_body = [0, 16, 1024, 64 << 10][usize::from((control >> 1) & 3)];
    let step = [1, 2, 3, 7, 64, 1024, 4096, usize::MAX][usize::from((control >> 3) & 7)];
    let spill = [0, 1, 5, 100][usize::from((control >> 6) & 3)];
    let split = parse(peer, method, max_body, step);
    let whole = parse(peer, method, max_body, usize::MAX);
    let spilled = some(
        ready(read_response_spilling_from(
            &mut Pieces { data: peer, step },
            method,
            max_body,
            spill,
        )),
        "the spilling parser waited on a reader that is always ready",
    );
    // Against the same reads: the same answer. The one difference allowed is bytes past a
    // `Content-Length`, which a reader sees or not depending on how much it asks for at once.
    let past_length = |e: &Http1Error| *e == Http1Error::Malformed("more data than content-length");
    match (&spilled, &split) {
        (Ok((a, _)), Ok((b, _))) => assert_eq!(
            (a.status, &a.headers, &a.body),
            (b.status, &b.headers, &b.body),
            "a spill limit of {spill} changed the answer"
        ),
        (Err(a), Err(b)) => assert!(
            a == b || past_length(a) || past_length(b),
            "a spill limit of {spill} changed the error: {a:?} against {b:?}"
        ),
        (Ok(_), Err(e)) | (Err(e), Ok(_)) => assert!(
            past_length(e),
            "a spill limit of {spill} changed the outcome: {e:?} on one side only"
        ),
    }
    for (response, _) in split.iter().chain(whole.iter()).chain(spilled.iter()) {
        assert!(
            response.body.len() as u64 <= max_body,
            "body over the limit"
        );
        assert!(
            method != "HEAD" || response.body.is_empty(),
            "a HEAD answer with a body"
        );
        assert!(
            !(100..200).contains(&response.status),
            "{}",
            response.status
        );
        for (name, _) in &response.headers {
            assert_eq!(*name, name.to_ascii_lowercase());
        }
    }
    if let (Ok((a, _)), Ok((b, _))) = (&split, &whole) {
        assert_eq!(
            (a.status, &a.headers, &a.body),
            (b.status, &b.headers, &b.body),
            "reads of {step} bytes changed the answer"
        );
    }
}

type Parsed = Result<(Response, bool), Http1Error>;

fn parse(peer: &[u8], method: &str, max_body: u64, step: usize) -> Parsed {
    let mut reader = Pieces { data: peer, step };
    some(
        ready(read_response_from(&mut reader, method, max_body)),
        "the parser waited on a reader that is always ready",
    )
}

/// Polls `future` once: with a reader that is always ready it has nothing to wait for.
fn ready<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => Some(output),
        Poll::Pending => None,
    }
}

/// A peer that sends `data` at most `step` bytes per read, then closes.
#[derive(Debug)]
struct Pieces<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.step.min(self.data.len()).min(buf.remaining());
        let (now, later) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = later;
        Poll::Ready(Ok(()))
    }
}

/// Answers in every framing: length, chunked with trailers, until close, no body, an
/// informational answer first, HTTP/1.0. The first byte is the control byte (see the module).
pub fn seeds() -> Vec<Vec<u8>> {
    let answers: [(u8, &[u8]); 7] = [
        (0x2c, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"),
        (
            0x14,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\nX-T: 1\r\n\r\n",
        ),
        (0x3c, b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n\r\nupstream gone"),
        (0x04, b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"),
        (0x2c, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx"),
        (0x3c, b"HTTP/1.0 200 OK\r\n\r\nuntil the end"),
        (0x2d, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
    ];
    answers
        .iter()
        .map(|(control, answer)| {
            let mut seed = vec![*control];
            seed.extend_from_slice(answer);
            seed
        })
        .collect()
}
