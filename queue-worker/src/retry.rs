//! When to retry a function call, and how long to wait: exponential backoff between an initial
//! and a maximum wait, with OpenFaaS Pro's three jitter modes ([`Backoff`]: none, full, equal),
//! `Retry-After` honoured on 429 and 503 (within the maximum).
//!
//! Retries are scheduled with a delayed nak, so a waiting call holds no concurrency permit and
//! any worker may take the next attempt. The attempt number is JetStream's delivery count.

use std::time::{Duration, SystemTime};

use queue_core::Outcome;

/// How the wait before a retry is drawn from the exponential delay
/// `base = min(max_wait, initial_wait * 2^(attempt - 1))`: OpenFaaS Pro's `backoff` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Backoff {
    /// No jitter: exactly `base` (OpenFaaS Pro's default). Retries of calls that failed
    /// together stay together.
    Exponential,
    /// Full jitter: anywhere in `[0, base]`. Spreads retries the most; a wait may be short.
    Full,
    /// Equal jitter: half fixed, half random, in `[base / 2, base]`. Spread, never below half.
    #[default]
    Equal,
}

/// Retry settings for function calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Invocations at most, the first included.
    pub max_attempts: u32,
    /// Base wait before the second attempt.
    pub initial_wait: Duration,
    /// Longest wait between attempts.
    pub max_wait: Duration,
    /// Function statuses that are retried. Connection errors and timeouts always are.
    pub codes: Vec<u16>,
    /// How the wait is drawn within the exponential delay.
    pub backoff: Backoff,
}

/// What to do after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The outcome is final (success, or a status that is not retried): deliver it.
    Final,
    /// Try again after this wait.
    RetryAfter(Duration),
    /// Retryable, but no attempts are left: dead-letter it.
    Exhausted,
}

/// Parses a `Retry-After` value: delay in seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

impl RetryPolicy {
    /// Is this outcome worth another attempt?
    pub fn is_retryable(&self, outcome: &Outcome) -> bool {
        // 503 without a response means the function could not be reached or timed out.
        let transport_failure = outcome.error.is_some() && outcome.status == 503;
        transport_failure || self.codes.contains(&outcome.status)
    }

    /// The window the wait before attempt `attempt + 1` is drawn from, with
    /// `base = min(max_wait, initial_wait * 2^(attempt - 1))`: `[base, base]` (exponential),
    /// `[0, base]` (full jitter) or `[base / 2, base]` (equal jitter).
    pub fn backoff_window(&self, attempt: u32) -> (Duration, Duration) {
        let doublings = attempt.saturating_sub(1).min(30);
        let base = self
            .initial_wait
            .saturating_mul(1 << doublings)
            .min(self.max_wait);
        let low = match self.backoff {
            Backoff::Exponential => base,
            Backoff::Full => Duration::ZERO,
            Backoff::Equal => base / 2,
        };
        (low, base)
    }

    /// Decides after attempt number `attempt` (1-based) produced `outcome`.
    pub fn decide(&self, attempt: u32, outcome: &Outcome) -> Decision {
        if !self.is_retryable(outcome) {
            return Decision::Final;
        }
        if attempt >= self.max_attempts {
            return Decision::Exhausted;
        }
        let (low, high) = self.backoff_window(attempt);
        let jitter = high.saturating_sub(low).mul_f64(fastrand::f64());
        let mut wait = low + jitter;
        if matches!(outcome.status, 429 | 503)
            && let Some(after) = outcome
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
                .and_then(|(_, v)| parse_retry_after(v, SystemTime::now()))
        {
            wait = wait.max(after);
        }
        Decision::RetryAfter(wait.min(self.max_wait))
    }
}

