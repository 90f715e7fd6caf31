//! Header policy shared by the gateway (what it stores from a request, what it serves from a
//! kept result) and the worker (what it forwards to a function and from its response). Every
//! rule about which header may cross from one party to another lives here.

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

/// Headers that belong to one connection and that a reverse proxy (the gateway's front mode,
/// passing requests to the OpenFaaS gateway) removes in both directions, with every header the
/// `Connection` header names ([`connection_tokens`]). Unlike [`HOP_BY_HOP`], `Content-Length`
/// is kept: the proxied message is the same message, its length with it.
pub const PROXY_HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// True for a header a reverse proxy does not pass on ([`PROXY_HOP_BY_HOP`]); the headers a
/// `Connection` header names are found with [`connection_tokens`].
pub fn is_proxy_hop_by_hop(name: &str) -> bool {
    PROXY_HOP_BY_HOP
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
}

/// The header names one `Connection` header value lists (`close` and `keep-alive` included:
/// removing a header of that name is harmless).
pub fn connection_tokens(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|t| !t.is_empty())
}

/// Headers the worker sets on every function request from the call itself. A client's values
/// are dropped by the gateway, and again by the worker (a message from an older gateway), and
/// the worker's own are *inserted*, never appended.
pub const WORKER_REQUEST_HEADERS: [&str; 4] =
    ["x-call-id", "x-start-time", "x-retry", "x-retry-max"];

/// True for a header the worker sets on a function request ([`WORKER_REQUEST_HEADERS`]).
pub fn is_worker_request_header(name: &str) -> bool {
    WORKER_REQUEST_HEADERS
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
}

/// Headers of a client's request that set the call's own limits (`X-Max-Retries`, `X-Timeout`,
/// `X-Max-Age`), its time (`X-Delay`, `X-Not-Before`) and its priority (`X-Priority`): read by
/// the gateway into the call, never forwarded to the function.
pub const CALL_OVERRIDE_HEADERS: [&str; 6] = [
    "x-max-retries",
    "x-timeout",
    "x-max-age",
    "x-delay",
    "x-not-before",
    "x-priority",
];

/// True for a header of [`CALL_OVERRIDE_HEADERS`].
pub fn is_call_override_header(name: &str) -> bool {
    CALL_OVERRIDE_HEADERS
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
}

/// Headers that say where a request came from. Only the gateway writes them (from the
/// connection's peer); a client's values are dropped unless the client is a trusted proxy.
pub const FORWARDING_HEADERS: [&str; 3] = ["forwarded", "x-real-ip", "x-client-ip"];

/// True for a header that says where a request came from: [`FORWARDING_HEADERS`] and every
/// `X-Forwarded-*` (`-For`, `-Host`, `-Proto`, `-Port`, `-Prefix`, ...).
pub fn is_forwarding_header(name: &str) -> bool {
    FORWARDING_HEADERS
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
        || starts_with_ignore_case(name, "x-forwarded-")
}

/// True for a header of a client's request that the gateway does not keep: hop-by-hop, set by
/// the worker, a limit of the call itself, or (from a client that is not a trusted proxy) a
/// forwarding header.
pub fn is_dropped_from_client(name: &str, trusted_proxy: bool) -> bool {
    is_hop_by_hop(name)
        || is_worker_request_header(name)
        || is_call_override_header(name)
        || (!trusted_proxy && is_forwarding_header(name))
}

