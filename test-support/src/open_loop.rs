//! An open-loop load generator that measures from the intended send time.
//!
//! A closed loop sends its next request only once the previous one was
//! answered, so when the target stalls it also stops sending: the requests it
//! would have sent during the stall are never sent, and their queueing delay
//! never shows up in the latencies ("coordinated omission"). [`open_loop`]
//! instead fixes a schedule up front, request `i` being due at
//! `t0 + i / rate`, and measures every latency from that *intended* time, so
//! a request that had to wait (for a busy in-flight slot, for a connection,
//! for a lagging scheduler) reports the wait as part of its latency.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;

/// One operation of an [`open_loop`] run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timed<T> {
    /// Its position in the schedule, `0..n`.
    pub index: usize,
    /// When it was due: `t0 + index / rate`.
    pub intended: Instant,
    /// From [`Timed::intended`] until the operation's future completed,
    /// whenever it actually started.
    pub latency: Duration,
    /// What the operation returned.
    pub output: T,
}

impl<T> Timed<T> {
    /// When the operation completed.
    pub fn completed(&self) -> Instant {
        self.intended + self.latency
    }
}

/// When request `index` of a schedule at `rate` per second starting at `t0`
/// is due.
pub fn intended_time(t0: Instant, index: usize, rate: f64) -> Instant {
    #[expect(
        clippy::cast_precision_loss,
        reason = "indices far below 2^52 in practice"
    )]
    let offset = index as f64 / rate;
    t0 + Duration::try_from_secs_f64(offset).unwrap_or(Duration::MAX)
}

/// Runs `make(i)` for `i` in `0..n` on an open-loop schedule of `rate`
/// operations per second and returns each operation's outcome with its
/// latency measured from its **intended** send time, in schedule order.
///
/// Operation `i` is due at `t0 + i / rate`, `t0` being the call time. At that
/// time it is spawned as its own task, whatever the earlier operations are
/// doing; it then waits for one of `max_in_flight` slots (at least 1), calls
/// `make(i)` and awaits the future. Time spent waiting for a slot, or lost
/// because the scheduler woke up late, counts towards the latency.
///
/// A `rate` that is not positive and finite sends everything at once. The
/// tasks are aborted if the returned future is dropped. Fails if an
/// operation panicked.
pub async fn open_loop<F, Fut, T>(
    n: usize,
    rate: f64,
    max_in_flight: usize,
    make: F,
) -> Result<Vec<Timed<T>>, JoinError>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let rate = if rate.is_finite() && rate > 0.0 {
        rate
    } else {
        f64::INFINITY
    };
    let make = Arc::new(make);
    let slots = Arc::new(Semaphore::new(
        max_in_flight.clamp(1, Semaphore::MAX_PERMITS),
    ));
    let mut results = Vec::with_capacity(n);
    let mut tasks = JoinSet::new();
    let t0 = Instant::now();
    for index in 0..n {
        let intended = intended_time(t0, index, rate);
        if intended > Instant::now() {
            tokio::time::sleep_until(intended).await;
        }
        let (make, slots) = (Arc::clone(&make), Arc::clone(&slots));
        tasks.spawn(async move {
            // The semaphore is never closed; without a permit the operation
            // would simply not be limited.
            let _permit = slots.acquire_owned().await.ok();
            let output = make(index).await;
            Timed {
                index,
                intended,
                latency: intended.elapsed(),
                output,
            }
        });
        // Keep finished tasks from piling up in the set.
        while let Some(done) = tasks.try_join_next() {
            results.push(done?);
        }
    }
    while let Some(done) = tasks.join_next().await {
        results.push(done?);
    }
    results.sort_unstable_by_key(|timed| timed.index);
    Ok(results)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails loudly")]

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn follows_the_schedule_and_counts_slot_waits() {
        // 10 operations at 100/s, each taking 50 ms, one at a time: the k-th
        // starts at 50k ms instead of 10k ms and is measured from 10k ms.
        let timed = open_loop(10, 100.0, 1, |_| {
            tokio::time::sleep(Duration::from_millis(50))
        })
        .await
        .unwrap();
        assert_eq!(timed.len(), 10);
        let t0 = timed[0].intended;
        for (k, t) in timed.iter().enumerate() {
            assert_eq!(t.index, k);
            let k = u64::try_from(k).unwrap();
            assert_eq!(t.intended - t0, Duration::from_millis(10 * k));
            assert_eq!(t.latency, Duration::from_millis(50 * (k + 1) - 10 * k));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn enough_slots_do_not_delay_sends() {
        let timed = open_loop(10, 100.0, 64, |_| {
            tokio::time::sleep(Duration::from_millis(50))
        })
        .await
        .unwrap();
        assert!(
            timed.iter().all(|t| t.latency == Duration::from_millis(50)),
            "{timed:?}"
        );
    }
}
