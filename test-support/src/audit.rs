//! Matching received callbacks against the calls that were accepted.
//!
//! [`audit_callbacks`] is how `load-tests bench` decides whether a run was
//! clean: every accepted call must have exactly one callback, every callback
//! must belong to an accepted call, and every callback must carry the
//! headers the worker promises (`X-Call-Id`, `X-Function-Status`,
//! `X-Function-Name`, `X-Duration-Seconds`, `X-Start-Time`). Throughput is
//! only worth reporting next to these counts.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::stub::{ANSWERED_AT_HEADER, INVOKED_AT_HEADER, RecordedCallback};

/// What [`audit_callbacks`] expects of each callback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expectations<'a> {
    /// The function the calls were addressed to: `X-Function-Name` must be
    /// this name, or this name qualified with a namespace (`name.namespace`).
    pub function: &'a str,
    /// The body a good result carries (the stub echoes the request body);
    /// `None` skips the body check.
    pub body: Option<&'a [u8]>,
    /// Whether a call may end in a failure (the function answered an error on
    /// every attempt, or timed out): with injected faults, or against a
    /// function of unknown behaviour. Such a result is then counted under
    /// [`CallbackAudit::results`] only; otherwise it is also a bad result.
    pub failures_allowed: bool,
}

/// The first callback of an accepted call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    /// When the call was submitted (its intended send time in an open loop).
    pub submitted: Instant,
    /// When its first callback reached the receiver.
    pub arrived: Instant,
    /// The function's own time, from `X-Duration-Seconds`, when readable.
    pub function_time: Option<Duration>,
    /// When the function received the attempt that produced the result (Unix
    /// nanoseconds), when the function is the harness's stub (it says so in a
    /// header the worker forwards).
    pub invoked_at: Option<u64>,
    /// When the function answered that attempt (Unix nanoseconds), likewise.
    pub answered_at: Option<u64>,
}

/// How the received callbacks compare with the accepted calls.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallbackAudit {
    /// Accepted calls with at least one callback.
    pub completed: u64,
    /// Accepted calls without a callback.
    pub lost: u64,
    /// Accepted calls with more than one callback.
    pub duplicated_calls: u64,
    /// Callbacks beyond the first of their call (a call called back three
    /// times adds two).
    pub extra_callbacks: u64,
    /// Callbacks without an `X-Call-Id`, or with one no accepted call has.
    pub unexpected: u64,
    /// First callbacks whose result is not a `200` with the expected body.
    pub bad_results: u64,
    /// Callbacks of accepted calls with a missing or malformed promised
    /// header, or an `X-Function-Name` of another function.
    pub bad_headers: u64,
    /// The first problem found, for the report.
    pub first_problem: Option<String>,
    /// The first callback of every completed call.
    pub arrivals: Vec<Arrival>,
    /// Completed calls by result: `200`, or the failure (`503`,
    /// `503 timeout`, `500 dead-lettered: expired`...).
    pub results: BTreeMap<String, u64>,
}

impl CallbackAudit {
    /// Whether every accepted call had exactly one well-formed, good
    /// callback and nothing else arrived.
    pub fn is_clean(&self) -> bool {
        self.lost == 0
            && self.duplicated_calls == 0
            && self.unexpected == 0
            && self.bad_results == 0
            && self.bad_headers == 0
    }

    fn problem(&mut self, problem: impl FnOnce() -> String) {
        if self.first_problem.is_none() {
            self.first_problem = Some(problem());
        }
    }
}

