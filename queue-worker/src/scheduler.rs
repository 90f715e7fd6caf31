//! The scheduler of calls a queue holds apart until their time (`X-Delay`, `X-Not-Before`;
//! JetStream's delayed stream, [`CallQueue::holds_scheduled_apart`]). Every worker runs one;
//! they share the queue's scheduler consumer, so each scheduled call is handled by one of them
//! at a time.
//!
//! A scheduled delivery that is early is naked with the time left, less [`HOLD`]: it comes back
//! a little before its time (the queue's redelivery clock is not a precise timer, and a
//! restart of NATS may bring it back early, which is harmless), and is then held here until its
//! time, with a progress signal so its ack wait does not run out. A due one is released: put
//! on the queue with its call id as the publish's dedup id (a release repeated after a crash is
//! stored once; the worker's dedup state guards too), its record marked `queued`, then acked.
//! The nak redeliveries never count as attempts of the call: the call's attempts are the
//! deliveries of its message on the queue, which starts at its release.
//!
//! A cancelled scheduled call is released like any other: the worker that takes it finds
//! the record cancelled and never invokes it (its cancel callback, if any, goes then). On
//! shutdown a held delivery is naked at once with its time left, so the next scheduler gets
//! it on time.
//!
//! A leaf: it knows the queue contract and the records, nothing of the worker.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use queue_core::backend::{
    CallQueue, DeadLetter, DeadLetterReason, OwnedRecord, QueueDelivery, apply_event,
};
use queue_core::message::EnvelopeSummary;
use queue_core::records::Event;
use tokio_util::sync::CancellationToken;

/// How long before its time a scheduled call is brought back and held here.
pub const HOLD: Duration = Duration::from_millis(1000);
/// Largest pull of scheduled calls.
const BATCH: usize = 256;
/// Scheduled deliveries handled at once (each is a nak, or a wait and a release).
const CONCURRENCY: usize = 256;
/// How long one pull waits for scheduled calls.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// Wait before a release that failed (the queue unreachable) is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// What to do with a scheduled delivery whose time is `due` (Unix nanoseconds), at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Offer it again after this long (it comes back [`HOLD`] before its time, or less).
    Later(Duration),
    /// Hold it this long, then release it.
    Hold(Duration),
    /// Release it now.
    Release,
}

/// The decision for one scheduled delivery. Pure.
pub fn step(due: u64, now: u64) -> Step {
    let left = Duration::from_nanos(due.saturating_sub(now));
    if left.is_zero() {
        Step::Release
    } else if left > HOLD {
        Step::Later(left - HOLD / 2)
    } else {
        Step::Hold(left)
    }
}

/// Moves scheduled calls onto `queue` at their time until `stop` fires. Returns at once for a
/// queue that schedules its calls itself.
pub async fn run<Q: CallQueue>(queue: Arc<Q>, stop: CancellationToken) {
    if !queue.holds_scheduled_apart() {
        return;
    }
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        let batch = tokio::select! {
            b = queue.pull_scheduled(BATCH, PULL_EXPIRES) => b,
            () = stop.cancelled() => return,
        };
        let batch = match batch {
            Ok(batch) => {
                failures = 0;
                batch
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = Duration::from_millis(250)
                    .saturating_mul(1 << failures.min(6))
                    .min(Duration::from_secs(15));
                // An older gateway may not have made the scheduled calls' stream yet.
                if failures == 1 || failures.is_multiple_of(20) {
                    tracing::warn!(error = %e, retry_in = ?wait, "cannot pull scheduled calls");
                }
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = stop.cancelled() => return,
                }
                continue;
            }
        };
        batch
            .take_until(stop.cancelled())
            .for_each_concurrent(CONCURRENCY, |delivery| {
                let (queue, stop) = (&queue, &stop);
                async move {
                    match delivery {
                        Ok(delivery) => handle(queue.as_ref(), delivery, stop).await,
                        Err(e) => tracing::warn!(error = %e, "scheduled calls' pull failed"),
                    }
                }
            })
            .await;
    }
}

