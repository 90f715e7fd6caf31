//! What came of one invocation: a data type the worker's invoker produces and the dedup state,
//! the retry decision, the callback and the kept result consume.

use std::time::Duration;

use bytes::Bytes;

/// What came of one invocation.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The function's status, or 503 when it could not be reached (OpenFaaS's convention),
    /// 502 when its response was unusable.
    pub status: u16,
    /// The function's response headers (hop-by-hop removed).
    pub headers: Vec<(String, String)>,
    /// The function's response body (empty on a transport error, and when it is stored).
    pub body: Bytes,
    /// The response body when it was larger than the inline threshold and was streamed into
    /// the blob store instead (`body` is then empty).
    pub stored: Option<crate::blobs::BlobRef>,
    /// Wall time of the call.
    pub duration: Duration,
    /// Why there is no real response, if so (`timeout`, `connect`, ...). Sent as
    /// `X-Function-Error`; never contains request or response data.
    pub error: Option<String>,
}