/// Headers the worker sets on a callback. A function's response never supplies them: the
/// receiver must be able to trust each of them (the Standard Webhooks signature headers
/// included, whether or not callbacks are signed).
pub const CALLBACK_HEADERS: [&str; 13] = [
    "x-call-id",
    "x-retry",
    "x-retry-max",
    "x-call-state",
    "x-function-status",
    "x-function-error",
    "x-function-name",
    "x-duration-seconds",
    "x-start-time",
    "x-dead-letter-reason",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

/// True for a header only the worker sets on a callback ([`CALLBACK_HEADERS`]).
pub fn is_callback_header(name: &str) -> bool {
    CALLBACK_HEADERS
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
}

/// Headers the gateway sets on a kept result it serves (`GET /async-calls/{id}/result`). The
/// stored response never supplies them.
pub const RESULT_HEADERS: [&str; 7] = [
    "content-type",
    "content-disposition",
    "content-security-policy",
    "x-content-type-options",
    "x-function-status",
    "x-function-content-type",
    "x-call-id",
];

/// Response headers that make a browser act (store cookies, open the origin to other origins,
/// navigate, change security policy, register workers, report elsewhere, clear the origin's
/// data) rather than describe the body. A kept result is served as data, so none of them is
/// passed from a function's response to a browser. Names are matched case-insensitively;
/// [`BROWSER_CONTROL_PREFIXES`] covers families.
pub const BROWSER_CONTROL_HEADERS: [&str; 28] = [
    "set-cookie",
    "set-cookie2",
    "refresh",
    "location",
    "content-location",
    "link",
    "clear-site-data",
    "strict-transport-security",
    "public-key-pins",
    "public-key-pins-report-only",
    "expect-ct",
    "alt-svc",
    "service-worker-allowed",
    "service-worker",
    "timing-allow-origin",
    "permissions-policy",
    "feature-policy",
    "document-policy",
    "origin-agent-cluster",
    "referrer-policy",
    "report-to",
    "reporting-endpoints",
    "nel",
    "accept-ch",
    "critical-ch",
    "www-authenticate",
    "x-frame-options",
    "x-xss-protection",
];

/// Families of browser-control headers (CORS, cross-origin isolation, CSP and its report-only
/// form, `X-DNS-Prefetch-Control` and friends in `X-Permitted-…`).
pub const BROWSER_CONTROL_PREFIXES: [&str; 6] = [
    "access-control-",
    "cross-origin-",
    "content-security-policy",
    "x-permitted-",
    "x-dns-prefetch-",
    "x-download-options",
];

fn starts_with_ignore_case(name: &str, prefix: &str) -> bool {
    name.len() >= prefix.len()
        && name.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// True for a header that controls the browser rather than describing the body.
pub fn is_browser_control(name: &str) -> bool {
    BROWSER_CONTROL_HEADERS
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
        || BROWSER_CONTROL_PREFIXES
            .iter()
            .any(|p| starts_with_ignore_case(name, p))
}

/// True for a stored response header the result endpoint passes on: not hop-by-hop, not one
/// the gateway sets itself, not a browser-control header.
pub fn is_served_from_result(name: &str) -> bool {
    !is_hop_by_hop(name)
        && !RESULT_HEADERS.iter().any(|h| name.eq_ignore_ascii_case(h))
        && !is_browser_control(name)
}

/// Content types a browser shows as inert data (no script, no markup, no plugins), by their
/// essence (the type without parameters), with the value served for each when the stored
/// response named a charset. Anything else (`text/html`, `image/svg+xml`, `application/xml`,
/// `application/pdf`, unknown types) is served as `application/octet-stream`.
pub const INERT_CONTENT_TYPES: [(&str, &str); 10] = [
    ("application/json", "application/json; charset=utf-8"),
    (
        "application/problem+json",
        "application/problem+json; charset=utf-8",
    ),
    (
        "application/x-ndjson",
        "application/x-ndjson; charset=utf-8",
    ),
    ("application/octet-stream", "application/octet-stream"),
    ("text/plain", "text/plain; charset=utf-8"),
    ("text/csv", "text/csv; charset=utf-8"),
    ("image/png", "image/png"),
    ("image/jpeg", "image/jpeg"),
    ("image/gif", "image/gif"),
    ("image/webp", "image/webp"),
];

/// The content type the result endpoint serves for a stored response whose own content type
/// is `declared`: the declared essence when it is inert ([`INERT_CONTENT_TYPES`]; a charset is
/// served as UTF-8, other parameters are dropped), else `application/octet-stream`. The value
/// is always one of ours, never the function's text.
pub fn served_content_type(declared: Option<&str>) -> &'static str {
    const NEUTRAL: &str = "application/octet-stream";
    let Some(declared) = declared else {
        return NEUTRAL;
    };
    let mut parts = declared.split(';');
    let essence = parts.next().unwrap_or_default().trim();
    let has_charset = parts.any(|p| starts_with_ignore_case(p.trim(), "charset="));
    INERT_CONTENT_TYPES
        .iter()
        .find(|(t, _)| essence.eq_ignore_ascii_case(t))
        .map_or(
            NEUTRAL,
            |(plain, with_charset)| {
                if has_charset { with_charset } else { plain }
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_drops_connection_headers_but_keeps_the_length() {
        for h in [
            "Connection",
            "keep-alive",
            "Proxy-Authorization",
            "TE",
            "Transfer-Encoding",
        ] {
            assert!(is_proxy_hop_by_hop(h), "{h}");
        }
        for h in ["content-length", "host", "authorization", "x-call-id"] {
            assert!(!is_proxy_hop_by_hop(h), "{h}");
        }
        assert_eq!(
            connection_tokens(" close, X-Hop ,,keep-alive").collect::<Vec<_>>(),
            ["close", "X-Hop", "keep-alive"]
        );
    }

    #[test]
    fn browser_control_headers_are_recognised() {
        for h in [
            "Set-Cookie",
            "access-control-allow-origin",
            "Access-Control-Allow-Credentials",
            "Refresh",
            "Content-Security-Policy-Report-Only",
            "Cross-Origin-Opener-Policy",
            "Clear-Site-Data",
            "Link",
            "Location",
        ] {
            assert!(is_browser_control(h), "{h}");
            assert!(!is_served_from_result(h), "{h}");
        }
        for h in ["x-custom", "etag", "content-encoding", "cache-control"] {
            assert!(!is_browser_control(h), "{h}");
            assert!(is_served_from_result(h), "{h}");
        }
        for h in ["Content-Type", "x-function-status", "X-Call-Id", "Host"] {
            assert!(!is_served_from_result(h), "{h}");
        }
    }

    #[test]
    fn only_inert_content_types_are_served_as_themselves() {
        assert_eq!(
            served_content_type(Some("text/html")),
            "application/octet-stream"
        );
        assert_eq!(
            served_content_type(Some("image/svg+xml")),
            "application/octet-stream"
        );
        assert_eq!(
            served_content_type(Some("text/plain;charset=UTF-8")),
            "text/plain; charset=utf-8"
        );
        assert_eq!(
            served_content_type(Some("Application/JSON")),
            "application/json"
        );
        assert_eq!(
            served_content_type(Some("text/plain; boundary=\"<script>\"")),
            "text/plain"
        );
        assert_eq!(served_content_type(None), "application/octet-stream");
    }

    #[test]
    fn system_headers_are_dropped_from_client_input() {
        for h in [
            "X-Retry",
            "x-retry-max",
            "X-Call-Id",
            "x-start-time",
            "Connection",
        ] {
            assert!(is_dropped_from_client(h, false), "{h}");
            assert!(is_dropped_from_client(h, true), "{h}");
        }
        for h in [
            "X-Forwarded-For",
            "x-forwarded-host",
            "Forwarded",
            "X-Real-Ip",
        ] {
            assert!(is_dropped_from_client(h, false), "{h}");
            assert!(!is_dropped_from_client(h, true), "{h} from a trusted proxy");
        }
        assert!(!is_dropped_from_client("authorization", false));
        assert!(is_callback_header("X-Call-State"));
    }
}
