//! Per-call limits: `X-Max-Retries`, `X-Timeout` and `X-Max-Age` on `POST /async-function/...`
//! set the call's own retry count, invocation timeout and maximum age, within the operator's
//! caps ([`CallLimitArgs`]). A value that does not parse, is zero (a timeout or an age), or is
//! above its cap is refused with `400`, naming the header and the cap; nothing is queued.
//!
//! `X-Delay` (a duration) or `X-Not-Before` (an RFC 3339 time) schedule the call
//! ([`not_before`]): it is stored at once and runs at that time, at most `--max-delay` ahead.
//! Both at once, a value that does not parse, a time more than [`PAST_TOLERANCE`] in the past,
//! or one beyond the cap is refused with `400`. A zero delay, or a not-before time that has
//! just passed (within the tolerance: clocks differ a little), runs the call now, unscheduled.

use std::time::Duration;

use axum::http::HeaderMap;
use queue_core::message::{CallOverrides, Priority};
use queue_core::settings::parse_duration;

use crate::error::ApiError;

/// The caps on what a caller may ask for, as flags and environment variables (shared by
/// `gateway-plugin` and `faas-async`).
#[derive(Debug, Clone, clap::Args)]
pub struct CallLimitArgs {
    /// Most retries a call may ask for with `X-Max-Retries` (attempts = retries + 1).
    #[arg(long, env = "GATEWAY_MAX_RETRIES_CAP", default_value_t = 20)]
    pub max_retries_cap: u32,
    /// Longest invocation timeout a call may ask for with `X-Timeout`.
    #[arg(long, env = "GATEWAY_TIMEOUT_CAP", default_value = "24h", value_parser = parse_duration)]
    pub timeout_cap: Duration,
    /// Longest maximum age a call may ask for with `X-Max-Age` (keep it within the stream's
    /// max age: an older message is gone from the stream).
    #[arg(long, env = "GATEWAY_MAX_AGE_CAP", default_value = "24h", value_parser = parse_duration)]
    pub max_age_cap: Duration,
    /// Longest a call may be scheduled ahead with `X-Delay` or `X-Not-Before`. Kept below
    /// `--records-retention` (lowered to nine tenths of it, with a warning), so a scheduled
    /// call's record lives until it runs.
    #[arg(long, env = "GATEWAY_MAX_DELAY", default_value = "12h", value_parser = parse_duration)]
    pub max_delay: Duration,
}

impl CallLimitArgs {
    /// Lowers a `--max-delay` a scheduled call's record would not outlive (not below
    /// `--records-retention`) to nine tenths of the retention, and says so: the record of a
    /// call delayed that long is written at accept and must still be there when it runs.
    pub fn fit_to(&mut self, records_retention: Duration) -> Option<String> {
        if self.max_delay < records_retention {
            return None;
        }
        let lowered = records_retention.saturating_sub(records_retention / 10);
        let note = format!(
            "--max-delay (GATEWAY_MAX_DELAY) {} is not below --records-retention \
             (ASYNC_RECORDS_RETENTION) {}: lowered to {} so a delayed call's record lives until it runs",
            humantime::format_duration(self.max_delay),
            humantime::format_duration(records_retention),
            humantime::format_duration(lowered)
        );
        self.max_delay = lowered;
        Some(note)
    }
}

/// How far in the past an `X-Not-Before` may be and still run (now): a client's clock a
/// little behind the gateway's, a request a while in flight. Further back is refused: a
/// time that far gone is a mistake (a date, a time zone), not a wish to run now.
pub const PAST_TOLERANCE: Duration = Duration::from_secs(60);

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The call's not-before time (Unix nanoseconds) from `X-Delay` or `X-Not-Before`, checked
/// against `caps.max_delay` at `now`; `None`: run now.
pub fn not_before(
    headers: &HeaderMap,
    caps: &CallLimitArgs,
    now: u64,
) -> Result<Option<u64>, ApiError> {
    let delay = header(headers, "x-delay")?;
    let at = header(headers, "x-not-before")?;
    let cap = || {
        format!(
            "this gateway's cap of {} (--max-delay)",
            humantime::format_duration(caps.max_delay)
        )
    };
    let due = match (delay, at) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_delay",
                "send X-Delay or X-Not-Before, not both",
            ));
        }
        (Some(raw), None) => {
            let delay = parse_duration(raw).map_err(|e| {
                ApiError::bad_request(
                    "invalid_delay",
                    format!("X-Delay {raw:?} is not a duration such as 90s, 15m or 2h: {e}"),
                )
            })?;
            if delay > caps.max_delay {
                return Err(ApiError::bad_request(
                    "delay_above_cap",
                    format!("X-Delay {raw} is above {}", cap()),
                ));
            }
            now.saturating_add(nanos(delay))
        }
        (None, Some(raw)) => {
            let parsed =
                time::OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc3339)
                    .map_err(|e| {
                        ApiError::bad_request(
                            "invalid_delay",
                            format!(
                                "X-Not-Before {raw:?} is not an RFC 3339 time such as \
                         2030-01-02T03:04:05Z or 2030-01-02T04:04:05+01:00: {e}"
                            ),
                        )
                    })?;
            let at = u64::try_from(parsed.unix_timestamp_nanos().max(0)).unwrap_or(u64::MAX);
            if at.saturating_add(nanos(PAST_TOLERANCE)) < now {
                return Err(ApiError::bad_request(
                    "invalid_delay",
                    format!(
                        "X-Not-Before {raw} is more than {} in the past",
                        humantime::format_duration(PAST_TOLERANCE)
                    ),
                ));
            }
            if at.saturating_sub(now) > nanos(caps.max_delay) {
                return Err(ApiError::bad_request(
                    "delay_above_cap",
                    format!("X-Not-Before {raw} is further ahead than {}", cap()),
                ));
            }
            at
        }
    };
    // Due now (a zero delay, a time just passed): an ordinary call.
    Ok((due > now).then_some(due))
}

