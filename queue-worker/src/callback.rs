//! Delivering the result: `POST {X-Callback-Url}` with the function's body and headers plus the
//! OpenFaaS callback headers, retried with exponential backoff on retryable failures.
//!
//! Only the callback is retried here, never the function: the result is already stored.
//!
//! Where a callback may go is the callback policy's ([`queue_core::egress`]): the URL is checked
//! before every attempt, and every address its host resolves to is checked when the worker
//! connects (in [`Http1Client::send_checked`] for `http`, in the general client's resolver for
//! `https`), so a name cannot be checked at one address and connected at another. A refused
//! callback is not retried: the delivery ends with [`DeadLetterReason::CallbackRefused`].
//! Redirects are never followed: a 3xx ends the delivery. With signing secrets, every attempt is
//! signed ([`crate::signing`]).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use crate::config::WorkerConfig;
use crate::http1::{Http1Client, Http1Error, Request};
use crate::invoke::{PlainTarget, transport_error_kind};
use crate::policy_client::{policy_client, refusal_of};
use crate::signing::{CallbackSigner, SecretsError, unix_seconds_now};
use futures::StreamExt;
use queue_core::Outcome;
use queue_core::backend::DeadLetterReason;
use queue_core::blobs::{BlobError, BlobKey, BlobRef, BlobStore, BlobStream, SharedBlobs};
use queue_core::egress::{EgressPolicy, Refusal};
use queue_core::headers::{is_callback_header, is_hop_by_hop};
use queue_core::message::CallMeta;

const USER_AGENT: &str = concat!("queue-worker/", env!("CARGO_PKG_VERSION"));

/// How a callback ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The receiver answered 2xx.
    Delivered {
        /// Its status.
        status: u16,
        /// Attempts used.
        attempts: u32,
    },
    /// A permanent failure (4xx other than 408/429, 3xx, 410 Gone), attempts exhausted, or a
    /// destination the callback policy refuses.
    GaveUp {
        /// Data-free reason.
        reason: String,
        /// Attempts used.
        attempts: u32,
        /// How the call is dead-lettered: `callback_refused` (the policy refused the
        /// destination; nothing was sent) or `callback_failed`.
        dead_letter: DeadLetterReason,
    },
    /// Shutdown's grace period ended before delivery; the message is handed back.
    Interrupted,
}

/// Sends callbacks.
#[derive(Debug, Clone)]
pub struct CallbackSender {
    client: reqwest::Client,
    http1: Arc<Http1Client>,
    policy: Arc<EgressPolicy>,
    signer: Option<Arc<CallbackSigner>>,
    timeout: Duration,
    max_attempts: u32,
    initial_wait: Duration,
    max_wait: Duration,
    /// Where results too large to hold are (`None`: a stored result cannot be sent).
    blobs: Option<SharedBlobs>,
}

/// `X-Function-Error` of a cancelled call's callback (an outcome only the worker makes); its
/// callback also says `X-Call-State: cancelled`.
pub const CANCELLED: &str = "cancelled";

/// Headers of a callback request, in order: the function's response headers, then ours.
/// `dead_letter` names the reason when the call failed for good (`X-Dead-Letter-Reason`).
/// The function's response never supplies one of ours
/// ([`queue_core::headers::CALLBACK_HEADERS`], `X-Call-State` included): a receiver can trust
/// every one of them.
/// `tries`: the attempt the outcome came from (from 1) and the attempts allowed, sent as
/// `X-Retry` and `X-Retry-Max` as OpenFaaS Pro does (none for a call that never ran).
pub fn callback_headers(
    meta: &CallMeta,
    outcome: &Outcome,
    dead_letter: Option<&str>,
    tries: Option<(u32, u32)>,
) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = outcome
        .headers
        .iter()
        .filter(|(name, _)| !is_hop_by_hop(name) && !is_callback_header(name))
        .cloned()
        .collect();
    headers.push(("X-Call-Id".into(), meta.call_id.clone()));
    headers.push(("X-Function-Status".into(), outcome.status.to_string()));
    headers.push((
        "X-Duration-Seconds".into(),
        format!("{:.6}", outcome.duration.as_secs_f64()),
    ));
    headers.push(("X-Function-Name".into(), meta.qualified_function()));
    headers.push((
        "X-Start-Time".into(),
        meta.received_at_unix_nanos.to_string(),
    ));
    if let Some(err) = &outcome.error {
        headers.push(("X-Function-Error".into(), err.clone()));
        if err == CANCELLED {
            headers.push(("X-Call-State".into(), CANCELLED.into()));
        }
    }
    if let Some(reason) = dead_letter {
        headers.push(("X-Dead-Letter-Reason".into(), reason.to_owned()));
    }
    if let Some((attempt, max)) = tries {
        headers.push(("X-Retry".into(), attempt.to_string()));
        headers.push(("X-Retry-Max".into(), max.to_string()));
    }
    headers
}

