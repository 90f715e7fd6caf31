//! A lease on one delivery: the worker holds the delivery from the moment it is pulled until
//! exactly one terminal action ends it, and keeps it alive in between.
//!
//! [`Lease`] owns the delivery. Its terminal actions ([`Lease::ack`], [`Lease::nak`],
//! [`Lease::dead_letter`], [`Lease::hand_back`]) consume it, so a delivery cannot be acked
//! twice or acked and nakked, and the compiler checks every path ends it. While a lease lives,
//! [`Heartbeats`] tells the queue the delivery is in progress; one timer serves every lease of
//! the worker (not a task per call), and a lease leaves it when it ends or is dropped. A lease
//! dropped without a terminal action (a panic) sends nothing: the queue redelivers it after
//! its ack wait, which is what at-least-once needs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use queue_core::backend::{CallQueue, DeadLetter, QueueDelivery};
use tokio_util::sync::CancellationToken;

/// How many in-progress signals are in flight at once on each tick.
const BEAT_CONCURRENCY: usize = 64;

/// What is being worked on, and the one timer that signals progress on all of it.
#[derive(Debug)]
pub struct Heartbeats<T> {
    leased: Mutex<HashMap<u64, T>>,
    next_key: AtomicU64,
}

/// A place in [`Heartbeats`]; leaving it (drop) stops the signals.
#[derive(Debug)]
pub struct Registration<T> {
    key: u64,
    beats: Arc<Heartbeats<T>>,
}

impl<T> Drop for Registration<T> {
    fn drop(&mut self) {
        self.beats.leased().remove(&self.key);
    }
}

impl<T: Clone + Send + 'static> Heartbeats<T> {
    /// An empty set; [`Heartbeats::run`] is its timer.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            leased: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(0),
        })
    }

    /// Signals progress on `item` from the next tick on, until the registration is dropped.
    pub fn register(self: &Arc<Self>, item: T) -> Registration<T> {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        self.leased().insert(key, item);
        Registration {
            key,
            beats: Arc::clone(self),
        }
    }

    /// Registered now.
    pub fn len(&self) -> usize {
        self.leased().len()
    }

    /// True when nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.leased().is_empty()
    }

    /// Every `every`, runs `beat` on everything registered (a few at a time), until `stop`
    /// fires.
    pub async fn run<F, Fut>(self: Arc<Self>, every: Duration, stop: CancellationToken, beat: F)
    where
        F: Fn(T) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick completes at once; what was registered just now needs no signal yet.
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let due: Vec<T> = self.leased().values().cloned().collect();
            futures::stream::iter(due)
                .for_each_concurrent(BEAT_CONCURRENCY, &beat)
                .await;
        }
    }
}

impl<T> Heartbeats<T> {
    fn leased(&self) -> std::sync::MutexGuard<'_, HashMap<u64, T>> {
        // Short critical sections, never held across an await.
        self.leased.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The heartbeat of a worker's leases: an in-progress signal per delivery.
pub async fn beat<D: QueueDelivery>(delivery: Arc<D>) {
    if let Err(e) = delivery.in_progress().await {
        tracing::warn!(error = %e, "in-progress signal failed");
    }
}

/// One delivery held by this worker; see the module documentation.
#[derive(Debug)]
#[must_use = "a lease must end with ack, nak, dead_letter or hand_back"]
pub struct Lease<D: QueueDelivery> {
    delivery: Arc<D>,
    _beating: Registration<Arc<D>>,
}

impl<D: QueueDelivery> Lease<D> {
    /// Leases `delivery`, kept alive by `beats` until the lease ends.
    pub fn new(delivery: D, beats: &Arc<Heartbeats<Arc<D>>>) -> Self {
        // Shared, not cloned: the heartbeat needs the delivery, not a copy of its message.
        let delivery = Arc::new(delivery);
        Self {
            _beating: beats.register(Arc::clone(&delivery)),
            delivery,
        }
    }

    /// The delivery.
    pub fn delivery(&self) -> &D {
        &self.delivery
    }

    /// Done: the queue forgets the message. A lost ack is harmless (the redelivery finds the
    /// call finished in the dedup state).
    pub async fn ack(self) {
        // The queue's futures are boxed here, where they live a moment, so that the future of
        // every task holding a lease stays small (thousands of long calls hold one each).
        if let Err(e) = Box::pin(self.delivery.ack()).await {
            tracing::warn!(error = %e, "ack failed");
        }
    }

    /// Offer the message again after `delay` (at once with `None`).
    pub async fn nak(self, delay: Option<Duration>) {
        if let Err(e) = Box::pin(self.delivery.nak(delay)).await {
            tracing::warn!(error = %e, "nak failed; the message will be redelivered after ack_wait");
        }
    }

    /// Shutdown: give the message back for another worker, at once.
    pub async fn hand_back(self) {
        Box::pin(self.nak(None)).await;
    }

    /// Keeps the message as a dead letter and acks it; if the dead letter cannot be stored,
    /// the message is offered again after `retry` instead (nothing is lost). Returns whether
    /// the dead letter was stored.
    pub async fn dead_letter<Q: CallQueue<Delivery = D>>(
        self,
        queue: &Q,
        letter: &DeadLetter<'_>,
        retry: Duration,
    ) -> bool {
        match Box::pin(queue.dead_letter(self.delivery.payload().clone(), letter)).await {
            Ok(()) => {
                self.ack().await;
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "dead-letter publish failed; retrying later");
                self.nak(Some(retry)).await;
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorder() -> (Arc<Mutex<Vec<u32>>>, impl Fn(u32) -> std::future::Ready<()>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        (seen, move |item| {
            sink.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(item);
            std::future::ready(())
        })
    }

    fn count(seen: &Mutex<Vec<u32>>, item: u32) -> usize {
        seen.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|&&i| i == item)
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn one_timer_signals_everything_registered_until_it_leaves() {
        let beats = Heartbeats::new();
        let stop = CancellationToken::new();
        let (seen, beat) = recorder();
        tokio::spawn(
            beats
                .clone()
                .run(Duration::from_secs(10), stop.clone(), beat),
        );
        let a = beats.register(1);
        let b = beats.register(2);
        assert_eq!(beats.len(), 2);

        tokio::time::sleep(Duration::from_secs(25)).await;
        assert_eq!((count(&seen, 1), count(&seen, 2)), (2, 2));

        drop(a);
        assert_eq!(beats.len(), 1);
        tokio::time::sleep(Duration::from_secs(10)).await;
        // What left gets nothing more; the rest goes on.
        assert_eq!((count(&seen, 1), count(&seen, 2)), (2, 3));

        drop(b);
        assert!(beats.is_empty());
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!((count(&seen, 1), count(&seen, 2)), (2, 3));
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn something_shorter_than_the_interval_gets_no_signal_and_stop_ends_the_timer() {
        let beats = Heartbeats::new();
        let stop = CancellationToken::new();
        let (seen, beat) = recorder();
        let timer = tokio::spawn(
            beats
                .clone()
                .run(Duration::from_secs(10), stop.clone(), beat),
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let short = beats.register(7);
        tokio::time::sleep(Duration::from_secs(8)).await;
        drop(short);
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(count(&seen, 7), 0);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(1), timer)
            .await
            .expect("the timer stops when told")
            .expect("the timer does not panic");
    }
}