/// Matches `callbacks` against `submitted` (accepted call id → submit time).
pub fn audit_callbacks(
    submitted: &HashMap<String, Instant>,
    callbacks: &[RecordedCallback],
    expect: &Expectations<'_>,
) -> CallbackAudit {
    let mut audit = CallbackAudit::default();
    // Callbacks seen per accepted call id.
    let mut seen: HashMap<&str, u64> = HashMap::with_capacity(submitted.len());
    for callback in callbacks {
        let Some((id, submitted_at)) = callback
            .call_id
            .as_deref()
            .and_then(|id| submitted.get_key_value(id))
        else {
            audit.unexpected += 1;
            audit.problem(|| match &callback.call_id {
                Some(id) => format!("callback for call id {id:?}, which was never accepted"),
                None => "callback without X-Call-Id".to_owned(),
            });
            continue;
        };
        if let Err(problem) = check_headers(callback, expect.function) {
            audit.bad_headers += 1;
            audit.problem(|| format!("call {id}: {problem}"));
        }
        let count = seen.entry(id.as_str()).or_insert(0);
        *count += 1;
        if *count > 1 {
            audit.extra_callbacks += 1;
            if *count == 2 {
                audit.duplicated_calls += 1;
                audit.problem(|| format!("call {id}: more than one callback"));
            }
            continue;
        }
        let status_ok = callback.header("x-function-status") == Some("200");
        let body_ok = !status_ok || expect.body.is_none_or(|body| callback.body == body);
        *audit.results.entry(result_kind(callback)).or_insert(0) += 1;
        if !body_ok || !(status_ok || expect.failures_allowed) {
            audit.bad_results += 1;
            audit.problem(|| {
                format!(
                    "call {id}: result X-Function-Status {:?}{}",
                    callback.header("x-function-status"),
                    if body_ok { "" } else { " with another body" }
                )
            });
        }
        audit.arrivals.push(Arrival {
            submitted: *submitted_at,
            arrived: callback.received_at,
            function_time: callback
                .header("x-duration-seconds")
                .and_then(parse_seconds),
            invoked_at: callback
                .header(INVOKED_AT_HEADER)
                .and_then(|nanos| nanos.parse().ok()),
            answered_at: callback
                .header(ANSWERED_AT_HEADER)
                .and_then(|nanos| nanos.parse().ok()),
        });
    }
    audit.completed = u64::try_from(seen.len()).unwrap_or(u64::MAX);
    audit.lost = u64::try_from(submitted.len().saturating_sub(seen.len())).unwrap_or(u64::MAX);
    if audit.lost > 0 {
        let first_lost = submitted.keys().find(|id| !seen.contains_key(id.as_str()));
        if let Some(id) = first_lost {
            audit.problem(|| format!("call {id}: no callback"));
        }
    }
    audit
}

/// How a call ended, for [`CallbackAudit::results`]: its `X-Function-Status`, then its
/// `X-Function-Error` and `X-Dead-Letter-Reason` if any.
fn result_kind(callback: &RecordedCallback) -> String {
    let mut kind = callback
        .header("x-function-status")
        .unwrap_or("no status")
        .to_owned();
    if let Some(error) = callback.header("x-function-error") {
        kind.push(' ');
        kind.push_str(error);
    }
    if let Some(reason) = callback.header("x-dead-letter-reason") {
        kind.push_str(" dead-lettered: ");
        kind.push_str(reason);
    }
    kind
}

/// Checks the headers the worker promises on every callback.
fn check_headers(callback: &RecordedCallback, function: &str) -> Result<(), String> {
    let header = |name: &'static str| {
        callback
            .header(name)
            .ok_or_else(|| format!("no {name} header"))
    };
    let status = header("x-function-status")?;
    if !status
        .parse::<u16>()
        .is_ok_and(|s| (100..=599).contains(&s))
    {
        return Err(format!("X-Function-Status {status:?} is not a status code"));
    }
    let name = header("x-function-name")?;
    let ours = name == function
        || name
            .strip_prefix(function)
            .is_some_and(|rest| rest.starts_with('.'));
    if !ours {
        return Err(format!(
            "X-Function-Name {name:?} is not {function:?} (or {function}.<namespace>)"
        ));
    }
    let duration = header("x-duration-seconds")?;
    if parse_seconds(duration).is_none() {
        return Err(format!(
            "X-Duration-Seconds {duration:?} is not a number of seconds"
        ));
    }
    let start = header("x-start-time")?;
    if start.parse::<u64>().is_err() {
        return Err(format!(
            "X-Start-Time {start:?} is not Unix time in nanoseconds"
        ));
    }
    Ok(())
}

/// A non-negative, finite number of seconds.
fn parse_seconds(value: &str) -> Option<Duration> {
    let seconds: f64 = value.parse().ok()?;
    Duration::try_from_secs_f64(seconds).ok()
}
