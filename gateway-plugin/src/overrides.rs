//! Per-call limits: `X-Max-Retries`, `X-Timeout` and `X-Max-Age` on `POST /async-function/...`
//! set the call's own retry count, invocation timeout and maximum age, within the operator's
//! caps ([`CallLimitArgs`]). A value that does not parse, is zero (a timeout or an age), or is
//! above its cap is refused with `400`, naming the header and the cap; nothing is queued.

use std::time::Duration;

use axum::http::HeaderMap;
use queue_core::message::CallOverrides;
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
}

impl Default for CallLimitArgs {
    fn default() -> Self {
        Self {
            max_retries_cap: 20,
            timeout_cap: Duration::from_secs(24 * 3600),
            max_age_cap: Duration::from_secs(24 * 3600),
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
    Ok(CallOverrides {
        max_retries,
        timeout_ms: duration(headers, "x-timeout", "--timeout-cap", caps.timeout_cap)?,
        max_age_ms: duration(headers, "x-max-age", "--max-age-cap", caps.max_age_cap)?,
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
}
