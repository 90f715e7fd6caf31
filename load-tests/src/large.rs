//! `load-tests large`: one large body, and the function's equally large answer, through the
//! async path, with the raw costs of moving that many bytes measured in the same run.
//!
//! For each backend the harness starts a fresh system (JetStream: a private nats-server, the
//! gateway and a worker; embedded: one `faas-async`), an echo function and a callback
//! receiver, and then:
//!
//! 1. reads the system's processes' resident memory at rest;
//! 2. uploads `size` bytes to `POST /async-function/echo` (until the 202: *upload*);
//! 3. waits for the callback, whose body must have the body's SHA-256 (*round trip*: 202 to
//!    callback);
//! 4. reads `GET /async-calls/{id}/result` and checks its digest (*result read*);
//! 5. reads every process's peak resident memory (`VmHWM`): the growth over rest is what the
//!    payload cost it.
//!
//! Baselines, same run and machine: a raw file copy of `size` bytes (copy and `fsync`), and a
//! raw JetStream object-store put and get of `size` bytes on the same nats-server.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::AsyncReadExt;

use crate::error::BenchError;
use crate::sut::{Backend, ProcessUsage, SutOptions, SystemUnderTest};
use test_support::nats_server::NatsServer;
use test_support::payload::sha256;
use test_support::stub::{CallbackReceiver, StubBehavior, StubFunction};

const MIB: f64 = 1024.0 * 1024.0;

/// What `load-tests large` does.
#[derive(Clone, Debug)]
pub struct LargeOptions {
    /// Bytes of the body (and of the echoed result).
    pub size: usize,
    /// The backends to run, in order.
    pub backends: Vec<Backend>,
    /// Where the binaries are.
    pub bin_dir: Option<PathBuf>,
    /// Hard limit on one backend's round trip.
    pub time_limit: Duration,
}

impl Default for LargeOptions {
    fn default() -> Self {
        Self {
            size: 256 << 20,
            backends: vec![Backend::JetStream, Backend::Embedded],
            bin_dir: None,
            time_limit: Duration::from_secs(600),
        }
    }
}

/// A transfer's time and rate.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Transfer {
    /// Seconds.
    pub seconds: f64,
    /// MiB per second.
    pub mib_per_sec: f64,
}

impl Transfer {
    fn of(bytes: usize, took: Duration) -> Self {
        let seconds = took.as_secs_f64();
        #[allow(clippy::cast_precision_loss, reason = "a rate for a report")]
        let mib = bytes as f64 / MIB;
        Self {
            seconds,
            mib_per_sec: if seconds > 0.0 { mib / seconds } else { 0.0 },
        }
    }
}

/// A process's memory at rest and at its peak, in MiB.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Memory {
    /// Which process.
    pub name: String,
    /// Resident at rest, before the upload.
    pub idle_rss_mib: f64,
    /// Peak resident (`VmHWM`) after the round trip.
    pub peak_rss_mib: f64,
    /// Peak over rest.
    pub growth_mib: f64,
}

/// One backend's figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendReport {
    /// Which backend.
    pub backend: Backend,
    /// Upload until the 202.
    pub upload: Transfer,
    /// From the 202 to the callback (the function's echo included).
    pub round_trip: Transfer,
    /// The callback's body has the body's digest.
    pub callback_digest_equal: bool,
    /// The result endpoint's status.
    pub result_status: u16,
    /// Reading the kept result whole, when it was there.
    pub result_read: Option<Transfer>,
    /// The kept result has the body's digest.
    pub result_digest_equal: bool,
    /// The processes' memory.
    pub memory: Vec<Memory>,
}

/// Raw costs of the same bytes.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Baselines {
    /// A file copy and its `fsync`.
    pub file_copy: Transfer,
    /// A JetStream object-store put (nats-server on loopback).
    pub object_put: Transfer,
    /// Its get, read whole.
    pub object_get: Transfer,
}

