//! The queue contract's conformance suite: every case in `cases` is written once and run against
//! both backends (`jetstream::*` against a private nats-server, `jetstream_debian::*` against
//! Debian's packaged one, `embedded::*` against a sled directory). A backend passes when it shows the behaviours listed in
//! `queue_worker::backend`: durable publish, attempt counts, ack, delayed nak, in-progress,
//! terminate, redelivery after the ack wait, dedup by call id, dead letters, the size limit and
//! pull batches.
//!
//! Backend-specific tests are at the end, each saying why it is specific.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{DEADLINE, call, nats_args, stream_args};
use futures::StreamExt;
use queue_core::backend::embedded::{EmbeddedOptions, EmbeddedQueue};
use queue_core::backend::jetstream::{ConsumerOptions, JetStreamOptions, JetStreamQueue};
use queue_core::backend::{
    CallQueue, CallRecords, DeadLetter, DeadLetterReason, PublishError, QueueDelivery,
};
use queue_core::message::QueuedCall;
use test_support::nats_server::NatsServer;
use tokio_util::sync::CancellationToken;

/// Ack wait of every backend under test.
const ACK_WAIT: Duration = Duration::from_secs(2);
/// Largest message of the embedded queue under test (JetStream's is the server's 1 MiB).
const EMBEDDED_MAX_MESSAGE: usize = 1 << 20;

/// A backend under test that can be restarted on the same data.
trait Harness: Sized {
    type Queue: CallQueue;
    async fn start() -> Self;
    fn queue(&self) -> &Arc<Self::Queue>;
    /// Stops the backend and starts it again on the same data.
    async fn restart(&mut self);
}

/// The keys of the sealed variants: every case holds with encryption at rest on.
fn sealing(sealed: bool) -> queue_core::sealing::Sealing {
    if sealed {
        queue_core::sealing::Sealing::with_keys(
            queue_core::sealing::Keyring::parse(
                "k1 AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
                "test keys",
            )
            .unwrap(),
        )
    } else {
        queue_core::sealing::Sealing::off()
    }
}

/// JetStream on the pinned nats-server, or with `DEBIAN` on Debian's packaged one (2.9).
struct JetStreamHarness<const SEALED: bool = false, const DEBIAN: bool = false> {
    nats: NatsServer,
    queue: Arc<JetStreamQueue>,
    stop: CancellationToken,
}

impl<const SEALED: bool, const DEBIAN: bool> JetStreamHarness<SEALED, DEBIAN> {
    async fn connect(nats: &NatsServer, stop: &CancellationToken) -> Arc<JetStreamQueue> {
        let options = JetStreamOptions {
            nats: nats_args(&nats.url()),
            manage_streams: Some(stream_args()),
            consumer: Some(ConsumerOptions {
                name: "conformance".into(),
                ack_wait: ACK_WAIT,
                max_ack_pending: 1000,
                lane_idle: Duration::from_secs(3600),
            }),
            records: common::record_args(),
            sealing: sealing(SEALED),
        };
        let queue = JetStreamQueue::connect(options, "conformance", stop.clone())
            .await
            .unwrap();
        wait_ready(queue.as_ref()).await;
        queue
    }
}

impl<const SEALED: bool, const DEBIAN: bool> Harness for JetStreamHarness<SEALED, DEBIAN> {
    type Queue = JetStreamQueue;

    async fn start() -> Self {
        let nats = if DEBIAN {
            NatsServer::start_debian().await.unwrap()
        } else {
            NatsServer::start().await.unwrap()
        };
        let stop = CancellationToken::new();
        let queue = Self::connect(&nats, &stop).await;
        Self { nats, queue, stop }
    }

    fn queue(&self) -> &Arc<JetStreamQueue> {
        &self.queue
    }

    async fn restart(&mut self) {
        self.nats.restart().await.unwrap();
        self.stop.cancel();
        self.stop = CancellationToken::new();
        self.queue = Self::connect(&self.nats, &self.stop).await;
    }
}

