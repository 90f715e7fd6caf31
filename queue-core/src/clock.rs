//! Wall-clock time as the queue's records and envelopes store it.

/// Current Unix time in nanoseconds (0 if the clock is before 1970).
pub fn unix_nanos_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
