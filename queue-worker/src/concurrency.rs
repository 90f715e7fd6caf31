//! Concurrency per function: a cap (`max_concurrency` in `--functions-config`, or the
//! function's `faas-async.max_concurrency` annotation) and, with `--adaptive-concurrency on`
//! (the default; OpenFaaS's `limiter_enabled`), an adaptive limit under that cap learned from
//! the function's answers: additive increase, multiplicative decrease ([`Aimd`]).
//!
//! The limit is per worker and per function, never above the function's cap or
//! `--max-inflight`, never below 1. It starts at the cap, so adaptive limiting only ever lowers
//! a function's concurrency, and only after the function pushed back: a `429` or a `503` answer,
//! or a call that timed out. Any other answer in time raises it again, slowly near the
//! concurrency at which the function last pushed back. Without a cap and with adaptive limiting
//! off nothing is tracked at all.
//!
//! # A delivery whose function is full
//!
//! It *waits here* for one of its function's slots, without the worker's permit, and the
//! worker's heartbeat keeps its lease alive meanwhile (as a paused function's calls are held,
//! `worker::hold_while_paused`); once it has a slot, it takes a worker permit again and runs.
//! The alternative, handing it back with a short nak delay, costs an attempt: the attempt
//! number is the queue's delivery count, which a nak increases, so a busy function's calls
//! would run out of retries or be dead-lettered without ever having been tried. Waiting costs
//! no attempt, takes no permit another function could use (a full function cannot starve the
//! others), and keeps the call's place: the waiters of one function are woken in arrival
//! order. Held calls are bounded as paused ones are: by what the queue hands out unacked
//! (`--max-ack-pending` on JetStream), and they return to the queue when the worker stops.
//!
//! # Cost
//!
//! On the common path a call takes its slot at once: a read lock of the functions' map, one
//! hash lookup, and an uncontended mutex per function, taken once to enter and once to leave
//! (a few arithmetic operations inside; the limit gauge is set only when the whole-number limit
//! changes).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use queue_core::Outcome;
use queue_core::metrics;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio_util::sync::CancellationToken;

/// The limit after a function pushed back is this share of what it was.
pub const DECREASE: f64 = 0.75;
/// Near the concurrency at which the function last pushed back, the limit grows this many
/// times more slowly: each probe of that level costs one rejected call, so probing it less
/// often keeps the share of `429`s low while the limit sits at the function's capacity.
pub const PROBE_SLOWDOWN: f64 = 8.0;
/// Functions tracked before the idle ones are forgotten (callers can name any function).
pub const MAX_TRACKED: usize = 1024;

/// What one call's end says about its function's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// It answered in time, without pushing back: room for more.
    Success,
    /// `429`, `503` or a timeout: too many at once.
    Backpressure,
    /// Nothing either way (no answer: connection refused, body cut, cancelled).
    Neutral,
}

impl Signal {
    /// The signal of an outcome.
    pub fn of(outcome: &Outcome) -> Self {
        match outcome.error.as_deref() {
            Some("timeout") => Self::Backpressure,
            Some(_) => Self::Neutral,
            None if matches!(outcome.status, 429 | 503) => Self::Backpressure,
            None => Self::Success,
        }
    }
}

/// The adaptive limit of one function (pure: every rule is a unit test).
///
/// - Additive increase: an answer that is not backpressure adds `1 / limit` (one whole slot
///   per `limit` such answers), but only while the limit is in use (all of it was running
///   when the call ended: a function called less often than its limit learns nothing), and [`PROBE_SLOWDOWN`] times less when the next whole slot would reach the
///   concurrency at which the function last pushed back (the *ceiling*). Once the limit is a
///   whole slot above the ceiling without backpressure, the ceiling is forgotten.
/// - Multiplicative decrease: backpressure on a call admitted since the last decrease
///   multiplies the limit by [`DECREASE`] and sets the ceiling to the concurrency it ran at.
///   Backpressure on a call admitted before it (the others of the same burst) takes one slot
///   off each: a burst of `n` calls of which `k` were refused comes down to about `n - k`, the
///   concurrency the function did take, rather than being halved once.
/// - Never above the cap, never below 1.
#[derive(Debug, Clone, PartialEq)]
pub struct Aimd {
    limit: f64,
    cap: u32,
    ceiling: Option<u32>,
    epoch: u64,
}

