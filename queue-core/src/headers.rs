//! Header policy shared by the gateway (what it stores from a request) and the worker (what it
//! forwards to a function and from its response).

/// Headers that belong to one connection, not to the message (RFC 9110 §7.6.1), plus those the
/// HTTP client sets itself. They are never stored or forwarded.
pub const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// True for headers that must not be copied from one HTTP exchange to another.
pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h)) || name.eq_ignore_ascii_case("host")
}