async fn handle<Q: CallQueue>(queue: &Q, delivery: Q::Delivery, stop: &CancellationToken) {
    let summary = match EnvelopeSummary::of(delivery.payload()) {
        Ok(summary) => summary,
        Err(e) => return unreadable(queue, &delivery, &e.to_string()).await,
    };
    let due = summary.not_before_unix_nanos.unwrap_or(0);
    match step(due, queue_core::unix_nanos_now()) {
        Step::Release => {}
        Step::Later(after) => {
            if let Err(e) = delivery.nak(Some(after)).await {
                tracing::debug!(call_id = %summary.call_id, error = %e, "scheduled call not naked; it comes back after the ack wait");
            }
            return;
        }
        Step::Hold(left) => {
            // Its ack clock restarts now: the hold is shorter than any ack wait (≥ 1 s).
            let _ = delivery.in_progress().await;
            tokio::select! {
                () = tokio::time::sleep(left) => {}
                () = stop.cancelled() => {
                    let left = Duration::from_nanos(due.saturating_sub(queue_core::unix_nanos_now()));
                    let _ = delivery.nak(Some(left)).await;
                    return;
                }
            }
        }
    }
    release(queue, &delivery, &summary.call_id).await;
}

async fn release<Q: CallQueue>(queue: &Q, delivery: &Q::Delivery, call_id: &str) {
    if let Err(e) = queue.release_scheduled(delivery, call_id).await {
        tracing::warn!(call_id, error = %e, "scheduled call not released; trying again");
        let _ = delivery.nak(Some(RETRY)).await;
        return;
    }
    // The record says queued (a cancel, or a worker that was faster, stays as it is). A record
    // that is gone (expired) is not made up again.
    let released = [Event::Released {
        at: queue_core::unix_nanos_now(),
    }];
    match queue.record_entry(call_id).await {
        Ok(Some(entry)) => {
            let known = OwnedRecord {
                record: entry.record,
                revision: Some(entry.revision),
                inline_result: entry.inline_result,
            };
            if let Err(e) = apply_event(queue, call_id, Some(known), &released, None).await {
                tracing::warn!(call_id, error = %e, "could not record the scheduled call as queued");
            }
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(call_id, error = %e, "could not read the scheduled call's record"),
    }
    if let Err(e) = delivery.ack().await {
        // Redelivered and released again: stored once (dedup by call id).
        tracing::debug!(call_id, error = %e, "scheduled delivery not acked");
    }
    tracing::debug!(call_id, "scheduled call released");
}

/// A scheduled message that is not a call: kept as a dead letter, never retried.
async fn unreadable<Q: CallQueue>(queue: &Q, delivery: &Q::Delivery, detail: &str) {
    let subject = delivery.subject().to_owned();
    tracing::error!(subject = %subject, detail, "scheduled message cannot be read; dead-lettering it");
    let letter = DeadLetter {
        reason: DeadLetterReason::Undecodable,
        detail,
        original_subject: &subject,
        stream_sequence: delivery.sequence(),
        call_id: None,
        received_at_unix_nanos: None,
        last_status: None,
        attempts: 0,
    };
    match queue.dead_letter(delivery.payload().clone(), &letter).await {
        Ok(()) => {
            let _ = delivery.ack().await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not dead-letter a scheduled message");
            let _ = delivery.nak(Some(RETRY)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_calls_come_back_before_their_time_and_are_held_to_it() {
        let s = 1_000_000_000;
        assert_eq!(step(100 * s, 100 * s), Step::Release);
        assert_eq!(step(99 * s, 100 * s), Step::Release, "late: at once");
        assert_eq!(
            step(100 * s + s / 4, 100 * s),
            Step::Hold(Duration::from_millis(250))
        );
        assert_eq!(step(101 * s, 100 * s), Step::Hold(HOLD));
        assert_eq!(
            step(110 * s, 100 * s),
            Step::Later(Duration::from_secs(10) - HOLD / 2),
            "back half a hold early"
        );
        // A week ahead is one nak.
        assert_eq!(
            step(100 * s + 7 * 86_400 * s, 100 * s),
            Step::Later(Duration::from_secs(7 * 86_400) - HOLD / 2)
        );
    }
}