/// The whole run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LargeReport {
    /// Bytes of the body and of the result.
    pub size: usize,
    /// Same-run baselines.
    pub baselines: Baselines,
    /// Per backend.
    pub backends: Vec<BackendReport>,
}

impl LargeReport {
    /// Every digest matched and every result was read.
    pub fn is_clean(&self) -> bool {
        self.backends
            .iter()
            .all(|b| b.callback_digest_equal && b.result_digest_equal)
    }

    /// The report as Markdown.
    pub fn to_table(&self) -> String {
        let b = &self.baselines;
        let mut out = format!(
            "large: {} MiB body, echoed back as the result\n\n\
             baselines (same run): file copy + fsync {:.0} MiB/s; object store put {:.0} MiB/s, get {:.0} MiB/s\n\n\
             | backend | upload | round trip (202 → callback) | result read | digests (callback, result) | peak RSS over idle |\n\
             |---|---|---|---|---|---|\n",
            self.size >> 20,
            b.file_copy.mib_per_sec,
            b.object_put.mib_per_sec,
            b.object_get.mib_per_sec,
        );
        for r in &self.backends {
            let memory: Vec<String> = r
                .memory
                .iter()
                .map(|m| {
                    format!(
                        "{} +{:.1} MiB ({:.1} → {:.1})",
                        m.name, m.growth_mib, m.idle_rss_mib, m.peak_rss_mib
                    )
                })
                .collect();
            let result = r.result_read.as_ref().map_or_else(
                || format!("status {}", r.result_status),
                |t| format!("{:.2} s, {:.0} MiB/s", t.seconds, t.mib_per_sec),
            );
            out.push_str(&format!(
                "| {} | {:.2} s, {:.0} MiB/s | {:.2} s, {:.0} MiB/s | {} | {}, {} | {} |\n",
                match r.backend {
                    Backend::JetStream => "jetstream",
                    Backend::Embedded => "embedded",
                },
                r.upload.seconds,
                r.upload.mib_per_sec,
                r.round_trip.seconds,
                r.round_trip.mib_per_sec,
                result,
                r.callback_digest_equal,
                r.result_digest_equal,
                memory.join("; ")
            ));
        }
        out
    }
}

