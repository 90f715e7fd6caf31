//! Fair scheduling of pulls (`--fair-scheduling`): which lane the next pull asks.
//!
//! A lane is one function at one priority ([`Lane`]: its own subjects and, on JetStream, its
//! own consumer). [`Scheduler::pick`] chooses among the lanes *eligible* now in three steps,
//! each fair on its own:
//!
//! 1. a namespace, by smooth weighted round-robin (`--namespace-weights`: a namespace of
//!    weight 3 is picked three times for one pick of a namespace of weight 1);
//! 2. a function of that namespace, in plain round-robin;
//! 3. a priority of that function, by smooth weighted round-robin 4:2:1 (high, normal, low)
//!    among its eligible lanes: high goes first within the function's share, low still runs.
//!
//! A lane is eligible while it is known to hold calls (*ready*: announced by a publisher, or
//! the last pull left calls behind) or when its next poll is due: a lane found drained is
//! polled again after [`Timing::idle_poll`] while it had calls within [`Timing::warm`] (that
//! catches redeliveries, which nobody announces), after [`Timing::cold_poll`] otherwise, and
//! forgotten after [`Timing::forget`] without calls. One pick is one pull (a batch), never
//! one per delivery. A leaf: it knows lanes and time, nothing of the queue or the worker.

use std::collections::VecDeque;
use std::time::Duration;

use queue_core::backend::Lane;
use queue_core::message::Priority;
use tokio::time::Instant;

/// How often drained lanes are polled again, and when they are forgotten.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// A lane that had calls within [`Timing::warm`] is polled this long after it drained.
    pub idle_poll: Duration,
    /// How long a lane counts as warm after its last call.
    pub warm: Duration,
    /// A lane without calls for longer than `warm` is polled this often.
    pub cold_poll: Duration,
    /// A lane without calls for this long is forgotten (a publisher announces it again with
    /// its next call, and a census finds its consumer).
    pub forget: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            idle_poll: Duration::from_millis(250),
            warm: Duration::from_secs(300),
            cold_poll: Duration::from_secs(5),
            forget: Duration::from_secs(3600),
        }
    }
}

/// A lane chosen by [`Scheduler::pick`]: what to pull, and the lane's generation then (an
/// announcement during the pull moves it on, so that [`Scheduler::drained`] keeps the lane
/// ready).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pick {
    /// The lane to pull.
    pub lane: Lane,
    /// Its generation at the pick.
    pub generation: u64,
}

/// The known lanes and the round-robin state.
#[derive(Debug)]
pub struct Scheduler {
    namespaces: Vec<Namespace>,
    timing: Timing,
    lanes: usize,
}

#[derive(Debug)]
struct Namespace {
    name: String,
    weight: i64,
    current: i64,
    functions: VecDeque<Function>,
}

#[derive(Debug)]
struct Function {
    name: String,
    /// The lane of each priority (by [`slot`]) and its round-robin credit.
    lanes: [Option<LaneState>; 3],
    current: [i64; 3],
}

#[derive(Debug)]
struct LaneState {
    lane: Lane,
    ready: bool,
    generation: u64,
    next_poll: Instant,
    last_calls: Instant,
}

impl LaneState {
    fn eligible(&self, now: Instant) -> bool {
        self.ready || now >= self.next_poll
    }
}

fn slot(priority: Priority) -> usize {
    match priority {
        Priority::Low => 0,
        Priority::Normal => 1,
        Priority::High => 2,
    }
}