/// Parses a comma-separated list of HTTP status codes (`408,429,500`).
pub fn parse_codes(s: &str) -> Result<Vec<u16>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.parse::<u16>()
                .ok()
                .filter(|n| (100..=599).contains(n))
                .ok_or_else(|| format!("{c:?} is not an HTTP status code"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            initial_wait: Duration::from_secs(1),
            max_wait: Duration::from_secs(10),
            codes: vec![408, 429, 500, 502, 503, 504],
            backoff: Backoff::Equal,
        }
    }

    fn outcome(status: u16, headers: &[(&str, &str)], error: Option<&str>) -> Outcome {
        Outcome {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            body: Bytes::new(),
            stored: None,
            duration: Duration::ZERO,
            error: error.map(Into::into),
        }
    }

    #[test]
    fn success_and_client_errors_are_final() {
        let p = policy();
        assert_eq!(p.decide(1, &outcome(200, &[], None)), Decision::Final);
        assert_eq!(p.decide(1, &outcome(404, &[], None)), Decision::Final);
        assert_eq!(p.decide(4, &outcome(201, &[], None)), Decision::Final);
    }

    #[test]
    fn retryable_failures_wait_within_the_backoff_window() {
        let p = policy();
        for attempt in 1..4 {
            let (low, high) = p.backoff_window(attempt);
            for _ in 0..50 {
                match p.decide(attempt, &outcome(503, &[], None)) {
                    Decision::RetryAfter(w) => assert!(w >= low && w <= high, "{w:?}"),
                    other => panic!("{other:?}"),
                }
            }
        }
        assert_eq!(
            p.backoff_window(1),
            (Duration::from_millis(500), Duration::from_secs(1))
        );
        assert_eq!(
            p.backoff_window(3),
            (Duration::from_secs(2), Duration::from_secs(4))
        );
        assert_eq!(
            p.backoff_window(30),
            (Duration::from_secs(5), Duration::from_secs(10))
        );
        // A refused connection is retried too.
        assert!(matches!(
            p.decide(1, &outcome(503, &[], Some("connect"))),
            Decision::RetryAfter(_)
        ));
        assert_eq!(p.decide(4, &outcome(500, &[], None)), Decision::Exhausted);
    }

    #[test]
    fn retry_after_is_honoured_within_the_maximum() {
        let p = policy();
        match p.decide(1, &outcome(429, &[("Retry-After", "3")], None)) {
            Decision::RetryAfter(w) => assert!(w >= Duration::from_secs(3)),
            other => panic!("{other:?}"),
        }
        match p.decide(1, &outcome(503, &[("retry-after", "3600")], None)) {
            Decision::RetryAfter(w) => assert_eq!(w, Duration::from_secs(10)),
            other => panic!("{other:?}"),
        }
        // Only on 429 and 503.
        match p.decide(1, &outcome(500, &[("retry-after", "8")], None)) {
            Decision::RetryAfter(w) => assert!(w <= Duration::from_secs(1)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retry_after_parses_seconds_and_http_dates() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    /// Each mode's window, and every drawn wait inside it: exponential is exact, full jitter
    /// reaches below half the delay, equal jitter never does.
    #[test]
    fn each_backoff_mode_draws_from_its_window() {
        let secs = Duration::from_secs;
        for (backoff, windows) in [
            (
                Backoff::Exponential,
                [(secs(1), secs(1)), (secs(4), secs(4)), (secs(10), secs(10))],
            ),
            (
                Backoff::Full,
                [
                    (Duration::ZERO, secs(1)),
                    (Duration::ZERO, secs(4)),
                    (Duration::ZERO, secs(10)),
                ],
            ),
            (
                Backoff::Equal,
                [
                    (Duration::from_millis(500), secs(1)),
                    (secs(2), secs(4)),
                    (secs(5), secs(10)),
                ],
            ),
        ] {
            let p = RetryPolicy {
                backoff,
                ..policy()
            };
            for (attempt, window) in [1, 3, 30].into_iter().zip(windows) {
                assert_eq!(p.backoff_window(attempt), window, "{backoff:?} {attempt}");
            }
            let waits: Vec<Duration> = (0..400)
                .map(|_| match p.decide(3, &outcome(502, &[], None)) {
                    Decision::RetryAfter(w) => w,
                    other => panic!("{other:?}"),
                })
                .collect();
            assert!(
                waits
                    .iter()
                    .all(|w| *w >= windows[1].0 && *w <= windows[1].1),
                "{backoff:?}: {waits:?}"
            );
            let below_half = waits.iter().filter(|w| **w < secs(2)).count();
            let distinct: std::collections::HashSet<_> = waits.iter().collect();
            match backoff {
                Backoff::Exponential => assert_eq!(distinct.len(), 1, "{waits:?}"),
                // 400 draws all above half the delay: probability 2^-400.
                Backoff::Full => assert!(below_half > 0 && distinct.len() > 1),
                Backoff::Equal => assert!(below_half == 0 && distinct.len() > 1),
            }
        }
        // Retry-After still wins over a shorter drawn wait, in every mode.
        for backoff in [Backoff::Exponential, Backoff::Full, Backoff::Equal] {
            let p = RetryPolicy {
                backoff,
                ..policy()
            };
            match p.decide(1, &outcome(429, &[("Retry-After", "7")], None)) {
                Decision::RetryAfter(w) => assert_eq!(w, secs(7), "{backoff:?}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn codes_parse() {
        assert_eq!(parse_codes("408, 429,500").unwrap(), vec![408, 429, 500]);
        assert!(parse_codes("200,abc").is_err());
        assert!(parse_codes("999").is_err());
    }
}
