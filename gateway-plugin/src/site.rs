//! Cross-site requests: whether a browser sent a request from a page of another site, which
//! the page's own code cannot hide (browsers set `Sec-Fetch-Site` and `Origin` themselves).
//!
//! Two guards use it: the state-changing admin routes ([`crate::admin::refuse_cross_site`]),
//! and invocations authenticated by basic auth ([`crate::authorize`]), because a browser that
//! has cached OpenFaaS basic-auth credentials for the gateway sends them with any request to
//! it, a cross-site "simple" `POST` or `GET` included, which CORS does not stop (it only keeps
//! the page from reading the answer). Bearer tokens need no such guard: a browser never attaches
//! one by itself.
//!
//! A leaf: it reads headers only; what counts as an allowed origin is the caller's.

use axum::http::{HeaderMap, header};

/// Why a request is cross-site, if it is one. `listed` says whether an `Origin` is one the
/// operator allows for this request (the CORS settings, for an invocation); such a request is
/// never cross-site here. Otherwise a browser says so in `Sec-Fetch-Site` (anything but
/// `same-origin`, or `none` for what the user typed or bookmarked), or sends an `Origin` that is
/// not the gateway's own (`Host`). Clients that are not browsers send neither header.
pub fn cross_site(headers: &HeaderMap, listed: impl FnOnce(&str) -> bool) -> Option<&'static str> {
    let text = |name| headers.get(name).map(|v| v.to_str().unwrap_or("\u{0}"));
    let origin = text(header::ORIGIN.as_str());
    if origin.is_some_and(listed) {
        return None;
    }
    if let Some(site) = text("sec-fetch-site")
        && !site.eq_ignore_ascii_case("same-origin")
        && !site.eq_ignore_ascii_case("none")
    {
        return Some("Sec-Fetch-Site says the request comes from another site");
    }
    if let Some(origin) = origin {
        let authority = origin
            .split_once("://")
            .map(|(_, authority)| authority)
            .filter(|a| !a.is_empty() && !a.contains('/'));
        let host = text(header::HOST.as_str());
        let same = matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h));
        if !same {
            return Some("Origin is not this gateway");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.insert(*name, HeaderValue::from_static(value));
        }
        h
    }

    #[test]
    fn browsers_from_other_sites_are_told_apart_from_the_rest() {
        let listed = |o: &str| o == "https://ui.example.org";
        let host = ("host", "gateway:8080");
        for (pairs, cross) in [
            // Not a browser: neither header.
            (vec![host], false),
            // The gateway's own pages, or what the user typed.
            (vec![host, ("sec-fetch-site", "same-origin")], false),
            (vec![host, ("sec-fetch-site", "none")], false),
            (vec![host, ("origin", "http://gateway:8080")], false),
            // Another site.
            (vec![host, ("sec-fetch-site", "cross-site")], true),
            (vec![host, ("sec-fetch-site", "same-site")], true),
            (vec![host, ("origin", "https://evil.example")], true),
            (vec![host, ("origin", "null")], true),
            (
                vec![
                    host,
                    ("origin", "https://evil.example"),
                    ("sec-fetch-site", "same-origin"),
                ],
                true,
            ),
            // A listed origin, even cross-site.
            (
                vec![
                    host,
                    ("origin", "https://ui.example.org"),
                    ("sec-fetch-site", "cross-site"),
                ],
                false,
            ),
        ] {
            let h = headers(&pairs);
            assert_eq!(cross_site(&h, listed).is_some(), cross, "{pairs:?}");
        }
        // Nothing listed (the admin routes): a listed-looking origin is just another site.
        let h = headers(&[host, ("origin", "https://ui.example.org")]);
        assert!(cross_site(&h, |_| false).is_some());
    }
}