/// Smooth weighted round-robin: every candidate gains its weight, the richest is picked and
/// pays the total. Over any stretch each is picked in proportion to its weight, evenly spread.
fn smooth_pick(candidates: &[(usize, i64)], current: &mut [i64]) -> Option<usize> {
    let mut total = 0;
    let mut best: Option<usize> = None;
    for &(i, weight) in candidates {
        current[i] += weight;
        total += weight;
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    if let Some(b) = best {
        current[b] -= total;
    }
    best
}

impl Scheduler {
    /// No lanes known yet.
    pub fn new(timing: Timing) -> Self {
        Self {
            namespaces: Vec::new(),
            timing,
            lanes: 0,
        }
    }

    /// Lanes known.
    pub fn len(&self) -> usize {
        self.lanes
    }

    /// No lane is known.
    pub fn is_empty(&self) -> bool {
        self.lanes == 0
    }

    fn state_mut(&mut self, lane: &Lane) -> Option<&mut LaneState> {
        self.namespaces
            .iter_mut()
            .find(|n| n.name == lane.namespace)?
            .functions
            .iter_mut()
            .find(|f| f.name == lane.function)?
            .lanes[slot(lane.priority)]
        .as_mut()
    }

    /// Adds a lane if it is new (not ready: polled at once); `weight` is its namespace's,
    /// read when the namespace is new. Returns whether it was new.
    pub fn know(&mut self, lane: &Lane, weight: u32, now: Instant) -> bool {
        if self.state_mut(lane).is_some() {
            return false;
        }
        let i = match self
            .namespaces
            .iter()
            .position(|n| n.name == lane.namespace)
        {
            Some(i) => i,
            None => {
                self.namespaces.push(Namespace {
                    name: lane.namespace.clone(),
                    weight: i64::from(weight.max(1)),
                    current: 0,
                    functions: VecDeque::new(),
                });
                self.namespaces.len() - 1
            }
        };
        let ns = &mut self.namespaces[i];
        let f = match ns.functions.iter().position(|f| f.name == lane.function) {
            Some(f) => f,
            None => {
                // A new function goes first: its turn comes before the others' next ones.
                ns.functions.push_front(Function {
                    name: lane.function.clone(),
                    lanes: [None, None, None],
                    current: [0; 3],
                });
                0
            }
        };
        ns.functions[f].lanes[slot(lane.priority)] = Some(LaneState {
            lane: lane.clone(),
            ready: false,
            generation: 0,
            next_poll: now,
            last_calls: now,
        });
        self.lanes += 1;
        true
    }

    /// The lane has calls waiting (a publisher announced it, or the queue listed it).
    pub fn ready(&mut self, lane: &Lane, weight: u32, now: Instant) {
        self.know(lane, weight, now);
        if let Some(state) = self.state_mut(lane) {
            state.ready = true;
            state.generation += 1;
        }
    }

    /// A pull of the lane brought calls, and left more behind.
    pub fn fetched(&mut self, lane: &Lane, now: Instant) {
        if let Some(state) = self.state_mut(lane) {
            state.last_calls = now;
            state.ready = true;
        }
    }

    /// A pull (picked at `generation`) found the lane drained; `got_calls` whether it brought
    /// any. Unless the lane was announced since the pick, it waits for its next poll.
    pub fn drained(&mut self, lane: &Lane, generation: u64, got_calls: bool, now: Instant) {
        let timing = self.timing;
        if let Some(state) = self.state_mut(lane) {
            if got_calls {
                state.last_calls = now;
            }
            if state.generation == generation {
                state.ready = false;
                let warm = now.saturating_duration_since(state.last_calls) < timing.warm;
                state.next_poll = now
                    + if warm {
                        timing.idle_poll
                    } else {
                        timing.cold_poll
                    };
            }
        }
    }

    /// When the next lane becomes eligible, if none is now (`None`: none is known, or one is
    /// eligible already).
    pub fn next_due(&self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        for state in self.states() {
            if state.eligible(now) {
                return None;
            }
            next = Some(next.map_or(state.next_poll, |n| n.min(state.next_poll)));
        }
        next
    }

    fn states(&self) -> impl Iterator<Item = &LaneState> {
        self.namespaces
            .iter()
            .flat_map(|n| n.functions.iter())
            .flat_map(|f| f.lanes.iter().flatten())
    }

    /// Forgets a lane (its function moved to another queue).
    pub fn forget(&mut self, lane: &Lane) {
        for ns in &mut self.namespaces {
            if ns.name != lane.namespace {
                continue;
            }
            for f in &mut ns.functions {
                if f.name == lane.function && f.lanes[slot(lane.priority)].take().is_some() {
                    self.lanes -= 1;
                }
            }
            ns.functions.retain(|f| f.lanes.iter().any(Option::is_some));
        }
        self.namespaces.retain(|n| !n.functions.is_empty());
    }

    /// Forgets lanes without calls for [`Timing::forget`] that are not ready.
    pub fn forget_idle(&mut self, now: Instant) {
        let forget = self.timing.forget;
        let mut removed = 0;
        for ns in &mut self.namespaces {
            for f in &mut ns.functions {
                for lane in &mut f.lanes {
                    if lane.as_ref().is_some_and(|s| {
                        !s.ready && now.saturating_duration_since(s.last_calls) >= forget
                    }) {
                        *lane = None;
                        removed += 1;
                    }
                }
            }
            ns.functions.retain(|f| f.lanes.iter().any(Option::is_some));
        }
        self.namespaces.retain(|n| !n.functions.is_empty());
        self.lanes -= removed;
    }

    /// The lane the next pull asks, if one is eligible now.
    pub fn pick(&mut self, now: Instant) -> Option<Pick> {
        // Namespaces with an eligible lane, by weight.
        let candidates: Vec<(usize, i64)> = self
            .namespaces
            .iter()
            .enumerate()
            .filter(|(_, n)| {
                n.functions
                    .iter()
                    .any(|f| f.lanes.iter().flatten().any(|s| s.eligible(now)))
            })
            .map(|(i, n)| (i, n.weight))
            .collect();
        let mut credits: Vec<i64> = self.namespaces.iter().map(|n| n.current).collect();
        let n = smooth_pick(&candidates, &mut credits)?;
        for (ns, credit) in self.namespaces.iter_mut().zip(credits) {
            ns.current = credit;
        }
        let ns = &mut self.namespaces[n];
        // The next function in turn with an eligible lane goes, then goes last.
        let f = ns
            .functions
            .iter()
            .position(|f| f.lanes.iter().flatten().any(|s| s.eligible(now)))?;
        ns.functions.rotate_left(f);
        ns.functions.rotate_left(1);
        let function = ns.functions.back_mut()?;
        let lanes: Vec<(usize, i64)> = function
            .lanes
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.as_ref()
                    .filter(|s| s.eligible(now))
                    .map(|s| (i, i64::from(s.lane.priority.weight())))
            })
            .collect();
        let p = smooth_pick(&lanes, &mut function.current)?;
        let state = function.lanes[p].as_ref()?;
        Some(Pick {
            lane: state.lane.clone(),
            generation: state.generation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lane(ns: &str, function: &str, priority: Priority) -> Lane {
        Lane {
            namespace: ns.into(),
            function: function.into(),
            priority,
        }
    }

    fn picks(s: &mut Scheduler, n: usize, now: Instant) -> HashMap<Lane, usize> {
        let mut out = HashMap::new();
        for _ in 0..n {
            if let Some(p) = s.pick(now) {
                *out.entry(p.lane).or_default() += 1;
            }
        }
        out
    }

    #[test]
    fn functions_share_evenly_and_a_new_one_goes_next() {
        let now = Instant::now();
        let mut s = Scheduler::new(Timing::default());
        let a = lane("_", "a", Priority::Normal);
        let b = lane("_", "b", Priority::Normal);
        s.ready(&a, 1, now);
        assert_eq!(picks(&mut s, 10, now)[&a], 10);
        s.ready(&b, 1, now);
        assert_eq!(s.pick(now).map(|p| p.lane), Some(b.clone()));
        let got = picks(&mut s, 100, now);
        assert_eq!((got[&a], got[&b]), (50, 50));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn namespaces_by_weight_then_functions_within_them() {
        let now = Instant::now();
        let mut s = Scheduler::new(Timing::default());
        let heavy1 = lane("heavy", "x", Priority::Normal);
        let heavy2 = lane("heavy", "y", Priority::Normal);
        let light = lane("light", "z", Priority::Normal);
        s.ready(&heavy1, 3, now);
        s.ready(&heavy2, 3, now);
        s.ready(&light, 1, now);
        let got = picks(&mut s, 400, now);
        assert_eq!(got[&light], 100);
        assert_eq!(got[&heavy1], 150);
        assert_eq!(got[&heavy2], 150);
        // A namespace with many functions gets no more than its weight.
        for f in 0..20 {
            s.ready(&lane("light", &format!("f{f}"), Priority::Normal), 1, now);
        }
        let got = picks(&mut s, 400, now);
        assert_eq!(got[&heavy1] + got[&heavy2], 300);
    }

    #[test]
    fn priorities_four_two_one_and_low_is_never_starved() {
        let now = Instant::now();
        let mut s = Scheduler::new(Timing::default());
        let lanes = Priority::ALL.map(|p| lane("ns", "f", p));
        for l in &lanes {
            s.ready(l, 1, now);
        }
        let got = picks(&mut s, 700, now);
        assert_eq!(got[&lanes[2]], 400, "high");
        assert_eq!(got[&lanes[1]], 200, "normal");
        assert_eq!(got[&lanes[0]], 100, "low");
        // Within any 7 picks, low comes once.
        assert_eq!(picks(&mut s, 7, now).get(&lanes[0]), Some(&1));
    }

    #[test]
    fn a_drained_lane_waits_for_its_poll_unless_announced_meanwhile() {
        let timing = Timing::default();
        let t0 = Instant::now();
        let mut s = Scheduler::new(timing);
        let a = lane("_", "a", Priority::Normal);
        let b = lane("_", "b", Priority::High);
        s.ready(&a, 1, t0);
        s.ready(&b, 1, t0);
        let pa = s.pick(t0).expect("a pick");
        let pb = s.pick(t0).expect("a pick");
        assert_ne!(pa.lane, pb.lane);
        s.drained(&pa.lane, pa.generation, true, t0);
        // Announced while the pull of b was under way: b stays ready.
        s.ready(&pb.lane, 1, t0);
        s.drained(&pb.lane, pb.generation, true, t0);
        for _ in 0..3 {
            assert_eq!(s.pick(t0).map(|p| p.lane), Some(pb.lane.clone()));
        }
        let pb = s.pick(t0).expect("b");
        s.drained(&pb.lane, pb.generation, false, t0);
        assert_eq!(s.pick(t0), None);
        assert_eq!(s.next_due(t0), Some(t0 + timing.idle_poll));
        // Warm lanes come back after the idle poll, cold ones after the cold poll.
        let later = t0 + timing.idle_poll;
        let got = picks(&mut s, 2, later);
        assert_eq!(got.len(), 2, "{got:?}");
        let cold = t0 + timing.warm + Duration::from_secs(1);
        let p = s.pick(cold).expect("a pick");
        s.drained(&p.lane, p.generation, false, cold);
        let q = s.pick(cold).expect("the other");
        s.drained(&q.lane, q.generation, false, cold);
        assert_eq!(s.next_due(cold), Some(cold + timing.cold_poll));
        // Forgotten after `forget` without calls; known again when announced.
        s.forget_idle(t0 + timing.forget);
        assert!(s.is_empty());
        assert_eq!(s.next_due(t0 + timing.forget), None);
        s.ready(&a, 1, t0 + timing.forget);
        assert_eq!(s.len(), 1);
        s.forget(&b);
        assert_eq!(s.len(), 1);
        s.forget(&a);
        assert!(s.is_empty() && s.pick(t0 + timing.forget).is_none());
    }

    #[test]
    fn knowing_a_lane_twice_changes_nothing() {
        let now = Instant::now();
        let mut s = Scheduler::new(Timing::default());
        let a = lane("_", "a", Priority::High);
        assert!(s.know(&a, 1, now));
        assert!(!s.know(&a, 1, now));
        assert_eq!(s.len(), 1);
        // A known lane that is not ready is polled at once, then waits.
        let p = s.pick(now).expect("due at once");
        s.drained(&p.lane, p.generation, false, now);
        assert_eq!(s.pick(now), None);
    }
}