impl Default for CallLimitArgs {
    fn default() -> Self {
        Self {
            max_retries_cap: 20,
            timeout_cap: Duration::from_secs(24 * 3600),
            max_age_cap: Duration::from_secs(24 * 3600),
            max_delay: Duration::from_secs(12 * 3600),
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(|s| Some(s.trim())).map_err(|_| {
            ApiError::bad_request(
                "invalid_override",
                format!("header {name} is not valid text"),
            )
        }),
    }
}

fn duration(
    headers: &HeaderMap,
    name: &'static str,
    flag: &str,
    cap: Duration,
) -> Result<Option<u64>, ApiError> {
    let Some(raw) = header(headers, name)? else {
        return Ok(None);
    };
    let value = parse_duration(raw).map_err(|e| {
        ApiError::bad_request(
            "invalid_override",
            format!("{name} {raw:?} is not a duration such as 90s, 15m or 2h: {e}"),
        )
    })?;
    if value.is_zero() {
        return Err(ApiError::bad_request(
            "invalid_override",
            format!("{name} must be longer than zero"),
        ));
    }
    if value > cap {
        return Err(ApiError::bad_request(
            "override_above_cap",
            format!(
                "{name} {raw} is above this gateway's cap of {} ({flag})",
                humantime::format_duration(cap)
            ),
        ));
    }
    Ok(Some(u64::try_from(value.as_millis()).unwrap_or(u64::MAX)))
}

/// The limits a request asks for, checked against `caps`.
pub fn call_overrides(
    headers: &HeaderMap,
    caps: &CallLimitArgs,
) -> Result<CallOverrides, ApiError> {
    let max_retries = match header(headers, "x-max-retries")? {
        None => None,
        Some(raw) => {
            let retries: u32 = raw
                .parse()
                .ok()
                .filter(|_| raw.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_override",
                        format!("X-Max-Retries {raw:?} is not a whole number of retries, e.g. 2"),
                    )
                })?;
            if retries > caps.max_retries_cap {
                return Err(ApiError::bad_request(
                    "override_above_cap",
                    format!(
                        "X-Max-Retries {retries} is above this gateway's cap of {} (--max-retries-cap)",
                        caps.max_retries_cap
                    ),
                ));
            }
            Some(retries)
        }
    };
    let priority = match header(headers, "x-priority")? {
        None => None,
        Some(raw) => Some(Priority::parse(raw).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_priority",
                format!("X-Priority {raw:?} is not low, normal or high (or 0, 1, 2)"),
            )
        })?),
    };
    Ok(CallOverrides {
        max_retries,
        timeout_ms: duration(headers, "x-timeout", "--timeout-cap", caps.timeout_cap)?,
        max_age_ms: duration(headers, "x-max-age", "--max-age-cap", caps.max_age_cap)?,
        // Normal is the default: not written into the call (its subject stays the same).
        priority: priority.filter(|p| *p != Priority::Normal),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, axum::http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn reads_the_three_headers_within_the_caps() {
        let caps = CallLimitArgs::default();
        assert_eq!(
            call_overrides(&headers(&[]), &caps).unwrap(),
            CallOverrides::default()
        );
        let o = call_overrides(
            &headers(&[
                ("x-max-retries", "2"),
                ("x-timeout", "90s"),
                ("x-max-age", "1h 30m"),
            ]),
            &caps,
        )
        .unwrap();
        assert_eq!(o.max_retries, Some(2));
        assert_eq!(o.timeout_ms, Some(90_000));
        assert_eq!(o.max_age_ms, Some(5_400_000));
        assert_eq!(
            call_overrides(&headers(&[("x-max-retries", "0")]), &caps)
                .unwrap()
                .max_retries,
            Some(0),
            "no retries at all is a valid choice"
        );
    }

    #[test]
    fn refuses_bad_values_and_values_above_the_caps_naming_the_cap() {
        let caps = CallLimitArgs {
            max_retries_cap: 3,
            timeout_cap: Duration::from_secs(60),
            max_age_cap: Duration::from_secs(3600),
            max_delay: Duration::from_secs(3600),
        };
        for (pair, code, says) in [
            (
                ("x-max-retries", "4"),
                "override_above_cap",
                "cap of 3 (--max-retries-cap)",
            ),
            (("x-max-retries", "-1"), "invalid_override", "whole number"),
            (("x-max-retries", "+2"), "invalid_override", "whole number"),
            (("x-max-retries", "two"), "invalid_override", "whole number"),
            (
                ("x-timeout", "61s"),
                "override_above_cap",
                "cap of 1m (--timeout-cap)",
            ),
            (("x-timeout", "0s"), "invalid_override", "longer than zero"),
            (("x-timeout", "soon"), "invalid_override", "not a duration"),
            (
                ("x-priority", "urgent"),
                "invalid_priority",
                "low, normal or high",
            ),
            (
                ("x-priority", "3"),
                "invalid_priority",
                "low, normal or high",
            ),
            (
                ("x-max-age", "2h"),
                "override_above_cap",
                "cap of 1h (--max-age-cap)",
            ),
        ] {
            let e = call_overrides(&headers(&[pair]), &caps).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{pair:?}");
            assert_eq!(e.code, code, "{pair:?}");
            assert!(e.message.contains(says), "{pair:?}: {}", e.message);
        }
    }

    #[test]
    fn delays_and_not_before_times_within_the_cap() {
        let caps = CallLimitArgs::default();
        let now = 1_900_000_000_000_000_000; // 2030-03-17T17:46:40Z
        let s = 1_000_000_000;
        assert_eq!(not_before(&headers(&[]), &caps, now).unwrap(), None);
        assert_eq!(
            not_before(&headers(&[("x-delay", "90s")]), &caps, now).unwrap(),
            Some(now + 90 * s)
        );
        assert_eq!(
            not_before(&headers(&[("x-delay", "0s")]), &caps, now).unwrap(),
            None,
            "a zero delay runs now"
        );
        assert_eq!(
            not_before(
                &headers(&[("x-not-before", "2030-03-17T18:46:40Z")]),
                &caps,
                now
            )
            .unwrap(),
            Some(now + 3600 * s)
        );
        assert_eq!(
            not_before(
                &headers(&[("x-not-before", "2030-03-17T19:46:40.5+01:00")]),
                &caps,
                now
            )
            .unwrap(),
            Some(now + 3600 * s + s / 2),
            "offsets and fractions"
        );
        assert_eq!(
            not_before(
                &headers(&[("x-not-before", "2030-03-17T17:46:00Z")]),
                &caps,
                now
            )
            .unwrap(),
            None,
            "just passed: runs now"
        );
    }

    #[test]
    fn refuses_bad_delays_naming_what_is_wrong_and_the_cap() {
        let caps = CallLimitArgs {
            max_delay: Duration::from_secs(3600),
            ..CallLimitArgs::default()
        };
        let now = 1_900_000_000_000_000_000;
        for (pairs, code, says) in [
            (
                &[("x-delay", "1s"), ("x-not-before", "2030-03-17T18:00:00Z")][..],
                "invalid_delay",
                "not both",
            ),
            (
                &[("x-delay", "soon")][..],
                "invalid_delay",
                "not a duration",
            ),
            (&[("x-delay", "-5s")][..], "invalid_delay", "not a duration"),
            (
                &[("x-delay", "2h")][..],
                "delay_above_cap",
                "cap of 1h (--max-delay)",
            ),
            (
                &[("x-not-before", "tomorrow")][..],
                "invalid_delay",
                "not an RFC 3339 time",
            ),
            (
                &[("x-not-before", "2030-03-17 18:00:00")][..],
                "invalid_delay",
                "not an RFC 3339 time",
            ),
            (
                &[("x-not-before", "2030-03-17T17:44:00Z")][..],
                "invalid_delay",
                "in the past",
            ),
            (
                &[("x-not-before", "2030-03-17T19:00:00Z")][..],
                "delay_above_cap",
                "cap of 1h (--max-delay)",
            ),
        ] {
            let e = not_before(&headers(pairs), &caps, now).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{pairs:?}");
            assert_eq!(e.code, code, "{pairs:?}");
            assert!(e.message.contains(says), "{pairs:?}: {}", e.message);
        }
        let mut fitted = caps;
        assert_eq!(fitted.fit_to(Duration::from_secs(7200)), None);
        assert_eq!(fitted.max_delay, Duration::from_secs(3600));
        let mut fitted = CallLimitArgs::default();
        let note = fitted.fit_to(Duration::from_secs(12 * 3600)).unwrap();
        assert!(
            note.contains("--max-delay") && note.contains("--records-retention"),
            "{note}"
        );
        assert_eq!(fitted.max_delay, Duration::from_secs(12 * 360 * 9));
    }
}