impl Aimd {
    /// A limit at `cap` (at least 1).
    pub fn new(cap: u32) -> Self {
        let cap = cap.max(1);
        Self {
            limit: f64::from(cap),
            cap,
            ceiling: None,
            epoch: 0,
        }
    }

    /// Calls allowed at once now: the whole part of the limit, from 1 to the cap.
    pub fn allowed(&self) -> u32 {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "the limit is kept within 1..=cap"
        )]
        let whole = self.limit.floor() as u32;
        whole.clamp(1, self.cap)
    }

    /// The limit with its fraction.
    pub fn limit(&self) -> f64 {
        self.limit
    }

    /// The cap.
    pub fn cap(&self) -> u32 {
        self.cap
    }

    /// The concurrency at which the function last pushed back, while remembered.
    pub fn ceiling(&self) -> Option<u32> {
        self.ceiling
    }

    /// Counts decreases: a call remembers the epoch it was admitted in.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// A new cap (the settings changed): a limit never lowered follows it; a learned one is
    /// kept, within it.
    pub fn set_cap(&mut self, cap: u32) {
        let cap = cap.max(1);
        if cap == self.cap {
            return;
        }
        let untouched = self.limit >= f64::from(self.cap);
        self.cap = cap;
        if untouched || self.limit > f64::from(cap) {
            self.limit = f64::from(cap);
        }
    }

    /// A call ended without backpressure; `running`: the calls running when it ended, itself
    /// included.
    pub fn on_success(&mut self, running: u32) {
        let cap = f64::from(self.cap);
        if self.limit >= cap || running < self.allowed() {
            return;
        }
        let near_ceiling = self
            .ceiling
            .is_some_and(|c| self.limit.floor() + 1.0 >= f64::from(c));
        let step = if near_ceiling {
            1.0 / (self.limit * PROBE_SLOWDOWN)
        } else {
            1.0 / self.limit
        };
        self.limit = (self.limit + step).min(cap);
        if self
            .ceiling
            .is_some_and(|c| self.limit >= f64::from(c) + 1.0)
        {
            self.ceiling = None;
        }
    }

    /// A call admitted in `epoch` met backpressure.
    pub fn on_backpressure(&mut self, epoch: u64) {
        if epoch == self.epoch {
            self.ceiling = Some(self.allowed());
            self.limit = (self.limit * DECREASE).max(1.0);
            self.epoch += 1;
        } else {
            self.limit = (self.limit - 1.0).max(1.0);
        }
    }
}

/// One function's limit and the calls running or waiting under it.
#[derive(Debug)]
struct Limiter {
    adaptive: bool,
    state: Mutex<State>,
    /// Wakes waiters, one at a time, in arrival order.
    notify: Notify,
}

#[derive(Debug)]
struct State {
    aimd: Aimd,
    running: u32,
    waiting: u32,
    /// Dropped from the map (idle): whoever still holds it looks the function up again.
    removed: bool,
    /// The limit gauge: its label and the value it shows.
    shown: Option<(String, ::metrics::Gauge, u32)>,
}

enum Take {
    Taken(u64),
    Full,
    Removed,
}

impl State {
    fn take(&mut self, cap: u32) -> Take {
        if self.removed {
            return Take::Removed;
        }
        if self.aimd.cap() != cap {
            self.aimd.set_cap(cap);
        }
        if self.running < self.aimd.allowed() {
            self.running += 1;
            Take::Taken(self.aimd.epoch())
        } else {
            Take::Full
        }
    }

    /// A waiter should be woken: someone waits and a slot is free.
    fn room_for_waiter(&self) -> bool {
        self.waiting > 0 && self.running < self.aimd.allowed()
    }

    fn show(&mut self, label: &str) {
        let allowed = self.aimd.allowed();
        match &mut self.shown {
            Some((shown_label, gauge, value)) if shown_label == label => {
                if *value != allowed {
                    gauge.set(f64::from(allowed));
                    *value = allowed;
                }
            }
            _ if label == "other" => {}
            _ => {
                let gauge =
                    ::metrics::gauge!(metrics::CONCURRENCY_LIMIT, "function" => label.to_owned());
                gauge.set(f64::from(allowed));
                self.shown = Some((label.to_owned(), gauge, allowed));
            }
        }
    }
}

