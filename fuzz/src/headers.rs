//! Header handling: the policy of which headers cross from one exchange to another
//! (`queue_core::headers`), and the worker's request head built from a queued call's stored
//! headers (`queue_worker::http1`), where a client's header could otherwise split the request.
//!
//! Properties:
//! - every predicate is case-insensitive; a trusted proxy never has more dropped than a
//!   client; a header the worker sets is always dropped from a client; a header served from a
//!   kept result is none of hop-by-hop, browser-control or set by the gateway; every listed
//!   name, and every name of a listed family, in any case, is classified as listed;
//! - the served content type is always one of ours, never the function's text;
//! - a request head, parsed back by an independent parser, is one complete head with exactly
//!   the request line, `host`, the length, and the stored headers that are well-formed, in
//!   order: a stored header never adds a line or a request of its own.

use arbitrary::{Result, Unstructured};
use bytes::Bytes;
use queue_core::headers::{
    BROWSER_CONTROL_HEADERS, BROWSER_CONTROL_PREFIXES, CALLBACK_HEADERS, FORWARDING_HEADERS,
    HOP_BY_HOP, INERT_CONTENT_TYPES, RESULT_HEADERS, WORKER_REQUEST_HEADERS, is_browser_control,
    is_callback_header, is_dropped_from_client, is_forwarding_header, is_hop_by_hop,
    is_served_from_result, is_worker_request_header, served_content_type,
};
use queue_worker::http1::{Origin, Request, request_head};

use crate::generate::{HEADER_PIECES, bytes, list, text};

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    let raw = String::from_utf8_lossy(data);
    predicates(&raw);
    content_type(&raw);
    let mut u = Unstructured::new(data);
    if let Ok((list, name)) = listed_name(&mut u) {
        listed(list, &name);
    }
    if let Ok(request) = request(&mut u) {
        head_round_trip(&request);
    }
}

type Predicate = fn(&str) -> bool;

const PREDICATES: [(&str, Predicate); 8] = [
    ("is_hop_by_hop", is_hop_by_hop),
    ("is_worker_request_header", is_worker_request_header),
    ("is_forwarding_header", is_forwarding_header),
    ("is_callback_header", is_callback_header),
    ("is_browser_control", is_browser_control),
    ("is_served_from_result", is_served_from_result),
    ("is_dropped_from_client(trusted)", |n| {
        is_dropped_from_client(n, true)
    }),
    ("is_dropped_from_client(untrusted)", |n| {
        is_dropped_from_client(n, false)
    }),
];

fn predicates(name: &str) {
    let upper = name.to_ascii_uppercase();
    let lower = name.to_ascii_lowercase();
    for (what, p) in PREDICATES {
        assert_eq!(p(name), p(&upper), "{what}({name:?}) depends on case");
        assert_eq!(p(name), p(&lower), "{what}({name:?}) depends on case");
    }
    if is_dropped_from_client(name, true) {
        assert!(is_dropped_from_client(name, false), "{name:?}");
    }
    if is_worker_request_header(name) || is_hop_by_hop(name) {
        assert!(is_dropped_from_client(name, true), "{name:?}");
    }
    if is_served_from_result(name) {
        assert!(
            !is_hop_by_hop(name) && !is_browser_control(name),
            "{name:?}"
        );
        assert!(
            !RESULT_HEADERS.iter().any(|h| h.eq_ignore_ascii_case(name)),
            "{name:?}"
        );
    }
}

fn content_type(declared: &str) {
    let served = served_content_type(Some(declared));
    let ours = INERT_CONTENT_TYPES
        .iter()
        .any(|(plain, charset)| served == *plain || served == *charset);
    assert!(
        ours || served == "application/octet-stream",
        "{declared:?} served as {served:?}"
    );
    let essence = declared.split(';').next().unwrap_or_default().trim();
    if !INERT_CONTENT_TYPES
        .iter()
        .any(|(t, _)| t.eq_ignore_ascii_case(essence))
    {
        assert_eq!(served, "application/octet-stream", "{declared:?}");
    }
}

/// Which list a generated name comes from.
#[derive(Debug, Clone, Copy)]
enum List {
    HopByHop,
    Worker,
    Forwarding,
    Callback,
    BrowserControl,
}

fn random_case(u: &mut Unstructured<'_>, name: &str) -> Result<String> {
    name.chars()
        .map(|c| {
            Ok(if u.arbitrary()? {
                c.to_ascii_uppercase()
            } else {
                c
            })
        })
        .collect()
}

