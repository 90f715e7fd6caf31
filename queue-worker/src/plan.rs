//! What to do with one delivery, decided from what is known before anything is run: a pure
//! function, so every case is a unit test.

use std::time::Duration;

use queue_core::Outcome;

use crate::state::{Generation, Seen};

/// The decision for one delivery.
#[derive(Debug, PartialEq)]
pub enum Plan {
    /// The call is finished (a redelivery after the ack was lost): ack, run nothing.
    AlreadyDone,
    /// This process is handling the call right now (a redelivery raced it): offer the
    /// delivery again later.
    RunningHere,
    /// The function already ran: only deliver the stored result.
    SendStored {
        /// The stored outcome.
        outcome: Outcome,
        /// Invocations it took.
        attempts: u32,
        /// Where the dedup entry is.
        generation: Generation,
    },
    /// Older than its maximum age: dead-letter it as expired, run nothing.
    Expire {
        /// Invocations made before.
        attempts: u32,
    },
    /// Its deliveries ran out before an attempt could finish (workers died during it):
    /// dead-letter it, run nothing.
    Exhausted {
        /// Invocations made (all of them).
        attempts: u32,
    },
    /// Invoke the function, as this attempt (1 for the first).
    Invoke {
        /// Which attempt.
        attempt: u32,
    },
}

/// Decides what to do with a delivery.
///
/// - `seen`: what the dedup state remembers of the call; `running_here`: this process is
///   handling it now;
/// - `delivery`: the queue's delivery count (1 for the first; deliveries lost to crashed
///   workers count too, so a call that kills workers is bounded by the same maximum);
/// - `age`: since the gateway accepted it.
///
/// A finished or completed call is never invoked again, whatever its age or delivery count:
/// the function ran, so only what is owed after it (the callback, the ack) remains.
pub fn plan(
    seen: Seen,
    running_here: bool,
    delivery: u32,
    max_attempts: u32,
    age: Duration,
    max_age: Duration,
) -> Plan {
    if running_here {
        return Plan::RunningHere;
    }
    match seen {
        Seen::Done => Plan::AlreadyDone,
        Seen::Completed {
            outcome,
            attempts,
            generation,
        } => Plan::SendStored {
            outcome,
            attempts,
            generation,
        },
        Seen::New if age > max_age => Plan::Expire {
            attempts: delivery.saturating_sub(1),
        },
        Seen::New if delivery > max_attempts => Plan::Exhausted {
            attempts: max_attempts,
        },
        Seen::New => Plan::Invoke { attempt: delivery },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const MAX_AGE: Duration = Duration::from_secs(3600);

    fn new(delivery: u32, age_secs: u64) -> Plan {
        plan(
            Seen::New,
            false,
            delivery,
            5,
            Duration::from_secs(age_secs),
            MAX_AGE,
        )
    }

    fn outcome() -> Outcome {
        Outcome {
            status: 200,
            headers: Vec::new(),
            body: Bytes::from_static(b"ok"),
            stored: None,
            duration: Duration::from_millis(3),
            error: None,
        }
    }

    #[test]
    fn a_new_call_is_invoked_as_its_delivery_count() {
        assert_eq!(new(1, 0), Plan::Invoke { attempt: 1 });
        assert_eq!(new(5, 10), Plan::Invoke { attempt: 5 });
    }

    #[test]
    fn deliveries_beyond_the_maximum_give_up_without_invoking() {
        assert_eq!(new(6, 0), Plan::Exhausted { attempts: 5 });
    }

    #[test]
    fn an_old_call_expires_at_its_maximum_age_and_not_before() {
        assert_eq!(new(1, 3600), Plan::Invoke { attempt: 1 });
        assert_eq!(new(1, 3601), Plan::Expire { attempts: 0 });
        // Expiry wins over exhaustion: the caller learns why it never ran.
        assert_eq!(new(9, 3601), Plan::Expire { attempts: 8 });
    }

    #[test]
    fn what_ran_is_never_invoked_again() {
        let done = plan(Seen::Done, false, 9, 5, MAX_AGE * 2, MAX_AGE);
        assert_eq!(done, Plan::AlreadyDone);
        let stored = plan(
            Seen::Completed {
                outcome: outcome(),
                attempts: 2,
                generation: Generation::for_test(7),
            },
            false,
            9,
            5,
            MAX_AGE * 2,
            MAX_AGE,
        );
        assert!(
            matches!(stored, Plan::SendStored { attempts: 2, ref outcome, .. } if outcome.status == 200),
            "{stored:?}"
        );
    }

    #[test]
    fn a_redelivery_of_a_call_running_here_waits() {
        assert_eq!(
            plan(Seen::New, true, 2, 5, Duration::ZERO, MAX_AGE),
            Plan::RunningHere
        );
        assert_eq!(
            plan(Seen::Done, true, 2, 5, Duration::ZERO, MAX_AGE),
            Plan::RunningHere
        );
    }
}