impl Limiter {
    fn new(adaptive: bool, cap: u32) -> Self {
        Self {
            adaptive,
            state: Mutex::new(State {
                aimd: Aimd::new(cap),
                running: 0,
                waiting: 0,
                removed: false,
                shown: None,
            }),
            notify: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Short critical sections, never held across an await.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn slot(self: &Arc<Self>, epoch: u64) -> Slot {
        Slot {
            limiter: Some(Arc::clone(self)),
            epoch,
        }
    }

    /// A slot now, if one is free; `Err` if the limiter was dropped from the map.
    fn try_acquire(self: &Arc<Self>, cap: u32) -> Result<Option<Slot>, Removed> {
        match self.state().take(cap) {
            Take::Taken(epoch) => Ok(Some(self.slot(epoch))),
            Take::Full => Ok(None),
            Take::Removed => Err(Removed),
        }
    }

    /// A slot once one is free, in arrival order; `Err` if the limiter was dropped from the map.
    async fn acquire(self: &Arc<Self>, cap: u32) -> Result<Slot, Removed> {
        loop {
            // Registered before the state is read, so a slot freed in between wakes it.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let waiter = {
                let mut state = self.state();
                match state.take(cap) {
                    Take::Taken(epoch) => {
                        let more = state.room_for_waiter();
                        drop(state);
                        if more {
                            // The limit grew by more than one slot: pass it on.
                            self.notify.notify_one();
                        }
                        return Ok(self.slot(epoch));
                    }
                    Take::Removed => return Err(Removed),
                    Take::Full => state.waiting += 1,
                }
                Waiter(self)
            };
            notified.await;
            drop(waiter);
        }
    }

    fn release(&self, epoch: u64, signal: Signal, label: Option<&str>) {
        let mut state = self.state();
        let running = state.running;
        state.running = running.saturating_sub(1);
        if self.adaptive {
            match signal {
                Signal::Success => state.aimd.on_success(running),
                Signal::Backpressure => state.aimd.on_backpressure(epoch),
                Signal::Neutral => {}
            }
        }
        if let Some(label) = label {
            state.show(label);
        }
        let wake = state.room_for_waiter();
        drop(state);
        if wake {
            self.notify.notify_one();
        }
    }
}

#[derive(Debug)]
struct Removed;

/// Counts a waiter while it waits (a dropped wait included).
struct Waiter<'a>(&'a Limiter);

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.waiting = state.waiting.saturating_sub(1);
    }
}

/// A call's place under its function's limit, held while the function runs; released when
/// dropped (saying nothing of the function) or by [`Slot::finish`] (with the outcome).
#[derive(Debug)]
#[must_use = "a slot is released when dropped"]
pub struct Slot {
    limiter: Option<Arc<Limiter>>,
    epoch: u64,
}

impl Slot {
    /// A slot of a function nothing is tracked for.
    pub fn unlimited() -> Self {
        Self {
            limiter: None,
            epoch: 0,
        }
    }