impl<const SEALED: bool, const DEBIAN: bool> Drop for JetStreamHarness<SEALED, DEBIAN> {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct EmbeddedHarness<const SEALED: bool = false> {
    dir: tempfile::TempDir,
    queue: Option<Arc<EmbeddedQueue>>,
}

fn embedded_options(dir: &std::path::Path, sealed: bool) -> EmbeddedOptions {
    EmbeddedOptions {
        dir: dir.to_path_buf(),
        subject_prefix: "faas-async".into(),
        ack_wait: ACK_WAIT,
        duplicate_window: Duration::from_secs(120),
        max_message_bytes: EMBEDDED_MAX_MESSAGE,
        max_bytes: 0,
        cache_bytes: 16 << 20,
        records_retention: Duration::from_secs(3600),
        max_result_bytes: 1 << 20,
        sealing: sealing(sealed),
    }
}

/// Opens the embedded queue, retrying while a dropped predecessor still holds sled's lock.
async fn open_embedded(dir: &std::path::Path, sealed: bool) -> Arc<EmbeddedQueue> {
    let end = Instant::now() + DEADLINE;
    loop {
        match EmbeddedQueue::open(embedded_options(dir, sealed)) {
            Ok(q) => return Arc::new(q),
            Err(e) if Instant::now() < end => {
                eprintln!("reopening the embedded queue: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot reopen the embedded queue: {e}"),
        }
    }
}

impl<const SEALED: bool> Harness for EmbeddedHarness<SEALED> {
    type Queue = EmbeddedQueue;

    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let queue = Some(open_embedded(dir.path(), SEALED).await);
        Self { dir, queue }
    }

    fn queue(&self) -> &Arc<EmbeddedQueue> {
        self.queue.as_ref().unwrap()
    }

    async fn restart(&mut self) {
        let queue = self.queue.take().unwrap();
        queue.flush_before_exit().await;
        assert_eq!(
            Arc::strong_count(&queue),
            1,
            "the test still holds the queue"
        );
        drop(queue);
        self.queue = Some(open_embedded(self.dir.path(), SEALED).await);
    }
}

async fn wait_ready<Q: CallQueue>(queue: &Q) {
    let end = Instant::now() + DEADLINE;
    loop {
        match queue.check_ready().await {
            Ok(()) => return,
            Err(e) if Instant::now() < end => {
                eprintln!("waiting for the queue: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("queue not ready: {e}"),
        }
    }
}

/// The next delivery within `within`, if any.
async fn next<Q: CallQueue>(queue: &Q, within: Duration) -> Option<Q::Delivery> {
    let mut batch = queue.pull(1, within).await.unwrap();
    batch.next().await.map(Result::unwrap)
}

fn call_id_of<D: QueueDelivery>(delivery: &D) -> String {
    queue_core::message::EnvelopeSummary::of(delivery.payload())
        .unwrap()
        .call_id
}

async fn publish<Q: CallQueue>(queue: &Q, call: &QueuedCall) {
    let published = queue.publish(call).await.unwrap();
    assert!(!published.duplicate, "a new call is not a duplicate");
}

/// Every case, generic over the backend.
mod cases {
    use super::*;

    /// A publish that returned is there after a restart, intact.
    pub async fn publish_is_durable<H: Harness>() {
        let mut h = H::start().await;
        let calls: Vec<_> = (0..3).map(|_| call("durable", None, b"kept")).collect();
        for c in &calls {
            publish(h.queue().as_ref(), c).await;
        }
        h.restart().await;
        let mut seen = Vec::new();
        for _ in 0..3 {
            let d = next(h.queue().as_ref(), DEADLINE).await.expect("delivered");
            let decoded = QueuedCall::open(d.payload(), h.queue().sealing()).unwrap();
            let sent = calls
                .iter()
                .find(|c| c.meta.call_id == decoded.meta.call_id)
                .expect("a call that was published");
            assert_eq!(
                decoded.encode().unwrap(),
                sent.encode().unwrap(),
                "stored intact"
            );
            let subject = if h.queue().finds_queued_calls() {
                queue_core::backend::call_subject_with_id("faas-async", sent)
            } else {
                queue_core::backend::call_subject("faas-async", sent)
            };
            assert_eq!(d.subject(), subject);
            d.ack().await.unwrap();
            seen.push(decoded.meta.call_id);
        }
        seen.sort();
        let mut expected: Vec<_> = calls.iter().map(|c| c.meta.call_id.clone()).collect();
        expected.sort();
        assert_eq!(seen, expected);
    }

    /// The first delivery is attempt 1; each redelivery counts up.
    pub async fn deliveries_count_attempts<H: Harness>() {
        let h = H::start().await;
        let q = h.queue().as_ref();
        publish(q, &call("attempts", None, b"")).await;
        for expected in 1..=3 {
            let d = next(q, DEADLINE).await.expect("delivered");
            assert_eq!(d.attempt(), expected);
            if expected < 3 {
                d.nak(None).await.unwrap();
            } else {
                d.ack().await.unwrap();
            }
        }
    }

    /// An acked message is not delivered again, not even after the ack wait.
    pub async fn ack_removes<H: Harness>() {
        let h = H::start().await;
        let q = h.queue().as_ref();
        publish(q, &call("ack", None, b"")).await;
        let d = next(q, DEADLINE).await.expect("delivered");
        d.ack().await.unwrap();
        assert!(
            next(q, ACK_WAIT * 2).await.is_none(),
            "an acked message came back"
        );
    }

    /// Worker statuses (issue 15): none at first; an announcement is read back, a newer one
    /// replaces it, a withdrawn one is gone, one announced long ago is not fresh. A scheduled
    /// call is counted for its function.
    pub async fn worker_statuses_and_scheduled_calls_are_read_back<H: Harness>() {
        use queue_core::backend::{FunctionConcurrency, WorkerStatus};
        let h = H::start().await;
        let q = h.queue().as_ref();
        assert!(q.worker_statuses().await.unwrap().is_empty());
        let status = |worker: &str, limit: u32, at: u64| WorkerStatus {
            worker: worker.into(),
            hostname: "host".into(),
            consumer: "workers".into(),
            max_inflight: 8,
            in_flight: 1,
            fair_scheduling: false,
            adaptive_concurrency: true,
            interval_seconds: 5.0,
            announced_at_unix_nanos: at,
            functions: vec![FunctionConcurrency {
                function: "f.team".into(),
                limit,
                cap: 8,
                in_flight: 1,
                waiting: 0,
            }],
            functions_omitted: 0,
        };
        let now = queue_core::unix_nanos_now();
        q.announce_worker_status(&status("w-1", 8, now))
            .await
            .unwrap();
        q.announce_worker_status(&status("w-2", 8, now))
            .await
            .unwrap();
        q.announce_worker_status(&status("w-1", 3, now))
            .await
            .unwrap();
        q.announce_worker_status(&status("stale", 8, now - 120_000_000_000))
            .await
            .unwrap();
        assert_eq!(
            q.worker_statuses().await.unwrap(),
            vec![status("w-1", 3, now), status("w-2", 8, now)],
            "the latest of each, the stale one left out"
        );
        q.withdraw_worker_status("w-2").await.unwrap();
        let left = q.worker_statuses().await.unwrap();
        assert_eq!(left, vec![status("w-1", 3, now)]);

        assert!(q.scheduled_stats().await.unwrap().is_empty());
        let mut later = call("later", None, b"");
        later.meta.namespace = Some("team".into());
        later.meta.not_before_unix_nanos = Some(now + 3_600_000_000_000);
        publish(q, &later).await;
        let scheduled = q.scheduled_stats().await.unwrap();
        assert_eq!(scheduled.len(), 1, "{scheduled:?}");
        assert_eq!(
            (scheduled[0].function.as_str(), scheduled[0].scheduled),
            ("later.team", 1)
        );
    }

    /// The stats say how old the oldest pending call is: 0 with none, its age while it waits
    /// (never more than the time since it was published), 0 again once it is acked.
    /// A scheduled call (a not-before time) is stored at once, offered to no worker before its
    /// time, kept across a restart of the backend (NATS, or the embedded queue reopened) with
    /// the scheduler stopped in between, and delivered as a first attempt within 1 s after its
    /// time (JetStream: moved onto the calls stream by the worker's scheduler).
    pub async fn a_scheduled_call_runs_at_its_time_after_a_restart<H: Harness>() {
        let mut h = H::start().await;
        let mut scheduled = call("later", None, b"later");
        let due = queue_core::unix_nanos_now() + 5_000_000_000;
        scheduled.meta.not_before_unix_nanos = Some(due);
        publish(h.queue().as_ref(), &scheduled).await;
        let stats = h.queue().stats().await.unwrap();
        assert_eq!((stats.scheduled, stats.pending), (1, 0), "{stats:?}");

        let stop = CancellationToken::new();
        let scheduler = tokio::spawn(queue_worker::scheduler::run(
            h.queue().clone(),
            stop.clone(),
        ));
        assert!(
            next(h.queue().as_ref(), Duration::from_secs(1))
                .await
                .is_none(),
            "a scheduled call was offered before its time"
        );
        stop.cancel();
        scheduler.await.unwrap();
        h.restart().await;
        let stats = h.queue().stats().await.unwrap();
        assert_eq!(stats.scheduled, 1, "the restart lost it: {stats:?}");

        let stop = CancellationToken::new();
        let scheduler = tokio::spawn(queue_worker::scheduler::run(
            h.queue().clone(),
            stop.clone(),
        ));
        let end = Instant::now() + DEADLINE;
        let delivery = loop {
            if let Some(d) = next(h.queue().as_ref(), Duration::from_millis(500)).await {
                break d;
            }
            assert!(Instant::now() < end, "the scheduled call never came");
        };
        let at = queue_core::unix_nanos_now();
        assert!(at >= due, "offered {} ms early", (due - at) / 1_000_000);
        assert!(
            at - due < 1_000_000_000,
            "offered {} ms after its time",
            (at - due) / 1_000_000
        );
        assert_eq!(call_id_of(&delivery), scheduled.meta.call_id);
        assert_eq!(delivery.attempt(), 1, "the wait is no attempt");
        delivery.ack().await.unwrap();
        let end = Instant::now() + DEADLINE;
        loop {
            let stats = h.queue().stats().await.unwrap();
            if stats.scheduled == 0 && stats.pending == 0 {
                break;
            }
            assert!(Instant::now() < end, "still held: {stats:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.cancel();
        scheduler.await.unwrap();
    }

    pub async fn stats_show_the_oldest_pending_call<H: Harness>() {
        let h = H::start().await;
        let q = h.queue().as_ref();
        let empty = q.stats().await.unwrap();
        assert_eq!((empty.pending, empty.oldest_age_seconds), (0, 0.0));
        let published = Instant::now();
        publish(q, &call("aged", None, b"")).await;
        let end = Instant::now() + DEADLINE;
        loop {
            let stats = q.stats().await.unwrap();
            assert_eq!(stats.pending, 1, "{stats:?}");
            // Clocks of a server and this process may differ by a little: a margin of 1 s.
            assert!(
                stats.oldest_age_seconds <= published.elapsed().as_secs_f64() + 1.0,
                "{stats:?}"
            );
            if stats.oldest_age_seconds >= 0.2 {
                break;
            }
            assert!(
                Instant::now() < end,
                "the oldest call never aged: {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        next(q, DEADLINE)
            .await
            .expect("delivered")
            .ack()
            .await
            .unwrap();
        let end = Instant::now() + DEADLINE;
        loop {
            let stats = q.stats().await.unwrap();
            if stats.pending == 0 {
                assert_eq!(stats.oldest_age_seconds, 0.0, "{stats:?}");
                break;
            }
            assert!(
                Instant::now() < end,
                "the acked call stayed pending: {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A nak with a delay holds the message back at least that long, then offers it again.
    pub async fn nak_with_delay_delays<H: Harness>() {
        let h = H::start().await;
        let q = h.queue().as_ref();
        let c = call("nak", None, b"");
        publish(q, &c).await;
        let d = next(q, DEADLINE).await.expect("delivered");
        let delay = Duration::from_secs(3);
        let nakked = Instant::now();
        d.nak(Some(delay)).await.unwrap();
        assert!(
            next(q, Duration::from_secs(1)).await.is_none(),
            "redelivered before the nak delay"
        );
        let again = next(q, DEADLINE)
            .await
            .expect("redelivered after the delay");
        assert!(
            nakked.elapsed() >= delay - Duration::from_millis(100),
            "redelivered after {:?}, delay {delay:?}",
            nakked.elapsed()
        );
        assert_eq!(call_id_of(&again), c.meta.call_id);
        assert_eq!(again.attempt(), 2);
        again.ack().await.unwrap();
    }

    /// In-progress signals keep a message from being redelivered past its ack wait.
    pub async fn in_progress_extends<H: Harness>() {
        let h = H::start().await;
        let q = h.queue().as_ref();
        publish(q, &c_with("progress")).await;
        let d = next(q, DEADLINE).await.expect("delivered");
        let heartbeat = {
            let d = d.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    d.in_progress().await.unwrap();
                }
            })
        };
        let redelivered = next(q, ACK_WAIT * 2).await;
        heartbeat.abort();
        assert!(
            redelivered.is_none(),
            "redelivered while in-progress signals were sent"
        );
        // Without signals, the ack wait runs out and it comes back.
        let again = next(q, DEADLINE)
            .await
            .expect("redelivered after signals stopped");
        assert_eq!(again.attempt(), 2);
        again.ack().await.unwrap();
    }

    fn c_with(function: &str) -> QueuedCall {
        call(function, None, b"")
    }

    /// A terminated message is never delivered again.
    pub async fn terminate_drops<H: Harness>() {
        let h = H::start().await;
        let q = h.queue().as_ref();
        publish(q, &c_with("term")).await;
        let d = next(q, DEADLINE).await.expect("delivered");
        d.terminate().await.unwrap();
        assert!(
            next(q, ACK_WAIT * 2).await.is_none(),
            "a terminated message came back"
        );
    }

    /// A delivery neither acked nor nakked comes back after the ack wait, as the next attempt.
    pub async fn redelivers_after_ack_wait<H: Harness>() {
        let h = H::start().await;
        let q = h.queue().as_ref();
        let c = c_with("forgotten");
        publish(q, &c).await;
        let first = next(q, DEADLINE).await.expect("delivered");
        let delivered = Instant::now();
        let again = next(q, DEADLINE).await.expect("redelivered");
        assert!(
            delivered.elapsed() >= ACK_WAIT - Duration::from_millis(100),
            "redelivered after {:?}, ack wait {ACK_WAIT:?}",
            delivered.elapsed()
        );
        assert_eq!(call_id_of(&again), c.meta.call_id);
        assert_eq!(again.sequence(), first.sequence());
        assert_eq!(again.attempt(), 2);
        again.ack().await.unwrap();
    }

    /// The same call id published twice within the window is stored once.
    pub async fn dedups_by_call_id<H: Harness>() {
        let h = H::start().await;
        let q = h.queue().as_ref();
        let c = c_with("dedup");
        publish(q, &c).await;
        let again = q.publish(&c).await.unwrap();
        assert!(again.duplicate, "the second publish is a duplicate");
        let d = next(q, DEADLINE).await.expect("delivered");
        d.ack().await.unwrap();
        assert!(
            next(q, Duration::from_secs(1)).await.is_none(),
            "the duplicate was stored"
        );
        // Still a duplicate after the first copy was processed (the window, not the queue).
        assert!(q.publish(&c).await.unwrap().duplicate);
    }

    /// Dead letters keep the message and what is known; they can be listed, replayed (same call
    /// id, same payload) and purged; dead-lettering the same delivery twice keeps one.
    pub async fn dead_letters_round_trip<H: Harness>() {
        let h = H::start().await;
        let q = h.queue().as_ref();
        let (a, b) = (call("dead", None, b"first"), call("dead", None, b"second"));
        publish(q, &a).await;
        publish(q, &b).await;
        for _ in 0..2 {
            let d = next(q, DEADLINE).await.expect("delivered");
            let id = call_id_of(&d);
            let letter = DeadLetter {
                reason: DeadLetterReason::RetriesExhausted,
                detail: "3 attempts, last status 500",
                original_subject: d.subject(),
                stream_sequence: d.sequence(),
                call_id: Some(&id),
                received_at_unix_nanos: None,
                last_status: Some(500),
                attempts: 3,
            };
            q.dead_letter(d.payload().clone(), &letter).await.unwrap();
            q.dead_letter(d.payload().clone(), &letter).await.unwrap();
            d.ack().await.unwrap();
        }
        let letters = q.dead_letters().await.unwrap();
        assert_eq!(letters.len(), 2, "one dead letter per message: {letters:?}");
        for l in &letters {
            assert_eq!(l.reason, "retries_exhausted");
            assert_eq!(l.last_status, Some(500));
            assert_eq!(l.attempts, 3);
            assert_eq!(l.function.as_deref(), Some("dead"));
            let published = if l.call_id.as_deref() == Some(a.meta.call_id.as_str()) {
                &a
            } else {
                &b
            };
            let subject = if q.finds_queued_calls() {
                queue_core::backend::call_subject_with_id("faas-async", published)
            } else {
                queue_core::backend::call_subject("faas-async", published)
            };
            assert_eq!(l.subject, subject);
        }
        let replayed = q
            .replay_dead_letters(
                &[queue_core::backend::DeadLetterSelector::CallId(
                    a.meta.call_id.clone(),
                )],
                false,
            )
            .await
            .unwrap();
        assert_eq!(replayed.len(), 1);
        let d = next(q, DEADLINE).await.expect("replayed call delivered");
        assert_eq!(
            QueuedCall::open(d.payload(), q.sealing())
                .unwrap()
                .encode()
                .unwrap(),
            a.encode().unwrap(),
            "replayed intact"
        );
        d.ack().await.unwrap();
        let left = q.dead_letters().await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].call_id.as_deref(), Some(b.meta.call_id.as_str()));
        let purged = q.purge_dead_letters(&[], true).await.unwrap();
        assert_eq!(purged.len(), 1, "the purged entries are returned");
        assert_eq!(purged[0].call_id.as_deref(), Some(b.meta.call_id.as_str()));
        assert!(q.dead_letters().await.unwrap().is_empty());
    }

    /// A message above the limit is refused as too large, and nothing is stored.
    pub async fn refuses_oversized<H: Harness>() {
        let h = H::start().await;
        let q = h.queue().as_ref();
        let mut c = c_with("big");
        c.body = bytes::Bytes::from(vec![b'x'; q.max_message_bytes() + 1]);
        match q.publish(&c).await {
            Err(PublishError::TooLarge { size, max }) => {
                assert!(size > max, "{size} > {max}");
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert!(next(q, Duration::from_secs(1)).await.is_none());
    }

    /// A pull yields at most `max` deliveries, each as soon as it is there.
    pub async fn pull_is_bounded<H: Harness>() {
        let h = H::start().await;
        let q = h.queue().as_ref();
        for _ in 0..5 {
            publish(q, &c_with("batch")).await;
        }
        let mut batch = q.pull(2, DEADLINE).await.unwrap();
        let started = Instant::now();
        let mut got = Vec::new();
        while let Some(d) = batch.next().await {
            got.push(d.unwrap());
        }
        assert_eq!(got.len(), 2);
        assert!(
            started.elapsed() < DEADLINE / 2,
            "a full batch ends without waiting for its expiry"
        );
        for d in got {
            d.ack().await.unwrap();
        }
        let mut rest = q.pull(10, Duration::from_secs(2)).await.unwrap();
        let mut n = 0;
        while let Some(d) = rest.next().await {
            d.unwrap().ack().await.unwrap();
            n += 1;
        }
        assert_eq!(n, 3);
    }

    /// Records are written by compare-and-set: create only where none is, update only at the
    /// revision read; a stale writer gets a conflict (never a silent overwrite), and the kept
    /// result is there once the record that points to it is.
    pub async fn records_compare_and_set<H: Harness>() {
        use queue_core::backend::{CallRecords, RecordWriteError, apply_event};
        use queue_core::records::{self, CallState, Event};
        let h = H::start().await;
        let q = h.queue();
        let now = queue_core::unix_nanos_now();
        let accepted = Event::Accepted {
            function: "f".into(),
            at: now,
            has_callback: false,
            not_before: None,
        };
        let record = records::apply("cas", None, &accepted, now);
        let first = q.write_record("cas", None, &record, None).await.unwrap();
        assert!(matches!(
            q.write_record("cas", None, &record, None).await,
            Err(RecordWriteError::Conflict)
        ));
        let entry = q.record_entry("cas").await.unwrap().unwrap();
        let (read, revision) = (entry.record, entry.revision);
        assert_eq!((read.clone(), revision), (record.clone(), first));
        assert_eq!(entry.inline_result, None);
        let second = q
            .write_record(
                "cas",
                Some(first),
                &read,
                Some(bytes::Bytes::from_static(b"kept")),
            )
            .await
            .unwrap();
        assert_ne!(second, first);
        assert!(matches!(
            q.write_record("cas", Some(first), &read, None).await,
            Err(RecordWriteError::Conflict)
        ));
        // A writer holding a stale revision re-reads and re-applies: a cancel is kept.
        let cancelled = apply_event(q.as_ref(), "cas", None, &[Event::Cancel], None)
            .await
            .unwrap();
        assert_eq!(cancelled.record.state, CallState::Cancelled);
        let stale = queue_core::backend::OwnedRecord {
            record: read,
            revision: Some(second),
            inline_result: None,
        };
        let started = Event::AttemptStarted {
            function: "f".into(),
            attempt: 1,
            at: now,
            accepted_at: now,
            limits: None,
        };
        let after = apply_event(q.as_ref(), "cas", Some(stale), &[started], None)
            .await
            .unwrap();
        assert_eq!(after.record.state, CallState::Cancelled);
        q.delete_record("cas").await.unwrap();
        assert!(q.record("cas").await.unwrap().is_none());
    }

    /// A kept result, small (kept inside the record where the backend does that) or large
    /// (beside it), is still there after later writes of the record that do not pass it: the
    /// callback entry, a cancel attempt after the end, a writer that read the record first.
    pub async fn a_kept_result_survives_later_record_writes<H: Harness>() {
        use queue_core::backend::{CallRecords, OwnedRecord, apply_event};
        use queue_core::records::{
            CallState, CallbackEntry, Event, ResultAvailability, StoredResult,
        };
        let h = H::start().await;
        let q = h.queue();
        let large = q.max_result_bytes().min(64 * 1024) - 1024;
        for (id, body_len) in [("small-result", 16), ("large-result", large)] {
            let now = queue_core::unix_nanos_now();
            let accepted = Event::Accepted {
                function: "f".into(),
                at: now,
                has_callback: true,
                not_before: None,
            };
            let created = apply_event(q.as_ref(), id, None, &[accepted], None)
                .await
                .unwrap();
            let started = Event::AttemptStarted {
                function: "f".into(),
                attempt: 1,
                at: now,
                accepted_at: now,
                limits: None,
            };
            let running = apply_event(q.as_ref(), id, Some(created), &[started], None)
                .await
                .unwrap();
            let result = StoredResult {
                status: 200,
                headers: vec![("content-type".into(), "application/octet-stream".into())],
                body: (0..=250u8).cycle().take(body_len).collect(),
                stored: None,
            };
            let ended = Event::AttemptEnded {
                attempt: 1,
                status: 200,
                duration_ms: 1,
                error: None,
                next: CallState::Succeeded,
                result: Some(ResultAvailability::Stored),
            };
            let encoded = bytes::Bytes::from(result.encode().unwrap());
            let finished = apply_event(q.as_ref(), id, Some(running), &[ended], Some(encoded))
                .await
                .unwrap();
            assert_eq!(q.result(id).await.unwrap().as_ref(), Some(&result), "{id}");
            // The worker's next write starts from what it wrote (no read, no result passed).
            let callback = Event::Callback(CallbackEntry {
                at: now,
                status: Some(200),
                attempts: 1,
                delivered: true,
                error: None,
            });
            let after = apply_event(q.as_ref(), id, Some(finished), &[callback], None)
                .await
                .unwrap();
            assert_eq!(after.record.callbacks.len(), 1);
            assert_eq!(q.result(id).await.unwrap().as_ref(), Some(&result), "{id}");
            // A writer that reads first (a cancel, ignored once final) keeps it too.
            let reread = apply_event(q.as_ref(), id, None, &[Event::Cancel], None)
                .await
                .unwrap();
            assert_eq!(reread.record.state, CallState::Succeeded);
            assert_eq!(q.result(id).await.unwrap().as_ref(), Some(&result), "{id}");
            // And a stale writer that conflicts, re-reads and re-applies.
            let stale = OwnedRecord {
                record: after.record.clone(),
                revision: after.revision,
                inline_result: None,
            };
            let second = Event::Callback(CallbackEntry {
                at: now,
                status: Some(200),
                attempts: 1,
                delivered: true,
                error: None,
            });
            let last = apply_event(q.as_ref(), id, Some(stale), &[second], None)
                .await
                .unwrap();
            assert_eq!(last.record.callbacks.len(), 2);
            assert_eq!(q.result(id).await.unwrap().as_ref(), Some(&result), "{id}");
            let entry = q.record_entry(id).await.unwrap().unwrap();
            assert_eq!(entry.record, last.record);
        }
    }

    /// A call queued with no record (the gateway writes none for a generated id where the
    /// queue finds queued calls by id): its record is `queued` at `NOT_STORED` until someone
    /// writes it; the first writer creates it, a later one conflicts and re-reads (a cancel is
    /// kept); once acked without a record it is gone. Writing at `NOT_STORED` creates on
    /// every backend. The per-function counts add up calls queued under their own subjects.
    pub async fn a_queued_call_without_a_record<H: Harness>() {
        use queue_core::backend::{NOT_STORED, OwnedRecord, RecordWriteError, apply_event};
        use queue_core::records::{CallState, Event};
        let h = H::start().await;
        let q = h.queue();
        let mut first = call("unrecorded", Some("http://127.0.0.1:9/cb"), b"in");
        first.meta.record_revision = Some(NOT_STORED);
        let second = call("unrecorded", None, b"in");
        let mut dotted = call("unrecorded", None, b"in");
        dotted.meta.call_id = "order.42".into();
        for c in [&first, &second, &dotted] {
            publish(q.as_ref(), c).await;
        }
        let id = first.meta.call_id.as_str();
        if q.finds_queued_calls() {
            let entry = q
                .record_entry(id)
                .await
                .unwrap()
                .expect("found in the queue");
            assert_eq!(entry.revision, NOT_STORED);
            assert_eq!(entry.record.state, CallState::Queued);
            assert_eq!(entry.record.function, "unrecorded");
            assert_eq!(entry.record.accepted_at, first.meta.received_at_unix_nanos);
            assert_eq!(q.record(id).await.unwrap(), Some(entry.record.clone()));
            // An id that cannot be a subject token is not looked for in the queue.
            assert_eq!(q.record("order.42").await.unwrap(), None);
            let stats = q.function_stats().await.unwrap();
            let unrecorded = stats
                .iter()
                .find(|f| f.function == "unrecorded")
                .expect("counted");
            assert_eq!(unrecorded.pending, 3, "{stats:?}");
            assert!(unrecorded.oldest_age_seconds >= 0.0, "{stats:?}");
            // A cancel is the first writer: it creates the record.
            let cancelled = apply_event(q.as_ref(), id, None, &[Event::Cancel], None)
                .await
                .unwrap();
            assert_eq!(cancelled.record.state, CallState::Cancelled);
            assert_ne!(cancelled.revision, Some(NOT_STORED));
            // The worker starts from the envelope (no read); it conflicts and sees the cancel.
            let known = OwnedRecord::accepted(
                id,
                "unrecorded",
                first.meta.received_at_unix_nanos,
                true,
                None,
                NOT_STORED,
            );
            let started = Event::AttemptStarted {
                function: "unrecorded".into(),
                attempt: 1,
                at: queue_core::unix_nanos_now(),
                accepted_at: first.meta.received_at_unix_nanos,
                limits: None,
            };
            let after = apply_event(q.as_ref(), id, Some(known), &[started], None)
                .await
                .unwrap();
            assert_eq!(after.record.state, CallState::Cancelled);
            // Acked with no record written: nothing to find.
            let mut acked = 0;
            while acked < 3 {
                let d = next(q.as_ref(), DEADLINE).await.expect("delivered");
                d.ack().await.unwrap();
                acked += 1;
            }
            let end = Instant::now() + DEADLINE;
            while q.record(&second.meta.call_id).await.unwrap().is_some() {
                assert!(Instant::now() < end, "an acked call is still found");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(
                q.record(id).await.unwrap().map(|r| r.state),
                Some(CallState::Cancelled),
                "a written record outlives the message"
            );
        } else {
            assert_eq!(q.record(id).await.unwrap(), None);
        }
        // Writing at NOT_STORED creates, once.
        let now = queue_core::unix_nanos_now();
        let record =
            OwnedRecord::accepted("created-at-zero", "f", now, false, None, NOT_STORED).record;
        let revision = q
            .write_record("created-at-zero", Some(NOT_STORED), &record, None)
            .await
            .unwrap();
        assert_ne!(revision, NOT_STORED);
        assert!(matches!(
            q.write_record("created-at-zero", Some(NOT_STORED), &record, None)
                .await,
            Err(RecordWriteError::Conflict)
        ));
        assert_eq!(
            q.record_entry("created-at-zero")
                .await
                .unwrap()
                .map(|e| e.revision),
            Some(revision)
        );
    }

    /// The paused list is delivered at once and after every change.
    pub async fn paused_functions_are_watched<H: Harness>() {
        use queue_core::backend::CallRecords;
        let h = H::start().await;
        let q = h.queue();
        let mut updates = q.paused_updates().await.unwrap();
        let first = tokio::time::timeout(DEADLINE, updates.next())
            .await
            .unwrap();
        assert_eq!(
            first,
            Some(Vec::new()),
            "the current list comes first, even if empty"
        );
        q.set_paused("billing", true).await.unwrap();
        let next = tokio::time::timeout(DEADLINE, updates.next())
            .await
            .unwrap();
        assert_eq!(next, Some(vec!["billing".to_owned()]));
        q.set_paused("billing", false).await.unwrap();
        let next = tokio::time::timeout(DEADLINE, updates.next())
            .await
            .unwrap();
        assert_eq!(next, Some(Vec::new()));
        // A new watcher starts from the current state.
        q.set_paused("reports", true).await.unwrap();
        let mut again = q.paused_updates().await.unwrap();
        let first = tokio::time::timeout(DEADLINE, again.next()).await.unwrap();
        assert_eq!(first, Some(vec!["reports".to_owned()]));
    }
}

macro_rules! conformance {
    ($backend:ident, $harness:ty) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn publish_is_durable() {
                cases::publish_is_durable::<$harness>().await;
            }
            #[tokio::test]
            async fn deliveries_count_attempts() {
                cases::deliveries_count_attempts::<$harness>().await;
            }
            #[tokio::test]
            async fn ack_removes() {
                cases::ack_removes::<$harness>().await;
            }
            #[tokio::test]
            async fn worker_statuses_and_scheduled_calls_are_read_back() {
                cases::worker_statuses_and_scheduled_calls_are_read_back::<$harness>().await;
            }
            #[tokio::test]
            async fn a_kept_result_survives_later_record_writes() {
                cases::a_kept_result_survives_later_record_writes::<$harness>().await;
            }
            #[tokio::test]
            async fn nak_with_delay_delays() {
                cases::nak_with_delay_delays::<$harness>().await;
            }
            #[tokio::test]
            async fn in_progress_extends() {
                cases::in_progress_extends::<$harness>().await;
            }
            #[tokio::test]
            async fn terminate_drops() {
                cases::terminate_drops::<$harness>().await;
            }
            #[tokio::test]
            async fn redelivers_after_ack_wait() {
                cases::redelivers_after_ack_wait::<$harness>().await;
            }
            #[tokio::test]
            async fn dedups_by_call_id() {
                cases::dedups_by_call_id::<$harness>().await;
            }
            #[tokio::test]
            async fn dead_letters_round_trip() {
                cases::dead_letters_round_trip::<$harness>().await;
            }
            #[tokio::test]
            async fn refuses_oversized() {
                cases::refuses_oversized::<$harness>().await;
            }
            #[tokio::test]
            async fn pull_is_bounded() {
                cases::pull_is_bounded::<$harness>().await;
            }
            #[tokio::test]
            async fn records_compare_and_set() {
                cases::records_compare_and_set::<$harness>().await;
            }
            #[tokio::test]
            async fn a_queued_call_without_a_record() {
                cases::a_queued_call_without_a_record::<$harness>().await;
            }
            #[tokio::test]
            async fn paused_functions_are_watched() {
                cases::paused_functions_are_watched::<$harness>().await;
            }
            #[tokio::test]
            async fn a_scheduled_call_runs_at_its_time_after_a_restart() {
                cases::a_scheduled_call_runs_at_its_time_after_a_restart::<$harness>().await;
            }
            #[tokio::test]
            async fn stats_show_the_oldest_pending_call() {
                cases::stats_show_the_oldest_pending_call::<$harness>().await;
            }
        }
    };
}

conformance!(jetstream, JetStreamHarness);
conformance!(embedded, EmbeddedHarness);
conformance!(jetstream_sealed, JetStreamHarness<true>);
conformance!(embedded_sealed, EmbeddedHarness<true>);
// Debian's stable nats-server (2.9.10), the one many hosts already run (README, "NATS servers").
conformance!(jetstream_debian, JetStreamHarness<false, true>);

/// Tests of the embedded backend alone.
mod embedded_specific {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    use super::*;

    /// Set in the child process of [`sigkill_loses_nothing`]: the queue directory.
    const CHILD_DIR: &str = "CONFORMANCE_CRASH_CHILD_DIR";

    /// Specific because JetStream's durability is nats-server's, tested by its authors (and by
    /// `publish_is_durable` across a server restart); the embedded queue's crash safety is ours.
    ///
    /// The test runs itself as a child process that publishes calls, printing each id once
    /// `publish` returned, and leaves some delivered but unacked. The parent kills it with
    /// SIGKILL mid-stream, reopens the directory and checks that every published call and
    /// every unacked one is there.
    #[test]
    fn sigkill_loses_nothing() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        if let Ok(dir) = std::env::var(CHILD_DIR) {
            return runtime.block_on(child_publish_forever(dir.into()));
        }
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "embedded_specific::sigkill_loses_nothing",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut published = Vec::new();
        let mut unacked = Vec::new();
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            if let Some(id) = line.strip_prefix("published ") {
                published.push(id.to_owned());
            } else if let Some(id) = line.strip_prefix("holding ") {
                unacked.push(id.to_owned());
            }
            if published.len() >= 300 && unacked.len() >= 5 {
                break;
            }
        }
        // SIGKILL: no destructor, no flush.
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            published.len() >= 300 && unacked.len() >= 5,
            "the child stopped early"
        );

        runtime.block_on(async {
            let queue = open_embedded(dir.path(), false).await;
            let mut seen = std::collections::HashMap::new();
            while let Some(d) = next(queue.as_ref(), Duration::from_secs(2)).await {
                seen.insert(call_id_of(&d), d.attempt());
                d.ack().await.unwrap();
            }
            let lost: Vec<_> = published
                .iter()
                .filter(|id| !seen.contains_key(*id))
                .collect();
            assert!(
                lost.is_empty(),
                "{} published calls lost: {lost:?}",
                lost.len()
            );
            for id in &unacked {
                assert!(seen.contains_key(id), "unacked call {id} lost");
            }
            eprintln!(
                "{} published before the kill, {} were delivered and unacked; {} recovered",
                published.len(),
                unacked.len(),
                seen.len()
            );
        });
    }

    #[allow(
        clippy::print_stdout,
        reason = "the child reports to its parent on stdout"
    )]
    async fn child_publish_forever(dir: std::path::PathBuf) {
        let queue = EmbeddedQueue::open(embedded_options(&dir, false)).unwrap();
        let mut held = Vec::new();
        for i in 0.. {
            let c = call("crash", None, b"payload");
            queue.publish(&c).await.unwrap();
            println!("published {}", c.meta.call_id);
            if i % 20 == 0 {
                // Delivered, never acked: must come back after the crash.
                if let Some(d) = next(&queue, Duration::from_secs(1)).await {
                    println!("holding {}", call_id_of(&d));
                    held.push(d);
                }
            }
        }
    }
}