/// A listed name, or a name of a listed family, in a random case.
fn listed_name(u: &mut Unstructured<'_>) -> Result<(List, String)> {
    let suffix = text(u, HEADER_PIECES, 2)?;
    let (list, name) = match u.int_in_range(0..=6)? {
        0 => (List::HopByHop, (*u.choose(&HOP_BY_HOP)?).to_owned()),
        1 => (
            List::Worker,
            (*u.choose(&WORKER_REQUEST_HEADERS)?).to_owned(),
        ),
        2 => (
            List::Forwarding,
            (*u.choose(&FORWARDING_HEADERS)?).to_owned(),
        ),
        3 => (List::Forwarding, format!("x-forwarded-{suffix}")),
        4 => (List::Callback, (*u.choose(&CALLBACK_HEADERS)?).to_owned()),
        5 => (
            List::BrowserControl,
            (*u.choose(&BROWSER_CONTROL_HEADERS)?).to_owned(),
        ),
        _ => (
            List::BrowserControl,
            format!("{}{suffix}", u.choose(&BROWSER_CONTROL_PREFIXES)?),
        ),
    };
    Ok((list, random_case(u, &name)?))
}

fn listed(list: List, n: &str) {
    match list {
        List::HopByHop => {
            assert!(is_hop_by_hop(n) && !is_served_from_result(n), "{n:?}");
            assert!(is_dropped_from_client(n, true), "{n:?}");
        }
        List::Worker => {
            assert!(is_worker_request_header(n), "{n:?}");
            assert!(is_dropped_from_client(n, true), "{n:?}");
        }
        List::Forwarding => {
            assert!(is_forwarding_header(n), "{n:?}");
            assert!(is_dropped_from_client(n, false), "{n:?}");
        }
        List::Callback => assert!(is_callback_header(n), "{n:?}"),
        List::BrowserControl => {
            assert!(is_browser_control(n) && !is_served_from_result(n), "{n:?}");
        }
    }
    predicates(n);
}

/// A request as the worker builds it for a function: the call's method, path and headers.
#[derive(Debug)]
struct Generated {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Bytes,
}

fn request(u: &mut Unstructured<'_>) -> Result<Generated> {
    Ok(Generated {
        method: text(u, &["GET", "POST", "HEAD", "PUT", "a", " ", "\r\n", "/"], 2)?,
        target: text(
            u,
            &["/function/f", "/", "?x=1", "%20", " ", "\r\n", "\t", "é"],
            4,
        )?,
        headers: list(u, 6, |u| {
            Ok((text(u, HEADER_PIECES, 3)?, text(u, HEADER_PIECES, 5)?))
        })?,
        body: Bytes::from(bytes(u, 8)?),
    })
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_field_value(s: &str) -> bool {
    s.bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
}

fn head_round_trip(generated: &Generated) {
    let origin = Origin {
        host: "gateway".into(),
        port: 8080,
    };
    let headers: Vec<(&str, &str)> = generated
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let request = Request {
        method: &generated.method,
        origin: &origin,
        host_header: "gateway:8080",
        target: &generated.target,
        headers: &headers,
        body: &generated.body,
    };
    let Ok(head) = request_head(&request) else {
        assert!(
            !is_token(&generated.method)
                || generated.target.is_empty()
                || generated.target.bytes().any(|b| b <= b' ' || b == 0x7f),
            "{generated:?} refused"
        );
        return;
    };
    let mut slots = [httparse::EMPTY_HEADER; 16];
    let mut parsed = httparse::Request::new(&mut slots);
    let status = match parsed.parse(&head) {
        Ok(status) => status,
        Err(e) => panic!(
            "the request head {:?} does not parse: {e}",
            String::from_utf8_lossy(&head)
        ),
    };
    assert_eq!(
        status,
        httparse::Status::Complete(head.len()),
        "one head, all of it"
    );
    assert_eq!(parsed.method, Some(generated.method.as_str()));
    assert_eq!(parsed.path, Some(generated.target.as_str()));
    let mut expected: Vec<(&str, &[u8])> = vec![("host", b"gateway:8080")];
    let bodyless = generated.body.is_empty()
        && (generated.method.eq_ignore_ascii_case("GET")
            || generated.method.eq_ignore_ascii_case("HEAD"));
    let length = generated.body.len().to_string();
    if !bodyless {
        expected.push(("content-length", length.as_bytes()));
    }
    for (name, value) in &headers {
        if is_token(name) && is_field_value(value) {
            expected.push((name, value.as_bytes()));
        }
    }
    let got: Vec<(&str, &[u8])> = parsed.headers.iter().map(|h| (h.name, h.value)).collect();
    let trim = |v: &[u8]| v.trim_ascii().to_vec();
    assert_eq!(got.len(), expected.len(), "{generated:?}");
    for ((gn, gv), (en, ev)) in got.iter().zip(&expected) {
        assert_eq!(gn, en);
        assert_eq!(trim(gv), trim(ev), "{generated:?}");
    }
}

/// Header names of every list and content types.
pub fn seeds() -> Vec<Vec<u8>> {
    [
        "Content-Type",
        "X-Forwarded-For",
        "x-call-id",
        "Transfer-Encoding",
        "Access-Control-Allow-Origin",
        "Set-Cookie",
        "webhook-signature",
        "text/plain; charset=UTF-8",
        "application/json",
        "text/html",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}