    /// The call ended with `outcome`: adapts the limit and releases the slot; `label` is the
    /// function's metric label (the limit gauge's).
    pub fn finish(mut self, outcome: &Outcome, label: &str) {
        if let Some(limiter) = self.limiter.take() {
            limiter.release(self.epoch, Signal::of(outcome), Some(label));
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(limiter) = self.limiter.take() {
            limiter.release(self.epoch, Signal::Neutral, None);
        }
    }
}

/// What [`Limits::admit`] came to.
#[derive(Debug)]
pub enum Admission {
    /// Run the call with this worker permit and function slot.
    Run(OwnedSemaphorePermit, Slot),
    /// Shutdown: hand the delivery back.
    HandBack,
    /// The call was cancelled while it waited.
    Cancelled,
}

/// Gauge of calls waiting for a slot of their function, while one waits. Counted under
/// `other` too, as `faas_async_in_flight` is: the calls of a function yet to answer (its first
/// burst waits before its first answer) are counted there.
struct Waiting(::metrics::Gauge);

impl Waiting {
    fn start(label: &str) -> Self {
        let gauge = ::metrics::gauge!(metrics::CONCURRENCY_WAITING, "function" => label.to_owned());
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// The limits of every function of one worker.
#[derive(Debug)]
pub struct Limits {
    adaptive: bool,
    max_inflight: u32,
    functions: RwLock<HashMap<String, Arc<Limiter>>>,
    /// Calls that have their function's slot and wait for a worker permit.
    wanting: AtomicUsize,
    /// Tells the pull loop a call with a slot waits for a permit (see [`Limits::permit_wanted`]).
    wanted: Notify,
}

/// Counts a call with a slot waiting for a worker permit, while it waits.
struct Wanting<'a>(&'a Limits);

impl<'a> Wanting<'a> {
    fn start(limits: &'a Limits) -> Self {
        limits.wanting.fetch_add(1, Ordering::SeqCst);
        limits.wanted.notify_one();
        Self(limits)
    }
}

impl Drop for Wanting<'_> {
    fn drop(&mut self) {
        self.0.wanting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Limits {
    /// The limits of a worker running `max_inflight` calls at most, adaptive or not.
    pub fn new(adaptive: bool, max_inflight: u32) -> Self {
        Self {
            adaptive,
            max_inflight: max_inflight.max(1),
            functions: RwLock::default(),
            wanting: AtomicUsize::new(0),
            wanted: Notify::new(),
        }
    }

    /// Calls that have their function's slot and wait for a worker permit now.
    ///
    /// The pull loop reserves the free permits for the deliveries it asked for; a call that
    /// got its slot while they are reserved would wait for them until the pull ends (up to
    /// `--pull-expires`), its slot idle and counted as in use (so that the limit grew on no
    /// evidence, then the reserved permits came free at once: a burst of `429`s). The pull loop
    /// gives its reserved permits up while this is above 0, and the deliveries it still gets
    /// for that pull wait for a permit of their own.
    pub fn permits_wanted(&self) -> usize {
        self.wanting.load(Ordering::SeqCst)
    }

    /// Resolves when a call with a slot starts waiting for a permit (or has since the last
    /// time this resolved); then see [`Limits::permits_wanted`].
    pub async fn permit_wanted(&self) {
        self.wanted.notified().await;
    }

    /// Whether limits adapt to the functions' answers.
    pub fn adaptive(&self) -> bool {
        self.adaptive
    }

    /// The cap of a function with `max_concurrency`, within `max_inflight`; `None` when
    /// nothing needs tracking (no cap, not adaptive).
    fn cap(&self, max_concurrency: Option<u32>) -> Option<u32> {
        match max_concurrency {
            Some(n) => Some(n.clamp(1, self.max_inflight)),
            None if self.adaptive => Some(self.max_inflight),
            None => None,
        }
    }

    fn limiter(&self, function: &str, cap: u32) -> Arc<Limiter> {
        if let Some(limiter) = self
            .functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(function)
        {
            return Arc::clone(limiter);
        }
        let mut functions = self
            .functions
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if functions.len() >= MAX_TRACKED && !functions.contains_key(function) {
            forget_idle(&mut functions);
        }
        Arc::clone(
            functions
                .entry(function.to_owned())
                .or_insert_with(|| Arc::new(Limiter::new(self.adaptive, cap))),
        )
    }

    /// The current limit of `function` and the calls running under it, if it is tracked.
    pub fn current(&self, function: &str) -> Option<(u32, u32)> {
        let functions = self
            .functions
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let state = functions.get(function)?.state();
        Some((state.aimd.allowed(), state.running))
    }

    /// Every tracked function's limit, cap, running and waiting calls now, by name (read
    /// only: each function's lock is taken once, briefly; for the worker's status, not the
    /// path of a call).
    pub fn snapshot(&self) -> Vec<queue_core::backend::FunctionConcurrency> {
        let functions = self
            .functions
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<_> = functions
            .iter()
            .map(|(function, limiter)| {
                let state = limiter.state();
                queue_core::backend::FunctionConcurrency {
                    function: function.clone(),
                    limit: state.aimd.allowed(),
                    cap: state.aimd.cap(),
                    in_flight: state.running,
                    waiting: state.waiting,
                }
            })
            .collect();
        drop(functions);
        out.sort_by(|a, b| a.function.cmp(&b.function));
        out
    }

    /// Admits a call of `function` (metric label `label`, cap `max_concurrency`) holding the
    /// worker's `permit`: at once if its function has a free slot; else the permit is given
    /// back and the call waits for a slot (see the module documentation), then for a permit
    /// of `permits`. `hand_back` (shutdown) and `cancel` (the call's) end the wait.
    #[allow(
        clippy::too_many_arguments,
        reason = "the worker's pieces, passed as they are"
    )]
    pub async fn admit(
        &self,
        function: &str,
        label: &str,
        max_concurrency: Option<u32>,
        permit: OwnedSemaphorePermit,
        permits: &Arc<Semaphore>,
        hand_back: &CancellationToken,
        cancel: &CancellationToken,
    ) -> Admission {
        let Some(cap) = self.cap(max_concurrency) else {
            return Admission::Run(permit, Slot::unlimited());
        };
        let limiter = loop {
            let limiter = self.limiter(function, cap);
            match limiter.try_acquire(cap) {
                Ok(Some(slot)) => return Admission::Run(permit, slot),
                Ok(None) => break limiter,
                Err(Removed) => {}
            }
        };
        drop(permit);
        tracing::debug!(
            "function at its concurrency limit; waiting for a slot without a worker permit"
        );
        let waiting = Waiting::start(label);
        let wait = async {
            let mut limiter = limiter;
            loop {
                match limiter.acquire(cap).await {
                    Ok(slot) => return slot,
                    Err(Removed) => limiter = self.limiter(function, cap),
                }
            }
        };
        let slot = tokio::select! {
            slot = wait => slot,
            () = hand_back.cancelled() => return Admission::HandBack,
            () = cancel.cancelled() => return Admission::Cancelled,
        };
        drop(waiting);
        match permits.clone().try_acquire_owned() {
            Ok(permit) => return Admission::Run(permit, slot),
            Err(TryAcquireError::Closed) => return Admission::HandBack,
            Err(TryAcquireError::NoPermits) => {}
        }
        // The pull loop gives up the permits it reserved (see `permits_wanted`).
        let _wanting = Wanting::start(self);
        tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(permit) => Admission::Run(permit, slot),
                Err(_) => Admission::HandBack,
            },
            () = hand_back.cancelled() => Admission::HandBack,
            () = cancel.cancelled() => Admission::Cancelled,
        }
    }
}

