//! The body limit derived from the queue's message limit (JetStream: the server's
//! `max_payload`). The queue connection itself is a [`queue_core::backend::CallQueue`].

use queue_core::backend::HEADER_ALLOWANCE;

/// Largest body that leaves room below `max_payload` for the envelope's metadata (method, path,
/// request headers) and the NATS headers: a quarter of the payload, at most 64 KiB.
pub fn body_limit_for(max_payload: u64) -> u64 {
    let overhead = (max_payload / 4)
        .min(64 * 1024)
        .max(HEADER_ALLOWANCE as u64);
    max_payload.saturating_sub(overhead)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_limit_leaves_room_for_metadata() {
        assert_eq!(body_limit_for(1 << 20), (1 << 20) - 64 * 1024);
        assert_eq!(body_limit_for(128 * 1024), 96 * 1024);
        assert_eq!(body_limit_for(8 * 1024), 4 * 1024);
        assert_eq!(body_limit_for(0), 0);
    }
}