enum AttemptResult {
    Delivered(u16),
    Retry(String, Option<Duration>),
    Permanent(String),
    Refused(Refusal),
}

/// Why callbacks cannot be sent at all (the worker does not start).
#[derive(Debug, thiserror::Error)]
pub enum CallbackSetupError {
    /// The HTTP client could not be built.
    #[error("cannot build the callback HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    /// The signing secrets or keys cannot be used.
    #[error(transparent)]
    Secrets(#[from] SecretsError),
}

/// The general client for callbacks: the policy's resolver, no redirects, no proxy (the worker
/// must see the address it connects to).
fn callback_client(policy: Arc<EgressPolicy>) -> Result<reqwest::Client, reqwest::Error> {
    policy_client(policy, USER_AGENT)
}

impl CallbackSender {
    /// From the worker configuration: the callback policy, the signing secrets and keys (if
    /// their files are configured; an unreadable or invalid file is an error), the plain-`http`
    /// client.
    pub fn new(config: &WorkerConfig, http1: Arc<Http1Client>) -> Result<Self, CallbackSetupError> {
        let policy = Arc::new(config.callback_policy.policy());
        let signer = CallbackSigner::from_files(
            config.callback_signing_secrets_file.as_deref(),
            config.callback_signing_keys_file.as_deref(),
        )?
        .map(Arc::new);
        Ok(Self {
            client: callback_client(policy.clone())?,
            http1,
            policy,
            signer,
            timeout: config.callback_timeout,
            max_attempts: config.callback_max_attempts,
            initial_wait: config.callback_initial_wait,
            max_wait: config.callback_max_wait,
            blobs: None,
        })
    }

    /// Sends results kept in `blobs` (the function's response was larger than
    /// `--inline-response-bytes`) from there.
    pub fn with_blobs(mut self, blobs: Option<SharedBlobs>) -> Self {
        self.blobs = blobs;
        self
    }