/// Drops the functions nothing runs or waits under (their learned limits are forgotten; their
/// gauge shows their cap again).
fn forget_idle(functions: &mut HashMap<String, Arc<Limiter>>) {
    functions.retain(|_, limiter| {
        let mut state = limiter.state();
        if state.running > 0 || state.waiting > 0 {
            return true;
        }
        state.removed = true;
        let cap = state.aimd.cap();
        if let Some((_, gauge, _)) = &state.shown {
            gauge.set(f64::from(cap));
        }
        false
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn outcome(status: u16, error: Option<&str>) -> Outcome {
        Outcome {
            status,
            headers: Vec::new(),
            body: bytes::Bytes::new(),
            stored: None,
            duration: Duration::ZERO,
            error: error.map(str::to_owned),
        }
    }

    #[test]
    fn signals_from_outcomes() {
        assert_eq!(Signal::of(&outcome(200, None)), Signal::Success);
        assert_eq!(Signal::of(&outcome(404, None)), Signal::Success);
        assert_eq!(Signal::of(&outcome(500, None)), Signal::Success);
        assert_eq!(Signal::of(&outcome(429, None)), Signal::Backpressure);
        assert_eq!(Signal::of(&outcome(503, None)), Signal::Backpressure);
        assert_eq!(
            Signal::of(&outcome(503, Some("timeout"))),
            Signal::Backpressure
        );
        assert_eq!(Signal::of(&outcome(503, Some("connect"))), Signal::Neutral);
        assert_eq!(
            Signal::of(&outcome(502, Some("response too large"))),
            Signal::Neutral
        );
    }

    #[test]
    fn starts_at_the_cap_and_never_leaves_one_to_cap() {
        let mut a = Aimd::new(10);
        assert_eq!(a.allowed(), 10);
        a.on_success(10);
        assert_eq!(a.allowed(), 10, "never above the cap");
        for _ in 0..100 {
            let epoch = a.epoch();
            a.on_backpressure(epoch);
        }
        assert_eq!(a.allowed(), 1, "never below 1");
        assert!(a.limit() >= 1.0);
        assert_eq!(Aimd::new(0).allowed(), 1, "a cap of 0 is 1");
    }

    #[test]
    fn multiplicative_decrease_once_per_burst_then_one_slot_per_refusal() {
        let mut a = Aimd::new(40);
        let burst = a.epoch();
        a.on_backpressure(burst);
        assert_eq!(a.allowed(), 30, "40 x 0.75");
        assert_eq!(a.ceiling(), Some(40));
        // The others of the same burst: one slot each.
        a.on_backpressure(burst);
        a.on_backpressure(burst);
        assert_eq!(a.allowed(), 28);
        // A call admitted after the decrease decreases multiplicatively again.
        a.on_backpressure(a.epoch());
        assert_eq!(a.allowed(), 21, "28 x 0.75");
        assert_eq!(a.ceiling(), Some(28));
    }

    #[test]
    fn additive_increase_one_slot_per_limit_successes() {
        let mut a = Aimd::new(50);
        for _ in 0..40 {
            a.on_backpressure(a.epoch() + 1); // old-epoch refusals: down by one each
        }
        assert_eq!(a.allowed(), 10);
        assert_eq!(a.ceiling(), None);
        let mut successes = 0;
        while a.allowed() < 11 {
            a.on_success(10);
            successes += 1;
        }
        assert_eq!(successes, 11, "about 10 successes at 10 add one slot");
        // A limit not in full use does not grow.
        let before = a.limit();
        a.on_success(10);
        assert!((a.limit() - before).abs() < f64::EPSILON);
    }

    #[test]
    fn probing_near_the_ceiling_is_slow_then_forgotten_above_it() {
        let mut a = Aimd::new(50);
        for _ in 0..46 {
            a.on_backpressure(a.epoch() + 1);
        }
        assert_eq!(a.allowed(), 4);
        a.on_backpressure(a.epoch()); // pushed back at 4
        assert_eq!(a.allowed(), 3);
        assert_eq!(a.ceiling(), Some(4));
        let mut successes = 0;
        while a.allowed() < 4 {
            a.on_success(a.allowed());
            successes += 1;
        }
        assert!(
            successes >= 8,
            "the step to the ceiling is probed slowly: {successes} successes"
        );
        while a.ceiling().is_some() {
            a.on_success(a.allowed());
            successes += 1;
            assert!(successes < 1000);
        }
        assert_eq!(a.allowed(), 5, "forgotten a whole slot above it");
        // Then growth is normal again: about 5 successes at 5 give a sixth slot.
        for _ in 0..6 {
            a.on_success(5);
        }
        assert_eq!(a.allowed(), 6);
    }

    /// A function that takes 3 at once and refuses the rest, simulated in rounds at the
    /// limit: the limit settles at 3 and 4, and after the first burst few calls are refused.
    #[test]
    fn settles_at_a_functions_capacity_with_few_refusals() {
        let capacity = 3;
        let mut a = Aimd::new(50);
        let (mut refused, mut ok) = (0, 0);
        let mut history = Vec::new();
        for round in 0..200 {
            let epoch = a.epoch();
            let n = a.allowed();
            for i in 0..n {
                if i < capacity {
                    a.on_success(n);
                    if round >= 20 {
                        ok += 1;
                    }
                } else {
                    a.on_backpressure(epoch);
                    if round >= 20 {
                        refused += 1;
                    }
                }
            }
            history.push(a.allowed());
        }
        assert!(
            history[20..].iter().all(|n| (3..=4).contains(n)),
            "{history:?}"
        );
        let share = f64::from(refused) / f64::from(refused + ok);
        assert!(share < 0.1, "{refused} refused of {}", refused + ok);
    }

    #[test]
    fn a_new_cap_applies_to_a_limit_never_lowered_and_bounds_a_learned_one() {
        let mut a = Aimd::new(10);
        a.set_cap(20);
        assert_eq!(a.allowed(), 20);
        a.on_backpressure(a.epoch());
        assert_eq!(a.allowed(), 15);
        a.set_cap(30);
        assert_eq!(a.allowed(), 15, "learned: kept");
        a.set_cap(4);
        assert_eq!(a.allowed(), 4, "within the cap");
    }

    fn permit(permits: &Arc<Semaphore>) -> OwnedSemaphorePermit {
        permits.clone().try_acquire_owned().unwrap()
    }

    async fn admit(limits: &Limits, permits: &Arc<Semaphore>, cap: Option<u32>) -> Admission {
        let none = CancellationToken::new();
        limits
            .admit("f", "f", cap, permit(permits), permits, &none, &none)
            .await
    }

    fn run(admission: Admission) -> (OwnedSemaphorePermit, Slot) {
        match admission {
            Admission::Run(p, s) => (p, s),
            other => panic!("not admitted: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_tracked_without_a_cap_when_not_adaptive() {
        let limits = Limits::new(false, 4);
        let permits = Arc::new(Semaphore::new(4));
        let (_p, slot) = run(admit(&limits, &permits, None).await);
        assert!(slot.limiter.is_none());
        assert_eq!(limits.current("f"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_function_waits_without_a_worker_permit_and_runs_when_a_slot_frees() {
        let limits = Arc::new(Limits::new(false, 4));
        let permits = Arc::new(Semaphore::new(4));
        let (_p1, slot) = run(admit(&limits, &permits, Some(1)).await);
        assert_eq!(limits.current("f"), Some((1, 1)));
        let waiting = {
            let (limits, permits) = (limits.clone(), permits.clone());
            tokio::spawn(async move { run(admit(&limits, &permits, Some(1)).await) })
        };
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!waiting.is_finished(), "waits while the slot is taken");
        assert_eq!(
            permits.available_permits(),
            3,
            "the waiting call holds no worker permit"
        );
        slot.finish(&outcome(200, None), "f");
        let (_p2, _slot2) = waiting.await.unwrap();
        assert_eq!(limits.current("f"), Some((1, 1)));
        assert_eq!(permits.available_permits(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_and_cancel_end_the_wait() {
        let limits = Limits::new(true, 2);
        let permits = Arc::new(Semaphore::new(4));
        let (_p, _slot) = run(admit(&limits, &permits, Some(1)).await);
        let (stop, cancel) = (CancellationToken::new(), CancellationToken::new());
        let waiting = limits.admit(
            "f",
            "f",
            Some(1),
            permit(&permits),
            &permits,
            &stop,
            &cancel,
        );
        tokio::pin!(waiting);
        tokio::select! {
            _ = &mut waiting => panic!("admitted over the cap"),
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        stop.cancel();
        assert!(matches!(waiting.await, Admission::HandBack));
        let never = CancellationToken::new();
        let waiting = limits.admit(
            "f",
            "f",
            Some(1),
            permit(&permits),
            &permits,
            &never,
            &cancel,
        );
        cancel.cancel();
        assert!(matches!(waiting.await, Admission::Cancelled));
        let state = limits.limiter("f", 1);
        assert_eq!(state.state().waiting, 0, "a dropped wait is not counted");
    }

    #[tokio::test(start_paused = true)]
    async fn the_snapshot_shows_each_functions_limit_cap_and_calls() {
        let limits = Limits::new(true, 10);
        assert!(limits.snapshot().is_empty());
        let permits = Arc::new(Semaphore::new(10));
        let (_p, slot) = run(admit(&limits, &permits, Some(4)).await);
        let (_q, other) = run(admit(&limits, &permits, Some(4)).await);
        let got = limits.snapshot();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].function, "f");
        assert_eq!((got[0].limit, got[0].cap, got[0].in_flight), (4, 4, 2));
        slot.finish(&outcome(429, None), "f");
        drop(other);
        let got = limits.snapshot();
        let got = (got[0].limit, got[0].cap, got[0].in_flight, got[0].waiting);
        assert_eq!(got, (3, 4, 0, 0), "lowered by the 429");
    }

    #[tokio::test(start_paused = true)]
    async fn backpressure_lowers_the_limit_and_waiters_follow_it() {
        let limits = Arc::new(Limits::new(true, 8));
        let permits = Arc::new(Semaphore::new(100));
        let mut slots = Vec::new();
        for _ in 0..4 {
            slots.push(run(admit(&limits, &permits, Some(4)).await));
        }
        assert_eq!(limits.current("f"), Some((4, 4)));
        // One refusal: 4 x 0.75 = 3; the others of the burst succeed.
        let (_, refused) = slots.pop().unwrap();
        refused.finish(&outcome(429, None), "f");
        assert_eq!(limits.current("f"), Some((3, 3)));
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let (limits, permits) = (limits.clone(), permits.clone());
                tokio::spawn(async move { run(admit(&limits, &permits, Some(4)).await) })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(waiters.iter().all(|w| !w.is_finished()), "3 of 3 running");
        for (_, slot) in slots.drain(..) {
            slot.finish(&outcome(200, None), "f");
        }
        let mut admitted = Vec::new();
        for w in waiters {
            admitted.push(w.await.unwrap());
        }
        let (allowed, running) = limits.current("f").unwrap();
        assert_eq!(allowed, 3, "near the ceiling the limit grows slowly");
        assert_eq!(running, 3);
    }

    /// A call given a slot while every free permit is reserved (by the pull loop) says so,
    /// and runs as soon as a reserved permit is given up.
    #[tokio::test(start_paused = true)]
    async fn a_call_with_a_slot_waiting_for_a_permit_is_announced() {
        let limits = Arc::new(Limits::new(false, 4));
        let permits = Arc::new(Semaphore::new(4));
        let (p1, slot) = run(admit(&limits, &permits, Some(1)).await);
        let waiting = {
            let (limits, permits) = (limits.clone(), permits.clone());
            tokio::spawn(async move { run(admit(&limits, &permits, Some(1)).await) })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The other permits reserved, then the running call ends: its permit is taken too.
        let mut reserved: Vec<_> = (0..3).map(|_| permit(&permits)).collect();
        assert_eq!(limits.permits_wanted(), 0);
        let announced = limits.permit_wanted();
        tokio::pin!(announced);
        drop(p1);
        reserved.push(permit(&permits));
        slot.finish(&outcome(200, None), "f");
        tokio::select! {
            () = &mut announced => {}
            () = tokio::time::sleep(Duration::from_secs(60)) => panic!("not announced"),
        }
        assert_eq!(limits.permits_wanted(), 1);
        assert!(!waiting.is_finished(), "no permit free");
        reserved.pop();
        let (_p, _slot) = waiting.await.unwrap();
        assert_eq!(limits.permits_wanted(), 0, "no longer waiting");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_functions_are_forgotten_beyond_the_bound() {
        let limits = Limits::new(true, 4);
        let permits = Arc::new(Semaphore::new(4));
        let (_p, busy) = run(admit(&limits, &permits, None).await);
        for i in 0..MAX_TRACKED + 10 {
            let none = CancellationToken::new();
            let name = format!("g{i}");
            let (_p, slot) = run(limits
                .admit(
                    &name,
                    "other",
                    None,
                    permit(&permits),
                    &permits,
                    &none,
                    &none,
                )
                .await);
            drop(slot);
        }
        let tracked = limits.functions.read().unwrap().len();
        assert!(tracked <= MAX_TRACKED, "{tracked} tracked");
        assert_eq!(limits.current("f"), Some((4, 1)), "a busy one is kept");
        drop(busy);
    }

    /// The success path, timed (run with `--release` to read the figure; it asserts only that
    /// nothing is left running).
    #[test]
    fn success_path_cost() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let limits = Limits::new(true, 50);
            let permits = Arc::new(Semaphore::new(50));
            let ok = outcome(200, None);
            let n = 200_000u32;
            let started = std::time::Instant::now();
            for _ in 0..n {
                let (p, slot) = run(admit(&limits, &permits, None).await);
                slot.finish(&ok, "f");
                drop(p);
            }
            let per_call = started.elapsed() / n;
            eprintln!("admit + finish: {per_call:?} per call");
            assert_eq!(limits.current("f"), Some((50, 0)));
        });
    }
}