/// The bytes sent: a cheap pseudo-random stream (xorshift), not compressible.
pub fn payload(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Runs the baselines and every backend of `opts`.
pub async fn run(opts: &LargeOptions) -> Result<LargeReport, BenchError> {
    if opts.size == 0 {
        return Err(BenchError::Options("--size must be above 0".into()));
    }
    crate::sut::ensure_nats_server().await?;
    let body = bytes::Bytes::from(payload(opts.size));
    let digest = sha256(&body);
    let baselines = baselines(&body).await?;
    eprintln!(
        "large: baselines: file copy {:.0} MiB/s, object put {:.0} MiB/s, get {:.0} MiB/s",
        baselines.file_copy.mib_per_sec,
        baselines.object_put.mib_per_sec,
        baselines.object_get.mib_per_sec
    );
    let mut backends = Vec::new();
    for &backend in &opts.backends {
        let report = tokio::time::timeout(
            opts.time_limit,
            run_backend(opts, backend, body.clone(), &digest),
        )
        .await
        .map_err(|_| {
            BenchError::Setup(format!(
                "the {backend:?} round trip did not finish within {:?}",
                opts.time_limit
            ))
        })??;
        eprintln!(
            "large: {backend:?} done: round trip {:.1} s",
            report.round_trip.seconds
        );
        backends.push(report);
    }
    Ok(LargeReport {
        size: opts.size,
        baselines,
        backends,
    })
}

async fn baselines(body: &bytes::Bytes) -> Result<Baselines, BenchError> {
    let dir = tempfile::Builder::new()
        .prefix("load-tests-large-")
        .tempdir()
        .map_err(|e| BenchError::setup("creating a temporary directory", e))?;
    let from = dir.path().join("from");
    let to = dir.path().join("to");
    let file_copy = {
        let bytes = body.clone();
        let (from, to) = (from.clone(), to.clone());
        tokio::task::spawn_blocking(move || -> std::io::Result<Duration> {
            std::fs::write(&from, &bytes)?;
            std::fs::File::open(&from)?.sync_all()?;
            let started = Instant::now();
            std::fs::copy(&from, &to)?;
            std::fs::File::open(&to)?.sync_all()?;
            Ok(started.elapsed())
        })
        .await
        .map_err(|e| BenchError::Setup(format!("the file copy failed: {e}")))?
        .map_err(|e| BenchError::setup("copying a file", e))?
    };

    let nats = NatsServer::start().await?;
    let client = async_nats::connect(nats.url())
        .await
        .map_err(|e| BenchError::setup("connecting to nats-server", e))?;
    let js = async_nats::jetstream::new(client);
    let store = js
        .create_object_store(async_nats::jetstream::object_store::Config {
            bucket: "raw".into(),
            ..Default::default()
        })
        .await
        .map_err(|e| BenchError::setup("creating an object store", e))?;
    let started = Instant::now();
    let mut reader: &[u8] = body;
    store
        .put("payload", &mut reader)
        .await
        .map_err(|e| BenchError::setup("putting an object", e))?;
    let put = started.elapsed();
    let started = Instant::now();
    let mut object = store
        .get("payload")
        .await
        .map_err(|e| BenchError::setup("getting an object", e))?;
    let mut back = Vec::with_capacity(body.len());
    object
        .read_to_end(&mut back)
        .await
        .map_err(|e| BenchError::setup("reading an object", e))?;
    let get = started.elapsed();
    if back.len() != body.len() {
        return Err(BenchError::Setup(format!(
            "the object store gave back {} of {} bytes",
            back.len(),
            body.len()
        )));
    }
    Ok(Baselines {
        file_copy: Transfer::of(body.len(), file_copy),
        object_put: Transfer::of(body.len(), put),
        object_get: Transfer::of(body.len(), get),
    })
}

fn kib_to_mib(kib: u64) -> f64 {
    #[allow(clippy::cast_precision_loss, reason = "memory for a report")]
    let kib = kib as f64;
    kib / 1024.0
}

async fn run_backend(
    opts: &LargeOptions,
    backend: Backend,
    body: bytes::Bytes,
    digest: &[u8],
) -> Result<BackendReport, BenchError> {
    let nats = match backend {
        Backend::JetStream => Some(NatsServer::start().await?),
        Backend::Embedded => None,
    };
    let function = StubFunction::start(StubBehavior {
        echo_body: true,
        ..StubBehavior::default()
    })
    .await?;
    function.set_recording(false);
    let receiver = CallbackReceiver::start().await?;
    // Room above the payload for every limit on its way.
    let limit = format!("{}MiB", (opts.size >> 20) * 2 + 16);
    let limits = |flags: &[&str]| -> Vec<String> {
        flags
            .iter()
            .flat_map(|flag| [(*flag).to_owned(), limit.clone()])
            .collect()
    };
    let (worker_args, gateway_args) = match backend {
        Backend::JetStream => (
            limits(&["--max-response-bytes", "--max-result-bytes"]),
            limits(&["--max-body-bytes", "--max-result-bytes"]),
        ),
        Backend::Embedded => (
            limits(&[
                "--max-body-bytes",
                "--max-response-bytes",
                "--max-result-bytes",
            ]),
            Vec::new(),
        ),
    };
    let system = SystemUnderTest::start(&SutOptions {
        backend,
        bin_dir: opts.bin_dir.clone(),
        max_inflight: 4,
        function_url: function.url(),
        nats_url: nats.as_ref().map(NatsServer::url).unwrap_or_default(),
        worker_args,
        gateway_args,
    })
    .await?;
    let result = measure(&system, backend, body, digest, &receiver).await;
    let stopped = system.stop().await;
    let report = result?;
    stopped?;
    Ok(report)
}

async fn measure(
    system: &SystemUnderTest,
    backend: Backend,
    body: bytes::Bytes,
    digest: &[u8],
    receiver: &CallbackReceiver,
) -> Result<BackendReport, BenchError> {
    let size = body.len();
    let idle = system.usage();
    let client = reqwest::Client::new();
    let started = Instant::now();
    let response = client
        .post(format!("{}/async-function/echo", system.gateway_url))
        .header("x-callback-url", receiver.url())
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .map_err(|e| BenchError::setup("uploading the body", e))?;
    let upload = started.elapsed();
    let status = response.status();
    if status != reqwest::StatusCode::ACCEPTED {
        let text = response.text().await.unwrap_or_default();
        return Err(BenchError::Setup(format!(
            "the gateway answered {status} to the upload: {text}"
        )));
    }
    let call_id = response
        .headers()
        .get("x-call-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| BenchError::Setup("a 202 without X-Call-Id".into()))?;
    let accepted = Instant::now();
    if !receiver
        .wait_for_call_ids(std::slice::from_ref(&call_id), Duration::from_secs(600))
        .await
    {
        return Err(BenchError::Setup(
            "no callback for the large call within 600 s".into(),
        ));
    }
    let callbacks = receiver.callbacks();
    let callback = callbacks
        .iter()
        .find(|c| c.call_id.as_deref() == Some(call_id.as_str()))
        .ok_or_else(|| BenchError::Setup("the callback went missing".into()))?;
    let round_trip = callback.received_at.saturating_duration_since(accepted);
    let callback_digest_equal = sha256(&callback.body) == digest;

    // The kept result, once the record says the call is done.
    let url = format!("{}/async-calls/{call_id}/result", system.gateway_url);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (result_status, result_read, result_digest_equal) = loop {
        let started = Instant::now();
        let response = client
            .get(&url)
            .send()
            .await
            .map_err(|e| BenchError::setup("reading the result", e))?;
        let status = response.status().as_u16();
        if status == 200 {
            let bytes = response
                .bytes()
                .await
                .map_err(|e| BenchError::setup("reading the result's body", e))?;
            break (
                status,
                Some(Transfer::of(bytes.len(), started.elapsed())),
                sha256(&bytes) == digest,
            );
        }
        // 202 while the call's record does not say it finished yet; anything else is the answer
        // (409 `result_too_large` where the result was not kept).
        if status != 202 || Instant::now() > deadline {
            break (status, None, false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let peak = system.usage();
    let memory = idle
        .iter()
        .map(|before: &ProcessUsage| {
            let after = peak.iter().find(|p| p.name == before.name);
            let peak_kib = after.map_or(before.peak_rss_kib, |p| p.peak_rss_kib);
            Memory {
                name: before.name.clone(),
                idle_rss_mib: kib_to_mib(before.rss_kib),
                peak_rss_mib: kib_to_mib(peak_kib),
                growth_mib: kib_to_mib(peak_kib.saturating_sub(before.rss_kib)),
            }
        })
        .collect();
    Ok(BackendReport {
        backend,
        upload: Transfer::of(size, upload),
        round_trip: Transfer::of(size, round_trip),
        callback_digest_equal,
        result_status,
        result_read,
        result_digest_equal,
        memory,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_has_the_asked_length_and_does_not_repeat_a_short_pattern() {
        for len in [1, 7, 8, 9, 1000] {
            assert_eq!(payload(len).len(), len);
        }
        let p = payload(1 << 16);
        assert_ne!(p[..4096], p[4096..8192]);
        assert_eq!(payload(64), payload(64), "deterministic");
    }

    #[test]
    fn a_rate_is_mib_per_second_and_zero_for_no_time() {
        let t = Transfer::of(64 << 20, Duration::from_secs(2));
        assert!((t.mib_per_sec - 32.0).abs() < 1e-9, "{t:?}");
        assert!((Transfer::of(1, Duration::ZERO).mib_per_sec).abs() < f64::EPSILON);
    }
}