    /// Delivers the callback, retrying retryable failures until it succeeds, fails for good,
    /// runs out of attempts or `interrupt` fires.
    pub async fn deliver(
        &self,
        url: &str,
        meta: &CallMeta,
        outcome: &Outcome,
        dead_letter: Option<&str>,
        tries: Option<(u32, u32)>,
        interrupt: &CancellationToken,
    ) -> Delivery {
        let failed = |reason: String, attempts: u32| Delivery::GaveUp {
            reason,
            attempts,
            dead_letter: DeadLetterReason::CallbackFailed,
        };
        // Checked when the call was decoded; a URL that does not parse is not retried.
        let Ok(url) = url::Url::parse(url) else {
            return failed("invalid callback URL".into(), 0);
        };
        let plain = PlainTarget::from_url(&url);
        let headers = callback_headers(meta, outcome, dead_letter, tries);
        let mut wait = self.initial_wait;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let result = tokio::select! {
                r = self.attempt(&url, plain.as_ref(), &meta.call_id, &headers, outcome) => r,
                () = interrupt.cancelled() => return Delivery::Interrupted,
            };
            let (reason, retry_after) = match result {
                AttemptResult::Delivered(status) => {
                    return Delivery::Delivered { status, attempts };
                }
                AttemptResult::Permanent(reason) => return failed(reason, attempts),
                AttemptResult::Refused(refusal) => {
                    return Delivery::GaveUp {
                        reason: format!("refused by the callback policy: {refusal}"),
                        attempts,
                        dead_letter: DeadLetterReason::CallbackRefused,
                    };
                }
                AttemptResult::Retry(reason, retry_after) => (reason, retry_after),
            };
            if attempts >= self.max_attempts {
                return failed(format!("{reason} after {attempts} attempts"), attempts);
            }
            let delay = retry_after.unwrap_or(wait).min(self.max_wait);
            tracing::warn!(call_id = %meta.call_id, attempt = attempts, %reason, retry_in = ?delay, "callback failed; retrying");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = interrupt.cancelled() => return Delivery::Interrupted,
            }
            wait = (wait * 2).min(self.max_wait);
        }
    }

    /// One attempt: the URL against the policy, the signature of this attempt (its own
    /// timestamp), then the POST over plain `http` or the general client.
    async fn attempt(
        &self,
        url: &url::Url,
        plain: Option<&PlainTarget>,
        msg_id: &str,
        headers: &[(String, String)],
        outcome: &Outcome,
    ) -> AttemptResult {
        if let Err(refusal) = self.policy.check_url(url) {
            return AttemptResult::Refused(refusal);
        }
        if let Some(stored) = &outcome.stored {
            // Boxed: only a stored result's callback needs the store's read state.
            return Box::pin(self.attempt_stored(url, msg_id, headers, stored)).await;
        }
        let signature = self
            .signer
            .as_ref()
            .map(|s| s.headers(msg_id, unix_seconds_now(), &outcome.body));
        let signature = signature.as_ref().map_or(&[][..], |s| &s[..]);
        if let Some(target) = plain {
            return self
                .attempt_plain(target, headers, signature, outcome)
                .await;
        }
        self.send_general(url, headers, signature, outcome.body.clone().into())
            .await
    }

    /// An attempt of a callback whose body is a stored result: streamed from the store
    /// through the general client, with its `Content-Length`; when signing, the signature is
    /// computed over a first read of the blob (the body is never held whole; `v1a` keys need
    /// the whole message and hold it for the signature).
    async fn attempt_stored(
        &self,
        url: &url::Url,
        msg_id: &str,
        headers: &[(String, String)],
        stored: &BlobRef,
    ) -> AttemptResult {
        let signature = match &self.signer {
            None => None,
            Some(signer) => {
                let mut draft = signer.begin(msg_id, unix_seconds_now());
                // The signing read is bounded like the POST (`--callback-timeout`).
                let signed = tokio::time::timeout(self.timeout, async {
                    let mut body = self.open_result(stored).await?;
                    while let Some(piece) = body.next().await {
                        draft.update(&piece.map_err(|e| read_failed(&e))?);
                    }
                    Ok::<(), AttemptResult>(())
                })
                .await;
                match signed {
                    Err(_) => return AttemptResult::Retry("timeout".into(), None),
                    Ok(Err(e)) => return e,
                    Ok(Ok(())) => Some(draft.finish()),
                }
            }
        };
        let signature = signature.as_ref().map_or(&[][..], |s| &s[..]);
        let body = match self.open_result(stored).await {
            Ok(body) => body,
            Err(e) => return e,
        };
        let mut with_length = headers.to_vec();
        with_length.retain(|(name, _)| !name.eq_ignore_ascii_case("content-length"));
        with_length.push(("content-length".into(), stored.len.to_string()));
        self.send_general(
            url,
            &with_length,
            signature,
            reqwest::Body::wrap_stream(body),
        )
        .await
    }

    /// The stored result's bytes, checked to be the blob `stored` names.
    async fn open_result(&self, stored: &BlobRef) -> Result<BlobStream, AttemptResult> {
        let gone = |what: &str| AttemptResult::Permanent(format!("the stored result {what}"));
        let Some(blobs) = &self.blobs else {
            return Err(gone("cannot be read: this worker has no blob store"));
        };
        let key = BlobKey::parse(&stored.key).map_err(|_| gone("has a malformed key"))?;
        let store = blobs
            .store()
            .await
            .map_err(|_| AttemptResult::Retry("result store unavailable".into(), None))?;
        match store.get(&key, None).await {
            Ok(read) if read.info.len == stored.len && read.info.sha256 == stored.sha256 => {
                Ok(read.body)
            }
            Ok(_) => Err(gone("is not the one the call names (length or digest)")),
            Err(e) => Err(read_failed(&e)),
        }
    }

    /// A POST through the general client.
    async fn send_general(
        &self,
        url: &url::Url,
        headers: &[(String, String)],
        signature: &[(&'static str, String)],
        body: reqwest::Body,
    ) -> AttemptResult {
        let mut request = self
            .client
            .post(url.clone())
            .timeout(self.timeout)
            .body(body);
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_str());
        }
        for (name, value) in signature {
            request = request.header(*name, value.as_str());
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                return match refusal_of(&e) {
                    Some(refusal) => AttemptResult::Refused(refusal),
                    None => AttemptResult::Retry(transport_error_kind(&e).to_owned(), None),
                };
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // Drain the (small) body so the connection can be reused; ignore its content.
        let _ = response.bytes().await;
        classify(status.as_u16(), retry_after)
    }

    /// [`CallbackSender::attempt`] over plain `http` with [`Http1Client`].
    async fn attempt_plain(
        &self,
        target: &PlainTarget,
        headers: &[(String, String)],
        signature: &[(&'static str, String)],
        outcome: &Outcome,
    ) -> AttemptResult {
        let mut pairs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .chain(signature.iter().map(|(n, v)| (*n, v.as_str())))
            .collect();
        pairs.push(("user-agent", USER_AGENT));
        let request = Request {
            method: "POST",
            origin: &target.origin,
            host_header: &target.host_header,
            target: &target.path_and_query,
            headers: &pairs,
            body: &outcome.body,
        };
        let sent = tokio::time::timeout(
            self.timeout,
            self.http1
                .send_checked(&request, MAX_RECEIVER_ANSWER, Some(&self.policy)),
        )
        .await;
        let response = match sent {
            Err(_) => return AttemptResult::Retry("timeout".into(), None),
            Ok(Err(Http1Error::Refused(refusal))) => return AttemptResult::Refused(refusal),
            Ok(Err(Http1Error::Connect)) => return AttemptResult::Retry("connect".into(), None),
            Ok(Err(Http1Error::Io)) => return AttemptResult::Retry("request".into(), None),
            Ok(Err(Http1Error::TooLarge | Http1Error::Malformed(_))) => {
                return AttemptResult::Retry("invalid answer".into(), None);
            }
            Ok(Ok(response)) => response,
        };
        let retry_after = response
            .headers
            .iter()
            .find(|(n, _)| n == "retry-after")
            .and_then(|(_, v)| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        classify(response.status, retry_after)
    }
}

/// What a failed read of a stored result means for the callback: retried while the store is
/// unavailable; a blob missing or failing its checks will not get better.
fn read_failed(e: &BlobError) -> AttemptResult {
    match e {
        BlobError::NotFound => AttemptResult::Permanent("the stored result is missing".into()),
        BlobError::Integrity { .. } | BlobError::Undecryptable { .. } => {
            AttemptResult::Permanent("the stored result failed its integrity check".into())
        }
        _ => AttemptResult::Retry("result store unavailable".into(), None),
    }
}

/// Largest answer body read from a callback receiver (it is drained, never used).
const MAX_RECEIVER_ANSWER: u64 = 1 << 20;

/// What a receiver's status means for the callback.
fn classify(code: u16, retry_after: Option<Duration>) -> AttemptResult {
    match code {
        200..=299 => AttemptResult::Delivered(code),
        408 | 429 | 500..=599 => AttemptResult::Retry(format!("status {code}"), retry_after),
        410 => AttemptResult::Permanent("receiver answered 410 Gone".into()),
        _ => AttemptResult::Permanent(format!("status {code}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use queue_core::message::BodyLocation;

    #[test]
    fn callback_headers_carry_the_openfaas_set_and_the_function_headers() {
        let meta = CallMeta {
            call_id: "abc".into(),
            function: "fn".into(),
            namespace: Some("ns".into()),
            method: "POST".into(),
            path: String::new(),
            query: None,
            headers: vec![],
            callback_url: None,
            received_at_unix_nanos: 42,
            body: BodyLocation::Inline { len: 0 },
            record_revision: None,
            overrides: Default::default(),
            not_before_unix_nanos: None,
        };
        let outcome = Outcome {
            status: 418,
            headers: vec![
                ("content-type".into(), "text/plain".into()),
                ("x-call-id".into(), "spoofed".into()),
                ("X-Call-State".into(), "cancelled".into()),
                ("x-dead-letter-reason".into(), "spoofed".into()),
                ("x-retry".into(), "99".into()),
                ("transfer-encoding".into(), "chunked".into()),
            ],
            body: Bytes::new(),
            stored: None,
            duration: Duration::from_millis(1250),
            error: None,
        };
        let h = callback_headers(&meta, &outcome, None, Some((2, 5)));
        let get = |n: &str| {
            h.iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(get("content-type"), ["text/plain"]);
        assert_eq!(get("x-call-id"), ["abc"]);
        assert_eq!(get("x-function-status"), ["418"]);
        assert_eq!(get("x-duration-seconds"), ["1.250000"]);
        assert_eq!(get("x-function-name"), ["fn.ns"]);
        assert_eq!(get("x-start-time"), ["42"]);
        assert_eq!(get("x-retry"), ["2"], "the worker's, not the function's");
        assert_eq!(get("x-retry-max"), ["5"]);
        assert!(get("transfer-encoding").is_empty());
        assert!(get("x-function-error").is_empty());
        assert!(
            get("x-call-state").is_empty(),
            "a function cannot set X-Call-State"
        );
        assert!(get("x-dead-letter-reason").is_empty());
    }
}
